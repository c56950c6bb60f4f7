"""How a :class:`~wmdd_jax.data.dataset.Dataset`'s batches are read: in the caller, or by grain.

Two loaders, chosen with ``open_dataset(..., loader=...)`` (or :meth:`Dataset.with_loader`):

``"sync"`` (the default)
  The reader as it always was: each batch is read when it is asked for, in the calling thread
  (a ``folder:`` source decodes one batch at a time in ``num_workers`` threads), nothing ahead.

``"grain"``
  `grain <https://github.com/google/grain>`_ reads whole batches ahead of the consumer:
  ``worker_count`` worker processes (0: none, in this process) each with ``read_threads``
  threads, each thread reading one batch, up to ``prefetch`` batches buffered per process.
  The batches are **the same batches in the same order** as ``"sync"`` gives (the positions of
  every batch come from the same seeded permutation and per-process slice; grain only decides
  who reads them and when), so switching loader changes no result. :meth:`Dataset.epochs`
  keeps one grain pipeline over all epochs, so the workers start once per run, read across
  epoch boundaries, and an epoch asked for out of turn (a resumed run) restarts them there.
  Sources without random access (``tfds:`` read through ``tf.data``) are read by the old
  stream in a background thread, ``prefetch`` batches ahead (tf.data decodes in its own
  threads).

What was found on this project's machines (grain 0.2.18, jax 0.10.2, Linux):

* grain starts its worker processes with ``spawn``, whatever the platform default; ``fork``
  after JAX has started its threads is unsafe (JAX warns about it) and grain never does it.
  Spawned workers import the main module again (so a script needs the usual ``if __name__ ==
  "__main__":`` guard) and import JAX through it and through this package, but they only run
  numpy and PIL: they never start a JAX backend, so no worker touches the accelerator (each
  also gets ``JAX_PLATFORMS=cpu`` in case something does). Starting the workers costs a few
  seconds (4-11 s for 1-2 workers on the 2-core development machine under load), which is why
  :meth:`Dataset.epochs` starts them once.
* Speed (``python -m bench.input``, bench/results/input.json): on the shared 2-core machine no
  loader decodes faster than ``sync``, which already decodes each batch in 2 threads; grain's
  threads are level with it and worker processes slower (fewer cores than busy processes, and
  every batch crosses shared memory: in-memory arrays are 10-40x slower through workers). The
  loader's rate matters where the step is faster than decoding, i.e. on an accelerator with
  many host cores: there raise ``read_threads`` (JPEG/PNG decoding releases the GIL) or
  ``worker_count`` (work that holds the GIL). ``sync`` stays the default.
* grain 0.2.18 with jaxlib >= 0.10 reads the absl flag ``grain_enable_multiprocess_worker_
  profiling`` when its workers start and fails with ``UnparsedFlagAccessError`` unless absl
  flags were parsed (they are under ``absl.app.run``, as in ``experiments/*.py``, but not in a
  plain script or a notebook). Before starting workers this module marks absl's flags as
  parsed when nothing parsed them, so every flag reads its default (what ``absl.app.run``
  with no arguments would give).
* Batches cross from the workers through shared memory (``/dev/shm``): a container with a
  small ``/dev/shm`` (Docker's default is 64 MiB) needs ``--shm-size`` of at least
  ``worker_count * (prefetch + read_threads)`` batches. They are copied into ordinary arrays
  on arrival, so nothing the consumer holds refers to shared memory.
"""

from __future__ import annotations

import dataclasses
import math
import os
import queue
import threading
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from wmdd_jax.errors import ConfigError

LOADERS = ("sync", "grain")
#: open_dataset options that choose and tune the loader (every source accepts them).
OPTIONS = ("loader", "worker_count", "read_threads", "prefetch")
#: Epoch ``e`` of a stream seeded ``s`` is shuffled with seed ``s * EPOCH_SEED_STRIDE + e``: the
#: rule the teacher's in-memory path (``wmdd_jax.training``) and the pipeline already use.
EPOCH_SEED_STRIDE = 100_003
# How many epochs one grain pipeline of Dataset.epochs spans (it is lazy: only its length).
_MAX_EPOCHS = 1 << 24

Batch = tuple[np.ndarray, np.ndarray]


def epoch_seed(seed: int, epoch: int) -> int:
  """The shuffle seed of ``epoch`` in a stream seeded ``seed``."""
  return int(seed) * EPOCH_SEED_STRIDE + int(epoch)


def default_read_threads(worker_count: int) -> int:
  """Threads per process when ``read_threads`` is not given: min(8, cores) shared out."""
  return max(1, min(8, os.cpu_count() or 1) // max(1, worker_count))


@dataclasses.dataclass(frozen=True)
class LoaderOptions:
  """The loader options of a dataset (see the module docstring).

  Attributes:
    loader: ``"sync"`` or ``"grain"``.
    worker_count: grain worker processes (0: read in this process).
    read_threads: grain threads per process, each reading one batch.
    prefetch: batches grain buffers ahead, per process.
  """

  loader: str = "sync"
  worker_count: int = 0
  read_threads: int = 1
  prefetch: int = 2


def loader_options(
    loader: Any = "sync",
    worker_count: Any = None,
    read_threads: Any = None,
    prefetch: Any = None,
) -> LoaderOptions:
  """Checks the loader options of ``open_dataset`` and fills in the defaults.

  Args:
    loader: ``"sync"`` (default) or ``"grain"``.
    worker_count: grain worker processes; default 0: grain's threads in the calling process,
      which read JPEG/PNG as fast or faster than processes where decoding is the work (PIL
      releases the GIL) and start at once (bench/results/input.json); processes start in
      seconds each and pay off when Python-side work holds the GIL.
    read_threads: grain threads per process, each reading one whole batch; default
      :func:`default_read_threads` (min(8, cores) shared among the processes).
    prefetch: batches buffered ahead per process; default 2.

  Returns:
    A :class:`LoaderOptions`.

  Raises:
    ConfigError: an unknown loader, a tuning option with ``loader="sync"``, or a value out of
      range.
  """
  name = "sync" if loader is None else loader
  if not isinstance(name, str) or name.strip().lower() not in LOADERS:
    raise ConfigError(f"loader={loader!r} is unknown; use one of {list(LOADERS)}, e.g. "
                      "loader='grain' to read batches ahead in worker processes.")
  name = name.strip().lower()
  given = {k: v for k, v in (("worker_count", worker_count), ("read_threads", read_threads),
                             ("prefetch", prefetch)) if v is not None}
  if name == "sync":
    if given:
      raise ConfigError(f"{sorted(given)} tune loader='grain', but the loader is 'sync' (which "
                        "reads each batch when asked); add loader='grain' or drop them.")
    return LoaderOptions()

  def count(key: str, value: Any, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < low:
      raise ConfigError(f"{key}={value!r} must be an int >= {low}, e.g. {key}={max(low, 2)}.")
    return int(value)

  workers = 0 if worker_count is None else count("worker_count", worker_count, 0)
  threads = default_read_threads(workers) if read_threads is None else count(
      "read_threads", read_threads, 1)
  ahead = 2 if prefetch is None else count("prefetch", prefetch, 1)
  return LoaderOptions("grain", workers, threads, ahead)


def _import_grain() -> Any:
  try:
    import grain  # noqa: PLC0415
  except ImportError as e:
    raise ConfigError(
        "loader='grain' needs the grain package, which is not installed; run "
        "`pip install grain` (it is in requirements.txt), or use loader='sync'."
    ) from e
  return grain


def _absl_flags_ready() -> None:
  """Marks absl flags parsed when nothing parsed them (see the module docstring)."""
  from absl import flags  # noqa: PLC0415

  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


def _worker_init(index: int, count: int) -> None:
  del index, count
  # Workers read with numpy and PIL only; never let one claim the accelerator.
  os.environ["JAX_PLATFORMS"] = "cpu"


def _plain(batch: Any) -> Batch:
  """A batch as ordinary arrays (grain hands over shared-memory arrays from its workers)."""
  images, labels = batch
  if type(images) is not np.ndarray:
    images = np.array(images)
  if type(labels) is not np.ndarray:
    labels = np.array(labels)
  return images, labels


class Plan:
  """Which positions every batch of a pass (or of every epoch) holds: picklable.

  grain pickles it into every worker process; :meth:`batch` reads global batch ``g`` (epoch
  ``g // steps``, batch ``g % steps`` of it) exactly as the ``sync`` loader reads it.

  Args:
    dataset: the dataset (a copy whose source reads in the calling thread is kept).
    split, batch_size, classes, shuffle, drop_remainder, process_index, process_count: as in
      :meth:`Dataset.iter_batches`.
    seed: the shuffle seed of a single pass, or the stream's seed.
    per_epoch: the stream form: epoch ``e`` uses :func:`epoch_seed` ``(seed, e)``.
  """

  def __init__(self, dataset: Any, split: str, batch_size: int, *, classes: Any, shuffle: bool,
               seed: int, per_epoch: bool, drop_remainder: bool, process_index: int,
               process_count: int):
    self.batch_size = int(batch_size)
    self._args = (split, self.batch_size, classes, bool(shuffle), bool(drop_remainder),
                  int(process_index), int(process_count))
    self.seed, self.per_epoch = int(seed), bool(per_epoch)
    # Checks the arguments now (at the call, as the sync loader does), and fixes the length.
    first = dataset._positions(split, self.batch_size, classes, shuffle, self.seed_of(0),
                               drop_remainder, process_index, process_count)
    self.num_positions = len(first)
    self.steps = math.ceil(self.num_positions / self.batch_size)
    self.src_split, self.idx = dataset._view(split)
    self.labels = dataset.labels(split)
    self.dataset = dataset._reading_copy()
    self._cache: dict[int, np.ndarray] = {0: first}
    self._lock = threading.Lock()

  def __getstate__(self) -> dict[str, Any]:
    state = dict(self.__dict__)
    state["_cache"], state["_lock"] = {}, None
    return state

  def __setstate__(self, state: dict[str, Any]) -> None:
    self.__dict__.update(state)
    self._lock = threading.Lock()

  def seed_of(self, epoch: int) -> int:
    return epoch_seed(self.seed, epoch) if self.per_epoch else self.seed

  def positions(self, epoch: int) -> np.ndarray:
    """The positions of the split this process reads in ``epoch``, in order."""
    with self._lock:
      cached = self._cache.get(epoch)
    if cached is not None:
      return cached
    split, b, classes, shuffle, drop, pi, pc = self._args
    pos = self.dataset._positions(split, b, classes, shuffle, self.seed_of(epoch), drop, pi, pc)
    with self._lock:
      if len(self._cache) >= 3:  # Threads may straddle an epoch boundary; keep a few.
        self._cache.pop(min(self._cache))
      self._cache[epoch] = pos
    return pos

  def batch(self, g: int) -> Batch:
    """Global batch ``g``: (images u8[B, H, W, ch], labels i32[B])."""
    epoch, b = divmod(int(g), self.steps)
    pos = self.positions(epoch)[b * self.batch_size : (b + 1) * self.batch_size]
    return self.dataset._read(self.src_split, self.idx[pos]), self.labels[pos]


class GrainBatches:
  """Global batches ``start..stop-1`` of a :class:`Plan`, read by grain; closeable.

  Args:
    plan: what to read.
    start, stop: the global batch range.
    options: the loader options (``loader="grain"``).
  """

  def __init__(self, plan: Plan, start: int, stop: int, options: LoaderOptions):
    grain = _import_grain()
    ds = grain.MapDataset.range(int(start), int(stop)).map(plan.batch)
    ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=options.read_threads,
                                              prefetch_buffer_size=options.prefetch))
    if options.worker_count > 0:
      _absl_flags_ready()
      ds = ds.mp_prefetch(
          grain.MultiprocessingOptions(num_workers=options.worker_count,
                                       per_worker_buffer_size=options.prefetch),
          worker_init_fn=_worker_init)
    self.position = int(start)
    self.stop = int(stop)
    self._it = iter(ds)

  def __iter__(self) -> GrainBatches:
    return self

  def __next__(self) -> Batch:
    if self._it is None or self.position >= self.stop:
      raise StopIteration
    batch = _plain(next(self._it))
    self.position += 1
    return batch

  def close(self) -> None:
    it, self._it = self._it, None
    if it is not None and hasattr(it, "close"):
      it.close()


def grain_pass(plan: Plan, options: LoaderOptions) -> Iterator[Batch]:
  """One pass over a single-pass :class:`Plan` with grain; the workers stop when it ends."""
  if plan.steps == 0:
    return
  batches = GrainBatches(plan, 0, plan.steps, options)
  try:
    yield from batches
  finally:
    batches.close()


def thread_prefetch(make: Callable[[], Iterator[Batch]], size: int) -> Iterator[Batch]:
  """``make()``'s batches, read ``size`` ahead in a background thread (errors re-raised here)."""
  q: queue.Queue = queue.Queue(maxsize=max(1, size))
  stop = threading.Event()
  done = object()

  def put(item: Any) -> bool:
    while not stop.is_set():
      try:
        q.put(item, timeout=0.1)
        return True
      except queue.Full:
        continue
    return False

  def work() -> None:
    try:
      for batch in make():
        if not put(("batch", batch)):
          return
      put(("end", done))
    except BaseException as e:  # Re-raised in the consumer, whatever it is.
      put(("error", e))

  thread = threading.Thread(target=work, name="wmdd-prefetch", daemon=True)
  thread.start()
  try:
    while True:
      kind, item = q.get()
      if kind == "batch":
        yield item
      elif kind == "error":
        raise item
      else:
        return
  finally:
    stop.set()


class EpochBatches:
  """A callable ``epoch -> iterator of batches`` over one split: what training loops take.

  Made by :meth:`Dataset.epochs`. Epoch ``e`` holds the batches ``iter_batches`` gives with
  ``seed=epoch_seed(seed, e)`` (the same under every loader), so a run resumed at epoch ``e``
  reads what it would have read. With ``loader="grain"`` one grain pipeline serves the epochs
  in turn (workers start once and read across epoch boundaries); asking for an epoch out of
  turn, or for the next one before the current was read to its end, restarts it there. Call
  :meth:`close` (or use it as a context manager) to stop the workers early; they also stop
  when it is garbage collected.

  Attributes:
    steps_per_epoch: batches per epoch (full batches with ``drop_remainder``).
    num_examples: examples per epoch on this process.
  """

  def __init__(self, dataset: Any, plan: Plan, options: LoaderOptions):
    self._dataset, self._plan, self._options = dataset, plan, options
    self.steps_per_epoch = plan.steps
    self.num_examples = plan.num_positions
    self._grain: GrainBatches | None = None
    self._token = 0

  def __call__(self, epoch: int) -> Iterator[Batch]:
    epoch = int(epoch)
    if epoch < 0:
      raise ConfigError(f"epoch={epoch} must be >= 0.")
    plan, options = self._plan, self._options
    split, b, classes, shuffle, drop, pi, pc = plan._args
    sync_pass = lambda: self._dataset._sync_batches(
        split, b, classes=classes, shuffle=shuffle, seed=plan.seed_of(epoch),
        drop_remainder=drop, process_index=pi, process_count=pc)
    if options.loader == "sync":
      return sync_pass()
    if not self._dataset._source.random_access:
      return thread_prefetch(sync_pass, options.prefetch)
    start = epoch * plan.steps
    if plan.steps and (self._grain is None or self._grain.position != start):
      self.close()
      self._grain = GrainBatches(plan, start, _MAX_EPOCHS * plan.steps, options)
    self._token += 1
    return self._epoch(self._token)

  def _epoch(self, token: int) -> Iterator[Batch]:
    for _ in range(self._plan.steps):
      if token != self._token or self._grain is None:
        return  # A later epoch was asked for: this one is over.
      yield next(self._grain)

  def close(self) -> None:
    """Stops the grain workers (a later call starts them again)."""
    batches, self._grain = self._grain, None
    if batches is not None:
      batches.close()

  def __enter__(self) -> EpochBatches:
    return self

  def __exit__(self, *exc: Any) -> None:
    self.close()

  def __del__(self) -> None:
    try:
      self.close()
    except Exception:  # noqa: BLE001 - interpreter shutdown: nothing left to clean.
      pass
