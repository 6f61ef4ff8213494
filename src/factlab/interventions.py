"""Read and write named sites during forward passes. The only module that registers hooks.

Everything is a context manager whose hooks are removed on exit, also on exceptions::

    with capture(lm, ["layer.3.resid", "layer.3.mlp.key"], positions=[-1]) as acts:
        lm.forward(batch)
    acts["layer.3.resid"]                      # (B, 1, d)

    with patch(lm, {"layer.3.mlp.out": lambda v: v * 0}):
        logits = lm.forward(batch)

Values are in the site's canonical shape (``(B, T, ...)``; ``attn.heads`` is ``(B, T, H, d_head)``).
``positions`` selects token positions of the *padded* batch: an int, a list of ints (negative ones count
from the end), or a ``(B, P)`` LongTensor of per-row positions. Hooks work on models sharded with
``device_map``: values are read and written on the device of the module that produces them.
"""

from __future__ import annotations

import inspect
import sys
import types
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, Mapping, Sequence, Union

import torch
from torch import nn

from factlab.errors import InputError
from factlab.models.adapters.base import SiteSpec
from factlab.models.loading import LoadedModel
from factlab.prompts import Batch

Positions = Union[int, Sequence[int], torch.Tensor, None]
PatchValue = Union[torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]


class StopForward(Exception):
    """Raised inside a forward pass to stop it once every needed site has been captured."""


class PositionError(InputError, IndexError):
    """Positions outside the sequence, or per-row positions for another batch size."""


class PatchShapeError(InputError):
    """A patch value does not fit the site it replaces (the message names the site and both shapes)."""


# --------------------------------------------------------------------------- positions
def _index(value: torch.Tensor, positions: Positions) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(row index, position index) tensors selecting ``positions`` of a (B, T, ...) value, or None for all."""
    if positions is None:
        return None
    B, T = value.shape[0], value.shape[1]
    dev = value.device
    if isinstance(positions, torch.Tensor) and positions.dim() == 2:
        pos = positions.to(dev)
        if pos.shape[0] != B:
            raise PositionError(f"per-row positions have {pos.shape[0]} rows but the batch has {B}")
    else:
        p = torch.as_tensor([positions] if isinstance(positions, int) else list(positions), dtype=torch.long, device=dev)
        pos = p.unsqueeze(0).expand(B, -1)
    pos = torch.where(pos < 0, pos + T, pos)
    if (pos < 0).any() or (pos >= T).any():
        raise PositionError(f"positions {positions} are outside the sequence of length {T}")
    rows = torch.arange(B, device=dev).unsqueeze(1).expand_as(pos)
    return rows, pos


def select(value: torch.Tensor, positions: Positions) -> torch.Tensor:
    """The ``(B, P, ...)`` slice of a ``(B, T, ...)`` site value at ``positions`` (all positions if None)."""
    idx = _index(value, positions)
    return value if idx is None else value[idx[0], idx[1]]


def target_shape(value: torch.Tensor, positions: Positions) -> tuple[int, ...]:
    """The shape a replacement of ``value`` ``(B, T, ...)`` at ``positions`` has: ``(B, P, ...)``, or ``(B, T, ...)``
    for all positions."""
    idx = _index(value, positions)
    return tuple(value.shape) if idx is None else (*idx[0].shape, *value.shape[2:])


def _fits(given: Sequence[int], target: Sequence[int]) -> bool:
    """Whether a tensor of shape ``given`` broadcasts to exactly ``target``."""
    try:
        return tuple(torch.broadcast_shapes(tuple(given), tuple(target))) == tuple(target)
    except RuntimeError:
        return False


def check_patch(site: str, given: Sequence[int], target: Sequence[int]) -> None:
    """:class:`PatchShapeError` naming ``site`` unless a value of shape ``given`` can replace one of ``target``."""
    if not _fits(given, target):
        raise PatchShapeError(
            f"the patch of {site!r} has shape {tuple(given)}, which does not fit the site's value {tuple(target)} "
            "(B, positions, ...); give a tensor of that shape or one that broadcasts to it"
        )


def write(value: torch.Tensor, new: torch.Tensor, positions: Positions) -> torch.Tensor:
    """A copy of ``value`` with ``new`` written at ``positions`` (autograd-friendly, not in place)."""
    idx = _index(value, positions)
    new = new.to(device=value.device, dtype=value.dtype)
    if idx is None:
        return new.expand_as(value).clone() if new.shape != value.shape else new
    out = value.clone()
    out[idx[0], idx[1]] = new.expand_as(out[idx[0], idx[1]])
    return out


# --------------------------------------------------------------------------- raw hooks
def _to_site(raw: torch.Tensor, spec: SiteSpec) -> torch.Tensor:
    return raw.unflatten(-1, (spec.heads, -1)) if spec.heads else raw


def _from_site(value: torch.Tensor, spec: SiteSpec) -> torch.Tensor:
    return value.flatten(-2) if spec.heads else value


def _register(module: nn.Module, spec: SiteSpec, fn: Callable[[torch.Tensor], torch.Tensor | None]):
    """Register a hook calling ``fn(site_value)``; a returned tensor replaces the value."""
    if spec.hook == "output":

        def hook(mod, args, output):
            raw = output[0] if isinstance(output, tuple) else output
            new = fn(_to_site(raw, spec))
            if new is None:
                return None
            new = _from_site(new, spec)
            return (new,) + tuple(output[1:]) if isinstance(output, tuple) else new

        return module.register_forward_hook(hook)

    def pre_hook(mod, args, kwargs):
        if args:
            raw, rest = args[0], args[1:]
        else:
            key = next(k for k in ("hidden_states", "input", "x") if k in kwargs)
            raw = kwargs[key]
        new = fn(_to_site(raw, spec))
        if new is None:
            return None
        new = _from_site(new, spec)
        if args:
            return (new,) + tuple(rest), kwargs
        return args, {**kwargs, key: new}

    return module.register_forward_pre_hook(pre_hook, with_kwargs=True)


@contextmanager
def hooks(lm: LoadedModel, fns: Mapping[str, Callable[[torch.Tensor], torch.Tensor | None]]) -> Iterator[None]:
    """Call ``fns[site](value)`` whenever a site is computed; a returned tensor replaces the value.

    The general form behind :func:`capture` and :func:`patch`; several functions for one site may be
    given by nesting contexts (they run in the order they were entered).
    """
    handles = []
    try:
        for site, fn in fns.items():
            spec = lm.adapter.site(site)
            handles.append(_register(lm.model.get_submodule(spec.module), spec, fn))
        yield
    finally:
        for h in handles:
            h.remove()


# --------------------------------------------------------------------------- capture / patch
class Captured(dict):
    """Site name -> captured tensor; filled during the forward passes run inside :func:`capture`."""


@contextmanager
def capture(
    lm: LoadedModel,
    sites: Iterable[str],
    *,
    positions: Positions = None,
    detach: bool = True,
    stop: bool = False,
) -> Iterator[Captured]:
    """Record each site's value (at ``positions``) during forward passes inside the context.

    Each pass overwrites the previous values. ``detach=False`` keeps the autograd graph. ``stop=True``
    raises :class:`StopForward` once every site has been seen, so callers that only need activations
    (statistics) skip the rest of the network; use :func:`run_and_capture`, which catches it.
    """
    sites = list(dict.fromkeys(sites))
    out = Captured()
    seen: set[str] = set()

    def make(site: str):
        def fn(value: torch.Tensor):
            v = select(value, positions)
            out[site] = v.detach() if detach else v
            seen.add(site)
            if stop and len(seen) == len(sites):
                seen.clear()
                raise StopForward
            return None

        return fn

    with hooks(lm, {s: make(s) for s in sites}):
        yield out


@contextmanager
def patch(lm: LoadedModel, patches: Mapping[str, PatchValue], *, positions: Positions = None) -> Iterator[None]:
    """Replace site values during forward passes inside the context.

    A tensor value is written at ``positions`` (shape ``(B, P, ...)`` or broadcastable to it; the whole
    ``(B, T, ...)`` value when ``positions`` is None). A callable gets the current ``(B, T, ...)`` value and
    returns the replacement (``positions`` is then ignored: select inside the function).

    A value that does not fit its site raises :class:`PatchShapeError` (naming the site, its shape and the
    value's) when the site is first computed, before the model uses it; the hooks are removed as always.
    """

    def make(site: str, value: PatchValue):
        if callable(value):

            def call(cur: torch.Tensor) -> torch.Tensor:
                new = value(cur)
                if isinstance(new, torch.Tensor):
                    check_patch(site, new.shape, cur.shape)
                return new

            return call

        if not isinstance(value, torch.Tensor):
            raise PatchShapeError(f"the patch of {site!r} is a {type(value).__name__}; give a tensor or a function of the site's value")

        def put(cur: torch.Tensor) -> torch.Tensor:
            check_patch(site, value.shape, target_shape(cur, positions))
            return write(cur, value, positions)

        return put

    with hooks(lm, {s: make(s, v) for s, v in patches.items()}):
        yield


def run_and_capture(
    lm: LoadedModel, batch: Batch, sites: Iterable[str], *, positions: Positions = None, stop_early: bool = True
) -> Captured:
    """One forward pass recording ``sites``; with ``stop_early`` the pass stops once all are captured."""
    with torch.no_grad(), capture(lm, sites, positions=positions, stop=stop_early) as acts:
        try:
            lm.forward(batch)
        except StopForward:
            pass
    return acts


# --------------------------------------------------------------------------- resume
class _Skip(nn.Module):
    """Stands in for a block below the resume layer: returns its input unchanged (no computation)."""

    def __init__(self, as_tuple: bool):
        super().__init__()
        self.as_tuple = as_tuple

    def forward(self, hidden_states, *args, **kwargs):
        return (hidden_states,) if self.as_tuple else hidden_states


def _block_returns_tuple(block: nn.Module) -> bool:
    """Whether a GPT-J block's forward returns a tuple (before transformers 5.24) rather than a tensor, read
    from its return annotation so that the pass-through stand-in returns the same kind. (GPT-J's annotation
    follows the change; other families' annotations do not always say what they return.)"""
    ann = inspect.signature(type(block).forward).return_annotation
    return ann is not inspect.Signature.empty and "tuple" in str(ann).lower()


@contextmanager
def resume_from(lm: LoadedModel, layer: int, hidden: torch.Tensor) -> Iterator[None]:
    """Run only blocks ``layer..L-1``, feeding ``hidden`` ``(B, T, d)`` as the input of block ``layer``.

    Blocks below ``layer`` are swapped for pass-through stand-ins for the duration of the context, so a
    forward pass costs only the upper blocks (plus the embedding lookup). ``hidden`` is the residual
    stream entering block ``layer`` (``layer.{layer-1}.resid``, or ``embed`` plus position embeddings).
    """
    blocks = lm.adapter.layers(lm.model)
    if not 0 <= layer < len(blocks):
        raise IndexError(f"layer {layer} is outside 0..{len(blocks) - 1}")
    as_tuple = lm.adapter.family == "gptj" and _block_returns_tuple(blocks[0])
    originals = [blocks[i] for i in range(layer)]
    target = blocks[layer]

    def pre(mod, args, kwargs):
        if args:
            return (hidden.to(args[0].device, args[0].dtype),) + tuple(args[1:]), kwargs
        return args, {**kwargs, "hidden_states": hidden.to(kwargs["hidden_states"].device, kwargs["hidden_states"].dtype)}

    handle = target.register_forward_pre_hook(pre, with_kwargs=True)
    try:
        for i in range(layer):
            blocks[i] = _Skip(as_tuple)
        yield
    finally:
        handle.remove()
        for i, blk in enumerate(originals):
            blocks[i] = blk


# --------------------------------------------------------------------------- attention
BlockSpec = Union[torch.Tensor, Callable[[int, torch.Tensor], torch.Tensor], None]


@dataclass
class AttentionRecord:
    """Attention patterns captured per layer: ``patterns[layer]`` is ``(B, H, T_q, T_k)`` (post-softmax)."""

    patterns: dict[int, torch.Tensor] = field(default_factory=dict)


def _apply_block(layer: int, mask: torch.Tensor | None, query: torch.Tensor, key: torch.Tensor, block: BlockSpec) -> torch.Tensor:
    """The additive attention mask with ``block``'s edges removed.

    A ``None`` mask (SDPA's "causal, no padding" shortcut) becomes an explicit causal mask and a boolean
    mask (True = attend) an additive one, so the eager attention computes the same thing.
    """
    B, _, Tq, _ = query.shape
    Tk = key.shape[-2]
    dtype = query.dtype if query.dtype.is_floating_point else torch.float32
    if mask is None:
        causal = torch.ones(Tq, Tk, dtype=torch.bool, device=query.device).tril(Tk - Tq)
        mask = torch.zeros(B, 1, Tq, Tk, dtype=dtype, device=query.device).masked_fill(~causal, torch.finfo(dtype).min)
    elif mask.dtype == torch.bool:
        mask = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)
    if block is None:
        return mask
    blocked = block(layer, mask) if callable(block) else block
    blocked = blocked.to(mask.device, torch.bool)
    shape = torch.broadcast_shapes(mask.shape, blocked.shape)
    return mask.expand(shape).masked_fill(blocked.expand(shape), torch.finfo(mask.dtype).min)


def _factlab_attention(module: nn.Module, query, key, value, attention_mask, *args, **kwargs):
    """Attention function registered with transformers: the model's own eager attention, with factlab's
    edge blocking applied to the additive mask and the pattern recorded."""
    eager = sys.modules[type(module).__module__].eager_attention_forward
    ctl = getattr(module, "_factlab_attention", None)
    if ctl is not None:
        attention_mask = _apply_block(ctl["layer"], attention_mask, query, key, ctl["block"])
    out, weights = eager(module, query, key, value, attention_mask, *args, **kwargs)
    if ctl is not None and ctl["record"] is not None:
        ctl["record"].patterns[ctl["layer"]] = weights.detach()
    return out, weights


def _ensure_registered() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, eager_mask

    if "factlab" not in AttentionInterface._global_mapping:
        AttentionInterface.register("factlab", _factlab_attention)
    if "factlab" not in ALL_MASK_ATTENTION_FUNCTIONS._global_mapping:
        ALL_MASK_ATTENTION_FUNCTIONS.register("factlab", eager_mask)


def _attention_module(lm: LoadedModel, layer: int) -> nn.Module:
    spec = lm.adapter.site(f"layer.{layer}.attn.out")
    return lm.model.get_submodule(spec.module)


@contextmanager
def attention(
    lm: LoadedModel, *, layers: Iterable[int] | None = None, block: BlockSpec = None, record: bool = False
) -> Iterator[AttentionRecord]:
    """Exact eager attention with optional edge blocking and pattern capture in ``layers`` (default: all).

    ``block``: a bool tensor broadcastable to ``(B, H, T_q, T_k)`` (True = the query may not read that key:
    its score is set to the dtype's minimum before the softmax, as attention knockout does), or a function
    ``(layer, additive_mask) -> bool tensor``. Inside the context the model runs its own eager attention
    (same numbers as ``attn_implementation="eager"``; SDPA/flash models differ from it by float rounding).
    """
    if not lm.adapter.has_attention:
        raise InputError(f"the {lm.adapter.family} family has no attention layers; attention knockout does not apply")
    layers = list(range(lm.adapter.n_layers)) if layers is None else sorted(set(layers))
    rec = AttentionRecord() if record else None
    mods = {i: _attention_module(lm, i) for i in layers}
    with ExitStack() as stack:
        if all(hasattr(m, "_attn") for m in mods.values()):  # GPT-J before transformers 5.24: its own _attn method
            for i, m in mods.items():
                stack.enter_context(_wrap_gptj(m, {"layer": i, "block": block, "record": rec}))
        else:
            _ensure_registered()
            cfg = lm.model.config
            old = cfg._attn_implementation
            cfg._attn_implementation = "factlab"
            stack.callback(setattr, cfg, "_attn_implementation", old)
            for i, m in mods.items():
                m._factlab_attention = {"layer": i, "block": block, "record": rec}
                stack.callback(delattr, m, "_factlab_attention")
        yield rec if rec is not None else AttentionRecord()


@contextmanager
def _wrap_gptj(module: nn.Module, ctl: dict) -> Iterator[None]:
    original = type(module)._attn

    def _attn(self, query, key, value, attention_mask=None, *args, **kwargs):
        attention_mask = _apply_block(ctl["layer"], attention_mask, query, key, ctl["block"])
        out, weights = original(self, query, key, value, attention_mask, *args, **kwargs)
        if ctl["record"] is not None:
            ctl["record"].patterns[ctl["layer"]] = weights.detach()
        return out, weights

    module._attn = types.MethodType(_attn, module)
    try:
        yield
    finally:
        del module._attn
