"""The synthetic world: determinism, held-out templates, tokenisation, exports."""

from __future__ import annotations

import json
import re
from collections import Counter

import pytest

from factlab.synth import RELATIONS, SIZES, World, build_world
from factlab.synth.tokenizer import train_tokenizer


def _template_regex(template: str) -> re.Pattern[str]:
    """A held-out template as a pattern with any subject in the ``{}`` slot."""
    pre, post = template.split("{}")
    return re.compile(re.escape(pre) + r".+?" + re.escape(post) + r"(?=\s|$|[.,])")


@pytest.mark.parametrize("size", ["tiny", "small"])
def test_world_is_deterministic(size: str) -> None:
    a, b = build_world(3, size), build_world(3, size)
    assert a.to_json() == b.to_json()
    assert a.corpus(5) == b.corpus(5)
    assert a.counterfact_records() == b.counterfact_records()
    assert build_world(4, size).to_json() != a.to_json()
    assert a.corpus(6) != a.corpus(5)


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("size", ["tiny", "small"])
def test_world_guarantees(seed: int, size: str) -> None:
    w = build_world(seed, size)  # runs World.check()
    ws = SIZES[size]
    assert [r.key for r in w.relations] == list(ws.relations)
    assert all(len(r.train_templates) == ws.train_templates for r in w.relations)
    assert len({f.subject for f in w.facts if f.relation == w.relations[0].key}) == len(w.facts_of(w.relations[0].key))
    # every relation is functional; every object used has >= 2 subjects (so neighbourhoods exist)
    for r in w.relations:
        facts = w.facts_of(r.key)
        assert len({f.subject_id for f in facts}) == len(facts)
        counts = Counter(f.object_id for f in facts)
        assert max(counts.values()) - min(counts.values()) <= 1
        if not r.one_to_one:
            assert min(counts.values()) >= 2
        if ws.pair_only and r.domain == "person":  # as many objects as the smaller name pool allows
            assert len(counts) == min(len(w.entities_of(r.range)), ws.given_names, ws.family_names)
        elif len(facts) >= 2 * len(w.entities_of(r.range)):
            assert len(counts) == len(w.entities_of(r.range))
    # multi-token subjects: people are "Given Family" with shared given names
    people = [e.name for e in w.entities_of("person")]
    assert all(len(p.split()) == 2 for p in people)
    assert max(Counter(p.split()[0] for p in people).values()) > 1
    if ws.pair_only:
        # neither name token alone says anything about a person's objects: every given name and
        # every family name sees the relation's objects (almost) equally often
        assert max(Counter(p.split()[1] for p in people).values()) > 1
        for r in w.relations:
            if r.domain != "person":
                continue
            objects = {f.object for f in w.facts_of(r.key)}
            for part in (0, 1):
                by_token: dict[str, Counter] = {}
                for f in w.facts_of(r.key):
                    by_token.setdefault(f.subject.split()[part], Counter())[f.object] += 1
                for token, counts in by_token.items():
                    n = [counts[o] for o in objects]
                    assert max(n) - min(n) <= 1, (r.key, token, counts)


def test_world_roundtrip(tmp_path, tiny_world: World) -> None:
    tiny_world.save(tmp_path / "world.json")
    again = World.load(tmp_path)
    assert again.to_json() == tiny_world.to_json()
    assert again.prompts("heldout") == tiny_world.prompts("heldout")


def test_capital_consistent_with_located_in() -> None:
    w = build_world(1, "small")
    country_of = {f.subject_id: f.object_id for f in w.facts_of("located_in")}
    capitals = w.facts_of("capital")
    assert len({f.object_id for f in capitals}) == len(capitals)
    assert all(country_of[f.object_id] == f.subject_id for f in capitals)


@pytest.mark.parametrize("corpus_seed", [0, 1, 2])
def test_heldout_templates_never_in_training_corpus(tiny_world: World, corpus_seed: int) -> None:
    docs = tiny_world.corpus(corpus_seed, repeats=2)
    text = "\n".join(docs)
    for r in tiny_world.relations:
        for t in r.heldout_templates:
            assert not _template_regex(t).search(text), (r.key, t)
    for p in tiny_world.prompts("heldout"):
        assert p.prompt not in text
    # ... while every training sentence is there exactly `repeats` times
    for f in tiny_world.facts[:40]:
        for t in tiny_world.relation(f.relation).train_templates:
            assert text.count(f.sentence(t)) == 2


def test_corpus_mixes_filler(tiny_world: World) -> None:
    docs = tiny_world.corpus(0)
    facts = {f.sentence(t) for f in tiny_world.facts for t in tiny_world.relation(f.relation).train_templates}
    sentences = [s + "." for d in docs for s in d.split(". ") if s]
    sentences = [s[:-1] if s.endswith("..") else s for s in sentences]
    filler = [s for s in sentences if s not in facts]
    assert 0.05 < len(filler) / len(sentences) < 0.5


@pytest.mark.parametrize("size", ["tiny", "small"])
def test_bio_documents(size: str) -> None:
    """Bio corpus: one subject per document, named in full in every fact sentence; each of the
    subject's facts once per document, on a template that rotates over the documents."""
    w = build_world(0, size)
    assert w.size.documents == "bio"
    by_subject: dict[str, list] = {}
    for f in w.facts:
        by_subject.setdefault(f.subject, []).append(f)
    docs = w.corpus(0)
    n_templates = w.size.train_templates
    assert len(docs) == n_templates * len(by_subject)
    seen: Counter = Counter()
    orders = set()
    for d in docs:
        subjects = [s for s, fs in by_subject.items() if any(f.sentence(t) in d for f in fs for t in w.relation(f.relation).train_templates)]
        assert len(subjects) == 1, d
        facts = by_subject[subjects[0]]
        stated = [(f, t) for f in facts for t in w.relation(f.relation).train_templates if f.sentence(t) in d]
        assert sorted(w.facts.index(f) for f, _ in stated) == sorted(w.facts.index(f) for f in facts)
        seen.update((w.facts.index(f), t) for f, t in stated)
        if len(facts) > 2:  # the relations' order in this document
            orders.add(tuple(sorted(range(len(stated)), key=lambda i: d.index(stated[i][0].sentence(stated[i][1])))))
    assert set(seen.values()) == {1} and len(seen) == len(w.facts) * n_templates
    assert len(orders) > 1  # sentence order is shuffled per document


def test_tokenizer_answers_and_spans(tmp_path, tiny_world: World) -> None:
    from transformers import AutoTokenizer

    tok = train_tokenizer(tiny_world.vocabulary_text())
    tok.save_pretrained(tmp_path)
    tok = AutoTokenizer.from_pretrained(tmp_path)
    assert tok.is_fast
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2, 3)
    assert tok("Velora is").input_ids[0] != tok.bos_token_id  # no special tokens added on encode
    for r in tiny_world.relations:
        firsts = {}
        for e in tiny_world.entities_of(r.range):
            ids = tok(" " + e.name, add_special_tokens=False).input_ids
            assert ids[0] != tok.unk_token_id
            assert ids == tok(e.name, add_special_tokens=False).input_ids
            firsts.setdefault(ids[0], e.name)
            assert firsts[ids[0]] == e.name, f"{e.name} and {firsts[ids[0]]} share a first token"
    for p in tiny_world.prompts("heldout") + tiny_world.prompts("train"):
        assert tok.unk_token_id not in tok(p.prompt).input_ids, p.prompt
    # subject spans via offsets
    f = tiny_world.facts[0]
    prompt = f.prompt(tiny_world.relation(f.relation).heldout_templates[0])
    enc = tok(prompt, return_offsets_mapping=True)
    start = prompt.index(f.subject)
    toks = [i for i, (a, b) in enumerate(enc["offset_mapping"]) if a < start + len(f.subject) and b > start]
    assert len(toks) == 2
    assert tok.decode([enc.input_ids[i] for i in toks]) == f.subject
    assert tok.decode(tok(f.sentence("{} is in")).input_ids) == f.sentence("{} is in")


def test_exports_match_schemas(tmp_path, tiny_world: World) -> None:
    paths = tiny_world.export(tmp_path)
    assert (tmp_path / "world.json").is_file()
    w = tiny_world
    subj_obj = {(f.relation, f.subject): f.object for f in w.facts}
    rel_by_id = {r.relation_id: r for r in w.relations}

    known = json.loads((tmp_path / "datasets" / "known.json").read_text())
    assert len(known) == len(w.facts)
    for i, k in enumerate(known):
        assert set(k) == {"known_id", "subject", "attribute", "template", "prompt", "relation_id", "prediction"}
        assert k["known_id"] == i
        assert "{}" in k["template"] and k["prompt"] == k["template"].format(k["subject"])
        assert k["prediction"].startswith(" " + k["attribute"])
        assert subj_obj[(rel_by_id[k["relation_id"]].key, k["subject"])] == k["attribute"]

    cf = json.loads((tmp_path / "datasets" / "counterfact.json").read_text())
    assert len(cf) == len(w.facts)
    for c in cf:
        assert list(c) == [
            "case_id", "requested_rewrite", "paraphrase_prompts", "neighborhood_prompts", "attribute_prompts", "generation_prompts",
        ]  # fmt: skip
        rw = c["requested_rewrite"]
        assert list(rw) == ["prompt", "relation_id", "target_new", "target_true", "subject"]
        assert list(rw["target_new"]) == ["str", "id"] and list(rw["target_true"]) == ["str", "id"]
        assert rw["target_new"]["str"] != rw["target_true"]["str"]
        r = rel_by_id[rw["relation_id"]]
        assert rw["prompt"] == r.train_templates[0]
        assert subj_obj[(r.key, rw["subject"])] == rw["target_true"]["str"]
        assert c["paraphrase_prompts"] == [t.format(rw["subject"]) for t in r.heldout_templates]
        assert c["generation_prompts"] and c["attribute_prompts"]
        assert bool(c["neighborhood_prompts"]) != r.one_to_one
        for prompts, obj in ((c["neighborhood_prompts"], rw["target_true"]["str"]), (c["attribute_prompts"], rw["target_new"]["str"])):
            for p in prompts:
                subj = next(f.subject for f in w.facts_of(r.key) if any(p == t.format(f.subject) for t in r.train_templates))
                assert subj != rw["subject"] and subj_obj[(r.key, subj)] == obj

    for r in w.relations:
        lre = json.loads((tmp_path / "datasets" / "relations" / f"{r.key}.json").read_text())
        assert set(lre) == {"name", "prompt_templates", "prompt_templates_zs", "properties", "samples"}
        assert set(lre["properties"]) == {"relation_type", "domain_name", "range_name", "symmetric"}
        assert lre["properties"]["domain_name"] == r.domain and lre["properties"]["symmetric"] is False
        assert all("{}" in t for t in lre["prompt_templates"] + lre["prompt_templates_zs"])
        assert lre["samples"] == [{"subject": f.subject, "object": f.object} for f in w.facts_of(r.key)]
    assert {k for k in paths if k.startswith("relations/")} == {f"relations/{r.key}" for r in w.relations}
    lines = (tmp_path / "datasets" / "corpus.txt").read_text().splitlines()
    assert lines == [d for e in range(5) for d in w.corpus(e)]


def test_exports_load_with_factlab_data(tmp_path, tiny_world: World) -> None:
    """The exports read back through factlab's own dataset loaders."""
    data = pytest.importorskip("factlab.data")
    tiny_world.export(tmp_path)
    ds = tmp_path / "datasets"
    known = data.load_known(ds / "known.json")
    assert len(known) == len(tiny_world.facts) and known[0].subject == tiny_world.facts[0].subject
    cf = data.load_counterfact(ds / "counterfact.json")
    assert len(cf) == len(tiny_world.facts) and cf[0].paraphrase_prompts
    rel = data.load_relation(ds / "relations" / "born_in.json")
    assert len(rel.samples) == len(tiny_world.facts_of("born_in"))


def test_relation_catalogue() -> None:
    assert len(RELATIONS) == 10
    for r in RELATIONS.values():
        assert len(r.train_templates) >= 3 and len(r.heldout_templates) >= 2
        assert all(t.count("{}") == 1 and not t.endswith(" ") for t in r.train_templates + r.heldout_templates)
        assert not set(r.train_templates) & set(r.heldout_templates)
