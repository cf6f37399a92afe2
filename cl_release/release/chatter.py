"""Import-time chatter of the training stack, kept in a log file instead of the terminal.

Importing torch, transformers and PEFT on a CPU machine prints lines that say nothing to a
user: torchao's "Failed to load ….so" (CUDA extensions of a CPU build), torch's ``_pytree``
deprecation notes, bitsandbytes' "Failed to load CPU gemm_4bit_forward" and the ``kernels``
package's offline warnings. ``Chatter`` collects them (log records of those libraries and
Python warnings) while it is active; ``write(path)`` appends them to a log file such as a
release's ``train.log``. Anything else (errors of cl-release itself) is untouched.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

# Loggers whose records are chatter here (their children included).
NOISY_LOGGERS = ("torchao", "torch.utils._pytree", "torch._logging", "bitsandbytes", "kernels",
                 "transformers.modeling_utils", "transformers.utils.import_utils")
# Python warnings raised from these modules (by module path prefix) are chatter too.
NOISY_WARNING_MODULES = ("torchao", "torch", "bitsandbytes", "kernels", "transformers", "peft", "accelerate")


class _ListHandler(logging.Handler):
    def __init__(self, lines: list[str]) -> None:
        super().__init__(logging.DEBUG)
        self.lines = lines
        self.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.lines.append(self.format(record))
        except Exception:  # noqa: BLE001 - a log line must never break the caller
            pass


class Chatter:
    """Context manager: collect the training stack's import-time log lines and warnings.

    ``with Chatter() as chatter: import torch ...`` then ``chatter.write(path)``. Log records
    of ``NOISY_LOGGERS`` go to ``chatter.lines`` and not to their usual handlers; warnings
    from ``NOISY_WARNING_MODULES`` likewise. Settings are restored on exit.
    """

    def __init__(self) -> None:
        self.lines: list[str] = []
        self._handler = _ListHandler(self.lines)
        self._saved: list[tuple[logging.Logger, bool]] = []
        self._warnings = None
        self._showwarning = None

    def __enter__(self) -> "Chatter":
        for name in NOISY_LOGGERS:
            logger = logging.getLogger(name)
            self._saved.append((logger, logger.propagate))
            logger.addHandler(self._handler)
            logger.propagate = False
        self._warnings = warnings.catch_warnings()
        self._warnings.__enter__()
        self._showwarning = warnings.showwarning
        original = self._showwarning

        def showwarning(message, category, filename, lineno, file=None, line=None):
            path = str(filename).replace("\\", "/")
            if any(f"/{mod}/" in path or f"site-packages/{mod}" in path for mod in NOISY_WARNING_MODULES):
                self.lines.append(f"WARNING {category.__name__}: {message} ({filename}:{lineno})")
            else:
                original(message, category, filename, lineno, file, line)

        warnings.showwarning = showwarning
        return self

    def __exit__(self, *exc) -> None:
        warnings.showwarning = self._showwarning
        self._warnings.__exit__(*exc)
        for logger, propagate in reversed(self._saved):
            logger.removeHandler(self._handler)
            logger.propagate = propagate
        self._saved.clear()

    def write(self, path: Path, header: str = "import-time messages of the training stack (not errors)") -> None:
        """Append the collected lines to ``path`` (nothing when there are none)."""
        if not self.lines:
            return
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a", encoding="utf-8") as f:
            f.write(f"--- cl-release: {header}\n")
            f.write("".join(line.rstrip("\n") + "\n" for line in self.lines))
