"""``factlab edit`` (rewrite facts; ``edit apply``, ``edit demo``) and ``factlab stats``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, List, Optional

import typer
from rich.table import Table
from typer.core import TyperCommand, TyperGroup

from factlab.cli.common import DeviceOpt, DtypeOpt, JsonOpt, ModelOpt, console, emit_json, err_console, load_model
from factlab.errors import InputError, NonFiniteError


def registered_methods_help(command: Any, *, none: bool = False) -> None:
    """Append the registered solvers' names to the help of ``command``'s ``--method`` option. Called when the help
    is shown (the registry imports torch, which ``factlab --help`` must not)."""
    from factlab.edit.registry import solver_names

    names = ", ".join((("none",) if none else ()) + solver_names())
    for p in command.params:
        if p.name == "method" and p.help and "One of:" not in p.help:
            p.help = f"{p.help} One of: {names}."


class MethodHelpCommand(TyperCommand):
    """A command whose ``--method`` help lists the registered solvers (read when the help is shown)."""

    with_none = False

    def format_help(self, ctx: Any, formatter: Any) -> None:
        registered_methods_help(self, none=self.with_none)
        super().format_help(ctx, formatter)


class EvalMethodHelpCommand(MethodHelpCommand):
    """As :class:`MethodHelpCommand`, ``none`` (no edit) listed first."""

    with_none = True


class MethodHelpGroup(TyperGroup):
    """A group (``factlab edit``) whose own ``--method`` help lists the registered solvers."""

    def format_help(self, ctx: Any, formatter: Any) -> None:
        registered_methods_help(self)
        super().format_help(ctx, formatter)


edit_app = typer.Typer(cls=MethodHelpGroup, help="Rewrite facts in a model's weights (ROME, MEMIT, EMMET, AlphaEdit, ... or a "
                       "registered solver); run edit streams.", no_args_is_help=False)


def _hparams(text: Optional[str]) -> dict[str, Any] | None:
    """``--hparams``: a JSON object, or a file holding one; :class:`InputError` otherwise."""
    if not text:
        return None
    p = Path(text)
    is_file = p.is_file()
    where = f"the file {p}" if is_file else "--hparams"
    try:
        value = json.loads(p.read_text(encoding="utf-8") if is_file else text)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        hint = "" if is_file else " (nor an existing file)"
        raise InputError(f"{where} is not valid JSON{hint}: {e}; give an object such as '{{\"v_steps\": 20}}'") from None
    if not isinstance(value, dict):
        raise InputError(f"{where} must be a JSON object such as '{{\"v_steps\": 20}}', not {type(value).__name__}")
    return value


def _layers(text: Optional[str]) -> list[int] | None:
    """``--layers``: comma-separated integers (``4,5``); :class:`InputError` otherwise (the range is checked by
    the library, before any forward pass)."""
    if not text:
        return None
    try:
        layers = [int(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError:
        raise InputError(f"--layers takes comma-separated integers such as 4,5 (got {text!r})") from None
    if not layers:
        raise InputError(f"--layers takes comma-separated integers such as 4,5 (got {text!r})")
    return layers


def _predictions(lm, prompts: list[str], k: int = 3) -> list[list[dict[str, Any]]]:
    return [[x.to_dict() for x in ps] for ps in lm.predict(prompts, top_k=k)]


def _table(title: str, prompts: list[str], before, after) -> Table:
    t = Table(title=title)
    t.add_column("prompt")
    t.add_column("before")
    t.add_column("after")
    fmt = lambda ps: ", ".join(f"{p['token']!r} {p['prob']:.2f}" for p in ps)  # noqa: E731
    for p, b, a in zip(prompts, before, after):
        t.add_row(p, fmt(b), fmt(a))
    return t


@edit_app.callback(invoke_without_command=True)
def edit_cmd(
    ctx: typer.Context,
    prompt: Optional[str] = typer.Option(None, "--prompt", help="Template with {} for the subject, e.g. '{} is located in the city of'."),
    subject: Optional[str] = typer.Option(None, "--subject", help="The subject, e.g. 'The Eiffel Tower'."),
    target: Optional[str] = typer.Option(None, "--target", help="The new target, e.g. ' Rome'."),
    requests: Optional[Path] = typer.Option(None, "--requests", help="JSON or JSONL file of requests (CounterFact requested_rewrite shape)."),
    method: str = typer.Option("rome", "--method", help="Editing method (a registered solver)."),
    layers: Optional[str] = typer.Option(None, "--layers", help="Edit layers, e.g. 4,5 (default: the model's table entry)."),
    hparams: Optional[str] = typer.Option(None, "--hparams", help="JSON object (or file) of hyperparameters to change."),
    projection: Optional[str] = typer.Option(None, "--projection", help="Linear map to rewrite (Mamba: out_proj, in_proj.ssm, in_proj.gate)."),
    check: List[str] = typer.Option([], "--check", help="Extra prompts to show before/after (paraphrases, unrelated facts)."),
    on_known: str = typer.Option("error", "--on-known", help="A target the model already predicts: error, skip or edit."),
    save: Optional[Path] = typer.Option(None, "--save", help="Write the edit (deltas + JSON) to this folder."),
    model: str = ModelOpt,
    device: Optional[str] = DeviceOpt,
    dtype: Optional[str] = DtypeOpt,
    json_out: bool = JsonOpt,
) -> None:
    """Rewrite a fact and show the top predictions before and after."""
    if ctx.invoked_subcommand is not None:
        return
    from factlab.edit import Request, edit, load_requests
    from factlab.edit.result import check_save_path

    if requests is not None:
        reqs = load_requests(requests)
    elif prompt and subject and target:
        reqs = [Request(prompt, subject, target)]
    else:
        raise InputError("give --prompt, --subject and --target, or --requests FILE")
    edit_layers, edit_hparams = _layers(layers), _hparams(hparams)
    if save is not None:
        check_save_path(save)
    lm = load_model(model, device, dtype, quiet=json_out)
    prompts = [r.filled for r in reqs[:20]] + list(check)
    before = _predictions(lm, prompts)
    with err_console.status(f"editing {len(reqs)} fact(s) with {method} ..."):
        res = edit(lm, reqs, method=method, layers=edit_layers, hparams=edit_hparams, projection=projection, on_known=on_known)
    after = _predictions(lm, prompts)
    if save is not None:
        res.save(save)
    if json_out:
        emit_json({"result": res.to_dict(), "prompts": prompts, "before": before, "after": after, "saved": str(save) if save else None})
        return
    console.print(_table(f"{method} edit of {lm.name} at layer(s) {res.metadata['layers']}", prompts, before, after))
    tm = res.metadata["timings"]
    console.print(f"time: {tm['total']:.1f} s (statistics {tm.get('stats', 0):.1f}, keys {tm.get('keys', 0):.1f}, "
                  f"values {tm.get('values', 0):.1f}, solve {tm.get('solve', 0):.2f})")
    if save is not None:
        console.print(f"saved to {save}; apply it with: factlab edit apply {save} --model {model} --out MODEL_DIR")


def _check_out(out: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out} is an existing file; give a folder path")
    if out.exists() and not force:
        raise InputError(f"--out {out} already exists; choose a new folder, or pass --force to replace it")


def _first_non_finite(lm) -> str | None:
    """The name of the first parameter holding NaN/inf, or None."""
    import torch

    return next((n for n, p in lm.model.named_parameters() if not torch.isfinite(p).all()), None)


@edit_app.command("apply")
def apply_cmd(
    path: Path = typer.Argument(..., help="A folder written by `factlab edit --save`."),
    out: Path = typer.Option(..., "--out", help="Folder to write the edited model to (save_pretrained)."),
    force: bool = typer.Option(False, "--force", help="Replace --out if it exists (only once the new model is complete)."),
    stack: bool = typer.Option(
        False, "--stack", help="Apply even to another model or to weights that are not the ones the edit was made on (add it again)."
    ),
    model: str = ModelOpt,
    device: Optional[str] = DeviceOpt,
    dtype: Optional[str] = DtypeOpt,
    json_out: bool = JsonOpt,
) -> None:
    """Apply a saved edit to the model and write the edited model with save_pretrained.

    The edit is verified (checksums, finite values) before the model is loaded and refused on another model or
    on weights that are not the ones it was made on (unless --stack); nothing is written unless every weight of
    the edited model is finite, and --out appears complete or not at all."""
    from factlab.edit import EditResult, read_saved_edit
    from factlab.io import atomic_folder

    _check_out(out, force)
    saved = read_saved_edit(path)
    lm = load_model(model, device, dtype, quiet=json_out)
    res = EditResult.load(saved, lm, strict=not stack).apply(stack=stack)
    bad = _first_non_finite(lm)
    if bad is not None:
        raise NonFiniteError(f"the edited model holds NaN/inf in {bad}; nothing was written to {out}")
    with err_console.status(f"writing {out} ..."), atomic_folder(out) as tmp:
        lm.model.save_pretrained(tmp)
        lm.tokenizer.save_pretrained(tmp)
    if json_out:
        emit_json({"edit": res.to_dict(), "out": str(out)})
    else:
        console.print(f"wrote the edited model ({res.method}, {len(res.deltas)} parameter(s)) to {out}")


def _stream_requests(requests: Optional[Path], counterfact: bool, limit: Optional[int], data: Optional[str]) -> list | None:
    """The stream's requests: from ``--requests FILE`` or ``--counterfact`` (its ``requested_rewrite``s, file order,
    first ``--limit``), or None when neither is given (only ``--rollback-to``)."""
    if requests is not None and counterfact:
        raise InputError("give --requests FILE or --counterfact, not both")
    if limit is not None and not counterfact:
        raise InputError("--limit applies to --counterfact; cut a --requests file yourself")
    if requests is not None:
        from factlab.edit import load_requests

        return load_requests(requests)
    if counterfact:
        from factlab.data import load_counterfact
        from factlab.edit import Request

        return [Request.from_dict(r.requested_rewrite()) for r in load_counterfact(data, limit=limit)]
    return None


def _batch_row(n: int, res: Any, edited: int, resumed: bool) -> dict[str, Any]:
    """One line of the stream table: batch number, edits, Frobenius norm of the batch's delta, seconds (new batches)."""
    norms = res.delta_norms()
    secs = res.metadata.get("timings", {}).get("total")
    return {"batch": n, "edits": edited, "delta_norm": sum(v * v for v in norms.values()) ** 0.5,
            "seconds": None if resumed else secs, "status": "resumed" if resumed else "new"}


def _efficacy(lm: Any, requests: list) -> float:
    """Percent of ``requests`` whose new target is the teacher-forced top-1 (every token) after their prompt."""
    from factlab.evaluate.scoring import score_continuations

    scores = score_continuations(lm, [(r.filled, r.target_new) for r in requests])
    return 100.0 * sum(s.all_correct for s in scores) / len(scores)


def _stream_table(title: str, rows: list[dict[str, Any]]) -> Table:
    t = Table(title=title)
    checked = any("efficacy" in r for r in rows)
    for c in ("batch", "edits", "delta norm", "time (s)", "status", *(("efficacy so far (%)",) if checked else ())):
        t.add_column(c)
    for r in rows:
        secs = "" if r["seconds"] is None else f"{r['seconds']:.1f}"
        eff = ("" if r.get("efficacy") is None else f"{r['efficacy']:.1f}",) if checked else ()
        t.add_row(str(r["batch"]), str(r["edits"]), f"{r['delta_norm']:.4g}", secs, r["status"], *eff)
    return t


@edit_app.command("stream", cls=MethodHelpCommand)
def stream_cmd(
    out: Path = typer.Option(..., "--out", "-o", help="The stream's run folder (created, or resumed: committed batches are re-applied)."),
    requests: Optional[Path] = typer.Option(None, "--requests", help="JSON or JSONL file of requests, edited in file order."),
    counterfact: bool = typer.Option(False, "--counterfact", help="Edit CounterFact's requested rewrites in file order."),
    limit: Optional[int] = typer.Option(None, "--limit", "-n", min=1, help="With --counterfact: the first N records."),
    data: Optional[str] = typer.Option(None, "--data", help="CounterFact file or folder (default: $FACTLAB_DATA, cache, download)."),
    method: Optional[str] = typer.Option(None, "--method", help="Editing method (a registered solver; default: memit, or the saved one)."),
    batch_size: int = typer.Option(1, "--batch-size", "-b", min=1, help="Requests per batch (one edit each)."),
    rollback_to: Optional[int] = typer.Option(None, "--rollback-to", min=0, help="First roll the stream back to its first N batches (0: none)."),
    layers: Optional[str] = typer.Option(None, "--layers", help="Edit layers, e.g. 4,5 (default: the model's table entry, or the saved ones)."),
    hparams: Optional[str] = typer.Option(None, "--hparams", help="JSON object (or file) of hyperparameters to change."),
    projection: Optional[str] = typer.Option(None, "--projection", help="Linear map to rewrite (Mamba: out_proj, in_proj.ssm, in_proj.gate)."),
    on_known: Optional[str] = typer.Option(None, "--on-known", help="A target the model already predicts: skip (default), error or edit."),
    checkpoint_every: int = typer.Option(1, "--checkpoint-every", min=0, help="Save the key history every K batches (0: recompute on resume)."),
    check_every: int = typer.Option(0, "--check-every", min=0, help="Every K new batches (and after the last), score efficacy: "
                                    "the teacher-forced top-1 of the new target on every prompt edited so far (0: never)."),
    model: str = ModelOpt,
    device: Optional[str] = DeviceOpt,
    dtype: Optional[str] = DtypeOpt,
    json_out: bool = JsonOpt,
) -> None:
    """Run or resume an edit stream: batches edited one after another on one model, earlier keys passed to
    history-using methods (memit_history, alphaedit), every batch committed to --out. A killed run resumes with the
    same command (no batch lost or applied twice); --rollback-to N drops the batches after N, bit for bit.
    --check-every K scores efficacy on new batches only (a resumed batch is re-applied with the later ones)."""
    from factlab.edit.stream import EditStream
    from factlab.progress import progress_bar

    reqs = _stream_requests(requests, counterfact, limit, data)
    if reqs is None and rollback_to is None:
        raise InputError("give --requests FILE or --counterfact (or only --rollback-to N to roll an existing stream back)")
    if reqs is not None and not reqs:
        raise InputError("no requests to edit: the file (or --limit) gives none")
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out} is an existing file; give a folder path")
    if reqs is None and not (out / "config.json").is_file():
        raise InputError(f"--out {out} holds no edit stream to roll back; give the folder of an earlier `factlab edit stream`")
    edit_layers, edit_hparams = _layers(layers), _hparams(hparams)
    batches = [reqs[i : i + batch_size] for i in range(0, len(reqs), batch_size)] if reqs else []
    lm = load_model(model, device, dtype, quiet=json_out)
    rows: list[dict[str, Any]] = []
    with EditStream(lm, out, method=method, layers=edit_layers, hparams=edit_hparams, projection=projection,
                    on_known=on_known, checkpoint_every=checkpoint_every) as stream:
        resumed = len(stream)
        if rollback_to is not None:
            if rollback_to > len(stream):
                raise InputError(f"--rollback-to {rollback_to}: the stream in {out} has {len(stream)} batch(es); give 0..{len(stream)}")
            stream.rollback(to=rollback_to)
            resumed = rollback_to
        with progress_bar(desc=f"edit stream ({stream.config['method']})", total=len(batches), unit="batch") as bar:
            for n, res in enumerate(stream.iter_add(batches), 1):
                rows.append(_batch_row(n, res, stream.to_dict()["log"][n - 1]["edited"], resumed=n <= resumed))
                if check_every and n > resumed and (n % check_every == 0 or n == len(batches)):
                    rows[-1]["efficacy"] = _efficacy(lm, [r for b in batches[:n] for r in b])  # on the weights after batch n
                bar.update(1)
        info = stream.to_dict()
    info.pop("config")
    if json_out:
        emit_json({"stream": info, "batches": rows, "rolled_back_to": rollback_to})
        return
    if rollback_to is not None:
        console.print(f"rolled back to batch {rollback_to}")
    if rows:
        console.print(_stream_table(f"{info['method']} stream of {lm.name} at layer(s) {info['layers']}", rows))
    console.print(f"{info['batches']} batch(es), {info['edits']} edit(s) in {out}")


DEMO = [
    ("{} is located in the city of", "The Eiffel Tower", " Rome",
     ["The Eiffel Tower, located in the city of", "The Statue of Liberty is located in the city of"]),
]


@edit_app.command("demo")
def demo_cmd(
    model: str = ModelOpt,
    device: Optional[str] = DeviceOpt,
    dtype: Optional[str] = DtypeOpt,
    json_out: bool = JsonOpt,
) -> None:
    """Edit a well-known fact with ROME and show the prompt, a paraphrase and an unrelated prompt before and after."""
    from factlab.edit import Request, edit

    lm = load_model(model, device, dtype, quiet=json_out)
    tmpl, subj, target, checks = DEMO[0]
    req = Request(tmpl, subj, target)
    prompts = [req.filled] + checks
    before = _predictions(lm, prompts)
    with err_console.status("editing (the first run computes the second-moment statistics) ..."):
        res = edit(lm, req, method="rome")
    after = _predictions(lm, prompts)
    res.restore()
    if json_out:
        emit_json({"request": req.to_dict(), "prompts": prompts, "before": before, "after": after, "result": res.to_dict()})
        return
    console.print(_table(f"ROME: {subj} ->{target} ({lm.name}, layer {res.metadata['layers'][0]}; restored afterwards)", prompts, before, after))


def stats_cmd(
    site: List[str] = typer.Option(..., "--site", help="Site(s) to collect, e.g. layer.5.mlp.key (repeat for several: one pass)."),
    corpus: str = typer.Option("wikitext-2", "--corpus", help="wikitext-2, a text file/folder, or hf:<dataset>:<split>."),
    samples: int = typer.Option(400, "--samples", min=1, help="Chunks of --max-length tokens."),
    max_length: int = typer.Option(256, "--max-length", min=8, help="Tokens per chunk."),
    batch_size: int = typer.Option(8, "--batch-size", min=1),
    export: Optional[Path] = typer.Option(None, "--export", help="Also write the statistics to this file (one site)."),
    import_file: Optional[Path] = typer.Option(None, "--import", help="Import a statistics file into the cache instead of computing."),
    model: str = ModelOpt,
    device: Optional[str] = DeviceOpt,
    dtype: Optional[str] = DtypeOpt,
    json_out: bool = JsonOpt,
) -> None:
    """Compute (or import) second-moment statistics E[k kᵀ] of sites over a corpus; cached and resumable."""
    from factlab.edit import export_stats, import_stats, second_moments
    from factlab.edit.stats import stats_path

    if import_file is not None and not import_file.is_file():
        what = "is a folder" if import_file.is_dir() else "does not exist"
        raise InputError(f"--import {import_file} {what}; give a statistics file written by `factlab stats --export`")
    if export is not None and len(site) != 1:
        raise InputError("--export writes one site; give one --site")
    lm = load_model(model, device, dtype, quiet=json_out)
    if import_file is not None:
        m = import_stats(import_file, lm, site[0] if len(site) == 1 else None)  # a damaged file: IntegrityError
        got = {m.spec.site: m}
    else:
        got = second_moments(lm, list(site), corpus=corpus, samples=samples, max_length=max_length, batch_size=batch_size)
    if export is not None:
        export_stats(next(iter(got.values())), export)
    rows = [{"site": s, "dim": m.dim, "tokens": m.count, "file": str(stats_path(m.spec)) if m.spec else None,
             "trace": float(m.mom2.double().trace())} for s, m in got.items()]
    if json_out:
        emit_json(rows)
        return
    t = Table(title=f"second moments of {lm.name}")
    for c in ("site", "dim", "tokens", "trace", "file"):
        t.add_column(c)
    for r in rows:
        t.add_row(r["site"], str(r["dim"]), str(r["tokens"]), f"{r['trace']:.3g}", r["file"] or "")
    console.print(t)


def register(app: typer.Typer) -> None:
    app.add_typer(edit_app, name="edit")
    app.command("stats")(stats_cmd)
