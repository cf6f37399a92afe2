"""Commits and tags in a release repository (cl_release.gitops), on real git repositories."""

from __future__ import annotations

import hashlib

import pytest

from cl_release import gitops
from cl_release.errors import GitError
from cl_release.gitops import ReleaseRepo

from helpers import git


@pytest.fixture
def repo(tmp_path) -> ReleaseRepo:
    r = ReleaseRepo.init(tmp_path / "r")
    (r.root / ".gitignore").write_text("outputs/\n")
    (r.root / "a.txt").write_text("a")
    r.commit_all("first")
    return r


def test_not_a_repository(tmp_path):
    with pytest.raises(GitError, match="is not a git repository") as e:
        ReleaseRepo(tmp_path)
    assert "cl-release init" in str(e.value)
    with pytest.raises(GitError):
        ReleaseRepo(tmp_path / "missing")


def test_empty_repository_has_no_head(tmp_path):
    r = ReleaseRepo.init(tmp_path / "e")
    assert r.head() is None and r.commits_touching("x") == []
    (r.root / "x").write_text("1")
    assert r.dirty_paths() == ["x"]
    sha = r.commit(["x"], "first")
    assert sha == r.head() and r.dirty_paths() == []


def test_dirty_paths(repo):
    assert repo.dirty_paths() == []
    (repo.root / "a.txt").write_text("changed")
    (repo.root / "new.txt").write_text("new")
    (repo.root / "outputs").mkdir()
    (repo.root / "outputs" / "w").write_text("ignored by .gitignore")
    (repo.root / ".cl-release").mkdir()
    (repo.root / ".cl-release" / "release.lock").write_text("")
    assert repo.dirty_paths() == ["a.txt", "new.txt"]
    with pytest.raises(GitError, match="uncommitted changes: a.txt, new.txt"):
        repo.ensure_clean()
    assert repo.ensure_clean(allow_dirty=True) == ["a.txt", "new.txt"]
    git(repo.root, "add", "a.txt")  # staged counts too
    assert "a.txt" in repo.dirty_paths()


def test_many_dirty_paths_are_summarized(repo):
    for i in range(8):
        (repo.root / f"f{i}").write_text("x")
    with pytest.raises(GitError, match="and 3 more"):
        repo.ensure_clean()


def test_untracked_snapshot_is_clean_only_if_its_name_is_its_hash(repo):
    snaps = repo.root / "datasets" / "snapshots"
    snaps.mkdir(parents=True)
    data = b'{"text":"x"}\n'
    good = snaps / f"{hashlib.sha256(data).hexdigest()}.jsonl"
    good.write_bytes(data)
    assert repo.dirty_paths() == []  # left by an interrupted release: harmless
    bad = snaps / f"{'0' * 64}.jsonl"
    bad.write_bytes(data)
    assert repo.dirty_paths() == [f"datasets/snapshots/{'0' * 64}.jsonl"]
    bad.unlink()
    repo.commit([good.relative_to(repo.root).as_posix()], "snapshot")
    good.write_bytes(b"tampered\n")  # a committed snapshot that changed is dirty
    assert repo.dirty_paths() == [good.relative_to(repo.root).as_posix()]


def test_commit_only_the_given_paths(repo):
    (repo.root / "a.txt").write_text("a2")
    (repo.root / "b.txt").write_text("b")
    (repo.root / "c.txt").write_text("c")
    git(repo.root, "add", "c.txt")
    sha = repo.commit(["a.txt", "b.txt", "a.txt"], "two files\n\nbody")
    assert git(repo.root, "show", "--name-only", "--format=", sha).split() == ["a.txt", "b.txt"]
    assert git(repo.root, "log", "-1", "--format=%B").strip() == "two files\n\nbody"
    assert "c.txt" in repo.dirty_paths()
    assert repo.commit(["a.txt"], "nothing changed") == sha  # nothing to commit: no empty commit


def test_tags_are_never_moved(repo):
    first = repo.head()
    repo.tag("v1.0.0", "one")
    assert repo.tag_commit("v1.0.0") == first and "v1.0.0" in repo.tags()
    (repo.root / "a.txt").write_text("2")
    repo.commit(["a.txt"], "second")
    with pytest.raises(GitError, match="tag v1.0.0 already exists"):
        repo.tag("v1.0.0", "again")
    assert repo.tag_commit("v1.0.0") == first
    assert repo.tag_commit("v9.9.9") is None
    repo.tag("v1.1.0", "older commit", first)
    assert repo.tag_commit("v1.1.0") == first
    assert "older commit" in git(repo.root, "tag", "-n1", "-l", "v1.1.0")  # annotated


def test_file_at_and_commits_touching(repo):
    c1 = repo.head()
    (repo.root / "a.txt").write_text("second")
    c2 = repo.commit(["a.txt"], "2")
    (repo.root / "b.txt").write_text("b")
    repo.commit(["b.txt"], "3")
    assert repo.file_at(c1, "a.txt") == "a" and repo.file_at(c2, "a.txt") == "second"
    assert repo.file_at(c1, "b.txt") is None
    assert repo.commits_touching("a.txt") == [c1, c2]


# ---------------------------------------------------------------- long messages, locks, git state

# Linux refuses one argument longer than 128 KiB (MAX_ARG_STRLEN): such a message must not
# reach git's command line.
LONG = "# Changelog\n\n" + "".join(f"- change {i}: {'x' * 60}\n" for i in range(3000))


def test_long_commit_and_tag_messages_go_through_stdin(repo):
    assert len(LONG.encode()) > 128 * 1024
    (repo.root / "a.txt").write_text("long")
    sha = repo.commit(["a.txt"], "title\n\n" + LONG)
    assert git(repo.root, "log", "-1", "--format=%B", sha) == "title\n\n" + LONG + "\n"
    repo.tag("v1.0.0", "tag title\n\n" + LONG)
    # kept as written: the '# Changelog' line is not stripped as a comment
    assert git(repo.root, "tag", "-l", "--format=%(contents)", "v1.0.0") == "tag title\n\n" + LONG + "\n"
    (repo.root / "b.txt").write_text("b")
    assert repo.commit_all("all\n\n" + LONG) == repo.head()


def test_read_queries_never_rewrite_the_index(repo):
    """A kill -9 during `git status` or `git diff` once left .git/index.lock behind."""
    import os

    index = repo.root / ".git" / "index"
    before = index.read_bytes()
    st = (repo.root / "a.txt").stat()
    os.utime(repo.root / "a.txt", ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))  # stat-dirty
    assert repo.dirty_paths() == []
    repo.ensure_clean()
    assert repo.tags() == set() and repo.commits_touching("a.txt") and repo.file_at("HEAD", "a.txt") == "a"
    assert index.read_bytes() == before  # never refreshed, so never locked


@pytest.mark.parametrize("lock", ["index.lock", "HEAD.lock", "refs/heads/main.lock", "refs/tags/v1.0.0.lock"])
def test_a_held_git_lock_is_refused_with_how_to_fix_it(repo, lock, monkeypatch):
    monkeypatch.setattr(gitops, "LOCK_WAIT_SECONDS", 0.1)
    path = repo.root / ".git" / lock
    path.write_text("")
    with pytest.raises(GitError) as e:
        repo.check_state()
    text = str(e.value)
    assert f".git/{lock} exists" in text and f"rm {path}" in text and "\n" not in text
    assert path.exists()  # not ours: never removed
    path.unlink()
    assert repo.check_state() == []


def test_a_lock_that_goes_away_within_a_second_is_waited_for(repo):
    import threading

    lock = repo.root / ".git" / "index.lock"
    lock.write_text("")
    threading.Timer(0.3, lock.unlink).start()
    assert repo.check_state() == []


def _dead_pid() -> int:
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _marker(repo, pid: int, started: float) -> None:
    import json

    folder = repo.root / ".git" / "cl-release-writes"
    folder.mkdir(exist_ok=True)
    (folder / f"{pid}.json").write_text(json.dumps({"pid": pid, "started": started, "command": "add"}))


def test_locks_left_by_a_killed_cl_release_are_removed(repo, monkeypatch):
    monkeypatch.setattr(gitops, "LOCK_WAIT_SECONDS", 0.1)
    import os
    import time

    now = time.time()
    dead = _dead_pid()
    _marker(repo, dead, now - 5)
    torn = repo.root / ".git" / "cl-release-writes" / f".{dead}.json.k2j4.tmp"  # killed mid-write
    torn.write_text('{"pi')
    ours = [repo.root / ".git" / "index.lock", repo.root / ".git" / "refs" / "heads" / "main.lock"]
    for p in ours:
        p.write_text("")
    said = []
    assert repo.check_state(said.append) == [".git/index.lock", ".git/refs/heads/main.lock"]
    assert not any(p.exists() for p in ours) and len(said) == 2 and "interrupted cl-release" in said[0]
    assert list((repo.root / ".git" / "cl-release-writes").iterdir()) == []  # markers consumed, torn one too

    # a lock older than the killed command, or much younger, is someone else's: refused
    _marker(repo, _dead_pid(), now)
    old = repo.root / ".git" / "index.lock"
    old.write_text("")
    os.utime(old, (now - 100, now - 100))
    with pytest.raises(GitError, match="index.lock exists"):
        repo.check_state()
    assert old.exists()
    old.unlink()

    # a cl-release that is running git right now: its lock is live, never removed
    _marker(repo, os.getppid(), now)
    live = repo.root / ".git" / "index.lock"
    live.write_text("")
    with pytest.raises(GitError, match="another git command is running"):
        repo.check_state()
    assert live.exists()


def test_a_write_leaves_no_marker(repo):
    (repo.root / "a.txt").write_text("3")
    repo.commit(["a.txt"], "3")
    repo.tag("v3", "three")
    assert list((repo.root / ".git" / "cl-release-writes").iterdir()) == []


@pytest.mark.parametrize("name,what", [("MERGE_HEAD", "a merge"), ("rebase-merge", "a rebase"),
                                       ("CHERRY_PICK_HEAD", "a cherry-pick")])
def test_an_operation_in_progress_is_refused(repo, name, what):
    path = repo.root / ".git" / name
    path.mkdir() if name.startswith("rebase") else path.write_text(repo.head() + "\n")
    with pytest.raises(GitError, match=f"{what} is in progress") as e:
        repo.check_state()
    assert "--abort" in str(e.value)


def test_no_identity_is_refused(repo, monkeypatch, tmp_path):
    for key in ("GIT_AUTHOR_NAME", "GIT_AUTHOR_EMAIL", "GIT_COMMITTER_NAME", "GIT_COMMITTER_EMAIL", "EMAIL"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("GIT_CONFIG_NOSYSTEM", "1")
    git(repo.root, "config", "user.useConfigOnly", "true")
    with pytest.raises(GitError, match="no user identity") as e:
        repo.check_state()
    assert "git config --global user.email" in str(e.value)
