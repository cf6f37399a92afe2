"""The feedback store's schema: its tables, and the named migrations that build them.

- ``records``: one row per answer, keyed by request id.
- ``feedback``: any number of rows per answer; the latest (by ``created_at``, then row id)
  is the one that counts.
- ``release_usage``: which records each release trained on, and in which role. Pruning
  never deletes those.

Only the store's own modules read or write these tables; the rest of cl-release asks the
store (:class:`cl_release.store.base.FeedbackBackend`). The schema evolves through named
migrations (sqlite-utils ``Migrations``), each applied in its own transaction together with
its bookkeeping row. Append new steps; never rename, reorder or change applied ones.
"""

from __future__ import annotations

from typing import Callable, Sequence

import sqlite_utils
from sqlite_utils.migrations import Migrations

# The name every store records its applied migrations under. It is data on users' disks, not
# a module path: it never changes when modules move.
MIGRATION_SET = "cl_release.feedback"
# Names recorded by earlier releases; a store opened with one of them is adopted (renamed).
# "cl_release.store.sqlite": written by the releases between the package move and this fix.
RENAMED_MIGRATION_SETS = ("cl_release.store.sqlite",)
APPLICATION_ID = 0x636C7266  # "clrf" in the SQLite header: this file is a cl-release feedback store

# The columns the store writes, in table order (the row tuples of ``values.record_row`` and
# ``FeedbackStore.feedback`` follow them).
RECORD_COLUMNS = (
    "id", "created_at", "input", "output", "model_version", "latency_ms", "tokens", "quality_score", "metadata",
    "logged_version",
)
FEEDBACK_COLUMNS = (
    "request_id", "created_at", "rating", "thumbs", "correction", "notes", "hallucinated", "error_tag", "severity",
    "annotator",
)


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


def adopt_renamed_sets(conn) -> int:
    """Record the migrations an earlier release wrote under a :data:`RENAMED_MIGRATION_SETS`
    name under :data:`MIGRATION_SET`, in one statement; return how many rows moved. Without
    this, such a store would look unmigrated and its first migration would fail."""
    has_table = conn.execute(
        "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = '_sqlite_migrations'").fetchone()
    if not has_table:
        return 0
    marks = ", ".join("?" * len(RENAMED_MIGRATION_SETS))
    if not conn.execute(f"SELECT 1 FROM _sqlite_migrations WHERE migration_set IN ({marks}) LIMIT 1",
                        RENAMED_MIGRATION_SETS).fetchone():
        return 0
    return conn.execute(f"UPDATE _sqlite_migrations SET migration_set = ? WHERE migration_set IN ({marks})",
                        (MIGRATION_SET, *RENAMED_MIGRATION_SETS)).rowcount  # one statement: atomic


def build_migrations(steps: Sequence[tuple[str, Callable]] | None = None) -> Migrations:
    """The migration set for ``steps`` (default: :data:`MIGRATION_STEPS`)."""
    migrations = Migrations(MIGRATION_SET)
    for name, fn in MIGRATION_STEPS if steps is None else steps:
        migrations(name=name)(fn)
    return migrations
