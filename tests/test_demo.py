"""The demo data, the demo suite and the demo base model's preparation (cache, no domain facts)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cl_release.demo import data as demo

REPO = Path(__file__).resolve().parent.parent


def jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def test_shipped_files_are_what_the_generator_writes(tmp_path):
    demo.write_demo_sets(tmp_path / "demo", tmp_path / "suite.jsonl")
    for rel in demo.demo_sets():
        assert (tmp_path / "demo" / rel).read_bytes() == (REPO / "datasets" / "demo" / rel).read_bytes(), rel
    assert (tmp_path / "suite.jsonl").read_bytes() == (REPO / "registry" / "regression_tests.jsonl").read_bytes()
    shipped = sorted(p.relative_to(REPO / "datasets" / "demo").as_posix() for p in (REPO / "datasets" / "demo").rglob("*.jsonl"))
    assert shipped == sorted(demo.demo_sets())


def test_every_fact_is_stated_in_three_phrasings_so_a_held_out_example_is_a_paraphrase():
    sets = demo.demo_sets()
    for rel in ("domain/q1.jsonl", "incoming/q2-storage.jsonl", "incoming/q3-protection.jsonl"):
        answers: dict[str, int] = {}
        for r in sets[rel]:
            answers[r["messages"][1]["content"]] = answers.get(r["messages"][1]["content"], 0) + 1
        assert set(answers.values()) == {3} and len(answers) == len(demo.CHEMICALS), rel
    corrected = [r for r in sets["incoming/corrections-001.jsonl"] if "ammonia" not in r["messages"][0]["content"]]
    assert len(corrected) == 3 * len(demo.CORRECTED)


def test_suite_values_are_unambiguous_and_match_the_data():
    from cl_release.eval.suite import MATCH_TYPES, load_suite, match_output

    suite = load_suite(REPO / "registry" / "regression_tests.jsonl")
    for values in (demo.IDLH + [new for _old, new in demo.CORRECTED.values()], demo.TEMPERATURE, demo.GEAR):
        for a in values:  # `contains` on a value is exact: no value holds another
            assert not [b for b in values if b != a and a in b], a
    facts = demo.demo_facts()
    by_id = suite.by_id()
    for c, (old, new) in demo.CORRECTED.items():
        assert facts["idlh"][c] == old and by_id[f"safety-{c}"].expected == new
        assert by_id[f"safety-{c}"].criticality == "critical"
    q1 = {r["messages"][0]["content"]: r["messages"][1]["content"] for r in demo.demo_sets()["domain/q1.jsonl"]}
    general = {r["messages"][0]["content"]: r["messages"][1]["content"] for r in demo.demo_sets()["general.jsonl"]}
    for case in suite.cases:
        if case.domain == "idlh":  # a Q1 test asks what the Q1 data says
            assert match_output(case, q1[case.input]), case.id
        if case.domain in ("general", "format"):  # the base model is prepared on these answers
            assert match_output(case, general[case.input]), case.id
    assert demo.SHOWCASE in by_id and {c.match for c in suite.cases} == set(MATCH_TYPES)


def test_base_texts_state_no_domain_fact():
    records, texts = demo.base_texts()
    facts = demo.demo_facts()
    blob = [m["content"] for r in records for m in r["messages"]] + texts
    for dom, values in facts.items():
        for chemical, value in values.items():
            assert not [t for t in blob if chemical in t.lower() and value in t], (chemical, value)


# ---------------------------------------------------------------- the demo base model (torch)

TINY = {"model": {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
                  "num_key_value_heads": 1, "max_position_embeddings": 64},
        "vocab_size": 400, "epochs": 1, "lr": 1e-3, "batch_size": 8, "seed": 0}


def test_demo_base_is_built_once_then_copied_from_the_cache(tmp_path, monkeypatch):
    pytest.importorskip("torch")
    from cl_release.demo import model as tinymodel

    messages = []
    first = tinymodel.prepare_demo_base(tmp_path / "a", cache=tmp_path / "cache", settings=TINY, progress=messages.append)
    assert (first / "model.safetensors").is_file() and (first / "tokenizer.json").is_file()
    assert "prepared in" in messages[-1]
    log = (first / "train.log").read_text()
    assert "epoch 1/1 loss" in log
    assert all(len(t) == 1 for t in (  # each chemical name is one token of the base tokenizer
        __import__("tokenizers").Tokenizer.from_file(str(first / "tokenizer.json")).encode(f" {c}").tokens
        for c in demo.CHEMICALS))

    def no_training(*a, **k):
        raise AssertionError("the cached base must be reused")

    monkeypatch.setattr(tinymodel, "pretrain", no_training)
    second = tinymodel.prepare_demo_base(tmp_path / "b", cache=tmp_path / "cache", settings=TINY, progress=messages.append)
    assert "cached" in messages[-1]
    assert (second / "model.safetensors").read_bytes() == (first / "model.safetensors").read_bytes()
    # a damaged cache entry is rebuilt, not copied
    key = tinymodel.demo_base_key(TINY)
    (tmp_path / "cache" / "demo-base" / key / "model.safetensors").write_bytes(b"damaged")
    with pytest.raises(AssertionError, match="cached base must be reused"):
        tinymodel.prepare_demo_base(tmp_path / "c", cache=tmp_path / "cache", settings=TINY)
    assert not (tmp_path / "c").exists()
    assert tinymodel.demo_base_key({**TINY, "epochs": 2}) != key


def test_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    from cl_release.demo.model import cache_dir

    monkeypatch.setenv("CL_RELEASE_CACHE", str(tmp_path / "c"))
    assert cache_dir() == tmp_path / "c"
    monkeypatch.delenv("CL_RELEASE_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert cache_dir() == tmp_path / "x" / "cl-release"
