"""Where the packaged defaults live: templates and the registry schema.

In a wheel they are under ``cl_release/_defaults``; in a source checkout (editable install)
they are the repository's own top-level ``templates/`` and ``registry/`` folders.
"""

from __future__ import annotations

from pathlib import Path

_PKG = Path(__file__).resolve().parent


def defaults_dir() -> Path:
    packaged = _PKG / "_defaults"
    if (packaged / "templates").is_dir():
        return packaged
    return _PKG.parent


def default_templates_dir() -> Path:
    return defaults_dir() / "templates"


def default_registry_schema() -> Path:
    return defaults_dir() / "registry" / "schema.json"
