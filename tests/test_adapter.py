"""wmdd_jax.models.adapt: a plain Flax classifier as teacher and student."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.tiny_models import TinyNet, numpy_forward, tiny_variables
from wmdd_jax import ConfigError
from wmdd_jax import recover as recover_lib
from wmdd_jax.evaluate import EvaluateOptions, train_student
from wmdd_jax.models import Adapted, adapt, apply_model, init_model, module_paths, pool_moments

SHAPE = (6, 6, 3)


class PlainTiny(nn.Module):
  """TinyNet written with plain nn.BatchNorm and a ``training`` flag: no wmdd_jax contract."""

  num_classes: int = 3
  width: int = 4

  @nn.compact
  def __call__(self, x, training: bool = False):
    h = nn.relu(nn.BatchNorm(use_running_average=not training, momentum=0.9, epsilon=1e-5,
                             name="bn0")(x))
    h = nn.Conv(self.width, (1, 1), use_bias=False, name="conv")(h)
    h = nn.relu(nn.BatchNorm(use_running_average=not training, momentum=0.9, epsilon=1e-5,
                             name="bn1")(h))
    return nn.Dense(self.num_classes, name="head")(h.mean(axis=(1, 2)))


class NoModeNet(nn.Module):
  """A classifier whose __call__ takes no mode flag; features from a named pooling layer."""

  num_classes: int = 3

  @nn.compact
  def __call__(self, x):
    h = nn.Conv(8, (3, 3), name="conv0")(x)
    h = nn.relu(nn.BatchNorm(momentum=0.9, name="bn0")(h))
    h = nn.Conv(8, (3, 3), strides=2, name="conv1")(h)
    h = nn.relu(nn.BatchNorm(momentum=0.9, name="bn1")(h))
    h = nn.Dropout(0.3)(h)
    h = nn.Dense(16, name="embed")(h.mean(axis=(1, 2)))
    return nn.Dense(self.num_classes, name="head")(nn.relu(h))


def _plain_variables(variables):
  """TinyNet variables (bn*/bn/...) in PlainTiny's layout (bn*/...), under the adapter's
  "module" scope."""
  def strip(tree):
    return {name: (sub["bn"] if name.startswith("bn") else sub) for name, sub in tree.items()}

  return {col: {"module": strip(variables[col])} for col in ("params", "batch_stats")}


def test_adapted_plain_model_matches_the_registered_contract(rng):
  """Logits, features and every BN input's moments of an adapted plain model equal those of the
  same network built with CapturingBatchNorm, and an independent numpy forward pass."""
  reference = TinyNet()
  variables = tiny_variables(reference, SHAPE)
  model = adapt(PlainTiny(), features="head:input")
  assert model.train_arg == "training"
  plain = _plain_variables(variables)
  x = jnp.asarray(rng.normal(size=(5, *SHAPE)), jnp.float32)

  want = apply_model(reference, variables, x)
  got = apply_model(model, plain, x)
  np.testing.assert_allclose(got.logits, want.logits, atol=1e-5)
  np.testing.assert_allclose(got.features, want.features, atol=1e-5)
  assert len(got.bn_mean) == 2
  logits, features, bn_inputs = numpy_forward(variables, np.asarray(x))
  np.testing.assert_allclose(got.logits, logits, atol=1e-4)
  for layer, h in enumerate(bn_inputs):
    np.testing.assert_allclose(got.bn_mean[layer], h.mean(axis=(1, 2)), atol=1e-5)
    np.testing.assert_allclose(got.bn_var[layer], h.var(axis=(1, 2)), atol=1e-5)
  # Pooled per-sample moments are the moments of the whole batch (what statistics uses).
  mu, var = pool_moments(got.bn_mean[1], got.bn_var[1])
  np.testing.assert_allclose(var, bn_inputs[1].var(axis=(0, 1, 2)), atol=1e-5)

  # Running statistics in forward order, as the registered model's (the SRe2L targets).
  from wmdd_jax.models.adapter import running_statistics
  from wmdd_jax.models.base import running_statistics as registered_running
  for got_t, want_t in zip(running_statistics(model, plain, SHAPE),
                           registered_running(reference, variables, SHAPE)):
    for g, w in zip(got_t, want_t):
      np.testing.assert_allclose(g, w)
  # Train mode: the same BN statistics update as the registered model's.
  (_, want_stats), (_, got_stats) = (apply_model(reference, variables, x, train=True),
                                     apply_model(model, plain, x, train=True))
  for name in ("bn0", "bn1"):
    for stat in ("mean", "var"):
      np.testing.assert_allclose(got_stats["module"][name][stat],
                                 want_stats[name]["bn"][stat], atol=1e-5)
  del mu


def test_features_by_path_default_and_callable(rng):
  net = NoModeNet()
  x = jnp.asarray(rng.normal(size=(4, 8, 8, 3)), jnp.float32)
  by_default = adapt(net)  # the input of the last Dense: relu(embed)
  assert by_default.train_arg == ""
  variables = init_model(by_default, jax.random.key(0), (8, 8, 3))
  out = apply_model(by_default, variables, x)
  assert out.features.shape == (4, 16) and len(out.bn_mean) == 2
  embed = apply_model(adapt(net, features="embed"), variables, x).features
  np.testing.assert_allclose(out.features, jnp.maximum(embed, 0), atol=1e-6)
  conv = apply_model(adapt(net, features="conv1"), variables, x).features
  assert conv.shape == (4, 4 * 4 * 8)  # a feature map is flattened
  both = adapt(net, features=lambda m, x, train: (m(x), m(x)[:, :2]))
  got = apply_model(both, variables, x)
  np.testing.assert_allclose(got.features, out.logits[:, :2], atol=1e-6)
  # Train mode reaches plain BatchNorms through the adapter (the module takes no flag), and
  # dropout is off, so no dropout key is needed.
  _, stats = apply_model(by_default, variables, x, train=True)
  assert not np.allclose(stats["module"]["bn0"]["mean"],
                         variables["batch_stats"]["module"]["bn0"]["mean"])
  assert any(p.startswith("embed ") for p in module_paths(by_default, (8, 8, 3)))
  with pytest.raises(ConfigError, match="no submodule at 'nope'"):
    apply_model(adapt(net, features="nope"), variables, x)
  with pytest.raises(ConfigError, match="no argument 'mode'"):
    adapt(net, train_arg="mode")
  with pytest.raises(ConfigError, match="flax.linen Module"):
    adapt(object())
  assert isinstance(hash(by_default), int) and isinstance(by_default, Adapted)


def test_student_is_a_plain_flax_module_through_the_adapter(rng):
  """train_student trains an adapted plain module: its KD loss falls and it agrees with the
  teacher on the synthetic images far more often than the majority class would."""
  teacher = TinyNet()
  teacher_vars = tiny_variables(teacher, SHAPE, seed=1)
  images = rng.normal(size=(24, *SHAPE)).astype(np.float32)
  # Sharpen and centre the random teacher's logits, so that its soft labels carry signal and
  # it predicts every class.
  head = teacher_vars["params"]["head"]
  head["kernel"] = head["kernel"] * 10
  head["bias"] = head["bias"] - apply_model(teacher, teacher_vars, images).logits.mean(0)
  labels = np.asarray(jnp.argmax(apply_model(teacher, teacher_vars, images).logits, -1))
  student = adapt(NoModeNet(num_classes=3))
  options = EvaluateOptions(epochs=30, batch_size=12, lr=1e-2, temperature=1.0, eval_every=10,
                            crop_scale=(1.0, 1.0), cutmix=False, progress=False)
  result = train_student(student, teacher, teacher_vars, images, None, (images, labels),
                         options=options, key=jax.random.key(0))
  losses = [r.train_loss for r in result.history]
  assert np.isfinite(losses).all() and losses[-1] < losses[0], losses
  assert "module" in result.variables["params"]
  majority = np.bincount(labels, minlength=3).max() / len(labels) * 100  # 45.8%
  assert result.top1 > majority + 10, (result.top1, majority)  # 70.8% here


def test_adapted_teacher_runs_recover(rng):
  """A few recover steps with an adapted plain teacher: finite, and the loss goes down."""
  teacher = adapt(PlainTiny(), features="head:input")
  variables = _plain_variables(tiny_variables(TinyNet(), SHAPE))
  x = jnp.asarray(rng.normal(size=(20, *SHAPE)), jnp.float32)
  labels = np.repeat(np.arange(2), 10)
  out = apply_model(teacher, variables, x)
  bn_mean, bn_var = [], []
  for layer in range(len(out.bn_mean)):
    per_class = [pool_moments(out.bn_mean[layer][labels == c], out.bn_var[layer][labels == c])
                 for c in range(2)]
    bn_mean.append(jnp.stack([m for m, _ in per_class]))
    bn_var.append(jnp.stack([v for _, v in per_class]))
  support = jnp.stack([out.features[labels == c][:2] for c in range(2)])  # [C, k, d]
  targets = recover_lib.RecoverTargets(support, tuple(bn_mean), tuple(bn_var), (), ())
  options = recover_lib.RecoverOptions(iterations=8, steps_per_call=8, lr=0.1)
  images, history = recover_lib.recover(
      teacher, variables, targets, ipc=2, image_shape=SHAPE, mean=(0.5,) * 3, std=(0.5,) * 3,
      options=options, key=jax.random.key(0), progress=False)
  assert images.shape == (2, 2, *SHAPE) and np.isfinite(images).all()
  assert history["loss"][-1] < history["loss"][0]
