"""Shared pieces of the bad-input suite: a saved tiny model, the real CLI in a subprocess, weight snapshots.

Every probe asserts the exact outcome: user mistakes end in one ``error:`` line naming the problem and the fix,
exit code 2 and no traceback; weights are bit-identical after every failure; nothing is lost or duplicated.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from factlab.models.tiny import save_tiny


@dataclass
class CliRun:
    """What one ``factlab ...`` process did."""

    returncode: int
    stdout: str
    stderr: str

    def assert_user_error(self, *needles: str) -> None:
        """Exit 2, one clean ``error:`` message on stderr that contains every needle (case-insensitive), no traceback."""
        assert self.returncode == 2, f"exit {self.returncode}\nstdout: {self.stdout}\nstderr: {self.stderr}"
        assert "Traceback" not in self.stderr, self.stderr
        assert "error" in self.stderr.lower(), self.stderr
        for n in needles:
            assert n.lower() in self.stderr.lower(), f"{n!r} not in: {self.stderr}"


def run_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 600, cwd: str | os.PathLike | None = None) -> CliRun:
    """Run the real ``factlab`` entry point (``factlab.cli.main``) in a fresh process, offline, one thread."""
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "FACTLAB_NO_PROGRESS": "1", **(env or {})}
    r = subprocess.run([sys.executable, "-c", "from factlab.cli import main; main()", *map(str, args)],
                       capture_output=True, text=True, env=full_env, timeout=timeout, cwd=cwd)
    return CliRun(r.returncode, r.stdout, r.stderr)


def weights_of(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A copy of every parameter (compare with :func:`same_weights`)."""
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def same_weights(model: torch.nn.Module, before: dict[str, torch.Tensor]) -> bool:
    """Whether every parameter still equals ``before`` bit for bit."""
    return all(torch.equal(p.detach(), before[n]) for n, p in model.named_parameters())


@pytest.fixture(scope="session")
def saved_tiny(tmp_path_factory) -> Path:
    """A tiny random Llama written by ``save_pretrained`` (a folder any ``--model`` accepts)."""
    return save_tiny("llama", tmp_path_factory.mktemp("reliability") / "tiny-llama")


@pytest.fixture()
def tiny_llama():
    """A fresh tiny Llama per test (tests may change its weights)."""
    from factlab.models.tiny import tiny_model

    return tiny_model("llama")


def known_records(lm, n: int) -> list[dict]:
    """Records whose answer the tiny random model 'knows' (its own top next token, when it starts a word), in
    known_1000's format."""
    from itertools import product
    from types import SimpleNamespace

    from factlab.locate.dataset import model_knows

    subjects = ["Toyota", "Canada", "Apple", "Berlin", "Oslo", "Tokyo", "Nile", "Mozart", "Paris", "Rome", "Lima", "Cairo",
                "Thomas Mann", "Michael Jordan", "Danielle Darrieux", "Google", "Picasso", "Einstein", "Lisbon", "Moscow"]
    templates = ["{} is located in", "{} was founded in", "The home of {} is", "{} is a", "{} plays", "In {} people speak",
                 "{} was born in", "The capital of {} is", "{} works for", "{} is known for", "The language of {} is",
                 "{} is part of", "{} belongs to", "{} was created by", "The owner of {} is"]
    out = []
    for s, t in product(subjects, templates):
        prompt = t.format(s)
        top = lm.tokenizer.decode([int(lm.next_token_probs(prompt)[0].argmax())])
        rec = {"known_id": len(out), "prompt": prompt, "subject": s, "attribute": top, "relation_id": "P1",
               "template": t, "prediction": top}
        if top.startswith(" ") and top.strip() and model_knows(lm, SimpleNamespace(**rec)):
            out.append(rec)
            if len(out) == n:
                break
    return out
