"""The runs behind ``factlab mechanisms``: one prompt (lens, direct contributions, one head's attention) and a
dataset (collect, summarise, ablate, plot). Both check every option before any forward pass and write their
files together or not at all."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from factlab.confidence import proportion_ci
from factlab.io import write_json
from factlab.mechanisms._common import MechanismError, answer_token, check_head, check_out_dir, parse_head, short_repr, staged_dir, token_id_of
from factlab.mechanisms.contributions import DirectContributions
from factlab.mechanisms.dataset import collect, load_cases
from factlab.mechanisms.lens import DatasetLens, LensResult
from factlab.models.loading import LoadedModel


# --------------------------------------------------------------------------- one prompt
@dataclass
class PromptMechanisms:
    """The logit lens and direct contributions of one prompt, and (models with heads) one head's attention
    ``attention`` ``(T, T)`` over ``tokens``: the head asked for, else the one with the largest |contribution|."""

    lens: LensResult
    contributions: DirectContributions
    head: tuple[int, int] | None = None
    attention: np.ndarray | None = None
    tokens: list[str] | None = None

    def to_dict(self) -> dict[str, object]:
        d: dict[str, object] = {"lens": self.lens.to_dict(), "contributions": self.contributions.to_dict()}
        if self.head is not None:
            d["attention_head"] = list(self.head)
        return d

    def save(self, out: str | Path) -> list[Path]:
        """Write ``lens.png``, ``contributions.png``, ``attention.png`` (with a head) and ``mechanisms.json`` into
        ``out``: all of them or, when anything fails, none (``out`` is left as it was)."""
        from factlab.mechanisms.plot import plot_attention

        with staged_dir(out) as tmp:
            self.lens.plot(tmp / "lens.png")
            self.contributions.plot(tmp / "contributions.png")
            if self.head is not None and self.attention is not None:
                l, h = self.head
                plot_attention(tmp / "attention.png", self.attention, self.tokens or [], title=f"layer {l} head {h}")
            write_json(tmp / "mechanisms.json", self.to_dict())
            names = sorted(p.name for p in tmp.iterdir())
        return [Path(out) / n for n in names]

    def __repr__(self) -> str:
        dc = self.contributions
        return short_repr(self, prompt=dc.prompt, answer=dc.answer.token, logit=dc.logit_actual, parts=dc.parts,
                          peak_layer=self.lens.peak_layer, head=self.head)


def _head_pattern(lm: LoadedModel, prompt: str, layer: int, head: int) -> tuple[np.ndarray, list[str]]:
    """``(attention (T, T), tokens)`` of one head on ``prompt``."""
    from factlab.interventions import attention

    batch = lm.encode([prompt])
    with torch.no_grad(), attention(lm, layers=[layer], record=True) as rec:
        lm.forward(batch)
    toks = [lm.tokenizer.decode([t]) for t in batch.input_ids[0].tolist()]
    return rec.patterns[layer][0, head].float().cpu().numpy(), toks


def prompt_mechanisms(
    lm: LoadedModel,
    prompt: str,
    *,
    answer: str | None = None,
    contrast: str | None = None,
    exact: bool = False,
    head: str | tuple[int, int] | None = None,
    attention: bool = False,
    out: str | Path | None = None,
) -> PromptMechanisms:
    """Logit lens and direct contributions of ``answer`` (default: the model's top token) at the last token of
    ``prompt``; with ``attention`` (or ``head``, ``"LAYER.HEAD"`` or ``(layer, head)``) also one head's attention
    map. With ``out`` every file is written there (:meth:`PromptMechanisms.save`).

    Every option (prompt, answer, contrast, head, out) is checked before the first forward pass.
    """
    from factlab.mechanisms.contributions import direct_contributions
    from factlab.mechanisms.lens import logit_lens

    if not prompt or not prompt.strip():
        raise MechanismError(f"the prompt is empty ({prompt!r}); give the text whose next token to explain")
    check_out_dir(out)
    lh = parse_head(head) if isinstance(head, str) else head
    if lh is not None:
        check_head(lm, *lh)
    if answer is not None:
        answer_token(lm, prompt, answer, exact=exact)
    if contrast is not None:
        token_id_of(lm, prompt, contrast)
    if answer is None:
        answer = lm.predict([prompt], top_k=1)[0][0].token
    lens = logit_lens(lm, prompt, answer, exact=exact)
    dc = direct_contributions(lm, prompt, answer, contrast=contrast, exact=exact)
    res = PromptMechanisms(lens, dc)
    if lm.adapter.has_attention and (attention or lh is not None or out is not None):
        if lh is None:
            best = max((p for p in dc.parts if p.kind == "head"), key=lambda p: abs(p.logit))
            lh = (best.layer, best.head)
        res.head = lh
        res.attention, res.tokens = _head_pattern(lm, prompt, *lh)
    if out is not None:
        res.save(out)
    return res


# --------------------------------------------------------------------------- a dataset


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
    ``out`` also write ``fact_stats.npz/json``, ``summary.json`` and PNGs there (all together, once every
    measurement is done: a failed run leaves ``out`` as it was)."""
    from factlab.mechanisms.frequency import unigram_counts
    from factlab.mechanisms.overconfidence import overconfidence, suppression_on

    outdir = check_out_dir(out)
    cases = load_cases(name, limit)
    stats = collect(lm, cases, batch_size=batch_size)
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
        "top1_accuracy": proportion_ci(stats.top1.astype(float)).to_dict(),
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
        with staged_dir(outdir) as tmp:
            stats.save(tmp)
            write_json(tmp / "summary.json", rep)
            lens.plot(tmp / "lens.png")
            oc.plot(tmp / "overconfidence.png")
    return rep
