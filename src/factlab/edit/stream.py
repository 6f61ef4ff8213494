"""An editing stream: batches of edits written one after another onto one model, with their history.

    stream = EditStream(lm, "runs/stream1", method="memit")
    stream.add(batch1); stream.add(batch2)        # each on the already-edited model
    stream.history["layer.4.mlp.key"]             # float64 (d_in, d_in): sum of K Kᵀ of every kept edit
    stream.rollback(to=1)                         # the weights after batch 1, bit for bit
    # later, on a freshly loaded (unedited) model: every logged batch is re-applied in order
    stream = EditStream(lm, "runs/stream1")
    stream.add_all(batches)                       # skips the batches already done (by a hash of their requests)

Run folder::

    config.json                   method, layers, resolved hparams, projection, on_known, model identity
    stream.jsonl                  one line per committed batch (the commit point: written after the batch folder)
    history.safetensors           checkpoint of the history (site -> K Kᵀ sum) after `batches` batches
    batches/000001/edit/          the batch's EditResult.save (checksums, base digests)
    batches/000001/keys.safetensors   the keys of every solve, "NNNNN/<site>" -> (n, d_in) float64
    .lock                         run_lock while a stream has the folder open

The history is checkpointed every ``checkpoint_every`` batches and the batches after the checkpoint are added from
their keys on resume; the checkpoint carries a hash chain of the logged batches' key digests, so a checkpoint that
does not belong to the log (after a rollback, or a kill during one) is ignored and the history recomputed from keys.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from contextlib import ExitStack
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

import torch

from factlab.edit.api import edit, resolve_hparams
from factlab.edit.errors import EditError, EditStateError
from factlab.edit.hparams import EditHparams
from factlab.edit.requests import Request, as_requests
from factlab.edit.result import EditResult, tensor_digest
from factlab.errors import InputError
from factlab.io import append_jsonl, atomic_folder, atomic_path, load_tensors, read_jsonl, run_lock, save_tensors, to_json_text, write_json
from factlab.models import LoadedModel

FORMAT = "factlab-edit-stream/1"
CONFIG_FILE = "config.json"
LOG_FILE = "stream.jsonl"
HISTORY_FILE = "history.safetensors"
BATCHES = "batches"
KEYS_FILE = "keys.safetensors"
EDIT_DIR = "edit"

Batch = Request | Mapping[str, Any] | Iterable[Request | Mapping[str, Any]]


class StreamError(EditError):
    """An editing stream's folder or state does not allow the operation."""


class StreamConfigError(StreamError):
    """A run folder holds a stream made with other settings or for another model."""


class StreamMismatchError(StreamError):
    """The batches given to :meth:`EditStream.add_all` differ from those the stream already logged."""


# ---------------------------------------------------------------------- small helpers
def batch_id(requests: Batch) -> str:
    """Hex sha256 of a batch's requests (their JSON, in order): the same requests give the same id."""
    reqs = as_requests(requests)
    return hashlib.sha256(to_json_text([r.to_dict() for r in reqs]).encode()).hexdigest()


def solve_keys(lm: LoadedModel, res: EditResult) -> dict[str, torch.Tensor]:
    """``"NNNNN/<site>"`` -> the keys ``(n, d_in)`` float64 of each of ``res``'s solves, in solve order."""
    return {f"{i:05d}/{s['site']}": s["keys"].detach().double().cpu() for i, s in enumerate(res.solves)}


def add_keys(history: dict[str, torch.Tensor], keys: Mapping[str, torch.Tensor]) -> None:
    """Add ``K Kᵀ`` (``K.T @ K`` of each ``(n, d_in)`` key matrix, float64) to ``history`` in solve order."""
    for name in sorted(keys):
        site = name.split("/", 1)[1]
        K = keys[name].double()
        kk = K.T @ K
        history[site] = history[site] + kk if site in history else kk


def keys_digest(keys: Mapping[str, torch.Tensor]) -> str:
    """Hex sha256 over the names and bytes of a batch's keys."""
    h = hashlib.sha256()
    for name in sorted(keys):
        h.update(name.encode())
        h.update(tensor_digest(keys[name]).encode())
    return h.hexdigest()


def chain(digests: Iterable[str]) -> str:
    """Hash chain over the logged batches' key digests (identifies the history they sum to)."""
    h = ""
    for d in digests:
        h = hashlib.sha256((h + d).encode()).hexdigest()
    return h


def _json(obj: Any) -> Any:
    import json

    return json.loads(to_json_text(obj))


# ---------------------------------------------------------------------- the stream
class EditStream:
    """A model's edit history: every batch's :class:`EditResult`, the per-site sum of earlier keys ``K Kᵀ``
    (float64 ``(d_in, d_in)``), and, with a ``run_dir``, its saved, resumable record.

    Args:
        lm: the model; it must hold its unedited weights when the stream is created or resumed.
        run_dir: folder to save to / resume from (``None``: in memory only). While the stream is open it holds
            :func:`~factlab.io.run_lock` on it; call :meth:`close` (or use ``with``) to release it.
        method, layers, hparams, projection, on_known: as for :func:`~factlab.edit.edit` (``on_known`` defaults
            to ``"skip"``). For an existing folder, ``None`` means "as saved"; a given value that differs from
            the saved one is refused (:class:`StreamConfigError`).
        checkpoint_every: write ``history.safetensors`` every this many batches (0: never; the history is then
            recomputed from the saved keys on resume).
    """

    def __init__(
        self,
        lm: LoadedModel,
        run_dir: str | os.PathLike[str] | None = None,
        *,
        method: str | None = None,
        layers: Iterable[int] | None = None,
        hparams: EditHparams | Mapping[str, Any] | None = None,
        projection: str | None = None,
        on_known: str | None = None,
        checkpoint_every: int = 1,
    ) -> None:
        if checkpoint_every < 0:
            raise InputError(f"checkpoint_every must be >= 0, not {checkpoint_every}")
        self.lm = lm
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.checkpoint_every = checkpoint_every
        self.results: list[EditResult] = []
        self.history: dict[str, torch.Tensor] = {}
        self._log: list[dict[str, Any]] = []
        self._keys: list[dict[str, torch.Tensor]] = []
        self._locks = ExitStack()
        given = {"method": method, "layers": layers, "hparams": hparams, "projection": projection, "on_known": on_known}
        if self.run_dir is None:
            self.config = self._new_config(given)
            return
        self._locks.enter_context(run_lock(self.run_dir))
        try:
            cfg_path = self.run_dir / CONFIG_FILE
            if cfg_path.is_file():
                self.config = self._check_config(_read_config(cfg_path), given)
            else:
                self.config = self._new_config(given)
                write_json(cfg_path, self.config)
            self._resume()
        except BaseException:
            self._locks.close()
            raise

    # ------------------------------------------------------------------ config
    def _new_config(self, given: Mapping[str, Any]) -> dict[str, Any]:
        """The config of a new stream: the resolved hyperparameters (layers and projection included)."""
        method = (given["method"] or "memit").lower()
        hp = resolve_hparams(self.lm, method, given["hparams"], given["layers"], given["projection"])
        on_known = given["on_known"] or "skip"
        if on_known not in ("error", "skip", "edit"):
            raise InputError(f"on_known must be 'error', 'skip' or 'edit', not {on_known!r}")
        return {"format": FORMAT, "method": method, "hparams": hp.to_dict(), "on_known": on_known,
                "identity": _json(self.lm.identity)}

    def _check_config(self, saved: dict[str, Any], given: Mapping[str, Any]) -> dict[str, Any]:
        """``saved``, after refusing a model or a given setting that differs from it (the differences named)."""
        diffs = []
        if saved.get("identity") != _json(self.lm.identity):
            diffs.append(f"model {saved.get('identity')} (saved) vs {_json(self.lm.identity)} (loaded)")
        if any(v is not None for k, v in given.items() if k != "on_known"):
            method = (given["method"] or saved["method"]).lower()
            if method != saved["method"]:
                diffs.append(f"method {saved['method']!r} (saved) vs {method!r}")
            base = given["hparams"] if given["hparams"] is not None else EditHparams.from_dict(saved["hparams"])
            hp = resolve_hparams(self.lm, method, base, given["layers"], given["projection"]).to_dict()
            diffs += [f"hparams.{k} {saved['hparams'].get(k)!r} (saved) vs {v!r}" for k, v in _json(hp).items()
                      if k != "source" and saved["hparams"].get(k) != v]
        if given["on_known"] is not None and given["on_known"] != saved.get("on_known"):
            diffs.append(f"on_known {saved.get('on_known')!r} (saved) vs {given['on_known']!r}")
        if diffs:
            raise StreamConfigError(
                f"{self.run_dir} holds a stream made with other settings: {'; '.join(diffs)}. Resume it with its own "
                "settings (pass None to use the saved ones) and the same model, or use another folder")
        return saved

    # ------------------------------------------------------------------ resume
    def _batch_dir(self, n: int) -> Path:
        assert self.run_dir is not None
        return self.run_dir / BATCHES / f"{n:06d}"

    def _resume(self) -> None:
        """Drop unlogged batch folders, re-apply every logged batch in order and restore the history."""
        assert self.run_dir is not None
        log = read_jsonl(self.run_dir / LOG_FILE)
        for i, rec in enumerate(log, 1):
            if rec.get("batch") != i:
                raise StreamError(f"{self.run_dir / LOG_FILE} line {i} records batch {rec.get('batch')}, not {i}; "
                                  "the log was edited by hand: restore it, or start a new folder")
        self._discard_unlogged(len(log))
        try:
            for rec in log:
                self._reapply(rec)
        except BaseException:
            self._restore_all()
            raise
        self._history_from_disk()

    def _discard_unlogged(self, n_logged: int) -> None:
        """Remove batch folders past the log (a kill between a batch's save and its log line) and temporaries."""
        root = self.run_dir / BATCHES  # type: ignore[operator]
        if not root.is_dir():
            return
        for p in root.iterdir():
            if p.name.startswith(".") or not p.name.isdigit() or int(p.name) > n_logged:
                shutil.rmtree(p) if p.is_dir() else p.unlink()

    def _reapply(self, rec: Mapping[str, Any]) -> None:
        """Load logged batch ``rec`` and apply it (its base digests prove it goes onto the weights it was made on)."""
        n = int(rec["batch"])
        folder = self._batch_dir(n)
        keys = load_tensors(folder / KEYS_FILE) if (folder / KEYS_FILE).is_file() else None
        if keys is None or keys_digest(keys) != rec.get("keys_sha256"):
            raise StreamError(f"{folder / KEYS_FILE} is missing or fails its digest in {LOG_FILE}; the run folder "
                              "is damaged: restore it from a copy, or roll back to an earlier batch in a new folder")
        try:
            res = EditResult.load(folder / EDIT_DIR, self.lm).apply()
        except EditStateError as e:
            raise StreamError(f"batch {n} of {self.run_dir} cannot be re-applied: {e}. Resume a stream on the freshly "
                              "loaded, unedited model") from e
        self.results.append(res)
        self._keys.append(keys)
        self._log.append(dict(rec))

    def _history_from_disk(self) -> None:
        """The history from the checkpoint when it belongs to the log, plus the keys of the later batches."""
        start, hist = 0, {}
        f = self.run_dir / HISTORY_FILE  # type: ignore[operator]
        if f.is_file():
            from safetensors import safe_open

            with safe_open(str(f), "pt") as sf:
                meta = sf.metadata() or {}
            n = int(meta.get("batches", -1))
            if 0 <= n <= len(self._log) and meta.get("chain") == chain(r["keys_sha256"] for r in self._log[:n]):
                start, hist = n, load_tensors(f)
        self.history = hist
        for keys in self._keys[start:]:
            add_keys(self.history, keys)

    def _restore_all(self) -> None:
        """Restore every applied result in reverse order (the unedited weights)."""
        for res in reversed(self.results):
            res.restore()

    # ------------------------------------------------------------------ editing
    def _edit_kwargs(self) -> dict[str, Any]:
        cfg = self.config
        kw: dict[str, Any] = {"method": cfg["method"], "hparams": EditHparams.from_dict(cfg["hparams"]),
                              "on_known": cfg["on_known"], "history": dict(self.history)}
        return kw  # solvers without uses_history ignore the history

    def add(self, requests: Batch) -> EditResult:
        """Edit one batch on the current (already edited) model and commit it: the batch folder is saved first, then
        its line is appended to ``stream.jsonl`` (the commit point). On an error nothing is committed and the weights
        are as before the call."""
        bid = batch_id(requests)
        res = edit(self.lm, requests, **self._edit_kwargs())
        keys = solve_keys(self.lm, res)
        n = len(self) + 1
        rec = {"batch": n, "id": bid, "requests": len(as_requests(requests)),
               "edited": len(as_requests(requests)) - len(res.metadata.get("skipped", [])),
               "keys_sha256": keys_digest(keys)}
        try:
            if self.run_dir is not None:
                with atomic_folder(self._batch_dir(n)) as tmp:
                    res.save(tmp / EDIT_DIR)
                    save_tensors(tmp / KEYS_FILE, keys)
                append_jsonl(self.run_dir / LOG_FILE, rec)
        except BaseException:
            res.restore()
            raise
        self.results.append(res)
        self._keys.append(keys)
        self._log.append(rec)
        add_keys(self.history, keys)
        if self.run_dir is not None and self.checkpoint_every and n % self.checkpoint_every == 0:
            self._checkpoint()
        return res

    def iter_add(self, batches: Iterable[Batch]) -> Iterator[EditResult]:
        """Yield each batch's result, adding the batches the stream has not done yet; batch ``k`` of ``batches`` that
        the stream already logged (same requests hash) is skipped and its result yielded. A batch whose requests differ
        from the logged batch at its position raises :class:`StreamMismatchError`."""
        for k, batch in enumerate(batches):
            if k < len(self._log):
                if self._log[k]["id"] != batch_id(batch):
                    raise StreamMismatchError(
                        f"batch {k + 1} given differs from batch {k + 1} the stream logged (another requests hash); "
                        f"give the same batches in the same order to resume, roll back with rollback(to={k}), or use another folder")
                yield self.results[k]
            else:
                yield self.add(batch)

    def add_all(self, batches: Iterable[Batch]) -> list[EditResult]:
        """:meth:`iter_add` to the end: the results of all ``batches``."""
        return list(self.iter_add(batches))

    def _checkpoint(self) -> None:
        """Save the history with the batch count and the chain of the logged keys digests."""
        meta = {"batches": str(len(self)), "chain": chain(r["keys_sha256"] for r in self._log), "format": FORMAT}
        save_tensors(self.run_dir / HISTORY_FILE, self.history, metadata=meta)  # type: ignore[operator]

    # ------------------------------------------------------------------ rollback
    def rollback(self, to: int) -> None:
        """Restore batches ``to+1..`` in reverse order: the weights after batch ``to``, bit for bit (``to=0``: the
        unedited weights). They leave the history, the log (rewritten atomically: the commit point) and the folder.
        A kill before the log is rewritten leaves the stream as it was; after, the dropped folders are unlogged and
        discarded on resume, and a checkpoint of a longer history no longer matches the log's chain."""
        if not 0 <= to <= len(self):
            raise InputError(f"rollback(to={to}): the stream has {len(self)} batch(es); give 0..{len(self)}")
        for res in reversed(self.results[to:]):
            res.restore()
        kept = self._log[:to]
        if self.run_dir is not None:
            with atomic_path(self.run_dir / LOG_FILE) as tmp:
                tmp.write_text("".join(to_json_text(r) + "\n" for r in kept), encoding="utf-8")
            self._discard_unlogged(to)
        del self.results[to:], self._keys[to:], self._log[to:]
        self.history = {}
        for keys in self._keys:
            add_keys(self.history, keys)
        if self.run_dir is not None:
            self._checkpoint() if self.checkpoint_every else (self.run_dir / HISTORY_FILE).unlink(missing_ok=True)

    # ------------------------------------------------------------------ info / lifetime
    def __len__(self) -> int:
        return len(self.results)

    @property
    def n_edits(self) -> int:
        """Requests edited over all kept batches (skipped ones not counted)."""
        return sum(int(r["edited"]) for r in self._log)

    def to_dict(self) -> dict[str, Any]:
        return {"run_dir": str(self.run_dir) if self.run_dir else None, "method": self.config["method"],
                "layers": self.config["hparams"]["layers"], "batches": len(self), "edits": self.n_edits,
                "sites": sorted(self.history), "log": list(self._log), "config": self.config}

    def __repr__(self) -> str:
        where = f", run_dir={str(self.run_dir)!r}" if self.run_dir else ""
        return f"EditStream(method={self.config['method']!r}, batches={len(self)}, edits={self.n_edits}{where})"

    def close(self) -> None:
        """Release the run folder's lock (the model keeps its edits)."""
        self._locks.close()

    def __enter__(self) -> "EditStream":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _read_config(path: Path) -> dict[str, Any]:
    import json

    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise StreamError(f"{path} is not valid JSON ({e}); the run folder is damaged: use another folder") from None
    if not isinstance(cfg, dict) or cfg.get("format") != FORMAT or not isinstance(cfg.get("hparams"), dict):
        raise StreamError(f"{path} is not an editing stream's config (format {FORMAT!r}); use another folder")
    return cfg
