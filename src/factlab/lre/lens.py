"""The attribute lens (algorithms.md §9.4): decode every (layer, token) hidden state of a prompt through
an LRE (``β W h + b``, then the model's final norm and unembedding); with no LRE it is the logit lens."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from factlab.data.lre import Relation
from factlab.errors import InputError
from factlab.interventions import capture
from factlab.lre.operator import LRE
from factlab.lre.states import Layer, check_layer
from factlab.models.loading import LoadedModel

log = logging.getLogger(__name__)

#: known samples a relation needs before the lens fits an LRE of it (5 to train, the rest to choose β/layer)
LENS_MIN_KNOWN = 8


@dataclass
class LensGrid:
    """``tokens[t]`` the prompt's tokens; ``top[l][t]`` the top decoded token at layer ``l`` (row 0 = ``emb``),
    ``prob[l][t]`` its probability; ``target_prob[l][t]`` the probability of ``target``'s first token if given."""

    prompt: str
    tokens: list[str]
    layers: list[str]
    top: list[list[str]]
    prob: list[list[float]]
    operator: str
    target: str | None = None
    target_prob: list[list[float]] | None = None

    def to_dict(self) -> dict:
        return dict(self.__dict__)

    def plot(self, path: str | Path, *, title: str | None = None) -> Path:
        """Draw the grid (tokens × layers, top token per cell, colour = its probability) as PNG or SVG."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import numpy as np

        probs = np.array(self.prob).T  # (T, L+1)
        T, Lp = probs.shape
        fig, ax = plt.subplots(figsize=(max(6, 0.62 * Lp + 2), max(3, 0.42 * T + 1.5)))
        im = ax.imshow(probs, cmap="Blues", vmin=0, vmax=1, aspect="auto")
        for t in range(T):
            for l in range(Lp):
                ax.text(l, t, self.top[l][t].strip()[:7] or repr(self.top[l][t]), ha="center", va="center", fontsize=6,
                        color="white" if probs[t, l] > 0.6 else "black")
        ax.set_xticks(range(Lp), self.layers, fontsize=7)
        ax.set_yticks(range(T), [repr(x)[1:-1] for x in self.tokens], fontsize=7)
        ax.set_xlabel("layer")
        ax.set_title(title or f"{'attribute lens: ' + self.operator if self.operator != 'logit lens' else 'logit lens'}", fontsize=9)
        fig.colorbar(im, ax=ax, fraction=0.03, label="probability of top token")
        fig.tight_layout()
        path = Path(path)
        from factlab.io import atomic_path

        try:
            with atomic_path(path) as tmp:  # a killed run never leaves half a picture under the final name
                fig.savefig(tmp, dpi=130, format=path.suffix.lstrip(".").lower() or "png")
        finally:
            plt.close(fig)
        return path

    def __repr__(self) -> str:
        return f"LensGrid({self.operator!r}, prompt={self.prompt!r}, {len(self.layers)} layers x {len(self.tokens)} tokens)"


def check_prompt(prompt: str) -> str:
    """``prompt``, or :class:`InputError` when it is empty or whitespace only."""
    if not isinstance(prompt, str) or not prompt.strip():
        raise InputError(f"the prompt is empty ({prompt!r}); give the text whose hidden states the lens decodes")
    return prompt


def check_operator(lm: LoadedModel, operator: LRE) -> LRE:
    """``operator`` if it fits ``lm`` (its layer exists and its width is the model's), else a clear error."""
    check_layer(lm, operator.layer)
    if operator.d != lm.adapter.d_model:
        raise InputError(
            f"the LRE of {operator.relation!r} is {operator.d}-dimensional but {lm.name} has width {lm.adapter.d_model}; "
            f"it was fitted on another model ({operator.model_id or 'unknown'}): fit one on this model"
        )
    if operator.model_id and operator.model_id != lm.model_id:
        log.warning("the LRE of %r was fitted on %s, not on %s", operator.relation, operator.model_id, lm.model_id)
    return operator


def check_lens_options(lm: LoadedModel, prompt: str, *, layer: Layer | None = None, beta: float | None = None,
                       target: str | None = None) -> Layer | None:
    """Check everything a lens run is given before any forward pass; returns the layer as the model names it."""
    check_prompt(prompt)
    if beta is not None and not (math.isfinite(beta) and beta > 0):
        raise InputError(f"beta must be a positive finite number, not {beta!r}")
    if target is not None and not target.strip():
        raise InputError(f"the target is empty ({target!r}); give the object whose probability to record, e.g. ' Paris'")
    return None if layer is None else check_layer(lm, layer)


def lens_operator(lm: LoadedModel, relation: Relation, *, layer: Layer | None = None, beta: float | None = None,
                  max_samples: int = 60) -> LRE:
    """The LRE the lens decodes through: fitted on the samples of ``relation`` the model knows, at ``layer`` with
    ``beta`` (each chosen by :func:`factlab.lre.sweep` on training data when not given). ``layer`` is checked
    before any forward pass."""
    from factlab.lre.fit import fit
    from factlab.lre.prompts import filter_known, require_known
    from factlab.lre.sweep import split_known, sweep

    layer = None if layer is None else check_layer(lm, layer)
    kf = filter_known(lm, relation, max_samples=max_samples)
    require_known(kf, LENS_MIN_KNOWN)
    if layer is None or beta is None:
        sw = sweep(lm, relation, kf.known)
        layer = sw.layer if layer is None else layer
        beta = sw.beta if beta is None else beta
        train = sw.split.train
    else:
        train = split_known(kf.known, 5, 0).train
    return fit(lm, relation, layer=layer, beta=beta, train=train)


def lens(lm: LoadedModel, prompt: str, *, relation: Relation | None = None, operator: LRE | None = None,
         layer: Layer | None = None, beta: float | None = None, target: str | None = None, max_samples: int = 60) -> LensGrid:
    """The attribute lens of ``prompt`` through ``operator``, or through an LRE of ``relation`` fitted here
    (:func:`lens_operator`), or the logit lens when neither is given.

    Every option is checked before any forward pass (a wrong ``layer`` fails at once, not after the sweep).
    """
    if relation is not None and operator is not None:
        raise InputError("give a relation to fit an LRE of, or a fitted LRE, not both")
    if relation is None and (layer is not None or beta is not None):
        raise InputError("layer and beta choose the LRE fitted for a relation; give the relation too (the logit lens and a "
                         "saved LRE have their own)")
    layer = check_lens_options(lm, prompt, layer=layer, beta=beta, target=target)
    if operator is not None:
        check_operator(lm, operator)
    elif relation is not None:
        operator = lens_operator(lm, relation, layer=layer, beta=beta, max_samples=max_samples)
    return attribute_lens(lm, prompt, operator, target=target)


@torch.no_grad()
def attribute_lens(lm: LoadedModel, prompt: str, operator: LRE | None = None, *, target: str | None = None) -> LensGrid:
    """Decode every hidden state (``embed`` and each block output, every token) of ``prompt``."""
    check_lens_options(lm, prompt, target=target)
    if operator is not None:
        check_operator(lm, operator)
    L = lm.adapter.n_layers
    sites = ["embed"] + [f"layer.{i}.resid" for i in range(L)]
    batch = lm.encode(prompt)
    with capture(lm, sites) as acts:
        lm.forward(batch, logits_to_keep=1)
    hs = torch.stack([acts[s][0] for s in sites])  # (L+1, T, d)
    z = operator.predict(hs.float()) if operator is not None else hs
    logits = lm.adapter.logits_from_resid(lm.model, z.to(device=lm.device, dtype=lm.dtype)).float()
    probs = logits.softmax(-1)
    p, ids = probs.max(-1)
    ids_row = batch.input_ids[0].tolist()
    tokens = [lm.tokenizer.decode([t]) for t in ids_row]
    top = [[lm.tokenizer.decode([t]) for t in row] for row in ids.tolist()]
    tp = None
    if target is not None:
        from factlab.prompts import continuation_ids

        tid = continuation_ids(lm.tokenizer, prompt, target if target.startswith(" ") else " " + target)[0]
        tp = probs[..., tid].tolist()
    name = "logit lens" if operator is None else f"{operator.kind} {operator.relation} (layer {operator.layer}, β={operator.beta:g})"
    return LensGrid(prompt, tokens, ["emb"] + [str(i) for i in range(L)], top, p.tolist(), name, target, tp)
