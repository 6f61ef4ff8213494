"""The value optimisation's fast paths against plain computations."""

from __future__ import annotations

import torch

from .edit_helpers import TINY_HP
from factlab.edit import Request, resolve_hparams
from factlab.edit.context import context_templates
from factlab.edit.values import optimise_values
from factlab.interventions import patch
from factlab.prompts import continuation_ids, subject_span

REQS = [Request("{} is located in the city of", "The big tower", " Rome"), Request("{} plays the", "Miles Davis", " violin")]


def _plain_prob(lm, req, site=None, delta=None):
    """Mean target-token probability on the bare prompt by a full forward (no resume, full logits)."""
    ids = continuation_ids(lm.tokenizer, req.filled, req.target_new)
    prompt_ids = lm.tokenizer(req.filled)["input_ids"]
    batch = lm.encode([lm.tokenizer.decode(prompt_ids + ids[:-1])])
    assert batch.input_ids[0].tolist() == prompt_ids + ids[:-1]
    last = subject_span(lm.tokenizer, req.filled, req.subject)[1] - 1
    pos = batch.position(0, last)
    fns = {}
    if delta is not None:
        def add(v):
            v = v.clone()
            v[0, pos] += delta.to(v.dtype)
            return v
        fns = {site: add}
    with torch.no_grad(), patch(lm, fns):
        p = lm.forward(batch)[0].float().softmax(-1)
    n = len(prompt_ids)
    return sum(float(p[n - 1 + j, t]) for j, t in enumerate(ids)) / len(ids)


def test_resumed_truncated_forward_matches_plain(tiny_models, tiny_env):
    for fam in ("llama", "mamba", "gemma3"):
        lm = tiny_models[fam]
        hp = resolve_hparams(lm, "rome", {**TINY_HP, "layers": (1,)})
        site = lm.adapter.projection(1).out_site
        vals = optimise_values(lm, REQS, site=site, layer=1, templates=context_templates(lm, hp.context), hp=hp)
        for i, r in enumerate(REQS):
            assert abs(vals.prob_before[i] - _plain_prob(lm, r)) < 1e-5
            assert abs(vals.prob_after[i] - _plain_prob(lm, r, site, vals.delta[i])) < 1e-5
        assert (vals.delta.norm(dim=-1) <= hp.clamp_norm_factor * vals.v0.norm(dim=-1) * (1 + 1e-5)).all()


def test_batched_requests_optimise_as_if_alone(tiny_models, tiny_env):
    lm = tiny_models["gpt2"]
    hp = resolve_hparams(lm, "memit", {**TINY_HP, "layers": (1,), "v_steps": 8, "early_stop_loss": 40.0})
    t = context_templates(lm, hp.context)
    site = "layer.1.resid"
    together = optimise_values(lm, REQS, site=site, layer=1, templates=t, hp=hp)
    alone = [optimise_values(lm, [r], site=site, layer=1, templates=t, hp=hp) for r in REQS]
    for i in range(2):
        torch.testing.assert_close(together.delta[i], alone[i].delta[0], rtol=1e-4, atol=1e-6)
        assert together.steps[i] == alone[i].steps[0]


def test_value_cache_reuses_values_and_edits_the_same(tiny_models, tiny_env, tmp_path, monkeypatch):
    """A cached value gives the same edit as a fresh one; a second call optimises nothing; ROME's later
    requests (solved on the already-edited model) never read the cache."""
    import factlab.edit.value_cache as vc
    from factlab.edit import ValueCache, edit

    lm = tiny_models["gpt2"]
    hp = {**TINY_HP, "layers": (0, 1)}
    calls = []
    real = vc.optimise_values
    monkeypatch.setattr(vc, "optimise_values", lambda *a, **k: calls.append(len(a[1])) or real(*a, **k))
    fresh = edit(lm, REQS, method="memit", hparams=hp, on_known="edit")
    fresh.restore()
    cache = ValueCache(tmp_path / "values")
    first = edit(lm, REQS, method="memit", hparams=hp, on_known="edit", value_cache=cache)
    first.restore()
    assert calls == [2, 2]
    second = edit(lm, REQS[::-1], method="memit", hparams=hp, on_known="edit", value_cache=tmp_path / "values")
    second.restore()
    assert calls == [2, 2]  # both values came from the cache (order does not matter)
    for name, d in fresh.deltas.items():
        torch.testing.assert_close(first.deltas[name], d, rtol=0, atol=0)
        torch.testing.assert_close(second.deltas[name], d, rtol=1e-4, atol=1e-6)
    calls.clear()
    rome = edit(lm, REQS, method="rome", hparams={**TINY_HP, "layers": (1,)}, on_known="edit", value_cache=cache)
    rome.restore()
    assert calls == [1, 1]
    assert len(list((tmp_path / "values").glob("*.json"))) == 3  # only the first ROME request was stored


def test_kv_prefix_path_equals_full_positions(tiny_models, tiny_env, monkeypatch):
    """With an exact KV cache, steps after the first feed only the positions from the earliest subject
    token on; the optimised values equal those of full-width passes (the plain path)."""
    from factlab.models.adapters.base import Adapter

    for fam in ("llama", "gpt2", "gpt_neox"):
        lm = tiny_models[fam]
        assert lm.adapter.exact_kv_cache
        hp = resolve_hparams(lm, "rome", {**TINY_HP, "layers": (1,), "early_stop_loss": 0.0})
        site = lm.adapter.projection(1).out_site
        t = context_templates(lm, hp.context)
        fast = optimise_values(lm, REQS, site=site, layer=1, templates=t, hp=hp)
        with monkeypatch.context() as m:
            m.setattr(Adapter, "exact_kv_cache", property(lambda self: False))
            plain = optimise_values(lm, REQS, site=site, layer=1, templates=t, hp=hp)
        torch.testing.assert_close(fast.delta, plain.delta, rtol=1e-4, atol=1e-6)
        assert fast.steps == plain.steps
        assert max(abs(a - b) for a, b in zip(fast.prob_after, plain.prob_after)) < 1e-5
