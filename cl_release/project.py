"""Load and validate ``cl-release.yaml``; resolve paths inside the release repository safely."""

from __future__ import annotations

import glob as _glob
import json
import math
import os
import re
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterator

import jsonschema
import yaml

from .data.formats import MAX_NESTING
from .errors import InputFileError, ProjectError, UserError

PROJECT_FILE = "cl-release.yaml"
_SCHEMA_PATH = Path(__file__).with_name("schemas") / "project.schema.json"


# ---------------------------------------------------------------- YAML with line numbers

# Aliases may add at most this many values to a document (each use of an alias copies its
# anchor's values when the document is walked): a "billion laughs" file of nine nested
# aliases is refused while it is read, instead of taking minutes and gigabytes later.
MAX_ALIAS_VALUES = 10_000

# YAML 1.1 (PyYAML) reads ``1e-5`` as a string: its floats need a dot and a signed exponent.
# Read every YAML 1.2 float form as a number, as users (and JSON) expect.
_FLOAT_12 = re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$")


class BoundError(yaml.composer.ComposerError):
    """A YAML document over a bound; ``field`` is the path of the value where it was found."""

    def __init__(self, problem: str, mark, field: str | None):
        super().__init__(None, None, problem, mark)
        self.field = field


class StrictSafeLoader(yaml.SafeLoader):
    """The safe loader with bounds: duplicate keys are errors (plain PyYAML keeps the last
    one), nesting deeper than ``MAX_NESTING`` levels and aliases adding more than
    ``MAX_ALIAS_VALUES`` values are refused as the document is composed; ``1e-5`` is a float."""

    def __init__(self, stream):
        super().__init__(stream)
        self._depth = 0
        self._distinct = 0
        self._sizes: dict[int, tuple[int, int]] = {}  # id(node) -> (values when expanded, depth)
        self._path: list = []  # keys and indexes of the value being composed

    def _bound(self, problem: str, mark) -> BoundError:
        parts = [p for p in self._path if p is not None]
        shown = field_path(parts[:4]) + ("..." if len(parts) > 4 else "")
        return BoundError(problem, mark, shown or None)

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            return super().compose_node(parent, index)
        if isinstance(index, yaml.ScalarNode):  # the value of a mapping key
            label = index.value
        else:  # a sequence item (int), or a mapping key or the document (None)
            label = index if isinstance(index, int) else None
        self._path.append(label)
        self._depth += 1
        if self._depth > MAX_NESTING:
            raise self._bound(f"nested deeper than {MAX_NESTING} levels", self.peek_event().start_mark)
        node = super().compose_node(parent, index)
        self._depth -= 1
        if isinstance(node, yaml.SequenceNode):
            children = node.value
        elif isinstance(node, yaml.MappingNode):
            children = [n for pair in node.value for n in pair]
        else:
            children = ()
        sizes = [self._sizes[id(c)] for c in children]
        size = 1 + sum(n for n, _ in sizes)
        depth = 1 + max((d for _, d in sizes), default=0)
        self._sizes[id(node)] = (size, depth)
        self._distinct += 1
        # size - distinct never exceeds what aliases add to the whole document: refuse early
        if size - self._distinct > MAX_ALIAS_VALUES:
            raise self._bound(f"aliases expand to more than {MAX_ALIAS_VALUES:,} values (a 'billion laughs' document?)",
                              node.start_mark)
        if depth > MAX_NESTING:
            raise self._bound(f"nested deeper than {MAX_NESTING} levels through aliases", node.start_mark)
        self._path.pop()
        return node

    def construct_mapping(self, node, deep=False):
        seen = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *defaults`: merged by the base class
                continue
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


StrictSafeLoader.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT_12, list("-+.0123456789"))


def _compose_and_construct(text: str):
    loader = StrictSafeLoader(text)
    try:
        node = loader.get_single_node()
        return (loader.construct_document(node) if node is not None else None), node
    finally:
        loader.dispose()


def safe_load_strict(text: str):
    """``yaml.safe_load`` semantics (no Python tags), with ``StrictSafeLoader``'s bounds."""
    return _compose_and_construct(text)[0]


def load_yaml(path: Path, *, error: type[InputFileError] = ProjectError, text: str | None = None):
    """``yaml.safe_load`` a file, returning (data, node) so errors can name lines.

    Python tags (``!!python/object``...) and other unsafe constructs are refused by the safe
    loader, and the bounds of ``StrictSafeLoader`` apply; every problem becomes ``error``
    naming the file and line.
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
        data, node = _compose_and_construct(text)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        line = mark.line + 1 if mark else None
        problem = " ".join(str(e.problem or e.context or "invalid YAML").split())
        raise error(path, problem, line=line, field=getattr(e, "field", None)) from None
    except yaml.YAMLError as e:
        raise error(path, " ".join(str(e).split())) from None
    return data, node


def check_values(data: Any, *, path: Path, node=None, error: type[InputFileError] = ProjectError) -> None:
    """Every number finite and every string writable as UTF-8 (no lone surrogate escape),
    else ``error`` naming the file, line and field. Walks without recursion."""
    stack: list[tuple[Any, tuple]] = [(data, ())]
    while stack:
        value, parts = stack.pop()
        problem = None
        if isinstance(value, float) and not math.isfinite(value):
            problem = f"must be a finite number, not {value}"
        elif isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError as e:
                problem = f"holds a lone UTF-16 surrogate (\\u{ord(value[e.start]):04x}), which is not text"
        elif isinstance(value, dict):
            stack.extend((v, (*parts, k)) for k, v in value.items())
        elif isinstance(value, list):
            stack.extend((v, (*parts, i)) for i, v in enumerate(value))
        if problem:
            raise error(path, problem, line=line_of(node, parts), field=field_path(parts) or None)


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


def check_base_model(name: str) -> None:
    """A base model is a Hub id or a folder inside the release repository (hashed into the
    registry). A path outside it is refused (UserError): its weights would not be hashed, and
    the lineage could not say what was trained on."""
    why = path_escape(name, None)
    if why:
        raise UserError(f"base model {name!r}: {why}",
                        hint="use a Hub id (org/name), or put the model in a folder inside the release "
                             "repository, e.g. models/ (git-ignored), where it is hashed into the registry")


# ---------------------------------------------------------------- Axolotl keys: confinement

# Axolotl keys that run code from outside the repository (a Hub model's Python, any importable
# module): allowed under axolotl:/extra: only when named in allow_unconfined.
CODE_KEYS = ("trust_remote_code", "plugins")
_DRIVE = re.compile(r"^[A-Za-z]:[\\/]")


def path_escape(text: str, root: Path | None) -> str | None:
    """Why the string ``text``, read as a path, leaves the release repository, or None.

    Absolute paths (also ``~``, ``file://`` and drive letters) and ``..`` components leave it;
    with ``root``, so does a relative path through a link that points outside."""
    s = text[7:] if text.startswith("file://") else text
    if "\x00" in s:
        return "contains a NUL byte"
    if s.startswith(("/", "~", "\\")) or _DRIVE.match(s):
        return "is an absolute path, outside the release repository"
    if ".." in re.split(r"[\\/]", s):
        return "contains '..', which leaves the release repository"
    if root is not None and s and "\n" not in s and len(s) < 4096:
        try:
            full, top = (root / s).resolve(), root.resolve()
        except (OSError, ValueError, RuntimeError):
            return None
        if full != top and top not in full.parents:
            return "points outside the release repository (through a link)"
    return None


def unconfined_values(root: Path, extra: Any) -> Iterator[tuple[tuple, str]]:
    """(field path under ``extra``, why) for each value of Axolotl keys that would run code
    (``CODE_KEYS`` set to anything but false/empty, at any depth) or read a path outside the
    repository (any string that is one, at any depth)."""
    stack: list[tuple[Any, tuple]] = [(extra, ())]
    while stack:
        value, parts = stack.pop()
        if isinstance(value, dict):
            for k, v in value.items():
                if k in CODE_KEYS and v not in (None, False, [], {}, ""):
                    yield (*parts, k), f"{k} runs code from outside the release repository"
                else:
                    stack.append((v, (*parts, k)))
        elif isinstance(value, list):
            stack.extend((v, (*parts, i)) for i, v in enumerate(value))
        elif isinstance(value, str):
            why = path_escape(value, root)
            if why:
                yield parts, f"{value!r} {why}"


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
        check_values(data, path=path, node=node)
        validate_against(project_schema(), data, path=path, node=node)
        project = cls(root=root, data=data, node=node)
        project._check_paths()
        project._check_axolotl_keys()
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
        try:
            check_base_model(self.base_model["name"])
        except UserError as e:
            raise self.error(e.message, "base_model", "name", hint=e.hint) from None

    def _check_axolotl_keys(self) -> None:
        """Keys under ``axolotl:`` and ``strategies.<name>.extra:`` get the confinement of the
        rest of the file, unless ``allow_unconfined`` names them."""
        allowed = set(self.allow_unconfined)
        sections = [("axolotl",)] + [("strategies", name, "extra") for name in sorted(self.data.get("strategies") or {})]
        for section in sections:
            extra = self.data
            for key in section:
                extra = (extra or {}).get(key)
            for parts, why in unconfined_values(self.root, extra or {}):
                if parts[0] not in allowed:
                    raise self.error(why, *section, *parts,
                                     hint=f"remove it or keep its paths inside the release repository; to allow "
                                          f"it, add 'allow_unconfined: [{parts[0]}]', which each release records")

    @property
    def allow_unconfined(self) -> list[str]:
        """Axolotl keys the project lets run code or read outside the repository."""
        return list(self.data.get("allow_unconfined") or [])

    def unconfined(self, extra: dict[str, Any]) -> dict[str, Any]:
        """The opted-in keys of a rendered config's ``extra`` keys that need the opt-in, with
        their values: what a registry entry records."""
        allowed = set(self.allow_unconfined)
        keys = {parts[0] for parts, _ in unconfined_values(self.root, extra)}
        return {k: extra[k] for k in sorted(keys & allowed)}

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
