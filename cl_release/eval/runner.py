"""The evaluation runner: load a version's model, generate, score a suite (:mod:`.suite`).

The runner loads a version's base model and LoRA adapter (transformers + PEFT, offline),
applies the chat template the version was trained with and generates greedily in
length-sorted, left-padded batches. Results (:mod:`.results`) are saved as JSON under
``outputs/vX.Y.Z/eval/<suite sha256[:16]>.json`` and reused while suite, settings and
adapter hash match, so an evaluation is computed once per version and suite.

torch, transformers and peft are imported inside functions only.
"""

from __future__ import annotations

import json
import resource
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

from ..errors import EvaluationError, IntegrityError, UserError
from ..files import sha256_file
from ..release.weights import ADAPTER_FILE, adapter_sha256
from .results import CaseResult, EvalResult, compute_metrics
from .suite import Suite, TestCase, load_project_suite, match_output, thaw


# ---------------------------------------------------------------- settings


@dataclass
class EvalSettings:
    """Runner knobs (``evaluation:`` in cl-release.yaml). All but batch_size change results."""

    batch_size: int = 16
    max_new_tokens: int = 48
    pass_k: int = 1  # > 1: also k sampled generations per test for pass@k
    temperature: float = 0.8  # sampling temperature for pass@k only
    seed: int = 0
    judge_url: str | None = None
    judge_model: str | None = None
    device: str = "auto"  # auto | cpu | cuda

    @classmethod
    def from_project(cls, project=None, **overrides) -> "EvalSettings":
        conf = dict((project.data.get("evaluation") or {}) if project is not None else {})
        conf.pop("suites", None)
        if project is not None and "seed" not in conf:
            conf["seed"] = project.seed
        conf.update({k: v for k, v in overrides.items() if v is not None})
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in conf.items() if k in known})

    def fingerprint(self) -> dict[str, Any]:
        """What a cached result must have been computed with to be reused."""
        d = asdict(self)
        d.pop("device")
        if self.pass_k <= 1:
            d.pop("temperature")
        return d


# ---------------------------------------------------------------- generation


def _device(settings: EvalSettings) -> str:
    import torch

    if settings.device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if settings.device == "cuda" and not torch.cuda.is_available():
        raise UserError("evaluation.device is cuda but no GPU is visible", hint="use device: auto or cpu")
    return settings.device


def _resolve_model_path(root: Path, name: str) -> str:
    from ..project import is_local_model

    if is_local_model(root, name):
        return str(root / name)
    if Path(name).is_absolute() and (Path(name) / "config.json").is_file():
        return name
    return name  # a Hub id: resolved from the local cache (offline) by transformers


def warm_up() -> None:
    """Import what ``load_model`` and ``run_suite`` need (torch, transformers, PEFT: seconds).

    The release pipeline calls it in a thread while the training subprocess runs, so the gate
    evaluation after training does not pay for the imports (their chatter goes to the release's
    train.log: ``chatter.Chatter``)."""
    import torch  # noqa: F401
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig  # noqa: F401

    try:
        import peft  # noqa: F401
    except ImportError:  # only needed for adapters; load_model says so when it is missing
        pass


def adapter_tokenizer_dir(root: Path, adapter_dir: str) -> str | None:
    """Where a version's tokenizer (and chat template) lives: the adapter directory or its
    parent when training saved one there (Axolotl does); None: use the base model's."""
    adir = Path(root) / adapter_dir
    if not (adir / "adapter_config.json").is_file():
        raise EvaluationError(
            f"{adapter_dir}: no adapter_config.json",
            hint=f"the adapter directory must hold a PEFT adapter (adapter_config.json + {ADAPTER_FILE})",
        )
    for cand in (adir, adir.parent):
        if (cand / "tokenizer_config.json").is_file():
            return str(cand)
    return None


def load_tokenizer(root: Path, base_path: str, tokenizer_dir: str | None = None, *, revision=None):
    """A tokenizer for batched generation: left padding, a pad token (``tokenizer_dir``: a
    version's own, see :func:`adapter_tokenizer_dir`; default the base model's)."""
    from transformers import AutoTokenizer

    base = _resolve_model_path(Path(root), base_path)
    tok_dir = tokenizer_dir or base
    try:
        tokenizer = AutoTokenizer.from_pretrained(tok_dir, revision=revision if tok_dir == base else None)
    except OSError as e:
        raise EvaluationError(
            f"cannot load the tokenizer of {base_path}: {' '.join(str(e).split())[:300]}",
            hint="a Hub model must be in the local Hugging Face cache (evaluation runs offline)",
        ) from None
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_base_model(root: Path, base_path: str, settings: EvalSettings, *, revision=None):
    """The base model for inference, on the settings' device, in eval mode (no adapter)."""
    import logging

    # Import-time chatter from optional kernels (torchao's CUDA extensions on a CPU build,
    # torch's pytree deprecation notes) is not the user's business on stderr.
    for name in ("torchao", "torch.utils._pytree"):
        logging.getLogger(name).setLevel(logging.ERROR)
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    device = _device(settings)
    base = _resolve_model_path(Path(root), base_path)
    dtype = torch.float32
    if device == "cuda" and torch.cuda.is_bf16_supported():
        dtype = torch.bfloat16
    try:
        model = AutoModelForCausalLM.from_pretrained(base, revision=revision, dtype=dtype)
    except OSError as e:
        raise EvaluationError(
            f"cannot load base model {base_path}: {' '.join(str(e).split())[:300]}",
            hint="a Hub model must be in the local Hugging Face cache (evaluation runs offline)",
        ) from None
    model.to(device)
    model.eval()
    return model


def load_model(root: Path, base_path: str, adapter_dir: str | None, settings: EvalSettings, *, revision=None):
    """(model, tokenizer) for inference: base model + LoRA merged, tokenizer left-padded.

    The tokenizer (and its chat template) comes from the adapter directory or its parent when
    training saved one there (Axolotl does), else from the base model.
    """
    root = Path(root)
    tok_dir = adapter_tokenizer_dir(root, adapter_dir) if adapter_dir is not None else None
    tokenizer = load_tokenizer(root, base_path, tok_dir, revision=revision)
    model = load_base_model(root, base_path, settings, revision=revision)
    if adapter_dir is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(root / adapter_dir))
        model = model.merge_and_unload()
        model.eval()
    return model, tokenizer


def render_prompt(tokenizer, case: TestCase) -> str:
    """The case's prompt through the tokenizer's chat template (plain text without one)."""
    return render_messages(tokenizer, case.messages())


def render_messages(tokenizer, messages: list[dict[str, str]]) -> str:
    """Chat messages as the prompt a version was trained on: its tokenizer's chat template, with
    the assistant turn opened (plain text, one message a line, without a template)."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return "\n".join(m["content"] for m in messages) + "\n"


def stop_token_ids(model, tokenizer) -> list[int]:
    """The token ids that end an answer: the model's and tokenizer's EOS, and ``<|im_end|>``."""
    ids = set()
    for src in (model.generation_config.eos_token_id, tokenizer.eos_token_id):
        if isinstance(src, int):
            ids.add(src)
        elif src:
            ids.update(src)
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>") if "<|im_end|>" in tokenizer.get_vocab() else None
    if im_end is not None:
        ids.add(im_end)
    return sorted(ids)


def generate(
    model,
    tokenizer,
    prompts: Sequence[str],
    *,
    batch_size: int,
    max_new_tokens: int,
    num_samples: int = 0,
    temperature: float = 0.8,
    seed: int = 0,
) -> tuple[list[list[str]], int]:
    """Generate for every prompt, batched and sorted by length; returns (outputs, new tokens).

    ``num_samples == 0``: one greedy output per prompt. Otherwise ``num_samples`` sampled
    outputs per prompt, seeded per batch so a rerun gives the same samples.
    """
    import torch
    from transformers import GenerationConfig

    stop = stop_token_ids(model, tokenizer)
    sample = num_samples > 0
    gen_cfg = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=sample,
        temperature=temperature if sample else None,
        top_p=1.0 if sample else None,
        top_k=0 if sample else None,
        num_return_sequences=num_samples if sample else 1,
        eos_token_id=stop,
        pad_token_id=tokenizer.pad_token_id,
    )
    lengths = [len(ids) for ids in tokenizer(list(prompts), add_special_tokens=False)["input_ids"]]
    order = sorted(range(len(prompts)), key=lambda i: (-lengths[i], i))
    outputs: list[list[str]] = [[] for _ in prompts]
    n_new = 0
    device = next(model.parameters()).device
    stop_set = set(stop)
    with torch.inference_mode():
        for b, start in enumerate(range(0, len(order), batch_size)):
            idx = order[start : start + batch_size]
            enc = tokenizer([prompts[i] for i in idx], return_tensors="pt", padding=True, add_special_tokens=False)
            enc = {k: v.to(device) for k, v in enc.items()}
            if sample:
                torch.manual_seed(seed + b)
            out = model.generate(**enc, generation_config=gen_cfg)
            new = out[:, enc["input_ids"].shape[1] :].tolist()
            per = num_samples if sample else 1
            for j, row in enumerate(new):
                kept = []
                for t in row:  # a finished row is padded after its stop token
                    if t in stop_set:
                        n_new += 1
                        break
                    kept.append(t)
                n_new += len(kept)
                outputs[idx[j // per]].append(tokenizer.decode(kept, skip_special_tokens=True).strip())
    return outputs, n_new


def _peak_memory(device: str) -> tuple[float, str]:
    if device == "cuda":
        import torch

        return round(torch.cuda.max_memory_allocated() / 2**20, 1), "cuda_max_allocated"
    # Linux reports ru_maxrss in KiB: the process's peak resident set, not just this run.
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1), "process_max_rss"


# ---------------------------------------------------------------- judge (optional)


def judge_output(url: str, case: TestCase, output: str, *, model: str | None = None, timeout: float = 60.0) -> dict[str, Any]:
    """Ask an OpenAI-compatible chat endpoint whether ``output`` conveys ``expected``.

    Used only for tests marked ``"judge": true`` and only when ``evaluation.judge_url`` is
    set. Returns {"passed": bool, "verdict": text}.
    """
    prompt = (
        "You grade a model's answer against the expected answer. Reply with PASS if the answer "
        "states the expected facts without contradicting them, otherwise FAIL.\n\n"
        f"Question: {case.messages()[-1]['content']}\nExpected: {thaw(case.expected)}\nAnswer: {output}\n\n"
        "Reply with one word: PASS or FAIL."
    )
    body = {"model": model or "judge", "messages": [{"role": "user", "content": prompt}], "temperature": 0}
    endpoint = url.rstrip("/")
    if not endpoint.endswith("/chat/completions"):
        endpoint += "/chat/completions"
    req = urllib.request.Request(
        endpoint, data=json.dumps(body).encode("utf-8"), headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            reply = json.loads(resp.read().decode("utf-8"))
        verdict = reply["choices"][0]["message"]["content"].strip()
    except (urllib.error.URLError, OSError, ValueError, KeyError, IndexError) as e:
        raise EvaluationError(
            f"the judge at {url} did not answer: {e}", hint="check evaluation.judge_url, or remove it"
        ) from None
    return {"passed": verdict.upper().startswith("PASS"), "verdict": verdict[:200]}


# ---------------------------------------------------------------- running


def run_suite(model, tokenizer, suite: Suite, settings: EvalSettings, *, device: str = "cpu") -> tuple[list[CaseResult], dict]:
    """Generate and score every case with an already-loaded model."""
    if device == "cuda":
        import torch

        torch.cuda.reset_peak_memory_stats()
    prompts = [render_prompt(tokenizer, c) for c in suite.cases]
    t0 = time.perf_counter()
    greedy, n_tokens = generate(
        model, tokenizer, prompts, batch_size=settings.batch_size, max_new_tokens=settings.max_new_tokens
    )
    gen_seconds = time.perf_counter() - t0
    samples: list[list[str]] | None = None
    if settings.pass_k > 1:
        samples, _ = generate(
            model,
            tokenizer,
            prompts,
            batch_size=max(1, settings.batch_size // settings.pass_k),
            max_new_tokens=settings.max_new_tokens,
            num_samples=settings.pass_k,
            temperature=settings.temperature,
            seed=settings.seed,
        )
    results = []
    for i, case in enumerate(suite.cases):
        out = greedy[i][0]
        passed = match_output(case, out)
        verdict = None
        if case.judge and settings.judge_url:
            verdict = judge_output(settings.judge_url, case, out, model=settings.judge_model)
            passed = verdict["passed"]
        results.append(
            CaseResult(
                id=case.id,
                passed=passed,
                output=out,
                criticality=case.criticality,
                domain=case.domain,
                tags=list(case.tags),
                match=case.match,
                expected=thaw(case.expected),
                samples_passed=sum(match_output(case, s) for s in samples[i]) if samples else None,
                judge=verdict,
            )
        )
    peak, kind = _peak_memory(device)
    perf = {
        "device": device,
        "generation_seconds": round(gen_seconds, 3),
        "generated_tokens": n_tokens,
        "tokens_per_second": round(n_tokens / gen_seconds, 1) if gen_seconds > 0 else None,
        "peak_memory_mb": peak,
        "peak_memory_kind": kind,
        "batch_size": settings.batch_size,
    }
    return results, perf


def evaluate_model(
    root: Path,
    base_path: str,
    adapter_dir: str | None,
    suite: Suite,
    settings: EvalSettings | None = None,
    *,
    revision: str | None = None,
    version: str | None = None,
    loaded: "LoadedModel | None" = None,
) -> EvalResult:
    """Evaluate base model + adapter (paths relative to ``root``; ``adapter_dir=None``: base alone).

    Pure: reads the model files, writes nothing. ``loaded``: the same model already loaded (or
    loaded on first use), to run several suites with one load.
    """
    from ..timeutil import registry_now as utcnow

    settings = settings or EvalSettings()
    root = Path(root)
    if loaded is not None:
        model, tokenizer = loaded()
    else:
        model, tokenizer = load_model(root, base_path, adapter_dir, settings, revision=revision)
    device = str(next(model.parameters()).device.type)
    cases, perf = run_suite(model, tokenizer, suite, settings, device=device)
    adapter_sha = None
    if adapter_dir is not None and (root / adapter_dir / ADAPTER_FILE).is_file():
        adapter_sha = adapter_sha256(root / adapter_dir)
    return EvalResult(
        suite_sha256=suite.sha256,
        suite_files=suite.files,
        cases=cases,
        metrics=compute_metrics(cases, settings.pass_k),
        performance=perf,
        settings=settings.fingerprint(),
        model={"base": base_path, "adapter": adapter_dir, "adapter_sha256": adapter_sha},
        version=version,
        created_at=utcnow(),
    )


class LoadedModel:
    """A version's model, loaded on the first call and kept: several suites, one load."""

    def __init__(self, root: Path, entry: dict[str, Any], settings: EvalSettings) -> None:
        self.root, self.settings = Path(root), settings
        self.base, self.adapter, self.revision = entry_model_paths(entry)
        self._loaded = None

    def __call__(self):
        if self._loaded is None:
            self._loaded = load_model(self.root, self.base, self.adapter, self.settings, revision=self.revision)
        return self._loaded


def entry_model_paths(entry: dict[str, Any]) -> tuple[str, str | None, str | None]:
    """(base path, adapter dir, revision) of a registry entry."""
    train_base = entry.get("train_base") or {}
    base_model = entry.get("base_model") or {}
    base = train_base.get("path") or base_model.get("name")
    if not base:
        raise EvaluationError(f"version {entry.get('version')}: the registry entry names no base model")
    revision = base_model.get("revision") if base == base_model.get("name") else None
    adapter = (entry.get("adapter") or {}).get("path")
    if adapter and adapter.endswith(".safetensors"):
        adapter = Path(adapter).parent.as_posix()
    return base, adapter, revision


def results_path(entry: dict[str, Any], suite: Suite) -> str:
    return f"outputs/v{entry['version']}/eval/{suite.sha256[:16]}.json"


def check_adapter(root: Path, entry: dict[str, Any], adapter: str | None) -> str | None:
    """The sha256 of a version's adapter weights, checked against the registry (None: no adapter)."""
    if adapter is None:
        return None
    weights = root / adapter / ADAPTER_FILE
    if not weights.is_file():
        raise EvaluationError(
            f"version {entry['version']}: adapter weights {adapter}/{ADAPTER_FILE} are missing",
            hint="outputs/ is not in git; restore the version's outputs or retrain it",
        )
    actual = sha256_file(weights)
    recorded = (entry.get("adapter") or {}).get("sha256")
    if recorded and recorded != actual:
        raise IntegrityError(
            f"version {entry['version']}: {adapter}/{ADAPTER_FILE} does not match the registry's sha256",
            hint="the adapter was changed after release; restore it before evaluating",
        )
    return actual


def evaluate_entry(
    root: Path, entry: dict[str, Any], suite: Suite, settings: EvalSettings | None = None, *, cache: bool = True,
    loaded: LoadedModel | None = None,
) -> EvalResult:
    """Evaluate a registry entry (or the entry the release pipeline is about to write).

    Results are saved to ``outputs/vX.Y.Z/eval/<suite sha256[:16]>.json`` and reused when the
    suite hash, the result-changing settings and the adapter hash all match. ``loaded``
    (a ``LoadedModel`` of this entry) shares one model load between suites.
    """
    settings = settings or EvalSettings()
    root = Path(root)
    base, adapter, revision = entry_model_paths(entry)
    adapter_sha = check_adapter(root, entry, adapter)
    rel = results_path(entry, suite)
    path = root / rel
    if cache and path.is_file():
        cached = EvalResult.load(path)
        if (
            cached.suite_sha256 == suite.sha256
            and cached.settings == settings.fingerprint()
            and cached.model.get("adapter_sha256") == adapter_sha
            and cached.model.get("base") == base
        ):
            cached.suite_files = suite.files  # the same tests, maybe from other files: record these
            return cached
    result = evaluate_model(root, base, adapter, suite, settings, revision=revision, version=entry["version"],
                            loaded=loaded)
    result.performance["results_path"] = rel
    result.save(path)
    return result


def evaluate_version(root: Path, version: str, *, project=None, suites: Sequence[str] | None = None,
                     cache: bool = True, **overrides: Any) -> tuple[EvalResult, Suite]:
    """``cl-release eval VERSION``: the registry entry of ``version`` on the project's suite
    (``suites``: paths the user gave instead), with the project's settings (``overrides``:
    batch_size, max_new_tokens, pass_k; None keeps the project's). Returns (result, suite)."""
    from ..registry import Registry

    suite = load_project_suite(root, project, suites)
    settings = EvalSettings.from_project(project, **overrides)
    return evaluate_entry(root, Registry(root).get(version), suite, settings, cache=cache), suite


def record_in_registry(root: Path, version: str, result: EvalResult) -> str:
    """Record ``result.summary()`` in the version's registry entry, keyed by its suite.

    ``evaluation`` is the release-time evaluation (the one the gates decided on) and is never
    overwritten by a later run; every later run goes to ``evaluations[<suite sha256>]`` (the
    latest per suite wins), so a version evaluated on a grown suite keeps both figures, each
    with the suite it was measured on. An entry released without an evaluation gets none
    afterwards either: its gates did not see one. Returns the field written. The full results
    stay in ``outputs/vX.Y.Z/eval/`` per suite.
    """
    from ..registry import Registry

    summary = result.summary()
    with Registry(root).transaction() as data:
        entry = Registry.find(data, version)
        entry.setdefault("evaluations", {})[summary["suite_sha256"]] = summary
    return f"evaluations[{summary['suite_sha256'][:16]}]"
