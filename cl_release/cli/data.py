"""``cl-release data``: build training sets from feedback, validate data files."""

from __future__ import annotations

from pathlib import Path

import click

from .base import Context, OwnedChoice, echo_json, handle_errors, json_option, main, pass_ctx


def _formats():
    from ..data.formats import FORMATS

    return FORMATS


@main.group()
def data() -> None:
    """Build training sets from feedback; validate data files."""


@data.command("build")
@click.option("--since", help="Only feedback since DATE (YYYY-MM-DD, ISO time) or since release VERSION.")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path),
              help="Output JSONL (default: outputs/data/<sha256>.jsonl, git-ignored).")
@click.option("--format", "fmt", type=OwnedChoice(_formats),
              help="Output format (default: extraction.format, else messages).")
@click.option("--redact/--no-redact", default=None,
              help="Replace emails, phone numbers and extraction.redact_patterns (default: on).")
@click.option("--from-jsonl", type=click.Path(dir_okay=False, path_type=Path),
              help="Read feedback rows from a JSONL file instead of the feedback store.")
@click.option("--workers", type=click.IntRange(min=1),
              help="Processes reading a large feedback store (default: one per core from 100,000 records).")
@json_option
@pass_ctx
@handle_errors
def data_build(ctx: Context, since, out, fmt, redact, from_jsonl, workers, as_json) -> None:
    """Turn rated and corrected feedback into a deduplicated, hashed training set."""
    from ..data.build import build_project

    project = ctx.project()
    result, paths = build_project(project, since=since, out=ctx.path(out), fmt=fmt,
                                  redact=redact, from_jsonl=ctx.path(from_jsonl), workers=workers)
    m = result.manifest
    if as_json:
        echo_json({**m, "files": {k: project.rel(p) for k, p in paths.items()}})
        return
    src = m["sources"]
    click.echo(f"{project.rel(paths['data'])}: {m['examples']} examples ({src['kept']} kept, "
               f"{src['corrected']} corrected), format {m['format']}, sha256 {m['sha256']}")
    if "corrections" in paths:
        click.echo(f"corrections: {project.rel(paths['corrections'])} ({src['corrected']} examples)")
    skipped = m["skipped"]
    if skipped:
        detail = ", ".join(f"{k} {v}" for k, v in skipped.items())
        click.echo(f"skipped {sum(skipped.values())} of {m['rows_read']} rows: {detail}")
    click.echo(f"manifest: {project.rel(paths['manifest'])}")


@data.command("validate")
@click.argument("files", nargs=-1, required=True, type=click.Path(dir_okay=False, path_type=Path))
@click.option("--format", "fmt", default="messages", show_default=True,
              type=OwnedChoice(_formats, extra=["suite"]),
              help="Row format; 'suite' checks regression-suite rows.")
@pass_ctx
@handle_errors
def data_validate(ctx: Context, files, fmt) -> None:
    """Check every row of FILES; the first problem is reported with file, line and field.

    Examples over the size limit (limits.max_example_chars, else 32 characters per token of
    sequence_len; the defaults outside a release repository) are refused too."""
    from ..data.formats import max_example_chars
    from ..data.build import validate_data_file

    project = ctx.project_or_none()
    max_chars = max_example_chars(project.data if project is not None else None)
    for f in files:
        n = validate_data_file(ctx.path(f), fmt, display=str(f), max_chars=max_chars)
        click.echo(f"{f}: {n} records OK")
