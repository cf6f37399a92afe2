"""Base-model preparation for the continual benchmark (not a release).

A small Llama-architecture model (``cl_release.demo.model``: seeded random init + a local BPE
tokenizer trained on the text of every domain), then a plain full fine-tune in torch on the
general set (loss on the answers) and on ``tasks.lm_texts`` (plain-text LM loss: every entity
and every answer phrase, no task fact). Cached under ``.bench-out/base/<key>/``, keyed by the model
config, the data and the training settings, so reruns skip it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path

from tasks import facts, lm_texts, training_records

BASE_SETTINGS = {
    # hidden 128 / 4 layers: the 64-wide, 2-layer demo model cannot hold the general set
    # and the task facts at once (see RESULTS.md, "The base model").
    "model": {"hidden_size": 128, "intermediate_size": 352, "num_hidden_layers": 4,
              "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256},
    "vocab_size": 1024,
    # lr 5e-3 (the first setting) left the model on a plateau at ~30% for 120 epochs; at
    # 1e-3 it knows the general set after 10 epochs (RESULTS.md, "Calibration").
    "epochs": 30,
    "lr": 1e-3,
    "lm_texts": True,
    "batch_size": 8,
    "seed": 0,
}


def base_key(settings: dict, data_seed: int) -> str:
    blob = json.dumps({"settings": settings, "data_seed": data_seed, "format": 1}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def _texts_for_tokenizer(all_facts) -> list[str]:
    """Every training text, and every entity name repeated so that BPE merges it into one token
    (``cl_release.demo.model.tokenizer_texts``; see RESULTS.md)."""
    from cl_release.demo.model import tokenizer_texts

    records = [r for dom, pairs in all_facts.items() for r in training_records(dom, pairs)]
    return tokenizer_texts(records, [], [e for pairs in all_facts.values() for e, _v in pairs])


def prepare_base(out_root: Path, *, data_seed: int = 0, settings: dict | None = None, log=print) -> Path:
    """Build (or reuse) the base model; returns its folder. The training itself is
    ``cl_release.demo.model.pretrain`` (the demo base model's preparation, same loop)."""
    from cl_release.demo.model import build_tiny_model, pretrain

    settings = settings or BASE_SETTINGS
    key = base_key(settings, data_seed)
    out = Path(out_root) / "base" / key
    if (out / "done.json").is_file():
        log(f"base model: cached {out}")
        return out
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    all_facts = facts(data_seed)
    build_tiny_model(tmp, _texts_for_tokenizer(all_facts), seed=settings["seed"],
                     vocab_size=settings["vocab_size"], **settings["model"])
    # Plain-text LM loss on sentences that use every entity name and every answer phrase but
    # state no task fact (what a pretrained model knows: the words, not the facts). Without
    # them the output rows of every token that is not a general-set answer ("IDLH", " 75",
    # " ppm", ...) are pushed down for the whole base training and a LoRA (which does not
    # touch lm_head) cannot bring them back (RESULTS.md).
    texts = lm_texts(all_facts) if settings.get("lm_texts") else []
    t0 = time.perf_counter()
    pretrain(tmp, training_records("general", all_facts["general"]), texts, epochs=settings["epochs"],
             lr=settings["lr"], batch_size=settings["batch_size"], seed=settings["seed"],
             threads=int(os.environ.get("OMP_NUM_THREADS", "1")), log=lambda m: log(f"base model: {m}"))
    (tmp / "done.json").write_text(json.dumps({"key": key, "settings": settings, "data_seed": data_seed,
                                               "train_seconds": round(time.perf_counter() - t0, 1)}, indent=2))
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    log(f"base model: trained in {time.perf_counter() - t0:.0f}s -> {out}")
    return out
