"""Import-time chatter of the training stack goes to a log file, not the terminal."""

from __future__ import annotations

import logging
import warnings

import pytest

from cl_release.release.chatter import Chatter


@pytest.fixture
def loggers_at_default_level():
    """torchao and torch set their loggers to ERROR once imported (by an earlier test in the
    same process): the test's warnings must reach the handlers whatever ran before."""
    names = ("torchao", "torch.utils._pytree")
    levels = {n: logging.getLogger(n).level for n in names}
    for n in names:
        logging.getLogger(n).setLevel(logging.NOTSET)
    yield
    for n, level in levels.items():
        logging.getLogger(n).setLevel(level)


@pytest.mark.filterwarnings("ignore:ours")
@pytest.mark.usefixtures("loggers_at_default_level")
def test_chatter_collects_library_lines_and_warnings_and_restores_everything(tmp_path, capsys, caplog):
    logger = logging.getLogger("torchao")
    before = (logger.propagate, list(logger.handlers), warnings.showwarning)
    with Chatter() as chatter:
        logging.getLogger("torchao").warning("Failed to load /x/_C_mxfp8.so")
        logging.getLogger("torch.utils._pytree").warning("register_constant() is deprecated")
        warnings.warn_explicit("Skipping publisher trust check", UserWarning,
                               "/venv/lib/python3.11/site-packages/bitsandbytes/backends/cpu/ops.py", 247)
        warnings.warn_explicit("ours", UserWarning, "/work/cl_release/release.py", 1)
        logging.getLogger("cl_release.test").warning("an error of our own")
    assert (logger.propagate, list(logger.handlers), warnings.showwarning) == before
    assert [line.split(":")[0] for line in chatter.lines] == ["WARNING torchao", "WARNING torch.utils._pytree",
                                                             "WARNING UserWarning"]
    err = capsys.readouterr().err  # "ours" went on to the usual warning display (pytest records it)
    assert "Skipping publisher" not in err and "_C_mxfp8" not in err and not any("ours" in x for x in chatter.lines)
    assert "an error of our own" in caplog.text and "_C_mxfp8" not in caplog.text
    log = tmp_path / "train.log"
    log.write_text("training output\n")
    chatter.write(log)
    text = log.read_text()
    assert text.startswith("training output\n--- cl-release: import-time messages") and "_C_mxfp8.so" in text
    empty = Chatter()
    empty.write(tmp_path / "none.log")
    assert not (tmp_path / "none.log").exists()
