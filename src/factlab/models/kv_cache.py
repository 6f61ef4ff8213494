"""Passing a key/value cache to a Hugging Face model across transformers versions.

transformers 5.24 renamed the forward argument ``past_key_values`` to ``cache`` (the old name warns and goes
away in 5.40); older 5.x releases only know ``past_key_values``. These two helpers pick the name the loaded
model's ``forward`` takes, and read the returned cache under either name.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any

from torch import nn

__all__ = ["cache_kwargs", "returned_cache"]


@functools.lru_cache(maxsize=None)
def _cache_argument(model_class: type) -> str:
    """The name a model class's forward gives its key/value cache (read once per class)."""
    return "cache" if "cache" in inspect.signature(model_class.forward).parameters else "past_key_values"


def cache_kwargs(model: nn.Module, cache: Any) -> dict[str, Any]:
    """``{"cache": cache, "use_cache": True}`` or ``{"past_key_values": ..., ...}``, whichever ``model.forward`` takes."""
    return {_cache_argument(type(model)): cache, "use_cache": True}


def returned_cache(output: Any) -> Any:
    """The key/value cache of a model output (``output.cache`` in transformers ≥ 5.24, else ``past_key_values``)."""
    cache = getattr(output, "cache", None)
    return cache if cache is not None else getattr(output, "past_key_values", None)
