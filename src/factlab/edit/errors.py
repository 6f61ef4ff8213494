"""Errors raised by :mod:`factlab.edit`. Every message names the problem and the fix."""

from __future__ import annotations

from factlab.errors import FactlabError, InputError, IntegrityError, NonFiniteError


class EditError(FactlabError, ValueError):
    """An edit could not be made; the model's weights are left as they were."""


class InvalidRequestError(EditError):
    """A request is malformed (no ``{}``/subject in the prompt, empty target, ...)."""


class ConflictingRequestsError(EditError):
    """Two requests in one batch ask for different targets for the same subject and relation."""


class TargetAlreadyKnownError(EditError):
    """The model already predicts the requested target; there is nothing to edit."""


class SingularStatisticsError(EditError):
    """The second-moment matrix is not positive definite (too few tokens for its dimension)."""


class NonFiniteStatisticsError(EditError, NonFiniteError):
    """The second-moment statistics hold NaN or inf."""


class DivergenceError(EditError, NonFiniteError):
    """The value optimisation or a solve produced NaN/inf or an exploding update."""


class EditStateError(EditError):
    """``apply``/``restore`` would overwrite weights changed by someone else since."""


class AlreadyAppliedError(EditStateError):
    """A saved edit is applied to weights that already carry it (applying it again would add it twice)."""


class BaseMismatchError(EditStateError):
    """A saved edit is applied to weights that are not the ones it was made on."""


class EditNotFoundError(EditError, InputError):
    """A path given as a saved edit does not exist or is not a saved edit folder."""


class CorruptEditError(EditError, IntegrityError):
    """A saved edit is damaged: unreadable file, a tensor failing its sha256 checksum, or NaN/inf in a delta."""


class StatsMismatchError(EditError):
    """Imported statistics were computed for another model, site or dimension."""
