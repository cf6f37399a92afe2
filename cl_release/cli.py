"""The ``cl-release`` command: parse, call the library, turn errors into one-line messages.

Heavy modules (torch, axolotl, transformers) are imported inside commands, never here, so
``cl-release --help`` is instant.
"""

from __future__ import annotations

import functools
import json
import os
import sys
from pathlib import Path
from typing import Any, Callable

import click

from . import __version__
from .errors import ClReleaseError


class Context:
    """What every command gets: the release repository root and output switches."""

    def __init__(self, root: Path, debug: bool):
        self.root = root
        self.debug = debug

    def project(self):
        from .project import Project

        return Project.load(self.root)

    def registry(self):
        from .registry import Registry

        return Registry(self.root)


pass_ctx = click.make_pass_decorator(Context)


def handle_errors(fn: Callable) -> Callable:
    """Print ClReleaseError on one line (red) and exit with its code; traceback with --debug."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except ClReleaseError as e:
            ctx = click.get_current_context(silent=True)
            debug = bool(ctx and ctx.find_object(Context) and ctx.find_object(Context).debug)
            if debug or os.environ.get("CL_RELEASE_DEBUG"):
                raise
            click.secho(f"Error: {e}", fg="red", err=True)
            sys.exit(e.exit_code)
        except KeyboardInterrupt:
            click.secho("Interrupted.", fg="red", err=True)
            sys.exit(130)

    return wrapper


def json_option(fn: Callable) -> Callable:
    return click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")(fn)


def echo_json(obj: Any) -> None:
    click.echo(json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False, default=str))


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="cl-release")
@click.option(
    "-C",
    "directory",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Run as if started in this release repository (like git -C).",
)
@click.option("--debug", is_flag=True, envvar="CL_RELEASE_DEBUG", help="Show tracebacks on errors.")
@click.pass_context
def main(ctx: click.Context, directory: Path | None, debug: bool) -> None:
    """Keep a LoRA-tuned domain LLM current: capture feedback, build data, train with
    Axolotl, gate, and release semantic versions with full lineage."""
    root = Path(directory) if directory is not None else Path.cwd()
    ctx.obj = Context(root=root, debug=debug)
