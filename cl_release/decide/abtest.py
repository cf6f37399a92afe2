"""Champion / challenger: which version serves, how the two compare, promotion and rollback.

State lives in the registry (``registry/model_registry.json``):

- ``aliases.champion``: the version that serves by default; ``aliases.challenger``: the
  version under test;
- ``abtest``: ``{champion, challenger, traffic, started_at}`` while a test runs;
- ``events``: an append-only log; every move (``set_champion``, ``ab_start``, ``ab_stop``,
  ``promote``, ``champion_rollback``) adds one, so history is never rewritten. A promotion or
  a stop decided by the rule records the method, the figures and the look number.

Every move is made under the release lock inside ``Registry.transaction()`` and committed to
git, so the registry and git agree. ``abtest:`` in cl-release.yaml overrides the defaults
(shared/PRACTICE.md: 10% traffic, > 5% better on a weighted score of quality 0.5, positive
feedback 0.3 and latency 0.2 (lower is better), after >= 48 h and enough samples).

The rule is checked at every look (``watch`` looks every hour), so its statistics are
anytime-valid (:mod:`cl_release.decide.sequential`): the chance that an A/A test is ever promoted or
stopped as worse stays below ``alpha`` however many looks there are. On each look:

- **stop at once** when the challenger has ``guardrails.critical_reports`` answers reported
  critical/safety; when the tested metric is significantly worse (its always-valid interval
  below 0, with ``min_samples`` a side); or when a guardrail is significantly worse:
  negative-feedback rate, error rate, latency p95, critical-report rate (their chance of any
  false stop together at most ``guardrails.alpha``);
- **promote** when the always-valid interval of the tested metric (positive-feedback rate, or
  mean quality) lies above 0, the weighted improvement is at least ``threshold``, both sides
  have ``min_samples``, the test ran ``min_duration_hours``, and the traffic split matches the
  configured one (sample-ratio-mismatch check: chi-square p >= ``srm_p``; below it routing or
  logging is broken and no comparison can be trusted, so promotion is refused);
- stop with no decision after ``max_duration_hours``; else wait.

The weighted improvement is the weighted mean of the challenger's relative changes:
``sum(w * change) / sum(w)`` with ``change = challenger / champion - 1`` for quality and
positive rate and ``1 - challenger / champion`` for latency; a metric missing on either side
drops out.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import os
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from . import sequential as seq
from ..errors import RegistryError, UserError, VersionError
from ..files import atomic_write_json, locked
from ..registry import Registry, committed_change, normalize_version
from ..timeutil import parse_time, registry_time, utc
from .triggers import Metrics, opinion_rules, reading, version_metrics

DEFAULTS: dict[str, Any] = {
    "traffic": 0.1,
    "threshold": 0.05,
    "min_samples": 200,
    "min_duration_hours": 48.0,
    "max_duration_hours": 336.0,
    "alpha": 0.05,
    "significance_metric": "positive_rate",
    "sequential_tau": 0.05,
    "srm_p": 0.001,
    "weights": {"quality": 0.5, "positive_rate": 0.3, "latency": 0.2},
    "guardrails": {"alpha": 0.05, "negative_rate": True, "error_rate": True, "latency_p95": True,
                   "critical_rate": True, "critical_reports": 1},
    "test_patches": False,
}
GUARDRAILS = ("negative_rate", "error_rate", "latency_p95", "critical_rate")
METHOD = "mSPRT (normal mixture, Johari et al. 2022)"
LOOKS_FILE = ".cl-release/abtest/looks.json"


def ab_config(project) -> dict[str, Any]:
    """Defaults overlaid with the project's ``abtest:`` section (checked by the project schema)."""
    conf = {**DEFAULTS, "weights": dict(DEFAULTS["weights"]), "guardrails": dict(DEFAULTS["guardrails"])}
    for key, value in ((project.data.get("abtest") if project is not None else None) or {}).items():
        if key in ("weights", "guardrails"):
            conf[key].update(value)
        else:
            conf[key] = value
    return conf


# ---------------------------------------------------------------- registry moves


@contextlib.contextmanager
def _move(root: Path, message: Callable[[], str]) -> Iterator[dict[str, Any]]:
    """Change the registry under the release lock, then commit it (message built afterwards).

    With ``serve.upstream_admin`` (the adapter-admin hook, :func:`cl_release.serve.vllm.adapter_admin`)
    the model server loads every version that starts serving before the registry says so, and
    unloads every version that stopped serving after the commit."""
    transition = ServingTransition(root)
    with committed_change(root, message) as data:
        transition.begin(data)
        yield data
        transition.load(data)
    transition.unload(data)


class ServingTransition:
    """What a registry change does to the model server (``serve.upstream_admin``): ``begin``
    notes what serves, ``load`` loads the versions that start serving (before the registry is
    written: a client routed to one finds it), ``unload`` unloads the ones that stopped (after
    the commit). Without the admin setting every step does nothing."""

    def __init__(self, root: Path):
        from ..serve.vllm import adapter_admin

        self.admin = adapter_admin(Path(root))
        self.before: set[str] = set()

    def begin(self, data: dict[str, Any]) -> None:
        self.before = set(serving(data).values()) - {None}

    def load(self, data: dict[str, Any]) -> None:
        if self.admin is not None:
            self.admin.load(data, sorted(set(serving(data).values()) - {None} - self.before))

    def unload(self, data: dict[str, Any]) -> None:
        if self.admin is not None:
            self.admin.unload(sorted(self.before - set(serving(data).values())), committed=True)


def _event(data: dict[str, Any], now: _dt.datetime | None, action: str, **fields: Any) -> dict[str, Any]:
    event = {"at": registry_time(utc(now)), "action": action, **fields}
    data.setdefault("events", []).append(event)
    return event


def _released(data: dict[str, Any], version: str) -> dict[str, Any]:
    entry = Registry.find(data, version)
    if entry["status"] != "released":
        raise VersionError(f"version {entry['version']} is {entry['status']}, not released",
                           hint="only released versions can serve")
    return entry


def serving(data: dict[str, Any]) -> dict[str, str | None]:
    """The versions that serve: ``{"champion": V, "challenger": V or None}``; the champion is
    the ``champion`` alias, else the current version (None before the first release)."""
    running = state(data)
    if running:
        return {"champion": running["champion"], "challenger": running["challenger"]}
    return {"champion": (data.get("aliases") or {}).get("champion") or data["current"], "challenger": None}


def state(data: dict[str, Any]) -> dict[str, Any] | None:
    """The running A/B test (``{champion, challenger, traffic, started_at}``), or None."""
    ab = data.get("abtest")
    return dict(ab) if ab else None


def champion_history(data: dict[str, Any]) -> list[str]:
    """Champions over time, oldest first, replaying the events (a rollback pops the last one)."""
    stack: list[str] = []
    for e in data.get("events") or []:
        if e["action"] in ("promote", "set_champion") and e.get("to"):
            if not stack or stack[-1] != e["to"]:
                stack.append(e["to"])
        elif e["action"] == "champion_rollback" and stack and stack[-1] == e.get("from"):
            stack.pop()
    return stack


def set_champion(root: Path, version: str, *, now: _dt.datetime | None = None, reason: str = "") -> dict[str, Any]:
    """Make ``version`` the champion directly (first deployment, or a safety patch); refused
    while an A/B test runs. See :func:`deploy` for what moves."""
    v = normalize_version(version)
    with _move(root, lambda: f"Champion: {v}" + (f" ({reason})" if reason else "")) as data:
        _released(data, v)
        if state(data):
            raise UserError("an A/B test is running", hint="promote or stop it first ('cl-release ab status')")
        event = deploy(data, v, now=now, reason=reason)
    return event


def deploy(data: dict[str, Any], version: str, *, now: _dt.datetime | None = None, reason: str = "") -> dict[str, Any]:
    """Make ``version`` champion in the loaded registry ``data`` (the caller writes and commits
    it: ``set_champion``, or the release of a patch in the same move as its entry). A running
    A/B test ends first (its champion no longer serves). ``current`` (what the next release
    builds on) follows the champion, unless it already builds on it (a newer release
    descending from ``version``, not deployed yet): the next release never drops what serves
    from its lineage. Returns the ``set_champion`` event."""
    running = state(data)
    if running:
        _end(data)
        _event(data, now, "ab_stop", champion=running["champion"], challenger=running["challenger"],
               reason=f"{version} replaces the champion" + (f" ({reason})" if reason else ""))
    aliases = data.setdefault("aliases", {})
    fields: dict[str, Any] = {"from": aliases.get("champion"), "to": version, "reason": reason}
    current = data["current"]
    if current != version and not (current and version in {e["version"] for e in Registry.lineage(data, current)}):
        fields["current"] = {"from": current, "to": version}
        data["current"] = version
    event = _event(data, now, "set_champion", **fields)
    aliases["champion"] = version
    return event


def start(root: Path, version: str, *, traffic: float, now: _dt.datetime | None = None) -> dict[str, Any]:
    """Start ``version`` as the challenger on ``traffic`` (0..1) of the keys."""
    if not 0 < traffic < 1:
        raise UserError(f"--traffic must be between 0 and 1 (exclusive), got {traffic}")
    v = normalize_version(version)
    with _move(root, lambda: f"A/B: start {v} as challenger of {champion} ({traffic:.0%} traffic)") as data:
        _released(data, v)
        aliases = data.setdefault("aliases", {})
        champion = aliases.get("champion")
        if champion is None:
            parent = Registry.find(data, v)["parent"]
            if parent is None:  # nothing to test a first version against
                hint = f"deploy it directly: cl-release ab champion {v}"
            else:
                hint = f"make the version that serves today champion first, e.g. cl-release ab champion {parent}"
            raise UserError("no champion to test against", hint=hint)
        if v == champion:
            raise UserError(f"{v} is already the champion")
        running = state(data)
        if running:
            raise UserError(f"an A/B test is running ({running['challenger']} vs {running['champion']})",
                            hint="promote or stop it first")
        at = registry_time(utc(now))
        data["abtest"] = {"champion": champion, "challenger": v, "traffic": float(traffic), "started_at": at}
        aliases["challenger"] = v
        event = _event(data, now, "ab_start", champion=champion, challenger=v, traffic=float(traffic))
    return event


def _end(data: dict[str, Any]) -> dict[str, Any]:
    running = state(data)
    if not running:
        raise UserError("no A/B test is running", hint="start one with: cl-release ab start VERSION")
    data.pop("abtest", None)
    data.get("aliases", {}).pop("challenger", None)
    return running


def stop(root: Path, *, reason: str = "", now: _dt.datetime | None = None,
         evidence: dict[str, Any] | None = None, challenger: str | None = None) -> dict[str, Any]:
    """End the test; the champion keeps serving. If the challenger was the current version (it
    usually is: it was just released), the champion becomes current again, so the next
    release builds on the version that serves, not the one that lost. ``evidence``
    (:meth:`Comparison.evidence`): the method, figures and look of a stop the rule decided,
    recorded in the event. ``challenger``: stop only the test of this version (the test changed
    since it was compared: RegistryError)."""
    with _move(root, lambda: f"A/B: stop {running['challenger']}" + (f" ({reason})" if reason else "")) as data:
        running = _end(data)
        if challenger is not None and running["challenger"] != challenger:
            raise RegistryError("the A/B test changed while comparing", hint="run the command again")
        fields = {"champion": running["champion"], "challenger": running["challenger"], "reason": reason}
        if data["current"] == running["challenger"]:
            data["current"] = running["champion"]
            fields["current"] = {"from": running["challenger"], "to": running["champion"]}
        fields.update(evidence or {})
        event = _event(data, now, "ab_stop", **fields)
    return event


def rollback_champion(root: Path, *, now: _dt.datetime | None = None) -> dict[str, Any]:
    """Make the previous champion champion (and current) again; a running test ends."""
    with _move(root, lambda: f"Roll back champion {event['from']} -> {event['to']}") as data:
        champion = (data.get("aliases") or {}).get("champion")
        history = champion_history(data)
        if champion is None or len(history) < 2 or history[-1] != champion:
            raise UserError("no previous champion to roll back to",
                            hint="set one with: cl-release ab champion VERSION")
        previous = history[-2]
        _released(data, previous)
        ended = _end(data) if state(data) else None
        fields: dict[str, Any] = {"from": champion, "to": previous}
        if ended:
            fields["stopped_challenger"] = ended["challenger"]
        if data["current"] != previous:
            fields["current"] = {"from": data["current"], "to": previous}
            data["current"] = previous
        data["aliases"]["champion"] = previous
        event = _event(data, now, "champion_rollback", **fields)
    return event


# ---------------------------------------------------------------- the decision rule


def weighted_improvement(champ: Metrics, chall: Metrics, weights: dict[str, float]) -> tuple[float | None, dict]:
    """The challenger's weighted relative change vs the champion, and each component."""
    pairs = {
        "quality": (champ.avg_quality, chall.avg_quality, 1),
        "positive_rate": (champ.positive_rate, chall.positive_rate, 1),
        "latency": (champ.avg_latency_ms, chall.avg_latency_ms, -1),
    }
    parts, num, den = {}, 0.0, 0.0
    for name, (a, b, sign) in pairs.items():
        w = float(weights.get(name, 0.0))
        change = sign * (b / a - 1) if a and b is not None else None
        parts[name] = {"champion": a, "challenger": b, "change": change, "weight": w}
        if change is not None and w > 0:
            num += w * change
            den += w
    return (num / den if den else None), parts


@dataclass
class Arm:
    """What the rule reads of one version over the test window: the store's aggregates, the
    answers marked as errors and reported critical/safety, and ``latency_at(k)``, the k-th
    smallest of its ``metrics.latency_n`` latencies (1-based; None: no p95 guardrail)."""

    version: str
    metrics: Metrics
    errors: int = 0
    critical: int = 0
    latency_at: Callable[[int], float] | None = None


@dataclass
class Verdict:
    """What the decision rule reaches on one look: the figures, the checks and the decision."""

    improvement: float | None
    components: dict[str, Any]
    test: dict[str, Any]
    checks: list[dict[str, Any]]
    guardrails: list[dict[str, Any]]
    srm: dict[str, Any]
    decision: str  # promote | stop | wait
    reasons: list[str]
    waiting_for: list[str]


def _rate_guardrail(name: str, what: str, versions: tuple[str, str], x: tuple[int, int], n: tuple[int, int], *,
                    alpha: float, tau: float, min_n: int) -> dict[str, Any]:
    """A rate where higher is worse: worse when the always-valid interval of challenger - champion
    lies above 0."""
    g = {"name": name, "champion": x[0] / n[0] if n[0] else None, "challenger": x[1] / n[1] if n[1] else None,
         "counts": {"champion": [x[0], n[0]], "challenger": [x[1], n[1]]}, "alpha": alpha, "interval": None,
         "p_value": None}
    if min(n) < min_n:
        g.update(state="waiting", detail=f"{min(n)} {what} on the smaller side, need {min_n}")
        return g
    d = seq.proportions(x[0], n[0], x[1], n[1], alpha=alpha, tau=tau)
    g.update(interval=list(d.interval), p_value=d.p_value)
    worse = d.interval[0] > 0
    g.update(state="worse" if worse else "ok",
             detail=f"{versions[1]} {g['challenger']:.4f} vs {versions[0]} {g['champion']:.4f}, difference interval "
                    f"[{d.interval[0]:+.4f}, {d.interval[1]:+.4f}]" + (" above 0" if worse else ""))
    return g


def _p95_guardrail(a: Arm, b: Arm, *, alpha: float, min_n: int) -> dict[str, Any]:
    """Worse when the challenger's p95 interval lies wholly above the champion's: each interval
    is a confidence sequence at alpha / 2 (Howard & Ramdas 2022), so a false stop needs one of
    them to fail (conservative: no distribution assumed, no normal approximation)."""
    na, nb = a.metrics.latency_n, b.metrics.latency_n
    g: dict[str, Any] = {"name": "latency_p95", "champion": None, "challenger": None, "alpha": alpha,
                         "interval": None, "counts": {"champion": na, "challenger": nb}}
    if a.latency_at is None or b.latency_at is None or min(na, nb) < min_n:
        g.update(state="waiting", detail=f"{min(na, nb)} latencies on the smaller side, need {min_n}")
        return g
    g["champion"] = a.latency_at(seq.quantile_rank(na, 0.95))
    g["challenger"] = b.latency_at(seq.quantile_rank(nb, 0.95))
    ia = seq.quantile_interval(na, a.latency_at, q=0.95, alpha=alpha / 2)
    ib = seq.quantile_interval(nb, b.latency_at, q=0.95, alpha=alpha / 2)
    g["interval"] = {"champion": list(ia), "challenger": list(ib)}
    worse = ib[0] is not None and ia[1] is not None and ib[0] > ia[1]
    show = lambda i: "[" + ", ".join("-" if x is None else f"{x:.0f}" for x in i) + "]"  # noqa: E731
    g.update(state="worse" if worse else "ok",
             detail=f"{b.version} {g['challenger']:.0f} ms {show(ib)} vs {a.version} {g['champion']:.0f} ms {show(ia)}"
                    + (": challenger's wholly above" if worse else ""))
    return g


def decide(a: Arm, b: Arm, *, hours: float, traffic: float, conf: dict[str, Any]) -> Verdict:
    """The decision rule on one look: champion ``a``, challenger ``b``, ``hours`` since the
    start, the challenger's configured ``traffic`` share, ``conf`` from :func:`ab_config`.
    Pure: :func:`compare` reads the store, then calls it; the benchmark calls it on simulated
    traffic."""
    ma, mb = a.metrics, b.metrics
    alpha, tau = conf["alpha"], conf["sequential_tau"]
    improvement, parts = weighted_improvement(ma, mb, conf["weights"])
    metric = conf["significance_metric"]
    if metric == "quality":
        d = seq.means((ma.quality_n, ma.quality_sum, ma.quality_sq), (mb.quality_n, mb.quality_sum, mb.quality_sq),
                      alpha=alpha, tau=tau)
        na, nb, unit = ma.quality_n, mb.quality_n, "answers with a quality score"
    else:
        d = seq.proportions(ma.positive, ma.opinions, mb.positive, mb.opinions, alpha=alpha, tau=tau)
        na, nb, unit = ma.opinions, mb.opinions, "answers with a rating or thumbs"
    test = {"method": METHOD, "metric": metric, "alpha": alpha, "tau": tau,
            "diff": None if d is None else d.diff, "p_value": None if d is None else d.p_value,
            "interval": None if d is None else list(d.interval),
            "significant": d is not None and (d.better or d.worse)}
    p = test["p_value"]

    min_n, min_h, thr = conf["min_samples"], float(conf["min_duration_hours"]), conf["threshold"]
    srm = seq.srm_test(ma.records, mb.records, traffic)
    srm_ok = srm["p_value"] is None or srm["p_value"] >= conf["srm_p"]
    srm = {**srm, "ok": srm_ok, "need": f"p >= {conf['srm_p']:g}"}
    checks = [
        {"name": "samples", "ok": min(na, nb) >= min_n, "value": {a.version: na, b.version: nb}, "need": min_n},
        {"name": "duration", "ok": hours >= min_h, "value": round(hours, 2), "need": min_h},
        {"name": "better", "ok": improvement is not None and improvement >= thr,
         "value": None if improvement is None else round(improvement, 4), "need": thr},
        {"name": "significant", "ok": d is not None and d.better, "value": None if p is None else round(p, 4),
         "need": f"p < {alpha}"},
        {"name": "srm", "ok": srm_ok, "value": srm["p_value"] if srm["p_value"] is None else round(srm["p_value"], 6),
         "need": srm["need"]},
    ]
    ok = {c["name"]: c["ok"] for c in checks}

    g_conf = conf["guardrails"]
    on = [name for name in GUARDRAILS if g_conf.get(name)]
    g_alpha = g_conf["alpha"] / len(on) if on else g_conf["alpha"]
    guardrails, vs = [], (a.version, b.version)
    for name in on:
        if name == "negative_rate":
            g = _rate_guardrail(name, "answers with feedback", vs, (ma.negative, mb.negative),
                                (ma.feedback, mb.feedback), alpha=g_alpha, tau=tau, min_n=min_n)
        elif name == "error_rate":
            g = _rate_guardrail(name, "answers", vs, (a.errors, b.errors), (ma.records, mb.records),
                                alpha=g_alpha, tau=tau, min_n=min_n)
        elif name == "critical_rate":
            g = _rate_guardrail(name, "answers", vs, (a.critical, b.critical), (ma.records, mb.records),
                                alpha=g_alpha, tau=tau, min_n=min_n)
        else:
            g = _p95_guardrail(a, b, alpha=g_alpha, min_n=min_n)
        guardrails.append(g)

    stops = []
    limit = g_conf.get("critical_reports")
    if limit is not None and b.critical >= limit:
        stops.append(f"{b.critical} answer(s) of {b.version} reported critical/safety "
                     f"(guardrails.critical_reports {limit}): stopped at once")
    if ok["samples"] and d is not None and d.worse:
        stops.append(f"{b.version} is significantly worse on {metric} (always-valid p={p:.4f}, "
                     f"{1 - alpha:.0%} interval [{d.interval[0]:+.4f}, {d.interval[1]:+.4f}])")
    stops += [f"guardrail {g['name']}: {b.version} is significantly worse ({g['detail']})"
              for g in guardrails if g["state"] == "worse"]

    waits = []
    if not ok["samples"]:
        waits += [f"{min_n - n} more {unit} on {v} ({n} of {min_n})" for v, n in ((a.version, na), (b.version, nb))
                  if n < min_n]
    if not ok["duration"]:
        waits.append(f"{min_h - hours:.1f} more hours (min_duration_hours {min_h:g})")
    if not ok["better"]:
        now = "-" if improvement is None else f"{improvement:+.1%}"
        waits.append(f"a weighted improvement of at least {thr:+.1%} (now {now})")
    if not ok["significant"]:
        waits.append(f"the always-valid {1 - alpha:.0%} interval of {metric} to lie above 0" +
                     ("" if d is None else f" (now [{d.interval[0]:+.4f}, {d.interval[1]:+.4f}])"))
    if not srm_ok:
        waits.append(f"a traffic split that matches {traffic:.0%} (now {srm['share']:.2%} on {b.version}): fix "
                     "routing or logging; promotion is refused until then")

    reasons = [f"{c['name']}: {c['value']} (need {c['need']})" for c in checks if not c["ok"] and c["name"] != "srm"]
    if not srm_ok:
        reasons.append(f"srm: sample ratio mismatch, {b.version} has {srm['share']:.2%} of the answers where "
                       f"{traffic:.0%} were routed (chi-square p={srm['p_value']:.2g}, need {srm['need']}): routing "
                       "or logging is broken and no comparison can be trusted")
    max_h = conf["max_duration_hours"]
    if stops:
        decision, reasons, waits = "stop", stops, []
    elif all(ok.values()):
        decision, reasons = "promote", []
    elif max_h is not None and hours >= float(max_h):
        decision, waits = "stop", []
        reasons = [f"no decision after {hours:.0f} h (max_duration_hours {max_h:g})"] + reasons
    else:
        decision = "wait"
    return Verdict(improvement, parts, test, checks, guardrails, srm, decision, reasons, waits)


# ---------------------------------------------------------------- comparison


@dataclass
class Comparison:
    champion: str
    challenger: str
    traffic: float
    started_at: str
    now: str
    duration_hours: float
    metrics: dict[str, dict[str, Any]]
    improvement: float | None
    components: dict[str, Any]
    test: dict[str, Any]
    checks: list[dict[str, Any]]
    decision: str  # promote | stop | wait
    reasons: list[str] = field(default_factory=list)
    guardrails: list[dict[str, Any]] = field(default_factory=list)
    srm: dict[str, Any] = field(default_factory=dict)
    waiting_for: list[str] = field(default_factory=list)
    look: int | None = None  # this look's number in the test (None: not counted)

    @property
    def ready(self) -> bool:
        return self.decision == "promote"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def evidence(self) -> dict[str, Any]:
        """What a promotion or stop records in its registry event: the method, the look and the
        figures (6 significant digits)."""
        t = self.test
        return {"method": t["method"], "look": self.look, "figures": _rounded({
            "hours": self.duration_hours, "metric": t["metric"], "alpha": t["alpha"], "tau": t["tau"],
            "diff": t["diff"], "interval": t["interval"], "p_value": t["p_value"],
            "samples": {v: (m["quality_samples"] if t["metric"] == "quality" else m["opinions"])
                        for v, m in self.metrics.items()},
            "answers": {v: m["records"] for v, m in self.metrics.items()},
            "critical_reports": {v: m["critical"] for v, m in self.metrics.items()},
            "improvement": self.improvement,
            "srm": {k: self.srm.get(k) for k in ("share", "expected", "p_value")},
            "guardrails": {g["name"]: {"state": g["state"], "detail": g["detail"]} for g in self.guardrails},
        })}


def _rounded(x: Any) -> Any:
    if isinstance(x, float):
        return float(f"{x:.6g}")
    if isinstance(x, dict):
        return {k: _rounded(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_rounded(v) for v in x]
    return x


def _count_look(root: Path, running: dict[str, Any], now: _dt.datetime) -> int:
    """Add one look to the running test's count (``.cl-release/abtest/looks.json``) and return it."""
    path = Path(root) / LOOKS_FILE
    key = f"{running['champion']}->{running['challenger']}@{running['started_at']}"
    with locked(path.with_suffix(".lock"), what="the A/B look counter"):
        previous: dict[str, Any] = {}
        if path.is_file():
            try:
                previous = json.loads(path.read_text(encoding="utf-8"))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise UserError(f"{path}: unreadable look counter ({e})",
                                hint="delete it; the count of looks restarts") from None
        n = (int(previous.get("looks", 0)) if previous.get("test") == key else 0) + 1
        atomic_write_json(path, {"test": key, "looks": n, "last": registry_time(now)})
    return n


def compare(project, *, now: _dt.datetime | None = None, data: dict[str, Any] | None = None,
            count_look: bool = True) -> Comparison:
    """Metrics per version since the test started, the anytime-valid tests, the guardrails, the
    traffic-split check and the decision. Every comparison is a look at the test and is counted
    (``count_look=False``: not counted); the count goes into the events it decides."""
    now = utc(now)
    conf = ab_config(project)
    data = data if data is not None else Registry(project.root).load()
    running = state(data)
    if not running:
        raise UserError("no A/B test is running", hint="start one with: cl-release ab start VERSION --traffic 0.1")
    champ_v, chall_v = running["champion"], running["challenger"]
    started = parse_time(running["started_at"])
    versions = [champ_v, chall_v]
    hours = (now - started).total_seconds() / 3600
    with reading(project.feedback_path) as store:
        per = version_metrics(store, since=started, until=now, versions=versions, **opinion_rules(project))
        flags = store.answer_flags(since=started, until=now, versions=versions) if store is not None else {}
        arms = []
        for v in versions:
            ranks = store.latency_ranks(since=started, until=now, version=v) if store is not None else None
            f = flags.get(v, {})
            arms.append(Arm(v, per.get(v, Metrics()), f.get("errors", 0), f.get("critical", 0),
                            ranks.at if ranks is not None else None))
        v = decide(*arms, hours=hours, traffic=float(running["traffic"]), conf=conf)
    look = _count_look(project.root, running, now) if count_look else None
    return Comparison(
        champion=champ_v, challenger=chall_v, traffic=running["traffic"], started_at=running["started_at"],
        now=registry_time(now), duration_hours=round(hours, 3),
        metrics={a.version: a.metrics.to_dict() | {"errors": a.errors, "critical": a.critical} for a in arms},
        improvement=v.improvement, components=v.components, test=v.test, checks=v.checks, decision=v.decision,
        reasons=v.reasons, guardrails=v.guardrails, srm=v.srm, waiting_for=v.waiting_for, look=look,
    )


@dataclass
class PromoteResult:
    promoted: bool
    comparison: Comparison | None
    event: dict[str, Any] | None  # the promote event, or the ab_stop event when ``stopped``
    reasons: list[str]
    stopped: bool = False  # auto: the comparison said stop, and the test was stopped


def promote(project, *, now: _dt.datetime | None = None, auto: bool = False, force: bool = False,
            reason: str | None = None) -> PromoteResult:
    """Move ``champion`` to the challenger when the rule says promote.

    ``auto``: when the rule does not say promote, return ``promoted=False`` (for cron) instead
    of raising; when it says ``stop`` (a guardrail, critical reports, significantly worse, or
    no decision in ``max_duration_hours``), stop the test as ``watch`` does (``stopped=True``),
    recording the evidence. ``force``: promote anyway; needs a ``reason``, recorded in the event.
    """
    if force and not (reason and reason.strip()):
        raise UserError("--force needs --reason TEXT", hint="say why; it goes into the registry")
    comparison = compare(project, now=now)
    if not comparison.ready and not force:
        if auto and comparison.decision == "stop":
            event = stop(project.root, reason="; ".join(comparison.reasons), now=now,
                         evidence=comparison.evidence(), challenger=comparison.challenger)
            return PromoteResult(False, comparison, event, comparison.reasons, stopped=True)
        if auto:
            return PromoteResult(False, comparison, None, comparison.reasons)
        raise UserError(f"{comparison.challenger} is not ready to promote: " + "; ".join(comparison.reasons),
                        hint="wait for more traffic ('cl-release ab compare'), or --force --reason TEXT")
    fields = {"from": comparison.champion, "to": comparison.challenger,
              "improvement": comparison.improvement, "p_value": comparison.test["p_value"],
              "forced": bool(force and not comparison.ready), **comparison.evidence()}
    if fields["forced"]:
        fields["reason"] = reason.strip()
    with _move(project.root, lambda: f"Promote {comparison.challenger} to champion (was {comparison.champion})") as data:
        running = state(data)
        if not running or running["challenger"] != comparison.challenger:
            raise RegistryError("the A/B test changed while comparing", hint="run the command again")
        _released(data, comparison.challenger)
        _end(data)
        data["aliases"]["champion"] = comparison.challenger
        if data["current"] != comparison.challenger:
            fields["current"] = {"from": data["current"], "to": comparison.challenger}
            data["current"] = comparison.challenger
        event = _event(data, now, "promote", **fields)
    return PromoteResult(True, comparison, event, [])


def _num(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def format_comparison(c: Comparison) -> str:
    t = c.test
    look = f", look {c.look}" if c.look is not None else ""
    lines = [f"champion {c.champion} vs challenger {c.challenger} ({c.traffic:.0%} traffic), "
             f"{c.duration_hours:.1f} h since {c.started_at}{look}"]
    for v in (c.champion, c.challenger):
        m = c.metrics[v]
        lines.append(f"  {v:<10} answers {m['records']:>6}  quality {_num(m['avg_quality'], '.3f')} of "
                     f"{m['quality_samples']}  positive {_num(m['positive_rate'], '.3f')} of {m['opinions']} "
                     f"rated/thumbed  latency {_num(m['avg_latency_ms'], '.1f')} ms")
    imp = "-" if c.improvement is None else f"{c.improvement:+.1%}"
    lines.append(f"  weighted improvement {imp}; {t['method']} on {t['metric']}, tau {t['tau']:g}: "
                 f"always-valid p={_num(t['p_value'], '.4f')} (alpha {t['alpha']})")
    if t["interval"] is not None:
        lines.append(f"  {t['metric']} {c.challenger} - {c.champion}: {t['diff']:+.4f}, always-valid "
                     f"{1 - t['alpha']:.0%} interval [{t['interval'][0]:+.4f}, {t['interval'][1]:+.4f}]"
                     " (valid at every look)")
    for check in c.checks:
        value = check["value"]
        if check["name"] == "significant":  # the value is a p-value: say so, and which way it points
            diff = t["diff"] or 0
            value = "-" if value is None else f"always-valid p={t['p_value']:.4f}, challenger " + (
                "better" if diff > 0 else "worse" if diff < 0 else "equal")
        elif check["name"] == "srm":
            s = c.srm
            value = "-" if s.get("p_value") is None else (
                f"{c.challenger} has {s['share']:.2%} of the answers (configured {s['expected']:.0%}), "
                f"chi-square p={s['p_value']:.3g}")
        lines.append(f"  [{'ok' if check['ok'] else '--'}] {check['name']:<11} {value} (need {check['need']})")
    if c.guardrails:
        lines.append(f"  guardrails (stop when significantly worse; each at alpha {c.guardrails[0]['alpha']:g}):")
        for g in c.guardrails:
            mark = {"ok": "ok", "worse": "STOP", "waiting": "--"}[g["state"]]
            lines.append(f"  [{mark}] {g['name']:<14} {g['detail']}")
    crit = c.metrics[c.challenger].get("critical", 0)
    lines.append(f"  critical/safety reports on {c.challenger}: {crit}")
    lines.append(f"decision: {c.decision}" + (f" ({'; '.join(c.reasons)})" if c.reasons else ""))
    if c.waiting_for:
        lines.append("waiting for: " + "; ".join(c.waiting_for))
    return "\n".join(lines)


# ---------------------------------------------------------------- the router


def bucket(key: str, salt: str) -> float:
    """A stable number in [0, 1) for ``key`` (SHA-256 of ``salt:key``)."""
    digest = hashlib.sha256(f"{salt}\x00{key}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


class Router:
    """Which version serves a request: ``Router(project).choose(key)``.

    ``key`` is a user or session id (hash it first if it is personal data; any stable string
    works). A key always gets the same version while the same test runs; the challenger gets
    ``traffic`` of the keys. Raising the traffic of a running test keeps every key that already
    saw the challenger on it. The registry is re-read when the file changes, so a promotion
    reaches a running service without a restart (``recheck_s``: look at the file at most that
    often, for servers that route thousands of requests a second). Log the chosen version with
    ``FeedbackStore.log(..., model_version=version)``.
    """

    def __init__(self, project_or_root: Any, *, recheck_s: float = 0.0):
        root = project_or_root if isinstance(project_or_root, (str, os.PathLike)) else project_or_root.root
        self.root = Path(root)
        self._registry = Registry(self.root)
        self._lock = threading.Lock()
        self._stamp: tuple | None = None
        self._plan: tuple[str, str | None, float, str] | None = None
        self._versions: frozenset[str] = frozenset()
        self.recheck_s = recheck_s
        self._checked = 0.0

    def _current_plan(self) -> tuple[str, str | None, float, str]:
        if self.recheck_s and self._plan is not None and time.monotonic() - self._checked < self.recheck_s:
            return self._plan
        self._checked = time.monotonic()
        try:
            st = os.stat(self._registry.path)
            stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
        except FileNotFoundError:
            stamp = None
        plan = self._plan
        if plan is not None and stamp == self._stamp:
            return plan
        with self._lock:
            if self._plan is not None and stamp == self._stamp:
                return self._plan
            data = self._registry.load()
            self._versions = frozenset(m["version"] for m in data["models"])
            running = state(data)
            champion, challenger = serving(data).values()
            if champion is None:
                raise RegistryError("no version to serve", hint="release one, then: cl-release ab champion VERSION")
            if running:
                plan = (champion, challenger, float(running["traffic"]), f"{champion}->{challenger}")
            else:
                plan = (champion, None, 0.0, "")
            self._plan, self._stamp = plan, stamp
            return plan

    def assign(self, key: str) -> dict[str, Any]:
        """``{version, arm}`` for ``key``; arm is ``champion`` or ``challenger``."""
        if not isinstance(key, str) or not key:
            raise UserError("the routing key must be a non-empty string (a user or session id)")
        champion, challenger, traffic, salt = self._current_plan()
        if challenger is not None and bucket(key, salt) < traffic:
            return {"version": challenger, "arm": "challenger"}
        return {"version": champion, "arm": "champion"}

    def serving(self) -> dict[str, Any]:
        """``{champion, challenger, traffic}`` now (challenger None and traffic 0 without a test)."""
        champion, challenger, traffic, _ = self._current_plan()
        return {"champion": champion, "challenger": challenger, "traffic": traffic}

    def choose(self, key: str) -> str:
        """The version to serve for ``key``."""
        return self.assign(key)["version"]

    def knows(self, version: str) -> bool:
        """Whether ``version`` is in the registry (re-read when it changes, as for routing)."""
        try:
            self._current_plan()
        except RegistryError:  # nothing serves yet; the versions were still read
            pass
        return version in self._versions
