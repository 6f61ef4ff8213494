"""Subject states ``h`` and object states ``z`` (algorithms.md §9.1), read through the adapter's sites.

``h`` is the block output at ``layer`` (``layer.{l}.resid``; ``"emb"`` = the ``embed`` site) at the
subject's last token (its last occurrence in the prompt); ``z`` is the last block's output
(``layer.{L-1}.resid``, i.e. before the final norm) at the prompt's last token.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Sequence, Union

import torch

from factlab.errors import SiteError
from factlab.interventions import capture
from factlab.models.loading import LoadedModel
from factlab.prompts import subject_span

Layer = Union[int, Literal["emb"]]


def check_layer(lm: LoadedModel, layer: Layer) -> Layer:
    """``layer`` if it names a subject layer of this model (``"emb"`` or 0..L-1), else a clear error."""
    if layer == "emb":
        return layer
    if isinstance(layer, str) and layer.lstrip("-").isdigit():
        layer = int(layer)
    if not isinstance(layer, int) or isinstance(layer, bool) or not 0 <= layer < lm.adapter.n_layers:
        raise SiteError(f"layer {layer!r} is outside this model: use 'emb' or 0..{lm.adapter.n_layers - 1} ({lm.name} has {lm.adapter.n_layers} layers)")
    return layer


def h_site(lm: LoadedModel, layer: Layer) -> str:
    """The site holding subject states at ``layer``."""
    layer = check_layer(lm, layer)
    return "embed" if layer == "emb" else f"layer.{layer}.resid"


def z_site(lm: LoadedModel) -> str:
    """The site holding object states: the last block's output (before the final norm)."""
    return f"layer.{lm.adapter.n_layers - 1}.resid"


def subject_index(lm: LoadedModel, prompt: str, subject: str) -> int:
    """Unpadded index of the last token of the last occurrence of ``subject`` in ``prompt``."""
    return subject_span(lm.tokenizer, prompt, subject)[1] - 1


@dataclass
class States:
    """``h[layer]`` ``(N, d)`` subject states per requested layer and ``z`` ``(N, d)`` object states (float32)."""

    h: dict[Layer, torch.Tensor]
    z: torch.Tensor


@torch.no_grad()
def compute_states(
    lm: LoadedModel, prompts: Sequence[str], subjects: Sequence[str], layers: Sequence[Layer], *, batch_size: int = 16
) -> States:
    """Subject states at each of ``layers`` and object states for each (prompt, subject), in batches."""
    if len(prompts) != len(subjects):
        raise ValueError(f"{len(prompts)} prompts but {len(subjects)} subjects")
    layers = [check_layer(lm, l) for l in layers]
    sites = {l: h_site(lm, l) for l in layers}
    zs = z_site(lm)
    hs: dict[Layer, list[torch.Tensor]] = {l: [] for l in layers}
    zl: list[torch.Tensor] = []
    for i in range(0, len(prompts), batch_size):
        ps, ss = list(prompts[i : i + batch_size]), list(subjects[i : i + batch_size])
        batch = lm.encode(ps)
        idx = torch.tensor([batch.position(r, subject_index(lm, p, s)) for r, (p, s) in enumerate(zip(ps, ss))])
        rows = torch.arange(len(ps))
        with capture(lm, list(dict.fromkeys([*sites.values(), zs]))) as acts:
            lm.forward(batch, logits_to_keep=1)
        for l, site in sites.items():
            v = acts[site]
            hs[l].append(v[rows.to(v.device), idx.to(v.device)].float().cpu())
        v = acts[zs]
        zl.append(v[rows.to(v.device), batch.last_positions.to(v.device)].float().cpu())
    return States({l: torch.cat(v) for l, v in hs.items()}, torch.cat(zl))
