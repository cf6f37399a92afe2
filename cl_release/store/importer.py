"""Reading a JSONL log into the store's rows: the line shapes it accepts, the fields lifted
from ``metadata``, version strings mapped to releases, and what an import reports.

:class:`ImportReader` turns one parsed line into a records row and an optional feedback row
(the values :mod:`.values` stores); :mod:`.staged` runs it over a file, in parallel, and
copies the rows into the store. :class:`ImportResult` is what ``FeedbackStore.import_jsonl``
returns.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from datetime import tzinfo
from typing import Any, Iterable

import orjson

from ..registry import match_release
from ..timeutil import utc_time
from .values import (
    FEEDBACK_FIELDS, NUMBER_RANGES, ROW_KEYS, Invalid, check_input, feedback_values, opt_num, opt_str, record_row,
    stored_feedback,
)

# Import: known fields that collectors put in ``metadata`` (see ``FeedbackStore.import_jsonl``).
LIFTED_RECORD_FIELDS = ("model_version", "latency_ms", "tokens", "quality_score")
LIFTED_FEEDBACK_FIELDS = ("hallucinated", "error_tag", "severity")
_LIFTED = frozenset(LIFTED_RECORD_FIELDS + LIFTED_FEEDBACK_FIELDS)
# Import: the top-level keys each line shape knows (others are counted and named, not stored).
# An exported row (``export``) is shape (a) with its latest feedback flat, at ``feedback_at``.
_EXPORTED_FEEDBACK = frozenset(FEEDBACK_FIELDS)
_KNOWN_REQUEST_LOG = frozenset(ROW_KEYS) | {"request_id", "timestamp", "user_feedback"}
_KNOWN_FLAT = frozenset(("query", "response", "model", "model_version", "quality_score", "latency_ms", "metadata",
                         "timestamp", "user_feedback"))
_LATENCY_MAX = NUMBER_RANGES["latency_ms"][1]
_dumps = orjson.dumps


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
            input_ = check_input(obj["input"])
            model_version = get("model_version")
            if model_version is not None and not isinstance(model_version, str):
                raise Invalid(f"expected a string, got {type(model_version).__name__}", "model_version")
            latency_ms = get("latency_ms")
            if latency_ms is not None:
                if type(latency_ms) is not float or not 0.0 <= latency_ms <= _LATENCY_MAX:  # else: checked
                    latency_ms = opt_num(latency_ms, "latency_ms")
            tokens = get("tokens")
            if tokens is not None:
                tokens = opt_num(tokens, "tokens", int)
            quality_score = get("quality_score")
            if quality_score is not None:
                quality_score = opt_num(quality_score, "quality_score")
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
        fields = {k: uf.get(k) for k in FEEDBACK_FIELDS}
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
                m = opt_str(m, where)
            else:
                m = opt_num(m, where, int if name == "tokens" else float)
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
            elif stored_feedback(name, top) != m:
                _bump(self.counts.conflicts, name)


def import_row(obj: Any, raw: bytes) -> tuple[tuple, tuple | None]:
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

    def record_counts(self, counts: ImportCounts, releases: frozenset[str] | None) -> None:
        """Fill the per-field counts from what the lines carried (``releases``: the registry's
        versions given to the import, for ``unmatched_versions``)."""
        self.by_model_version = {("unknown" if v is None else v): n for v, n in
                                 sorted(counts.versions.items(), key=lambda kv: (kv[0] is None, kv[0] or ""))}
        self.lifted = dict(sorted(counts.lifted.items()))
        self.conflicts = dict(sorted(counts.conflicts.items()))
        self.naive_timestamps = counts.naive
        self.mapped_versions = counts.mapped
        self.unknown_fields = dict(sorted(counts.unknown.items()))
        if releases is not None:
            self.unmatched_versions = sum(n for v, n in counts.versions.items() if v is not None and v not in releases)
