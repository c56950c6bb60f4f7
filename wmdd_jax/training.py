"""What teacher and student training share: the train state, batches of in-memory arrays, the
cross-entropy, and accuracy on a test split.

Images enter the steps as uint8 pixels (or floats in [0, 1]) and are normalised inside the jitted
programs, so host work is only batching.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.training import train_state

from wmdd_jax.data import transforms
from wmdd_jax.distributed import Execution, local_execution
from wmdd_jax.errors import ConfigError, ShapeError

Batch = tuple[np.ndarray, np.ndarray]
# Either (images u8[N, H, W, ch], labels i[N]) in memory, or a callable epoch -> batches.
BatchSource = tuple[np.ndarray, np.ndarray] | Callable[[int], Iterable[Batch]]


class TrainState(train_state.TrainState):
  """Flax TrainState plus the BN running statistics."""

  batch_stats: Any = None


def create_train_state(model: nn.Module, variables: dict[str, Any],
                       tx: optax.GradientTransformation) -> TrainState:
  """A TrainState at step 0 from ``{"params", "batch_stats"}`` variables."""
  return TrainState.create(apply_fn=model.apply, params=variables["params"],
                           batch_stats=variables.get("batch_stats", {}), tx=tx)


def cross_entropy(logits: jax.Array, labels: jax.Array, label_smoothing: float = 0.0
                  ) -> jax.Array:
  """Per-example CE. logits f32[B, C], labels i32[B] -> f32[B]."""
  num_classes = logits.shape[-1]
  targets = jax.nn.one_hot(labels, num_classes)
  if label_smoothing:
    targets = optax.smooth_labels(targets, label_smoothing)
  return optax.softmax_cross_entropy(logits.astype(jnp.float32), targets)


@functools.lru_cache(maxsize=16)
def make_eval_step(
    model: nn.Module, execution: Execution | None = None, *, mean: tuple[float, ...],
    std: tuple[float, ...]
) -> Callable[[dict, jax.Array, jax.Array, jax.Array], dict]:
  """Builds the eval step ``(variables, images, labels, mask) -> sums`` of ``execution``
  (default: all local devices); cached per (model, execution, mean, std).

  Args:
    model: the network (eval mode: BN uses its running statistics).
    execution: how the batches run on devices.
    mean: per-channel mean in [0, 1] pixel scale.
    std: per-channel std.

  Returns:
    A function; images u8[B, H, W, ch] (or f32 in [0, 1]), labels i32[B], mask bool[B]
    (False for padding). It returns f32 scalars summed over the unmasked examples: ``correct1``,
    ``correct5`` (top-min(5, C)), ``loss`` (CE) and ``count``.
  """
  mean, std = tuple(mean), tuple(std)

  def step(variables: dict, images: jax.Array, labels: jax.Array, mask: jax.Array):
    x = transforms.normalize(images, mean, std)
    logits, _ = model.apply(
        {"params": variables["params"], "batch_stats": variables["batch_stats"]}, x,
        train=False)
    logits = logits.astype(jnp.float32)
    k = min(5, logits.shape[-1])
    _, top = jax.lax.top_k(logits, k)
    hit = top == labels[:, None]
    m = mask.astype(jnp.float32)
    return {
        "correct1": jnp.sum(hit[:, 0] * m),
        "correct5": jnp.sum(jnp.any(hit, axis=-1) * m),
        "loss": jnp.sum(cross_entropy(logits, labels) * m),
        "count": jnp.sum(m),
    }

  return (execution or local_execution()).sum_pass(step, 1)


def array_batches(images: np.ndarray, labels: np.ndarray, batch_size: int, *,
                  shuffle: bool = False, seed: int = 0, drop_remainder: bool = False
                  ) -> Iterator[Batch]:
  """Batches of in-memory arrays; with ``shuffle`` a fresh permutation per ``seed``.

  Args:
    images: [N, H, W, ch] array.
    labels: [N] array.
    batch_size: examples per batch.
    shuffle: permute before batching.
    seed: permutation seed (use e.g. ``hash((seed, epoch))``-style distinct values per epoch).
    drop_remainder: skip the last partial batch.

  Yields:
    (images[b], labels[b]) numpy views/copies.
  """
  n = len(labels)
  order = np.random.default_rng(seed).permutation(n) if shuffle else None
  stop = n - n % batch_size if drop_remainder else n
  for start in range(0, stop, batch_size):
    idx = slice(start, min(start + batch_size, n))
    if order is not None:
      idx = np.sort(order[idx])  # sorted indices read memory-mapped arrays faster
    yield images[idx], labels[idx]


def _as_epoch_source(data: BatchSource, batch_size: int, *, shuffle: bool, seed: int,
                     drop_remainder: bool) -> Callable[[int], Iterable[Batch]]:
  if callable(data):
    return data
  try:
    images, labels = data
  except (TypeError, ValueError) as e:
    raise ConfigError("Training/test data must be (images, labels) arrays or a callable "
                      "epoch -> iterable of (images, labels) batches.") from e
  if len(images) != len(labels):
    raise ShapeError(f"{len(images)} images but {len(labels)} labels; pass matching arrays.")
  return lambda epoch: array_batches(images, labels, batch_size, shuffle=shuffle,
                                     seed=seed * 100_003 + epoch, drop_remainder=drop_remainder)


def evaluate(
    model: nn.Module,
    variables: dict[str, Any],
    data: BatchSource,
    *,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    batch_size: int = 500,
    max_batches: int | None = None,
    execution: Execution | None = None,
    eval_step: Callable | None = None,
) -> dict[str, float]:
  """Top-1/top-5 accuracy (percent) and mean CE of ``model`` on ``data``.

  Args:
    model: the network.
    variables: ``{"params", "batch_stats"}``.
    data: (images, labels) arrays, or a callable ``epoch -> batches`` (called with 0).
    mean: per-channel mean, [0, 1] pixel scale.
    std: per-channel std.
    batch_size: evaluation batch for in-memory arrays.
    max_batches: evaluate only this many batches (debug).
    execution: how the batches run on devices (default: split over all local devices by XLA;
      work units: bit-identical for any device count).
    eval_step: a step from :func:`make_eval_step` for the same execution, to reuse.

  Returns:
    {"top1", "top5", "loss", "count"}.
  """
  execution = execution or local_execution()
  eval_step = eval_step or make_eval_step(model, execution, mean=tuple(mean), std=tuple(std))
  n_dev = execution.batch_multiple
  variables = execution.place({"params": variables["params"],
                               "batch_stats": variables["batch_stats"]})
  batches = _as_epoch_source(data, batch_size, shuffle=False, seed=0, drop_remainder=False)(0)
  if max_batches is not None:
    batches = itertools.islice(batches, max_batches)
  sums = None
  padded_size = None
  for images, labels in batches:
    b = len(labels)
    if not execution.fixed_batches:  # work units: the batch's own rows, no padding
      out = eval_step(variables, np.asarray(images), np.asarray(labels, np.int32),
                      np.ones(b, bool))
      sums = out if sums is None else jax.tree.map(jnp.add, sums, out)
      continue
    # Pad every batch to one size (a multiple of the device count): one compilation, and the
    # batch axis always divides across devices; the mask drops the padding from the sums.
    padded_size = padded_size or -(-max(b, 1) // n_dev) * n_dev
    if b > padded_size:
      padded_size = -(-b // n_dev) * n_dev
    pad = padded_size - b
    images = np.asarray(images)
    labels = np.asarray(labels, np.int32)
    mask = np.ones(padded_size, bool)
    if pad:
      images = np.concatenate([images, np.zeros((pad, *images.shape[1:]), images.dtype)])
      labels = np.concatenate([labels, np.zeros(pad, np.int32)])
      mask[b:] = False
    out = eval_step(variables, *execution.put_batch((images, labels, mask)))
    sums = out if sums is None else jax.tree.map(jnp.add, sums, out)
  return _accuracy(sums)


def _accuracy(sums: dict | None) -> dict[str, float]:
  if sums is None:
    raise ShapeError("The evaluation data yielded no batches; pass a non-empty test split.")
  sums = jax.device_get(sums)
  count = float(sums["count"])
  return {"top1": 100.0 * float(sums["correct1"]) / count,
          "top5": 100.0 * float(sums["correct5"]) / count,
          "loss": float(sums["loss"]) / count,
          "count": count}
