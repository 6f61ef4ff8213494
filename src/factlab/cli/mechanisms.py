"""``factlab mechanisms PROMPT``, ``factlab mechanisms dataset NAME`` and ``factlab mitigate``."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from typer.core import TyperGroup

from factlab.cli.common import DeviceOpt, DtypeOpt, JsonOpt, ModelOpt, console, emit_json, load_model


class _DefaultToPrompt(TyperGroup):
    """``factlab mechanisms "some prompt"`` runs the ``prompt`` subcommand."""

    def parse_args(self, ctx, args):
        if args and args[0] not in self.commands and args[0] not in ("--help", "-h"):
            args = ["prompt", *args]
        return super().parse_args(ctx, args)


mech = typer.Typer(cls=_DefaultToPrompt, no_args_is_help=True, help="Mechanisms of recall: logit lens, direct contributions, heads, final-layer suppression.")


@mech.command("prompt")
def prompt_cmd(
    prompt: str = typer.Argument(..., help="The prompt, e.g. 'The Eiffel Tower is located in the city of'."),
    answer: Optional[str] = typer.Option(None, "--answer", "-a", help="Answer to explain (default: the model's top token)."),
    contrast: Optional[str] = typer.Option(None, "--contrast", help="Contrast token for logit differences."),
    exact: bool = typer.Option(False, "--exact", help="Refuse a multi-token answer instead of using its first token."),
    head: Optional[str] = typer.Option(None, "--head", help="LAYER.HEAD whose attention to show, drawn with --out (default: the head with the largest |contribution|)."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Folder for PNGs and JSON."),
    model: str = ModelOpt,
    device: Optional[str] = DeviceOpt,
    dtype: Optional[str] = DtypeOpt,
    json_out: bool = JsonOpt,
) -> None:
    """Logit lens and direct contributions for one prompt (PNG curve, bar chart, attention map with --out)."""
    from rich.markup import escape

    from factlab.mechanisms.report import prompt_mechanisms

    lm = load_model(model, device, dtype, quiet=json_out)
    res = prompt_mechanisms(lm, prompt, answer=answer, contrast=contrast, exact=exact, head=head, out=out)
    if json_out:
        emit_json(res.to_dict())
        return
    dc, lens = res.contributions, res.lens
    console.print(f"[bold]{escape(prompt)}[/bold] -> {escape(repr(dc.answer.token))}   logit {dc.logit_actual:.3f} = sum of parts "
                  f"{dc.logit_sum:.3f} (error {dc.error:.1e})")
    for n in dc.notes:
        console.print(escape(f"note: {n}"))
    console.print("logit lens (answer prob by layer): " + " ".join(f"{l}:{p:.3f}" for l, p in zip(lens.layers, lens.prob)))
    console.print("largest direct contributions:")
    for p in dc.top(10):
        console.print(f"  {p.name:>12}  {p.logit:+.3f}")
    if res.head is not None and res.attention is not None and res.tokens:
        row = res.attention[-1]
        top = sorted(range(len(row)), key=lambda t: -row[t])[:3]
        console.print(escape(f"layer {res.head[0]} head {res.head[1]}: the last token attends most to "
                             + ", ".join(f"{res.tokens[t]!r} {row[t]:.2f}" for t in top)))
    if out is not None:
        console.print(escape(f"wrote {out}/lens.png, contributions.png{', attention.png' if res.head is not None else ''}, mechanisms.json"),
                      soft_wrap=True)


@mech.command("dataset")
def dataset_cmd(
    name: str = typer.Argument("known_1000", help="known_1000, lre (factual LRE relations) or lre:<relation>."),
    limit: Optional[int] = typer.Option(None, "--limit", "-n", help="Use the first N facts."),
    ablate_limit: int = typer.Option(200, "--ablate-limit", help="Facts used for the head ablations."),
    batch_size: int = typer.Option(16, "--batch-size"),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Folder for stats, JSON and PNGs."),
    model: str = ModelOpt,
    device: Optional[str] = DeviceOpt,
    dtype: Optional[str] = DtypeOpt,
    json_out: bool = JsonOpt,
) -> None:
    """Dataset-level measurements: lens, final-layer suppression and its carriers, argument heads, ablations."""
    from factlab.mechanisms._common import check_out_dir
    from factlab.mechanisms.dataset import load_cases
    from factlab.mechanisms.report import dataset_report

    check_out_dir(out)
    load_cases(name, 1)  # an unknown fact set fails before the model is loaded
    lm = load_model(model, device, dtype, quiet=json_out)
    rep = dataset_report(lm, name, limit=limit, ablate_limit=ablate_limit, batch_size=batch_size, out=out)
    if json_out:
        emit_json(rep)
        return
    oc = rep["overconfidence"]
    console.print(f"{rep['n']} facts, top-1 accuracy {rep['top1_accuracy']['mean']:.3f}")
    console.print(
        f"final layer changes the answer prob by {oc['final_layer_prob_change']['mean']:+.4f} "
        f"[{oc['final_layer_prob_change']['low']:+.4f}, {oc['final_layer_prob_change']['high']:+.4f}]; "
        f"lowers it for {oc['suppressed_fraction']['mean']:.1%} of facts"
    )
    console.print(f"final attention centred DLA {oc['attn_dla_centered']['mean']:+.3f}, final MLP {oc['mlp_dla_centered']['mean']:+.3f}")
    ok = rep["overconfidence_known"]
    if ok["n"]:
        console.print(
            f"over the {ok['n']} facts the model knows: {ok['final_layer_prob_change']['mean']:+.4f} "
            f"[{ok['final_layer_prob_change']['low']:+.4f}, {ok['final_layer_prob_change']['high']:+.4f}], "
            f"lowered for {ok['suppressed_fraction']['mean']:.1%}"
        )
    if rep.get("argument_heads"):
        console.print("argument heads: " + ", ".join(f"L{h['layer']}.H{h['head']}{'*' if h['passes'] else ''}" for h in rep["argument_heads"][:5]))
    if out is not None:
        console.print(f"wrote {out}")


def mitigate_cmd(
    eval_set: str = typer.Option("known_1000", "--eval", help="known_1000, lre or lre:<relation>."),
    limit: Optional[int] = typer.Option(None, "--limit", "-n", help="Use the first N facts."),
    select_fraction: float = typer.Option(0.4, "--select-fraction", help="Fraction of facts used to choose the mitigation."),
    seed: int = typer.Option(0, "--seed"),
    n_windows: int = typer.Option(16, "--windows", help="WikiText-2 windows (128 tokens each) for perplexity."),
    batch_size: int = typer.Option(16, "--batch-size"),
    save: Optional[Path] = typer.Option(None, "--save", help="Save the chosen mitigation (an edit) to this folder."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Folder for the JSON report and PNG."),
    model: str = ModelOpt,
    device: Optional[str] = DeviceOpt,
    dtype: Optional[str] = DtypeOpt,
    json_out: bool = JsonOpt,
) -> None:
    """Choose a final-layer mitigation on a selection split; report held-out accuracy and perplexity."""
    from factlab.io import write_json
    from factlab.mechanisms._common import check_out_dir, staged_dir
    from factlab.mechanisms.dataset import load_cases, split_cases
    from factlab.mechanisms.mitigation import build_mitigation, mitigate

    check_out_dir(out)
    cases = load_cases(eval_set, limit)
    split_cases(cases, select_fraction, seed)  # checks the fraction before the model is loaded
    lm = load_model(model, device, dtype, quiet=json_out)
    rep, dirs = mitigate(lm, cases, select_fraction=select_fraction, seed=seed, n_windows=n_windows, batch_size=batch_size, eval_set=eval_set)
    d = rep.to_dict()
    if save is not None:
        edit = build_mitigation(lm, rep.chosen, dirs, {"eval": eval_set, "seed": seed})
        try:
            edit.save(save)
        finally:
            edit.restore()
        d["saved"] = str(save)
    if out is not None:
        with staged_dir(out) as tmp:
            write_json(tmp / "mitigation.json", d)
            rep.plot(tmp / "mitigation.png")
    if json_out:
        emit_json(d)
        return
    console.print(f"chosen: {rep.chosen.name} (on {rep.n_selection} selection facts)")
    console.print(
        f"held-out accuracy {rep.accuracy_before} -> {rep.accuracy_after} (change {rep.accuracy_change}) on {rep.n_heldout} facts"
    )
    console.print(f"WikiText-2 perplexity {rep.perplexity_before:.2f} -> {rep.perplexity_after:.2f} ({rep.n_text_tokens} tokens)")


def register(app: typer.Typer) -> None:
    app.add_typer(mech, name="mechanisms")
    app.command("mitigate")(mitigate_cmd)
