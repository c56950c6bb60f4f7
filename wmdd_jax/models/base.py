"""What every wmdd_jax model shares: a BatchNorm that records its input, and `apply_model`.

A model is a Flax Linen module whose ``__call__(x, train: bool)`` returns ``(logits, features)``
and whose BatchNorm layers are :class:`CapturingBatchNorm`. One forward pass through
:func:`apply_model` then gives logits, penultimate features and, for every BN layer in forward
(call) order, the per-sample mean and biased variance of that layer's *input* over its spatial
positions. Those per-sample moments are all that per-class statistics need: pooling them with
:func:`pool_moments` is exact (the law of total variance), with no E[x^2] - E[x]^2 cancellation.
"""

from __future__ import annotations

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
        mean = jnp.mean(xf, axis=axes)
        var = jnp.mean(jnp.square(xf - jnp.expand_dims(mean, axes)), axis=axes)
      else:  # BatchNorm1d on [B, ch]: every sample is one position.
        mean, var = xf, jnp.zeros_like(xf)
      self.sow(BN_COLLECTION, "moments", (mean, var))
      order = getattr(_CALL_ORDER, "paths", None)
      if order is not None:
        order.append(tuple(self.path))
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
