"""Fixtures for the synthetic world (defined in :mod:`factlab.synth.testing` so other test packages can reuse them).

``synth_tiny`` builds the tiny world and both models once per session and returns the
:class:`factlab.synth.BuildReport` (``report.out_dir``, ``report.model_dir(arch)``).
"""

from __future__ import annotations

from typing import Iterator

import pytest
import torch

from factlab.synth.testing import synth_tiny, tiny_world  # noqa: F401  (fixtures)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "slow: trains models (about four minutes of CPU); runs in CI too")


@pytest.fixture(autouse=True)
def _one_torch_thread() -> Iterator[None]:
    """The synth tests use tiny models, which gain nothing from more threads; one thread keeps them
    fast on shared machines. Restored after each test."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)
