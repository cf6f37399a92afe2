"""Benchmark: A/B decisions checked every hour (peeking), on simulated traffic.

    .venv/bin/python bench/bench_abtest.py [--aa-runs 2000] [--lift-runs 1000] [--quick] [--json]

Simulates the traffic of a small deployment (below) hour by hour for 14 days and runs the
decision rule of ``cl_release.abtest`` on every hourly look, as ``cl-release watch`` does,
under the default ``abtest`` settings. Each run draws its own traffic (seeded); every design
sees the same traffic.

- A/A: the challenger is the champion (same rates): how often does the rule promote it?
- +10% lift: the challenger's thumbs-up rate is 10% higher (0.60 -> 0.66).

The small deployment: 5,000 answers a day (Poisson per hour), the challenger on 10% of them,
a quarter of the answers get a thumbs up or down (quality = thumbs up), thumbs-up rate 0.60,
1% of answers tagged as errors, latency log-normal (median 800 ms, sigma 0.5). Prints a
Markdown table (paste into bench/RESULTS-abtest.md) and, with ``--json``, the raw numbers.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

HOURS = 336
SMALL = {"answers_per_day": 5000, "traffic": 0.1, "feedback_share": 0.25, "positive": 0.60,
         "error_rate": 0.01, "latency_median_ms": 800.0, "latency_sigma": 0.5}


@dataclass
class Arm:
    """Cumulative counts of one arm at the end of each hour (index 0 = after the first hour)."""

    records: np.ndarray
    opinions: np.ndarray
    positive: np.ndarray
    errors: np.ndarray
    latency_sum: np.ndarray


@dataclass
class Traffic:
    champion: Arm
    challenger: Arm


def simulate(rng: np.random.Generator, *, lift: float = 0.0, hours: int = HOURS, **overrides) -> Traffic:
    """One run's traffic; ``lift``: the challenger's relative change of the thumbs-up rate."""
    s = {**SMALL, **overrides}
    per_hour = rng.poisson(s["answers_per_day"] / 24, hours)
    chall_n = rng.binomial(per_hour, s["traffic"])
    arms = []
    for n, p in ((per_hour - chall_n, s["positive"]), (chall_n, s["positive"] * (1 + lift))):
        opinions = rng.binomial(n, s["feedback_share"])
        positive = rng.binomial(opinions, p)
        errors = rng.binomial(n, s["error_rate"])
        # The sum of n log-normal latencies: drawn per answer, summed per hour.
        lat = rng.lognormal(math.log(s["latency_median_ms"]), s["latency_sigma"], int(n.sum()))
        hour_of = np.repeat(np.arange(hours), n)
        lat_sum = np.bincount(hour_of, weights=np.rint(lat), minlength=hours)
        arms.append(Arm(np.cumsum(n), np.cumsum(opinions), np.cumsum(positive), np.cumsum(errors), np.cumsum(lat_sum)))
    return Traffic(*arms)


def metrics(arm: Arm, h: int):
    """The store's aggregates (``triggers.Metrics``) of ``arm`` after hour ``h`` (0-based)."""
    from cl_release.triggers import Metrics

    op, pos = int(arm.opinions[h]), int(arm.positive[h])
    n = int(arm.records[h])
    return Metrics(records=n, feedback=op, quality_n=op, quality_sum=float(pos), quality_sq=float(pos),
                   opinions=op, positive=pos, negative=op - pos, latency_n=n, latency_sum=float(arm.latency_sum[h]))


def peeking_rule(conf):
    """The rule of cl-release today: ``abtest.decide`` on every hourly look."""
    from cl_release import abtest

    def rule(t: Traffic, h: int) -> str:
        return abtest.decide(metrics(t.champion, h), metrics(t.challenger, h), hours=h + 1, conf=conf).decision

    return rule


def run(t: Traffic, rule, *, hours: int = HOURS) -> tuple[str, int]:
    """Look every hour until the rule promotes or stops: (decision, hour); ('wait', hours) if never."""
    for h in range(hours):
        d = rule(t, h)
        if d != "wait":
            return d, h + 1
    return "wait", hours


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval for k successes in n runs."""
    if n == 0:
        return (0.0, 1.0)
    p = k / n
    c = z * z / n
    mid = (p + c / 2) / (1 + c)
    half = z * math.sqrt(p * (1 - p) / n + c / (4 * n)) / (1 + c)
    return max(0.0, mid - half), min(1.0, mid + half)


def rate(k: int, n: int) -> dict:
    lo, hi = wilson(k, n)
    return {"k": k, "n": n, "rate": k / n if n else None, "ci95": [lo, hi]}


def fmt_rate(r: dict) -> str:
    return f"{r['rate']:.1%} [{r['ci95'][0]:.1%}, {r['ci95'][1]:.1%}] ({r['k']}/{r['n']})"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--aa-runs", type=int, default=2000, help="A/A runs")
    ap.add_argument("--seed", type=int, default=17)
    ap.add_argument("--quick", action="store_true", help="200 A/A runs: checks the harness in seconds")
    ap.add_argument("--json", action="store_true", help="also print the raw numbers as JSON")
    args = ap.parse_args()
    if args.quick:
        args.aa_runs = 200

    from cl_release import abtest

    conf = abtest.ab_config(None)
    rule = peeking_rule(conf)
    t0 = time.perf_counter()
    outcomes = {"promote": 0, "stop": 0, "undecided": 0}
    for i in range(args.aa_runs):
        t = simulate(np.random.default_rng([args.seed, 0, i]))
        d, h = run(t, rule)
        outcomes["undecided" if d == "wait" or (d == "stop" and h >= HOURS) else d] += 1
    elapsed = time.perf_counter() - t0
    n = args.aa_runs
    out = {"machine": f"{platform.machine()}, {platform.python_version()}", "scenario": SMALL,
           "aa": {"promote": rate(outcomes["promote"], n), "stop": rate(outcomes["stop"], n)}, "seconds": elapsed}
    print(f"A/A, {n} runs, hourly looks for 14 days, default settings ({elapsed:.0f} s)")
    print("| rule | false promotions | stopped as worse |")
    print("| --- | ---: | ---: |")
    print(f"| fixed-horizon z-test at every look (cl-release today) | {fmt_rate(out['aa']['promote'])} "
          f"| {fmt_rate(out['aa']['stop'])} |")
    if args.json:
        print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
