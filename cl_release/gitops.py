"""Commits and tags in the release repository (GitPython).

Messages (commit, tag) go to git on stdin, never on the command line: release notes can be
long. Read queries never take ``.git/index.lock`` (``GIT_OPTIONAL_LOCKS=0``), so a kill -9
during one leaves nothing behind. Every command that writes to git runs under a marker file
naming this process (``.git/cl-release-writes/<pid>.json``): when a kill -9 stops it,
``check_state`` of the next run knows which lock files that git left, and removes them.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterable

from .errors import GitError

IGNORED_PREFIXES = ("outputs/", ".cl-release/")
WRITES_DIR = "cl-release-writes"  # in the git directory
# A lock file another git command holds goes away within this many seconds (a `git status`
# in an editor); one that stays is stale or held by a long command, and the release refuses.
LOCK_WAIT_SECONDS = 1.0
# A git command cl-release runs takes well under this long; a lock file created later than
# this after a killed cl-release started its git command is not that command's.
OWN_LOCK_WINDOW_SECONDS = 60.0
# Operations that a commit of cl-release must not land in the middle of.
IN_PROGRESS = (
    ("MERGE_HEAD", "a merge", "git merge --abort"),
    ("CHERRY_PICK_HEAD", "a cherry-pick", "git cherry-pick --abort"),
    ("REVERT_HEAD", "a revert", "git revert --abort"),
    ("rebase-merge", "a rebase", "git rebase --abort"),
    ("rebase-apply", "a rebase or 'git am'", "git rebase --abort, or git am --abort"),
)


def _git():
    import git  # GitPython; imported lazily (it starts a git process on import paths)

    return git


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # a marker of this pid is not of a command running now: it was left
    if os.name != "posix":
        return True  # no harmless liveness probe (os.kill would end the process): never remove
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class ReleaseRepo:
    def __init__(self, root: Path):
        git = _git()
        self.root = Path(root)
        try:
            self.repo = git.Repo(self.root)
        except (git.InvalidGitRepositoryError, git.NoSuchPathError):
            raise GitError(f"{self.root} is not a git repository",
                           hint="run 'cl-release init DIR' or 'git init' there") from None
        # `git status` and friends refresh the index opportunistically under .git/index.lock;
        # a kill -9 at that moment would leave the lock and block every later commit.
        self.repo.git.update_environment(GIT_OPTIONAL_LOCKS="0")

    @classmethod
    def init(cls, root: Path) -> "ReleaseRepo":
        git = _git()
        git.Repo.init(root, initial_branch="main")
        return cls(root)

    @property
    def git_dir(self) -> Path:
        return Path(self.repo.git_dir)

    @property
    def common_dir(self) -> Path:
        return Path(self.repo.common_dir)

    def head(self) -> str | None:
        try:
            return self.repo.head.commit.hexsha
        except ValueError:  # no commits yet
            return None

    def dirty_paths(self) -> list[str]:
        """Modified, staged or untracked files (git-ignored ones excluded)."""
        # One `git status` (no optional locks: it never writes the index).
        out = self._run("status", "--porcelain=v1", "-z", "--untracked-files=all", "--no-renames")
        paths = set()
        for record in out.split("\0"):
            if len(record) < 4:
                continue
            code, path = record[:2], record[3:]
            # An untracked content-addressed snapshot (left by an interrupted release) is
            # harmless: its name is its hash, and a re-run rewrites or reuses it. Not "dirty".
            if code == "??" and self._is_snapshot(path):
                continue
            paths.add(path)
        return sorted(p for p in paths if not p.startswith(IGNORED_PREFIXES))

    def _is_snapshot(self, rel: str) -> bool:
        from .data.formats import SNAPSHOT_DIR
        from .files import sha256_file

        p = self.root / rel
        if not (rel.startswith(SNAPSHOT_DIR + "/") and p.is_file()):
            return False
        if p.suffix == ".jsonl":
            return sha256_file(p) == p.stem
        # the retirements a release records (release.RETIRED_PREFIX), content-addressed too
        return p.suffix == ".json" and p.name.startswith("retired-") and sha256_file(p) == p.stem[len("retired-"):]

    def ensure_clean(self, allow_dirty: bool = False) -> list[str]:
        dirty = self.dirty_paths()
        if dirty and not allow_dirty:
            shown = ", ".join(dirty[:5]) + (f" and {len(dirty) - 5} more" if len(dirty) > 5 else "")
            raise GitError(f"the release repository has uncommitted changes: {shown}",
                           hint="commit them first, or pass --allow-dirty")
        return dirty

    # -- the state git must be in for cl-release to commit and tag

    def check_state(self, progress: Callable[[str], None] | None = None) -> list[str]:
        """Refuse, before anything is written, a repository git could not commit or tag in.

        Checks the committer identity, that no merge, rebase, cherry-pick or revert is in
        progress, and that no lock file of git is held. Lock files that a killed cl-release
        left (see the module docstring) are removed; their paths are returned. Any other lock
        file that does not go away within ``LOCK_WAIT_SECONDS`` is a GitError that says how
        to fix it."""
        for var in ("GIT_AUTHOR_IDENT", "GIT_COMMITTER_IDENT"):
            status, _out, err = self._try("var", var)
            if status != 0:
                detail = " ".join(str(err).split())[:200]
                raise GitError(f"git has no user identity to commit with in {self.root}: {detail}",
                               hint="set it with: git config --global user.email you@example.com; "
                                    "git config --global user.name 'Your Name'")
        for name, what, undo in IN_PROGRESS:
            if (self.git_dir / name).exists():
                raise GitError(f"{what} is in progress in {self.root}",
                               hint=f"finish it or undo it ({undo}), then run again")
        removed = self._clear_own_locks()
        for path in removed:
            if progress:
                progress(f"removed {self._show(path)}, left by an interrupted cl-release")
        deadline = time.monotonic() + LOCK_WAIT_SECONDS
        while True:
            held = self.lock_files()
            if not held:
                return [self._show(p) for p in removed]
            if time.monotonic() >= deadline:
                break
            time.sleep(0.05)
        shown = self._show(held[0])
        more = f" (and {len(held) - 1} more lock files)" if len(held) > 1 else ""
        raise GitError(f"{shown} exists{more}: another git command is running in {self.root}, or one was killed",
                       hint=f"if no git command is running, remove it: rm {' '.join(str(p) for p in held)}")

    def lock_files(self) -> list[Path]:
        """Lock files of git that would make a commit or tag fail (index, HEAD, refs)."""
        found: set[Path] = set()
        for folder in {self.git_dir, self.common_dir}:
            found |= {p for p in folder.glob("*.lock") if p.is_file()}
        for sub in ("refs/heads", "refs/tags"):
            found |= {p for p in (self.common_dir / sub).rglob("*.lock") if p.is_file()}
        found |= {p for p in (self.common_dir / "reftable").glob("*.lock") if p.is_file()}
        return sorted(found)

    def _show(self, path: Path) -> str:
        try:
            return Path(path).resolve().relative_to(self.root.resolve()).as_posix()
        except (ValueError, OSError):
            return str(path)

    def _clear_own_locks(self) -> list[Path]:
        """Remove lock files git left when a cl-release process was killed during a write."""
        windows = []
        markers = self.git_dir / WRITES_DIR
        for marker in sorted(markers.glob("*.json")) if markers.is_dir() else []:
            try:
                info = json.loads(marker.read_text(encoding="utf-8"))
                pid, started = int(info["pid"]), float(info["started"])
            except (OSError, ValueError, KeyError, TypeError):
                marker.unlink(missing_ok=True)  # torn: its process died before git started
                continue
            if _pid_alive(pid):
                continue  # another cl-release is running git right now: its locks are live
            windows.append((started - 1.0, started + OWN_LOCK_WINDOW_SECONDS))
            marker.unlink(missing_ok=True)
        for tmp in sorted(markers.glob(".*.tmp")) if markers.is_dir() else []:  # a marker's torn write
            pid = tmp.name.split(".")[1]
            if not pid.isdigit() or not _pid_alive(int(pid)):
                tmp.unlink(missing_ok=True)
        removed = []
        for lock in self.lock_files() if windows else []:
            try:
                mtime = lock.stat().st_mtime
            except FileNotFoundError:
                continue
            if any(lo <= mtime <= hi for lo, hi in windows):
                lock.unlink(missing_ok=True)
                removed.append(lock)
        return removed

    # -- running git

    def _run(self, *args: str, input: str | None = None) -> str:
        """Run git; ``input`` goes to its stdin (through a temporary file, never argv)."""
        git = _git()
        stdin = None
        try:
            if input is not None:
                stdin = tempfile.TemporaryFile()
                stdin.write(input.encode("utf-8"))
                stdin.seek(0)
            return self.repo.git.execute(["git", *args], istream=stdin)
        except git.GitCommandError as e:
            detail = " ".join(str(e.stderr or e).split())[:300]
            hint = None
            if "user.email" in detail or "identity" in detail:
                hint = "set it with: git config --global user.email you@example.com"
            raise GitError(f"git {args[0]} failed in {self.root}: {detail}", hint=hint) from None
        except OSError as e:
            raise GitError(f"git {args[0]} failed in {self.root}: {e}") from None
        finally:
            if stdin is not None:
                stdin.close()

    def _write(self, *args: str, input: str | None = None) -> str:
        """A git command that changes the repository, under this process's marker."""
        from .files import atomic_write_json

        marker = self.git_dir / WRITES_DIR / f"{os.getpid()}.json"
        try:
            atomic_write_json(marker, {"pid": os.getpid(), "started": time.time(), "command": args[0]})
        except OSError as e:
            raise GitError(f"cannot write in {self.git_dir}: {e.strerror}",
                           hint="cl-release needs write access to the repository's .git folder") from None
        try:
            return self._run(*args, input=input)
        finally:
            marker.unlink(missing_ok=True)

    def _try(self, *args: str) -> tuple[int, str, str]:
        """Run git; (exit status, stdout, stderr) instead of an exception."""
        try:
            return self.repo.git.execute(["git", *args], with_extended_output=True, with_exceptions=False)
        except OSError as e:
            raise GitError(f"git {args[0]} failed in {self.root}: {e}") from None

    def _staged_differs(self, paths: list[str]) -> bool:
        """Whether the index differs from HEAD (in ``paths``; everywhere if empty)."""
        status, _out, err = self._try("diff-index", "--cached", "--quiet", "HEAD", "--", *paths)
        if status not in (0, 1):
            raise GitError(f"git diff-index failed in {self.root}: {' '.join(str(err).split())[:300]}")
        return status == 1

    def commit(self, paths: Iterable[str], message: str) -> str:
        """Commit exactly ``paths`` (other changes stay uncommitted); a no-op if nothing changed."""
        paths = list(dict.fromkeys(paths))
        if paths:
            self._write("add", "--", *paths)
        if self.head() and not self._staged_differs(paths):
            return self.head()  # nothing to commit (in ``paths``; other staged changes stay)
        if self.head():
            self._write("commit", "-q", "--no-verify", "-F", "-", "--", *paths, input=message)
        else:
            self._write("commit", "-q", "--no-verify", "-F", "-", input=message)
        return self.head()

    def commit_all(self, message: str) -> str:
        self._write("add", "-A")
        self._write("commit", "-q", "--no-verify", "-F", "-", input=message)
        return self.head()

    def tag_commit(self, name: str) -> str | None:
        try:
            return self.repo.tags[name].commit.hexsha
        except (IndexError, ValueError):
            return None

    def tag(self, name: str, message: str, commit: str | None = None) -> None:
        """An annotated tag; the message is kept as written (lines starting with # too)."""
        if self.tag_commit(name) is not None:
            raise GitError(f"tag {name} already exists", hint="tags are never moved; pick another version")
        self._write("tag", "-a", "--cleanup=whitespace", "-F", "-", name, commit or "HEAD", input=message)

    def tags(self) -> set[str]:
        return {t.name for t in self.repo.tags}

    def file_at(self, commit: str, path: str) -> str | None:
        try:
            return self.repo.git.show(f"{commit}:{path}")
        except _git().GitCommandError:
            return None

    def commits_touching(self, path: str) -> list[str]:
        """Commits that changed ``path``, oldest first."""
        if not self.head():
            return []
        out = self.repo.git.log("--format=%H", "--reverse", "--", path)
        return [c for c in out.splitlines() if c]
