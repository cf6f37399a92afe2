"""Feedback rows for the data tests (tests/data/test_data_*.py): one row, varied rows and stores,
and the straightforward build every fast path must match byte for byte."""

from __future__ import annotations

import hashlib
import json
import random
import re

from cl_release.data.examples import format_example
from cl_release.data.rules import EMAIL_RE, PHONE_RE
from cl_release.data.rules import classify, prompt_turns


def row(i: int, **kw) -> dict:
    """A feedback row as FeedbackStore.rows() yields it."""
    base = {
        "id": f"r{i:03d}",
        "created_at": f"2026-01-01T00:{i // 60:02d}:{i % 60:02d}.000000Z",
        "input": f"question {i}",
        "output": f"answer {i}",
        "model_version": "1.0.0",
        "latency_ms": 12.0,
        "tokens": 7,
        "quality_score": None,
        "metadata": {},
        "rating": None,
        "thumbs": None,
        "correction": None,
        "notes": None,
        "hallucinated": None,
        "error_tag": None,
        "severity": None,
        "annotator": None,
        "feedback_at": None,
    }
    base.update(kw)
    return base


_WS = re.compile(r"\s+")


def _ref_id_key(rid):
    if isinstance(rid, (int, float)) and not isinstance(rid, bool):
        return (0, rid, "")
    return (1, 0, rid if isinstance(rid, str) else str(rid))


def reference_build(rows, rules, fmt):
    """The straightforward path build() must match byte for byte: classify() and prompt_turns()
    per row, every redaction regex run with re.sub on every text, sha256 of the regex-folded
    text as the dedupe key (keeping a correction over a kept duplicate, then the newest), one
    json.dumps per record."""
    custom = [re.compile(p) for p in rules.redact_patterns]

    def red(text):
        for rx in custom:
            text = rx.sub("[REDACTED]", text)
        if rules.redact_pii:
            text = PHONE_RE.sub("[PHONE]", EMAIL_RE.sub("[EMAIL]", text))
        return text

    skipped, seen, entries = {}, {}, []

    def skip(reason):
        skipped[reason] = skipped.get(reason, 0) + 1

    for r in rows:
        source = classify(r, rules)
        if source not in ("kept", "corrected"):
            skip(source)
            continue
        prompt = prompt_turns(r.get("input"))
        if isinstance(prompt, str):
            skip(prompt)
            continue
        msgs = [*prompt, {"role": "assistant", "content": r["output"] if source == "kept" else r["correction"]}]
        if any(re.search(r"<\|[A-Za-z0-9_]{1,40}\|>", m["content"]) for m in msgs):
            skip("control_tokens")
            continue
        msgs = [{"role": m["role"], "content": red(m["content"])} for m in msgs]
        created = r.get("created_at") or ""
        idk = _ref_id_key(r["id"])
        e = {"order": (created, idk), "newest": (source == "corrected", r.get("feedback_at") or created, created, idk),
             "id": r["id"],
             "source": source, "messages": msgs}
        if not rules.dedupe:
            entries.append(e)
            continue
        folded = _WS.sub(" ", "\x1e".join(f"{m['role']}\x1f{m['content']}" for m in msgs)).strip().casefold()
        key = hashlib.sha256(folded.encode("utf-8")).hexdigest()
        if key not in seen:
            seen[key] = e
        else:
            skip("duplicate")
            if e["newest"] > seen[key]["newest"]:
                seen[key] = e
    if rules.dedupe:
        entries = list(seen.values())
    entries.sort(key=lambda e: e["order"])
    examples = [format_example(e["messages"], fmt) for e in entries]
    data = "".join(json.dumps(x, sort_keys=True, ensure_ascii=False, separators=(",", ":")) + "\n" for x in examples)
    corr = [x for x, e in zip(examples, entries) if e["source"] == "corrected"]
    cdata = "".join(json.dumps(x, sort_keys=True, ensure_ascii=False, separators=(",", ":")) + "\n" for x in corr)
    ids = sorted((e["id"] for e in entries), key=_ref_id_key)
    cids = sorted((e["id"] for e in entries if e["source"] == "corrected"), key=_ref_id_key)
    return data.encode("utf-8"), cdata.encode("utf-8"), ids, cids, dict(sorted(skipped.items())), examples


def varied_rows(n, seed=1, uniform=False):
    """Unicode, case and whitespace variants, duplicates, PII, chat inputs, bad rows, mixed ids.
    ``uniform``: string ids and created_at all of one length, as FeedbackStore.rows() gives."""
    rnd = random.Random(seed)
    words = ["Ammonia", "ÄRGER", "straße", "STRASSE", "ﬁre", "İstanbul", "🚀", "\u00a0", "\t", "\u2028", "\x1e", "\x00",
             "valve", "+44 20 7946 0958", "555-123-4567", "(555) 123-4567", "020 7946 0958", "1-800-555-0199",
             "+1(2)3  45678", "١٢٣-٤٥٦-٧٨٩٠", "123456-789", "jane.doe+ops@example.co.uk", "a@b", "x@@y.io", "ppm", '"q"',
             "\\", "  ", "\n", "<|im_start|>", "ACME-12345"]
    rows = []
    for i in range(n):
        q = " ".join(rnd.choice(words) for _ in range(rnd.randrange(1, 8)))
        if rnd.random() < 0.3:
            q = q.upper()
        p = rnd.random()
        if p < 0.2:
            inp = [{"role": "system", "content": rnd.choice(["Be brief.", "BE  brief.", "sys 555-123-4567"])},
                   {"role": "user", "content": q}]
            if rnd.random() < 0.5:
                inp += [{"role": "assistant", "content": "old", "name": "bot"}, {"role": "user", "content": q.lower()}]
        elif p < 0.23:
            inp = rnd.choice([None, 42, [{"role": "wizard", "content": "x"}], "   ", ["hi"],
                              [{"role": "assistant", "content": "x"}], [{"role": "user", "content": 3}]])
        else:
            inp = q
        rid = f"r{i:06d}"
        if rnd.random() < 0.3:
            rid = rnd.choice([f"id{i:05d}", i, float(i) + 0.5, f"ID{rnd.randrange(50)}", rid])
        r = row(i, id=rid if rnd.random() > 0.01 else None, input=inp,
                created_at=rnd.choice(["", None, f"2026-01-{1 + i % 3:02d}T00:00:00.000000Z"]),
                feedback_at=rnd.choice([None, None, "2026-02-01T00:00:00.000000Z", f"2026-01-0{1 + i % 5}T00:00:00.000000Z"]),
                output=rnd.choice(["answer 1", "Answer  1", "  ", "call 555-123-4567 or bob@corp.example", "ünï 🚀", q]),
                rating=rnd.choice([None, 1, 2, 3, 4, 5]), thumbs=rnd.choice([None, None, -1, 0, 1]),
                quality_score=rnd.choice([None, None, 0.5, 0.8, 0.95]), hallucinated=rnd.choice([None, None, True, False]),
                correction=rnd.choice([None, "", "  ", "Fixed  answer", "fixed ANSWER", "mail a.b@c.de", "+44 20 7946 0958"]))
        if uniform:
            r.update(id=str(r["id"]), created_at=f"2026-01-{1 + i % 3:02d}T00:00:00.000000Z")
        rows.append(["not a dict"] if rnd.random() < 0.005 else r)
    return rows


def varied_store(path, n=2500, seed=7):
    """A FeedbackStore with what the store build must classify exactly as the dicts: several
    feedback rows per record (ties in time, broken by row id), records without feedback,
    quality-score-only records, Unicode, PII, near-duplicates, chat inputs, blank and missing
    outputs, whitespace-only corrections, two model versions, and a record without an id."""
    from cl_release.store.sqlite import FeedbackStore

    rnd = random.Random(seed)
    words = ["Ammonia", "ÄRGER", "straße", "STRASSE", "ﬁre", "İstanbul", "🚀", "\u00a0", "\t", "\u2028", "valve",
             "+44 20 7946 0958", "555-123-4567", "jane.doe+ops@example.co.uk", '"q"', "\\", "  ", "\n", "ACME-12345",
             "<|im_end|>", "<|", "|>", "<|not a token|>"]
    times = [f"2026-01-{d:02d}T00:00:00.000000Z" for d in range(1, 29)]
    store = FeedbackStore(path)
    records, feedback = [], []
    for i in range(n):
        q = " ".join(rnd.choice(words) for _ in range(rnd.randrange(1, 6)))
        if rnd.random() < 0.3:
            q = q.upper()
        p = rnd.random()
        if p < 0.15:
            inp = [{"role": "system", "content": rnd.choice(["Be brief.", "BE  brief."])}, {"role": "user", "content": q}]
            if rnd.random() < 0.5:
                inp += [{"role": "assistant", "content": "old"}, {"role": "user", "content": q.lower()}]
        elif p < 0.18:
            inp = rnd.choice(["   ", [{"role": "wizard", "content": "x"}], [{"role": "assistant", "content": "x"}]])
        else:
            inp = q
        rid = f"r{i:05d}" if rnd.random() < 0.8 else f"Z{rnd.randrange(10**6)}-{i}"
        records.append({
            "request_id": rid, "input": inp, "created_at": rnd.choice(times), "model_version": rnd.choice(["1.0.0", "1.1.0"]),
            "output": rnd.choice(["answer 1", "Answer  1", "  ", "", "call 555-123-4567 or bob@corp.example", "ünï 🚀", q,
                                  "ok<|eot_id|>"]),
            "quality_score": rnd.choice([None, None, None, 0.5, 0.8, 0.95]),
        })
        for _ in range(rnd.choice([0, 0, 1, 1, 1, 2, 3])):
            fb = {"request_id": rid, "created_at": rnd.choice(times[:4] + times[20:]),
                  "rating": rnd.choice([None, 1, 2, 3, 4, 5]), "thumbs": rnd.choice([None, None, -1, 0, 1]),
                  "hallucinated": rnd.choice([None, None, True, False]),
                  "correction": rnd.choice([None, None, "", "  ", "\u2028", "Fixed  answer", "fixed ANSWER", "mail a.b@c.de"])}
            if all(fb[k] is None for k in ("rating", "thumbs", "hallucinated", "correction")):
                fb["notes"] = "seen"
            feedback.append(fb)
    store.log_many(records)
    store.feedback_many(feedback)
    with store.conn:  # what the API refuses but the schema allows: no output, no id
        store.conn.execute("INSERT INTO records (id, created_at, input, output, quality_score)"
                           " VALUES ('no-output', ?, '\"q\"', NULL, 0.9), (NULL, ?, '\"q\"', 'a', 0.9)", (times[0], times[1]))
    return store


def dict_rows(rows):
    """The same rows, as a plain iterator of dicts: build() takes its generic path."""
    return (r for r in rows)


def sharded_store(tmp_path, n=600):
    """A store whose records straddle any split by time: the same few questions (so dedupe
    groups span shards) asked every day, rated, some corrected, some rated after later ones."""
    from cl_release.store.sqlite import FeedbackStore

    store = FeedbackStore(tmp_path / "s.db")
    rnd = random.Random(3)
    records, feedback = [], []
    for i in range(n):
        rid = f"{rnd.getrandbits(64):016x}"
        q = rnd.choice(["What is the IDLH?", "what is the  IDLH?", "Mail ops@example.com", "Valve 7?"])
        records.append({"request_id": rid, "input": q, "output": rnd.choice(["300 ppm", "300  PPM", "no idea"]),
                        "created_at": f"2026-01-{1 + i * 28 // n:02d}T{i % 24:02d}:00:00Z"})
        rating = rnd.choice([1, 4, 5, 5])
        feedback.append({"request_id": rid, "rating": rating, "correction": "300 ppm" if rating == 1 else None,
                         "created_at": f"2026-02-{1 + rnd.randrange(28):02d}T00:00:00Z"})
    store.log_many(records)
    store.feedback_many(feedback)
    return store


def same_examples(a, b):
    """Equal, and with keys in the same order (what json.dumps without sort_keys writes)."""
    return a == b and json.dumps(a) == json.dumps(b)

