"""A seeded synthetic world of facts, its training corpus, and its exports as factlab datasets.

    world = build_world(seed=0, size="tiny")
    fact = world.facts[0]                       # Fact(relation="born_in", subject="Aldo Brenner", ...)
    fact.prompt(world.relation(fact.relation).train_templates[0])   # "Aldo Brenner was born in"
    fact.answer                                 # " Velora"

Everything is a pure function of ``(seed, size)``: the same pair gives the same entities, facts,
corpus and exports, byte for byte.
"""

from __future__ import annotations

import json
import os
import random
import re
from collections import defaultdict
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Iterator, Literal

from factlab.synth.names import COMPANY_TYPES, NameGenerator
from factlab.synth.relations import FILLERS, RELATIONS, RelationSpec

Split = Literal["train", "heldout"]

#: Entity kinds, in generation order.
KINDS = ("person", "city", "country", "company", "language", "sport")


@dataclass(frozen=True)
class WorldSize:
    """How big a world is.

    Attributes:
        name: the size's name (``"tiny"``, ``"small"`` or a custom one).
        relations: keys of :data:`factlab.synth.relations.RELATIONS` the world uses.
        people, cities, countries, companies, languages, sports: entity counts per kind.
        given_names, family_names: pools that person names (``"Given Family"``) are drawn from;
            given names are shared between people, so a person is identified by both tokens.
        train_templates: how many of each relation's training templates the corpus uses.
        documents: ``"bio"`` (one document per subject holding all its facts, see
            :meth:`World.corpus`) or ``"sentences"`` (fact sentences of any subjects, shuffled and
            grouped 1..``max_facts_per_doc`` per document).
        pair_only: a person's objects depend on the *pair* of name tokens only: every given name
            and every family name occurs with every object of a person relation (almost) equally
            often (a Latin-square design), so neither token alone tells anything and the model
            has to assemble the name before it can look anything up. With it, a person relation
            uses ``min(objects, given_names, family_names)`` objects.
    """

    name: str
    relations: tuple[str, ...]
    people: int
    cities: int
    countries: int
    companies: int
    languages: int
    sports: int
    given_names: int
    family_names: int
    train_templates: int = 2
    documents: str = "sentences"
    pair_only: bool = False

    def count(self, kind: str) -> int:
        """Number of entities of ``kind``."""
        return {
            "person": self.people,
            "city": self.cities,
            "country": self.countries,
            "company": self.companies,
            "language": self.languages,
            "sport": self.sports,
        }[kind]


SIZES: dict[str, WorldSize] = {
    # 36 people (6 given x 6 family names, every pair once) x 6 relations + 12 cities + 10 companies
    # = 238 facts; bio documents; each person's objects depend on the whole name only.
    "tiny": WorldSize(
        name="tiny",
        relations=("born_in", "lives_in", "works_for", "speaks", "plays", "citizen_of", "located_in", "headquarters"),
        people=36, cities=12, countries=6, companies=10, languages=8, sports=8,
        given_names=6, family_names=6, train_templates=2, documents="bio", pair_only=True,
    ),
    # 240 people (12 given x 20 family) x 6 relations + 48 cities + 16 x 2 + 40 companies = 1,560 facts; for a GPU.
    "small": WorldSize(
        name="small",
        relations=tuple(RELATIONS),
        people=240, cities=48, countries=16, companies=40, languages=16, sports=12,
        given_names=12, family_names=20, train_templates=3, documents="bio", pair_only=True,
    ),
}  # fmt: skip


@dataclass(frozen=True)
class Entity:
    """A named thing. ``id`` is a synthetic entity id (``"E12"``), ``kind`` one of :data:`KINDS`."""

    id: str
    kind: str
    name: str


#: a relation as used by one world: its spec with ``train_templates`` cut to the world size's count
Relation = RelationSpec


@dataclass(frozen=True)
class Fact:
    """``subject --relation--> object``. Names are stored next to ids for convenience."""

    relation: str
    subject: str
    subject_id: str
    object: str
    object_id: str

    def prompt(self, template: str) -> str:
        """``template`` with the subject filled in (the text that precedes the answer)."""
        return template.format(self.subject)

    @property
    def answer(self) -> str:
        """The object as a continuation: with its leading space (``" Velora"``)."""
        return " " + self.object

    def sentence(self, template: str) -> str:
        """The full training sentence: ``"Aldo Brenner was born in Velora."``."""
        return f"{self.prompt(template)}{self.answer}."


@dataclass(frozen=True)
class FactPrompt:
    """One (fact, template) prompt: ``prompt + answer`` is the fact; ``split`` says which templates."""

    fact_index: int
    relation: str
    template: str
    prompt: str
    answer: str
    split: Split


@dataclass
class World:
    """A synthetic world: entities, relations, facts and filler templates.

    Build one with :func:`build_world`; save it with :meth:`save` / :meth:`export`, reload it
    with :meth:`load`.
    """

    seed: int
    size: WorldSize
    entities: list[Entity]
    relations: list[Relation]
    facts: list[Fact]
    fillers: list[str]
    _by_id: dict[str, Entity] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        self._by_id = {e.id: e for e in self.entities}

    # ----------------------------------------------------------------- lookups
    def relation(self, key: str) -> Relation:
        """The relation with ``key`` (``"born_in"``)."""
        for r in self.relations:
            if r.key == key:
                return r
        raise KeyError(f"no relation {key!r} in this world (it has {', '.join(r.key for r in self.relations)})")

    def entity(self, entity_id: str) -> Entity:
        return self._by_id[entity_id]

    def entities_of(self, kind: str) -> list[Entity]:
        return [e for e in self.entities if e.kind == kind]

    def facts_of(self, relation: str) -> list[Fact]:
        return [f for f in self.facts if f.relation == relation]

    def prompts(self, split: Split = "train") -> list[FactPrompt]:
        """Every (fact, template) prompt of ``split``: ``len(facts) * templates per relation`` items."""
        out = []
        for i, f in enumerate(self.facts):
            r = self.relation(f.relation)
            for t in r.templates(split):
                out.append(FactPrompt(i, f.relation, t, f.prompt(t), f.answer, split))
        return out

    # ----------------------------------------------------------------- text
    def _filler(self, rng: random.Random) -> str:
        t = rng.choice(self.fillers)
        kinds = {k: self.entities_of(k) for k in KINDS}
        return re.sub(r"\{(\w+)\}", lambda m: rng.choice(kinds[m.group(1)]).name, t)

    def corpus(
        self, seed: int = 0, *, repeats: int = 1, max_facts_per_doc: int = 2, filler_rate: float = 0.5
    ) -> list[str]:
        """Training documents: every (fact, training template) sentence exactly ``repeats`` times.

        With ``size.documents == "bio"`` (the default sizes) a document is one subject's "biography":
        all of its facts, each sentence naming the subject in full, in a shuffled order, each fact on
        one of its templates; a subject gets ``train_templates`` documents per repeat, and the
        template of each fact rotates over them (from a seeded offset), as in the bioS data with
        permutation, full-name and multi-template augmentation of Allen-Zhu & Li ("Physics of
        Language Models 3.1", 2309.14316). ``max_facts_per_doc`` is unused there. With
        ``"sentences"`` the fact sentences of all subjects are shuffled and grouped into documents of
        1..``max_facts_per_doc`` sentences. Either way, with probability ``filler_rate`` a document
        also gets one filler sentence at a random place, and a different ``seed`` gives a different
        order and grouping (use one per epoch). Held-out templates never occur. Returns a list of
        strings (one document each, sentences joined by a space).
        """
        rng = random.Random(f"corpus:{self.seed}:{self.size.name}:{seed}")
        if self.size.documents == "bio":
            return self._bio_corpus(rng, repeats, filler_rate)
        sentences = [
            f.sentence(t) for f in self.facts for t in self.relation(f.relation).train_templates for _ in range(repeats)
        ]
        rng.shuffle(sentences)
        docs: list[str] = []
        i = 0
        while i < len(sentences):
            n = rng.randint(1, max_facts_per_doc)
            doc = sentences[i : i + n]
            i += n
            if rng.random() < filler_rate:
                doc.insert(rng.randint(0, len(doc)), self._filler(rng))
            docs.append(" ".join(doc))
        return docs

    def _bio_corpus(self, rng: random.Random, repeats: int, filler_rate: float) -> list[str]:
        """One document per (subject, template round): all the subject's facts, in a random order,
        each on its own template; over ``len(train_templates)`` rounds every (fact, template)
        sentence occurs exactly once per repeat."""
        by_subject: dict[str, list[Fact]] = defaultdict(list)
        for f in self.facts:
            by_subject[f.subject_id].append(f)
        docs: list[str] = []
        for _ in range(repeats):
            for facts in by_subject.values():
                n = len(self.relation(facts[0].relation).train_templates)
                offsets = [rng.randrange(n) for _ in facts]
                for k in range(n):
                    doc = [f.sentence(self.relation(f.relation).train_templates[(k + o) % n]) for f, o in zip(facts, offsets)]
                    rng.shuffle(doc)
                    if rng.random() < filler_rate:
                        doc.insert(rng.randint(0, len(doc)), self._filler(rng))
                    docs.append(" ".join(doc))
        rng.shuffle(docs)
        return docs

    def vocabulary_text(self) -> Iterator[str]:
        """Every piece of training text the tokenizer must know: names, fact sentences, fillers.

        Held-out templates are *not* included: their words must already occur here (checked by
        :meth:`check`), so no held-out prompt has an unknown token.
        """
        for e in self.entities:
            yield e.name
        for f in self.facts:
            for t in self.relation(f.relation).train_templates:
                yield f.sentence(t)
        for t in self.fillers:
            yield re.sub(r"\{(\w+)\}", "", t)

    # ----------------------------------------------------------------- checks
    def check(self) -> None:
        """Raise ``ValueError`` if the world breaks one of its guarantees.

        * every answer's first word is unique among all entity first words of the range, so the
          first token of an answer identifies the object;
        * every word of every held-out template occurs in the training text;
        * no held-out template is also a training template.
        """
        words = set()
        for text in self.vocabulary_text():
            words.update(_words(text))
        for r in self.relations:
            firsts: dict[str, str] = {}
            for e in self.entities_of(r.range):
                w = e.name.split()[0]
                if firsts.setdefault(w, e.id) != e.id:
                    raise ValueError(f"objects of {r.key} share the first word {w!r}")
            for t in r.heldout_templates:
                missing = [w for w in _words(t.replace("{}", "")) if w not in words]
                if missing:
                    raise ValueError(f"held-out template {t!r} of {r.key} has words never seen in training: {missing}")
                if t in r.train_templates:
                    raise ValueError(f"template {t!r} of {r.key} is both training and held-out")

    # ----------------------------------------------------------------- exports
    def known_records(self) -> list[dict[str, Any]]:
        """known_1000-style records, one per fact, on the canonical (first) training template.

        ``prediction`` is the world's true continuation (``" Velora."``); per-model files with the
        model's own greedy predictions are written by :func:`factlab.synth.train.train_models`.
        """
        out = []
        for i, f in enumerate(self.facts):
            t = self.relation(f.relation).train_templates[0]
            out.append(
                {
                    "known_id": i,
                    "subject": f.subject,
                    "attribute": f.object,
                    "template": t,
                    "prediction": f.answer + ".",
                    "prompt": f.prompt(t),
                    "relation_id": self.relation(f.relation).relation_id,
                }
            )
        return out

    def counterfact_records(self, max_prompts: int = 10) -> list[dict[str, Any]]:
        """CounterFact records in the original ROME schema, one per fact (``case_id`` = fact index).

        * ``requested_rewrite.prompt``: the canonical training template; ``target_new`` is another
          object of the same relation (some subject has it), drawn with the world's seed.
        * ``paraphrase_prompts``: the held-out templates filled with the subject.
        * ``neighborhood_prompts``: other subjects of the relation with the same true object
          (templates cycled), at most ``max_prompts``; empty for one-to-one relations.
        * ``attribute_prompts``: subjects of the relation whose true object is ``target_new``.
        * ``generation_prompts``: the relation's training templates filled with the subject.
        """
        rng = random.Random(f"counterfact:{self.seed}:{self.size.name}")
        by_object: dict[tuple[str, str], list[Fact]] = defaultdict(list)
        for f in self.facts:
            by_object[(f.relation, f.object_id)].append(f)
        out = []
        for i, f in enumerate(self.facts):
            r = self.relation(f.relation)
            # target_new: another object of this relation, so attribute prompts exist
            candidates = sorted({g.object_id for g in self.facts_of(r.key)} - {f.object_id}, key=_id_key)
            if not candidates:
                candidates = sorted({e.id for e in self.entities_of(r.range)} - {f.object_id}, key=_id_key)
            new = self.entity(rng.choice(candidates))
            tmpl = r.train_templates
            neighbours = [g for g in by_object[(r.key, f.object_id)] if g.subject_id != f.subject_id]
            attributes = by_object[(r.key, new.id)]
            rng.shuffle(neighbours := list(neighbours))
            rng.shuffle(attributes := list(attributes))
            out.append(
                {
                    "case_id": i,
                    "requested_rewrite": {
                        "prompt": tmpl[0],
                        "relation_id": r.relation_id,
                        "target_new": {"str": new.name, "id": new.id},
                        "target_true": {"str": f.object, "id": f.object_id},
                        "subject": f.subject,
                    },
                    "paraphrase_prompts": [f.prompt(t) for t in r.heldout_templates],
                    "neighborhood_prompts": [
                        g.prompt(tmpl[k % len(tmpl)]) for k, g in enumerate(neighbours[:max_prompts])
                    ],
                    "attribute_prompts": [g.prompt(tmpl[k % len(tmpl)]) for k, g in enumerate(attributes[:max_prompts])],
                    "generation_prompts": [f.prompt(t) for t in tmpl],
                }
            )
        return out

    def lre_relations(self) -> dict[str, dict[str, Any]]:
        """LRE-style relation objects keyed by relation key.

        Both ``prompt_templates`` and ``prompt_templates_zs`` are the training templates (the ones
        the models know); held-out templates are in ``world.json``.
        """
        out = {}
        for r in self.relations:
            out[r.key] = {
                "name": r.name,
                "prompt_templates": list(r.train_templates),
                "prompt_templates_zs": list(r.train_templates),
                "properties": {
                    "relation_type": "factual",
                    "domain_name": r.domain,
                    "range_name": r.range,
                    "symmetric": False,
                },
                "samples": [{"subject": f.subject, "object": f.object} for f in self.facts_of(r.key)],
            }
        return out

    def to_json(self) -> dict[str, Any]:
        """The whole world as plain JSON data (reload with :meth:`from_json`)."""
        return {
            "format": "factlab.synth.world/1",
            "seed": self.seed,
            "size": asdict(self.size),
            "entities": [asdict(e) for e in self.entities],
            "relations": [asdict(r) for r in self.relations],
            "facts": [asdict(f) for f in self.facts],
            "fillers": list(self.fillers),
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "World":
        size = dict(data["size"])
        size["relations"] = tuple(size["relations"])
        return cls(
            seed=int(data["seed"]),
            size=WorldSize(**size),
            entities=[Entity(**e) for e in data["entities"]],
            relations=[
                Relation(**{**r, "train_templates": tuple(r["train_templates"]), "heldout_templates": tuple(r["heldout_templates"])})
                for r in data["relations"]
            ],
            facts=[Fact(**f) for f in data["facts"]],
            fillers=list(data["fillers"]),
        )

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write ``world.json`` (the path given)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_json(), indent=1) + "\n", encoding="utf-8")
        return path

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> "World":
        """Read a world from ``world.json`` or from a build directory holding one."""
        path = Path(path)
        if path.is_dir():
            path = path / "world.json"
        return cls.from_json(json.loads(path.read_text(encoding="utf-8")))

    def export(self, out_dir: str | os.PathLike[str], corpus_epochs: int = 5) -> dict[str, Path]:
        """Write ``world.json`` and the datasets into ``out_dir``.

        Layout: ``world.json``, ``datasets/known.json``, ``datasets/counterfact.json``,
        ``datasets/relations/<relation key>.json``, and ``datasets/corpus.txt`` (training-distribution
        text, one document per line, ``corpus_epochs`` epochs of :meth:`corpus` with seeds 0.., e.g.
        for the second-moment statistics that editing needs). Returns the written paths by name.
        """
        out = Path(out_dir)
        ds = out / "datasets"
        (ds / "relations").mkdir(parents=True, exist_ok=True)
        paths = {"world": self.save(out / "world.json")}
        docs = [d for e in range(corpus_epochs) for d in self.corpus(e)]
        paths["corpus"] = ds / "corpus.txt"
        paths["corpus"].write_text("\n".join(docs) + "\n", encoding="utf-8")
        paths["known"] = _dump(ds / "known.json", self.known_records())
        paths["counterfact"] = _dump(ds / "counterfact.json", self.counterfact_records())
        for key, rel in self.lre_relations().items():
            paths[f"relations/{key}"] = _dump(ds / "relations" / f"{key}.json", rel)
        return paths


def _dump(path: Path, data: Any) -> Path:
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    return path


def _id_key(entity_id: str) -> int:
    return int(entity_id[1:])


_WORD = re.compile(r"\w+|[^\w\s]+")


def _words(text: str) -> list[str]:
    """Words as the word-level tokenizer splits them (``\\w+`` runs and punctuation runs)."""
    return _WORD.findall(text)


def _reserved_words() -> set[str]:
    words: set[str] = set()
    for r in RELATIONS.values():
        for t in r.train_templates + r.heldout_templates:
            words.update(w.lower() for w in _words(t))
    for t in FILLERS:
        words.update(w.lower() for w in _words(t))
    words.update(w.lower() for w in COMPANY_TYPES)
    return words


def _balanced(rng: random.Random, subjects: list[Entity], objects: list[Entity]) -> list[Entity]:
    """Objects for ``subjects``: object counts differ by at most one, and every object used has at
    least two subjects (so every fact has a CounterFact neighbour) when there are enough subjects.
    With more than ``len(subjects) // 2`` objects, a seeded subset of them is used."""
    k = min(len(objects), max(1, len(subjects) // 2))
    used = sorted(rng.sample(range(len(objects)), k))
    pool = [objects[used[i % k]] for i in range(len(subjects))]
    rng.shuffle(pool)
    return pool


def _pair_only(
    rng: random.Random, parts: list[tuple[int, int]], objects: list[Entity], n_given: int, n_family: int
) -> list[Entity]:
    """Objects for people given as (given index, family index) pairs such that neither name alone
    says anything about the object: with ``k`` objects, object ``(a[g] + b[f]) mod k`` for balanced
    seeded maps ``a``, ``b`` onto ``0..k-1`` (a Latin-square design). On a full given x family grid
    with ``k`` dividing both pool sizes, every given name and every family name sees every object
    equally often."""
    k = min(len(objects), n_given, n_family)
    used = sorted(rng.sample(range(len(objects)), k))
    rng.shuffle(used)
    a = [i % k for i in range(n_given)]
    b = [i % k for i in range(n_family)]
    rng.shuffle(a)
    rng.shuffle(b)
    return [objects[used[(a[g] + b[f]) % k]] for g, f in parts]


def build_world(seed: int = 0, size: str | WorldSize = "tiny") -> World:
    """A new world, a pure function of ``(seed, size)``.

    Args:
        seed: any integer.
        size: ``"tiny"``, ``"small"`` or a :class:`WorldSize`.

    Returns:
        A checked :class:`World`.
    """
    ws = SIZES[size] if isinstance(size, str) else size
    if isinstance(size, str) and size not in SIZES:
        raise ValueError(f"unknown world size {size!r}; choose one of {', '.join(SIZES)}")
    unknown = [k for k in ws.relations if k not in RELATIONS]
    if unknown:
        raise ValueError(f"unknown relations {unknown}; known: {', '.join(RELATIONS)}")
    rng = random.Random(f"world:{seed}:{ws.name}")
    names = NameGenerator(rng, _reserved_words())
    specs = [RELATIONS[k] for k in ws.relations]
    needed = {s.domain for s in specs} | {s.range for s in specs}

    entities: list[Entity] = []

    def add(kind: str, name: str) -> None:
        entities.append(Entity(f"E{len(entities)}", kind, name))

    for kind in KINDS:
        if kind not in needed:
            continue
        n = ws.count(kind)
        if kind == "person":
            given = [names.word("given") for _ in range(ws.given_names)]
            family = [names.word("family") for _ in range(ws.family_names)]
            if ws.people > len(given) * len(family):
                raise ValueError("more people than distinct given x family name pairs")
            pairs = rng.sample([(g, f) for g in given for f in family], ws.people)
            for g, f in pairs:
                add(kind, f"{g} {f}")
            name_parts = {f"{g} {f}": (given.index(g), family.index(f)) for g, f in pairs}
        elif kind == "company":
            for _ in range(n):
                add(kind, f"{names.word('company', min_syllables=2, max_syllables=3)} {rng.choice(COMPANY_TYPES)}")
        else:
            for _ in range(n):
                add(kind, names.word(kind))

    by_kind: dict[str, list[Entity]] = defaultdict(list)
    for e in entities:
        by_kind[e.kind].append(e)

    facts: list[Fact] = []
    assigned: dict[str, dict[str, Entity]] = {}
    for s in specs:
        subjects, objects = by_kind[s.domain], by_kind[s.range]
        if s.key == "capital":
            # Consistent with located_in when both exist: the capital is a city of that country.
            if "located_in" in assigned:
                city_by_id = {c.id: c for c in by_kind["city"]}
                cities_of: dict[str, list[Entity]] = defaultdict(list)
                for city_id, country in assigned["located_in"].items():
                    cities_of[country.id].append(city_by_id[city_id])
                objs = [rng.choice(cities_of[c.id]) if cities_of[c.id] else None for c in subjects]
                taken = {o.id for o in objs if o is not None}
                spare = [c for c in objects if c.id not in taken]
                rng.shuffle(spare)
                objs = [o if o is not None else spare.pop() for o in objs]
            else:
                if len(objects) < len(subjects):
                    raise ValueError("capital needs at least as many cities as countries")
                objs = rng.sample(objects, len(subjects))
        elif ws.pair_only and s.domain == "person":
            objs = _pair_only(rng, [name_parts[p.name] for p in subjects], objects, ws.given_names, ws.family_names)
        else:
            objs = _balanced(rng, subjects, objects)
        assigned[s.key] = {subj.id: o for subj, o in zip(subjects, objs)}
        for subj, o in zip(subjects, objs):
            facts.append(Fact(s.key, subj.name, subj.id, o.name, o.id))

    relations = [replace(s, train_templates=s.train_templates[: ws.train_templates]) for s in specs]
    fillers = [t for t in FILLERS if all(k in needed for k in re.findall(r"\{(\w+)\}", t))]
    world = World(seed=seed, size=ws, entities=entities, relations=relations, facts=facts, fillers=fillers)
    world.check()
    return world

