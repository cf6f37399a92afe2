"""The ``cl-release`` command with the fake trainer, for the kill -9 tests (test_release_kill.py).

``python tests/crashrun.py -C REPO release minor ...`` runs the real CLI in this process, with
``FakeTrainer`` in place of Axolotl (seconds, no torch). With ``CL_RELEASE_TEST_PAUSE=STEP``
the process stops at that step of ``run_release`` (a ``crash_point`` name, or ``training``:
inside the fake training), writes the file ``CL_RELEASE_TEST_MARKER`` and sleeps, so the test
can kill its process group for real. Pauses inside git itself come from git hooks the test
installs (they read the same two variables). ``CL_RELEASE_TEST_NO_GATES=1``: releases are not
evaluated (the fake adapter has no model). Not a test module: pytest does not collect it.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import helpers  # noqa: E402  (tests/ on the path first)


class _SetAttr:
    """The one monkeypatch method FakeTrainer.install uses, without importing pytest."""

    def setattr(self, target, name, value) -> None:
        setattr(target, name, value)


def _pause(step: str) -> None:
    Path(os.environ["CL_RELEASE_TEST_MARKER"]).write_text(step)
    time.sleep(600)  # killed long before this ends


def main() -> None:
    args = sys.argv[1:]
    root = Path(args[args.index("-C") + 1]) if "-C" in args else Path.cwd()
    tokenizer = root / "models" / "base" / "tokenizer.json"
    if tokenizer.is_file():  # the fake adapter copies it; no need to train one again
        helpers.seed_tokenizer_json(tokenizer.read_text(encoding="utf-8"))
    trainer = helpers.FakeTrainer().install(_SetAttr())
    if os.environ.get("CL_RELEASE_TEST_NO_GATES"):  # the fake adapter cannot be evaluated
        import cl_release.eval.gates as gates

        gates.release_evaluator = lambda **kw: (lambda project, plan, entry: entry)
    step = os.environ.get("CL_RELEASE_TEST_PAUSE")
    if step:
        import cl_release.release.run as release_mod

        if step == "training":
            trainer.before = lambda root_, config: _pause(step)
        release_mod.crash_point = lambda name: _pause(name) if name == step else None
    from cl_release.cli import run

    run()


if __name__ == "__main__":
    main()
