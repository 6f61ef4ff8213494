"""Pytest fixtures for the synthetic world, importable by any test package.

``tests/synth/conftest.py`` imports them; another test package (or a root ``conftest.py``) can do
the same to reuse the tiny build::

    from factlab.synth.testing import synth_tiny, tiny_world  # noqa: F401  (pytest fixtures)

Session-scoped fixtures are per ``conftest`` that imports them, so import them in one place (the
closest common ``conftest.py``) to build only once per session. Needs pytest.
"""

from __future__ import annotations

import pytest

from factlab.synth import BuildReport, World, build, build_world


@pytest.fixture(scope="session")
def synth_tiny(tmp_path_factory: pytest.TempPathFactory) -> BuildReport:
    """The ``tiny`` build (seed 0, GPT-2 and Mamba) in a session temporary directory.

    Returns the :class:`factlab.synth.BuildReport`: ``report.out_dir`` is the build directory,
    ``report.model_dir("gpt2")`` / ``report.model_dir("mamba")`` the saved models. About four minutes
    of CPU; nothing is cached outside the temporary directory.

    Built with one torch thread: these models are too small to gain from more, and on a busy
    shared machine two threads per process measured 20-30x slower (threads spin-wait for each
    other). The previous thread setting is restored afterwards.
    """
    out = tmp_path_factory.mktemp("synth_tiny")
    return build(out, size="tiny", seed=0, progress=False, num_threads=1)


@pytest.fixture(scope="session")
def tiny_world() -> World:
    """The ``tiny`` world of seed 0 (no models; instant)."""
    return build_world(0, "tiny")
