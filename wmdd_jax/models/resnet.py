"""ResNet-18/34/50/101 with torchvision's topology and four stems.

Blocks follow ``torchvision.models.resnet`` (v1.5: in a Bottleneck the stride sits on the 3x3
conv; a block whose shape changes gets a ``conv1x1 + BN`` downsample on its shortcut). Module names
mirror torchvision's (``conv1``, ``bn1``, ``layer1_0/conv1``, ``layer2_0/downsample_bn``, ``fc``)
so that weights can be mapped one to one.

Stems:
  * ``imagenet``: 7x7/2 conv (padding 3) + BN + ReLU + 3x3/2 max-pool (padding 1), for 224 px.
  * ``tiny``: 3x3/1 conv (padding 1) + BN + ReLU, no max-pool: SRe2L's Tiny-ImageNet (64 px)
    ResNet (WMDD's official code uses ``tiny_official`` at 224 px instead).
  * ``cifar``: the same layers as ``tiny``, for 32 px inputs (the usual CIFAR ResNet stem). The
    two names exist so that configs say what they mean; the networks are identical.
  * ``tiny_official``: 3x3/2 conv with symmetric padding 3 + BN + ReLU, no max-pool: the stem the
    official WMDD code (``recover/data_synthesis_new.py``) puts on torchvision's ResNet for
    Tiny-ImageNet at 224 px, ``nn.Conv2d(3, 64, 3, stride=2, padding=3, bias=False)`` with
    ``maxpool = Identity``. Padding is explicit, so the output size is PyTorch's,
    ``(H + 6 - 3) // 2 + 1`` (224 -> 114, 64 -> 34). Its weights have the same shapes as
    ``tiny``'s: only the stem name tells them apart when importing a checkpoint.

BN order (what :func:`wmdd_jax.models.apply_model` returns, forward order, which equals
torchvision's module-registration order): the stem's ``bn1``; then, block by block in
``layer1_0, layer1_1, ..., layer4_{n-1}``: ``bn1``, ``bn2`` (, ``bn3`` for Bottleneck) and last
the shortcut's ``downsample_bn`` when the block has one (torchvision computes the shortcut after
the main path, and registers it after it).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from wmdd_jax.errors import ConfigError
from wmdd_jax.models.base import CapturingBatchNorm

# torchvision: kaiming_normal_(mode="fan_out", nonlinearity="relu") for every conv.
conv_kernel_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
# torch.nn.Linear's default: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for the weight and the bias.
dense_kernel_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def dense_bias_init(fan_in: int):
  """torch.nn.Linear's bias initialiser, U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
  bound = 1.0 / max(fan_in, 1) ** 0.5

  def init(key: jax.Array, shape: Sequence[int], dtype: Any = jnp.float32) -> jax.Array:
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


STEMS = ("imagenet", "tiny", "cifar", "tiny_official")
# Stem conv per stem: (kernel, stride, symmetric padding), as PyTorch's nn.Conv2d takes them.
STEM_CONV = {"imagenet": (7, 2, 3), "tiny": (3, 1, 1), "cifar": (3, 1, 1),
             "tiny_official": (3, 2, 3)}


class BasicBlock(nn.Module):
  """Two 3x3 convs (ResNet-18/34). Output channels: ``filters``."""

  filters: int
  strides: int = 1
  downsample: bool = False
  zero_init_last_bn: bool = False
  dtype: Any = None

  expansion = 1

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    conv = lambda f, k, s, p, name: nn.Conv(
        f, (k, k), strides=s, padding=p, use_bias=False, kernel_init=conv_kernel_init,
        dtype=self.dtype, name=name)
    bn = lambda name, zero=False: CapturingBatchNorm(
        scale_init=nn.initializers.zeros if zero else nn.initializers.ones,
        dtype=self.dtype, name=name)
    out = conv(self.filters, 3, self.strides, 1, "conv1")(x)
    out = nn.relu(bn("bn1")(out, train))
    out = conv(self.filters, 3, 1, 1, "conv2")(out)
    out = bn("bn2", self.zero_init_last_bn)(out, train)
    shortcut = x
    if self.downsample:
      # After the main path, as torchvision does: this fixes the BN order.
      shortcut = conv(self.filters * self.expansion, 1, self.strides, 0, "downsample_conv")(x)
      shortcut = bn("downsample_bn")(shortcut, train)
    return nn.relu(out + shortcut)


class Bottleneck(nn.Module):
  """1x1 - 3x3 (strided) - 1x1 convs (ResNet-50/101). Output channels: ``4 * filters``."""

  filters: int
  strides: int = 1
  downsample: bool = False
  zero_init_last_bn: bool = False
  dtype: Any = None

  expansion = 4

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    conv = lambda f, k, s, p, name: nn.Conv(
        f, (k, k), strides=s, padding=p, use_bias=False, kernel_init=conv_kernel_init,
        dtype=self.dtype, name=name)
    bn = lambda name, zero=False: CapturingBatchNorm(
        scale_init=nn.initializers.zeros if zero else nn.initializers.ones,
        dtype=self.dtype, name=name)
    out = conv(self.filters, 1, 1, 0, "conv1")(x)
    out = nn.relu(bn("bn1")(out, train))
    out = conv(self.filters, 3, self.strides, 1, "conv2")(out)
    out = nn.relu(bn("bn2")(out, train))
    out = conv(self.filters * self.expansion, 1, 1, 0, "conv3")(out)
    out = bn("bn3", self.zero_init_last_bn)(out, train)
    shortcut = x
    if self.downsample:
      shortcut = conv(self.filters * self.expansion, 1, self.strides, 0, "downsample_conv")(x)
      shortcut = bn("downsample_bn")(shortcut, train)
    return nn.relu(out + shortcut)


class ResNet(nn.Module):
  """A torchvision-style ResNet.

  Attributes:
    stage_sizes: blocks per stage, e.g. (2, 2, 2, 2) for ResNet-18.
    block_cls: :class:`BasicBlock` or :class:`Bottleneck`.
    num_classes: width of the classifier.
    stem: "imagenet", "tiny", "cifar" or "tiny_official" (see the module docstring).
    width: channels of the stem and the first stage (64 in torchvision).
    zero_init_residual: start each block's last BN scale at 0 (torchvision's option; off by
      default, as in torchvision).
    dtype: computation dtype of convs and BN (e.g. jnp.bfloat16); parameters, BN statistics,
      captured moments, features and logits stay float32.
  """

  stage_sizes: Sequence[int]
  block_cls: Any
  num_classes: int
  stem: str = "imagenet"
  width: int = 64
  zero_init_residual: bool = False
  dtype: Any = None

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> tuple[jax.Array, jax.Array]:
    """Args: x f32[B, H, W, ch] (any ch), normalised. Returns (logits f32[B, num_classes],
    features f32[B, d]) with d = 8 * width * expansion (512 for ResNet-18, 2048 for ResNet-50)."""
    if self.stem not in STEMS:
      raise ConfigError(f"Unknown ResNet stem {self.stem!r}; use one of {STEMS}.")
    if self.dtype is not None:
      x = x.astype(self.dtype)
    kernel, stride, pad = STEM_CONV[self.stem]
    x = nn.Conv(self.width, (kernel, kernel), strides=stride, padding=((pad, pad), (pad, pad)),
                use_bias=False, kernel_init=conv_kernel_init, dtype=self.dtype, name="conv1")(x)
    x = nn.relu(CapturingBatchNorm(dtype=self.dtype, name="bn1")(x, train))
    if self.stem == "imagenet":
      x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    in_channels = self.width
    for stage, num_blocks in enumerate(self.stage_sizes):
      filters = self.width * 2**stage
      for i in range(num_blocks):
        strides = 2 if (stage > 0 and i == 0) else 1
        out_channels = filters * self.block_cls.expansion
        x = self.block_cls(
            filters=filters,
            strides=strides,
            downsample=strides != 1 or in_channels != out_channels,
            zero_init_last_bn=self.zero_init_residual,
            dtype=self.dtype,
            name=f"layer{stage + 1}_{i}",
        )(x, train)
        in_channels = out_channels
    features = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
    logits = nn.Dense(self.num_classes, kernel_init=dense_kernel_init,
                      bias_init=dense_bias_init(features.shape[-1]), name="fc")(features)
    return logits, features


RESNET_LAYOUTS = {
    "resnet18": ((2, 2, 2, 2), BasicBlock),
    "resnet34": ((3, 4, 6, 3), BasicBlock),
    "resnet50": ((3, 4, 6, 3), Bottleneck),
    "resnet101": ((3, 4, 23, 3), Bottleneck),
}
