"""The dataset-distillation ConvNet (Zhao et al.), with BatchNorm.

``depth`` blocks of conv3x3 (padding 1, with bias, as in the DD code) - BN - ReLU - 2x2 average
pool (stride 2, floor), then a linear classifier on the flattened last feature map. The features
are that flattened map (``features="flat"``, the default): d = width * (H / 2**depth) *
(W / 2**depth) (floors), e.g. 2048 for 32x32 and depth 3, 1152 for 28x28. ``features="pooled"``
returns the map's spatial mean instead (d = width, like a ResNet's pooled features): the
classifier is unchanged, but the barycenter and the feature loss then see no spatial layout,
which crops, flips and rolls move (issue 14's hypothesis for small images).

BN order (what :func:`wmdd_jax.models.apply_model` returns): ``bn0``, ``bn1``, ... in depth order.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from wmdd_jax.errors import ConfigError, ShapeError
from wmdd_jax.models.base import CapturingBatchNorm
from wmdd_jax.models.resnet import conv_kernel_init, dense_bias_init, dense_kernel_init

FEATURES = ("flat", "pooled")


class ConvNet(nn.Module):
  """Attributes:
    num_classes: width of the classifier.
    depth: number of conv blocks (3 for 28-32 px, 4 for 64 px in the DD literature).
    width: channels of every conv (128 in the DD literature).
    dtype: computation dtype of convs and BN; parameters, features and logits stay float32.
    features: "flat" (the flattened last map, which the classifier reads) or "pooled" (its
      spatial mean, f32[B, width]); the logits are the same either way.
  """

  num_classes: int
  depth: int = 3
  width: int = 128
  dtype: Any = None
  features: str = "flat"

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> tuple[jax.Array, jax.Array]:
    """Args: x f32[B, H, W, ch], normalised, H and W >= 2**depth. Returns (logits
    f32[B, num_classes], features f32[B, d])."""
    if self.features not in FEATURES:
      raise ConfigError(f"ConvNet features={self.features!r} is not one of {FEATURES}.")
    h, w = x.shape[1:3]
    if min(h, w) < 2**self.depth:
      raise ShapeError(
          f"ConvNet depth {self.depth} halves the image {self.depth} times, but the input is only "
          f"{h}x{w}; use depth <= {max(min(h, w), 1).bit_length() - 1} or larger images.")
    if self.dtype is not None:
      x = x.astype(self.dtype)
    for i in range(self.depth):
      x = nn.Conv(self.width, (3, 3), padding=1, use_bias=True, kernel_init=conv_kernel_init,
                  dtype=self.dtype, name=f"conv{i}")(x)
      x = nn.relu(CapturingBatchNorm(dtype=self.dtype, name=f"bn{i}")(x, train))
      x = nn.avg_pool(x, (2, 2), strides=(2, 2))
    flat = x.astype(jnp.float32).reshape(x.shape[0], -1)
    logits = nn.Dense(self.num_classes, kernel_init=dense_kernel_init,
                      bias_init=dense_bias_init(flat.shape[-1]), name="fc")(flat)
    if self.features == "pooled":
      return logits, jnp.mean(x.astype(jnp.float32), axis=(1, 2))
    return logits, flat
