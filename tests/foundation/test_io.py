"""Atomic writes, resumable JSON-lines logs and confidence intervals."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from factlab.confidence import SMALL_N, bounded_mean_ci, mean_ci, proportion_ci
from factlab.io import append_jsonl, load_tensors, read_jsonl, save_tensors, write_json


def test_torn_last_line_is_cut_before_appending(tmp_path):
    p = tmp_path / "cases.jsonl"
    append_jsonl(p, {"case": 1})
    with open(p, "a") as f:
        f.write('{"case": 2, "sco')  # a writer killed mid-line
    assert read_jsonl(p) == [{"case": 1}]
    append_jsonl(p, {"case": 3})
    assert read_jsonl(p) == [{"case": 1}, {"case": 3}]
    assert p.read_text().count("\n") == 2


def test_failed_atomic_write_leaves_the_old_file(tmp_path):
    p = tmp_path / "summary.json"
    write_json(p, {"ok": 1})
    with pytest.raises(TypeError):
        write_json(p, {"bad": object()})
    assert json.loads(p.read_text()) == {"ok": 1}
    assert [f.name for f in tmp_path.iterdir()] == ["summary.json"]


def test_tensors_round_trip(tmp_path):
    t = {"a": torch.randn(3, 4), "b": torch.arange(5)}
    save_tensors(tmp_path / "t.safetensors", t, metadata={"k": "v"})
    back = load_tensors(tmp_path / "t.safetensors")
    assert all(torch.equal(t[k], back[k]) for k in t)


def test_mean_ci_matches_the_t_interval():
    from scipy import stats

    x = np.array([0.1, 0.4, 0.35, 0.8, 0.55])
    e = mean_ci(x)
    lo, hi = stats.t.interval(0.95, len(x) - 1, loc=x.mean(), scale=stats.sem(x))
    assert e.n == 5 and abs(e.low - lo) < 1e-12 and abs(e.high - hi) < 1e-12
    assert mean_ci([1.0]).low == 1.0 and mean_ci([]).n == 0


def test_bounded_mean_ci_stays_in_range_and_equals_t_inside_it():
    x = [0.7, 0.95, 0.99]  # the t interval runs past 1 at n = 3
    t, b = mean_ci(x), bounded_mean_ci(x, 0.0, 1.0)
    assert t.high > 1 and b.high == 1.0 and b.low == t.low and b.mean == t.mean
    wide = [0.4, 0.5, 0.45, 0.55, 0.5, 0.48, 0.52, 0.47, 0.5, 0.53, 0.49]
    assert bounded_mean_ci(wide, 0.0, 1.0) == mean_ci(wide)  # far from the bounds: the plain t interval
    assert bounded_mean_ci([3.0, 5.0], 0.0, None).low == 0.0 and bounded_mean_ci([3.0, 5.0], 0.0, None).high == mean_ci([3.0, 5.0]).high
    one = bounded_mean_ci([0.5], -1.0, 1.0)
    assert (one.low, one.high) == (-1.0, 1.0)  # one value says nothing about the spread
    assert bounded_mean_ci([], 0.0, 1.0).n == 0 and np.isnan(bounded_mean_ci([], 0.0, 1.0).low)
    assert bounded_mean_ci([1 + 1e-9, 1.0], 0.0, 1.0).high == 1.0  # rounding past a bound is not an error
    with pytest.raises(ValueError, match="outside the declared range"):
        bounded_mean_ci([0.5, 1.5], 0.0, 1.0)


def test_proportion_ci_drops_missing_values_and_refuses_values_outside_0_1():
    e = proportion_ci([1.0, float("nan"), 0.0, None])
    assert e.n == 2 and e.mean == 0.5 and 0 < e.low < 0.5 < e.high < 1
    with pytest.raises(ValueError, match=r"\[0, 1\]|range"):
        proportion_ci([0.5, 2.0])


def test_estimates_say_when_n_is_small():
    small, enough = proportion_ci([1] * (SMALL_N - 1)), proportion_ci([1] * SMALL_N)
    assert small.small_n and not enough.small_n
    assert small.to_dict()["small_n"] is True and enough.to_dict()["small_n"] is False
    assert f"n={SMALL_N - 1} < {SMALL_N}" in str(small) and "<" not in str(enough)
    assert small.scaled(100).high == 100.0 and small.scaled(100).n == small.n
