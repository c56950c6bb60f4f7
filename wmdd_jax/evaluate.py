"""Evaluate (stage 5): a student trained from scratch on the synthetic set, tested on real data.

:func:`train_student` is the paper's protocol: each epoch the synthetic set is shuffled into
batches; per batch the views, soft labels and weighted KD loss of :mod:`wmdd_jax.relabel`, one
AdamW update of the student in train mode (no decay on BN scale/bias and biases, cosine over
epochs); every ``eval_every`` epochs top-1/top-5 on the real test split.

Several devices (an :class:`~wmdd_jax.distributed.Execution`): each step's batch is split over
the devices after it is gathered from the (replicated) synthetic set; student, teacher and
optimiser state are replicated, and XLA turns the student's train-mode BN statistics and the
gradient into cross-device reductions over the global batch, so one epoch equals the
single-device epoch up to round-off. Work units make the views once, then each unit's share.
The evaluation is :func:`wmdd_jax.training.evaluate`, over each process's local devices.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from wmdd_jax import tracking, training
from wmdd_jax.distributed import Execution
from wmdd_jax.errors import ConfigError, DataError, NonFiniteError, ShapeError
from wmdd_jax.models import init_model
from wmdd_jax.relabel import (
    _kl,
    _weight_scale,
    batch_key,
    epoch_batches,
    epoch_cosine,
    make_views,
    mix_weights,
    soft_labels,
    stream_keys,
    weight_decay_mask,
)


@dataclasses.dataclass(frozen=True)
class EvaluateOptions:
  """Hyper-parameters of :func:`train_student` (defaults: the paper's protocol).

  Attributes:
    epochs: passes over the synthetic set.
    batch_size: synthetic images per step; the whole set when it holds fewer images. The last
      batch of an epoch may be smaller (as PyTorch's DataLoader without drop_last).
    lr: AdamW peak learning rate (betas 0.9/0.999, eps 1e-8, as torch.optim.AdamW).
    weight_decay: AdamW decoupled weight decay; never applied to BN scale/bias or biases.
    temperature: KD temperature T.
    eval_every: evaluate on the test split every this many epochs (and after the last one).
    eval_batch_size: test images per evaluation step.
    crop_scale: RandomResizedCrop area fraction range.
    crop_ratio: RandomResizedCrop aspect-ratio range.
    cutmix: apply CutMix after crop/flip.
    cutmix_alpha: lambda ~ Beta(alpha, alpha).
    use_weights: weight each sample's KL by its barycenter weight (False: plain mean).
    seed: seeds everything when ``train_student`` gets no explicit key.
    progress: show progress over epochs: a bar on a terminal, else a log line now and then and
      one per evaluation (:func:`wmdd_jax.tracking.progress`).
  """

  epochs: int = 300
  batch_size: int = 100
  lr: float = 1e-3
  weight_decay: float = 0.01
  temperature: float = 20.0
  eval_every: int = 10
  eval_batch_size: int = 500
  crop_scale: tuple[float, float] = (0.08, 1.0)
  crop_ratio: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0)
  cutmix: bool = True
  cutmix_alpha: float = 1.0
  use_weights: bool = True
  seed: int = 0
  progress: bool = True

  def __post_init__(self):
    checks = [
        (self.epochs >= 1, "epochs must be >= 1"),
        (self.batch_size >= 1, "batch_size must be >= 1"),
        (self.lr > 0, "lr must be > 0"),
        (self.weight_decay >= 0, "weight_decay must be >= 0"),
        (self.temperature > 0, "temperature must be > 0"),
        (self.eval_every >= 1, "eval_every must be >= 1"),
        (self.eval_batch_size >= 1, "eval_batch_size must be >= 1"),
        (0 < self.crop_scale[0] <= self.crop_scale[1] <= 1,
         "crop_scale must satisfy 0 < low <= high <= 1"),
        (0 < self.crop_ratio[0] <= self.crop_ratio[1], "crop_ratio must satisfy 0 < low <= high"),
        (self.cutmix_alpha > 0, "cutmix_alpha must be > 0"),
    ]
    for ok, message in checks:
      if not ok:
        raise ConfigError(f"EvaluateOptions: {message}.")


class EvalRecord(NamedTuple):
  """One evaluation: epoch (1-based, after training it), test top-1/top-5 (percent) and the mean
  train KD loss of that epoch."""

  epoch: int
  top1: float
  top5: float
  train_loss: float


class StudentResult(NamedTuple):
  """What :func:`train_student` returns.

  Attributes:
    top1, top5: test accuracy (percent) after the last epoch.
    best_top1, best_top5: the maxima over all evaluations (each taken independently).
    history: one EvalRecord per evaluation.
    variables: the student's final ``{"params", "batch_stats"}`` (host numpy arrays).
  """

  top1: float
  top5: float
  best_top1: float
  best_top5: float
  history: tuple[EvalRecord, ...]
  variables: dict[str, Any]


# ---------------------------------------------------------------------------------------------
# Optimiser and step.


def make_optimizer(options: EvaluateOptions, steps_per_epoch: int) -> optax.GradientTransformation:
  """AdamW with the per-epoch cosine and the decay mask of :func:`weight_decay_mask`."""
  return optax.adamw(epoch_cosine(options.lr, options.epochs, steps_per_epoch),
                     b1=0.9, b2=0.999, eps=1e-8, weight_decay=options.weight_decay,
                     mask=weight_decay_mask)


def student_views(options: EvaluateOptions) -> Callable:
  """The whole batch's views: ``(images, weights, idx, views_key, epoch, step) -> (views
  f32[B, H, W, ch], scale f32[B])``.

  ``images`` f32[N, H, W, ch] and ``weights`` f32[N] are the whole synthetic set, ``idx`` i32[B]
  picks the batch; crops, flips and CutMix (one box and permutation for the batch) use
  ``batch_key(views_key, epoch, step)``; ``scale`` is each view's KD weight ``w / mean(w)`` of
  its mixed barycenter weight (ones without ``use_weights``).
  """

  def prepare(images, weights, idx, views_key, epoch, step):
    batch_views, mix = make_views(batch_key(views_key, epoch, step), images[idx],
                                  scale=options.crop_scale, ratio=options.crop_ratio,
                                  use_cutmix=options.cutmix, alpha=options.cutmix_alpha)
    if options.use_weights:
      scale = _weight_scale(mix_weights(weights[idx], mix))
    else:
      scale = jnp.ones(idx.shape, jnp.float32)
    return batch_views, scale

  return prepare


def student_share(student_model: nn.Module, teacher_model: nn.Module, options: EvaluateOptions
                  ) -> Callable:
  """The student's loss on a share of a batch, as an execution's gradient step takes it.

  ``share((params, batch_stats), (teacher_variables,), (views, scale), key, batch)``: the
  teacher's soft labels on the share's views, the gradient of its weighted KD sum divided by
  ``batch`` (so shares add up to :func:`wmdd_jax.relabel.kd_loss` of the whole batch), its BN
  statistics update scaled by its share of the batch, and its ``loss`` share.
  """

  def share(weights, shared, rows, key, batch):
    del key  # views were made (with their own keys) before the shares
    params, batch_stats = weights
    (teacher_variables,) = shared
    views, scale = rows
    teacher_logits = soft_labels(teacher_model, teacher_variables, views)
    fraction = views.shape[0] / batch

    def loss_fn(p):
      (logits, _), updates = student_model.apply(
          {"params": p, "batch_stats": batch_stats}, views, train=True, mutable=["batch_stats"])
      loss = jnp.sum(_kl(logits, teacher_logits, options.temperature) * scale) / batch
      return loss, updates.get("batch_stats", batch_stats)

    (loss, new_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    if not isinstance(fraction, float) or fraction != 1.0:  # the whole batch: nothing to scale
      new_stats = jax.tree.map(lambda v: v * fraction, new_stats)
    return {"grads": grads, "batch_stats": new_stats, "loss": loss}

  return share


def _apply_student(state, total):
  return (state.apply_gradients(grads=total["grads"], batch_stats=total["batch_stats"]),
          total["loss"])


@functools.lru_cache(maxsize=16)
def make_student_step(
    student_model: nn.Module, teacher_model: nn.Module, options: EvaluateOptions,
    execution: Execution | None = None,
) -> Callable[..., tuple[training.TrainState, jax.Array]]:
  """The student's step of ``execution`` (default: one device): ``step(state,
  (teacher_variables,), (images, weights, idx, views_key, epoch, step), views_key, step)``.

  The views (:func:`student_views`) are made once for the batch, then the shares
  (:func:`student_share`) and one AdamW update of the student in train mode; ``state`` is
  donated. It returns ``(state, loss f32[])``. Compiled as a ``"student_step"`` program (its
  compile options: :class:`~wmdd_jax.distributed.ExecutionOptions` ``compiler_options``).
  """
  return (execution or Execution()).gradient_step(
      student_share(student_model, teacher_model, options), _apply_student,
      weights_of=lambda s: (s.params, s.batch_stats), prepare=student_views(options),
      program="student_step")


# ---------------------------------------------------------------------------------------------
# The loop.


def _check_inputs(images, weights) -> tuple[jax.Array, jax.Array]:
  images = np.asarray(images)
  if images.ndim == 5:  # [C, k, H, W, ch] as a SyntheticSet stores them
    images = images.reshape(-1, *images.shape[2:])
  if images.ndim != 4 or images.shape[0] == 0:
    raise ShapeError(f"Synthetic images must be f32[N, H, W, ch] (or [C, k, H, W, ch]) with N > "
                     f"0, got shape {images.shape}.")
  if not np.issubdtype(images.dtype, np.floating):
    raise ShapeError(f"Synthetic images must be normalised floats, got dtype {images.dtype}; "
                     "normalise them as the teacher's inputs ((x / 255 - mean) / std).")
  n = images.shape[0]
  weights = np.ones(n, np.float32) if weights is None else np.asarray(weights, np.float32)
  weights = weights.reshape(-1)
  if weights.shape != (n,):
    raise ShapeError(f"Got {weights.size} sample weights for {n} synthetic images; pass one "
                     "weight per image (SyntheticSet weights f32[C, k] flatten to [C * k]).")
  if not np.all(np.isfinite(weights)) or np.any(weights < 0) or weights.sum() <= 0:
    raise DataError("Sample weights must be finite, non-negative and not all zero; got min "
                    f"{weights.min()}, sum {weights.sum()}. Pass the barycenter weights or None.")
  return jnp.asarray(images, jnp.float32), jnp.asarray(weights)


def train_student(
    student_model: nn.Module,
    teacher_model: nn.Module,
    teacher_variables: dict[str, Any],
    images: Any,
    weights: Any,
    test_data: training.BatchSource | None,
    *,
    mean: tuple[float, ...] = (0.0,),
    std: tuple[float, ...] = (1.0,),
    options: EvaluateOptions = EvaluateOptions(),
    key: jax.Array | None = None,
    execution: Execution | None = None,
    writer: tracking.MetricWriter | None = None,
) -> StudentResult:
  """Trains a student from scratch on the synthetic set with on-the-fly soft labels.

  Args:
    student_model: the student module (e.g. ``get_model("resnet18", C, ...)``).
    teacher_model: the teacher module.
    teacher_variables: the teacher's ``{"params", "batch_stats"}``.
    images: f32[N, H, W, ch] (or [C, k, H, W, ch]) synthetic images, normalised.
    weights: f32[N] (or [C, k]) barycenter weights, or None for uniform.
    test_data: the real test split, as :func:`wmdd_jax.teacher.evaluate` takes it: a pair
      (images u8[M, H, W, ch] or f32 in [0, 1], labels i[M]) or a callable ``epoch -> iterable
      of such batches``; images are normalised with ``mean``/``std`` inside the eval step. For
      images that are already normalised, pass floats with the default mean 0 and std 1. None
      skips evaluation (accuracies are then NaN).
    mean: per-channel mean in [0, 1] pixel scale (the dataset's), for the test images.
    std: per-channel std.
    options: EvaluateOptions.
    key: the run's key; default ``jax.random.key(options.seed)``.
    execution: how each step runs on devices (:mod:`wmdd_jax.distributed`; default: one
      device). Sharded: each step's batch split over the mesh by XLA (with several processes
      every process calls this with the same arguments). Work units: student BN statistics per
      unit, and the run is bit-identical for any device count.
    writer: if set, the ``student/*`` scalars of :mod:`wmdd_jax.tracking` are written there
      (step: the epoch): the train loss every epoch, test top-1/top-5 at evaluations; from the
      values the loop already brings to the host.

  Returns:
    A StudentResult.

  Raises:
    ShapeError: malformed images/weights, or teacher and student with different class counts.
    DataError: unusable weights.
    NonFiniteError: the KD loss became NaN/Inf.
  """
  execution = execution or Execution()
  images, weights = _check_inputs(images, weights)
  n = images.shape[0]
  image_shape = tuple(images.shape[1:])
  key = jax.random.key(options.seed) if key is None else key
  init_key, shuffle_key, views_key = stream_keys(key)
  # On device once: the step takes the teacher's variables as an argument (not baked into the
  # compiled step as constants), so host arrays would otherwise be copied on every step.
  teacher_variables = jax.device_put({k: teacher_variables[k] for k in ("params", "batch_stats")
                                      if k in teacher_variables})

  probe = jax.ShapeDtypeStruct((1, *image_shape), jnp.float32)
  t_shape = jax.eval_shape(lambda v, x: teacher_model.apply(v, x, train=False)[0],
                           teacher_variables, probe).shape
  variables = init_model(student_model, init_key, image_shape)
  s_shape = jax.eval_shape(lambda v, x: student_model.apply(v, x, train=False)[0],
                           variables, probe).shape
  if t_shape != s_shape:
    raise ShapeError(f"The teacher outputs {t_shape[-1]} classes but the student "
                     f"{s_shape[-1]}; build the student with num_classes={t_shape[-1]}.")

  steps_per_epoch = len(epoch_batches(shuffle_key, 0, n, options.batch_size))
  state = training.create_train_state(student_model, variables,
                                       make_optimizer(options, steps_per_epoch))
  step_fn = make_student_step(student_model, teacher_model, options, execution)
  state = execution.place(state, copy=True)  # copy: the step donates it
  teacher_variables, images, weights = execution.place((teacher_variables, images, weights))
  eval_execution = execution.local()
  eval_step = training.make_eval_step(student_model, eval_execution, mean=tuple(mean),
                                      std=tuple(std))

  history: list[EvalRecord] = []
  bar = tracking.progress(options.epochs, desc="student", unit="epoch",
                          enabled=options.progress)
  try:
    for epoch in range(options.epochs):
      loss_sum = jnp.zeros((), jnp.float32)
      batches = epoch_batches(shuffle_key, epoch, n, options.batch_size)
      for step, idx in enumerate(batches):
        state, loss = step_fn(state, (teacher_variables,),
                              (images, weights, idx, views_key, np.int32(epoch), np.int32(step)),
                              views_key, np.int32(step))
        loss_sum = loss_sum + loss
      # One host sync per epoch: the step is asynchronous otherwise.
      train_loss = float(loss_sum) / len(batches)
      if not math.isfinite(train_loss):
        raise NonFiniteError(f"The student's KD loss became {train_loss} in epoch {epoch + 1}; "
                             "lower EvaluateOptions.lr, or check the synthetic images and the "
                             "teacher for NaN/Inf.")
      postfix = {"loss": train_loss}
      scalars = {"student/train_loss": train_loss}
      if test_data is not None and ((epoch + 1) % options.eval_every == 0
                                    or epoch + 1 == options.epochs):
        # A host copy: the evaluation runs on this process's devices only.
        current = execution.to_host({"params": state.params, "batch_stats": state.batch_stats})
        result = training.evaluate(
            student_model, current,
            test_data, mean=tuple(mean), std=tuple(std), batch_size=options.eval_batch_size,
            eval_step=eval_step, execution=eval_execution)
        history.append(EvalRecord(epoch + 1, result["top1"], result["top5"], train_loss))
        postfix["top1"] = result["top1"]
        scalars.update({"student/test_top1": result["top1"], "student/test_top5": result["top5"]})
        bar.log(tracking.metrics_line(
            f"student epoch {epoch + 1}/{options.epochs}",
            {"train_loss": train_loss, "test_top1": result["top1"], "test_top5": result["top5"]}))
      if writer is not None:
        writer.write_scalars(epoch + 1, scalars)
      bar.set_postfix(**postfix)
      bar.update(1)
  finally:
    bar.close()

  final = history[-1] if history else EvalRecord(options.epochs, math.nan, math.nan, math.nan)
  best1 = max((r.top1 for r in history), default=math.nan)
  best5 = max((r.top5 for r in history), default=math.nan)
  return StudentResult(top1=final.top1, top5=final.top5, best_top1=best1, best_top5=best5,
                       history=tuple(history),
                       variables=jax.device_get({"params": state.params,
                                                 "batch_stats": state.batch_stats}))
