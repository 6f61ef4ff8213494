"""Loading models and the per-family adapters that name their sites.

The names are imported lazily (PEP 562), so ``from factlab.models import DEFAULT_MODEL`` (the command line's
option defaults) does not pull in torch and transformers; ``load``, ``LoadedModel`` and the adapters do.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

#: public name -> module that defines it
_EXPORTS = {
    "Adapter": "factlab.models.adapters",
    "FAMILIES": "factlab.models.adapters",
    "Projection": "factlab.models.adapters",
    "SiteSpec": "factlab.models.adapters",
    "adapter_for": "factlab.models.adapters",
    "LoadedModel": "factlab.models.loading",
    "Prediction": "factlab.models.loading",
    "cache_dir": "factlab.models.loading",
    "load": "factlab.models.loading",
    "wrap": "factlab.models.loading",
    "DEFAULT_MODEL": "factlab.models.packaged",
    "PACKAGED": "factlab.models.packaged",
    "PackagedModel": "factlab.models.packaged",
}

__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:  # pragma: no cover
    from factlab.models.adapters import FAMILIES, Adapter, Projection, SiteSpec, adapter_for
    from factlab.models.loading import LoadedModel, Prediction, cache_dir, load, wrap
    from factlab.models.packaged import DEFAULT_MODEL, PACKAGED, PackagedModel


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'factlab.models' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
