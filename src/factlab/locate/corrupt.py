"""Corrupting the subject: Gaussian noise on its token embeddings (ROME) or a subject swap (the Mamba paper).

Noise levels follow ROME's ``collect_embedding_std``: ``sigma`` is the standard deviation of all entries of
the token-embedding outputs (the ``embed`` site: GPT-2's position embeddings are not included, Gemma's
scale is) of every subject of a dataset, each subject tokenised alone without special tokens. ``"3x"``
means ``3 * sigma``. The noise for one trace is one draw of shape ``(samples, n_subject_tokens, d)`` from
a standard normal (NumPy ``RandomState(seed)``, float64, cast to the model dtype) times the level, so every
restoration of a trace sees the same corrupted inputs (common random numbers); ``seed=1`` reproduces
ROME's draws.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Sequence, Union

import numpy as np
import torch

from factlab.io import write_json
from factlab.locate._common import TraceInputError
from factlab.models.loading import LoadedModel, cache_dir

NoiseSpec = Union[str, float, int, torch.Tensor]

_MULTIPLE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*x\s*$", re.IGNORECASE)


def embedding_std(lm: LoadedModel, subjects: Sequence[str] | None = None, *, cache: bool | str | Path = True) -> float:
    """Standard deviation of the ``embed`` site over the tokens of ``subjects`` (default: known_1000's).

    The value is cached on disk per model *as loaded* (``lm.numerics_id``: weights, dtype, attention
    implementation) and subject list (``<factlab cache>/noise/``, or the folder given as ``cache``;
    ``cache=False`` disables the cache); each file records ``lm.identity``.
    """
    if subjects is None:
        from factlab.data import load_known

        subjects = [r.subject for r in load_known()]
    subjects = [s for s in subjects if s and s.strip()]
    if not subjects:
        raise TraceInputError("embedding_std needs at least one non-empty subject")
    digest = hashlib.sha256("\n".join([lm.numerics_id, *subjects]).encode()).hexdigest()[:16]
    path = None
    if cache is not False:
        folder = Path(cache) if isinstance(cache, (str, Path)) else cache_dir() / "noise"
        safe = re.sub(r"[^A-Za-z0-9._@-]+", "_", lm.model_id)[:100]
        path = folder / f"{safe}-{lm.dtype_name}-{digest}.json"
        if path.exists():
            try:
                return float(json.loads(path.read_text())["std"])
            except (ValueError, KeyError):
                pass  # a damaged cache entry is recomputed
    emb = lm.adapter.embedding(lm.model)
    ids = lm.tokenizer(list(subjects), add_special_tokens=False)["input_ids"]
    flat = torch.tensor([i for row in ids for i in row], dtype=torch.long, device=lm.device)
    with torch.no_grad():
        values = emb(flat.unsqueeze(0)).float()
    std = float(values.std())
    if path is not None:
        write_json(path, {"std": std, "model_id": lm.model_id, "identity": lm.identity, "n_subjects": len(subjects),
                          "n_tokens": int(flat.numel())})
    return std


def noise_level(lm: LoadedModel, noise: NoiseSpec) -> float | None:
    """The absolute noise scale of ``noise`` (``"3x"`` -> 3 * :func:`embedding_std`); None for a tensor."""
    if isinstance(noise, torch.Tensor):
        return None
    if isinstance(noise, str):
        m = _MULTIPLE.match(noise)
        if not m:
            raise TraceInputError(f"noise {noise!r} is not understood; give a multiple of the embedding std like '3x', or an absolute float like 0.1")
        return float(m.group(1)) * embedding_std(lm)
    level = float(noise)
    if not np.isfinite(level) or level < 0:
        raise TraceInputError(f"noise level must be a finite number >= 0, not {noise!r}")
    return level


def draw_noise(lm: LoadedModel, noise: NoiseSpec, samples: int, n_tokens: int, seed: int = 0) -> tuple[torch.Tensor, float | None]:
    """The perturbation ``(samples, n_tokens, d)`` added to the subject's embeddings, and its level.

    A tensor ``noise`` is used as the perturbation itself (broadcast to that shape).
    """
    d = lm.adapter.d_model
    shape = (samples, n_tokens, d)
    if isinstance(noise, torch.Tensor):
        try:
            t = noise.to(device=lm.device, dtype=lm.dtype).expand(shape).clone()
        except RuntimeError:
            raise TraceInputError(f"a noise tensor must broadcast to (samples, subject tokens, d) = {shape}, not {tuple(noise.shape)}") from None
        return t, None
    level = noise_level(lm, noise)
    draw = np.random.RandomState(seed).randn(*shape)
    return (torch.from_numpy(draw) * level).to(device=lm.device, dtype=lm.dtype), level


def swap_prompt(prompt: str, span: tuple[int, int], other: str) -> str:
    """``prompt`` with the characters ``span`` (the subject) replaced by ``other``."""
    if not other or not other.strip():
        raise TraceInputError("a swap subject is empty; give another subject of the same relation")
    return prompt[: span[0]] + other + prompt[span[1] :]
