"""Editing hyperparameters: one typed, frozen dataclass and one table of defaults with their sources.

Look-up order in :func:`default_hparams`: an exact model name (``lm.name``) from :data:`MODEL_HPARAMS`,
else the family fallback in :func:`fallback_hparams` (which says in ``source`` that it is not measured).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

from factlab.edit.errors import EditError

Method = Literal["rome", "memit", "emmet"]
METHODS: tuple[str, ...] = ("rome", "memit", "emmet")
KeyMode = Literal["prefix_avg", "prompt"]
EarlyStop = Literal["loss", "top1"]


@dataclass(frozen=True)
class EditHparams:
    """Everything that decides an edit besides the requests.

    Attributes:
        layers: edit layers; ROME takes one, MEMIT spreads the residual over all of them (ascending),
            EMMET takes one (several: MEMIT's spreading with EMMET's equality solve).
        projection: adapter projection to rewrite (None: the family default, ``mlp`` or Mamba ``out_proj``).
        v_lr, v_steps: Adam learning rate and maximum steps of the value (delta) optimisation.
        v_weight_decay: weight of ``||delta|| / ||v0||^2`` in the loss (norm, not squared, as the reference).
        clamp_norm_factor: ``||delta|| <= clamp_norm_factor * ||v0||`` after every step.
        kl_factor: weight of KL(P_delta || P_0) on the ``"{subject} is a"`` prompt at the subject's last token.
        early_stop_loss: a request stops optimising once its total loss is below this.
        early_stop: ``"loss"`` (only the loss rule above; the reference ROME/MEMIT) or ``"top1"``: ENCORE's
            most-probable early stopping (MPES) on top of the loss rule - a request also stops at the
            ``top1_count``-th step (counted, not necessarily consecutive) at which every target token is the
            teacher-forced argmax on every *context-prefixed* prompt (the bare prompt is not checked);
            ``encore/compute_z.py`` of scalable-model-editing/knowledge-editing-regularization
            (algorithms.md §15.3).
        top1_count: ENCORE's ``|prob_cutoff|`` (4 GPT2-XL, 3 Llama2-7B, 2 Llama3-8B in ``hparams/ENCORE``);
            default 1: stop at the first step at which the target is the top-1.
        context: context-prefix spec ``((length, count), ...)``; ``"{}"`` (no prefix) is always included.
        key_mode: ``prefix_avg`` (keys averaged over the prefixed prompts: r-ROME, the reference default)
            or ``prompt`` (bare prompt only: p-ROME).
        mom2_update_weight: ``lambda`` scaling ``C`` (MEMIT: ``lambda C + K K^T``; EMMET: ``C_s = lambda C``).
        emmet_lambda: ridge added to ``K^T C_s^-1 K`` when EMMET edits more than one fact.
        ridge: added to ``C`` as ``ridge * mean(diag C) * I`` (0: none; use it for rank-deficient statistics).
        nullspace_threshold: AlphaEdit keeps the eigenvectors of the (unscaled, ridge-free) statistics ``C``
            whose eigenvalue is below this absolute value as the null space it edits in; default ``2e-2``,
            ``nullspace_threshold`` of every ``hparams/AlphaEdit/*.json`` in jianghoucheng/AlphaEdit
            (algorithms.md §15.1). It is on the per-token second-moment scale, so the kept dimension
            depends on the model and layer (it is logged in the result's metadata).
        alphaedit_l2: the multiple of ``I`` in AlphaEdit's inverse ``(K_p K_p^T P + K K^T P + l2 I)^-1``;
            default ``10``, ``L2`` of every ``hparams/AlphaEdit/*.json`` (the paper's Eq. 14 writes 1;
            algorithms.md §15.1).
        v_batch: requests whose values are optimised together (memory vs speed; results do not depend on it).
        stats_corpus, stats_samples, stats_max_length: default statistics (chunks of ``stats_max_length``
            tokens; ``stats_samples`` chunks).
        source: where these values come from.
    """

    layers: tuple[int, ...]
    projection: str | None = None
    v_lr: float = 0.5
    v_steps: int = 20
    v_weight_decay: float = 0.5
    clamp_norm_factor: float = 4.0
    kl_factor: float = 0.0625
    early_stop_loss: float = 5e-2
    early_stop: EarlyStop = "loss"
    top1_count: int = 1
    context: tuple[tuple[int, int], ...] = ((5, 10), (10, 10))
    key_mode: KeyMode = "prefix_avg"
    mom2_update_weight: float = 15000.0
    emmet_lambda: float = 0.1
    ridge: float = 0.0
    nullspace_threshold: float = 2e-2
    alphaedit_l2: float = 10.0
    v_batch: int = 16
    stats_corpus: str = "wikitext-2"
    stats_samples: int = 400
    stats_max_length: int = 256
    source: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "layers", tuple(int(x) for x in self.layers))
        object.__setattr__(self, "context", tuple((int(a), int(b)) for a, b in self.context))
        if not self.layers:
            raise EditError("hparams.layers is empty; give at least one edit layer")
        if self.key_mode not in ("prefix_avg", "prompt"):
            raise EditError(f"key_mode must be 'prefix_avg' or 'prompt', not {self.key_mode!r}")
        for name in ("v_lr", "clamp_norm_factor", "mom2_update_weight", "nullspace_threshold", "alphaedit_l2"):
            if not getattr(self, name) > 0:
                raise EditError(f"hparams.{name} must be positive")
        if self.early_stop not in ("loss", "top1"):
            raise EditError(f"early_stop must be 'loss' or 'top1' (ENCORE's most-probable early stopping), not {self.early_stop!r}")
        if self.top1_count < 1:
            raise EditError(f"top1_count must be >= 1 (steps at which the target is the top-1 before stopping), not {self.top1_count}")
        if self.v_steps < 0 or self.v_batch < 1 or self.stats_samples < 1:
            raise EditError("v_steps must be >= 0, v_batch and stats_samples >= 1")

    def replace(self, **changes: Any) -> "EditHparams":
        """A copy with some fields changed (unknown names raise)."""
        bad = set(changes) - {f.name for f in dataclasses.fields(self)}
        if bad:
            raise EditError(f"unknown hyperparameter(s) {sorted(bad)}; valid: {[f.name for f in dataclasses.fields(self)]}")
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["layers"] = list(self.layers)
        d["context"] = [list(c) for c in self.context]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "EditHparams":
        """From a dict (e.g. JSON); unknown keys raise with the valid names."""
        names = {f.name for f in dataclasses.fields(cls)}
        bad = set(d) - names
        if bad:
            raise EditError(f"unknown hyperparameter(s) {sorted(bad)}; valid: {sorted(names)}")
        return cls(**d)


@dataclass(frozen=True)
class ModelHparams:
    """Per-method defaults of one model, with the model names they apply to."""

    names: tuple[str, ...]
    rome: EditHparams
    memit: EditHparams
    emmet: EditHparams
    notes: str = ""
    extra: dict[str, EditHparams] = field(default_factory=dict)

    def for_method(self, method: str) -> EditHparams:
        return getattr(self, method)


_REF_ROME = dict(v_lr=0.5, v_steps=20, v_weight_decay=0.5, kl_factor=0.0625, context=((5, 10), (10, 10)))
_REF_MEMIT = dict(v_lr=0.5, v_weight_decay=0.5, kl_factor=0.0625, clamp_norm_factor=0.75, context=((10, 5),))

#: Reference hyperparameters (algorithms.md §5.5, §6.2, §7.3) and our measured choices (docs/edit.md).
MODEL_HPARAMS: tuple[ModelHparams, ...] = (
    ModelHparams(
        names=("gpt2-xl", "openai-community/gpt2-xl"),
        rome=EditHparams(layers=(17,), clamp_norm_factor=4.0, **_REF_ROME, source="kmeng01/rome hparams/ROME/gpt2-xl.json (algorithms.md §5.5)"),
        memit=EditHparams(layers=(13, 14, 15, 16, 17), v_steps=20, mom2_update_weight=20000.0, **_REF_MEMIT,
                          source="kmeng01/memit hparams/MEMIT/gpt2-xl.json (algorithms.md §6.2)"),
        emmet=EditHparams(layers=(17,), v_steps=20, mom2_update_weight=1000.0, emmet_lambda=0.1, **_REF_MEMIT,
                          source="unified-model-editing hparams/EMMET/gpt2-xl.json (algorithms.md §7.3)"),
    ),
    ModelHparams(
        names=("gpt-j-6b", "EleutherAI/gpt-j-6b", "EleutherAI/gpt-j-6B"),
        rome=EditHparams(layers=(5,), clamp_norm_factor=4.0, **_REF_ROME, source="kmeng01/rome hparams/ROME/EleutherAI_gpt-j-6B.json (algorithms.md §5.5)"),
        memit=EditHparams(layers=(3, 4, 5, 6, 7, 8), v_steps=25, mom2_update_weight=15000.0, **_REF_MEMIT,
                          source="kmeng01/memit hparams/MEMIT/EleutherAI_gpt-j-6B.json (algorithms.md §6.2)"),
        emmet=EditHparams(layers=(5,), v_steps=25, mom2_update_weight=1.0, emmet_lambda=0.1, **_REF_MEMIT,
                          source="unified-model-editing hparams/EMMET/EleutherAI_gpt-j-6B.json (algorithms.md §7.3)"),
    ),
    ModelHparams(
        names=("llama-2-7b", "meta-llama/Llama-2-7b-hf"),
        rome=EditHparams(layers=(5,), v_steps=25, v_weight_decay=1e-3, clamp_norm_factor=4.0, kl_factor=0.0625, mom2_update_weight=1.0,
                         source="unified-model-editing (single-layer Llama-2-7B: layer 5, wd 1e-3, clamp 4; algorithms.md §6.2/§7.3)"),
        memit=EditHparams(layers=(5,), v_steps=25, v_weight_decay=1e-3, clamp_norm_factor=4.0, kl_factor=0.0625, mom2_update_weight=1.0,
                          context=((10, 5),), source="unified-model-editing hparams/MEMIT/llama-2-7b.json (algorithms.md §6.2)"),
        emmet=EditHparams(layers=(5,), v_steps=25, v_weight_decay=1e-3, clamp_norm_factor=4.0, kl_factor=0.0625, mom2_update_weight=1.0,
                          emmet_lambda=0.1, context=((10, 5),), source="unified-model-editing hparams/EMMET/llama-2-7b.json (algorithms.md §7.3)"),
    ),
)


def all_hparams() -> tuple[ModelHparams, ...]:
    """The full table: reference models and the models whose layers we chose from our own traces."""
    return MODEL_HPARAMS + MEASURED_HPARAMS


def scaled_lambda(d_key: int, reference: float = 1500.0, reference_dim: int = 16384) -> float:
    """MEMIT's ``lambda`` for a key dimension ``d_key``, proportional to it.

    For one request MEMIT writes the fraction ``s / (lambda + s)`` of the residual, ``s = k^T C^-1 k``,
    and ``E[k^T C^-1 k] = d_key`` for keys from the statistics' distribution, so ``lambda / d_key`` sets
    the trade-off. The constant is measured, not the reference's: on the 6-layer synthetic-world Mamba
    (d_key 192, 4 CounterFact-style facts, layers 0-1, clamp 0.75) ``lambda = 17.6`` (this rule) made the
    edited model reach 40-88% first-token probability where the optimised value reached 40-93%, while
    ``lambda = 176`` (GPT-J's 15,000 scaled by 192/16,384) reached only 1-29% (docs/edit.md).
    """
    return float(round(reference * d_key / reference_dim, 1))


def fallback_hparams(n_layers: int, family: str, method: str, d_key: int | None = None) -> EditHparams:
    """A family-agnostic fallback for unlisted models (layer at ~1/6 of the depth, like GPT-J's 5/28 and
    GPT-2 XL's 17/48 lie in the early-middle MLPs; MEMIT's lambda scaled to the key dimension with
    :func:`scaled_lambda`); ``source`` says it is not measured for this model."""
    layer = max(0, min(n_layers - 1, round(n_layers / 6)))
    src = (
        f"fallback for an unlisted {family} model: layer round(n_layers/6) = {layer}, reference ROME/MEMIT settings; "
        "not measured for this model - run a causal trace and pass layers=..."
    )
    if family == "mamba":
        src += (
            "; Mamba: out_proj (romba's sweep: out_proj edits work across layers 0-20 of 64, algorithms.md §8); on the "
            "6-layer synthetic-world Mamba the mixer restoration peaks at layer 1 = round(6/6) "
            "(benchmarks/edit_synth.py, docs/edit.md)"
        )
    if method == "rome":
        return EditHparams(layers=(layer,), projection=None, **_REF_ROME, source=src)
    if method == "memit":
        span = tuple(range(max(0, layer - 2), min(n_layers, layer + 1)))
        lam = scaled_lambda(d_key) if d_key else 15000.0
        return EditHparams(layers=span, v_steps=25, mom2_update_weight=lam, **_REF_MEMIT, source=src + f"; lambda {lam:g} = 1500 * d_key / 16384 (measured rule, see scaled_lambda)")
    emmet = {**_REF_MEMIT, "clamp_norm_factor": 4.0}  # one layer: the value lives at the projection output, as ROME's
    return EditHparams(layers=(layer,), v_steps=25, mom2_update_weight=1.0, **emmet, source=src + "; EMMET on one layer uses ROME's clamp 4 (value at the projection output)")


def default_hparams(lm: Any, method: str) -> EditHparams:
    """The default hyperparameters of ``method`` for the loaded model ``lm``."""
    if method not in METHODS:
        raise EditError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    for entry in all_hparams():
        if lm.name in entry.names:
            return entry.for_method(method)
    a = lm.adapter
    d_key = a.projection(0).weight(lm.model).shape[1]
    return fallback_hparams(a.n_layers, a.family, method, d_key)


def table_markdown() -> str:
    """The defaults table as Markdown (model, method, layers, projection, lambda, clamp, steps, source)."""
    lines = ["| model | method | layers | projection | λ | clamp | steps | context | source |", "|---|---|---|---|---|---|---|---|---|"]
    for e in all_hparams():
        for m in METHODS:
            h = e.for_method(m)
            lines.append(
                f"| {e.names[0]} | {m} | {','.join(map(str, h.layers))} | {h.projection or 'default'} | {h.mom2_update_weight:g} | "
                f"{h.clamp_norm_factor:g} | {h.v_steps} | {list(map(list, h.context))} | {h.source} |"
            )
    return "\n".join(lines)


_SMOL_TRACE = (
    "layers from our trace: mean MLP restoration effect (window 10, last subject token, 3 noise draws, 12 known_1000 "
    "facts) peaks at layer 4 (0.106; layers 1-5: 0.077-0.106; from layer 6 below 0.06); "
    "benchmarks/results/edit_layers_smollm2.json, benchmarks/edit_layers.py"
)

#: Models whose layers we chose from our own measurements.
MEASURED_HPARAMS: tuple[ModelHparams, ...] = (
    ModelHparams(
        names=("smollm2-135m", "HuggingFaceTB/SmolLM2-135M-Instruct"),
        rome=EditHparams(layers=(4,), clamp_norm_factor=4.0, **_REF_ROME, source=_SMOL_TRACE + "; other settings: reference ROME"),
        memit=EditHparams(layers=(2, 3, 4, 5), v_steps=25, mom2_update_weight=scaled_lambda(1536), **_REF_MEMIT,
                          source=_SMOL_TRACE + "; MEMIT spans the layers with effect >= 0.086; lambda = scaled_lambda(1536)"),
        emmet=EditHparams(layers=(4,), v_steps=25, mom2_update_weight=1.0, emmet_lambda=0.1, **{**_REF_MEMIT, "clamp_norm_factor": 4.0},
                          source=_SMOL_TRACE + "; EMMET one layer with ROME's clamp 4"),
    ),
)
