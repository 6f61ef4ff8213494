"""``factlab lre fit``, ``factlab lre eval`` and ``factlab lens``."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer
from rich.table import Table

from factlab.cli.common import DeviceOpt, DtypeOpt, JsonOpt, ModelOpt, console, emit_json, err_console, load_model


def _layer(value: Optional[str], option: str = "--layer"):
    """``None``, ``"emb"`` or an int; anything else is a usage error (ranges are checked against the model)."""
    if value is None:
        return None
    v = value.strip()
    if v == "emb":
        return v
    try:
        return int(v)
    except ValueError:
        raise typer.BadParameter(f"{option} takes a layer number or 'emb', not {value!r}") from None


def _layers(value: Optional[str], option: str = "--sweep-layers"):
    if not value:
        return None
    return [_layer(v, option) for v in value.split(",") if v.strip()]


def _check_layers(lm, layers) -> None:
    """Every given layer exists in ``lm``: checked before any forward pass (None means "the sweep chooses")."""
    from factlab.lre.states import check_layer

    for layer in layers:
        if layer is not None:
            check_layer(lm, layer)


def fit_cmd(
    relation: str = typer.Argument(..., help="Relation name (file stem or name field) or path to a relation JSON file."),
    model: str = ModelOpt,
    layer: Optional[str] = typer.Option(None, "--layer", "-l", help="Subject layer (int or 'emb'); default: chosen by the sweep on training data."),
    beta: Optional[float] = typer.Option(None, "--beta", help="Scale of W h; default: chosen by the sweep."),
    rank: Optional[int] = typer.Option(None, "--rank", help="Truncate W to this rank when predicting."),
    n_train: int = typer.Option(5, "--n-train", help="Training examples."),
    seed: int = typer.Option(0, "--seed"),
    layers: Optional[str] = typer.Option(None, "--sweep-layers", help="Comma-separated layers for the sweep."),
    save: Optional[Path] = typer.Option(None, "--save", help="Write FILE.safetensors + FILE.json."),
    device: Optional[str] = DeviceOpt,
    dtype: Optional[str] = DtypeOpt,
    json_out: bool = JsonOpt,
) -> None:
    """Fit an LRE on the relation's known samples (sweeping layer/β/rank on training data when not given)."""
    from factlab.data import load_relation
    from factlab.lre import filter_known, fit, require_known, split_known, sweep

    layer_value, sweep_layers = _layer(layer), _layers(layers)
    rel = load_relation(relation)
    lm = load_model(model, device, dtype, quiet=json_out)
    _check_layers(lm, [layer_value, *(sweep_layers or [])])
    kf = filter_known(lm, rel, n_icl=n_train, seed=seed, max_samples=200)
    require_known(kf, n_train + 3)
    edit_layer = edit_rank = None
    if layer is None or beta is None:
        sw = sweep(lm, rel, kf.known, seed=seed, n_train=n_train, layers=sweep_layers)
        train = sw.split.train
        lay = sw.layer if layer is None else layer_value
        b = sw.beta if beta is None else beta
        edit_layer, edit_rank = sw.edit_layer, sw.rank
    else:
        train = split_known(kf.known, n_train, seed).train
        lay, b = layer_value, beta
    op = fit(lm, rel, layer=lay, beta=b, rank=rank, train=train, edit_rank=edit_rank if edit_layer == lay else None)
    out = {**op.to_dict(), "n_known": kf.n_known, "n_tested": kf.n_known + len(kf.unknown), "sweep_edit_layer": edit_layer, "sweep_edit_rank": edit_rank}
    if save is not None:
        out["saved"] = str(op.save(save))
    if json_out:
        emit_json(out)
        return
    t = Table(title=f"LRE {rel.name} on {lm.name}")
    t.add_column("field")
    t.add_column("value")
    for k in ("layer", "beta", "rank", "edit_rank", "n_known", "n_tested", "weight_norm", "bias_norm", "sweep_edit_layer", "saved"):
        if k in out:
            t.add_row(k, str(out[k]))
    t.add_row("train", ", ".join(f"{s.subject} → {s.object}" for s in op.train))
    console.print(t)


def eval_cmd(
    relations: List[str] = typer.Argument(..., help="Relation names or files, or 'all'."),
    model: str = ModelOpt,
    out: Path = typer.Option(Path("runs/lre"), "--out", help="Results folder (resumable: results.jsonl, table.md, table.json)."),
    trials: int = typer.Option(3, "--trials", help="Trials (seeds) per relation; CIs are over trials."),
    n_train: int = typer.Option(5, "--n-train"),
    max_samples: int = typer.Option(200, "--max-samples", help="Cap on samples tested per relation (seeded draw)."),
    min_known: int = typer.Option(12, "--min-known", help="Relations with fewer known samples are listed as 'too few known'."),
    layers: Optional[str] = typer.Option(None, "--layers", help="Comma-separated sweep layers (default: up to 8 evenly spaced)."),
    seed: int = typer.Option(0, "--seed"),
    device: Optional[str] = DeviceOpt,
    dtype: Optional[str] = DtypeOpt,
    json_out: bool = JsonOpt,
) -> None:
    """Per-relation table: known samples, layer, β, faithfulness and causality with CIs, and baselines."""
    from factlab.data import load_relation, load_relations
    from factlab.lre import EvalSettings, evaluate_relations
    from factlab.progress import progress

    sweep_layers = _layers(layers, "--layers")
    rels = load_relations("all") if relations == ["all"] else [load_relation(r) for r in relations]
    lm = load_model(model, device, dtype, quiet=json_out)
    _check_layers(lm, sweep_layers or [])
    settings = EvalSettings(n_train=n_train, trials=trials, min_known=min_known, max_samples=max_samples, layers=sweep_layers)

    def report(r) -> None:
        if not json_out:
            f = r.faithfulness.get("lre", {}).get("mean")
            c = r.causality.get("lre", {}).get("mean")
            err_console.print(f"{r.relation}: {r.status} ({r.message})" + (f" F={f:.2f} C={c:.2f}" if f is not None else ""))

    rows = evaluate_relations(lm, list(progress(rels, desc="relations", unit="rel")), out, settings, seed=seed, on_result=report)
    if json_out:
        emit_json({"rows": [r.to_dict() for r in rows], "out": str(out)})
        return
    console.print((out / "table.md").read_text())


def lens_cmd(
    prompt: str = typer.Argument(..., help="The prompt to decode."),
    relation: Optional[str] = typer.Option(None, "--relation", "-r", help="Fit an LRE of this relation (omit it and --lre for the logit lens)."),
    lre_file: Optional[Path] = typer.Option(None, "--lre", help="A saved LRE (from `lre fit --save`)."),
    layer: Optional[str] = typer.Option(None, "--layer", "-l", help="LRE layer when fitting (default: sweep)."),
    beta: Optional[float] = typer.Option(None, "--beta", help="LRE scale β when fitting (default: sweep)."),
    target: Optional[str] = typer.Option(None, "--target", help="Also record the probability of this object."),
    model: str = ModelOpt,
    out: Path = typer.Option(Path("runs/lens"), "--out", help="Folder for lens.png, lens.svg and lens.json."),
    max_samples: int = typer.Option(60, "--max-samples", help="Samples tested by the known filter before fitting."),
    device: Optional[str] = DeviceOpt,
    dtype: Optional[str] = DtypeOpt,
    json_out: bool = JsonOpt,
) -> None:
    """Attribute lens: decode every (layer, token) state through an LRE and draw the grid (no LRE: logit lens)."""
    from rich.markup import escape

    from factlab.data import load_relation
    from factlab.io import write_json
    from factlab.lre import LRE
    from factlab.lre.lens import lens

    layer_value = _layer(layer)
    rel = load_relation(relation) if relation is not None else None
    op = LRE.load(lre_file) if lre_file is not None else None
    lm = load_model(model, device, dtype, quiet=json_out)
    grid = lens(lm, prompt, relation=rel, operator=op, layer=layer_value, beta=beta, target=target, max_samples=max_samples)
    png = grid.plot(out / "lens.png")
    svg = grid.plot(out / "lens.svg")
    write_json(out / "lens.json", grid.to_dict())
    if json_out:
        emit_json({"png": str(png), "svg": str(svg), "operator": grid.operator, "last_token_top": [g[-1] for g in grid.top]})
        return
    console.print(escape(f"{grid.operator}: wrote {png} and {svg}"), soft_wrap=True)
    console.print(escape("top token at the last position per layer: " + " | ".join(f"{l}:{g[-1].strip()}" for l, g in zip(grid.layers, grid.top))))


def register(app: typer.Typer) -> None:
    """Add the ``lre`` sub-app (``fit``, ``eval``) and the top-level ``lens`` command."""
    sub = typer.Typer(help="Linear relational embeddings: fit, evaluate (faithfulness, causality, baselines).", no_args_is_help=True)
    sub.command("fit")(fit_cmd)
    sub.command("eval")(eval_cmd)
    app.add_typer(sub, name="lre")
    app.command("lens")(lens_cmd)
