"""Evaluation results: one model's outcome on one suite, its metrics, and how a registry entry
keeps them (saved as JSON under ``outputs/vX.Y.Z/eval/``, summarized into the entry)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

from ..errors import EvaluationError
from ..files import atomic_write_json
from .suite import CRITICALITIES, HALLUCINATION_TAG, thaw

RESULT_FORMAT = 1


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
        d["expected"] = thaw(self.expected)
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



def evaluations_of(entry: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Every evaluation summary of a registry entry by suite sha256: the later runs, and the
    release-time one (which wins for its own suite: it is what the gates decided on)."""
    out = dict(entry.get("evaluations") or {})
    release_time = entry.get("evaluation") or {}
    if release_time.get("pass_rate") is not None:
        out[release_time.get("suite_sha256") or "unknown"] = release_time
    return out
