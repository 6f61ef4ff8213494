"""What an edit did: per-parameter weight deltas (low-rank factors kept), the originals, and metadata.

The edited value of a parameter is always ``(original.double() + delta.double()).to(param.dtype)``, so
``apply`` reproduces the same bits every time (also after ``save``/``load`` onto the same original
weights) and ``restore`` writes the kept originals back bit for bit.

A saved edit (format ``factlab-edit/2``) records the sha256 of every saved tensor and, per edited parameter,
the sha256 of the weights it was made on (its *base*) and of the edited weights. ``load`` refuses a damaged
edit (checksum mismatch, NaN/inf, unreadable file); ``apply`` of a loaded edit refuses weights that already
carry it (applying twice would add the delta twice) or that are not its base, unless ``apply(stack=True)``.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from factlab.edit.errors import (
    AlreadyAppliedError,
    BaseMismatchError,
    CorruptEditError,
    DivergenceError,
    EditNotFoundError,
    EditStateError,
    StatsMismatchError,
)
from factlab.errors import InputError
from factlab.io import atomic_folder, load_tensors, save_tensors, write_json
from factlab.models import LoadedModel

FORMAT = "factlab-edit/2"
#: formats still read: no checksums, no base digests (loaded with a warning that they cannot be verified)
OLD_FORMATS = ("factlab-edit/1",)
TENSORS_FILE = "deltas.safetensors"
INFO_FILE = "edit.json"
_FLOATS = (torch.float64, torch.float32, torch.bfloat16, torch.float16)
_STACK_HINT = "stack it onto these weights on purpose with apply(stack=True) (CLI: factlab edit apply --stack)"


def _params(lm: LoadedModel) -> dict[str, torch.nn.Parameter]:
    return dict(lm.model.named_parameters(remove_duplicate=False))


def edited_value(original: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """The edited weight: ``original + delta`` computed in float64, stored in the original's dtype/device."""
    return (original.double() + delta.to(original.device).double()).to(original.dtype)


def tensor_digest(t: torch.Tensor) -> str:
    """Hex sha256 of the exact bytes of ``t`` (its own dtype, C order); equal digests mean bit-identical values."""
    flat = t.detach().cpu().contiguous().reshape(-1)
    return hashlib.sha256(flat.view(torch.uint8).numpy()).hexdigest()


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.float32`` -> ``"float32"``."""
    return str(dtype).removeprefix("torch.")


def weight_digests(original: torch.Tensor, delta: torch.Tensor) -> dict[str, dict[str, str]]:
    """dtype name -> ``{"base": sha256 of the original, "edited": sha256 of the edited weight}``.

    Given for the original's dtype and every narrower float dtype (the original cast to it): a model loaded with
    ``dtype=bfloat16`` from the same checkpoint holds exactly that cast, so the edit is recognised there too.
    """
    out: dict[str, dict[str, str]] = {}
    for dt in _FLOATS:
        if dt.itemsize > original.dtype.itemsize:
            continue
        base = original if dt == original.dtype else original.to(dt)
        out[dtype_name(dt)] = {"base": tensor_digest(base), "edited": tensor_digest(edited_value(base, delta))}
    return out


@dataclass(repr=False)
class EditResult:
    """An applied (or loaded, not yet applied) weight edit of ``lm``.

    Attributes:
        deltas: parameter name (as in ``model.named_parameters()``) -> dense delta, same shape as the
            parameter (float32, or float64 for :meth:`from_weights`), on the CPU.
        factors: for low-rank updates, name -> ``(A, B)`` with ``delta == A @ B.T`` (float64, CPU).
        originals: name -> the parameter's value before this edit (same dtype/device).
        method: ``"rome"``, ``"memit"``, ``"emmet"`` or what :meth:`from_weights` was told.
        metadata: layers, hyperparameters, requests, statistics keys, per-request optimisation results.
        applied: whether the model currently holds the edited weights.
        solves: one entry per solve (in memory only, not saved): ``layer``, ``parameter``, ``keys``
            ``(n, d_in)``, ``residuals`` ``(n, d_out)`` (what the update had to add at the keys) and
            ``targets`` ``(n, d_out)`` (the projection's outputs it had to reach), float64.
        digests: for an edit read by :meth:`load`, what its file recorded: name -> dtype name ->
            ``{"base", "edited"}`` sha256 of the weights it was made on and of the edited weights (see
            :func:`weight_digests`; saving it again keeps them). Empty for a result of ``edit()`` or
            :meth:`from_weights` and after ``apply(stack=True)``: :meth:`save` computes them from ``originals``.
        base_known: whether ``originals`` are the weights this edit was made on (true for a result of ``edit()``
            or :meth:`from_weights`; a loaded edit checks the model's weights against ``digests`` on its first
            :meth:`apply`).
    """

    lm: LoadedModel
    deltas: dict[str, torch.Tensor]
    originals: dict[str, torch.Tensor]
    method: str
    metadata: dict[str, Any] = field(default_factory=dict)
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    applied: bool = False
    solves: list[dict[str, Any]] = field(default_factory=list)
    digests: dict[str, dict[str, dict[str, str]]] = field(default_factory=dict)
    base_known: bool = True

    # ------------------------------------------------------------------ state
    def _check_params(self) -> dict[str, torch.nn.Parameter]:
        params = _params(self.lm)
        for name, d in self.deltas.items():
            if name not in params:
                raise EditStateError(f"the model has no parameter {name!r}; this edit belongs to another architecture")
            if tuple(params[name].shape) != tuple(d.shape):
                raise EditStateError(f"{name}: the delta is {tuple(d.shape)} but the parameter is {tuple(params[name].shape)}")
        return params

    def edited(self, name: str) -> torch.Tensor:
        """The edited value of parameter ``name``."""
        return edited_value(self.originals[name], self.deltas[name])

    def _check_base(self, params: dict[str, torch.nn.Parameter]) -> None:
        """Refuse weights that already carry this (loaded) edit or that are not the base it was made on."""
        state: dict[str, str] = {}
        for n in self.deltas:
            w = params[n].data
            rec = self.digests.get(n, {}).get(dtype_name(w.dtype))
            if rec is None:
                raise BaseMismatchError(
                    f"{n}: this edit recorded its base weights in {', '.join(self.digests.get(n, {})) or 'no dtype'} only, "
                    f"but the model holds {dtype_name(w.dtype)}; load the model in the dtype the edit was made in, or "
                    f"{_STACK_HINT}"
                )
            d = tensor_digest(w)
            state[n] = "base" if d == rec["base"] else "edited" if d == rec["edited"] else "other"
        if all(v == "edited" for v in state.values()):
            raise AlreadyAppliedError(
                "the model already carries this edit (its weights are the edited ones): applying it again would add "
                f"the delta twice (re-running a notebook cell?); use the model as it is, or {_STACK_HINT}"
            )
        other = [n for n, v in state.items() if v != "base"]
        if other:
            raise BaseMismatchError(
                f"{other[0]} is not the weights this edit was made on (its sha256 is neither the recorded base's nor the "
                f"edited one's: another model, another edit applied, or changed weights); apply it to the model it was "
                f"made for, or {_STACK_HINT}"
            )

    @torch.no_grad()
    def apply(self, *, force: bool = False, stack: bool = False) -> "EditResult":
        """Write the edited weights (idempotent).

        Refuses when the weights are no longer this edit's originals (someone changed them) unless ``force``.
        An edit read by :meth:`load` first checks the model against the digests saved with it: weights that
        already carry the edit raise :class:`AlreadyAppliedError` (applying it twice would give ``W0 + 2Δ``),
        weights that are not the base it was made on raise :class:`BaseMismatchError`. ``stack=True`` skips
        that check and adds the delta to whatever the model holds (the current weights become this result's
        originals and base; ``restore`` brings them back). Nothing is written when it refuses, nor when an edited
        weight would be NaN/inf (:class:`DivergenceError`, e.g. a delta that overflows float16).
        """
        if self.applied:
            return self
        params = self._check_params()
        if not self.base_known and not stack and self.digests:
            self._check_base(params)
        if not force:
            changed = [n for n in self.deltas if not torch.equal(params[n].data, self.originals[n])]
            if changed:
                raise EditStateError(
                    f"{changed[0]} no longer holds this edit's original weights (changed by another edit?); "
                    "restore the other edit first, or apply(force=True) to overwrite it"
                )
        bad = next((n for n in self.deltas if not torch.isfinite(self.edited(n)).all()), None)  # one at a time: memory
        if bad is not None:
            raise DivergenceError(f"applying this edit would put NaN/inf in {bad} (the delta overflows "
                                  f"{dtype_name(params[bad].dtype)}); nothing was written")
        for n in self.deltas:
            params[n].data.copy_(self.edited(n))
        if stack and not self.base_known:
            self.digests = {}  # stacked: the originals, not the recorded base, are what this result was applied on
        self.base_known = True
        self.applied = True
        return self

    @torch.no_grad()
    def restore(self, *, force: bool = False) -> "EditResult":
        """Write the original weights back, bit for bit (idempotent). Refuses when the weights were changed
        after this edit was applied (e.g. a later edit is still applied) unless ``force``."""
        if not self.applied:
            return self
        params = self._check_params()
        if not force:
            changed = [n for n in self.deltas if not torch.equal(params[n].data, self.edited(n))]
            if changed:
                raise EditStateError(
                    f"{changed[0]} was changed after this edit was applied (a later edit?); restore later edits first "
                    "(reverse order), or restore(force=True)"
                )
        for n, orig in self.originals.items():
            params[n].data.copy_(orig)
        self.applied = False
        return self

    # ------------------------------------------------------------------ info
    def delta_norms(self) -> dict[str, float]:
        """Frobenius norm of each delta."""
        return {n: float(d.double().norm()) for n, d in self.deltas.items()}

    def ranks(self) -> dict[str, int]:
        """Rank of each low-rank update (columns of its factors); dense deltas are absent."""
        return {n: int(f[0].shape[1]) for n, f in self.factors.items()}

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "applied": self.applied,
            "parameters": {n: list(d.shape) for n, d in self.deltas.items()},
            "delta_norms": self.delta_norms(),
            "rank": self.ranks(),
            "metadata": self.metadata,
        }

    def _n_requests(self) -> int | None:
        reqs = self.metadata.get("requests")
        return len(reqs) if isinstance(reqs, list) else None

    def __repr__(self) -> str:
        shown = list(self.deltas.items())[:4]
        params = ", ".join(f"{n!r}: {tuple(d.shape)}" for n, d in shown)
        more = f", ... {len(self.deltas) - len(shown)} more" if len(self.deltas) > len(shown) else ""
        ranks = sorted(set(self.ranks().values()))
        rank = "dense" if not ranks else str(ranks[0]) if len(ranks) == 1 else str(ranks)
        return (f"EditResult(method={self.method!r}, applied={self.applied}, requests={self._n_requests()}, "
                f"rank={rank}, parameters={{{params}{more}}}, model={self.lm.name!r})")

    def _repr_html_(self) -> str:
        from html import escape

        ranks, norms = self.ranks(), self.delta_norms()
        rows = "".join(
            f"<tr><td><code>{escape(n)}</code></td><td>{tuple(d.shape)}</td><td>{ranks.get(n, 'dense')}</td>"
            f"<td>{norms[n]:.4g}</td></tr>"
            for n, d in list(self.deltas.items())[:12]
        )
        more = f"<tr><td colspan=4>... {len(self.deltas) - 12} more</td></tr>" if len(self.deltas) > 12 else ""
        return (f"<b>EditResult</b> {escape(self.method)} of {escape(self.lm.name)}: "
                f"{'applied' if self.applied else 'not applied'}, {self._n_requests()} request(s)"
                f"<table><tr><th>parameter</th><th>shape</th><th>rank</th><th>‖Δ‖</th></tr>{rows}{more}</table>")

    # ------------------------------------------------------------------ constructors
    @classmethod
    @torch.no_grad()
    def from_weights(
        cls, lm: LoadedModel, new_weights: dict[str, torch.Tensor], *, method: str, metadata: dict | None = None
    ) -> "EditResult":
        """Record the current values of the named parameters, write ``new_weights`` and return an applied
        result whose ``restore()`` brings the originals back (deltas kept in float64)."""
        params = _params(lm)
        deltas, originals = {}, {}
        for name, new in new_weights.items():
            if name not in params:
                raise EditStateError(f"the model has no parameter {name!r}; names are those of model.named_parameters()")
            p = params[name]
            if tuple(new.shape) != tuple(p.shape):
                raise EditStateError(f"{name}: new value is {tuple(new.shape)} but the parameter is {tuple(p.shape)}")
            if not torch.isfinite(new).all():
                raise EditStateError(f"{name}: the new value holds NaN/inf")
            originals[name] = p.data.clone()
            deltas[name] = (new.detach().to(p.device).double() - p.data.double()).cpu()
        res = cls(lm, deltas, originals, method, dict(metadata or {}))
        for name in new_weights:
            params[name].data.copy_(res.edited(name))  # == new (float64 difference of float32/16 values is exact)
        res.applied = True
        return res

    # ------------------------------------------------------------------ files
    def _tensors(self) -> dict[str, torch.Tensor]:
        tensors = {f"delta/{n}": d for n, d in self.deltas.items()}
        for n, (A, B) in self.factors.items():
            tensors[f"factor_a/{n}"] = A
            tensors[f"factor_b/{n}"] = B
        return tensors

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write ``path/`` with ``deltas.safetensors`` (deltas and factors) and ``edit.json`` (with the sha256 of
        every tensor and of the base and edited weights of every parameter); atomic (a temporary folder is renamed
        onto ``path``). Refuses, before writing anything, a ``path`` that is a file or a non-empty folder that is
        not a saved edit, and a delta holding NaN/inf."""
        final = check_save_path(path)
        bad = [n for n, d in self.deltas.items() if not torch.isfinite(d).all()]
        if bad:
            raise DivergenceError(f"the delta of {bad[0]} holds NaN/inf; refusing to save an edit that would break the model")
        tensors = self._tensors()
        info = {
            "format": FORMAT,
            "method": self.method,
            "model_id": self.lm.model_id,
            "model": self.lm.name,
            "parameters": {
                n: {"shape": list(d.shape), "dtype": dtype_name(self.originals[n].dtype),
                    "weights": self.digests.get(n) or weight_digests(self.originals[n], d)}
                for n, d in self.deltas.items()
            },
            "checksums": {k: tensor_digest(v) for k, v in tensors.items()},
            "metadata": self.metadata,
        }
        with atomic_folder(final) as tmp:
            save_tensors(tmp / TENSORS_FILE, tensors)
            write_json(tmp / INFO_FILE, info)
        return final

    @classmethod
    def load(cls, path: "str | os.PathLike[str] | SavedEdit", lm: LoadedModel, *, strict: bool = True) -> "EditResult":
        """Read a saved edit for ``lm`` (not applied: call :meth:`apply`, which checks that the model holds the
        weights the edit was made on; see there for ``stack=True``).

        ``path`` is the folder written by :meth:`save` (or what :func:`read_saved_edit` returned for it). The
        files are verified first: a missing folder raises :class:`EditNotFoundError`, a damaged one (checksum
        mismatch, NaN/inf, unreadable) :class:`CorruptEditError`; an edit of the older format ``factlab-edit/1``
        loads with a warning that it cannot be verified. The model's current weights become the originals;
        ``strict`` refuses an edit saved for a different ``model_id``."""
        saved = path if isinstance(path, SavedEdit) else read_saved_edit(path)
        p, info, tensors = saved.path, saved.info, saved.tensors
        if strict and info.get("model_id") != lm.model_id:
            raise StatsMismatchError(
                f"{p} was saved for {info.get('model_id')}, not {lm.model_id}; load the same model, or pass strict=False "
                "(CLI: factlab edit apply --stack) to apply it to this one anyway"
            )
        deltas = {k[len("delta/"):]: v for k, v in tensors.items() if k.startswith("delta/")}
        factors = {
            k[len("factor_a/"):]: (v, tensors[f"factor_b/{k[len('factor_a/'):]}"]) for k, v in tensors.items() if k.startswith("factor_a/")
        }
        params = _params(lm)
        originals = {}
        for n, d in deltas.items():
            if n not in params or tuple(params[n].shape) != tuple(d.shape):
                raise EditStateError(f"{p}: parameter {n} {tuple(d.shape)} does not exist in this model with that shape")
            originals[n] = params[n].data.clone()
        digests = {n: v["weights"] for n, v in info["parameters"].items() if isinstance(v, dict) and v.get("weights")}
        return cls(lm, deltas, originals, info["method"], info.get("metadata", {}), factors, applied=False,
                   digests=digests, base_known=False)


def check_save_path(path: str | os.PathLike[str]) -> Path:
    """``path`` as a Path if :meth:`EditResult.save` may write there (new, empty, or an earlier saved edit, which is
    replaced); else :class:`~factlab.errors.InputError`: a file or a folder holding other things is never replaced."""
    final = Path(path)
    if final.exists() and not final.is_dir():
        raise InputError(f"{final} is an existing file, not a folder; an edit is saved as a folder (edit.json and "
                         f"{TENSORS_FILE}): choose another path (the file was left untouched)")
    if final.is_dir() and any(final.iterdir()) and not (final / INFO_FILE).is_file():
        raise InputError(f"{final} is a folder that is not a saved edit; choose a new or empty folder (nothing was changed)")
    return final


# ---------------------------------------------------------------------- reading and verifying a saved edit
@dataclass(frozen=True, repr=False)
class SavedEdit:
    """A verified saved edit, not yet tied to a model: ``info`` is the parsed ``edit.json``, ``tensors`` the
    saved tensors (``delta/NAME``, ``factor_a/NAME``, ``factor_b/NAME``, CPU)."""

    path: Path
    info: dict[str, Any]
    tensors: dict[str, torch.Tensor]

    def __repr__(self) -> str:
        return f"SavedEdit({str(self.path)!r}, method={self.info.get('method')!r}, parameters={len(self.info['parameters'])})"


def read_saved_edit(path: str | os.PathLike[str]) -> SavedEdit:
    """Read a folder written by :meth:`EditResult.save` and verify it; needs no model (cheap: run it before loading
    one), and :meth:`EditResult.load` accepts the result.

    Raises :class:`EditNotFoundError` when ``path`` is not a saved edit, :class:`CorruptEditError` (an
    :class:`~factlab.errors.IntegrityError`) when a file is unreadable, a tensor fails its sha256 checksum or any
    delta/factor holds NaN/inf (checked even when the checksums match). An edit of format ``factlab-edit/1`` (no
    checksums) is read with a warning.
    """
    p = Path(path)
    info = _read_info(p)
    tensors = _read_tensors(p / TENSORS_FILE)
    if info["format"] in OLD_FORMATS:
        warnings.warn(f"{p} was saved in the older format {info['format']} without checksums or base digests: it cannot be "
                      "verified, and applying it twice cannot be detected; save it again to add them", stacklevel=3)
    else:
        _verify_checksums(p / TENSORS_FILE, tensors, info["checksums"])
    _verify_structure(p, info, tensors)
    for k, t in tensors.items():
        if not t.dtype.is_floating_point:
            raise CorruptEditError(f"{p / TENSORS_FILE}: tensor {k} is {dtype_name(t.dtype)}, not floating point; "
                                   "the saved edit is damaged: save it again")
        if not torch.isfinite(t).all():
            raise CorruptEditError(f"{p / TENSORS_FILE}: tensor {k} holds NaN/inf; applying it would break the model: "
                                   "recompute the edit")
    return SavedEdit(p, info, tensors)


def _read_info(p: Path) -> dict[str, Any]:
    fix = "give the folder written by EditResult.save or `factlab edit --save`"
    if not p.exists():
        raise EditNotFoundError(f"no saved edit at {p} (no such file or folder); {fix}")
    if not p.is_dir():
        raise EditNotFoundError(f"{p} is a file, not a saved edit folder; {fix}")
    if not (p / INFO_FILE).is_file():
        raise EditNotFoundError(f"{p} is not a saved edit (it has no {INFO_FILE}); {fix}")
    try:
        info = json.loads((p / INFO_FILE).read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CorruptEditError(f"{p / INFO_FILE} is not valid JSON ({e}); the saved edit is damaged: save it again") from None
    fmt = info.get("format") if isinstance(info, dict) else None
    if fmt != FORMAT and fmt not in OLD_FORMATS:
        raise EditNotFoundError(f"{p} is not a factlab edit (format {fmt!r}, expected {FORMAT!r}); {fix}")
    needs = {"method": str, "parameters": dict} | ({"checksums": dict} if fmt == FORMAT else {})
    bad = [k for k, typ in needs.items() if not isinstance(info.get(k), typ)]
    if bad:
        raise CorruptEditError(f"{p / INFO_FILE} lacks a valid {bad[0]!r} entry; the saved edit is damaged: save it again")
    return info


def _read_tensors(f: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError

    if not f.is_file():
        raise CorruptEditError(f"{f} is missing; the saved edit is incomplete: save it again")
    try:
        return load_tensors(f)
    except (SafetensorError, OSError, RuntimeError, ValueError) as e:
        raise CorruptEditError(f"{f} is not a readable safetensors file ({e}); the saved edit is damaged: save it again") from None


def _verify_checksums(f: Path, tensors: dict[str, torch.Tensor], checksums: dict[str, Any]) -> None:
    missing = sorted(set(checksums) - set(tensors))
    extra = sorted(set(tensors) - set(checksums))
    if missing or extra:
        which = f"lacks tensor {missing[0]}" if missing else f"holds an unrecorded tensor {extra[0]}"
        raise CorruptEditError(f"{f} {which}; the saved edit is damaged: save it again")
    for k, t in tensors.items():
        if tensor_digest(t) != checksums[k]:
            raise CorruptEditError(f"{f}: tensor {k} fails its sha256 checksum (the file was changed or damaged); "
                                   "save the edit again from its source")


def _verify_structure(p: Path, info: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    deltas = {k[len("delta/"):] for k in tensors if k.startswith("delta/")}
    unknown = [k for k in tensors if not k.startswith(("delta/", "factor_a/", "factor_b/"))]
    halves = {k.split("/", 1)[1] for k in tensors if k.startswith(("factor_a/", "factor_b/"))}
    unpaired = [n for n in halves if f"factor_a/{n}" not in tensors or f"factor_b/{n}" not in tensors]
    problem = (f"holds an unknown tensor {unknown[0]}" if unknown else f"has one factor of {unpaired[0]} without the other"
               if unpaired else "holds no delta" if not deltas else None)
    if problem is None and info["format"] == FORMAT and deltas != set(info["parameters"]):
        problem = f"lists parameters {sorted(info['parameters'])} in {INFO_FILE} but holds deltas of {sorted(deltas)}"
    if problem:
        raise CorruptEditError(f"{p / TENSORS_FILE} {problem}; the saved edit is damaged: save it again")
