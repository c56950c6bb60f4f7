"""The :class:`Dataset` every source is read through, and :func:`open_dataset`.

A dataset is a *source* (tfds, image folder, IDX files, an ``.npz`` archive, sklearn digits; see
:mod:`wmdd_jax.data.source` for the base class and the table of spec prefixes) that knows how to
list labels and read images by index, wrapped by :class:`Dataset`, which adds what every source
shares: resizing, label checks, the seeded ``val`` hold-out, per-channel normalisation constants,
class filtering, shuffling, multi-process sharding and batching.

Images always come out as ``u8[B, H, W, ch]`` numpy arrays and labels as ``i32[B]``; turning them
into normalised float arrays is :mod:`wmdd_jax.data.transforms`' job.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import hashlib
import json
import os
import tempfile
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
from PIL import Image, ImageOps

# isort: off
# Importing a source module registers its specs in SOURCES; this order is the order in which
# the spec forms are listed in error messages.
from wmdd_jax.data import tfds_source, folder, arrays  # noqa: F401
# isort: on
from wmdd_jax.data import loader as loader_lib
from wmdd_jax.data.source import (
    COMMON_OPTIONS,  # noqa: F401 - also read from here (tests/test_configs.py)
    NORMALIZATION,
    SOURCES,
    Source,
    parse_spec,
    split_options,
    stratified_holdout,
)
from wmdd_jax.errors import ConfigError, DataError, DatasetNotFoundError

# Read by tests/test_configs.py: prefix -> the source's own options. A snapshot of SOURCES taken
# once the built-in sources are registered; new code should read SOURCES[prefix].options.
_SOURCE_OPTIONS = {prefix: kind.options for prefix, kind in SOURCES.items()}

VAL_SPLIT = "val"

# Part of every stats cache key: bump it when what is cached or how it is computed changes.
_STATS_VERSION = "wmdd_jax-stats-2"


def stats_cache_dir() -> str:
  """The folder computed mean/std are cached in between runs (never the dataset's folder).

  ``$WMDD_CACHE_DIR`` if set, else ``$XDG_CACHE_HOME/wmdd_jax``, else ``~/.cache/wmdd_jax``.
  Entries live in its ``stats/`` subfolder, one small JSON file per key; deleting the folder
  only costs recomputation. An unwritable folder is not an error: the stats then stay in memory.
  """
  explicit = os.environ.get("WMDD_CACHE_DIR")
  if explicit:
    return os.path.expanduser(explicit)
  base = os.environ.get("XDG_CACHE_HOME") or os.path.join("~", ".cache")
  return os.path.join(os.path.expanduser(base), "wmdd_jax")


def _read_stats(
    path: str, key: str, ch: int
) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
  """The cached (mean, std) at ``path`` if it is a well-formed entry for ``key``, else None."""
  try:
    with open(path) as f:
      entry = json.load(f)
  except (OSError, ValueError):
    return None  # Absent or damaged: it only costs a recomputation.
  if not isinstance(entry, dict) or entry.get("key") != key:
    return None  # Never trust an entry written for other content.
  try:
    mean = tuple(float(m) for m in entry["mean"])
    std = tuple(float(s) for s in entry["std"])
  except (KeyError, TypeError, ValueError):
    return None
  values = np.asarray(mean + std)
  if len(mean) != ch or len(std) != ch or not np.all(np.isfinite(values)) or min(std) <= 0:
    return None
  return mean, std


def _write_atomically(path: str, text: str) -> bool:
  """Writes ``text`` to ``path`` through a temporary file and a rename; False when it cannot."""
  parent = os.path.dirname(path)
  tmp = None
  try:
    os.makedirs(parent, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".json", dir=parent)
    with os.fdopen(fd, "w") as f:
      f.write(text)
    os.replace(tmp, path)
    return True
  except OSError:
    # A read-only or full cache folder: keep the result in memory only.
    if tmp is not None:
      with contextlib.suppress(OSError):
        os.remove(tmp)
    return False


def parse_hw(value: Any, what: str) -> tuple[int, int]:
  """Reads ``resize``-style options: an int (square) or an (H, W) pair of positive ints."""
  if isinstance(value, int | np.integer) and not isinstance(value, bool):
    value = (int(value), int(value))
  try:
    h, w = (int(v) for v in value)
  except (TypeError, ValueError):
    raise ConfigError(
        f"{what}={value!r} is not a size; pass an int or an (H, W) pair, e.g. {what}=(32, 32)."
    ) from None
  if h <= 0 or w <= 0:
    raise ConfigError(f"{what}={value!r} must be positive; pass e.g. {what}=(32, 32).")
  return h, w


def fit_image(image: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
  """Resizes the shorter side to cover ``hw``, then centre-crops to it (bilinear, antialiased).

  Args:
    image: u8[h, w, ch].
    hw: (H, W) wanted.

  Returns:
    u8[H, W, ch].
  """
  if image.shape[:2] == tuple(hw):
    return image
  height, width = hw

  def fit_plane(plane: np.ndarray, mode: str) -> np.ndarray:
    # ImageOps.fit crops in the source's coordinates before resampling, so no sub-pixel
    # offset is lost to rounding an intermediate resized size.
    out = ImageOps.fit(
        Image.fromarray(plane, mode=mode), (width, height), method=Image.Resampling.BILINEAR
    )
    return np.asarray(out)

  ch = image.shape[2]
  if ch == 3:
    return fit_plane(np.ascontiguousarray(image), "RGB")
  planes = [fit_plane(np.ascontiguousarray(image[..., i]), "L") for i in range(ch)]
  return np.stack(planes, axis=-1)


class Dataset:
  """A labelled image dataset with named splits, streamed in ``u8`` batches.

  Attributes:
    spec: the spec string it was opened with.
    num_classes: number of classes C; labels are 0..C-1.
    class_names: C names, in label order.
    image_shape: (H, W, ch) of every image returned.
    splits: split names. With ``val_fraction > 0`` a ``"val"`` split is held out of ``"train"``.
    mean, std: per-channel normalisation constants in [0, 1] pixel scale (tuples of ch floats).
    loader_options: how batches are read (:class:`wmdd_jax.data.loader.LoaderOptions`:
      ``sync`` or ``grain`` with its worker processes and prefetch); never what they hold.
  """

  def __init__(
      self,
      source: Source,
      *,
      resize: Any = None,
      val_fraction: float = 0.0,
      seed: int = 0,
      normalization: Any = None,
      load_split_max_bytes: int = 8 << 30,
      loader: Any = "sync",
      worker_count: Any = None,
      read_threads: Any = None,
      prefetch: Any = None,
  ):
    self.loader_options = loader_lib.loader_options(loader, worker_count, read_threads, prefetch)
    self._source = source
    self.spec = source.spec
    self.class_names = [str(n) for n in source.class_names]
    self.num_classes = len(self.class_names)
    if self.num_classes < 1:
      raise DataError(f"{self.spec} has no classes; check that it holds labelled images.")
    self._resize = None if resize is None else parse_hw(resize, "resize")
    native_h, native_w, ch = source.native_shape
    if self._resize is not None:
      self.image_shape = (*self._resize, int(ch))
    elif native_h is None or native_w is None:
      raise ConfigError(
          f"{self.spec} stores images of varying size; pass resize=(H, W) to open_dataset, "
          "e.g. resize=(224, 224)."
      )
    else:
      self.image_shape = (int(native_h), int(native_w), int(ch))
    self._labels: dict[str, np.ndarray] = {}
    self._load_split_max_bytes = int(load_split_max_bytes)
    self._seed = int(seed)

    # A split of this dataset is a view (source split, source indices); the val hold-out only
    # re-slices the source's train split.
    self._views: dict[str, tuple[str, np.ndarray | None]] = {s: (s, None) for s in source.splits}
    val_fraction = float(val_fraction)
    if not 0.0 <= val_fraction < 1.0:
      raise ConfigError(f"val_fraction={val_fraction} must be in [0, 1); e.g. val_fraction=0.1.")
    self.val_fraction = val_fraction
    if val_fraction > 0:
      if "train" not in self._views:
        raise ConfigError(
            f"val_fraction needs a 'train' split but {self.spec} has {list(source.splits)}; "
            "drop val_fraction or add a train split."
        )
      if VAL_SPLIT in self._views:
        raise ConfigError(
            f"{self.spec} already has a {VAL_SPLIT!r} split; drop val_fraction to use it."
        )
      # A stream of its own, so the hold-out does not depend on what else the seed drives.
      rng = np.random.default_rng([self._seed, 0x7A1])
      kept, held = stratified_holdout(self._source_labels("train"), val_fraction, rng)
      self._views["train"] = ("train", kept)
      self._views[VAL_SPLIT] = ("train", held)
    self.splits = tuple(self._views)
    self._normalization_option = normalization
    self._mean_std: tuple[tuple[float, ...], tuple[float, ...]] | None = None

  def __repr__(self) -> str:
    return (
        f"Dataset({self.spec!r}, num_classes={self.num_classes}, image_shape={self.image_shape}, "
        f"splits={ {s: self.num_examples(s) for s in self.splits} })"
    )

  # ----------------------------------------------------------------------------- labels, counts

  def _source_labels(self, src_split: str) -> np.ndarray:
    if src_split not in self._labels:
      raw = np.asarray(self._source.labels(src_split))
      if raw.ndim != 1:
        raise DataError(
            f"labels of split {src_split!r} of {self.spec} have shape {raw.shape}, expected [N]; "
            "store one integer class index per image."
        )
      if raw.size and not np.issubdtype(raw.dtype, np.integer):
        if not np.all(np.equal(np.mod(raw, 1), 0)):
          raise DataError(
              f"labels of split {src_split!r} of {self.spec} are not integers (dtype "
              f"{raw.dtype}); store class indices 0..{self.num_classes - 1}."
          )
      bad = np.flatnonzero((raw < 0) | (raw >= self.num_classes))
      if bad.size:
        i = int(bad[0])
        raise DataError(
            f"label {raw[i]} of {self._source.describe(src_split, i)} is outside 0.."
            f"{self.num_classes - 1} ({bad.size} labels out of range); fix the labels or pass "
            "class_names listing every class."
        )
      self._labels[src_split] = raw.astype(np.int32)
    return self._labels[src_split]

  def _view(self, split: str) -> tuple[str, np.ndarray]:
    if split not in self._views:
      raise DatasetNotFoundError(
          f"{self.spec} has no split {split!r}; it has {list(self.splits)}. Use one of those"
          + ("." if self.val_fraction else ", or pass val_fraction=0.1 to hold out a 'val' split.")
      )
    src_split, idx = self._views[split]
    if idx is None:
      idx = np.arange(len(self._source_labels(src_split)))
      self._views[split] = (src_split, idx)
    return src_split, idx

  def labels(self, split: str) -> np.ndarray:
    """All labels of ``split``: i32[N], in index order."""
    src_split, idx = self._view(split)
    return self._source_labels(src_split)[idx]

  def num_examples(self, split: str) -> int:
    """Number of examples in ``split``."""
    return len(self._view(split)[1])

  def class_counts(self, split: str) -> list[int]:
    """Examples per class in ``split``: C ints."""
    return np.bincount(self.labels(split), minlength=self.num_classes).tolist()

  # ------------------------------------------------------------------------------ normalisation

  @property
  def mean(self) -> tuple[float, ...]:
    """Per-channel mean in [0, 1] pixel scale (published, or computed on the train split)."""
    return self._resolve_mean_std()[0]

  @property
  def std(self) -> tuple[float, ...]:
    """Per-channel standard deviation in [0, 1] pixel scale."""
    return self._resolve_mean_std()[1]

  def _resolve_mean_std(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
    if self._mean_std is not None:
      return self._mean_std
    option = self._normalization_option
    ch = self.image_shape[2]
    if option is None:
      option = self._source.default_normalization() or "computed"
    if isinstance(option, str):
      if option == "computed":
        mean_std = self._computed_mean_std()
      elif option in NORMALIZATION:
        mean_std = NORMALIZATION[option]
      else:
        raise ConfigError(
            f"normalization={option!r} is unknown; use one of {sorted(NORMALIZATION)}, "
            "'computed', or a (mean, std) pair of per-channel tuples."
        )
    else:
      try:
        mean, std = option
        mean_std = (tuple(float(m) for m in mean), tuple(float(s) for s in std))
      except (TypeError, ValueError):
        raise ConfigError(
            f"normalization={option!r} is not a (mean, std) pair; pass e.g. "
            "normalization=((0.5,), (0.25,))."
        ) from None
    mean, std = mean_std
    if len(mean) == 1 and ch > 1:  # A grey constant used for colour images: repeat it.
      mean, std = mean * ch, std * ch
    if len(mean) != ch or len(std) != ch:
      raise ConfigError(
          f"normalization has {len(mean)} means and {len(std)} stds for {ch}-channel images of "
          f"{self.spec}; give one per channel or normalization='computed'."
      )
    if min(std) <= 0:
      raise ConfigError(f"normalization std {std} must be positive; use 'computed'.")
    self._mean_std = (tuple(mean), tuple(std))
    return self._mean_std

  def _stats_key(self, split: str) -> str | None:
    """Cache key of the mean/std of ``split``: the source's content fingerprint and the view."""
    src_split, _ = self._views[split]
    content = self._source.stats_cache_key(src_split)
    if content is None:
      return None
    parts = [
        _STATS_VERSION,
        content,
        split,
        self.image_shape,
        self.val_fraction,
        self._seed if self.val_fraction else None,  # The seed only picks the val hold-out.
    ]
    return hashlib.sha256(repr(parts).encode()).hexdigest()

  def _computed_mean_std(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
    split = "train" if "train" in self._views else self.splits[0]
    key = self._stats_key(split)
    path = None if key is None else os.path.join(stats_cache_dir(), "stats", f"{key}.json")
    if path is not None:
      cached = _read_stats(path, key, self.image_shape[2])
      if cached is not None:
        return cached
    ch = self.image_shape[2]
    total = np.zeros(ch, np.float64)
    total_sq = np.zeros(ch, np.float64)
    count = 0
    for images, _ in self.iter_batches(split, 512):
      x = images.reshape(-1, ch).astype(np.float64) / 255.0
      total += x.sum(0)
      total_sq += np.square(x).sum(0)
      count += x.shape[0]
    if count == 0:
      raise DataError(f"split {split!r} of {self.spec} is empty; cannot compute mean/std.")
    mean = total / count
    # In float64 over [0, 1] pixels E[x^2] - E[x]^2 loses nothing that matters here.
    std = np.sqrt(np.maximum(total_sq / count - np.square(mean), 0.0))
    std = np.where(std > 0, std, 1.0)  # A constant channel: avoid dividing by zero later.
    result = tuple(float(m) for m in mean), tuple(float(s) for s in std)
    if path is not None:
      entry = {"key": key, "mean": list(result[0]), "std": list(result[1]), "spec": self.spec}
      _write_atomically(path, json.dumps(entry, indent=1))
    return result

  # ----------------------------------------------------------------------------------- reading

  def _read(self, src_split: str, indices: np.ndarray) -> np.ndarray:
    """Reads source images, resizes them and stacks them into u8[B, H, W, ch]."""
    fit = None if self._resize is None else functools.partial(fit_image, hw=self._resize)
    images = self._source.read(src_split, indices, fit)
    if isinstance(images, np.ndarray) and images.shape[1:] == self.image_shape:
      return images
    if fit is not None:
      images = [fit(np.asarray(im)) for im in images]
    out = np.empty((len(indices), *self.image_shape), np.uint8)
    for k, im in enumerate(images):
      if im.shape != self.image_shape:
        first = self._source.shape_reference or self._source.describe(src_split, 0)
        raise DataError(
            f"{self._source.describe(src_split, int(indices[k]))} is {_size(im.shape)} but "
            f"{first} is {_size(self.image_shape)}; images of one dataset must share a size: "
            f"pass resize=({self.image_shape[0]}, {self.image_shape[1]}) to open_dataset."
        )
      out[k] = im
    return out

  def _positions(
      self,
      split: str,
      batch_size: int,
      classes: Sequence[int] | None,
      shuffle: bool,
      seed: int,
      drop_remainder: bool,
      process_index: int,
      process_count: int,
  ) -> np.ndarray:
    """Positions within ``split`` this process reads, in order."""
    if isinstance(batch_size, bool) or int(batch_size) != batch_size or batch_size < 1:
      raise ConfigError(f"batch_size={batch_size!r} must be a positive int.")
    if not (0 <= process_index < process_count):
      raise ConfigError(
          f"process_index={process_index} must be in [0, process_count={process_count}); pass "
          "jax.process_index() and jax.process_count()."
      )
    labels = self.labels(split)
    positions = np.arange(len(labels))
    if classes is not None:
      classes = np.atleast_1d(np.asarray(classes, np.int64))
      bad = classes[(classes < 0) | (classes >= self.num_classes)]
      if bad.size:
        raise ConfigError(
            f"classes {bad.tolist()} are outside 0..{self.num_classes - 1} for {self.spec}."
        )
      positions = positions[np.isin(labels, classes)]
    if shuffle:
      positions = np.random.default_rng(seed).permutation(positions)
    if drop_remainder:
      # Equal whole batches on every process, so multi-process loops run in lockstep.
      step = batch_size * process_count
      positions = positions[: len(positions) // step * step]
    return positions[process_index::process_count]

  def iter_batches(
      self,
      split: str,
      batch_size: int,
      *,
      classes: Sequence[int] | None = None,
      shuffle: bool = False,
      seed: int = 0,
      drop_remainder: bool = False,
      process_index: int = 0,
      process_count: int = 1,
  ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Streams ``split`` in batches, read by the dataset's loader.

    With ``loader="sync"`` (the default) only one batch is decoded at a time, when it is asked
    for; with ``loader="grain"`` grain reads batches ahead in worker processes. Both give the
    same batches in the same order.

    The global order (all classes or the ``classes`` subset, permuted by ``seed`` when
    ``shuffle``) is the same on every process; process ``p`` of ``P`` takes positions ``p, p+P,
    ...`` of it, so the shards are disjoint and together cover the selection. Without
    ``drop_remainder`` shard sizes differ by at most one and the last batch may be short; with it,
    the selection is cut to a multiple of ``batch_size * P`` so every process gets the same number
    of full batches. For a new order every epoch pass e.g. ``seed=hash((seed, epoch))``.

    Args:
      split: a name in :attr:`splits`.
      batch_size: images per batch (per process).
      classes: class indices to keep (None: all). Labels keep their original values.
      shuffle: permute the order with ``seed`` (sources without random access shuffle within a
        window; see ``tfds:`` with ``reader='tf'``).
      seed: the permutation's seed.
      drop_remainder: drop the incomplete tail (see above).
      process_index: this process's index, ``jax.process_index()``.
      process_count: number of processes, ``jax.process_count()``.

    Yields:
      (images u8[B, H, W, ch], labels i32[B]).
    """
    options = self.loader_options
    if options.loader == "grain":
      if self._source.random_access:
        # Arguments are checked here (by the Plan), at the call, as below.
        plan = loader_lib.Plan(
            self, split, batch_size, classes=classes, shuffle=shuffle, seed=seed,
            per_epoch=False, drop_remainder=drop_remainder, process_index=process_index,
            process_count=process_count)
        return loader_lib.grain_pass(plan, options)
      self._positions(split, batch_size, classes, shuffle, seed, drop_remainder, process_index,
                      process_count)  # Checks the arguments now.
      return loader_lib.thread_prefetch(
          lambda: self._sync_batches(
              split, batch_size, classes=classes, shuffle=shuffle, seed=seed,
              drop_remainder=drop_remainder, process_index=process_index,
              process_count=process_count),
          options.prefetch)
    return self._sync_batches(
        split, batch_size, classes=classes, shuffle=shuffle, seed=seed,
        drop_remainder=drop_remainder, process_index=process_index, process_count=process_count)

  def _sync_batches(
      self,
      split: str,
      batch_size: int,
      *,
      classes: Sequence[int] | None = None,
      shuffle: bool = False,
      seed: int = 0,
      drop_remainder: bool = False,
      process_index: int = 0,
      process_count: int = 1,
  ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """The ``sync`` loader: :meth:`iter_batches` reading each batch when it is asked for."""
    # Arguments are checked here, at the call, not when the first batch is asked for.
    positions = self._positions(
        split, batch_size, classes, shuffle, seed, drop_remainder, process_index, process_count
    )
    src_split, idx = self._view(split)
    labels = self.labels(split)
    if self._source.random_access:
      return self._iter_random(src_split, idx, labels, positions, batch_size)
    return self._iter_stream(src_split, idx, labels, positions, batch_size, shuffle, seed)

  def _iter_random(
      self,
      src_split: str,
      idx: np.ndarray,
      labels: np.ndarray,
      positions: np.ndarray,
      batch_size: int,
  ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    for start in range(0, len(positions), batch_size):
      pos = positions[start : start + batch_size]
      yield self._read(src_split, idx[pos]), labels[pos]

  def _iter_stream(
      self,
      src_split: str,
      idx: np.ndarray,
      labels: np.ndarray,
      positions: np.ndarray,
      batch_size: int,
      shuffle: bool,
      seed: int,
  ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Batches for a sequential source: same examples as ``positions``, read in stored order."""
    n_src = len(self._source_labels(src_split))
    # Source index -> position in the view, or -1 where this process does not want it.
    wanted = np.full(n_src, -1, np.int64)
    wanted[idx[positions]] = positions
    buffer_size = max(getattr(self._source, "shuffle_buffer", 10_000), batch_size)
    rng = np.random.default_rng(seed)
    pending_images: list[np.ndarray] = []
    pending_labels: list[int] = []
    remaining = len(positions)

    def flush(final: bool) -> Iterator[tuple[np.ndarray, np.ndarray]]:
      if shuffle:
        perm = rng.permutation(len(pending_images))
        pending_images[:] = [pending_images[i] for i in perm]
        pending_labels[:] = [pending_labels[i] for i in perm]
      while len(pending_images) >= batch_size or (final and pending_images):
        chunk, pending_images[:batch_size] = pending_images[:batch_size], []
        lab, pending_labels[:batch_size] = pending_labels[:batch_size], []
        yield self._stack(src_split, chunk), np.asarray(lab, np.int32)

    if remaining == 0:
      return
    for src_index, image in enumerate(self._source.stream(src_split)):
      pos = wanted[src_index]
      if pos < 0:
        continue
      pending_images.append(image)
      pending_labels.append(int(labels[pos]))
      remaining -= 1
      if remaining == 0:
        break
      if len(pending_images) >= (buffer_size if shuffle else batch_size):
        yield from flush(final=False)
    yield from flush(final=True)

  def _stack(self, src_split: str, images: list[np.ndarray]) -> np.ndarray:
    if self._resize is not None:
      images = [fit_image(im, self._resize) for im in images]
    for im in images:
      if im.shape != self.image_shape:
        raise DataError(
            f"an image of split {src_split!r} of {self.spec} is {_size(im.shape)}, expected "
            f"{_size(self.image_shape)}; pass resize=({self.image_shape[0]}, "
            f"{self.image_shape[1]}) to open_dataset."
        )
    return np.stack(images).astype(np.uint8, copy=False)

  def epochs(
      self,
      split: str,
      batch_size: int,
      *,
      seed: int = 0,
      shuffle: bool = True,
      classes: Sequence[int] | None = None,
      drop_remainder: bool = True,
      process_index: int = 0,
      process_count: int = 1,
  ) -> loader_lib.EpochBatches:
    """``split`` as a callable ``epoch -> batches``, what a training loop reads epoch by epoch.

    Epoch ``e`` is :meth:`iter_batches` with ``seed=seed * 100_003 + e``
    (:func:`wmdd_jax.data.loader.epoch_seed`, the rule the teacher's in-memory path uses), so
    it is the same under every loader and a resumed run reads what it would have read. With
    ``loader="grain"`` the worker processes start once, on the first epoch asked for, and keep
    reading ahead across epoch boundaries (see :class:`wmdd_jax.data.loader.EpochBatches`).

    Args:
      split: a name in :attr:`splits`.
      batch_size: images per batch (per process).
      seed: the stream's seed.
      shuffle, classes, drop_remainder, process_index, process_count: as in
        :meth:`iter_batches` (here ``shuffle`` and ``drop_remainder`` default to True).

    Returns:
      An :class:`~wmdd_jax.data.loader.EpochBatches`: call it with the epoch; its
      ``steps_per_epoch`` is the number of batches of every epoch.
    """
    plan = loader_lib.Plan(
        self, split, batch_size, classes=classes, shuffle=shuffle, seed=seed, per_epoch=True,
        drop_remainder=drop_remainder, process_index=process_index, process_count=process_count)
    return loader_lib.EpochBatches(self, plan, self.loader_options)

  def with_loader(self, loader: Any = "sync", **options: Any) -> Dataset:
    """This dataset read by another loader (``open_dataset``'s loader options); a shallow copy.

    Example: ``ds.with_loader("grain", worker_count=4)``. The data, splits and normalisation
    are shared with ``self``.
    """
    unknown = sorted(set(options) - set(loader_lib.OPTIONS))
    if unknown:
      raise ConfigError(f"unknown loader option(s) {unknown}; use {list(loader_lib.OPTIONS)}.")
    out = copy.copy(self)
    out.loader_options = loader_lib.loader_options(loader, **options)
    return out

  def _reading_copy(self) -> Dataset:
    """A shallow copy whose source reads in the calling thread (loaders parallelise batches)."""
    out = copy.copy(self)
    out._source = self._source.serial()
    return out

  def iter_class(
      self,
      split: str,
      c: int,
      batch_size: int,
      *,
      shuffle: bool = False,
      seed: int = 0,
      drop_remainder: bool = False,
      process_index: int = 0,
      process_count: int = 1,
  ) -> Iterator[np.ndarray]:
    """Streams the images of class ``c`` only: yields u8[B, H, W, ch] (see :meth:`iter_batches`)."""
    batches = self.iter_batches(
        split,
        batch_size,
        classes=[c],
        shuffle=shuffle,
        seed=seed,
        drop_remainder=drop_remainder,
        process_index=process_index,
        process_count=process_count,
    )
    return (images for images, _ in batches)

  def load_split(
      self, split: str, classes: Sequence[int] | None = None
  ) -> tuple[np.ndarray, np.ndarray]:
    """Loads a whole (small) split into memory, in index order.

    Args:
      split: a name in :attr:`splits`.
      classes: class indices to keep (None: all).

    Returns:
      (images u8[N, H, W, ch], labels i32[N]).
    """
    labels = self.labels(split)
    n = len(labels) if classes is None else int(np.isin(labels, np.atleast_1d(classes)).sum())
    nbytes = n * int(np.prod(self.image_shape))
    if nbytes > self._load_split_max_bytes:
      raise ConfigError(
          f"split {split!r} of {self.spec} needs {nbytes / 2**30:.1f} GiB in memory; stream it "
          "with iter_batches() instead, or raise load_split_max_bytes= in open_dataset."
      )
    images = np.empty((n, *self.image_shape), np.uint8)
    out_labels = np.empty((n,), np.int32)
    k = 0
    for batch, lab in self.iter_batches(split, 1024, classes=classes):
      images[k : k + len(lab)] = batch
      out_labels[k : k + len(lab)] = lab
      k += len(lab)
    return images, out_labels


def _size(shape: Sequence[int]) -> str:
  return f"{shape[0]}x{shape[1]}x{shape[2]} (HxWxch)"


def open_dataset(spec: str, **options: Any) -> Dataset:
  """Opens a labelled image dataset.

  Specs:
    ``tfds:<name>[/<config>]``: a TensorFlow Datasets dataset prepared in ``data_dir`` (read with
    ``tfds.data_source``, no TensorFlow needed, when it is stored as array_record; else through
    ``tf.data``). Options: ``data_dir``, ``download`` (default False: offline), ``reader``
    ('auto', 'data_source' or 'tf'), ``image_key``/``label_key`` (default: the supervised keys),
    ``shuffle_buffer`` (window of the 'tf' reader's shuffle).

    ``folder:<root>``: ``<root>/<split>/<class>/<image>`` (PNG, JPEG, ...; class index = sorted
    class folder names of the train split; other splits may lack classes). Options:
    ``channels`` (1 or 3; default: from the first image), ``num_workers`` (decoding threads),
    ``verify`` (decode every image once at open time, so corrupt or mixed-size files fail now
    rather than mid-run; default False), ``stats_cache`` (cache computed mean/std between runs
    in :func:`stats_cache_dir`, keyed on every file's relative path, size and mtime, so replaced
    images are never given stale constants; the dataset folder is never written to; default
    True). Files are only listed at open time; symlinks are followed but no folder is read twice
    (a loop is skipped with a warning).

    ``idx:<dir>``: MNIST-format ``train-``/``t10k-`` ``images-idx3-ubyte`` and
    ``labels-idx1-ubyte`` files, raw or ``.gz``. Options: ``variant`` ('mnist' or
    'fashion_mnist'; default from the directory's name), ``class_names``.

    ``npz:<file>``: arrays ``x_<split>`` (u8 [N, H, W] or [N, H, W, ch], or floats in [0, 1])
    and ``y_<split>``, at least the train split; optional ``class_names``. Option
    ``class_names``.

    Labels of ``idx:`` and ``npz:`` are checked at open time: whole numbers >= 0, below the
    number of classes when class names are known (``class_names``, an ``idx:`` variant, the
    archive's ``class_names``); otherwise the classes are numbered 0..max label and each must
    have an example in some split, so a stray label (e.g. one 200 among 0/1) is a DataError
    rather than a 201-class dataset. Pass ``class_names`` when empty classes are intended.

    ``digits``: sklearn's 8x8 digits (1797 images, 0..16 scaled to 0..255), split stratified
    and seeded. Option ``test_fraction`` (default 0.25).

  Options every spec takes: ``resize`` ((H, W) or an int: shorter side resized to cover it, then
  centre-cropped), ``val_fraction`` (seeded stratified hold-out of train exposed as split
  ``"val"``; default 0), ``seed`` (for ``val`` and the digits split; default 0),
  ``normalization`` (a key of NORMALIZATION, 'computed' or a (mean, std) pair; default: the
  published constants of a known dataset, else computed on train), ``load_split_max_bytes``,
  and the loader: ``loader`` ('sync', the default: each batch read when asked for; 'grain':
  batches read ahead by grain, the same batches in the same order), ``worker_count`` (grain
  worker processes; default 0: threads in this process), ``read_threads`` (threads per process,
  each reading one batch; default min(8, cores) shared among the processes), ``prefetch``
  (batches buffered ahead per process; default 2); see :mod:`wmdd_jax.data.loader`.

  Args:
    spec: one of the forms above.
    **options: see above.

  Returns:
    A :class:`Dataset`.

  Raises:
    ConfigError: an unknown spec form or option.
    DatasetNotFoundError: a missing path, file or dataset (the message says how to get it).
    DataError: unusable data (corrupt or mixed-size images, bad labels, empty classes).
  """
  kind, arg = parse_spec(spec)
  common, own = split_options(kind, options)
  # verify (an option of the sources that list it) is the same for every source: done below.
  verify = bool(own.pop("verify", False))
  source = kind.open(spec, arg, seed=common.get("seed", 0), **own)
  dataset = Dataset(source, **common)
  if verify:
    # Decoding everything once surfaces corrupt and mixed-size files now rather than mid-run.
    for split in dataset.splits:
      for _ in dataset.iter_batches(split, 256):
        pass
  return dataset
