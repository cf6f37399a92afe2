"""Planning a release: version, parent, strategy, base model and adapter, the data mix, the
rendered Axolotl config. :func:`plan_release` computes all of it without writing anything;
``cl-release plan`` shows it and :func:`cl_release.release.run.run_release` carries it out.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from ..data import formats as ds
from ..errors import IntegrityError, NothingToTrain, UserError
from ..files import sha256_bytes, sha256_file
from ..project import Project, check_base_model, is_local_model
from ..registry import Registry, bump_version
from .render import (
    CONTINUES_ADAPTER,
    DEFAULT_STRATEGY,
    STRATEGY_BUMP,
    check_strategy,
    hardware,
    knob_warnings,
    render_config,
    strategy_bump,
    strategy_knobs,
)
from .weights import ADAPTER_FILE, weights_sha256

OUTPUTS = "outputs"
PREPARED = "outputs/.prepared"
LEARNED_ROLES = {"new", "complete", "corrections"}
# Examples kept out of training: the release's held-out checks (gates.min_new_data_pass_rate).
HELDOUT = "heldout"
HOLDOUT_STRATEGIES = {"initial", "continued_lora"}  # the strategies whose new data is sampled for checks
RETIRED_PREFIX = "retired-"  # datasets/snapshots/retired-<sha256>.json: the retirements in effect
# An output folder's records: the run it holds (fingerprint of its plan), and its finished training.
RUN_FILE = "run.json"
DONE_FILE = "training.json"

Progress = Callable[[str], None]


def no_progress(_msg: str) -> None:
    """The default ``progress``: say nothing."""


@dataclass
class Plan:
    version: str
    parent: str | None
    bump: str
    strategy: str
    base_model: dict[str, Any]
    train_base: dict[str, Any]
    lora_model_dir: str | None
    parts: list[ds.Part]
    sources: list[dict[str, str]]
    knobs: dict[str, Any]
    launch: dict[str, Any]
    hw: dict[str, Any]
    seed: int
    notes: str
    config_text: str = ""
    config: dict[str, Any] = field(default_factory=dict)
    tokens: int | None = None
    needs_parent_merge: bool = False
    warnings: list[str] = field(default_factory=list)  # knobs outside their sane range (render.knob_warnings)
    # cl_release.data.mix: every retirement in effect (hash -> why), how many this release adds, the
    # conflicts it decided and those it could not, and its warnings about the data
    retired: dict[str, dict[str, Any]] = field(default_factory=dict)
    retired_new: int = 0
    resolved: list[dict[str, Any]] = field(default_factory=list)
    conflicts: list[dict[str, Any]] = field(default_factory=list)
    data_warnings: list[str] = field(default_factory=list)
    feedback_rows: list = field(default_factory=list)  # the store rows this release read (marked used)
    feedback_read_at: str | None = None
    # Axolotl keys the project let run code or read outside the repository (allow_unconfined),
    # with their values: recorded in the registry entry.
    unconfined: dict[str, Any] = field(default_factory=dict)
    # New examples kept out of training: the held-out checks of gates.min_new_data_pass_rate.
    heldout: ds.Part | None = None

    @property
    def retired_bytes(self) -> bytes:
        return (json.dumps(self.retired, sort_keys=True, ensure_ascii=False, indent=1) + "\n").encode("utf-8")

    @property
    def retired_path(self) -> str | None:
        """``datasets/snapshots/retired-<sha256>.json`` (content-addressed, committed); None: none."""
        return f"{ds.SNAPSHOT_DIR}/{RETIRED_PREFIX}{sha256_bytes(self.retired_bytes)}.json" if self.retired else None

    @property
    def snapshot_parts(self) -> list[ds.Part]:
        """Every part written to a snapshot: the training parts and the held-out checks."""
        return self.parts + ([self.heldout] if self.heldout is not None else [])

    @property
    def output_dir(self) -> str:
        return f"{OUTPUTS}/v{self.version}"

    @property
    def adapter_dir(self) -> str:
        return f"{self.output_dir}/adapter"

    @property
    def config_path(self) -> str:
        return f"{self.output_dir}/axolotl.yml"

    @property
    def config_sha256(self) -> str:
        return sha256_bytes(self.config_text.encode("utf-8"))

    @property
    def new_examples(self) -> int:
        """New examples of this release: trained on, or held out as its checks."""
        held = len(self.heldout.records) if self.heldout is not None else 0
        return sum(len(p.records) for p in self.parts if p.role in ("new", "corrections")) + held

    def fingerprint(self) -> str:
        """Identifies the exact training run: same fingerprint, same inputs."""
        return sha256_bytes(json.dumps(
            {"version": self.version, "parent": self.parent, "strategy": self.strategy,
             "config": self.config_sha256}, sort_keys=True).encode())

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "parent": self.parent,
            "bump": self.bump,
            "strategy": self.strategy,
            "base_model": self.base_model,
            "train_base": self.train_base,
            "lora_model_dir": self.lora_model_dir,
            "needs_parent_merge": self.needs_parent_merge,
            "datasets": [
                {"name": p.name, "role": p.role, "examples": len(p.records), "path": p.path, "sha256": p.sha256}
                for p in self.parts
            ],
            "heldout": heldout_record(self.heldout),
            "retired": {"count": len(self.retired), "new": self.retired_new, "path": self.retired_path,
                        "examples": [w for w in self.retired.values() if w.get("at") == self.version]},
            "resolved": self.resolved,
            "conflicts": self.conflicts,
            "data_warnings": self.data_warnings,
            "sources": self.sources,
            "new_examples": self.new_examples,
            "tokens": self.tokens,
            "knobs": {k: v for k, v in self.knobs.items() if k != "extra"},
            "warnings": self.warnings,
            "launch": self.launch,
            "output_dir": self.output_dir,
            "config_sha256": self.config_sha256,
            "config": self.config_text,
            **({"unconfined": self.unconfined} if self.unconfined else {}),
        }


def _source_records(project: Project, role: str,
                    supersedes: list | None = None) -> tuple[list[dict], list[dict[str, str]]]:
    """The records of the project's datasets of ``role``, and their sources. ``supersedes``:
    collects (record, question keys, file) of rows with a ``supersedes`` field (corrections)."""
    from ..data.mix import check_supersedes

    records: list[dict] = []
    sources: list[dict[str, str]] = []
    max_chars = ds.max_example_chars(project.data)
    for entry in project.datasets:
        if entry["role"] != role:
            continue
        files = project.dataset_files(entry)
        for f in files:
            rel = project.rel(f)
            rows = ds.read_records(f, entry["format"], display=rel, max_chars=max_chars)
            records.extend(rows)
            sources.append({"name": entry["name"], "path": rel, "sha256": sha256_file(f)})
            if supersedes is not None:  # read_records makes one record per row, in order
                for (line, obj), record in zip(ds.iter_jsonl(f, display=rel), rows):
                    keys = check_supersedes(obj.get("supersedes"), path=rel, line=line)
                    if keys:
                        supersedes.append((record, keys, rel))
    return records, sources


def _learned(root: Path, lineage: list[dict[str, Any]], roles=LEARNED_ROLES) -> list[dict]:
    """Every example the lineage trained on as new, complete or corrections data (deduped);
    with ``roles``, the examples of those roles (``{HELDOUT}``: the lineage's held-out checks)."""
    records: list[dict] = []
    for entry in lineage:
        parts = list(entry["datasets"])
        if entry.get(HELDOUT):
            parts.append({**entry[HELDOUT], "role": HELDOUT})
        for d in parts:
            if d["role"] in roles:
                path = root / d["path"]
                if not path.is_file():
                    raise IntegrityError(f"{d['path']}: data snapshot of {entry['version']} is missing",
                                         hint="restore it from git ('git checkout -- datasets/snapshots')")
                records.extend(ds.snapshot_records(root, d["path"]))
    return ds.dedupe(records)


@dataclass
class _Feedback:
    """What a release takes from the feedback store: the kept and the corrected examples, the
    rows behind them, the source record, and the corrections' ``supersedes``."""

    kept: list[dict]
    corrected: list[dict]
    kept_ids: list
    corrected_ids: list
    source: dict[str, Any]
    supersedes: list = field(default_factory=list)  # (record, question keys, source)


def _read_feedback(project: Project, strategy: str, lineage: list[dict[str, Any]]) -> _Feedback | None:
    """The feedback rows the lineage (the parent and its ancestors) has not trained on, by the
    store's release marks (PATCH: the corrections among them)."""
    from ..data.build import release_feedback
    from ..store.sqlite import FeedbackStore
    from ..timeutil import store_now as utc_now
    from ..data.mix import prompt_key_of

    until = utc_now()  # the store's microseconds: an answer logged a moment ago counts
    used_by = [e["version"] for e in lineage]
    result = release_feedback(project, used_by, bump=strategy_bump(strategy), until=until)
    if result is None:
        return None
    corrected_ids = list(result.manifest["corrections"]["record_ids"])
    kept_ids = sorted(set(result.manifest["record_ids"]) - set(corrected_ids), key=str)
    corrected = result.corrections
    done = {ds.record_hash(r) for r in corrected}
    kept = [r for r in result.examples if ds.record_hash(r) not in done]
    with FeedbackStore(project.feedback_path) as store:  # rows an abandoned branch (or a rejected release) had
        elsewhere = store.marks(result.manifest["record_ids"])
        named = store.supersedes(corrected_ids)
    source = {"name": "feedback", "path": project.rel(project.feedback_path), "unused_by": used_by,
              "until": until, "records": len(result.manifest["record_ids"]), "extracted_sha256": result.sha256,
              "skipped": result.manifest["skipped"], "window": result.manifest["window"],
              "trained_elsewhere": elsewhere}
    supersedes = [(None, [prompt_key_of(q) for q in questions], f"feedback:{rid}") for rid, questions in named.items()]
    return _Feedback(kept, corrected, kept_ids, corrected_ids, source, supersedes)


def _feedback_parts(fb: _Feedback | None, strategy: str, keep: Callable[[list[dict]], list[dict]],
                    exclude: set[str]) -> list[ds.Part]:
    """The feedback's training parts: its corrections (role corrections, so later releases know
    them as corrections) and, but for a PATCH, the kept examples (role new)."""
    if fb is None:
        return []
    corrected = ds.dedupe(keep(fb.corrected), exclude=exclude)
    parts = [ds.Part("feedback-corrections", "corrections", corrected, record_ids=list(fb.corrected_ids))]
    if strategy != "patch":
        kept = ds.dedupe(keep(fb.kept), exclude=exclude | {ds.record_hash(r) for r in corrected})
        parts.append(ds.Part("feedback", "new", kept, record_ids=list(fb.kept_ids)))
    return [p for p in parts if p.records]



def _retired_before(root: Path, lineage: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The retirements in effect for the lineage: the parent's record (each release writes all of
    them, its own and its ancestors')."""
    for entry in reversed(lineage):
        rec = entry.get("retired")
        if rec:
            path = root / rec["path"]
            if not path.is_file():
                raise IntegrityError(f"{rec['path']}: the retirements of {entry['version']} are missing",
                                     hint="restore it from git ('git checkout -- datasets/snapshots')")
            return json.loads(path.read_text(encoding="utf-8"))
    return {}


def _resolve(project: Project, lineage: list[dict[str, Any]], rule: str, *, domain: list[dict],
             corrections: list[dict], general: list[dict], feedback: "_Feedback | None", supersedes: list):
    """Which examples this release may still train on (``cl_release.data.mix``): every example of the
    lineage, this release's data, the general set, ordered by arrival."""
    from ..data.mix import Example, resolve, stale_values

    root = project.root
    n = len(lineage)
    examples: list[Example] = []
    learned_at: dict[str, int] = {}
    for i, entry in enumerate(lineage):
        for d in entry["datasets"]:
            if d["role"] in LEARNED_ROLES:
                for r in ds.snapshot_records(root, d["path"]):
                    e = Example(r, i, d["role"] == "corrections", f"{entry['version']} {d['role']}")
                    learned_at.setdefault(e.hash, i)
                    examples.append(e)
    for r in domain:
        e = Example(r, n, False, "domain data")
        e.time = learned_at.get(e.hash, n)  # already trained: as old as the release that trained it
        examples.append(e)
    examples += [Example(r, n, True, "corrections data") for r in corrections]
    if feedback is not None:
        examples += [Example(r, n, False, "feedback") for r in feedback.kept]
        examples += [Example(r, n, True, "feedback correction") for r in feedback.corrected]
    examples += [Example(r, -1, False, "general data") for r in general]
    res = resolve(examples, rule=rule, version=None, supersedes=supersedes,
                  retired_before=_retired_before(root, lineage))
    res.warnings = stale_values(examples, res)
    return res


def _adapter_rank(root: Path, adapter_dir: str) -> tuple[int | None, float | None]:
    cfg = root / adapter_dir / "adapter_config.json"
    try:
        data = json.loads(cfg.read_text())
        return data.get("r"), data.get("lora_alpha")
    except (OSError, json.JSONDecodeError):
        return None, None


def _taken_versions(root: Path, data: dict[str, Any], tags: set[str]) -> set[str]:
    taken = {m["version"] for m in data["models"]}
    taken |= {t[1:] for t in tags if t.startswith("v")}
    return taken


def _choose_strategy(data, parent, bump: str, strategy: str | None, base_model: str | None) -> str:
    if parent is None:
        if strategy not in (None, "initial"):
            raise UserError(f"the first release uses strategy initial, not {strategy}",
                            hint="drop --strategy for the first release")
        return "initial"
    if strategy is None:
        strategy = "annual_reset" if (bump == "major" and base_model) else DEFAULT_STRATEGY[bump]
    check_strategy(strategy)
    if strategy == "initial":
        raise UserError("strategy initial is only for the first release",
                        hint="use annual_reset (--base-model) or merge_and_retrain for a fresh start")
    if STRATEGY_BUMP[strategy] != bump:
        raise UserError(f"strategy {strategy} makes a {STRATEGY_BUMP[strategy]} release, not {bump}",
                        hint=f"run 'cl-release release {STRATEGY_BUMP[strategy]} --strategy {strategy}'")
    if strategy == "annual_reset" and not base_model:
        raise UserError("annual_reset needs a new base model", hint="pass --base-model ID")
    if base_model and strategy != "annual_reset":
        raise UserError("--base-model is only for annual_reset (a major release)",
                        hint="run 'cl-release release major --base-model ID'")
    return strategy


def _base_revision(project: Project, name: str, revision: str | None) -> str | None:
    if revision:
        return revision
    if is_local_model(project.root, name):
        return weights_sha256(project.root / name)
    return None


def serving_version(data: dict[str, Any]) -> str | None:
    """The version that serves: the champion alias, else the current version."""
    return (data.get("aliases") or {}).get("champion") or data["current"]


def plan_strategy(project: Project, strategy: str, *, from_version: str | None = None,
                  base_model: str | None = None) -> Plan:
    """The plan of a release with ``strategy`` (``cl-release render STRATEGY``), at the bump the
    strategy makes (:func:`~cl_release.release.render.strategy_bump`)."""
    return plan_release(project, bump=strategy_bump(strategy), from_version=from_version, strategy=strategy,
                        base_model=base_model)


def plan_release(project: Project, *, bump: str, from_version: str | None = None, strategy: str | None = None,
                 base_model: str | None = None, notes: str = "", tags: set[str] = frozenset(),
                 extra_new: list[ds.Part] | None = None) -> Plan:
    """Everything a release would do, computed without writing anything."""
    root = project.root
    registry = Registry(root)
    data = registry.load()
    if bump == "patch" and from_version is None and data["models"]:
        from_version = serving_version(data)  # a safety fix goes to what serves
    parent = registry.resolve_parent(data, from_version)
    strategy = _choose_strategy(data, parent, bump, strategy, base_model)
    knobs = strategy_knobs(project.data, strategy)
    lineage = registry.lineage(data, parent["version"]) if parent else []
    taken = _taken_versions(root, data, set(tags))

    # -- base model and adapter
    lora_model_dir = None
    needs_merge = False
    if strategy == "initial":
        bm = project.base_model
        base = {"name": bm["name"], "revision": _base_revision(project, bm["name"], bm.get("revision"))}
        train_base = {"path": bm["name"], "sha256": base["revision"] if is_local_model(root, bm["name"]) else None,
                      "merged_from": None}
    elif strategy in CONTINUES_ADAPTER:
        base = dict(parent["base_model"])
        train_base = dict(parent.get("train_base") or {"path": base["name"], "sha256": None, "merged_from": None})
        lora_model_dir = parent["adapter"]["path"]
        if not (root / lora_model_dir / ADAPTER_FILE).is_file():
            raise IntegrityError(f"{lora_model_dir}: the adapter of {parent['version']} is missing",
                                 hint="restore outputs/ from your artifact store, or build on another version with --from")
        r, alpha = _adapter_rank(root, lora_model_dir)
        if r:
            knobs["lora_r"] = r
        if alpha:
            knobs["lora_alpha"] = alpha
    elif strategy == "merge_and_retrain":
        base = dict(parent["base_model"])
        merged = f"{OUTPUTS}/v{parent['version']}/merged"
        needs_merge = not (root / merged / "config.json").is_file()
        train_base = {"path": merged, "sha256": None if needs_merge else weights_sha256(root / merged),
                      "merged_from": parent["version"]}
    else:  # annual_reset
        check_base_model(base_model)
        base = {"name": base_model, "revision": _base_revision(project, base_model, None)}
        train_base = {"path": base_model, "sha256": base["revision"] if is_local_model(root, base_model) else None,
                      "merged_from": None}

    # -- data
    seed = project.seed
    supersedes: list = []
    domain, sources = _source_records(project, "domain")
    general, g_sources = _source_records(project, "general")
    corrections, c_sources = _source_records(project, "corrections", supersedes)
    learned = _learned(root, lineage)
    learned_hashes = {ds.record_hash(r) for r in learned}
    # An example held out as a check by an ancestor stays out of the lineage's training sets.
    heldout_hashes = {ds.record_hash(r) for r in _learned(root, lineage, {HELDOUT})}
    fb = _read_feedback(project, strategy, lineage)
    # A correction, or a newer answer to the same question, retires the older answers in every
    # mix of this release: new data, replay, complete data, general (cl_release.data.mix).
    resolution = _resolve(project, lineage, knobs["conflicts"], domain=domain, corrections=corrections, general=general,
                          feedback=fb, supersedes=supersedes + (fb.supersedes if fb else []))
    keep = resolution.keep
    parts: list[ds.Part] = []
    if strategy == "initial":
        new = ds.dedupe(keep(domain))
        if not new:
            raise UserError("no domain data to train on", hint="add examples to the datasets listed in cl-release.yaml")
        parts.append(ds.Part("new", "new", new))
        all_sources = sources
    elif strategy == "patch":
        # Corrections the lineage has not trained on as corrections: one the model got wrong
        # after an earlier release trained on the same text is eligible (that is the point).
        patched = {ds.record_hash(r) for r in _learned(root, lineage, {"corrections"})}
        new = ds.dedupe(keep(corrections), exclude=patched | heldout_hashes)
        parts.append(ds.Part("corrections", "corrections", new))
        all_sources = c_sources
    elif strategy == "continued_lora":
        new = ds.dedupe(keep(domain), exclude=learned_hashes | heldout_hashes)
        parts.append(ds.Part("new", "new", new))
        all_sources = sources
    else:
        new = ds.dedupe(keep(learned + domain) + keep(corrections), exclude=heldout_hashes)
        parts.append(ds.Part("complete", "complete", new))
        all_sources = sources + c_sources
    parts = [p for p in parts if p.records]
    parts += _feedback_parts(fb, strategy, keep, exclude={ds.record_hash(r) for r in new} | heldout_hashes
                             | (set() if strategy == "patch" else learned_hashes))
    if fb is not None:
        all_sources = all_sources + [fb.source]
    for extra in extra_new or []:
        parts.append(extra)
        all_sources = all_sources + extra.sources
    n_new = sum(len(p.records) for p in parts)
    if n_new == 0:
        what = "corrections" if strategy == "patch" else "new examples"
        since = f" that {parent['version']} or its ancestors have not trained on" if parent else ""
        raise NothingToTrain(f"no {what}{since}: nothing to train on",
                             hint="add data files (or log feedback) first; 'cl-release plan' shows the counts")
    heldout = None
    if strategy in HOLDOUT_STRATEGIES:
        parts, heldout = _hold_out(parts, knobs, f"{seed}:holdout:{parent['version'] if parent else 'root'}")
        n_new = sum(len(p.records) for p in parts)
    if strategy in CONTINUES_ADAPTER and knobs["replay_ratio"] > 0:
        n = ds.ratio_count(n_new, knobs["replay_ratio"], knobs["general_ratio"])
        replay = ds.sample(keep(learned), n, f"{seed}:replay:{parent['version']}")
        if replay:
            parts.append(ds.Part("replay", "replay", replay))
    if knobs["general_ratio"] > 0 and general:
        n = ds.ratio_count(n_new, knobs["general_ratio"],
                           knobs["replay_ratio"] if strategy in CONTINUES_ADAPTER else 0.0)
        sample = ds.sample(keep(general), n, f"{seed}:general:{parent['version'] if parent else 'root'}")
        parts.append(ds.Part("general", "general", sample))
        all_sources = all_sources + g_sources

    # split parts by kind (chat vs text) so each Axolotl dataset entry has one type
    final_parts: list[ds.Part] = []
    for p in parts:
        kinds = ds.split_by_kind(p.records)
        for kind, records in sorted(kinds.items()):
            name = p.name if len(kinds) == 1 else f"{p.name}-{kind}"
            part = ds.Part(name, p.role, records, sources=p.sources, record_ids=p.record_ids)
            blob = ds.dump_jsonl(records)
            part.sha256 = sha256_bytes(blob)
            part.path = f"{ds.SNAPSHOT_DIR}/{part.sha256}.jsonl"
            final_parts.append(part)
    if heldout is not None:  # chat records only
        heldout.sha256 = sha256_bytes(ds.dump_jsonl(heldout.records))
        heldout.path = f"{ds.SNAPSHOT_DIR}/{heldout.sha256}.jsonl"

    plan = Plan(
        version="", parent=parent["version"] if parent else None, bump=bump, strategy=strategy,
        base_model=base, train_base=train_base, lora_model_dir=lora_model_dir, parts=final_parts,
        sources=all_sources, knobs=knobs, launch=project.launch, hw=hardware(project.launch), seed=seed,
        notes=notes, needs_parent_merge=needs_merge, warnings=knob_warnings(strategy, knobs), heldout=heldout,
        retired=dict(resolution.retired), retired_new=len(resolution.new), resolved=resolution.resolved,
        conflicts=resolution.unresolved,
        data_warnings=[f"two answers to one question, kept both: {c['question']!r}: {' / '.join(c['answers'])}"
                       for c in resolution.unresolved] + resolution.warnings,
        feedback_rows=(fb.kept_ids + fb.corrected_ids) if fb else [],
        feedback_read_at=fb.source["until"] if fb else None,
    )
    # -- version: next free number; an existing output folder of a different run is taken too
    while True:
        plan.version = bump_version(plan.parent, bump, taken)
        _render(project, plan)
        out = root / plan.output_dir
        if not out.exists() or run_state(out, plan) != "foreign":
            break
        taken.add(plan.version)
    plan.retired = {h: (w if w.get("at") is not None else {**w, "at": plan.version}) for h, w in plan.retired.items()}
    plan.tokens = count_tokens(root, plan)
    return plan


def _hold_out(parts: list[ds.Part], knobs: dict[str, Any], seed: str) -> tuple[list[ds.Part], ds.Part | None]:
    """Move a seeded sample of the new chat examples of the datasets (``holdout_ratio`` of them,
    at most ``holdout_max``) out of the training parts: the release's held-out checks. Nothing
    is held out when it would leave no new example to train on. Feedback is never held out:
    each feedback row is trained once per lineage, and a held-out example never is."""
    held_from = [p for p in parts if p.role == "new" and p.name == "new"]
    pool = [r for p in held_from for r in p.records if "messages" in r]
    k = min(int(knobs.get("holdout_max", 0)), round(len(pool) * float(knobs.get("holdout_ratio", 0.0))))
    trained = sum(len(p.records) for p in parts if p.role == "new")
    if k < 1 or trained - k < 1:
        return parts, None
    held = ds.sample(pool, k, seed)
    held_hashes = {ds.record_hash(r) for r in held}
    out = []
    for p in parts:
        if any(p is h for h in held_from):
            p = ds.Part(p.name, p.role, [r for r in p.records if ds.record_hash(r) not in held_hashes],
                        sources=p.sources, record_ids=p.record_ids)
            if not p.records:
                continue
        out.append(p)
    return out, ds.Part(HELDOUT, HELDOUT, held)


def heldout_record(part: ds.Part | None) -> dict[str, Any] | None:
    """The registry entry's ``heldout`` field: the snapshot of the held-out checks."""
    if part is None:
        return None
    return {"path": part.path, "sha256": part.sha256, "examples": len(part.records)}


def _render(project: Project, plan: Plan) -> None:
    context = {
        "release": {"version": plan.version, "parent": plan.parent, "strategy": plan.strategy, "notes": plan.notes},
        "base_model": {
            "path": plan.train_base["path"],
            "revision": plan.base_model.get("revision") if plan.strategy != "merge_and_retrain"
            and not is_local_model(project.root, plan.train_base["path"]) else None,
            "model_type": project.base_model.get("model_type"),
            "tokenizer_type": project.base_model.get("tokenizer_type"),
        },
        "chat_template": project.chat_template,
        "lora": {"target_linear": (project.data.get("lora") or {}).get("target_linear", True),
                 "target_modules": (project.data.get("lora") or {}).get("target_modules")},
        "lora_model_dir": plan.lora_model_dir,
        "datasets": [{"path": p.path, "type": "completion" if p.kind == "text" else "chat_template"}
                     for p in plan.parts],
        "knobs": plan.knobs,
        "seed": plan.seed,
        "paths": {"output_dir": plan.adapter_dir, "prepared": PREPARED},
        "hw": plan.hw,
        "launch": plan.launch,
        "extra": {**(project.data.get("axolotl") or {}), **plan.knobs.get("extra", {})},
    }
    rendered = render_config(project.root, plan.strategy, context)
    plan.config_text, plan.config = rendered.text, rendered.config
    plan.unconfined = project.unconfined(context["extra"])


def count_tokens(root: Path, plan: Plan) -> int | None:
    """Tokens in the training mix, with the base model's tokenizer when it is available offline:
    chat examples as ChatML text (``data build --format chatml``), text examples as they are."""
    from ..data.examples import format_example

    base = plan.train_base["path"]
    tok_dir = root / base
    if plan.needs_parent_merge:  # the merged folder copies the adapter's tokenizer
        tok_dir = root / plan.lora_model_dir if plan.lora_model_dir else root / f"{OUTPUTS}/v{plan.parent}/adapter"
    tok_file = tok_dir / "tokenizer.json"
    if not tok_file.is_file():
        return None
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tok_file))
    texts = [format_example(r["messages"], "chatml")["text"] if "messages" in r else r["text"]
             for p in plan.parts for r in p.records]
    return sum(len(e.ids) for e in tok.encode_batch(texts)) if texts else 0


def run_state(out: Path, plan: Plan) -> str:
    """What an existing ``outputs/vX.Y.Z/`` folder is, for a plan of version X.Y.Z.

    'complete' (this plan's run, finished: recorded without retraining), 'interrupted' (this
    plan's run, unfinished), 'unstarted' (empty: a release was killed between creating it
    and writing its run.json), 'earlier-plan' (the run of an earlier plan of the same version
    that was never recorded: a release crashed or failed, then the data changed) or
    'foreign' (anything else: not cl-release's, never touched; the plan takes the next number).
    Only 'foreign' makes a version number skip: a crash never does."""
    try:
        run = json.loads((out / RUN_FILE).read_text())
    except FileNotFoundError:
        unstarted = all(p.name.startswith(f".{RUN_FILE}.") and p.name.endswith(".tmp") for p in out.iterdir())
        return "unstarted" if unstarted else "foreign"
    except (OSError, ValueError):
        return "foreign"
    if not isinstance(run, dict):
        return "foreign"
    if run.get("fingerprint") != plan.fingerprint():
        # The plan only asks about a version that is in neither the registry nor the tags.
        return "earlier-plan" if run.get("version") == plan.version and run.get("fingerprint") else "foreign"
    if (out / DONE_FILE).is_file() and (out / "adapter" / ADAPTER_FILE).is_file():
        return "complete"
    return "interrupted"

