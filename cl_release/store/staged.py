"""The staged import behind ``FeedbackStore.import_jsonl``: parse a JSONL file into scratch
SQLite files (in forked processes, one byte range each), then copy them into the store in one
transaction.

A scratch file holds the records (``r``) and the feedback rows (``f``) of its range in file
order (plain appends, no journal: any failure throws it away); the copy numbers them
``part << 40 | rowid``, which is file order across parts, and runs two INSERT ... SELECT
statements in SQLite itself. The public functions are the seams: :func:`import_workers`
(how many processes), :func:`split_lines`, :func:`stage_chunk` (one range, in this process
or a worker), :func:`stage_forked` (the ranges in forked workers), :func:`copy_records_sql`
and :func:`copy_feedback_sql` (the copy).
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.connection
import os
import sqlite3
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Callable, Iterable, Sequence

import orjson

from .. import parallel
from ..errors import DataError, UserError
from ..timeutil import time_zone
from .importer import ImportCounts, ImportReader, ImportResult
from .schema import FEEDBACK_COLUMNS, RECORD_COLUMNS
from .values import Invalid

IMPORT_CACHE_KIB = -131072
IMPORT_PARALLEL_BYTES = 16 << 20  # smaller files are parsed in the importing process
IMPORT_PARALLEL_CORES = 2  # one core: parsed in the importing process (see import_workers)
IMPORT_MAX_WORKERS = 8  # at most SQLite's default limit of 10 attached databases
STORE_CACHE_KIB = -2000  # SQLite's default page cache, restored after the copy

# Import: indexes no import statement reads; a large import drops and rebuilds them (see
# ``copy_staged``). ``feedback_request_id`` stays: the "insert once" check searches it.
_DEFERRABLE_INDEXES = ("records_created_at", "records_model_version", "feedback_created_at")
_REBUILD_INDEXES_RATIO = 0.5  # rebuild when the import adds at least half the table again
_RECORD_COLUMNS = ", ".join(RECORD_COLUMNS)
_FEEDBACK_COLUMNS = ", ".join(FEEDBACK_COLUMNS)
# What makes two feedback rows "identical" (all but created_at): identical feedback on one
# answer is stored once, so re-importing a file adds nothing.
_FEEDBACK_MATCH = tuple(c for c in FEEDBACK_COLUMNS if c != "created_at")
_SCRATCH_SCHEMA = (
    f"CREATE TABLE r ({_RECORD_COLUMNS}, line)",  # line: in the range, for a conflict's message
    f"CREATE TABLE f ({_FEEDBACK_COLUMNS})",
)
_SEQ_SHIFT = 40


def copy_records_sql(parts: Sequence[str]) -> str:
    """Records of the attached scratch ``parts``, sorted by (id, file order): the first line
    with an id wins, and the primary-key index of ``records`` is appended to in key order."""
    arms = " UNION ALL ".join(
        f"SELECT {_RECORD_COLUMNS}, ({k} << {_SEQ_SHIFT}) + rowid AS seq FROM {p}.r" for k, p in enumerate(parts)
    )
    return (
        f"INSERT INTO main.records ({_RECORD_COLUMNS}) SELECT {_RECORD_COLUMNS}"
        f" FROM ({arms} ORDER BY id, seq) WHERE true ON CONFLICT (id) DO NOTHING"
    )


def copy_feedback_sql(parts: Sequence[str]) -> str:
    """Feedback of the attached scratch ``parts``: the first of identical rows in the file,
    unless the store already has an identical one; inserted by answer, then file order."""
    arms = " UNION ALL ".join(
        f"SELECT {_FEEDBACK_COLUMNS}, ({k} << {_SEQ_SHIFT}) + rowid AS seq FROM {p}.f" for k, p in enumerate(parts)
    )
    same = " AND ".join(["x.request_id = s.request_id"] + [f"x.{c} IS s.{c}" for c in _FEEDBACK_MATCH[1:]])
    return (
        f"INSERT INTO main.feedback ({_FEEDBACK_COLUMNS}) SELECT {_FEEDBACK_COLUMNS} FROM"
        f" (SELECT *, row_number() OVER (PARTITION BY {', '.join(_FEEDBACK_MATCH)} ORDER BY seq) AS nth"
        f" FROM ({arms})) AS s"
        f" WHERE nth = 1 AND NOT EXISTS (SELECT 1 FROM main.feedback x WHERE {same})"
        " ORDER BY request_id, seq"
    )


@dataclass
class Staged:
    """One staged byte range: physical lines read, records and feedback rows staged, and the
    first bad line as (line number within the range, message, field), if any."""

    lines: int = 0
    records: int = 0
    feedback: int = 0
    error: tuple[int, str, str | None] | None = None
    counts: ImportCounts | None = None


def import_workers(size: int, workers: int | None) -> int:
    """How many processes parse a file of ``size`` bytes: ``workers`` when given (at most
    :data:`IMPORT_MAX_WORKERS`), else one per core for a large file on a machine with several;
    1 (this process) whenever forking is not safe now (:func:`cl_release.parallel.can_fork`)."""
    if workers is not None:
        if workers < 1:
            raise UserError(f"workers must be at least 1, got {workers}")
        workers = min(workers, IMPORT_MAX_WORKERS)
    else:
        cores = parallel.cores()
        workers = min(cores, IMPORT_MAX_WORKERS) if size >= IMPORT_PARALLEL_BYTES and cores >= IMPORT_PARALLEL_CORES else 1
    return workers if workers > 1 and parallel.can_fork() else 1


def split_lines(f: IO[bytes], size: int, parts: int) -> list[tuple[int, int]]:
    """``parts`` byte ranges covering the file, each starting at a line start (empty ones left out)."""
    bounds = [0]
    for k in range(1, parts):
        f.seek(size * k // parts)
        f.readline()  # to the start of the next line
        bounds.append(max(bounds[-1], min(f.tell(), size)))
    bounds.append(size)
    return [(a, b) for a, b in zip(bounds, bounds[1:]) if b > a]


def stage_chunk(
    path: Path, start: int, end: int, scratch: Path, batch: int, reader: ImportReader,
    progress: Callable[[int], None] | None = None,
) -> Staged:
    """Parse and check the lines in bytes ``[start, end)`` of ``path`` into a new scratch file.

    Stops at the first bad line and returns it in ``Staged.error`` (the scratch file is then
    of no use). ``progress`` gets the bytes read since its previous call, once per batch.
    """
    staged = Staged(counts=reader.counts)
    c = sqlite3.connect(str(scratch), isolation_level=None)
    try:
        c.execute("PRAGMA journal_mode = OFF")  # a scratch file: any failure throws it away
        c.execute("PRAGMA synchronous = OFF")
        for sql in _SCRATCH_SCHEMA:
            c.execute(sql)
        c.execute("BEGIN")
        records: list[tuple] = []
        feedback: list[tuple] = []
        append_r, append_f = records.append, feedback.append
        loads, JSONDecodeError, import_row = orjson.loads, orjson.JSONDecodeError, reader
        insert_r = f"INSERT INTO r VALUES ({', '.join('?' * 11)})"
        insert_f = f"INSERT INTO f VALUES ({', '.join('?' * 10)})"

        def flush() -> None:
            c.executemany(insert_r, records)
            c.executemany(insert_f, feedback)
            staged.records += len(records)
            staged.feedback += len(feedback)
            records.clear()
            feedback.clear()

        pos = reported = start
        n = 0
        with open(path, "rb") as f:
            f.seek(start)
            for n, raw in enumerate(f, 1):
                pos += len(raw)
                try:
                    rec, fb = import_row(loads(raw), raw)
                except JSONDecodeError as e:
                    if raw.strip():
                        staged.error = (n, f"invalid JSON: {e}", None)
                        return staged
                    rec = None  # blank line
                except Invalid as e:
                    staged.error = (n, str(e), e.field)
                    return staged
                if rec is not None:
                    append_r((*rec, n))
                    if fb is not None:
                        append_f(fb)
                    if len(records) >= batch:
                        flush()
                        if progress:
                            progress(pos - reported)
                            reported = pos
                if pos >= end:
                    break
        staged.lines = n
        flush()
        c.execute("COMMIT")
        if progress and pos > reported:
            progress(pos - reported)
        return staged
    finally:
        c.close()


def _stage_worker(send: Any, done: Any, part: int, args: tuple) -> None:
    """A forked worker: stage one byte range, send back ("ok", Staged) or ("failed", reason)."""

    def progress(n: int) -> None:
        done[part] += n

    try:
        send.send(("ok", stage_chunk(*args, progress)))
    except BaseException as e:  # report it, never a traceback from a child
        send.send(("failed", f"{type(e).__name__}: {e}"))
    finally:
        send.close()


def stage_forked(
    path: Path, ranges: Sequence[tuple[int, int]], scratch: Sequence[Path], batch: int,
    reader: Callable[[], ImportReader], progress: Callable[[int], None] | None,
) -> list[Staged]:
    """Stage each range in its own forked process. Once a range reports a bad line, the later
    ranges are stopped (the earlier ones still run: their line counts number the bad line).
    The workers touch no connection of this process: each opens its own scratch file."""
    ctx = multiprocessing.get_context("fork")
    done = ctx.RawArray("q", len(ranges))
    procs, pending = [], {}
    results: list[Staged | None] = [None] * len(ranges)
    reported = 0

    def report() -> None:
        nonlocal reported
        total = sum(done)
        if progress and total > reported:
            progress(total - reported)
            reported = total

    try:
        for k, (start, end) in enumerate(ranges):
            recv, send = ctx.Pipe(duplex=False)
            args = (path, start, end, scratch[k], batch, reader())
            proc = ctx.Process(target=_stage_worker, args=(send, done, k, args),
                               name=f"cl-release-import-{k}")
            proc.start()
            send.close()
            procs.append(proc)
            pending[recv] = k
        while pending:
            for recv in multiprocessing.connection.wait(list(pending), timeout=0.2):
                if recv not in pending:
                    continue  # stopped by an earlier range's bad line in this same round
                k = pending.pop(recv)
                try:
                    status, value = recv.recv()
                except EOFError:
                    procs[k].join()
                    status, value = "failed", f"exited with code {procs[k].exitcode}"
                recv.close()
                if status != "ok":
                    raise DataError(path, f"import worker for bytes {ranges[k][0]}-{ranges[k][1]} failed: {value}")
                results[k] = value
                if value.error is not None:  # what follows this range no longer matters
                    for later, j in list(pending.items()):
                        if j > k:
                            procs[j].terminate()
                            del pending[later]
                            later.close()
            report()
    finally:
        for proc in procs:
            if proc.is_alive():
                proc.terminate()
            proc.join()
        for recv in pending:
            recv.close()
    staged = []
    for part in results:
        if part is None:
            break
        staged.append(part)
        if part.error is not None:
            break
    return staged




def import_jsonl(
    connect: Callable[[], sqlite3.Connection],
    path: str | Path,
    *,
    progress: Callable[[int], None] | None = None,
    batch: int,
    workers: int | None = None,
    timezone: str | None = None,
    releases: Iterable[str] | None = None,
    max_example_chars: int | None = None,
) -> ImportResult:
    """``FeedbackStore.import_jsonl`` (see there): stage ``path``, then copy it into the store
    that ``connect()`` opens (called once, after the whole file was read and checked)."""
    path = Path(path)
    result = ImportResult(timezone=timezone or "UTC")
    tz = time_zone(timezone)
    releases = None if releases is None else frozenset(releases)

    def reader() -> ImportReader:
        return ImportReader(tz, releases, max_example_chars)

    started = time.perf_counter()
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            parts = import_workers(size, workers)
            ranges = split_lines(f, size, parts)
    except OSError as e:
        raise DataError(path, f"cannot read: {e.strerror}") from None
    with tempfile.TemporaryDirectory(prefix="cl-release-import-") as tmp:
        scratch = [Path(tmp, f"part-{k}.db") for k in range(len(ranges))]
        if len(ranges) > 1:
            staged = stage_forked(path, ranges, scratch, batch, reader, progress)
        else:
            staged = [stage_chunk(path, *ranges[0], scratch[0], batch, reader(), progress)] if ranges else []
        line_base = 0
        counts = ImportCounts()
        for part in staged:
            if part.error is not None:
                line, message, where = part.error
                raise DataError(path, message, line=line_base + line, field=where)
            line_base += part.lines
            counts.add(part.counts)
        result.record_counts(counts, releases)
        result.lines = sum(part.records for part in staged)
        if result.lines:
            line_bases = [sum(part.lines for part in staged[:k]) for k in range(len(staged))]
            copy_staged(connect(), scratch, sum(part.feedback for part in staged), result, path, line_bases)
    result.duplicates = result.lines - result.records
    result.seconds = time.perf_counter() - started
    return result


def copy_staged(conn: sqlite3.Connection, scratch: Sequence[Path], feedback: int, result: ImportResult, path: Path,
                line_bases: Sequence[int]) -> None:
    """Copy the staged rows of ``scratch`` files into the store, in one transaction; sets
    ``result.records`` and ``result.feedback``. ``feedback``: how many feedback rows were staged."""
    names = [f"cl_import_{k}" for k in range(len(scratch))]
    attached: list[str] = []
    try:
        for name, file in zip(names, scratch):  # ATTACH is not allowed inside a transaction
            conn.execute(f"ATTACH DATABASE ? AS {name}", (str(file),))
            attached.append(name)
        conn.execute(f"PRAGMA main.cache_size = {IMPORT_CACHE_KIB}")  # fewer page spills
        conn.execute("BEGIN IMMEDIATE")
        try:
            # A large import relative to the table: rebuild the indexes the import itself
            # does not read once at the end (a sort) instead of an insert per row. Same
            # transaction, so a failed import rolls the DROP back with everything else.
            deferred: list[tuple[str, str]] = []
            existing = conn.execute("SELECT max(rowid) FROM main.records").fetchone()[0] or 0
            if result.lines >= existing * _REBUILD_INDEXES_RATIO:
                deferred = conn.execute(
                    "SELECT name, sql FROM main.sqlite_master WHERE type = 'index' AND sql IS NOT NULL"
                    f" AND name IN ({', '.join('?' * len(_DEFERRABLE_INDEXES))})",
                    _DEFERRABLE_INDEXES,
                ).fetchall()
                for name, _ in deferred:
                    conn.execute(f'DROP INDEX main."{name}"')
            before = conn.total_changes
            conn.execute(copy_records_sql(names))
            result.records = conn.total_changes - before
            if result.records < result.lines:  # ids seen before: each must be an identical repeat
                _refuse_conflicts(conn, names, path, line_bases)
            if feedback:
                before = conn.total_changes
                conn.execute(copy_feedback_sql(names))
                result.feedback = conn.total_changes - before
            for _, sql in deferred:
                conn.execute(sql)
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
    finally:
        conn.execute(f"PRAGMA main.cache_size = {STORE_CACHE_KIB}")
        for name in attached:
            conn.execute(f"DETACH DATABASE {name}")


def _refuse_conflicts(conn: sqlite3.Connection, parts: Sequence[str], path: Path, line_bases: Sequence[int]) -> None:
    """After the records copy: the first staged line whose id is stored with another input
    or output (an earlier line of the file, or an earlier import) is a DataError."""
    arms = " UNION ALL ".join(f"SELECT {k} AS part, line, id, input, output FROM {p}.r" for k, p in enumerate(parts))
    row = conn.execute(
        f"SELECT s.part, s.line, s.id, s.input IS NOT m.input FROM ({arms}) s JOIN main.records m ON m.id = s.id"
        " WHERE s.input IS NOT m.input OR s.output IS NOT m.output ORDER BY s.part, s.line LIMIT 1"
    ).fetchone()
    if row is not None:
        part, line, rid, other_input = row
        raise DataError(
            path, f"request id {rid!r} is already logged with another {'input' if other_input else 'output'}",
            line=line_bases[part] + line, field="request_id",
            hint="give each answer its own request id (repeating an identical line is fine); nothing was imported",
        )
