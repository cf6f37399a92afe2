"""What the feedback store accepts: each field of a record and of a feedback row, checked and
turned into the value stored (the one rule; the import's inline path is tested against it).

A wrong value is an :class:`Invalid` (:class:`~cl_release.errors.FieldValueError`) naming the
field; the caller adds where it came from (a file and line, a request). Times are parsed by
:mod:`cl_release.timeutil`.
"""

from __future__ import annotations

import math
import uuid
from typing import Any

import orjson

from ..errors import FieldValueError, UserError
from ..timeutil import timestamp

Invalid = FieldValueError  # one field of a record or feedback row is wrong (the caller adds file/line)

SEVERITIES = ("low", "high", "critical", "safety")
CRITICAL_SEVERITIES = ("critical", "safety")  # what stats, triggers and A/B guardrails count as critical
MAX_TOKENS = 2**53  # whole numbers above this lose precision as JSON numbers
RATINGS = (1, 5)  # a rating is a whole number in this range

FEEDBACK_FIELDS = (
    "rating", "thumbs", "correction", "notes", "hallucinated", "error_tag", "severity", "annotator",
)
# The keys of a row as the store reads it back (``FeedbackStore.rows``, ``get``, ``export``):
# the record, its latest feedback, when that was given, and the version as logged.
ROW_KEYS = (
    "id", "created_at", "input", "output", "model_version", "latency_ms", "tokens",
    "quality_score", "metadata", *FEEDBACK_FIELDS, "feedback_at", "logged_version",
)

NUMBER_RANGES: dict[str, tuple[float, float]] = {  # by field name (also as "metadata.<name>")
    "latency_ms": (0.0, 1e12),
    "tokens": (0, MAX_TOKENS),
    "quality_score": (0.0, 1.0),
}


def check_input(value: Any) -> str:
    """The model input as stored: JSON of a string or of a list of ``{role, content}``."""
    if isinstance(value, str):
        return orjson.dumps(value).decode()
    if isinstance(value, list) and value:
        for m in value:
            if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
                i = next(i for i, m2 in enumerate(value) if m2 is m)
                raise Invalid(f"message {i} must be an object with string 'role' and 'content'", "input")
        return orjson.dumps(value).decode()
    raise Invalid("expected a string or a non-empty list of chat messages", "input")


def opt_num(value: Any, field: str, kind: type = float) -> Any:
    """An optional number field (None stays None): finite, whole for ``kind=int``, and within
    :data:`NUMBER_RANGES` of its name (the part after the last dot)."""
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
    low, high = NUMBER_RANGES.get(field.rpartition(".")[2], (-math.inf, math.inf))
    if not low <= value <= high:
        raise Invalid(f"must be from {low:g} to {high:g}, got {value!r}", field)
    return value


def opt_str(value: Any, field: str) -> str | None:
    """An optional string field (None stays None)."""
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
    """Check one record and return its ``records`` row tuple (:data:`schema.RECORD_COLUMNS` order)."""
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
        check_input(input),
        output,
        opt_str(model_version, "model_version"),
        opt_num(latency_ms, "latency_ms"),
        opt_num(tokens, "tokens", int),
        opt_num(quality_score, "quality_score"),
        meta,
        opt_str(logged_version, "logged_version"),
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
        low, high = RATINGS
        if isinstance(rating, bool) or not isinstance(rating, (int, float)) or rating != int(rating) or not low <= rating <= high:
            raise Invalid(f"rating must be a whole number from {low} to {high}, got {rating!r}", "rating")
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
        "correction": opt_str(correction, "correction"),
        "notes": opt_str(notes, "notes"),
        "hallucinated": hallucinated,
        "error_tag": opt_str(error_tag, "error_tag"),
        "severity": severity,
        "annotator": opt_str(annotator, "annotator"),
    }
    if all(values[k] is None for k in FEEDBACK_FIELDS if k != "annotator"):
        raise Invalid("feedback needs at least one of rating, thumbs, correction, notes, hallucinated, error_tag, severity")
    return values


def stored_feedback(name: str, value: Any) -> Any:
    """One feedback field as stored; an invalid value stays as given (its own check reports it)."""
    try:
        return feedback_values(**{name: value})[name]
    except Invalid:
        return value


def bound(value: Any, name: str) -> str:
    """A time bound a user gave (``--since``, ``--before``) in the store's form; a bad one is a
    :class:`UserError` naming the option."""
    try:
        return timestamp(value, field=name)
    except Invalid as e:
        raise UserError(f"--{name}: {e}", hint="use a date like 2026-01-31 or an ISO-8601 time") from None
