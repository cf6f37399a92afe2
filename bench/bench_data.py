"""Benchmarks for training-data builds and file hashing.

    .venv/bin/python bench/bench_data.py            # 1,000,000 rows, 1 GiB file
    .venv/bin/python bench/bench_data.py --quick    # 20,000 rows, 64 MiB file: seconds
    .venv/bin/python bench/bench_data.py --only-store --no-hash --store .bench-out/fb-1m.db [--compare]
        # the store build alone, filling .bench-out/fb-1m.db on the first run (minutes) only;
        # --compare also builds from the row dicts (the previous path) and checks the bytes

1. ``extract.build`` over 1,000,000 feedback rows (dedupe and PII redaction on, the
   defaults), from rows in memory and, when ``cl_release.store.sqlite`` is present, streamed
   from a FeedbackStore. Target: <= 10 s for the in-memory build.
2. ``files.sha256_file`` vs ``sha256sum`` on the same 1 GiB file, page cache warm, best of
   3 alternating runs. Target: >= 90% of sha256sum's throughput.

Scratch files go to ``.bench-out/`` (git-ignored) and are removed afterwards. Results are
printed as Markdown and written to ``.bench-out/bench_data.json``.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cl_release.data.build import ExtractionRules, build  # noqa: E402
from cl_release.files import sha256_file  # noqa: E402

QUESTIONS = [
    "What is the IDLH for ammonia in a refrigeration plant?",
    "How do I isolate valve {k} before maintenance on line {m}?",
    "Reading {k} ppm on the hydrogen sulfide monitor in zone {m}: what now?",
    "Lockout/tagout steps for conveyor {k}; supervisor is jane.{m}@plant.example",
    "Call back 555-{m:03d}-{k:04d} about the chlorine cylinder {k} leak check.",
]
ANSWER = "Close valve {k} slowly, confirm zero pressure on gauge {m}, then apply lock {k}-{m} and tag it."


def make_rows(n: int, *, usable_only: bool = False, seed: int = 0) -> list[dict]:
    """Feedback rows with ~20% near-duplicates and a realistic mix of feedback.

    Mix: 35% rating >= 4, 15% negative with correction, 10% negative without, 20% neutral,
    20% no feedback. ``usable_only``: every row is kept or corrected (worst case).
    """
    rnd = random.Random(seed)
    rows = []
    distinct = max(1, int(n * 0.8))
    for i in range(n):
        k = rnd.randrange(distinct)
        m = k % 997
        q = QUESTIONS[k % len(QUESTIONS)].format(k=k % 10000, m=m)
        if k % 3 == 0:  # near-duplicates differ in case and spacing
            q = q.upper() if rnd.random() < 0.5 else q.replace(" ", "  ")
        p = rnd.random()
        if usable_only:
            p *= 0.5
        fb: dict = {"rating": None, "thumbs": None, "correction": None, "hallucinated": None, "quality_score": None}
        if p < 0.35:
            fb["rating"] = 4 + (i & 1)
        elif p < 0.50:
            fb.update(rating=1, correction=f"Do not open valve {k}; call the shift lead first.")
        elif p < 0.60:
            fb["thumbs"] = -1
        elif p < 0.80:
            fb["rating"] = 3
        secs = i % 86400
        rows.append({
            "id": f"{i:012x}",
            "created_at": f"2026-{1 + i % 12:02d}-{1 + i % 28:02d}T{secs // 3600:02d}:{secs // 60 % 60:02d}:{secs % 60:02d}.{i % 1000000:06d}Z",
            "input": q,
            "output": ANSWER.format(k=k, m=m),
            "model_version": "1.0.0",
            "latency_ms": 120.0,
            "tokens": 40,
            "metadata": {},
            "notes": None,
            "error_tag": None,
            "severity": None,
            "annotator": None,
            "feedback_at": None,
            **fb,
        })
    return rows


CPU_SECONDS: list[float] = []  # CPU time of the last timed() call: this process, its workers


def timed(fn, *args, gc_after: bool = False, **kwargs):
    """Wall seconds (and, in CPU_SECONDS, this process's CPU seconds) of one call.

    ``gc_after``: include a young-generation collection after the call, so that work the
    call leaves to the garbage collector (objects made while it was paused) is counted.
    """
    c, w = time.process_time(), _children_cpu()
    t = time.perf_counter()
    out = fn(*args, **kwargs)
    if gc_after:
        gc.collect(0)
    wall = time.perf_counter() - t
    CPU_SECONDS[:] = [time.process_time() - c, _children_cpu() - w]
    return wall, out


def _children_cpu() -> float:
    """CPU seconds of this process's finished children (the store build's forked workers)."""
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def calibrate() -> float:
    """Seconds for a fixed pure-Python loop (about 0.15-0.25 s on one idle modern core):
    tells a reader how busy or slow the machine was while the numbers were taken."""
    t = time.perf_counter()
    sum(range(10_000_000))
    return round(time.perf_counter() - t, 3)


def bench_build(n: int, only_default: bool = False) -> list[dict]:
    results = []
    cases = [
        ("mixed feedback, redaction on (default)", False, ExtractionRules()),
        ("mixed feedback, redaction off", False, ExtractionRules(redact_pii=False)),
        ("every row usable, redaction on", True, ExtractionRules()),
    ]
    for label, usable_only, rules in cases[:1] if only_default else cases:
        rows = make_rows(n, usable_only=usable_only)
        secs, res = timed(build, rows, rules, gc_after=True)
        cpu, load_after = CPU_SECONDS[0], load()
        # the example dicts are made on first use (release planning uses them; `data build`
        # and the triggers need only the bytes and the manifest): timed apart
        dict_secs, _ = timed(lambda: res.examples, gc_after=True)
        m = res.manifest
        results.append({
            "case": f"in memory: {label}", "rows": n, "seconds": round(secs, 2), "cpu_seconds": round(cpu, 2),
            "load": load_after, "rows_per_s": round(n / secs), "examples": m["examples"],
            "duplicates": m["skipped"].get("duplicate", 0), "bytes": m["bytes"], "sha256": m["sha256"],
            "corrections_sha256": m["corrections"]["sha256"],
            "example_dicts_seconds": round(dict_secs, 2), "example_dicts_cpu_seconds": round(CPU_SECONDS[0], 2),
        })
        print(f"  {results[-1]}", flush=True)
        del rows, res
    return results


def load() -> float:
    """The 1-minute load average (NaN where the OS has none): how busy the machine was."""
    return round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else float("nan")


def bench_store(n: int, scratch: Path, keep: Path | None = None, compare: bool = False) -> list[dict]:
    """Build from ``FeedbackStore.rows()`` over the same rows. ``keep``: a store file to fill
    once and reuse on later runs (filling a million rows takes minutes). ``compare``: also
    build from the same rows read as dicts (the generic path, as before the store build
    existed) and check that both give the same bytes and manifest."""
    try:
        from cl_release.store.sqlite import FeedbackStore
    except ImportError:
        print("  (no cl_release.store.sqlite: store benchmark skipped)")
        return []
    path = keep or scratch / "feedback.db"
    store = FeedbackStore(path)
    fill = None
    if store.count() != n:
        if store.count():
            raise SystemExit(f"{path} holds {store.count():,} records, not {n:,}: remove it or pick another --store")
        rows = make_rows(n)
        t = time.perf_counter()
        store.log_many(
            {"request_id": r["id"], "input": r["input"], "output": r["output"], "model_version": r["model_version"],
             "created_at": r["created_at"]} for r in rows
        )
        fb = [
            {"request_id": r["id"], "rating": r["rating"], "thumbs": r["thumbs"], "correction": r["correction"],
             "created_at": r["created_at"]}
            for r in rows if r["rating"] is not None or r["thumbs"] is not None
        ]
        store.feedback_many(fb)
        fill = round(time.perf_counter() - t, 1)
        del rows, fb
    results = []
    runs = [("from FeedbackStore.rows(): store build, mixed feedback, redaction on", lambda: store.rows(), None),
            ("the same, one process (workers=1)", lambda: store.rows(), 1)]
    if compare:  # the previous path: the row dicts, as any iterable of rows is read
        runs.append(("from FeedbackStore.rows() as dicts (previous path)", lambda: (r for r in store.rows()), None))
    first = None
    for label, rows, workers in runs:
        gc.collect()
        load_before = load()
        secs, res = timed(lambda: build(rows(), ExtractionRules(), workers=workers), gc_after=True)
        out = {
            "case": label, "rows": n, "seconds": round(secs, 2), "cpu_seconds": round(sum(CPU_SECONDS), 2),
            "worker_cpu_seconds": round(CPU_SECONDS[1], 2), "load_before": load_before, "load": load(),
            "rows_per_s": round(n / secs), "examples": res.manifest["examples"],
            "duplicates": res.manifest["skipped"].get("duplicate", 0), "bytes": res.manifest["bytes"],
            "sha256": res.manifest["sha256"], "corrections_sha256": res.manifest["corrections"]["sha256"],
            "store_fill_seconds": fill,
        }
        if first is None:
            first = res
        else:  # byte-identical: data, corrections and the whole manifest
            out["identical_to_store_build"] = (res.data == first.data and res.corrections_data == first.corrections_data
                                               and res.manifest == first.manifest)
            assert out["identical_to_store_build"], "the store build and the dict build differ"
        print(f"  {out}", flush=True)
        results.append(out)
        del res
    store.close()
    return results


def bench_hash(size: int, scratch: Path, repeats: int = 3) -> dict:
    path = scratch / "blob.bin"
    block = os.urandom(64 * 1024 * 1024)
    with open(path, "wb") as f:
        left = size
        while left > 0:
            f.write(block[: min(left, len(block))])
            left -= len(block)
    del block
    expected = None
    best = {"sha256_file": float("inf"), "sha256sum": float("inf")}
    for _ in range(repeats):
        secs, out = timed(subprocess.run, ["sha256sum", str(path)], check=True, capture_output=True, text=True)
        best["sha256sum"] = min(best["sha256sum"], secs)
        expected = out.stdout.split()[0]
        secs, digest = timed(sha256_file, path)
        best["sha256_file"] = min(best["sha256_file"], secs)
        assert digest == expected, "sha256_file disagrees with sha256sum"
    if shutil.which("openssl"):  # reference only: OpenSSL's own SHA-256 (what hashlib uses)
        best["openssl"] = min(
            timed(subprocess.run, ["openssl", "dgst", "-sha256", str(path)], check=True, capture_output=True)[0]
            for _ in range(repeats)
        )
    path.unlink()
    mib = size / (1024 * 1024)
    out = {
        "bytes": size,
        "sha256sum_s": round(best["sha256sum"], 3),
        "sha256_file_s": round(best["sha256_file"], 3),
        "sha256sum_MiB_s": round(mib / best["sha256sum"]),
        "sha256_file_MiB_s": round(mib / best["sha256_file"]),
        "ratio": round(best["sha256sum"] / best["sha256_file"], 3),
        "sha256sum_version": subprocess.run(["sha256sum", "--version"], capture_output=True, text=True).stdout.split("\n")[0],
    }
    if "openssl" in best:
        out["openssl_MiB_s"] = round(mib / best["openssl"])
    print(f"  {out}", flush=True)
    return out


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return f"{cpu}, {os.cpu_count()} CPUs, Python {platform.python_version()}, load average {load:.2f} at start"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small sizes: runs in seconds")
    ap.add_argument("--rows", type=int, default=None)
    ap.add_argument("--hash-mib", type=int, default=None)
    ap.add_argument("--no-store", action="store_true", help="skip the FeedbackStore benchmark")
    ap.add_argument("--only-default", action="store_true", help="in memory: only the default rules on mixed feedback")
    ap.add_argument("--only-store", action="store_true", help="skip the in-memory builds")
    ap.add_argument("--store", type=Path, default=None, metavar="DB",
                    help="fill this feedback store once and reuse it on later runs (default: a scratch store)")
    ap.add_argument("--compare", action="store_true",
                    help="store: also build from the row dicts (the previous path) and check the bytes are the same")
    ap.add_argument("--no-hash", action="store_true", help="skip the file hashing benchmark")
    args = ap.parse_args()
    n = args.rows or (20_000 if args.quick else 1_000_000)
    size = (args.hash_mib or (64 if args.quick else 1024)) * 1024 * 1024
    out_dir = ROOT / ".bench-out"
    out_dir.mkdir(exist_ok=True)
    scratch = Path(tempfile.mkdtemp(dir=out_dir))
    report = {"date": time.strftime("%Y-%m-%d %H:%M %Z"), "machine": machine(), "rows": n, "hash_bytes": size}
    report["calibration_s"] = calibrate()
    print(f"# bench_data {report['date']} on {report['machine']}; calibration loop {report['calibration_s']} s", flush=True)
    try:
        print(f"build, {n:,} rows:", flush=True)
        report["build"] = [] if args.only_store else bench_build(n, args.only_default)
        if not args.no_store:
            report["build"] += bench_store(n, scratch, args.store, args.compare)
        if not args.no_hash:
            print(f"hash, {size // (1024 * 1024)} MiB:", flush=True)
            report["hash"] = bench_hash(size, scratch)
        report["calibration_end_s"] = calibrate()
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    (out_dir / "bench_data.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"\ncalibration loop: {report['calibration_s']} s at start, {report['calibration_end_s']} s at end")
    print("\n| case | rows | wall s | CPU s | load | rows/s (wall) | examples | duplicates |\n|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in report["build"]:
        print(f"| {r['case']} | {r['rows']:,} | {r['seconds']} | {r['cpu_seconds']} | {r['load']} | {r['rows_per_s']:,} "
              f"| {r['examples']:,} | {r['duplicates']:,} |")
    if "hash" not in report:
        return
    h = report["hash"]
    print(f"\nsha256_file {h['sha256_file_MiB_s']} MiB/s vs sha256sum {h['sha256sum_MiB_s']} MiB/s: {h['ratio']:.0%}"
          + (f" (openssl dgst {h['openssl_MiB_s']} MiB/s)" if "openssl_MiB_s" in h else ""))


if __name__ == "__main__":
    main()
