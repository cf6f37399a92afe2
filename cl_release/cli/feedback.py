"""``cl-release feedback``, ``annotate`` and ``review``: the feedback store from the command line."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from .base import Context, OwnedChoice, echo_json, handle_errors, json_option, main, pass_ctx
from .progress import ByteProgress


def _severities():
    from ..store.sqlite import SEVERITIES

    return SEVERITIES


@main.group()
def feedback() -> None:
    """Log answers and feedback in the project's feedback store; import, export, prune."""


@feedback.command("import")
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--workers", type=click.IntRange(min=1),
              help="Processes parsing the file (default: one per core for files of 16 MB or more).")
@click.option("--timezone", "tz", metavar="ZONE",
              help="How to read timestamps without a UTC offset: an IANA name (Europe/Athens), "
                   "'local' or 'UTC' (the default, with a warning when there are any).")
@json_option
@pass_ctx
@handle_errors
def feedback_import(ctx: Context, file: Path, workers: int | None, tz: str | None, as_json: bool) -> None:
    """Import logged answers (and user feedback) from a JSONL file; all or nothing.

    Known fields that collectors log inside ``metadata`` (model_version, latency_ms, tokens,
    quality_score, hallucinated, error_tag, severity) are used when the line has none of its
    own; version strings such as v1.0 are stored as the release they name."""
    from ..data.formats import max_example_chars

    project = ctx.project()
    store, path = ctx.store(), ctx.path(file)
    size = path.stat().st_size if path.is_file() else 0
    registry = ctx.registry()
    releases = [m["version"] for m in registry.models()] if registry.path.is_file() else None
    with ByteProgress("importing", size) as bar:
        result = store.import_jsonl(path, progress=bar.advance, workers=workers, timezone=tz, releases=releases,
                                    max_example_chars=max_example_chars(project.data))
    if as_json:
        echo_json(result.to_dict())
    else:
        click.echo(f"{file}: {result.lines} lines, {result.records} new records, "
                   f"{result.duplicates} already stored, {result.feedback} feedback rows "
                   f"({result.per_second:,.0f} lines/s)")
        click.echo("  by model version: " + (", ".join(f"{v} {n}" for v, n in result.by_model_version.items())
                                              or "none"))
        if result.lifted:
            click.echo("  from metadata: " + ", ".join(f"{k} {n}" for k, n in result.lifted.items()))
        if result.conflicts:
            click.echo("  top level and metadata disagree (top level kept): "
                       + ", ".join(f"{k} {n}" for k, n in result.conflicts.items()))
        if result.mapped_versions:
            click.echo(f"  {result.mapped_versions} version strings mapped to releases (as given: logged_version)")
        if result.unmatched_versions:
            click.echo(f"  {result.unmatched_versions} records name a version that matches no release")
        if result.naive_timestamps:
            click.echo(f"  {result.naive_timestamps} timestamps without a UTC offset, read as {result.timezone}")
    if result.unknown_fields:
        click.secho("Warning: ignored fields no line shape knows: "
                    + ", ".join(f"{k} ({n} lines)" for k, n in result.unknown_fields.items()), fg="yellow", err=True)
    if result.naive_timestamps and tz is None:
        click.secho(f"Warning: {result.naive_timestamps} timestamps in {file} have no UTC offset and were read as "
                    "UTC; if they are local times, import with --timezone ZONE (e.g. Europe/Athens or local).",
                    fg="yellow", err=True)


@feedback.command("add")
@click.argument("request_id")
@click.option("--rating", type=click.IntRange(1, 5), help="Rating from 1 (bad) to 5 (good).")
@click.option("--thumbs", type=click.Choice(["up", "down"]), help="Thumbs up or down.")
@click.option("--correction", help="The answer the model should have given.")
@click.option("--notes", help="Free-text notes.")
@click.option("--hallucinated/--not-hallucinated", default=None, help="Whether the answer invented facts.")
@click.option("--error-tag", help="A short label for the kind of error.")
@click.option("--severity", type=OwnedChoice(_severities),
              help="critical/safety corrections trigger an immediate PATCH release.")
@click.option("--annotator", help="Who gave this feedback.")
@click.option("--supersedes", "supersedes", multiple=True, metavar="QUESTION",
              help="Another question the correction answers (repeatable): releases retire its old answers.")
@pass_ctx
@handle_errors
def feedback_add(ctx: Context, request_id: str, thumbs: str | None, supersedes: tuple[str, ...], **fields) -> None:
    """Record feedback on the logged answer REQUEST_ID (the latest feedback wins)."""
    store = ctx.store()
    if supersedes and not fields.get("correction"):
        raise click.UsageError("--supersedes goes with --correction")
    row_id = store.feedback(request_id, thumbs=thumbs, **fields)
    if supersedes:
        store.set_supersedes(request_id, supersedes)
    click.echo(f"feedback {row_id} recorded for {request_id}")


@feedback.command("log")
@click.option("--input", "input_", required=True, help="The prompt the model answered.")
@click.option("--output", required=True, help="The model's answer.")
@click.option("--model-version", help="The model version that answered.")
@click.option("--request-id", help="The request id (default: a new one).")
@pass_ctx
@handle_errors
def feedback_log(ctx: Context, input_: str, output: str, model_version: str | None, request_id: str | None) -> None:
    """Log one answer and print its request id."""
    click.echo(ctx.store().log(input_, output, model_version=model_version, request_id=request_id))


@feedback.command("stats")
@click.option("--since", help="Only answers created, or given feedback, since DATE (ISO-8601).")
@json_option
@pass_ctx
@handle_errors
def feedback_stats(ctx: Context, since: str | None, as_json: bool) -> None:
    """Totals and rates: feedback, average rating, negative, hallucinated, corrections."""
    stats = ctx.store().stats(since=since)
    if as_json:
        echo_json(stats)
        return
    click.echo(_format_stats("all", stats))
    for version, block in stats["by_model_version"].items():
        click.echo(_format_stats(version, block))


def _format_stats(label: str, s: dict) -> str:
    avg = "-" if s["average_rating"] is None else f"{s['average_rating']:.2f}"
    return (f"{label}: {s['records']} answers, feedback {s['feedback']} ({s['feedback_rate']:.1%}), "
            f"avg rating {avg}, negative {s['negative_rate']:.1%}, hallucinated "
            f"{s['hallucination_rate']:.1%}, corrections {s['corrections']}, critical {s['critical']}")


@feedback.command("export")
@click.option("--since", help="Only answers created, or given feedback, since DATE (ISO-8601).")
@click.option("-o", "--out", type=click.Path(dir_okay=False, path_type=Path), help="Output JSONL (default: stdout).")
@pass_ctx
@handle_errors
def feedback_export(ctx: Context, since: str | None, out: Path | None) -> None:
    """Write each answer with its latest feedback as JSON lines."""
    store = ctx.store()
    if out is None:
        store.export(sys.stdout, since=since)
        return
    n = store.export(ctx.path(out), since=since)
    click.echo(f"{out}: {n} rows", err=True)


@feedback.command("prune")
@click.option("--before", required=True, help="Delete answers created before DATE (ISO-8601).")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@pass_ctx
@handle_errors
def feedback_prune(ctx: Context, before: str, yes: bool) -> None:
    """Delete old answers and their feedback; answers a release trained on are kept."""
    store = ctx.store()
    n = store.prune(before, dry_run=True)
    if n and not yes:
        click.confirm(f"Delete {n} answers created before {before} and their feedback?", abort=True)
    click.echo(f"deleted {store.prune(before) if n else 0} answers")


@main.group()
def annotate() -> None:
    """Expert review sessions: export a stratified CSV sample, import the experts' ratings."""


@annotate.command("export")
@click.option("--n", "n", default=50, show_default=True, type=click.IntRange(min=1), help="Sample size.")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), help="Output CSV (default: stdout).")
@click.option("--seed", default=0, show_default=True, type=int, help="Random seed (same seed, same sample).")
@pass_ctx
@handle_errors
def annotate_export(ctx: Context, n: int, out: Path | None, seed: int) -> None:
    """Sample ~30% errors, ~30% low-confidence and random answers into a CSV for experts."""
    from ..data.annotate import export_sample

    counts = export_sample(ctx.store(), ctx.path(out) or sys.stdout, n=n, seed=seed)
    detail = ", ".join(f"{k} {v}" for k, v in counts.items())
    click.echo(f"{out or 'stdout'}: {sum(counts.values())} answers ({detail})", err=True)


@annotate.command("import")
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
@pass_ctx
@handle_errors
def annotate_import(ctx: Context, file: Path) -> None:
    """Store the experts' ratings and corrections from FILE; all rows or none."""
    from ..data.annotate import import_csv

    click.echo(f"{file}: {import_csv(ctx.store(), ctx.path(file))} feedback rows stored")


@main.command()
@click.option("--since", help="Only answers created since DATE (ISO-8601).")
@click.option("--model", help="Only answers from this model version.")
@pass_ctx
@handle_errors
def review(ctx: Context, since: str | None, model: str | None) -> None:
    """Rate answers without feedback one by one (1-5, s=skip, q=quit); resumes where you stopped."""
    from ..data.annotate import review as run_review

    def ask(text: str) -> str:
        try:
            return click.prompt(text, default="", show_default=False)
        except click.Abort:
            raise EOFError from None

    s = run_review(ctx.store(), since=since, model=model, prompt=ask, echo=click.echo)
    click.echo(f"\nreviewed {s.reviewed}, skipped {s.skipped}" + (" (stopped)" if s.quit else ""))
