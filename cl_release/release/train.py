"""Training with Axolotl: the launch argv (a pure function), running it, reading its results."""

from __future__ import annotations

import ast
import math
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from ..errors import TrainingError

TOOLCHAIN_PACKAGES = ("axolotl", "transformers", "peft", "torch", "accelerate", "datasets", "trl")


def launch_argv(config_path: str, launch: dict[str, Any], *, mixed_precision: str = "no",
                python: str | None = None) -> list[str]:
    """``accelerate launch ... -m axolotl.cli.train CONFIG`` for one or many GPUs/machines.

    DeepSpeed and FSDP are configured through the Axolotl config (``deepspeed:``,
    ``fsdp_config:``); the argv carries the process layout (processes, machines, rank).
    """
    argv = [python or sys.executable, "-m", "accelerate.commands.launch",
            "--num_processes", str(launch.get("num_processes", 1)),
            "--num_machines", str(launch.get("num_machines", 1)),
            "--mixed_precision", mixed_precision,
            "--dynamo_backend", "no"]
    if launch.get("num_machines", 1) > 1:
        argv += ["--machine_rank", str(launch.get("machine_rank", 0))]
        if launch.get("main_process_ip"):
            argv += ["--main_process_ip", str(launch["main_process_ip"])]
        if launch.get("main_process_port"):
            argv += ["--main_process_port", str(launch["main_process_port"])]
    distributed = launch.get("num_processes", 1) > 1 or launch.get("num_machines", 1) > 1
    if distributed and not (launch.get("deepspeed") or launch.get("fsdp")):
        argv += ["--multi_gpu"]
    # DeepSpeed/FSDP: Axolotl reads `deepspeed:` / `fsdp_config:` from its config and sets
    # ACCELERATE_USE_DEEPSPEED / ACCELERATE_USE_FSDP itself, as its own launcher does.
    argv += ["-m", "axolotl.cli.train", config_path]
    return argv


def merge_argv(config_path: str, lora_model_dir: str, output_dir: str, *, python: str | None = None) -> list[str]:
    """``python -m axolotl.cli.merge_lora CONFIG`` writing ``{output_dir}/merged``."""
    return [python or sys.executable, "-m", "axolotl.cli.merge_lora", config_path,
            f"--lora_model_dir={lora_model_dir}", f"--output_dir={output_dir}"]


def toolchain_versions() -> dict[str, str | None]:
    """Installed versions, read from package metadata (no heavy imports)."""
    from importlib.metadata import PackageNotFoundError, version

    from .. import __version__

    out: dict[str, str | None] = {"cl_release": __version__, "python": sys.version.split()[0]}
    for name in TOOLCHAIN_PACKAGES:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def subprocess_env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


# ---------------------------------------------------------------- running

_METRICS = re.compile(r"\{'(?:loss|train_runtime)'.*?\}")
_STEPS = re.compile(r"(\d+)/(\d+) \[")


@dataclass
class TrainResult:
    duration_seconds: float
    train_loss: float | None = None
    final_loss: float | None = None
    steps: int | None = None
    tokens_trained: int | None = None
    losses: list[float] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready; a NaN or infinite loss (a diverged run) is None with ``loss_not_finite``
        (JSON has no NaN: the registry stays readable, and the loss gate rejects the run)."""
        out = {
            "duration_seconds": round(self.duration_seconds, 2),
            "train_loss": self.train_loss,
            "final_loss": self.final_loss,
            "steps": self.steps,
            "tokens_trained": self.tokens_trained,
        }
        for key in ("train_loss", "final_loss"):
            if out[key] is not None and not math.isfinite(out[key]):
                out[key] = None
                out["loss_not_finite"] = True
        return out


def _num(value: Any) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def parse_log_line(line: str, result: TrainResult) -> tuple[int, int] | None:
    """Update ``result`` from one line of Axolotl/Trainer output; return (step, total) if seen."""
    for m in _METRICS.finditer(line):
        try:
            metrics = ast.literal_eval(m.group(0))  # literals only: safe
        except (ValueError, SyntaxError):
            continue
        if "loss" in metrics and _num(metrics["loss"]) is not None:
            result.losses.append(_num(metrics["loss"]))
            result.final_loss = result.losses[-1]
            if "tokens/trainable" in metrics:
                result.tokens_trained = int(_num(metrics["tokens/trainable"]) or 0)
        if "train_loss" in metrics:
            result.train_loss = _num(metrics["train_loss"])
    steps = _STEPS.findall(line)
    if steps:
        step, total = steps[-1]
        result.steps = int(total)
        return int(step), int(total)
    return None


def run_logged(argv: list[str], *, cwd: Path, log_path: Path,
               on_line: Callable[[str], None] | None = None) -> int:
    """Run ``argv``, streaming combined output to ``log_path`` (and ``on_line``)."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w", encoding="utf-8") as log:
        proc = subprocess.Popen(argv, cwd=cwd, env=subprocess_env(), stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, errors="replace", bufsize=1)
        try:
            assert proc.stdout is not None
            for raw in proc.stdout:
                for line in raw.replace("\r", "\n").splitlines():
                    log.write(line + "\n")
                    if on_line:
                        on_line(line)
            return proc.wait()
        except BaseException:
            proc.kill()
            proc.wait()
            raise


def _tail(path: Path, n: int = 15) -> str:
    try:
        lines = [ln for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    interesting = [ln for ln in lines if "Error" in ln or "error" in ln]
    return (interesting[-1] if interesting else (lines[-1] if lines else "")).strip()[:300]


def run_training(root: Path, config_rel: str, launch: dict[str, Any], *, mixed_precision: str,
                 log_path: Path, progress: Callable[[int, int, float | None], None] | None = None) -> TrainResult:
    """Run Axolotl training for ``config_rel`` (relative to ``root``); raise TrainingError on failure."""
    argv = launch_argv(config_rel, launch, mixed_precision=mixed_precision)
    result = TrainResult(duration_seconds=0.0)

    def on_line(line: str) -> None:
        step = parse_log_line(line, result)
        if step and progress:
            progress(step[0], step[1], result.final_loss)

    start = time.monotonic()
    code = run_logged(argv, cwd=root, log_path=log_path, on_line=on_line)
    result.duration_seconds = time.monotonic() - start
    if code != 0:
        raise TrainingError(
            f"axolotl training failed (exit {code}): {_tail(log_path)}",
            hint=f"full log: {log_path}",
        )
    return result


def run_merge(root: Path, config_rel: str, lora_model_dir: str, output_dir: str, *, log_path: Path) -> None:
    code = run_logged(merge_argv(config_rel, lora_model_dir, output_dir), cwd=root, log_path=log_path)
    if code != 0:
        raise TrainingError(f"axolotl merge-lora failed (exit {code}): {_tail(log_path)}",
                            hint=f"full log: {log_path}")
