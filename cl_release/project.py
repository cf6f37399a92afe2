"""Load and validate ``cl-release.yaml``; resolve paths inside the release repository safely."""

from __future__ import annotations

import glob as _glob
import json
import os
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import jsonschema
import yaml

from .errors import InputFileError, ProjectError, UserError

PROJECT_FILE = "cl-release.yaml"
_SCHEMA_PATH = Path(__file__).with_name("schemas") / "project.schema.json"


# ---------------------------------------------------------------- YAML with line numbers


class StrictSafeLoader(yaml.SafeLoader):
    """The safe loader, refusing duplicate keys (plain PyYAML silently keeps the last one)."""

    def construct_mapping(self, node, deep=False):
        seen = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            try:
                hash(key)
            except TypeError:
                continue
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (first on line {seen[key]})", key_node.start_mark)
            seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)


def safe_load_strict(text: str):
    """``yaml.safe_load`` semantics (no Python tags), plus duplicate keys are errors."""
    loader = StrictSafeLoader(text)
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


def load_yaml(path: Path, *, error: type[InputFileError] = ProjectError, text: str | None = None):
    """``yaml.safe_load`` a file, returning (data, node) so errors can name lines.

    Python tags (``!!python/object``...) and other unsafe constructs are refused by the safe
    loader; every problem becomes ``error`` naming the file and line.
    """
    if text is None:
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            raise error(path, "file not found") from None
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise error(path, f"not UTF-8 text (byte {e.start})") from None
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = safe_load_strict(text)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        line = mark.line + 1 if mark else None
        problem = " ".join(str(e.problem or e.context or "invalid YAML").split())
        raise error(path, problem, line=line) from None
    except yaml.YAMLError as e:
        raise error(path, " ".join(str(e).split())) from None
    return data, node


def line_of(node: yaml.Node | None, parts) -> int | None:
    """The 1-based line of the YAML node at a JSON-schema path (closest existing parent)."""
    if node is None:
        return None
    best = node.start_mark.line + 1
    for p in parts:
        nxt = None
        if isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                if getattr(k, "value", None) == p:
                    nxt = v
                    best = k.start_mark.line + 1
                    break
        elif isinstance(node, yaml.SequenceNode) and isinstance(p, int) and p < len(node.value):
            nxt = node.value[p]
            best = nxt.start_mark.line + 1
        if nxt is None:
            break
        node = nxt
    return best


def field_path(parts) -> str:
    out = ""
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out


@lru_cache(maxsize=1)
def project_schema() -> dict[str, Any]:
    return json.loads(_SCHEMA_PATH.read_text(encoding="utf-8"))


def validate_against(schema: dict, data: Any, *, path: Path, node, error=ProjectError) -> None:
    validator = jsonschema.Draft202012Validator(schema)
    err = jsonschema.exceptions.best_match(validator.iter_errors(data))
    if err is None:
        return
    parts = list(err.absolute_path)
    message = err.message
    hint = None
    if err.validator == "additionalProperties":
        message = message.replace("Additional properties are not allowed", "unknown key")
        allowed = set(err.schema.get("properties") or {})
        unknown = [k for k in err.instance if k not in allowed] if isinstance(err.instance, dict) else []
        if unknown:  # point at the unknown key itself (its line), and suggest the closest known one
            import difflib

            parts.append(unknown[0])
            message = f"unknown key {unknown[0]!r}"
            close = difflib.get_close_matches(str(unknown[0]), allowed, n=1)
            hint = f"did you mean {close[0]!r}?" if close else f"known keys: {', '.join(sorted(allowed))}"
    raise error(path, message, line=line_of(node, parts), field=field_path(parts) or None, hint=hint)


# ---------------------------------------------------------------- safe paths


def safe_relpath(root: Path, rel: str, *, what: str = "path") -> Path:
    """Resolve ``rel`` inside ``root``; refuse absolute paths and ``..`` escapes."""
    if not isinstance(rel, str) or not rel.strip():
        raise UserError(f"empty {what}")
    if "\x00" in rel:
        raise UserError(f"{what} {rel!r} contains a NUL byte")
    p = Path(rel)
    if p.is_absolute():
        raise UserError(f"{what} {rel!r} is absolute", hint="use a path relative to the release repository")
    if ".." in p.parts:
        raise UserError(f"{what} {rel!r} contains '..'", hint="keep paths inside the release repository")
    full = (root / p).resolve()
    root_resolved = root.resolve()
    if full != root_resolved and root_resolved not in full.parents:
        raise UserError(f"{what} {rel!r} points outside the release repository (through a link)")
    return root / p


def is_local_model(root: Path, name: str) -> bool:
    """A base model given as a path inside the repository (vs a Hub id like org/name)."""
    p = Path(name)
    return not p.is_absolute() and ".." not in p.parts and (root / p / "config.json").is_file()


# ---------------------------------------------------------------- the project


@dataclass
class Project:
    root: Path
    data: dict[str, Any]
    node: Any = field(default=None, repr=False)

    @classmethod
    def load(cls, root: str | Path) -> "Project":
        root = Path(root)
        path = root / PROJECT_FILE
        if not path.is_file():
            raise ProjectError(
                path,
                "no project file here",
                hint="run 'cl-release init DIR' or pass -C DIR to point at a release repository",
            )
        data, node = load_yaml(path)
        if not isinstance(data, dict):
            raise ProjectError(path, "the project file must be a mapping of keys", line=1)
        validate_against(project_schema(), data, path=path, node=node)
        project = cls(root=root, data=data, node=node)
        project._check_paths()
        return project

    @property
    def path(self) -> Path:
        return self.root / PROJECT_FILE

    def error(self, message: str, *parts, hint: str | None = None) -> ProjectError:
        return ProjectError(
            self.path, message, line=line_of(self.node, parts), field=field_path(parts) or None, hint=hint
        )

    def _check_paths(self) -> None:
        seen = set()
        for i, ds in enumerate(self.data["datasets"]):
            if ds["name"] in seen:
                raise self.error(f"dataset name {ds['name']!r} is used twice", "datasets", i, "name")
            seen.add(ds["name"])
            try:
                safe_relpath(self.root, ds["path"], what="dataset path")
            except UserError as e:
                raise self.error(e.message, "datasets", i, "path", hint=e.hint) from None
        deepspeed = self.launch.get("deepspeed")
        if deepspeed:
            try:
                safe_relpath(self.root, deepspeed, what="deepspeed config")
            except UserError as e:
                raise self.error(e.message, "launch", "deepspeed") from None

    # -- accessors

    @property
    def name(self) -> str:
        return self.data["name"]

    @property
    def base_model(self) -> dict[str, Any]:
        return self.data["base_model"]

    @property
    def seed(self) -> int:
        return int(self.data.get("seed", 42))

    @property
    def chat_template(self) -> str:
        return self.data.get("chat_template", "tokenizer_default")

    @property
    def datasets(self) -> list[dict[str, Any]]:
        return [
            {"role": "domain", "format": "messages", **ds} for ds in self.data["datasets"]
        ]

    @property
    def launch(self) -> dict[str, Any]:
        defaults = {
            "num_processes": 1,
            "num_machines": 1,
            "machine_rank": 0,
            "main_process_ip": None,
            "main_process_port": None,
            "mixed_precision": "auto",
            "device": "auto",
            "deepspeed": None,
            "fsdp": None,
        }
        return {**defaults, **(self.data.get("launch") or {})}

    @property
    def hub(self) -> dict[str, Any] | None:
        return self.data.get("hub")

    @property
    def feedback_path(self) -> Path:
        rel = (self.data.get("feedback") or {}).get("path", ".cl-release/feedback.db")
        return safe_relpath(self.root, rel, what="feedback store path")

    def dataset_files(self, ds: dict[str, Any]) -> list[Path]:
        """The files of one dataset entry (a path or a glob), sorted, inside the repo."""
        pattern = ds["path"]
        if any(ch in pattern for ch in "*?["):
            matches = sorted(
                Path(p) for p in _glob.glob(str(self.root / pattern), recursive=True) if os.path.isfile(p)
            )
            return [safe_relpath(self.root, str(m.relative_to(self.root)), what="dataset file") for m in matches]
        p = safe_relpath(self.root, pattern, what="dataset path")
        if not p.is_file():
            i = [d["name"] for d in self.data["datasets"]].index(ds["name"])
            raise self.error(f"dataset file {pattern} does not exist", "datasets", i, "path")
        return [p]

    def rel(self, path: Path) -> str:
        return Path(os.path.relpath(path, self.root)).as_posix()
