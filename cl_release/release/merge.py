"""Merged weights: ``axolotl merge-lora`` into ``outputs/vX.Y.Z/merged``, with the adapter's
tokenizer and chat template (merge-lora copies them from the *base*, which may differ)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Callable

from ..errors import IntegrityError, TrainingError, UserError
from ..project import Project
from ..registry import Registry, committed_change, release_lock
from .weights import ADAPTER_FILE, adapter_sha256, weights_sha256

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "tokenizer.model", "added_tokens.json", "vocab.json", "merges.txt")


def _norm(path: str) -> str:
    return os.path.normpath(path).rstrip("/")


def check_adapter_base(root: Path, entry: dict[str, Any]) -> None:
    """Refuse to merge an adapter whose recorded base is not the registry's."""
    adapter_dir = root / entry["adapter"]["path"]
    cfg_path = adapter_dir / "adapter_config.json"
    try:
        cfg = json.loads(cfg_path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise IntegrityError(f"{entry['adapter']['path']}/adapter_config.json: cannot read ({e})") from None
    expected = (entry.get("train_base") or {}).get("path") or entry["base_model"]["name"]
    actual = cfg.get("base_model_name_or_path")
    if actual is None or _norm(str(actual)) != _norm(expected):
        raise UserError(
            f"the adapter of {entry['version']} was trained on {actual!r}, but the registry says {expected!r}",
            hint="refusing to merge onto a different base model",
        )
    if adapter_sha256(adapter_dir) != entry["adapter"]["sha256"]:
        raise IntegrityError(f"{entry['adapter']['path']}/{ADAPTER_FILE} does not match the registry's hash",
                             hint="run 'cl-release verify'")


def merge_and_commit(project: Project, version: str, *,
                     progress: Callable[[str], None] = lambda m: None) -> dict[str, Any]:
    """``cl-release merge``: :func:`merge_version` under the release lock (no release merges or
    records at the same time), the git state checked before the merge, the record committed."""
    from ..gitops import ReleaseRepo

    repo = ReleaseRepo(project.root)  # before the lock: nothing is written in a folder that is not a repository
    with release_lock(project.root):
        repo.check_state(progress)  # before the merge, not after it
        return merge_version(project, version, progress=progress, commit=True)


def merge_version(project: Project, version: str, *, progress: Callable[[str], None] = lambda m: None,
                  commit: bool = False) -> dict[str, Any]:
    """Merge ``version``'s adapter into its base; record ``merged`` in its registry entry.

    The caller holds the release lock (``release_lock``): a release merging its parent, or
    ``cl-release merge``. ``commit``: commit the record to git (``committed_change``);
    otherwise the caller commits it (a release, with its own commit)."""
    from .train import run_merge

    root = project.root
    registry = Registry(root)
    entry = registry.get(version)
    v = entry["version"]
    final = root / "outputs" / f"v{v}" / "merged"
    if final.is_dir() and (final / "config.json").is_file():
        digest = weights_sha256(final)
        recorded = (entry.get("merged") or {}).get("sha256")
        if recorded and recorded != digest:
            raise IntegrityError(f"outputs/v{v}/merged does not match the registry's hash",
                                 hint="run 'cl-release verify'; merged weights are never overwritten")
        progress(f"{v} is already merged: outputs/v{v}/merged")
    else:
        check_adapter_base(root, entry)
        staging = root / "outputs" / ".staging" / f"merge-v{v}-{os.getpid()}"
        if staging.exists():
            shutil.rmtree(staging)
        staging.mkdir(parents=True)
        progress(f"merging {v} (axolotl merge-lora) ...")
        try:
            run_merge(root, entry["config"]["path"], entry["adapter"]["path"],
                      os.path.relpath(staging, root), log_path=staging / "merge.log")
            produced = staging / "merged"
            if not (produced / "config.json").is_file():
                raise TrainingError(f"merge-lora wrote no model into {os.path.relpath(produced, root)}")
            adapter_dir = root / entry["adapter"]["path"]
            for name in TOKENIZER_FILES:
                if (adapter_dir / name).is_file():
                    shutil.copy2(adapter_dir / name, produced / name)
            os.rename(produced, final)  # atomic publish; fails if someone else published first
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        digest = weights_sha256(final)
    change = (committed_change(root, f"Record merged weights of {v}", lock_held=True) if commit
              else registry.transaction())
    with change as data:
        e = registry.find(data, v)
        e["merged"] = {"path": f"outputs/v{v}/merged", "sha256": digest}
    return registry.get(v)
