"""Benchmark: the batched evaluation runner vs a one-prompt-at-a-time generate loop.

    .venv/bin/python bench/bench_eval.py [--n 200] [--batch-size 32] [--max-new-tokens 32] [--quick]

Builds the tiny Llama model (cl_release.demo.model) and a 200-test suite from the demo data,
then, in the same process and on the same loaded model, times:

- ``loop``: for each test, apply the chat template, ``model.generate`` one prompt, decode;
- ``batched``: ``cl_release.eval.runner.run_suite`` (length-sorted, left-padded batches).

The two alternate in chunks of ``--chunk`` tests (loop, batched, loop, batched), so a change
of load on a shared machine during the run affects both alike.

Both decode greedily, so the answers must be identical; the script checks that. Prints a
Markdown table (paste into bench/RESULTS-eval.md) and, with ``--json``, the raw numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def build_suite(n: int):
    from cl_release.eval import suite as sv
    from cl_release.demo.data import demo_sets

    pairs = []
    for records in demo_sets().values():
        for r in records:
            pairs.append((r["messages"][0]["content"], r["messages"][1]["content"]))
    prefixes = ["", "Please answer briefly. ", "Question from the plant floor: ", "Quick check: "]
    cases = []
    for i in range(n):
        q, a = pairs[i % len(pairs)]
        prefix = prefixes[(i // len(pairs)) % len(prefixes)]
        key = a.split(" is ")[-1].rstrip(".") if " is " in a else a
        cases.append(sv.parse_case({"id": f"b{i:03d}", "input": prefix + q, "expected": key,
                                    "criticality": sv.CRITICALITIES[i % 4], "domain": "bench"}, path="bench", line=i + 1))
    return sv.Suite(cases=cases)


def loop_generate(model, tokenizer, suite, max_new_tokens: int) -> tuple[list[str], float]:
    """The baseline: one prompt per generate call, as a simple script would do it."""
    import torch

    from cl_release.eval.runner import render_prompt, stop_token_ids

    stop = stop_token_ids(model, tokenizer)
    outs = []
    t0 = time.perf_counter()
    with torch.inference_mode():
        for case in suite.cases:
            enc = tokenizer(render_prompt(tokenizer, case), return_tensors="pt", add_special_tokens=False)
            out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=stop,
                                 pad_token_id=tokenizer.pad_token_id)
            outs.append(tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True).strip())
    return outs, time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--chunk", type=int, default=100, help="Tests per interleaved loop/batched round.")
    ap.add_argument("--json", action="store_true", help="Also print the raw numbers as JSON.")
    ap.add_argument("--quick", action="store_true",
                    help="Small sizes (24 tests, chunks of 12, 16 new tokens): checks it runs, in seconds.")
    args = ap.parse_args()
    if args.quick:
        args.n, args.chunk, args.max_new_tokens = 24, 12, 16

    import torch

    from cl_release.eval import runner as ev
    from cl_release.eval import suite as sv
    from cl_release.demo.model import build_tiny_model, corpus_from_jsonl

    with tempfile.TemporaryDirectory() as tmp:
        texts = corpus_from_jsonl(sorted((REPO / "datasets" / "demo").rglob("*.jsonl")))
        build_tiny_model(Path(tmp) / "tiny", texts, seed=0)
        settings = ev.EvalSettings(batch_size=args.batch_size, max_new_tokens=args.max_new_tokens, device="cpu")
        model, tok = ev.load_model(Path(tmp), "tiny", None, settings)
        suite = build_suite(args.n)

        # warm-up (first-call allocations), not timed
        ev.run_suite(model, tok, sv.Suite(cases=suite.cases[:4]), settings)

        # Interleave the two in chunks so a load change on a shared machine hits both alike.
        loop_outs, results, loop_s, batched_s, tokens = [], [], 0.0, 0.0, 0
        for start in range(0, len(suite), args.chunk):
            part = sv.Suite(cases=suite.cases[start:start + args.chunk])
            outs, secs = loop_generate(model, tok, part, args.max_new_tokens)
            loop_outs += outs
            loop_s += secs
            t0 = time.perf_counter()
            res, perf = ev.run_suite(model, tok, part, settings)
            batched_s += time.perf_counter() - t0
            results += res
            tokens += perf["generated_tokens"]

    same = sum(a == r.output for a, r in zip(loop_outs, results))
    row = {
        "tests": len(suite),
        "batch_size": args.batch_size,
        "max_new_tokens": args.max_new_tokens,
        "loop_seconds": round(loop_s, 2),
        "batched_seconds": round(batched_s, 2),
        "speedup": round(loop_s / batched_s, 2),
        "loop_tokens_per_second": round(tokens / loop_s, 1),
        "batched_tokens_per_second": round(tokens / batched_s, 1),
        "identical_answers": f"{same}/{len(suite)}",
        "peak_rss_mb": perf["peak_memory_mb"],
        "torch_threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "load_average": round(os.getloadavg()[0], 2),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
    print("| tests | batch | max new tokens | loop s | batched s | speedup | loop tok/s | batched tok/s | identical answers | peak RSS MB |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    print(f"| {row['tests']} | {row['batch_size']} | {row['max_new_tokens']} | {row['loop_seconds']} | {row['batched_seconds']} | "
          f"**{row['speedup']}x** | {row['loop_tokens_per_second']} | {row['batched_tokens_per_second']} | "
          f"{row['identical_answers']} | {row['peak_rss_mb']} |")
    print(f"\n{row['cpus']} CPUs, {row['torch_threads']} torch threads, load average {row['load_average']}, "
          f"torch {row['torch']}, Python {row['python']}")
    if args.json:
        print(json.dumps(row, indent=2))
    return 0 if same == len(suite) else 1


if __name__ == "__main__":
    sys.exit(main())
