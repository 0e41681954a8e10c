"""Errors a user can cause, each with a message that says what, where, and what to do.

The CLI prints a `UserError` as one clear message and exits with code 2, without a traceback.
Anything that is not a `UserError` is a bug and keeps its traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """Something the user can fix: bad input, a missing file, a refused setting."""

    exit_code = 2

    def __init__(self, message: str, *, hint: str | None = None):
        self.message = message
        self.hint = hint
        super().__init__(message if hint is None else f"{message}\n  hint: {hint}")


class InputNotFoundError(UserError):
    """A file or folder named on the command line does not exist or is unreadable."""


class BundleError(UserError):
    """A training bundle is missing, incomplete, tampered with or incompatible."""


class ModelError(UserError):
    """A model folder or GGUF file cannot be used (unsupported, unsafe, incomplete)."""


class AdapterError(UserError):
    """Adapter settings or a PEFT adapter folder do not fit the model."""


class DataError(UserError):
    """A dataset file is malformed; the message names the file and line."""


class TemplateError(DataError):
    """A chat template failed to render or tried to leave its sandbox."""


class ConfigError(UserError):
    """A command-line option or config file holds an invalid value."""


class RunError(UserError):
    """A run folder or checkpoint cannot be used (missing, corrupt, mismatched)."""


class ProviderError(UserError):
    """An execution provider was asked for that is not available or cannot do the job."""


class OutputExistsError(UserError):
    """The output path exists and --force was not given."""


class DiskWriteError(UserError):
    """Writing output failed (full disk, no permission); nothing half-written was left behind."""


class TrainingDivergedError(UserError):
    """The loss became NaN or infinite; the last good checkpoint was kept."""
