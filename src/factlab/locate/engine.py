"""The exact, fast executor behind causal tracing and severed paths.

A *restoration* changes the corrupted run at one padded token position ``t``: the block output of one
layer, or module outputs in a window of layers, are set to their clean values (and, for severed paths,
other module outputs are frozen to their corrupted values). Nothing that cannot change is recomputed:

* Layers below the first changed layer come from one cached corrupted pass: the run resumes at that
  block (:func:`factlab.interventions.resume_from`) with the cached corrupted residual stream.
* Positions before ``t`` cannot change (causality): for attention models the run feeds only positions
  ``t..W-1`` and reads the keys/values of positions ``< t`` from the cached corrupted pass (a KV cache).
  Mamba's internal states are only reachable without a cache, so Mamba runs all positions.
* Restorations before the first corrupted token equal the corrupted run and are not run at all.
* Restorations that start at the same block (and token) share one batched forward pass; the logits are
  computed only at the positions that score the target.

Every number equals a plain run (one full forward per restoration) up to float rounding; the tests keep
that plain reference as the oracle.
"""

from __future__ import annotations

import contextlib
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch

from factlab.interventions import StopForward, capture, hooks, resume_from
from factlab.locate._common import check_finite
from factlab.locate.setup import TraceSetup
from factlab.models.kv_cache import cache_kwargs, returned_cache
from factlab.progress import progress



@dataclass(frozen=True)
class Restoration:
    """One restoration at padded position ``t``; the run starts at block ``start`` (``n_layers``: no block).

    ``resid``: restore ``layer.{start-1}.resid`` (the input of block ``start``) to its clean value.
    ``clean``: sites restored to their clean values at ``t``. ``frozen``: sites held at their corrupted
    values at ``t``.
    """

    t: int
    start: int
    resid: bool = False
    clean: tuple[str, ...] = ()
    frozen: tuple[str, ...] = ()


@dataclass
class Engine:
    """Runs restorations for one :class:`TraceSetup`; the clean and corrupted passes are run once."""

    setup: TraceSetup
    clean_sites: Iterable[str] = ()
    frozen_sites: Iterable[str] = ()
    use_cache: bool | None = None
    max_rows: int = 1024
    clean: dict[str, torch.Tensor] = field(init=False)
    corrupt: dict[str, torch.Tensor] = field(init=False)
    kv: list[tuple[torch.Tensor, torch.Tensor]] | None = field(init=False)
    high: float = field(init=False)
    low: float = field(init=False)

    def __post_init__(self) -> None:
        lm, s = self.setup.lm, self.setup
        L = lm.adapter.n_layers
        if self.use_cache is None:
            self.use_cache = lm.adapter.exact_kv_cache
        resid = [f"layer.{i}.resid" for i in range(L)]
        with torch.no_grad():
            with capture(lm, list(dict.fromkeys(list(self.clean_sites) + resid))) as acts:
                logits = lm.forward(s.clean)
            self.clean = {k: v[0] for k, v in acts.items()}
            self.high = float(s.score(logits[:, s.readout])[0])
            fns = {}
            nf = s.noise_fn(1, 0)
            if nf is not None:
                fns["embed"] = nf
            with hooks(lm, fns), capture(lm, list(dict.fromkeys(list(self.frozen_sites) + resid))) as acts:
                kwargs = {"use_cache": True} if self.use_cache else {"use_cache": False}
                out = lm.model(**s.corrupted.model_inputs(lm.adapter.uses_position_ids), **kwargs)
            self.corrupt = dict(acts)
            self.low = float(s.score(out.logits[:, s.readout]).mean())
            self.kv = None
            if self.use_cache:
                cache = returned_cache(out)
                self.kv = [(layer.keys, layer.values) for layer in cache.layers]
                if any(k.shape[-2] != s.width for k, _ in self.kv):  # e.g. a sliding-window cache: run all positions
                    self.kv, self.use_cache = None, False

    # ------------------------------------------------------------------ public
    def run(self, restorations: list[Restoration], desc: str = "restorations") -> torch.Tensor:
        """Scores ``(len(restorations),)``: the mean over corrupted rows of the target score."""
        s = self.setup
        out = torch.full((len(restorations),), float("nan"), dtype=torch.float64)
        groups: dict[tuple[int, int], list[int]] = defaultdict(list)
        for i, r in enumerate(restorations):
            if r.t < s.first_diff:  # identical to the corrupted run
                out[i] = self.low
            else:
                groups[(r.start, r.t if self.use_cache else 0)].append(i)
        per = max(1, self.max_rows // s.samples)
        chunks = [(key, idx[j : j + per]) for key, idx in sorted(groups.items()) for j in range(0, len(idx), per)]
        for (start, t0), idx in progress(chunks, desc=desc, unit="pass"):
            out[idx] = self._forward(start, t0, [restorations[i] for i in idx]).double()
        return out

    # ------------------------------------------------------------------ internals
    def _patch_fns(self, jobs: list[Restoration], t0: int) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
        M = self.setup.samples
        spec: dict[str, list[tuple[int, int, torch.Tensor]]] = defaultdict(list)
        for j, r in enumerate(jobs):
            for site in r.clean:
                spec[site].append((j, r.t - t0, self.clean[site][r.t].unsqueeze(0).expand(M, *self.clean[site].shape[1:])))
            for site in r.frozen:
                spec[site].append((j, r.t - t0, self.corrupt[site][:, r.t]))
        fns = {}
        for site, items in spec.items():
            rows = torch.cat([torch.arange(j * M, (j + 1) * M) for j, _, _ in items])
            pos = torch.cat([torch.full((M,), p, dtype=torch.long) for _, p, _ in items])
            vals = torch.cat([v for _, _, v in items])
            fns[site] = _writer(rows, pos, vals)
        return fns

    def _forward(self, start: int, t0: int, jobs: list[Restoration]) -> torch.Tensor:
        s, lm = self.setup, self.setup.lm
        L = lm.adapter.n_layers
        J, M = len(jobs), s.samples
        readout = [p - t0 for p in s.readout]
        final = f"layer.{L - 1}.resid"
        hidden = None
        if start > 0:
            hidden = self.corrupt[f"layer.{start - 1}.resid"][:, t0:].repeat(J, 1, 1)
            for j, r in enumerate(jobs):
                if r.resid:
                    hidden[j * M : (j + 1) * M, r.t - t0] = self.clean[f"layer.{start - 1}.resid"][r.t]
        with torch.no_grad():
            if start >= L:
                logits = lm.adapter.logits_from_resid(lm.model, hidden[:, readout])
            else:
                fns = self._patch_fns(jobs, t0)
                if start == 0:
                    nf = s.noise_fn(J, t0)
                    if nf is not None:
                        fns["embed"] = nf
                cb = s.corrupted
                inputs = {"input_ids": cb.input_ids[:, t0:].repeat(J, 1), "attention_mask": cb.attention_mask.repeat(J, 1)}
                if lm.adapter.uses_position_ids:
                    inputs["position_ids"] = cb.position_ids[:, t0:].repeat(J, 1)
                if self.use_cache and t0 > 0:
                    from transformers import DynamicCache

                    inputs.update(cache_kwargs(lm.model, DynamicCache(
                        [(k[:, :, :t0].repeat(J, 1, 1, 1), v[:, :, :t0].repeat(J, 1, 1, 1)) for k, v in self.kv]
                    )))
                else:
                    inputs["use_cache"] = False
                resume = resume_from(lm, start, hidden) if start > 0 else contextlib.nullcontext()
                with resume, hooks(lm, fns), capture(lm, [final], positions=readout, stop=True) as acts:
                    try:
                        lm.model(**inputs)
                    except StopForward:
                        pass
                logits = lm.adapter.logits_from_resid(lm.model, acts[final])
        return s.score(check_finite(logits, "logits")).view(J, M).mean(1)


def _writer(rows: torch.Tensor, pos: torch.Tensor, vals: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    def fn(value: torch.Tensor) -> torch.Tensor:
        out = value.clone()
        out[rows.to(out.device), pos.to(out.device)] = vals.to(out.device, out.dtype)
        return out

    return fn
