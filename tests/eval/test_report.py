"""The release report (HTML + Markdown + PNG plots) and the registry-only diff."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
from click.testing import CliRunner

from cl_release.cli import main
from cl_release.files import atomic_write_json
from cl_release.registry import empty_registry

from helpers import REPO

PNG = b"\x89PNG\r\n\x1a\n"


def model(version, parent, status, pass_rate, hall, domains, gates=None, override=None, strategy="continued_lora"):
    m = {
        "version": version, "parent": parent, "bump": "minor" if parent else "major", "strategy": strategy,
        "status": status, "created_at": "2026-01-01T00:00:00Z", "base_model": {"name": "models/tiny-llama"},
        "adapter": {"path": f"outputs/v{version}/adapter", "sha256": "a" * 64},
        "datasets": [{"name": "q", "role": "new", "path": "datasets/q.jsonl", "sha256": version[0] * 64 if version[0].isdigit() else "c" * 64,
                      "examples": 100 * int(version.split(".")[1] or 1)}],
        "config": {"path": f"outputs/v{version}/axolotl.yml", "sha256": "b" * 64}, "seed": 42,
        "launch": {"num_processes": 1, "num_machines": 1}, "training": {"knobs": {"learning_rate": 1e-5}},
        "evaluation": {"pass_rate": pass_rate, "hallucination_rate": hall, "per_domain": domains, "n_tests": 32,
                       "suite_sha256": "5" * 64},
        "toolchain": {}, "source_commit": None,
    }
    if gates is not None:
        m["gates"] = gates
    if override is not None:
        m["override"] = override
    return m


@pytest.fixture
def repo(tmp_path):
    data = empty_registry()
    data["models"] = [
        model("1.0.0", None, "released", 0.5, 0.4, {"idlh": 0.5, "storage": 0.4}, strategy="initial"),
        model("1.1.0", "1.0.0", "released", 0.7, 0.2, {"idlh": 0.8, "storage": 0.6}, gates={"passed": True, "reasons": []}),
        model("1.2.0", "1.1.0", "rejected", 0.72, 0.3, {"idlh": 0.7, "storage": 0.8},
              gates={"passed": False, "reasons": ["1 critical regression(s) vs 1.1.0: idlh-ammonia (at most 0 allowed)"],
                     "regressions": {"critical": ["idlh-ammonia"]}}),
        model("1.3.0", "1.1.0", "released", 0.75, 0.25, {"idlh": 0.8, "storage": 0.7},
              gates={"passed": False, "reasons": ["pass rate 75.0% vs parent 76.0%"]},
              override={"reason": "expert review ok", "at": "2026-01-02T00:00:00Z"}),
    ]
    data["current"] = "1.3.0"
    atomic_write_json(tmp_path / "registry/model_registry.json", data)
    return tmp_path


def test_report_writes_html_markdown_and_plots(repo):
    r = CliRunner().invoke(main, ["-C", str(repo), "report", "--out", "site"])
    assert r.exit_code == 0, r.output
    out = repo / "site"
    for name in ("lineage.png", "pass_rate.png", "hallucination_rate.png", "per_domain.png"):
        assert (out / name).read_bytes().startswith(PNG), name
    html = (out / "index.html").read_text()
    for v in ("1.0.0", "1.1.0", "1.2.0", "1.3.0"):
        assert f"<td>{v}</td>" in html
    assert 'id="current">1.3.0<' in html
    assert "failed: 1 critical regression(s) vs 1.1.0: idlh-ammonia" in html
    assert "forced: expert review ok" in html and "critical: 1" in html
    for src in __import__("re").findall(r'<img src="([^"]+)"', html):
        assert (out / src).is_file()
    md = (out / "report.md").read_text()
    assert "| 1.2.0 | 1.1.0 | continued_lora | rejected | 72.0% | - | 30.0% | suite 555555555555 (32 tests) | failed: 1 critical" in md
    assert "![Per domain](per_domain.png)" in md


def test_an_evaluation_on_a_grown_suite_keeps_the_release_time_one_and_charts_by_suite(repo, monkeypatch):
    from cl_release.eval import runner as evaluate
    from cl_release.eval import report
    from cl_release.registry import Registry

    class Result:  # what record_in_registry reads of an EvalResult
        def summary(self):
            return {"suite_sha256": "6" * 64, "n_tests": 33, "pass_rate": 0.6, "hallucination_rate": 0.3,
                    "per_domain": {"idlh": 0.5}}

    assert evaluate.record_in_registry(repo, "1.1.0", Result()) == f"evaluations[{'6' * 16}]"
    entry = Registry(repo).get("1.1.0")
    assert entry["evaluation"]["pass_rate"] == 0.7 and entry["evaluation"]["suite_sha256"] == "5" * 64  # kept
    assert entry["evaluations"]["6" * 64]["pass_rate"] == 0.6
    rows = report.report_data(repo)["versions"]
    series = report.suite_series(rows, "pass_rate")
    assert series == {"suite 666666666666 (33 tests)": [None, 0.6, None, None],
                      "suite 555555555555 (32 tests)": [0.5, 0.7, 0.72, 0.75]}
    md = (report.build_report(repo, repo / "site")["markdown"]).read_text()
    assert "| 1.1.0 | 1.0.0 | continued_lora | released | 70.0% | - | 20.0% | suite 555555555555 (32 tests) |" in md


def test_report_is_byte_identical_when_rerun(repo):
    from cl_release.eval.report import build_report

    a = build_report(repo, repo / "a")
    b = build_report(repo, repo / "b")
    for key in a:
        assert a[key].read_bytes() == b[key].read_bytes(), key


def test_report_on_an_empty_registry_says_what_to_do(tmp_path):
    atomic_write_json(tmp_path / "registry/model_registry.json", empty_registry())
    r = CliRunner().invoke(main, ["-C", str(tmp_path), "report"])
    assert r.exit_code == 2 and "release a version first" in r.output


def test_diff_without_eval_uses_registry_metrics(repo):
    r = CliRunner().invoke(main, ["-C", str(repo), "diff", "1.1.0", "1.2.0", "--no-eval", "--json"])
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    assert d["metrics"]["changed"]["pass_rate"] == {"a": 0.7, "b": 0.72}
    assert d["data"]["by_role"]["new"] == {"a": 100, "b": 200}
    assert d["config"]["source"] == {"a": "registry", "b": "registry"}
    assert "tests" not in d and d["lineage"].startswith("1.1.0 is an ancestor of 1.2.0")
    assert json.loads((repo / "outputs/v1.2.0/diff-1.1.0-1.2.0.json").read_text())["b"] == "1.2.0"


def test_human_diff_shows_added_and_removed_config_keys(repo):
    reg = repo / "registry/model_registry.json"
    data = json.loads(reg.read_text())
    data["models"][2]["launch"]["deepspeed"] = "ds_config.json"
    data["models"][2]["training"]["knobs"] = {"lora_dropout": 0.1}
    reg.write_text(json.dumps(data))
    r = CliRunner().invoke(main, ["-C", str(repo), "diff", "1.1.0", "1.2.0", "--no-eval"])
    assert r.exit_code == 0, r.output
    assert "config  registry.launch.deepspeed: added 'ds_config.json'" in r.stdout
    assert "config  registry.knobs.lora_dropout: added 0.1" in r.stdout
    assert "config  registry.knobs.learning_rate: removed (was 1e-05)" in r.stdout


def _chromium() -> str | None:
    return next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)


@pytest.mark.skipif(_chromium() is None, reason="headless Chromium is not installed")
def test_report_renders_in_headless_chromium(repo):
    from cl_release.eval.report import build_report

    paths = build_report(repo, repo / "site")
    out = subprocess.run([sys.executable, str(REPO / "bench" / "check_report_render.py"), str(paths["html"])],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "4/4 images" in out.stdout


def test_report_starts_at_the_base_model_and_shows_the_new_data_checks(repo):
    from cl_release.eval import report

    reg = repo / "registry/model_registry.json"
    data = json.loads(reg.read_text())
    data["models"][0]["evaluation"]["baseline"] = {"model": "models/tiny-llama", "pass_rate": 0.1,
                                                   "per_domain": {"idlh": 0.0, "storage": 0.0},
                                                   "suite_sha256": "5" * 64}
    data["models"][1]["evaluation"]["new_data"] = {"source": "heldout", "n_checks": 10, "passed": 9, "pass_rate": 0.9}
    atomic_write_json(reg, data)
    plotted = {c.title: (c.versions, c.series) for c in report.charts(report.report_data(repo))}
    paths = report.build_report(repo, repo / "site")
    assert all(paths[name].exists() for name in ("pass_rate", "hallucination_rate", "per_domain", "lineage"))
    versions, series = plotted["pass rate per domain, suite 555555555555 (32 tests)"]
    assert versions[0] == "base" and series["idlh"][:3] == [0.0, 0.5, 0.8]
    series = plotted["pass rate, per suite"][1]
    assert series["new-data checks (held out / corrections)"][:3] == [None, None, 0.9]
    assert series["suite 555555555555 (32 tests)"][:3] == [0.1, 0.5, 0.7]  # the base on the same suite's line
    assert ("| 1.1.0 | 1.0.0 | continued_lora | released | 70.0% | 90.0% | 20.0% | suite 555555555555 (32 tests) "
            "| passed |") in paths["markdown"].read_text()

