"""The feedback store: every logged answer and the feedback on it, in one SQLite file.

A serving process imports :class:`FeedbackStore` and calls :meth:`FeedbackStore.log` for each
answer and :meth:`FeedbackStore.feedback` when a user rates or corrects one. Many processes
may write at once: the database runs in WAL mode (readers never block writers), every write
is a ``BEGIN IMMEDIATE`` transaction (a writer waits for the lock up to ``busy_timeout``
instead of failing half-way), and logging is idempotent on the request id, so a retried
request is stored once.

Tables (the names are a contract; other modules read them):

- ``records``: one row per answer, keyed by request id.
- ``feedback``: any number of rows per answer; the latest (by ``created_at``, then row id)
  is the one that counts.
- ``release_usage``: which records each release trained on, and in which role. Pruning
  never deletes those.

Timestamps are ISO-8601 UTC strings ``YYYY-MM-DDTHH:MM:SS.ffffffZ``, so string order is time
order. The schema evolves through named migrations (sqlite-utils ``Migrations``), each applied
in its own transaction together with its bookkeeping row.
"""

from __future__ import annotations

import hashlib
import math
import multiprocessing
import multiprocessing.connection
import os
import re
import sqlite3
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta, timezone, tzinfo
from pathlib import Path
from typing import IO, Any, Callable, Generator, Iterable, Iterator, Sequence
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import orjson
import sqlite_utils
from sqlite_utils.migrations import Migrations

from .. import parallel
from ..errors import ClReleaseError, ConflictError, DataError, FieldValueError, UnknownRequest, UserError
from ..timeutil import store_now as utc_now, time_zone, timestamp, utc_time  # noqa: F401  (re-exported)
from ..files import locked
from ..registry import match_release

BUSY_TIMEOUT_S = 30.0
BATCH = 10_000
IMPORT_CACHE_KIB = -131072
IMPORT_PARALLEL_BYTES = 16 << 20  # smaller files are parsed in the importing process
IMPORT_PARALLEL_CORES = 2  # one core: parsed in the importing process (see import_jsonl)
IMPORT_MAX_WORKERS = 8  # at most SQLite's default limit of 10 attached databases
WAL_SIZE_LIMIT = 64 << 20  # a checkpointed WAL is cut back to this (PRAGMA journal_size_limit)
SEVERITIES = ("low", "high", "critical", "safety")
MIGRATION_SET = "cl_release.store.sqlite"
APPLICATION_ID = 0x636C7266  # "clrf" in the SQLite header: this file is a cl-release feedback store
MAX_TOKENS = 2**53  # whole numbers above this lose precision as JSON numbers

_FEEDBACK_FIELDS = (
    "rating", "thumbs", "correction", "notes", "hallucinated", "error_tag", "severity", "annotator",
)
ROW_KEYS = (
    "id", "created_at", "input", "output", "model_version", "latency_ms", "tokens",
    "quality_score", "metadata", *_FEEDBACK_FIELDS, "feedback_at", "logged_version",
)
# Import: known fields that collectors put in ``metadata`` (see ``import_jsonl``).
LIFTED_RECORD_FIELDS = ("model_version", "latency_ms", "tokens", "quality_score")
LIFTED_FEEDBACK_FIELDS = ("hallucinated", "error_tag", "severity")
_LIFTED = frozenset(LIFTED_RECORD_FIELDS + LIFTED_FEEDBACK_FIELDS)
# Import: the top-level keys each line shape knows (others are counted and named, not stored).
# An exported row (``export``) is shape (a) with its latest feedback flat, at ``feedback_at``.
_EXPORTED_FEEDBACK = frozenset(("rating", "thumbs", "correction", "notes", "hallucinated", "error_tag",
                                "severity", "annotator"))
_KNOWN_REQUEST_LOG = frozenset(ROW_KEYS) | {"request_id", "timestamp", "user_feedback"}
_KNOWN_FLAT = frozenset(("query", "response", "model", "model_version", "quality_score", "latency_ms", "metadata",
                         "timestamp", "user_feedback"))


# ---------------------------------------------------------------- schema migrations


def _m001_records_and_feedback(db: sqlite_utils.Database) -> None:
    db.execute(
        """CREATE TABLE records (
            id TEXT PRIMARY KEY,
            created_at TEXT NOT NULL,
            input TEXT NOT NULL,
            output TEXT,
            model_version TEXT,
            latency_ms REAL,
            tokens INTEGER,
            quality_score REAL,
            metadata TEXT NOT NULL DEFAULT '{}'
        )"""
    )
    db.execute("CREATE INDEX records_created_at ON records (created_at)")
    db.execute("CREATE INDEX records_model_version ON records (model_version, created_at)")
    db.execute(
        """CREATE TABLE feedback (
            id INTEGER PRIMARY KEY,
            request_id TEXT NOT NULL REFERENCES records(id),
            created_at TEXT NOT NULL,
            rating INTEGER CHECK (rating BETWEEN 1 AND 5),
            thumbs INTEGER CHECK (thumbs IN (-1, 0, 1)),
            correction TEXT,
            notes TEXT,
            hallucinated INTEGER CHECK (hallucinated IN (0, 1)),
            error_tag TEXT,
            severity TEXT CHECK (severity IN ('low', 'high', 'critical', 'safety')),
            annotator TEXT
        )"""
    )
    db.execute("CREATE INDEX feedback_request_id ON feedback (request_id, created_at)")
    db.execute("CREATE INDEX feedback_created_at ON feedback (created_at)")


def _m002_release_usage(db: sqlite_utils.Database) -> None:
    db.execute(
        """CREATE TABLE release_usage (
            request_id TEXT NOT NULL,
            version TEXT NOT NULL,
            role TEXT NOT NULL,
            PRIMARY KEY (request_id, version)
        )"""
    )
    db.execute("CREATE INDEX release_usage_version ON release_usage (version)")


def _m003_logged_version(db: sqlite_utils.Database) -> None:
    # The model version as another tool logged it ("v1.0"), when import mapped it to a release.
    db.execute("ALTER TABLE records ADD COLUMN logged_version TEXT")


def _m004_application_id(db: sqlite_utils.Database) -> None:
    # Marks the file as ours: a store path pointing at another program's database is refused.
    db.execute(f"PRAGMA application_id = {APPLICATION_ID}")


def _m005_usage_read_at(db: sqlite_utils.Database) -> None:
    # When the release read the store: feedback given after it makes the record new again.
    db.execute("ALTER TABLE release_usage ADD COLUMN read_at TEXT")


def _m006_feedback_supersedes(db: sqlite_utils.Database) -> None:
    # Other questions a correction answers (JSON list): the paraphrases it retires (cl_release.data.mix).
    db.execute("ALTER TABLE feedback ADD COLUMN supersedes TEXT")


# Ordered; append new steps, never rename or reorder applied ones.
MIGRATION_STEPS: list[tuple[str, Callable[[sqlite_utils.Database], None]]] = [
    ("m001_records_and_feedback", _m001_records_and_feedback),
    ("m002_release_usage", _m002_release_usage),
    ("m003_logged_version", _m003_logged_version),
    ("m004_application_id", _m004_application_id),
    ("m005_usage_read_at", _m005_usage_read_at),
    ("m006_feedback_supersedes", _m006_feedback_supersedes),
]


def build_migrations(steps: Sequence[tuple[str, Callable]] | None = None) -> Migrations:
    """The migration set for ``steps`` (default: :data:`MIGRATION_STEPS`)."""
    migrations = Migrations(MIGRATION_SET)
    for name, fn in MIGRATION_STEPS if steps is None else steps:
        migrations(name=name)(fn)
    return migrations


# ---------------------------------------------------------------- value checks


Invalid = FieldValueError  # one field of a record or feedback row is wrong (the caller adds file/line)
_dumps = orjson.dumps


def _check_input(value: Any) -> str:
    """The model input as stored: JSON of a string or of a list of ``{role, content}``."""
    if isinstance(value, str):
        return _dumps(value).decode()
    if isinstance(value, list) and value:
        for m in value:
            if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
                i = next(i for i, m2 in enumerate(value) if m2 is m)
                raise Invalid(f"message {i} must be an object with string 'role' and 'content'", "input")
        return _dumps(value).decode()
    raise Invalid("expected a string or a non-empty list of chat messages", "input")


_NUMBER_RANGES: dict[str, tuple[float, float]] = {  # by field name (also as "metadata.<name>")
    "latency_ms": (0.0, 1e12),
    "tokens": (0, MAX_TOKENS),
    "quality_score": (0.0, 1.0),
}
_LATENCY_MAX = _NUMBER_RANGES["latency_ms"][1]


def _opt_num(value: Any, field: str, kind: type = float) -> Any:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise Invalid(f"expected a number, got {value!r}", field)
    if not math.isfinite(value):
        raise Invalid(f"expected a finite number, got {value!r}", field)
    if kind is int:
        if value != int(value):
            raise Invalid(f"expected a whole number, got {value!r}", field)
        value = int(value)
    else:
        value = float(value)
    low, high = _NUMBER_RANGES.get(field.rpartition(".")[2], (-math.inf, math.inf))
    if not low <= value <= high:
        raise Invalid(f"must be from {low:g} to {high:g}, got {value!r}", field)
    return value


def _opt_str(value: Any, field: str) -> str | None:
    if value is None or isinstance(value, str):
        return value
    raise Invalid(f"expected a string, got {type(value).__name__}", field)


def record_row(
    input: Any,
    output: Any,
    *,
    request_id: Any = None,
    model_version: Any = None,
    latency_ms: Any = None,
    tokens: Any = None,
    quality_score: Any = None,
    metadata: Any = None,
    created_at: Any = None,
    logged_version: Any = None,
) -> tuple:
    """Check one record and return its ``records`` row tuple (column order of the table)."""
    if request_id is None:
        request_id = uuid.uuid4().hex
    elif not isinstance(request_id, str) or not request_id:
        raise Invalid("request id must be a non-empty string", "request_id")
    if not isinstance(output, str):
        raise Invalid("expected the model output as a string", "output")
    if metadata is None:
        meta = "{}"
    elif isinstance(metadata, dict):
        meta = orjson.dumps(metadata).decode()
    else:
        raise Invalid("expected a JSON object", "metadata")
    return (
        request_id,
        timestamp(created_at),
        _check_input(input),
        output,
        _opt_str(model_version, "model_version"),
        _opt_num(latency_ms, "latency_ms"),
        _opt_num(tokens, "tokens", int),
        _opt_num(quality_score, "quality_score"),
        meta,
        _opt_str(logged_version, "logged_version"),
    )


def feedback_values(
    *,
    rating: Any = None,
    thumbs: Any = None,
    correction: Any = None,
    notes: Any = None,
    hallucinated: Any = None,
    error_tag: Any = None,
    severity: Any = None,
    annotator: Any = None,
) -> dict[str, Any]:
    """Check feedback fields; returns them as stored (``thumbs`` True/"up" → 1, False/"down" → -1,
    bools → 0/1).

    Raises :class:`Invalid` naming the field. At least one field besides ``annotator`` must
    be given.
    """
    if rating is not None:
        if isinstance(rating, bool) or not isinstance(rating, (int, float)) or rating != int(rating) or not 1 <= rating <= 5:
            raise Invalid(f"rating must be a whole number from 1 to 5, got {rating!r}", "rating")
        rating = int(rating)
    if isinstance(thumbs, bool):
        thumbs = 1 if thumbs else -1
    elif thumbs in ("up", "down"):
        thumbs = 1 if thumbs == "up" else -1
    if thumbs is not None and (not isinstance(thumbs, int) or thumbs not in (-1, 0, 1)):
        raise Invalid(f"thumbs must be up, down, true, false, -1, 0 or 1, got {thumbs!r}", "thumbs")
    if hallucinated is not None:
        if hallucinated not in (True, False, 0, 1) or isinstance(hallucinated, float):
            raise Invalid(f"hallucinated must be true or false, got {hallucinated!r}", "hallucinated")
        hallucinated = int(hallucinated)
    if severity is not None and severity not in SEVERITIES:
        raise Invalid(f"severity must be one of {', '.join(SEVERITIES)}, got {severity!r}", "severity")
    values = {
        "rating": rating,
        "thumbs": thumbs,
        "correction": _opt_str(correction, "correction"),
        "notes": _opt_str(notes, "notes"),
        "hallucinated": hallucinated,
        "error_tag": _opt_str(error_tag, "error_tag"),
        "severity": severity,
        "annotator": _opt_str(annotator, "annotator"),
    }
    if all(values[k] is None for k in _FEEDBACK_FIELDS if k != "annotator"):
        raise Invalid("feedback needs at least one of rating, thumbs, correction, notes, hallucinated, error_tag, severity")
    return values


# ---------------------------------------------------------------- JSONL import shapes


@dataclass
class ImportCounts:
    """What the rows of an import carried (summed over the parse workers)."""

    naive: int = 0  # timestamps without a UTC offset (read in the import's time zone)
    lifted: dict[str, int] = field(default_factory=dict)  # field -> lines that took it from metadata
    conflicts: dict[str, int] = field(default_factory=dict)  # field -> top level and metadata disagree
    versions: dict[str | None, int] = field(default_factory=dict)  # stored model version -> lines
    mapped: int = 0  # lines whose version string was mapped to a release ("v1.0" -> "1.0.0")
    unknown: dict[str, int] = field(default_factory=dict)  # top-level key no line shape knows -> lines

    def add(self, other: "ImportCounts") -> None:
        self.naive += other.naive
        self.mapped += other.mapped
        for mine, theirs in ((self.lifted, other.lifted), (self.conflicts, other.conflicts),
                             (self.versions, other.versions), (self.unknown, other.unknown)):
            for k, n in theirs.items():
                mine[k] = mine.get(k, 0) + n


def _bump(counts: dict, key: Any) -> None:
    counts[key] = counts.get(key, 0) + 1


class ImportReader:
    """Turns one parsed JSONL line into (records row, feedback row or None); see ``import_jsonl``.

    ``tz``: how naive timestamps are read (None: UTC). ``releases``: the registry's versions;
    a version string naming one of them after normalization (``v1.0`` -> ``1.0.0``, see
    :func:`registry.match_release`) is stored as that release, the string as given in
    ``logged_version``. ``counts`` collects what the lines carried.

    Shape (a) is checked inline (the hot path of a large import); the checks, their order and
    their messages are those of :func:`record_row`, which shape (b) still goes through.
    """

    def __init__(self, tz: tzinfo | None = None, releases: Iterable[str] | None = None,
                 max_chars: int | None = None):
        self.tz = tz
        self.releases = None if releases is None else frozenset(releases)
        self.max_chars = max_chars
        self.counts = ImportCounts()
        self._stored_version: dict[str, str] = {}

    def __call__(self, obj: Any, raw: bytes) -> tuple[tuple, tuple | None]:
        if not isinstance(obj, dict):
            raise Invalid(f"expected a JSON object, got {type(obj).__name__}")
        if self.max_chars is not None and len(raw) > self.max_chars:  # a line is never shorter than its text
            self._check_size(obj)
        get = obj.get
        counts = self.counts
        if "output" in obj or "input" in obj:  # shape (a): structured request log
            request_id = obj["request_id"] if "request_id" in obj else get("id")
            if request_id is None:
                raise Invalid("missing 'request_id'", "request_id")
            if "input" not in obj:
                raise Invalid("missing 'input'", "input")
            if not isinstance(request_id, str) or not request_id:
                raise Invalid("request id must be a non-empty string", "request_id")
            output = get("output")
            if not isinstance(output, str):
                raise Invalid("expected the model output as a string", "output")
            metadata = get("metadata")
            if metadata is None:
                meta = "{}"
            elif isinstance(metadata, dict):
                meta = _dumps(metadata).decode() if metadata else "{}"
            else:
                raise Invalid("expected a JSON object", "metadata")
            created_at = obj["timestamp"] if "timestamp" in obj else get("created_at")
            created, naive = utc_time(created_at, tz=self.tz)
            if naive:
                counts.naive += 1
            input_ = _check_input(obj["input"])
            model_version = get("model_version")
            if model_version is not None and not isinstance(model_version, str):
                raise Invalid(f"expected a string, got {type(model_version).__name__}", "model_version")
            latency_ms = get("latency_ms")
            if latency_ms is not None:
                if type(latency_ms) is not float or not 0.0 <= latency_ms <= _LATENCY_MAX:  # else: checked
                    latency_ms = _opt_num(latency_ms, "latency_ms")
            tokens = get("tokens")
            if tokens is not None:
                tokens = _opt_num(tokens, "tokens", int)
            quality_score = get("quality_score")
            if quality_score is not None:
                quality_score = _opt_num(quality_score, "quality_score")
            lift = metadata and not _LIFTED.isdisjoint(metadata)
            if lift:
                model_version, latency_ms, tokens, quality_score = self._lift_record(
                    metadata, model_version, latency_ms, tokens, quality_score)
            logged = get("logged_version")
            if logged is not None and not isinstance(logged, str):
                raise Invalid(f"expected a string, got {type(logged).__name__}", "logged_version")
            if model_version is not None and self.releases is not None:
                stored = self._stored_version.get(model_version) or self._release_of(model_version)
                if stored != model_version:
                    logged, model_version = logged or model_version, stored
                    counts.mapped += 1
            record = (request_id, created, input_, output, model_version, latency_ms, tokens, quality_score, meta,
                      logged)
        elif "query" in obj:  # shape (b): flat rows; the id is a hash of the line
            metadata = get("metadata")
            created_at = get("timestamp")
            record = record_row(
                obj["query"],
                get("response"),
                request_id=hashlib.sha256(raw.strip()).hexdigest()[:32],
                model_version=get("model", get("model_version")),
                quality_score=get("quality_score"),
                latency_ms=get("latency_ms"),
                metadata=metadata,
                created_at=None if created_at is None else self._time(created_at, "created_at"),
            )
            lift = isinstance(metadata, dict) and not _LIFTED.isdisjoint(metadata)
            if lift:
                record = record[:4] + self._lift_record(metadata, *record[4:8]) + record[8:]
            model_version = record[4]
            if model_version is not None and self.releases is not None:
                stored = self._release_of(model_version)
                if stored != model_version:
                    record = record[:4] + (stored,) + record[5:9] + (model_version,)
                    counts.mapped += 1
        else:
            raise Invalid("unknown row shape: expected 'input'/'output' (request log) or 'query'/'response'")
        versions, version = counts.versions, record[4]
        versions[version] = versions.get(version, 0) + 1
        unknown = obj.keys() - (_KNOWN_REQUEST_LOG if "query" not in obj else _KNOWN_FLAT)
        if unknown:
            for name in unknown:
                _bump(counts.unknown, name)
        uf = get("user_feedback")
        prefix, time_key = "user_feedback.", "timestamp"
        if uf is None:
            if not _EXPORTED_FEEDBACK.isdisjoint(obj):  # cl-release's export: the latest feedback, flat
                uf, prefix, time_key = obj, "", "feedback_at"
            elif not lift:
                return record, None
            else:
                uf = {}
        elif isinstance(uf, (int, float)) and not isinstance(uf, bool):
            uf = {"rating": uf}
        elif not isinstance(uf, dict):
            raise Invalid("expected a rating number or an object", "user_feedback")
        fields = {k: uf.get(k) for k in _FEEDBACK_FIELDS}
        if lift:
            self._lift_feedback(metadata, fields)
        if all(v is None for v in fields.values()):
            return record, None
        try:
            fb = feedback_values(**fields)
            fb_time = uf.get(time_key, uf.get("created_at")) if prefix else uf.get(time_key)
            fb_at = self._time(fb_time, prefix + time_key) if fb_time else record[1]
        except Invalid as e:
            raise Invalid(str(e), f"{prefix}{e.field}" if e.field and "." not in e.field else e.field) from None
        return record, (record[0], fb_at, *fb.values())

    def _check_size(self, obj: dict) -> None:
        """The per-example size limit (``datasets.max_example_chars``) over what would be
        trained on: the prompt, the answer and a correction."""
        from ..data.formats import OVERSIZE_HINT, oversize

        uf = obj.get("user_feedback")
        fields = {"input": obj.get("input", obj.get("query")), "output": obj.get("output", obj.get("response")),
                  "correction": uf.get("correction") if isinstance(uf, dict) else obj.get("correction")}
        problem = oversize({k: v for k, v in fields.items() if v is not None}, self.max_chars)
        if problem is not None:
            raise Invalid(f"{problem[0]} ({OVERSIZE_HINT})", problem[1])

    def _time(self, value: Any, field: str) -> str:
        """A timestamp of a line, read in the import's time zone; naive ones are counted."""
        ts, naive = utc_time(value, field=field, tz=self.tz)
        if naive:
            self.counts.naive += 1
        return ts

    def _release_of(self, version: str) -> str:
        stored = self._stored_version.get(version)
        if stored is None:
            stored = self._stored_version[version] = match_release(version, self.releases) or version
        return stored

    def _lift_record(self, metadata: dict, *values: Any) -> tuple:
        """Fill absent top-level record fields from ``metadata``; count disagreements."""
        out = list(values)
        for k, name in enumerate(LIFTED_RECORD_FIELDS):
            m = metadata.get(name)
            if m is None:
                continue
            where = f"metadata.{name}"
            if name == "model_version":
                if isinstance(m, (int, float)) and not isinstance(m, bool):
                    m = str(m)  # a collector wrote 1.0 for "1.0"
                m = _opt_str(m, where)
            else:
                m = _opt_num(m, where, int if name == "tokens" else float)
            top = out[k]
            if top is None:
                out[k] = m
                _bump(self.counts.lifted, name)
            elif top != m and not (name == "model_version" and self.releases is not None
                                   and self._release_of(top) == self._release_of(m)):
                _bump(self.counts.conflicts, name)
        return tuple(out)

    def _lift_feedback(self, metadata: dict, fields: dict[str, Any]) -> None:
        """Fill absent feedback flags from ``metadata``. ``hallucinated: false`` alone makes no
        feedback row (a collector may write it on every answer); true, a tag or a severity do."""
        for name in LIFTED_FEEDBACK_FIELDS:
            m = metadata.get(name)
            if m is None:
                continue
            try:
                m = feedback_values(**{name: m})[name]
            except Invalid as e:
                raise Invalid(str(e), f"metadata.{name}") from None
            top = fields[name]
            if top is None:
                if name == "hallucinated" and not m and all(v is None for v in fields.values()):
                    continue
                fields[name] = m
                _bump(self.counts.lifted, name)
            elif _stored_feedback(name, top) != m:
                _bump(self.counts.conflicts, name)


def _stored_feedback(name: str, value: Any) -> Any:
    """A feedback field as stored; an invalid value stays as given (its own check reports it)."""
    try:
        return feedback_values(**{name: value})[name]
    except Invalid:
        return value


def _import_row(obj: Any, raw: bytes) -> tuple[tuple, tuple | None]:
    """One line read as UTC with no releases known (what :class:`ImportReader` does by default)."""
    return ImportReader()(obj, raw)


@dataclass
class ImportResult:
    """What ``import_jsonl`` did: lines read, new records, records already present, feedback
    rows, and what the lines carried: records per model version (as stored; ``"unknown"``
    for none), fields lifted from ``metadata`` and disagreements with the top level (per
    field), naive timestamps and the zone they were read in, version strings mapped to a
    release, records whose version names no release (None when no releases were given), and
    top-level keys no line shape knows (ignored; per key, the lines that had it)."""

    lines: int = 0
    records: int = 0
    duplicates: int = 0
    feedback: int = 0
    seconds: float = 0.0
    by_model_version: dict[str, int] = field(default_factory=dict)
    lifted: dict[str, int] = field(default_factory=dict)
    conflicts: dict[str, int] = field(default_factory=dict)
    naive_timestamps: int = 0
    timezone: str = "UTC"
    mapped_versions: int = 0
    unmatched_versions: int | None = None
    unknown_fields: dict[str, int] = field(default_factory=dict)

    @property
    def per_second(self) -> float:
        return self.lines / self.seconds if self.seconds else 0.0

    def to_dict(self) -> dict[str, Any]:
        out = {k: getattr(self, k) for k in self.__dataclass_fields__}
        out["per_second"] = self.per_second
        return out

    def _count(self, counts: ImportCounts, releases: frozenset[str] | None) -> None:
        self.by_model_version = {("unknown" if v is None else v): n for v, n in
                                 sorted(counts.versions.items(), key=lambda kv: (kv[0] is None, kv[0] or ""))}
        self.lifted = dict(sorted(counts.lifted.items()))
        self.conflicts = dict(sorted(counts.conflicts.items()))
        self.naive_timestamps = counts.naive
        self.mapped_versions = counts.mapped
        self.unknown_fields = dict(sorted(counts.unknown.items()))
        if releases is not None:
            self.unmatched_versions = sum(n for v, n in counts.versions.items() if v is not None and v not in releases)


# ---------------------------------------------------------------- the store

_INSERT_RECORD = (
    "INSERT INTO records (id, created_at, input, output, model_version, latency_ms, tokens,"
    " quality_score, metadata, logged_version) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (id) DO NOTHING"
)
_INSERT_FEEDBACK = (
    "INSERT INTO feedback (request_id, created_at, rating, thumbs, correction, notes, hallucinated,"
    " error_tag, severity, annotator) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
# Import: indexes no import statement reads; a large import drops and rebuilds them (see
# ``import_jsonl``). ``feedback_request_id`` stays: the "insert once" check searches it.
_DEFERRABLE_INDEXES = ("records_created_at", "records_model_version", "feedback_created_at")
_REBUILD_INDEXES_RATIO = 0.5  # rebuild when the import adds at least half the table again
# Import, one line at a time: identical feedback on one answer is stored once, so
# re-importing a file adds nothing. The staged import (``_copy_feedback_sql``) does the same
# for a whole file in one statement; the tests keep this row-by-row form as its reference.
_INSERT_FEEDBACK_ONCE = (
    "INSERT INTO feedback (request_id, created_at, rating, thumbs, correction, notes, hallucinated,"
    " error_tag, severity, annotator) SELECT ?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10"
    " WHERE NOT EXISTS (SELECT 1 FROM feedback WHERE request_id = ?1 AND rating IS ?3"
    " AND thumbs IS ?4 AND correction IS ?5 AND notes IS ?6 AND hallucinated IS ?7"
    " AND error_tag IS ?8 AND severity IS ?9 AND annotator IS ?10)"
)

# ---------------------------------------------------------------- staged import
#
# ``import_jsonl`` parses the file into scratch SQLite files (one per byte range of the file,
# each written by one process, no journal: they are thrown away on any failure), then copies
# them into the store with two INSERT ... SELECT statements. A scratch file holds the records
# (r) and the feedback rows (f) of its range in file order (plain appends); the copy numbers
# them ``part << 40 | rowid``, which is file order across parts.
_RECORD_COLUMNS = (
    "id, created_at, input, output, model_version, latency_ms, tokens, quality_score, metadata, logged_version"
)
_FEEDBACK_MATCH = ("request_id", "rating", "thumbs", "correction", "notes", "hallucinated", "error_tag",
                   "severity", "annotator")  # what makes two feedback rows "identical" (not created_at)
_FEEDBACK_COLUMNS = "request_id, created_at, " + ", ".join(_FEEDBACK_MATCH[1:])
_SCRATCH_SCHEMA = (
    f"CREATE TABLE r ({_RECORD_COLUMNS}, line)",  # line: in the range, for a conflict's message
    f"CREATE TABLE f ({_FEEDBACK_COLUMNS})",
)
_SEQ_SHIFT = 40


def _copy_records_sql(parts: Sequence[str]) -> str:
    """Records of the attached scratch ``parts``, sorted by (id, file order): the first line
    with an id wins, and the primary-key index of ``records`` is appended to in key order."""
    arms = " UNION ALL ".join(
        f"SELECT {_RECORD_COLUMNS}, ({k} << {_SEQ_SHIFT}) + rowid AS seq FROM {p}.r" for k, p in enumerate(parts)
    )
    return (
        f"INSERT INTO main.records ({_RECORD_COLUMNS}) SELECT {_RECORD_COLUMNS}"
        f" FROM ({arms} ORDER BY id, seq) WHERE true ON CONFLICT (id) DO NOTHING"
    )


def _copy_feedback_sql(parts: Sequence[str]) -> str:
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
class _Staged:
    """One staged byte range: physical lines read, records and feedback rows staged, and the
    first bad line as (line number within the range, message, field), if any."""

    lines: int = 0
    records: int = 0
    feedback: int = 0
    error: tuple[int, str, str | None] | None = None
    counts: ImportCounts | None = None


def _import_workers(size: int, workers: int | None) -> int:
    if workers is not None:
        if workers < 1:
            raise UserError(f"workers must be at least 1, got {workers}")
        workers = min(workers, IMPORT_MAX_WORKERS)
    else:
        cores = parallel.cores()
        workers = min(cores, IMPORT_MAX_WORKERS) if size >= IMPORT_PARALLEL_BYTES and cores >= IMPORT_PARALLEL_CORES else 1
    return workers if workers > 1 and parallel.can_fork() else 1


def _split_lines(f: IO[bytes], size: int, parts: int) -> list[tuple[int, int]]:
    """``parts`` byte ranges covering the file, each starting at a line start (empty ones left out)."""
    bounds = [0]
    for k in range(1, parts):
        f.seek(size * k // parts)
        f.readline()  # to the start of the next line
        bounds.append(max(bounds[-1], min(f.tell(), size)))
    bounds.append(size)
    return [(a, b) for a, b in zip(bounds, bounds[1:]) if b > a]


def _stage_chunk(
    path: Path, start: int, end: int, scratch: Path, batch: int, reader: ImportReader,
    progress: Callable[[int], None] | None = None,
) -> _Staged:
    """Parse and check the lines in bytes ``[start, end)`` of ``path`` into a new scratch file.

    Stops at the first bad line and returns it in ``_Staged.error`` (the scratch file is then
    of no use). ``progress`` gets the bytes read since its previous call, once per batch.
    """
    staged = _Staged(counts=reader.counts)
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
    """A forked worker: stage one byte range, send back ("ok", _Staged) or ("failed", reason)."""

    def progress(n: int) -> None:
        done[part] += n

    try:
        send.send(("ok", _stage_chunk(*args, progress)))
    except BaseException as e:  # report it, never a traceback from a child
        send.send(("failed", f"{type(e).__name__}: {e}"))
    finally:
        send.close()


def _stage_forked(
    path: Path, ranges: Sequence[tuple[int, int]], scratch: Sequence[Path], batch: int,
    reader: Callable[[], ImportReader], progress: Callable[[int], None] | None,
) -> list[_Staged]:
    """Stage each range in its own forked process. Once a range reports a bad line, the later
    ranges are stopped (the earlier ones still run: their line counts number the bad line).
    The workers touch no connection of this process: each opens its own scratch file."""
    ctx = multiprocessing.get_context("fork")
    done = ctx.RawArray("q", len(ranges))
    procs, pending = [], {}
    results: list[_Staged | None] = [None] * len(ranges)
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


_LATEST = (
    "feedback f ON f.id = (SELECT f2.id FROM feedback f2 WHERE f2.request_id = r.id"
    " ORDER BY f2.created_at DESC, f2.id DESC LIMIT 1)"
)
_SELECT_ROWS = (
    "SELECT r.id, r.created_at, r.input, r.output, r.model_version, r.latency_ms, r.tokens,"
    " r.quality_score, r.metadata, f.rating, f.thumbs, f.correction, f.notes, f.hallucinated,"
    " f.error_tag, f.severity, f.annotator, f.created_at, r.logged_version FROM records r LEFT JOIN " + _LATEST
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
            migrations = build_migrations()
            known = {name for name, _ in MIGRATION_STEPS}
            try:
                self._check_owner(conn)
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
        if app_id == APPLICATION_ID:
            return
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        if app_id == 0 and (not tables or ("_sqlite_migrations" in tables and conn.execute(
                "SELECT 1 FROM _sqlite_migrations WHERE migration_set = ? LIMIT 1", (MIGRATION_SET,)).fetchone())):
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
        unknown = set(r) - set(_FEEDBACK_FIELDS)
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
        missing = _missing(c, ids)
        if missing:
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise UnknownRequest(
                f"no logged answer with request id {missing[0]!r}{more}",
                hint="log the answer first, or check the id",
            )

    def missing(self, request_ids: Iterable[str]) -> list[str]:
        """The ids among ``request_ids`` that have no logged answer, in the given order."""
        return _missing(self.conn, list(request_ids))

    def mark_used(self, request_ids: Iterable[str], version: str, role: str, *, replace: bool = False,
                  read_at: str | datetime | None = None) -> int:
        """Record that release ``version`` trained on these records in ``role``; returns rows added.

        ``replace``: these are all of ``version``'s records; marks it had before are removed in
        the same transaction (a release re-planned after a crash marks what it really trains on).
        ``read_at``: when the release read the store; feedback given later on one of these
        records makes it new again for :meth:`rows` ``(unused_by=...)`` (a kept answer that an
        expert corrects afterwards must reach a later release).
        """
        at = None if read_at is None else _bound(read_at, "read_at")
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
            row = c.execute("SELECT id, correction FROM feedback WHERE request_id = ? ORDER BY created_at DESC, id DESC"
                            " LIMIT 1", (request_id,)).fetchone()
            if row is None or not (row[1] or "").strip():
                raise UserError(f"{request_id!r} has no correction to supersede other questions with",
                                hint="give the correction too: feedback add ID --correction TEXT --supersedes Q")
            c.execute("UPDATE feedback SET supersedes = ? WHERE id = ?", (_dumps(qs).decode(), row[0]))

        self._write(write)

    def supersedes(self, request_ids: Iterable[str]) -> dict[str, list[str]]:
        """The ``supersedes`` questions of these records' latest feedback (records with none left out)."""
        ids = list(dict.fromkeys(request_ids))
        out: dict[str, list[str]] = {}
        for i in range(0, len(ids), 500):
            part = ids[i : i + 500]
            sql = (f"SELECT r.id, f.supersedes FROM records r LEFT JOIN {_LATEST}"
                   f" WHERE r.id IN ({', '.join('?' * len(part))}) AND f.supersedes IS NOT NULL")
            out.update((rid, orjson.loads(v)) for rid, v in self.conn.execute(sql, part))
        return dict(sorted(out.items()))

    def severities(self, request_ids: Iterable[str]) -> dict[str, int]:
        """Severity of the latest feedback of these records: severity -> how many (None: none)."""
        ids = list(dict.fromkeys(request_ids))
        out: dict[str, int] = {}
        for i in range(0, len(ids), 500):
            part = ids[i : i + 500]
            sql = (f"SELECT f.severity, count(*) FROM records r LEFT JOIN {_LATEST}"
                   f" WHERE r.id IN ({', '.join('?' * len(part))}) GROUP BY f.severity")
            for severity, n in self.conn.execute(sql, part):
                out[severity] = out.get(severity, 0) + n
        return out

    def marks(self, request_ids: Iterable[str]) -> dict[str, int]:
        """How many of these records each release version trained on (version -> records)."""
        ids = list(dict.fromkeys(request_ids))
        out: dict[str, int] = {}
        for i in range(0, len(ids), 500):
            part = ids[i : i + 500]
            sql = (f"SELECT version, count(*) FROM release_usage WHERE request_id IN ({', '.join('?' * len(part))})"
                   " GROUP BY version")
            for version, n in self.conn.execute(sql, part):
                out[version] = out.get(version, 0) + n
        return dict(sorted(out.items()))

    def usage(self, versions: Iterable[str] | None = None) -> dict[str, int]:
        """Records trained on, per release version (only ``versions`` when given)."""
        sql = "SELECT version, count(*) FROM release_usage"
        vs = None if versions is None else list(versions)
        if vs is not None:
            sql += f" WHERE version IN ({', '.join('?' * len(vs))})" if vs else " WHERE 0"
        return dict(self.conn.execute(sql + " GROUP BY version ORDER BY version", vs or []).fetchall())

    def used_by(self, version: str) -> dict[str, str]:
        """The records release ``version`` trained on: request id → role."""
        cur = self.conn.execute(
            "SELECT request_id, role FROM release_usage WHERE version = ? ORDER BY request_id", (version,)
        )
        return dict(cur.fetchall())

    def prune(self, before: str | datetime | date, *, dry_run: bool = False) -> int:
        """Delete records created before ``before`` and their feedback, except those any release
        trained on. Returns the number of records deleted (or that would be, with ``dry_run``)."""
        cutoff = _bound(before, "before")
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
    ) -> "StoreRows":
        """Each record joined with its latest feedback, oldest first, streamed.

        ``since``: records created at or after it, *or* whose feedback arrived at or after it
        (so new feedback on old answers is picked up). ``until``: records created before it.
        ``has_feedback``: only records with (True) or without (False) feedback. ``unused_by``:
        only records none of these release versions trained on with the feedback they hold now
        (a lineage's new data: feedback given after a release read the store counts as new).
        ``after`` and
        ``limit`` page through results: ``after`` is the (created_at, id) of the last row seen.

        Returns an iterator of row dicts (the query runs on the first ``next``) that also
        holds the query: ``extract.build`` reads the same records through
        :meth:`StoreRows.select` instead, as tuples of the columns it needs.
        """
        where, params = [], []
        s = u = None
        if since is not None:
            s = _bound(since, "since")
            where.append("(r.created_at >= ? OR r.id IN (SELECT request_id FROM feedback WHERE created_at >= ?))")
            params += [s, s]
        if until is not None:
            u = _bound(until, "until")
            where.append("r.created_at < ?")
            params.append(u)
        if model_version is not None:
            where.append("r.model_version = ?")
            params.append(model_version)
        if has_feedback is not None:
            where.append(("" if has_feedback else "NOT ") + "EXISTS (SELECT 1 FROM feedback f3 WHERE f3.request_id = r.id)")
        if unused_by is not None:
            vs = list(unused_by)
            if vs:
                where.append("NOT EXISTS (SELECT 1 FROM release_usage u WHERE u.request_id = r.id"
                             f" AND u.version IN ({', '.join('?' * len(vs))})"
                             " AND (u.read_at IS NULL OR f.created_at IS NULL OR f.created_at < u.read_at))")
                params += vs
        if after is not None:
            where.append("(r.created_at, r.id) > (?, ?)")
            params += list(after)
        return StoreRows(self, " AND ".join(where), params, None if limit is None else int(limit), (s, u))

    def get(self, request_id: str) -> dict[str, Any] | None:
        """One record joined with its latest feedback (keys as in :meth:`rows`), or None."""
        t = self.conn.execute(_SELECT_ROWS + " WHERE r.id = ?", (request_id,)).fetchone()
        return _row_dict(t) if t else None

    def count(self) -> int:
        """Number of logged answers."""
        return self.conn.execute("SELECT count(*) FROM records").fetchone()[0]

    def stats(self, *, since: str | datetime | date | None = None) -> dict[str, Any]:
        """Totals and rates over the records ``rows(since=...)`` would return.

        Rates are over records that have feedback: ``negative_rate`` counts rating ≤ 2 or
        thumbs down; ``hallucination_rate`` counts hallucinated answers. ``critical`` counts
        latest feedback with severity critical or safety.
        """
        params: list[Any] = []
        where = ""
        if since is not None:
            s = _bound(since, "since")
            where = " WHERE (r.created_at >= ? OR r.id IN (SELECT request_id FROM feedback WHERE created_at >= ?))"
            params = [s, s]
        sql = (
            "SELECT r.model_version, count(*), count(f.id), avg(f.rating), count(f.rating),"
            " sum(f.rating <= 2 OR f.thumbs = -1), sum(f.hallucinated = 1),"
            " sum(f.correction IS NOT NULL AND f.correction != ''),"
            " sum(f.severity IN ('critical', 'safety'))"
            f" FROM records r LEFT JOIN {_LATEST}{where} GROUP BY r.model_version ORDER BY r.model_version"
        )
        per = {}
        for mv, *vals in self.conn.execute(sql, params):
            per[mv if mv is not None else "unknown"] = _stats_block(*vals)
        totals = [0, 0, 0.0, 0, 0, 0, 0, 0]
        for b in per.values():
            totals[0] += b["records"]
            totals[1] += b["feedback"]
            totals[2] += (b["average_rating"] or 0.0) * b["ratings"]
            totals[3] += b["ratings"]
            totals[4] += b["negative"]
            totals[5] += b["hallucinated"]
            totals[6] += b["corrections"]
            totals[7] += b["critical"]
        avg = totals[2] / totals[3] if totals[3] else None
        out = _stats_block(totals[0], totals[1], avg, *totals[3:])
        out["since"] = _bound(since, "since") if since is not None else None
        out["by_model_version"] = per
        return out

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
        default forks one worker per core (up to :data:`IMPORT_MAX_WORKERS`) for a file of at
        least :data:`IMPORT_PARALLEL_BYTES` on a machine with at least
        :data:`IMPORT_PARALLEL_CORES` cores (on 2 cores, 1M records: parsing 10.5 s instead
        of 21 s when the cores are free, no slower when they are busy; bench/RESULTS-feedback.md).
        Then one ``BEGIN IMMEDIATE`` transaction copies the staged
        rows into the store in request-id order, each statement run by SQLite itself; other
        writers wait only for this second phase. The scratch files go to the system temporary
        folder (``TMPDIR``), about twice the size of the rows staged, and are removed at the end.
        """
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
                parts = _import_workers(size, workers)
                ranges = _split_lines(f, size, parts)
        except OSError as e:
            raise DataError(path, f"cannot read: {e.strerror}") from None
        with tempfile.TemporaryDirectory(prefix="cl-release-import-") as tmp:
            scratch = [Path(tmp, f"part-{k}.db") for k in range(len(ranges))]
            if len(ranges) > 1:
                staged = _stage_forked(path, ranges, scratch, batch, reader, progress)
            else:
                staged = [_stage_chunk(path, *ranges[0], scratch[0], batch, reader(), progress)] if ranges else []
            line_base = 0
            counts = ImportCounts()
            for part in staged:
                if part.error is not None:
                    line, message, where = part.error
                    raise DataError(path, message, line=line_base + line, field=where)
                line_base += part.lines
                counts.add(part.counts)
            result._count(counts, releases)
            result.lines = sum(part.records for part in staged)
            if result.lines:
                line_bases = [sum(part.lines for part in staged[:k]) for k in range(len(staged))]
                self._copy_staged(scratch, sum(part.feedback for part in staged), result, path, line_bases)
        result.duplicates = result.lines - result.records
        result.seconds = time.perf_counter() - started
        return result

    def _copy_staged(self, scratch: Sequence[Path], feedback: int, result: ImportResult, path: Path,
                     line_bases: Sequence[int]) -> None:
        """Copy the staged rows of ``scratch`` files into the store, in one transaction."""
        conn = self.conn
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
                conn.execute(_copy_records_sql(names))
                result.records = conn.total_changes - before
                if result.records < result.lines:  # ids seen before: each must be an identical repeat
                    self._refuse_conflicts(conn, names, path, line_bases)
                if feedback:
                    before = conn.total_changes
                    conn.execute(_copy_feedback_sql(names))
                    result.feedback = conn.total_changes - before
                for _, sql in deferred:
                    conn.execute(sql)
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
        finally:
            conn.execute("PRAGMA main.cache_size = -2000")
            for name in attached:
                conn.execute(f"DETACH DATABASE {name}")

    def _refuse_conflicts(self, conn: sqlite3.Connection, parts: Sequence[str], path: Path,
                          line_bases: Sequence[int]) -> None:
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


class StoreRows:
    """What :meth:`FeedbackStore.rows` returns: an iterator over the row dicts (keys
    :data:`ROW_KEYS`, oldest first), which also holds its query.

    The dicts cost most of a large read (every column, ``input`` and ``metadata`` parsed, a
    dict per row, and the sort): :meth:`select` reads the same records as tuples of the
    columns a caller names, unordered, at a fraction of that.
    """

    def __init__(self, store: FeedbackStore, where: str, params: list[Any], limit: int | None,
                 window: tuple[str | None, str | None] = (None, None)):
        self.store = store
        self._window = window  # (since, until) as given to rows(), normalized
        self._where = where  # the filters, joined with AND ("" for none)
        self._params = params
        self._limit = limit
        self._dicts: Iterator[dict[str, Any]] | None = None

    def __iter__(self) -> Iterator[dict[str, Any]]:
        if self._dicts is None:
            self._dicts = self._read()
        return self._dicts  # the generator itself: no Python call per row on top

    def __next__(self) -> dict[str, Any]:
        return next(iter(self))

    def close(self) -> None:
        """Stop early: closes the read connection (as closing a generator would)."""
        if self._dicts is None:
            self._dicts = iter(())
        else:
            self._dicts.close()

    def _read(self) -> Iterator[dict[str, Any]]:
        sql = _SELECT_ROWS + (f" WHERE {self._where}" if self._where else "") + " ORDER BY r.created_at, r.id"
        if self._limit is not None:
            sql += f" LIMIT {self._limit}"
        conn = self.store.reader()
        try:
            cur = conn.execute(sql, self._params)
            while True:
                chunk = cur.fetchmany(1000)
                if not chunk:
                    break
                for t in chunk:
                    yield _row_dict(t)
        finally:
            conn.close()

    def select(
        self,
        columns: str,
        params: Sequence[Any] = (),
        *,
        keep: tuple[str, Sequence[Any], Callable[[Any], Any]] | None = None,
        created: tuple[str | None, str | None] = (None, None),
        ordered: bool = False,
    ) -> Generator[list[tuple], None, None] | None:
        """The same records as tuples of ``columns``, in chunks, in no particular order (unless ``ordered``).

        ``columns`` is an SQL select list over ``r`` (the ``records`` row) and ``f`` (its
        latest ``feedback`` row, as in :meth:`FeedbackStore.rows`; all NULL when it has
        none); ``params`` fill its ``?`` placeholders. Nothing is parsed: ``r.input`` is its
        JSON text.

        ``keep``: ``(expression, its params, fn)``: only the records for which ``fn`` of the
        expression's value is true come back. ``fn`` is called exactly once for each record
        the query selects (the filters are checked first, whatever order SQLite evaluates
        its WHERE terms in), so it can count what it drops: a Python call costs less than a
        row sent back.

        ``created``: ``(low, high)``: only the records created at or after ``low`` and
        before ``high`` (None: no bound). Consecutive ranges (see :meth:`created_bounds`)
        split a selection into disjoint parts that several processes can read at once
        (``extract.build`` does). ``ordered``: in ``rows()``'s order, (created_at, id), sorted
        by SQLite after the filters (a sort of what comes back, not a walk of an index).

        None where this would not be the same set of records: with a ``limit`` (which takes
        the oldest), or once the dicts have been read from. Each call is a read of its own
        (and leaves the dicts unread).
        """
        if not self.selectable:
            return None
        where, where_params = self._where, list(self._params)
        low, high = created
        if high is not None:  # unary +: still a scan of the table, not of created_at's index
            where, where_params = "+r.created_at < ?" + (f" AND {where}" if where else ""), [high, *where_params]
        if low is not None:
            where, where_params = "+r.created_at >= ?" + (f" AND {where}" if where else ""), [low, *where_params]
        sql = f"SELECT {columns} FROM records r LEFT JOIN {_LATEST}"
        args = [*params]
        if where:
            sql += f" WHERE {where}"
            args += where_params
        if keep is not None:
            expr, expr_params, fn = keep
            if where:  # fn only sees rows that pass the filters
                sql += f" AND CASE WHEN {where} THEN cl_keep({expr}) END"
                args += where_params
            else:
                sql += f" WHERE cl_keep({expr})"
            args += expr_params
        if ordered:  # unary +: SQLite sorts the rows it selected instead of walking an index
            sql += " ORDER BY +r.created_at, r.id"
        return self._select(sql, args, None if keep is None else keep[2])

    @property
    def selectable(self) -> bool:
        """Whether :meth:`select` reads the same records (no ``limit``, dicts not read)."""
        return self._limit is None and self._dicts is None

    def size_hint(self) -> int:
        """At most how many records the selection holds (the table's largest rowid; instant)."""
        return self.store.conn.execute("SELECT max(rowid) FROM records").fetchone()[0] or 0

    def created_bounds(self, parts: int) -> list[str]:
        """``parts - 1`` created_at values that split the records created in the selection's
        ``since``/``until`` window into ``parts`` ranges of about equal size (ascending; equal
        values where many records share one time). From created_at's index: milliseconds."""
        since, until = self._window
        where = " AND ".join(c for c, v in (("created_at >= ?", since), ("created_at < ?", until)) if v is not None)
        args = [v for v in (since, until) if v is not None]
        where = f" WHERE {where}" if where else ""
        conn = self.store.conn
        total = conn.execute(f"SELECT count(*) FROM records{where}", args).fetchone()[0]
        bounds = []
        for k in range(1, parts):
            row = conn.execute(f"SELECT created_at FROM records{where} ORDER BY created_at LIMIT 1 OFFSET ?",
                               [*args, total * k // parts]).fetchone()
            if row is None:
                break
            bounds.append(row[0])
        return bounds

    def _select(
        self, sql: str, params: list[Any], keep: Callable[[Any], Any] | None
    ) -> Generator[list[tuple], None, None]:
        conn = self.store.reader()
        try:
            if keep is not None:
                conn.create_function("cl_keep", 1, keep)
            cur = conn.execute(sql, params)
            while True:
                chunk = cur.fetchmany(2000)
                if not chunk:
                    break
                yield chunk
        finally:
            conn.close()


# ---------------------------------------------------------------- helpers


def _count_changes(c: sqlite3.Connection, sql: str, rows: Sequence[tuple]) -> int:
    before = c.total_changes
    c.executemany(sql, rows)
    return c.total_changes - before


def _check_same(c: sqlite3.Connection, rows: Sequence[tuple]) -> None:
    """Raise :class:`ConflictError` if a stored record has one of ``rows``' ids (records row
    tuples) with another input or output. Identical repeats are fine (idempotent logging)."""
    ids = list(dict.fromkeys(r[0] for r in rows))
    stored: dict[str, tuple[str, str]] = {}
    for i in range(0, len(ids), 500):
        part = ids[i : i + 500]
        q = f"SELECT id, input, output FROM records WHERE id IN ({', '.join('?' * len(part))})"
        stored.update((rid, (input_, output)) for rid, input_, output in c.execute(q, part))
    for r in rows:  # two rows of one batch with one id: the first is stored, the second compared
        have = stored.get(r[0])
        if have is not None and have != (r[2], r[3]):
            raise ConflictError(
                f"request id {r[0]!r} is already logged with another " + ("input" if r[2] != have[0] else "output"),
                hint="give each answer its own request id (repeating an identical answer is fine)",
            )


def _missing(c: sqlite3.Connection, ids: Sequence[str]) -> list[str]:
    found: set[str] = set()
    unique = list(dict.fromkeys(ids))
    for i in range(0, len(unique), 500):
        part = unique[i : i + 500]
        q = f"SELECT id FROM records WHERE id IN ({', '.join('?' * len(part))})"
        found.update(r[0] for r in c.execute(q, part))
    return [i for i in unique if i not in found]


def _bound(value: Any, name: str) -> str:
    try:
        return timestamp(value, field=name)
    except Invalid as e:
        raise UserError(f"--{name}: {e}", hint="use a date like 2026-01-31 or an ISO-8601 time") from None


def _row_dict(t: tuple) -> dict[str, Any]:
    d = dict(zip(ROW_KEYS, t))
    d["input"] = orjson.loads(d["input"])
    d["metadata"] = orjson.loads(d["metadata"]) if d["metadata"] else {}
    if d["hallucinated"] is not None:
        d["hallucinated"] = bool(d["hallucinated"])
    return d


def _stats_block(records, feedback, avg_rating, ratings, negative, hallucinated, corrections, critical) -> dict:
    negative, hallucinated, corrections, critical = (int(x or 0) for x in (negative, hallucinated, corrections, critical))
    return {
        "records": records,
        "feedback": feedback,
        "feedback_rate": feedback / records if records else 0.0,
        "average_rating": avg_rating,
        "ratings": ratings,
        "negative": negative,
        "negative_rate": negative / feedback if feedback else 0.0,
        "hallucinated": hallucinated,
        "hallucination_rate": hallucinated / feedback if feedback else 0.0,
        "corrections": corrections,
        "critical": critical,
    }


def _write_jsonl(rows: Iterable[dict[str, Any]], f: IO[str]) -> int:
    n = 0
    for row in rows:
        f.write(orjson.dumps(row).decode())
        f.write("\n")
        n += 1
    return n
