"""Comparison and release gates: synthetic results, then a crafted pair of trained versions."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
from click.testing import CliRunner

from cl_release.eval import results
from cl_release.eval import runner as ev
from cl_release.eval import suite as sv
from cl_release.eval import gates
from cl_release.cli import main
from cl_release.errors import UserError
from cl_release.files import atomic_write_json, sha256_file
from cl_release.registry import Registry, empty_registry

# ---------------------------------------------------------------- synthetic results


def res(version, passes: dict[str, bool], *, crit=None, tags=None, suite="s" * 64) -> results.EvalResult:
    crit = crit or {}
    tags = tags or {}
    cases = [
        results.CaseResult(id=i, passed=p, output=f"{version}:{i}", criticality=crit.get(i, "medium"), domain="d",
                      tags=tags.get(i, []), match="contains", expected="x")
        for i, p in passes.items()
    ]
    return results.EvalResult(suite_sha256=suite, cases=cases, metrics=results.compute_metrics(cases), performance={},
                         settings={}, model={}, version=version)


CRIT = {"a": "low", "b": "critical", "c": "high", "d": "medium", "e": "critical"}


@pytest.mark.parametrize("training, vocab, ok, detail", [
    ({"final_loss": 6.54}, 694, False, "100% of the uniform guess ln(694) = 6.54 (at most 80%)"),  # lr 500: destroyed
    ({"final_loss": 0.25}, 694, True, "4% of the uniform guess"),
    ({"final_loss": None, "loss_not_finite": True}, 694, False, "NaN or infinite"),
    ({"final_loss": 1.0}, None, True, "skipped"),
])
def test_the_loss_gate_catches_a_destroyed_model(training, vocab, ok, detail):
    cand, par = res("1.1.0", {"a": True}), res("1.0.0", {"a": True})
    d = gates.check(cand, par, bump="minor", new_examples=500, training=training, vocab_size=vocab)
    loss = next(c for c in d.checks if c.name == "loss")
    assert loss.passed is ok and detail in loss.detail and d.passed is ok


def test_a_patch_must_pass_the_tests_added_since_its_parent():
    cand = res("1.0.1", {"old": True, "incident-a": False, "incident-b": True})
    par = res("1.0.0", {"old": True, "incident-a": False, "incident-b": False})  # the same (current) suite
    d = gates.check(cand, par, bump="patch", new_examples=1, new_tests=["incident-a", "incident-b"])
    c = next(c for c in d.checks if c.name == "patch_new_tests")
    assert not c.passed and not d.passed and "1 of 2 tests added since the parent pass; failing: incident-a" in c.detail
    ok = gates.check(res("1.0.1", {"old": True, "incident-a": True, "incident-b": True}), par, bump="patch",
                     new_examples=1, new_tests=["incident-a", "incident-b"])
    assert ok.passed
    minor = gates.check(cand, par, bump="minor", new_examples=500, new_tests=["incident-a"])
    assert "patch_new_tests" not in {c.name for c in minor.checks}  # a patch's rule


def test_tests_added_since_a_release_come_from_git(tmp_path, monkeypatch):
    from helpers import FakeTrainer, git, make_release_repo, release

    FakeTrainer().install(monkeypatch)
    root = make_release_repo(tmp_path)
    suite_file = root / "registry/regression_tests.jsonl"
    suite_file.write_text(json.dumps({"id": "old", "input": "q", "expected": "a"}) + "\n")
    git(root, "add", "-A")
    git(root, "commit", "-qm", "suite")
    release(root, "minor")
    with open(suite_file, "a") as f:
        f.write(json.dumps({"id": "new-one", "input": "q2", "expected": "b"}) + "\n")
    suite = sv.load_project_suite(root, None, ["registry/regression_tests.jsonl"])
    assert gates.tests_added_since(root, suite, "1.0.0") == ["new-one"]
    assert gates.tests_added_since(root, suite, "9.9.9") == []  # no tag: nothing counts as added


def test_a_diverged_run_records_no_nan():
    from cl_release.release.train import TrainResult

    d = TrainResult(duration_seconds=1.0, train_loss=float("nan"), final_loss=float("inf")).to_dict()
    assert d["train_loss"] is None and d["final_loss"] is None and d["loss_not_finite"] is True
    json.dumps(d, allow_nan=False)


def test_regressions_are_ordered_by_criticality():
    parent = res("1.0.0", {k: True for k in "abcde"}, crit=CRIT)
    cand = res("1.1.0", {"a": False, "b": False, "c": False, "d": False, "e": False}, crit=CRIT)
    cmp = gates.compare_results(parent, cand)
    assert [r.id for r in cmp.regressions] == ["b", "e", "c", "d", "a"]
    assert [c for c, rows in cmp.regressions_by_criticality().items() if rows] == ["critical", "high", "medium", "low"]
    assert cmp.regressions[0].parent_output == "1.0.0:b" and cmp.regressions[0].candidate_output == "1.1.0:b"


def test_comparison_splits_regressions_improvements_and_unchanged():
    parent = res("1.0.0", {"a": True, "b": False, "c": True, "d": False}, crit=CRIT)
    cand = res("1.1.0", {"a": False, "b": True, "c": True, "d": False}, crit=CRIT)
    cmp = gates.compare_results(parent, cand)
    assert [r.id for r in cmp.regressions] == ["a"] and [r.id for r in cmp.improvements] == ["b"]
    assert cmp.unchanged_passed == ["c"] and cmp.unchanged_failed == ["d"]
    d = cmp.to_dict()
    assert d["unchanged"] == {"passed": 1, "failed": 1} and d["metric_deltas"]["pass_rate"]["delta"] == 0.0


def test_results_from_different_suites_are_not_compared():
    with pytest.raises(UserError, match="different suites"):
        gates.compare_results(res("1.0.0", {"a": True}), res("1.1.0", {"a": True}, suite="t" * 64))


def test_a_critical_regression_blocks_even_when_accuracy_improves():
    parent = res("1.0.0", {"a": True, "b": True, "c": False, "d": False}, crit=CRIT)
    cand = res("1.1.0", {"a": True, "b": False, "c": True, "d": True}, crit=CRIT)
    d = gates.check(cand, parent, bump="minor", new_examples=250)
    assert not d.passed
    assert d.reasons == ["1 critical regression(s) vs 1.0.0: b (at most 0 allowed)"]
    assert d.to_dict()["regressions"] == {"critical": ["b"]} and d.to_dict()["decision"] == "rejected"


def test_accuracy_tolerance_and_hallucination_gates():
    tags = {k: ["hallucination"] for k in "ab"}
    parent = res("1.0.0", {"a": True, "b": True, "c": True, "d": True}, tags=tags)
    cand = res("1.1.0", {"a": True, "b": False, "c": True, "d": True}, tags=tags)  # b: medium
    d = gates.check(cand, parent, bump="minor", new_examples=200)
    failed = {c.name for c in d.checks if not c.passed}
    assert failed == {"accuracy", "hallucination_rate"}
    loose = gates.check(cand, parent, bump="minor", new_examples=200,
                        config={"accuracy_tolerance": 0.25, "hallucination_tolerance": 0.5})
    assert loose.passed, loose.reasons


@pytest.mark.parametrize("bump, n, ok", [("minor", 199, False), ("minor", 200, True), ("patch", 1, True), ("major", 0, True)])
def test_minimum_new_examples_depends_on_the_bump(bump, n, ok):
    r = res("1.1.0", {"a": True})
    d = gates.check(r, res("1.0.0", {"a": True}), bump=bump, new_examples=n)
    assert d.passed is ok
    if not ok:
        assert d.reasons == ["199 new examples, a minor release needs at least 200"]


def test_gate_config_overrides_and_unknown_keys():
    r = res("1.1.0", {"a": True})
    assert not gates.check(r, None, bump="patch", new_examples=3, config={"min_new_examples": {"patch": 5}}).passed
    assert gates.check(r, None, bump="minor", new_examples=3, config={"min_new_examples": 0}).passed
    with pytest.raises(UserError, match="unknown gate"):
        gates.check(r, None, bump="minor", new_examples=300, config={"max_regressions": 1})


def test_first_release_gets_only_absolute_gates():
    r = res("1.0.0", {"a": False, "b": True}, tags={"a": ["hallucination"]})
    d = gates.check(r, None, bump="major", new_examples=0)
    assert d.passed and [c.name for c in d.checks] == ["min_new_examples"]
    d = gates.check(r, None, bump="major", new_examples=0, config={"min_pass_rate": 0.6, "max_hallucination_rate": 0.5})
    assert [c.name for c in d.checks if not c.passed] == ["min_pass_rate", "max_hallucination_rate"]


# ---------------------------------------------------------------- did the candidate learn its new data?


def learned(version, n_passed, n=10):
    return res(version, {f"heldout-{i}": i < n_passed for i in range(n)}, suite="h" * 64)


def test_new_data_gate_rejects_a_candidate_that_did_not_learn_with_the_figures():
    cand, parent = res("1.1.0", {"a": True}), res("1.0.0", {"a": True})  # the suite cannot tell
    d = gates.check(cand, parent, bump="minor", new_examples=250, new_data=learned("1.1.0", 1),
                    new_data_source="heldout")
    assert not d.passed
    assert d.reasons == ["1 of 10 held-out examples of the new data answered right (10%), at least 80% needed: "
                         "the candidate did not learn its new data"]
    (c,) = [c for c in d.checks if c.name == "min_new_data_pass_rate"]
    assert (c.value, c.threshold) == (0.1, 0.8)
    assert gates.check(cand, parent, bump="minor", new_examples=250, new_data=learned("1.1.0", 8),
                       new_data_source="heldout").passed
    patch = gates.check(cand, parent, bump="patch", new_examples=3, new_data=learned("1.1.1", 7, n=9),
                        new_data_source="corrections")
    assert patch.reasons == ["7 of 9 corrections answered right (78%), at least 80% needed: "
                             "the candidate did not learn its new data"]


def test_new_data_gate_per_bump_off_for_major_and_skipped_without_checks():
    r = res("2.0.0", {"a": True})
    major = gates.check(r, None, bump="major", new_examples=0, new_data=learned("2.0.0", 0))
    assert major.passed and "min_new_data_pass_rate" not in [c.name for c in major.checks]
    on = gates.check(r, None, bump="major", new_examples=0, new_data=learned("2.0.0", 0),
                     config={"min_new_data_pass_rate": {"major": 0.5}})
    assert not on.passed
    off = gates.check(r, None, bump="minor", new_examples=300, new_data=learned("2.0.0", 0),
                      config={"min_new_data_pass_rate": None})
    assert off.passed and "min_new_data_pass_rate" not in [c.name for c in off.checks]
    skipped = gates.check(r, None, bump="minor", new_examples=300, new_data_skipped="no checks")
    (c,) = [c for c in skipped.checks if c.name == "min_new_data_pass_rate"]
    assert skipped.passed and c.value is None and c.detail == "skipped: no checks"
    no_suite = gates.check(None, None, bump="patch", new_examples=3, new_data_skipped="no evaluation ran")
    assert no_suite.passed and [c.detail for c in no_suite.checks][-1] == "skipped: no evaluation ran"


def test_checks_are_built_from_examples_answer_without_final_punctuation():
    rec = {"messages": [{"role": "user", "content": "What is the IDLH of chlorine?"},
                        {"role": "assistant", "content": "The IDLH of chlorine is 10 ppm."}]}
    sys_rec = {"messages": [{"role": "system", "content": "Be brief."}] + rec["messages"]}
    suite = sv.checks_suite([rec, rec, sys_rec, {"text": "no question here"}], domain="heldout")
    assert len(suite) == 2
    case, with_system = suite.cases
    assert (case.input, case.expected, case.match, case.domain) == (
        "What is the IDLH of chlorine?", "The IDLH of chlorine is 10 ppm", "contains", "heldout")
    assert [m["role"] for m in with_system.messages()] == ["system", "user"]
    assert sv.match_output(case, "the IDLH of  chlorine is 10 ppm.") and not sv.match_output(case, "… 25 ppm.")
    assert sv.checks_suite([{"text": "t"}], domain="heldout") is None


def _fake_evaluation(monkeypatch, *, learns: bool):
    """Evaluation without a model: regression tests pass; held-out checks pass only if ``learns``.
    Records which suites each version was evaluated on."""
    seen = []

    def fake_entry(root, entry, suite, settings=None, *, cache=True, loaded=None):
        seen.append((entry["version"], [c.domain for c in suite.cases], [c for c in suite.cases]))
        cases = [results.CaseResult(id=c.id, passed=(c.domain not in ("heldout", "corrections")) or learns,
                               output="out", criticality=c.criticality, domain=c.domain, tags=list(c.tags),
                               match=c.match, expected=c.expected) for c in suite.cases]
        return results.EvalResult(suite_sha256=suite.sha256, cases=cases, metrics=results.compute_metrics(cases),
                             performance={"results_path": f"outputs/v{entry['version']}/eval/x.json"}, settings={},
                             model={"base": "models/base"}, version=entry["version"])

    def fake_model(root, base, adapter, suite, settings=None, **k):
        return fake_entry(root, {"version": k.get("version") or "base"}, suite)

    monkeypatch.setattr(ev, "evaluate_entry", fake_entry)
    monkeypatch.setattr(ev, "evaluate_model", fake_model)
    monkeypatch.setattr(ev, "warm_up", lambda: None)
    return seen


def _repo_with_suite(tmp_path):
    from helpers import commit_all, make_release_repo

    root = make_release_repo(tmp_path)
    (root / "registry/regression_tests.jsonl").write_text(json.dumps(
        {"id": "t1", "input": "What is the IDLH of ammonia?", "expected": "ppm"}) + "\n")
    commit_all(root, "suite")
    return root


def test_release_that_learned_nothing_is_rejected_and_force_records_the_override(tmp_path, monkeypatch):
    from cl_release.data import formats as ds
    from helpers import FakeTrainer, add_data, registry_data

    FakeTrainer().install(monkeypatch)
    root = _repo_with_suite(tmp_path)
    seen = _fake_evaluation(monkeypatch, learns=True)
    first = CliRunner().invoke(main, ["-C", str(root), "release", "minor"])
    assert first.exit_code == 0, first.output
    assert "learned: 5 of 5 held-out examples of its new data answered right (100%)" in first.output
    assert "  domain" in first.output and "base" in first.output  # before (the base model) and after
    entry = registry_data(root)["models"][0]
    assert entry["evaluation"]["new_data"]["n_checks"] == 5 and entry["evaluation"]["baseline"]["pass_rate"] == 1.0
    # the checks are exactly the held-out examples, which training never saw
    held = ds.snapshot_records(root, entry["heldout"]["path"])
    (checks,) = [cases for v, domains, cases in seen if v == "1.0.0" and set(domains) == {"heldout"}]
    assert sorted(c.input for c in checks) == sorted(r["messages"][0]["content"] for r in held)

    seen = _fake_evaluation(monkeypatch, learns=False)
    add_data(root, "q2-storage.jsonl", "datasets/domain/q2.jsonl")
    rejected = CliRunner().invoke(main, ["-C", str(root), "release", "minor"])
    assert rejected.exit_code == 1
    assert ("gate failed: 0 of 5 held-out examples of the new data answered right (0%), at least 80% needed: "
            "the candidate did not learn its new data") in rejected.output
    data = registry_data(root)
    assert data["current"] == "1.0.0" and data["models"][-1]["status"] == "rejected"
    forced = CliRunner().invoke(main, ["-C", str(root), "release", "minor", "--force", "--reason", "known gap"])
    assert forced.exit_code == 0, forced.output
    entry = registry_data(root)["models"][-1]
    assert entry["status"] == "released" and entry["override"]["reason"] == "known gap"
    assert any("did not learn its new data" in r for r in entry["override"]["reasons"])
    assert entry["gates"]["passed"] is False


def test_patch_is_checked_on_its_corrections(tmp_path, monkeypatch):
    from helpers import FakeTrainer, add_data, registry_data

    FakeTrainer().install(monkeypatch)
    root = _repo_with_suite(tmp_path)
    _fake_evaluation(monkeypatch, learns=True)
    assert CliRunner().invoke(main, ["-C", str(root), "release", "minor"]).exit_code == 0
    add_data(root, "corrections-001.jsonl", "datasets/corrections/c1.jsonl")
    seen = _fake_evaluation(monkeypatch, learns=False)
    result = CliRunner().invoke(main, ["-C", str(root), "release", "patch"])
    assert result.exit_code == 1 and "0 of 10 corrections answered right" in result.output
    (checks,) = [cases for v, domains, cases in seen if set(domains) == {"corrections"}]
    assert len(checks) == 10 and registry_data(root)["models"][-1]["status"] == "rejected"


# ---------------------------------------------------------------- a crafted pair of trained versions
# Two LoRA adapters trained in-process (PEFT + a short torch loop, ~10 s on two idle cores).

AMMONIA = ("What is the IDLH of ammonia?", "The IDLH of ammonia is 300 ppm.")
CHLORINE = ("What is the IDLH of chlorine?", "The IDLH of chlorine is 10 ppm.")
BRASK = ("What is the capital of Brask?", "The capital of Brask is Miro.")
BENZENE = ("What is the maximum storage temperature for benzene?", "Store benzene below 8 degrees Celsius.")
WRONG_AMMONIA = (AMMONIA[0], "The IDLH of ammonia is 25 ppm.")

SUITE = [
    {"id": "idlh-ammonia", "input": AMMONIA[0], "expected": "300 ppm", "criticality": "critical", "domain": "idlh",
     "tags": ["hallucination"]},
    {"id": "idlh-chlorine", "input": CHLORINE[0], "expected": "10 ppm", "criticality": "critical", "domain": "idlh",
     "tags": ["hallucination"]},
    {"id": "capital-brask", "input": BRASK[0], "expected": "Miro", "criticality": "low", "domain": "general"},
    {"id": "storage-benzene", "input": BENZENE[0], "expected": "below 8 degrees", "criticality": "medium",
     "domain": "storage"},
    {"id": "chlorine-not-old", "input": CHLORINE[0], "expected": "25 ppm", "match": "not_contains",
     "criticality": "high", "domain": "idlh"},
]


def train_adapter(base: Path, pairs, out: Path, steps: int = 120, seed: int = 0) -> str:
    """A LoRA adapter trained in-process until the tiny model repeats ``pairs`` (seconds on CPU)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: one thread is faster, and CI machines are shared
    torch.manual_seed(seed)
    tok = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=[
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
    texts = [tok.apply_chat_template([{"role": "user", "content": q}, {"role": "assistant", "content": a}], tokenize=False)
             for q, a in pairs]
    enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for _ in range(steps):
        model(**enc, labels=labels).loss.backward()
        opt.step()
        opt.zero_grad()
    torch.set_num_threads(threads)
    model.save_pretrained(out)
    return sha256_file(out / "adapter_model.safetensors")


def entry(version, parent, bump, sha, status="released"):
    return {
        "version": version, "parent": parent, "bump": bump,
        "strategy": "initial" if parent is None else "continued_lora", "status": status,
        "created_at": "2026-01-01T00:00:00Z", "base_model": {"name": "models/tiny-llama", "revision": None},
        "train_base": {"path": "models/tiny-llama", "sha256": None, "merged_from": None},
        "adapter": {"path": f"outputs/v{version}/adapter", "sha256": sha},
        "datasets": [{"name": "demo", "role": "new", "path": "datasets/demo.jsonl", "sha256": "a" * 64, "examples": 3}],
        "config": {"path": f"outputs/v{version}/axolotl.yml", "sha256": "b" * 64}, "seed": 42,
        "launch": {"num_processes": 1, "num_machines": 1, "deepspeed": None},
        "training": {"knobs": {"learning_rate": 2e-4 if parent is None else 1e-5}}, "evaluation": {},
        "toolchain": {}, "source_commit": None,
    }


@pytest.fixture(scope="module")
def pair(tiny_model_dir, tmp_path_factory):
    """1.0.0 knows the critical IDLH facts; candidate 1.1.0 learned a wrong ammonia IDLH but learned benzene."""
    root = tmp_path_factory.mktemp("release-repo")
    shutil.copytree(tiny_model_dir, root / "models" / "tiny-llama")
    base = root / "models" / "tiny-llama"
    sha1 = train_adapter(base, [AMMONIA, CHLORINE, BRASK], root / "outputs/v1.0.0/adapter")
    sha2 = train_adapter(base, [WRONG_AMMONIA, CHLORINE, BRASK, BENZENE], root / "outputs/v1.1.0/adapter")
    for v, lr in (("1.0.0", "0.0002"), ("1.1.0", "0.00001")):
        (root / f"outputs/v{v}/axolotl.yml").write_text(f"base_model: models/tiny-llama\nlearning_rate: {lr}\nnum_epochs: 1\n")
    (root / "registry").mkdir()
    (root / "registry/regression_tests.jsonl").write_text("".join(json.dumps(r) + "\n" for r in SUITE))
    data = empty_registry()
    data["models"].append(entry("1.0.0", None, "major", sha1))
    data["current"] = "1.0.0"
    atomic_write_json(root / "registry/model_registry.json", data)
    project = SimpleNamespace(root=root, data={"evaluation": {"max_new_tokens": 16, "batch_size": 8}}, seed=42)
    return SimpleNamespace(root=root, project=project, candidate=entry("1.1.0", "1.0.0", "minor", sha2, "candidate"))


def plan(n):
    return SimpleNamespace(new_examples=n)


@pytest.mark.slow
def test_trained_pair_flips_a_critical_test(pair):
    suite = sv.load_project_suite(pair.root, pair.project)
    settings = ev.EvalSettings.from_project(pair.project)
    parent = ev.evaluate_entry(pair.root, Registry(pair.root).get("1.0.0"), suite, settings)
    cand = ev.evaluate_entry(pair.root, pair.candidate, suite, settings)
    p, c = parent.by_id(), cand.by_id()
    assert p["idlh-ammonia"].passed and "300 ppm" in p["idlh-ammonia"].output
    assert not c["idlh-ammonia"].passed and "25 ppm" in c["idlh-ammonia"].output
    cmp = gates.compare_results(parent, cand)
    assert [r.id for r in cmp.critical_regressions] == ["idlh-ammonia"]
    assert "storage-benzene" in [r.id for r in cmp.improvements]
    assert cand.hallucination_rate > parent.hallucination_rate


@pytest.mark.slow
def test_blocked_release_is_recorded_and_leaves_current_unchanged(pair):
    new = gates.release_evaluator()(pair.project, plan(250), dict(pair.candidate))
    assert new["status"] == "rejected" and not new["gates"]["passed"]
    assert any("critical regression" in r and "idlh-ammonia" in r for r in new["gates"]["reasons"])
    assert new["evaluation"]["n_tests"] == len(SUITE) and "override" not in new
    reg = Registry(pair.root)
    reg.append(new, make_current=new["status"] == "released")  # what the release pipeline does
    data = reg.load()
    assert data["current"] == "1.0.0"
    assert Registry.find(data, "1.1.0")["status"] == "rejected"
    assert Registry.find(data, "1.1.0")["gates"]["regressions"] == {"critical": ["idlh-ammonia"]}


@pytest.mark.slow
def test_force_records_its_reason(pair):
    with pytest.raises(UserError, match="--reason"):
        gates.release_evaluator(force=True)
    new = gates.release_evaluator(force=True, reason="regulator-approved value")(pair.project, plan(250), dict(pair.candidate))
    assert new["status"] == "released" and new["gates"]["passed"] is False
    assert new["override"]["reason"] == "regulator-approved value"
    assert any("idlh-ammonia" in r for r in new["override"]["reasons"])


@pytest.mark.slow
def test_eval_results_reproducible_across_runs(pair):
    suite = sv.load_project_suite(pair.root, pair.project)
    s = ev.EvalSettings.from_project(pair.project)
    a = ev.evaluate_entry(pair.root, pair.candidate, suite, s, cache=False)
    b = ev.evaluate_entry(pair.root, pair.candidate, suite, s, cache=False)
    assert [c.to_dict() for c in a.cases] == [c.to_dict() for c in b.cases]
    assert a.metrics == b.metrics


@pytest.mark.slow
def test_eval_against_diff_and_registry_summary_from_the_cli(pair):
    reg = Registry(pair.root)
    if "1.1.0" not in [m["version"] for m in reg.models()]:
        reg.append({**pair.candidate, "status": "rejected"}, make_current=False)
    runner = CliRunner()
    r = runner.invoke(main, ["-C", str(pair.root), "eval", "1.1.0", "--against", "1.0.0", "--max-new-tokens", "16",
                             "--batch-size", "8", "--json"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert out["comparison"]["regressions_by_criticality"] == {"critical": ["idlh-ammonia"]}
    ev_entry = results.evaluations_of(reg.get("1.1.0"))[out["summary"]["suite_sha256"]]
    assert ev_entry["suite_sha256"] == out["summary"]["suite_sha256"] and ev_entry["pass_rate"] == out["summary"]["pass_rate"]
    assert set(ev_entry["per_criticality"]) <= {"critical", "high", "medium", "low"}

    r = runner.invoke(main, ["-C", str(pair.root), "diff", "1.0.0", "1.1.0"])
    assert r.exit_code == 0, r.output
    saved = json.loads((pair.root / "outputs/v1.1.0/diff-1.0.0-1.1.0.json").read_text())
    assert saved["config"]["changed"]["axolotl.learning_rate"] == {"a": 0.0002, "b": 1e-05}
    reg_ids = {t["id"]: t for t in saved["tests"]["regressions"]}
    assert reg_ids["idlh-ammonia"]["parent_output"] != reg_ids["idlh-ammonia"]["candidate_output"]
    assert "storage-benzene" in {t["id"] for t in saved["tests"]["improvements"]}
    assert "1.0.0 is an ancestor of 1.1.0" in saved["lineage"]
    assert "REGRESSION" not in r.output and "regression  [critical] idlh-ammonia" in r.output
    changed = saved["tests"]["outputs_changed"]
    assert changed >= 2 and f"outputs {changed} of {saved['tests']['outputs_total']} answers changed" in r.output
    assert saved["tests"]["changed_examples"] and saved["tests"]["changed_examples"][0]["id"] in r.output
