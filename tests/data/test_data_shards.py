"""The store build (cl_release.data.shards): FeedbackStore.rows() read through SQL, in shards
by forked workers, gives the same bytes and manifest as the row dicts read one by one."""

from __future__ import annotations

import os
import sqlite3

import pytest

from cl_release import parallel
from cl_release.data import shards
from cl_release.data.build import build
from cl_release.data.formats import CONTROL_TOKEN
from cl_release.data.rules import ExtractionRules
from cl_release.errors import DataError, UserError

from data_rows import dict_rows, reference_build, same_examples, sharded_store, varied_store

STORE_RULES = [
    (ExtractionRules(), "messages"),
    (ExtractionRules(), "alpaca"),
    (ExtractionRules(dedupe=False, redact_pii=False), "chatml"),
    (ExtractionRules(min_rating=5, max_negative_rating=3, quality_threshold=None), "messages"),
    (ExtractionRules(min_rating=3.5, max_negative_rating=1, quality_threshold=0.95, redact_patterns=["ACME-\\d+"]),
     "completion"),
]


@pytest.fixture
def forking(monkeypatch):
    """Forked workers allowed: threads other tests left behind (idle) would otherwise turn
    them off (``parallel.can_fork``)."""
    monkeypatch.setattr(parallel, "can_fork", lambda: True)


@pytest.mark.parametrize("workers", [1, 3])
@pytest.mark.parametrize("rules,fmt", STORE_RULES, ids=["default", "alpaca", "plain", "strict", "float-thresholds"])
def test_store_build_matches_dict_build(tmp_path, forking, rules, fmt, workers):
    store = varied_store(tmp_path / "f.db")
    expected = build(dict_rows(store.rows()), rules, fmt)
    assert expected.shards == 0
    data, cdata, ids, cids, skipped, examples = reference_build(list(store.rows()), rules, fmt)
    result = build(store.rows(), rules, fmt, workers=workers)
    assert result.shards == workers  # the store path (no fallback), forked workers really read the shards
    assert result.data == expected.data == data and result.corrections_data == expected.corrections_data == cdata
    assert result.manifest == expected.manifest
    m = result.manifest
    assert m["record_ids"] == ids and m["corrections"]["record_ids"] == cids and m["skipped"] == skipped
    assert same_examples(result.examples, expected.examples) and result.examples == examples
    assert same_examples(result.corrections, expected.corrections)
    assert m["rows_read"] == store.count()
    # the store really has every case
    assert {"invalid_row", "no_feedback", "neutral", "negative_without_correction", "empty_output",
            "empty_input", "invalid_input", "control_tokens"} <= set(m["skipped"]) and m["sources"]["corrected"]
    text = result.data.decode()
    assert not CONTROL_TOKEN.search(text.replace("<|im_start|>", "").replace("<|im_end|>", "") if fmt == "chatml" else text)
    assert "unrated_correction" in skipped and ("duplicate" in skipped) == rules.dedupe
    store.close()


@pytest.mark.parametrize(
    "query",
    [
        {"since": "2026-01-20"},
        {"until": "2026-01-10"},
        {"since": "2026-01-03", "until": "2026-01-15T12:00:00+02:00"},
        {"model_version": "1.1.0"},
        {"model_version": "none"},
        {"has_feedback": True},
        {"has_feedback": False},
        {"after": ("2026-01-14T00:00:00.000000Z", "r01000")},
    ],
)
def test_store_build_matches_dict_build_with_filters(tmp_path, forking, query):
    store = varied_store(tmp_path / "f.db", n=1200)
    expected = build(dict_rows(store.rows(**query)))
    for workers in (1, 2):
        result = build(store.rows(**query), workers=workers)
        assert result.shards == workers
        assert result.data == expected.data and result.corrections_data == expected.corrections_data
        assert result.manifest == expected.manifest and result.manifest["rows_read"] == len(list(store.rows(**query)))
    store.close()


@pytest.mark.parametrize("workers", [2, 3, 5])
def test_sharded_store_build_merges_dedupe_groups_across_shards(tmp_path, forking, workers):
    store = sharded_store(tmp_path)
    one = build(store.rows(), workers=1)
    result = build(store.rows(), workers=workers)
    assert result.shards == workers and one.shards == 1
    assert result.data == one.data and result.manifest == one.manifest
    assert result.manifest == build(dict_rows(store.rows())).manifest
    assert result.manifest["skipped"]["duplicate"] > 500  # the groups span every shard
    assert same_examples(result.examples, one.examples)
    store.close()


def test_sharded_store_build_with_one_created_at(tmp_path, forking):
    store = sharded_store(tmp_path, n=200)
    with store.conn:
        store.conn.execute("UPDATE records SET created_at = '2026-01-01T00:00:00.000000Z'")
    result = build(store.rows(), workers=3)
    assert result.shards == 3  # all in the last shard, the others empty
    assert result.data == build(dict_rows(store.rows())).data
    store.close()


def test_sharded_store_build_reads_in_one_process_when_a_worker_fails(tmp_path, forking, monkeypatch):
    store = sharded_store(tmp_path, n=300)
    expected = build(store.rows(), workers=1)
    shard = shards.read_shard
    for failure in ("raise", "exit", "exit after sending"):
        def failing(rows, rules, fmt, created, failure=failure):
            if created[0] is None:  # this process's shard
                return shard(rows, rules, fmt, created)
            if failure == "raise":
                raise sqlite3.OperationalError("disk I/O error")
            if failure == "exit":
                os._exit(3)
            part = shard(rows, rules, fmt, created)
            part.ask = lambda wanted: os._exit(4)
            return part

        monkeypatch.setattr(shards, "read_shard", failing)
        result = build(store.rows(), workers=2)
        assert result.shards == 1, failure  # read again in one process
        assert result.data == expected.data and result.manifest == expected.manifest, failure
    store.close()


def test_sharded_store_build_of_odd_values_reads_dicts_or_one_process(tmp_path, forking):
    store = sharded_store(tmp_path, n=300)
    with store.conn:  # a blob id (only possible outside cl-release): not a plain shard
        store.conn.execute("INSERT INTO records (id, created_at, input, output, quality_score)"
                           " VALUES (X'0102', '2026-01-27T00:00:00.000000Z', '\"q\"', 'a', 0.9)")
    result = build(store.rows(), workers=2)
    assert result.shards == 1
    assert result.manifest == build(dict_rows(store.rows())).manifest
    store.conn.execute("PRAGMA ignore_check_constraints = ON")
    with store.conn:  # a text rating in the last shard: the dicts are read
        store.conn.execute("UPDATE feedback SET rating = 'high' WHERE request_id = "
                           "(SELECT id FROM records ORDER BY created_at DESC LIMIT 1)")
    with pytest.raises(DataError, match="rating: record .*: 'high' is not a number"):
        build(store.rows(), workers=2)  # from the dicts, as one process reads them
    with pytest.raises(DataError, match="rating: record .*: 'high' is not a number"):
        build(dict_rows(store.rows()))
    store.close()


def test_build_workers_default_and_checks(tmp_path, forking, monkeypatch):
    store = sharded_store(tmp_path, n=50)
    monkeypatch.setattr(parallel, "cores", lambda: 4)
    assert shards.build_workers(store.rows(), None) == 1  # a small store: one process
    monkeypatch.setattr(shards, "PARALLEL_BUILD_RECORDS", 10)
    assert shards.build_workers(store.rows(), None) == 4
    assert build(store.rows()).shards == 4  # the default, as build() takes it
    monkeypatch.setattr(parallel, "cores", lambda: 1)
    assert shards.build_workers(store.rows(), None) == 1
    assert shards.build_workers(store.rows(), 3) == 3
    monkeypatch.setattr(parallel, "can_fork", lambda: False)  # threads running, or no fork
    assert shards.build_workers(store.rows(), 3) == 1
    with pytest.raises(UserError, match="workers"):
        build(store.rows(), workers=0)
    store.close()


def test_store_build_takes_the_latest_feedback_ties_by_row_id(tmp_path):
    from cl_release.store.sqlite import FeedbackStore

    store = FeedbackStore(tmp_path / "f.db")
    t = "2026-01-05T00:00:00Z"
    a = store.log("tie, corrected last", "bad", request_id="a", created_at="2026-01-01")
    store.feedback(a, rating=5, created_at=t)
    store.feedback(a, rating=1, correction="good", created_at=t)  # same time, later row: counts
    b = store.log("tie, praised last", "fine", request_id="b", created_at="2026-01-01")
    store.feedback(b, rating=1, correction="x", created_at=t)
    store.feedback(b, thumbs=1, created_at=t)
    c = store.log("older feedback written later", "meh", request_id="c", created_at="2026-01-01")
    store.feedback(c, rating=5, created_at="2026-01-09")
    store.feedback(c, thumbs=-1, created_at="2026-01-08")  # older: does not count
    d = store.log("no feedback, a quality score", "scored", request_id="d", created_at="2026-01-02", quality_score=0.9)
    result = build(store.rows())
    assert result.manifest == build(dict_rows(store.rows())).manifest
    assert result.manifest["record_ids"] == [a, b, c, d] == ["a", "b", "c", "d"]
    assert [e["messages"][-1]["content"] for e in result.examples] == ["good", "fine", "meh", "scored"]
    assert result.manifest["sources"] == {"kept": 3, "corrected": 1}
    store.close()


def test_store_build_falls_back_to_dicts_on_values_the_schema_refuses(tmp_path):
    store = varied_store(tmp_path / "f.db", n=300)
    odd = store.log("odd", "praised", created_at="2026-01-03")
    store.feedback(odd, rating=5)  # decides before the score is compared
    hallucinated = store.log("hallucinated 2", "wrong", created_at="2026-01-03")
    store.feedback(hallucinated, correction="right")
    store.conn.execute("PRAGMA ignore_check_constraints = ON")
    with store.conn:
        store.conn.execute("UPDATE records SET quality_score = 'high' WHERE id = ?", (odd,))
        store.conn.execute("UPDATE feedback SET hallucinated = 2 WHERE request_id = ?", (hallucinated,))
    result = build(store.rows())
    expected = build(dict_rows(store.rows()))
    assert result.data == expected.data and result.manifest == expected.manifest
    assert {odd, hallucinated} <= set(result.manifest["record_ids"])  # bool(2) is True: a negative signal
    # a text score reached by the comparison fails the same way on both paths
    with store.conn:
        store.conn.execute("UPDATE records SET quality_score = 'high' WHERE rowid = 1")
        store.conn.execute("DELETE FROM feedback WHERE request_id = (SELECT id FROM records WHERE rowid = 1)")
    first = store.conn.execute("SELECT id FROM records WHERE rowid = 1").fetchone()[0]
    with pytest.raises(DataError, match=f"feedback rows: quality_score: record '{first}': 'high' is not a number"):
        build(dict_rows(store.rows()))
    with pytest.raises(DataError, match=f"f.db: quality_score: record '{first}': 'high' is not a number") as e:
        build(store.rows())
    assert "fix or delete" in e.value.hint
    with store.conn:
        store.conn.execute("UPDATE records SET quality_score = NULL WHERE rowid = 1")
        store.conn.execute("UPDATE feedback SET rating = X'01' WHERE id = (SELECT max(id) FROM feedback)")
    with pytest.raises(DataError, match=r"rating: record .*: b'\\x01' is not a number"):
        build(dict_rows(store.rows()))
    with pytest.raises(DataError, match=r"rating: record .*: b'\\x01' is not a number"):
        build(store.rows())
    store.close()


def test_store_build_with_limit_started_rows_or_odd_rules_reads_dicts(tmp_path):
    from fractions import Fraction

    store = varied_store(tmp_path / "f.db", n=400)
    limited = build(store.rows(limit=150))
    assert limited.manifest == build(dict_rows(store.rows(limit=150))).manifest and limited.shards == 0
    rows = store.rows()
    next(rows)
    started = build(rows)
    rest = store.rows()
    next(rest)
    assert started.manifest == build(dict_rows(rest)).manifest and started.manifest["rows_read"] == store.count() - 1
    assert started.shards == 0
    odd = ExtractionRules(min_rating=Fraction(9, 2), quality_threshold=float("nan"))
    result = build(store.rows(), odd)
    assert result.manifest == build(dict_rows(store.rows()), odd).manifest and result.shards == 0
    assert build(store.rows()).shards == 1  # the same store, plain rules: through SQL
    store.close()


def test_store_build_of_an_empty_store(tmp_path):
    from cl_release.store.sqlite import FeedbackStore

    store = FeedbackStore(tmp_path / "f.db")
    result = build(store.rows())
    assert result.data == b"" and result.manifest == build([]).manifest
    store.close()
