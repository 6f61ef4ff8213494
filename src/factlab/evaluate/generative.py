"""Generative scoring: greedy decoding of each prompt, success when the (normalised) target appears.

This is *not* teacher forcing (:mod:`.scoring`). Teacher-forced metrics (ES/PS/NS, the ``*_exact_match``
and ``*_token_accuracy`` ones) feed the target's own tokens to the model and only ask whether each is
the argmax, which leaks the target's content and length ("The Mirage of Model Editing", Yang et al.
2025, arXiv 2502.11177: 96.8% reported vs 38.5% with live decoding). Here the model writes its own
continuation and we look for the target in it:

- **decoding**: greedy (argmax, no sampling, no temperature), batched with left padding and explicit
  position ids; with a KV cache where the adapter says HF's cache is exact
  (:attr:`Adapter.exact_kv_cache`), else one full forward per step;
- **budget**: ``max_new_tokens`` per prompt; the evaluators give the longer target's token length +
  :data:`EXTRA_TOKENS` (so the target fits, with a few tokens for a leading article or quote);
- **stop**: at the tokenizer's EOS and at the first newline (the text is cut there). A period is *not* a
  stop: targets such as "St. Louis" or "U.S." contain one, and the short budget already keeps the text
  to about one phrase;
- **match**: :func:`normalise` both texts (lowercase, words stripped of surrounding punctuation,
  whitespace collapsed); success when the target's words appear as consecutive whole words of the
  generated text (so "Rome" does not match "Romeo").
"""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass
from typing import Sequence

import torch

from factlab.errors import InputError, NonFiniteError
from factlab.models.kv_cache import cache_kwargs, returned_cache
from factlab.models.loading import LoadedModel
from factlab.prompts import continuation_ids, pad, pad_token_id, token_ids

#: tokens decoded beyond the target's own token length (see the module docstring)
EXTRA_TOKENS = 5
#: whether the CounterFact / zsRE evaluators add the ``gen_*`` metrics when the caller does not say
GENERATIVE_DEFAULT = True


def _strip_punct(word: str) -> str:
    """``word`` without leading/trailing Unicode punctuation (category P*) or symbols like quotes."""
    i, j = 0, len(word)
    while i < j and unicodedata.category(word[i])[0] in "PS":
        i += 1
    while j > i and unicodedata.category(word[j - 1])[0] in "PS":
        j -= 1
    return word[i:j]


def normalise(text: str) -> str:
    """Lowercase, split on whitespace, strip each word's surrounding punctuation, drop empty words,
    join with single spaces: ``"  The U.S.!"`` -> ``"the u.s"``."""
    words = (_strip_punct(w) for w in text.lower().split())
    return " ".join(w for w in words if w)


def target_appears(generated: str, target: str) -> bool:
    """Whether the normalised ``target`` occurs as consecutive whole words of the normalised ``generated``.

    Raises:
        InputError: the target is empty after normalisation (nothing to look for).
    """
    t = normalise(target)
    if not t:
        raise InputError(f"the target {target!r} is empty after normalisation; give a target with letters or digits")
    return f" {t} " in f" {normalise(generated)} "


@dataclass(frozen=True)
class Generation:
    """One greedy continuation: its ``token_ids`` (after any stop) and ``text`` (cut at the first newline)."""

    token_ids: tuple[int, ...]
    text: str

    def says(self, target: str) -> bool:
        """Whether ``target`` appears in this continuation (see :func:`target_appears`)."""
        return target_appears(self.text, target)


def target_budget(lm: LoadedModel, prompt: str, targets: Sequence[str], extra: int = EXTRA_TOKENS) -> int:
    """``max_new_tokens`` for ``prompt``: the longest of ``targets`` (with leading space, tokenised in
    context) in tokens, plus ``extra``."""
    return max(len(continuation_ids(lm.tokenizer, prompt, t)) for t in targets) + extra


def _step_logits(out_logits: torch.Tensor) -> torch.Tensor:
    """The last position's logits ``(B, V)`` as float, checked finite."""
    last = out_logits[:, -1].float()
    if not torch.isfinite(last).all():
        raise NonFiniteError("the model produced NaN/inf logits while decoding; check the edit or use float32")
    return last


@torch.no_grad()
def _decode_chunk(lm: LoadedModel, prompts: list[list[int]], budgets: list[int], use_cache: bool) -> list[list[int]]:
    """Greedy-decode up to ``max(budgets)`` tokens after each prompt (token ids); the new ids per row.

    Stops early once every row has produced EOS or a newline or reached its budget (later tokens of a
    finished row are never read)."""
    tok = lm.tokenizer
    pid = pad_token_id(tok)
    eos = tok.eos_token_id
    gen: list[list[int]] = [[] for _ in prompts]
    done = [False] * len(prompts)
    past = None
    nxt = torch.empty(0, dtype=torch.long)  # the previous step's tokens, fed to the cache path
    batch = pad(prompts, pad_id=pid, padding_side="left", device=lm.device)
    mask, lengths = batch.attention_mask, torch.tensor(batch.lengths, device=lm.device)
    for step in range(max(budgets)):
        if step == 0 or not use_cache:
            if step > 0:
                batch = pad([p + g for p, g in zip(prompts, gen)], pad_id=pid, padding_side="left", device=lm.device)
            out = lm.model(**batch.model_inputs(lm.adapter.uses_position_ids), use_cache=use_cache)
        else:
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            inputs = {"input_ids": nxt[:, None], "attention_mask": mask, **cache_kwargs(lm.model, past)}
            if lm.adapter.uses_position_ids:
                inputs["position_ids"] = (lengths + step - 1)[:, None]
            out = lm.model(**inputs)
        if use_cache:
            past = returned_cache(out)
        nxt = _step_logits(out.logits).argmax(-1)
        for r, t in enumerate(nxt.tolist()):
            gen[r].append(int(t))
            if t == eos or len(gen[r]) >= budgets[r] or "\n" in tok.decode([int(t)]):
                done[r] = True
        if all(done):
            break
    return gen


def _cut(lm: LoadedModel, ids: list[int], budget: int) -> Generation:
    """Keep at most ``budget`` ids, stop after EOS (dropped) and cut the text at the first newline."""
    ids = ids[:budget]
    eos = lm.tokenizer.eos_token_id
    if eos is not None and eos in ids:
        ids = ids[: ids.index(eos)]
    text = lm.tokenizer.decode(ids, skip_special_tokens=True)
    if "\n" in text:
        text = text.split("\n", 1)[0]
        kept: list[int] = []
        for t in ids:  # the ids up to and including the token that held the newline
            kept.append(t)
            if "\n" in lm.tokenizer.decode(kept, skip_special_tokens=True):
                break
        ids = kept
    return Generation(tuple(ids), text)


def greedy_generate(
    lm: LoadedModel, prompts: Sequence[str], max_new_tokens: int | Sequence[int], *, batch_size: int = 64
) -> list[Generation]:
    """Greedy continuation of each prompt, in order; ``max_new_tokens`` one budget or one per prompt.

    Rows are decoded together to the largest budget in their chunk of ``batch_size`` and each is cut to its
    own budget (greedy decoding of a row does not depend on the others, up to float rounding). The KV cache
    is used only where ``lm.adapter.exact_kv_cache``; other families re-run the full sequence each step.

    Raises:
        InputError: no prompts, a prompt that tokenises to nothing, a budget below 1, or mismatched lengths.
    """
    if batch_size < 1:
        raise InputError("batch_size must be at least 1")
    budgets = [max_new_tokens] * len(prompts) if isinstance(max_new_tokens, int) else list(max_new_tokens)
    if len(budgets) != len(prompts):
        raise InputError(f"got {len(budgets)} budgets for {len(prompts)} prompts; give one max_new_tokens or one per prompt")
    if any(b < 1 for b in budgets):
        raise InputError("max_new_tokens must be at least 1")
    rows = []
    for p in prompts:
        ids = token_ids(lm.tokenizer, p)
        if not ids:
            raise InputError(f"prompt {p!r} tokenises to nothing; give a non-empty prompt")
        rows.append(ids)
    use_cache = bool(lm.adapter.exact_kv_cache)
    out: list[Generation] = []
    for s in range(0, len(rows), batch_size):
        chunk, bud = rows[s : s + batch_size], budgets[s : s + batch_size]
        gen = _decode_chunk(lm, chunk, bud, use_cache)
        out += [_cut(lm, g, b) for g, b in zip(gen, bud)]
    return out
