"""Generation metrics of CounterFact: fluency (n-gram entropy) and the TF-IDF reference score.

Generation follows ROME's ``generate_fast`` as far as it is specified: one sample per generation
prompt, total length ``max_length`` tokens (prompt included), top-k sampling with k = 5 (the
reference) or greedy decoding (cheaper to reason about; say which in the config -- the two give
different GE). Texts are the prompt plus the continuation, NFKD-normalised, ``"\\n\\n"`` replaced by
a space, special tokens dropped. Sampling is seeded per case, so a case's texts do not depend on
how cases are split across processes. Generation dominates CPU run time: ``gen_prompts`` limits how
many generation prompts of each case are used (ROME uses all ten; MEMIT every 10th case).
"""

from __future__ import annotations

import collections
import json
import math
import re
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Sequence

import numpy as np
import torch

from factlab.errors import FactlabError
from factlab.models.loading import LoadedModel

Decoding = Literal["sample_topk5", "greedy"]


class ReferenceFilesError(FactlabError, FileNotFoundError):
    """The ``--reference-dir`` folder lacks ROME's reference files."""

    def __str__(self) -> str:  # FileNotFoundError would format (errno, strerror); keep the message
        return str(self.args[0]) if self.args else ""

_FALLBACK_WORD = re.compile(r"\w+|[^\w\s]", re.UNICODE)


def word_tokenizer_name() -> str:
    """Which word tokenizer :func:`word_tokenize` uses here (recorded in every run's config)."""
    try:
        import nltk

        nltk.word_tokenize("A test. Another one.")
        return f"nltk.word_tokenize ({nltk.__version__})"
    except (ImportError, LookupError):
        return "regex \\w+|[^\\w\\s] (nltk with punkt data not available)"


def word_tokenize(text: str) -> list[str]:
    """``nltk.word_tokenize`` (the reference) when nltk and its punkt data are installed, else a regex
    that splits words and punctuation the same way for ordinary prose (contractions differ)."""
    try:
        import nltk

        return list(nltk.word_tokenize(text))
    except (ImportError, LookupError):
        return _FALLBACK_WORD.findall(text)


def ngram_entropy(text: str, ns: Sequence[int] = (2, 3), weights: Sequence[float] = (2 / 3, 4 / 3)) -> float:
    """ROME's ``compute_n_gram_entropy``: arithmetic mean of ``w_n * H_n`` (bits); default = H2/3 + 2*H3/3.

    ``H_n`` is the entropy of the frequency distribution of word n-grams. A text with fewer than
    ``n`` words contributes ``H_n = 0`` (the reference would fail on an empty distribution).
    """
    tokens = word_tokenize(text)
    vals = []
    for n, w in zip(ns, weights):
        grams = collections.Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))
        total = sum(grams.values())
        h = -sum((c / total) * math.log2(c / total) for c in grams.values()) if total else 0.0
        vals.append(w * h)
    return float(np.mean(vals))


@dataclass(frozen=True)
class GenerationConfig:
    """How generation texts are produced. ``gen_prompts=None`` uses every generation prompt of a case;
    ``every=k`` generates only for cases whose ``case_id % k == 0`` (MEMIT's
    ``generation_test_interval``, 10 in its scaling runs; ROME: 1)."""

    gen_prompts: int | None = None
    max_length: int = 100
    decoding: Decoding = "sample_topk5"
    seed: int = 0
    every: int = 1

    def applies_to(self, case_id: int) -> bool:
        return self.gen_prompts != 0 and case_id % self.every == 0

    def to_dict(self) -> dict[str, object]:
        return {"gen_prompts": self.gen_prompts, "max_length": self.max_length, "decoding": self.decoding, "seed": self.seed, "every": self.every}


def _postprocess(text: str) -> str:
    return unicodedata.normalize("NFKD", text).replace("\n\n", " ")


@torch.no_grad()
def generate_texts(lm: LoadedModel, prompts: Sequence[str], cfg: GenerationConfig, *, case_seed: int) -> list[str]:
    """One text per prompt (prompt + continuation), ``cfg.max_length`` tokens in all (padded width).

    Does not stop at EOS, like the reference sampler; special tokens are dropped when decoding.
    """
    if not prompts:
        return []
    batch = lm.encode(list(prompts), padding_side="left")
    new = max(1, cfg.max_length - batch.width)
    from transformers import GenerationConfig as HFGen

    pad_id = lm.tokenizer.pad_token_id if lm.tokenizer.pad_token_id is not None else 0
    gen = HFGen(
        max_new_tokens=new,
        do_sample=cfg.decoding == "sample_topk5",
        top_k=5 if cfg.decoding == "sample_topk5" else None,
        top_p=None,
        temperature=None,
        eos_token_id=None,
        pad_token_id=pad_id,
    )
    with torch.random.fork_rng(devices=[lm.device] if lm.device.type == "cuda" else []):
        torch.manual_seed(cfg.seed * 1_000_003 + case_seed)
        out = lm.model.generate(input_ids=batch.input_ids, attention_mask=batch.attention_mask, generation_config=gen)
    return [_postprocess(lm.tokenizer.decode(row, skip_special_tokens=True)) for row in out]


class TfidfReference:
    """ROME's reference score: TF-IDF cosine of generated text vs attribute snippets of the new target.

    Needs the three files ROME downloads from rome.baulab.info (not in factlab's data):
    ``attribute_snippets.json``, ``idf.npy``, ``tfidf_vocab.json``. TF-IDF is sklearn's
    ``TfidfVectorizer`` default analyser (lower-case, tokens ``(?u)\\b\\w\\w+\\b``) with the stored
    IDF; the L2 normalisation does not change a cosine, so none is applied.
    """

    FILES = ("attribute_snippets.json", "idf.npy", "tfidf_vocab.json")
    _TOKEN = re.compile(r"(?u)\b\w\w+\b")

    def __init__(self, folder: str | Path):
        folder = Path(folder)
        missing = [f for f in self.FILES if not (folder / f).is_file()]
        if missing:
            raise ReferenceFilesError(
                f"{folder} lacks {', '.join(missing)}; the reference score needs ROME's attribute_snippets.json, "
                "idf.npy and tfidf_vocab.json (from rome.baulab.info/data/dsets/)"
            )
        self.folder = folder
        self.idf = np.load(folder / "idf.npy").astype(np.float64)
        self.vocab: dict[str, int] = json.loads((folder / "tfidf_vocab.json").read_text())
        snips: dict[str, dict[str, list[str]]] = collections.defaultdict(lambda: collections.defaultdict(list))
        for el in json.loads((folder / "attribute_snippets.json").read_text()):
            for s in el["samples"]:
                snips[el["relation_id"]][el["target_id"]].append(s["text"])
        self.snippets = snips

    def vector(self, text: str) -> np.ndarray:
        v = np.zeros(len(self.idf))
        for t in self._TOKEN.findall(text.lower()):
            j = self.vocab.get(t)
            if j is not None:
                v[j] += 1.0
        return v * self.idf

    def score(self, texts: Sequence[str], relation_id: str | None, target_new_id: str | None) -> float:
        """Cosine in [0, 1]; NaN when the record has no ids or no snippets for (relation, target_new)."""
        refs = self.snippets.get(relation_id or "", {}).get(target_new_id or "", [])
        if not refs:
            return math.nan
        a, b = self.vector(" ".join(texts)), self.vector(" ".join(refs))
        na, nb = np.linalg.norm(a), np.linalg.norm(b)
        return float(a @ b / (na * nb)) if na > 0 and nb > 0 else 0.0
