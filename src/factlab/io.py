"""Atomic file writing: nothing half-written is ever left under the final name."""

from __future__ import annotations

import json
import math
import os
import shutil
import socket
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch

from factlab.errors import InputError, RunLockedError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success it is renamed onto ``path``.

    On an exception the temporary file is removed and ``path`` is left as it was.
    """
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp makes 0600; a result file gets the usual permissions
    try:
        yield tmp_path
        os.replace(tmp_path, final)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


@contextmanager
def atomic_folder(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield an empty temporary folder next to ``path``; on success it takes the place of ``path``.

    An existing folder at ``path`` is swapped out only once the new one is complete, so a failure leaves ``path``
    as it was (callers decide whether replacing a folder is allowed). Refuses a ``path`` that is a file: it is
    never moved aside.
    """
    final = Path(path)
    if final.exists() and not final.is_dir():
        raise InputError(f"{final} is an existing file, not a folder; choose a folder path (the file was left untouched)")
    tmp = final.parent / f".{final.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        if final.exists():
            old = final.parent / f".{final.name}.old-{os.getpid()}"
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old)
        else:
            os.replace(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def to_json_text(obj: Any, *, indent: int | None = None) -> str:
    """Strict JSON for ``obj``: NaN and infinities become ``null`` (bare ``NaN`` is not JSON; jq and browsers
    reject it), tensors and arrays become lists, objects with ``to_dict`` their dict."""
    return json.dumps(_finite(obj), indent=indent, ensure_ascii=False, default=_json_default, allow_nan=False)


def _finite(o: Any) -> Any:
    if isinstance(o, float):
        return o if math.isfinite(o) else None
    if isinstance(o, dict):
        return {k: _finite(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_finite(v) for v in o]
    if isinstance(o, (torch.Tensor,)) or (hasattr(o, "tolist") and not isinstance(o, (str, bytes))):
        return _finite(o.tolist())
    if hasattr(o, "to_dict") and not isinstance(o, type):
        return _finite(o.to_dict())
    return o


def write_json(path: str | os.PathLike[str], obj: Any, *, indent: int | None = 2) -> Path:
    """Write ``obj`` as strict JSON (see :func:`to_json_text`) to ``path`` atomically and return the path."""
    with atomic_path(path) as tmp:
        tmp.write_text(to_json_text(obj, indent=indent) + "\n")
    return Path(path)


def append_jsonl(path: str | os.PathLike[str], obj: Any) -> None:
    """Append one JSON line to ``path`` and flush it to disk (a killed run keeps whole lines).

    A torn last line left by a killed writer (no final newline) is cut off first, so it can never
    end up in the middle of the file.
    """
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    _trim_torn_tail(p)
    line = to_json_text(obj) + "\n"
    with open(p, "a", encoding="utf-8") as f:
        f.write(line)
        f.flush()
        os.fsync(f.fileno())


def _trim_torn_tail(p: Path) -> None:
    if not p.exists() or p.stat().st_size == 0:
        return
    with open(p, "rb+") as f:
        f.seek(-1, os.SEEK_END)
        if f.read(1) == b"\n":
            return
        data = f.seek(0) or f.read()
        f.truncate(data.rfind(b"\n") + 1)


def read_jsonl(path: str | os.PathLike[str]) -> list[Any]:
    """Read a JSON-lines file; a truncated last line (from a killed writer) is ignored."""
    p = Path(path)
    if not p.exists():
        return []
    out = []
    for line in p.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            break
    return out


def save_tensors(path: str | os.PathLike[str], tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> Path:
    """Save tensors as safetensors atomically (tensors are made contiguous and moved to CPU)."""
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    return Path(path)


def load_tensors(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Load a safetensors file onto the CPU."""
    from safetensors.torch import load_file

    return load_file(str(path))


def _json_default(o: Any) -> Any:
    if isinstance(o, Path):
        return str(o)
    if isinstance(o, torch.Tensor):
        return o.tolist()
    if hasattr(o, "tolist"):
        return o.tolist()
    if hasattr(o, "to_dict"):
        return o.to_dict()
    raise TypeError(f"cannot serialise {type(o).__name__} to JSON")


@contextmanager
def run_lock(run_dir: str | os.PathLike[str]) -> Iterator[Path]:
    """Hold an exclusive lock on ``run_dir`` (file ``.lock``) while a process writes it.

    A second writer fails at once with :class:`~factlab.errors.RunLockedError` naming the holder (pid and
    host), instead of redoing all the work and duplicating every record. The lock is an OS file lock
    (``flock``), so a killed holder releases it: resuming after a crash never needs a manual unlock.
    """
    import fcntl

    root = Path(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    path = root / ".lock"
    f = open(path, "a+", encoding="utf-8")
    try:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            raise RunLockedError(
                f"{root} is being written by {holder}; wait for it to finish (or stop it), or use another folder"
            ) from None
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        f.flush()
        try:
            yield root
        finally:
            f.seek(0)
            f.truncate()
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)
    finally:
        f.close()
