"""Stabilisers of the value optimisation against plain reference computations: ENCORE's most-probable
early stopping (``early_stop="top1"``)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from .edit_helpers import TINY_HP
from factlab.edit import EditError, Request, resolve_hparams
from factlab.edit.context import context_templates
from factlab.edit.value_cache import ValueCache
from factlab.edit.values import optimise_values
from factlab.interventions import patch
from factlab.prompts import continuation_ids, subject_span

REQ = Request("{} is located in the city of", "The big tower", " Rome")


def _plain_all_top1(lm, req: Request, templates: list[str], site: str, delta: torch.Tensor) -> bool:
    """Whether every target token is the argmax on every context-prefixed prompt (templates[1:]), by one
    full forward per prompt with ``delta`` added at ``site`` at the subject's last token."""
    for t in templates[1:]:
        text = t.replace("{}", req.filled)
        ids = continuation_ids(lm.tokenizer, text, req.target_new)
        prompt_ids = lm.tokenizer(text)["input_ids"]
        batch = lm.encode([lm.tokenizer.decode(prompt_ids + ids[:-1])])
        assert batch.input_ids[0].tolist() == prompt_ids + ids[:-1]
        pos = batch.position(0, subject_span(lm.tokenizer, text, req.subject)[1] - 1)

        def add(v, pos=pos):
            v = v.clone()
            v[0, pos] += delta.to(v.dtype)
            return v

        with torch.no_grad(), patch(lm, {site: add}):
            pred = lm.forward(batch)[0].argmax(-1)
        n = len(prompt_ids)
        if any(int(pred[n - 1 + j]) != tok for j, tok in enumerate(ids)):
            return False
    return True


def _reference_stop(lm, req, templates, site, layer, hp, count: int) -> tuple[int, torch.Tensor]:
    """The stopping step and delta of a plain loop: after each step s (s - 1 updates, the loss rule off),
    check the top-1 on the prefixed prompts; stop at the ``count``-th step where it holds."""
    hits = 0
    for s in range(1, hp.v_steps + 1):
        delta = optimise_values(lm, [req], site=site, layer=layer, templates=templates, hp=hp.replace(v_steps=s)).delta[0]
        hits += _plain_all_top1(lm, req, templates, site, delta)
        if hits == count:
            return s, delta
    raise AssertionError("the target never became the top-1 within v_steps; the test needs a setting that reaches it")


#: small templates and statistics: the SmolLM2 tests stay within a minute on two cores
SMOL_HP = {"context": ((5, 3), (10, 3)), "v_steps": 12}


@pytest.mark.slow
@pytest.mark.parametrize("count", [1, 2])
def test_top1_early_stop_matches_plain_loop(smollm2, tiny_env, count):
    """Same stopping step and bit-identical delta as a plain loop that checks the top-1 by full forwards.
    (Tiny random models never make a target the top-1, so this needs the real model.)"""
    lm = smollm2
    # early_stop_loss 0: the loss (>= 0) never stops a request, so only the top-1 rule can
    hp = resolve_hparams(lm, "rome", {**SMOL_HP, "early_stop_loss": 0.0})
    layer = hp.layers[0]
    site, t = lm.adapter.projection(layer).out_site, context_templates(lm, hp.context)
    req = Request("{} is located in the city of", "The Eiffel Tower", " Rome")
    want_step, want_delta = _reference_stop(lm, req, t, site, layer, hp, count)
    got = optimise_values(lm, [req], site=site, layer=layer, templates=t, hp=hp.replace(early_stop="top1", top1_count=count))
    assert got.steps == [want_step]
    assert want_step < hp.v_steps  # it did stop early
    assert torch.equal(got.delta[0], want_delta)


@pytest.mark.slow
def test_top1_keeps_the_loss_rule_and_batches_as_alone(smollm2, tiny_env):
    """With both rules on, each request stops no later than under the loss rule alone, together as alone."""
    lm = smollm2
    reqs = [Request("{} is located in the city of", "The Eiffel Tower", " Rome"), Request("{} plays the", "Miles Davis", " violin")]
    hp = resolve_hparams(lm, "rome", {**SMOL_HP, "early_stop": "top1"})
    layer = hp.layers[0]
    site, t = lm.adapter.projection(layer).out_site, context_templates(lm, hp.context)
    together = optimise_values(lm, reqs, site=site, layer=layer, templates=t, hp=hp)
    earlier = 0
    for i, r in enumerate(reqs):
        alone = optimise_values(lm, [r], site=site, layer=layer, templates=t, hp=hp)
        loss_only = optimise_values(lm, [r], site=site, layer=layer, templates=t, hp=hp.replace(early_stop="loss"))
        assert together.steps[i] == alone.steps[0] <= loss_only.steps[0]
        earlier += alone.steps[0] < loss_only.steps[0]
        # batching pads differently: equal up to float rounding
        assert (together.delta[i] - alone.delta[0]).norm() <= 1e-4 * alone.delta[0].norm()
    assert earlier > 0


def test_all_top1_matches_a_plain_count():
    """The per-request top-1 test against a loop over requests and prompts (synthetic plan)."""
    from factlab.edit.values import _all_top1

    g = torch.Generator().manual_seed(0)
    for _ in range(50):
        n, m = 3, 12
        req = torch.randint(0, n, (m,), generator=g)
        pre = torch.rand(m, generator=g) < 0.7
        tok = torch.randint(0, 4, (m,), generator=g)
        pred = torch.where(torch.rand(m, generator=g) < 0.8, tok, (tok + 1) % 4)
        sel = torch.rand(m, generator=g) < 0.8
        plan = SimpleNamespace(t_req=req, t_prefixed=pre, t_tok=tok)
        got = _all_top1(plan, sel, pred[sel], n)
        for j in range(n):
            idx = [i for i in range(m) if sel[i] and pre[i] and req[i] == j]
            assert bool(got[j]) == (bool(idx) and all(int(pred[i]) == int(tok[i]) for i in idx))


def test_top1_needs_prefixed_prompts_and_valid_fields(tiny_models, tiny_env):
    lm = tiny_models["gpt2"]
    hp = resolve_hparams(lm, "rome", {**TINY_HP, "layers": (1,), "early_stop": "top1"})
    with pytest.raises(EditError, match="context-prefixed"):
        optimise_values(lm, [REQ], site=lm.adapter.projection(1).out_site, layer=1, templates=["{}"], hp=hp)
    with pytest.raises(EditError, match="early_stop"):
        hp.replace(early_stop="prob")
    with pytest.raises(EditError, match="top1_count"):
        hp.replace(top1_count=0)


def test_value_cache_key_sees_the_switch_only_when_set(tiny_models, tiny_env, tmp_path):
    lm = tiny_models["gpt2"]
    hp = resolve_hparams(lm, "rome", {**TINY_HP, "layers": (1,)})
    cache, t = ValueCache(tmp_path), ["{}", "A. {}"]
    key = lambda h: cache.key(lm, "layer.1.resid", 1, t, h, REQ)  # noqa: E731
    assert key(hp) == key(hp.replace(top1_count=3))  # top1_count is unused under the loss rule
    assert len({key(hp), key(hp.replace(early_stop="top1")), key(hp.replace(early_stop="top1", top1_count=2))}) == 3
