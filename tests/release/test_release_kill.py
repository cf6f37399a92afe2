"""kill -9 at every fault point of a release, for real; the next plain release completes it.

Each test runs ``cl-release release minor`` as a subprocess in its own process group (with the
fake trainer: tests/crashrun.py), lets it reach one fault point, kills the whole group with
SIGKILL, checks what the kill left, then runs the plain command again (in this process, same
fake trainer) and checks that the repository ends exactly as after an uninterrupted release:
1.0.0 and 1.1.0 (no number skipped), both tagged, registry committed, nothing dirty, no git
lock file, every hash verified. Fault points inside git pause git itself through hooks
(fsmonitor: while a query runs or while `git add` holds .git/index.lock; reference-transaction:
while `git commit` or `git tag` holds its ref locks).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from cl_release.cli import main
from cl_release.registry import Registry
from cl_release.release.recovery import verify

from helpers import (
    REPO,
    TESTS,
    copy_repo,
    released_template,
    add_data,
    assert_registry_consistent_with_git,
    git,
    registry_data,
    tags,
)

pytestmark = pytest.mark.skipif(not hasattr(os, "killpg"), reason="needs POSIX process groups")

CRASHRUN = TESTS / "crashrun.py"
NOTES = "Q2: storage temperatures\n\n# Added\n- 24 examples"

# Every fault point, in release order (README, "Safety of the registry and outputs"), and what
# the plain re-run does: trains 1.1.0 again, adopts the finished run without training,
# finishes the recorded release (commit and/or tag), or finds everything done.
FAULT_POINTS = [
    ("git-query", "trains"),        # inside the first `git status` (reconcile)
    ("planned", "trains"),
    ("snapshots", "trains"),
    ("output-dir", "trains"),       # outputs/v1.1.0/ created, run.json not yet written
    ("training", "trains"),         # inside the training run
    ("trained", "trains"),
    ("verified", "adopts"),
    ("before-registry", "adopts"),  # evaluated, feedback rows marked used
    ("registry", "finishes"),       # registry entry written, nothing committed
    ("git-add", "finishes"),        # inside `git add` (holds .git/index.lock)
    ("git-commit", "finishes"),     # inside `git commit` (holds index, HEAD and branch locks)
    ("committed", "finishes"),
    ("git-tag", "finishes"),        # inside `git tag` (holds refs/tags/v1.1.0.lock)
    ("tagged", "done"),
]

FSMONITOR_HOOK = """#!/bin/sh
# kill tests: pause git during a query (any call) or while it holds .git/index.lock
pause=
case "$CL_RELEASE_TEST_PAUSE" in
  git-query) pause=1 ;;
  git-add) [ -e .git/index.lock ] && pause=1 ;;
esac
if [ -n "$pause" ] && [ ! -e "$CL_RELEASE_TEST_MARKER" ]; then
  echo "$CL_RELEASE_TEST_PAUSE" > "$CL_RELEASE_TEST_MARKER"
  exec sleep 600
fi
exit 1
"""

REFERENCE_TRANSACTION_HOOK = """#!/bin/sh
# kill tests: pause git while a commit or tag holds its ref locks
refs=$(cat)
if [ "$1" = prepared ] && [ -n "$CL_RELEASE_TEST_MARKER" ] && [ ! -e "$CL_RELEASE_TEST_MARKER" ]; then
  case "$CL_RELEASE_TEST_PAUSE:$refs" in
    git-commit:*refs/heads/*|git-tag:*refs/tags/*)
      echo "$CL_RELEASE_TEST_PAUSE" > "$CL_RELEASE_TEST_MARKER"
      exec sleep 600 ;;
  esac
fi
exit 0
"""


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> Path:
    """1.0.0 released, Q2 data committed: copied for every test (one release, not fourteen)."""
    with released_template(tmp_path_factory, "kill-template") as root:
        add_data(root, "q2-storage.jsonl", "datasets/domain/q2.jsonl")
    return root


@pytest.fixture
def repo(template, tmp_path, trainer) -> Path:
    return copy_repo(template, tmp_path)


def git_version() -> tuple[int, ...]:
    out = subprocess.run(["git", "--version"], capture_output=True, text=True, check=True).stdout
    return tuple(int(x) for x in out.split()[2].split(".")[:2])


def git_locks(root: Path) -> list[str]:
    """Lock files git left (index, HEAD, refs), found here rather than by the code under test."""
    dot = root / ".git"
    found = list(dot.glob("*.lock")) + list((dot / "refs").rglob("*.lock"))
    return sorted(p.relative_to(dot).as_posix() for p in found)


def install_git_hooks(root: Path) -> None:
    hooks = root / ".git" / "hooks"
    (hooks / "reference-transaction").write_text(REFERENCE_TRANSACTION_HOOK)
    (hooks / "fsmonitor-kill-test").write_text(FSMONITOR_HOOK)
    for name in ("reference-transaction", "fsmonitor-kill-test"):
        (hooks / name).chmod(0o755)
    git(root, "config", "core.fsmonitor", str(hooks / "fsmonitor-kill-test"))


def remove_git_hooks(root: Path) -> None:
    git(root, "config", "--unset", "core.fsmonitor")
    for name in ("reference-transaction", "fsmonitor-kill-test"):
        (root / ".git" / "hooks" / name).unlink()


def kill_at(root: Path, step: str, work: Path) -> None:
    """Run the release in its own process group; SIGKILL the group once it reaches ``step``."""
    marker = work / "paused"
    log_path = work / "killed-run.log"
    env = {**os.environ, "CL_RELEASE_TEST_PAUSE": step, "CL_RELEASE_TEST_MARKER": str(marker),
           "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)}
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, str(CRASHRUN), "-C", str(root), "release", "minor",
                                 "--notes", NOTES], env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not marker.exists():
            if proc.poll() is not None:
                pytest.fail(f"the release ended (rc {proc.returncode}) before {step}:\n{log_path.read_text()}")
            if time.monotonic() > deadline:
                pytest.fail(f"the release did not reach {step} in 120 s:\n{log_path.read_text()}")
            time.sleep(0.02)
        os.killpg(proc.pid, signal.SIGKILL)  # the process group: cl-release, git, its hooks
    finally:
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.wait(30)
    assert proc.returncode == -signal.SIGKILL


@pytest.mark.parametrize("step,rerun", FAULT_POINTS, ids=[p for p, _ in FAULT_POINTS])
def test_kill_9_at_every_fault_point_then_a_plain_rerun_completes(repo, trainer, tmp_path, step, rerun):
    if step in ("git-commit", "git-tag") and git_version() < (2, 28):
        pytest.skip("git's reference-transaction hook needs git 2.28")
    root = repo
    in_git = step.startswith("git-")
    if in_git:
        install_git_hooks(root)
    kill_at(root, step, tmp_path)

    # -- what the kill left: a valid registry, at most 1.1.0 more, 1.0.0 untouched
    data = registry_data(root)
    assert [m["version"] for m in data["models"]] in (["1.0.0"], ["1.0.0", "1.1.0"])
    locks = git_locks(root)
    if step in ("git-add", "git-commit"):
        assert "index.lock" in locks  # killed inside git, for real
    elif step == "git-tag":
        assert "refs/tags/v1.1.0.lock" in locks
    else:
        assert locks == []  # the first query takes no lock: nothing to be stale
    if step == "output-dir":
        assert list((root / "outputs/v1.1.0").iterdir()) == []
    if in_git:
        remove_git_hooks(root)

    # -- the plain command again
    calls = len(trainer.calls)
    result = CliRunner().invoke(main, ["-C", str(root), "release", "minor", "--notes", NOTES])
    if rerun == "done":
        assert result.exit_code == 2 and "no new examples that 1.1.0 or its ancestors have not trained on" in result.stderr, result.output
    else:
        assert result.exit_code == 0, (result.stdout, result.stderr)
    if rerun == "finishes":
        assert "Finished the interrupted release 1.1.0" in result.stdout
    if step in ("git-add", "git-commit", "git-tag"):
        assert "left by an interrupted cl-release" in result.stderr
    assert len(trainer.calls) == calls + (1 if rerun == "trains" else 0)

    # -- exactly as after an uninterrupted release
    data = registry_data(root)
    assert [m["version"] for m in data["models"]] == ["1.0.0", "1.1.0"]  # no number skipped
    assert data["current"] == "1.1.0" and data["models"][1]["notes"] == NOTES
    assert tags(root) == {"v1.0.0", "v1.1.0"}
    assert NOTES.splitlines()[-1] in git(root, "tag", "-l", "--format=%(contents)", "v1.1.0")
    assert_registry_consistent_with_git(root)
    assert git(root, "status", "--porcelain") == ""
    assert git_locks(root) == []
    checks = verify(root)
    assert checks and all(c.ok for c in checks)
    assert git(root, "log", "--format=%s").count("1.1.0") == 1
    moved = root / "outputs/.interrupted"
    if step in ("output-dir", "training", "trained"):
        assert len(list(moved.iterdir())) == 1  # the unfinished folder, kept whole, not overwritten
    else:
        assert not moved.exists()
    assert Registry(root).get("1.1.0")["adapter"]["path"] == "outputs/v1.1.0/adapter"
