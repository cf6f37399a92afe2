"""``cl-release serve``: the gateway between a team's services and its model versions.

It collects answers and feedback (``/log``, ``/feedback``, ``/route``, ``/stats``, ``/health``)
and serves OpenAI-compatible chat completions from the champion and the challenger, capturing
every answer in the feedback store (``/v1/chat/completions``, ``/v1/models``). Built on FastAPI
and uvicorn; the OpenAPI document is generated at ``GET /openapi.json``.

- :mod:`.app`: the FastAPI app, the :class:`~.app.Gateway` state and the collector endpoints;
- :mod:`.chat`: ``/v1/chat/completions``, every answer captured (streams too);
- :mod:`.responses`: JSON and error answers outside the models, the server's log lines;
- :mod:`.models`: the pydantic request and response models;
- :mod:`.writer`: group commit of the store writes (a 2xx means committed);
- :mod:`.backends`: ``local`` (PEFT multi-adapter, dynamic batching) and ``openai`` (vLLM & co.);
- :mod:`.upstream`: the lean keep-alive HTTP client the ``openai`` backend uses;
- :mod:`.vllm`: the ``vllm serve`` command line and runtime adapter loading;
- :mod:`.server`: binding, uvicorn, ``--workers``.

This package imports FastAPI lazily: ``cl_release.decide.abtest`` imports :mod:`.vllm` on every move.
"""

from __future__ import annotations

from typing import Any

from .config import DEFAULTS, serve_config

__all__ = ["DEFAULTS", "serve_config", "make_server", "load_spec", "openapi_spec"]


def make_server(project, **kwargs: Any):
    """See :func:`cl_release.serve.server.make_server`."""
    from .server import make_server as _make

    return _make(project, **kwargs)


def load_spec() -> dict[str, Any]:
    """The gateway's OpenAPI document, generated from its routes and models."""
    from .app import create_app

    return create_app(None).openapi()  # the routes need no gateway until a request comes


def openapi_spec() -> bytes:
    """:func:`load_spec` as JSON (sorted keys, indented)."""
    import orjson

    return orjson.dumps(load_spec(), option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS)
