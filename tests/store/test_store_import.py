"""Importing JSONL logs into the store: the line shapes (``store.importer``), checked against
the store's plain value rules on generated lines, and the staged, parallel copy
(``store.staged``), checked against the import's rule stated in plain Python."""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import sqlite3
import tempfile
from pathlib import Path

import pytest

from cl_release import parallel
from cl_release.errors import DataError, UserError
from cl_release.store import schema, staged
from cl_release.store import sqlite as sqlite_store
from cl_release.store.importer import ImportReader
from cl_release.store.sqlite import FeedbackStore
from cl_release.store.values import Invalid, feedback_values, record_row


@pytest.fixture
def store(tmp_path) -> FeedbackStore:
    s = FeedbackStore(tmp_path / "deep" / "dir" / "feedback.db")
    yield s
    s.close()


@pytest.fixture
def forked(monkeypatch) -> list:
    """Let imports fork even if another test left a thread finishing; records the byte ranges
    of each import that forked workers (through the public seam ``staged.stage_forked``)."""
    monkeypatch.setattr(parallel, "can_fork", lambda: True)
    calls: list = []
    real = staged.stage_forked

    def recorded(path, ranges, *args):
        calls.append(ranges)
        return real(path, ranges, *args)

    monkeypatch.setattr(staged, "stage_forked", recorded)
    return calls


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


_BASE = {"request_id": "r", "input": "q", "output": "a", "timestamp": "2026-01-01T00:00:00Z"}


# ---------------------------------------------------------------- line shapes


def test_import_request_log_shape(store, tmp_path):
    f = write_jsonl(tmp_path / "log.jsonl", [
        {"request_id": "r1", "input": [{"role": "user", "content": "q1"}], "output": "a1",
         "metadata": {"site": "x"}, "model_version": "1.0.0", "latency_ms": 80, "timestamp": "2026-01-05T10:00:00Z",
         "user_feedback": {"rating": 2, "correction": "better", "notes": "n", "hallucinated": True}},
        {"request_id": "r2", "input": "q2", "output": "a2", "metadata": {}, "timestamp": 1767600000,
         "user_feedback": {"rating": None, "correction": None, "notes": None}},
        "",
    ])
    seen = []
    result = store.import_jsonl(f, progress=seen.append)
    assert (result.lines, result.records, result.feedback, result.duplicates) == (2, 2, 1, 0)
    assert sum(seen) == f.stat().st_size
    r1 = store.get("r1")
    assert (r1["rating"], r1["correction"], r1["hallucinated"], r1["latency_ms"]) == (2, "better", True, 80.0)
    assert r1["feedback_at"] == r1["created_at"] == "2026-01-05T10:00:00.000000Z"
    assert store.get("r2")["created_at"] == "2026-01-05T08:00:00.000000Z" and store.get("r2")["rating"] is None
    again = store.import_jsonl(f)
    assert (again.records, again.duplicates, again.feedback) == (0, 2, 0)
    assert store.stats()["feedback"] == 1


def test_import_flat_shape(store, tmp_path):
    f = write_jsonl(tmp_path / "flat.jsonl", [
        {"query": "q1", "response": "a1", "model": "0.9.0", "quality_score": 0.4, "user_feedback": 5,
         "timestamp": "2026-01-01T00:00:00"},
        {"query": "q2", "response": "a2", "model": "0.9.0", "quality_score": 0.9,
         "user_feedback": {"rating": 1, "correction": "c", "thumbs": False}},
        {"query": "q3", "response": "a3", "model": "0.9.0", "quality_score": 0.1},
    ])
    assert store.import_jsonl(f).records == 3
    rows = {r["input"]: r for r in store.rows()}
    assert (rows["q1"]["rating"], rows["q1"]["model_version"], rows["q1"]["quality_score"]) == (5, "0.9.0", 0.4)
    assert (rows["q2"]["rating"], rows["q2"]["thumbs"], rows["q2"]["correction"]) == (1, -1, "c")
    assert rows["q3"]["rating"] is None
    again = store.import_jsonl(f)  # ids are hashes of the lines: nothing new
    assert (again.records, again.feedback) == (0, 0) and store.count() == 3


@pytest.mark.parametrize(
    "bad, message",
    [
        ("{not json", "invalid JSON"),
        ('["a list"]', "expected a JSON object"),
        ('{"request_id": "x", "input": "q", "output": "a", "user_feedback": {"rating": 7}}', "user_feedback.rating"),
        ('{"request_id": "x", "input": "q", "output": "a", "timestamp": "soon"}', "ISO-8601"),
        ('{"something": "else"}', "unknown row shape"),
        ('{"input": "q", "output": "a"}', "request_id"),
    ],
)
def test_malformed_import_line_names_it_and_writes_nothing(store, tmp_path, bad, message):
    good = [{"request_id": f"g{i}", "input": "q", "output": "a", "user_feedback": {"rating": 4}} for i in range(30)]
    f = write_jsonl(tmp_path / "log.jsonl", [*good, bad, *good[:1]])
    with pytest.raises(DataError, match=message) as e:
        store.import_jsonl(f, batch=10)  # several batches flushed before the bad line
    assert "log.jsonl:31" in str(e.value)
    assert store.count() == 0 and store.stats()["feedback"] == 0


@pytest.mark.parametrize("workers", [1, 2])
def test_import_refuses_a_repeated_id_with_other_content(store, tmp_path, workers, forked):
    store.log("stored question", "stored answer", request_id="old")
    rows = [{**_BASE, "request_id": f"g{i}", "input": f"q{i}"} for i in range(40)]
    rows[30] = {**rows[3], "timestamp": "2026-02-01T00:00:00Z"}  # an identical repeat: fine
    f = write_jsonl(tmp_path / "ok.jsonl", rows)
    assert store.import_jsonl(f, batch=7, workers=workers).records == 39
    bad = write_jsonl(tmp_path / "bad.jsonl", [*rows[:25], {**rows[4], "output": "changed"}, *rows[26:]])
    fresh = FeedbackStore(tmp_path / "fresh.db")
    with pytest.raises(DataError, match=r"bad\.jsonl:26: request_id: request id 'g4' is already logged with another output"):
        fresh.import_jsonl(bad, batch=7, workers=workers)
    assert fresh.count() == 0
    again = write_jsonl(tmp_path / "again.jsonl", [{**_BASE, "request_id": "new"},
                                                   {**_BASE, "request_id": "old", "input": "stored question"}])
    with pytest.raises(DataError, match=r"again\.jsonl:2: .*'old' is already logged with another output"):
        store.import_jsonl(again)
    assert store.count() == 40 and store.get("new") is None


def test_import_missing_file(store, tmp_path):
    with pytest.raises(DataError, match="cannot read"):
        store.import_jsonl(tmp_path / "nope.jsonl")


# ---------------------------------------------------------------- the line rule, on generated lines
#
# The import checks request-log lines (shape a) inline, for speed; the rule is the store's
# ``values`` (``record_row``, ``feedback_values``). Lines are generated from known field values:
# each combination is imported and read back against the value the store keeps, and the
# inline path is compared with ``record_row`` itself on good and bad values.

ABSENT = object()  # the key is left out of the line
RECORD_VALUES = {  # field -> (value in the line, value read back)
    "input": [("q", "q"), ([{"role": "user", "content": "c é"}], [{"role": "user", "content": "c é"}])],
    "metadata": [(ABSENT, {}), (None, {}), ({}, {}), ({"k": [1, "é"], "site": "x"}, {"k": [1, "é"], "site": "x"})],
    "timestamp": [("2026-01-01T00:00:00Z", "2026-01-01T00:00:00.000000Z"),
                  ("2026-01-01T01:00:00.5+01:00", "2026-01-01T00:00:00.500000Z"),
                  ("2026-01-05", "2026-01-05T00:00:00.000000Z"),
                  (1767600000.5, "2026-01-05T08:00:00.500000Z")],
    "model_version": [(ABSENT, None), ("1.0", "1.0")],
    "latency_ms": [(ABSENT, None), (80, 80.0), (80.5, 80.5), (0, 0.0)],
    "tokens": [(ABSENT, None), (12, 12), (12.0, 12)],
    "quality_score": [(ABSENT, None), (1, 1.0), (0.25, 0.25)],
}
_NO_FEEDBACK = {k: None for k in ("rating", "thumbs", "correction", "notes", "hallucinated", "error_tag", "severity",
                                  "annotator", "feedback_at")}
FEEDBACK_VALUES = [  # user_feedback in the line -> the feedback read back ("record": at the answer's time)
    (ABSENT, None),
    ({"notes": None, "rating": None}, None),
    (4, ({"rating": 4}, "record")),
    (4.0, ({"rating": 4}, "record")),
    ({"thumbs": True, "timestamp": "2026-02-01"}, ({"thumbs": 1}, "2026-02-01T00:00:00.000000Z")),
    ({"rating": 2, "thumbs": "down", "correction": "c", "notes": "n", "hallucinated": False, "error_tag": "unit",
      "severity": "high", "annotator": "ops", "created_at": "2026-02-02T03:00:00+03:00"},
     ({"rating": 2, "thumbs": -1, "correction": "c", "notes": "n", "hallucinated": False, "error_tag": "unit",
       "severity": "high", "annotator": "ops"}, "2026-02-02T00:00:00.000000Z")),
]


def generated_lines() -> list[tuple[dict, dict]]:
    """(line, the row ``get`` returns after importing it) for every combination of
    :data:`RECORD_VALUES`, with the :data:`FEEDBACK_VALUES` in turn."""
    out = []
    names = list(RECORD_VALUES)
    for i, combo in enumerate(itertools.product(*RECORD_VALUES.values())):
        rid = f"g{i:05d}"
        line = {"request_id": rid, "output": f"a{i}"}
        want = {"id": rid, "output": f"a{i}", "logged_version": None, **_NO_FEEDBACK}
        for name, (given, kept) in zip(names, combo):
            if given is not ABSENT:
                line[name] = given
            want["created_at" if name == "timestamp" else name] = kept
        given, kept = FEEDBACK_VALUES[i % len(FEEDBACK_VALUES)]
        if given is not ABSENT:
            line["user_feedback"] = given
        if kept is not None:
            fields, at = kept
            want.update(fields, feedback_at=want["created_at"] if at == "record" else at)
        out.append((line, want))
    return out


def _outcome(fn, *args, **kwargs):
    try:
        return ("ok", fn(*args, **kwargs))
    except Invalid as e:
        return ("invalid", str(e), e.field)


def test_generated_lines_are_stored_as_the_values_rule_says(store, tmp_path):
    lines = generated_lines()
    assert len(lines) == 2 * 4 * 4 * 2 * 4 * 3 * 3
    f = write_jsonl(tmp_path / "log.jsonl", [line for line, _ in lines])
    result = store.import_jsonl(f, batch=500)
    assert (result.lines, result.records) == (len(lines), len(lines))
    assert result.feedback == sum(want["feedback_at"] is not None for _, want in lines)
    got = {row["id"]: row for row in store.rows()}
    for line, want in lines:
        assert got[want["id"]] == want, line


def _as_record_row(line: dict) -> tuple:
    """What ``record_row`` (the plain rule) makes of a request-log line's record fields."""
    fields = {k: line.get(k) for k in ("request_id", "model_version", "latency_ms", "tokens", "quality_score",
                                       "metadata")}
    return record_row(line["input"], line.get("output"), created_at=line.get("timestamp"), **fields)


BAD_VALUES = {  # field -> values the rule refuses
    "request_id": ["", 5],
    "input": [[], 3, ["x"], [{"role": "user", "content": "c"}, {"role": "user"}]],
    "output": [None, 3],
    "metadata": [[], "x"],
    "timestamp": ["2026-02-30T00:00:00Z", True, "soon"],
    "model_version": [1],
    "latency_ms": [True, "80", -1, -0.5, 1e13, float("inf")],
    "tokens": [12.5, False, -3, 1e29],
    "quality_score": ["hi", 2, float("nan")],
}
_CROSS = [(field, value) for field, values in RECORD_VALUES.items() for value, _ in values if value is not ABSENT]
_CROSS += [(field, value) for field, values in BAD_VALUES.items() for value in values]


@pytest.mark.parametrize("field, value", _CROSS, ids=[f"{f}={v!r}" for f, v in _CROSS])
def test_inline_checks_agree_with_record_row(field, value):
    line = {**_BASE, field: value}
    raw = json.dumps(line).encode()
    got = _outcome(lambda: ImportReader()(line, raw)[0])
    assert got == _outcome(_as_record_row, line)


_PAIRS = list(itertools.combinations([(f, vs[0]) for f, vs in BAD_VALUES.items()], 2))


@pytest.mark.parametrize("pair", _PAIRS, ids=[f"{a[0]}+{b[0]}" for a, b in _PAIRS])
def test_with_two_bad_fields_the_rules_first_check_wins(pair):
    line = {**_BASE, **dict(pair)}
    raw = json.dumps(line).encode()
    assert _outcome(lambda: ImportReader()(line, raw)[0]) == _outcome(_as_record_row, line)


def test_flat_lines_go_through_the_rule_and_are_keyed_by_their_hash():
    line = {"query": [{"role": "user", "content": "q"}], "response": "a", "model": "0.9", "quality_score": 0.5,
            "latency_ms": 3, "metadata": {"m": 1}, "timestamp": "2026-01-01T00:00:00Z", "user_feedback": 5}
    raw = json.dumps(line).encode() + b"\n"
    record, fb = ImportReader()(line, raw)
    rid = hashlib.sha256(raw.strip()).hexdigest()[:32]
    assert record == record_row(line["query"], "a", request_id=rid, model_version="0.9", quality_score=0.5,
                                latency_ms=3, metadata={"m": 1}, created_at="2026-01-01T00:00:00Z")
    assert fb == (rid, record[1], *feedback_values(rating=5).values())


BAD_LINES = [  # (line, the field named, the message)
    ({**_BASE, "request_id": ""}, "request_id", "request id must be a non-empty string"),
    ({"input": "q", "output": "a"}, "request_id", "missing 'request_id'"),
    ({"request_id": "r", "output": "a"}, "input", "missing 'input'"),
    ({"request_id": "r", "input": "q"}, "output", "expected the model output as a string"),
    ({**_BASE, "input": []}, "input", "expected a string or a non-empty list of chat messages"),
    ({**_BASE, "input": [{"role": "user", "content": "c"}, {"role": "user"}]}, "input",
     "message 1 must be an object with string 'role' and 'content'"),
    ({**_BASE, "metadata": "x"}, "metadata", "expected a JSON object"),
    ({**_BASE, "timestamp": "2026-02-30T00:00:00Z"}, "created_at", "not an ISO-8601 date or time: '2026-02-30T00:00:00Z'"),
    ({**_BASE, "timestamp": True}, "created_at", "expected a timestamp, got bool"),
    ({**_BASE, "model_version": 1}, "model_version", "expected a string, got int"),
    ({**_BASE, "latency_ms": "80"}, "latency_ms", "expected a number, got '80'"),
    ({**_BASE, "latency_ms": -1}, "latency_ms", "must be from 0 to 1e+12, got -1.0"),
    ({**_BASE, "tokens": 12.5}, "tokens", "expected a whole number, got 12.5"),
    ({**_BASE, "quality_score": 2}, "quality_score", "must be from 0 to 1, got 2.0"),
    ({**_BASE, "output": 3, "timestamp": "soon", "metadata": 1}, "output", "expected the model output as a string"),
    ({**_BASE, "input": 3, "timestamp": "soon"}, "created_at", "not an ISO-8601 date or time: 'soon'"),
    ({**_BASE, "user_feedback": {"rating": 9}}, "user_feedback.rating", "rating must be a whole number from 1 to 5, got 9"),
    ({**_BASE, "user_feedback": {"thumbs": 2}}, "user_feedback.thumbs", "thumbs must be up, down, true, false, -1, 0 or 1, got 2"),
    ({**_BASE, "user_feedback": {"severity": "meh"}}, "user_feedback.severity",
     "severity must be one of low, high, critical, safety, got 'meh'"),
    ({**_BASE, "user_feedback": {"rating": 2, "timestamp": "nope"}}, "user_feedback.timestamp",
     "not an ISO-8601 date or time: 'nope'"),
    ({**_BASE, "user_feedback": "good"}, "user_feedback", "expected a rating number or an object"),
    ({**_BASE, "user_feedback": True}, "user_feedback", "expected a rating number or an object"),
    ({"query": "q", "response": 1}, "output", "expected the model output as a string"),
    ({"query": "q", "response": "a", "timestamp": "soon"}, "created_at", "not an ISO-8601 date or time: 'soon'"),
    ({"something": "else"}, None, "unknown row shape: expected 'input'/'output' (request log) or 'query'/'response'"),
    (["a list"], None, "expected a JSON object, got list"),
    ("a string", None, "expected a JSON object, got str"),
    (None, None, "expected a JSON object, got NoneType"),
]


@pytest.mark.parametrize("line, field, message", BAD_LINES, ids=[str(i) for i in range(len(BAD_LINES))])
def test_a_bad_line_is_refused_naming_line_field_and_value(store, tmp_path, line, field, message):
    f = write_jsonl(tmp_path / "log.jsonl", [{**_BASE, "request_id": "ok"}, json.dumps(line), _BASE])
    with pytest.raises(DataError) as e:
        store.import_jsonl(f)
    assert (e.value.line, e.value.field) == (2, field)
    assert str(e.value) == f"{f}:2: " + (f"{field}: " if field else "") + message
    assert store.count() == 0


# ---------------------------------------------------------------- the staged copy


def _indexes(path: Path) -> dict[str, str]:
    with sqlite3.connect(path) as c:
        return dict(c.execute("SELECT name, sql FROM sqlite_master WHERE type = 'index' AND sql IS NOT NULL"))


def _varied_log(n: int) -> list[dict]:
    rows = []
    for i in range(n):
        row = {"request_id": f"id-{(i * 7919) % n:05d}", "input": [{"role": "user", "content": f"q{i}"}],
               "output": f"a{i}", "model_version": f"1.{i % 3}", "timestamp": f"2026-01-{1 + i % 28:02d}T00:00:00Z"}
        if i % 3 == 0:
            row["user_feedback"] = {"rating": 1 + i % 5, "timestamp": "2026-02-01T00:00:00Z"}
        if i % 4 == 0:
            row["user_feedback"] = {"rating": 1 + i % 4, "notes": "same time, later line"}
        rows.append(row)
    rows += [{**rows[5], "latency_ms": 7.0, "model_version": "a later repeat: the first one stays"}, rows[9], rows[12]]
    return rows


def _all_feedback(store: FeedbackStore) -> list[tuple]:
    """Every feedback row (not only the latest), per answer in insertion order."""
    return store.conn.execute(
        f"SELECT {', '.join(schema.FEEDBACK_COLUMNS)} FROM feedback ORDER BY request_id, id"
    ).fetchall()


def _all_records(store: FeedbackStore) -> list[tuple]:
    return store.conn.execute(f"SELECT {', '.join(schema.RECORD_COLUMNS)} FROM records ORDER BY id").fetchall()


def expected_import(lines: list[bytes]) -> tuple[list[tuple], list[tuple]]:
    """The import's rule over a whole file, in plain Python: each line read by the line rule;
    the first line with an id gives its record; a feedback row is stored unless the answer
    already has an identical one (all fields but the time); an answer's feedback in file order."""
    reader = ImportReader()
    records: dict[str, tuple] = {}
    feedback: dict[str, list[tuple]] = {}
    for raw in lines:
        if not raw.strip():
            continue
        record, fb = reader(json.loads(raw), raw)
        records.setdefault(record[0], record)
        if fb is not None and all(other[2:] != fb[2:] for other in feedback.get(fb[0], [])):
            feedback.setdefault(fb[0], []).append(fb)
    return sorted(records.values()), [fb for rid in sorted(feedback) for fb in feedback[rid]]


@pytest.mark.parametrize("workers", [1, 3])
def test_import_follows_the_rule_in_plain_python(tmp_path, workers, forked):
    rows = _varied_log(200)
    rows += [
        {**rows[3], "user_feedback": {"rating": 5, "notes": "same id, new feedback, another part"}},
        {**rows[3], "timestamp": "2026-03-01T00:00:00Z"},  # identical feedback, other time: stored once
        {**rows[7], "user_feedback": {"rating": 2}},
        {**rows[7], "user_feedback": {"rating": 2}},  # identical feedback twice in the file
        "",
    ]
    f = write_jsonl(tmp_path / "log.jsonl", rows)
    records, feedback = expected_import(f.read_bytes().splitlines())
    store = FeedbackStore(tmp_path / "fast.db")
    schema_indexes = _indexes_of_a_fresh_store(tmp_path)
    # many batches; with workers=3 the duplicate ids and feedback fall in other parts of the file
    first = store.import_jsonl(f, batch=7, workers=workers)
    assert _all_records(store) == records and _all_feedback(store) == feedback
    assert (first.lines, first.records, first.duplicates, first.feedback) == (207, 200, 7, len(feedback))
    again = store.import_jsonl(f, batch=7, workers=workers)
    assert (again.records, again.feedback, again.duplicates) == (0, 0, 207)
    assert _all_records(store) == records and _all_feedback(store) == feedback
    assert store.integrity_check() == "ok" and _indexes(store.path) == schema_indexes
    assert len(forked) == (2 if workers > 1 else 0)  # both imports forked three workers, or none


def _indexes_of_a_fresh_store(tmp_path: Path) -> dict[str, str]:
    fresh = FeedbackStore(tmp_path / "fresh-schema.db")
    fresh.count()
    fresh.close()
    return _indexes(fresh.path)


def _traced(store: FeedbackStore) -> list[str]:
    seen: list[str] = []
    store.conn.set_trace_callback(seen.append)
    return seen


def test_large_import_rebuilds_indexes_small_one_does_not(tmp_path):
    store = FeedbackStore(tmp_path / "f.db")
    store.count()
    schema = _indexes(store.path)
    big = write_jsonl(tmp_path / "big.jsonl", _varied_log(100))
    seen = _traced(store)
    store.import_jsonl(big, batch=10)
    assert any(s.startswith("DROP INDEX") for s in seen)  # 100 new rows into an empty table
    assert _indexes(store.path) == schema
    small = write_jsonl(tmp_path / "small.jsonl", [{**_BASE, "request_id": f"s{i}"} for i in range(5)])
    seen.clear()
    assert store.import_jsonl(small).records == 5
    assert not any("INDEX" in s for s in seen)  # 5 rows into 100: plain index inserts
    assert _indexes(store.path) == schema and store.integrity_check() == "ok"
    plan = " ".join(r[3] for r in store.conn.execute(
        "EXPLAIN QUERY PLAN SELECT * FROM records WHERE created_at > '2026' ORDER BY created_at"))
    assert "records_created_at" in plan


def test_failed_large_import_keeps_the_indexes_and_writes_nothing(tmp_path):
    store = FeedbackStore(tmp_path / "f.db")
    store.log("q", "a", request_id="kept", created_at="2026-01-01")
    schema = _indexes(store.path)
    rows = [{**_BASE, "request_id": f"g{i}", "user_feedback": {"rating": 3}} for i in range(50)]
    f = write_jsonl(tmp_path / "log.jsonl", [*rows, {**_BASE, "timestamp": "soon"}])
    seen = _traced(store)
    with pytest.raises(DataError, match="log.jsonl:51"):
        store.import_jsonl(f, batch=10)
    assert seen == []  # the bad line is found while staging: the store is never touched
    assert _indexes(store.path) == schema
    assert store.count() == 1 and store.stats()["feedback"] == 0 and store.integrity_check() == "ok"


def test_import_failing_inside_the_transaction_rolls_back_the_index_drop(tmp_path, monkeypatch):
    store = FeedbackStore(tmp_path / "f.db")
    store.log("q", "a", request_id="kept", created_at="2026-01-01")
    schema = _indexes(store.path)
    f = write_jsonl(tmp_path / "log.jsonl", [{**_BASE, "request_id": f"g{i}", "user_feedback": {"rating": 3}}
                                             for i in range(50)])
    monkeypatch.setattr(staged, "copy_feedback_sql", lambda parts: "INSERT INTO no_such_table VALUES (1)")
    seen = _traced(store)
    with pytest.raises(sqlite3.OperationalError, match="no_such_table"):
        store.import_jsonl(f, batch=10)
    assert any(s.startswith("DROP INDEX") for s in seen) and "ROLLBACK" in seen
    assert any(s.startswith("INSERT INTO main.records") for s in seen)  # records were copied, then undone
    assert _indexes(store.path) == schema
    assert store.count() == 1 and store.stats()["feedback"] == 0 and store.integrity_check() == "ok"
    assert {r[1] for r in store.conn.execute("PRAGMA database_list")} <= {"main", "temp"}  # scratch detached
    monkeypatch.undo()
    assert store.import_jsonl(f).records == 50 and store.stats()["feedback"] == 50


def test_import_waits_for_a_concurrent_writer(tmp_path):
    path = tmp_path / "f.db"
    store = FeedbackStore(path, busy_timeout=10)
    store.count()
    f = write_jsonl(tmp_path / "log.jsonl", [{**_BASE, "request_id": f"i{i}"} for i in range(30)])
    other = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    other.execute("BEGIN IMMEDIATE")
    other.execute("INSERT INTO records (id, created_at, input) VALUES ('other', '2026-01-01T00:00:00.000000Z', '\"q\"')")
    import threading
    threading.Timer(0.5, lambda: other.execute("COMMIT")).start()
    result = store.import_jsonl(f, batch=10)
    other.close()
    assert result.records == 30 and store.count() == 31 and store.integrity_check() == "ok"


# ---------------------------------------------------------------- staged, parallel import


def _lines(n: int, bad: dict[int, str] | None = None) -> list:
    """n shape-(a) lines (numbered from 1), some replaced by ``bad[line_number]``."""
    rows = [{**_BASE, "request_id": f"p{i}", "user_feedback": {"rating": 1 + i % 5}} for i in range(1, n + 1)]
    for line, text in (bad or {}).items():
        rows[line - 1] = text
    return rows


@pytest.mark.parametrize("bad_lines, reported", [({45: "{oops"}, 45), ({12: "[1]", 50: "{oops"}, 12), ({60: "{oops"}, 60)])
def test_parallel_import_numbers_the_first_bad_line_of_the_file(store, tmp_path, bad_lines, reported, forked):
    f = write_jsonl(tmp_path / "log.jsonl", _lines(60, bad_lines))
    with pytest.raises(DataError) as e:
        store.import_jsonl(f, batch=4, workers=3)  # 20 lines a part: the bad ones sit in later parts
    assert f"log.jsonl:{reported}:" in str(e.value)
    assert store.count() == 0 and store.stats()["feedback"] == 0
    assert len(forked) == 1 and len(forked[0]) == 3


def test_parallel_import_counts_blank_lines_and_reports_all_progress(store, tmp_path, forked):
    rows = _lines(40)
    rows[9:9] = ["", "   "]  # blank lines count as lines for numbering, not as records
    rows.append("{oops")
    f = write_jsonl(tmp_path / "log.jsonl", rows)
    with pytest.raises(DataError, match="log.jsonl:43: invalid JSON"):
        store.import_jsonl(f, workers=2)
    f = write_jsonl(tmp_path / "log.jsonl", rows[:-1])
    seen: list[int] = []
    result = store.import_jsonl(f, batch=3, workers=2, progress=seen.append)
    assert (result.lines, result.records, result.feedback) == (40, 40, 40)
    assert sum(seen) == f.stat().st_size and all(n > 0 for n in seen)
    assert len(forked) == 2


@pytest.mark.parametrize("parts", [1, 2, 3, 7, 50])
def test_split_lines_covers_the_file_at_line_starts(tmp_path, parts):
    data = b"".join(b"x" * n + b"\n" for n in (0, 3, 40, 1, 0, 200, 5)) + b"no newline at the end"
    f = tmp_path / "lines"
    f.write_bytes(data)
    with open(f, "rb") as fh:
        ranges = staged.split_lines(fh, len(data), parts)
    assert ranges[0][0] == 0 and ranges[-1][1] == len(data) and len(ranges) <= parts
    assert all(a < b for a, b in ranges) and all(b == a2 for (_, b), (a2, _) in zip(ranges, ranges[1:]))
    assert all(a == 0 or data[a - 1 : a] == b"\n" for a, _ in ranges)


def test_import_workers_choice(monkeypatch):
    monkeypatch.setattr(parallel, "can_fork", lambda: True)
    monkeypatch.setattr(parallel, "cores", lambda: 4)
    assert staged.import_workers(1000, None) == 1  # a small file is parsed in this process
    assert staged.import_workers(staged.IMPORT_PARALLEL_BYTES, None) == 4
    monkeypatch.setattr(parallel, "cores", lambda: 2)
    assert staged.import_workers(staged.IMPORT_PARALLEL_BYTES, None) == 2
    monkeypatch.setattr(parallel, "cores", lambda: 1)
    assert staged.import_workers(staged.IMPORT_PARALLEL_BYTES, None) == 1  # one core: no workers
    assert staged.import_workers(10, 3) == 3 and staged.import_workers(10, 99) == staged.IMPORT_MAX_WORKERS
    with pytest.raises(UserError, match="at least 1"):
        staged.import_workers(10, 0)
    monkeypatch.setattr(parallel, "can_fork", lambda: False)
    assert staged.import_workers(10, 3) == 1
    monkeypatch.undo()
    assert parallel.cores() >= 1


def test_no_fork_while_another_thread_runs():
    import threading

    stop = threading.Event()
    t = threading.Thread(target=stop.wait)
    t.start()
    try:
        assert not parallel.can_fork()
    finally:
        stop.set()
        t.join()


def test_failed_import_worker_is_named_and_writes_nothing(store, tmp_path, monkeypatch, forked):
    f = write_jsonl(tmp_path / "log.jsonl", _lines(30))
    real = staged.stage_chunk

    def crash(path, start, end, *args):
        if start > 0:  # the second part: after the fork, in the worker
            raise OSError(28, "No space left on device")
        return real(path, start, end, *args)

    monkeypatch.setattr(staged, "stage_chunk", crash)
    with pytest.raises(DataError, match=r"import worker for bytes \d+-\d+ failed: OSError: .*No space left"):
        store.import_jsonl(f, workers=2)

    def die(path, start, end, *args):
        if start > 0:
            os._exit(3)
        return real(path, start, end, *args)

    monkeypatch.setattr(staged, "stage_chunk", die)
    with pytest.raises(DataError, match="exited with code 3"):
        store.import_jsonl(f, workers=2)
    assert store.count() == 0


def test_import_leaves_no_scratch_files(store, tmp_path, monkeypatch, forked):
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    f = write_jsonl(tmp_path / "log.jsonl", _lines(30))
    assert store.import_jsonl(f, workers=2).records == 30
    bad = write_jsonl(tmp_path / "bad.jsonl", _lines(30, {25: "{oops"}))
    with pytest.raises(DataError):
        store.import_jsonl(bad, workers=2)
    assert list(scratch.iterdir()) == [] and len(forked) == 2


def test_checkpointed_wal_is_cut_back_to_the_size_limit(tmp_path, monkeypatch):
    monkeypatch.setattr(sqlite_store, "WAL_SIZE_LIMIT", 32768)
    store = FeedbackStore(tmp_path / "f.db")
    f = write_jsonl(tmp_path / "log.jsonl", [{**_BASE, "request_id": f"w{i}", "output": "a" * 500} for i in range(500)])
    store.import_jsonl(f)
    wal = Path(f"{store.path}-wal")
    assert wal.stat().st_size > 32768
    store.conn.execute("PRAGMA wal_checkpoint(PASSIVE)")  # what the commit of a large import does
    store.log("q", "a")  # the next write restarts the WAL from the top and cuts the file
    assert wal.stat().st_size <= 32768


@pytest.mark.parametrize("workers", [1, 2])
@pytest.mark.parametrize("text", ["", "\n", "\n  \n\n"])
def test_import_of_an_empty_file_writes_nothing(store, tmp_path, text, workers, forked):
    f = tmp_path / "empty.jsonl"
    f.write_text(text)
    seen: list[int] = []
    result = store.import_jsonl(f, workers=workers, progress=seen.append)
    assert (result.lines, result.records, result.feedback) == (0, 0, 0) and store.count() == 0
    assert sum(seen) == len(text)
