"""Triggers, table-driven on a controllable clock: is an update due, why, and which bump."""

from __future__ import annotations

import datetime as dt
import json

import pytest
from click.testing import CliRunner

from cl_release.decide import triggers
from cl_release.cli import main
from cl_release.errors import ProjectError
from cl_release.store import FeedbackStore
from cl_release.project import Project

from helpers import fake_entry, fake_repo  # noqa: E402  (tests/ is on sys.path)

T0 = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)
H = dt.timedelta(hours=1)
D = dt.timedelta(days=1)
QUIET = {"min_new_examples": 10**6, "planned_corrections": 10**6}  # isolate the other triggers


def seed(store: FeedbackStore, *, n: int, start: dt.datetime, spread: dt.timedelta = H, rating: int | None = 5,
         version: str | None = "1.0.0", correction: str | None = None, severity: str | None = None,
         thumbs: int | None = None, tag: str = "a") -> None:
    """``n`` answers created from ``start`` over ``spread``, each with one feedback row a second later."""
    rows, fbs = [], []
    for i in range(n):
        at = start + spread * (i / max(n, 1))
        rid = f"{tag}-{i}-{at.timestamp()}"
        rows.append({"input": f"q {tag} {i} {at.isoformat()}", "output": f"a {tag} {i}", "request_id": rid,
                     "model_version": version, "created_at": at})
        fb = {"rating": rating, "correction": correction, "severity": severity, "thumbs": thumbs}
        if any(v is not None for v in fb.values()):
            fbs.append({"request_id": rid, "created_at": at + dt.timedelta(seconds=1), **fb})
    store.log_many(rows)
    if fbs:
        store.feedback_many(fbs)


def trained_by(store: FeedbackStore, version: str, *, at: dt.datetime, **kw) -> None:
    """``seed(**kw)``, every answer then marked as trained on by release ``version`` (read at ``at``)."""
    seed(store, **kw)
    store.mark_used([r["id"] for r in store.rows()], version, "new", read_at=at)


def drop_window(store, *, now, share_of_4s: float, n: int = 100, tag: str = "w"):
    """Baseline: 100 answers rated 5 (quality 1.0) two days before ``now``; the last 24 h: ``n``
    answers, ``share_of_4s`` rated 4 (quality 0.75), the rest 5."""
    seed(store, n=100, start=now - 2 * D, rating=5, tag=tag + "base")
    k = round(n * share_of_4s)
    seed(store, n=k, start=now - 20 * H, rating=4, tag=tag + "4")
    seed(store, n=n - k, start=now - 20 * H, rating=5, tag=tag + "5")


# Each case: (id, registry entries, trigger config, seeding function(store, now), now offset from T0,
#             expected due, expected bump, expected firing trigger names)
REL = [fake_entry("1.0.0", None, T0)]
CASES = [
    ("nothing", REL, {}, lambda s, now: None, 10 * D, False, None, set()),
    ("new-examples", REL, {}, lambda s, now: seed(s, n=200, start=T0 + D), 10 * D, True, "minor", {"new_examples"}),
    ("one-short", REL, {}, lambda s, now: seed(s, n=199, start=T0 + D), 10 * D, False, None, set()),
    ("trained-examples-dont-count", [fake_entry("1.0.0", None, T0 + 5 * D)], {},
     lambda s, now: trained_by(s, "1.0.0", at=T0 + 5 * D, n=300, start=T0 + D), 10 * D, False, None, set()),
    ("untrained-examples-logged-before-a-release-count", [fake_entry("1.0.0", None, T0 + 5 * D)], {},
     lambda s, now: seed(s, n=300, start=T0 + D), 10 * D, True, "minor", {"new_examples"}),
    ("examples-of-another-branch-count", [fake_entry("1.0.0", None, T0), fake_entry("1.1.0", "1.0.0", T0 + D),
                                          fake_entry("1.2.0", "1.0.0", T0 + 2 * D)],
     {}, lambda s, now: trained_by(s, "1.1.0", at=T0 + D, n=300, start=T0 + 0.5 * D), 10 * D, True, "minor",
     {"new_examples"}),
    ("corrections", REL, {"min_new_examples": 10**6, "planned_corrections": 50},
     lambda s, now: seed(s, n=50, start=T0 + D, rating=1, correction="fixed"), 10 * D, True, "minor", {"corrections"}),
    ("quality-planned", REL, QUIET, lambda s, now: drop_window(s, now=now, share_of_4s=0.28), 10 * D,
     True, "minor", {"quality_drop"}),
    ("quality-small-drop", REL, QUIET, lambda s, now: drop_window(s, now=now, share_of_4s=0.12), 10 * D,
     False, None, set()),
    ("quality-immediate", REL, QUIET, lambda s, now: drop_window(s, now=now, share_of_4s=0.6), 10 * D,
     True, "minor", {"quality_drop"}),
    ("quality-too-few-samples", REL, QUIET, lambda s, now: drop_window(s, now=now, share_of_4s=0.6, n=20), 10 * D,
     False, None, set()),
    ("negative-rate", REL, QUIET,
     lambda s, now: (seed(s, n=75, start=now - 10 * H, rating=5), seed(s, n=25, start=now - 10 * H, thumbs=-1,
                                                                         rating=None, tag="neg")),
     10 * D, True, "minor", {"negative_rate"}),
    ("negative-rate-below", REL, QUIET,
     lambda s, now: (seed(s, n=85, start=now - 10 * H, rating=5), seed(s, n=15, start=now - 10 * H, rating=1,
                                                                         tag="neg")),
     10 * D, False, None, set()),
    ("negative-outside-window", REL, QUIET,
     lambda s, now: seed(s, n=100, start=now - 3 * D, rating=1, tag="old"), 10 * D, False, None, set()),
    ("schedule-due", REL, {}, lambda s, now: None, 91 * D, True, "minor", {"schedule"}),
    ("schedule-not-yet", REL, {}, lambda s, now: None, 89 * D, False, None, set()),
    ("schedule-custom", REL, {"schedule_days": 7}, lambda s, now: None, 8 * D, True, "minor", {"schedule"}),
    ("critical-patch", REL, {},
     lambda s, now: seed(s, n=1, start=T0 + D, rating=1, correction="never mix bleach and ammonia",
                         severity="safety"), 2 * D, True, "patch", {"critical"}),
    ("critical-without-correction", REL, {},
     lambda s, now: seed(s, n=1, start=T0 + D, rating=1, severity="critical"), 2 * D, False, None, set()),
    ("cooldown-suppresses", REL, {}, lambda s, now: seed(s, n=300, start=T0 + 0.1 * H, spread=0.5 * H), 2 * H,
     False, None, set()),
    ("cooldown-over", REL, {}, lambda s, now: seed(s, n=300, start=T0 + 0.1 * H, spread=0.5 * H), 25 * H,
     True, "minor", {"new_examples"}),
    ("cooldown-lets-critical-through", REL, {},
     lambda s, now: seed(s, n=1, start=T0 + 0.5 * H, rating=1, correction="fix", severity="critical"), 2 * H,
     True, "patch", {"critical"}),
    ("rejected-release-cools-down", REL + [fake_entry("1.1.0", "1.0.0", T0 + 10 * D, status="rejected")], {},
     lambda s, now: seed(s, n=300, start=T0 + D), 10 * D + 2 * H, False, None, set()),
    ("feedback-after-now-ignored", REL, {}, lambda s, now: seed(s, n=300, start=now + H), 10 * D, False, None, set()),
    ("first-release", [], {}, lambda s, now: None, 0 * D, True, "major", {"first_release"}),
    ("merge-after-streak", [fake_entry("1.0.0", None, T0), fake_entry("1.1.0", "1.0.0", T0 + D),
                            fake_entry("1.2.0", "1.1.0", T0 + 2 * D)],
     {"merge_after": 2}, lambda s, now: None, 200 * D, True, "major", {"schedule"}),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_trigger_table(tmp_path, case):
    _, entries, conf, seeding, offset, due, bump, firing = case
    project_yaml = "triggers:\n" + "".join(f"  {k}: {v}\n" for k, v in conf.items()) if conf else ""
    root = fake_repo(tmp_path, entries, yaml_extra=project_yaml)
    project = Project.load(root)
    now = T0 + offset
    store = FeedbackStore(project.feedback_path)
    seeding(store, now)
    store.close()
    d = triggers.evaluate(project, now=now)
    assert {t.name for t in d.triggers if t.fires} == firing, triggers.format_decision(d)
    assert d.due is due and d.bump == bump
    assert d.exit_code == (10 if due else 0)
    for t in d.triggers:  # every trigger shows its value and threshold
        assert t.threshold is not None and t.detail


def test_urgency_and_reasons(tmp_path):
    root = fake_repo(tmp_path, REL, yaml_extra="triggers:\n  min_new_examples: 1000000\n  planned_corrections: 1000000\n")
    project = Project.load(root)
    now = T0 + 10 * D
    with FeedbackStore(project.feedback_path) as store:
        drop_window(store, now=now, share_of_4s=0.28)
    planned = triggers.evaluate(project, now=now)
    qd = next(t for t in planned.triggers if t.name == "quality_drop")
    assert planned.urgency == "planned" and qd.value == pytest.approx(0.07, abs=1e-3)
    assert qd.threshold == {"planned": 0.05, "immediate": 0.10}
    assert any(r.startswith("quality_drop:") for r in planned.reasons)
    with FeedbackStore(project.feedback_path) as store:
        seed(store, n=60, start=now - 5 * H, rating=2, tag="bad")
    assert triggers.evaluate(project, now=now).urgency == "immediate"


def test_cooldown_marks_triggers_held(tmp_path):
    root = fake_repo(tmp_path, REL)
    project = Project.load(root)
    with FeedbackStore(project.feedback_path) as store:
        seed(store, n=250, start=T0 + 0.1 * H, spread=0.5 * H)
    d = triggers.evaluate(project, now=T0 + 3 * H)
    held = [t.name for t in d.triggers if t.suppressed]
    assert held == ["new_examples"] and not d.due and d.cooldown_until == "2026-01-02T00:00:00Z"
    assert "held" in triggers.format_decision(d)


def test_quality_window_counts_only_the_serving_version(tmp_path):
    entries = [fake_entry("1.0.0", None, T0), fake_entry("1.1.0", "1.0.0", T0 + D)]
    root = fake_repo(tmp_path, entries, champion="1.0.0",
                     yaml_extra="triggers:\n  min_new_examples: 1000000\n  planned_corrections: 1000000\n")
    project = Project.load(root)
    now = T0 + 10 * D
    with FeedbackStore(project.feedback_path) as store:
        seed(store, n=100, start=now - 2 * D, rating=5, tag="base")
        seed(store, n=100, start=now - 10 * H, rating=5, tag="ok")
        seed(store, n=100, start=now - 10 * H, rating=1, version="1.1.0", tag="challenger")  # not the champion
    d = triggers.evaluate(project, now=now)
    assert d.serving == "1.0.0" and not d.due


def test_status_names_whose_answers_it_counts_and_the_others(tmp_path):
    entries = [fake_entry("1.0.0", None, T0), fake_entry("1.1.0", "1.0.0", T0 + D)]
    root = fake_repo(tmp_path, entries, champion="1.0.0")
    now = T0 + 10 * D
    with FeedbackStore(Project.load(root).feedback_path) as store:
        seed(store, n=113, start=now - 10 * H, rating=2, version="1.1.0", tag="other")
    d = triggers.evaluate(Project.load(root), now=now)
    neg = next(t for t in d.triggers if t.name == "negative_rate")
    assert neg.detail == ("0 answers of 1.0.0 (or no version) with feedback in the last 24 h (need 30); "
                          "other versions: 113 answers, 113 with feedback")


@pytest.mark.parametrize("extraction, due", [("", False), ("extraction:\n  max_negative_rating: 3\n", True)])
def test_negative_rate_counts_what_the_extraction_rules_call_negative(tmp_path, extraction, due):
    """A rating of 3 is neutral by default and negative once the project's rules say so: the
    trigger and the data build count by the same rule."""
    quiet = "triggers:\n  min_new_examples: 1000000\n  planned_corrections: 1000000\n"
    root = fake_repo(tmp_path, REL, yaml_extra=quiet + extraction)
    project = Project.load(root)
    now = T0 + 10 * D
    with FeedbackStore(project.feedback_path) as store:
        seed(store, n=70, start=now - 10 * H, rating=5)
        seed(store, n=30, start=now - 10 * H, rating=3, tag="three")
    d = triggers.evaluate(project, now=now)
    neg = next(t for t in d.triggers if t.name == "negative_rate")
    assert neg.value == (0.3 if due else 0.0) and neg.fires is due


def test_config_errors_name_the_line(tmp_path):
    root = fake_repo(tmp_path, REL, yaml_extra="triggers:\n  min_new_exampels: 5\n")
    with pytest.raises(ProjectError, match="min_new_exampels"):
        Project.load(root)
    root2 = fake_repo(tmp_path / "b", REL, yaml_extra="triggers:\n  quality_drop_planned: 0.2\n  quality_drop_immediate: 0.1\n")
    with pytest.raises(ProjectError, match="quality_drop_immediate"):
        triggers.evaluate(Project.load(root2), now=T0)


def test_no_store_yet_is_not_an_error_and_creates_nothing(tmp_path):
    root = fake_repo(tmp_path, REL)
    project = Project.load(root)
    d = triggers.evaluate(project, now=T0 + 2 * D)
    assert not d.due and not project.feedback_path.exists()


def test_cli_status_exit_codes(tmp_path):
    now = dt.datetime.now(dt.timezone.utc)
    root = fake_repo(tmp_path, [fake_entry("1.0.0", None, now - 100 * D)])
    result = CliRunner().invoke(main, ["-C", str(root), "status", "--json"])
    assert result.exit_code == 10, result.output
    out = json.loads(result.output)
    assert out["due"] and out["bump"] == "minor" and out["exit_code"] == 10
    assert {t["name"] for t in out["triggers"]} >= {"new_examples", "corrections", "quality_drop", "negative_rate",
                                                   "schedule", "critical"}
    root2 = fake_repo(tmp_path / "b", [fake_entry("1.0.0", None, now - 2 * D)])
    result = CliRunner().invoke(main, ["-C", str(root2), "status"])
    assert result.exit_code == 0 and "no update due" in result.output
