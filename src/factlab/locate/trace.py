"""Causal tracing (ROME, Meng et al. 2022; Mamba: Sen Sharma, Atkinson, Bau 2024).

Corrupt the subject, restore one clean state at a time, and record how much of the answer comes back.
"""

from __future__ import annotations

from typing import Literal, Sequence

import numpy as np

from factlab.locate._common import TraceInputError, check_kind, window_layers
from factlab.locate.corrupt import NoiseSpec
from factlab.locate.engine import Engine, Restoration
from factlab.locate.result import TraceResult
from factlab.locate.setup import Corruption, Metric, TargetSpec, TraceSetup, prepare
from factlab.models.loading import LoadedModel

Method = Literal["exact", "attribution"]


def kinds(lm: LoadedModel) -> list[str]:
    """The trace kinds this model has (``residual``, ``mlp``, ``attn``; Mamba: ``mixer`` and its states)."""
    return list(lm.adapter.trace_kinds)


def restorations(setup: TraceSetup, kind: str, window: int) -> list[Restoration]:
    """The restorations of a ``kind`` trace, token-major (``len(tokens) * n_layers``)."""
    lm = setup.lm
    L = lm.adapter.n_layers
    suffix = check_kind(lm, kind)
    jobs = []
    for t in setup.token_pos:
        for layer in range(L):
            if kind == "residual":
                jobs.append(Restoration(t, layer + 1, resid=True))
            else:
                lo, hi = window_layers(layer, window, L)
                jobs.append(Restoration(t, lo, clean=tuple(f"layer.{j}.{suffix}" for j in range(lo, hi))))
    return jobs


def trace(
    lm: LoadedModel,
    prompt: str,
    subject: str,
    *,
    kind: str = "residual",
    samples: int = 10,
    noise: NoiseSpec = "3x",
    window: int = 10,
    target: TargetSpec = None,
    seed: int = 0,
    corruption: Corruption = "noise",
    method: Method = "exact",
    swap_subjects: str | Sequence[str] | None = None,
    multi_token: Literal["first", "all"] = "first",
    metric: Metric = "prob",
    setup: TraceSetup | None = None,
) -> TraceResult:
    """Causal trace of ``subject``'s effect on the answer to ``prompt``.

    Args:
        kind: ``"residual"`` restores one block output; ``"mlp"``/``"attn"`` (Mamba: ``"mixer"``,
            ``"ssm.in"``, ``"gate.in"``, ``"conv.out"``, ``"ssm.out"``, ``"gate"``, ``"mixer.key"``)
            restore that module's output in ``window`` layers centred on each layer (ROME's rule).
        samples: corrupted copies (noise draws) averaged per restoration.
        noise: ``"3x"`` (3 x the std of subject embeddings over known_1000's subjects), an absolute float,
            or a tensor used as the perturbation itself (broadcast to ``(samples, subject tokens, d)``).
        target: the answer (text, token id or ids); default: the model's clean top-1 next token.
            Multi-token targets score their first token unless ``multi_token="all"`` (product of the
            teacher-forced probabilities).
        seed: the noise draw (one draw per trace: every restoration sees the same corrupted inputs).
        corruption: ``"noise"`` on the subject's token embeddings, or ``"swap"``: the prompt with each of
            ``swap_subjects`` instead of the subject (left-padded so the subjects end together).
        method: ``"exact"``, or ``"attribution"``: the first-order (gradient) estimate from one clean
            and one corrupted pass (see :mod:`factlab.locate.attribution`).
        metric: ``"prob"`` (default) or ``"logit"`` of the target.

    Returns:
        :class:`TraceResult` with ``scores`` of shape ``(n_tokens, n_layers)``.
    """
    if window < 1:
        raise TraceInputError(f"window must be at least 1 layer, not {window}")
    check_kind(lm, kind)
    if method not in ("exact", "attribution"):
        raise TraceInputError(f"method must be 'exact' or 'attribution', not {method!r}")
    if setup is None:
        setup = prepare(
            lm, prompt, subject, target=target, multi_token=multi_token, corruption=corruption, samples=samples,
            noise=noise, seed=seed, swap_subjects=swap_subjects, metric=metric,
        )
    if method == "attribution":
        from factlab.locate.attribution import attribution_scores

        scores, low, high = attribution_scores(setup, kind, window)
        return _result(setup, kind, window if kind != "residual" else 1, scores, low, high, method)
    return _exact(setup, [kind], window)[kind]


def trace_kinds(
    lm: LoadedModel,
    prompt: str,
    subject: str,
    kinds: Sequence[str] | None = None,
    *,
    window: int = 10,
    method: Method = "exact",
    setup: TraceSetup | None = None,
    **kwargs,
) -> dict[str, TraceResult]:
    """Several kinds of :func:`trace` for one fact (default: every kind of the model) from one prepared
    setup; the exact method runs them together, sharing the clean and corrupted passes and batching
    restorations of different kinds that start at the same block. ``kwargs`` as for :func:`trace`."""
    kinds = list(kinds) if kinds else list(lm.adapter.trace_kinds)
    for k in kinds:
        check_kind(lm, k)
    if window < 1:
        raise TraceInputError(f"window must be at least 1 layer, not {window}")
    if setup is None:
        setup = prepare(lm, prompt, subject, **kwargs)
    if method not in ("exact", "attribution"):
        raise TraceInputError(f"method must be 'exact' or 'attribution', not {method!r}")
    if method == "attribution":
        return {k: trace(lm, prompt, subject, kind=k, window=window, method=method, setup=setup) for k in kinds}
    return _exact(setup, kinds, window)


def _exact(setup: TraceSetup, kinds: list[str], window: int) -> dict[str, TraceResult]:
    lm = setup.lm
    L = lm.adapter.n_layers
    sites = [f"layer.{j}.{lm.adapter.trace_kinds[k]}" for k in kinds if k != "residual" for j in range(L)]
    engine = Engine(setup, clean_sites=sites)
    jobs = [restorations(setup, k, window) for k in kinds]
    flat = engine.run([j for js in jobs for j in js], desc=f"trace {'+'.join(kinds)}").numpy()
    out, i = {}, 0
    for k, js in zip(kinds, jobs):
        scores = flat[i : i + len(js)].reshape(len(setup.token_pos), L)
        i += len(js)
        out[k] = _result(setup, k, window if k != "residual" else 1, scores, engine.low, engine.high, "exact")
    return out


def _result(setup: TraceSetup, kind: str, window: int, scores: np.ndarray, low: float, high: float, method: str) -> TraceResult:
    return TraceResult(
        prompt=setup.prompt,
        subject=setup.subject,
        tokens=setup.tokens,
        subject_range=setup.subject_rows,
        kind=kind,
        target=setup.target,
        target_ids=list(setup.target_ids),
        scores=np.asarray(scores, dtype=np.float64),
        low=float(low),
        high=float(high),
        window=window,
        samples=setup.samples,
        corruption=setup.corruption,
        noise_level=setup.noise_level,
        method=method,
        metric=setup.metric,
        model=setup.lm.name,
        swap_subjects=list(setup.swap_subjects),
    )
