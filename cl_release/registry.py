"""The registry file: schema, semantic versions, lineage queries, atomic locked writes.

``registry/model_registry.json`` is the source of truth for which versions exist. It is
validated against ``registry/schema.json`` on every read and every write, written with
sorted keys (readable git diffs) through a temp file and ``os.replace`` under a file lock.
"""

from __future__ import annotations

import contextlib
import json
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import orjson

from .data.formats import MAX_NESTING, nesting_depth
from .errors import RegistryError, VersionError
from .files import atomic_write_json, locked
from .resources import default_registry_schema
from .timeutil import registry_now

REGISTRY_FILE = "registry/model_registry.json"
SCHEMA_FILE = "registry/schema.json"
BUMPS = ("major", "minor", "patch")
_VERSION_RE = re.compile(r"^(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)$")


# ---------------------------------------------------------------- semantic versions


def parse_version(text: str) -> tuple[int, int, int]:
    """'1.2.3' or 'v1.2.3' -> (1, 2, 3); anything else is a VersionError."""
    s = str(text).strip()
    if s.startswith("v"):
        s = s[1:]
    m = _VERSION_RE.match(s)
    if not m:
        raise VersionError(f"invalid version {text!r}", hint="use MAJOR.MINOR.PATCH, e.g. 1.2.0")
    return int(m[1]), int(m[2]), int(m[3])


def normalize_version(text: str) -> str:
    return "%d.%d.%d" % parse_version(text)


_LOOSE_VERSION_RE = re.compile(r"[vV]?(\d+)(?:\.(\d+))?(?:\.(\d+))?")


def match_release(text: str, versions: Iterable[str]) -> str | None:
    """The release among ``versions`` that another tool's version string names, or None.

    Other tools write ``v1.0``, ``1.0`` or ``v2``: a missing MINOR or PATCH is 0, so those
    name ``1.0.0`` and ``2.0.0``. A string of any other shape, or naming no release, is None.
    """
    m = _LOOSE_VERSION_RE.fullmatch(text.strip())
    if m is None:
        return None
    version = "%d.%d.%d" % (int(m[1]), int(m[2] or 0), int(m[3] or 0))
    return version if version in versions else None


def bump_version(parent: str | None, bump: str, taken: set[str]) -> str:
    """The next version for ``bump`` from ``parent`` that is not in ``taken``.

    No parent (empty registry): 1.0.0. Numbers never repeat: after a rollback to 1.0.0 with
    1.1.0 taken, a minor bump gives 1.2.0.
    """
    if bump not in BUMPS:
        raise VersionError(f"unknown bump {bump!r}", hint="use major, minor or patch")
    if parent is None:
        candidate = (1, 0, 0)
        while "%d.%d.%d" % candidate in taken:
            candidate = (candidate[0] + 1, 0, 0)
        return "%d.%d.%d" % candidate
    major, minor, patch = parse_version(parent)
    while True:
        if bump == "major":
            major, minor, patch = major + 1, 0, 0
        elif bump == "minor":
            minor, patch = minor + 1, 0
        else:
            patch += 1
        v = f"{major}.{minor}.{patch}"
        if v not in taken:
            return v


# ---------------------------------------------------------------- schema


@lru_cache(maxsize=8)
def _load_schema(path: str, mtime: float) -> dict[str, Any]:
    try:
        schema = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise RegistryError(f"{path}: cannot read the registry schema: {e}") from None
    import jsonschema  # imported when a registry is read: 'cl-release release --help' does without

    jsonschema.Draft202012Validator.check_schema(schema)
    return schema


def _field_path(parts) -> str:
    out = ""
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out or "(top level)"


def validate_registry(data: Any, *, where: str, schema_path: Path) -> None:
    """Raise RegistryError naming the file and the first invalid field."""
    schema = _load_schema(str(schema_path), schema_path.stat().st_mtime)
    import jsonschema

    validator = jsonschema.Draft202012Validator(schema)
    error = jsonschema.exceptions.best_match(validator.iter_errors(data))
    if error is not None:
        raise RegistryError(
            f"{where}: {_field_path(error.absolute_path)}: {error.message}",
            hint=f"the registry must match {schema_path}; fix the file or restore it from git",
        )
    # Invariants the schema cannot express.
    versions = [m["version"] for m in data["models"]]
    seen: set[str] = set()
    for i, v in enumerate(versions):
        if v in seen:
            raise RegistryError(f"{where}: models[{i}].version: version {v} appears twice")
        seen.add(v)
    if data["current"] is not None and data["current"] not in seen:
        raise RegistryError(f"{where}: current: {data['current']} is not a version in models")
    for name, v in (data.get("aliases") or {}).items():
        if v not in seen:
            raise RegistryError(f"{where}: aliases.{name}: {v} is not a version in models")
    for i, m in enumerate(data["models"]):
        if m["parent"] is not None and m["parent"] not in seen:
            raise RegistryError(f"{where}: models[{i}].parent: {m['parent']} is not a version in models")


def empty_registry() -> dict[str, Any]:
    return {"schema_version": 1, "current": None, "aliases": {}, "models": []}


# ---------------------------------------------------------------- the registry


@dataclass
class Registry:
    """The registry of one release repository (``root``)."""

    root: Path

    def __post_init__(self) -> None:
        self.root = Path(self.root)

    @property
    def path(self) -> Path:
        return self.root / REGISTRY_FILE

    @property
    def schema_path(self) -> Path:
        local = self.root / SCHEMA_FILE
        return local if local.is_file() else default_registry_schema()

    @property
    def lock_path(self) -> Path:
        return self.root / ".cl-release" / "registry.lock"

    # -- reading

    def load(self) -> dict[str, Any]:
        if not self.path.is_file():
            raise RegistryError(
                f"{self.path}: no registry here",
                hint="run 'cl-release init DIR' to create a release repository, or use -C DIR",
            )
        try:
            # orjson: strict JSON, at most 1,024 levels of nesting (the stdlib recurses until
            # RecursionError); deeper than MAX_NESTING is refused below.
            data = orjson.loads(self.path.read_text(encoding="utf-8"))
        except orjson.JSONDecodeError as e:
            raise RegistryError(
                f"{REGISTRY_FILE}:{e.lineno}: invalid JSON: {e.msg}",
                hint=f"restore it with 'git checkout -- {REGISTRY_FILE}'",
            ) from None
        except UnicodeDecodeError:
            raise RegistryError(f"{REGISTRY_FILE}: not UTF-8 text") from None
        if nesting_depth(data) > MAX_NESTING:
            raise RegistryError(f"{REGISTRY_FILE}: nested deeper than {MAX_NESTING} levels",
                                hint=f"restore it with 'git checkout -- {REGISTRY_FILE}'")
        validate_registry(data, where=REGISTRY_FILE, schema_path=self.schema_path)
        data.setdefault("aliases", {})
        return data

    def save(self, data: dict[str, Any]) -> None:
        """Validate, then replace the file atomically. Callers hold the lock (see ``transaction``)."""
        validate_registry(data, where=REGISTRY_FILE, schema_path=self.schema_path)
        atomic_write_json(self.path, data)

    @contextlib.contextmanager
    def transaction(self) -> Iterator[dict[str, Any]]:
        """Read-modify-write under the registry lock; nothing is written if the body raises."""
        with locked(self.lock_path, what="the registry"):
            data = self.load()
            yield data
            self.save(data)

    # -- queries (over a loaded ``data`` dict, so one read serves many)

    def models(self) -> list[dict[str, Any]]:
        return self.load()["models"]

    @staticmethod
    def find(data: dict[str, Any], version: str) -> dict[str, Any]:
        v = normalize_version(version)
        for m in data["models"]:
            if m["version"] == v:
                return m
        known = ", ".join(m["version"] for m in data["models"]) or "none yet"
        raise VersionError(f"unknown version {v}", hint=f"versions in the registry: {known}")

    def get(self, version: str) -> dict[str, Any]:
        return self.find(self.load(), version)

    @staticmethod
    def lineage(data: dict[str, Any], version: str) -> list[dict[str, Any]]:
        """Entries from the root of the lineage down to ``version`` (inclusive)."""
        chain = []
        entry: dict[str, Any] | None = Registry.find(data, version)
        while entry is not None:
            chain.append(entry)
            entry = Registry.find(data, entry["parent"]) if entry["parent"] else None
        return list(reversed(chain))

    @staticmethod
    def children(data: dict[str, Any], version: str) -> list[dict[str, Any]]:
        v = normalize_version(version)
        return [m for m in data["models"] if m["parent"] == v]

    @staticmethod
    def resolve_parent(data: dict[str, Any], from_version: str | None) -> dict[str, Any] | None:
        """The entry a new release builds on: ``--from`` or the current version."""
        if from_version is not None:
            entry = Registry.find(data, from_version)
            if entry["status"] != "released":
                raise VersionError(
                    f"version {entry['version']} is {entry['status']}, not released",
                    hint="build on a released version",
                )
            return entry
        if data["current"] is None:
            return None
        return Registry.find(data, data["current"])

    # -- writes

    def append(self, entry: dict[str, Any], *, make_current: bool,
               then: Callable[[dict[str, Any]], Any] | None = None) -> None:
        """Add ``entry`` (and make it current); ``then(data)`` changes more in the same write
        (a patch that becomes champion: one registry move, one commit)."""
        with self.transaction() as data:
            if any(m["version"] == entry["version"] for m in data["models"]):
                raise RegistryError(f"version {entry['version']} is already in the registry")
            data["models"].append(entry)
            if make_current:
                data["current"] = entry["version"]
            if then is not None:
                then(data)

    def rollback(self, version: str) -> dict[str, Any]:
        """Make an earlier released version current; nothing is deleted. Rolling back to the
        current version writes nothing (no event)."""
        data = self.load()
        entry = self.find(data, version)
        if data["current"] == entry["version"]:
            return entry
        with self.transaction() as data:
            entry = self.rollback_in(data, version)
        return entry

    @staticmethod
    def rollback_in(data: dict[str, Any], version: str) -> dict[str, Any]:
        """The rollback's change of a loaded registry: ``version`` (released) becomes current,
        with a ``rollback`` event; ``data`` unchanged when it is current already."""
        entry = Registry.find(data, version)
        if data["current"] == entry["version"]:
            return entry
        if entry["status"] != "released":
            raise VersionError(
                f"cannot roll back to {entry['version']}: it is {entry['status']}",
                hint="roll back to a released version",
            )
        previous = data["current"]
        data["current"] = entry["version"]
        data.setdefault("events", []).append(
            {"at": registry_now(), "action": "rollback", "from": previous, "to": entry["version"]}
        )
        return entry


# ---------------------------------------------------------------- changes committed to git


def release_lock(root: Path):
    """The lock every change of a release repository's registry and git state takes (a release
    holds it for its whole run: a second writer fails at once with a clear error)."""
    return locked(Path(root) / ".cl-release" / "release.lock", timeout=0,
                  what="this release repository (a release, merge, push or A/B move is running)")


@contextlib.contextmanager
def committed_change(root: str | Path, message: str | Callable[[], str], *,
                     lock_held: bool = False) -> Iterator[dict[str, Any]]:
    """Change the registry and commit it: the one way everything but a release does (rollback,
    merge and push records, every A/B move). Under the release lock (``lock_held``: the caller
    took it, around the work whose result is recorded), the git state is checked before
    anything is written (a stale ``index.lock`` refuses here, not after the registry changed),
    the body changes the loaded registry (written atomically when it returns), then the
    registry file is committed with ``message`` (a callable is built after the body)."""
    from .gitops import ReleaseRepo

    root = Path(root)
    repo = ReleaseRepo(root)  # before the lock: nothing is written in a folder that is not a repository
    with contextlib.nullcontext() if lock_held else release_lock(root):
        repo.check_state()
        with Registry(root).transaction() as data:
            yield data
        repo.commit([REGISTRY_FILE], message() if callable(message) else message)
