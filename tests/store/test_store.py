"""The SQLite feedback store: schema migrations, concurrent writers, values, feedback, the named
reads (rows, stats, the windows triggers and A/B tests read), export and the feedback CLI.
The JSONL import is tested in test_store_import.py."""

from __future__ import annotations

import json
import multiprocessing
import sqlite3
import time
from pathlib import Path

import pytest

import sqlite_utils
from click.testing import CliRunner

from cl_release.cli import main
from cl_release.errors import ConflictError, DataError, FieldValueError, UserError
from cl_release.store import FeedbackBackend, FeedbackStore, schema
from cl_release.store.schema import build_migrations
from cl_release.timeutil import timestamp

from test_store_import import write_jsonl  # noqa: E402  (tests/ is on sys.path)

PROJECT_YAML = "name: t\nbase_model: {name: models/tiny}\ndatasets: [{name: d, path: d.jsonl}]\n"


@pytest.fixture
def store(tmp_path) -> FeedbackStore:
    s = FeedbackStore(tmp_path / "deep" / "dir" / "feedback.db")
    yield s
    s.close()


def tables(path: Path) -> dict[str, list[str]]:
    db = sqlite_utils.Database(path)
    try:
        return {t.name: [c.name for c in t.columns] for t in db.tables}
    finally:
        db.close()


def applied(path: Path) -> list[str]:
    with sqlite3.connect(path) as c:
        return [r[0] for r in c.execute("SELECT name FROM _sqlite_migrations ORDER BY id")]


# ---------------------------------------------------------------- schema and migrations


def test_fresh_database_has_the_contract_schema(store):
    store.count()  # first use creates it, parent folders too
    assert store.path.is_file()
    t = tables(store.path)
    assert t["records"] == ["id", "created_at", "input", "output", "model_version", "latency_ms",
                            "tokens", "quality_score", "metadata", "logged_version"]
    assert t["feedback"] == ["id", "request_id", "created_at", "rating", "thumbs", "correction", "notes",
                             "hallucinated", "error_tag", "severity", "annotator", "supersedes"]
    assert t["release_usage"] == ["request_id", "version", "role", "read_at"]
    assert applied(store.path) == [name for name, _ in schema.MIGRATION_STEPS]
    with sqlite3.connect(store.path) as c:
        assert c.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        indexes = {r[0] for r in c.execute("SELECT name FROM sqlite_master WHERE type = 'index'")}
    assert {"records_created_at", "records_model_version", "feedback_request_id", "feedback_created_at"} <= indexes


def test_reopening_applies_each_migration_once(tmp_path):
    path = tmp_path / "f.db"
    for _ in range(3):
        s = FeedbackStore(path)
        s.log("q", "a", request_id="r1")
        s.close()
    assert applied(path) == [name for name, _ in schema.MIGRATION_STEPS]
    assert FeedbackStore(path).count() == 1


def test_the_migration_set_name_is_data_not_a_module_path():
    # Every store on disk records its migrations under this name (since the first release,
    # when the store was the module cl_release.feedback). Renaming it would make every
    # existing store look unmigrated: its first migration would then fail.
    assert schema.MIGRATION_SET == "cl_release.feedback"


@pytest.mark.parametrize("recorded_as", schema.RENAMED_MIGRATION_SETS)
def test_a_store_recorded_under_a_renamed_set_is_adopted(tmp_path, recorded_as):
    path = tmp_path / "f.db"
    s = FeedbackStore(path)
    s.log("q", "a", request_id="r1")
    s.close()
    with sqlite3.connect(path) as c:
        c.execute("UPDATE _sqlite_migrations SET migration_set = ?", (recorded_as,))
    c.close()
    s = FeedbackStore(path)
    assert s.count() == 1 and s.get("r1")["output"] == "a"
    s.close()
    with sqlite3.connect(path) as c:
        sets = {r[0] for r in c.execute("SELECT migration_set FROM _sqlite_migrations")}
    c.close()
    assert sets == {schema.MIGRATION_SET}
    assert applied(path) == [name for name, _ in schema.MIGRATION_STEPS]


def test_upgrading_an_old_schema_keeps_the_data(tmp_path):
    path = tmp_path / "old.db"
    db = sqlite_utils.Database(path)
    build_migrations().apply(db, stop_before="m002_release_usage")  # a store from before releases
    db.execute("INSERT INTO records (id, created_at, input, output) VALUES ('old', '2025-01-01T00:00:00.000000Z', '\"q\"', 'a')")
    db.conn.commit()
    db.close()
    assert "release_usage" not in tables(path)
    s = FeedbackStore(path)
    assert [r["id"] for r in s.rows()] == ["old"]
    s.mark_used(["old"], "1.0.0", "new")
    assert s.used_by("1.0.0") == {"old": "new"}
    assert applied(path) == [name for name, _ in schema.MIGRATION_STEPS]
    assert s.get("old")["logged_version"] is None


def test_failing_migration_rolls_back_and_reruns_once_fixed(tmp_path, monkeypatch):
    path = tmp_path / "f.db"
    FeedbackStore(path).log("q", "a", request_id="r1")
    calls = []

    def broken(db):
        db.execute("CREATE TABLE half_done (x)")
        db.execute("ALTER TABLE records ADD COLUMN half INTEGER")
        raise RuntimeError("boom")

    monkeypatch.setattr(schema, "MIGRATION_STEPS", [*schema.MIGRATION_STEPS, ("m099_next", broken)])
    with pytest.raises(DataError, match="upgrading the feedback database schema failed: boom"):
        FeedbackStore(path).count()
    t = tables(path)
    assert "half_done" not in t and "half" not in t["records"]
    assert "m099_next" not in applied(path)

    def fixed(db):
        calls.append(1)
        db.execute("CREATE TABLE half_done (x)")

    monkeypatch.setattr(schema, "MIGRATION_STEPS", [*schema.MIGRATION_STEPS[:-1], ("m099_next", fixed)])
    FeedbackStore(path).count()
    FeedbackStore(path).count()
    assert calls == [1]
    assert applied(path)[-1] == "m099_next" and "half_done" in tables(path)
    assert FeedbackStore(path).count() == 1


def test_corrupt_database_is_an_error_not_an_empty_store(tmp_path):
    path = tmp_path / "f.db"
    junk = b"this is not sqlite" * 100
    path.write_bytes(junk)
    with pytest.raises(DataError, match="cannot read the feedback database") as e:
        FeedbackStore(path).count()
    assert str(path) in str(e.value)
    assert path.read_bytes() == junk


def _sha(path: Path) -> str:
    import hashlib
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("make", [
    lambda c: c.execute("CREATE TABLE users (id INTEGER PRIMARY KEY, name TEXT)"),
    lambda c: c.execute("PRAGMA application_id = 1234"),
    lambda c: (c.execute("CREATE TABLE _sqlite_migrations (migration_set TEXT, name TEXT, applied_at TEXT)"),
               c.execute("INSERT INTO _sqlite_migrations VALUES ('someone.else', 'm001', 'x')")),
])
def test_a_foreign_database_is_refused_and_left_untouched(tmp_path, make):
    path = tmp_path / "theirs.db"
    with sqlite3.connect(path) as c:
        make(c)
    before = _sha(path)
    for read in (lambda s: s.count(), lambda s: s.stats(), lambda s: list(s.rows())):
        with pytest.raises(DataError, match="is not a cl-release feedback store") as e:
            read(FeedbackStore(path))
        assert str(path) in str(e.value)
    assert _sha(path) == before and not Path(f"{path}-wal").exists()
    with sqlite3.connect(path) as c:
        assert c.execute("PRAGMA journal_mode").fetchone()[0] == "delete"


def test_a_store_from_before_the_application_id_is_still_ours(tmp_path):
    path = tmp_path / "old.db"
    db = sqlite_utils.Database(path)
    build_migrations().apply(db, stop_before="m003_logged_version")
    db.close()
    s = FeedbackStore(path)
    s.log("q", "a", request_id="r")
    with sqlite3.connect(path) as c:
        assert c.execute("PRAGMA application_id").fetchone()[0] == schema.APPLICATION_ID


def _immutable(path: Path):
    """``chattr +i``: read-only even for root (tests run as root in CI); skip where it is not allowed."""
    import contextlib
    import subprocess

    @contextlib.contextmanager
    def cm():
        if subprocess.run(["chattr", "+i", str(path)], capture_output=True).returncode != 0:
            pytest.skip("chattr +i is not allowed here")
        try:
            yield
        finally:
            subprocess.run(["chattr", "-i", str(path)], check=True)

    return cm()


def test_a_read_only_store_reads_and_refuses_writes_in_one_line(tmp_path):
    path = tmp_path / "fb.db"
    FeedbackStore(path).log("q", "a", request_id="r")
    with _immutable(path):
        store = FeedbackStore(path)
        assert store.count() == 1
        with pytest.raises(DataError, match="read-only") as e:
            store.log("q2", "a2")
        assert "restore" not in str(e.value) and "\n" not in str(e.value)


def test_a_read_only_store_folder_says_so_not_restore_from_backup(tmp_path):
    folder = tmp_path / ".cl-release"
    folder.mkdir()
    with _immutable(folder):
        with pytest.raises(DataError, match="cannot open the feedback database") as e:
            FeedbackStore(folder / "feedback.db").stats()
        assert "backup" not in str(e.value) and "write it" in str(e.value)


@pytest.mark.parametrize("field, value, message", [
    ("tokens", 1e29, "must be from 0"), ("tokens", -3, "must be from 0"), ("quality_score", 5, "from 0 to 1"),
    ("quality_score", float("nan"), "finite"), ("latency_ms", float("inf"), "finite"), ("latency_ms", -1.5, "from 0"),
])
def test_numbers_are_bounded(store, field, value, message):
    with pytest.raises(UserError, match=f"{field}: .*{message}"):
        store.log("q", "a", **{field: value})
    assert store.count() == 0


def test_database_from_a_newer_version_is_refused(tmp_path):
    path = tmp_path / "f.db"
    FeedbackStore(path).count()
    with sqlite3.connect(path) as c:
        c.execute("INSERT INTO _sqlite_migrations (migration_set, name, applied_at) VALUES (?, 'm999_future', 'x')",
                  (schema.MIGRATION_SET,))
    with pytest.raises(DataError, match="newer cl-release.*m999_future"):
        FeedbackStore(path).count()


# ---------------------------------------------------------------- concurrency


def _writer(path: str, worker: int, n: int) -> None:
    store = FeedbackStore(path)
    for i in range(n):
        rid = f"w{worker}-{i}"
        store.log([{"role": "user", "content": f"q {i}"}], f"a {i}", request_id=rid, model_version="1.0.0")
        if i % 10 == 0:
            store.feedback(rid, rating=1 + i % 5)
    store.close()


def test_many_writer_processes_and_a_reader_lose_nothing(tmp_path):
    path = tmp_path / "f.db"
    FeedbackStore(path).count()  # schema first, like a deployment would
    workers, n = 8, 5000
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_writer, args=(str(path), w, n)) for w in range(workers)]
    started = time.monotonic()
    for p in procs:
        p.start()
    reader = FeedbackStore(path)
    reads = 0
    while any(p.is_alive() for p in procs):
        seen = sum(1 for _ in reader.rows())
        assert seen <= workers * n
        reads += 1
    for p in procs:
        p.join()
        assert p.exitcode == 0, "a writer failed (database is locked?)"
    assert reads >= 1
    assert reader.count() == workers * n
    ids = {r["id"] for r in reader.rows()}
    assert ids == {f"w{w}-{i}" for w in range(workers) for i in range(n)}
    assert reader.stats()["feedback"] == workers * (n // 10)
    assert reader.integrity_check() == "ok"
    assert time.monotonic() - started < 60


def test_one_store_many_threads(store):
    import threading

    def work(t):
        for i in range(200):
            store.log("q", "a", request_id=f"t{t}-{i}")

    threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert store.count() == 800


# ---------------------------------------------------------------- logging and feedback


def test_log_is_idempotent_on_request_id(store):
    assert store.log("q", "first", request_id="r1", latency_ms=5) == "r1"
    assert store.log("q", "first", request_id="r1", latency_ms=9) == "r1"  # a retry: stored once
    assert [(r["output"], r["latency_ms"]) for r in store.rows()] == [("first", 5.0)]
    generated = store.log("q", "a")
    assert len(generated) == 32 and store.count() == 2


@pytest.mark.parametrize("other", [{"output": "second"}, {"input": "another question"}])
def test_a_request_id_logged_with_other_content_is_a_conflict(store, other):
    store.log("q", "first", request_id="r1")
    with pytest.raises(ConflictError, match="request id 'r1' is already logged with another"):
        store.log(**{"input": "q", "output": "first", **other}, request_id="r1")
    with pytest.raises(ConflictError, match="'r1'"):
        store.log_many([{"input": "q2", "output": "x", "request_id": "r2"},
                        {"input": "q", "output": "first", "request_id": "r1", **other}])
    with pytest.raises(ConflictError, match="'r3'"):  # two rows of one batch
        store.log_many([{"input": "q3", "output": "x", "request_id": "r3"},
                        {"input": "q3", "output": "y", "request_id": "r3"}])
    assert [r["id"] for r in store.rows()] == ["r1"]  # the failed batches wrote nothing
    assert store.log_many([{"input": "q", "output": "first", "request_id": "r1"}]) == 0


def test_log_stores_and_decodes_every_field(store):
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "IDLH of NH3?"}]
    store.log(msgs, "300 ppm", request_id="r1", model_version="1.1.0", latency_ms=12.5, tokens=7,
              quality_score=0.25, metadata={"site": "a", "n": [1]}, created_at="2026-03-01T10:00:00+02:00")
    (row,) = store.rows()
    assert row == {
        "id": "r1", "created_at": "2026-03-01T08:00:00.000000Z", "input": msgs, "output": "300 ppm",
        "model_version": "1.1.0", "latency_ms": 12.5, "tokens": 7, "quality_score": 0.25,
        "metadata": {"site": "a", "n": [1]}, "rating": None, "thumbs": None, "correction": None,
        "notes": None, "hallucinated": None, "error_tag": None, "severity": None, "annotator": None,
        "feedback_at": None, "logged_version": None,
    }
    assert store.get("r1") == row and store.get("nope") is None


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"input": 3}, "input"),
        ({"input": [{"role": "user"}]}, "message 0"),
        ({"output": None}, "output"),
        ({"metadata": [1]}, "metadata"),
        ({"tokens": 1.5}, "tokens"),
        ({"created_at": "yesterday"}, "ISO-8601"),
    ],
)
def test_log_rejects_bad_values(store, kwargs, message):
    args = {"input": "q", "output": "a", **kwargs}
    with pytest.raises(UserError, match=message):
        store.log(args.pop("input"), args.pop("output"), **args)
    assert store.count() == 0


def test_timestamps_are_normalized_to_utc():
    assert timestamp("2026-01-02") == "2026-01-02T00:00:00.000000Z"
    assert timestamp("2026-01-02T03:04:05Z") == "2026-01-02T03:04:05.000000Z"
    assert timestamp("2026-01-02T03:04:05.5-01:00") == "2026-01-02T04:04:05.500000Z"
    assert timestamp(0) == "1970-01-01T00:00:00.000000Z"
    assert len(timestamp(None)) == 27


def test_feedback_validation(store):
    store.log("q", "a", request_id="r1")
    for kwargs, message in [
        ({"rating": 0}, "rating"),
        ({"rating": 6}, "rating"),
        ({"rating": 4.5}, "rating"),
        ({"rating": True}, "rating"),
        ({"thumbs": 2}, "thumbs"),
        ({"severity": "urgent"}, "severity"),
        ({"hallucinated": "maybe"}, "hallucinated"),
        ({}, "at least one"),
        ({"annotator": "ann"}, "at least one"),
    ]:
        with pytest.raises(UserError, match=message):
            store.feedback("r1", **kwargs)
    with pytest.raises(UserError, match="'nope'"):
        store.feedback("nope", rating=3)
    assert store.stats()["feedback"] == 0


def test_latest_feedback_wins(store):
    store.log("q", "a", request_id="r1")
    first = store.feedback("r1", rating=1, correction="fix", created_at="2026-01-02")
    store.feedback("r1", rating=5, annotator="expert", created_at="2026-01-03")
    store.feedback("r1", rating=2, created_at="2026-01-01")  # late-arriving but older
    assert isinstance(first, int)
    (row,) = store.rows()
    assert (row["rating"], row["annotator"], row["correction"]) == (5, "expert", None)
    assert row["feedback_at"] == "2026-01-03T00:00:00.000000Z"
    store.feedback("r1", thumbs=True, hallucinated=True, severity="safety")
    (row,) = store.rows()
    assert (row["thumbs"], row["hallucinated"], row["severity"], row["rating"]) == (1, True, "safety", None)


def test_feedback_many_is_all_or_nothing(store):
    store.log("q", "a", request_id="r1")
    with pytest.raises(UserError, match="'r2'"):
        store.feedback_many([{"request_id": "r1", "rating": 4}, {"request_id": "r2", "rating": 4}])
    with pytest.raises(UserError, match="feedback row 1: rating"):
        store.feedback_many([{"request_id": "r1", "rating": 4}, {"request_id": "r1", "rating": 9}])
    assert store.stats()["feedback"] == 0
    assert store.feedback_many([{"request_id": "r1", "rating": 4}, {"request_id": "r1", "thumbs": -1}]) == 2


def test_log_many_counts_new_rows_and_names_bad_ones(store):
    rows = [{"input": "q", "output": f"a{i}", "request_id": f"r{i}"} for i in range(25)]
    assert store.log_many(rows, batch=10) == 25
    assert store.log_many(rows[:5] + [{"input": "q", "output": "x", "request_id": "new"}]) == 1
    with pytest.raises(UserError, match="row 1"):
        store.log_many([{"input": "q", "output": "a"}, {"input": "q", "output": 3}])


def test_rows_filters(store):
    store.log("q", "old", request_id="old", created_at="2026-01-01", model_version="1.0.0")
    store.log("q", "old-rated-late", request_id="late", created_at="2026-01-02", model_version="1.0.0")
    store.log("q", "new", request_id="new", created_at="2026-02-01", model_version="1.1.0")
    store.feedback("late", rating=1, created_at="2026-02-05")
    ids = lambda **kw: [r["id"] for r in store.rows(**kw)]  # noqa: E731
    assert ids() == ["old", "late", "new"]
    assert ids(since="2026-01-15") == ["late", "new"]  # new feedback on an old answer counts
    assert ids(until="2026-01-15") == ["old", "late"]
    assert ids(model_version="1.1.0") == ["new"]
    assert ids(has_feedback=True) == ["late"]
    assert ids(has_feedback=False) == ["old", "new"]
    assert ids(after=("2026-01-01T00:00:00.000000Z", "old"), limit=1) == ["late"]
    with pytest.raises(UserError, match="--since"):
        list(store.rows(since="last tuesday"))



def test_rows_unused_by_a_lineage_and_marks_replaced_per_version(store):
    for i in range(6):
        store.log(f"q{i}", f"a{i}", request_id=f"r{i}", created_at=f"2026-01-0{i + 1}")
    store.mark_used(["r0", "r1"], "1.0.0", "new")
    store.mark_used(["r2"], "1.1.0", "new")
    store.mark_used(["r3"], "1.2.0", "new")  # another branch
    assert [r["id"] for r in store.rows(unused_by=["1.0.0", "1.1.0"])] == ["r3", "r4", "r5"]
    assert [r["id"] for r in store.rows(unused_by=[])] == [f"r{i}" for i in range(6)]
    chunks = store.rows(unused_by=["1.0.0", "1.1.0"]).select("r.id")  # the store build's read
    assert sorted(t[0] for chunk in chunks for t in chunk) == ["r3", "r4", "r5"]
    assert store.mark_used(["r4", "r2"], "1.1.0", "new", replace=True) == 2  # a re-planned 1.1.0
    assert store.used_by("1.1.0") == {"r2": "new", "r4": "new"}
    assert store.mark_used([], "1.2.0", "new", replace=True) == 0 and store.used_by("1.2.0") == {}
    assert store.usage() == {"1.0.0": 2, "1.1.0": 2} and store.usage(["1.1.0", "9.9.9"]) == {"1.1.0": 2}


def test_feedback_given_after_a_release_read_the_store_makes_the_record_new_again(store):
    store.log("q", "wrong answer", request_id="r", created_at="2026-01-01")
    store.feedback("r", rating=5, created_at="2026-01-02")  # kept by 1.0.0, which read the store on 01-03
    store.mark_used(["r"], "1.0.0", "new", read_at="2026-01-03")
    assert list(store.rows(unused_by=["1.0.0"])) == []
    store.feedback("r", rating=1, correction="right answer", created_at="2026-01-05")  # an expert fixes it
    assert [r["correction"] for r in store.rows(unused_by=["1.0.0"])] == ["right answer"]
    store.mark_used(["r"], "1.1.0", "corrections", read_at="2026-01-06")
    assert list(store.rows(unused_by=["1.0.0", "1.1.0"])) == []
    assert [r["id"] for r in store.rows(unused_by=["1.0.0"])] == ["r"]  # another branch did not train it


def test_rows_select_reads_the_same_records_as_tuples(store):
    store.log("q", "a", request_id="a", created_at="2026-01-01", model_version="1.0.0", quality_score=0.5)
    store.log([{"role": "user", "content": "ünï"}], "b", request_id="b", created_at="2026-01-02", model_version="1.1.0")
    store.log("q", "c", request_id="c", created_at="2026-01-03", model_version="1.1.0")
    store.feedback("a", rating=5, created_at="2026-01-04")
    store.feedback("a", rating=1, correction="fixed", created_at="2026-01-04")  # same time, later row: latest
    store.feedback("b", thumbs=1, created_at="2026-01-06")
    store.feedback("b", thumbs=-1, created_at="2026-01-05")  # older, though written later
    columns = "r.id, r.input, r.quality_score, f.rating, f.thumbs, f.correction, f.created_at, ?"
    wanted = lambda d: (d["id"], json.dumps(d["input"], ensure_ascii=False, separators=(",", ":")), d["quality_score"],  # noqa: E731
                        d["rating"], d["thumbs"], d["correction"], d["feedback_at"], "x")
    for query in ({}, {"since": "2026-01-03"}, {"until": "2026-01-02"}, {"model_version": "1.1.0"},
                  {"has_feedback": False}, {"after": ("2026-01-01T00:00:00.000000Z", "a")}):
        rows = store.rows(**query)
        chunks = list(rows.select(columns, ["x"]))
        assert all(isinstance(c, list) for c in chunks)
        got = sorted(t for c in chunks for t in c)
        assert got == sorted(wanted(d) for d in rows), query  # select leaves the dicts unread
    (a,) = [t for c in store.rows(until="2026-01-02").select(columns, ["x"]) for t in c]
    assert a[3:6] == (1, None, "fixed")


def test_rows_select_keep_sees_each_selected_record_once(store):
    for i in range(6):
        store.log("q", f"a{i}", request_id=f"r{i}", created_at=f"2026-01-0{i + 1}", model_version=f"{i % 2}")
        store.feedback(f"r{i}", rating=1 + i % 5, created_at=f"2026-01-0{i + 1}")
    store.feedback("r0", rating=5, created_at="2026-01-09")  # a second row: still one record
    for query in ({}, {"since": "2026-01-04"}, {"since": "2026-01-08"}, {"until": "2026-01-03"},
                  {"model_version": "1", "has_feedback": True}):
        seen = []

        def keep(rating):
            seen.append(rating)
            return rating >= 4

        got = [t for c in store.rows(**query).select("r.id, f.rating", keep=("f.rating * ?", [1], keep)) for t in c]
        rows = list(store.rows(**query))
        assert sorted(seen) == sorted(r["rating"] for r in rows), query
        assert sorted(got) == sorted((r["id"], r["rating"]) for r in rows if r["rating"] >= 4), query


def test_rows_select_by_created_range_in_order(store):
    for i in range(9):  # created out of id order, two records per day, one with new feedback
        store.log("q", "a", request_id=f"r{8 - i}", created_at=f"2026-01-0{1 + i // 2}")
    store.feedback("r8", rating=5, created_at="2026-01-09")
    rows = store.rows()
    every = [r["id"] for r in rows]
    bounds = store.rows().created_bounds(3)
    assert bounds == sorted(bounds) and len(bounds) == 2
    ranges = list(zip([None, *bounds], [*bounds, None]))
    parts = [[t[0] for c in store.rows().select("r.id", created=r, ordered=True) for t in c] for r in ranges]
    assert sum(parts, []) == every  # disjoint, in order, nothing left out
    assert all(2 <= len(p) <= 4 for p in parts)
    # a window: bounds from inside it, the records selected as rows() selects them
    since = store.rows(since="2026-01-03")
    assert all(b >= "2026-01-03" for b in since.created_bounds(2))
    got = [t[0] for r in [(None, since.created_bounds(2)[0]), (since.created_bounds(2)[0], None)]
           for c in store.rows(since="2026-01-03").select("r.id", created=r, ordered=True) for t in c]
    assert got == [r["id"] for r in store.rows(since="2026-01-03")] and "r8" in got  # rated since
    assert store.rows().size_hint() == 9
    assert store.rows(until="2026-01-01").created_bounds(4) == []  # nothing in the window


def test_rows_select_refuses_a_limit_or_started_rows(store):
    for i in range(3):
        store.log("q", "a", request_id=f"r{i}")
    assert store.rows(limit=2).select("r.id") is None
    rows = store.rows()
    assert next(rows)["id"] == "r0"
    assert rows.select("r.id") is None
    assert [r["id"] for r in rows] == ["r1", "r2"]
    rows = store.rows()
    rows.select("r.id").close()
    assert len(list(rows)) == 3
    rows = store.rows()
    next(rows)
    rows.close()
    assert list(rows) == []  # closed like a generator
    rows = store.rows()
    rows.close()
    assert list(rows) == [] and rows.select("r.id") is None


def test_rows_checks_its_bounds_when_called(store):
    with pytest.raises(UserError, match="--until"):
        store.rows(until="someday")


# ---------------------------------------------------------------- stats, usage, prune


def test_stats_on_a_crafted_set(store):
    for i in range(10):
        store.log("q", "a", request_id=f"a{i}", model_version="1.0.0")
    for i in range(5):
        store.log("q", "a", request_id=f"b{i}", model_version="1.1.0")
    store.feedback("a0", rating=5)
    store.feedback("a1", rating=1, correction="right answer")
    store.feedback("a2", thumbs=-1, hallucinated=True, severity="critical")
    store.feedback("a3", rating=2, created_at="2020-01-01")
    store.feedback("a3", rating=4)  # latest wins: not negative
    store.feedback("b0", rating=3, correction="")
    s = store.stats()
    assert (s["records"], s["feedback"], s["feedback_rate"]) == (15, 5, 5 / 15)
    assert s["average_rating"] == pytest.approx((5 + 1 + 4 + 3) / 4)
    assert (s["negative"], s["negative_rate"]) == (2, 2 / 5)
    assert (s["hallucinated"], s["hallucination_rate"]) == (1, 1 / 5)
    assert (s["corrections"], s["critical"]) == (1, 1)
    a, b = s["by_model_version"]["1.0.0"], s["by_model_version"]["1.1.0"]
    assert (a["records"], a["feedback"], a["negative"], a["average_rating"]) == (10, 4, 2, pytest.approx(10 / 3))
    assert (b["records"], b["feedback"], b["negative_rate"], b["average_rating"]) == (5, 1, 0.0, 3.0)


def test_stats_negative_threshold_is_the_callers_and_defaults_to_the_extraction_rules(store):
    from cl_release.data.rules import ExtractionRules
    from cl_release.store.sqlite import DEFAULT_MAX_NEGATIVE_RATING

    assert DEFAULT_MAX_NEGATIVE_RATING == ExtractionRules().max_negative_rating
    for i, rating in enumerate((1, 2, 3, 5)):
        store.log("q", "a", request_id=f"r{i}")
        store.feedback(f"r{i}", rating=rating)
    assert store.stats()["negative"] == 2
    assert store.stats(max_negative_rating=3)["negative"] == 3
    assert store.stats(max_negative_rating=1)["negative"] == 1


def test_stats_of_an_empty_store(store):
    s = store.stats(since="2026-01-01")
    assert s["records"] == 0 and s["average_rating"] is None and s["negative_rate"] == 0.0
    assert s["since"] == "2026-01-01T00:00:00.000000Z" and s["by_model_version"] == {}


# ---------------------------------------------------------------- windows of answers (triggers, A/B tests)

W0 = "2026-03-01T00:00:00Z"
W1 = "2026-03-02T00:00:00Z"


def _window_store(store):
    """Answers of 1.0.0 in the window [W0, W1) with ratings 1..5, a thumbs-up one, a hallucinated
    one, an unrated one with a quality score; one of 2.0.0; one unversioned; one before and one
    after the window; a rating changed after W1 (not seen)."""
    rows = [dict(request_id=f"v{r}", rating=r, latency_ms=10.0 * r) for r in range(1, 6)]
    rows += [dict(request_id="up", thumbs=1), dict(request_id="hal", rating=5, hallucinated=True),
             dict(request_id="qs", quality_score=0.5)]
    for r in rows:
        fb = {k: v for k, v in r.items() if k in ("rating", "thumbs", "hallucinated")}
        store.log("q", "a", request_id=r["request_id"], model_version="1.0.0", created_at="2026-03-01T10:00:00Z",
                  latency_ms=r.get("latency_ms"), quality_score=r.get("quality_score"))
        if fb:
            store.feedback(r["request_id"], created_at="2026-03-01T11:00:00Z", **fb)
    store.feedback("v5", rating=1, created_at="2026-03-03T00:00:00Z")  # after the window's end: not seen
    store.log("q", "a", request_id="other", model_version="2.0.0", created_at="2026-03-01T10:00:00Z")
    store.log("q", "a", request_id="none", created_at="2026-03-01T10:00:00Z")
    store.log("q", "a", request_id="before", model_version="1.0.0", created_at="2026-02-28T10:00:00Z")
    store.log("q", "a", request_id="after", model_version="1.0.0", created_at="2026-03-02T10:00:00Z")


def test_version_aggregates_count_with_the_callers_thresholds(store):
    _window_store(store)
    agg = store.version_aggregates(since=W0, until=W1, min_rating=4, max_negative_rating=2)
    assert set(agg) == {"1.0.0", "2.0.0", None}
    a = agg["1.0.0"]
    assert (a.records, a.feedback, a.opinions) == (8, 7, 7)
    assert (a.positive, a.negative) == (4, 3)  # 4, 5, thumbs up, hallucinated 5 / 1, 2, hallucinated
    assert a.quality_n == 8 and a.quality_sum == pytest.approx(0 + 0.25 + 0.5 + 0.75 + 1 + 1 + 1 + 0.5)
    assert (a.latency_n, a.latency_sum) == (5, 150.0)
    strict = store.version_aggregates(since=W0, until=W1, min_rating=5, max_negative_rating=3)["1.0.0"]
    assert (strict.positive, strict.negative) == (3, 4)
    only = store.version_aggregates(since=W0, until=W1, min_rating=4, max_negative_rating=2, versions=["2.0.0"],
                                    include_unversioned=True)
    assert set(only) == {"2.0.0", None} and only["2.0.0"].records == 1 and only["2.0.0"].feedback == 0
    later = store.version_aggregates(since=None, until="2026-03-04", min_rating=4, max_negative_rating=2)["1.0.0"]
    assert later.records == 10 and later.negative == 4  # v5's later rating 1 counts now


def test_critical_feedback_and_answer_flags_in_a_window(store):
    _window_store(store)
    store.feedback("v1", severity="safety", correction="fix", created_at="2026-03-01T12:00:00Z")
    store.feedback("v2", severity="critical", error_tag="unit", created_at="2026-03-01T12:00:00Z")
    store.feedback("v3", severity="critical", created_at="2026-03-05T00:00:00Z")  # after the window
    assert store.critical_feedback(since=W0, until=W1) == {"with_correction": 1, "without_correction": 1}
    assert store.critical_feedback(since=None, until="2026-03-06") == {"with_correction": 1, "without_correction": 2}
    assert store.answer_flags(since=W0, until=W1, versions=["1.0.0", "2.0.0"]) == {
        "1.0.0": {"errors": 1, "critical": 2}}
    assert store.answer_flags(since=W0, until=W1, versions=[]) == {}


def test_feedback_store_implements_the_backend_protocol(store):
    import inspect

    assert isinstance(store, FeedbackBackend)
    members = [n for n, v in vars(FeedbackBackend).items() if callable(v) and not n.startswith("_")]
    assert {"log", "feedback", "rows", "import_jsonl", "version_aggregates", "latency_ranks"} <= set(members)
    for name in members:
        want = inspect.signature(getattr(FeedbackBackend, name))
        have = inspect.signature(getattr(FeedbackStore, name))
        assert list(have.parameters) == list(want.parameters), name
        assert [p.kind for p in have.parameters.values()] == [p.kind for p in want.parameters.values()], name


def test_prune_keeps_rows_a_release_trained_on(store):
    for i in range(4):
        store.log("q", "a", request_id=f"old{i}", created_at="2025-06-01")
        store.feedback(f"old{i}", rating=2)
    store.log("q", "a", request_id="new", created_at="2026-06-01")
    assert store.mark_used(["old0", "old1"], "1.0.0", "new") == 2
    assert store.mark_used(["old0"], "1.0.0", "new") == 0
    store.mark_used(["old1"], "1.1.0", "replay")
    assert store.used_by("1.0.0") == {"old0": "new", "old1": "new"}
    assert store.prune("2026-01-01", dry_run=True) == 2
    assert store.prune("2026-01-01") == 2
    assert sorted(r["id"] for r in store.rows()) == ["new", "old0", "old1"]
    assert store.stats()["feedback"] == 2
    assert store.integrity_check() == "ok"


def _reference_timestamp(value, field="created_at"):
    """The general parser (what every timestamp went through before the canonical fast path)."""
    from datetime import datetime as dt, timezone as tz
    if isinstance(value, str):
        try:
            value = dt.fromisoformat(value)
        except ValueError:
            raise FieldValueError(f"not an ISO-8601 date or time: {value!r}", field) from None
        if value.tzinfo is not None:
            value = value.astimezone(tz.utc).replace(tzinfo=None)
        return value.isoformat(timespec="microseconds") + "Z"
    return timestamp(value, field=field)


def _outcome(fn, *args, **kwargs):
    try:
        return ("ok", fn(*args, **kwargs))
    except FieldValueError as e:
        return ("invalid", str(e), e.field)


@pytest.mark.parametrize("value", [
    "2026-01-05T10:00:00Z", "2026-01-05T10:00:00", "2026-01-05T10:00:00+00:00", "2026-01-05T10:00:00.123456Z",
    "2026-01-05T10:00:00.123456", "2026-01-05T10:00:00.123456+00:00", "2026-01-05T10:00:00.123Z",
    "2026-01-05T10:00:00+02:00", "2026-01-05 10:00:00Z", "2026-01-05", "2026-01-05T10:00Z", "2024-02-29T23:59:59Z",
    "2026-02-29T00:00:00Z", "2026-13-01T00:00:00Z", "2026-01-01T24:00:00Z", "2026-01-01T00:00:60Z",
    "2026-01-01T00:00:00z", "2026-01-01T00:00:00Z ", "２０２６-01-01T00:00:00Z", "soon", "",
])
def test_timestamp_fast_path_matches_the_general_parser(value):
    assert _outcome(timestamp, value, field="f") == _outcome(_reference_timestamp, value, field="f")


def test_write_batch_commits_together_and_fails_each_write_alone(tmp_path):
    """The gateway's group commit: one transaction; a write that conflicts, names an unknown
    answer or has a bad field gets its own error and writes nothing, the others commit."""
    from cl_release.errors import ConflictError, UnknownRequest

    store = FeedbackStore(tmp_path / "f.db")
    store.log("q", "a", request_id="x")
    out = store.write_batch([
        ("log", {"input": "q2", "output": "b", "request_id": "y", "model_version": "1.0.0"}),
        ("log", {"input": "q", "output": "other", "request_id": "x"}),
        ("feedback", {"request_id": "y", "rating": 5}),  # on an answer logged earlier in the batch
        ("feedback", {"request_id": "nope", "rating": 1}),
        ("log", {"input": "q", "output": "a", "tokens": -1}),
        ("feedback", {"request_id": "x", "rating": 9}),
        ("log", {"input": "q", "output": "a", "request_id": "x"}),  # an identical repeat
    ])
    assert out[0] == "y" and isinstance(out[2], int) and out[6] == "x"
    assert isinstance(out[1], ConflictError) and isinstance(out[3], UnknownRequest)
    assert isinstance(out[4], UserError) and "tokens" in str(out[4]) and isinstance(out[5], UserError)
    assert store.count() == 2 and store.get("y")["rating"] == 5 and store.get("x")["output"] == "a"
    assert store.get("x")["rating"] is None and store.write_batch([]) == []


# ---------------------------------------------------------------- export


def test_export_round_trips_rows(store, tmp_path):
    store.log([{"role": "user", "content": "q"}], "a,\"b\"\nc", request_id="r1", created_at="2026-01-01")
    store.feedback("r1", rating=2, correction="x", created_at="2026-01-02")
    store.log("q2", "a2", request_id="r2", created_at="2026-03-01")
    out = tmp_path / "sub" / "export.jsonl"
    assert store.export(out) == 2
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert rows == list(store.rows())
    assert store.export(out, since="2026-02-01") == 1
    with pytest.raises(UserError, match="format"):
        store.export(out, fmt="parquet")


# ---------------------------------------------------------------- CLI


@pytest.fixture
def repo(tmp_path) -> Path:
    (tmp_path / "cl-release.yaml").write_text(PROJECT_YAML)
    (tmp_path / "d.jsonl").write_text("")
    return tmp_path


def cli(repo: Path, *args: str, input: str | None = None):
    return CliRunner().invoke(main, ["-C", str(repo), *args], input=input)


def test_cli_log_add_stats(repo):
    r = cli(repo, "feedback", "log", "--input", "what, \"why\"?", "--output", "because", "--model-version", "1.0.0")
    assert r.exit_code == 0, r.output
    rid = r.output.strip()
    assert (repo / ".cl-release" / "feedback.db").is_file()
    r = cli(repo, "feedback", "add", rid, "--rating", "2", "--thumbs", "down", "--correction", "fixed",
            "--hallucinated", "--severity", "critical", "--annotator", "ops")
    assert r.exit_code == 0 and f"recorded for {rid}" in r.output
    r = cli(repo, "feedback", "stats", "--json")
    s = json.loads(r.output)
    assert (s["records"], s["feedback"], s["negative"], s["critical"], s["hallucinated"]) == (1, 1, 1, 1, 1)
    r = cli(repo, "feedback", "stats")
    assert "all: 1 answers, feedback 1 (100.0%), avg rating 2.00" in r.output
    assert "1.0.0: 1 answers" in r.output


def test_cli_errors_are_one_line(repo):
    r = cli(repo, "feedback", "add", "missing-id", "--rating", "3")
    assert r.exit_code == 2 and "no logged answer with request id 'missing-id'" in r.output
    r = cli(repo, "feedback", "add", "x", "--rating", "9")
    assert r.exit_code == 2
    r = cli(repo, "feedback", "stats", "--since", "whenever")
    assert r.exit_code == 2 and "--since" in r.output


def test_cli_import_export_prune(repo):
    f = write_jsonl(repo / "log.jsonl", [
        {"request_id": f"r{i}", "input": "q", "output": "a", "timestamp": f"2026-01-{i + 1:02d}",
         "user_feedback": {"rating": 1 + i % 5}} for i in range(10)
    ])
    r = cli(repo, "feedback", "import", str(f))
    assert r.exit_code == 0, r.output
    assert "10 lines, 10 new records, 0 already stored, 10 feedback rows" in r.output
    r = cli(repo, "feedback", "export", "--since", "2026-01-06")
    assert r.exit_code == 0 and [json.loads(x)["id"] for x in r.output.splitlines()] == [f"r{i}" for i in range(5, 10)]
    r = cli(repo, "feedback", "export", "-o", "out/all.jsonl")
    assert r.exit_code == 0 and len((repo / "out" / "all.jsonl").read_text().splitlines()) == 10
    r = cli(repo, "feedback", "prune", "--before", "2026-01-04", input="n\n")
    assert r.exit_code == 1 and "Delete 3 answers" in r.output
    r = cli(repo, "feedback", "prune", "--before", "2026-01-04", "--yes")
    assert r.exit_code == 0 and "deleted 3 answers" in r.output
    bad = write_jsonl(repo / "bad.jsonl", ['{"request_id": "z", "input": "q", "output": "a"}', "{oops"])
    r = cli(repo, "feedback", "import", str(bad))
    assert r.exit_code == 2 and "bad.jsonl:2: invalid JSON" in r.output
    assert FeedbackStore(repo / ".cl-release" / "feedback.db").count() == 7
    r = cli(repo, "feedback", "import", "--workers", "2", str(bad))  # forked parsers: the same line
    assert r.exit_code == 2 and "bad.jsonl:2: invalid JSON" in r.output
    r = cli(repo, "feedback", "import", "--workers", "2", str(f))
    assert r.exit_code == 0 and "10 lines, 3 new records, 7 already stored" in r.output
    r = cli(repo, "feedback", "import", "--workers", "0", str(f))
    assert r.exit_code == 2 and "--workers" in r.output


def test_cli_uses_the_configured_store_path(repo):
    (repo / "cl-release.yaml").write_text(PROJECT_YAML + "feedback: {path: data/fb.db}\n")
    r = cli(repo, "feedback", "log", "--input", "q", "--output", "a")
    if r.exit_code != 0 and "unknown key" in r.output:
        pytest.skip("the project schema has no 'feedback' key yet")
    assert r.exit_code == 0, r.output
    assert (repo / "data" / "fb.db").is_file()


@pytest.mark.parametrize(
    "path",
    [["feedback"], ["feedback", "import"], ["feedback", "add"], ["feedback", "log"], ["feedback", "stats"],
     ["feedback", "export"], ["feedback", "prune"], ["annotate"], ["annotate", "export"], ["annotate", "import"],
     ["review"]],
)
def test_every_feedback_command_has_help(path):
    cmd = main
    for name in path:
        cmd = cmd.commands[name]
    assert cmd.help and len(cmd.help.strip()) > 20
    for p in cmd.params:
        if not getattr(p, "hidden", False) and p.param_type_name == "option":
            assert p.help, f"{' '.join(path)} {p.name} has no help"
