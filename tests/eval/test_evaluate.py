"""Regression suites, matching, metrics and the batched runner (tiny model, CPU)."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest
from click.testing import CliRunner

from cl_release.eval import results
from cl_release.eval import runner as ev
from cl_release.eval import suite as sv
from cl_release.cli import main
from cl_release.errors import DataError, EvaluationError, IntegrityError, UserError

from helpers import REPO



def case(**kw) -> sv.TestCase:
    row = {"id": "t1", "input": "q?", "expected": "x", **kw}
    return sv.parse_case(row, path="suite.jsonl", line=1)


def write_jsonl(path: Path, rows) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


# ---------------------------------------------------------------- match types


@pytest.mark.parametrize(
    "match, expected, output, passed",
    [
        ("contains", "300 ppm", "The IDLH of ammonia is 300 ppm.", True),
        ("contains", "300 PPM", "the idlh is 300\n  ppm", True),  # case and whitespace folded
        ("contains", "300 ppm", "The IDLH of ammonia is 25 ppm.", False),
        ("contains", ["300 ppm", "ammonia"], "ammonia: 300 ppm", True),  # every key fact
        ("contains", ["300 ppm", "ammonia"], "300 ppm", False),
        ("not_contains", "25 ppm", "The IDLH is 300 ppm.", True),
        ("not_contains", ["25 ppm", "50 ppm"], "It is 50 ppm.", False),  # none may appear
        ("exact", "Miro", "  Miro\n", True),
        ("exact", "Miro", "miro", False),
        ("exact", ["Miro", "Miro."], "Miro.", True),  # accepted alternatives
        ("regex", r"\b300 ppm\b", "is 300 ppm.", True),
        ("regex", r"\b300 ppm\b", "is 1300 ppm.", False),
        ("regex", [r"^The", r"ppm\.$"], "The IDLH is 3 ppm.", True),  # all patterns
        ("json_equal", {"a": 1, "b": [1, 2]}, '{"b": [1, 2], "a": 1}', True),
        ("json_equal", {"a": 1}, '```json\n{"a": 1}\n```', True),
        ("json_equal", {"a": 1}, '{"a": 2}', False),
        ("json_equal", {"a": 1}, "not json", False),
        ("json_equal", "[1, 2]", "[1,2]", True),  # a string expected is JSON text
        # an empty or blank answer fails every test (a destroyed model answers nothing)
        ("not_contains", "25 ppm", "", False),
        ("not_contains", ["25 ppm"], " \n\t", False),
        ("regex", r"^\s*$", "  ", False),
        ("regex", r".*", "", False),
    ],
)
def test_each_match_type(match, expected, output, passed):
    assert sv.match_output(case(match=match, expected=expected), output) is passed


@pytest.mark.parametrize(
    "row, field, text",
    [
        ({"match": "fuzzy"}, "match", "unknown match 'fuzzy'"),
        ({"criticality": "urgent"}, "criticality", "unknown criticality"),
        ({"match": "regex", "expected": "("}, "expected", "invalid regular expression"),
        ({"match": "json_equal", "expected": "{nope"}, "expected", "expects JSON text"),
        ({"expected": ""}, "expected", "non-empty"),
        ({"input": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}, "input[1]", "assistant"),
        ({"input": [{"role": "robot", "content": "q"}]}, "input[0].role", "unknown role"),
        ({"tags": "hallucination"}, "tags", "list of strings"),
        ({"colour": "red"}, "colour", "unknown key"),
    ],
)
def test_bad_rows_name_file_line_and_field(row, field, text):
    with pytest.raises(DataError) as e:
        sv.parse_case({"id": "t1", "input": "q?", "expected": "x", **row}, path="suite.jsonl", line=7)
    assert e.value.line == 7 and e.value.field == field
    assert text in str(e.value) and str(e.value).startswith("suite.jsonl:7")


def test_duplicate_ids_are_refused_within_and_across_files(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [{"id": "x", "input": "q", "expected": "1"}, {"id": "x", "input": "r", "expected": "2"}])
    with pytest.raises(DataError, match="already used on line 1") as e:
        sv.validate_suite_file(a)
    assert e.value.line == 2
    write_jsonl(tmp_path / "a.jsonl", [{"id": "x", "input": "q", "expected": "1"}])
    write_jsonl(tmp_path / "b.jsonl", [{"id": "x", "input": "r", "expected": "2"}])
    with pytest.raises(DataError, match="also in a.jsonl"):
        sv.load_suite(["a.jsonl", "b.jsonl"], root=tmp_path)


def test_empty_suite_is_a_user_error(tmp_path):
    (tmp_path / "s.jsonl").write_text("\n")
    with pytest.raises(UserError, match="has no tests"):
        sv.load_suite("s.jsonl", root=tmp_path)


def test_suite_hash_ignores_order_formatting_and_notes(tmp_path):
    rows = [
        {"id": "a", "input": "q1", "expected": "1", "criticality": "critical"},
        {"id": "b", "input": "q2", "expected": ["2", "3"], "tags": ["hallucination"]},
    ]
    write_jsonl(tmp_path / "one.jsonl", rows)
    (tmp_path / "two.jsonl").write_text(
        json.dumps({**rows[1], "notes": "why"}, indent=None, separators=(",", ":")) + "\n" + json.dumps(rows[0]) + "\n"
    )
    one, two = sv.load_suite("one.jsonl", root=tmp_path), sv.load_suite("two.jsonl", root=tmp_path)
    assert one.sha256 == two.sha256
    write_jsonl(tmp_path / "three.jsonl", [rows[0], {**rows[1], "expected": ["2"]}])
    assert sv.load_suite("three.jsonl", root=tmp_path).sha256 != one.sha256


def test_the_shipped_default_suite_is_valid():
    suite = sv.load_suite(sv.DEFAULT_SUITE, root=REPO)
    crit = [c for c in suite.cases if c.criticality == "critical"]
    hall = [c for c in suite.cases if "hallucination" in c.tags]
    assert len(suite) >= 20 and crit and hall
    assert {c.match for c in suite.cases} == set(sv.MATCH_TYPES)


# ---------------------------------------------------------------- metrics


def result(cid, passed, crit="medium", domain="d", tags=(), samples=None):
    return results.CaseResult(id=cid, passed=passed, output="", criticality=crit, domain=domain, tags=list(tags),
                         match="contains", expected="x", samples_passed=samples)


def test_metrics_per_domain_criticality_hallucination_and_pass_at_k():
    rows = [
        result("a", True, "critical", "idlh", ["hallucination"], samples=2),
        result("b", False, "critical", "idlh", ["hallucination"], samples=1),
        result("c", False, "low", "storage", ["hallucination"], samples=0),
        result("d", True, "high", "storage", samples=3),
    ]
    m = results.compute_metrics(rows, pass_k=3)
    assert m["pass_rate"] == 0.5 and m["n_tests"] == 4
    assert m["per_domain"]["idlh"] == {"n": 2, "passed": 1, "pass_rate": 0.5}
    assert list(m["per_criticality"]) == ["critical", "high", "low"]  # most severe first, absent ones omitted
    assert m["hallucination_rate"] == round(2 / 3, 6)
    assert m["pass_at_k"] == {"k": 3, "rate": 0.75}
    assert results.compute_metrics(rows[3:])["hallucination_rate"] is None


# ---------------------------------------------------------------- the runner on the tiny model


@pytest.fixture(scope="module")
def small_suite(tmp_path_factory):
    root = tmp_path_factory.mktemp("suite")
    rows = [json.loads(line) for line in (REPO / "registry" / "regression_tests.jsonl").read_text().splitlines()[:10]]
    write_jsonl(root / "s.jsonl", rows)
    return sv.load_suite("s.jsonl", root=root)


def test_runner_is_deterministic_and_batching_does_not_change_answers(tiny_model, small_suite):
    root = tiny_model.parent.parent
    base = "models/tiny-llama"
    s = ev.EvalSettings(batch_size=4, max_new_tokens=12)
    first = ev.evaluate_model(root, base, None, small_suite, s)
    again = ev.evaluate_model(root, base, None, small_suite, s)
    one_by_one = ev.evaluate_model(root, base, None, small_suite, ev.EvalSettings(batch_size=1, max_new_tokens=12))
    outs = [c.output for c in first.cases]
    assert outs == [c.output for c in again.cases] == [c.output for c in one_by_one.cases]
    assert [c.passed for c in first.cases] == [c.passed for c in again.cases]
    assert first.metrics == again.metrics
    assert [c.id for c in first.cases] == [c.id for c in small_suite.cases]  # original order kept
    perf = first.performance
    assert perf["generated_tokens"] > 0 and perf["tokens_per_second"] > 0
    assert perf["peak_memory_mb"] > 0 and perf["peak_memory_kind"] == "process_max_rss"
    summary = first.summary()
    assert summary["suite_sha256"] == small_suite.sha256 and summary["n_tests"] == len(small_suite)
    assert len(json.dumps(summary)) < 2000  # small enough for the registry entry


def test_pass_at_k_samples_are_reproducible(tiny_model, small_suite):
    root = tiny_model.parent.parent
    suite = sv.Suite(cases=small_suite.cases[:4])
    s = ev.EvalSettings(batch_size=4, max_new_tokens=6, pass_k=3, seed=1)
    a = ev.evaluate_model(root, "models/tiny-llama", None, suite, s)
    b = ev.evaluate_model(root, "models/tiny-llama", None, suite, s)
    assert a.metrics["pass_at_k"]["k"] == 3
    assert [c.samples_passed for c in a.cases] == [c.samples_passed for c in b.cases]
    assert all(c.samples_passed is not None for c in a.cases)


def test_chat_template_is_applied(tiny_model):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    c = case(input=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"}])
    assert ev.render_prompt(tok, c) == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi?<|im_end|>\n<|im_start|>assistant\n"


def entry_for(version, adapter_rel=None, sha=None, base="models/tiny-llama"):
    e = {"version": version, "base_model": {"name": base}, "train_base": {"path": base, "sha256": None, "merged_from": None}}
    if adapter_rel:
        e["adapter"] = {"path": adapter_rel, "sha256": sha}
    return e


def test_results_are_saved_and_reused_while_suite_and_settings_match(tiny_model, small_suite, monkeypatch):
    root = tiny_model.parent.parent
    s = ev.EvalSettings(batch_size=8, max_new_tokens=8)
    entry = entry_for("1.0.0")
    first = ev.evaluate_entry(root, entry, small_suite, s)
    saved = root / f"outputs/v1.0.0/eval/{small_suite.sha256[:16]}.json"
    assert saved.is_file() and first.summary()["results"] == saved.relative_to(root).as_posix()

    def boom(*a, **k):
        raise AssertionError("should have used the saved results")

    monkeypatch.setattr(ev, "evaluate_model", boom)
    cached = ev.evaluate_entry(root, entry, small_suite, s)
    assert [c.output for c in cached.cases] == [c.output for c in first.cases]
    with pytest.raises(AssertionError):  # a result-changing setting differs: recompute
        ev.evaluate_entry(root, entry, small_suite, ev.EvalSettings(batch_size=8, max_new_tokens=9))


def test_adapter_that_changed_after_release_is_refused(tmp_path, small_suite):
    adir = tmp_path / "outputs/v1.0.0/adapter"
    adir.mkdir(parents=True)
    (adir / "adapter_model.safetensors").write_bytes(b"weights")
    entry = entry_for("1.0.0", "outputs/v1.0.0/adapter", "0" * 64)
    with pytest.raises(IntegrityError, match="does not match"):
        ev.evaluate_entry(tmp_path, entry, small_suite)
    entry["adapter"]["path"] = "outputs/v9.0.0/adapter"
    with pytest.raises(EvaluationError, match="missing"):
        ev.evaluate_entry(tmp_path, entry, small_suite)


# ---------------------------------------------------------------- judge (optional, local fake)


def test_judge_asks_an_openai_compatible_endpoint():
    seen = {}

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            seen["path"] = self.path
            seen["body"] = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            body = json.dumps({"choices": [{"message": {"content": "PASS"}}]}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *a):
            pass

    server = HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/v1"
        verdict = ev.judge_output(url, case(expected="300 ppm", judge=True), "three hundred ppm", model="m")
    finally:
        server.shutdown()
    assert verdict["passed"] is True
    assert seen["path"] == "/v1/chat/completions" and seen["body"]["model"] == "m"
    assert "300 ppm" in seen["body"]["messages"][0]["content"]


# ---------------------------------------------------------------- managing suites from the CLI


def project_dir(tmp_path: Path) -> Path:
    (tmp_path / "data.jsonl").write_text("")
    (tmp_path / "cl-release.yaml").write_text(
        "name: demo\nbase_model: {name: models/tiny-llama}\ndatasets: [{name: d, path: data.jsonl}]\n"
    )
    (tmp_path / "registry").mkdir()
    return tmp_path


def test_eval_add_and_import(tmp_path):
    root = project_dir(tmp_path)
    runner = CliRunner()
    args = ["-C", str(root), "eval", "add", "--input", "What is the IDLH of ammonia?", "--expected", "300 ppm",
            "--criticality", "critical", "--domain", "idlh", "--tag", "hallucination", "--id", "idlh-ammonia"]
    r = runner.invoke(main, args)
    assert r.exit_code == 0, r.output
    assert runner.invoke(main, args).output.strip().endswith("is already there")
    clash = runner.invoke(main, args[:-1] + ["idlh-ammonia"] + ["--match", "exact"])
    assert clash.exit_code == 2 and "different content" in clash.output

    write_jsonl(root / "new.jsonl", [
        {"messages": [{"role": "user", "content": "Store benzene?"}, {"role": "assistant", "content": "Below 8 degrees."}]},
        {"id": "s2", "input": "Q?", "expected": "A", "criticality": "high"},
        {"instruction": "Capital of Brask?", "output": "Miro"},
    ])
    r = runner.invoke(main, ["-C", str(root), "eval", "import", "new.jsonl", "--domain", "storage", "--tag", "imported"])
    assert r.exit_code == 0, r.output
    assert "added 3 tests" in r.output
    suite = sv.load_suite(sv.DEFAULT_SUITE, root=root)
    by = suite.by_id()
    assert by["idlh-ammonia"].criticality == "critical" and by["idlh-ammonia"].tags == ("hallucination",)
    assert by["s2"].criticality == "high" and by["s2"].domain == "storage" and "imported" in by["s2"].tags
    assert len(suite) == 4
    r = runner.invoke(main, ["-C", str(root), "data", "validate", "--format", "suite", sv.DEFAULT_SUITE])
    assert r.exit_code == 0, r.output


def test_eval_import_names_the_bad_line(tmp_path):
    root = project_dir(tmp_path)
    write_jsonl(root / "bad.jsonl", [{"id": "a", "input": "q", "expected": "x"}, {"id": "b", "input": "q", "expected": "x", "match": "nope"}])
    r = CliRunner().invoke(main, ["-C", str(root), "eval", "import", "bad.jsonl"])
    assert r.exit_code == 2 and "bad.jsonl:2: match" in r.output
    assert not (root / sv.DEFAULT_SUITE).exists()  # all or nothing


@pytest.mark.parametrize("severity, criticality", [
    ("safety", "critical"), ("critical", "critical"), ("high", "high"), ("low", "low"), (None, "medium")])
def test_a_test_from_feedback_takes_its_criticality_from_the_severity(severity, criticality):
    from cl_release.store.sqlite import SEVERITIES

    assert severity is None or severity in SEVERITIES
    record = {"id": "r1", "input": [{"role": "user", "content": "Q?"}], "output": "A.", "severity": severity,
              "hallucinated": severity == "safety"}
    row = sv.row_from_feedback(record, defaults=sv.case_defaults(tags=["x"]))
    case = sv.parse_case(row, path="t")
    assert (case.id, case.input, case.expected, case.criticality) == ("fb-r1", "Q?", "A.", criticality)
    assert case.tags == (("x", "hallucination") if severity == "safety" else ("x",))
    chosen = sv.row_from_feedback(record, defaults=sv.case_defaults(criticality="low"), expected="B", test_id="t1")
    assert (chosen["criticality"], chosen["expected"], chosen["id"]) == ("low", "B", "t1")


def test_eval_add_from_feedback_promotes_the_correction(tmp_path):
    from cl_release.store.sqlite import FeedbackStore

    root = project_dir(tmp_path)
    store = FeedbackStore(root / ".cl-release" / "feedback.db")
    rid = store.log("What is the IDLH of chlorine?", "It is 25 ppm.", request_id="req-1", model_version="1.0.0")
    store.feedback(rid, rating=1, correction="The IDLH of chlorine is 10 ppm.", hallucinated=True, severity="safety")
    store.close()
    r = CliRunner().invoke(main, ["-C", str(root), "eval", "add", "--from-feedback", "req-1", "--domain", "idlh"])
    assert r.exit_code == 0, r.output
    t = sv.load_suite(sv.DEFAULT_SUITE, root=root).by_id()["fb-req-1"]
    assert t.expected == "The IDLH of chlorine is 10 ppm." and t.criticality == "critical"
    assert "hallucination" in t.tags and t.source == "feedback:req-1"
    missing = CliRunner().invoke(main, ["-C", str(root), "eval", "add", "--from-feedback", "nope"])
    assert missing.exit_code == 2 and "no logged answer" in missing.output


def test_help_does_not_import_heavy_modules():
    code = ("import sys; from click.testing import CliRunner; from cl_release.cli import main; "
            "r = CliRunner().invoke(main, ['eval', '--help']); assert r.exit_code == 0, r.output; "
            "print(sorted(m for m in ('torch', 'transformers', 'peft', 'matplotlib') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_every_evaluation_command_has_help():
    for args in (["eval"], ["eval", "run"], ["eval", "add"], ["eval", "import"], ["diff"], ["report"]):
        r = CliRunner().invoke(main, [*args, "--help"])
        assert r.exit_code == 0 and len(r.output.split("\n\n")[1].strip()) > 10, args



def test_missing_suite_says_how_to_create_one(tmp_path):
    with pytest.raises(DataError, match="regression suite not found") as e:
        sv.load_suite(sv.DEFAULT_SUITE, root=tmp_path)
    assert "cl-release eval add" in str(e.value)


# ---------------------------------------------------------------- hostile suites, paths typed on the command line


@pytest.mark.parametrize("row, field", [
    ({"match": "json_equal", "expected": json.loads("[" * 300 + "]" * 300)}, "expected"),
    ({"match": "json_equal", "expected": "[" * 100_000 + "]" * 100_000}, "expected"),
    ({"metadata": {"a": json.loads("[" * 300 + "]" * 300)}}, "metadata"),
])
def test_deeply_nested_suite_values_name_the_field(row, field):
    with pytest.raises(DataError) as e:
        sv.parse_case({"id": "t1", "input": "q?", "expected": "x", **row}, path="suite.jsonl", line=4)
    assert e.value.field == field and e.value.line == 4 and "nested deeper than 64 levels" in str(e.value)


def test_suite_prompt_over_the_size_limit_names_the_line(tmp_path):
    write_jsonl(tmp_path / "s.jsonl", [{"id": "a", "input": "q", "expected": "x"},
                                       {"id": "b", "input": "q" * 200, "expected": "x"}])
    assert len(sv.load_suite("s.jsonl", root=tmp_path)) == 2
    with pytest.raises(DataError) as e:
        sv.load_suite("s.jsonl", root=tmp_path, max_chars=100)
    assert (e.value.line, e.value.field) == (2, "input") and "over the limit of 100" in str(e.value)


def test_suite_paths_typed_by_the_user_may_be_anywhere_and_are_hashed(tmp_path):
    from cl_release.files import sha256_file

    (tmp_path / "repo").mkdir()
    root = project_dir(tmp_path / "repo")
    outside = write_jsonl(tmp_path / "elsewhere" / "s.jsonl", [{"id": "a", "input": "q", "expected": "x"}])
    for given in (str(outside), "../elsewhere/s.jsonl"):
        suite = sv.load_project_suite(root, None, [given])
        assert suite.files == [{"path": given, "sha256": sha256_file(outside)}]


def test_suite_paths_from_the_project_file_stay_confined(tmp_path):
    from cl_release.errors import ProjectError
    from cl_release.project import Project

    (tmp_path / "repo").mkdir()
    root = project_dir(tmp_path / "repo")
    write_jsonl(tmp_path / "elsewhere" / "s.jsonl", [{"id": "a", "input": "q", "expected": "x"}])
    with open(root / "cl-release.yaml", "a") as f:
        f.write("evaluation:\n  suites: [../elsewhere/s.jsonl]\n")
    project = Project.load(root)
    with pytest.raises(ProjectError) as e:
        sv.load_project_suite(root, project)
    assert e.value.field == "evaluation.suites[0]" and e.value.line == 5 and "'..'" in str(e.value)


def fake_evaluate_model(root, base, adapter, suite, settings=None, *, revision=None, version=None, loaded=None):
    cases = [results.CaseResult(id=c.id, passed=c.id != "b", output=f"answer {c.id}", criticality=c.criticality,
                           domain=c.domain, tags=list(c.tags), match=c.match, expected=c.expected) for c in suite.cases]
    return results.EvalResult(suite_sha256=suite.sha256, suite_files=suite.files, cases=cases,
                         metrics=results.compute_metrics(cases), performance={}, settings=(settings or ev.EvalSettings()).fingerprint(),
                         model={"base": base, "adapter": adapter, "adapter_sha256": None}, version=version)


def test_cached_results_record_the_suite_files_of_this_run(tmp_path, monkeypatch):
    monkeypatch.setattr(ev, "evaluate_model", fake_evaluate_model)
    rows = [{"id": "a", "input": "q", "expected": "x"}]
    write_jsonl(tmp_path / "one.jsonl", rows)
    write_jsonl(tmp_path / "two.jsonl", rows)
    first = ev.evaluate_entry(tmp_path, entry_for("1.0.0"), sv.load_suite("one.jsonl", root=tmp_path))
    again = ev.evaluate_entry(tmp_path, entry_for("1.0.0"), sv.load_suite("two.jsonl", root=tmp_path))
    assert first.summary()["suite_files"][0]["path"] == "one.jsonl"
    assert again.summary()["suites"] == ["two.jsonl"] and again.summary()["suite_files"][0]["path"] == "two.jsonl"


def test_eval_command_takes_any_suite_path_and_gives_the_cases(tmp_path, monkeypatch):
    import datetime as dt
    import hashlib

    from cl_release.registry import Registry
    from helpers import fake_entry, fake_repo

    monkeypatch.setattr(ev, "evaluate_model", fake_evaluate_model)
    entry = fake_entry("1.0.0", None, dt.datetime(2026, 3, 1, tzinfo=dt.timezone.utc))
    entry["adapter"]["sha256"] = hashlib.sha256(b"weights").hexdigest()
    root = fake_repo(tmp_path, [entry])
    (root / "outputs/v1.0.0/adapter").mkdir(parents=True)
    (root / "outputs/v1.0.0/adapter/adapter_model.safetensors").write_bytes(b"weights")
    suite = write_jsonl(tmp_path / "suites" / "s.jsonl", [{"id": "a", "input": "q", "expected": "x"},
                                                          {"id": "b", "input": "r", "expected": "y"}])
    digest = hashlib.sha256(suite.read_bytes()).hexdigest()
    for given in (str(suite), "../suites/s.jsonl"):
        r = CliRunner().invoke(main, ["-C", str(root), "eval", "1.0.0", "--suite", given, "--json", "--cases"])
        assert r.exit_code == 0, r.output
        out = json.loads(r.stdout)
        assert [(c["id"], c["passed"], c["output"]) for c in out["cases"]] == [("a", True, "answer a"),
                                                                              ("b", False, "answer b")]
        assert out["summary"]["suite_files"] == [{"path": given, "sha256": digest}]
        assert Registry(root).get("1.0.0")["evaluations"][out["summary"]["suite_sha256"]]["suite_files"] == [
            {"path": given, "sha256": digest}]
    r = CliRunner().invoke(main, ["-C", str(root), "eval", "1.0.0", "--suite", str(suite), "--json"])
    assert "cases" not in json.loads(r.stdout)  # the summary alone, as before
    r = CliRunner().invoke(main, ["-C", str(root), "eval", "1.0.0", "--suite", str(suite), "--cases"])
    assert r.exit_code == 0 and "  PASS [medium] a: 'answer a'" in r.stdout and "  FAIL [medium] b: 'answer b'" in r.stdout
