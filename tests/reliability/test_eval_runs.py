"""Evaluation runs and run folders that cannot be silently wrong (issue #16).

Each probe runs through the Python API and, where the issue names the CLI, through the real ``factlab`` entry point:

* the model's dtype is in every identity: a bfloat16 run never reuses float32 pre-edit scores, a float32 run folder
  refuses a bfloat16 resume naming the dtypes, and ``config.json``/``summary.json`` record the dtype (also
  trace-dataset, LRE evaluation and circuit edits);
* a run folder being written by another process is refused at once, naming the holder (eval, trace-dataset, LRE
  evaluation, circuit edits);
* CounterFact records without paraphrase or neighbourhood prompts are named in a warning (or refused with
  ``strict_records``), ``cases.jsonl`` holds ``null`` (never bare ``NaN``) and each metric's ``n`` says how many
  cases it covers;
* out-of-range layers and bad hyperparameters are refused before any forward pass; ``eval show`` on a missing
  folder and malformed ``--hparams`` end in one ``error:`` line, exit 2;
* intervals never run past their metric's range, and estimates over fewer than 10 values say so.

Killed-and-resumed runs (SIGKILL) are covered by ``test_kill_resume.py``.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import Iterator

import pytest

import factlab
from factlab.errors import FactlabError, InputError, RunLockedError
from factlab.evaluate import RunConfigMismatch, evaluate

from .conftest import run_cli

PRE_SCORING = "efficacy_magnitude"  # a continuous metric: it tells float32 scores from bfloat16 ones


# ----------------------------------------------------------------------------------------------- helpers
def _cf_file(data_dir: Path, tmp_path: Path, n: int = 3, drop: dict[int, str] | None = None, name: str = "cf.json") -> Path:
    """The first ``n`` CounterFact records (ROME schema) written to ``tmp_path/name``; ``drop``: record index ->
    prompt list to remove (index 1 loses the field, other indices get an empty list)."""
    recs = json.loads((data_dir / "counterfact" / "counterfact_subset.json").read_text())[:n]
    for i, field in (drop or {}).items():
        if i == 1:
            del recs[i][field]
        else:
            recs[i][field] = []
    path = tmp_path / name
    path.write_text(json.dumps(recs))
    return path


def _eval_kw(tmp_path: Path, cf: Path) -> dict:
    return dict(data_path=str(cf), data_file=cf.name, generation=None, pre_cache_dir=tmp_path / "pre")


@contextmanager
def _held(run_dir: Path) -> Iterator[int]:
    """Another real process holding ``run_dir``'s lock while the block runs; yields its pid."""
    code = ("import sys, time\nfrom factlab.io import run_lock\nwith run_lock(sys.argv[1]):\n"
            "    print('held', flush=True)\n    time.sleep(600)\n")
    p = subprocess.Popen([sys.executable, "-c", code, str(run_dir)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "held", p.stderr.read()
        yield p.pid
    finally:
        p.kill()
        p.wait(timeout=30)


@contextmanager
def _forwards(lm) -> Iterator[list[int]]:
    """Count the model's forward passes while the block runs."""
    calls: list[int] = []
    inner = lm.model.forward

    def forward(*args, **kwargs):
        calls.append(1)
        return inner(*args, **kwargs)

    lm.model.forward = forward
    try:
        yield calls
    finally:
        del lm.model.forward


def _files(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.is_file()] if folder.exists() else []


def _strict_json(text: str) -> list:
    """Parse JSON lines, refusing bare NaN/Infinity (which jq and browsers reject)."""
    def bad(c):
        raise AssertionError(f"bare {c} in JSON")
    return [json.loads(line, parse_constant=bad) for line in text.splitlines() if line.strip()]


@pytest.fixture(scope="module")
def f32_bf16(saved_tiny):
    """The same tiny saved model loaded as float32 and as bfloat16."""
    return factlab.load(saved_tiny, dtype="float32"), factlab.load(saved_tiny, dtype="bfloat16")


# ----------------------------------------------------------------------------------------------- 1. dtype identity
def test_api_bfloat16_never_reuses_float32_pre_scores_and_records_the_dtype(f32_bf16, tmp_path, data_dir):
    lm32, lm16 = f32_bf16
    cf = _cf_file(data_dir, tmp_path)
    kw = _eval_kw(tmp_path, cf)
    s32 = evaluate(lm32, "counterfact", out=tmp_path / "f32", **kw)
    s16 = evaluate(lm16, "counterfact", out=tmp_path / "bf16", **kw)  # same pre-edit cache folder
    fresh = evaluate(lm16, "counterfact", out=tmp_path / "bf16-fresh", **{**kw, "pre_cache_dir": tmp_path / "pre-fresh"})
    assert s16.get(PRE_SCORING, "pre").mean == fresh.get(PRE_SCORING, "pre").mean
    assert s16.get(PRE_SCORING, "pre").mean != s32.get(PRE_SCORING, "pre").mean
    for run, dtype in (("f32", "float32"), ("bf16", "bfloat16")):
        assert json.loads((tmp_path / run / "config.json").read_text())["dtype"] == dtype
        assert json.loads((tmp_path / run / "summary.json").read_text())["model"]["dtype"] == dtype
    with pytest.raises(RunConfigMismatch, match=r"dtype: run dir has 'float32', this run has 'bfloat16'.*--dtype float32"):
        evaluate(lm16, "counterfact", out=tmp_path / "f32", **kw)


def test_cli_bfloat16_after_float32_and_a_refused_resume(saved_tiny, tmp_path, data_dir):
    cf = _cf_file(data_dir, tmp_path)
    base = ["eval", "counterfact", "--model", saved_tiny, "--data", cf, "--file", cf.name, "--gen-prompts", "0", "--json"]
    shared = {"FACTLAB_CACHE": str(tmp_path / "cache")}

    def em(out: str, *extra: str, env=shared) -> float:
        r = run_cli(*base, "--out", tmp_path / out, *extra, env=env)
        assert r.returncode == 0, r.stderr
        return json.loads(r.stdout)["metrics"]["pre"][PRE_SCORING]["mean"]

    f32 = em("f32")
    bf16 = em("bf16", "--dtype", "bfloat16")
    own = em("bf16-own", "--dtype", "bfloat16", env={"FACTLAB_CACHE": str(tmp_path / "cache-own")})
    assert bf16 == own != f32
    assert json.loads((tmp_path / "bf16" / "summary.json").read_text())["model"]["dtype"] == "bfloat16"
    run_cli(*base, "--out", tmp_path / "f32", "--dtype", "bfloat16", env=shared).assert_user_error(
        "dtype: run dir has 'float32', this run has 'bfloat16'", "--dtype float32")


def test_trace_dataset_records_the_dtype_and_refuses_another(f32_bf16, tmp_path):
    from factlab.locate import trace_dataset
    from factlab.locate._common import TraceInputError

    lm32, lm16 = f32_bf16
    recs = [SimpleNamespace(known_id=i, prompt=p, subject=s) for i, (p, s) in
            enumerate([("Toyota was founded in", "Toyota"), ("The Colosseum is in", "The Colosseum")])]
    kw = dict(kinds=["residual"], out_dir=tmp_path / "trace", samples=2, noise=0.5, window=1, only_known=False)
    res = trace_dataset(lm32, recs, **kw)
    assert json.loads((tmp_path / "trace" / "config.json").read_text())["dtype"] == "float32"
    assert res.identity["dtype"] == json.loads((tmp_path / "trace" / "aie.json").read_text())["identity"]["dtype"] == "float32"
    with pytest.raises(TraceInputError, match=r"dtype: run has 'float32', this call 'bfloat16'"):
        trace_dataset(lm16, recs, **kw)


def _tiny_relation():
    from factlab.data.lre import Relation, Sample

    return Relation("tiny", "factual", ["{} is"], samples=[Sample(s, o) for s, o in
                    [("Canada", "Ottawa"), ("France", "Paris"), ("Japan", "Tokyo"), ("Peru", "Lima")]])


def test_lre_evaluation_records_the_dtype_and_refuses_another(f32_bf16, tmp_path):
    from factlab.lre import EvalSettings, evaluate_relations

    lm32, lm16 = f32_bf16
    settings = EvalSettings(n_train=2, min_known=100, prefix="")
    rows = evaluate_relations(lm32, [_tiny_relation()], tmp_path / "lre", settings)
    assert rows[0].status == "too few known"
    assert json.loads((tmp_path / "lre" / "settings.json").read_text())["dtype"] == "float32"
    with pytest.raises(InputError, match=r"dtype: folder has 'float32', this run 'bfloat16'"):
        evaluate_relations(lm16, [_tiny_relation()], tmp_path / "lre", settings)


def _circuit_inputs(lm):
    from factlab.circuits import full_mask, random_mask
    from factlab.data.counterfact import CounterFactRecord

    rec = CounterFactRecord(case_id=0, subject="The cat", prompt="{} is a kind of", target_new="dog", target_true="animal",
                            paraphrase_prompts=["The cat is a type of"])
    return [rec], {"circuit": random_mask(full_mask(lm), 0.1, seed=0)}


def test_circuit_edits_record_the_dtype_and_redo_rows_of_another(f32_bf16, tmp_path):
    from factlab.circuits.edit import EditConfig, compare_edits

    lm32, lm16 = f32_bf16
    log = tmp_path / "edits" / "edits.jsonl"
    cfg = EditConfig(lr=0.1, steps=1, radius=0.01)
    a = compare_edits(lm32, *_circuit_inputs(lm32), modes=("restricted",), config=cfg, log_path=log)
    assert a.to_dict()["model"]["dtype"] == "float32" and a.rows[0]["model"]["dtype"] == "float32"
    b = compare_edits(lm16, *_circuit_inputs(lm16), modes=("restricted",), config=cfg, log_path=log)
    assert b.rows[0]["model"]["dtype"] == "bfloat16"  # redone on the bfloat16 model, not the float32 row reused
    assert len(_strict_json(log.read_text())) == 2


# ----------------------------------------------------------------------------------------------- 2. run-folder lock
def test_api_evaluation_refuses_a_folder_another_process_is_writing(tiny_llama, tmp_path, data_dir):
    cf = _cf_file(data_dir, tmp_path)
    run = tmp_path / "run"
    with _held(run) as pid, _forwards(tiny_llama) as calls:
        with pytest.raises(RunLockedError, match=f"pid {pid}"):
            evaluate(tiny_llama, "counterfact", out=run, **_eval_kw(tmp_path, cf))
    assert calls == [] and not (run / "cases.jsonl").exists() and not _files(tmp_path / "pre")
    assert evaluate(tiny_llama, "counterfact", out=run, **_eval_kw(tmp_path, cf)).n_cases == 3  # free again


def test_cli_evaluation_refuses_a_folder_another_process_is_writing(saved_tiny, tmp_path, data_dir):
    cf = _cf_file(data_dir, tmp_path)
    run = tmp_path / "run"
    with _held(run) as pid:
        r = run_cli("eval", "counterfact", "--model", saved_tiny, "--data", cf, "--file", cf.name, "--gen-prompts", "0",
                    "--out", run, env={"FACTLAB_CACHE": str(tmp_path / "cache")})
    r.assert_user_error("being written by", f"pid {pid}")
    assert not (run / "cases.jsonl").exists()


def test_other_run_folders_refuse_a_second_writer(tiny_llama, tmp_path):
    from factlab.circuits.edit import EditConfig, compare_edits
    from factlab.locate import trace_dataset
    from factlab.lre import EvalSettings, evaluate_relations

    recs = [SimpleNamespace(known_id=0, prompt="Toyota was founded in", subject="Toyota")]
    writers = {
        "trace": lambda d: trace_dataset(tiny_llama, recs, kinds=["residual"], out_dir=d, samples=2, noise=0.5, window=1, only_known=False),
        "lre": lambda d: evaluate_relations(tiny_llama, [_tiny_relation()], d, EvalSettings(n_train=2, min_known=100, prefix="")),
        "circuit": lambda d: compare_edits(tiny_llama, *_circuit_inputs(tiny_llama), modes=("restricted",),
                                           config=EditConfig(lr=0.1, steps=1, radius=0.01), log_path=d / "edits.jsonl"),
    }
    for name, write in writers.items():
        d = tmp_path / name
        with _held(d) as pid, _forwards(tiny_llama) as calls:
            with pytest.raises(RunLockedError, match=f"pid {pid}"):
                write(d)
        assert calls == [] and [p.name for p in _files(d)] == [".lock"], name
        write(d)  # free again once the holder is gone
        assert len(_files(d)) > 1, name


# ----------------------------------------------------------------------------------------------- 3. incomplete records
MISSING = {1: "paraphrase_prompts", 2: "neighborhood_prompts"}  # record 1 lacks the field, record 2 has an empty list


def test_api_names_records_without_prompts_and_writes_null(tiny_llama, tmp_path, data_dir, caplog):
    cf = _cf_file(data_dir, tmp_path, drop=MISSING)
    ids = [r["case_id"] for r in json.loads(cf.read_text())]
    with caplog.at_level(logging.WARNING, logger="factlab.evaluate"):
        s = evaluate(tiny_llama, "counterfact", out=tmp_path / "run", **_eval_kw(tmp_path, cf))
    warned = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING and r.name.startswith("factlab")]
    assert len(warned) == 1, warned  # once per run
    assert f"no paraphrase_prompts (case id {ids[1]})" in warned[0] and f"no neighborhood_prompts (case id {ids[2]})" in warned[0]
    rows = _strict_json((tmp_path / "run" / "cases.jsonl").read_text())
    by_id = {r["case_id"]: r for r in rows}
    assert by_id[ids[1]]["post"]["paraphrase_score"] is None and by_id[ids[2]]["pre"]["neighborhood_score"] is None
    assert s.n_cases == 3
    assert s.get("paraphrase_score").n == s.get("neighborhood_magnitude").n == 2 and s.get("efficacy_score").n == 3
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["data"]["missing_prompts"] == {"paraphrase_prompts": [ids[1]], "neighborhood_prompts": [ids[2]]}
    assert summary["metrics"]["post"]["paraphrase_score"]["n"] == 2


def test_api_strict_records_refuses_before_any_forward_pass(tiny_llama, tmp_path, data_dir):
    cf = _cf_file(data_dir, tmp_path, drop=MISSING)
    ids = [r["case_id"] for r in json.loads(cf.read_text())]
    with _forwards(tiny_llama) as calls, pytest.raises(InputError, match=rf"paraphrase_prompts \(case id {ids[1]}\)"):
        evaluate(tiny_llama, "counterfact", out=tmp_path / "run", strict_records=True, **_eval_kw(tmp_path, cf))
    assert calls == [] and not _files(tmp_path / "run") and not _files(tmp_path / "pre")
    # complete records pass the strict check
    ok = _cf_file(data_dir, tmp_path, name="ok.json")
    assert evaluate(tiny_llama, "counterfact", strict_records=True, **_eval_kw(tmp_path, ok)).n_cases == 3


def test_cli_warns_or_refuses_records_without_prompts(saved_tiny, tmp_path, data_dir):
    cf = _cf_file(data_dir, tmp_path, drop=MISSING)
    ids = [r["case_id"] for r in json.loads(cf.read_text())]
    base = ["eval", "counterfact", "--model", saved_tiny, "--data", cf, "--file", cf.name, "--gen-prompts", "0"]
    env = {"FACTLAB_CACHE": str(tmp_path / "cache"), "COLUMNS": "200"}  # wide enough that no table cell wraps
    run_cli(*base, "--strict-records", "--out", tmp_path / "strict", env=env).assert_user_error(
        f"no paraphrase_prompts (case id {ids[1]})", f"no neighborhood_prompts (case id {ids[2]})", "--strict-records")
    assert not _files(tmp_path / "cache" / "evaluate")
    r = run_cli(*base, "--out", tmp_path / "run", env=env)
    assert r.returncode == 0, r.stderr
    assert "WARNING" in r.stderr and f"case id {ids[1]}" in r.stderr and f"case id {ids[2]}" in r.stderr
    _strict_json((tmp_path / "run" / "cases.jsonl").read_text())
    assert "n=2" in r.stdout  # the table says which metrics cover fewer cases


def test_prompt_lists_that_are_not_lists_are_schema_errors(tmp_path, data_dir):
    from factlab.data import SchemaError, load_counterfact

    recs = json.loads((data_dir / "counterfact" / "counterfact_subset.json").read_text())[:2]
    recs[0]["paraphrase_prompts"] = None  # null: no prompts
    path = tmp_path / "cf.json"
    path.write_text(json.dumps(recs))
    assert load_counterfact(path)[0].paraphrase_prompts == []
    recs[1]["neighborhood_prompts"] = "The Colosseum is in"  # a bare string would become a list of characters
    path.write_text(json.dumps(recs))
    with pytest.raises(SchemaError, match="record 1: neighborhood_prompts must be a list of prompt strings"):
        load_counterfact(path)


# ----------------------------------------------------------------------------------------------- 4. validate first
@pytest.mark.parametrize("dataset", ["counterfact", "zsre", "mquake"])
@pytest.mark.parametrize("bad", [dict(method="memit", layers=[1, 99]), dict(method="rome", hparams={"no_such_knob": 1})])
def test_api_bad_layers_and_hparams_are_refused_before_any_forward_pass(tiny_llama, tmp_path, dataset, bad):
    with _forwards(tiny_llama) as calls, pytest.raises(FactlabError, match="99|no_such_knob"):
        evaluate(tiny_llama, dataset, limit=1, out=tmp_path / "run", generation=None, pre_cache_dir=tmp_path / "pre", **bad)
    assert calls == [] and not _files(tmp_path / "pre") and not _files(tmp_path / "run")


def test_api_forward_counter_sees_the_pre_scoring(tiny_llama, tmp_path):
    """The control for the probes above: a valid run does run the model (so 'no forward pass' is meaningful)."""
    with _forwards(tiny_llama) as calls:
        evaluate(tiny_llama, "counterfact", limit=1, generation=None, pre_cache_dir=tmp_path / "pre")
    assert calls


@pytest.mark.parametrize("dataset", ["counterfact", "zsre", "mquake"])
def test_cli_layers_99_is_refused_before_the_pre_edit_scoring(saved_tiny, tmp_path, dataset):
    cache = tmp_path / "cache"
    r = run_cli("eval", dataset, "--model", saved_tiny, "--method", "memit", "--layers", "99", "--limit", "2",
                *(["--gen-prompts", "0"] if dataset == "counterfact" else []), "--out", tmp_path / "run",
                env={"FACTLAB_CACHE": str(cache)})
    r.assert_user_error("99", "outside this model's layers 0..")
    assert not _files(cache / "evaluate") and not (tmp_path / "run").exists()


def _one_error_line(r) -> None:
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr


def test_cli_eval_show_on_a_missing_or_unfinished_folder(tmp_path):
    r = run_cli("eval", "show", tmp_path / "nope")
    r.assert_user_error("does not exist")
    _one_error_line(r)
    (tmp_path / "unfinished").mkdir()
    (tmp_path / "unfinished" / "config.json").write_text("{}")
    run_cli("eval", "show", tmp_path / "unfinished").assert_user_error("has not finished", "resume")
    with pytest.raises(InputError, match="does not exist"):
        factlab.evaluate.Summary.load(tmp_path / "nope")


@pytest.mark.parametrize("hparams, needles", [("{bad", ("--hparams", "not valid JSON")), ("[1, 2]", ("JSON object",)),
                                              ("missing.json", ("does not exist",))])
def test_cli_malformed_hparams_is_one_clean_error_line(saved_tiny, tmp_path, hparams, needles):
    r = run_cli("eval", "counterfact", "--model", saved_tiny, "--method", "rome", "--hparams", hparams, "--limit", "1", cwd=tmp_path)
    r.assert_user_error(*needles)
    _one_error_line(r)


# ----------------------------------------------------------------------------------------------- 5. intervals
def test_intervals_stay_inside_each_metrics_range():
    from factlab.evaluate.summary import summarise_metrics

    # the case: PS per case 1, 1, 0.5 gave "PS 83.3 [11.6, 155.0]" (a t interval at n = 3)
    rows = [{"case_id": i, "post": {"efficacy_score": e, "paraphrase_score": p, "neighborhood_score": 1.0, "efficacy_magnitude": m}}
            for i, (e, p, m) in enumerate([(1.0, 1.0, 0.9), (1.0, 1.0, 0.95), (0.0, 0.5, -0.2)])]
    post = summarise_metrics(rows, "counterfact")["post"]
    ps = post["paraphrase_score"]
    assert ps.mean == pytest.approx(83.33, abs=0.01) and 0 <= ps.low < ps.mean < ps.high <= 100
    assert 0 < post["neighborhood_score"].low < post["neighborhood_score"].high == 100  # all successes: not [100, 100]
    em = post["efficacy_magnitude"]
    assert -100 <= em.low and em.high <= 100  # a difference of probabilities stays in [-100, 100]
    assert all(e.small_n and e.n == 3 for e in post.values())


def test_summary_table_marks_small_n_and_partial_coverage(tiny_llama, tmp_path, data_dir):
    from rich.console import Console

    cf = _cf_file(data_dir, tmp_path, drop={1: "paraphrase_prompts"})
    s = evaluate(tiny_llama, "counterfact", out=tmp_path / "run", **_eval_kw(tmp_path, cf))
    console = Console(record=True, width=250)
    console.print(s.table())
    text = console.export_text()
    ps_row = next(line for line in text.splitlines() if "paraphrase_score" in line)
    assert "n=2*" in ps_row and "fewer than 10 cases" in text
    saved = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert saved["metrics"]["post"]["efficacy_score"]["small_n"] is True


def test_circuit_and_lre_intervals_stay_in_range():
    from factlab.circuits.edit import EditComparison
    from factlab.lre.evaluate import summarise

    rows = [{"mode": "restricted", "where": "circuit", "case_id": i, "before": {"success": 0.0, "nll_new": 3.0 + i},
             "after": {"success": s, "nll_new": 0.01 * i}, "moved": 5, "seconds": 0.1} for i, s in enumerate([1.0, 1.0, 0.0])]
    d = EditComparison(rows, {}, "m").summary()["restricted"]["circuit"]
    assert 0 <= d["success"]["after"]["low"] and d["success"]["after"]["high"] <= 1
    assert -1 <= d["success"]["delta"]["low"] and d["success"]["delta"]["high"] <= 1
    assert d["nll_new"]["after"]["low"] >= 0 and d["success"]["after"]["small_n"] is True
    f = summarise([0.9, 0.5, 1.0], [True] * 12 + [False] * 3)  # over three trials
    assert 0 <= f["low"] <= f["mean"] <= f["high"] <= 1
