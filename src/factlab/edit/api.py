"""``edit`` and ``edit_sequential``: requests in, an applied :class:`EditResult` out."""

from __future__ import annotations

import time
from pathlib import Path
from collections.abc import Iterable, Mapping
from typing import Any, Literal

import torch

from factlab.edit.context import context_templates
from factlab.edit.errors import EditError, TargetAlreadyKnownError
from factlab.edit.hparams import EditHparams, default_hparams
from factlab.edit.registry import PolicyRun, SolveInput, get_method
from factlab.edit.requests import Request, as_requests, check_conflicts
from factlab.edit.result import EditResult, edited_value
from factlab.edit.solvers import dense
from factlab.edit.stats import SecondMoment, check_finite, second_moments
from factlab.edit.value_cache import ValueCache
from factlab.edit.values import Values
from factlab.models import LoadedModel
from factlab.models.adapters.base import Projection

OnKnown = Literal["error", "skip", "edit"]
StatsArg = Mapping[Any, "SecondMoment | torch.Tensor"] | None
HistoryArg = Mapping[str, torch.Tensor] | None


def resolve_hparams(
    lm: LoadedModel, method: str, hparams: EditHparams | Mapping[str, Any] | None = None, layers: Iterable[int] | None = None,
    projection: str | None = None, *, policy: str | None = None,
) -> EditHparams:
    """The hyperparameters an edit will use: the model's defaults, updated by ``hparams`` (an
    :class:`EditHparams` replaces them, a dict changes fields), ``layers`` and ``projection``.

    ``method`` is a registered solver's name (:mod:`factlab.edit.registry`; unknown names raise listing them);
    its defaults are those of its ``hparams_from`` built-in. ``policy`` (default: the solver's) is checked
    against the layers.
    """
    method = method.lower()
    solver, pol = get_method(method, policy)
    if isinstance(hparams, EditHparams):
        hp = hparams
    else:
        hp = default_hparams(lm, solver.hparams_from)
        if solver.hparams_from != method:
            hp = hp.replace(source=hp.source + f"; {method} starts from the {solver.hparams_from} defaults")
        if hparams:
            hp = hp.replace(**dict(hparams))
    if layers is not None:
        hp = hp.replace(layers=tuple(sorted(set(int(x) for x in layers))), source=hp.source + "; layers set by the caller")
    if projection is not None:
        hp = hp.replace(projection=projection)
    for layer in hp.layers:
        if not 0 <= layer < lm.adapter.n_layers:
            raise EditError(f"edit layer {layer} is outside this model's layers 0..{lm.adapter.n_layers - 1}")
    if pol.one_layer and len(hp.layers) != 1:
        raise EditError(f"{method.upper()} edits one layer (policy {policy or solver.default_policy!r}), got layers {list(hp.layers)}; "
                        "use method='memit' or 'emmet' (or policy='spread') to spread an edit over several")
    return hp


def resolve_stats(lm: LoadedModel, projs: dict[int, Projection], hp: EditHparams, stats: StatsArg) -> dict[int, SecondMoment]:
    """One :class:`SecondMoment` per edit layer: from ``stats`` (keyed by key site or layer) or the cache/corpus.

    Everything is checked here, before any value optimisation: ``stats`` keys that name no edit layer, a wrong
    dimension and NaN/inf (:class:`NonFiniteStatisticsError`; a cached file holding them raises
    :class:`~factlab.errors.IntegrityError` naming it).
    """
    _check_stats_keys(projs, stats)
    out: dict[int, SecondMoment] = {}
    missing: list[int] = []
    for layer, proj in projs.items():
        given = None
        if stats is not None:
            given = stats.get(proj.key_site, stats.get(layer))
        if given is None:
            missing.append(layer)
        else:
            out[layer] = given if isinstance(given, SecondMoment) else SecondMoment(torch.as_tensor(given).float(), 0, None)
    if missing:
        sites = [projs[layer].key_site for layer in missing]
        got = second_moments(lm, sites, corpus=hp.stats_corpus, samples=hp.stats_samples, max_length=hp.stats_max_length)
        for layer, site in zip(missing, sites):
            out[layer] = got[site]
    for layer, m in out.items():
        d_in = projs[layer].weight(lm.model).shape[1]
        if m.dim != d_in:
            raise EditError(f"statistics for layer {layer} are {m.dim}-dimensional but {projs[layer].key_site} has {d_in} dims; pass the right statistics")
        check_finite(m, f"for layer {layer} ({projs[layer].key_site})")
    return out


def resolve_history(lm: LoadedModel, projs: dict[int, Projection], history: HistoryArg) -> dict[str, torch.Tensor]:
    """The ``history`` entries of this edit's key sites as float64 (d_in, d_in); checked before any work.

    Entries for other sites are ignored (a stream keeps one for every site it has edited).
    """
    if history is None:
        return {}
    if not isinstance(history, Mapping):
        raise EditError(f"history must map key sites (e.g. 'layer.4.mlp.key') to (d_in, d_in) matrices, not {type(history).__name__}")
    out: dict[str, torch.Tensor] = {}
    for layer, proj in projs.items():
        H = history.get(proj.key_site)
        if H is None:
            continue
        H = torch.as_tensor(H).detach().cpu().double()
        d_in = proj.weight(lm.model).shape[1]
        if H.shape != (d_in, d_in):
            raise EditError(f"history[{proj.key_site!r}] has shape {tuple(H.shape)} but the key site has {d_in} dims; "
                            f"pass the sum of K_p K_p^T ({d_in} x {d_in}) of earlier edits at that site")
        if not bool(torch.isfinite(H).all()):
            raise EditError(f"history[{proj.key_site!r}] holds NaN/inf; rebuild it from the earlier results' solves keys")
        out[proj.key_site] = H
    return out


def _check_stats_keys(projs: dict[int, Projection], stats: StatsArg) -> None:
    """Refuse ``stats`` entries that belong to no edit layer (they would be ignored and others computed silently)."""
    if not stats:
        return
    wanted = {p.key_site for p in projs.values()} | set(projs)
    stray = [k for k in stats if k not in wanted]
    if stray:
        shown = ", ".join(f"{p.key_site} (layer {layer})" for layer, p in projs.items())
        raise EditError(f"statistics given for {', '.join(map(repr, stray))}, which is not an edit layer's key site; "
                        f"this edit needs {shown}: pass statistics for those, or set layers= to match")


def _to_param(proj: Projection, model: torch.nn.Module, A: torch.Tensor, B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Canonical factors (``Delta W = A B^T`` in (d_out, d_in)) -> factors in the stored parameter's orientation."""
    if proj.rows is not None:
        p = proj.parameter(model)
        full_out = p.shape[1] if proj.transposed else p.shape[0]
        full = torch.zeros(full_out, A.shape[1], dtype=A.dtype)
        full[proj.rows[0] : proj.rows[1]] = A
        A = full
    return (B, A) if proj.transposed else (A, B)


def edit(
    lm: LoadedModel,
    requests: Request | Mapping[str, Any] | Iterable[Request | Mapping[str, Any]],
    *,
    method: str = "rome",
    layers: Iterable[int] | None = None,
    hparams: EditHparams | Mapping[str, Any] | None = None,
    stats: StatsArg = None,
    projection: str | None = None,
    on_known: OnKnown = "error",
    value_cache: ValueCache | str | Path | None = None,
    policy: str | None = None,
    history: HistoryArg = None,
) -> EditResult:
    """Rewrite facts in ``lm``'s weights and return what was done (the model is edited on return).

    Args:
        requests: one or many :class:`Request` (or CounterFact ``requested_rewrite``-shaped dicts).
        method: a registered solver (:mod:`factlab.edit.registry`): ``"rome"`` (one layer, equality
            constraint; several requests are applied one after another, each on the already-edited model),
            ``"memit"`` (least squares, spread over layers), ``"emmet"`` (equality constraint for the whole
            batch), ``"memit_history"`` (MEMIT with earlier keys in the inverse), ``"alphaedit"`` (null-space
            projected, earlier keys in the inverse) or one registered from outside.
        layers: edit layers (default: the model's table entry, see :mod:`factlab.edit.hparams`).
        hparams: an :class:`EditHparams`, or a dict of fields to change in the defaults.
        stats: second moments keyed by key site (``"layer.5.mlp.key"``) or layer; missing ones are
            loaded from the cache or computed from ``hparams.stats_corpus``.
        projection: which linear map to rewrite (e.g. Mamba ``"in_proj.ssm"``); default the family's.
        on_known: a request whose target the model already predicts raises (``"error"``), is dropped
            (``"skip"``) or is edited anyway (``"edit"``).
        value_cache: a :class:`~factlab.edit.value_cache.ValueCache` (or its folder) to reuse optimised
            values across calls on the *same unedited weights* (e.g. one fact at several batch sizes);
            used only for values computed before this call's first update. Leave it ``None`` when the
            model may already carry edits.
        policy: a registered policy (``"per_request"``, ``"single_layer"``, ``"spread"``, ``"auto"``, ...);
            default the solver's.
        history: earlier edits at each key site: ``{"layer.4.mlp.key": H}`` with ``H`` (d_in, d_in) the sum of
            ``K_p K_p^T`` over earlier edits (accumulate it from ``result.solves[i]["keys"]`` and
            ``result.solves[i]["site"]``). Solvers with ``uses_history`` read it (a missing site means no earlier
            edits there); for the others it is accepted and ignored, so a stream can always pass it. Entries for
            sites this edit does not touch are ignored; an entry with the wrong shape or NaN/inf raises.

    Raises :class:`~factlab.edit.errors.EditError` subclasses; on any error the weights are left as they were.
    """
    method = method.lower()
    t_all = time.perf_counter()
    reqs = as_requests(requests)
    hp = resolve_hparams(lm, method, hparams, layers, projection, policy=policy)
    solver, pol = get_method(method, policy)
    if on_known not in ("error", "skip", "edit"):
        raise EditError(f"on_known must be 'error', 'skip' or 'edit', not {on_known!r}")
    check_conflicts(reqs, strict=solver.strict_conflicts)
    adapter = lm.adapter
    projs = {layer: adapter.projection(layer, hp.projection) for layer in hp.layers}
    hist = resolve_history(lm, projs, history)
    names = {layer: f"{p.module}.weight" for layer, p in projs.items()}
    timings: dict[str, float] = {}
    t = time.perf_counter()
    C = resolve_stats(lm, projs, hp, stats)
    timings["stats"] = time.perf_counter() - t
    t = time.perf_counter()
    templates = context_templates(lm, hp.context)
    key_templates = templates if hp.key_mode == "prefix_avg" else ["{}"]
    timings["context"] = time.perf_counter() - t

    params = dict(lm.model.named_parameters(remove_duplicate=False))
    originals = {n: params[n].data.clone() for n in names.values()}
    deltas: dict[str, torch.Tensor] = {n: torch.zeros(originals[n].shape, dtype=torch.float64) for n in names.values()}
    factors: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {n: [] for n in names.values()}
    skipped: list[int] = []
    solves: list[dict[str, Any]] = []
    value_info: list[dict[str, Any]] = []

    solver_log: list[dict[str, Any]] = []

    def objective(layer: int, K: torch.Tensor, R: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        from factlab.edit.policy import projection_output

        site = projs[layer].key_site
        solves.append({"layer": layer, "site": site, "keys": K.double(), "residuals": R.double(),
                       "targets": projection_output(lm, projs[layer], K) + R.double()})
        inp = SolveInput(stats=C[layer], K=K.T, R=R.T, hp=hp, history=hist.get(site) if solver.uses_history else None, site=site)
        A, B = solver.solve(inp)
        solves[-1]["solver_info"] = inp.info
        solver_log.append({"layer": layer, "site": site, "n": int(K.shape[0])} | inp.info)
        return A, B

    @torch.no_grad()
    def update(layer: int, A: torch.Tensor, B: torch.Tensor) -> None:
        proj, name = projs[layer], names[layer]
        a, b = _to_param(proj, lm.model, A, B)
        solves[-1]["parameter"] = name
        factors[name].append((a, b))
        deltas[name] += dense(a, b)
        params[name].data.copy_(edited_value(originals[name], deltas[name].float()))

    def check_values(offset: int) -> Any:
        def check(vals: Values) -> list[int]:
            known = [i for i, k in enumerate(vals.known) if k]
            if known and on_known == "error":
                shown = "; ".join(f"#{offset + i} {reqs[offset + i].filled!r} -> {reqs[offset + i].target_new!r}" for i in known[:3])
                raise TargetAlreadyKnownError(
                    f"the model already predicts the target for {len(known)} request(s) ({shown}); nothing to edit. "
                    "Drop them, or pass on_known='skip' (drop) or 'edit' (edit anyway)"
                )
            drop = set(known) if on_known == "skip" else set()
            skipped.extend(offset + i for i in sorted(drop))
            info = vals.to_dict()
            for i in range(len(vals.known)):
                value_info.append({k: (v[i] if isinstance(v, list) else v) for k, v in info.items()} | {"request": offset + i})
            return [i for i in range(len(vals.known)) if i not in drop]

        return check

    try:
        cache = ValueCache(Path(value_cache)) if isinstance(value_cache, (str, Path)) else value_cache
        pol.run(PolicyRun(lm=lm, requests=reqs, projs=projs, hp=hp, templates=templates, key_templates=key_templates,
                          objective=objective, update=update, check_values=check_values, timings=timings, value_cache=cache))
    except BaseException:
        with torch.no_grad():
            for n, orig in originals.items():
                params[n].data.copy_(orig)
        raise
    timings["total"] = time.perf_counter() - t_all
    metadata = {
        "method": method,
        "layers": list(hp.layers),
        "policy": pol.label(hp),
        "solver": {"name": method, "policy": policy or solver.default_policy, "uses_history": solver.uses_history,
                   "history_sites": sorted(hist) if solver.uses_history else [], "solves": solver_log},
        "projection": {n: projs[layer].name for layer, n in names.items()},
        "hparams": hp.to_dict(),
        "requests": [r.to_dict() for r in reqs],
        "skipped": skipped,
        "stats": {str(layer): (m.spec.to_dict() if m.spec else None) | {"key": m.spec.key() if m.spec else None, "count": m.count}
                  for layer, m in C.items()},
        "context_templates": templates,
        "values": value_info,
        "timings": timings,
        "model_id": lm.model_id,
        "identity": lm.identity,
    }
    result = EditResult(
        lm=lm,
        deltas={n: d.float() for n, d in deltas.items()},
        originals=originals,
        method=method,
        metadata=metadata,
        factors={n: (torch.cat([a for a, _ in fs], 1), torch.cat([b for _, b in fs], 1)) for n, fs in factors.items() if fs},
        applied=True,
        solves=solves,
    )
    return result


def edit_sequential(
    lm: LoadedModel,
    batches: Iterable[Request | Mapping[str, Any] | Iterable[Request | Mapping[str, Any]]],
    **kwargs: Any,
) -> list[EditResult]:
    """Apply batch after batch, each computed on the already-edited model (nothing is restored in between).

    Every result keeps the weights from before its own batch, so restoring the results in reverse order
    gives back the original weights bit for bit. If a batch fails, the earlier ones stay applied and the
    exception carries them as ``error.results``. Keyword arguments are those of :func:`edit`.
    """
    results: list[EditResult] = []
    for batch in batches:
        try:
            results.append(edit(lm, batch, **kwargs))
        except Exception as e:
            e.results = results  # type: ignore[attr-defined]
            raise
    return results
