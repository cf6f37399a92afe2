"""The feedback store as the rest of cl-release sees it: :class:`FeedbackBackend`, the methods
callers use. :class:`~cl_release.store.sqlite.FeedbackStore` (SQLite) implements it; a second
backend (PostgreSQL) implements the same methods with the same meaning, and callers typed
against this Protocol take either.

Times are ISO-8601 strings or datetimes (naive is UTC) and come back in the store's form
``YYYY-MM-DDTHH:MM:SS.ffffffZ``. Row dicts have the keys :data:`~cl_release.store.values.ROW_KEYS`.
Thresholds that are rules of another module (``min_rating``, ``max_negative_rating``: the
extraction rules) are passed in by the caller; the store holds no rule but its own.
"""

from __future__ import annotations

from datetime import date, datetime
from pathlib import Path
from typing import IO, Any, Callable, Iterable, Iterator, Protocol, Sequence, runtime_checkable

from .importer import ImportResult
from .queries import LatencyRanks, VersionAggregates

Time = str | datetime | date


@runtime_checkable
class FeedbackBackend(Protocol):
    """What a feedback store does; see :class:`~cl_release.store.sqlite.FeedbackStore` for each
    method's full contract."""

    # -- lifetime

    def close(self) -> None:
        """Release this thread's connection (the store stays usable)."""

    def __enter__(self) -> "FeedbackBackend": ...

    def __exit__(self, *exc: Any) -> None: ...

    def exists(self) -> bool:
        """Whether the store has been created (a caller that only looks asks first: reads create it)."""

    # -- writing

    def log(self, input: str | list[dict[str, str]], output: str, *, request_id: str | None = None,
            model_version: str | None = None, latency_ms: float | None = None, tokens: int | None = None,
            quality_score: float | None = None, metadata: dict[str, Any] | None = None,
            created_at: Time | None = None) -> str:
        """Store one answer (idempotent on the request id); returns its request id."""

    def log_many(self, rows: Iterable[dict[str, Any]], *, batch: int = ...) -> int:
        """Store many answers (dicts of ``log``'s arguments); returns how many were new."""

    def feedback(self, request_id: str, *, rating: int | None = None, thumbs: int | None = None,
                 correction: str | None = None, notes: str | None = None, hallucinated: bool | None = None,
                 error_tag: str | None = None, severity: str | None = None, annotator: str | None = None,
                 created_at: Time | None = None) -> int:
        """Record feedback on a logged answer; returns the feedback row's id."""

    def feedback_many(self, rows: Iterable[dict[str, Any]]) -> int:
        """Record many feedback rows, all or nothing; returns how many."""

    def write_batch(self, ops: Sequence[tuple[str, dict[str, Any]]]) -> list[Any]:
        """``log`` and ``feedback`` writes in one transaction; one result or error per op."""

    def import_jsonl(self, path: str | Path, *, progress: Callable[[int], None] | None = None, batch: int = ...,
                     workers: int | None = None, timezone: str | None = None, releases: Iterable[str] | None = None,
                     max_example_chars: int | None = None) -> ImportResult:
        """Import a JSONL log, all or nothing."""

    def mark_used(self, request_ids: Iterable[str], version: str, role: str, *, replace: bool = False,
                  read_at: Time | None = None) -> int:
        """Record that release ``version`` trained on these records in ``role``."""

    def set_supersedes(self, request_id: str, questions: Sequence[str]) -> None:
        """Record the other questions the latest correction of ``request_id`` answers."""

    def prune(self, before: Time, *, dry_run: bool = False) -> int:
        """Delete records created before ``before`` that no release trained on."""

    # -- reading

    def get(self, request_id: str) -> dict[str, Any] | None:
        """One record with its latest feedback, or None."""

    def rows(self, *, since: Time | None = None, until: Time | None = None, model_version: str | None = None,
             has_feedback: bool | None = None, unused_by: Iterable[str] | None = None,
             after: tuple[str, str] | None = None, limit: int | None = None) -> Iterator[dict[str, Any]]:
        """Records with their latest feedback, oldest first, streamed."""

    def count(self) -> int:
        """Number of logged answers."""

    def missing(self, request_ids: Iterable[str]) -> list[str]:
        """The ids with no logged answer, in the given order."""

    def stats(self, *, since: Time | None = None, max_negative_rating: int = ...) -> dict[str, Any]:
        """Totals and rates, in total and per model version."""

    def export(self, out: str | Path | IO[str], *, since: Time | None = None, fmt: str = "jsonl") -> int:
        """Write ``rows(since=...)`` as JSON lines; returns how many."""

    def used_by(self, version: str) -> dict[str, str]:
        """The records release ``version`` trained on: request id -> role."""

    def usage(self, versions: Iterable[str] | None = None) -> dict[str, int]:
        """Records trained on, per release version."""

    def marks(self, request_ids: Iterable[str]) -> dict[str, int]:
        """How many of these records each release version trained on."""

    def supersedes(self, request_ids: Iterable[str]) -> dict[str, list[str]]:
        """The ``supersedes`` questions of these records' latest feedback."""

    def severities(self, request_ids: Iterable[str]) -> dict[str | None, int]:
        """Severity of these records' latest feedback -> how many."""

    # -- windows of answers (triggers, A/B tests)

    def version_aggregates(self, *, since: Time | None, until: Time, min_rating: int, max_negative_rating: int,
                           versions: Iterable[str] | None = None,
                           include_unversioned: bool = False) -> dict[str | None, VersionAggregates]:
        """Per model version: sums over the answers created in [since, until)."""

    def answer_flags(self, *, since: Time | None, until: Time, versions: Iterable[str]) -> dict[str, dict[str, int]]:
        """Per version: answers marked as an error or as critical in [since, until)."""

    def critical_feedback(self, *, since: Time | None, until: Time) -> dict[str, int]:
        """Critical or safety feedback in [since, until), with and without a correction."""

    def latency_ranks(self, *, since: Time | None, until: Time, version: str) -> LatencyRanks:
        """A version's latencies in [since, until), by rank (``.at(k)``)."""
