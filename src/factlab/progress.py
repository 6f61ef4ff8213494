"""Progress bars for long work (tqdm), silenced with ``FACTLAB_NO_PROGRESS=1``; SIGTERM as an exception for a block."""

from __future__ import annotations

import os
import signal
import threading
from contextlib import contextmanager
from types import FrameType
from typing import Iterable, Iterator, TypeVar

from tqdm.auto import tqdm


T = TypeVar("T")


def progress_enabled() -> bool:
    """Whether progress bars are shown (off when ``FACTLAB_NO_PROGRESS`` is set to a true value)."""
    return os.environ.get("FACTLAB_NO_PROGRESS", "").lower() not in {"1", "true", "yes"}


def progress(iterable: Iterable[T], *, desc: str, total: int | None = None, unit: str = "it", leave: bool = False) -> Iterable[T]:
    """Wrap ``iterable`` in a progress bar with rate and ETA."""
    return tqdm(iterable, desc=desc, total=total, unit=unit, leave=leave, disable=not progress_enabled(), dynamic_ncols=True)


def progress_bar(*, desc: str, total: int | None = None, unit: str = "it", leave: bool = False) -> tqdm:
    """A manually advanced progress bar (``bar.update(n)``; close it or use it as a context manager)."""
    return tqdm(desc=desc, total=total, unit=unit, leave=leave, disable=not progress_enabled(), dynamic_ncols=True)


class Terminated(KeyboardInterrupt):
    """SIGTERM arrived inside :func:`sigterm_raises`.

    A :class:`KeyboardInterrupt`, so code that saves its progress on Ctrl-C saves it on SIGTERM too, and a
    generic ``except Exception`` never swallows it.
    """


@contextmanager
def sigterm_raises() -> Iterator[None]:
    """Within the block, SIGTERM raises :class:`Terminated` instead of killing the process.

    Installed only in the main thread (signal handlers can only be set there; elsewhere this is a no-op) and
    only where SIGTERM is not ignored; the previous handler is put back when the block ends, however it ends.
    """
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGTERM) is signal.SIG_IGN:
        yield
        return

    def _raise(signum: int, frame: FrameType | None) -> None:
        raise Terminated(f"terminated by signal {signal.Signals(signum).name}")

    previous = signal.signal(signal.SIGTERM, _raise)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


def signal_name(exc: BaseException) -> str:
    """``"SIGTERM"`` for :class:`Terminated`, ``"SIGINT"`` for any other :class:`KeyboardInterrupt`."""
    return "SIGTERM" if isinstance(exc, Terminated) else "SIGINT"
