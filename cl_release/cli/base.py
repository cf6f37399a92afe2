"""What every command shares: the ``cl-release`` group, the context (``-C DIR``), error handling,
``--json``, progress on stderr, and choices whose values belong to the library.

Heavy modules (torch, axolotl, transformers) are imported inside commands, never here, so
``cl-release --help`` is instant.
"""

from __future__ import annotations

import functools
import json
import os
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

import click

from .. import __version__
from ..errors import ClReleaseError


class Context:
    """What every command gets: the release repository root and output switches."""

    def __init__(self, root: Path, debug: bool):
        self.root = root
        self.debug = debug

    def project(self):
        from ..project import Project

        return Project.load(self.root)

    def registry(self):
        from ..registry import Registry

        return Registry(self.root)

    def project_or_none(self):
        """The project, or None outside a release repository (commands that also work on loose files)."""
        from ..project import PROJECT_FILE

        return self.project() if (self.root / PROJECT_FILE).is_file() else None

    def store(self):
        """The project's feedback store."""
        from ..store.sqlite import FeedbackStore

        return FeedbackStore(self.project().feedback_path)

    def path(self, path: Path | None) -> Path | None:
        """Relative paths are taken from the release repository (``-C DIR``), like git -C."""
        return path if path is None or path.is_absolute() else self.root / path


pass_ctx = click.make_pass_decorator(Context)


def _debugging() -> bool:
    ctx = click.get_current_context(silent=True)
    obj = ctx.find_object(Context) if ctx else None
    return bool(obj and obj.debug) or bool(os.environ.get("CL_RELEASE_DEBUG"))


def handle_errors(fn: Callable) -> Callable:
    """Print ClReleaseError on one line (red) and exit with its code; traceback with --debug."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except ClReleaseError as e:
            if _debugging():
                raise
            click.secho(f"Error: {e}", fg="red", err=True)
            sys.exit(e.exit_code)
        except KeyboardInterrupt:
            click.secho("Interrupted.", fg="red", err=True)
            sys.exit(130)
        except (click.exceptions.Exit, click.ClickException, SystemExit):
            raise
        except BrokenPipeError:  # output piped into head & co.: stop quietly
            sys.stderr.close()
            os._exit(0)
        except Exception as e:  # a bug or an environment problem: one line unless --debug
            if _debugging():
                raise
            click.secho(f"Error: unexpected {type(e).__name__}: {e} (run with --debug for the traceback)",
                        fg="red", err=True)
            sys.exit(1)

    return wrapper


def json_option(fn: Callable) -> Callable:
    return click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")(fn)


def echo_json(obj: Any) -> None:
    click.echo(json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False, default=str))


def say(message: str) -> None:
    """Progress messages go to stderr so stdout stays clean for --json and pipes."""
    click.secho(message, err=True, fg="cyan")


class OwnedChoice(click.Choice):
    """A ``click.Choice`` whose values are a constant of the module that owns them, read when
    an option is parsed or its help is shown: the list is written once, in the library, and
    ``cl-release --help`` imports nothing behind it (``values``: a function that imports it).
    ``extra``: choices only this option adds."""

    def __init__(self, values: Callable[[], Sequence[str]], *, extra: Sequence[str] = ()):
        self._values, self._extra = values, tuple(extra)
        self.case_sensitive = True

    @property
    def choices(self) -> tuple[str, ...]:  # type: ignore[override]
        return tuple(self._values()) + self._extra


def read_notes(ctx: Context, notes: str, notes_file: Path | None) -> str:
    """The release notes of ``--notes`` or ``--notes-file`` (``-``: standard input), checked."""
    from ..release.run import check_notes, read_notes_file

    if notes_file is None:
        return check_notes(notes)
    if notes:
        raise click.UsageError("pass --notes or --notes-file, not both")
    return read_notes_file(notes_file if str(notes_file) == "-" else ctx.path(notes_file))


def notes_options(what: str) -> Callable[[Callable], Callable]:
    """``--notes`` and ``--notes-file`` (read with :func:`read_notes`)."""

    def decorate(fn: Callable) -> Callable:
        fn = click.option("--notes-file", type=click.Path(dir_okay=False, allow_dash=True, path_type=Path),
                          default=None, help="Read the notes from FILE (UTF-8, at most 1 MiB; '-': standard input).")(fn)
        return click.option("--notes", default="", help=what)(fn)

    return decorate


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
