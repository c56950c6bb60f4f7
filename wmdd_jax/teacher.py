"""Supervised training of teachers: TrainState, optimiser, jitted steps and the loop.

The step is a pure share of a batch (:func:`train_share`) and an update (:func:`apply_update`);
an :class:`~wmdd_jax.distributed.Execution` runs them (default: data-parallel over the local
devices, every batch split along its first axis, the state replicated, the gradient all-reduced by
XLA; or deterministic work units). Training batches are trimmed to a multiple of the execution's
``batch_multiple``.

Images enter the steps as uint8 pixels (or floats in [0, 1]); augmentation (pad + random crop,
horizontal flip) and normalisation happen inside the jitted step, so host work is only batching.
Randomness is ``fold_in(key, step)``: a run is reproducible and resumable from its step count.
With a ``checkpoint_dir`` the loop saves its state every ``checkpoint_every`` epochs
(:class:`~wmdd_jax.checkpoint.TeacherCheckpointer`) and a restarted run continues from the newest
checkpoint, bit-identical to an uninterrupted one.

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
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from wmdd_jax import tracking, training
from wmdd_jax.checkpoint import TeacherCheckpointer
from wmdd_jax.data import transforms
from wmdd_jax.distributed import Execution, local_execution
from wmdd_jax.errors import ConfigError, NonFiniteError
from wmdd_jax.models import init_model
from wmdd_jax.training import BatchSource, TrainState


@dataclasses.dataclass(frozen=True)
class TeacherOptions:
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
    checkpoint_every: with :func:`train_teacher`'s ``checkpoint_dir``, save a resumable
      checkpoint after every this many epochs (and after the last one).
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
  checkpoint_every: int = 1

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
        (self.checkpoint_every >= 1, "checkpoint_every must be >= 1 (epochs between "
         "checkpoints)"),
    ]
    for ok, message in checks:
      if not ok:
        raise ConfigError(f"TeacherOptions: {message}.")


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


def train_share(model: nn.Module, *, mean: tuple[float, ...], std: tuple[float, ...],
                crop_padding: int = 4, flip: bool = True, resized_crop: bool = False,
                label_smoothing: float = 0.0) -> Callable:
  """The teacher's loss on a share of a batch, as an execution's gradient step takes it.

  ``share((params, batch_stats), (), (images, labels), key, batch)`` augments the share's images
  (u8[b, H, W, ch] or f32 in [0, 1]) with ``key``, normalises them, and returns the gradient of
  the share's CE sum divided by ``batch`` (the whole batch's size, so the shares' gradients add
  up to the batch-mean gradient), its train-mode BN statistics update scaled by its share of the
  batch (b / batch), its CE share ``loss`` and its top-1 ``correct`` and ``count``.
  """
  mean, std = tuple(mean), tuple(std)

  def share(weights, shared, rows, key, batch):
    del shared
    params, batch_stats = weights
    images, labels = rows
    x = augment(key, transforms.to_float(images), crop_padding=crop_padding, flip=flip,
                resized_crop=resized_crop)
    x = transforms.normalize(x, mean, std)
    fraction = labels.shape[0] / batch

    def loss_fn(p):
      # Only batch_stats is mutable: the capturing BNs skip their (unneeded) moment work.
      (logits, _), updates = model.apply({"params": p, "batch_stats": batch_stats}, x,
                                         train=True, mutable=["batch_stats"])
      return jnp.sum(training.cross_entropy(logits, labels, label_smoothing)) / batch, (
          logits, updates["batch_stats"])

    (loss, (logits, new_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    if not isinstance(fraction, float) or fraction != 1.0:  # the whole batch: nothing to scale
      new_stats = jax.tree.map(lambda v: v * fraction, new_stats)
    return {"grads": grads, "batch_stats": new_stats, "loss": loss,
            "correct": jnp.sum(jnp.argmax(logits, -1) == labels).astype(jnp.float32),
            "count": jnp.asarray(labels.shape[0], jnp.float32)}

  return share


def apply_update(state: TrainState, total: dict[str, Any]) -> tuple[TrainState, dict]:
  """Applies the summed shares of :func:`train_share`: ``(state, {"loss", "correct",
  "count"})``."""
  state = state.apply_gradients(grads=total["grads"], batch_stats=total["batch_stats"])
  return state, {k: total[k] for k in ("loss", "correct", "count")}


@functools.lru_cache(maxsize=16)
def make_train_step(model: nn.Module, execution: Execution | None = None, **options: Any
                    ) -> Callable:
  """The jitted train step ``(state, (), (images, labels), key, step) -> (state, metrics)`` of
  ``execution`` (default: one device); ``state`` is donated. Cached per (model, execution,
  options), so repeated calls reuse the compiled executable; pass ``mean``/``std`` as tuples.

  Args:
    model: the network.
    execution: how the step runs on devices.
    **options: :func:`train_share`'s keyword arguments (mean, std, crop_padding, flip,
      resized_crop, label_smoothing).

  Returns:
    The step; images u8[B, H, W, ch] (or f32 in [0, 1]), labels i32[B]; the augmentation key is
    ``fold_in(key, step)`` (per unit ``fold_in(fold_in(key, step), unit)``); metrics hold f32
    scalars ``loss`` (batch mean), ``correct`` (top-1 count) and ``count``.
  """
  execution = execution or Execution()
  return execution.gradient_step(train_share(model, **options), apply_update,
                                 weights_of=lambda s: (s.params, s.batch_stats))


# ---------------------------------------------------------------------------------------------
# Devices and batches.


# ---------------------------------------------------------------------------------------------
# The loop.


def train_teacher(
    model: nn.Module,
    train_data: BatchSource,
    test_data: BatchSource | None,
    config: TeacherOptions,
    *,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    steps_per_epoch: int | None = None,
    image_shape: tuple[int, int, int] | None = None,
    variables: dict[str, Any] | None = None,
    metrics_path: str | os.PathLike | None = None,
    progress: bool = True,
    execution: Execution | None = None,
    checkpoint_dir: str | os.PathLike | None = None,
    writer: tracking.MetricWriter | None = None,
) -> dict[str, Any]:
  """Trains ``model`` with SGD + cosine schedule, data-parallel over ``execution``'s devices.

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
      train_loss, train_top1, test_top1/top5/loss when evaluated, seconds, images_per_s). With
      ``checkpoint_dir`` the log is first cut to the epochs the run resumes after (atomically
      rewritten), so it holds exactly one line per epoch however often the run was restarted.
    progress: show progress: a bar on a terminal, else a log line now and then and one per
      epoch (:func:`wmdd_jax.tracking.progress`).
    execution: how steps run on devices (:mod:`wmdd_jax.distributed`; default: every batch
      split over all local devices by XLA, BN statistics over the whole batch). With work units
      BN statistics are per unit and the run is bit-identical for any device count.
    checkpoint_dir: if set, the training state (params, batch_stats, opt_state, step) and the
      epoch are saved there with Orbax after every ``config.checkpoint_every`` epochs and after
      the last one (the newest 2 kept; :class:`wmdd_jax.checkpoint.TeacherCheckpointer`), and a
      run finding a checkpoint there continues after its epoch, bit-identical to an
      uninterrupted run (epoch e's shuffle depends on (seed, e) only, the augmentation key on
      the step; a callable ``train_data`` must likewise give the same batches for the same
      epoch). ``variables`` is then ignored. A checkpoint of another run (other model or
      variable shapes, other training options, data size, normalisation or per-step batch;
      ``eval_*`` options, ``max_eval_batches`` and ``checkpoint_every`` may change) is refused.
      With several processes every process passes the same directory.
    writer: if set, each epoch's record is written there as the ``teacher/*`` scalars of
      :mod:`wmdd_jax.tracking` (step: the epoch), from values already on the host.

  Returns:
    The trained variables ``{"params", "batch_stats"}`` as host (numpy) arrays.

  Raises:
    ConfigError: a batch smaller than the device count, or a callable without steps_per_epoch.
    NonFiniteError: the training loss became NaN/Inf.
    CheckpointError: ``checkpoint_dir`` holds a checkpoint of another run, or an unreadable one
      (delete the directory to start again).
  """
  execution = execution or local_execution()
  n_dev = execution.batch_multiple
  if config.batch_size < n_dev:
    raise ConfigError(f"batch_size {config.batch_size} is smaller than the {n_dev} devices; "
                      f"use a batch of at least {n_dev} (ideally a multiple).")
  num_examples = None
  if callable(train_data):
    if steps_per_epoch is None:
      raise ConfigError("train_data is a callable, so pass steps_per_epoch (e.g. "
                        "num_examples // batch_size) to size the learning-rate schedule.")
  else:
    num_examples = len(train_data[1])
    steps_per_epoch = num_examples // config.batch_size
    if image_shape is None:
      image_shape = tuple(train_data[0].shape[1:])
    if steps_per_epoch < 1:
      raise ConfigError(f"The training set has {len(train_data[1])} examples, fewer than one "
                        f"batch of {config.batch_size}; lower batch_size.")
  if config.max_steps_per_epoch is not None:
    steps_per_epoch = min(steps_per_epoch, config.max_steps_per_epoch)
  source = training._as_epoch_source(train_data, config.batch_size, shuffle=True, seed=config.seed,
                            drop_remainder=True)

  def first_batch():
    batches = iter(source(0))
    first = next(batches, None)
    if first is None:
      raise ConfigError("train_data yielded no batches for epoch 0.")
    return first, batches

  root = jax.random.key(config.seed)
  init_key, aug_key = jax.random.split(root)
  # A resumable run that knows its image shape reads epoch 0's first batch only if it starts
  # there (for streamed data, opening an epoch is not free).
  first = None
  if image_shape is None or checkpoint_dir is None:
    first, first_batches = first_batch()
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
  eval_step = training.make_eval_step(model, execution, mean=mean, std=std)
  # A copy: the step donates the state, which must not delete the caller's `variables`.
  state = execution.place(training.create_train_state(model, variables, tx), copy=True)
  train_step = make_train_step(model, execution, **step_options)
  aug_key = execution.place(aug_key)

  ckpt, start_epoch = None, 0
  if checkpoint_dir is not None:
    fingerprint = _fingerprint(
        model, config, variables, num_examples=num_examples, steps_per_epoch=steps_per_epoch,
        batch=config.batch_size - config.batch_size % n_dev, image_shape=image_shape,
        mean=mean, std=std)
    ckpt = TeacherCheckpointer(checkpoint_dir, fingerprint, save_every=config.checkpoint_every,
                               last_epoch=config.epochs)
  bar = None
  try:
    if ckpt is not None:
      state, start_epoch = ckpt.restore(state)
      if start_epoch == 0 and first is None:
        first, first_batches = first_batch()
    step = int(jax.device_get(state.step))
    if metrics_path is not None:
      os.makedirs(os.path.dirname(os.path.abspath(metrics_path)), exist_ok=True)
      if ckpt is not None:
        _keep_epochs(metrics_path, start_epoch)
    bar = tracking.progress(total_steps, initial=step, enabled=progress, desc="teacher",
                            unit="step")
    for epoch in range(start_epoch, config.epochs):
      t0 = time.perf_counter()
      batches = itertools.chain([first], first_batches) if epoch == 0 else iter(source(epoch))
      sums, n_images, n_steps = None, 0, 0
      for images, labels in itertools.islice(batches, steps_per_epoch):
        usable = len(labels) - len(labels) % n_dev  # trim so the batch splits across devices
        if usable == 0:
          continue
        images = np.asarray(images[:usable])
        labels = np.asarray(labels[:usable], np.int32)
        state, metrics = train_step(state, (), execution.put_batch((images, labels)), aug_key,
                                    np.int32(step))
        step += 1
        sums = metrics if sums is None else jax.tree.map(jnp.add, sums, metrics)
        n_images += usable
        n_steps += 1
        bar.update(1)
        if n_steps % 25 == 0 and bar.active:  # a host sync, for the display only
          bar.set_postfix(epoch=epoch + 1, loss=float(metrics["loss"]))
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
        result = training.evaluate(
            model, {"params": state.params, "batch_stats": state.batch_stats}, test_data,
            mean=mean, std=std, batch_size=config.eval_batch_size,
            max_batches=config.max_eval_batches, execution=execution, eval_step=eval_step)
        record.update(test_top1=result["top1"], test_top5=result["top5"],
                      test_loss=result["loss"], eval_seconds=time.perf_counter() - t1)
      bar.set_postfix(epoch=epoch + 1, loss=record["train_loss"],
                      test_top1=record.get("test_top1"))
      bar.log(tracking.metrics_line(
          f"teacher epoch {epoch + 1}/{config.epochs}",
          {k: record[k] for k in ("train_loss", "train_top1", "test_top1", "test_top5", "lr",
                                  "images_per_s") if k in record}))
      if writer is not None:
        writer.write_scalars(epoch + 1, {f"teacher/{k}": record[k] for k in _WRITTEN
                                         if k in record})
      if metrics_path is not None:
        with open(metrics_path, "a") as f:
          f.write(json.dumps(record) + "\n")
      # After the epoch's log line: a resumed run drops the lines after its checkpoint.
      if ckpt is not None:
        ckpt.save(epoch + 1, state)
  finally:
    if bar is not None:
      bar.close()
    if ckpt is not None:
      ckpt.close()  # lets a save in flight finish (also when interrupted)
  return jax.device_get({"params": state.params, "batch_stats": state.batch_stats})


# The record's fields written as teacher/<field> scalars (wmdd_jax.tracking.TEACHER_TAGS).
_WRITTEN = ("train_loss", "train_top1", "lr", "images_per_s", "test_top1", "test_top5",
            "test_loss")


# Options that do not change the trained weights: a checkpoint may be resumed with other values.
_RESUME_FREE_OPTIONS = ("eval_every", "eval_batch_size", "max_eval_batches", "checkpoint_every")


def _fingerprint(model: nn.Module, config: TeacherOptions, variables: dict[str, Any], *,
                 num_examples: int | None, steps_per_epoch: int, batch: int,
                 image_shape: tuple[int, ...], mean: tuple[float, ...],
                 std: tuple[float, ...]) -> dict[str, Any]:
  """What a teacher checkpoint must match to be resumed (JSON): the options that shape the
  weights, the model (class, plain fields, every variable's dtype[shape]) and the data (examples,
  steps per epoch, rows per step, image shape, normalisation)."""
  options = {k: v for k, v in dataclasses.asdict(config).items() if k not in _RESUME_FREE_OPTIONS}
  fields = {f.name: _plain(getattr(model, f.name)) for f in dataclasses.fields(model)
            if f.name not in ("parent", "name")}
  shapes = {
      jax.tree_util.keystr(path, simple=True, separator="/"):
          f"{np.dtype(leaf.dtype).name}{list(np.shape(leaf))}"
      for path, leaf in jax.tree_util.tree_flatten_with_path(
          {"params": variables["params"], "batch_stats": variables.get("batch_stats", {})})[0]}
  return {
      "options": options,
      "model": {"class": type(model).__name__, "fields": fields, "variables": shapes},
      "data": {"num_examples": num_examples, "steps_per_epoch": int(steps_per_epoch),
               "batch": int(batch), "image_shape": [int(d) for d in image_shape],
               "mean": [float(m) for m in mean], "std": [float(s) for s in std]},
  }


def _plain(value: Any) -> Any:
  """A JSON value standing for a model field (names for functions, dtypes, modules)."""
  if value is None or isinstance(value, bool | int | float | str):
    return value
  if isinstance(value, list | tuple):
    return [_plain(v) for v in value]
  if isinstance(value, dict):
    return {str(k): _plain(v) for k, v in value.items()}
  if isinstance(value, np.dtype):
    return value.name
  return getattr(value, "__name__", None) or type(value).__qualname__


def _keep_epochs(path: str | os.PathLike, epochs: int) -> None:
  """Cuts a metrics log to its lines of epochs 1..``epochs`` (the last line of each; lines a
  kill left cut short are dropped), rewriting it atomically; no file: nothing to do."""
  if not os.path.exists(path):
    return
  kept: dict[int, str] = {}
  with open(path) as f:
    for line in f:
      try:
        epoch = json.loads(line).get("epoch")
      except (ValueError, AttributeError):
        continue
      if isinstance(epoch, int) and 1 <= epoch <= epochs:
        kept[epoch] = line.rstrip("\n") + "\n"
  tmp = f"{os.fspath(path)}.tmp-{os.getpid()}"
  with open(tmp, "w") as f:
    f.writelines(kept[e] for e in sorted(kept))
  os.replace(tmp, path)
