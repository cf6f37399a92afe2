"""The watch loop: triggers -> release (with gates) -> challenger -> compare -> promote or stop.

One iteration (``watch_once``) looks at the durable state (the registry and the feedback
store) and takes at most one step forward:

1. an A/B test is running: one look (``abtest.promote(auto=True)``): promote the challenger,
   stop it (a guardrail, critical reports, significantly worse, or no decision in time), or
   wait. A critical (safety) trigger stops the test first so the patch can ship;
2. a released version that never served (the registry's ``current``, not champion, never
   in an A/B event) exists: deploy it (an earlier iteration crashed between release and
   start, or someone released by hand): champion when there is none or it is a PATCH
   (``abtest.test_patches`` false), otherwise the challenger on ``abtest.traffic``;
3. an update is due (``triggers``): release with the recommended bump through
   ``run_release`` with the release gates, then deploy as in 2. A rejected release means no
   challenger this round (the cooldown keeps the next iteration from retraining at once).

Because every step is decided from the registry and the store, a crash anywhere is safe to
re-run: ``run_release`` finishes a half-recorded release, and step 2 deploys a release whose
deployment was lost. A lock (``.cl-release/watch.lock``) keeps two loops from running at
once; ``.cl-release/watch/last.json`` records the last iteration for ``watch --status``.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from . import abtest
from . import triggers
from ..timeutil import registry_time, utc
from ..errors import ClReleaseError, UserError
from ..files import atomic_write_json, locked
from ..registry import Registry

STATE_DIR = ".cl-release/watch"
LAST_FILE = f"{STATE_DIR}/last.json"
HISTORY_FILE = f"{STATE_DIR}/history.jsonl"
LOCK_FILE = ".cl-release/watch.lock"

Progress = Callable[[str], None]
ReleaseFn = Callable[..., Any]


def _noop(_msg: str) -> None:
    pass


def parse_interval(text: str) -> float:
    """'90s', '15m', '1h', '2d' (or plain seconds) -> seconds."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*", str(text))
    if not m or float(m[1]) <= 0:
        raise UserError(f"invalid interval {text!r}", hint="use e.g. 30m, 1h or 1d")
    return float(m[1]) * {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[m[2]]


def default_release(project, *, bump: str, notes: str, progress: Progress = _noop):
    """``run_release`` with the release gates (evaluation of candidate vs parent)."""
    from ..eval.gates import release_evaluator
    from ..release.run import run_release

    return run_release(project, bump=bump, notes=notes, progress=progress, evaluator=release_evaluator())


@dataclass
class Iteration:
    started_at: str
    outcome: str = "running"  # idle | waiting | promoted | stopped | challenger_started | champion_set
    #                            | rejected | failed | running
    finished_at: str | None = None
    pid: int = field(default_factory=os.getpid)
    steps: list[str] = field(default_factory=list)
    decision: dict[str, Any] | None = None
    comparison: dict[str, Any] | None = None
    release: dict[str, Any] | None = None
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _deployed_versions(data: dict[str, Any]) -> set[str]:
    seen: set[str] = set()
    for e in data.get("events") or []:
        for k in ("to", "from", "challenger"):
            if isinstance(e.get(k), str):
                seen.add(e[k])
    seen |= set((data.get("aliases") or {}).values())
    return seen


def undeployed_release(data: dict[str, Any]) -> dict[str, Any] | None:
    """The current version when it is released but has never been champion or challenger."""
    if data["current"] is None:
        return None
    entry = Registry.find(data, data["current"])
    if entry["status"] != "released" or entry["version"] in _deployed_versions(data):
        return None
    return entry


def _deploy(project, entry: dict[str, Any], it: Iteration, now, say: Progress) -> None:
    conf = abtest.ab_config(project)
    data = Registry(project.root).load()
    v = entry["version"]
    champion = (data.get("aliases") or {}).get("champion")
    if champion == v:  # the release deployed itself (a patch: see run_release's deploy)
        it.outcome = "champion_set"
        it.steps.append(f"{v} is champion (deployed by its release)")
    elif champion is None:
        abtest.set_champion(project.root, v, now=now, reason="first version to serve")
        it.outcome = "champion_set"
        it.steps.append(f"{v} is champion (nothing served before)")
    elif entry["bump"] == "patch" and not conf["test_patches"]:
        abtest.set_champion(project.root, v, now=now, reason="patch release (safety fix): no A/B test")
        it.outcome = "champion_set"
        it.steps.append(f"{v} is champion at once (PATCH; abtest.test_patches is false)")
    else:
        abtest.start(project.root, v, traffic=conf["traffic"], now=now)
        it.outcome = "challenger_started"
        it.steps.append(f"started {v} as challenger of {champion} on {conf['traffic']:.0%} of traffic")
    say(it.steps[-1])


def _step(project, it: Iteration, now, release: ReleaseFn, say: Progress) -> None:
    root = project.root
    data = Registry(root).load()
    decision = triggers.evaluate(project, now=now, data=data)
    it.decision = decision.to_dict()
    running = abtest.state(data)

    if running and decision.critical:
        abtest.stop(root, reason="critical feedback: a patch release goes first", now=now)
        it.steps.append(f"stopped the A/B test of {running['challenger']}: critical feedback needs a patch")
        say(it.steps[-1])
    elif running:
        result = abtest.promote(project, now=now, auto=True)  # one look: promote, stop (with the evidence) or wait
        comparison = result.comparison
        it.comparison = comparison.to_dict()
        if result.promoted:
            it.outcome = "promoted"
            it.steps.append(f"promoted {comparison.challenger} to champion (weighted {comparison.improvement:+.1%}, "
                            f"always-valid p={comparison.test['p_value']:.4f}, look {comparison.look})")
        elif result.stopped:
            it.outcome = "stopped"
            it.steps.append(f"stopped {comparison.challenger}: {'; '.join(comparison.reasons)} "
                            f"(look {comparison.look})")
        else:
            it.outcome = "waiting"
            it.steps.append(f"A/B test of {comparison.challenger} continues: {'; '.join(comparison.reasons)}")
        say(it.steps[-1])
        return

    pending = undeployed_release(Registry(root).load())
    if pending is not None and not decision.critical:
        it.steps.append(f"{pending['version']} is released but not deployed")
        _deploy(project, pending, it, now, say)
        return

    if not decision.due:
        it.outcome = "idle"
        it.steps.append("no update due")
        say(it.steps[-1])
        return

    bump = decision.bump
    notes = "watch: " + "; ".join(decision.reasons)
    it.steps.append(f"update due ({decision.urgency}): releasing {bump}")
    say(it.steps[-1])
    result = release(project, bump=bump, notes=notes, progress=say)
    entry = result.entry
    it.release = {"version": entry["version"], "status": entry["status"], "bump": entry["bump"],
                  "strategy": entry["strategy"], "parent": entry["parent"]}
    if entry["status"] != "released":
        it.outcome = "rejected"
        it.steps.append(f"{entry['version']} was rejected by the gates: no challenger this round")
        say(it.steps[-1])
        return
    it.steps.append(f"released {entry['version']}")
    _deploy(project, entry, it, now, say)


def _record(root: Path, it: Iteration, *, final: bool) -> None:
    atomic_write_json(root / LAST_FILE, it.to_dict())
    if final:
        with open(root / HISTORY_FILE, "a", encoding="utf-8") as f:
            f.write(json.dumps({k: v for k, v in it.to_dict().items() if k not in ("decision", "comparison")},
                               sort_keys=True) + "\n")


def iterate(root: Path, *, now: _dt.datetime | None = None, release: ReleaseFn | None = None,
            progress: Progress = _noop) -> Iteration:
    """One iteration (the caller holds the watch lock). Errors are recorded, then re-raised.

    ``release(project, bump=, notes=, progress=)`` makes the release (default:
    ``default_release``, i.e. ``run_release`` with the gates) and returns an object with ``entry``.
    """
    from ..project import Project

    release = release or default_release
    root = Path(root)
    it = Iteration(started_at=registry_time(utc(now)))
    _record(root, it, final=False)
    try:
        _step(Project.load(root), it, now, release, progress)
    except ClReleaseError as e:
        it.outcome, it.error = "failed", str(e)
        raise
    except BaseException as e:
        it.outcome, it.error = "failed", f"{type(e).__name__}: {e}"
        raise
    finally:
        it.finished_at = registry_time(utc(now))
        _record(root, it, final=True)
    return it


def watch_lock(root: Path):
    return locked(Path(root) / LOCK_FILE, timeout=0, what="the watch loop (another 'cl-release watch' is running)")


def watch_once(root: Path, *, now: _dt.datetime | None = None, release: ReleaseFn | None = None,
               progress: Progress = _noop) -> Iteration:
    """Take the watch lock and run one iteration (``watch --once``, for cron)."""
    with watch_lock(root):
        return iterate(root, now=now, release=release, progress=progress)


def watch_forever(root: Path, *, interval_s: float, release: ReleaseFn | None = None,
                  progress: Progress = _noop, sleep: Callable[[float], None] = time.sleep,
                  iterations: int | None = None) -> None:
    """Iterate every ``interval_s`` seconds, holding the lock throughout; a failed iteration is
    recorded and the loop goes on (``iterations`` bounds it, for tests)."""
    done = 0
    with watch_lock(root):
        while iterations is None or done < iterations:
            try:
                it = iterate(root, release=release, progress=progress)
                progress(f"iteration finished: {it.outcome}")
            except ClReleaseError as e:
                progress(f"iteration failed: {e}")
            done += 1
            if iterations is None or done < iterations:
                sleep(interval_s)


def last_iteration(root: Path) -> dict[str, Any] | None:
    """The last recorded iteration, or None when the loop never ran."""
    path = Path(root) / LAST_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: unreadable watch state ({e.msg})", hint="delete it; the next iteration rewrites it") from None


def format_iteration(it: dict[str, Any]) -> str:
    lines = [f"last iteration {it['started_at']} -> {it.get('finished_at') or '(running or interrupted)'}: "
             f"{it['outcome']}" + (f" (pid {it['pid']})" if it["outcome"] == "running" else "")]
    lines += [f"  - {s}" for s in it.get("steps") or []]
    if it.get("error"):
        lines.append(f"  error: {it['error']}")
    return "\n".join(lines)
