"""CounterFact edit records, in either of its two public schemas, normalised to one dataclass.

Schemas:

- ``"rome"``: the original ROME/MEMIT schema (``counterfact/counterfact_subset.json``, ROME's
  ``counterfact.json``): ``case_id``, ``requested_rewrite`` {``prompt`` (template with ``{}``),
  ``subject``, ``target_new`` {``str``, ``id``}, ``target_true`` {``str``, ``id``},
  ``relation_id``}, and lists ``paraphrase_prompts``, ``neighborhood_prompts``,
  ``attribute_prompts``, ``generation_prompts``.
- ``"easyedit"``: EasyEdit's flat schema (``counterfact/counterfact-edit.json``): ``case_id``,
  ``prompt`` (filled in), ``subject``, ``target_new``, ``ground_truth``, ``rephrase_prompt``,
  ``locality_prompt``, ``locality_ground_truth``.

Targets are kept exactly as stored, with **no leading space**; callers that score a target as a
continuation must add the space themselves (``" " + target_new``), as ROME does.

A record may lack its paraphrase or neighbourhood prompts (missing, ``null`` or ``[]``): it loads, with an
empty list, and :func:`records_missing_prompts` lists such records so that an evaluation can say which of its
metrics cover fewer cases (or refuse them).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from factlab.errors import InputError

from ._files import read_json, require, require_list, take
from .errors import SchemaError
from .paths import resolve

DATASET = "counterfact"
DEFAULT_FILE = "counterfact_subset.json"
EASYEDIT_FILE = "counterfact-edit.json"

Schema = Literal["auto", "rome", "easyedit"]

ROME_FIELDS = ("case_id", "requested_rewrite")
ROME_REWRITE_FIELDS = ("prompt", "subject", "target_new", "target_true")
EASYEDIT_FIELDS = ("prompt", "subject", "target_new", "ground_truth")
#: the prompt lists the paraphrase (PS/PM) and neighbourhood (NS/NM) metrics need
PROMPT_LISTS = ("paraphrase_prompts", "neighborhood_prompts")


@dataclass(frozen=True)
class CounterFactRecord:
    """One counterfactual edit, whatever schema it came from.

    Attributes:
        case_id: the CounterFact case id (unique within a file).
        subject: the subject string, e.g. ``"Danielle Darrieux"``.
        prompt: the rewrite template with ``{}`` for the subject, e.g.
            ``"The mother tongue of {} is"``. For EasyEdit records it is recovered from the
            filled-in prompt by replacing the subject's last occurrence with ``{}``.
        target_new: the new (counterfactual) object, no leading space.
        target_true: the true object, no leading space.
        paraphrase_prompts: filled-in prompts that should also yield ``target_new`` after the
            edit. EasyEdit: ``[rephrase_prompt]``; note that in ``counterfact-edit.json`` this is
            often one of ROME's *generation* prompts rather than a paraphrase prompt.
        neighborhood_prompts: filled-in prompts about other subjects with the same true object;
            they should keep ``target_true`` (EasyEdit: ``[locality_prompt]``, whose answer is
            ``locality_ground_truth``).
        attribute_prompts: prompts about other subjects that have ``target_new`` (ROME only).
        generation_prompts: prompts for free generation (ROME only).
        relation_id: Wikidata property id (``None`` where the schema has none).
        target_new_id, target_true_id: Wikidata ids of the targets (``None`` where absent).
        pararel_idx: ParaRel index (ROME schema only).
        locality_ground_truth: EasyEdit's expected answer of the locality prompt (``None`` for
            ROME records, whose neighborhood prompts expect ``target_true``).
        schema: ``"rome"`` or ``"easyedit"``: where the record came from.
    """

    case_id: int
    subject: str
    prompt: str
    target_new: str
    target_true: str
    paraphrase_prompts: list[str] = field(default_factory=list)
    neighborhood_prompts: list[str] = field(default_factory=list)
    attribute_prompts: list[str] = field(default_factory=list)
    generation_prompts: list[str] = field(default_factory=list)
    relation_id: str | None = None
    target_new_id: str | None = None
    target_true_id: str | None = None
    pararel_idx: int | None = None
    locality_ground_truth: str | None = None
    schema: str = "rome"

    @property
    def filled_prompt(self) -> str:
        """The rewrite prompt with the subject filled in."""
        return self.prompt.replace("{}", self.subject)

    def requested_rewrite(self) -> dict[str, Any]:
        """The edit request in ROME's shape.

        ``{"prompt", "subject", "target_new": {"str"}, "target_true": {"str"}}``; ``"id"`` is
        added to a target and ``"relation_id"`` to the request when the record has them.
        """
        new: dict[str, Any] = {"str": self.target_new}
        true: dict[str, Any] = {"str": self.target_true}
        if self.target_new_id is not None:
            new["id"] = self.target_new_id
        if self.target_true_id is not None:
            true["id"] = self.target_true_id
        out: dict[str, Any] = {"prompt": self.prompt, "subject": self.subject, "target_new": new, "target_true": true}
        if self.relation_id is not None:
            out["relation_id"] = self.relation_id
        return out

    def to_dict(self) -> dict[str, Any]:
        """All fields as a plain dict."""
        return asdict(self)

    def missing_prompts(self) -> list[str]:
        """Which of :data:`PROMPT_LISTS` this record has no prompts for (their metrics have no value for it)."""
        return [name for name in PROMPT_LISTS if not getattr(self, name)]


def records_missing_prompts(records: Sequence[CounterFactRecord]) -> dict[str, list[int]]:
    """``{"paraphrase_prompts": [case ids], "neighborhood_prompts": [case ids]}``: the records without any
    prompt of that kind, in order (both keys always present)."""
    out: dict[str, list[int]] = {name: [] for name in PROMPT_LISTS}
    for r in records:
        for name in r.missing_prompts():
            out[name].append(r.case_id)
    return out


def _prompt_list(r: Mapping[str, Any], key: str, where: str) -> list[str]:
    """``r[key]`` as a list of prompt strings; missing or ``null`` is an empty list, anything else not a list
    of strings is a :class:`SchemaError` (a bare string would otherwise become a list of its characters)."""
    v = r.get(key)
    if v is None:
        return []
    if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
        raise SchemaError(f"{where}: {key} must be a list of prompt strings, got {_json_type(v)}")
    return list(v)


def _json_type(v: Any) -> str:
    """A short description of a JSON value's type, for error messages."""
    if isinstance(v, list):
        kinds = sorted({type(x).__name__ for x in v if not isinstance(x, str)})
        return f"a list holding {', '.join(kinds)}"
    return type(v).__name__


def template_from_prompt(prompt: str, subject: str) -> str:
    """Turn a filled-in prompt into a template by replacing the subject's last occurrence with ``{}``.

    Raises:
        ValueError: the subject does not occur in the prompt.
    """
    i = prompt.rfind(subject) if subject else -1
    if i < 0:
        raise ValueError(f"subject {subject!r} does not occur in prompt {prompt!r}")
    return prompt[:i] + "{}" + prompt[i + len(subject):]


def detect_schema(record: Mapping[str, Any], where: str = "record") -> Literal["rome", "easyedit"]:
    """Which CounterFact schema a record follows, from its fields.

    Raises:
        SchemaError: it follows neither; the message names the missing fields of each.
    """
    if isinstance(record, Mapping):
        if all(f in record for f in ROME_FIELDS):
            return "rome"
        if all(f in record for f in EASYEDIT_FIELDS):
            return "easyedit"
        keys = list(record)
    else:
        keys = []
    miss_rome = [f for f in ROME_FIELDS if f not in keys]
    miss_ee = [f for f in EASYEDIT_FIELDS if f not in keys]
    raise SchemaError(
        f"{where} matches neither CounterFact schema: the ROME schema needs {', '.join(miss_rome)}; "
        f"the EasyEdit schema needs {', '.join(miss_ee)} (it has {', '.join(keys) or 'no fields'})",
        missing=sorted(set(miss_rome) | set(miss_ee)),
    )


def from_rome(r: Mapping[str, Any], where: str = "record") -> CounterFactRecord:
    """Build a record from a ROME-schema dict (missing prompt lists become empty lists)."""
    require(r, ROME_FIELDS, where)
    rw = r["requested_rewrite"]
    require(rw, ROME_REWRITE_FIELDS, f"{where} requested_rewrite")
    require(rw["target_new"], ("str",), f"{where} requested_rewrite.target_new")
    require(rw["target_true"], ("str",), f"{where} requested_rewrite.target_true")
    if "{}" not in rw["prompt"]:
        raise SchemaError(f"{where}: requested_rewrite.prompt {rw['prompt']!r} has no '{{}}' for the subject")
    return CounterFactRecord(
        case_id=int(r["case_id"]),
        subject=rw["subject"],
        prompt=rw["prompt"],
        target_new=rw["target_new"]["str"],
        target_true=rw["target_true"]["str"],
        paraphrase_prompts=_prompt_list(r, "paraphrase_prompts", where),
        neighborhood_prompts=_prompt_list(r, "neighborhood_prompts", where),
        attribute_prompts=_prompt_list(r, "attribute_prompts", where),
        generation_prompts=_prompt_list(r, "generation_prompts", where),
        relation_id=rw.get("relation_id"),
        target_new_id=rw["target_new"].get("id"),
        target_true_id=rw["target_true"].get("id"),
        pararel_idx=r.get("pararel_idx"),
        schema="rome",
    )


def from_easyedit(r: Mapping[str, Any], index: int, where: str = "record") -> CounterFactRecord:
    """Build a record from an EasyEdit flat dict; ``case_id`` defaults to ``index`` when absent."""
    require(r, EASYEDIT_FIELDS, where)
    try:
        template = template_from_prompt(r["prompt"], r["subject"])
    except ValueError as e:
        raise SchemaError(f"{where}: {e}") from e
    return CounterFactRecord(
        case_id=int(r.get("case_id", index)),
        subject=r["subject"],
        prompt=template,
        target_new=r["target_new"],
        target_true=r["ground_truth"],
        paraphrase_prompts=[r["rephrase_prompt"]] if r.get("rephrase_prompt") else [],
        neighborhood_prompts=[r["locality_prompt"]] if r.get("locality_prompt") else [],
        locality_ground_truth=r.get("locality_ground_truth"),
        schema="easyedit",
    )


def load_counterfact(
    path: str | os.PathLike[str] | None = None,
    schema: Schema = "auto",
    limit: int | None = None,
    *,
    file: str = DEFAULT_FILE,
) -> list[CounterFactRecord]:
    """Load CounterFact records from a file in either schema.

    Args:
        path: explicit file (or data directory); else ``file`` is resolved in ``$FACTLAB_DATA``,
            the cache, or downloaded (see :func:`factlab.data.paths.resolve`).
        schema: ``"auto"`` detects the schema from the first record's fields.
        limit: keep the first ``limit`` records.
        file: which file of the ``counterfact/`` folder: ``"counterfact_subset.json"`` (default,
            3,293 records, ROME schema; only in the shared data, no upstream copy),
            ``"counterfact-edit.json"`` (10,000, EasyEdit schema), or ``"counterfact.json"`` /
            ``"multi_counterfact.json"`` (ROME's full files, downloadable).
    """
    if schema not in ("auto", "rome", "easyedit"):
        raise InputError(f"schema must be 'auto', 'rome' or 'easyedit', got {schema!r}")
    src = resolve(DATASET, file, path)
    records = require_list(read_json(src), src, "CounterFact")
    records = take(records, limit)
    if not records:
        return []
    kind = detect_schema(records[0], f"{src} record 0") if schema == "auto" else schema
    if kind == "rome":
        return [from_rome(r, f"{src} record {i}") for i, r in enumerate(records)]
    return [from_easyedit(r, i, f"{src} record {i}") for i, r in enumerate(records)]
