"""Load test of ``cl-release serve`` over real loopback HTTP.

Starts the collector as its own process (``cl-release serve --port 0``) on a scratch release
repository, then runs N concurrent keep-alive clients (threads in this process), each sending
M ``POST /log`` requests, and checks that every record reached the store exactly once.

    .venv/bin/python bench/bench_serve.py [--clients 8] [--requests 2000] [--feedback]

Writes the numbers to stdout (and, with --out FILE, as JSON).
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

TOKEN = "bench-token"


def start_server(root: Path) -> tuple[subprocess.Popen, str, int]:
    env = {**os.environ, "CL_RELEASE_TOKEN": TOKEN}
    proc = subprocess.Popen([sys.executable, "-c", "from cl_release.cli import main; main()", "-C", str(root), "serve", "--port", "0"],
                            env=env, stderr=subprocess.PIPE, text=True)
    line = proc.stderr.readline()
    m = re.search(r"http://([\d.]+):(\d+)", line)
    if not m:
        proc.kill()
        raise SystemExit(f"server did not start: {line}{proc.stderr.read()}")
    return proc, m[1], int(m[2])


def client(host: str, port: int, c: int, n: int, feedback: bool, latencies: list, errors: list) -> None:
    conn = http.client.HTTPConnection(host, port, timeout=60)
    headers = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}
    try:
        for i in range(n):
            rid = f"c{c}-{i}"
            body = json.dumps({"input": f"question {c} {i}", "output": "answer", "request_id": rid,
                               "route_key": f"user-{c}-{i % 50}", "latency_ms": 12.0})
            t = time.perf_counter()
            conn.request("POST", "/log", body=body, headers=headers)
            r = conn.getresponse()
            r.read()
            if r.status != 201:
                errors.append(r.status)
            if feedback:
                conn.request("POST", "/feedback", body=json.dumps({"request_id": rid, "rating": 5}), headers=headers)
                r2 = conn.getresponse()
                r2.read()
                if r2.status != 201:
                    errors.append(r2.status)
            latencies.append(time.perf_counter() - t)
    finally:
        conn.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--requests", type=int, default=2000, help="POST /log per client")
    ap.add_argument("--feedback", action="store_true", help="also POST /feedback after each log")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()

    from cl_release.feedback import FeedbackStore
    from cl_release.registry import Registry
    from cl_release.scaffold import init_repository

    with tempfile.TemporaryDirectory() as tmp:
        root = init_repository(Path(tmp) / "repo")
        # A registry with one version so GET /route and route_key work.
        reg = Registry(root)
        with reg.transaction() as data:
            data["models"].append({
                "version": "1.0.0", "parent": None, "bump": "major", "strategy": "initial", "status": "released",
                "created_at": "2026-01-01T00:00:00Z", "base_model": {"name": "org/base"},
                "adapter": {"path": "outputs/v1.0.0/adapter", "sha256": "0" * 64}, "datasets": [],
                "config": {"path": "outputs/v1.0.0/axolotl.yml", "sha256": "1" * 64}, "seed": 42,
                "launch": {"num_processes": 1, "num_machines": 1}, "training": {}, "toolchain": {},
                "source_commit": None})
            data["current"] = "1.0.0"
            data["aliases"] = {"champion": "1.0.0"}
        proc, host, port = start_server(root)
        latencies: list[float] = []
        errors: list[int] = []
        try:
            threads = [threading.Thread(target=client, args=(host, port, c, args.requests, args.feedback,
                                                               latencies, errors)) for c in range(args.clients)]
            started = time.perf_counter()
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            seconds = time.perf_counter() - started
        finally:
            proc.terminate()
            proc.wait(timeout=10)
        store = FeedbackStore(root / ".cl-release" / "feedback.db")
        stored = store.count()
        expected = args.clients * args.requests
        latencies.sort()
        http_requests = expected * (2 if args.feedback else 1)
        result = {
            "clients": args.clients, "logs": expected, "http_requests": http_requests, "seconds": round(seconds, 2),
            "requests_per_second": round(http_requests / seconds), "stored": stored, "lost": expected - stored,
            "errors": len(errors), "p50_ms": round(1000 * latencies[len(latencies) // 2], 2),
            "p99_ms": round(1000 * latencies[int(len(latencies) * 0.99)], 2),
            "cpus": os.cpu_count(), "python": platform.python_version(),
        }
        print(json.dumps(result, indent=2))
        if args.out:
            args.out.write_text(json.dumps(result, indent=2) + "\n")
        if result["lost"] or errors:
            raise SystemExit("lost records or errors")


if __name__ == "__main__":
    main()
