"""The models' fast BN statistics agree with the plain jnp / flax formulas, values and gradients:
models.base.spatial_moments (the BN-input moments recover matches) and models.base._BatchNorm
(train-mode BatchNorm of teacher and student)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from wmdd_jax.models import base, get_model, init_model


@pytest.mark.parametrize("positions", [1, 7 * 5, 64])
def test_spatial_moments_match_autodiff_of_the_plain_formula(positions):
  rng = np.random.default_rng(positions)
  x = jnp.asarray(rng.normal(1.0, 2.0, size=(3, positions, 6)).astype(np.float32))
  w1, w2 = (jnp.asarray(rng.normal(size=(3, 6)).astype(np.float32)) for _ in range(2))
  for a, b in zip(base.spatial_moments(x), base.reference_moments(x)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)

  def loss(moments):
    return lambda x: jnp.sum(moments(x)[0] * w1) + jnp.sum(jnp.sqrt(moments(x)[1] + 1.0) * w2)

  np.testing.assert_allclose(jax.grad(loss(base.spatial_moments))(x),
                             jax.grad(loss(base.reference_moments))(x), rtol=1e-4, atol=1e-6)


def _apply(module, variables, x, train):
  y, updates = module.apply(variables, x, train, mutable=["batch_stats"])
  return y, updates["batch_stats"]


@pytest.mark.parametrize("train", [True, False])
def test_batch_norm_matches_flax(train):
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(0.5, 2.0, size=(4, 6, 5, 8)).astype(np.float32))
  w = jnp.asarray(rng.normal(size=x.shape).astype(np.float32))
  variables = {"params": {"scale": jnp.linspace(0.5, 1.5, 8), "bias": jnp.linspace(-1, 1, 8)},
               "batch_stats": {"mean": jnp.linspace(0, 1, 8), "var": jnp.linspace(1, 2, 8)}}
  ours = base._BatchNorm(0.9, 1e-5, nn.initializers.ones)
  flax_bn = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5)
  flax_apply = lambda v, x, train: flax_bn.apply(v, x, mutable=["batch_stats"])
  assert (jax.tree.map(jnp.shape, ours.init(jax.random.key(0), x, False))
          == jax.tree.map(jnp.shape, flax_bn.init(jax.random.key(0), x)))

  def loss(apply):
    def f(v, x):
      y, stats = apply(v, x, train)
      return jnp.sum(jnp.sin(y) * w), stats
    return jax.value_and_grad(f, argnums=(0, 1), has_aux=True)

  (l1, s1), g1 = loss(lambda v, x, t: _apply(ours, v, x, t))(variables, x)
  (l2, s2), g2 = loss(flax_apply)(variables, x)
  np.testing.assert_allclose(l1, l2, rtol=1e-5)
  for a, b in zip(jax.tree.leaves((g1, s1)), jax.tree.leaves((g2, s2))):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_convnet_train_step_matches_flax_batch_norm():
  # The whole model: train-mode logits, BN updates and parameter gradients, fast vs flax BN.
  model = get_model("convnet", 3, depth=2, width=8)
  variables = init_model(model, jax.random.key(0), (8, 8, 3))
  x = jnp.asarray(np.random.default_rng(1).normal(size=(5, 8, 8, 3)).astype(np.float32))

  def run():
    def loss(params):
      (logits, _), upd = model.apply({"params": params, "batch_stats": variables["batch_stats"]},
                                     x, train=True, mutable=["batch_stats"])
      return jnp.sum(jax.nn.log_softmax(logits)[:, 0]), upd
    return jax.value_and_grad(loss, has_aux=True)(variables["params"])

  fast = run()
  base.FAST_BATCH_NORM = False
  try:
    reference = run()
  finally:
    base.FAST_BATCH_NORM = True
  for a, b in zip(jax.tree.leaves(fast), jax.tree.leaves(reference)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
