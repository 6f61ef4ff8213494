"""Binary tasks a circuit is found for, in two forms.

- ``head`` (the paper's): a linear sequence-classification head ``(d_model -> n_classes)`` on the
  final-norm hidden state of the last token, trained first with the body frozen; task logits are
  the head's outputs.
- ``next-token`` (head-free): the model's own next-token logits of two label words after a
  prompt, e.g. ``" No"`` / ``" Yes"`` after ``"<sentence>\\nIs this sentence grammatical? Answer:"``;
  for the hierarchy facts, the first tokens of the true and the new target after
  ``"<subject> is a kind of"`` (order shuffled with a seed, so both classes occur).

Both forms read the same thing: the last token's final hidden state ``h`` (B, d), computed by the
model's body (the parent module of the layers, which applies the final norm) with any parameters
overridden through :func:`torch.func.functional_call`. The full-vocabulary logits are never built.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Mapping, Sequence

import torch
from torch import nn
from torch.func import functional_call

from factlab.errors import FactlabError

Form = Literal["next-token", "head"]

#: head-free prompt template and label words (index = label) by task-name prefix
TEMPLATES: dict[str, tuple[str, tuple[str, str]]] = {
    "blimp_": ("{text}\nIs the sentence above grammatical? Answer:", (" No", " Yes")),
    "persona_": ("Statement: {text}\nIs the statement above something you would say? Answer:", (" No", " Yes")),
    "hierarchy_label": ("{text}\nIs this true? Answer:", (" No", " Yes")),
}
DEFAULT_TEMPLATE: tuple[str, tuple[str, str]] = ("{text}\nAnswer:", (" No", " Yes"))


class TaskError(FactlabError, ValueError):
    """A task cannot be built (one class, label words that tokenise alike, ...)."""


@dataclass
class CircuitTask:
    """A binary (or k-class, head form) task as prompts, labels and a way to score them.

    Attributes:
        name: task name.
        form: ``"head"`` or ``"next-token"``.
        prompts: model inputs (the text itself for the head form, the filled template otherwise).
        labels: ``(n,)`` long, in ``0..n_classes-1``.
        candidates: next-token form only: ``(n, 2)`` token ids whose logits are the class-0/class-1 scores.
        head: head form only: the trained linear head.
        label_names: name of each class.
        meta: how the task was built (template, label words, split seed, dropped items).
    """

    name: str
    form: Form
    prompts: list[str]
    labels: torch.Tensor
    candidates: torch.Tensor | None = None
    head: nn.Linear | None = None
    label_names: list[str] = field(default_factory=list)
    meta: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.prompts)

    def subset(self, idx: Sequence[int]) -> CircuitTask:
        idx = list(idx)
        return CircuitTask(self.name, self.form, [self.prompts[i] for i in idx], self.labels[idx],
                           None if self.candidates is None else self.candidates[idx], self.head, list(self.label_names), dict(self.meta))

    def logits(self, lm, params: Mapping[str, torch.Tensor] | None = None, idx: Sequence[int] | None = None,
               *, batch_size: int = 32) -> torch.Tensor:
        """``(n, n_classes)`` task logits of the examples ``idx`` (all by default) under ``params`` overrides."""
        idx = list(range(len(self))) if idx is None else list(idx)
        outs = []
        for s in range(0, len(idx), batch_size):
            chunk = idx[s : s + batch_size]
            h = last_hidden(lm, [self.prompts[i] for i in chunk], params)
            outs.append(self.score(lm, h, chunk, params))
        return torch.cat(outs) if outs else torch.zeros(0, 2)

    def score(self, lm, h: torch.Tensor, idx: Sequence[int], params: Mapping[str, torch.Tensor] | None = None) -> torch.Tensor:
        """Task logits ``(b, n_classes)`` from last-token hidden states ``h`` ``(b, d)``."""
        if self.form == "head":
            if self.head is None:
                raise TaskError(f"task {self.name!r} uses a classification head but none is trained; call train_head first")
            return self.head(h.to(self.head.weight.dtype))
        w, b = unembed_params(lm, params)
        cand = self.candidates[list(idx)].to(h.device)  # (b, 2)
        out = torch.einsum("bd,bkd->bk", h.to(w.dtype), w[cand])
        return out + b[cand] if b is not None else out

    @torch.no_grad()
    def accuracy(self, lm, params: Mapping[str, torch.Tensor] | None = None, *, batch_size: int = 32) -> float:
        """Fraction of examples whose argmax task logit equals the label."""
        pred = self.logits(lm, params, batch_size=batch_size).argmax(-1)
        return float((pred.cpu() == self.labels).float().mean())

    def to_dict(self) -> dict:
        return {"name": self.name, "form": self.form, "n": len(self), "label_names": self.label_names,
                "class_counts": torch.bincount(self.labels).tolist(), "meta": self.meta}


# ------------------------------------------------------------------ forward pieces
def body_path(lm) -> str:
    """Path of the module that holds the layers and the final norm (``model`` for Llama, ``transformer`` for GPT-2)."""
    path = lm.adapter.layers_path.rsplit(".", 1)[0]
    if not lm.adapter.final_norm_path.startswith(path + "."):
        raise TaskError(f"the final norm {lm.adapter.final_norm_path} is outside the body {path}; this family is not supported")
    return path


def body_hidden(lm, batch, params: Mapping[str, torch.Tensor] | None = None) -> torch.Tensor:
    """``(B, T, d)`` final-norm hidden states of a :class:`~factlab.prompts.Batch`, with ``params`` (full names) overriding weights."""
    path = body_path(lm)
    body = lm.model.get_submodule(path)
    prefix = path + "."
    sub = {k[len(prefix):]: v for k, v in (params or {}).items() if k.startswith(prefix)}
    kwargs = {**batch.model_inputs(lm.adapter.uses_position_ids), "use_cache": False}
    out = functional_call(body, sub, args=(), kwargs=kwargs, strict=False) if sub else body(**kwargs)
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]


def last_hidden(lm, prompts: Sequence[str], params: Mapping[str, torch.Tensor] | None = None) -> torch.Tensor:
    """``(B, d)`` final-norm hidden state at each prompt's last token, with ``params`` (full names) overriding weights."""
    batch = lm.encode(list(prompts))
    hidden = body_hidden(lm, batch, params)
    rows = torch.arange(batch.size, device=hidden.device)
    return hidden[rows, batch.last_positions.to(hidden.device)]


def unembed_params(lm, params: Mapping[str, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Unembedding ``(V, d)`` and bias, taking a masked/overridden value when ``params`` has one (tied embeddings too)."""
    model = lm.model
    w = lm.adapter.unembed_weight(model)
    b = lm.adapter.unembed_bias(model)
    if params:
        for name, p in model.named_parameters():
            if p is w and name in params:
                w = params[name]
            elif b is not None and p is b and name in params:
                b = params[name]
    return w, b


# ------------------------------------------------------------------ builders
def _first_token(lm, word: str) -> int:
    ids = lm.tokenizer(word, add_special_tokens=False)["input_ids"]
    if not ids:
        raise TaskError(f"label word {word!r} tokenises to nothing")
    return int(ids[0])


def template_for(name: str) -> tuple[str, tuple[str, str]]:
    """The head-free template and label words used for a task name (see :data:`TEMPLATES`)."""
    return next((v for k, v in TEMPLATES.items() if name.startswith(k)), DEFAULT_TEMPLATE)


def from_classification(lm, task, form: Form = "next-token", *, template: str | None = None,
                        label_words: Sequence[str] | None = None) -> CircuitTask:
    """Build a :class:`CircuitTask` from a :class:`factlab.data.ClassificationTask`."""
    labels = torch.tensor(task.labels, dtype=torch.long)
    if len(set(task.labels)) < 2:
        raise TaskError(f"task {task.name!r} has only one class; a circuit needs a task with two")
    if form == "head":
        return CircuitTask(task.name, "head", list(task.texts), labels, label_names=list(task.label_names), meta={"head": "last-token linear"})
    if form != "next-token":
        raise TaskError(f"unknown task form {form!r}; use 'head' or 'next-token'")
    if labels.max() > 1:
        raise TaskError(f"the next-token form needs a binary task; {task.name!r} has {int(labels.max()) + 1} classes (use form='head')")
    t, words = template_for(task.name)
    template = template or t
    words = tuple(label_words or words)
    if "{text}" not in template:
        raise TaskError(f"template {template!r} has no {{text}} placeholder")
    ids = [_first_token(lm, w) for w in words]
    if ids[0] == ids[1]:
        raise TaskError(f"label words {words} start with the same token; choose words that differ in their first token")
    prompts = [template.format(text=x) for x in task.texts]
    cand = torch.tensor([ids] * len(prompts), dtype=torch.long)
    return CircuitTask(task.name, "next-token", prompts, labels, cand, label_names=list(task.label_names),
                       meta={"template": template, "label_words": list(words)})


def hierarchy_fact_task(lm, records, *, seed: int = 0, name: str = "hierarchy") -> CircuitTask:
    """Head-free task from hierarchy/CounterFact records: does the model prefer the true target over the new one?

    Prompt = the filled rewrite prompt; the two candidates are the first tokens of ``" " + target_true`` and
    ``" " + target_new``, in a seeded random order; the label is the position of the true target. Records whose
    two targets share their first token are dropped (the count is in ``meta``).
    """
    rng = random.Random(seed)
    prompts, cands, labels, dropped = [], [], [], 0
    for r in records:
        t, n = _first_token(lm, " " + r.target_true), _first_token(lm, " " + r.target_new)
        if t == n:
            dropped += 1
            continue
        flip = rng.random() < 0.5
        prompts.append(r.prompt.format(r.subject))
        cands.append([n, t] if not flip else [t, n])
        labels.append(1 if not flip else 0)
    return CircuitTask(name, "next-token", prompts, torch.tensor(labels), torch.tensor(cands),
                       label_names=["first", "second"], meta={"source": "fact records", "dropped_same_first_token": dropped, "seed": seed})


def train_head(lm, task: CircuitTask, *, epochs: int = 400, lr: float = 0.01, seed: int = 0, batch_size: int = 32) -> nn.Linear:
    """Train the paper's classification head on frozen last-token features (AdamW, full batch); sets ``task.head``.

    Features are computed once with the unmodified model, so each epoch costs one small matrix product.
    """
    with torch.no_grad():
        feats = torch.cat([last_hidden(lm, task.prompts[s : s + batch_size]) for s in range(0, len(task), batch_size)]).float()
    torch.manual_seed(seed)
    n_classes = int(task.labels.max()) + 1
    head = nn.Linear(feats.shape[1], n_classes).to(feats.device)
    # standardise through the head's own parameters so plain AdamW converges on raw features
    opt = torch.optim.AdamW(head.parameters(), lr=lr)
    y = task.labels.to(feats.device)
    for _ in range(epochs):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(head(feats), y)
        loss.backward()
        opt.step()
    head.requires_grad_(False)
    task.head = head.to(lm.dtype)
    return task.head


def fact_records(name: str, relation: str | None = None) -> list:
    """The edit records behind a fact task: ``"hierarchy"`` (``hierarchy_data.json``), ``"counterfact"`` (the
    CounterFact dataset) or a CounterFact-schema JSON file (e.g. a synthetic world's ``datasets/counterfact.json``),
    optionally only one ``relation_id`` (an error names the relations there when none matches)."""
    from factlab.data import load_counterfact, load_hierarchy_edits

    records = load_hierarchy_edits() if name == "hierarchy" else load_counterfact(None if name == "counterfact" else name)
    if relation is not None:
        found = sorted({str(r.relation_id) for r in records})
        records = [r for r in records if r.relation_id == relation]
        if not records:
            raise TaskError(f"no record of {name!r} has relation_id {relation!r}; it has {', '.join(found)}")
    return records


def is_fact_task(name: str) -> bool:
    """``"hierarchy"`` or a ``.json`` file: the head-free fact form (true vs new target), not a CSV classification task."""
    return name == "hierarchy" or str(name).endswith(".json")


def make_task(lm, name: str, form: Form = "next-token", *, seed: int = 0, test_frac: float = 0.2,
              train_size: int | None = None, test_size: int | None = None, head_epochs: int = 400,
              relation: str | None = None) -> tuple[CircuitTask, CircuitTask]:
    """Seeded (train, test) :class:`CircuitTask` pair for a task name or CSV path.

    ``"hierarchy"`` is the head-free fact form of ``hierarchy_data.json`` (:func:`hierarchy_fact_task`), and so
    is a CounterFact-schema ``.json`` file (``relation`` keeps one ``relation_id``; the task is then named
    ``<file stem>:<relation>``); any other name is a classification task (``blimp_dna1``, ``persona_e``,
    ``hierarchy_label``, or a CSV path with ``text,label`` columns), split with :meth:`ClassificationTask.split`
    (stratified). ``train_size``/``test_size`` cut each part (seeded order). With ``form="head"`` the head is
    trained on the train part and shared.
    """
    from factlab.data import load_classification_task

    if is_fact_task(name):
        if form != "next-token":
            raise TaskError(f"fact tasks ({name!r}) are head-free: use form='next-token'")
        label = "hierarchy" if name == "hierarchy" else Path(name).stem + (f":{relation}" if relation else "")
        task = hierarchy_fact_task(lm, fact_records(name, relation), seed=seed, name=label)
        order = list(range(len(task)))
        random.Random(seed).shuffle(order)
        n_test = round(len(order) * test_frac)
        train, test = task.subset(order[n_test:]), task.subset(order[:n_test])
    else:
        raw_train, raw_test = load_classification_task(name).split(test_frac, seed)
        train, test = from_classification(lm, raw_train, form), from_classification(lm, raw_test, form)
    if train_size:
        train = train.subset(range(min(train_size, len(train))))
    if test_size:
        test = test.subset(range(min(test_size, len(test))))
    if form == "head":
        test.head = train_head(lm, train, epochs=head_epochs, seed=seed)
    for t, part in ((train, "train"), (test, "test")):
        t.meta.update({"split": part, "seed": seed, "test_frac": test_frac})
    return train, test


def split_to_dict(train: CircuitTask, test: CircuitTask) -> dict:
    """The saved split: every prompt, label and candidate pair of both parts (JSON-able)."""
    def part(t: CircuitTask) -> dict:
        return {"prompts": t.prompts, "labels": t.labels.tolist(), "candidates": None if t.candidates is None else t.candidates.tolist()}

    return {"name": train.name, "form": train.form, "label_names": train.label_names, "meta": train.meta,
            "train": part(train), "test": part(test)}


def split_from_dict(d: dict, head: nn.Linear | None = None) -> tuple[CircuitTask, CircuitTask]:
    """Rebuild the (train, test) pair saved by :func:`split_to_dict` (pass the saved head for the head form)."""
    def part(p: dict, split: str) -> CircuitTask:
        cand = None if p["candidates"] is None else torch.tensor(p["candidates"])
        return CircuitTask(d["name"], d["form"], list(p["prompts"]), torch.tensor(p["labels"]), cand, head,
                           list(d["label_names"]), {**d["meta"], "split": split})

    return part(d["train"], "train"), part(d["test"], "test")
