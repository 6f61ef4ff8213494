"""``factlab mechanisms PROMPT``, ``factlab mechanisms dataset NAME`` and ``factlab mitigate``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer
from typer.core import TyperGroup

from factlab.cli.common import DeviceOpt, DtypeOpt, JsonOpt, ModelOpt, console, emit_json, err_console, load_model


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
    head: Optional[str] = typer.Option(None, "--head", help="LAYER.HEAD whose attention map to draw (default: the head with the largest |contribution|)."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Folder for PNGs and JSON."),
    model: str = ModelOpt,
    device: Optional[str] = DeviceOpt,
    dtype: Optional[str] = DtypeOpt,
    json_out: bool = JsonOpt,
) -> None:
    """Logit lens and direct contributions for one prompt (PNG curve, bar chart, attention map with --out)."""
    from factlab.mechanisms._common import MechanismError, check_head
    from factlab.mechanisms.contributions import direct_contributions
    from factlab.mechanisms.lens import logit_lens

    lm = load_model(model, device, dtype, quiet=json_out)
    if answer is None:
        answer = lm.predict([prompt], top_k=1)[0][0].token
    lens = logit_lens(lm, prompt, answer, exact=exact)
    dc = direct_contributions(lm, prompt, answer, contrast=contrast, exact=exact)
    report = {"lens": lens.to_dict(), "contributions": dc.to_dict()}
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        lens.plot(out / "lens.png")
        dc.plot(out / "contributions.png")
        if lm.adapter.has_attention:
            import torch

            from factlab.interventions import attention
            from factlab.mechanisms.plot import plot_attention

            if head is not None:
                try:
                    l, h = (int(x) for x in head.split("."))
                except ValueError:
                    raise MechanismError(f"--head must be LAYER.HEAD, e.g. 14.3, not {head!r}") from None
            else:
                best = max((p for p in dc.parts if p.kind == "head"), key=lambda p: abs(p.logit))
                l, h = best.layer, best.head
            check_head(lm, l, h)
            batch = lm.encode([prompt])
            with torch.no_grad(), attention(lm, layers=[l], record=True) as rec:
                lm.forward(batch)
            toks = [lm.tokenizer.decode([t]) for t in batch.input_ids[0].tolist()]
            plot_attention(out / "attention.png", rec.patterns[l][0, h].cpu().numpy(), toks, title=f"layer {l} head {h}")
            report["attention_head"] = [l, h]
        (out / "mechanisms.json").write_text(json.dumps(report, indent=2, ensure_ascii=False))
    if json_out:
        emit_json(report)
        return
    console.print(f"[bold]{prompt}[/bold] -> {dc.answer.token!r}   logit {dc.logit_actual:.3f} = sum of parts {dc.logit_sum:.3f} (error {dc.error:.1e})")
    for n in dc.notes:
        console.print(f"note: {n}")
    console.print("logit lens (answer prob by layer): " + " ".join(f"{l}:{p:.3f}" for l, p in zip(lens.layers, lens.prob)))
    console.print("largest direct contributions:")
    for p in dc.top(10):
        console.print(f"  {p.name:>12}  {p.logit:+.3f}")
    if out is not None:
        console.print(f"wrote {out}/lens.png, contributions.png{', attention.png' if lm.adapter.has_attention else ''}, mechanisms.json")


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
    from factlab.mechanisms.report import dataset_report

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
    from factlab.mechanisms.dataset import load_cases
    from factlab.mechanisms.mitigation import build_mitigation, mitigate

    lm = load_model(model, device, dtype, quiet=json_out)
    cases = load_cases(eval_set, limit)
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
        out.mkdir(parents=True, exist_ok=True)
        (out / "mitigation.json").write_text(json.dumps(d, indent=2))
        rep.plot(out / "mitigation.png")
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
