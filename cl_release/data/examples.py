"""Rows -> examples: the one row loop, and sorted, canonical JSON lines with their manifest.

:func:`read_entries` is the one loop over feedback rows, whatever they come from: row dicts
(``FeedbackStore.rows()``'s form, any iterable), or the store's tuples with the rule's first
step already done in SQL (``cl_release.store.classify.classified``). It applies the rule of
:mod:`cl_release.data.rules` to each row (``ExtractionRules.signal`` for the dicts, then
``verdict``), checks its prompt and the control-token rule, redacts, and dedupes; it returns
a :class:`Part`. :func:`finish` sorts a part's entries by (created_at, id), serialises them
as canonical JSON lines (the same rows give the same bytes whatever order they arrive in)
and describes them in a manifest (with the SHA-256 of those bytes): a :class:`BuildResult`.
The store build in shards (:mod:`cl_release.data.shards`) uses the same pieces.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import json
from dataclasses import dataclass
from itertools import compress, repeat
from operator import itemgetter
from typing import Any, Callable, Iterable

from .formats import FORMATS, canonical_json, fold_text, normalized_text
from .rules import CORRECTED, KEPT, SKIP_REASONS, ExtractionRules, find_control_token, prompt_turns, verdict
from ..errors import UserError

try:  # orjson gives the same bytes as datasets.canonical_json for our string-only records
    import orjson as _orjson
except ImportError:  # pragma: no cover - orjson is optional
    _orjson = None

MANIFEST_VERSION = 1


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


# ---------------------------------------------------------------- the result


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
        self.shards = 0  # how many shards of a store the build read (0: rows read one by one)

    @classmethod
    def deferred(cls, make: Callable[[], tuple[list, list]], manifest: dict[str, Any], data: bytes,
                 corrections_data: bytes) -> "BuildResult":
        """A result whose ``(examples, corrections)`` ``make()`` returns when first asked for."""
        result = cls(None, None, manifest, data, corrections_data)
        result._make = make
        return result

    @property
    def examples_made(self) -> bool:
        """Whether the example dicts exist yet (a deferred result makes them on first use)."""
        return self._make is None

    def _materialize(self) -> None:
        make, self._make = self._make, None
        with gc_paused():  # a million small dicts: see build
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


@contextlib.contextmanager
def gc_paused():
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


# ---------------------------------------------------------------- the one row loop

# One usable row: (created_at, id, newest time, source, prompt, answer). ``prompt`` is the
# (redacted) text of a one-turn string input, or the list of (redacted) prompt turns;
# ``answer`` is the (redacted) answer. Output order is (created_at, id key); a duplicate
# group keeps the row with the largest (is a correction, feedback or created time,
# created_at, id key): a corrected example beats a kept one with the same text (a later
# good rating of the fixed answer must not turn the correction into a plain example), then
# the newest wins.
# Tuples of strings: a million of them are built, and no dict or list per example.
CREATED, ID, TIME, SOURCE, PROMPT, ANSWER = range(6)


def id_key(rid: Any) -> tuple:
    """Ids sort numbers first (by value), then everything else by its string."""
    if type(rid) is str:
        return (1, 0, rid)
    return (0, rid, "") if isinstance(rid, (int, float)) and not isinstance(rid, bool) else (1, 0, str(rid))


def _newest(entry: tuple) -> tuple:
    """Which of two duplicates stays: the larger (a correction first, then the newest)."""
    return (entry[SOURCE] == CORRECTED, entry[TIME], entry[CREATED], id_key(entry[ID]))


def _messages(entry: tuple) -> list[dict[str, str]]:
    """The example's turns: the prompt turns, then the answer as the assistant's turn."""
    prompt = entry[PROMPT]
    answer = {"role": "assistant", "content": entry[ANSWER]}
    if type(prompt) is str:
        return [{"role": "user", "content": prompt}, answer]
    return [*prompt, answer]


# The fields of a row dict that read_entries reads, in the order it unpacks them.
_FIELDS = ("id", "rating", "thumbs", "correction", "hallucinated", "quality_score", "output", "input", "created_at",
           "feedback_at")


class BadValue(Exception):
    """A row's feedback value of a type no rule can compare (a text rating, say)."""

    def __init__(self, rid: Any, field: str, value: Any):
        super().__init__(rid, field, value)
        self.rid, self.field, self.value = rid, field, value


@dataclass
class Part:
    """What :func:`read_entries` read: the entries after dedupe, their dedupe keys (same
    order; None without dedupe), rows read, skip counts, and what :func:`finish`'s shape is
    made of (every id a str, the set of created_at lengths, -1 for a non-string created_at
    or feedback time, every prompt one string)."""

    entries: list[tuple]
    keys: list[str] | None
    rows: int
    skipped: dict[str, int]
    str_ids: bool
    created_lengths: set[int]
    one_turn: bool

    @property
    def shape(self) -> tuple[bool, bool, bool]:
        """(every id a str, every created_at a str of one length, every prompt one string)."""
        lengths = self.created_lengths
        return self.str_ids, len(lengths) == 1 and -1 not in lengths, self.one_turn


def read_entries(rows: Iterable[Any], rules: ExtractionRules, *, classified: bool = False) -> Part:
    """The one row loop: the usable rows as entries, deduplicated; the rest counted by reason.

    ``rows``: row dicts (as ``FeedbackStore.rows()`` yields them; anything else is an invalid
    row, a dict subclass is only read with ``.get``), whose signal ``rules.signal`` computes
    here; or, ``classified``, the store's tuples (``store.classify.COLUMNS``: the signal
    computed by SQL, the input as JSON text, parsed only for the rows the rule keeps), which
    come in output order. Then each row goes through ``verdict``, its prompt
    (``prompt_turns``), the control-token rule and redaction, in that order, and a row whose
    folded text equals another's is a duplicate: the newer (:func:`_newest`) stays. Entries
    are in first-seen order of their dedupe key; with ``classified`` a newer duplicate moves
    its group to the end instead, so the entries stay in the rows' order.

    The part's shape is noted here, while each row is in the CPU cache: afterwards each pass
    over 400k scattered entries costs 0.1-0.3 s. It holds for every usable row, so also for
    the winners of dedupe.

    Raises :class:`BadValue` for a feedback value no rule can compare, and
    ``rules.UnknownSignal`` for a store row SQL could not classify exactly.
    """
    red = rules.redactor
    dedupe = rules.dedupe
    signal = rules.signal
    loads = _orjson.loads if classified else None  # the store parses ``input`` with orjson: the same values
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
            if classified:
                sig, rid, output, correction, prompt, created, rated = row
            else:
                if type(row) is dict:
                    try:  # every field at once (FeedbackStore rows have them all)
                        rid, rating, thumbs, correction, hallucinated, score, output, prompt, created, rated = fields(row)
                    except KeyError:
                        rid, rating, thumbs, correction, hallucinated, score, output, prompt, created, rated = map(
                            row.get, _FIELDS)
                elif isinstance(row, dict):  # a subclass: only .get (a defaultdict's [] would add keys)
                    rid, rating, thumbs, correction, hallucinated, score, output, prompt, created, rated = map(
                        row.get, _FIELDS)
                else:
                    counts["invalid_row"] += 1
                    continue
                if rid is None:
                    counts["invalid_row"] += 1
                    continue
                sig = signal(rating, thumbs, score, hallucinated)
            source = verdict(sig, correction, output)
            if source == CORRECTED:
                answer = correction
            elif source == KEPT:
                answer = output
            else:
                counts[source] += 1
                continue
            if classified:
                prompt = loads(prompt)
            if type(prompt) is str:  # the common case: one user turn
                if not prompt.strip():
                    counts["empty_input"] += 1
                    continue
                if ("<|" in prompt or "<|" in answer) and (find_control_token(prompt) or find_control_token(answer)):
                    counts["control_tokens"] += 1
                    continue
                if red is not None:
                    prompt = red(prompt)
                    answer = red(answer)
                key = fold_text(f"user\x1f{prompt}\x1eassistant\x1f{answer}") if dedupe else None
            else:
                prompt = prompt_turns(prompt)
                if type(prompt) is str:
                    counts[prompt] += 1
                    continue
                if find_control_token(answer) or any(find_control_token(m["content"]) for m in prompt):
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
            # the folded text itself is the dedupe identity (equal texts <=> equal
            # datasets.normalized_key hashes): no hashing per row
            other = setdefault(key, entry)
            if other is not entry:
                counts["duplicate"] += 1
                if _newest(entry) > _newest(other):
                    if classified:  # to the end: the rows come in output order, so the kept entries stay in it
                        del seen[key]
                    seen[key] = entry
    except TypeError:  # a rating, score or flag of the wrong type, where Python compares it
        for name, value in (("rating", rating), ("quality_score", score), ("thumbs", thumbs)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
                raise BadValue(rid, name, value) from None
        raise
    keys = None
    if dedupe:
        out = list(seen.values())
        keys = list(seen)
    skipped = {reason: count for reason, count in counts.items() if count}
    return Part(out, keys, n, skipped, id_types <= {str}, created_lengths, one_turn)


def sorted_ids(ids: Iterable[Any]) -> list[Any]:
    ids = list(ids)
    if set(map(type, ids)) <= {str}:
        return sorted(ids)
    return sorted(ids, key=id_key)


def sort_key(str_ids: bool, fixed_created: bool) -> Callable[[tuple], Any]:
    """Output order: (created_at, id key). With string ids the plain id sorts as its key,
    and with created_at strings of one length (the store's fixed format) ``created_at + id``
    sorts as the pair does: one fresh, compact string per entry compares ~3x faster than
    tuples of strings scattered over the rows' memory."""
    if str_ids:
        if fixed_created:
            return lambda e: e[CREATED] + e[ID]
        return itemgetter(CREATED, ID)
    return lambda e: (e[CREATED], id_key(e[ID]))


# ---------------------------------------------------------------- serialising


if _orjson is not None:

    def _dump_record(record: dict[str, Any]) -> bytes:
        return _orjson.dumps(record, option=_SORT)

    def json_bodies(texts: list[str] | tuple[str, ...]) -> list[bytes]:
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
                bodies = json_bodies(plain)
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

    def json_bodies(texts: list[str] | tuple[str, ...]) -> list[bytes]:
        return [json.dumps(t, ensure_ascii=False)[1:-1].encode("utf-8") for t in texts]


# A one-turn example in the messages format, canonical JSON (keys sorted: content < role):
# _MSG_HEAD + body(prompt) + _MSG_MID + body(answer) + _MSG_TAIL.
_MSG_HEAD = b'{"messages":[{"content":"'
_MSG_MID = b'","role":"user"},{"content":"'
_MSG_TAIL = b'","role":"assistant"}]}'


def record_lines(entries: list[tuple], fmt: str, columns: list[tuple], one_turn: bool) -> list[bytes]:
    """Each entry's record as canonical JSON (``dump_jsonl`` of it, without the newline).

    One-turn examples in the messages format are put together from the JSON forms of their
    two strings (``json_bodies``) without building a record; the loop runs in C (map,
    zip) when every example is one-turn. ``columns``: the entries' fields, ``zip(*entries)``.
    """
    if fmt != "messages":  # the same, from each record's strings (keys sorted as shown)
        records = [format_example(_messages(e), fmt) for e in entries]
        if fmt == "alpaca":
            fields = [json_bodies([r[k] for r in records]) for k in ("input", "instruction", "output")]
            return list(map(b"".join, zip(repeat(b'{"input":"'), fields[0], repeat(b'","instruction":"'), fields[1],
                                          repeat(b'","output":"'), fields[2], repeat(b'"}'))))
        bodies = json_bodies([r["text"] for r in records])  # chatml, completion: {"text": ...}
        return list(map(b"".join, zip(repeat(b'{"text":"'), bodies, repeat(b'"}'))))
    prompts = columns[PROMPT]
    if not one_turn:
        prompts = [p if type(p) is str else "" for p in prompts]
    pb = json_bodies(prompts)
    ab = json_bodies(columns[ANSWER])
    if one_turn:
        return list(map(b"".join, zip(repeat(_MSG_HEAD), pb, repeat(_MSG_MID), ab, repeat(_MSG_TAIL))))
    return [
        b"".join((_MSG_HEAD, p, _MSG_MID, a, _MSG_TAIL)) if type(e[PROMPT]) is str
        else _dump_record({"messages": _messages(e)})
        for e, p, a in zip(entries, pb, ab)
    ]


def jsonl(lines: list[bytes]) -> bytes:
    return b"\n".join(lines) + b"\n" if lines else b""


def make_manifest(fmt: str, rules: ExtractionRules, data: bytes, cdata: bytes, examples: int, skipped: dict[str, int],
                  rows_read: int, window: tuple, record_ids: list, correction_ids: list) -> dict[str, Any]:
    """The manifest of a build: its data and corrections (sizes, hashes, ids), skip counts
    and rules."""
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


def _example_dicts(entries: list[tuple], fmt: str, is_correction: list[bool]) -> tuple[list, list]:
    """The examples (as dicts) of sorted entries, and those that are corrections."""
    if fmt == "messages":
        examples = [{"messages": _messages(e)} for e in entries]
    else:
        examples = [format_example(_messages(e), fmt) for e in entries]
    return examples, list(compress(examples, is_correction))


def finish(part: Part, rules: ExtractionRules, fmt: str) -> BuildResult:
    """Sort, serialise and describe a part's entries (in any order)."""
    entries = part.entries
    str_ids, fixed_created, one_turn = part.shape
    # stable sort by (created_at, id key), see sort_key
    window = None
    if str_ids:
        # equal string ids are indistinguishable, so the id list may be sorted before the
        # entries: still in input order, which is usually close to id order (fast for timsort)
        record_ids = sorted(map(itemgetter(ID), entries))
    entries.sort(key=sort_key(str_ids, fixed_created))
    if not str_ids:
        record_ids = sorted_ids(map(itemgetter(ID), entries))
    elif fixed_created and entries:
        # sorted by created_at, all empty or none: the window is the first and the last
        first, last = entries[0][CREATED], entries[-1][CREATED]
        window = (first, last) if first else (None, None)
    # the entries' fields as columns, in one pass (one pass per field costs 3x as much)
    columns = list(zip(*entries)) if entries else [()] * 6
    is_correction = list(map(CORRECTED.__eq__, columns[SOURCE]))
    correction_ids = sorted_ids(compress(columns[ID], is_correction))
    if window is None:
        times = [c for c in columns[CREATED] if c]
        window = (min(times), max(times)) if times else (None, None)
    lines = record_lines(entries, fmt, columns, one_turn)
    del columns
    data = jsonl(lines)
    cdata = jsonl(list(compress(lines, is_correction)))
    del lines
    manifest = make_manifest(fmt, rules, data, cdata, len(entries), part.skipped, part.rows, window, record_ids,
                             correction_ids)
    return BuildResult.deferred(lambda: _example_dicts(entries, fmt, is_correction), manifest, data, cdata)


