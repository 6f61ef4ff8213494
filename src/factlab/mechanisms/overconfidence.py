"""The final-layer "anti-overconfidence" effect (Lv et al. 2024): how much the last block lowers the
correct answer's probability, which of its parts do it, and how those parts align with token frequency.

Measured from :class:`~factlab.mechanisms.dataset.FactStats`:

* ``final_layer_prob_change``: logit-lens answer probability after the last block minus after the one
  before it, per fact (negative = suppression), and the fraction of facts where it is negative.
* ``final_layer_dla``: direct contributions of the last block's heads and MLP to the answer's logit
  *centred on the vocabulary mean* (a part that lifts every logit equally changes no probability).
* first-position attention of each last-layer head (mean attention from the last token to the first).
* the final MLP's *intercept*: its mean residual-space output over the facts (the prompt-independent
  part); its and each head's mean output's lens logits correlated with log unigram frequency.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import numpy as np
import torch

from factlab.confidence import Estimate, bounded_mean_ci, mean_ci, proportion_ci
from factlab.mechanisms.dataset import FactStats
from factlab.mechanisms._common import short_repr
from factlab.mechanisms.frequency import FrequencyCorrelation, UnigramCounts, frequency_correlation
from factlab.models.loading import LoadedModel


@dataclass
class HeadSuppression:
    layer: int
    head: int
    dla_centered: Estimate
    attn_first: Estimate
    frequency: FrequencyCorrelation | None

    def to_dict(self) -> dict[str, object]:
        return {
            "layer": self.layer, "head": self.head, "dla_centered": self.dla_centered.to_dict(),
            "attn_first": self.attn_first.to_dict(), "frequency": self.frequency.to_dict() if self.frequency else None,
        }


@dataclass
class OverconfidenceReport:
    """Size and carriers of the final-layer suppression over a set of facts (all CIs 95%)."""

    model: str
    n: int
    final_layer_prob_change: Estimate
    suppressed_fraction: Estimate
    final_layer_logit_change: Estimate
    prob_before_final: Estimate
    prob_after_final: Estimate
    attn_dla: Estimate
    mlp_dla: Estimate
    heads: list[HeadSuppression]
    mlp_intercept_frequency: FrequencyCorrelation | None
    mlp_intercept_answer_dla: Estimate
    attn_mean_frequency: FrequencyCorrelation | None
    first_position_heads: list[int]
    first_position_heads_dla: Estimate | None
    first_vs_dla_correlation: float | None
    notes: list[str] = field(default_factory=list)

    def __repr__(self) -> str:
        return short_repr(self, model=self.model, n=self.n, final_layer_prob_change=self.final_layer_prob_change.mean,
                          suppressed_fraction=self.suppressed_fraction.mean, heads=len(self.heads))

    def to_dict(self) -> dict[str, object]:
        e = lambda x: None if x is None else x.to_dict()  # noqa: E731
        return {
            "model": self.model,
            "n": self.n,
            "final_layer_prob_change": e(self.final_layer_prob_change),
            "suppressed_fraction": e(self.suppressed_fraction),
            "final_layer_logit_change": e(self.final_layer_logit_change),
            "prob_before_final": e(self.prob_before_final),
            "prob_after_final": e(self.prob_after_final),
            "attn_dla_centered": e(self.attn_dla),
            "mlp_dla_centered": e(self.mlp_dla),
            "heads": [h.to_dict() for h in self.heads],
            "mlp_intercept_frequency": e(self.mlp_intercept_frequency),
            "mlp_intercept_answer_dla_centered": e(self.mlp_intercept_answer_dla),
            "attn_mean_frequency": e(self.attn_mean_frequency),
            "first_position_heads": self.first_position_heads,
            "first_position_heads_dla_centered": e(self.first_position_heads_dla),
            "first_attention_vs_dla_correlation": self.first_vs_dla_correlation,
            "notes": self.notes,
        }

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    def plot(self, path) -> None:
        from factlab.mechanisms.plot import plot_overconfidence

        plot_overconfidence(path, self)


def _last_layer_parts(stats: FactStats, n_layers: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Column indices of the last layer's parts in ``stats``: its heads, its whole attention (heads and
    bias) and its MLP (Mamba: mixer)."""
    kinds, layers = np.array(stats.kinds), np.array(stats.part_layers)
    last = layers == n_layers - 1
    heads = np.where((kinds == "head") & last)[0]
    attn = np.where(((kinds == "head") | (kinds == "attn_bias")) & last)[0]
    mlp = np.where(((kinds == "mlp") | (kinds == "mixer")) & last)[0]
    return heads, attn, mlp


def suppression_on(lm: LoadedModel, stats: FactStats, mask: np.ndarray) -> dict[str, object]:
    """The final block's effect on the answer over the facts selected by ``mask`` ``(N,)`` bool (e.g. the
    facts the model gets right): change in the answer's lens probability across the last block, the
    fraction of facts for which it falls, and the centred direct contributions of the last layer's
    attention and MLP (logit units)."""
    L = lm.adapter.n_layers
    m = np.asarray(mask, dtype=bool)
    p = stats.lens_prob[m]
    dp = p[:, -1] - p[:, -2]
    _, attn_idx, mlp_idx = _last_layer_parts(stats, L)
    dlac = stats.dla_centered[m]
    return {
        "n": int(m.sum()),
        "final_layer_prob_change": bounded_mean_ci(dp, -1.0, 1.0).to_dict(),
        "suppressed_fraction": proportion_ci((dp < 0).astype(float)).to_dict(),
        "prob_before_final": bounded_mean_ci(p[:, -2], 0.0, 1.0).to_dict(),
        "prob_after_final": bounded_mean_ci(p[:, -1], 0.0, 1.0).to_dict(),
        "attn_dla_centered": mean_ci(dlac[:, attn_idx].sum(1)).to_dict() if len(attn_idx) else None,
        "mlp_dla_centered": mean_ci(dlac[:, mlp_idx].sum(1)).to_dict(),
    }


def overconfidence(
    lm: LoadedModel, stats: FactStats, counts: UnigramCounts | None = None, *, first_threshold: float = 0.5
) -> OverconfidenceReport:
    """Measure the final-layer suppression over ``stats`` (see module docstring). ``first_threshold``:
    mean attention to the first token above which a last-layer head counts as first-position-attending."""
    L = lm.adapter.n_layers
    p = stats.lens_prob
    logit_lens_change = None
    dp = p[:, -1] - p[:, -2]
    heads_idx, attn_idx, mlp_idx = _last_layer_parts(stats, L)
    dlac = stats.dla_centered
    # change in the answer's centred lens logit across the last block = the block's centred direct
    # contribution only when the final norm's scale does not move; report the measured change instead
    logit_lens_change = np.log(np.maximum(p[:, -1], 1e-30)) - np.log(np.maximum(p[:, -2], 1e-30))
    notes = [
        "probabilities are logit-lens readings of the answer's first token at the last prompt token",
        "final_layer_logit_change is the change in log-probability of the answer across the last block",
        "DLA is centred: the contribution to the answer's logit minus the vocabulary-mean logit",
    ]
    head_rows: list[HeadSuppression] = []
    first_heads: list[int] = []
    fp_dla = None
    corr = None
    attn_freq = None
    if len(heads_idx):
        af = stats.attn_first[:, L - 1]  # (N, H)
        for j, c in enumerate(heads_idx):
            h = stats.part_heads[c]
            fc = None
            if counts is not None:
                fc = frequency_correlation(lm, f"L{L - 1}.H{h} mean output", torch.as_tensor(stats.final_heads[:, h].mean(0)), counts)
            head_rows.append(HeadSuppression(L - 1, h, mean_ci(dlac[:, c]), mean_ci(af[:, h]), fc))
        first_heads = [r.head for r in head_rows if r.attn_first.mean >= first_threshold]
        if first_heads:
            cols = [c for c in heads_idx if stats.part_heads[c] in first_heads]
            fp_dla = mean_ci(dlac[:, cols].sum(1))
        a = np.array([r.attn_first.mean for r in head_rows])
        dd = np.array([r.dla_centered.mean for r in head_rows])
        if len(a) > 2 and a.std() > 0 and dd.std() > 0:
            corr = float(np.corrcoef(a, dd)[0, 1])
        if counts is not None:
            attn_freq = frequency_correlation(lm, "final attention mean output", torch.as_tensor(stats.final_attn.mean(0)), counts)
    intercept = torch.as_tensor(stats.final_mlp.mean(0))
    mlp_freq = frequency_correlation(lm, "final MLP intercept (mean output)", intercept, counts) if counts is not None else None
    from factlab.mechanisms.frequency import vocab_logits

    vl = vocab_logits(lm, intercept.reshape(1, -1))[0]
    vl = (vl - vl.mean()).cpu().numpy()
    # the frozen scale of each fact's final norm is not stored; use the ratio of the MLP's DLA to its
    # scale-free lens logit per fact to put the intercept on the same scale
    from factlab.mechanisms._common import freeze_norm, unembed

    W, _ = unembed(lm)
    fz = freeze_norm(lm.adapter.final_norm(lm.model), torch.ones(1, W.shape[1], dtype=lm.dtype, device=lm.device), check=False)
    ids = torch.as_tensor(stats.answer_ids, device=W.device)
    dirs = fz.direction(torch.as_tensor(stats.final_mlp, device=W.device).double())  # (N, d)
    raw_ans = (dirs * (W[ids] - W.mean(0))).sum(-1).cpu().numpy()
    mlp_dla = dlac[:, mlp_idx].sum(1)
    scale = np.where(np.abs(raw_ans) > 1e-12, mlp_dla / np.where(np.abs(raw_ans) > 1e-12, raw_ans, 1.0), np.nan)
    icpt = vl[stats.answer_ids] * scale
    return OverconfidenceReport(
        model=lm.name,
        n=stats.n,
        final_layer_prob_change=bounded_mean_ci(dp, -1.0, 1.0),
        suppressed_fraction=proportion_ci((dp < 0).astype(float)),
        final_layer_logit_change=mean_ci(logit_lens_change),
        prob_before_final=bounded_mean_ci(p[:, -2], 0.0, 1.0),
        prob_after_final=bounded_mean_ci(p[:, -1], 0.0, 1.0),
        attn_dla=mean_ci(dlac[:, attn_idx].sum(1)) if len(attn_idx) else mean_ci([]),
        mlp_dla=mean_ci(mlp_dla),
        heads=head_rows,
        mlp_intercept_frequency=mlp_freq,
        mlp_intercept_answer_dla=mean_ci(icpt),
        attn_mean_frequency=attn_freq,
        first_position_heads=first_heads,
        first_position_heads_dla=fp_dla,
        first_vs_dla_correlation=corr,
        notes=notes,
    )
