"""``cl-release patch``: a safety fix as one incident workflow.

The runbook's five steps in one command, each idempotent so a re-run after a crash (or a
second run) continues where the last one stopped:

1. record the correction of the incident's logged answer (``--correction``; once);
2. add each incident to the regression suite as a critical test (the corrected answer's key
   facts must appear; a wrong value the model gave must not), unless it is there already;
3. plan the PATCH on the version that serves (``plan``: corrections, replay, the tests);
4. release it: the gates reject it unless the tests added since its parent pass;
5. deploy it (champion, in the release's own registry move) and, with ``push``, push it.

Without request ids it takes every open critical or safety correction: the ones ``status``
reports as "PATCH due" (the query ``plan patch`` runs).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

from ..data import formats as ds
from ..errors import NothingToTrain, UnknownRequest, UserError
from ..eval.suite import DEFAULT_SUITE, prompt_input

Progress = Callable[[str], None]
PATCH_ANNOTATOR = "cl-release patch"

# A value an answer states: a number with its unit when it has a known one ("10 ppm",
# "2.5 mg/m3", "50%", "-20 °C", "30 minutes"). What a correction changes in a safety answer
# is almost always one of these.
_UNITS = ("ppm|ppb|mg/m3|mg/m³|mg/l|mg/kg|µg|ug|mg|kg|g|t|ml|l|m3|m³|m|cm|mm|km|µm|nm|s|sec|seconds?|min|minutes?"
          "|h|hours?|days?|weeks?|months?|years?|bar|mbar|psi|pa|kpa|mpa|v|kv|mv|a|ma|w|kw|mw|j|kj|mj|cal|kcal"
          "|lux|db|ph|mol|mmol|°c|°f|°")
_VALUE = re.compile(rf"(?<![\w.])-?\d+(?:[.,]\d+)?(?:\s*%|\s*°\s?[CF]\b|\s*(?:{_UNITS})(?![\w/]))?", re.IGNORECASE)


def _noop(_msg: str) -> None:
    pass


def values(text: str) -> list[str]:
    """The values ``text`` states (numbers with their unit), in order, whitespace folded."""
    return list(dict.fromkeys(" ".join(m.group(0).split()) for m in _VALUE.finditer(text)))


def incident_tests(record: dict[str, Any], *, criticality: str = "critical") -> list[dict[str, Any]]:
    """The suite rows for one corrected incident: the correction's values (or the whole
    correction when it states none) must appear; the values of the wrong answer that the
    correction does not state must not. Ids derive from the request id."""
    correction = (record.get("correction") or "").strip()
    if not correction:
        raise UserError(f"request {record['id']!r} has no correction",
                        hint=f"give one: cl-release patch {record['id']} --correction TEXT")
    prompt = prompt_input(record["input"])
    right = values(correction)
    base = {"input": prompt, "criticality": criticality, "domain": "incident", "tags": ["incident"],
            "source": f"feedback:{record['id']}"}
    rows = [{**base, "id": f"incident-{record['id']}", "match": "contains",
             "expected": right or correction.rstrip(".!").strip() or correction}]
    folded = {v.casefold() for v in right}
    wrong = [v for v in values(record.get("output") or "") if v.casefold() not in folded]
    if wrong:
        rows.append({**base, "id": f"incident-{record['id']}-not", "match": "not_contains", "expected": wrong})
    return rows


def open_incidents(project, *, now=None) -> list[str]:
    """Request ids of the critical or safety corrections a PATCH on the serving version would
    train on (what ``status`` reports as a PATCH due)."""
    from ..data.build import release_feedback
    from ..decide.triggers import CRITICAL_SEVERITIES
    from ..store.sqlite import FeedbackStore
    from ..timeutil import store_now as utc_now
    from ..registry import Registry
    from .plan import serving_version

    data = Registry(project.root).load()
    serving = serving_version(data)
    if serving is None:
        return []
    lineage = [e["version"] for e in Registry.lineage(data, serving)]
    result = release_feedback(project, lineage, bump="patch", until=now or utc_now())
    if result is None:
        return []
    with FeedbackStore(project.feedback_path) as store:
        return [rid for rid in result.manifest["record_ids"]
                if (store.get(rid) or {}).get("severity") in CRITICAL_SEVERITIES]


@dataclass
class PatchResult:
    request_ids: list[str]
    corrections_recorded: list[str] = field(default_factory=list)
    tests_added: list[str] = field(default_factory=list)
    tests: list[dict[str, Any]] = field(default_factory=list)  # every incident test (added or already there)
    plan: Any = None  # the release Plan (None when there was nothing to train)
    release: Any = None  # the ReleaseResult
    fixed_in: str | None = None  # the version whose lineage trained the incidents (this run's, or an earlier one)
    pushed: dict[str, Any] | None = None
    dry_run: bool = False

    @property
    def noop(self) -> bool:
        return not (self.corrections_recorded or self.tests_added or self.release is not None or self.pushed)


def record_correction(store, request_id: str, correction: str, *, severity: str = "critical") -> bool:
    """Record ``correction`` as the latest feedback on ``request_id`` (rated 1, so it is a
    corrected example); False when that is already its latest feedback."""
    record = store.get(request_id)
    if record is None:
        raise UnknownRequest(f"no logged answer with request id {request_id!r}", hint="check the id ('cl-release review')")
    if (record.get("correction") or "").strip() == correction.strip() and (record.get("rating") or 5) <= 2:
        return False
    store.feedback(request_id, rating=1, correction=correction.strip(), severity=record.get("severity") or severity,
                   annotator=PATCH_ANNOTATOR)
    return True


def patch(project, request_ids: Iterable[str] = (), *, correction: str | None = None, from_version: str | None = None,
          notes: str = "", deploy: bool | None = None, push: bool | None = None, dry_run: bool = False,
          suite: str = DEFAULT_SUITE, force: bool = False, reason: str | None = None,
          progress: Progress = _noop, show: Callable[[list[dict[str, Any]]], None] | None = None,
          train_progress=None, evaluator=None) -> PatchResult:
    """Run the incident workflow (see the module docstring). ``show`` sees the incident tests
    before anything is written. ``dry_run``: record nothing, add nothing, train nothing; the
    result holds the tests and the plan. ``push``: default ``hub.push_patches``.
    ``evaluator``: the release gates (default ``gates.release_evaluator(force, reason)``)."""
    from ..eval.suite import append_cases
    from ..store.sqlite import FeedbackStore
    from ..eval.gates import release_evaluator
    from . import run as release_mod
    from .plan import plan_release
    from .run import run_release

    ids = list(dict.fromkeys(request_ids))
    if correction is not None and len(ids) != 1:
        raise UserError("--correction goes with exactly one request id", hint="record the others with 'feedback add'")
    if not ids:
        ids = open_incidents(project)
        if not ids:  # nothing open: a no-op, as a second run is
            return PatchResult(request_ids=[], dry_run=dry_run)
    result = PatchResult(request_ids=ids, dry_run=dry_run)
    store = FeedbackStore(project.feedback_path)
    try:
        # 1. the correction
        if correction is not None:
            record = store.get(ids[0])
            if record is None:
                raise UnknownRequest(f"no logged answer with request id {ids[0]!r}")
            if dry_run:
                records = [{**record, "correction": correction, "rating": 1}]
            else:
                if record_correction(store, ids[0], correction):
                    result.corrections_recorded.append(ids[0])
                    progress(f"recorded the correction of {ids[0]}")
                records = [store.get(ids[0])]
                release_mod.crash_point("incident-correction")
        else:
            records = []
            missing = store.missing(ids)
            if missing:
                raise UnknownRequest(f"no logged answer with request id {missing[0]!r}")
            records = [store.get(i) for i in ids]
    finally:
        store.close()
    # 2. the tests
    for record in records:
        result.tests += incident_tests(record)
    if show is not None:
        show(result.tests)
    if not dry_run:
        added, _ = append_cases(project.root, suite, result.tests)
        result.tests_added = added
        if added:
            progress(f"{suite}: added {', '.join(added)}")
        release_mod.crash_point("incident-tests")
        _commit_suite(project.root, suite, ids)  # also after a crash between adding and committing
        release_mod.crash_point("incident-suite")
    # 3. plan, 4. release (and deploy)
    if dry_run:
        extra = [ds.Part("incident", "corrections", [_example(r) for r in records])] if correction else None
        try:
            result.plan = plan_release(project, bump="patch", from_version=from_version, notes=notes, extra_new=extra)
        except NothingToTrain:
            result.plan = None
        return result
    if evaluator is None:
        evaluator = release_evaluator(force=force, reason=reason)
    try:  # run_release first finishes a release an earlier run left half-recorded
        result.release = run_release(project, bump="patch", from_version=from_version,
                                     notes=notes or _notes(ids, result), progress=progress,
                                     train_progress=train_progress, deploy=deploy, evaluator=evaluator)
    except NothingToTrain:
        result.release = None
    if result.release is not None:
        result.plan = result.release.plan
        if result.release.entry["status"] != "released":
            return result
    result.fixed_in = _fixed_in(project, ids)
    release_mod.crash_point("incident-released")
    # 5. push
    if result.fixed_in is not None and (push if push is not None else bool((project.hub or {}).get("push_patches"))):
        result.pushed = _push_once(project, result.fixed_in, progress)
    return result


def _notes(ids: list[str], result: PatchResult) -> str:
    tests = sorted({t["id"] for t in result.tests})
    return f"Safety fix for incident{'s' if len(ids) > 1 else ''} {', '.join(ids)}; tests: {', '.join(tests)}"


def _commit_suite(root, suite: str, ids: list[str]) -> None:
    """Commit the grown suite (a release refuses a dirty repository); a no-op when it is."""
    from ..gitops import ReleaseRepo
    from ..registry import release_lock

    repo = ReleaseRepo(root)
    with release_lock(root):
        repo.check_state()
        repo.commit([suite], f"Regression tests for incident {', '.join(ids)}")


def _example(record: dict[str, Any]) -> dict[str, Any]:
    """The chat example a corrected record becomes (for a dry run's plan: nothing recorded yet)."""
    prompt = record["input"]
    turns = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else [dict(m) for m in prompt]
    return {"messages": [*turns, {"role": "assistant", "content": record["correction"]}]}


def _fixed_in(project, ids: list[str]) -> str | None:
    """The released version, in the serving lineage, that trained on these incidents."""
    from ..store.sqlite import FeedbackStore
    from ..registry import Registry
    from .plan import serving_version

    data = Registry(project.root).load()
    serving = serving_version(data)
    if serving is None:
        return None
    lineage = [e["version"] for e in Registry.lineage(data, serving)]
    with FeedbackStore(project.feedback_path) as store:
        marks = store.marks(ids)
    trained = [v for v in lineage if v in marks]
    return trained[-1] if trained else None


def _push_once(project, version: str, progress: Progress) -> dict[str, Any] | None:
    """Push ``version``'s adapter unless the registry records a push of it already."""
    from ..hub.push import publish

    pushed = publish(project, version, once=True, progress=progress)
    return pushed.to_registry() if pushed is not None else None
