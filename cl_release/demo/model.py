"""A tiny Llama-architecture model and tokenizer, built locally so everything runs offline.

Random init with a fixed seed, a byte-level BPE tokenizer trained with the ``tokenizers``
BPE trainer on the demo corpus, and a ChatML chat template. Real Axolotl trains a LoRA on it
on two CPU cores in well under a minute.

``prepare_demo_base`` builds the base model of ``cl-release init --demo``: a wider model,
prepared before any release by a short full fine-tune on texts without domain facts (what a
pretrained model knows: the words, not the facts), cached per settings.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Iterable

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>", "<|im_start|>", "<|im_end|>"]

TINY_CONFIG = {
    "hidden_size": 64,
    "intermediate_size": 176,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 1024,
}


def train_tokenizer(texts: Iterable[str], vocab_size: int = 768):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(texts), trainer=trainer)
    return tok


def corpus_from_jsonl(paths: Iterable[Path]) -> list[str]:
    texts = []
    for p in paths:
        for line in Path(p).read_text(encoding="utf-8").splitlines():
            if not line.strip():
                continue
            rec = json.loads(line)
            if "messages" in rec:
                texts.extend(m["content"] for m in rec["messages"])
            elif "text" in rec:
                texts.append(rec["text"])
            else:
                texts.extend(str(v) for v in rec.values() if isinstance(v, str))
    return texts


def build_tiny_model(out_dir: Path, texts: list[str], *, seed: int = 0, vocab_size: int = 768, **overrides) -> Path:
    """Write a tiny LlamaForCausalLM (safetensors) and its tokenizer to ``out_dir``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok = train_tokenizer(texts, vocab_size=vocab_size)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="<|im_end|>",
        unk_token="<unk>",
        pad_token="<pad>",
        additional_special_tokens=["<|im_start|>", "</s>"],
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.model_max_length = TINY_CONFIG["max_position_embeddings"]
    fast.save_pretrained(out_dir)

    cfg = LlamaConfig(
        vocab_size=len(fast),
        bos_token_id=fast.bos_token_id,
        eos_token_id=fast.eos_token_id,
        pad_token_id=fast.pad_token_id,
        tie_word_embeddings=False,
        torch_dtype="float32",
        **{**TINY_CONFIG, **overrides},
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    model.generation_config.pad_token_id = fast.pad_token_id
    model.generation_config.eos_token_id = fast.eos_token_id
    model.save_pretrained(out_dir, safe_serialization=True)
    return out_dir


# ---------------------------------------------------------------- the demo's base model

# The demo base (see bench/continual/RESULTS.md, "Calibration"): wider and deeper than
# TINY_CONFIG (the 64-wide, 2-layer model cannot hold the general set and the demo facts at
# once), a vocabulary in which every chemical and country name is one token, and a short
# full fine-tune before any release on texts that hold no domain fact. lr 1e-3 (5e-3 leaves the
# model on a plateau), OneCycle, batch 8. ~0.9 M parameters; 60 epochs take 10-30 s on 2 cores.
DEMO_BASE: dict[str, Any] = {
    "model": {"hidden_size": 128, "intermediate_size": 352, "num_hidden_layers": 4,
              "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256},
    "vocab_size": 1024,
    "epochs": 60,
    "lr": 1e-3,
    "batch_size": 8,
    "seed": 0,
}
_BASE_FORMAT = 1  # bump when the preparation changes in a way the key does not see
DONE_FILE = "prepared.json"


def cache_dir() -> Path:
    """Where prepared base models are cached: ``$CL_RELEASE_CACHE``, else ``$XDG_CACHE_HOME/cl-release``,
    else ``~/.cache/cl-release``."""
    env = os.environ.get("CL_RELEASE_CACHE")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "cl-release"


def tokenizer_texts(records: list[dict], texts: list[str], names: Iterable[str]) -> list[str]:
    """Texts the BPE tokenizer is trained on: every record's and text's words, and each name
    repeated so that BPE merges it into one token (a fact is then one token -> one answer,
    which a small model learns in a few epochs; multi-token names take it hundreds)."""
    out = list(texts)
    for r in records:
        out.extend(m["content"] for m in r["messages"])
    out.extend(" ".join(f"of {n}?" for _ in range(40)) for n in names)
    return out


def pretrain(model_dir: Path, records: list[dict], texts: list[str], *, epochs: int, lr: float, batch_size: int,
             seed: int, threads: int = 1, log: Callable[[str], None] = lambda m: None) -> float:
    """Full fine-tune of the model in ``model_dir`` (saved in place): loss on the assistant turns of
    the chat ``records`` (as Axolotl's chat_template) and on every token of the plain ``texts``.
    AdamW, OneCycle (5% warm-up), gradient clipping at 1.0, seeded order, ``threads`` torch threads
    (one: a model this small trains fastest on one core, and far faster than on two busy ones).
    Returns the last epoch's mean loss."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)

    def encode_chat(record: dict) -> tuple[list[int], list[int]]:
        full = tok.apply_chat_template(record["messages"], tokenize=False)
        prompt = tok.apply_chat_template(record["messages"][:-1], tokenize=False, add_generation_prompt=True)
        ids = tok(full, add_special_tokens=False)["input_ids"]
        n = len(tok(prompt, add_special_tokens=False)["input_ids"])
        return ids, [-100] * n + ids[n:]

    def encode_text(text: str) -> tuple[list[int], list[int]]:
        ids = tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        return ids, list(ids)

    enc = [encode_chat(r) for r in records] + [encode_text(t) for t in texts]
    saved_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        mean = _train_loop(model, tok, enc, epochs=epochs, lr=lr, batch_size=batch_size, seed=seed, log=log)
    finally:
        torch.set_num_threads(saved_threads)
    model.save_pretrained(model_dir, safe_serialization=True)
    return mean


def _train_loop(model, tok, enc, *, epochs: int, lr: float, batch_size: int, seed: int, log) -> float:
    import torch

    torch.manual_seed(seed)
    rng = random.Random(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    per_epoch = (len(enc) + batch_size - 1) // batch_size
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=epochs * per_epoch, pct_start=0.05)
    model.train()
    t0 = time.perf_counter()
    mean = float("nan")
    for epoch in range(epochs):
        order = list(range(len(enc)))
        rng.shuffle(order)
        total = 0.0
        for i in range(0, len(order), batch_size):
            batch = [enc[j] for j in order[i:i + batch_size]]
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
        mean = total / per_epoch
        if epoch % 10 == 0 or epoch == epochs - 1:
            log(f"epoch {epoch + 1}/{epochs} loss {mean:.4f} ({time.perf_counter() - t0:.0f}s)")
    model.eval()
    return mean


def demo_base_key(settings: dict[str, Any] | None = None) -> str:
    """Cache key of the demo base: settings, the texts it is built from, the format, and torch's
    version (CPU results differ between versions)."""
    from importlib.metadata import PackageNotFoundError, version

    from .data import CHEMICALS, CAPITALS, base_texts, demo_sets

    try:
        torch_version = version("torch")
    except PackageNotFoundError:
        torch_version = None
    records, texts = base_texts()
    blob = json.dumps({"settings": settings or DEMO_BASE, "records": records, "texts": texts,
                       "corpus": demo_sets(), "names": CHEMICALS + [c for c, _ in CAPITALS],
                       "format": _BASE_FORMAT, "torch": torch_version}, sort_keys=True)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:16]


def _prepared_ok(folder: Path) -> bool:
    try:
        done = json.loads((folder / DONE_FILE).read_text())
        weights = folder / "model.safetensors"
        return done.get("weights_sha256") == hashlib.sha256(weights.read_bytes()).hexdigest()
    except (OSError, ValueError, AttributeError):
        return False


def prepare_demo_base(out_dir: Path, *, cache: Path | None = None, settings: dict[str, Any] | None = None,
                      progress: Callable[[str], None] = lambda m: None) -> Path:
    """Write the demo's prepared base model to ``out_dir`` (a new folder).

    Built once per cache key under ``cache/demo-base/<key>/`` (seeded: tokenizer, random init,
    then ``pretrain`` on ``demo.base_texts()``), then copied. A cached model whose weights do not
    match its recorded hash is rebuilt. The build's log, with the training stack's import-time
    messages, is ``train.log`` in the model folder.
    """
    from ..release.chatter import Chatter
    from .data import CAPITALS, CHEMICALS, base_texts, demo_sets

    settings = settings or DEMO_BASE
    key = demo_base_key(settings)
    folder = Path(cache or cache_dir()) / "demo-base" / key
    if _prepared_ok(folder):
        progress(f"demo base model: cached ({folder})")
    else:
        progress("preparing the demo base model (seeded, ~1 M parameters, a short full fine-tune on "
                 "general texts; cached for the next time) ...")
        tmp = folder.with_name(f"{key}.tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        log_lines: list[str] = []

        def log(message: str) -> None:
            log_lines.append(message)

        t0 = time.perf_counter()
        try:
            with Chatter() as chatter:
                from transformers.utils import logging as hf_logging

                hf_logging.disable_progress_bar()
                records, texts = base_texts()
                corpus = [r for rows in demo_sets().values() for r in rows]
                build_tiny_model(tmp, tokenizer_texts(records + corpus, texts, CHEMICALS + [c for c, _ in CAPITALS]),
                                 seed=settings["seed"], vocab_size=settings["vocab_size"], **settings["model"])
                loss = pretrain(tmp, records, texts, epochs=settings["epochs"], lr=settings["lr"],
                                batch_size=settings["batch_size"], seed=settings["seed"], log=log)
            seconds = round(time.perf_counter() - t0, 1)
            (tmp / "train.log").write_text("".join(f"{line}\n" for line in log_lines), encoding="utf-8")
            chatter.write(tmp / "train.log")
            (tmp / DONE_FILE).write_text(json.dumps({
                "key": key, "settings": settings, "final_loss": round(loss, 6), "train_seconds": seconds,
                "weights_sha256": hashlib.sha256((tmp / "model.safetensors").read_bytes()).hexdigest()},
                indent=2) + "\n")
            if folder.exists():  # an invalid earlier build, or a concurrent one that finished first
                if _prepared_ok(folder):
                    shutil.rmtree(tmp, ignore_errors=True)
                else:
                    shutil.rmtree(folder)
            if not folder.exists():
                os.rename(tmp, folder)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        progress(f"demo base model: prepared in {seconds:.0f}s (final loss {loss:.3f})")
    out_dir = Path(out_dir)
    shutil.copytree(folder, out_dir)
    return out_dir
