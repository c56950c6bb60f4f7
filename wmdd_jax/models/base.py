"""What every wmdd_jax model shares: a BatchNorm that records its input, and `apply_model`.

A model is a Flax Linen module whose ``__call__(x, train: bool)`` returns ``(logits, features)``
and whose BatchNorm layers are :class:`CapturingBatchNorm`. One forward pass through
:func:`apply_model` then gives logits, penultimate features and, for every BN layer in forward
(call) order, the per-sample mean and biased variance of that layer's *input* over its spatial
positions. Those per-sample moments are all that per-class statistics need: pooling them with
:func:`pool_moments` is exact (the law of total variance), with no E[x^2] - E[x]^2 cancellation.
"""

from __future__ import annotations

import functools
import threading
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

BN_COLLECTION = "bn_inputs"

# While apply_model traces a model, each capturing BN appends its module path here, so the
# forward (call) order is known without relying on dict ordering (which jit does not keep).
_CALL_ORDER = threading.local()


class ModelOutput(NamedTuple):
  """One forward pass.

  Attributes:
    logits: f32[B, num_classes].
    features: f32[B, d], the penultimate (globally pooled) features.
    bn_mean: tuple over BN layers (forward order) of f32[B, ch_l]: per-sample mean of the layer's
      input over its spatial positions.
    bn_var: same structure: per-sample biased variance over spatial positions.
  """

  logits: jax.Array
  features: jax.Array
  bn_mean: tuple[jax.Array, ...]
  bn_var: tuple[jax.Array, ...]


def _sum_positions(y: jax.Array) -> jax.Array:
  """f32[B, P, C] -> f32[B, C]: the sum over positions, by pairwise halving.

  Each halving adds two contiguous [B, P/2, C] slices, so every read runs along the channels
  (XLA:CPU's reduction over the middle axis of [B, H, W, C] walks the channels with a stride
  and was the largest non-convolution cost of the recover step without YNNPACK; this form is
  as fast with it, and pairwise sums are at least as accurate).
  """
  n = y.shape[1]
  while n > 1:
    half = n // 2
    folded = y[:, :half] + y[:, half:2 * half]
    if n % 2:  # the odd position joins the first
      folded = jnp.concatenate([folded[:, :1] + y[:, 2 * half:], folded[:, 1:]], axis=1)
    y, n = folded, half
  return y[:, 0]


@jax.custom_vjp
def spatial_moments(x: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Per-sample mean and biased variance over the positions of a channels-last map.

  Args:
    x: f32[B, P, C] (a [B, H, W, C] map with its positions flattened).

  Returns:
    (mean f32[B, C], var f32[B, C]); the variance is two-pass (no E[x^2] - E[x]^2
    cancellation).

  The gradient is the closed form ``dx = (g_mean + 2 g_var (x - mean)) / P``: autodiff of the
  two-pass variance would also reduce ``g_var * (x - mean)`` over every position for the
  mean's path, a sum that is 0 up to round-off.
  """
  return _moments_forward(x)[0]


def _moments_forward(x):
  p = x.shape[1]
  mean = _sum_positions(x) / p
  centred = x - mean[:, None, :]
  var = _sum_positions(centred * centred) / p
  return (mean, var), (x, mean)


def _moments_backward(residual, grads):
  x, mean = residual
  g_mean, g_var = grads
  p = x.shape[1]
  return ((g_mean[:, None, :] + 2.0 * g_var[:, None, :] * (x - mean[:, None, :])) / p,)


spatial_moments.defvjp(_moments_forward, _moments_backward)


def reference_moments(x: jax.Array) -> tuple[jax.Array, jax.Array]:
  """:func:`spatial_moments` as plain ``jnp.mean`` calls under autodiff (what the models used
  before; kept for tests and the before/after benchmark, bench/official.py)."""
  mean = jnp.mean(x, axis=1)
  return mean, jnp.mean(jnp.square(x - mean[:, None, :]), axis=1)


# Whether float32 [B, H, W, C] maps use :class:`_BatchNorm` (read when a model is traced; False:
# flax's ``nn.BatchNorm`` everywhere, as before issue 15, for the before/after benchmark).
FAST_BATCH_NORM = True


def _sum_rows_positions(x: jax.Array) -> jax.Array:
  """f32[B, P, C] -> f32[C]: pairwise sums over each sample's positions, then over samples (the
  batch axis last, so a batch split over devices needs one small all-reduce)."""
  return jnp.sum(_sum_positions(x), axis=0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _train_batch_norm(x, scale, bias, epsilon):
  """Train-mode batch normalisation of f32[B, P, C] as ``nn.BatchNorm`` computes it.

  Flax's statistics (mean, and the variance as ``max(0, E[x^2] - E[x]^2)``, biased) and
  normalisation ``(x - mean) * (rsqrt(var + eps) * scale) + bias``, with the sums as pairwise
  halvings (:func:`_sum_positions`) and the gradient in closed form, whose reductions are the
  same fast sums: XLA:CPU reduces [B, H, W, C] over everything but the channels one channel at
  a time, strided, which made these reductions a large part of the student's step.

  Returns:
    (y f32[B, P, C], mean f32[C], var f32[C]).
  """
  return _train_batch_norm_forward(x, scale, bias, epsilon)[0]


def _train_batch_norm_forward(x, scale, bias, epsilon):
  n = x.shape[0] * x.shape[1]
  mean = _sum_rows_positions(x) / n
  var = jnp.maximum(0.0, _sum_rows_positions(x * x) / n - mean * mean)
  rstd = jax.lax.rsqrt(var + epsilon)
  y = (x - mean) * (rstd * scale) + bias
  return (y, mean, var), (x, mean, rstd, scale)


def _train_batch_norm_backward(epsilon, residual, grads):
  del epsilon
  x, mean, rstd, scale = residual
  dy, d_mean, d_var = grads
  n = x.shape[0] * x.shape[1]
  centred = x - mean
  xhat = centred * rstd
  d_bias = _sum_rows_positions(dy)
  d_scale = _sum_rows_positions(dy * xhat)
  # d/dx of (x - mean(x)) * rstd(x): the textbook batch-norm gradient; then the paths through
  # the returned statistics (zero when only the running averages read them).
  dx = (scale * rstd / n) * (n * dy - d_bias - xhat * d_scale)
  dx = dx + d_mean / n + d_var * (2.0 / n) * centred
  return dx, d_scale, d_bias


_train_batch_norm.defvjp(_train_batch_norm_forward, _train_batch_norm_backward)


class _BatchNorm(nn.Module):
  """``nn.BatchNorm`` (feature axis last, float32) with the same variables (``scale``, ``bias``,
  ``batch_stats`` ``mean`` / ``var``) and values up to round-off, for [B, H, W, C] inputs; its
  train mode uses :func:`_train_batch_norm`."""

  momentum: float
  epsilon: float
  scale_init: Any

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    ch = x.shape[-1]
    initializing = self.is_initializing()
    ra_mean = self.variable("batch_stats", "mean", lambda s: jnp.zeros(s, jnp.float32), (ch,))
    ra_var = self.variable("batch_stats", "var", lambda s: jnp.ones(s, jnp.float32), (ch,))
    scale = self.param("scale", self.scale_init, (ch,), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (ch,), jnp.float32)
    if not train:
      return (x - ra_mean.value) * (jax.lax.rsqrt(ra_var.value + self.epsilon) * scale) + bias
    flat = x.reshape(x.shape[0], -1, ch)
    y, mean, var = _train_batch_norm(flat, scale, bias, self.epsilon)
    if not initializing:
      ra_mean.value = self.momentum * ra_mean.value + (1 - self.momentum) * mean
      ra_var.value = self.momentum * ra_var.value + (1 - self.momentum) * var
    return y.reshape(x.shape)


class CapturingBatchNorm(nn.Module):
  """``nn.BatchNorm`` over the last axis that also sows its input's per-sample moments.

  Defaults follow PyTorch (momentum 0.1 -> Flax momentum 0.9, eps 1e-5) so teachers match the
  official code's BN behaviour.
  """

  momentum: float = 0.9
  epsilon: float = 1e-5
  scale_init: Any = nn.initializers.ones
  dtype: Any = None

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    if self.is_mutable_collection(BN_COLLECTION):
      xf = x.astype(jnp.float32)
      axes = tuple(range(1, x.ndim - 1))
      if axes:
        mean, var = spatial_moments(xf.reshape(xf.shape[0], -1, xf.shape[-1]))
      else:  # BatchNorm1d on [B, ch]: every sample is one position.
        mean, var = xf, jnp.zeros_like(xf)
      self.sow(BN_COLLECTION, "moments", (mean, var))
      order = getattr(_CALL_ORDER, "paths", None)
      if order is not None:
        order.append(tuple(self.path))
    if FAST_BATCH_NORM and x.ndim == 4 and self.dtype is None and x.dtype == jnp.float32:
      return _BatchNorm(self.momentum, self.epsilon, self.scale_init, name="bn")(x, train)
    return nn.BatchNorm(
        use_running_average=not train,
        momentum=self.momentum,
        epsilon=self.epsilon,
        scale_init=self.scale_init,
        dtype=self.dtype,
        name="bn",
    )(x)


def _lookup(tree: Any, path: tuple[str, ...]) -> Any:
  for name in path:
    tree = tree[name]
  return tree


def apply_model(
    model: nn.Module,
    variables: dict[str, Any],
    images: jax.Array,
    *,
    train: bool = False,
    capture_bn: bool = True,
) -> ModelOutput | tuple[ModelOutput, dict[str, Any]]:
  """Runs ``model`` once; returns logits, features and BN-input moments.

  Args:
    model: a registered model (see :func:`wmdd_jax.models.get_model`).
    variables: ``{"params": ..., "batch_stats": ...}``.
    images: f32[B, H, W, ch], normalised.
    train: False (eval mode: BN uses running statistics and nothing is updated) or True.
    capture_bn: whether to record BN-input moments (False skips that work; the tuples are empty).

  Returns:
    In eval mode a :class:`ModelOutput`. In train mode ``(ModelOutput, new_batch_stats)``.
  """
  # `init` sows too; drop any recorded moments so they are not appended to.
  variables = {k: v for k, v in variables.items() if k != BN_COLLECTION}
  mutable = [BN_COLLECTION] if capture_bn else []
  if train:
    mutable.append("batch_stats")
  _CALL_ORDER.paths = [] if capture_bn else None
  try:
    if mutable:
      (logits, features), state = model.apply(variables, images, train=train, mutable=mutable)
    else:
      logits, features = model.apply(variables, images, train=train)
      state = {}
    paths = _CALL_ORDER.paths or []
  finally:
    _CALL_ORDER.paths = None
  moments = []
  for path in paths:
    # Module paths exclude the root; each BN sows a 1-tuple of (mean, var) under "moments".
    moments.extend(_lookup(state[BN_COLLECTION], path)["moments"])
  out = ModelOutput(
      logits=logits,
      features=features,
      bn_mean=tuple(m for m, _ in moments),
      bn_var=tuple(v for _, v in moments),
  )
  if train:
    return out, state["batch_stats"]
  return out


def pool_moments(
    mean: jax.Array, var: jax.Array, axis: int | tuple[int, ...] = 0
) -> tuple[jax.Array, jax.Array]:
  """Pools equal-count per-sample moments into the moments of the union (exact).

  Args:
    mean: f32[..., ch] per-sample means over the same number of positions each.
    var: f32[..., ch] per-sample biased variances.
    axis: the sample axis (or axes) to pool over.

  Returns:
    (mean f32[ch...], biased var f32[ch...]) of all positions of all samples together.
  """
  mu = jnp.mean(mean, axis=axis)
  between = jnp.mean(jnp.square(mean - jnp.expand_dims(mu, axis)), axis=axis)
  return mu, jnp.mean(var, axis=axis) + between


def bn_layer_paths(model: nn.Module, variables: dict[str, Any],
                   image_shape: tuple[int, ...]) -> tuple[tuple[str, ...], ...]:
  """The module path of every :class:`CapturingBatchNorm`, in forward (call) order.

  The same order as :class:`ModelOutput`'s ``bn_mean`` / ``bn_var``. Traced abstractly (no
  compute).

  Args:
    model: a registered model.
    variables: its variables (arrays or ``jax.ShapeDtypeStruct``).
    image_shape: (H, W, ch) of one input image.
  """
  variables = {k: v for k, v in variables.items() if k != BN_COLLECTION}
  _CALL_ORDER.paths = []
  try:
    jax.eval_shape(lambda v, x: model.apply(v, x, train=False, mutable=[BN_COLLECTION]),
                   variables, jax.ShapeDtypeStruct((1, *image_shape), jnp.float32))
    return tuple(_CALL_ORDER.paths)
  finally:
    _CALL_ORDER.paths = None


def running_statistics(
    model: nn.Module, variables: dict[str, Any], image_shape: tuple[int, ...]
) -> tuple[tuple[jax.Array, ...], tuple[jax.Array, ...]]:
  """The teacher's BN running statistics, layer by layer in forward order.

  What SRe2L (and WMDD's Wass+BN / CE+BN ablations, recover/data_synthesis.py) match the
  synthetic batch's statistics to: ``module.running_mean`` / ``running_var`` of every BN layer.

  Returns:
    (means, vars): tuples over BN layers of f32[ch_l], aligned with ``apply_model``'s moments.
  """
  stats = variables["batch_stats"]
  paths = bn_layer_paths(model, variables, image_shape)
  means = tuple(jnp.asarray(_lookup(stats, p)["bn"]["mean"], jnp.float32) for p in paths)
  varis = tuple(jnp.asarray(_lookup(stats, p)["bn"]["var"], jnp.float32) for p in paths)
  return means, varis
