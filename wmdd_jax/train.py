"""Supervised training of teachers: TrainState, optimiser, jitted steps and the loop.

The loop is data-parallel over a 1-D :class:`jax.sharding.Mesh` named ``"batch"`` (default: the
local devices; the pipeline passes the mesh of all processes' devices): every batch is sharded
along its first axis, the train state is replicated, and XLA inserts the gradient all-reduce.
``units=N`` replaces this by deterministic work units (:mod:`wmdd_jax.units`). With one device
(this repository's CPU CI) the same code runs unchanged. Training batches are trimmed to a
multiple of the device count; evaluation batches are padded (with a mask) to a fixed size so a
single compiled step serves the whole split.

Images enter the steps as uint8 pixels (or floats in [0, 1]); augmentation (pad + random crop,
horizontal flip) and normalisation happen inside the jitted step, so host work is only batching.
Randomness is ``fold_in(key, step)``: a run is reproducible and resumable from its step count.

The loop takes plain arrays or a callable returning an epoch's batches, so it does not depend on
how the data is stored; :mod:`wmdd_jax.data` supplies both.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import json
import math
import os
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.training import train_state
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from tqdm.auto import tqdm

from wmdd_jax import units as units_lib
from wmdd_jax.data import transforms
from wmdd_jax.errors import ConfigError, NonFiniteError, ShapeError
from wmdd_jax.models import init_model

Batch = tuple[np.ndarray, np.ndarray]
# Either (images u8[N, H, W, ch], labels i[N]) in memory, or a callable epoch -> batches.
BatchSource = tuple[np.ndarray, np.ndarray] | Callable[[int], Iterable[Batch]]


class TrainState(train_state.TrainState):
  """Flax TrainState plus the BN running statistics."""

  batch_stats: Any = None


@dataclasses.dataclass(frozen=True)
class TeacherConfig:
  """Hyper-parameters of :func:`train_teacher` (typed; build it from any config system).

  Attributes:
    epochs: passes over the training data.
    batch_size: global batch (over all devices of the mesh).
    learning_rate: peak learning rate of the cosine schedule.
    momentum: SGD momentum.
    nesterov: Nesterov momentum.
    weight_decay: L2 coefficient added to the gradients (PyTorch SGD style).
    decay_norm_and_bias: whether weight decay also applies to BN scales/offsets and biases.
    warmup_epochs: linear warm-up length (may be fractional).
    label_smoothing: cross-entropy label smoothing in [0, 1).
    crop_padding: pixels of zero padding for the random crop; 0 disables cropping.
    flip: random horizontal flips.
    resized_crop: RandomResizedCrop(0.08-1) instead of the padded crop (ImageNet-style).
    eval_every: evaluate on the test data every this many epochs (and after the last one).
    eval_batch_size: evaluation batch size.
    max_steps_per_epoch: cap on steps per epoch (debug runs); None for full epochs.
    max_eval_batches: cap on evaluation batches (debug runs); None for the whole split.
    seed: seeds initialisation, shuffling and augmentation.
  """

  epochs: int = 30
  batch_size: int = 128
  learning_rate: float = 0.1
  momentum: float = 0.9
  nesterov: bool = False
  weight_decay: float = 5e-4
  decay_norm_and_bias: bool = True
  warmup_epochs: float = 0.0
  label_smoothing: float = 0.0
  crop_padding: int = 4
  flip: bool = True
  resized_crop: bool = False
  eval_every: int = 1
  eval_batch_size: int = 500
  max_steps_per_epoch: int | None = None
  max_eval_batches: int | None = None
  seed: int = 0

  def __post_init__(self):
    checks = [
        (self.epochs >= 1, "epochs must be >= 1"),
        (self.batch_size >= 1, "batch_size must be >= 1"),
        (self.learning_rate > 0, "learning_rate must be > 0"),
        (0 <= self.momentum < 1, "momentum must be in [0, 1)"),
        (self.weight_decay >= 0, "weight_decay must be >= 0"),
        (self.warmup_epochs >= 0, "warmup_epochs must be >= 0"),
        (0 <= self.label_smoothing < 1, "label_smoothing must be in [0, 1)"),
        (self.crop_padding >= 0, "crop_padding must be >= 0"),
        (self.eval_every >= 1, "eval_every must be >= 1"),
        (self.eval_batch_size >= 1, "eval_batch_size must be >= 1"),
        (self.max_steps_per_epoch is None or self.max_steps_per_epoch >= 1,
         "max_steps_per_epoch must be None or >= 1"),
        (self.max_eval_batches is None or self.max_eval_batches >= 1,
         "max_eval_batches must be None or >= 1"),
    ]
    for ok, message in checks:
      if not ok:
        raise ConfigError(f"TeacherConfig: {message}.")


# ---------------------------------------------------------------------------------------------
# Optimiser.


def cosine_schedule(learning_rate: float, total_steps: int, warmup_steps: int = 0
                    ) -> optax.Schedule:
  """Linear warm-up from 0 over ``warmup_steps``, then cosine decay to 0 at ``total_steps``."""
  total_steps = max(int(total_steps), 1)
  warmup_steps = min(int(warmup_steps), total_steps - 1)
  if warmup_steps <= 0:
    return optax.cosine_decay_schedule(learning_rate, total_steps)
  return optax.warmup_cosine_decay_schedule(0.0, learning_rate, warmup_steps, total_steps, 0.0)


def make_optimizer(
    learning_rate: float,
    total_steps: int,
    *,
    warmup_steps: int = 0,
    momentum: float = 0.9,
    nesterov: bool = False,
    weight_decay: float = 0.0,
    decay_norm_and_bias: bool = True,
) -> optax.GradientTransformation:
  """SGD with momentum, PyTorch-style weight decay and a cosine schedule.

  Args:
    learning_rate: peak learning rate.
    total_steps: length of the schedule (the rate reaches 0 there).
    warmup_steps: linear warm-up steps.
    momentum: momentum coefficient.
    nesterov: Nesterov momentum.
    weight_decay: coefficient of ``wd * param`` added to the gradient before momentum, as
      ``torch.optim.SGD(weight_decay=...)`` does.
    decay_norm_and_bias: False exempts 1-D parameters (BN scale/offset, biases) from decay.

  Returns:
    An optax transformation.
  """
  schedule = cosine_schedule(learning_rate, total_steps, warmup_steps)
  parts = []
  if weight_decay > 0:
    mask = None if decay_norm_and_bias else (
        lambda params: jax.tree.map(lambda p: p.ndim > 1, params))
    parts.append(optax.add_decayed_weights(weight_decay, mask=mask))
  parts.append(optax.sgd(schedule, momentum=momentum or None, nesterov=nesterov))
  return optax.chain(*parts)


def create_train_state(model: nn.Module, variables: dict[str, Any],
                       tx: optax.GradientTransformation) -> TrainState:
  """A TrainState at step 0 from ``{"params", "batch_stats"}`` variables."""
  return TrainState.create(apply_fn=model.apply, params=variables["params"],
                           batch_stats=variables.get("batch_stats", {}), tx=tx)


# ---------------------------------------------------------------------------------------------
# Augmentation inside the steps.


def augment(key: jax.Array, x: jax.Array, *, crop_padding: int = 4, flip: bool = True,
            resized_crop: bool = False) -> jax.Array:
  """Per-image random crop and horizontal flip (each image gets its own draw).

  Args:
    key: PRNG key for the whole batch.
    x: f32[B, H, W, ch] in [0, 1] pixel scale (so crop padding is black, as torchvision's
      ``RandomCrop(padding=p)`` on PIL images).
    crop_padding: zero-pad p pixels and crop back to H x W at a uniform offset in [0, 2p]; 0
      disables it.
    flip: flip each image left-right with probability 1/2.
    resized_crop: torchvision's RandomResizedCrop(scale 0.08-1, ratio 3/4-4/3) back to H x W
      instead of the padded crop (the ImageNet recipe).

  Returns:
    f32[B, H, W, ch].
  """
  b, h, w, _ = x.shape
  keys = jax.random.split(key, (2, b))
  if resized_crop:
    x = jax.vmap(lambda k, im: transforms.random_resized_crop(k, im, (h, w)))(keys[0], x)
  elif crop_padding > 0:
    x = jax.vmap(lambda k, im: transforms.pad_and_random_crop(k, im, crop_padding))(keys[0], x)
  if flip:
    x = jax.vmap(transforms.random_flip)(keys[1], x)
  return x


# ---------------------------------------------------------------------------------------------
# Steps.


def cross_entropy(logits: jax.Array, labels: jax.Array, label_smoothing: float = 0.0
                  ) -> jax.Array:
  """Per-example CE. logits f32[B, C], labels i32[B] -> f32[B]."""
  num_classes = logits.shape[-1]
  targets = jax.nn.one_hot(labels, num_classes)
  if label_smoothing:
    targets = optax.smooth_labels(targets, label_smoothing)
  return optax.softmax_cross_entropy(logits.astype(jnp.float32), targets)


@functools.lru_cache(maxsize=16)
def make_train_step(
    model: nn.Module,
    *,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    crop_padding: int = 4,
    flip: bool = True,
    resized_crop: bool = False,
    label_smoothing: float = 0.0,
) -> Callable[[TrainState, jax.Array, jax.Array, jax.Array], tuple[TrainState, dict]]:
  """Builds the jitted train step ``(state, images, labels, key) -> (state, metrics)``.

  The step draws its augmentation from ``fold_in(key, state.step)``; ``state`` is donated.
  Steps are cached per (model, options), so repeated calls reuse the compiled executable; pass
  ``mean``/``std`` as tuples (hashable).

  Args:
    model: the network.
    mean: per-channel mean in [0, 1] pixel scale.
    std: per-channel std.
    crop_padding: random-crop padding (0: none).
    flip: random horizontal flips.
    resized_crop: RandomResizedCrop instead of the padded crop (see :func:`augment`).
    label_smoothing: CE label smoothing.

  Returns:
    A jitted function; images u8[B, H, W, ch] (or f32 in [0, 1]), labels i32[B]; metrics hold
    f32 scalars ``loss`` (batch mean), ``correct`` (top-1 count) and ``count``.
  """
  mean, std = tuple(mean), tuple(std)

  def step(state: TrainState, images: jax.Array, labels: jax.Array, key: jax.Array):
    x = augment(jax.random.fold_in(key, state.step), transforms.to_float(images),
                crop_padding=crop_padding, flip=flip, resized_crop=resized_crop)
    x = transforms.normalize(x, mean, std)

    def loss_fn(params):
      # Only batch_stats is mutable: the capturing BNs skip their (unneeded) moment work.
      (logits, _), updates = model.apply(
          {"params": params, "batch_stats": state.batch_stats}, x, train=True,
          mutable=["batch_stats"])
      loss = jnp.mean(cross_entropy(logits, labels, label_smoothing))
      return loss, (logits, updates["batch_stats"])

    (loss, (logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params)
    state = state.apply_gradients(grads=grads, batch_stats=batch_stats)
    metrics = {
        "loss": loss,
        "correct": jnp.sum(jnp.argmax(logits, -1) == labels).astype(jnp.float32),
        "count": jnp.asarray(labels.shape[0], jnp.float32),
    }
    return state, metrics

  return jax.jit(step, donate_argnums=(0,))


@functools.lru_cache(maxsize=16)
def make_unit_train_step(
    model: nn.Module,
    *,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    crop_padding: int = 4,
    flip: bool = True,
    resized_crop: bool = False,
    label_smoothing: float = 0.0,
) -> tuple[Callable, Callable]:
  """The train step cut into deterministic work units (see :mod:`wmdd_jax.units`).

  Returns ``(unit, apply)``, both jitted:

  * ``unit(params, batch_stats, images, labels, key, step i32[], index i32[], batch f32[])``: one
    unit's gradient of its share of the batch-mean CE (its CE sum / ``batch``), its train-mode BN
    statistics update weighted by its share of the batch, its CE share and top-1 count. The
    augmentation key is ``fold_in(fold_in(key, step), index)``.
  * ``apply(state, outs)``: sums the units' outputs in unit order, applies the gradient (state
    donated) and returns ``(state, metrics)`` like :func:`make_train_step`'s step.

  Args: as :func:`make_train_step`.
  """
  mean, std = tuple(mean), tuple(std)

  def unit(params, batch_stats, images, labels, key, step, index, batch):
    x = augment(units_lib.unit_key(key, step, index), transforms.to_float(images),
                crop_padding=crop_padding, flip=flip, resized_crop=resized_crop)
    x = transforms.normalize(x, mean, std)
    share = labels.shape[0] / batch

    def loss_fn(p):
      (logits, _), updates = model.apply({"params": p, "batch_stats": batch_stats}, x,
                                         train=True, mutable=["batch_stats"])
      return jnp.sum(cross_entropy(logits, labels, label_smoothing)) / batch, (
          logits, updates["batch_stats"])

    (loss, (logits, new_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    return {"grads": grads, "batch_stats": jax.tree.map(lambda v: v * share, new_stats),
            "loss": loss,
            "correct": jnp.sum(jnp.argmax(logits, -1) == labels).astype(jnp.float32),
            "count": jnp.asarray(labels.shape[0], jnp.float32)}

  def apply(state, outs):
    total = units_lib.fold_sum(outs)
    state = state.apply_gradients(grads=total["grads"], batch_stats=total["batch_stats"])
    return state, {k: total[k] for k in ("loss", "correct", "count")}

  return jax.jit(unit), jax.jit(apply, donate_argnums=(0,))


@functools.lru_cache(maxsize=16)
def make_eval_step(
    model: nn.Module, *, mean: tuple[float, ...], std: tuple[float, ...]
) -> Callable[[dict, jax.Array, jax.Array, jax.Array], dict]:
  """Builds the jitted eval step ``(variables, images, labels, mask) -> sums`` (cached per
  (model, mean, std), like :func:`make_train_step`).

  Args:
    model: the network (eval mode: BN uses its running statistics).
    mean: per-channel mean in [0, 1] pixel scale.
    std: per-channel std.

  Returns:
    A jitted function; images u8[B, H, W, ch] (or f32 in [0, 1]), labels i32[B], mask bool[B]
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

  return jax.jit(step)


# ---------------------------------------------------------------------------------------------
# Devices and batches.


def data_mesh(devices: list[jax.Device] | None = None) -> Mesh:
  """A 1-D mesh with axis ``"batch"`` over ``devices`` (default: all local devices)."""
  return Mesh(np.asarray(devices if devices is not None else jax.local_devices()), ("batch",))


def shard_batch(mesh: Mesh, *arrays: np.ndarray) -> tuple[jax.Array, ...]:
  """Places host arrays on the mesh, split along their first axis."""
  sharding = NamedSharding(mesh, P("batch"))
  return tuple(jax.device_put(a, sharding) for a in arrays)


def replicate(mesh: Mesh, tree: Any, *, copy: bool = False) -> Any:
  """Places a pytree on every device of the mesh (``copy``: never alias the input buffers).

  With several processes every process must pass the same values; device arrays then go
  through the host (a process cannot address the others' devices).
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
    mesh: Mesh | None = None,
    eval_step: Callable | None = None,
    units: int = 0,
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
    mesh: device mesh (default: all local devices).
    eval_step: a step from :func:`make_eval_step` to reuse (avoids recompiling).
    units: 0: each batch split over the mesh by XLA. N > 0: each batch cut into N deterministic
      work units spread over the mesh's devices (:mod:`wmdd_jax.units`): bit-identical for any
      device count.

  Returns:
    {"top1", "top5", "loss", "count"}.
  """
  units = units_lib.check_units(units)
  mesh = mesh or data_mesh()
  eval_step = eval_step or make_eval_step(model, mean=tuple(mean), std=tuple(std))
  if units:
    return _evaluate_units(variables, data, eval_step, batch_size, max_batches,
                           units_lib.devices_of(mesh), units)
  n_dev = mesh.devices.size
  variables = replicate(mesh, {"params": variables["params"],
                               "batch_stats": variables["batch_stats"]})
  batches = _as_epoch_source(data, batch_size, shuffle=False, seed=0, drop_remainder=False)(0)
  if max_batches is not None:
    batches = itertools.islice(batches, max_batches)
  sums = None
  padded_size = None
  for images, labels in batches:
    b = len(labels)
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
    out = eval_step(variables, *shard_batch(mesh, images, labels, mask))
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


class _UnitTrainer:
  """One teacher step as deterministic work units: units on devices g % D, combined in order on
  the first device, which updates the state and sends the new weights to the others."""

  def __init__(self, fns, devices, units, key, step):
    self.unit, self.apply = fns
    self.devices, self.units, self.step = devices, units, step
    self.keys = units_lib.replicas(key, devices)

  def __call__(self, state, images, labels):
    weights = units_lib.replicas((state.params, state.batch_stats), self.devices)
    batch, step = np.float32(len(labels)), np.int32(self.step)

    def one(g, d, lo, hi):
      rows = jax.device_put((images[lo:hi], labels[lo:hi]), self.devices[d])
      return self.unit(*weights[d], *rows, self.keys[d], step, np.int32(g), batch)

    outs = units_lib.map_units(one, len(labels), self.units, self.devices)
    self.step += 1
    return self.apply(state, outs)


def _evaluate_units(variables, data, eval_step, batch_size, max_batches, devices, units):
  """:func:`evaluate` with deterministic work units (no padding: units of the batch's rows)."""
  copies = units_lib.replicas({"params": variables["params"],
                               "batch_stats": variables["batch_stats"]}, devices)
  batches = _as_epoch_source(data, batch_size, shuffle=False, seed=0, drop_remainder=False)(0)
  if max_batches is not None:
    batches = itertools.islice(batches, max_batches)
  sums = None
  for images, labels in batches:
    images, labels = np.asarray(images), np.asarray(labels, np.int32)
    outs = units_lib.map_units(
        lambda g, d, lo, hi, x=images, y=labels: eval_step(copies[d], *jax.device_put(
            (x[lo:hi], y[lo:hi], np.ones(hi - lo, bool)), devices[d])),
        len(labels), units, devices)
    if outs:
      batch = units_lib.ordered_sum(outs, devices[0])
      sums = batch if sums is None else units_lib.ordered_sum([sums, batch], devices[0])
  return _accuracy(sums)


# ---------------------------------------------------------------------------------------------
# The loop.


def train_teacher(
    model: nn.Module,
    train_data: BatchSource,
    test_data: BatchSource | None,
    config: TeacherConfig,
    *,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    steps_per_epoch: int | None = None,
    image_shape: tuple[int, int, int] | None = None,
    variables: dict[str, Any] | None = None,
    metrics_path: str | os.PathLike | None = None,
    progress: bool = True,
    mesh: Mesh | None = None,
    units: int = 0,
) -> dict[str, Any]:
  """Trains ``model`` with SGD + cosine schedule, data-parallel over the mesh's devices.

  Args:
    model: the network (from :func:`wmdd_jax.models.get_model`).
    train_data: (images u8[N, H, W, ch], labels i[N]) in memory, shuffled each epoch with
      ``config.seed``; or a callable ``epoch -> iterable of (images, labels)`` batches of
      ``config.batch_size`` (it must shuffle itself), in which case ``steps_per_epoch`` is required.
    test_data: same kinds, or None to skip evaluation.
    config: hyper-parameters.
    mean: per-channel mean in [0, 1] pixel scale (as ``Dataset.mean``).
    std: per-channel std.
    steps_per_epoch: batches per epoch for a callable ``train_data`` (sets the schedule).
    image_shape: (H, W, ch) for initialisation; default: taken from the data.
    variables: start from these instead of a fresh initialisation.
    metrics_path: if set, one JSON line per epoch is appended there (epoch, step, lr,
      train_loss, train_top1, test_top1/top5/loss when evaluated, seconds, images_per_s).
    progress: show a tqdm bar.
    mesh: device mesh (default: all local devices).
    units: 0: each batch split over the mesh by XLA (BN statistics over the whole batch). N > 0:
      each batch cut into N deterministic work units (:mod:`wmdd_jax.units`; BN statistics per
      unit): the run is bit-identical for any device count.

  Returns:
    The trained variables ``{"params", "batch_stats"}`` as host (numpy) arrays.

  Raises:
    ConfigError: a batch smaller than the device count, or a callable without steps_per_epoch.
    NonFiniteError: the training loss became NaN/Inf.
  """
  units = units_lib.check_units(units)
  mesh = mesh or data_mesh()
  # With units the batch never splits over devices, so their number does not constrain it.
  n_dev = 1 if units else mesh.devices.size
  if config.batch_size < n_dev:
    raise ConfigError(f"batch_size {config.batch_size} is smaller than the {n_dev} devices; "
                      f"use a batch of at least {n_dev} (ideally a multiple).")
  if callable(train_data):
    if steps_per_epoch is None:
      raise ConfigError("train_data is a callable, so pass steps_per_epoch (e.g. "
                        "num_examples // batch_size) to size the learning-rate schedule.")
  else:
    steps_per_epoch = len(train_data[1]) // config.batch_size
    if image_shape is None:
      image_shape = tuple(train_data[0].shape[1:])
    if steps_per_epoch < 1:
      raise ConfigError(f"The training set has {len(train_data[1])} examples, fewer than one "
                        f"batch of {config.batch_size}; lower batch_size.")
  if config.max_steps_per_epoch is not None:
    steps_per_epoch = min(steps_per_epoch, config.max_steps_per_epoch)
  source = _as_epoch_source(train_data, config.batch_size, shuffle=True, seed=config.seed,
                            drop_remainder=True)

  root = jax.random.key(config.seed)
  init_key, aug_key = jax.random.split(root)
  first_batches = iter(source(0))
  first = next(first_batches, None)
  if first is None:
    raise ConfigError("train_data yielded no batches for epoch 0.")
  if image_shape is None:
    image_shape = tuple(np.shape(first[0])[1:])
  if variables is None:
    variables = init_model(model, init_key, image_shape)

  total_steps = config.epochs * steps_per_epoch
  warmup_steps = round(config.warmup_epochs * steps_per_epoch)
  tx = make_optimizer(config.learning_rate, total_steps, warmup_steps=warmup_steps,
                      momentum=config.momentum, nesterov=config.nesterov,
                      weight_decay=config.weight_decay,
                      decay_norm_and_bias=config.decay_norm_and_bias)
  schedule = cosine_schedule(config.learning_rate, total_steps, warmup_steps)
  mean, std = tuple(mean), tuple(std)
  step_options = dict(mean=mean, std=std, crop_padding=config.crop_padding, flip=config.flip,
                      resized_crop=config.resized_crop, label_smoothing=config.label_smoothing)
  eval_step = make_eval_step(model, mean=mean, std=std)
  if units:
    devices = units_lib.devices_of(mesh)
    # The state lives on the first device (a copy: `apply` donates it); the units read copies.
    state = jax.device_put(create_train_state(model, variables, tx), devices[0],
                           may_alias=False)
    train_step = _UnitTrainer(make_unit_train_step(model, **step_options), devices, units,
                              aug_key, int(jax.device_get(state.step)))
    aug_key = None
  else:
    # A copy: the step donates the state, which must not delete the caller's `variables`.
    state = replicate(mesh, create_train_state(model, variables, tx), copy=True)
    train_step = make_train_step(model, **step_options)
    aug_key = replicate(mesh, aug_key)

  if metrics_path is not None:
    os.makedirs(os.path.dirname(os.path.abspath(metrics_path)), exist_ok=True)
  bar = tqdm(total=total_steps, disable=not progress, desc="teacher", unit="step",
             dynamic_ncols=True)
  try:
    for epoch in range(config.epochs):
      t0 = time.perf_counter()
      batches = itertools.chain([first], first_batches) if epoch == 0 else iter(source(epoch))
      sums, n_images, n_steps = None, 0, 0
      for images, labels in itertools.islice(batches, steps_per_epoch):
        usable = len(labels) - len(labels) % n_dev  # trim so the batch splits across devices
        if usable == 0:
          continue
        images = np.asarray(images[:usable])
        labels = np.asarray(labels[:usable], np.int32)
        if units:
          state, metrics = train_step(state, images, labels)
        else:
          state, metrics = train_step(state, *shard_batch(mesh, images, labels), aug_key)
        sums = metrics if sums is None else jax.tree.map(jnp.add, sums, metrics)
        n_images += usable
        n_steps += 1
        bar.update(1)
        if n_steps % 25 == 0:
          bar.set_postfix(epoch=epoch + 1, loss=f"{float(metrics['loss']):.3f}")
      if sums is None:
        raise ConfigError(f"Epoch {epoch} yielded no training batches; check train_data.")
      sums = jax.device_get(sums)
      seconds = time.perf_counter() - t0
      record = {
          "epoch": epoch + 1,
          "step": int(jax.device_get(state.step)),
          "lr": float(schedule(int(jax.device_get(state.step)) - 1)),
          "train_loss": float(sums["loss"]) / n_steps,
          "train_top1": 100.0 * float(sums["correct"]) / float(sums["count"]),
          "train_seconds": seconds,
          "images_per_s": n_images / seconds,
      }
      if not math.isfinite(record["train_loss"]):
        raise NonFiniteError(f"The training loss became {record['train_loss']} in epoch "
                             f"{epoch + 1}; lower learning_rate or add warmup_epochs.")
      last = epoch + 1 == config.epochs
      if test_data is not None and ((epoch + 1) % config.eval_every == 0 or last):
        t1 = time.perf_counter()
        result = evaluate(model, {"params": state.params, "batch_stats": state.batch_stats},
                          test_data, mean=mean, std=std, batch_size=config.eval_batch_size,
                          max_batches=config.max_eval_batches, mesh=mesh, eval_step=eval_step,
                          units=units)
        record.update(test_top1=result["top1"], test_top5=result["top5"],
                      test_loss=result["loss"], eval_seconds=time.perf_counter() - t1)
      bar.set_postfix(epoch=epoch + 1, loss=f"{record['train_loss']:.3f}",
                      **({"test_top1": f"{record['test_top1']:.2f}"}
                         if "test_top1" in record else {}))
      if metrics_path is not None:
        with open(metrics_path, "a") as f:
          f.write(json.dumps(record) + "\n")
  finally:
    bar.close()
  return jax.device_get({"params": state.params, "batch_stats": state.batch_stats})
