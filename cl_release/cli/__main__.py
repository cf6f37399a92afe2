"""``python -m cl_release.cli``: the ``cl-release`` command."""

from . import run

run()
