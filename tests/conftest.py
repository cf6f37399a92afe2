"""Shared fixtures: offline environment for every test, one tiny model per session."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "WANDB_MODE": "disabled",
    "AXOLOTL_DO_NOT_TRACK": "1",
    "DO_NOT_TRACK": "1",
    "TOKENIZERS_PARALLELISM": "false",
    # Commits in test repositories never depend on the machine's git identity.
    "GIT_AUTHOR_NAME": "cl-release tests",
    "GIT_AUTHOR_EMAIL": "tests@cl-release.invalid",
    "GIT_COMMITTER_NAME": "cl-release tests",
    "GIT_COMMITTER_EMAIL": "tests@cl-release.invalid",
}


@pytest.fixture(autouse=True)
def _offline_env(monkeypatch, tmp_path_factory):
    for key, value in OFFLINE_ENV.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("CL_RELEASE_DEBUG", raising=False)
    # Never read or write the user's real Hugging Face login or caches.
    hf_home = tmp_path_factory.getbasetemp() / "hf-home"
    monkeypatch.setenv("HF_HOME", str(hf_home))


@pytest.fixture(scope="session", autouse=True)
def _model_cache(tmp_path_factory):
    """The demo base model (``cl-release init --demo``) is prepared once per test session, in the
    session's temporary folder, never in the user's cache."""
    saved = os.environ.get("CL_RELEASE_CACHE")
    os.environ["CL_RELEASE_CACHE"] = str(tmp_path_factory.getbasetemp() / "cl-release-cache")
    yield
    if saved is None:
        os.environ.pop("CL_RELEASE_CACHE", None)
    else:
        os.environ["CL_RELEASE_CACHE"] = saved


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny Llama model + tokenizer trained on the demo corpus (built once per session)."""
    pytest.importorskip("torch")
    from cl_release.demo.model import build_tiny_model, corpus_from_jsonl

    out = tmp_path_factory.mktemp("tiny-model") / "tiny-llama"
    texts = corpus_from_jsonl(sorted((REPO / "datasets" / "demo").rglob("*.jsonl")))
    build_tiny_model(out, texts, seed=0)
    return out


@pytest.fixture
def tiny_model(tiny_model_dir, tmp_path) -> Path:
    """A private copy of the tiny model inside this test's tmp_path."""
    dst = tmp_path / "models" / "tiny-llama"
    shutil.copytree(tiny_model_dir, dst)
    return dst


# ---------------------------------------------------------------- a release repository with a fake trainer


@pytest.fixture
def trainer(monkeypatch):
    """A fake trainer in place of Axolotl: writes adapter files, records the configs it got."""
    from helpers import FakeTrainer

    return FakeTrainer().install(monkeypatch)


@pytest.fixture
def root(tmp_path, trainer) -> Path:
    """A committed release repository (project file, Q1 data, eval suite) in ``tmp_path``."""
    from helpers import make_release_repo

    return make_release_repo(tmp_path)


@pytest.fixture
def released(root) -> Path:
    """1.0.0 released (notes "first"); new domain data (q2) committed."""
    from helpers import add_data, release

    release(root, "minor", notes="first")
    add_data(root, "q2-storage.jsonl", "datasets/domain/q2.jsonl")
    return root
