"""The feedback store: logged answers, the feedback on them, and which releases trained on them.

The store owns its schema and every SQL statement over its tables; other modules ask through
:class:`FeedbackBackend` (``base``), which :class:`FeedbackStore` (SQLite, ``sqlite``)
implements. Modules: ``schema`` (tables, migrations), ``values`` (what a field accepts and how it
is stored), ``queries`` (the named reads), ``rows`` (streamed rows), ``importer`` (JSONL line
shapes), ``staged`` (the parallel import), ``sqlite`` (the store itself).

Names are loaded on first use, so importing this package costs nothing until a store is used.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "FeedbackBackend": "base",
    "FeedbackStore": "sqlite",
    "StoreRows": "rows",
    "ImportReader": "importer",
    "ImportResult": "importer",
    "ImportCounts": "importer",
    "VersionAggregates": "queries",
    "LatencyRanks": "queries",
    "Invalid": "values",
    "record_row": "values",
    "feedback_values": "values",
    "SEVERITIES": "values",
    "CRITICAL_SEVERITIES": "values",
    "MAX_TOKENS": "values",
    "ROW_KEYS": "values",
}
__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:
    from .base import FeedbackBackend
    from .importer import ImportCounts, ImportReader, ImportResult
    from .queries import LatencyRanks, VersionAggregates
    from .rows import StoreRows
    from .sqlite import FeedbackStore
    from .values import CRITICAL_SEVERITIES, MAX_TOKENS, ROW_KEYS, SEVERITIES, Invalid, feedback_values, record_row


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value
