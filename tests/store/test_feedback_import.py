"""Importing another collector's logs: fields lifted from metadata, version strings mapped to
releases, naive timestamps read in a time zone, and the import summary that says so."""

from __future__ import annotations

import datetime as dt
import json
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from cl_release.decide import triggers
from cl_release.cli import main
from cl_release.errors import DataError, UserError
from cl_release.store import FeedbackStore, ImportReader
from cl_release.timeutil import time_zone, timestamp
from cl_release.project import Project
from cl_release.registry import match_release

from helpers import fake_entry, fake_repo  # noqa: E402  (tests/ is on sys.path)
from test_store_import import forked, write_jsonl  # noqa: F401  (the fixture)

RELEASES = ["1.0.0", "1.1.0", "2.0.0"]


def collector_line(i: int, *, ts: str = "2026-01-05T10:00:00", **metadata) -> dict:
    """One line as the JSONL collector teams use today writes it."""
    meta = {"model_version": "v1.0", "latency_ms": 342, **metadata}
    return {"timestamp": ts, "request_id": f"c{i}", "input": f"question {i}", "output": f"answer {i}",
            "metadata": {k: v for k, v in meta.items() if v is not None}}


@pytest.fixture
def store(tmp_path) -> FeedbackStore:
    return FeedbackStore(tmp_path / "fb.db")


# ---------------------------------------------------------------- lifting known fields


def test_known_fields_are_lifted_from_metadata_and_metadata_is_kept(store, tmp_path):
    lines = [
        collector_line(0, tokens=17, quality_score=0.9),
        collector_line(1, hallucinated=True),
        collector_line(2, error_tag="wrong-unit", severity="critical"),
        {**collector_line(3, hallucinated=False), "user_feedback": {"rating": 2, "correction": "300 ppm"}},
        collector_line(4, hallucinated=False),  # false alone: no feedback row
        collector_line(5, model_version=None, latency_ms=None),  # nothing to lift
    ]
    f = write_jsonl(tmp_path / "collector.jsonl", lines)
    result = store.import_jsonl(f, releases=RELEASES)
    assert (result.records, result.feedback) == (6, 3)
    r0 = store.get("c0")
    assert (r0["model_version"], r0["logged_version"], r0["latency_ms"], r0["tokens"], r0["quality_score"]) == (
        "1.0.0", "v1.0", 342.0, 17, 0.9)
    assert r0["metadata"] == lines[0]["metadata"]  # kept as it was, for provenance
    assert r0["rating"] is None and r0["feedback_at"] is None
    r1 = store.get("c1")
    assert r1["hallucinated"] is True and r1["feedback_at"] == r1["created_at"]
    r2 = store.get("c2")
    assert (r2["error_tag"], r2["severity"], r2["hallucinated"]) == ("wrong-unit", "critical", None)
    r3 = store.get("c3")
    assert (r3["rating"], r3["correction"], r3["hallucinated"]) == (2, "300 ppm", False)
    assert store.get("c4")["feedback_at"] is None
    r5 = store.get("c5")
    assert (r5["model_version"], r5["latency_ms"], r5["logged_version"]) == (None, None, None)
    assert result.lifted == {"error_tag": 1, "hallucinated": 2, "latency_ms": 5, "model_version": 5,
                             "quality_score": 1, "severity": 1, "tokens": 1}
    assert result.conflicts == {}
    assert result.by_model_version == {"1.0.0": 5, "unknown": 1}
    stats = store.stats()
    assert stats["hallucinated"] == 1 and stats["critical"] == 1 and stats["by_model_version"]["1.0.0"]["records"] == 5


def test_top_level_wins_and_disagreements_are_counted(store, tmp_path):
    lines = [
        {**collector_line(0, tokens=5), "model_version": "1.1.0", "latency_ms": 100, "tokens": 5},
        {**collector_line(1), "model_version": "1.0.0"},  # "v1.0" names the same release: no conflict
        {**collector_line(2, hallucinated=True, severity="low"),
         "user_feedback": {"hallucinated": False, "severity": "low", "rating": 3}},
        {"query": "q", "response": "a", "model": "2.0.0", "latency_ms": 7, "metadata": {"model_version": "v2",
                                                                                        "tokens": 3}},
    ]
    f = write_jsonl(tmp_path / "log.jsonl", lines)
    result = store.import_jsonl(f, releases=RELEASES)
    r0 = store.get("c0")
    assert (r0["model_version"], r0["logged_version"], r0["latency_ms"], r0["tokens"]) == ("1.1.0", None, 100.0, 5)
    assert store.get("c1")["model_version"] == "1.0.0" and store.get("c1")["logged_version"] is None
    r2 = store.get("c2")
    assert (r2["hallucinated"], r2["severity"], r2["rating"]) == (False, "low", 3)
    flat = next(r for r in store.rows() if r["input"] == "q")
    assert (flat["model_version"], flat["tokens"], flat["latency_ms"]) == ("2.0.0", 3, 7.0)
    assert result.conflicts == {"hallucinated": 1, "latency_ms": 1, "model_version": 1}
    assert result.lifted["tokens"] == 1


@pytest.mark.parametrize("meta, field, message", [
    ({"latency_ms": "fast"}, "metadata.latency_ms", "expected a number"),
    ({"tokens": 1.5}, "metadata.tokens", "whole number"),
    ({"model_version": ["v1"]}, "metadata.model_version", "expected a string"),
    ({"hallucinated": "yes"}, "metadata.hallucinated", "true or false"),
    ({"severity": "meh"}, "metadata.severity", "severity must be one of"),
])
def test_a_bad_lifted_value_names_line_and_field_and_writes_nothing(store, tmp_path, meta, field, message):
    f = write_jsonl(tmp_path / "log.jsonl", [collector_line(0), collector_line(1, **meta)])
    with pytest.raises(DataError, match=message) as e:
        store.import_jsonl(f)
    assert f"log.jsonl:2: {field}:" in str(e.value)
    assert store.count() == 0


# ---------------------------------------------------------------- version strings


@pytest.mark.parametrize("given, release", [
    ("v1.0", "1.0.0"), ("1.0", "1.0.0"), ("V1", "1.0.0"), ("v2", "2.0.0"), ("1.1.0", "1.1.0"), ("v1.1.0", "1.1.0"),
    ("01.1", "1.1.0"), (" v1.0 ", "1.0.0"), ("v1.2", None), ("canary", None), ("1.0.0-rc1", None), ("v", None),
    ("1.0.0.0", None), ("", None),
])
def test_match_release(given, release):
    assert match_release(given, RELEASES) == release


def test_versions_map_to_releases_and_unmatched_ones_are_counted(store, tmp_path):
    lines = [collector_line(i, model_version=v) for i, v in enumerate(["v1.0", "1.0", "v2", "canary", "v1.2", 1.1])]
    f = write_jsonl(tmp_path / "log.jsonl", lines)
    result = store.import_jsonl(f, releases=RELEASES)
    stored = {r["id"]: (r["model_version"], r["logged_version"]) for r in store.rows()}
    assert stored == {"c0": ("1.0.0", "v1.0"), "c1": ("1.0.0", "1.0"), "c2": ("2.0.0", "v2"),
                      "c3": ("canary", None), "c4": ("v1.2", None), "c5": ("1.1.0", "1.1")}
    assert result.by_model_version == {"1.0.0": 2, "1.1.0": 1, "2.0.0": 1, "canary": 1, "v1.2": 1}
    assert (result.mapped_versions, result.unmatched_versions) == (4, 2)
    # Without the registry's versions nothing is mapped, and nothing is said about matching.
    other = FeedbackStore(tmp_path / "other.db")
    plain = other.import_jsonl(f)
    assert other.get("c0")["model_version"] == "v1.0" and plain.unmatched_versions is None
    assert plain.mapped_versions == 0


def test_export_then_import_keeps_the_logged_version(store, tmp_path):
    f = write_jsonl(tmp_path / "log.jsonl", [collector_line(0)])
    store.import_jsonl(f, releases=RELEASES)
    out = tmp_path / "export.jsonl"
    store.export(out)
    again = FeedbackStore(tmp_path / "again.db")
    again.import_jsonl(out, releases=RELEASES)
    assert list(again.rows()) == list(store.rows())


def test_export_import_export_is_byte_identical(tmp_path):
    """An export, imported into a fresh store, exports to the same bytes: feedback included."""
    root = fake_repo(tmp_path, [fake_entry("1.0.0", None, T0)])
    lines = [
        {**collector_line(0, hallucinated=True), "user_feedback": {"rating": 2, "correction": "fixed", "notes": "n",
                                                                   "severity": "safety", "error_tag": "unit",
                                                                   "timestamp": "2026-01-06T00:00:00Z"}},
        {**collector_line(1), "user_feedback": {"thumbs": True, "annotator": "ops"}},
        {**collector_line(2, model_version="canary", tokens=4, quality_score=0.5)},
        {"request_id": "m", "input": [{"role": "system", "content": "s"}, {"role": "user", "content": "é"}],
         "output": "o", "timestamp": "2026-01-07T00:00:00.123456Z"},
    ]
    write_jsonl(root / "log.jsonl", lines)
    assert cli(root, "feedback", "import", "log.jsonl", "--timezone", "Europe/Athens").exit_code == 0
    first = cli(root, "feedback", "export", "-o", "first.jsonl")
    assert first.exit_code == 0
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    (fresh / "cl-release.yaml").write_text((root / "cl-release.yaml").read_text())
    r = cli(fresh, "feedback", "import", str(root / "first.jsonl"))
    assert r.exit_code == 0 and "4 new records, 0 already stored, 2 feedback rows" in r.output, r.output
    assert cli(fresh, "feedback", "export", "-o", "second.jsonl").exit_code == 0
    assert (fresh / "second.jsonl").read_bytes() == (root / "first.jsonl").read_bytes()


def test_unknown_top_level_fields_are_named(tmp_path):
    root = fake_repo(tmp_path, [])
    write_jsonl(root / "log.jsonl", [{**collector_line(0), "session": "s1"}, {**collector_line(1), "session": "s2",
                                                                            "ratng": 5}])
    r = CliRunner().invoke(main, ["-C", str(root), "feedback", "import", "log.jsonl", "--timezone", "UTC"])
    assert r.exit_code == 0
    assert r.stderr.strip() == "Warning: ignored fields no line shape knows: ratng (1 lines), session (2 lines)"
    out = json.loads(cli(root, "feedback", "import", "log.jsonl", "--json", "--timezone", "UTC").stdout)
    assert out["unknown_fields"] == {"ratng": 1, "session": 2}


@pytest.mark.parametrize("workers", [1, 2])
def test_an_oversized_example_is_refused_by_line_and_field(tmp_path, workers, forked):  # noqa: F811
    root = fake_repo(tmp_path, [], yaml_extra="limits:\n  max_example_chars: 2000\n")
    lines = [collector_line(i) for i in range(40)]
    lines[30] = {**lines[30], "user_feedback": {"rating": 1, "correction": "x" * 3000}}
    write_jsonl(root / "log.jsonl", lines)
    r = cli(root, "feedback", "import", "log.jsonl", "--workers", str(workers), "--timezone", "UTC")
    assert r.exit_code == 2
    assert "log.jsonl:31: correction: example of 3,0" in r.stderr and "over the limit of 2,000" in r.stderr
    lines[30] = {**lines[0], "request_id": "big", "input": [{"role": "user", "content": "y" * 2500}]}
    write_jsonl(root / "log.jsonl", lines)
    r = cli(root, "feedback", "import", "log.jsonl", "--timezone", "UTC")
    assert r.exit_code == 2 and "log.jsonl:31: input[0].content: example of 2,5" in r.stderr
    assert FeedbackStore(Project.load(root).feedback_path).count() == 0


# ---------------------------------------------------------------- time zones


@pytest.mark.parametrize("value, zone, utc", [
    ("2026-01-05T10:00:00", "Europe/Athens", "2026-01-05T08:00:00.000000Z"),  # EET, +02:00
    ("2026-07-05T10:00:00", "Europe/Athens", "2026-07-05T07:00:00.000000Z"),  # EEST, +03:00
    ("2026-07-05T10:00:00.5", "America/New_York", "2026-07-05T14:00:00.500000Z"),
    ("2026-01-05", "Europe/Athens", "2026-01-04T22:00:00.000000Z"),
    ("2026-07-05T10:00:00+02:00", "America/New_York", "2026-07-05T08:00:00.000000Z"),  # aware: exact
    ("2026-07-05T10:00:00Z", "Europe/Athens", "2026-07-05T10:00:00.000000Z"),
    ("2026-07-05T10:00:00", None, "2026-07-05T10:00:00.000000Z"),
    ("2026-07-05T10:00:00", "UTC", "2026-07-05T10:00:00.000000Z"),
])
def test_naive_times_are_read_in_the_given_zone(value, zone, utc):
    assert timestamp(value, tz=time_zone(zone)) == utc


def test_local_zone_follows_the_machine(monkeypatch):
    monkeypatch.setenv("TZ", "Asia/Kolkata")
    time.tzset()
    try:
        assert timestamp("2026-01-05T10:00:00", tz=time_zone("local")) == "2026-01-05T04:30:00.000000Z"
    finally:
        monkeypatch.undo()
        time.tzset()


def test_unknown_zone_is_a_user_error():
    with pytest.raises(UserError, match="unknown time zone 'Mars/Olympus'"):
        time_zone("Mars/Olympus")


def test_import_reads_naive_record_and_feedback_times_in_the_zone(store, tmp_path):
    lines = [
        {**collector_line(0, ts="2026-03-02T01:30:00"), "user_feedback": {"rating": 4, "timestamp": "2026-03-02T02:00:00"}},
        collector_line(1, ts="2026-03-02T03:00:00+00:00"),
        {**collector_line(2), "timestamp": 1767600000},
    ]
    f = write_jsonl(tmp_path / "log.jsonl", lines)
    result = store.import_jsonl(f, timezone="Europe/Athens")
    assert (result.naive_timestamps, result.timezone) == (2, "Europe/Athens")
    r0 = store.get("c0")
    assert (r0["created_at"], r0["feedback_at"]) == ("2026-03-01T23:30:00.000000Z", "2026-03-02T00:00:00.000000Z")
    assert store.get("c1")["created_at"] == "2026-03-02T03:00:00.000000Z"


def test_parallel_import_counts_what_one_process_counts(tmp_path, forked):  # noqa: F811
    lines = [collector_line(i, model_version=["v1.0", "v1.1", "x"][i % 3], hallucinated=(i % 4 == 0) or None,
                            ts=f"2026-01-{1 + i % 28:02d}T10:00:00") for i in range(90)]
    f = write_jsonl(tmp_path / "log.jsonl", lines)
    one = FeedbackStore(tmp_path / "one.db").import_jsonl(f, workers=1, batch=7, releases=RELEASES,
                                                           timezone="Europe/Athens")
    many = FeedbackStore(tmp_path / "many.db").import_jsonl(f, workers=3, batch=7, releases=RELEASES,
                                                             timezone="Europe/Athens")
    assert len(forked) == 1
    for name in ("by_model_version", "lifted", "conflicts", "naive_timestamps", "mapped_versions",
                 "unmatched_versions", "records", "feedback"):
        assert getattr(one, name) == getattr(many, name), name
    assert one.by_model_version == {"1.0.0": 30, "1.1.0": 30, "x": 30} and one.naive_timestamps == 90


def test_reader_is_the_default_import_rule():
    """``ImportReader()`` with no zone and no releases stores what it is given."""
    rec, fb = ImportReader()(collector_line(0, hallucinated=True), b"")
    assert rec[4] == "v1.0" and rec[9] is None and fb[6] == 1


# ---------------------------------------------------------------- the CLI and what reads the store

T0 = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)


def cli(root: Path, *args: str, input: str | None = None):
    return CliRunner().invoke(main, ["-C", str(root), *args], input=input)


def test_cli_import_summary_json_and_warning(tmp_path):
    root = fake_repo(tmp_path, [fake_entry("1.0.0", None, T0)])
    f = write_jsonl(root / "log.jsonl", [collector_line(0, hallucinated=True), collector_line(1, model_version="v9"),
                                         {**collector_line(2), "metadata": {"model_version": "v1.0"},
                                          "latency_ms": 5, "timestamp": "2026-01-05T10:00:00Z"}])
    r = CliRunner().invoke(main, ["-C", str(root), "feedback", "import", "log.jsonl"])
    assert r.exit_code == 0, r.output + r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].startswith("log.jsonl: 3 lines, 3 new records, 0 already stored, 1 feedback rows")
    assert "  by model version: 1.0.0 2, v9 1" in lines
    assert "  from metadata: hallucinated 1, latency_ms 2, model_version 3" in lines
    assert "  1 records name a version that matches no release" in lines
    assert "  2 timestamps without a UTC offset, read as UTC" in lines
    assert "importing" not in r.stdout + r.stderr  # no bar when not a terminal, none after the summary
    warning = r.stderr.strip().splitlines()
    assert len(warning) == 1 and "2 timestamps" in warning[0] and "--timezone" in warning[0]

    r = CliRunner().invoke(main, ["-C", str(root), "feedback", "import", "log.jsonl",
                                                  "--timezone", "Europe/Athens", "--json"])
    assert r.exit_code == 0 and r.stderr == ""
    out = json.loads(r.stdout)
    assert out["by_model_version"] == {"1.0.0": 2, "v9": 1} and out["duplicates"] == 3
    assert out["lifted"] == {"hallucinated": 1, "latency_ms": 2, "model_version": 3}
    assert (out["naive_timestamps"], out["timezone"], out["unmatched_versions"]) == (2, "Europe/Athens", 1)
    r = cli(root, "feedback", "import", "log.jsonl", "--timezone", "Nowhere/Land")
    assert r.exit_code == 2 and "unknown time zone 'Nowhere/Land'" in r.output


def test_imported_history_reaches_stats_review_and_since(tmp_path):
    root = fake_repo(tmp_path, [fake_entry("1.0.0", None, T0), fake_entry("1.1.0", "1.0.0", T0)])
    lines = [collector_line(0, ts="2026-03-02T01:30:00", hallucinated=True),  # 2026-03-01T23:30Z
             collector_line(1, ts="2026-03-02T03:00:00", model_version="v1.1")]  # 2026-03-02T01:00Z
    write_jsonl(root / "log.jsonl", lines)
    assert cli(root, "feedback", "import", "log.jsonl", "--timezone", "Europe/Athens").exit_code == 0
    stats = json.loads(cli(root, "feedback", "stats", "--json").output)
    assert set(stats["by_model_version"]) == {"1.0.0", "1.1.0"}
    assert stats["hallucinated"] == 1 and stats["by_model_version"]["1.0.0"]["hallucinated"] == 1
    since = json.loads(cli(root, "feedback", "stats", "--since", "2026-03-02", "--json").output)
    assert since["records"] == 1 and list(since["by_model_version"]) == ["1.1.0"]
    exported = cli(root, "feedback", "export", "--since", "2026-03-02T00:00:00Z").output.splitlines()
    assert [json.loads(x)["id"] for x in exported] == ["c1"]
    r = cli(root, "review", "--model", "1.1.0", input="q\n")
    assert "[c1] 2026-03-02T01:00:00.000000Z model 1.1.0" in r.output


@pytest.mark.parametrize("challenger_logs, due", [("v1.1", False), ("v1.0", True)])
def test_per_version_quality_trigger_reads_imported_history(tmp_path, challenger_logs, due):
    """The serving version's quality window counts its own answers (and unversioned ones): bad
    answers of the challenger, imported with its version in metadata, must not count."""
    entries = [fake_entry("1.0.0", None, T0), fake_entry("1.1.0", "1.0.0", T0 + dt.timedelta(days=1))]
    root = fake_repo(tmp_path, entries, champion="1.0.0",
                     yaml_extra="triggers:\n  min_new_examples: 1000000\n  planned_corrections: 1000000\n")
    now = T0 + dt.timedelta(days=10)

    def line(i, at, version, rating):
        return {**collector_line(i, ts=at.strftime("%Y-%m-%dT%H:%M:%S"), model_version=version),
                "user_feedback": {"rating": rating}}

    base = [line(i, now - dt.timedelta(days=2, minutes=i), "v1.0", 5) for i in range(100)]
    recent = [line(100 + i, now - dt.timedelta(hours=10, minutes=i), "v1.0", 5) for i in range(60)]
    bad = [line(200 + i, now - dt.timedelta(hours=9, minutes=i), challenger_logs, 1) for i in range(60)]
    write_jsonl(root / "log.jsonl", base + recent + bad)
    assert cli(root, "feedback", "import", "log.jsonl").exit_code == 0
    d = triggers.evaluate(Project.load(root), now=now)
    assert d.serving == "1.0.0"
    assert d.due is due and ({t.name for t in d.triggers if t.fires} == ({"quality_drop", "negative_rate"} if due
                                                                           else set()))
