"""Second-moment statistics ``C = E[k k^T]`` of any site, streamed over a text corpus, cached on disk.

The corpus's documents are tokenised in order and cut into chunks of ``max_length`` tokens (a BOS is
prepended where the tokenizer adds one); the first ``samples`` chunks are used. Every non-padding token
of every chunk contributes ``k k^T`` (float32 products accumulated in float64); ``C`` is the sum divided
by the token count (uncentred, as ROME's ``layer_stats``), stored as float32.

The cache file is ``cache_dir()/stats/<key>.safetensors`` where the key hashes a :class:`StatsSpec`
(model id, the numerics the model ran in: weight dtype and attention implementation, site, corpus id,
samples, max length, accumulation dtype): statistics of a float32 and a bfloat16 run never share an entry.
While computing, partial sums are saved every ``checkpoint_every`` batches, and when the run is stopped
(an exception, Ctrl-C/SIGINT or SIGTERM), to ``partial_<hash>.safetensors``; a rerun with the same specs
continues from there. Several sites are computed in one pass (:func:`second_moments`).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from factlab.data.errors import DatasetNotFoundError
from factlab.edit.errors import NonFiniteStatisticsError, SingularStatisticsError, StatsMismatchError
from factlab.errors import InputError, IntegrityError
from factlab.interventions import run_and_capture
from factlab.io import atomic_path, load_tensors, save_tensors
from factlab.models import LoadedModel, cache_dir
from factlab.errors import Interrupted
from factlab.progress import Terminated, progress_bar, sigterm_raises, signal_name
from factlab.prompts import pad, pad_token_id, special_prefix

DEFAULT_CORPUS = "wikitext-2"
#: CPU-friendly defaults: 400 chunks of 256 tokens (~100k tokens). The reference uses 100k Wikipedia
#: articles of up to 1024-2048 tokens; raise ``samples`` on a GPU.
DEFAULT_SAMPLES = 400
DEFAULT_MAX_LENGTH = 256
#: 2: the spec records the model's numerics (``model_dtype``, ``attn_implementation``); version-1 files
#: (written before) never match a model and are recomputed.
FORMAT_VERSION = 2


@dataclass(frozen=True)
class StatsSpec:
    """What a statistics file holds; its :meth:`key` names the cache file.

    ``model_dtype`` and ``attn_implementation`` are the numerics the model ran in (``lm.numerics``); ``dtype``
    is the accumulation dtype. A file written before factlab recorded the numerics has ``model_dtype=None``
    and matches no model.
    """

    model_id: str
    site: str
    corpus_id: str
    samples: int
    max_length: int
    dtype: str = "float64"
    version: int = FORMAT_VERSION
    model_dtype: str | None = None
    attn_implementation: str | None = None

    @classmethod
    def of(cls, lm: LoadedModel, site: str, corpus_id: str, samples: int, max_length: int) -> "StatsSpec":
        """The spec of statistics of ``site`` computed by running ``lm`` as it is loaded now."""
        return cls(lm.model_id, site, corpus_id, int(samples), int(max_length),
                   model_dtype=lm.dtype_name, attn_implementation=lm.attn_implementation)

    @property
    def numerics(self) -> dict[str, str | None]:
        """The model numerics these statistics were computed in (compare with ``lm.numerics``)."""
        return {"dtype": self.model_dtype, "attn_implementation": self.attn_implementation}

    def key(self) -> str:
        digest = hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:20]
        name = f"{self.model_id.split('@')[0]}_{self.model_dtype or 'unknown'}_{self.site}"
        safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", name)[-80:]
        return f"{safe}_{digest}"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def describe_numerics(numerics: dict[str, str | None]) -> str:
    """``"bfloat16, sdpa attention"`` (``"unrecorded numerics"`` for files written before factlab recorded them)."""
    if not numerics.get("dtype"):
        return "unrecorded numerics"
    attn = numerics.get("attn_implementation")
    return f"{numerics['dtype']}, {attn} attention" if attn else str(numerics["dtype"])


RECOMPUTE = "recompute them (`factlab stats`, or second_moments(..., use_cache=False))"


def check_finite(m: "SecondMoment", where: str, error: type[Exception] = NonFiniteStatisticsError, fix: str = RECOMPUTE) -> "SecondMoment":
    """Return ``m``; raise ``error`` naming ``where`` and ``fix`` when its matrix holds NaN or inf."""
    if not bool(torch.isfinite(m.mom2).all()):
        bad = int((~torch.isfinite(m.mom2)).sum())
        raise error(f"statistics {where} hold NaN/inf ({bad} of {m.mom2.numel()} entries) and cannot be used; {fix}")
    return m


@dataclass
class SecondMoment:
    """``mom2``: ``(d, d)`` float32 ``E[k k^T]`` over ``count`` tokens; ``spec`` says what it was computed on.

    :meth:`factor` returns (and keeps on this instance, never globally) the Cholesky factor of
    ``scale * C + ridge * mean(diag C) * I`` in float64, so repeated edits reuse it.
    """

    mom2: torch.Tensor
    count: int
    spec: StatsSpec | None = None
    _factors: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def dim(self) -> int:
        return int(self.mom2.shape[0])

    def matrix(self, scale: float = 1.0, ridge: float = 0.0) -> torch.Tensor:
        """``scale * C + ridge * mean(diag C) * I`` as float64."""
        c = self.mom2.double() * scale
        if ridge:
            c = c + ridge * c.diagonal().mean() * torch.eye(self.dim, dtype=c.dtype, device=c.device)
        return c

    def factor(self, scale: float = 1.0, ridge: float = 0.0) -> torch.Tensor:
        """Lower Cholesky factor (float64) of :meth:`matrix`; raises :class:`SingularStatisticsError`."""
        key = (float(scale), float(ridge))
        if key not in self._factors:
            check_finite(self, f"for {self._where()}")
            L, info = torch.linalg.cholesky_ex(self.matrix(scale, ridge))
            if int(info) != 0:
                raise SingularStatisticsError(
                    f"the second moment of {self._where()} ({self.dim} dims, {self.count} tokens) is not positive definite; "
                    "compute it from more tokens (samples/max_length, at least several times its dimension) or set "
                    "hparams ridge > 0 (e.g. 1e-4)"
                )
            self._factors[key] = L
        return self._factors[key]

    def _where(self) -> str:
        return self.spec.site if self.spec else "the site"

    def to_dict(self) -> dict[str, Any]:
        return {"dim": self.dim, "count": self.count, "spec": self.spec.to_dict() if self.spec else None}

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write as safetensors with the spec in the metadata (atomic)."""
        meta = {"count": str(self.count), "spec": json.dumps(self.spec.to_dict() if self.spec else None)}
        return save_tensors(path, {"mom2": self.mom2.float().cpu().contiguous()}, metadata=meta)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> "SecondMoment":
        """Read a file written by :meth:`save`; a missing file raises :class:`InputError`, an unreadable one
        :class:`IntegrityError` (both name the file)."""
        from safetensors import safe_open

        p = Path(path)
        if not p.is_file():
            raise InputError(f"statistics file {p} does not exist; give a file written by `factlab stats --export` or export_stats()")
        try:
            with safe_open(str(p), framework="pt") as f:
                meta = f.metadata() or {}
                mom2 = f.get_tensor("mom2")
            spec = json.loads(meta.get("spec", "null"))
            return cls(mom2=mom2, count=int(meta.get("count", 0)), spec=StatsSpec(**spec) if spec else None)
        except Exception as e:  # safetensors and json raise several types for a damaged or foreign file
            raise IntegrityError(f"{p} is not a readable factlab statistics file ({type(e).__name__}: {e}); "
                                 "export it again, or recompute the statistics") from e


def stats_dir() -> Path:
    return cache_dir() / "stats"


def stats_path(spec: StatsSpec) -> Path:
    """The cache file of ``spec``."""
    return stats_dir() / f"{spec.key()}.safetensors"


def _chunks(lm: LoadedModel, documents: Iterator[str], max_length: int) -> Iterator[list[int]]:
    tok = lm.tokenizer
    bos = special_prefix(tok)
    room = max_length - len(bos)
    if room < 2:
        raise InputError(f"max_length {max_length} is too small for chunks of at least 2 tokens; use at least {len(bos) + 2}")
    for doc in documents:
        ids = tok(doc, add_special_tokens=False)["input_ids"]
        for s in range(0, len(ids), room):
            piece = ids[s : s + room]
            if len(piece) >= 2:
                yield list(bos) + piece


def _open_corpus(corpus: Any):
    if hasattr(corpus, "documents") and hasattr(corpus, "id"):
        return corpus
    from factlab.data import load_text_corpus

    return load_text_corpus(corpus)


def second_moments(
    lm: LoadedModel,
    sites: list[str],
    *,
    corpus: Any = DEFAULT_CORPUS,
    samples: int = DEFAULT_SAMPLES,
    max_length: int = DEFAULT_MAX_LENGTH,
    batch_size: int = 8,
    use_cache: bool = True,
    checkpoint_every: int = 10,
    on_batch: Callable[[int, int], None] | None = None,
) -> dict[str, SecondMoment]:
    """``E[k k^T]`` for each site (cached ones are loaded; the rest computed in one pass).

    Args:
        corpus: ``"wikitext-2"``, a text file or folder, an ``"hf:..."`` name (see
            :func:`factlab.data.load_text_corpus`), or a ``TextCorpus``.
        samples: number of chunks of ``max_length`` tokens.
        on_batch: called as ``on_batch(chunks_done, tokens_done)`` after every batch (progress hooks;
            an exception raised there interrupts the run, and a rerun resumes from the last checkpoint).

    Ctrl-C (SIGINT) or SIGTERM while computing saves the progress and raises
    :class:`~factlab.progress.Interrupted` saying how many chunks were done; the same call again resumes.
    A cached file holding NaN/inf raises :class:`~factlab.errors.IntegrityError` naming it.
    """
    for s in sites:
        lm.adapter.site(s)
    for name, value in (("samples", samples), ("max_length", max_length), ("batch_size", batch_size), ("checkpoint_every", checkpoint_every)):
        if int(value) < 1:
            raise InputError(f"{name} must be at least 1, not {value}")
    try:
        text = _open_corpus(corpus)
    except DatasetNotFoundError:
        # The corpus is gone (offline, or only the statistics were imported): cached statistics of the same
        # model, site, corpus name and sizes still answer; anything missing re-raises the corpus error.
        found = _cached_without_corpus(lm, sites, corpus, int(samples), int(max_length)) if use_cache else {}
        if len(found) == len(sites):
            return found
        raise
    specs = {s: StatsSpec.of(lm, s, text.id, samples, max_length) for s in sites}
    out: dict[str, SecondMoment] = {}
    todo = []
    for s, spec in specs.items():
        p = stats_path(spec)
        if use_cache and p.exists():
            out[s] = load_cached(p)
        else:
            todo.append(s)
    if not todo:
        return out
    out.update(_compute(lm, todo, specs, text, batch_size, use_cache, checkpoint_every, on_batch))
    return out


def load_cached(path: Path) -> SecondMoment:
    """A statistics file from the cache; one holding NaN/inf raises :class:`IntegrityError` naming it."""
    return check_finite(SecondMoment.load(path), f"in the cache file {path}", IntegrityError, "delete the file and run again to recompute them")


def _spec_of(path: Path) -> StatsSpec | None:
    """The spec in a statistics file's metadata (the matrix is not read)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            spec = json.loads((f.metadata() or {}).get("spec", "null"))
        return StatsSpec(**spec) if spec else None
    except Exception:  # a foreign or torn file in the cache folder is not ours to judge here
        return None


def _corpus_name(spec: str) -> str:
    """The ``name`` part of the id that :func:`factlab.data.load_text_corpus` gives the corpus ``spec``."""
    if spec in ("wikitext-2", "wikitext2"):
        return "wikitext-2"
    if spec.startswith("hf:"):
        return spec
    return Path(spec).expanduser().stem


def _cached_without_corpus(lm: LoadedModel, sites: list[str], corpus: Any, samples: int, max_length: int) -> dict[str, SecondMoment]:
    """Cached statistics matching everything (model, numerics, sizes) but the corpus content hash, for a corpus
    named by string.

    Used only when the corpus itself cannot be found (an offline user with imported statistics); the newest
    matching file wins per site.
    """
    if not isinstance(corpus, (str, os.PathLike)) or not stats_dir().is_dir():
        return {}
    name = _corpus_name(os.fspath(corpus))
    best: dict[str, tuple[float, Path]] = {}
    for path in stats_dir().glob("*.safetensors"):
        if path.name.endswith(".partial.safetensors"):
            continue
        spec = _spec_of(path)
        if (spec is None or spec.model_id != lm.model_id or spec.numerics != lm.numerics or spec.site not in sites
                or spec.samples != samples or spec.max_length != max_length or spec.version != FORMAT_VERSION
                or spec.corpus_id.split("@")[0] != name):
            continue
        mtime = path.stat().st_mtime
        if spec.site not in best or mtime > best[spec.site][0]:
            best[spec.site] = (mtime, path)
    return {site: load_cached(path) for site, (_, path) in best.items()}


def second_moment(lm: LoadedModel, site: str, **kwargs: Any) -> SecondMoment:
    """``E[k k^T]`` of one site; see :func:`second_moments`."""
    return second_moments(lm, [site], **kwargs)[site]


def _partial_path(specs: dict[str, StatsSpec], todo: list[str]) -> Path:
    joint = hashlib.sha256("|".join(specs[s].key() for s in todo).encode()).hexdigest()[:20]
    return stats_dir() / f"partial_{joint}.safetensors"


@dataclass(frozen=True)
class _Progress:
    """Partial sums of ``k k^T`` per site (float64) after ``done`` chunks holding ``count`` tokens.

    Replaced as a whole after every batch (one assignment), so a signal arriving anywhere in a batch leaves
    either the old or the new progress, never sums of one and counts of the other.
    """

    sums: dict[str, torch.Tensor] = field(default_factory=dict)
    count: int = 0
    done: int = 0


def _read_partial(path: Path, todo: list[str]) -> _Progress:
    """The progress saved in ``path`` (empty when there is none or it does not hold every site)."""
    if not path.exists():
        return _Progress()
    saved = load_tensors(path)
    if not all(f"sum.{i}" in saved for i in range(len(todo))):
        return _Progress()
    return _Progress({s: saved[f"sum.{i}"] for i, s in enumerate(todo)}, int(saved["count"]), int(saved["done"]))


def _write_partial(path: Path, todo: list[str], progress: _Progress) -> None:
    """Save ``progress`` atomically (nothing to save before the first batch)."""
    if progress.done == 0:
        return
    t = {f"sum.{i}": progress.sums[s] for i, s in enumerate(todo)}
    t["count"] = torch.tensor(progress.count)
    t["done"] = torch.tensor(progress.done)
    save_tensors(path, t)


def _interrupted(stop: BaseException, progress: _Progress, samples: int, partial: Path | None) -> Interrupted:
    """The error raised after SIGINT/SIGTERM stopped a statistics run (its progress already saved)."""
    what = f"statistics interrupted by {signal_name(stop)} after {progress.done} of {samples} chunks ({progress.count} tokens)"
    code = 143 if isinstance(stop, Terminated) else 130
    if partial is None:
        return Interrupted(f"{what}; nothing was saved (use_cache=False): run again to start over", exit_code=code)
    if progress.done == 0:
        return Interrupted(f"{what}; nothing to save yet: run the same command again to start", exit_code=code)
    return Interrupted(f"{what}; progress saved to {partial}: run the same command again to resume from there", exit_code=code)


def _compute(lm, todo, specs, text, batch_size, use_cache, checkpoint_every, on_batch) -> dict[str, SecondMoment]:
    samples, max_length = specs[todo[0]].samples, specs[todo[0]].max_length
    partial = _partial_path(specs, todo)
    state = _read_partial(partial, todo) if use_cache else _Progress()

    def checkpoint() -> None:
        if use_cache:
            _write_partial(partial, todo, state)

    chunks = _chunks(lm, text.documents(), max_length)
    for _ in range(state.done):
        next(chunks, None)
    bar = progress_bar(desc=f"second moments ({len(todo)} site(s))", total=samples, unit="chunk")
    bar.update(state.done)
    batches_since = 0
    try:
        with sigterm_raises():
            while state.done < samples:
                rows = []
                for c in chunks:
                    rows.append(c)
                    if len(rows) == min(batch_size, samples - state.done):
                        break
                if not rows:
                    break
                batch = pad(rows, pad_id=pad_token_id(lm.tokenizer), padding_side="right", device=lm.device)
                acts = run_and_capture(lm, batch, todo, stop_early=True)
                mask = batch.attention_mask.bool()
                sums = {s: _add_outer(state.sums.get(s), acts[s], mask) for s in todo}
                state = _Progress(sums, state.count + int(mask.sum()), state.done + len(rows))
                bar.update(len(rows))
                bar.set_postfix(tokens=state.count)
                batches_since += 1
                if batches_since >= checkpoint_every:
                    checkpoint()
                    batches_since = 0
                if on_batch is not None:
                    on_batch(state.done, state.count)
    except KeyboardInterrupt as stop:  # Ctrl-C, or SIGTERM (sigterm_raises): save, then say how to resume
        checkpoint()
        raise _interrupted(stop, state, samples, partial if use_cache else None) from stop
    except BaseException:
        checkpoint()
        raise
    finally:
        bar.close()
    if state.count == 0:
        raise NonFiniteStatisticsError("the corpus produced no tokens; give a non-empty corpus")
    out = {}
    for s in todo:
        mom2 = (state.sums[s] / state.count).float()
        if not torch.isfinite(mom2).all():
            raise NonFiniteStatisticsError(f"statistics of {s} hold NaN/inf (the model produced non-finite activations); run it in float32")
        m = SecondMoment(mom2, state.count, specs[s])  # a corpus shorter than `samples` chunks: count says how many tokens
        if use_cache:
            m.save(stats_path(specs[s]))
        out[s] = m
    if use_cache and partial.exists():
        partial.unlink()
    return out


def _add_outer(total: torch.Tensor | None, acts: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``total + sum_t k_t k_t^T`` over the unmasked tokens of ``acts`` ``(B, T, ...)`` (float32 products, float64 sum, CPU).

    A new tensor: ``total`` is never changed in place (it may be the last saved progress).
    """
    k = acts[mask.to(acts.device)].float()
    k = k.reshape(k.shape[0], -1)
    part = (k.T @ k).double().cpu()
    return part if total is None else total + part


def export_stats(stats: SecondMoment, path: str | os.PathLike[str]) -> Path:
    """Write statistics to ``path`` (safetensors + spec metadata) for another machine."""
    return stats.save(path)


def import_stats(path: str | os.PathLike[str], lm: LoadedModel | None = None, site: str | None = None) -> SecondMoment:
    """Read an exported statistics file and copy it into the cache (checked against ``lm``/``site`` when given).

    Refused before anything is copied: a file holding NaN/inf (:class:`IntegrityError`), one without a spec,
    one written before factlab recorded the model's numerics, or one made for another model, other numerics
    (dtype, attention implementation) or another site (:class:`StatsMismatchError`).
    """
    m = SecondMoment.load(path)
    check_finite(m, f"in {path}", IntegrityError)
    if m.spec is None:
        raise StatsMismatchError(f"{path} has no spec metadata; it was not written by factlab")
    if m.spec.version != FORMAT_VERSION or m.spec.model_dtype is None:
        raise StatsMismatchError(f"{path} was written by an older factlab (format {m.spec.version}) that did not record the "
                                 "model's dtype; recompute the statistics with `factlab stats` and export them again")
    if lm is not None and m.spec.model_id != lm.model_id:
        raise StatsMismatchError(f"{path} was computed for {m.spec.model_id}, not {lm.model_id}")
    if lm is not None and m.spec.numerics != lm.numerics:
        raise StatsMismatchError(f"{path} was computed with the model in {describe_numerics(m.spec.numerics)}, but it is loaded "
                                 f"in {describe_numerics(lm.numerics)}; load it with dtype={m.spec.model_dtype} or recompute the statistics")
    if site is not None and m.spec.site != site:
        raise StatsMismatchError(f"{path} holds {m.spec.site}, not {site}")
    dest = stats_path(m.spec)
    dest.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(dest) as tmp:
        shutil.copyfile(path, tmp)
    return m
