"""Tests of the model registry, ResNets and ConvNets (shapes, BN capture, determinism)."""

from types import SimpleNamespace

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from wmdd_jax import ConfigError, ShapeError
from wmdd_jax.models import (
    BasicBlock,
    Bottleneck,
    CapturingBatchNorm,
    ResNet,
    apply_model,
    bn_layer_paths,
    get_model,
    init_model,
    list_models,
)


def _abstract_outputs(model, image_shape, batch=2):
  """Output shapes/dtypes of init and apply, traced without compiling or computing."""
  x = jax.ShapeDtypeStruct((batch, *image_shape), jnp.float32)
  variables = jax.eval_shape(
      lambda x: model.init(jax.random.key(0), x, train=False, mutable=["params", "batch_stats"]),
      x)
  logits, features = jax.eval_shape(lambda v, x: model.apply(v, x, train=False), variables, x)
  return variables, logits, features


def _num_params(variables):
  return sum(int(np.prod(p.shape)) for p in jax.tree.leaves(variables["params"]))


_STEM_SIZES = {"imagenet": 32, "tiny": 16, "cifar": 16, "tiny_official": 16}


@pytest.mark.parametrize("name,feature_dim,stem,channels", [
    *[("resnet18", 512, stem, ch) for stem in _STEM_SIZES for ch in (1, 3)],
    ("resnet34", 512, "tiny", 1), ("resnet50", 2048, "cifar", 3),
    ("resnet101", 2048, "imagenet", 1)])
def test_resnet_output_shapes(name, feature_dim, stem, channels):
  model = get_model(name, 5, stem=stem)
  size = _STEM_SIZES[stem]
  _, logits, features = _abstract_outputs(model, (size, size, channels))
  assert logits.shape == (2, 5) and logits.dtype == jnp.float32
  assert features.shape == (2, feature_dim) and features.dtype == jnp.float32


@pytest.mark.parametrize("name,depth", [("convnet_d3", 3), ("convnet_d4", 4), ("convnet", 3)])
@pytest.mark.parametrize("channels", [1, 3])
def test_convnet_output_shapes(name, depth, channels):
  model = get_model(name, 4)
  _, logits, features = _abstract_outputs(model, (32, 32, channels))
  side = 32 // 2**depth
  assert logits.shape == (2, 4)
  assert features.shape == (2, 128 * side * side)
  # Non-power-of-two sizes floor at each pool (28 -> 14 -> 7 -> 3), as in the DD code.
  _, _, features = _abstract_outputs(get_model("convnet_d3", 10), (28, 28, channels))
  assert features.shape == (2, 128 * 3 * 3)


def test_convnet_pooled_features_are_the_flat_maps_spatial_mean():
  flat_model, pooled_model = get_model("convnet_d3", 4), get_model("convnet_d3", 4,
                                                                   features="pooled")
  x = jax.random.normal(jax.random.key(0), (3, 32, 32, 3))
  variables = flat_model.init(jax.random.key(1), x, train=False)
  logits, flat = flat_model.apply(variables, x, train=False)
  logits_p, pooled = pooled_model.apply(variables, x, train=False)  # same parameters
  np.testing.assert_array_equal(np.asarray(logits_p), np.asarray(logits))
  expected = np.asarray(flat).reshape(3, 4, 4, 128).mean(axis=(1, 2))  # NHWC flattened
  np.testing.assert_allclose(np.asarray(pooled), expected, rtol=1e-5, atol=1e-6)
  with pytest.raises(ConfigError, match="features='spatial'"):
    get_model("convnet_d3", 4, features="spatial")


def test_parameter_counts_match_torchvision():
  # torchvision.models.resnet18() / resnet50(): 11,689,512 and 25,557,032 parameters.
  for name, expected in [("resnet18", 11_689_512), ("resnet50", 25_557_032)]:
    variables, _, _ = _abstract_outputs(get_model(name, 1000), (224, 224, 3), batch=1)
    assert _num_params(variables) == expected
    assert set(variables) == {"params", "batch_stats"}


def test_bn_order_is_forward_order():
  paths = bn_layer_paths(get_model("resnet18", 10, stem="cifar"), (16, 16, 3))
  assert len(paths) == 20
  assert paths[:8] == ("bn1", "layer1_0/bn1", "layer1_0/bn2", "layer1_1/bn1", "layer1_1/bn2",
                       "layer2_0/bn1", "layer2_0/bn2", "layer2_0/downsample_bn")
  paths = bn_layer_paths(get_model("resnet50", 10), (32, 32, 3))
  assert len(paths) == 53
  assert paths[:6] == ("bn1", "layer1_0/bn1", "layer1_0/bn2", "layer1_0/bn3",
                       "layer1_0/downsample_bn", "layer1_1/bn1")
  assert bn_layer_paths(get_model("convnet_d4", 10), (32, 32, 3)) == ("bn0", "bn1", "bn2", "bn3")


def test_registry_errors():
  with pytest.raises(ConfigError, match="resnet18.*convnet_d4"):
    get_model("vgg11", 10)
  with pytest.raises(ConfigError, match="allowed"):
    get_model("resnet18", 10, depth=3)
  with pytest.raises(ConfigError, match="stem"):
    get_model("resnet18", 10, stem="cifar10")
  with pytest.raises(ConfigError, match="depth"):
    get_model("convnet_d3", 10, depth=4)
  with pytest.raises(ConfigError, match="dtype"):
    get_model("convnet", 10, dtype="float13")
  with pytest.raises(ConfigError):
    get_model("resnet18", 0)
  assert get_model("ResNet18", 3).num_classes == 3
  assert set(list_models()) >= {"resnet18", "resnet34", "resnet50", "resnet101", "convnet",
                                "convnet_d3", "convnet_d4"}
  with pytest.raises(ShapeError, match="depth"):
    _abstract_outputs(get_model("convnet_d4", 10), (8, 8, 1))


def test_init_like_torchvision():
  model = get_model("resnet18", 10, stem="cifar", zero_init_residual=True)
  variables = init_model(model, jax.random.key(0), (16, 16, 3))
  assert set(variables) == {"params", "batch_stats"}
  kernel = np.asarray(variables["params"]["layer3_0"]["conv1"]["kernel"])  # 3x3, 128 -> 256
  np.testing.assert_allclose(kernel.std(), np.sqrt(2.0 / (3 * 3 * 256)), rtol=0.05)
  assert np.all(np.asarray(variables["params"]["layer1_0"]["bn2"]["bn"]["scale"]) == 0)
  assert np.all(np.asarray(variables["params"]["layer1_0"]["bn1"]["bn"]["scale"]) == 1)
  assert np.all(np.asarray(variables["batch_stats"]["bn1"]["bn"]["var"]) == 1)


def _random_variables(model, image_shape, seed=0):
  """Variables with non-trivial BN affine parameters and running statistics."""
  variables = init_model(model, jax.random.key(seed), image_shape)
  rng = np.random.default_rng(seed)

  def perturb(path, leaf):
    name = path[-1].key
    if name == "var":
      return jnp.asarray(rng.uniform(0.5, 2.0, leaf.shape), jnp.float32)
    if name in ("mean", "bias"):
      return jnp.asarray(rng.normal(0, 0.3, leaf.shape), jnp.float32)
    if name == "scale":
      return jnp.asarray(rng.uniform(0.5, 1.5, leaf.shape), jnp.float32)
    return leaf

  return jax.tree_util.tree_map_with_path(perturb, variables)


# Small widths (and a one-block-per-stage Bottleneck ResNet) keep the real computations fast; the
# topology is what is tested. Each model is compiled once, in one function returning everything.
_SMALL_MODELS = {
    "resnet18": (lambda: get_model("resnet18", 5, stem="cifar", width=8), (16, 16, 3)),
    "bottleneck": (lambda: ResNet(stage_sizes=(1, 1, 1, 1), block_cls=Bottleneck, num_classes=5,
                                  stem="imagenet", width=4), (32, 32, 1)),
    "convnet_d3": (lambda: get_model("convnet_d3", 5, width=16), (16, 16, 1)),
}


def _image_loss(out):
  """A scalar that depends on logits, features and every captured BN moment."""
  bn = sum(jnp.sum(jnp.sqrt(v + 1e-8)) + jnp.sum(m) for m, v in zip(out.bn_mean, out.bn_var))
  return jnp.sum(out.logits) + jnp.sum(out.features**2) + bn


@pytest.fixture(scope="module", params=list(_SMALL_MODELS))
def probe(request):
  make, image_shape = _SMALL_MODELS[request.param]
  model = make()
  variables = _random_variables(model, image_shape)
  images = jax.random.normal(jax.random.key(1), (3, *image_shape))

  @jax.jit
  def run(variables, images):
    # Independently record every BN layer's input, in call order, with a method interceptor.
    inputs = []

    def record(next_fun, args, kwargs, context):
      if isinstance(context.module, CapturingBatchNorm) and context.method_name == "__call__":
        inputs.append(args[0])
      return next_fun(*args, **kwargs)

    with nn.intercept_methods(record):
      out = apply_model(model, variables, images)
    _, state = model.apply(variables, images, train=False, mutable=["batch_stats"])
    grad = jax.grad(lambda x: _image_loss(apply_model(model, variables, x)))(images)
    return out, inputs, state["batch_stats"], grad

  out, inputs, batch_stats, grad = run(variables, images)
  return SimpleNamespace(name=request.param, model=model, image_shape=image_shape,
                         variables=variables, images=images, run=run, out=out, inputs=inputs,
                         batch_stats=batch_stats, grad=grad)


def test_captured_bn_moments_match_recomputation(probe):
  out, inputs = probe.out, probe.inputs
  paths = bn_layer_paths(probe.model, probe.image_shape)
  assert len(out.bn_mean) == len(out.bn_var) == len(inputs) == len(paths)
  for path, x, mean, var in zip(paths, inputs, out.bn_mean, out.bn_var):
    x = np.asarray(x, np.float64)
    assert mean.shape == var.shape == (x.shape[0], x.shape[-1]), path
    np.testing.assert_allclose(mean, x.mean(axis=(1, 2)), atol=1e-5, rtol=1e-5, err_msg=path)
    np.testing.assert_allclose(var, x.var(axis=(1, 2)), atol=1e-5, rtol=1e-5, err_msg=path)


def test_eval_is_deterministic_and_leaves_batch_stats(probe):
  again = probe.run(probe.variables, probe.images)[0]
  for x, y in zip(jax.tree.leaves(probe.out), jax.tree.leaves(again)):
    np.testing.assert_array_equal(x, y)
  for x, y in zip(jax.tree.leaves(probe.batch_stats),
                  jax.tree.leaves(probe.variables["batch_stats"])):
    np.testing.assert_array_equal(x, y)
  assert probe.out.logits.shape == (3, 5)


def test_image_gradient_is_finite(probe):
  assert probe.grad.shape == probe.images.shape
  assert np.all(np.isfinite(probe.grad)) and np.any(probe.grad != 0)


def test_train_mode_updates_running_statistics():
  model = get_model("convnet_d3", 5, width=8)
  variables = _random_variables(model, (8, 8, 1))
  images = jax.random.normal(jax.random.key(2), (4, 8, 8, 1))
  out, new_stats = jax.jit(lambda v, x: apply_model(model, v, x, train=True))(variables, images)
  old = variables["batch_stats"]["bn0"]["bn"]
  new = new_stats["bn0"]["bn"]
  # PyTorch momentum 0.1: new = 0.9 old + 0.1 batch (unbiased variance for the running var).
  x = np.asarray(out.bn_mean[0]).mean(0)
  np.testing.assert_allclose(new["mean"], 0.9 * np.asarray(old["mean"]) + 0.1 * x, atol=1e-5)


def test_bfloat16_compute_keeps_float32_outputs():
  image_shape = (16, 16, 3)
  make = lambda dtype: ResNet(stage_sizes=(1, 1, 1, 1), block_cls=BasicBlock, num_classes=5,
                              stem="cifar", width=8, dtype=dtype)
  f32, bf16 = make(None), make(jnp.bfloat16)
  variables = _random_variables(f32, image_shape)
  images = jax.random.normal(jax.random.key(4), (2, *image_shape))
  a, b = jax.jit(lambda v, x: (apply_model(f32, v, x), apply_model(bf16, v, x)))(
      variables, images)
  assert b.logits.dtype == b.features.dtype == b.bn_mean[0].dtype == jnp.float32
  # Same parameters, so the outputs agree to bf16 precision.
  np.testing.assert_allclose(b.features, a.features, atol=0.1, rtol=0.1)
