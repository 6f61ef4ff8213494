"""A synthetic world of facts and matched GPT-2 / Mamba models trained on it.

Typical use::

    from factlab.synth import build
    report = build("out/synth-tiny", size="tiny", seed=0)     # ~4 minutes of CPU
    report.archs["mamba"].accuracy.train_fact                  # >= 0.95
    # out/synth-tiny/gpt2 and out/synth-tiny/mamba load with AutoModelForCausalLM.from_pretrained

Pieces: :func:`build_world` (entities, relations, facts, corpus, dataset exports),
:func:`train_models` (tokenizer + matched models, saved with ``save_pretrained``), :func:`build`
(both, into one directory), :func:`load_build` (read a build directory back).
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Sequence

from factlab.synth.relations import FILLERS, RELATIONS, RelationSpec
from factlab.synth.train import (
    ARCHS,
    SPECS,
    Accuracy,
    ArchReport,
    BuildReport,
    ModelSpec,
    TrainSpec,
    evaluate,
    train_models,
)
from factlab.synth.world import SIZES, Entity, Fact, FactPrompt, Relation, World, WorldSize, build_world


def build(
    out_dir: str | os.PathLike[str],
    size: str = "tiny",
    archs: Sequence[str] = ARCHS,
    seed: int = 0,
    *,
    device: str = "cpu",
    num_threads: int | None = None,
    progress: bool = True,
) -> BuildReport:
    """Build a world of ``size``, export its datasets and train the models, all into ``out_dir``.

    Layout of ``out_dir``::

        world.json                     the world (World.load reads it back)
        datasets/known.json            known_1000-style records, one per fact
        datasets/known_<arch>.json     the facts each model knows, with its greedy predictions
        datasets/counterfact.json      CounterFact records, original ROME schema
        datasets/relations/<key>.json  LRE-style relation files
        datasets/corpus.txt            training-distribution text, one document per line
        gpt2/, mamba/                  save_pretrained model + tokenizer
        report.json                    BuildReport: accuracies, params, steps, seconds

    Args:
        out_dir: build directory (created; existing files with the same names are overwritten).
        size: ``"tiny"`` (CPU, about four minutes) or ``"small"`` (a GPU).
        archs: which of ``"gpt2"``, ``"mamba"`` to train.
        seed: world and training seed.
        device: ``"cpu"``, ``"cuda"``, ... or ``"auto"`` (CUDA when available).
        num_threads: torch CPU threads during the build (``None``: as set). The tiny models gain
            little from more than one; on a busy shared machine use 1.
        progress: tqdm progress bars.
    """
    t0, c0 = time.perf_counter(), time.process_time()
    if device == "auto":
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    world = build_world(seed, size)
    world.export(out_dir)
    report = train_models(
        world, out_dir, size, archs, seed, device=device, num_threads=num_threads, progress=progress
    )
    report.total_seconds = round(time.perf_counter() - t0, 3)
    report.total_cpu_seconds = round(time.process_time() - c0, 3)
    report.save()
    return report


def load_build(out_dir: str | os.PathLike[str]) -> tuple[World, BuildReport]:
    """The world and the report of a build directory (models: ``report.model_dir(arch)``)."""
    return World.load(Path(out_dir) / "world.json"), BuildReport.load(Path(out_dir) / "report.json")


__all__ = [
    "ARCHS",
    "Accuracy",
    "ArchReport",
    "BuildReport",
    "Entity",
    "FILLERS",
    "Fact",
    "FactPrompt",
    "ModelSpec",
    "RELATIONS",
    "Relation",
    "RelationSpec",
    "SIZES",
    "SPECS",
    "TrainSpec",
    "World",
    "WorldSize",
    "build",
    "build_world",
    "evaluate",
    "load_build",
    "train_models",
]
