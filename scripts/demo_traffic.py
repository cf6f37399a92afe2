"""Drive a running gateway like production would: N users (distinct keys) ask questions through the
project name, so the A/B router picks their version; some of them rate the answer.

    python scripts/demo_traffic.py --url http://127.0.0.1:8765 --requests 300 [--clients 8]

The token comes from CL_RELEASE_TOKEN. Standard library only. Prints what each version served and
exits non-zero if a request failed or an answer is missing from the store's view (``/stats``).
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from urllib.parse import urlsplit

QUESTIONS_FROM = Path(__file__).resolve().parent.parent / "datasets" / "demo"


def questions() -> list[str]:
    out = []
    for path in sorted(QUESTIONS_FROM.rglob("*.jsonl")):
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                msgs = json.loads(line).get("messages") or []
                out += [m["content"] for m in msgs if m.get("role") == "user"]
    return out or ["What is the IDLH of ammonia?"]


class Client:
    def __init__(self, url: str, token: str):
        u = urlsplit(url)
        self.conn = http.client.HTTPConnection(u.hostname, u.port or 80, timeout=300)
        self.headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}

    def post(self, path: str, body: dict) -> tuple[int, dict, http.client.HTTPResponse]:
        self.conn.request("POST", path, body=json.dumps(body), headers=self.headers)
        r = self.conn.getresponse()
        data = r.read()
        return r.status, json.loads(data) if data else {}, r


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--url", required=True)
    ap.add_argument("--model", default=None, help="what to ask for (default: the project name from /v1/models)")
    ap.add_argument("--requests", type=int, default=300)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--feedback-every", type=int, default=3, help="one user in N rates the answer")
    ap.add_argument("--seed", type=int, default=7)
    args = ap.parse_args()
    token = os.environ.get("CL_RELEASE_TOKEN", "")
    if not token:
        print("set CL_RELEASE_TOKEN", file=sys.stderr)
        return 2
    u = urlsplit(args.url)
    probe = http.client.HTTPConnection(u.hostname, u.port or 80, timeout=30)
    probe.request("GET", "/v1/models", headers={"Authorization": f"Bearer {token}"})
    models = json.loads(probe.getresponse().read())["data"]
    model = args.model or models[0]["id"]  # the project name: the router decides per user
    qs = questions()
    rng = random.Random(args.seed)
    served: dict[int, str] = {}
    ids: dict[int, str] = {}
    failures: list[str] = []
    rated = Counter()
    lock = threading.Lock()

    def user(c: int) -> None:
        client = Client(args.url, token)
        for i in range(c, args.requests, args.clients):
            q = qs[i % len(qs)]
            status, out, r = client.post("/v1/chat/completions", {
                "model": model, "user": f"user-{i}", "max_tokens": args.max_tokens, "temperature": 0,
                "messages": [{"role": "user", "content": q}]})
            if status != 200:
                with lock:
                    failures.append(f"user-{i}: {status} {out}")
                continue
            version = r.getheader("X-CL-Release-Version")
            with lock:
                served[i], ids[i] = version, out["id"]
            if i % args.feedback_every == 0:
                good = rng.random() < 0.7
                fb = {"request_id": out["id"], "rating": 5 if good else 2}
                status, out, _ = client.post("/feedback", fb)
                if status != 201:
                    with lock:
                        failures.append(f"feedback user-{i}: {status} {out}")
                else:
                    with lock:
                        rated[version] += 1

    started = time.perf_counter()
    threads = [threading.Thread(target=user, args=(c,)) for c in range(args.clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - started
    per = Counter(served.values())
    print(f"{len(served)} answers from {model!r} in {seconds:.1f} s ({len(served) / seconds:.1f}/s, "
          f"{args.clients} clients, distinct user keys)")
    for v, n in sorted(per.items()):
        print(f"  {v}: {n} answers ({n / max(1, len(served)):.0%}), {rated[v]} rated")
    for f in failures[:5]:
        print(f"  failed: {f}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
