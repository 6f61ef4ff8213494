"""Target values: the vector that, written at the edit site for the subject's last token, makes the model
predict the new target on every context-prefixed prompt (algorithms.md §5.2, §6.1 step 1).

Loss per request (as the reference): mean over prefixed prompts of the per-token target NLL (teacher
forced) + ``kl_factor * KL(P_delta || P_0)`` of the next-token distribution at the subject's last token
of ``"{subject} is a"`` + ``v_weight_decay * ||delta|| / ||v0||^2``; Adam; ``||delta||`` clamped to
``clamp_norm_factor * ||v0||``; a request stops once its loss is below ``early_stop_loss``, and with
``early_stop="top1"`` also at the ``top1_count``-th step at which every target token is the argmax on every
context-prefixed prompt (ENCORE's most-probable early stopping, algorithms.md §15.3; read from the logits
the step computes anyway). Either stop is decided before that step's update, as the references do.

Exact speed-ups over the reference: blocks below the edit layer run once (their output cannot change)
and each step resumes from there; for families with an exact KV cache, positions before every row's
subject cannot change either, so after the first pass each step feeds only the positions from the
earliest subject token on and reads the earlier keys/values from that pass; logits are computed only
at the target and KL positions; requests
are optimised together (Adam is element-wise, so each request's trajectory is the one it would have
alone) and leave the batch once they stop; parameter gradients are off.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator

import torch

from factlab.edit.errors import DivergenceError, EditError
from factlab.edit.hparams import EditHparams
from factlab.edit.keys import Row, batch_rows, subject_row
from factlab.edit.requests import Request
from factlab.interventions import StopForward, capture, patch, resume_from, run_and_capture
from factlab.models import LoadedModel
from factlab.models.kv_cache import cache_kwargs
from factlab.prompts import Batch, continuation_ids

KL_TEMPLATE = "{} is a"


@dataclass
class Values:
    """Optimised values for ``n`` requests at one site (all float32, CPU).

    ``v0``: ``(n, d)`` the site's value at the subject's last token of the bare prompt; ``delta``: the
    optimised change; ``target = v0 + delta``. ``known[i]``: the unedited model already predicted every
    target token (teacher-forced argmax) on the bare prompt. ``prob_before/after``: mean target-token
    probability on the bare prompt before/after. ``steps[i]``: optimisation steps taken.
    """

    v0: torch.Tensor
    delta: torch.Tensor
    known: list[bool]
    prob_before: list[float]
    prob_after: list[float]
    loss: list[float]
    steps: list[int]
    site: str = ""
    extra: dict = field(default_factory=dict)

    @property
    def target(self) -> torch.Tensor:
        return self.v0 + self.delta

    def to_dict(self) -> dict:
        return {
            "site": self.site,
            "known": self.known,
            "prob_before": self.prob_before,
            "prob_after": self.prob_after,
            "loss": self.loss,
            "steps": self.steps,
            "delta_norm": self.delta.norm(dim=-1).tolist(),
            "v0_norm": self.v0.norm(dim=-1).tolist(),
        }


@contextmanager
def frozen_parameters(lm: LoadedModel) -> Iterator[None]:
    """Turn parameter gradients off for the duration (restores each parameter's flag)."""
    flags = [(p, p.requires_grad) for p in lm.model.parameters()]
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        yield
    finally:
        for p, f in flags:
            p.requires_grad_(f)


def _subset(batch: Batch, idx: torch.Tensor) -> Batch:
    i = idx.to(batch.input_ids.device)
    return Batch(batch.input_ids[i], batch.attention_mask[i], batch.position_ids[i], [batch.lengths[j] for j in idx.tolist()], batch.padding_side)


@dataclass
class _Plan:
    rows: list[Row]
    #: per target token: (row, padded position, token id, request, weight)
    t_row: torch.Tensor
    t_pos: torch.Tensor
    t_tok: torch.Tensor
    t_req: torch.Tensor
    t_w: torch.Tensor
    #: per target token: whether its row is a context-prefixed prompt (template > 0)
    t_prefixed: torch.Tensor
    #: rows of the bare prompt (template 0) per request, and the KL row per request
    plain_row: torch.Tensor
    kl_row: torch.Tensor
    row_req: torch.Tensor


def _plan(lm: LoadedModel, requests: list[Request], templates: list[str]) -> tuple[_Plan, Batch, torch.Tensor]:
    rows: list[Row] = []
    targets = []  # (row index, prompt length, target ids)
    plain, kl = [], []
    for i, r in enumerate(requests):
        tgt = continuation_ids(lm.tokenizer, r.filled, r.target_new)
        for t_i, t in enumerate(templates):
            text = t.replace("{}", r.filled)
            row = subject_row(lm, text, r.subject, i)
            n_prompt = len(row.ids)
            row.ids = row.ids + tgt[:-1]
            if t_i == 0:
                plain.append(len(rows))
            targets.append((len(rows), n_prompt, tgt, i, len(templates)))
            rows.append(row)
    for i, r in enumerate(requests):
        kl.append(len(rows))
        rows.append(subject_row(lm, KL_TEMPLATE.replace("{}", r.subject), r.subject, i))
    batch, pos = batch_rows(lm, rows)
    t_row, t_pos, t_tok, t_req, t_w, t_pre = [], [], [], [], [], []
    plain_set = set(plain)
    for row_i, n_prompt, tgt, req, n_t in targets:
        for j, tok in enumerate(tgt):
            t_row.append(row_i)
            t_pre.append(row_i not in plain_set)
            t_pos.append(batch.position(row_i, n_prompt - 1 + j))
            t_tok.append(tok)
            t_req.append(req)
            t_w.append(1.0 / (n_t * len(tgt)))
    L = torch.long
    plan = _Plan(
        rows,
        torch.tensor(t_row, dtype=L),
        torch.tensor(t_pos, dtype=L),
        torch.tensor(t_tok, dtype=L),
        torch.tensor(t_req, dtype=L),
        torch.tensor(t_w, dtype=torch.float32),
        torch.tensor(t_pre, dtype=torch.bool),
        torch.tensor(plain, dtype=L),
        torch.tensor(kl, dtype=L),
        torch.tensor([r.request for r in rows], dtype=L),
    )
    return plan, batch, pos[:, 0]


def optimise_values(
    lm: LoadedModel, requests: list[Request], *, site: str, layer: int, templates: list[str], hp: EditHparams
) -> Values:
    """Optimise one delta per request at ``site`` (a site computed inside block ``layer``); see module doc."""
    parts = [
        _optimise_chunk(lm, requests[s : s + hp.v_batch], site=site, layer=layer, templates=templates, hp=hp)
        for s in range(0, len(requests), hp.v_batch)
    ]
    return Values(
        v0=torch.cat([p.v0 for p in parts]),
        delta=torch.cat([p.delta for p in parts]),
        known=sum((p.known for p in parts), []),
        prob_before=sum((p.prob_before for p in parts), []),
        prob_after=sum((p.prob_after for p in parts), []),
        loss=sum((p.loss for p in parts), []),
        steps=sum((p.steps for p in parts), []),
        site=site,
    )


def _optimise_chunk(
    lm: LoadedModel, requests: list[Request], *, site: str, layer: int, templates: list[str], hp: EditHparams
) -> Values:
    n = len(requests)
    if hp.early_stop == "top1" and len(templates) < 2:
        raise EditError(
            "early_stop='top1' checks the target on the context-prefixed prompts, and there are none; "
            "give hparams.context at least one (length, count) pair, or use early_stop='loss'"
        )
    plan, batch, subj_pos = _plan(lm, requests, templates)
    adapter = lm.adapter
    last_site = f"layer.{adapter.n_layers - 1}.resid"
    hidden = None
    if layer > 0:
        hidden = run_and_capture(lm, batch, [f"layer.{layer - 1}.resid"], stop_early=True)[f"layer.{layer - 1}.resid"]
    state: dict[str, torch.Tensor] = {}
    # keys/values of every block from the first (delta = 0) pass: positions before every row's subject
    # cannot change with delta, so later passes feed only positions >= the earliest subject position
    use_kv = adapter.exact_kv_cache
    kv: list[tuple[torch.Tensor, torch.Tensor] | None] = []

    def forward(rows: torch.Tensor) -> tuple[torch.Tensor, int]:
        """Last-block output ``(len(rows), W - p0, d)`` for ``rows`` of the batch with the current delta
        written, and ``p0``, the first padded position it covers."""
        first = "delta" not in state
        p0 = int(subj_pos[rows].min()) if kv and not first else 0
        r_local, r_pos, r_req = torch.arange(len(rows)), subj_pos[rows] - p0, plan.row_req[rows]

        def add(value: torch.Tensor) -> torch.Tensor:
            dev = value.device
            il, ip = r_local.to(dev), r_pos.to(dev)
            if "delta" not in state:  # first pass: delta = 0; record the unchanged values
                state["v0_rows"] = value[il, ip].detach().float().cpu()
                state["delta"] = torch.zeros(n, value.shape[-1], dtype=torch.float32, requires_grad=True)
            out = value.clone()
            out[il, ip] = out[il, ip] + state["delta"][r_req].to(dev, value.dtype)
            return out

        inputs = _subset(batch, rows).model_inputs(adapter.uses_position_ids)
        cache = None
        if use_kv and first:
            from transformers import DynamicCache

            cache = DynamicCache()
        elif p0 > 0:
            cache = _prefix_cache(kv, rows, p0)
            inputs = {k: (t if k == "attention_mask" else t[:, p0:]) for k, t in inputs.items()}
        h_in = hidden[rows.to(hidden.device)][:, p0:] if hidden is not None else None
        with patch(lm, {site: add}), capture(lm, [last_site], detach=False, stop=True) as acts:
            with resume_from(lm, layer, h_in) if h_in is not None else _null():
                try:
                    if cache is not None:
                        lm.model(**inputs, **cache_kwargs(lm.model, cache))
                    else:
                        lm.model(**inputs, use_cache=False)
                except StopForward:
                    pass
        if use_kv and first:
            kv.extend(_cached_kv(cache, batch.width))
        return acts[last_site], p0

    active = torch.ones(n, dtype=torch.bool)
    steps, loss_out = [0] * n, [float("nan")] * n
    known, prob_before = [False] * n, [0.0] * n
    top1_steps = torch.zeros(n, dtype=torch.long)  # steps at which the target was the top-1 (early_stop="top1")
    kl_init = v0 = opt = None
    with frozen_parameters(lm), torch.enable_grad():
        for it in range(max(1, hp.v_steps)):
            act_req = active.nonzero().flatten()
            rows = active[plan.row_req].nonzero().flatten()
            local = torch.full((len(plan.rows),), -1, dtype=torch.long)
            local[rows] = torch.arange(len(rows))
            h, p0 = forward(rows)
            delta = state["delta"]
            if v0 is None:
                v0 = state["v0_rows"][plan.plain_row]
                opt = torch.optim.Adam([delta], lr=hp.v_lr)
            dev = h.device
            sel_t = active[plan.t_req]
            tr, tp = local[plan.t_row[sel_t]], plan.t_pos[sel_t] - p0
            logits_t = adapter.logits_from_resid(lm.model, h[tr.to(dev), tp.to(dev)]).float()
            logp_t = logits_t.log_softmax(-1).gather(-1, plan.t_tok[sel_t].to(dev)[:, None])[:, 0].cpu()
            nll = torch.zeros(n).index_add(0, plan.t_req[sel_t], -logp_t * plan.t_w[sel_t])
            kr = plan.kl_row[act_req]
            logits_kl = adapter.logits_from_resid(lm.model, h[local[kr].to(dev), (subj_pos[kr] - p0).to(dev)]).float()
            logp_kl = logits_kl.log_softmax(-1).cpu()
            if kl_init is None:
                kl_init = logp_kl.detach().clone()
                _record_before(plan, logits_t.detach().cpu(), known, prob_before)
            kl = torch.zeros(n).index_add(0, act_req, (logp_kl.exp() * (logp_kl - kl_init[act_req])).sum(-1))
            wd = hp.v_weight_decay * delta.norm(dim=-1) / (v0.norm(dim=-1) ** 2).clamp_min(1e-12)
            per_req = nll + hp.kl_factor * kl + wd
            if not torch.isfinite(per_req[act_req]).all():
                raise DivergenceError(
                    f"the value optimisation at {site} produced NaN/inf at step {it}; lower v_lr or clamp_norm_factor "
                    "(hparams), or run the model in float32"
                )
            for j in act_req.tolist():
                loss_out[j], steps[j] = float(per_req[j].detach()), it + 1
            still = active & ~(per_req.detach() < hp.early_stop_loss)
            if hp.early_stop == "top1":
                top1_steps += _all_top1(plan, sel_t, logits_t.detach().argmax(-1).cpu(), n) & active
                still &= top1_steps < hp.top1_count
            if it == hp.v_steps - 1 or hp.v_steps == 0 or not bool(still.any()):
                break
            opt.zero_grad()
            per_req[still].sum().backward()
            keep = delta.detach().clone()
            opt.step()
            with torch.no_grad():
                delta[~still] = keep[~still]  # Adam momentum must not move stopped requests
                limit = hp.clamp_norm_factor * v0.norm(dim=-1)
                norm = delta.norm(dim=-1)
                delta.mul_(torch.where(norm > limit, limit / norm.clamp_min(1e-12), torch.ones_like(norm))[:, None])
            active = still
    delta_out = state["delta"].detach().clone()
    if not torch.isfinite(delta_out).all():
        raise DivergenceError(f"the optimised value at {site} is not finite; lower v_lr or clamp_norm_factor")
    with torch.no_grad():
        prob_after = _prob_plain(lm, plan, forward)
    return Values(v0=v0.clone(), delta=delta_out, known=known, prob_before=prob_before, prob_after=prob_after,
                  loss=loss_out, steps=steps, site=site)


@contextmanager
def _null() -> Iterator[None]:
    yield


def _cached_kv(cache, width: int) -> list[tuple[torch.Tensor, torch.Tensor] | None]:
    """Per block, the (keys, values) ``(B, H, W, d_head)`` a first full pass left in ``cache`` (``None`` for
    blocks it skipped); empty - no reuse - when a block holds other than ``width`` positions (a window)."""
    out: list[tuple[torch.Tensor, torch.Tensor] | None] = []
    for lay in cache.layers:
        k = getattr(lay, "keys", None)
        if not torch.is_tensor(k) or k.numel() == 0:
            out.append(None)
        elif k.shape[-2] != width:
            return []
        else:
            out.append((k.detach(), lay.values.detach()))
    return out if any(e is not None for e in out) else []


def _prefix_cache(kv: list[tuple[torch.Tensor, torch.Tensor] | None], rows: torch.Tensor, p0: int):
    """A ``DynamicCache`` holding positions ``< p0`` of ``rows`` (skipped blocks get zeros: never read)."""
    from transformers import DynamicCache

    ref = next(e for e in kv if e is not None)[0]
    idx = rows.to(ref.device)
    empty = torch.zeros(len(rows), ref.shape[1], p0, ref.shape[3], dtype=ref.dtype, device=ref.device)
    return DynamicCache([(e[0][idx, :, :p0], e[1][idx, :, :p0]) if e is not None else (empty, empty) for e in kv])


def _record_before(plan: _Plan, logits_t: torch.Tensor, known: list[bool], prob_before: list[float]) -> None:
    """From the first pass (all requests active, delta = 0): per request, whether the bare prompt already
    predicts every target token, and the mean target-token probability."""
    is_plain = torch.isin(plan.t_row, plan.plain_row)
    hit = logits_t.argmax(-1) == plan.t_tok
    p = logits_t.softmax(-1).gather(-1, plan.t_tok[:, None])[:, 0]
    for j in range(len(known)):
        m = is_plain & (plan.t_req == j)
        known[j] = bool(hit[m].all())
        prob_before[j] = float(p[m].mean())


def _all_top1(plan: _Plan, sel_t: torch.Tensor, argmax: torch.Tensor, n: int) -> torch.Tensor:
    """``(n,)`` bool: every target token of the request is the argmax on every context-prefixed prompt.

    ``argmax`` holds the predicted token at the selected target tokens ``plan.t_*[sel_t]`` (in that order);
    requests with no selected token come out False."""
    pre = plan.t_prefixed[sel_t]
    req, miss = plan.t_req[sel_t][pre], (argmax != plan.t_tok[sel_t])[pre]
    n_tok = torch.zeros(n, dtype=torch.long).index_add(0, req, torch.ones_like(req))
    n_miss = torch.zeros(n, dtype=torch.long).index_add(0, req, miss.long())
    return (n_tok > 0) & (n_miss == 0)


def _prob_plain(lm: LoadedModel, plan: _Plan, forward) -> list[float]:
    """Mean target-token probability on each request's bare prompt with the final delta."""
    rows = plan.plain_row
    local = torch.full((len(plan.rows),), -1, dtype=torch.long)
    local[rows] = torch.arange(len(rows))
    h, p0 = forward(rows)
    sel = torch.isin(plan.t_row, rows)
    logits = lm.adapter.logits_from_resid(lm.model, h[local[plan.t_row[sel]].to(h.device), (plan.t_pos[sel] - p0).to(h.device)]).float().cpu()
    p = logits.softmax(-1).gather(-1, plan.t_tok[sel][:, None])[:, 0]
    n = len(rows)
    return (torch.zeros(n).index_add(0, plan.t_req[sel], p) / torch.zeros(n).index_add(0, plan.t_req[sel], torch.ones_like(p))).tolist()
