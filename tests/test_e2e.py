"""End to end with real Axolotl on the demo model: 1.0.0 -> 1.1.0 (continued LoRA) learn their data,
merge, verify; a release at learning rate 0 is rejected by the new-data gate."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
from click.testing import CliRunner

from cl_release.cli import main

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent


def cli(*args: str) -> str:
    result = CliRunner().invoke(main, list(args), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


def lora_tensors(adapter_dir: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(adapter_dir / "adapter_model.safetensors"))


@pytest.fixture(scope="module")
def demo_repo(tmp_path_factory, tiny_model_dir) -> Path:
    """A demo release repository released to 1.0.0 then 1.1.0 with real training."""
    import os

    for key, value in {"HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "AXOLOTL_DO_NOT_TRACK": "1",
                       "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t.invalid",
                       "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t.invalid"}.items():
        os.environ.setdefault(key, value)
    root = tmp_path_factory.mktemp("e2e") / "repo"
    cli("init", str(root), "--demo")
    cli("-C", str(root), "release", "minor", "--notes", "initial: IDLH")
    shutil.copy(root / "datasets/incoming/q2-storage.jsonl", root / "datasets/domain/")
    subprocess.run(["git", "-C", str(root), "add", "-A"], check=True)
    subprocess.run(["git", "-C", str(root), "commit", "-qm", "Q2 data"], check=True)
    cli("-C", str(root), "release", "minor", "--notes", "Q2 storage")
    return root


def test_lineage_and_tags(demo_repo: Path):
    reg = json.loads((demo_repo / "registry/model_registry.json").read_text())
    assert [m["version"] for m in reg["models"]] == ["1.0.0", "1.1.0"]
    first, second = reg["models"]
    assert (first["strategy"], second["strategy"]) == ("initial", "continued_lora")
    assert second["parent"] == "1.0.0" and reg["current"] == "1.1.0"
    assert {d["role"] for d in second["datasets"]} >= {"new", "replay"}
    assert second["toolchain"]["axolotl"] and second["training"]["train_loss"] is not None
    tags = subprocess.run(["git", "-C", str(demo_repo), "tag"], capture_output=True, text=True).stdout.split()
    assert tags == ["v1.0.0", "v1.1.0"]
    config = (demo_repo / "outputs/v1.1.0/axolotl.yml").read_text()
    assert 'lora_model_dir: "outputs/v1.0.0/adapter"' in config
    assert "learning_rate: 0.002" in config  # the demo project's rate for the tiny model


def test_the_demo_releases_learn_their_data(demo_repo: Path):
    """The targets of the demo (README, "The demo"): the base knows no domain fact, 1.0.0 answers
    >= 80% of the Q1 tests, 1.1.0 >= 80% of Q1 + Q2, each on >= 80% of its held-out checks."""
    reg = json.loads((demo_repo / "registry/model_registry.json").read_text())
    first, second = reg["models"]
    assert first["evaluation"]["baseline"]["per_domain"]["idlh"] == 0.0
    assert first["evaluation"]["per_domain"]["idlh"] >= 0.8
    q12 = [c for c in json.loads((demo_repo / second["evaluation"]["results"]).read_text())["cases"]
           if c["domain"] in ("idlh", "storage")]
    assert sum(c["passed"] for c in q12) >= 0.8 * len(q12)
    for entry in (first, second):
        new_data = entry["evaluation"]["new_data"]
        assert new_data["source"] == "heldout" and new_data["n_checks"] == entry["heldout"]["examples"] == 10
        assert new_data["pass_rate"] >= 0.8, new_data
        assert {c["name"]: c["passed"] for c in entry["gates"]["checks"]}["min_new_data_pass_rate"] is True


def test_continued_from_parent_weights(demo_repo: Path):
    """1.1.0 started from 1.0.0's adapter (not a fresh LoRA) and changed it."""
    import torch

    parent = lora_tensors(demo_repo / "outputs/v1.0.0/adapter")
    child = lora_tensors(demo_repo / "outputs/v1.1.0/adapter")
    assert parent.keys() == child.keys()
    changed = 0
    for name, p in parent.items():
        c = child[name]
        cos = torch.nn.functional.cosine_similarity(p.flatten(), c.flatten(), dim=0)
        if "lora_A" in name:
            # A fresh LoRA re-draws A at random: cosine similarity near 0. Continued: near 1
            # (0.92-1.0 at the demo's learning rate, 2e-3 for 10 epochs).
            assert cos > 0.8, (name, float(cos))
        if "lora_B" in name:
            # A fresh LoRA starts B at zero; 1.0.0's trained B is kept and moved (cosine >= 0.65 here).
            assert p.abs().sum() > 0
            assert cos > 0.4, (name, float(cos))
        changed += int(not torch.equal(p, c))
    assert changed > 0, "1.1.0 produced the same weights as 1.0.0"
    assert json.loads((demo_repo / "outputs/v1.1.0/adapter/adapter_config.json").read_text())["r"] == 8


def test_merge_matches_adapter(demo_repo: Path):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cli("-C", str(demo_repo), "merge", "1.1.0")
    merged = demo_repo / "outputs/v1.1.0/merged"
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "model.safetensors"):
        assert (merged / name).is_file(), name
    entry = json.loads(cli("-C", str(demo_repo), "show", "1.1.0", "--json"))
    assert entry["merged"]["path"] == "outputs/v1.1.0/merged"

    tok = AutoTokenizer.from_pretrained(merged)
    ids = tok("What is the IDLH of ammonia?", return_tensors="pt").input_ids
    base = AutoModelForCausalLM.from_pretrained(demo_repo / "models/tiny-llama")
    with_adapter = PeftModel.from_pretrained(base, demo_repo / "outputs/v1.1.0/adapter").eval()
    merged_model = AutoModelForCausalLM.from_pretrained(merged).eval()
    with torch.no_grad():
        a = with_adapter(ids).logits
        b = merged_model(ids).logits
    assert torch.allclose(a, b, atol=1e-4)


def test_merge_refuses_foreign_base(demo_repo: Path, tmp_path: Path):
    cfg_path = demo_repo / "outputs/v1.0.0/adapter/adapter_config.json"
    original = cfg_path.read_text()
    cfg = json.loads(original)
    cfg["base_model_name_or_path"] = "someone/else"
    cfg_path.write_text(json.dumps(cfg))
    try:
        result = CliRunner().invoke(main, ["-C", str(demo_repo), "merge", "1.0.0"])
        assert result.exit_code != 0
        assert "refusing to merge" in result.output
        assert not (demo_repo / "outputs/v1.0.0/merged").exists()
    finally:
        cfg_path.write_text(original)


def test_verify_then_one_byte_changed(demo_repo: Path):
    assert "files match the registry" in cli("-C", str(demo_repo), "verify")
    entry = json.loads(cli("-C", str(demo_repo), "show", "1.1.0", "--json"))
    snapshot = demo_repo / entry["datasets"][0]["path"]
    original = snapshot.read_bytes()
    snapshot.write_bytes(original[:-2] + bytes([original[-2] ^ 1]) + original[-1:])
    try:
        result = CliRunner().invoke(main, ["-C", str(demo_repo), "verify"])
        assert result.exit_code == 1
        assert "MISMATCH 1.1.0" in result.output and snapshot.name in result.output
    finally:
        snapshot.write_bytes(original)


def test_the_incident_workflow_fixes_a_wrong_answer_for_real(demo_repo: Path, tmp_path: Path):
    """cl-release patch on the real demo model: the logged wrong answer is corrected, its tests
    go into the suite, the PATCH of the serving version is gated on them and passes them, and
    becomes champion. (On a copy: the lr-0 test below grows the fixture repository.)"""
    from cl_release.store.sqlite import FeedbackStore
    from cl_release.project import Project

    root = tmp_path / "repo"
    shutil.copytree(demo_repo, root, symlinks=True)
    shutil.copy(root / "datasets/incoming/corrections-001.jsonl", root / "datasets/corrections/")
    subprocess.run(["git", "-C", str(root), "add", "-A"], check=True)
    subprocess.run(["git", "-C", str(root), "commit", "-qm", "the corrections of the quarter"], check=True)
    with FeedbackStore(Project.load(root).feedback_path) as store:
        store.log("What is the IDLH of chlorine?", "The IDLH of chlorine is 25 ppm.", request_id="inc-chlorine",
                  model_version="1.1.0")
    out = cli("-C", str(root), "patch", "inc-chlorine", "--correction", "The IDLH of chlorine is 10 ppm.")
    assert "incident-inc-chlorine: contains ['10 ppm']" in out and "not_contains ['25 ppm']" in out
    assert "Released 1.1.1 (patch of 1.1.0)" in out and "champion: 1.1.1" in out
    entry = json.loads((root / "registry/model_registry.json").read_text())["models"][-1]
    checks = {c["name"]: c for c in entry["gates"]["checks"]}
    assert checks["patch_new_tests"]["passed"] and checks["patch_new_tests"]["threshold"] == 2
    results = {c["id"]: c for c in json.loads((root / entry["evaluation"]["results"]).read_text())["cases"]}
    assert results["incident-inc-chlorine"]["passed"] and results["incident-inc-chlorine-not"]["passed"]
    assert "10 ppm" in results["incident-inc-chlorine"]["output"]
    again = cli("-C", str(root), "patch", "inc-chlorine", "--correction", "The IDLH of chlorine is 10 ppm.")
    assert "Nothing to do: inc-chlorine already fixed in 1.1.1" in again


def test_a_release_that_learns_nothing_is_rejected(demo_repo: Path):
    """Learning rate 0: the adapter does not move, the regression gates see no change (no
    regression), and the new-data gate rejects it with its figures. (Runs last: it adds 1.2.0.)"""
    import torch
    import yaml

    project = demo_repo / "cl-release.yaml"
    settings = yaml.safe_load(project.read_text())
    settings["strategies"]["continued_lora"].update({"learning_rate": 0, "num_epochs": 1})
    project.write_text(yaml.safe_dump(settings, sort_keys=False))
    shutil.copy(demo_repo / "datasets/incoming/q3-protection.jsonl", demo_repo / "datasets/domain/")
    subprocess.run(["git", "-C", str(demo_repo), "add", "-A"], check=True)
    subprocess.run(["git", "-C", str(demo_repo), "commit", "-qm", "Q3 data, learning rate 0"], check=True)
    refused = CliRunner().invoke(main, ["-C", str(demo_repo), "release", "minor", "--notes", "lr 0"])
    assert refused.exit_code == 2 and "learning_rate 0 is outside" in refused.stderr  # refused before training
    from cl_release.eval.gates import release_evaluator
    from cl_release.project import Project
    from cl_release.release.run import run_release

    # trained anyway (the knob override, recorded), with the gates on: the new-data gate rejects it
    result = run_release(Project.load(demo_repo), bump="minor", notes="lr 0", evaluator=release_evaluator(),
                         knob_override="a release that learns nothing, for the gate")
    entry = result.entry
    assert entry["version"] == "1.2.0" and entry["status"] == "rejected"
    assert entry["knob_override"]["warnings"] == ["learning_rate 0 is outside 1e-07..0.005, the sane range for "
                                                  "continued_lora"]
    assert any("the candidate did not learn its new data" in r and "held-out examples of the new data answered "
               "right" in r for r in entry["gates"]["reasons"])
    reg = json.loads((demo_repo / "registry/model_registry.json").read_text())
    entry = reg["models"][-1]
    assert entry["status"] == "rejected" and reg["current"] == "1.1.0"
    reasons = entry["gates"]["reasons"]
    assert len(reasons) == 1 and "at least 80% needed" in reasons[0]  # only the new-data gate saw it
    assert entry["evaluation"]["new_data"]["pass_rate"] < 0.8
    parent = lora_tensors(demo_repo / "outputs/v1.1.0/adapter")
    child = lora_tensors(demo_repo / "outputs/v1.2.0/adapter")
    assert parent.keys() == child.keys() and all(torch.equal(parent[k], child[k]) for k in parent)
