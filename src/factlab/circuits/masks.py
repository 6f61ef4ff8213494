"""Weight masks over a model's parameters: classification, sampling, functional masking, baselines.

A *weight mask* keeps or drops every entry of the chosen parameter tensors. Masks are applied
without copying or mutating the model: :func:`masked_params` returns ``{name: W * M}`` and the
caller runs the model with :func:`torch.func.functional_call` (no hooks, no parametrisation).

Memory (float32, ``N`` = number of masked entries): the model itself, plus during mask training
4N bytes of mask logits, 8N of Adam state, 4N of gradient and about 12N of per-step temporaries
(sampled mask, masked weights kept for backward) -- roughly 28N bytes, i.e. ~3 GB for the 106 M
block weights of SmolLM2-135M. A saved mask is N/8 bytes (bit-packed).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterable, Literal, Mapping

import torch
from torch import nn

from factlab.errors import FactlabError

#: parameter types a mask can cover
PARAM_TYPES: tuple[str, ...] = ("attn", "mlp", "mixer", "norm", "final_norm", "embed", "other")
#: what the paper masks (every block weight and bias, LayerNorms included; no embeddings, no final norm)
DEFAULT_TYPES: tuple[str, ...] = ("attn", "mlp", "mixer", "norm")

Estimator = Literal["gumbel", "hard-concrete", "sigmoid", "topk"]


class MaskError(FactlabError, ValueError):
    """A mask does not fit the model, has a bad density, or is malformed."""


def check_density(density: float) -> float:
    """Raise :class:`MaskError` unless ``0 < density < 1``."""
    if not (isinstance(density, (int, float)) and 0.0 < float(density) < 1.0) or math.isnan(float(density)):
        raise MaskError(f"density must be strictly between 0 and 1, got {density!r}")
    return float(density)


def _is_norm(module: nn.Module) -> bool:
    return isinstance(module, (nn.LayerNorm, nn.GroupNorm)) or type(module).__name__.endswith("Norm")


def classify_parameters(lm) -> dict[str, str]:
    """Map every (deduplicated) parameter name of ``lm.model`` to one of :data:`PARAM_TYPES`.

    Derived from the adapter's module paths only: the attention module of layer ``i`` is the module of
    site ``layer.{i}.attn.out``, the MLP that of ``layer.{i}.mlp.out`` (Mamba: ``layer.{i}.mixer.out``),
    norms are modules whose class name ends in ``Norm`` (inside a layer: ``norm``; outside: ``final_norm``),
    embeddings are ``nn.Embedding`` modules outside the layers. Norms are checked first, so a norm inside
    an attention module (Gemma 3's ``q_norm``) counts as ``norm``.
    """
    ad, model = lm.adapter, lm.model
    roots: dict[str, str] = {}
    for i in range(ad.n_layers):
        for suffix, kind in (("attn.out", "attn"), ("mlp.out", "mlp"), ("mixer.out", "mixer")):
            if suffix in ad.layer_sites:
                roots[ad.site(f"layer.{i}.{suffix}").module] = kind
    modules = dict(model.named_modules())
    layers_prefix = ad.layers_path + "."
    out: dict[str, str] = {}
    for name, _ in model.named_parameters():
        path = name.rsplit(".", 1)[0] if "." in name else ""
        mod = modules.get(path)
        if mod is not None and _is_norm(mod):
            out[name] = "norm" if name.startswith(layers_prefix) else "final_norm"
            continue
        kind = next((k for root, k in roots.items() if path == root or path.startswith(root + ".")), None)
        if kind is not None:
            out[name] = kind
        elif mod is not None and isinstance(mod, nn.Embedding):
            out[name] = "embed"
        else:
            out[name] = "other"
    return out


def select_parameters(lm, types: Iterable[str] = DEFAULT_TYPES) -> dict[str, str]:
    """``{name: type}`` of the parameters whose type is in ``types`` (in model order)."""
    types = tuple(types)
    bad = [t for t in types if t not in PARAM_TYPES]
    if bad:
        raise MaskError(f"unknown parameter type(s) {bad}; choose from {', '.join(PARAM_TYPES)}")
    chosen = {n: t for n, t in classify_parameters(lm).items() if t in types}
    if not chosen:
        raise MaskError(f"no parameters of type {list(types)} in {lm.name}")
    return chosen


@dataclass
class WeightMask:
    """A binary mask over some of a model's parameters.

    Attributes:
        masks: ``{param_name: bool tensor shaped like the parameter}`` (True = kept, in the circuit).
        types: ``{param_name: parameter type}`` (see :data:`PARAM_TYPES`).
        model_id: the exact model the mask belongs to (``LoadedModel.model_id``).
        metadata: free JSON-able facts (task, density target, training steps, ...).
    """

    masks: dict[str, torch.Tensor]
    types: dict[str, str]
    model_id: str
    metadata: dict = field(default_factory=dict)

    # ---------------------------------------------------------------- counts
    @property
    def n_total(self) -> int:
        return sum(m.numel() for m in self.masks.values())

    @property
    def n_kept(self) -> int:
        return sum(int(m.sum()) for m in self.masks.values())

    @property
    def density(self) -> float:
        """Fraction of masked entries kept."""
        return self.n_kept / max(self.n_total, 1)

    def counts_by_type(self) -> dict[str, tuple[int, int]]:
        """``{type: (kept, total)}``."""
        out: dict[str, list[int]] = {}
        for n, m in self.masks.items():
            c = out.setdefault(self.types[n], [0, 0])
            c[0] += int(m.sum())
            c[1] += m.numel()
        return {t: (k, n) for t, (k, n) in out.items()}

    # ----------------------------------------------------------- operations
    def complement(self) -> WeightMask:
        """The mask keeping exactly the entries this one drops (same parameters)."""
        return WeightMask({n: ~m for n, m in self.masks.items()}, dict(self.types), self.model_id,
                          {**self.metadata, "complement_of": self.metadata.get("name", "mask")})

    def fingerprint(self) -> str:
        """A short hash of the model id, parameter names and every bit (16 hex digits): equal iff the masks are."""
        import hashlib

        import numpy as np

        h = hashlib.sha256(self.model_id.encode())
        for n in sorted(self.masks):
            h.update(n.encode())
            h.update(np.packbits(self.masks[n].detach().cpu().bool().numpy().ravel()).tobytes())
        return h.hexdigest()[:16]

    def check_model(self, lm) -> None:
        """Refuse a mask saved for another model or whose shapes do not fit ``lm``."""
        if self.model_id != lm.model_id:
            raise MaskError(f"this mask was made for model {self.model_id!r} but the loaded model is {lm.model_id!r}; "
                            "load the model the mask was found on")
        params = dict(lm.model.named_parameters())
        for n, m in self.masks.items():
            if n not in params:
                raise MaskError(f"mask names parameter {n!r}, which {lm.name} does not have")
            if tuple(params[n].shape) != tuple(m.shape):
                raise MaskError(f"mask for {n} has shape {tuple(m.shape)} but the parameter is {tuple(params[n].shape)}")

    def to_dict(self) -> dict:
        """Summary (not the bits): density, counts per type, model id, metadata."""
        return {"model_id": self.model_id, "density": self.density, "n_kept": self.n_kept, "n_total": self.n_total,
                "by_type": {t: {"kept": k, "total": n} for t, (k, n) in self.counts_by_type().items()},
                "metadata": self.metadata}


def full_mask(lm, types: Iterable[str] = DEFAULT_TYPES) -> WeightMask:
    """All-ones mask (every entry kept) over the parameters of ``types``."""
    chosen = select_parameters(lm, types)
    params = dict(lm.model.named_parameters())
    return WeightMask({n: torch.ones_like(params[n], dtype=torch.bool) for n in chosen}, chosen, lm.model_id, {"name": "full"})


def random_mask(like: WeightMask, density: float, *, seed: int = 0, match: Literal["global", "per_tensor"] = "global") -> WeightMask:
    """A uniformly random mask over the same parameters as ``like`` with exactly the requested number kept.

    ``match="global"``: ``round(density * N)`` entries kept, spread over tensors in proportion to their size
    (largest-remainder rounding), each tensor's entries drawn uniformly. ``match="per_tensor"``: each tensor
    keeps as many entries as ``like`` does there (``density`` is then ignored; a make-up-matched baseline).
    This is a *true* random baseline, unlike the paper's ``random_5`` config (see the data README).
    """
    gen = torch.Generator().manual_seed(seed)
    names = list(like.masks)
    sizes = [like.masks[n].numel() for n in names]
    if match == "per_tensor":
        counts = [int(like.masks[n].sum()) for n in names]
    else:
        density = check_density(density)
        total = round(density * sum(sizes))
        exact = [density * s for s in sizes]
        counts = [int(math.floor(e)) for e in exact]
        rest = total - sum(counts)
        order = sorted(range(len(names)), key=lambda i: exact[i] - counts[i], reverse=True)
        for i in order[:rest]:
            counts[i] += 1
    out = {}
    for n, s, k in zip(names, sizes, counts):
        flat = torch.zeros(s, dtype=torch.bool)
        flat[torch.randperm(s, generator=gen)[:k]] = True
        out[n] = flat.view(like.masks[n].shape).to(like.masks[n].device)
    return WeightMask(out, dict(like.types), like.model_id, {"name": "random", "density": density if match == "global" else like.density,
                                                             "seed": seed, "match": match})


def masked_params(lm, masks: Mapping[str, torch.Tensor], weights: Mapping[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """``{name: W * M}`` for every masked parameter, for :func:`torch.func.functional_call`.

    ``masks`` may be bool or float (a differentiable relaxed mask). ``weights`` overrides the model's own
    values for some names (e.g. weights being fine-tuned). Multiplying by an all-ones mask returns ``W``
    bit for bit, so an all-ones mask reproduces the model's logits exactly.
    """
    params = dict(lm.model.named_parameters())
    out = {}
    for n, m in masks.items():
        w = weights[n] if weights is not None and n in weights else params[n]
        out[n] = w * (m.to(w.dtype) if m.dtype == torch.bool else m)
    return out


# ------------------------------------------------------------------ relaxations
def sample_mask(logits: torch.Tensor, *, estimator: Estimator = "gumbel", temperature: float = 1.0,
                generator: torch.Generator | None = None, training: bool = True) -> torch.Tensor:
    """A hard 0/1 mask (same shape as ``logits``) whose gradient flows to ``logits`` (straight-through).

    - ``gumbel`` (the paper's): ``s = sigmoid((l + log u - log(1-u)) / T)``, hard = ``s > 0.5``,
      returned as ``hard + s - s.detach()``.
    - ``hard-concrete`` (Louizos et al.): ``s`` stretched to (-0.1, 1.1) and clipped; hard = ``s > 0.5``.
    - ``sigmoid``: deterministic, hard = ``l > 0``, gradient of ``sigmoid(l / T)`` (no noise; cheapest).

    With ``training=False`` every estimator returns the deterministic hard mask ``l > 0`` (no gradient).
    """
    if not training:
        return (logits > 0).to(logits.dtype)
    if estimator == "sigmoid":
        soft = torch.sigmoid(logits / temperature)
        hard = (logits > 0).to(logits.dtype)
        return hard + (soft - soft.detach())  # exactly 0/1 in value
    u = torch.rand(logits.shape, generator=generator, device=logits.device, dtype=logits.dtype).clamp_(1e-6, 1 - 1e-6)
    noise = torch.log(u) - torch.log1p(-u)
    soft = torch.sigmoid((logits + noise) / temperature)
    if estimator == "hard-concrete":
        soft = (soft * 1.2 - 0.1).clamp(0.0, 1.0)
    elif estimator != "gumbel":
        raise MaskError(f"unknown estimator {estimator!r}; choose gumbel, hard-concrete or sigmoid")
    hard = (soft > 0.5).to(logits.dtype)
    return hard + (soft - soft.detach())  # exactly 0/1 in value


def _noise(logits: torch.Tensor, seed: int) -> torch.Tensor:
    gen = torch.Generator(device=logits.device).manual_seed(seed)
    u = torch.rand(logits.shape, generator=gen, device=logits.device, dtype=logits.dtype).clamp_(1e-6, 1 - 1e-6)
    return torch.log(u).sub_(torch.log1p(-u))


def _soft_and_slope(logits: torch.Tensor, estimator: str, temperature: float, seed: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(hard 0/1 mask, d soft / d logit) of one estimator, recomputable from ``seed``.

    ``topk``: hard = ``logits >= temperature`` (the caller's global threshold), slope 1 (returned as ``None``).
    """
    if estimator == "topk":
        return (logits >= temperature).to(logits.dtype), None
    if estimator == "sigmoid":
        s = torch.sigmoid(logits / temperature)
        return (logits > 0).to(logits.dtype), s.mul_(1 - s).div_(temperature)
    z = _noise(logits, seed).add_(logits).div_(temperature)
    s = torch.sigmoid(z)
    slope = s * (1 - s) / temperature
    if estimator == "hard-concrete":
        st = s * 1.2 - 0.1
        slope = slope * 1.2 * ((st > 0) & (st < 1)).to(slope.dtype)
        return (st > 0.5).to(logits.dtype), slope
    if estimator != "gumbel":
        raise MaskError(f"unknown estimator {estimator!r}; choose gumbel, hard-concrete or sigmoid")
    return (s > 0.5).to(logits.dtype), slope


class _MaskedWeight(torch.autograd.Function):
    """``W * hard(logits)`` with the straight-through gradient ``dL/dlogit = dL/dW' * W * dsoft/dlogit``.

    Saves only references to ``W`` and ``logits`` (the noise is regenerated from its seed in backward),
    so a step needs one weight-sized temporary per parameter instead of five.
    """

    @staticmethod
    def forward(ctx, weight, logits, estimator, temperature, seed):  # type: ignore[override]
        hard, _ = _soft_and_slope(logits.detach(), estimator, temperature, seed)
        ctx.save_for_backward(weight, logits)
        ctx.cfg = (estimator, temperature, seed)
        return weight * hard

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        weight, logits = ctx.saved_tensors
        hard, slope = _soft_and_slope(logits.detach(), *ctx.cfg)
        g_logits = None
        if ctx.needs_input_grad[1]:
            g_logits = grad * weight if slope is None else grad * weight * slope
        g_weight = grad * hard if ctx.needs_input_grad[0] else None
        return g_weight, g_logits, None, None, None


def masked_weight(weight: torch.Tensor, logits: torch.Tensor, *, estimator: Estimator = "gumbel",
                  temperature: float = 1.0, seed: int = 0, threshold: float | None = None) -> torch.Tensor:
    """Memory-lean ``weight * sample_mask(logits)`` (same value and gradient as :func:`sample_mask` with a
    generator seeded by ``seed``). ``estimator="topk"`` keeps entries with ``logits >= threshold`` and passes
    the gradient straight through (``dL/dlogit = dL/dW' * W``)."""
    if estimator == "topk":
        if threshold is None:
            raise MaskError("estimator 'topk' needs the global threshold; it is what schedule='anneal' "
                            "(--schedule anneal) uses, which computes the threshold each step")
        return _MaskedWeight.apply(weight, logits, estimator, float(threshold), seed)
    return _MaskedWeight.apply(weight, logits, estimator, temperature, seed)


def threshold_mask(logits: torch.Tensor, threshold: float | torch.Tensor) -> torch.Tensor:
    """Hard mask ``logits >= threshold`` (exactly 0/1 in value) with a straight-through gradient of slope 1."""
    hard = (logits >= threshold).to(logits.dtype)
    return hard + (logits - logits.detach())


def hard_mask(logits: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Deterministic bool masks ``logit > 0``."""
    return {n: (l > 0) for n, l in logits.items()}


def mask_memory_bytes(n_entries: int, *, training: bool = True) -> int:
    """Approximate extra memory of a weight mask over ``n_entries`` float32 entries (see module docstring)."""
    return 28 * n_entries if training else n_entries // 8 + 1
