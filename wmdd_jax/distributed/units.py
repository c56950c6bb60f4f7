"""Deterministic data parallelism: fixed work units, single-device programs, ordered sums.

Why. ``jax.jit`` with ``NamedSharding`` (the default scale-out of
:mod:`wmdd_jax.distributed.sharding`) gives XLA a differently shaped problem per device count:
per-device batches change size, cross-device sums add in an unspecified order, and the
partitioned program is even simplified differently. The results agree with a single device only to
float round-off (about 1e-7), and a WMDD run amplifies that: a teacher trained on 4 devices
differs from the 1-device one in the 5th digit, k-means++ then seeds the barycenters differently,
and the final accuracy moves by a few images.

With ``units=N`` every batch is cut into N contiguous work units whose bounds depend only on the
batch size (:func:`bounds`). Unit ``g`` runs the same single-device jitted program on device
``g % D``, and the units' results are combined on the first device in unit order
(:func:`ordered_sum`). Nothing depends on D, so on one backend a run is bit-identical on 1, 2, 4
or 8 devices (the CPU tests check 1 vs 4). Across backends (CPU vs GPU) results differ as usual.
On GPUs, bit-identity also needs XLA's deterministic kernels
(``XLA_FLAGS=--xla_gpu_deterministic_ops=true``), and each process autotunes its convolutions on
its own, so fix the algorithms (``--xla_gpu_autotune_level=0``) when comparing runs; this is
untested here (no GPU). The price, paid only when asked for:

* train-mode BatchNorm normalises each unit separately (as PyTorch DDP without SyncBN), so
  ``units`` changes training slightly compared with ``units=0``;
* the program compiles once per device, and per-unit results (gradients) are copied to the first
  device every step, which then updates and broadcasts the model;
* one process only (every unit must be addressable from the host that combines them).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from wmdd_jax.errors import ConfigError


def check_units(units: Any) -> int:
  """Validates a ``units`` option (0: off) and returns it as an int.

  Raises:
    ConfigError: not an int >= 0, or units > 0 with several processes.
  """
  if isinstance(units, bool) or not isinstance(units, int | np.integer) or units < 0:
    raise ConfigError(f"units must be an int >= 0 (0: sharded programs), got {units!r}.")
  if units and jax.process_count() > 1:
    raise ConfigError(
        f"units={units} (deterministic work units) runs in one process, but this run has "
        f"{jax.process_count()}; set units=0 for multi-process runs.")
  return int(units)


def bounds(n: int, units: int) -> list[tuple[int, int]]:
  """``[start, stop)`` of ``units`` contiguous near-equal parts of ``n`` rows.

  The first ``n % units`` parts are one row longer (``np.array_split``'s rule); parts are never
  empty (fewer than ``units`` parts when ``n < units``, none when ``n == 0``).
  """
  if n <= 0:
    return []
  units = max(1, min(int(units), int(n)))
  edges = np.cumsum([0] + [n // units + (g < n % units) for g in range(units)])
  return [(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:])]


def map_units(call: Callable[[int, int, int, int], Any], n: int, units: int,
              devices: Sequence[jax.Device]) -> list[Any]:
  """Runs every unit of ``n`` rows and brings the results to the first device, in unit order.

  ``call(g, d, lo, hi)`` runs unit ``g`` (rows ``[lo, hi)``, see :func:`bounds`) on
  ``devices[d]``, ``d = g % len(devices)`` (it puts its inputs there; its per-device copies are
  indexed by ``d``). The calls are dispatched before any result is read, so the devices work
  concurrently. (Recover chunks and barycenter classes go to devices by the same ``% D`` rule.)
  """
  outs = [call(g, g % len(devices), lo, hi) for g, (lo, hi) in enumerate(bounds(n, units))]
  return jax.device_put(outs, devices[0])


def devices_of(mesh: Mesh | None) -> list[jax.Device]:
  """The devices units run on: the mesh's, in mesh order, or the default device."""
  if mesh is None:
    return [jax.devices()[0]]
  return list(mesh.devices.flat)


def replicas(tree: Any, devices: Sequence[jax.Device]) -> list[Any]:
  """``tree`` committed to each device (the first entry may alias ``tree``'s buffers)."""
  return [jax.device_put(tree, d) for d in devices]


def fold_sum(trees: Sequence[Any]) -> Any:
  """``((t0 + t1) + t2) + ...`` leaf by leaf (traceable: use it inside a jitted program)."""
  total = trees[0]
  for t in trees[1:]:
    total = jax.tree.map(jnp.add, total, t)
  return total


_fold_sum_jit = jax.jit(fold_sum)


def ordered_sum(trees: Sequence[Any], device: jax.Device) -> Any:
  """``((t0 + t1) + t2) + ...`` leaf by leaf, on ``device``: the same additions in the same order
  whatever device each term was computed on."""
  return _fold_sum_jit(jax.device_put(list(trees), device))


def gather_rows(parts: Sequence[Any], device: jax.Device) -> Any:
  """Concatenates per-unit row blocks (pytrees of [n_g, ...] arrays) on ``device``."""
  return _concat_jit(jax.device_put(list(parts), device))


@jax.jit
def _concat_jit(parts):
  return jax.tree.map(lambda *xs: jnp.concatenate(xs), *parts)


def unit_key(key: jax.Array, step: int, unit: int) -> jax.Array:
  """The key of unit ``unit`` of step ``step``: ``fold_in(fold_in(key, step), unit)`` (use it
  inside the unit's jitted program)."""
  return jax.random.fold_in(jax.random.fold_in(key, step), unit)


__all__ = ["bounds", "check_units", "devices_of", "fold_sum", "gather_rows", "map_units",
           "ordered_sum", "replicas", "unit_key"]
