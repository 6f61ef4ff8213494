"""Passing a key/value cache to a Hugging Face model across transformers versions.

transformers 5.24 renamed the forward argument ``past_key_values`` to ``cache`` (the old name warns and goes
away in 5.40); older 5.x releases only know ``past_key_values``. These two helpers pick the name the loaded
model's ``forward`` takes, and read the returned cache under either name.
"""

from __future__ import annotations

import inspect
from typing import Any

from torch import nn

__all__ = ["cache_kwargs", "returned_cache"]


def cache_kwargs(model: nn.Module, cache: Any) -> dict[str, Any]:
    """``{"cache": cache, "use_cache": True}`` or ``{"past_key_values": ..., ...}``, whichever ``model.forward`` takes."""
    params = inspect.signature(type(model).forward).parameters
    name = "cache" if "cache" in params else "past_key_values"
    return {name: cache, "use_cache": True}


def returned_cache(output: Any) -> Any:
    """The key/value cache of a model output (``output.cache`` in transformers ≥ 5.24, else ``past_key_values``)."""
    cache = getattr(output, "cache", None)
    return cache if cache is not None else getattr(output, "past_key_values", None)
