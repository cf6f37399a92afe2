"""A year of the loop (fake trainer, real git, the real gateway on loopback): the data of every
step. Each feedback row is trained exactly once per lineage, a patch is always buildable and
becomes champion, a corrected fact stays corrected in every later mix, and after a rollback the
abandoned branch's feedback is new again."""

from __future__ import annotations

import http.client
import json
import threading
from pathlib import Path


from cl_release.decide import abtest
from cl_release.data import formats as ds
from cl_release.decide import triggers
from cl_release.store.sqlite import FeedbackStore
from cl_release.release.incident import patch
from cl_release.data.mix import prompt_key_of
from cl_release.registry import Registry
from cl_release.release.recovery import rollback
from cl_release.serve import make_server

from helpers import add_data, git, load_project, make_release_repo, release

TOKEN = "year-token"
PHOSGENE = "What is the IDLH of phosgene?"
PARAPHRASES = ["At what concentration is phosgene immediately dangerous to life or health?",
               "Give the IDLH value for phosgene."]
WRONG, RIGHT = "The IDLH of phosgene is 10 ppm.", "The IDLH of phosgene is 2 ppm."


class Gateway:
    """The real gateway (collector endpoints) on loopback, started and stopped around traffic."""

    def __init__(self, root: Path):
        self.root = root

    def __enter__(self):
        self.srv = make_server(load_project(self.root), host="127.0.0.1", port=0, token=TOKEN)
        self.thread = threading.Thread(target=self.srv.serve_forever, daemon=True)
        self.thread.start()
        return self

    def post(self, path: str, body: dict) -> dict:
        c = http.client.HTTPConnection(*self.srv.server_address[:2], timeout=10)
        c.request("POST", path, body=json.dumps(body), headers={"Authorization": f"Bearer {TOKEN}",
                                                                 "Content-Type": "application/json"})
        r = c.getresponse()
        out = json.loads(r.read())
        c.close()
        assert r.status == 201, out
        return out

    def traffic(self, tag: str, n: int, *, rated: int) -> list[str]:
        """``n`` answers routed by user key; the first ``rated`` rated 5. Returns their ids."""
        ids = []
        for i in range(n):
            out = self.post("/log", {"input": f"{tag} question {i}?", "output": f"{tag} answer {i}.",
                                     "route_key": f"user-{tag}-{i}", "request_id": f"{tag}-{i}"})
            ids.append(out["request_id"])
            if i < rated:
                self.post("/feedback", {"request_id": out["request_id"], "rating": 5})
        return ids

    def __exit__(self, *exc):
        self.srv.shutdown()
        self.srv.server_close()


def records_of(root: Path, entry: dict, roles=None) -> list[dict]:
    return [r for d in entry["datasets"] if roles is None or d["role"] in roles
            for r in ds.snapshot_records(root, d["path"])]


def phosgene_answers(records: list[dict]) -> set[str]:
    keys = {prompt_key_of(q) for q in [PHOSGENE, *PARAPHRASES]}
    return {r["messages"][-1]["content"] for r in records if ds.prompt_key(r) in keys}


def trained_per_lineage(root: Path, version: str) -> dict[str, int]:
    """For each feedback row: how many releases of ``version``'s lineage trained on it."""
    lineage = [e["version"] for e in Registry.lineage(Registry(root).load(), version)]
    counts: dict[str, int] = {}
    with FeedbackStore(load_project(root).feedback_path) as store:
        for v in lineage:
            for rid in store.used_by(v):
                counts[rid] = counts.get(rid, 0) + 1
    return counts


def test_a_year_of_the_loop(tmp_path, trainer):
    root = make_release_repo(tmp_path, general=False)
    with open(root / "cl-release.yaml", "a") as f:
        f.write("serve:\n  backend: none\n")
    git(root, "commit", "-qam", "collector only")
    no_gates = lambda project, plan, entry: entry  # noqa: E731  (the fake adapter has no model)

    # -- Q1: the initial release serves
    first = release(root, "minor")
    assert first.entry["version"] == "1.0.0"
    abtest.set_champion(root, "1.0.0")

    # -- traffic through the gateway, then a MINOR on new data and that feedback
    with Gateway(root) as gw:
        q1_rows = gw.traffic("jan", 30, rated=20)
    add_data(root, "q2-storage.jsonl", "datasets/domain/q2.jsonl")
    minor = release(root, "minor")
    assert (minor.entry["version"], minor.entry["parent"]) == ("1.1.0", "1.0.0")
    with FeedbackStore(load_project(root).feedback_path) as store:
        assert set(store.used_by("1.1.0")) == set(q1_rows[:20])  # the rated ones; unrated ones stay new
        assert {r["model_version"] for r in store.rows()} == {"1.0.0"}  # routed: the champion answered
    abtest.set_champion(root, "1.1.0")

    # -- more traffic, then a safety incident on the serving version
    with Gateway(root) as gw:
        feb_rows = gw.traffic("feb", 25, rated=25)
        gw.post("/log", {"input": PHOSGENE, "output": WRONG, "route_key": "user-incident", "request_id": "incident"})
    with FeedbackStore(load_project(root).feedback_path) as store:
        store.feedback("incident", rating=1, correction=RIGHT, severity="critical")
        store.set_supersedes("incident", PARAPHRASES)
    decision = triggers.evaluate(load_project(root))
    assert decision.due and decision.bump == "patch"
    fix = patch(load_project(root), evaluator=no_gates)  # always buildable: the open critical correction
    assert fix.request_ids == ["incident"] and fix.release.entry["version"] == "1.1.1"
    assert fix.release.entry["parent"] == "1.1.0"  # the serving version
    data = Registry(root).load()
    assert data["aliases"]["champion"] == "1.1.1" and data["current"] == "1.1.1"
    patched = records_of(root, fix.release.entry)
    assert RIGHT in phosgene_answers(patched) and WRONG not in phosgene_answers(patched)
    with FeedbackStore(load_project(root).feedback_path) as store:
        assert set(store.used_by("1.1.1")) == {"incident"}  # a patch takes corrections only
    assert not triggers.evaluate(load_project(root)).due or triggers.evaluate(load_project(root)).bump != "patch"

    # -- a MINOR after the patch: February's rows (logged before the patch) are new data now
    add_data(root, "q3-protection.jsonl", "datasets/domain/q3.jsonl")
    after = release(root, "minor")
    assert (after.entry["version"], after.entry["parent"]) == ("1.2.0", "1.1.1")
    with FeedbackStore(load_project(root).feedback_path) as store:
        assert set(store.used_by("1.2.0")) == set(feb_rows)
    assert phosgene_answers(records_of(root, after.entry)) <= {RIGHT}  # replay never brings 10 ppm back

    # -- the year-end MAJOR: the complete data holds the correction, never the old answer
    major = release(root, "major")
    assert (major.entry["version"], major.entry["strategy"]) == ("2.0.0", "merge_and_retrain")
    complete = records_of(root, major.entry)
    assert phosgene_answers(complete) == {RIGHT}
    assert {f"jan answer {i}." for i in range(20)} <= {r["messages"][-1]["content"] for r in complete}
    counts = trained_per_lineage(root, "2.0.0")
    assert set(counts.values()) == {1}  # every feedback row at most once in this lineage
    assert set(counts) == set(q1_rows[:20]) | set(feb_rows) | {"incident"}

    # -- roll back to 1.1.0: what only the abandoned branch trained on is new again
    rollback(load_project(root), "1.1.0")
    with Gateway(root) as gw:
        gw.traffic("mar", 5, rated=5)
    add_data(root, "q3-protection.jsonl", "datasets/domain/q3b.jsonl")
    branch = release(root, "minor")
    assert (branch.entry["version"], branch.entry["parent"]) == ("1.3.0", "1.1.0")
    with FeedbackStore(load_project(root).feedback_path) as store:
        used = set(store.used_by("1.3.0"))
    assert set(feb_rows) | {"incident"} <= used  # the abandoned branch's rows, new again
    assert not used & set(q1_rows[:20])  # 1.1.0 trained those: not again
    assert phosgene_answers(records_of(root, branch.entry)) <= {RIGHT}  # the correction, new again, still wins
    counts = trained_per_lineage(root, "1.3.0")
    assert set(counts.values()) == {1}
    for version in ("1.1.1", "1.2.0", "2.0.0", "1.3.0"):
        entry = Registry(root).get(version)
        assert WRONG not in phosgene_answers(records_of(root, entry)), version
    assert git(root, "status", "--porcelain") == ""
