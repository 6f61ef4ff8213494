"""``factlab eval counterfact|zsre|mquake`` (resumable, shardable with torchrun) and ``factlab eval plot``."""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, List, Optional

import typer

from factlab.cli.common import DeviceOpt, DtypeOpt, JsonOpt, ModelOpt, console, emit_json, load_model
from factlab.cli.edit import EvalMethodHelpCommand
from factlab.errors import FactlabError, InputError

eval_app = typer.Typer(help="Score edits on CounterFact, zsRE or MQuAKE exactly as the papers do.", no_args_is_help=True)

MethodOpt = typer.Option("none", "--method", help="Editing method: none (no edit) or a registered solver.")
BatchOpt = typer.Option(1, "--batch-size", "-b", min=1, help="Edits applied together (one solve).")
SeqOpt = typer.Option(False, "--sequential", help="Keep every batch's edit (an edit stream under --out/stream: earlier keys reach history-using methods); adds a final pass over all cases.")
LimitOpt = typer.Option(None, "--limit", "-n", min=1, help="Evaluate the first N cases (N kept cases with --known-only).")
OutOpt = typer.Option(None, "--out", "-o", help="Run directory (resumable; refuses a different configuration).")
DataOpt = typer.Option(None, "--data", help="Dataset file or folder (default: $FACTLAB_DATA, cache, download).")
FileOpt = typer.Option(None, "--file", help="Which file of the dataset folder, e.g. counterfact-edit.json.")
LayersOpt = typer.Option(None, "--layers", help="Comma-separated layers to edit (default: the editor's).")
HparamsOpt = typer.Option(None, "--hparams", help="Editor hyperparameters: a JSON object or a .json file.")


@contextmanager
def _user_errors() -> Iterator[None]:
    """A :class:`FactlabError` (a user mistake) ends the command with one ``error:`` line and exit code 2."""
    try:
        yield
    except FactlabError as e:
        typer.secho(f"error: {e}", fg=typer.colors.RED, err=True)
        raise typer.Exit(2) from None


def _parse_layers(s: Optional[str]) -> Optional[list[int]]:
    """``"3,4,5"`` -> ``[3, 4, 5]`` (their range is checked against the model before any work)."""
    if not s:
        return None
    try:
        return [int(x) for x in s.split(",") if x.strip()]
    except ValueError:
        raise InputError(f"--layers must be comma-separated integers, got {s!r}") from None


def _parse_hparams(s: Optional[str]) -> Optional[dict]:
    """A JSON object given inline or as a ``.json`` file."""
    if not s:
        return None
    p = Path(s)
    if p.suffix == ".json" and not s.lstrip().startswith("{"):
        if not p.is_file():
            raise InputError(f"--hparams file {p} does not exist; give a JSON object or an existing .json file")
        text, where = p.read_text(), f"--hparams file {p}"
    else:
        text, where = s, "--hparams"
    try:
        d = json.loads(text)
    except json.JSONDecodeError as e:
        raise InputError(f"{where} is not valid JSON ({e}); give a JSON object such as '{{\"v_steps\": 10}}' or a .json file") from None
    if not isinstance(d, dict):
        raise InputError(f"{where} must be a JSON object of hyperparameters, got {type(d).__name__}")
    return d


def _check_method(method: str) -> None:
    """Refuse an unknown ``--method`` before the model is loaded, listing ``none`` and the registered solvers."""
    from factlab.evaluate.harness import method_names

    names = method_names()
    if method not in names:
        raise InputError(f"--method {method!r} is not a registered method; choose one of {', '.join(names)}")


def _run(dataset: str, model: str, device: Optional[str], dtype: Optional[str], json_out: bool,
         layers: Optional[str], hparams: Optional[str], **kw) -> None:
    """Parse, load, evaluate, print. User mistakes (any :class:`FactlabError`) end in one ``error:`` line, exit 2."""
    from factlab.evaluate import evaluate
    from factlab.evaluate.distributed import init_distributed

    with _user_errors():
        kw.update(layers=_parse_layers(layers), hparams=_parse_hparams(hparams))  # before loading anything
        _check_method(kw["method"])
        dist = init_distributed()
        try:
            if device is None and dist.active:
                import torch

                if torch.cuda.is_available():
                    device = f"cuda:{dist.local_rank}"
            lm = load_model(model, device, dtype, quiet=json_out or not dist.is_main)
            summary = evaluate(lm, dataset, dist=dist, **kw)
        finally:
            dist.close()
    if not dist.is_main:
        return
    if json_out:
        emit_json(summary.to_dict())
        return
    console.print(summary.table())
    d = summary.data
    if "known_kept" in d:
        console.print(f"--known-only ({d['known_criterion']}): kept {d['known_kept']} of {d['known_checked']} cases checked")
    if d.get("skipped", {}).get("subject_not_in_prompt"):
        console.print(f"skipped {d['skipped']['subject_not_in_prompt']} record(s) whose subject is not in the prompt")
    for kind, ids in d.get("missing_prompts", {}).items():
        if ids:
            console.print(f"{len(ids)} case(s) have no {kind}: the metrics that need them cover the other cases (see n)")
    for k, why in summary.unavailable.items():
        console.print(f"{k}: unavailable — {why}")
    console.print(f"summary: {summary.run.get('run_dir')}/summary.json")


def _gen(gen_prompts: Optional[int], max_length: int, decoding: str, seed: int, every: int):
    from factlab.evaluate import GenerationConfig

    if decoding not in ("sample_topk5", "greedy"):
        raise typer.BadParameter("--decoding must be sample_topk5 or greedy")
    return GenerationConfig(gen_prompts=gen_prompts, max_length=max_length, decoding=decoding, seed=seed, every=every)  # type: ignore[arg-type]


@eval_app.command("counterfact", cls=EvalMethodHelpCommand)
def counterfact(
    model: str = ModelOpt,
    method: str = MethodOpt,
    batch_size: int = BatchOpt,
    sequential: bool = SeqOpt,
    limit: Optional[int] = LimitOpt,
    known_only: bool = typer.Option(False, "--known-only", help="Keep cases whose true target the unedited model prefers."),
    known_criterion: str = typer.Option("prefers", "--known-criterion", help="prefers: nll(true) < nll(new); argmax: every true token is the argmax."),
    out: Optional[Path] = OutOpt,
    data: Optional[str] = DataOpt,
    file: Optional[str] = FileOpt,
    schema: str = typer.Option("auto", "--schema", help="auto, rome or easyedit."),
    gen_prompts: Optional[int] = typer.Option(None, "--gen-prompts", min=0, help="Generation prompts per case for fluency (default all, as ROME; 0 = off). CPU: ~1-3 s per prompt."),
    gen_length: int = typer.Option(100, "--gen-length", min=2, help="Total generated length in tokens, prompt included (ROME: 100)."),
    decoding: str = typer.Option("sample_topk5", "--decoding", help="sample_topk5 (ROME) or greedy."),
    seed: int = typer.Option(0, "--seed", help="Sampling seed (combined with each case id)."),
    gen_every: int = typer.Option(1, "--gen-every", min=1, help="Fluency only for cases with case_id % K == 0 (MEMIT scaling runs: 10)."),
    reference_dir: Optional[str] = typer.Option(None, "--reference-dir", help="Folder with ROME's attribute_snippets.json, idf.npy, tfidf_vocab.json."),
    layers: Optional[str] = LayersOpt,
    hparams: Optional[str] = HparamsOpt,
    no_generative: bool = typer.Option(False, "--no-generative", help="Skip the generative gen_* metrics (greedy decoding, ~1.1x the teacher-forced scoring)."),
    strict_records: bool = typer.Option(False, "--strict-records", help="Refuse cases without paraphrase or neighbourhood prompts (default: warn, naming them, and leave those metrics out for them)."),
    device: Optional[str] = DeviceOpt,
    dtype: Optional[str] = DtypeOpt,
    json_out: bool = JsonOpt,
) -> None:
    """CounterFact: ES/EM, PS/PM, NS/NM, S, fluency (GE), reference score (RS) and the generative G-ES/G-PS/G-NS."""
    _run(
        "counterfact", model, device, dtype, json_out, layers, hparams,
        method=method, batch_size=batch_size, sequential=sequential, limit=limit, known_only=known_only,
        known_criterion=known_criterion, out=out, data_path=data, data_file=file, schema=schema,
        generation=_gen(gen_prompts, gen_length, decoding, seed, gen_every), reference_dir=reference_dir,
        strict_records=strict_records, generative=not no_generative,
    )  # fmt: skip


@eval_app.command("zsre", cls=EvalMethodHelpCommand)
def zsre(
    model: str = ModelOpt,
    method: str = MethodOpt,
    batch_size: int = BatchOpt,
    sequential: bool = SeqOpt,
    limit: Optional[int] = LimitOpt,
    out: Optional[Path] = OutOpt,
    data: Optional[str] = DataOpt,
    file: Optional[str] = FileOpt,
    convention: str = typer.Option("rome", "--convention", help="rome: edit to answers[0] (ROME/MEMIT tables); mend: edit to alt."),
    no_generative: bool = typer.Option(False, "--no-generative", help="Skip the generative gen_* metrics (greedy decoding, ~1.1x the teacher-forced scoring)."),
    layers: Optional[str] = LayersOpt,
    hparams: Optional[str] = HparamsOpt,
    device: Optional[str] = DeviceOpt,
    dtype: Optional[str] = DtypeOpt,
    json_out: bool = JsonOpt,
) -> None:
    """zsRE: teacher-forced token accuracy (efficacy, paraphrase, specificity), their harmonic mean, and the generative gen_* accuracies."""
    _run(
        "zsre", model, device, dtype, json_out, layers, hparams,
        method=method, batch_size=batch_size, sequential=sequential, limit=limit, out=out, data_path=data,
        data_file=file, zsre_convention=convention, generative=not no_generative,
    )  # fmt: skip


@eval_app.command("mquake", cls=EvalMethodHelpCommand)
def mquake(
    model: str = ModelOpt,
    method: str = MethodOpt,
    batch_size: int = BatchOpt,
    sequential: bool = SeqOpt,
    limit: Optional[int] = LimitOpt,
    out: Optional[Path] = OutOpt,
    data: Optional[str] = DataOpt,
    file: Optional[str] = FileOpt,
    max_new_tokens: int = typer.Option(16, "--max-new-tokens", min=1, help="Greedy answer length."),
    layers: Optional[str] = LayersOpt,
    hparams: Optional[str] = HparamsOpt,
    device: Optional[str] = DeviceOpt,
    dtype: Optional[str] = DtypeOpt,
    json_out: bool = JsonOpt,
) -> None:
    """MQuAKE: multi-hop accuracy after editing each case's single-hop facts."""
    from factlab.evaluate import MquakeConfig

    _run(
        "mquake", model, device, dtype, json_out, layers, hparams,
        method=method, batch_size=batch_size, sequential=sequential, limit=limit, out=out, data_path=data,
        data_file=file, mquake=MquakeConfig(max_new_tokens=max_new_tokens),
    )  # fmt: skip


@eval_app.command("plot")
def plot(
    run_dirs: List[Path] = typer.Argument(..., help="Run directories (each with summary.json)."),
    x: str = typer.Option("batch-size", "--x", help="batch-size (one point per run) or sequential (per batch within sequential runs)."),
    metrics: str = typer.Option("efficacy_score,paraphrase_score,neighborhood_score,score", "--metrics", help="Comma-separated metric names."),
    out: Path = typer.Option(..., "--out", "-o", help="PNG file to write."),
) -> None:
    """Metric vs batch size, or vs number of sequential edits, one line per method (PNG)."""
    from factlab.evaluate.plot import plot_batch_sizes, plot_sequential

    names = [m for m in metrics.split(",") if m]
    if x not in ("batch-size", "sequential"):
        raise typer.BadParameter("--x must be batch-size or sequential")
    with _user_errors():
        (plot_batch_sizes if x == "batch-size" else plot_sequential)(run_dirs, names, out)
    console.print(f"wrote {out}")


@eval_app.command("show")
def show(run_dir: Path = typer.Argument(..., help="Run directory or summary.json."), json_out: bool = JsonOpt) -> None:
    """Print a finished run's summary table."""
    from factlab.evaluate import Summary

    with _user_errors():
        s = Summary.load(run_dir)
    if json_out:
        emit_json(s.to_dict())
    else:
        console.print(s.table())


def register(app: typer.Typer) -> None:
    app.add_typer(eval_app, name="eval")
