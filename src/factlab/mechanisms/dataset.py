"""Facts to measure and one batched pass that collects everything the dataset-level measurements need.

:func:`collect` runs each batch once, with exact eager attention recording patterns, and keeps per fact:
the logit lens of the answer (probability and rank per layer), every part's direct contribution to the
answer's logit (raw and centred on the vocabulary mean), attention from the last token to the subject
and to the first token for every head, a decodability score of the subject for every head's output, and
the final layer's per-head and MLP outputs (for the anti-overconfidence analysis).
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from factlab.interventions import attention, capture
from factlab.mechanisms._common import MechanismError, answer_token, freeze_norm, short_repr, unembed
from factlab.mechanisms.contributions import decompose_captured, decomposition_sites
from factlab.mechanisms.lens import layer_labels, lens_from_logits
from factlab.models.loading import LoadedModel
from factlab.progress import progress
from factlab.prompts import subject_span


@dataclass(frozen=True)
class FactCase:
    """One fact: the prompt, the subject as written in it, and the expected answer (next word)."""

    prompt: str
    subject: str
    answer: str
    source: str = ""
    relation: str = ""

    def to_dict(self) -> dict[str, str]:
        return asdict(self)


def known_cases(limit: int | None = None, path: str | None = None) -> list[FactCase]:
    """The known_1000 facts as cases (answer: the attribute with a leading space)."""
    from factlab.data import load_known

    return [FactCase(f.prompt, f.subject, " " + f.attribute.strip(), "known_1000", f.relation_id) for f in load_known(path, limit=limit)]


def relation_cases(relations: Sequence[str] | None = None, *, relation_type: str = "factual", per_relation: int | None = None) -> list[FactCase]:
    """Samples of LRE relations as cases, prompted with each relation's first zero-shot template (its
    first template when it has no zero-shot ones). Default: every relation of ``relation_type``."""
    from factlab.data import list_relations, load_relation

    names = list(relations) if relations else list_relations()
    out: list[FactCase] = []
    for n in names:
        r = load_relation(n)
        if not relations and r.relation_type != relation_type:
            continue
        tpl = (r.prompt_templates_zs or r.prompt_templates)[0]
        for s in r.samples[:per_relation]:
            if "{}" not in tpl:
                continue
            out.append(FactCase(tpl.format(s.subject), s.subject, " " + s.object.strip(), "lre", r.stem or r.name))
    return out


def load_cases(name: str, limit: int | None = None) -> list[FactCase]:
    """``known_1000`` or ``lre`` (factual LRE relations) or ``lre:<relation>[,<relation>...]``."""
    if name in ("known_1000", "known"):
        return known_cases(limit)
    if name == "lre":
        cases = relation_cases()
    elif name.startswith("lre:"):
        cases = relation_cases(name[4:].split(","))
    else:
        raise MechanismError(f"unknown fact set {name!r}; use known_1000, lre, or lre:<relation>[,<relation>]")
    return cases[:limit] if limit else cases


def split_cases(cases: Sequence[FactCase], select_fraction: float = 0.4, seed: int = 0) -> tuple[list[FactCase], list[FactCase]]:
    """Shuffle with ``random.Random(seed)`` and split into (selection, held-out)."""
    if not 0 < select_fraction < 1:
        raise MechanismError(f"the selection fraction must be strictly between 0 and 1, not {select_fraction!r}")
    order = list(range(len(cases)))
    random.Random(seed).shuffle(order)
    k = max(1, int(round(select_fraction * len(cases))))
    return [cases[i] for i in order[:k]], [cases[i] for i in order[k:]]


@dataclass
class FactStats:
    """Per-fact arrays from :func:`collect` (N facts, L layers, H heads, C parts, d model width).

    ``lens_prob``/``lens_rank`` ``(N, L+1)``; ``dla``/``dla_centered`` ``(N, C)`` direct contributions to the
    answer logit (``names`` label the parts); ``dla_const`` ``(N,)``; ``logit`` ``(N,)`` the actual logit;
    ``attn_subject``/``attn_first`` ``(N, L, H)`` attention mass from the last token onto the subject
    tokens / the first real token; ``subject_z`` ``(N, L, H)`` the subject's best token's lens logit in each
    head's output, in standard deviations above the vocabulary mean; ``final_heads`` ``(N, H, d)`` and
    ``final_mlp``/``final_attn`` ``(N, d)`` the last layer's residual-space outputs; ``top1`` ``(N,)``.
    Head arrays are empty for Mamba.
    """

    cases: list[FactCase]
    answer_ids: np.ndarray
    truncated: np.ndarray
    layers: list[str]
    names: list[str]
    kinds: list[str]
    part_layers: list[int]
    part_heads: list[int]
    lens_prob: np.ndarray
    lens_rank: np.ndarray
    dla: np.ndarray
    dla_centered: np.ndarray
    dla_const: np.ndarray
    logit: np.ndarray
    attn_subject: np.ndarray
    attn_first: np.ndarray
    subject_z: np.ndarray
    final_heads: np.ndarray
    final_mlp: np.ndarray
    final_attn: np.ndarray
    max_sum_error: float
    model: str = ""
    skipped: list[dict[str, str]] = field(default_factory=list)

    @property
    def n(self) -> int:
        return len(self.cases)

    @property
    def top1(self) -> np.ndarray:
        return self.lens_rank[:, -1] == 0

    _ARRAYS = (
        "answer_ids", "truncated", "lens_prob", "lens_rank", "dla", "dla_centered", "dla_const", "logit",
        "attn_subject", "attn_first", "subject_z", "final_heads", "final_mlp", "final_attn",
    )

    def __repr__(self) -> str:
        return short_repr(self, model=self.model, n=self.n, layers=len(self.layers), parts=len(self.names),
                          skipped=len(self.skipped), max_sum_error=self.max_sum_error)

    def save(self, directory: str | Path) -> Path:
        """Write ``fact_stats.npz`` (arrays) and ``fact_stats.json`` (the rest) into ``directory``, each atomically."""
        from factlab.io import atomic_path, write_json

        d = Path(directory)
        with atomic_path(d / "fact_stats.npz") as tmp, open(tmp, "wb") as f:
            np.savez_compressed(f, **{k: getattr(self, k) for k in self._ARRAYS})
        meta = {
            "model": self.model, "layers": self.layers, "names": self.names, "kinds": self.kinds,
            "part_layers": self.part_layers, "part_heads": self.part_heads, "max_sum_error": self.max_sum_error,
            "cases": [c.to_dict() for c in self.cases], "skipped": self.skipped,
        }
        write_json(d / "fact_stats.json", meta, indent=None)
        return d

    @classmethod
    def load(cls, directory: str | Path) -> "FactStats":
        d = Path(directory)
        arr = np.load(d / "fact_stats.npz")
        meta = json.loads((d / "fact_stats.json").read_text())
        meta["cases"] = [FactCase(**c) for c in meta["cases"]]
        return cls(**meta, **{k: arr[k] for k in cls._ARRAYS})


def _subject_cov(lm: LoadedModel) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(W' (V, d), mean row (d,), covariance (d, d))`` of the unembedding with the final norm's gain."""
    W, _ = unembed(lm)
    d = W.shape[1]
    fz = freeze_norm(lm.adapter.final_norm(lm.model), torch.ones(1, d, dtype=lm.dtype, device=lm.device), check=False)
    Wp = W * fz.weight.to(W.device)
    m = Wp.mean(0)
    Wc = Wp - m
    return Wp, m, (Wc.T @ Wc) / Wp.shape[0]


def subject_z(Wp: torch.Tensor, m: torch.Tensor, cov: torch.Tensor, x: torch.Tensor, ids: list[int]) -> torch.Tensor:
    """Best z-score over ``ids`` of lens logits of ``x`` ``(..., d)``: ``(W'[s] x - mean) / std`` over the vocabulary."""
    x = x.to(Wp.device)
    mean = x @ m
    std = torch.einsum("...d,de,...e->...", x, cov, x).clamp_min(1e-30).sqrt()
    s = x @ Wp[ids].T  # (..., K)
    return ((s - mean[..., None]) / std[..., None]).amax(-1)


def _forward_last(lm: LoadedModel, batch) -> torch.Tensor:
    """Forward pass computing logits at the last position only where the model supports it."""
    try:
        return lm.forward(batch, logits_to_keep=1)
    except TypeError:
        return lm.forward(batch)


@torch.no_grad()
def collect(lm: LoadedModel, cases: Sequence[FactCase], *, batch_size: int = 16) -> FactStats:
    """One batched pass over ``cases`` collecting :class:`FactStats` (cases whose subject is not found in
    the prompt are skipped and listed in ``skipped``)."""
    ad = lm.adapter
    L = ad.n_layers
    heads = ad.has_attention
    H = int(ad.n_heads or 0)
    good: list[tuple[FactCase, int, tuple[int, int]]] = []
    skipped: list[dict[str, str]] = []
    for c in cases:
        try:
            span = subject_span(lm.tokenizer, c.prompt, c.subject)
            tid = answer_token(lm, c.prompt, c.answer)
        except Exception as e:  # noqa: BLE001 - recorded per case, never silently
            skipped.append({"prompt": c.prompt, "subject": c.subject, "reason": str(e)})
            continue
        good.append((c, tid.token_id, span, tid.n_tokens))  # type: ignore[arg-type]
    if not good:
        reasons = "; ".join(f"{x['prompt']!r}: {x['reason']}" for x in skipped[:3])
        raise MechanismError(f"no usable case among {len(skipped)}: every subject was missing from its prompt or every answer empty ({reasons})")
    Wp, mrow, cov = _subject_cov(lm)
    W, _ = unembed(lm)
    sites = decomposition_sites(lm)
    out: dict[str, list] = {k: [] for k in ("lens_prob", "lens_rank", "dla", "dlac", "const", "logit", "as", "af", "sz", "fh", "fm", "fa")}
    names = kinds = None
    pl = ph = None
    max_err = 0.0
    for start in progress(range(0, len(good), batch_size), desc="facts", total=math.ceil(len(good) / batch_size)):
        chunk = good[start : start + batch_size]
        batch = lm.encode([c.prompt for c, *_ in chunk])
        ids = torch.tensor([t for _, t, *_ in chunk])
        with capture(lm, sites, positions=[-1]) as acts:
            if heads:
                with attention(lm, record=True) as rec:
                    _forward_last(lm, batch)
            else:
                _forward_last(lm, batch)
        dec = decompose_captured(lm, acts)
        names, kinds, pl, ph = dec.names, dec.kinds, dec.layers, dec.heads
        resid = torch.cat([acts["embed"]] + [acts[f"layer.{i}.resid"] for i in range(L)], dim=1)
        lens = ad.logits_from_resid(lm.model, resid).float()
        p, r = lens_from_logits(lens, ids)
        out["lens_prob"].append(p)
        out["lens_rank"].append(r)
        parts, const = dec.logit_parts(lm, ids)
        partsc, _ = dec.logit_parts(lm, ids, centered=True)
        normed_h = dec.final.linear(dec.resid) + dec.final.bias
        actual = (normed_h.to(W.device) * W[ids]).sum(-1)
        max_err = max(max_err, float((parts.sum(1) + const - actual).abs().max()))
        out["dla"].append(parts.cpu().numpy())
        out["dlac"].append(partsc.cpu().numpy())
        out["const"].append(const.cpu().numpy())
        out["logit"].append(actual.cpu().numpy())
        B = len(chunk)
        if heads:
            pat = torch.stack([rec.patterns[i][:, :, -1, :] for i in range(L)], dim=1).float()  # (B, L, H, T)
            subj = torch.zeros(B, L, H)
            first = torch.zeros(B, L, H)
            for b, (c, _, span, _) in enumerate(chunk):
                s0, s1 = batch.position(b, span[0]), batch.position(b, span[1] - 1) + 1
                subj[b] = pat[b, :, :, s0:s1].sum(-1)
                first[b] = pat[b, :, :, batch.position(b, 0)]
            out["as"].append(subj.numpy())
            out["af"].append(first.numpy())
            hv = dec.vectors[:, [c for c, k in enumerate(dec.kinds) if k == "head"]].reshape(B, L, H, -1)
            z = torch.zeros(B, L, H)
            for b, (c, _, span, _) in enumerate(chunk):
                sid = batch.input_ids[b, batch.position(b, span[0]) : batch.position(b, span[1] - 1) + 1].tolist()
                z[b] = subject_z(Wp, mrow, cov, hv[b], sid).float().cpu()
            out["sz"].append(z.numpy())
            out["fh"].append(hv[:, L - 1].float().cpu().numpy())
            mi = dec.names.index(f"L{L - 1}.mlp")
            out["fm"].append(dec.vectors[:, mi].float().cpu().numpy())
            ai = dec.index("head", L - 1) + dec.index("attn_bias", L - 1)
            out["fa"].append(dec.vectors[:, ai].sum(1).float().cpu().numpy())
        else:
            out["fm"].append(dec.vectors[:, dec.names.index(f"L{L - 1}.mixer")].float().cpu().numpy())
    cat = lambda k, shape: np.concatenate(out[k]) if out[k] else np.zeros(shape, dtype=np.float32)  # noqa: E731
    N = len(good)
    return FactStats(
        cases=[c for c, *_ in good],
        answer_ids=np.array([t for _, t, *_ in good]),
        truncated=np.array([n > 1 for *_, n in good]),
        layers=layer_labels(lm),
        names=list(names),
        kinds=list(kinds),
        part_layers=list(pl),
        part_heads=list(ph),
        lens_prob=cat("lens_prob", (N, L + 1)),
        lens_rank=cat("lens_rank", (N, L + 1)),
        dla=cat("dla", None),
        dla_centered=cat("dlac", None),
        dla_const=cat("const", None),
        logit=cat("logit", None),
        attn_subject=cat("as", (N, L, 0)),
        attn_first=cat("af", (N, L, 0)),
        subject_z=cat("sz", (N, L, 0)),
        final_heads=cat("fh", (N, 0, ad.d_model)),
        final_mlp=cat("fm", None),
        final_attn=cat("fa", (N, ad.d_model)),
        max_sum_error=max_err,
        model=lm.name,
        skipped=skipped,
    )
