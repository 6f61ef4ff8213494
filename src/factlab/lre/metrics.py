"""Faithfulness and causality of an LRE on held-out samples (algorithms.md §9.3)."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Sequence

import torch

from factlab.data.lre import Sample
from factlab.interventions import patch, resume_from, run_and_capture, write
from factlab.lre.operator import LRE
from factlab.lre.prompts import is_nontrivial_prefix, recall_at_k
from factlab.lre.states import h_site, subject_index
from factlab.models.loading import LoadedModel


def decode_topk(lm: LoadedModel, z: torch.Tensor, k: int) -> list[list[str]]:
    """Top-``k`` decoded tokens of object states ``z`` ``(N, d)`` through the final norm and unembedding."""
    with torch.no_grad():
        logits = lm.adapter.logits_from_resid(lm.model, z.to(device=lm.device, dtype=lm.dtype)).float()
    ids = logits.topk(k, dim=-1).indices.tolist()
    return [[lm.tokenizer.decode([t]) for t in row] for row in ids]


@dataclass
class Faithfulness:
    """Recall@1..k of decoded predictions against the true objects; ``hits[i]`` is sample i's @1 success."""

    recall: list[float]
    hits: list[bool]
    predictions: list[list[str]] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"recall": self.recall, "n": len(self.hits)}


def score_predictions(preds: Sequence[Sequence[str]], objects: Sequence[str]) -> Faithfulness:
    """Recall@1..k and per-sample @1 hits of decoded top-k tokens against the true objects (prefix rule)."""
    return Faithfulness(recall_at_k(preds, objects), [is_nontrivial_prefix(p[0], o) for p, o in zip(preds, objects)], list(preds))


def faithfulness(lm: LoadedModel, operator: LRE, h: torch.Tensor, objects: Sequence[str], *, k: int = 3) -> Faithfulness:
    """Decode ``operator.predict(h)`` for subject states ``h`` ``(N, d)`` and score against ``objects``."""
    return score_predictions(decode_topk(lm, operator.predict(h), k), objects)


def edit_pairs(samples: Sequence[Sample], seed: int = 0) -> list[tuple[int, int]]:
    """For each sample i, a random other sample j with a different subject and a different object (seeded);
    samples without any such partner are skipped."""
    rng = random.Random(seed)
    pairs = []
    for i, s in enumerate(samples):
        cands = [j for j, t in enumerate(samples) if t.subject != s.subject and t.object != s.object]
        if cands:
            pairs.append((i, rng.choice(cands)))
    return pairs


@dataclass
class Causality:
    """Edit success (top-1 token is a non-trivial prefix of the target object) per pair, and the
    probabilities of the first tokens of the original/target objects after the edit."""

    success: list[bool]
    p_target: list[float]
    p_original: list[float]
    predictions: list[str] = field(default_factory=list)

    @property
    def efficacy(self) -> float:
        return sum(self.success) / len(self.success) if self.success else float("nan")

    @property
    def efficacy_score(self) -> float:
        """Mean of [p(o') > p(o)] over first tokens."""
        return sum(t > o for t, o in zip(self.p_target, self.p_original)) / len(self.success) if self.success else float("nan")

    def to_dict(self) -> dict:
        return {"efficacy": self.efficacy, "efficacy_score": self.efficacy_score, "n": len(self.success)}


def _first_token(lm: LoadedModel, prompt: str, obj: str) -> int:
    from factlab.prompts import continuation_ids

    return continuation_ids(lm.tokenizer, prompt, " " + obj.strip())[0]


@torch.no_grad()
def apply_edits(
    lm: LoadedModel,
    prompts: Sequence[str],
    subjects: Sequence[str],
    layer,
    new_h: torch.Tensor | Sequence[torch.Tensor],
    *,
    batch_size: int = 16,
) -> torch.Tensor | list[torch.Tensor]:
    """Next-token probabilities ``(N, V)`` after writing ``new_h`` ``(N, d)`` as the subject state at ``layer``.

    ``new_h`` may be a list of alternatives (one ``(N, d)`` tensor each, e.g. one per rank): the blocks up
    to ``layer`` then run once per batch and only the blocks above run per alternative; a list of
    ``(N, V)`` tensors is returned.
    """
    single = isinstance(new_h, torch.Tensor)
    edits = [new_h] if single else list(new_h)
    site = h_site(lm, layer)
    L = lm.adapter.n_layers
    out: list[list[torch.Tensor]] = [[] for _ in edits]
    for i in range(0, len(prompts), batch_size):
        ps, ss = list(prompts[i : i + batch_size]), list(subjects[i : i + batch_size])
        batch = lm.encode(ps)
        pos = torch.tensor([[batch.position(r, subject_index(lm, p, s))] for r, (p, s) in enumerate(zip(ps, ss))])
        hidden = None
        if layer != "emb" and layer < L - 1:
            hidden = run_and_capture(lm, batch, [site])[site]
        for e, edit in enumerate(edits):
            new = edit[i : i + batch_size, None]
            if hidden is None:
                with patch(lm, {site: new}, positions=pos):
                    logits = lm.forward(batch, logits_to_keep=1)
            else:
                with resume_from(lm, layer + 1, write(hidden, new, pos)):
                    logits = lm.forward(batch, logits_to_keep=1)
            out[e].append(logits[:, -1].float().softmax(-1).cpu())
    res = [torch.cat(o) for o in out]
    return res[0] if single else res


def score_edits(
    lm: LoadedModel, probs: torch.Tensor, prompts: Sequence[str], originals: Sequence[str], targets: Sequence[str]
) -> Causality:
    """Turn post-edit next-token probabilities into a :class:`Causality`."""
    top = probs.argmax(-1).tolist()
    preds = [lm.tokenizer.decode([t]) for t in top]
    pt = [float(probs[i, _first_token(lm, p, t)]) for i, (p, t) in enumerate(zip(prompts, targets))]
    po = [float(probs[i, _first_token(lm, p, o)]) for i, (p, o) in enumerate(zip(prompts, originals))]
    return Causality([is_nontrivial_prefix(x, t) for x, t in zip(preds, targets)], pt, po, preds)


def causality(
    lm: LoadedModel,
    operator: LRE,
    prompts: Sequence[str],
    subjects: Sequence[str],
    objects: Sequence[str],
    h: torch.Tensor,
    z: torch.Tensor,
    pairs: Sequence[tuple[int, int]],
    *,
    rank: int | None = None,
) -> Causality:
    """Edit ``h_i + W̄⁺_r (z_j - z_i)`` for each pair (i, j) and check that the model now says ``o_j``.

    ``h``/``z`` ``(N, d)`` are the subject/object states of ``prompts``; ``W̄⁺_r`` is the rank-``rank``
    pseudo-inverse of the unscaled weight (default ``operator.edit_rank``).
    """
    if not pairs:
        return Causality([], [], [])
    pinv = operator.pinv(rank)
    i, j = zip(*pairs)
    i, j = list(i), list(j)
    delta = (z[j] - z[i]) @ pinv.T
    probs = apply_edits(lm, [prompts[a] for a in i], [subjects[a] for a in i], operator.layer, h[i] + delta)
    return score_edits(lm, probs, [prompts[a] for a in i], [objects[a] for a in i], [objects[b] for b in j])


def insert_subject(
    lm: LoadedModel, layer, prompts: Sequence[str], subjects: Sequence[str], objects: Sequence[str], h: torch.Tensor, pairs
) -> Causality:
    """Causality baseline: write the other subject's state ``h_j`` in place of ``h_i``."""
    if not pairs:
        return Causality([], [], [])
    i, j = zip(*pairs)
    i, j = list(i), list(j)
    probs = apply_edits(lm, [prompts[a] for a in i], [subjects[a] for a in i], layer, h[j])
    return score_edits(lm, probs, [prompts[a] for a in i], [objects[a] for a in i], [objects[b] for b in j])


def causality_by_rank(
    lm: LoadedModel,
    operator: LRE,
    prompts: Sequence[str],
    subjects: Sequence[str],
    objects: Sequence[str],
    h: torch.Tensor,
    z: torch.Tensor,
    pairs: Sequence[tuple[int, int]],
    ranks: Sequence[int],
) -> list[Causality]:
    """:func:`causality` for several pseudo-inverse ranks; the blocks below the edit run once."""
    if not pairs:
        return [Causality([], [], []) for _ in ranks]
    i, j = zip(*pairs)
    i, j = list(i), list(j)
    u, s, vh = torch.linalg.svd(operator.weight.float(), full_matrices=False)
    dz = (z[j] - z[i]) @ u  # (P, d) in the left singular basis
    edits = []
    for r in ranks:
        r = min(r, s.numel())
        edits.append(h[i] + (dz[:, :r] / s[:r]) @ vh[:r])
    ps, ss = [prompts[a] for a in i], [subjects[a] for a in i]
    probs = apply_edits(lm, ps, ss, operator.layer, edits)
    return [score_edits(lm, p, ps, [objects[a] for a in i], [objects[b] for b in j]) for p in probs]
