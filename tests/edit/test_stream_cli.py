"""``factlab edit stream`` on a saved tiny model: a run, its resume after a kill (an unlogged batch folder left
behind) and after a run cut short, ``--rollback-to``, CounterFact input, and user mistakes."""

from __future__ import annotations

import json
import shutil

import pytest

from factlab.io import read_jsonl
from factlab.models.tiny import save_tiny
from tests.reliability.conftest import run_cli

HP = json.dumps({"stats_samples": 60, "stats_max_length": 64, "context": [[5, 3]], "v_steps": 6, "ridge": 1e-4})
REQUESTS = [
    ("{} is located in the city of", "The big tower", " Rome"),
    ("{} plays the instrument", "Miles Davis", " violin"),
    ("The mother tongue of {} is", "Danielle Darrieux", " English"),
    ("{} was born in", "Ada Lovelace", " Paris"),
    ("{} is a citizen of", "Pablo Neruda", " Japan"),
    ("{} works in the field of", "Marie Curie", " music"),
]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny("llama", tmp_path_factory.mktemp("stream_cli") / "llama")


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    return {"FACTLAB_CACHE": str(tmp_path_factory.mktemp("stream_cli_cache"))}


def _file(path, reqs):
    path.write_text("".join(json.dumps({"prompt": p, "subject": s, "target_new": {"str": t}}) + "\n" for p, s, t in reqs))
    return path


def _stream(tiny_dir, env, out, *args):
    r = run_cli("edit", "stream", "--model", tiny_dir, "--out", out, "--json", *args, env=env)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def _args(reqs_file):
    return ["--requests", reqs_file, "--method", "memit_history", "--batch-size", "2", "--layers", "1", "--hparams", HP,
            "--on-known", "edit"]


def test_stream_runs_resumes_after_a_kill_and_rolls_back(tiny_dir, env, tmp_path):
    full = _file(tmp_path / "all.jsonl", REQUESTS)
    ref = _stream(tiny_dir, env, tmp_path / "ref", *_args(full))
    assert [b["status"] for b in ref["batches"]] == ["new"] * 3 and ref["stream"]["edits"] == 6
    assert all(b["delta_norm"] > 0 and b["seconds"] is not None for b in ref["batches"])
    ref_log = read_jsonl(tmp_path / "ref" / "stream.jsonl")

    # a run cut short after two batches, plus a kill between batch 3's save and its log line
    run = tmp_path / "run"
    _stream(tiny_dir, env, run, *_args(_file(tmp_path / "first.jsonl", REQUESTS[:4])))
    shutil.copytree(tmp_path / "ref" / "batches" / "000003", run / "batches" / "000003")
    again = _stream(tiny_dir, env, run, *_args(full))
    assert [b["status"] for b in again["batches"]] == ["resumed", "resumed", "new"]
    assert read_jsonl(run / "stream.jsonl") == ref_log  # same batches, same keys: nothing lost or applied twice
    assert [b["delta_norm"] for b in again["batches"]] == [b["delta_norm"] for b in ref["batches"]]

    back = _stream(tiny_dir, env, run, "--rollback-to", "1")
    assert back["rolled_back_to"] == 1 and back["stream"]["batches"] == 1 and back["batches"] == []
    assert len(read_jsonl(run / "stream.jsonl")) == 1 and sorted(p.name for p in (run / "batches").iterdir()) == ["000001"]
    redo = _stream(tiny_dir, env, run, *_args(full))  # batches 2 and 3 again, on the weights after batch 1
    assert [b["status"] for b in redo["batches"]] == ["resumed", "new", "new"]
    assert read_jsonl(run / "stream.jsonl") == ref_log

    r = run_cli("edit", "stream", "--model", tiny_dir, "--out", run, "--method", "alphaedit", "--requests", full, env=env)
    r.assert_user_error("method 'memit_history' (saved) vs 'alphaedit'")
    r = run_cli("edit", "stream", "--model", tiny_dir, "--out", run, "--rollback-to", "7", env=env)
    r.assert_user_error("--rollback-to 7", "0..3")
    r = run_cli("edit", "stream", "--model", tiny_dir, "--out", run, "--requests", _file(tmp_path / "other.jsonl", REQUESTS[2:]),
                "--batch-size", "2", env=env)
    r.assert_user_error("batch 1", "rollback")
    assert read_jsonl(run / "stream.jsonl") == ref_log  # refusals change nothing


def test_stream_from_counterfact_and_table_output(tiny_dir, env, tmp_path):
    r = run_cli("edit", "stream", "--model", tiny_dir, "--out", tmp_path / "cf", "--counterfact", "--limit", "2", "--method", "alphaedit",
                "--batch-size", "1", "--layers", "1", "--hparams", HP, "--on-known", "edit", env=env)
    assert r.returncode == 0, r.stderr
    assert "delta norm" in r.stdout and "2 batch(es), 2 edit(s)" in r.stdout
    assert json.loads((tmp_path / "cf" / "config.json").read_text())["method"] == "alphaedit"


def test_stream_user_mistakes(tiny_dir, env, tmp_path):
    f = _file(tmp_path / "r.jsonl", REQUESTS[:1])
    run_cli("edit", "stream", "--model", tiny_dir, "--out", tmp_path / "a", "--requests", f, "--counterfact", env=env).assert_user_error("not both")
    run_cli("edit", "stream", "--model", tiny_dir, "--out", tmp_path / "a", env=env).assert_user_error("--requests", "--counterfact")
    run_cli("edit", "stream", "--model", tiny_dir, "--out", tmp_path / "a", "--rollback-to", "0", env=env).assert_user_error("no edit stream")
    run_cli("edit", "stream", "--model", tiny_dir, "--out", tmp_path / "a", "--requests", f, "--method", "nope",
            env=env).assert_user_error("unknown method 'nope'", "alphaedit")
    assert not (tmp_path / "a" / "stream.jsonl").exists()


def test_method_help_lists_the_registry(tiny_dir):
    r = run_cli("edit", "stream", "--help")
    assert r.returncode == 0 and "memit_history" in r.stdout and "alphaedit" in r.stdout
    r = run_cli("eval", "counterfact", "--help")
    assert r.returncode == 0 and "alphaedit" in r.stdout


def _plain_top1(lm, requests) -> float:
    """Reference efficacy: one unbatched forward per request, every target token the argmax at its position."""
    import torch

    from factlab.prompts import continuation_ids, token_ids

    ok = 0
    for r in requests:
        p = token_ids(lm.tokenizer, r.filled)
        t = continuation_ids(lm.tokenizer, r.filled, r.target_new)
        with torch.no_grad():
            logits = lm.model(torch.tensor([p + t])).logits[0]
        ok += all(int(logits[len(p) - 1 + j].argmax()) == tok for j, tok in enumerate(t))
    return 100.0 * ok / len(requests)


def _known_requests(lm, n: int):
    """``n`` requests whose new target is what the unedited model already predicts: one token that round-trips
    (searched over made-up subjects, since the tiny model's top-1 is rarely a word-initial token)."""
    import itertools

    import torch

    from factlab.edit import Request
    from factlab.prompts import continuation_ids, token_ids

    words = ["Miles", "Davis", "Ada", "Marie", "Curie", "Pablo", "Paris", "Toyota", "Berlin", "Tower", "Rome", "Lima"]
    out = []
    for (p, _, _), a, b in itertools.product(REQUESTS, words, words):
        s = f"{a} {b}"
        filled = p.replace("{}", s)
        with torch.no_grad():
            t = int(lm.model(torch.tensor([token_ids(lm.tokenizer, filled)])).logits[0, -1].argmax())
        target = lm.tokenizer.decode([t])
        if target.strip():
            r = Request(p, s, target)  # may add a leading space to the target
            if continuation_ids(lm.tokenizer, filled, r.target_new) == [t]:
                out.append(r)
        if len(out) == n:
            return out
    raise AssertionError("the tiny model gives too few round-tripping one-token targets")


def test_check_every_scores_efficacy_as_a_plain_reference(tiny_dir, env, tmp_path, monkeypatch):
    from factlab.edit.stream import EditStream
    from factlab.models import load

    lm = load(str(tiny_dir))
    from factlab.edit import Request

    known, new = _known_requests(lm, 2), [Request(*r) for r in REQUESTS[:2]]
    reqs = [known[0], new[0], known[1], new[1]]  # batch 1: a known and a new target; batch 2: the same
    f = tmp_path / "r.jsonl"
    f.write_text("".join(json.dumps(r.to_dict()) + "\n" for r in reqs))
    small = json.dumps({**json.loads(HP), "mom2_update_weight": 1e4})  # small updates: known targets stay top-1
    out = _stream(tiny_dir, env, tmp_path / "s", "--requests", f, "--method", "memit", "--batch-size", "2", "--layers", "1",
                  "--hparams", small, "--on-known", "edit", "--check-every", "2")
    rows = out["batches"]
    assert "efficacy" not in rows[0] and 0 < rows[1]["efficacy"] < 100  # checked after batch 2 only
    monkeypatch.setenv("FACTLAB_CACHE", env["FACTLAB_CACHE"])
    with EditStream(lm, tmp_path / "s"):  # the same weights, re-applied in this process
        assert rows[1]["efficacy"] == _plain_top1(lm, reqs)
