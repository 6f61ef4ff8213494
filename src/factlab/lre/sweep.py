"""Pick the layer, β and the causality rank per relation from training data only (algorithms.md §9.1).

The known samples of a relation are split (seeded) into *train* (the ``n_train`` examples the LRE is
fit on, chosen by the paper's round-robin split), *validation* and *test*. The sweep fits one LRE per
candidate layer on *train* and scores it on *validation* only: β and the faithfulness layer by
recall@1 (ties broken by the mean probability of the object's first token), the edit layer and the
pseudo-inverse rank by causality efficacy (ties broken by the target's mean probability). The test
samples are never seen. Results are cached as JSON per (model as loaded: ``lm.numerics_id``, relation, seed,
settings) and record ``lm.identity``.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from factlab.data.lre import Relation, Sample
from factlab.io import write_json
from factlab.lre.fit import fit
from factlab.lre.metrics import causality_by_rank, edit_pairs
from factlab.lre.operator import LRE
from factlab.lre.prompts import icl_prompt, is_nontrivial_prefix, paper_split, resolve_prefix
from factlab.lre.states import Layer, check_layer, compute_states
from factlab.models.loading import LoadedModel
from factlab.progress import progress

DEFAULT_BETAS = tuple(round(0.25 * i, 2) for i in range(21))  # linspace(0, 5, 21), as the paper


@dataclass
class Split:
    """Train / validation / test samples of one seed."""

    train: list[Sample]
    val: list[Sample]
    test: list[Sample]

    def to_dict(self) -> dict:
        return {k: [s.to_dict() for s in getattr(self, k)] for k in ("train", "val", "test")}


def split_known(known: Sequence[Sample], n_train: int, seed: int, *, val_fraction: float = 0.34, min_val: int = 2) -> Split:
    """Train by the paper's split; the rest (shuffled by ``seed``) into validation (``val_fraction``) and test."""
    train, rest = paper_split(known, n_train, seed)
    n_val = max(min_val, round(len(rest) * val_fraction))
    if len(rest) - n_val < 1:
        raise ValueError(f"{len(known)} known samples leave no test samples after {n_train} train and {n_val} validation")
    return Split(train, rest[:n_val], rest[n_val:])


def default_ranks(d: int) -> list[int]:
    """Powers of four from 4 below ``d``, plus ``d`` itself (e.g. 4, 16, 64, 256, 576)."""
    out, r = [], 4
    while r < d:
        out.append(r)
        r *= 4
    return out + [d]


def default_layers(n_layers: int, max_layers: int = 8) -> list[int]:
    """Every layer when there are at most ``max_layers``, else an even stride from 0 that ends below L-1."""
    if n_layers <= max_layers:
        return list(range(n_layers - 1))
    step = -(-(n_layers - 1) // max_layers)
    return list(range(0, n_layers - 1, step))


@dataclass
class SweepResult:
    """Validation scores per layer (``faith[layer][beta_index]`` = recall@1, ``edit[layer][rank_index]`` =
    efficacy) and the chosen hyperparameters."""

    relation: str
    model_id: str
    seed: int
    split: Split
    layers: list[Layer]
    betas: list[float]
    ranks: list[int]
    faith: dict[str, list[float]]
    faith_prob: dict[str, list[float]]
    edit: dict[str, list[float]]
    edit_prob: dict[str, list[float]]
    layer: Layer = 0
    beta: float = 1.0
    edit_layer: Layer = 0
    rank: int = 0
    extra: dict = field(default_factory=dict)
    #: ``lm.identity`` of the model swept (model id, dtype, attention implementation)
    identity: dict = field(default_factory=dict)
    #: the operators fitted per layer during this sweep (β = 1), kept in memory only so that callers fitting
    #: the same layer on the same training split reuse them; empty when the result was read from the cache.
    operators: dict = field(default_factory=dict, repr=False, compare=False)

    def operator(self, layer: Layer, **changes) -> LRE | None:
        """The sweep's operator for ``layer`` with ``changes`` applied (e.g. ``beta=...``), or None."""
        op = self.operators.get(layer)
        return None if op is None else op.with_(**changes) if changes else op

    def to_dict(self) -> dict:
        return {
            "relation": self.relation,
            "model_id": self.model_id,
            "seed": self.seed,
            "split": self.split.to_dict(),
            "layers": self.layers,
            "betas": self.betas,
            "ranks": self.ranks,
            "faith": self.faith,
            "faith_prob": self.faith_prob,
            "edit": self.edit,
            "edit_prob": self.edit_prob,
            "layer": self.layer,
            "beta": self.beta,
            "edit_layer": self.edit_layer,
            "rank": self.rank,
            "extra": self.extra,
            "identity": self.identity,
        }

    @classmethod
    def from_dict(cls, d: dict) -> "SweepResult":
        sp = d["split"]
        split = Split(*[[Sample(s["subject"], s["object"]) for s in sp[k]] for k in ("train", "val", "test")])
        keys = ("relation", "model_id", "seed", "layers", "betas", "ranks", "faith", "faith_prob", "edit", "edit_prob", "layer", "beta", "edit_layer", "rank", "extra")
        return cls(split=split, identity=d.get("identity", {}), **{k: d[k] for k in keys})

    def plot(self, path: str | Path) -> Path:
        """Validation recall@1 (best β) and efficacy (best rank) per layer."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        xs = [str(l) for l in self.layers]
        fig, ax = plt.subplots(figsize=(7, 3.2))
        ax.plot(xs, [max(self.faith[x]) for x in xs], "o-", label="faithfulness (best β)")
        ax.plot(xs, [max(self.edit[x]) for x in xs], "s-", label="causality (best rank)")
        ax.set_xlabel("subject layer")
        ax.set_ylabel("validation score")
        ax.set_ylim(-0.02, 1.02)
        ax.set_title(f"{self.relation}: layer sweep (seed {self.seed})")
        ax.legend()
        fig.tight_layout()
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path)
        plt.close(fig)
        return path


def _first_token_prob(lm: LoadedModel, logits: torch.Tensor, prompts: Sequence[str], objects: Sequence[str]) -> list[float]:
    from factlab.prompts import continuation_ids

    probs = logits.float().softmax(-1)
    return [float(probs[i, continuation_ids(lm.tokenizer, p, " " + o.strip())[0]]) for i, (p, o) in enumerate(zip(prompts, objects))]


def cache_key(lm: LoadedModel, relation: Relation, known: Sequence[Sample], **settings) -> str:
    payload = json.dumps(
        {"model": lm.numerics_id, "relation": relation.name, "template": relation.prompt_templates[0], "known": [s.to_dict() for s in known], **settings},
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def sweep_cache_path(lm: LoadedModel, relation: Relation, seed: int, key: str) -> Path:
    from factlab.models import cache_dir

    safe_model = "".join(c if c.isalnum() or c in "-_." else "_" for c in lm.numerics_id)
    safe_rel = "".join(c if c.isalnum() or c in "-_." else "_" for c in relation.name)
    return cache_dir() / "lre" / "sweeps" / safe_model / f"{safe_rel}-seed{seed}-{key}.json"


def sweep(
    lm: LoadedModel,
    relation: Relation,
    known: Sequence[Sample],
    *,
    seed: int = 0,
    n_train: int = 5,
    layers: Sequence[Layer] | None = None,
    betas: Sequence[float] = DEFAULT_BETAS,
    ranks: Sequence[int] | None = None,
    prefix: str | None = None,
    use_cache: bool = True,
) -> SweepResult:
    """Sweep layers × β (faithfulness) and layers × rank (causality) on the validation samples of ``known``."""
    layers = [check_layer(lm, l) for l in (layers if layers is not None else default_layers(lm.adapter.n_layers))]
    ranks = list(ranks) if ranks is not None else default_ranks(lm.adapter.d_model)
    betas = [float(b) for b in betas]
    pre = resolve_prefix(lm, prefix)
    key = cache_key(lm, relation, known, seed=seed, n_train=n_train, layers=layers, betas=betas, ranks=ranks, prefix=pre)
    path = sweep_cache_path(lm, relation, seed, key)
    if use_cache and path.exists():
        return SweepResult.from_dict(json.loads(path.read_text()))
    split = split_known(known, n_train, seed)
    val = split.val
    template = relation.prompt_templates[0]
    prompts = [icl_prompt(template, s.subject, split.train, prefix=pre) for s in val]
    subjects, objects = [s.subject for s in val], [s.object for s in val]
    st = compute_states(lm, prompts, subjects, layers)
    pairs = edit_pairs(val, seed)
    faith, faith_p, edit, edit_p = {}, {}, {}, {}
    operators: dict = {}
    for layer in progress(layers, desc=f"sweep {relation.name}", unit="layer"):
        op = operators[layer] = fit(lm, relation, layer=layer, train=split.train, prefix=pre)
        h = st.h[layer]
        scores, probs = [], []
        base = h @ op.weight.T
        for beta in betas:
            z = beta * base + op.bias
            with torch.no_grad():
                logits = lm.adapter.logits_from_resid(lm.model, z.to(device=lm.device, dtype=lm.dtype)).float()
            top = [lm.tokenizer.decode([t]) for t in logits.argmax(-1).tolist()]
            scores.append(sum(is_nontrivial_prefix(t, o) for t, o in zip(top, objects)) / len(objects))
            probs.append(sum(_first_token_prob(lm, logits, prompts, objects)) / len(objects))
        faith[str(layer)], faith_p[str(layer)] = scores, probs
        eff, effp = [], []
        for c in causality_by_rank(lm, op, prompts, subjects, objects, h, st.z, pairs, ranks):
            eff.append(c.efficacy if c.success else 0.0)
            effp.append(sum(c.p_target) / len(c.p_target) if c.p_target else 0.0)
        edit[str(layer)], edit_p[str(layer)] = eff, effp
    best_f = max(((faith[str(l)][i], faith_p[str(l)][i], -li, l, betas[i]) for li, l in enumerate(layers) for i in range(len(betas))))
    best_e = max(((edit[str(l)][i], edit_p[str(l)][i], -li, l, ranks[i]) for li, l in enumerate(layers) for i in range(len(ranks))))
    res = SweepResult(
        relation.name, lm.model_id, seed, split, layers, betas, ranks, faith, faith_p, edit, edit_p,
        layer=best_f[3], beta=best_f[4], edit_layer=best_e[3], rank=best_e[4], extra={"n_val": len(val), "n_pairs": len(pairs)},
        operators=operators, identity=lm.identity,
    )
    if use_cache:
        write_json(path, res.to_dict())
    return res
