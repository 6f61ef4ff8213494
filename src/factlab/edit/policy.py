"""How an edit is spread over layers, kept apart from the objective (algorithms.md §7.1).

- :func:`single_layer`: the value is optimised at the projection's own output (``mlp.out``,
  ``mixer.out``, ``ssm.in``, ...) of one layer and the objective solves for that layer.
- :func:`spread`: MEMIT's distribution: the value ``z`` is optimised at the residual stream of the last
  edit layer; for each edit layer in ascending order the keys and the current residual ``h`` are read
  with the weights updated so far, and the layer takes ``(z - h) / (layers left)``.

Both take an ``objective(layer, K, R) -> (A, B)`` (keys ``K`` (n, d_in), residuals ``R`` (n, d_out),
update ``A @ B.T`` in the projection's (d_out, d_in) orientation) and an ``update(layer, A, B)`` that
writes it into the model.
"""

from __future__ import annotations

from typing import Callable

import torch

from factlab.edit.errors import EditError
from factlab.edit.hparams import EditHparams
from factlab.edit.keys import average_by_request, compute_keys, read_at_subject, template_rows
from factlab.edit.requests import Request
from factlab.edit.value_cache import ValueCache, cached_values
from factlab.edit.values import Values
from factlab.models import LoadedModel
from factlab.models.adapters.base import Projection

Objective = Callable[[int, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
Update = Callable[[int, torch.Tensor, torch.Tensor], None]
#: projections whose output is added straight into the residual stream (MEMIT's spreading needs that)
RESIDUAL_PROJECTIONS = ("mlp", "attn", "out_proj")


def projection_output(lm: LoadedModel, proj: Projection, K: torch.Tensor) -> torch.Tensor:
    """``K @ W.T + b`` (n, d_out) in float64 with the current weights."""
    W = proj.weight(lm.model).detach().double().cpu()
    out = K.double() @ W.T
    b = proj.bias(lm.model)
    return out + b.detach().double().cpu() if b is not None else out


def single_layer(
    lm: LoadedModel,
    requests: list[Request],
    proj: Projection,
    *,
    hp: EditHparams,
    templates: list[str],
    key_templates: list[str],
    objective: Objective,
    update: Update,
    check_values: Callable[[Values], list[int]],
    timings: dict[str, float],
    value_cache: ValueCache | None = None,
) -> Values:
    """Keys and a value at ``proj``'s output for each request, then one solve at ``proj.layer``."""
    import time

    if proj.out_site is None:
        raise EditError(
            f"projection {proj.name!r} has no single output site to optimise a value at; choose one of its row blocks "
            "(for Mamba: 'in_proj.ssm' or 'in_proj.gate')"
        )
    t = time.perf_counter()
    K = compute_keys(lm, requests, proj.key_site, key_templates)
    timings["keys"] = timings.get("keys", 0.0) + time.perf_counter() - t
    t = time.perf_counter()
    vals = cached_values(lm, requests, site=proj.out_site, layer=proj.layer, templates=templates, hp=hp, cache=value_cache)
    timings["values"] = timings.get("values", 0.0) + time.perf_counter() - t
    keep = check_values(vals)
    if not keep:
        return vals
    t = time.perf_counter()
    idx = torch.tensor(keep)
    K = K[idx]
    R = vals.target[idx].double() - projection_output(lm, proj, K)
    A, B = objective(proj.layer, K, R)
    update(proj.layer, A, B)
    timings["solve"] = timings.get("solve", 0.0) + time.perf_counter() - t
    return vals


def spread(
    lm: LoadedModel,
    requests: list[Request],
    projs: dict[int, Projection],
    *,
    hp: EditHparams,
    templates: list[str],
    key_templates: list[str],
    objective: Objective,
    update: Update,
    check_values: Callable[[Values], list[int]],
    timings: dict[str, float],
    value_cache: ValueCache | None = None,
) -> Values:
    """MEMIT's residual spreading over ``projs`` (ascending layers); see the module doc."""
    import time

    for p in projs.values():
        if p.name not in RESIDUAL_PROJECTIONS:
            raise EditError(
                f"spreading an edit over layers needs a projection that writes into the residual stream "
                f"({', '.join(RESIDUAL_PROJECTIONS)}), not {p.name!r}; edit one layer instead"
            )
    layers = sorted(projs)
    z_layer = layers[-1]
    z_site = f"layer.{z_layer}.resid"
    t = time.perf_counter()
    vals = cached_values(lm, requests, site=z_site, layer=z_layer, templates=templates, hp=hp, cache=value_cache)
    timings["values"] = timings.get("values", 0.0) + time.perf_counter() - t
    keep = check_values(vals)
    if not keep:
        return vals
    reqs = [requests[i] for i in keep]
    Z = vals.target[torch.tensor(keep)]
    rows = template_rows(lm, reqs, key_templates)
    n, T = len(reqs), len(key_templates)
    for i, layer in enumerate(layers):
        proj = projs[layer]
        t = time.perf_counter()
        acts = read_at_subject(lm, rows, [proj.key_site, z_site])
        K = average_by_request(acts[proj.key_site], n)
        H = acts[z_site].view(n, T, -1)[:, 0]  # the bare prompt (template 0 is "{}")
        timings["keys"] = timings.get("keys", 0.0) + time.perf_counter() - t
        t = time.perf_counter()
        R = (Z.double() - H.double()) / (len(layers) - i)
        A, B = objective(layer, K, R)
        update(layer, A, B)
        timings["solve"] = timings.get("solve", 0.0) + time.perf_counter() - t
    return vals
