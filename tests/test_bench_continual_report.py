"""The continual benchmark's sweep names and its across-seeds table (fast; no training)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench/continual"))

import run  # noqa: E402


def test_sweep_variant_names_become_continued_lora_knobs():
    spec = run.strategy_spec("cont:lr=1e-3,ep=15,rp=0.3,r=8")
    assert (spec["bump"], spec["strategy"]) == ("minor", "continued_lora")
    assert spec["knobs"] == {"learning_rate": 1e-3, "num_epochs": 15, "replay_ratio": 0.3, "lora_r": 8}
    assert run.strategy_spec("default") is run.STRATEGIES["default"]
    for bad in ("cont:", "cont:zz=1", "cont:lr=", "bogus"):
        with pytest.raises(ValueError):
            run.strategy_spec(bad)
    with pytest.raises(ValueError):
        run.strategy_spec("cont:lr=x")


def _row(strategy, step, task, acc, tokens, lr=0.002, ep=10, rp=0.5):
    return {"strategy": strategy, "step": step, "task": task, "accuracy": acc, "tokens_trained": tokens,
            "tokens_in_mix": tokens, "wall_seconds": 1.0, "train_seconds": 1.0, "learning_rate": lr,
            "epochs": ep, "replay_ratio": rp}


def _run(seed, default_t1, with_full=True):
    rows = [_row("initial", 1, "t1", {"t1": 1.0, "t2": 0.0, "t3": 0.0}, 100),
            _row("default", 2, "t2", {"t1": 1.0, "t2": 1.0, "t3": 0.0}, 50),
            _row("default", 3, "t3", {"t1": default_t1, "t2": 1.0, "t3": 1.0}, 50)]
    names = ["default"]
    if with_full:
        rows += [_row("full_retrain", 2, "t2", {"t1": 1.0, "t2": 1.0, "t3": 0.0}, 200, ep=30, rp=0.0),
                 _row("full_retrain", 3, "t3", {"t1": 1.0, "t2": 1.0, "t3": 1.0}, 300, ep=30, rp=0.0)]
        names.append("full_retrain")
    return {"tasks": ["t1", "t2", "t3"], "strategies": names, "rows": rows, "seed": seed}


def test_seeds_table_groups_runs_by_settings_and_counts_targets_per_run():
    # seed 0: retention 100% (met); seed 1: t1 at 0.8 -> retention 90% (missed); seed 2 has no
    # full retrain of its own and is compared with the others' mean.
    table = run.seeds_table([_run(0, 1.0), _run(1, 0.8), _run(2, 1.0, with_full=False)])
    line = [ln for ln in table.splitlines() if ln.startswith("| continued: lr 0.002, 10 ep, replay 0.5")]
    assert line == ["| continued: lr 0.002, 10 ep, replay 0.5 | 3 (0, 1, 2) | 100% (100%) | 97% (90%) | 20% | 2 of 3 |"]
    assert "full retrain (the reference, 2 runs)" in table


def test_phase_times_reads_the_release_time_line(tmp_path):
    log = tmp_path / "release.log"
    log.write_text("training ...\nReleased 1.1.0\n  time: plan 0.4s, train 38.2s, evaluate 1.0s, git 0.1s\n")
    assert run.phase_times(log) == {"plan": 0.4, "train": 38.2, "evaluate": 1.0, "git": 0.1}
    log.write_text("no time line\n")
    assert run.phase_times(log) == {}
