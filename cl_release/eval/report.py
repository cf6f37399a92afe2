"""The model evolution log (``diff A B``) and the release report (``report``).

``diff_versions`` compares two registry entries: training config, data composition, metrics
and every regression test whose result changed, with both outputs. ``build_report`` writes
``index.html`` and ``report.md`` with the lineage graph, the gate decisions and PNG plots of
the metrics across versions (matplotlib, imported inside functions only).
"""

from __future__ import annotations

import html
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from ..errors import UserError
from ..files import atomic_write_bytes, atomic_write_json, atomic_write_text
from .results import evaluations_of
from ..registry import Registry, normalize_version, parse_version
from ..timeutil import registry_now as utcnow

# ---------------------------------------------------------------- diff


def flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}; lists stay values."""
    if not isinstance(obj, dict):
        return {prefix or "(value)": obj}
    out: dict[str, Any] = {}
    for k, v in obj.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, dict) and v:
            out.update(flatten(v, key))
        else:
            out[key] = v
    return out


def dict_diff(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    fa, fb = flatten(a), flatten(b)
    return {
        "changed": {k: {"a": fa[k], "b": fb[k]} for k in sorted(fa.keys() & fb.keys()) if fa[k] != fb[k]},
        "added": {k: fb[k] for k in sorted(fb.keys() - fa.keys())},
        "removed": {k: fa[k] for k in sorted(fa.keys() - fb.keys())},
    }


DIFF_EXAMPLES = 3  # changed answers a diff shows as examples
_ENTRY_CONFIG_KEYS = ("bump", "strategy", "seed", "base_model", "train_base", "launch")


def _entry_config(root: Path, entry: dict[str, Any]) -> tuple[dict[str, Any], str]:
    """The training config of an entry: its rendered axolotl.yml when present, else registry fields."""
    fields = {k: entry.get(k) for k in _ENTRY_CONFIG_KEYS if k in entry}
    fields["knobs"] = (entry.get("training") or {}).get("knobs", {})
    cfg = entry.get("config") or {}
    path = root / cfg["path"] if cfg.get("path") else None
    if path is not None and path.is_file():
        try:
            from ..project import safe_load_strict  # bounded: aliases, nesting

            data = safe_load_strict(path.read_text(encoding="utf-8"))
            if isinstance(data, dict):
                return {"registry": fields, "axolotl": data}, cfg["path"]
        except yaml.YAMLError:
            pass
    return {"registry": fields}, "registry"


def data_composition(entry: dict[str, Any]) -> dict[str, Any]:
    parts = {f"{d['role']}:{d['name']}": {"examples": d["examples"], "sha256": d["sha256"]} for d in entry.get("datasets", [])}
    by_role: dict[str, int] = {}
    for d in entry.get("datasets", []):
        by_role[d["role"]] = by_role.get(d["role"], 0) + d["examples"]
    return {"parts": parts, "by_role": by_role, "total": sum(by_role.values())}


def data_diff(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    ca, cb = data_composition(a), data_composition(b)
    parts = {}
    for key in sorted(ca["parts"].keys() | cb["parts"].keys()):
        pa, pb = ca["parts"].get(key), cb["parts"].get(key)
        parts[key] = {
            "a": pa["examples"] if pa else None,
            "b": pb["examples"] if pb else None,
            "same_data": bool(pa and pb and pa["sha256"] == pb["sha256"]),
        }
    roles = {r: {"a": ca["by_role"].get(r, 0), "b": cb["by_role"].get(r, 0)} for r in sorted(ca["by_role"].keys() | cb["by_role"].keys())}
    return {"parts": parts, "by_role": roles, "total": {"a": ca["total"], "b": cb["total"]}}


def diff_versions(root: Path, version_a: str, version_b: str, *, suite=None, settings=None, run_eval: bool = True) -> dict[str, Any]:
    """The model evolution log from A to B: config, data, metrics, and changed tests.

    With ``run_eval`` both versions are evaluated on ``suite`` (cached results are reused);
    otherwise metrics come from the registry's ``evaluation`` summaries and tests are omitted.
    """
    from . import runner as evaluate
    from . import gates

    root = Path(root)
    data = Registry(root).load()
    a, b = Registry.find(data, version_a), Registry.find(data, version_b)
    cfg_a, src_a = _entry_config(root, a)
    cfg_b, src_b = _entry_config(root, b)
    out: dict[str, Any] = {
        "a": a["version"],
        "b": b["version"],
        "created_at": utcnow(),
        "lineage": _relation(data, a, b),
        "config": {"source": {"a": src_a, "b": src_b}, **dict_diff(cfg_a, cfg_b)},
        "data": data_diff(a, b),
    }
    if run_eval:
        settings = settings or evaluate.EvalSettings()
        ra = evaluate.evaluate_entry(root, a, suite, settings)
        rb = evaluate.evaluate_entry(root, b, suite, settings)
        cmp = gates.compare_results(ra, rb)
        out["suite_sha256"] = suite.sha256
        out["metrics"] = cmp.metric_deltas
        out["performance"] = {
            k: {"a": ra.performance.get(k), "b": rb.performance.get(k)} for k in ("tokens_per_second", "peak_memory_mb")
        }
        out["tests"] = {
            "regressions": [c.to_dict() for c in cmp.regressions],
            "improvements": [c.to_dict() for c in cmp.improvements],
            "unchanged": {"passed": len(cmp.unchanged_passed), "failed": len(cmp.unchanged_failed)},
            "outputs_changed": sum(1 for x, y in zip(ra.cases, rb.cases) if x.output != y.output),
            "outputs_total": len(rb.cases),
            "changed_examples": [{"id": x.id, "a": x.output, "b": y.output}
                                 for x, y in zip(ra.cases, rb.cases) if x.output != y.output][:DIFF_EXAMPLES],
        }
    else:
        out["metrics"] = dict_diff(_metrics_of(a), _metrics_of(b))
    return out


def _metrics_of(entry: dict[str, Any]) -> dict[str, Any]:
    ev = dict(entry.get("evaluation") or {})
    ev.pop("by_suite", None)
    return {k: ev.get(k) for k in ("pass_rate", "hallucination_rate", "per_domain", "per_criticality") if k in ev}


def _relation(data, a, b) -> str:
    chain_b = [e["version"] for e in Registry.lineage(data, b["version"])]
    chain_a = [e["version"] for e in Registry.lineage(data, a["version"])]
    if a["version"] in chain_b:
        return f"{a['version']} is an ancestor of {b['version']} ({' -> '.join(chain_b[chain_b.index(a['version']):])})"
    if b["version"] in chain_a:
        return f"{b['version']} is an ancestor of {a['version']}"
    return "different branches"


def default_diff_path(version_a: str, version_b: str) -> str:
    a, b = normalize_version(version_a), normalize_version(version_b)
    return f"outputs/v{b}/diff-{a}-{b}.json"


def save_diff(root: Path, diff: dict[str, Any], rel: str | None = None) -> str:
    rel = rel or default_diff_path(diff["a"], diff["b"])
    atomic_write_json(Path(root) / rel, diff)
    return rel


# ---------------------------------------------------------------- report


def _sorted_models(data: dict[str, Any]) -> list[dict[str, Any]]:
    return sorted(data["models"], key=lambda m: parse_version(m["version"]))


def _plot_png(path: Path, title: str, versions: list[str], series: dict[str, list[float | None]], ylabel: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.6), dpi=100)
    xs = list(range(len(versions)))
    for name, ys in series.items():
        pts = [(x, y) for x, y in zip(xs, ys) if y is not None]
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
    ax.set_xticks(xs, versions, rotation=30 if len(versions) > 6 else 0)
    ax.set_ylim(-0.02, 1.02)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if len(series) > 1:
        ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    _save_fig(fig, path)
    plt.close(fig)


def _save_fig(fig, path: Path) -> None:
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})
    atomic_write_bytes(path, buf.getvalue())


def _lineage_png(path: Path, models: list[dict[str, Any]], current: str | None) -> None:
    """Versions as boxes laid out by generation (depth), arrows from parent to child."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_v = {m["version"]: m for m in models}
    depth: dict[str, int] = {}

    def d(v: str) -> int:
        if v not in depth:
            p = by_v[v]["parent"]
            depth[v] = 0 if p is None or p not in by_v else d(p) + 1
        return depth[v]

    rows: dict[int, list[str]] = {}
    for m in models:
        rows.setdefault(d(m["version"]), []).append(m["version"])
    pos = {v: (lvl, -i) for lvl, vs in rows.items() for i, v in enumerate(vs)}
    width = max(4.0, 1.8 * (max(rows) + 1) if rows else 4.0)
    height = max(2.0, 0.9 * max((len(v) for v in rows.values()), default=1) + 1)
    fig, ax = plt.subplots(figsize=(width, height), dpi=100)
    colors = {"released": "#cde8cd", "rejected": "#f4c7c3", "candidate": "#eeeeee"}
    for m in models:
        x, y = pos[m["version"]]
        if m["parent"] in pos:
            px, py = pos[m["parent"]]
            ax.annotate("", xy=(x - 0.32, y), xytext=(px + 0.32, py), arrowprops={"arrowstyle": "->", "color": "#555"})
        label = f"{m['version']}\n{m['strategy']}"
        ax.text(x, y, label, ha="center", va="center", fontsize=8,
                bbox={"boxstyle": "round", "fc": colors.get(m["status"], "#eeeeee"),
                      "ec": "#1a5fb4" if m["version"] == current else "#888", "lw": 2.5 if m["version"] == current else 1})
    ax.set_xlim(-0.6, max(rows, default=0) + 0.6)
    ax.set_ylim(-max((len(v) for v in rows.values()), default=1) + 0.4, 0.6)
    ax.axis("off")
    ax.set_title("lineage (green released, red rejected, blue border current)", fontsize=9)
    fig.tight_layout()
    _save_fig(fig, path)
    plt.close(fig)


def suite_label(sha: str, n_tests: Any) -> str:
    return f"suite {sha[:12]}" + (f" ({n_tests} tests)" if n_tests is not None else "")


def suite_series(rows: list[dict[str, Any]], metric: str, limit: int = 3) -> dict[str, list[float | None]]:
    """One series per suite (the ``limit`` most recently used), each version's value measured
    on that suite (release-time or later evaluation) or None: only figures of one suite are
    ever joined by a line."""
    last_use: dict[str, int] = {}
    size: dict[str, Any] = {}
    for i, r in enumerate(rows):
        for sha, ev in r["by_suite"].items():
            last_use[sha] = i
            size[sha] = ev.get("n_tests")
    chosen = sorted(last_use, key=lambda sha: (-last_use[sha], sha))[:limit]
    return {suite_label(sha, size[sha]): [(r["by_suite"].get(sha) or {}).get(metric) for r in rows] for sha in chosen}


def report_data(root: Path) -> dict[str, Any]:
    """Everything the report shows, from the registry alone."""
    data = Registry(root).load()
    models = _sorted_models(data)
    rows = []
    for m in models:
        ev = m.get("evaluation") or {}
        g = m.get("gates") or {}
        rows.append({
            "version": m["version"],
            "parent": m["parent"],
            "bump": m["bump"],
            "strategy": m["strategy"],
            "status": m["status"],
            "created_at": m["created_at"],
            "pass_rate": ev.get("pass_rate"),
            "hallucination_rate": ev.get("hallucination_rate"),
            "per_domain": ev.get("per_domain") or {},
            "n_tests": ev.get("n_tests"),
            "suite": ev.get("suite_sha256"),
            "by_suite": evaluations_of(m),
            "learned": (ev.get("new_data") or {}).get("pass_rate"),
            "baseline": ev.get("baseline"),
            "gates_passed": g.get("passed"),
            "gate_reasons": g.get("reasons") or [],
            "regressions": g.get("regressions") or {},
            "override": m.get("override"),
            "notes": m.get("notes", ""),
        })
    return {"current": data["current"], "aliases": data.get("aliases", {}), "versions": rows, "models": models}


@dataclass(frozen=True)
class Chart:
    """One line chart of the report: a series per suite (or domain), a value per version."""

    name: str  # the PNG's file name, without .png
    title: str
    versions: list[str]
    series: dict[str, list[Any]]
    ylabel: str


def charts(info: dict[str, Any]) -> list[Chart]:
    """The report's line charts, from :func:`report_data`'s answer: pass rate and hallucination
    rate per suite, pass rate per domain on the most recent suite. The base model's scores
    (recorded with the first release) start the curves, so learning shows."""
    evaluated = [r for r in info["versions"] if r["by_suite"]]
    if not evaluated:
        return []
    base = next((r["baseline"] for r in evaluated if r["parent"] is None and r["baseline"]), None)
    if base:
        evaluated = [{"version": "base", "pass_rate": base.get("pass_rate"), "hallucination_rate": None,
                      "per_domain": base.get("per_domain") or {}, "learned": None,
                      "by_suite": {base.get("suite_sha256") or "unknown": base}}] + evaluated
    vs = [r["version"] for r in evaluated]
    series = suite_series(evaluated, "pass_rate")
    if any(r["learned"] is not None for r in evaluated):
        series["new-data checks (held out / corrections)"] = [r["learned"] for r in evaluated]
    latest, per_domain = next(iter(suite_series(evaluated, "per_domain", limit=1).items()))  # the most recent suite
    domains = sorted({d for pd in per_domain if pd for d in pd})
    return [
        Chart("pass_rate", "pass rate, per suite", vs, series, "share of tests passed"),
        Chart("hallucination_rate", "hallucination rate, per suite", vs,
              suite_series(evaluated, "hallucination_rate"), "share of hallucination tests failed"),
        Chart("per_domain", f"pass rate per domain, {latest}", vs,
              {d: [(pd or {}).get(d) for pd in per_domain] for d in domains}, "share of tests passed"),
    ]


def build_report(root: Path, out_dir: Path) -> dict[str, Path]:
    """Write index.html, report.md and the PNG plots into ``out_dir``; return their paths."""
    root, out_dir = Path(root), Path(out_dir)
    info = report_data(root)
    rows = info["versions"]
    if not rows:
        raise UserError("the registry has no versions to report on", hint="release a version first")
    paths = {"lineage": out_dir / "lineage.png"}
    _lineage_png(paths["lineage"], info["models"], info["current"])
    for chart in charts(info):
        paths[chart.name] = out_dir / f"{chart.name}.png"
        _plot_png(paths[chart.name], chart.title, chart.versions, chart.series, chart.ylabel)
    paths["html"] = out_dir / "index.html"
    paths["markdown"] = out_dir / "report.md"
    atomic_write_text(paths["html"], render_html(info, paths))
    atomic_write_text(paths["markdown"], render_markdown(info, paths))
    return paths


def _pct(x) -> str:
    return "-" if x is None else f"{x:.1%}"


def _suite_cell(r: dict[str, Any]) -> str:
    """The suite the release-time figures were measured on."""
    return suite_label(r["suite"], r["n_tests"]) if r["suite"] else "-"


def _gate_text(r: dict[str, Any]) -> str:
    if r["gates_passed"] is None:
        text = "not gated"
    elif r["gates_passed"]:
        text = "passed"
    else:
        text = "failed: " + "; ".join(r["gate_reasons"])
    if r["override"]:
        text += f" (forced: {r['override'].get('reason')})"
    return text


def render_markdown(info: dict[str, Any], paths: dict[str, Path]) -> str:
    lines = ["# Model releases", "", f"Current version: **{info['current'] or '-'}**", ""]
    lines.append("## Lineage")
    lines.append("")
    lines.append("![lineage](lineage.png)")
    lines.append("")
    lines.append("| version | parent | strategy | status | pass rate | new-data checks | hallucination | suite (release time) | gates |")
    lines.append("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in info["versions"]:
        gate = _gate_text(r).replace("|", "\\|")
        lines.append(f"| {r['version']} | {r['parent'] or '-'} | {r['strategy']} | {r['status']} | "
                     f"{_pct(r['pass_rate'])} | {_pct(r['learned'])} | {_pct(r['hallucination_rate'])} | {_suite_cell(r)} | "
                     f"{gate} |")
    lines.append("")
    for key, title in (("pass_rate", "Pass rate"), ("hallucination_rate", "Hallucination rate"), ("per_domain", "Per domain")):
        if key in paths:
            lines += [f"## {title}", "", f"![{title}]({paths[key].name})", ""]
    return "\n".join(lines)


_CSS = """
body{font-family:system-ui,sans-serif;margin:2em;max-width:1000px;color:#222}
table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;font-size:14px}
th{background:#f3f3f3}.released{color:#26734d}.rejected{color:#b3261e}img{max-width:100%;display:block;margin:0.5em 0}
"""


def render_html(info: dict[str, Any], paths: dict[str, Path]) -> str:
    e = html.escape
    out = [
        "<!doctype html>",
        '<html lang="en"><head><meta charset="utf-8"><title>Model releases</title>',
        f"<style>{_CSS}</style></head><body>",
        "<h1>Model releases</h1>",
        f"<p>Current version: <strong id=\"current\">{e(info['current'] or '-')}</strong></p>",
        "<h2>Lineage</h2>",
        '<img src="lineage.png" alt="lineage graph">',
        '<table id="versions"><thead><tr><th>version</th><th>parent</th><th>strategy</th><th>status</th>'
        "<th>pass rate</th><th>new-data checks</th><th>hallucination</th><th>suite (release time)</th>"
        "<th>regressions</th><th>gates</th></tr></thead><tbody>",
    ]
    for r in info["versions"]:
        regs = ", ".join(f"{c}: {len(ids)}" for c, ids in r["regressions"].items()) or "-"
        out.append(
            f'<tr><td>{e(r["version"])}</td><td>{e(r["parent"] or "-")}</td><td>{e(r["strategy"])}</td>'
            f'<td class="{e(r["status"])}">{e(r["status"])}</td><td>{_pct(r["pass_rate"])}</td>'
            f'<td>{_pct(r["learned"])}</td><td>{_pct(r["hallucination_rate"])}</td><td>{e(_suite_cell(r))}</td>'
            f'<td>{e(regs)}</td><td>{e(_gate_text(r))}</td></tr>'
        )
    out.append("</tbody></table>")
    for key, title in (("pass_rate", "Pass rate"), ("hallucination_rate", "Hallucination rate"), ("per_domain", "Pass rate per domain")):
        if key in paths:
            out.append(f"<h2>{title}</h2>")
            out.append(f'<img src="{e(paths[key].name)}" alt="{e(title)}">')
    # Lets a headless browser check report that every image decoded (bench/check_report_render.py).
    out.append(
        "<script>window.addEventListener('load',function(){var i=[].slice.call(document.images);"
        "document.body.setAttribute('data-images',i.filter(function(x){return x.complete&&x.naturalWidth>0}).length+'/'+i.length);});</script>"
    )
    out.append("</body></html>")
    return "\n".join(out) + "\n"
