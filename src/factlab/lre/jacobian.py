"""Exact Jacobians ``∂z/∂h`` of the object state with respect to the subject state (algorithms.md §9.1).

Fast path (:func:`jacobian`): per prompt, the tokens before the subject's last token (the *prefix*)
run once without gradient; only the *remainder* runs with autograd, and the ``d`` rows of the
Jacobian come from batched backward passes.

- Models with attention: the prefix runs once with a key/value cache; the remainder is only the
  suffix tokens (subject's last token .. end), with ``h`` written into the suffix's first position at
  the subject layer. The suffix's subject-layer states are read once; then, ``chunk`` Jacobian rows at
  a time, only blocks ``layer+1..L-1`` run (``resume_from``) on the suffix replicated once per row (one
  copy of ``h`` per row), and one ordinary backward pass gives those rows.
- Models without a multi-token cache (Mamba): the subject-layer states of the whole prompt are read
  once (the forward stops there), then only blocks ``layer+1..L-1`` run (``resume_from``) with ``h``
  written at the subject position.

The plain reference (per example ``torch.autograd.functional.jacobian`` of a full forward pass) is
:func:`jacobian_reference`; tests and ``benchmarks/lre.py`` check the fast path against it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from factlab.errors import NonFiniteError
from factlab.interventions import StopForward, capture, patch, resume_from, run_and_capture, write
from factlab.lre.states import Layer, check_layer, h_site, subject_index, z_site
from factlab.models.kv_cache import cache_kwargs, returned_cache
from factlab.models.loading import LoadedModel


@dataclass
class Jacobians:
    """Per-example first-order approximations: ``weight`` ``(N, d, d)`` (``∂z/∂h``), ``h`` and ``z`` ``(N, d)``,
    ``bias`` ``(N, d)`` = ``z - W h``. All float32 on the CPU."""

    weight: torch.Tensor
    h: torch.Tensor
    z: torch.Tensor

    @property
    def bias(self) -> torch.Tensor:
        return self.z - torch.einsum("nij,nj->ni", self.weight, self.h)


def _rows_from(z: torch.Tensor, h: torch.Tensor, chunk: int) -> torch.Tensor:
    """``(d_z, d_h)`` Jacobian of ``z`` ``(d_z,)`` w.r.t. the leaf ``h`` by batched backward passes."""
    d = z.shape[-1]
    eye = torch.eye(d, dtype=z.dtype, device=z.device)
    rows = []
    for i in range(0, d, chunk):
        g = eye[i : i + chunk]
        (rows_i,) = torch.autograd.grad(z, h, grad_outputs=g, is_grads_batched=True, retain_graph=i + chunk < d)
        rows.append(rows_i)
    return torch.cat(rows)


def _jacobian_one_cached(lm: LoadedModel, ids: torch.Tensor, p: int, layer: Layer, chunk: int):
    """Attention path: prefix keys/values once; per chunk of ``c`` Jacobian rows, one forward of the suffix
    with the batch replicated ``c`` times (each row its own copy of ``h``) and one backward pass."""
    import copy

    cache = None
    if p > 0:
        with torch.no_grad():
            out = lm.model(input_ids=ids[:, :p], position_ids=torch.arange(p, device=ids.device)[None], use_cache=True)
        cache = returned_cache(out)
    suffix = ids[:, p:]
    T = ids.shape[1]
    hs, zs = h_site(lm, layer), z_site(lm)

    L = lm.adapter.n_layers
    upper_only = layer != "emb" and layer < L - 1
    hidden_suffix: dict[str, torch.Tensor] = {}

    def run(c: int, fn, read_hidden: bool = False):
        kw = {
            "input_ids": suffix.expand(c, -1),
            "position_ids": torch.arange(p, T, device=ids.device)[None].expand(c, -1),
            "attention_mask": torch.ones(c, T, dtype=torch.long, device=ids.device),
            "use_cache": cache is not None,
            "logits_to_keep": 1,
        }
        if cache is not None:
            cc = copy.deepcopy(cache)
            if c > 1:
                cc.batch_repeat_interleave(c)
            kw.update(cache_kwargs(lm.model, cc))
        if read_hidden or not upper_only:
            with patch(lm, {hs: fn}), capture(lm, [zs], positions=[-1], detach=False) as acts:
                lm.model(**kw)
        else:  # only blocks layer+1..L-1 run, on the suffix, fed the subject-layer states with h written in
            hidden = fn(hidden_suffix["h"].expand(c, -1, -1))
            with resume_from(lm, layer + 1, hidden), capture(lm, [zs], positions=[-1], detach=False, stop=True) as acts:
                try:
                    lm.model(**kw)
                except StopForward:
                    pass
        return acts[zs][:, -1]

    with torch.no_grad():
        h0 = {}

        def read(value):
            h0["h"] = value[0, 0].clone()
            hidden_suffix["h"] = value.detach().clone()
            return None

        z0 = run(1, read, read_hidden=True)[0]
    h0 = h0["h"]
    d = z0.shape[-1]
    rows = []
    with torch.enable_grad():
        for i in range(0, d, chunk):
            c = min(chunk, d - i)
            H = h0.expand(c, -1).clone().requires_grad_(True)
            z = run(c, lambda v: write(v, H[:, None], [0]))
            if not z.requires_grad:  # z does not depend on h (h at the last layer, not the last token)
                return torch.zeros(d, h0.shape[-1]), h0, z0
            (g,) = torch.autograd.grad(z, H, grad_outputs=torch.eye(d, dtype=z.dtype, device=z.device)[i : i + c])
            rows.append(g)
    return torch.cat(rows), h0, z0


def _jacobian_one_resumed(lm: LoadedModel, ids: torch.Tensor, p: int, layer: Layer, chunk: int):
    from factlab.prompts import pad

    batch = pad([ids[0].tolist()], pad_id=0, device=ids.device)
    hs, zs = h_site(lm, layer), z_site(lm)
    L = lm.adapter.n_layers
    if layer == "emb" or layer == L - 1:
        # nothing to skip below (emb) or nothing above (last layer): one forward with h written in place
        leaf: dict[str, torch.Tensor] = {}

        def insert(value: torch.Tensor) -> torch.Tensor:
            h = value[0, p].detach().clone().requires_grad_(True)
            leaf["h"] = h
            return write(value, h[None, None], [p])

        with torch.enable_grad(), patch(lm, {hs: insert}), capture(lm, [zs], positions=[-1], detach=False) as acts:
            lm.forward(batch)
            z, h = acts[zs][0, -1], leaf["h"]
            if not z.requires_grad:
                return torch.zeros(z.shape[-1], h.shape[-1]), h.detach(), z.detach()
            return _rows_from(z, h, chunk), h.detach(), z.detach()
    hidden = run_and_capture(lm, batch, [hs])[hs]  # (1, T, d), stops at the subject layer
    h = hidden[0, p].detach().clone().requires_grad_(True)
    with torch.enable_grad():
        full = write(hidden, h[None, None], [p])
        with resume_from(lm, layer + 1, full), capture(lm, [zs], positions=[-1], detach=False, stop=True) as acts:
            try:
                lm.forward(batch)
            except StopForward:
                pass
        z = acts[zs][0, -1]
        return _rows_from(z, h, chunk), h.detach(), z.detach()


def uses_prefix_cache(lm: LoadedModel) -> bool:
    """Whether the fast path can cache the prefix's keys/values (attention models)."""
    return lm.adapter.has_attention


def jacobian(
    lm: LoadedModel,
    prompts: Sequence[str],
    subjects: Sequence[str],
    layer: Layer,
    *,
    chunk: int = 128,
    use_cache: bool | None = None,
) -> Jacobians:
    """Exact ``∂z/∂h`` for each (prompt, subject): ``h`` at ``layer`` on the subject's last token, ``z`` the last
    block's output on the prompt's last token. ``chunk`` cotangents go through each batched backward pass.

    Raises :class:`NonFiniteError` when a Jacobian holds NaN/inf (e.g. fp16 overflow).
    """
    if len(prompts) != len(subjects):
        raise ValueError(f"{len(prompts)} prompts but {len(subjects)} subjects")
    layer = check_layer(lm, layer)
    cached = uses_prefix_cache(lm) if use_cache is None else use_cache
    ws, hs, zs = [], [], []
    for prompt, subject in zip(prompts, subjects):
        batch = lm.encode(prompt)
        p = subject_index(lm, prompt, subject)
        fn = _jacobian_one_cached if cached else _jacobian_one_resumed
        w, h, z = fn(lm, batch.input_ids, p, layer, chunk)
        if not torch.isfinite(w).all():
            raise NonFiniteError(
                f"the Jacobian for subject {subject!r} at layer {layer} holds NaN/inf; run the model in float32 (--dtype float32)"
            )
        ws.append(w.float().cpu())
        hs.append(h.float().cpu())
        zs.append(z.float().cpu())
    return Jacobians(torch.stack(ws), torch.stack(hs), torch.stack(zs))


def jacobian_reference(lm: LoadedModel, prompt: str, subject: str, layer: Layer) -> torch.Tensor:
    """Plain reference: ``torch.autograd.functional.jacobian`` of a full forward pass over the whole prompt
    with ``h`` written at the subject position. ``(d, d)``, float32."""
    layer = check_layer(lm, layer)
    batch = lm.encode(prompt)
    p = subject_index(lm, prompt, subject)
    hs, zs = h_site(lm, layer), z_site(lm)
    h0 = run_and_capture(lm, batch, [hs], stop_early=False)[hs][0, p].clone()

    def f(h: torch.Tensor) -> torch.Tensor:
        with patch(lm, {hs: h[None, None]}, positions=[p]), capture(lm, [zs], positions=[-1], detach=False) as acts:
            lm.forward(batch)
        return acts[zs][0, -1]

    return torch.autograd.functional.jacobian(f, h0, vectorize=True).float().cpu()
