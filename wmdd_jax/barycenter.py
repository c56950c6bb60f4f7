"""Free-support Wasserstein-2 barycenters of one class's features, jitted and vmapped over classes.

With one input measure Y (n points y_i, masses a_i) and k support points B (uniform weights
w_j = 1/k), the barycenter minimises W2^2(sum_j w_j delta_{b_j}, Y) over B: a *balanced*
(capacity-constrained) k-means in which every support point receives exactly mass w_j. The
Cuturi-Doucet fixed point solves the transport plan T between B and Y and moves each b_j to the
centroid of the mass it receives (POT does this with an exact network-simplex LP per iteration).

The default solver (``solver="semidual"``) runs several starts and keeps the best:

1. Starts run on a random subsample of ``subsample=512`` points of the class (all points when
   it has fewer), each subsample point carrying the class mass of its Voronoi cell among the
   subsample (``subsample_mass="voronoi"``, with several starts): the subsample's clusters
   then weigh what they weigh in the class. With uniform masses the clusters' masses in the
   subsample differ from the class's by sampling noise (a few percent at 512 points), and the
   balanced problem is sensitive to exactly that: how many support points each cluster gets,
   and which clusters share one, follow from the clusters' masses, so every start could
   settle on the subsample's optimum, 4-13% above the class's (bench/barycenter.py
   ``--study robustness``, bench/results/barycenter_robustness.json). The starts are:
   - ``num_inits`` seeded ones: ``gaussian_inits`` (None: half, rounded down) draws of k points
     from the Gaussian of the points' mean and per-coordinate spread (as from POT's random
     normal start, the first balanced plan then shares the points among the support by random
     projections, so the support is spread over the clusters by mass), the others OTT-JAX
     ``ott.tools.k_means`` seeds (one run each: a mass-weighted greedy k-means++ seeding of
     this module, which never draws zero-mass padding rows, refined by 3 Lloyd steps on an
     ``ott.geometry.pointcloud.PointCloud``);
   - on top of those, ``annealed_inits`` (None: one, beside more than one) k-means++ seeds
     annealed by OTT-JAX's ``Sinkhorn`` (``ott.solvers.linear.sinkhorn``, on an
     ``ott.geometry.geometry.Geometry`` of the squared-Euclidean costs) at the entropic
     schedule ``anneal`` (as ``solver="annealed"`` below, on the subsample).
   No kind alone is safe: on clouds of a few well-separated clusters of unequal sizes each
   ends 3-30% above POT's exact W2^2 from some seeds, on different clouds.
2. Every start runs ``prune_iterations=5`` iterations of the **Laguerre polish** on the
   subsample: the plan's potentials g (k values) are balanced through the *semi-dual*

     max_g  F(g) = <w, g> - eps * sum_i a_i logsumexp_j(log w_j + (g_j - C_ij) / eps)

   (eps = ``start_epsilon`` = 3% of the mean cost on the subsample, ``epsilon`` = 1% on all
   points; the entropic smoothing of
   <w, g> + sum_i a_i min_j (C_ij - g_j)) by damped (Levenberg-Marquardt) Newton steps with
   k x k linear algebra, warm-started from the previous iteration's g, and each b_j moves to
   the centroid of its hard Laguerre cell {i : j = argmin_j' C_ij' - g_j'} (the exact plan up to
   the few points the LP would split), free of the entropic blur of soft plans.
3. The best ``rank_on_all=3`` starts by their cost on the subsample then run one polish
   iteration on all points, whose unregularised semi-dual (a lower bound on the W2^2 of that
   support, tight once g balances the cells) ranks them: ranked on the subsample alone,
   sampling noise in the clusters' masses can flip near-ties between ways of sharing the
   support among clusters that differ by 10% and more on all points, while starts the
   subsample puts below the third are rarely the best on all points (an n x k x d pass each
   saved).
4. The winner's polish continues on all points until less than ``stop_fraction`` of the mass
   changes cell in one iteration.

A start's work grows about linearly with k, while a support point shared out to the wrong
cluster carries 1/k of the mass, so ``num_inits=None`` runs min(8, 100 // k) starts up to
k=30 (8 up to k=12, 5 at k=20) and one above (at k=50 one start stays within 1% of POT on the
benchmark's clouds, and the per-class time is what keeps the default ahead of POT there).

``solver="annealed"`` is the OTT-JAX route: one seeding, then for each relative epsilon of
``anneal`` (default 2, 0.6, 0.2, 0.06, 0.02 times the mean cost at the seeding) OTT-JAX's
``Sinkhorn`` (``ott.solvers.linear.sinkhorn``) solves the entropic plan on an
``ott.geometry.geometry.Geometry`` of the squared-Euclidean costs, warm-started from the previous
stage's potentials (f, g), every b_j moves to the barycentre of its plan column, and the polish
above finishes from OTT's g. Alone it is no safer than one k-means start: nearly
deterministic from its near-uniform first plan, it splits the support along the cloud's widest
directions rather than by its clusters' masses, and on the robustness study's 120 runs (clouds
of a few well-separated clusters of unequal sizes) it ends more than 1% above POT on 17 (on
all points, ``subsample=0``: 21; one k-means start: 19), up to 25-36%, on several clouds
from both keys. So it is not the default; it is one of the default's starts. In the default
the plans of the polish are solved by the semi-dual Newton iteration above (our own, from
OTT-JAX-seeded and OTT-JAX-annealed starts); OTT-JAX's Sinkhorn solves the annealed start's
plans.
``solver="ott"`` runs OTT-JAX's ``FreeWassersteinBarycenter``
(``ott.solvers.linear.continuous_barycenter`` on a ``FreeBarycenterProblem``) from one seeding,
the reference entropic solver; about two orders of magnitude slower on CPU here, and its
entropic plans blur the support.

With ``learn_weights=True`` the weights are free on the simplex too; for one measure the optimum
then sends every point to its nearest support point, so the problem is k-means and the weights
are the cell masses: it is solved by OTT-JAX's ``ott.tools.k_means`` (Lloyd, ``num_inits``
runs, default 4, the best kept) seeded by the mass-weighted k-means++ above.

Checked against POT (tests/test_barycenter.py; bench/barycenter.py, figures in
docs/benchmarks.md): within 1% of POT's exact W2^2 on every seeded test cloud.

Zero-mass points (padding) take no part: they are never sampled as seeds, every sum over points
is weighted by the masses, and for OTT's k-means they sit on a real point (its reallocation of
empty clusters picks far points without looking at their mass).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from wmdd_jax.distributed import Execution
from wmdd_jax.errors import ConfigError, NonFiniteError, ShapeError

__all__ = [
    "Barycenter",
    "BarycenterOptions",
    "class_barycenters",
    "class_solver",
    "free_support_barycenter",
    "w2_cost",
]


class Barycenter(NamedTuple):
  """A discrete measure sum_j weights[j] delta_{support[j]} (or one per class).

  Attributes:
    support: f32[k, d] (or f32[C, k, d] for all classes).
    weights: f32[k] on the simplex (or f32[C, k]).
  """

  support: jax.Array
  weights: jax.Array


@dataclasses.dataclass(frozen=True)
class BarycenterOptions:
  """Solver options of :func:`free_support_barycenter` (hashable, static under jit; checked on
  construction: a bad value raises ConfigError). Every field is a config field
  (``--config.barycenter.<field>``).

  Attributes:
    solver: "semidual" (the default: subsampled, ranked multi-start, then the Laguerre polish;
      see the module docstring), "annealed" (OTT-JAX Sinkhorn annealing before the polish) or
      "ott" (OTT-JAX's FreeWassersteinBarycenter, the slow entropic reference; uniform weights
      only).
    anneal: relative epsilons (multiples of the mean cost at the seeding) of the annealing
      stages of the "annealed" solver, one Sinkhorn solve and one support move each, in order.
      The first should be large (about the mean cost, where the plan is nearly uniform and the
      support gathers near the cloud's mean before it splits); schedules that start lower
      leave more one-start failures (bench/barycenter.py ``--study anneal``). Empty: none.
    sinkhorn_threshold: marginal error at which an annealing stage's Sinkhorn solve stops.
    sinkhorn_iterations: cap on Sinkhorn iterations per annealing stage.
    num_iterations: cap on the polish iterations (plan, then move).
    stop_fraction: the polish stops once at most this fraction of the mass changes cell in
      one iteration (the plan has settled; the W2^2 then moves by about 0.05% or less, where
      1e-3 runs about twice as many iterations); 0 runs all ``num_iterations``.
    lloyd_steps: Lloyd (k-means) steps after the k-means++ seeding. None: 3 (a cheap warm
      start for the polish), 0 for "annealed" (the annealing does their work), at most 100 for
      ``learn_weights`` (where k-means is the whole solver and stops once converged).
    epsilon: entropic smoothing of the polish's semi-dual, relative to the mass-weighted mean
      cost.
    start_epsilon: the same smoothing for the starts' polish on the subsample (when
      subsampled), before every polish on all points (the ranking iteration included) at
      ``epsilon``: coarser, its semi-dual solves need fewer Newton steps, and the polish on all
      points still ends at the fixed point of ``epsilon``. None: ``epsilon``.
    tolerance: L1 error of the support marginal at which a semi-dual solve stops.
    max_newton_steps: cap on damped Newton steps per semi-dual solve.
    init_candidates: seeds tried per greedy k-means++ step (the one that lowers the k-means cost
      most is kept). None: 2 + int(log k), as scikit-learn.
    num_inits: independent seeded starts solved per call (one after another; the
      ``annealed_inits`` come on top); the lowest-cost start is kept. None: for "semidual"
      min(8, 100 // k) up to k=30 and 1 above (8 up to k=12, 5 at k=20; one start can end far
      above POT's optimum on clouds of a few unequal clusters), 4 for ``learn_weights`` (OTT
      k-means runs, vmapped), 1 for "annealed" and "ott".
    prune_iterations: with num_inits > 1 (uniform weights; "annealed" and "semidual"), every
      start runs this many polish iterations (on the subsample), then is ranked (by one
      iteration on all points when subsampled) and only the best continues; 0 runs every
      start to the end.
    rank_on_all: when subsampled with more starts than this, the starts are first ranked by
      their cost on the subsample and only the best ``rank_on_all`` of them run the ranking
      iteration on all points (an n x k x d pass each); the others rarely win, as the
      subsample ranks all but near-ties right. None: every start is ranked on all points.
    subsample: the starts run on a random subsample of this many points (drawn by mass) when a
      class has more, then the winner is polished on all points; 0: all points throughout.
    subsample_mass: the masses of the subsample's points: "voronoi", the class mass of each
      one's Voronoi cell among the subsample (one n x subsample x d pass), so its clusters
      weigh what they weigh in the class; "uniform", equal masses (the clusters' masses then
      carry the sampling noise that can steer every start to another optimum). None:
      "voronoi" with several starts, "uniform" with one (k > 30 by default, where the pass
      would cost about as much as the one start: 0.08 -> 0.15 s at n=5000, d=512).
    gaussian_inits: how many of the seeded starts are drawn from the Gaussian fit of the points
      (mean and per-coordinate spread) instead of OTT-JAX k-means. None: half of them, rounded
      down, for "semidual"; none for "annealed".
    annealed_inits: starts of the "semidual" solver, on top of the ``num_inits`` seeded ones,
      from k-means++ seeds annealed by OTT-JAX Sinkhorn at ``anneal`` (on the subsample)
      before their polish. None: one when there is more than one seeded start, else none.
    ott_epsilon: OTT FreeWassersteinBarycenter's entropic regularisation ("ott" solver),
      relative to the mean cost (its PointCloud convention); static.
  """

  solver: str = "semidual"
  anneal: tuple[float, ...] = (2.0, 0.6, 0.2, 0.06, 0.02)
  sinkhorn_threshold: float = 1e-3
  sinkhorn_iterations: int = 200
  num_iterations: int = 30
  stop_fraction: float = 5e-3
  lloyd_steps: int | None = None
  epsilon: float = 0.01
  start_epsilon: float | None = 0.03
  tolerance: float = 1e-2
  max_newton_steps: int = 30
  init_candidates: int | None = None
  num_inits: int | None = None
  prune_iterations: int = 5
  rank_on_all: int | None = 3
  subsample: int = 512
  gaussian_inits: int | None = None
  annealed_inits: int | None = None
  subsample_mass: str | None = None
  ott_epsilon: float = 0.01

  def __post_init__(self):
    for name in ("num_iterations", "max_newton_steps", "prune_iterations",
                 "sinkhorn_iterations", "subsample"):
      value, low = getattr(self, name), int(name in ("max_newton_steps", "sinkhorn_iterations"))
      if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ConfigError(f"barycenter option {name}={value!r} must be an int >= {low}.")
    for name in ("lloyd_steps", "init_candidates", "num_inits", "gaussian_inits", "rank_on_all",
                 "annealed_inits"):
      value = getattr(self, name)
      low = 0 if name in ("lloyd_steps", "gaussian_inits", "annealed_inits") else 1
      if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                or value < low):
        raise ConfigError(f"barycenter option {name}={value!r} must be None or an int >= {low}.")
    if self.start_epsilon is not None and not self.start_epsilon > 0:
      raise ConfigError(f"barycenter option start_epsilon={self.start_epsilon} must be > 0.")
    if not (self.epsilon > 0 and self.tolerance > 0 and self.stop_fraction >= 0
            and self.sinkhorn_threshold > 0 and self.ott_epsilon > 0):
      raise ConfigError(
          f"barycenter options epsilon={self.epsilon}, tolerance={self.tolerance}, "
          f"sinkhorn_threshold={self.sinkhorn_threshold} and ott_epsilon={self.ott_epsilon} "
          f"must be > 0 and stop_fraction={self.stop_fraction} >= 0."
      )
    if self.subsample_mass is not None and self.subsample_mass not in SUBSAMPLE_MASSES:
      raise ConfigError(f"barycenter option subsample_mass={self.subsample_mass!r} is not one of "
                        f"{SUBSAMPLE_MASSES}.")
    if self.solver not in SOLVERS:
      raise ConfigError(f"barycenter option solver={self.solver!r} is not one of {SOLVERS}.")
    anneal = tuple(float(e) for e in np.atleast_1d(np.asarray(self.anneal, float)))
    if any(not e > 0 for e in anneal):
      raise ConfigError(f"barycenter option anneal={self.anneal!r} must hold epsilons > 0.")
    # Python floats so the options stay hashable and static under jit.
    for name in ("epsilon", "tolerance", "stop_fraction", "ott_epsilon", "sinkhorn_threshold"):
      object.__setattr__(self, name, float(getattr(self, name)))
    object.__setattr__(self, "anneal", anneal)
    if self.start_epsilon is not None:
      object.__setattr__(self, "start_epsilon", float(self.start_epsilon))

  def starts(self, learn_weights: bool, num_support: int) -> int:
    """The number of independent starts (``num_inits`` with its None resolved)."""
    if self.num_inits is not None:
      return self.num_inits
    if learn_weights:
      return 4
    if self.solver != "semidual":
      return 1
    # A start's work grows about linearly with k while a support point shared out to the wrong
    # cluster carries 1/k of the mass: 8 starts up to k=12, 5 at k=20, one from k=31.
    return 1 if num_support > 30 else min(8, 100 // num_support)

  def gaussian_starts(self, starts: int) -> int:
    """How many of ``starts`` (uniform weights) are Gaussian seedings (``gaussian_inits`` with
    its None resolved: half, rounded down, for "semidual"; none for "annealed")."""
    if self.gaussian_inits is not None:
      return min(self.gaussian_inits, starts)
    return starts // 2 if self.solver == "semidual" else 0

  def annealed_starts(self, starts: int) -> int:
    """How many OTT-annealed starts come on top of ``starts`` seeded ones (uniform weights;
    ``annealed_inits`` with its None resolved: one beside several for "semidual", else none)."""
    if self.annealed_inits is not None:
      return self.annealed_inits if self.solver == "semidual" else 0
    return int(starts > 1 and self.solver == "semidual")


SOLVERS = ("annealed", "semidual", "ott")
SUBSAMPLE_MASSES = ("voronoi", "uniform")


# Levenberg-Marquardt damping values tried in parallel at each Newton step. The scaled Hessian
# has eigenvalues in [0, 1], so 0 is a pure Newton step and 1 is about a Sinkhorn step.
_LM_DAMPING = (0.0, 0.01, 0.1, 1.0)
# Masses below this count as zero (padding) when seeding and balancing.
_TINY = 1e-30


def _options(solver_options: dict[str, Any]) -> BarycenterOptions:
  names = [f.name for f in dataclasses.fields(BarycenterOptions)]
  unknown = set(solver_options) - set(names)
  if unknown:
    raise ConfigError(
        f"unknown barycenter solver option(s) {sorted(unknown)}; valid options are {names}."
    )
  return BarycenterOptions(**solver_options)


# ----------------------------------------------------------------------------------------------
# Building blocks (all jittable, one class).


def _sq_dists(points: jax.Array, sq_norms: jax.Array, support: jax.Array) -> jax.Array:
  """Squared Euclidean costs f32[n, k] through one matmul (clipped at 0 against round-off)."""
  cross = points @ support.T
  return jnp.maximum(sq_norms[:, None] + jnp.sum(support * support, -1)[None] - 2 * cross, 0.0)


def _sample(u: jax.Array, probs: jax.Array) -> jax.Array:
  """Indices drawn with probability proportional to ``probs`` (>= 0, positive sum).

  Inverse-CDF sampling with uniforms ``u`` in [0, 1) (any shape): never returns an index of
  zero probability, and trailing zero-probability entries (padding) do not change the draw.
  """
  cdf = jnp.cumsum(probs)
  # Counting with one comparison is cheaper to compile than searchsorted's loop, and n is small.
  idx = jnp.sum(cdf <= (u * cdf[-1])[..., None], axis=-1)
  return jnp.minimum(idx, probs.shape[0] - 1)


def _kmeans_pp(
    key: jax.Array,
    points: jax.Array,
    mass: jax.Array,
    sq_norms: jax.Array,
    num_support: int,
    num_candidates: int,
) -> jax.Array:
  """Greedy k-means++ seeding from the points of positive mass; returns f32[k, d]."""
  # All uniforms at once: one threefry call keeps the compiled loop small.
  u = jax.random.uniform(key, (num_support, num_candidates))
  first = _sample(u[0, 0], mass)

  def dists_to(idx):  # f32[..., n], squared distances from points[idx] to every point
    return jnp.maximum(
        sq_norms[idx][..., None] - 2 * points[idx] @ points.T + sq_norms, 0.0
    )

  support = jnp.zeros((num_support, points.shape[1]), points.dtype).at[0].set(points[first])

  def body(j, carry):
    support, dmin = carry
    probs = mass * dmin
    # When every point coincides with a chosen seed, fall back to sampling by mass.
    probs = jnp.where(jnp.sum(probs) > 0, probs, mass)
    cand = _sample(u[j], probs)
    dc = jnp.minimum(dmin, dists_to(cand))  # [L, n]
    best = jnp.argmin(dc @ mass)
    return support.at[j].set(points[cand[best]]), dc[best]

  support, _ = jax.lax.fori_loop(1, num_support, body, (support, dists_to(first)))
  return support


def _cell_means(
    labels: jax.Array, mass: jax.Array, weighted_points: jax.Array, support: jax.Array
) -> tuple[jax.Array, jax.Array]:
  """Centroids and masses of hard cells; empty cells keep their old position."""
  k = support.shape[0]
  # A one-hot matmul: on CPU it runs several times faster than a scatter-add of d-wide rows.
  onehot = (labels[:, None] == jnp.arange(k)[None]).astype(weighted_points.dtype)
  cell_mass = mass @ onehot
  sums = onehot.T @ weighted_points
  centroids = sums / jnp.maximum(cell_mass, _TINY)[:, None]
  return jnp.where(cell_mass[:, None] > 0, centroids, support), cell_mass


def _lloyd(
    points: jax.Array,
    mass: jax.Array,
    sq_norms: jax.Array,
    support: jax.Array,
    max_steps: int,
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Mass-weighted Lloyd iterations, stopped early once no point changes cell.

  Returns:
    (support f32[k, d], cell masses f32[k] and k-means cost f32[] of that support).
  """
  weighted = points * mass[:, None]

  def assign(support):
    cost = _sq_dists(points, sq_norms, support)
    labels = jnp.argmin(cost, 1)
    return labels, jnp.min(cost, 1) @ mass

  def cond(state):
    _, _, changed, step = state
    return changed & (step < max_steps)

  def body(state):
    support, labels, _, step = state
    support, _ = _cell_means(labels, mass, weighted, support)
    new_labels, _ = assign(support)
    return support, new_labels, jnp.any((new_labels != labels) & (mass > 0)), step + 1

  labels, _ = assign(support)
  support, labels, _, _ = jax.lax.while_loop(cond, body, (support, labels, max_steps > 0, 0))
  labels, cost = assign(support)
  return support, jax.ops.segment_sum(mass, labels, support.shape[0]), cost


def _semidual(
    g: jax.Array, cost: jax.Array, mass: jax.Array, log_w: jax.Array, eps: jax.Array
) -> tuple[jax.Array, jax.Array]:
  """Entropic semi-dual value F(g) and the row-normalised plan f32[n, k] (rows sum to 1)."""
  z = log_w + (g - cost) / eps
  lse = jax.nn.logsumexp(z, axis=1)
  value = jnp.sum(jnp.where(log_w > -jnp.inf, jnp.exp(log_w) * g, 0.0)) - eps * (mass @ lse)
  return value, jnp.exp(z - lse[:, None])


def _semidual_value(g, cost, mass, log_w, eps):
  """F(g) alone (no plan), for line searches."""
  z = log_w + (g - cost) / eps
  value = jnp.sum(jnp.where(log_w > -jnp.inf, jnp.exp(log_w) * g, 0.0))
  return value - eps * (mass @ jax.nn.logsumexp(z, axis=1))


def _solve_semidual(
    cost: jax.Array,
    mass: jax.Array,
    w: jax.Array,
    g: jax.Array,
    eps: jax.Array,
    tolerance: float,
    max_steps: int,
) -> tuple[jax.Array, jax.Array]:
  """Maximises the entropic semi-dual over g by damped Newton steps.

  Args:
    cost: f32[n, k] costs between points and support.
    mass: f32[n] point masses summing to 1 (zeros for padding).
    w: f32[k] support weights summing to 1 (zeros allowed: such points take no mass).
    g: f32[k] initial potentials (warm start).
    eps: f32[] absolute smoothing.
    tolerance: stop once sum_j |w_j - received mass_j| <= tolerance.
    max_steps: cap on Newton steps.

  Returns:
    (g f32[k], row-normalised plan f32[n, k] at that g).
  """
  active = w > 0
  log_w = jnp.where(active, jnp.log(jnp.where(active, w, 1.0)), -jnp.inf)
  damping = jnp.asarray(_LM_DAMPING, cost.dtype)

  def marginal_error(plan):
    return jnp.sum(jnp.abs(w - mass @ plan))

  def cond(state):
    _, _, _, err, step, stalled = state
    return (err > tolerance) & (step < max_steps) & ~stalled

  def body(state):
    g, value, plan, err, step, _ = state
    weighted = plan * mass[:, None]
    received = jnp.sum(weighted, 0)
    grad = jnp.where(active, w - received, 0.0)
    # Hessian of -F times eps: diag(received) - P^T diag(a) P, with the diagonal summed as
    # a p (1 - p) so near-hard plans do not lose it to cancellation.
    hess = -(plan.T @ weighted)
    hess = hess.at[jnp.diag_indices_from(hess)].set(jnp.sum(weighted * (1 - plan), 0))
    # Scale by diag(received)^(-1/2): eigenvalues then lie in [0, 1] and one eigendecomposition
    # gives the LM step for every damping value.
    inv_sqrt = jnp.where(active, jax.lax.rsqrt(jnp.maximum(received, _TINY)), 0.0)
    evals, evecs = jnp.linalg.eigh(inv_sqrt[:, None] * hess * inv_sqrt[None])
    proj = evecs.T @ (inv_sqrt * grad)

    def lm_direction(lam):
      # The constant direction is the null space (F is invariant to g + c): drop it.
      denom = evals + lam
      coef = jnp.where(denom > 1e-6, proj / jnp.where(denom > 1e-6, denom, 1.0), 0.0)
      return eps * inv_sqrt * (evecs @ coef)

    # Fast path: the full Newton step, kept when F rises by at least a quarter of what the
    # quadratic model predicts (0.5 grad . d) and the marginal error at least halves. Near the
    # optimum, where warm starts put us, that is one pass over the n x k plan instead of one per
    # candidate; far from it (say a support point with no mass near it, which Newton cannot
    # see) the candidates below take over.
    newton = lm_direction(0.0)
    new_value, new_plan = _semidual(g + newton, cost, mass, log_w, eps)
    accept = (new_value - value >= 0.125 * jnp.dot(grad, newton)) & (
        marginal_error(new_plan) <= 0.5 * err
    )

    def fallback(_):
      # Damped candidates and a Sinkhorn step against the Newton step and no step (whose values
      # are known); the best value wins.
      directions = jax.vmap(lm_direction)(damping[1:])
      sinkhorn = jnp.where(active, eps * (log_w - jnp.log(jnp.maximum(received, _TINY))), 0.0)
      directions = jnp.concatenate([newton[None], directions, sinkhorn[None], 0 * g[None]])
      values = jax.vmap(lambda d: _semidual_value(g + d, cost, mass, log_w, eps))(
          directions[1:-1]
      )
      values = jnp.concatenate([new_value[None], values, value[None]])
      best = jnp.argmax(jnp.where(jnp.isfinite(values), values, -jnp.inf))
      best_value, best_plan = _semidual(g + directions[best], cost, mass, log_w, eps)
      # No candidate improved F (float32 resolution reached): stop rather than spin.
      return g + directions[best], best_value, best_plan, best == directions.shape[0] - 1

    g, value, plan, stalled = jax.lax.cond(
        accept, lambda _: (g + newton, new_value, new_plan, False), fallback, None
    )
    return g, value, plan, marginal_error(plan), step + 1, stalled

  value, plan = _semidual(g, cost, mass, log_w, eps)
  state = (g, value, plan, marginal_error(plan), 0, False)
  g, _, plan, _, _, _ = jax.lax.while_loop(cond, body, state)
  return g, plan


def _mean_cost(cost: jax.Array, mass: jax.Array, w: jax.Array) -> jax.Array:
  return mass @ cost @ w


def _dual_w2(
    cost: jax.Array, mass: jax.Array, w: jax.Array, g: jax.Array, epsilon: float = 1e-4
) -> jax.Array:
  """W2^2 from below: the unregularised semi-dual at potentials annealed down to ``epsilon``.

  <w, g> + sum_i a_i min_j (C_ij - g_j) <= W2^2 for every g (weak duality), with an error
  quadratic in the error of g: about 1e-6 relative once the solves converge.
  """
  scale = _mean_cost(cost, mass, w)
  schedule = jnp.asarray([e for e in (0.01, 0.002, 5e-4) if e > epsilon] + [epsilon], cost.dtype)
  # One solver in a loop over the schedule compiles once, not once per epsilon.
  g = jax.lax.fori_loop(
      0,
      schedule.shape[0],
      lambda i, g: _solve_semidual(cost, mass, w, g, schedule[i] * scale, 1e-5, 100)[0],
      g,
  )
  # Zero-weight support points take no mass, so they must not enter the min.
  reduced = jnp.where(w > 0, cost - g, jnp.inf)
  return jnp.sum(jnp.where(w > 0, w * g, 0.0)) + mass @ jnp.min(reduced, 1)


def _balanced(
    points: jax.Array,
    mass: jax.Array,
    sq_norms: jax.Array,
    support: jax.Array,
    g: jax.Array,
    opts: BarycenterOptions,
    estimate_cost: bool,
    num_iterations: int | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """The Laguerre polish: hard-cell fixed-point iterations from ``support`` f32[k, d] and
  potentials ``g`` f32[k] (zeros, or a warm start from an entropic plan or an earlier polish).

  Runs at most ``num_iterations`` (None: ``opts.num_iterations``) iterations.

  Returns:
    (support f32[k, d], its potentials g f32[k], a W2^2 estimate f32[] when ``estimate_cost``,
    else 0).
  """
  k = support.shape[0]
  w = jnp.full((k,), 1.0 / k, points.dtype)
  weighted = points * mass[:, None]

  max_iterations = opts.num_iterations if num_iterations is None else num_iterations

  def cond(state):
    _, _, _, moved, step, _ = state
    return (step < max_iterations) & (moved > opts.stop_fraction)

  def body(state):
    support, g, labels, _, step, _ = state
    cost = _sq_dists(points, sq_norms, support)
    eps = opts.epsilon * _mean_cost(cost, mass, w)
    g, _ = _solve_semidual(cost, mass, w, g, eps, opts.tolerance, opts.max_newton_steps)
    reduced = cost - g
    new_labels = jnp.argmin(reduced, 1)
    # W2^2 of this iteration's support from below: the unregularised semi-dual at its balanced
    # potentials (weak duality; close, as g balances the cells to ``tolerance``). The move
    # below only lowers the cost, so this ranks starts; a bound taken after the move, with g
    # stale for the moved support, can sit far below after large moves.
    bound = jnp.sum(w * g) + mass @ jnp.min(reduced, 1) if estimate_cost else 0.0
    support, _ = _cell_means(new_labels, mass, weighted, support)
    # Mass that changed cell: the plan's change, zero at an exact fixed point.
    moved = jnp.where(step > 0, jnp.sum(jnp.where(new_labels != labels, mass, 0.0)), jnp.inf)
    return support, g, new_labels, moved, step + 1, jnp.asarray(bound, points.dtype)

  # F is invariant to g + c; centring keeps float32 potentials small.
  g = (g - jnp.mean(g)).astype(points.dtype)
  labels = jnp.zeros(points.shape[0], jnp.int32)
  inf = jnp.asarray(jnp.inf, points.dtype)
  state = (support, g, labels, inf, 0, -inf)
  support, g, _, _, _, bound = jax.lax.while_loop(cond, body, state)
  if not estimate_cost:
    return support, g, jnp.zeros((), points.dtype)
  if max_iterations == 0:  # no iteration ran: the bound at the given potentials
    cost = _sq_dists(points, sq_norms, support)
    bound = jnp.sum(w * g) + mass @ jnp.min(cost - g, 1)
  return support, g, bound


def _anneal(
    points: jax.Array, mass: jax.Array, support: jax.Array, opts: BarycenterOptions
) -> tuple[jax.Array, jax.Array]:
  """Annealed entropic fixed-point stages through OTT-JAX's Sinkhorn.

  Stage s solves the entropic plan P between the points (masses ``mass``) and the support
  (uniform weights) at epsilon = anneal[s] x (mean cost at the start) with OTT's ``Sinkhorn`` on
  a ``Geometry`` of the squared-Euclidean cost matrix, warm-started from the previous stage's
  potentials, then moves each support point to the barycentre of its column of P.

  Returns:
    (support f32[k, d], OTT's potentials g f32[k] of the last stage, a warm start for the
    polish's semi-dual).
  """
  from ott.geometry import geometry  # noqa: PLC0415 - keeps `import wmdd_jax` light
  from ott.problems.linear import linear_problem  # noqa: PLC0415
  from ott.solvers.linear import sinkhorn  # noqa: PLC0415

  k = support.shape[0]
  w = jnp.full((k,), 1.0 / k, points.dtype)
  sq_norms = jnp.sum(points * points, -1)
  scale = _mean_cost(_sq_dists(points, sq_norms, support), mass, w)
  solver = sinkhorn.Sinkhorn(threshold=opts.sinkhorn_threshold,
                             max_iterations=opts.sinkhorn_iterations, inner_iterations=5)

  def stage(carry, rel):
    support, f, g = carry
    # The cost matrix once per stage: a PointCloud geometry would recompute it (an n x k x d
    # matmul) in every Sinkhorn iteration.
    geom = geometry.Geometry(cost_matrix=_sq_dists(points, sq_norms, support),
                             epsilon=rel * scale)
    out = solver(linear_problem.LinearProblem(geom, mass, w), init=(f, g))
    plan = out.matrix
    support = (plan.T @ points) / jnp.maximum(jnp.sum(plan, 0), _TINY)[:, None]
    return (support, out.f, out.g), None

  init = (jnp.zeros(points.shape[:1], points.dtype), jnp.zeros((k,), points.dtype))
  (support, _, g), _ = jax.lax.scan(stage, (support, *init), jnp.asarray(opts.anneal, points.dtype))
  return support, g


def _ott_barycenter(points: jax.Array, mass: jax.Array, support: jax.Array,
                    opts: BarycenterOptions) -> jax.Array:
  """OTT-JAX's free-support barycenter of one measure, started from ``support`` f32[k, d]."""
  from ott.problems.linear import barycenter_problem  # noqa: PLC0415 - optional solver
  from ott.solvers.linear import continuous_barycenter, sinkhorn  # noqa: PLC0415

  # OTT's barycenter geometries take an absolute, static epsilon; rescaling the points so the
  # mean pairwise cost is 1 makes ``ott_epsilon`` relative (barycenters are scale-equivariant).
  centre = mass @ points
  scale = jnp.sqrt(jnp.maximum(2.0 * (mass @ jnp.sum(jnp.square(points - centre), -1)), _TINY))
  problem = barycenter_problem.FreeBarycenterProblem(
      y=(points / scale)[None], b=mass[None], epsilon=float(opts.ott_epsilon))
  solver = continuous_barycenter.FreeWassersteinBarycenter(
      sinkhorn.Sinkhorn(threshold=1e-3, max_iterations=2000),
      max_iterations=opts.num_iterations, threshold=1e-5)
  return solver(problem, bar_size=support.shape[0], x_init=support / scale).x * scale


def _kmeans(
    points: jax.Array,
    mass: jax.Array,
    sq_norms: jax.Array,
    key: jax.Array,
    num_support: int,
    candidates: int,
    starts: int,
    max_steps: int,
) -> tuple[jax.Array, jax.Array]:
  """Weighted k-means through OTT-JAX's ``ott.tools.k_means`` (``starts`` vmapped runs, the
  lowest inertia kept), seeded by the mass-weighted k-means++ of this module.

  Returns:
    (centroids f32[k, d], cell masses f32[k]).
  """
  from ott.geometry import pointcloud  # noqa: PLC0415
  from ott.tools import k_means  # noqa: PLC0415

  # OTT's k-means++ ignores point weights and its empty-cluster reallocation picks the farthest
  # points whatever their mass: padding rows are moved onto a real point (mass stays 0), and
  # the seeding is ours, which draws by mass.
  real = points[jnp.argmax(mass)]
  placed = jnp.where((mass > 0)[:, None], points, real)

  def init(geom, k, rng):
    del geom
    return _kmeans_pp(rng, points, mass, sq_norms, k, candidates)

  if max_steps == 0:  # seeding only: the cells of the k-means++ seeds
    support = _kmeans_pp(key, points, mass, sq_norms, num_support, candidates)
    labels = jnp.argmin(_sq_dists(points, sq_norms, support), 1)
    return support, jax.ops.segment_sum(mass, labels, num_support)
  out = k_means.k_means(pointcloud.PointCloud(placed), num_support, weights=mass, init=init,
                        n_init=starts, max_iterations=max_steps, rng=key)
  return out.centroids, jax.ops.segment_sum(mass, out.assignment, num_support)


def _solve_one(
    points: jax.Array,
    mass: jax.Array,
    key: jax.Array,
    num_support: int,
    learn_weights: bool,
    opts: BarycenterOptions,
) -> Barycenter:
  """The whole solver for one class; ``mass`` sums to 1 (zeros are padding)."""
  points = points.astype(jnp.float32)
  mass = mass.astype(jnp.float32)
  sq_norms = jnp.sum(points * points, -1)
  candidates = opts.init_candidates or 2 + int(math.log(num_support))
  seeded = opts.starts(learn_weights, num_support)  # k-means and Gaussian starts
  # OTT-annealed starts come on top, so they only add candidates to the seeded ones.
  annealed = 0 if learn_weights else opts.annealed_starts(seeded)
  starts = seeded + annealed
  lloyd_steps = opts.lloyd_steps
  if lloyd_steps is None:
    lloyd_steps = 100 if learn_weights else 0 if opts.solver == "annealed" else 3

  if learn_weights:
    support, weights = _kmeans(points, mass, sq_norms, key, num_support, candidates, seeded,
                               lloyd_steps)
    # Cell masses sum to 1 up to round-off; renormalise so downstream code can rely on it.
    return Barycenter(support, weights / jnp.sum(weights))

  uniform = jnp.full((num_support,), 1.0 / num_support, jnp.float32)
  if opts.solver == "ott":
    # OTT-JAX's FreeWassersteinBarycenter from one k-means++ seeding (the slow reference).
    support = _kmeans_pp(key, points, mass, sq_norms, num_support, candidates)
    support, _, _ = _lloyd(points, mass, sq_norms, support, lloyd_steps)
    return Barycenter(_ott_barycenter(points, mass, support, opts), uniform)

  sub_key, start_key = jax.random.split(key)
  # The starts run on a random subsample of the points (all of them when the class is small),
  # then the winner's polish finishes on every point.
  subsampled = 0 < opts.subsample < points.shape[0]
  if subsampled:
    idx = _subsample(sub_key, mass, opts.subsample)
    s_points, s_sq = points[idx], sq_norms[idx]
    if (opts.subsample_mass or ("voronoi" if starts > 1 else "uniform")) == "voronoi":
      s_mass = _voronoi_mass(points, mass, sq_norms, s_points)
    else:
      s_mass = jnp.where(mass[idx] > 0, 1.0, 0.0)
      s_mass = s_mass / jnp.sum(s_mass)
  else:
    s_points, s_mass, s_sq = points, mass, sq_norms
  gaussian = opts.gaussian_starts(seeded)
  # Pruned multi-start: every start runs ``prune_iterations`` polish iterations, then only the
  # best continues.
  prune = starts > 1 and 0 < opts.prune_iterations < opts.num_iterations
  first = opts.prune_iterations if prune else opts.num_iterations

  # The starts' polish on the subsample may run at a coarser smoothing (fewer Newton steps);
  # every polish on all points runs at ``epsilon``.
  s_opts = opts
  if subsampled and opts.start_epsilon is not None:
    s_opts = dataclasses.replace(opts, epsilon=opts.start_epsilon)

  # Ranking on all points only the best ``rank_on_all`` starts by their subsample cost.
  rank_all = opts.rank_on_all is None or opts.rank_on_all >= starts

  def run(key, kind):
    g = jnp.zeros((num_support,), jnp.float32)
    if kind == "gaussian":
      support = _gaussian_seed(key, s_points, s_mass, num_support)
    elif kind == "annealed":
      support = _kmeans_pp(key, s_points, s_mass, s_sq, num_support, candidates)
      support, g = _anneal(s_points, s_mass, support, opts)
    else:
      support = _kmeans_seed(key, s_points, s_mass, s_sq, num_support, candidates, lloyd_steps)
    if opts.solver == "annealed" and opts.anneal and kind != "annealed":
      support, g = _anneal(s_points, s_mass, support, opts)
    # The cost ranks the starts; subsampled, it only picks those ranked on all points (below).
    estimate = starts > 1 and not (subsampled and rank_all)
    return _balanced(s_points, s_mass, s_sq, support, g, s_opts, estimate, first)

  def rank(support_g):
    # Ranked on every point: one polish iteration on all points gives the cost (from below) of
    # the support the subsample led to. A subsample's cluster masses differ from the class's by
    # sampling noise, which can flip near-ties between ways of sharing the support among
    # clusters that differ by 10% and more on all points.
    return _balanced(points, mass, sq_norms, *support_g, opts, True, 1)

  keys = jax.random.split(start_key, seeded)
  if annealed:  # keys of their own: the seeded starts' draws do not depend on them
    keys = jnp.concatenate([keys, jax.random.split(jax.random.fold_in(start_key, 1), annealed)])
  if starts == 1:
    support, g, _ = run(keys[0], "gaussian" if gaussian else "kmeans")
  else:
    # One start after another (lax.map, not vmap): vmapped, every start's while loops would run
    # until the slowest converges and the semi-dual's fast-path cond would compute both branches.
    outs = [jax.lax.map(functools.partial(run, kind=kind), part) for kind, part in
            (("kmeans", keys[:seeded - gaussian]), ("gaussian", keys[seeded - gaussian:seeded]),
             ("annealed", keys[seeded:]))
            if part.shape[0]]
    supports, gs, costs = (jnp.concatenate(x) for x in zip(*outs, strict=True))
    if subsampled:
      if not rank_all:  # only the best rank_on_all by subsample cost (ties: the first start)
        top = jnp.argsort(costs, stable=True)[:opts.rank_on_all]
        supports, gs = supports[top], gs[top]
      supports, gs, costs = jax.lax.map(rank, (supports, gs))
    # Starts within 1e-5 (relative) of the best count as tied and the first of them wins, so
    # float round-off (vmapped over classes or not) does not flip the choice between them.
    best = jnp.argmax(costs <= jnp.min(costs) * (1 + 1e-5) + 1e-30)
    support, g = supports[best], gs[best]
    if subsampled:  # the winner has run one iteration on all points
      support, _, _ = _balanced(points, mass, sq_norms, support, g, opts, False,
                                opts.num_iterations - 1)
    elif prune:
      support, _, _ = _balanced(points, mass, sq_norms, support, g, opts, False,
                                opts.num_iterations - opts.prune_iterations)
    return Barycenter(support, uniform)
  if subsampled:
    support, _, _ = _balanced(points, mass, sq_norms, support, g, opts, False)
  return Barycenter(support, uniform)


def _subsample(key: jax.Array, mass: jax.Array, size: int) -> jax.Array:
  """Indices i32[size] of ``size`` distinct points drawn with probability ~ mass, in index order.

  Each point's Gumbel score depends on its index alone (``fold_in``), so zero-mass padding rows,
  which are never drawn unless there are fewer real points than ``size``, do not change the draw.
  """
  scores = jax.vmap(lambda i: jax.random.gumbel(jax.random.fold_in(key, i)))(
      jnp.arange(mass.shape[0]))
  scores = jnp.where(mass > 0, scores + jnp.log(jnp.where(mass > 0, mass, 1.0)), -jnp.inf)
  return jnp.sort(jax.lax.top_k(scores, size)[1])


def _voronoi_mass(points, mass, sq_norms, s_points):
  """f32[m]: the class's mass in each subsample point's Voronoi cell among the subsample.

  Every point (``points`` f32[n, d], ``mass`` f32[n], zeros for padding) gives its mass to its
  nearest subsample point (``s_points`` f32[m, d]), so the weighted subsample is a quantisation
  of the class (close in W2) whose well-separated clusters carry exactly the class's masses.
  """
  labels = jnp.argmin(_sq_dists(points, sq_norms, s_points), 1)
  return jax.ops.segment_sum(mass, labels, s_points.shape[0])


def _gaussian_seed(key: jax.Array, points: jax.Array, mass: jax.Array, num_support: int
                   ) -> jax.Array:
  """k support points drawn from the Gaussian of the points' mean and per-coordinate spread.

  As from POT's random normal start, the first balanced plan then shares the points among the
  support by random linear projections, so the support is spread over the clusters by mass
  (where k-means++ spreads it by spatial extent): the two kinds of start fail on different
  clouds.
  """
  mean = mass @ points
  std = jnp.sqrt(mass @ jnp.square(points - mean))
  return mean + std * jax.random.normal(key, (num_support, points.shape[1]), points.dtype)


def _kmeans_seed(key, points, mass, sq_norms, num_support, candidates, lloyd_steps):
  """A mass-weighted k-means++ seeding refined by ``lloyd_steps`` Lloyd steps of OTT-JAX's
  ``ott.tools.k_means`` (one run)."""
  if lloyd_steps == 0:
    return _kmeans_pp(key, points, mass, sq_norms, num_support, candidates)
  support, _ = _kmeans(points, mass, sq_norms, key, num_support, candidates, 1, lloyd_steps)
  return support


_solve_jit = jax.jit(_solve_one, static_argnums=(3, 4, 5),
                     static_argnames=("num_support", "learn_weights", "opts"))

# Point counts are padded (zero mass) up to a multiple of this, so classes of similar sizes share
# one compilation; it costs at most 127 rows of work.
_PAD_MULTIPLE = 128


def _padded_size(n: int) -> int:
  return -(-n // _PAD_MULTIPLE) * _PAD_MULTIPLE


def _solve_classes(points, mass, keys, num_support, learn_weights, opts):
  return jax.vmap(_solve_one, in_axes=(0, 0, 0, None, None, None))(
      points, mass, keys, num_support, learn_weights, opts
  )


_solve_classes_jit = jax.jit(_solve_classes, static_argnums=(3, 4, 5),
                             static_argnames=("num_support", "learn_weights", "opts"))


def class_solver(num_support: int, *, learn_weights: bool = False, **solver_options: Any
                 ) -> Callable[..., Barycenter]:
  """The jitted per-class solver that :func:`class_barycenters` maps over classes.

  ``solve(points f32[C, n, d], mass f32[C, n], keys key[C]) -> Barycenter(f32[C, k, d],
  f32[C, k])``: the per-class solver vmapped over classes. Unlike :func:`free_support_barycenter`
  it checks nothing and does not renormalise: ``n`` must be padded as this module pads it and
  each class's ``mass`` must sum to 1 (zero on padding rows), as :func:`class_barycenters` builds
  them. Exposed for ahead-of-time memory analysis (``solve.lower(...)``).
  """
  _check_num_support(num_support)
  opts = _options(solver_options)
  _check_solver(opts, learn_weights)
  return functools.partial(_solve_classes_jit, num_support=int(num_support),
                           learn_weights=bool(learn_weights), opts=opts)


# ----------------------------------------------------------------------------------------------
# Public API.


def _is_concrete(*arrays: Any) -> bool:
  """Whether the values are known (not traced under a caller's jit), so they can be checked."""
  return not any(isinstance(x, jax.core.Tracer) for x in arrays)


def free_support_barycenter(
    points: jax.Array,
    num_support: int,
    key: jax.Array,
    *,
    weights: jax.Array | None = None,
    learn_weights: bool = False,
    **solver_options: Any,
) -> Barycenter:
  """The free-support W2 barycenter of one point cloud (one class's features).

  Jittable with ``num_support``, ``learn_weights`` and the solver options static; the checks on
  values (finite inputs, enough points of positive mass) run only on concrete arrays.

  Args:
    points: f32[n, d] the class's features.
    num_support: k, the number of support points (images per class).
    key: a PRNG key (seeds the k-means++ initialisation).
    weights: optional f32[n] non-negative point masses (normalised here); zero marks padding.
      None: uniform.
    learn_weights: False: uniform weights 1/k (the balanced barycenter). True: weights free on
      the simplex (k-means; the weights are the cell masses, some may be 0).
    **solver_options: fields of :class:`BarycenterOptions`.

  Returns:
    Barycenter(support f32[k, d], weights f32[k]).

  Raises:
    ShapeError: points not f32[n, d] or weights not f32[n].
    NonFiniteError: NaN or Inf in points or weights.
    ConfigError: num_support < 1, more support points than points of positive mass, bad weights
      or an unknown option.
  """
  opts = _options(solver_options)
  _check_solver(opts, learn_weights)
  points = jnp.asarray(points)
  if points.ndim != 2 or not jnp.issubdtype(points.dtype, jnp.floating):
    raise ShapeError(
        f"points must be a float array [n, d], got {points.dtype}{list(points.shape)}; pass one "
        "class's features (use class_barycenters for a labelled set)."
    )
  _check_num_support(num_support)
  n = points.shape[0]
  if weights is None:
    mass = jnp.ones((n,), jnp.float32)
  else:
    mass = jnp.asarray(weights, jnp.float32)
    if mass.shape != (n,):
      raise ShapeError(f"weights must have shape [{n}] (one mass per point), got {mass.shape}.")
  points, mass, summary = _prepare(points, mass, _padded_size(n))
  if _is_concrete(summary):
    bad_points, bad_mass, negative, count = (int(x) for x in np.asarray(summary))
    if bad_points or bad_mass:
      name, bad = ("points", bad_points) if bad_points else ("weights", bad_mass)
      raise NonFiniteError(_non_finite_message(name, bad))
    if negative:
      raise ConfigError("weights must be non-negative masses (zero marks padding).")
    if count < num_support:
      raise ConfigError(
          f"num_support={num_support} exceeds the {count} point(s) of positive mass; lower "
          "num_support (images per class) or pass more points."
      )
  return _solve_jit(points, mass, key, num_support, bool(learn_weights), opts)


@functools.partial(jax.jit, static_argnums=2)
def _prepare(
    points: jax.Array, mass: jax.Array, padded_n: int
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Pads to ``padded_n`` rows of zero mass, normalises the mass, and summarises the input.

  One dispatch and one host transfer instead of a handful of eager ops.

  Returns:
    (points f32[padded_n, d], mass f32[padded_n] summing to 1, i32[4]: non-finite points,
    non-finite masses, negative masses, positive masses).
  """
  summary = jnp.stack([
      jnp.sum(~jnp.isfinite(points)),
      jnp.sum(~jnp.isfinite(mass)),
      jnp.sum(mass < 0),
      jnp.sum(mass > 0),
  ]).astype(jnp.int32)
  pad = padded_n - points.shape[0]
  points = jnp.pad(points.astype(jnp.float32), ((0, pad), (0, 0)))
  mass = jnp.pad(mass / jnp.sum(mass), (0, pad))
  return points, mass, summary


def class_barycenters(
    features: jax.Array | np.ndarray,
    labels: jax.Array | np.ndarray,
    num_classes: int,
    num_support: int,
    key: jax.Array,
    *,
    learn_weights: bool = False,
    classes_per_batch: int | None = None,
    execution: Execution | None = None,
    **solver_options: Any,
) -> Barycenter:
  """Per-class barycenters of a labelled feature set, vmapped over classes.

  Ragged classes are gathered on the host into a zero-mass-padded f32[C, n_max, d] array; class
  c uses the key ``fold_in(key, c)``, so its result equals
  ``free_support_barycenter(features[labels == c], num_support, fold_in(key, c), ...)`` up to
  float round-off, whatever the other classes (one class per batch, the CPU default). Batched
  (vmapped) classes round differently, which can occasionally tip a near-tie of the balanced
  iteration into another local optimum of about the same W2^2 (within 0.5% in the tests).

  Args:
    features: f32[N, d].
    labels: int[N] in [0, num_classes).
    num_classes: C.
    num_support: k support points per class.
    key: a PRNG key.
    learn_weights: see :func:`free_support_barycenter`.
    classes_per_batch: classes solved together in one vmapped call (bounds device memory at
      about classes_per_batch * n_max * (d + 8k) floats); batches run one after another.
      None: all classes at once on an accelerator, one at a time on CPU, where a vmapped batch
      is slower per class (its while loops run until its slowest class converges;
      docs/benchmarks.md, barycenter).
    execution: how the class batches run on devices (:mod:`wmdd_jax.distributed`; default: one
      device). Work units run batch b on device b % D, concurrently; a mesh solves all classes
      at once, each device its own (every process must pass the same, all-class features). The
      results do not depend on the device count either way.
    **solver_options: fields of :class:`BarycenterOptions`.

  Returns:
    Barycenter(support f32[C, k, d], weights f32[C, k]) (device arrays; host arrays on a
    mesh).

  Raises:
    ShapeError: features not [N, d] or labels not [N].
    NonFiniteError: NaN or Inf in the features.
    ConfigError: labels out of range, or a class with fewer than num_support points.
  """
  opts = _options(solver_options)
  _check_solver(opts, learn_weights)
  _check_num_support(num_support)
  feats = np.asarray(features)
  labels = np.asarray(labels)
  if feats.ndim != 2 or not np.issubdtype(feats.dtype, np.floating):
    raise ShapeError(
        f"features must be a float array [N, d], got {feats.dtype}{list(feats.shape)}."
    )
  if labels.shape != (feats.shape[0],) or not np.issubdtype(labels.dtype, np.integer):
    raise ShapeError(
        f"labels must be integers of shape [{feats.shape[0]}] (one per feature row), got "
        f"{labels.dtype}{list(labels.shape)}."
    )
  _check_finite(feats, "features")
  if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
    raise ConfigError(
        f"labels must lie in [0, {num_classes}), got [{labels.min()}, {labels.max()}]; check "
        "num_classes."
    )
  counts = np.bincount(labels, minlength=num_classes)
  short = np.flatnonzero(counts < num_support)
  if short.size:
    listed = ", ".join(f"class {c} has {counts[c]}" for c in short[:5])
    more = f" and {short.size - 5} more" if short.size > 5 else ""
    raise ConfigError(
        f"num_support={num_support} exceeds the points of {short.size} class(es): {listed}{more};"
        " lower num_support (images per class) or add data for those classes."
    )
  # Gather on the host: rows of class c first, in their original order, then zero padding.
  n_max = _padded_size(int(counts.max()))
  order = np.argsort(labels, kind="stable")
  starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
  rank = np.arange(labels.size) - starts[labels[order]]
  padded = np.zeros((num_classes, n_max, feats.shape[1]), np.float32)
  padded[labels[order], rank] = feats[order]
  mass = np.zeros((num_classes, n_max), np.float32)
  mass[labels[order], rank] = (1.0 / counts[labels[order]]).astype(np.float32)

  keys = jax.vmap(lambda c: jax.random.fold_in(key, c))(jnp.arange(num_classes))
  batch = classes_per_batch
  if batch is None:
    batch = 1 if jax.default_backend() == "cpu" else num_classes
  if not isinstance(batch, int | np.integer) or batch < 1:
    raise ConfigError(f"classes_per_batch must be None or an int >= 1, got {batch!r}.")
  execution = execution or Execution()
  solve = functools.partial(_solve_classes_jit, num_support=num_support,
                            learn_weights=bool(learn_weights), opts=opts)
  solve_one = functools.partial(_solve_jit, num_support=num_support,
                                learn_weights=bool(learn_weights), opts=opts)
  out = execution.map_classes(solve, (padded, mass, keys), chunk=int(batch), solve_one=solve_one)
  return Barycenter(out.support, out.weights)


@functools.partial(jax.jit, static_argnames=("epsilon",))
def w2_cost(
    support: jax.Array,
    weights: jax.Array,
    points: jax.Array,
    point_weights: jax.Array | None = None,
    *,
    epsilon: float = 1e-4,
) -> jax.Array:
  """Near-exact W2^2 between a discrete measure and a point cloud (diagnostics; jittable).

  Solves the semi-dual with epsilon annealed down to ``epsilon`` (relative to the mean cost) and
  returns the *unregularised* semi-dual value at the potentials found,
  <w, g> + sum_i a_i min_j (C_ij - g_j): a certified lower bound on W2^2 (weak duality) whose
  error is quadratic in the error of g, so it is exact to about 1e-6 relative in float32,
  far closer than the cost of a rounded entropic plan.

  Args:
    support: f32[k, d].
    weights: f32[k] non-negative (normalised here).
    points: f32[n, d].
    point_weights: f32[n] non-negative masses (normalised here); None: uniform.
    epsilon: final relative smoothing.

  Returns:
    f32[] the estimate of W2^2 = min_T sum_ij T_ij ||y_i - b_j||^2.
  """
  support = jnp.asarray(support, jnp.float32)
  points = jnp.asarray(points, jnp.float32)
  if support.ndim != 2 or points.ndim != 2 or support.shape[1] != points.shape[1]:
    raise ShapeError(
        f"support [k, d] and points [n, d] must share d, got {support.shape} and {points.shape}."
    )
  n = points.shape[0]
  mass = jnp.full((n,), 1.0 / n) if point_weights is None else jnp.asarray(point_weights)
  mass = mass.astype(jnp.float32)
  w = jnp.asarray(weights, jnp.float32)
  mass, w = mass / jnp.sum(mass), w / jnp.sum(w)
  cost = _sq_dists(points, jnp.sum(points * points, -1), support)
  # Warm up at larger smoothing first: a cold solve at 1e-4 would need many more steps.
  eps = 0.05 * _mean_cost(cost, mass, w)
  g, _ = _solve_semidual(cost, mass, w, jnp.zeros_like(w), eps, 1e-5, 100)
  return _dual_w2(cost, mass, w, g, epsilon)


def _check_solver(opts: BarycenterOptions, learn_weights: bool) -> None:
  if opts.solver == "ott" and learn_weights:
    raise ConfigError("barycenter solver='ott' learns no weights (OTT's FreeWassersteinBarycenter "
                      "keeps them uniform); use solver='annealed' with learn_weights, or "
                      "learn_weights=False.")


def _check_num_support(num_support: Any) -> None:
  if not isinstance(num_support, int | np.integer) or num_support < 1:
    raise ConfigError(f"num_support must be an int >= 1 (images per class), got {num_support!r}.")


def _non_finite_message(name: str, bad: int) -> str:
  return (
      f"{name} hold {bad} NaN/Inf value(s); fix the feature extraction (e.g. a diverged "
      "teacher or unnormalised inputs) before computing barycenters."
  )


def _check_finite(x: np.ndarray, name: str) -> None:
  bad = int(x.size - np.count_nonzero(np.isfinite(x)))
  if bad:
    raise NonFiniteError(_non_finite_message(name, bad))
