"""``factlab trace``, ``factlab trace-dataset`` and ``factlab knockout``: where does the model keep a fact?"""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import List, Optional

import typer
from rich.markup import escape
from rich.table import Table

from factlab.cli.common import DeviceOpt, DtypeOpt, JsonOpt, ModelOpt, check_prompts, console, emit_json, load_model


class TraceMethod(str, Enum):
    """How restorations are scored."""

    exact = "exact"
    attribution = "attribution"


class Corruption(str, Enum):
    """How the subject is corrupted."""

    noise = "noise"
    swap = "swap"


class KnockoutMethod(str, Enum):
    """attention (transformers); exact or mean (Mamba)."""

    attention = "attention"
    exact = "exact"
    mean = "mean"


def _kinds(lm, kind: str) -> list[str]:
    from factlab.locate._common import check_kind

    kinds = list(lm.adapter.trace_kinds) if kind == "all" else [k.strip() for k in kind.split(",") if k.strip()]
    for k in kinds:
        check_kind(lm, k)
    return kinds


def _noise(noise: str):
    try:
        return float(noise)
    except ValueError:
        return noise


def trace(
    prompt: str = typer.Argument(..., help="The prompt whose next token states the fact."),
    subject: str = typer.Option(..., "--subject", "-s", help="The subject, exactly as written in the prompt."),
    kind: str = typer.Option("residual", "--kind", "-k", help="residual, mlp, attn (Mamba: mixer, ssm.in, gate, ...), a comma list, or all."),
    samples: int = typer.Option(10, "--samples", "-n", min=1, help="Corrupted copies averaged per restoration."),
    window: int = typer.Option(10, "--window", "-w", min=1, help="Layers restored together for module kinds."),
    noise: str = typer.Option("3x", "--noise", help="'3x' (times the subject-embedding std) or an absolute level."),
    target: Optional[str] = typer.Option(None, "--target", "-t", help="Answer to score (default: the model's top-1)."),
    method: TraceMethod = typer.Option(TraceMethod.exact, "--method", help="exact, or attribution (gradient estimate)."),
    corruption: Corruption = typer.Option(Corruption.noise, "--corruption", help="noise (ROME) or swap (--swap subjects)."),
    swap: Optional[List[str]] = typer.Option(None, "--swap", help="Subject(s) to swap in for --corruption swap."),
    seed: int = typer.Option(0, "--seed", help="Noise draw."),
    out: Path = typer.Option(Path("factlab-trace"), "--out", "-o", help="Folder for the heatmaps and JSON."),
    model: str = ModelOpt,
    device: Optional[str] = DeviceOpt,
    dtype: Optional[str] = DtypeOpt,
    json_out: bool = JsonOpt,
) -> None:
    """Causal trace: corrupt the subject, restore one state at a time, and draw where the answer comes back."""
    from factlab.locate import trace_kinds

    check_prompts([prompt])
    lm = load_model(model, device, dtype, quiet=json_out)
    kinds = _kinds(lm, kind)
    results = trace_kinds(
        lm, prompt, subject, kinds, window=window, method=method.value, samples=samples, noise=_noise(noise), target=target,
        seed=seed, corruption=corruption.value, swap_subjects=swap,
    )
    files = {}
    for k, r in results.items():
        stem = f"trace_{k}{'_attribution' if method is TraceMethod.attribution else ''}"
        r.to_json(out / f"{stem}.json")
        files[k] = {"json": str(out / f"{stem}.json"), "png": str(r.plot(out / f"{stem}.png"))}
    if json_out:
        emit_json({"results": {k: r.to_dict() for k, r in results.items()}, "files": files})
        return
    first = next(iter(results.values()))
    console.print(f"[bold]{escape(repr(prompt))}[/bold] -> {escape(repr(first.target))}: clean p={first.high:.3f}, corrupted p={first.low:.3f}")
    t = Table(title=escape(f"causal trace ({method.value}) of {subject!r} in {lm.name}"))
    for col in ("kind", "peak token", "peak layer", "peak score", "heatmap"):
        t.add_column(col)
    for k, r in results.items():
        pk = r.peak()
        t.add_row(k, escape(repr(pk["token"])), str(pk["layer"]), f"{pk['score']:.3f}", escape(files[k]["png"]))
    console.print(t)


def _records(dataset: str, limit: Optional[int]):
    from factlab.data import load_known

    if dataset in ("known_1000", "known", "knowns"):
        return load_known(limit=limit)
    return load_known(path=dataset, limit=limit)


def trace_dataset(
    dataset: str = typer.Argument("known_1000", help="known_1000, or a path to a JSON file in its format."),
    limit: Optional[int] = typer.Option(None, "--limit", help="Read only the first N records."),
    max_known: Optional[int] = typer.Option(None, "--max-known", help="Stop after N facts the model knows."),
    kinds: str = typer.Option("default", "--kinds", help="Comma list of kinds (default: residual,mlp,attn; Mamba: residual,mixer,ssm.out,gate)."),
    samples: int = typer.Option(10, "--samples", "-n", min=1),
    window: int = typer.Option(10, "--window", "-w", min=1),
    noise: str = typer.Option("3x", "--noise"),
    seed: int = typer.Option(0, "--seed"),
    method: TraceMethod = typer.Option(TraceMethod.exact, "--method", help="exact, or attribution (gradient estimates: fast, approximate)."),
    out: Path = typer.Option(Path("factlab-trace-dataset"), "--out", "-o", help="Folder of the resumable run (rerun to continue)."),
    model: str = ModelOpt,
    device: Optional[str] = DeviceOpt,
    dtype: Optional[str] = DtypeOpt,
    json_out: bool = JsonOpt,
) -> None:
    """Average causal traces over the facts the model knows (ROME Fig. 2); resumable."""
    from factlab.locate import trace_dataset as run
    from factlab.locate.dataset import default_kinds

    records = _records(dataset, limit)  # a missing dataset fails before the model is loaded
    lm = load_model(model, device, dtype, quiet=json_out)
    ks = default_kinds(lm) if kinds == "default" else _kinds(lm, kinds)
    res = run(lm, records, kinds=ks, out_dir=out, max_known=max_known, samples=samples,
              noise=_noise(noise), window=window, seed=seed, method=method.value)
    fig = res.plot(out / "aie.png")
    if json_out:
        emit_json({**res.to_dict(), "figure": str(fig)})
        return
    console.print(f"{res.n_kept} known facts traced of {res.n_total} read ({res.n_unknown} not known, {res.n_failed} failed); "
                  f"mean clean p={res.mean_high:.3f}, corrupted p={res.mean_low:.3f}")
    t = Table(title=escape(f"peak average indirect effect ({lm.name})"))
    for col in ("kind", "token class", "layer", "AIE"):
        t.add_column(col)
    for k in res.kinds:
        pk = res.peak(k)
        t.add_row(k, pk["class"], str(pk["layer"]), f"{pk['aie']:.4f}")
    console.print(t)
    console.print(escape(f"figure: {fig}\nper-fact traces: {out / 'traces.jsonl'}"), soft_wrap=True)


def knockout(
    prompt: Optional[str] = typer.Argument(None, help="The prompt (omit with --dataset)."),
    subject: Optional[str] = typer.Option(None, "--subject", "-s", help="The subject, exactly as written in the prompt."),
    window: int = typer.Option(9, "--window", "-w", min=1, help="Layers blocked together (Geva et al.: 9)."),
    method: Optional[KnockoutMethod] = typer.Option(None, "--method", help="attention (transformers); exact or mean (Mamba)."),
    target: Optional[str] = typer.Option(None, "--target", "-t"),
    dataset: Optional[str] = typer.Option(None, "--dataset", help="Average over a dataset instead (known_1000 or a path)."),
    limit: Optional[int] = typer.Option(None, "--limit", help="With --dataset: the first N records."),
    out: Path = typer.Option(Path("factlab-knockout"), "--out", "-o", help="Folder for the figure and JSON."),
    model: str = ModelOpt,
    device: Optional[str] = DeviceOpt,
    dtype: Optional[str] = DtypeOpt,
    json_out: bool = JsonOpt,
) -> None:
    """Attention knockout (Geva et al.): cut the last token's view of the subject / other tokens / itself."""
    from factlab.locate import knockout as run
    from factlab.locate import knockout_dataset
    from factlab.locate._common import TraceInputError

    how = method.value if method is not None else None
    if dataset is not None:
        records = _records(dataset, limit)  # a missing dataset fails before the model is loaded
    elif prompt is None or subject is None:
        raise TraceInputError("give a PROMPT and --subject, or --dataset known_1000")
    else:
        check_prompts([prompt])
    lm = load_model(model, device, dtype, quiet=json_out)
    if dataset is not None:
        res = knockout_dataset(lm, records, window=window, method=how)
    else:
        res = run(lm, prompt, subject, window=window, method=how, target=target)
    fig = res.plot(out / "knockout.png")
    from factlab.io import write_json

    write_json(out / "knockout.json", res.to_dict())
    if json_out:
        emit_json({**res.to_dict(), "figure": str(fig)})
        return
    t = Table(title=escape(f"{res.method} knockout, {lm.name}: % change of p({res.target!r}) (clean p={res.p_clean:.3f}, n={res.n})"))
    t.add_column("blocked")
    t.add_column("strongest drop (layer)")
    t.add_column("change", justify="right")
    for b in res.blocks:
        ch = res.change[b]
        i = min(range(len(ch)), key=lambda j: ch[j])
        t.add_row(b, str(i), f"{100 * ch[i]:+.1f}%")
    console.print(t)
    console.print(escape(f"figure: {fig}"), soft_wrap=True)


def register(app: typer.Typer) -> None:
    app.command()(trace)
    app.command(name="trace-dataset")(trace_dataset)
    app.command()(knockout)
