"""Deterministic fact tasks for the continual-learning benchmark.

Four disjoint domains of invented facts (invented so no model can know them beforehand):

- ``general``: the stand-in for general-domain data. The base model is trained on it before
  any release (base-model preparation), and it is the ``general`` role of every release repo.
- ``t1``..``t3``: the tasks that arrive one per release, in order.

Each fact is asked in three phrasings in the training data; the evaluation suite asks the
first phrasing and passes when the answer contains the key fact (``match: contains``).
Answers come from a closed set per domain (chance is about 1/len(values)).
Everything is a pure function of the seed: no data files need to be shipped.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

SYLLABLES = ["ka", "lo", "mir", "ten", "sa", "vo", "rin", "du", "pel", "zan", "or", "bis", "ul", "fen",
             "gar", "hol", "jas", "nek", "qua", "tor", "wim", "yel", "cas", "bro"]

# domain: (entity noun, value list, three (question, answer) phrasings)
DOMAINS = {
    "general": (
        "country",
        ["red", "blue", "green", "yellow", "black", "white", "orange", "purple", "silver", "golden"],
        [("What color is the flag of {e}?", "{v}."),
         ("Which color does {e} use on its flag?", "{v}."),
         ("Tell me the flag color of {e}.", "{v}.")],
    ),
    "t1": (
        "chemical",
        ["2 ppm", "10 ppm", "25 ppm", "40 ppm", "75 ppm", "100 ppm", "150 ppm", "300 ppm", "600 ppm", "800 ppm"],
        [("What is the IDLH of {e}?", "IDLH {v}."),
         ("At what level is {e} immediately dangerous?", "IDLH {v}."),
         ("Give the IDLH value for {e}.", "IDLH {v}.")],
    ),
    "t2": (
        "valve",
        ["12 bar", "16 bar", "20 bar", "40 bar", "64 bar", "80 bar", "100 bar", "160 bar", "250 bar", "350 bar"],
        [("What is the rated pressure of valve {e}?", "Rated {v}."),
         ("How much pressure can valve {e} take?", "Rated {v}."),
         ("Give the pressure rating of valve {e}.", "Rated {v}.")],
    ),
    "t3": (
        "station",
        ["north", "south", "east", "west", "harbor", "ridge", "delta", "canyon", "forest", "summit"],
        [("In which zone is station {e}?", "Zone {v}."),
         ("Where is station {e} located?", "Zone {v}."),
         ("Name the zone of station {e}.", "Zone {v}.")],
    ),
}
TASKS = ("t1", "t2", "t3")


def _names(rng: random.Random, n: int, taken: set[str]) -> list[str]:
    out = []
    while len(out) < n:
        name = "".join(rng.choice(SYLLABLES) for _ in range(rng.choice((2, 3)))).capitalize()
        if name not in taken:
            taken.add(name)
            out.append(name)
    return out


def facts(seed: int = 0, n_general: int = 24, n_task: int = 16) -> dict[str, list[tuple[str, str]]]:
    """{domain: [(entity, value)]}; entities are unique across all domains."""
    rng = random.Random(seed)
    taken: set[str] = set()
    out = {}
    for dom, (_noun, values, _tpl) in DOMAINS.items():
        n = n_general if dom == "general" else n_task
        names = _names(rng, n, taken)
        out[dom] = [(e, values[rng.randrange(len(values))]) for e in names]
    return out


def _chat(q: str, a: str) -> dict:
    return {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}


def key_fact(value: str) -> str:
    """The value itself: no value of a domain is a suffix of another, so ``contains`` is exact."""
    return value


def training_records(domain: str, pairs: list[tuple[str, str]]) -> list[dict]:
    tpl = DOMAINS[domain][2]
    return [_chat(q.format(e=e), a.format(e=e, v=v)) for e, v in pairs for q, a in tpl]


def suite_rows(domain: str, pairs: list[tuple[str, str]]) -> list[dict]:
    q, _a = DOMAINS[domain][2][0]
    return [{"id": f"{domain}-{i:03d}", "input": q.format(e=e), "expected": key_fact(v), "match": "contains",
             "criticality": "medium", "domain": domain} for i, (e, v) in enumerate(pairs)]


def mention_texts(all_facts: dict[str, list[tuple[str, str]]]) -> list[str]:
    """Sentences that name every entity without stating any fact: what a pretrained model
    knows about the words (so their embeddings are trained) but not the domain facts."""
    out = []
    for dom, pairs in all_facts.items():
        noun = DOMAINS[dom][0]
        for e, _v in pairs:
            out.append(f"{e} is the name of a {noun}.")
    return out


def lm_texts(all_facts: dict[str, list[tuple[str, str]]]) -> list[str]:
    """Plain texts for base-model preparation: every entity mentioned (``mention_texts``) and,
    per domain, every answer phrase with every value but no entity, so every token the tasks
    answer with is a token the base model has produced (as in a pretrained model)."""
    out = mention_texts(all_facts)
    for dom, (_noun, values, tpl) in DOMAINS.items():
        answers = sorted({a.format(v=v) for _q, a in tpl for v in values})
        out.append(f"Possible answers: {' '.join(answers)}")
        out.extend(f"Possible answer: {a}" for a in answers)
    return out


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
