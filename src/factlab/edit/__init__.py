"""Rewrite facts in a model's weights: ROME, MEMIT, EMMET, MEMIT with history and AlphaEdit on one
preservation-memorisation core (solvers and policies registered by name: :mod:`factlab.edit.registry`).

    from factlab.edit import edit, Request
    res = edit(lm, Request("{} is located in the city of", "The Eiffel Tower", " Rome"))
    res.restore()          # the original weights, bit for bit
    res.apply()            # edited again
    res.save("eiffel-rome")   # checksummed, with the sha256 of the weights it was made on
    # later, on a freshly loaded model (refused if lm already carries the edit or is not its base):
    EditResult.load("eiffel-rome", lm).apply()

See ``docs/edit.md``.
"""

import sys

from factlab.edit.api import edit, edit_sequential, resolve_hparams
from factlab.edit.context import context_templates
from factlab.edit.errors import (
    AlreadyAppliedError,
    BaseMismatchError,
    ConflictingRequestsError,
    CorruptEditError,
    DivergenceError,
    EditError,
    EditNotFoundError,
    EditStateError,
    InvalidRequestError,
    NonFiniteStatisticsError,
    SingularStatisticsError,
    StatsMismatchError,
    TargetAlreadyKnownError,
)
from factlab.edit.hparams import EditHparams, all_hparams, default_hparams
from factlab.edit.registry import (
    Policy,
    PolicyRun,
    Solver,
    SolveInput,
    get_policy,
    get_solver,
    policy_names,
    register_policy,
    register_solver,
    solver_names,
)
from factlab.edit.requests import Request, as_requests, find_conflicts, load_requests
from factlab.edit.result import EditResult, SavedEdit, read_saved_edit
from factlab.edit.stream import EditStream, StreamConfigError, StreamError, StreamMismatchError, batch_id
from factlab.edit.stats import SecondMoment, StatsSpec, export_stats, import_stats, second_moment, second_moments
from factlab.edit.value_cache import ValueCache
from factlab.edit.values import Values

__all__ = [
    "AlreadyAppliedError",
    "BaseMismatchError",
    "ConflictingRequestsError",
    "CorruptEditError",
    "DivergenceError",
    "EditError",
    "EditHparams",
    "EditNotFoundError",
    "EditResult",
    "EditStream",
    "EditStateError",
    "InvalidRequestError",
    "NonFiniteStatisticsError",
    "Policy",
    "PolicyRun",
    "Request",
    "SavedEdit",
    "SecondMoment",
    "SingularStatisticsError",
    "SolveInput",
    "Solver",
    "StatsMismatchError",
    "StatsSpec",
    "StreamConfigError",
    "StreamError",
    "StreamMismatchError",
    "TargetAlreadyKnownError",
    "ValueCache",
    "Values",
    "all_hparams",
    "as_requests",
    "batch_id",
    "context_templates",
    "default_hparams",
    "edit",
    "edit_sequential",
    "export_stats",
    "find_conflicts",
    "get_policy",
    "get_solver",
    "import_stats",
    "load_requests",
    "policy_names",
    "register_policy",
    "register_solver",
    "read_saved_edit",
    "resolve_hparams",
    "second_moment",
    "second_moments",
    "solver_names",
]


class _CallablePackage(sys.modules[__name__].__class__):
    """Lets ``factlab.edit(lm, requests, ...)`` call :func:`edit` while ``factlab.edit`` stays a package."""

    def __call__(self, *args, **kwargs) -> EditResult:
        return edit(*args, **kwargs)


sys.modules[__name__].__class__ = _CallablePackage
