"""Scaling out: one device mesh, sharding helpers and multi-process start-up.

Every parallel stage uses ONE 1-D mesh over all (global) devices with the axis :data:`AXIS`
(``"batch"``, the name :mod:`wmdd_jax.teacher` already uses, so its helpers take this mesh too). The
axis plays two roles:

* a **batch axis** for the data-parallel stages: the statistics pass (images, labels and mask
  split along the batch, the per-class accumulator replicated; XLA inserts the reductions) and
  the student (each step's batch split, student and teacher replicated, the gradient all-reduced);
* a **class axis** for the stages whose classes are independent: barycenters and recover (a chunk
  of classes split over devices, each device optimising its own classes against a replicated
  teacher; only the all-class BN ablation reduces across devices).

The sharded programs are the single-device programs partitioned by XLA (``jax.jit`` with
``NamedSharding``; barycenters under ``shard_map``), not rewritten by hand, so results equal the
single-device ones up to float round-off (about 1e-7: cross-device reductions, per-device shapes
and XLA's optimisation of partitioned programs). Random numbers do not depend on the sharding
(JAX's default ``jax_threefry_partitionable``). When bit-identical results for any device count
matter more than speed, pass ``units=N`` to the stages (``config.parallel.units``): see
:mod:`wmdd_jax.distributed.units`.

Several processes (hosts, or several processes on one machine): call :func:`initialize_distributed`
before anything else touches JAX. On a cluster that ``jax.distributed.initialize()`` detects by
itself (Slurm, Open MPI, Cloud TPU VMs and GKE TPU slices: JAX's own cluster detection) it lets
JAX do that, with nothing to set; a detected job of one process is left alone. Elsewhere (or
with ``WMDD_AUTO_DETECT=0``) it reads, in this order of preference:

==========================  =========================  ==========================================
wmdd_jax variable           JAX-style fallback         meaning
==========================  =========================  ==========================================
``WMDD_COORDINATOR``        ``JAX_COORDINATOR_ADDRESS`` ``host:port`` of process 0's coordinator
``WMDD_NUM_PROCESSES``      ``JAX_NUM_PROCESSES``       number of processes
``WMDD_PROCESS_ID``         ``JAX_PROCESS_ID``          this process's index in [0, n)
``WMDD_LOCAL_DEVICE_IDS``   (none)                      optional, e.g. ``0,1``: local devices used
``WMDD_CPU_COLLECTIVES``    (none)                      CPU collectives, default ``gloo``
``WMDD_AUTO_DETECT``        (none)                      ``0``: skip JAX's cluster detection
==========================  =========================  ==========================================

Without a detected cluster or a coordinator address it does nothing (one process). Each process
then feeds its own shard of the data (``dataset.iter_batches(..., process_index=
jax.process_index(), process_count=jax.process_count())``), which :func:`from_process_local`
assembles into one global
array; :func:`gather` brings sharded results back to every host.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from wmdd_jax.errors import ConfigError, ShapeError

AXIS = "batch"  # the mesh's one axis: batch axis or class axis, depending on the stage

_ENV = {
    "coordinator": ("WMDD_COORDINATOR", "JAX_COORDINATOR_ADDRESS"),
    "num_processes": ("WMDD_NUM_PROCESSES", "JAX_NUM_PROCESSES"),
    "process_id": ("WMDD_PROCESS_ID", "JAX_PROCESS_ID"),
    "local_device_ids": ("WMDD_LOCAL_DEVICE_IDS",),
    "cpu_collectives": ("WMDD_CPU_COLLECTIVES",),
    "auto_detect": ("WMDD_AUTO_DETECT",),
}


def _env(environ: Mapping[str, str], name: str) -> str | None:
  for var in _ENV[name]:
    value = environ.get(var, "").strip()
    if value:
      return value
  return None


def detect_cluster() -> tuple[str, int | None] | None:
  """The cluster ``jax.distributed.initialize()`` would configure itself from, if any.

  Walks JAX's own cluster environments (``jax._src.clusters``: Slurm, Open MPI, Cloud TPU, GKE
  TPU, ...; opt-in ones such as mpi4py are skipped, as JAX's auto-detection does), reading only
  their environment checks, without initialising anything.

  Returns:
    (the environment's class name, its process count or None when it cannot say), or None when
    none is present (or this JAX has no such module).
  """
  try:
    from jax._src import clusters  # noqa: PLC0415 - the list JAX's auto-detection walks
  except ImportError:  # a JAX without it: fall back to the environment variables
    return None
  for env in getattr(clusters.ClusterEnv, "_cluster_types", ()):
    if getattr(env, "opt_in_only_method", False):
      continue
    try:
      present = env.is_env_present()
    except Exception:  # noqa: BLE001 - a broken detector means "not this cluster"
      continue
    if present:
      try:
        count = int(env.get_process_count())
      except Exception:  # noqa: BLE001 - JAX will ask again when it initialises
        count = None
      return env.__name__, count
  return None


def initialize_distributed(
    *,
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    local_device_ids: Sequence[int] | None = None,
    environ: Mapping[str, str] | None = None,
) -> bool:
  """Joins a multi-process JAX job when there is one; a no-op otherwise.

  Call it first thing in a script, before any JAX computation (JAX cannot add processes to a
  running backend). In order:

  1. a ``coordinator_address`` argument: that job (count and id from the arguments or the
     environment variables of the module docstring);
  2. a cluster JAX detects by itself (:func:`detect_cluster`; Slurm, Open MPI, TPU VMs, ...)
     with more than one process: ``jax.distributed.initialize()`` with nothing set, JAX reading
     the cluster (``local_device_ids`` still apply). Skipped with ``WMDD_AUTO_DETECT=0`` or when
     ``environ`` is given (JAX's detectors read ``os.environ``);
  3. ``WMDD_COORDINATOR`` / ``JAX_COORDINATOR_ADDRESS`` and the other variables of the module
     docstring.

  On CPU the cross-process collectives need an implementation: ``jax_cpu_collectives_
  implementation`` is set to ``gloo`` (or ``WMDD_CPU_COLLECTIVES``) first; it does not affect
  GPU/TPU backends.

  Args:
    coordinator_address: ``host:port`` of process 0; None: detect, then read the environment.
    num_processes: number of processes; None reads the environment.
    process_id: this process's index; None reads the environment.
    local_device_ids: the local devices this process uses; None: all (or the environment's).
    environ: the environment to read (default ``os.environ``; tests pass a dict).

  Returns:
    True when this process is part of a multi-process job (now or already), False when there is
    none and nothing was done.

  Raises:
    ConfigError: a coordinator without the number of processes or the process id, values that
      are not integers, or JAX already running single-process (initialise earlier).
  """
  if jax.distributed.is_initialized():
    return True
  detect = environ is None
  environ = os.environ if environ is None else environ
  try:
    ids = local_device_ids
    if ids is None and _env(environ, "local_device_ids"):
      ids = [int(x) for x in _env(environ, "local_device_ids").split(",")]
  except ValueError as e:
    raise ConfigError(f"WMDD_LOCAL_DEVICE_IDS must be comma-separated integers ({e}), e.g. "
                      "WMDD_LOCAL_DEVICE_IDS=0,1.") from e
  address = coordinator_address
  if not address and detect and (_env(environ, "auto_detect") or "1") not in ("0", "false"):
    cluster = detect_cluster()
    if cluster is not None and cluster[1] != 1:
      name, count = cluster
      if _env(environ, "coordinator"):
        logging.warning("initialize_distributed: %s detected; jax.distributed.initialize() "
                        "reads it, and WMDD_COORDINATOR/JAX_COORDINATOR_ADDRESS are ignored "
                        "(set WMDD_AUTO_DETECT=0 to use them instead).", name)
      _start(environ, what=f"the {name} cluster ({count or 'unknown'} processes)",
             local_device_ids=ids)
      return True
  address = address or _env(environ, "coordinator")
  if not address:
    return False
  try:
    count = num_processes if num_processes is not None else _env(environ, "num_processes")
    index = process_id if process_id is not None else _env(environ, "process_id")
    if count is None or index is None:
      raise ConfigError(
          f"A coordinator ({address}) is set but not the number of processes and this process's "
          "id; set WMDD_NUM_PROCESSES and WMDD_PROCESS_ID (or JAX_NUM_PROCESSES / "
          "JAX_PROCESS_ID), or unset WMDD_COORDINATOR for a single process.")
    count, index = int(count), int(index)
  except ValueError as e:
    if isinstance(e, ConfigError):
      raise
    raise ConfigError(f"Distributed settings must be integers ({e}); e.g. WMDD_NUM_PROCESSES=2 "
                      "WMDD_PROCESS_ID=0 WMDD_LOCAL_DEVICE_IDS=0,1.") from e
  if not 0 <= index < count:
    raise ConfigError(f"process id {index} is outside [0, {count}); number the processes "
                      f"0..{count - 1}.")
  _start(environ, what=f"coordinator {address}", coordinator_address=address,
         num_processes=count, process_id=index, local_device_ids=ids)
  return True


def _start(environ: Mapping[str, str], *, what: str, **kwargs: Any) -> None:
  """``jax.distributed.initialize(**kwargs)`` with CPU collectives set; errors made readable."""
  jax.config.update("jax_cpu_collectives_implementation",
                    _env(environ, "cpu_collectives") or "gloo")
  try:
    jax.distributed.initialize(**kwargs)
  except (RuntimeError, ValueError) as e:
    raise ConfigError(
        f"jax.distributed.initialize failed for {what} ({e}). It must run before any JAX "
        "computation: call wmdd_jax.distributed.sharding.initialize_distributed() at the top of "
        "the script; with WMDD_AUTO_DETECT=0 the WMDD_* variables are used instead of the "
        "detected cluster.") from e


# ---------------------------------------------------------------------------------------------
# The mesh and shardings.


def make_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A 1-D mesh with axis :data:`AXIS` over ``devices`` (default: every device of every process).

  Devices are ordered by (process, id), so each process's devices form one contiguous block: its
  local batch is one contiguous slice of a global batch (what
  ``jax.make_array_from_process_local_data`` and the interleaved feature gather assume).
  """
  devices = list(jax.devices() if devices is None else devices)
  devices.sort(key=lambda d: (d.process_index, d.id))
  return Mesh(np.asarray(devices), (AXIS,))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading axis split over the mesh: a batch of images, labels, masks."""
  return NamedSharding(mesh, P(AXIS))


def class_sharding(mesh: Mesh) -> NamedSharding:
  """Leading axis split over the mesh: a chunk of classes (the same spec as a batch)."""
  return NamedSharding(mesh, P(AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
  """The whole array on every device."""
  return NamedSharding(mesh, P())


def replicate(tree: Any, mesh: Mesh, *, copy: bool = False) -> Any:
  """Places a pytree (host or device arrays, identical on every process) on every device.

  ``copy`` never aliases the input buffers (use it for anything a step donates). With several
  processes device arrays go through the host (a process cannot address the others' devices).
  """
  sharding = NamedSharding(mesh, P())
  may_alias = False if copy else None
  if jax.process_count() == 1:
    return jax.device_put(tree, sharding, may_alias=may_alias)

  def one(x):
    if not isinstance(x, jax.Array) or not x.is_fully_addressable:
      return jax.device_put(x, sharding, may_alias=may_alias)
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):  # typed keys have no host form
      data = jax.device_put(np.asarray(jax.random.key_data(x)), sharding)
      return jax.random.wrap_key_data(data, impl=jax.random.key_impl(x))
    return jax.device_put(np.asarray(x), sharding, may_alias=may_alias)

  return jax.tree.map(one, tree)


def sync_processes(name: str) -> None:
  """With several processes: wait until every process reaches this point (e.g. so that a file
  process 0 wrote is there for the others). A no-op with one process."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(f"wmdd:{name}")


def shard_leading(tree: Any, mesh: Mesh) -> Any:
  """Splits every leaf of a pytree, identical on every process, along its leading axis.

  The leading size must be a multiple of the mesh size (see :func:`padded_size`).
  """
  n = mesh.devices.size
  for leaf in jax.tree.leaves(tree):
    if np.ndim(leaf) == 0 or np.shape(leaf)[0] % n:
      raise ShapeError(f"cannot split an array of shape {np.shape(leaf)} over {n} devices; pad "
                       f"its leading axis to a multiple of {n} (sharding.padded_size).")
  return jax.device_put(tree, class_sharding(mesh))


def padded_size(n: int, multiple: int) -> int:
  """The smallest multiple of ``multiple`` that is >= ``n`` (and >= ``multiple``)."""
  return max(1, -(-int(n) // int(multiple))) * int(multiple)


def pad_class_ids(class_ids: Sequence[int] | np.ndarray, multiple: int) -> np.ndarray:
  """Pads a list of class ids to a multiple of ``multiple`` by repeating the last one.

  Classes are independent problems, so a repeated class only duplicates work; drop the repeats
  afterwards with ``ids[first_occurrences(ids)]``.
  """
  ids = np.asarray(class_ids, np.int32).reshape(-1)
  if ids.size == 0:
    raise ShapeError("pad_class_ids got no classes; pass at least one class id.")
  return np.concatenate([ids, np.full(padded_size(ids.size, multiple) - ids.size, ids[-1],
                                      np.int32)])


def first_occurrences(ids: np.ndarray) -> np.ndarray:
  """bool mask: True at the first position of each run of equal ids (drops padding repeats)."""
  ids = np.asarray(ids)
  return np.concatenate([[True], ids[1:] != ids[:-1]])


def constrain_leading(tree: Any, mesh: Mesh, size: int) -> Any:
  """Inside jit: leaves whose leading axis has length ``size`` split over the mesh, the rest
  replicated (e.g. a recover state: images and Adam moments split, the step counts replicated)."""

  def one(x):
    spec = P(AXIS) if x.ndim >= 1 and x.shape[0] == size else P()
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))

  return jax.tree.map(one, tree)


def constrain_replicated(tree: Any, mesh: Mesh) -> Any:
  """Inside jit: every leaf replicated (small outputs that every host reads, e.g. metrics)."""
  return jax.lax.with_sharding_constraint(tree, replicated(mesh))


# ---------------------------------------------------------------------------------------------
# Process-local data <-> global arrays.


def local_batch_multiple(mesh: Mesh) -> int:
  """Each process's batch must be a multiple of its number of devices in the mesh."""
  me = jax.process_index()
  return int(sum(d.process_index == me for d in mesh.devices.flat))


def from_process_local(tree: Any, mesh: Mesh) -> Any:
  """Global arrays split along the batch axis from each process's own rows.

  Process p's rows become the p-th contiguous block of the global batch (the mesh orders devices
  by process). Every process must pass the same local shape, a multiple of
  :func:`local_batch_multiple`.
  """
  sharding = batch_sharding(mesh)
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)),
                      tree)


def to_process_local(tree: Any, mesh: Mesh) -> Any:
  """This process's rows (host numpy) of batch-split global arrays (inverse of
  :func:`from_process_local`)."""
  if jax.process_count() == 1:
    return jax.tree.map(np.asarray, tree)
  local = multihost_utils.global_array_to_host_local_array(tree, mesh, P(AXIS))
  return jax.tree.map(np.asarray, local)


def gather(tree: Any) -> Any:
  """Host numpy copies of (possibly sharded, possibly multi-process) global arrays, on every
  process. Fully addressable arrays are simply fetched; others go through
  ``multihost_utils.process_allgather``."""

  def one(x):
    if not isinstance(x, jax.Array) or x.is_fully_addressable or x.is_fully_replicated:
      return np.asarray(x)
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))

  return jax.tree.map(one, tree)


def gather_interleaved(local: np.ndarray) -> np.ndarray:
  """Rows that process p took at global positions ``p, p + P, p + 2P, ...`` (the sharding of
  ``Dataset.iter_batches(process_index=p, process_count=P)``), back in global order on every
  process. With one process it returns ``local`` unchanged.

  Args:
    local: [n_p, ...] this process's rows in the order it read them (n_p may differ by one
      between processes).

  Returns:
    [sum_p n_p, ...] numpy, row i from process i % P.
  """
  local = np.asarray(local)
  count = jax.process_count()
  if count == 1:
    return local
  sizes = np.asarray(multihost_utils.process_allgather(np.int64(local.shape[0]))).reshape(-1)
  longest = int(sizes.max())
  padded = np.zeros((longest, *local.shape[1:]), local.dtype)
  padded[:local.shape[0]] = local
  everything = np.asarray(multihost_utils.process_allgather(padded))  # [P, longest, ...]
  out = np.empty((int(sizes.sum()), *local.shape[1:]), local.dtype)
  for p in range(count):
    out[p::count] = everything[p, :sizes[p]]
  return out


__all__ = [
    "AXIS",
    "batch_sharding",
    "class_sharding",
    "constrain_leading",
    "constrain_replicated",
    "first_occurrences",
    "from_process_local",
    "gather",
    "gather_interleaved",
    "initialize_distributed",
    "local_batch_multiple",
    "make_mesh",
    "pad_class_ids",
    "padded_size",
    "replicate",
    "replicated",
    "shard_leading",
    "sync_processes",
    "to_process_local",
]
