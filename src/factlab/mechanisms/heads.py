"""Argument passing: heads whose attention from the last token concentrates on the subject and whose
output carries the subject, and what happens to the answer when they are ablated.

A head *passes the argument* when (over facts) its mean attention mass from the last token onto the
subject tokens is at least ``min_attention`` and its output, read through the final norm's gain and the
unembedding, puts a subject token ``min_z`` standard deviations above the vocabulary's mean logit (the
``subject_z`` score of :class:`~factlab.mechanisms.dataset.FactStats`). Ablation replaces the heads'
outputs (before the output projection) at the last token by zero or by their mean over the evaluated
prompts' last tokens, and measures the change in the answer's probability.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from typing import Literal, Sequence

import numpy as np
import torch

from factlab.confidence import Estimate, bounded_mean_ci, mean_ci
from factlab.interventions import capture, patch
from factlab.mechanisms._common import MechanismError, answer_token, check_head, require_heads, short_repr
from factlab.mechanisms.dataset import FactCase, FactStats
from factlab.models.loading import LoadedModel

Head = tuple[int, int]


@dataclass
class HeadScore:
    """Argument-passing evidence for one head over a set of facts."""

    layer: int
    head: int
    attn_subject: Estimate
    subject_z: Estimate
    decodable_rate: float
    passes: bool

    def to_dict(self) -> dict[str, object]:
        return {
            "layer": self.layer, "head": self.head, "attn_subject": self.attn_subject.to_dict(),
            "subject_z": self.subject_z.to_dict(), "decodable_rate": self.decodable_rate, "passes": self.passes,
        }


def argument_heads(stats: FactStats, *, min_attention: float = 0.3, min_z: float = 3.0, top: int = 10) -> list[HeadScore]:
    """Heads ranked by ``mean attention to subject x mean subject z`` (``top`` of them); ``passes`` marks
    those meeting both thresholds. ``decodable_rate``: fraction of facts with ``subject_z >= min_z``."""
    if stats.attn_subject.size == 0 or stats.attn_subject.shape[-1] == 0:
        raise MechanismError("these statistics have no attention heads (Mamba); argument passing by heads has no analogue")
    a = stats.attn_subject.mean(0)  # (L, H)
    z = stats.subject_z.mean(0)
    score = a * np.clip(z, 0, None)
    order = np.argsort(-score, axis=None)[:top]
    out = []
    for flat in order:
        l, h = np.unravel_index(flat, a.shape)
        out.append(
            HeadScore(
                int(l), int(h), mean_ci(stats.attn_subject[:, l, h]), mean_ci(stats.subject_z[:, l, h]),
                float((stats.subject_z[:, l, h] >= min_z).mean()), bool(a[l, h] >= min_attention and z[l, h] >= min_z),
            )
        )
    return out


@dataclass
class AblationResult:
    """Answer probability at the last token before and after ablating ``heads`` (``mode``), per fact."""

    heads: list[Head]
    mode: str
    prob_before: np.ndarray
    prob_after: np.ndarray
    control_heads: list[Head] = field(default_factory=list)
    control_after: np.ndarray | None = None

    def __repr__(self) -> str:
        return short_repr(self, heads=self.heads, mode=self.mode, n=int(self.prob_before.size), change=self.effect().mean)

    def effect(self) -> Estimate:
        return bounded_mean_ci(self.prob_after - self.prob_before, -1.0, 1.0)

    def relative(self) -> Estimate:
        return mean_ci((self.prob_after - self.prob_before) / np.maximum(self.prob_before, 1e-12))

    def to_dict(self) -> dict[str, object]:
        d: dict[str, object] = {
            "heads": [list(h) for h in self.heads],
            "mode": self.mode,
            "mode_meaning": "zero: head output (before o_proj) set to 0 at the last token; mean: set to its mean over the evaluated prompts' last tokens",
            "n": int(self.prob_before.size),
            "prob_before": bounded_mean_ci(self.prob_before, 0.0, 1.0).to_dict(),
            "prob_after": bounded_mean_ci(self.prob_after, 0.0, 1.0).to_dict(),
            "change": self.effect().to_dict(),
        }
        if self.control_after is not None:
            d["control_heads"] = [list(h) for h in self.control_heads]
            d["control_change"] = mean_ci(self.control_after - self.prob_before).to_dict()
        return d

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)


def _answer_probs(lm: LoadedModel, prompts: list[str], ids: torch.Tensor, patches=None) -> np.ndarray:
    batch = lm.encode(prompts)
    with torch.no_grad():
        if patches:
            with patch(lm, patches):
                logits = lm.forward(batch)[:, -1]
        else:
            logits = lm.forward(batch)[:, -1]
    return logits.float().softmax(-1)[torch.arange(len(prompts)), ids].cpu().numpy()


def _head_patches(heads: Sequence[Head], values: dict[Head, torch.Tensor] | None) -> dict:
    by_layer: dict[int, list[int]] = {}
    for l, h in heads:
        by_layer.setdefault(l, []).append(h)

    def make(layer: int, hs: list[int]):
        def fn(v: torch.Tensor) -> torch.Tensor:
            v = v.clone()
            for h in hs:
                v[:, -1, h, :] = 0 if values is None else values[(layer, h)].to(v)
            return v

        return fn

    return {f"layer.{l}.attn.heads": make(l, hs) for l, hs in by_layer.items()}


def ablate_heads(
    lm: LoadedModel,
    cases: Sequence[FactCase],
    heads: Sequence[Head],
    *,
    mode: Literal["zero", "mean"] = "mean",
    control: bool = True,
    seed: int = 0,
    batch_size: int = 16,
) -> AblationResult:
    """Ablate ``heads`` at the last token of each case's prompt and measure the answer's probability.

    ``control``: also ablate as many random heads drawn from the same layers (seeded), as a baseline.
    """
    require_heads(lm, "head ablation")
    if not heads:
        raise MechanismError("no heads to ablate")
    for l, h in heads:
        check_head(lm, l, h)
    if mode not in ("zero", "mean"):
        raise MechanismError(f"ablation mode must be 'zero' or 'mean', not {mode!r}")
    rng = random.Random(seed)
    H = int(lm.adapter.n_heads)
    ctrl: list[Head] = []
    if control:
        pool = [(l, h) for l in sorted({l for l, _ in heads}) for h in range(H) if (l, h) not in set(heads)]
        ctrl = rng.sample(pool, min(len(heads), len(pool)))
    prompts = [c.prompt for c in cases]
    ids = torch.tensor([answer_token(lm, c.prompt, c.answer).token_id for c in cases])
    means: dict[Head, torch.Tensor] | None = None
    if mode == "mean":
        layers = sorted({l for l, _ in list(heads) + ctrl})
        sums: dict[int, torch.Tensor] = {}
        for s in range(0, len(prompts), batch_size):
            with torch.no_grad(), capture(lm, [f"layer.{l}.attn.heads" for l in layers], positions=[-1]) as acts:
                lm.forward(lm.encode(prompts[s : s + batch_size]))
            for l in layers:
                v = acts[f"layer.{l}.attn.heads"][:, 0].double().sum(0)
                sums[l] = sums.get(l, 0) + v
        means = {(l, h): (sums[l][h] / len(prompts)) for l in layers for h in range(H)}
    before, after, cafter = [], [], []
    for s in range(0, len(prompts), batch_size):
        p, i = prompts[s : s + batch_size], ids[s : s + batch_size]
        before.append(_answer_probs(lm, p, i))
        after.append(_answer_probs(lm, p, i, _head_patches(heads, means)))
        if ctrl:
            cafter.append(_answer_probs(lm, p, i, _head_patches(ctrl, means)))
    return AblationResult(
        list(heads), mode, np.concatenate(before), np.concatenate(after), ctrl, np.concatenate(cafter) if ctrl else None
    )
