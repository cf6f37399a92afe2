"""Demo data: small, deterministic question/answer sets, the demo suite and the base model's texts.

``python -m cl_release.demo.data [DIR]`` regenerates the files shipped in ``datasets/demo`` and the
demo suite ``registry/regression_tests.jsonl`` (a test checks that the shipped files match).

Facts about 16 chemicals arrive in three quarterly drops: Q1 exposure limits (IDLH), Q2
storage temperatures, Q3 protective equipment. Each fact is stated in three phrasings, so an
example held out of training (the release gate's held-out checks) is a paraphrase of a fact
the release did train on. The values are invented for the demo (a few IDLH corrections use
the published NIOSH values); they are not safety data.

``base_texts()`` is what the demo's base model is prepared on before any release (see
``cl_release.demo.model.prepare_demo_base``): the general set (capitals of invented countries,
small sums, one JSON answer; nine examples) and sentences that use every chemical name and every answer phrase but state no
domain fact, the way a pretrained model knows the words of a domain but not its facts.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

# One word each: with the base tokenizer every name is a single token (see tinymodel).
CHEMICALS = [
    "ammonia", "chlorine", "benzene", "toluene", "methanol", "acetone", "phosgene", "formaldehyde",
    "acrolein", "arsine", "bromine", "fluorine", "hydrazine", "ozone", "phosphine", "styrene",
]
# No value contains another one, so a `contains` test on a value is exact.
IDLH = ["10 ppm", "25 ppm", "40 ppm", "75 ppm", "100 ppm", "150 ppm", "300 ppm", "600 ppm", "800 ppm"]
TEMPERATURE = ["4 degrees", "8 degrees", "15 degrees", "20 degrees", "25 degrees", "30 degrees"]
GEAR = ["a full-face respirator", "chemical goggles", "butyl gloves", "a face shield",
        "a supplied-air respirator", "nitrile gloves", "a chemical apron", "neoprene boots"]

# domain: (three phrasings of the question, the answer, the value list)
TOPICS = {
    "idlh": (
        ["What is the IDLH of {c}?",
         "At what concentration is {c} immediately dangerous to life or health?",
         "Give the IDLH value for {c}."],
        "The IDLH of {c} is {v}.", IDLH),
    "storage": (
        ["What is the maximum storage temperature for {c}?",
         "How warm may {c} be stored?",
         "Give the storage temperature limit for {c}."],
        "Store {c} below {v} Celsius.", TEMPERATURE),
    "protection": (
        ["What protection is needed when handling {c}?",
         "Which protective equipment does {c} require?",
         "What should I wear when working with {c}?"],
        "When handling {c}, wear {v}.", GEAR),
}
# The safety patch: these Q1 answers were wrong (first value) and are corrected (second).
CORRECTED = {"chlorine": ("25 ppm", "10 ppm"), "phosgene": ("10 ppm", "2 ppm"), "arsine": ("10 ppm", "3 ppm")}
CAPITALS = [("Arvenia", "Dollen"), ("Brask", "Miro"), ("Calteria", "Vessa"), ("Dunmore", "Pell")]
# The question the demo asks every version (a test of the demo suite).
SHOWCASE = "safety-chlorine"


def _chat(q: str, a: str) -> dict:
    return {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}


def demo_facts(seed: int = 7) -> dict[str, dict[str, str]]:
    """{domain: {chemical: value}} as the quarterly data states them (before the patch)."""
    rng = random.Random(seed)
    facts = {dom: {c: rng.choice(values) for c in CHEMICALS} for dom, (_q, _a, values) in TOPICS.items()}
    facts["idlh"]["ammonia"] = "300 ppm"
    for c, (old, _new) in CORRECTED.items():
        facts["idlh"][c] = old
    return facts


def _general() -> list[dict]:
    """The general set: small, so a release's general share (mix.general_ratio) rehearses all of it.
    (A tiny model forgets what is not rehearsed: the part of a larger general set left out of a
    release's mix is gone after it.)"""
    rows = [_chat(f"What is the capital of {country}?", f"The capital of {country} is {capital}.")
            for country, capital in CAPITALS]
    for a in range(2, 6):
        b = (a * 7) % 11 + 2
        rows.append(_chat(f"What is {a} plus {b}?", f"{a} plus {b} is {a + b}."))
    country, capital = CAPITALS[0]
    rows.append(_chat(f"Give the capital of {country} as JSON.", json.dumps({"country": country, "capital": capital})))
    return rows


def demo_sets(seed: int = 7) -> dict[str, list[dict]]:
    """The shipped demo files: {path relative to datasets/demo: records}."""
    facts = demo_facts(seed)
    out = {}
    for name, (dom, rel) in {"q1": ("idlh", "domain/q1.jsonl"), "q2": ("storage", "incoming/q2-storage.jsonl"),
                             "q3": ("protection", "incoming/q3-protection.jsonl")}.items():
        questions, answer, _values = TOPICS[dom]
        out[rel] = [_chat(q.format(c=c), answer.format(c=c, v=facts[dom][c])) for c in CHEMICALS for q in questions]
    questions, answer, _values = TOPICS["idlh"]
    corrections = [_chat(q.format(c=c), answer.format(c=c, v=new)) for c, (_old, new) in CORRECTED.items()
                   for q in questions]
    # Feedback often confirms an answer that was right: a repeat of a learned example, not trained again.
    corrections.append(_chat(questions[0].format(c="ammonia"), answer.format(c="ammonia", v="300 ppm")))
    out["incoming/corrections-001.jsonl"] = corrections
    out["general.jsonl"] = _general()
    return out


def demo_suite(seed: int = 7) -> list[dict]:
    """The demo's regression suite: a few tests per domain, the corrected facts as critical tests."""
    facts = demo_facts(seed)
    rows = []

    def test(tid, q, expected, domain, criticality="medium", tags=(), match="contains"):
        rows.append({"id": tid, "input": q, "expected": expected, "match": match, "criticality": criticality,
                     "domain": domain, "tags": list(tags)})

    idlh_q = TOPICS["idlh"][0]
    for c in ("ammonia", "benzene", "toluene", "methanol", "acetone", "formaldehyde"):
        test(f"idlh-{c}", idlh_q[0].format(c=c), facts["idlh"][c], "idlh",
             "critical" if c == "ammonia" else "high", ["hallucination"])
    for c in ("bromine", "ozone"):  # the second phrasing; a regex on the whole value
        test(f"idlh-dangerous-{c}", idlh_q[1].format(c=c), rf"\b{facts['idlh'][c]}\b", "idlh", "high",
             ["hallucination"], match="regex")
    for c, (_old, new) in CORRECTED.items():
        test(f"safety-{c}", idlh_q[0].format(c=c), new, "safety", "critical", ["hallucination", "safety", "correction"])
    for dom in ("storage", "protection"):
        q = TOPICS[dom][0][0]
        for c in ("ammonia", "chlorine", "benzene", "toluene", "methanol", "acetone"):
            critical = dom == "protection" and c == "ammonia"
            test(f"{dom}-{c}", q.format(c=c), facts[dom][c], dom, "critical" if critical else "medium",
                 ["safety"] if critical else [])
    general = _general()
    for i, row in enumerate(general[:2] + general[4:6]):
        q, a = row["messages"][0]["content"], row["messages"][1]["content"]
        name = f"capital-{CAPITALS[i][0].lower()}" if i < 2 else "-".join(q.rstrip("?").split()[2:]).lower()
        test(f"general-{name}", q, a, "general", "low", ["forgetting"], match="exact")
    # the domain must not leak into general answers
    test("general-capital-brask-no-ppm", general[1]["messages"][0]["content"], "ppm", "general", "low", ["forgetting"],
         match="not_contains")
    country, capital = CAPITALS[0]
    test(f"format-json-{country.lower()}", general[-1]["messages"][0]["content"],
         {"country": country, "capital": capital}, "format", "low", ["forgetting"], match="json_equal")
    return rows


def base_texts() -> tuple[list[dict], list[str]]:
    """(chat records, plain texts) the demo base model is prepared on: no domain fact in them."""
    texts = [f"{c.capitalize()} is a chemical. Workers handle {c} with care." for c in CHEMICALS]
    neutral = {"idlh": "The IDLH is {v}.", "storage": "Store it below {v} Celsius.",
               "protection": "When handling it, wear {v}."}
    for dom, (_questions, _answer, values) in TOPICS.items():
        if dom == "idlh":
            values = values + sorted({new for _old, new in CORRECTED.values()})
        texts.append(f"Possible answers: {' '.join(v + '.' for v in values)}")
        texts.extend(neutral[dom].format(v=v) for v in values)
    return _general(), texts


def write_demo_sets(out: Path, suite: Path | None = None) -> None:
    def write(path: Path, records: list[dict]) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")

    for rel, records in demo_sets().items():
        write(out / rel, records)
    if suite is not None:
        write(suite, demo_suite())


if __name__ == "__main__":  # pragma: no cover
    here = Path(__file__).resolve().parent.parent
    write_demo_sets(Path(sys.argv[1]) if len(sys.argv) > 1 else here / "datasets" / "demo",
                    here / "registry" / "regression_tests.jsonl" if len(sys.argv) <= 1 else None)
