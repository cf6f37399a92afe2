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

from typing import Any, AsyncIterator

import orjson

from ...errors import UpstreamError, UpstreamTimeout
from ..config import lora_name
from ..upstream import Answer, Pool
from . import Backend
from . import Generation
from . import Stream

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

    def __init__(self, base_url: str, *, api_key: str | None = None, timeout: float = 60.0):
        self.base_url = base_url.rstrip("/")
        self.api_key = api_key
        self.timeout = timeout
        self.pool: Pool | None = None

    async def start(self) -> None:
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        self.pool = Pool(self.base_url, headers=headers, timeout=self.timeout)

    async def close(self) -> None:
        if self.pool is not None:
            await self.pool.close()
            self.pool = None

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

    async def _post(self, gen: Generation, stream: bool) -> Answer:
        try:
            answer = await self.pool.post("/chat/completions", self._body(gen, stream),
                                          accept="text/event-stream" if stream else "application/json")
        except TimeoutError:
            raise UpstreamTimeout(f"the model server did not answer in {self.timeout:g} s ({self._where()})") from None
        except OSError as e:
            raise UpstreamError(f"the model server is unreachable ({self._where()}): {type(e).__name__}: {e}") from None
        if answer.status != 200:
            try:
                payload = await answer.read()
            except (OSError, TimeoutError):
                payload = b""
            raise _status_error(answer.status, payload, gen.version)
        return answer

    async def complete(self, gen: Generation) -> dict[str, Any]:
        answer = await self._post(gen, False)
        try:
            payload = await answer.read()
        except TimeoutError:
            raise UpstreamTimeout(f"the model server did not finish its answer in {self.timeout:g} s") from None
        except OSError as e:
            raise UpstreamError(f"the model server cut its answer off: {e}") from None
        try:
            out = orjson.loads(payload)
            if not isinstance(out, dict) or not isinstance(out.get("choices"), list):
                raise ValueError("no choices")
            for c in out["choices"]:
                if not isinstance(c.get("message"), dict):
                    raise ValueError("a choice has no message")
        except (orjson.JSONDecodeError, ValueError, AttributeError) as e:
            raise UpstreamError(f"the model server sent an answer that is not a chat completion: {e}") from None
        return out

    async def stream(self, gen: Generation) -> Stream:
        return _UpstreamStream(await self._post(gen, True), self.timeout)


class _UpstreamStream(Stream):
    def __init__(self, answer: Answer, timeout: float):
        self.answer = answer
        self.timeout = timeout

    def cancel(self) -> None:
        self.answer.close()

    async def __aiter__(self) -> AsyncIterator[dict[str, Any]]:
        finished = done = False
        try:
            async for line in self.answer.lines():  # read to the end: the connection is reused
                if done or not line.startswith(b"data:"):
                    continue  # comments, event names, blank separators
                data = line[5:].strip()
                if data == b"[DONE]":
                    done = finished = True
                    continue
                try:
                    chunk = orjson.loads(data)
                except orjson.JSONDecodeError:
                    raise UpstreamError(f"the model server sent a stream event that is not JSON: {data[:100]!r}") from None
                if not isinstance(chunk, dict):
                    raise UpstreamError("the model server sent a stream event that is not a JSON object")
                if "error" in chunk:
                    raise UpstreamError(f"the model server failed mid-stream: {upstream_message(data)}")
                finished = finished or any(isinstance(c, dict) and c.get("finish_reason")
                                           for c in chunk.get("choices") or ())
                yield chunk
            if not finished:  # no [DONE] and no finish_reason: cut off
                raise UpstreamError("the model server ended the stream before the answer was finished")
        except TimeoutError:
            raise UpstreamTimeout(f"the model server stopped sending for {self.timeout:g} s") from None
        except OSError as e:
            raise UpstreamError(f"the model server cut the stream off: {type(e).__name__}: {e}") from None
        finally:
            if not self.answer.closed:
                self.answer.close()
