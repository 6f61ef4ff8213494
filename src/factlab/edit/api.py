"""``edit`` and ``edit_sequential``: requests in, an applied :class:`EditResult` out."""

from __future__ import annotations

import time
from pathlib import Path
from collections.abc import Iterable, Mapping
from typing import Any, Literal

import torch

from factlab.edit.context import context_templates
from factlab.edit.errors import EditError, TargetAlreadyKnownError
from factlab.edit.hparams import METHODS, EditHparams, default_hparams
from factlab.edit.policy import single_layer, spread
from factlab.edit.requests import Request, as_requests, check_conflicts
from factlab.edit.result import EditResult, edited_value
from factlab.edit.solvers import dense, emmet_factors, memit_factors, rome_factors
from factlab.edit.stats import SecondMoment, check_finite, second_moments
from factlab.edit.value_cache import ValueCache
from factlab.edit.values import Values
from factlab.models import LoadedModel
from factlab.models.adapters.base import Projection

OnKnown = Literal["error", "skip", "edit"]
StatsArg = Mapping[Any, "SecondMoment | torch.Tensor"] | None


def resolve_hparams(
    lm: LoadedModel, method: str, hparams: EditHparams | Mapping[str, Any] | None = None, layers: Iterable[int] | None = None,
    projection: str | None = None,
) -> EditHparams:
    """The hyperparameters an edit will use: the model's defaults, updated by ``hparams`` (an
    :class:`EditHparams` replaces them, a dict changes fields), ``layers`` and ``projection``."""
    method = method.lower()
    if method not in METHODS:
        raise EditError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    if isinstance(hparams, EditHparams):
        hp = hparams
    else:
        hp = default_hparams(lm, method)
        if hparams:
            hp = hp.replace(**dict(hparams))
    if layers is not None:
        hp = hp.replace(layers=tuple(sorted(set(int(x) for x in layers))), source=hp.source + "; layers set by the caller")
    if projection is not None:
        hp = hp.replace(projection=projection)
    for layer in hp.layers:
        if not 0 <= layer < lm.adapter.n_layers:
            raise EditError(f"edit layer {layer} is outside this model's layers 0..{lm.adapter.n_layers - 1}")
    if method == "rome" and len(hp.layers) != 1:
        raise EditError(f"ROME edits one layer, got layers {list(hp.layers)}; use method='memit' or 'emmet' to spread an edit over several")
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
) -> EditResult:
    """Rewrite facts in ``lm``'s weights and return what was done (the model is edited on return).

    Args:
        requests: one or many :class:`Request` (or CounterFact ``requested_rewrite``-shaped dicts).
        method: ``"rome"`` (one layer, equality constraint; several requests are applied one after
            another, each on the already-edited model), ``"memit"`` (least squares, spread over
            layers) or ``"emmet"`` (equality constraint for the whole batch).
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

    Raises :class:`~factlab.edit.errors.EditError` subclasses; on any error the weights are left as they were.
    """
    method = method.lower()
    t_all = time.perf_counter()
    reqs = as_requests(requests)
    hp = resolve_hparams(lm, method, hparams, layers, projection)
    if on_known not in ("error", "skip", "edit"):
        raise EditError(f"on_known must be 'error', 'skip' or 'edit', not {on_known!r}")
    check_conflicts(reqs, strict=method == "emmet")
    adapter = lm.adapter
    projs = {layer: adapter.projection(layer, hp.projection) for layer in hp.layers}
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

    def objective(layer: int, K: torch.Tensor, R: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        from factlab.edit.policy import projection_output

        solves.append({"layer": layer, "keys": K.double(), "residuals": R.double(),
                       "targets": projection_output(lm, projs[layer], K) + R.double()})
        if method == "rome":
            return rome_factors(C[layer].factor(1.0, hp.ridge), K[0], R[0])
        L = C[layer].factor(hp.mom2_update_weight, hp.ridge)
        if method == "emmet":
            return emmet_factors(L, K.T, R.T, hp.emmet_lambda)
        return memit_factors(L, K.T, R.T)

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
        kw = dict(hp=hp, templates=templates, key_templates=key_templates, objective=objective, update=update, timings=timings)
        cache = ValueCache(Path(value_cache)) if isinstance(value_cache, (str, Path)) else value_cache
        if method == "rome":  # each request is solved on the model the earlier ones edited: only the first may be cached
            for i, r in enumerate(reqs):
                single_layer(lm, [r], projs[hp.layers[0]], check_values=check_values(i), value_cache=cache if i == 0 else None, **kw)
        elif len(hp.layers) == 1 and method == "emmet":
            single_layer(lm, reqs, projs[hp.layers[0]], check_values=check_values(0), value_cache=cache, **kw)
        else:
            spread(lm, reqs, projs, check_values=check_values(0), value_cache=cache, **kw)
    except BaseException:
        with torch.no_grad():
            for n, orig in originals.items():
                params[n].data.copy_(orig)
        raise
    timings["total"] = time.perf_counter() - t_all
    metadata = {
        "method": method,
        "layers": list(hp.layers),
        "policy": "single" if (method == "rome" or (method == "emmet" and len(hp.layers) == 1)) else "spread",
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
