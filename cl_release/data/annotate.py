"""Expert review of logged answers: a stratified CSV sample out, expert ratings back in, and an
interactive review loop.

The teams' practice: every two weeks experts annotate ~50 answers, about 30% known errors,
30% low-confidence answers and the rest random. Expert judgements are stored as ordinary
feedback rows with the expert's name in ``annotator``, so the latest one wins.
"""

from __future__ import annotations

import csv
import io
import random
from dataclasses import dataclass
from datetime import date, datetime
from pathlib import Path
from typing import IO, Any, Callable

from ..errors import DataError, UserError
from ..store.sqlite import FeedbackStore, Invalid, feedback_values
from ..files import atomic_write_text

CSV_COLUMNS = ("id", "stratum", "input", "output", "rating", "correction", "notes", "annotator")
ERROR_SHARE = 0.3
LOW_CONFIDENCE_SHARE = 0.3
REVIEW_ANNOTATOR = "review"
_OPTIONAL_COLUMNS = ("hallucinated", "severity", "error_tag")


def _render_input(value: Any) -> str:
    """Chat messages as ``role: content`` lines, a plain prompt as is."""
    if isinstance(value, list):
        return "\n".join(f"{m.get('role')}: {m.get('content')}" for m in value)
    return str(value)


# ---------------------------------------------------------------- stratified sample


def pick_sample(store: FeedbackStore, *, n: int = 50, seed: int = 0) -> list[tuple[str, dict[str, Any]]]:
    """Choose ``n`` answers not yet judged by an expert: (stratum, row) pairs.

    Strata: ``error`` (latest feedback rating ≤ 2, thumbs down or hallucinated; ~30%),
    ``low_confidence`` (lowest ``quality_score``; ~30%), ``random`` (the rest). A stratum
    short of candidates leaves its places to ``random``. The same store and seed give the
    same sample.
    """
    if n < 1:
        raise UserError(f"sample size must be at least 1, got {n}")
    errors: list[str] = []
    scored: list[tuple[float, str]] = []
    others: list[str] = []
    for row in store.rows():  # keep ids only: the store may hold millions of answers
        if row["annotator"]:  # an expert already judged it
            continue
        if (row["rating"] is not None and row["rating"] <= 2) or row["thumbs"] == -1 or row["hallucinated"]:
            errors.append(row["id"])
        elif row["quality_score"] is not None:
            scored.append((row["quality_score"], row["id"]))
        else:
            others.append(row["id"])
    rng = random.Random(seed)
    errors.sort()
    chosen = [("error", i) for i in rng.sample(errors, min(len(errors), round(n * ERROR_SHARE)))]
    scored.sort()
    n_low = min(len(scored), round(n * LOW_CONFIDENCE_SHARE))
    chosen += [("low_confidence", i) for _, i in scored[:n_low]]
    taken = {i for _, i in chosen}
    rest = sorted([i for i in errors if i not in taken] + [i for _, i in scored[n_low:]] + others)
    chosen += [("random", i) for i in rng.sample(rest, min(len(rest), n - len(chosen)))]
    picked = [(stratum, store.get(i)) for stratum, i in chosen]
    return picked


def export_sample(store: FeedbackStore, out: str | Path | IO[str], *, n: int = 50, seed: int = 0) -> dict[str, int]:
    """Write a stratified sample (see :func:`pick_sample`) as CSV for experts to fill in.

    Columns: id, stratum, input, output, rating, correction, notes, annotator; experts fill
    the last four. A path is replaced atomically. Returns the count per stratum.
    """
    picked = pick_sample(store, n=n, seed=seed)
    buf = io.StringIO(newline="")
    writer = csv.writer(buf)
    writer.writerow(CSV_COLUMNS)
    counts: dict[str, int] = {"error": 0, "low_confidence": 0, "random": 0}
    for stratum, row in picked:
        writer.writerow([row["id"], stratum, _render_input(row["input"]), row["output"] or "", "", "", "", ""])
        counts[stratum] += 1
    if isinstance(out, (str, Path)):
        atomic_write_text(out, buf.getvalue())
    else:
        out.write(buf.getvalue())
    return counts


# ---------------------------------------------------------------- expert CSV back in


def _parse_bool(text: str, field: str) -> bool:
    t = text.strip().lower()
    if t in ("1", "true", "yes", "y"):
        return True
    if t in ("0", "false", "no", "n"):
        return False
    raise Invalid(f"expected yes or no, got {text!r}", field)


def import_csv(store: FeedbackStore, path: str | Path, *, default_annotator: str = "expert") -> int:
    """Store the experts' judgements from a CSV made by :func:`export_sample`.

    A row with rating, correction and notes all empty is skipped. Ratings are 1-5; an empty
    annotator becomes ``default_annotator``. Optional columns hallucinated, severity and
    error_tag are read when present. Any bad row raises :class:`DataError` with its line
    number, and then nothing is written. Returns the number of feedback rows stored.
    """
    path = Path(path)
    try:
        f = open(path, encoding="utf-8-sig", newline="")
    except OSError as e:
        raise DataError(path, f"cannot read: {e.strerror}") from None
    rows: list[dict[str, Any]] = []
    lines: list[int] = []
    with f:
        reader = csv.DictReader(f)
        missing = [c for c in ("id", "rating", "correction", "notes", "annotator") if c not in (reader.fieldnames or [])]
        if missing:
            raise DataError(path, f"missing column {missing[0]!r}", line=1, hint="export a sample with 'cl-release annotate export'")
        line = reader.line_num + 1
        try:
            for rec in reader:
                if None in rec:
                    raise Invalid("more fields than columns (check the quoting)")
                values = {k: (rec.get(k) or "").strip() for k in ("rating", "correction", "notes")}
                if any(values.values()):
                    rows.append(_csv_feedback(rec, values, default_annotator))
                    lines.append(line)
                line = reader.line_num + 1
        except Invalid as e:
            raise DataError(path, str(e), line=line, field=e.field) from None
        except csv.Error as e:
            raise DataError(path, f"malformed CSV: {e}", line=reader.line_num) from None
    missing_ids = set(store.missing(r["request_id"] for r in rows))
    for r, ln in zip(rows, lines):
        if r["request_id"] in missing_ids:
            raise DataError(path, f"no logged answer with id {r['request_id']!r}", line=ln, field="id")
    return store.feedback_many(rows)


def _csv_feedback(rec: dict[str, str], values: dict[str, str], default_annotator: str) -> dict[str, Any]:
    request_id = (rec.get("id") or "").strip()
    if not request_id:
        raise Invalid("missing id", "id")
    rating: Any = values["rating"] or None
    if rating is not None:
        try:
            rating = int(rating)
        except ValueError:
            raise Invalid(f"rating must be a whole number from 1 to 5, got {rating!r}", "rating") from None
    extra: dict[str, Any] = {}
    for col in _OPTIONAL_COLUMNS:
        text = (rec.get(col) or "").strip()
        if text:
            extra[col] = _parse_bool(text, col) if col == "hallucinated" else text
    fields = feedback_values(
        rating=rating,
        correction=values["correction"] or None,
        notes=values["notes"] or None,
        annotator=(rec.get("annotator") or "").strip() or default_annotator,
        **extra,
    )
    return {"request_id": request_id, **fields}


# ---------------------------------------------------------------- interactive review


@dataclass
class ReviewSummary:
    reviewed: int = 0
    skipped: int = 0
    quit: bool = False


def review(
    store: FeedbackStore,
    *,
    since: str | datetime | date | None = None,
    model: str | None = None,
    prompt: Callable[[str], str] = input,
    echo: Callable[[str], None] = print,
    annotator: str = REVIEW_ANNOTATOR,
    page: int = 20,
) -> ReviewSummary:
    """Show each logged answer that has no feedback yet and ask for a rating.

    Answers: 1-5 (then an optional correction), ``s`` to skip, ``q`` to quit. Each rating is
    saved at once as feedback by ``annotator``, so the next session resumes with the answers
    still unrated (skipped ones come back). ``prompt`` and ``echo`` do the I/O; ``prompt``
    raising ``EOFError`` ends the session like ``q``.
    """
    summary = ReviewSummary()
    after: tuple[str, str] | None = None
    while True:
        batch = list(store.rows(since=since, model_version=model, has_feedback=False, after=after, limit=page))
        if not batch:
            break
        for row in batch:
            after = (row["created_at"], row["id"])
            echo(
                f"\n[{row['id']}] {row['created_at']} model {row['model_version'] or '?'}\n"
                f"--- input\n{_render_input(row['input'])}\n--- output\n{row['output']}"
            )
            try:
                answer = _ask_rating(prompt, echo)
                if answer == "q":
                    summary.quit = True
                    return summary
                if answer == "s":
                    summary.skipped += 1
                    continue
                correction = prompt("Correction (empty for none)").strip() or None
            except EOFError:  # input closed: stop, keeping what was saved
                summary.quit = True
                return summary
            store.feedback(row["id"], rating=answer, correction=correction, annotator=annotator)
            summary.reviewed += 1
    return summary


def _ask_rating(prompt: Callable[[str], str], echo: Callable[[str], None]) -> int | str:
    while True:
        text = prompt("Rating 1-5, s=skip, q=quit").strip().lower()
        if text in ("s", "q"):
            return text
        if text in ("1", "2", "3", "4", "5"):
            return int(text)
        echo(f"Please answer 1-5, s or q (not {text!r}).")
