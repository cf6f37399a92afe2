"""Candidate-vs-parent comparison and the release gates.

Defaults come from the team's pre-deployment checklist (shared/PRACTICE.md): at least 200
new examples for a MINOR release, zero critical regressions, accuracy at least the parent's
(tolerance 0), hallucination rate not above the parent's. ``gates:`` in cl-release.yaml
overrides any of them::

    gates:
      min_new_examples: {major: 0, minor: 200, patch: 0}   # or one integer for every bump
      max_critical_regressions: 0
      accuracy_tolerance: 0.0        # candidate pass rate >= parent's - tolerance
      hallucination_tolerance: 0.0   # candidate hallucination rate <= parent's + tolerance
      min_pass_rate: null            # absolute floors; these also apply to a first release
      max_hallucination_rate: null
      min_new_data_pass_rate: {major: null, minor: 0.8, patch: 0.8}   # or one number / null

A first release (no parent) is held to the absolute gates only.

``min_new_data_pass_rate`` asks whether the candidate learned its new data at all: it must
pass that share of checks built from the new data (``suite.check_case``): for a MINOR (and
a first release), the held-out examples the plan kept out of training (``holdout_ratio`` of
the new examples, paraphrases of facts it trained on); for a PATCH, the corrections it trained
on. The regression-suite gates compare against the parent and pass when nothing changed, so
only this one notices a release that learned nothing. Skipped (and recorded as skipped) when
no evaluation runs (no regression suite) or there are no checks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import GitError, UserError
from .results import CaseResult, EvalResult
from .suite import CRITICALITIES, CRITICALITY_RANK, checks_suite, load_project_suite, suite_paths

DEFAULT_GATES: dict[str, Any] = {
    "min_new_examples": {"major": 0, "minor": 200, "patch": 0},
    "max_critical_regressions": 0,
    "accuracy_tolerance": 0.0,
    "hallucination_tolerance": 0.0,
    "min_pass_rate": None,
    "max_hallucination_rate": None,
    "min_new_data_pass_rate": {"major": None, "minor": 0.8, "patch": 0.8},
    # A PATCH must pass every test added to the suite since its parent was released (the
    # incident's tests, from 'cl-release patch' or 'eval add --from-feedback').
    "patch_new_tests": True,
    # A destroyed model trains "fine" (gradient norm 0, loss at the uniform guess): the final
    # train loss must be finite and below this share of ln(vocabulary size).
    "max_loss_fraction": 0.8,
}
PER_BUMP = ("min_new_examples", "min_new_data_pass_rate")
_EPS = 1e-9


# ---------------------------------------------------------------- comparison


@dataclass
class Change:
    """One test whose result differs between parent and candidate (or that only one ran)."""

    id: str
    criticality: str
    domain: str
    tags: list[str]
    parent_passed: bool | None
    candidate_passed: bool | None
    parent_output: str | None
    candidate_output: str | None
    expected: Any = None
    match: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class SuiteComparison:
    """Candidate vs parent on the same suite."""

    parent_version: str | None
    candidate_version: str | None
    suite_sha256: str
    regressions: list[Change]  # parent passed, candidate failed; most critical first
    improvements: list[Change]  # parent failed, candidate passed
    unchanged_passed: list[str]
    unchanged_failed: list[str]
    metric_deltas: dict[str, Any] = field(default_factory=dict)

    def regressions_by_criticality(self) -> dict[str, list[Change]]:
        return {c: [r for r in self.regressions if r.criticality == c] for c in CRITICALITIES}

    @property
    def critical_regressions(self) -> list[Change]:
        return [r for r in self.regressions if r.criticality == "critical"]

    def to_dict(self) -> dict[str, Any]:
        return {
            "parent": self.parent_version,
            "candidate": self.candidate_version,
            "suite_sha256": self.suite_sha256,
            "regressions": [r.to_dict() for r in self.regressions],
            "regressions_by_criticality": {
                c: [r.id for r in rows] for c, rows in self.regressions_by_criticality().items() if rows
            },
            "improvements": [r.to_dict() for r in self.improvements],
            "unchanged": {"passed": len(self.unchanged_passed), "failed": len(self.unchanged_failed)},
            "metric_deltas": self.metric_deltas,
        }


def _change(p: CaseResult, c: CaseResult) -> Change:
    return Change(
        id=c.id,
        criticality=c.criticality,
        domain=c.domain,
        tags=list(c.tags),
        parent_passed=p.passed,
        candidate_passed=c.passed,
        parent_output=p.output,
        candidate_output=c.output,
        expected=c.expected,
        match=c.match,
    )


def _delta(a, b):
    if a is None or b is None:
        return None
    return round(b - a, 6)


def metric_deltas(parent: EvalResult, candidate: EvalResult) -> dict[str, Any]:
    pm, cm = parent.metrics, candidate.metrics
    out: dict[str, Any] = {
        "pass_rate": {"parent": pm["pass_rate"], "candidate": cm["pass_rate"], "delta": _delta(pm["pass_rate"], cm["pass_rate"])},
        "hallucination_rate": {
            "parent": pm["hallucination_rate"],
            "candidate": cm["hallucination_rate"],
            "delta": _delta(pm["hallucination_rate"], cm["hallucination_rate"]),
        },
    }
    for key in ("per_domain", "per_criticality"):
        names = sorted(set(pm[key]) | set(cm[key]), key=lambda n: CRITICALITY_RANK.get(n, 0) if key == "per_criticality" else n)
        out[key] = {}
        for n in names:
            a = (pm[key].get(n) or {}).get("pass_rate")
            b = (cm[key].get(n) or {}).get("pass_rate")
            out[key][n] = {"parent": a, "candidate": b, "delta": _delta(a, b)}
    return out


def compare_results(parent: EvalResult, candidate: EvalResult) -> SuiteComparison:
    """Regressions (parent passed, candidate failed) by criticality, improvements, unchanged.

    Both results must come from the same suite (same hash): a regression is only meaningful
    on the same tests. ``evaluate_entry`` recomputes the parent on the current suite.
    """
    if parent.suite_sha256 != candidate.suite_sha256:
        raise UserError(
            f"cannot compare results from different suites ({parent.suite_sha256[:16]} vs {candidate.suite_sha256[:16]})",
            hint="evaluate both versions on the same suite",
        )
    pby = parent.by_id()
    regressions, improvements, same_pass, same_fail = [], [], [], []
    for c in candidate.cases:
        p = pby[c.id]
        if p.passed and not c.passed:
            regressions.append(_change(p, c))
        elif c.passed and not p.passed:
            improvements.append(_change(p, c))
        elif c.passed:
            same_pass.append(c.id)
        else:
            same_fail.append(c.id)
    key = lambda ch: (CRITICALITY_RANK[ch.criticality], ch.id)  # noqa: E731
    return SuiteComparison(
        parent_version=parent.version,
        candidate_version=candidate.version,
        suite_sha256=candidate.suite_sha256,
        regressions=sorted(regressions, key=key),
        improvements=sorted(improvements, key=key),
        unchanged_passed=same_pass,
        unchanged_failed=same_fail,
        metric_deltas=metric_deltas(parent, candidate),
    )


def changed_outputs(a: EvalResult, b: EvalResult) -> list[Change]:
    """Every test whose pass/fail result changed from ``a`` to ``b``, with both outputs."""
    cmp = compare_results(a, b)
    return cmp.regressions + cmp.improvements


# ---------------------------------------------------------------- gates


@dataclass
class GateCheck:
    name: str
    passed: bool
    value: Any
    threshold: Any
    detail: str

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class GateDecision:
    passed: bool
    checks: list[GateCheck]
    candidate: str | None
    parent: str | None
    bump: str
    config: dict[str, Any]
    comparison: SuiteComparison | None = None

    @property
    def reasons(self) -> list[str]:
        """Why the release is blocked (empty when every gate passed)."""
        return [c.detail for c in self.checks if not c.passed]

    def to_dict(self) -> dict[str, Any]:
        d = {
            "passed": self.passed,
            "decision": "released" if self.passed else "rejected",
            "candidate": self.candidate,
            "parent": self.parent,
            "bump": self.bump,
            "reasons": self.reasons,
            "checks": [c.to_dict() for c in self.checks],
            "config": self.config,
        }
        if self.comparison is not None:
            d["regressions"] = {
                c: [r.id for r in rows] for c, rows in self.comparison.regressions_by_criticality().items() if rows
            }
            d["improvements"] = [r.id for r in self.comparison.improvements]
        return d


def gate_config(config: dict[str, Any] | None) -> dict[str, Any]:
    """Defaults overlaid with the project's ``gates:`` section (validated by the project schema)."""
    merged = dict(DEFAULT_GATES)
    for key, value in (config or {}).items():
        if key not in DEFAULT_GATES:
            raise UserError(f"unknown gate {key!r}", hint=f"known gates: {', '.join(DEFAULT_GATES)}")
        if key in PER_BUMP and isinstance(value, dict):
            value = {**DEFAULT_GATES[key], **value}
        merged[key] = value
    return merged


def _loss_check(conf: dict[str, Any], training: dict[str, Any] | None, vocab_size: int | None) -> GateCheck | None:
    """The final train loss must be finite and below ``max_loss_fraction`` of ln(vocabulary):
    a model that only guesses uniformly (lr 500: loss ln V, every answer empty) is destroyed."""
    frac = conf["max_loss_fraction"]
    if frac is None or training is None:
        return None
    if training.get("loss_not_finite"):
        return GateCheck("loss", False, None, frac, "the train loss was NaN or infinite: the run diverged")
    loss = training.get("final_loss", training.get("train_loss"))
    if loss is None or not vocab_size or vocab_size < 2:
        return GateCheck("loss", True, loss, frac, "no loss or vocabulary size to check (skipped)")
    uniform = math.log(vocab_size)
    limit = frac * uniform
    return GateCheck("loss", loss < limit, round(loss, 6), round(limit, 6),
                     f"final train loss {loss:.4f}, {loss / uniform:.0%} of the uniform guess ln({vocab_size}) = "
                     f"{uniform:.2f} (at most {frac:.0%})")


def _min_examples(conf: dict[str, Any], bump: str) -> int:
    v = conf["min_new_examples"]
    return int(v.get(bump, 0)) if isinstance(v, dict) else int(v)


def new_data_floor(conf: dict[str, Any], bump: str) -> float | None:
    """The ``min_new_data_pass_rate`` that applies to a ``bump`` release (None: off)."""
    v = conf["min_new_data_pass_rate"]
    v = v.get(bump) if isinstance(v, dict) else v
    return None if v is None else float(v)


def _new_data_check(conf: dict[str, Any], bump: str, new_data: EvalResult | None, skipped: str | None,
                    source: str | None) -> GateCheck | None:
    floor = new_data_floor(conf, bump)
    if floor is None:
        return None
    name = "min_new_data_pass_rate"
    if new_data is None:
        return GateCheck(name, True, None, floor, f"skipped: {skipped or 'no checks from the new data'}")
    m = new_data.metrics
    rate = m["pass_rate"] or 0.0
    what = {"heldout": "held-out examples of the new data", "corrections": "corrections"}.get(source or "", "checks")
    ok = rate + _EPS >= floor
    detail = (f"{m['passed']} of {m['n_tests']} {what} answered right ({rate:.0%}), at least {floor:.0%} needed"
              + ("" if ok else ": the candidate did not learn its new data"))
    return GateCheck(name, ok, rate, floor, detail)


def check(
    candidate: EvalResult | None,
    parent: EvalResult | None,
    *,
    bump: str,
    new_examples: int,
    config: dict[str, Any] | None = None,
    new_data: EvalResult | None = None,
    new_data_source: str | None = None,
    new_data_skipped: str | None = None,
    new_tests: list[str] | None = None,
    training: dict[str, Any] | None = None,
    vocab_size: int | None = None,
) -> GateDecision:
    """Apply every gate; ``parent=None`` (first release) applies the absolute gates only.

    ``new_data``: the candidate's results on the checks built from its new data
    (``new_data_source``: heldout or corrections); None skips ``min_new_data_pass_rate`` with
    the reason ``new_data_skipped``. ``new_tests``: ids of the suite's tests added since the
    parent; a PATCH must pass every one (``patch_new_tests``). ``training``: the entry's
    training record and ``vocab_size`` the model's: the loss gate (``max_loss_fraction``)."""
    conf = gate_config(config)
    checks: list[GateCheck] = []
    loss = _loss_check(conf, training, vocab_size)
    if loss is not None:
        checks.append(loss)

    need = _min_examples(conf, bump)
    checks.append(
        GateCheck(
            "min_new_examples",
            new_examples >= need,
            new_examples,
            need,
            f"{new_examples} new examples, a {bump} release needs at least {need}",
        )
    )
    learned = _new_data_check(conf, bump, new_data, new_data_skipped, new_data_source)
    if learned is not None:
        checks.append(learned)
    if candidate is None:  # no regression suite: the data gate, and any absolute floor fails
        for key in ("min_pass_rate", "max_hallucination_rate"):
            if conf[key] is not None:
                checks.append(GateCheck(key, False, None, conf[key], f"{key} is set but there is no regression suite"))
        return GateDecision(passed=all(c.passed for c in checks), checks=checks, candidate=None, parent=None,
                            bump=bump, config=conf)
    c_rate = candidate.pass_rate or 0.0
    if conf["min_pass_rate"] is not None:
        floor = float(conf["min_pass_rate"])
        checks.append(
            GateCheck("min_pass_rate", c_rate + _EPS >= floor, c_rate, floor, f"pass rate {c_rate:.1%}, the floor is {floor:.1%}")
        )
    c_hall = candidate.hallucination_rate
    if conf["max_hallucination_rate"] is not None and c_hall is not None:
        ceil = float(conf["max_hallucination_rate"])
        checks.append(
            GateCheck(
                "max_hallucination_rate", c_hall <= ceil + _EPS, c_hall, ceil,
                f"hallucination rate {c_hall:.1%}, the ceiling is {ceil:.1%}",
            )
        )

    if bump == "patch" and conf["patch_new_tests"] and new_tests:
        by_id = {c.id: c for c in candidate.cases}
        failing = sorted(t for t in new_tests if t in by_id and not by_id[t].passed)
        checks.append(GateCheck(
            "patch_new_tests", not failing, len(new_tests) - len(failing), len(new_tests),
            f"{len(new_tests) - len(failing)} of {len(new_tests)} tests added since the parent pass"
            + (f"; failing: {', '.join(failing[:10])}" + (" ..." if len(failing) > 10 else "") if failing else ""),
        ))

    comparison = None
    if parent is not None:
        comparison = compare_results(parent, candidate)
        crit = comparison.critical_regressions
        allowed = int(conf["max_critical_regressions"])
        ids = ", ".join(r.id for r in crit[:10]) + (" ..." if len(crit) > 10 else "")
        checks.append(
            GateCheck(
                "critical_regressions", len(crit) <= allowed, len(crit), allowed,
                f"{len(crit)} critical regression(s) vs {parent.version or 'the parent'}" + (f": {ids}" if crit else "")
                + f" (at most {allowed} allowed)",
            )
        )
        p_rate = parent.pass_rate or 0.0
        tol = float(conf["accuracy_tolerance"])
        checks.append(
            GateCheck(
                "accuracy", c_rate + _EPS >= p_rate - tol, c_rate, round(p_rate - tol, 6),
                f"pass rate {c_rate:.1%} vs parent {p_rate:.1%} (tolerance {tol:.1%})",
            )
        )
        p_hall = parent.hallucination_rate
        if p_hall is not None and c_hall is not None:
            htol = float(conf["hallucination_tolerance"])
            checks.append(
                GateCheck(
                    "hallucination_rate", c_hall <= p_hall + htol + _EPS, c_hall, round(p_hall + htol, 6),
                    f"hallucination rate {c_hall:.1%} vs parent {p_hall:.1%} (tolerance {htol:.1%})",
                )
            )
    return GateDecision(
        passed=all(c.passed for c in checks),
        checks=checks,
        candidate=candidate.version,
        parent=parent.version if parent is not None else None,
        bump=bump,
        config=conf,
        comparison=comparison,
    )


def release_gate(root, project, candidate_entry: dict, parent_entry: dict | None, *, new_examples: int, suites=None,
                 suite=None, new_data=None, new_data_source: str | None = None):
    """Everything the release pipeline needs in one call.

    Evaluates the candidate (and the parent, from its cached results when present) on the
    project's suite (``suite``: already loaded), and the candidate on ``new_data`` (a suite of
    checks built from its new data, see ``new_data_checks``) when the gate applies, and applies
    the gates. Returns (decision, candidate_result, parent_result)."""
    decision, cand, par, _ = _gate(root, project, candidate_entry, parent_entry, new_examples=new_examples,
                                   suites=suites, suite=suite, new_data=new_data, new_data_source=new_data_source)
    return decision, cand, par


def _gate(root, project, candidate_entry, parent_entry, *, new_examples, suites, suite, new_data, new_data_source):
    from . import runner as evaluate

    suite = suite if suite is not None else load_project_suite(root, project, suites)
    settings = evaluate.EvalSettings.from_project(project)
    conf = project.data.get("gates") if project is not None else None
    loaded = evaluate.LoadedModel(root, candidate_entry, settings)
    cand = evaluate.evaluate_entry(root, candidate_entry, suite, settings, loaded=loaded)
    nd, skipped = None, None
    if new_data_floor(gate_config(conf), candidate_entry["bump"]) is not None:
        if new_data is None:
            skipped = "no checks: nothing of the new data was held out (holdout_ratio) and there are no corrections"
        else:
            nd = evaluate.evaluate_entry(root, candidate_entry, new_data, settings, loaded=loaded)
    par = evaluate.evaluate_entry(root, parent_entry, suite, settings) if parent_entry is not None else None
    added = tests_added_since(root, suite, parent_entry["version"]) if parent_entry is not None else None
    decision = check(cand, par, bump=candidate_entry["bump"], new_examples=new_examples, config=conf,
                     new_data=nd, new_data_source=new_data_source, new_data_skipped=skipped, new_tests=added,
                     training=candidate_entry.get("training"), vocab_size=vocab_size(root, candidate_entry))
    return decision, cand, par, nd


def vocab_size(root, entry: dict[str, Any]) -> int | None:
    """The vocabulary size of the model an entry trained (``vocab_size`` of the base's
    config.json when the base is a local folder; else None: the loss gate is skipped)."""
    import json

    base = (entry.get("train_base") or {}).get("path") or entry["base_model"]["name"]
    path = Path(root) / base / "config.json"
    try:
        value = json.loads(path.read_text(encoding="utf-8")).get("vocab_size")
    except (OSError, ValueError):
        return None
    return value if isinstance(value, int) and value > 1 else None


def tests_added_since(root, suite, version: str) -> list[str]:
    """Ids of ``suite``'s tests that were not in its files when ``version`` was released (the
    files at git tag ``v<version>``). A file outside the repository, or a version without a
    tag, has no history to compare with: nothing counts as added."""
    import orjson

    from ..gitops import ReleaseRepo

    try:
        repo = ReleaseRepo(root)
    except GitError:  # evaluated outside a release repository: no history to compare with
        return []
    tag = f"v{version}"
    if repo.tag_commit(tag) is None:
        return []
    before: set[str] = set()
    for f in suite.files:
        text = repo.file_at(tag, f["path"]) if not Path(f["path"]).is_absolute() and ".." not in f["path"] else None
        for line in (text or "").splitlines():
            if line.strip():
                try:
                    row = orjson.loads(line)
                except orjson.JSONDecodeError:
                    continue
                if isinstance(row, dict) and isinstance(row.get("id"), str):
                    before.add(row["id"])
    return sorted(c.id for c in suite.cases if c.id not in before)


def new_data_checks(plan) -> tuple[Any, str | None]:
    """(suite, source) of the checks built from a release plan's new data: its held-out examples
    (source ``heldout``), else its corrections (a patch; ``corrections``); (None, None) if neither."""
    heldout = getattr(plan, "heldout", None)
    if heldout is not None and heldout.records:
        return checks_suite(heldout.records, domain="heldout"), "heldout"
    corrections = [r for p in getattr(plan, "parts", []) if p.role == "corrections" for r in p.records]
    if corrections:
        return checks_suite(corrections, domain="corrections"), "corrections"
    return None, None


@dataclass
class ReleaseEvaluation:
    """What the gate evaluator measured for one candidate (``ReleaseEvaluator.last``)."""

    candidate: EvalResult
    before: EvalResult | None  # the parent, or the base model for a first release
    before_label: str | None  # the parent's version, or "base"
    new_data: EvalResult | None = None
    new_data_source: str | None = None
    show: tuple[str, ...] = ()  # the tests whose answers the release shows (``evaluation.show``)

    def before_after(self, show: list[str] | tuple[str, ...] | None = None) -> dict[str, Any]:
        """Pass rate per domain before and after (domains in suite order), and the answers
        to the tests named in ``show`` (default: ``evaluation.show``), before and after."""
        show = self.show if show is None else show
        after = self.candidate
        domains: list[str] = []
        for c in after.cases:
            if c.domain not in domains:
                domains.append(c.domain)
        per_b = (self.before.metrics.get("per_domain") or {}) if self.before is not None else {}
        per_a = after.metrics.get("per_domain") or {}
        rows = [{"domain": d, "before": (per_b.get(d) or {}).get("pass_rate"),
                 "after": (per_a.get(d) or {}).get("pass_rate")} for d in domains]
        b_cases = self.before.by_id() if self.before is not None else {}
        a_cases = after.by_id()
        answers = []
        for tid in show:
            if tid in a_cases:
                answers.append({"id": tid, "before": b_cases[tid].output if tid in b_cases else None,
                                "after": a_cases[tid].output, "expected": a_cases[tid].expected})
        out: dict[str, Any] = {"before": self.before_label, "after": after.version, "domains": rows, "answers": answers,
                               "pass_rate": {"before": self.before.pass_rate if self.before is not None else None,
                                             "after": after.pass_rate}}
        if self.new_data is not None:
            m = self.new_data.metrics
            out["new_data"] = {"source": self.new_data_source, "n": m["n_tests"], "passed": m["passed"],
                               "pass_rate": m["pass_rate"]}
        return out


class ReleaseEvaluator:
    """The ``evaluator(project, plan, entry) -> entry`` hook of ``release.run_release``.

    Evaluates the candidate entry and its parent, applies the gates and records
    ``evaluation`` (summary; ``new_data``: the candidate's checks on its new data; ``baseline``:
    the base model's scores, for a first release), ``gates`` (the decision) and ``status``
    (released/rejected) in the entry. ``force`` keeps a failing candidate ``released`` and records
    ``override: {reason, at, reasons}``; it needs a reason. ``last`` holds what was measured
    (``ReleaseEvaluation``) for the caller to show.

    ``prepare(project, plan)`` runs while the candidate trains (in a thread): it imports the
    inference libraries and loads the suite, so the evaluation after training starts warm. It
    does not load a model or evaluate anything (the training may be using all of the GPU).
    Their import-time chatter goes to the release's ``train.log``, not the terminal.
    """

    def __init__(self, *, force: bool = False, reason: str | None = None, suites=None):
        if force and not (reason and reason.strip()):
            raise UserError("--force needs --reason TEXT",
                            hint="say why the gates are overridden; it goes into the registry")
        self.force, self.reason, self.suites = force, reason, suites
        self._suite = None
        self._chatter = None
        self.last: ReleaseEvaluation | None = None

    def _missing(self, project) -> list[str]:
        return [p for p in suite_paths(project, self.suites) if not (project.root / p).is_file()]

    def prepare(self, project, plan) -> None:
        from . import runner
        from ..release.chatter import Chatter

        if self._missing(project):
            return
        self._suite = load_project_suite(project.root, project, self.suites)
        with Chatter() as self._chatter:
            runner.warm_up()

    def __call__(self, project, plan, entry: dict) -> dict:
        from ..registry import Registry
        from ..timeutil import registry_now as utcnow

        parent_entry = Registry.find(Registry(project.root).load(), entry["parent"]) if entry.get("parent") else None
        entry = dict(entry)
        self.last = None
        if self._chatter is not None and getattr(plan, "output_dir", None):
            self._chatter.write(project.root / plan.output_dir / "train.log")
        self._chatter = None
        missing = self._missing(project)
        if missing:
            # No regression suite yet: only the data gates apply, and the entry says so.
            decision = check(None, None, bump=entry["bump"], new_examples=plan.new_examples,
                             config=project.data.get("gates"),
                             new_data_skipped="no evaluation ran (no regression suite)")
            entry["evaluation"] = {"skipped": f"no regression suite ({', '.join(missing)}); "
                                              "add tests with 'cl-release eval add'"}
        else:
            checks, source = new_data_checks(plan)
            suite = self._suite if self._suite is not None else load_project_suite(
                project.root, project, self.suites)
            decision, cand, par, nd = _gate(project.root, project, entry, parent_entry,
                                            new_examples=plan.new_examples, suites=self.suites, suite=suite,
                                            new_data=checks, new_data_source=source)
            entry["evaluation"] = cand.summary()
            before = par
            if parent_entry is None:  # a first release: the base model is what it is compared with
                before = _baseline(project, entry, suite)
                entry["evaluation"]["baseline"] = {
                    "model": before.model.get("base"), "pass_rate": before.pass_rate, "suite_sha256": before.suite_sha256,
                    "per_domain": {d: v["pass_rate"] for d, v in before.metrics["per_domain"].items()}}
            if nd is not None:
                m = nd.metrics
                entry["evaluation"]["new_data"] = {
                    "source": source, "n_checks": m["n_tests"], "passed": m["passed"], "pass_rate": m["pass_rate"],
                    "suite_sha256": nd.suite_sha256, "results": nd.performance.get("results_path"),
                    "failed": [c.id for c in nd.cases if not c.passed][:50]}
            show = tuple((project.data.get("evaluation") or {}).get("show") or ())
            self.last = ReleaseEvaluation(cand, before, parent_entry["version"] if parent_entry else "base", nd, source,
                                          show)
        self._suite = None
        entry["gates"] = decision.to_dict()
        if decision.passed:
            entry["status"] = "released"
        elif self.force:
            entry["status"] = "released"
            entry["override"] = {"reason": self.reason.strip(), "at": utcnow(), "reasons": decision.reasons}
        else:
            entry["status"] = "rejected"
        return entry


def _baseline(project, entry: dict, suite) -> EvalResult:
    """The base model alone (no adapter) on the suite: the "before" of a first release."""
    from . import runner as evaluate

    base, _adapter, revision = evaluate.entry_model_paths(entry)
    settings = evaluate.EvalSettings.from_project(project)
    return evaluate.evaluate_model(project.root, base, None, suite, settings, revision=revision, version="base")


def release_evaluator(*, force: bool = False, reason: str | None = None, suites=None) -> ReleaseEvaluator:
    """The gate evaluator ``cl-release release`` passes to ``run_release`` (see ReleaseEvaluator)."""
    return ReleaseEvaluator(force=force, reason=reason, suites=suites)
