"""``cl-release patch``: the incident workflow, end to end with the fake trainer and the fake
Hub, a second run, a dry run, the no-id mode, and a real kill -9 at every step."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

import cl_release.eval.gates as gates
from cl_release.decide import abtest
from cl_release.cli import main
from cl_release.store.sqlite import FeedbackStore
from cl_release.release.incident import incident_tests, values
from cl_release.project import Project
from cl_release.registry import Registry

from fakehub import FakeHub
from helpers import (
    REPO, TESTS, FakeTrainer, copy_repo, released_template, assert_registry_consistent_with_git, git, registry_data,
    tags,
)

CRASHRUN = TESTS / "crashrun.py"
TOKEN = "hf_incidentSECRET"
QUESTION = "What is the IDLH of phosgene?"
WRONG = "The IDLH of phosgene is 10 ppm."
RIGHT = "The IDLH of phosgene is 2 ppm."


def no_gates(**_kw):
    """The release evaluator for the fake adapter (nothing to evaluate): accepts the candidate."""
    return lambda project, plan, entry: entry


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> Path:
    """1.0.0 released and champion; the incident's answer logged (by 1.0.0, wrong)."""
    with released_template(tmp_path_factory, "incident-template") as root:
        abtest.set_champion(root, "1.0.0")
        with FeedbackStore(Project.load(root).feedback_path) as store:
            store.log(QUESTION, WRONG, request_id="inc-1", model_version="1.0.0")
    return root


@pytest.fixture
def trainer(trainer, monkeypatch) -> FakeTrainer:
    """conftest's fake trainer, with the gates off."""
    monkeypatch.setattr(gates, "release_evaluator", no_gates)
    return trainer


@pytest.fixture
def repo(template, tmp_path, trainer) -> Path:
    return copy_repo(template, tmp_path)


@pytest.fixture
def hub(monkeypatch, tmp_path):
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-login" / "token"))
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    with FakeHub(TOKEN) as server:
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        yield server


def cli(root: Path, *args: str):
    return CliRunner().invoke(main, ["-C", str(root), *args])


def suite_rows(root: Path) -> list[dict]:
    path = root / "registry" / "regression_tests.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.is_file() else []


# ---------------------------------------------------------------- the tests a correction makes


def test_values_and_incident_tests():
    assert values("Evacuate at 10 ppm; store below -20 °C and at 50% humidity, 2.5 mg/m3.") == [
        "10 ppm", "-20 °C", "50%", "2.5 mg/m3"]
    rows = incident_tests({"id": "r", "input": [{"role": "user", "content": QUESTION}], "output": WRONG,
                           "correction": RIGHT})
    assert [(r["id"], r["match"], r["expected"], r["criticality"]) for r in rows] == [
        ("incident-r", "contains", ["2 ppm"], "critical"), ("incident-r-not", "not_contains", ["10 ppm"], "critical")]
    assert rows[0]["input"] == QUESTION
    plain = incident_tests({"id": "s", "input": "Mix bleach and ammonia?", "output": "Yes, it cleans well.",
                            "correction": "Never: it releases toxic chloramine gas."})
    assert [(r["match"], r["expected"]) for r in plain] == [("contains", "Never: it releases toxic chloramine gas")]


# ---------------------------------------------------------------- the whole incident


def test_the_whole_incident_then_a_second_run_is_a_no_op(repo, trainer, hub):
    import yaml

    project = yaml.safe_load((repo / "cl-release.yaml").read_text())
    project["hub"]["push_patches"] = True
    (repo / "cl-release.yaml").write_text(yaml.safe_dump(project, sort_keys=False))
    git(repo, "commit", "-qam", "push patches")
    r = cli(repo, "patch", "inc-1", "--correction", RIGHT)
    assert r.exit_code == 0, (r.stdout, r.stderr)
    assert "incident-inc-1: contains ['2 ppm']" in r.stdout and "incident-inc-1-not: not_contains ['10 ppm']" in r.stdout
    assert "Released 1.0.1 (patch of 1.0.0)" in r.stdout and "champion: 1.0.1 (was 1.0.0)" in r.stdout
    assert "pushed v1.0.1 to test-org/test-model" in r.stdout
    # the correction, the critical tests, the champion, the marks, the push and its card
    with FeedbackStore(Project.load(repo).feedback_path) as store:
        row = store.get("inc-1")
        assert (row["correction"], row["rating"], row["severity"]) == (RIGHT, 1, "critical")
        assert store.used_by("1.0.1") == {"inc-1": "corrections"}
    assert {(t["id"], t["criticality"]) for t in suite_rows(repo)} >= {("incident-inc-1", "critical"),
                                                                       ("incident-inc-1-not", "critical")}
    data = registry_data(repo)
    assert data["aliases"]["champion"] == "1.0.1" and data["current"] == "1.0.1"
    entry = Registry(repo).get("1.0.1")
    assert "incident inc-1" in entry["notes"] and entry["pushes"][0]["revision"] == "v1.0.1"
    card = hub.repos["test-org/test-model"].files("v1.0.1")["README.md"].decode()
    assert "incident inc-1" in card and "incident-inc-1" in card
    assert git(repo, "status", "--porcelain") == "" and tags(repo) == {"v1.0.0", "v1.0.1"}
    assert_registry_consistent_with_git(repo)
    d = json.loads(cli(repo, "status", "--json").stdout)
    assert not next(t for t in d["triggers"] if t["name"] == "critical")["due"]

    head, calls = git(repo, "rev-parse", "HEAD"), len(trainer.calls)
    again = cli(repo, "patch", "inc-1", "--correction", RIGHT)
    assert again.exit_code == 0, again.output
    assert "Nothing to do: inc-1 already fixed in 1.0.1" in again.stdout
    assert git(repo, "rev-parse", "HEAD") == head and len(trainer.calls) == calls
    assert len(suite_rows(repo)) == len({t["id"] for t in suite_rows(repo)})  # no test twice


def test_dry_run_shows_the_tests_and_the_plan_and_writes_nothing(repo, trainer):
    before = (git(repo, "rev-parse", "HEAD"), suite_rows(repo))
    r = cli(repo, "patch", "inc-1", "--correction", RIGHT, "--dry-run")
    assert r.exit_code == 0, r.output
    assert "incident-inc-1: contains ['2 ppm']" in r.stdout and "plan: 1.0.1 on 1.0.0 (corrections 1" in r.stdout
    assert (git(repo, "rev-parse", "HEAD"), suite_rows(repo)) == before and trainer.calls[1:] == []
    assert FeedbackStore(Project.load(repo).feedback_path).get("inc-1")["correction"] is None


def test_without_ids_it_takes_what_status_reports_as_a_patch_due(repo, trainer):
    assert "Nothing to patch" in cli(repo, "patch").stdout
    with FeedbackStore(Project.load(repo).feedback_path) as store:
        store.feedback("inc-1", rating=1, correction=RIGHT, severity="safety")
        store.log("How do I store chlorine?", "Anywhere.", request_id="minor-1", model_version="1.0.0")
        store.feedback("minor-1", rating=2, correction="In a cool, dry, ventilated area.", severity="low")
    status = cli(repo, "status")
    assert status.exit_code == 10 and "update due: PATCH" in status.stdout
    assert "cl-release patch" in status.stdout  # the runbook's command, named
    r = cli(repo, "patch")
    assert r.exit_code == 0, r.output
    assert "incident-inc-1" in r.stdout and "incident-minor-1" not in r.stdout  # only critical/safety ones
    plan_parts = {p["role"]: p["examples"] for p in Registry(repo).get("1.0.1")["datasets"]}
    assert plan_parts["corrections"] == 2  # the patch trains on every open correction
    assert cli(repo, "status").exit_code == 0


def test_unknown_request_and_correction_with_several_ids(repo, trainer):
    r = cli(repo, "patch", "nope", "--correction", "x")
    assert r.exit_code == 2 and "no logged answer with request id 'nope'" in r.stderr
    r = cli(repo, "patch", "inc-1", "other", "--correction", "x")
    assert r.exit_code == 2 and "exactly one request id" in r.stderr
    r = cli(repo, "patch", "inc-1")
    assert r.exit_code == 2 and "has no correction" in r.stderr and "--correction" in r.stderr


# ---------------------------------------------------------------- kill -9 at every step

STEPS = ["incident-correction", "incident-tests", "incident-suite", "trained", "registry", "incident-released"]


@pytest.mark.skipif(not hasattr(os, "killpg"), reason="needs POSIX process groups")
@pytest.mark.parametrize("step", STEPS)
def test_kill_9_at_every_step_then_a_rerun_completes(repo, trainer, hub, tmp_path, step):
    marker = tmp_path / "paused"
    env = {**os.environ, "CL_RELEASE_TEST_PAUSE": step, "CL_RELEASE_TEST_MARKER": str(marker),
           "CL_RELEASE_TEST_NO_GATES": "1",
           "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)}
    args = ["-C", str(repo), "patch", "inc-1", "--correction", RIGHT, "--push"]
    log = tmp_path / "killed.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, str(CRASHRUN), *args], env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not marker.exists():
            assert proc.poll() is None, f"ended before {step}:\n{log.read_text()}"
            assert time.monotonic() < deadline, f"did not reach {step}:\n{log.read_text()}"
            time.sleep(0.02)
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)

    r = cli(repo, "patch", "inc-1", "--correction", RIGHT, "--push")
    assert r.exit_code == 0, (r.stdout, r.stderr)
    data = registry_data(repo)
    assert [m["version"] for m in data["models"]] == ["1.0.0", "1.0.1"]
    assert data["aliases"]["champion"] == "1.0.1" and tags(repo) == {"v1.0.0", "v1.0.1"}
    assert [p["revision"] for p in Registry(repo).get("1.0.1")["pushes"]] == ["v1.0.1"]
    assert hub.repos["test-org/test-model"].tags.keys() == {"v1.0.1"}
    ids = [t["id"] for t in suite_rows(repo)]
    assert ids.count("incident-inc-1") == 1 and ids.count("incident-inc-1-not") == 1
    with FeedbackStore(Project.load(repo).feedback_path) as store:
        assert store.get("inc-1")["correction"] == RIGHT
    assert git(repo, "status", "--porcelain") == ""
    assert_registry_consistent_with_git(repo)
