"""The evaluation harness: pre-edit scores (cached), edits, post-edit scores, resumable run dirs.

A run directory holds ``config.json`` (the exact configuration, the model's identity -- weights id,
dtype and attention implementation -- and the data hash; a run dir from a different configuration or
another dtype is refused, naming the differences), ``cases.jsonl`` (one record per case, appended as each
completes; ``cases.rank{r}.jsonl`` while several processes run), for sequential runs ``final.jsonl`` and
``stream/`` (an :class:`~factlab.edit.stream.EditStream`: earlier batches' keys reach history-using solvers and
committed batches are re-applied on resume), and ``summary.json``. Records are keyed by case id and read back deduplicated, so a run killed at any point
resumes where it stopped with nothing lost or counted twice; while a process writes a run dir it holds
:func:`factlab.io.run_lock` on it, so a second process started on the same dir fails at once, naming the
holder. Pre-edit scores depend only on (model and its numerics, data, metric settings) and are cached
under ``cache_dir()/evaluate/pre/<key>/`` for every method and batch size.

Everything that can be checked without the model running is checked first: the configuration, the edit
layers and hyperparameters, the data (CounterFact records without paraphrase or neighbourhood prompts are
named in a warning, or refused with ``strict_records``), the run dir's identity and its lock.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import socket
import time
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from factlab.errors import InputError, RunLockedError
from factlab.evaluate import counterfact as cf
from factlab.evaluate import mquake as mq
from factlab.evaluate import zsre as zs
from factlab.evaluate.distributed import DistContext, init_distributed
from factlab.evaluate.fluency import GenerationConfig, TfidfReference, word_tokenizer_name
from factlab.evaluate.metrics import METRICS_VERSION
from factlab.evaluate.mquake import MquakeConfig
from factlab.evaluate.summary import Summary, summarise_metrics
from factlab.io import append_jsonl, read_jsonl, run_lock, write_json
from factlab.models.loading import LoadedModel
from factlab.progress import progress_bar

log = logging.getLogger(__name__)

DATASETS = ("counterfact", "zsre", "mquake")
#: the built-in editing methods (any solver registered with :mod:`factlab.edit.registry` is accepted too)
METHODS = ("none", "rome", "memit", "emmet", "memit_history", "alphaedit")
#: sub-folder of a sequential run's folder holding its :class:`~factlab.edit.stream.EditStream`
STREAM_DIR = "stream"


def method_names() -> tuple[str, ...]:
    """``"none"`` and every registered solver's name (read from the registry now, so late registrations count)."""
    from factlab.edit.registry import solver_names

    return ("none", *solver_names())

#: ``editor(lm, requests, method, layers, hparams) -> result`` with ``result.restore()``
Editor = Callable[[LoadedModel, list[dict[str, Any]], str, "list[int] | None", "dict[str, Any] | None"], Any]


class RunConfigMismatch(InputError):
    """The run directory was started with a different configuration (or model, dtype or data)."""


@dataclass(frozen=True)
class EvalConfig:
    """Everything that defines an evaluation's result (hashed into the run and the pre-edit cache).

    ``generation=None`` turns fluency off; ``reference_dir`` names ROME's snippet/IDF files for the
    reference score. ``limit`` counts kept cases (after ``known_only``).
    """

    dataset: str
    method: str = "none"
    batch_size: int = 1
    sequential: bool = False
    limit: int | None = None
    known_only: bool = False
    known_criterion: str = "prefers"
    data_path: str | None = None
    data_file: str | None = None
    schema: str = "auto"
    layers: tuple[int, ...] | None = None
    hparams: dict[str, Any] | None = None
    generation: GenerationConfig | None = field(default_factory=GenerationConfig)
    reference_dir: str | None = None
    zsre_convention: str = "rome"
    mquake: MquakeConfig = field(default_factory=MquakeConfig)
    unique_subjects: bool = True
    generative: bool = True  # gen_* metrics by greedy decoding beside the teacher-forced ones (docs/evaluate.md)

    def validate(self) -> None:
        """Refuse settings that are invalid whatever the model (:class:`InputError` naming the fix)."""
        if self.dataset not in DATASETS:
            raise InputError(f"dataset must be one of {', '.join(DATASETS)}, not {self.dataset!r}")
        names = method_names()
        if self.method not in names:
            raise InputError(f"method must be one of {', '.join(names)}, not {self.method!r} "
                             "(register another with factlab.edit.registry.register_solver)")
        if self.batch_size < 1:
            raise InputError("batch_size must be at least 1")
        if self.limit is not None and self.limit < 1:
            raise InputError("limit must be at least 1")
        if self.known_only and self.dataset != "counterfact":
            raise InputError("--known-only is defined for CounterFact (true target preferred over the new one); zsRE and MQuAKE have no such pair")
        if self.known_criterion not in ("prefers", "argmax"):
            raise InputError("known_criterion must be 'prefers' or 'argmax'")
        if self.zsre_convention not in ("rome", "mend"):
            raise InputError("zsre_convention must be 'rome' or 'mend'")
        if self.sequential and self.method == "none":
            raise InputError("--sequential needs an editing method")

    def uses_generation(self) -> bool:
        return self.dataset == "counterfact" and self.generation is not None and self.generation.gen_prompts != 0

    def pre_settings(self) -> dict[str, Any]:
        """What the pre-edit scores depend on, besides model and data."""
        d: dict[str, Any] = {"dataset": self.dataset, "metrics_version": METRICS_VERSION}
        if self.dataset == "counterfact":
            d["generation"] = self.generation.to_dict() if self.uses_generation() else None
            d["reference_dir"] = str(Path(self.reference_dir).resolve()) if self.reference_dir else None
            d["word_tokenizer"] = word_tokenizer_name() if self.uses_generation() else None
            d["generative"] = self.generative
        elif self.dataset == "zsre":
            d["zsre_convention"] = self.zsre_convention
            d["generative"] = self.generative
        else:
            d["mquake"] = self.mquake.to_dict()
        return d

    def to_dict(self) -> dict[str, Any]:
        return {
            "dataset": self.dataset,
            "method": self.method,
            "batch_size": self.batch_size,
            "sequential": self.sequential,
            "limit": self.limit,
            "known_only": self.known_only,
            "known_criterion": self.known_criterion if self.known_only else None,
            "data_file": self.data_file,
            "schema": self.schema,
            "layers": list(self.layers) if self.layers is not None else None,
            "hparams": self.hparams,
            "unique_subjects": self.unique_subjects,
            **{k: v for k, v in self.pre_settings().items() if k != "dataset"},
        }


@dataclass
class Case:
    """One evaluation case: its record and the edit requests (ROME dict shape) it asks for."""

    case_id: int
    record: Any
    requests: list[dict[str, Any]]


def _sha(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def _file_sha(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(1 << 22):
            h.update(b)
    return h.hexdigest()


def _valid_request(rw: dict[str, Any]) -> bool:
    return "{}" in rw.get("prompt", "") and bool(str(rw.get("subject", "")).strip())


def load_cases(cfg: EvalConfig, records: Sequence[Any] | None = None) -> tuple[list[Case], dict[str, Any]]:
    """The dataset's cases in file order, with data facts (file, sha256, counts, skipped cases).

    Cases whose subject is not in the prompt are skipped and counted (``data["skipped"]``); with
    ``cfg.unique_subjects`` (default) so are CounterFact/zsRE cases whose subject an earlier case
    already has, as MEMIT's MultiCounterFact does, so that every batch size edits the same cases and
    no batch holds two conflicting requests.
    """
    from factlab import data as D

    info: dict[str, Any] = {}
    if records is None:
        if cfg.dataset == "counterfact":
            file = cfg.data_file or D.counterfact.DEFAULT_FILE
            path = D.resolve("counterfact", file, cfg.data_path)
            records = D.load_counterfact(path, schema=cfg.schema)  # type: ignore[arg-type]
        elif cfg.dataset == "zsre":
            file = cfg.data_file or D.zsre.DEFAULT_FILE
            path = D.resolve("zsre", file, cfg.data_path)
            records = D.load_zsre(path)
        else:
            file = cfg.data_file or D.mquake.DEFAULT_FILE
            path = D.resolve("mquake", file, cfg.data_path)
            records = D.load_mquake(path)
        info.update({"file": str(path), "sha256": _file_sha(path)})
    else:
        info.update({"file": None, "sha256": _sha([r.to_dict() for r in records])})
    cases: list[Case] = []
    skipped: list[int] = []
    dupes: list[int] = []
    subjects: set[str] = set()
    seen: set[int] = set()
    for r in records:
        if r.case_id in seen:
            raise InputError(f"case id {r.case_id} occurs twice in the dataset; case ids must be unique")
        seen.add(r.case_id)
        if cfg.dataset == "counterfact":
            reqs = [r.requested_rewrite()]
        elif cfg.dataset == "zsre":
            if r.subject not in r.src:
                skipped.append(r.case_id)
                continue
            reqs = [zs.request_dict(r, cfg.zsre_convention)]  # type: ignore[arg-type]
        else:
            reqs = [dict(x) for x in r.requested_rewrite]
        if not reqs or not all(_valid_request(x) for x in reqs):
            skipped.append(r.case_id)
            continue
        if cfg.unique_subjects and cfg.dataset != "mquake":
            if r.subject in subjects:
                dupes.append(r.case_id)
                continue
            subjects.add(r.subject)
        cases.append(Case(r.case_id, r, reqs))
    info.update(
        {
            "n_records": len(records),
            "skipped": {"subject_not_in_prompt": len(skipped), "duplicate_subject": len(dupes)},
            "skipped_case_ids": {"subject_not_in_prompt": skipped, "duplicate_subject": dupes},
        }
    )
    return cases, info


# --------------------------------------------------------------------------- per-case evaluation
def _evaluate(lm: LoadedModel, cfg: EvalConfig, case: Case, reference: TfidfReference | None, *, scores_only: bool = False) -> dict[str, Any]:
    if cfg.dataset == "counterfact":
        gen = cfg.generation if (cfg.uses_generation() and not scores_only) else None
        return cf.evaluate_record(lm, case.record, generation=gen, reference=reference if gen else None,
                                  generative=cfg.generative and not scores_only)
    if cfg.dataset == "zsre":
        return zs.evaluate_record(lm, case.record, convention=cfg.zsre_convention, generative=cfg.generative)  # type: ignore[arg-type]
    return mq.evaluate_case(lm, case.record, cfg=cfg.mquake)


def default_editor(lm: LoadedModel, requests: list[dict[str, Any]], method: str, layers, hparams, value_cache: Any = None) -> Any:
    """Edit with :func:`factlab.edit.edit` (the model is edited on return; the result restores it).

    ``value_cache``: a folder or :class:`factlab.edit.ValueCache` reused across calls (only correct when
    every call starts from the unedited weights, as non-sequential runs do)."""
    try:
        from factlab.edit import Request, edit
    except ImportError as e:  # pragma: no cover - depends on the edit package being installed
        raise RuntimeError(f"method {method!r} needs factlab.edit, which could not be imported: {e}") from e
    # the papers edit every case, also those whose target the model already predicts
    return edit(
        lm, [Request.from_dict(r) for r in requests], method=method, layers=list(layers) if layers else None, hparams=hparams,
        on_known="edit", value_cache=value_cache,
    )


# --------------------------------------------------------------------------- storage
class PreCache:
    """Pre-edit per-case results keyed by (model, data, settings); one append-only file per process."""

    def __init__(self, root: Path, key: str):
        self.dir = root / key
        self.file = self.dir / f"pre-{socket.gethostname()}-{os.getpid()}.jsonl"

    def load(self) -> dict[tuple[str, int], dict[str, Any]]:
        out: dict[tuple[str, int], dict[str, Any]] = {}
        if self.dir.is_dir():
            for f in sorted(self.dir.glob("pre-*.jsonl")):
                for r in read_jsonl(f):
                    out.setdefault((r["kind"], r["case_id"]), r)
        return out

    def add(self, entry: dict[str, Any]) -> None:
        append_jsonl(self.file, entry)


def read_records(run_dir: Path, stem: str = "cases") -> dict[int, dict[str, Any]]:
    """Records of ``stem.jsonl`` and its per-rank shards, first occurrence of each case id wins."""
    out: dict[int, dict[str, Any]] = {}
    files = [run_dir / f"{stem}.jsonl", *sorted(run_dir.glob(f"{stem}.rank*.jsonl"))]
    for f in files:
        for r in read_jsonl(f):
            out.setdefault(int(r["case_id"]), r)
    return out


def merge_shards(run_dir: Path, stem: str = "cases") -> None:
    """Fold per-rank shard files into ``stem.jsonl`` (crash-safe: append missing, then delete shards)."""
    shards = sorted(run_dir.glob(f"{stem}.rank*.jsonl"))
    if not shards:
        return
    main = run_dir / f"{stem}.jsonl"
    have = {int(r["case_id"]) for r in read_jsonl(main)}
    extra: dict[int, dict[str, Any]] = {}
    for f in shards:
        for r in read_jsonl(f):
            if int(r["case_id"]) not in have:
                extra.setdefault(int(r["case_id"]), r)
    for cid in sorted(extra):
        append_jsonl(main, extra[cid])
    for f in shards:
        f.unlink()


def run_identity(lm: LoadedModel, cfg: EvalConfig, data_sha256: str) -> dict[str, Any]:
    """What a run dir's ``config.json`` pins: the model's :attr:`~LoadedModel.identity` (weights id, dtype,
    attention implementation), the configuration and the data's hash."""
    return {**lm.identity, "config": cfg.to_dict(), "data_sha256": data_sha256}


def check_run_dir(run_dir: Path, identity: dict[str, Any]) -> None:
    """Write ``config.json`` or refuse when it holds a different identity (:class:`RunConfigMismatch` naming
    every difference, e.g. ``dtype: run dir has 'float32', this run has 'bfloat16'``, and how to resume)."""
    path = run_dir / "config.json"
    new = json.loads(json.dumps(identity, default=str))
    if not path.exists():
        write_json(path, identity)
        return
    old = json.loads(path.read_text())
    if old == new:
        return
    raise RunConfigMismatch(
        f"{run_dir} holds a run with a different configuration ({'; '.join(_diff(old, new))}); "
        f"use another --out directory, or delete this one to start over{_resume_hint(old, new)}"
    )


def _resume_hint(old: dict[str, Any], new: dict[str, Any]) -> str:
    """How to resume a run dir whose only trouble is the model's numerics."""
    if "dtype" not in old:
        return " (it was written before factlab recorded the model's dtype, so it cannot be resumed safely)"
    if old.get("dtype") != new.get("dtype"):
        return f"; to resume it, load the model as {old['dtype']} (--dtype {old['dtype']})"
    return ""


def _diff(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            out += _diff(a.get(k), b.get(k), f"{prefix}{k}.")
        return out
    return [] if a == b else [f"{prefix.rstrip('.')}: run dir has {a!r}, this run has {b!r}"]


# --------------------------------------------------------------------------- checks before any forward pass
def check_edit_settings(lm: LoadedModel, cfg: EvalConfig, *, default_editor: bool = True) -> None:
    """Refuse edit layers outside the model and, for the default editor, hyperparameters it would reject,
    before anything runs (the edit would otherwise fail only after the pre-edit scoring)."""
    n = lm.adapter.n_layers
    bad = [layer for layer in cfg.layers or () if not 0 <= layer < n]
    if bad:
        raise InputError(f"edit layer(s) {', '.join(map(str, bad))} outside this model's layers 0..{n - 1}; pass --layers within that range")
    if cfg.method != "none" and default_editor:
        from factlab.edit.api import resolve_hparams

        resolve_hparams(lm, cfg.method, cfg.hparams, cfg.layers)


#: the metrics left without a value for a CounterFact case that lacks a kind of prompt
_PROMPT_METRICS = {"paraphrase_prompts": "PS, PM and PS-acc", "neighborhood_prompts": "NS, NM and NS-acc"}


def _ids(ids: list[int], most: int = 20) -> str:
    return ", ".join(map(str, ids[:most])) + (f" and {len(ids) - most} more" if len(ids) > most else "")


def describe_missing_prompts(missing: dict[str, list[int]]) -> str:
    """One line naming, per kind of prompt, the cases without any (``""`` when there are none)."""
    return "; ".join(
        f"{len(ids)} CounterFact case(s) have no {name} (case id {_ids(ids)}): {_PROMPT_METRICS[name]} cannot be computed for them"
        for name, ids in missing.items() if ids
    )


def missing_prompts(cfg: EvalConfig, cases: Sequence[Case]) -> dict[str, list[int]]:
    """CounterFact: ``{kind of prompt list: [case ids without any]}`` over ``cases``; ``{}`` for other datasets."""
    if cfg.dataset != "counterfact":
        return {}
    from factlab.data.counterfact import records_missing_prompts

    return records_missing_prompts([c.record for c in cases])


def check_records(cfg: EvalConfig, cases: Sequence[Case], strict: bool) -> None:
    """With ``strict``, refuse CounterFact cases that would be evaluated without paraphrase or neighbourhood
    prompts. Without ``--known-only`` these are the first ``limit`` cases; with it every candidate is checked,
    since which are kept is known only after scoring."""
    if not strict:
        return
    candidates = cases if cfg.known_only or cfg.limit is None else cases[: cfg.limit]
    what = describe_missing_prompts(missing_prompts(cfg, candidates))
    if what:
        raise InputError(f"{what}; fix the data file, or run without --strict-records (strict_records=False) to evaluate them without those metrics")


@contextmanager
def writer_lock(run_dir: Path, dist: DistContext) -> Iterator[None]:
    """Hold :func:`factlab.io.run_lock` on ``run_dir`` (rank 0, for every rank) while the run writes it; when
    another process holds it, every rank raises :class:`RunLockedError` naming the holder."""
    with ExitStack() as stack:
        refused = None
        if dist.is_main:
            try:
                stack.enter_context(run_lock(run_dir))
            except RunLockedError as e:
                refused = str(e)
        refused = dist.broadcast(refused)
        if refused is not None:
            raise RunLockedError(refused)
        yield


# --------------------------------------------------------------------------- the run
@dataclass
class _Run:
    lm: LoadedModel
    cfg: EvalConfig
    dist: DistContext
    reference: TfidfReference | None
    cache: PreCache
    pre: dict[tuple[str, int], dict[str, Any]]

    def pre_entry(self, case: Case, kind: str) -> dict[str, Any]:
        """``kind`` 'scores' (cheap, for --known-only) or 'full' (all pre metrics), cached."""
        key = (kind, case.case_id)
        if key not in self.pre:
            res = _evaluate(self.lm, self.cfg, case, self.reference, scores_only=(kind == "scores"))
            entry = {"kind": kind, "case_id": case.case_id, "metrics": res["metrics"], "scores": res.get("scores")}
            self.cache.add(entry)
            self.pre[key] = entry
        return self.pre[key]

    def fill_pre(self, cases: list[Case], kind: str, desc: str) -> None:
        """Compute missing pre entries, cases split over ranks, then share them with every rank."""
        todo = [c for c in cases if (kind, c.case_id) not in self.pre]
        mine = todo[self.dist.rank :: self.dist.world_size]
        new = []
        with progress_bar(desc=desc, total=len(mine), unit="case") as bar:
            for c in mine:
                new.append(self.pre_entry(c, kind))
                bar.update(1)
        for part in self.dist.all_gather(new):
            for e in part:
                self.pre.setdefault((e["kind"], e["case_id"]), e)


def _select(run: _Run, cases: list[Case]) -> tuple[list[Case], dict[str, Any]]:
    cfg = run.cfg
    if not cfg.known_only:
        return (cases[: cfg.limit] if cfg.limit else cases), {}
    kept: list[Case] = []
    checked = 0
    chunk = 16 * run.dist.world_size
    i = 0
    while i < len(cases) and (cfg.limit is None or len(kept) < cfg.limit):
        block = cases[i : i + chunk]
        run.fill_pre(block, "scores", "pre-edit scores (known facts)")
        for c in block:
            if cfg.limit is not None and len(kept) >= cfg.limit:
                break
            checked += 1
            if cf.is_known(run.pre[("scores", c.case_id)]["scores"], cfg.known_criterion):
                kept.append(c)
        i += chunk
    return kept, {"known_checked": checked, "known_kept": len(kept), "known_criterion": cfg.known_criterion}


def _record(case: Case, batch_index: int, batch: list[Case], pre: dict[str, Any], post: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    return {
        "case_id": case.case_id,
        "batch_index": batch_index,
        "batch_case_ids": [c.case_id for c in batch],
        "pre": pre["metrics"],
        "post": post["metrics"],
        "post_scores": post.get("scores"),
        **extra,
    }


def evaluate(
    lm: LoadedModel,
    dataset: str | Sequence[Any],
    *,
    method: str = "none",
    batch_size: int = 1,
    sequential: bool = False,
    limit: int | None = None,
    known_only: bool = False,
    known_criterion: str = "prefers",
    out: str | os.PathLike[str] | None = None,
    data_path: str | None = None,
    data_file: str | None = None,
    schema: str = "auto",
    layers: Sequence[int] | None = None,
    hparams: dict[str, Any] | None = None,
    generation: GenerationConfig | None = GenerationConfig(),
    reference_dir: str | None = None,
    zsre_convention: str = "rome",
    mquake: MquakeConfig = MquakeConfig(),
    generative: bool = True,
    editor: Editor | None = None,
    pre_cache_dir: str | os.PathLike[str] | None = None,
    dist: DistContext | None = None,
    on_record: Callable[[dict[str, Any]], None] | None = None,
    reuse_values: bool = True,
    strict_records: bool = False,
) -> Summary:
    """Evaluate ``method`` on a dataset and return the :class:`Summary` (also written to ``out``).

    ``dataset``: ``"counterfact"``, ``"zsre"``, ``"mquake"`` (files found as :mod:`factlab.data`
    does; ``data_path``/``data_file`` override), or ``(name, records)`` with records loaded by
    :mod:`factlab.data` (their hash then stands in for the file's).
    ``method``: ``"none"`` or any solver registered in :mod:`factlab.edit.registry` (checked when the run starts).
    Cases are edited ``batch_size`` at a time; each batch is restored before the next unless
    ``sequential`` (then the batches go through an edit stream in ``out/stream``, a final pass scores every case
    on the last model, phase ``final``, and the model is restored at the end). ``out``: run directory (resumable); without it, a temporary
    one is used. ``editor`` replaces :func:`default_editor` (for other editors or tests). Under
    ``torchrun`` cases are split across processes and rank 0 writes the merged summary; every rank
    returns it. The model is unchanged on return. ``reuse_values``, ``strict_records`` and the errors raised
    before any forward pass: see :func:`run_evaluation`.
    """
    records = None
    if not isinstance(dataset, str):
        name, records = dataset  # type: ignore[misc]
        dataset = name
    cfg = EvalConfig(
        dataset=dataset,
        method=method,
        batch_size=batch_size,
        sequential=sequential,
        limit=limit,
        known_only=known_only,
        known_criterion=known_criterion,
        data_path=data_path,
        data_file=data_file,
        schema=schema,
        layers=tuple(layers) if layers is not None else None,
        hparams=hparams,
        generation=generation,
        reference_dir=reference_dir,
        zsre_convention=zsre_convention,
        mquake=mquake,
        generative=generative,
    )
    return run_evaluation(lm, cfg, out=out, records=records, editor=editor, pre_cache_dir=pre_cache_dir, dist=dist, on_record=on_record,
                          reuse_values=reuse_values, strict_records=strict_records)


def run_evaluation(
    lm: LoadedModel,
    cfg: EvalConfig,
    *,
    out: str | os.PathLike[str] | None = None,
    records: Sequence[Any] | None = None,
    editor: Editor | None = None,
    pre_cache_dir: str | os.PathLike[str] | None = None,
    dist: DistContext | None = None,
    on_record: Callable[[dict[str, Any]], None] | None = None,
    reuse_values: bool = True,
    strict_records: bool = False,
) -> Summary:
    """:func:`evaluate` with an :class:`EvalConfig`.

    ``reuse_values``: with the default editor and a non-sequential run, optimised values are cached under
    ``cache_dir()/edit/values`` and reused by later runs on the same facts and weights (e.g. MEMIT at
    batch sizes 1, 10 and 100 optimise each fact's value once; see :mod:`factlab.edit.value_cache`).
    ``strict_records``: refuse CounterFact cases without paraphrase or neighbourhood prompts instead of
    warning (once per run, naming the case ids) and leaving those metrics out for them.

    Raises:
        InputError: a bad setting, edit layer or hyperparameter, or (strict) an incomplete record, before any
            forward pass; :class:`RunConfigMismatch` when ``out`` holds another run (configuration, model,
            dtype or data); :class:`RunLockedError` when another process is writing ``out``.
    """
    import tempfile

    cfg.validate()
    check_edit_settings(lm, cfg, default_editor=editor is None)
    t0 = time.time()
    own_dist = dist is None
    dist = dist or init_distributed()
    if cfg.sequential and dist.active:
        raise InputError("--sequential edits depend on every earlier batch and cannot be split across processes; run it in one process")
    tmp = None
    if out is None:
        tmp = tempfile.TemporaryDirectory(prefix="factlab-eval-")
        out = dist.broadcast(tmp.name)
    run_dir = Path(out)
    try:
        reference = None
        if cfg.reference_dir and cfg.uses_generation():
            reference = TfidfReference(cfg.reference_dir)
        cases, data_info = load_cases(cfg, records)
        check_records(cfg, cases, strict_records)
        with writer_lock(run_dir, dist):
            return _run_locked(lm, cfg, run_dir, cases, data_info, reference, t0, editor=editor, pre_cache_dir=pre_cache_dir,
                               dist=dist, on_record=on_record, reuse_values=reuse_values)
    finally:
        if own_dist:
            dist.close()
        if tmp is not None:
            tmp.cleanup()


def _run_locked(lm: LoadedModel, cfg: EvalConfig, run_dir: Path, cases: list[Case], data_info: dict[str, Any],
                reference: TfidfReference | None, t0: float, *, editor: Editor | None,
                pre_cache_dir: str | os.PathLike[str] | None, dist: DistContext,
                on_record: Callable[[dict[str, Any]], None] | None, reuse_values: bool) -> Summary:
    """The run proper, with ``run_dir`` locked: identity check, pre-edit scores, edits, records, summary."""
    identity = run_identity(lm, cfg, data_info["sha256"])
    if dist.is_main:
        check_run_dir(run_dir, identity)
    dist.barrier()
    if not dist.is_main:
        check_run_dir(run_dir, identity)
    key = _sha({"model": lm.numerics_id, "data_sha256": data_info["sha256"], **cfg.pre_settings()})[:24]
    from factlab.models import cache_dir

    cache = PreCache(Path(pre_cache_dir) if pre_cache_dir else cache_dir() / "evaluate" / "pre", key)
    run = _Run(lm, cfg, dist, reference, cache, cache.load())
    selected, known_info = _select(run, cases)
    data_info.update(known_info)
    if not selected:
        raise InputError("no cases to evaluate (check --limit / --known-only and the data file)")
    missing = missing_prompts(cfg, selected)
    if missing:
        data_info["missing_prompts"] = missing
        what = describe_missing_prompts(missing)
        if what and dist.is_main:
            log.warning("%s; they are null in cases.jsonl and each metric's n counts the cases it covers "
                        "(pass --strict-records / strict_records=True to refuse such data instead)", what)
    run.fill_pre(selected, "full", "pre-edit scores")
    editor_fn = editor or default_editor
    if editor is None and reuse_values and not cfg.sequential:
        editor_fn = functools.partial(default_editor, value_cache=cache_dir() / "edit" / "values")
    batches = [selected[i : i + cfg.batch_size] for i in range(0, len(selected), cfg.batch_size)]
    if cfg.sequential:
        _run_sequential(run, run_dir, batches, editor, on_record)
    else:
        _run_batches(run, run_dir, batches, editor_fn, on_record)
    dist.barrier()
    summary = _summarise(run, run_dir, selected, data_info, t0) if dist.is_main else None
    d = dist.broadcast(summary.to_dict() if summary is not None else None)
    return Summary.from_dict(d)


def _summarise(run: _Run, run_dir: Path, selected: list[Case], data_info: dict[str, Any], t0: float) -> Summary:
    """Merge the shards, read every case's records back and write ``summary.json`` (rank 0)."""
    cfg, lm, dist = run.cfg, run.lm, run.dist
    merge_shards(run_dir)
    recs = read_records(run_dir)
    final = read_records(run_dir, "final") if cfg.sequential else {}
    rows = []
    for c in selected:
        r = dict(recs[c.case_id])
        if c.case_id in final:
            r["final"] = final[c.case_id]["final"]
        rows.append(r)
    summary = Summary(
        dataset=cfg.dataset,
        method=cfg.method,
        config=cfg.to_dict(),
        model={"name": lm.name, **lm.identity},
        data=data_info,
        n_cases=len(rows),
        metrics=summarise_metrics(rows, cfg.dataset),
        unavailable=_unavailable(cfg, run.reference),
        run={"world_size": dist.world_size, "wall_s": round(time.time() - t0, 1), "run_dir": str(run_dir)},
    )
    summary.to_json(run_dir / "summary.json")
    return summary


def _unavailable(cfg: EvalConfig, reference: TfidfReference | None) -> dict[str, str]:
    """Metrics this run could not compute, with the reason."""
    out: dict[str, str] = {}
    if cfg.dataset != "counterfact":
        return out
    if not cfg.uses_generation():
        out["fluency_ngram_entropy"] = "generation disabled (--gen-prompts 0)"
        out["reference_tfidf_score"] = "generation disabled (--gen-prompts 0)"
    elif reference is None:
        out["reference_tfidf_score"] = (
            "needs ROME's attribute_snippets.json, idf.npy and tfidf_vocab.json (not in factlab's data); "
            "pass --reference-dir DIR holding them"
        )
    return out


def _records_file(run: _Run, run_dir: Path, stem: str = "cases") -> Path:
    return run_dir / (f"{stem}.jsonl" if not run.dist.active else f"{stem}.rank{run.dist.rank}.jsonl")


def _post(run: _Run, case: Case) -> dict[str, Any]:
    if run.cfg.method == "none":
        return run.pre[("full", case.case_id)]  # the model is the unedited one: post == pre exactly
    return _evaluate(run.lm, run.cfg, case, run.reference)


def _run_batches(run: _Run, run_dir: Path, batches: list[list[Case]], editor: Editor, on_record) -> None:
    done = read_records(run_dir)
    mine = [(k, b) for k, b in enumerate(batches) if k % run.dist.world_size == run.dist.rank]
    todo = [(k, b) for k, b in mine if any(c.case_id not in done for c in b)]
    path = _records_file(run, run_dir)
    with progress_bar(desc=f"{run.cfg.dataset} {run.cfg.method} (rank {run.dist.rank})", total=sum(len(b) for _, b in todo), unit="case") as bar:
        for k, batch in todo:
            t = time.time()
            result = None
            if run.cfg.method != "none":
                result = editor(run.lm, [rq for c in batch for rq in c.requests], run.cfg.method, run.cfg.layers, run.cfg.hparams)
            edit_s = time.time() - t
            try:
                for c in batch:
                    if c.case_id in done:
                        bar.update(1)
                        continue
                    rec = _record(c, k, batch, run.pre[("full", c.case_id)], _post(run, c), {"edit_s": round(edit_s, 3)})
                    append_jsonl(path, rec)
                    if on_record:
                        on_record(rec)
                    bar.update(1)
            finally:
                if result is not None:
                    result.restore()


class _EditorEdits:
    """Sequential edits made by a caller's ``editor`` (no history): each batch's result saved under
    ``edits/batch_*`` when it can be saved, and re-applied from there on resume."""

    def __init__(self, run: _Run, run_dir: Path, editor: Editor) -> None:
        self.run, self.run_dir, self.editor = run, run_dir, editor
        self.applied: list[Any] = []

    def prepare(self, first_incomplete: int) -> None:
        """Nothing to undo: batches are (re-)applied in order by :meth:`add`."""

    def add(self, k: int, batch: list[Case]) -> None:
        saved = self.run_dir / "edits" / f"batch_{k:05d}"
        if saved.is_dir():
            from factlab.edit import EditResult

            self.applied.append(EditResult.load(saved, self.run.lm).apply())
            return
        result = self.editor(self.run.lm, _requests(batch), self.run.cfg.method, self.run.cfg.layers, self.run.cfg.hparams)
        if hasattr(result, "save"):
            result.save(saved)
        self.applied.append(result)

    def close(self) -> None:
        """Restore the unedited weights."""
        for r in reversed(self.applied):
            r.restore()


class _StreamEdits:
    """Sequential edits through an :class:`~factlab.edit.stream.EditStream` in ``run_dir/stream``: earlier batches'
    keys reach history-using solvers, and a resumed run re-applies the committed batches (checked bit for bit
    against the weights they were made on) instead of editing them again."""

    def __init__(self, run: _Run, run_dir: Path) -> None:
        from factlab.edit.stream import EditStream

        cfg = run.cfg
        # the papers edit every case, also those whose target the model already predicts (as default_editor)
        self.stream = EditStream(run.lm, run_dir / STREAM_DIR, method=cfg.method, layers=cfg.layers,
                                 hparams=cfg.hparams, on_known="edit")

    def prepare(self, first_incomplete: int) -> None:
        """Roll the stream back so that batch ``first_incomplete`` is its newest: its missing cases must be scored
        on the model after that batch, not after later ones (only after a damaged or hand-edited run folder)."""
        if first_incomplete + 1 < len(self.stream):
            log.warning("batch %d has unscored cases but the stream holds %d batches; rolling it back to %d",
                        first_incomplete, len(self.stream), first_incomplete + 1)
            self.stream.rollback(to=first_incomplete + 1)

    def add(self, k: int, batch: list[Case]) -> None:
        """Batch ``k`` on the model: already there when the stream committed it (its requests must match)."""
        from factlab.edit.stream import StreamMismatchError, batch_id

        reqs = _requests(batch)
        if k < len(self.stream):
            if self.stream.to_dict()["log"][k]["id"] != batch_id(reqs):
                raise StreamMismatchError(f"{self.stream.run_dir} holds another batch {k + 1}; use another --out directory")
            return
        self.stream.add(reqs)

    def close(self) -> None:
        """Restore the unedited weights (the stream folder keeps every batch) and release the stream's lock."""
        try:
            for r in reversed(self.stream.results):
                r.restore()
        finally:
            self.stream.close()


def _requests(batch: list[Case]) -> list[dict[str, Any]]:
    return [rq for c in batch for rq in c.requests]


def _run_sequential(run: _Run, run_dir: Path, batches: list[list[Case]], editor: Editor | None, on_record) -> None:
    """Edit batch after batch on one model, scoring each batch's cases after its edit, then every case on the final
    model (``final.jsonl``). With the default editor (``editor=None``) the edits go through an
    :class:`~factlab.edit.stream.EditStream` in ``run_dir/stream``; a caller's editor keeps its results under
    ``edits/``. The model is restored on return."""
    done = read_records(run_dir)
    final_done = read_records(run_dir, "final")
    if all(c.case_id in done and c.case_id in final_done for b in batches for c in b):
        return
    path = run_dir / "cases.jsonl"
    incomplete = [k for k, b in enumerate(batches) if any(c.case_id not in done for c in b)]
    edits = _StreamEdits(run, run_dir) if editor is None else _EditorEdits(run, run_dir, editor)
    n_edits = 0
    try:
        edits.prepare(incomplete[0] if incomplete else len(batches))
        with progress_bar(desc=f"{run.cfg.dataset} {run.cfg.method} sequential", total=sum(len(b) for b in batches), unit="case") as bar:
            for k, batch in enumerate(batches):
                t = time.time()
                edits.add(k, batch)
                edit_s = time.time() - t
                n_edits += sum(len(c.requests) for c in batch)
                for c in batch:
                    if c.case_id not in done:
                        extra = {"edit_s": round(edit_s, 3), "edits_applied": n_edits}
                        rec = _record(c, k, batch, run.pre[("full", c.case_id)], _evaluate(run.lm, run.cfg, c, run.reference), extra)
                        append_jsonl(path, rec)
                        if on_record:
                            on_record(rec)
                    bar.update(1)
        final_done = read_records(run_dir, "final")
        cases = [c for b in batches for c in b if c.case_id not in final_done]
        with progress_bar(desc="final model, all cases", total=len(cases), unit="case") as bar:
            for c in cases:
                res = _evaluate(run.lm, run.cfg, c, run.reference)
                append_jsonl(run_dir / "final.jsonl", {"case_id": c.case_id, "final": res["metrics"], "edits_applied": n_edits})
                bar.update(1)
    finally:
        edits.close()
