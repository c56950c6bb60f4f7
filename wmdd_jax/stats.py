"""Stage 2: per-class BatchNorm-input statistics and penultimate features of the real data.

One streamed pass over the real train split with the teacher in eval mode. For every class c and
BN layer l it gives the mean and biased variance of that layer's input over all images of class c
and all spatial positions, pooled exactly (not an average of per-batch variances): each batch's
per-sample moments (see :mod:`wmdd_jax.models.base`) give per-class (count, mean, M2) of the
batch, merged into the running per-class state with Chan's parallel update, which avoids the
cancellation of E[x^2] - E[x]^2. The state is O(C x total BN channels), so ImageNet-1K fits;
features are kept in host memory or, for large sets, written to a memory-mapped ``.npy`` file.

Data parallel (``mesh=``, see :mod:`wmdd_jax.parallel`): each batch's forward pass is split
along the mesh's axis; the small per-sample moments are gathered and summed per class by a
replicated program, so no cross-device sum reorders the additions. The result still equals the
single-device one only up to round-off (about 1e-7), because XLA optimises a partitioned program
differently; ``units=N`` (:mod:`wmdd_jax.units`) makes it bit-identical for any device count.
With several processes each one feeds its own shard of the data (``iter_batches(...,
process_index=jax.process_index(), process_count=jax.process_count())``); the statistics are
global on every process, the features are the process's own rows
(:func:`wmdd_jax.parallel.gather_interleaved` restores the global order).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from tqdm.auto import tqdm

from wmdd_jax import parallel
from wmdd_jax import units as units_lib
from wmdd_jax.errors import DataError, NonFiniteError, ShapeError
from wmdd_jax.models.base import apply_model


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
  """The per-batch statistics step: a jitted forward, then a jitted per-class accumulation.

  ``step(acc, variables, images u8[B, H, W, ch], labels i32[B], mask f32[B])`` adds one batch to
  the accumulator and returns ``(acc, features f32[B, d])``; ``mask`` zeroes padding rows, so the
  last (short) batch is padded to the same shape and nothing recompiles.

  With a mesh the forward takes the batch split along the mesh axis and the teacher replicated;
  it returns the per-sample BN-input moments, labels and mask *gathered* onto every device, and
  the features split like the batch. The accumulation then runs replicated on the gathered
  batch, with no cross-device sum (the gathered moments are small: two floats per sample and BN
  channel). The step then returns ``(acc, features, live)``, ``live``
  f32[] the number of real rows of the global batch (processes that ran out of data use it to
  stop together).

  Attributes:
    forward: the jitted ``(variables, images, labels, mask) -> (moments, labels, mask,
      features)`` (exposed for ahead-of-time memory analysis).
    accumulate: the jitted ``(acc, moments, labels, mask) -> acc``; ``acc`` is donated.
  """

  def __init__(self, model: nn.Module, num_classes: int, mean: Any, std: Any, *,
               mesh: Mesh | None = None):
    self.mesh = mesh
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

    if mesh is None:
      self.forward = jax.jit(forward)
      self.accumulate = jax.jit(accumulate, donate_argnums=(0,))
    else:
      rep, split = parallel.replicated(mesh), parallel.batch_sharding(mesh)
      self.forward = jax.jit(forward, in_shardings=(rep, split, split, split),
                             out_shardings=(rep, rep, rep, split))
      self.accumulate = jax.jit(accumulate, donate_argnums=(0,), in_shardings=rep,
                                out_shardings=rep)

  def __call__(self, acc, variables, images, labels, mask):
    moments, labels, mask, features = self.forward(variables, images, labels, mask)
    acc = self.accumulate(acc, moments, labels, mask)
    if self.mesh is None:
      return acc, features
    return acc, features, jnp.sum(mask)


def make_stats_step(model: nn.Module, num_classes: int, mean: Any, std: Any, *,
                    mesh: Mesh | None = None) -> StatsStep:
  """Builds the per-batch accumulation step (see :class:`StatsStep`).

  Args:
    model: the teacher.
    num_classes: C.
    mean: per-channel normalisation mean, pixel scale [0, 1].
    std: per-channel normalisation std.
    mesh: split each batch over this device mesh; None: the default device.
  """
  return StatsStep(model, num_classes, mean, std, mesh=mesh)


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
    mesh: Mesh | None = None,
    units: int = 0,
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
    mesh: split each batch over this device mesh (:func:`wmdd_jax.parallel.make_mesh`); None:
      the default device. ``batch_size`` is then per process, rounded up to a multiple of the
      process's devices; with several processes ``batches`` is this process's shard.
    units: N > 0: each batch's forward pass cut into N deterministic work units spread over the
      mesh's devices, the per-class sums on the first device (:mod:`wmdd_jax.units`):
      bit-identical for any device count. 0: the batch split by XLA as above.
    progress: show a tqdm bar.

  Returns:
    (ClassStatistics, Features or None). The statistics cover every process's data; with several
    processes the features are this process's rows, in the order it read them.

  Raises:
    ShapeError: a batch with the wrong image shape or more than batch_size images.
    DataError: a label outside [0, C), or a class with no images.
    NonFiniteError: the statistics contain NaN or Inf (a broken teacher or unnormalised input).
  """
  image_shape = tuple(image_shape)
  units = units_lib.check_units(units)
  acc = _empty_accumulator(model, variables, image_shape, num_classes)
  step = make_stats_step(model, num_classes, mean, std, mesh=None if units else mesh)
  compiled_batch = batch_size
  if units:
    step = _UnitStats(step, units_lib.devices_of(mesh), units, variables)
    mesh = None  # from here on the loop is the single-device one
  elif mesh is not None:
    # Pad every process's batch to a multiple of its devices, so the global batch splits evenly.
    compiled_batch = parallel.padded_size(batch_size, parallel.local_batch_multiple(mesh))
    acc = parallel.replicate(acc, mesh, copy=True)
    variables = parallel.replicate(variables, mesh)
  feats, labs, offset = [], [], 0
  memmap = None  # the feature file, created at the first batch once d is known
  image_dtype = np.dtype(np.uint8)
  if keep_features and feature_path is not None:
    if total is None:
      raise ShapeError("feature_path needs total= (the number of images) to size the file; "
                       "pass total=dataset.num_examples('train').")
  with tqdm(total=total, desc="statistics", unit="img", leave=False,
            disable=not progress) as bar:
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
      if mesh is None:
        acc, f = step(acc, variables, images, labels, mask)
      else:
        acc, f, _ = step(acc, variables, *parallel.from_process_local((images, labels, mask),
                                                                      mesh))
      if keep_features:
        f = np.asarray((f if mesh is None else parallel.to_process_local(f, mesh))[:b],
                       np.float32)
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
  if mesh is not None and jax.process_count() > 1:
    acc = _drain(step, acc, variables, mesh, compiled_batch, image_shape, image_dtype)
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


class _UnitStats:
  """:class:`StatsStep` as deterministic work units: unit g's forward on device g % D, then the
  units' rows gathered in order and accumulated on the first device (the single-device
  program)."""

  def __init__(self, step: StatsStep, devices, units, variables):
    self.step, self.devices, self.units = step, devices, units
    self.copies = units_lib.replicas(variables, devices)

  def __call__(self, acc, variables, images, labels, mask):
    del variables  # the per-device copies made at construction
    parts = units_lib.map_units(
        lambda g, d, lo, hi: self.step.forward(self.copies[d], *jax.device_put(
            (images[lo:hi], labels[lo:hi], mask[lo:hi]), self.devices[d])),
        len(labels), self.units, self.devices)
    moments, labels, mask, features = units_lib.gather_rows(parts, self.devices[0])
    return self.step.accumulate(acc, moments, labels, mask), features


def _drain(step, acc, variables, mesh, batch, image_shape, image_dtype):
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
    acc, _, live = step(acc, variables, *parallel.from_process_local(empty, mesh))
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
