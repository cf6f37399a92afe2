"""Side by side: this tree against an earlier checkout, interleaved in one run.

    python bench/bench_sidebyside.py --old ../old-checkout [--rows 1000000] [--rounds 3] [--parts help,import,build,log]

For a restructure that must change nothing a user sees, on these noisy machines the only
honest comparison is the old code and the new one measured in turns, in the same minutes,
on the same inputs. Each measurement runs in a fresh process whose ``sys.path`` starts with
one tree (``PYTHONPATH``); the order of the two trees alternates by round. Parts:

- ``help``: ``cl-release --help`` wall clock (process start included), median of 10;
- ``import``: ``FeedbackStore.import_jsonl`` of a generated collector log into a fresh store;
- ``build``: the data build from one 1M-row store (both trees read the same file), default
  workers and ``workers=1``; the outputs' SHA-256 must be the same in both trees;
- ``log``: ``POST /log`` through ``cl-release serve --backend none`` (8 clients).

Writes ``bench/RESULTS-sidebyside.md`` (``--out``) and prints each measurement as it comes.
The old tree may predate the package layout (``cl_release.feedback``/``cl_release.extract``):
the child scripts import whichever exists.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
NEW = HERE.parent
WORK = NEW / ".bench-out" / "sidebyside"
PY = sys.executable

IMPORTS = r'''
import sys
try:
    from cl_release.store.sqlite import FeedbackStore
    from cl_release.data.build import build
    from cl_release.data.rules import ExtractionRules
except ImportError:  # before the package layout
    from cl_release.feedback import FeedbackStore
    from cl_release.extract import ExtractionRules, build
assert FeedbackStore.__module__.startswith("cl_release"), FeedbackStore.__module__
'''

IMPORT_CHILD = IMPORTS + r'''
import json, os, resource, time
db, log = sys.argv[1], sys.argv[2]
for s in ("", "-wal", "-shm", ".lock"):
    try: os.unlink(db + s)
    except FileNotFoundError: pass
store = FeedbackStore(db)
store.count()
t = time.perf_counter()
r = store.import_jsonl(log)
wall = time.perf_counter() - t
ru, rc = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
print(json.dumps({"seconds": wall, "records": r.records, "cpu": ru.ru_utime + ru.ru_stime + rc.ru_utime + rc.ru_stime}))
'''

BUILD_CHILD = IMPORTS + r'''
import gc, json, time
db, workers = sys.argv[1], (None if sys.argv[2] == "default" else int(sys.argv[2]))
store = FeedbackStore(db)
gc.collect()
t = time.perf_counter()
res = build(store.rows(), ExtractionRules(), workers=workers)
wall = time.perf_counter() - t
m = res.manifest
print(json.dumps({"seconds": wall, "examples": m["examples"], "sha256": m["sha256"],
                  "corrections_sha256": m["corrections"]["sha256"]}))
'''

FILL_CHILD = r'''
import sys
sys.path.insert(0, sys.argv[2])
from bench_data import make_rows
from cl_release.store.sqlite import FeedbackStore
store = FeedbackStore(sys.argv[1])
rows = make_rows(int(sys.argv[3]))
store.log_many({"request_id": r["id"], "input": r["input"], "output": r["output"], "model_version": r["model_version"],
                "created_at": r["created_at"]} for r in rows)
store.feedback_many([{"request_id": r["id"], "rating": r["rating"], "thumbs": r["thumbs"], "correction": r["correction"],
                      "created_at": r["created_at"]} for r in rows if r["rating"] is not None or r["thumbs"] is not None])
print(store.count())
'''


def child(tree: Path, code: str, *args: str, timeout: float = 900) -> dict:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    out = subprocess.run([PY, "-c", code, *args], env=env, capture_output=True, text=True, timeout=timeout,
                         cwd=tree)
    if out.returncode:
        raise SystemExit(f"{tree}: {out.stderr.strip()[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def trees_in_turn(trees: dict[str, Path], rnd: int):
    names = list(trees)
    return [(n, trees[n]) for n in (names if rnd % 2 == 0 else names[::-1])]


def bench_help(trees, rounds: int) -> dict:
    times: dict[str, list[float]] = {k: [] for k in trees}
    for rnd in range(rounds * 10):
        for name, tree in trees_in_turn(trees, rnd):
            env = {**os.environ, "PYTHONPATH": str(tree)}
            t = time.perf_counter()
            subprocess.run([PY, "-c", "from cl_release.cli import run; run()", "--help"], env=env, check=True,
                           capture_output=True, cwd=tree)
            times[name].append(time.perf_counter() - t)
    return {k: {"median_s": round(statistics.median(v), 3), "max_s": round(max(v), 3)} for k, v in times.items()}


def bench_import(trees, rounds: int, rows: int) -> dict:
    sys.path.insert(0, str(HERE))
    from bench_feedback import make_log

    log = WORK / f"log-{rows}.jsonl"
    if not log.exists():
        make_log(log, rows)
    runs: dict[str, list[dict]] = {k: [] for k in trees}
    for rnd in range(rounds):
        for name, tree in trees_in_turn(trees, rnd):
            r = child(tree, IMPORT_CHILD, str(WORK / f"import-{name}.db"), str(log))
            assert r["records"] == rows, r
            runs[name].append(r)
            print(f"  import {name}: {r['seconds']:.1f} s ({rows / r['seconds']:,.0f} records/s), cpu {r['cpu']:.1f} s",
                  file=sys.stderr, flush=True)
    for name in trees:
        Path(WORK / f"import-{name}.db").unlink(missing_ok=True)
    return {k: {"median_s": round(statistics.median(r["seconds"] for r in v), 2),
                "records_per_s": round(rows / statistics.median(r["seconds"] for r in v)),
                "runs_s": [round(r["seconds"], 2) for r in v]} for k, v in runs.items()}


def bench_build(trees, rounds: int, rows: int, store: Path) -> dict:
    if not store.exists():
        print(f"  filling {store} with {rows:,} rows (once)", file=sys.stderr, flush=True)
        child(NEW, FILL_CHILD, str(store), str(HERE), str(rows), timeout=3600)
    out = {}
    for workers in ("default", "1"):
        runs: dict[str, list[dict]] = {k: [] for k in trees}
        for rnd in range(rounds):
            for name, tree in trees_in_turn(trees, rnd):
                r = child(tree, BUILD_CHILD, str(store), workers)
                runs[name].append(r)
                print(f"  build workers={workers} {name}: {r['seconds']:.2f} s, {r['examples']:,} examples, "
                      f"sha256 {r['sha256'][:12]}", file=sys.stderr, flush=True)
        shas = {(r["sha256"], r["corrections_sha256"]) for v in runs.values() for r in v}
        assert len(shas) == 1, f"the trees build different bytes: {shas}"
        out[f"workers={workers}"] = {k: {"median_s": round(statistics.median(r["seconds"] for r in v), 2),
                                         "runs_s": [round(r["seconds"], 2) for r in v]} for k, v in runs.items()}
        out["sha256"] = shas.pop()[0]
    return out


def bench_log(trees, rounds: int, clients: int, requests: int) -> dict:
    sys.path.insert(0, str(HERE))
    import bench_serve as bs

    runs: dict[str, list[dict]] = {k: [] for k in trees}
    for rnd in range(rounds):
        for name, tree in trees_in_turn(trees, rnd):
            root = bs.scratch_repo(WORK, f"log-{name}-{rnd}-{time.time_ns()}")
            proc, host, port = bs.start([PY, "-c", "from cl_release.cli import run; run()", "-C", str(root), "serve",
                                         "--port", "0", "--backend", "none"], env={"PYTHONPATH": str(tree)})
            try:
                res = bs.run_clients(host, port, clients, requests,
                                     lambda c, i: {"input": f"question {c} {i}", "output": "answer",
                                                   "request_id": f"c{c}-{i}", "latency_ms": 12.0}, "/log", 201)
            finally:
                bs.stop(proc)
            assert res["errors"] == 0, res
            runs[name].append(res)
            print(f"  /log {name}: {res['requests_per_second']:,.0f} req/s, p50 {res['p50_ms']} ms, "
                  f"p99 {res['p99_ms']} ms", file=sys.stderr, flush=True)
    return {k: {"median_rps": round(statistics.median(r["requests_per_second"] for r in v)),
                "runs_rps": [round(r["requests_per_second"]) for r in v]} for k, v in runs.items()}


def write_report(path: Path, results: dict, args) -> None:
    lines = ["# Side by side: this tree and an earlier one, interleaved in one run", "",
             f"`python bench/bench_sidebyside.py --old {args.old} --rows {args.rows} --rounds {args.rounds}` "
             f"on {os.cpu_count()} CPUs, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}. "
             f"old = `{results['old_commit']}`, new = `{results['new_commit']}`. Medians; every run listed.", ""]
    if "help" in results:
        lines += ["## `cl-release --help` (process start included, 10 per round)", "", "| tree | median | max |",
                  "| --- | --- | --- |"]
        lines += [f"| {k} | {v['median_s']} s | {v['max_s']} s |" for k, v in results["help"].items()] + [""]
    if "import" in results:
        lines += [f"## Import of {args.rows:,} collector records", "", "| tree | median | records/s | runs (s) |",
                  "| --- | --- | --- | --- |"]
        lines += [f"| {k} | {v['median_s']} s | {v['records_per_s']:,} | {v['runs_s']} |"
                  for k, v in results["import"].items()] + [""]
    if "build" in results:
        b = results["build"]
        lines += [f"## Data build from a {args.rows:,}-row store", "",
                  f"Same bytes in every run of both trees: SHA-256 `{b['sha256']}`.", "",
                  "| workers | tree | median | runs (s) |", "| --- | --- | --- | --- |"]
        for w in ("workers=default", "workers=1"):
            lines += [f"| {w} | {k} | {v['median_s']} s | {v['runs_s']} |" for k, v in b[w].items()]
        lines.append("")
    if "log" in results:
        lines += [f"## `POST /log` through `cl-release serve --backend none` ({args.clients} clients × "
                  f"{args.requests})", "", "| tree | median req/s | runs |", "| --- | --- | --- |"]
        lines += [f"| {k} | {v['median_rps']:,} | {v['runs_rps']} |" for k, v in results["log"].items()] + [""]
    path.write_text("\n".join(lines))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--old", type=Path, required=True, help="a checkout of the earlier commit")
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--parts", default="help,import,build,log")
    ap.add_argument("--store", type=Path, default=None, help="the build's store (filled once, reused)")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--out", type=Path, default=HERE / "RESULTS-sidebyside.md")
    args = ap.parse_args()
    WORK.mkdir(parents=True, exist_ok=True)
    trees = {"old": args.old.resolve(), "new": NEW}
    commit = lambda tree: subprocess.run(["git", "-C", str(tree), "rev-parse", "--short", "HEAD"],  # noqa: E731
                                         capture_output=True, text=True).stdout.strip()
    results: dict = {"old_commit": commit(trees["old"]), "new_commit": commit(NEW)}
    parts = args.parts.split(",")
    if "help" in parts:
        results["help"] = bench_help(trees, args.rounds)
        print(results["help"], file=sys.stderr)
    if "import" in parts:
        results["import"] = bench_import(trees, args.rounds, args.rows)
    if "build" in parts:
        results["build"] = bench_build(trees, args.rounds, args.rows, args.store or WORK / f"store-{args.rows}.db")
    if "log" in parts:
        results["log"] = bench_log(trees, args.rounds, args.clients, args.requests)
    write_report(args.out, results, args)
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
