"""The logit lens: read the residual stream after each layer through the model's own final norm and
unembedding, and follow the answer's probability and rank across layers.

Row ``0`` of every per-layer array is the embedding (``embed`` site, the input of the first block for
models without absolute position embeddings); row ``i + 1`` is the output of block ``i``. The last row
equals the model's own logits (tested).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from factlab.confidence import Estimate, bounded_mean_ci, proportion_ci
from factlab.interventions import run_and_capture
from factlab.mechanisms._common import AnswerToken, answer_token, short_repr
from factlab.models.loading import LoadedModel


def layer_labels(lm: LoadedModel) -> list[str]:
    """``["embed", "0", "1", ...]``: the labels of the lens rows."""
    return ["embed"] + [str(i) for i in range(lm.adapter.n_layers)]


@torch.no_grad()
def lens_logits(lm: LoadedModel, prompts: Sequence[str]) -> torch.Tensor:
    """``(B, L + 1, V)`` float32 lens logits at each prompt's last token (row 0: embedding)."""
    batch = lm.encode(list(prompts))
    sites = ["embed"] + [f"layer.{i}.resid" for i in range(lm.adapter.n_layers)]
    acts = run_and_capture(lm, batch, sites, positions=[-1], stop_early=False)
    resid = torch.cat([acts[s] for s in sites], dim=1)  # (B, L+1, d)
    return lm.adapter.logits_from_resid(lm.model, resid).float()


@dataclass
class LensResult:
    """The lens for one prompt: the answer's probability, rank and logit per layer, and the top token.

    Arrays have one entry per row of :func:`layer_labels` (``embed``, then each block's output).
    """

    prompt: str
    answer: AnswerToken
    layers: list[str]
    prob: list[float]
    rank: list[int]
    logit: list[float]
    top_tokens: list[str]
    model: str = ""

    def __repr__(self) -> str:
        return short_repr(self, prompt=self.prompt, answer=self.answer.token, layers=self.layers, peak_layer=self.peak_layer,
                          final_prob=self.prob[-1] if self.prob else None)

    @property
    def peak_layer(self) -> str:
        return self.layers[int(np.argmax(self.prob))]

    @property
    def final_layer_change(self) -> float:
        """Answer probability after the last block minus after the second-to-last block."""
        return self.prob[-1] - self.prob[-2]

    def to_dict(self) -> dict[str, object]:
        return {
            "model": self.model,
            "prompt": self.prompt,
            "answer": self.answer.to_dict(),
            "layers": self.layers,
            "prob": self.prob,
            "rank": self.rank,
            "logit": self.logit,
            "top_tokens": self.top_tokens,
            "peak_layer": self.peak_layer,
            "final_layer_change": self.final_layer_change,
        }

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, ensure_ascii=False)

    def plot(self, path) -> None:
        from factlab.mechanisms.plot import plot_lens

        plot_lens(path, self.layers, {"answer prob": self.prob}, title=f"logit lens: {self.prompt!r} -> {self.answer.token!r}", ranks=self.rank)


def logit_lens(lm: LoadedModel, prompt: str, answer: str, *, exact: bool = False) -> LensResult:
    """The logit lens of ``prompt`` for ``answer`` (its first token unless ``exact``)."""
    ans = answer_token(lm, prompt, answer, exact=exact)
    logits = lens_logits(lm, [prompt])[0]  # (L+1, V)
    probs = logits.softmax(-1)
    tid = ans.token_id
    p = probs[:, tid]
    rank = (logits > logits[:, tid : tid + 1]).sum(-1)
    top = logits.argmax(-1)
    return LensResult(
        prompt=prompt,
        answer=ans,
        layers=layer_labels(lm),
        prob=p.tolist(),
        rank=[int(r) for r in rank],
        logit=logits[:, tid].tolist(),
        top_tokens=[lm.tokenizer.decode([int(t)]) for t in top],
        model=lm.name,
    )


@dataclass
class DatasetLens:
    """The lens averaged over facts: per layer, mean answer probability, mean reciprocal rank-1 and
    top-1 rate, each an :class:`Estimate` with a 95% CI; ``prob`` ``(N, L+1)`` keeps the raw values."""

    layers: list[str]
    prob: np.ndarray
    rank: np.ndarray
    model: str = ""

    def __repr__(self) -> str:
        return short_repr(self, model=self.model, n=int(self.prob.shape[0]), layers=self.layers, prob=self.prob)

    def mean_prob(self) -> list[Estimate]:
        return [bounded_mean_ci(self.prob[:, j], 0.0, 1.0) for j in range(self.prob.shape[1])]

    def top1_rate(self) -> list[Estimate]:
        return [proportion_ci((self.rank[:, j] == 0).astype(float)) for j in range(self.rank.shape[1])]

    def to_dict(self) -> dict[str, object]:
        return {
            "model": self.model,
            "n": int(self.prob.shape[0]),
            "layers": self.layers,
            "mean_prob": [e.to_dict() for e in self.mean_prob()],
            "top1_rate": [e.to_dict() for e in self.top1_rate()],
            "median_rank": [float(np.median(self.rank[:, j])) for j in range(self.rank.shape[1])],
        }

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, ensure_ascii=False)

    def plot(self, path) -> None:
        from factlab.mechanisms.plot import plot_lens

        mp = self.mean_prob()
        plot_lens(
            path,
            self.layers,
            {"mean answer prob": [e.mean for e in mp], "top-1 rate": [e.mean for e in self.top1_rate()]},
            title=f"logit lens over {self.prob.shape[0]} facts",
            bands={"mean answer prob": ([e.low for e in mp], [e.high for e in mp])},
        )


def lens_from_logits(logits: torch.Tensor, token_ids: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """``(prob, rank)`` arrays ``(B, L+1)`` of ``token_ids`` ``(B,)`` from lens logits ``(B, L+1, V)``."""
    ids = token_ids.to(logits.device).long()[:, None, None].expand(-1, logits.shape[1], 1)
    chosen = logits.gather(-1, ids)
    prob = logits.softmax(-1).gather(-1, ids)[..., 0]
    rank = (logits > chosen).sum(-1)
    return prob.cpu().numpy(), rank.cpu().numpy()
