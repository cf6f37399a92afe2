"""Feedback rows -> clean, hashed, reproducible training sets.

``build(rows, rules)`` turns logged predictions with their feedback into training examples:

* rating >= ``min_rating``, thumbs up, or ``quality_score >= quality_threshold``: the
  logged answer is kept as is (source ``kept``);
* rating <= ``max_negative_rating``, thumbs down, or ``hallucinated`` *with* a non-empty
  correction: the correction replaces the answer (source ``corrected``; these rows also
  form the corrections set a PATCH release trains on);
* everything else is skipped and counted by reason (see ``SKIP_REASONS``).

A negative signal wins over a positive one (a thumbs-up answer flagged as hallucinated is
never trained on as is). PII is redacted before anything is hashed or written; near-identical
examples (case and whitespace folded) are deduplicated keeping the newest row. The output is
sorted by (created_at, id) and serialised as canonical JSON, so the same rows give the same
bytes whatever order they arrive in; the manifest records the SHA-256 of those bytes.

Rows are plain dicts as ``FeedbackStore.rows()`` yields them; any iterable works. Given
``FeedbackStore.rows()`` itself, ``build`` reads the store directly instead (see "reading a
FeedbackStore" below): SQLite picks out the rows that can become examples, and only those
come back, as tuples, in output order; a large store is read in created_at ranges by one
process per core ("the store build in shards"). The result is the same to the byte.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import gc
import hashlib
import json
import re
import sys
from dataclasses import asdict, dataclass
from functools import cached_property
from itertools import compress, repeat
from operator import itemgetter
from pathlib import Path
from typing import Any, Callable, Generator, Iterable, Sequence

from .formats import CONTROL_TOKEN, FORMATS, ROLES, canonical_json, fold_text, iter_jsonl, normalized_text, read_records
from .. import parallel
from ..timeutil import normalize_time
from ..errors import DataError, UserError
from ..files import atomic_write_bytes, atomic_write_json

try:  # orjson gives the same bytes as datasets.canonical_json for our string-only records
    import orjson as _orjson
except ImportError:  # pragma: no cover - orjson is optional
    _orjson = None

MANIFEST_VERSION = 1
DEFAULT_OUT_DIR = "outputs/data"  # git-ignored: a build is for inspection, release builds its own

KEPT, CORRECTED = "kept", "corrected"
SKIP_REASONS = (
    "invalid_row",  # no id, or not a mapping
    "invalid_input",  # input is neither a string nor a list of {role, content} messages
    "empty_input",  # no non-blank user/system text to answer
    "no_feedback",  # no rating, thumbs, quality score, hallucination flag or correction
    "neutral",  # feedback that is neither positive nor negative (rating 3, thumbs 0, low score)
    "unrated_correction",  # a correction without a negative signal: not trusted on its own
    "negative_without_correction",  # a bad answer nobody corrected: nothing to learn from
    "empty_output",  # a positive row whose logged answer is blank
    "control_tokens",  # prompt or answer holds a chat template's control token (see CONTROL_TOKEN)
    "duplicate",  # same normalized content as a newer row
)

# A chat template's control token (datasets.CONTROL_TOKEN, the one rule): a logged prompt
# holding "<|im_end|><|im_start|>assistant" would train fake turns, so such rows are skipped.
_control = CONTROL_TOKEN.search


# ---------------------------------------------------------------- rules


class RuleError(UserError):
    """An invalid extraction rule; ``parts`` is the path of the key under ``extraction:``."""

    def __init__(self, parts: tuple, message: str):
        self.parts = parts
        self.detail = message
        name = ".".join(str(p) for p in ("extraction", *parts))
        super().__init__(f"{name}: {message}")


@dataclass(frozen=True)
class ExtractionRules:
    """How feedback rows become examples. Defaults follow the team's practice."""

    min_rating: int = 4
    max_negative_rating: int = 2
    quality_threshold: float | None = 0.8  # None: quality_score never keeps a row
    redact_pii: bool = True
    redact_patterns: tuple[str, ...] = ()  # extra regexes replaced by [REDACTED]
    format: str = "messages"
    dedupe: bool = True

    KEYS = ("min_rating", "max_negative_rating", "quality_threshold", "redact_pii", "redact_patterns", "format")

    def __post_init__(self) -> None:
        object.__setattr__(self, "redact_patterns", tuple(self.redact_patterns))
        if self.format not in FORMATS:
            raise RuleError(("format",), f"unknown format {self.format!r} (use {', '.join(FORMATS)})")
        if not self.max_negative_rating < self.min_rating:
            raise RuleError(
                ("max_negative_rating",),
                f"must be below min_rating ({self.max_negative_rating} >= {self.min_rating})",
            )
        for i, pattern in enumerate(self.redact_patterns):
            try:
                re.compile(pattern)
            except (re.error, TypeError) as e:
                raise RuleError(("redact_patterns", i), f"invalid regular expression {pattern!r}: {e}") from None

    @classmethod
    def from_mapping(cls, data: dict[str, Any] | None, **overrides: Any) -> "ExtractionRules":
        """Rules from the ``extraction:`` mapping of cl-release.yaml; ``None`` overrides are ignored."""
        values = dict(data or {})
        unknown = sorted(set(values) - set(cls.KEYS) - {"dedupe"})
        if unknown:
            raise RuleError((unknown[0],), f"unknown key (use {', '.join(cls.KEYS)})")
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["redact_patterns"] = list(self.redact_patterns)
        return d

    @cached_property
    def redactor(self) -> Callable[[str], str] | None:
        if not self.redact_pii and not self.redact_patterns:
            return None
        return make_redactor(self.redact_patterns, pii=self.redact_pii)


def rules_from_project(project, **overrides: Any) -> ExtractionRules:
    """The project's ``extraction:`` rules; a bad value is a ProjectError naming its line."""
    try:
        return ExtractionRules.from_mapping(project.data.get("extraction"), **overrides)
    except RuleError as e:
        raise project.error(e.detail, "extraction", *e.parts) from None


# ---------------------------------------------------------------- PII redaction

EMAIL_RE = re.compile(r"[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}")
# Conservative on purpose: training text is full of numbers (dates, versions, ppm, IPs),
# and a false positive corrupts an example. Matches +<country> numbers with >= 8 digits,
# North American 555-123-4567 / (555) 123-4567 / 1-800-555-1234, and national numbers with
# a trunk prefix 0 and separators (020 7946 0958). Add project patterns for anything else.
PHONE_RE = re.compile(
    r"(?=[+(0-9])(?<![\w.+-])(?:"
    r"\+(?=(?:[ .()-]*\d){8})\d{1,3}(?:[ .-]?\(?\d{1,4}\)?){2,5}"
    r"|(?:1[ .-])?\(\d{3}\)[ .-]?\d{3}[ .-]\d{4}"
    r"|(?:1[ .-])?\d{3}[.-]\d{3}[.-]\d{4}"
    r"|0\d{1,4}[ -]\d{3,4}[ -]?\d{3,4}"
    r")(?![\w-])"
)


# Where a PHONE_RE match can start. Every match starts with [+(0-9] followed by at least 8
# characters of [0-9 .()-]: the "+" branch's lookahead demands 8 digits after the "+" with
# only [ .()-] between them, and the other branches match at least 9 characters of that set
# ("(555) 123-4567": 13, "555-123-4567": 12, "01 234 567": 9). So a text without this
# pattern holds no phone number, and no match starts before its first hit (tests/test_extract
# checks both on random strings). The charset comes first, so the regex engine skips ahead;
# on ASCII text (``str.isascii()`` is O(1)) the [0-9] form is the same test, about twice as
# fast as ``\d``, which checks every character against the Unicode tables.
_PHONE_CANDIDATE = re.compile(r"[+(\d][\d .()-]{8}")
_PHONE_CANDIDATE_ASCII = re.compile(r"[+(0-9][0-9 .()-]{8}")
_phone_candidate_ascii = _PHONE_CANDIDATE_ASCII.search
_phone_candidate = _PHONE_CANDIDATE.search
# The characters EMAIL_RE's local part is made of (the run before its "@").
_EMAIL_LOCAL = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._%+-")


def _sub_from(rx: re.Pattern, text: str, start: int, repl: str) -> str:
    """``rx.sub(repl, text)`` when no match of ``rx`` (never empty) starts before ``start``.

    ``rx.search(text, pos)`` still sees the text before ``pos`` for look-behinds, so this
    finds exactly the matches ``sub`` would, without scanning the prefix that cannot match.
    """
    search = rx.search
    m = search(text, start)
    if m is None:
        return text
    parts = []
    last = 0
    while m is not None:
        s, e = m.span()
        parts.append(text[last:s])
        parts.append(repl)
        last = e
        m = search(text, e)
    parts.append(text[last:])
    return "".join(parts)


def _redact_email(text: str) -> str:
    """``EMAIL_RE.sub("[EMAIL]", text)``, starting at the local part before the first "@":
    a match's local part is an unbroken run of _EMAIL_LOCAL characters ending at its "@"
    (and "@" is not one of them), so no match starts before that run."""
    at = text.find("@")
    if at < 0:
        return text
    s = at
    while s and text[s - 1] in _EMAIL_LOCAL:
        s -= 1
    return _sub_from(EMAIL_RE, text, s, "[EMAIL]")


def _redact_phone(text: str) -> str:
    """``PHONE_RE.sub("[PHONE]", text)``, starting at the first possible phone number."""
    m = (_PHONE_CANDIDATE_ASCII if text.isascii() else _PHONE_CANDIDATE).search(text)
    if m is None:
        return text
    return _sub_from(PHONE_RE, text, m.start(), "[PHONE]")


def make_redactor(patterns: Iterable[str] = (), *, pii: bool = True) -> Callable[[str], str]:
    """A function replacing custom ``patterns`` by [REDACTED], then emails and phone numbers."""
    custom = [re.compile(p) for p in patterns]
    if pii and not custom:  # the default rules: no loop, no closure cell lookups
        def redact_pii(text: str) -> str:
            if "@" in text:
                text = _redact_email(text)
            # _redact_phone, inlined
            m = (_phone_candidate_ascii if text.isascii() else _phone_candidate)(text)
            if m is None:
                return text
            return _sub_from(PHONE_RE, text, m.start(), "[PHONE]")

        return redact_pii

    def redact(text: str) -> str:
        for rx in custom:
            text = rx.sub("[REDACTED]", text)
        if pii:
            if "@" in text:
                text = _redact_email(text)
            text = _redact_phone(text)
        return text

    return redact


def redact(text: str, patterns: Iterable[str] = ()) -> str:
    """Redact emails, phone numbers and ``patterns`` from one string."""
    return make_redactor(patterns)(text)


# ---------------------------------------------------------------- one row


def _prompt(inp: Any) -> list[dict[str, str]] | str:
    """The prompt turns of a row's input, or a skip reason."""
    if isinstance(inp, str):
        return [{"role": "user", "content": inp}] if inp.strip() else "empty_input"
    if not isinstance(inp, list):
        return "invalid_input"
    msgs = []
    for m in inp:
        if not isinstance(m, dict):
            return "invalid_input"
        role, content = m.get("role"), m.get("content")
        if role not in ROLES or not isinstance(content, str):
            return "invalid_input"
        msgs.append({"role": role, "content": content})
    if msgs and msgs[-1]["role"] == "assistant":  # the logged answer: replaced below
        msgs.pop()
    if not any(m["role"] in ("user", "system") and m["content"].strip() for m in msgs):
        return "empty_input"
    return msgs


def classify(row: dict[str, Any], rules: ExtractionRules) -> str:
    """``kept``, ``corrected``, or the reason the row is skipped (before dedupe)."""
    get = row.get
    rating, thumbs, score = get("rating"), get("thumbs"), get("quality_score")
    hallucinated, correction = get("hallucinated"), get("correction")
    has_correction = isinstance(correction, str) and correction.strip() != ""
    negative = (
        (rating is not None and rating <= rules.max_negative_rating)
        or thumbs == -1
        or hallucinated is True
    )
    if negative:
        return CORRECTED if has_correction else "negative_without_correction"
    positive = (
        (rating is not None and rating >= rules.min_rating)
        or thumbs == 1
        or (score is not None and rules.quality_threshold is not None and score >= rules.quality_threshold)
    )
    if positive:
        output = get("output")
        return KEPT if isinstance(output, str) and output.strip() else "empty_output"
    if has_correction:
        return "unrated_correction"
    if rating is None and thumbs is None and score is None and hallucinated is None:
        return "no_feedback"
    return "neutral"


# ---------------------------------------------------------------- formats


def _completion_text(prompt: str, answer: str) -> str:
    if not prompt or prompt[-1].isspace() or answer[:1].isspace():
        return prompt + answer
    return f"{prompt}\n{answer}"


def format_example(messages: list[dict[str, str]], fmt: str) -> dict[str, Any]:
    """One example (prompt turns + final assistant answer) in output format ``fmt``."""
    if fmt == "messages":
        return {"messages": messages}
    if fmt == "chatml":
        return {"text": "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)}
    answer = messages[-1]["content"]
    prompt = messages[:-1]
    if fmt == "completion":
        return {"text": _completion_text("\n\n".join(m["content"] for m in prompt), answer)}
    if fmt == "alpaca":
        # instruction = the context (system prompt, earlier turns), input = the last prompt
        # turn; with no context the question itself is the instruction.
        last = prompt[-1]["content"]
        context = [m["content"] if m["role"] == "system" else f"{m['role']}: {m['content']}" for m in prompt[:-1]]
        if context:
            return {"instruction": "\n\n".join(context), "input": last, "output": answer}
        return {"instruction": last, "input": "", "output": answer}
    raise UserError(f"unknown format {fmt!r}", hint=f"use one of {', '.join(FORMATS)}")


if _orjson is not None:
    _SORT = _orjson.OPT_SORT_KEYS

    def dump_jsonl(records: list[dict[str, Any]]) -> bytes:
        """Canonical JSON lines (sorted keys, compact, UTF-8): identical to datasets.dump_jsonl."""
        if not records:
            return b""
        return b"\n".join([_orjson.dumps(r, option=_SORT) for r in records]) + b"\n"

else:  # pragma: no cover

    def dump_jsonl(records: list[dict[str, Any]]) -> bytes:
        return "".join(canonical_json(r) + "\n" for r in records).encode("utf-8")


# ---------------------------------------------------------------- building


class BuildResult:
    """A built training set: ``data`` (canonical JSON lines), ``corrections_data`` (the
    corrected examples alone) and the ``manifest`` describing them.

    ``examples`` and ``corrections`` are the same records as dicts (``corrections`` holds
    the same objects as ``examples``). A build makes them on first use: most callers only
    need the bytes and the manifest, and a million dicts cost seconds to build and, later,
    for the garbage collector to walk.
    """

    def __init__(
        self,
        examples: list[dict[str, Any]] | None,
        corrections: list[dict[str, Any]] | None,
        manifest: dict[str, Any],
        data: bytes = b"",
        corrections_data: bytes = b"",
    ):
        self._examples = examples
        self._corrections = corrections
        self._make: Callable[[], tuple[list, list]] | None = None
        self.manifest = manifest
        self.data = data
        self.corrections_data = corrections_data

    @classmethod
    def _lazy(cls, make: Callable[[], tuple[list, list]], manifest: dict[str, Any], data: bytes,
              corrections_data: bytes) -> "BuildResult":
        """A result whose ``(examples, corrections)`` ``make()`` returns when first asked for."""
        result = cls(None, None, manifest, data, corrections_data)
        result._make = make
        return result

    def _materialize(self) -> None:
        make, self._make = self._make, None
        with _gc_paused():  # a million small dicts: see build
            self._examples, self._corrections = make()

    @property
    def examples(self) -> list[dict[str, Any]]:
        if self._make is not None:
            self._materialize()
        return self._examples

    @property
    def corrections(self) -> list[dict[str, Any]]:
        if self._make is not None:
            self._materialize()
        return self._corrections

    @property
    def sha256(self) -> str:
        return self.manifest["sha256"]

    def __repr__(self) -> str:
        m = self.manifest
        return f"BuildResult(examples={m.get('examples')}, format={m.get('format')!r}, sha256={m.get('sha256')!r})"


# One usable row: (created_at, id, newest time, source, prompt, answer). ``prompt`` is the
# (redacted) text of a one-turn string input, or the list of (redacted) prompt turns;
# ``answer`` is the (redacted) answer. Output order is (created_at, id key); a duplicate
# group keeps the row with the largest (is a correction, feedback or created time,
# created_at, id key): a corrected example beats a kept one with the same text (a later
# good rating of the fixed answer must not turn the correction into a plain example), then
# the newest wins.
# Tuples of strings: a million of them are built, and no dict or list per example.
_CREATED, _ID, _TIME, _SOURCE, _PROMPT, _ANSWER = range(6)


def _id_key(rid: Any) -> tuple:
    """Ids sort numbers first (by value), then everything else by its string."""
    if type(rid) is str:
        return (1, 0, rid)
    return (0, rid, "") if isinstance(rid, (int, float)) and not isinstance(rid, bool) else (1, 0, str(rid))


def _newest(entry: tuple) -> tuple:
    """Which of two duplicates stays: the larger (a correction first, then the newest)."""
    return (entry[_SOURCE] == CORRECTED, entry[_TIME], entry[_CREATED], _id_key(entry[_ID]))


def _messages(entry: tuple) -> list[dict[str, str]]:
    """The example's turns: the prompt turns, then the answer as the assistant's turn."""
    prompt = entry[_PROMPT]
    answer = {"role": "assistant", "content": entry[_ANSWER]}
    if type(prompt) is str:
        return [{"role": "user", "content": prompt}, answer]
    return [*prompt, answer]


# The fields of a row that _entries reads, in the order it unpacks them.
_FIELDS = ("id", "rating", "thumbs", "correction", "hallucinated", "quality_score", "output", "input", "created_at",
           "feedback_at")


class _BadValue(Exception):
    """A row's feedback value of a type no rule can compare (a text rating, say)."""

    def __init__(self, rid: Any, field: str, value: Any):
        super().__init__(rid, field, value)
        self.rid, self.field, self.value = rid, field, value


def _entries(rows: Iterable[dict[str, Any]], rules: ExtractionRules, skipped: dict[str, int]) -> tuple[list[tuple], int, tuple]:
    """The usable rows as entries, deduplicated (newest wins), in first-seen order of their
    dedupe key; ``skipped`` counts the rest. ``classify`` and ``_prompt``, inlined: the same
    tests in the same order, so the same rows are kept, skipped and rejected.

    Also returns the entries' shape, for _finish's shortcuts: (every id a str, every
    created_at a str of one length, every prompt one string). Noted here, while each row is
    in the CPU cache: afterwards each pass over 400k scattered entries costs 0.1-0.3 s.
    These hold for every usable row, so also for the winners of dedupe."""
    red = rules.redactor
    dedupe = rules.dedupe
    min_rating, max_negative, threshold = rules.min_rating, rules.max_negative_rating, rules.quality_threshold
    fields = itemgetter(*_FIELDS)
    seen: dict[str, tuple] = {}
    setdefault = seen.setdefault
    out: list[tuple] = []
    append = out.append
    n = 0
    counts = dict.fromkeys(SKIP_REASONS, 0)
    id_types: set[type] = set()
    created_lengths: set[int] = set()
    one_turn = True
    rid = rating = thumbs = score = hallucinated = None
    try:
        for row in rows:
            n += 1
            if type(row) is dict:
                try:  # every field at once (FeedbackStore rows have them all)
                    rid, rating, thumbs, correction, hallucinated, score, output, prompt, created, rated = fields(row)
                except KeyError:
                    rid, rating, thumbs, correction, hallucinated, score, output, prompt, created, rated = map(row.get, _FIELDS)
            elif isinstance(row, dict):  # a subclass: only .get (a defaultdict's [] would add keys)
                rid, rating, thumbs, correction, hallucinated, score, output, prompt, created, rated = map(row.get, _FIELDS)
            else:
                counts["invalid_row"] += 1
                continue
            if rid is None:
                counts["invalid_row"] += 1
                continue
            if (rating is not None and rating <= max_negative) or thumbs == -1 or hallucinated is True:
                if not (isinstance(correction, str) and correction.strip()):
                    counts["negative_without_correction"] += 1
                    continue
                source = CORRECTED
                answer = correction
            else:
                if (
                    (rating is not None and rating >= min_rating)
                    or thumbs == 1
                    or (score is not None and threshold is not None and score >= threshold)
                ):
                    answer = output
                    if not (isinstance(answer, str) and answer.strip()):
                        counts["empty_output"] += 1
                        continue
                    source = KEPT
                else:
                    if isinstance(correction, str) and correction.strip():
                        counts["unrated_correction"] += 1
                    elif rating is None and thumbs is None and score is None and hallucinated is None:
                        counts["no_feedback"] += 1
                    else:
                        counts["neutral"] += 1
                    continue
            if type(prompt) is str:  # the common case: one user turn
                if not prompt.strip():
                    counts["empty_input"] += 1
                    continue
                if ("<|" in prompt or "<|" in answer) and (_control(prompt) or _control(answer)):
                    counts["control_tokens"] += 1
                    continue
                if red is not None:
                    prompt = red(prompt)
                    answer = red(answer)
                key = fold_text(f"user\x1f{prompt}\x1eassistant\x1f{answer}") if dedupe else None
            else:
                prompt = _prompt(prompt)
                if type(prompt) is str:
                    counts[prompt] += 1
                    continue
                if _control(answer) or any(_control(m["content"]) for m in prompt):
                    counts["control_tokens"] += 1
                    continue
                one_turn = False
                if red is not None:
                    for m in prompt:
                        m["content"] = red(m["content"])
                    answer = red(answer)
                key = normalized_text({"messages": [*prompt, {"role": "assistant", "content": answer}]}) if dedupe else None
            created = created or ""
            id_types.add(type(rid))
            created_lengths.add(len(created) if type(created) is str else -1)
            entry = (created, rid, rated or created, source, prompt, answer)
            if key is None:
                append(entry)
                continue
            # the folded text itself is the dedupe identity (equal texts <=> equal
            # datasets.normalized_key hashes): no hashing per row
            other = setdefault(key, entry)
            if other is not entry:
                counts["duplicate"] += 1
                if _newest(entry) > _newest(other):
                    seen[key] = entry
    except TypeError:  # a rating, score or flag of the wrong type, where Python compares it
        for name, value in (("rating", rating), ("quality_score", score), ("thumbs", thumbs)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
                raise _BadValue(rid, name, value) from None
        raise
    for reason, count in counts.items():
        if count:
            skipped[reason] = skipped.get(reason, 0) + count
    if dedupe:
        out = list(seen.values())
    shape = (id_types <= {str}, len(created_lengths) == 1 and -1 not in created_lengths, one_turn)
    return out, n, shape


# ---------------------------------------------------------------- reading a FeedbackStore

# The store build lets SQLite classify each record by its latest feedback (``classify``'s
# tests, in its order) and send back only what Python must still look at. Codes below 10 are
# settled skips: counted by a Python function SQLite calls once per record (``keep``; cheaper
# than sending the row back, bench/RESULTS-data.md) and not sent back. 10-13 need a string
# test (``correction.strip()``, ``output.strip()``), which SQL's trim() does not do the same
# way. 99: a value the schema's CHECKs should have refused (a text rating or quality score,
# a hallucinated flag not 0/1), where SQL and Python comparisons could differ: the build then
# reads the row dicts instead. ``x >= ''`` is true exactly for text and blobs (they sort
# after all numbers; '' stays text under the columns' numeric affinity) and costs less than
# typeof().
_NEGATIVE, _POSITIVE, _CORRECTION_ONLY, _CORRECTION_AND_SIGNAL, _ODD = 10, 11, 12, 13, 99
_SETTLED = ("invalid_row", "negative_without_correction", "no_feedback", "neutral")
_NO_SIGNAL = "f.rating IS NULL AND f.thumbs IS NULL AND r.quality_score IS NULL AND f.hallucinated IS NULL"
_CODE = (
    "CASE WHEN r.id IS NULL THEN 0"
    " WHEN f.rating >= '' OR r.quality_score >= '' OR f.hallucinated NOT IN (0, 1) THEN 99"
    " WHEN f.rating <= ? OR f.thumbs = -1 OR f.hallucinated = 1 THEN CASE WHEN f.correction IS NULL THEN 1 ELSE 10 END"
    " WHEN f.rating >= ? OR f.thumbs = 1 OR r.quality_score >= ? THEN 11"
    f" WHEN f.correction IS NOT NULL THEN CASE WHEN {_NO_SIGNAL} THEN 12 ELSE 13 END"
    f" WHEN {_NO_SIGNAL} THEN 2 ELSE 3 END"
)
# (code, id, output, correction, input JSON, created_at, feedback_at)
_STORE_COLUMNS = f"{_CODE}, r.id, r.output, f.correction, r.input, r.created_at, f.created_at"


def _sql_number(value: Any) -> bool:
    """A value SQLite compares exactly as Python does: an int (in SQLite's range) or a float
    that is not NaN (SQLite binds NaN as NULL)."""
    if type(value) in (int, bool):
        return -(1 << 63) <= value < (1 << 63)
    return type(value) is float and value == value


def _store_readable(rows: Any, rules: ExtractionRules) -> bool:
    """``rows`` is ``FeedbackStore.rows()`` (not yet read from, without a limit) and the
    rules' thresholds are numbers SQL compares as Python does."""
    store = sys.modules.get("cl_release.store.sqlite")  # loaded if rows come from a store
    if store is None or type(rows) is not store.StoreRows or not rows.selectable:
        return False
    threshold = rules.quality_threshold
    return (_sql_number(rules.min_rating) and _sql_number(rules.max_negative_rating)
            and (threshold is None or _sql_number(threshold)))


def _store_rows(rows: Any, rules: ExtractionRules, created: tuple[str | None, str | None] = (None, None),
                ) -> tuple[Generator[list[tuple], None, None], list[int]] | None:
    """When ``rows`` is ``FeedbackStore.rows()`` (not yet read from, without a limit) and the
    rules' thresholds are numbers: the chunks of ``_STORE_COLUMNS`` tuples of the rows that
    need Python (of those ``created`` in a range, see ``StoreRows.select``), and the counts
    of the settled rows (by code; complete once the chunks are read). Else None."""
    if not _store_readable(rows, rules):
        return None
    settled = [0] * len(_SETTLED)

    def keep(code: int) -> int:  # called by SQLite once per record: settled rows stay there
        if code < 10:
            settled[code] += 1
            return 0
        return 1

    params = [rules.max_negative_rating, rules.min_rating, rules.quality_threshold]
    chunks = rows.select(_STORE_COLUMNS, params, keep=(_CODE, params, keep), created=created, ordered=True)
    return None if chunks is None else (chunks, settled)


class _OddRow(Exception):
    """A store row the SQL classification cannot settle exactly (code 99)."""


@dataclass
class _Part:
    """What ``_store_entries`` read from (a shard of) the store: the entries after dedupe
    within the part, their dedupe keys (same order; None without dedupe), rows read, skip
    counts, and what ``_finish``'s shape is made of (every id a str, the set of created_at
    lengths, -1 for a non-string created_at or feedback time, every prompt one string)."""

    entries: list[tuple]
    keys: list[str] | None
    rows: int
    skipped: dict[str, int]
    str_ids: bool
    created_lengths: set[int]
    one_turn: bool

    @property
    def shape(self) -> tuple[bool, bool, bool]:
        lengths = self.created_lengths
        return self.str_ids, len(lengths) == 1 and -1 not in lengths, self.one_turn


def _store_entries(chunks: Iterable[list[tuple]], settled: list[int], rules: ExtractionRules) -> _Part:
    """``_entries`` for what ``_store_rows`` returns: the same entries, counts and shape.

    The rows SQL settled are only counted (``settled``, filled while the chunks are read);
    the others go through ``_entries``'s code from the string tests on (kept in step with
    it; tests/test_extract.py compares the two on varied stores). One difference: a newer
    duplicate moves its group to the end, so entries stay in the order the rows came in
    (SQL's output order, see ``_shard``). Raises :class:`_OddRow` on a row SQL could not
    classify exactly.
    """
    from orjson import loads  # the store parses ``input`` with orjson: the same values

    red = rules.redactor
    dedupe = rules.dedupe
    seen: dict[str, tuple] = {}
    setdefault = seen.setdefault
    out: list[tuple] = []
    append = out.append
    n = 0
    counts = dict.fromkeys(SKIP_REASONS, 0)
    id_types: set[type] = set()
    created_lengths: set[int] = set()
    one_turn = True
    for chunk in chunks:
        n += len(chunk)
        for code, rid, output, correction, prompt, created, rated in chunk:
            if code < 10:  # settled by SQL (``keep`` sends none of these back)
                counts[_SETTLED[code]] += 1
                continue
            if code == _NEGATIVE:
                if not (isinstance(correction, str) and correction.strip()):
                    counts["negative_without_correction"] += 1
                    continue
                source = CORRECTED
                answer = correction
            elif code == _POSITIVE:
                answer = output
                if not (isinstance(answer, str) and answer.strip()):
                    counts["empty_output"] += 1
                    continue
                source = KEPT
            elif code == _ODD:
                raise _OddRow(rid)
            else:
                if isinstance(correction, str) and correction.strip():
                    counts["unrated_correction"] += 1
                elif code == _CORRECTION_ONLY:
                    counts["no_feedback"] += 1
                else:
                    counts["neutral"] += 1
                continue
            prompt = loads(prompt)
            # from here on as in _entries
            if type(prompt) is str:  # the common case: one user turn
                if not prompt.strip():
                    counts["empty_input"] += 1
                    continue
                if ("<|" in prompt or "<|" in answer) and (_control(prompt) or _control(answer)):
                    counts["control_tokens"] += 1
                    continue
                if red is not None:
                    prompt = red(prompt)
                    answer = red(answer)
                key = fold_text(f"user\x1f{prompt}\x1eassistant\x1f{answer}") if dedupe else None
            else:
                prompt = _prompt(prompt)
                if type(prompt) is str:
                    counts[prompt] += 1
                    continue
                if _control(answer) or any(_control(m["content"]) for m in prompt):
                    counts["control_tokens"] += 1
                    continue
                one_turn = False
                if red is not None:
                    for m in prompt:
                        m["content"] = red(m["content"])
                    answer = red(answer)
                key = normalized_text({"messages": [*prompt, {"role": "assistant", "content": answer}]}) if dedupe else None
            created = created or ""
            id_types.add(type(rid))
            created_lengths.add(len(created) if type(created) is str else -1)
            if rated is not None and type(rated) is not str:
                created_lengths.add(-1)  # a feedback time that is not a string: not plain either
            entry = (created, rid, rated or created, source, prompt, answer)
            if key is None:
                append(entry)
                continue
            other = setdefault(key, entry)
            if other is not entry:
                counts["duplicate"] += 1
                if _newest(entry) > _newest(other):
                    # to the end: the rows come in output order, so the kept entries stay in it
                    del seen[key]
                    seen[key] = entry
    n += sum(settled)  # the rows SQL kept back
    for reason, count in zip(_SETTLED, settled):
        counts[reason] += count
    keys = None
    if dedupe:
        out = list(seen.values())
        keys = list(seen)
    skipped = {reason: count for reason, count in counts.items() if count}
    return _Part(out, keys, n, skipped, id_types <= {str}, created_lengths, one_turn)


def _sorted_ids(ids: Iterable[Any]) -> list[Any]:
    ids = list(ids)
    if set(map(type, ids)) <= {str}:
        return sorted(ids)
    return sorted(ids, key=_id_key)


if _orjson is not None:

    def _dump_record(record: dict[str, Any]) -> bytes:
        return _orjson.dumps(record, option=_SORT)

    def _json_bodies(texts: list[str] | tuple[str, ...]) -> list[bytes]:
        """``[orjson.dumps(t)[1:-1] for t in texts]`` (each string's JSON form without its
        quotes, exactly as the serializer writes it inside a record), from one dump of the
        whole list split at its '","' separators.

        The split is exact when no text holds a '"': then every '"' of the dump is a
        string's delimiter, so each '","' is a separator or starts at an opening delimiter
        (a text that is exactly ","), and scanning left to right takes the separator, which
        starts two bytes earlier, first. A '"' in a text shows as '\\"' in the dump (so
        does a text ending in a backslash); texts with a '"' are then dumped alone.
        """
        if not texts:
            return []
        dumped = _orjson.dumps(texts)
        if b'\\"' in dumped:
            quoted = [i for i, t in enumerate(texts) if '"' in t]
            if quoted:
                plain = list(texts)
                for i in quoted:
                    plain[i] = ""
                bodies = _json_bodies(plain)
                for i in quoted:
                    bodies[i] = _orjson.dumps(texts[i])[1:-1]
                return bodies
        bodies = dumped[2:-2].split(b'","')
        if len(bodies) != len(texts):  # pragma: no cover - ruled out above
            raise AssertionError("JSON string split mismatch")
        return bodies

else:  # pragma: no cover

    def _dump_record(record: dict[str, Any]) -> bytes:
        return canonical_json(record).encode("utf-8")

    def _json_bodies(texts: list[str] | tuple[str, ...]) -> list[bytes]:
        return [json.dumps(t, ensure_ascii=False)[1:-1].encode("utf-8") for t in texts]


# A one-turn example in the messages format, canonical JSON (keys sorted: content < role):
# _MSG_HEAD + body(prompt) + _MSG_MID + body(answer) + _MSG_TAIL.
_MSG_HEAD = b'{"messages":[{"content":"'
_MSG_MID = b'","role":"user"},{"content":"'
_MSG_TAIL = b'","role":"assistant"}]}'


def _lines(entries: list[tuple], fmt: str, columns: list[tuple], one_turn: bool) -> list[bytes]:
    """Each entry's record as canonical JSON (``dump_jsonl`` of it, without the newline).

    One-turn examples in the messages format are put together from the JSON forms of their
    two strings (``_json_bodies``) without building a record; the loop runs in C (map,
    zip) when every example is one-turn. ``columns``: the entries' fields, ``zip(*entries)``.
    """
    if fmt != "messages":  # the same, from each record's strings (keys sorted as shown)
        records = [format_example(_messages(e), fmt) for e in entries]
        if fmt == "alpaca":
            fields = [_json_bodies([r[k] for r in records]) for k in ("input", "instruction", "output")]
            return list(map(b"".join, zip(repeat(b'{"input":"'), fields[0], repeat(b'","instruction":"'), fields[1],
                                          repeat(b'","output":"'), fields[2], repeat(b'"}'))))
        bodies = _json_bodies([r["text"] for r in records])  # chatml, completion: {"text": ...}
        return list(map(b"".join, zip(repeat(b'{"text":"'), bodies, repeat(b'"}'))))
    prompts = columns[_PROMPT]
    if not one_turn:
        prompts = [p if type(p) is str else "" for p in prompts]
    pb = _json_bodies(prompts)
    ab = _json_bodies(columns[_ANSWER])
    if one_turn:
        return list(map(b"".join, zip(repeat(_MSG_HEAD), pb, repeat(_MSG_MID), ab, repeat(_MSG_TAIL))))
    return [
        b"".join((_MSG_HEAD, p, _MSG_MID, a, _MSG_TAIL)) if type(e[_PROMPT]) is str
        else _dump_record({"messages": _messages(e)})
        for e, p, a in zip(entries, pb, ab)
    ]


def _jsonl(lines: list[bytes]) -> bytes:
    return b"\n".join(lines) + b"\n" if lines else b""


def _manifest(fmt: str, rules: ExtractionRules, data: bytes, cdata: bytes, examples: int, skipped: dict[str, int],
              rows_read: int, window: tuple, record_ids: list, correction_ids: list) -> dict[str, Any]:
    n_corr = len(correction_ids)
    return {
        "manifest_version": MANIFEST_VERSION,
        "format": fmt,
        "examples": examples,
        "bytes": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
        "sources": {KEPT: examples - n_corr, CORRECTED: n_corr},
        "skipped": dict(sorted(skipped.items())),
        "rows_read": rows_read,
        "window": {"first_created_at": window[0], "last_created_at": window[1]},
        "record_ids": record_ids,
        "corrections": {
            "examples": n_corr,
            "sha256": hashlib.sha256(cdata).hexdigest(),
            "record_ids": correction_ids,
        },
        "rules": {**rules.to_dict(), "format": fmt},
    }


def _make(entries: list[tuple], fmt: str, is_correction: list[bool]) -> tuple[list, list]:
    """The examples (as dicts) of sorted entries, and those that are corrections."""
    if fmt == "messages":
        examples = [{"messages": _messages(e)} for e in entries]
    else:
        examples = [format_example(_messages(e), fmt) for e in entries]
    return examples, list(compress(examples, is_correction))


def _finish(entries: list[tuple], skipped: dict[str, int], rows_read: int, rules: ExtractionRules, fmt: str,
            shape: tuple[bool, bool, bool] = (False, False, False)) -> BuildResult:
    """Sort, serialise and describe the entries; ``shape`` as ``_entries`` returns it."""
    str_ids, fixed_created, one_turn = shape
    # Stable sort by (created_at, id key). When every id is a string the plain id sorts the
    # same as its key, and when every created_at is a string of one length (the store's fixed
    # format) ``created_at + id`` sorts exactly as the pair does: one fresh, compact string
    # per entry compares ~3x faster than tuples of strings scattered over the rows' memory.
    window = None
    if str_ids:
        # equal string ids are indistinguishable, so the id list may be sorted before the
        # entries: still in input order, which is usually close to id order (fast for timsort)
        record_ids = sorted(map(itemgetter(_ID), entries))
        if fixed_created and entries:
            entries.sort(key=lambda e: e[_CREATED] + e[_ID])
            # sorted by created_at, all empty or none: the window is the first and the last
            first, last = entries[0][_CREATED], entries[-1][_CREATED]
            window = (first, last) if first else (None, None)
        else:
            entries.sort(key=itemgetter(_CREATED, _ID))
    else:
        entries.sort(key=lambda e: (e[_CREATED], _id_key(e[_ID])))
        record_ids = _sorted_ids(e[_ID] for e in entries)
    # the entries' fields as columns, in one pass (one pass per field costs 3x as much)
    columns = list(zip(*entries)) if entries else [()] * 6
    is_correction = list(map(CORRECTED.__eq__, columns[_SOURCE]))
    correction_ids = _sorted_ids(compress(columns[_ID], is_correction))
    if window is None:
        times = [c for c in columns[_CREATED] if c]
        window = (min(times), max(times)) if times else (None, None)
    lines = _lines(entries, fmt, columns, one_turn)
    del columns
    data = _jsonl(lines)
    cdata = _jsonl(list(compress(lines, is_correction)))
    del lines
    manifest = _manifest(fmt, rules, data, cdata, len(entries), skipped, rows_read, window, record_ids, correction_ids)

    return BuildResult._lazy(lambda: _make(entries, fmt, is_correction), manifest, data, cdata)


def build(rows: Iterable[dict[str, Any]], rules: ExtractionRules | None = None, fmt: str | None = None, *,
          workers: int | None = None) -> BuildResult:
    """Extract, redact, dedupe, sort and format ``rows``; deterministic to the byte.

    ``rows`` from ``FeedbackStore.rows(...)`` (unread, without ``limit``) are read through
    the store's SQL, with the same result (bench/RESULTS-data.md). The store build does not
    parse ``metadata`` (the build never uses it), nor the ``input`` of rows the rules skip.
    It reads a large store (:data:`PARALLEL_BUILD_RECORDS` records or more) in ``workers``
    processes at once, each taking one shard of the records (default: one per core, at
    most :data:`MAX_BUILD_WORKERS`; 1: none), with the same result to the byte.
    """
    rules = rules or ExtractionRules()
    fmt = fmt or rules.format
    if fmt not in FORMATS:
        raise UserError(f"unknown format {fmt!r}", hint=f"use one of {', '.join(FORMATS)}")
    if workers is not None and workers < 1:
        raise UserError(f"workers must be at least 1, got {workers}")
    with _gc_paused():
        result = _store_build(rows, rules, fmt, workers)
        if result is not None:
            return result
        skipped: dict[str, int] = {}
        try:
            entries, n, shape = _entries(rows, rules, skipped)
        except _BadValue as e:
            store = getattr(rows, "store", None)
            raise DataError(
                getattr(store, "path", "feedback rows"), f"record {e.rid!r}: {e.value!r} is not a number",
                field=e.field, hint="fix or delete the record's feedback; cl-release only stores numbers there",
            ) from None
        return _finish(entries, skipped, n, rules, fmt, shape)


def _store_build(rows: Any, rules: ExtractionRules, fmt: str, workers: int | None) -> BuildResult | None:
    """``build`` of ``FeedbackStore.rows()`` through SQL (in shards, by forked processes,
    when ``_build_workers`` says so). None: read the dicts instead (not a store's rows, or
    a value SQL cannot classify exactly)."""
    if not _store_readable(rows, rules):
        return None
    shards = _build_workers(rows, workers)
    try:
        if shards > 1:
            with _sharded(rows, rules, fmt, shards) as parts:
                if parts is not None:
                    with contextlib.suppress(_WorkerLost):
                        return _combine(parts, rules, fmt)
        # one process (or a worker could not finish): read it all here
        return _combine([_shard(rows, rules, fmt, (None, None))], rules, fmt)
    except _OddRow:  # data the schema should have refused: read the dicts instead
        return None


# ---------------------------------------------------------------- the store build in shards
#
# A large store is read in n shards, consecutive ranges of created_at (about equal counts;
# ``StoreRows.created_bounds``): shard 0 by this process, the others by forked workers.
# Each does what one process does for its records (classify, redact, fold, dedupe within
# the shard), sorts its examples and serialises them (``_Shard``), so that the output is
# the shards' data one after the other: output order is (created_at, id). What is left
# for this process is the dedupe groups that span shards (the newest row stays, as in one
# process: ids are unique, so every group has one newest row; each merge is one more
# duplicate), found through the keys' hashes, then checked on the keys themselves. A
# worker sends its shard as bytes (no pickle). One process goes through the same steps
# with one shard. Same bytes either way: tests/test_extract.py.

PARALLEL_BUILD_RECORDS = 100_000  # smaller stores are read by one process
MAX_BUILD_WORKERS = 8


@dataclass
class _Shard:
    """One shard's examples in output order: ``data`` (their JSON lines; line ``i`` starts
    at ``offsets[i]``, n + 1 offsets), the corrections among them (``cdata``, line ``j`` at
    ``coffsets[j]``, example ``cindex[j]``), ``created`` (created_at per example),
    ``hashes`` (of the dedupe keys; None without dedupe), all ids and the correction ids,
    sorted; rows read and skip counts. ``plain``: every id and time is a string (a shard
    that is not stays in one process, so shards that are combined are all plain).

    ``ask(hashes)`` starts a request for ``[i, key, time, created_at, id]`` of each example
    whose key hash is in ``hashes`` (what a dedupe group spanning shards is decided on) and
    returns the function that waits for the answer: a worker computes its answer while this
    process computes its own (see ``_shard_worker``)."""

    data: bytes
    offsets: Any  # array('q')
    cdata: bytes
    coffsets: Any  # array('q')
    cindex: Any  # array('q')
    created: list
    hashes: list[int] | None
    ids: list
    correction_ids: list
    rows: int
    skipped: dict[str, int]
    ask: Callable[[set[int]], Callable[[], list[list]]]
    plain: bool = True

    def __len__(self) -> int:
        return len(self.offsets) - 1

    _ARRAYS = ("offsets", "coffsets", "cindex")

    def to_messages(self) -> list[bytes]:
        """The shard as bytes messages, for a pipe (no pickle), ``ask`` left out."""
        head = _orjson.dumps({"created": self.created, "ids": self.ids, "correction_ids": self.correction_ids,
                              "rows": self.rows, "skipped": self.skipped, "dedupe": self.hashes is not None})
        hashes = b"" if self.hashes is None else _array("q", self.hashes).tobytes()
        return [head, self.data, self.cdata, hashes, *(getattr(self, k).tobytes() for k in self._ARRAYS)]

    @classmethod
    def from_messages(cls, messages: list[bytes], ask: Callable[[set[int]], Callable[[], list[list]]]) -> "_Shard":
        head, data, cdata, hashes, offsets, coffsets, cindex = messages
        h = _orjson.loads(head)
        return cls(data, _array("q", offsets), cdata, _array("q", coffsets), _array("q", cindex), h["created"],
                   _array("q", hashes).tolist() if h["dedupe"] else None, h["ids"], h["correction_ids"], h["rows"],
                   h["skipped"], ask)


def _array(code: str, raw: Any) -> Any:
    """``array(code)`` of bytes (``frombytes``) or of an iterable of numbers."""
    from array import array

    if isinstance(raw, (bytes, bytearray)):
        a = array(code)
        a.frombytes(raw)
        return a
    return array(code, raw)


def _line_offsets(lines: list[bytes]) -> Any:
    """Where each of ``_jsonl(lines)``'s lines starts, and its end."""
    from itertools import accumulate

    return _array("q", accumulate(map((1).__add__, map(len, lines)), initial=0))


def _shard(rows: Any, rules: ExtractionRules, fmt: str, created: tuple[str | None, str | None]) -> _Shard:
    """Read, classify, dedupe, sort and serialise the records created in ``created``."""
    store = _store_rows(rows, rules, created)
    assert store is not None  # checked by _store_build
    chunks, settled = store
    try:
        part = _store_entries(chunks, settled, rules)
    finally:
        chunks.close()
    entries, keys = part.entries, part.keys
    # SQL sent the rows in output order, (created_at, id), and the entries kept that order
    # (``_store_entries``). Python compares strings as SQLite does (code points, UTF-8 bytes);
    # other types (only outside cl-release: blobs) are sorted here.
    plain = part.str_ids and -1 not in part.created_lengths
    if not plain:
        key = _sort_key(part.str_ids, part.shape[1])
        if keys is None:
            entries.sort(key=key)
        elif entries:  # sort the keys along
            pairs = list(zip(entries, keys))
            pairs.sort(key=lambda pair: key(pair[0]))
            entries, keys = map(list, zip(*pairs))
            del pairs
    columns = list(zip(*entries)) if entries else [()] * 6
    lines = _lines(entries, fmt, columns, part.one_turn)
    is_correction = list(map(CORRECTED.__eq__, columns[_SOURCE]))
    clines = list(compress(lines, is_correction))
    out_ids, times, created_at = columns[_ID], columns[_TIME], list(columns[_CREATED])
    hashes = None if keys is None else list(map(hash, keys))

    def ask(wanted: set[int]) -> Callable[[], list[list]]:
        assert keys is not None and hashes is not None
        found = [[i, keys[i], is_correction[i], times[i], created_at[i], out_ids[i]]
                 for i in compress(range(len(hashes)), map(wanted.__contains__, hashes))]
        return lambda: found

    order = sorted if plain else _sorted_ids  # plain: every id a string
    return _Shard(
        _jsonl(lines), _line_offsets(lines), _jsonl(clines), _line_offsets(clines),
        _array("q", compress(range(len(lines)), is_correction)), created_at, hashes,
        order(out_ids), order(compress(out_ids, is_correction)), part.rows, part.skipped, ask, plain,
    )


def _sort_key(str_ids: bool, fixed_created: bool) -> Callable[[tuple], Any]:
    """Output order: (created_at, id key). With string ids the plain id sorts as its key,
    and with created_at strings of one length ``created_at + id`` sorts as the pair does:
    one compact string per entry compares ~3x faster than a tuple."""
    if str_ids:
        if fixed_created:
            return lambda e: e[_CREATED] + e[_ID]
        return itemgetter(_CREATED, _ID)
    return lambda e: (e[_CREATED], _id_key(e[_ID]))


def _build_workers(rows: Any, workers: int | None) -> int:
    if workers is None:
        cores = parallel.cores()
        workers = min(cores, MAX_BUILD_WORKERS) if cores > 1 and rows.size_hint() >= PARALLEL_BUILD_RECORDS else 1
    return workers if workers > 1 and parallel.can_fork() else 1


class _WorkerLost(Exception):
    """A build worker stopped answering: read in one process instead."""


@contextlib.contextmanager
def _sharded(rows: Any, rules: ExtractionRules, fmt: str, shards: int) -> Generator[list[_Shard] | None, None, None]:
    """Each shard; shards 1.. read by forked workers, which stay (answering
    ``_Shard.ask``) until the block ends. None if a worker failed (the caller then
    reads in one process, and meets the same error, if any, itself)."""
    import multiprocessing

    bounds = rows.created_bounds(shards)
    ranges = list(zip([None, *bounds], [*bounds, None]))
    ctx = multiprocessing.get_context("fork")  # the keys' hashes are compared across processes
    procs, pipes = [], []
    try:
        for k in range(1, len(ranges)):
            here, there = ctx.Pipe()
            # the worker closes its copies of this process's ends, or it would never see EOF
            proc = ctx.Process(target=_shard_worker, args=(there, [here, *pipes], rows, rules, fmt, ranges[k]),
                               name=f"cl-release-build-{k}")
            proc.start()
            there.close()
            procs.append(proc)
            pipes.append(here)
        yield _gather(pipes, _shard(rows, rules, fmt, ranges[0]))
    finally:
        for pipe in pipes:
            pipe.close()  # the worker's recv ends: it exits
        for proc in procs:
            proc.join(timeout=5)
            if proc.is_alive():
                proc.terminate()
                proc.join()


def _gather(pipes: list, own: _Shard) -> list[_Shard] | None:
    """This process's shard and the workers' (raises _OddRow if one met an odd row)."""
    parts, odd = [own], False
    for pipe in pipes:
        try:
            status = pipe.recv_bytes()
        except EOFError:  # the worker died before sending its part
            return None
        if status.startswith(b"ok "):
            try:
                messages = [pipe.recv_bytes() for _ in range(int(status[3:]))]
            except EOFError:
                return None
            parts.append(_Shard.from_messages(messages, _ask(pipe)))
        elif status == b"odd":
            odd = True
        else:
            return None
    if odd:
        raise _OddRow(None)
    return parts if own.plain else None


def _ask(pipe: Any) -> Callable[[set[int]], Callable[[], list[list]]]:
    """``_Shard.ask`` of a worker's shard: the request goes out at once, the answer is read
    when waited for."""

    def ask(wanted: set[int]) -> Callable[[], list[list]]:
        try:
            pipe.send_bytes(_array("q", wanted).tobytes())
        except OSError:
            raise _WorkerLost() from None

        def answer() -> list[list]:
            try:
                return _orjson.loads(pipe.recv_bytes())
            except (EOFError, OSError):
                raise _WorkerLost() from None

        return answer

    return ask


def _shard_worker(pipe: Any, others: list, rows: Any, rules: ExtractionRules, fmt: str, created: tuple) -> None:
    """A forked worker: read one shard, send b"ok N" and the shard in N messages, b"odd"
    (see _OddRow), or b"failed: why" (the parent then reads everything itself). Then answer
    ``ask`` requests (a set of hashes in, JSON out) until the pipe closes.
    ``others``: the parent's pipe ends, closed here at once."""
    for end in others:
        end.close()
    try:
        try:
            shard = _shard(rows, rules, fmt, created)
        except _OddRow:
            pipe.send_bytes(b"odd")
            return
        if not shard.plain:  # values only found outside cl-release (blobs): one process reads them
            pipe.send_bytes(b"failed: not plain")
            return
        messages = shard.to_messages()
        pipe.send_bytes(b"ok %d" % len(messages))
        for m in messages:
            pipe.send_bytes(m)
        del messages
        while True:
            try:
                wanted = pipe.recv_bytes()
            except EOFError:
                return
            pipe.send_bytes(_orjson.dumps(shard.ask(set(_array("q", wanted)))()))
    except BaseException as e:  # never a traceback from a child: the parent reads it itself
        with contextlib.suppress(OSError):
            pipe.send_bytes(b"failed: " + f"{type(e).__name__}: {e}".encode("utf-8", "replace"))
    finally:
        pipe.close()


def _runs(blob: bytes, offsets: Any, dropped: list[int]) -> list[bytes]:
    """``blob`` (lines at ``offsets``) without the lines ``dropped`` (ascending): the runs
    of lines between them."""
    runs, start = [], 0
    for i in dropped:
        runs.append(blob[offsets[start]:offsets[i]])
        start = i + 1
    runs.append(blob[offsets[start]:offsets[-1]])
    return runs


def _combine(shards: list[_Shard], rules: ExtractionRules, fmt: str) -> BuildResult:
    """One build from the shards (in created_at order): dedupe groups merged across shards,
    then the shards' data one after the other, manifest made."""
    from bisect import bisect_left
    from itertools import filterfalse

    skipped: dict[str, int] = {}
    for shard in shards:
        for reason, count in shard.skipped.items():
            skipped[reason] = skipped.get(reason, 0) + count
    dropped: list[list[int]] = [[] for _ in shards]
    gone: list[set] = [set() for _ in shards]  # the ids of dropped examples
    if rules.dedupe and len(shards) > 1:
        # key hashes seen in more than one shard; then the examples with those hashes,
        # grouped by their exact key (equal hashes but different keys: two groups)
        seen: set[int] = set(shards[0].hashes)
        repeated: set[int] = set()
        for shard in shards[1:]:
            repeated.update(seen.intersection(shard.hashes))
            if shard is not shards[-1]:
                seen.update(shard.hashes)
        del seen
        if repeated:
            answers = [shard.ask(repeated) for shard in reversed(shards)]  # workers first
            answers.reverse()
            best: dict[str, tuple] = {}  # key -> (priority, shard, index) of the one that stays so far
            for k, answer in enumerate(answers):
                for i, key, corrected, time, created, rid in answer():
                    mine = ((corrected, time, created, rid), k, i)  # as _newest; plain shards: string ids
                    other = best.setdefault(key, mine)
                    if other is not mine:
                        if mine[0] > other[0]:
                            best[key], mine = mine, other
                        dropped[mine[1]].append(mine[2])
                        gone[mine[1]].add(mine[0][3])
        duplicates = sum(map(len, dropped))
        if duplicates:
            skipped["duplicate"] = skipped.get("duplicate", 0) + duplicates
    pieces: list[bytes] = []
    cpieces: list[bytes] = []
    record_ids: list = []
    correction_ids: list = []
    examples = 0
    first = last = None
    marks = []  # (examples, correction indexes, dropped indexes) per shard: which examples are corrections
    for shard, drop, ids_gone in zip(shards, dropped, gone):
        drop.sort()
        skip = set(drop)
        n = len(shard)
        pieces += _runs(shard.data, shard.offsets, drop) if drop else [shard.data]
        cindex = shard.cindex
        cdrop = [j for j in (bisect_left(cindex, i) for i in drop) if j < len(cindex) and cindex[j] in skip]
        cpieces += _runs(shard.cdata, shard.coffsets, cdrop) if cdrop else [shard.cdata]
        examples += n - len(drop)
        marks.append((n, cindex, drop))
        record_ids += filterfalse(ids_gone.__contains__, shard.ids) if ids_gone else shard.ids
        correction_ids += filterfalse(ids_gone.__contains__, shard.correction_ids) if ids_gone else shard.correction_ids
        # created_at window: output order is created_at order ('' first)
        created = shard.created
        head = next((c for i, c in enumerate(created) if c and i not in skip), None)
        if head is not None:
            first = head if first is None else first
            last = next(created[i] for i in range(n - 1, -1, -1) if i not in skip)
    if len(shards) > 1:  # sorted runs of strings (plain shards), one per shard: timsort merges them
        record_ids, correction_ids = sorted(record_ids), sorted(correction_ids)
    data = b"".join(pieces)
    del pieces
    cdata = b"".join(cpieces)
    manifest = _manifest(fmt, rules, data, cdata, examples, skipped, sum(s.rows for s in shards),
                         (first, last), record_ids, correction_ids)

    def make() -> tuple[list, list]:
        corrected = bytearray()
        for n, cindex, drop in marks:
            mark = bytearray(n)
            for i in cindex:
                mark[i] = 1
            if drop:
                skip = set(drop)
                mark = bytearray(b for i, b in enumerate(mark) if i not in skip)
            corrected += mark
        return _examples_of(data, corrected, fmt)

    return BuildResult._lazy(make, manifest, data, cdata)


def _examples_of(data: bytes, corrected: bytes, fmt: str) -> tuple[list, list]:
    """``_make``'s examples, from the output lines (same dicts, keys in the same order)."""
    records = list(map(_orjson.loads, data.split(b"\n")[:-1]))
    if fmt == "messages":
        examples = [{"messages": [{"role": m["role"], "content": m["content"]} for m in r["messages"]]}
                    for r in records]
    elif fmt == "alpaca":
        examples = [{"instruction": r["instruction"], "input": r["input"], "output": r["output"]} for r in records]
    else:
        examples = records  # {"text": ...}
    return examples, list(compress(examples, corrected))


@contextlib.contextmanager
def _gc_paused():
    """Pause the cyclic garbage collector: a build allocates millions of small acyclic
    objects, and the collector rescanning them costs ~20% of a large build.

    On the way out the objects made meanwhile (and any other young ones) are moved to the
    oldest generation with ``gc.freeze(); gc.unfreeze()``: two list splices, instead of the
    next young collection walking them all (1-2 s after a million rows). They stay tracked,
    and a full collection still examines them. Skipped when the caller has frozen objects
    of its own, which ``unfreeze`` would release.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            if gc.get_freeze_count() == 0:
                gc.freeze()
                gc.unfreeze()
            gc.enable()


def corrections_only(result: BuildResult) -> BuildResult:
    """The corrections of ``result`` as a build of their own (a PATCH release's data)."""
    m = result.manifest
    skipped = dict(m["skipped"])
    skipped["not_a_correction"] = m["sources"][KEPT]
    manifest = {
        **m,
        "examples": m["corrections"]["examples"],
        "bytes": len(result.corrections_data),
        "sha256": m["corrections"]["sha256"],
        "sources": {KEPT: 0, CORRECTED: m["corrections"]["examples"]},
        "skipped": dict(sorted(skipped.items())),
        "record_ids": list(m["corrections"]["record_ids"]),
        "corrections_only": True,
    }

    def make() -> tuple[list, list]:
        corrections = list(result.corrections)
        return corrections, corrections

    return BuildResult._lazy(make, manifest, result.corrections_data, result.corrections_data)


# ---------------------------------------------------------------- time windows


def within(rows: Iterable[dict[str, Any]], since: str | None = None, until: str | None = None):
    """Rows as ``FeedbackStore.rows`` selects them: created (or given feedback) at or after
    ``since``, created before ``until`` (normalized times)."""
    for row in rows:
        if not isinstance(row, dict):
            yield row  # counted as invalid_row by build
            continue
        created = normalize_time(row["created_at"]) if row.get("created_at") else ""
        rated = normalize_time(row["feedback_at"]) if row.get("feedback_at") else ""
        if (since is None or created >= since or rated >= since) and (until is None or created < until):
            yield row


def extract_since(
    store,
    since: str | _dt.datetime | None,
    rules: ExtractionRules | None = None,
    *,
    bump: str = "minor",
    until: str | _dt.datetime | None = None,
) -> BuildResult:
    """New data for a release whose parent was released at ``since``.

    MINOR (and MAJOR): every usable row recorded since the parent. PATCH: only the
    corrections since the parent (``corrections_only``). ``store`` is anything with
    ``rows(since=..., until=...)`` (the FeedbackStore).
    """
    if bump not in ("major", "minor", "patch"):
        raise UserError(f"unknown bump {bump!r}", hint="use major, minor or patch")
    s = normalize_time(since) if since is not None else None
    u = normalize_time(until) if until is not None else None
    result = build(store.rows(since=s, until=u), rules)
    if bump == "patch":
        result = corrections_only(result)
    result.manifest["query"] = {"since": s, "until": u, "bump": bump}
    return result


def extract_unused(
    store,
    used_by: Iterable[str],
    rules: ExtractionRules | None = None,
    *,
    bump: str = "minor",
    until: str | _dt.datetime | None = None,
) -> BuildResult:
    """New data for a release built on the lineage ``used_by`` (its versions, root first):
    every usable row none of those versions trained on (the store's release marks), whenever
    it was logged. PATCH: only the corrections among them (``corrections_only``).

    Selecting by marks, not by time, trains each row once per lineage: rows logged before a
    patch that only took corrections stay new for the next MINOR, and after a rollback the
    rows only an abandoned branch trained on are new again.
    """
    if bump not in ("major", "minor", "patch"):
        raise UserError(f"unknown bump {bump!r}", hint="use major, minor or patch")
    versions = list(used_by)
    u = normalize_time(until) if until is not None else None
    result = build(store.rows(until=u, unused_by=versions), rules)
    if bump == "patch":
        result = corrections_only(result)
    result.manifest["query"] = {"unused_by": versions, "until": u, "bump": bump}
    return result


# ---------------------------------------------------------------- writing


def manifest_path(out: Path) -> Path:
    return out.with_name(out.name + ".manifest.json")


def corrections_path(out: Path) -> Path:
    stem = out.name[: -len(".jsonl")] if out.name.endswith(".jsonl") else out.name
    return out.with_name(stem + ".corrections.jsonl")


def write_build(result: BuildResult, out_path: str | Path, *, write_corrections: bool = True) -> dict[str, Path]:
    """Write the examples, the corrections (if any) and ``<out>.manifest.json`` atomically.

    Each file is replaced atomically; the manifest is written last, so a manifest always
    describes complete data files. Returns the paths written.
    """
    out = Path(out_path)
    paths = {"data": out, "manifest": manifest_path(out)}
    manifest = dict(result.manifest)
    manifest["path"] = out.name
    # the count, not ``result.corrections``: that would build every example's dict (seconds at 1M)
    if write_corrections and manifest["corrections"]["examples"] and not manifest.get("corrections_only"):
        cpath = corrections_path(out)
        atomic_write_bytes(cpath, result.corrections_data)
        manifest["corrections"] = {**manifest["corrections"], "path": cpath.name}
        paths["corrections"] = cpath
    atomic_write_bytes(out, result.data)
    atomic_write_json(paths["manifest"], manifest)
    return paths


# ---------------------------------------------------------------- the project's feedback


def resolve_since(project, text: str | None) -> str | None:
    """``--since``: a date/time, or a release version (its registry created_at)."""
    if text is None:
        return None
    if re.fullmatch(r"v?\d+\.\d+\.\d+", text.strip()):
        from ..registry import Registry

        return normalize_time(Registry(project.root).get(text)["created_at"])
    return normalize_time(text)


def feedback_rows(project, *, since: str | None = None, from_jsonl: Path | None = None):
    """Rows from ``from_jsonl`` (one feedback row per line) or the project's feedback store."""
    if from_jsonl is not None:
        rows = (obj for _, obj in iter_jsonl(from_jsonl, display=project.rel(from_jsonl)))
        return within(rows, since)
    path = project.feedback_path
    if not path.is_file():
        raise UserError(
            f"no feedback store at {project.rel(path)}",
            hint="log predictions and feedback first, or pass --from-jsonl FILE",
        )
    from ..store.sqlite import FeedbackStore  # written by the feedback module; imported lazily

    return FeedbackStore(path).rows(since=since)


def release_feedback(project, used_by: Iterable[str], *, bump: str, until: str | _dt.datetime) -> BuildResult | None:
    """What a release built on the lineage ``used_by`` takes from the project's feedback store
    (``extract_unused`` with the project's rules, chat format); None without a store. The one
    query behind ``plan`` and ``release`` and behind ``status``'s counts, so they agree."""
    path = project.feedback_path
    if not path.is_file():
        return None
    from ..store.sqlite import FeedbackStore  # written by the feedback module; imported lazily

    store = FeedbackStore(path)
    try:
        return extract_unused(store, used_by, rules_from_project(project, format="messages"), bump=bump, until=until)
    finally:
        store.close()


def build_project(
    project,
    *,
    since: str | None = None,
    out: Path | None = None,
    fmt: str | None = None,
    redact: bool | None = None,
    from_jsonl: Path | None = None,
    workers: int | None = None,
) -> tuple[BuildResult, dict[str, Path]]:
    """``cl-release data build``: rules from cl-release.yaml, rows from the store, files written.
    ``workers``: processes reading a large store (see :func:`build`).

    Default output: ``outputs/data/<sha256>.jsonl`` (content-addressed like snapshots, and
    git-ignored: ``release`` builds its own data and would refuse a dirty repository).
    """
    off = {"redact_patterns": ()} if redact is False else {}  # --no-redact: no redaction at all
    rules = rules_from_project(project, format=fmt, redact_pii=redact, **off)
    result = build(feedback_rows(project, since=resolve_since(project, since), from_jsonl=from_jsonl), rules,
                   workers=workers)
    if not result.manifest["examples"]:
        skipped = ", ".join(f"{k} {v}" for k, v in result.manifest["skipped"].items()) or "no rows"
        raise UserError(
            f"no training examples in the feedback ({skipped})",
            hint="collect ratings or corrections, or widen --since",
        )
    if out is None:
        out = project.root / DEFAULT_OUT_DIR / f"{result.sha256}.jsonl"
    return result, write_build(result, out)


# ---------------------------------------------------------------- validating files

def validate_data_file(path: Path, fmt: str = "messages", *, display: str | None = None,
                       max_chars: int | None = None) -> int:
    """Check every row of a training file (``fmt`` in FORMATS) or a regression suite (``suite``).

    ``max_chars``: the per-example size limit (``datasets.max_example_chars``); for a suite it
    bounds each test's prompt."""
    if fmt == "suite":
        from ..eval.runner import suite_rows  # the one suite parser the runner itself uses

        return len(suite_rows(Path(path), display=display, max_chars=max_chars))
    return len(read_records(Path(path), fmt, display=display, max_chars=max_chars))
