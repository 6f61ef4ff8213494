"""The adapter contract: canonical site names mapped onto one architecture family's modules.

A *site* is a named place in the forward pass whose value can be read or replaced:

============================  ==========================================================  =======================
site                          value                                                        shape
============================  ==========================================================  =======================
``embed``                     token-embedding output (before position embeddings/scale     (B, T, d)
                              are added for GPT-2; Gemma's scale is inside the module)
``layer.{i}.resid``           block ``i`` output (residual stream after the block)          (B, T, d)
``layer.{i}.attn.out``        attention module output (after its output projection)         (B, T, d)
``layer.{i}.attn.heads``      per-head attention output before the output projection        (B, T, H, d_head)
``layer.{i}.mlp.out``         MLP module output (after its output projection)              (B, T, d)
``layer.{i}.mlp.key``         input of the MLP output projection (what ROME/MEMIT rewrite)  (B, T, d_ff)
``layer.{i}.mixer.in``        Mamba: normalised input of the mixer (input of ``in_proj``)   (B, T, d)
``layer.{i}.ssm.in``          Mamba: SSM-input half of ``in_proj``'s output, before conv    (B, T, d_inner)
``layer.{i}.gate.in``         Mamba: gate half of ``in_proj``'s output, before SiLU         (B, T, d_inner)
``layer.{i}.conv.out``        Mamba: causal conv output after SiLU (what enters the scan)   (B, T, d_inner)
``layer.{i}.ssm.out``         Mamba: selective-scan output incl. ``D`` skip, before gating  (B, T, d_inner)
``layer.{i}.gate``            Mamba: SiLU(gate branch)                                       (B, T, d_inner)
``layer.{i}.mixer.key``       Mamba: ``ssm.out * gate``, the input of ``out_proj``          (B, T, d_inner)
``layer.{i}.mixer.out``       Mamba: mixer output (``out_proj``'s output)                   (B, T, d)
``final_norm``                output of the final norm                                      (B, T, d)
``logits``                    unembedding output                                            (B, T, V)
============================  ==========================================================  =======================

Gemma 3 normalises attention and MLP outputs again before adding them to the residual
(``post_attention_layernorm``, ``post_feedforward_layernorm``); its ``attn.out``/``mlp.out`` are
the module outputs, before those norms, so that ``mlp.key @ W.T == mlp.out`` holds for every family.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from factlab.errors import SiteError

HookKind = Literal["output", "input"]

_LAYER_SITE = re.compile(r"^layer\.(\d+)\.(.+)$")


@dataclass(frozen=True)
class SiteSpec:
    """Where a site lives: a module path and whether its value is the module's input or output.

    ``heads``: when set, the value is viewed as ``(..., heads, d_head)`` (the module's tensor has the
    heads flattened into its last dimension).
    """

    module: str
    hook: HookKind = "output"
    heads: int | None = None


#: families whose dynamic KV cache is exact (Gemma 3's sliding-window cache and Mamba have none of this kind)
KV_CACHE_FAMILIES = frozenset({"gpt2", "gptj", "gpt_neox", "llama", "mistral", "qwen2", "qwen3"})


@dataclass(frozen=True)
class MlpModules:
    """The submodules of one block's MLP, as paths relative to the block (for exact linear analyses).

    ``norm``: the pre-MLP norm; ``up``/``down``: the input and output projections; ``act``: the
    activation module; ``gate``: the gate projection of a gated MLP (``down(act(gate(x)) * up(x))``),
    ``None`` for a plain one (``down(act(up(x)))``); ``parallel``: the MLP reads the block's input (GPT-J,
    GPT-NeoX's parallel residual), not the residual after this block's attention.
    """

    norm: str
    up: str
    act: str
    down: str
    gate: str | None = None
    parallel: bool = False


@dataclass(frozen=True)
class Projection:
    """A linear map inside a layer that an editor may rewrite, in a fixed orientation.

    ``weight(model)`` is always ``(d_out, d_in)`` so that ``out = key @ weight.T (+ bias)`` where
    ``key`` is the value of ``key_site`` and ``out`` the value of ``out_site``. GPT-2's ``Conv1D`` stores
    its weight as ``(d_in, d_out)``: ``transposed`` says so and ``weight`` returns the transpose view.
    ``rows`` selects a block of output rows (Mamba's ``in_proj`` halves).
    """

    name: str
    layer: int
    module: str
    key_site: str
    out_site: str | None
    transposed: bool = False
    rows: tuple[int, int] | None = None

    def parameter(self, model: nn.Module) -> nn.Parameter:
        """The stored weight parameter (in its own storage orientation)."""
        return model.get_submodule(self.module).weight

    def weight(self, model: nn.Module) -> torch.Tensor:
        """The weight as a ``(d_out, d_in)`` view of the stored parameter (shares storage)."""
        w = self.parameter(model)
        w = w.T if self.transposed else w
        if self.rows is not None:
            w = w[self.rows[0] : self.rows[1]]
        return w

    def bias(self, model: nn.Module) -> torch.Tensor | None:
        b = getattr(model.get_submodule(self.module), "bias", None)
        if b is None:
            return None
        return b if self.rows is None else b[self.rows[0] : self.rows[1]]

    def delta_to_parameter(self, model: nn.Module, delta: torch.Tensor) -> torch.Tensor:
        """Turn a ``(d_out, d_in)`` delta into a tensor shaped, oriented and typed like the stored weight."""
        p = self.parameter(model)
        if self.rows is not None:
            full = torch.zeros(p.shape[0] if not self.transposed else p.shape[1], delta.shape[1], dtype=delta.dtype, device=delta.device)
            full[self.rows[0] : self.rows[1]] = delta
            delta = full
        if self.transposed:
            delta = delta.T
        if delta.shape != p.shape:
            raise ValueError(f"delta of shape {tuple(delta.shape)} does not fit {self.module}.weight {tuple(p.shape)}")
        return delta.to(device=p.device, dtype=p.dtype).contiguous()


@dataclass
class Adapter:
    """Maps canonical sites of one architecture family onto a concrete HF model.

    Instances are created by :func:`factlab.models.adapters.adapter_for` from the model's config class.
    Subclasses set the module paths; nothing outside ``models/`` needs to know them.
    """

    config: object
    family: str = ""
    n_layers: int = 0
    d_model: int = 0
    vocab_size: int = 0
    n_heads: int | None = None
    n_kv_heads: int | None = None
    d_head: int | None = None
    d_mlp: int | None = None
    #: per-layer site suffix -> (module path relative to the layer, hook kind, heads)
    layer_sites: dict[str, SiteSpec] = field(default_factory=dict)
    #: top-level sites
    global_sites: dict[str, SiteSpec] = field(default_factory=dict)
    layers_path: str = ""
    #: projection name -> (module path relative to the layer, key-site suffix, out-site suffix, transposed)
    projections: dict[str, tuple[str, str, str | None, bool, tuple[int, int] | None]] = field(default_factory=dict)
    default_projection: str = "mlp"
    final_norm_path: str = ""
    unembed_path: str = "lm_head"
    #: trace kinds (user-facing names) -> site suffix
    trace_kinds: dict[str, str] = field(default_factory=dict)
    #: whether the model's forward takes ``position_ids`` (Mamba's does not)
    uses_position_ids: bool = True
    #: the MLP's submodules (``None``: the family has no MLP, e.g. Mamba)
    mlp: MlpModules | None = None

    # ------------------------------------------------------------------ sites
    @property
    def exact_kv_cache(self) -> bool:
        """Whether HF's KV cache reproduces this family's full forward exactly, so a fast path may feed only
        the positions that can change and read the others' keys/values from a cache (checked in tests)."""
        return self.family in KV_CACHE_FAMILIES

    @property
    def has_attention(self) -> bool:
        """Whether the family has attention heads (False for Mamba)."""
        return "attn.out" in self.layer_sites

    def sites(self) -> list[str]:
        """Every valid site name of this model, in forward order."""
        names = [s for s in self.global_sites if s in ("embed",)]
        for i in range(self.n_layers):
            names += [f"layer.{i}.{suffix}" for suffix in self.layer_sites]
        names += [s for s in self.global_sites if s not in ("embed",)]
        return names

    def site(self, name: str) -> SiteSpec:
        """Resolve a site name to its module and hook kind; raises :class:`SiteError` with the valid names."""
        if name in self.global_sites:
            return self.global_sites[name]
        m = _LAYER_SITE.match(name)
        if m:
            layer, suffix = int(m.group(1)), m.group(2)
            if suffix in self.layer_sites:
                if not 0 <= layer < self.n_layers:
                    raise SiteError(f"site {name!r}: layer {layer} is outside this model's layers 0..{self.n_layers - 1}")
                spec = self.layer_sites[suffix]
                return SiteSpec(f"{self.layers_path}.{layer}{'.' + spec.module if spec.module else ''}", spec.hook, spec.heads)
        raise SiteError(
            f"unknown site {name!r} for the {self.family} family; valid sites are "
            f"{', '.join(self.global_sites)} and layer.{{i}}.<{'|'.join(self.layer_sites)}> for i in 0..{self.n_layers - 1}"
        )

    def layer_site(self, layer: int, suffix: str) -> str:
        """The full site name ``layer.{layer}.{suffix}`` after checking it exists."""
        name = f"layer.{layer}.{suffix}"
        self.site(name)
        return name

    def trace_site(self, kind: str, layer: int) -> str:
        """The site a causal trace of ``kind`` restores at ``layer`` (e.g. ``mlp`` -> ``layer.3.mlp.out``)."""
        if kind not in self.trace_kinds:
            raise SiteError(f"kind {kind!r} does not exist for the {self.family} family; its kinds are: {', '.join(self.trace_kinds)}")
        return f"layer.{layer}.{self.trace_kinds[kind]}"

    # ------------------------------------------------------------ projections
    def projection(self, layer: int, name: str | None = None) -> Projection:
        """The editable linear map ``name`` (default: the family's ROME/MEMIT target) at ``layer``."""
        name = name or self.default_projection
        if name not in self.projections:
            raise SiteError(f"projection {name!r} does not exist for the {self.family} family; choose one of: {', '.join(self.projections)}")
        if not 0 <= layer < self.n_layers:
            raise SiteError(f"layer {layer} is outside this model's layers 0..{self.n_layers - 1}")
        rel, key, out, transposed, rows = self.projections[name]
        return Projection(
            name=name,
            layer=layer,
            module=f"{self.layers_path}.{layer}.{rel}",
            key_site=f"layer.{layer}.{key}",
            out_site=None if out is None else f"layer.{layer}.{out}",
            transposed=transposed,
            rows=rows,
        )

    # ---------------------------------------------------------------- modules
    def layers(self, model: nn.Module) -> nn.ModuleList:
        """The model's list of blocks."""
        return model.get_submodule(self.layers_path)

    def embedding(self, model: nn.Module) -> nn.Module:
        return model.get_submodule(self.global_sites["embed"].module)

    def final_norm(self, model: nn.Module) -> nn.Module:
        return model.get_submodule(self.final_norm_path)

    def unembed(self, model: nn.Module) -> nn.Module:
        return model.get_submodule(self.unembed_path)

    def unembed_weight(self, model: nn.Module) -> torch.Tensor:
        """Unembedding matrix ``(V, d)``: logits = final_norm(h) @ W.T (+ bias)."""
        return self.unembed(model).weight

    def unembed_bias(self, model: nn.Module) -> torch.Tensor | None:
        return getattr(self.unembed(model), "bias", None)

    def logits_from_resid(self, model: nn.Module, resid: torch.Tensor) -> torch.Tensor:
        """Logits from residual-stream states ``(..., d)`` through the model's own final norm and unembedding
        (the logit lens); includes any final logit soft-capping the family applies."""
        return self.unembed(model)(self.final_norm(model)(resid))

    def prepare(self, model: nn.Module) -> None:
        """Make every site hookable (no-op for most families; Mamba exposes its internal states)."""

    def describe(self) -> dict[str, object]:
        """A JSON-friendly summary of the architecture and its sites."""
        return {
            "family": self.family,
            "n_layers": self.n_layers,
            "d_model": self.d_model,
            "n_heads": self.n_heads,
            "n_kv_heads": self.n_kv_heads,
            "d_head": self.d_head,
            "d_mlp": self.d_mlp,
            "vocab_size": self.vocab_size,
            "global_sites": list(self.global_sites),
            "layer_sites": list(self.layer_sites),
            "projections": list(self.projections),
            "default_projection": self.default_projection,
            "trace_kinds": list(self.trace_kinds),
        }
