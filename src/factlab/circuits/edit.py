"""Edit facts inside a circuit, its complement, or a random mask of the same density.

Constrained fine-tuning (the paper's FT-L-style edit): SGD on the mean NLL of ``" " + target_new``
after the filled prompt, a few steps with batch 1, stopping early when the loss is below
``stop_loss``; gradients are multiplied by the mask and every weight is clamped to
``±radius`` of its original value. Two modes, named plainly:

- ``restricted``: the full model is run and edited; only the masked weights move (what a user
  means by "edit inside the circuit"). Every weight outside the mask stays bit-identical.
- ``subnetwork``: the paper's exact mode: the masked subnetwork alone (non-mask weights zeroed) is
  run, edited and evaluated (``reference/algorithms.md`` §11 and pitfall 13).

The model is never modified while editing: new weights are computed functionally and returned;
:meth:`FactEdit.edit_result` turns them into an :class:`factlab.edit.EditResult` (apply/restore bit-exact).
"""

from __future__ import annotations

import json
import time
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal, Mapping, Sequence

import torch

from factlab.circuits.masks import WeightMask, masked_params
from factlab.circuits.tasks import CircuitTask, body_hidden, unembed_params
from factlab.confidence import bounded_mean_ci, mean_ci, proportion_ci
from factlab.errors import FactlabError, InputError
from factlab.io import append_jsonl, read_jsonl, run_lock, write_json
from factlab.progress import progress_bar
from factlab.prompts import continuation_ids, pad, pad_token_id, token_ids

Mode = Literal["restricted", "subnetwork"]
MODES: tuple[str, ...] = ("restricted", "subnetwork")


class EditDivergedError(FactlabError, FloatingPointError):
    """The edit's loss or weights became non-finite; nothing was changed."""


@dataclass(frozen=True)
class EditConfig:
    """Fine-tuning settings (defaults: the paper's ``lr_ft``, ``num_steps_ft`` of ``hparams_h.yaml``, ``norm_constraint_ft``)."""

    mode: Mode = "restricted"
    lr: float = 5e-4
    steps: int = 10
    radius: float = 5e-4
    stop_loss: float = 1e-2

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise InputError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.lr <= 0 or self.steps < 1 or self.radius <= 0:
            raise InputError("lr, steps and radius must be positive")

    def to_dict(self) -> dict:
        return asdict(self)


# ------------------------------------------------------------------ scoring
def target_nll(lm, params: Mapping[str, torch.Tensor] | None, prompts: Sequence[str], targets: Sequence[str]) -> torch.Tensor:
    """``(n,)`` mean per-token NLL of each ``target`` after its ``prompt`` (teacher forced; ROME's ``test_batch_prediction``)."""
    rows, spans = [], []
    for p, t in zip(prompts, targets):
        cont = continuation_ids(lm.tokenizer, p, t)
        ids = token_ids(lm.tokenizer, p) + cont
        rows.append(ids)
        spans.append(len(cont))
    batch = pad(rows, pad_id=pad_token_id(lm.tokenizer), padding_side="left", device=lm.device)
    h = body_hidden(lm, batch, params)  # (B, T, d)
    w, b = unembed_params(lm, params)
    out = []
    width = batch.width
    for i, k in enumerate(spans):
        pos = torch.arange(width - k - 1, width - 1, device=h.device)
        logits = h[i, pos].to(w.dtype) @ w.T
        if b is not None:
            logits = logits + b
        tgt = batch.input_ids[i, width - k :].to(h.device)
        out.append(torch.nn.functional.cross_entropy(logits.float(), tgt))
    return torch.stack(out)


@dataclass
class FactEdit:
    """One edited fact: metrics before/after, and the new values of the edited parameters."""

    case_id: int
    where: str
    mode: str
    steps: int
    loss: list[float]
    before: dict[str, float]
    after: dict[str, float]
    moved: int
    seconds: float
    new_weights: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)

    def to_dict(self) -> dict:
        d = {k: v for k, v in asdict(self).items() if k != "new_weights"}
        d["delta"] = {k: self.after[k] - self.before[k] for k in self.before}
        return d

    def edit_result(self, lm, metadata: dict | None = None):
        """The edit as a :class:`factlab.edit.EditResult` (sets the new weights in ``lm``; ``.restore()`` undoes it bit-exactly)."""
        from factlab.edit import EditResult

        meta = {"case_id": self.case_id, "where": self.where, "mode": self.mode, **(metadata or {})}
        return EditResult.from_weights(lm, dict(self.new_weights), method="finetune-circuit", metadata=meta)


def _metrics(lm, params, record, task: CircuitTask | None, task_params) -> dict[str, float]:
    prompt = record.prompt.format(record.subject)
    paras = list(record.paraphrase_prompts)
    prompts = [prompt, prompt] + paras + paras
    targets = [" " + record.target_new, " " + record.target_true] + [" " + record.target_new] * len(paras) + [" " + record.target_true] * len(paras)
    nll = target_nll(lm, params, prompts, targets).tolist()
    m = {"nll_new": nll[0], "nll_true": nll[1], "success": float(nll[0] < nll[1])}
    if paras:
        k = len(paras)
        m["paraphrase_success"] = sum(float(a < b) for a, b in zip(nll[2 : 2 + k], nll[2 + k :])) / k
    if task is not None:
        m["task_accuracy"] = task.accuracy(lm, task_params)
    return m


def edit_fact(lm, record, mask: WeightMask, config: EditConfig = EditConfig(), *, where: str = "mask",
              task: CircuitTask | None = None) -> FactEdit:
    """Fine-tune one fact with updates restricted to ``mask``; the model is left untouched.

    ``record`` is a :class:`factlab.data.CounterFactRecord` (hierarchy or CounterFact). With ``task`` given,
    its accuracy before and after (in the same mode) is measured as damage. Raises
    :class:`EditDivergedError` when the loss or weights become non-finite.
    """
    mask.check_model(lm)
    t0 = time.perf_counter()
    params = dict(lm.model.named_parameters())
    names = [n for n, m in mask.masks.items() if bool(m.any())]
    fmask = {n: mask.masks[n].to(params[n].dtype) for n in names}
    orig = {n: params[n].detach() for n in names}
    sub = config.mode == "subnetwork"

    def run_params(weights: Mapping[str, torch.Tensor] | None) -> dict[str, torch.Tensor]:
        if sub:
            return masked_params(lm, mask.masks, weights)
        return dict(weights or {})

    with torch.no_grad():
        before = _metrics(lm, run_params(None), record, task, run_params(None))
    prompt = record.prompt.format(record.subject)
    target = " " + record.target_new
    new = {n: orig[n].clone().requires_grad_(True) for n in names}
    losses: list[float] = []
    step = 0
    for step in range(1, config.steps + 1):
        loss = target_nll(lm, run_params(new), [prompt], [target])[0]
        if not torch.isfinite(loss):
            raise EditDivergedError(f"the edit of case {record.case_id} diverged at step {step} (loss {loss.item()}); "
                                    "the model was not changed; lower lr")
        losses.append(float(loss.detach()))
        if losses[-1] < config.stop_loss:
            break
        grads = torch.autograd.grad(loss, [new[n] for n in names], allow_unused=True)
        with torch.no_grad():
            for n, g in zip(names, grads):
                if g is None:
                    continue
                w = new[n] - config.lr * (g * fmask[n])
                w = torch.minimum(torch.maximum(w, orig[n] - config.radius), orig[n] + config.radius)
                new[n].copy_(torch.where(mask.masks[n], w, orig[n]))
    final = {n: v.detach() for n, v in new.items()}
    if not all(torch.isfinite(v).all() for v in final.values()):
        raise EditDivergedError(f"the edit of case {record.case_id} produced non-finite weights; the model was not changed")
    with torch.no_grad():
        after = _metrics(lm, run_params(final), record, task, run_params(final))
    moved = sum(int((final[n] != orig[n]).sum()) for n in names)
    return FactEdit(record.case_id, where, config.mode, step, losses, before, after, moved, time.perf_counter() - t0, final)


# ------------------------------------------------------------------ comparison
METRICS = ("nll_new", "nll_true", "success", "paraphrase_success", "task_accuracy")
#: metrics in [0, 1] (Wilson intervals; their changes lie in [-1, 1]); the others are NLLs (nats, >= 0)
RATES = ("success", "paraphrase_success", "task_accuracy")


def metric_ci(metric: str, values: Sequence[float], *, change: bool = False) -> dict:
    """95% interval of ``metric``'s mean (``change``: of its after - before differences) that stays inside
    the values' range: Wilson for rates, Student t clipped to [-1, 1] for their changes and to >= 0 for NLLs."""
    if metric in RATES:
        return (bounded_mean_ci(values, -1.0, 1.0) if change else proportion_ci(values)).to_dict()
    return (mean_ci(values) if change else bounded_mean_ci(values, 0.0, None)).to_dict()


@dataclass
class EditComparison:
    """Per-fact edits for several masks ("where") and modes, with 95% CIs of the before/after/delta metrics."""

    rows: list[dict]
    config: dict
    model_id: str
    identity: dict = field(default_factory=dict)  #: the model's identity (id, dtype, attention implementation)

    def summary(self) -> dict:
        """``{mode: {where: {metric: {"before","after","delta": Estimate dict}}}}`` plus ``n``."""
        out: dict = {}
        for mode in sorted({r["mode"] for r in self.rows}):
            for where in sorted({r["where"] for r in self.rows if r["mode"] == mode}):
                rs = [r for r in self.rows if r["mode"] == mode and r["where"] == where]
                d: dict = {"n": len(rs)}
                for m in METRICS:
                    vals = [r for r in rs if m in r["before"]]
                    if not vals:
                        continue
                    d[m] = {
                        "before": metric_ci(m, [r["before"][m] for r in vals]),
                        "after": metric_ci(m, [r["after"][m] for r in vals]),
                        "delta": metric_ci(m, [r["after"][m] - r["before"][m] for r in vals], change=True),
                    }
                d["moved_weights"] = bounded_mean_ci([r["moved"] for r in rs], 0.0, None).to_dict()
                d["seconds_per_edit"] = bounded_mean_ci([r["seconds"] for r in rs], 0.0, None).to_dict()
                out.setdefault(mode, {})[where] = d
        return out

    def to_dict(self) -> dict:
        return {"model_id": self.model_id, "model": self.identity, "config": self.config, "summary": self.summary(), "n_rows": len(self.rows)}

    def to_json(self, path: str | Path | None = None) -> str:
        if path is not None:
            write_json(path, self.to_dict())
        return json.dumps(self.to_dict(), indent=2)

    def plot(self, path: str | Path) -> Path:
        from factlab.circuits.plot import plot_edit_comparison

        return plot_edit_comparison(self.summary(), path)


def compare_edits(lm, records: Sequence, masks: Mapping[str, WeightMask], *, modes: Sequence[str] = MODES,
                  config: EditConfig = EditConfig(), task: CircuitTask | None = None, task_every: int = 0,
                  log_path: str | Path | None = None) -> EditComparison:
    """Edit every record separately inside each mask of ``masks`` (e.g. circuit / complement / random), in each mode.

    ``task_every``: measure task damage on every k-th record (0 = never; it costs two task evaluations per edit).
    ``log_path``: a JSON-lines file of per-edit rows; rows already there are reused (resumable) when they were
    made with the same mask (:meth:`WeightMask.fingerprint`), the same lr/steps/radius/stop_loss and the same
    model identity (weights id, dtype, attention implementation); others are redone. While it runs, the log's
    folder is locked (:func:`factlab.io.run_lock`): a second process on it fails at once, naming the holder.
    """
    with ExitStack() as stack:
        if log_path:
            stack.enter_context(run_lock(Path(log_path).parent))
        return _compare(lm, records, masks, modes, config, task, task_every, log_path)


def _compare(lm, records: Sequence, masks: Mapping[str, WeightMask], modes: Sequence[str], config: EditConfig,
             task: CircuitTask | None, task_every: int, log_path: str | Path | None) -> EditComparison:
    prints = {where: mask.fingerprint() for where, mask in masks.items()}
    settings = {k: getattr(config, k) for k in ("lr", "steps", "radius", "stop_loss")}
    model = lm.identity
    done = {(r["mode"], r["where"], r["case_id"]): r for r in (read_jsonl(log_path) if log_path else [])
            if r.get("mask") == prints.get(r["where"]) and r.get("settings") == settings and r.get("model") == model}
    rows: list[dict] = []
    total = len(records) * len(masks) * len(modes)
    bar = progress_bar(desc="circuit edits", total=total, unit="edit")
    try:
        for mode in modes:
            cfg = EditConfig(mode=mode, lr=config.lr, steps=config.steps, radius=config.radius, stop_loss=config.stop_loss)  # type: ignore[arg-type]
            for where, mask in masks.items():
                for i, rec in enumerate(records):
                    key = (mode, where, rec.case_id)
                    if key in done:
                        rows.append(done[key])
                    else:
                        t = task if task is not None and task_every and i % task_every == 0 else None
                        fe = edit_fact(lm, rec, mask, cfg, where=where, task=t)
                        row = {**fe.to_dict(), "mask": prints[where], "settings": settings, "model": model}
                        rows.append(row)
                        if log_path:
                            append_jsonl(log_path, row)
                    bar.update(1)
    finally:
        bar.close()
    return EditComparison(rows, {**config.to_dict(), "modes": list(modes), "where": list(masks), "n_records": len(records)}, lm.model_id,
                          dict(model))



# ------------------------------------------------------------------ ROME / MEMIT cross-check
def layer_coverage(lm, mask: WeightMask, projection: str | None = None) -> dict[int, float]:
    """``{layer: density of the mask on that layer's edit projection weight}`` (ROME/MEMIT's rewrite target)."""
    out = {}
    for i in range(lm.adapter.n_layers):
        name = lm.adapter.projection(i, projection).module + ".weight"
        if name in mask.masks:
            out[i] = float(mask.masks[name].float().mean())
    if not out:
        raise ValueError("the mask does not cover any edit projection; find the circuit with the mlp type included")
    return out


def rome_crosscheck(lm, records: Sequence, mask: WeightMask, *, method: str = "rome", k: int = 1,
                    hparams: Mapping | None = None) -> dict:
    """ROME/MEMIT at the ``k`` layers whose edit projection the circuit covers most vs the ``k`` it covers least.

    Each record is edited on the full model with :func:`factlab.edit.edit`, scored (NLL of new/true target,
    success, paraphrase success), and restored bit-exactly. Returns per-layer-set summaries with 95% CIs.
    """
    from factlab.edit import Request, edit

    cov = layer_coverage(lm, mask)
    ranked = sorted(cov, key=lambda i: cov[i])
    sets = {"circuit_layers": sorted(ranked[-k:]), "other_layers": sorted(ranked[:k])}
    rows: list[dict] = []
    for label, layers in sets.items():
        for rec in records:
            with torch.no_grad():
                before = _metrics(lm, None, rec, None, None)
            res = edit(lm, Request(rec.prompt, rec.subject, " " + rec.target_new, " " + rec.target_true), method=method,
                       layers=layers, hparams=dict(hparams or {}), on_known="edit")
            try:
                with torch.no_grad():
                    after = _metrics(lm, None, rec, None, None)
            finally:
                res.restore()
            rows.append({"layers": label, "case_id": rec.case_id, "before": before, "after": after})
    summary = {}
    for label in sets:
        rs = [r for r in rows if r["layers"] == label]
        summary[label] = {"layers": sets[label], "coverage": [cov[i] for i in sets[label]], "n": len(rs),
                          **{m: {"delta": metric_ci(m, [r["after"][m] - r["before"][m] for r in rs], change=True),
                                 "after": metric_ci(m, [r["after"][m] for r in rs])}
                             for m in ("nll_new", "success", "paraphrase_success") if rs and m in rs[0]["before"]}}
    return {"method": method, "model": lm.identity, "coverage": cov, "summary": summary, "rows": rows}
