"""A tiny Llama-architecture model and tokenizer, built locally so everything runs offline.

Random init with a fixed seed, a byte-level BPE tokenizer trained with the ``tokenizers``
BPE trainer on the demo corpus, and a ChatML chat template. Real Axolotl trains a LoRA on it
on two CPU cores in well under a minute.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

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
