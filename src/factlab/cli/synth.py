"""``factlab synth ...`` commands. The main CLI calls :func:`register` to add them."""

from __future__ import annotations

import json
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import typer

if TYPE_CHECKING:
    from rich.table import Table

    from factlab.synth.train import BuildReport


class Size(str, Enum):
    tiny = "tiny"
    small = "small"


class Arch(str, Enum):
    gpt2 = "gpt2"
    mamba = "mamba"
    both = "both"


def register(app: typer.Typer) -> None:
    """Add the ``synth`` sub-app (``synth build``) to ``app``."""
    synth = typer.Typer(help="Synthetic world of facts and matched GPT-2 / Mamba models trained on it.", no_args_is_help=True)

    @synth.command("build")
    def build_cmd(
        out: Path = typer.Option(..., "--out", help="Build directory (created)."),
        size: Size = typer.Option(Size.tiny, "--size", help="tiny: CPU, about 4 minutes of CPU time; small: a GPU."),
        arch: Arch = typer.Option(Arch.both, "--arch", help="Which model(s) to train."),
        seed: int = typer.Option(0, "--seed", help="World and training seed."),
        device: str = typer.Option("auto", "--device", help="cpu, cuda, cuda:1, ... or auto (CUDA when available)."),
        threads: int | None = typer.Option(None, "--threads", help="torch CPU threads (default: torch's setting; 1 is best on a busy shared machine)."),
        as_json: bool = typer.Option(False, "--json", help="Print the report as JSON on stdout."),
    ) -> None:
        """Generate a world, export its datasets, train the models until they know >= 95% of the facts."""
        from rich.console import Console

        from factlab.synth import build

        archs = ("gpt2", "mamba") if arch is Arch.both else (arch.value,)
        err = Console(stderr=True)
        if not as_json:
            err.print(f"building synthetic world [bold]{size.value}[/] (seed {seed}) into {out}")
        if size is Size.small and device in ("auto", "cpu"):
            import torch

            if device == "cpu" or not torch.cuda.is_available():
                err.print("[yellow]--size small is meant for a GPU; on CPU it takes hours[/]")
        report = build(out, size=size.value, archs=archs, seed=seed, device=device, num_threads=threads)
        if as_json:
            typer.echo(json.dumps(report.to_json(), indent=2))
        else:
            Console().print(report_table(report))
            Console().print(
                f"{report.n_facts} facts, {report.n_relations} relations, vocabulary {report.vocab_size}; "
                f"total {report.total_seconds:.1f} s wall, {report.total_cpu_seconds:.1f} s CPU "
                f"on {report.device} (torch threads: {report.torch_threads}); "
                f"report: {Path(report.out_dir) / 'report.json'}"
            )
        if not report.converged:
            err.print(
                f"[red]not every model reached {report.threshold:.0%} of the training facts within the budget[/]; "
                "try another --seed or a larger step budget"
            )
            raise typer.Exit(1)

    @synth.command("compare")
    def compare_cmd(
        build_dir: Path = typer.Argument(..., help="A directory written by `factlab synth build`."),
        out: Optional[Path] = typer.Option(None, "--out", help="Output folder (default: BUILD_DIR/compare)."),
        trace_limit: int = typer.Option(40, "--trace-limit", min=1, help="Facts known to every model to trace."),
        samples: int = typer.Option(3, "--samples", min=1, help="Noise samples per trace."),
        window: int = typer.Option(3, "--window", min=1, help="Window of the windowed trace kinds (layers)."),
        edits: int = typer.Option(10, "--edits", min=0, help="CounterFact-style records to edit with ROME."),
        as_json: bool = typer.Option(False, "--json", help="Print the comparison as JSON on stdout."),
    ) -> None:
        """Trace (every kind) and ROME-edit the same facts in the build's GPT-2 and Mamba; one figure and table."""
        from rich.console import Console
        from rich.table import Table

        from factlab.cli.common import emit_json
        from factlab.synth.compare import compare

        res = compare(build_dir, out, trace_limit=trace_limit, samples=samples, window=window, edits=edits)
        if as_json:
            emit_json(res.to_dict())
            return
        con = Console()
        t = Table(title=f"Where each architecture carries the facts (figure: {res.figure})")
        rows = res.rows()
        for col in rows[0] if rows else []:
            t.add_column(col)
        for r in rows:
            t.add_row(*(str(v) for v in r.values()))
        con.print(t)
        t = Table(title="ROME edits (first-token success, mean over records)")
        for col in ("arch", "layer", "n", "efficacy", "paraphrase", "neighbourhood"):
            t.add_column(col)
        for a in res.archs.values():
            t.add_row(a.arch, str(a.edit_layer), str(a.n_edits), *(f"{m['mean']:.2f}" for m in (a.efficacy, a.paraphrase, a.neighborhood)))
        con.print(t)

    app.add_typer(synth, name="synth")


def report_table(report: BuildReport) -> Table:
    """A rich table of a :class:`factlab.synth.BuildReport`: one row per architecture."""
    from rich.table import Table

    t = Table(
        title=f"synth {report.size} (seed {report.seed})",
        caption="known: facts right on every training template; train / held-out: prompts right "
        "(top-1 of the answer's first token)",
    )
    for col in ("arch", "params", "steps", "secs", "known", "train", "held-out", "ok"):
        t.add_column(col, justify="left" if col == "arch" else "right")
    for a in report.archs.values():
        acc = a.accuracy
        t.add_row(
            a.arch,
            f"{a.params:,}",
            str(a.steps),
            f"{a.train_seconds:.1f}",
            f"{acc.train_fact:.1%}",
            f"{acc.train_prompt:.1%}",
            f"{acc.heldout_prompt:.1%}",
            "[green]yes[/]" if a.converged else "[red]no[/]",
        )
    return t
