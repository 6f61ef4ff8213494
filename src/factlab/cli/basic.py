"""``factlab models``, ``factlab predict`` and ``factlab demo``."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer
from rich.markup import escape
from rich.table import Table

from factlab.cli.common import DeviceOpt, DtypeOpt, JsonOpt, ModelOpt, check_prompts, console, emit_json, err_console, load_model

DEMO_FACTS = [
    "The Eiffel Tower is located in the city of",
    "The capital of Japan is the city of",
    "Michael Jordan is a professional",
    "The mother tongue of Danielle Darrieux is",
    "Toyota is a company headquartered in the country of",
]


def models(json_out: bool = JsonOpt) -> None:
    """List packaged offline models (installed or not) and the converted models in the cache."""
    from factlab.models import PACKAGED, cache_dir

    cached = sorted(p.name for p in (cache_dir() / "models").glob("*") if (p / "config.json").exists()) if (cache_dir() / "models").exists() else []
    rows = [
        {
            "name": m.name,
            "installed": m.installed(),
            "cached": any(c.startswith(m.name + "-") for c in cached),
            "description": m.description,
            "install": m.install,
        }
        for m in PACKAGED.values()
    ]
    if json_out:
        emit_json({"packaged": rows, "cache_dir": str(cache_dir()), "cached": cached})
        return
    t = Table(title="packaged models")
    for col in ("name", "installed", "float cache", "description"):
        t.add_column(col)
    for r in rows:
        t.add_row(*(escape(v) for v in (r["name"], "yes" if r["installed"] else "no", "yes" if r["cached"] else "no", r["description"])))
    console.print(t)
    # install commands on their own lines, whole (a table cell would cut them) and as text (not rich markup)
    for r in rows:
        console.print(escape(f"install {r['name']}: {r['install']}"), soft_wrap=True)
    console.print(escape(f"cache: {cache_dir()} ({len(cached)} converted model(s))"), soft_wrap=True)


def predict(
    prompts: List[str] = typer.Argument(..., help="One or more prompts."),
    top_k: int = typer.Option(5, "--top-k", "-k", min=1, help="How many next tokens to show."),
    model: str = ModelOpt,
    device: Optional[str] = DeviceOpt,
    dtype: Optional[str] = DtypeOpt,
    json_out: bool = JsonOpt,
) -> None:
    """Show the most likely next tokens after each prompt."""
    prompts = check_prompts(prompts)
    lm = load_model(model, device, dtype, quiet=json_out)
    preds = lm.predict(prompts, top_k=top_k)
    if json_out:
        emit_json([{"prompt": p, "predictions": [{"token": x.token, "prob": x.prob} for x in ps]} for p, ps in zip(prompts, preds)])
        return
    for p, ps in zip(prompts, preds):
        t = Table(title=escape(p), show_header=True)  # prompts and tokens are text, never rich markup
        t.add_column("token")
        t.add_column("prob", justify="right")
        for x in ps:
            t.add_row(escape(repr(x.token)), f"{x.prob:.3f}")
        console.print(t)


DEMO_SUBJECTS = ["The Eiffel Tower", "Japan", "Michael Jordan", "Danielle Darrieux", "Toyota", "The Colosseum"]
DEMO_EDIT = {
    "prompt": "{} is located in the city of",
    "subject": "The Eiffel Tower",
    "target_new": " Rome",
}
DEMO_CHECKS = {
    "rewrite prompt": "The Eiffel Tower is located in the city of",
    "paraphrase": "The Eiffel Tower stands in the heart of the city of",
    "unrelated": "The Statue of Liberty is located in the city of",  # another answer than the new target
}


def demo(
    model: str = ModelOpt,
    device: Optional[str] = DeviceOpt,
    dtype: Optional[str] = DtypeOpt,
    out: Path = typer.Option(Path("factlab-demo"), "--out", help="Folder for the heatmap and the saved edit."),
    samples: int = typer.Option(5, "--samples", min=1, help="Noise samples of the causal trace."),
    json_out: bool = JsonOpt,
) -> None:
    """Locate, edit, check: what the model knows, where it keeps one fact, a ROME edit of it, and its effect."""
    from factlab.data.errors import DatasetNotFoundError
    from factlab.edit import Request, edit
    from factlab.locate import trace
    from factlab.locate.corrupt import embedding_std

    lm = load_model(model, device, dtype, quiet=json_out)
    report: dict = {"model": lm.name, "family": lm.adapter.family}
    preds = lm.predict(DEMO_FACTS, top_k=3)
    report["facts"] = [{"prompt": p, "predictions": [x.to_dict() for x in ps]} for p, ps in zip(DEMO_FACTS, preds)]
    if not json_out:
        t = Table(title=f"1. What {lm.name} knows ({lm.adapter.family}, {lm.adapter.n_layers} layers)")
        for col in ("prompt", "top answer", "prob", "runners-up"):
            t.add_column(col, justify="right" if col == "prob" else "left")
        for p, ps in zip(DEMO_FACTS, preds):
            t.add_row(p, escape(repr(ps[0].token)), f"{ps[0].prob:.2f}", escape(", ".join(f"{x.token!r} {x.prob:.2f}" for x in ps[1:])))
        console.print(t)

    # 2. locate: causal trace of the fact we are about to edit
    out.mkdir(parents=True, exist_ok=True)
    prompt, subject = DEMO_CHECKS["rewrite prompt"], DEMO_EDIT["subject"]
    kind = "mlp" if "mlp" in lm.adapter.trace_kinds else "mixer"
    try:  # ROME's noise: 3 x the std of subject embeddings over known_1000's subjects
        noise: float | str = 3 * embedding_std(lm)
        report["noise"] = f"3 x std of subject embeddings over known_1000 = {noise:.4f}"
    except DatasetNotFoundError:  # no dataset here: the same rule over the demo's own subjects
        noise = 3 * embedding_std(lm, DEMO_SUBJECTS, cache=False)
        report["noise"] = f"3 x std of the embeddings of {len(DEMO_SUBJECTS)} demo subjects = {noise:.4f} (known_1000 not found)"
    traces = {}
    with err_console.status(f"2. causal tracing {subject!r} ({kind} outputs, {samples} noise samples) ..."):
        for k in (kind,):
            tr = trace(lm, prompt, subject, kind=k, samples=samples, noise=noise)
            traces[k] = {"peak": tr.peak(), "low": tr.low, "high": tr.high, "heatmap": str(tr.plot(out / f"trace_{k}.png"))}
    report["trace"] = traces

    # 3. edit: ROME rewrites the fact, then we look at the prompt, a paraphrase and an unrelated fact
    checks = list(DEMO_CHECKS.values())
    before = lm.predict(checks, top_k=1)
    with err_console.status("3. ROME edit: The Eiffel Tower -> Rome (statistics are computed once and cached) ..."):
        result = edit(lm, Request(**DEMO_EDIT), method="rome")
    try:
        after = lm.predict(checks, top_k=1)
        saved = result.save(out / "edit_eiffel_rome")
    finally:
        result.restore()
    restored = lm.predict(checks, top_k=1)
    report["edit"] = {
        "request": DEMO_EDIT,
        "layers": result.metadata.get("layers"),
        "saved": str(saved),
        "checks": [
            {"what": w, "prompt": p, "before": b[0].to_dict(), "after": a[0].to_dict(), "restored": r[0].to_dict()}
            for (w, p), b, a, r in zip(DEMO_CHECKS.items(), before, after, restored)
        ],
    }
    if json_out:
        emit_json(report)
        return
    t = Table(title=f"2. Where {lm.name} keeps it: causal trace of {subject!r} in {prompt!r}")
    for col in ("restored", "peak token", "peak layer", "score at peak", "corrupted", "clean", "heatmap"):
        t.add_column(col)
    for k, v in traces.items():
        pk = v["peak"]
        t.add_row(k, escape(repr(pk["token"])), str(pk["layer"]), f"{pk['score']:.3f}", f"{v['low']:.3f}", f"{v['high']:.3f}", escape(v["heatmap"]))
    console.print(t)
    console.print(f"noise: {report['noise']}")
    t = Table(title=escape(f"3. ROME edit at layer(s) {report['edit']['layers']}: {subject} -> {DEMO_EDIT['target_new'].strip()} (saved to {saved})"))
    for col in ("check", "prompt", "before", "after edit", "after restore"):
        t.add_column(col)
    for c in report["edit"]["checks"]:
        fmt = lambda x: escape(f"{x['token']!r} {x['prob']:.2f}")  # noqa: E731
        t.add_row(c["what"], c["prompt"], fmt(c["before"]), fmt(c["after"]), fmt(c["restored"]))
    console.print(t)
    console.print("The edit was restored bit for bit; re-apply it with factlab.edit.EditResult.load(path, lm).apply().")


def register(app: typer.Typer) -> None:
    app.command()(models)
    app.command()(predict)
    app.command()(demo)
