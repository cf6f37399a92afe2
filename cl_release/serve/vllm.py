"""vLLM as the gateway's upstream: the command that serves the current versions, and adapter
loading at runtime.

- :func:`vllm_command`: ``vllm serve BASE --enable-lora --lora-modules v1.1.0=PATH v1.2.0=PATH
  --max-loras N --max-lora-rank R`` for the versions that serve now (champion, challenger);
  ``cl-release serve vllm-command`` prints it.
- :class:`AdapterAdmin`: ``POST /v1/load_lora_adapter`` and ``/v1/unload_lora_adapter`` (vLLM
  started with ``VLLM_ALLOW_RUNTIME_LORA_UPDATING=True``). With ``serve.upstream_admin: true``
  every move of ``cl_release.decide.abtest`` (start, promote, stop, rollback, champion) goes through
  :func:`adapter_admin`: the versions that start serving are loaded before the registry says
  so, the ones that stopped are unloaded after the commit, so a promotion changes what serves
  with no restart. :meth:`AdapterAdmin.sync` (``cl-release serve sync-adapters``) makes the
  upstream hold exactly the served versions, after a crash or a failed unload.

The admin calls use the standard library (urllib); this module is imported by every A/B move.
"""

from __future__ import annotations

import json
import os
import shlex
from pathlib import Path
from typing import Any, Iterable

from ..errors import UpstreamError, UpstreamTimeout, UserError
from .config import LORA_PREFIX, lora_name, serve_config

# vLLM's accepted --max-lora-rank values.
LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


def _serving_entries(root: Path, data: dict[str, Any]) -> dict[str, dict[str, Any]]:
    from ..decide.abtest import serving
    from ..registry import Registry

    return {v: Registry.find(data, v) for v in serving(data).values() if v is not None}


def _adapter_dir(entry: dict[str, Any]) -> str:
    from ..eval.runner import entry_model_paths

    _, adapter, _ = entry_model_paths(entry)
    if not adapter:
        raise UserError(f"version {entry['version']} has no LoRA adapter to serve")
    return adapter


def vllm_command(project, *, port: int | None = None, repo_path: str | None = None,
                 data: dict[str, Any] | None = None) -> list[str]:
    """The ``vllm serve`` argv for the versions that serve now (``repo_path``: this repository's
    path on the vLLM machine, default ``serve.upstream_repo_path`` or its path here)."""
    from ..eval.runner import entry_model_paths
    from ..project import is_local_model
    from ..registry import Registry

    root = Path(project.root)
    conf = serve_config(project)
    base_root = repo_path or conf.get("upstream_repo_path") or str(root.resolve())
    data = data if data is not None else Registry(root).load()
    entries = _serving_entries(root, data)
    if not entries:
        raise UserError("no version serves yet", hint="release one, then: cl-release ab champion VERSION")
    bases = {}
    for v, e in entries.items():
        base, _, revision = entry_model_paths(e)
        bases.setdefault((base, revision), []).append(v)
    if len(bases) > 1:
        raise UserError("the served versions have different base models: "
                        + "; ".join(f"{', '.join(vs)} on {b}" for (b, _), vs in bases.items()),
                        hint="vLLM serves LoRA adapters of one base model; serve them with two servers")
    (base, revision), _ = next(iter(bases.items()))
    model = f"{base_root}/{base}" if is_local_model(root, base) else base
    ranks = [_rank(root, _adapter_dir(e)) for e in entries.values()]
    rank = next((r for r in LORA_RANKS if r >= max(ranks)), max(ranks))
    argv = ["vllm", "serve", model]
    if revision:
        argv += ["--revision", revision]
    argv += ["--enable-lora", "--lora-modules"]
    argv += [f"{lora_name(v)}={base_root}/{_adapter_dir(e)}" for v, e in sorted(entries.items())]
    argv += ["--max-loras", str(max(2, len(entries))), "--max-lora-rank", str(rank)]
    if port is not None:
        argv += ["--port", str(port)]
    return argv


def format_command(argv: list[str], *, runtime_updates: bool) -> str:
    """One shell line; with ``runtime_updates`` prefixed by vLLM's switch for load/unload."""
    line = shlex.join(argv)
    return f"VLLM_ALLOW_RUNTIME_LORA_UPDATING=True {line}" if runtime_updates else line


def _rank(root: Path, adapter: str) -> int:
    cfg = root / adapter / "adapter_config.json"
    try:
        return int(json.loads(cfg.read_text(encoding="utf-8")).get("r") or 8)
    except (OSError, ValueError):
        return 16  # vLLM's default


class AdapterAdmin:
    """Load and unload the LoRA modules of versions on a vLLM server (``base_url`` with /v1)."""

    def __init__(self, root: Path, base_url: str, *, api_key: str | None = None, timeout: float = 60.0,
                 repo_path: str | None = None):
        self.root = Path(root)
        self.base_url = base_url.rstrip("/")
        self.api_key = api_key
        self.timeout = timeout
        self.repo_path = repo_path or str(self.root.resolve())

    def _call(self, method: str, path: str, body: dict | None = None) -> tuple[int, bytes]:
        """(status, body) of one request to the upstream's API."""
        import socket
        import urllib.error
        import urllib.request

        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(f"{self.base_url}{path}", data=data, method=method)
        if data is not None:
            req.add_header("Content-Type", "application/json")
        if self.api_key:
            req.add_header("Authorization", f"Bearer {self.api_key}")
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()
        except (TimeoutError, socket.timeout):
            raise UpstreamTimeout(f"the model server at {self.base_url} did not answer {path} in {self.timeout:g} s") from None
        except (urllib.error.URLError, OSError) as e:
            reason = getattr(e, "reason", e)
            if isinstance(reason, (TimeoutError, socket.timeout)):
                raise UpstreamTimeout(f"the model server at {self.base_url} did not answer {path} in "
                                      f"{self.timeout:g} s") from None
            raise UpstreamError(f"the model server at {self.base_url} is unreachable: {reason}",
                                hint="start it, or turn serve.upstream_admin off") from None

    def loaded(self) -> set[str]:
        """The versions whose LoRA module the upstream holds (``GET /v1/models``)."""
        from .backends.openai import upstream_message

        status, payload = self._call("GET", "/models")
        if status != 200:
            raise UpstreamError(f"the model server's /v1/models answered {status}: {upstream_message(payload)}")
        try:
            ids = [m["id"] for m in json.loads(payload)["data"]]
        except (ValueError, KeyError, TypeError):
            raise UpstreamError("the model server's /v1/models is not an OpenAI model list") from None
        return {i[len(LORA_PREFIX):] for i in ids if isinstance(i, str) and i.startswith(LORA_PREFIX)}

    def load(self, data: dict[str, Any], versions: Iterable[str]) -> list[str]:
        """Load the adapters of ``versions`` (registry ``data`` names their paths) that the upstream
        does not hold yet; returns those loaded. A refusal raises :class:`UpstreamError`."""
        from ..registry import Registry
        from .backends.openai import upstream_message

        versions = list(versions)
        if not versions:
            return []
        have = self.loaded()
        done = []
        for v in versions:
            if v in have:
                continue
            path = f"{self.repo_path}/{_adapter_dir(Registry.find(data, v))}"
            status, payload = self._call("POST", "/load_lora_adapter", {"lora_name": lora_name(v), "lora_path": path})
            if status != 200:
                raise UpstreamError(f"the model server did not load {lora_name(v)} from {path}: "
                                    f"{status} {upstream_message(payload)}",
                                    hint="nothing was changed in the registry; vLLM needs "
                                         "VLLM_ALLOW_RUNTIME_LORA_UPDATING=True and the path on its machine "
                                         "(serve.upstream_repo_path)")
            done.append(v)
        return done

    def unload(self, versions: Iterable[str], *, committed: bool = False) -> list[str]:
        """Unload the adapters of ``versions`` (those the upstream holds); returns those unloaded.
        ``committed``: the registry move is already committed (said in the error)."""
        from .backends.openai import upstream_message

        versions = list(versions)
        if not versions:
            return []
        try:
            have = self.loaded()
            done = []
            for v in versions:
                if v not in have:
                    continue
                status, payload = self._call("POST", "/unload_lora_adapter", {"lora_name": lora_name(v)})
                if status != 200:
                    raise UpstreamError(f"the model server did not unload {lora_name(v)}: "
                                        f"{status} {upstream_message(payload)}")
                done.append(v)
        except UpstreamError as e:
            if committed:
                raise UpstreamError(f"the registry move is committed, but {e.message}",
                                    hint="the old adapter stays loaded; retry with: cl-release serve sync-adapters") from None
            raise
        return done

    def sync(self, data: dict[str, Any]) -> dict[str, list[str]]:
        """Make the upstream hold exactly the served versions: load the missing, unload the rest."""
        served = set(_serving_entries(self.root, data))
        loaded = self.load(data, sorted(served))
        extra = sorted(self.loaded() - served)
        return {"loaded": loaded, "unloaded": self.unload(extra)}


def admin_for(project) -> AdapterAdmin:
    """The adapter admin of the project's upstream (``serve.upstream_url``), whatever
    ``serve.upstream_admin`` says."""
    conf = serve_config(project)
    url = conf.get("upstream_url")
    if not url:
        raise UserError("serve.upstream_url is not set", hint="set it to the vLLM server's URL with /v1")
    key_env = conf.get("upstream_api_key_env")
    return AdapterAdmin(project.root, url, api_key=os.environ.get(key_env) if key_env else None,
                        timeout=float(conf["upstream_timeout_s"]), repo_path=conf.get("upstream_repo_path"))


def adapter_admin(root: Path) -> AdapterAdmin | None:
    """The hook of ``cl_release.decide.abtest``'s moves: the admin when ``serve.upstream_admin`` is on."""
    from ..project import Project

    project = Project.load(root)
    if not serve_config(project).get("upstream_admin"):
        return None
    return admin_for(project)
