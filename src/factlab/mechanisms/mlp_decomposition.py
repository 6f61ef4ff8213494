"""MLP decomposition ("activation" and "function application", Lv et al. 2024; derived recipe of
``algorithms.md`` §10): split one MLP's output into the parts caused by each component of its input.

The MLP's input is the (pre-MLP-normed) residual, a sum of parts ``c_j`` (embedding, earlier heads and
MLPs, this layer's heads). With the pre-MLP norm's scale frozen and the *activation pattern frozen at
the actual input*, the MLP is affine in its input:

* gated MLPs (Llama, Gemma): ``down(act(gate(x)) * up(x))`` with ``g = act(gate(x))`` frozen gives
  ``down_lin(g * up_lin(n_j))`` per part;
* plain MLPs (GPT-2, GPT-J, GPT-NeoX): ``down(act(z))`` with the ratio ``alpha = act(z) / z`` frozen at
  ``z = fc(x)`` gives ``down_lin(alpha * fc_lin(n_j))`` per part;

plus a constant (norm bias, projection biases). The parts plus the constant sum exactly to the MLP's
output (Gemma: after its post-norm, linearised with the scale frozen). The amplification of part ``j``
is ``<m_j, c_j> / |c_j|^2``: positive when the MLP adds more of the part (amplifies), negative when it
removes it (erases; below ``-1`` it reverses it). The remainder after removing every head's pushed-through
part is the MLP's own, head-independent write; its logit-lens rank of the answer measures "function
application".

Which submodules form the MLP comes from the adapter (:class:`factlab.models.adapters.base.MlpModules`);
a family without one (Mamba has no MLP) raises a clear error.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from torch.func import functional_call

from factlab.confidence import mean_ci
from factlab.mechanisms._common import MechanismError, answer_token, decode_rank, freeze_norm, short_repr
from factlab.mechanisms.contributions import decompose
from factlab.models.adapters.base import MlpModules
from factlab.models.loading import LoadedModel


def _spec(lm: LoadedModel) -> MlpModules:
    sp = lm.adapter.mlp
    if sp is None:
        fam = lm.adapter.family
        raise MechanismError(f"the {fam} family has no MLP to decompose (Mamba's mixers are not MLPs)" if fam == "mamba" else f"no MLP decomposition for the {fam} family")
    return sp


def _f64(module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``module(x)`` with its parameters in float64 (same module code, so Conv1D orientation is its own)."""
    params = {k: v.detach().double().to(x.device) for k, v in module.named_parameters()}
    return functional_call(module, params, (x,))


@dataclass
class MlpDecomposition:
    """``parts`` ``(B, J, d)``: the MLP output caused by each input part (names in ``names``, residual
    vectors of the inputs in ``inputs`` ``(B, J, d)``); ``const`` ``(B, d)``; ``actual`` ``(B, d)``: the
    MLP's residual contribution. ``parts.sum(1) + const == actual`` (``error``)."""

    layer: int
    names: list[str]
    kinds: list[str]
    inputs: torch.Tensor
    parts: torch.Tensor
    const: torch.Tensor
    actual: torch.Tensor

    def __repr__(self) -> str:
        return short_repr(self, layer=self.layer, parts=self.names, inputs=self.inputs, error=self.error)

    @property
    def error(self) -> float:
        return float((self.parts.sum(1) + self.const - self.actual).abs().max())

    def amplification(self) -> torch.Tensor:
        """``(B, J)`` ``<m_j, c_j> / |c_j|^2``."""
        return (self.parts * self.inputs).sum(-1) / (self.inputs.pow(2).sum(-1).clamp_min(1e-30))

    def remainder(self, kinds: Sequence[str] = ("head",)) -> torch.Tensor:
        """``(B, d)`` MLP output minus the parts caused by inputs of ``kinds``."""
        idx = [j for j, k in enumerate(self.kinds) if k in kinds]
        return self.actual - self.parts[:, idx].sum(1)


@torch.no_grad()
def decompose_mlp(lm: LoadedModel, prompts: Sequence[str], layer: int) -> MlpDecomposition:
    """Decompose the MLP at ``layer`` at each prompt's last token (see module docstring)."""
    sp = _spec(lm)
    if not 0 <= layer < lm.adapter.n_layers:
        raise MechanismError(f"layer {layer} is outside this model's layers 0..{lm.adapter.n_layers - 1}")
    dec = decompose(lm, prompts)
    block = lm.adapter.layers(lm.model)[layer]
    up_idx = [
        c for c, (k, l) in enumerate(zip(dec.kinds, dec.layers))
        if l < layer or (l == layer and k in ("head", "attn_bias") and not sp.parallel)
    ]
    inputs = dec.vectors[:, up_idx]  # (B, J, d)
    x = inputs.sum(1)
    norm = block.get_submodule(sp.norm)
    fz = freeze_norm(norm, x.to(lm.dtype))
    n_parts = fz.linear(inputs, scale=fz.scale[:, None])
    n_full = n_parts.sum(1) + fz.bias
    up, down, act = block.get_submodule(sp.up), block.get_submodule(sp.down), block.get_submodule(sp.act)
    zero_in = torch.zeros(1, n_full.shape[-1], dtype=torch.float64, device=n_full.device)
    up0 = _f64(up, zero_in)[0]
    z = _f64(up, n_full)  # (B, d_mlp)
    if sp.gate is not None:
        mult = act(_f64(block.get_submodule(sp.gate), n_full))  # frozen gate activation
        act_out = mult * z
    else:
        a = act(z)
        mult = torch.where(z.abs() > 1e-12, a / torch.where(z.abs() > 1e-12, z, torch.ones_like(z)), torch.zeros_like(z))
        act_out = mult * z
    d0 = _f64(down, torch.zeros(1, act_out.shape[-1], dtype=torch.float64, device=z.device))[0]
    up_parts = _f64(up, n_parts) - up0  # (B, J, d_mlp)
    m = _f64(down, mult[:, None] * up_parts) - d0
    const = _f64(down, mult * _f64(up, fz.bias.expand_as(n_full)))
    actual_mlp = _f64(down, act_out)
    pm = getattr(lm.adapter, "post_mlp_norm", None)
    post = pm(lm.model, layer) if pm is not None else None
    if post is not None:
        fzp = freeze_norm(post, actual_mlp.to(lm.dtype))
        m = fzp.linear(m, scale=fzp.scale[:, None])
        const = fzp.linear(const) + fzp.bias
    actual = dec.vectors[:, dec.names.index(f"L{layer}.mlp")]
    return MlpDecomposition(layer, [dec.names[c] for c in up_idx], [dec.kinds[c] for c in up_idx], inputs, m, const, actual)


def mlp_decomposition_summary(lm: LoadedModel, cases, heads: Sequence[tuple[int, int]], *, batch_size: int = 16, top: int = 5) -> dict[str, object]:
    """For the MLP of each layer holding one of ``heads``: the amplification of those heads, the most
    amplified/erased heads overall, and the answer's lens rank in the MLP output vs its remainder."""
    out: dict[str, object] = {"frozen": "pre-MLP norm scale and activation pattern frozen at the actual input", "layers": []}
    for layer in sorted({l for l, _ in heads}):
        amps, errs, r_full, r_rem, r_heads = [], [], [], [], []
        names: list[str] = []
        for s in range(0, len(cases), batch_size):
            chunk = cases[s : s + batch_size]
            md = decompose_mlp(lm, [c.prompt for c in chunk], layer)
            names = md.names
            amps.append(md.amplification().cpu().numpy())
            errs.append(md.error)
            ids = torch.tensor([answer_token(lm, c.prompt, c.answer).token_id for c in chunk])
            r_full.append(decode_rank(lm, md.actual, ids).cpu().numpy())
            r_rem.append(decode_rank(lm, md.remainder(), ids).cpu().numpy())
            hidx = [j for j, k in enumerate(md.kinds) if k == "head"]
            r_heads.append(decode_rank(lm, md.parts[:, hidx].sum(1), ids).cpu().numpy())
        A = np.concatenate(amps)
        mean_a = A.mean(0)
        head_cols = [j for j, n in enumerate(names) if n.startswith("L")and ".H" in n]
        order = sorted(head_cols, key=lambda j: -mean_a[j])
        out["layers"].append({
            "layer": layer,
            "n": int(A.shape[0]),
            "max_sum_error": max(errs),
            "argument_heads": {f"L{l}.H{h}": mean_ci(A[:, names.index(f"L{l}.H{h}")]).to_dict() for l, h in heads if f"L{l}.H{h}" in names},
            "most_amplified": [{"part": names[j], "amplification": mean_ci(A[:, j]).to_dict()} for j in order[:top]],
            "most_erased": [{"part": names[j], "amplification": mean_ci(A[:, j]).to_dict()} for j in order[::-1][:top]],
            "answer_rank_median": {
                "mlp_output": float(np.median(np.concatenate(r_full))),
                "remainder_without_heads": float(np.median(np.concatenate(r_rem))),
                "heads_pushed_through": float(np.median(np.concatenate(r_heads))),
            },
        })
    return out
