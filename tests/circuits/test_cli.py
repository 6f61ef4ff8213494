"""``factlab circuit find | edit | compare`` end to end on a saved tiny model (anneal schedule, sweep, resumable edits)."""

from __future__ import annotations

import csv
import json

import pytest
from typer.testing import CliRunner

from factlab.cli import app
from factlab.models.tiny import save_tiny


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return str(save_tiny("llama", tmp_path_factory.mktemp("tiny") / "llama"))


def _json(r) -> dict:
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout[r.stdout.index("{"):])


def test_circuit_find_edit_compare(tiny_dir, tmp_path, data_dir, monkeypatch):
    monkeypatch.setenv("FACTLAB_CACHE", str(tmp_path / "cache"))
    task = tmp_path / "agree.csv"
    with task.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["text", "label"])
        for i in range(12):
            w.writerows([[f"The cat {i} is here", 1], [f"The cat {i} are here", 0]])
    runner = CliRunner()
    outs = []
    for name, extra in (("a", []), ("b", ["--seed", "1"])):
        out = tmp_path / name
        rep = _json(runner.invoke(app, ["circuit", "find", str(task), "--model", tiny_dir, "--density", "0.2", "--sweep", "0.5",
                                        "--schedule", "anneal", "--init", "saliency", "--lr", "0.05", "--steps", "12",
                                        "--batch-size", "8", "--form", "head", "--out", str(out), *extra, "--json"]))
        assert rep["finished_by"] == "anneal" and rep["reached_target"] and abs(rep["density"] - 0.2) < 0.01
        assert rep["config"]["schedule"] == "anneal" and [r["target"] for r in rep["sweep"]] == [0.5, 0.2]
        assert (out / "mask.safetensors").exists() and (out / "sweep" / "d0.5.safetensors").exists() and (out / "split.json").exists()
        outs.append(out)
    again = _json(runner.invoke(app, ["circuit", "find", str(task), "--model", tiny_dir, "--density", "0.2", "--out", str(outs[0]), "--json"]))
    assert again["reused"]
    edit = ["circuit", "edit", str(outs[0]), "--data", "hierarchy", "--limit", "2", "--steps", "1", "--mode", "restricted"]
    res = _json(runner.invoke(app, [*edit, "--json"]))
    assert set(res) == {"final"} and res["final"]["summary"]["restricted"]["circuit"]["n"] == 2
    sweep = _json(runner.invoke(app, [*edit, "--sweep", "--no-final", "--where", "circuit", "--json"]))
    assert set(sweep) == {"d0.5"}  # the final circuit's copy in sweep/ (d0.2) is not edited twice
    saved = json.loads((outs[0] / "edits" / "summary.json").read_text())
    assert set(saved) == {"final", "d0.5"}  # the second call kept the first call's summary
    comp = _json(runner.invoke(app, ["circuit", "compare", *map(str, outs), "--out", str(tmp_path / "cmp"), "--json"]))
    assert comp["overlap"]["names"] == ["a", "b"] and len(comp["makeup"]) == 2
    assert (tmp_path / "cmp" / "overlap.png").exists() and (tmp_path / "cmp" / "makeup.png").exists()
    rows = comp["sweep"][0]["rows"]
    assert {r["target"] for r in rows} == {0.5, 0.2} and all("circuit" in r["edit"] for r in rows)
    cc = _json(runner.invoke(app, ["circuit", "crosscheck", str(outs[0]), "--data", "hierarchy", "--limit", "2", "--json"]))
    assert set(cc["summary"]) == {"circuit_layers", "other_layers"} and cc["summary"]["circuit_layers"]["n"] == 2
    assert (outs[0] / "crosscheck_rome.json").exists()
    # a component circuit: its sweep snapshots are expanded to weight masks for editing
    comp_dir = tmp_path / "c"
    rep = _json(runner.invoke(app, ["circuit", "find", str(task), "--model", tiny_dir, "--density", "0.3", "--sweep", "0.6",
                                    "--granularity", "component", "--schedule", "anneal", "--init", "saliency", "--steps", "6",
                                    "--batch-size", "8", "--form", "head", "--out", str(comp_dir), "--json"]))
    assert rep["granularity"] == "component" and rep["n_components"] > 0
    res = _json(runner.invoke(app, ["circuit", "edit", str(comp_dir), "--data", "hierarchy", "--limit", "1", "--steps", "1",
                                    "--mode", "restricted", "--where", "random", "--sweep", "--no-final", "--json"]))
    assert set(res) == {"d0.6"} and 0 < res["d0.6"]["density"] < 1
