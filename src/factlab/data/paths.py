"""Find a dataset file: explicit path, else ``$FACTLAB_DATA``, else the cache, else download.

Resolution order of :func:`resolve`:

1. an explicit ``path`` (a file, a folder holding the file, or a data directory) always wins; if
   it does not hold the file, that is an error (no silent fallback);
2. ``$FACTLAB_DATA/<folder>/<file>``, where ``FACTLAB_DATA`` points at a folder laid out like the
   project's ``shared/data`` (``known_1000/``, ``counterfact/``, ``lre_relations/`` ...);
3. the download cache, ``$FACTLAB_CACHE/data/<folder>/<file>`` (default
   ``platformdirs.user_cache_dir("factlab")/data``);
4. when online, a download from the file's public upstream URL (see :mod:`.catalog`) into the
   cache, written atomically. ``FACTLAB_OFFLINE=1`` or ``HF_HUB_OFFLINE=1`` forbids any network
   attempt.

If none works, one :class:`~factlab.data.errors.DatasetNotFoundError` lists what was tried and the
fixes.
"""

from __future__ import annotations

import logging
import os
import urllib.request
from pathlib import Path

from ._files import atomic_writer
from .catalog import source
from .errors import DatasetNotFoundError

log = logging.getLogger(__name__)

#: Environment variables that, when truthy, forbid any download.
OFFLINE_ENV_VARS = ("FACTLAB_OFFLINE", "HF_HUB_OFFLINE")
DEFAULT_TIMEOUT_S = 20.0
_TRUE = {"1", "true", "yes", "on"}


def data_dir() -> Path | None:
    """The data directory named by ``$FACTLAB_DATA`` (``~`` expanded), or None when unset/empty."""
    value = os.environ.get("FACTLAB_DATA", "").strip()
    return Path(value).expanduser() if value else None


def cache_dir() -> Path:
    """Where downloaded dataset files are kept: ``$FACTLAB_CACHE/data`` or the user cache dir."""
    value = os.environ.get("FACTLAB_CACHE", "").strip()
    if value:
        return Path(value).expanduser() / "data"
    try:
        import platformdirs
    except ImportError:  # pragma: no cover - platformdirs is nearly always present
        return Path.home() / ".cache" / "factlab" / "data"
    return Path(platformdirs.user_cache_dir("factlab")) / "data"


def offline_reason(env_vars: tuple[str, ...] = OFFLINE_ENV_VARS) -> str | None:
    """The ``VAR=value`` (one of ``env_vars``, read now) that makes us offline, or None when downloads are allowed."""
    for var in env_vars:
        value = os.environ.get(var, "").strip()
        if value.lower() in _TRUE:
            return f"{var}={value}"
    return None


def is_offline() -> bool:
    """True when ``FACTLAB_OFFLINE`` or ``HF_HUB_OFFLINE`` is set to a true value."""
    return offline_reason() is not None


def download(url: str, dest: Path, *, timeout: float = DEFAULT_TIMEOUT_S) -> Path:
    """Download ``url`` to ``dest`` atomically (temporary file + ``os.replace``) and return ``dest``.

    Raises ``OSError`` (``urllib.error.URLError`` is one) on network failure and ``ValueError``
    when the server returns a Git LFS pointer instead of the data.
    """
    log.info("downloading %s -> %s", url, dest)
    request = urllib.request.Request(url, headers={"User-Agent": "factlab"})
    with urllib.request.urlopen(request, timeout=timeout) as response, atomic_writer(dest, "wb") as out:
        first = True
        while chunk := response.read(1 << 20):
            if first and chunk.startswith(b"version https://git-lfs"):
                raise ValueError(f"{url} serves a Git LFS pointer, not the data")
            first = False
            out.write(chunk)
    return dest


def resolve(dataset: str, filename: str, path: str | os.PathLike[str] | None = None) -> Path:
    """Return a local path to ``<dataset folder>/<filename>``, downloading it if needed.

    Args:
        dataset: dataset folder name (``"known_1000"``, ``"counterfact"``, ``"zsre"``, ``"mquake"``,
            ``"lre_relations"``, ``"wikitext-2"``, ``"circuits"``) or an alias (``"known"``, ``"lre"``).
        filename: file inside that folder; may contain ``/`` (``"factual/company_ceo.json"``).
        path: explicit location: the file itself, a folder holding ``filename``, or a data
            directory holding ``<folder>/<filename>``.

    Raises:
        DatasetNotFoundError: nothing worked; the message lists every place tried and the fixes.
    """
    src = source(dataset)
    rel = Path(src.folder) / filename
    if path is not None:
        return _explicit(Path(path).expanduser(), src.folder, filename)

    tried: list[str] = []
    root = data_dir()
    if root is None:
        tried.append("FACTLAB_DATA is not set")
    else:
        candidate = root / rel
        if candidate.is_file():
            return candidate
        state = "missing" if root.is_dir() else f"missing; {root} is not a directory"
        tried.append(f"FACTLAB_DATA: {candidate} ({state})")

    cached = cache_dir() / rel
    if cached.is_file():
        return cached
    tried.append(f"cache: {cached} (missing)")

    url = src.url_for(filename)
    offline = offline_reason()
    if url is None:
        tried.append(f"download: {rel.as_posix()} has no public upstream copy")
    elif offline is not None:
        tried.append(f"download from {url}: skipped, offline ({offline})")
    else:
        try:
            return download(url, cached)
        except (OSError, ValueError) as e:  # URLError and timeouts are OSErrors
            tried.append(f"download from {url}: failed ({e})")

    fixes = [
        f"pass path=/path/to/{filename.rsplit('/', 1)[-1]}",
        f"set FACTLAB_DATA=/path/to/data (a folder holding {rel.as_posix()})",
    ]
    if url is not None:
        fixes.append(
            "go online to download it" + (f" (unset {offline.split('=')[0]})" if offline else "")
        )
    message = (
        f"dataset file {rel.as_posix()} not found. Tried:\n"
        + "".join(f"  - {t}\n" for t in tried)
        + "Fix: " + "; or ".join(fixes) + "."
    )
    raise DatasetNotFoundError(message, dataset=src.folder, filename=filename, tried=tried)


def _explicit(path: Path, folder: str, filename: str) -> Path:
    if path.is_file():
        return path
    if path.is_dir():
        for candidate in (path / filename, path / folder / filename):
            if candidate.is_file():
                return candidate
        tried = [f"{path / filename} (missing)", f"{path / folder / filename} (missing)"]
        message = (
            f"dataset file {folder}/{filename} not found in the folder passed as path={path}: "
            f"looked for {tried[0]} and {tried[1]}. "
            "Fix: pass the file itself, or a data directory laid out like shared/data."
        )
    else:
        tried = [f"{path} (does not exist)"]
        message = f"path={path} does not exist. Fix: pass an existing file or folder for {folder}/{filename}."
    raise DatasetNotFoundError(message, dataset=folder, filename=filename, tried=tried)
