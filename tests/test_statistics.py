"""Per-class BN-input statistics against an independent float64 numpy computation."""

import numpy as np
import pytest

from tests.tiny_models import TinyNet, numpy_forward, tiny_variables
from wmdd_jax import DataError, ShapeError
from wmdd_jax.statistics import compute_class_statistics

SHAPE = (5, 6, 2)
MEAN, STD = (0.4, 0.6), (0.2, 0.3)


def _data(n=41, c=3, seed=1):
  rng = np.random.default_rng(seed)
  images = rng.integers(0, 256, size=(n, *SHAPE), dtype=np.uint8)
  labels = np.concatenate([np.arange(c), rng.integers(0, c, n - c)]).astype(np.int32)
  return images, labels


def _batches(images, labels, b):
  for i in range(0, len(images), b):
    yield images[i:i + b], labels[i:i + b]


@pytest.fixture(scope="module")
def setup():
  model = TinyNet(num_classes=3)
  variables = tiny_variables(model, SHAPE)
  images, labels = _data()
  x = (images / 255.0 - np.array(MEAN)) / np.array(STD)
  _, feats, bn_inputs = numpy_forward(variables, x)
  return model, variables, images, labels, feats, bn_inputs


def _run(setup, **kw):
  model, variables, images, labels, *_ = setup
  return compute_class_statistics(
      model, variables, _batches(images, labels, 8), num_classes=3, image_shape=SHAPE,
      mean=MEAN, std=STD, batch_size=8, total=len(images), **kw)


def test_per_class_and_global_statistics_match_numpy(setup):
  _, _, _, labels, _, bn_inputs = setup
  stats, _ = _run(setup)
  assert len(stats.mean) == 2
  np.testing.assert_array_equal(stats.counts, np.bincount(labels, minlength=3))
  for layer, inp in enumerate(bn_inputs):
    for c in range(3):
      pooled = inp[labels == c].reshape(-1, inp.shape[-1])  # all images and positions of c
      np.testing.assert_allclose(stats.mean[layer][c], pooled.mean(0), rtol=1e-5, atol=1e-5)
      np.testing.assert_allclose(stats.var[layer][c], pooled.var(0), rtol=1e-5, atol=1e-5)
    everything = inp.reshape(-1, inp.shape[-1])
    np.testing.assert_allclose(stats.global_mean[layer], everything.mean(0), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(stats.global_var[layer], everything.var(0), rtol=1e-5, atol=1e-5)


def test_exact_pooled_variance_differs_from_mean_of_batch_variances(setup):
  # Guards against regressing to the official code's averaged per-batch variance.
  _, _, _, labels, _, bn_inputs = setup
  stats, _ = _run(setup)
  inp = bn_inputs[1][labels == 0]
  halves = [inp[: len(inp) // 2], inp[len(inp) // 2:]]
  avg_of_vars = np.mean([h.reshape(-1, h.shape[-1]).var(0) for h in halves], axis=0)
  exact = inp.reshape(-1, inp.shape[-1]).var(0)
  assert np.max(np.abs(avg_of_vars - exact)) > 1e-3
  np.testing.assert_allclose(stats.var[1][0], exact, rtol=1e-5, atol=1e-5)


def test_features_in_memory_and_on_disk(setup, tmp_path):
  _, _, _, labels, feats, _ = setup
  _, features = _run(setup)
  np.testing.assert_allclose(features.features, feats, rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(features.labels, labels)
  _, on_disk = _run(setup, feature_path=tmp_path / "f.npy")
  assert isinstance(on_disk.features, np.memmap)
  np.testing.assert_allclose(on_disk.features, feats, rtol=1e-5, atol=1e-5)


def test_large_offset_is_numerically_stable():
  # Inputs with mean 1000 and std 0.01 break E[x^2] - E[x]^2 in float32; Chan's update does not.
  model = TinyNet(num_classes=2)
  variables = tiny_variables(model, SHAPE)
  rng = np.random.default_rng(3)
  images = rng.integers(0, 256, size=(64, *SHAPE), dtype=np.uint8)
  labels = (np.arange(64) % 2).astype(np.int32)
  mean, std = (-3.9996, -3.9996), (0.00025, 0.00025)  # x ~ 1000 + 0.01 * u8-ish
  stats, _ = compute_class_statistics(
      model, variables, _batches(images, labels, 16), num_classes=2, image_shape=SHAPE,
      mean=mean, std=std, batch_size=16, keep_features=False)
  x = (images / 255.0 - np.array(mean)) / np.array(std)
  ref = x[labels == 1].reshape(-1, 2)
  np.testing.assert_allclose(stats.var[0][1], ref.var(0), rtol=1e-3)


def test_errors_name_the_problem(setup):
  model, variables, images, labels, *_ = setup
  with pytest.raises(DataError, match="labels must lie"):
    compute_class_statistics(model, variables, [(images[:4], np.array([0, 1, 2, 7]))],
                             num_classes=3, image_shape=SHAPE, mean=MEAN, std=STD, batch_size=8)
  with pytest.raises(ShapeError, match="expected at most 8 images"):
    compute_class_statistics(model, variables, [(images[:4, :4], labels[:4])],
                             num_classes=3, image_shape=SHAPE, mean=MEAN, std=STD, batch_size=8)
  with pytest.raises(DataError, match="no training images"):
    compute_class_statistics(model, variables, [(images[:4], np.zeros(4, np.int32))],
                             num_classes=3, image_shape=SHAPE, mean=MEAN, std=STD, batch_size=8)
