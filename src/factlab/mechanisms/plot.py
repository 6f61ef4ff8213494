"""Pictures of the mechanism measurements (matplotlib, Agg backend, written to PNG files)."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path, dpi: int = 120) -> Path:
    """Write ``fig`` to ``path`` atomically (format from the suffix, PNG by default) and close it."""
    from factlab.io import atomic_path

    path = Path(path)
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=dpi, format=path.suffix.lstrip(".").lower() or "png")
    finally:
        import matplotlib.pyplot as plt

        plt.close(fig)
    return path


def plot_lens(path, layers: Sequence[str], series: dict[str, Sequence[float]], *, title: str = "", ranks=None, bands=None) -> Path:
    """Curves over layers (``series``), optional CI ``bands`` and a rank curve on a second axis."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8, 4))
    x = np.arange(len(layers))
    for name, ys in series.items():
        ax.plot(x, ys, marker="o", ms=3, label=name)
        if bands and name in bands:
            lo, hi = bands[name]
            ax.fill_between(x, lo, hi, alpha=0.2)
    ax.set_xticks(x[:: max(1, len(x) // 16)])
    ax.set_xticklabels([layers[i] for i in range(0, len(layers), max(1, len(x) // 16))])
    ax.set_xlabel("layer (output of block)")
    ax.set_ylabel("probability")
    if ranks is not None:
        ax2 = ax.twinx()
        ax2.plot(x, np.log10(np.asarray(ranks) + 1), color="gray", ls="--", label="log10(rank+1)")
        ax2.set_ylabel("log10(rank + 1)")
    ax.legend(loc="upper left")
    ax.set_title(title[:100])
    fig.tight_layout()
    return _save(fig, path)


def plot_contributions(path, result, k: int = 25) -> Path:
    """Bar chart of the ``k`` largest direct contributions to the answer's logit."""
    plt = _plt()
    top = sorted(result.parts, key=lambda p: -abs(p.logit))[:k]
    fig, ax = plt.subplots(figsize=(8, max(3, 0.25 * len(top))))
    ax.barh([p.name for p in top][::-1], [p.logit for p in top][::-1], color=["tab:red" if p.logit < 0 else "tab:blue" for p in top][::-1])
    ax.set_xlabel(f"direct contribution to logit of {result.answer.token!r}")
    ax.set_title(f"{result.prompt!r}"[:90])
    fig.tight_layout()
    return _save(fig, path)


def plot_attention(path, pattern: np.ndarray, tokens: Sequence[str], *, title: str = "") -> Path:
    """Heatmap of one head's attention ``(T, T)`` with token labels."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 5))
    ax.imshow(pattern, cmap="viridis", vmin=0, vmax=1)
    ax.set_xticks(range(len(tokens)))
    ax.set_xticklabels(tokens, rotation=90, fontsize=7)
    ax.set_yticks(range(len(tokens)))
    ax.set_yticklabels(tokens, fontsize=7)
    ax.set_title(title)
    fig.tight_layout()
    return _save(fig, path)


def plot_overconfidence(path, report) -> Path:
    """Per last-layer head: centred direct contribution vs attention to the first token; plus MLP."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    for h in report.heads:
        ax.errorbar(h.attn_first.mean, h.dla_centered.mean, yerr=h.dla_centered.half_width, fmt="o")
        ax.annotate(f"H{h.head}", (h.attn_first.mean, h.dla_centered.mean), fontsize=8)
    ax.axhline(report.mlp_dla.mean, color="tab:red", ls="--", label=f"final MLP: {report.mlp_dla.mean:.2f}")
    ax.axhline(0, color="gray", lw=0.5)
    ax.set_xlabel("mean attention from last token to first token")
    ax.set_ylabel("centred DLA to answer logit")
    ax.set_title(f"final layer, {report.n} facts")
    ax.legend()
    fig.tight_layout()
    return _save(fig, path)


def plot_mitigation(path, report) -> Path:
    """Selection accuracy of every candidate."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4))
    names = [r["name"] for r in report.selection]
    ax.barh(names, [r["accuracy"] for r in report.selection])
    ax.set_xlabel("selection top-1 accuracy")
    ax.set_title(f"chosen: {report.chosen.name}")
    fig.tight_layout()
    return _save(fig, path)
