"""Tokenisation, subject spans, batching and padding.

Token positions are always indices into the *unpadded* encoding of one prompt (special tokens such
as a BOS that the tokenizer adds included). :class:`Batch` converts them to padded positions.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Sequence

import torch

from factlab.errors import InputError, SubjectNotFoundError

PaddingSide = Literal["left", "right"]


@dataclass
class Batch:
    """Padded token ids for a batch of prompts.

    ``input_ids``, ``attention_mask`` and ``position_ids`` are ``(B, T)``; ``lengths[i]`` is the number of
    real tokens in row ``i``. Position ids count real tokens only, so a left-padded row sees the same
    positions as the prompt alone.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    lengths: list[int]
    padding_side: PaddingSide

    @property
    def size(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def width(self) -> int:
        return int(self.input_ids.shape[1])

    def offset(self, row: int) -> int:
        """Padded index of the first real token of ``row``."""
        return self.width - self.lengths[row] if self.padding_side == "left" else 0

    def position(self, row: int, index: int) -> int:
        """Padded position of unpadded token ``index`` (negative counts from the end) in ``row``."""
        n = self.lengths[row]
        if not -n <= index < n:
            raise IndexError(f"token index {index} is outside row {row} of {n} tokens")
        return self.offset(row) + (index % n)

    @property
    def last_positions(self) -> torch.Tensor:
        """``(B,)`` padded index of each row's last real token."""
        return torch.tensor([self.position(i, -1) for i in range(self.size)], device=self.input_ids.device)

    def to(self, device: torch.device | str) -> "Batch":
        return Batch(
            self.input_ids.to(device), self.attention_mask.to(device), self.position_ids.to(device), self.lengths, self.padding_side
        )

    def model_inputs(self, position_ids: bool = True) -> dict[str, torch.Tensor]:
        """Keyword arguments for the HF model's forward (``position_ids`` only where the family takes them)."""
        out = {"input_ids": self.input_ids, "attention_mask": self.attention_mask}
        if position_ids:
            out["position_ids"] = self.position_ids
        return out


def token_ids(tokenizer, text: str, *, add_special_tokens: bool = True) -> list[int]:
    """Token ids of one prompt as the model sees it (BOS added when the tokenizer adds one)."""
    return list(tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])


def special_prefix(tokenizer) -> list[int]:
    """The ids the tokenizer puts before every text by itself (e.g. ``[bos]`` for Llama and Gemma, ``[]``
    for GPT-2): put them before token windows cut from a corpus, which the model must see as it sees text."""
    with_special = token_ids(tokenizer, "a")
    plain = token_ids(tokenizer, "a", add_special_tokens=False)
    return with_special[: len(with_special) - len(plain)] if plain and with_special[-len(plain) :] == plain else []


def encode(
    tokenizer,
    prompts: str | Sequence[str] | Sequence[Sequence[int]],
    *,
    padding_side: PaddingSide = "left",
    add_special_tokens: bool = True,
    device: torch.device | str | None = None,
) -> Batch:
    """Tokenise and pad ``prompts`` (strings, or lists of token ids) into a :class:`Batch`."""
    if isinstance(prompts, str):
        prompts = [prompts]
    if len(prompts) == 0:
        raise InputError("encode() needs at least one prompt")
    rows = [list(p) if not isinstance(p, str) else token_ids(tokenizer, p, add_special_tokens=add_special_tokens) for p in prompts]
    for p, r in zip(prompts, rows):
        if not r:
            raise InputError(f"prompt {p!r} tokenises to nothing; give a non-empty prompt")
    return pad(rows, pad_id=pad_token_id(tokenizer), padding_side=padding_side, device=device)


def pad(
    rows: Sequence[Sequence[int]], *, pad_id: int, padding_side: PaddingSide = "left", device: torch.device | str | None = None
) -> Batch:
    """Pad lists of token ids to a :class:`Batch` with attention masks and position ids."""
    if padding_side not in ("left", "right"):
        raise InputError(f"padding_side must be 'left' or 'right', not {padding_side!r}")
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    pos = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        n = len(r)
        sl = slice(width - n, width) if padding_side == "left" else slice(0, n)
        ids[i, sl] = torch.tensor(list(r), dtype=torch.long)
        mask[i, sl] = 1
        pos[i, sl] = torch.arange(n)
    batch = Batch(ids, mask, pos, [len(r) for r in rows], padding_side)
    return batch.to(device) if device is not None else batch


def pad_token_id(tokenizer) -> int:
    """The id used for padding: the tokenizer's pad token, else EOS, else 0."""
    for tid in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if tid is not None:
            return int(tid)
    return 0


def find_subject(prompt: str, subject: str, occurrence: int = -1) -> tuple[int, int]:
    """Character span ``[start, end)`` of ``subject`` in ``prompt``.

    ``occurrence`` picks among repeated occurrences (``-1``: the last, as ICL prompts repeat other
    subjects; ``0``: the first). The subject is matched exactly; if that fails, once more with its
    surrounding whitespace stripped.
    """
    if not subject or not subject.strip():
        raise SubjectNotFoundError("the subject is empty; give the subject string as it appears in the prompt")
    for cand in (subject, subject.strip()):
        starts = []
        i = prompt.find(cand)
        while i != -1:
            starts.append(i)
            i = prompt.find(cand, i + 1)
        if starts:
            try:
                s = starts[occurrence]
            except IndexError:
                raise SubjectNotFoundError(
                    f"subject {subject!r} occurs {len(starts)} time(s) in the prompt; occurrence={occurrence} does not exist"
                ) from None
            return s, s + len(cand)
    raise SubjectNotFoundError(
        f"subject {subject!r} is not in the prompt {prompt!r}; pass the subject exactly as it is written in the prompt "
        "(case and spelling), or put '{}' in the template where the subject goes"
    )


def subject_span(tokenizer, prompt: str, subject: str, *, occurrence: int = -1, add_special_tokens: bool = True) -> tuple[int, int]:
    """Token span ``[start, end)`` of ``subject`` in the unpadded encoding of ``prompt``.

    Uses the fast tokenizer's character offsets: a token belongs to the subject when its characters
    overlap the subject's (so a leading space merged into the first subject token, or a subject that
    tokenises differently in context, are handled). Needs a fast tokenizer.
    """
    c0, c1 = find_subject(prompt, subject, occurrence)
    while c0 < c1 and prompt[c0].isspace():  # surrounding whitespace never decides which tokens are the subject
        c0 += 1
    while c1 > c0 and prompt[c1 - 1].isspace():
        c1 -= 1
    if not getattr(tokenizer, "is_fast", False):
        raise TypeError("subject_span needs a fast (Rust) tokenizer with offset mappings; load the tokenizer with use_fast=True")
    enc = tokenizer(prompt, add_special_tokens=add_special_tokens, return_offsets_mapping=True)
    toks = [i for i, (a, b) in enumerate(enc["offset_mapping"]) if b > a and a < c1 and b > c0]
    if not toks:
        raise SubjectNotFoundError(f"subject {subject!r} covers no token of the prompt {prompt!r}")
    return toks[0], toks[-1] + 1


def continuation_ids(tokenizer, prompt: str, target: str) -> list[int]:
    """Token ids of ``target`` as a continuation of ``prompt`` (tokenised in context, BOS excluded).

    The prompt + target is tokenised and the prompt's tokens are removed; when the tokenizer merges
    across the boundary, the target is tokenised on its own instead (without special tokens).
    """
    if not target or not target.strip():
        raise InputError("the target is empty; give the target text, e.g. ' Paris'")
    p = token_ids(tokenizer, prompt)
    full = token_ids(tokenizer, prompt + target)
    if full[: len(p)] == p and len(full) > len(p):
        return full[len(p) :]
    ids = token_ids(tokenizer, target, add_special_tokens=False)
    if not ids:
        raise InputError(f"the target {target!r} tokenises to nothing")
    return ids
