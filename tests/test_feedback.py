"""The SQLite feedback store: schema migrations, concurrent writers, feedback, stats, import, CLI."""

from __future__ import annotations

import json
import multiprocessing
import sqlite3
import time
from pathlib import Path

import pytest

from cl_release import parallel
import sqlite_utils
from click.testing import CliRunner

from cl_release.store import sqlite as fbmod
from cl_release.cli import main
from cl_release.errors import ConflictError, DataError, UserError
from cl_release.store.sqlite import FeedbackStore, build_migrations
from cl_release.timeutil import timestamp

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
    assert applied(store.path) == [name for name, _ in fbmod.MIGRATION_STEPS]
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
    assert applied(path) == [name for name, _ in fbmod.MIGRATION_STEPS]
    assert FeedbackStore(path).count() == 1


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
    assert applied(path) == [name for name, _ in fbmod.MIGRATION_STEPS]
    assert s.get("old")["logged_version"] is None


def test_failing_migration_rolls_back_and_reruns_once_fixed(tmp_path, monkeypatch):
    path = tmp_path / "f.db"
    FeedbackStore(path).log("q", "a", request_id="r1")
    calls = []

    def broken(db):
        db.execute("CREATE TABLE half_done (x)")
        db.execute("ALTER TABLE records ADD COLUMN half INTEGER")
        raise RuntimeError("boom")

    monkeypatch.setattr(fbmod, "MIGRATION_STEPS", [*fbmod.MIGRATION_STEPS, ("m099_next", broken)])
    with pytest.raises(DataError, match="upgrading the feedback database schema failed: boom"):
        FeedbackStore(path).count()
    t = tables(path)
    assert "half_done" not in t and "half" not in t["records"]
    assert "m099_next" not in applied(path)

    def fixed(db):
        calls.append(1)
        db.execute("CREATE TABLE half_done (x)")

    monkeypatch.setattr(fbmod, "MIGRATION_STEPS", [*fbmod.MIGRATION_STEPS[:-1], ("m099_next", fixed)])
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
        assert c.execute("PRAGMA application_id").fetchone()[0] == fbmod.APPLICATION_ID


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
                  (fbmod.MIGRATION_SET,))
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


def test_stats_of_an_empty_store(store):
    s = store.stats(since="2026-01-01")
    assert s["records"] == 0 and s["average_rating"] is None and s["negative_rate"] == 0.0
    assert s["since"] == "2026-01-01T00:00:00.000000Z" and s["by_model_version"] == {}


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


# ---------------------------------------------------------------- import and export


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


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


# ---------------------------------------------------------------- fast import path


def _reference_timestamp(value, field="created_at"):
    """The general parser (what every timestamp went through before the canonical fast path)."""
    from datetime import datetime as dt, timezone as tz
    if isinstance(value, str):
        try:
            value = dt.fromisoformat(value)
        except ValueError:
            raise fbmod.Invalid(f"not an ISO-8601 date or time: {value!r}", field) from None
        if value.tzinfo is not None:
            value = value.astimezone(tz.utc).replace(tzinfo=None)
        return value.isoformat(timespec="microseconds") + "Z"
    return timestamp(value, field=field)


def _outcome(fn, *args, **kwargs):
    try:
        return ("ok", fn(*args, **kwargs))
    except fbmod.Invalid as e:
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


def _reference_import_row(obj, raw):
    """``_import_row`` as it was before the inlined shape-(a) path: the oracle for its checks."""
    import hashlib
    Invalid, record_row = fbmod.Invalid, fbmod.record_row
    if not isinstance(obj, dict):
        raise Invalid(f"expected a JSON object, got {type(obj).__name__}")
    if "output" in obj or "input" in obj:
        request_id = obj.get("request_id", obj.get("id"))
        if request_id is None:
            raise Invalid("missing 'request_id'", "request_id")
        if "input" not in obj:
            raise Invalid("missing 'input'", "input")
        record = record_row(obj["input"], obj.get("output"), request_id=request_id,
                            model_version=obj.get("model_version"), latency_ms=obj.get("latency_ms"),
                            tokens=obj.get("tokens"), quality_score=obj.get("quality_score"),
                            metadata=obj.get("metadata"), created_at=obj.get("timestamp", obj.get("created_at")))
    elif "query" in obj:
        record = record_row(obj["query"], obj.get("response"), request_id=hashlib.sha256(raw.strip()).hexdigest()[:32],
                            model_version=obj.get("model", obj.get("model_version")),
                            quality_score=obj.get("quality_score"), latency_ms=obj.get("latency_ms"),
                            metadata=obj.get("metadata"), created_at=obj.get("timestamp"))
    else:
        raise Invalid("unknown row shape: expected 'input'/'output' (request log) or 'query'/'response'")
    uf = obj.get("user_feedback")
    if uf is None:
        return record, None
    if isinstance(uf, (int, float)) and not isinstance(uf, bool):
        uf = {"rating": uf}
    if not isinstance(uf, dict):
        raise Invalid("expected a rating number or an object", "user_feedback")
    fields = {k: uf.get(k) for k in fbmod._FEEDBACK_FIELDS}
    if all(v is None for v in fields.values()):
        return record, None
    try:
        fb = fbmod.feedback_values(**fields)
        fb_at = timestamp(uf.get("timestamp", uf.get("created_at")) or record[1], field="user_feedback.timestamp")
    except Invalid as e:
        raise Invalid(str(e), f"user_feedback.{e.field}" if e.field and "." not in e.field else e.field) from None
    return record, (record[0], fb_at, *fb.values())


_BASE = {"request_id": "r", "input": "q", "output": "a", "timestamp": "2026-01-01T00:00:00Z"}
_IMPORT_CASES = [
    _BASE, {**_BASE, "request_id": None, "id": "x"}, {k: v for k, v in _BASE.items() if k != "request_id"},
    {"id": "x", "input": "q", "output": "a"}, {**_BASE, "request_id": ""}, {**_BASE, "request_id": 5},
    {"request_id": "r", "output": "a"}, {"request_id": "r", "input": "q"}, {**_BASE, "output": None},
    {**_BASE, "output": 3}, {**_BASE, "input": []}, {**_BASE, "input": 3}, {**_BASE, "input": ["x"]},
    {**_BASE, "input": [{"role": "user", "content": "c"}, {"role": "user"}]},
    {**_BASE, "input": [{"role": "user", "content": "c"}], "metadata": {"k": [1, "é"]}},
    {**_BASE, "metadata": {}}, {**_BASE, "metadata": None}, {**_BASE, "metadata": []}, {**_BASE, "metadata": "x"},
    {**_BASE, "timestamp": None, "created_at": "2026-01-01"}, {**_BASE, "created_at": "2020-01-01"},
    {k: v for k, v in _BASE.items() if k != "timestamp"} | {"created_at": 1767600000.5},
    {**_BASE, "timestamp": "2026-02-30T00:00:00Z"}, {**_BASE, "timestamp": True}, {**_BASE, "timestamp": "2026-01-01T01:00:00+01:00"},
    {**_BASE, "model_version": "1.0"}, {**_BASE, "model_version": 1}, {**_BASE, "latency_ms": 80},
    {**_BASE, "latency_ms": 80.5}, {**_BASE, "latency_ms": True}, {**_BASE, "latency_ms": "80"},
    {**_BASE, "tokens": 12}, {**_BASE, "tokens": 12.0}, {**_BASE, "tokens": 12.5}, {**_BASE, "tokens": False},
    {**_BASE, "quality_score": 1}, {**_BASE, "quality_score": 0.5}, {**_BASE, "quality_score": "hi"},
    {**_BASE, "output": 3, "timestamp": "soon", "metadata": 1},  # several wrong: the first check wins
    {**_BASE, "input": 3, "timestamp": "soon"}, {**_BASE, "tokens": 1.5, "latency_ms": "x"},
    {**_BASE, "user_feedback": 4}, {**_BASE, "user_feedback": 4.0}, {**_BASE, "user_feedback": True},
    {**_BASE, "user_feedback": {"rating": 9}}, {**_BASE, "user_feedback": {"thumbs": True, "timestamp": "2026-02-01"}},
    {**_BASE, "user_feedback": {"notes": None}}, {**_BASE, "user_feedback": {"severity": "meh"}},
    {**_BASE, "user_feedback": {"rating": 2, "timestamp": "nope"}}, {**_BASE, "user_feedback": "good"},
    {"query": "q", "response": "a", "model": "0.9", "user_feedback": 5}, {"query": "q", "response": 1},
    {"something": "else"}, ["a list"], "a string", None, 3,
]


@pytest.mark.parametrize("obj", _IMPORT_CASES, ids=[str(i) for i in range(len(_IMPORT_CASES))])
def test_import_row_matches_the_reference_checks(obj):
    raw = json.dumps(obj).encode() + b"\n"
    got, want = _outcome(fbmod._import_row, obj, raw), _outcome(_reference_import_row, obj, raw)
    if want[0] == "ok" and isinstance(obj, dict) and obj.get("timestamp", obj.get("created_at")) is None:
        # Stored at the import time: the two calls may differ by the clock only.
        assert got[0] == "ok"
        got, want = ([t[:1] + t[2:] if t else t for t in o[1]] for o in (got, want))
    assert got == want


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
        f"SELECT {fbmod._FEEDBACK_COLUMNS} FROM feedback ORDER BY request_id, id"
    ).fetchall()


@pytest.mark.parametrize("workers", [1, 3])
def test_import_equals_the_row_by_row_reference(tmp_path, workers, forked):
    rows = _varied_log(200)
    rows += [
        {**rows[3], "user_feedback": {"rating": 5, "notes": "same id, new feedback, another part"}},
        {**rows[3], "timestamp": "2026-03-01T00:00:00Z"},  # identical feedback, other time: stored once
        {**rows[7], "user_feedback": {"rating": 2}},
        {**rows[7], "user_feedback": {"rating": 2}},  # identical feedback twice in the file
        "",
    ]
    f = write_jsonl(tmp_path / "log.jsonl", rows)
    fast = FeedbackStore(tmp_path / "fast.db")
    # many batches; with workers=3 the duplicate ids and feedback fall in other parts of the file
    first = fast.import_jsonl(f, batch=7, workers=workers)
    ref = FeedbackStore(tmp_path / "ref.db")
    c = ref.conn
    with c:
        for line in f.read_bytes().splitlines():
            if not line.strip():
                continue
            rec, fb = _reference_import_row(json.loads(line), line)
            c.execute(fbmod._INSERT_RECORD, rec)
            if fb:
                c.execute(fbmod._INSERT_FEEDBACK_ONCE, fb)
    assert list(fast.rows()) == list(ref.rows())
    assert fast.stats() == ref.stats()
    assert _all_feedback(fast) == _all_feedback(ref)
    assert (first.lines, first.records, first.duplicates) == (207, 200, 7)
    assert first.feedback == c.execute("SELECT count(*) FROM feedback").fetchone()[0]
    again = fast.import_jsonl(f, batch=7, workers=workers)
    assert (again.records, again.feedback, again.duplicates) == (0, 0, 207)
    assert list(fast.rows()) == list(ref.rows()) and fast.integrity_check() == "ok"
    assert _all_feedback(fast) == _all_feedback(ref)
    assert _indexes(fast.path) == _indexes(ref.path)
    assert len(forked) == (2 if workers > 1 else 0)  # both imports forked three workers, or none


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
    monkeypatch.setattr(fbmod, "_copy_feedback_sql", lambda parts: "INSERT INTO no_such_table VALUES (1)")
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


@pytest.fixture
def forked(monkeypatch) -> list:
    """Let imports fork even if another test left a thread finishing; records each forked import."""
    monkeypatch.setattr(parallel, "can_fork", lambda: True)
    calls: list = []
    real = fbmod._stage_forked
    monkeypatch.setattr(fbmod, "_stage_forked", lambda *a: calls.append(a[1]) or real(*a))
    return calls


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
        ranges = fbmod._split_lines(fh, len(data), parts)
    assert ranges[0][0] == 0 and ranges[-1][1] == len(data) and len(ranges) <= parts
    assert all(a < b for a, b in ranges) and all(b == a2 for (_, b), (a2, _) in zip(ranges, ranges[1:]))
    assert all(a == 0 or data[a - 1 : a] == b"\n" for a, _ in ranges)


def test_import_workers_choice(monkeypatch):
    monkeypatch.setattr(parallel, "can_fork", lambda: True)
    monkeypatch.setattr(parallel, "cores", lambda: 4)
    assert fbmod._import_workers(1000, None) == 1  # a small file is parsed in this process
    assert fbmod._import_workers(fbmod.IMPORT_PARALLEL_BYTES, None) == 4
    monkeypatch.setattr(parallel, "cores", lambda: 2)
    assert fbmod._import_workers(fbmod.IMPORT_PARALLEL_BYTES, None) == 2
    monkeypatch.setattr(parallel, "cores", lambda: 1)
    assert fbmod._import_workers(fbmod.IMPORT_PARALLEL_BYTES, None) == 1  # one core: no workers
    assert fbmod._import_workers(10, 3) == 3 and fbmod._import_workers(10, 99) == fbmod.IMPORT_MAX_WORKERS
    with pytest.raises(UserError, match="at least 1"):
        fbmod._import_workers(10, 0)
    monkeypatch.setattr(parallel, "can_fork", lambda: False)
    assert fbmod._import_workers(10, 3) == 1
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
    real = fbmod._stage_chunk

    def crash(path, start, end, *args):
        if start > 0:  # the second part: after the fork, in the worker
            raise OSError(28, "No space left on device")
        return real(path, start, end, *args)

    monkeypatch.setattr(fbmod, "_stage_chunk", crash)
    with pytest.raises(DataError, match=r"import worker for bytes \d+-\d+ failed: OSError: .*No space left"):
        store.import_jsonl(f, workers=2)

    def die(path, start, end, *args):
        if start > 0:
            fbmod.os._exit(3)
        return real(path, start, end, *args)

    monkeypatch.setattr(fbmod, "_stage_chunk", die)
    with pytest.raises(DataError, match="exited with code 3"):
        store.import_jsonl(f, workers=2)
    assert store.count() == 0


def test_import_leaves_no_scratch_files(store, tmp_path, monkeypatch, forked):
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(fbmod.tempfile, "tempdir", str(scratch))
    f = write_jsonl(tmp_path / "log.jsonl", _lines(30))
    assert store.import_jsonl(f, workers=2).records == 30
    bad = write_jsonl(tmp_path / "bad.jsonl", _lines(30, {25: "{oops"}))
    with pytest.raises(DataError):
        store.import_jsonl(bad, workers=2)
    assert list(scratch.iterdir()) == [] and len(forked) == 2


def test_checkpointed_wal_is_cut_back_to_the_size_limit(tmp_path, monkeypatch):
    monkeypatch.setattr(fbmod, "WAL_SIZE_LIMIT", 32768)
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
