"""A disk cache of optimised values, for runs that edit the same facts of the *same unedited model* again.

The value optimisation is most of an edit's time, and an evaluation that compares MEMIT or EMMET at
batch sizes 1, 10 and 100 optimises the same value for the same fact three times: MEMIT's and EMMET's
values are computed on the unedited model, one request at a time in effect (Adam is element-wise),
whatever the batch. :class:`ValueCache` stores one small file per request under a content key: the
model's ``numerics_id`` (the weights' id plus the dtype and attention implementation it runs in, so a
bfloat16 run never reads float32 values), the value site and layer, the context templates, every
hyperparameter the optimisation reads, and the request itself. Each entry's JSON records ``lm.identity``.

The key cannot see in-place edits of the weights, so a cache is only correct for a model whose weights
are still those its ``model_id`` names. :func:`factlab.edit.edit` therefore uses it only for values
computed before its own first update, and the evaluation harness passes it only to runs that restore
the model after every batch (never to ``--sequential`` runs). A cached value equals a fresh one up to
float rounding (batching pads differently).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from factlab.edit.hparams import EditHparams
from factlab.edit.requests import Request
from factlab.edit.values import Values, optimise_values
from factlab.io import load_tensors, save_tensors, write_json
from factlab.models import LoadedModel

#: hyperparameters the value optimisation reads (``v_batch`` only changes speed)
VALUE_FIELDS = ("v_lr", "v_steps", "v_weight_decay", "clamp_norm_factor", "kl_factor", "early_stop_loss")
#: value-changing switches added later, with their defaults: in the key only when not at the default, so
#: values cached before they existed keep their keys
SWITCH_FIELDS = (("early_stop", "loss"), ("top1_count", 1))
_LISTS = ("known", "prob_before", "prob_after", "loss", "steps")


@dataclass(frozen=True)
class ValueCache:
    """Optimised values on disk under ``root`` (one ``.safetensors`` + ``.json`` pair per request)."""

    root: Path

    def key(self, lm: LoadedModel, site: str, layer: int, templates: list[str], hp: EditHparams, request: Request) -> str:
        """The content key of one request's value (hex)."""
        spec = {
            "model": lm.numerics_id,
            "site": site,
            "layer": layer,
            "templates": list(templates),
            "hparams": _value_hparams(hp),
            "request": request.to_dict(),
        }
        return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:32]

    def get(self, key: str) -> Values | None:
        """One request's values (``n = 1``), or ``None`` when not cached."""
        meta, tens = self.root / f"{key}.json", self.root / f"{key}.safetensors"
        if not (meta.exists() and tens.exists()):
            return None
        info = json.loads(meta.read_text())
        t = load_tensors(tens)
        return Values(v0=t["v0"], delta=t["delta"], site=info["site"], **{k: [info[k]] for k in _LISTS})

    def put(self, key: str, vals: Values, i: int, identity: dict[str, str | None] | None = None) -> Values:
        """Store request ``i`` of ``vals`` under ``key`` (atomic writes; ``identity``: ``lm.identity``, recorded in
        the JSON); returns that request's values."""
        one = _row(vals, i)
        self.root.mkdir(parents=True, exist_ok=True)
        save_tensors(self.root / f"{key}.safetensors", {"v0": one.v0.contiguous(), "delta": one.delta.contiguous()})
        write_json(self.root / f"{key}.json", {"site": one.site, "identity": identity, **{k: getattr(one, k)[0] for k in _LISTS}})
        return one


def _value_hparams(hp: EditHparams) -> dict:
    """The hyperparameters in a value's key: :data:`VALUE_FIELDS`, and each switch not at its default
    (``top1_count`` only matters with ``early_stop="top1"``)."""
    out = {f: getattr(hp, f) for f in VALUE_FIELDS}
    for f, default in SWITCH_FIELDS:
        if getattr(hp, f) != default and (f != "top1_count" or hp.early_stop == "top1"):
            out[f] = getattr(hp, f)
    return out


def _row(vals: Values, i: int) -> Values:
    """Request ``i`` of ``vals`` as values of one request."""
    return Values(v0=vals.v0[i : i + 1], delta=vals.delta[i : i + 1], site=vals.site, **{k: [getattr(vals, k)[i]] for k in _LISTS})


def cached_values(
    lm: LoadedModel,
    requests: list[Request],
    *,
    site: str,
    layer: int,
    templates: list[str],
    hp: EditHparams,
    cache: ValueCache | None,
) -> Values:
    """:func:`~factlab.edit.values.optimise_values`, reading and filling ``cache`` (``None``: no cache).

    Requests found in the cache are not optimised again; the rest are optimised ``hp.v_batch`` at a time
    and each chunk is stored as soon as it is done. Returns the values in request order.
    """
    if cache is None:
        return optimise_values(lm, requests, site=site, layer=layer, templates=templates, hp=hp)
    keys = [cache.key(lm, site, layer, templates, hp, r) for r in requests]
    found = {i: v for i, k in enumerate(keys) if (v := cache.get(k)) is not None}
    todo = [i for i in range(len(requests)) if i not in found]
    for s in range(0, len(todo), hp.v_batch):  # stored chunk by chunk: an interrupted run keeps what it finished
        chunk = todo[s : s + hp.v_batch]
        fresh = optimise_values(lm, [requests[i] for i in chunk], site=site, layer=layer, templates=templates, hp=hp)
        for j, i in enumerate(chunk):
            found[i] = cache.put(keys[i], fresh, j, lm.identity)
    parts = [found[i] for i in range(len(requests))]
    return Values(
        v0=torch.cat([p.v0 for p in parts]),
        delta=torch.cat([p.delta for p in parts]),
        site=site,
        **{k: sum((getattr(p, k) for p in parts), []) for k in _LISTS},
    )
