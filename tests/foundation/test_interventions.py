"""Hooks are scoped, positions select the right tokens, attention blocking equals a manual masked computation."""

from __future__ import annotations

import pytest
import torch

from factlab import interventions as iv


def _n_hooks(model) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_hooks_are_removed_after_an_exception(tiny_models):
    lm = tiny_models["llama"]
    before = _n_hooks(lm.model)
    with pytest.raises(RuntimeError, match="boom"):
        with iv.capture(lm, ["layer.0.resid", "layer.1.mlp.key"]), iv.patch(lm, {"layer.2.attn.out": lambda v: v}):
            assert _n_hooks(lm.model) > before
            raise RuntimeError("boom")
    assert _n_hooks(lm.model) == before


def test_attention_context_restores_implementation_on_exception(tiny_models):
    lm = tiny_models["gpt_neox"]
    impl = lm.model.config._attn_implementation
    with pytest.raises(ValueError):
        with iv.attention(lm, record=True):
            raise ValueError
    assert lm.model.config._attn_implementation == impl
    assert not any(hasattr(m, "_factlab_attention") for m in lm.model.modules())


def test_positions_select_and_write(tiny_models):
    lm = tiny_models["gpt2"]
    b = lm.encode(["a b c d e", "x y"])
    with torch.no_grad(), iv.capture(lm, ["layer.1.resid"]) as full:
        lm.forward(b)
    with torch.no_grad(), iv.capture(lm, ["layer.1.resid"], positions=[-1, 2]) as part:
        lm.forward(b)
    torch.testing.assert_close(part["layer.1.resid"], full["layer.1.resid"][:, [-1, 2]])
    per_row = torch.tensor([[b.position(0, 0)], [b.position(1, 0)]])
    with torch.no_grad(), iv.capture(lm, ["layer.1.resid"], positions=per_row) as rows:
        lm.forward(b)
    torch.testing.assert_close(rows["layer.1.resid"][:, 0], full["layer.1.resid"][[0, 1], per_row[:, 0]])


def test_patch_at_positions_changes_only_later_positions(tiny_models):
    lm = tiny_models["llama"]
    b = lm.encode(["The Eiffel Tower is in Paris"])
    pos = 3
    with torch.no_grad():
        ref = lm.forward(b)
        with iv.patch(lm, {"layer.0.resid": torch.zeros(lm.adapter.d_model)}, positions=[pos]):
            out = lm.forward(b)
    assert torch.equal(out[:, :pos], ref[:, :pos])
    assert not torch.allclose(out[:, pos:], ref[:, pos:])


def test_stop_early_skips_later_layers(tiny_models):
    lm = tiny_models["llama"]
    b = lm.encode(["hello there"])
    calls = []
    with iv.hooks(lm, {"layer.2.resid": lambda v: calls.append(1)}):
        acts = iv.run_and_capture(lm, b, ["layer.0.mlp.key"], stop_early=True)
    assert acts["layer.0.mlp.key"].shape[-1] == lm.adapter.d_mlp
    assert calls == []


def test_resume_from_equals_full_forward(tiny_lm):
    b = tiny_lm.encode(["The capital of Japan is", "Tokyo"])
    with torch.no_grad(), iv.capture(tiny_lm, ["layer.0.resid"]) as a:
        ref = tiny_lm.forward(b)
    with torch.no_grad(), iv.resume_from(tiny_lm, 1, a["layer.0.resid"]):
        out = tiny_lm.forward(b)
    assert torch.equal(out, ref)
    assert all(type(m).__name__ != "_Skip" for m in tiny_lm.adapter.layers(tiny_lm.model))


def test_gradients_flow_through_patch_functions(tiny_models):
    lm = tiny_models["llama"]
    b = lm.encode(["The capital of Japan is"])
    delta = torch.zeros(lm.adapter.d_model, requires_grad=True)
    with iv.patch(lm, {"layer.1.mlp.out": lambda v: iv.write(v, iv.select(v, [-2]) + delta, [-2])}):
        loss = lm.forward(b)[0, -1].logsumexp(-1)
    loss.backward()
    assert delta.grad is not None and delta.grad.abs().sum() > 0


@pytest.mark.parametrize("family", ["gpt2", "gptj", "gpt_neox", "llama", "gemma3"])
def test_attention_block_matches_manual_masked_attention(tiny_models, family):
    """Blocking last->first edges in one layer removes exactly those edges and renormalises the rest.

    Layer 2 is used because the tiny Gemma's layers 0-1 use a sliding window that already hides the
    first tokens from the last query."""
    lm = tiny_models[family]
    b = lm.encode(["The Eiffel Tower is in the city of"])
    T = b.width
    block = torch.zeros(1, 1, T, T, dtype=torch.bool)
    block[..., -1, :3] = True
    with torch.no_grad(), iv.attention(lm, layers=[2], record=True) as clean:
        ref = lm.forward(b)
    with torch.no_grad(), iv.attention(lm, layers=[2], block=block, record=True) as rec:
        out = lm.forward(b)
    p_clean, p = clean.patterns[2], rec.patterns[2]
    # the blocked edges carry no weight; the other edges of that query renormalise the clean scores
    assert torch.all(p[..., -1, :3] == 0)
    expected = p_clean[..., -1, 3:] / p_clean[..., -1, 3:].sum(-1, keepdim=True)
    torch.testing.assert_close(p[..., -1, 3:], expected, rtol=1e-5, atol=1e-6)
    # earlier queries are untouched, and only the last position's output changes
    torch.testing.assert_close(p[..., :-1, :], p_clean[..., :-1, :])
    torch.testing.assert_close(out[:, :-1], ref[:, :-1])
    assert not torch.allclose(out[:, -1], ref[:, -1])


def test_attention_on_mamba_is_a_clear_error(tiny_models):
    with pytest.raises(ValueError, match="no attention"):
        with iv.attention(tiny_models["mamba"]):
            pass


def test_cache_kwargs_names_the_argument_forward_takes(tiny_models):
    """transformers >= 5.24 takes ``cache=``, older releases ``past_key_values=``; both pass the same cache."""
    import inspect

    from factlab.models.kv_cache import cache_kwargs, returned_cache

    lm = tiny_models["llama"]
    kw = cache_kwargs(lm.model, "C")
    (name,) = [k for k in kw if k != "use_cache"]
    assert name in inspect.signature(type(lm.model).forward).parameters and kw["use_cache"] is True
    batch = lm.encode(["The Eiffel Tower is in"])
    out = lm.model(input_ids=batch.input_ids, use_cache=True)
    assert returned_cache(out) is not None
    full = lm.model(input_ids=batch.input_ids).logits[:, -1]
    prefix = lm.model(input_ids=batch.input_ids[:, :-1], use_cache=True)
    step = lm.model(input_ids=batch.input_ids[:, -1:], **cache_kwargs(lm.model, returned_cache(prefix))).logits[:, -1]
    torch.testing.assert_close(step, full, rtol=1e-5, atol=1e-5)
