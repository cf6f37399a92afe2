"""Shared helpers for the release-core tests: a fast release repository and a fake trainer.

``make_release_repo(tmp_path)`` scaffolds a real git release repository (``cl-release init``)
with a fake local base model (config.json, a small safetensors file and a real BPE tokenizer)
and the demo domain data, committed. ``FakeTrainer.install(monkeypatch)`` replaces Axolotl
training and merging with functions that write adapter/merged files whose bytes depend on
the rendered config, so no torch or Axolotl runs.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import json
import random
import shutil
import subprocess
import threading
import time
from pathlib import Path
from typing import Any, Callable

import yaml

TESTS = Path(__file__).resolve().parent  # tests/: helpers, fakes, golden files
REPO = TESTS.parent
DEMO = REPO / "datasets" / "demo"

PROJECT_YAML = """\
name: test-model
base_model:
  name: models/base
chat_template: tokenizer_default
seed: 42
datasets:
  - name: domain
    path: datasets/domain/*.jsonl
    role: domain
  - name: general
    path: datasets/general/*.jsonl
    role: general
  - name: corrections
    path: datasets/corrections/*.jsonl
    role: corrections
mix:
  general_ratio: 0.1
launch:
  num_processes: 1
  num_machines: 1
  mixed_precision: auto
  device: cpu
hub:
  repo_id: test-org/test-model
  private: true
gates:                     # the test data is small; the gate itself is tested in test_gates/test_cli
  min_new_examples: 0
"""

_TOKENIZER_CACHE: dict[str, str] = {}


def tokenizer_json() -> str:
    """A real BPE tokenizer (tokenizers only, no torch), trained once per test session."""
    if "json" not in _TOKENIZER_CACHE:
        from cl_release.demo.model import corpus_from_jsonl, train_tokenizer

        texts = corpus_from_jsonl(sorted(DEMO.rglob("*.jsonl")))
        _TOKENIZER_CACHE["json"] = train_tokenizer(texts, vocab_size=400).to_str()
    return _TOKENIZER_CACHE["json"]


def seed_tokenizer_json(text: str) -> None:
    """Use ``text`` as the tokenizer (a subprocess reuses the one a repository already holds)."""
    _TOKENIZER_CACHE["json"] = text


def write_fake_model(folder: Path, *, seed: int = 0) -> Path:
    """A folder that looks like a local Hugging Face model (config, weights, tokenizer)."""
    import numpy as np
    from safetensors.numpy import save_file

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 8}))
    rng = np.random.default_rng(seed)
    save_file({"w": rng.standard_normal((4, 4)).astype("float32")}, str(folder / "model.safetensors"))
    (folder / "tokenizer.json").write_text(tokenizer_json())
    return folder


def git(root: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=root, check=True, capture_output=True, text=True).stdout


def commit_all(root: Path, message: str = "test data") -> None:
    git(root, "add", "-A")
    git(root, "commit", "-q", "--no-verify", "-m", message)


def make_release_repo(tmp_path: Path, *, name: str = "repo", project_yaml: str = PROJECT_YAML,
                      general: bool = True) -> Path:
    """A committed release repository with a fake local base model and the demo q1 data."""
    from cl_release.release.scaffold import init_repository

    root = init_repository(tmp_path / name, base_model="models/base")
    write_fake_model(root / "models" / "base")  # models/ is git-ignored, like the demo model
    shutil.copy2(DEMO / "domain" / "q1.jsonl", root / "datasets" / "domain" / "q1.jsonl")
    if general:
        shutil.copy2(DEMO / "general.jsonl", root / "datasets" / "general" / "general.jsonl")
    (root / "cl-release.yaml").write_text(project_yaml)
    commit_all(root, "test repository")
    return root


def add_data(root: Path, demo_name: str, dest: str, *, commit: bool = True) -> Path:
    """Copy a demo incoming file into the repository (e.g. ``datasets/domain/q2.jsonl``)."""
    target = root / dest
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(DEMO / "incoming" / demo_name, target)
    if commit:
        commit_all(root, f"add {dest}")
    return target


def load_project(root: Path):
    from cl_release.project import Project

    return Project.load(root)


def registry_data(root: Path) -> dict[str, Any]:
    from cl_release.registry import Registry

    return Registry(root).load()


def tags(root: Path) -> set[str]:
    return set(git(root, "tag", "--list").split())


def registry_at_head(root: Path) -> dict[str, Any]:
    return json.loads(git(root, "show", "HEAD:registry/model_registry.json"))


def tree_snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` with its bytes (to prove a folder was not touched)."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


class FakeTrainer:
    """Stands in for ``cl_release.release.train.run_training`` and ``run_merge``.

    Writes ``<output_dir>/adapter_model.safetensors`` (bytes seeded by the config's hash) and
    ``adapter_config.json`` (base, r, alpha from the rendered config). ``before``: a callback
    run at the start of training (e.g. to edit a dataset or wait on an event); ``sleep``:
    seconds to sleep while "training".
    """

    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []
        self.merges: list[dict[str, Any]] = []
        self.before: Callable[[Path, dict[str, Any]], None] | None = None
        self.sleep = 0.0
        self.lock = threading.Lock()

    def install(self, monkeypatch) -> "FakeTrainer":
        import cl_release.release.train as train

        monkeypatch.setattr(train, "run_training", self.run_training)
        monkeypatch.setattr(train, "run_merge", self.run_merge)
        return self

    def run_training(self, root: Path, config_rel: str, launch: dict[str, Any], *, mixed_precision: str,
                     log_path: Path, progress=None):
        from cl_release.release.train import TrainResult

        root = Path(root)
        text = (root / config_rel).read_text(encoding="utf-8")
        config = yaml.safe_load(text)
        with self.lock:
            self.calls.append({"config_rel": config_rel, "config": config, "launch": dict(launch),
                               "mixed_precision": mixed_precision})
        if self.before is not None:
            self.before(root, config)
        if self.sleep:
            time.sleep(self.sleep)
        out = root / config["output_dir"]
        out.mkdir(parents=True, exist_ok=True)
        write_fake_adapter(out, config, seed=hashlib.sha256(text.encode()).hexdigest())
        log_path.write_text("{'loss': 1.5}\n{'train_loss': 1.25, 'train_runtime': 0.1}\n")
        if progress:
            progress(1, 1, 1.5)
        return TrainResult(duration_seconds=0.1, train_loss=1.25, final_loss=1.5, steps=1)

    def run_merge(self, root: Path, config_rel: str, lora_model_dir: str, output_dir: str, *, log_path: Path) -> None:
        root = Path(root)
        self.merges.append({"config_rel": config_rel, "lora_model_dir": lora_model_dir, "output_dir": output_dir})
        merged = root / output_dir / "merged"
        merged.mkdir(parents=True)
        (merged / "config.json").write_text(json.dumps({"model_type": "llama", "merged_from": lora_model_dir}))
        digest = hashlib.sha256((root / lora_model_dir / "adapter_model.safetensors").read_bytes()).digest()
        (merged / "model.safetensors").write_bytes(b"merged:" + digest)
        log_path.write_text("merged\n")


def write_fake_adapter(out: Path, config: dict[str, Any], *, seed: str) -> None:
    import numpy as np
    from safetensors.numpy import save_file

    rng = np.random.default_rng(int(seed[:16], 16))
    save_file({"lora_A": rng.standard_normal((2, 4)).astype("float32")}, str(out / "adapter_model.safetensors"))
    (out / "adapter_config.json").write_text(json.dumps({
        "base_model_name_or_path": config["base_model"],
        "r": config["lora_r"],
        "lora_alpha": config["lora_alpha"],
        "peft_type": "LORA",
    }))
    (out / "tokenizer.json").write_text(tokenizer_json())


def release(root: Path, bump: str = "minor", **kwargs):
    """``run_release`` on a freshly loaded project."""
    from cl_release.release.run import run_release

    return run_release(load_project(root), bump=bump, **kwargs)


def assert_registry_consistent_with_git(root: Path) -> None:
    """The registry is valid; every released entry in the committed registry is tagged."""
    data = registry_data(root)  # validates
    head = registry_at_head(root)
    assert data == {**head, "aliases": head.get("aliases", {})}, "registry has uncommitted changes"
    the_tags = tags(root)
    for m in head["models"]:
        if m["status"] == "released":
            assert f"v{m['version']}" in the_tags, f"{m['version']} is released but not tagged"


def random_adapter(model_dir: Path, out: Path, *, seed: int = 1, scale: float = 0.5) -> Path:
    """A PEFT LoRA adapter with random (non-zero) weights on a local model, saved as PEFT does:
    a version whose answers differ from the base model's, without training it."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    cfg = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], init_lora_weights=False,
                     task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, cfg)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.mul_(scale)
    peft_model.save_pretrained(out)
    return out


# ---------------------------------------------------------------- fake registries and traffic (decide, serve, eval)


def stamp(t: dt.datetime) -> str:
    return t.astimezone(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def fake_entry(version: str, parent: str | None, created_at: dt.datetime, *, status: str = "released",
               strategy: str | None = None, bump: str | None = None) -> dict:
    strategy = strategy or ("initial" if parent is None else "continued_lora")
    bump = bump or {"initial": "major", "continued_lora": "minor", "patch": "patch",
                    "merge_and_retrain": "major", "annual_reset": "major"}[strategy]
    return {
        "version": version, "parent": parent, "bump": bump, "strategy": strategy, "status": status,
        "created_at": stamp(created_at), "base_model": {"name": "org/base", "revision": None},
        "adapter": {"path": f"outputs/v{version}/adapter", "sha256": "0" * 64}, "datasets": [],
        "config": {"path": f"outputs/v{version}/axolotl.yml", "sha256": "1" * 64}, "seed": 42,
        "launch": {"num_processes": 1, "num_machines": 1}, "training": {}, "evaluation": {},
        "toolchain": {}, "source_commit": None, "notes": "",
    }


def fake_repo(tmp_path: Path, entries: list[dict], *, yaml_extra: str = "", champion: str | None = None) -> Path:
    """A scaffolded (git) release repository whose registry holds ``entries``, committed."""
    from cl_release.registry import REGISTRY_FILE
    from cl_release.release.scaffold import init_repository

    root = init_repository(tmp_path / "repo")
    data = json.loads((root / REGISTRY_FILE).read_text())
    data["models"] = entries
    data["current"] = next((e["version"] for e in reversed(entries) if e["status"] == "released"), None)
    if champion:
        data["aliases"] = {"champion": champion}
        data["events"] = [{"at": entries[0]["created_at"], "action": "set_champion", "from": None, "to": champion}]
    (root / REGISTRY_FILE).write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    if yaml_extra:
        with open(root / "cl-release.yaml", "a") as f:
            f.write(yaml_extra)
    git(root, "add", "-A")
    git(root, "commit", "-q", "--allow-empty", "-m", "fake registry")
    return root


def simulate(root: Path, *, start: dt.datetime, keys: int, positive: dict[str, float], seed: int = 0,
             latency: dict[str, float] | None = None, prefix: str = "u") -> dict[str, int]:
    """Route ``keys`` users, log one answer each (spread over an hour from ``start``) and rate it:
    5 with probability ``positive[version]``, else 2. Returns answers per version."""
    from cl_release.decide import abtest
    from cl_release.project import Project
    from cl_release.store.sqlite import FeedbackStore

    rng = random.Random(seed)
    router = abtest.Router(root)
    store = FeedbackStore(Project.load(root).feedback_path)
    rows, fbs, served = [], [], {}
    for i in range(keys):
        key = f"{prefix}{i}"
        v = router.choose(key)
        served[v] = served.get(v, 0) + 1
        at = start + dt.timedelta(seconds=3600 * i / keys)
        rid = f"{prefix}-{seed}-{i}"
        rows.append({"input": f"question {prefix} {seed} {i}", "output": f"answer {i}", "request_id": rid,
                     "model_version": v, "created_at": at,
                     "latency_ms": (latency or {}).get(v)})
        fbs.append({"request_id": rid, "rating": 5 if rng.random() < positive[v] else 2,
                    "created_at": at + dt.timedelta(seconds=1)})
    store.log_many(rows)
    store.feedback_many(fbs)
    store.close()
    return served


def log_arm(root: Path, version: str, n: int, *, start: dt.datetime, positive: float = 0.8, seed: int = 0,
            latency: float = 200.0, errors: float = 0.0, negative: float | None = None,
            hours: float = 1.0) -> list[str]:
    """Log ``n`` answers of ``version`` straight to the store (no router), spread over ``hours``
    from ``start``, each rated: 5 with probability ``positive``, else 1 (or 3 with probability
    ``1 - negative / (1 - positive)`` when ``negative`` is given); latency ``latency`` ms plus up
    to 20% jitter; a share ``errors`` tagged as errors. Returns the request ids."""
    from cl_release.project import Project
    from cl_release.store.sqlite import FeedbackStore

    rng = random.Random(f"{version}-{seed}")
    rows, fbs = [], []
    for i in range(n):
        at = start + dt.timedelta(seconds=3600 * hours * i / n)
        rid = f"{version}-{seed}-{i}"
        rows.append({"input": f"q {version} {seed} {i}", "output": "a", "request_id": rid, "model_version": version,
                     "created_at": at, "latency_ms": latency * (1 + 0.2 * rng.random())})
        if rng.random() < positive:
            rating = 5
        else:
            rating = 1 if negative is None or rng.random() < negative / (1 - positive) else 3
        fb = {"request_id": rid, "rating": rating, "created_at": at + dt.timedelta(seconds=1)}
        if rng.random() < errors:
            fb["error_tag"] = "wrong_fact"
        fbs.append(fb)
    store = FeedbackStore(Project.load(root).feedback_path)
    store.log_many(rows)
    store.feedback_many(fbs)
    store.close()
    return [r["request_id"] for r in rows]


def log_chat_file(store, path: Path, n: int, *, model_version: str, start: dt.datetime, rating: int = 5,
                  prefix: str = "prod") -> list[str]:
    """Log the first ``n`` chat lines of ``path`` as production answers of ``model_version`` (one a
    second from ``start``, ids ``<prefix>-<i>``), each rated ``rating`` a second later."""
    ids = []
    for i, line in enumerate(path.read_text().splitlines()[:n]):
        msgs = json.loads(line)["messages"]
        rid = store.log([m for m in msgs if m["role"] != "assistant"], msgs[-1]["content"],
                        request_id=f"{prefix}-{i}", model_version=model_version, created_at=start + dt.timedelta(seconds=i))
        store.feedback(rid, rating=rating, created_at=start + dt.timedelta(seconds=i + 1))
        ids.append(rid)
    return ids


def copy_repo(template: Path, tmp_path: Path) -> Path:
    """A copy of a release repository built once per session (``tmp_path / "repo"``)."""
    root = tmp_path / "repo"
    shutil.copytree(template, root, symlinks=True)
    return root


@contextlib.contextmanager
def released_template(tmp_path_factory, name: str):
    """For a module-scoped template repository: offline, with the fake trainer, 1.0.0 released
    (notes "first"); yields its root while both are still in place, for more setup."""
    import pytest

    from conftest import OFFLINE_ENV

    with pytest.MonkeyPatch.context() as mp:
        for key, value in OFFLINE_ENV.items():
            mp.setenv(key, value)
        FakeTrainer().install(mp)
        root = make_release_repo(tmp_path_factory.mktemp(name))
        release(root, "minor", notes="first")
        yield root

