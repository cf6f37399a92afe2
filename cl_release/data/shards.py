"""The store build: ``build`` of ``FeedbackStore.rows()`` through SQL, in shards read by forked workers.

SQLite computes the rule's first step for each record (``cl_release.store.classify``) and
settles the records whose verdict needs no text (:data:`SETTLED`, derived from
``rules.verdict``): those are only counted. The others come back as tuples, in output
order, and go through the one row loop (``examples.read_entries``).

A large store is read in n shards, consecutive ranges of created_at (about equal counts;
``StoreRows.created_bounds``): shard 0 by this process, the others by forked workers.
Each does what one process does for its records (classify, redact, fold, dedupe within
the shard), sorts its examples and serialises them (:class:`Shard`), so that the output is
the shards' data one after the other: output order is (created_at, id). What is left
for this process is the dedupe groups that span shards (the newest row stays, as in one
process: ids are unique, so every group has one newest row; each merge is one more
duplicate), found through the keys' hashes, then checked on the keys themselves. A
worker sends its shard as bytes (no pickle). One process goes through the same steps
with one shard. Same bytes either way, and the same as reading the row dicts:
tests/data/test_data_shards.py.

Public seams: ``workers=`` (``build``), :func:`build_workers` (it asks ``parallel.cores``
and ``parallel.can_fork``), :data:`PARALLEL_BUILD_RECORDS`, and :func:`read_shard`, what
each process runs for its shard.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from itertools import chain, compress
from typing import Any, Callable, Generator

from .examples import (CREATED, ID, SOURCE, TIME, BuildResult, Part, jsonl, make_manifest, read_entries, record_lines,
                       sort_key, sorted_ids)
from .rules import (CORRECTED, KEPT, NEGATIVE, NEUTRAL, NO_FEEDBACK, POSITIVE, ExtractionRules, Signal, UnknownSignal,
                    verdict)
from .. import parallel
from ..store import classify as store

try:
    import orjson as _orjson
except ImportError:  # pragma: no cover - orjson is optional (and the store needs it)
    _orjson = None

PARALLEL_BUILD_RECORDS = 100_000  # smaller stores are read by one process
MAX_BUILD_WORKERS = 8

# The records SQL settles: the signals whose verdict, for a row without a correction, is a
# skip reason whatever its answer (derived from the rule: ``verdict`` with no correction and
# either a blank or a non-blank answer), and records without an id. They are only counted.
SETTLED: dict[Signal, str] = {
    sig: verdict(sig, None, None)
    for sig in (NEGATIVE, POSITIVE, NO_FEEDBACK, NEUTRAL)
    if verdict(sig, None, None) == verdict(sig, None, "answer") and verdict(sig, None, None) not in (KEPT, CORRECTED)
}
SETTLED[Signal.NO_ID] = "invalid_row"


def store_build(rows: Any, rules: ExtractionRules, fmt: str, workers: int | None) -> BuildResult | None:
    """``build`` of ``FeedbackStore.rows()`` through SQL (in shards, by forked processes,
    when :func:`build_workers` says so). None: read the dicts instead (not a store's rows,
    or a value SQL cannot classify exactly)."""
    if not store.can_classify(rows, rules.min_rating, rules.max_negative_rating, rules.quality_threshold):
        return None
    shards = build_workers(rows, workers)
    try:
        if shards > 1:
            with _sharded(rows, rules, fmt, shards) as parts:
                if parts is not None:
                    with contextlib.suppress(_WorkerLost):
                        return combine(parts, rules, fmt)
        # one process (or a worker could not finish): read it all here
        return combine([read_shard(rows, rules, fmt, (None, None))], rules, fmt)
    except UnknownSignal:  # data the schema should have refused: read the dicts instead
        return None


def read_part(rows: Any, rules: ExtractionRules, created: tuple[str | None, str | None] = (None, None)) -> Part:
    """The entries of the records of ``rows`` created in ``created`` (see
    ``StoreRows.select``), in output order, read through SQL: ``read_entries`` of the rows
    SQL did not settle, plus the settled ones' counts."""
    selected = store.classified(rows, min_rating=rules.min_rating, max_negative_rating=rules.max_negative_rating,
                                quality_threshold=rules.quality_threshold, settled=SETTLED, created=created)
    if selected is None:
        raise AssertionError("rows the store cannot classify")  # checked by store_build
    chunks, settled = selected
    try:
        part = read_entries(chain.from_iterable(chunks), rules, classified=True)
    finally:
        chunks.close()
    for sig, count in settled.items():  # complete now that the chunks are read
        if count:
            part.rows += count
            part.skipped[SETTLED[sig]] = part.skipped.get(SETTLED[sig], 0) + count
    return part


@dataclass
class Shard:
    """One shard's examples in output order: ``data`` (their JSON lines; line ``i`` starts
    at ``offsets[i]``, n + 1 offsets), the corrections among them (``cdata``, line ``j`` at
    ``coffsets[j]``, example ``cindex[j]``), ``created`` (created_at per example),
    ``hashes`` (of the dedupe keys; None without dedupe), all ids and the correction ids,
    sorted; rows read and skip counts. ``plain``: every id and time is a string (a shard
    that is not stays in one process, so shards that are combined are all plain).

    ``ask(hashes)`` starts a request for ``[i, key, time, created_at, id]`` of each example
    whose key hash is in ``hashes`` (what a dedupe group spanning shards is decided on) and
    returns the function that waits for the answer: a worker computes its answer while this
    process computes its own (see ``_shard_worker``)."""

    data: bytes
    offsets: Any  # array('q')
    cdata: bytes
    coffsets: Any  # array('q')
    cindex: Any  # array('q')
    created: list
    hashes: list[int] | None
    ids: list
    correction_ids: list
    rows: int
    skipped: dict[str, int]
    ask: Callable[[set[int]], Callable[[], list[list]]]
    plain: bool = True

    def __len__(self) -> int:
        return len(self.offsets) - 1

    _ARRAYS = ("offsets", "coffsets", "cindex")

    def to_messages(self) -> list[bytes]:
        """The shard as bytes messages, for a pipe (no pickle), ``ask`` left out."""
        head = _orjson.dumps({"created": self.created, "ids": self.ids, "correction_ids": self.correction_ids,
                              "rows": self.rows, "skipped": self.skipped, "dedupe": self.hashes is not None})
        hashes = b"" if self.hashes is None else _array("q", self.hashes).tobytes()
        return [head, self.data, self.cdata, hashes, *(getattr(self, k).tobytes() for k in self._ARRAYS)]

    @classmethod
    def from_messages(cls, messages: list[bytes], ask: Callable[[set[int]], Callable[[], list[list]]]) -> "Shard":
        head, data, cdata, hashes, offsets, coffsets, cindex = messages
        h = _orjson.loads(head)
        return cls(data, _array("q", offsets), cdata, _array("q", coffsets), _array("q", cindex), h["created"],
                   _array("q", hashes).tolist() if h["dedupe"] else None, h["ids"], h["correction_ids"], h["rows"],
                   h["skipped"], ask)


def _array(code: str, raw: Any) -> Any:
    """``array(code)`` of bytes (``frombytes``) or of an iterable of numbers."""
    from array import array

    if isinstance(raw, (bytes, bytearray)):
        a = array(code)
        a.frombytes(raw)
        return a
    return array(code, raw)


def _line_offsets(lines: list[bytes]) -> Any:
    """Where each of ``jsonl(lines)``'s lines starts, and its end."""
    from itertools import accumulate

    return _array("q", accumulate(map((1).__add__, map(len, lines)), initial=0))


def read_shard(rows: Any, rules: ExtractionRules, fmt: str, created: tuple[str | None, str | None]) -> Shard:
    """Read, classify, dedupe, sort and serialise the records created in ``created``: what
    each process of a store build runs for its shard."""
    part = read_part(rows, rules, created)
    entries, keys = part.entries, part.keys
    # SQL sent the rows in output order, (created_at, id), and the entries kept that order
    # (``read_entries``). Python compares strings as SQLite does (code points, UTF-8 bytes);
    # other types (only outside cl-release: blobs) are sorted here.
    plain = part.str_ids and -1 not in part.created_lengths
    if not plain:
        key = sort_key(part.str_ids, part.shape[1])
        if keys is None:
            entries.sort(key=key)
        elif entries:  # sort the keys along
            pairs = list(zip(entries, keys))
            pairs.sort(key=lambda pair: key(pair[0]))
            entries, keys = map(list, zip(*pairs))
            del pairs
    columns = list(zip(*entries)) if entries else [()] * 6
    lines = record_lines(entries, fmt, columns, part.one_turn)
    is_correction = list(map(CORRECTED.__eq__, columns[SOURCE]))
    clines = list(compress(lines, is_correction))
    out_ids, times, created_at = columns[ID], columns[TIME], list(columns[CREATED])
    hashes = None if keys is None else list(map(hash, keys))

    def ask(wanted: set[int]) -> Callable[[], list[list]]:
        assert keys is not None and hashes is not None
        found = [[i, keys[i], is_correction[i], times[i], created_at[i], out_ids[i]]
                 for i in compress(range(len(hashes)), map(wanted.__contains__, hashes))]
        return lambda: found

    order = sorted if plain else sorted_ids  # plain: every id a string
    return Shard(
        jsonl(lines), _line_offsets(lines), jsonl(clines), _line_offsets(clines),
        _array("q", compress(range(len(lines)), is_correction)), created_at, hashes,
        order(out_ids), order(compress(out_ids, is_correction)), part.rows, part.skipped, ask, plain,
    )


def build_workers(rows: Any, workers: int | None) -> int:
    """How many processes read ``rows`` (a store's): ``workers``, or by default one per core
    (at most :data:`MAX_BUILD_WORKERS`) for :data:`PARALLEL_BUILD_RECORDS` records or more;
    1 where forking is not safe now (``parallel.can_fork``)."""
    if workers is None:
        cores = parallel.cores()
        workers = min(cores, MAX_BUILD_WORKERS) if cores > 1 and rows.size_hint() >= PARALLEL_BUILD_RECORDS else 1
    return workers if workers > 1 and parallel.can_fork() else 1


class _WorkerLost(Exception):
    """A build worker stopped answering: read in one process instead."""


@contextlib.contextmanager
def _sharded(rows: Any, rules: ExtractionRules, fmt: str, shards: int) -> Generator[list[Shard] | None, None, None]:
    """Each shard; shards 1.. read by forked workers, which stay (answering
    ``Shard.ask``) until the block ends. None if a worker failed (the caller then
    reads in one process, and meets the same error, if any, itself)."""
    import multiprocessing

    bounds = rows.created_bounds(shards)
    ranges = list(zip([None, *bounds], [*bounds, None]))
    ctx = multiprocessing.get_context("fork")  # the keys' hashes are compared across processes
    procs, pipes = [], []
    try:
        for k in range(1, len(ranges)):
            here, there = ctx.Pipe()
            # the worker closes its copies of this process's ends, or it would never see EOF
            proc = ctx.Process(target=_shard_worker, args=(there, [here, *pipes], rows, rules, fmt, ranges[k]),
                               name=f"cl-release-build-{k}")
            proc.start()
            there.close()
            procs.append(proc)
            pipes.append(here)
        yield _gather(pipes, read_shard(rows, rules, fmt, ranges[0]))
    finally:
        for pipe in pipes:
            pipe.close()  # the worker's recv ends: it exits
        for proc in procs:
            proc.join(timeout=5)
            if proc.is_alive():
                proc.terminate()
                proc.join()


def _gather(pipes: list, own: Shard) -> list[Shard] | None:
    """This process's shard and the workers' (raises UnknownSignal if one met a row SQL
    could not classify)."""
    parts, odd = [own], False
    for pipe in pipes:
        try:
            status = pipe.recv_bytes()
        except EOFError:  # the worker died before sending its part
            return None
        if status.startswith(b"ok "):
            try:
                messages = [pipe.recv_bytes() for _ in range(int(status[3:]))]
            except EOFError:
                return None
            parts.append(Shard.from_messages(messages, _ask(pipe)))
        elif status == b"odd":
            odd = True
        else:
            return None
    if odd:
        raise UnknownSignal(None)
    return parts if own.plain else None


def _ask(pipe: Any) -> Callable[[set[int]], Callable[[], list[list]]]:
    """``Shard.ask`` of a worker's shard: the request goes out at once, the answer is read
    when waited for."""

    def ask(wanted: set[int]) -> Callable[[], list[list]]:
        try:
            pipe.send_bytes(_array("q", wanted).tobytes())
        except OSError:
            raise _WorkerLost() from None

        def answer() -> list[list]:
            try:
                return _orjson.loads(pipe.recv_bytes())
            except (EOFError, OSError):
                raise _WorkerLost() from None

        return answer

    return ask


def _shard_worker(pipe: Any, others: list, rows: Any, rules: ExtractionRules, fmt: str, created: tuple) -> None:
    """A forked worker: read one shard, send b"ok N" and the shard in N messages, b"odd"
    (see UnknownSignal), or b"failed: why" (the parent then reads everything itself). Then
    answer ``ask`` requests (a set of hashes in, JSON out) until the pipe closes.
    ``others``: the parent's pipe ends, closed here at once."""
    for end in others:
        end.close()
    try:
        try:
            shard = read_shard(rows, rules, fmt, created)
        except UnknownSignal:
            pipe.send_bytes(b"odd")
            return
        if not shard.plain:  # values only found outside cl-release (blobs): one process reads them
            pipe.send_bytes(b"failed: not plain")
            return
        messages = shard.to_messages()
        pipe.send_bytes(b"ok %d" % len(messages))
        for m in messages:
            pipe.send_bytes(m)
        del messages
        while True:
            try:
                wanted = pipe.recv_bytes()
            except EOFError:
                return
            pipe.send_bytes(_orjson.dumps(shard.ask(set(_array("q", wanted)))()))
    except BaseException as e:  # never a traceback from a child: the parent reads it itself
        with contextlib.suppress(OSError):
            pipe.send_bytes(b"failed: " + f"{type(e).__name__}: {e}".encode("utf-8", "replace"))
    finally:
        pipe.close()


def _runs(blob: bytes, offsets: Any, dropped: list[int]) -> list[bytes]:
    """``blob`` (lines at ``offsets``) without the lines ``dropped`` (ascending): the runs
    of lines between them."""
    runs, start = [], 0
    for i in dropped:
        runs.append(blob[offsets[start]:offsets[i]])
        start = i + 1
    runs.append(blob[offsets[start]:offsets[-1]])
    return runs


def combine(shards: list[Shard], rules: ExtractionRules, fmt: str) -> BuildResult:
    """One build from the shards (in created_at order): dedupe groups merged across shards,
    then the shards' data one after the other, manifest made."""
    from bisect import bisect_left
    from itertools import filterfalse

    skipped: dict[str, int] = {}
    for shard in shards:
        for reason, count in shard.skipped.items():
            skipped[reason] = skipped.get(reason, 0) + count
    dropped: list[list[int]] = [[] for _ in shards]
    gone: list[set] = [set() for _ in shards]  # the ids of dropped examples
    if rules.dedupe and len(shards) > 1:
        # key hashes seen in more than one shard; then the examples with those hashes,
        # grouped by their exact key (equal hashes but different keys: two groups)
        seen: set[int] = set(shards[0].hashes)
        repeated: set[int] = set()
        for shard in shards[1:]:
            repeated.update(seen.intersection(shard.hashes))
            if shard is not shards[-1]:
                seen.update(shard.hashes)
        del seen
        if repeated:
            answers = [shard.ask(repeated) for shard in reversed(shards)]  # workers first
            answers.reverse()
            best: dict[str, tuple] = {}  # key -> (priority, shard, index) of the one that stays so far
            for k, answer in enumerate(answers):
                for i, key, corrected, time, created, rid in answer():
                    mine = ((corrected, time, created, rid), k, i)  # as _newest; plain shards: string ids
                    other = best.setdefault(key, mine)
                    if other is not mine:
                        if mine[0] > other[0]:
                            best[key], mine = mine, other
                        dropped[mine[1]].append(mine[2])
                        gone[mine[1]].add(mine[0][3])
        duplicates = sum(map(len, dropped))
        if duplicates:
            skipped["duplicate"] = skipped.get("duplicate", 0) + duplicates
    pieces: list[bytes] = []
    cpieces: list[bytes] = []
    record_ids: list = []
    correction_ids: list = []
    examples = 0
    first = last = None
    marks = []  # (examples, correction indexes, dropped indexes) per shard: which examples are corrections
    for shard, drop, ids_gone in zip(shards, dropped, gone):
        drop.sort()
        skip = set(drop)
        n = len(shard)
        pieces += _runs(shard.data, shard.offsets, drop) if drop else [shard.data]
        cindex = shard.cindex
        cdrop = [j for j in (bisect_left(cindex, i) for i in drop) if j < len(cindex) and cindex[j] in skip]
        cpieces += _runs(shard.cdata, shard.coffsets, cdrop) if cdrop else [shard.cdata]
        examples += n - len(drop)
        marks.append((n, cindex, drop))
        record_ids += filterfalse(ids_gone.__contains__, shard.ids) if ids_gone else shard.ids
        correction_ids += filterfalse(ids_gone.__contains__, shard.correction_ids) if ids_gone else shard.correction_ids
        # created_at window: output order is created_at order ('' first)
        created = shard.created
        head = next((c for i, c in enumerate(created) if c and i not in skip), None)
        if head is not None:
            first = head if first is None else first
            last = next(created[i] for i in range(n - 1, -1, -1) if i not in skip)
    if len(shards) > 1:  # sorted runs of strings (plain shards), one per shard: timsort merges them
        record_ids, correction_ids = sorted(record_ids), sorted(correction_ids)
    data = b"".join(pieces)
    del pieces
    cdata = b"".join(cpieces)
    manifest = make_manifest(fmt, rules, data, cdata, examples, skipped, sum(s.rows for s in shards),
                             (first, last), record_ids, correction_ids)

    def make() -> tuple[list, list]:
        corrected = bytearray()
        for n, cindex, drop in marks:
            mark = bytearray(n)
            for i in cindex:
                mark[i] = 1
            if drop:
                skip = set(drop)
                mark = bytearray(b for i, b in enumerate(mark) if i not in skip)
            corrected += mark
        return _examples_of(data, corrected, fmt)

    result = BuildResult.deferred(make, manifest, data, cdata)
    result.shards = len(shards)
    return result


def _examples_of(data: bytes, corrected: bytes, fmt: str) -> tuple[list, list]:
    """The examples a build from rows makes (same dicts, keys in the same order), from the
    output lines."""
    records = list(map(_orjson.loads, data.split(b"\n")[:-1]))
    if fmt == "messages":
        examples = [{"messages": [{"role": m["role"], "content": m["content"]} for m in r["messages"]]}
                    for r in records]
    elif fmt == "alpaca":
        examples = [{"instruction": r["instruction"], "input": r["input"], "output": r["output"]} for r in records]
    else:
        examples = records  # {"text": ...}
    return examples, list(compress(examples, corrected))
