"""Relabel + evaluate: views, CutMix, soft labels, the KD loss, the optimiser and a short run."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from wmdd_jax import DataError, ShapeError, training
from wmdd_jax import teacher as teacher_lib
from wmdd_jax.evaluate import EvaluateOptions, make_optimizer, train_student
from wmdd_jax.models import get_model, init_model
from wmdd_jax.models.base import CapturingBatchNorm, apply_model
from wmdd_jax.relabel import (
  batch_key,
  cutmix,
  epoch_batches,
  kd_loss,
  make_views,
  mix_weights,
  relabel_batch,
  stream_keys,
  weight_decay_mask,
)

SHAPE = (8, 8, 1)
# One compiled make_views for the tests below (compiling it dominates their run time).
_views = jax.jit(make_views, static_argnames=("scale", "ratio", "use_cutmix", "alpha"))


class SmallNet(nn.Module):
  """conv3x3 - BN - relu - conv3x3/2 - BN - relu - global mean (features) - dense (logits)."""

  num_classes: int = 10
  width: int = 16

  @nn.compact
  def __call__(self, x, train: bool):
    h = nn.relu(CapturingBatchNorm(name="bn0")(nn.Conv(self.width, (3, 3), name="conv0")(x),
                                                train))
    h = nn.Conv(2 * self.width, (3, 3), strides=2, name="conv1")(h)
    h = nn.relu(CapturingBatchNorm(name="bn1")(h, train))
    features = h.mean(axis=(1, 2))
    return nn.Dense(self.num_classes, name="head")(features), features


def _variables(model, seed=0):
  return init_model(model, jax.random.key(seed), SHAPE)  # jitted: eager init is slow on CPU


def _numpy_kl(s, t, temperature):
  def log_softmax(z):
    z = np.asarray(z, np.float64) / temperature
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))

  log_p, log_q = log_softmax(t), log_softmax(s)
  return (np.exp(log_p) * (log_p - log_q)).sum(-1)


# ---------------------------------------------------------------------------------------------
# Views and CutMix.


def test_views_deterministic_with_right_shapes():
  images = jax.random.normal(jax.random.key(0), (6, *SHAPE))
  a, mix_a = _views(jax.random.key(1), images)
  b, mix_b = _views(jax.random.key(1), images)
  c, _ = _views(jax.random.key(2), images)
  assert a.shape == images.shape and a.dtype == jnp.float32
  np.testing.assert_array_equal(a, b)
  np.testing.assert_array_equal(mix_a.perm, mix_b.perm)
  assert not np.allclose(a, c)
  assert sorted(np.asarray(mix_a.perm).tolist()) == list(range(6))
  assert 0.0 < float(mix_a.lam) <= 1.0
  # Without CutMix the record is the identity, so weights are left unchanged.
  _, mix = _views(jax.random.key(1), images, use_cutmix=False)
  np.testing.assert_array_equal(mix.perm, np.arange(6))
  assert float(mix.lam) == 1.0
  with pytest.raises(ShapeError):
    make_views(jax.random.key(1), images[0])


def test_cutmix_pixels_come_from_the_right_sources():
  b, h, w = 5, 8, 6
  # Every pixel of every image is unique, so each mixed pixel names its source image.
  images = jnp.arange(b * h * w * 2, dtype=jnp.float32).reshape(b, h, w, 2)
  saw_partial = False
  for seed in range(30):
    mixed, mix = jax.jit(cutmix)(jax.random.key(seed), images)
    mixed, perm = np.asarray(mixed), np.asarray(mix.perm)
    y0, x0, y1, x1 = np.asarray(mix.box)
    inside = np.zeros((h, w), bool)
    inside[y0:y1, x0:x1] = True
    imgs = np.asarray(images)
    for i in range(b):
      np.testing.assert_array_equal(mixed[i][inside], imgs[perm[i]][inside])
      np.testing.assert_array_equal(mixed[i][~inside], imgs[i][~inside])
    own = np.mean(~inside)
    np.testing.assert_allclose(float(mix.lam), own, rtol=0, atol=1e-6)
    saw_partial |= 0 < own < 1
  assert saw_partial


def test_mix_weights_area_weighted_and_mean_preserving():
  images = jax.random.normal(jax.random.key(0), (6, *SHAPE))
  weights = jnp.asarray([0.1, 0.5, 0.2, 0.9, 0.3, 0.05])
  _, mix = _views(jax.random.key(3), images)
  mixed = np.asarray(mix_weights(weights, mix))
  lam, perm, w = float(mix.lam), np.asarray(mix.perm), np.asarray(weights)
  np.testing.assert_allclose(mixed, lam * w + (1 - lam) * w[perm], rtol=1e-6)
  np.testing.assert_allclose(mixed.mean(), w.mean(), rtol=1e-6)


def test_epoch_batches_cover_the_set():
  key = jax.random.key(0)
  batches = epoch_batches(key, 3, 250, 100)
  assert [len(b) for b in batches] == [100, 100, 50]
  assert sorted(np.concatenate(batches).tolist()) == list(range(250))
  assert [len(b) for b in epoch_batches(key, 0, 30, 100)] == [30]  # whole set when smaller
  assert not np.array_equal(epoch_batches(key, 0, 250, 100)[0], batches[0])


# ---------------------------------------------------------------------------------------------
# Soft labels and the loss.


def test_soft_labels_deterministic_per_epoch_and_step():
  model = SmallNet()
  variables = _variables(model)
  images = jax.random.normal(jax.random.key(0), (8, *SHAPE))
  weights = jnp.linspace(0.5, 1.5, 8)
  _, _, views_key = stream_keys(jax.random.key(42))
  relabel = jax.jit(relabel_batch, static_argnums=(0, 5))
  opts = EvaluateOptions()
  a = relabel(model, variables, images, weights, batch_key(views_key, 2, 3), opts)
  b = relabel(model, variables, images, weights, batch_key(views_key, 2, 3), opts)
  c = relabel(model, variables, images, weights, batch_key(views_key, 2, 4), opts)
  d = relabel(model, variables, images, weights, batch_key(views_key, 3, 3), opts)
  np.testing.assert_array_equal(a.teacher_logits, b.teacher_logits)
  np.testing.assert_array_equal(a.views, b.views)
  assert not np.allclose(a.teacher_logits, c.teacher_logits)
  assert not np.allclose(a.teacher_logits, d.teacher_logits)
  # The soft labels are the teacher's eval-mode logits on exactly those views.
  logits = apply_model(model, variables, a.views, train=False, capture_bn=False).logits
  np.testing.assert_allclose(a.teacher_logits, logits, rtol=1e-5, atol=1e-5)


def test_kd_loss_matches_numpy_with_weights():
  rng = np.random.default_rng(0)
  s, t = rng.normal(size=(6, 5)) * 30, rng.normal(size=(6, 5)) * 30
  w = rng.uniform(0.1, 2.0, size=6)
  for temperature in (1.0, 20.0):
    expected = np.mean(_numpy_kl(s, t, temperature) * w / w.mean())
    got = kd_loss(jnp.asarray(s, jnp.float32), jnp.asarray(t, jnp.float32),
                  jnp.asarray(w, jnp.float32), temperature)
    np.testing.assert_allclose(float(got), expected, rtol=1e-5)
  same = kd_loss(jnp.asarray(t, jnp.float32), jnp.asarray(t, jnp.float32), jnp.asarray(w))
  assert float(same) == pytest.approx(0, abs=1e-6)


def test_kd_loss_uniform_weights_is_plain_mean():
  rng = np.random.default_rng(1)
  s, t = (jnp.asarray(rng.normal(size=(4, 3)) * 10, jnp.float32) for _ in range(2))
  plain = np.mean(_numpy_kl(s, t, 20.0))
  np.testing.assert_allclose(float(kd_loss(s, t, None)), plain, rtol=1e-5)
  np.testing.assert_allclose(float(kd_loss(s, t, jnp.full((4,), 3.7))), plain, rtol=1e-5)
  assert float(kd_loss(s, t, jnp.zeros(4))) == 0.0  # all-zero weights: no NaN


# ---------------------------------------------------------------------------------------------
# Optimiser.


def test_weight_decay_mask_excludes_bn_and_biases():
  params = _variables(SmallNet())["params"]
  mask = weight_decay_mask(params)
  assert mask["conv0"]["kernel"] and mask["conv1"]["kernel"] and mask["head"]["kernel"]
  assert not mask["conv0"]["bias"] and not mask["head"]["bias"]
  for bn in ("bn0", "bn1"):
    assert not mask[bn]["bn"]["scale"] and not mask[bn]["bn"]["bias"]
  # The optimiser applies it: with zero gradients only decayed leaves move.
  tx = make_optimizer(EvaluateOptions(lr=0.1, weight_decay=0.5), steps_per_epoch=1)
  update = jax.jit(lambda p: tx.update(jax.tree.map(jnp.zeros_like, p), tx.init(p), p)[0])
  updates = update(params)
  moved = jax.tree.map(lambda u: bool(jnp.any(u != 0)), updates)
  assert moved == mask


def test_weight_decay_mask_on_resnet18():
  model = get_model("resnet18", 10, stem="cifar")
  shapes = jax.eval_shape(lambda k, x: model.init(k, x, train=False), jax.random.key(0),
                          jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32))
  flat = jax.tree_util.tree_flatten_with_path(weight_decay_mask(shapes["params"]))[0]
  decayed = {"/".join(k.key for k in path) for path, on in flat if on}
  assert "layer2_0/downsample_conv/kernel" in decayed and "fc/kernel" in decayed
  assert not any("bn" in p or p.endswith("bias") for p in decayed)
  assert len(decayed) == 1 + 16 + 3 + 1  # stem conv, 8 blocks x 2 convs, 3 shortcuts, fc


# ---------------------------------------------------------------------------------------------
# A short end-to-end run on sklearn digits.


@pytest.fixture(scope="module")
def digits():
  from sklearn.datasets import load_digits
  from sklearn.model_selection import train_test_split

  data = load_digits()
  images = np.round(data.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
  x_train, x_test, y_train, y_test = train_test_split(
      images, data.target.astype(np.int32), test_size=0.3, random_state=0,
      stratify=data.target)
  unit = x_train.astype(np.float32) / 255.0
  mean, std = (float(unit.mean()),), (float(unit.std()),)
  return x_train, y_train, x_test, y_test, mean, std


@pytest.fixture(scope="module")
def teacher(digits):
  x_train, y_train, x_test, y_test, mean, std = digits
  model = SmallNet()
  config = teacher_lib.TeacherOptions(epochs=8, batch_size=64, learning_rate=0.2,
                                   weight_decay=5e-4, crop_padding=0, flip=False, eval_every=8)
  variables = teacher_lib.train_teacher(model, (x_train, y_train), None, config, mean=mean,
                                      std=std, progress=False)
  acc = training.evaluate(model, variables, (x_test, y_test), mean=mean, std=std)["top1"]
  assert acc > 90, acc
  return model, variables


def _synthetic_set(digits, ipc=10, seed=0):
  x_train, y_train, _, _, mean, std = digits
  rng = np.random.default_rng(seed)
  idx = np.concatenate([rng.choice(np.flatnonzero(y_train == c), ipc, replace=False)
                        for c in range(10)])
  images = (x_train[idx].astype(np.float32) / 255.0 - np.asarray(mean)) / np.asarray(std)
  return images.astype(np.float32)


def test_student_learns_from_soft_labels(digits, teacher):
  _, _, x_test, y_test, mean, std = digits
  teacher_model, teacher_variables = teacher
  images = _synthetic_set(digits)
  weights = np.random.default_rng(1).uniform(0.5, 1.5, size=len(images)).astype(np.float32)
  options = EvaluateOptions(epochs=100, batch_size=50, lr=3e-2, eval_every=50, progress=False)
  result = train_student(SmallNet(), teacher_model, teacher_variables, images, weights,
                         (x_test, y_test), mean=mean, std=std, options=options,
                         key=jax.random.key(0))
  assert [r.epoch for r in result.history] == [50, 100]
  assert result.top1 == result.history[-1].top1
  assert result.best_top1 == max(r.top1 for r in result.history)
  assert result.top5 >= result.top1
  assert result.history[-1].train_loss < result.history[0].train_loss * 1.5
  assert result.top1 > 60, result  # chance is 10%


def test_train_student_rejects_bad_inputs(teacher):
  teacher_model, teacher_variables = teacher
  images = np.zeros((4, *SHAPE), np.float32)
  with pytest.raises(ShapeError, match="weight per image"):
    train_student(SmallNet(), teacher_model, teacher_variables, images, np.ones(3), None)
  with pytest.raises(DataError):
    train_student(SmallNet(), teacher_model, teacher_variables, images, -np.ones(4), None)
  with pytest.raises(ShapeError, match="num_classes=10"):
    train_student(SmallNet(num_classes=3), teacher_model, teacher_variables, images, None, None,
                  options=EvaluateOptions(epochs=1, progress=False))
