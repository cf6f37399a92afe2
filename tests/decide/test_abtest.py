"""Champion/challenger: router stickiness and share, significance, promotion and rollback in the registry."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from cl_release.decide import abtest
from cl_release.cli import main
from cl_release.errors import LockedError, UserError, VersionError
from cl_release.store.sqlite import FeedbackStore
from cl_release.project import Project
from cl_release.registry import Registry

from helpers import REPO, fake_entry, fake_repo, git, log_arm, registry_at_head, simulate

T0 = dt.datetime(2026, 3, 1, 12, 0, tzinfo=dt.timezone.utc)
REG = "registry/model_registry.json"


AB_YAML = """\
abtest:
  min_samples: 100
  min_duration_hours: 48
"""


@pytest.fixture
def repo(tmp_path) -> Path:
    entries = [fake_entry("1.0.0", None, T0), fake_entry("1.1.0", "1.0.0", T0 + dt.timedelta(days=30))]
    return fake_repo(tmp_path, entries, yaml_extra=AB_YAML, champion="1.0.0")


# ---------------------------------------------------------------- router


def test_router_sticky_and_share_over_100k_keys(repo):
    abtest.start(repo, "1.1.0", traffic=0.1, now=T0 + dt.timedelta(days=31))
    router = abtest.Router(repo)
    keys = [f"user-{i}" for i in range(100_000)]
    first = [router.choose(k) for k in keys]
    share = first.count("1.1.0") / len(keys)
    assert abs(share - 0.1) < 0.005  # 5 standard deviations at n = 100k
    assert set(first) == {"1.0.0", "1.1.0"}
    again = abtest.Router(Project.load(repo))  # a fresh router (another process) agrees, key by key
    assert [again.choose(k) for k in keys[:20_000]] == first[:20_000]


def test_router_ramp_keeps_challenger_keys_and_follows_promotion(repo):
    now = T0 + dt.timedelta(days=31)
    abtest.start(repo, "1.1.0", traffic=0.1, now=now)
    router = abtest.Router(repo)
    keys = [f"s{i}" for i in range(5000)]
    on_challenger = {k for k in keys if router.choose(k) == "1.1.0"}
    # Raise the share by editing the running test (same salt): nobody leaves the challenger.
    with Registry(repo).transaction() as data:
        data["abtest"]["traffic"] = 0.5
    ramped = {k for k in keys if router.choose(k) == "1.1.0"}
    assert on_challenger <= ramped and 0.45 < len(ramped) / len(keys) < 0.55
    abtest.promote(Project.load(repo), now=now, force=True, reason="test")
    assert {router.choose(k) for k in keys} == {"1.1.0"}  # the registry change is picked up


def test_router_without_test_serves_champion_and_rejects_empty_key(repo):
    router = abtest.Router(repo)
    assert {router.choose(f"k{i}") for i in range(100)} == {"1.0.0"}
    assert router.assign("k") == {"version": "1.0.0", "arm": "champion"}
    with pytest.raises(UserError):
        router.choose("")


# ---------------------------------------------------------------- significance


@pytest.mark.parametrize("n, significant", [(40, False), (200, False), (5000, True)])
def test_sequential_proportions_small_vs_large_samples(n, significant):
    from cl_release.decide import sequential

    # 80% vs 85% positive: a 5-point difference.
    d = sequential.proportions(int(0.80 * n), n, int(0.85 * n), n, alpha=0.05, tau=0.05)
    assert (d.p_value < 0.05) is significant and d.better is significant
    lo, hi = d.interval
    assert lo < d.diff < hi and (lo > 0) is significant


def test_sequential_means_and_weighted_improvement():
    from cl_release.decide import sequential
    from cl_release.decide.triggers import Metrics

    a = Metrics(quality_n=100, quality_sum=70.0, quality_sq=100 * (0.7**2 + 0.04), positive=60, opinions=100,
                latency_n=100, latency_sum=100 * 200.0)
    b = Metrics(quality_n=100, quality_sum=77.0, quality_sq=100 * (0.77**2 + 0.04), positive=66, opinions=100,
                latency_n=100, latency_sum=100 * 180.0)
    imp, parts = abtest.weighted_improvement(a, b, {"quality": 0.5, "positive_rate": 0.3, "latency": 0.2})
    assert parts["latency"]["change"] == pytest.approx(0.1)  # 10% faster is +10%
    assert imp == pytest.approx(0.5 * 0.1 + 0.3 * 0.1 + 0.2 * 0.1)
    d = sequential.means((a.quality_n, a.quality_sum, a.quality_sq), (b.quality_n, b.quality_sum, b.quality_sq),
                         alpha=0.05, tau=0.05)
    # z = 0.07 / sqrt(2 * 0.04 / 100) = 2.5: a fixed-horizon test says p = 0.012, the always-valid one does not
    assert d.diff == pytest.approx(0.07) and 0.05 < d.p_value < 0.5 and d.interval[0] < 0 < d.interval[1]
    # latency missing on one side: its weight drops out
    b.latency_n = 0
    imp2, _ = abtest.weighted_improvement(a, b, {"quality": 0.5, "positive_rate": 0.3, "latency": 0.2})
    assert imp2 == pytest.approx(0.1)


def test_compare_small_sample_is_not_a_win(repo):
    start = T0 + dt.timedelta(days=31)
    abtest.start(repo, "1.1.0", traffic=0.5, now=start)
    simulate(repo, start=start, keys=80, positive={"1.0.0": 0.80, "1.1.0": 0.85})
    c = abtest.compare(Project.load(repo), now=start + dt.timedelta(hours=72))
    assert c.decision == "wait"
    failed = {x["name"] for x in c.checks if not x["ok"]}
    assert {"samples", "significant"} <= failed
    assert c.metrics["1.0.0"]["records"] + c.metrics["1.1.0"]["records"] == 80


# ---------------------------------------------------------------- promotion and rollback


def test_promote_when_better_and_recorded_in_registry_and_git(repo):
    start = T0 + dt.timedelta(days=31)
    project = Project.load(repo)
    abtest.start(repo, "1.1.0", traffic=0.5, now=start)
    served = simulate(repo, start=start, keys=1200, positive={"1.0.0": 0.70, "1.1.0": 0.85},
                      latency={"1.0.0": 200.0, "1.1.0": 190.0})
    assert min(served.values()) > 500
    early = abtest.compare(project, now=start + dt.timedelta(hours=24))
    assert early.decision == "wait" and [x["name"] for x in early.checks if not x["ok"]] == ["duration"]
    with pytest.raises(UserError, match="not ready"):
        abtest.promote(project, now=start + dt.timedelta(hours=24))
    assert abtest.promote(project, now=start + dt.timedelta(hours=24), auto=True).promoted is False

    before = Registry(repo).load()["events"]
    result = abtest.promote(project, now=start + dt.timedelta(hours=49), auto=True)
    assert result.promoted and result.comparison.improvement > 0.05
    data = Registry(repo).load()
    assert data["aliases"] == {"champion": "1.1.0"} and "abtest" not in data and data["current"] == "1.1.0"
    assert data["events"][: len(before)] == before  # history only grows
    assert [e["action"] for e in data["events"][len(before):]] == ["promote"]
    assert data["events"][-1]["from"] == "1.0.0" and data["events"][-1]["p_value"] < 0.05
    assert registry_at_head(repo) == data  # committed
    assert "Promote 1.1.0" in git(repo, "log", "-1", "--format=%s")


def test_worse_challenger_is_stopped_and_champion_becomes_current(repo):
    start = T0 + dt.timedelta(days=31)
    abtest.start(repo, "1.1.0", traffic=0.5, now=start)
    simulate(repo, start=start, keys=1200, positive={"1.0.0": 0.85, "1.1.0": 0.65})
    c = abtest.compare(Project.load(repo), now=start + dt.timedelta(hours=49))
    assert c.decision == "stop" and "significantly worse" in c.reasons[0]
    e = abtest.stop(repo, reason="worse", now=start + dt.timedelta(hours=49))
    data = Registry(repo).load()
    assert e["current"] == {"from": "1.1.0", "to": "1.0.0"} and data["current"] == "1.0.0"
    assert data["aliases"] == {"champion": "1.0.0"} and registry_at_head(repo) == data


def test_auto_promote_stops_a_significantly_worse_challenger(repo):
    start = T0 + dt.timedelta(days=31)
    abtest.start(repo, "1.1.0", traffic=0.5, now=start)
    simulate(repo, start=start, keys=1200, positive={"1.0.0": 0.85, "1.1.0": 0.65})
    r = abtest.promote(Project.load(repo), now=start + dt.timedelta(hours=49), auto=True)
    assert not r.promoted and r.stopped and "significantly worse" in r.reasons[0]
    data = Registry(repo).load()
    assert "abtest" not in data and data["aliases"] == {"champion": "1.0.0"} and data["current"] == "1.0.0"
    assert data["events"][-1]["action"] == "ab_stop" and registry_at_head(repo) == data


def test_cli_compare_and_auto_promote_say_what_they_mean(repo):
    start = dt.datetime.now(dt.timezone.utc) - dt.timedelta(hours=60)
    abtest.start(repo, "1.1.0", traffic=0.5, now=start)
    simulate(repo, start=start, keys=1200, positive={"1.0.0": 0.85, "1.1.0": 0.65})
    out = run(repo, "ab", "compare")
    assert "significant 0.0" not in out and "p=0.0000, challenger worse (need p < 0.05)" in out
    assert "rated" not in out.replace("rated/thumbed", "") and " of " in out
    out = run(repo, "ab", "promote", "--auto")
    assert out.startswith("stopped the A/B test of 1.1.0: 1.1.0 is significantly worse")
    assert "champion 1.0.0 keeps serving" in out and "abtest" not in Registry(repo).load()


def test_champion_moves_current_unless_current_builds_on_it(tmp_path):
    entries = [fake_entry("1.0.0", None, T0), fake_entry("1.1.0", "1.0.0", T0), fake_entry("1.1.1", "1.1.0", T0),
               fake_entry("2.0.0", "1.1.1", T0)]
    root = fake_repo(tmp_path, entries)  # current 2.0.0 (not deployed yet)
    with pytest.raises(UserError) as info:
        abtest.start(root, "2.0.0", traffic=0.1)
    assert "ab champion 1.1.1" in str(info.value) and "ab champion 2.0.0" not in str(info.value)
    e = abtest.set_champion(root, "1.1.1")
    assert "current" not in e and Registry(root).load()["current"] == "2.0.0"  # 2.0.0 builds on 1.1.1
    abtest.set_champion(root, "1.0.0")  # an ancestor of 2.0.0 too
    data = Registry(root).load()
    assert data["aliases"]["champion"] == "1.0.0" and data["current"] == "2.0.0"


def test_ab_rollback_then_champion_makes_the_patch_current_again(tmp_path):
    entries = [fake_entry("1.0.0", None, T0), fake_entry("1.1.0", "1.0.0", T0), fake_entry("1.1.1", "1.1.0", T0)]
    root = fake_repo(tmp_path, entries, champion="1.1.0")
    abtest.set_champion(root, "1.1.1", reason="safety patch")
    abtest.rollback_champion(root)  # back to 1.1.0: current follows
    assert Registry(root).load()["current"] == "1.1.0"
    e = abtest.set_champion(root, "1.1.1", reason="the patch was fine")
    data = Registry(root).load()
    assert e["current"] == {"from": "1.1.0", "to": "1.1.1"} and data["current"] == "1.1.1"
    assert registry_at_head(root) == data


def test_force_promote_needs_reason_then_rollback_restores_previous(repo):
    project = Project.load(repo)
    now = T0 + dt.timedelta(days=31)
    abtest.start(repo, "1.1.0", traffic=0.1, now=now)
    with pytest.raises(UserError, match="--reason"):
        abtest.promote(project, now=now, force=True)
    r = abtest.promote(project, now=now, force=True, reason="hotfix verified by hand")
    assert r.event["forced"] and r.event["reason"] == "hotfix verified by hand"
    e = abtest.rollback_champion(repo, now=now + dt.timedelta(hours=1))
    assert (e["from"], e["to"]) == ("1.1.0", "1.0.0")
    data = Registry(repo).load()
    assert data["aliases"]["champion"] == "1.0.0" and data["current"] == "1.0.0"
    assert [x["action"] for x in data["events"]] == ["set_champion", "ab_start", "promote", "champion_rollback"]
    assert registry_at_head(repo) == data
    with pytest.raises(UserError, match="no previous champion"):
        abtest.rollback_champion(repo, now=now)


def test_a_move_checks_git_before_it_changes_the_registry(repo, monkeypatch):
    from cl_release import gitops
    from cl_release.errors import GitError

    monkeypatch.setattr(gitops, "LOCK_WAIT_SECONDS", 0.1)
    before = (repo / REG).read_bytes()
    (repo / ".git" / "index.lock").write_text("")
    with pytest.raises(GitError, match="index.lock exists"):
        abtest.start(repo, "1.1.0", traffic=0.1, now=T0 + dt.timedelta(days=31))
    assert (repo / REG).read_bytes() == before  # not changed, then left uncommitted
    (repo / ".git" / "index.lock").unlink()
    abtest.start(repo, "1.1.0", traffic=0.1, now=T0 + dt.timedelta(days=31))
    assert registry_at_head(repo) == Registry(repo).load()


def test_a_move_in_a_folder_that_is_not_a_repository_leaves_nothing(repo):
    import shutil

    from cl_release.errors import GitError

    shutil.rmtree(repo / ".git")
    shutil.rmtree(repo / ".cl-release", ignore_errors=True)
    with pytest.raises(GitError, match="not a git repository"):
        abtest.start(repo, "1.1.0", traffic=0.1, now=T0 + dt.timedelta(days=31))
    assert not (repo / ".cl-release").exists()


def test_start_refuses_bad_requests(tmp_path):
    entries = [fake_entry("1.0.0", None, T0), fake_entry("1.1.0", "1.0.0", T0, status="rejected"),
               fake_entry("1.2.0", "1.0.0", T0)]
    root = fake_repo(tmp_path, entries)
    with pytest.raises(UserError, match="no champion"):
        abtest.start(root, "1.2.0", traffic=0.1)
    abtest.set_champion(root, "1.0.0")
    with pytest.raises(VersionError, match="rejected"):
        abtest.start(root, "1.1.0", traffic=0.1)
    with pytest.raises(VersionError, match="unknown version"):
        abtest.start(root, "9.9.9", traffic=0.1)
    with pytest.raises(UserError, match="already the champion"):
        abtest.start(root, "1.0.0", traffic=0.1)
    with pytest.raises(UserError, match="between 0 and 1"):
        abtest.start(root, "1.2.0", traffic=1.5)
    abtest.start(root, "1.2.0", traffic=0.2)
    with pytest.raises(UserError, match="running"):
        abtest.start(root, "1.2.0", traffic=0.2)
    with pytest.raises(UserError, match="running"):
        abtest.set_champion(root, "1.2.0")
    assert registry_at_head(root) == Registry(root).load()


def test_alias_moves_wait_for_a_running_release(repo):
    from cl_release.registry import release_lock

    with release_lock(repo):
        with pytest.raises(LockedError):
            abtest.start(repo, "1.1.0", traffic=0.1)
    assert "abtest" not in Registry(repo).load()


# ---------------------------------------------------------------- the anytime-valid rule


BENCH = REPO / "bench"


def test_aa_never_promotes_beyond_its_error_budget_and_a_clear_lift_promotes():
    """Scripted traffic (bench/bench_abtest.py's simulation of a small deployment), hourly looks
    for 14 days through abtest.decide: 60 A/A runs promote at most alpha of the time, where the
    old fixed-horizon rule on the same traffic promotes more; a +30% lift promotes every time."""
    import sys

    import numpy as np

    sys.path.insert(0, str(BENCH))
    import bench_abtest as bench

    conf = abtest.ab_config(None)
    runs, new, old = 60, 0, 0
    for i in range(runs):
        t = bench.simulate(np.random.default_rng([1717, i]))
        new += bench.run_sequential(t, conf).decision == "promote"
        old += bench.run_old_peeking(t, conf).decision == "promote"
    assert new <= conf["alpha"] * runs < old, (new, old)  # the old rule on the same traffic: over budget
    lifted = [bench.run_sequential(bench.simulate(np.random.default_rng([1718, i]), lift=0.3), conf) for i in range(5)]
    assert [o.decision for o in lifted] == ["promote"] * 5 and max(o.hour for o in lifted) < 14 * 24


@pytest.mark.parametrize("breach, challenger, reason", [
    ("latency_p95", {"latency": 400.0}, "guardrail latency_p95: 1.1.0 is significantly worse"),
    ("error_rate", {"errors": 0.15}, "guardrail error_rate: 1.1.0 is significantly worse"),
    ("negative_rate", {"positive": 0.6, "negative": 0.35}, "guardrail negative_rate: 1.1.0 is significantly worse"),
])
def test_a_guardrail_breach_stops_the_test_and_routes_back_to_the_champion(repo, breach, challenger, reason):
    start = T0 + dt.timedelta(days=31)
    abtest.start(repo, "1.1.0", traffic=0.5, now=start)
    log_arm(repo, "1.0.0", 400, start=start, positive=0.6, negative=0.05, errors=0.01)
    log_arm(repo, "1.1.0", 400, start=start, **{"positive": 0.6, "negative": 0.05, "errors": 0.01, **challenger})
    project = Project.load(repo)
    c = abtest.compare(project, now=start + dt.timedelta(hours=2), count_look=False)  # before min_duration_hours
    states = {g["name"]: g["state"] for g in c.guardrails}
    assert c.decision == "stop" and states[breach] == "worse", c.reasons
    assert [n for n, s in states.items() if s == "worse"] == [breach]  # the others hold
    assert any(r.startswith(reason) for r in c.reasons) and not c.test["significant"]

    r = abtest.promote(project, now=start + dt.timedelta(hours=2), auto=True)
    assert r.stopped and not r.promoted
    data = Registry(repo).load()
    event = data["events"][-1]
    assert event["action"] == "ab_stop" and reason in event["reason"]
    assert event["method"] == abtest.METHOD and event["look"] == 1
    assert event["figures"]["guardrails"][breach]["state"] == "worse"
    assert event["figures"]["samples"] == {"1.0.0": 400, "1.1.0": 400}
    assert registry_at_head(repo) == data and "A/B: stop 1.1.0 (guardrail" in git(repo, "log", "-1", "--format=%s")
    router = abtest.Router(repo)
    assert {router.choose(f"k{i}") for i in range(200)} == {"1.0.0"}  # all traffic back on the champion


def test_one_critical_report_on_the_challenger_stops_it_at_once(repo):
    start = T0 + dt.timedelta(days=31)
    abtest.start(repo, "1.1.0", traffic=0.5, now=start)
    log_arm(repo, "1.0.0", 20, start=start)
    ids = log_arm(repo, "1.1.0", 20, start=start)
    store = FeedbackStore(Project.load(repo).feedback_path)
    store.feedback(ids[3], severity="critical", notes="told the user to mix bleach and ammonia",
                   created_at=start + dt.timedelta(minutes=30))
    store.close()
    project = Project.load(repo)
    before = abtest.compare(project, now=start + dt.timedelta(minutes=20), count_look=False)
    assert before.decision == "wait"  # the report came later: not counted yet
    c = abtest.compare(project, now=start + dt.timedelta(hours=1), count_look=False)
    assert c.decision == "stop" and "1 answer(s) of 1.1.0 reported critical/safety" in c.reasons[0]
    assert c.metrics["1.1.0"]["critical"] == 1 and c.metrics["1.0.0"]["critical"] == 0
    # configurable: two reports needed
    with open(repo / "cl-release.yaml", "a") as f:
        f.write("  guardrails:\n    critical_reports: 2\n")
    assert abtest.compare(Project.load(repo), now=start + dt.timedelta(hours=1), count_look=False).decision == "wait"


def test_a_skewed_split_trips_the_srm_check_and_refuses_promotion(repo):
    start = T0 + dt.timedelta(days=31)
    abtest.start(repo, "1.1.0", traffic=0.5, now=start)
    log_arm(repo, "1.0.0", 700, start=start, positive=0.65)
    log_arm(repo, "1.1.0", 450, start=start, positive=0.90)  # 39% of the answers where 50% were routed
    project = Project.load(repo)
    at = start + dt.timedelta(hours=49)
    c = abtest.compare(project, now=at)
    srm = {x["name"]: x for x in c.checks}["srm"]
    assert not srm["ok"] and c.srm["p_value"] < 0.001 and c.srm["share"] == pytest.approx(450 / 1150)
    assert c.decision == "wait" and [x["name"] for x in c.checks if not x["ok"]] == ["srm"]
    assert "routing or logging is broken" in c.reasons[-1] and any("fix routing or logging" in w for w in c.waiting_for)
    with pytest.raises(UserError, match="srm: sample ratio mismatch, 1.1.0 has 39.13% of the answers where 50%"):
        abtest.promote(project, now=at)
    r = abtest.promote(project, now=at, auto=True)
    assert not r.promoted and not r.stopped and "abtest" in Registry(repo).load()
    out = run(repo, "ab", "compare")
    assert "[--] srm" in out and "1.1.0 has 39.13% of the answers (configured 50%)" in out
    # the same challenger with a sound split is promoted: the check is what held it back
    log_arm(repo, "1.1.0", 250, start=start, positive=0.90, seed=1)
    assert abtest.promote(project, now=at, auto=True).promoted


def test_every_decision_is_recorded_with_method_figures_and_look(repo):
    start = T0 + dt.timedelta(days=31)
    project = Project.load(repo)
    abtest.start(repo, "1.1.0", traffic=0.5, now=start)
    simulate(repo, start=start, keys=1200, positive={"1.0.0": 0.70, "1.1.0": 0.85})
    assert abtest.compare(project, now=start + dt.timedelta(hours=1)).look == 1
    assert abtest.compare(project, now=start + dt.timedelta(hours=2)).look == 2
    assert abtest.compare(project, now=start + dt.timedelta(hours=3), count_look=False).look is None
    r = abtest.promote(project, now=start + dt.timedelta(hours=49), auto=True)
    assert r.promoted and r.comparison.look == 3
    data = Registry(repo).load()
    e = data["events"][-1]
    assert (e["action"], e["look"], e["method"]) == ("promote", 3, abtest.METHOD)
    f = e["figures"]
    assert f["metric"] == "positive_rate" and f["alpha"] == 0.05 and f["hours"] == 49.0
    assert f["interval"][0] > 0 and f["p_value"] < 0.05 and f["diff"] == pytest.approx(f["diff"], rel=1e-6)
    assert set(f["guardrails"]) == set(abtest.GUARDRAILS) and f["srm"]["expected"] == 0.5
    assert registry_at_head(repo) == data
    # a new test counts its looks from 1 again
    abtest.rollback_champion(repo, now=start + dt.timedelta(hours=50))
    abtest.start(repo, "1.1.0", traffic=0.5, now=start + dt.timedelta(hours=51))
    assert abtest.compare(project, now=start + dt.timedelta(hours=52)).look == 1


def test_decide_on_mean_quality():
    from cl_release.decide.triggers import Metrics

    conf = {**abtest.ab_config(None), "significance_metric": "quality", "min_samples": 100}

    def arm(v, mean, n=2000):  # quality scores with mean ``mean`` and spread 0.2
        return abtest.Arm(v, Metrics(records=n, feedback=n, quality_n=n, quality_sum=mean * n,
                                     quality_sq=n * (mean**2 + 0.04), opinions=n, positive=int(mean * n),
                                     negative=n - int(mean * n)))

    better = abtest.decide(arm("a", 0.60), arm("b", 0.66), hours=72, traffic=0.5, conf=conf)
    assert better.decision == "promote" and better.test["metric"] == "quality" and better.test["interval"][0] > 0
    same = abtest.decide(arm("a", 0.60), arm("b", 0.61), hours=72, traffic=0.5, conf=conf)
    assert same.decision == "wait" and not same.test["significant"]
    assert any("interval of quality to lie above 0" in w for w in same.waiting_for)


def test_an_unreadable_look_counter_is_an_error_naming_it(repo):
    abtest.start(repo, "1.1.0", traffic=0.5, now=T0 + dt.timedelta(days=31))
    path = repo / abtest.LOOKS_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("{not json")
    with pytest.raises(UserError, match="looks.json: unreadable look counter"):
        abtest.compare(Project.load(repo), now=T0 + dt.timedelta(days=32))


def test_store_reads_flags_and_latency_ranks_in_the_window(repo):
    start = T0 + dt.timedelta(days=31)
    ids = log_arm(repo, "1.1.0", 10, start=start, latency=100.0)
    store = FeedbackStore(Project.load(repo).feedback_path)
    store.feedback(ids[0], error_tag="", created_at=start + dt.timedelta(minutes=59))  # empty: not an error
    store.feedback(ids[1], error_tag="unit", created_at=start + dt.timedelta(minutes=59))
    store.feedback(ids[1], error_tag="unit again", created_at=start + dt.timedelta(minutes=59, seconds=1))
    store.feedback(ids[2], severity="safety", created_at=start + dt.timedelta(minutes=59))
    store.feedback(ids[3], severity="critical", created_at=start + dt.timedelta(hours=3))  # after the look
    store.feedback(ids[2], rating=5, created_at=start + dt.timedelta(minutes=59, seconds=30))  # later, no severity
    until = start + dt.timedelta(hours=2)
    flags = store.answer_flags(since=start, until=until, versions=["1.1.0", "1.0.0"])
    assert flags == {"1.1.0": {"errors": 1, "critical": 1}}  # answers, not rows; a report stays a report
    ranks = store.latency_ranks(since=start, until=until, version="1.1.0")
    values = [ranks.at(k) for k in range(1, 11)]
    assert values == sorted(values) and 100 <= values[0] and values[-1] <= 120
    for k in (0, 11):
        with pytest.raises(IndexError):
            ranks.at(k)
    store.close()


# ---------------------------------------------------------------- CLI


def run(root: Path, *args: str, code: int = 0) -> str:
    result = CliRunner().invoke(main, ["-C", str(root), *args])
    assert result.exit_code == code, result.output
    return result.output


def test_cli_ab_cycle(repo):
    assert "challenger -" in run(repo, "ab", "status")
    assert "1.1.0 on 10%" in run(repo, "ab", "start", "1.1.0", "--traffic", "0.1")
    status = json.loads(run(repo, "ab", "status", "--json"))
    assert status["aliases"] == {"champion": "1.0.0", "challenger": "1.1.0"} and status["abtest"]["traffic"] == 0.1
    assert status["comparison"]["decision"] == "wait" and status["comparison"]["look"] == 1
    comparison = json.loads(run(repo, "ab", "compare", "--json"))
    assert comparison["decision"] == "wait" and set(comparison["metrics"]) == {"1.0.0", "1.1.0"}
    assert comparison["look"] == 2 and [g["name"] for g in comparison["guardrails"]] == list(abtest.GUARDRAILS)
    assert comparison["srm"]["expected"] == 0.1 and comparison["waiting_for"]
    text = run(repo, "ab", "status")
    for part in ("look 3", "guardrails (stop when significantly worse", "[--] latency_p95", "srm", "decision: wait",
                 "waiting for: 100 more answers with a rating or thumbs on 1.0.0"):
        assert part in text, part
    assert "not promoted" in run(repo, "ab", "promote", "--auto")
    assert "not ready to promote" in run(repo, "ab", "promote", code=2)
    assert "promoted 1.1.0" in run(repo, "ab", "promote", "--force", "--reason", "manual")
    assert "1.1.0 -> 1.0.0" in run(repo, "ab", "rollback")
    assert "no A/B test is running" in run(repo, "ab", "stop", code=2)


def test_every_decision_command_has_help():
    for args in (["status"], ["ab"], ["ab", "start"], ["ab", "status"], ["ab", "compare"], ["ab", "promote"],
                 ["ab", "stop"], ["ab", "rollback"], ["ab", "champion"], ["watch"], ["serve"]):
        out = CliRunner().invoke(main, [*args, "--help"]).output
        assert "Usage:" in out and len(out.split("\n\n")[1].strip()) > 10, args
