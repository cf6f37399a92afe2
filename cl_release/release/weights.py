"""Hashes of model folders: adapters, merged weights, local base models."""

from __future__ import annotations

import hashlib
from pathlib import Path

from ..files import sha256_file

ADAPTER_FILE = "adapter_model.safetensors"


def weights_sha256(model_dir: Path) -> str | None:
    """SHA-256 of a model's weights: the file's hash for one safetensors file; for shards,
    the hash of the sorted "name hash" lines. None when there are no safetensors files."""
    return weights_digest([(f.name, sha256_file(f)) for f in Path(model_dir).glob("*.safetensors")])


def weights_digest(files: list[tuple[str, str]]) -> str | None:
    """:func:`weights_sha256` from the (file name, sha256) of a model's safetensors files, for
    a caller that hashed them already (``hub`` plans a push from the files' hashes)."""
    if not files:
        return None
    if len(files) == 1:
        return files[0][1]
    lines = "".join(f"{name} {sha}\n" for name, sha in sorted(files))
    return hashlib.sha256(lines.encode()).hexdigest()


def adapter_sha256(adapter_dir: Path) -> str:
    return sha256_file(Path(adapter_dir) / ADAPTER_FILE)
