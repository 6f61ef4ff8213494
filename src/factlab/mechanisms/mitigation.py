"""Mitigating the final-layer suppression, applied like an edit, and measured on held-out facts.

A candidate removes (a fraction ``strength`` of) one direction from what the last block writes: the
output projection of its attention (``o_proj``-like) and/or of its MLP (``down_proj``-like) becomes
``(I - strength * v v^T / |v|^2) W`` (its bias likewise). The direction is either

* ``frequency``: the residual-space direction whose logit-lens logits best fit log unigram frequency
  (WikiText-2 counted with the model's tokenizer), see :func:`~factlab.mechanisms.frequency.frequency_direction`; or
* ``intercept``: the mean output of that projection at the last token over the *selection* facts
  (the prompt-independent part the paper ties to frequency).

For Gemma 3 the projections feed a post-norm ``w * y / s``; removing ``v = w * u`` from ``y`` makes the
normed output orthogonal to ``u`` exactly (the scale ``s`` is a positive number).

Candidates are scored on the selection facts; the best one (highest top-1 accuracy there) is then
measured on the held-out facts and on WikiText-2 perplexity. Because only the last block changes, every
evaluation reuses the captured input of the last block and runs that block alone (exact:
:func:`factlab.interventions.resume_from`). The result is an :class:`factlab.edit.EditResult`: ``apply``,
``restore`` (bit for bit), ``save``.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch

from factlab.confidence import Estimate, bounded_mean_ci, mean_ci, proportion_ci
from factlab.interventions import capture, resume_from, run_and_capture
from factlab.mechanisms._common import MechanismError, answer_token, freeze_norm, short_repr
from factlab.mechanisms.dataset import FactCase, split_cases
from factlab.models.loading import LoadedModel
from factlab.progress import progress
from factlab.prompts import Batch, pad, special_prefix


@dataclass(frozen=True)
class Candidate:
    """One mitigation: remove ``strength`` of ``direction`` from the last block's ``target`` outputs, or,
    with ``direction="head"``, scale the last layer's attention head ``head`` by ``1 - strength`` (the
    paper's "scale down / remove the final-layer component")."""

    direction: str  # "frequency" | "intercept" | "head"
    target: str  # "attn" | "mlp" | "both"
    strength: float
    head: int | None = None

    @property
    def name(self) -> str:
        if self.direction == "head":
            return f"head{self.head}:{self.target}:{self.strength:g}"
        return f"{self.direction}:{self.target}:{self.strength:g}"

    def to_dict(self) -> dict[str, object]:
        d: dict[str, object] = {"direction": self.direction, "target": self.target, "strength": self.strength, "name": self.name}
        if self.head is not None:
            d["head"] = self.head
        return d


DEFAULT_CANDIDATES = tuple(
    Candidate(d, t, s) for d in ("frequency", "intercept") for t in ("attn", "mlp") for s in (0.5, 1.0)
)


def head_candidates(lm: LoadedModel, strengths: Sequence[float] = (0.5, 1.0)) -> tuple[Candidate, ...]:
    """One candidate per last-layer attention head and strength (none for a model without heads)."""
    if not lm.adapter.has_attention or not lm.adapter.n_heads:
        return ()
    return tuple(Candidate("head", "attn", s, h) for h in range(lm.adapter.n_heads) for s in strengths)


def _param_name(lm: LoadedModel, p: torch.nn.Parameter) -> str:
    for n, q in lm.model.named_parameters():
        if q is p:
            return n
    raise MechanismError("could not find a projection's parameter among the model's parameters")


def _targets(target: str) -> list[str]:
    if target == "both":
        return ["attn", "mlp"]
    if target not in ("attn", "mlp"):
        raise MechanismError(f"mitigation target must be attn, mlp or both, not {target!r}")
    return [target]


def projection_weights(lm: LoadedModel, directions: dict[str, torch.Tensor], target: str, strength: float) -> dict[str, torch.Tensor]:
    """New values of the last block's output projections (``target``) with ``strength`` of
    ``directions[name]`` (``(d,)``, in the projection's output space) removed: ``{param_name: tensor}``."""
    if not lm.adapter.has_attention:
        raise MechanismError("the mitigation rewrites the last block's attention/MLP output projections; Mamba has neither")
    if not 0 < strength <= 1:
        raise MechanismError("strength must be in (0, 1]")
    L = lm.adapter.n_layers
    out: dict[str, torch.Tensor] = {}
    for t in _targets(target):
        proj = lm.adapter.projection(L - 1, t)
        v = directions[t].double()
        v = v / v.norm()
        P = strength * torch.outer(v, v)
        W = proj.weight(lm.model).detach().double()  # (d_out, d_in)
        newW = W - P.to(W.device) @ W
        p = proj.parameter(lm.model)
        out[_param_name(lm, p)] = (p.detach().double() + proj.delta_to_parameter(lm.model, newW - W).double()).to(p.dtype)
        b = proj.bias(lm.model)
        if b is not None:
            bb = b.detach().double()
            out[_param_name(lm, b)] = (bb - P.to(bb.device) @ bb).to(b.dtype)
    return out


def head_weights(lm: LoadedModel, head: int, strength: float) -> dict[str, torch.Tensor]:
    """New value of the last block's attention output projection with head ``head``'s input columns
    scaled by ``1 - strength`` (the head's write into the residual stream, before any post-norm)."""
    a = lm.adapter
    if not a.has_attention or not a.n_heads or not a.d_head:
        raise MechanismError("head mitigation needs attention heads; this model has none")
    if not 0 <= head < a.n_heads:
        raise MechanismError(f"head {head} is outside 0..{a.n_heads - 1}")
    if not 0 < strength <= 1:
        raise MechanismError("strength must be in (0, 1]")
    proj = a.projection(a.n_layers - 1, "attn")
    W = proj.weight(lm.model).detach().double()  # (d_out, d_in); d_in = heads * d_head
    newW = W.clone()
    newW[:, head * a.d_head : (head + 1) * a.d_head] *= 1.0 - strength
    p = proj.parameter(lm.model)
    return {_param_name(lm, p): (p.detach().double() + proj.delta_to_parameter(lm.model, newW - W).double()).to(p.dtype)}


def output_space_direction(lm: LoadedModel, u: torch.Tensor, target: str) -> torch.Tensor:
    """A residual-space direction ``u`` expressed in the space of ``target``'s projection output: itself,
    or ``w * u`` when a post-norm with gain ``w`` sits between them (Gemma 3)."""
    L = lm.adapter.n_layers
    getter = getattr(lm.adapter, "post_attention_norm" if target == "attn" else "post_mlp_norm", None)
    norm = getter(lm.model, L - 1) if getter is not None else None
    if norm is None:
        return u.double()
    fz = freeze_norm(norm, torch.ones(1, u.shape[0], dtype=lm.dtype, device=lm.device), check=False)
    return u.double().to(fz.weight.device) * fz.weight


# --------------------------------------------------------------------------- cached last-block inputs
@dataclass
class BlockInputs:
    """Batches with the residual stream entering the last block, ``hidden[k]`` ``(B, T, d)``."""

    batches: list[Batch]
    hidden: list[torch.Tensor]
    answer_ids: list[torch.Tensor] = field(default_factory=list)
    last_attn: list[torch.Tensor] = field(default_factory=list)
    last_mlp: list[torch.Tensor] = field(default_factory=list)


@torch.no_grad()
def block_inputs(lm: LoadedModel, batches: Sequence[Batch], answer_ids: Sequence[torch.Tensor] | None = None, *, outputs: bool = False) -> BlockInputs:
    """Capture the input of the last block for ``batches`` (and, with ``outputs``, the last block's
    attention and MLP module outputs at the last position)."""
    L = lm.adapter.n_layers
    if L < 2:
        raise MechanismError("the mitigation needs at least two layers")
    site = f"layer.{L - 2}.resid"
    out = BlockInputs([], [], list(answer_ids or []))
    for b in progress(batches, desc="last-block inputs"):
        if outputs:
            with capture(lm, [site]) as full, capture(lm, [f"layer.{L - 1}.attn.out", f"layer.{L - 1}.mlp.out"], positions=[-1]) as last:
                lm.forward(b)
            out.last_attn.append(last[f"layer.{L - 1}.attn.out"][:, 0])
            out.last_mlp.append(last[f"layer.{L - 1}.mlp.out"][:, 0])
            h = full[site]
        else:
            h = run_and_capture(lm, b, [site])[site]
        out.batches.append(b)
        out.hidden.append(h)
    return out


@torch.no_grad()
def _final_logits(lm: LoadedModel, b: Batch, h: torch.Tensor) -> torch.Tensor:
    with resume_from(lm, lm.adapter.n_layers - 1, h):
        return lm.forward(b)


@torch.no_grad()
def fact_scores(lm: LoadedModel, inputs: BlockInputs) -> tuple[np.ndarray, np.ndarray]:
    """``(correct (N,), answer prob (N,))`` at the last token, running only the last block."""
    corr, prob = [], []
    for b, h, ids in zip(inputs.batches, inputs.hidden, inputs.answer_ids):
        lg = _final_logits(lm, b, h)[:, -1].float()
        corr.append((lg.argmax(-1).cpu() == ids).numpy().astype(float))
        prob.append(lg.softmax(-1)[torch.arange(len(ids)), ids.to(lg.device)].cpu().numpy())
    return np.concatenate(corr), np.concatenate(prob)


@torch.no_grad()
def window_nll(lm: LoadedModel, inputs: BlockInputs) -> np.ndarray:
    """``(W,)`` mean next-token NLL of each text window, running only the last block."""
    out = []
    for b, h in zip(inputs.batches, inputs.hidden):
        lg = _final_logits(lm, b, h).float()
        nll = torch.nn.functional.cross_entropy(lg[:, :-1].transpose(1, 2), b.input_ids[:, 1:].to(lg.device), reduction="none")
        out.append(nll.mean(-1).cpu().numpy())
    return np.concatenate(out)


def text_windows(lm: LoadedModel, corpus: str = "wikitext-2", *, split: str = "test", n_windows: int = 16, length: int = 128, batch_size: int = 8) -> list[Batch]:
    """The first ``n_windows`` non-overlapping windows of ``length`` tokens of the corpus, batched; each
    starts with the tokenizer's own special prefix (BOS), which is not scored."""
    from factlab.data import load_text_corpus

    bos = special_prefix(lm.tokenizer)  # e.g. Gemma: without its BOS the model is far off its text distribution
    room = length - len(bos)
    ids: list[int] = []
    need = n_windows * room
    for doc in load_text_corpus(corpus, split).documents():
        if doc.strip():
            ids.extend(lm.tokenizer(doc, add_special_tokens=False)["input_ids"])
        if len(ids) >= need:
            break
    if len(ids) < need:
        n_windows = len(ids) // room
    if n_windows == 0:
        raise MechanismError(f"the corpus {corpus!r} has fewer than {room} tokens")
    rows = [bos + ids[i * room : (i + 1) * room] for i in range(n_windows)]
    pid = lm.tokenizer.pad_token_id or 0
    return [pad(rows[i : i + batch_size], pad_id=pid, device=lm.device) for i in range(0, len(rows), batch_size)]


# --------------------------------------------------------------------------- the experiment
@dataclass
class MitigationReport:
    """Selection and held-out measurements of the chosen mitigation (95% CIs, paired where stated)."""

    model: str
    chosen: Candidate
    selection: list[dict[str, object]]
    n_selection: int
    n_heldout: int
    accuracy_before: Estimate
    accuracy_after: Estimate
    accuracy_change: Estimate
    prob_before: Estimate
    prob_after: Estimate
    perplexity_before: float
    perplexity_after: float
    perplexity_before_ci: tuple[float, float]
    perplexity_after_ci: tuple[float, float]
    nll_change: Estimate
    n_text_tokens: int
    eval_set: str
    notes: list[str] = field(default_factory=list)

    def __repr__(self) -> str:
        return short_repr(self, model=self.model, chosen=self.chosen.name, n_heldout=self.n_heldout,
                          accuracy_change=self.accuracy_change.mean, perplexity=(round(self.perplexity_before, 3), round(self.perplexity_after, 3)))

    def to_dict(self) -> dict[str, object]:
        return {
            "model": self.model,
            "eval": self.eval_set,
            "chosen": self.chosen.to_dict(),
            "n_selection": self.n_selection,
            "n_heldout": self.n_heldout,
            "selection": self.selection,
            "accuracy_before": self.accuracy_before.mean,
            "accuracy_after": self.accuracy_after.mean,
            "accuracy_before_ci": [self.accuracy_before.low, self.accuracy_before.high],
            "accuracy_after_ci": [self.accuracy_after.low, self.accuracy_after.high],
            "accuracy_change": self.accuracy_change.to_dict(),
            "answer_prob_before": self.prob_before.to_dict(),
            "answer_prob_after": self.prob_after.to_dict(),
            "perplexity_before": self.perplexity_before,
            "perplexity_after": self.perplexity_after,
            "perplexity_before_ci": list(self.perplexity_before_ci),
            "perplexity_after_ci": list(self.perplexity_after_ci),
            "nll_change_per_token": self.nll_change.to_dict(),
            "n_text_tokens": self.n_text_tokens,
            "notes": self.notes,
        }

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    def plot(self, path) -> None:
        from factlab.mechanisms.plot import plot_mitigation

        plot_mitigation(path, self)


def _batches(lm: LoadedModel, cases: Sequence[FactCase], batch_size: int) -> tuple[list[Batch], list[torch.Tensor]]:
    bs, ids = [], []
    for s in range(0, len(cases), batch_size):
        chunk = cases[s : s + batch_size]
        bs.append(lm.encode([c.prompt for c in chunk]))
        ids.append(torch.tensor([answer_token(lm, c.prompt, c.answer).token_id for c in chunk]))
    return bs, ids


def build_mitigation(lm: LoadedModel, candidate: Candidate, directions: dict[str, dict[str, torch.Tensor]], metadata: dict | None = None):
    """Apply ``candidate`` and return the applied :class:`factlab.edit.EditResult`."""
    from factlab.edit import EditResult

    if candidate.direction == "head":
        new = head_weights(lm, int(candidate.head), candidate.strength)  # type: ignore[arg-type]
    else:
        new = projection_weights(lm, directions[candidate.direction], candidate.target, candidate.strength)
    return EditResult.from_weights(lm, new, method="mitigation", metadata={"candidate": candidate.to_dict(), **(metadata or {})})


def mitigate(
    lm: LoadedModel,
    cases: Sequence[FactCase],
    *,
    candidates: Sequence[Candidate] | None = None,
    select_fraction: float = 0.4,
    seed: int = 0,
    corpus: str = "wikitext-2",
    n_windows: int = 16,
    window: int = 128,
    batch_size: int = 16,
    eval_set: str = "",
) -> tuple[MitigationReport, dict[str, dict[str, torch.Tensor]]]:
    """Choose a mitigation on a selection split of ``cases`` and measure it on the held-out rest and on
    WikiText-2 perplexity (the test split's first ``n_windows`` windows of ``window`` tokens).

    ``candidates``: default :data:`DEFAULT_CANDIDATES` plus :func:`head_candidates` (every last-layer head
    at strengths 0.5 and 1). Returns the report and the directions (so :func:`build_mitigation` can
    rebuild the chosen edit).
    The model's weights are the originals again when this returns.
    """
    from factlab.mechanisms.frequency import frequency_direction, unigram_counts

    if candidates is None:
        candidates = DEFAULT_CANDIDATES + head_candidates(lm)
    sel, held = split_cases(cases, select_fraction, seed)
    sb, sids = _batches(lm, sel, batch_size)
    hb, hids = _batches(lm, held, batch_size)
    sel_in = block_inputs(lm, sb, sids, outputs=True)
    held_in = block_inputs(lm, hb, hids)
    text_in = block_inputs(lm, text_windows(lm, corpus, n_windows=n_windows, length=window, batch_size=8))
    counts = unigram_counts(lm, corpus)
    u = frequency_direction(lm, counts)
    directions = {
        "frequency": {t: output_space_direction(lm, u, t) for t in ("attn", "mlp")},
        "intercept": {"attn": torch.cat(sel_in.last_attn).double().mean(0), "mlp": torch.cat(sel_in.last_mlp).double().mean(0)},
    }
    base_c, base_p = fact_scores(lm, sel_in)
    rows: list[dict[str, object]] = [{"name": "none", "accuracy": float(base_c.mean()), "answer_prob": float(base_p.mean())}]
    best, best_acc = None, -1.0
    for cand in candidates:
        edit = build_mitigation(lm, cand, directions)
        try:
            c, p = fact_scores(lm, sel_in)
        finally:
            edit.restore()
        rows.append({"name": cand.name, "accuracy": float(c.mean()), "answer_prob": float(p.mean())})
        if c.mean() > best_acc:
            best, best_acc = cand, float(c.mean())
    assert best is not None
    notes = [
        f"candidate chosen on {len(sel)} selection facts (seed {seed}); accuracy measured on {len(held)} held-out facts",
        "accuracy: the answer's first token is the top-1 next token after the prompt",
        "perplexity: WikiText-2 test, non-overlapping windows, CI from per-window mean NLL (t interval) exponentiated",
    ]
    if best_acc <= float(base_c.mean()):
        notes.append("no candidate raised selection accuracy; the reported one is the best of them (it may lower accuracy)")
    before_c, before_p = fact_scores(lm, held_in)
    nll0 = window_nll(lm, text_in)
    edit = build_mitigation(lm, best, directions)
    try:
        after_c, after_p = fact_scores(lm, held_in)
        nll1 = window_nll(lm, text_in)
    finally:
        edit.restore()
    e0, e1 = mean_ci(nll0), mean_ci(nll1)
    report = MitigationReport(
        model=lm.name,
        chosen=best,
        selection=rows,
        n_selection=len(sel),
        n_heldout=len(held),
        accuracy_before=proportion_ci(before_c),
        accuracy_after=proportion_ci(after_c),
        accuracy_change=bounded_mean_ci(after_c - before_c, -1.0, 1.0),
        prob_before=bounded_mean_ci(before_p, 0.0, 1.0),
        prob_after=bounded_mean_ci(after_p, 0.0, 1.0),
        perplexity_before=math.exp(e0.mean),
        perplexity_after=math.exp(e1.mean),
        perplexity_before_ci=(math.exp(e0.low), math.exp(e0.high)),
        perplexity_after_ci=(math.exp(e1.low), math.exp(e1.high)),
        nll_change=mean_ci(nll1 - nll0),
        n_text_tokens=int(sum(b.input_ids.numel() for b in text_in.batches)),
        eval_set=eval_set,
        notes=notes,
    )
    return report, directions
