"""Finishing, undoing and checking releases: :func:`reconcile` completes what a crash left
recorded but not committed or tagged, :func:`rollback` makes an earlier version current (one
registry commit, :func:`cl_release.registry.committed_change`), :func:`verify` re-hashes every
file the registry names."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..files import sha256_file
from ..project import Project
from ..registry import REGISTRY_FILE, Registry, committed_change, release_lock
from .plan import HELDOUT, Progress, no_progress
from .weights import ADAPTER_FILE, weights_sha256


def reconcile(root: Path, repo, progress: Progress = no_progress) -> list[str]:
    """Finish releases an earlier crash left recorded but not committed or not tagged.

    Returns the versions it finished."""
    registry = Registry(root)
    data = registry.load()
    done = []
    rel = REGISTRY_FILE
    if rel in repo.dirty_paths():
        head_text = repo.file_at("HEAD", rel) if repo.head() else None
        head_versions = set()
        if head_text:
            try:
                head_versions = {m["version"] for m in json.loads(head_text)["models"]}
            except (ValueError, KeyError):
                head_versions = set()
        pending = [m for m in data["models"] if m["version"] not in head_versions]
        paths = [rel] + [d["path"] for m in pending for d in entry_data_files(m) if (root / d["path"]).exists()]
        versions = ", ".join(m["version"] for m in pending) or "registry updates"
        progress(f"finishing an interrupted operation: committing {versions}")
        repo.commit(paths, f"Record {versions} (finished after an interruption)")
        done.extend(m["version"] for m in pending)
    tags = repo.tags()
    for m in data["models"]:
        tag = f"v{m['version']}"
        if m["status"] == "released" and tag not in tags:
            commit = _commit_introducing(repo, m["version"])
            if commit:
                progress(f"finishing interrupted release {m['version']}: tag {tag}")
                repo.tag(tag, tag_message(m), commit)
                if m["version"] not in done:
                    done.append(m["version"])
    return done


def _commit_introducing(repo, version: str) -> str | None:
    rel = REGISTRY_FILE
    for commit in repo.commits_touching(rel):
        text = repo.file_at(commit, rel)
        try:
            if text and any(m["version"] == version for m in json.loads(text)["models"]):
                return commit
        except (ValueError, KeyError):
            continue
    return None


def tag_message(entry: dict[str, Any]) -> str:
    msg = f"cl-release {entry['version']} ({entry['strategy']}, parent {entry['parent'] or '-'})"
    if entry.get("notes"):
        msg += f"\n\n{entry['notes']}"
    return msg



@dataclass
class Rollback:
    entry: dict[str, Any]
    previous: str | None  # the version that was current
    changed: bool  # False: ``entry`` was already current (nothing written, no commit)
    commit: str | None = None


def rollback(project: Project, version: str) -> Rollback:
    """Make ``version`` current (the next release builds on it) and commit the registry
    (:func:`~cl_release.registry.committed_change`, under the release lock).

    Rolling back to the version that is already current writes nothing and makes no commit."""
    from ..gitops import ReleaseRepo

    root = project.root
    repo = ReleaseRepo(root)  # before the lock: nothing is written in a folder that is not a repository
    with release_lock(root):
        data = Registry(root).load()
        previous = data["current"]
        entry = Registry.find(data, version)
        if entry["version"] == previous:
            return Rollback(entry=entry, previous=previous, changed=False, commit=repo.head())
        with committed_change(root, f"Roll back to {entry['version']}", lock_held=True) as data:
            entry = Registry.rollback_in(data, version)
        return Rollback(entry=entry, previous=previous, changed=True, commit=repo.head())


@dataclass
class Check:
    version: str
    what: str
    path: str
    expected: str | None
    actual: str | None

    @property
    def ok(self) -> bool:
        return self.expected == self.actual

    def to_dict(self) -> dict[str, Any]:
        return {"version": self.version, "what": self.what, "path": self.path, "expected": self.expected,
                "actual": self.actual, "ok": self.ok}


def entry_data_files(entry: dict[str, Any]) -> list[dict[str, Any]]:
    """The data files a registry entry records (``name``, ``path``, ``sha256``): its training
    parts, its held-out checks, the retirements in effect. What a commit of it includes, and
    what ``verify`` re-hashes."""
    files = [dict(d) for d in entry["datasets"]]
    if entry.get(HELDOUT):
        files.append({"name": HELDOUT, **entry[HELDOUT]})
    if entry.get("retired"):
        files.append({"name": "retired", **entry["retired"]})
    return files


def verify(root: Path) -> list[Check]:
    """Re-hash every dataset, config, adapter (and merged weights) the registry names."""
    data = Registry(root).load()
    checks: list[Check] = []

    def file_hash(rel: str) -> str | None:
        p = root / rel
        return sha256_file(p) if p.is_file() else None

    for m in data["models"]:
        v = m["version"]
        for d in entry_data_files(m):
            checks.append(Check(v, f"dataset {d['name']}", d["path"], d["sha256"], file_hash(d["path"])))
        checks.append(Check(v, "config", m["config"]["path"], m["config"]["sha256"], file_hash(m["config"]["path"])))
        adapter = m["adapter"]["path"]
        checks.append(Check(v, "adapter", adapter, m["adapter"]["sha256"], file_hash(f"{adapter}/{ADAPTER_FILE}")))
        if m.get("merged"):
            p = root / m["merged"]["path"]
            checks.append(Check(v, "merged", m["merged"]["path"], m["merged"]["sha256"],
                                weights_sha256(p) if p.is_dir() else None))
    return checks
