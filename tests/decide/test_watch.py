"""The watch loop: triggers -> release -> challenger -> compare -> promote/stop; crash re-runs; the lock.

Fast tests use a fake release function (a registry entry + commit, no training). The one
slow test runs the whole cycle with real Axolotl training of the tiny demo model.
"""

from __future__ import annotations

import datetime as dt
import json
import shutil
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest
from click.testing import CliRunner

from cl_release.decide import abtest

from cl_release.decide import watch
from cl_release.cli import main
from cl_release.errors import LockedError, UserError
from cl_release.store.sqlite import FeedbackStore
from cl_release.gitops import ReleaseRepo
from cl_release.project import Project
from cl_release.registry import Registry, bump_version

from helpers import fake_entry, fake_repo, git, log_chat_file, registry_at_head, simulate
from test_triggers import seed

T0 = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)
H = dt.timedelta(hours=1)
REG = "registry/model_registry.json"
YAML = """\
triggers:
  min_new_examples: 20
abtest:
  traffic: 0.5
  min_samples: 100
  min_duration_hours: 48
"""


class FakeRelease:
    """Stands in for run_release: records an entry (released or rejected) and commits it."""

    def __init__(self, clock: dict, status: str = "released", crash_after_record: bool = False):
        self.clock, self.status, self.crash = clock, status, crash_after_record
        self.calls: list[dict] = []

    def __call__(self, project, *, bump, notes, progress):
        data = Registry(project.root).load()
        parent = data["current"]
        version = bump_version(parent, bump, {m["version"] for m in data["models"]})
        strategy = {"minor": "continued_lora", "patch": "patch", "major": "merge_and_retrain"}[bump]
        entry = fake_entry(version, parent, self.clock["now"], status=self.status,
                           strategy=strategy if parent else "initial")
        self.calls.append({"bump": bump, "notes": notes, "version": version})
        Registry(project.root).append(entry, make_current=self.status == "released")
        ReleaseRepo(project.root).commit([REG], f"Release {version}")
        if self.crash:
            raise RuntimeError("killed after recording the release")
        return SimpleNamespace(entry=entry)


@pytest.fixture
def repo(tmp_path) -> Path:
    return fake_repo(tmp_path, [fake_entry("1.0.0", None, T0)], champion="1.0.0", yaml_extra=YAML)


def store_of(root: Path) -> FeedbackStore:
    return FeedbackStore(Project.load(root).feedback_path)


def test_full_cycle_release_challenger_promote(repo):
    clock = {"now": T0 + 10 * 24 * H}
    release = FakeRelease(clock)
    assert watch.watch_once(repo, now=clock["now"], release=release).outcome == "idle"
    with store_of(repo) as store:
        seed(store, n=25, start=T0 + 24 * H)
    it = watch.watch_once(repo, now=clock["now"], release=release)
    assert it.outcome == "challenger_started" and release.calls[0]["bump"] == "minor"
    assert "new_examples" in release.calls[0]["notes"]
    data = Registry(repo).load()
    assert data["aliases"] == {"champion": "1.0.0", "challenger": "1.1.0"} and data["abtest"]["traffic"] == 0.5

    simulate(repo, start=clock["now"] + H, keys=600, positive={"1.0.0": 0.6, "1.1.0": 0.9})
    waiting = watch.watch_once(repo, now=clock["now"] + 24 * H, release=release)
    assert waiting.outcome == "waiting" and "duration" in waiting.steps[-1]
    done = watch.watch_once(repo, now=clock["now"] + 49 * H, release=release)
    assert done.outcome == "promoted" and len(release.calls) == 1
    data = Registry(repo).load()
    assert data["aliases"] == {"champion": "1.1.0"} and "abtest" not in data
    assert [e["action"] for e in data["events"]] == ["set_champion", "ab_start", "promote"]
    assert registry_at_head(repo) == data

    last = watch.last_iteration(repo)
    assert last["outcome"] == "promoted" and last["finished_at"]
    out = CliRunner().invoke(main, ["-C", str(repo), "watch", "--status"]).output
    assert "promoted" in out and "1.1.0" in out
    history = (repo / watch.HISTORY_FILE).read_text().splitlines()
    assert [json.loads(x)["outcome"] for x in history] == ["idle", "challenger_started", "waiting", "promoted"]


def test_losing_challenger_is_stopped(repo):
    clock = {"now": T0 + 10 * 24 * H}
    with store_of(repo) as store:
        seed(store, n=25, start=T0 + 24 * H)
    watch.watch_once(repo, now=clock["now"], release=FakeRelease(clock))
    simulate(repo, start=clock["now"] + H, keys=600, positive={"1.0.0": 0.9, "1.1.0": 0.6})
    it = watch.watch_once(repo, now=clock["now"] + 49 * H, release=FakeRelease(clock))
    assert it.outcome == "stopped"
    data = Registry(repo).load()
    assert data["aliases"] == {"champion": "1.0.0"} and data["current"] == "1.0.0"


def test_a_guardrail_breach_stops_the_test_with_its_evidence(repo):
    from helpers import log_arm

    clock = {"now": T0 + 10 * 24 * H}
    with store_of(repo) as store:
        seed(store, n=25, start=T0 + 24 * H)
    watch.watch_once(repo, now=clock["now"], release=FakeRelease(clock))
    log_arm(repo, "1.0.0", 300, start=clock["now"] + H, latency=200.0)
    log_arm(repo, "1.1.0", 300, start=clock["now"] + H, latency=320.0)  # slower: the p95 guardrail
    it = watch.watch_once(repo, now=clock["now"] + 3 * H, release=FakeRelease(clock))  # before 48 h
    assert it.outcome == "stopped" and "guardrail latency_p95" in it.steps[-1] and "(look 1)" in it.steps[-1]
    data = Registry(repo).load()
    e = data["events"][-1]
    assert e["action"] == "ab_stop" and e["look"] == 1 and e["figures"]["guardrails"]["latency_p95"]["state"] == "worse"
    assert data["aliases"] == {"champion": "1.0.0"} and data["current"] == "1.0.0" and registry_at_head(repo) == data


def test_a_critical_report_on_the_challenger_stops_it_at_the_next_look(repo):
    from helpers import log_arm

    clock = {"now": T0 + 10 * 24 * H}
    with store_of(repo) as store:
        seed(store, n=25, start=T0 + 24 * H)
    watch.watch_once(repo, now=clock["now"], release=FakeRelease(clock))
    ids = log_arm(repo, "1.1.0", 5, start=clock["now"] + H)
    with store_of(repo) as store:  # no correction: the release trigger does not fire, the A/B guardrail does
        store.feedback(ids[0], severity="critical", notes="dangerous advice", created_at=clock["now"] + 2 * H)
    it = watch.watch_once(repo, now=clock["now"] + 3 * H, release=FakeRelease(clock))
    assert it.outcome == "stopped" and "reported critical/safety" in it.steps[-1]
    assert Registry(repo).load()["events"][-1]["figures"]["critical_reports"]["1.1.0"] == 1


def test_rejected_release_means_no_challenger_and_cools_down(repo):
    clock = {"now": T0 + 10 * 24 * H}
    with store_of(repo) as store:
        seed(store, n=25, start=T0 + 24 * H)
    rejecting = FakeRelease(clock, status="rejected")
    it = watch.watch_once(repo, now=clock["now"], release=rejecting)
    assert it.outcome == "rejected" and it.release["status"] == "rejected"
    assert "abtest" not in Registry(repo).load()
    again = watch.watch_once(repo, now=clock["now"] + H, release=rejecting)
    assert again.outcome == "idle" and len(rejecting.calls) == 1  # the cooldown: no retraining loop


def test_crash_between_release_and_start_is_safe_to_rerun(repo):
    clock = {"now": T0 + 10 * 24 * H}
    with store_of(repo) as store:
        seed(store, n=25, start=T0 + 24 * H)
    crashing = FakeRelease(clock, crash_after_record=True)
    with pytest.raises(RuntimeError):
        watch.watch_once(repo, now=clock["now"], release=crashing)
    assert watch.last_iteration(repo)["outcome"] == "failed"
    fine = FakeRelease(clock)
    it = watch.watch_once(repo, now=clock["now"] + H, release=fine)
    assert it.outcome == "challenger_started" and not fine.calls  # deployed, not released again
    assert Registry(repo).load()["abtest"]["challenger"] == "1.1.0"


def test_critical_feedback_stops_the_test_and_ships_a_patch_as_champion(repo):
    clock = {"now": T0 + 10 * 24 * H}
    with store_of(repo) as store:
        seed(store, n=25, start=T0 + 24 * H)
    release = FakeRelease(clock)
    watch.watch_once(repo, now=clock["now"], release=release)
    clock["now"] += 2 * H
    with store_of(repo) as store:
        seed(store, n=1, start=clock["now"] - H, rating=1, correction="Never mix bleach and ammonia.",
             severity="safety", tag="crit")
    it = watch.watch_once(repo, now=clock["now"], release=release)
    assert it.outcome == "champion_set" and release.calls[-1]["bump"] == "patch"
    data = Registry(repo).load()
    patch = release.calls[-1]["version"]
    assert patch == "1.0.1" and data["aliases"] == {"champion": "1.0.1"}  # built on the champion, not 1.1.0
    assert [e["action"] for e in data["events"]] == ["set_champion", "ab_start", "ab_stop", "set_champion"]


def test_first_release_becomes_champion(tmp_path):
    root = fake_repo(tmp_path, [], yaml_extra=YAML)
    clock = {"now": T0}
    it = watch.watch_once(root, now=T0, release=FakeRelease(clock))
    assert it.outcome == "champion_set"
    assert Registry(root).load()["aliases"] == {"champion": "1.0.0"}


def test_two_loops_cannot_run_at_once(tmp_path):
    real_now = dt.datetime.now(dt.timezone.utc)
    repo = fake_repo(tmp_path, [fake_entry("1.0.0", None, real_now - 48 * H)], champion="1.0.0")
    with watch.watch_lock(repo):
        with pytest.raises(LockedError, match="watch"):
            watch.watch_once(repo, release=FakeRelease({"now": real_now}))
        held = CliRunner().invoke(main, ["-C", str(repo), "watch", "--once"])
        assert held.exit_code == 1 and "another 'cl-release watch' is running" in held.output
    result = CliRunner().invoke(main, ["-C", str(repo), "watch", "--once"])
    assert result.exit_code == 0 and "idle" in result.output, result.output  # lock free again; nothing due


def test_watch_forever_continues_after_a_failed_iteration(repo, monkeypatch):
    outcomes = []
    calls = iter([RuntimeError, None])

    def flaky(root, **kw):
        exc = next(calls)
        if exc:
            from cl_release.errors import TrainingError

            raise TrainingError("boom")
        outcomes.append("ok")
        return watch.Iteration(started_at="2026-01-01T00:00:00Z", outcome="idle")

    monkeypatch.setattr(watch, "iterate", flaky)
    sleeps = []
    messages = []
    watch.watch_forever(repo, interval_s=5, iterations=2, sleep=sleeps.append, progress=messages.append)
    assert outcomes == ["ok"] and sleeps == [5] and "iteration failed: boom" in messages


@pytest.mark.parametrize("text, seconds", [("90s", 90), ("15m", 900), ("1h", 3600), ("2d", 172800), ("30", 30)])
def test_parse_interval(text, seconds):
    assert watch.parse_interval(text) == seconds


def test_parse_interval_rejects_nonsense():
    with pytest.raises(UserError):
        watch.parse_interval("soon")


def test_watch_status_before_any_run(repo):
    out = CliRunner().invoke(main, ["-C", str(repo), "watch", "--status"]).output
    assert "has not run yet" in out


# ---------------------------------------------------------------- the real cycle


@pytest.mark.slow
def test_watch_once_full_cycle_with_real_training(tmp_path, monkeypatch):
    """Tiny model: 1.0.0 -> feedback -> watch releases 1.1.0 as challenger -> traffic -> promoted."""
    from cl_release.release.run import run_release
    from cl_release.release.scaffold import init_repository

    for k, v in {"HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "AXOLOTL_DO_NOT_TRACK": "1"}.items():
        monkeypatch.setenv(k, v)
    root = init_repository(tmp_path / "repo", demo=True)
    import yaml

    project_file = root / "cl-release.yaml"
    settings = yaml.safe_load(project_file.read_text())
    settings.update(yaml.safe_load(YAML.replace("min_samples: 100", "min_samples: 60")))
    settings["gates"] = {"min_new_examples": 0, "accuracy_tolerance": 1.0, "hallucination_tolerance": 1.0,
                         "max_critical_regressions": 1000}
    project_file.write_text(yaml.safe_dump(settings, sort_keys=False))
    git(root, "commit", "-qam", "watch settings for the test")
    first = run_release(Project.load(root), bump="minor", notes="initial")
    assert first.entry["version"] == "1.0.0"
    abtest.set_champion(root, "1.0.0")

    # Production feedback on 1.0.0: good answers rated 5 (the new examples that trigger an update).
    now = dt.datetime.now(dt.timezone.utc)
    incoming = root / "datasets" / "incoming" / "q2-storage.jsonl"
    store = store_of(root)
    log_chat_file(store, incoming, 40, model_version="1.0.0", start=now)
    store.close()
    # New data either way (in case the release does not yet read feedback into its data).
    shutil.copy2(incoming, root / "datasets" / "domain" / "q2-storage.jsonl")
    git(root, "add", "-A")
    git(root, "commit", "-qm", "Q2 data")

    t1 = now + 25 * H  # after the cooldown of 1.0.0
    it = watch.watch_once(root, now=t1, progress=print)
    assert it.outcome == "challenger_started", it.to_dict()
    data = Registry(root).load()
    assert data["abtest"]["challenger"] == "1.1.0" and data["models"][-1]["status"] == "released"
    assert "v1.1.0" in git(root, "tag").split()

    simulate(root, start=t1 + H, keys=400, positive={"1.0.0": 0.6, "1.1.0": 0.9}, prefix="sim")
    done = watch.watch_once(root, now=t1 + 50 * H, progress=print)
    assert done.outcome == "promoted", done.to_dict()
    data = Registry(root).load()
    assert data["aliases"] == {"champion": "1.1.0"} and data["current"] == "1.1.0"
    assert [e["action"] for e in data["events"]] == ["set_champion", "ab_start", "promote"]
    assert registry_at_head(root) == data
    assert subprocess.run(["git", "-C", str(root), "status", "--porcelain", REG], capture_output=True,
                          text=True).stdout == ""
