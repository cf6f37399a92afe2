"""Feedback rows -> clean, hashed, reproducible training sets.

``build(rows, rules)`` turns logged predictions with their feedback into training examples:

* rating >= ``min_rating``, thumbs up, or ``quality_score >= quality_threshold``: the
  logged answer is kept as is (source ``kept``);
* rating <= ``max_negative_rating``, thumbs down, or ``hallucinated`` *with* a non-empty
  correction: the correction replaces the answer (source ``corrected``; these rows also
  form the corrections set a PATCH release trains on);
* everything else is skipped and counted by reason (see ``SKIP_REASONS``).

A negative signal wins over a positive one (a thumbs-up answer flagged as hallucinated is
never trained on as is); the rule is :func:`cl_release.data.rules.classify`. PII is redacted
before anything is hashed or written; near-identical examples (case and whitespace folded)
are deduplicated keeping the newest row. The output is sorted by (created_at, id) and
serialised as canonical JSON, so the same rows give the same bytes whatever order they
arrive in; the manifest records the SHA-256 of those bytes.

Rows are plain dicts as ``FeedbackStore.rows()`` yields them; any iterable works. Given
``FeedbackStore.rows()`` itself, ``build`` reads the store directly instead
(:mod:`cl_release.data.shards`): SQLite picks out the rows that can become examples, and
only those come back, as tuples, in output order; a large store is read in created_at
ranges by one process per core. The result is the same to the byte.

The pieces: :mod:`~cl_release.data.rules` (the rules), :mod:`~cl_release.data.examples`
(the one row loop, serialising, :class:`BuildResult`), :mod:`~cl_release.data.shards` (the
store build); this module holds what callers use, and re-exports the public names of the
other three.
"""

from __future__ import annotations

import datetime as _dt
import re
from pathlib import Path
from typing import Any, Iterable

from .examples import BadValue, BuildResult, finish, gc_paused, read_entries
from .formats import FORMATS, iter_jsonl, read_records
from .rules import CORRECTED, KEPT, ExtractionRules, redact, rules_from_project
from .shards import store_build
from ..errors import DataError, UserError
from ..files import atomic_write_bytes, atomic_write_json
from ..timeutil import normalize_time

__all__ = [
    "CORRECTED", "DEFAULT_OUT_DIR", "FORMATS", "KEPT", "BuildResult", "ExtractionRules", "build",
    "build_project", "corrections_only", "corrections_path", "extract_since", "extract_unused", "feedback_rows",
    "manifest_path", "redact", "release_feedback", "resolve_since", "rules_from_project", "validate_data_file",
    "within", "write_build",
]

DEFAULT_OUT_DIR = "outputs/data"  # git-ignored: a build is for inspection, release builds its own


def build(rows: Iterable[dict[str, Any]], rules: ExtractionRules | None = None, fmt: str | None = None, *,
          workers: int | None = None) -> BuildResult:
    """Extract, redact, dedupe, sort and format ``rows``; deterministic to the byte.

    ``rows`` from ``FeedbackStore.rows(...)`` (unread, without ``limit``) are read through
    the store's SQL, with the same result (bench/RESULTS-data.md). The store build does not
    parse ``metadata`` (the build never uses it), nor the ``input`` of rows the rules skip.
    It reads a large store (:data:`PARALLEL_BUILD_RECORDS` records or more) in ``workers``
    processes at once, each taking one shard of the records (default: one per core, at
    most :data:`MAX_BUILD_WORKERS`; 1: none), with the same result to the byte
    (``result.shards`` says how many shards were read; 0: the rows were read one by one).
    """
    rules = rules or ExtractionRules()
    fmt = fmt or rules.format
    if fmt not in FORMATS:
        raise UserError(f"unknown format {fmt!r}", hint=f"use one of {', '.join(FORMATS)}")
    if workers is not None and workers < 1:
        raise UserError(f"workers must be at least 1, got {workers}")
    with gc_paused():
        result = store_build(rows, rules, fmt, workers)
        if result is not None:
            return result
        try:
            part = read_entries(rows, rules)
        except BadValue as e:
            store = getattr(rows, "store", None)
            raise DataError(
                getattr(store, "path", "feedback rows"), f"record {e.rid!r}: {e.value!r} is not a number",
                field=e.field, hint="fix or delete the record's feedback; cl-release only stores numbers there",
            ) from None
        return finish(part, rules, fmt)


def corrections_only(result: BuildResult) -> BuildResult:
    """The corrections of ``result`` as a build of their own (a PATCH release's data)."""
    m = result.manifest
    skipped = dict(m["skipped"])
    skipped["not_a_correction"] = m["sources"][KEPT]
    manifest = {
        **m,
        "examples": m["corrections"]["examples"],
        "bytes": len(result.corrections_data),
        "sha256": m["corrections"]["sha256"],
        "sources": {KEPT: 0, CORRECTED: m["corrections"]["examples"]},
        "skipped": dict(sorted(skipped.items())),
        "record_ids": list(m["corrections"]["record_ids"]),
        "corrections_only": True,
    }

    def make() -> tuple[list, list]:
        corrections = list(result.corrections)
        return corrections, corrections

    patch = BuildResult.deferred(make, manifest, result.corrections_data, result.corrections_data)
    patch.shards = result.shards
    return patch


# ---------------------------------------------------------------- time windows


def within(rows: Iterable[dict[str, Any]], since: str | None = None, until: str | None = None):
    """Rows as ``FeedbackStore.rows`` selects them: created (or given feedback) at or after
    ``since``, created before ``until`` (normalized times)."""
    for row in rows:
        if not isinstance(row, dict):
            yield row  # counted as invalid_row by build
            continue
        created = normalize_time(row["created_at"]) if row.get("created_at") else ""
        rated = normalize_time(row["feedback_at"]) if row.get("feedback_at") else ""
        if (since is None or created >= since or rated >= since) and (until is None or created < until):
            yield row


def extract_since(
    store,
    since: str | _dt.datetime | None,
    rules: ExtractionRules | None = None,
    *,
    bump: str = "minor",
    until: str | _dt.datetime | None = None,
) -> BuildResult:
    """New data for a release whose parent was released at ``since``.

    MINOR (and MAJOR): every usable row recorded since the parent. PATCH: only the
    corrections since the parent (``corrections_only``). ``store`` is anything with
    ``rows(since=..., until=...)`` (the FeedbackStore).
    """
    _check_bump(bump)
    s = normalize_time(since) if since is not None else None
    u = normalize_time(until) if until is not None else None
    return _release_build(store.rows(since=s, until=u), rules, bump, {"since": s, "until": u})


def extract_unused(
    store,
    used_by: Iterable[str],
    rules: ExtractionRules | None = None,
    *,
    bump: str = "minor",
    until: str | _dt.datetime | None = None,
) -> BuildResult:
    """New data for a release built on the lineage ``used_by`` (its versions, root first):
    every usable row none of those versions trained on (the store's release marks), whenever
    it was logged. PATCH: only the corrections among them (``corrections_only``).

    Selecting by marks, not by time, trains each row once per lineage: rows logged before a
    patch that only took corrections stay new for the next MINOR, and after a rollback the
    rows only an abandoned branch trained on are new again.
    """
    _check_bump(bump)
    versions = list(used_by)
    u = normalize_time(until) if until is not None else None
    return _release_build(store.rows(until=u, unused_by=versions), rules, bump, {"unused_by": versions, "until": u})


def _check_bump(bump: str) -> None:
    if bump not in ("major", "minor", "patch"):
        raise UserError(f"unknown bump {bump!r}", hint="use major, minor or patch")


def _release_build(rows: Iterable[dict[str, Any]], rules: ExtractionRules | None, bump: str,
                   query: dict[str, Any]) -> BuildResult:
    """``build`` of a release's rows: a PATCH takes only the corrections; the manifest
    records the query (then the bump)."""
    result = build(rows, rules)
    if bump == "patch":
        result = corrections_only(result)
    result.manifest["query"] = {**query, "bump": bump}
    return result


# ---------------------------------------------------------------- writing


def manifest_path(out: Path) -> Path:
    return out.with_name(out.name + ".manifest.json")


def corrections_path(out: Path) -> Path:
    stem = out.name[: -len(".jsonl")] if out.name.endswith(".jsonl") else out.name
    return out.with_name(stem + ".corrections.jsonl")


def write_build(result: BuildResult, out_path: str | Path, *, write_corrections: bool = True) -> dict[str, Path]:
    """Write the examples, the corrections (if any) and ``<out>.manifest.json`` atomically.

    Each file is replaced atomically; the manifest is written last, so a manifest always
    describes complete data files. Returns the paths written.
    """
    out = Path(out_path)
    paths = {"data": out, "manifest": manifest_path(out)}
    manifest = dict(result.manifest)
    manifest["path"] = out.name
    # the count, not ``result.corrections``: that would build every example's dict (seconds at 1M)
    if write_corrections and manifest["corrections"]["examples"] and not manifest.get("corrections_only"):
        cpath = corrections_path(out)
        atomic_write_bytes(cpath, result.corrections_data)
        manifest["corrections"] = {**manifest["corrections"], "path": cpath.name}
        paths["corrections"] = cpath
    atomic_write_bytes(out, result.data)
    atomic_write_json(paths["manifest"], manifest)
    return paths


# ---------------------------------------------------------------- the project's feedback


def resolve_since(project, text: str | None) -> str | None:
    """``--since``: a date/time, or a release version (its registry created_at)."""
    if text is None:
        return None
    if re.fullmatch(r"v?\d+\.\d+\.\d+", text.strip()):
        from ..registry import Registry

        return normalize_time(Registry(project.root).get(text)["created_at"])
    return normalize_time(text)


def feedback_rows(project, *, since: str | None = None, from_jsonl: Path | None = None):
    """Rows from ``from_jsonl`` (one feedback row per line) or the project's feedback store."""
    if from_jsonl is not None:
        rows = (obj for _, obj in iter_jsonl(from_jsonl, display=project.rel(from_jsonl)))
        return within(rows, since)
    path = project.feedback_path
    if not path.is_file():
        raise UserError(
            f"no feedback store at {project.rel(path)}",
            hint="log predictions and feedback first, or pass --from-jsonl FILE",
        )
    from ..store.sqlite import FeedbackStore  # written by the feedback module; imported lazily

    return FeedbackStore(path).rows(since=since)


def release_feedback(project, used_by: Iterable[str], *, bump: str, until: str | _dt.datetime) -> BuildResult | None:
    """What a release built on the lineage ``used_by`` takes from the project's feedback store
    (``extract_unused`` with the project's rules, chat format); None without a store. The one
    query behind ``plan`` and ``release`` and behind ``status``'s counts, so they agree."""
    path = project.feedback_path
    if not path.is_file():
        return None
    from ..store.sqlite import FeedbackStore  # written by the feedback module; imported lazily

    store = FeedbackStore(path)
    try:
        return extract_unused(store, used_by, rules_from_project(project, format="messages"), bump=bump, until=until)
    finally:
        store.close()


def build_project(
    project,
    *,
    since: str | None = None,
    out: Path | None = None,
    fmt: str | None = None,
    redact: bool | None = None,
    from_jsonl: Path | None = None,
    workers: int | None = None,
) -> tuple[BuildResult, dict[str, Path]]:
    """``cl-release data build``: rules from cl-release.yaml, rows from the store, files written.
    ``workers``: processes reading a large store (see :func:`build`).

    Default output: ``outputs/data/<sha256>.jsonl`` (content-addressed like snapshots, and
    git-ignored: ``release`` builds its own data and would refuse a dirty repository).
    """
    off = {"redact_patterns": ()} if redact is False else {}  # --no-redact: no redaction at all
    rules = rules_from_project(project, format=fmt, redact_pii=redact, **off)
    result = build(feedback_rows(project, since=resolve_since(project, since), from_jsonl=from_jsonl), rules,
                   workers=workers)
    if not result.manifest["examples"]:
        skipped = ", ".join(f"{k} {v}" for k, v in result.manifest["skipped"].items()) or "no rows"
        raise UserError(
            f"no training examples in the feedback ({skipped})",
            hint="collect ratings or corrections, or widen --since",
        )
    if out is None:
        out = project.root / DEFAULT_OUT_DIR / f"{result.sha256}.jsonl"
    return result, write_build(result, out)


# ---------------------------------------------------------------- validating files

def validate_data_file(path: Path, fmt: str = "messages", *, display: str | None = None,
                       max_chars: int | None = None) -> int:
    """Check every row of a training file (``fmt`` in FORMATS) or a regression suite (``suite``).

    ``max_chars``: the per-example size limit (``datasets.max_example_chars``); for a suite it
    bounds each test's prompt."""
    if fmt == "suite":
        from ..eval.suite import suite_rows  # the one suite parser the runner itself uses

        return len(suite_rows(Path(path), display=display, max_chars=max_chars))
    return len(read_records(Path(path), fmt, display=display, max_chars=max_chars))
