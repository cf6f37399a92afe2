"""Every Makefile target's command lines parse, without running them.

``make -n TARGET`` prints the commands; each is checked with the parser it will meet: the
bench scripts' argparse options (parsed, then stopped), cl-release's click options (parsed,
the command not run), pytest's options (collection of one small file), shell syntax
(``bash -n``). A command line of a kind this test does not know fails it, so a new target is
covered or the test is extended.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

REPO = Path(__file__).resolve().parent.parent
MAKEFILE = REPO / "Makefile"

# Runs a script as ``python SCRIPT ARGS`` would, but stops right after its argparse parser
# accepted the arguments (exit 0); a parse error exits 2 as usual.
_ARGPARSE_ONLY = """
import argparse, runpy, sys
_parse = argparse.ArgumentParser.parse_args
def parse_args(self, args=None, namespace=None):
    _parse(self, args, namespace)
    raise SystemExit(0)
argparse.ArgumentParser.parse_args = parse_args
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
raise SystemExit("the script never parsed its arguments")
"""


def phony_targets() -> list[str]:
    text = MAKEFILE.read_text()
    m = re.search(r"^\.PHONY:(.*)$", text, re.M)
    assert m, "the Makefile has no .PHONY line"
    return m.group(1).split()


def dry_run(target: str, venv: Path, **variables: str) -> list[str]:
    args = ["make", "-n", "--no-print-directory", "-f", str(MAKEFILE), target, f"VENV={venv}",
            *(f"{k}={v}" for k, v in variables.items())]
    # as if typed in a shell: under `make test` the parent make's flags would print extra lines
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MAKELEVEL", "MFLAGS", "MAKEOVERRIDES")}
    out = subprocess.run(args, cwd=REPO, capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    return [line for line in out.stdout.splitlines() if line.strip()]


def click_parses(args: list[str], monkeypatch) -> None:
    run = click.Command.invoke

    def parse_only(self, ctx):  # groups dispatch as usual; the command itself does not run
        return run(self, ctx) if isinstance(self, click.Group) else None

    from cl_release.cli import main

    with monkeypatch.context() as m:
        m.setattr(click.Command, "invoke", parse_only)
        result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, f"cl-release {shlex.join(args)}: {result.output}"


def check_line(line: str, bin_dir: Path, monkeypatch) -> str:
    """Check one command line; return what kind it was."""
    words = shlex.split(line)
    exe = words[0]
    if exe == f"{bin_dir}/python" and words[1:3] == ["-m", "pip"] or exe in ("test", "touch"):
        return "install"  # the venv itself: not run here (no network)
    if exe == "rm" and all(not w.startswith("/") and ".." not in w for w in words[2:]):
        return "clean"
    if exe == f"{bin_dir}/python" and words[1:3] == ["-m", "pytest"]:
        out = subprocess.run([sys.executable, "-m", "pytest", *words[3:], "--collect-only", "-q", "-p",
                              "no:cacheprovider", "tests/test_files.py"], cwd=REPO, capture_output=True, text=True)
        assert out.returncode == 0, f"{line}: {out.stdout[-2000:]}{out.stderr[-2000:]}"
        return "pytest"
    if exe == f"{bin_dir}/python" and words[1].endswith(".py"):
        script = REPO / words[1]
        assert script.is_file(), f"{line}: {words[1]} does not exist"
        out = subprocess.run([sys.executable, "-c", _ARGPARSE_ONLY, str(script), *words[2:]], cwd=REPO,
                             capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, f"{line}: {out.stderr[-2000:]}"
        return "script"
    if exe == f"{bin_dir}/cl-release":
        click_parses(words[1:], monkeypatch)
        return "cl-release"
    if exe.endswith(".sh"):
        script = REPO / exe
        assert script.is_file(), f"{line}: {exe} does not exist"
        out = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
        assert out.returncode == 0, f"{line}: {out.stderr}"
        return "shell"
    raise AssertionError(f"a Makefile command this test cannot check: {line!r}")


VARIANTS = {"bench-continual": [{}, {"QUICK": "1"}],
            "release-major": [{}, {"NOTES": "a note", "FROM": "1.0.0"}],
            "release-minor": [{}, {"NOTES": "a note", "FROM": "1.0.0"}],
            "release-patch": [{}, {"NOTES": "a note", "FROM": "1.0.0", "IDS": "req-1 req-2"}]}


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
@pytest.mark.parametrize("target", phony_targets())
def test_every_makefile_command_line_parses(target, tmp_path, monkeypatch):
    venv = tmp_path / "venv"  # not there: install's commands are printed, not run
    kinds = set()
    for variables in VARIANTS.get(target, [{}]):
        for line in dry_run(target, venv, **variables):
            kinds.add(check_line(line, venv / "bin", monkeypatch))
    if target not in ("install", "clean"):
        assert kinds - {"install"}, f"make {target} runs nothing this test checked"


def test_the_argparse_check_catches_an_unknown_option(tmp_path, monkeypatch):
    """The check that failed before bench_eval.py had --quick: an option a script lacks fails."""
    venv = tmp_path / "venv"
    with pytest.raises(AssertionError, match="unrecognized arguments: --no-such-option"):
        check_line(f"{venv}/bin/python bench/bench_eval.py --no-such-option", venv / "bin", monkeypatch)
    with pytest.raises(AssertionError, match="No such option"):
        check_line(f"{venv}/bin/cl-release -C . release minor --no-such-option", venv / "bin", monkeypatch)
