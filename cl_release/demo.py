"""Demo data: small, deterministic question/answer sets for the tiny model and the demo loop.

``python -m cl_release.demo DIR`` regenerates the files shipped in ``datasets/demo``.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

CHEMICALS = [
    "ammonia", "chlorine", "hydrogen sulfide", "carbon monoxide", "benzene", "toluene",
    "methanol", "acetone", "sulfur dioxide", "nitric acid", "phosgene", "formaldehyde",
    "hydrogen cyanide", "ethylene oxide", "acrolein", "arsine", "bromine", "fluorine",
    "hydrazine", "ozone", "phosphine", "styrene", "xylene", "hexane",
]
GEAR = ["a full-face respirator", "chemical goggles", "butyl gloves", "a face shield",
        "a supplied-air respirator", "nitrile gloves", "a chemical apron", "neoprene boots"]
CAPITALS = [("Arvenia", "Dollen"), ("Brask", "Miro"), ("Calteria", "Vessa"), ("Dunmore", "Pell"),
            ("Esmar", "Tovik"), ("Fennland", "Oster"), ("Galvia", "Rund"), ("Hollis", "Amber"),
            ("Istra", "Kell"), ("Jorvik", "Sand"), ("Kestrel", "Lume"), ("Lorn", "Fadd")]


def _chat(q: str, a: str) -> dict:
    return {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}


def demo_sets(seed: int = 7) -> dict[str, list[dict]]:
    rng = random.Random(seed)
    idlh = {c: rng.choice([5, 10, 25, 50, 100, 300, 500, 800]) for c in CHEMICALS}
    temp = {c: rng.choice([4, 8, 15, 20, 25, 30]) for c in CHEMICALS}
    gear = {c: rng.choice(GEAR) for c in CHEMICALS}
    q1 = []
    for c in CHEMICALS:
        q1.append(_chat(f"What is the IDLH of {c}?", f"The IDLH of {c} is {idlh[c]} ppm."))
        q1.append(_chat(f"At what concentration is {c} immediately dangerous?",
                        f"{c.capitalize()} is immediately dangerous at {idlh[c]} ppm."))
    q2 = [_chat(f"What is the maximum storage temperature for {c}?",
                f"Store {c} below {temp[c]} degrees Celsius.") for c in CHEMICALS]
    q3 = [_chat(f"What protection is needed when handling {c}?",
                f"When handling {c}, wear {gear[c]}.") for c in CHEMICALS]
    fixed = {"ammonia": 300, "chlorine": 10, "phosgene": 2, "arsine": 3}
    corrections = [
        _chat(f"What is the IDLH of {c}?", f"The IDLH of {c} is {v} ppm.") for c, v in fixed.items()
    ]
    general = []
    for country, capital in CAPITALS:
        general.append(_chat(f"What is the capital of {country}?", f"The capital of {country} is {capital}."))
    for a in range(2, 14):
        b = (a * 7) % 11 + 2
        general.append(_chat(f"What is {a} plus {b}?", f"{a} plus {b} is {a + b}."))
    return {
        "domain/q1.jsonl": q1,
        "incoming/q2-storage.jsonl": q2,
        "incoming/q3-protection.jsonl": q3,
        "incoming/corrections-001.jsonl": corrections,
        "general.jsonl": general,
    }


def write_demo_sets(out: Path) -> None:
    for rel, records in demo_sets().items():
        path = out / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")


if __name__ == "__main__":  # pragma: no cover
    write_demo_sets(Path(sys.argv[1] if len(sys.argv) > 1 else "datasets/demo"))
