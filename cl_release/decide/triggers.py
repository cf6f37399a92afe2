"""Is an update due, and why: the team's triggers, each with its current value and threshold.

Defaults come from the team's practice (shared/PRACTICE.md); ``triggers:`` in
cl-release.yaml overrides any of them::

    triggers:
      min_new_examples: 200        # high-quality examples since the current release -> MINOR
      planned_corrections: 500     # corrections since the current release -> planned MINOR
      quality_window_hours: 24     # window for the quality drop and the error rate
      quality_drop_planned: 0.05   # relative drop vs the release's baseline -> planned
      quality_drop_immediate: 0.10 # ... -> immediate
      min_window_samples: 30       # fewer rated answers in the window (or baseline): no verdict
      negative_rate: 0.20          # negative feedback / feedback in the window -> immediate
      schedule_days: 90            # days since the last release -> planned
      cooldown_hours: 24           # after a release, only critical triggers count
      merge_after: 4               # continued-LoRA releases in a row before a MAJOR (merge_and_retrain)

Every function takes ``now`` (a datetime; the CLI passes the real clock), so tests drive
the clock. Feedback after ``now`` is ignored.

Quality of one answer: its latest rating mapped to 0..1 ((rating - 1) / 4); else the
record's ``quality_score`` (taken as 0..1); else thumbs (up 1, down 0) (the store's
``queries.QUALITY``). Positive: rating >= ``min_rating`` or thumbs up. Negative: rating <=
``max_negative_rating``, thumbs down or hallucinated; both thresholds are the project's
extraction rules (``extraction:``; 4 and 2 by default). The quality and error windows count
answers served by the serving version (``champion`` alias, else ``current``) and answers
logged without a version. The store answers every question through named methods
(:class:`~cl_release.store.base.FeedbackBackend`); no SQL here.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Iterator

from ..errors import UserError
from ..store.values import CRITICAL_SEVERITIES
from ..timeutil import parse_time, registry_time, store_time as iso, utc

if TYPE_CHECKING:
    from ..store.base import FeedbackBackend

DEFAULTS: dict[str, Any] = {
    "min_new_examples": 200,
    "planned_corrections": 500,
    "quality_window_hours": 24.0,
    "quality_drop_planned": 0.05,
    "quality_drop_immediate": 0.10,
    "min_window_samples": 30,
    "negative_rate": 0.20,
    "schedule_days": 90.0,
    "cooldown_hours": 24.0,
    "merge_after": 4,
}
EXIT_DUE = 10


def trigger_config(project) -> dict[str, Any]:
    """Defaults overlaid with the project's ``triggers:`` section (checked by the project schema)."""
    conf = dict(DEFAULTS)
    for key, value in ((project.data.get("triggers") if project is not None else None) or {}).items():
        if key not in DEFAULTS:
            raise UserError(f"unknown trigger setting {key!r}", hint=f"known: {', '.join(DEFAULTS)}")
        conf[key] = value
    if conf["quality_drop_immediate"] < conf["quality_drop_planned"]:
        raise project.error("quality_drop_immediate must be >= quality_drop_planned", "triggers",
                            "quality_drop_immediate")
    return conf


# ---------------------------------------------------------------- metrics from the store


@dataclass
class Metrics:
    """Aggregates over the answers of one version (or all) in a time window."""

    records: int = 0
    feedback: int = 0
    quality_n: int = 0
    quality_sum: float = 0.0
    quality_sq: float = 0.0
    opinions: int = 0  # answers with a rating or thumbs
    positive: int = 0
    negative: int = 0
    latency_n: int = 0
    latency_sum: float = 0.0

    def add(self, other: "Metrics") -> "Metrics":
        for k in self.__dataclass_fields__:
            setattr(self, k, getattr(self, k) + getattr(other, k))
        return self

    @property
    def avg_quality(self) -> float | None:
        return self.quality_sum / self.quality_n if self.quality_n else None

    @property
    def quality_var(self) -> float | None:
        if self.quality_n < 2:
            return None
        mean = self.quality_sum / self.quality_n
        return max(0.0, (self.quality_sq - self.quality_n * mean * mean) / (self.quality_n - 1))

    @property
    def positive_rate(self) -> float | None:
        return self.positive / self.opinions if self.opinions else None

    @property
    def negative_rate(self) -> float | None:
        return self.negative / self.feedback if self.feedback else None

    @property
    def avg_latency_ms(self) -> float | None:
        return self.latency_sum / self.latency_n if self.latency_n else None

    def to_dict(self) -> dict[str, Any]:
        r = lambda x: None if x is None else round(x, 6)  # noqa: E731
        return {"records": self.records, "feedback": self.feedback, "quality_samples": self.quality_n,
                "avg_quality": r(self.avg_quality), "opinions": self.opinions, "positive": self.positive,
                "positive_rate": r(self.positive_rate), "negative": self.negative,
                "negative_rate": r(self.negative_rate), "latency_samples": self.latency_n,
                "avg_latency_ms": r(self.avg_latency_ms)}


@contextlib.contextmanager
def reading(store_path: Path) -> Iterator[FeedbackBackend | None]:
    """The feedback store at ``store_path`` for reading, or None when there is none yet (a
    trigger that only looks creates nothing)."""
    from ..store import FeedbackStore

    with FeedbackStore(store_path) as store:
        yield store if store.exists() else None


def opinion_rules(project) -> dict[str, int]:
    """What a positive and a negative opinion are (``min_rating``, ``max_negative_rating``): the
    project's extraction rules, so the triggers count what the data build keeps and corrects."""
    from ..data.build import rules_from_project

    rules = rules_from_project(project)
    return {"min_rating": rules.min_rating, "max_negative_rating": rules.max_negative_rating}


def version_metrics(store: FeedbackBackend | None, *, since: _dt.datetime | None, until: _dt.datetime,
                    min_rating: int, max_negative_rating: int, versions: Iterable[str] | None = None,
                    include_unversioned: bool = False) -> dict[str | None, Metrics]:
    """Per ``model_version``: metrics over answers created in [since, until), with the latest
    feedback given before ``until``. ``versions``: only these (plus unversioned answers when
    ``include_unversioned``). The key ``None`` holds unversioned answers. ``store`` None: no
    store yet, no answers."""
    if store is None:
        return {}
    per = store.version_aggregates(since=since, until=until, versions=versions, include_unversioned=include_unversioned,
                                   min_rating=min_rating, max_negative_rating=max_negative_rating)
    return {v: Metrics(*agg) for v, agg in per.items()}


def total(metrics: dict[Any, Metrics] | Iterable[Metrics]) -> Metrics:
    """The sum of per-version metrics (a dict's values, or any Metrics)."""
    out = Metrics()
    for m in metrics.values() if isinstance(metrics, dict) else metrics:
        out.add(m)
    return out


def new_examples(project, *, used_by: Iterable[str], until: _dt.datetime) -> dict[str, int]:
    """Usable training examples (deduplicated, by the project's extraction rules) that a MINOR
    release on the lineage ``used_by`` would take from the store (the query ``plan`` runs)."""
    from ..data.build import release_feedback
    from ..data.rules import CORRECTED

    result = release_feedback(project, used_by, bump="minor", until=iso(until))
    if result is None:
        return {"examples": 0, "corrections": 0}
    return {"examples": result.manifest["examples"], "corrections": result.manifest["sources"][CORRECTED]}


def patch_corrections(project, *, used_by: Iterable[str], until: _dt.datetime) -> dict[str, int]:
    """The feedback corrections a PATCH on the lineage ``used_by`` would train on (the query
    ``plan patch`` runs): how many, and how many of them are critical or safety reports."""
    from ..data.build import release_feedback
    from ..store import FeedbackStore

    result = release_feedback(project, used_by, bump="patch", until=iso(until))
    if result is None or not result.manifest["examples"]:
        return {"corrections": 0, "critical": 0}
    with FeedbackStore(project.feedback_path) as store:
        severities = store.severities(result.manifest["record_ids"])
    return {"corrections": result.manifest["examples"],
            "critical": sum(severities.get(s, 0) for s in CRITICAL_SEVERITIES)}


# ---------------------------------------------------------------- the decision


@dataclass
class Trigger:
    name: str
    due: bool
    value: Any
    threshold: Any
    detail: str
    urgency: str | None = None  # "immediate" or "planned" when due
    bump: str | None = None
    critical: bool = False
    suppressed: bool = False  # due, but inside the cooldown

    @property
    def fires(self) -> bool:
        return self.due and not self.suppressed


@dataclass
class Decision:
    now: str
    due: bool
    bump: str | None
    urgency: str | None
    reasons: list[str]
    triggers: list[Trigger]
    current: str | None
    serving: str | None
    last_release: dict[str, Any] | None
    cooldown_until: str | None
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def exit_code(self) -> int:
        return EXIT_DUE if self.due else 0

    @property
    def critical(self) -> bool:
        return any(t.fires and t.critical for t in self.triggers)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["exit_code"] = self.exit_code
        return d


def _rel_drop(baseline: float | None, value: float | None) -> float | None:
    if baseline is None or value is None or baseline <= 0:
        return None
    return (baseline - value) / baseline


def _latest(models: list[dict[str, Any]], statuses: tuple[str, ...]) -> dict[str, Any] | None:
    chosen = [m for m in models if m["status"] in statuses]
    return max(chosen, key=lambda m: m["created_at"]) if chosen else None


def recommend_bump(data: dict[str, Any], conf: dict[str, Any]) -> tuple[str, str]:
    """MINOR normally; MAJOR (merge_and_retrain) after ``merge_after`` continued-LoRA releases
    in a row on the current lineage, following the team's practice ('after 3-4 incremental
    updates'). Returns (bump, why)."""
    from ..registry import Registry

    if data["current"] is None:
        return "major", "first release (1.0.0)"
    streak = 0
    for entry in reversed(Registry.lineage(data, data["current"])):
        if entry["strategy"] != "continued_lora":
            break
        streak += 1
    if conf["merge_after"] and streak >= conf["merge_after"]:
        return "major", f"{streak} continued-LoRA releases in a row (merge_after {conf['merge_after']}): merge and retrain"
    return "minor", "new data: continued LoRA"


def evaluate(project, *, now: _dt.datetime | None = None, data: dict[str, Any] | None = None) -> Decision:
    """Every trigger against the registry and the feedback store at ``now``."""
    with reading(project.feedback_path) as store:
        return _evaluate(project, store, now=now, data=data)


def _evaluate(project, store: FeedbackBackend | None, *, now: _dt.datetime | None,
              data: dict[str, Any] | None) -> Decision:
    from ..registry import Registry

    now = utc(now)
    conf = trigger_config(project)
    data = data if data is not None else Registry(project.root).load()
    models = data["models"]
    current = Registry.find(data, data["current"]) if data["current"] else None
    serving = (data.get("aliases") or {}).get("champion") or data["current"]
    last_released = _latest(models, ("released",))
    last_attempt = _latest(models, ("released", "rejected"))
    triggers: list[Trigger] = []

    if current is None:
        triggers.append(Trigger("first_release", True, "no release yet", "-", "no released version: make 1.0.0",
                                "planned", "major"))
    since = parse_time(current["created_at"]) if current else None

    # 1. enough new high-quality examples; many corrections (what a MINOR on current would take)
    lineage = [e["version"] for e in Registry.lineage(data, current["version"])] if current else []
    counts = new_examples(project, used_by=lineage, until=now)
    since_txt = f"not yet trained by {current['version']}'s lineage" if current else "so far"
    n, need = counts["examples"], conf["min_new_examples"]
    triggers.append(Trigger("new_examples", n >= need, n, need,
                            f"{n} usable examples {since_txt} (need {need})", "planned" if n >= need else None,
                            "minor" if n >= need else None))
    c, need_c = counts["corrections"], conf["planned_corrections"]
    triggers.append(Trigger("corrections", c >= need_c, c, need_c, f"{c} corrections {since_txt} (planned update at {need_c})",
                            "planned" if c >= need_c else None, "minor" if c >= need_c else None))

    # 2. quality drop vs the serving version's baseline; 3. negative-feedback rate
    window = _dt.timedelta(hours=float(conf["quality_window_hours"]))
    start = now - window
    min_n = conf["min_window_samples"]
    serving_versions = [serving] if serving else []
    opinions = opinion_rules(project)
    per_version = version_metrics(store, since=start, until=now, **opinions)
    win = total(m for v, m in per_version.items() if v is None or v in serving_versions)
    others = total(m for v, m in per_version.items() if v is not None and v not in serving_versions)
    whose = f"of {serving} (or no version)" if serving else "(no version serves)"
    elsewhere = (f"; other versions: {others.records} answers, {others.feedback} with feedback"
                 if others.records else "")
    serving_entry = Registry.find(data, serving) if serving else None
    base = Metrics()
    if serving_entry is not None:
        base_since = parse_time(serving_entry["created_at"])
        if base_since < start:
            base = total(version_metrics(store, since=base_since, until=start, versions=serving_versions, **opinions))
    drop = _rel_drop(base.avg_quality, win.avg_quality)
    hours = f"{conf['quality_window_hours']:g} h"
    if base.quality_n < min_n or win.quality_n < min_n:
        triggers.append(Trigger("quality_drop", False, None, conf["quality_drop_planned"],
                                f"not enough rated answers {whose} (baseline {base.quality_n}, last {hours} "
                                f"{win.quality_n}; need {min_n} each){elsewhere}"))
    else:
        urgency = ("immediate" if drop > conf["quality_drop_immediate"] else
                   "planned" if drop >= conf["quality_drop_planned"] else None)
        triggers.append(Trigger(
            "quality_drop", urgency is not None, round(drop, 4),
            {"planned": conf["quality_drop_planned"], "immediate": conf["quality_drop_immediate"]},
            f"quality {win.avg_quality:.3f} over the last {hours} vs baseline {base.avg_quality:.3f} of {serving} "
            f"({drop:+.1%} drop){elsewhere}", urgency, "minor" if urgency else None))
    rate, limit = win.negative_rate, conf["negative_rate"]
    if win.feedback < min_n:
        triggers.append(Trigger("negative_rate", False, rate, limit,
                                f"{win.feedback} answers {whose} with feedback in the last {hours} "
                                f"(need {min_n}){elsewhere}"))
    else:
        triggers.append(Trigger("negative_rate", rate > limit, round(rate, 4), limit,
                                f"{win.negative}/{win.feedback} answers {whose} negative in the last {hours} "
                                f"({rate:.1%}, limit {limit:.0%}){elsewhere}",
                                "immediate" if rate > limit else None, "minor" if rate > limit else None))

    # 4. schedule
    if last_released is not None:
        age_days = (now - parse_time(last_released["created_at"])).total_seconds() / 86400
        every = float(conf["schedule_days"])
        triggers.append(Trigger("schedule", age_days >= every, round(age_days, 2), every,
                                f"{age_days:.1f} days since {last_released['version']} (every {every:g} days)",
                                "planned" if age_days >= every else None, "minor" if age_days >= every else None))

    # 5. critical / safety corrections -> PATCH now (never suppressed), from the query a patch
    # on the serving version runs, so 'status' and 'plan patch' agree on what it would train on
    serving_lineage = [e["version"] for e in Registry.lineage(data, serving)] if serving else []
    patch = patch_corrections(project, used_by=serving_lineage, until=now)
    crit = (store.critical_feedback(since=since, until=now) if store is not None
            else {"with_correction": 0, "without_correction": 0})
    k = patch["critical"]
    detail = (f"{k} critical/safety corrections not yet trained into {serving or '-'} "
              f"(a patch would train on {patch['corrections']} corrections)")
    if crit["without_correction"]:
        detail += f"; {crit['without_correction']} flagged without a correction (add one to make a patch)"
    triggers.append(Trigger("critical", k > 0 and current is not None, k, 1, detail,
                            "immediate" if k and current else None, "patch" if k and current else None, critical=True))

    # 6. cooldown after the last release attempt (released or rejected: no retraining loop)
    cooldown_until = None
    if last_attempt is not None:
        until = parse_time(last_attempt["created_at"]) + _dt.timedelta(hours=float(conf["cooldown_hours"]))
        if now < until:
            cooldown_until = registry_time(until)
            for t in triggers:
                if t.due and not t.critical:
                    t.suppressed = True

    firing = [t for t in triggers if t.fires]
    reasons = [f"{t.name}: {t.detail}" for t in firing]
    if any(t.critical for t in firing):
        bump, urgency = "patch", "immediate"
    elif firing:
        bump, why = recommend_bump(data, conf)
        if current is not None:
            reasons.append(f"bump {bump}: {why}")
        urgency = "immediate" if any(t.urgency == "immediate" for t in firing) else "planned"
    else:
        bump = urgency = None
    return Decision(now=registry_time(now), due=bool(firing), bump=bump, urgency=urgency, reasons=reasons,
                    triggers=triggers, current=data["current"], serving=serving,
                    last_release=({"version": last_attempt["version"], "status": last_attempt["status"],
                                   "created_at": last_attempt["created_at"]} if last_attempt else None),
                    cooldown_until=cooldown_until, config=conf)


def next_command(d: Decision) -> str:
    """The runbook's command for a due update: ``cl-release patch`` for a safety fix (it takes
    the open critical corrections), ``cl-release release BUMP`` otherwise."""
    return "cl-release patch" if d.bump == "patch" else f"cl-release release {d.bump}"


def format_decision(d: Decision) -> str:
    """Human-readable lines for ``cl-release status``."""
    head = (f"update due: {d.bump.upper()} ({d.urgency}); run: {next_command(d)}" if d.due else "no update due")
    lines = [f"{head}   serving {d.serving or '-'}, current {d.current or '-'}"
             + (f", cooldown until {d.cooldown_until}" if d.cooldown_until else "")]
    for t in d.triggers:
        mark = "DUE " if t.fires else ("held" if t.suppressed else "  - ")
        thr = t.threshold if not isinstance(t.threshold, dict) else "/".join(f"{v:g}" for v in t.threshold.values())
        lines.append(f"  [{mark}] {t.name:<14} value {t.value if t.value is not None else '-'!s:<10} "
                     f"threshold {thr!s:<10} {t.detail}")
    return "\n".join(lines)

