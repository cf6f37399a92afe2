"""Benchmark: A/B decisions checked every hour, fixed-horizon vs anytime-valid, on simulated traffic.

    .venv/bin/python bench/bench_abtest.py [--aa-runs 2000] [--lift-runs 1000] [--harm-runs 200]
                                           [--check-store 20] [--quick] [--json]

Simulates the traffic of a small deployment hour by hour for 14 days and runs decision rules
on it under the default ``abtest`` settings. Each run draws its own traffic (seeded by run
number); every design sees the same traffic.

Designs:

- ``sequential, every hour``: ``cl_release.decide.abtest.decide`` (the anytime-valid rule: mSPRT,
  guardrails, SRM check) at every hourly look, as ``cl-release watch`` runs it;
- ``fixed-horizon, every hour``: the rule cl-release had before issue 17 (``old_decide`` below,
  a copy of ``abtest.decide`` at commit c482946: two-proportion z-test at alpha, the same
  threshold, samples and duration checks) at every hourly look: peeking;
- ``fixed-horizon, once``: the same old rule checked once, at its planned sample size (80%
  power for the +10% lift at alpha 0.05 two-sided): the way a fixed-horizon test is valid.

Scenarios: A/A (the challenger is the champion), a true +10% lift of the thumbs-up rate
(0.60 -> 0.66), and two harmful challengers for the guardrails (latency x1.25; error rate
1% -> 2%), each with no lift.

The small deployment (``SMALL``): 5,000 answers a day (Poisson per hour), the challenger on
10% of them (the default), a quarter of the answers get a thumbs up or down (quality = thumbs
up), thumbs-up rate 0.60, 1% of answers tagged as errors, latency log-normal (median 800 ms,
sigma 0.5; p95 1,822 ms), no critical reports. Routing is random per answer.

Prints Markdown tables (paste into bench/RESULTS-abtest.md) and, with ``--json``, the raw numbers.
The pure rule is the one ``cl-release`` runs: ``--check-store N`` replays N runs through a real
feedback store (answers, thumbs, error tags, latencies) and ``abtest.compare`` at five looks
each, and fails unless the store's aggregates, the guardrail states and the decision match.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
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
LAT_BIN_MS = 8  # latencies are kept as a histogram of 8 ms bins up to 8.2 s (order statistics from it)
LAT_BINS = 1024


# ---------------------------------------------------------------- traffic


@dataclass
class ArmTraffic:
    """Cumulative counts of one arm at the end of each hour (index 0 = after the first hour)."""

    records: np.ndarray
    opinions: np.ndarray  # answers with a thumbs up or down
    positive: np.ndarray
    errors: np.ndarray  # answers tagged as errors (independent of the thumbs)
    feedback: np.ndarray  # answers with any feedback: thumbs, error tag or both
    latency_sum: np.ndarray
    latency_rank: np.ndarray  # hours x LAT_BINS: answers so far with a latency in this bin or a lower one

    def metrics(self, h: int):
        """The store's aggregates (``triggers.Metrics``) after hour ``h`` (0-based)."""
        from cl_release.decide.triggers import Metrics

        op, pos, n = int(self.opinions[h]), int(self.positive[h]), int(self.records[h])
        return Metrics(records=n, feedback=int(self.feedback[h]), quality_n=op, quality_sum=float(pos),
                       quality_sq=float(pos), opinions=op, positive=pos, negative=op - pos, latency_n=n,
                       latency_sum=float(self.latency_sum[h]))

    def latency_at(self, h: int):
        """``at(k)``: the k-th smallest latency (1-based) after hour ``h``."""
        row = self.latency_rank[h]
        return lambda k: float((np.searchsorted(row, k) + 0.5) * LAT_BIN_MS)


@dataclass
class Traffic:
    champion: ArmTraffic
    challenger: ArmTraffic
    latencies: list[np.ndarray]  # per arm, every answer's latency (bin centre) in arrival order (--check-store)
    overlap: list[np.ndarray]  # per arm and hour: error-tagged answers that also have thumbs


def simulate(rng: np.random.Generator, *, lift: float = 0.0, latency_factor: float = 1.0,
             error_factor: float = 1.0, hours: int = HOURS, **overrides) -> Traffic:
    """One run's traffic. The challenger differs by ``lift`` (relative change of the thumbs-up
    rate), ``latency_factor`` (every latency multiplied) and ``error_factor`` (error rate)."""
    s = {**SMALL, **overrides}
    per_hour = rng.poisson(s["answers_per_day"] / 24, hours)
    chall_n = rng.binomial(per_hour, s["traffic"])
    arms, lats, overlaps = [], [], []
    for n, p, lat_f, err_f in ((per_hour - chall_n, s["positive"], 1.0, 1.0),
                               (chall_n, s["positive"] * (1 + lift), latency_factor, error_factor)):
        opinions = rng.binomial(n, s["feedback_share"])
        positive = rng.binomial(opinions, p)
        errors = rng.binomial(n, s["error_rate"] * err_f)
        overlap = rng.hypergeometric(opinions, n - opinions, errors)
        raw = rng.lognormal(math.log(s["latency_median_ms"]), s["latency_sigma"], int(n.sum())) * lat_f
        bins = np.minimum(raw // LAT_BIN_MS, LAT_BINS - 1).astype(np.int64)
        lat = (bins + 0.5) * LAT_BIN_MS  # latencies at the bin centre: the histogram holds them exactly
        hour_of = np.repeat(np.arange(hours), n)
        lat_sum = np.bincount(hour_of, weights=lat, minlength=hours)
        hist = np.bincount(hour_of * LAT_BINS + bins, minlength=hours * LAT_BINS).reshape(hours, LAT_BINS)
        arms.append(ArmTraffic(np.cumsum(n), np.cumsum(opinions), np.cumsum(positive), np.cumsum(errors),
                               np.cumsum(opinions + errors - overlap), np.cumsum(lat_sum),
                               np.cumsum(np.cumsum(hist, axis=0, dtype=np.int32), axis=1, dtype=np.int32)))
        lats.append(lat)
        overlaps.append(overlap)
    return Traffic(arms[0], arms[1], lats, overlaps)


# ---------------------------------------------------------------- the rules


def _erfc_p(z: float) -> float:
    return math.erfc(abs(z) / math.sqrt(2))


def old_two_proportion_test(x1: int, n1: int, x2: int, n2: int) -> dict:
    """cl-release's test before issue 17: two-sided pooled z-test of p2 - p1."""
    if n1 == 0 or n2 == 0:
        return {"diff": None, "p_value": None}
    p1, p2 = x1 / n1, x2 / n2
    pooled = (x1 + x2) / (n1 + n2)
    se = math.sqrt(pooled * (1 - pooled) * (1 / n1 + 1 / n2))
    z = (p2 - p1) / se if se > 0 else 0.0
    return {"diff": p2 - p1, "p_value": _erfc_p(z) if se > 0 else 1.0}


def old_decide(a, b, *, hours: float, conf: dict) -> str:
    """The decision of ``abtest.decide`` at commit c482946 (positive_rate metric), verbatim in
    its logic: promote when samples, duration, threshold and p < alpha (challenger better) hold;
    stop when samples and duration hold and the challenger is significantly worse; stop at
    max_duration_hours; else wait."""
    from cl_release.decide.abtest import weighted_improvement

    improvement, _ = weighted_improvement(a, b, conf["weights"])
    test = old_two_proportion_test(a.positive, a.opinions, b.positive, b.opinions)
    p = test["p_value"]
    significant = p is not None and p < conf["alpha"]
    ok_samples = min(a.opinions, b.opinions) >= conf["min_samples"]
    ok_duration = hours >= float(conf["min_duration_hours"])
    ok_better = improvement is not None and improvement >= conf["threshold"]
    if ok_samples and ok_duration and ok_better and significant and (test["diff"] or 0) > 0:
        return "promote"
    if ok_samples and ok_duration and significant and (test["diff"] or 0) < 0:
        return "stop"
    if conf["max_duration_hours"] is not None and hours >= float(conf["max_duration_hours"]):
        return "stop"
    return "wait"


def new_verdict(t: Traffic, h: int, conf: dict):
    from cl_release.decide import abtest

    a = abtest.Arm("champion", t.champion.metrics(h), int(t.champion.errors[h]), 0, t.champion.latency_at(h))
    b = abtest.Arm("challenger", t.challenger.metrics(h), int(t.challenger.errors[h]), 0, t.challenger.latency_at(h))
    return abtest.decide(a, b, hours=h + 1, traffic=SMALL["traffic"], conf=conf)


def planned_hour(conf: dict, lift: float = 0.10, power: float = 0.8) -> tuple[int, int]:
    """The fixed-horizon design: rated answers on the challenger for ``power`` at ``alpha``
    (two-sided) against a ``lift``, and the expected hour they are reached."""
    from statistics import NormalDist

    z = NormalDist().inv_cdf(1 - conf["alpha"] / 2) + NormalDist().inv_cdf(power)
    pa = SMALL["positive"]
    pb = pa * (1 + lift)
    k = (1 - SMALL["traffic"]) / SMALL["traffic"]  # champion samples per challenger sample
    n_b = math.ceil(z * z * (pa * (1 - pa) / k + pb * (1 - pb)) / (pb - pa) ** 2)
    per_hour = SMALL["answers_per_day"] / 24 * SMALL["traffic"] * SMALL["feedback_share"]
    return n_b, math.ceil(n_b / per_hour)


@dataclass
class Outcome:
    decision: str  # promote | stop | none
    hour: int | None
    why: str = ""  # for the sequential design's stops: primary | guardrail:<name> | critical | max
    srm_tripped: bool = False


def run_sequential(t: Traffic, conf: dict) -> Outcome:
    srm = False
    for h in range(HOURS):
        v = new_verdict(t, h, conf)
        srm = srm or not v.srm["ok"]
        if v.decision == "promote":
            return Outcome("promote", h + 1, srm_tripped=srm)
        if v.decision == "stop":
            if v.reasons[0].startswith("no decision"):
                return Outcome("none", None, "max", srm)
            bad = [g["name"] for g in v.guardrails if g["state"] == "worse"]
            primary = "significantly worse on" in v.reasons[0]
            why = "primary" if primary else f"guardrail:{bad[0]}" if bad else "critical"
            return Outcome("stop", h + 1, why, srm)
    return Outcome("none", None, srm_tripped=srm)


def run_old_peeking(t: Traffic, conf: dict) -> Outcome:
    for h in range(HOURS):
        d = old_decide(t.champion.metrics(h), t.challenger.metrics(h), hours=h + 1, conf=conf)
        if d == "promote":
            return Outcome("promote", h + 1)
        if d == "stop":
            return Outcome("stop", h + 1) if h + 1 < float(conf["max_duration_hours"]) else Outcome("none", None)
    return Outcome("none", None)


def run_old_once(t: Traffic, conf: dict, n_planned: int) -> Outcome:
    reached = np.nonzero(t.challenger.opinions >= n_planned)[0]
    if not len(reached):
        return Outcome("none", None)
    h = int(reached[0])
    d = old_decide(t.champion.metrics(h), t.challenger.metrics(h), hours=h + 1, conf=conf)
    return Outcome("promote", h + 1) if d == "promote" else Outcome("stop" if d == "stop" else "none", h + 1)


def statistic_crossings(t: Traffic, conf: dict) -> dict[str, bool]:
    """The tested statistic alone (no threshold, samples or duration), at every hourly look from
    the first: does the always-valid interval ever exclude 0, does the z-test ever reach p < alpha?"""
    from cl_release.decide import sequential

    a, b = t.champion, t.challenger
    alpha, tau = conf["alpha"], conf["sequential_tau"]
    ok = (a.opinions > 0) & (b.opinions > 0)
    xa, na, xb, nb = (v[ok].astype(float) for v in (a.positive, a.opinions, b.positive, b.opinions))
    pa, pb = (xa + 1) / (na + 2), (xb + 1) / (nb + 2)
    var = pa * (1 - pa) / na + pb * (1 - pb) / nb
    diff = xb / nb - xa / na
    half = np.sqrt(var * (var + tau**2) / tau**2 * (2 * math.log(1 / alpha) + np.log((var + tau**2) / var)))
    pooled = (xa + xb) / (na + nb)
    se = np.sqrt(pooled * (1 - pooled) * (1 / na + 1 / nb))
    z = np.divide(diff, se, out=np.zeros_like(diff), where=se > 0)
    # the vectorised interval is the library's: spot-check one look against sequential.proportions
    i = len(diff) - 1
    d = sequential.proportions(int(xa[i]), int(na[i]), int(xb[i]), int(nb[i]), alpha=alpha, tau=tau)
    assert abs(d.interval[1] - (diff[i] + half[i])) < 1e-9
    return {"sequential": bool(np.any(np.abs(diff) > half)), "z_test": bool(np.any(np.abs(z) > 1.959963984540054))}


# ---------------------------------------------------------------- figures


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


def summarize(outcomes: list[Outcome]) -> dict:
    n = len(outcomes)
    hours = [o.hour for o in outcomes if o.decision == "promote"]
    stop_hours = [o.hour for o in outcomes if o.decision == "stop"]
    why: dict[str, int] = {}
    for o in outcomes:
        if o.decision == "stop":
            why[o.why or "worse"] = why.get(o.why or "worse", 0) + 1
    return {"promote": rate(len(hours), n), "stop": rate(len(stop_hours), n), "stop_why": why,
            "median_hours_to_promote": statistics.median(hours) if hours else None,
            "median_hours_to_stop": statistics.median(stop_hours) if stop_hours else None,
            "srm_tripped": rate(sum(o.srm_tripped for o in outcomes), n)}


def check_store(runs: int, conf: dict, seed: int) -> int:
    """Replay ``runs`` A/A and +10% runs through a real feedback store and ``abtest.compare`` at a
    few looks: the decision must equal the pure rule's on the simulated aggregates."""
    import datetime as dt
    import tempfile

    from cl_release.decide import abtest
    from cl_release.store.sqlite import FeedbackStore
    from cl_release.project import Project
    from cl_release.registry import Registry
    from cl_release.release.scaffold import init_repository

    checked = 0
    for i in range(runs):
        t = simulate(np.random.default_rng([seed, 9, i]), lift=0.10 * (i % 2), hours=120)
        with tempfile.TemporaryDirectory() as tmp:
            root = init_repository(Path(tmp) / "repo")
            t0 = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)
            with Registry(root).transaction() as data:  # two released versions, no training needed
                for v, parent in (("1.0.0", None), ("1.1.0", "1.0.0")):
                    data["models"].append(_fake_entry(v, parent, t0))
                data["current"] = "1.1.0"
                data["aliases"] = {"champion": "1.0.0"}
            import subprocess

            subprocess.run(["git", "-C", str(root), "commit", "-qam", "bench registry"], check=True)
            abtest.start(root, "1.1.0", traffic=SMALL["traffic"], now=t0)
            store = FeedbackStore(Project.load(root).feedback_path)
            rows, fbs = [], []
            rng = np.random.default_rng([seed, 10, i])
            for arm, v, traffic in ((0, "1.0.0", t.champion), (1, "1.1.0", t.challenger)):
                # each hour's simulated counts laid out on its answers: roles [0, op) have thumbs
                # ([0, pos) up); roles [op - overlap, op - overlap + err) are tagged as errors
                step = lambda x, h: int(x[h] - (x[h - 1] if h else 0))  # noqa: E731
                k = 0
                for h in range(120):
                    n, op, pos, err = (step(x, h) for x in (traffic.records, traffic.opinions, traffic.positive,
                                                            traffic.errors))
                    first_err = op - int(t.overlap[arm][h])
                    for j, role in enumerate(rng.permutation(n)):
                        at = t0 + dt.timedelta(hours=h, seconds=3599 * j / n)
                        rid = f"r{arm}-{k}"
                        rows.append({"input": f"q {arm} {k}", "output": "a", "request_id": rid, "model_version": v,
                                     "created_at": at, "latency_ms": float(t.latencies[arm][k])})
                        fb = {}
                        if role < op:
                            fb["thumbs"] = 1 if role < pos else -1
                        if first_err <= role < first_err + err:
                            fb["error_tag"] = "wrong"
                        if fb:
                            fbs.append({"request_id": rid, "created_at": at + dt.timedelta(seconds=0.5), **fb})
                        k += 1
            store.log_many(rows)
            store.feedback_many(fbs)
            store.close()
            project = Project.load(root)
            for h in (23, 47, 71, 95, 119):
                c = abtest.compare(project, now=t0 + dt.timedelta(hours=h + 1), count_look=False)
                pure = new_verdict(t, h, conf)
                for v, traffic in (("1.0.0", t.champion), ("1.1.0", t.challenger)):
                    m, sim = c.metrics[v], traffic.metrics(h)
                    assert (m["records"], m["feedback"], m["opinions"], m["positive"], m["errors"]) == (
                        sim.records, sim.feedback, sim.opinions, sim.positive, int(traffic.errors[h])), (i, h, v)
                assert c.decision == pure.decision, (i, h, c.decision, pure.decision, c.reasons, pure.reasons)
                assert [g["state"] for g in c.guardrails] == [g["state"] for g in pure.guardrails], (i, h)
                checked += 1
    return checked


def _fake_entry(version: str, parent: str | None, at) -> dict:
    stamp = at.strftime("%Y-%m-%dT%H:%M:%SZ")
    return {"version": version, "parent": parent, "bump": "major" if parent is None else "minor",
            "strategy": "initial" if parent is None else "continued_lora", "status": "released", "created_at": stamp,
            "base_model": {"name": "org/base", "revision": None},
            "adapter": {"path": f"outputs/v{version}/adapter", "sha256": "0" * 64}, "datasets": [],
            "config": {"path": f"outputs/v{version}/axolotl.yml", "sha256": "1" * 64}, "seed": 42,
            "launch": {"num_processes": 1, "num_machines": 1}, "training": {}, "evaluation": {}, "toolchain": {},
            "source_commit": None, "notes": ""}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--aa-runs", type=int, default=2000, help="A/A runs")
    ap.add_argument("--lift-runs", type=int, default=1000, help="runs with a true +10%% lift")
    ap.add_argument("--harm-runs", type=int, default=200, help="runs per harmful challenger (guardrails)")
    ap.add_argument("--check-store", type=int, default=20, metavar="N",
                    help="replay N runs (alternately A/A and +10%%, 120 h each) through a real feedback store and "
                         "abtest.compare at 5 looks each; the decisions must match (default 20; 0: skip)")
    ap.add_argument("--seed", type=int, default=17)
    ap.add_argument("--quick", action="store_true", help="100 / 50 / 20 runs: checks the harness in seconds")
    ap.add_argument("--json", action="store_true", help="also print the raw numbers as JSON")
    args = ap.parse_args()
    if args.quick:
        args.aa_runs, args.lift_runs, args.harm_runs, args.check_store = 100, 50, 20, 2

    from cl_release.decide import abtest

    conf = abtest.ab_config(None)
    n_planned, h_planned = planned_hour(conf)
    t_start = time.perf_counter()
    cpu_start = time.process_time()
    scenarios = {"aa": ({}, args.aa_runs), "lift10": ({"lift": 0.10}, args.lift_runs),
                 "latency125": ({"latency_factor": 1.25}, args.harm_runs),
                 "errors2x": ({"error_factor": 2.0}, args.harm_runs)}
    results: dict = {}
    for k, (name, (kw, runs)) in enumerate(scenarios.items()):
        seq_o, peek_o, once_o, cross = [], [], [], {"sequential": 0, "z_test": 0}
        for i in range(runs):
            t = simulate(np.random.default_rng([args.seed, k, i]), **kw)
            seq_o.append(run_sequential(t, conf))
            if name in ("aa", "lift10"):
                peek_o.append(run_old_peeking(t, conf))
                once_o.append(run_old_once(t, conf, n_planned))
                for key, hit in statistic_crossings(t, conf).items():
                    cross[key] += hit
        results[name] = {"runs": runs, "sequential": summarize(seq_o)}
        if peek_o:
            results[name]["fixed_every_hour"] = summarize(peek_o)
            results[name]["fixed_once"] = summarize(once_o)
            results[name]["statistic_ever_significant"] = {key: rate(v, runs) for key, v in cross.items()}
    checked = check_store(args.check_store, conf, args.seed) if args.check_store else 0
    elapsed, cpu = time.perf_counter() - t_start, time.process_time() - cpu_start

    out = {"machine": f"{platform.machine()}, Python {platform.python_version()}", "seconds": elapsed,
           "cpu_seconds": cpu, "scenario": SMALL, "hours": HOURS, "planned": {"challenger_rated": n_planned,
                                                                               "hour": h_planned},
           "conf": {k: conf[k] for k in ("alpha", "sequential_tau", "threshold", "min_samples",
                                         "min_duration_hours", "max_duration_hours", "srm_p", "guardrails")},
           "results": results, "store_checks": checked}
    aa, lift = results["aa"], results["lift10"]
    print(f"{args.aa_runs} A/A runs, {args.lift_runs} +10% runs, {args.harm_runs} per harmful challenger; "
          f"hourly looks for {HOURS} h; {elapsed:.0f} s ({cpu:.0f} CPU s)"
          + (f"; {checked} looks replayed through the store agree" if checked else ""))
    print(f"fixed-horizon planned sample size: {n_planned} rated answers on the challenger (~{h_planned} h)\n")
    print("| design | A/A: promoted | A/A: stopped as worse | +10%: promoted | +10%: median hours to promotion |")
    print("| --- | ---: | ---: | ---: | ---: |")
    rows = [("fixed-horizon z-test, every hour (before)", "fixed_every_hour"),
            ("fixed-horizon z-test, once at the planned size", "fixed_once"),
            ("anytime-valid (mSPRT + guardrails), every hour", "sequential")]
    for label, key in rows:
        a, l = aa[key], lift[key]
        mh = l["median_hours_to_promote"]
        print(f"| {label} | {fmt_rate(a['promote'])} | {fmt_rate(a['stop'])} | {fmt_rate(l['promote'])} "
              f"| {'-' if mh is None else f'{mh:.0f}'} |")
    print("\nThe tested statistic alone at every hourly look (no threshold, samples or duration):")
    print("| statistic | A/A: ever significant |")
    print("| --- | ---: |")
    print(f"| two-proportion z-test at alpha | {fmt_rate(aa['statistic_ever_significant']['z_test'])} |")
    print(f"| always-valid interval excludes 0 | {fmt_rate(aa['statistic_ever_significant']['sequential'])} |")
    print(f"\nA/A stops of the sequential design by cause: {aa['sequential']['stop_why']}; "
          f"SRM check tripped at some look: {fmt_rate(aa['sequential']['srm_tripped'])}")
    print("\n| harmful challenger (no lift) | stopped | median hours to stop | by |")
    print("| --- | ---: | ---: | --- |")
    for name, label in (("latency125", "latency x1.25 (p95 1,822 -> 2,277 ms)"), ("errors2x", "error rate 1% -> 2%")):
        s = results[name]["sequential"]
        mh = s["median_hours_to_stop"]
        print(f"| {label} | {fmt_rate(s['stop'])} | {'-' if mh is None else f'{mh:.0f}'} | {s['stop_why']} |")
    if args.json:
        print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
