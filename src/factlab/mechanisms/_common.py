"""Shared pieces of the recall-mechanism measurements: errors, answer tokens, the frozen-scale
linearisation of a norm, and decoding a residual-space vector through the unembedding.

Frozen-scale linearisation (the standard one for direct logit attribution): a norm
``N(h) = w * (h - mean(h)) / s(h) + b`` (LayerNorm) or ``N(h) = w * h / s(h)`` (RMSNorm) is affine in
``h`` once the scale ``s(h)`` is frozen at its value on the clean residual. With the scale frozen,
``N(sum_j c_j) = sum_j w * (c_j - mean(c_j)) / s + b`` holds exactly, so parts of the residual can be
sent through the norm one at a time and their results add up to the norm's actual output. The
attribution of each part is approximate only in the sense that the scale itself depends on all parts.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from torch import nn

from factlab.errors import FactlabError
from factlab.models.loading import LoadedModel
from factlab.prompts import continuation_ids


class MechanismError(FactlabError, ValueError):
    """A mechanism measurement was asked for something the model or input cannot give."""


class NoHeadsError(MechanismError):
    """A head-level measurement was asked of a model family without attention heads (Mamba)."""


class AnswerNotSingleTokenError(MechanismError):
    """The answer is several tokens and exactness was requested."""


def require_heads(lm: LoadedModel, what: str = "this measurement") -> None:
    """Raise :class:`NoHeadsError` unless the model has attention heads."""
    if not lm.adapter.has_attention or not lm.adapter.n_heads:
        raise NoHeadsError(
            f"{what} needs attention heads, and the {lm.adapter.family} family has none (its layers are "
            "state-space mixers); use the per-layer mixer contributions and the logit lens instead"
        )


def parse_head(text: str) -> tuple[int, int]:
    """``"LAYER.HEAD"`` (e.g. ``"14.3"``) as ``(layer, head)``; :class:`MechanismError` for any other form."""
    parts = str(text).strip().split(".")
    if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
        raise MechanismError(f"a head is written LAYER.HEAD, e.g. 14.3, not {text!r}")
    return int(parts[0]), int(parts[1])


def check_head(lm: LoadedModel, layer: int, head: int) -> None:
    """Raise a clear error when ``(layer, head)`` does not exist."""
    require_heads(lm, "a head index")
    if not 0 <= layer < lm.adapter.n_layers:
        raise MechanismError(f"layer {layer} is outside this model's layers 0..{lm.adapter.n_layers - 1}")
    if not 0 <= head < int(lm.adapter.n_heads):
        raise MechanismError(f"head {head} is outside layer {layer}'s heads 0..{int(lm.adapter.n_heads) - 1}")


@dataclass(frozen=True)
class AnswerToken:
    """The token whose logit is explained: ``token_id``, its text, and whether the answer had more tokens."""

    answer: str
    token_id: int
    token: str
    n_tokens: int

    @property
    def truncated(self) -> bool:
        return self.n_tokens > 1

    def note(self) -> str | None:
        if not self.truncated:
            return None
        return f"answer {self.answer!r} is {self.n_tokens} tokens; its first token {self.token!r} is used"

    def to_dict(self) -> dict[str, object]:
        return {"answer": self.answer, "token_id": self.token_id, "token": self.token, "n_tokens": self.n_tokens, "note": self.note()}


def answer_token(lm: LoadedModel, prompt: str, answer: str, *, exact: bool = False) -> AnswerToken:
    """The first token of ``answer`` as a continuation of ``prompt``.

    A leading space is added when the answer has none and the prompt does not end in whitespace (the
    usual form of a next word). A multi-token answer uses its first token (``truncated`` says so), or
    raises :class:`AnswerNotSingleTokenError` when ``exact``.
    """
    if not answer or not answer.strip():
        raise MechanismError("the answer is empty; give the expected next word, e.g. ' Paris'")
    target = answer if answer[0].isspace() or (prompt and prompt[-1].isspace()) else " " + answer
    ids = continuation_ids(lm.tokenizer, prompt, target)
    if exact and len(ids) > 1:
        pieces = [lm.tokenizer.decode([i]) for i in ids]
        raise AnswerNotSingleTokenError(
            f"answer {target!r} is {len(ids)} tokens {pieces}; an exact single-token answer was asked for. "
            f"Give a single-token answer, or allow the first token ({pieces[0]!r})"
        )
    return AnswerToken(answer=target, token_id=int(ids[0]), token=lm.tokenizer.decode([ids[0]]), n_tokens=len(ids))


def token_id_of(lm: LoadedModel, prompt: str, token: str) -> int:
    """A contrast token given as text (first token of it as a continuation) or as ``#<id>``."""
    if token.startswith("#") and token[1:].isdigit():
        tid = int(token[1:])
        if not 0 <= tid < lm.adapter.unembed_weight(lm.model).shape[0]:
            raise MechanismError(f"token id {tid} is outside the vocabulary")
        return tid
    return answer_token(lm, prompt, token).token_id


# --------------------------------------------------------------------------- frozen norms
@dataclass
class FrozenNorm:
    """A norm linearised at a clean input: ``N(x) ~= linear(x) + bias`` with the scale frozen.

    ``scale``: ``(..., 1)`` the norm's divisor at the clean input; ``weight``/``bias``: ``(d,)`` the
    effective elementwise gain and additive term; ``center``: whether the mean is removed (LayerNorm).
    """

    scale: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor
    center: bool

    def __repr__(self) -> str:
        return short_repr(self, scale=self.scale, weight=self.weight, center=self.center)

    def linear(self, x: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
        """The linear part applied to ``x`` ``(..., d)`` (or ``(..., C, d)`` with ``scale`` ``(..., 1, 1)``)."""
        s = self.scale if scale is None else scale
        if self.center:
            x = x - x.mean(-1, keepdim=True)
        return x * self.weight / s

    def direction(self, x: torch.Tensor) -> torch.Tensor:
        """Gain applied without the scale (what a lens of one component reads, up to a positive factor)."""
        if self.center:
            x = x - x.mean(-1, keepdim=True)
        return x * self.weight


def _eps(norm: nn.Module) -> float:
    for attr in ("variance_epsilon", "eps", "epsilon"):
        v = getattr(norm, attr, None)
        if isinstance(v, (int, float)):
            return float(v)
    raise MechanismError(f"cannot find the epsilon of the norm {type(norm).__name__}; its frozen-scale linearisation is unknown")


def freeze_norm(norm: nn.Module, h: torch.Tensor, *, check: bool = True) -> FrozenNorm:
    """Linearise ``norm`` at the clean input ``h`` ``(..., d)`` (computed in float64).

    LayerNorm: scale ``sqrt(var(h) + eps)``, gain ``weight``, additive ``bias``. Any other norm is treated
    as an RMS norm: scale ``sqrt(mean(h^2) + eps)`` and the effective gain read off the module itself
    (``N(ones) * sqrt(1 + eps)``, which covers Llama's ``w`` and Gemma's ``1 + w``). With ``check`` the
    linearisation is compared with the module's own output and a mismatch raises.
    """
    h64 = h.double()
    eps = _eps(norm)
    p = next(norm.parameters(), None)
    dev = h.device
    if isinstance(norm, nn.LayerNorm):
        d = h.shape[-1]
        w = norm.weight.detach().double().to(dev) if norm.weight is not None else torch.ones(d, dtype=torch.float64, device=dev)
        b = norm.bias.detach().double().to(dev) if norm.bias is not None else torch.zeros(d, dtype=torch.float64, device=dev)
        scale = (h64.var(-1, unbiased=False, keepdim=True) + eps).sqrt()
        fz = FrozenNorm(scale, w, b, True)
    else:
        d = h.shape[-1]
        dtype = p.dtype if p is not None else h.dtype
        with torch.no_grad():
            ones = torch.ones(1, d, dtype=dtype, device=p.device if p is not None else dev)
            w = norm(ones)[0].double().to(dev) * (1.0 + eps) ** 0.5
        scale = (h64.pow(2).mean(-1, keepdim=True) + eps).sqrt()
        fz = FrozenNorm(scale, w, torch.zeros(d, dtype=torch.float64, device=dev), False)
    if check:
        with torch.no_grad():
            actual = norm(h).double()
        approx = fz.linear(h64) + fz.bias
        err = float((actual - approx).abs().max())
        tol = 1e-3 * max(1.0, float(actual.abs().max()))
        if not err <= tol:
            raise MechanismError(
                f"the norm {type(norm).__name__} is not reproduced by a frozen-scale RMS/LayerNorm linearisation "
                f"(max error {err:.3g}); its decomposition is not supported"
            )
    return fz


# --------------------------------------------------------------------------- decoding
def unembed(lm: LoadedModel) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(W_U (V, d), b_U (V,) or None)`` as float64 on the unembedding's device."""
    W = lm.adapter.unembed_weight(lm.model).detach().double()
    b = lm.adapter.unembed_bias(lm.model)
    return W, (b.detach().double() if b is not None else None)


def decode_rank(lm: LoadedModel, vectors: torch.Tensor, token_ids: torch.Tensor, *, final: FrozenNorm | None = None) -> torch.Tensor:
    """Rank (0 = top) of ``token_ids`` ``(N,)`` or ``(N, K)`` (best of K) among the vocabulary when the
    residual-space ``vectors`` ``(N, d)`` are read through the final norm's gain and the unembedding
    (the logit lens of one component; the frozen scale is positive and does not change ranks)."""
    W, _ = unembed(lm)
    fz = final if final is not None else freeze_norm(lm.adapter.final_norm(lm.model), vectors.to(lm.device, lm.dtype), check=False)
    logits = fz.direction(vectors.double().to(W.device)) @ W.T  # (N, V)
    ids = token_ids.to(W.device).long()
    if ids.dim() == 1:
        ids = ids[:, None]
    chosen = logits.gather(1, ids)  # (N, K)
    ranks = (logits[:, None, :] > chosen[:, :, None]).sum(-1)  # (N, K)
    return ranks.min(-1).values


# --------------------------------------------------------------------------- results and files
def _brief(value: Any) -> str:
    """A short description of one field for a repr: shapes of arrays, lengths of long lists, cut strings."""
    if isinstance(value, (torch.Tensor, np.ndarray)):
        return f"<{type(value).__name__} {tuple(value.shape)}>"
    if isinstance(value, (list, tuple, dict)) and len(value) > 6:
        return f"<{len(value)} {'items' if isinstance(value, dict) else 'entries'}>"
    if isinstance(value, str) and len(value) > 80:
        return repr(value[:77] + "...")
    if isinstance(value, float):
        return f"{value:.4g}"
    return repr(value)


def short_repr(obj: object, **fields: Any) -> str:
    """``Name(field=value, ...)`` with every value summarised (a notebook cell ending in a result prints a
    line, never every array or every part)."""
    return f"{type(obj).__name__}(" + ", ".join(f"{k}={_brief(v)}" for k, v in fields.items()) + ")"


def check_out_dir(out: str | os.PathLike[str] | None) -> Path | None:
    """``out`` as a Path when it is usable as an output folder (absent or a folder), else a clear error."""
    if out is None:
        return None
    p = Path(out)
    if p.exists() and not p.is_dir():
        raise MechanismError(f"{p} is a file, not a folder; give --out a folder (new or existing)")
    return p


@contextmanager
def staged_dir(out: str | os.PathLike[str]) -> Iterator[Path]:
    """A fresh folder next to ``out`` to write a set of files into: on success they all move into ``out``
    (created if needed), on an exception the folder is removed and ``out`` is left exactly as it was.
    Every file of a run therefore appears together or not at all."""
    final = check_out_dir(out)
    assert final is not None
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
    try:
        yield tmp
        final.mkdir(parents=True, exist_ok=True)
        for f in sorted(tmp.iterdir()):
            os.replace(f, final / f.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
