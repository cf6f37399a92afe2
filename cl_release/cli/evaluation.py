"""``cl-release eval``, ``diff`` and ``report``: regression suites and what they measure."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import click

from ..eval import CRITICALITIES, DEFAULT_SUITE, MATCH_TYPES
from .base import Context, echo_json, handle_errors, json_option, main, pass_ctx


class _EvalGroup(click.Group):
    """``cl-release eval VERSION`` runs the suite; ``eval add`` / ``eval import`` manage it."""

    def parse_args(self, ctx, args):
        if args and args[0] not in self.commands and args[0] not in ("-h", "--help"):
            args = ["run", *args]
        return super().parse_args(ctx, args)


def _suite_option(fn: Callable) -> Callable:
    return click.option("--suite", "suites", multiple=True,
                        help="Suite file (repeatable; any path, relative to the repository; default: "
                             f"evaluation.suites, else {DEFAULT_SUITE}).")(fn)


def _print_summary(s: dict) -> None:
    click.echo(f"pass rate {s['pass_rate']:.1%} ({s['passed']}/{s['n_tests']})  hallucination rate "
               + (f"{s['hallucination_rate']:.1%}" if s["hallucination_rate"] is not None else "-")
               + (f"  pass@{s['pass_at_k']['k']} {s['pass_at_k']['rate']:.1%}" if s.get("pass_at_k") else ""))
    click.echo("per criticality: " + ", ".join(f"{k} {v:.0%}" for k, v in s["per_criticality"].items()))
    click.echo("per domain: " + ", ".join(f"{k} {v:.0%}" for k, v in s["per_domain"].items()))
    click.echo(f"{s['tokens_per_second']} tokens/s, peak memory {s['peak_memory_mb']} MB ({s['peak_memory_kind']})")


@main.group(name="eval", cls=_EvalGroup)
def eval_() -> None:
    """Run the regression suite on a version (eval VERSION), or add tests to it."""


@eval_.command("run")
@click.argument("version")
@_suite_option
@click.option("--against", help="Also evaluate this version and list regressions and improvements.")
@click.option("--batch-size", type=click.IntRange(min=1), help="Prompts per generate call.")
@click.option("--max-new-tokens", type=click.IntRange(min=1), help="Tokens generated per answer.")
@click.option("--pass-k", type=click.IntRange(min=1), help="Also sample K answers per test for pass@K.")
@click.option("--no-cache", is_flag=True, help="Recompute even if results for this suite are saved.")
@click.option("--cases", "show_cases", is_flag=True,
              help="Also give every test's result (id, passed, output; in the JSON: a 'cases' list).")
@json_option
@pass_ctx
@handle_errors
def eval_run(ctx: Context, version, suites, against, batch_size, max_new_tokens, pass_k, no_cache, show_cases,
             as_json) -> None:
    """Evaluate VERSION on the suite; save results and summarize them into the registry."""
    from ..eval import gates, runner

    knobs = {"batch_size": batch_size, "max_new_tokens": max_new_tokens, "pass_k": pass_k}
    project = ctx.project_or_none()
    result, suite = runner.evaluate_version(ctx.root, version, project=project, suites=suites, cache=not no_cache,
                                            **knobs)
    recorded = runner.record_in_registry(ctx.root, result.version, result)
    out = {"summary": result.summary()}
    if show_cases:
        out["cases"] = [c.to_dict() for c in result.cases]
    if against:
        other, _ = runner.evaluate_version(ctx.root, against, project=project, suites=suites, cache=not no_cache,
                                           **knobs)
        runner.record_in_registry(ctx.root, other.version, other)
        out["comparison"] = gates.compare_results(other, result).to_dict()
    if as_json:
        echo_json(out)
        return
    click.echo(f"{result.version} on {len(suite)} tests (suite {suite.sha256[:16]}), results {result.summary()['results']}; "
               f"registry: {recorded} (the release-time evaluation is kept)")
    _print_summary(out["summary"])
    for c in out.get("cases", []):
        click.echo(f"  {'PASS' if c['passed'] else 'FAIL'} [{c['criticality']}] {c['id']}: {c['output'][:80]!r}")
    if against:
        cmp = out["comparison"]
        click.echo(f"vs {against}: {len(cmp['regressions'])} regressions, {len(cmp['improvements'])} improvements, "
                   f"{cmp['unchanged']['passed'] + cmp['unchanged']['failed']} unchanged")
        for r in cmp["regressions"]:
            click.echo(f"  REGRESSION [{r['criticality']}] {r['id']}: {r['candidate_output'][:80]!r}")
        for r in cmp["improvements"]:
            click.echo(f"  improved   [{r['criticality']}] {r['id']}")


def _case_options(fn: Callable) -> Callable:
    for opt in reversed([
        click.option("--match", type=click.Choice(MATCH_TYPES),
                     help="How the answer is checked (default: contains)."),
        click.option("--criticality", type=click.Choice(CRITICALITIES),
                     help="How bad a regression is (default: medium; from feedback: its severity)."),
        click.option("--domain", help="Domain for per-domain scores (default: general)."),
        click.option("--tag", "tags", multiple=True, help="Tag (repeatable), e.g. hallucination."),
        click.option("--suite", "suite", default=DEFAULT_SUITE, show_default=True,
                     help="Suite file to add to."),
    ]):
        fn = opt(fn)
    return fn


@eval_.command("add")
@click.option("--from-feedback", "feedback_id", help="Promote this logged answer (its correction, if any).")
@click.option("--input", "prompt", help="The prompt.")
@click.option("--expected", help="Expected answer or key fact (default with --from-feedback: the answer).")
@click.option("--id", "test_id", help="Test id (default: derived from the content).")
@_case_options
@pass_ctx
@handle_errors
def eval_add(ctx: Context, feedback_id, prompt, expected, test_id, match, criticality, domain, tags, suite) -> None:
    """Add one test to a suite, typed in or promoted from production feedback."""
    from ..errors import UserError
    from ..eval import suite as sv

    defaults = sv.case_defaults(match=match, criticality=criticality, domain=domain, tags=tags)
    if feedback_id:
        with ctx.store() as store:
            row = sv.row_from_store(store, feedback_id, defaults=defaults, expected=expected, test_id=test_id)
    elif not prompt or not expected:
        raise UserError("give --input and --expected, or --from-feedback ID")
    else:
        row = sv.typed_row(prompt, expected, defaults=defaults, test_id=test_id)
    added, _ = sv.append_cases(ctx.root, suite, [row])
    click.echo(f"{suite}: added {row['id']}" if added else f"{suite}: {row['id']} is already there")


@eval_.command("import")
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
@_case_options
@pass_ctx
@handle_errors
def eval_import(ctx: Context, file, match, criticality, domain, tags, suite) -> None:
    """Import tests from FILE: suite rows, or chat/alpaca rows (last answer = expected)."""
    from ..eval import suite as sv

    defaults = sv.case_defaults(match=match, criticality=criticality, domain=domain, tags=tags)
    added, skipped = sv.append_cases(ctx.root, suite, sv.rows_from_file(ctx.path(file), defaults=defaults))
    click.echo(f"{suite}: added {len(added)} tests, {len(skipped)} already there")


@main.command()
@click.argument("version_a")
@click.argument("version_b")
@_suite_option
@click.option("--no-eval", is_flag=True, help="Do not run the models; metrics from the registry only.")
@click.option("--out", help="Where to save the JSON (default: outputs/vB/diff-A-B.json).")
@json_option
@pass_ctx
@handle_errors
def diff(ctx: Context, version_a, version_b, suites, no_eval, out, as_json) -> None:
    """What changed from A to B: config, data, metrics, and every test whose result flipped."""
    from ..eval.report import diff_versions, save_diff
    from ..eval.runner import EvalSettings
    from ..eval.suite import load_project_suite

    project = ctx.project_or_none()
    suite = None if no_eval else load_project_suite(ctx.root, project, suites)
    d = diff_versions(ctx.root, version_a, version_b, suite=suite,
                      settings=EvalSettings.from_project(project), run_eval=not no_eval)
    saved = save_diff(ctx.root, d, out)
    if as_json:
        echo_json(d)
        return
    click.echo(f"{d['a']} -> {d['b']}: {d['lineage']}  (saved {saved})")
    for k, v in d["config"]["changed"].items():
        click.echo(f"config  {k}: {v['a']!r} -> {v['b']!r}")
    for k, v in d["config"]["added"].items():
        click.echo(f"config  {k}: added {v!r}")
    for k, v in d["config"]["removed"].items():
        click.echo(f"config  {k}: removed (was {v!r})")
    for k, v in d["data"]["by_role"].items():
        click.echo(f"data    {k}: {v['a']} -> {v['b']} examples")
    m = d["metrics"]
    if "tests" in d:
        click.echo(f"metrics pass rate {m['pass_rate']['parent']} -> {m['pass_rate']['candidate']}, hallucination rate "
                   f"{m['hallucination_rate']['parent']} -> {m['hallucination_rate']['candidate']}")
        tests = d["tests"]
        click.echo(f"outputs {tests['outputs_changed']} of {tests['outputs_total']} answers changed")
        for ex in tests["changed_examples"]:
            click.echo(f"  {ex['id']}\n    {d['a']}: {ex['a']!r}\n    {d['b']}: {ex['b']!r}")
        for kind in ("regressions", "improvements"):
            for t in tests[kind]:
                click.echo(f"{kind[:-1]:<11} [{t['criticality']}] {t['id']}\n  {d['a']}: {t['parent_output']!r}\n"
                           f"  {d['b']}: {t['candidate_output']!r}")


@main.command()
@click.option("--out", "out_dir", default="outputs/reports", show_default=True,
              type=click.Path(file_okay=False, path_type=Path),
              help="Directory for index.html, report.md and the plots.")
@pass_ctx
@handle_errors
def report(ctx: Context, out_dir: Path) -> None:
    """Write an HTML + Markdown report: lineage, gate decisions, metrics across versions."""
    from ..eval.report import build_report

    paths = build_report(ctx.root, ctx.path(out_dir))
    click.echo(f"wrote {paths['html']} and {paths['markdown']} ({len(paths) - 2} images)")
