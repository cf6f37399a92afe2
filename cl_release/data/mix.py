"""Which examples a release may still train on: corrections and newer answers retire older ones.

A correction, or a newer example for the same question (``datasets.prompt_key``: the turns
before the answer, case and whitespace folded), *retires* the examples that answer that
question otherwise, in every later mix of the lineage: new data, replay, a major's complete
data, the general set. Without this a replay or a full retrain brings the wrong fact back.

The rule (``mix.conflicts`` in cl-release.yaml) decides which answer lives:

- ``correction`` (default): a correction wins, then the newest;
- ``newest``: the newest wins, a correction only breaks a tie;
- ``error``: two live answers to one question refuse the plan.

"Newest" is the order of arrival in the lineage: an example trained by an earlier release is
older than one a later release trained, and the current plan's new data is the newest. Two
different answers of the same age (say, both in this quarter's domain files) cannot be ordered:
both stay, and ``plan`` warns about them (``error``: refuses).

A correction may also name other questions it answers (``supersedes`` in a corrections file,
``--supersedes`` on ``feedback add``): paraphrases the question key cannot see. Retirements are
kept: what an ancestor retired stays retired (unless a correction brings that very answer back).

``stale_values`` is a warning, not a rule: a live example whose question shares a rare word with
a corrected question and whose answer still states a value the correction replaced ("10 ppm")
is probably a paraphrase the correction should name.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Iterable

from . import formats as ds
from ..errors import UserError

CONFLICT_RULES = ("correction", "newest", "error")
DEFAULT_RULE = "correction"
MAX_SUPERSEDES = 100  # questions one correction may name
_WORD = re.compile(r"[^\W\d_]{4,}", re.UNICODE)


@dataclass
class Example:
    record: dict[str, Any]
    time: int  # order of arrival: lineage release index, len(lineage) for this plan; general: -1
    correction: bool
    source: str  # "1.0.0:new", "datasets/corrections/c1.jsonl", "feedback", ...
    hash: str = ""
    key: str | None = None

    def __post_init__(self) -> None:
        self.hash = ds.record_hash(self.record)
        self.key = ds.prompt_key(self.record)


@dataclass
class Resolution:
    """What the rule decided: ``retired`` (hash -> why), the conflicts it could not decide."""

    retired: dict[str, dict[str, Any]] = field(default_factory=dict)
    unresolved: list[dict[str, Any]] = field(default_factory=list)
    resolved: list[dict[str, Any]] = field(default_factory=list)  # conflicts decided this plan
    warnings: list[str] = field(default_factory=list)  # stale_values

    @property
    def new(self) -> dict[str, dict[str, Any]]:
        """The retirements this plan decides (``at`` None until the version is known)."""
        return {h: w for h, w in self.retired.items() if w.get("at") is None}

    def keep(self, records: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
        """``records`` without the retired ones."""
        return [r for r in records if ds.record_hash(r) not in self.retired]


def prompt_key_of(question: str) -> str:
    """The question key of a plain user question (what ``supersedes`` names)."""
    return ds.normalized_text({"messages": [{"role": "user", "content": question}]})


def check_supersedes(value: Any, *, path: str, line: int) -> list[str]:
    """A row's ``supersedes``: a list of question strings; their keys."""
    from ..errors import DataError

    if value is None:
        return []
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(q, str) and q.strip() for q in value):
        raise DataError(path, "must be a list of questions (non-empty strings)", line=line, field="supersedes")
    if len(value) > MAX_SUPERSEDES:
        raise DataError(path, f"names {len(value)} questions; at most {MAX_SUPERSEDES}", line=line, field="supersedes")
    return [prompt_key_of(q) for q in value]


def _short(record: dict[str, Any], role: str) -> str:
    msgs = record.get("messages") or []
    turns = [m["content"] for m in msgs if m["role"] == role]
    text = turns[-1] if turns else record.get("text", "")
    return text if len(text) <= 160 else text[:157] + "..."


def resolve(examples: list[Example], *, rule: str = DEFAULT_RULE, version: str | None,
            supersedes: Iterable[tuple[dict[str, Any], list[str], str]] = (),
            retired_before: dict[str, dict[str, Any]] | None = None) -> Resolution:
    """Decide, per question, which answer lives (see the module docstring).

    ``supersedes``: (the correction record, the question keys it names, its source).
    ``retired_before``: what the lineage retired already (kept retired, unless a correction of
    this plan is that very answer). ``version``: the release recording new retirements."""
    if rule not in CONFLICT_RULES:
        raise UserError(f"unknown mix.conflicts rule {rule!r}", hint=f"use one of: {', '.join(CONFLICT_RULES)}")
    res = Resolution()
    current_corrections = {e.hash for e in examples if e.correction}
    for h, why in (retired_before or {}).items():
        if h not in current_corrections:
            res.retired[h] = why
    groups: dict[str, list[Example]] = {}
    for e in examples:
        if e.key is not None and e.hash not in res.retired:
            groups.setdefault(e.key, []).append(e)
    rank = (lambda e: (e.correction, e.time)) if rule != "newest" else (lambda e: (e.time, e.correction))
    for key, group in groups.items():
        answers = {e.hash: e for e in group}
        if len(answers) < 2:
            continue
        best = max(rank(e) for e in answers.values())
        winners = {h: e for h, e in answers.items() if rank(e) == best}
        question = _short(group[0].record, "user")
        if len(winners) > 1 or rule == "error":
            res.unresolved.append({"question": question, "answers": sorted({_short(e.record, "assistant")
                                                                            for e in answers.values()}),
                                   "sources": sorted({e.source for e in answers.values()})})
            continue
        (win,) = winners.values()
        for h, e in answers.items():
            if h != win.hash:
                res.retired[h] = {"question": question, "answer": _short(e.record, "assistant"),
                                  "retired_by": win.hash, "by_answer": _short(win.record, "assistant"),
                                  "why": "correction" if win.correction and not e.correction else "newer",
                                  "at": version, "source": e.source}
        res.resolved.append({"question": question, "kept": _short(win.record, "assistant"),
                             "retired": len(answers) - 1})
    for record, keys, source in supersedes:  # record None: a feedback correction (its own answer is not retired)
        h = ds.record_hash(record) if record is not None else None
        by_answer = _short(record, "assistant") if record is not None else source
        for key in keys:
            for e in groups.get(key, []):
                if not e.correction and e.hash != h and e.hash not in res.retired:
                    res.retired[e.hash] = {"question": _short(e.record, "user"), "answer": _short(e.record, "assistant"),
                                           "retired_by": h or source, "by_answer": by_answer,
                                           "why": "supersedes", "at": version, "source": e.source}
    if rule == "error" and res.unresolved:
        first = res.unresolved[0]
        raise UserError(f"{len(res.unresolved)} questions have more than one live answer (mix.conflicts: error), "
                        f"e.g. {first['question']!r}: {' / '.join(first['answers'])}",
                        hint="correct or remove one answer, or set mix.conflicts to correction or newest")
    return res


def stale_values(live: list[Example], res: Resolution, *, max_share: float = 0.1) -> list[str]:
    """Warnings: a live example that probably still states a value a correction replaced.

    For each retirement by a correction or ``supersedes``: the values (numbers with units,
    ``incident.values``) of the retired answer that the new answer does not state, and the
    question's rare words (in at most ``max_share`` of the live questions). A live example whose
    question holds one of those words and whose answer states one of those values is named."""
    from ..release.incident import values

    questions = [e for e in live if e.key is not None and e.hash not in res.retired]
    if not questions:
        return []
    frequency: dict[str, int] = {}
    words_of = {}
    for e in questions:
        words = {w.casefold() for w in _WORD.findall(_short(e.record, "user"))}
        words_of[e.hash] = words
        for w in words:
            frequency[w] = frequency.get(w, 0) + 1
    limit = max(1, int(len(questions) * max_share))
    out, seen = [], set()
    for why in res.retired.values():
        if why.get("why") not in ("correction", "supersedes"):
            continue
        replaced = {v.casefold() for v in values(why["answer"])} - {v.casefold() for v in values(why["by_answer"])}
        rare = {w.casefold() for w in _WORD.findall(why["question"]) if frequency.get(w.casefold(), 0) <= limit}
        if not replaced or not rare:
            continue
        for e in questions:
            if e.hash == why["retired_by"] or e.hash in seen or not (words_of[e.hash] & rare):
                continue
            stated = {v.casefold() for v in values(_short(e.record, "assistant"))}
            if stated & replaced:
                seen.add(e.hash)
                out.append(f"{_short(e.record, 'user')!r} ({e.source}) still answers "
                           f"{', '.join(sorted(stated & replaced))}, which a correction replaced "
                           f"({why['answer']!r} -> {why['by_answer']!r}); name it in that correction's supersedes")
    return out
