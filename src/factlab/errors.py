"""Exceptions raised by factlab. Every message names the problem and the fix."""

from __future__ import annotations


class FactlabError(Exception):
    """Base class of all factlab errors."""


class UnsupportedArchitectureError(FactlabError, ValueError):
    """The model's architecture has no factlab adapter."""


class SiteError(FactlabError, KeyError):
    """A site name is malformed or does not exist for this architecture."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0]) if self.args else ""


class SubjectNotFoundError(FactlabError, ValueError):
    """The subject string does not occur in the prompt."""


class ModelLoadError(FactlabError, OSError):
    """A model could not be found or loaded; the message lists the offline choices."""


class NonFiniteError(FactlabError, FloatingPointError):
    """A tensor that must be finite (logits, statistics, solutions) holds NaN or inf."""


class InputError(FactlabError, ValueError):
    """A user-supplied value (an option, a file, a request) is malformed or out of range."""


class RunLockedError(FactlabError, RuntimeError):
    """Another live process is writing the same run folder."""


class IntegrityError(FactlabError, ValueError):
    """A saved artefact (edit, statistics, run record) fails its checksum or holds non-finite numbers."""


class Interrupted(FactlabError, RuntimeError):
    """Long work was stopped by SIGINT or SIGTERM; the message says what was saved and how to resume.

    ``exit_code`` is what the CLI exits with: 130 after SIGINT, 143 after SIGTERM (128 + the signal), as shells
    report a process stopped by that signal.
    """

    def __init__(self, message: str, *, exit_code: int = 130):
        super().__init__(message)
        self.exit_code = exit_code
