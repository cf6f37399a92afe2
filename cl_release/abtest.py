"""Champion / challenger: which version serves, how the two compare, promotion and rollback.

State lives in the registry (``registry/model_registry.json``):

- ``aliases.champion``: the version that serves by default; ``aliases.challenger``: the
  version under test;
- ``abtest``: ``{champion, challenger, traffic, started_at}`` while a test runs;
- ``events``: an append-only log; every move (``set_champion``, ``ab_start``, ``ab_stop``,
  ``promote``, ``champion_rollback``) adds one, so history is never rewritten.

Every move is made under the release lock inside ``Registry.transaction()`` and committed to
git, so the registry and git agree. ``abtest:`` in cl-release.yaml overrides the defaults
(shared/PRACTICE.md: 10% traffic, > 5% better on a weighted score of quality 0.5, positive
feedback 0.3 and latency 0.2 (lower is better), after >= 48 h and enough samples).

The weighted improvement is the weighted mean of the challenger's relative changes:
``sum(w * change) / sum(w)`` with ``change = challenger / champion - 1`` for quality and
positive rate and ``1 - challenger / champion`` for latency; a metric missing on either side
drops out. A promotion also needs significance: a two-sided two-proportion z-test on the
positive-feedback rate (or a Welch z-test on mean quality) below ``alpha``, so a 5%
difference on 40 answers is not called a win.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import math
import os
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from .errors import RegistryError, UserError, VersionError
from .registry import REGISTRY_FILE, Registry, normalize_version
from .triggers import Metrics, parse_time, registry_time, utc, version_metrics

DEFAULTS: dict[str, Any] = {
    "traffic": 0.1,
    "threshold": 0.05,
    "min_samples": 200,
    "min_duration_hours": 48.0,
    "max_duration_hours": 336.0,
    "alpha": 0.05,
    "significance_metric": "positive_rate",
    "weights": {"quality": 0.5, "positive_rate": 0.3, "latency": 0.2},
    "test_patches": False,
}


def ab_config(project) -> dict[str, Any]:
    """Defaults overlaid with the project's ``abtest:`` section (checked by the project schema)."""
    conf = {**DEFAULTS, "weights": dict(DEFAULTS["weights"])}
    for key, value in ((project.data.get("abtest") if project is not None else None) or {}).items():
        if key == "weights":
            conf["weights"].update(value)
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
    from .gitops import ReleaseRepo
    from .release import release_lock
    from .serve.vllm import adapter_admin

    root = Path(root)
    repo = ReleaseRepo(root)  # before the lock: nothing is written in a folder that is not a repository
    admin = adapter_admin(root)
    with release_lock(root):
        repo.check_state()  # before the registry changes
        with Registry(root).transaction() as data:
            before = set(serving(data).values()) - {None}
            yield data
            if admin is not None:
                admin.load(data, sorted(set(serving(data).values()) - {None} - before))
        repo.commit([REGISTRY_FILE], message())
        if admin is not None:
            admin.unload(sorted(before - set(serving(data).values())), committed=True)


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
    """Make ``version`` the champion directly (first deployment, or a safety patch)."""
    v = normalize_version(version)
    with _move(root, lambda: f"Champion: {v}" + (f" ({reason})" if reason else "")) as data:
        _released(data, v)
        if state(data):
            raise UserError("an A/B test is running", hint="promote or stop it first ('cl-release ab status')")
        aliases = data.setdefault("aliases", {})
        event = _event(data, now, "set_champion", **{"from": aliases.get("champion"), "to": v, "reason": reason})
        aliases["champion"] = v
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
            raise UserError("no champion to test against",
                            hint=f"make a version champion first: cl-release ab champion VERSION (e.g. {data['current']})")
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


def stop(root: Path, *, reason: str = "", now: _dt.datetime | None = None) -> dict[str, Any]:
    """End the test; the champion keeps serving. If the challenger was the current version (it
    usually is: it was just released), the champion becomes current again, so the next
    release builds on the version that serves, not the one that lost."""
    with _move(root, lambda: f"A/B: stop {running['challenger']}" + (f" ({reason})" if reason else "")) as data:
        running = _end(data)
        fields = {"champion": running["champion"], "challenger": running["challenger"], "reason": reason}
        if data["current"] == running["challenger"]:
            data["current"] = running["champion"]
            fields["current"] = {"from": running["challenger"], "to": running["champion"]}
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


# ---------------------------------------------------------------- statistics


def _erfc_p(z: float) -> float:
    return math.erfc(abs(z) / math.sqrt(2))


def two_proportion_test(x1: int, n1: int, x2: int, n2: int) -> dict[str, Any]:
    """Two-sided pooled z-test of p2 - p1, with an unpooled 95% interval for the difference."""
    if n1 == 0 or n2 == 0:
        return {"method": "two-proportion z-test", "diff": None, "z": None, "p_value": None, "ci95": None}
    p1, p2 = x1 / n1, x2 / n2
    pooled = (x1 + x2) / (n1 + n2)
    se = math.sqrt(pooled * (1 - pooled) * (1 / n1 + 1 / n2))
    z = (p2 - p1) / se if se > 0 else 0.0
    half = 1.96 * math.sqrt(p1 * (1 - p1) / n1 + p2 * (1 - p2) / n2)
    return {"method": "two-proportion z-test", "diff": p2 - p1, "z": z, "p_value": _erfc_p(z) if se > 0 else 1.0,
            "ci95": [p2 - p1 - half, p2 - p1 + half]}


def mean_test(a: Metrics, b: Metrics) -> dict[str, Any]:
    """Two-sided Welch z-test of mean quality b - a (normal approximation)."""
    va, vb = a.quality_var, b.quality_var
    if va is None or vb is None:
        return {"method": "Welch z-test (mean quality)", "diff": None, "z": None, "p_value": None, "ci95": None}
    diff = b.avg_quality - a.avg_quality
    se = math.sqrt(va / a.quality_n + vb / b.quality_n)
    z = diff / se if se > 0 else 0.0
    return {"method": "Welch z-test (mean quality)", "diff": diff, "z": z,
            "p_value": _erfc_p(z) if se > 0 else 1.0, "ci95": [diff - 1.96 * se, diff + 1.96 * se]}


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

    @property
    def ready(self) -> bool:
        return self.decision == "promote"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def compare(project, *, now: _dt.datetime | None = None, data: dict[str, Any] | None = None) -> Comparison:
    """Metrics per version since the test started, the significance test and the decision."""
    now = utc(now)
    conf = ab_config(project)
    data = data if data is not None else Registry(project.root).load()
    running = state(data)
    if not running:
        raise UserError("no A/B test is running", hint="start one with: cl-release ab start VERSION --traffic 0.1")
    champ_v, chall_v = running["champion"], running["challenger"]
    started = parse_time(running["started_at"])
    per = version_metrics(project.feedback_path, since=started, until=now, versions=[champ_v, chall_v])
    a, b = per.get(champ_v, Metrics()), per.get(chall_v, Metrics())
    improvement, parts = weighted_improvement(a, b, conf["weights"])
    if conf["significance_metric"] == "quality":
        test, na, nb = mean_test(a, b), a.quality_n, b.quality_n
    else:
        test, na, nb = two_proportion_test(a.positive, a.opinions, b.positive, b.opinions), a.opinions, b.opinions
    alpha = conf["alpha"]
    p = test["p_value"]
    test["alpha"] = alpha
    test["significant"] = p is not None and p < alpha
    hours = (now - started).total_seconds() / 3600
    min_n, min_h, thr = conf["min_samples"], float(conf["min_duration_hours"]), conf["threshold"]
    checks = [
        {"name": "samples", "ok": min(na, nb) >= min_n, "value": {champ_v: na, chall_v: nb}, "need": min_n},
        {"name": "duration", "ok": hours >= min_h, "value": round(hours, 2), "need": min_h},
        {"name": "better", "ok": improvement is not None and improvement >= thr,
         "value": None if improvement is None else round(improvement, 4), "need": thr},
        {"name": "significant", "ok": bool(test["significant"] and (test["diff"] or 0) > 0),
         "value": None if p is None else round(p, 4), "need": f"p < {alpha}"},
    ]
    ok = {c["name"]: c["ok"] for c in checks}
    reasons = [f"{c['name']}: {c['value']} (need {c['need']})" for c in checks if not c["ok"]]
    max_h = conf["max_duration_hours"]
    if all(ok.values()):
        decision = "promote"
    elif ok["samples"] and ok["duration"] and test["significant"] and (test["diff"] or 0) < 0:
        decision, reasons = "stop", [f"{chall_v} is significantly worse (p={p:.4f})"]
    elif max_h is not None and hours >= float(max_h):
        decision, reasons = "stop", [f"no decision after {hours:.0f} h (max_duration_hours {max_h:g})"] + reasons
    else:
        decision = "wait"
    return Comparison(
        champion=champ_v, challenger=chall_v, traffic=running["traffic"], started_at=running["started_at"],
        now=registry_time(now), duration_hours=round(hours, 3),
        metrics={champ_v: a.to_dict(), chall_v: b.to_dict()}, improvement=improvement, components=parts,
        test=test, checks=checks, decision=decision, reasons=reasons,
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
    """Move ``champion`` to the challenger when every check holds.

    ``auto``: when a check fails, return ``promoted=False`` (for cron) instead of raising;
    when the comparison decides ``stop`` (the challenger is significantly worse, or no
    decision came in ``max_duration_hours``), stop the test as ``watch`` does
    (``stopped=True``). ``force``: promote anyway; needs a ``reason``, recorded in the event.
    """
    if force and not (reason and reason.strip()):
        raise UserError("--force needs --reason TEXT", hint="say why; it goes into the registry")
    comparison = compare(project, now=now)
    if not comparison.ready and not force:
        if auto and comparison.decision == "stop":
            event = stop(project.root, reason="; ".join(comparison.reasons), now=now)
            return PromoteResult(False, comparison, event, comparison.reasons, stopped=True)
        if auto:
            return PromoteResult(False, comparison, None, comparison.reasons)
        raise UserError(f"{comparison.challenger} is not ready to promote: " + "; ".join(comparison.reasons),
                        hint="wait for more traffic ('cl-release ab compare'), or --force --reason TEXT")
    fields = {"from": comparison.champion, "to": comparison.challenger,
              "improvement": comparison.improvement, "p_value": comparison.test["p_value"],
              "forced": bool(force and not comparison.ready)}
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


def format_comparison(c: Comparison) -> str:
    lines = [f"champion {c.champion} vs challenger {c.challenger} ({c.traffic:.0%} traffic), "
             f"{c.duration_hours:.1f} h since {c.started_at}"]
    for v in (c.champion, c.challenger):
        m = c.metrics[v]
        f = lambda x, d=3: "-" if x is None else f"{x:.{d}f}"  # noqa: E731
        lines.append(f"  {v:<10} answers {m['records']:>6}  quality {f(m['avg_quality'])} of {m['quality_samples']}"
                     f"  positive {f(m['positive_rate'])} of {m['opinions']} rated/thumbed"
                     f"  latency {f(m['avg_latency_ms'], 1)} ms")
    imp = "-" if c.improvement is None else f"{c.improvement:+.1%}"
    t = c.test
    pv = "-" if t["p_value"] is None else f"{t['p_value']:.4f}"
    lines.append(f"  weighted improvement {imp}; {t['method']}: p={pv} (alpha {t['alpha']})")
    for check in c.checks:
        value = check["value"]
        if check["name"] == "significant":  # the value is a p-value: say so, and which way it points
            value = "-" if value is None else f"p={t['p_value']:.4f}, challenger " + (
                "better" if (t["diff"] or 0) > 0 else "worse" if (t["diff"] or 0) < 0 else "equal")
        lines.append(f"  [{'ok' if check['ok'] else '--'}] {check['name']:<11} {value} (need {check['need']})")
    lines.append(f"decision: {c.decision}" + (f" ({'; '.join(c.reasons)})" if c.reasons else ""))
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
