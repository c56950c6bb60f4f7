"""Image transforms as pure JAX functions: jittable, vmappable, randomness from explicit keys.

Images are float32 ``[..., H, W, ch]`` (channels last). Deterministic transforms (``flip``,
``roll_shift``, ``crop_and_resize``, ``resize_center_crop``, ``normalize`` ...) act on any number
of leading batch axes with the *same* parameters for every image. Random transforms draw their
parameters from ``key`` once per call, so called on a batch they share one draw; ``jax.vmap``
over (keys, images) gives one draw per image. :func:`augment_batch` does either for the recover
stage's augmentation.

Crop boxes are ``(y0, x0, h, w)`` in pixels of the input: the region ``[y0, y0 + h) x [x0, x0 +
w)`` with pixel ``i`` covering ``[i, i + 1)``, as in torchvision. Boxes may be traced values.
"""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from wmdd_jax.errors import ConfigError, ShapeError

Array = jax.Array


def _hashable(value: Any) -> Any:
  if isinstance(value, list | tuple | np.ndarray):
    return tuple(_hashable(v) for v in (value.tolist() if isinstance(value, np.ndarray) else value))
  return value


def _jit_static(*names: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
  """``jax.jit`` with the parameters ``names`` static, accepting lists for them (as tuples).

  Jitting the size-dependent transforms gives eager callers one compiled kernel instead of many
  small dispatches; inside an outer jit it changes nothing.
  """

  def wrap(fn: Callable[..., Any]) -> Callable[..., Any]:
    jitted = jax.jit(fn, static_argnames=names)
    signature = inspect.signature(fn)

    @functools.wraps(fn)
    def call(*args: Any, **kwargs: Any) -> Any:
      bound = signature.bind(*args, **kwargs)
      for name in names:
        if name in bound.arguments:
          bound.arguments[name] = _hashable(bound.arguments[name])
      return jitted(*bound.args, **bound.kwargs)

    return call

  return wrap


def _check_image(image: Array, what: str = "image") -> None:
  if image.ndim < 3:
    raise ShapeError(
        f"{what} has shape {image.shape}; expected [..., H, W, ch] (add a channel axis to grey "
        "images: image[..., None])."
    )


def to_float(images: Array) -> Array:
  """u8 pixels to f32 in [0, 1]; floats are taken to be in [0, 1] already and cast to f32."""
  images = jnp.asarray(images)
  if jnp.issubdtype(images.dtype, jnp.integer):
    return images.astype(jnp.float32) / 255.0
  return images.astype(jnp.float32)


def normalize(x: Array, mean: Sequence[float] | Array, std: Sequence[float] | Array) -> Array:
  """``(x - mean) / std`` per channel.

  Args:
    x: u8[..., ch] pixels or f32[..., ch] in [0, 1].
    mean: ch floats in [0, 1] pixel scale (e.g. ``Dataset.mean``).
    std: ch floats.

  Returns:
    f32[..., ch], normalised.
  """
  mean = jnp.asarray(mean, jnp.float32)
  std = jnp.asarray(std, jnp.float32)
  return (to_float(x) - mean) / std


def denormalize(x: Array, mean: Sequence[float] | Array, std: Sequence[float] | Array) -> Array:
  """Inverse of :func:`normalize`: f32[..., ch] normalised -> f32[..., ch] in pixel scale."""
  return x * jnp.asarray(std, jnp.float32) + jnp.asarray(mean, jnp.float32)


def clip_to_valid(x: Array, mean: Sequence[float] | Array, std: Sequence[float] | Array) -> Array:
  """Clips each channel of normalised ``x`` to the range that maps back to [0, 1] pixels.

  Args:
    x: f32[..., ch], normalised with (mean, std).
    mean: ch floats.
    std: ch floats (positive).

  Returns:
    f32[..., ch] with ``denormalize(result)`` in [0, 1].
  """
  mean = jnp.asarray(mean, jnp.float32)
  std = jnp.asarray(std, jnp.float32)
  return jnp.clip(x, (0.0 - mean) / std, (1.0 - mean) / std)


def flip(image: Array) -> Array:
  """Mirrors left-right: f32[..., H, W, ch] -> same shape."""
  _check_image(image)
  return jnp.flip(image, axis=-2)


def random_flip(key: Array, image: Array, p: float = 0.5) -> Array:
  """Mirrors left-right with probability ``p`` (one draw for everything in ``image``)."""
  return jnp.where(jax.random.bernoulli(key, p), flip(image), image)


def roll_shift(image: Array, dy: int | Array, dx: int | Array) -> Array:
  """Circularly shifts down by ``dy`` and right by ``dx`` pixels (may be traced, negative).

  Args:
    image: f32[..., H, W, ch].
    dy: rows; pixel (i, j) moves to ((i + dy) mod H, (j + dx) mod W), as ``np.roll``.
    dx: columns.

  Returns:
    Same shape as ``image``.
  """
  _check_image(image)
  return jnp.roll(image, (dy, dx), axis=(-3, -2))


def jitter(key: Array, image: Array, max_shift: int) -> Array:
  """Random circular shift by dy, dx drawn uniformly from [0, max_shift] (inclusive).

  The official WMDD/SRe2L recover jitter: ``torch.roll(x, shifts=(off1, off2))`` with
  ``off = random.randint(0, lim)`` (recover/data_synthesis_new.py, ``lim = --jitter``, 32 at
  224 px), i.e. down and right only; a shift of ``s`` equals one of ``s - H`` (circular).
  """
  shifts = jax.random.randint(key, (2,), 0, max_shift + 1)
  return roll_shift(image, shifts[0], shifts[1])


def _resize_weights(start: Array, size: Array, in_len: int, out_len: int,
                    antialias: bool) -> Array:
  """f32[out_len, in_len]: torch's bilinear (antialiased) resampling of [start, start + size).

  PyTorch's ``interpolate(mode="bilinear", align_corners=False, antialias=...)`` applied to the
  slice: output pixel i is centred at ``(i + 0.5) * s`` in the slice (s = size / out_len), its
  weights are the triangle filter ``max(0, 1 - |j + 0.5 - centre| / support)`` over the slice's
  pixels j, normalised, with support ``max(1, s)`` when ``antialias`` (1 otherwise; for s <= 1
  this is exactly the clamped two-tap bilinear rule). Pixels outside the slice get weight 0.
  """
  scale = size / out_len
  support = jnp.maximum(scale, 1.0) if antialias else jnp.ones_like(scale)
  centre = (jnp.arange(out_len, dtype=jnp.float32) + 0.5) * scale
  j = jnp.arange(in_len, dtype=jnp.float32) - start  # input pixel index within the slice
  w = jnp.maximum(0.0, 1.0 - jnp.abs(j[None, :] + 0.5 - centre[:, None]) / support)
  w = jnp.where((j[None, :] >= 0) & (j[None, :] < size), w, 0.0)
  return w / jnp.sum(w, axis=1, keepdims=True)


@_jit_static("out_hw", "antialias")
def crop_and_resize(
    image: Array, box: Sequence[float] | Array, out_hw: tuple[int, int], *, antialias: bool = True
) -> Array:
  """Resamples the region ``box`` of ``image`` to ``out_hw`` as torchvision does on tensors.

  torchvision's ``resized_crop``: slice the box, then ``interpolate(mode="bilinear",
  align_corners=False, antialias=antialias)``. Only pixels inside the box contribute (its border
  is clamped, not blended with the pixels around it). A box that is an integer window of size
  ``out_hw`` returns exactly that slice. Computed as two small resampling matrices (the box may be
  traced), linear in ``image``.

  Args:
    image: f32[..., H, W, ch]; leading axes share the box.
    box: (y0, x0, h, w) integer input pixels; may be traced.
    out_hw: static (H', W').
    antialias: widen the kernel when shrinking (as torchvision's ``antialias=True``).

  Returns:
    f32[..., H', W', ch].
  """
  _check_image(image)
  box = jnp.asarray(box, jnp.float32)
  height, width = image.shape[-3], image.shape[-2]
  wy = _resize_weights(box[0], box[2], height, int(out_hw[0]), antialias)
  wx = _resize_weights(box[1], box[3], width, int(out_hw[1]), antialias)
  x = image.astype(jnp.float32)
  hi = jax.lax.Precision.HIGHEST  # exact-enough sums, as a reference resampler should be
  x = jnp.einsum("ih,...hwc->...iwc", wy, x, precision=hi)
  return jnp.einsum("jw,...iwc->...ijc", wx, x, precision=hi)


def resize_center_crop(
    image: Array,
    out_hw: tuple[int, int],
    *,
    resize_shorter: int | None = None,
    antialias: bool = True,
) -> Array:
  """The evaluation transform: resize, then take the centre ``out_hw`` window.

  torchvision's ``Resize(resize_shorter)`` + ``CenterCrop(out_hw)`` on a tensor: the whole
  image is resized (bilinear, ``antialias``) so its shorter side is ``resize_shorter`` (the
  longer one ``int(long * resize_shorter / short)``), then the window starting at
  ``round((H_resized - H') / 2)`` is cut out.

  Args:
    image: f32[..., H, W, ch].
    out_hw: (H', W') wanted.
    resize_shorter: the shorter side's length after resizing (ImageNet's 256 for a 224 crop);
      None resizes just enough to cover ``out_hw``.
    antialias: see :func:`crop_and_resize`.

  Returns:
    f32[..., H', W', ch]; the image itself when ``out_hw == (H, W)`` and resize_shorter is None.
  """
  _check_image(image)
  height, width = image.shape[-3], image.shape[-2]
  out_h, out_w = out_hw
  if resize_shorter is None:
    s = max(out_h / height, out_w / width)
    new_h, new_w = max(out_h, int(height * s + 1e-6)), max(out_w, int(width * s + 1e-6))
  else:
    short, long = min(height, width), max(height, width)
    new_short, new_long = int(resize_shorter), int(resize_shorter * long / short)
    new_h, new_w = (new_short, new_long) if height <= width else (new_long, new_short)
  if new_h < out_h or new_w < out_w:
    raise ConfigError(
        f"resize_shorter={resize_shorter} makes a {height}x{width} image smaller than the "
        f"{out_h}x{out_w} crop; use resize_shorter >= {max(out_hw)} or None."
    )
  if (new_h, new_w) == (height, width) == (out_h, out_w):
    return image.astype(jnp.float32)
  resized = crop_and_resize(image, (0, 0, height, width), (new_h, new_w), antialias=antialias)
  top, left = int(round((new_h - out_h) / 2.0)), int(round((new_w - out_w) / 2.0))
  return resized[..., top:top + out_h, left:left + out_w, :]


@_jit_static("hw", "scale", "ratio")
def sample_crop_box(
    key: Array,
    hw: tuple[int, int],
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> Array:
  """Draws a RandomResizedCrop box exactly as torchvision does.

  Up to 10 tries of area ``U(scale) * H * W`` and log-uniform aspect ratio ``w / h`` in
  ``ratio``, with h and w rounded; the first that fits is placed uniformly. If none fits, the
  centre crop of the whole image clamped to ``ratio``. The tries are drawn at once, so this is
  branch-free and jittable.

  Args:
    key: PRNG key.
    hw: static (H, W) of the image.
    scale: range of the box area as a fraction of the image's.
    ratio: range of the box's aspect ratio w / h.

  Returns:
    i32[4]: (y0, x0, h, w).
  """
  height, width = hw
  k_area, k_ratio, k_y, k_x = jax.random.split(key, 4)
  area = height * width * jax.random.uniform(k_area, (10,), minval=scale[0], maxval=scale[1])
  log_ratio = jax.random.uniform(
      k_ratio, (10,), minval=math.log(ratio[0]), maxval=math.log(ratio[1])
  )
  aspect = jnp.exp(log_ratio)
  w = jnp.round(jnp.sqrt(area * aspect)).astype(jnp.int32)
  h = jnp.round(jnp.sqrt(area / aspect)).astype(jnp.int32)
  fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
  first = jnp.argmax(fits)
  h, w = h[first], w[first]
  # torch.randint(0, n + 1): uniform integer in [0, n].
  y0 = jnp.floor(jax.random.uniform(k_y) * (height - h + 1)).astype(jnp.int32)
  x0 = jnp.floor(jax.random.uniform(k_x) * (width - w + 1)).astype(jnp.int32)
  y0 = jnp.minimum(y0, height - h)
  x0 = jnp.minimum(x0, width - w)

  # The fallback depends only on static sizes, so it is computed in Python.
  in_ratio = width / height
  if in_ratio < min(ratio):
    fw, fh = width, int(round(width / min(ratio)))
  elif in_ratio > max(ratio):
    fh, fw = height, int(round(height * max(ratio)))
  else:
    fh, fw = height, width
  fallback = jnp.array([(height - fh) // 2, (width - fw) // 2, fh, fw], jnp.int32)
  return jnp.where(jnp.any(fits), jnp.stack([y0, x0, h, w]), fallback)


@_jit_static("out_hw", "scale", "ratio", "antialias")
def random_resized_crop(
    key: Array,
    image: Array,
    out_hw: tuple[int, int],
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    *,
    antialias: bool = True,
) -> Array:
  """torchvision's RandomResizedCrop: a :func:`sample_crop_box` box resized to ``out_hw``.

  Args:
    key: PRNG key (one box for everything in ``image``; vmap for one per image).
    image: f32[..., H, W, ch].
    out_hw: static (H', W').
    scale: range of the crop's area fraction.
    ratio: range of the crop's aspect ratio w / h.
    antialias: see :func:`crop_and_resize`.

  Returns:
    f32[..., H', W', ch].
  """
  _check_image(image)
  box = sample_crop_box(key, (image.shape[-3], image.shape[-2]), scale, ratio)
  return crop_and_resize(image, box, out_hw, antialias=antialias)


def pad_and_random_crop(key: Array, image: Array, pad: int, *, fill: float = 0.0) -> Array:
  """Pads ``pad`` pixels of ``fill`` on every side, then crops a random window of the old size.

  The usual CIFAR training augmentation (torchvision ``RandomCrop(size, padding=pad)``). ``fill``
  is in whatever space ``image`` is in (0 in normalised space is the mean colour).

  Args:
    key: PRNG key.
    image: f32[..., H, W, ch].
    pad: static padding in pixels.
    fill: the padding value.

  Returns:
    f32[..., H, W, ch].
  """
  _check_image(image)
  widths = [(0, 0)] * (image.ndim - 3) + [(pad, pad), (pad, pad), (0, 0)]
  padded = jnp.pad(image, widths, constant_values=fill)
  offsets = jax.random.randint(key, (2,), 0, 2 * pad + 1)
  starts = [0] * (image.ndim - 3) + [offsets[0], offsets[1], 0]
  return jax.lax.dynamic_slice(padded, starts, image.shape)


def _augment(
    key: Array,
    images: Array,
    out_hw: tuple[int, int],
    scale: tuple[float, float],
    ratio: tuple[float, float],
    do_flip: bool,
    max_shift: int,
    antialias: bool,
) -> Array:
  k_crop, k_flip, k_shift = jax.random.split(key, 3)
  out = random_resized_crop(k_crop, images, out_hw, scale, ratio, antialias=antialias)
  if do_flip:
    out = random_flip(k_flip, out)
  if max_shift > 0:
    out = jitter(k_shift, out, max_shift)
  return out


@_jit_static("out_hw", "per_image", "scale", "ratio", "flip", "max_shift", "antialias")
def augment_batch(
    key: Array,
    images: Array,
    *,
    out_hw: tuple[int, int] | None = None,
    per_image: bool = False,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    flip: bool = True,
    max_shift: int | None = None,
    antialias: bool = True,
) -> Array:
  """The recover stage's augmentation: RandomResizedCrop, then flip, then circular jitter.

  With ``per_image=False`` (the official WMDD/SRe2L default) one crop box, one flip decision and
  one shift are drawn from ``key`` and applied to every image; with ``per_image=True`` each image
  gets its own draw (``key`` is split into B keys and the transform is vmapped).

  Args:
    key: PRNG key; fold the step in (``jax.random.fold_in(key, step)``) for a new draw per step.
    images: f32[B, H, W, ch].
    out_hw: static output size; default (H, W).
    per_image: one draw per image instead of one per batch.
    scale: RandomResizedCrop area range.
    ratio: RandomResizedCrop aspect-ratio range.
    flip: apply a random horizontal flip (p = 0.5).
    max_shift: jitter range in pixels, shifts drawn from [0, max_shift] on both axes (official);
      default ``out_hw[0] // 7`` (32 px at 224, as in the official code). 0 disables it.
    antialias: see :func:`crop_and_resize`.

  Returns:
    f32[B, H', W', ch].
  """
  if images.ndim != 4:
    raise ShapeError(f"images has shape {images.shape}; augment_batch expects [B, H, W, ch].")
  if out_hw is None:
    out_hw = (images.shape[1], images.shape[2])
  out_hw = (int(out_hw[0]), int(out_hw[1]))
  if max_shift is None:
    max_shift = out_hw[0] // 7
  args = (out_hw, tuple(scale), tuple(ratio), bool(flip), int(max_shift), bool(antialias))
  if per_image:
    keys = jax.random.split(key, images.shape[0])
    return jax.vmap(lambda k, im: _augment(k, im, *args))(keys, images)
  return _augment(key, images, *args)
