"""Commits and tags in a release repository (cl_release.gitops), on real git repositories."""

from __future__ import annotations

import hashlib

import pytest

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
