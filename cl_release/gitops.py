"""Commits and tags in the release repository (GitPython)."""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

from .errors import GitError

IGNORED_PREFIXES = ("outputs/", ".cl-release/")


def _git():
    import git  # GitPython; imported lazily (it starts a git process on import paths)

    return git


class ReleaseRepo:
    def __init__(self, root: Path):
        git = _git()
        self.root = Path(root)
        try:
            self.repo = git.Repo(self.root)
        except (git.InvalidGitRepositoryError, git.NoSuchPathError):
            raise GitError(f"{self.root} is not a git repository",
                           hint="run 'cl-release init DIR' or 'git init' there") from None

    @classmethod
    def init(cls, root: Path) -> "ReleaseRepo":
        git = _git()
        git.Repo.init(root, initial_branch="main")
        return cls(root)

    def head(self) -> str | None:
        try:
            return self.repo.head.commit.hexsha
        except ValueError:  # no commits yet
            return None

    def dirty_paths(self) -> list[str]:
        """Modified, staged or untracked files (git-ignored ones excluded)."""
        # An untracked content-addressed snapshot (left by an interrupted release) is
        # harmless: its name is its hash, and a re-run rewrites or reuses it. Not "dirty".
        out = {p for p in self.repo.untracked_files if not self._is_snapshot(p)}
        if self.head():
            out |= {d.a_path for d in self.repo.index.diff(None)}
            out |= {d.a_path for d in self.repo.index.diff("HEAD")}
        return sorted(p for p in out if not p.startswith(IGNORED_PREFIXES))

    def _is_snapshot(self, rel: str) -> bool:
        from .datasets import SNAPSHOT_DIR
        from .files import sha256_file

        p = self.root / rel
        return (rel.startswith(SNAPSHOT_DIR + "/") and p.suffix == ".jsonl" and p.is_file()
                and sha256_file(p) == p.stem)

    def ensure_clean(self, allow_dirty: bool = False) -> list[str]:
        dirty = self.dirty_paths()
        if dirty and not allow_dirty:
            shown = ", ".join(dirty[:5]) + (f" and {len(dirty) - 5} more" if len(dirty) > 5 else "")
            raise GitError(f"the release repository has uncommitted changes: {shown}",
                           hint="commit them first, or pass --allow-dirty")
        return dirty

    def _run(self, *args: str) -> str:
        git = _git()
        try:
            return self.repo.git.execute(["git", *args])
        except git.GitCommandError as e:
            detail = " ".join(str(e.stderr or e).split())[:300]
            hint = None
            if "user.email" in detail or "identity" in detail:
                hint = "set it with: git config --global user.email you@example.com"
            raise GitError(f"git {args[0]} failed in {self.root}: {detail}", hint=hint) from None

    def commit(self, paths: Iterable[str], message: str) -> str:
        """Commit exactly ``paths`` (other changes stay uncommitted); a no-op if nothing changed."""
        paths = list(dict.fromkeys(paths))
        if paths:
            self._run("add", "--", *paths)
        if self.head() and not self.repo.index.diff("HEAD", paths=paths or None):
            return self.head()  # nothing to commit (in ``paths``; other staged changes stay)
        if self.head():
            self._run("commit", "-q", "--no-verify", "-m", message, "--", *paths)
        else:
            self._run("commit", "-q", "--no-verify", "-m", message)
        return self.head()

    def commit_all(self, message: str) -> str:
        self._run("add", "-A")
        self._run("commit", "-q", "--no-verify", "-m", message)
        return self.head()

    def tag_commit(self, name: str) -> str | None:
        try:
            return self.repo.tags[name].commit.hexsha
        except (IndexError, ValueError):
            return None

    def tag(self, name: str, message: str, commit: str | None = None) -> None:
        if self.tag_commit(name) is not None:
            raise GitError(f"tag {name} already exists", hint="tags are never moved; pick another version")
        self.repo.create_tag(name, ref=commit or "HEAD", message=message)

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
