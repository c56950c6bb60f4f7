"""Stage 5 (relabel + evaluate): train a student on the synthetic set with teacher soft labels.

The paper's protocol (DESIGN section 1, "Relabel + evaluate"), as pure jitted pieces plus a loop:

* :func:`make_views`: per-image RandomResizedCrop(scale 0.08-1, ratio 3/4-4/3) back to H x W and
  a horizontal flip (``jax.vmap`` over images), then CutMix: lambda ~ Beta(1, 1), ONE box for the
  whole batch, a random permutation. It returns a :class:`CutMix` record (permutation, box, and
  ``lam`` recomputed from the clipped box, i.e. the exact fraction of each view that is its own
  image), which is all that is needed to mix per-image quantities the same way.
* :func:`soft_labels`: the teacher's logits (eval mode) on exactly those views.
* :func:`kd_loss`: KL(softmax(t / T) || softmax(s / T)) summed over classes, times each sample's
  weight divided by the batch-mean weight, averaged over the batch; no T^2 factor.
* :func:`train_student`: the loop. AdamW (no decay on BN scale/bias and biases), cosine over
  epochs, student in train mode, periodic evaluation on the real test split.

Sample weights. Each synthetic image carries the weight of its barycenter support point
(``SyntheticSet`` stores f32[C, k]). A CutMix view i shows image i outside the box (a fraction
``lam`` of its pixels) and image perm[i] inside it, so its weight is the same area-weighted mix
as its content: ``lam * w[i] + (1 - lam) * w[perm[i]]`` (:func:`mix_weights`). Because perm is a
permutation, the batch mean of the mixed weights equals the batch mean of the original ones, so
the normalisation in :func:`kd_loss` is unaffected by mixing.

Randomness. ``key`` (default ``jax.random.key(options.seed)``) is split by name with ``fold_in``
into three streams (:func:`stream_keys`): student initialisation, the per-epoch shuffle
(``fold_in(shuffle_key, epoch)``) and the views, whose key for batch ``step`` of ``epoch`` is
``fold_in(fold_in(views_key, epoch), step)`` (:func:`batch_key`). Views and soft labels are thus a
pure function of (key, epoch, step) and are recomputed on the fly: nothing is stored, and a run
is reproducible from its key alone.

Several devices (``mesh=``, see :mod:`wmdd_jax.parallel`): each step's batch is split over the
mesh after it is gathered from the (replicated) synthetic set; student, teacher and optimiser
state are replicated, and XLA turns the student's train-mode BN statistics and the gradient into
cross-device reductions over the global batch, so one epoch equals the single-device epoch up to
round-off. The evaluation reuses :func:`wmdd_jax.train.evaluate`, data-parallel over each
process's local devices.

Not implemented: caching soft labels (they are cheap to recompute next to the student's step).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from collections.abc import Callable
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh
from tqdm.auto import tqdm

from wmdd_jax import parallel
from wmdd_jax import train as train_lib
from wmdd_jax import units as units_lib
from wmdd_jax.data import transforms
from wmdd_jax.errors import ConfigError, DataError, NonFiniteError, ShapeError
from wmdd_jax.models import init_model
from wmdd_jax.models.base import apply_model

# fold_in constants that name the independent random streams of train_student.
_INIT_STREAM, _SHUFFLE_STREAM, _VIEWS_STREAM = 0, 1, 2


@dataclasses.dataclass(frozen=True)
class StudentOptions:
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
    progress: show a tqdm bar over epochs.
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
        raise ConfigError(f"StudentOptions: {message}.")


class CutMix(NamedTuple):
  """How a batch was mixed: view i = image i outside ``box``, image ``perm[i]`` inside it.

  Attributes:
    perm: i32[B], the partner of each image (the identity when CutMix is off).
    lam: f32[], the fraction of every view that comes from its own image, computed from the
      clipped box: ``1 - (y1 - y0) * (x1 - x0) / (H * W)``.
    box: i32[4], (y0, x0, y1, x1), half-open pixel bounds shared by the whole batch.
  """

  perm: jax.Array
  lam: jax.Array
  box: jax.Array


class RelabeledBatch(NamedTuple):
  """One training batch of the student.

  Attributes:
    views: f32[B, H, W, ch], the cropped, flipped and mixed images (normalised).
    teacher_logits: f32[B, C], the soft labels (teacher logits, eval mode, on ``views``).
    weights: f32[B], each view's mixed sample weight.
  """

  views: jax.Array
  teacher_logits: jax.Array
  weights: jax.Array


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
# Views.


def cutmix(key: jax.Array, images: jax.Array, alpha: float = 1.0) -> tuple[jax.Array, CutMix]:
  """CutMix with one box for the whole batch (Yun et al. 2019, the SRe2L/WMDD ``rand_bbox``).

  The box has sides ``2 * (int(side * sqrt(1 - lam0)) // 2)`` centred on a uniform pixel and is
  clipped to the image, so the returned ``lam`` (the actual area ratio) is >= the drawn one.

  Args:
    key: PRNG key.
    images: f32[B, H, W, ch].
    alpha: lam0 ~ Beta(alpha, alpha).

  Returns:
    (mixed f32[B, H, W, ch], CutMix).
  """
  b, h, w, _ = images.shape
  k_lam, k_perm, k_y, k_x = jax.random.split(key, 4)
  # Beta(1, 1) is U(0, 1); drawing it directly skips the gamma sampler's rejection loop, which
  # is slow to compile.
  lam0 = (jax.random.uniform(k_lam) if alpha == 1.0
          else jax.random.beta(k_lam, alpha, alpha))
  perm = jax.random.permutation(k_perm, b)
  cut = jnp.sqrt(1.0 - lam0)
  half_h = (h * cut).astype(jnp.int32) // 2
  half_w = (w * cut).astype(jnp.int32) // 2
  cy = jax.random.randint(k_y, (), 0, h)
  cx = jax.random.randint(k_x, (), 0, w)
  y0, y1 = jnp.clip(cy - half_h, 0, h), jnp.clip(cy + half_h, 0, h)
  x0, x1 = jnp.clip(cx - half_w, 0, w), jnp.clip(cx + half_w, 0, w)
  rows, cols = jnp.arange(h), jnp.arange(w)
  inside = (((rows >= y0) & (rows < y1))[:, None] & ((cols >= x0) & (cols < x1))[None, :])
  mixed = jnp.where(inside[None, :, :, None], images[perm], images)
  lam = 1.0 - ((y1 - y0) * (x1 - x0)).astype(jnp.float32) / (h * w)
  return mixed, CutMix(perm=perm, lam=lam, box=jnp.stack([y0, x0, y1, x1]).astype(jnp.int32))


def make_views(
    key: jax.Array,
    images: jax.Array,
    *,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0),
    use_cutmix: bool = True,
    alpha: float = 1.0,
) -> tuple[jax.Array, CutMix]:
  """Per-image RandomResizedCrop + horizontal flip, then CutMix (one box per batch).

  Jittable; deterministic in ``key``.

  Args:
    key: PRNG key for the batch.
    images: f32[B, H, W, ch], normalised.
    scale: crop area fraction range.
    ratio: crop aspect-ratio range.
    use_cutmix: False skips CutMix (the returned CutMix is the identity: perm = arange, lam = 1).
    alpha: CutMix's Beta(alpha, alpha).

  Returns:
    (views f32[B, H, W, ch], CutMix).
  """
  if images.ndim != 4:
    raise ShapeError(f"make_views takes a batch f32[B, H, W, ch], got shape {images.shape}; "
                     "add a batch axis (images[None]) or flatten [C, k, ...] to [C * k, ...].")
  b, h, w, _ = images.shape
  k_crop, k_flip, k_mix = jax.random.split(key, 3)
  crop = lambda k, x: transforms.random_resized_crop(k, x, (h, w), scale, ratio)
  views = jax.vmap(crop)(jax.random.split(k_crop, b), images)
  views = jax.vmap(transforms.random_flip)(jax.random.split(k_flip, b), views)
  if not use_cutmix:
    return views, CutMix(perm=jnp.arange(b), lam=jnp.ones((), jnp.float32),
                         box=jnp.zeros((4,), jnp.int32))
  return cutmix(k_mix, views, alpha)


def mix_weights(weights: jax.Array, mix: CutMix) -> jax.Array:
  """Area-weighted sample weights of mixed views: ``lam * w + (1 - lam) * w[perm]``.

  Args:
    weights: f32[B] per-image weights.
    mix: the batch's CutMix record.

  Returns:
    f32[B].
  """
  return mix.lam * weights + (1.0 - mix.lam) * weights[mix.perm]


# ---------------------------------------------------------------------------------------------
# Soft labels and the loss.


def stream_keys(key: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Splits a run key by name into (init_key, shuffle_key, views_key)."""
  return tuple(jax.random.fold_in(key, s) for s in (_INIT_STREAM, _SHUFFLE_STREAM, _VIEWS_STREAM))


def batch_key(views_key: jax.Array, epoch: int | jax.Array, step: int | jax.Array) -> jax.Array:
  """The views key of batch ``step`` (0-based within the epoch) of ``epoch`` (0-based)."""
  return jax.random.fold_in(jax.random.fold_in(views_key, epoch), step)


def epoch_batches(shuffle_key: jax.Array, epoch: int, num_images: int, batch_size: int
                  ) -> list[np.ndarray]:
  """The image indices of each batch of ``epoch``: a fresh permutation cut into batches.

  Args:
    shuffle_key: the run's shuffle stream.
    epoch: 0-based epoch.
    num_images: N, the size of the synthetic set.
    batch_size: images per batch (the whole set when N is smaller); the last batch may be short.

  Returns:
    A list of i32 index arrays covering every image exactly once.
  """
  order = np.asarray(jax.random.permutation(jax.random.fold_in(shuffle_key, epoch), num_images),
                     np.int32)
  size = min(batch_size, num_images)
  return [order[s:s + size] for s in range(0, num_images, size)]


def soft_labels(teacher_model: nn.Module, teacher_variables: dict[str, Any], views: jax.Array
                ) -> jax.Array:
  """The teacher's logits in eval mode (running BN statistics, nothing updated).

  Args:
    teacher_model: the teacher module.
    teacher_variables: its ``{"params", "batch_stats"}``.
    views: f32[B, H, W, ch], normalised.

  Returns:
    f32[B, C], without gradient.
  """
  out = apply_model(teacher_model, teacher_variables, views, train=False, capture_bn=False)
  return jax.lax.stop_gradient(out.logits.astype(jnp.float32))


def relabel_batch(
    teacher_model: nn.Module,
    teacher_variables: dict[str, Any],
    images: jax.Array,
    weights: jax.Array,
    key: jax.Array,
    options: StudentOptions = StudentOptions(),
) -> RelabeledBatch:
  """Views, soft labels and mixed weights of one batch; a pure function of its inputs.

  In :func:`train_student`, ``key`` is ``batch_key(views_key, epoch, step)``.

  Args:
    teacher_model: the teacher module (static under jit).
    teacher_variables: its variables.
    images: f32[B, H, W, ch] synthetic images, normalised.
    weights: f32[B] their sample weights.
    key: the batch's key.
    options: crop/CutMix options (static under jit).

  Returns:
    A RelabeledBatch.
  """
  views, mix = make_views(key, images, scale=options.crop_scale, ratio=options.crop_ratio,
                          use_cutmix=options.cutmix, alpha=options.cutmix_alpha)
  return RelabeledBatch(views=views,
                        teacher_logits=soft_labels(teacher_model, teacher_variables, views),
                        weights=mix_weights(weights, mix))


def kd_loss(
    student_logits: jax.Array,
    teacher_logits: jax.Array,
    sample_weights: jax.Array | None = None,
    temperature: float = 20.0,
) -> jax.Array:
  """Weighted KL(softmax(t / T) || softmax(s / T)), no T^2 factor.

  Args:
    student_logits: f32[B, C].
    teacher_logits: f32[B, C].
    sample_weights: f32[B] non-negative, or None for uniform. Each sample's KL is multiplied by
      ``w_i / mean(w)``, so only relative weights matter and uniform weights give the plain mean.
    temperature: T.

  Returns:
    f32[] the batch mean of the weighted per-sample KL (summed over classes).
  """
  kl = _kl(student_logits, teacher_logits, temperature)
  if sample_weights is None:
    return jnp.mean(kl)
  return jnp.mean(kl * _weight_scale(sample_weights))


def _kl(student_logits, teacher_logits, temperature):
  """Per-sample KL(softmax(t / T) || softmax(s / T)) summed over classes: f32[B]."""
  log_p = jax.nn.log_softmax(teacher_logits.astype(jnp.float32) / temperature, axis=-1)
  log_q = jax.nn.log_softmax(student_logits.astype(jnp.float32) / temperature, axis=-1)
  return jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=-1)


def _weight_scale(sample_weights):
  """``w / mean(w)`` over the batch; all zeros when every weight is 0 (not 0/0 = NaN)."""
  w = sample_weights.astype(jnp.float32)
  mean_w = jnp.mean(w)
  return jnp.where(mean_w > 0, w / jnp.where(mean_w > 0, mean_w, 1.0), 0.0)


# ---------------------------------------------------------------------------------------------
# Optimiser and step.


def _is_norm_module(name: str) -> bool:
  # "bn", "bn1", "downsample_bn", "BatchNorm_0", "LayerNorm_0"; not e.g. "subnet".
  name = name.lower()
  return "norm" in name or any(re.fullmatch(r"bn\d*", part) for part in name.split("_"))


def weight_decay_mask(params: Any) -> Any:
  """True for parameters AdamW should decay: conv/dense kernels, not BN scale/bias or biases.

  A leaf is decayed when it has >= 2 dimensions, is not named ``bias`` or ``scale``, and no
  enclosing module is a norm layer (a name with a ``bn``/``bn<digits>`` part or containing
  ``norm``). Works on arrays and on ``jax.ShapeDtypeStruct`` leaves.
  """

  def decay(path, leaf):
    names = [str(getattr(p, "key", p)) for p in path]
    return bool(getattr(leaf, "ndim", np.ndim(leaf)) >= 2
                and names[-1].lower() not in ("bias", "scale")
                and not any(_is_norm_module(n) for n in names[:-1]))

  return jax.tree_util.tree_map_with_path(decay, params)


def epoch_cosine(lr: float, epochs: int, steps_per_epoch: int) -> optax.Schedule:
  """``lr * (1 + cos(pi * epoch / epochs)) / 2``, constant within an epoch (as the official
  per-epoch LambdaLR); ``epoch`` counts from 0, so the last epoch still has a small rate."""

  def schedule(count):
    epoch = jnp.asarray(count) // steps_per_epoch
    return lr * 0.5 * (1.0 + jnp.cos(jnp.pi * epoch / epochs))

  return schedule


def make_optimizer(options: StudentOptions, steps_per_epoch: int) -> optax.GradientTransformation:
  """AdamW with the per-epoch cosine and the decay mask of :func:`weight_decay_mask`."""
  return optax.adamw(epoch_cosine(options.lr, options.epochs, steps_per_epoch),
                     b1=0.9, b2=0.999, eps=1e-8, weight_decay=options.weight_decay,
                     mask=weight_decay_mask)


def make_student_step(
    student_model: nn.Module, teacher_model: nn.Module, options: StudentOptions, *,
    mesh: Mesh | None = None,
) -> Callable[..., tuple[train_lib.TrainState, jax.Array]]:
  """Builds the jitted step ``(state, teacher_variables, images, weights, idx, views_key, epoch,
  step)``.

  ``images`` f32[N, H, W, ch] and ``weights`` f32[N] are the whole synthetic set (kept on
  device); ``idx`` i32[B] picks the batch; the views use ``batch_key(views_key, epoch, step)``.
  The step makes the views, the teacher's soft labels and one AdamW update of the student in
  train mode; ``state`` is donated. It returns ``(state, loss f32[])``.

  With a ``mesh`` every argument is replicated and the batch (``images[idx]``) is split over the
  mesh inside the step; the new state and the loss come back replicated.
  """

  def train_step(state, teacher_variables, images, weights, idx, views_key, epoch, step):
    batch_images, batch_weights = images[idx], weights[idx]
    if mesh is not None:
      # Everything downstream (views, soft labels, the student) follows the batch's split.
      split = parallel.batch_sharding(mesh)
      batch_images = jax.lax.with_sharding_constraint(batch_images, split)
      batch_weights = jax.lax.with_sharding_constraint(batch_weights, split)
    batch = relabel_batch(teacher_model, teacher_variables, batch_images, batch_weights,
                          batch_key(views_key, epoch, step), options)
    batch_weights = batch.weights if options.use_weights else None

    def loss_fn(params):
      (logits, _), updates = student_model.apply(
          {"params": params, "batch_stats": state.batch_stats}, batch.views, train=True,
          mutable=["batch_stats"])
      loss = kd_loss(logits, batch.teacher_logits, batch_weights, options.temperature)
      return loss, updates.get("batch_stats", state.batch_stats)

    (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    return state.apply_gradients(grads=grads, batch_stats=batch_stats), loss

  if mesh is None:
    return jax.jit(train_step, donate_argnums=(0,))
  rep = parallel.replicated(mesh)
  return jax.jit(train_step, donate_argnums=(0,), in_shardings=rep, out_shardings=rep)


@functools.lru_cache(maxsize=16)
def make_unit_student_step(
    student_model: nn.Module, teacher_model: nn.Module, options: StudentOptions
) -> tuple[Callable, Callable, Callable]:
  """The student step cut into deterministic work units (see :mod:`wmdd_jax.units`).

  Returns ``(views, unit, apply)``, all jitted:

  * ``views(images, weights, idx, views_key, epoch, step)`` -> (views f32[B, H, W, ch], scale
    f32[B]): the whole batch's crops, flips and CutMix (one box and permutation for the batch, as
    in :func:`make_student_step`) and each view's KD weight ``w / mean(w)`` (ones without
    ``use_weights``), made on one device;
  * ``unit(params, batch_stats, teacher_variables, views, scale, batch f32[])``: the unit's soft
    labels, its share of the batch-mean weighted KD loss (its sum / ``batch``), the gradient and
    its BN statistics update weighted by its share of the batch;
  * ``apply(state, outs)``: the units' outputs summed in unit order, one AdamW update (state
    donated); returns ``(state, loss f32[])``.
  """

  def views(images, weights, idx, views_key, epoch, step):
    batch_views, mix = make_views(batch_key(views_key, epoch, step), images[idx],
                                  scale=options.crop_scale, ratio=options.crop_ratio,
                                  use_cutmix=options.cutmix, alpha=options.cutmix_alpha)
    if options.use_weights:
      scale = _weight_scale(mix_weights(weights[idx], mix))
    else:
      scale = jnp.ones(idx.shape, jnp.float32)
    return batch_views, scale

  def unit(params, batch_stats, teacher_variables, views_u, scale_u, batch):
    teacher_logits = soft_labels(teacher_model, teacher_variables, views_u)
    share = views_u.shape[0] / batch

    def loss_fn(p):
      (logits, _), updates = student_model.apply(
          {"params": p, "batch_stats": batch_stats}, views_u, train=True,
          mutable=["batch_stats"])
      loss = jnp.sum(_kl(logits, teacher_logits, options.temperature) * scale_u) / batch
      return loss, updates.get("batch_stats", batch_stats)

    (loss, new_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    return {"grads": grads, "batch_stats": jax.tree.map(lambda v: v * share, new_stats),
            "loss": loss}

  def apply(state, outs):
    total = units_lib.fold_sum(outs)
    return (state.apply_gradients(grads=total["grads"], batch_stats=total["batch_stats"]),
            total["loss"])

  return jax.jit(views), jax.jit(unit), jax.jit(apply, donate_argnums=(0,))


class _UnitStudentStep:
  """:func:`make_student_step`'s signature over deterministic work units: views on the first
  device, unit g on device g % D, the update on the first device."""

  def __init__(self, fns, devices, units, teacher_variables):
    self.views, self.unit, self.apply = fns
    self.devices, self.units = devices, units
    self.teachers = units_lib.replicas(teacher_variables, devices)

  def __call__(self, state, teacher_variables, images, weights, idx, views_key, epoch, step):
    del teacher_variables  # the per-device copies made at construction
    views, scale = self.views(images, weights, jax.device_put(idx, self.devices[0]), views_key,
                              epoch, step)
    models = units_lib.replicas((state.params, state.batch_stats), self.devices)
    batch = np.float32(len(idx))

    def one(g, d, lo, hi):
      part = jax.device_put((views[lo:hi], scale[lo:hi]), self.devices[d])
      return self.unit(*models[d], self.teachers[d], *part, batch)

    return self.apply(state, units_lib.map_units(one, len(idx), self.units, self.devices))


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
    test_data: train_lib.BatchSource | None,
    *,
    mean: tuple[float, ...] = (0.0,),
    std: tuple[float, ...] = (1.0,),
    options: StudentOptions = StudentOptions(),
    key: jax.Array | None = None,
    mesh: Mesh | None = None,
    units: int = 0,
) -> StudentResult:
  """Trains a student from scratch on the synthetic set with on-the-fly soft labels.

  Args:
    student_model: the student module (e.g. ``get_model("resnet18", C, ...)``).
    teacher_model: the teacher module.
    teacher_variables: the teacher's ``{"params", "batch_stats"}``.
    images: f32[N, H, W, ch] (or [C, k, H, W, ch]) synthetic images, normalised.
    weights: f32[N] (or [C, k]) barycenter weights, or None for uniform.
    test_data: the real test split, as :func:`wmdd_jax.train.evaluate` takes it: a pair
      (images u8[M, H, W, ch] or f32 in [0, 1], labels i[M]) or a callable ``epoch -> iterable
      of such batches``; images are normalised with ``mean``/``std`` inside the eval step. For
      images that are already normalised, pass floats with the default mean 0 and std 1. None
      skips evaluation (accuracies are then NaN).
    mean: per-channel mean in [0, 1] pixel scale (the dataset's), for the test images.
    std: per-channel std.
    options: StudentOptions.
    key: the run's key; default ``jax.random.key(options.seed)``.
    mesh: split each step's batch over this device mesh (:func:`wmdd_jax.parallel.make_mesh`);
      None: the default device. With several processes every process calls this with the same
      arguments.

    units: N > 0: each step's batch cut into N deterministic work units spread over the mesh's
      devices (:mod:`wmdd_jax.units`; student BN statistics per unit): the run is bit-identical
      for any device count. 0: the batch split by XLA.

  Returns:
    A StudentResult.

  Raises:
    ShapeError: malformed images/weights, or teacher and student with different class counts.
    DataError: unusable weights.
    NonFiniteError: the KD loss became NaN/Inf.
  """
  units = units_lib.check_units(units)
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
  state = train_lib.create_train_state(student_model, variables,
                                       make_optimizer(options, steps_per_epoch))
  eval_mesh = None
  if units:
    devices = units_lib.devices_of(mesh)
    step_fn = _UnitStudentStep(make_unit_student_step(student_model, teacher_model, options),
                               devices, units, teacher_variables)
    state, images, weights = jax.device_put((state, images, weights), devices[0])
    eval_mesh, mesh = mesh, None
  else:
    step_fn = make_student_step(student_model, teacher_model, options, mesh=mesh)
  if mesh is not None:
    state = parallel.replicate(state, mesh, copy=True)  # copy: the step donates it
    teacher_variables, images, weights = parallel.replicate(
        (teacher_variables, images, weights), mesh)
  eval_step = train_lib.make_eval_step(student_model, mean=tuple(mean), std=tuple(std))

  history: list[EvalRecord] = []
  bar = tqdm(range(options.epochs), desc="student", unit="epoch", disable=not options.progress,
             dynamic_ncols=True)
  try:
    for epoch in bar:
      loss_sum = jnp.zeros((), jnp.float32)
      batches = epoch_batches(shuffle_key, epoch, n, options.batch_size)
      for step, idx in enumerate(batches):
        state, loss = step_fn(state, teacher_variables, images, weights, idx, views_key,
                              np.int32(epoch), np.int32(step))
        loss_sum = loss_sum + loss
      # One host sync per epoch: the step is asynchronous otherwise.
      train_loss = float(loss_sum) / len(batches)
      if not math.isfinite(train_loss):
        raise NonFiniteError(f"The student's KD loss became {train_loss} in epoch {epoch + 1}; "
                             "lower StudentOptions.lr, or check the synthetic images and the "
                             "teacher for NaN/Inf.")
      postfix = {"loss": f"{train_loss:.4g}"}
      if test_data is not None and ((epoch + 1) % options.eval_every == 0
                                    or epoch + 1 == options.epochs):
        current = {"params": state.params, "batch_stats": state.batch_stats}
        if mesh is not None:
          # evaluate() replicates over this process's devices; a host copy moves anywhere.
          current = parallel.gather(current)
        result = train_lib.evaluate(
            student_model, current,
            test_data, mean=tuple(mean), std=tuple(std), batch_size=options.eval_batch_size,
            eval_step=eval_step, mesh=eval_mesh, units=units)
        history.append(EvalRecord(epoch + 1, result["top1"], result["top5"], train_loss))
        postfix["top1"] = f"{result['top1']:.2f}"
      bar.set_postfix(**postfix)
  finally:
    bar.close()

  final = history[-1] if history else EvalRecord(options.epochs, math.nan, math.nan, math.nan)
  best1 = max((r.top1 for r in history), default=math.nan)
  best5 = max((r.top5 for r in history), default=math.nan)
  return StudentResult(top1=final.top1, top5=final.top5, best_top1=best1, best_top5=best5,
                       history=tuple(history),
                       variables=jax.device_get({"params": state.params,
                                                 "batch_stats": state.batch_stats}))
