"""Tests of wmdd_jax.barycenter against POT's exact LP solver."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import ot
import pytest

from wmdd_jax import ConfigError, NonFiniteError, ShapeError
from wmdd_jax.barycenter import (
    Barycenter,
    BarycenterOptions,
    _voronoi_mass,
    class_barycenters,
    free_support_barycenter,
    w2_cost,
)

N, D, K = 300, 16, 5


def _cloud(kind: str, seed: int, n: int = N, d: int = D) -> np.ndarray:
  rng = np.random.default_rng(seed)
  if kind == "gaussian":
    return rng.normal(size=(n, d)).astype(np.float32)
  if kind == "uniform":
    return rng.uniform(size=(n, d)).astype(np.float32)
  # Clustered and post-ReLU, like penultimate features of one class.
  centers = 3.0 * rng.normal(size=(4, d))
  return np.maximum(centers[rng.integers(0, 4, n)] + rng.normal(size=(n, d)), 0.0).astype(
      np.float32
  )


def _exact_w2(support, weights, points) -> float:
  """W2^2 between (support, weights) and the uniform measure on points, by POT's exact LP."""
  points = np.asarray(points, np.float64)
  weights = np.asarray(weights, np.float64)
  uniform = np.full(len(points), 1.0 / len(points))
  return ot.emd2(weights / weights.sum(), uniform, ot.dist(np.asarray(support, np.float64), points))


def _pot_barycenter_w2(points: np.ndarray, init: np.ndarray) -> float:
  points = np.asarray(points, np.float64)
  uniform = np.full(len(points), 1.0 / len(points))
  support = ot.lp.free_support_barycenter([points], [uniform], np.asarray(init, np.float64))
  return _exact_w2(support, np.full(len(init), 1.0 / len(init)), points)


@pytest.mark.parametrize("kind,seed", [("gaussian", 1), ("uniform", 2), ("clustered", 3)])
def test_w2_within_one_percent_of_pot(kind, seed):
  points = _cloud(kind, seed)
  key = jax.random.key(seed)
  # Clouds this small have many local optima a few percent apart (POT itself lands up to 40%
  # apart from two random inits), so both sides get more than one start: ours the default's
  # (8 at k=5), POT two, and the reference is the better (lower) of POT's results:
  # (a) its default-style random normal init, as the official WMDD code calls it, and
  # (b) our own chosen seeding (the best start's seed, before any balanced iteration).
  ours = free_support_barycenter(points, K, key)
  ours_w2 = _exact_w2(ours.support, ours.weights, points)
  random_init = np.random.default_rng(seed).normal(size=(K, D))
  our_init = free_support_barycenter(points, K, key, num_iterations=0).support
  pot_w2 = min(_pot_barycenter_w2(points, random_init), _pot_barycenter_w2(points, our_init))
  assert ours_w2 <= 1.01 * pot_w2, (ours_w2, pot_w2)


def _unequal_clusters(seed: int) -> tuple[np.ndarray, int]:
  """A post-ReLU cloud of 2-5 well-separated clusters of unequal sizes, and its k (5 or 10).

  The family on which one k-means++ start of the balanced iteration can end several percent
  above POT's optimum. n lies in [900, 1024] and d in {32, 64}, so the 20 clouds share four
  compilations.
  """
  rng = np.random.default_rng(seed)
  n, d, k = int(rng.integers(900, 1025)), int(rng.choice([32, 64])), int(rng.choice([5, 10]))
  m = int(rng.integers(2, 6))
  centers = 3.0 * rng.normal(size=(m, d))
  which = rng.choice(m, n, p=rng.dirichlet(np.ones(m)))
  return np.maximum(centers[which] + rng.normal(size=(n, d)), 0.0).astype(np.float32), k


def _imagenet_like(seed: int) -> tuple[np.ndarray, int]:
  """A post-ReLU cloud like one ImageNet class's penultimate features: n=1300, d=512, k=10,
  10 sub-clusters of uneven sizes (bench/barycenter.py's imagenet_k10 family, other seeds)."""
  rng = np.random.default_rng(seed)
  centers = rng.normal(size=512) + 0.6 * rng.normal(size=(10, 512))
  which = rng.choice(10, 1300, p=rng.dirichlet(np.full(10, 2.0)))
  return np.maximum(centers[which] + 0.8 * rng.normal(size=(1300, 512)), 0.0).astype(
      np.float32), 10


def test_default_close_to_pot_on_unequal_clusters():
  # The default (8 starts at k=5 and 10: half Gaussian seeds, one OTT-annealed, the rest OTT
  # k-means, on a 512-point subsample weighted by its Voronoi cells, ranked by one polish
  # iteration on all points) against POT's exact LP
  # barycenter from k random data points, on 24 seeded clouds (seeds apart from
  # bench/barycenter.py's): 20 of a few well-separated clusters of unequal sizes and 4
  # ImageNet-like ones. Within 1% of POT's exact W2^2 on every cloud and 0.3% on the median. One
  # start (num_inits=1) ends several percent above POT on seed 2007: the starts are what make the
  # default safe. Learned weights (OTT k-means) are never worse than uniform.
  clouds = [(seed, *_unequal_clusters(seed)) for seed in range(2000, 2020)]
  clouds += [(seed, *_imagenet_like(seed)) for seed in range(2100, 2104)]
  ratios, learned_ratios = [], []
  for seed, points, k in clouds:
    key = jax.random.key(seed)
    init = points[np.random.default_rng(seed).choice(len(points), k, replace=False)]
    pot = _pot_barycenter_w2(points, init)
    ours = free_support_barycenter(points, k, key)
    learned = free_support_barycenter(points, k, key, learn_weights=True)
    ratios.append(_exact_w2(*ours, points) / pot)
    learned_ratios.append(_exact_w2(*learned, points) / pot)
    if seed == 2007:
      cold = free_support_barycenter(points, k, key, num_inits=1)
      cold_ratio = _exact_w2(*cold, points) / pot
  ratios = np.asarray(ratios)
  assert ratios.max() <= 1.01, ratios
  assert np.median(ratios) <= 1.003, ratios
  assert np.all(np.asarray(learned_ratios) <= ratios * (1 + 1e-6)), (learned_ratios, ratios)
  assert cold_ratio > 1.03, cold_ratio


def test_number_and_kinds_of_starts():
  """num_inits=None: min(8, 100 // k) seeded starts up to k=30, one above, half of them
  (rounded down) Gaussian seeds; beside several, one more start is annealed by OTT-JAX."""
  opts = BarycenterOptions()
  assert [opts.starts(False, k) for k in (1, 5, 10, 12, 13, 20, 30, 31, 50)] == [
      8, 8, 8, 8, 7, 5, 3, 1, 1]
  assert [opts.annealed_starts(s) for s in (1, 2, 8)] == [0, 1, 1]
  assert [opts.gaussian_starts(s) for s in (1, 5, 8)] == [0, 2, 4]
  assert BarycenterOptions(annealed_inits=3).annealed_starts(1) == 3
  assert BarycenterOptions(solver="annealed").annealed_starts(4) == 0
  assert BarycenterOptions(num_inits=3).starts(False, 5) == 3


def test_voronoi_subsample_masses_match_a_nearest_neighbour_reference(rng):
  """Every point (padding excluded) gives its mass to its nearest subsample point: checked
  against numpy, and on well-separated clusters the subsample's clusters then weigh exactly
  what they weigh in the class (uniform subsample masses carry the sampling noise)."""
  sizes = (700, 200, 100)
  centres = 20.0 * rng.normal(size=(3, 8))
  which = np.repeat(np.arange(3), sizes)
  points = (centres[which] + rng.normal(size=(1000, 8))).astype(np.float32)
  padded = np.concatenate([points, np.zeros((24, 8), np.float32)])
  mass = np.concatenate([np.full(1000, 1e-3), np.zeros(24)]).astype(np.float32)
  idx = np.sort(rng.choice(1000, 64, replace=False))
  got = np.asarray(_voronoi_mass(jnp.asarray(padded), jnp.asarray(mass),
                                 jnp.sum(jnp.asarray(padded) ** 2, -1), jnp.asarray(padded[idx])))
  nearest = np.argmin(((points[:, None] - points[idx][None]) ** 2).sum(-1), 1)
  np.testing.assert_allclose(got, np.bincount(nearest, minlength=64) * 1e-3, rtol=1e-5)
  cluster_mass = np.bincount(which[idx], weights=got, minlength=3)
  np.testing.assert_allclose(cluster_mass, np.asarray(sizes) / 1000, rtol=1e-5)


def test_voronoi_subsample_masses_rescue_a_stress_cloud():
  """bench/barycenter.py's stress cloud 3009 (n=1118, d=128, k=10, a few well-separated
  clusters of unequal sizes): with the subsample's points weighted uniformly, as the previous
  default did (6 starts, none annealed), every start settled on the subsample's optimum, 13%
  above POT's exact W2^2 on the class when written; the default (Voronoi masses, 8 starts, one
  OTT-annealed) ends within 1% of the better of two POT runs."""
  from bench.barycenter import stress_cloud  # noqa: PLC0415 - the benchmark's generator

  points, k = stress_cloud(3009)
  key = jax.random.key(3009)
  pot = min(_pot_barycenter_w2(points, points[np.random.default_rng(3009).choice(
      len(points), k, replace=False)]), _pot_barycenter_w2(
          points, np.random.default_rng(3009).normal(size=(k, points.shape[1]))))
  ours = free_support_barycenter(points, k, key)
  previous = free_support_barycenter(points, k, key, subsample_mass="uniform", annealed_inits=0,
                                     num_inits=6)
  assert _exact_w2(*ours, points) <= 1.01 * pot
  assert _exact_w2(*previous, points) > 1.05 * pot


def test_solvers_and_their_options(key):
  points = _cloud("clustered", 13)
  pot = _pot_barycenter_w2(points, np.random.default_rng(13).normal(size=(K, D)))
  for options in ({"num_inits": 2}, {"lloyd_steps": 0}, {"prune_iterations": 0},
                  {"init_candidates": 1}, {"gaussian_inits": 0}, {"subsample": 128},
                  {"num_inits": 3, "gaussian_inits": 3}, {"annealed_inits": 0},
                  {"num_inits": 3, "annealed_inits": 3},
                  {"subsample": 128, "subsample_mass": "uniform"}):
    bary = free_support_barycenter(points, K, key, **options)
    assert _exact_w2(*bary, points) <= 1.01 * pot, options
  # The annealed solver runs OTT-JAX's Sinkhorn: capping it at one iteration per stage changes
  # the support it hands to the polish. (Its quality is measured, not asserted, here: on this
  # small cloud it lands about 12% above POT; bench/barycenter.py --study anneal.)
  capped = free_support_barycenter(points, K, key, solver="annealed", num_iterations=0,
                                   sinkhorn_iterations=1)
  full = free_support_barycenter(points, K, key, solver="annealed", num_iterations=0)
  assert not np.allclose(capped.support, full.support)
  annealed = free_support_barycenter(points, K, key, solver="annealed")
  assert annealed.support.shape == (K, D) and np.all(np.isfinite(annealed.support))
  assert _exact_w2(*annealed, points) <= _exact_w2(*full, points)  # the polish lowers the cost
  for bad in ({"solver": "lp"}, {"anneal": (0.1, 0.0)}, {"num_inits": 0},
              {"sinkhorn_threshold": 0.0}, {"sinkhorn_iterations": 0}, {"subsample": -1},
              {"gaussian_inits": -1}, {"gaussian_inits": 1.5}, {"start_epsilon": 0.0},
              {"rank_on_all": 0}, {"rank_on_all": 2.0}, {"annealed_inits": -1},
              {"subsample_mass": "random"}):
    with pytest.raises(ConfigError):
      free_support_barycenter(points, K, key, **bad)


def test_start_epsilon_smooths_only_the_subsampled_starts(key):
  """start_epsilon reaches only the starts' polish on a subsample: without a subsample it changes
  nothing, and start_epsilon=None is start_epsilon=epsilon; on a subsample it changes the run."""
  points = _cloud("clustered", 6, n=300)
  base = free_support_barycenter(points, K, key, subsample=0)
  coarse = free_support_barycenter(points, K, key, subsample=0, start_epsilon=0.5)
  np.testing.assert_array_equal(base.support, coarse.support)
  sub = {"subsample": 100, "num_inits": 2}
  off = free_support_barycenter(points, K, key, start_epsilon=None, **sub)
  same = free_support_barycenter(points, K, key, start_epsilon=0.01, **sub)
  np.testing.assert_array_equal(off.support, same.support)
  smoothed = free_support_barycenter(points, K, key, start_epsilon=0.5, **sub)
  assert not np.array_equal(off.support, smoothed.support)


def test_rank_on_all_limits_the_starts_ranked_on_all_points():
  """rank_on_all >= the number of starts is rank_on_all=None (every start ranked on all points);
  rank_on_all=1 keeps the start with the lowest subsample cost, which on this cloud (a small
  subsample: noisy cluster masses) is not the one the all-points ranking picks."""
  points = _cloud("clustered", 6, n=400)
  key = jax.random.key(6)
  # Uniform subsample masses and no annealed start, as when this near-tie was found: Voronoi
  # masses make the subsample's ranking agree with the all-points one on this cloud.
  sub = {"subsample": 60, "num_inits": 6, "prune_iterations": 1, "subsample_mass": "uniform",
         "annealed_inits": 0}
  every = free_support_barycenter(points, K, key, rank_on_all=None, **sub)
  as_many = free_support_barycenter(points, K, key, rank_on_all=6, **sub)
  np.testing.assert_array_equal(every.support, as_many.support)
  one = free_support_barycenter(points, K, key, rank_on_all=1, **sub)
  assert not np.array_equal(every.support, one.support)
  # The two picks were a near-tie (12.6958 vs 12.6947 when written): the subsample alone
  # ranks starts that differ by more.
  assert _exact_w2(*one, points) == pytest.approx(_exact_w2(*every, points), rel=0.01)


def test_learned_weights_beat_uniform_weights(key):
  points = _cloud("clustered", 4)
  uniform = free_support_barycenter(points, K, key)
  learned = free_support_barycenter(points, K, key, learn_weights=True)
  np.testing.assert_allclose(uniform.weights, 1.0 / K)
  assert np.all(np.asarray(learned.weights) >= 0)
  np.testing.assert_allclose(float(jnp.sum(learned.weights)), 1.0, rtol=1e-6)
  assert _exact_w2(*learned, points) < _exact_w2(*uniform, points)


def test_shapes_dtypes_and_weights_on_simplex(key):
  points = _cloud("gaussian", 5)
  for learn in (False, True):
    bary = free_support_barycenter(points, K, key, learn_weights=learn)
    assert isinstance(bary, Barycenter)
    assert bary.support.shape == (K, D) and bary.support.dtype == jnp.float32
    assert bary.weights.shape == (K,) and bary.weights.dtype == jnp.float32
    np.testing.assert_allclose(float(jnp.sum(bary.weights)), 1.0, rtol=1e-6)


def test_deterministic_for_a_key(key):
  points = _cloud("uniform", 6)
  a = free_support_barycenter(points, K, key)
  b = free_support_barycenter(points, K, key)
  c = free_support_barycenter(points, K, jax.random.key(1))
  np.testing.assert_array_equal(a.support, b.support)
  assert not np.allclose(a.support, c.support)


def test_jit_matches_eager(key):
  points = jnp.asarray(_cloud("clustered", 7))
  jitted = jax.jit(functools.partial(free_support_barycenter, num_support=K))
  np.testing.assert_allclose(jitted(points, key=key).support,
                             free_support_barycenter(points, K, key).support, atol=1e-5)


def test_zero_mass_padding_changes_nothing(key, rng):
  points = _cloud("gaussian", 8)
  # Padding rows far away and of zero mass, appended as class_barycenters does.
  padded = np.concatenate([points, 100 + rng.normal(size=(40, D)).astype(np.float32)])
  mass = np.concatenate([np.ones(N), np.zeros(40)]).astype(np.float32)
  for learn, solver in ((False, "semidual"), (True, "semidual"), (False, "annealed")):
    plain = free_support_barycenter(points, K, key, learn_weights=learn, solver=solver)
    masked = free_support_barycenter(padded, K, key, weights=mass, learn_weights=learn,
                                     solver=solver)
    np.testing.assert_allclose(masked.support, plain.support, atol=1e-4)
    np.testing.assert_allclose(masked.weights, plain.weights, atol=1e-6)
  # A class large enough to be subsampled: padding it further (to another padded size, as
  # class_barycenters pads every class to the largest) draws the same subsample.
  big = _cloud("clustered", 8, n=600)
  plain = free_support_barycenter(big, K, key)
  padded = np.concatenate([big, 100 + rng.normal(size=(300, D)).astype(np.float32)])
  mass = np.r_[np.ones(600), np.zeros(300)].astype(np.float32)
  masked = free_support_barycenter(padded, K, key, weights=mass)
  np.testing.assert_allclose(masked.support, plain.support, atol=1e-4)


@pytest.mark.parametrize("learn", [False, True])
def test_class_barycenters_match_per_class_calls(key, rng, learn):
  # Ragged classes (their padded size matches N's, so the per-class calls share a compilation).
  sizes = (300, 260, 330, 280)
  features = np.concatenate([_cloud("clustered", 10 + c, n=s) for c, s in enumerate(sizes)])
  labels = np.repeat(np.arange(4), sizes)
  perm = rng.permutation(len(labels))  # classes interleaved, as in a real dataset
  features, labels = features[perm], labels[perm]
  # All four classes in one vmapped program.
  bary = class_barycenters(features, labels, 4, K, key, learn_weights=learn, classes_per_batch=4)
  assert bary.support.shape == (4, K, D) and bary.weights.shape == (4, K)
  one_by_one = class_barycenters(features, labels, 4, K, key, learn_weights=learn)
  for c in range(4):
    one = free_support_barycenter(
        features[labels == c], K, jax.random.fold_in(key, c), learn_weights=learn
    )
    # The CPU default (one class at a time, the per-class program) gives the same result.
    np.testing.assert_allclose(one_by_one.support[c], one.support, atol=1e-4)
    np.testing.assert_allclose(one_by_one.weights[c], one.weights, atol=1e-6)
    # Vmapped over classes, round-off can tip a near-tie of the balanced iteration into another
    # local optimum of one of the 4 starts, so the vmapped result matches in W2^2.
    points = features[labels == c]
    np.testing.assert_allclose(_exact_w2(bary.support[c], bary.weights[c], points),
                               _exact_w2(*one, points), rtol=5e-3)


def test_edge_sizes(key):
  points = _cloud("uniform", 9, n=K)
  # k == n: every point gets its own support point, so the cost is zero.
  bary = free_support_barycenter(points, K, key)
  assert _exact_w2(*bary, points) < 1e-6
  # k == 1: the mean.
  for learn in (False, True):
    bary = free_support_barycenter(points, 1, key, learn_weights=learn)
    np.testing.assert_allclose(bary.support[0], points.mean(0), atol=1e-5)


def test_w2_cost_matches_exact_lp(key):
  points = _cloud("clustered", 11)
  for learn in (False, True):
    bary = free_support_barycenter(points, K, key, learn_weights=learn)
    exact = _exact_w2(*bary, points)
    np.testing.assert_allclose(float(w2_cost(*bary, points)), exact, rtol=1e-4)


def test_errors(key):
  points = _cloud("gaussian", 12)
  bad = points.copy()
  bad[3, 2] = np.nan
  with pytest.raises(NonFiniteError, match="NaN"):
    free_support_barycenter(bad, K, key)
  with pytest.raises(NonFiniteError, match="features"):
    class_barycenters(bad, np.zeros(N, np.int32), 1, K, key)
  with pytest.raises(ShapeError):
    free_support_barycenter(points[0], K, key)
  with pytest.raises(ShapeError):
    free_support_barycenter(points, K, key, weights=np.ones(N + 1))
  with pytest.raises(ShapeError):
    class_barycenters(points, np.zeros(N - 1, np.int32), 1, K, key)
  with pytest.raises(ConfigError, match="3 point"):
    free_support_barycenter(points[:3], K, key)
  with pytest.raises(ConfigError, match="positive mass"):
    free_support_barycenter(points, K, key, weights=np.r_[np.ones(2), np.zeros(N - 2)])
  labels = np.r_[np.zeros(N - 4), np.ones(4)].astype(np.int32)
  with pytest.raises(ConfigError, match="class 1 has 4"):
    class_barycenters(points, labels, 2, K, key)
  with pytest.raises(ConfigError, match="num_classes"):
    class_barycenters(points, labels, 1, K, key)
  with pytest.raises(ConfigError, match="unknown"):
    free_support_barycenter(points, K, key, step_size=0.1)
  with pytest.raises(ConfigError):
    free_support_barycenter(points, 0, key)


def test_ott_solver_agrees_with_semidual_and_pot(key):
  # The OTT-JAX reference (Sinkhorn barycenter from the same start) lands within 1% of POT too.
  points = _cloud("clustered", 3)
  init = np.random.default_rng(0).normal(size=(5, points.shape[1]))
  pot = _pot_barycenter_w2(points, init)
  ours = free_support_barycenter(points, 5, key, num_inits=1)
  ott_bar = free_support_barycenter(points, 5, key, solver="ott", ott_epsilon=0.003)
  w_ours = _exact_w2(ours.support, ours.weights, points)
  w_ott = _exact_w2(ott_bar.support, ott_bar.weights, points)
  assert abs(w_ott - w_ours) <= 0.01 * w_ours
  assert w_ott <= 1.01 * pot
  with pytest.raises(ConfigError, match="solver"):
    free_support_barycenter(points, 5, key, solver="ott", learn_weights=True)
