"""Every read of the feedback tables, by name: what other modules ask the store.

Each function takes an open SQLite connection and plain values (times in the store's form,
thresholds such as ``min_rating`` from the caller's rules) and returns plain data;
:class:`~cl_release.store.sqlite.FeedbackStore` calls them with its connection. The SQL
fragments here (the latest feedback of a record, a record's quality) are written once and
shared by the queries that need them.
"""

from __future__ import annotations

import sqlite3
from typing import Any, Iterable, NamedTuple, Sequence

import orjson

from .values import CRITICAL_SEVERITIES, RATINGS, ROW_KEYS

IN_CHUNK = 500  # ids per ``IN (...)`` list (SQLite allows 999 parameters by default)


def latest_feedback(before: bool = False) -> str:
    """The join of a record ``r`` with its latest feedback row as ``f`` (by ``created_at``, then
    row id); ``before``: the latest given before a time (one ``?`` parameter)."""
    given = " AND f2.created_at < ?" if before else ""
    return ("feedback f ON f.id = (SELECT f2.id FROM feedback f2 WHERE f2.request_id = r.id"
            f"{given} ORDER BY f2.created_at DESC, f2.id DESC LIMIT 1)")


LATEST = latest_feedback()
SELECT_ROWS = (  # the columns of ROW_KEYS, in order
    "SELECT r.id, r.created_at, r.input, r.output, r.model_version, r.latency_ms, r.tokens,"
    " r.quality_score, r.metadata, f.rating, f.thumbs, f.correction, f.notes, f.hallucinated,"
    " f.error_tag, f.severity, f.annotator, f.created_at, r.logged_version FROM records r LEFT JOIN " + LATEST
)
# Quality of one answer, 0..1: its latest rating mapped onto 0..1; else the record's
# quality_score; else thumbs (up 1, down 0); else NULL.
QUALITY = (
    f"CASE WHEN f.rating IS NOT NULL THEN (f.rating - {RATINGS[0]}) / {float(RATINGS[1] - RATINGS[0])}"
    " WHEN r.quality_score IS NOT NULL THEN r.quality_score"
    " WHEN f.thumbs IN (-1, 1) THEN (f.thumbs + 1) / 2.0 END"
)
_CRITICAL = ", ".join(f"'{s}'" for s in CRITICAL_SEVERITIES)  # fixed names, no user text


def row_dict(t: tuple) -> dict[str, Any]:
    """A row of :data:`SELECT_ROWS` as the dict ``FeedbackStore.rows`` yields (JSON parsed)."""
    d = dict(zip(ROW_KEYS, t))
    d["input"] = orjson.loads(d["input"])
    d["metadata"] = orjson.loads(d["metadata"]) if d["metadata"] else {}
    if d["hallucinated"] is not None:
        d["hallucinated"] = bool(d["hallucinated"])
    return d


def _marks(n: int) -> str:
    return ", ".join("?" * n)


def by_ids(conn: sqlite3.Connection, sql: str, ids: Iterable[str]) -> Iterable[tuple]:
    """Rows of ``sql`` (its ``{ids}`` a placeholder list) for the distinct ``ids``, a chunk at a time."""
    unique = list(dict.fromkeys(ids))
    for i in range(0, len(unique), IN_CHUNK):
        part = unique[i : i + IN_CHUNK]
        yield from conn.execute(sql.format(ids=_marks(len(part))), part)


def _summed(rows: Iterable[tuple]) -> dict[Any, int]:
    out: dict[Any, int] = {}
    for key, n in rows:
        out[key] = out.get(key, 0) + n
    return out


# ---------------------------------------------------------------- one record, a few records


def get(conn: sqlite3.Connection, request_id: str) -> dict[str, Any] | None:
    t = conn.execute(SELECT_ROWS + " WHERE r.id = ?", (request_id,)).fetchone()
    return row_dict(t) if t else None


def stored_answers(conn: sqlite3.Connection, ids: Iterable[str]) -> dict[str, tuple[str, str]]:
    """Request id -> (input as stored, output) of the stored ones among ``ids``."""
    return {rid: (input_, output) for rid, input_, output in
            by_ids(conn, "SELECT id, input, output FROM records WHERE id IN ({ids})", ids)}


def missing(conn: sqlite3.Connection, ids: Iterable[str]) -> list[str]:
    """The distinct ``ids`` with no record, in the given order."""
    unique = list(dict.fromkeys(ids))
    found = {r[0] for r in by_ids(conn, "SELECT id FROM records WHERE id IN ({ids})", unique)}
    return [i for i in unique if i not in found]


def supersedes(conn: sqlite3.Connection, ids: Iterable[str]) -> dict[str, list[str]]:
    sql = f"SELECT r.id, f.supersedes FROM records r LEFT JOIN {LATEST} WHERE r.id IN ({{ids}}) AND f.supersedes IS NOT NULL"
    return dict(sorted((rid, orjson.loads(v)) for rid, v in by_ids(conn, sql, ids)))


def latest_supersedable(conn: sqlite3.Connection, request_id: str) -> tuple[int, str | None] | None:
    """(row id, correction) of the latest feedback on ``request_id``, or None."""
    return conn.execute("SELECT id, correction FROM feedback WHERE request_id = ? ORDER BY created_at DESC, id DESC"
                        " LIMIT 1", (request_id,)).fetchone()


def severities(conn: sqlite3.Connection, ids: Iterable[str]) -> dict[str | None, int]:
    sql = f"SELECT f.severity, count(*) FROM records r LEFT JOIN {LATEST} WHERE r.id IN ({{ids}}) GROUP BY f.severity"
    return _summed(by_ids(conn, sql, ids))


def marks(conn: sqlite3.Connection, ids: Iterable[str]) -> dict[str, int]:
    sql = "SELECT version, count(*) FROM release_usage WHERE request_id IN ({ids}) GROUP BY version"
    return dict(sorted(_summed(by_ids(conn, sql, ids)).items()))


def usage(conn: sqlite3.Connection, versions: Sequence[str] | None) -> dict[str, int]:
    sql = "SELECT version, count(*) FROM release_usage"
    if versions is not None:
        sql += f" WHERE version IN ({_marks(len(versions))})" if versions else " WHERE 0"
    return dict(conn.execute(sql + " GROUP BY version ORDER BY version", versions or []).fetchall())


def used_by(conn: sqlite3.Connection, version: str) -> dict[str, str]:
    cur = conn.execute("SELECT request_id, role FROM release_usage WHERE version = ? ORDER BY request_id", (version,))
    return dict(cur.fetchall())


# ---------------------------------------------------------------- the whole store


def count(conn: sqlite3.Connection) -> int:
    return conn.execute("SELECT count(*) FROM records").fetchone()[0]


def size_hint(conn: sqlite3.Connection) -> int:
    """At most how many records there are (the largest rowid; instant)."""
    return conn.execute("SELECT max(rowid) FROM records").fetchone()[0] or 0


SINCE = "(r.created_at >= ? OR r.id IN (SELECT request_id FROM feedback WHERE created_at >= ?))"  # 2 params


def stats(conn: sqlite3.Connection, *, since: str | None, max_negative_rating: int) -> dict[str, Any]:
    """``FeedbackStore.stats``: per model version and in total."""
    where, params = (f" WHERE {SINCE}", [since, since]) if since is not None else ("", [])
    sql = (
        "SELECT r.model_version, count(*), count(f.id), avg(f.rating), count(f.rating),"
        " sum(f.rating <= ? OR f.thumbs = -1), sum(f.hallucinated = 1),"
        " sum(f.correction IS NOT NULL AND f.correction != ''),"
        f" sum(f.severity IN ({_CRITICAL}))"
        f" FROM records r LEFT JOIN {LATEST}{where} GROUP BY r.model_version ORDER BY r.model_version"
    )
    per = {}
    for mv, *vals in conn.execute(sql, [max_negative_rating, *params]):
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
    out["since"] = since
    out["by_model_version"] = per
    return out


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


# ---------------------------------------------------------------- windows of answers (triggers, A/B tests)


class VersionAggregates(NamedTuple):
    """Sums over the answers of one model version in a window, each with its latest feedback
    given before the window's end (what ``decide.triggers.Metrics`` is built from)."""

    records: int = 0
    feedback: int = 0  # answers with feedback
    quality_n: int = 0  # answers with a quality (see QUALITY)
    quality_sum: float = 0.0
    quality_sq: float = 0.0
    opinions: int = 0  # answers with a rating or thumbs
    positive: int = 0  # rating >= min_rating or thumbs up
    negative: int = 0  # rating <= max_negative_rating, thumbs down or hallucinated
    latency_n: int = 0
    latency_sum: float = 0.0


def _window(since: str | None, until: str, versions: Sequence[str] | None,
            include_unversioned: bool = False) -> tuple[str, list[Any]]:
    """WHERE terms over ``r`` for answers created in [since, until) by ``versions`` (None: any)."""
    where, params = ["r.created_at < ?"], [until]
    if since is not None:
        where.append("r.created_at >= ?")
        params.append(since)
    if versions is not None:
        cond = f"r.model_version IN ({_marks(len(versions))})" if versions else "0"
        if include_unversioned:
            cond = f"({cond} OR r.model_version IS NULL)"
        where.append(cond)
        params += versions
    return " AND ".join(where), params


def version_aggregates(conn: sqlite3.Connection, *, since: str | None, until: str, versions: Sequence[str] | None,
                       include_unversioned: bool, min_rating: int,
                       max_negative_rating: int) -> dict[str | None, VersionAggregates]:
    """Per ``model_version`` (None: unversioned answers): :class:`VersionAggregates` over the
    answers created in [since, until) of ``versions`` (None: all; ``include_unversioned``:
    and those without a version), each with its latest feedback given before ``until``."""
    where, params = _window(since, until, versions, include_unversioned)
    sql = (
        "SELECT model_version, count(*), count(fid), count(q), total(q), total(q * q), total(opinion),"
        " total(positive), total(negative), count(latency_ms), total(latency_ms) FROM"
        f" (SELECT r.model_version, r.latency_ms, f.id AS fid, {QUALITY} AS q,"
        " (f.rating IS NOT NULL OR f.thumbs IN (-1, 1)) AS opinion, (f.rating >= ? OR f.thumbs = 1) AS positive,"
        " (f.rating <= ? OR f.thumbs = -1 OR f.hallucinated = 1) AS negative"
        f" FROM records r LEFT JOIN {latest_feedback(before=True)} WHERE {where})"
        " GROUP BY model_version"
    )
    out: dict[str | None, VersionAggregates] = {}
    for mv, records, fb, qn, qs, qq, op, pos, neg, ln, ls in conn.execute(
            sql, [min_rating, max_negative_rating, until, *params]):
        out[mv] = VersionAggregates(records, fb, qn, qs, qq, int(op), int(pos), int(neg), ln, ls)
    return out


def answer_flags(conn: sqlite3.Connection, *, since: str | None, until: str,
                 versions: Sequence[str]) -> dict[str, dict[str, int]]:
    """Per version: answers created in [since, until) that any feedback row given before
    ``until`` marks as an error (a non-empty ``error_tag``) or as critical (severity in
    :data:`~cl_release.store.values.CRITICAL_SEVERITIES`). ``{version: {"errors",
    "critical"}}``; a version without such answers is absent."""
    where, params = _window(since, until, versions)
    sql = ("SELECT r.model_version,"
           " count(DISTINCT CASE WHEN f.error_tag IS NOT NULL AND trim(f.error_tag) != '' THEN r.id END),"
           f" count(DISTINCT CASE WHEN f.severity IN ({_CRITICAL}) THEN r.id END)"
           " FROM records r JOIN feedback f ON f.request_id = r.id AND f.created_at < ?"
           f" WHERE {where} GROUP BY r.model_version")
    return {mv: {"errors": int(e), "critical": int(c)} for mv, e, c in conn.execute(sql, [until, *params])}


def critical_feedback(conn: sqlite3.Connection, *, since: str | None, until: str) -> dict[str, int]:
    """Feedback rows flagged critical or safety given in [since, until): with and without a correction."""
    sql = ("SELECT total(correction IS NOT NULL AND trim(correction) != ''), count(*) FROM feedback"
           f" WHERE severity IN ({_CRITICAL}) AND created_at < ?" + (" AND created_at >= ?" if since else ""))
    with_c, n = conn.execute(sql, [until] + ([since] if since else [])).fetchone()
    return {"with_correction": int(with_c), "without_correction": int(n - with_c)}


class LatencyRanks:
    """Order statistics of the latencies of one version's answers created in [since, until):
    ``at(k)`` is the k-th smallest (1-based), read from the store when asked (a quantile's
    interval needs two or three of them, not the whole sample)."""

    def __init__(self, conn: sqlite3.Connection, *, since: str | None, until: str, version: str):
        self._conn = conn
        where, self._params = _window(since, until, [version])
        self._sql = (f"SELECT r.latency_ms FROM records r WHERE {where} AND r.latency_ms IS NOT NULL"
                     " ORDER BY r.latency_ms LIMIT 1 OFFSET ?")
        self._cache: dict[int, float] = {}

    def at(self, k: int) -> float:
        """The k-th smallest latency; :class:`IndexError` when there are fewer than ``k``."""
        if k not in self._cache:
            row = self._conn.execute(self._sql, [*self._params, k - 1]).fetchone() if k >= 1 else None
            if row is None:
                raise IndexError(f"no latency of rank {k}")
            self._cache[k] = float(row[0])
        return self._cache[k]
