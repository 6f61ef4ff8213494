"""Unigram token frequencies of a text corpus under a model's tokenizer, cached on disk, and the
correlation of residual-space directions with them.

The cache key is the SHA-256 of the tokenizer's serialised vocabulary/merges plus the corpus id (which
hashes the corpus files), so a different tokenizer or corpus never reuses counts.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from factlab.models.loading import LoadedModel, cache_dir


def _tokenizer_key(tokenizer) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    text = backend.to_str() if backend is not None else repr(sorted(tokenizer.get_vocab().items()))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class UnigramCounts:
    """``counts[v]``: how often token ``v`` occurs in ``corpus_id`` tokenised document by document."""

    counts: np.ndarray
    corpus_id: str
    tokenizer_key: str

    def __repr__(self) -> str:
        from factlab.mechanisms._common import short_repr

        return short_repr(self, corpus_id=self.corpus_id, vocab=int(self.counts.size), total=self.total)

    @property
    def total(self) -> int:
        return int(self.counts.sum())

    def log_freq(self) -> np.ndarray:
        """``log((count + 1) / (total + V))`` (add-one smoothed) per token, ``(V,)``."""
        return np.log((self.counts + 1.0) / (self.total + self.counts.size))

    def to_dict(self) -> dict[str, object]:
        return {"corpus_id": self.corpus_id, "tokenizer_key": self.tokenizer_key, "total": self.total, "vocab": int(self.counts.size)}


def unigram_counts(lm: LoadedModel, corpus: str = "wikitext-2", *, split: str = "both", cache: str | os.PathLike[str] | None = None) -> UnigramCounts:
    """Count tokens of ``corpus`` (loaded with :func:`factlab.data.load_text_corpus`) with the model's
    tokenizer, no special tokens added; cached as ``.npy`` under ``cache`` (default: factlab's cache)."""
    from factlab.data import load_text_corpus

    corp = load_text_corpus(corpus, split)
    V = int(lm.adapter.unembed_weight(lm.model).shape[0])
    key = _tokenizer_key(lm.tokenizer)
    safe = "".join(ch if ch.isalnum() or ch in "-_.@" else "_" for ch in corp.id)
    root = Path(cache) if cache is not None else cache_dir() / "unigram"
    path = root / f"{safe}-{key}-V{V}.npy"
    if path.exists():
        return UnigramCounts(np.load(path), corp.id, key)
    counts = np.zeros(V, dtype=np.int64)
    docs = [d for d in corp.documents() if d.strip()]
    for i in range(0, len(docs), 64):
        enc = lm.tokenizer(docs[i : i + 64], add_special_tokens=False)["input_ids"]
        for ids in enc:
            a = np.asarray(ids, dtype=np.int64)
            a = a[a < V]
            counts += np.bincount(a, minlength=V)
    root.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp.npy")
    np.save(tmp, counts)
    os.replace(tmp, path)
    return UnigramCounts(counts, corp.id, key)


@dataclass(frozen=True)
class FrequencyCorrelation:
    """Correlation over the vocabulary between a direction's lens logits and log unigram frequency."""

    name: str
    pearson: float
    spearman: float
    n_tokens: int

    def to_dict(self) -> dict[str, object]:
        return {"name": self.name, "pearson": self.pearson, "spearman": self.spearman, "n_tokens": self.n_tokens}


def vocab_logits(lm: LoadedModel, vectors: torch.Tensor) -> torch.Tensor:
    """``(..., V)`` float64 lens logits of residual-space ``vectors`` ``(..., d)`` through the final norm's
    gain (scale left out: a positive factor) and the unembedding, without the unembedding bias."""
    from factlab.mechanisms._common import freeze_norm, unembed

    W, _ = unembed(lm)
    d = vectors.shape[-1]
    fz = freeze_norm(lm.adapter.final_norm(lm.model), torch.ones(1, d, dtype=lm.dtype, device=lm.device), check=False)
    return fz.direction(vectors.double().to(W.device)) @ W.T


def frequency_correlation(lm: LoadedModel, name: str, vector: torch.Tensor, counts: UnigramCounts, *, min_count: int = 1) -> FrequencyCorrelation:
    """Pearson and Spearman correlation of ``vector``'s lens logits with log frequency, over the tokens
    seen at least ``min_count`` times in the corpus."""
    from scipy import stats

    logits = vocab_logits(lm, vector.reshape(1, -1))[0].cpu().numpy()
    keep = counts.counts >= min_count
    lf = counts.log_freq()[keep]
    lg = logits[keep]
    return FrequencyCorrelation(name, float(stats.pearsonr(lg, lf)[0]), float(stats.spearmanr(lg, lf)[0]), int(keep.sum()))


def frequency_direction(lm: LoadedModel, counts: UnigramCounts, *, min_count: int = 1) -> torch.Tensor:
    """``(d,)`` float64 unit residual-space direction whose lens logits best fit (least squares) the
    centred log frequency over tokens seen at least ``min_count`` times."""
    from factlab.mechanisms._common import freeze_norm, unembed

    W, _ = unembed(lm)
    d = W.shape[1]
    fz = freeze_norm(lm.adapter.final_norm(lm.model), torch.ones(1, d, dtype=lm.dtype, device=lm.device), check=False)
    keep = torch.as_tensor(counts.counts >= min_count, device=W.device)
    A = (W * fz.weight.to(W.device))[keep]  # (V', d) lens logit of u is A @ u (up to the frozen scale)
    y = torch.as_tensor(counts.log_freq(), dtype=torch.float64, device=W.device)[keep]
    A = A - A.mean(0)
    y = y - y.mean()
    u = torch.linalg.lstsq(A, y[:, None]).solution[:, 0]
    return u / u.norm()
