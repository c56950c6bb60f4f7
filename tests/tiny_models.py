"""A tiny BN model whose layers are simple enough to recompute in numpy (shared by tests)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from wmdd_jax.models.base import CapturingBatchNorm


class TinyNet(nn.Module):
  """BN(x) -> relu -> 1x1 conv -> BN -> relu -> spatial mean (features) -> dense (logits)."""

  num_classes: int = 3
  width: int = 4

  @nn.compact
  def __call__(self, x, train: bool):
    h = nn.relu(CapturingBatchNorm(name="bn0")(x, train))
    h = nn.Conv(self.width, (1, 1), use_bias=False, name="conv")(h)
    h = nn.relu(CapturingBatchNorm(name="bn1")(h, train))
    features = h.mean(axis=(1, 2))
    return nn.Dense(self.num_classes, name="head")(features), features


def tiny_variables(model: TinyNet, image_shape, seed: int = 0):
  """Variables with non-trivial BN affine parameters and running statistics."""
  variables = model.init(jax.random.key(seed), jnp.zeros((1, *image_shape)), train=False)
  variables = {k: v for k, v in variables.items() if k in ("params", "batch_stats")}
  rng = np.random.default_rng(seed)

  def perturb(path, leaf):
    name = path[-1].key
    shape = leaf.shape
    if name == "var":
      return jnp.asarray(rng.uniform(0.5, 2.0, shape), jnp.float32)
    if name in ("mean", "bias"):
      return jnp.asarray(rng.normal(0, 0.5, shape), jnp.float32)
    if name == "scale":
      return jnp.asarray(rng.uniform(0.5, 1.5, shape), jnp.float32)
    return leaf

  return jax.tree_util.tree_map_with_path(perturb, variables)


def numpy_forward(variables, x):
  """Independent numpy (float64) forward: returns (logits, features, [bn0_input, bn1_input])."""
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), variables["params"])
  s = jax.tree.map(lambda a: np.asarray(a, np.float64), variables["batch_stats"])

  def bn(h, name):
    st, pr = s[name]["bn"], p[name]["bn"]
    return (h - st["mean"]) / np.sqrt(st["var"] + 1e-5) * pr["scale"] + pr["bias"]

  x = np.asarray(x, np.float64)
  h0 = np.maximum(bn(x, "bn0"), 0)
  in1 = h0 @ p["conv"]["kernel"][0, 0]
  h1 = np.maximum(bn(in1, "bn1"), 0)
  features = h1.mean(axis=(1, 2))
  logits = features @ p["head"]["kernel"] + p["head"]["bias"]
  return logits, features, [x, in1]
