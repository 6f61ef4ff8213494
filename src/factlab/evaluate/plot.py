"""Plots that compare editors the way the ROME/MEMIT/EMMET papers do: metric vs batch size, and
metric vs number of sequential edits, one line per method (PNG, matplotlib Agg)."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Sequence

import numpy as np

from factlab.errors import InputError
from factlab.evaluate.harness import read_records
from factlab.evaluate.metrics import METRICS
from factlab.evaluate.summary import Summary


def _figure(n: int):
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, n, figsize=(4.2 * n, 3.6), squeeze=False)
    return plt, fig, axes[0]


def plot_batch_sizes(run_dirs: Sequence[str | Path], metrics: Sequence[str], out: str | Path, phase: str = "post") -> Path:
    """One panel per metric: mean and 95% CI vs batch size (log x), one line per method.

    Runs with ``method="none"`` are drawn as a horizontal dashed reference line.
    """
    runs = [Summary.load(d) for d in run_dirs]
    plt, fig, axes = _figure(len(metrics))
    for ax, name in zip(axes, metrics):
        by_method: dict[str, list[tuple[int, float, float, float]]] = defaultdict(list)
        for s in runs:
            e = s.get(name, phase)
            if e is None:
                continue
            by_method[s.method].append((int(s.config["batch_size"]), e.mean, e.low, e.high))
        for method, pts in sorted(by_method.items()):
            pts.sort()
            if method == "none":
                ax.axhline(pts[0][1], ls="--", color="grey", label="unedited")
                continue
            xs, ys, lo, hi = map(np.array, zip(*pts))
            ax.errorbar(xs, ys, yerr=[ys - lo, hi - ys], marker="o", capsize=3, label=method.upper())
        m = METRICS.get(name)
        ax.set_xscale("log")
        ax.set_xlabel("batch size (edits per solve)")
        ax.set_title(f"{m.abbrev if m else name} ({name})", fontsize=9)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(f"{phase}-edit value (x100)")
    axes[-1].legend(fontsize=8)
    n = {s.n_cases for s in runs}
    models = {s.model.get("name") for s in runs}
    fig.suptitle(f"{', '.join(sorted(str(x) for x in models))}: metric vs batch size (n cases: {', '.join(map(str, sorted(n)))})", fontsize=10)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def plot_sequential(run_dirs: Sequence[str | Path], metrics: Sequence[str], out: str | Path) -> Path:
    """One panel per metric: each batch's post-edit mean vs the number of edits applied so far
    (sequential runs; the batch is scored right after its edit, with all earlier edits in place)."""
    plt, fig, axes = _figure(len(metrics))
    for d in run_dirs:
        s = Summary.load(d)
        if not s.config.get("sequential"):
            raise InputError(f"{d} is not a sequential run; plot it with --x batch-size")
        recs = sorted(read_records(Path(d)).values(), key=lambda r: r["case_id"])
        for ax, name in zip(axes, metrics):
            by_batch: dict[int, list[float]] = defaultdict(list)
            for r in recs:
                if r["post"].get(name) is not None:  # null: the case has no value for it (e.g. no paraphrase prompts)
                    by_batch[r["edits_applied"]].append(r["post"][name])
            xs = sorted(by_batch)
            scale = METRICS[name].scale if name in METRICS else 1.0
            ax.plot(xs, [np.mean(by_batch[x]) * scale for x in xs], marker=".", label=f"{s.method.upper()} b={s.config['batch_size']}")
    for ax, name in zip(axes, metrics):
        m = METRICS.get(name)
        ax.set_xlabel("edits applied so far")
        ax.set_title(f"{m.abbrev if m else name} ({name})", fontsize=9)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("post-edit value of the latest batch (x100)")
    axes[-1].legend(fontsize=8)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out
