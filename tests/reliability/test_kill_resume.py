"""Real processes killed with SIGKILL mid-run resume to the uninterrupted result, losing and duplicating nothing;
two processes computing the same statistics at once both finish with the same, valid file."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from factlab.io import read_jsonl
from .conftest import known_records

pytestmark = pytest.mark.slow  # each probe runs several real CLI processes


def _env(cache: Path) -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "FACTLAB_NO_PROGRESS": "1", "FACTLAB_CACHE": str(cache)}


def _cmd(*args: str) -> list[str]:
    return [sys.executable, "-c", "from factlab.cli import main; main()", *map(str, args)]


def _run(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    r = subprocess.run(_cmd(*args), env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr
    return r


def _kill_when(args: list[str], env: dict[str, str], ready, timeout: float = 600) -> None:
    """Start ``factlab ARGS``, SIGKILL it as soon as ``ready()`` is true, and check it really died mid-run."""
    p = subprocess.Popen(_cmd(*args), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    t0 = time.monotonic()
    try:
        while not ready():
            if p.poll() is not None:
                pytest.fail(f"the run ended before it could be killed (exit {p.returncode}): {p.stderr.read()[-2000:]}")
            if time.monotonic() - t0 > timeout:
                pytest.fail("the run made no progress to kill")
            time.sleep(0.02)
        p.send_signal(signal.SIGKILL)
    finally:
        p.wait(timeout=60)
    assert p.returncode == -signal.SIGKILL


def _lines(path: Path) -> int:
    return len(read_jsonl(path)) if path.exists() else 0


def test_eval_counterfact_killed_resumes_to_the_same_summary(saved_tiny, tmp_path):
    env = _env(tmp_path / "cache")
    base = ["eval", "counterfact", "--model", saved_tiny, "--method", "rome", "--limit", "24", "--gen-prompts", "0", "--json"]
    _run(base + ["--out", tmp_path / "full"], env)
    killed = tmp_path / "killed"
    _kill_when(base + ["--out", killed], env, lambda: _lines(killed / "cases.jsonl") >= 3)
    assert 3 <= _lines(killed / "cases.jsonl") < 24
    _run(base + ["--out", killed], env)
    ids = [r["case_id"] for r in read_jsonl(killed / "cases.jsonl")]
    assert sorted(ids) == sorted(set(ids)) and len(ids) == 24  # every case once
    full = json.loads((tmp_path / "full" / "summary.json").read_text())
    again = json.loads((killed / "summary.json").read_text())
    assert full["metrics"] == again["metrics"]


def test_trace_dataset_killed_resumes_to_the_same_averages(saved_tiny, tmp_path):
    import factlab

    recs = known_records(factlab.load(saved_tiny, device="cpu"), 9)
    assert len(recs) == 9, "the tiny model should know a few of its own answers"
    data = tmp_path / "facts.json"
    data.write_text(json.dumps(recs))
    env = _env(tmp_path / "cache")
    base = ["trace-dataset", data, "--model", saved_tiny, "--samples", "3", "--window", "2", "--noise", "0.5", "--json"]
    _run(base + ["--out", tmp_path / "full"], env)
    killed = tmp_path / "killed"
    _kill_when(base + ["--out", killed], env, lambda: _lines(killed / "traces.jsonl") >= 2)
    _run(base + ["--out", killed], env)
    ids = [r["id"] for r in read_jsonl(killed / "traces.jsonl")]
    assert len(ids) == len(set(ids)) == len(recs)
    full = json.loads((tmp_path / "full" / "aie.json").read_text())
    again = json.loads((killed / "aie.json").read_text())
    assert full["n_kept"] == again["n_kept"] == len(recs)
    for kind, v in full["kinds"].items():
        assert torch.allclose(torch.tensor(v["aie"], dtype=torch.float64), torch.tensor(again["kinds"][kind]["aie"], dtype=torch.float64), atol=1e-7)


def _stats_args(saved_tiny: Path) -> list[str]:
    return ["stats", "--model", saved_tiny, "--site", "layer.1.mlp.key", "--samples", "480", "--max-length", "64",
            "--batch-size", "4", "--json"]


def _stats_matrix(out: str) -> torch.Tensor:
    from factlab.edit.stats import SecondMoment

    row = json.loads(out)[0]
    return SecondMoment.load(Path(row["file"])).mom2


def test_statistics_killed_resume_to_the_same_matrix(saved_tiny, tmp_path):
    full = _stats_matrix(_run(_stats_args(saved_tiny), _env(tmp_path / "cache-full")).stdout)
    cache = tmp_path / "cache-killed"
    env = _env(cache)
    _kill_when(_stats_args(saved_tiny), env, lambda: any("partial" in p.name for p in cache.rglob("*.safetensors")))
    assert not [p for p in cache.rglob("*.safetensors") if "partial" not in p.name]  # killed before the end
    again = _stats_matrix(_run(_stats_args(saved_tiny), env).stdout)
    torch.testing.assert_close(again, full, rtol=1e-6, atol=1e-7)


def test_two_statistics_writers_at_once_agree(saved_tiny, tmp_path):
    env = _env(tmp_path / "cache")
    procs = [subprocess.Popen(_cmd(*_stats_args(saved_tiny)), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=900) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [e for _, e in outs]
    a, b = (_stats_matrix(o) for o, _ in outs)
    assert torch.equal(a, b)
    single = _stats_matrix(_run(_stats_args(saved_tiny), _env(tmp_path / "cache-single")).stdout)
    assert torch.equal(a, single)
