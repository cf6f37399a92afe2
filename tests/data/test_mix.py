"""Corrections and newer answers retire older ones in every later mix (cl_release.data.mix), through
real plans and releases (fake trainer): replay, complete data, new data, the general set."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cl_release.data import formats as ds
from cl_release.errors import UserError
from cl_release.store.sqlite import FeedbackStore
from cl_release.data.mix import Example, prompt_key_of, resolve, stale_values
from cl_release.release.plan import plan_release
from cl_release.release.recovery import verify

from helpers import commit_all, git, load_project, make_release_repo, release


def qa(q: str, a: str) -> dict:
    return {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}


def write(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def answers(records, question: str) -> set[str]:
    key = prompt_key_of(question)
    return {r["messages"][-1]["content"] for r in records if ds.prompt_key(r) == key}


def all_records(plan) -> list[dict]:
    return [r for p in plan.parts for r in p.records]


# ---------------------------------------------------------------- the rule, alone


def ex(q, a, time, correction=False, source="s"):
    return Example(qa(q, a), time, correction, source)


@pytest.mark.parametrize("rule, kept", [("correction", "fixed"), ("newest", "newer")])
def test_the_rule_picks_one_answer_per_question(rule, kept):
    examples = [ex("Q?", "old", 0), ex("Q?", "fixed", 1, correction=True), ex("q? ", "newer", 2), ex("R?", "r", 0)]
    res = resolve(examples, rule=rule, version="1.2.0")
    live = {e.record["messages"][-1]["content"] for e in examples if e.hash not in res.retired}
    assert live == {kept, "r"} and len(res.retired) == 2
    assert {w["at"] for w in res.retired.values()} == {"1.2.0"}


def test_two_answers_of_one_age_stay_and_are_reported_or_refused():
    examples = [ex("Q?", "a", 1), ex("Q?", "b", 1), ex("Q?", "a", 1)]
    res = resolve(examples, rule="correction", version="1.0.0")
    assert res.retired == {} and res.unresolved[0]["answers"] == ["a", "b"]
    with pytest.raises(UserError, match="more than one live answer .*mix.conflicts: error"):
        resolve(examples, rule="error", version="1.0.0")
    with pytest.raises(UserError, match="unknown mix.conflicts rule"):
        resolve(examples, rule="vote", version="1.0.0")


def test_stale_values_names_an_unnamed_paraphrase():
    examples = [ex("What is the IDLH of phosgene?", "10 ppm", 0), ex("What is the IDLH of phosgene?", "2 ppm", 1, True),
                ex("At what concentration is phosgene immediately dangerous?", "At 10 ppm.", 0, source="q1"),
                ex("What is the IDLH of chlorine?", "10 ppm", 0), ex("What is the IDLH of arsine?", "3 ppm", 0),
                *[ex(f"What is the IDLH of thing {i}?", f"{i} ppm", 0) for i in range(20)]]
    res = resolve(examples, version="1.1.1")
    warnings = stale_values(examples, res)
    assert len(warnings) == 1 and "immediately dangerous" in warnings[0] and "10 ppm" in warnings[0]
    assert "supersedes" in warnings[0]  # chlorine's 10 ppm is another subject: not named


# ---------------------------------------------------------------- through plans and releases


@pytest.fixture
def root(tmp_path, trainer) -> Path:
    root = make_release_repo(tmp_path, general=False)
    write(root / "datasets/domain/q1.jsonl",
          [qa("What is the IDLH of phosgene?", "The IDLH of phosgene is 10 ppm."),
           qa("At what concentration is phosgene immediately dangerous?", "At 10 ppm."),
           qa("What is the IDLH of chlorine?", "The IDLH of chlorine is 25 ppm.")]
          + [qa(f"What is fact {i}?", f"Fact {i} is {i}.") for i in range(12)])
    commit_all(root)
    release(root, "minor")  # 1.0.0
    return root


def test_a_patch_retires_the_old_answer_for_every_later_mix(root):
    write(root / "datasets/corrections/c1.jsonl",
          [{**qa("What is the IDLH of phosgene?", "The IDLH of phosgene is 2 ppm."),
            "supersedes": ["At what concentration is phosgene immediately dangerous?"]}])
    commit_all(root)
    r = release(root, "patch")  # 1.0.1
    assert r.plan.retired_new == 2 and r.entry["retired"]["count"] == 2
    assert not answers(all_records(r.plan), "What is the IDLH of phosgene?") - {"The IDLH of phosgene is 2 ppm."}
    assert not answers(all_records(r.plan), "At what concentration is phosgene immediately dangerous?")
    retired = json.loads((root / r.entry["retired"]["path"]).read_text())
    assert {w["why"] for w in retired.values()} == {"correction", "supersedes"} and {w["at"] for w in retired.values()} == {"1.0.1"}
    assert all(c.ok for c in verify(root)) and r.entry["retired"]["path"] in git(root, "ls-files")
    from click.testing import CliRunner

    from cl_release.cli import main

    write(root / "datasets/corrections/c2.jsonl", [qa("What is the IDLH of chlorine?", "The IDLH of chlorine is 10 ppm.")])
    commit_all(root)
    out = CliRunner().invoke(main, ["-C", str(root), "plan", "patch"]).stdout
    assert "retired   3 examples a correction or a newer answer replaced (1 by this release" in out
    assert "'What is the IDLH of chlorine?': 'The IDLH of chlorine is 25 ppm.' -> 'The IDLH of chlorine is 10 ppm.' (correction)" in out
    (root / "datasets/corrections/c2.jsonl").unlink()
    commit_all(root)

    write(root / "datasets/domain/q2.jsonl", [qa(f"What is storage {i}?", f"Keep {i} cool.") for i in range(12)])
    commit_all(root)
    minor = release(root, "minor")  # 1.1.0: replay samples from the lineage, the old answer retired
    major = release(root, "major")  # 2.0.0: the complete data
    for r in (minor, major):
        data = all_records(r.plan)
        assert "The IDLH of phosgene is 10 ppm." not in answers(data, "What is the IDLH of phosgene?")
        assert not answers(data, "At what concentration is phosgene immediately dangerous?")
        assert r.entry["retired"]["count"] == 2 and r.entry["retired"]["new"] == 0  # kept retired, not re-decided
    assert "The IDLH of phosgene is 2 ppm." in answers(all_records(major.plan), "What is the IDLH of phosgene?")


def test_a_newer_domain_answer_retires_the_one_an_earlier_release_trained(root):
    write(root / "datasets/domain/q1b.jsonl", [qa("What is the IDLH of chlorine?", "The IDLH of chlorine is 10 ppm.")]
          + [qa(f"What is extra {i}?", f"Extra {i}.") for i in range(4)])
    commit_all(root)
    r = release(root, "minor")
    assert r.plan.resolved and r.plan.resolved[0]["kept"] == "The IDLH of chlorine is 10 ppm."
    major = release(root, "major")
    assert answers(all_records(major.plan), "What is the IDLH of chlorine?") == {"The IDLH of chlorine is 10 ppm."}


def test_two_live_answers_in_the_domain_data_are_a_warning_or_an_error(root):
    write(root / "datasets/domain/q1b.jsonl", [qa("What is fact 99?", "Fact 99 is 1."), qa("What is fact 99?", "Fact 99 is 2.")])
    commit_all(root)
    plan = plan_release(load_project(root), bump="minor")
    assert any("two answers to one question, kept both" in w for w in plan.data_warnings)
    assert answers(all_records(plan), "What is fact 99?") == {"Fact 99 is 1.", "Fact 99 is 2."}
    import yaml

    project = yaml.safe_load((root / "cl-release.yaml").read_text())
    project["mix"]["conflicts"] = "error"
    (root / "cl-release.yaml").write_text(yaml.safe_dump(project))
    with pytest.raises(UserError, match="more than one live answer"):
        plan_release(load_project(root), bump="minor")


def test_feedback_supersedes_retires_a_paraphrase(root):
    store = FeedbackStore(load_project(root).feedback_path)
    store.log("What is the IDLH of phosgene?", "The IDLH of phosgene is 10 ppm.", request_id="inc")
    store.feedback("inc", rating=1, correction="The IDLH of phosgene is 2 ppm.", severity="critical")
    store.set_supersedes("inc", ["At what concentration is phosgene immediately dangerous?"])
    store.close()
    r = release(root, "patch")
    assert not answers(all_records(r.plan), "At what concentration is phosgene immediately dangerous?")
    assert r.plan.retired_new == 2  # the old answer (correction) and the paraphrase (supersedes)
    assert any(p.role == "corrections" and p.name == "feedback-corrections" for p in r.plan.parts)
    major = release(root, "major")
    assert answers(all_records(major.plan), "What is the IDLH of phosgene?") == {"The IDLH of phosgene is 2 ppm."}


def test_supersedes_needs_a_correction_and_questions(root):
    store = FeedbackStore(load_project(root).feedback_path)
    store.log("q", "a", request_id="r")
    store.feedback("r", rating=5)
    with pytest.raises(UserError, match="has no correction"):
        store.set_supersedes("r", ["other question"])
    with pytest.raises(UserError, match="1 to 100 questions"):
        store.set_supersedes("r", [])
    write(root / "datasets/corrections/c1.jsonl", [{**qa("q?", "a"), "supersedes": "not a list but one question"},
                                                    {**qa("r?", "b"), "supersedes": [3]}])
    commit_all(root)
    from cl_release.errors import DataError
    with pytest.raises(DataError, match=r"c1.jsonl:2: supersedes: must be a list of questions"):
        plan_release(load_project(root), bump="patch")
