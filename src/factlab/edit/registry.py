"""Editors as parts of one core: solvers and policies registered by name (docs/edit.md, "Solvers, policies
and the registry").

- A :class:`Solver` turns one layer's inputs (:class:`SolveInput`: statistics, keys ``K`` (d_in, n), residuals
  ``R`` (d_out, n), hyperparameters, optional history ``H = sum K_p K_p^T`` (d_in, d_in)) into low-rank factors
  ``(A, B)`` with ``Delta W = A @ B.T`` in the projection's (d_out, d_in) orientation.
- A :class:`Policy` decides which layers are solved and how the residual is spread (:mod:`factlab.edit.policy`).
- A method name is a registered solver's name; it maps to ``(solver, solver.default_policy)``.

Built in: solvers ``rome``, ``memit``, ``emmet``, ``memit_history``, ``alphaedit``; policies ``per_request``
(ROME: one request after another on one layer), ``single_layer``, ``spread`` (MEMIT's spreading) and
``auto`` (``single_layer`` for one layer, else ``spread``; EMMET's default). Register your own::

    from factlab.edit.registry import Solver, register_solver
    from factlab.edit.solvers import memit_factors
    register_solver("my_memit", Solver(lambda s: memit_factors(s.stats.factor(2 * s.hp.mom2_update_weight), s.K, s.R)))
    edit(lm, requests, method="my_memit")

The two dicts below are the only module state; registering a taken name raises unless ``replace=True``.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from factlab.edit.errors import EditError
from factlab.edit.hparams import EditHparams
from factlab.edit.policy import Objective, Update, single_layer, spread
from factlab.edit.requests import Request
from factlab.edit.solvers import (
    alphaedit_factors,
    emmet_factors,
    memit_factors,
    memit_history_factors,
    null_space_projector,
    rome_factors,
)
from factlab.edit.stats import SecondMoment
from factlab.edit.value_cache import ValueCache
from factlab.edit.values import Values
from factlab.models import LoadedModel
from factlab.models.adapters.base import Projection

Factors = tuple[torch.Tensor, torch.Tensor]


@dataclass
class SolveInput:
    """What a solver gets for one layer.

    Attributes:
        stats: the layer's second moment ``C`` (d_in, d_in) (use ``stats.factor(scale, ridge)`` / ``stats.matrix``).
        K: keys (d_in, n); R: residuals (d_out, n) (what ``Delta W K`` must add).
        hp: the edit's hyperparameters.
        history: ``sum K_p K_p^T`` (d_in, d_in) float64 over earlier edits at this key site, or None (none
            given). Given to every solver; one with ``uses_history=False`` ignores it.
        site: the key site (``"layer.4.mlp.key"``).
        info: a dict the solver may fill with what it wants logged (JSON-able); it is stored in the result's
            ``metadata["solver"]["solves"]`` and in the matching ``solves`` entry as ``"solver_info"``.
    """

    stats: SecondMoment
    K: torch.Tensor
    R: torch.Tensor
    hp: EditHparams
    history: torch.Tensor | None
    site: str
    info: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Solver:
    """A registered solver.

    Attributes:
        solve: ``SolveInput -> (A, B)``, ``A`` (d_out, r), ``B`` (d_in, r).
        uses_history: whether ``solve`` reads ``SolveInput.history``.
        default_policy: the policy name used when ``edit(policy=None)``.
        hparams_from: the built-in method (``rome``, ``memit``, ``emmet``) whose per-model defaults it starts from.
        strict_conflicts: refuse a batch with two targets for one subject and relation even when they
            differ only in the relation's wording (EMMET's equality constraint cannot satisfy both).
        doc: one line shown in listings.
    """

    solve: Callable[[SolveInput], Factors]
    uses_history: bool = False
    default_policy: str = "spread"
    hparams_from: str = "memit"
    strict_conflicts: bool = False
    doc: str = ""


@dataclass
class PolicyRun:
    """What a policy gets: the edit's requests and projections and the callbacks that solve and write.

    ``check_values(offset)`` returns the checker for values computed for ``requests[offset:]`` (it records
    them and says which to keep); ``value_cache`` may be used only before the first ``update``.
    """

    lm: LoadedModel
    requests: list[Request]
    projs: dict[int, Projection]
    hp: EditHparams
    templates: list[str]
    key_templates: list[str]
    objective: Objective
    update: Update
    check_values: Callable[[int], Callable[[Values], list[int]]]
    timings: dict[str, float]
    value_cache: ValueCache | None


@dataclass(frozen=True)
class Policy:
    """A registered policy.

    Attributes:
        run: carries out the edit with ``PolicyRun`` (calls ``objective`` and ``update`` per solve).
        one_layer: whether it edits exactly one layer (checked before any work).
        label: ``hp -> "single" | "spread"`` for ``metadata["policy"]``.
        doc: one line shown in listings.
    """

    run: Callable[[PolicyRun], None]
    one_layer: bool = False
    label: Callable[[EditHparams], str] = lambda hp: "spread"
    doc: str = ""


_SOLVERS: dict[str, Solver] = {}
_POLICIES: dict[str, Policy] = {}
_BUILTIN_SOLVERS = ("rome", "memit", "emmet", "memit_history", "alphaedit")


def register_solver(name: str, solver: Solver, *, replace: bool = False) -> Solver:
    """Register ``solver`` as ``name`` (then ``edit(method=name)`` uses it); a taken name raises unless ``replace``."""
    key = _name(name)
    if not isinstance(solver, Solver):
        raise EditError(f"register_solver({name!r}, ...) needs a factlab.edit.registry.Solver, not {type(solver).__name__}; wrap your function: Solver(fn)")
    if key in _SOLVERS and not replace:
        raise EditError(f"a solver named {key!r} is already registered; pick another name or pass replace=True")
    if key in _BUILTIN_SOLVERS and key in _SOLVERS:
        raise EditError(f"{key!r} is a built-in solver and cannot be replaced; register yours under another name")
    if solver.hparams_from not in ("rome", "memit", "emmet"):
        raise EditError(f"Solver.hparams_from must be 'rome', 'memit' or 'emmet', not {solver.hparams_from!r}")
    _SOLVERS[key] = solver
    return solver


def register_policy(name: str, policy: Policy, *, replace: bool = False) -> Policy:
    """Register ``policy`` as ``name`` (``edit(policy=name)`` or a solver's ``default_policy``)."""
    key = _name(name)
    if not isinstance(policy, Policy):
        raise EditError(f"register_policy({name!r}, ...) needs a factlab.edit.registry.Policy, not {type(policy).__name__}; wrap your function: Policy(fn)")
    if key in _POLICIES and not replace:
        raise EditError(f"a policy named {key!r} is already registered; pick another name or pass replace=True")
    _POLICIES[key] = policy
    return policy


def unregister_solver(name: str) -> None:
    """Remove a solver registered from outside (built-ins stay)."""
    key = _name(name)
    if key in _BUILTIN_SOLVERS:
        raise EditError(f"{key!r} is a built-in solver and cannot be removed")
    _SOLVERS.pop(key, None)


def unregister_policy(name: str) -> None:
    """Remove a policy registered from outside (built-ins stay)."""
    key = _name(name)
    if key in ("per_request", "single_layer", "spread", "auto"):
        raise EditError(f"{key!r} is a built-in policy and cannot be removed")
    _POLICIES.pop(key, None)


def solver_names() -> tuple[str, ...]:
    """Registered solver (= method) names, built-ins first."""
    return tuple(_SOLVERS)


def policy_names() -> tuple[str, ...]:
    return tuple(_POLICIES)


def get_solver(name: str) -> Solver:
    """The solver registered as ``name``; unknown names raise listing the registered ones."""
    key = _name(name)
    if key not in _SOLVERS:
        raise EditError(f"unknown method {name!r}; choose one of {', '.join(_SOLVERS)} (or register yours with factlab.edit.registry.register_solver)")
    return _SOLVERS[key]


def get_policy(name: str) -> Policy:
    """The policy registered as ``name``; unknown names raise listing the registered ones."""
    key = _name(name)
    if key not in _POLICIES:
        raise EditError(f"unknown policy {name!r}; choose one of {', '.join(_POLICIES)} (or register yours with factlab.edit.registry.register_policy)")
    return _POLICIES[key]


def get_method(name: str, policy: str | None = None) -> tuple[Solver, Policy]:
    """``(solver, policy)`` for a method name: its solver and ``policy`` or the solver's default policy."""
    solver = get_solver(name)
    return solver, get_policy(policy or solver.default_policy)


def _name(name: str) -> str:
    if not isinstance(name, str) or not name.strip():
        raise EditError(f"a registry name must be a non-empty string, not {name!r}")
    return name.strip().lower()


# --- built-in solvers ---------------------------------------------------------------------------------


def _rome(s: SolveInput) -> Factors:
    """ROME: one key, the unscaled ``C`` (ridge included)."""
    if s.K.shape[1] != 1:
        raise EditError(f"the rome solver takes one request per solve, got {s.K.shape[1]}; use the 'per_request' policy")
    return rome_factors(s.stats.factor(1.0, s.hp.ridge), s.K[:, 0], s.R[:, 0])


def _memit(s: SolveInput) -> Factors:
    return memit_factors(s.stats.factor(s.hp.mom2_update_weight, s.hp.ridge), s.K, s.R)


def _emmet(s: SolveInput) -> Factors:
    return emmet_factors(s.stats.factor(s.hp.mom2_update_weight, s.hp.ridge), s.K, s.R, s.hp.emmet_lambda)


def _memit_history(s: SolveInput) -> Factors:
    s.info["history"] = s.history is not None
    return memit_history_factors(s.stats.matrix(s.hp.mom2_update_weight, s.hp.ridge), s.history, s.K, s.R)


def _alphaedit(s: SolveInput) -> Factors:
    P, kept = null_space(s.stats, s.hp.nullspace_threshold)
    s.info.update(nullspace_threshold=s.hp.nullspace_threshold, kept_dim=kept, dim=s.stats.dim, l2=s.hp.alphaedit_l2, history=s.history is not None)
    if kept == 0:
        raise EditError(
            f"AlphaEdit's null space at {s.site} is empty: no eigenvalue of the statistics is below nullspace_threshold="
            f"{s.hp.nullspace_threshold:g}, so the edit could change nothing; raise hparams nullspace_threshold"
        )
    return alphaedit_factors(P, s.history, s.K, s.R, s.hp.alphaedit_l2)


# --- AlphaEdit's projector cache ---------------------------------------------------------------------


def projector_key(stats: SecondMoment, threshold: float) -> str:
    """Content key of the projector: the statistics' cache key (or a hash of their values) and the threshold."""
    if stats.spec is not None:
        base = stats.spec.key()
    else:
        m = stats.mom2.detach().float().contiguous().cpu()
        base = "values_" + hashlib.sha256(m.numpy().tobytes() + str(tuple(m.shape)).encode()).hexdigest()[:20]
    return f"{base}_nullspace_{threshold:.6g}"


def projector_path(stats: SecondMoment, threshold: float) -> Path:
    """``cache_dir()/projectors/<key>.safetensors``."""
    from factlab.models import cache_dir

    return cache_dir() / "projectors" / f"{projector_key(stats, threshold)}.safetensors"


def null_space(stats: SecondMoment, threshold: float) -> tuple[torch.Tensor, int]:
    """``(P, kept_dim)``: AlphaEdit's projector (d_in, d_in) float64 of ``stats`` at ``threshold``, computed once
    per statistics and threshold and cached on disk (a damaged cache file is recomputed and rewritten)."""
    from factlab.io import load_tensors, save_tensors

    path = projector_path(stats, threshold)
    if path.exists():
        try:
            t = load_tensors(path)
            P, kept = t["P"], int(t["kept"])
            if P.shape == (stats.dim, stats.dim) and P.dtype == torch.float64 and bool(torch.isfinite(P).all()):
                return P, kept
        except Exception:  # unreadable: recompute below and overwrite atomically
            pass
    P, evals = null_space_projector(stats.mom2, threshold)
    kept = int((evals < threshold).sum())
    save_tensors(path, {"P": P, "kept": torch.tensor(kept)}, metadata={"threshold": repr(threshold), "key": projector_key(stats, threshold)})
    return P, kept


# --- built-in policies --------------------------------------------------------------------------------


def _per_request(run: PolicyRun) -> None:
    """ROME: each request solved on the model the earlier ones edited (only the first may use the value cache)."""
    (proj,) = run.projs.values()
    for i, r in enumerate(run.requests):
        single_layer(run.lm, [r], proj, check_values=run.check_values(i), value_cache=run.value_cache if i == 0 else None, **_kw(run))


def _single_layer(run: PolicyRun) -> None:
    (proj,) = run.projs.values()
    single_layer(run.lm, run.requests, proj, check_values=run.check_values(0), value_cache=run.value_cache, **_kw(run))


def _spread(run: PolicyRun) -> None:
    spread(run.lm, run.requests, run.projs, check_values=run.check_values(0), value_cache=run.value_cache, **_kw(run))


def _auto(run: PolicyRun) -> None:
    (_single_layer if len(run.projs) == 1 else _spread)(run)


def _kw(run: PolicyRun) -> dict[str, Any]:
    return dict(hp=run.hp, templates=run.templates, key_templates=run.key_templates, objective=run.objective, update=run.update, timings=run.timings)


register_policy("per_request", Policy(_per_request, one_layer=True, label=lambda hp: "single",
                                      doc="one layer; each request solved after the earlier ones are written (ROME)"))
register_policy("single_layer", Policy(_single_layer, one_layer=True, label=lambda hp: "single",
                                       doc="one layer; the value at the projection's output; one solve for the batch"))
register_policy("spread", Policy(_spread, doc="MEMIT's spreading: the value at the last layer's residual, (z - h)/(layers left) per layer"))
register_policy("auto", Policy(_auto, label=lambda hp: "single" if len(hp.layers) == 1 else "spread",
                               doc="single_layer for one layer, spread for several (EMMET)"))

register_solver("rome", Solver(_rome, default_policy="per_request", hparams_from="rome", doc="ROME: equality for one key, C preserved"))
register_solver("memit", Solver(_memit, hparams_from="memit", doc="MEMIT: R K^T (lambda C + K K^T)^-1"))
register_solver("emmet", Solver(_emmet, default_policy="auto", hparams_from="emmet", strict_conflicts=True,
                                doc="EMMET: batch equality, R (K^T C_s^-1 K + mu I)^-1 K^T C_s^-1"))
register_solver("memit_history", Solver(_memit_history, uses_history=True, hparams_from="memit",
                                        doc="MEMIT with history (RLS): R K^T (lambda C + K_p K_p^T + K K^T)^-1"))
register_solver("alphaedit", Solver(_alphaedit, uses_history=True, hparams_from="memit",
                                    doc="AlphaEdit: R K^T P (K_p K_p^T P + K K^T P + l2 I)^-1, P the null space of C"))
