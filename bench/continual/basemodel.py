"""Base-model preparation for the continual benchmark (not a release).

A small Llama-architecture model (``cl_release.tinymodel``: seeded random init + a local BPE
tokenizer trained on the text of every domain), then a plain full fine-tune in torch on the
general set (loss on the answers) and on ``tasks.lm_texts`` (plain-text LM loss: every entity
and every answer phrase, no task fact). Cached under ``.bench-out/base/<key>/``, keyed by the model
config, the data and the training settings, so reruns skip it.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
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


def _encode(tok, record: dict) -> tuple[list[int], list[int]]:
    """Token ids and labels: loss on the assistant's answer only (as Axolotl's chat_template)."""
    full = tok.apply_chat_template(record["messages"], tokenize=False)
    prompt = tok.apply_chat_template(record["messages"][:-1], tokenize=False, add_generation_prompt=True)
    ids = tok(full, add_special_tokens=False)["input_ids"]
    n = len(tok(prompt, add_special_tokens=False)["input_ids"])
    return ids, [-100] * n + ids[n:]


def _encode_text(tok, text: str) -> tuple[list[int], list[int]]:
    """Plain text, loss on every token."""
    ids = tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    return ids, list(ids)


def _texts_for_tokenizer(all_facts) -> list[str]:
    texts = []
    for dom, pairs in all_facts.items():
        for r in training_records(dom, pairs):
            texts.extend(m["content"] for m in r["messages"])
    # Every entity name repeated so that BPE merges it into one token: a fact is then one
    # token -> one answer, which a small model learns in a few epochs (multi-token invented
    # names take it hundreds; see RESULTS.md).
    for pairs in all_facts.values():
        texts.extend(" ".join(f"of {e}?" for _ in range(40)) for e, _v in pairs)
    return texts


def prepare_base(out_root: Path, *, data_seed: int = 0, settings: dict | None = None,
                 log=print, on_epoch=None) -> Path:
    """Build (or reuse) the base model; returns its folder."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from cl_release.tinymodel import build_tiny_model

    settings = settings or BASE_SETTINGS
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
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
    tok = AutoTokenizer.from_pretrained(tmp)
    model = AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32)
    enc = [_encode(tok, r) for r in training_records("general", all_facts["general"])]
    if settings.get("lm_texts"):
        # Plain-text LM loss on sentences that use every entity name and every answer phrase
        # but state no task fact (what a pretrained model knows: the words, not the facts).
        # Without them the output rows of every token that is not a general-set answer
        # ("IDLH", " 75", " ppm", ...) are pushed down for the whole base training and a
        # LoRA (which does not touch lm_head) cannot bring them back (RESULTS.md).
        enc += [_encode_text(tok, t) for t in lm_texts(all_facts)]
    torch.manual_seed(settings["seed"])
    rng = random.Random(settings["seed"])
    opt = torch.optim.AdamW(model.parameters(), lr=settings["lr"], weight_decay=0.0)
    bs = settings["batch_size"]
    steps = settings["epochs"] * ((len(enc) + bs - 1) // bs)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=settings["lr"], total_steps=steps, pct_start=0.05)
    model.train()
    t0 = time.perf_counter()
    step = 0
    for epoch in range(settings["epochs"]):
        order = list(range(len(enc)))
        rng.shuffle(order)
        total = 0.0
        for i in range(0, len(order), bs):
            batch = [enc[j] for j in order[i:i + bs]]
            n = max(len(b[0]) for b in batch)
            ids = torch.full((len(batch), n), tok.pad_token_id)
            labels = torch.full((len(batch), n), -100)
            mask = torch.zeros((len(batch), n), dtype=torch.long)
            for k, (b, lab) in enumerate(batch):
                ids[k, :len(b)] = torch.tensor(b)
                labels[k, :len(b)] = torch.tensor(lab)
                mask[k, :len(b)] = 1
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            opt.zero_grad()
            total += loss.item()
            step += 1
        if on_epoch is not None:
            on_epoch(epoch, model, tok)
        if epoch % 5 == 0 or epoch == settings["epochs"] - 1:
            log(f"base model: epoch {epoch + 1}/{settings['epochs']} loss {total / ((len(enc) + bs - 1) // bs):.4f} ({time.perf_counter() - t0:.0f}s)")
    model.eval()
    model.save_pretrained(tmp, safe_serialization=True)
    (tmp / "done.json").write_text(json.dumps({"key": key, "settings": settings, "data_seed": data_seed,
                                               "train_seconds": round(time.perf_counter() - t0, 1)}, indent=2))
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    log(f"base model: trained in {time.perf_counter() - t0:.0f}s -> {out}")
    return out
