"""The ``cl-release`` command: parse, call the library, turn errors into one-line messages.

One module per area, each adding its commands to :data:`main` (:mod:`.base`): :mod:`.data`
(data build/validate), :mod:`.feedback` (feedback, annotate, review), :mod:`.release` (init,
render, plan, release, patch), :mod:`.versions` (list, show, rollback, merge, verify, push),
:mod:`.evaluation` (eval, diff, report), :mod:`.decide` (status, ab, watch), :mod:`.serve`.
Heavy modules (torch, axolotl, transformers) are imported inside commands, never here, so
``cl-release --help`` is instant.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import click

from . import data, decide, evaluation, feedback, release, serve, versions  # noqa: F401  (register the commands)
from .base import Context, main

__all__ = ["Context", "main", "run", "finish", "exit_code"]

# ---- console entry point

# Modules whose interpreter teardown takes seconds (finalising thousands of objects and
# extension modules). Once the command's work is done and flushed there is nothing left to
# tear down that the OS does not release anyway.
_SLOW_TEARDOWN = ("torch", "transformers", "peft")


def exit_code(code: Any) -> int:
    """sys.exit's argument as a process exit status (None: 0; a message: printed, 1)."""
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    click.echo(str(code), err=True)
    return 1


def finish(code: Any) -> None:
    """Exit with ``code``; skip the slow interpreter teardown when torch & co. were loaded.

    Everything the command wrote is already on disk (atomic writes, committed SQLite
    transactions); stdout/stderr and logging are flushed before ``os._exit``."""
    status = exit_code(code)
    if not any(m in sys.modules for m in _SLOW_TEARDOWN):
        sys.exit(status)
    import logging

    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(status)


def run() -> None:
    """The ``cl-release`` console script: ``main`` as a click program, then :func:`finish`."""
    try:
        main.main(prog_name="cl-release")
    except SystemExit as e:
        finish(e.code)
    finish(0)
