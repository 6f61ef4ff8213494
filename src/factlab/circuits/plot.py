"""Pictures for circuits (matplotlib, Agg backend): training curves, overlap heat map, make-up bars,
density sweep, edit comparison with 95% CIs. Every function writes a PNG and returns its path."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str | Path) -> Path:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(p, dpi=120)
    _plt().close(fig)
    return p


def plot_training(history: Sequence[dict], path: str | Path, title: str = "") -> Path:
    plt = _plt()
    fig, ax = plt.subplots(1, 2, figsize=(9, 3.4))
    steps = [h["step"] for h in history]
    ax[0].plot(steps, [h["density"] for h in history])
    ax[0].set_yscale("log")
    ax[0].set_xlabel("step")
    ax[0].set_ylabel("density (logit > 0)")
    ax[1].plot(steps, [h["faithfulness"] for h in history], label="faithfulness CE")
    ax[1].set_xlabel("step")
    ax2 = ax[1].twinx()
    ax2.plot(steps, [h["lambda"] for h in history], color="grey", ls="--", label="λ")
    ax[1].legend(loc="upper left")
    fig.suptitle(title)
    return _save(fig, path)


def plot_overlap(matrix, path: str | Path, kind: str = "all") -> Path:
    plt = _plt()
    n = len(matrix.names)
    fig, axes = plt.subplots(1, 2, figsize=(4 + 1.2 * n, 2 + 0.6 * n))
    for ax, (label, data) in zip(axes, (("Jaccard", matrix.jaccard[kind]), ("overlap coefficient", matrix.coefficient[kind]))):
        im = ax.imshow(data, vmin=0, vmax=1, cmap="viridis")
        ax.set_xticks(range(n), matrix.names, rotation=45, ha="right", fontsize=8)
        ax.set_yticks(range(n), matrix.names, fontsize=8)
        for i in range(n):
            for j in range(n):
                ax.text(j, i, f"{data[i][j]:.2f}", ha="center", va="center", color="w", fontsize=7)
        ax.set_title(f"{label} ({kind})")
        fig.colorbar(im, ax=ax, fraction=0.046)
    return _save(fig, path)


def plot_makeup(makeups: Sequence, path: str | Path) -> Path:
    plt = _plt()
    types = sorted({t for m in makeups for t in m.share_kept})
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    width = 0.8 / max(len(makeups), 1)
    for k, m in enumerate(makeups):
        xs = [i + k * width for i in range(len(types))]
        axes[0].bar(xs, [m.share_of_circuit.get(t, 0) for t in types], width, label=m.name)
        axes[1].bar(xs, [m.share_kept.get(t, 0) for t in types], width, label=m.name)
    for ax, title in zip(axes, ("share of circuit weights by type", "share of each type's weights kept")):
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(types))], types)
        ax.set_title(title)
    axes[1].set_yscale("log")
    axes[0].legend(fontsize=7)
    return _save(fig, path)


def plot_sweep(report, path: str | Path) -> Path:
    plt = _plt()
    rows = sorted(report.rows, key=lambda r: r["density"])
    d = [r["density"] for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    colour = {"full": "0.5", "circuit": "C0", "complement": "C1", "random": "C2"}  # the same colour in both panels
    for key in ("full", "circuit", "complement"):
        axes[0].plot(d, [r["accuracies"][key] for r in rows], marker="o", label=key, color=colour[key])
    axes[0].set_xscale("log")
    axes[0].set_xlabel("circuit density")
    axes[0].set_ylabel("task accuracy")
    axes[0].legend()
    for where in ("circuit", "complement", "random"):
        vals = [r.get("edit", {}).get(where) for r in rows]
        if any(v is not None for v in vals):
            pts = [(x, v) for x, v in zip(d, vals) if v is not None]
            axes[1].errorbar([p[0] for p in pts], [p[1]["mean"] for p in pts],
                             yerr=[[p[1]["mean"] - p[1]["low"] for p in pts], [p[1]["high"] - p[1]["mean"] for p in pts]],
                             marker="o", capsize=3, label=where, color=colour[where])
    axes[1].set_xscale("log")
    for ax in axes:  # label the measured densities themselves (log minor ticks overlap)
        ax.set_xticks(d, [f"{x:.3g}" for x in d])
        ax.minorticks_off()
    axes[1].set_xlabel("circuit density")
    axes[1].set_ylabel("Δ NLL(new target) after edit")
    if axes[1].get_legend_handles_labels()[0]:
        axes[1].legend()
    fig.suptitle(report.task)
    return _save(fig, path)


def plot_edit_comparison(summary: dict, path: str | Path, metric: str = "nll_new") -> Path:
    plt = _plt()
    modes = list(summary)
    fig, axes = plt.subplots(1, max(len(modes), 1), figsize=(4.5 * max(len(modes), 1), 3.4), squeeze=False)
    for ax, mode in zip(axes[0], modes):
        wheres = list(summary[mode])
        est = [summary[mode][w][metric]["delta"] for w in wheres]
        ax.bar(range(len(wheres)), [e["mean"] for e in est],
               yerr=[[e["mean"] - e["low"] for e in est], [e["high"] - e["mean"] for e in est]], capsize=4)
        ax.set_xticks(range(len(wheres)), wheres)
        ax.set_title(f"{mode}: Δ {metric} (95% CI)")
        ax.axhline(0, color="k", lw=0.5)
    return _save(fig, path)
