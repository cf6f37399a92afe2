"""One error hierarchy. Every error a user can cause says what went wrong and what to do next.

The CLI prints ``str(error)`` on one line and exits with ``error.exit_code``; tracebacks
appear only with ``--debug`` (or ``CL_RELEASE_DEBUG=1``).
"""

from __future__ import annotations

from pathlib import Path


class ClReleaseError(Exception):
    """Base class of every error cl-release raises on purpose."""

    exit_code = 1

    def __init__(self, message: str, *, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:  # one line: message, then the next action
        text = self.message
        if self.hint:
            text = f"{text} ({self.hint})"
        return " ".join(text.split("\n"))


class UserError(ClReleaseError):
    """Bad input from the user: a flag, a version, a path."""

    exit_code = 2


class InputFileError(UserError):
    """A file the user wrote is wrong; names the file, line and field where known."""

    def __init__(
        self,
        path: str | Path,
        message: str,
        *,
        line: int | None = None,
        field: str | None = None,
        hint: str | None = None,
    ):
        self.path = str(path)
        self.line = line
        self.field = field
        where = self.path
        if line is not None:
            where += f":{line}"
        if field:
            where += f": {field}"
        super().__init__(f"{where}: {message}", hint=hint)


class ProjectError(InputFileError):
    """cl-release.yaml is missing or invalid."""


class RuleError(UserError):
    """An invalid extraction rule; ``parts`` is the path of the key under ``extraction:``
    (the project loader turns it into a :class:`ProjectError` naming the line)."""

    def __init__(self, parts: tuple, message: str):
        self.parts = parts
        self.detail = message
        name = ".".join(str(p) for p in ("extraction", *parts))
        super().__init__(f"{name}: {message}")


class DataError(InputFileError):
    """A dataset file is malformed."""


class ConflictError(UserError):
    """The request would contradict what is stored (e.g. a request id logged with other content)."""


class UnknownRequest(UserError):
    """No logged answer has this request id."""


class NothingToTrain(UserError):
    """A release has no new data to train on."""


class RenderError(ClReleaseError):
    """A template failed to render, or the rendered Axolotl config is invalid."""


class RegistryError(ClReleaseError):
    """The registry file is invalid, or an operation on it is impossible."""


class VersionError(UserError):
    """An unknown or malformed version was asked for."""


class GitError(ClReleaseError):
    """The release repository's git state does not allow the operation."""


class LockedError(ClReleaseError):
    """Another cl-release process holds the lock."""


class TrainingError(ClReleaseError):
    """Axolotl training or merging failed."""


class EvaluationError(ClReleaseError):
    """A model could not be loaded or evaluated (missing files, a judge that did not answer)."""


class HubError(ClReleaseError):
    """Uploading to the Hugging Face Hub failed. ``status``: the Hub's HTTP status (None: the
    network, or no answer)."""

    def __init__(self, message: str, *, status: int | None = None, hint: str | None = None):
        super().__init__(message, hint=hint)
        self.status = status


class IntegrityError(ClReleaseError):
    """A file's content no longer matches the hash recorded for it."""


class UpstreamError(ClReleaseError):
    """The model server behind ``cl-release serve`` failed: down, 5xx, or an answer it could not
    read. ``status`` is what the gateway answers (502; 504 for :class:`UpstreamTimeout`; the
    upstream's own 4xx when it refused the request)."""

    def __init__(self, message: str, *, status: int = 502, hint: str | None = None):
        super().__init__(message, hint=hint)
        self.status = status


class UpstreamTimeout(UpstreamError):
    """The model server did not answer in time."""

    def __init__(self, message: str, *, hint: str | None = None):
        super().__init__(message, status=504, hint=hint)


class FieldValueError(ValueError):
    """One field of a record, feedback row or value is wrong. Raised by the low-level checks
    (times, numbers); the caller adds file and line and turns it into one of the errors above."""

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.field = field
