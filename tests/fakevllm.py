"""A fake vLLM server on loopback: the part of vLLM's OpenAI-compatible API the gateway uses.

- ``GET /v1/models``: the base model and every loaded LoRA module (``parent``: the base);
- ``POST /v1/chat/completions``: for the base or a loaded LoRA module (404 otherwise, as vLLM),
  a deterministic answer ``"<model> says: <last user message>"`` cut to ``max_tokens`` words,
  one word a token; streamed as SSE chunks when asked, with a usage chunk for
  ``stream_options.include_usage``;
- ``POST /v1/load_lora_adapter`` / ``/v1/unload_lora_adapter``: vLLM's runtime LoRA updating
  (400 for a name already loaded, 404 for unloading one that is not; ``admin_fail``: 500);
- ``POST /fake/mode {"mode": ...}``: what the next chat requests meet: ``ok``, ``error`` (a 500),
  ``slow`` (an answer after ``delay`` s), ``cut`` (a stream cut off after two chunks, or a
  connection closed without an answer), ``refuse`` (a 400 as for a prompt too long);
- ``GET /fake/requests``: the chat request bodies received, in order.

``python tests/fakevllm.py [--port 0] [--base NAME] [--lora NAME=PATH ...]`` serves it and
prints its URL on the first line of stderr (the benchmark uses it as the upstream).
"""

from __future__ import annotations

import asyncio
import sys
import threading
import time
from typing import Any

import orjson
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route


class FakeVLLM:
    def __init__(self, base: str = "base-model", loras: dict[str, str] | None = None, *, record: bool = True):
        self.base = base
        self.loras: dict[str, str] = dict(loras or {})
        self.mode = "ok"
        self.delay = 0.0
        self.requests: list[dict[str, Any]] = []
        self.admin_calls: list[tuple[str, dict]] = []
        self.admin_fail = False  # load and unload answer 500
        self.record = record
        self.app = Starlette(routes=[
            Route("/v1/models", self.models, methods=["GET"]),
            Route("/v1/chat/completions", self.chat, methods=["POST"]),
            Route("/v1/load_lora_adapter", self.load, methods=["POST"]),
            Route("/v1/unload_lora_adapter", self.unload, methods=["POST"]),
            Route("/fake/mode", self.set_mode, methods=["POST"]),
            Route("/fake/requests", self.seen, methods=["GET"]),
        ])

    @staticmethod
    def _json(obj: Any, status: int = 200) -> Response:
        return Response(orjson.dumps(obj), status_code=status, media_type="application/json")

    @staticmethod
    def _error(message: str, status: int) -> Response:
        return FakeVLLM._json({"error": {"message": message, "type": "BadRequestError" if status == 400 else
                                          "NotFoundError" if status == 404 else "InternalServerError",
                                          "param": None, "code": status}}, status)

    async def models(self, request: Request) -> Response:
        data = [{"id": self.base, "object": "model", "created": 0, "owned_by": "vllm", "root": self.base, "parent": None}]
        data += [{"id": n, "object": "model", "created": 0, "owned_by": "vllm", "root": p, "parent": self.base}
                 for n, p in self.loras.items()]
        return self._json({"object": "list", "data": data})

    async def load(self, request: Request) -> Response:
        body = orjson.loads(await request.body())
        self.admin_calls.append(("load", body))
        if self.admin_fail:
            return self._error("adapter slots busy (fake)", 500)
        name, path = body.get("lora_name"), body.get("lora_path")
        if not name or not path:
            return self._error("lora_name and lora_path are required", 400)
        if name in self.loras:
            return self._error(f"The lora adapter '{name}' has already been loaded.", 400)
        self.loras[name] = path
        return Response(f"Success: LoRA adapter '{name}' added successfully.", media_type="text/plain")

    async def unload(self, request: Request) -> Response:
        body = orjson.loads(await request.body())
        self.admin_calls.append(("unload", body))
        if self.admin_fail:
            return self._error("adapter slots busy (fake)", 500)
        name = body.get("lora_name")
        if name not in self.loras:
            return self._error(f"The lora adapter '{name}' cannot be found.", 404)
        del self.loras[name]
        return Response(f"Success: LoRA adapter '{name}' removed successfully.", media_type="text/plain")

    async def set_mode(self, request: Request) -> Response:
        body = orjson.loads(await request.body())
        self.mode = body["mode"]
        self.delay = float(body.get("delay", 0))
        return self._json({"mode": self.mode})

    async def seen(self, request: Request) -> Response:
        return self._json(self.requests)

    def answer(self, body: dict) -> list[str]:
        last = next((m.get("content") or "" for m in reversed(body.get("messages") or []) if m.get("role") == "user"), "")
        words = f"{body['model']} says: {last}".split()
        return words[: int(body.get("max_tokens") or 16)]

    async def chat(self, request: Request):
        body = orjson.loads(await request.body())
        if self.record:
            self.requests.append(body)
        model = body.get("model")
        if model != self.base and model not in self.loras:
            return self._error(f"The model `{model}` does not exist.", 404)
        if self.mode == "error":
            return self._error("CUDA out of memory (fake)", 500)
        if self.mode == "refuse":
            return self._error("This model's maximum context length is 2048 tokens (fake)", 400)
        if self.mode == "slow":
            await asyncio.sleep(self.delay)
        words = self.answer(body)
        prompt = sum(len((m.get("content") or "").split()) for m in body.get("messages") or [])
        usage = {"prompt_tokens": prompt, "completion_tokens": len(words), "total_tokens": prompt + len(words)}
        finish = "length" if len(words) >= int(body.get("max_tokens") or 16) else "stop"
        base = {"id": "cmpl-fake", "created": int(time.time()), "model": model}
        if not body.get("stream"):
            if self.mode == "cut":  # the head, a piece of the body, then the connection drops
                async def piece():
                    yield b'{"id": "cmpl-fake", '
                    raise ConnectionResetError("fake: connection dropped")

                return StreamingResponse(piece(), media_type="application/json", headers={"content-length": "1000"})
            return self._json({**base, "object": "chat.completion", "choices": [
                {"index": 0, "message": {"role": "assistant", "content": " ".join(words)}, "finish_reason": finish,
                 "logprobs": None}], "usage": usage})
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        mode = self.mode

        async def events():
            chunk = {**base, "object": "chat.completion.chunk"}
            yield b"data: " + orjson.dumps({**chunk, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                                                    "finish_reason": None}]}) + b"\n\n"
            for i, w in enumerate(words):
                if mode == "cut" and i == 2:
                    raise ConnectionResetError("fake: stream cut off")
                if mode == "slow":
                    await asyncio.sleep(self.delay / max(1, len(words)))
                piece = w if i == 0 else " " + w
                yield b"data: " + orjson.dumps({**chunk, "choices": [{"index": 0, "delta": {"content": piece},
                                                                        "finish_reason": None}]}) + b"\n\n"
            yield b"data: " + orjson.dumps({**chunk, "choices": [{"index": 0, "delta": {}, "finish_reason": finish}]}) + b"\n\n"
            if include_usage:
                yield b"data: " + orjson.dumps({**chunk, "choices": [], "usage": usage}) + b"\n\n"
            yield b"data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")


class Served:
    """A FakeVLLM served by uvicorn in a thread on 127.0.0.1 (port 0: a free one)."""

    def __init__(self, fake: FakeVLLM, port: int = 0):
        import socket

        import uvicorn

        self.fake = fake
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", port))
        self.sock.listen(256)
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}/v1"
        self.server = uvicorn.Server(uvicorn.Config(fake.app, log_level="critical", access_log=False, lifespan="off"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> "Served":
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.sock.close()


def main() -> None:
    import argparse
    import socket

    import uvicorn

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--base", default="base-model")
    ap.add_argument("--lora", action="append", default=[], metavar="NAME=PATH")
    ap.add_argument("--no-record", action="store_true", help="do not keep the request bodies (long benchmarks)")
    ap.add_argument("--delay-ms", type=float, default=0.0, help="answer after this long, as a model would")
    args = ap.parse_args()
    fake = FakeVLLM(args.base, dict(x.split("=", 1) for x in args.lora), record=not args.no_record)
    if args.delay_ms:
        fake.mode, fake.delay = "slow", args.delay_ms / 1000
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", args.port))
    sock.listen(512)
    sys.stderr.write(f"fake vLLM listening on http://127.0.0.1:{sock.getsockname()[1]}/v1\n")
    sys.stderr.flush()
    uvicorn.Server(uvicorn.Config(fake.app, log_level="critical", access_log=False, lifespan="off")).run(sockets=[sock])


if __name__ == "__main__":
    main()
