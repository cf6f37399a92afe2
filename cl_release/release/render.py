"""Strategies and rendering: Jinja templates -> Axolotl YAML, checked before any training.

The Jinja environment is sandboxed with ``StrictUndefined``; ``| tojson`` emits YAML-safe
scalars. The rendered text is parsed back with ``yaml.safe_load`` and every key is checked
against the installed Axolotl's config schema, because Axolotl itself silently drops
misspelled keys.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import jinja2
import yaml
from jinja2.sandbox import SandboxedEnvironment

from ..errors import RenderError, UserError
from ..resources import default_templates_dir

# ---------------------------------------------------------------- strategies

STRATEGIES = ("initial", "continued_lora", "merge_and_retrain", "annual_reset", "patch")

# Defaults for every knob; per-strategy values from the team's practice (../shared/PRACTICE.md).
COMMON_KNOBS: dict[str, Any] = {
    "lora_r": 16,
    "lora_alpha": 32,
    "lora_dropout": 0.05,
    "sequence_len": 512,
    "micro_batch_size": 2,
    "gradient_accumulation_steps": 1,
    "optimizer": "adamw_torch",
    "lr_scheduler": "cosine",
    "warmup_ratio": 0.05,
    "weight_decay": 0.0,
    "gradient_checkpointing": True,
    "sample_packing": False,
    "logging_steps": 1,
    "max_steps": None,
    "replay_ratio": 0.0,
    "general_ratio": 0.0,
    "conflicts": "correction",  # cl_release.data.mix: corrections win, then the newest answer
    # Share of a release's new examples kept out of training as held-out checks (the
    # min_new_data_pass_rate gate), at most holdout_max of them; applies to new data
    # (initial, continued_lora), not to corrections or a major's complete data.
    "holdout_ratio": 0.0,
    "holdout_max": 200,
    "extra": {},
}

# continued_lora departs from the team's practice (lr 1e-5, ~20% rehearsal): on the continual
# benchmark a continued LoRA at 1/20 of the fresh-LoRA rate learned no new facts, and at the
# fresh rate it learned them but forgot earlier tasks unless half the mix was replay
# (bench/continual/RESULTS.md, "Defaults"). Same rate as a fresh LoRA, 1 epoch, 50% replay.
STRATEGY_KNOBS: dict[str, dict[str, Any]] = {
    "initial": {"learning_rate": 2e-4, "num_epochs": 3, "holdout_ratio": 0.1},
    "continued_lora": {"learning_rate": 2e-4, "num_epochs": 1, "lora_dropout": 0.1, "replay_ratio": 0.5,
                       "holdout_ratio": 0.1},
    "merge_and_retrain": {"learning_rate": 2e-4, "num_epochs": 3},
    "annual_reset": {"learning_rate": 2e-4, "num_epochs": 3},
    "patch": {"learning_rate": 5e-5, "num_epochs": 2, "lora_dropout": 0.1, "replay_ratio": 0.1},
}

# Which strategies continue the parent's adapter, and which train on the lineage's complete data.
CONTINUES_ADAPTER = {"continued_lora", "patch"}
COMPLETE_DATA = {"merge_and_retrain", "annual_reset"}
DEFAULT_STRATEGY = {"major": "merge_and_retrain", "minor": "continued_lora", "patch": "patch"}
STRATEGY_BUMP = {
    "initial": None,
    "continued_lora": "minor",
    "merge_and_retrain": "major",
    "annual_reset": "major",
    "patch": "patch",
}


def strategy_bump(strategy: str) -> str:
    """The bump a release with ``strategy`` makes. ``initial`` makes the first version (1.0.0)
    from any bump and takes its data as a MINOR does: ``minor``."""
    return STRATEGY_BUMP[check_strategy(strategy)] or "minor"


def check_strategy(strategy: str) -> str:
    if strategy not in STRATEGIES:
        raise UserError(f"unknown strategy {strategy!r}", hint=f"use one of: {', '.join(STRATEGIES)}")
    return strategy


def strategy_knobs(project_data: dict[str, Any], strategy: str) -> dict[str, Any]:
    """Common defaults <- strategy defaults <- project ``lora``/``training``/``mix`` <- ``strategies.<name>``."""
    check_strategy(strategy)
    knobs = {**COMMON_KNOBS, **STRATEGY_KNOBS[strategy]}
    lora = project_data.get("lora") or {}
    for src, dst in (("r", "lora_r"), ("alpha", "lora_alpha"), ("dropout", "lora_dropout")):
        if src in lora:
            knobs[dst] = lora[src]
    for section in (project_data.get("training") or {}, project_data.get("mix") or {},
                    (project_data.get("strategies") or {}).get(strategy) or {}):
        knobs.update({k: v for k, v in section.items() if k != "extra"})
        knobs["extra"] = {**knobs["extra"], **(section.get("extra") or {})}
    if knobs["replay_ratio"] + knobs["general_ratio"] >= 1:
        raise UserError(
            f"strategy {strategy}: replay_ratio + general_ratio must be below 1",
            hint="lower one of them in cl-release.yaml",
        )
    return knobs


# Ranges outside which a knob is almost surely a mistake (a LoRA at lr 500 destroys the model
# and still trains "fine"): plan warns, release refuses unless forced (--force --reason).
SANE_KNOBS: dict[str, tuple[float, float]] = {
    "learning_rate": (1e-7, 5e-3),
    "num_epochs": (1, 50),  # the 1 M-parameter demo model trains 30 epochs; an 8B model 1-3
}


def knob_warnings(strategy: str, knobs: dict[str, Any]) -> list[str]:
    """Knobs outside :data:`SANE_KNOBS` (one line each, naming the knob, the value and the range)."""
    out = []
    for name, (low, high) in SANE_KNOBS.items():
        value = knobs.get(name)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and not low <= value <= high:
            out.append(f"{name} {value:g} is outside {low:g}..{high:g}, the sane range for {strategy}")
    return out


# ---------------------------------------------------------------- hardware


def cuda_available() -> bool:
    """Cheap check (no torch import): an NVIDIA driver is loaded."""
    return os.path.exists("/proc/driver/nvidia/version") or bool(shutil.which("nvidia-smi"))


def hardware(launch: dict[str, Any], *, cuda: bool | None = None) -> dict[str, Any]:
    device = launch.get("device", "auto")
    if cuda is None:
        cuda = cuda_available() if device == "auto" else device == "cuda"
    precision = launch.get("mixed_precision", "auto")
    if precision == "auto":
        precision = "bf16" if cuda else "no"
    if not cuda and precision != "no":
        raise UserError(f"mixed_precision {precision} needs a CUDA GPU", hint="set launch.mixed_precision: no")
    flash = False
    if cuda:
        import importlib.util

        flash = importlib.util.find_spec("flash_attn") is not None
    return {
        "cuda": cuda,
        "bf16": precision == "bf16",
        "fp16": precision == "fp16",
        "tf32": bool(cuda),
        "flash_attention": flash,
        "sdp_attention": cuda and not flash,
        # Axolotl's fused LoRA kernels need CUDA (on CPU: "Torch not compiled with CUDA").
        "lora_kernels": bool(cuda),
        "mixed_precision": precision,
    }


# ---------------------------------------------------------------- YAML-safe scalars


def _yaml_string(s: str) -> str:
    out = ['"']
    for ch in s:
        o = ord(ch)
        if ch == '"':
            out.append('\\"')
        elif ch == "\\":
            out.append("\\\\")
        elif ch == "\n":
            out.append("\\n")
        elif ch == "\t":
            out.append("\\t")
        elif ch == "\r":
            out.append("\\r")
        elif o < 0x20 or 0x7F <= o <= 0x9F or 0xD800 <= o <= 0xDFFF or o in (0xFEFF, 0xFFFE, 0xFFFF, 0x2028, 0x2029):
            out.append(f"\\u{o:04x}" if o <= 0xFFFF else f"\\U{o:08x}")
        else:
            out.append(ch)
    out.append('"')
    return "".join(out)


def to_yaml_scalar(value: Any) -> str:
    """A YAML 1.1 flow representation that ``yaml.safe_load`` reads back as exactly ``value``."""
    if isinstance(value, jinja2.Undefined):  # `{{ x.missing | tojson }}`: name the variable
        str(value)  # StrictUndefined raises UndefinedError, naming the variable
        raise jinja2.UndefinedError(f"undefined value: {value!r}")
    if value is None:
        return "null"
    if value is True:
        return "true"
    if value is False:
        return "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise RenderError(f"cannot render non-finite number {value!r}")
        text = repr(value)
        if "e" in text or "E" in text:
            mantissa, exp = text.lower().split("e")
            if "." not in mantissa:
                mantissa += ".0"
            sign = "-" if exp.startswith("-") else "+"
            text = f"{mantissa}e{sign}{exp.lstrip('+-')}"
        elif "." not in text:
            text += ".0"
        return text
    if isinstance(value, str):
        return _yaml_string(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(to_yaml_scalar(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{_yaml_string(str(k))}: {to_yaml_scalar(v)}" for k, v in value.items()) + "}"
    raise RenderError(f"cannot render a value of type {type(value).__name__}")


# ---------------------------------------------------------------- environment


def template_dirs(root: Path | None) -> list[Path]:
    """User templates (``<repo>/templates``) first, packaged defaults last."""
    dirs = []
    if root is not None and (root / "templates").is_dir():
        dirs.append(root / "templates")
    dirs.append(default_templates_dir())
    return dirs


# Bounds of one render, so a template's runaway loop or huge value is an error at once
# instead of minutes and gigabytes: range() items over the whole render (nested loops
# included), the size of a string or list made with * or **, and the rendered text.
MAX_TEMPLATE_RANGE = 100_000
MAX_TEMPLATE_VALUE = 1 << 20
MAX_TEMPLATE_OUTPUT = 16 << 20


class BoundedSandbox(SandboxedEnvironment):
    """Jinja's sandbox (no file, attribute or Python access) with the bounds above."""

    intercepted_binops = frozenset({"*", "**"})

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.range_left = MAX_TEMPLATE_RANGE
        self.globals["range"] = self._range

    def _range(self, *args: Any) -> range:
        try:
            r = range(*args)
            n = len(r)
        except OverflowError:
            n = None
        if n is None or n > self.range_left:
            shown = ", ".join(map(repr, args))
            raise jinja2.exceptions.SecurityError(
                f"range({shown}) goes over the limit of {MAX_TEMPLATE_RANGE:,} range() items per render")
        self.range_left -= n
        return r

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        def size(value: Any) -> int | None:
            return len(value) if isinstance(value, (str, list, tuple)) else None

        if operator == "*":
            for seq, times in ((left, right), (right, left)):
                n = size(seq)
                if n is not None and isinstance(times, int) and n * times > MAX_TEMPLATE_VALUE:
                    raise jinja2.exceptions.SecurityError(
                        f"a value of {n:,} x {times:,} items goes over the limit of {MAX_TEMPLATE_VALUE:,}")
        elif operator == "**" and isinstance(left, int) and isinstance(right, int):
            if right > 0 and abs(left) > 1 and right * abs(left).bit_length() > 4096:
                raise jinja2.exceptions.SecurityError(f"{left} ** {right} is over 4,096 bits")
        return super().call_binop(context, operator, left, right)


def make_environment(root: Path | None) -> BoundedSandbox:
    env = BoundedSandbox(
        loader=jinja2.ChoiceLoader([jinja2.FileSystemLoader(str(d)) for d in template_dirs(root)]),
        undefined=jinja2.StrictUndefined,
        autoescape=False,
        keep_trailing_newline=True,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["tojson"] = to_yaml_scalar
    return env


def _template_line(root: Path | None, exc: BaseException, default: str) -> str:
    """``file:line`` of the template frame an error was raised in (Jinja rewrites tracebacks
    so that template frames carry the template's file name and line), else ``default``."""
    import traceback

    where = default
    for frame in traceback.extract_tb(exc.__traceback__):
        if frame.filename.endswith(".j2"):
            shown = frame.filename
            if root is not None:
                try:
                    shown = Path(shown).resolve().relative_to(Path(root).resolve()).as_posix()
                except ValueError:
                    pass
            where = f"{shown}:{frame.lineno}"
    return where


def render_text(root: Path | None, strategy: str, context: dict[str, Any]) -> str:
    check_strategy(strategy)
    env = make_environment(root)
    name = f"{strategy}.yml.j2"
    try:
        template = env.get_template(name)
        chunks, size = [], 0
        for chunk in template.generate(**context):
            size += len(chunk)
            if size > MAX_TEMPLATE_OUTPUT:
                raise jinja2.exceptions.SecurityError(
                    f"the rendered config goes over {MAX_TEMPLATE_OUTPUT >> 20} MiB")
            chunks.append(chunk)
        text = "".join(chunks)
        return text if text.endswith("\n") else text + "\n"
    except jinja2.TemplateNotFound as e:
        raise RenderError(f"template {e.name} not found in {', '.join(map(str, template_dirs(root)))}") from None
    except jinja2.TemplateSyntaxError as e:
        raise RenderError(f"{e.filename or name}:{e.lineno}: template syntax error: {e.message}") from None
    except jinja2.UndefinedError as e:
        raise RenderError(f"templates/{name}: undefined variable: {e.message}",
                          hint="templates may only use the variables listed in templates/_base.yml.j2") from None
    except jinja2.exceptions.SecurityError as e:
        where = _template_line(root, e, f"templates/{name}")
        raise RenderError(f"{where}: unsafe template operation refused: {e}") from None
    except RenderError:
        raise
    except Exception as e:  # noqa: BLE001 - a template's own runtime error (1/0, a bad call): name its line
        where = _template_line(root, e, f"templates/{name}")
        raise RenderError(f"{where}: template error: {type(e).__name__}: {e}") from None


# ---------------------------------------------------------------- Axolotl schema check

_KEYS_SNAPSHOT = Path(__file__).with_name("schemas") / "axolotl_keys.json"


@lru_cache(maxsize=1)
def axolotl_keys() -> dict[str, Any]:
    """Known top-level and dataset-entry keys of the installed Axolotl's config schema.

    Read from Axolotl's pydantic models when Axolotl is installed (cached on disk per
    version, since importing Axolotl takes seconds); otherwise from the snapshot shipped with
    cl-release (taken from Axolotl 0.19.0).
    """
    try:
        from importlib.metadata import PackageNotFoundError, version

        ax_version = version("axolotl")
    except PackageNotFoundError:
        ax_version = None
    if ax_version is None:
        snap = json.loads(_KEYS_SNAPSHOT.read_text())
        return {**snap, "source": f"snapshot of axolotl {snap['axolotl']} (axolotl not installed)"}
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "cl-release" / f"axolotl-keys-{ax_version}.json"
    if cache.is_file():
        try:
            return {**json.loads(cache.read_text()), "source": f"axolotl {ax_version}"}
        except (OSError, json.JSONDecodeError):
            pass
    keys = extract_axolotl_keys()
    from ..files import atomic_write_json

    try:
        atomic_write_json(cache, keys)
    except OSError:
        pass
    return {**keys, "source": f"axolotl {ax_version}"}


def extract_axolotl_keys() -> dict[str, Any]:
    """Introspect Axolotl's pydantic config models (slow: imports axolotl)."""
    from importlib.metadata import version

    from axolotl.utils.schemas import config as ax_config  # type: ignore
    from axolotl.utils.schemas import datasets as ax_datasets  # type: ignore

    def names(model) -> set[str]:
        out = set()
        for name, f in model.model_fields.items():
            out.add(name)
            if f.alias:
                out.add(f.alias)
            if getattr(f, "validation_alias", None) and isinstance(f.validation_alias, str):
                out.add(f.validation_alias)
        return out

    top = names(ax_config.AxolotlInputConfig)
    ds = set()
    for cls_name in ("SFTDataset", "DPODataset", "KTODataset", "PretrainingDataset", "StepwiseSupervisedDataset"):
        model = getattr(ax_datasets, cls_name, None)
        if model is not None:
            ds |= names(model)
    return {"axolotl": version("axolotl"), "top": sorted(top), "dataset": sorted(ds)}


def check_config(config: Any, *, where: str, keys: dict[str, Any] | None = None) -> None:
    """Parsed config must be a mapping whose keys Axolotl knows; raise RenderError otherwise."""
    import difflib

    if not isinstance(config, dict):
        raise RenderError(f"{where}: the rendered config is not a mapping")
    keys = keys or axolotl_keys()
    top = set(keys["top"])
    for key in config:
        if not isinstance(key, str) or key not in top:
            close = difflib.get_close_matches(str(key), top, n=1)
            hint = f"did you mean {close[0]!r}?" if close else "remove it or check Axolotl's config reference"
            raise RenderError(f"{where}: {key}: not an Axolotl config key ({keys['source']})", hint=hint)
    ds_keys = set(keys["dataset"])
    for i, ds in enumerate(config.get("datasets") or []):
        if not isinstance(ds, dict):
            raise RenderError(f"{where}: datasets[{i}]: must be a mapping")
        for key in ds:
            if key not in ds_keys:
                close = difflib.get_close_matches(str(key), ds_keys, n=1)
                hint = f"did you mean {close[0]!r}?" if close else None
                raise RenderError(f"{where}: datasets[{i}].{key}: not an Axolotl dataset key", hint=hint)


@dataclass
class Rendered:
    strategy: str
    text: str
    config: dict[str, Any]


def render_config(root: Path | None, strategy: str, context: dict[str, Any], *, where: str | None = None) -> Rendered:
    """Render, parse back, check keys and that the values are exactly what was inserted."""
    where = where or f"templates/{strategy}.yml.j2"
    text = render_text(root, strategy, context)
    try:
        from ..project import safe_load_strict

        config = safe_load_strict(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f" line {mark.line + 1}" if mark else ""
        problem = str(getattr(e, "problem", e))
        hint = ("a key under axolotl:/extra: repeats one the template sets; use the matching knob "
                "(training:, strategies:) instead" if "duplicate key" in problem
                else "check the template's YAML structure; values must go through | tojson")
        raise RenderError(f"rendered config{line} (from {where}): invalid YAML: {problem}", hint=hint) from None
    check_config(config, where=where)
    expected = [d["path"] for d in context["datasets"]]
    got = [d.get("path") for d in config.get("datasets") or []]
    if got != expected:
        raise RenderError(f"{where}: rendered datasets {got} differ from the planned {expected}")
    return Rendered(strategy=strategy, text=text, config=config)
