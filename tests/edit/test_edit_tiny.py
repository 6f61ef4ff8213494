"""Edits on tiny random models: the mechanics of ROME/MEMIT/EMMET, restore, save/load, sequential,
transposed GPT-2 Conv1D and Mamba projections, and bad input leaving the weights untouched."""

from __future__ import annotations

import pytest
import torch

from factlab.edit import (
    ConflictingRequestsError,
    DivergenceError,
    EditHparams,
    EditResult,
    EditStateError,
    NonFiniteStatisticsError,
    Request,
    SecondMoment,
    SingularStatisticsError,
    TargetAlreadyKnownError,
    edit,
    edit_sequential,
    resolve_hparams,
)
from factlab.edit.keys import compute_keys
from factlab.edit.context import context_templates

from .edit_helpers import TINY_HP, same_weights, snapshot

REQ = Request("{} is located in the city of", "The big tower", " Rome")
REQS = [
    Request("{} is located in the city of", "The big tower", " Rome"),
    Request("{} plays the instrument", "Miles Davis", " violin"),
    Request("The mother tongue of {} is", "Danielle Darrieux", " English"),
]


def _hp(lm, method="rome", **kw):
    return resolve_hparams(lm, method, {**TINY_HP, **kw})


def _canonical_delta(lm, res, layer, name=None):
    proj = lm.adapter.projection(layer, name)
    d = res.deltas[f"{proj.module}.weight"].double()
    d = d.T if proj.transposed else d
    return d if proj.rows is None else d[proj.rows[0]: proj.rows[1]]


@pytest.mark.parametrize("family", ["gpt2", "llama", "mamba"])
def test_rome_writes_target_and_restores_bit_exact(family, tiny_models, tiny_env):
    lm = tiny_models[family]
    snap = snapshot(lm)
    hp = _hp(lm)
    res = edit(lm, REQ, hparams=hp, on_known="edit")
    try:
        assert res.applied and res.method == "rome"
        layer = hp.layers[0]
        proj = lm.adapter.projection(layer)
        name = f"{proj.module}.weight"
        assert set(res.deltas) == {name}
        assert res.deltas[name].shape == dict(lm.model.named_parameters())[name].shape  # Conv1D stays (d_in, d_out)
        A, B = res.factors[name]
        assert A.shape[1] == 1 and torch.allclose((A @ B.T).float(), res.deltas[name], atol=1e-6)
        # W' k* = v* (canonical orientation; bias included)
        s = res.solves[0]
        W = proj.weight(lm.model).double()
        b = proj.bias(lm.model)
        out = s["keys"] @ W.T + (b.double() if b is not None else 0)
        torch.testing.assert_close(out, s["targets"], rtol=1e-4, atol=1e-5)
        # keys did not change (the edit is at their own layer) and match an independent computation
        K = compute_keys(lm, [REQ], proj.key_site, context_templates(lm, hp.context))
        torch.testing.assert_close(K.double(), s["keys"], rtol=1e-5, atol=1e-6)
    finally:
        res.restore()
    assert same_weights(lm, snap)
    res.restore()  # idempotent
    res.apply()
    res.apply()  # idempotent
    res.restore()
    assert same_weights(lm, snap)


def test_prompt_key_mode_reproduces_optimised_probability(tiny_models, tiny_env):
    """With bare-prompt keys, W'k = v0 + delta at the bare prompt, so the edited model's target probability
    equals the one the (resumed, truncated) value optimisation reported."""
    lm = tiny_models["llama"]
    res = edit(lm, REQ, hparams=_hp(lm, key_mode="prompt", v_steps=10), on_known="edit")
    try:
        from factlab.prompts import continuation_ids

        ids = continuation_ids(lm.tokenizer, REQ.filled, REQ.target_new)
        batch = lm.encode([REQ.filled + lm.tokenizer.decode(ids[:-1])]) if len(ids) > 1 else lm.encode([REQ.filled])
        n = len(lm.tokenizer(REQ.filled)["input_ids"])
        with torch.no_grad():
            logp = lm.forward(batch)[0].float().softmax(-1)
        probs = [float(logp[n - 1 + j, t]) for j, t in enumerate(ids)]
        assert abs(sum(probs) / len(probs) - res.metadata["values"][0]["prob_after"]) < 1e-4
        assert res.metadata["values"][0]["prob_after"] > res.metadata["values"][0]["prob_before"]
    finally:
        res.restore()


def test_emmet_one_request_equals_rome(tiny_models, tiny_env):
    lm = tiny_models["llama"]
    hp = _hp(lm)
    r1 = edit(lm, REQ, method="rome", hparams=hp, on_known="edit")
    d_rome = {k: v.clone() for k, v in r1.deltas.items()}
    r1.restore()
    r2 = edit(lm, REQ, method="emmet", hparams=hp.replace(mom2_update_weight=123.0), on_known="edit")
    r2.restore()
    for k in d_rome:
        torch.testing.assert_close(r2.deltas[k], d_rome[k], rtol=1e-4, atol=1e-6)


def test_memit_one_layer_matches_closed_form(tiny_models, tiny_env):
    lm = tiny_models["gpt2"]
    hp = _hp(lm, "memit", layers=(1,), mom2_update_weight=50.0)
    res = edit(lm, REQ, method="memit", hparams=hp, on_known="edit")
    try:
        s = res.solves[0]
        from factlab.edit.stats import second_moment

        C = second_moment(lm, "layer.1.mlp.key", samples=hp.stats_samples, max_length=hp.stats_max_length).matrix(ridge=hp.ridge)
        K, R = s["keys"], s["residuals"]  # (1, d_in), (1, d_out)
        ref = R.T @ K @ torch.linalg.inv(hp.mom2_update_weight * C + K.T @ K)
        torch.testing.assert_close(_canonical_delta(lm, res, 1), ref.float().double(), rtol=1e-4, atol=1e-6)
        assert res.metadata["policy"] == "spread"
    finally:
        res.restore()


@pytest.mark.parametrize("method", ["memit", "emmet"])
def test_batch_methods_spread_and_restore(method, tiny_models, tiny_env):
    lm = tiny_models["gpt_neox"]
    snap = snapshot(lm)
    res = edit(lm, REQS, method=method, hparams=_hp(lm, method, layers=(0, 1)), on_known="edit")
    assert len(res.deltas) == 2 and [s["layer"] for s in res.solves] == [0, 1]
    assert all(f[0].shape[1] == 3 for f in res.factors.values())
    res.restore()
    assert same_weights(lm, snap)


def test_save_load_apply_reproduces_logits(tiny_models, tiny_env, tmp_path):
    lm = tiny_models["gpt2"]
    snap = snapshot(lm)
    batch = lm.encode([REQ.filled, "An unrelated prompt about music"])
    res = edit(lm, REQS[:2], method="memit", hparams=_hp(lm, "memit", layers=(1, 2)), on_known="edit")
    with torch.no_grad():
        edited = lm.forward(batch)
    res.save(tmp_path / "e")
    res.restore()
    assert same_weights(lm, snap)
    loaded = EditResult.load(tmp_path / "e", lm)
    assert not loaded.applied and loaded.method == "memit" and loaded.metadata["layers"] == [1, 2]
    loaded.apply()
    with torch.no_grad():
        again = lm.forward(batch)
    assert torch.equal(edited, again)
    assert set(loaded.factors) == set(res.factors)
    loaded.restore()
    assert same_weights(lm, snap)


def test_sequential_restore_in_reverse_is_bit_exact(tiny_models, tiny_env):
    lm = tiny_models["llama"]
    snap = snapshot(lm)
    results = edit_sequential(lm, [[REQS[0]], [REQS[1]], [REQS[2]]], method="memit",
                              hparams=_hp(lm, "memit", layers=(1,)), on_known="edit")
    assert len(results) == 3 and all(r.applied for r in results)
    with pytest.raises(EditStateError, match="later edit"):
        results[0].restore()  # later edits are still applied
    for r in reversed(results):
        r.restore()
    assert same_weights(lm, snap)


def test_from_weights_round_trip(tiny_models):
    lm = tiny_models["gpt2"]
    snap = snapshot(lm)
    name = "transformer.h.0.mlp.c_fc.weight"
    p = dict(lm.model.named_parameters())[name]
    new = p.detach() * 1.5 + 0.01
    res = EditResult.from_weights(lm, {name: new}, method="finetune", metadata={"why": "test"})
    assert res.applied and torch.equal(p.detach(), new)
    res.restore()
    assert same_weights(lm, snap)
    res.apply()
    assert torch.equal(p.detach(), new)
    res.restore()


def test_mamba_in_proj_halves_and_out_proj(tiny_models, tiny_env):
    lm = tiny_models["mamba"]
    snap = snapshot(lm)
    d_inner = lm.adapter.d_mlp
    res = edit(lm, REQ, projection="in_proj.ssm", hparams=_hp(lm), on_known="edit")
    try:
        (name, delta), = res.deltas.items()
        assert name.endswith("mixer.in_proj.weight")
        assert delta[d_inner:].abs().max() == 0 and delta[:d_inner].abs().max() > 0  # only the SSM half
        s = res.solves[0]
        proj = lm.adapter.projection(res.metadata["layers"][0], "in_proj.ssm")
        torch.testing.assert_close(s["keys"] @ proj.weight(lm.model).double().T, s["targets"], rtol=1e-4, atol=1e-5)
    finally:
        res.restore()
    assert same_weights(lm, snap)
    with pytest.raises(Exception, match="residual stream"):
        edit(lm, REQ, method="memit", projection="in_proj.gate", hparams=_hp(lm, "memit"), on_known="edit")
    assert same_weights(lm, snap)


# ------------------------------------------------------------------ bad input
def test_target_already_known_is_reported(tiny_models, tiny_env):
    lm = tiny_models["llama"]
    snap = snapshot(lm)
    prompt = "A cat is located in the city of"
    top = lm.predict(prompt, top_k=1)[0][0]
    assert top.token.startswith(" ")  # the random model's own answer, a whole token
    req = Request("{} is located in the city of", "A cat", top.token)
    with pytest.raises(TargetAlreadyKnownError, match="already predicts"):
        edit(lm, req, hparams=_hp(lm))
    assert same_weights(lm, snap)
    res = edit(lm, [req, REQS[1]], method="memit", hparams=_hp(lm, "memit", layers=(1,)), on_known="skip")
    assert res.metadata["skipped"] == [0] and res.solves[0]["keys"].shape[0] == 1
    res.restore()


def test_conflicting_requests(tiny_models, tiny_env):
    lm = tiny_models["llama"]
    snap = snapshot(lm)
    bad = [REQ, Request(REQ.prompt, REQ.subject, " Oslo")]
    with pytest.raises(ConflictingRequestsError):
        edit(lm, bad, method="emmet", hparams=_hp(lm, "emmet"), on_known="edit")
    assert same_weights(lm, snap)
    with pytest.warns(UserWarning, match="conflicting"):
        res = edit(lm, bad, method="memit", hparams=_hp(lm, "memit", layers=(1,)), on_known="edit")
    res.restore()


def test_bad_statistics_leave_weights_untouched(tiny_models, tiny_env):
    lm = tiny_models["llama"]
    snap = snapshot(lm)
    hp = _hp(lm, ridge=0.0)
    site = lm.adapter.projection(hp.layers[0]).key_site
    d = lm.adapter.d_mlp
    with pytest.raises(SingularStatisticsError):
        edit(lm, REQ, hparams=hp, stats={site: torch.zeros(d, d)}, on_known="edit")
    with pytest.raises(NonFiniteStatisticsError):
        edit(lm, REQ, hparams=hp, stats={site: SecondMoment(torch.full((d, d), float("nan")), 1)}, on_known="edit")
    with pytest.raises(Exception, match="dimensional"):
        edit(lm, REQ, hparams=hp, stats={site: torch.eye(d + 1)}, on_known="edit")
    assert same_weights(lm, snap)


def test_divergence_restores_earlier_requests(tiny_models, tiny_env, monkeypatch):
    lm = tiny_models["gpt2"]
    snap = snapshot(lm)
    with pytest.raises(DivergenceError):
        edit(lm, REQ, hparams=_hp(lm, v_lr=float("inf")), on_known="edit")
    assert same_weights(lm, snap)
    # the second ROME request fails after the first was written: everything is rolled back
    import factlab.edit.value_cache as value_cache

    real, calls = value_cache.optimise_values, []

    def flaky(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise DivergenceError("simulated")
        return real(*a, **k)

    monkeypatch.setattr(value_cache, "optimise_values", flaky)
    with pytest.raises(DivergenceError, match="simulated"):
        edit(lm, REQS[:2], hparams=_hp(lm), on_known="edit")
    assert same_weights(lm, snap)


def test_bad_layers_and_methods(tiny_models):
    lm = tiny_models["llama"]
    with pytest.raises(Exception, match="ROME edits one layer"):
        resolve_hparams(lm, "rome", layers=[0, 1])
    with pytest.raises(Exception, match="outside"):
        resolve_hparams(lm, "memit", layers=[7])
    with pytest.raises(Exception, match="unknown method"):
        resolve_hparams(lm, "mend")
    with pytest.raises(Exception, match="unknown hyperparameter"):
        resolve_hparams(lm, "rome", {"learning_rate": 1})
    assert isinstance(resolve_hparams(lm, "rome"), EditHparams)
