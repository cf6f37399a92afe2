"""The ``openai`` backend: any OpenAI-compatible server answers, one LoRA module per version.

The request goes upstream as the client sent it, with ``model`` set to the version's LoRA module
name (``v1.2.0``: vLLM's ``--lora-modules v1.2.0=PATH``, see :mod:`cl_release.serve.vllm`).
A stream asks the upstream for a usage chunk (``stream_options.include_usage``) so the capture
has token counts; the client gets it only when it asked too.

Failures are :class:`UpstreamError`: unreachable, cut off or a 5xx is a 502, no answer within
``serve.upstream_timeout_s`` a 504, and a 4xx the upstream gave for the request itself (a prompt
over its context length) is passed on with the upstream's message. A 401/403/404 from the
upstream is the deployment's problem (wrong key, adapter not loaded): a 502 that says so.
"""

from __future__ import annotations

import asyncio
from typing import Any, AsyncIterator

import httpx
import orjson

from ...errors import UpstreamError, UpstreamTimeout
from ..config import lora_name
from . import Backend, Generation, Stream

_DEPLOYMENT = {401: "refused the gateway's API key (serve.upstream_api_key_env)",
               403: "refused the gateway's API key (serve.upstream_api_key_env)",
               404: "does not serve this version's LoRA module (load it: serve.upstream_admin, "
                    "or restart it with the line 'cl-release serve vllm-command' prints)"}


def upstream_message(payload: bytes) -> str:
    """The message of an upstream error body (OpenAI shape, FastAPI's ``detail``, or text)."""
    try:
        obj = orjson.loads(payload)
    except orjson.JSONDecodeError:
        return " ".join(payload.decode("utf-8", "replace").split())[:300]
    if isinstance(obj, dict):
        err = obj.get("error", obj)
        if isinstance(err, dict):
            msg = err.get("message") or err.get("detail")
            if msg:
                return " ".join(str(msg).split())[:300]
        elif isinstance(err, str):
            return err[:300]
    return " ".join(payload.decode("utf-8", "replace").split())[:300]


def _status_error(status: int, payload: bytes, version: str) -> UpstreamError:
    msg = upstream_message(payload)
    if status in _DEPLOYMENT:
        return UpstreamError(f"the model server {_DEPLOYMENT[status]}: {lora_name(version)}: {status} {msg}")
    if 400 <= status < 500:
        return UpstreamError(f"the model server refused the request: {msg}", status=status)
    return UpstreamError(f"the model server failed: {status} {msg}")


class OpenAIBackend(Backend):
    name = "openai"

    def __init__(self, base_url: str, *, api_key: str | None = None, timeout: float = 60.0,
                 transport: httpx.AsyncBaseTransport | None = None):
        self.base_url = base_url.rstrip("/")
        self.api_key = api_key
        self.timeout = timeout
        self._transport = transport
        self.client: httpx.AsyncClient | None = None

    async def start(self) -> None:
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        self.client = httpx.AsyncClient(
            base_url=self.base_url, headers=headers, transport=self._transport,
            timeout=httpx.Timeout(self.timeout, connect=min(self.timeout, 10.0)),
            limits=httpx.Limits(max_connections=512, max_keepalive_connections=128),
        )

    async def close(self) -> None:
        if self.client is not None:
            await self.client.aclose()
            self.client = None

    def _body(self, gen: Generation, stream: bool) -> bytes:
        body = dict(gen.body)
        body["model"] = lora_name(gen.version)
        body["max_tokens"] = gen.max_tokens
        body.pop("max_completion_tokens", None)
        if stream:
            body["stream"] = True
            body["stream_options"] = {**(body.get("stream_options") or {}), "include_usage": True}
        else:
            body.pop("stream", None)
            body.pop("stream_options", None)
        return orjson.dumps(body)

    def _where(self) -> str:
        return f"{self.base_url}/chat/completions"

    async def complete(self, gen: Generation) -> dict[str, Any]:
        try:
            r = await self.client.post("/chat/completions", content=self._body(gen, False),
                                       headers={"Content-Type": "application/json"})
        except httpx.TimeoutException:
            raise UpstreamTimeout(f"the model server did not answer in {self.timeout:g} s ({self._where()})") from None
        except httpx.HTTPError as e:
            raise UpstreamError(f"the model server is unreachable ({self._where()}): {type(e).__name__}: {e}") from None
        if r.status_code != 200:
            raise _status_error(r.status_code, r.content, gen.version)
        try:
            out = orjson.loads(r.content)
            if not isinstance(out, dict) or not isinstance(out.get("choices"), list):
                raise ValueError("no choices")
            for c in out["choices"]:
                if not isinstance(c.get("message"), dict):
                    raise ValueError("a choice has no message")
        except (orjson.JSONDecodeError, ValueError, AttributeError) as e:
            raise UpstreamError(f"the model server sent an answer that is not a chat completion: {e}") from None
        return out

    async def stream(self, gen: Generation) -> Stream:
        req = self.client.build_request("POST", "/chat/completions", content=self._body(gen, True),
                                        headers={"Content-Type": "application/json", "Accept": "text/event-stream"})
        try:
            r = await self.client.send(req, stream=True)
        except httpx.TimeoutException:
            raise UpstreamTimeout(f"the model server did not answer in {self.timeout:g} s ({self._where()})") from None
        except httpx.HTTPError as e:
            raise UpstreamError(f"the model server is unreachable ({self._where()}): {type(e).__name__}: {e}") from None
        if r.status_code != 200:
            try:
                payload = await r.aread()
            except httpx.HTTPError:
                payload = b""
            finally:
                await r.aclose()
            raise _status_error(r.status_code, payload, gen.version)
        return _UpstreamStream(r, self.timeout, self._where())


class _UpstreamStream(Stream):
    def __init__(self, response: httpx.Response, timeout: float, where: str):
        self.response = response
        self.timeout = timeout
        self.where = where
        self._closing: asyncio.Task | None = None

    def cancel(self) -> None:
        if self._closing is None and not self.response.is_closed:
            try:
                self._closing = asyncio.get_running_loop().create_task(self.response.aclose())
            except RuntimeError:  # no loop any more: the connection goes with it
                pass

    async def __aiter__(self) -> AsyncIterator[dict[str, Any]]:
        finished = False
        try:
            async for line in self.response.aiter_lines():
                if not line.startswith("data:"):
                    continue  # comments, event names, blank separators
                data = line[5:].strip()
                if data == "[DONE]":
                    return
                try:
                    chunk = orjson.loads(data)
                except orjson.JSONDecodeError:
                    raise UpstreamError(f"the model server sent a stream event that is not JSON: {data[:100]!r}") from None
                if not isinstance(chunk, dict):
                    raise UpstreamError("the model server sent a stream event that is not a JSON object")
                if "error" in chunk:
                    raise UpstreamError(f"the model server failed mid-stream: {upstream_message(orjson.dumps(chunk))}")
                finished = finished or any(isinstance(c, dict) and c.get("finish_reason")
                                           for c in chunk.get("choices") or ())
                yield chunk
            if not finished:  # no [DONE] and no finish_reason: cut off
                raise UpstreamError("the model server ended the stream before the answer was finished")
        except httpx.TimeoutException:
            raise UpstreamTimeout(f"the model server stopped sending for {self.timeout:g} s ({self.where})") from None
        except httpx.HTTPError as e:
            raise UpstreamError(f"the model server cut the stream off: {type(e).__name__}: {e}") from None
        finally:
            await self.response.aclose()
