"""Relabel (stage 5, the method): the student's views, the teacher's soft labels, the KD loss.

The paper's protocol (docs/method.md, section 4), as pure jitted pieces plus a loop:

* :func:`make_views`: per-image RandomResizedCrop(scale 0.08-1, ratio 3/4-4/3) back to H x W and
  a horizontal flip (``jax.vmap`` over images), then CutMix: lambda ~ Beta(1, 1), ONE box for the
  whole batch, a random permutation. It returns a :class:`CutMix` record (permutation, box, and
  ``lam`` recomputed from the clipped box, i.e. the exact fraction of each view that is its own
  image), which is all that is needed to mix per-image quantities the same way.
* :func:`soft_labels`: the teacher's logits (eval mode) on exactly those views.
* :func:`kd_loss`: KL(softmax(t / T) || softmax(s / T)) summed over classes, times each sample's
  weight divided by the batch-mean weight, averaged over the batch; no T^2 factor.
* :func:`weight_decay_mask`, :func:`epoch_cosine`: the student's AdamW decay mask and schedule.

The student's training loop is :func:`wmdd_jax.evaluate.train_student`.

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

These are pure functions of arrays; how a step runs on devices is
:func:`wmdd_jax.evaluate.train_student`'s execution.

Soft labels are recomputed, not cached (cheap next to the student's step); to evaluate a set
without the teacher, :mod:`wmdd_jax.protocol` stores them with the views of a fixed schedule.
"""

from __future__ import annotations

import re
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from wmdd_jax.data import transforms
from wmdd_jax.errors import ShapeError
from wmdd_jax.models.base import apply_model

# fold_in constants that name the independent random streams of train_student.
_INIT_STREAM, _SHUFFLE_STREAM, _VIEWS_STREAM = 0, 1, 2


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
    options: Any = None,
) -> RelabeledBatch:
  """Views, soft labels and mixed weights of one batch; a pure function of its inputs.

  In :func:`train_student`, ``key`` is ``batch_key(views_key, epoch, step)``.

  Args:
    teacher_model: the teacher module (static under jit).
    teacher_variables: its variables.
    images: f32[B, H, W, ch] synthetic images, normalised.
    weights: f32[B] their sample weights.
    key: the batch's key.
    options: anything with the fields ``crop_scale``, ``crop_ratio``, ``cutmix`` and
      ``cutmix_alpha`` (an :class:`wmdd_jax.evaluate.EvaluateOptions`; static under jit). None:
      the paper's protocol (scale 0.08-1, ratio 3/4-4/3, CutMix with alpha 1).

  Returns:
    A RelabeledBatch.
  """
  if options is None:
    views, mix = make_views(key, images)
  else:
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


