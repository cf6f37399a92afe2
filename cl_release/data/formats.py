"""Training data: formats, validation, content hashing, snapshots, new-vs-replay mixing.

Records are JSON objects, one per line. Two canonical shapes are trained on:
``{"messages": [{"role": ..., "content": ...}, ...]}`` (Axolotl ``chat_template``) and
``{"text": ...}`` (Axolotl ``completion``). Alpaca rows are converted to messages, ChatML
text is kept as text. Every record is identified by the SHA-256 of its canonical JSON, so a
release knows exactly which examples its ancestors already learned.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

import orjson

from ..errors import DataError
from ..files import atomic_write_bytes, sha256_file

FORMATS = ("messages", "alpaca", "completion", "chatml")
ROLES = {"system", "user", "assistant", "tool"}
SNAPSHOT_DIR = "datasets/snapshots"

# What a chat template's control tokens look like (ChatML's <|im_start|> and <|im_end|>,
# Llama 3's <|eot_id|> and <|start_header_id|>, <|endoftext|>, ...). Tokenizers read them
# in plain text as the tokens themselves, so a prompt or answer holding "<|im_end|>
# <|im_start|>assistant" would train fake turns: dataset rows holding one are refused (except
# ChatML text, whose turns are these tokens), feedback rows holding one are skipped.
CONTROL_TOKEN = re.compile(r"<\|[A-Za-z0-9_]{1,40}\|>")

# Input bounds (one owner): how deep a JSON or YAML value may nest, and the default
# per-example size, in characters per token of the largest sequence_len the project trains
# with (an example longer than that cannot fit its sequence; counting its tokens would cost
# seconds and gigabytes per megabyte).
MAX_NESTING = 64
CHARS_PER_TOKEN_LIMIT = 32


# ---------------------------------------------------------------- reading and validating


def canonical_json(record: dict[str, Any]) -> str:
    return json.dumps(record, sort_keys=True, ensure_ascii=False, separators=(",", ":"))


def record_hash(record: dict[str, Any]) -> str:
    return hashlib.sha256(canonical_json(record).encode("utf-8")).hexdigest()


def fold_text(text: str) -> str:
    """``text`` with whitespace runs folded to one space, stripped, and case-folded.

    ``str.split()`` splits on exactly the characters ``re``'s ``\\s`` matches in a str
    pattern (``str.isspace()``, which includes the \\x1c-\\x1f separators), so this equals
    ``re.sub(r"\\s+", " ", text).strip().casefold()`` at a fraction of the cost.
    """
    return " ".join(text.split()).casefold()


def normalized_text(record: dict[str, Any]) -> str:
    """The text a record's dedupe identity is taken from: roles and contents (or the
    ``text``) joined, whitespace and case folded. Near-identical records give equal texts."""
    if "messages" in record:
        text = "\x1e".join([f"{m['role']}\x1f{m['content']}" for m in record["messages"]])
    else:
        text = record.get("text", "")
    return fold_text(text)


def normalized_key(record: dict[str, Any]) -> str:
    """Hash of the record's text with case and whitespace folded: near-identical rows collide."""
    return hashlib.sha256(normalized_text(record).encode("utf-8")).hexdigest()


def _fail(path, line, message, field=None):
    raise DataError(path, message, line=line, field=field)


def _no_control_token(text: str, path, line, field) -> None:
    if "<|" in text:
        m = CONTROL_TOKEN.search(text)
        if m:
            raise DataError(path, f"holds the chat control token {m.group(0)!r}: a tokenizer reads it as the "
                            "token itself, so the example would train a fake turn", line=line, field=field,
                            hint="remove it (ChatML text belongs in a dataset of format chatml)")


def to_canonical(obj: Any, fmt: str, *, path, line: int) -> dict[str, Any]:
    """Check one parsed row of format ``fmt`` and return its canonical training record.

    Prompts and answers holding a chat control token (``CONTROL_TOKEN``) are refused, except
    in ChatML text, where the turns are those tokens."""
    if not isinstance(obj, dict):
        _fail(path, line, f"expected a JSON object, got {type(obj).__name__}")
    if fmt == "messages":
        msgs = obj.get("messages")
        if msgs is None:
            _fail(path, line, "missing field", "messages")
        if not isinstance(msgs, list) or not msgs:
            _fail(path, line, "must be a non-empty list", "messages")
        out = []
        has_answer = False
        for i, m in enumerate(msgs):
            if not isinstance(m, dict):
                _fail(path, line, "must be an object with role and content", f"messages[{i}]")
            role, content = m.get("role"), m.get("content")
            if role is None:
                _fail(path, line, "missing field", f"messages[{i}].role")
            if role not in ROLES:
                _fail(path, line, f"unknown role {role!r} (use {', '.join(sorted(ROLES))})", f"messages[{i}].role")
            if not isinstance(content, str):
                _fail(path, line, "missing or not a string", f"messages[{i}].content")
            if role == "assistant":
                if not content.strip():
                    _fail(path, line, "empty assistant turn", f"messages[{i}].content")
                has_answer = True
            _no_control_token(content, path, line, f"messages[{i}].content")
            out.append({"role": role, "content": content})
        if not has_answer:
            _fail(path, line, "no assistant turn to learn from", "messages")
        return {"messages": out}
    if fmt == "alpaca":
        for key in ("instruction", "output"):
            if not isinstance(obj.get(key), str):
                _fail(path, line, "missing or not a string", key)
        if not obj["output"].strip():
            _fail(path, line, "empty output", "output")
        for key in ("instruction", "input", "output"):
            if isinstance(obj.get(key), str):
                _no_control_token(obj[key], path, line, key)
        prompt = obj["instruction"]
        if isinstance(obj.get("input"), str) and obj["input"].strip():
            prompt = f"{prompt}\n\n{obj['input']}"
        return {"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": obj["output"]}]}
    if fmt in ("completion", "chatml"):
        text = obj.get("text")
        if not isinstance(text, str):
            _fail(path, line, "missing or not a string", "text")
        if not text.strip():
            _fail(path, line, "empty text", "text")
        if fmt == "chatml" and "<|im_start|>" not in text:
            _fail(path, line, "ChatML text needs <|im_start|> turns", "text")
        if fmt == "completion":
            _no_control_token(text, path, line, "text")
        return {"text": text}
    raise DataError(path, f"unknown format {fmt!r} (use {', '.join(FORMATS)})")


def iter_jsonl(path: Path, *, display: str | None = None) -> Iterator[tuple[int, Any]]:
    """Yield (line number, parsed JSON) for each non-blank line; strict about encoding.

    Parsed with orjson, which is strict JSON: no NaN or Infinity, no lone UTF-16 surrogate
    escapes (text that cannot be written as UTF-8), and at most 1,024 levels of nesting, so a
    hostile line is a DataError naming its line, never a RecursionError later on."""
    shown = display or str(path)
    try:
        raw = Path(path).read_bytes()
    except FileNotFoundError:
        raise DataError(shown, "file not found") from None
    if raw.startswith(b"\xef\xbb\xbf"):
        _fail(shown, 1, "starts with a UTF-8 byte-order mark (BOM); save it as UTF-8 without BOM")
    for lineno, bline in enumerate(raw.split(b"\n"), start=1):
        if bline.endswith(b"\r"):
            _fail(shown, lineno, "Windows line ending (CRLF); convert the file to LF line endings")
        try:
            text = bline.decode("utf-8")
        except UnicodeDecodeError as e:
            _fail(shown, lineno, f"not UTF-8 (byte {e.start} of the line)")
        if not text.strip():
            continue
        try:
            obj = orjson.loads(text)
        except orjson.JSONDecodeError as e:
            _fail(shown, lineno, f"invalid JSON: {e.msg} (column {e.colno})")
        yield lineno, obj


def read_records(path: Path, fmt: str, *, display: str | None = None,
                 max_chars: int | None = None) -> list[dict[str, Any]]:
    """The canonical records of a dataset file; ``max_chars``: the per-example size limit
    (``max_example_chars``), checked on every row."""
    shown = display or str(path)
    out = []
    for n, obj in iter_jsonl(path, display=shown):
        record = to_canonical(obj, fmt, path=shown, line=n)
        if max_chars is not None:
            check_example_size(record, max_chars, path=shown, line=n)
        out.append(record)
    return out


def validate_file(path: Path, fmt: str = "messages", *, max_chars: int | None = None) -> int:
    """Check every row; return the number of records. Raises DataError naming file and line."""
    return len(read_records(Path(path), fmt, max_chars=max_chars))


# ---------------------------------------------------------------- input bounds


def nesting_depth(value: Any, limit: int = MAX_NESTING) -> int:
    """Levels of nested lists/dicts in ``value`` (a scalar is 0, ``[[1]]`` is 2), counted level
    by level without recursion; stops at ``limit + 1`` (enough to tell a value is too deep)."""
    depth, level = 0, [value]
    while depth <= limit:
        nxt: list = []
        for v in level:
            if isinstance(v, dict):
                nxt.extend(v.values())
            elif isinstance(v, (list, tuple)):
                nxt.extend(v)
            else:
                continue
            nxt.append(None)  # this value was a container, even an empty one
        if not nxt:
            break
        depth += 1
        level = nxt
    return depth


def max_example_chars(project_data: Mapping[str, Any] | None = None) -> int:
    """The per-example size limit in characters.

    ``limits.max_example_chars`` in cl-release.yaml when set; otherwise
    ``CHARS_PER_TOKEN_LIMIT`` (32) characters per token of the largest ``sequence_len`` any
    strategy of the project trains with (default sequence_len 512: 16,384 characters)."""
    limits = (project_data or {}).get("limits") or {}
    if limits.get("max_example_chars") is not None:
        return int(limits["max_example_chars"])
    from ..release.render import STRATEGIES, strategy_knobs

    seq = max(int(strategy_knobs(dict(project_data or {}), s)["sequence_len"]) for s in STRATEGIES)
    return CHARS_PER_TOKEN_LIMIT * seq


def _strings(value: Any, where: str = "") -> Iterator[tuple[str, str]]:
    stack = [(value, where)]
    while stack:
        v, at = stack.pop()
        if isinstance(v, str):
            yield at, v
        elif isinstance(v, Mapping):
            stack.extend((x, f"{at}.{k}" if at else str(k)) for k, x in v.items())
        elif isinstance(v, (list, tuple)):
            stack.extend((x, f"{at}[{i}]") for i, x in enumerate(v))


def example_chars(record: Mapping[str, Any]) -> int:
    """Characters of text in an example: every string in it (message contents, text, ...)."""
    msgs = record.get("messages")
    if len(record) == 1 and isinstance(msgs, list):  # canonical chat record: the fast path
        try:
            return sum(len(m["content"]) for m in msgs)
        except (TypeError, KeyError):
            pass
    return sum(len(s) for _, s in _strings(record))


OVERSIZE_HINT = (f"shorten or split it; the limit is {CHARS_PER_TOKEN_LIMIT} characters per token of "
                 "sequence_len, or limits.max_example_chars in cl-release.yaml")


def oversize(record: Mapping[str, Any], limit: int) -> tuple[str, str | None] | None:
    """None when ``record`` holds at most ``limit`` characters of text; else (message, field),
    the field being its longest string. The rule behind :func:`check_example_size`, for
    callers that report errors their own way (feedback import, the collector)."""
    total = example_chars(record)
    if total <= limit:
        return None
    field, longest = max(((at, len(s)) for at, s in _strings(record)), key=lambda t: t[1], default=(None, 0))
    return f"example of {total:,} characters is over the limit of {limit:,} (this field: {longest:,})", field or None


def check_example_size(record: Mapping[str, Any], limit: int, *, path: str | Path, line: int | None = None) -> None:
    """Raise DataError (``path:line: field: ...``) when ``record`` holds more than ``limit``
    characters of text (``max_example_chars``). ``record``: a training record, or a mapping
    of the fields that will be trained on or prompted with (strings, lists, nested mappings);
    the field named is the longest string."""
    problem = oversize(record, limit)
    if problem is not None:
        raise DataError(path, problem[0], line=line, field=problem[1], hint=OVERSIZE_HINT)


# ---------------------------------------------------------------- snapshots


def dump_jsonl(records: Iterable[dict[str, Any]]) -> bytes:
    return "".join(canonical_json(r) + "\n" for r in records).encode("utf-8")


def write_snapshot(root: Path, records: list[dict[str, Any]]) -> tuple[str, str]:
    """Write records to ``datasets/snapshots/<sha256>.jsonl``; returns (relative path, sha256).

    Content-addressed: the name is the hash of the bytes, so Axolotl's prepared-data cache
    (keyed on the config, which names this path) can never serve stale data. Idempotent.
    """
    data = dump_jsonl(records)
    digest = hashlib.sha256(data).hexdigest()
    rel = f"{SNAPSHOT_DIR}/{digest}.jsonl"
    target = root / rel
    if not target.exists() or sha256_file(target) != digest:
        atomic_write_bytes(target, data)
    return rel, digest


def snapshot_records(root: Path, rel: str) -> list[dict[str, Any]]:
    return [obj for _, obj in iter_jsonl(root / rel, display=rel)]


# ---------------------------------------------------------------- mixing


@dataclass
class Part:
    """One component of a release's training mix (becomes one Axolotl dataset entry)."""

    name: str
    role: str  # new | replay | general | corrections | complete
    records: list[dict[str, Any]]
    sources: list[dict[str, Any]] = field(default_factory=list)  # [{name, path, sha256}]
    record_ids: list[Any] = field(default_factory=list)  # feedback-store rows behind the records
    path: str | None = None
    sha256: str | None = None

    @property
    def kind(self) -> str:
        return "text" if self.records and "text" in self.records[0] else "chat"


def dedupe(records: Iterable[dict[str, Any]], exclude: set[str] = frozenset()) -> list[dict[str, Any]]:
    """Drop exact duplicates (canonical hash), and any record whose hash is in ``exclude``."""
    seen = set(exclude)
    out = []
    for r in records:
        h = record_hash(r)
        if h not in seen:
            seen.add(h)
            out.append(r)
    return out


def prompt_key(record: dict[str, Any]) -> str | None:
    """What a chat record asks: its turns before the last answer, case and whitespace folded
    (None for a text record, or a chat record that does not end with an answer)."""
    msgs = record.get("messages")
    if not msgs or msgs[-1].get("role") != "assistant":
        return None
    return normalized_text({"messages": msgs[:-1]})


def split_by_kind(records: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    kinds: dict[str, list] = {}
    for r in records:
        kinds.setdefault("text" if "text" in r else "chat", []).append(r)
    return kinds


def sample(records: list[dict[str, Any]], n: int, seed: str) -> list[dict[str, Any]]:
    """A deterministic sample of ``n`` records (all of them if fewer), in a seeded order."""
    if n <= 0 or not records:
        return []
    ordered = sorted(records, key=record_hash)
    rng = random.Random(seed)
    return rng.sample(ordered, min(n, len(ordered)))


def ratio_count(n_new: int, ratio: float, other_ratio: float = 0.0) -> int:
    """How many extra examples make ``ratio`` of the final mix (new + replay + general)."""
    if ratio <= 0 or n_new <= 0:
        return 0
    new_share = 1.0 - ratio - other_ratio
    if new_share <= 0:
        raise ValueError("replay_ratio + general_ratio must be below 1")
    return max(1, round(n_new * ratio / new_share))
