"""``factlab circuit find|edit|compare``: weight-mask circuits, edits inside/outside them, size/overlap/make-up."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import List, Optional

import typer
from rich.markup import escape

from factlab.cli.common import DeviceOpt, DtypeOpt, JsonOpt, ModelOpt, console, emit_json, load_model

circuit_app = typer.Typer(help="Find weight-mask circuits for a task, edit facts inside vs outside them, compare circuits.",
                          no_args_is_help=True)


def _floats(text: str) -> tuple[float, ...]:
    return tuple(float(x) for x in text.split(",") if x.strip()) if text else ()


@circuit_app.command("find")
def find(
    task: str = typer.Argument(..., help="blimp_dna1 ... persona_e ... hierarchy_label, 'hierarchy' (fact form), a CSV with text,label, "
                                         "or a CounterFact-schema JSON (fact form, e.g. a synthetic world's datasets/counterfact.json)."),
    relation: Optional[str] = typer.Option(None, "--relation", help="With a CounterFact JSON task: keep only this relation_id (e.g. P19)."),
    model: str = ModelOpt,
    density: float = typer.Option(0.05, "--density", help="Target density (fraction of masked weights kept), in (0, 1)."),
    sweep: str = typer.Option("", "--sweep", help="Also snapshot these densities on the way down, e.g. 0.5,0.35,0.25,0.15."),
    granularity: str = typer.Option("weight", "--granularity", help="weight | component (heads, neurons, norms)."),
    form: str = typer.Option("next-token", "--form", help="next-token (head-free) | head (the paper's classification head)."),
    types: str = typer.Option("attn,mlp,mixer,norm", "--types", help="Parameter types to mask (add embed, final_norm)."),
    train_size: int = typer.Option(0, "--train-size", help="Use at most this many training examples (0 = all)."),
    test_size: int = typer.Option(0, "--test-size", help="Evaluate on at most this many held-out examples (0 = all)."),
    steps: int = typer.Option(600, "--steps", help="Maximum training steps."),
    batch_size: int = typer.Option(32, "--batch-size"),
    lr: float = typer.Option(0.1, "--lr", help="AdamW learning rate of the mask logits."),
    estimator: str = typer.Option("gumbel", "--estimator", help="gumbel (paper) | hard-concrete | sigmoid (no noise)."),
    temperature: float = typer.Option(1.0, "--temperature"),
    lambda_every: int = typer.Option(10, "--lambda-every", help="Raise the sparsity weight by 1 every N steps."),
    seed: int = typer.Option(0, "--seed"),
    finish: str = typer.Option("topk", "--finish", help="topk: if --steps end above the target, keep the top-logit entries; threshold: paper's rule only."),
    schedule: str = typer.Option("lambda", "--schedule", help="lambda: the paper's rising sparsity penalty | anneal: exact top-k mask, density "
                                                          "lowered 1 -> target over --anneal-frac of the steps, then trained at the target."),
    init: str = typer.Option("constant", "--init", help="constant (paper) | saliency: log |W * dL/dW| of the full model (use with anneal)."),
    anneal_frac: float = typer.Option(0.6, "--anneal-frac", help="Share of --steps spent lowering the density (anneal schedule)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Folder for mask, split, report and pictures."),
    force: bool = typer.Option(False, "--force", help="Recompute even if OUT already holds a finished circuit."),
    device: Optional[str] = DeviceOpt,
    dtype: Optional[str] = DtypeOpt,
    json_out: bool = JsonOpt,
) -> None:
    """Learn a circuit (a weight mask) for TASK down to --density; report circuit/complement/full accuracy."""
    from factlab.circuits.discover import DiscoveryConfig, find_circuit
    from factlab.circuits.io import save_mask
    from factlab.circuits.tasks import make_task, split_to_dict
    from factlab.io import save_tensors, write_json

    config = DiscoveryConfig(target_density=density, sweep=_floats(sweep), granularity=granularity,  # type: ignore[arg-type]
                             types=tuple(t for t in types.split(",") if t), estimator=estimator, temperature=temperature,
                             lr=lr, batch_size=batch_size, max_steps=steps, lambda_every=lambda_every, seed=seed, finish=finish,  # type: ignore[arg-type]
                             schedule=schedule, init=init, anneal_frac=anneal_frac)  # type: ignore[arg-type]
    out = out or Path("runs/circuits") / f"{Path(task).stem}{'-' + relation if relation else ''}-{granularity}-{density:g}"
    if (out / "circuit.json").exists() and not force:
        report = json.loads((out / "circuit.json").read_text())
        _show_find(report, out, json_out, reused=True)
        return
    lm = load_model(model, device, dtype, quiet=json_out)
    t0 = time.perf_counter()
    train, test = make_task(lm, task, form, seed=seed, train_size=train_size or None, test_size=test_size or None,  # type: ignore[arg-type]
                            relation=relation)
    write_json(out / "split.json", split_to_dict(train, test))
    if test.head is not None:
        save_tensors(out / "head.safetensors", {k: v for k, v in test.head.state_dict().items()})
    res = find_circuit(lm, train, test, config, out_dir=out)
    save_mask(res.component_mask if res.component_mask is not None else res.mask, out / "mask.safetensors")
    if res.component_mask is not None:
        save_mask(res.mask, out / "weight_mask.safetensors")
    report = {**res.to_dict(), "model": lm.name, "train_size": len(train), "test_size": len(test),
              "task_seconds_total": time.perf_counter() - t0}
    write_json(out / "circuit.json", report)
    res.plot(out / "training.png")
    _show_find(report, out, json_out, reused=False)


def _show_find(report: dict, out: Path, json_out: bool, reused: bool) -> None:
    if json_out:
        emit_json({**report, "out": str(out), "reused": reused, "history": report["history"][-1:]})
        return
    a = report["accuracies"]
    console.print(f"[bold]{escape(str(report['task']))}[/] ({report['form']}, {report['granularity']}): density {report['density']:.4f} "
                  f"after {report['steps']} steps, {report['seconds']:.0f} s{' (reused)' if reused else ''}")
    console.print(f"  accuracy  full {a['full']:.3f}   circuit {a['circuit']:.3f}   complement {a['complement']:.3f}   "
                  f"agreement {a['agreement']:.3f}   (n={a['n']})")
    if report.get("train_accuracies"):
        t = report["train_accuracies"]
        console.print(f"  on the training examples: circuit {t['circuit']:.3f}   complement {t['complement']:.3f}   "
                      f"agreement {t['agreement']:.3f}   (n={t['n']})")
    for r in report.get("sweep", []):
        ra = r.get("accuracies", {})
        console.print(f"  sweep {r['target']:<5g} density {r['density']:.4f}: circuit {ra.get('circuit', float('nan')):.3f} "
                      f"complement {ra.get('complement', float('nan')):.3f}")
    if report.get("finished_by") == "topk":
        console.print("  [yellow]the paper's rule did not reach the target density within --steps; the circuit is the top-logit "
                      "entries. On large models use --schedule anneal --init saliency (see docs/circuits.md).[/]", soft_wrap=True)
    console.print(escape(f"  saved to {out}"), soft_wrap=True)


def _load_run(dir: Path, lm, file: Path | None = None):
    """The run's circuit (or another mask file of it) as a weight mask (component masks are expanded)."""
    from factlab.circuits.components import ComponentMask, ComponentSpace
    from factlab.circuits.io import load_mask

    mask = load_mask(file or dir / "mask.safetensors", lm)
    if isinstance(mask, ComponentMask):
        mask = mask.to_weight_mask(ComponentSpace(lm))
    return mask


def _run_model_and_records(dir: Path, data: str, relation: str | None, limit: int, seed: int, model: str,
                           device: str | None, dtype: str | None, quiet: bool) -> tuple[dict, object, list]:
    """(the run's circuit.json, the model it was found on unless --model says otherwise, the first ``limit`` fact
    records of ``data`` in a seeded order)."""
    import random as _random

    from factlab.circuits.tasks import fact_records

    meta = json.loads((dir / "circuit.json").read_text()) if (dir / "circuit.json").exists() else {}
    lm = load_model(meta.get("model", model) if model == ModelOpt.default else model, device, dtype, quiet=quiet)
    records = fact_records(data, relation)
    order = list(range(len(records)))
    _random.Random(seed).shuffle(order)
    return meta, lm, [records[i] for i in (order[:limit] if limit else order)]


def _task_of(dir: Path, lm):
    import torch

    from factlab.circuits.tasks import split_from_dict
    from factlab.io import load_tensors

    if not (dir / "split.json").exists():
        return None
    head = None
    if (dir / "head.safetensors").exists():
        sd = load_tensors(dir / "head.safetensors")
        head = torch.nn.Linear(sd["weight"].shape[1], sd["weight"].shape[0]).to(lm.device, lm.dtype)
        head.load_state_dict({k: v.to(lm.device, lm.dtype) for k, v in sd.items()})
        head.requires_grad_(False)
    return split_from_dict(json.loads((dir / "split.json").read_text()), head)[1]


@circuit_app.command("edit")
def edit(
    dir: Path = typer.Argument(..., help="A folder written by `factlab circuit find`."),
    data: str = typer.Option("hierarchy", "--data", help="hierarchy (hierarchy_data.json), counterfact, or a JSON path."),
    relation: Optional[str] = typer.Option(None, "--relation", help="Edit only records with this relation_id (e.g. P19)."),
    where: List[str] = typer.Option(["circuit", "complement", "random"], "--where", help="circuit | complement | random (repeatable)."),
    mode: List[str] = typer.Option(["restricted", "subnetwork"], "--mode", help="restricted | subnetwork (repeatable)."),
    limit: int = typer.Option(0, "--limit", help="Edit only the first N records (seeded order; 0 = all)."),
    steps: int = typer.Option(10, "--steps"),
    lr: float = typer.Option(5e-4, "--lr"),
    radius: float = typer.Option(5e-4, "--radius", help="Each weight stays within ±radius of its original value."),
    task_every: int = typer.Option(0, "--task-every", help="Measure task damage on every N-th edit (0 = never)."),
    sweep: bool = typer.Option(False, "--sweep", help="Also edit inside/outside every density-sweep snapshot."),
    no_final: bool = typer.Option(False, "--no-final", help="With --sweep: edit only the sweep snapshots, not the final circuit."),
    seed: int = typer.Option(0, "--seed"),
    model: str = ModelOpt,
    device: Optional[str] = DeviceOpt,
    dtype: Optional[str] = DtypeOpt,
    json_out: bool = JsonOpt,
) -> None:
    """Edit facts inside the circuit, its complement and a same-density random mask; before/after metrics with 95% CIs."""
    from factlab.circuits.edit import EditConfig, compare_edits
    from factlab.circuits.masks import random_mask
    from factlab.io import write_json

    meta, lm, records = _run_model_and_records(dir, data, relation, limit, seed, model, device, dtype, json_out)
    circuit = _load_run(dir, lm)
    cfg = EditConfig(lr=lr, steps=steps, radius=radius)
    task = _task_of(dir, lm) if task_every else None
    targets = [] if no_final and sweep else [("", circuit)]
    if sweep and (dir / "sweep").exists():
        final_tag = f"d{meta.get('config', {}).get('target_density', -1):g}"  # the final circuit is also saved there
        targets += [(p.stem, _load_run(dir, lm, p)) for p in sorted((dir / "sweep").glob("d*.safetensors")) if p.stem != final_tag]
    results = {}
    for tag, c in targets:
        pool = {"circuit": c, "complement": c.complement(), "random": random_mask(c, c.density, seed=seed)}
        masks = {w: pool[w] for w in where}
        sub = dir / "edits" / (tag or "final")
        comp = compare_edits(lm, records, masks, modes=mode, config=cfg, task=task, task_every=task_every, log_path=sub / "edits.jsonl")
        comp.to_json(sub / "summary.json")
        comp.plot(sub / "edit.png")
        results[tag or "final"] = {"density": c.density, **comp.to_dict()}
    earlier = json.loads((dir / "edits" / "summary.json").read_text()) if (dir / "edits" / "summary.json").exists() else {}
    write_json(dir / "edits" / "summary.json", {**earlier, **results})  # snapshots edited in an earlier call are kept
    if json_out:
        emit_json(results)
        return
    for tag, r in results.items():
        console.print(f"[bold]{tag}[/] (density {r['density']:.4f}, {r['config']['n_records']} facts)")
        for m, per in r["summary"].items():
            for w, s in per.items():
                d = s["nll_new"]["delta"]
                succ = s["success"]["after"]
                console.print(f"  {m:<10} {w:<10} ΔNLL(new) {d['mean']:+.4f} [{d['low']:+.4f}, {d['high']:+.4f}]   "
                              f"success after {succ['mean']:.2f} [{succ['low']:.2f}, {succ['high']:.2f}]", soft_wrap=True)


@circuit_app.command("compare")
def compare(
    dirs: List[Path] = typer.Argument(..., help="Folders written by `factlab circuit find`."),
    out: Path = typer.Option(Path("runs/circuits/compare"), "--out"),
    json_out: bool = JsonOpt,
) -> None:
    """Overlap matrix (Jaccard, overlap coefficient, per type), make-up both ways, density sweep plots."""
    from factlab.circuits.analysis import SweepReport, makeup, overlap_matrix
    from factlab.circuits.components import ComponentMask
    from factlab.circuits.io import load_mask
    from factlab.circuits.plot import plot_makeup
    from factlab.io import write_json

    masks = {}
    for d in dirs:
        p = d / ("weight_mask.safetensors" if (d / "weight_mask.safetensors").exists() else "mask.safetensors")
        m = load_mask(p)
        if isinstance(m, ComponentMask):
            raise typer.BadParameter(f"{d} holds a component mask without its weight form")
        masks[d.name] = m
    mat = overlap_matrix(masks)
    mat.to_json(out / "overlap.json")
    mat.plot(out / "overlap.png")
    mus = [makeup(m, n) for n, m in masks.items()]
    write_json(out / "makeup.json", [m.to_dict() for m in mus])
    plot_makeup(mus, out / "makeup.png")
    sweeps = []
    for d in dirs:
        if not (d / "circuit.json").exists():
            continue
        rep = json.loads((d / "circuit.json").read_text())
        rows = [{"target": r["target"], "density": r["density"], "accuracies": r["accuracies"]} for r in rep.get("sweep", []) if "accuracies" in r]
        edits = json.loads((d / "edits" / "summary.json").read_text()) if (d / "edits" / "summary.json").exists() else {}
        for row in rows:
            tag = "final" if row["target"] == rep["config"]["target_density"] else f"d{row['target']:g}"
            s = edits.get(tag, {}).get("summary", {}).get("restricted", {})
            row["edit"] = {w: v["nll_new"]["delta"] for w, v in s.items()}
        if rows:
            sr = SweepReport(rep["task"], rows)
            sr.plot(out / f"sweep_{d.name}.png")
            sweeps.append(sr.to_dict())
    write_json(out / "sweep.json", sweeps)
    report = {"overlap": mat.to_dict(), "makeup": [m.to_dict() for m in mus], "sweep": sweeps, "out": str(out)}
    if json_out:
        emit_json(report)
        return
    console.print("[bold]overlap (all types)[/]  Jaccard / overlap coefficient")
    for i, a in enumerate(mat.names):
        console.print("  " + a.ljust(28) + "  ".join(f"{mat.jaccard['all'][i][j]:.3f}/{mat.coefficient['all'][i][j]:.3f}" for j in range(len(mat.names))))
    console.print("[bold]make-up[/]  share of circuit by type | share of each type kept")
    for m in mus:
        console.print(f"  {m.name:<28} " + "  ".join(f"{t}:{m.share_of_circuit[t]:.3f}|{m.share_kept[t]:.3f}" for t in sorted(m.share_kept)), soft_wrap=True)
    console.print(escape(f"pictures and JSON in {out}"), soft_wrap=True)


@circuit_app.command("crosscheck")
def crosscheck(
    dir: Path = typer.Argument(..., help="A folder written by `factlab circuit find`."),
    data: str = typer.Option("hierarchy", "--data", help="hierarchy (hierarchy_data.json), counterfact, or a JSON path."),
    relation: Optional[str] = typer.Option(None, "--relation", help="Edit only records with this relation_id."),
    method: str = typer.Option("rome", "--method", help="rome | memit | emmet."),
    k: int = typer.Option(1, "--k", help="Edit at the k layers the circuit covers most, and at the k it covers least."),
    limit: int = typer.Option(12, "--limit", help="Edit only the first N records (seeded order; 0 = all)."),
    seed: int = typer.Option(0, "--seed"),
    model: str = ModelOpt,
    device: Optional[str] = DeviceOpt,
    dtype: Optional[str] = DtypeOpt,
    json_out: bool = JsonOpt,
) -> None:
    """ROME/MEMIT at the layers whose MLP output projection the circuit covers most vs least (each edit restored)."""
    from factlab.circuits.edit import rome_crosscheck
    from factlab.io import write_json

    _, lm, records = _run_model_and_records(dir, data, relation, limit, seed, model, device, dtype, json_out)
    res = rome_crosscheck(lm, records, _load_run(dir, lm), method=method, k=k)
    write_json(dir / f"crosscheck_{method}.json", res)
    if json_out:
        emit_json({k_: v for k_, v in res.items() if k_ != "rows"})
        return
    for label, s in res["summary"].items():
        d, succ = s["nll_new"]["delta"], s["success"]["after"]
        console.print(f"  {label:<15} layers {s['layers']} (coverage {', '.join(f'{c:.3f}' for c in s['coverage'])}): "
                      f"ΔNLL(new) {d['mean']:+.3f} [{d['low']:+.3f}, {d['high']:+.3f}]  success after {succ['mean']:.2f}", soft_wrap=True)


def register(app: typer.Typer) -> None:
    """Add the ``circuit`` sub-app."""
    app.add_typer(circuit_app, name="circuit")
