"""Stage 2: per-class BatchNorm-input statistics and penultimate features of the real data.

One streamed pass over the real train split with the teacher in eval mode. For every class c and
BN layer l it gives the mean and biased variance of that layer's input over all images of class c
and all spatial positions, pooled exactly (not an average of per-batch variances): each batch's
per-sample moments (see :mod:`wmdd_jax.models.base`) give per-class (count, mean, M2) of the
batch, merged into the running per-class state with Chan's parallel update, which avoids the
cancellation of E[x^2] - E[x]^2. The state is O(C x total BN channels), so ImageNet-1K fits;
features are kept in host memory or, for large sets, written to a memory-mapped ``.npy`` file.

Data parallel (an :class:`~wmdd_jax.distributed.Execution`): each batch's forward pass is split
over the devices; the small per-sample moments are gathered and summed per class by a replicated
program, so no cross-device sum reorders the additions. Sharded, the result equals the
single-device one up to round-off, because XLA optimises a partitioned program differently; work
units make it bit-identical for any device count.
With several processes each one feeds its own shard of the data (``iter_batches(...,
process_index=jax.process_index(), process_count=jax.process_count())``); the statistics are
global on every process, the features are the process's own rows
(:func:`wmdd_jax.distributed.gather_interleaved` restores the global order).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from wmdd_jax import tracking
from wmdd_jax.distributed import Execution
from wmdd_jax.errors import ConfigError, DataError, NonFiniteError, ShapeError
from wmdd_jax.models.base import apply_model


@dataclasses.dataclass(frozen=True)
class StatisticsOptions:
  """Options of the statistics stage (config section ``stats``).

  Attributes:
    batch_size: images per compiled forward pass (per process with a mesh); the last, short
      batch is padded and masked.
  """

  batch_size: int = 256

  def __post_init__(self):
    if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) \
        or self.batch_size < 1:
      raise ConfigError(f"stats.batch_size must be an int >= 1, got {self.batch_size!r}.")


class ClassStatistics(NamedTuple):
  """Per-class and global BN-input statistics of the real train split.

  Attributes:
    mean: tuple over BN layers (forward order) of f32[C, ch_l].
    var: tuple over BN layers of f32[C, ch_l], biased.
    global_mean: tuple over BN layers of f32[ch_l], all classes pooled (for SRe2L ablations).
    global_var: tuple over BN layers of f32[ch_l].
    counts: i64[C], images per class.
  """

  mean: tuple[np.ndarray, ...]
  var: tuple[np.ndarray, ...]
  global_mean: tuple[np.ndarray, ...]
  global_var: tuple[np.ndarray, ...]
  counts: np.ndarray


class Features(NamedTuple):
  """Penultimate features of the real train split.

  Attributes:
    features: f32[N, d] (a numpy array or a read-only memmap).
    labels: i32[N].
  """

  features: np.ndarray
  labels: np.ndarray


_HIGHEST = jax.lax.Precision.HIGHEST  # no TF32 in the per-class sums on GPUs


class StatsStep:
  """The per-batch statistics step: a forward pass over the batch's rows, then a per-class
  accumulation of its rows.

  ``step(acc, variables, images u8[B, H, W, ch], labels i32[B], mask f32[B])`` adds one batch to
  the accumulator and returns ``(acc, features, live)``: ``features`` f32[B, d] (split like the
  batch on a mesh: read it with ``execution.rows_to_host``), ``live`` f32[] the number of real
  rows of the global batch (processes that ran out of data use it to stop together). ``mask``
  zeroes padding rows, so the last (short) batch is padded to the same shape and nothing
  recompiles.

  The forward returns the per-sample BN-input moments, labels and mask whole (gathered on a
  mesh; small: two floats per sample and BN channel) and the features split like the batch; the
  accumulation then runs on the whole rows with no cross-device sum.

  Attributes:
    forward: ``(variables, images, labels, mask) -> (moments, labels, mask, features)`` of the
      execution (exposed for ahead-of-time memory analysis).
    accumulate: ``(acc, moments, labels, mask) -> acc`` (jitted; ``acc`` is donated).
  """

  def __init__(self, model: nn.Module, num_classes: int, mean: Any, std: Any, *,
               execution: Execution | None = None):
    self.execution = execution = execution or Execution()
    mean = jnp.asarray(mean, jnp.float32)
    std = jnp.asarray(std, jnp.float32)

    def forward(variables, images, labels, mask):
      x = (images.astype(jnp.float32) / 255.0 - mean) / std
      out = apply_model(model, variables, x, train=False)
      return (out.bn_mean, out.bn_var), labels, mask, out.features

    def accumulate(acc, moments, labels, mask):
      onehot = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32) * mask[:, None]
      n_b = onehot.sum(0)  # [C]
      n = acc["count"]
      n_new = n + n_b
      frac = jnp.where(n_new > 0, n_b / jnp.maximum(n_new, 1.0), 0.0)[:, None]
      new = {"count": n_new, "mean": [], "m2": []}
      for layer, (m, v) in enumerate(zip(*moments)):
        mean_b = jnp.matmul(onehot.T, m, precision=_HIGHEST) / jnp.maximum(n_b, 1.0)[:, None]
        dev = m - jnp.matmul(onehot, mean_b, precision=_HIGHEST)
        # Within-batch M2 of class c: sum over its samples of (spatial var + (sample mean -
        # mean)^2).
        m2_b = jnp.matmul(onehot.T, v + dev * dev, precision=_HIGHEST)
        delta = mean_b - acc["mean"][layer]
        new["mean"].append(acc["mean"][layer] + delta * frac)
        new["m2"].append(acc["m2"][layer] + m2_b + delta * delta * (n * frac[:, 0])[:, None])
      return new

    self.forward = execution.row_pass(forward, 1, gathered=(True, True, True, False))
    self.accumulate = execution.replicated(accumulate, donate_argnums=(0,))

  def __call__(self, acc, variables, images, labels, mask):
    moments, labels, mask, features = self.forward(variables, images, labels, mask)
    acc = self.accumulate(acc, moments, labels, mask)
    return acc, features, jnp.sum(mask)


def make_stats_step(model: nn.Module, num_classes: int, mean: Any, std: Any, *,
                    execution: Execution | None = None) -> StatsStep:
  """Builds the per-batch accumulation step (see :class:`StatsStep`).

  Args:
    model: the teacher.
    num_classes: C.
    mean: per-channel normalisation mean, pixel scale [0, 1].
    std: per-channel normalisation std.
    execution: how the forward pass runs on devices (default: one device).
  """
  return StatsStep(model, num_classes, mean, std, execution=execution)


def _empty_accumulator(model, variables, image_shape, num_classes):
  x = jnp.zeros((1, *image_shape), jnp.float32)
  shapes = jax.eval_shape(lambda v, x: apply_model(model, v, x), variables, x)
  # Distinct buffers: the step donates the accumulator.
  zeros = lambda: [jnp.zeros((num_classes, m.shape[-1]), jnp.float32) for m in shapes.bn_mean]
  return {"count": jnp.zeros((num_classes,), jnp.float32), "mean": zeros(), "m2": zeros()}


def compute_class_statistics(
    model: nn.Module,
    variables: dict[str, Any],
    batches: Iterable[tuple[np.ndarray, np.ndarray]],
    *,
    num_classes: int,
    image_shape: tuple[int, int, int],
    mean: Any,
    std: Any,
    batch_size: int,
    total: int | None = None,
    keep_features: bool = True,
    feature_path: str | os.PathLike | None = None,
    execution: Execution | None = None,
    progress: bool = True,
) -> tuple[ClassStatistics, Features | None]:
  """Streams the real train split once through the eval-mode teacher.

  Args:
    model: the teacher (a registered wmdd_jax model).
    variables: its ``{"params", "batch_stats"}``.
    batches: iterable of (images u8[B, H, W, ch], labels i32[B]) with B <= batch_size, e.g.
      ``dataset.iter_batches("train", batch_size)``.
    num_classes: C.
    image_shape: (H, W, ch) of the images.
    mean: per-channel normalisation mean, pixel scale [0, 1].
    std: per-channel normalisation std.
    batch_size: the fixed compiled batch size (short batches are padded and masked).
    total: number of images, for the progress bar and the feature file.
    keep_features: also return the penultimate features.
    feature_path: write features to this ``.npy`` file (memory-mapped; needs ``total``) instead of
      holding them in memory.
    execution: how each batch's forward pass runs on devices (:mod:`wmdd_jax.distributed`;
      default: one device). Sharded: ``batch_size`` is per process, rounded up to a multiple of
      the process's devices; with several processes ``batches`` is this process's shard. Work
      units: the per-class sums on the first device, bit-identical for any device count.
    progress: show progress (a bar on a terminal, else a log line now and then;
      :func:`wmdd_jax.tracking.progress`).

  Returns:
    (ClassStatistics, Features or None). The statistics cover every process's data; with several
    processes the features are this process's rows, in the order it read them.

  Raises:
    ShapeError: a batch with the wrong image shape or more than batch_size images.
    DataError: a label outside [0, C), or a class with no images.
    NonFiniteError: the statistics contain NaN or Inf (a broken teacher or unnormalised input).
  """
  image_shape = tuple(image_shape)
  execution = execution or Execution()
  step = make_stats_step(model, num_classes, mean, std, execution=execution)
  # Pad every process's batch to a multiple of its devices, so the global batch splits evenly.
  multiple = execution.pad_multiple()
  compiled_batch = max(1, -(-batch_size // multiple)) * multiple
  acc = execution.place(_empty_accumulator(model, variables, image_shape, num_classes),
                        copy=True)
  variables = execution.place(variables)
  feats, labs, offset = [], [], 0
  memmap = None  # the feature file, created at the first batch once d is known
  image_dtype = np.dtype(np.uint8)
  if keep_features and feature_path is not None:
    if total is None:
      raise ShapeError("feature_path needs total= (the number of images) to size the file; "
                       "pass total=dataset.num_examples('train').")
  with tracking.progress(total, desc="statistics", unit="img", leave=False,
                         enabled=progress) as bar:
    for images, labels in batches:
      images = np.asarray(images)
      labels = np.asarray(labels, np.int32)
      image_dtype = images.dtype
      b = images.shape[0]
      if images.shape[1:] != image_shape or b > batch_size or labels.shape != (b,):
        raise ShapeError(
            f"statistics got a batch of images {images.shape} and labels {labels.shape}; "
            f"expected at most {batch_size} images of shape {image_shape} with one label each. "
            "Open the dataset with the teacher's image size (resize=...) and pass batch_size.")
      if b and (labels.min() < 0 or labels.max() >= num_classes):
        raise DataError(f"labels must lie in [0, {num_classes}); got {labels.min()}.."
                        f"{labels.max()}. Check num_classes against the dataset.")
      pad = compiled_batch - b
      mask = np.concatenate([np.ones(b, np.float32), np.zeros(pad, np.float32)])
      if pad:
        images = np.concatenate([images, np.zeros((pad, *image_shape), images.dtype)])
        labels = np.concatenate([labels, np.zeros(pad, np.int32)])
      acc, f, _ = step(acc, variables, *execution.put_rows((images, labels, mask)))
      if keep_features:
        f = np.asarray(execution.rows_to_host(f)[:b], np.float32)
        if memmap is None and feature_path is not None:
          memmap = np.lib.format.open_memmap(
              os.fspath(feature_path), mode="w+", dtype=np.float32, shape=(total, f.shape[1]))
        if memmap is not None:
          memmap[offset:offset + b] = f
        else:
          feats.append(f)
        labs.append(labels[:b].copy())
      offset += b
      bar.update(b)
  if execution.multi_process:
    acc = _drain(step, acc, variables, execution, compiled_batch, image_shape, image_dtype)
  stats = finalize_statistics(jax.device_get(acc))
  features = None
  if keep_features:
    labels_all = np.concatenate(labs) if labs else np.zeros((0,), np.int32)
    if memmap is not None:
      memmap.flush()
      features = Features(np.load(os.fspath(feature_path), mmap_mode="r")[:offset], labels_all)
    else:
      features = Features(np.concatenate(feats) if feats else np.zeros((0, 0), np.float32),
                          labels_all)
  return stats, features


def _drain(step, acc, variables, execution, batch, image_shape, image_dtype):
  """Keeps stepping with empty batches until no process has data left.

  Every step is one collective program that all processes must run, but shards may differ by a
  batch. A process that has run out feeds all-masked batches (which add nothing) and stops after
  the first step in which no process had a real row; all processes see the same ``live`` count,
  so they stop together.
  """
  # The same dtype as the real batches: every process must run the same compiled program.
  empty = (np.zeros((batch, *image_shape), image_dtype), np.zeros(batch, np.int32),
           np.zeros(batch, np.float32))
  while True:
    acc, _, live = step(acc, variables, *execution.put_rows(empty))
    if float(live) == 0:
      return acc


def finalize_statistics(acc: dict[str, Any]) -> ClassStatistics:
  """Turns the accumulated per-class (count, mean, M2) into means and biased variances."""
  counts = np.asarray(acc["count"], np.float64)
  if np.any(counts == 0):
    empty = np.flatnonzero(counts == 0).tolist()
    raise DataError(f"classes {empty} have no training images, so their statistics are "
                    "undefined. Check the dataset's labels or num_classes.")
  means, variances, gmeans, gvars = [], [], [], []
  total = counts.sum()
  for mean, m2 in zip(acc["mean"], acc["m2"]):
    mu = np.asarray(mean, np.float64)
    m2 = np.asarray(m2, np.float64)
    # All classes pooled: the law of total variance over the per-class moments.
    gmu = (counts[:, None] * mu).sum(0) / total
    gvar = (m2.sum(0) + (counts[:, None] * (mu - gmu) ** 2).sum(0)) / total
    means.append(mu.astype(np.float32))
    variances.append((m2 / counts[:, None]).astype(np.float32))
    gmeans.append(gmu.astype(np.float32))
    gvars.append(gvar.astype(np.float32))
  stats = ClassStatistics(tuple(means), tuple(variances), tuple(gmeans), tuple(gvars),
                          counts.astype(np.int64))
  for layer, (m, v) in enumerate(zip(means, variances)):
    if not (np.all(np.isfinite(m)) and np.all(np.isfinite(v))):
      raise NonFiniteError(f"BN layer {layer}: the per-class input statistics contain NaN/Inf. "
                           "Check the teacher checkpoint and the input normalisation.")
  return stats
