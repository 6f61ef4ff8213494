"""The harness with registered solvers: any registered name is a method, and sequential runs go through an
:class:`EditStream` (earlier batches' keys reach history-using solvers; a killed run resumes without re-editing)."""

from __future__ import annotations

import pytest
import torch

from factlab.edit.registry import Solver, register_solver, solver_names, unregister_solver
from factlab.edit.solvers import memit_factors, memit_history_factors
from factlab.errors import InputError
from factlab.evaluate import evaluate
from factlab.evaluate.harness import EvalConfig, read_records
from factlab.io import read_jsonl
from factlab.models.tiny import tiny_model

from .evalhelpers import cf_records

TINY_HP = dict(stats_samples=60, stats_max_length=64, context=((5, 3),), v_steps=6, ridge=1e-4)


class Killed(Exception):
    pass


@pytest.fixture(autouse=True)
def _env(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("FACTLAB_CACHE", str(tmp_path_factory.getbasetemp() / "reg_cache"))
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def spy():
    """A solver registered from outside: MEMIT with history, recording the history it was given per call."""
    seen: list[dict] = []

    def solve(s):
        seen.append({"site": s.site, "history": None if s.history is None else s.history.clone(), "K": s.K.clone()})
        return memit_history_factors(s.stats.matrix(s.hp.mom2_update_weight, s.hp.ridge), s.history, s.K, s.R)

    register_solver("test_spy", Solver(solve, uses_history=True))
    yield seen
    unregister_solver("test_spy")


def _kw(tmp_path, **extra):
    return dict(method="test_spy", batch_size=1, sequential=True, generation=None, layers=(1,), hparams=TINY_HP,
                pre_cache_dir=tmp_path / "pre", **extra)


def _strip(summary) -> dict:
    d = summary.to_dict()
    d.pop("run")
    return d


def test_validate_reads_the_registry_now_and_lists_the_names():
    with pytest.raises(InputError, match="memit_history.*alphaedit") as e:
        EvalConfig("counterfact", method="nope").validate()
    assert "none" in str(e.value)
    register_solver("late_one", Solver(lambda s: memit_factors(s.stats.factor(1.0, 0.0), s.K, s.R)))
    try:
        assert "late_one" in solver_names()
        EvalConfig("counterfact", method="late_one").validate()  # registered after import: accepted
    finally:
        unregister_solver("late_one")
    with pytest.raises(InputError, match="late_one"):
        EvalConfig("counterfact", method="late_one").validate()


def test_registered_solver_gets_the_history_of_earlier_batches(spy, tmp_path):
    lm = tiny_model("llama")
    w0 = {k: v.clone() for k, v in lm.model.state_dict().items()}
    s = evaluate(lm, ("counterfact", cf_records()), out=tmp_path / "run", **_kw(tmp_path))
    assert all(torch.equal(v, w0[k]) for k, v in lm.model.state_dict().items())  # restored
    assert s.method == "test_spy" and s.get("efficacy_score", "final").n == 2
    assert len(spy) == 2 and spy[0]["history"] is None
    K1 = spy[0]["K"].double()  # (d_in, 1): the first batch's keys
    assert torch.allclose(spy[1]["history"], K1 @ K1.T, rtol=1e-10, atol=1e-12)
    log = read_jsonl(tmp_path / "run" / "stream" / "stream.jsonl")
    assert [r["batch"] for r in log] == [1, 2]
    assert not (tmp_path / "run" / "edits").exists()
    recs = read_records(tmp_path / "run")
    assert [recs[0]["edits_applied"], recs[1]["edits_applied"]] == [1, 2]


def test_killed_sequential_run_resumes_without_editing_again(spy, tmp_path):
    lm = tiny_model("llama")
    full = evaluate(lm, ("counterfact", cf_records()), out=tmp_path / "full", **_kw(tmp_path))
    spy.clear()

    def kill(rec):
        raise Killed  # after batch 1 is committed and its case scored, before batch 2

    with pytest.raises(Killed):
        evaluate(lm, ("counterfact", cf_records()), out=tmp_path / "run", **_kw(tmp_path, on_record=kill))
    assert len(spy) == 1 and len(read_jsonl(tmp_path / "run" / "stream" / "stream.jsonl")) == 1
    spy.clear()
    again = evaluate(lm, ("counterfact", cf_records()), out=tmp_path / "run", **_kw(tmp_path))
    assert len(spy) == 1 and spy[0]["history"] is not None  # only batch 2 solved, with batch 1's keys
    assert len(read_jsonl(tmp_path / "run" / "stream" / "stream.jsonl")) == 2
    assert len(read_jsonl(tmp_path / "run" / "cases.jsonl")) == 2
    assert _strip(again)["metrics"] == _strip(full)["metrics"]
    spy.clear()
    evaluate(lm, ("counterfact", cf_records()), out=tmp_path / "run", **_kw(tmp_path))  # finished: nothing redone
    assert spy == []


def test_non_sequential_run_with_a_registered_method(spy, tmp_path):
    lm = tiny_model("llama")
    s = evaluate(lm, ("counterfact", cf_records()), out=tmp_path / "run", **{**_kw(tmp_path), "sequential": False})
    assert s.n_cases == 2 and all(x["history"] is None for x in spy)


def test_cli_takes_registered_methods(tmp_path, tmp_path_factory):
    import json

    from factlab.models.tiny import save_tiny
    from tests.reliability.conftest import run_cli

    env = {"FACTLAB_CACHE": str(tmp_path_factory.getbasetemp() / "reg_cache")}
    r = run_cli("eval", "counterfact", "--model", tmp_path / "no-such-model", "--method", "bogus", env=env)
    r.assert_user_error("--method 'bogus'", "memit_history", "alphaedit")  # refused before the model is loaded
    model = save_tiny("llama", tmp_path / "tiny")
    hp = json.dumps({**TINY_HP, "context": [[5, 3]]})
    r = run_cli("edit", "--model", model, "--prompt", "{} is in", "--subject", "The tower", "--target", " Rome", "--method", "alphaedit",
                "--layers", "1", "--hparams", hp, "--on-known", "edit", "--json", env=env)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["result"]["method"] == "alphaedit"
    r = run_cli("eval", "counterfact", "--model", model, "--method", "memit_history", "--sequential", "--limit", "2", "--gen-prompts", "0",
                "--layers", "1", "--hparams", hp, "--out", tmp_path / "run", "--json", env=env)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["method"] == "memit_history"
    assert len(read_jsonl(tmp_path / "run" / "stream" / "stream.jsonl")) == 2
