"""The release pipeline with a fake trainer: strategies, versions, records, crashes, locks."""

from __future__ import annotations

import json
import re
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest

import cl_release.release.run as release_mod
from cl_release.data import formats as ds
from cl_release.errors import DataError, GitError, IntegrityError, LockedError, TrainingError, UserError, VersionError
from cl_release.files import sha256_file
from cl_release.registry import Registry, release_lock
from cl_release.release.plan import plan_release
from cl_release.release.recovery import rollback, verify

from helpers import (
    REPO,
    log_chat_file,
    FakeTrainer,
    add_data,
    assert_registry_consistent_with_git,
    commit_all,
    git,
    load_project,
    make_release_repo,
    registry_at_head,
    registry_data,
    release,
    tags,
    tree_snapshot,
    write_fake_model,
)


def records_of(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def hashes(records) -> set[str]:
    return {ds.record_hash(r) for r in records}


def part(result, role):
    (p,) = [p for p in result.plan.parts if p.role == role]
    return p


# ---------------------------------------------------------------- strategies


@pytest.mark.parametrize("bump", ["major", "minor", "patch"])
def test_first_release_is_1_0_0_initial_for_any_bump(root, trainer, bump):
    r = release(root, bump, notes="first")
    e = r.entry
    assert (e["version"], e["parent"], e["strategy"], e["status"], e["bump"]) == ("1.0.0", None, "initial",
                                                                                    "released", bump)
    assert registry_data(root)["current"] == "1.0.0"
    (call,) = trainer.calls
    assert call["config"]["learning_rate"] == 2e-4 and "lora_model_dir" not in call["config"]
    assert call["config"]["base_model"] == "models/base"
    q1 = records_of(root / "datasets" / "domain" / "q1.jsonl")
    held = hashes(r.plan.heldout.records)
    assert len(held) == round(0.1 * len(q1))  # initial: 10% of the new examples are held-out checks
    assert hashes(part(r, "new").records) == hashes(q1) - held
    assert {p.role for p in r.plan.parts} == {"new", "general"}


def test_first_release_refuses_another_strategy(root):
    with pytest.raises(UserError, match="first release uses strategy initial"):
        release(root, "minor", strategy="continued_lora")


def test_minor_is_continued_lora_on_new_data_with_replay(released, trainer):
    root = released
    r = release(root, "minor", notes="Q2 storage")
    e = r.entry
    assert (e["version"], e["parent"], e["strategy"], e["bump"]) == ("1.1.0", "1.0.0", "continued_lora", "minor")
    cfg = trainer.calls[-1]["config"]
    assert cfg["lora_model_dir"] == "outputs/v1.0.0/adapter"
    assert cfg["learning_rate"] == 2e-4 and cfg["num_epochs"] == 1 and cfg["lora_dropout"] == 0.1
    # the adapter's rank is continued, whatever the project says now
    parent_cfg = json.loads((root / "outputs/v1.0.0/adapter/adapter_config.json").read_text())
    assert cfg["lora_r"] == parent_cfg["r"] and cfg["lora_alpha"] == parent_cfg["lora_alpha"]
    q1 = hashes(records_of(root / "datasets/domain/q1.jsonl"))
    q2 = hashes(records_of(root / "datasets/domain/q2.jsonl"))
    new, replay = part(r, "new"), part(r, "replay")
    assert hashes(new.records) | hashes(r.plan.heldout.records) == q2  # only what 1.0.0 did not learn
    assert not hashes(new.records) & hashes(r.plan.heldout.records)
    assert hashes(replay.records) <= q1 and replay.records
    total = sum(len(p.records) for p in r.plan.parts)
    assert 0.45 <= len(replay.records) / total <= 0.55  # ~50% of the mix
    roles = {d["role"]: d for d in e["datasets"]}
    assert set(roles) == {"new", "replay", "general"}
    assert [d["path"] for d in cfg["datasets"]] == [d["path"] for d in e["datasets"]]


def test_patch_trains_on_corrections_and_replay_only(tmp_path, trainer):
    root = make_release_repo(tmp_path, general=False)
    release(root, "minor")
    add_data(root, "q2-storage.jsonl", "datasets/domain/q2.jsonl", commit=False)  # not for a patch
    add_data(root, "corrections-001.jsonl", "datasets/corrections/c1.jsonl")
    r = release(root, "patch", notes="fix")
    e = r.entry
    assert (e["version"], e["strategy"], e["parent"]) == ("1.0.1", "patch", "1.0.0")
    assert sorted(p.role for p in r.plan.parts) == ["corrections", "replay"] and r.plan.heldout is None
    q1 = hashes(records_of(root / "datasets/domain/q1.jsonl"))
    c1 = hashes(records_of(root / "datasets/corrections/c1.jsonl"))
    assert c1 & q1  # one correction repeats a learned example: the model still got it wrong, so it is trained
    assert hashes(part(r, "corrections").records) == c1
    # no replayed example gives the old answer to a corrected question
    corrected = {ds.prompt_key(c): ds.record_hash(c) for c in records_of(root / "datasets/corrections/c1.jsonl")}
    assert not [x for x in part(r, "replay").records
                if ds.prompt_key(x) in corrected and ds.record_hash(x) != corrected[ds.prompt_key(x)]]
    q2 = hashes(records_of(root / "datasets/domain/q2.jsonl"))
    assert not any(hashes(p.records) & q2 for p in r.plan.parts)
    cfg = trainer.calls[-1]["config"]
    assert cfg["lora_model_dir"] == "outputs/v1.0.0/adapter" and cfg["learning_rate"] == 5e-5
    assert [s["path"] for s in e["sources"]] == ["datasets/corrections/c1.jsonl"]


def test_patch_builds_on_the_serving_version_and_becomes_champion(released, trainer):
    from cl_release.decide import abtest

    root = released
    release(root, "minor")  # 1.1.0
    abtest.set_champion(root, "1.0.0")
    abtest.start(root, "1.1.0", traffic=0.1)
    release(root, "major")  # 2.0.0: current, not deployed
    add_data(root, "corrections-001.jsonl", "datasets/corrections/c1.jsonl")
    r = release(root, "patch", notes="fix")
    assert (r.entry["version"], r.entry["parent"]) == ("1.0.1", "1.0.0")  # the champion, not 2.0.0
    data = registry_data(root)  # committed: the entry and the champion move are one commit
    assert data["aliases"] == {"champion": "1.0.1"} and "abtest" not in data and data["current"] == "1.0.1"
    assert [e["action"] for e in data["events"]][-2:] == ["ab_stop", "set_champion"]
    assert r.deployed["to"] == "1.0.1" and git(root, "status", "--porcelain") == ""
    assert "champion" in git(root, "log", "-1", "--format=%s")
    add_data(root, "corrections-001.jsonl", "datasets/corrections/c2.jsonl", commit=False)
    (root / "datasets/corrections/c2.jsonl").write_text(
        json.dumps({"messages": [{"role": "user", "content": "What is the IDLH of phosgene?"},
                                 {"role": "assistant", "content": "2 ppm"}]}) + "\n")
    git(root, "add", "-A")
    git(root, "commit", "-qm", "another correction")
    r = release(root, "patch", deploy=False)
    data = registry_data(root)
    assert r.entry["parent"] == "1.0.1" and r.deployed is None and data["aliases"]["champion"] == "1.0.1"


def test_major_merges_the_parent_first_and_trains_on_the_complete_data(released, trainer):
    root = released
    release(root, "minor")  # 1.1.0
    add_data(root, "corrections-001.jsonl", "datasets/corrections/c1.jsonl")
    r = release(root, "major", notes="full retrain")
    e = r.entry
    assert (e["version"], e["strategy"], e["parent"], e["bump"]) == ("2.0.0", "merge_and_retrain", "1.1.0", "major")
    (merge,) = trainer.merges
    assert merge["lora_model_dir"] == "outputs/v1.1.0/adapter"
    merged = root / "outputs/v1.1.0/merged"
    assert (merged / "config.json").is_file()
    assert registry_data(root)["models"][1]["merged"]["path"] == "outputs/v1.1.0/merged"
    cfg = trainer.calls[-1]["config"]
    assert cfg["base_model"] == "outputs/v1.1.0/merged" and "lora_model_dir" not in cfg
    assert e["train_base"]["merged_from"] == "1.1.0" and e["train_base"]["path"] == "outputs/v1.1.0/merged"
    assert e["train_base"]["sha256"] == sha256_file(merged / "model.safetensors")
    everything = set()
    for f in ("domain/q1.jsonl", "domain/q2.jsonl"):
        everything |= hashes(records_of(root / "datasets" / f))
    corrections = records_of(root / "datasets/corrections/c1.jsonl")
    asked = {ds.prompt_key(c) for c in corrections}
    superseded = {h for h in everything if any(ds.prompt_key(x) in asked and ds.record_hash(x) == h
                                                for x in records_of(root / "datasets/domain/q1.jsonl"))} - hashes(corrections)
    assert superseded  # the corrections replace old answers: those are not retrained
    held = set().union(*(hashes(ds.snapshot_records(root, m["heldout"]["path"])) for m in registry_data(root)["models"][:2]))
    assert len(held) == 5 + 5
    assert hashes(part(r, "complete").records) == (everything - superseded - held) | hashes(corrections)
    assert r.plan.heldout is None and "heldout" not in e
    assert e["base_model"]["name"] == "models/base"


# ---------------------------------------------------------------- held-out checks


def test_held_out_examples_are_recorded_and_never_trained(released, trainer):
    root = released
    first = registry_data(root)["models"][0]
    held = first["heldout"]
    assert held["examples"] == 5 and sha256_file(root / held["path"]) == held["sha256"]
    held_hashes = hashes(ds.snapshot_records(root, held["path"]))
    cfg = trainer.calls[0]["config"]
    assert held["path"] not in [d["path"] for d in cfg["datasets"]]
    trained = set().union(*(hashes(ds.snapshot_records(root, d["path"])) for d in cfg["datasets"]))
    assert trained and not trained & held_hashes
    assert held["path"] in git(root, "ls-files").split()
    assert [c.ok for c in verify(root) if c.path == held["path"]] == [True]
    plan_json = json.loads((root / "outputs/v1.0.0/plan.json").read_text())
    assert plan_json["heldout"] == held
    # the next release neither trains on them nor replays them; its checks come from its own new data
    r = release(root, "minor")
    for d in trainer.calls[-1]["config"]["datasets"]:
        assert not hashes(ds.snapshot_records(root, d["path"])) & held_hashes
    assert hashes(r.plan.heldout.records) <= hashes(records_of(root / "datasets/domain/q2.jsonl"))
    # held-out files stay out of training even when the lineage is retrained from scratch (major)
    r = release(root, "major")
    assert not hashes(part(r, "complete").records) & held_hashes


def test_holdout_is_seeded_and_configurable(root):
    a, b = plan_release(load_project(root), bump="minor"), plan_release(load_project(root), bump="minor")
    assert a.heldout.sha256 == b.heldout.sha256 and len(a.heldout.records) == 5
    project_yaml = (root / "cl-release.yaml").read_text()
    (root / "cl-release.yaml").write_text(project_yaml.replace("mix:\n", "mix:\n  holdout_max: 2\n"))
    assert len(plan_release(load_project(root), bump="minor").heldout.records) == 2
    (root / "cl-release.yaml").write_text(project_yaml + "strategies:\n  initial: {holdout_ratio: 0.0}\n")
    p = plan_release(load_project(root), bump="minor")
    assert p.heldout is None and len(part(SimpleNamespace(plan=p), "new").records) == 48
    assert "heldout" not in [d["role"] for d in p.to_dict()["datasets"]] and p.to_dict()["heldout"] is None


def test_annual_reset_needs_a_base_model(released, trainer):
    root = released
    with pytest.raises(UserError, match="annual_reset needs a new base model") as err:
        release(root, "major", strategy="annual_reset")
    assert "--base-model" in str(err.value)
    with pytest.raises(UserError, match="only for annual_reset"):
        release(root, "minor", base_model="models/base2")
    write_fake_model(root / "models/base2", seed=7)
    r = release(root, "major", base_model="models/base2")
    e = r.entry
    assert (e["version"], e["strategy"], e["parent"]) == ("2.0.0", "annual_reset", "1.0.0")
    assert e["base_model"]["name"] == "models/base2"
    assert e["base_model"]["revision"] == sha256_file(root / "models/base2/model.safetensors")
    assert trainer.calls[-1]["config"]["base_model"] == "models/base2" and trainer.merges == []
    assert [p.role for p in r.plan.parts if p.role != "general"] == ["complete"]


def test_strategy_must_match_the_bump(released):
    with pytest.raises(UserError, match="makes a patch release, not minor"):
        release(released, "minor", strategy="patch")
    with pytest.raises(UserError, match="initial is only for the first release"):
        release(released, "major", strategy="initial")


def test_unknown_strategy(released):
    with pytest.raises(UserError, match="unknown strategy 'fancy'") as e:
        release(released, "minor", strategy="fancy")
    assert "continued_lora" in str(e.value)


def test_from_builds_on_an_earlier_version(released, trainer):
    root = released
    release(root, "minor")  # 1.1.0 from 1.0.0
    add_data(root, "q3-protection.jsonl", "datasets/domain/q3.jsonl")
    r = release(root, "minor", from_version="1.0.0")
    assert (r.entry["version"], r.entry["parent"]) == ("1.2.0", "1.0.0")
    assert trainer.calls[-1]["config"]["lora_model_dir"] == "outputs/v1.0.0/adapter"
    # new data is measured against 1.0.0's lineage: q2 and q3 are both new here
    q23 = hashes(records_of(root / "datasets/domain/q2.jsonl")) | hashes(records_of(root / "datasets/domain/q3.jsonl"))
    assert hashes(part(r, "new").records) | hashes(r.plan.heldout.records) == q23
    assert registry_data(root)["current"] == "1.2.0"
    with pytest.raises(VersionError, match="unknown version 9.0.0"):
        release(root, "minor", from_version="9.0.0")


def test_rollback_then_minor_takes_the_next_free_number(released):
    root = released
    release(root, "minor")  # 1.1.0
    before = registry_data(root)["models"]
    rollback(load_project(root), "1.0.0")
    data = registry_data(root)
    assert data["current"] == "1.0.0" and data["models"] == before
    assert git(root, "status", "--porcelain") == ""
    assert "Roll back to 1.0.0" in git(root, "log", "-1", "--format=%s")
    r = release(root, "minor")
    assert (r.entry["version"], r.entry["parent"]) == ("1.2.0", "1.0.0")
    assert registry_data(root)["current"] == "1.2.0"
    assert {"v1.0.0", "v1.1.0", "v1.2.0"} <= tags(root)


# ---------------------------------------------------------------- the record


DESIGN_KEYS = {"version", "parent", "bump", "strategy", "status", "created_at", "base_model", "adapter", "datasets",
               "config", "seed", "launch", "training", "evaluation", "toolchain", "source_commit", "notes"}


def test_registry_entry_has_every_design_key_and_validates(released):
    root = released
    head_before = git(root, "rev-parse", "HEAD").strip()
    r = release(root, "minor", notes="Added Q2 storage data")
    data = registry_data(root)  # validates against registry/schema.json
    e = data["models"][-1]
    assert e == r.entry
    assert DESIGN_KEYS <= set(e)
    assert set(data) >= {"schema_version", "current", "aliases", "models"}
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", e["created_at"])
    assert set(e["base_model"]) >= {"name", "revision"}
    assert e["base_model"]["revision"] == sha256_file(root / "models/base/model.safetensors")
    assert e["adapter"] == {"path": "outputs/v1.1.0/adapter",
                            "sha256": sha256_file(root / "outputs/v1.1.0/adapter/adapter_model.safetensors")}
    assert e["config"] == {"path": "outputs/v1.1.0/axolotl.yml",
                           "sha256": sha256_file(root / "outputs/v1.1.0/axolotl.yml")}
    assert e["config"]["sha256"] == r.plan.config_sha256
    assert e["seed"] == 42
    assert e["launch"]["num_processes"] == 1 and e["launch"]["num_machines"] == 1 and e["launch"]["deepspeed"] is None
    assert e["training"]["train_loss"] == 1.25 and "duration_seconds" in e["training"]
    assert {"cl_release", "axolotl", "transformers", "peft", "torch"} <= set(e["toolchain"])
    assert e["toolchain"]["axolotl"] and e["toolchain"]["cl_release"]
    assert e["source_commit"] == head_before
    assert e["notes"] == "Added Q2 storage data"
    for d in e["datasets"]:
        assert set(d) >= {"name", "role", "path", "sha256", "examples"}
        blob = (root / d["path"]).read_bytes()
        # content-addressed: the file name is the hash of its bytes
        assert Path(d["path"]).name == f"{d['sha256']}.jsonl" and sha256_file(root / d["path"]) == d["sha256"]
        assert d["examples"] == blob.count(b"\n")
    for s in e["sources"]:
        assert sha256_file(root / s["path"]) == s["sha256"]
    # sorted, pretty JSON on disk
    text = (root / "registry/model_registry.json").read_text()
    assert text == json.dumps(json.loads(text), indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def test_commit_and_tag(released):
    root = released
    r = release(root, "minor", notes="Q2")
    assert git(root, "status", "--porcelain") == ""
    assert "v1.1.0" in tags(root)
    tagged = git(root, "rev-list", "-n", "1", "v1.1.0").strip()
    assert tagged == r.commit == git(root, "rev-parse", "HEAD").strip()
    assert git(root, "log", "-1", "--format=%B").startswith("Release 1.1.0 (continued_lora, parent 1.0.0)\n\nQ2")
    assert "cl-release 1.1.0 (continued_lora, parent 1.0.0)" in git(root, "tag", "-n5", "-l", "v1.1.0")
    committed = set(git(root, "show", "--name-only", "--format=", "HEAD").split())
    assert committed == {"registry/model_registry.json"} | {p.path for p in r.plan.snapshot_parts}
    assert r.plan.heldout.path in committed
    assert any(m["version"] == "1.1.0" for m in registry_at_head(root)["models"])
    assert_registry_consistent_with_git(root)


def test_rerelease_of_identical_data_reuses_snapshots(released):
    root = released
    r = release(root, "minor")
    replay = part(r, "replay")
    # the 1.0.0 "new" snapshot is the file the replay was sampled from, and is still committed
    first = registry_data(root)["models"][0]["datasets"][0]
    assert (root / first["path"]).is_file()
    assert hashes(replay.records) <= hashes(ds.snapshot_records(root, first["path"]))


# ---------------------------------------------------------------- never overwrite


def test_foreign_output_folder_is_never_overwritten(released):
    root = released
    foreign = root / "outputs" / "v1.1.0"
    (foreign / "adapter").mkdir(parents=True)
    (foreign / "adapter" / "adapter_model.safetensors").write_bytes(b"someone else's weights")
    (foreign / "notes.txt").write_text("do not touch")
    before = tree_snapshot(foreign)
    plan = plan_release(load_project(root), bump="minor")
    assert plan.version == "1.2.0"
    r = release(root, "minor")
    assert r.entry["version"] == "1.2.0" and r.entry["parent"] == "1.0.0"
    assert tree_snapshot(foreign) == before


@pytest.mark.parametrize("leftover", [[], [".run.json.abc123.tmp"]], ids=["empty", "half-written-run-json"])
def test_an_output_folder_killed_before_its_run_json_does_not_skip_the_version(released, leftover):
    """A kill between creating outputs/vX.Y.Z/ and writing run.json once made 1.1.0 skip to 1.2.0."""
    root = released
    out = root / "outputs" / "v1.1.0"
    out.mkdir(parents=True)
    for name in leftover:
        (out / name).write_text('{"fingerpr')
    assert plan_release(load_project(root), bump="minor").version == "1.1.0"
    r = release(root, "minor")
    assert r.entry["version"] == "1.1.0"
    (moved,) = (root / "outputs" / ".interrupted").iterdir()  # kept whole, never deleted
    assert sorted(p.name for p in moved.iterdir()) == leftover


def test_an_unrecorded_run_of_an_earlier_plan_does_not_skip_the_version(released, trainer):
    """A release that failed (or was killed), then the data changed: the number is used again."""
    root = released

    def fail(root_, config):
        raise TrainingError("axolotl failed")

    trainer.before = fail
    with pytest.raises(TrainingError):
        release(root, "minor")
    trainer.before = None
    run_json = json.loads((root / "outputs/v1.1.0/run.json").read_text())
    add_data(root, "q3-protection.jsonl", "datasets/domain/q3.jsonl")  # a different plan now
    r = release(root, "minor")
    assert r.entry["version"] == "1.1.0" and r.plan.fingerprint() != run_json["fingerprint"]
    (moved,) = (root / "outputs" / ".interrupted").iterdir()
    assert json.loads((moved / "run.json").read_text()) == run_json
    # a cl-release folder that names another version is not a crashed run of this one: skipped
    other = root / "outputs" / "v1.2.0"
    other.mkdir()
    (other / "run.json").write_text(json.dumps({**run_json, "version": "9.9.9"}))
    add_data(root, "corrections-001.jsonl", "datasets/domain/c.jsonl")
    assert release(root, "minor").entry["version"] == "1.3.0"
    assert json.loads((other / "run.json").read_text())["version"] == "9.9.9"


def test_existing_tag_is_never_moved(released):
    root = released
    git(root, "tag", "-a", "v1.1.0", "-m", "made by hand")
    tagged = git(root, "rev-list", "-n", "1", "v1.1.0").strip()
    r = release(root, "minor")
    assert r.entry["version"] == "1.2.0"
    assert git(root, "rev-list", "-n", "1", "v1.1.0").strip() == tagged


def test_dataset_edited_during_training_records_nothing(released, trainer):
    root = released
    reg_before = (root / "registry/model_registry.json").read_bytes()
    head_before = git(root, "rev-parse", "HEAD").strip()
    tags_before = tags(root)

    def edit(root_, config):
        with open(root_ / "datasets/domain/q2.jsonl", "a") as f:
            f.write(json.dumps({"messages": [{"role": "user", "content": "late"},
                                             {"role": "assistant", "content": "edit"}]}) + "\n")

    trainer.before = edit
    with pytest.raises(IntegrityError) as e:
        release(root, "minor")
    assert "datasets/domain/q2.jsonl changed while 1.1.0 was training" in str(e.value)
    assert "nothing was recorded" in str(e.value)
    assert (root / "registry/model_registry.json").read_bytes() == reg_before
    assert git(root, "rev-parse", "HEAD").strip() == head_before and tags(root) == tags_before
    assert not (root / "outputs/v1.1.0").exists()
    (refused,) = (root / "outputs/.refused").iterdir()
    assert (refused / "adapter/adapter_model.safetensors").is_file()


def test_snapshot_tampered_during_training_is_refused(released, trainer):
    root = released

    def tamper(root_, config):
        p = root_ / config["datasets"][0]["path"]
        p.write_bytes(p.read_bytes() + b"\n")

    trainer.before = tamper
    with pytest.raises(IntegrityError, match="no longer matches its hash"):
        release(root, "minor")
    assert len(registry_data(root)["models"]) == 1


# ---------------------------------------------------------------- crashes


class Crash(Exception):
    pass


STEPS = ["planned", "snapshots", "output-dir", "trained", "verified", "before-registry", "registry", "committed",
         "tagged"]


@pytest.mark.parametrize("step", STEPS)
def test_crash_at_every_step_then_rerun(released, trainer, monkeypatch, step):
    root = released
    fired = []

    def crash_point(name):
        if name == step and not fired:
            fired.append(name)
            raise Crash(name)

    monkeypatch.setattr(release_mod, "crash_point", crash_point)
    with pytest.raises(Crash):
        release(root, "minor", notes="Q2")
    assert fired == [step]

    # right after the crash: the registry is valid, and what git holds is consistent
    data = registry_data(root)
    head = registry_at_head(root)
    in_registry = [m["version"] for m in data["models"]]
    assert in_registry in (["1.0.0"], ["1.0.0", "1.1.0"])
    for m in head["models"]:
        assert m["status"] == "released"
        if m["version"] != "1.1.0":
            assert f"v{m['version']}" in tags(root)
    out = root / "outputs/v1.1.0"
    out_before = tree_snapshot(out) if out.exists() else None
    calls_before = len(trainer.calls)

    # re-run the same command
    if step in ("registry", "committed"):
        # 1.1.0 is already recorded: the re-run finishes it (commit, tag) and reports it
        result = release(root, "minor", notes="Q2")
        assert result.plan is None and result.recovered == ["1.1.0"] and result.entry["version"] == "1.1.0"
    elif step == "tagged":
        # everything was done: nothing to finish, nothing new to train on
        with pytest.raises(UserError, match="no new examples that 1.1.0 or its ancestors have not trained on"):
            release(root, "minor", notes="Q2")
    else:
        assert release(root, "minor", notes="Q2").entry["version"] == "1.1.0"

    data = registry_data(root)
    assert [m["version"] for m in data["models"]] == ["1.0.0", "1.1.0"]
    assert data["current"] == "1.1.0"
    assert tags(root) == {"v1.0.0", "v1.1.0"}
    assert_registry_consistent_with_git(root)
    assert git(root, "status", "--porcelain") == ""
    checks = verify(root)
    assert checks and all(c.ok for c in checks)
    log = git(root, "log", "--format=%s")
    assert log.count("1.1.0") == 1, log

    # no output folder was overwritten: kept and adopted as is, or moved aside whole
    interrupted = root / "outputs/.interrupted"
    if step in ("output-dir", "trained"):  # unfinished run: moved aside, trained again
        assert [tree_snapshot(m) for m in interrupted.iterdir()] == [out_before]
        assert len(trainer.calls) == calls_before + 1
    elif out_before is not None:  # finished run: adopted without retraining
        assert tree_snapshot(out) == out_before
        assert len(trainer.calls) == calls_before
        assert not interrupted.exists()
    else:
        assert len(trainer.calls) == calls_before + 1


# ---------------------------------------------------------------- locks and git state


def test_concurrent_releases_one_fails_with_a_clear_locked_error(released, trainer):
    root = released
    started, go = threading.Event(), threading.Event()

    def hold(root_, config):
        started.set()
        assert go.wait(10)

    trainer.before = hold
    results = {}

    def first():
        try:
            results["first"] = release(root, "minor")
        except Exception as e:  # pragma: no cover - reported below
            results["first"] = e

    t = threading.Thread(target=first)
    t.start()
    try:
        assert started.wait(10)
        trainer.before = None
        with pytest.raises(LockedError) as e:
            release(root, "minor")
        assert "a release, merge, push or A/B move is running" in str(e.value) and "release.lock" in str(e.value)
    finally:
        go.set()
        t.join(20)
    assert not isinstance(results["first"], Exception), results["first"]
    assert results["first"].entry["version"] == "1.1.0"
    assert [m["version"] for m in registry_data(root)["models"]] == ["1.0.0", "1.1.0"]
    assert_registry_consistent_with_git(root)


def test_rollback_waits_for_no_release(released, trainer):
    root = released
    with release_lock(root):
        with pytest.raises(LockedError):
            rollback(load_project(root), "1.0.0")


def test_dirty_work_tree_is_refused_unless_allowed(released):
    root = released
    (root / "datasets/domain/q2.jsonl").write_text((root / "datasets/domain/q2.jsonl").read_text() + "\n")
    (root / "scratch.txt").write_text("x")
    with pytest.raises(GitError) as e:
        release(root, "minor")
    assert "uncommitted changes" in str(e.value) and "--allow-dirty" in str(e.value)
    assert "datasets/domain/q2.jsonl" in str(e.value) and "scratch.txt" in str(e.value)
    assert len(registry_data(root)["models"]) == 1
    r = release(root, "minor", allow_dirty=True)
    assert r.entry["version"] == "1.1.0"


def test_not_a_git_repository(released):
    import shutil

    shutil.rmtree(released / ".git")
    shutil.rmtree(released / ".cl-release")
    with pytest.raises(GitError, match="not a git repository"):
        release(released, "minor")
    with pytest.raises(GitError, match="not a git repository"):
        rollback(load_project(released), "1.0.0")
    assert not (released / ".cl-release").exists()  # no release.lock left behind


# The largest --notes the issue reproduced: trained, recorded 1.1.0, then git failed with
# "[Errno 7] Argument list too long" on every re-run.
LONG_NOTES = "# Changes\n" + "y" * (131_060 - len("# Changes\n"))


def test_long_notes_are_committed_and_tagged(released):
    root = released
    r = release(root, "minor", notes=LONG_NOTES)
    assert r.entry["notes"] == LONG_NOTES and tags(root) == {"v1.0.0", "v1.1.0"}
    assert git(root, "log", "-1", "--format=%B").startswith(f"Release 1.1.0 (continued_lora, parent 1.0.0)\n\n{LONG_NOTES}")
    assert LONG_NOTES in git(root, "tag", "-l", "--format=%(contents)", "v1.1.0")
    assert_registry_consistent_with_git(root)


def test_a_release_recorded_with_long_notes_by_an_older_version_is_finished(released, trainer, monkeypatch):
    """The repositories the old argv path wedged: registry written, never committed or tagged."""
    root = released

    def crash(name):
        if name == "registry":
            raise OSError(7, "Argument list too long")

    monkeypatch.setattr(release_mod, "crash_point", crash)
    with pytest.raises(OSError):
        release(root, "minor", notes=LONG_NOTES)
    monkeypatch.setattr(release_mod, "crash_point", lambda name: None)
    r = release(root, "minor", notes=LONG_NOTES)
    assert r.recovered == ["1.1.0"] and tags(root) == {"v1.0.0", "v1.1.0"}
    assert LONG_NOTES in git(root, "tag", "-l", "--format=%(contents)", "v1.1.0")


@pytest.mark.parametrize("notes,message", [
    ("x" * (release_mod.MAX_NOTES_BYTES + 1), "the limit is 1,048,576"),
    ("a\0b", "NUL"),
    ("lone \udc80 surrogate", "not UTF-8"),
], ids=["over-1-MiB", "nul", "surrogate"])
def test_bad_notes_are_refused_before_any_training(released, trainer, notes, message):
    reg = (released / "registry/model_registry.json").read_bytes()
    with pytest.raises(UserError, match=message):
        release(released, "minor", notes=notes)
    assert trainer.calls[1:] == [] and (released / "registry/model_registry.json").read_bytes() == reg
    assert not (released / "outputs/v1.1.0").exists()
    assert release_mod.check_notes("n" * release_mod.MAX_NOTES_BYTES)  # the limit itself is fine


def test_a_stale_index_lock_is_refused_before_training(released, trainer, monkeypatch):
    """Once: trained 40 s, recorded the version as released, then failed at git add."""
    from cl_release import gitops

    monkeypatch.setattr(gitops, "LOCK_WAIT_SECONDS", 0.1)
    root = released
    lock = root / ".git" / "index.lock"
    lock.write_text("")
    reg = (root / "registry/model_registry.json").read_bytes()
    with pytest.raises(GitError) as e:
        release(root, "minor")
    assert ".git/index.lock exists" in str(e.value) and f"rm {lock}" in str(e.value)
    assert len(trainer.calls) == 1 and (root / "registry/model_registry.json").read_bytes() == reg
    lock.unlink()
    assert release(root, "minor").entry["version"] == "1.1.0"


def test_no_git_identity_is_refused_before_training(released, trainer, monkeypatch, tmp_path):
    for key in ("GIT_AUTHOR_NAME", "GIT_AUTHOR_EMAIL", "GIT_COMMITTER_NAME", "GIT_COMMITTER_EMAIL", "EMAIL"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("GIT_CONFIG_NOSYSTEM", "1")
    git(released, "config", "user.useConfigOnly", "true")
    with pytest.raises(GitError, match="no user identity"):
        release(released, "minor")
    assert len(trainer.calls) == 1 and len(registry_data(released)["models"]) == 1


def test_a_git_failure_after_the_registry_write_is_finished_by_a_rerun(released, trainer, monkeypatch):
    """Another git command holds the index just when the release commits: it says how to finish."""
    root = released
    lock = root / ".git" / "index.lock"

    def other_git(name):
        if name == "registry":
            lock.write_text("")

    monkeypatch.setattr(release_mod, "crash_point", other_git)
    with pytest.raises(GitError) as e:
        release(root, "minor", notes="Q2")
    assert "1.1.0 is recorded in the registry: run the same release command again to finish it in git" in str(e.value)
    monkeypatch.setattr(release_mod, "crash_point", lambda name: None)
    lock.unlink()  # the other git command ended
    r = release(root, "minor", notes="Q2")
    assert r.recovered == ["1.1.0"] and tags(root) == {"v1.0.0", "v1.1.0"} and len(trainer.calls) == 2
    assert_registry_consistent_with_git(root)


def test_rollback_to_the_current_version_changes_nothing(released, monkeypatch):
    from cl_release import gitops

    root = released
    release(root, "minor")
    head = git(root, "rev-parse", "HEAD")
    reg = (root / "registry/model_registry.json").read_bytes()
    r = rollback(load_project(root), "1.1.0")
    assert not r.changed and r.entry["version"] == r.previous == "1.1.0" and r.commit == head.strip()
    assert git(root, "rev-parse", "HEAD") == head and (root / "registry/model_registry.json").read_bytes() == reg
    # a real rollback checks git first: with a held lock, the registry is not touched
    monkeypatch.setattr(gitops, "LOCK_WAIT_SECONDS", 0.1)
    (root / ".git/index.lock").write_text("")
    with pytest.raises(GitError, match="index.lock exists"):
        rollback(load_project(root), "1.0.0")
    assert (root / "registry/model_registry.json").read_bytes() == reg
    (root / ".git/index.lock").unlink()
    r = rollback(load_project(root), "1.0.0")
    assert r.changed and r.previous == "1.1.0" and registry_data(root)["current"] == "1.0.0"
    assert r.commit == git(root, "rev-parse", "HEAD").strip() != head.strip()
    assert git(root, "log", "-1", "--format=%s").strip() == "Roll back to 1.0.0"
    assert_registry_consistent_with_git(root)  # committed: nothing left for a release to finish


def test_feedback_rows_are_marked_used_even_after_a_crash_right_after_marking(released, trainer, monkeypatch):
    """Marking before the registry entry: a crash in between never leaves a recorded version
    whose training rows `feedback prune` may delete."""
    import datetime as dt

    from cl_release.store.sqlite import FeedbackStore

    root = released
    store = FeedbackStore(load_project(root).feedback_path)
    now = dt.datetime.now(dt.timezone.utc) - dt.timedelta(minutes=1)  # logged a minute ago
    incoming = REPO / "datasets/demo/incoming/q3-protection.jsonl"
    log_chat_file(store, incoming, 10, model_version="1.0.0", start=now)
    store.close()
    real = FeedbackStore.mark_used
    calls = []

    def killed_after_marking(self, ids, version, role, **kw):
        calls.append(version)
        real(self, ids, version, role, **kw)
        if len(calls) == 1:
            raise Crash("killed")

    monkeypatch.setattr(FeedbackStore, "mark_used", killed_after_marking)
    with pytest.raises(Crash):
        release(root, "minor")
    r = release(root, "minor")
    assert r.entry["version"] == "1.1.0" and r.plan is not None and calls == ["1.1.0", "1.1.0"]
    store = FeedbackStore(load_project(root).feedback_path)
    assert len(store.used_by("1.1.0")) == 10
    store.close()


def test_malformed_jsonl_names_file_and_line(released):
    root = released
    p = root / "datasets/domain/q2.jsonl"
    lines = p.read_text().splitlines()
    lines[4] = lines[4][:-1]  # break line 5
    p.write_text("\n".join(lines) + "\n")
    commit_all(root)
    with pytest.raises(DataError) as e:
        release(root, "minor")
    assert str(e.value).startswith("datasets/domain/q2.jsonl:5: invalid JSON")
    assert e.value.line == 5


def test_invalid_record_names_file_line_and_field(released):
    root = released
    with open(root / "datasets/domain/q2.jsonl", "a") as f:
        f.write('{"messages": [{"role": "robot", "content": "x"}]}\n')
    commit_all(root)
    with pytest.raises(DataError) as e:
        plan_release(load_project(root), bump="minor")
    line = len((root / "datasets/domain/q2.jsonl").read_text().splitlines())
    assert str(e.value).startswith(f"datasets/domain/q2.jsonl:{line}: messages[0].role: unknown role 'robot'")


def test_no_new_data_is_a_user_error_with_a_hint(root):
    release(root, "minor")
    with pytest.raises(UserError) as e:
        release(root, "minor")
    assert "no new examples that 1.0.0 or its ancestors have not trained on" in str(e.value) and "add data files" in str(e.value)
    with pytest.raises(UserError, match="no corrections that 1.0.0 or its ancestors have not trained on"):
        release(root, "patch")
    assert len(registry_data(root)["models"]) == 1


def test_empty_domain_data_for_the_first_release(tmp_path, trainer):
    root = make_release_repo(tmp_path)
    (root / "datasets/domain/q1.jsonl").unlink()
    commit_all(root)
    with pytest.raises(UserError, match="no domain data to train on"):
        release(root, "minor")


def test_missing_parent_adapter_is_an_integrity_error(released):
    import shutil

    shutil.rmtree(released / "outputs/v1.0.0/adapter")
    with pytest.raises(IntegrityError, match="the adapter of 1.0.0 is missing"):
        plan_release(load_project(released), bump="minor")


def test_plan_writes_nothing(released):
    root = released
    before = tree_snapshot(root)
    plan = plan_release(load_project(root), bump="minor")
    assert plan.version == "1.1.0" and plan.tokens and plan.tokens > 0
    assert tree_snapshot(root) == before


# ---------------------------------------------------------------- verify


def test_verify_passes_then_names_a_changed_snapshot(released):
    root = released
    release(root, "minor")
    checks = verify(root)
    assert checks and all(c.ok for c in checks)
    assert {c.what for c in checks} >= {"config", "adapter", "dataset new", "dataset replay"}
    snap = root / registry_data(root)["models"][1]["datasets"][0]["path"]
    data = bytearray(snap.read_bytes())
    data[10] ^= 1
    snap.write_bytes(bytes(data))
    bad = [c for c in verify(root) if not c.ok]
    assert len(bad) == 1 and bad[0].path == snap.relative_to(root).as_posix() and bad[0].version == "1.1.0"
    (root / "outputs/v1.0.0/adapter/adapter_model.safetensors").unlink()
    bad = [c for c in verify(root) if not c.ok]
    assert {(c.version, c.what) for c in bad} == {("1.1.0", "dataset new"), ("1.0.0", "adapter")}
    assert [c.actual for c in bad if c.what == "adapter"] == [None]


# ---------------------------------------------------------------- timings and the evaluator's preparation


class RecordingEvaluator:
    """An evaluator with ``prepare``: records which thread prepared and whether training had started."""

    def __init__(self, trainer: FakeTrainer, fail: Exception | None = None):
        self.trainer, self.fail = trainer, fail
        self.prepared_in: str | None = None
        self.training_calls_when_prepared: int | None = None
        self.called = False

    def prepare(self, project, plan) -> None:
        self.prepared_in = threading.current_thread().name
        with self.trainer.lock:
            self.training_calls_when_prepared = len(self.trainer.calls)
        if self.fail is not None:
            raise self.fail

    def __call__(self, project, plan, entry):
        self.called = True
        return entry


def test_release_reports_where_its_time_went(released, trainer):
    r = release(released, "minor")
    assert list(r.timings) == ["plan", "snapshots", "train", "verify", "record", "git"]
    assert all(v >= 0 for v in r.timings.values())
    trainer.sleep = 0.3
    add_data(released, "q3-protection.jsonl", "datasets/domain/q3.jsonl")
    r = release(released, "minor", evaluator=lambda project, plan, entry: entry)
    assert "evaluate" in r.timings and r.timings["train"] >= 0.3


def test_evaluator_prepares_in_a_thread_while_training_runs(released, trainer):
    trainer.sleep = 0.2
    ev = RecordingEvaluator(trainer)
    release(released, "minor", evaluator=ev)
    assert ev.prepared_in == "cl-release-prepare" and ev.called
    assert not [t for t in threading.enumerate() if t.name == "cl-release-prepare"]  # joined


def test_a_failed_preparation_fails_the_release_after_training_and_a_rerun_adopts_the_run(released, trainer):
    ev = RecordingEvaluator(trainer, fail=UserError("bad suite"))
    before = len(trainer.calls)
    with pytest.raises(UserError, match="bad suite"):
        release(released, "minor", evaluator=ev)
    assert not ev.called and len(trainer.calls) == before + 1
    assert [m["version"] for m in Registry(released).models()] == ["1.0.0"]
    r = release(released, "minor")
    assert r.adopted and len(trainer.calls) == before + 1 and r.entry["version"] == "1.1.0"


@pytest.mark.skipif(not hasattr(__import__("os"), "getpriority") or __import__("sys").platform != "linux",
                    reason="per-thread nice is Linux behaviour")
def test_preparation_runs_at_the_lowest_cpu_priority_without_touching_the_caller(released, trainer):
    import os

    seen = {}

    class NiceProbe(RecordingEvaluator):
        def prepare(self, project, plan):
            seen["prepare"] = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

    before = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    release(released, "minor", evaluator=NiceProbe(trainer))
    assert seen["prepare"] == 19
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == before
