"""Direct contributions: the final residual at a position split into the embedding, every attention
head, every attention bias, every MLP (or Mamba mixer), and each part's direct effect on a logit.

The final residual of a pre-norm transformer is exactly ``embed (+ position embeddings) + sum_i (attn_i
+ mlp_i)``; attention is further split into heads, ``attn_i = sum_h heads_i[h] @ W_O[:, h].T + b_O``. Each
part is sent through the final norm with its scale frozen at the clean residual (the standard
linearisation, see :mod:`factlab.mechanisms._common`) and through the unembedding. The parts plus the
constant (final-norm bias and unembedding bias) sum to the model's actual logit; the measured error is
reported.

Gemma 3 normalises ``attn.out`` and ``mlp.out`` again before the residual add. Those post-norms are
linearised the same way (scale frozen at the module output), so heads still sum exactly to the
attention block's residual contribution; only the per-head split is a linearisation.

``pos_embed`` is whatever enters the first block besides the token embedding, measured as
``layer.0.resid - embed - attn_0 - mlp_0``: GPT-2's absolute position embeddings; zero (to float error)
for rotary models and Mamba. Final logit soft-capping (Gemma 2) is not linear: the decomposition is of
the logit before the cap, and ``softcap`` says when a cap exists.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Sequence

import torch

from factlab.interventions import run_and_capture
from factlab.mechanisms._common import AnswerToken, FrozenNorm, answer_token, check_head, freeze_norm, short_repr, token_id_of, unembed
from factlab.models.loading import LoadedModel


@dataclass
class Decomposition:
    """Residual-space parts at one position of each prompt of a batch.

    ``vectors``: ``(B, C, d)`` float64, one row per part (names in ``names``); ``resid``: ``(B, d)`` the
    actual final residual (output of the last block); ``final``: the final norm frozen at ``resid``.
    ``kinds[c]`` is ``embed``, ``pos_embed``, ``head``, ``attn_bias``, ``mlp`` or ``mixer``;
    ``layers[c]``/``heads[c]`` locate it (``-1`` when not applicable).
    """

    names: list[str]
    kinds: list[str]
    layers: list[int]
    heads: list[int]
    vectors: torch.Tensor
    resid: torch.Tensor
    final: FrozenNorm
    softcap: float | None = None

    def __repr__(self) -> str:
        return short_repr(self, parts=len(self.names), vectors=self.vectors, resid=self.resid, softcap=self.softcap)

    @property
    def residual_error(self) -> torch.Tensor:
        """``(B,)`` max-abs difference between the final residual and the sum of the parts."""
        return (self.resid - self.vectors.sum(1)).abs().amax(-1)

    def normed(self) -> torch.Tensor:
        """``(B, C, d)`` each part through the frozen final norm (linear part, no bias)."""
        return self.final.linear(self.vectors, scale=self.final.scale[:, None])

    def logit_parts(self, lm: LoadedModel, token_ids: torch.Tensor, *, centered: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """``(parts (B, C), const (B,))``: each part's direct contribution to the logit of ``token_ids``
        ``(B,)`` and the constant (final-norm bias and unembedding bias); they sum to the logit.

        ``centered``: contributions to the logit minus the mean logit over the vocabulary (what changes
        probabilities: a part that raises every logit equally changes none)."""
        W, b = unembed(lm)
        ids = token_ids.to(W.device).long()
        Wt = W[ids]  # (B, d)
        if centered:
            Wt = Wt - W.mean(0)
        parts = torch.einsum("bcd,bd->bc", self.normed().to(W.device), Wt)
        const = Wt @ self.final.bias.to(W.device)
        if b is not None:
            const = const + (b[ids] - b.mean() if centered else b[ids])
        return parts, const

    def index(self, kind: str, layer: int | None = None) -> list[int]:
        return [c for c, k in enumerate(self.kinds) if k == kind and (layer is None or self.layers[c] == layer)]


def decomposition_sites(lm: LoadedModel) -> list[str]:
    """The sites :func:`decompose_captured` needs (captured at one position)."""
    L = lm.adapter.n_layers
    sites = ["embed"] + [f"layer.{i}.resid" for i in range(L)]
    if lm.adapter.has_attention:
        sites += [f"layer.{i}.{s}" for i in range(L) for s in ("attn.heads", "attn.out", "mlp.out")]
    else:
        sites += [f"layer.{i}.mixer.out" for i in range(L)]
    return sites


@torch.no_grad()
def decompose(lm: LoadedModel, prompts: Sequence[str]) -> Decomposition:
    """Split the final residual at each prompt's last token into its parts (see module docstring)."""
    batch = lm.encode(list(prompts))
    acts = run_and_capture(lm, batch, decomposition_sites(lm), positions=[-1], stop_early=False)
    return decompose_captured(lm, acts)


@torch.no_grad()
def decompose_captured(lm: LoadedModel, captured: dict[str, torch.Tensor]) -> Decomposition:
    """:func:`decompose` from already captured values (``(B, 1, ...)`` at one position per row)."""
    ad = lm.adapter
    L = ad.n_layers
    heads = ad.has_attention
    acts = captured
    a = {k: v[:, 0].double() for k, v in acts.items()}  # (B, ...) at the position
    post_attn = getattr(ad, "post_attention_norm", None)
    post_mlp = getattr(ad, "post_mlp_norm", None)

    names: list[str] = ["embed"]
    kinds: list[str] = ["embed"]
    layers: list[int] = [-1]
    hs: list[int] = [-1]
    vecs: list[torch.Tensor] = [a["embed"][:, None]]
    first_block: torch.Tensor | None = None
    for i in range(L):
        block_parts: list[torch.Tensor] = []
        if heads:
            H = int(ad.n_heads)
            proj = ad.projection(i, "attn")
            W_O = proj.weight(lm.model).detach().double()  # (d, H*dh)
            per_head = torch.einsum("bhk,dhk->bhd", a[f"layer.{i}.attn.heads"], W_O.unflatten(1, (H, -1)))  # (B, H, d)
            bias = proj.bias(lm.model)
            attn_out = a[f"layer.{i}.attn.out"]
            mlp_out = a[f"layer.{i}.mlp.out"]
            pa = post_attn(lm.model, i) if post_attn is not None else None
            if pa is not None:
                fz = freeze_norm(pa, acts[f"layer.{i}.attn.out"][:, 0])
                per_head = fz.linear(per_head, scale=fz.scale[:, None])
                bias_vec = None if bias is None else fz.linear(bias.detach().double().expand_as(attn_out))
            else:
                bias_vec = None if bias is None else bias.detach().double().expand_as(attn_out)
            pm = post_mlp(lm.model, i) if post_mlp is not None else None
            if pm is not None:
                fzm = freeze_norm(pm, acts[f"layer.{i}.mlp.out"][:, 0])
                mlp_out = fzm.linear(mlp_out) + fzm.bias
            for h in range(H):
                names.append(f"L{i}.H{h}")
                kinds.append("head")
                layers.append(i)
                hs.append(h)
            vecs.append(per_head)
            block_parts.append(per_head.sum(1))
            if bias_vec is not None:
                names.append(f"L{i}.attn_bias")
                kinds.append("attn_bias")
                layers.append(i)
                hs.append(-1)
                vecs.append(bias_vec[:, None])
                block_parts.append(bias_vec)
            names.append(f"L{i}.mlp")
            kinds.append("mlp")
            layers.append(i)
            hs.append(-1)
            vecs.append(mlp_out[:, None])
            block_parts.append(mlp_out)
        else:
            mix = a[f"layer.{i}.mixer.out"]
            names.append(f"L{i}.mixer")
            kinds.append("mixer")
            layers.append(i)
            hs.append(-1)
            vecs.append(mix[:, None])
            block_parts.append(mix)
        if i == 0:
            first_block = sum(block_parts)
    assert first_block is not None
    pos = a["layer.0.resid"] - a["embed"] - first_block
    names.insert(1, "pos_embed")
    kinds.insert(1, "pos_embed")
    layers.insert(1, -1)
    hs.insert(1, -1)
    vecs.insert(1, pos[:, None])
    resid = a[f"layer.{L - 1}.resid"]
    final = freeze_norm(ad.final_norm(lm.model), acts[f"layer.{L - 1}.resid"][:, 0])
    cap = getattr(ad.config, "final_logit_softcapping", None)
    return Decomposition(names, kinds, layers, hs, torch.cat(vecs, dim=1), resid, final, float(cap) if cap else None)


# --------------------------------------------------------------------------- one prompt
@dataclass
class Contribution:
    """One part's direct effect: on the answer's logit and on the logit difference answer - contrast."""

    name: str
    kind: str
    layer: int
    head: int
    logit: float
    logit_diff: float | None

    def to_dict(self) -> dict[str, object]:
        return {"name": self.name, "kind": self.kind, "layer": self.layer, "head": self.head, "logit": self.logit, "logit_diff": self.logit_diff}


@dataclass
class DirectContributions:
    """Direct contributions of every part to the answer's logit at the last token of ``prompt``.

    ``parts`` plus ``constant`` sum to ``logit_sum``; ``logit_actual`` is the model's logit (before any
    soft-cap); ``max_error`` their difference. The final norm is linearised with its scale frozen at the
    clean residual (``norm_scale``).
    """

    prompt: str
    answer: AnswerToken
    contrast: str | None
    parts: list[Contribution]
    constant: float
    constant_diff: float | None
    logit_actual: float
    logit_diff_actual: float | None
    norm_scale: float
    softcap: float | None = None
    model: str = ""
    notes: list[str] = field(default_factory=list)

    def __repr__(self) -> str:
        top = self.top(1)
        return short_repr(self, prompt=self.prompt, answer=self.answer.token, logit=self.logit_actual, error=self.error,
                          parts=self.parts, top=top[0].name if top else None)

    @property
    def logit_sum(self) -> float:
        return self.constant + sum(p.logit for p in self.parts)

    @property
    def error(self) -> float:
        return abs(self.logit_sum - self.logit_actual)

    def head(self, layer: int, head: int) -> Contribution:
        for p in self.parts:
            if p.kind == "head" and p.layer == layer and p.head == head:
                return p
        raise KeyError(f"no head L{layer}.H{head} in this decomposition")

    def by_layer(self) -> list[dict[str, object]]:
        """Per layer: summed attention (heads + bias), MLP/mixer contribution to the logit (and diff)."""
        rows: dict[int, dict[str, float]] = {}
        for p in self.parts:
            if p.layer < 0:
                continue
            key = "attn" if p.kind in ("head", "attn_bias") else p.kind
            r = rows.setdefault(p.layer, {})
            r[key] = r.get(key, 0.0) + p.logit
            if p.logit_diff is not None:
                r[key + "_diff"] = r.get(key + "_diff", 0.0) + p.logit_diff
        return [{"layer": i, **rows[i]} for i in sorted(rows)]

    def top(self, k: int = 10) -> list[Contribution]:
        return sorted(self.parts, key=lambda p: -abs(p.logit))[:k]

    def to_dict(self) -> dict[str, object]:
        return {
            "model": self.model,
            "prompt": self.prompt,
            "answer": self.answer.to_dict(),
            "contrast": self.contrast,
            "logit_actual": self.logit_actual,
            "logit_sum": self.logit_sum,
            "max_error": self.error,
            "logit_diff_actual": self.logit_diff_actual,
            "constant": self.constant,
            "constant_diff": self.constant_diff,
            "norm_scale": self.norm_scale,
            "linearisation": "final norm (and Gemma post-norms) with the scale frozen at the clean input",
            "softcap": self.softcap,
            "notes": self.notes,
            "by_layer": self.by_layer(),
            "parts": [p.to_dict() for p in self.parts],
        }

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, ensure_ascii=False)

    def plot(self, path) -> None:
        from factlab.mechanisms.plot import plot_contributions

        plot_contributions(path, self)


def direct_contributions(
    lm: LoadedModel, prompt: str, answer: str, *, contrast: str | None = None, exact: bool = False
) -> DirectContributions:
    """Direct contributions of every head, MLP (or mixer) and the embedding to ``answer``'s logit at the
    last token of ``prompt`` (and to ``logit(answer) - logit(contrast)`` when ``contrast`` is given)."""
    ans = answer_token(lm, prompt, answer, exact=exact)
    dec = decompose(lm, [prompt])
    ids = torch.tensor([ans.token_id])
    parts, const = dec.logit_parts(lm, ids)
    W, b = unembed(lm)
    normed_h = dec.final.linear(dec.resid) + dec.final.bias
    actual = float(normed_h[0] @ W[ans.token_id] + (b[ans.token_id] if b is not None else 0.0))
    diff_parts = diff_const = diff_actual = None
    cid = None
    if contrast is not None:
        cid = token_id_of(lm, prompt, contrast)
        cp, cc = dec.logit_parts(lm, torch.tensor([cid]))
        diff_parts, diff_const = parts - cp, float(const[0] - cc[0])
        diff_actual = actual - float(normed_h[0] @ W[cid] + (b[cid] if b is not None else 0.0))
    out = [
        Contribution(n, k, l, h, float(parts[0, c]), None if diff_parts is None else float(diff_parts[0, c]))
        for c, (n, k, l, h) in enumerate(zip(dec.names, dec.kinds, dec.layers, dec.heads))
    ]
    notes = [n for n in [ans.note()] if n]
    if dec.softcap:
        notes.append(f"the model soft-caps logits at {dec.softcap}; the decomposition is of the logit before the cap")
    return DirectContributions(
        prompt=prompt,
        answer=ans,
        contrast=None if cid is None else lm.tokenizer.decode([cid]),
        parts=out,
        constant=float(const[0]),
        constant_diff=diff_const,
        logit_actual=actual,
        logit_diff_actual=diff_actual,
        norm_scale=float(dec.final.scale[0, 0]),
        softcap=dec.softcap,
        model=lm.name,
        notes=notes,
    )


def head_output(lm: LoadedModel, prompts: Sequence[str], layer: int, head: int) -> torch.Tensor:
    """``(B, d)`` float64 residual-space output of one head at the last token (through its W_O slice and,
    for Gemma, the frozen post-attention norm)."""
    check_head(lm, layer, head)
    dec = decompose(lm, prompts)
    c = dec.names.index(f"L{layer}.H{head}")
    return dec.vectors[:, c]
