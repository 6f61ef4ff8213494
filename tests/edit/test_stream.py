"""Editing streams on a tiny model: rollback bit for bit, the accumulated history, save/resume, a kill between a
batch's save and its log line, config mismatch and a second writer refused."""

from __future__ import annotations

import pytest
import torch

import factlab.edit.stream as stream_mod
from factlab.edit import Request
from factlab.edit.stream import EditStream, StreamConfigError, StreamMismatchError
from factlab.errors import RunLockedError
from factlab.io import read_jsonl
from factlab.models.tiny import tiny_model

from .edit_helpers import TINY_HP, same_weights, snapshot

BATCHES = [
    [Request("{} is located in the city of", "The big tower", " Rome")],
    [Request("{} plays the instrument", "Miles Davis", " violin"),
     Request("The mother tongue of {} is", "Danielle Darrieux", " English")],
    [Request("{} was born in", "Ada Lovelace", " Paris")],
]
SETTINGS = dict(method="memit", layers=(1, 2), hparams=TINY_HP, on_known="edit")


def _lm():
    return tiny_model("llama")


def _reference_history(lm, results) -> dict[str, torch.Tensor]:
    """Plain sum of K.T @ K over the solves of ``results``, per key site."""
    ref: dict[str, torch.Tensor] = {}
    for res in results:
        for s in res.solves:
            site = s["site"]
            kk = s["keys"].double().T @ s["keys"].double()
            ref[site] = ref[site] + kk if site in ref else kk
    return ref


def _same_history(a, b) -> bool:
    return set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_rollback_bit_exact_and_history(tiny_env):
    lm = _lm()
    snaps = [snapshot(lm)]
    s = EditStream(lm, **SETTINGS)
    results = []
    for b in BATCHES:
        results.append(s.add(b))
        snaps.append(snapshot(lm))
    assert len(s) == 3 and s.n_edits == 4 and "batches=3" in repr(s) and "memit" in repr(s)
    assert not same_weights(lm, snaps[2])
    ref = _reference_history(lm, results)
    assert set(s.history) == {"layer.1.mlp.key", "layer.2.mlp.key"}
    assert _same_history(s.history, ref)
    d = s.history["layer.1.mlp.key"]
    assert d.dtype == torch.float64 and d.shape[0] == d.shape[1]
    s.rollback(to=1)
    assert len(s) == 1 and same_weights(lm, snaps[1])
    assert _same_history(s.history, _reference_history(lm, results[:1]))
    s.rollback(to=0)
    assert len(s) == 0 and same_weights(lm, snaps[0]) and s.history == {}
    with pytest.raises(Exception, match="rollback"):
        s.rollback(to=2)


def test_run_folder_rollback_and_resume(tiny_env, tmp_path):
    lm = _lm()
    run = tmp_path / "run"
    with EditStream(lm, run, **SETTINGS) as s:
        s.add_all(BATCHES)
        after3 = snapshot(lm)
        hist3 = {k: v.clone() for k, v in s.history.items()}
        assert [r["batch"] for r in read_jsonl(run / "stream.jsonl")] == [1, 2, 3]
        assert sorted(p.name for p in (run / "batches").iterdir()) == ["000001", "000002", "000003"]
    lm2 = _lm()
    with EditStream(lm2, run) as s2:  # settings as saved
        assert len(s2) == 3 and same_weights(lm2, after3) and _same_history(s2.history, hist3)
        assert s2.add_all(BATCHES)[2] is s2.results[2]  # all done already: nothing re-edited
        assert len(read_jsonl(run / "stream.jsonl")) == 3
        s2.rollback(to=1)
        after1 = snapshot(lm2)
        hist1 = {k: v.clone() for k, v in s2.history.items()}
        assert sorted(p.name for p in (run / "batches").iterdir()) == ["000001"]
        with pytest.raises(StreamMismatchError, match="batch 1"):
            s2.add_all(BATCHES[1:])
    lm3 = _lm()
    with EditStream(lm3, run, checkpoint_every=0) as s3:
        assert len(s3) == 1 and same_weights(lm3, after1) and _same_history(s3.history, hist1)


def test_history_recomputed_when_checkpoint_does_not_match(tiny_env, tmp_path):
    lm = _lm()
    run = tmp_path / "run"
    with EditStream(lm, run, checkpoint_every=2, **SETTINGS) as s:
        s.add_all(BATCHES)  # checkpoint after batch 2, batch 3 from its keys on resume
        hist = {k: v.clone() for k, v in s.history.items()}
        w = snapshot(lm)
    lm2 = _lm()
    with EditStream(lm2, run) as s2:
        assert _same_history(s2.history, hist) and same_weights(lm2, w)
    (run / "history.safetensors").unlink()
    lm3 = _lm()
    with EditStream(lm3, run) as s3:  # no checkpoint: all from the keys
        assert _same_history(s3.history, hist)


def test_kill_between_save_and_log_resumes_without_double_apply(tiny_env, tmp_path, monkeypatch):
    ref_lm = _lm()
    EditStream(ref_lm, **SETTINGS).add_all(BATCHES)
    final = snapshot(ref_lm)

    lm = _lm()
    run = tmp_path / "run"
    real = stream_mod.append_jsonl
    calls = {"n": 0}

    def dies_on_second(path, obj):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt("killed after the batch folder was saved")
        real(path, obj)

    monkeypatch.setattr(stream_mod, "append_jsonl", dies_on_second)
    s = EditStream(lm, run, **SETTINGS)
    with pytest.raises(KeyboardInterrupt):
        s.add_all(BATCHES)
    s.close()
    assert (run / "batches" / "000002").is_dir() and len(read_jsonl(run / "stream.jsonl")) == 1
    monkeypatch.setattr(stream_mod, "append_jsonl", real)

    lm2 = _lm()
    with EditStream(lm2, run) as s2:
        assert len(s2) == 1 and not (run / "batches" / "000002").exists()
        s2.add_all(BATCHES)
        assert len(s2) == 3 and [r["batch"] for r in read_jsonl(run / "stream.jsonl")] == [1, 2, 3]
        assert same_weights(lm2, final)


def test_config_mismatch_and_second_writer_refused(tiny_env, tmp_path):
    lm = _lm()
    run = tmp_path / "run"
    s = EditStream(lm, run, **SETTINGS)
    s.add(BATCHES[0])
    with pytest.raises(RunLockedError):
        EditStream(_lm(), run)
    s.close()
    with pytest.raises(StreamConfigError, match="layers"):
        EditStream(_lm(), run, layers=(1,))
    with pytest.raises(StreamConfigError, match="model"):
        EditStream(tiny_model("llama", seed=1), run)
    with pytest.raises(StreamConfigError, match="method"):
        EditStream(_lm(), run, method="emmet")


def test_kill_during_rollback_leaves_a_consistent_stream(tiny_env, tmp_path, monkeypatch):
    lm = _lm()
    run = tmp_path / "run"
    s = EditStream(lm, run, **SETTINGS)
    s.add(BATCHES[0])
    after1 = snapshot(lm)
    hist1 = {k: v.clone() for k, v in s.history.items()}
    s.add_all(BATCHES)
    after3 = snapshot(lm)

    def killed(self, n):
        raise KeyboardInterrupt("killed after the log was rewritten")

    with monkeypatch.context() as m:
        m.setattr(EditStream, "_discard_unlogged", killed)
        with pytest.raises(KeyboardInterrupt):
            s.rollback(to=1)
    s.close()
    assert len(read_jsonl(run / "stream.jsonl")) == 1 and (run / "batches" / "000003").is_dir()
    lm2 = _lm()
    with EditStream(lm2, run) as s2:  # the log is the truth: batches 2-3 discarded, stale checkpoint ignored
        assert len(s2) == 1 and same_weights(lm2, after1) and _same_history(s2.history, hist1)
        assert sorted(p.name for p in (run / "batches").iterdir()) == ["000001"]
        s2.add_all(BATCHES)
        assert same_weights(lm2, after3)


def test_history_reaches_a_solver_that_uses_it(tiny_env):
    from factlab.edit import Solver, register_solver
    from factlab.edit.registry import unregister_solver
    from factlab.edit.solvers import memit_factors

    seen = []

    def recording(s):  # MEMIT's solve, noting the history it was given
        seen.append(None if s.history is None else s.history.clone())
        return memit_factors(s.stats.factor(s.hp.mom2_update_weight, s.hp.ridge), s.K, s.R)

    register_solver("test_recording", Solver(recording, uses_history=True, default_policy="spread", hparams_from="memit"))
    try:
        lm = _lm()
        s = EditStream(lm, **{**SETTINGS, "method": "test_recording"})
        r1 = s.add(BATCHES[0])
        first = list(seen)
        s.add(BATCHES[1])
        site = r1.solves[-1]["site"]
        assert all(h is None for h in first)  # no earlier edits: no history at any site
        ref = _reference_history(lm, [r1])
        assert any(h is not None and torch.equal(h, ref[site]) for h in seen[len(first):])
    finally:
        unregister_solver("test_recording")
