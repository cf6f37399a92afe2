"""Hashes of model folders: adapters, merged weights, local base models."""

from __future__ import annotations

import hashlib
from pathlib import Path

from ..files import sha256_file

ADAPTER_FILE = "adapter_model.safetensors"


def weights_sha256(model_dir: Path) -> str | None:
    """SHA-256 of a model's weights: the file's hash for one safetensors file; for shards,
    the hash of the sorted "name hash" lines. None when there are no safetensors files."""
    model_dir = Path(model_dir)
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        return None
    if len(files) == 1:
        return sha256_file(files[0])
    lines = "".join(f"{f.name} {sha256_file(f)}\n" for f in files)
    return hashlib.sha256(lines.encode()).hexdigest()


def adapter_sha256(adapter_dir: Path) -> str:
    return sha256_file(Path(adapter_dir) / ADAPTER_FILE)
