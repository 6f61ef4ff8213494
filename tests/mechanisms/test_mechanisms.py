"""Mechanisms of recall: exactness of the decompositions on tiny models of every family, bad input,
the mitigation's bit-exact restore, and the CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from factlab.interventions import run_and_capture
from factlab.mechanisms._common import AnswerNotSingleTokenError, MechanismError, NoHeadsError, answer_token, check_head
from factlab.mechanisms.contributions import decompose, direct_contributions
from factlab.mechanisms.dataset import FactCase, collect, split_cases
from factlab.mechanisms.lens import lens_logits, logit_lens
from factlab.models.tiny import FAMILY_NAMES

PROMPTS = ["The Eiffel Tower is located in the city of", "Toyota was founded in", "Miles Davis plays the"]
CASES = [
    FactCase("The Eiffel Tower is located in the city of", "Eiffel Tower", " Paris"),
    FactCase("Toyota was founded in", "Toyota", " Japan"),
    FactCase("Miles Davis plays the", "Miles Davis", " trumpet"),
    FactCase("The capital city of Canada is", "Canada", " Ottawa"),
]
HEADED = [f for f in FAMILY_NAMES if f != "mamba"]


def _last_logits(lm, prompts):
    with torch.no_grad():
        return lm.forward(lm.encode(prompts))[:, -1].double()


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_contributions_sum_to_model_logit(tiny_models, family):
    lm = tiny_models[family]
    dec = decompose(lm, PROMPTS)
    logits = _last_logits(lm, PROMPTS)
    ids = logits.argmax(-1)
    parts, const = dec.logit_parts(lm, ids)
    actual = logits[torch.arange(len(PROMPTS)), ids]
    assert torch.allclose(parts.sum(1) + const, actual, atol=1e-4, rtol=1e-4)
    assert float(dec.residual_error.max()) < 1e-5
    # the centred version sums to the logit minus the mean logit
    pc, cc = dec.logit_parts(lm, ids, centered=True)
    assert torch.allclose(pc.sum(1) + cc, actual - logits.mean(-1), atol=1e-4)
    kinds = set(dec.kinds)
    assert ("mixer" in kinds) == (family == "mamba") and ("head" in kinds) == (family != "mamba")


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_pos_embed_is_position_embedding_only_for_gpt2(tiny_models, family):
    lm = tiny_models[family]
    dec = decompose(lm, PROMPTS[:1])
    pos = dec.vectors[0, dec.names.index("pos_embed")]
    if family == "gpt2":
        T = lm.encode(PROMPTS[:1]).width
        wpe = lm.model.transformer.wpe.weight[T - 1].double()
        assert torch.allclose(pos, wpe, atol=1e-5)
    else:
        assert float(pos.abs().max()) < 1e-5


@pytest.mark.parametrize("family", HEADED)
def test_heads_through_slices_sum_to_attention_output(tiny_models, family):
    lm = tiny_models[family]
    L, H = lm.adapter.n_layers, lm.adapter.n_heads
    acts = run_and_capture(lm, lm.encode(PROMPTS), [s for i in range(L) for s in (f"layer.{i}.attn.heads", f"layer.{i}.attn.out")], stop_early=False)
    for i in range(L):
        proj = lm.adapter.projection(i, "attn")
        W = proj.weight(lm.model).double()
        heads = acts[f"layer.{i}.attn.heads"].double()  # (B, T, H, dh)
        dh = heads.shape[-1]
        total = sum(heads[..., h, :] @ W[:, h * dh : (h + 1) * dh].T for h in range(H))
        b = proj.bias(lm.model)
        if b is not None:
            total = total + b.double()
        assert torch.allclose(total, acts[f"layer.{i}.attn.out"].double(), atol=1e-5)


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_lens_last_layer_equals_model_logits(tiny_models, family):
    lm = tiny_models[family]
    ll = lens_logits(lm, PROMPTS)
    assert ll.shape[1] == lm.adapter.n_layers + 1
    assert torch.allclose(ll[:, -1].double(), _last_logits(lm, PROMPTS), atol=1e-5)
    res = logit_lens(lm, PROMPTS[0], " Paris")
    assert len(res.prob) == lm.adapter.n_layers + 1 and res.answer.truncated
    json.loads(res.to_json())


@pytest.mark.parametrize("family", [f for f in HEADED])
def test_mlp_decomposition_sums_to_mlp_output(tiny_models, family):
    from factlab.mechanisms.mlp_decomposition import decompose_mlp

    lm = tiny_models[family]
    for layer in range(lm.adapter.n_layers):
        md = decompose_mlp(lm, PROMPTS, layer)
        assert md.error < 1e-5 * max(1.0, float(md.actual.abs().max()))
        # the inputs are the parts upstream of this MLP: no part of this layer's MLP or of later layers
        assert all(not n.startswith(f"L{k}.") for k in range(layer + 1, lm.adapter.n_layers) for n in md.names)
        assert f"L{layer}.mlp" not in md.names


def test_mlp_decomposition_refuses_mamba(tiny_models):
    from factlab.mechanisms.mlp_decomposition import decompose_mlp

    with pytest.raises(MechanismError, match="no MLP"):
        decompose_mlp(tiny_models["mamba"], PROMPTS, 0)


def test_bad_input(tiny_models):
    lm = tiny_models["llama"]
    with pytest.raises(AnswerNotSingleTokenError, match="first token"):
        answer_token(lm, "The Eiffel Tower is in", " Paris", exact=True)
    with pytest.raises(AnswerNotSingleTokenError):
        direct_contributions(lm, "The Eiffel Tower is in", " Paris", exact=True)
    with pytest.raises(MechanismError, match="empty"):
        answer_token(lm, "x", "  ")
    with pytest.raises(MechanismError, match="head 99 is outside"):
        check_head(lm, 0, 99)
    with pytest.raises(MechanismError, match="layer 7 is outside"):
        check_head(lm, 7, 0)
    with pytest.raises(NoHeadsError, match="no"):
        check_head(tiny_models["mamba"], 0, 0)
    from factlab.mechanisms.heads import ablate_heads

    with pytest.raises(NoHeadsError):
        ablate_heads(tiny_models["mamba"], CASES, [(0, 0)])
    with pytest.raises(MechanismError, match="outside"):
        ablate_heads(lm, CASES, [(0, 50)])


def test_direct_contributions_result(tiny_models):
    lm = tiny_models["gemma3"]
    r = direct_contributions(lm, PROMPTS[0], " Paris", contrast=" Rome")
    assert r.error < 1e-4
    assert abs(r.constant_diff + sum(p.logit_diff for p in r.parts) - r.logit_diff_actual) < 1e-4
    assert abs(r.logit_actual - float(_last_logits(lm, PROMPTS[:1])[0, r.answer.token_id])) < 1e-4
    d = json.loads(r.to_json())
    assert d["by_layer"] and d["notes"]


@pytest.mark.parametrize("family", ["llama", "gpt2", "mamba"])
def test_collect_and_summaries(tiny_models, family, tmp_path):
    from factlab.mechanisms.dataset import FactStats

    lm = tiny_models[family]
    st = collect(lm, CASES + [FactCase("no subject here", "Zzyzx", " x")], batch_size=3)
    assert st.n == 4 and len(st.skipped) == 1
    assert st.max_sum_error < 1e-4
    assert st.lens_prob.shape == (4, lm.adapter.n_layers + 1)
    st.save(tmp_path)
    st2 = FactStats.load(tmp_path)
    assert np.array_equal(st2.dla, st.dla) and st2.names == st.names
    from factlab.mechanisms.overconfidence import overconfidence

    oc = overconfidence(lm, st)
    json.loads(oc.to_json())
    from factlab.mechanisms.overconfidence import suppression_on

    every = suppression_on(lm, st, np.ones(st.n, dtype=bool))
    assert every["n"] == st.n and every["final_layer_prob_change"]["mean"] == pytest.approx(oc.final_layer_prob_change.mean)
    assert every["mlp_dla_centered"]["mean"] == pytest.approx(oc.mlp_dla.mean)
    one = suppression_on(lm, st, np.arange(st.n) == 1)
    assert one["n"] == 1 and one["final_layer_prob_change"]["mean"] == pytest.approx(st.lens_prob[1, -1] - st.lens_prob[1, -2])
    if family == "mamba":
        from factlab.mechanisms.heads import argument_heads

        with pytest.raises(MechanismError, match="no attention heads"):
            argument_heads(st)
        assert oc.heads == []
    else:
        from factlab.mechanisms.heads import ablate_heads, argument_heads

        ah = argument_heads(st, top=3)
        assert len(ah) == 3
        assert np.all((st.attn_subject >= 0) & (st.attn_subject <= 1 + 1e-5))
        for mode in ("zero", "mean"):
            r = ablate_heads(lm, CASES, [(ah[0].layer, ah[0].head)], mode=mode)
            assert r.prob_before.shape == (4,) and r.control_after is not None


def test_frequency_counts_cached(tiny_models, tmp_path):
    from factlab.mechanisms.frequency import frequency_correlation, frequency_direction, unigram_counts

    lm = tiny_models["llama"]
    text = tmp_path / "corpus.txt"
    text.write_text("the cat sat on the mat.\n\nthe dog sat.\n")
    c = unigram_counts(lm, str(text), cache=tmp_path / "cache")
    ids = lm.tokenizer("the cat sat on the mat.", add_special_tokens=False)["input_ids"]
    assert c.total == len(ids) + len(lm.tokenizer("the dog sat.", add_special_tokens=False)["input_ids"])
    assert list((tmp_path / "cache").glob("*.npy"))
    c2 = unigram_counts(lm, str(text), cache=tmp_path / "cache")
    assert np.array_equal(c.counts, c2.counts)
    u = frequency_direction(lm, c)
    assert abs(float(u.norm()) - 1) < 1e-9
    fc = frequency_correlation(lm, "u", u, c)
    assert fc.pearson > 0


@pytest.mark.parametrize("family", ["llama", "gemma3", "gpt2"])
def test_mitigation_restores_bit_for_bit(tiny_models, family, tmp_path):
    from factlab.edit import EditResult
    from factlab.mechanisms.mitigation import Candidate, block_inputs, build_mitigation, fact_scores, output_space_direction, _batches

    lm = tiny_models[family]
    before = {k: v.clone() for k, v in lm.model.state_dict().items()}
    u = torch.randn(lm.adapter.d_model, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    dirs = {"frequency": {t: output_space_direction(lm, u, t) for t in ("attn", "mlp")}}
    bs, ids = _batches(lm, CASES, 2)
    inp = block_inputs(lm, bs, ids)
    edit = build_mitigation(lm, Candidate("frequency", "both", 1.0), dirs)
    try:
        changed = [k for k, v in lm.model.state_dict().items() if not torch.equal(v, before[k])]
        assert changed
        # the last block's outputs now have no component along the direction (after any post-norm)
        L = lm.adapter.n_layers
        acts = run_and_capture(lm, lm.encode(PROMPTS), [f"layer.{L - 1}.mlp.out"], stop_early=False)
        dm = dirs["frequency"]["mlp"].float()
        assert float((acts[f"layer.{L - 1}.mlp.out"] @ dm).abs().max()) < 1e-4
        # running only the last block on cached inputs equals the full forward with the edit applied
        c, p = fact_scores(lm, inp)
        full = torch.cat([_last_logits(lm, [x.prompt for x in CASES[i : i + 2]]) for i in range(0, 4, 2)]).softmax(-1)
        assert np.allclose(p, full[torch.arange(4), torch.cat(ids)].numpy(), atol=1e-5)
        edit.save(tmp_path / "m")
    finally:
        edit.restore()
    assert all(torch.equal(v, before[k]) for k, v in lm.model.state_dict().items())
    loaded = EditResult.load(tmp_path / "m", lm).apply()
    try:
        assert any(not torch.equal(v, before[k]) for k, v in lm.model.state_dict().items())
    finally:
        loaded.restore()
    assert all(torch.equal(v, before[k]) for k, v in lm.model.state_dict().items())


def test_split_is_disjoint_and_seeded():
    cases = [FactCase(f"p{i}", "p", " x") for i in range(10)]
    a, b = split_cases(cases, 0.4, seed=1)
    assert len(a) == 4 and len(b) == 6 and not set(a) & set(b)
    assert split_cases(cases, 0.4, seed=1) == (a, b)


def test_cli(tmp_path):
    from typer.testing import CliRunner

    from factlab.cli import app
    from factlab.models.tiny import save_tiny

    path = save_tiny("llama", tmp_path / "tiny")
    r = CliRunner().invoke(app, ["mechanisms", "The Eiffel Tower is in", "--answer", " Paris", "--model", str(path), "--out", str(tmp_path / "o"), "--json"])
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    assert d["contributions"]["max_error"] < 1e-4
    assert {p.name for p in (tmp_path / "o").iterdir()} >= {"lens.png", "contributions.png", "attention.png", "mechanisms.json"}
    r = CliRunner().invoke(app, ["mechanisms", "x y", "--model", str(path), "--out", str(tmp_path / "o2"), "--head", "0.99"])
    assert r.exit_code != 0 and "outside" in str(r.exception)


@pytest.mark.slow
def test_smollm2_contributions_exact(smollm2):
    prompt = "The Eiffel Tower is located in the city of"
    r = direct_contributions(smollm2, prompt, " Paris")
    assert r.answer.n_tokens == 1
    assert abs(r.logit_sum - float(_last_logits(smollm2, [prompt])[0, r.answer.token_id])) < 1e-3
    assert len([p for p in r.parts if p.kind == "head"]) == 30 * 9


@pytest.mark.parametrize("family", ["llama", "gemma3", "gpt2"])
def test_head_mitigation_equals_zeroing_the_head(tiny_models, family):
    """Removing a last-layer head at strength 1 gives the same logits as zeroing that head's input to the
    output projection (the ``attn.heads`` site) in the unedited model; the weights come back bit for bit."""
    from factlab.interventions import patch
    from factlab.mechanisms.mitigation import Candidate, build_mitigation, head_candidates

    lm = tiny_models[family]
    L, h = lm.adapter.n_layers, 1
    assert len(head_candidates(lm)) == 2 * lm.adapter.n_heads
    before = {k: v.clone() for k, v in lm.model.state_dict().items()}
    batch = lm.encode(PROMPTS)

    def zero_head(v):
        v = v.clone()
        v[..., h, :] = 0
        return v

    with torch.no_grad(), patch(lm, {f"layer.{L - 1}.attn.heads": zero_head}):
        want = lm.forward(batch)
    edit = build_mitigation(lm, Candidate("head", "attn", 1.0, h), {})
    try:
        with torch.no_grad():
            got = lm.forward(batch)
    finally:
        edit.restore()
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert all(torch.equal(v, before[k]) for k, v in lm.model.state_dict().items())
    with pytest.raises(MechanismError, match="outside"):
        build_mitigation(lm, Candidate("head", "attn", 1.0, lm.adapter.n_heads), {})
