"""The extraction rules (cl_release.data.rules): the one classification rule, checked on a
table of cases and, against the store's SQL and the store build, on every combination of
its inputs; the rules' settings; PII redaction."""

from __future__ import annotations

import itertools
import random
from collections import Counter

import pytest

from cl_release.data import shards
from cl_release.data.build import build
from cl_release.data.rules import (CORRECTED, EMAIL_RE, KEPT, PHONE_RE, ExtractionRules, Signal, UnknownSignal, classify,
                                   redact, redact_email, redact_phone, signal, verdict)
from cl_release.errors import RuleError, UserError
from cl_release.store import classify as store_classify

from data_rows import dict_rows, row

# ---------------------------------------------------------------- the rule, one row at a time

CASES = [
    # (feedback, expected source or skip reason)
    ({"rating": 5}, "kept"),
    ({"rating": 4}, "kept"),
    ({"thumbs": 1}, "kept"),
    ({"quality_score": 0.8}, "kept"),
    ({"quality_score": 0.95, "rating": 3}, "kept"),
    ({"rating": 4, "correction": "better"}, "kept"),
    ({"rating": 2, "correction": "fixed"}, "corrected"),
    ({"rating": 1, "correction": "fixed"}, "corrected"),
    ({"thumbs": -1, "correction": "fixed"}, "corrected"),
    ({"hallucinated": True, "correction": "fixed"}, "corrected"),
    ({"rating": 5, "hallucinated": True, "correction": "fixed"}, "corrected"),  # negative wins
    ({"thumbs": 1, "rating": 1, "correction": "fixed"}, "corrected"),
    ({"rating": 2}, "negative_without_correction"),
    ({"rating": 1, "correction": "   "}, "negative_without_correction"),
    ({"thumbs": -1}, "negative_without_correction"),
    ({"hallucinated": True}, "negative_without_correction"),
    ({"rating": 5, "hallucinated": True}, "negative_without_correction"),
    ({}, "no_feedback"),
    ({"rating": 3}, "neutral"),
    ({"thumbs": 0}, "neutral"),
    ({"quality_score": 0.79}, "neutral"),
    ({"hallucinated": False}, "neutral"),
    ({"rating": 3, "correction": "fixed"}, "unrated_correction"),
    ({"correction": "fixed"}, "unrated_correction"),
    ({"rating": 5, "output": "  \n"}, "empty_output"),
    ({"rating": 1, "output": "", "correction": "fixed"}, "corrected"),
]


@pytest.mark.parametrize("feedback,expected", CASES, ids=[f"{c[1]}-{i}" for i, c in enumerate(CASES)])
def test_classify(feedback, expected):
    assert classify(row(1, **feedback), ExtractionRules()) == expected


@pytest.mark.parametrize("feedback,expected", CASES, ids=[f"{c[1]}-{i}" for i, c in enumerate(CASES)])
def test_build_counts_each_rule(feedback, expected):
    result = build([row(1, **feedback)])
    m = result.manifest
    if expected in ("kept", "corrected"):
        assert m["sources"][expected] == 1 and m["examples"] == 1 and m["skipped"] == {}
        answer = result.examples[0]["messages"][-1]
        assert answer == {"role": "assistant", "content": "fixed" if expected == "corrected" else "answer 1"}
        assert (result.corrections == result.examples) == (expected == "corrected")
    else:
        assert m["examples"] == 0 and m["skipped"] == {expected: 1}



def test_rules_are_configurable():
    strict = ExtractionRules(min_rating=5, max_negative_rating=3, quality_threshold=None)
    assert classify(row(1, rating=4), strict) == "neutral"
    assert classify(row(1, rating=5), strict) == "kept"
    assert classify(row(1, quality_score=0.99), strict) == "neutral"
    assert classify(row(1, rating=3, correction="x"), strict) == "corrected"


def test_rules_reject_bad_values():
    with pytest.raises(RuleError, match="max_negative_rating"):
        ExtractionRules(min_rating=3, max_negative_rating=3)
    with pytest.raises(RuleError, match=r"redact_patterns\.0"):
        ExtractionRules(redact_patterns=["(unclosed"])
    with pytest.raises(RuleError, match="format"):
        ExtractionRules(format="sharegpt")
    with pytest.raises(RuleError, match="unknown key"):
        ExtractionRules.from_mapping({"min_ratng": 4})


    assert issubclass(RuleError, UserError)


def test_verdict_of_a_signal_the_rule_does_not_give():
    # the store's SQL marks values the schema refuses: the build reads the dicts instead
    for sig in (Signal.ODD_VALUE, Signal.NO_ID, None):
        with pytest.raises(UnknownSignal):
            verdict(sig, "fixed", "answer")


# ---------------------------------------------------------------- every combination of the rule's inputs

RATINGS = (None, 1, 2, 3, 4, 5)
THUMBS = (None, -1, 0, 1)
HALLUCINATED = (None, False, True)
SCORES = (None, 0.5, 0.8, 0.95, 1.0)  # below, at and above each threshold in COMBINATION_RULES
CORRECTIONS = (None, "", "  ", "\u2028", "fixed")  # none, blank three ways (str.strip's whitespace), given
OUTPUTS = (None, "", " \n", "answer")  # none (only outside cl-release), blank, given
COMBINATIONS = list(itertools.product(RATINGS, THUMBS, HALLUCINATED, SCORES, CORRECTIONS, OUTPUTS))
COMBINATION_RULES = [
    ExtractionRules(),
    ExtractionRules(min_rating=5, max_negative_rating=3, quality_threshold=None),
    ExtractionRules(min_rating=3.5, max_negative_rating=1, quality_threshold=0.95),
    ExtractionRules(min_rating=2, max_negative_rating=1, quality_threshold=1),
]
RULE_IDS = ["default", "strict", "floats", "lenient-int-threshold"]


@pytest.fixture(scope="module")
def every_combination(tmp_path_factory):
    """A store with one record per combination of the rule's inputs (feedback given through
    the store's API; none at all where every feedback field is None), each with its own
    question, so that nothing else (input checks, dedupe) decides."""
    from cl_release.store.sqlite import FeedbackStore

    store = FeedbackStore(tmp_path_factory.mktemp("combinations") / "f.db")
    records, feedback, no_output = [], [], []
    for i, (rating, thumbs, hallucinated, score, correction, output) in enumerate(COMBINATIONS):
        rid = f"c{i:05d}"
        records.append({"request_id": rid, "input": f"question {i}", "output": output or "placeholder",
                        "quality_score": score, "created_at": f"2026-01-01T00:00:00.{i:06d}Z"})
        if output is None:
            no_output.append((rid,))
        elif not output:
            records[-1]["output"] = output
        if (rating, thumbs, hallucinated, correction) != (None,) * 4:
            feedback.append({"request_id": rid, "rating": rating, "thumbs": thumbs, "hallucinated": hallucinated,
                             "correction": correction, "created_at": "2026-01-02T00:00:00Z"})
    store.log_many(records)
    store.feedback_many(feedback)
    with store.conn:
        store.conn.executemany("UPDATE records SET output = NULL WHERE id = ?", no_output)
    rows = list(store.rows())
    assert len(rows) == len(COMBINATIONS) == 7200
    assert [tuple(r[k] for k in ("rating", "thumbs", "hallucinated", "quality_score", "correction", "output"))
            for r in rows] == COMBINATIONS  # the store holds exactly the combinations
    yield store
    store.close()


@pytest.mark.parametrize("rules", COMBINATION_RULES, ids=RULE_IDS)
def test_store_sql_gives_the_rules_signal_for_every_combination(every_combination, rules):
    store = every_combination
    selected = store_classify.classified(store.rows(), min_rating=rules.min_rating,
                                         max_negative_rating=rules.max_negative_rating,
                                         quality_threshold=rules.quality_threshold, settled=())
    chunks, counts = selected
    sql = {rid: sig for chunk in chunks for sig, rid, *_ in chunk}
    rule = {r["id"]: signal(r, rules) for r in store.rows()}
    assert sql == rule and counts == {}
    assert set(rule.values()) == {Signal.NEGATIVE, Signal.POSITIVE, Signal.NO_FEEDBACK, Signal.NEUTRAL}


@pytest.mark.parametrize("rules", COMBINATION_RULES, ids=RULE_IDS)
def test_store_build_applies_the_rule_to_every_combination(every_combination, rules):
    """The store build (SQL signal, settled counts, the row loop) and the dict build both give
    exactly what ``classify`` says of each row."""
    store = every_combination
    rows = list(store.rows())
    verdicts = {r["id"]: classify(r, rules) for r in rows}
    used = sorted(rid for rid, v in verdicts.items() if v in (KEPT, CORRECTED))
    counts = Counter(verdicts.values())
    for result in (build(store.rows(), rules), build(dict_rows(store.rows()), rules)):
        m = result.manifest
        assert m["skipped"] == {reason: n for reason, n in sorted(counts.items()) if reason not in (KEPT, CORRECTED)}
        assert m["sources"] == {KEPT: counts[KEPT], CORRECTED: counts[CORRECTED]}
        assert m["record_ids"] == used and m["rows_read"] == len(rows)
        assert m["corrections"]["record_ids"] == sorted(rid for rid, v in verdicts.items() if v == CORRECTED)
    assert build(store.rows(), rules).shards == 1 and result.shards == 0
    assert len(counts) == 7  # every verdict the rule gives occurs


def test_settled_signals_are_decided_without_the_texts():
    """What SQL only counts (shards.SETTLED, derived from ``verdict``): for a row without a
    correction the verdict is the same whatever its answer; a positive row needs its answer."""
    assert set(shards.SETTLED) == {Signal.NEGATIVE, Signal.NO_FEEDBACK, Signal.NEUTRAL, Signal.NO_ID}
    for sig, reason in shards.SETTLED.items():
        if sig != Signal.NO_ID:
            assert {verdict(sig, None, output) for output in OUTPUTS} == {reason}
    assert shards.SETTLED[Signal.NO_ID] == "invalid_row"


def test_store_sql_marks_values_the_schema_refuses(tmp_path):
    from cl_release.store.sqlite import FeedbackStore

    store = FeedbackStore(tmp_path / "f.db")
    for i in range(5):
        store.feedback(store.log(f"q{i}", "a", request_id=f"r{i}"), rating=5)
    store.conn.execute("PRAGMA ignore_check_constraints = ON")
    with store.conn:
        store.conn.execute("UPDATE feedback SET rating = 'high' WHERE request_id = 'r0'")
        store.conn.execute("UPDATE feedback SET rating = X'01' WHERE request_id = 'r1'")
        store.conn.execute("UPDATE records SET quality_score = 'high' WHERE id = 'r2'")
        store.conn.execute("UPDATE feedback SET hallucinated = 2 WHERE request_id = 'r3'")
        store.conn.execute("INSERT INTO records (id, created_at, input, output) VALUES (NULL, '2026', '\"q\"', 'a')")
    rules = ExtractionRules()
    chunks, counts = store_classify.classified(store.rows(), min_rating=4, max_negative_rating=2,
                                               quality_threshold=0.8, settled=[Signal.NO_ID])
    assert {rid: sig for chunk in chunks for sig, rid, *_ in chunk} == {
        "r0": Signal.ODD_VALUE, "r1": Signal.ODD_VALUE, "r2": Signal.ODD_VALUE, "r3": Signal.ODD_VALUE,
        "r4": Signal.POSITIVE}
    assert counts == {Signal.NO_ID: 1}
    assert not store_classify.can_classify(iter([]), 4, 2, 0.8)  # not a store's rows
    assert not store_classify.can_classify(store.rows(), 4, 2, float("nan"))  # SQLite binds NaN as NULL
    assert not store_classify.can_classify(store.rows(limit=2), 4, 2, 0.8)
    assert store_classify.can_classify(store.rows(), 4, 2, None) and rules.quality_threshold == 0.8
    store.close()


# ---------------------------------------------------------------- PII redaction

@pytest.mark.parametrize(
    "text",
    [
        "Released 2026-01-15 at 10:30:00",
        "IDLH is 300 ppm; TWA 25 ppm, STEL 35 ppm",
        "host 192.168.1.1 port 8080",
        "version 1.2.3 and 10.4.12",
        "ISO 9001:2015 and EN 12345",
        "order 12345678, pressure 1,000,000 Pa, pi 3.14159",
        "valve +5 degrees, -12 bar",
        "part no. 4711-0815",
    ],
)
def test_redaction_leaves_ordinary_numbers(text):
    assert redact(text) == text


@pytest.mark.parametrize(
    "text,expected",
    [
        ("call 555-123-4567 now", "call [PHONE] now"),
        ("call (555) 123-4567.", "call [PHONE]."),
        ("call +1 555 123 4567", "call [PHONE]"),
        ("ruf +4915112345678 an", "ruf [PHONE] an"),
        ("tel 030 1234567", "tel [PHONE]"),
        ("a.b-c@sub.example.org wrote", "[EMAIL] wrote"),
    ],
)
def test_redaction_finds_contacts(text, expected):
    assert redact(text) == expected


def test_redaction_shortcuts_match_plain_regex():
    # redact_phone/redact_email skip text that cannot match; on random text (digits,
    # separators, Unicode digits, real numbers and addresses) they equal re.sub exactly
    rnd = random.Random(3)
    alphabet = list("0123456789" * 4 + " .-()+" * 3 + "aZ_@x.é٣\n") + [
        "555-123-4567", "+44 20 7946 0958", "(555) 123-4567", "020 7946 0958", "1-800-555-0199", "a.b@c.de", "x@y"]
    for _ in range(20000):
        text = "".join(rnd.choice(alphabet) for _ in range(rnd.randrange(0, 30)))
        assert redact_phone(text) == PHONE_RE.sub("[PHONE]", text), text
        assert redact_email(text) == EMAIL_RE.sub("[EMAIL]", text), text
