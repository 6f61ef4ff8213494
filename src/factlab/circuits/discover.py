"""Circuit discovery by learned masks (Ge, Rudzicz & Zhu 2024; ``reference/algorithms.md`` §11).

One mask logit per weight entry (``granularity="weight"``) or per head / neuron / norm
(``"component"``); a hard mask sampled with a straight-through estimator; loss =
CE(masked task logits, full model's predictions) ("faithfulness") + λ · mean σ(logits), λ raised
on a schedule; training stops when the deterministic mask (logit > 0) reaches the target density.
Masks on the way down are snapshotted at each density of ``sweep`` (the paper's
``find_circuit_multi``), so a density sweep costs one run.

``schedule="anneal"`` (not the paper's; what makes a 5% circuit of a 100 M-weight model learnable in a few
hundred CPU steps): the mask is always the exact top-k of the logits (straight-through gradient
``dL/dlogit = dL/dW' * W``), k lowered from all entries to the target on a cubic schedule over
``anneal_frac`` of the steps and then held there while the mask keeps training on faithfulness alone;
``init="saliency"`` starts the logits at ``log |W * dL/dW|`` of the full model, so the first top-k masks
are already the weights the task leans on. The paper's rule needs the sparsity penalty to win against
the faithfulness gradient on every one of the 10^8 logits, which with Adam and a temperature of 1 it
does not within hundreds of steps (see docs/circuits.md).

The model is never copied or modified: each step runs ``functional_call`` with ``W * M``.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from factlab.circuits.components import ComponentMask, ComponentSpace
from factlab.circuits.masks import (
    DEFAULT_TYPES,
    MaskError,
    WeightMask,
    check_density,
    mask_memory_bytes,
    masked_params,
    masked_weight,
    sample_mask,
    select_parameters,
    threshold_mask,
)
from factlab.circuits.tasks import CircuitTask
from factlab.errors import NonFiniteError
from factlab.io import write_json
from factlab.progress import progress_bar


@dataclass(frozen=True)
class DiscoveryConfig:
    """Hyper-parameters of mask training (paper values in brackets where ours differ).

    ``lr`` is 0.1 [paper 0.01 with up to 400 epochs] so that a CPU run reaches 5% in a few hundred steps;
    ``estimator="gumbel"`` with ``temperature`` 1.0 [paper 0.01: its straight-through gradient is almost
    zero away from the threshold]; λ is raised by ``lambda_step`` every ``lambda_every`` steps [paper: per epoch].
    ``finish="topk"``: if ``max_steps`` end before the threshold mask (logit > 0) is down to the target, the
    circuit is the top ``target_density`` fraction of entries by logit (and likewise for unreached sweep
    densities), reported as ``finished_by="topk"``; ``"threshold"`` keeps the paper's rule only.
    ``schedule="anneal"`` replaces the λ rule by an exact top-k mask whose density follows :meth:`density_at`
    (λ, ``estimator``, ``temperature`` and ``finish`` are then unused; ``finished_by="anneal"``); ``init="saliency"``
    starts the logits at ``log |dL/dM|`` of the all-ones mask over ``saliency_batches`` batches.
    """

    target_density: float = 0.05
    sweep: tuple[float, ...] = ()
    granularity: Literal["weight", "component"] = "weight"
    types: tuple[str, ...] = DEFAULT_TYPES
    estimator: str = "gumbel"
    temperature: float = 1.0
    init_mean: float = 2.7
    init_std: float = 0.01
    lr: float = 0.1
    lambda_init: float = 10.0
    lambda_step: float = 1.0
    lambda_every: int = 10
    lambda_max: float = 1000.0
    batch_size: int = 32
    max_steps: int = 600
    seed: int = 0
    finish: Literal["threshold", "topk"] = "topk"
    schedule: Literal["lambda", "anneal"] = "lambda"
    init: Literal["constant", "saliency"] = "constant"
    anneal_frac: float = 0.6
    saliency_batches: int = 4

    def __post_init__(self) -> None:
        check_density(self.target_density)
        for d in self.sweep:
            check_density(d)
        if self.granularity not in ("weight", "component"):
            raise MaskError(f"granularity must be 'weight' or 'component', got {self.granularity!r}")
        if self.max_steps < 1 or self.batch_size < 1:
            raise MaskError("max_steps and batch_size must be positive")
        if self.schedule not in ("lambda", "anneal"):
            raise MaskError(f"schedule must be 'lambda' (the paper's sparsity penalty) or 'anneal', got {self.schedule!r}")
        if self.init not in ("constant", "saliency"):
            raise MaskError(f"init must be 'constant' or 'saliency', got {self.init!r}")
        if not 0.0 < self.anneal_frac <= 1.0:
            raise MaskError(f"anneal_frac must be in (0, 1], got {self.anneal_frac}")

    def density_at(self, step: int) -> float:
        """The ``anneal`` schedule's density after ``step`` steps: cubic from 1 down to the target over
        ``anneal_frac * max_steps`` steps (Zhu & Gupta 2017), then held at the target."""
        span = max(1, round(self.anneal_frac * self.max_steps))
        left = max(0.0, 1.0 - step / span)
        return self.target_density + (1.0 - self.target_density) * left**3

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Accuracies:
    """Task accuracy of the full model, the circuit alone and its complement alone, and the circuit's agreement with the full model."""

    full: float
    circuit: float
    complement: float
    agreement: float
    n: int

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class CircuitResult:
    """A found circuit: the mask, its density, accuracies on held-out examples, and the training record."""

    task: str
    form: str
    model_id: str
    granularity: str
    density: float
    weight_density: float
    accuracies: Accuracies
    steps: int
    seconds: float
    reached_target: bool
    config: DiscoveryConfig
    finished_by: str = "threshold"
    history: list[dict] = field(default_factory=list)
    sweep: list[dict] = field(default_factory=list)
    memory_bytes: int = 0
    mask: WeightMask | None = None
    component_mask: ComponentMask | None = None
    sweep_masks: dict[float, WeightMask | ComponentMask] = field(default_factory=dict)
    components: list[str] = field(default_factory=list)
    #: the same accuracies on the training examples (for memorised facts a circuit need not carry held-out facts)
    train_accuracies: Accuracies | None = None

    def to_dict(self) -> dict:
        return {
            "task": self.task, "form": self.form, "model_id": self.model_id, "granularity": self.granularity,
            "density": self.density, "weight_density": self.weight_density, "accuracies": self.accuracies.to_dict(),
            "train_accuracies": None if self.train_accuracies is None else self.train_accuracies.to_dict(),
            "steps": self.steps, "seconds": self.seconds, "reached_target": self.reached_target, "finished_by": self.finished_by,
            "config": self.config.to_dict(), "memory_bytes": self.memory_bytes,
            "makeup": None if self.mask is None else self.mask.to_dict()["by_type"],
            "sweep": self.sweep, "history": self.history,
            "n_components": len(self.components), "components_head": self.components[:50],
        }

    def to_json(self, path: str | Path | None = None) -> str:
        text = json.dumps(self.to_dict(), indent=2, default=str)
        if path is not None:
            write_json(path, self.to_dict())
        return text

    def plot(self, path: str | Path) -> Path:
        """Training curves: density, faithfulness loss and λ against step."""
        from factlab.circuits.plot import plot_training

        return plot_training(self.history, path, title=f"{self.task} ({self.granularity})")


# ------------------------------------------------------------------ evaluation
def _params_for(lm, mask: WeightMask | ComponentMask, space: ComponentSpace | None) -> dict[str, torch.Tensor]:
    if isinstance(mask, ComponentMask):
        if space is None:
            space = ComponentSpace(lm)
        w = space.expand({k: v.float() for k, v in mask.masks.items()})
        return masked_params(lm, w)
    return masked_params(lm, mask.masks)


@torch.no_grad()
def evaluate_mask(lm, task: CircuitTask, mask: WeightMask | ComponentMask, *, batch_size: int = 32,
                  space: ComponentSpace | None = None) -> Accuracies:
    """Accuracy of the full model, of the masked model, and of the complement-masked model on ``task``."""
    full = task.logits(lm, None, batch_size=batch_size).argmax(-1).cpu()
    circ = task.logits(lm, _params_for(lm, mask, space), batch_size=batch_size).argmax(-1).cpu()
    comp_mask = mask.complement() if isinstance(mask, WeightMask) else ComponentMask({k: ~v for k, v in mask.masks.items()}, mask.model_id)
    comp = task.logits(lm, _params_for(lm, comp_mask, space), batch_size=batch_size).argmax(-1).cpu()
    y = task.labels
    return Accuracies(float((full == y).float().mean()), float((circ == y).float().mean()),
                      float((comp == y).float().mean()), float((circ == full).float().mean()), len(task))


# ------------------------------------------------------------------ training
def find_circuit(lm, train: CircuitTask, test: CircuitTask | None = None, config: DiscoveryConfig = DiscoveryConfig(),
                 *, out_dir: str | Path | None = None) -> CircuitResult:
    """Learn a mask for ``train`` down to ``config.target_density``; evaluate on ``test`` (default: ``train``).

    With ``out_dir``, each sweep snapshot is saved as it is reached (``sweep/d{density}.safetensors``).
    Raises :class:`NonFiniteError` if the loss becomes NaN (the model is never modified).
    """
    from factlab.circuits.io import save_mask

    test = test or train
    gen = torch.Generator().manual_seed(config.seed)
    space = ComponentSpace(lm) if config.granularity == "component" else None
    params = dict(lm.model.named_parameters())
    if space is None:
        chosen = select_parameters(lm, config.types)
        logits = {n: (torch.randn(params[n].shape, generator=gen) * config.init_std + config.init_mean).to(lm.device) for n in chosen}
    else:
        chosen = {}
        logits = space.init_logits(config.init_mean, config.init_std, gen)
    anneal = config.schedule == "anneal"
    with torch.no_grad():
        targets = train.logits(lm, None, batch_size=config.batch_size).argmax(-1).to(lm.device)
    if config.init == "saliency":
        logits = _saliency_logits(lm, train, targets, space, logits, config, gen)
    for v in logits.values():
        v.requires_grad_(True)
    n_total = sum(v.numel() for v in logits.values())
    opt = torch.optim.AdamW(list(logits.values()), lr=config.lr, weight_decay=0.0)
    sweep_targets = sorted({d for d in config.sweep if d > config.target_density} | ({config.target_density} if not anneal else set()),
                           reverse=True)
    snapshots: dict[float, WeightMask | ComponentMask] = {}
    sweep_rows: list[dict] = []
    history: list[dict] = []
    lam = 0.0 if anneal else config.lambda_init
    t0 = time.perf_counter()

    def keep(d: float, snap: WeightMask | ComponentMask, step: int, **extra) -> WeightMask | ComponentMask:
        """Record the mask for sweep density ``d``: kept, saved under ``out_dir/sweep`` as it is reached, one row."""
        snapshots[d] = snap
        if out_dir is not None:
            save_mask(snap, Path(out_dir) / "sweep" / f"d{d:g}.safetensors")
        sweep_rows.append({"target": d, "density": snap.density, "step": step, **extra, "seconds": time.perf_counter() - t0})
        return snap
    density = 1.0
    step = 0
    torch.manual_seed(config.seed)
    bar = progress_bar(desc=f"circuit {train.name}", total=config.max_steps, unit="step")
    try:
        for step in range(1, config.max_steps + 1):
            idx = torch.randint(len(train), (min(config.batch_size, len(train)),), generator=gen).tolist()
            thr = _threshold(logits, config.density_at(step)) if anneal else None
            if space is None:
                mp = {n: masked_weight(params[n].detach(), l, estimator="topk" if anneal else config.estimator,  # type: ignore[arg-type]
                                       temperature=config.temperature, threshold=thr,
                                       seed=(config.seed * 1_000_003 + step) * 4096 + i) for i, (n, l) in enumerate(logits.items())}
            else:
                sampled = {n: threshold_mask(l, thr) if anneal else
                           sample_mask(l, estimator=config.estimator, temperature=config.temperature, generator=gen)  # type: ignore[arg-type]
                           for n, l in logits.items()}
                mp = masked_params(lm, space.expand(sampled))
            out = train.logits(lm, mp, idx, batch_size=len(idx))
            faith = nn.functional.cross_entropy(out.float(), targets[idx])
            if anneal:  # the density is set by the schedule, not by a penalty
                sparse = torch.zeros(())
                loss = faith
            else:
                sparse = sum(torch.sigmoid(l).sum() for l in logits.values()) / n_total
                loss = faith + lam * sparse
            if not torch.isfinite(loss):
                raise NonFiniteError(f"mask training diverged at step {step} (loss {loss.item()}); lower lr")
            leaves = list(logits.values())
            for leaf, g in zip(leaves, torch.autograd.grad(loss, leaves)):  # grads of the mask logits only, never the model's
                leaf.grad = g
            opt.step()
            for leaf in leaves:
                leaf.grad = None
            del mp, out
            with torch.no_grad():
                density = config.density_at(step) if anneal else sum(int((l > 0).sum()) for l in logits.values()) / n_total
            history.append({"step": step, "loss": float(loss.detach()), "faithfulness": float(faith.detach()), "sparsity": float(sparse.detach()),
                            "lambda": lam, "density": density, "seconds": time.perf_counter() - t0})
            bar.update(1)
            bar.set_postfix(density=f"{density:.4f}", faith=f"{float(faith.detach()):.3f}")
            while sweep_targets and density <= sweep_targets[0]:
                d = sweep_targets.pop(0)
                keep(d, _topk_snapshot(lm, logits, chosen, space, train, config, step, d) if anneal
                     else _snapshot(lm, logits, chosen, space, train, config, step, density), step)
            if not anneal and density <= config.target_density:
                break
            if not anneal and step % config.lambda_every == 0:
                lam = min(lam + config.lambda_step, config.lambda_max)
    finally:
        bar.close()
    finished_by = "threshold"
    if anneal:
        # the schedule reached the target at anneal_frac * max_steps; the rest of the steps trained at the target
        finished_by = "anneal"
        final = keep(config.target_density, _topk_snapshot(lm, logits, chosen, space, train, config, step, config.target_density),
                     step, finished_by="anneal")
        density = final.density
    elif density > config.target_density and config.finish == "topk":
        # not reached within max_steps: keep the highest-logit entries (a documented deviation from the paper)
        finished_by = "topk"
        for d in sweep_targets:  # the densities not reached on the way down, then the target
            keep(d, _topk_snapshot(lm, logits, chosen, space, train, config, step, d), step, finished_by="topk")
        final = snapshots[config.target_density]
        density = final.density
    else:
        final = _snapshot(lm, logits, chosen, space, train, config, step, density)
    seconds = time.perf_counter() - t0
    # evaluate the final mask and every sweep snapshot on the held-out examples
    for row in sweep_rows:
        row["accuracies"] = evaluate_mask(lm, test, snapshots[row["target"]], space=space).to_dict()
    acc = evaluate_mask(lm, test, final, space=space)
    train_acc = evaluate_mask(lm, train, final, space=space) if test is not train else acc
    if isinstance(final, ComponentMask):
        wm = final.to_weight_mask(space)
        weight_density = wm.density
        comps = space.component_names(final.masks)
    else:
        wm, weight_density, comps = final, final.density, []
    return CircuitResult(
        task=train.name, form=train.form, model_id=lm.model_id, granularity=config.granularity, density=final.density,
        weight_density=weight_density, accuracies=acc, steps=step, seconds=seconds,
        reached_target=finished_by in ("threshold", "anneal") and density <= config.target_density + 1e-9, finished_by=finished_by, config=config, history=history, sweep=sweep_rows,
        memory_bytes=mask_memory_bytes(n_total), mask=wm, component_mask=final if isinstance(final, ComponentMask) else None,
        sweep_masks=snapshots, components=comps, train_accuracies=train_acc,
    )


def _snapshot(lm, logits, chosen, space, task, config, step, density) -> WeightMask | ComponentMask:
    meta = {"name": f"{task.name}@{density:.4f}", "task": task.name, "form": task.form, "step": step,
            "target_density": config.target_density, "granularity": config.granularity}
    with torch.no_grad():
        hard = {n: (l > 0).detach().clone() for n, l in logits.items()}
    if space is not None:
        return ComponentMask(hard, lm.model_id, meta)
    return WeightMask(hard, dict(chosen), lm.model_id, meta)



def _topk_snapshot(lm, logits, chosen, space, task, config, step, density: float) -> WeightMask | ComponentMask:
    """Keep the ``density`` fraction of entries with the highest logits (exact global threshold)."""
    thr = _threshold(logits, density, sample=None)
    with torch.no_grad():
        hard = {n: (l.detach() >= thr) for n, l in logits.items()}
    meta = {"name": f"{task.name}@{density:g}", "task": task.name, "form": task.form, "step": step,
            "target_density": config.target_density, "granularity": config.granularity, "finished_by": "topk"}
    if space is not None:
        return ComponentMask(hard, lm.model_id, meta)
    return WeightMask(hard, dict(chosen), lm.model_id, meta)


#: above this many mask entries the anneal threshold is estimated from an evenly strided sample of this size
_THRESHOLD_SAMPLE = 2_000_000


@torch.no_grad()
def _threshold(logits: dict[str, torch.Tensor], density: float, *, sample: int | None = _THRESHOLD_SAMPLE) -> float:
    """The ``k``-th largest logit over all entries, ``k = round(density * n)`` (at least 1): keeping ``logits >= it``
    keeps a ``density`` fraction (ties aside). With ``sample``, estimated from an evenly strided sample of about that
    many entries when there are more (the kept fraction is then within ~0.02% of ``density``); ``None``: exact."""
    if density >= 1.0:
        return float("-inf")
    n = sum(l.numel() for l in logits.values())
    stride = max(1, n // sample) if sample else 1
    vals = torch.cat([l.detach().reshape(-1)[::stride] for l in logits.values()])
    k = max(1, round(density * vals.numel()))
    return float(vals.kthvalue(vals.numel() - k + 1).values)


def _saliency_logits(lm, task: CircuitTask, targets: torch.Tensor, space: ComponentSpace | None,
                     like: dict[str, torch.Tensor], config: DiscoveryConfig, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """``log |dL/dM|`` at the all-ones mask, summed over up to ``config.saliency_batches`` batches (first-order
    estimate of the faithfulness loss change when an entry is dropped; for weights ``|W * dL/dW|``)."""
    acc = {n: torch.zeros(l.shape, device=l.device) for n, l in like.items()}
    order = torch.randperm(len(task), generator=gen).tolist()
    bs = min(config.batch_size, len(task))
    ones = {n: torch.ones_like(a, requires_grad=True) for n, a in acc.items()}
    for b in range(min(config.saliency_batches, -(-len(task) // bs))):
        idx = order[b * bs:(b + 1) * bs]
        mp = masked_params(lm, ones) if space is None else masked_params(lm, space.expand(ones))
        loss = nn.functional.cross_entropy(task.logits(lm, mp, idx, batch_size=len(idx)).float(), targets[idx])
        for a, g in zip(acc.values(), torch.autograd.grad(loss, list(ones.values()))):
            a.add_(g.abs())
        del mp
    del ones
    top = max(float(a.max()) for a in acc.values())
    floor = top * 1e-12 if top > 0 else 1e-30
    return {n: a.clamp_min_(floor).log_() for n, a in acc.items()}
