"""One interface for how a stage's programs run on devices; stages pass it pure functions.

A stage describes *what* to compute as pure functions of arrays; an :class:`Execution` decides
*where*: on one device, partitioned over a mesh by XLA (:class:`Sharded`), or cut into
deterministic work units (:class:`Units`, bit-identical for any device count; see
:mod:`wmdd_jax.distributed.units`). The stages need three patterns:

* a **row pass** (:meth:`Execution.row_pass`): a forward program over a batch's rows with shared
  constants (the teacher); its outputs are per-row results that come back whole (gathered) or
  stay split, and reductions of them (the statistics' per-class sums, the evaluation's counts)
  run with :meth:`Execution.replicated` programs;
* a **gradient step** (:meth:`Execution.gradient_step`): ``share(weights, shared, rows, key,
  batch)`` gives a batch share's gradient (of its loss sum divided by the whole batch size) and
  any other additive outputs; ``apply(state, total)`` updates the state. Sharded, the whole
  batch is one share split by XLA; units sum their shares in unit order on the first device;
* a **map over class chunks** (recover and barycenters; see those stages).

Batches enter as host (numpy) rows; :meth:`Execution.pad_multiple` says what a batch's row count
must divide by, :meth:`Execution.put_rows` places them and :meth:`Execution.rows_to_host` brings
split outputs back. :func:`make_execution` builds the one a config asks for.

How each program is compiled is decided here too: :meth:`Execution.jit` names the kind of
program (``"recover_step"``, ``"student_step"``, ...) and gets the XLA compile options that the
run's ``compiler_options`` mode gives it (:func:`program_compiler_options`), so a choice measured
for one kind of program (bench/official.py) does not leak into the others.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh

from wmdd_jax.distributed import memory, sharding
from wmdd_jax.distributed import units as units_lib
from wmdd_jax.distributed.options import COMPILER_MODES, ExecutionOptions

# XLA:CPU compile options per kind of program, each measured against XLA's defaults in
# interleaved rounds on the development CPU (2 cores; bench/official.py, bench/step.py). The
# convolutions of ResNet steps went to YNNPACK, which kept ~1.4 of the 2 cores busy; XLA's own
# convolution runtime keeps both busy for about the same CPU time. Not every program gains (a
# ConvNet teacher's train step was ~10% slower without YNNPACK), so this is per program.
_NO_YNN = (("xla_cpu_experimental_ynn_fusion_type", ""),)
CPU_PROGRAM_OPTIONS: dict[str, tuple[tuple[str, str], ...]] = {
    "recover_step": _NO_YNN,
    "student_step": _NO_YNN,
}


@functools.cache
def _accepted(options: tuple[tuple[str, str], ...]) -> bool:
  """Whether this jaxlib's XLA knows every option (an unknown name fails compilation)."""
  try:
    jax.jit(lambda x: x + 1, compiler_options=dict(options)).lower(np.float32(0)).compile()
  except Exception:  # noqa: BLE001 - XLA raises its runtime error type for unknown options
    return False
  return True


def program_compiler_options(program: str, mode: str = "auto") -> dict[str, str] | None:
  """The XLA compile options of a kind of program under a ``compiler_options`` mode.

  Args:
    program: the kind of program, e.g. "recover_step", "student_step" ("" or an unknown kind:
      none).
    mode: "auto" (:data:`CPU_PROGRAM_OPTIONS` on the CPU backend, when this jaxlib accepts
      them) or "none" (XLA's defaults).

  Returns:
    A dict for ``jax.jit(..., compiler_options=)``, or None for XLA's defaults.
  """
  if mode not in COMPILER_MODES:
    raise ValueError(f"compiler_options mode {mode!r} is not one of {COMPILER_MODES}")
  options = CPU_PROGRAM_OPTIONS.get(program)
  if mode == "none" or not options or jax.default_backend() != "cpu" or not _accepted(options):
    return None
  return dict(options)


class Execution:
  """The single-device execution (the base the others refine).

  Attributes:
    mesh: the device mesh, or None (one device).
    units: the number of work units per batch (0: none).
    compiler: the ``compiler_options`` mode of :class:`ExecutionOptions` ("auto" or "none").
  """

  mesh: Mesh | None = None
  units: int = 0
  compiler: str = "auto"

  def __init__(self, *, compiler: str = "auto"):
    self.compiler = compiler

  def compiler_options(self, program: str) -> dict[str, str] | None:
    """XLA compile options for a kind of program (:func:`program_compiler_options`)."""
    return program_compiler_options(program, self.compiler)

  def jit(self, fn: Callable, *, program: str, **jit_kwargs: Any) -> Callable:
    """``jax.jit(fn, **jit_kwargs)`` compiled with the options of ``program``'s kind."""
    return jax.jit(fn, compiler_options=self.compiler_options(program), **jit_kwargs)

  @property
  def devices(self) -> list[jax.Device]:
    """The devices programs run on (the first holds results that are combined)."""
    return [jax.devices()[0]]

  @property
  def batch_multiple(self) -> int:
    """A gradient step's batch is trimmed to a multiple of this (split evenly over devices)."""
    return 1

  def pad_multiple(self) -> int:
    """Each process's forward batch is padded (and masked) to a multiple of this."""
    return 1

  @property
  def multi_process(self) -> bool:
    """Several processes run the programs together (they must step in lockstep)."""
    return False

  @property
  def fixed_batches(self) -> bool:
    """Forward batches are padded (and masked) to one compiled size; False for units, whose
    bounds depend on the batch's true size."""
    return True

  def local(self) -> Execution:
    """The same kind of execution over this process's devices only (what an evaluation that
    every process runs on its own uses)."""
    return self

  def place(self, tree: Any, *, copy: bool = False) -> Any:
    """Puts constants (weights, the synthetic set) where the programs read them; ``copy``: never
    alias the input buffers (for anything a program donates)."""
    return jax.device_put(tree, may_alias=False) if copy else jax.device_put(tree)

  def put_rows(self, tree: Any) -> Any:
    """A batch's host rows as the programs' input; each process passes its own rows."""
    return tree

  def put_batch(self, tree: Any) -> Any:
    """A global batch that every process holds whole, as the programs' input."""
    return tree

  def rows_to_host(self, tree: Any) -> Any:
    """This process's rows (numpy) of a split output."""
    return jax.tree.map(np.asarray, tree)

  def to_host(self, tree: Any) -> Any:
    """Host copies of (possibly sharded) results, on every process."""
    return jax.device_get(tree)

  def replicated(self, fn: Callable, *, donate_argnums: tuple[int, ...] = ()) -> Callable:
    """``fn`` jitted on whole (replicated) arrays: reductions and updates of small state."""
    return jax.jit(fn, donate_argnums=donate_argnums)

  def row_pass(self, fn: Callable, num_shared: int, gathered: Sequence[bool]) -> Callable:
    """``fn(*shared, *rows) -> outputs`` over a batch's rows, jitted.

    Args:
      fn: the pure program; the first ``num_shared`` arguments are constants (from
        :meth:`place`), the rest row arrays of one batch (from :meth:`put_rows`).
      num_shared: how many leading arguments are shared.
      gathered: per output, True: it comes back whole on every device (row outputs that a
        replicated reduction reads); False: it may stay split like the batch (read it with
        :meth:`rows_to_host`).
    """
    del num_shared, gathered
    return jax.jit(fn)

  def sum_pass(self, fn: Callable, num_shared: int) -> Callable:
    """``fn(*shared, *rows) -> sums`` (a pytree of sums over the rows), jitted; the sums of the
    parts of a batch are added (sharded: by XLA; units: in unit order)."""
    del num_shared
    return jax.jit(fn)

  def class_chunk(self, chunk: int, num_classes: int) -> int:
    """The classes per program of a map over independent classes, given the stage's choice."""
    del num_classes
    return chunk

  # Class chunks that a stage runs itself (recover: a resumable loop of steps per chunk).
  @property
  def class_multiple(self) -> int:
    """A chunk's class axis is padded to a multiple of this (it splits evenly over devices)."""
    return 1

  @property
  def chunk_wave(self) -> int:
    """How many chunks run concurrently (each on its own device)."""
    return 1

  def chunk_constants(self, tree: Any) -> list[Any]:
    """Constants (the teacher, keys) for the chunks: entry ``index % len`` serves chunk
    ``index``."""
    return [tree]

  def chunk_placement(self, index: int) -> Placement:
    """Where chunk ``index``'s arrays live (see :class:`Placement`)."""
    del index
    return Placement()

  def constrain_classes(self, tree: Any, size: int) -> Any:
    """Inside jit: leaves with a leading axis of ``size`` (a chunk's classes) split over the
    devices, the rest whole (so a donated chunk state keeps its layout)."""
    del size
    return tree

  def constrain_whole(self, tree: Any) -> Any:
    """Inside jit: every leaf whole on every device (small outputs every host reads)."""
    return tree

  def abstract(self, tree: Any, size: int | None = None) -> Any:
    """``jax.ShapeDtypeStruct`` leaves (for ahead-of-time lowering without data) with the
    layout :meth:`constrain_classes` gives (``size`` None: every leaf whole)."""
    return memory.abstract(tree)

  def class_program(self, solve: Callable, num_inputs: int) -> Callable:
    """The jitted program :meth:`map_classes` runs per chunk (for ahead-of-time lowering)."""
    del num_inputs
    return jax.jit(solve)

  def map_classes(self, solve: Callable, inputs: tuple, *, chunk: int,
                  solve_one: Callable | None = None) -> Any:
    """``solve`` over chunks of a class axis: independent classes, one program per chunk.

    Args:
      solve: ``solve(*inputs) -> outputs``, vmapped over the leading (class) axis of every input
        and output; jitted, with its static arguments bound.
      inputs: arrays (numpy, or PRNG key arrays) with a leading class axis of size C.
      chunk: classes per call (:meth:`class_chunk` may lower it; a mesh solves all at once).
      solve_one: optional unbatched ``solve`` for chunks of one class.

    Returns:
      The outputs for all C classes, concatenated along the class axis.
    """
    return self._map_chunks(solve, inputs, self.class_chunk(chunk, _leading(inputs)),
                            solve_one, [None])

  def _map_chunks(self, solve, inputs, chunk, solve_one, devices):
    n = _leading(inputs)
    parts = []
    for b, lo in enumerate(range(0, n, chunk)):
      part = tuple(x[lo:lo + chunk] for x in inputs)
      device = devices[b % len(devices)]
      if device is not None:
        part = jax.device_put(part, device)
      if part[0].shape[0] == 1 and solve_one is not None:  # exactly the unbatched program
        out = jax.tree.map(lambda a: a[None], solve_one(*(x[0] for x in part)))
      else:
        out = solve(*part)
      parts.append(out)
    if devices[0] is not None:
      parts = jax.device_put(parts, devices[0])
    if len(parts) == 1:
      return parts[0]
    return jax.tree.map(lambda *xs: jax.numpy.concatenate(xs), *parts)

  def gradient_step(self, share: Callable, apply: Callable, *,
                    weights_of: Callable[[Any], Any],
                    prepare: Callable | None = None, program: str = "") -> Callable:
    """One optimiser step over a batch, as ``step(state, shared, rows, key, step) -> (state,
    metrics)``; ``state`` is donated.

    Args:
      share: ``share(weights, shared, rows, key, batch) -> outs``: a share of the batch (a tuple
        of row arrays ``rows``) with the gradient of its loss sum divided by ``batch`` (the whole
        batch's size) and other outputs that add up over shares (e.g. its BN statistics update
        scaled by its share of the batch). ``key`` is ``fold_in(key, step)``, and with units
        ``fold_in(fold_in(key, step), unit)``.
      apply: ``apply(state, total) -> (state, metrics)`` with the shares' outputs summed.
      weights_of: what of the state ``share`` reads (e.g. ``(params, batch_stats)``).
      prepare: optional ``prepare(*rows_in) -> rows``: a whole-batch computation (e.g. the
        student's views, mixed across the batch) that runs once before the shares; ``rows``
        given to the step are then its inputs.
      program: the kind of program, for its compile options (:meth:`jit`).
    """

    def whole(state, shared, rows, key, step):
      if prepare is not None:
        rows = self._split_rows(prepare(*rows))
      batch = rows[0].shape[0]
      outs = share(weights_of(state), shared, rows, jax.random.fold_in(key, step), batch)
      return apply(state, outs)

    return self._jit_step(whole, prepared=prepare is not None, program=program)

  # Hooks of the sharded execution.
  def _split_rows(self, rows):
    return rows

  def _jit_step(self, whole, prepared, program):
    del prepared
    return self.jit(whole, program=program, donate_argnums=(0,))


class Sharded(Execution):
  """Programs partitioned over a 1-D mesh by XLA: batches split along the mesh axis, constants
  replicated (equal to one device up to float round-off; several processes allowed)."""

  def __init__(self, mesh: Mesh, *, compiler: str = "auto"):
    super().__init__(compiler=compiler)
    self.mesh = mesh

  @property
  def devices(self) -> list[jax.Device]:
    return list(self.mesh.devices.flat)

  @property
  def batch_multiple(self) -> int:
    return self.mesh.devices.size

  def pad_multiple(self) -> int:
    return sharding.local_batch_multiple(self.mesh)

  @property
  def multi_process(self) -> bool:
    return jax.process_count() > 1

  def place(self, tree, *, copy=False):
    return sharding.replicate(tree, self.mesh, copy=copy)

  def put_rows(self, tree):
    return sharding.from_process_local(tree, self.mesh)

  def put_batch(self, tree):
    return sharding.shard_leading(tree, self.mesh)

  def rows_to_host(self, tree):
    return sharding.to_process_local(tree, self.mesh)

  def to_host(self, tree):
    return sharding.gather(tree)

  def replicated(self, fn, *, donate_argnums=()):
    rep = sharding.replicated(self.mesh)
    return jax.jit(fn, donate_argnums=donate_argnums, in_shardings=rep, out_shardings=rep)

  def local(self):
    if jax.process_count() == 1:
      return self
    return Sharded(sharding.make_mesh(jax.local_devices()), compiler=self.compiler)

  def row_pass(self, fn, num_shared, gathered):
    rep, split = sharding.replicated(self.mesh), sharding.batch_sharding(self.mesh)
    return _RowPass(fn, num_shared, rep, split, tuple(gathered))

  def sum_pass(self, fn, num_shared):
    rep, split = sharding.replicated(self.mesh), sharding.batch_sharding(self.mesh)
    return _RowPass(fn, num_shared, rep, split, rep)

  @property
  def class_multiple(self):
    return self.mesh.devices.size

  def chunk_constants(self, tree):
    return [sharding.replicate(tree, self.mesh)]

  def chunk_placement(self, index):
    del index
    return _ShardedPlacement(self)

  def constrain_classes(self, tree, size):
    return sharding.constrain_leading(tree, self.mesh, size)

  def constrain_whole(self, tree):
    return sharding.constrain_replicated(tree, self.mesh)

  def abstract(self, tree, size=None):
    rep, split = sharding.replicated(self.mesh), sharding.class_sharding(self.mesh)
    return memory.abstract(
        tree, lambda x: split if size is not None and np.ndim(x) >= 1 and np.shape(x)[0] == size
        else rep)

  def map_classes(self, solve, inputs, *, chunk, solve_one=None):
    """All classes at once, the class axis padded to a multiple of the mesh size (repeats of the
    last class) and split: each device runs the single-device vmapped ``solve`` on its own
    classes under ``shard_map``, so results do not depend on the device count. Every process
    passes the same (all-class) inputs; the outputs come back to every host."""
    del chunk, solve_one
    n = _leading(inputs)
    ids = sharding.pad_class_ids(np.arange(n), self.mesh.devices.size)
    split = sharding.class_sharding(self.mesh)
    padded, impls = [], []
    for x in inputs:
      if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        # Keys go through the host as raw data: with several processes a device array cannot
        # be placed on the others' devices.
        impls.append(jax.random.key_impl(x))
        padded.append(np.asarray(jax.random.key_data(x))[ids])
      else:
        impls.append(None)
        padded.append(np.asarray(x)[ids])
    placed = jax.device_put(tuple(padded), split)
    placed = tuple(p if impl is None else jax.random.wrap_key_data(p, impl=impl)
                   for p, impl in zip(placed, impls))
    out = self.class_program(solve, len(inputs))(*placed)
    return jax.tree.map(lambda a: a[:n], sharding.gather(out))

  def class_program(self, solve, num_inputs):
    # shard_map, not jit with shardings: each device runs exactly the single-device program on
    # its own classes (the SPMD partitioner would be free to split other axes and reorder sums).
    split = sharding.class_sharding(self.mesh)
    local = jax.shard_map(solve, mesh=self.mesh, in_specs=(split.spec,) * num_inputs,
                          out_specs=split.spec, check_vma=False)
    return jax.jit(local, in_shardings=(split,) * num_inputs, out_shardings=split)

  def _split_rows(self, rows):
    split = sharding.batch_sharding(self.mesh)
    return tuple(jax.lax.with_sharding_constraint(r, split) for r in rows)

  def _jit_step(self, whole, prepared, program):
    # Rows split over the mesh; inputs of a whole-batch ``prepare`` replicated (it splits its
    # result itself).
    rep = sharding.replicated(self.mesh)
    rows = rep if prepared else sharding.batch_sharding(self.mesh)
    return self.jit(whole, program=program, donate_argnums=(0,),
                    in_shardings=(rep, rep, rows, rep, rep), out_shardings=rep)


class _RowPass:
  """A sharded row pass: shared arguments replicated, rows split, outputs as asked."""

  def __init__(self, fn, num_shared, rep, split, gathered):
    self.fn, self.num_shared, self.rep, self.split = fn, num_shared, rep, split
    # A tuple: one sharding per output; a single sharding: every output (sums).
    self.out = (tuple(rep if g else split for g in gathered) if isinstance(gathered, tuple)
                else gathered)
    self.compiled = None

  def _jitted(self, num_args):
    if self.compiled is None:
      n_rows = num_args - self.num_shared
      self.compiled = jax.jit(
          self.fn, in_shardings=(self.rep,) * self.num_shared + (self.split,) * n_rows,
          out_shardings=self.out)
    return self.compiled

  def __call__(self, *args):
    return self._jitted(len(args))(*args)

  def lower(self, *args):
    """Ahead-of-time lowering (memory analysis) on abstract arguments."""
    return self._jitted(len(args)).lower(*args)


class Units(Execution):
  """Deterministic work units (:mod:`wmdd_jax.distributed.units`): every batch cut into
  ``units`` fixed parts, unit g's single-device program on device g % D, results combined in
  unit order on the first device. Bit-identical for any device count; one process only."""

  def __init__(self, units: int, mesh: Mesh | None = None, *, compiler: str = "auto"):
    super().__init__(compiler=compiler)
    self.units = units_lib.check_units(units)
    self._devices = units_lib.devices_of(mesh)
    self.mesh = mesh

  @property
  def devices(self) -> list[jax.Device]:
    return list(self._devices)

  def place(self, tree, *, copy=False):
    return jax.device_put(tree, self._devices[0], may_alias=False if copy else None)

  def replicas(self, tree: Any) -> list[Any]:
    """``tree`` committed to each device (the per-device constants of the units)."""
    return units_lib.replicas(tree, self._devices)

  @property
  def fixed_batches(self):
    return False

  def compiler_options(self, program):
    # Bit-identity for any device count is what units are for. XLA:CPU's own convolutions (what
    # the CPU options pick instead of YNNPACK) are split into as many parts as the host has
    # devices, which changes their round-off (tests/test_parallel.py's 1- vs 4-device run), so
    # units keep XLA's defaults.
    del program
    return None

  @property
  def chunk_wave(self):
    return len(self._devices)

  def chunk_constants(self, tree):
    return self.replicas(tree)

  def chunk_placement(self, index):
    return Placement(self._devices[index % len(self._devices)])

  def class_chunk(self, chunk, num_classes):
    # At most one chunk per unit, so the units (not the chunk size) set the parallelism.
    return min(chunk, -(-num_classes // self.units))

  def map_classes(self, solve, inputs, *, chunk, solve_one=None):
    """Chunks run on devices b % D, dispatched before any result is read; the results do not
    depend on the device count."""
    return self._map_chunks(solve, inputs, self.class_chunk(chunk, _leading(inputs)), solve_one,
                            self._devices)

  def row_pass(self, fn, num_shared, gathered):
    del gathered  # units gather every output on the first device
    return _UnitPass(jax.jit(fn), num_shared, self, sums=False)

  def sum_pass(self, fn, num_shared):
    return _UnitPass(jax.jit(fn), num_shared, self, sums=True)

  def gradient_step(self, share, apply, *, weights_of, prepare=None, program=""):
    return _UnitStep(self, share, apply, weights_of, prepare, program)


class _Replicas:
  """Per-device copies of a pytree, remade only when a different object is passed."""

  def __init__(self, execution: Units):
    self.ex, self.source, self.copies = execution, None, None

  def __call__(self, tree):
    leaves = jax.tree.leaves(tree)
    if (self.copies is None or len(leaves) != len(self.source)
        or any(x is not y for x, y in zip(leaves, self.source))):
      self.source, self.copies = leaves, self.ex.replicas(tree)
    return self.copies


class _UnitPass:
  """A row or sum pass as units: unit g on device g % D; rows gathered (or sums added) in unit
  order on the first device."""

  def __init__(self, jitted, num_shared, execution: Units, sums: bool):
    self.fn, self.num_shared, self.ex, self.sums = jitted, num_shared, execution, sums
    self.copies = _Replicas(execution)

  def __call__(self, *args):
    shared, rows = args[:self.num_shared], args[self.num_shared:]
    devices = self.ex.devices
    copies = self.copies(shared)
    n = np.shape(rows[0])[0]
    parts = units_lib.map_units(
        lambda g, d, lo, hi: self.fn(*copies[d], *jax.device_put(
            tuple(r[lo:hi] for r in rows), devices[d])),
        n, self.ex.units, devices)
    if self.sums:
      return units_lib.ordered_sum(parts, devices[0])
    return units_lib.gather_rows(parts, devices[0])


class _UnitStep:
  """A gradient step as units: shares on devices g % D, summed in order on the first device,
  which updates the state."""

  def __init__(self, execution: Units, share, apply, weights_of, prepare, program):
    self.ex = execution
    self.prepare = None if prepare is None else jax.jit(prepare)

    def unit(weights, shared, rows, key, step, index, batch):
      return share(weights, shared, rows, units_lib.unit_key(key, step, index), batch)

    def combine(state, outs):
      return apply(state, units_lib.fold_sum(outs))

    self.unit = execution.jit(unit, program=program)  # the share: the convolutions
    self.apply = jax.jit(combine, donate_argnums=(0,))
    self.weights_of = weights_of
    self.shared_copies, self.keys = _Replicas(execution), _Replicas(execution)

  def __call__(self, state, shared, rows, key, step):
    devices = self.ex.devices
    shared_copies, keys = self.shared_copies(shared), self.keys(key)
    if self.prepare is not None:
      rows = self.prepare(*jax.device_put(rows, devices[0]))
    weights = self.ex.replicas(self.weights_of(state))
    n = np.shape(rows[0])[0]
    batch, step = np.float32(n), np.int32(step)

    def one(g, d, lo, hi):
      part = jax.device_put(tuple(r[lo:hi] for r in rows), devices[d])
      return self.unit(weights[d], shared_copies[d], part, keys[d], step, np.int32(g), batch)

    return self.apply(state, units_lib.map_units(one, n, self.ex.units, devices))


class Placement:
  """Where one class chunk's arrays live: one device (``device``, or the default)."""

  def __init__(self, device: jax.Device | None = None):
    self.device = device

  def split(self, tree: Any) -> Any:
    """Arrays with the chunk's class axis first."""
    return jax.device_put(tree, self.device)

  def whole(self, tree: Any) -> Any:
    """Arrays every class of the chunk reads."""
    return jax.device_put(tree, self.device)

  def jit(self, fn: Callable, size: int, **jit_kwargs: Any) -> Callable:
    """``fn`` jitted with the chunk's layout for its outputs (class-axis leaves of ``size``
    split, the rest whole); its inputs decide the device."""
    del size
    return _placed_jit(fn, None, None, tuple(sorted(jit_kwargs.items())))


class _ShardedPlacement(Placement):
  def __init__(self, execution: Sharded):
    super().__init__()
    self.ex = execution

  def split(self, tree):
    return jax.device_put(tree, sharding.class_sharding(self.ex.mesh))

  def whole(self, tree):
    return sharding.replicate(tree, self.ex.mesh)

  def jit(self, fn, size, **jit_kwargs):
    return _placed_jit(fn, size, self.ex, tuple(sorted(jit_kwargs.items())))


@functools.lru_cache(maxsize=64)
def _placed_jit(fn: Callable, size: int | None, execution: Execution | None,
                jit_kwargs: tuple) -> Callable:
  """One jitted program per (function, chunk size, execution): chunks of one shape reuse it
  instead of compiling again (``fn`` must be a stable, hashable function, not a fresh lambda)."""
  if execution is None:
    return jax.jit(fn, **dict(jit_kwargs))
  return jax.jit(lambda *a: execution.constrain_classes(fn(*a), size), **dict(jit_kwargs))


def _leading(inputs) -> int:
  return int(np.shape(inputs[0])[0])


def make_execution(options: ExecutionOptions | None = None, *,
                   devices: Sequence[jax.Device] | None = None) -> Execution:
  """The execution a run's ``parallel`` options ask for.

  Args:
    options: mesh mode and units (default: ``ExecutionOptions()``).
    devices: the devices to use (default: every device of every process).

  Returns:
    :class:`Units` when ``options.units`` > 0 (over the mesh's devices, or the default device),
    else :class:`Sharded` over a mesh of the devices when the mode asks for one, else the
    single-device :class:`Execution`.
  """
  options = options or ExecutionOptions()
  count = len(devices) if devices is not None else jax.device_count()
  want_mesh = options.mesh == "on" or (options.mesh == "auto" and count > 1)
  mesh = sharding.make_mesh(devices) if want_mesh else None
  compiler = options.compiler_options
  if options.units:
    return Units(options.units, mesh, compiler=compiler)
  if mesh is not None:
    return Sharded(mesh, compiler=compiler)
  return Execution(compiler=compiler)


def local_execution() -> Execution:
  """Data parallelism over this process's devices (what teacher training and evaluation use when
  given no execution; one device: the same programs on it)."""
  return Sharded(sharding.make_mesh(jax.local_devices()))


def from_mesh(mesh: Mesh | None = None, units: int = 0) -> Execution:
  """The execution of the older ``mesh=`` / ``units=`` arguments (None and 0: one device)."""
  if units:
    return Units(units, mesh)
  return Execution() if mesh is None else Sharded(mesh)


__all__ = ["CPU_PROGRAM_OPTIONS", "Execution", "Sharded", "Units", "from_mesh", "local_execution",
           "make_execution", "program_compiler_options"]
