"""The model card (README.md) of a version pushed to the Hub, generated from the registry.

Front matter values go through ``huggingface_hub``'s YAML dumper, never string formatting; body
values are HTML-escaped and kept inside table cells, code spans or a blockquote (the Markdown
helpers at the end), so a hostile note cannot reach the metadata or markup.
"""

from __future__ import annotations

import html
import json
import re
from typing import Any

# Files whose presence in an upload means the version's own tokenizer is on the Hub.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json", "spiece.model")
HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")


def revision_tag(version: str, *, merged: bool) -> str:
    """The Hub tag of a version's push: ``vX.Y.Z`` (adapter), ``vX.Y.Z-merged`` (merged weights)."""
    return f"v{version}-merged" if merged else f"v{version}"


def model_card(
    project_name: str,
    entry: dict[str, Any],
    lineage: list[dict[str, Any]],
    *,
    hub: dict[str, Any],
    merged: bool,
    files: list[str] | None = None,
) -> str:
    """README.md for the Hub: YAML front matter (via ``ModelCardData``) and a Markdown body.

    Front matter values go through a YAML dumper, never string formatting; body values are
    HTML-escaped and kept inside table cells, code spans or a blockquote, so a hostile note
    (quotes, ``---``, newlines, ``{{ }}``, ``<script>``) cannot reach the metadata or markup.
    ``files`` (what is uploaded) decides where the load snippet takes the tokenizer from.
    """
    from huggingface_hub import ModelCard, ModelCardData

    version = entry["version"]
    repo_id = hub["repo_id"]
    base = entry["base_model"]
    base_name = base["name"]
    tag = revision_tag(version, merged=merged)
    datasets = [
        ds.get("hub_id") or ds["name"]
        for ds in entry.get("datasets", [])
        if HUB_ID.match(str(ds.get("hub_id") or ds["name"]))
    ]
    data = ModelCardData(
        base_model=base_name if HUB_ID.match(base_name) else None,
        base_model_relation="finetune" if merged else "adapter",
        library_name="transformers" if merged else "peft",
        license=hub.get("license"),
        language=list(hub["language"]) if hub.get("language") else None,
        tags=["cl-release", "lora", entry["strategy"]] + (["merged"] if merged else []),
        datasets=datasets or None,
        pipeline_tag="text-generation",
    )
    if not HUB_ID.match(base_name):
        data.base_model_relation = None  # the Hub only links a relation to a Hub model
    body = _card_body(project_name, entry, lineage, repo_id=repo_id, tag=tag, merged=merged, files=files)
    content = f"---\n{data.to_yaml()}\n---\n\n{body}"
    ModelCard(content)  # parses the front matter back; raises if it does not round-trip
    return content


def _card_body(
    project_name: str,
    entry: dict[str, Any],
    lineage: list[dict[str, Any]],
    *,
    repo_id: str,
    tag: str,
    merged: bool,
    files: list[str] | None,
) -> str:
    version = entry["version"]
    base = entry["base_model"]
    train_base = entry.get("train_base") or {}
    out: list[str] = []
    kind = "merged weights" if merged else "LoRA adapter"
    out.append(f"# {_text(project_name)} {version}\n")
    out.append(
        f"The {kind} of version **{version}** of {_text(project_name)}, released with cl-release "
        f"from a registry that records its whole lineage. Hub revision: {_code(tag)}.\n"
    )
    if not merged and train_base.get("merged_from"):
        out.append(
            f"> **Note:** this adapter was trained on the merged weights of version "
            f"{_code(train_base['merged_from'])} (sha256 {_code(train_base.get('sha256') or 'unknown')}), "
            f"not directly on {_code(base['name'])}: load it on top of revision "
            f"{_code(revision_tag(train_base['merged_from'], merged=True))} of this repository.\n"
        )

    out.append("## Release\n")
    rows = [
        ("version", _code(version)),
        ("parent", _code(entry.get("parent")) if entry.get("parent") else "none (first release)"),
        ("strategy", _code(entry.get("strategy"))),
        ("bump", _code(entry.get("bump"))),
        ("status", _cell(entry.get("status"))),
        ("created at", _cell(entry.get("created_at"))),
        ("base model", _code(base["name"])),
        ("base model revision", _code(base.get("revision")) if base.get("revision") else "not pinned"),
    ]
    if train_base:
        rows.append(("trained on", f"{_code(train_base.get('path'))} (sha256 {_code(train_base.get('sha256'))})"))
    rows += [
        ("adapter sha256", _code(entry["adapter"]["sha256"])),
        ("seed", _code(entry.get("seed"))),
        ("config sha256", _code((entry.get("config") or {}).get("sha256"))),
        ("source commit", _code(entry.get("source_commit"))),
    ]
    out.append(_table(("field", "value"), rows))

    if entry.get("notes"):
        out.append("### Notes\n")
        out.append(_quote(str(entry["notes"])))

    out.append("## Lineage\n")
    out.append(
        _table(
            ("version", "parent", "strategy", "status", "date"),
            [
                (
                    _code(m["version"]),
                    _code(m["parent"]) if m.get("parent") else "-",
                    _cell(m.get("strategy")),
                    _cell(m.get("status")),
                    _cell(str(m.get("created_at", ""))[:10]),
                )
                for m in lineage
            ],
        )
    )

    out.append("## Training data\n")
    if entry.get("datasets"):
        out.append(
            _table(
                ("name", "role", "examples", "sha256"),
                [
                    (_cell(d.get("name")), _cell(d.get("role")), _cell(d.get("examples")), _code(d.get("sha256")))
                    for d in entry["datasets"]
                ],
            )
        )
    else:
        out.append("No datasets recorded.\n")

    out.append("## Training metrics\n")
    out.append(_metrics(entry.get("training")))
    out.append("## Evaluation\n")
    out.append(_metrics(entry.get("evaluation")))

    out.append("## Reproducibility\n")
    toolchain = entry.get("toolchain") or {}
    rows = [(_cell(k), _code(v) if v else "-") for k, v in sorted(toolchain.items())]
    launch = entry.get("launch") or {}
    if launch:
        rows.append(("launch", _code(json.dumps(launch, sort_keys=True))))
    out.append(_table(("tool", "version"), rows) if rows else "No toolchain recorded.\n")

    out.append("## How to load\n")
    out.append(_load_snippet(entry, repo_id=repo_id, tag=tag, merged=merged, files=files))
    return "\n".join(out)


def _load_snippet(
    entry: dict[str, Any], *, repo_id: str, tag: str, merged: bool, files: list[str] | None
) -> str:
    q = json.dumps  # a valid Python string literal for any text
    if merged:
        code = (
            "from transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
            f"model = AutoModelForCausalLM.from_pretrained({q(repo_id)}, revision={q(tag)})\n"
            f"tokenizer = AutoTokenizer.from_pretrained({q(repo_id)}, revision={q(tag)})\n"
        )
        return _fence(code, "python")
    base = entry["base_model"]
    train_base = entry.get("train_base") or {}
    if train_base.get("merged_from"):
        base_line = (
            f"base = AutoModelForCausalLM.from_pretrained("
            f"{q(repo_id)}, revision={q(revision_tag(train_base['merged_from'], merged=True))})\n"
        )
        tok_src = f"{q(repo_id)}, revision={q(tag)}"
    else:
        rev = f", revision={q(base['revision'])}" if base.get("revision") else ""
        base_line = f"base = AutoModelForCausalLM.from_pretrained({q(base['name'])}{rev})\n"
        tok_src = f"{q(base['name'])}{rev}"
    if files is None or any(f in TOKENIZER_FILES for f in files):
        tok_src = f"{q(repo_id)}, revision={q(tag)}"
    code = (
        "from peft import PeftModel\n"
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
        + base_line
        + f"model = PeftModel.from_pretrained(base, {q(repo_id)}, revision={q(tag)})\n"
        + f"tokenizer = AutoTokenizer.from_pretrained({tok_src})\n"
    )
    return _fence(code, "python")


# -- Markdown helpers: every registry value passes through one of these


def _text(value: Any) -> str:
    """Inline text: HTML-escaped, one line, Markdown punctuation that could start markup escaped."""
    s = " ".join(str(value).split())
    s = html.escape(s, quote=False)
    return re.sub(r"([\\`*_{}\[\]#|!~])", r"\\\1", s)


def _cell(value: Any) -> str:
    return "-" if value is None or value == "" else _text(value)


def _code(value: Any) -> str:
    """An inline code span that no backtick in the value can close."""
    if value is None or value == "":
        return "-"
    s = " ".join(str(value).split()).replace("|", "\\|")
    longest = max((len(r) for r in re.findall(r"`+", s)), default=0)
    ticks = "`" * (longest + 1)
    pad = " " if s.startswith("`") or s.endswith("`") else ""
    return f"{ticks}{pad}{s}{pad}{ticks}"


def _fence(code: str, lang: str = "") -> str:
    longest = max((len(r) for r in re.findall(r"`+", code)), default=0)
    ticks = "`" * max(3, longest + 1)
    return f"{ticks}{lang}\n{code}{ticks}\n"


def _quote(text: str) -> str:
    """A blockquote: every line prefixed, so ``---`` or ``# x`` in a note stays quoted text."""
    lines = [html.escape(line, quote=False) for line in text.splitlines() or [""]]
    return "\n".join(f"> {line}".rstrip() for line in lines) + "\n"


def _table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _flatten(d: Any, prefix: str = "") -> list[tuple[str, Any]]:
    if isinstance(d, dict):
        out = []
        for k in sorted(d, key=str):
            out += _flatten(d[k], f"{prefix}.{k}" if prefix else str(k))
        return out
    return [(prefix, d)]


def _metrics(d: Any) -> str:
    if not d:
        return "None recorded.\n"
    rows = []
    for k, v in _flatten(d):
        if isinstance(v, float):
            v = f"{v:.6g}"
        elif isinstance(v, (list, tuple)):
            v = json.dumps(v)
        rows.append((_text(k), _cell(v)))
    return _table(("metric", "value"), rows)
