"""One real ROME edit on SmolLM2-135M (slow): the new target wins, an unrelated fact stays, restore is exact."""

from __future__ import annotations

import pytest
import torch

from .edit_helpers import same_weights, snapshot
from factlab.edit import Request, edit

pytestmark = pytest.mark.slow


def test_rome_eiffel_tower_to_rome(smollm2):
    lm = smollm2
    snap = snapshot(lm)
    prompt = "The Eiffel Tower is located in the city of"
    other = "The capital of Japan is the city of"
    rome_id, paris_id = lm.tokenizer(" Rome")["input_ids"][0], lm.tokenizer(" Paris")["input_ids"][0]
    before = lm.next_token_probs([prompt, other])
    alone = lm.next_token_probs([prompt])  # compared after restore with the same batch shape (kernels differ by shape)
    assert before[0, paris_id] > before[0, rome_id]
    # small statistics and templates keep this under a minute on two CPU cores (computed once, then cached)
    hp = {"stats_samples": 60, "context": ((5, 3), (10, 3)), "v_steps": 12}
    res = edit(lm, Request("{} is located in the city of", "The Eiffel Tower", " Rome", " Paris"), hparams=hp)
    try:
        after = lm.next_token_probs([prompt, other])
        assert after[0, rome_id] > after[0, paris_id]
        assert after[1].argmax() == before[1].argmax()
        assert res.metadata["values"][0]["prob_after"] > 0.5
    finally:
        res.restore()
    assert same_weights(lm, snap)
    assert torch.equal(lm.next_token_probs([prompt]), alone)
