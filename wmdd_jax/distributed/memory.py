"""Memory sizing: a compiled program's peak bytes per device, and abstract inputs to compile
programs ahead of time without data (recover's chunk size from a memory budget;
bench/memory.py)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import numpy as np


def peak_bytes(compiled: Any) -> int | None:
  """Peak device memory of one compiled program, per device, from XLA's memory analysis.

  arguments + outputs + temporaries - (outputs aliased to donated arguments); None when the
  backend reports no analysis.
  """
  stats = compiled.memory_analysis()
  if stats is None:
    return None
  return int(stats.argument_size_in_bytes + stats.output_size_in_bytes
             + stats.temp_size_in_bytes - stats.alias_size_in_bytes)


def abstract(tree: Any, sharding_fn: Callable[[Any], Any] | None = None) -> Any:
  """``jax.ShapeDtypeStruct`` leaves for a pytree, with ``sharding_fn(leaf)`` as their sharding
  (None: no sharding), for AOT lowering without data."""

  def one(x):
    sharding = sharding_fn(x) if sharding_fn is not None else None
    return jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=sharding,
                                weak_type=bool(getattr(x, "weak_type", False)))

  return jax.tree.map(one, tree)


__all__ = ["abstract", "peak_bytes"]
