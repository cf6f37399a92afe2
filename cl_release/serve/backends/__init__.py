"""What answers ``/v1/chat/completions``: a backend turns one request for one version into an
OpenAI-shaped answer (``complete``) or a stream of OpenAI-shaped chunks (``stream``).

- ``local`` (:mod:`.local`): the base model loaded once in this process, every served version's
  LoRA adapter on it (PEFT), concurrent requests batched by adapter;
- ``openai`` (:mod:`.openai`): any OpenAI-compatible server (vLLM with ``--enable-lora``, one
  LoRA module per version named ``v1.2.0``; SGLang; LoRAX);
- ``none``: no model; only the collector endpoints answer.

The gateway fills in ``id``, ``object``, ``created`` and ``model`` of what a backend returns.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, AsyncIterator


@dataclass
class Generation:
    """One request to a backend, checked and resolved to a version by the gateway."""

    request_id: str
    version: str
    messages: list[dict[str, str]]  # role and text content
    max_tokens: int
    n: int = 1
    temperature: float | None = None  # None: greedy on the local backend, the upstream's default otherwise
    top_p: float | None = None
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    body: dict[str, Any] = field(default_factory=dict)  # the request as sent (an upstream gets it)


class Stream:
    """An open stream of chunk dicts (``{"choices": [{"index", "delta", "finish_reason"}],
    "usage": ...}``); ``cancel()`` stops it (the client went away), without waiting."""

    def __aiter__(self) -> AsyncIterator[dict[str, Any]]:
        raise NotImplementedError

    def cancel(self) -> None:
        raise NotImplementedError


class Backend:
    """The interface; see :mod:`.local` and :mod:`.openai`."""

    name = "none"

    def check(self, body_extra: dict[str, Any]) -> str | None:
        """The name of a request field this backend cannot honour (None: all fine)."""
        return None

    async def start(self) -> None:
        """Get ready to answer (the gateway's start-up)."""

    async def close(self) -> None:
        """Release what ``start`` took."""

    async def complete(self, gen: Generation) -> dict[str, Any]:
        """``{"choices": [{"index", "message": {"role", "content"}, "finish_reason"}], "usage":
        {"prompt_tokens", "completion_tokens", "total_tokens"}}`` (more fields pass through)."""
        raise NotImplementedError

    async def stream(self, gen: Generation) -> Stream:
        """Start generating; raises before the first chunk when the request cannot be served."""
        raise NotImplementedError


def make_backend(kind: str, project, conf: dict[str, Any], *, served) -> Backend | None:
    """The backend ``kind`` for ``project`` with the ``serve:`` settings ``conf``. ``served()``
    gives the versions that serve now (for the local backend's adapters)."""
    if kind == "none":
        return None
    if kind == "local":
        from .local import LocalBackend

        return LocalBackend(project.root, served=served, device=conf["device"], max_batch=conf["max_batch"],
                            batch_wait_ms=conf["batch_wait_ms"], threads=conf.get("torch_threads"))
    if kind == "openai":
        import os

        from ...errors import UserError
        from .openai import OpenAIBackend

        url = conf.get("upstream_url")
        if not url:
            raise UserError("the openai backend needs the upstream's URL",
                            hint="set serve.upstream_url (e.g. http://127.0.0.1:8000/v1) or pass --upstream-url")
        key_env = conf.get("upstream_api_key_env")
        key = os.environ.get(key_env) if key_env else None
        return OpenAIBackend(url, api_key=key, timeout=float(conf["upstream_timeout_s"]))
    from ...errors import UserError

    raise UserError(f"unknown backend {kind!r}", hint="use local, openai or none")
