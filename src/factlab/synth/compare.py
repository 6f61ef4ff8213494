"""``compare``: the same facts located and edited in the matched GPT-2 and Mamba of a synthetic build.

For each architecture of a build (see :func:`factlab.synth.build`) this runs, on facts every model
knows: the dataset-averaged causal trace of every kind the architecture has (ROME's AIE by token
class), and single ROME edits of CounterFact-style records with statistics over the world's own
corpus. It writes one side-by-side figure of the per-layer effects at the last subject token and at
the last token (on relative depth, since the models differ in depth), a JSON report and a table.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from factlab.confidence import bounded_mean_ci
from factlab.data import load_counterfact, load_known
from factlab.io import write_json


@dataclass
class ArchComparison:
    """One architecture's trace peaks and edit scores."""

    arch: str
    n_layers: int
    n_traced: int
    trace_peaks: dict[str, dict[str, Any]]
    #: kind -> {"last subject token": [per-layer AIE], "last token": [...]}
    profiles: dict[str, dict[str, list[float]]]
    n_edits: int
    efficacy: dict[str, float]
    paraphrase: dict[str, float]
    neighborhood: dict[str, float]
    edit_layer: int | None


@dataclass
class Comparison:
    """The side-by-side result of :func:`compare`."""

    build: str
    archs: dict[str, ArchComparison] = field(default_factory=dict)
    figure: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def rows(self) -> list[dict[str, Any]]:
        """One table row per (architecture, kind): peak class, layer (and relative depth), AIE."""
        out = []
        for a in self.archs.values():
            for kind, pk in a.trace_peaks.items():
                out.append(
                    {
                        "arch": a.arch,
                        "kind": kind,
                        "peak class": pk["class"],
                        "peak layer": pk["layer"],
                        "relative depth": round(pk["layer"] / max(a.n_layers - 1, 1), 2),
                        "peak AIE": round(pk["aie"], 3),
                    }
                )
        return out


def _first_token_margin(lm, prompts: list[str], new: str, true: str) -> list[bool]:
    """Per prompt: is P(first token of new) > P(first token of true) after the prompt?"""
    from factlab.prompts import continuation_ids

    probs = lm.next_token_probs(prompts)
    res = []
    for p, row in zip(prompts, probs):
        n = continuation_ids(lm.tokenizer, p, new)[0]
        t = continuation_ids(lm.tokenizer, p, true)[0]
        res.append(bool(row[n] > row[t]))
    return res


def compare(
    build_dir: str | Path,
    out_dir: str | Path | None = None,
    *,
    trace_limit: int = 40,
    samples: int = 3,
    window: int = 3,
    edits: int = 10,
    seed: int = 0,
) -> Comparison:
    """Trace and edit the same known facts in every model of a synthetic build.

    Args:
        trace_limit: facts known to every model to trace per architecture.
        samples, window: causal-trace noise samples and window of the windowed kinds.
        edits: CounterFact-style records to edit with ROME (one at a time, each restored).
    Returns:
        :class:`Comparison`; with ``out_dir`` also ``compare.json``, ``compare.png`` and the per-arch traces.
    """
    import factlab
    from factlab.edit import Request, edit
    from factlab.locate import trace_dataset
    from factlab.locate.corrupt import embedding_std
    from factlab.locate.dataset import default_kinds

    from factlab.synth import load_build

    build_dir = Path(build_dir)
    _, report = load_build(build_dir)
    out = Path(out_dir) if out_dir is not None else build_dir / "compare"
    shared = set(report.known_by_all())
    facts = [r for r in load_known(build_dir / "datasets" / "known.json") if r.known_id in shared][:trace_limit]
    records = load_counterfact(build_dir / "datasets" / "counterfact.json")[:edits]
    corpus = build_dir / "datasets" / "corpus.txt"
    hp = {"stats_corpus": str(corpus), "stats_samples": 400, "stats_max_length": 64}
    result = Comparison(build=str(build_dir))
    for arch in report.archs:
        lm = factlab.load(report.model_dir(arch), device="cpu")
        kinds = default_kinds(lm) if arch != "mamba" else list(lm.adapter.trace_kinds)
        torch.manual_seed(seed)
        # ROME's noise rule (3 x the std of subject embeddings) over this world's own subjects
        noise = 3 * embedding_std(lm, sorted({f.subject for f in facts}), cache=False)
        dt = trace_dataset(
            lm, facts, kinds=kinds, out_dir=out / arch / "trace", samples=samples, noise=noise, window=window, seed=seed
        )
        peaks = {k: dt.peak(k) for k in dt.kinds}
        profiles = {
            k: {c: list(map(float, np.asarray(v["aie"], dtype=float)[dt.classes.index(c)])) for c in ("last subject token", "last token") if c in dt.classes}
            for k, v in dt.kinds.items()
        }
        eff, para, neigh, layer = [], [], [], None
        for rec in records:
            req = Request.from_dict(rec.requested_rewrite())
            new, true = req.target_new, req.target_true or (" " + rec.target_true)
            res = edit(lm, req, method="rome", hparams=hp, on_known="edit")
            try:
                layer = res.metadata.get("layers", [None])[0]
                eff.append(np.mean(_first_token_margin(lm, [rec.prompt.format(rec.subject)], new, true)))
                if rec.paraphrase_prompts:
                    para.append(np.mean(_first_token_margin(lm, rec.paraphrase_prompts, new, true)))
                if rec.neighborhood_prompts:
                    neigh.append(1 - np.mean(_first_token_margin(lm, rec.neighborhood_prompts, new, true)))
            finally:
                res.restore()
        result.archs[arch] = ArchComparison(
            arch=arch,
            n_layers=lm.adapter.n_layers,
            n_traced=dt.n_kept,
            trace_peaks=peaks,
            profiles=profiles,
            n_edits=len(eff),
            efficacy=bounded_mean_ci(eff, 0.0, 1.0).to_dict(),
            paraphrase=bounded_mean_ci(para, 0.0, 1.0).to_dict(),
            neighborhood=bounded_mean_ci(neigh, 0.0, 1.0).to_dict(),
            edit_layer=layer,
        )
    out.mkdir(parents=True, exist_ok=True)
    result.figure = str(plot_comparison(result, out / "compare.png"))
    write_json(out / "compare.json", result.to_dict())
    return result


def plot_comparison(result: Comparison, path: str | Path) -> Path:
    """Per architecture, AIE per kind against relative depth at the last subject token and the last token."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    archs = list(result.archs.values())
    fig, axes = plt.subplots(2, len(archs), figsize=(5.5 * len(archs), 7), squeeze=False, sharey="row")
    for j, a in enumerate(archs):
        for i, cls in enumerate(("last subject token", "last token")):
            ax = axes[i][j]
            for kind, prof in a.profiles.items():
                y = prof.get(cls)
                if y is None:
                    continue
                x = np.linspace(0, 1, len(y))
                ax.plot(x, y, marker="o", ms=3, label=kind)
            ax.set_title(f"{a.arch}: {cls} ({a.n_traced} facts)")
            ax.set_xlabel("relative depth (layer / (L-1))")
            ax.set_ylabel("AIE")
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)
