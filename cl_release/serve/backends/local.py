"""The ``local`` backend: the base model in this process, every served version's adapter on it.

The base model is loaded once (per distinct base: versions trained on another version's merged
weights have their own), with the evaluation runner's code (:func:`cl_release.eval.runner.load_base_model`),
and each served version's LoRA adapter is added to it as a named PEFT adapter (``v1_2_0``). A
version that starts serving later (``ab start``) is added when its first request comes; one that
stopped serving is dropped then. Prompts go through the version's own chat template
(:func:`cl_release.eval.runner.render_messages`), as in its gate evaluation.

Dynamic batching: requests queue; one generation thread takes the oldest request's batch key
(the version and the sampling settings), waits up to ``batch_wait_ms`` for more, and generates
for up to ``max_batch`` rows of that key in one ``generate`` call (left-padded, one adapter
selected). Each row stops on its own: at a stop token, at one of its ``stop`` strings, at its
``max_tokens``, or when its client went away; the batch ends when every row has. Tokens stream
to their requests as they are made. Without ``temperature`` (or at 0) decoding is greedy, as in
the gate evaluation; otherwise it samples (``seed``: reproducible for the same batch).

``threads`` (``serve.torch_threads``): torch's threads. A small model on a few busy cores runs
far faster on one (on 2 shared cores here the tiny model made 13x more tokens a second with one
thread than with torch's default of one per core); a large one wants them all.

torch, transformers and peft are imported in the generation thread only.
"""

from __future__ import annotations

import asyncio
import sys
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any, AsyncIterator, Callable

from ...errors import ClReleaseError, UserError
from ..config import lora_name
from . import Backend
from . import Generation
from . import Stream

HONOURED = frozenset({"model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "n",
                      "stream", "stream_options", "stop", "seed", "user"})
# Fields a client may send with a neutral value (the OpenAI client's defaults); anything else is refused.
NEUTRAL = {"frequency_penalty": 0, "presence_penalty": 0, "logprobs": False, "logit_bias": None,
           "parallel_tool_calls": None, "tool_choice": "none", "tools": None, "response_format": None,
           "store": False, "metadata": None, "service_tier": None}


class LocalBackend(Backend):
    name = "local"

    def __init__(self, root: Path, *, served: Callable[[], dict[str, dict]], device: str = "auto",
                 max_batch: int = 8, batch_wait_ms: float = 2.0, threads: int | None = None):
        self.root = Path(root)
        self.served = served
        self.device = device
        self.threads = threads  # torch's intra-op threads (None: torch's default, one per core)
        self.max_batch = max(1, int(max_batch))
        self.batch_wait = max(0.0, float(batch_wait_ms)) / 1000
        self._cond = threading.Condition()
        self._pending: deque[_Job] = deque()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._models: dict[tuple, Any] = {}  # (base, revision) -> PeftModel (or plain model)
        self._adapters: dict[str, tuple] = {}  # version -> (base key, adapter name or None)
        self._tokenizers: dict[str, Any] = {}  # version -> tokenizer
        self._stop_ids: dict[tuple, list[int]] = {}
        self.batches: list[int] = []  # rows per generate call (for tests and the benchmark)

    # -- interface

    def check(self, body_extra: dict[str, Any]) -> str | None:
        for k, v in body_extra.items():
            if k in HONOURED:
                continue
            if k in NEUTRAL and v == NEUTRAL[k]:
                continue
            return k
        return None

    async def start(self) -> None:
        self._ensure_thread()

    def _ensure_thread(self) -> None:
        if self._thread is None:
            self._stopping = False
            self._thread = threading.Thread(target=self._run, name="cl-release-generate", daemon=True)
            self._thread.start()

    async def close(self) -> None:
        thread = self._thread
        if thread is None:
            return
        with self._cond:
            self._stopping = True
            for job in self._pending:
                job.cancelled = True
            self._cond.notify_all()
        await asyncio.get_running_loop().run_in_executor(None, thread.join)
        self._thread = None

    def warm(self, versions: list[str] | None = None) -> list[str]:
        """Load the base model(s) and the adapters of ``versions`` (default: those that serve) now,
        in the calling thread, before the server takes requests; returns the versions loaded."""
        entries = self.served()
        versions = list(entries) if versions is None else versions
        for v in versions:
            self._ensure(v, entries)
        return versions

    async def complete(self, gen: Generation) -> dict[str, Any]:
        job = self._submit(gen, asyncio.get_running_loop())
        try:
            async for _ in _JobStream(job):
                pass
        except BaseException:
            job.cancelled = True
            raise
        choices = [{"index": i, "message": {"role": "assistant", "content": "".join(job.text[i])},
                    "finish_reason": job.finish[i], "logprobs": None} for i in range(gen.n)]
        return {"choices": choices, "usage": job.usage()}

    async def stream(self, gen: Generation) -> Stream:
        return _JobStream(self._submit(gen, asyncio.get_running_loop()), chunks=True)

    # -- queueing (event loop side)

    def _submit(self, gen: Generation, loop: asyncio.AbstractEventLoop) -> "_Job":
        self._ensure_thread()
        job = _Job(gen, loop)
        with self._cond:
            if self._stopping:
                raise ClReleaseError("the server is shutting down")
            self._pending.append(job)
            self._cond.notify_all()
        return job

    # -- the generation thread

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._pending and not self._stopping:
                    self._cond.wait()
                if self._stopping:
                    for job in self._pending:
                        job.fail(ClReleaseError("the server is shutting down"))
                    self._pending.clear()
                    return
                first = self._pending[0]
                key = first.key
                if self.batch_wait:  # give concurrent requests a moment to join this batch
                    deadline = first.arrived + self.batch_wait
                    while (not self._stopping and sum(j.gen.n for j in self._pending if j.key == key) < self.max_batch
                           and time.monotonic() < deadline):
                        self._cond.wait(max(0.0, deadline - time.monotonic()))
                batch, rows, keep = [], 0, deque()
                for job in self._pending:
                    if job.cancelled:
                        job.drop()
                        continue
                    if job.key == key and (not batch or rows + job.gen.n <= self.max_batch):
                        batch.append(job)
                        rows += job.gen.n
                    else:
                        keep.append(job)
                self._pending = keep
            if not batch:
                continue
            try:
                self._generate(batch)
            except ClReleaseError as e:
                for job in batch:
                    job.fail(e)
            except Exception as e:  # noqa: BLE001  (a bug or a torch error: these requests fail, the server goes on)
                sys.stderr.write(f"cl-release serve: local generation failed: {type(e).__name__}: {e}\n")
                for job in batch:
                    job.fail(ClReleaseError(f"generation failed: {type(e).__name__}: {e}"))

    def _ensure(self, version: str, entries: dict[str, dict] | None = None) -> tuple[Any, Any, Any]:
        """(model with the version's adapter active, tokenizer, stop ids), loading what is missing."""
        from ...eval import runner as ev

        if self.threads:
            import torch

            if torch.get_num_threads() != self.threads:
                torch.set_num_threads(self.threads)
        if version not in self._adapters:
            entries = self.served() if entries is None else entries
            entry = entries.get(version)
            if entry is None:
                raise UserError(f"version {version} is not served")
            base, adapter, revision = ev.entry_model_paths(entry)
            ev.check_adapter(self.root, entry, adapter)
            mkey = (base, revision)
            settings = ev.EvalSettings(device=self.device)
            model = self._models.get(mkey)
            name = _adapter_name(version) if adapter else None
            tok_dir = ev.adapter_tokenizer_dir(self.root, adapter) if adapter else None
            tokenizer = ev.load_tokenizer(self.root, base, tok_dir, revision=revision)
            if model is None:
                model = ev.load_base_model(self.root, base, settings, revision=revision)
                if adapter:
                    from peft import PeftModel

                    model = PeftModel.from_pretrained(model, str(self.root / adapter), adapter_name=name)
                    model.eval()
            elif adapter:
                if not hasattr(model, "load_adapter"):
                    raise ClReleaseError(f"cannot add the adapter of {version} to a model loaded without one")
                model.load_adapter(str(self.root / adapter), adapter_name=name)
                model.eval()
            self._models[mkey] = model
            self._adapters[version] = (mkey, name)
            self._tokenizers[version] = tokenizer
            self._stop_ids[(mkey, version)] = ev.stop_token_ids(model, tokenizer)
            self._drop_unserved(entries)
        mkey, name = self._adapters[version]
        model = self._models[mkey]
        if name is not None:
            model.set_adapter(name)
        return model, self._tokenizers[version], self._stop_ids[(mkey, version)]

    def _drop_unserved(self, entries: dict[str, dict]) -> None:
        for v in [v for v in self._adapters if v not in entries]:
            mkey, name = self._adapters.pop(v)
            self._tokenizers.pop(v, None)
            self._stop_ids.pop((mkey, v), None)
            model = self._models.get(mkey)
            if name is not None and model is not None and len(getattr(model, "peft_config", {})) > 1:
                model.delete_adapter(name)

    def _generate(self, batch: list["_Job"]) -> None:
        import torch
        from transformers import GenerationConfig, StoppingCriteria

        from ...eval import runner as ev

        gen0 = batch[0].gen
        model, tokenizer, stop_ids = self._ensure(gen0.version)
        rows: list[_Row] = []
        prompts: list[str] = []
        for job in batch:
            prompt = ev.render_messages(tokenizer, job.gen.messages)
            for i in range(job.gen.n):
                rows.append(_Row(job, i))
                prompts.append(prompt)
        enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
        device = next(model.parameters()).device
        enc = {k: v.to(device) for k, v in enc.items()}
        prompt_lens = enc["attention_mask"].sum(dim=1).tolist()
        for row, n in zip(rows, prompt_lens):
            row.job.prompt_tokens = int(n)
        sample = bool(gen0.temperature)
        cfg = GenerationConfig(
            max_new_tokens=max(j.gen.max_tokens for j in batch),
            do_sample=sample,
            temperature=gen0.temperature if sample else None,
            top_p=gen0.top_p if sample else None,
            top_k=0 if sample else None,
            eos_token_id=stop_ids,
            pad_token_id=tokenizer.pad_token_id,
        )
        streamer = _BatchStreamer(rows, tokenizer, set(stop_ids))

        class _RowsDone(StoppingCriteria):
            def __call__(self, input_ids, scores, **kwargs):
                return torch.tensor(streamer.done, dtype=torch.bool, device=input_ids.device)

        self.batches.append(len(rows))
        with torch.inference_mode():
            if sample and gen0.seed is not None:
                torch.manual_seed(gen0.seed)
            model.generate(**enc, generation_config=cfg, stopping_criteria=[_RowsDone()], streamer=streamer)
        streamer.finish()


def _adapter_name(version: str) -> str:
    """The version's PEFT adapter name (PEFT refuses dots: ``v1_2_0``)."""
    return lora_name(version).replace(".", "_")


class _Job:
    """One request: its rows' text so far, their finish reasons, and the queue its reader awaits."""

    def __init__(self, gen: Generation, loop: asyncio.AbstractEventLoop):
        self.gen = gen
        self.loop = loop
        self.key = (gen.version, bool(gen.temperature), gen.temperature or None, gen.top_p if gen.temperature else None,
                    gen.seed if gen.temperature else None)
        self.arrived = time.monotonic()
        self.cancelled = False
        self.text: list[list[str]] = [[] for _ in range(gen.n)]
        self.finish: list[str | None] = [None] * gen.n
        self.tokens = [0] * gen.n
        self.prompt_tokens = 0
        self.open_rows = gen.n
        self.events: asyncio.Queue = asyncio.Queue()

    def usage(self) -> dict[str, int]:
        completion = sum(self.tokens)
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": completion,
                "total_tokens": self.prompt_tokens + completion}

    def push(self, events: list) -> None:  # from the generation thread
        try:
            self.loop.call_soon_threadsafe(_put_all, self.events, events)
        except RuntimeError:  # the loop is gone
            self.cancelled = True

    def fail(self, error: BaseException) -> None:
        self.push([("error", error)])

    def drop(self) -> None:
        """Cancelled before it was generated."""
        self.push([("end", None)])


def _put_all(q: asyncio.Queue, events: list) -> None:
    for e in events:
        q.put_nowait(e)


class _Row:
    def __init__(self, job: _Job, index: int):
        self.job = job
        self.index = index
        self.ids: list[int] = []
        self.sent = 0  # characters of the decoded text already sent
        self.done = False


class _BatchStreamer:
    """Receives each step's tokens (one per row) from ``generate``; decides when each row is
    done and sends the new text of every row to its request."""

    def __init__(self, rows: list[_Row], tokenizer, stop_ids: set[int]):
        self.rows = rows
        self.tokenizer = tokenizer
        self.stop_ids = stop_ids
        self.done = [False] * len(rows)
        self._prompt_seen = False

    def put(self, value) -> None:
        if not self._prompt_seen:  # the first call passes the prompts
            self._prompt_seen = True
            return
        tokens = value.tolist()
        out: dict[_Job, list] = {}
        for r, (row, t) in enumerate(zip(self.rows, tokens)):
            if row.done:
                continue
            job = row.job
            if job.cancelled:
                self._end(r, None, out)
                continue
            job.tokens[row.index] += 1
            if t in self.stop_ids:
                self._flush(row, out, final=True)
                self._end(r, "stop", out)
                continue
            row.ids.append(t)
            reason = self._flush(row, out, final=False)
            if reason is None and len(row.ids) >= job.gen.max_tokens:
                self._flush(row, out, final=True)
                reason = "length"
            if reason is not None:
                self._end(r, reason, out)
        for job, events in out.items():
            job.push(events)

    def _flush(self, row: _Row, out: dict, *, final: bool) -> str | None:
        """Send the row's new text; a stop string ends the row ("stop"). Text that may be the
        start of a stop string, or an unfinished UTF-8 character, waits for the next token."""
        text = self.tokenizer.decode(row.ids, skip_special_tokens=True)
        stops = row.job.gen.stop
        reason = None
        limit = len(text)
        for s in stops:
            at = text.find(s, max(0, row.sent - len(s) + 1))
            if at != -1 and at < limit:
                limit, reason = at, "stop"
        if reason is None and not final:
            if text.endswith("\ufffd"):
                limit = len(text) - 1
            for s in stops:  # hold back a tail that could begin a stop string
                for k in range(min(len(s) - 1, len(text)), 0, -1):
                    if text.endswith(s[:k]):
                        limit = min(limit, len(text) - k)
                        break
        if limit > row.sent:
            piece = text[row.sent:limit]
            row.sent = limit
            row.job.text[row.index].append(piece)
            out.setdefault(row.job, []).append(("delta", (row.index, piece)))
        return reason

    def _end(self, r: int, reason: str | None, out: dict) -> None:
        row = self.rows[r]
        row.done = True
        self.done[r] = True
        row.job.finish[row.index] = reason
        if reason is not None:
            out.setdefault(row.job, []).append(("finish", (row.index, reason)))
        row.job.open_rows -= 1
        if row.job.open_rows == 0:
            out.setdefault(row.job, []).append(("end", None))

    def end(self) -> None:  # generate() is over
        pass

    def finish(self) -> None:
        """Rows still open when generate() returned (max_new_tokens of the batch) end at length."""
        out: dict[_Job, list] = {}
        for r, row in enumerate(self.rows):
            if not row.done:
                self._flush(row, out, final=True)
                self._end(r, "length" if not row.job.cancelled else None, out)
        for job, events in out.items():
            job.push(events)


class _JobStream(Stream):
    """A request's events as OpenAI chunk dicts (``chunks=True``), or just consumed (``complete``)."""

    def __init__(self, job: _Job, *, chunks: bool = False):
        self.job = job
        self.chunks = chunks

    def cancel(self) -> None:
        self.job.cancelled = True

    async def __aiter__(self) -> AsyncIterator[dict[str, Any]]:
        job = self.job
        if self.chunks:
            yield {"choices": [{"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": None,
                                "logprobs": None} for i in range(job.gen.n)]}
        while True:
            kind, value = await job.events.get()
            if kind == "error":
                raise value
            if kind == "end":
                break
            if not self.chunks:
                continue
            if kind == "delta":
                i, text = value
                yield {"choices": [{"index": i, "delta": {"content": text}, "finish_reason": None, "logprobs": None}]}
            elif kind == "finish":
                i, reason = value
                yield {"choices": [{"index": i, "delta": {}, "finish_reason": reason, "logprobs": None}]}
        if self.chunks:
            yield {"choices": [], "usage": job.usage()}
