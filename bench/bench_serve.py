"""Benchmarks of ``cl-release serve`` (the FastAPI gateway), each side by side with its baseline in
one run, interleaved round by round so both see the same machine load:

1. ``/log`` throughput: the gateway (``--backend none``; ``synchronous`` full, the default, and
   normal) vs the old ``ThreadingHTTPServer`` collector (``bench/old_collector.py``), each as its
   own process on a fresh scratch release repository; N keep-alive clients send M ``POST /log``
   each; every record must be in the store exactly once (lost = sent - stored).
2. Proxy overhead: ``POST /v1/chat/completions`` through the gateway (``--backend openai``) vs
   the same fake vLLM (``tests/fakevllm.py``, its own process) called directly, N concurrent
   clients; the added latency is the difference of the percentiles, non-streaming and streaming
   (time to the last byte), with an upstream that answers at once (the cores saturate) and one
   that takes 20 ms (a fast model). Every proxied answer must be in the store.
3. Local backend: dynamic batching (``max_batch`` 8) vs one request at a time (``max_batch`` 1) on
   the tiny model with a LoRA adapter, N concurrent clients, greedy; tokens/s and whether every
   answer is identical.

The clients are threads of this process on raw sockets (:class:`Conn`): ``http.client`` costs
about 0.6 ms of CPU per request here, so with it 8 clients, not the servers, fill 2 cores.

    .venv/bin/python bench/bench_serve.py [--quick] [--clients 8] [--requests 2000] [--rounds 2]
                                          [--parts log,proxy,local] [--upstream-delays 0,20] [--out F.json]

``--quick``: small sizes (a minute or two). Prints JSON; ``--out`` writes it too.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
TOKEN = "bench-token"


# ---------------------------------------------------------------- processes


def start(argv: list[str], pattern: str = r"http://([\d.]+):(\d+)", env: dict | None = None) -> tuple[subprocess.Popen, str, int]:
    """Start a server process; its first stderr line names its URL."""
    proc = subprocess.Popen(argv, env={**os.environ, "CL_RELEASE_TOKEN": TOKEN, **(env or {})},
                            stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    line = proc.stderr.readline()
    m = re.search(pattern, line)
    if not m:
        proc.kill()
        raise SystemExit(f"server did not start: {' '.join(argv)}: {line}{proc.stderr.read()}")
    threading.Thread(target=proc.stderr.read, daemon=True).start()  # drain
    return proc, m[1], int(m[2])


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def scratch_repo(parent: Path, name: str, serve: str = "") -> Path:
    """A release repository with one released version (1.0.0, champion): enough for routing.
    ``serve``: lines of the ``serve:`` section."""
    from cl_release.registry import Registry
    from cl_release.release.scaffold import init_repository

    root = init_repository(parent / name)
    if serve:
        with open(root / "cl-release.yaml", "a") as f:
            f.write("serve:\n" + "".join(f"  {line}\n" for line in serve.splitlines()))
    with Registry(root).transaction() as data:
        data["models"].append({
            "version": "1.0.0", "parent": None, "bump": "major", "strategy": "initial", "status": "released",
            "created_at": "2026-01-01T00:00:00Z", "base_model": {"name": "org/base"},
            "adapter": {"path": "outputs/v1.0.0/adapter", "sha256": "0" * 64}, "datasets": [],
            "config": {"path": "outputs/v1.0.0/axolotl.yml", "sha256": "1" * 64}, "seed": 42,
            "launch": {"num_processes": 1, "num_machines": 1}, "training": {}, "toolchain": {},
            "source_commit": None})
        data["current"] = "1.0.0"
        data["aliases"] = {"champion": "1.0.0"}
    return root


def cl_release(root: Path, *args: str) -> list[str]:
    return [sys.executable, "-c", "from cl_release.cli import run; run()", "-C", str(root), *args]


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(len(xs) * q))]


def cpu_seconds(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return float("nan")


# ---------------------------------------------------------------- clients


class Conn:
    """A lean HTTP/1.1 keep-alive client on a raw socket (Content-Length and chunked answers).

    ``http.client`` costs about 0.6 ms of CPU per request here: with 8 of them the clients, not
    the server, would fill the 2 cores. Both servers of a comparison get the same client."""

    def __init__(self, host: str, port: int):
        import socket

        self.sock = socket.create_connection((host, port), timeout=120)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.head = (f"Host: {host}:{port}\r\nAuthorization: Bearer {TOKEN}\r\n"
                     "Content-Type: application/json\r\n").encode()
        self.buf = b""

    def _fill(self) -> None:
        data = self.sock.recv(262144)
        if not data:
            raise ConnectionError("the server closed the connection")
        self.buf += data

    def _take(self, n: int) -> bytes:
        while len(self.buf) < n:
            self._fill()
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def _line(self) -> bytes:
        while b"\r\n" not in self.buf:
            self._fill()
        line, _, self.buf = self.buf.partition(b"\r\n")
        return line

    def post(self, path: str, body: bytes) -> tuple[int, bytes]:
        self.sock.sendall(b"POST " + path.encode() + b" HTTP/1.1\r\n" + self.head
                          + b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        while b"\r\n\r\n" not in self.buf:
            self._fill()
        head, _, self.buf = self.buf.partition(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        status = int(lines[0].split()[1])
        headers = {k.strip().lower(): v.strip() for k, _, v in (x.partition(b":") for x in lines[1:])}
        if b"content-length" in headers:
            return status, self._take(int(headers[b"content-length"]))
        parts = []
        while True:  # chunked
            size = int(self._line().split(b";")[0], 16)
            if size == 0:
                self._line()
                return status, b"".join(parts)
            parts.append(self._take(size))
            self._line()

    def close(self) -> None:
        self.sock.close()


def run_clients(host: str, port: int, clients: int, n: int, make_body, path: str, expect: int,
                stream: bool = False) -> dict:
    latencies: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()

    def client(c: int) -> None:
        conn = Conn(host, port)
        mine = []
        try:
            for i in range(n):
                body = json.dumps(make_body(c, i)).encode()
                t = time.perf_counter()
                status, data = conn.post(path, body)
                mine.append(time.perf_counter() - t)
                if status != expect or (stream and not data.rstrip().endswith(b"[DONE]")):
                    with lock:
                        errors.append(f"{status}: {data[:200]!r}")
        except (OSError, ValueError) as e:
            with lock:
                errors.append(f"client {c}: {type(e).__name__}: {e}")
        finally:
            conn.close()
            with lock:
                latencies.extend(mine)

    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - started
    return {"seconds": round(seconds, 3), "requests": clients * n, "requests_per_second": round(clients * n / seconds, 1),
            "p50_ms": round(1000 * pct(latencies, 0.5), 3), "p99_ms": round(1000 * pct(latencies, 0.99), 3),
            "errors": len(errors), "first_error": errors[0] if errors else None}


# ---------------------------------------------------------------- 1. /log


def bench_log(tmp: Path, args) -> dict:
    from cl_release.store.sqlite import FeedbackStore

    gateway = lambda root: cl_release(root, "serve", "--port", "0", "--backend", "none")  # noqa: E731
    servers = {  # name: (argv, serve: lines)
        "old_collector": (lambda root: [sys.executable, str(HERE / "old_collector.py"), "-C", str(root), "--port", "0"], ""),
        "gateway": (gateway, ""),  # synchronous full: an fsync per group commit
        "gateway_sync_normal": (gateway, "synchronous: normal"),  # as the old collector: no fsync at commit
    }
    runs: dict[str, list[dict]] = {k: [] for k in servers}
    for rnd in range(args.rounds):
        for name, (argv, serve) in servers.items():
            root = scratch_repo(tmp, f"log-{name}-{rnd}", serve)
            proc, host, port = start(argv(root))
            try:
                cpu0 = cpu_seconds(proc.pid)
                res = run_clients(host, port, args.clients, args.requests,
                                  lambda c, i: {"input": f"question {c} {i}", "output": "answer",
                                                "request_id": f"c{c}-{i}", "route_key": f"user-{c}-{i % 50}",
                                                "latency_ms": 12.0}, "/log", 201)
                res["server_cpu_s"] = round(cpu_seconds(proc.pid) - cpu0, 2)
            finally:
                stop(proc)
            stored = FeedbackStore(root / ".cl-release" / "feedback.db").count()
            res.update(stored=stored, lost=res["requests"] - stored)
            runs[name].append(res)
            print(f"  /log {name:<14} round {rnd + 1}: {res['requests_per_second']:>7.0f} req/s, p50 {res['p50_ms']} ms, "
                  f"p99 {res['p99_ms']} ms, lost {res['lost']}, errors {res['errors']}", file=sys.stderr)
    best = {k: max(r["requests_per_second"] for r in v) for k, v in runs.items()}
    med = {k: statistics.median(r["requests_per_second"] for r in v) for k, v in runs.items()}
    return {"runs": runs, "best_rps": best, "median_rps": med,
            "speedup_median": round(med["gateway"] / med["old_collector"], 2),
            "speedup_vs_1034": round(med["gateway"] / 1034, 2),
            "speedup_normal_vs_1034": round(med["gateway_sync_normal"] / 1034, 2),
            "lost": sum(r["lost"] for v in runs.values() for r in v),
            "errors": sum(r["errors"] for v in runs.values() for r in v)}


# ---------------------------------------------------------------- 2. proxy overhead


def bench_proxy(tmp: Path, args) -> dict:
    """For each upstream delay (0: answers at once, so the 2 cores saturate; 20 ms: a fast model),
    rounds of direct / through the gateway, non-streaming and streaming."""
    out: dict[str, dict] = {}
    for delay in args.upstream_delays:
        up, uhost, uport = start([sys.executable, str(REPO / "tests" / "fakevllm.py"), "--port", "0", "--no-record",
                                  "--delay-ms", str(delay), "--lora", "v1.0.0=/adapters/v1.0.0"])
        root = scratch_repo(tmp, f"proxy-{delay}")
        gw, ghost, gport = start(cl_release(root, "serve", "--port", "0", "--backend", "openai", "--upstream-url",
                                            f"http://{uhost}:{uport}/v1"))
        runs: dict[str, list[dict]] = {}
        try:
            for rnd in range(args.rounds):
                for stream in (False, True):
                    for name, (host, port, model) in (("direct", (uhost, uport, "v1.0.0")),
                                                      ("gateway", (ghost, gport, "champion"))):
                        key = f"{name}{'_stream' if stream else ''}"
                        cpu0 = cpu_seconds(gw.pid)
                        res = run_clients(host, port, args.clients, args.proxy_requests,
                                          lambda c, i: {"model": model, "max_tokens": 16, "stream": stream,
                                                        "messages": [{"role": "user", "content": f"question {c} {i}"}]},
                                          "/v1/chat/completions", 200, stream=stream)
                        if name == "gateway":
                            res["gateway_cpu_ms_per_request"] = round(
                                1000 * (cpu_seconds(gw.pid) - cpu0) / res["requests"], 3)
                        runs.setdefault(key, []).append(res)
                        print(f"  proxy delay {delay:g} ms {key:<15} round {rnd + 1}: p50 {res['p50_ms']} ms, "
                              f"p99 {res['p99_ms']} ms, {res['requests_per_second']} req/s, errors {res['errors']}",
                              file=sys.stderr)
        finally:
            stop(gw)
            stop(up)
        from cl_release.store.sqlite import FeedbackStore

        summary = {"runs": runs, "logged": FeedbackStore(root / ".cl-release" / "feedback.db").count(),
                   "gateway_requests": sum(r["requests"] for k, v in runs.items() if k.startswith("gateway") for r in v),
                   "errors": sum(r["errors"] for v in runs.values() for r in v)}
        for suffix in ("", "_stream"):
            d, g = runs[f"direct{suffix}"], runs[f"gateway{suffix}"]
            summary[f"added{suffix or '_json'}"] = {
                "p50_ms": round(statistics.median(x["p50_ms"] for x in g) - statistics.median(x["p50_ms"] for x in d), 3),
                "p99_ms": round(statistics.median(x["p99_ms"] for x in g) - statistics.median(x["p99_ms"] for x in d), 3)}
        out[f"upstream_delay_{delay:g}ms"] = summary
    return out


# ---------------------------------------------------------------- 3. local batching


def tiny_release(tmp: Path) -> tuple[Path, dict]:
    """A folder with the tiny model under models/ and one adapter, and its registry entry."""
    from cl_release.files import sha256_file
    from cl_release.demo.model import build_tiny_model, corpus_from_jsonl

    root = tmp / "local"
    texts = corpus_from_jsonl(sorted((REPO / "datasets" / "demo").rglob("*.jsonl")))
    build_tiny_model(root / "models" / "tiny", texts, seed=0)
    sys.path.insert(0, str(REPO / "tests"))
    from helpers import random_adapter

    random_adapter(root / "models" / "tiny", root / "outputs" / "v1.0.0" / "adapter")
    entry = {"version": "1.0.0", "base_model": {"name": "models/tiny", "revision": None},
             "adapter": {"path": "outputs/v1.0.0/adapter",
                         "sha256": sha256_file(root / "outputs" / "v1.0.0" / "adapter" / "adapter_model.safetensors")}}
    return root, entry


def bench_local(tmp: Path, args) -> dict:
    from cl_release.serve.backends import Generation
    from cl_release.serve.backends.local import LocalBackend

    root, entry = tiny_release(tmp)
    questions = [f"What is the IDLH of {c}?" for c in ("ammonia", "chlorine", "benzene", "toluene", "methanol",
                                                        "acetone", "phosgene", "arsine", "bromine", "ozone",
                                                        "styrene", "xylene", "hexane", "fluorine", "hydrazine",
                                                        "phosphine")]
    results = {}
    answers = {}

    async def drive(backend: LocalBackend) -> tuple[float, int, dict]:
        await backend.start()
        warm = Generation(request_id="warm-up", version="1.0.0", max_tokens=args.local_tokens,
                          messages=[{"role": "user", "content": questions[0]}])
        await asyncio.gather(*(backend.complete(warm) for _ in range(args.clients)))  # first-call costs, untimed
        backend.batches.clear()
        got: dict[tuple, str] = {}
        tokens = 0

        async def client(c: int) -> None:
            nonlocal tokens
            for i in range(args.local_requests):
                q = questions[(c * args.local_requests + i) % len(questions)] + f" (client {c}, request {i})"
                gen = Generation(request_id=f"r{c}-{i}", version="1.0.0",
                                 messages=[{"role": "user", "content": q}], max_tokens=args.local_tokens)
                out = await backend.complete(gen)
                got[(c, i)] = out["choices"][0]["message"]["content"]
                tokens += out["usage"]["completion_tokens"]

        t = time.perf_counter()
        await asyncio.gather(*(client(c) for c in range(args.clients)))
        seconds = time.perf_counter() - t
        await backend.close()
        return seconds, tokens, got

    for rnd in range(args.local_rounds):
        for name, max_batch, wait in (("one_at_a_time", 1, 0.0), ("batched", 8, 2.0)):
            backend = LocalBackend(root, served=lambda: {"1.0.0": entry}, device="cpu", max_batch=max_batch,
                                   batch_wait_ms=wait, threads=args.local_threads)
            backend.warm()
            seconds, tokens, got = asyncio.run(drive(backend))
            res = {"seconds": round(seconds, 3), "completion_tokens": tokens,
                   "tokens_per_second": round(tokens / seconds, 1), "requests": len(got),
                   "mean_batch": round(statistics.mean(backend.batches), 2)}
            results.setdefault(name, []).append(res)
            answers.setdefault(name, got)
            print(f"  local {name:<14} round {rnd + 1}: {res['tokens_per_second']} tokens/s "
                  f"({tokens} tokens in {seconds:.2f} s, mean batch {res['mean_batch']})", file=sys.stderr)
    same = answers["batched"] == answers["one_at_a_time"]
    differ = [k for k in answers["batched"] if answers["batched"][k] != answers["one_at_a_time"].get(k)]
    med = {k: statistics.median(r["tokens_per_second"] for r in v) for k, v in results.items()}
    return {"runs": results, "median_tokens_per_second": med,
            "speedup": round(med["batched"] / med["one_at_a_time"], 2), "identical_answers": same,
            "differing": len(differ), "answers": len(answers["batched"]),
            "max_tokens": args.local_tokens, "torch_threads": args.local_threads or "default"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small sizes (a minute or two)")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--requests", type=int, default=2000, help="POST /log per client")
    ap.add_argument("--proxy-requests", type=int, default=500, help="chat completions per client and round")
    ap.add_argument("--local-requests", type=int, default=6, help="local completions per client and round")
    ap.add_argument("--local-tokens", type=int, default=32, help="max_tokens of each local completion")
    ap.add_argument("--local-rounds", type=int, default=3)
    ap.add_argument("--local-threads", type=int, default=1, help="torch threads of the local backend (0: torch's default)")
    ap.add_argument("--upstream-delays", default="0,20", help="fake upstream answer times in ms (comma-separated)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--parts", default="log,proxy,local")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    if args.quick:
        args.requests, args.proxy_requests, args.local_requests, args.local_tokens = 200, 100, 2, 16
        args.local_rounds = 1
    args.upstream_delays = [float(x) for x in args.upstream_delays.split(",")]
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    parts = set(args.parts.split(","))
    result = {"date": time.strftime("%Y-%m-%d %H:%M"), "cpus": os.cpu_count(), "python": platform.python_version(),
              "load_before": os.getloadavg(), "clients": args.clients, "rounds": args.rounds, "quick": args.quick}
    with tempfile.TemporaryDirectory() as t:
        tmp = Path(t)
        if "log" in parts:
            result["log"] = bench_log(tmp, args)
        if "proxy" in parts:
            result["proxy"] = bench_proxy(tmp, args)
        if "local" in parts:
            result["local"] = bench_local(tmp, args)
    result["load_after"] = os.getloadavg()
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    bad = (result.get("log", {}).get("lost") or result.get("log", {}).get("errors")
           or any(v["errors"] or v["logged"] != v["gateway_requests"] for v in result.get("proxy", {}).values()))
    if bad or ("local" in result and not result["local"]["identical_answers"]):
        raise SystemExit("lost records, errors or differing answers")


if __name__ == "__main__":
    main()
