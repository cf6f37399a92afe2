"""The ``serve:`` section of cl-release.yaml: defaults, and the values a gateway runs with."""

from __future__ import annotations

from typing import Any

DEFAULTS: dict[str, Any] = {
    "host": "127.0.0.1",
    "port": 8765,
    "token_env": "CL_RELEASE_TOKEN",
    "max_body_bytes": 65536,
    # what answers /v1/chat/completions: "local" (transformers + PEFT in this process) or
    # "openai" (any OpenAI-compatible server: vLLM with --enable-lora, SGLang, LoRAX)
    "backend": "local",
    "upstream_url": None,  # openai: the upstream's base URL, with /v1 (http://127.0.0.1:8000/v1)
    "upstream_api_key_env": None,  # openai: environment variable holding the upstream's API key
    "upstream_timeout_s": 60.0,
    "upstream_admin": False,  # ab start/promote/stop/rollback load and unload LoRA adapters upstream
    "upstream_repo_path": None,  # this repository's path as the upstream sees it (default: here)
    "max_tokens": 1024,  # the most max_tokens a request may ask for
    "default_max_tokens": 256,  # when a request names none
    "max_n": 1,  # the most choices per request
    "max_batch": 8,  # local: requests generated together (one adapter per batch)
    "batch_wait_ms": 2.0,  # local: how long a batch waits for more requests once one arrived
    "device": "auto",  # local: auto | cpu | cuda
    "torch_threads": None,  # local: torch's threads (None: torch's default, one per core)
    "synchronous": "full",  # SQLite synchronous of the log writer: full (fsync per group commit) | normal
    "registry_recheck_s": 0.25,  # how often the gateway looks for an A/B move in the registry
}
BACKENDS = ("local", "openai", "none")
# The name each served version has upstream (vLLM's --lora-modules NAME=PATH).
LORA_PREFIX = "v"


def serve_config(project) -> dict[str, Any]:
    """The defaults overlaid with the project's ``serve:`` section (checked by the project schema)."""
    return {**DEFAULTS, **((project.data.get("serve") if project is not None else None) or {})}


def lora_name(version: str) -> str:
    """The name of a version's LoRA module on the upstream: ``v1.2.0``."""
    return f"{LORA_PREFIX}{version}"
