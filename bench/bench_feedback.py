"""Benchmark the feedback store against the naive "rewrite the JSONL log" approach.

    .venv/bin/python bench/bench_feedback.py            # full: 10k, 100k, 1M records (minutes)
    .venv/bin/python bench/bench_feedback.py --quick    # small sizes, seconds

Measures, for each size: importing N logged records from JSONL into a fresh store; then
feedback updates on that store (one transaction per update, as a service records them, and
the batched ``feedback_many`` path); and the naive approach that loads the whole JSONL log,
changes one record and rewrites the file for every update (timed for a handful of updates
at the two smaller sizes, then extrapolated per update, linearly in the file size). Writes a
Markdown report (bench/RESULTS-feedback.md for the full run). Never run by the test suite.
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import resource
import shutil
import sqlite3
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import orjson

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cl_release.store import FeedbackStore  # noqa: E402
from cl_release.store.staged import IMPORT_PARALLEL_BYTES, import_workers  # noqa: E402
from cl_release.files import atomic_write_bytes  # noqa: E402

WORK = ROOT / ".bench-out" / "feedback"


def make_log(path: Path, n: int, seed: int = 0) -> None:
    """N request-log lines (shape a), ~10% with user feedback, about 350 bytes each."""
    rng = random.Random(seed)
    with open(path, "wb") as f:
        for i in range(n):
            row = {
                "request_id": f"{rng.getrandbits(128):032x}",
                "input": [{"role": "user", "content": f"What is the IDLH for ammonia at site {i % 977}?"}],
                "output": "The IDLH for ammonia is 300 ppm; evacuate and ventilate before re-entry.",
                "metadata": {"site": f"plant-{i % 31}", "user": i % 5000},
                "model_version": "1.2.0",
                "latency_ms": round(rng.uniform(80, 900), 1),
                "timestamp": f"2026-0{1 + i % 9}-{1 + i % 28:02d}T{i % 24:02d}:{i % 60:02d}:00Z",
            }
            if i % 10 == 0:
                row["user_feedback"] = {"rating": 1 + i % 5, "correction": None, "notes": None}
            f.write(orjson.dumps(row) + b"\n")


def ids_of(path: Path, k: int, seed: int = 1) -> list[str]:
    ids = [orjson.loads(line)["request_id"] for line in open(path, "rb")]
    return random.Random(seed).choices(ids, k=k)


def fresh_store(path: Path) -> FeedbackStore:
    for suffix in ("", "-wal", "-shm", ".lock"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)
    return FeedbackStore(path)


def cpu_seconds() -> float:
    """User + system CPU time of this process and of its finished children (import workers)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def bench_import(log: Path, db: Path, workers: int | None = None) -> tuple[FeedbackStore, float, float]:
    """(store, records/s wall clock, records per CPU-second: this process and its workers)."""
    store = fresh_store(db)
    store.count()  # schema creation is not part of the import
    cpu = cpu_seconds()
    result = store.import_jsonl(log, workers=workers)
    cpu = cpu_seconds() - cpu
    assert result.records == result.lines, result
    return store, result.per_second, result.lines / cpu


def file_mb(path: Path) -> float:
    return path.stat().st_size / 1e6 if path.exists() else 0.0


def bench_feedback(store: FeedbackStore, ids: list[str]) -> tuple[float, float]:
    """(updates/s one transaction each, updates/s via feedback_many in batches of 10k)."""
    t = time.perf_counter()
    for i, rid in enumerate(ids):
        store.feedback(rid, rating=1 + i % 5, correction="corrected answer" if i % 3 == 0 else None)
    single = len(ids) / (time.perf_counter() - t)
    rows = [{"request_id": rid, "rating": 1 + i % 5, "annotator": "bench"} for i, rid in enumerate(ids)]
    t = time.perf_counter()
    for i in range(0, len(rows), 10_000):
        store.feedback_many(rows[i : i + 10_000])
    batched = len(ids) / (time.perf_counter() - t)
    return single, batched


def naive_update(log: Path, request_id: str, rating: int) -> None:
    """What teams do today: load the whole log, change one record, rewrite the file."""
    lines = open(log, "rb").read().splitlines()
    out = []
    for line in lines:
        row = orjson.loads(line)
        if row["request_id"] == request_id:
            row["user_feedback"] = {"rating": rating, "correction": None, "notes": None}
        out.append(orjson.dumps(row))
    atomic_write_bytes(log, b"\n".join(out) + b"\n")


def bench_naive(log: Path, ids: list[str]) -> float:
    """Seconds per update (mean over ``ids``) on a copy of ``log``."""
    copy = log.with_suffix(".naive.jsonl")
    shutil.copyfile(log, copy)
    t = time.perf_counter()
    for i, rid in enumerate(ids):
        naive_update(copy, rid, 1 + i % 5)
    per = (time.perf_counter() - t) / len(ids)
    copy.unlink()
    return per


def sqlite_floor(log: Path, db: Path) -> dict[str, float]:
    """The least any SQLite import of these rows costs on this machine: the import's own rows,
    parsed and checked beforehand (not timed), sorted by id, inserted with one executemany (1)
    into a fresh WAL file with just the records table and its primary key, then its created_at
    index and the COMMIT; (2) into an in-memory table without any index. Rows per second."""
    from cl_release.store.importer import import_row
    from cl_release.store.schema import RECORD_COLUMNS

    cols = ", ".join(RECORD_COLUMNS)
    marks = ", ".join("?" * len(RECORD_COLUMNS))

    with open(log, "rb") as f:
        rows = sorted(import_row(orjson.loads(line), line)[0] for line in f)
    out = {}
    # (3) SQLite alone, no Python per row: the rows copied by INSERT ... SELECT from a scratch
    # file (filled beforehand, not timed) into the same fresh WAL file, index and COMMIT included
    scratch = db.with_name("floor-scratch.db")
    scratch.unlink(missing_ok=True)
    c = sqlite3.connect(str(scratch), isolation_level=None)
    c.execute(f"CREATE TABLE r ({cols})")
    c.execute("BEGIN")
    c.executemany(f"INSERT INTO r VALUES ({marks})", rows)
    c.execute("COMMIT")
    c.close()
    for name, path in (("file_pk_index_commit", str(db)), ("memory_no_index", ":memory:"), ("sql_copy", str(db))):
        for suffix in ("", "-wal", "-shm"):
            Path(f"{db}{suffix}").unlink(missing_ok=True)
        c = sqlite3.connect(path, isolation_level=None)
        c.execute("PRAGMA journal_mode = WAL")
        c.execute("PRAGMA synchronous = NORMAL")
        pk = "PRIMARY KEY" if path != ":memory:" else ""
        c.execute(f"CREATE TABLE records (id TEXT {pk}, created_at TEXT NOT NULL, input TEXT NOT NULL, output TEXT,"
                  " model_version TEXT, latency_ms REAL, tokens INTEGER, quality_score REAL, metadata TEXT NOT NULL,"
                  " logged_version TEXT)")
        if name == "sql_copy":
            c.execute("ATTACH DATABASE ? AS scratch", (str(scratch),))
        t = time.perf_counter()
        c.execute("BEGIN")
        if name == "sql_copy":
            c.execute("INSERT INTO records SELECT * FROM scratch.r ORDER BY id")
        else:
            c.executemany(f"INSERT INTO records VALUES ({marks})", rows)
        if pk:
            c.execute("CREATE INDEX records_created_at ON records (created_at)")
        c.execute("COMMIT")
        out[name] = len(rows) / (time.perf_counter() - t)
        c.close()
    for suffix in ("", "-wal", "-shm"):
        Path(f"{db}{suffix}").unlink(missing_ok=True)
    scratch.unlink()
    return out


def calibrate() -> dict[str, float]:
    """Raw speed of this machine: bare SQLite inserts (in memory) and orjson parsing, per second."""
    rows = [(f"{i:032x}", "2026-01-01T00:00:00.000000Z", "x" * 60, "y" * 80, "1.0", 1.0, None, None, "{}")
            for i in range(100_000)]
    c = sqlite3.connect(":memory:")
    c.execute("CREATE TABLE r (id TEXT PRIMARY KEY, a, b, c, d, e, f, g, h)")
    t = time.perf_counter()
    c.executemany("INSERT INTO r VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", rows)
    c.commit()
    sqlite_rate = len(rows) / (time.perf_counter() - t)
    line = orjson.dumps({"request_id": "a" * 32, "input": [{"role": "user", "content": "x" * 50}],
                         "output": "y" * 80, "metadata": {"site": "p"}, "timestamp": "2026-01-01T00:00:00Z"})
    t = time.perf_counter()
    for _ in range(100_000):
        orjson.loads(line)
    return {"sqlite_bare_inserts_per_s": sqlite_rate, "orjson_loads_per_s": 100_000 / (time.perf_counter() - t)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="Small sizes: runs in seconds.")
    parser.add_argument("--sizes", type=lambda v: [int(x) for x in v.split(",")],
                        help="Comma-separated record counts instead of the defaults (e.g. 100000).")
    parser.add_argument("--out", type=Path, help="Report path (default: bench/RESULTS-feedback.md, or under "
                        ".bench-out/ with --quick).")
    args = parser.parse_args()
    sizes = args.sizes or ([1_000, 5_000, 20_000] if args.quick else [10_000, 100_000, 1_000_000])
    updates = 2_000 if args.quick else 100_000
    naive_updates = 3 if args.quick else 5
    out = args.out or (WORK / "RESULTS-feedback-quick.md" if args.quick else ROOT / "bench" / "RESULTS-feedback.md")
    WORK.mkdir(parents=True, exist_ok=True)

    cal = calibrate()
    print(f"calibration: {cal}", flush=True)
    results = []
    for n in sizes:
        log = WORK / f"log-{n}.jsonl"
        make_log(log, n)
        size_mb = log.stat().st_size / 1e6
        workers = import_workers(log.stat().st_size, None)
        inline = None
        if log.stat().st_size >= IMPORT_PARALLEL_BYTES:  # the other way of parsing, for comparison
            other_workers = 2 if workers == 1 else 1
            load_before = os.getloadavg()[0]
            other, rate, cpu_rate = bench_import(log, WORK / f"store-{n}-other.db", workers=other_workers)
            other.close()
            inline = {"workers": other_workers, "import_per_s": rate, "import_per_cpu_s": cpu_rate,
                      "load": (load_before, os.getloadavg()[0])}
            print(f"{n:,} records, workers={other_workers}: {inline}", flush=True)
        load_before = os.getloadavg()[0]
        store, import_rate, import_cpu_rate = bench_import(log, WORK / f"store-{n}.db")
        load_after = os.getloadavg()[0]
        db = WORK / f"store-{n}.db"
        wal_after_import = file_mb(Path(f"{db}-wal"))
        k = min(updates, n)
        single, batched = bench_feedback(store, ids_of(log, k))
        naive = bench_naive(log, ids_of(log, naive_updates, seed=2)) if n != sizes[-1] or len(sizes) == 1 else None
        db_mb, wal_mb = file_mb(db), file_mb(Path(f"{db}-wal"))
        store.close()
        row = {"n": n, "log_mb": size_mb, "db_mb": db_mb, "wal_mb": wal_mb, "wal_after_import_mb": wal_after_import,
               "workers": workers, "import_per_s": import_rate, "import_per_cpu_s": import_cpu_rate,
               "load": (load_before, load_after), "inline": inline, "updates": k,
               "feedback_per_s": single, "feedback_many_per_s": batched, "naive_s_per_update": naive}
        results.append(row)
        print(row, flush=True)
    floor = sqlite_floor(WORK / f"log-{sizes[-1]}.jsonl", WORK / "floor.db")
    print(f"SQLite floor at {sizes[-1]:,} rows: {floor}", flush=True)
    results[-1]["floor"] = floor
    # The naive cost grows with the file: extrapolate the largest size from the one below it.
    if results[-1]["naive_s_per_update"] is None:
        measured = [r for r in results if r["naive_s_per_update"] is not None]
        per_record = measured[-1]["naive_s_per_update"] / measured[-1]["n"]
        results[-1]["naive_s_per_update"] = per_record * results[-1]["n"]
        results[-1]["naive_extrapolated"] = True
    write_report(out, results, cal, naive_updates, args.quick)
    print(f"report: {out}")


def _dur(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:,.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:,.0f} min"
    return f"{seconds / 3600:,.1f} h"


def write_report(out: Path, results: list[dict], cal: dict, naive_updates: int, quick: bool) -> None:
    cpus = os.cpu_count()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    lines = [
        "# Feedback store benchmark" + (" (quick)" if quick else ""),
        "",
        f"- Date: {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC",
        f"- Machine: {cpus} cores, {platform.machine()}, Python {platform.python_version()}, "
        f"SQLite {sqlite3.sqlite_version}; load average at the end {load:.1f} (other jobs shared the cores)",
        f"- Calibration on this machine: bare SQLite executemany into an in-memory table "
        f"{cal['sqlite_bare_inserts_per_s']:,.0f} rows/s; orjson.loads of a 250-byte line "
        f"{cal['orjson_loads_per_s']:,.0f}/s",
        "- Command: `.venv/bin/python bench/bench_feedback.py" + (" --quick`" if quick else "`"),
        "",
        "| records | JSONL MB | DB MB (+ WAL MB) | import workers | import records/s | import records/CPU-s "
        "| load before → after import | "
        "feedback updates/s (1 tx each) | feedback_many rows/s | naive rewrite s/update | store speedup per update |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in results:
        naive = r["naive_s_per_update"]
        mark = " (extrapolated)" if r.get("naive_extrapolated") else ""
        speedup = naive * r["feedback_per_s"]
        lines.append(
            f"| {r['n']:,} | {r['log_mb']:.0f} | {r['db_mb']:.0f} (+ {r['wal_mb']:.0f}) | {r['workers']} "
            f"| {r['import_per_s']:,.0f} | {r['import_per_cpu_s']:,.0f} | {r['load'][0]:.1f} → {r['load'][1]:.1f} "
            f"| {r['feedback_per_s']:,.0f} ({r['updates']:,} updates) | {r['feedback_many_per_s']:,.0f} "
            f"| {naive:.3f}{mark} | {speedup:,.0f}x |"
        )
    inline = [r for r in results if r["inline"]]
    if inline:
        lines += ["", "The same imports the other way (`workers=1`: parsed in the importing process; `workers=2`: "
                  "by two forked workers), each run just before the row above:", "",
                  "| records | import workers | import records/s | import records/CPU-s | load before → after |",
                  "| ---: | ---: | ---: | ---: | ---: |"]
        lines += [f"| {r['n']:,} | {r['inline']['workers']} | {r['inline']['import_per_s']:,.0f} "
                  f"| {r['inline']['import_per_cpu_s']:,.0f} "
                  f"| {r['inline']['load'][0]:.1f} → {r['inline']['load'][1]:.1f} |" for r in inline]
    big = results[-1]
    lines += [
        "",
        "Notes:",
        f"- Import: `FeedbackStore.import_jsonl` of shape-(a) lines (10% with user feedback) into a fresh "
        "WAL database: parsed into scratch SQLite files (by forked workers, one per core, for files of "
        "16 MB or more on 2 or more cores; else by the importing process), then copied in one transaction (the secondary indexes dropped and rebuilt inside "
        "it). records/CPU-s divides by the import's CPU time (user + system, of this process and of its "
        "workers), which the other jobs on the cores disturb much less than the wall clock.",
        f"- DB MB is the database file after the feedback updates below, WAL MB its write-ahead log then. "
        f"Right after the {big['n']:,}-record import the WAL was {big['wal_after_import_mb']:.0f} MB (the whole "
        "import passes through it); once checkpointed, the next write cuts a WAL over `WAL_SIZE_LIMIT` "
        "(64 MB) back to that size.",
        f"- Feedback updates: `FeedbackStore.feedback()` on random logged ids, one `BEGIN IMMEDIATE` "
        "transaction each (the serving path), then the same count again through `feedback_many` in "
        "batches of 10,000.",
        f"- Naive: load the JSONL log, set one record's `user_feedback`, rewrite the whole file atomically; "
        f"timed over {naive_updates} updates at the smaller sizes, mean per update. The {big['n']:,}-record "
        "figure is extrapolated linearly from the next size down (cost is proportional to the file), "
        "not measured.",
        f"- At {big['n']:,} records, {big['updates']:,} feedback updates take "
        f"{_dur(big['updates'] / big['feedback_per_s'])} in the store; the naive approach would take "
        f"about {_dur(big['updates'] * big['naive_s_per_update'])}"
        + (" (extrapolated)." if big.get("naive_extrapolated") else "."),
        f"- Import target (>= 100,000 records/s): {'met' if big['import_per_s'] >= 100_000 else 'NOT met'} "
        f"at {big['n']:,} records ({big['import_per_s']:,.0f}/s).",
        f"- SQLite floor in the same run, the same {big['n']:,} rows parsed and checked beforehand (not "
        "timed), sorted by id, one `executemany`: into a fresh WAL file with only the records table, its "
        f"primary key and its created_at index, COMMIT included, {big['floor']['file_pk_index_commit']:,.0f} "
        f"rows/s; into an in-memory table without any index, {big['floor']['memory_no_index']:,.0f} rows/s. "
        "Without Python per row, the same rows copied by SQLite itself (`INSERT ... SELECT ... ORDER BY id` "
        "from a scratch file filled beforehand, into the same fresh file, index and COMMIT included): "
        f"{big['floor']['sql_copy']:,.0f} rows/s. The import does all of this and more (parsing and "
        "checking each line, the feedback rows, two more indexes).",
    ]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
