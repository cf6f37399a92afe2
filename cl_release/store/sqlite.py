"""The feedback store: every logged answer and the feedback on it, in one SQLite file.

A serving process imports :class:`FeedbackStore` and calls :meth:`FeedbackStore.log` for each
answer and :meth:`FeedbackStore.feedback` when a user rates or corrects one. Many processes
may write at once: the database runs in WAL mode (readers never block writers), every write
is a ``BEGIN IMMEDIATE`` transaction (a writer waits for the lock up to ``busy_timeout``
instead of failing half-way), and logging is idempotent on the request id, so a retried
request is stored once.

The tables are the store's own (:mod:`.schema`); the rest of cl-release asks through the
methods here, which :class:`~cl_release.store.base.FeedbackBackend` lists. Reads are the
named queries of :mod:`.queries`; values are checked by :mod:`.values`; the JSONL import is
:mod:`.importer` (line shapes) and :mod:`.staged` (the parallel, staged copy).

Timestamps are ISO-8601 UTC strings ``YYYY-MM-DDTHH:MM:SS.ffffffZ``, so string order is time
order.
"""

from __future__ import annotations

import os
import sqlite3
import threading
from datetime import date, datetime
from pathlib import Path
from typing import IO, Any, Callable, Iterable, Sequence

import orjson
import sqlite_utils

from ..errors import ClReleaseError, ConflictError, DataError, UnknownRequest, UserError
from ..files import locked
from ..timeutil import timestamp
from . import queries, schema, staged
from .importer import (  # noqa: F401  (re-exported: cl_release.store.sqlite keeps its public names)
    LIFTED_FEEDBACK_FIELDS, LIFTED_RECORD_FIELDS, ImportCounts, ImportReader, ImportResult, import_row,
)
from .queries import LatencyRanks, VersionAggregates
from .rows import StoreRows, select_rows
from .schema import APPLICATION_ID, MIGRATION_SET, MIGRATION_STEPS, build_migrations  # noqa: F401  (re-exported)
from .staged import (  # noqa: F401  (re-exported)
    IMPORT_CACHE_KIB, IMPORT_MAX_WORKERS, IMPORT_PARALLEL_BYTES, IMPORT_PARALLEL_CORES, import_workers,
)
from .values import (  # noqa: F401  (re-exported)
    CRITICAL_SEVERITIES, FEEDBACK_FIELDS, MAX_TOKENS, ROW_KEYS, SEVERITIES, Invalid, bound, feedback_values,
    record_row,
)

BUSY_TIMEOUT_S = 30.0
BATCH = 10_000
WAL_SIZE_LIMIT = 64 << 20  # a checkpointed WAL is cut back to this (PRAGMA journal_size_limit)
# The extraction rules' default (cl_release.data): a rating at or below it is negative in stats.
DEFAULT_MAX_NEGATIVE_RATING = 2

_INSERT_RECORD = (
    f"INSERT INTO records ({', '.join(schema.RECORD_COLUMNS)}) VALUES ({', '.join('?' * len(schema.RECORD_COLUMNS))})"
    " ON CONFLICT (id) DO NOTHING"
)
_INSERT_FEEDBACK = (
    f"INSERT INTO feedback ({', '.join(schema.FEEDBACK_COLUMNS)})"
    f" VALUES ({', '.join('?' * len(schema.FEEDBACK_COLUMNS))})"
)


class FeedbackStore:
    """The SQLite feedback store at ``path`` (created with its parent folders on first use).

    One connection per thread (and per process: a forked child opens its own). Close with
    :meth:`close` or use as a context manager.
    """

    def __init__(self, path: str | Path, *, busy_timeout: float = BUSY_TIMEOUT_S):
        self.path = Path(path)
        self.busy_timeout = busy_timeout
        self._local = threading.local()
        self._migrated = False
        self._migrate_lock = threading.Lock()

    # -- connections

    def _open(self) -> sqlite3.Connection:
        if self.path.exists() and self.path.is_dir():
            raise DataError(self.path, "is a folder, not a feedback database")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(str(self.path), timeout=self.busy_timeout, isolation_level=None)
        except OSError as e:
            raise DataError(self.path.parent, f"cannot create the feedback store's folder: {e.strerror}",
                            hint="check its permissions") from None
        except sqlite3.Error as e:
            raise self.error(e) from e
        try:
            conn.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout * 1000)}")
            conn.execute("PRAGMA synchronous = NORMAL")
            conn.execute(f"PRAGMA journal_size_limit = {WAL_SIZE_LIMIT}")
            conn.execute("PRAGMA foreign_keys = ON")
            conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
        except sqlite3.Error as e:
            conn.close()
            raise self.error(e) from e
        return conn

    def error(self, e: sqlite3.Error) -> DataError:
        """A one-line error for what SQLite said about this store (by its result code)."""
        code = (getattr(e, "sqlite_errorcode", None) or 0) & 0xFF
        where = self.path
        if code == 8:  # SQLITE_READONLY
            return DataError(where, "the feedback database is read-only here, and this command writes to it",
                             hint="check the permissions of the file and of its folder, where SQLite "
                                  "writes the -wal and -shm files")
        if code in (3, 14, 23):  # SQLITE_PERM, SQLITE_CANTOPEN, SQLITE_AUTH
            return DataError(where, f"cannot open the feedback database ({e})",
                             hint="check that its folder exists and that you may read and write it, "
                                  "and the -wal and -shm files next to the database")
        if code == 13:  # SQLITE_FULL
            return DataError(where, "the disk is full", hint="free some space and run the command again")
        if code == 5:  # SQLITE_BUSY: waited busy_timeout
            return DataError(where, f"the feedback database stayed locked for {self.busy_timeout:g} s",
                             hint="another process holds a long write; try again")
        if code in (10, 11, 26):  # SQLITE_IOERR, SQLITE_CORRUPT, SQLITE_NOTADB
            return DataError(
                where, f"cannot read the feedback database ({e})",
                hint="restore it from a backup or move it aside; cl-release never replaces it with an empty one",
            )
        return DataError(where, f"feedback database error ({e})")

    @property
    def conn(self) -> sqlite3.Connection:
        """This thread's connection, migrated to the current schema."""
        local = self._local
        if getattr(local, "pid", None) != os.getpid():
            local.conn = None
            local.pid = os.getpid()
        if local.conn is None:
            conn = self._open()
            try:
                self._ensure_schema(conn)
            except BaseException:
                conn.close()
                raise
            local.conn = conn
        return local.conn

    def _ensure_schema(self, conn: sqlite3.Connection) -> None:
        with self._migrate_lock:
            if self._migrated:
                return
            db = sqlite_utils.Database(conn, execute_plugins=False)
            migrations = schema.build_migrations()  # read at call time: tests add a step
            known = {name for name, _ in schema.MIGRATION_STEPS}
            try:
                self._check_owner(conn)
                schema.adopt_renamed_sets(conn)
                if migrations.pending(db):
                    # Serialize first-time setup across processes; migrations run one by one,
                    # each in its own transaction with its bookkeeping row.
                    with locked(f"{self.path}.lock", timeout=self.busy_timeout, what="the feedback store"):
                        if conn.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
                            conn.execute("PRAGMA journal_mode = WAL")
                        migrations.apply(db)
                applied = {m.name for m in migrations.applied(db)}
            except sqlite3.Error as e:
                raise self.error(e) from e
            except ClReleaseError:
                raise
            except Exception as e:
                raise DataError(self.path, f"upgrading the feedback database schema failed: {e}") from e
            unknown = sorted(applied - known)
            if unknown:
                raise DataError(
                    self.path,
                    f"written by a newer cl-release (unknown migrations: {', '.join(unknown)})",
                    hint="upgrade cl-release",
                )
            self._migrated = True

    def _check_owner(self, conn: sqlite3.Connection) -> None:
        """Refuse a database cl-release did not create, before anything writes to it: one with
        another application id, or with tables but no record of our migrations. An empty file
        is ours to set up; a store from before the application id has our migrations table."""
        app_id = conn.execute("PRAGMA application_id").fetchone()[0]
        if app_id == schema.APPLICATION_ID:
            return
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        if app_id == 0 and (not tables or ("_sqlite_migrations" in tables and conn.execute(
                "SELECT 1 FROM _sqlite_migrations WHERE migration_set IN (?, ?) LIMIT 1",
                (schema.MIGRATION_SET, *schema.RENAMED_MIGRATION_SETS)).fetchone())):
            return
        raise DataError(
            self.path,
            "is not a cl-release feedback store (an SQLite database of another program"
            + (f", application id {app_id:#x})" if app_id else ")"),
            hint="point feedback.path in cl-release.yaml at another file; cl-release never changes a "
                 "database it did not create",
        )

    def reader(self) -> sqlite3.Connection:
        """A fresh connection for one long read (the caller closes it)."""
        self.conn  # noqa: B018  (schema first)
        return self._open()

    def close(self) -> None:
        """Close this thread's connection."""
        conn = getattr(self._local, "conn", None)
        if conn is not None and getattr(self._local, "pid", None) == os.getpid():
            conn.close()
        self._local.conn = None

    def __enter__(self) -> "FeedbackStore":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _write(self, fn: Callable[[sqlite3.Connection], Any]) -> Any:
        """Run ``fn(conn)`` in one ``BEGIN IMMEDIATE`` transaction (rolled back on error)."""
        conn = self.conn
        try:
            conn.execute("BEGIN IMMEDIATE")
            try:
                result = fn(conn)
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")
        except sqlite3.Error as e:
            raise self.error(e) from e
        return result

    # -- writing

    def log(
        self,
        input: str | list[dict[str, str]],
        output: str,
        *,
        request_id: str | None = None,
        model_version: str | None = None,
        latency_ms: float | None = None,
        tokens: int | None = None,
        quality_score: float | None = None,
        metadata: dict[str, Any] | None = None,
        created_at: str | datetime | None = None,
    ) -> str:
        """Store one answer; returns its request id (a new uuid4 hex when not given).

        Logging the same request id again with the same input and output changes nothing (a
        retried request is stored once); with another input or output it is a
        :class:`ConflictError` (feedback on that id would attach to the wrong answer).
        """
        try:
            row = record_row(
                input, output, request_id=request_id, model_version=model_version,
                latency_ms=latency_ms, tokens=tokens, quality_score=quality_score,
                metadata=metadata, created_at=created_at,
            )
        except Invalid as e:
            raise UserError(f"cannot log this answer: {e.field}: {e}" if e.field else str(e)) from None

        def insert(c: sqlite3.Connection) -> None:
            if c.execute(_INSERT_RECORD, row).rowcount == 0:
                _check_same(c, [row])

        self._write(insert)
        return row[0]

    def log_many(self, rows: Iterable[dict[str, Any]], *, batch: int = BATCH) -> int:
        """Store many answers (dicts with ``log``'s arguments as keys); returns how many were new.

        Each batch of ``batch`` rows is checked, then written in one transaction; a bad row
        raises :class:`UserError` naming its position, and earlier batches stay written.
        """
        inserted = 0
        chunk: list[tuple] = []

        def insert(c: sqlite3.Connection) -> int:
            n = _count_changes(c, _INSERT_RECORD, chunk)
            if n < len(chunk):
                _check_same(c, chunk)
            return n

        def flush() -> None:
            nonlocal inserted
            inserted += self._write(insert)
            chunk.clear()

        for i, r in enumerate(rows):
            try:
                if not isinstance(r, dict):
                    raise Invalid("expected a dict")
                r = dict(r)
                chunk.append(record_row(r.pop("input", None), r.pop("output", None), **r))
            except (Invalid, TypeError) as e:
                raise UserError(f"row {i}: {getattr(e, 'field', None) or ''} {e}".strip()) from None
            if len(chunk) >= batch:
                flush()
        if chunk:
            flush()
        return inserted

    def feedback(
        self,
        request_id: str,
        *,
        rating: int | None = None,
        thumbs: int | None = None,
        correction: str | None = None,
        notes: str | None = None,
        hallucinated: bool | None = None,
        error_tag: str | None = None,
        severity: str | None = None,
        annotator: str | None = None,
        created_at: str | datetime | None = None,
    ) -> int:
        """Record feedback on a logged answer; returns the new feedback row id.

        ``rating`` 1-5, ``thumbs`` -1/0/1, ``severity`` one of low/high/critical/safety. An
        unknown request id is a :class:`UserError` naming it.
        """
        row = self._feedback_row(
            {"request_id": request_id, "rating": rating, "thumbs": thumbs, "correction": correction,
             "notes": notes, "hallucinated": hallucinated, "error_tag": error_tag,
             "severity": severity, "annotator": annotator, "created_at": created_at}
        )

        def insert(c: sqlite3.Connection) -> int:
            self._require(c, [request_id])
            return c.execute(_INSERT_FEEDBACK, row).lastrowid

        return self._write(insert)

    def feedback_many(self, rows: Iterable[dict[str, Any]]) -> int:
        """Record many feedback rows (dicts with ``request_id`` and ``feedback``'s keywords) in
        one transaction: all are checked first, and nothing is written if one is wrong."""
        values = [self._feedback_row(r, index=i) for i, r in enumerate(rows)]

        def insert(c: sqlite3.Connection) -> int:
            self._require(c, [v[0] for v in values])
            c.executemany(_INSERT_FEEDBACK, values)
            return len(values)

        return self._write(insert) if values else 0

    def write_batch(self, ops: Sequence[tuple[str, dict[str, Any]]]) -> list[Any]:
        """Run many ``log`` and ``feedback`` writes in one ``BEGIN IMMEDIATE`` transaction (a
        group commit: one lock and one commit for all of them).

        ``ops``: ``("log", {"input": ..., "output": ..., **log's keywords})`` or
        ``("feedback", {"request_id": ..., **feedback's keywords})``, applied in order (feedback
        on an answer logged earlier in the batch finds it). Returns one result per op: what
        ``log`` or ``feedback`` returns, or the :class:`ClReleaseError` it would raise
        (:class:`UserError` for a bad field, :class:`ConflictError`, :class:`UnknownRequest`);
        such an op writes nothing and the others commit. A failure of the database itself
        (disk full, locked longer than ``busy_timeout``) raises, and nothing is written.
        """
        results: list[Any] = [None] * len(ops)
        todo: list[tuple[int, str, tuple]] = []
        for i, (kind, fields) in enumerate(ops):
            try:
                if kind == "log":
                    f = dict(fields)
                    try:
                        todo.append((i, kind, record_row(f.pop("input", None), f.pop("output", None), **f)))
                    except Invalid as e:
                        raise UserError(f"cannot log this answer: {e.field}: {e}" if e.field else str(e)) from None
                    except TypeError as e:
                        raise UserError(f"cannot log this answer: {e}") from None
                elif kind == "feedback":
                    todo.append((i, kind, self._feedback_row(fields)))
                else:
                    raise ValueError(f"unknown write {kind!r}")
            except UserError as e:
                results[i] = e

        def apply(c: sqlite3.Connection) -> None:
            for i, kind, row in todo:
                try:
                    if kind == "log":
                        if c.execute(_INSERT_RECORD, row).rowcount == 0:
                            _check_same(c, [row])
                        results[i] = row[0]
                    else:
                        self._require(c, [row[0]])
                        results[i] = c.execute(_INSERT_FEEDBACK, row).lastrowid
                except (ConflictError, UnknownRequest) as e:  # raised before this op wrote anything
                    results[i] = e

        if todo:
            self._write(apply)
        return results

    @staticmethod
    def _feedback_row(r: dict[str, Any], index: int | None = None) -> tuple:
        where = f"feedback row {index}: " if index is not None else "feedback: "
        r = dict(r)
        request_id = r.pop("request_id", None)
        created_at = r.pop("created_at", None)
        unknown = set(r) - set(FEEDBACK_FIELDS)
        if unknown:
            raise UserError(f"{where}unknown field {sorted(unknown)[0]!r}")
        if not isinstance(request_id, str) or not request_id:
            raise UserError(f"{where}missing request id")
        try:
            fb = feedback_values(**r)
            ts = timestamp(created_at)
        except Invalid as e:
            raise UserError(f"{where}{e}") from None
        return (request_id, ts, *fb.values())

    def _require(self, c: sqlite3.Connection, ids: Sequence[str]) -> None:
        missing = queries.missing(c, ids)
        if missing:
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise UnknownRequest(
                f"no logged answer with request id {missing[0]!r}{more}",
                hint="log the answer first, or check the id",
            )

    def missing(self, request_ids: Iterable[str]) -> list[str]:
        """The ids among ``request_ids`` that have no logged answer, in the given order."""
        return queries.missing(self.conn, request_ids)

    def mark_used(self, request_ids: Iterable[str], version: str, role: str, *, replace: bool = False,
                  read_at: str | datetime | None = None) -> int:
        """Record that release ``version`` trained on these records in ``role``; returns rows added.

        ``replace``: these are all of ``version``'s records; marks it had before are removed in
        the same transaction (a release re-planned after a crash marks what it really trains on).
        ``read_at``: when the release read the store; feedback given later on one of these
        records makes it new again for :meth:`rows` ``(unused_by=...)`` (a kept answer that an
        expert corrects afterwards must reach a later release).
        """
        at = None if read_at is None else bound(read_at, "read_at")
        rows = [(rid, version, role, at) for rid in request_ids]
        sql = ("INSERT INTO release_usage (request_id, version, role, read_at) VALUES (?, ?, ?, ?)"
               " ON CONFLICT DO NOTHING")

        def mark(c: sqlite3.Connection) -> int:
            if replace:
                c.execute("DELETE FROM release_usage WHERE version = ?", (version,))
            return _count_changes(c, sql, rows)

        return self._write(mark)

    def set_supersedes(self, request_id: str, questions: Sequence[str]) -> None:
        """Record on the latest feedback of ``request_id`` the other questions its correction
        answers (paraphrases a release then retires). Needs a correction there."""
        from ..data.mix import MAX_SUPERSEDES

        qs = [q.strip() for q in questions if isinstance(q, str) and q.strip()]
        if not qs or len(qs) > MAX_SUPERSEDES:
            raise UserError(f"--supersedes takes 1 to {MAX_SUPERSEDES} questions")

        def write(c: sqlite3.Connection) -> None:
            row = queries.latest_supersedable(c, request_id)
            if row is None or not (row[1] or "").strip():
                raise UserError(f"{request_id!r} has no correction to supersede other questions with",
                                hint="give the correction too: feedback add ID --correction TEXT --supersedes Q")
            c.execute("UPDATE feedback SET supersedes = ? WHERE id = ?", (orjson.dumps(qs).decode(), row[0]))

        self._write(write)

    def supersedes(self, request_ids: Iterable[str]) -> dict[str, list[str]]:
        """The ``supersedes`` questions of these records' latest feedback (records with none left out)."""
        return queries.supersedes(self.conn, request_ids)

    def severities(self, request_ids: Iterable[str]) -> dict[str | None, int]:
        """Severity of the latest feedback of these records: severity -> how many (None: none)."""
        return queries.severities(self.conn, request_ids)

    def marks(self, request_ids: Iterable[str]) -> dict[str, int]:
        """How many of these records each release version trained on (version -> records)."""
        return queries.marks(self.conn, request_ids)

    def usage(self, versions: Iterable[str] | None = None) -> dict[str, int]:
        """Records trained on, per release version (only ``versions`` when given)."""
        return queries.usage(self.conn, None if versions is None else list(versions))

    def used_by(self, version: str) -> dict[str, str]:
        """The records release ``version`` trained on: request id → role."""
        return queries.used_by(self.conn, version)

    def prune(self, before: str | datetime | date, *, dry_run: bool = False) -> int:
        """Delete records created before ``before`` and their feedback, except those any release
        trained on. Returns the number of records deleted (or that would be, with ``dry_run``)."""
        cutoff = bound(before, "before")
        where = (
            "created_at < ? AND NOT EXISTS (SELECT 1 FROM release_usage u WHERE u.request_id = records.id)"
        )
        if dry_run:
            return self.conn.execute(f"SELECT count(*) FROM records WHERE {where}", (cutoff,)).fetchone()[0]

        def delete(c: sqlite3.Connection) -> int:
            c.execute(f"DELETE FROM feedback WHERE request_id IN (SELECT id FROM records WHERE {where})", (cutoff,))
            return c.execute(f"DELETE FROM records WHERE {where}", (cutoff,)).rowcount

        return self._write(delete)

    # -- reading

    def exists(self) -> bool:
        """Whether the store has been created (reads of a store that does not exist yet would
        create it: a caller that only looks can ask first)."""
        return self.path.is_file()

    def rows(
        self,
        *,
        since: str | datetime | date | None = None,
        until: str | datetime | date | None = None,
        model_version: str | None = None,
        has_feedback: bool | None = None,
        unused_by: Iterable[str] | None = None,
        after: tuple[str, str] | None = None,
        limit: int | None = None,
    ) -> StoreRows:
        """Each record joined with its latest feedback, oldest first, streamed.

        ``since``: records created at or after it, *or* whose feedback arrived at or after it
        (so new feedback on old answers is picked up). ``until``: records created before it.
        ``has_feedback``: only records with (True) or without (False) feedback. ``unused_by``:
        only records none of these release versions trained on with the feedback they hold now
        (a lineage's new data: feedback given after a release read the store counts as new).
        ``after`` and ``limit`` page through results: ``after`` is the (created_at, id) of the
        last row seen.

        Returns an iterator of row dicts (the query runs on the first ``next``) that also
        holds the query: the data build reads the same records through
        :meth:`StoreRows.select` instead, as tuples of the columns it needs.
        """
        return select_rows(self, since=since, until=until, model_version=model_version, has_feedback=has_feedback,
                           unused_by=unused_by, after=after, limit=limit)

    def get(self, request_id: str) -> dict[str, Any] | None:
        """One record joined with its latest feedback (keys as in :meth:`rows`), or None."""
        return queries.get(self.conn, request_id)

    def count(self) -> int:
        """Number of logged answers."""
        return queries.count(self.conn)

    def stats(self, *, since: str | datetime | date | None = None,
              max_negative_rating: int = DEFAULT_MAX_NEGATIVE_RATING) -> dict[str, Any]:
        """Totals and rates over the records ``rows(since=...)`` would return, in total and per
        model version (``by_model_version``).

        Rates are over records that have feedback: ``negative_rate`` counts a rating at or
        below ``max_negative_rating`` (pass the extraction rules') or thumbs down;
        ``hallucination_rate`` counts hallucinated answers. ``critical`` counts latest feedback
        with a severity in :data:`CRITICAL_SEVERITIES`.
        """
        s = bound(since, "since") if since is not None else None
        return queries.stats(self.conn, since=s, max_negative_rating=max_negative_rating)

    # -- windows of answers: what the triggers and A/B tests read

    def version_aggregates(
        self, *, since: str | datetime | None, until: str | datetime, min_rating: int, max_negative_rating: int,
        versions: Iterable[str] | None = None, include_unversioned: bool = False,
    ) -> dict[str | None, VersionAggregates]:
        """Per model version (None: unversioned): sums over the answers created in [since,
        until), each with its latest feedback given before ``until``; see
        :func:`queries.version_aggregates`. ``min_rating`` / ``max_negative_rating``: what
        counts as positive / negative (the caller's extraction rules)."""
        return queries.version_aggregates(
            self.conn, since=None if since is None else bound(since, "since"), until=bound(until, "until"),
            versions=None if versions is None else list(versions), include_unversioned=include_unversioned,
            min_rating=min_rating, max_negative_rating=max_negative_rating)

    def answer_flags(self, *, since: str | datetime | None, until: str | datetime,
                     versions: Iterable[str]) -> dict[str, dict[str, int]]:
        """Per version: answers created in [since, until) marked as an error or as critical by
        feedback given before ``until`` (:func:`queries.answer_flags`)."""
        return queries.answer_flags(self.conn, since=None if since is None else bound(since, "since"),
                                    until=bound(until, "until"), versions=list(versions))

    def critical_feedback(self, *, since: str | datetime | None, until: str | datetime) -> dict[str, int]:
        """Critical or safety feedback given in [since, until): ``{"with_correction", "without_correction"}``."""
        return queries.critical_feedback(self.conn, since=None if since is None else bound(since, "since"),
                                         until=bound(until, "until"))

    def latency_ranks(self, *, since: str | datetime | None, until: str | datetime, version: str) -> LatencyRanks:
        """The latencies of ``version``'s answers created in [since, until), by rank, read when
        asked (``.at(k)``: the k-th smallest) on this thread's connection."""
        return LatencyRanks(self.conn, since=None if since is None else bound(since, "since"),
                            until=bound(until, "until"), version=version)

    # -- import and export

    def import_jsonl(
        self,
        path: str | Path,
        *,
        progress: Callable[[int], None] | None = None,
        batch: int = BATCH,
        workers: int | None = None,
        timezone: str | None = None,
        releases: Iterable[str] | None = None,
        max_example_chars: int | None = None,
    ) -> ImportResult:
        """Import logged answers (and their user feedback) from a JSONL file, all or nothing.

        Accepted line shapes:

        (a) ``{request_id, input, output, metadata?, model_version?, latency_ms?, tokens?,
        quality_score?, timestamp?, user_feedback?: {rating?, thumbs?, correction?, notes?,
        hallucinated?, error_tag?, severity?}}``;
        (b) ``{query, response, model?, quality_score?, timestamp?, user_feedback?}`` where
        ``user_feedback`` is a rating number or an object as above; the request id is a hash
        of the line. A row of :meth:`export` is shape (a) with its latest feedback as flat
        fields at ``feedback_at``: export, import and export again give the same bytes. Other
        top-level keys are ignored and counted (``ImportResult.unknown_fields``). Importing the same file twice stores each answer once (the first line
        with an id wins), and identical feedback on one answer once.

        Collectors often log known fields inside ``metadata`` (``{"model_version": "v1.0",
        "latency_ms": 342, "hallucinated": true}``). A field of :data:`LIFTED_RECORD_FIELDS`
        or :data:`LIFTED_FEEDBACK_FIELDS` found there is used when the line has no value of
        its own (a top-level value wins; a disagreement is counted per field); ``metadata``
        itself is stored as it was. ``hallucinated: false`` alone adds no feedback row.

        ``max_example_chars``: a line whose prompt, answer and correction hold more characters
        of text is refused, naming line and field (``datasets.max_example_chars``).

        ``releases``: the registry's versions. A version string that names one of them after
        normalization (``v1.0``, ``1.0`` -> ``1.0.0``) is stored as that release, with the
        string as given in ``logged_version``; any other is stored as given.

        A line without ``timestamp`` is stored at the import time. User feedback is stored at
        its own ``timestamp`` or the answer's. A timestamp without a UTC offset is read in
        ``timezone`` (an IANA name, ``local`` or ``UTC``, the default) and counted; one with
        an offset is converted exactly. The whole file is one transaction: a bad line raises
        :class:`DataError` with its line number and nothing is written. ``progress`` is called
        with the number of bytes read since its previous call.

        Two phases. First the lines are parsed and checked into scratch SQLite files in a
        temporary folder, without touching the store: by ``workers`` forked processes, each
        taking one contiguous byte range of the file, or by this process (``workers=1``). The
        default forks one worker per core (up to :data:`staged.IMPORT_MAX_WORKERS`) for a file of at
        least :data:`staged.IMPORT_PARALLEL_BYTES` on a machine with at least
        :data:`staged.IMPORT_PARALLEL_CORES` cores (on 2 cores, 1M records: parsing 10.5 s instead
        of 21 s when the cores are free, no slower when they are busy; bench/RESULTS-feedback.md).
        Then one ``BEGIN IMMEDIATE`` transaction copies the staged
        rows into the store in request-id order, each statement run by SQLite itself; other
        writers wait only for this second phase. The scratch files go to the system temporary
        folder (``TMPDIR``), about twice the size of the rows staged, and are removed at the end.
        """
        return staged.import_jsonl(lambda: self.conn, path, progress=progress, batch=batch, workers=workers,
                                   timezone=timezone, releases=releases, max_example_chars=max_example_chars)

    def export(
        self, out: str | Path | IO[str], *, since: str | datetime | date | None = None, fmt: str = "jsonl"
    ) -> int:
        """Write ``rows(since=...)`` as JSON lines to a path (replaced atomically) or a text stream.

        Returns the number of rows written.
        """
        if fmt != "jsonl":
            raise UserError(f"unknown export format {fmt!r}", hint="use jsonl")
        if not isinstance(out, (str, Path)):
            return _write_jsonl(self.rows(since=since), out)
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
        try:
            with open(tmp, "w", encoding="utf-8") as f:
                n = _write_jsonl(self.rows(since=since), f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, out)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return n

    def integrity_check(self) -> str:
        """``PRAGMA integrity_check``: ``'ok'`` or the problems SQLite found."""
        return "\n".join(r[0] for r in self.conn.execute("PRAGMA integrity_check"))


def _count_changes(c: sqlite3.Connection, sql: str, rows: Sequence[tuple]) -> int:
    before = c.total_changes
    c.executemany(sql, rows)
    return c.total_changes - before


def _check_same(c: sqlite3.Connection, rows: Sequence[tuple]) -> None:
    """Raise :class:`ConflictError` if a stored record has one of ``rows``' ids (records row
    tuples) with another input or output. Identical repeats are fine (idempotent logging)."""
    stored = queries.stored_answers(c, (r[0] for r in rows))
    for r in rows:  # two rows of one batch with one id: the first is stored, the second compared
        have = stored.get(r[0])
        if have is not None and have != (r[2], r[3]):
            raise ConflictError(
                f"request id {r[0]!r} is already logged with another " + ("input" if r[2] != have[0] else "output"),
                hint="give each answer its own request id (repeating an identical answer is fine)",
            )


def _write_jsonl(rows: Iterable[dict[str, Any]], f: IO[str]) -> int:
    n = 0
    for row in rows:
        f.write(orjson.dumps(row).decode())
        f.write("\n")
        n += 1
    return n
