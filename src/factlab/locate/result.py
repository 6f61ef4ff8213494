"""The result of one causal trace."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np


@dataclass
class TraceResult:
    """Restored scores of one trace.

    ``scores[i, l]`` (tokens x layers) is the target's score (probability unless ``metric == "logit"``,
    averaged over the corrupted rows) when the ``kind`` state of token ``i`` at layer ``l`` (for windowed
    kinds: the window of ``window`` layers centred on ``l``) is restored to its clean value. ``low`` is
    the corrupted score, ``high`` the clean one. ``subject_range`` is ``[start, end)`` in ``tokens``.
    """

    prompt: str
    subject: str
    tokens: list[str]
    subject_range: tuple[int, int]
    kind: str
    target: str
    target_ids: list[int]
    scores: np.ndarray
    low: float
    high: float
    window: int = 1
    samples: int = 10
    corruption: str = "noise"
    noise_level: float | None = None
    method: str = "exact"
    metric: str = "prob"
    model: str = ""
    swap_subjects: list[str] = field(default_factory=list)

    @property
    def n_layers(self) -> int:
        return int(self.scores.shape[1])

    def __repr__(self) -> str:
        """One line (a notebook cell ending in a result never prints every score): kind, prompt, subject, the
        scores' shape and where they peak."""
        try:
            pk = self.peak()
            top = f"peak={pk['score']:.4g} at token {pk['token_index']} {pk['token']!r}, layer {pk['layer']}"
        except ValueError:  # all-NaN scores have no peak
            top = "peak=none"
        prompt = self.prompt if len(self.prompt) <= 60 else self.prompt[:57] + "..."
        return (f"TraceResult(kind={self.kind!r}, method={self.method!r}, prompt={prompt!r}, subject={self.subject!r}, "
                f"target={self.target!r}, scores={tuple(self.scores.shape)} tokens x layers, low={self.low:.4g}, "
                f"high={self.high:.4g}, {top})")

    @property
    def indirect_effects(self) -> np.ndarray:
        """``scores - low`` (tokens x layers)."""
        return self.scores - self.low

    @property
    def relative(self) -> np.ndarray:
        """Relative recovery ``(scores - low) / (high - low)`` (1 = fully restored; NaN when high == low)."""
        span = self.high - self.low
        return (self.scores - self.low) / span if span != 0 else np.full_like(self.scores, np.nan)

    def peak(self) -> dict[str, Any]:
        """Where the restored score is highest: token index, token text, layer and score."""
        i, l = np.unravel_index(int(np.nanargmax(self.scores)), self.scores.shape)
        return {"token_index": int(i), "token": self.tokens[i], "layer": int(l), "score": float(self.scores[i, l])}

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["scores"] = np.asarray(self.scores).tolist()
        d["subject_range"] = list(self.subject_range)
        d["relative"] = np.nan_to_num(self.relative, nan=0.0).tolist()
        d["peak"] = self.peak()
        return d

    def to_json(self, path: str | Path | None = None) -> str:
        """The result as JSON (written atomically to ``path`` when given)."""
        text = json.dumps(self.to_dict(), ensure_ascii=False)
        if path is not None:
            from factlab.io import write_json

            write_json(path, self.to_dict())
        return text

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TraceResult":
        keys = set(cls.__dataclass_fields__)
        kw = {k: v for k, v in d.items() if k in keys}
        kw["scores"] = np.asarray(kw["scores"], dtype=np.float64)
        kw["subject_range"] = tuple(kw["subject_range"])
        return cls(**kw)

    def plot(self, path: str | Path, *, relative: bool = False) -> Path:
        """Draw the ROME-style heatmap (tokens on rows, subject tokens marked with ``*``) to PNG or SVG."""
        from factlab.locate.plot import trace_heatmap

        return trace_heatmap(self, path, relative=relative)
