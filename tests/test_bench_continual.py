"""The continual-learning benchmark's quick configuration (one step, two strategies) still runs.

The full benchmark is `make bench-continual`, not a test. This keeps its harness working:
base-model preparation, real releases through the pipeline, evaluation, tables and plots.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent


def test_quick_benchmark(tmp_path: Path):
    out = tmp_path / "bench"
    proc = subprocess.run([sys.executable, str(REPO / "bench/continual/run.py"), "--quick", "--out", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads((out / "results.json").read_text())
    assert data["strategies"] == ["default", "full_retrain"]
    rows = data["rows"]
    assert [(r["strategy"], r["step"]) for r in rows] == [("initial", 1), ("default", 2), ("full_retrain", 2)]
    by = {r["strategy"]: r for r in rows}
    assert by["initial"]["release_strategy"] == "initial"
    assert by["default"]["release_strategy"] == "continued_lora" and by["default"]["parent"] == "1.0.0"
    assert by["full_retrain"]["release_strategy"] == "annual_reset"
    # full retrain trains on t1 + t2 for the fresh-LoRA epochs; the continued LoRA on t2 + replay
    # (at 50% replay as large as t1 + t2 at step 2) for a third of them: fewer tokens trained
    assert by["default"]["tokens_in_mix"] <= by["full_retrain"]["tokens_in_mix"]
    assert by["default"]["tokens_trained"] < by["full_retrain"]["tokens_trained"]
    for r in rows:
        assert set(r["accuracy"]) == {"general", "t1", "t2", "t3"}
        assert all(0.0 <= v <= 1.0 for v in r["accuracy"].values())
    text = (out / "RESULTS.md").read_text()
    assert "| default |" in text and "| full_retrain |" in text
    for png in ("accuracy_per_task.png", "retention_vs_compute.png"):
        assert (out / png).stat().st_size > 1000
