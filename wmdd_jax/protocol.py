"""The student protocol with stored or hard labels, and a synthetic set's evaluation suite.

:func:`wmdd_jax.evaluate.train_student` computes the teacher's soft labels on the fly. This
module adds what evaluating a set without our teacher, or against baselines, needs:

* :func:`view_schedule`: the exact views ``train_student`` makes for a run key (per epoch the
  shuffled batches, and per view its RandomResizedCrop box, flip and CutMix partner and box),
  as plain arrays; :func:`apply_views` rebuilds the views from them.
* :func:`teacher_soft_labels` / :func:`save_soft_labels` / :func:`load_soft_labels`: the
  teacher's logits on every view of that schedule, stored with the schedule in one ``.npz``
  (format below), so a set can be evaluated (by us, or by a PyTorch loop that applies the same
  crops) without the teacher.
* :func:`train_on_schedule`: the student's loop over a schedule with stored soft labels (the
  same KD loss as ``train_student``, equal to it up to float round-off) or with hard labels
  (cross-entropy against the CutMix-mixed one-hot labels, the DD-Ranking-style hard-label view).
* :func:`random_real`: seeded random real images per class, the baseline under the same protocol.
* :func:`summarize`: mean and sample std over seeds.

Stored soft labels (``.npz``, format ``wmdd_jax.soft_labels/1``), for E epochs of a set of N
images (flat, class-major: image ``c * k + j``) in batches of B (S = ceil(N / B) per epoch; row
r of an epoch belongs to batch r // B):

    meta       str    JSON: format, seed, epochs, batch_size, crop_scale, crop_ratio, cutmix,
                      cutmix_alpha, temperature, num_images, num_classes, image_shape, mean, std
    index      i32[E, N]     the image shown (outside any CutMix box) at each row
    crop       i32[E, N, 4]  its RandomResizedCrop box (y0, x0, h, w), resized back to H x W
                             (torchvision ``resized_crop(img, y0, x0, h, w, (H, W),
                             antialias=True)``)
    flip       bool[E, N]    then mirrored left-right
    partner    i32[E, N]     the row (same epoch) whose view fills the CutMix box (itself
                             without CutMix)
    mix_box    i32[E, S, 4]  the batch's CutMix box (y0, x0, y1, x1), half-open
    mix_lam    f32[E, S]     the fraction of each view outside the box
    logits     f16[E, N, C]  the teacher's logits (eval mode) on the finished view

The student's KD loss per batch is ``sum_i KL(softmax(t_i / T) || softmax(s_i / T)) * w_i /
mean(w) / B`` with ``w`` the (mixed) barycenter weights, T from the meta.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import statistics as pystats
import time
import zlib
from collections.abc import Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from wmdd_jax import training
from wmdd_jax.data import transforms
from wmdd_jax.errors import CheckpointError, ConfigError, NonFiniteError, ShapeError
from wmdd_jax.evaluate import (
    EvalRecord,
    EvaluateOptions,
    StudentResult,
    make_optimizer,
    train_student,
)
from wmdd_jax.models import init_model
from wmdd_jax.relabel import (
  _kl,
  _weight_scale,
  batch_key,
  cutmix,
  epoch_batches,
  soft_labels,
  stream_keys,
)

SOFT_LABELS_FORMAT = "wmdd_jax.soft_labels/1"
LABEL_MODES = ("soft", "hard")


class ViewSchedule(NamedTuple):
  """Every view of one student run (see the module docstring for the fields)."""

  index: np.ndarray
  crop: np.ndarray
  flip: np.ndarray
  partner: np.ndarray
  mix_box: np.ndarray
  mix_lam: np.ndarray
  batch_size: int

  @property
  def epochs(self) -> int:
    return int(self.index.shape[0])

  def batch(self, epoch: int, step: int) -> dict[str, np.ndarray]:
    """Batch ``step`` of ``epoch``: index, crop, flip, perm (within the batch), box, lam."""
    n = self.index.shape[1]
    start, stop = step * self.batch_size, min((step + 1) * self.batch_size, n)
    return {"index": self.index[epoch, start:stop], "crop": self.crop[epoch, start:stop],
            "flip": self.flip[epoch, start:stop],
            "perm": self.partner[epoch, start:stop] - start,
            "box": self.mix_box[epoch, step], "lam": self.mix_lam[epoch, step]}


def _steps(num_images: int, batch_size: int) -> int:
  return math.ceil(num_images / min(batch_size, num_images))


@functools.lru_cache(maxsize=8)
def _batch_draws(b: int, hw: tuple[int, int], scale, ratio, use_cutmix: bool, alpha: float):
  """Jitted: a batch key -> (crop boxes i32[b, 4], flips bool[b], perm, box, lam), drawn with
  the very keys and calls of :func:`wmdd_jax.relabel.make_views`."""

  def draw(key):
    k_crop, k_flip, k_mix = jax.random.split(key, 3)
    boxes = jax.vmap(lambda k: transforms.sample_crop_box(k, hw, scale, ratio))(
        jax.random.split(k_crop, b))
    flips = jax.vmap(lambda k: jax.random.bernoulli(k, 0.5))(jax.random.split(k_flip, b))
    if not use_cutmix:
      return (boxes, flips, jnp.arange(b), jnp.zeros((4,), jnp.int32),
              jnp.ones((), jnp.float32))
    # cutmix draws its box and permutation from the key and the batch's shape only.
    _, mix = cutmix(k_mix, jnp.zeros((b, *hw, 1), jnp.float32), alpha)
    return boxes, flips, mix.perm, mix.box, mix.lam

  return jax.jit(draw)


def view_schedule(num_images: int, image_shape: Sequence[int], options: EvaluateOptions,
                  key: jax.Array) -> ViewSchedule:
  """The views :func:`wmdd_jax.evaluate.train_student` makes with run key ``key``.

  Args:
    num_images: N, the set's size.
    image_shape: (H, W, ch).
    options: the protocol (epochs, batch_size, crop_scale, crop_ratio, cutmix, cutmix_alpha).
    key: the student run's key (``train_student``'s ``key``; default there
      ``jax.random.key(options.seed)``).

  Returns:
    A ViewSchedule of ``options.epochs`` epochs.
  """
  _, shuffle_key, views_key = stream_keys(key)
  hw = (int(image_shape[0]), int(image_shape[1]))
  epochs, steps = options.epochs, _steps(num_images, options.batch_size)
  index = np.zeros((epochs, num_images), np.int32)
  crop = np.zeros((epochs, num_images, 4), np.int32)
  flip = np.zeros((epochs, num_images), bool)
  partner = np.zeros((epochs, num_images), np.int32)
  mix_box = np.zeros((epochs, steps, 4), np.int32)
  mix_lam = np.zeros((epochs, steps), np.float32)
  start = 0
  for epoch in range(epochs):
    start = 0
    for step, idx in enumerate(epoch_batches(shuffle_key, epoch, num_images, options.batch_size)):
      b = len(idx)
      draw = _batch_draws(b, hw, tuple(options.crop_scale), tuple(options.crop_ratio),
                          bool(options.cutmix), float(options.cutmix_alpha))
      boxes, flips, perm, box, lam = jax.device_get(draw(batch_key(views_key, epoch, step)))
      rows = slice(start, start + b)
      index[epoch, rows], crop[epoch, rows], flip[epoch, rows] = idx, boxes, flips
      partner[epoch, rows] = np.asarray(perm) + start
      mix_box[epoch, step], mix_lam[epoch, step] = box, lam
      start += b
  return ViewSchedule(index, crop, flip, partner, mix_box, mix_lam, min(options.batch_size,
                                                                        num_images))


def apply_views(images: jax.Array, crop: jax.Array, flip: jax.Array, perm: jax.Array,
                box: jax.Array) -> jax.Array:
  """One batch's views from its schedule (jittable).

  Args:
    images: f32[b, H, W, ch], the batch's images (``images_all[index]``), normalised.
    crop: i32[b, 4] (y0, x0, h, w) per image.
    flip: bool[b].
    perm: i32[b] CutMix partners within the batch (``arange`` without CutMix).
    box: i32[4] (y0, x0, y1, x1), the batch's CutMix box (all zeros: none).

  Returns:
    f32[b, H, W, ch], equal to :func:`wmdd_jax.relabel.make_views` for the same draws.
  """
  h, w = images.shape[1:3]
  views = jax.vmap(lambda x, c: transforms.crop_and_resize(x, c, (h, w)))(images, crop)
  views = jnp.where(flip[:, None, None, None], views[:, :, ::-1], views)
  rows, cols = jnp.arange(h), jnp.arange(w)
  inside = (((rows >= box[0]) & (rows < box[2]))[:, None]
            & ((cols >= box[1]) & (cols < box[3]))[None, :])
  return jnp.where(inside[None, :, :, None], views[perm], views)


_apply_views = jax.jit(apply_views)


@functools.lru_cache(maxsize=8)
def _teacher_fn(teacher_model: nn.Module):
  return jax.jit(lambda v, views: soft_labels(teacher_model, v, views))


class SoftLabels(NamedTuple):
  """A view schedule with the teacher's logits on each view (f32[E, N, C]) and its meta."""

  schedule: ViewSchedule
  logits: np.ndarray
  meta: dict[str, Any]


def teacher_soft_labels(teacher_model: nn.Module, teacher_variables: dict[str, Any],
                        images: Any, options: EvaluateOptions, key: jax.Array, *,
                        mean: Sequence[float] = (0.0,), std: Sequence[float] = (1.0,),
                        seed: int | None = None) -> SoftLabels:
  """The teacher's logits on every view of the run with key ``key``.

  Args:
    teacher_model, teacher_variables: the teacher (eval mode).
    images: f32[N, H, W, ch] (or [C, k, H, W, ch]) normalised synthetic images.
    options: the protocol (its ``temperature`` is recorded for the student).
    key: the student run's key.
    mean, std: the normalisation of ``images`` (recorded in the meta, for other readers).
    seed: recorded in the meta (the seed ``key`` was made from), if known.

  Returns:
    SoftLabels (logits in float32; stored as float16 by :func:`save_soft_labels`).
  """
  x = np.asarray(images, np.float32)
  x = x.reshape(-1, *x.shape[-3:])
  n = x.shape[0]
  schedule = view_schedule(n, x.shape[1:], options, key)
  variables = jax.device_put({k: teacher_variables[k] for k in ("params", "batch_stats")})
  images_dev = jnp.asarray(x)
  teacher = _teacher_fn(teacher_model)
  logits = None
  for epoch in range(schedule.epochs):
    for step in range(_steps(n, options.batch_size)):
      b = schedule.batch(epoch, step)
      views = _apply_views(images_dev[b["index"]], b["crop"], b["flip"], b["perm"], b["box"])
      out = np.asarray(teacher(variables, views))
      if logits is None:
        logits = np.zeros((schedule.epochs, n, out.shape[-1]), np.float32)
      start = step * schedule.batch_size
      logits[epoch, start:start + len(out)] = out
  meta = {"format": SOFT_LABELS_FORMAT, "seed": seed, "epochs": options.epochs,
          "batch_size": options.batch_size, "crop_scale": list(options.crop_scale),
          "crop_ratio": list(options.crop_ratio), "cutmix": bool(options.cutmix),
          "cutmix_alpha": float(options.cutmix_alpha),
          "temperature": float(options.temperature), "num_images": n,
          "num_classes": int(logits.shape[-1]), "image_shape": list(x.shape[1:]),
          "mean": [float(v) for v in mean], "std": [float(v) for v in std]}
  return SoftLabels(schedule, logits, meta)


def save_soft_labels(path: str | os.PathLike, labels: SoftLabels) -> str:
  """Writes SoftLabels as one ``.npz`` (module docstring); logits as float16. Returns the path."""
  path = os.fspath(path)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  s = labels.schedule
  tmp = f"{path}.tmp-{os.getpid()}.npz"
  np.savez_compressed(tmp, meta=np.asarray(json.dumps(labels.meta)), index=s.index, crop=s.crop,
                      flip=s.flip, partner=s.partner, mix_box=s.mix_box, mix_lam=s.mix_lam,
                      logits=labels.logits.astype(np.float16))
  os.replace(tmp, path)
  return path


def load_soft_labels(path: str | os.PathLike) -> SoftLabels:
  """Reads a file written by :func:`save_soft_labels`.

  Raises:
    CheckpointError: missing, unreadable, or not this format.
  """
  path = os.fspath(path)
  try:
    with np.load(path) as f:
      meta = json.loads(str(f["meta"]))
      arrays = {k: f[k] for k in ("index", "crop", "flip", "partner", "mix_box", "mix_lam",
                                  "logits")}
  except (OSError, KeyError, ValueError) as e:
    raise CheckpointError(f"Cannot read soft labels from {path} ({type(e).__name__}: {e}); "
                          "write them with experiments/evaluate.py --config.store_soft_labels=DIR"
                          " (or protocol.save_soft_labels).") from e
  if meta.get("format") != SOFT_LABELS_FORMAT:
    raise CheckpointError(f"{path} has format {meta.get('format')!r}, not "
                          f"{SOFT_LABELS_FORMAT!r}; regenerate it with this version.")
  schedule = ViewSchedule(arrays["index"], arrays["crop"], arrays["flip"], arrays["partner"],
                          arrays["mix_box"], arrays["mix_lam"],
                          min(int(meta["batch_size"]), int(meta["num_images"])))
  return SoftLabels(schedule, arrays["logits"].astype(np.float32), meta)


def options_from_soft_labels(labels: SoftLabels, options: EvaluateOptions) -> EvaluateOptions:
  """``options`` with the protocol fields the stored schedule fixes (epochs, batch size, crops,
  CutMix, temperature) taken from it."""
  m = labels.meta
  return dataclasses.replace(options, epochs=int(m["epochs"]), batch_size=int(m["batch_size"]),
                             crop_scale=tuple(m["crop_scale"]),
                             crop_ratio=tuple(m["crop_ratio"]), cutmix=bool(m["cutmix"]),
                             cutmix_alpha=float(m["cutmix_alpha"]),
                             temperature=float(m["temperature"]))


# ---------------------------------------------------------------------------------------------
# The student on a schedule.


@functools.lru_cache(maxsize=16)
def _optimizer(options: EvaluateOptions, steps_per_epoch: int):
  # One object per protocol: the optimizer is a static field of the TrainState, so a fresh one
  # per run would make the jitted step retrace and recompile every run.
  return make_optimizer(options, steps_per_epoch)


@functools.lru_cache(maxsize=16)
def _schedule_step(student_model: nn.Module, mode: str, temperature: float):
  """Jitted ``(state, images, weights, labels, batch, targets) -> (state, loss)``."""

  def step(state, images, weights, labels, batch, targets):
    idx = batch["index"]
    views = apply_views(images[idx], batch["crop"], batch["flip"], batch["perm"], batch["box"])
    lam, perm = batch["lam"], batch["perm"]
    b = idx.shape[0]

    def loss_fn(params):
      (logits, _), updates = student_model.apply(
          {"params": params, "batch_stats": state.batch_stats}, views, train=True,
          mutable=["batch_stats"])
      if mode == "soft":
        w = weights[idx]
        scale = _weight_scale(lam * w + (1.0 - lam) * w[perm])
        loss = jnp.sum(_kl(logits, targets, temperature) * scale) / b
      else:  # hard: the CutMix-mixed one-hot labels, uniform weights
        y = jax.nn.one_hot(labels[idx], logits.shape[-1])
        target = lam * y + (1.0 - lam) * y[perm]
        log_q = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
        loss = -jnp.sum(target * log_q) / b
      return loss, updates["batch_stats"]

    (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    return state.apply_gradients(grads=grads, batch_stats=stats), loss

  return jax.jit(step, donate_argnums=(0,))


def train_on_schedule(
    student_model: nn.Module,
    images: Any,
    schedule: ViewSchedule,
    test_data: training.BatchSource | None,
    *,
    mode: str,
    soft_logits: np.ndarray | None = None,
    labels: Any = None,
    weights: Any = None,
    mean: Sequence[float] = (0.0,),
    std: Sequence[float] = (1.0,),
    options: EvaluateOptions | None = None,
    key: jax.Array | None = None,
) -> StudentResult:
  """Trains a student from scratch over a fixed view schedule (one device).

  ``mode="soft"``: the stored teacher logits ``soft_logits`` f32[E, N, C] and ``train_student``'s
  weighted KD loss (with the same ``key`` and options the result equals ``train_student``'s up to
  round-off). ``mode="hard"``: ``labels`` i[N] and cross-entropy against the CutMix-mixed
  one-hot labels (no teacher, uniform weights).

  Args:
    student_model: the student (a registered model or :func:`wmdd_jax.models.adapt`).
    images: f32[N, H, W, ch] (or [C, k, H, W, ch]) normalised images, in the schedule's order.
    schedule: the views (:func:`view_schedule`, or a loaded :class:`SoftLabels`' schedule).
    test_data: as ``train_student``'s (None: no evaluation).
    mode: "soft" or "hard".
    soft_logits: with "soft".
    labels: with "hard".
    weights: f32[N] sample weights for "soft" (None: uniform; ignored by "hard").
    mean, std: the test images' normalisation (pixel scale).
    options: epochs, lr, weight_decay, temperature, eval_every, eval_batch_size (the crops,
      CutMix and batch size are the schedule's); None: the defaults.
    key: the run key (its init stream initialises the student, as in ``train_student``);
      default ``jax.random.key(options.seed)``.

  Returns:
    A StudentResult.
  """
  if mode not in LABEL_MODES:
    raise ConfigError(f"mode={mode!r} must be one of {LABEL_MODES}.")
  options = options or EvaluateOptions()
  x = np.asarray(images, np.float32)
  x = x.reshape(-1, *x.shape[-3:])
  n = x.shape[0]
  if schedule.index.shape[1] != n:
    raise ShapeError(f"The schedule covers {schedule.index.shape[1]} images but the set holds "
                     f"{n}; use the soft labels made for this set.")
  epochs = min(options.epochs, schedule.epochs)
  if mode == "soft":
    if soft_logits is None or soft_logits.shape[:2] != schedule.index.shape:
      raise ShapeError("mode='soft' needs soft_logits f32[E, N, C] matching the schedule.")
    w = np.ones(n, np.float32) if weights is None else np.asarray(weights, np.float32).reshape(-1)
    y = np.zeros(n, np.int32)
  else:
    if labels is None:
      raise ShapeError("mode='hard' needs labels i[N].")
    y = np.asarray(labels, np.int32).reshape(-1)
    w = np.ones(n, np.float32)
  key = jax.random.key(options.seed) if key is None else key
  init_key, _, _ = stream_keys(key)
  steps = _steps(n, schedule.batch_size)
  variables = init_model(student_model, init_key, tuple(x.shape[1:]))
  state = training.create_train_state(student_model, variables, _optimizer(options, steps))
  step_fn = _schedule_step(student_model, mode, float(options.temperature))
  images_dev, w_dev, y_dev = jnp.asarray(x), jnp.asarray(w), jnp.asarray(y)
  state = jax.tree.map(lambda a: a.copy() if isinstance(a, jax.Array) else a, state)
  history: list[EvalRecord] = []
  for epoch in range(epochs):
    loss_sum = jnp.zeros((), jnp.float32)
    for step in range(steps):
      batch = schedule.batch(epoch, step)
      start = step * schedule.batch_size
      targets = (jnp.asarray(soft_logits[epoch, start:start + len(batch["index"])], jnp.float32)
                 if mode == "soft" else jnp.zeros((), jnp.float32))
      state, loss = step_fn(state, images_dev, w_dev, y_dev, batch, targets)
      loss_sum = loss_sum + loss
    train_loss = float(loss_sum) / steps
    if not math.isfinite(train_loss):
      raise NonFiniteError(f"The student's loss became {train_loss} in epoch {epoch + 1}; lower "
                           "the lr or check the images and labels for NaN/Inf.")
    if test_data is not None and ((epoch + 1) % options.eval_every == 0 or epoch + 1 == epochs):
      result = training.evaluate(student_model, {"params": state.params,
                                                 "batch_stats": state.batch_stats},
                                 test_data, mean=tuple(mean), std=tuple(std),
                                 batch_size=options.eval_batch_size)
      history.append(EvalRecord(epoch + 1, result["top1"], result["top5"], train_loss))
  final = history[-1] if history else EvalRecord(epochs, math.nan, math.nan, math.nan)
  return StudentResult(top1=final.top1, top5=final.top5,
                       best_top1=max((r.top1 for r in history), default=math.nan),
                       best_top5=max((r.top5 for r in history), default=math.nan),
                       history=tuple(history),
                       variables=jax.device_get({"params": state.params,
                                                 "batch_stats": state.batch_stats}))


# ---------------------------------------------------------------------------------------------
# Baseline and summary.


def random_real(dataset: Any, split: str, counts: Sequence[int], seed: int
                ) -> tuple[np.ndarray, np.ndarray]:
  """``counts[c]`` seeded random real images of each class c, normalised.

  Args:
    dataset: an open :class:`wmdd_jax.data.Dataset`.
    split: the split to draw from (the train split).
    counts: images per class (the synthetic set's).
    seed: the draw's seed.

  Returns:
    (f32[sum(counts), H, W, ch] normalised images, class-major; i32 labels).

  Raises:
    ConfigError: a class with fewer images than asked for.
  """
  rng = np.random.default_rng(seed)
  labels = dataset.labels(split)
  mean, std = np.asarray(dataset.mean, np.float32), np.asarray(dataset.std, np.float32)
  out, ys = [], []
  for c, k in enumerate(counts):
    have = int(np.sum(labels == c))
    if have < k:
      raise ConfigError(f"class {c} ({dataset.class_names[c]}) has {have} {split} images, fewer "
                        f"than the {k} the synthetic set holds; skip the random baseline.")
    if k == 0:
      continue
    chosen = np.sort(rng.choice(have, k, replace=False))
    pixels = np.concatenate(list(dataset.iter_class(split, c, 1024)))[chosen]
    out.append((pixels.astype(np.float32) / 255.0 - mean) / std)
    ys.append(np.full(k, c, np.int32))
  return np.concatenate(out), np.concatenate(ys)


def summarize(values: Sequence[float]) -> dict[str, Any]:
  """{"mean", "std" (sample std; None for one value), "n", "values"}."""
  vals = [float(v) for v in values]
  return {"mean": pystats.fmean(vals) if vals else None,
          "std": pystats.stdev(vals) if len(vals) > 1 else None,
          "n": len(vals), "values": vals}


def format_cell(cell: dict[str, Any] | None) -> str:
  """``"88.4 +- 1.2"`` (or the single value, or "-")."""
  if not cell or cell.get("mean") is None:
    return "-"
  if cell.get("std") is None:
    return f"{cell['mean']:.1f}"
  return f"{cell['mean']:.1f} +- {cell['std']:.1f}"


# ---------------------------------------------------------------------------------------------
# The suite: students x seeds x label modes, on the set and on random real images.


def student_key(seed: int) -> jax.Array:
  """The student run key of ``seed``: the pipeline's (``stage_key(key(seed), "student")``), so
  seed s reproduces the evaluation of a pipeline run with ``config.seed=s``."""
  return jax.random.fold_in(jax.random.key(seed), zlib.crc32(b"student") & 0x7FFFFFFF)


def evaluate_set(
    images: Any,
    labels: Any,
    weights: Any,
    test_data: training.BatchSource,
    *,
    students: Sequence[tuple[str, nn.Module]],
    seeds: Sequence[int],
    label_modes: Sequence[str] = LABEL_MODES,
    teacher: tuple[nn.Module, dict[str, Any]] | None = None,
    soft_labels: dict[int, SoftLabels] | None = None,
    random_images: Any = None,
    mean: Sequence[float] = (0.0,),
    std: Sequence[float] = (1.0,),
    options: EvaluateOptions | None = None,
    log: Any = print,
) -> dict[str, Any]:
  """Trains every student with every seed and label mode on the set (and on random real images).

  Soft labels come from ``soft_labels[seed]`` (stored: :func:`train_on_schedule`) when given,
  else from ``teacher`` on the fly (:func:`wmdd_jax.evaluate.train_student`). Hard labels use
  the same views (:func:`view_schedule` of the same key) with mixed one-hot targets. Each run's
  key is :func:`student_key` of its seed.

  Args:
    images: f32[N, H, W, ch] normalised set images (flat, class-major).
    labels: i[N] their classes.
    weights: f32[N] barycenter weights (None: uniform).
    test_data: the real test split (as ``train_student`` takes it).
    students: (name, model) pairs.
    seeds: student seeds.
    label_modes: any of "soft", "hard".
    teacher: (model, variables), for on-the-fly soft labels.
    soft_labels: seed -> stored SoftLabels of the set.
    random_images: None, or a callable ``seed -> (f32[N', ...] images, i[N'] labels)``: the
      random-real baseline, trained under the same protocol (soft labels from ``teacher``).
    mean, std: the test images' normalisation.
    options: the protocol (EvaluateOptions; its seed is ignored).
    log: a print-like function for progress lines.

  Returns:
    {"runs": [one dict per run: source ("set"/"random"), student, seed, labels, top1, top5,
    best_top1, seconds], "summary": {student: {"<source>/<labels>": summarize(top1 over seeds),
    "gain/<labels>": summarize(set - random, paired by seed)}}}.
  """
  options = options or EvaluateOptions()
  for mode in label_modes:
    if mode not in LABEL_MODES:
      raise ConfigError(f"label mode {mode!r} is not one of {LABEL_MODES}.")
  if "soft" in label_modes and teacher is None and not soft_labels:
    raise ConfigError("Soft labels need a teacher or stored soft labels; pass one, or evaluate "
                      "with hard labels only.")
  x = np.asarray(images, np.float32)
  x = x.reshape(-1, *x.shape[-3:])
  y = np.asarray(labels, np.int32).reshape(-1)
  runs: list[dict[str, Any]] = []
  sources = [("set", lambda seed: (x, y, weights))]
  if random_images is not None:
    sources.append(("random", lambda seed: (*random_images(seed), None)))
  for source, get in sources:
    for seed in seeds:
      imgs, labs, w = get(seed)
      key = student_key(seed)
      for name, model in students:
        for mode in label_modes:
          start = time.perf_counter()
          stored = (soft_labels or {}).get(seed) if source == "set" else None
          if mode == "soft" and stored is not None:
            run_options = options_from_soft_labels(stored, options)
            result = train_on_schedule(model, imgs, stored.schedule, test_data, mode="soft",
                                       soft_logits=stored.logits, weights=w, mean=mean, std=std,
                                       options=run_options, key=key)
            how = "stored soft labels"
          elif mode == "soft":
            if teacher is None:
              log(f"  {source} {name} seed {seed} soft: skipped (no teacher)")
              continue
            result = train_student(model, teacher[0], teacher[1], imgs, w, test_data,
                                   mean=mean, std=std,
                                   options=dataclasses.replace(options, progress=False), key=key)
            how = "teacher soft labels"
          else:
            schedule = view_schedule(len(labs), imgs.shape[-3:], options, key)
            result = train_on_schedule(model, imgs, schedule, test_data, mode="hard",
                                       labels=labs, mean=mean, std=std, options=options, key=key)
            how = "hard labels"
          seconds = time.perf_counter() - start
          runs.append({"source": source, "student": name, "seed": int(seed), "labels": mode,
                       "how": how, "top1": result.top1, "top5": result.top5,
                       "best_top1": result.best_top1, "seconds": round(seconds, 2)})
          log(f"  {source:<6} {name:<28} seed {seed} {mode}: top-1 {result.top1:.2f}% "
              f"({seconds:.0f} s)")
  summary: dict[str, Any] = {}
  for name, _ in students:
    cells: dict[str, Any] = {}
    for source, _ in sources:
      for mode in label_modes:
        vals = [r["top1"] for r in runs if (r["student"], r["source"], r["labels"]) ==
                (name, source, mode)]
        if vals:
          cells[f"{source}/{mode}"] = summarize(vals)
    for mode in label_modes:
      by_seed = {r["seed"]: r["top1"] for r in runs
                 if (r["student"], r["source"], r["labels"]) == (name, "random", mode)}
      diffs = [r["top1"] - by_seed[r["seed"]] for r in runs
               if (r["student"], r["source"], r["labels"]) == (name, "set", mode)
               and r["seed"] in by_seed]
      if diffs:
        cells[f"gain/{mode}"] = summarize(diffs)
    summary[name] = cells
  return {"runs": runs, "summary": summary}


def markdown_table(result: dict[str, Any], label_modes: Sequence[str] = LABEL_MODES) -> str:
  """The summary of :func:`evaluate_set` as a markdown table (mean +- sample std over seeds)."""
  cols = [f"set/{m}" for m in label_modes] + [f"random/{m}" for m in label_modes] + \
      [f"gain/{m}" for m in label_modes]
  # Only the columns some student has (no random columns without the baseline).
  cols = [c for c in cols if any(c in cells for cells in result["summary"].values())]
  titles = {"set": "set", "random": "random real", "gain": "gain over random"}
  head = "| student | " + " | ".join(f"{titles[c.split('/')[0]]}, {c.split('/')[1]} labels"
                                      for c in cols) + " |"
  lines = [head, "|---|" + "---:|" * len(cols)]
  for name, cells in result["summary"].items():
    row = []
    for c in cols:
      cell = cells.get(c)
      text = format_cell(cell)
      if c.startswith("gain/") and cell and cell.get("mean") is not None:
        text = ("+" if cell["mean"] >= 0 else "") + text
      row.append(text)
    lines.append(f"| {name} | " + " | ".join(row) + " |")
  return "\n".join(lines)
