"""Regression suites: test cases, suite files, adding tests, and the rule that checks an answer.

A suite is a JSONL file of test cases (default ``registry/regression_tests.jsonl``)::

    {"id": "idlh-ammonia", "input": "What is the IDLH of ammonia?", "expected": "300 ppm",
     "match": "contains", "criticality": "critical", "domain": "idlh", "tags": ["hallucination"]}

``input`` is a user prompt or a list of chat messages; ``expected`` is a string, or for
``contains``/``not_contains`` a list of key facts (all must appear / none may appear), or for
``json_equal`` any JSON value. A suite's hash (its cases' canonical JSON) keys the cached
results of :mod:`.runner`. Nothing here imports torch.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

from ..data.formats import MAX_NESTING, ROLES, canonical_json, check_example_size, iter_jsonl, nesting_depth
from ..errors import DataError, UnknownRequest, UserError
from ..files import atomic_write_bytes, locked, sha256_file
from . import CRITICALITIES, DEFAULT_SUITE, MATCH_TYPES

CRITICALITY_RANK = {c: i for i, c in enumerate(CRITICALITIES)}
HALLUCINATION_TAG = "hallucination"
_FIELDS = {"id", "input", "expected", "match", "criticality", "domain", "tags", "judge", "notes", "source", "metadata"}


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


def thaw(value: Any) -> Any:
    """A case's frozen value (tuples, frozen messages) as plain JSON values again."""
    if isinstance(value, tuple):
        return [thaw(v) for v in value]
    if isinstance(value, dict):
        return {k: thaw(v) for k, v in value.items()}
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
            rows = sorted((canonical_json(case_key(c)) for c in self.cases))
            self._sha = hashlib.sha256("\n".join(rows).encode("utf-8")).hexdigest()
        return self._sha

    def by_id(self) -> dict[str, TestCase]:
        return {c.id: c for c in self.cases}


def case_key(case: TestCase) -> dict[str, Any]:
    """What identifies a test's content (notes, source and metadata aside): a suite's hash and
    the check that an id added again has the same content."""
    d = thaw(case.to_dict())
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
    """A test id derived from the test's input and expected answer (``t-<sha256[:12]>``)."""
    key = canonical_json({"input": thaw(inp), "expected": thaw(expected)})
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
                if case_key(old) != case_key(case):
                    raise UserError(
                        f"test id {case.id!r} is already in {suite_rel} with different content",
                        hint="choose another --id, or edit the suite file",
                    )
                skipped.append(case.id)
                continue
            existing[case.id] = case
            added.append(case.id)
            lines.append(json.dumps(thaw(case.to_dict()), ensure_ascii=False) + "\n")
        if lines:
            data = path.read_bytes() if path.exists() else b""
            if data and not data.endswith(b"\n"):
                data += b"\n"
            atomic_write_bytes(path, data + "".join(lines).encode("utf-8"))
    return added, skipped


def case_defaults(*, match: str | None = None, criticality: str | None = None, domain: str | None = None,
                  tags: Iterable[str] = ()) -> dict[str, Any]:
    """The fields new tests take unless a row says otherwise (``eval add`` / ``eval import``
    options); None leaves a field to the row, then to the suite's defaults."""
    d: dict[str, Any] = {"tags": list(tags)}
    for key, value in (("match", match), ("criticality", criticality), ("domain", domain)):
        if value is not None:
            d[key] = value
    return d


def prompt_input(turns: Any) -> Any:
    """A suite row's ``input`` for the prompt ``turns``: a lone user turn is its text; more
    turns (a system prompt, earlier answers) stay chat messages."""
    if isinstance(turns, list) and len(turns) == 1 and isinstance(turns[0], dict) and turns[0].get("role") == "user":
        return turns[0].get("content")
    return turns


def typed_row(prompt: Any, expected: Any, *, defaults: dict[str, Any], test_id: str | None = None) -> dict[str, Any]:
    """A suite row typed in (``eval add --input --expected``); its id derives from the content."""
    return {**defaults, "input": prompt, "expected": expected, "id": test_id or case_id_for(prompt, expected)}


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
            row = {**defaults, "input": prompt_input(msgs[:-1]), "expected": last.get("content")}
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


# How bad a regression on a test promoted from feedback is: the feedback's severity (the store's
# SEVERITIES) under the criticality of the same name; a safety issue is critical.
SEVERITY_CRITICALITY = {"safety": "critical"}


def criticality_of(severity: str | None) -> str | None:
    """The test criticality of a feedback ``severity`` (None: none that maps)."""
    c = SEVERITY_CRITICALITY.get(severity, severity) if severity else None
    return c if c in CRITICALITIES else None


def row_from_feedback(record: dict[str, Any], *, defaults: dict[str, Any], expected: Any = None,
                      test_id: str | None = None) -> dict[str, Any]:
    """A suite row from a production feedback record (``eval add --from-feedback``).

    ``expected`` defaults to the corrected answer, else the output. Unless ``defaults`` set one,
    the criticality follows the feedback's severity; a hallucinated answer is tagged
    ``hallucination``. The record's ``id`` is kept in the test id (``fb-<id>``) and ``source``.
    ``record`` needs ``input`` (prompt or messages) and ``correction`` or ``output``.
    """
    inp = prompt_input(record.get("input"))
    answer = record.get("correction") or record.get("output")
    if not inp or not isinstance(answer, str) or not answer.strip():
        raise UserError(
            f"feedback {record.get('id')} has no prompt and answer to turn into a test",
            hint="promote a record with an input and an output or a correction",
        )
    row = {**defaults, "tags": list(defaults.get("tags", [])), "input": inp, "expected": expected or answer.strip(),
           "id": test_id or f"fb-{record.get('id')}", "source": f"feedback:{record.get('id')}"}
    criticality = criticality_of(record.get("severity"))
    if "criticality" not in defaults and criticality is not None:
        row["criticality"] = criticality
    if record.get("hallucinated") and HALLUCINATION_TAG not in row["tags"]:
        row["tags"].append(HALLUCINATION_TAG)
    return row


def row_from_store(store, request_id: str, **kwargs: Any) -> dict[str, Any]:
    """:func:`row_from_feedback` of the answer ``request_id`` logged in the feedback ``store``."""
    record = store.get(request_id)
    if record is None:
        raise UnknownRequest(f"no logged answer with id {request_id}", hint="see 'cl-release feedback' for ids")
    return row_from_feedback(record, **kwargs)


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
        want = json.loads(case.expected) if isinstance(case.expected, str) else thaw(case.expected)
        try:
            return _json_of(output) == want
        except (json.JSONDecodeError, ValueError, RecursionError):  # a model's answer: any text
            return False
    raise ValueError(f"unknown match type {m!r}")

