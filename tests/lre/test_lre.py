"""LRE: Jacobians, fit, metrics, sweep/eval pipeline, lens, bad input (tiny models; one slow real-model test)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from factlab.data import load_relation
from factlab.data.errors import SchemaError, UnknownRelationError
from factlab.data.lre import Relation, Sample
from factlab.errors import NonFiniteError, SiteError
from factlab.lre import (
    LRE,
    EvalSettings,
    KnownFilter,
    TooFewKnownError,
    attribute_lens,
    causality,
    compute_states,
    edit_pairs,
    evaluate_relation,
    faithfulness,
    filter_known,
    fit,
    icl_prompt,
    is_nontrivial_prefix,
    jacobian,
    jacobian_reference,
    paper_split,
    recall_at_k,
    require_known,
    query_prompt,
)
from factlab.models.tiny import tiny_model

from .toys import identity_above, own_relation

PROMPT = "The capital city of Canada is Ottawa\nThe capital city of Italy is"


@pytest.fixture(scope="module")
def tiny64():
    """Tiny llama and mamba in float64 (for finite differences)."""
    out = {}
    for fam in ("llama", "mamba"):
        lm = tiny_model(fam)
        lm.model.double()
        out[fam] = lm
    return out


# ----------------------------------------------------------------------------- Jacobians
@pytest.mark.parametrize("family", ["gpt2", "gptj", "gpt_neox", "llama", "gemma3", "mamba"])
def test_fast_jacobian_equals_plain_reference(tiny_models, family):
    lm = tiny_models[family]
    for layer in ("emb", 0, 1):
        ref = jacobian_reference(lm, PROMPT, "Italy", layer)
        got = jacobian(lm, [PROMPT], ["Italy"], layer, chunk=7)
        assert got.weight.shape == (1, lm.adapter.d_model, lm.adapter.d_model)
        assert torch.allclose(got.weight[0], ref, atol=1e-5, rtol=1e-4), (family, layer)


def test_both_fast_paths_agree(tiny_models):
    lm = tiny_models["llama"]
    a = jacobian(lm, [PROMPT], ["Italy"], 1, use_cache=True, chunk=16)
    b = jacobian(lm, [PROMPT], ["Italy"], 1, use_cache=False, chunk=5)
    assert torch.allclose(a.weight, b.weight, atol=1e-6)
    assert torch.allclose(a.z, b.z, atol=1e-5) and torch.allclose(a.h, b.h, atol=1e-6)


@pytest.mark.parametrize("family", ["llama", "mamba"])
def test_jacobian_equals_finite_differences(tiny64, family):
    lm = tiny64[family]
    layer = 0
    J = jacobian(lm, [PROMPT], ["Italy"], layer, chunk=9)
    h0 = J.h[0].double()
    from factlab.interventions import capture, patch
    from factlab.lre.states import subject_index

    batch = lm.encode(PROMPT)
    p = subject_index(lm, PROMPT, "Italy")

    def z_of(h):
        with torch.no_grad(), patch(lm, {f"layer.{layer}.resid": h[None, None]}, positions=[p]), capture(
            lm, [f"layer.{lm.adapter.n_layers - 1}.resid"], positions=[-1]
        ) as acts:
            lm.forward(batch)
        return acts[f"layer.{lm.adapter.n_layers - 1}.resid"][0, -1]

    # central differences with eps=1e-3 (truncation ~eps^2): smaller steps hit the float32 inside HF's
    # RMSNorm, which upcasts/downcasts to float32 even for a float64 model
    eps = 1e-3
    cols = []
    for j in range(h0.shape[0]):
        e = torch.zeros_like(h0)
        e[j] = eps
        cols.append((z_of(h0 + e) - z_of(h0 - e)) / (2 * eps))
    fd = torch.stack(cols, 1).float()
    assert torch.allclose(J.weight[0], fd, atol=1e-5, rtol=1e-4)
    assert torch.allclose(J.z[0].double(), z_of(h0), atol=1e-5)


def test_non_finite_jacobian_is_an_error():
    lm = tiny_model("llama")
    with torch.no_grad():
        lm.model.model.layers[2].mlp.down_proj.weight[0, 0] = float("inf")
    with pytest.raises(NonFiniteError, match="NaN/inf"):
        jacobian(lm, [PROMPT], ["Italy"], 0)


# ----------------------------------------------------------------------------- prompts, prefix rule, split, filter
def test_icl_prompt_and_prefix_rule():
    ex = [Sample("Canada", "Ottawa"), Sample("Italy", "Rome")]
    assert icl_prompt("The capital of {} is", "Italy", ex, prefix="<s>") == "<s>The capital of Canada is Ottawa\nThe capital of Italy is"
    assert is_nontrivial_prefix(" Ott", "Ottawa") and is_nontrivial_prefix("OTTAWA", "Ottawa")
    assert not is_nontrivial_prefix(" ", "Ottawa") and not is_nontrivial_prefix("", "Ottawa") and not is_nontrivial_prefix("Rome", "Ottawa")
    assert not is_nontrivial_prefix("Ottawas", "Ottawa")
    assert recall_at_k([["x", " Ott"], [" ", "R"], ["Par", "y"]], ["Ottawa", "Rome", "Paris"]) == [1 / 3, 1.0]
    with pytest.raises(ValueError, match="no '\\{\\}'"):
        icl_prompt("no slot", "x")


def test_paper_split_round_robin_over_objects():
    samples = [Sample(f"s{i}", "A") for i in range(6)] + [Sample("t1", "B"), Sample("t2", "C")]
    train, rest = paper_split(samples, 3, seed=1)
    assert {s.object for s in train} == {"A", "B", "C"}
    assert len(rest) == 5 and not set(map(id, train)) & set(map(id, rest))
    assert paper_split(samples, 3, seed=1) == (train, rest)


def test_known_filter_on_hand_made_relation(tiny_models):
    lm = identity_above("llama")
    rel = own_relation(lm)
    wrong = Sample(rel.samples[0].subject + "x", "zzzz-never")
    mixed = Relation("mixed", "toy", ["{}"], samples=list(rel.samples) + [wrong])
    kf = filter_known(lm, mixed, n_icl=3, n_trials=2, prefix="")
    assert wrong in kf.unknown and set(kf.known) == set(rel.samples)
    assert KnownFilter.from_dict(json.loads(json.dumps(kf.to_dict()))).known == kf.known
    with pytest.raises(TooFewKnownError, match="knows only"):
        require_known(kf, 1000)


# ----------------------------------------------------------------------------- exact affine toy
@pytest.mark.parametrize("family", ["llama", "mamba"])
def test_affine_toy_lre_is_exact(family):
    lm = identity_above(family)
    rel = own_relation(lm)
    train, test = rel.samples[:5], rel.samples[5:]
    op = fit(lm, rel, layer=0, train=train, prefix="")
    assert torch.allclose(op.weight, torch.eye(op.d), atol=1e-5) and op.bias.abs().max() < 1e-4
    prompts = [query_prompt(op, s.subject) for s in test]
    st = compute_states(lm, prompts, [s.subject for s in test], [0])
    f = faithfulness(lm, op, st.h[0], [s.object for s in test])
    assert f.recall[0] == 1.0
    pairs = edit_pairs(test, seed=0)
    c = causality(lm, op.with_(edit_rank=op.d), prompts, [s.subject for s in test], [s.object for s in test], st.h[0], st.z, pairs)
    assert c.efficacy == 1.0 and len(c.success) == len(pairs) > 5


def test_evaluate_pipeline_on_affine_toy(tmp_path, monkeypatch):
    monkeypatch.setenv("FACTLAB_CACHE", str(tmp_path / "cache"))
    lm = identity_above("llama")
    rel = own_relation(lm)
    r = evaluate_relation(lm, rel, EvalSettings(trials=1, min_known=10, prefix="", betas=[0.0, 1.0, 2.0], ranks=[4, 48]))
    assert r.status == "ok" and r.n_known == len(rel.samples)
    assert r.faithfulness["lre"]["mean"] == 1.0 and r.causality["lre"]["mean"] == 1.0
    tr = r.trials[0]
    assert tr["beta"] > 0 and tr["rank"] == 48 and tr["layer"] in (0, 1)
    # cached sweep: a second run reads it
    assert list((tmp_path / "cache" / "lre" / "sweeps").rglob("*.json"))
    too_few = Relation("few", "toy", ["{}"], samples=list(rel.samples[:8]))
    assert evaluate_relation(lm, too_few, EvalSettings(trials=1, min_known=10, prefix="")).status == "too few known"


def test_sweep_operators_equal_a_fresh_fit(tiny_models, tmp_path, monkeypatch):
    """The evaluation reuses the sweep's fitted operators: they must equal fitting the same layer again."""
    from factlab.lre.sweep import sweep

    monkeypatch.setenv("FACTLAB_CACHE", str(tmp_path / "cache"))
    lm = tiny_models["llama"]
    rel = Relation("r", "toy", ["The capital city of {} is"], samples=[Sample(s, o) for s, o in
                   [("Canada", "Ottawa"), ("Italy", "Rome"), ("Japan", "Tokyo"), ("Brazil", "Brasília"), ("France", "Paris"),
                    ("Spain", "Madrid"), ("Peru", "Lima"), ("Kenya", "Nairobi"), ("Chile", "Santiago"), ("Egypt", "Cairo")]])
    sw = sweep(lm, rel, rel.samples, seed=1, n_train=3, layers=[0, 1], betas=[1.0, 2.0], ranks=[4, 8], prefix="")
    for layer in (0, 1):
        fresh = fit(lm, rel, layer=layer, train=sw.split.train, beta=2.0, prefix="")
        reused = sw.operator(layer, beta=2.0)
        assert torch.equal(reused.weight, fresh.weight) and torch.equal(reused.bias, fresh.bias)
        assert reused.beta == fresh.beta == 2.0 and reused.train == fresh.train and reused.layer == fresh.layer
    cached = sweep(lm, rel, rel.samples, seed=1, n_train=3, layers=[0, 1], betas=[1.0, 2.0], ranks=[4, 8], prefix="")
    assert cached.operator(0) is None and cached.layer == sw.layer  # read from the cache: no operators kept


# ----------------------------------------------------------------------------- LRE object
def test_fit_deterministic_and_save_load_roundtrip(tiny_models, tmp_path):
    lm = tiny_models["gpt2"]
    rel = Relation("r", "toy", ["The capital city of {} is"], samples=[Sample(s, o) for s, o in
                   [("Canada", "Ottawa"), ("Italy", "Rome"), ("Japan", "Tokyo"), ("Brazil", "Brasília"), ("France", "Paris"), ("Spain", "Madrid")]])
    a = fit(lm, rel, layer=1, n_train=3, seed=4, beta=2.0, rank=10)
    b = fit(lm, rel, layer=1, n_train=3, seed=4, beta=2.0, rank=10)
    assert torch.equal(a.weight, b.weight) and torch.equal(a.bias, b.bias) and a.train == b.train
    path = a.save(tmp_path / "op")
    c = LRE.load(path)
    h = torch.randn(7, lm.adapter.d_model)
    assert torch.equal(a.predict(h), c.predict(h)) and c.train == a.train and c.layer == 1 and c.rank == 10
    assert torch.allclose(a.predict(h), 2.0 * h @ a.effective_weight().T + a.bias, atol=1e-6)
    assert torch.linalg.matrix_rank(a.effective_weight()) <= 10
    with pytest.raises(FileNotFoundError):
        LRE.load(tmp_path / "missing")


def test_bad_layer_and_relation_errors(tiny_models, tmp_path):
    lm = tiny_models["llama"]
    rel = Relation("r", "toy", ["{} is"], samples=[Sample("a", "b")] * 3)
    with pytest.raises(SiteError, match="outside this model"):
        fit(lm, rel, layer=7, train=rel.samples)
    with pytest.raises(UnknownRelationError, match="country_capital_city"):
        load_relation("no such relation")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"name": "x", "samples": []}))
    with pytest.raises(SchemaError, match="prompt_templates"):
        load_relation(bad)
    with pytest.raises(TooFewKnownError):
        filter_known(lm, rel)


# ----------------------------------------------------------------------------- attribute lens
def test_lens_without_lre_is_the_logit_lens(tiny_models, tmp_path):
    lm = tiny_models["mamba"]
    grid = attribute_lens(lm, PROMPT)
    T = lm.encode(PROMPT).width
    assert len(grid.layers) == lm.adapter.n_layers + 1 and len(grid.top[0]) == T
    assert grid.top[-1][-1] == lm.predict(PROMPT, top_k=1)[0][0].token
    assert math.isclose(grid.prob[-1][-1], lm.predict(PROMPT, top_k=1)[0][0].prob, rel_tol=1e-4)
    op = LRE(2 * torch.eye(lm.adapter.d_model), torch.zeros(lm.adapter.d_model), 0, relation="r")
    g2 = attribute_lens(lm, PROMPT, op, target="Rome")
    assert g2.target_prob is not None and g2.operator.startswith("lre r")
    assert grid.plot(tmp_path / "g.png").stat().st_size > 1000 and g2.plot(tmp_path / "g.svg").exists()


# ----------------------------------------------------------------------------- real model
@pytest.mark.slow
def test_smollm2_fast_jacobian_matches_reference(smollm2):
    prompt = "The capital city of Canada is Ottawa\nThe capital city of Japan is"
    layer = smollm2.adapter.n_layers - 3
    ref = jacobian_reference(smollm2, prompt, "Japan", layer)
    got = jacobian(smollm2, [prompt], ["Japan"], layer)
    assert (got.weight[0] - ref).abs().max() < 1e-4


def test_wilson_interval_and_ci_choice():
    """One trial: the CI is over test samples (Wilson; 8/10 -> [0.490, 0.943]); two or more: over trials."""
    from factlab.confidence import proportion_ci
    from factlab.lre.evaluate import summarise

    e = proportion_ci([1] * 8 + [0] * 2)
    assert e.mean == 0.8 and abs(e.low - 0.4902) < 1e-3 and abs(e.high - 0.9433) < 1e-3 and e.n == 10
    allright = proportion_ci([True] * 5)
    assert allright.high == 1.0 and allright.low < 0.6  # not the collapsed [1, 1] of the normal approximation
    one = summarise([0.8], [True] * 8 + [False] * 2)
    assert one["over"] == "samples" and one["mean"] == 0.8 and one["n"] == 10 and abs(one["low"] - 0.4902) < 1e-3
    two = summarise([0.8, 0.6], [True] * 14 + [False] * 6)
    assert two["over"] == "trials" and two["n"] == 2 and two["samples"]["n"] == 20 and two["mean"] == 0.7


def test_known_cell_says_how_many_were_tested():
    from factlab.lre.evaluate import RelationResult

    r = RelationResult("r", "factual", 821, 3, "too few known", n_tested=80)
    assert r.known_cell() == "3/80 (of 821)"
    old = RelationResult("r", "factual", 24, 19, "ok", message="19 of 24 tested samples known")  # written before n_tested
    assert old.known_cell() == "19/24"


def test_category_means_leave_out_undefined_causality():
    from factlab.lre.evaluate import RelationResult, category_means

    def row(name, f, c):
        e = lambda v: {"mean": v, "low": v, "high": v, "n": 3 if v == v else 0}  # noqa: E731
        return RelationResult(name, "factual", 10, 10, "ok", faithfulness={m: e(f) for m in ("lre", "identity", "translation", "lre_emb", "learned_linear", "lm")},
                              causality={m: e(c) for m in ("lre", "insert_subject")})

    cm = category_means([row("a", 0.5, 0.8), row("b", 1.0, float("nan"))])["factual"]
    assert cm["n_relations"] == 2 and cm["F lre"] == 0.75 and cm["C lre"] == 0.8
