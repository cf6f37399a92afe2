"""Regression suites and the evaluation runner.

A suite is a JSONL file of test cases (default ``registry/regression_tests.jsonl``)::

    {"id": "idlh-ammonia", "input": "What is the IDLH of ammonia?", "expected": "300 ppm",
     "match": "contains", "criticality": "critical", "domain": "idlh", "tags": ["hallucination"]}

``input`` is a user prompt or a list of chat messages; ``expected`` is a string, or for
``contains``/``not_contains`` a list of key facts (all must appear / none may appear), or for
``json_equal`` any JSON value. The runner loads a version's base model and LoRA adapter
(transformers + PEFT, offline), applies the chat template the version was trained with and
generates greedily in length-sorted, left-padded batches. Results are saved as JSON under
``outputs/vX.Y.Z/eval/<suite sha256[:16]>.json`` and reused while suite, settings and
adapter hash match, so an evaluation is computed once per version and suite.

torch, transformers and peft are imported inside functions only.
"""

from __future__ import annotations

import hashlib
import json
import re
import resource
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

from ..data.formats import MAX_NESTING, ROLES, canonical_json, check_example_size, iter_jsonl, nesting_depth
from ..errors import ClReleaseError, DataError, IntegrityError, UserError
from ..files import atomic_write_bytes, atomic_write_json, locked, sha256_file

DEFAULT_SUITE = "registry/regression_tests.jsonl"
MATCH_TYPES = ("contains", "exact", "regex", "not_contains", "json_equal")
CRITICALITIES = ("critical", "high", "medium", "low")  # most severe first
CRITICALITY_RANK = {c: i for i, c in enumerate(CRITICALITIES)}
HALLUCINATION_TAG = "hallucination"
RESULT_FORMAT = 1
_FIELDS = {"id", "input", "expected", "match", "criticality", "domain", "tags", "judge", "notes", "source", "metadata"}


class EvaluationError(ClReleaseError):
    """A model could not be loaded or evaluated."""


# ---------------------------------------------------------------- test cases and suites


@dataclass(frozen=True)
class TestCase:
    """One regression test. ``input`` is a prompt string or a tuple of chat messages."""

    __test__ = False  # not a pytest class

    id: str
    input: Any
    expected: Any
    match: str = "contains"
    criticality: str = "medium"
    domain: str = "general"
    tags: tuple[str, ...] = ()
    judge: bool = False
    notes: str | None = None
    source: str | None = None
    metadata: Any = field(default=None, hash=False, compare=False)

    def messages(self) -> list[dict[str, str]]:
        if isinstance(self.input, str):
            return [{"role": "user", "content": self.input}]
        return [dict(m) for m in self.input]

    def to_dict(self) -> dict[str, Any]:
        d = {
            "id": self.id,
            "input": self.input if isinstance(self.input, str) else [dict(m) for m in self.input],
            "expected": self.expected,
            "match": self.match,
            "criticality": self.criticality,
            "domain": self.domain,
            "tags": list(self.tags),
        }
        for key in ("judge", "notes", "source", "metadata"):
            value = getattr(self, key)
            if value:
                d[key] = value
        return d

    @property
    def rank(self) -> int:
        return CRITICALITY_RANK[self.criticality]


def parse_case(obj: Any, *, path: str, line: int | None = None) -> TestCase:
    """Check one suite row; every problem is a DataError naming file, line and field."""

    def fail(message: str, fld: str | None = None):
        raise DataError(path, message, line=line, field=fld)

    if not isinstance(obj, dict):
        fail(f"expected a JSON object, got {type(obj).__name__}")
    unknown = sorted(set(obj) - _FIELDS)
    if unknown:
        fail(f"unknown key(s) {', '.join(unknown)} (allowed: {', '.join(sorted(_FIELDS))})", unknown[0])
    tid = obj.get("id")
    if not isinstance(tid, str) or not tid.strip() or not tid.isprintable():
        fail("missing, or not a non-empty one-line string", "id")
    raw_input = obj.get("input")
    if isinstance(raw_input, str):
        if not raw_input.strip():
            fail("empty prompt", "input")
        inp: Any = raw_input
    elif isinstance(raw_input, list) and raw_input:
        for i, m in enumerate(raw_input):
            if not isinstance(m, dict) or not isinstance(m.get("content"), str):
                fail("each message needs a role and a string content", f"input[{i}]")
            if m.get("role") not in ROLES:
                fail(f"unknown role {m.get('role')!r} (use {', '.join(sorted(ROLES))})", f"input[{i}].role")
        if raw_input[-1]["role"] == "assistant":
            fail("the last message is the assistant's; the model must answer it", f"input[{len(raw_input) - 1}]")
        inp = tuple(_FrozenMessage(role=m["role"], content=m["content"]) for m in raw_input)
    else:
        fail("must be a prompt string or a non-empty list of chat messages", "input")
    match = obj.get("match", "contains")
    if match not in MATCH_TYPES:
        fail(f"unknown match {match!r} (use {', '.join(MATCH_TYPES)})", "match")
    if "expected" not in obj:
        fail("missing field", "expected")
    expected = obj["expected"]
    if match in ("contains", "not_contains"):
        items = expected if isinstance(expected, list) else [expected]
        if not items or not all(isinstance(x, str) and x.strip() for x in items):
            fail(f"{match} needs a non-empty string or a list of non-empty strings", "expected")
        if isinstance(expected, list):
            expected = tuple(expected)
    elif match in ("exact", "regex"):
        # exact: a string, or a list of accepted answers; regex: a pattern, or a list that must all match
        items = expected if isinstance(expected, list) else [expected]
        if not items or not all(isinstance(x, str) and x for x in items):
            fail(f"{match} needs a string or a list of strings", "expected")
        if match == "regex":
            for x in items:
                try:
                    re.compile(x)
                except re.error as e:
                    fail(f"invalid regular expression {x!r}: {e}", "expected")
    else:  # json_equal: any JSON value; a string is JSON text
        if isinstance(expected, str):
            try:
                if nesting_depth(json.loads(expected)) > MAX_NESTING:
                    fail(f"JSON text nested deeper than {MAX_NESTING} levels", "expected")
            except json.JSONDecodeError as e:
                fail(f"json_equal with a string expects JSON text: {e.msg}", "expected")
            except RecursionError:
                fail(f"JSON text nested deeper than {MAX_NESTING} levels", "expected")
    criticality = obj.get("criticality", "medium")
    if criticality not in CRITICALITIES:
        fail(f"unknown criticality {criticality!r} (use {', '.join(CRITICALITIES)})", "criticality")
    domain = obj.get("domain", "general")
    if not isinstance(domain, str) or not domain.strip():
        fail("must be a non-empty string", "domain")
    tags = obj.get("tags", [])
    if not isinstance(tags, list) or not all(isinstance(t, str) and t for t in tags):
        fail("must be a list of strings", "tags")
    judge = obj.get("judge", False)
    if not isinstance(judge, bool):
        fail("must be true or false", "judge")
    for key in ("notes", "source"):
        if key in obj and not isinstance(obj[key], str):
            fail("must be a string", key)
    if "metadata" in obj and not isinstance(obj["metadata"], dict):
        fail("must be an object", "metadata")
    for key in ("expected", "metadata"):
        if nesting_depth(obj.get(key)) > MAX_NESTING:
            fail(f"nested deeper than {MAX_NESTING} levels", key)
    return TestCase(
        id=tid,
        input=inp,
        expected=_freeze(expected),
        match=match,
        criticality=criticality,
        domain=domain,
        tags=tuple(tags),
        judge=judge,
        notes=obj.get("notes"),
        source=obj.get("source"),
        metadata=obj.get("metadata"),
    )


class _FrozenMessage(dict):
    """A hashable chat message, so TestCase stays frozen and hashable."""

    def __hash__(self):  # type: ignore[override]
        return hash((self.get("role"), self.get("content")))


def _freeze(value: Any) -> Any:
    if isinstance(value, list):
        return tuple(_freeze(v) for v in value)
    return value


def _thaw(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_thaw(v) for v in value]
    if isinstance(value, dict):
        return {k: _thaw(v) for k, v in value.items()}
    return value


@dataclass
class Suite:
    """Test cases from one or more suite files, with a content hash that keys cached results."""

    cases: list[TestCase]
    files: list[dict[str, str]] = field(default_factory=list)  # [{path, sha256}]

    def __post_init__(self) -> None:
        self._sha = None

    def __len__(self) -> int:
        return len(self.cases)

    @property
    def sha256(self) -> str:
        """Hash of the cases' canonical JSON in id order: formatting and order do not matter."""
        if self._sha is None:
            rows = sorted((canonical_json(_case_key(c)) for c in self.cases))
            self._sha = hashlib.sha256("\n".join(rows).encode("utf-8")).hexdigest()
        return self._sha

    def by_id(self) -> dict[str, TestCase]:
        return {c.id: c for c in self.cases}


def _case_key(case: TestCase) -> dict[str, Any]:
    d = _thaw(case.to_dict())
    for key in ("notes", "source", "metadata"):
        d.pop(key, None)
    return d


def suite_rows(path: Path, *, display: str | None = None, max_chars: int | None = None) -> list[TestCase]:
    """The test cases of one suite file; ``max_chars``: the per-example size limit
    (``datasets.max_example_chars``), applied to each test's prompt."""
    shown = display or str(path)
    cases, seen = [], {}
    for line, obj in iter_jsonl(Path(path), display=shown):
        case = parse_case(obj, path=shown, line=line)
        if max_chars is not None:
            check_example_size({"input": obj["input"]}, max_chars, path=shown, line=line)
        if case.id in seen:
            raise DataError(shown, f"test id {case.id!r} already used on line {seen[case.id]}", line=line, field="id")
        seen[case.id] = line
        cases.append(case)
    return cases


def validate_suite_file(path: str | Path) -> int:
    """Check every row of a suite file; return the number of tests (``data validate --format suite``)."""
    return len(suite_rows(Path(path)))


def load_suite(paths: Sequence[str | Path] | str | Path, *, root: Path | None = None,
               max_chars: int | None = None) -> Suite:
    """Load and validate one or more suite files (relative to ``root`` when given).

    Test ids must be unique across all files. An empty suite is a UserError. Each file's
    SHA-256 is kept in ``Suite.files``; ``max_chars`` bounds each test's prompt.
    """
    if isinstance(paths, (str, Path)):
        paths = [paths]
    cases: list[TestCase] = []
    files = []
    where: dict[str, str] = {}
    for p in paths:
        full = (Path(root) / p) if root is not None else Path(p)
        shown = str(p)
        if not full.is_file():
            raise DataError(shown, "regression suite not found", hint=(
                "add tests with 'cl-release eval add' or 'cl-release eval import FILE', or list your "
                "suites under evaluation.suites in cl-release.yaml"))
        for case in suite_rows(full, display=shown, max_chars=max_chars):
            if case.id in where:
                raise DataError(shown, f"test id {case.id!r} is also in {where[case.id]}", field="id")
            where[case.id] = shown
            cases.append(case)
        files.append({"path": Path(p).as_posix(), "sha256": sha256_file(full)})
    if not cases:
        raise UserError(
            f"the regression suite {', '.join(str(p) for p in paths)} has no tests",
            hint="add tests with 'cl-release eval add' or 'cl-release eval import FILE'",
        )
    return Suite(cases=cases, files=files)


def suite_paths(project=None, override: Sequence[str] | None = None) -> list[str]:
    """The suite files to use: ``--suite`` options, else ``evaluation.suites``, else the default."""
    if override:
        return list(override)
    if project is not None:
        suites = (project.data.get("evaluation") or {}).get("suites")
        if suites:
            return list(suites)
    return [DEFAULT_SUITE]


def load_project_suite(root: Path, project=None, override: Sequence[str] | None = None) -> Suite:
    """The suite to evaluate on. ``override``: paths the user typed (``--suite``), taken as
    given: absolute, or relative to ``root``, ``..`` included. Paths from the project file
    (``evaluation.suites``) or the default must stay inside the repository."""
    from ..data.formats import max_example_chars
    from ..errors import UserError
    from ..project import safe_relpath

    rels = suite_paths(project, override)
    if not override:
        for i, rel in enumerate(rels):
            try:
                safe_relpath(Path(root), rel, what="suite path")
            except UserError as e:
                if project is not None and (project.data.get("evaluation") or {}).get("suites"):
                    raise project.error(e.message, "evaluation", "suites", i, hint=e.hint) from None
                raise
    return load_suite(rels, root=Path(root), max_chars=max_example_chars(project.data if project is not None else None))


# ---------------------------------------------------------------- adding tests


def case_id_for(inp: Any, expected: Any) -> str:
    key = canonical_json({"input": _thaw(inp), "expected": _thaw(expected)})
    return "t-" + hashlib.sha256(key.encode("utf-8")).hexdigest()[:12]


def append_cases(root: Path, suite_rel: str, rows: Iterable[dict[str, Any]]) -> tuple[list[str], list[str]]:
    """Validate rows and append the new ones to a suite file under a lock (atomic replace).

    Returns (added ids, skipped ids). A row whose id is already in the file is skipped when
    its content is identical, and refused when it differs (ids are the tests' identity).
    """
    from ..project import safe_relpath

    root = Path(root)
    path = safe_relpath(root, suite_rel, what="suite path")
    with locked(root / ".cl-release" / "suite.lock", what="the regression suite"):
        existing = {c.id: c for c in suite_rows(path, display=suite_rel)} if path.exists() else {}
        added, skipped, lines = [], [], []
        for n, row in enumerate(rows, start=1):
            case = parse_case(row, path=f"new test #{n}")
            old = existing.get(case.id)
            if old is not None:
                if _case_key(old) != _case_key(case):
                    raise UserError(
                        f"test id {case.id!r} is already in {suite_rel} with different content",
                        hint="choose another --id, or edit the suite file",
                    )
                skipped.append(case.id)
                continue
            existing[case.id] = case
            added.append(case.id)
            lines.append(json.dumps(_thaw(case.to_dict()), ensure_ascii=False) + "\n")
        if lines:
            data = path.read_bytes() if path.exists() else b""
            if data and not data.endswith(b"\n"):
                data += b"\n"
            atomic_write_bytes(path, data + "".join(lines).encode("utf-8"))
    return added, skipped


def rows_from_file(path: Path, *, defaults: dict[str, Any]) -> list[dict[str, Any]]:
    """Rows to import: suite rows as they are, or training rows (messages/alpaca) turned into tests.

    A training row's last assistant turn becomes ``expected``; the turns before it the input.
    ``defaults`` (match, criticality, domain, tags) fill what the row does not say.
    """
    out = []
    for line, obj in iter_jsonl(path):
        if not isinstance(obj, dict):
            raise DataError(path, "expected a JSON object", line=line)
        if "expected" in obj:
            row = {**{k: v for k, v in defaults.items() if k != "tags"}, **obj}
            row["tags"] = sorted(set(obj.get("tags", [])) | set(defaults.get("tags", [])))
        elif isinstance(obj.get("messages"), list) and obj["messages"]:
            msgs = obj["messages"]
            last = msgs[-1]
            if not isinstance(last, dict) or last.get("role") != "assistant":
                raise DataError(path, "the last message must be the assistant's answer", line=line, field="messages")
            inp = msgs[:-1]
            if len(inp) == 1 and inp[0].get("role") == "user":
                inp = inp[0].get("content")
            row = {**defaults, "input": inp, "expected": last.get("content")}
        elif isinstance(obj.get("instruction"), str) and isinstance(obj.get("output"), str):
            prompt = obj["instruction"]
            if isinstance(obj.get("input"), str) and obj["input"].strip():
                prompt = f"{prompt}\n\n{obj['input']}"
            row = {**defaults, "input": prompt, "expected": obj["output"]}
        else:
            raise DataError(path, "not a suite row (expected), a messages row or an alpaca row", line=line)
        row.setdefault("id", case_id_for(row.get("input"), row.get("expected")))
        parse_case(row, path=str(path), line=line)  # name the source line on errors
        out.append(row)
    return out


def row_from_feedback(record: dict[str, Any], *, defaults: dict[str, Any]) -> dict[str, Any]:
    """A suite row from a production feedback record (the corrected answer wins over the output).

    ``record`` needs ``input`` (prompt or messages) and ``correction`` or ``output``; its ``id``
    becomes part of the test id and ``source`` so the test's provenance is kept.
    """
    inp = record.get("input")
    if isinstance(inp, list) and len(inp) == 1 and inp[0].get("role") == "user":
        inp = inp[0].get("content")
    answer = record.get("correction") or record.get("output")
    if not inp or not isinstance(answer, str) or not answer.strip():
        raise UserError(
            f"feedback {record.get('id')} has no prompt and answer to turn into a test",
            hint="promote a record with an input and an output or a correction",
        )
    row = {**defaults, "input": inp, "expected": defaults.get("expected") or answer.strip()}
    row.setdefault("id", f"fb-{record.get('id')}")
    row["source"] = f"feedback:{record.get('id')}"
    return row


def check_case(record: dict[str, Any], *, domain: str) -> TestCase | None:
    """A test built from one training example: its turns before the last answer are the prompt,
    and the answer (without its final punctuation) must appear in the model's answer (``contains``,
    case and whitespace folded). None for a text row or a chat row without a final answer.

    This is how the release gate checks that a candidate learned its new data: on held-out
    examples (paraphrases of facts it trained on) and, for a patch, on the corrections."""
    msgs = record.get("messages")
    if not msgs or msgs[-1].get("role") != "assistant" or len(msgs) < 2 or msgs[-2].get("role") == "assistant":
        return None
    answer = msgs[-1]["content"].strip().rstrip(".!;").strip() or msgs[-1]["content"].strip()
    if not answer:
        return None
    prompt = msgs[:-1]
    inp: Any = prompt[0]["content"] if len(prompt) == 1 and prompt[0]["role"] == "user" else tuple(
        _FrozenMessage(role=m["role"], content=m["content"]) for m in prompt)
    digest = hashlib.sha256(canonical_json(record).encode("utf-8")).hexdigest()
    return TestCase(id=f"{domain}-{digest[:12]}", input=inp, expected=answer, match="contains",
                    criticality="medium", domain=domain, tags=(domain,))


def checks_suite(records: Iterable[dict[str, Any]], *, domain: str) -> Suite | None:
    """A suite of ``check_case`` tests (duplicates dropped); None when no record gives a test."""
    cases, seen = [], set()
    for r in records:
        case = check_case(r, domain=domain)
        if case is not None and case.id not in seen:
            seen.add(case.id)
            cases.append(case)
    return Suite(cases=cases) if cases else None


# ---------------------------------------------------------------- matching


def _norm(text: str) -> str:
    return " ".join(text.split()).casefold()


def _json_of(text: str) -> Any:
    t = text.strip()
    fence = re.match(r"^```(?:json)?\s*(.*?)\s*```$", t, re.S)
    if fence:
        t = fence.group(1)
    return json.loads(t)


def match_output(case: TestCase, output: str) -> bool:
    """Does ``output`` pass ``case``? contains/not_contains fold case and whitespace.

    An empty or whitespace-only answer fails every test, whatever its match type: a destroyed
    model that answers nothing must not pass the ``not_contains`` tests (or an exact "")."""
    if not output or output.isspace():
        return False
    m = case.match
    if m in ("contains", "not_contains"):
        facts = case.expected if isinstance(case.expected, tuple) else (case.expected,)
        out = _norm(output)
        hits = [_norm(f) in out for f in facts]
        return all(hits) if m == "contains" else not any(hits)
    if m == "exact":
        accepted = case.expected if isinstance(case.expected, tuple) else (case.expected,)
        return any(output.strip() == a.strip() for a in accepted)
    if m == "regex":
        patterns = case.expected if isinstance(case.expected, tuple) else (case.expected,)
        return all(re.search(p, output) is not None for p in patterns)
    if m == "json_equal":
        want = json.loads(case.expected) if isinstance(case.expected, str) else _thaw(case.expected)
        try:
            return _json_of(output) == want
        except (json.JSONDecodeError, ValueError, RecursionError):  # a model's answer: any text
            return False
    raise ValueError(f"unknown match type {m!r}")


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


# ---------------------------------------------------------------- results


@dataclass
class CaseResult:
    id: str
    passed: bool
    output: str
    criticality: str
    domain: str
    tags: list[str]
    match: str
    expected: Any
    samples_passed: int | None = None  # of pass_k sampled generations
    judge: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["expected"] = _thaw(self.expected)
        return {k: v for k, v in d.items() if v is not None}


def compute_metrics(cases: Sequence[CaseResult], pass_k: int = 1) -> dict[str, Any]:
    """Pass rates overall, per domain and per criticality; hallucination rate; pass@k."""
    n = len(cases)

    def rate(rows) -> dict[str, Any]:
        rows = list(rows)
        passed = sum(r.passed for r in rows)
        return {"n": len(rows), "passed": passed, "pass_rate": round(passed / len(rows), 6) if rows else None}

    per_domain = {d: rate(r for r in cases if r.domain == d) for d in sorted({r.domain for r in cases})}
    per_crit = {c: rate(r for r in cases if r.criticality == c) for c in CRITICALITIES if any(r.criticality == c for r in cases)}
    hall = [r for r in cases if HALLUCINATION_TAG in r.tags]
    metrics: dict[str, Any] = {
        "n_tests": n,
        "passed": sum(r.passed for r in cases),
        "pass_rate": round(sum(r.passed for r in cases) / n, 6) if n else None,
        "per_domain": per_domain,
        "per_criticality": per_crit,
        "hallucination_tests": len(hall),
        "hallucination_rate": round(sum(not r.passed for r in hall) / len(hall), 6) if hall else None,
        "pass_at_k": None,
    }
    if pass_k > 1:
        hit = sum(1 for r in cases if (r.samples_passed or 0) > 0)
        metrics["pass_at_k"] = {"k": pass_k, "rate": round(hit / n, 6) if n else None}
    return metrics


@dataclass
class EvalResult:
    """The outcome of one model on one suite; saved as JSON, summarized into the registry."""

    suite_sha256: str
    cases: list[CaseResult]
    metrics: dict[str, Any]
    performance: dict[str, Any]
    settings: dict[str, Any]
    model: dict[str, Any]  # {base, adapter, adapter_sha256}
    version: str | None = None
    created_at: str | None = None
    suite_files: list[dict[str, str]] = field(default_factory=list)

    def by_id(self) -> dict[str, CaseResult]:
        return {c.id: c for c in self.cases}

    @property
    def pass_rate(self) -> float | None:
        return self.metrics.get("pass_rate")

    @property
    def hallucination_rate(self) -> float | None:
        return self.metrics.get("hallucination_rate")

    def summary(self) -> dict[str, Any]:
        """Small enough for the registry entry's ``evaluation`` field."""
        m = self.metrics
        return {
            "suite_sha256": self.suite_sha256,
            "suites": [f["path"] for f in self.suite_files],
            "suite_files": self.suite_files,
            "n_tests": m["n_tests"],
            "passed": m["passed"],
            "pass_rate": m["pass_rate"],
            "per_domain": {d: v["pass_rate"] for d, v in m["per_domain"].items()},
            "per_criticality": {c: v["pass_rate"] for c, v in m["per_criticality"].items()},
            "hallucination_rate": m["hallucination_rate"],
            "pass_at_k": m.get("pass_at_k"),
            "tokens_per_second": self.performance.get("tokens_per_second"),
            "peak_memory_mb": self.performance.get("peak_memory_mb"),
            "peak_memory_kind": self.performance.get("peak_memory_kind"),
            "results": self.performance.get("results_path"),
            "evaluated_at": self.created_at,
        }

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": RESULT_FORMAT,
            "version": self.version,
            "created_at": self.created_at,
            "suite_sha256": self.suite_sha256,
            "suite_files": self.suite_files,
            "model": self.model,
            "settings": self.settings,
            "metrics": self.metrics,
            "performance": self.performance,
            "cases": [c.to_dict() for c in self.cases],
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "EvalResult":
        return cls(
            suite_sha256=d["suite_sha256"],
            cases=[CaseResult(**c) for c in d["cases"]],
            metrics=d["metrics"],
            performance=d.get("performance", {}),
            settings=d.get("settings", {}),
            model=d.get("model", {}),
            version=d.get("version"),
            created_at=d.get("created_at"),
            suite_files=d.get("suite_files", []),
        )

    def save(self, path: Path) -> None:
        atomic_write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: Path) -> "EvalResult":
        try:
            d = json.loads(Path(path).read_text(encoding="utf-8"))
            if d.get("format") != RESULT_FORMAT:
                raise ValueError(f"unknown result format {d.get('format')!r}")
            return cls.from_dict(d)
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise EvaluationError(
                f"{path}: cannot read evaluation results: {e}",
                hint="delete the file and run 'cl-release eval' again",
            ) from None


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
            hint="the adapter directory must hold a PEFT adapter (adapter_config.json + adapter_model.safetensors)",
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
        f"Question: {case.messages()[-1]['content']}\nExpected: {_thaw(case.expected)}\nAnswer: {output}\n\n"
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
                expected=_thaw(case.expected),
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
    if adapter_dir is not None and (root / adapter_dir / "adapter_model.safetensors").is_file():
        adapter_sha = sha256_file(root / adapter_dir / "adapter_model.safetensors")
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
    weights = root / adapter / "adapter_model.safetensors"
    if not weights.is_file():
        raise EvaluationError(
            f"version {entry['version']}: adapter weights {adapter}/adapter_model.safetensors are missing",
            hint="outputs/ is not in git; restore the version's outputs or retrain it",
        )
    actual = sha256_file(weights)
    recorded = (entry.get("adapter") or {}).get("sha256")
    if recorded and recorded != actual:
        raise IntegrityError(
            f"version {entry['version']}: {adapter}/adapter_model.safetensors does not match the registry's sha256",
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


def evaluations_of(entry: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Every evaluation summary of a registry entry by suite sha256: the later runs, and the
    release-time one (which wins for its own suite: it is what the gates decided on)."""
    out = dict(entry.get("evaluations") or {})
    release_time = entry.get("evaluation") or {}
    if release_time.get("pass_rate") is not None:
        out[release_time.get("suite_sha256") or "unknown"] = release_time
    return out
