"""Subject spans and padding."""

from __future__ import annotations

import pytest
import torch

from factlab.errors import SubjectNotFoundError
from factlab.prompts import continuation_ids, encode, find_subject, subject_span


def _span_text(tok, prompt, span):
    ids = tok(prompt)["input_ids"]
    return tok.decode(ids[span[0] : span[1]])


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_subject_span_leading_space_and_repeats(tiny_models, family):
    tok = tiny_models[family].tokenizer
    p = "Paris is where the Eiffel Tower stands; the Eiffel Tower is tall"
    last = subject_span(tok, p, "Eiffel Tower")
    first = subject_span(tok, p, "Eiffel Tower", occurrence=0)
    assert first[0] < last[0]
    assert "Eiffel Tower" in _span_text(tok, p, last).strip()
    assert _span_text(tok, p, last).strip() == "Eiffel Tower"
    # a subject given with its leading space finds the same tokens
    assert subject_span(tok, p, " Eiffel Tower") == last


def test_subject_span_unicode(tiny_models):
    tok = tiny_models["gpt2"].tokenizer
    p = "Café Müller in Zürich serves crème brûlée"
    s = subject_span(tok, p, "Zürich")
    assert _span_text(tok, p, s).strip() == "Zürich"


def test_subject_span_with_bos(smollm2_tokenizer_like):
    tok = smollm2_tokenizer_like
    p = "The Eiffel Tower is located in"
    s = subject_span(tok, p, "Eiffel Tower")
    ids = tok(p)["input_ids"]
    assert tok.decode(ids[s[0] : s[1]]).strip() == "Eiffel Tower"


@pytest.fixture
def smollm2_tokenizer_like(tiny_models):
    """A tokenizer that adds a BOS token, to check spans count special tokens."""
    from transformers import PreTrainedTokenizerFast
    from tokenizers.processors import TemplateProcessing

    base = tiny_models["gpt2"].tokenizer
    tok = PreTrainedTokenizerFast(tokenizer_object=base.backend_tokenizer.__class__.from_str(base.backend_tokenizer.to_str()))
    tok.bos_token = "<|endoftext|>"
    tok.backend_tokenizer.post_processor = TemplateProcessing(
        single="<|endoftext|> $A", special_tokens=[("<|endoftext|>", tok.convert_tokens_to_ids("<|endoftext|>"))]
    )
    assert tok("a")["input_ids"][0] == tok.bos_token_id
    return tok


def test_absent_and_empty_subject():
    with pytest.raises(SubjectNotFoundError, match="not in the prompt"):
        find_subject("The Eiffel Tower is in Paris", "Colosseum")
    with pytest.raises(SubjectNotFoundError, match="empty"):
        find_subject("The Eiffel Tower", "  ")
    with pytest.raises(SubjectNotFoundError, match="occurs 1 time"):
        find_subject("The Eiffel Tower", "Eiffel", occurrence=3)


def test_continuation_ids_in_context(tiny_models):
    tok = tiny_models["gpt2"].tokenizer
    ids = continuation_ids(tok, "The capital of France is", " Paris")
    assert tok.decode(ids) == " Paris"
    with pytest.raises(ValueError, match="empty"):
        continuation_ids(tok, "x", " ")


@pytest.mark.parametrize("side", ["left", "right"])
def test_padding_gives_the_same_next_token_distribution(tiny_lm, side):
    """Alone vs inside a padded batch: same next-token distribution (atol 1e-5 on probabilities)."""
    prompts = ["The Eiffel Tower is located in the city of", "Hi", "The capital of Japan is"]
    with torch.no_grad():
        alone = [tiny_lm.forward(tiny_lm.encode([p]))[0, -1].softmax(-1) for p in prompts]
        b = encode(tiny_lm.tokenizer, prompts, padding_side=side)
        logits = tiny_lm.forward(b)
    for i in range(len(prompts)):
        got = logits[i, b.position(i, -1)].softmax(-1)
        torch.testing.assert_close(got, alone[i], rtol=0, atol=1e-5)


def test_special_prefix_and_text_windows_start_with_bos(smollm2_tokenizer_like, tiny_models, monkeypatch, tmp_path):
    """The BOS a tokenizer adds by itself is found (and nothing for GPT-2's), and corpus windows for
    perplexity start with it, as the stats chunks do."""
    from factlab.mechanisms.mitigation import text_windows
    from factlab.prompts import special_prefix

    tok = smollm2_tokenizer_like
    assert special_prefix(tok) == [tok.bos_token_id]
    assert special_prefix(tiny_models["gpt2"].tokenizer) == []
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("the cat sat on the mat and then it went home again\n" * 40)
    lm = tiny_models["gpt2"]
    monkeypatch.setattr(lm, "tokenizer", tok)
    rows = torch.cat([b.input_ids for b in text_windows(lm, str(corpus), n_windows=3, length=16)])
    assert rows.shape == (3, 16) and (rows[:, 0] == tok.bos_token_id).all()
    assert (rows[:, 1:] != tok.bos_token_id).all()
