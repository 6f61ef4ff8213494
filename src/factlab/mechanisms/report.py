"""The dataset-level run behind ``factlab mechanisms dataset``: collect, summarise, ablate, plot."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from factlab.confidence import mean_ci
from factlab.mechanisms.dataset import collect, load_cases
from factlab.mechanisms.lens import DatasetLens
from factlab.models.loading import LoadedModel


def dataset_report(
    lm: LoadedModel,
    name: str,
    *,
    limit: int | None = None,
    ablate_limit: int = 200,
    batch_size: int = 16,
    out: str | Path | None = None,
    n_argument_heads: int = 3,
) -> dict[str, object]:
    """Run every dataset-level measurement on the facts ``name`` and return a JSON-ready dict; with
    ``out`` also write ``fact_stats.npz/json``, ``summary.json`` and PNGs there."""
    from factlab.mechanisms.frequency import unigram_counts
    from factlab.mechanisms.overconfidence import overconfidence, suppression_on

    cases = load_cases(name, limit)
    stats = collect(lm, cases, batch_size=batch_size)
    outdir = Path(out) if out is not None else None
    if outdir is not None:
        stats.save(outdir)
    lens = DatasetLens(stats.layers, stats.lens_prob, stats.lens_rank, lm.name)
    counts = unigram_counts(lm)
    oc = overconfidence(lm, stats, counts)
    rep: dict[str, object] = {
        "model": lm.name,
        "dataset": name,
        "n": stats.n,
        "skipped": len(stats.skipped),
        "answers_truncated_to_first_token": int(stats.truncated.sum()),
        "decomposition_max_error": stats.max_sum_error,
        "top1_accuracy": mean_ci(stats.top1.astype(float)).to_dict(),
        "lens": lens.to_dict(),
        "overconfidence": oc.to_dict(),
        # the same over the facts the model knows (top-1 = the answer's first token), as the paper's setting
        "overconfidence_known": suppression_on(lm, stats, stats.top1.astype(bool)),
        "unigram": counts.to_dict(),
    }
    if lm.adapter.has_attention:
        from factlab.mechanisms.heads import ablate_heads, argument_heads

        ah = argument_heads(stats)
        rep["argument_heads"] = [h.to_dict() for h in ah]
        chosen = [(h.layer, h.head) for h in ah if h.passes][:n_argument_heads] or [(h.layer, h.head) for h in ah[:n_argument_heads]]
        abl_cases = stats.cases[:ablate_limit]
        rep["ablation"] = {m: ablate_heads(lm, abl_cases, chosen, mode=m, batch_size=batch_size).to_dict() for m in ("mean", "zero")}
        try:
            from factlab.mechanisms.mlp_decomposition import mlp_decomposition_summary

            rep["mlp_decomposition"] = mlp_decomposition_summary(lm, abl_cases[:64], chosen, batch_size=batch_size)
        except ImportError:
            pass
    else:
        rep["argument_heads"] = None
        rep["no_analogue"] = "Mamba has no attention heads: argument passing by heads, head ablation and head attention maps do not apply; the lens and per-layer mixer contributions do"
    if outdir is not None:
        (outdir / "summary.json").write_text(json.dumps(rep, indent=2, ensure_ascii=False))
        lens.plot(outdir / "lens.png")
        oc.plot(outdir / "overconfidence.png")
    return rep
