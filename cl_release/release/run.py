"""The release pipeline: plan a version, build its data, train, record, commit, tag.

Order (each step leaves a valid registry; a crash anywhere can be re-run):

1. take the release lock (a second release at the same time gets one clear error), then
   check that git can commit and tag (identity, no merge in progress, no held lock file: a
   refusal comes here, before any training);
2. finish any release an earlier crash left half-recorded (registry written, not committed
   or not tagged);
3. plan: version, parent, strategy, data parts (content-addressed), rendered config;
4. write data snapshots (idempotent, content-addressed);
5. train into ``outputs/vX.Y.Z/`` (created exclusively; a folder an interrupted release left,
   of this plan or an earlier one, is moved aside to ``outputs/.interrupted/``, never
   overwritten or deleted, and its version number is used again);
6. re-hash every dataset: if one changed since the plan, refuse (nothing recorded);
7. evaluate + gates (when configured), mark the feedback rows used, then append the
   registry entry atomically;
8. commit registry + snapshots, tag ``vX.Y.Z``.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from ..data import formats as ds
from ..errors import GitError, IntegrityError, NothingToTrain, UserError
from ..files import atomic_write_bytes, atomic_write_json, atomic_write_text, sha256_bytes, sha256_file
from ..project import Project, is_local_model
from ..registry import REGISTRY_FILE, Registry, release_lock
from ..timeutil import registry_now as utcnow
from .plan import (
    DONE_FILE,
    HELDOUT,
    OUTPUTS,
    RUN_FILE,
    Plan,
    Progress,
    heldout_record,
    no_progress,
    plan_release,
    run_state,
)
from .recovery import reconcile, tag_message
from .weights import ADAPTER_FILE, adapter_sha256, weights_sha256

# Release notes go into the registry, the commit and the tag: a changelog of a few hundred KiB
# is normal, more is a mistake (a log file, a binary).
MAX_NOTES_BYTES = 1024 * 1024


# ---------------------------------------------------------------- notes


def check_notes(notes: str, *, where: str = "--notes") -> str:
    """The release notes, checked before anything is trained: UTF-8 text without NUL bytes
    (git refuses those in a message), at most ``MAX_NOTES_BYTES``."""
    try:
        size = len(notes.encode("utf-8"))
    except UnicodeEncodeError as e:
        raise UserError(f"{where}: not UTF-8 text (character {e.start + 1} cannot be encoded)",
                        hint="pass the notes as UTF-8 text") from None
    if size > MAX_NOTES_BYTES:
        raise UserError(f"{where}: the notes are {size:,} bytes; the limit is {MAX_NOTES_BYTES:,} (1 MiB)",
                        hint="shorten them; keep a long changelog in a file of the repository")
    if "\0" in notes:
        raise UserError(f"{where}: the notes contain a NUL character (at {notes.index(chr(0)) + 1})",
                        hint="git refuses NUL in messages; pass plain text")
    return notes


def read_notes_file(path: str | Path) -> str:
    """Release notes from a file (``-``: standard input), checked like ``check_notes``."""
    where = "standard input" if str(path) == "-" else str(path)
    try:
        if str(path) == "-":
            data = sys.stdin.buffer.read(MAX_NOTES_BYTES + 1) if hasattr(sys.stdin, "buffer") \
                else sys.stdin.read(MAX_NOTES_BYTES + 1).encode("utf-8")
        else:
            with open(path, "rb") as f:
                data = f.read(MAX_NOTES_BYTES + 1)
    except OSError as e:
        raise UserError(f"{where}: cannot read the notes: {e.strerror or e}") from None
    if len(data) > MAX_NOTES_BYTES:
        raise UserError(f"{where}: the notes are over the limit of {MAX_NOTES_BYTES:,} bytes (1 MiB)",
                        hint="shorten them; keep a long changelog in a file of the repository")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{where}: not UTF-8 text (byte {e.start + 1})", hint="save the notes as UTF-8") from None
    return check_notes(text.removeprefix("\ufeff"), where=where)


def _move_aside(root: Path, out: Path, why: str) -> Path:
    dest = root / OUTPUTS / f".{why}" / f"{out.name}-{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}"
    dest.parent.mkdir(parents=True, exist_ok=True)
    os.rename(out, dest)
    return dest




# ---------------------------------------------------------------- run

# Test hook: called with a step name; tests make it raise to simulate a crash at that point.
crash_point: Callable[[str], None] = lambda step: None


@dataclass
class ReleaseResult:
    entry: dict[str, Any]
    plan: Plan | None  # None when the command only finished an interrupted release
    adopted: bool = False
    recovered: list[str] = field(default_factory=list)
    commit: str | None = None
    # Wall seconds per phase (plan, merge, snapshots, train, evaluate, record, git): where a
    # release's time went, beyond the training it runs.
    timings: dict[str, float] = field(default_factory=dict)
    deployed: dict[str, Any] | None = None  # the set_champion event when the release became champion


class _Phases:
    """Wall-clock seconds per named phase, in the order they ran."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._t = time.perf_counter()

    def done(self, name: str) -> None:
        now = time.perf_counter()
        self.seconds[name] = round(self.seconds.get(name, 0.0) + now - self._t, 3)
        self._t = now




def run_release(project: Project, *, bump: str, from_version: str | None = None, strategy: str | None = None,
                base_model: str | None = None, notes: str = "", allow_dirty: bool = False,
                progress: Progress = no_progress,
                train_progress: Callable[[int, int, float | None], None] | None = None,
                evaluator: Callable[[Project, Plan, dict[str, Any]], dict[str, Any]] | None = None,
                deploy: bool | None = None, knob_override: str | None = None) -> ReleaseResult:
    """Plan, train, record, commit and tag one release. See the module docstring for the order.

    ``deploy``: whether a released version also becomes champion, in the same registry move
    as its entry (so in the same commit). Default: a PATCH does (a safety fix must reach what
    serves) unless ``abtest.test_patches`` sends patches through an A/B test; other bumps
    don't (``ab start`` / ``watch`` deploy them as challengers).

    A knob outside its sane range (``Plan.warnings``) refuses the release before training,
    unless ``knob_override`` gives the reason to train anyway (recorded in the entry)."""
    from ..gitops import ReleaseRepo
    from .merge import merge_version
    from .train import run_training, toolchain_versions

    root = project.root
    phases = _Phases()
    notes = check_notes(notes)
    repo = ReleaseRepo(root)  # before the lock: nothing is written in a folder that is not a repository
    with release_lock(root):
        repo.check_state(progress)
        recovered = reconcile(root, repo, progress)
        repo.ensure_clean(allow_dirty)
        source_commit = repo.head()

        try:
            plan = plan_release(project, bump=bump, from_version=from_version, strategy=strategy,
                                base_model=base_model, notes=notes, tags=repo.tags())
        except NothingToTrain:
            if recovered:
                # The command already did its job: it finished the interrupted release.
                entry = Registry(root).get(recovered[-1])
                return ReleaseResult(entry=entry, plan=None, recovered=recovered, commit=repo.head())
            raise
        phases.done("plan")
        if plan.warnings and not (knob_override and knob_override.strip()):
            raise UserError(f"{plan.version}: " + "; ".join(plan.warnings),
                            hint="fix the knob in cl-release.yaml, or pass --force --reason TEXT to train anyway")
        if plan.needs_parent_merge:
            progress(f"merging {plan.parent} into its base (merge_and_retrain starts from the merged model)")
            merge_version(project, plan.parent, progress=progress)
            phases.done("merge")
            plan = plan_release(project, bump=bump, from_version=from_version, strategy=strategy,
                                base_model=base_model, notes=notes, tags=repo.tags())
            phases.done("plan")
        crash_point("planned")

        for part in plan.snapshot_parts:
            rel, digest = ds.write_snapshot(root, part.records)
            assert rel == part.path and digest == part.sha256
        if plan.retired_path:  # content-addressed, like the snapshots: rewriting it is harmless
            atomic_write_bytes(root / plan.retired_path, plan.retired_bytes)
        crash_point("snapshots")
        phases.done("snapshots")

        out = root / plan.output_dir
        adopted = False
        state = run_state(out, plan) if out.exists() else None
        if state in ("interrupted", "unstarted", "earlier-plan"):
            moved = _move_aside(root, out, "interrupted")
            progress(f"moved the interrupted run of {plan.version} aside to {project.rel(moved)}")
        if state == "complete":
            adopted = True
            progress(f"{plan.output_dir} already holds this exact run: recording it without retraining")
            training = json.loads((out / DONE_FILE).read_text())
        else:
            out.mkdir(parents=True, exist_ok=False)
            crash_point("output-dir")
            atomic_write_json(out / RUN_FILE, {"fingerprint": plan.fingerprint(), "version": plan.version,
                                                "started_at": utcnow(), "pid": os.getpid()})
            atomic_write_text(root / plan.config_path, plan.config_text)
            atomic_write_json(out / "plan.json", plan.to_dict())
            mix = ", ".join(f"{p.role} {len(p.records)}" for p in plan.parts)
            mix += f"; held out as checks: {len(plan.heldout.records)}" if plan.heldout else ""
            progress(f"training {plan.version} ({plan.strategy}; examples: {mix}) ...")
            with _alongside(getattr(evaluator, "prepare", None), project, plan) as prepared:
                result = run_training(root, plan.config_path, plan.launch, mixed_precision=plan.hw["mixed_precision"],
                                      log_path=out / "train.log", progress=train_progress)
            phases.done("train")
            crash_point("trained")
            if not (out / "adapter" / ADAPTER_FILE).is_file():
                raise IntegrityError(f"{plan.adapter_dir}: training finished without {ADAPTER_FILE}",
                                     hint=f"see {plan.output_dir}/train.log")
            training = result.to_dict()
            atomic_write_json(out / DONE_FILE, training)
            prepared.result()  # an error of the preparation, raised once the run is safely complete

        # -- data must not have changed while training
        try:
            _verify_plan_inputs(root, plan)
        except IntegrityError:
            moved = _move_aside(root, out, "refused")
            progress(f"moved the run aside to {project.rel(moved)}")
            raise
        crash_point("verified")

        entry = _entry(project, plan, training, source_commit, toolchain_versions())
        entry["status"] = "released"
        if plan.warnings:
            entry["knob_override"] = {"reason": knob_override.strip(), "warnings": plan.warnings}
        phases.done("verify")
        if evaluator is not None:
            entry = evaluator(project, plan, entry)
            phases.done("evaluate")
        # Marked before the registry entry: a kill in between leaves rows kept by `feedback
        # prune` for a version the re-run records (same number), never a recorded version
        # whose rows may be pruned.
        _mark_feedback_used(project, plan)
        crash_point("before-registry")
        released = entry["status"] == "released"
        if deploy is None:
            from ..decide.abtest import ab_config

            deploy = plan.strategy == "patch" and not ab_config(project)["test_patches"]
        deployed: list[dict[str, Any]] = []
        transition = None
        if released and deploy:
            from ..decide.abtest import ServingTransition, deploy as deploy_in

            transition = ServingTransition(root)  # serve.upstream_admin: the adapters follow

            def then(data: dict[str, Any]) -> None:
                transition.begin(data)
                deployed.append(deploy_in(data, plan.version, reason=f"{plan.strategy} release"))
                transition.load(data)  # before the registry says it serves
        else:
            then = None
        Registry(root).append(entry, make_current=released, then=then)
        crash_point("registry")
        phases.done("record")

        paths = [REGISTRY_FILE] + [p.path for p in plan.snapshot_parts] + (
            [plan.retired_path] if plan.retired_path else [])
        title = f"Release {plan.version} ({plan.strategy}, parent {plan.parent or '-'})" if entry["status"] == "released" \
            else f"Reject {plan.version} ({plan.strategy}): gates failed"
        if deployed:
            title += "; champion"
        message = title + (f"\n\n{notes}" if notes else "")
        try:
            commit = repo.commit(paths, message)
            crash_point("committed")
            if entry["status"] == "released":
                repo.tag(f"v{plan.version}", tag_message(entry), commit)
        except GitError as e:
            # The registry already holds the entry: the next run's reconcile finishes the job.
            raise GitError(e.message, hint=(f"{e.hint}; then " if e.hint else "") + f"{plan.version} is recorded in "
                           "the registry: run the same release command again to finish it in git") from None
        crash_point("tagged")
        if transition is not None:
            transition.unload(Registry(root).load())  # what stopped serving, after the commit
        phases.done("git")
        return ReleaseResult(entry=entry, plan=plan, adopted=adopted, recovered=recovered, commit=commit,
                             timings=phases.seconds, deployed=deployed[0] if deployed else None)


class _Alongside:
    """Runs ``fn(*args)`` in a thread while the caller waits on something else (training).

    ``result()`` waits for it and re-raises its exception, if any. Used for the evaluator's
    ``prepare`` (heavy imports, loading the suite) while the training subprocess runs, so the
    gate evaluation after training starts warm."""

    def __init__(self, fn, *args) -> None:
        self._error: BaseException | None = None
        self._thread = None
        if fn is not None:
            import threading

            def target() -> None:
                _lower_thread_priority()
                try:
                    fn(*args)
                except BaseException as exc:  # noqa: BLE001 - handed to the caller in result()
                    self._error = exc

            self._thread = threading.Thread(target=target, name="cl-release-prepare", daemon=True)
            self._thread.start()

    def __enter__(self) -> "_Alongside":
        return self

    def __exit__(self, *exc) -> None:
        # No thread outlives the block, also when training failed.
        if self._thread is not None:
            self._thread.join()

    def result(self) -> None:
        if self._error is not None:
            raise self._error


def _lower_thread_priority() -> None:
    """Lowest CPU priority for the calling thread (Linux: nice applies per thread), so work
    done alongside training only takes CPU the training does not use. Elsewhere: no-op."""
    if sys.platform != "linux":
        return
    import threading

    try:
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, 19)
    except (AttributeError, OSError):
        pass


def _alongside(fn, *args) -> _Alongside:
    return _Alongside(fn, *args)


def _mark_feedback_used(project: Project, plan: Plan) -> None:
    """Mark the feedback rows this release trains on, as exactly its rows (a re-run after a
    crash re-plans and replaces them): later releases of its lineage do not take them again
    (``extract_unused``) until newer feedback arrives, and ``feedback prune`` keeps them."""
    if not project.feedback_path.is_file():
        return
    ids, read_at = plan.feedback_rows, plan.feedback_read_at
    from ..store.sqlite import FeedbackStore

    store = FeedbackStore(project.feedback_path)
    try:
        store.mark_used(ids, plan.version, "corrections" if plan.strategy == "patch" else "new", replace=True,
                        read_at=read_at)
    finally:
        store.close()


def _verify_plan_inputs(root: Path, plan: Plan) -> None:
    for src in plan.sources:
        if "sha256" not in src:  # the live feedback store: its rows were read once, at plan time
            continue
        path = root / src["path"]
        now = sha256_file(path) if path.is_file() else None
        if now != src["sha256"]:
            raise IntegrityError(f"{src['path']} changed while {plan.version} was training",
                                 hint="nothing was recorded; run the release again to train on the current data")
    for part in plan.snapshot_parts:
        if sha256_file(root / part.path) != part.sha256:
            raise IntegrityError(f"{part.path} no longer matches its hash", hint="nothing was recorded; run again")


TOKEN_UNITS = {  # the two token counts of an entry's "training" count different things
    "tokens_in_mix": "every token of the training mix, prompts and answers, counted once (tokenizer of the base)",
    "tokens_trained": "tokens with a training label (the answers), summed over all epochs, as Axolotl reports them",
}


def recorded_knobs(plan: Plan) -> dict[str, Any]:
    """The knobs as the run used them: a knob that is also an Axolotl key takes the rendered
    config's value (the template adapts some to the hardware, e.g. gradient checkpointing
    only on CUDA); the asked-for values that the config changed go to ``knobs_requested``."""
    knobs = {k: v for k, v in plan.knobs.items() if k != "extra"}
    changed = {k: v for k, v in knobs.items() if k in plan.config and plan.config[k] != v}
    out: dict[str, Any] = {"knobs": {**knobs, **{k: plan.config[k] for k in changed}}}
    if changed:
        out["knobs_requested"] = changed
    return out


def _entry(project: Project, plan: Plan, training: dict[str, Any], source_commit: str | None,
           toolchain: dict[str, Any]) -> dict[str, Any]:
    root = project.root
    train_base = dict(plan.train_base)
    if train_base.get("sha256") is None and is_local_model(root, train_base["path"]):
        train_base["sha256"] = weights_sha256(root / train_base["path"])
    entry = {
        "version": plan.version,
        "parent": plan.parent,
        "bump": plan.bump,
        "strategy": plan.strategy,
        "status": "candidate",
        "created_at": utcnow(),
        "base_model": plan.base_model,
        "train_base": train_base,
        "adapter": {"path": plan.adapter_dir, "sha256": adapter_sha256(root / plan.adapter_dir)},
        "datasets": [
            {"name": p.name, "role": p.role, "path": p.path, "sha256": p.sha256, "examples": len(p.records)}
            for p in plan.parts
        ],
        "sources": plan.sources,
        "config": {"path": plan.config_path, "sha256": sha256_file(root / plan.config_path)},
        "seed": plan.seed,
        "launch": {"num_processes": plan.launch["num_processes"], "num_machines": plan.launch["num_machines"],
                   "deepspeed": plan.launch.get("deepspeed"), "mixed_precision": plan.hw["mixed_precision"]},
        "training": {**training, "tokens_in_mix": plan.tokens, "token_units": TOKEN_UNITS, **recorded_knobs(plan)},
        "evaluation": {},
        "toolchain": toolchain,
        "source_commit": source_commit,
        "notes": plan.notes,
        **({"unconfined": plan.unconfined} if plan.unconfined else {}),
    }
    if plan.heldout is not None:
        entry[HELDOUT] = heldout_record(plan.heldout)
    if plan.retired_path:
        entry["retired"] = {"path": plan.retired_path, "sha256": sha256_bytes(plan.retired_bytes),
                            "count": len(plan.retired), "new": plan.retired_new}
    return entry
