"""Continual-learning benchmark: does a release learn the new task without forgetting the old?

    .venv/bin/python bench/continual/run.py            # full run (make bench-continual)
    .venv/bin/python bench/continual/run.py --quick    # one step, two strategies (the test)

Runs the release pipeline itself (``cl_release.release.run.run_release``, what ``cl-release
release`` runs) on a sequence of fact tasks (``tasks.py``), once per strategy, each in its own
release repository:

1. ``1.0.0``: ``initial`` on t1 (shared by all strategies: the repository is copied after it);
2. t2, then t3: one data file added under ``datasets/domain/``, committed, then one release
   per strategy (naive continued LoRA, continued LoRA + replay 5/20/50 %, merge-and-retrain,
   full retrain = ``annual_reset`` from the same base on all data so far).

After every release the evaluation runner (``cl_release.eval.runner``) scores the version on
each task's suite and on the general set (greedy, ``match: contains`` on the key fact).
Tokens trained and wall time come from the registry entry and the clock. Results go to
``<out>/results.json``; the tables and plots to ``bench/continual/RESULTS.md`` (between the
GENERATED markers; the text around them is kept) and ``bench/continual/*.png``.

``--overhead`` also times ``cl-release release`` against the bare Axolotl commands it runs,
and ``cl-release --help``. ``--gpu`` is the GPU throughput check (not implemented here: see
RESULTS.md).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(HERE))

from tasks import TASKS, facts, suite_rows, training_records, write_jsonl  # noqa: E402

ENV = {
    "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
    "WANDB_MODE": "disabled", "AXOLOTL_DO_NOT_TRACK": "1", "DO_NOT_TRACK": "1",
    "TOKENIZERS_PARALLELISM": "false",
    # 2 shared CPU cores: one thread per process avoids oversubscription (10x slower steps)
    "OMP_NUM_THREADS": "1",
    "GIT_AUTHOR_NAME": "cl-release bench", "GIT_AUTHOR_EMAIL": "bench@cl-release.invalid",
    "GIT_COMMITTER_NAME": "cl-release bench", "GIT_COMMITTER_EMAIL": "bench@cl-release.invalid",
}

# The strategies compared. ``knobs`` are written to ``strategies.<strategy>:`` in the
# strategy's own cl-release.yaml; "default" overrides nothing but the learning-rate scale,
# so it always measures the shipped MINOR defaults (STRATEGY_KNOBS["continued_lora"]).
STRATEGIES: dict[str, dict] = {
    "naive": {"label": "naive continued LoRA (no replay)", "bump": "minor", "strategy": "continued_lora",
              "knobs": {"replay_ratio": 0.0, "general_ratio": 0.0}},
    "replay5": {"label": "continued LoRA + 5% replay", "bump": "minor", "strategy": "continued_lora",
                "knobs": {"replay_ratio": 0.05}},
    "replay20": {"label": "continued LoRA + 20% replay", "bump": "minor", "strategy": "continued_lora",
                 "knobs": {"replay_ratio": 0.2}},
    "default": {"label": "continued LoRA, shipped MINOR defaults (50% replay)", "bump": "minor",
                "strategy": "continued_lora", "knobs": {}},
    "replay50": {"label": "continued LoRA + 50% replay", "bump": "minor", "strategy": "continued_lora",
                 "knobs": {"replay_ratio": 0.5}},
    "merge_retrain": {"label": "merge-and-retrain (release major)", "bump": "major",
                      "strategy": "merge_and_retrain", "knobs": {}},
    "full_retrain": {"label": "full retrain from the base (annual_reset, same base)", "bump": "major",
                     "strategy": "annual_reset", "base_model": "models/base", "knobs": {}},
}
QUICK_STRATEGIES = ("default", "full_retrain")
# The full run: replay 50% is the shipped default (STRATEGY_KNOBS), so "replay50" would repeat it.
FULL_STRATEGIES = ("naive", "replay5", "replay20", "default", "merge_retrain", "full_retrain")

# Sweep variants, named on the command line: "cont:lr=1e-3,ep=10,rp=0.2" is a continued-LoRA
# MINOR release with those strategy knobs (lr and epochs are the tiny model's, not scaled).
VARIANT_KEYS = {"lr": "learning_rate", "ep": "num_epochs", "rp": "replay_ratio", "r": "lora_r",
                "alpha": "lora_alpha", "drop": "lora_dropout", "gr": "general_ratio"}


def strategy_spec(name: str) -> dict:
    if name in STRATEGIES:
        return STRATEGIES[name]
    kind, _, rest = name.partition(":")
    if kind != "cont" or not rest:
        raise ValueError(f"unknown strategy {name!r}: use one of {', '.join(STRATEGIES)} or cont:lr=..,ep=..,rp=..")
    knobs = {}
    for part in rest.split(","):
        key, _, value = part.partition("=")
        if key not in VARIANT_KEYS or not value:
            raise ValueError(f"{name!r}: unknown knob {key!r} (use {', '.join(VARIANT_KEYS)})")
        knobs[VARIANT_KEYS[key]] = int(value) if key in ("ep", "r", "alpha") else float(value)
    return {"label": f"continued LoRA {rest}", "bump": "minor", "strategy": "continued_lora", "knobs": knobs}

# Settings of the benchmark's release repositories (cl-release.yaml). The tiny model needs
# larger learning rates than an 8B model: every strategy's shipped learning rate is
# multiplied by LR_SCALE, so the ratios between strategies stay as shipped (RESULTS.md).
# Calibrated (RESULTS.md, "Calibration"): a fresh LoRA learns t1 at 2e-3 x 30 epochs only
# when it also trains the embeddings and lm_head (lora_modules_to_save, an Axolotl key).
LR_SCALE = 10.0  # initial/merge/annual 2e-4 -> 2e-3, continued 1e-5 -> 1e-4, patch 5e-5 -> 5e-4
EPOCH_SCALE = 10  # likewise epochs (initial 3 -> 30, continued 1 -> 10): ratios as shipped
TRAINING = {"sequence_len": 128, "micro_batch_size": 4, "lora_r": 8, "lora_alpha": 16,
            "extra": {"lora_modules_to_save": ["embed_tokens", "lm_head"]}}
EVAL = {"batch_size": 64, "max_new_tokens": 24}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def git(root: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(root), *args], check=True, capture_output=True, text=True).stdout


def commit_all(root: Path, message: str) -> None:
    git(root, "add", "-A")
    if git(root, "status", "--porcelain").strip():
        git(root, "commit", "-qm", message)


# ---------------------------------------------------------------- repositories


SEED = 0  # the project seed (Axolotl's seed and the replay sample's); --seed changes it


def project_yaml(root: Path, strategy_knobs: dict[str, dict]) -> None:
    """Rewrite cl-release.yaml with the benchmark's training/evaluation settings."""
    import yaml

    from cl_release.release.render import STRATEGY_KNOBS

    path = root / "cl-release.yaml"
    data = yaml.safe_load(path.read_text())
    data["seed"] = SEED
    data["training"] = json.loads(json.dumps(TRAINING))
    data["mix"] = {"general_ratio": 0.0}
    strategies = {}
    for name, knobs in STRATEGY_KNOBS.items():
        strategies[name] = {"learning_rate": float(f"{knobs['learning_rate'] * LR_SCALE:.3g}"),
                            "num_epochs": knobs["num_epochs"] * EPOCH_SCALE}
    for name, knobs in strategy_knobs.items():
        strategies.setdefault(name, {}).update(knobs)
    data["strategies"] = strategies
    data["evaluation"] = {**EVAL, "suites": [f"registry/suites/{d}.jsonl" for d in ("general",) + TASKS]}
    data.pop("hub", None)
    path.write_text("# cl-release.yaml of the continual benchmark (bench/continual/run.py)\n"
                    + yaml.safe_dump(data, sort_keys=False))


def seed_repository(out: Path, base_dir: Path, all_facts) -> Path:
    """A release repository with the base model, the general set, every suite and t1."""
    from cl_release.release.scaffold import init_repository

    root = out / "repos" / "seed"
    if root.exists():
        shutil.rmtree(root)
    init_repository(root, name="continual-bench", base_model="models/base")
    shutil.copytree(base_dir, root / "models" / "base", ignore=shutil.ignore_patterns("done.json"))
    write_jsonl(root / "datasets/general/general.jsonl", training_records("general", all_facts["general"]))
    for dom, pairs in all_facts.items():
        write_jsonl(root / f"registry/suites/{dom}.jsonl", suite_rows(dom, pairs))
    project_yaml(root, {})
    commit_all(root, "Benchmark repository: general set and suites")
    return root


def add_task(root: Path, task: str, all_facts) -> None:
    write_jsonl(root / f"datasets/domain/{task}.jsonl", training_records(task, all_facts[task]))
    commit_all(root, f"Data for {task}")


# ---------------------------------------------------------------- one release + evaluation


class Runner:
    def __init__(self, out: Path):
        from cl_release.eval import runner as ev

        self.out = out
        self.ev = ev
        self.settings = ev.EvalSettings(**EVAL)

    def suite(self, root: Path):
        from cl_release.eval.suite import load_suite

        return load_suite([f"registry/suites/{d}.jsonl" for d in ("general",) + TASKS], root=root)

    def evaluate(self, root: Path, entry: dict) -> tuple[dict[str, float], float]:
        t0 = time.perf_counter()
        result = self.ev.evaluate_entry(root, entry, self.suite(root), self.settings)
        acc = {d: v["pass_rate"] for d, v in result.metrics["per_domain"].items()}
        return acc, time.perf_counter() - t0

    def evaluate_base(self, root: Path) -> dict[str, float]:
        result = self.ev.evaluate_model(root, "models/base", None, self.suite(root), self.settings)
        return {d: v["pass_rate"] for d, v in result.metrics["per_domain"].items()}

    def release(self, root: Path, spec: dict, *, step: int, task: str, name: str) -> dict:
        from cl_release.project import Project
        from cl_release.release.run import run_release

        t0 = time.perf_counter()
        result = run_release(Project.load(root), bump=spec["bump"], strategy=spec.get("strategy"),
                             base_model=spec.get("base_model"), notes=f"bench {name} step {step} ({task})",
                             progress=lambda m: log(f"  {m}"))
        wall = time.perf_counter() - t0
        e = result.entry
        acc, eval_s = self.evaluate(root, e)
        tr = e["training"]
        knobs = tr.get("knobs", {})
        row = {
            "strategy": name, "step": step, "task": task, "version": e["version"], "parent": e["parent"],
            "release_strategy": e["strategy"], "wall_seconds": round(wall, 1),
            "train_seconds": tr.get("duration_seconds"), "eval_seconds": round(eval_s, 1),
            "tokens_trained": tr.get("tokens_trained"), "tokens_in_mix": tr.get("tokens_in_mix"),
            "epochs": knobs.get("num_epochs"), "learning_rate": knobs.get("learning_rate"),
            "replay_ratio": knobs.get("replay_ratio"), "general_ratio": knobs.get("general_ratio"),
            "lora_r": knobs.get("lora_r"), "train_loss": tr.get("train_loss"),
            "examples": {d["role"]: d["examples"] for d in e["datasets"]},
            "accuracy": acc,
        }
        log(f"  {name} step {step} ({task}) -> {e['version']}: acc {acc}  tokens {row['tokens_trained']}"
            f"  release {wall:.0f}s")
        return row


def run_benchmark(out: Path, names: list[str], tasks: tuple[str, ...]) -> dict:
    from basemodel import BASE_SETTINGS, prepare_base

    all_facts = facts(0)
    base_dir = prepare_base(out, log=log)
    runner = Runner(out)
    seed = seed_repository(out, base_dir, all_facts)
    base_acc = runner.evaluate_base(seed)
    log(f"base model accuracy: {base_acc}")
    add_task(seed, tasks[0], all_facts)
    rows = [runner.release(seed, {"bump": "minor"}, step=1, task=tasks[0], name="initial")]
    for name in names:
        spec = strategy_spec(name)
        root = out / "repos" / name.replace(":", "_").replace(",", "_")
        if root.exists():
            shutil.rmtree(root)
        shutil.copytree(seed, root, symlinks=True)
        project_yaml(root, {spec["strategy"]: spec["knobs"]})
        commit_all(root, f"Benchmark strategy {name}")
        for step, task in enumerate(tasks[1:], start=2):
            add_task(root, task, all_facts)
            rows.append(runner.release(root, spec, step=step, task=task, name=name))
    from cl_release.release.render import STRATEGY_KNOBS

    return {"base_accuracy": base_acc, "rows": rows, "tasks": list(tasks), "strategies": names,
            "lr_scale": LR_SCALE, "epoch_scale": EPOCH_SCALE, "training": TRAINING, "base_settings": BASE_SETTINGS,
            "shipped_knobs": STRATEGY_KNOBS, "seed": SEED, "machine": machine()}


# ---------------------------------------------------------------- a corrected fact stays corrected

PATCH_BEGIN, PATCH_END = "<!-- PATCH-CHECK BEGIN -->", "<!-- PATCH-CHECK END -->"
PATCHED_FACTS = 6  # t1 facts a PATCH changes to another value


def changed_facts(all_facts) -> list[tuple[str, str, str]]:
    """(entity, old value, new value) of the t1 facts the patch corrects: the next value of the
    domain's list, so the new answer is one the model can produce."""
    from tasks import DOMAINS

    values = DOMAINS["t1"][1]
    return [(e, v, values[(values.index(v) + 1) % len(values)]) for e, v in all_facts["t1"][:PATCHED_FACTS]]


def run_patch_check(out: Path) -> dict:
    """1.0.0 (t1) -> 1.0.1 PATCH changing ``PATCHED_FACTS`` t1 facts (every phrasing in a
    corrections file) -> 1.1.0 MINOR (t2, default continued LoRA with replay) -> 2.0.0 MAJOR
    (merge and retrain on the complete data). After each: the share of the changed facts answered
    with the new value, and with the old one (issue 13: replay and retraining must not bring the
    old answer back; the corrections retire it, cl_release.data.mix)."""
    from basemodel import prepare_base
    from tasks import suite_rows

    all_facts = facts(0)
    base_dir = prepare_base(out, log=log)
    runner = Runner(out)
    root = out / "repos" / "patch-check"
    if root.exists():
        shutil.rmtree(root)
    seed = seed_repository(out, base_dir, all_facts)
    shutil.copytree(seed, root, symlinks=True)
    changes = changed_facts(all_facts)
    write_jsonl(root / "registry/suites/t1-new.jsonl",
                [{**r, "id": f"new-{i:03d}", "domain": "t1-new"} for i, r in
                 enumerate(suite_rows("t1", [(e, new) for e, _old, new in changes]))])
    write_jsonl(root / "registry/suites/t1-old.jsonl",
                [{**r, "id": f"old-{i:03d}", "domain": "t1-old"} for i, r in
                 enumerate(suite_rows("t1", [(e, old) for e, old, _new in changes]))])
    commit_all(root, "Suites of the changed facts")
    suite = runner.ev.load_suite([f"registry/suites/{d}.jsonl" for d in ("t1-new", "t1-old", "t1", "t2")], root=root)

    def score(entry: dict) -> dict:
        result = runner.ev.evaluate_entry(root, entry, suite, runner.settings)
        return {d: v["pass_rate"] for d, v in result.metrics["per_domain"].items()}

    from cl_release.project import Project
    from cl_release.release.run import run_release

    rows = []
    steps = [("1.0.0 initial (t1)", "minor", None, lambda: add_task(root, "t1", all_facts)),
             ("1.0.1 patch (changed facts)", "patch", None, lambda: (
                 write_jsonl(root / "datasets/corrections/changed.jsonl",
                             training_records("t1", [(e, new) for e, _old, new in changes])),
                 commit_all(root, "Corrections: changed t1 facts"))),
             ("1.1.0 minor (t2, replay)", "minor", None, lambda: add_task(root, "t2", all_facts)),
             ("2.0.0 major (merge and retrain)", "major", None, lambda: None)]
    for label, bump, strategy, prepare in steps:
        prepare()
        t0 = time.perf_counter()
        e = run_release(Project.load(root), bump=bump, strategy=strategy, notes=label,
                        progress=lambda m: log(f"  {m}")).entry
        acc = score(e)
        rows.append({"step": label, "version": e["version"], "retired": (e.get("retired") or {}).get("count", 0),
                     "new_value": acc.get("t1-new"), "old_value": acc.get("t1-old"), "t1": acc.get("t1"),
                     "t2": acc.get("t2"), "seconds": round(time.perf_counter() - t0, 1)})
        log(f"  {label}: {rows[-1]}")
    return {"changed_facts": len(changes), "rows": rows, "machine": machine()}


def patch_table(data: dict) -> str:
    lines = [f"{data['changed_facts']} t1 facts changed by the patch (all three phrasings in a corrections file); "
             "share of them answered with the new value and with the old one after each release "
             "(t1 includes the changed facts' old values, so it drops by their share after the patch):", "",
             "| release | retirements in effect | new value | old value | t1 | t2 |", "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for r in data["rows"]:
        lines.append(f"| {r['step']} | {r['retired']} | {_pct(r['new_value'])} | {_pct(r['old_value'])} | "
                     f"{_pct(r['t1'])} | {_pct(r['t2'])} |")
    return "\n".join(lines)


def machine() -> dict:
    from cl_release.release.train import toolchain_versions

    return {"platform": platform.platform(), "cpus": os.cpu_count(),
            "load_avg_1m": round(os.getloadavg()[0], 2), "toolchain": toolchain_versions()}


# ---------------------------------------------------------------- overhead


def _median(xs: list[float]) -> float:
    return round(statistics.median(xs), 2)


def _timed(argv: list[str], cwd: Path, log_path: Path) -> float:
    from cl_release.release.train import subprocess_env

    log_path.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with open(log_path, "w") as f:
        code = subprocess.run(argv, cwd=cwd, env=subprocess_env(), stdout=f, stderr=subprocess.STDOUT).returncode
    wall = time.perf_counter() - t0
    if code != 0:
        raise RuntimeError(f"{' '.join(argv)} failed (exit {code}); see {log_path}")
    return wall


# The benchmark's small tasks are below the MINOR data gate (200 examples); the release command
# still evaluates and gates the candidate, which is part of what it costs.
FORCE = ["--force", "--reason", "overhead benchmark: small tasks are below the data gate"]


def phase_times(log_path: Path) -> dict[str, float]:
    """The ``time:`` line ``cl-release release`` prints: seconds per phase of the release."""
    for line in log_path.read_text(errors="replace").splitlines():
        if line.strip().startswith("time: "):
            return {k: float(v.rstrip("s")) for k, v in (item.split() for item in line.strip()[6:].split(", "))}
    return {}


def run_overhead(out: Path, reps: int, kinds: tuple[str, ...] = ("minor", "major")) -> dict:
    """``cl-release release`` (CLI subprocess) vs the bare Axolotl commands it runs, interleaved.

    minor: ``release minor --from 1.0.0`` vs ``accelerate launch -m axolotl.cli.train`` on the
    same rendered config (only output_dir differs). major: ``release major --from 1.0.0``
    (merge_and_retrain: merge-lora of 1.0.0, then train) vs bare ``axolotl.cli.merge_lora`` +
    train. The parent's merged folder is removed before each major release so it really merges.
    """
    import yaml

    from cl_release.release.train import launch_argv, merge_argv

    seed = out / "repos" / "seed"
    root = out / "repos" / "overhead"
    if root.exists():
        shutil.rmtree(root)
    shutil.copytree(seed, root, symlinks=True)
    add_task(root, TASKS[1], facts(0))
    cli = [str(Path(sys.executable).with_name("cl-release")), "-C", str(root)]
    launch = {"num_processes": 1, "num_machines": 1}
    res: dict = {"reps": reps, "minor": {"release": [], "bare_train": [], "phases": []},
                 "major": {"release": [], "bare_merge_train": [], "phases": []}, "help": []}

    def latest() -> dict:
        return json.loads((root / "registry/model_registry.json").read_text())["models"][-1]

    def bare_config(entry: dict, tag: str) -> str:
        cfg = yaml.safe_load((root / entry["config"]["path"]).read_text())
        text = (root / entry["config"]["path"]).read_text().replace(
            json.dumps(cfg["output_dir"]), json.dumps(f"outputs/.bare/{tag}/adapter"))
        rel = f"outputs/.bare/{tag}.yml"
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
        return rel

    parent = json.loads((root / "registry/model_registry.json").read_text())["models"][0]
    for i in range(reps):
        if "minor" in kinds:
            log(f"overhead rep {i + 1}/{reps}: release minor")
            res["minor"]["release"].append(_timed(cli + ["release", "minor", "--from", "1.0.0", *FORCE], root,
                                                  out / "overhead-logs" / f"release-minor-{i}.log"))
            res["minor"]["phases"].append(phase_times(out / "overhead-logs" / f"release-minor-{i}.log"))
            cfg = bare_config(latest(), f"train-{i}")
            log(f"overhead rep {i + 1}/{reps}: bare train")
            res["minor"]["bare_train"].append(_timed(launch_argv(cfg, launch), root,
                                                     out / "overhead-logs" / f"bare-train-{i}.log"))

        if "major" not in kinds:
            continue
        merged = root / "outputs/v1.0.0/merged"
        shutil.rmtree(merged, ignore_errors=True)
        log(f"overhead rep {i + 1}/{reps}: release major (merge + train)")
        res["major"]["release"].append(_timed(cli + ["release", "major", "--from", "1.0.0", *FORCE], root,
                                              out / "overhead-logs" / f"release-major-{i}.log"))
        res["major"]["phases"].append(phase_times(out / "overhead-logs" / f"release-major-{i}.log"))
        cfg = bare_config(latest(), f"mtrain-{i}")
        log(f"overhead rep {i + 1}/{reps}: bare merge-lora + train")
        t_merge = _timed(merge_argv(parent["config"]["path"], parent["adapter"]["path"], f"outputs/.bare/merge-{i}"),
                         root, out / "overhead-logs" / f"bare-merge-{i}.log")
        t_train = _timed(launch_argv(cfg, launch), root, out / "overhead-logs" / f"bare-mtrain-{i}.log")
        res["major"]["bare_merge_train"].append(t_merge + t_train)
    for _ in range(5):
        res["help"].append(_timed(cli[:1] + ["--help"], root, out / "overhead-logs" / "help.log"))
    for kind, (a, b) in (("minor", ("release", "bare_train")), ("major", ("release", "bare_merge_train"))):
        if kind not in kinds:
            del res[kind]
            continue
        r = res[kind]
        r[a] = [round(x, 2) for x in r[a]]
        r[b] = [round(x, 2) for x in r[b]]
        r["median_release"], r["median_bare"] = _median(r[a]), _median(r[b])
        r["ratio"] = round(r["median_release"] / r["median_bare"], 3)
        # Medians per phase; "outside" = process start-up and exit (wall minus the phases).
        names = [k for ph in r["phases"] for k in ph]
        r["phase_medians"] = {k: _median([ph.get(k, 0.0) for ph in r["phases"]]) for k in dict.fromkeys(names)}
        r["phase_medians"]["outside"] = _median([w - sum(ph.values()) for w, ph in zip(r[a], r["phases"])])
        # Without the gate evaluation (which bare Axolotl does not do) and with the merge
        # (which the bare command also runs) counted as bare work: what the wrapper adds.
        r["median_release_without_evaluate"] = _median([w - ph.get("evaluate", 0.0) for w, ph in zip(r[a], r["phases"])])
        r["ratio_without_evaluate"] = round(r["median_release_without_evaluate"] / r["median_bare"], 3)
    res["help"] = [round(x, 3) for x in res["help"]]
    res["help_median"] = round(statistics.median(res["help"]), 3)
    return res


# ---------------------------------------------------------------- analysis and report


def cumulative(rows: list[dict], name: str) -> list[dict]:
    """The rows of one strategy, preceded by the shared initial release."""
    return [r for r in rows if r["strategy"] == "initial"] + [r for r in rows if r["strategy"] == name]


def summarize(data: dict) -> dict[str, dict]:
    """Per strategy, at the final step: new-task accuracy, retention (mean over earlier tasks),
    general accuracy, tokens (final step and cumulative over the continual steps), wall time."""
    tasks = data["tasks"]
    out = {}
    for name in data["strategies"]:
        rows = [r for r in data["rows"] if r["strategy"] == name]
        if not rows:
            continue
        last = rows[-1]
        k = tasks.index(last["task"])
        old = tasks[:k]
        out[name] = {
            "steps": len(rows),
            "new": last["accuracy"].get(last["task"]),
            "retention": round(statistics.mean(last["accuracy"].get(t, 0.0) for t in old), 4) if old else None,
            "per_task": {t: last["accuracy"].get(t) for t in tasks},
            "general": last["accuracy"].get("general"),
            "tokens_last": last["tokens_trained"],
            "tokens_total": sum(r["tokens_trained"] or 0 for r in rows),
            "mix_tokens_total": sum(r["tokens_in_mix"] or 0 for r in rows),
            "wall_total": round(sum(r["wall_seconds"] for r in rows), 1),
            "train_total": round(sum(r["train_seconds"] or 0 for r in rows), 1),
        }
    return out


def targets(summary: dict[str, dict], name: str = "default") -> dict | None:
    if name not in summary or "full_retrain" not in summary:
        return None
    d, f = summary[name], summary["full_retrain"]

    def frac(a, b):
        return round(a / b, 3) if a is not None and b else None

    t = {
        "new_vs_full": frac(d["new"], f["new"]),
        "retention_vs_full": frac(d["retention"], f["retention"]),
        "tokens_vs_full": frac(d["tokens_total"], f["tokens_total"]),
        "tokens_last_vs_full": frac(d["tokens_last"], f["tokens_last"]),
    }
    t["met"] = {
        "new >= 95% of full retrain": t["new_vs_full"] is not None and t["new_vs_full"] >= 0.95,
        "retention >= 95% of full retrain": t["retention_vs_full"] is not None and t["retention_vs_full"] >= 0.95,
        "tokens <= 30% of full retrain": t["tokens_vs_full"] is not None and t["tokens_vs_full"] <= 0.30,
    }
    return t


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.0f}%"


def tables(data: dict) -> str:
    summary = summarize(data)
    tasks = data["tasks"]
    lines = [f"Final step ({tasks[-1]}), per strategy. *new*: accuracy on the task of the last step; "
             "*retention*: mean accuracy on the earlier tasks; *tokens*: trainable tokens Axolotl trained "
             "(`training.tokens_trained`), summed over the strategy's own releases (steps 2+; the shared "
             "1.0.0 is not counted); *wall*: `run_release` wall time summed over those releases.", "",
             "| strategy | new | retention | " + " | ".join(tasks) + " | general | tokens (sum) | tokens (last step) | wall s (sum) |",
             "| --- | --- | --- | " + " | ".join("---" for _ in tasks) + " | --- | --- | --- | --- |"]
    for name, s in summary.items():
        lines.append(f"| {name} | {_pct(s['new'])} | {_pct(s['retention'])} | "
                     + " | ".join(_pct(s["per_task"][t]) for t in tasks)
                     + f" | {_pct(s['general'])} | {s['tokens_total']:,} | {s['tokens_last'] or 0:,} | {s['wall_total']} |")
    lines += ["", "Every release (accuracy per suite after the release):", "",
              "| strategy | step | task | version | lr | epochs | replay | examples (role: n) | "
              + " | ".join(("general",) + tuple(tasks)) + " | tokens trained | tokens in mix | train s | release s |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | " + " | ".join("---" for _ in range(len(tasks) + 1))
              + " | --- | --- | --- | --- |"]
    base = data["base_accuracy"]
    lines.append("| base model | 0 | - | - | - | - | - | - | " + " | ".join(_pct(base.get(d)) for d in ("general",) + tuple(tasks))
                 + " | - | - | - | - |")
    for r in data["rows"]:
        ex = ", ".join(f"{k}: {v}" for k, v in r["examples"].items())
        lines.append(f"| {r['strategy']} | {r['step']} | {r['task']} | {r['version']} | {r['learning_rate']:g} | "
                     f"{r['epochs']} | {r['replay_ratio']} | {ex} | "
                     + " | ".join(_pct(r["accuracy"].get(d)) for d in ("general",) + tuple(tasks))
                     + f" | {r['tokens_trained'] or 0:,} | {r['tokens_in_mix'] or 0:,} | {r['train_seconds']} | {r['wall_seconds']} |")
    t = targets(summary)
    if t:
        lines += ["", "Targets (default MINOR strategy vs full retrain, final step):", "",
                  "| target | measured | met |", "| --- | --- | --- |",
                  f"| new-task accuracy ≥ 95% of full retrain | {_pct(t['new_vs_full'])} | {'yes' if t['met']['new >= 95% of full retrain'] else '**no**'} |",
                  f"| retention ≥ 95% of full retrain | {_pct(t['retention_vs_full'])} | {'yes' if t['met']['retention >= 95% of full retrain'] else '**no**'} |",
                  f"| tokens ≤ 30% of full retrain (sum over steps) | {_pct(t['tokens_vs_full'])} (last step alone: {_pct(t['tokens_last_vs_full'])}) | {'yes' if t['met']['tokens <= 30% of full retrain'] else '**no**'} |"]
    minors = [n for n in summary if n in data["strategies"] and strategy_spec(n)["bump"] == "minor"]
    if "full_retrain" in summary and minors:
        lines += ["", "Every MINOR (continued-LoRA) strategy against the targets (vs full retrain, final step):", "",
                  "| strategy | lr | epochs | replay | new / full | retention / full | tokens / full | all met |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- |"]
        for n in minors:
            t = targets(summary, n)
            last = [r for r in data["rows"] if r["strategy"] == n][-1]
            lines.append(f"| {n} | {last['learning_rate']:g} | {last['epochs']} | {last['replay_ratio']} | "
                         f"{_pct(t['new_vs_full'])} | {_pct(t['retention_vs_full'])} | {_pct(t['tokens_vs_full'])} | "
                         f"{'yes' if all(t['met'].values()) else 'no'} |")
    ov = data.get("overhead")
    if ov:
        keys = list(dict.fromkeys(k for kind in ("minor", "major") for k in ov[kind].get("phase_medians", {})))
        load = (ov.get("machine") or {}).get("load_avg_1m")
        lines += ["", f"Release overhead (medians of {ov['reps']} interleaved runs, same config, same machine"
                  + (f"; 1-min load average {load} at the end" if load is not None else "") + "):", "",
                  "| what | cl-release release | bare Axolotl | ratio |", "| --- | --- | --- | --- |",
                  f"| minor (train) | {ov['minor']['median_release']} s {ov['minor']['release']} | "
                  f"{ov['minor']['median_bare']} s {ov['minor']['bare_train']} | {ov['minor']['ratio']}× |",
                  f"| major (merge-lora + train) | {ov['major']['median_release']} s {ov['major']['release']} | "
                  f"{ov['major']['median_bare']} s {ov['major']['bare_merge_train']} | {ov['major']['ratio']}× |",
                  "", "Where the release's time went (medians, seconds; *outside*: process start-up and exit):", "",
                  "| release | " + " | ".join(keys) + " | without evaluate | ratio without evaluate |",
                  "| --- | " + " | ".join("---" for _ in keys) + " | --- | --- |"]
        for kind in ("minor", "major"):
            pm = ov[kind].get("phase_medians", {})
            lines.append(f"| {kind} | " + " | ".join(str(pm.get(k, 0.0)) for k in keys)
                         + f" | {ov[kind].get('median_release_without_evaluate')} s | {ov[kind].get('ratio_without_evaluate')}× |")
        lines += ["", f"`cl-release --help`: median {ov['help_median']} s over 5 runs {ov['help']}."]
    m = data["machine"]
    lines += ["", f"Machine: {m['platform']}, {m['cpus']} CPUs (shared; 1-min load average {m['load_avg_1m']} at the end), "
              f"axolotl {m['toolchain'].get('axolotl')}, transformers {m['toolchain'].get('transformers')}, "
              f"peft {m['toolchain'].get('peft')}, torch {m['toolchain'].get('torch')}."]
    return "\n".join(lines)


def plots(data: dict, dest: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = data["tasks"]
    names = data["strategies"]
    doms = ("general",) + tuple(tasks)
    cols = min(3, len(names))
    rows_n = (len(names) + cols - 1) // cols
    fig, axes = plt.subplots(rows_n, cols, figsize=(3.2 * cols, 2.6 * rows_n), sharey=True, squeeze=False)
    for ax, name in zip(axes.flat, names):
        rows = cumulative(data["rows"], name)
        steps = [0] + [r["step"] for r in rows]
        for d in doms:
            ys = [data["base_accuracy"].get(d, 0)] + [r["accuracy"].get(d, 0) for r in rows]
            ax.plot(steps, ys, marker="o", ms=3, label=d)
        ax.set_title(name, fontsize=9)
        ax.set_xticks(steps)
        ax.set_ylim(-0.05, 1.05)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.supxlabel("step (1: t1 initial, 2: +t2, 3: +t3)", fontsize=8)
    fig.supylabel("accuracy", fontsize=8)
    fig.tight_layout()
    p1 = dest / "accuracy_per_task.png"
    fig.savefig(p1, dpi=70)
    plt.close(fig)

    summary = summarize(data)
    fig, ax = plt.subplots(figsize=(4.8, 3.4))
    for name, s in summary.items():
        ax.scatter(s["tokens_total"], s["retention"] or 0, s=30)
        ax.annotate(f"{name} (new {_pct(s['new'])})", (s["tokens_total"], s["retention"] or 0), fontsize=7,
                    xytext=(4, 3), textcoords="offset points")
    ax.set_xscale("log")
    ax.set_xlabel("tokens trained (sum over steps 2+)", fontsize=8)
    ax.set_ylabel("retention (mean acc. on earlier tasks)", fontsize=8)
    ax.set_ylim(-0.05, 1.05)
    ax.tick_params(labelsize=7)
    fig.tight_layout()
    p2 = dest / "retention_vs_compute.png"
    fig.savefig(p2, dpi=70)
    plt.close(fig)
    return [p1, p2]


def seeds_table(runs: list[dict]) -> str:
    """Strategies across runs (seeds): each run's MINOR strategies against the full retrain of
    the same run (or, when that run has none, the mean of the other runs' full retrains)."""
    full = [summarize(d)["full_retrain"] for d in runs if "full_retrain" in summarize(d)]
    if not full:
        return "(no full_retrain in these runs)"
    ref_all = {k: statistics.mean(f[k] for f in full) for k in ("new", "retention", "tokens_total")}
    per: dict[str, list[dict]] = {}
    for d in runs:
        summ = summarize(d)
        ref = summ.get("full_retrain") or ref_all
        for name, s_ in summ.items():
            if name == "full_retrain":
                continue
            last = [r for r in d["rows"] if r["strategy"] == name][-1]
            # Runs of different dates name the same settings differently ("default" changed):
            # group continued-LoRA runs by their settings.
            key = name if strategy_spec(name)["bump"] != "minor" else \
                f"continued: lr {last['learning_rate']:g}, {last['epochs']} ep, replay {last['replay_ratio']:g}"
            per.setdefault(key, []).append({
                "seed": d.get("seed", 0), "new": s_["new"], "retention": s_["retention"],
                "new_vs": s_["new"] / ref["new"], "ret_vs": s_["retention"] / ref["retention"],
                "tok_vs": s_["tokens_total"] / ref["tokens_total"]})
    lines = [f"Across runs: full retrain (the reference, {len(full)} runs) new "
             + ", ".join(_pct(f["new"]) for f in full) + "; retention " + ", ".join(_pct(f["retention"]) for f in full)
             + ".", "",
             "| strategy (tiny-model lr) | runs (seeds) | new: mean (min) | retention: mean (min) | tokens / full | all targets met |",
             "| --- | --- | --- | --- | --- | --- |"]
    def order(key: str):
        if not key.startswith("continued"):
            return (1, 0.0, 0.0, 0, key)
        lr, ep, rp = key.split(": ", 1)[1].split(", ")
        return (0, float(lr.split()[1]), float(rp.split()[1]), int(ep.split()[0]), key)

    for name, xs in sorted(per.items(), key=lambda kv: order(kv[0])):
        met = sum(x["new_vs"] >= 0.95 and x["ret_vs"] >= 0.95 and x["tok_vs"] <= 0.30 for x in xs)
        lines.append(f"| {name} | {len(xs)} ({', '.join(str(x['seed']) for x in xs)}) | "
                     f"{_pct(statistics.mean(x['new'] for x in xs))} ({_pct(min(x['new'] for x in xs))}) | "
                     f"{_pct(statistics.mean(x['retention'] for x in xs))} ({_pct(min(x['retention'] for x in xs))}) | "
                     f"{_pct(statistics.mean(x['tok_vs'] for x in xs))} | "
                     + (f"{met} of {len(xs)} |" if name.startswith("continued") else "- |"))
    return "\n".join(lines)


SEEDS_BEGIN, SEEDS_END = "<!-- BEGIN SEEDS (bench/continual/run.py --aggregate) -->", "<!-- END SEEDS -->"


def write_block(path: Path, begin: str, end: str, body: str) -> None:
    block = f"{begin}\n{body}\n{end}"
    text = path.read_text() if path.is_file() else "# Continual-learning benchmark\n\n"
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        text = head + block + rest.split(end, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    path.write_text(text)


BEGIN, END = "<!-- BEGIN GENERATED (bench/continual/run.py) -->", "<!-- END GENERATED -->"


def write_results(path: Path, data: dict) -> None:
    write_block(path, BEGIN, END, f"{tables(data)}\n\n![accuracy per task](accuracy_per_task.png)\n\n"
                                  "![retention vs compute](retention_vs_compute.png)")


# ---------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="one continual step, two strategies (the test)")
    ap.add_argument("--out", type=Path, default=REPO / ".bench-out" / "continual", help="work folder")
    ap.add_argument("--strategies", help=f"semicolon-separated subset of {','.join(STRATEGIES)} "
                                          "or sweep variants cont:lr=..,ep=..,rp=..")
    ap.add_argument("--results", type=Path, help="RESULTS.md to write (default: bench/continual/RESULTS.md; "
                                                  "--quick: <out>/RESULTS.md)")
    ap.add_argument("--seed", type=int, default=0, help="project seed (Axolotl and replay sampling)")
    ap.add_argument("--overhead", action="store_true", help="also time cl-release release vs bare Axolotl")
    ap.add_argument("--overhead-reps", type=int, default=3)
    ap.add_argument("--overhead-kinds", default="minor,major", help="with --overhead-only: minor, major or both")
    ap.add_argument("--overhead-only", action="store_true",
                    help="only time the overhead, on <out>'s existing seed repository; add it to <out>/results.json")
    ap.add_argument("--report-only", action="store_true", help="rewrite RESULTS.md/plots from <out>/results.json")
    ap.add_argument("--gpu", action="store_true", help="GPU throughput check (not implemented; see RESULTS.md)")
    ap.add_argument("--patch-check", action="store_true",
                    help="only the patch scenario: a corrected fact must stay corrected after a MINOR and a MAJOR")
    ap.add_argument("--aggregate", nargs="+", type=Path, metavar="OUT",
                    help="write the across-seeds table from these runs' results.json into RESULTS.md and stop")
    args = ap.parse_args(argv)
    if args.aggregate:
        runs = [json.loads((d / "results.json").read_text()) for d in args.aggregate]
        body = seeds_table(runs)
        write_block(args.results or HERE / "RESULTS.md", SEEDS_BEGIN, SEEDS_END, body)
        print(body)
        return 0
    for k, v in ENV.items():
        os.environ.setdefault(k, v)
    if args.gpu:
        print("--gpu: the GPU throughput comparison is not implemented (no GPU was available to develop "
              "and check it); see bench/continual/RESULTS.md", file=sys.stderr)
        return 2
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    if args.patch_check:
        data = run_patch_check(out)
        (out / "patch-check.json").write_text(json.dumps(data, indent=2))
        body = patch_table(data)
        write_block(args.results or HERE / "RESULTS.md", PATCH_BEGIN, PATCH_END, body)
        print(body)
        return 0
    names = list(QUICK_STRATEGIES) if args.quick else list(FULL_STRATEGIES)
    if args.strategies:
        names = [n for tok in args.strategies.replace(";", " ").split()
                 for n in ([tok] if tok.startswith("cont:") else tok.split(",")) if n]
        for name in names:
            try:
                strategy_spec(name)
            except ValueError as exc:
                ap.error(str(exc))
    global SEED
    SEED = args.seed
    tasks = TASKS[:2] if args.quick else TASKS
    results_md = args.results or (out / "RESULTS.md" if args.quick else HERE / "RESULTS.md")
    results_json = out / "results.json"
    if args.report_only:
        data = json.loads(results_json.read_text())
    elif args.overhead_only:
        data = json.loads(results_json.read_text())
        kinds = tuple(k.strip() for k in args.overhead_kinds.split(","))
        new = run_overhead(out, args.overhead_reps, kinds)
        new["machine"] = machine()
        if set(kinds) != {"minor", "major"}:  # one kind re-measured: keep the other's last figures
            path = out / f"overhead-{'-'.join(kinds)}.json"
            path.write_text(json.dumps(new, indent=2))
            log(f"{'/'.join(kinds)} overhead written to {path}; RESULTS.md keeps the last full measurement")
            print(json.dumps({k: {x: v for x, v in new[k].items() if x != 'phases'} for k in kinds}, indent=2))
            return 0
        data["overhead"] = new
        results_json.write_text(json.dumps(data, indent=2))
    else:
        t0 = time.perf_counter()
        data = run_benchmark(out, names, tasks)
        results_json.write_text(json.dumps(data, indent=2))
        if args.overhead:
            data["overhead"] = run_overhead(out, args.overhead_reps)
        data["machine"] = machine()
        data["total_seconds"] = round(time.perf_counter() - t0, 1)
        results_json.write_text(json.dumps(data, indent=2))
        log(f"done in {data['total_seconds']:.0f}s; results in {results_json}")
    plots(data, results_md.parent)
    write_results(results_md, data)
    print(tables(data))
    return 0


if __name__ == "__main__":
    sys.exit(main())
