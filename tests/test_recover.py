"""The recover loss and step against numpy, class independence, chunking, NaN handling."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.tiny_models import TinyNet, numpy_forward, tiny_variables
from wmdd_jax import NonFiniteError
from wmdd_jax.recover import RecoverOptions, RecoverTargets, chunk_loss, recover

SHAPE = (8, 8, 2)
C, K = 3, 2
MEAN, STD = (0.5, 0.4), (0.25, 0.3)


def _targets(seed=0, d=4):
  rng = np.random.default_rng(seed)
  f32 = lambda *s: jnp.asarray(rng.normal(size=s), jnp.float32)
  pos = lambda *s: jnp.asarray(rng.uniform(0.5, 2, size=s), jnp.float32)
  return RecoverTargets(
      features=jnp.abs(f32(C, K, d)),
      bn_mean=(f32(C, 2), f32(C, 4)), bn_var=(pos(C, 2), pos(C, 4)),
      global_mean=(f32(2), f32(4)), global_var=(pos(2), pos(4)))


@pytest.fixture(scope="module")
def teacher():
  model = TinyNet(num_classes=C)
  return model, tiny_variables(model, SHAPE, seed=2)


def _images(seed=1):
  return jnp.asarray(np.random.default_rng(seed).normal(size=(C, K, *SHAPE)), jnp.float32)


def _numpy_loss(variables, images, targets, opts):
  total, per_class = 0.0, []
  for c in range(C):
    logits, feats, bn_in = numpy_forward(variables, np.asarray(images[c]))
    feat = np.linalg.norm(feats - np.asarray(targets.features[c]))
    bn = 0.0
    for layer, inp in enumerate(bn_in):
      flat = inp.reshape(-1, inp.shape[-1])  # over (k, H, W), biased
      bn += np.linalg.norm(flat.mean(0) - np.asarray(targets.bn_mean[layer][c]))
      bn += np.linalg.norm(flat.var(0) - np.asarray(targets.bn_var[layer][c]))
    logp = logits - logits.max(1, keepdims=True)
    logp = logp - np.log(np.exp(logp).sum(1, keepdims=True))
    ce = -logp[:, c].mean()
    loss = opts.r_feat * feat + opts.r_bn * bn + opts.r_ce * ce
    per_class.append(loss)
    total += loss
  return total, np.array(per_class)


def test_loss_equals_numpy_reference(teacher):
  model, variables = teacher
  opts = RecoverOptions(augment=False, r_feat=1.0, r_bn=3.0, r_ce=0.5, objective="per_class")
  targets, images = _targets(), _images()
  loss, aux = chunk_loss(images, variables, targets, jnp.arange(C), jax.random.key(0),
                         model=model, options=opts)
  ref_total, ref_per_class = _numpy_loss(variables, images, targets, opts)
  np.testing.assert_allclose(float(loss), ref_total, rtol=1e-5)
  np.testing.assert_allclose(aux["class_loss"], ref_per_class, rtol=1e-5)


@pytest.mark.parametrize("per_image", [False, True])
def test_vmapped_gradient_equals_per_class_loop(teacher, per_image):
  model, variables = teacher
  opts = RecoverOptions(r_ce=0.1, per_image=per_image, objective="per_class")
  targets, images = _targets(), _images()
  key = jax.random.key(5)
  grad = jax.grad(lambda x: chunk_loss(x, variables, targets, jnp.arange(C), key, model=model,
                                       options=opts)[0])(images)
  for c in range(C):
    ids = np.array([c])
    g_c = jax.grad(lambda x, ids=ids: chunk_loss(x, variables, targets.take(ids),
                                                 jnp.asarray(ids), key, model=model,
                                                 options=opts)[0])(images[ids])
    np.testing.assert_allclose(grad[c], g_c[0], rtol=1e-5, atol=1e-6)


def test_changing_one_class_leaves_other_gradients_unchanged(teacher):
  model, variables = teacher
  opts = RecoverOptions(objective="per_class")
  targets, images = _targets(), _images()
  g = lambda x: jax.grad(lambda x: chunk_loss(x, variables, targets, jnp.arange(C),
                                              jax.random.key(1), model=model,
                                              options=opts)[0])(x)
  changed = images.at[2].set(images[2] * -3.0 + 1.0)
  g0, g1 = g(images), g(changed)
  np.testing.assert_array_equal(g0[1], g1[1])
  np.testing.assert_array_equal(g0[0], g1[0])
  assert not np.allclose(g0[2], g1[2])


def test_global_bn_couples_the_chunk(teacher):
  model, variables = teacher
  opts = RecoverOptions(bn_stats="global", feature_target="none", r_ce=1.0)
  targets, images = _targets(), _images()
  g = lambda x: jax.grad(lambda x: chunk_loss(x, variables, targets, jnp.arange(C),
                                              jax.random.key(1), model=model,
                                              options=opts)[0])(x)
  changed = images.at[2].set(images[2] * -3.0 + 1.0)
  assert not np.allclose(g(images)[1], g(changed)[1])


def _run(teacher, options, targets=None, **kw):
  model, variables = teacher
  return recover(model, variables, targets if targets is not None else _targets(), ipc=K,
                 image_shape=SHAPE, mean=MEAN, std=STD, options=options,
                 key=jax.random.key(7), progress=False, **kw)


def test_recover_lowers_feature_and_bn_terms_and_stays_valid(teacher):
  opts = RecoverOptions(iterations=50, lr=0.1, r_bn=1.0, steps_per_call=10)
  images, hist = _run(teacher, opts)
  assert images.shape == (C, K, *SHAPE)
  # The tiny net cannot reach arbitrary random targets; a clear, monotone-on-average drop is
  # what this checks (the digits pipeline test checks the real teacher).
  assert hist["feature"][-5:].mean() < 0.95 * hist["feature"][:5].mean()
  assert hist["bn"][-5:].mean() < 0.8 * hist["bn"][:5].mean()
  lo = (0 - np.array(MEAN)) / np.array(STD)
  hi = (1 - np.array(MEAN)) / np.array(STD)
  assert np.all(images >= lo - 1e-6) and np.all(images <= hi + 1e-6)


def test_chunking_does_not_change_the_result(teacher):
  opts = RecoverOptions(iterations=4, steps_per_call=4, per_image=True, objective="per_class")
  whole, _ = _run(teacher, opts)
  chunked, _ = _run(teacher, opts, class_chunk=2)  # chunks [0, 1] and [2, 2] (padded)
  np.testing.assert_allclose(whole, chunked, rtol=1e-5, atol=1e-5)


def test_nan_loss_names_class_and_step(teacher):
  t = _targets()
  t = t._replace(features=t.features.at[1].set(jnp.nan))
  with pytest.raises(NonFiniteError, match="class 1 at step 0"):
    _run(teacher, RecoverOptions(iterations=3, steps_per_call=3), targets=t)


def test_nan_images_from_the_last_update_are_never_checkpointed(teacher, monkeypatch):
  """The loss is taken before each update: images made NaN by a block's last update are caught
  before ``on_block`` (where checkpoints are saved) sees them."""
  import optax

  from wmdd_jax import recover as recover_lib

  monkeypatch.setattr(recover_lib, "make_optimizer",
                      lambda options: optax.scale(float("nan")))
  seen = []
  # A learning rate no other test uses: a fresh (uncached) update function with the patch.
  opts = RecoverOptions(iterations=2, steps_per_call=1, lr=0.0123)
  with pytest.raises(NonFiniteError, match=r"classes \[0, 1, 2\] became NaN/Inf by step 1"):
    _run(teacher, opts, on_block=lambda *args: seen.append(args))
  assert seen == []


def test_global_bn_ignores_padding_repeats(teacher):
  # A chunk padded by repeating its last class gives its real classes the same losses and
  # gradients (the repeat's own loss only moves the repeat's images, which are discarded).
  model, variables = teacher
  opts = RecoverOptions(bn_stats="global", r_ce=0.5)
  targets, images = _targets(), _images()
  key = jax.random.key(3)
  f = lambda x, ids: chunk_loss(x, variables, targets.take(np.asarray(ids)), jnp.asarray(ids),
                                key, model=model, options=opts)
  padded_ids = [0, 1, 2, 2]
  padded = jnp.concatenate([images, images[2:]])
  np.testing.assert_allclose(f(padded, padded_ids)[1]["class_loss"][:3],
                             f(images, [0, 1, 2])[1]["class_loss"], rtol=1e-5)
  grad = lambda x, ids: jax.grad(lambda x: f(x, ids)[0])(x)
  g, g_pad = grad(images, [0, 1, 2]), grad(padded, padded_ids)
  np.testing.assert_allclose(g_pad[:3], g, rtol=1e-4, atol=1e-6)


def test_slot_layout_is_ipc_rounds_of_one_image_per_class(teacher):
  # recover/data_synthesis.py: round j optimises image j of every class in one batch (here the
  # running statistics couple the classes of the batch), from its own key; nothing else.
  model, variables = teacher
  t = _targets()
  from wmdd_jax.models.base import running_statistics
  rmean, rvar = running_statistics(model, variables, SHAPE)
  t = t._replace(running_mean=rmean, running_var=rvar)
  opts = RecoverOptions(iterations=3, steps_per_call=3, layout="slot", bn_stats="running",
                        first_bn_multiplier=10.0, r_ce=1.0, feature_target="none")
  seen = []
  images, hist = _run(teacher, opts, targets=t,
                      on_block=lambda i, st, m: seen.append((i, st.images.shape)))
  assert images.shape == (C, K, *SHAPE)
  # Each round is one batch of all C classes with one image each (chunk index j * C).
  assert seen == [(j * C, (C, 1, *SHAPE)) for j in range(K)]
  import dataclasses
  inner = dataclasses.replace(opts, layout="class")
  slot_key = jax.random.fold_in(jax.random.key(7), 2)
  for j in range(K):
    ref, _ = recover(model, variables, t._replace(features=t.features[:, j:j + 1]), ipc=1,
                     image_shape=SHAPE, mean=MEAN, std=STD, options=inner,
                     key=jax.random.fold_in(slot_key, j), progress=False)
    np.testing.assert_array_equal(images[:, j], ref[:, 0])
  assert np.all(np.isfinite(hist["loss"]))


def test_official_objective_masks_padding_classes(teacher):
  # A last chunk padded by repeating its last class has the loss and gradients of the unpadded
  # chunk under the official (chunk-coupled) objective.
  model, variables = teacher
  opts = RecoverOptions(objective="official", r_ce=0.5, r_bn=2.0)
  targets, images = _targets(), _images()
  key = jax.random.key(3)
  f = lambda x, ids: chunk_loss(x, variables, targets.take(np.asarray(ids)), jnp.asarray(ids),
                                key, model=model, options=opts)[0]
  padded = jnp.concatenate([images, images[2:], images[2:]])
  np.testing.assert_allclose(f(padded, [0, 1, 2, 2, 2]), f(images, [0, 1, 2]), rtol=1e-6)
  g = jax.grad(f)(images, [0, 1, 2])
  g_pad = jax.grad(f)(padded, [0, 1, 2, 2, 2])
  np.testing.assert_allclose(g_pad[:3], g, rtol=1e-5, atol=1e-7)
  np.testing.assert_array_equal(g_pad[3:], 0.0)


def test_official_objective_equals_numpy_reference(teacher):
  # The official chunk loss, transcribed in numpy on the tiny net: CE over the chunk, ONE
  # Frobenius norm over the chunk's features, BN term = mean over classes, first layer x3.
  model, variables = teacher
  opts = RecoverOptions(objective="official", augment=False, r_bn=2.0, r_ce=0.7,
                        first_bn_multiplier=3.0)
  targets, images = _targets(), _images()
  loss, _ = chunk_loss(images, variables, targets, jnp.arange(C), jax.random.key(0),
                       model=model, options=opts)
  feats, ces, bns = [], [], []
  for c in range(C):
    logits, f, bn_in = numpy_forward(variables, np.asarray(images[c]))
    feats.append(f - np.asarray(targets.features[c]))
    logp = logits - logits.max(1, keepdims=True)
    logp = logp - np.log(np.exp(logp).sum(1, keepdims=True))
    ces.extend(-logp[:, c])
    bn = 0.0
    for layer, inp in enumerate(bn_in):
      flat = inp.reshape(-1, inp.shape[-1])
      term = (np.linalg.norm(flat.mean(0) - np.asarray(targets.bn_mean[layer][c]))
              + np.linalg.norm(flat.var(0) - np.asarray(targets.bn_var[layer][c])))
      bn += term * (3.0 if layer == 0 else 1.0)
    bns.append(bn)
  ref = 0.7 * np.mean(ces) + np.linalg.norm(np.stack(feats)) + 2.0 * np.mean(bns)
  np.testing.assert_allclose(float(loss), ref, rtol=1e-5)


def test_bad_recover_options_fail_on_construction():
  from wmdd_jax import ConfigError
  for bad in (dict(lr=-1.0), dict(r_bn=-1.0), dict(crop_scale=(1.0, 0.5)), dict(objective="x"),
              dict(layout="rows"), dict(batch_size=0), dict(first_bn_multiplier=-2.0)):
    with pytest.raises(ConfigError):
      RecoverOptions(**bad)
