"""Push a released version to the Hugging Face Hub, with a model card generated from the registry
(:mod:`.card`).

Three steps, so ``--dry-run`` is a real plan (:func:`publish` runs them in order, under the
release lock, for ``cl-release push`` and ``cl-release patch --push``):

1. ``plan_push`` (local only, no network): which folder, which files (name, size, SHA-256),
   the generated README.md, the repository, branch and tag. The adapter's hash is checked
   against the registry here.
2. ``push``: create the repository if missing, refuse a tag that already exists (a published
   tag is never moved), upload every planned file and the README in one commit, tag that
   commit. Every Hub error becomes a ``HubError`` that says what to do next.
3. ``PushResult.to_registry()``: what the caller records in the registry entry.

Layout on the Hub: adapter pushes commit to ``main`` and tag ``vX.Y.Z``; merged weights commit to
the ``merged`` branch and tag ``vX.Y.Z-merged``, so the two file sets never mix in one tree.
Each commit also deletes model files of an earlier push that this version does not have (a
merged model with fewer shards), so a tag holds exactly one version's files; files that
cl-release would never upload (images, a user's own notes) are left alone.

The token comes only from ``HF_TOKEN`` or the Hub login (``hf auth login``); it is never
logged, printed or put into an error message (``_scrub``).
"""

from __future__ import annotations

import fnmatch
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from ..errors import HubError, IntegrityError, UserError
from ..files import sha256_bytes, sha256_file
from ..project import safe_relpath
from ..registry import Registry
from ..release.weights import ADAPTER_FILE, weights_digest
from .card import model_card, revision_tag

ADAPTER_BRANCH = "main"
MERGED_BRANCH = "merged"

# Model files only: no logs, checkpoints, optimizer states, training args or peft's README.
MODEL_FILE_PATTERNS = (
    "*.safetensors",
    "*.safetensors.index.json",
    "*config.json",  # config.json, adapter_config.json, tokenizer_config.json, generation_config.json
    "tokenizer.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "spiece.model",
    "chat_template.jinja",
    "chat_template.json",
)
# Kept on the Hub even when this push does not upload them.
_NEVER_DELETE = {".gitattributes", "README.md"}
_TOKEN_LIKE = re.compile(r"(hf_[A-Za-z0-9]{8,}|Bearer\s+\S+)")

Progress = Callable[[str], None]


# ---------------------------------------------------------------- the plan


@dataclass(frozen=True)
class PlannedFile:
    """One file of the commit. ``local_path`` is None for the generated README.md."""

    path_in_repo: str
    size: int
    sha256: str
    local_path: Path | None = None


@dataclass
class PushPlan:
    """Everything ``push`` will do, computed without touching the network."""

    version: str
    repo_id: str
    private: bool
    merged: bool
    folder: Path
    branch: str
    tag: str
    files: list[PlannedFile]
    readme: bytes = field(repr=False)
    commit_message: str = ""
    requires: list[str] = field(default_factory=list)  # other revisions the card names: must be on the Hub

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (for ``push --dry-run --json`` or logs)."""
        return {
            "version": self.version,
            "repo_id": self.repo_id,
            "private": self.private,
            "merged": self.merged,
            "folder": str(self.folder),
            "branch": self.branch,
            "tag": self.tag,
            "total_bytes": self.total_bytes,
            "files": [{"path": f.path_in_repo, "size": f.size, "sha256": f.sha256} for f in self.files],
            "requires": list(self.requires),
            "card": self.readme.decode("utf-8"),
        }

    def summary(self) -> str:
        """Human-readable, several lines: what would be uploaded where."""
        kind = "merged weights" if self.merged else "adapter"
        lines = [
            f"push {self.version} ({kind}) from {self.folder}",
            f"  to {self.repo_id} ({'private' if self.private else 'public'}), "
            f"branch {self.branch}, tag {self.tag}",
            f"  {len(self.files)} files, {_human_size(self.total_bytes)}:",
        ]
        width = max(len(f.path_in_repo) for f in self.files)
        for f in self.files:
            lines.append(f"    {f.path_in_repo:<{width}}  {_human_size(f.size):>10}  {f.sha256[:12]}")
        if self.requires:
            lines.append(f"  needs on the Hub first: {', '.join(self.requires)} (the card loads it)")
        lines += ["", "model card (README.md):", "", self.readme.decode("utf-8").rstrip()]
        return "\n".join(lines)


def _is_model_file(name: str) -> bool:
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in MODEL_FILE_PATTERNS)


def _adapter_paths(root: Path, entry: dict[str, Any]) -> tuple[Path, Path]:
    """(adapter folder, adapter weights file) from ``entry['adapter']['path']``.

    The registry records the weights file (``outputs/vX.Y.Z/adapter/adapter_model.safetensors``);
    a path naming the folder itself is accepted too.
    """
    rel = entry["adapter"]["path"]
    p = safe_relpath(root, rel, what="adapter path")
    if p.is_dir():
        return p, p / ADAPTER_FILE
    return p.parent, p


def plan_push(
    root: str | Path,
    entry: dict[str, Any],
    lineage: list[dict[str, Any]],
    project_hub: dict[str, Any] | None,
    *,
    merged: bool,
    project_name: str | None = None,
) -> PushPlan:
    """Work out what ``push`` would upload; local checks only, no network.

    Raises UserError (no ``hub:`` section, version not released, merged folder missing, no
    model files) and IntegrityError (the adapter no longer matches the registry's hash).
    """
    root = Path(root)
    version = entry["version"]
    if not project_hub or not project_hub.get("repo_id"):
        raise UserError(
            "cl-release.yaml has no hub.repo_id",
            hint="add 'hub: {repo_id: your-org/your-model}' to cl-release.yaml",
        )
    if entry.get("status") != "released":
        raise UserError(
            f"version {version} is {entry.get('status')}, not released",
            hint="only released versions are pushed to the Hub",
        )
    repo_id = project_hub["repo_id"]

    adapter_dir, adapter_file = _adapter_paths(root, entry)
    if not adapter_file.is_file():
        raise UserError(
            f"{adapter_file.relative_to(root).as_posix()}: the adapter of {version} is not here",
            hint="outputs/ is not in git: push from the machine that trained it, or restore outputs/",
        )
    actual = sha256_file(adapter_file)
    if actual != entry["adapter"]["sha256"]:
        raise IntegrityError(
            f"{adapter_file.relative_to(root).as_posix()}: sha256 {actual[:12]}... does not match the "
            f"registry's {entry['adapter']['sha256'][:12]}... for version {version}",
            hint="the adapter changed after release; restore the released file, never push a different one",
        )

    if merged:
        folder = root / "outputs" / f"v{version}" / "merged"
        if not folder.is_dir():
            raise UserError(
                f"outputs/v{version}/merged does not exist",
                hint=f"run 'cl-release merge {version}' first",
            )
    else:
        folder = adapter_dir

    files = []
    for p in sorted(folder.iterdir()):
        if p.is_file() and p.name != "README.md" and _is_model_file(p.name):
            files.append(PlannedFile(p.name, p.stat().st_size, sha256_file(p), p))
    if merged:
        _check_recorded_merge(entry, files)
    if not any(f.path_in_repo.endswith(".safetensors") for f in files):
        raise UserError(
            f"{folder.relative_to(root).as_posix()}: no *.safetensors weights to push",
            hint=f"run 'cl-release merge {version}' again" if merged else "the training output is incomplete",
        )

    card = model_card(
        project_name or repo_id.split("/", 1)[1],
        entry,
        lineage,
        hub=project_hub,
        merged=merged,
        files=[f.path_in_repo for f in files],
    )
    readme = card.encode("utf-8")
    files.append(PlannedFile("README.md", len(readme), sha256_bytes(readme), None))
    tag = revision_tag(version, merged=merged)
    merged_from = (entry.get("train_base") or {}).get("merged_from")
    requires = [revision_tag(merged_from, merged=True)] if merged_from and not merged else []
    return PushPlan(
        version=version,
        repo_id=repo_id,
        private=bool(project_hub.get("private", True)),
        merged=merged,
        folder=folder,
        branch=MERGED_BRANCH if merged else ADAPTER_BRANCH,
        tag=tag,
        files=files,
        readme=readme,
        commit_message=f"cl-release {tag}: {'merged weights' if merged else 'adapter'} of {version}",
        requires=requires,
    )


def _check_recorded_merge(entry: dict[str, Any], files: list[PlannedFile]) -> None:
    """The merged weights must match ``entry['merged']['sha256']`` when ``cl-release merge`` recorded it
    (``weights.weights_digest`` of the hashes just taken, instead of reading the weights again)."""
    recorded = (entry.get("merged") or {}).get("sha256")
    if not recorded:
        return
    digest = weights_digest([(f.path_in_repo, f.sha256) for f in files if f.path_in_repo.endswith(".safetensors")])
    if digest != recorded:
        version = entry["version"]
        raise IntegrityError(
            f"outputs/v{version}/merged does not match the sha256 recorded for version {version}",
            hint="restore the merged weights or merge into a fresh folder; never push different weights",
        )


def _human_size(n: int) -> str:
    size = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"


# ---------------------------------------------------------------- pushing


@dataclass
class PushResult:
    repo_id: str
    revision: str  # the tag
    branch: str
    commit: str
    url: str  # the commit's URL
    pushed_at: str
    merged: bool
    files: list[str]

    def to_registry(self) -> dict[str, Any]:
        """What to record in the registry entry (e.g. appended to ``entry['hub']``)."""
        return {
            "repo_id": self.repo_id,
            "revision": self.revision,
            "commit": self.commit,
            "url": self.url,
            "pushed_at": self.pushed_at,
            "merged": self.merged,
        }


def plan_version(project, version: str, *, merged: bool = False) -> PushPlan:
    """:func:`plan_push` for ``version`` of the project's registry, with its lineage and the
    project's ``hub:`` settings (``cl-release push --dry-run``)."""
    registry = Registry(project.root)
    data = registry.load()
    entry = registry.find(data, version)
    return plan_push(project.root, entry, registry.lineage(data, entry["version"]), project.hub, merged=merged,
                     project_name=project.name)


def publish(project, version: str, *, merged: bool = False, once: bool = False,
            progress: Progress | None = None) -> PushResult | None:
    """Plan, push and record ``version`` (``cl-release push``), holding the release lock from
    the plan to the registry commit, so no release, merge or A/B move interleaves. The git
    state is checked before anything is uploaded. ``once``: push nothing (None) when the
    registry already records a push of this kind (adapter or merged) of the version."""
    from ..gitops import ReleaseRepo
    from ..registry import release_lock

    repo = ReleaseRepo(project.root)  # before the lock: nothing is written in a folder that is not a repository
    with release_lock(project.root):
        repo.check_state(progress)  # before the upload, not after it
        plan = plan_version(project, version, merged=merged)
        pushes = Registry(project.root).get(plan.version).get("pushes") or []
        if once and any(bool(p.get("merged")) == merged for p in pushes):
            return None
        result = push(plan, progress=progress)
        record_push(Registry(project.root), plan.version, result, lock_held=True)
    return result


def record_push(registry: Registry, version: str, result: PushResult, *, lock_held: bool = False) -> dict[str, Any]:
    """Append ``result.to_registry()`` to the entry's ``pushes`` list and commit the registry
    (``committed_change``: under the release lock, so no release interleaves; ``lock_held``:
    the caller took it around the upload)."""
    from ..registry import committed_change

    with committed_change(registry.root, f"Record push of {result.revision} to {result.repo_id}",
                          lock_held=lock_held) as data:
        entry = record_push_in(data, version, result)
    return entry


def record_push_in(data: dict[str, Any], version: str, result: PushResult) -> dict[str, Any]:
    """Append ``result.to_registry()`` to the entry's ``pushes`` in the loaded registry ``data``."""
    entry = Registry.find(data, version)
    entry.setdefault("pushes", []).append(result.to_registry())
    return entry


def resolve_token() -> str | None:
    """``HF_TOKEN``, else the token saved by ``hf auth login``; None when neither exists."""
    from huggingface_hub import get_token

    return get_token()


def push(
    plan: PushPlan,
    *,
    token: str | None = None,
    endpoint: str | None = None,
    progress: Progress | None = None,
) -> PushResult:
    """Upload ``plan`` in one commit on ``plan.branch`` and tag it ``plan.tag``.

    ``token``: for library callers; the CLI leaves it None (``HF_TOKEN`` or the Hub login).
    ``endpoint``: defaults to ``HF_ENDPOINT`` (read now, not at import) or https://huggingface.co.
    The tag is checked before anything is uploaded: an existing tag is a HubError, never moved.
    """
    from huggingface_hub import constants

    from ..timeutil import registry_now

    say = progress or (lambda _msg: None)
    endpoint = (endpoint or os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")
    token = token or resolve_token()
    if not token:
        raise HubError(
            "no Hugging Face token found",
            hint="log in with `hf auth login` or set HF_TOKEN to a token with write access",
        )
    if constants.is_offline_mode():
        raise HubError(
            "offline mode is on (HF_HUB_OFFLINE), so nothing can be pushed",
            hint="unset HF_HUB_OFFLINE (and TRANSFORMERS_OFFLINE) for this command",
        )
    hub = _Hub(plan, token=token, endpoint=endpoint)

    say(f"checking {plan.repo_id} on {endpoint}")
    hub.call("create the repository", _create_repo, hub, plan)
    refs = hub.call("read the repository's tags", hub.api.list_repo_refs, plan.repo_id)
    existing = {t.name: t.target_commit for t in refs.tags}
    if plan.tag in existing:
        raise HubError(
            f"tag {plan.tag} already exists on {plan.repo_id} (commit {existing[plan.tag][:12]}); "
            "a published tag is never moved",
            hint="release a new version and push that one",
        )
    missing = [r for r in plan.requires if r not in existing]
    if missing:
        needed = missing[0].removeprefix("v").removesuffix("-merged")
        raise HubError(
            f"the model card of {plan.tag} loads revision {missing[0]} of {plan.repo_id}, which is not on the Hub; "
            "nothing was uploaded",
            hint=f"push it first: cl-release push {needed} --merged (after 'cl-release merge {needed}' if needed)",
        )
    branches = {b.name: b.target_commit for b in refs.branches}
    if plan.branch not in branches:
        say(f"creating branch {plan.branch}")
        hub.call(f"create branch {plan.branch}", hub.api.create_branch, plan.repo_id, branch=plan.branch)
        branches[plan.branch] = branches.get(ADAPTER_BRANCH)
    operations = _operations(hub, plan)

    say(f"uploading {len(plan.files)} files ({_human_size(plan.total_bytes)}) to {plan.repo_id}@{plan.branch}")
    info = hub.call(
        "upload the files",
        hub.api.create_commit,
        plan.repo_id,
        operations=operations,
        commit_message=plan.commit_message,
        commit_description=f"Pushed by cl-release. Version {plan.version}, tag {plan.tag}.",
        revision=plan.branch,
        parent_commit=branches.get(plan.branch),
    )
    say(f"tagging commit {info.oid[:12]} as {plan.tag}")
    try:
        hub.call(
            f"tag commit {info.oid[:12]} as {plan.tag}",
            hub.api.create_tag,
            plan.repo_id,
            tag=plan.tag,
            revision=info.oid,
            tag_message=f"cl-release {plan.version}",
            hint_extra=f"the files are committed as {info.oid} on {plan.branch}; run the push again to tag it",
        )
    except HubError as e:
        if e.status != 409:
            raise
        raise HubError(
            f"tag {plan.tag} appeared on {plan.repo_id} during this push (another push of {plan.version}?); "
            f"the files are committed as {info.oid} on {plan.branch} but this commit is not tagged",
            hint="check which commit the tag points to on the Hub; a published tag is never moved",
        ) from None
    return PushResult(
        repo_id=plan.repo_id,
        revision=plan.tag,
        branch=plan.branch,
        commit=info.oid,
        url=info.commit_url,
        pushed_at=registry_now(),
        merged=plan.merged,
        files=[f.path_in_repo for f in plan.files],
    )


def _create_repo(hub: "_Hub", plan: PushPlan) -> None:
    hub.api.create_repo(plan.repo_id, private=plan.private, exist_ok=True, repo_type="model")


def _operations(hub: "_Hub", plan: PushPlan) -> list:
    """CommitOperationAdd for every planned file (hash re-checked), deletes for stale model files."""
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete

    ops: list = []
    for f in plan.files:
        if f.local_path is None:
            op = CommitOperationAdd(path_in_repo=f.path_in_repo, path_or_fileobj=plan.readme)
        else:
            op = CommitOperationAdd(path_in_repo=f.path_in_repo, path_or_fileobj=str(f.local_path))
        if op.upload_info.sha256.hex() != f.sha256:  # hashed by huggingface_hub while reading
            raise IntegrityError(
                f"{f.local_path}: changed since the push was planned",
                hint="nothing was uploaded; run the push again",
            )
        ops.append(op)
    planned = {f.path_in_repo for f in plan.files}
    remote = hub.call(
        "list the files on the Hub",
        lambda: list(hub.api.list_repo_tree(plan.repo_id, revision=plan.branch, recursive=True)),
    )
    for item in remote:
        path = getattr(item, "path", "")
        if (
            hasattr(item, "size")  # a file, not a folder
            and path not in planned
            and path not in _NEVER_DELETE
            and "/" not in path
            and _is_model_file(path)
        ):
            ops.append(CommitOperationDelete(path_in_repo=path, is_folder=False))
    return ops


class _Hub:
    """An HfApi bound to one token, and the translation of its errors into HubError."""

    def __init__(self, plan: PushPlan, *, token: str, endpoint: str):
        from huggingface_hub import HfApi

        self.plan = plan
        self.endpoint = endpoint
        self._token = token
        self.api = HfApi(endpoint=endpoint, token=token)

    def call(self, action: str, fn: Callable, *args, hint_extra: str | None = None, **kwargs):
        import httpx

        try:
            return fn(*args, **kwargs)
        except (HubError, IntegrityError):
            raise
        # HTTP and network failures; ValueError is huggingface_hub's "invalid README metadata".
        except (httpx.HTTPError, OSError, ValueError) as e:
            error = self._translate(action, e, hint_extra)
        # Raised outside the except block: no __context__ keeps the request (and its
        # Authorization header) alive on the exception we hand to the caller.
        raise error

    def _translate(self, action: str, e: Exception, hint_extra: str | None) -> HubError:
        import httpx
        from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

        repo = self.plan.repo_id
        status = None
        if isinstance(e, HfHubHTTPError) and getattr(e, "response", None) is not None:
            status = e.response.status_code
        server = self._scrub(getattr(e, "server_message", None) or "")
        detail = f": {server}" if server else ""
        if status == 401:
            message, hint = f"the Hub rejected the token (401) while trying to {action}", (
                "log in with `hf auth login` or set HF_TOKEN to a valid token with write access"
            )
        elif status == 403:
            message, hint = f"no permission to {action} on {repo} (403){detail}", (
                f"check hub.repo_id in cl-release.yaml and that your token can write to {repo.split('/')[0]}"
            )
        elif status == 404:
            message, hint = f"{repo} or its branch {self.plan.branch} was not found while trying to {action} (404)", (
                "check hub.repo_id in cl-release.yaml and that your token can see the repository"
            )
        elif status == 409:
            message, hint = f"conflict on {repo} while trying to {action} (409){detail}", (
                "something with this name already exists on the Hub; published tags are never moved"
            )
        elif status == 412:
            message, hint = f"{repo}@{self.plan.branch} changed while pushing (412)", "run the push again"
        elif status is not None:
            message, hint = f"the Hub answered {status} while trying to {action}{detail}", (
                "try again later; if it persists, check https://status.huggingface.co"
            )
        elif isinstance(e, (httpx.TransportError, OfflineModeIsEnabled, ConnectionError, TimeoutError)):
            message, hint = f"cannot reach the Hub at {self.endpoint} to {action} ({type(e).__name__})", (
                "check the network, or HF_ENDPOINT if you use a mirror"
            )
        else:
            message, hint = f"could not {action} on {repo}: {self._scrub(str(e))}", (
                "run with --debug for details"
            )
        if hint_extra:
            hint = f"{hint_extra}; {hint}"
        return HubError(self._scrub(message), status=status, hint=self._scrub(hint))

    def _scrub(self, text: str) -> str:
        """Remove the token (and anything shaped like one) from text meant for people."""
        if self._token:
            text = text.replace(self._token, "***")
        return _TOKEN_LIKE.sub("***", text)
