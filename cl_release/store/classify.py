"""The data build's question to the store: each record with the signal of its latest feedback.

The classification rule lives in :mod:`cl_release.data.rules`. Its first step, ``signal``,
turns a row's numbers (rating, thumbs, quality score, hallucinated flag) into a
:class:`Signal`; its second, ``verdict``, looks at the texts (correction, output). This
module is the first step in SQL over the store's ``r`` (records) and ``f`` (latest
feedback) aliases, with the thresholds passed in as plain values, so that the store build
sends back only the records Python must still look at. tests/data/test_data_rules.py checks
that the SQL and the rule agree on every combination of the rule's inputs.
"""

from __future__ import annotations

from enum import IntEnum
from typing import Any, Callable, Collection, Generator, Protocol, Sequence, runtime_checkable


class Signal(IntEnum):
    """What a record's feedback says, before its texts are looked at."""

    NEGATIVE = 1  # rating <= max_negative_rating, thumbs down, or hallucinated (wins over a positive signal)
    POSITIVE = 2  # rating >= min_rating, thumbs up, or quality_score >= quality_threshold
    NO_FEEDBACK = 3  # no rating, thumbs, quality score or hallucinated flag at all
    NEUTRAL = 4  # something, but neither negative nor positive
    # only from the SQL below, never from the rule itself:
    NO_ID = 5  # a record without an id (only possible outside cl-release): an invalid row
    ODD_VALUE = 6  # a value the schema's CHECKs refuse (a text rating...), which SQL may compare unlike Python


# ``x >= ''`` is true exactly for text and blobs (they sort after all numbers; '' stays text
# under the columns' numeric affinity) and costs less than typeof(). Parameters, in order:
# max_negative_rating, min_rating, quality_threshold (NULL: no score is high enough).
_NO_SIGNAL = "f.rating IS NULL AND f.thumbs IS NULL AND r.quality_score IS NULL AND f.hallucinated IS NULL"
SIGNAL_SQL = (
    f"CASE WHEN r.id IS NULL THEN {Signal.NO_ID:d}"
    f" WHEN f.rating >= '' OR r.quality_score >= '' OR f.hallucinated NOT IN (0, 1) THEN {Signal.ODD_VALUE:d}"
    f" WHEN f.rating <= ? OR f.thumbs = -1 OR f.hallucinated = 1 THEN {Signal.NEGATIVE:d}"
    f" WHEN f.rating >= ? OR f.thumbs = 1 OR r.quality_score >= ? THEN {Signal.POSITIVE:d}"
    f" WHEN {_NO_SIGNAL} THEN {Signal.NO_FEEDBACK:d} ELSE {Signal.NEUTRAL:d} END"
)
# What SQLite hands the keep callback: the signal of a record without an id or without a
# correction (a record that may be settled by its signal alone), else NULL.
_SETTLE_SQL = f"CASE WHEN r.id IS NULL OR f.correction IS NULL THEN {SIGNAL_SQL} END"
# The tuples :func:`classified` sends back, in this order (``input`` is its JSON text).
COLUMNS = ("signal", "id", "output", "correction", "input", "created_at", "feedback_at")
_COLUMNS_SQL = f"{SIGNAL_SQL}, r.id, r.output, f.correction, r.input, r.created_at, f.created_at"


@runtime_checkable
class SelectableRows(Protocol):
    """Rows a store can read in SQL as well as yield as dicts (``FeedbackStore.rows()``)."""

    @property
    def selectable(self) -> bool: ...

    def select(self, columns: str, params: Sequence[Any] = (), *,
               keep: tuple[str, Sequence[Any], Callable[[Any], Any]] | None = None,
               created: tuple[str | None, str | None] = (None, None),
               ordered: bool = False) -> Generator[list[tuple], None, None] | None: ...

    def size_hint(self) -> int: ...

    def created_bounds(self, parts: int) -> list[str]: ...


def _sql_number(value: Any) -> bool:
    """A value SQLite compares exactly as Python does: an int (in SQLite's range) or a float
    that is not NaN (SQLite binds NaN as NULL)."""
    if type(value) in (int, bool):
        return -(1 << 63) <= value < (1 << 63)
    return type(value) is float and value == value


def can_classify(rows: Any, min_rating: Any, max_negative_rating: Any, quality_threshold: Any) -> bool:
    """``rows`` are a store's rows (not yet read from, without a limit) and the thresholds are
    numbers SQL compares as Python does (``quality_threshold`` may be None)."""
    return (isinstance(rows, SelectableRows) and rows.selectable
            and _sql_number(min_rating) and _sql_number(max_negative_rating)
            and (quality_threshold is None or _sql_number(quality_threshold)))


def classified(
    rows: Any,
    *,
    min_rating: int | float,
    max_negative_rating: int | float,
    quality_threshold: int | float | None,
    settled: Collection[Signal],
    created: tuple[str | None, str | None] = (None, None),
) -> tuple[Generator[list[tuple], None, None], dict[Signal, int]] | None:
    """The records of ``rows`` (``FeedbackStore.rows()``) as chunks of :data:`COLUMNS` tuples,
    in output order (created_at, id), with the :class:`Signal` of each one's latest feedback.

    A record whose signal is in ``settled`` and whose latest feedback has no correction (or
    that has no id, if ``Signal.NO_ID`` is in ``settled``) is only counted, by a Python
    function SQLite calls once per record (cheaper than sending the row back), and not sent
    back. The counts, by signal, are complete once the chunks are read. ``created``: only
    the records created in this range (see ``StoreRows.select``). None where the SQL would
    not classify exactly as Python: see :func:`can_classify`.
    """
    if not can_classify(rows, min_rating, max_negative_rating, quality_threshold):
        return None
    counts = dict.fromkeys(settled, 0)

    def keep(code: int | None) -> int:  # called by SQLite once per record
        if code in counts:
            counts[code] += 1
            return 0
        return 1

    params = [max_negative_rating, min_rating, quality_threshold]
    chunks = rows.select(_COLUMNS_SQL, params, keep=(_SETTLE_SQL, params, keep), created=created, ordered=True)
    return None if chunks is None else (chunks, counts)
