"""``cl-release init``: scaffold a release repository (built in a temp folder, then renamed)."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

from ..errors import UserError
from ..files import atomic_write_json
from ..registry import REGISTRY_FILE, SCHEMA_FILE, empty_registry
from ..resources import default_registry_schema, default_templates_dir, defaults_dir

PROJECT_TEMPLATE = """\
# cl-release project file. Reference: the "The project file" section of cl-release's README.md.
name: {name}
base_model:
  name: {base_model}          # a Hub id, or a folder inside this repository
chat_template: tokenizer_default
seed: 42
datasets:
  - name: domain              # your domain examples: every file in the folder
    path: datasets/domain/*.jsonl
    role: domain
    format: messages
  - name: general             # general-domain data mixed in against forgetting
    path: datasets/general/*.jsonl
    role: general
  - name: corrections         # fixed answers: the data of PATCH releases
    path: datasets/corrections/*.jsonl
    role: corrections
mix:
  general_ratio: {general_ratio}
{mix}{training}launch:
  num_processes: 1            # GPUs per machine
  num_machines: 1
  mixed_precision: auto       # bf16 on CUDA, none on CPU
  deepspeed: null             # e.g. deepspeed_configs/zero2.json
hub:
  repo_id: {hub_repo}
  private: true
feedback:
  path: .cl-release/feedback.db
"""

DEMO_MIX = """\
  holdout_ratio: 0.2          # a fifth of each drop's new examples is kept out of training: the learning gate's checks
"""

# The demo model has ~1 M parameters (8B is the real thing): it learns facts only when its LoRA
# also trains the embeddings and the output layer, at 10x the learning rates of the packaged
# strategies and with more epochs (bench/continual/RESULTS.md, "Calibration"; README, "The demo").
DEMO_TRAINING = """\
training:                     # the tiny demo model: short sequences, small batches
  sequence_len: 128
  micro_batch_size: 4
  lora_r: 8
  lora_alpha: 16
  extra:                      # the LoRA also trains the embeddings and the output layer (Axolotl key)
    lora_modules_to_save: [embed_tokens, lm_head]
strategies:                   # a ~1 M-parameter model: 10x the packaged learning rates, more epochs
  initial: {learning_rate: 0.002, num_epochs: 30}
  continued_lora: {learning_rate: 0.002, num_epochs: 10, replay_ratio: 0.6}   # replays all earlier drops here
  patch: {learning_rate: 0.0005, num_epochs: 10, replay_ratio: 0.7}   # replays nearly all earlier data
  merge_and_retrain: {learning_rate: 0.002, num_epochs: 20}
  annual_reset: {learning_rate: 0.002, num_epochs: 20}
gates:                        # the demo's quarterly drops are small: 200 new examples is the real default
  min_new_examples: {minor: 10}
evaluation:
  suites: [registry/regression_tests.jsonl]
  max_new_tokens: 24
  show: [safety-chlorine]     # the release prints this test's answer before and after
"""

GITIGNORE = """\
outputs/
.cl-release/
models/
*.db
*.db-wal
*.db-shm
__pycache__/
"""

MAKEFILE = """\
# Release targets: `make release-minor` each quarter, `make release-patch` for a safety fix.
CL_RELEASE ?= cl-release
NOTES ?=
FROM ?=
IDS ?=
ARGS = $(if $(NOTES),--notes "$(NOTES)") $(if $(FROM),--from $(FROM))

.PHONY: plan release-major release-minor release-patch list verify
plan:
\t$(CL_RELEASE) plan minor $(if $(FROM),--from $(FROM))
release-major:
\t$(CL_RELEASE) release major $(ARGS)
release-minor:
\t$(CL_RELEASE) release minor $(ARGS)
release-patch:  # the safety fix: the open critical corrections (IDS="req-1 req-2" for given incidents)
\t$(CL_RELEASE) patch $(IDS) $(ARGS)
list:
\t$(CL_RELEASE) list
verify:
\t$(CL_RELEASE) verify
"""


def init_repository(target: Path, *, demo: bool = False, name: str | None = None,
                    base_model: str = "meta-llama/Llama-3.1-8B-Instruct",
                    progress: Callable[[str], None] = lambda m: None) -> Path:
    """Create a release repository at ``target``; nothing is left behind on failure."""
    from ..gitops import ReleaseRepo

    target = Path(target)
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise UserError(f"{target} already exists and is not empty", hint="pick a new folder")
    name = name or (target.resolve().name if target.name else "model")
    name = "".join(ch if ch.isalnum() or ch in "._-" else "-" for ch in name).strip("-._") or "model"
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.init-", dir=target.parent))
    try:
        shutil.copytree(default_templates_dir(), tmp / "templates")
        (tmp / "registry").mkdir()
        shutil.copy2(default_registry_schema(), tmp / SCHEMA_FILE)
        atomic_write_json(tmp / REGISTRY_FILE, empty_registry())
        for sub in ("domain", "general", "corrections"):
            (tmp / "datasets" / sub).mkdir(parents=True)
            (tmp / "datasets" / sub / ".gitkeep").write_text("")
        (tmp / "outputs").mkdir()
        (tmp / ".gitignore").write_text(GITIGNORE)
        (tmp / "Makefile").write_text(MAKEFILE)
        if demo:
            base_model = "models/tiny-llama"
            _demo_content(tmp, progress)
        (tmp / "cl-release.yaml").write_text(PROJECT_TEMPLATE.format(
            name=name, base_model=base_model, general_ratio=0.2 if demo else 0.0, mix=DEMO_MIX if demo else "",
            training=DEMO_TRAINING if demo else "", hub_repo=f"your-org/{name}"))
        repo = ReleaseRepo.init(tmp)
        repo.commit_all("Scaffold release repository (cl-release init)")
        if target.exists():
            target.rmdir()
        os.rename(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def _demo_content(tmp: Path, progress: Callable[[str], None]) -> None:
    from ..demo.model import prepare_demo_base

    demo = defaults_dir() / "datasets" / "demo"
    shutil.copy2(demo / "domain" / "q1.jsonl", tmp / "datasets" / "domain" / "q1.jsonl")
    shutil.copy2(demo / "general.jsonl", tmp / "datasets" / "general" / "general.jsonl")
    shutil.copytree(demo / "incoming", tmp / "datasets" / "incoming")
    eval_suite = defaults_dir() / "registry" / "regression_tests.jsonl"
    if eval_suite.is_file():
        shutil.copy2(eval_suite, tmp / "registry" / "regression_tests.jsonl")
    prepare_demo_base(tmp / "models" / "tiny-llama", progress=progress)
