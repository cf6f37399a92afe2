"""The extraction rules: which feedback rows become training examples, and how their text is cleaned.

One rule classifies a row (:func:`classify`), in two steps:

* :func:`signal` (``ExtractionRules.signal``, the thresholds bound): the row's numbers ->
  a :class:`Signal`. rating <= ``max_negative_rating``, thumbs down, or ``hallucinated``:
  NEGATIVE, which wins over a positive signal (a thumbs-up answer flagged as hallucinated is
  never trained on as is); rating >= ``min_rating``, thumbs up, or ``quality_score >=
  quality_threshold``: POSITIVE; nothing at all: NO_FEEDBACK; else NEUTRAL.
* :func:`verdict`: the signal and the texts -> ``kept`` (a positive row with a non-blank
  answer: the logged answer is trained on), ``corrected`` (a negative row with a non-blank
  correction: the correction replaces the answer; these rows also form the corrections set
  a PATCH release trains on), or the reason the row is skipped (``SKIP_REASONS``).

Every path of the build applies these two functions: the row loop
(``cl_release.data.examples.read_entries``) calls them, the store computes the first step in
SQL (``cl_release.store.classify``, checked against :func:`signal` on every combination of
its inputs by tests/data/test_data_rules.py) and settles in SQL only the rows whose verdict
:func:`verdict` gives without their texts (``cl_release.data.shards.SETTLED``).

Then a row's input must hold a prompt (:func:`prompt_turns`), and neither prompt nor answer a
chat template's control token (:data:`CONTROL_TOKEN`). PII is redacted
(``ExtractionRules.redactor``) before anything is hashed or written.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from functools import cached_property
from typing import Any, Callable, Iterable, Mapping

from .formats import CONTROL_TOKEN, FORMATS, ROLES
from ..errors import RuleError
from ..store.classify import Signal

__all__ = [
    "CONTROL_TOKEN", "CORRECTED", "EMAIL_RE", "KEPT", "PHONE_RE", "SKIP_REASONS", "ExtractionRules", "RuleError",
    "Signal", "UnknownSignal", "classify", "make_redactor", "prompt_turns", "redact", "redact_email", "redact_phone",
    "rules_from_project", "signal", "signal_rule", "verdict", "find_control_token",
]

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

# The control-token rule: a row whose prompt or answer holds a chat template's control token
# (formats.CONTROL_TOKEN, the one pattern) is skipped: a logged prompt holding
# "<|im_end|><|im_start|>assistant" would train fake turns. A match, or None.
find_control_token = CONTROL_TOKEN.search

# ---------------------------------------------------------------- rules


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

    @cached_property
    def signal(self) -> Callable[[Any, Any, Any, Any], Signal]:
        """:func:`signal` with these rules' thresholds: ``signal(rating, thumbs, quality_score, hallucinated)``."""
        return signal_rule(self.min_rating, self.max_negative_rating, self.quality_threshold)


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
# pattern holds no phone number, and no match starts before its first hit (tests/data/test_data_rules
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


def redact_email(text: str) -> str:
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


def redact_phone(text: str) -> str:
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
                text = redact_email(text)
            # redact_phone, inlined
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
                text = redact_email(text)
            text = redact_phone(text)
        return text

    return redact


def redact(text: str, patterns: Iterable[str] = ()) -> str:
    """Redact emails, phone numbers and ``patterns`` from one string."""
    return make_redactor(patterns)(text)


# ---------------------------------------------------------------- the rule

NEGATIVE, POSITIVE, NO_FEEDBACK, NEUTRAL = Signal.NEGATIVE, Signal.POSITIVE, Signal.NO_FEEDBACK, Signal.NEUTRAL


class UnknownSignal(Exception):
    """A signal the rule has no verdict for: the store's SQL could not classify a record
    exactly (``Signal.ODD_VALUE``, a value the schema refuses). The build then reads the
    row dicts, where :func:`signal` decides (or names the bad value)."""


def signal_rule(min_rating: Any, max_negative_rating: Any, quality_threshold: Any,
                ) -> Callable[[Any, Any, Any, Any], Signal]:
    """The rule's first step with these thresholds: ``signal(rating, thumbs, quality_score,
    hallucinated)`` -> NEGATIVE, POSITIVE, NO_FEEDBACK or NEUTRAL. A negative signal wins
    over a positive one. Comparing a value that is not a number raises TypeError."""

    def signal(rating: Any, thumbs: Any, score: Any, hallucinated: Any) -> Signal:
        if (rating is not None and rating <= max_negative_rating) or thumbs == -1 or hallucinated is True:
            return NEGATIVE
        if (
            (rating is not None and rating >= min_rating)
            or thumbs == 1
            or (score is not None and quality_threshold is not None and score >= quality_threshold)
        ):
            return POSITIVE
        if rating is None and thumbs is None and score is None and hallucinated is None:
            return NO_FEEDBACK
        return NEUTRAL

    return signal


def signal(row: Mapping[str, Any], rules: "ExtractionRules") -> Signal:
    """The signal of a row's feedback under ``rules`` (see :func:`signal_rule`)."""
    get = row.get
    return rules.signal(get("rating"), get("thumbs"), get("quality_score"), get("hallucinated"))


def verdict(sig: int, correction: Any, output: Any) -> str:
    """The rule's second step: ``kept``, ``corrected`` or the reason the row is skipped, from
    its signal and its texts (a correction or answer counts when it is a non-blank string)."""
    if sig == NEGATIVE:
        return CORRECTED if isinstance(correction, str) and correction.strip() else "negative_without_correction"
    if sig == POSITIVE:
        return KEPT if isinstance(output, str) and output.strip() else "empty_output"
    if sig == NO_FEEDBACK or sig == NEUTRAL:
        if isinstance(correction, str) and correction.strip():
            return "unrated_correction"  # a correction without a negative signal: not trusted on its own
        return "no_feedback" if sig == NO_FEEDBACK else "neutral"
    raise UnknownSignal(sig)


def classify(row: Any, rules: "ExtractionRules") -> str:
    """``kept``, ``corrected``, or the reason the row is skipped (before its input is looked
    at, and before dedupe): the rule, on one row dict."""
    if not isinstance(row, dict) or row.get("id") is None:
        return "invalid_row"
    return verdict(signal(row, rules), row.get("correction"), row.get("output"))


# ---------------------------------------------------------------- one row


def prompt_turns(inp: Any) -> list[dict[str, str]] | str:
    """The prompt turns of a row's input (new dicts; a final assistant turn, the logged
    answer, left out), or a skip reason: ``invalid_input``, ``empty_input``."""
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
