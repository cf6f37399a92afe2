"""Group commit: one writer thread turns the writes of concurrent requests into few transactions.

A request hands its write (``log`` or ``feedback``) to :class:`GroupWriter` and awaits it. The
writer thread takes what has queued up, runs it as one ``BEGIN IMMEDIATE`` transaction
(:meth:`FeedbackStore.write_batch`) and, once ``COMMIT`` has returned, resolves every waiting
request with its own result (a request id, a feedback id, or the error of that write alone). A
reply is sent only after that, so a 2xx always means the row is committed; with
``synchronous=full`` the commit includes an fsync of the write-ahead log, paid once per batch
instead of once per request. While a batch commits, the next one queues: the busier the
server, the larger the batches.

Several server processes (``--workers``) each run their own writer; SQLite's write lock and
``busy_timeout`` order their transactions.
"""

from __future__ import annotations

import asyncio
import queue
import sys
import threading
from typing import Any

from ..errors import ClReleaseError

MAX_BATCH = 512
_STOP = object()


class GroupWriter:
    """The writer thread of one server process over ``store`` (a :class:`FeedbackStore`)."""

    def __init__(self, store, *, synchronous: str = "full", max_batch: int = MAX_BATCH):
        if synchronous not in ("full", "normal"):
            raise ValueError(f"synchronous must be full or normal, got {synchronous!r}")
        self.store = store
        self.synchronous = synchronous
        self.max_batch = max_batch
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._failed: BaseException | None = None
        self.batches = 0  # transactions committed (for tests and the benchmark)
        self.writes = 0  # writes answered

    # -- lifecycle

    def start(self) -> None:
        """Open the writer's connection (the store migrates on first use) and start the thread;
        a store that cannot be opened raises here, not at the first request."""
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._run, name="cl-release-writer", daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._failed is not None:
            self._thread.join()
            self._thread = None
            raise self._failed

    def close(self) -> None:
        """Write what is queued, then stop the thread."""
        if self._thread is None:
            return
        self._queue.put(_STOP)
        self._thread.join()
        self._thread = None

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # -- submitting

    def submit(self, kind: str, fields: dict[str, Any]) -> asyncio.Future:
        """Queue one write from the running event loop; the future resolves after its COMMIT."""
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        if not self.alive:
            fut.set_exception(ClReleaseError("the log writer is not running", hint="restart the server"))
            return fut
        self._queue.put((kind, fields, loop, fut))
        return fut

    async def write(self, kind: str, fields: dict[str, Any]) -> Any:
        """``submit`` and wait: the result of the write, or its error raised."""
        return await self.submit(kind, fields)

    def log(self, fields: dict[str, Any]) -> asyncio.Future:
        return self.submit("log", fields)

    def feedback(self, fields: dict[str, Any]) -> asyncio.Future:
        return self.submit("feedback", fields)

    # -- the thread

    def _run(self) -> None:
        try:
            conn = self.store.conn  # this thread's connection, schema migrated
            conn.execute(f"PRAGMA synchronous = {self.synchronous.upper()}")
        except BaseException as e:  # noqa: BLE001  (reported to start())
            self._failed = e
            self._ready.set()
            return
        self._ready.set()
        stop = False
        try:
            while not stop:
                item = self._queue.get()
                batch = []
                while True:
                    if item is _STOP:
                        stop = True
                    else:
                        batch.append(item)
                    if len(batch) >= self.max_batch:
                        break
                    try:
                        item = self._queue.get_nowait()
                    except queue.Empty:
                        break
                if batch:
                    self._commit(batch)
        finally:
            self.store.close()

    def _commit(self, batch: list[tuple]) -> None:
        try:
            results = self.store.write_batch([(kind, fields) for kind, fields, _, _ in batch])
        except ClReleaseError as e:  # the database failed: every write of the batch failed
            results = [e] * len(batch)
        except Exception as e:  # noqa: BLE001  (a bug: each request answers 500, the writer goes on)
            sys.stderr.write(f"cl-release serve: the log writer failed: {type(e).__name__}: {e}\n")
            results = [e] * len(batch)
        else:
            self.batches += 1
        self.writes += len(batch)
        by_loop: dict[Any, list] = {}
        for (_, _, loop, fut), result in zip(batch, results):
            by_loop.setdefault(loop, []).append((fut, result))
        for loop, pairs in by_loop.items():
            try:
                loop.call_soon_threadsafe(_resolve, pairs)
            except RuntimeError:  # that loop has closed: nobody waits any more
                pass


def _resolve(pairs: list[tuple[asyncio.Future, Any]]) -> None:
    for fut, result in pairs:
        if fut.cancelled():
            continue
        if isinstance(result, BaseException):
            fut.set_exception(result)
        else:
            fut.set_result(result)
