"""Benchmark: per-class free-support W2 barycenters against POT's exact LP, on cloud families.

Per class of each family it runs, in one process: POT (``ot.lp.free_support_barycenter``, the
exact network-simplex LP per iteration, from a random normal init as the official WMDD code
calls it) and, through ``free_support_barycenter``: the default (``solver="semidual"``: starts
on a 512-point subsample weighted by its Voronoi cells, half seeded by a Gaussian fit, one
annealed by OTT-JAX Sinkhorn and the rest by OTT-JAX k-means, each polished 5 iterations
there (at the coarser start_epsilon), the best 3 of them by subsample cost ranked by one
polish iteration on all points, the winner polished on all points; min(8, 100 // k) starts up
to k=30: 8 at k=5 and 10, 5 at k=20, one at k=50), the previous default (``previous``: the
subsample's points weighted uniformly, min(8, max(1, 60 // k)) starts of two kinds, no
annealed one), one start (``num_inits=1``), the OTT-JAX annealed solver
(``solver="annealed"``: one start, five OTT Sinkhorn annealing stages, then the polish),
OTT-JAX's ``FreeWassersteinBarycenter`` (``solver="ott"``, one start, timed once; on the
first ``--ott_classes`` classes only, it is slow) and learned weights (OTT-JAX k-means). Every
W2^2 is measured exactly by POT's ``ot.emd2`` against the uniform measure on the class's
points.

Times are per class as the library runs classes on a CPU: one class per call
(``class_barycenters`` solves one class at a time there), each call's wall time including its
dispatch and the input checks; JAX times are after compilation (one warm-up call per shape and
method). POT's time is the best of its runs with the BLAS's default threads and with one
(threadpoolctl): on the shared machine its BLAS threads (``ot.dist``) contend with the other
jobs and its time moves several-fold with the load. The methods alternate within a class so
that the shared machine's load hits them alike, each time is the best of ``--repeats`` calls,
and the load averages before and after are recorded.

Families (synthetic, post-ReLU, clustered like penultimate features):
  cifar: n=5000, d=512, k=50, 10 sub-clusters of uneven sizes per class (the paper's CIFAR-10
    step at IPC 50).
  clustered: n=1200, d=64, k=5/10/20 (cycling over classes), 2-5 well-separated clusters of
    unequal sizes (the family on which one start is fragile).
  imagenet_k10, imagenet_k50: n=1300, d=512 (an ImageNet class), k=10 and 50.

    .venv/bin/python -m bench.barycenter                                   # the run in the docs
    .venv/bin/python -m bench.barycenter --classes 1 --families clustered --out /tmp/b.json

Writes bench/results/barycenter.json and prints a table; the figures are in docs/benchmarks.md.

``--study anneal`` instead runs the study of the default's robustness (against the previous
default, one start and OTT-JAX annealing):
15 seeded stress clouds (2-5 well-separated clusters of unequal sizes with n 800-2000, d
32/64/128, k 5/10/20, and ImageNet-like clouds with n=1300, d=512, k 10/50) and 8 small ones
(n=300, d=16, k=5, 4 clusters), W2^2 relative to the better of two POT runs (k random data
points, and a random normal init); it writes bench/results/barycenter_anneal.json:

    .venv/bin/python -m bench.barycenter --study anneal

``--study robustness`` runs the default, the previous default (with and without Voronoi
subsample masses), one start and OTT-JAX annealing alone (``solver="annealed"``, on the
subsample and on all points) from two keys on each of the 15 stress clouds and 45 more
clouds of well-separated unequal clusters (n 800-2000, d 32-128, k 5/10/20), W2^2 relative to
the better of two POT runs; it writes bench/results/barycenter_robustness.json:

    .venv/bin/python -m bench.barycenter --study robustness

``--study features`` runs the default, the previous default, one start and 16 seeded starts on
a labelled feature set, such as the penultimate features a pipeline run leaves in its workdir
(``features.npy``, with the rows' labels in ``stats.npz``): per class and k (``--ks``), from
``--keys`` keys through ``class_barycenters``, W2^2 relative to the better of two POT runs, and
POT's own spread (its worse run over its better); it writes ``--out`` (default
bench/results/barycenter_features.json):

    .venv/bin/python -m bench.barycenter --study features --features W/features.npy \
        --labels W/stats.npz:labels --out bench/results/barycenter_features_cifar10_dev.json
"""

from __future__ import annotations

import argparse
import os
import time

import jax
import numpy as np
from threadpoolctl import threadpool_limits  # scikit-learn's dependency (requirements.txt)

from bench.common import RESULTS_DIR, machine, write_result
from wmdd_jax.barycenter import class_barycenters, free_support_barycenter

# POT imports PyTorch and TensorFlow at import time when they are installed; only its numpy LP
# is timed here, so its switches keep them out of this process.
for _backend in ("PYTORCH", "TENSORFLOW", "CUPY"):
  os.environ.setdefault(f"POT_BACKEND_DISABLE_{_backend}", "1")
import ot  # noqa: E402

FAMILIES = ("cifar", "clustered", "imagenet_k10", "imagenet_k50")


def class_features(rng: np.random.Generator, n: int, d: int, clusters: int = 10) -> np.ndarray:
  """f32[n, d] clustered, non-negative features of one class (sub-clusters of uneven sizes)."""
  mean = rng.normal(0.0, 1.0, d)
  centers = mean + 0.6 * rng.normal(0.0, 1.0, (clusters, d))
  sizes = rng.dirichlet(np.full(clusters, 2.0))
  which = rng.choice(clusters, n, p=sizes)
  return np.maximum(centers[which] + 0.8 * rng.normal(0.0, 1.0, (n, d)), 0.0).astype(np.float32)


def unequal_clusters(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
  """f32[n, d]: 2-5 well-separated clusters of unequal sizes, post-ReLU."""
  m = int(rng.integers(2, 6))
  centers = 3.0 * rng.normal(size=(m, d))
  which = rng.choice(m, n, p=rng.dirichlet(np.ones(m)))
  return np.maximum(centers[which] + rng.normal(size=(n, d)), 0.0).astype(np.float32)


def family_class(family: str, rng: np.random.Generator, c: int) -> tuple[np.ndarray, int]:
  """(f32[n, d] points, k) of class ``c`` of a family."""
  if family == "cifar":
    return class_features(rng, 5000, 512), 50
  if family == "clustered":
    return unequal_clusters(rng, 1200, 64), (5, 10, 20)[c % 3]
  if family in ("imagenet_k10", "imagenet_k50"):
    return class_features(rng, 1300, 512), int(family.rsplit("k", 1)[1])
  raise ValueError(family)


def robustness_cloud(seed: int) -> tuple[np.ndarray, int]:
  """(f32[n, d] points, k): 2-5 well-separated clusters of unequal sizes, n 800-2000, d 32-128,
  k 5/10/20 (``--study robustness``; two in three stress clouds of ``--study anneal``)."""
  rng = np.random.default_rng(seed)
  n, d = int(rng.integers(800, 2001)), int(rng.choice([32, 64, 128]))
  k = int(rng.choice([5, 10, 20]))
  return unequal_clusters(rng, n, d), k


def stress_cloud(seed: int) -> tuple[np.ndarray, int]:
  """(f32[n, d] points, k) of one stress cloud of ``--study anneal``."""
  if seed % 3 < 2:
    return robustness_cloud(seed)
  rng = np.random.default_rng(seed)
  return class_features(rng, 1300, 512), int(rng.choice([10, 50]))


SCHEDULES = {
    "default": {},
    "previous default (4 k-means++ starts, all points)": {
        "subsample": 0, "num_inits": 4, "gaussian_inits": 0, "stop_fraction": 1e-3},
    "one start": {"num_inits": 1},
    "annealed (2, 0.6, 0.2, 0.06, 0.02), 1 start": {"solver": "annealed"},
    "annealed (2, 0.6, 0.2, 0.06, 0.02), 2 starts": {"solver": "annealed", "num_inits": 2},
}


def small_cloud(seed: int) -> tuple[np.ndarray, int]:
  """(f32[300, 16], 5): 4 well-separated post-ReLU clusters of random sizes, k=5 (the small
  clustered cloud of tests/test_barycenter.py)."""
  rng = np.random.default_rng(seed)
  centers = 3.0 * rng.normal(size=(4, 16))
  return np.maximum(centers[rng.integers(0, 4, 300)] + rng.normal(size=(300, 16)), 0.0).astype(
      np.float32), 5


def pot_runs(points: np.ndarray, k: int, seed: int) -> tuple[list[float], list[float]]:
  """Two POT ``free_support_barycenter`` runs on ``points``, from k random data points and from
  a random normal init (both drawn from ``seed``): (their exact W2^2, their seconds)."""
  pts64 = points.astype(np.float64)
  n, d = points.shape
  uniform = np.full(n, 1.0 / n)
  inits = [points[np.random.default_rng(seed).choice(n, k, replace=False)],
           np.random.default_rng(seed).normal(size=(k, d))]
  w2s, seconds = [], []
  for init in inits:
    start = time.perf_counter()
    support = ot.lp.free_support_barycenter([pts64], [uniform], np.asarray(init, float))
    seconds.append(time.perf_counter() - start)
    w2s.append(exact_w2(support, np.full(k, 1.0 / k), pts64))
  return w2s, seconds


def pot_reference(points: np.ndarray, k: int, seed: int) -> float:
  """The lower exact W2^2 of the two POT runs of :func:`pot_runs`."""
  return min(pot_runs(points, k, seed)[0])


def anneal_study(args) -> None:
  """One start per annealing schedule on the stress clouds; writes the W2^2 ratios to POT."""
  rows = []
  clouds = [("stress", seed, *stress_cloud(seed)) for seed in range(3000, 3000 + args.clouds)]
  clouds += [("small", seed, *small_cloud(seed)) for seed in range(3100, 3100 + args.small)]
  for family, seed, points, k in clouds:
    pot = pot_reference(points, k, seed)
    n, d = points.shape
    row = {"family": family, "seed": seed, "n": n, "d": d, "k": k, "pot_w2": pot}
    for name, opts in SCHEDULES.items():
      out = free_support_barycenter(points, k, jax.random.key(seed), **opts)
      row[name] = exact_w2(out.support, out.weights, points) / pot
    rows.append(row)
    print(f"{family} {seed} n={n} d={d} k={k}: " + " | ".join(
        f"{name} {row[name]:.4f}" for name in SCHEDULES), flush=True)
  summary = []
  for family in ("stress", "small"):
    fam = [r for r in rows if r["family"] == family]
    for name in SCHEDULES if fam else ():
      summary.append({"family": family, "method": name,
                      "w2_ratio_max": float(max(r[name] for r in fam)),
                      "w2_ratio_median": float(np.median([r[name] for r in fam])),
                      "clouds_above_1pct": int(sum(r[name] > 1.01 for r in fam)),
                      "clouds": len(fam)})
  for e in summary:
    print(f"{e['family']:7s} {e['method']:48s} max {e['w2_ratio_max']:.4f} median "
          f"{e['w2_ratio_median']:.4f} > 1%: {e['clouds_above_1pct']}/{e['clouds']}")
  write_result(args.out or os.path.join(RESULTS_DIR, "barycenter_anneal.json"), {
      "benchmark": "barycenter_anneal",
      "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
      "config": {"stress_clouds": args.clouds, "small_clouds": args.small,
                 "methods": {n: o for n, o in SCHEDULES.items()},
                 "reference": "the lower W2^2 of two POT free_support_barycenter runs (k random "
                              "data points; random normal init), measured by ot.emd2"},
      "summary": summary, "per_cloud": rows, "machine": machine(pot=ot.__version__)})


def previous_default(k: int) -> dict:
  """The options that give the default before commit 02c295d at support size k."""
  return {"subsample_mass": "uniform", "annealed_inits": 0, "num_inits": min(8, max(1, 60 // k))}


PREVIOUS = "previous default (uniform subsample masses, min(8, 60 // k) starts, none annealed)"

ROBUSTNESS_METHODS = {
    "default": lambda k: {},
    PREVIOUS: previous_default,
    "previous default with Voronoi subsample masses":
        lambda k: {**previous_default(k), "subsample_mass": "voronoi"},
    "one start": lambda k: {"num_inits": 1},
    # Annealing as the cure for poor local optima, without multiple starts: one k-means++ seed,
    # OTT-JAX Sinkhorn at epsilon 2 -> 0.02 of the mean cost, then the polish.
    "OTT-JAX annealing, one start (solver annealed)": lambda k: {"solver": "annealed"},
    "OTT-JAX annealing on all points, one start (solver annealed, subsample 0)":
        lambda k: {"solver": "annealed", "subsample": 0},
}


FEATURE_METHODS = {
    "default": lambda k: {},
    PREVIOUS: previous_default,
    "one start": lambda k: {"num_inits": 1},
    "16 seeded starts": lambda k: {"num_inits": 16},
}


def load_labels(spec: str) -> np.ndarray:
  """int[N] labels from ``path.npy`` or ``path.npz:key``."""
  path, key = spec.rsplit(":", 1) if ".npz:" in spec else (spec, "")
  if path.endswith(".npz"):
    with np.load(path) as data:
      if key not in data.files:
        raise SystemExit(f"--labels {spec}: name the array as {path}:<key>, one of {data.files}")
      return np.asarray(data[key])
  return np.load(path)


def features_study(args) -> None:
  """The methods against POT on a labelled feature set (a pipeline's features.npy), per class."""
  features = np.load(args.features).astype(np.float32)
  labels = load_labels(args.labels).astype(np.int64)
  if features.ndim != 2 or labels.shape != features.shape[:1]:
    raise SystemExit(f"--features must be [N, d] and --labels [N]: got {features.shape} and "
                     f"{labels.shape} (the train split's labels, in the features' order).")
  num_classes = int(labels.max()) + 1
  classes = range(min(num_classes, args.feature_classes))
  ks = [int(k) for k in args.ks.split(",") if k]
  rows, summary = [], []
  for k in ks:
    runs = [pot_runs(features[labels == c], k, 100 + c) for c in classes]
    pots = [w2s for w2s, _ in runs]
    k_rows = [{"k": k, "class": c, "n": int(np.sum(labels == c)), "pot_w2": w2s, "pot_s": secs}
              for c, (w2s, secs) in zip(classes, runs, strict=True)]
    rows += k_rows
    pot_spread = [max(r) / min(r) for r in pots]
    # POT from the random normal init, as the official code calls it (the study's timed run).
    pot_s = float(np.median([secs[1] for _, secs in runs]))
    summary.append({"k": k, "method": "POT's worse run / its better run",
                    "w2_ratio_median": float(np.median(pot_spread)),
                    "w2_ratio_max": float(max(pot_spread)), "s_per_class_median": pot_s})
    for name, options in FEATURE_METHODS.items():
      ratios, times = [], []
      jax.block_until_ready(class_barycenters(features, labels, num_classes, k,
                                              jax.random.key(0), **options(k)))  # compile
      for draw in range(args.keys):
        key = jax.random.key(draw)
        t, out = timed(lambda: class_barycenters(features, labels, num_classes, k, key,  # noqa: B023
                                                 **options(k)))  # noqa: B023
        times.append(t / num_classes)
        for c in classes:
          points = features[labels == c]
          ratios.append(exact_w2(out.support[c], out.weights[c], points) / min(pots[c]))
          k_rows[c].setdefault(name, []).append(ratios[-1])
      ratios = np.asarray(ratios)
      summary.append({"k": k, "method": name, "runs": int(ratios.size),
                      "w2_ratio_median": float(np.median(ratios)),
                      "w2_ratio_min": float(ratios.min()), "w2_ratio_max": float(ratios.max()),
                      "runs_above_1pct": int(np.sum(ratios > 1.01)),
                      "s_per_class_median": float(np.median(times)),
                      "speedup_over_pot": pot_s / float(np.median(times))})
    for e in summary[-len(FEATURE_METHODS) - 1:]:
      extra = (f" min {e['w2_ratio_min']:.4f} > 1%: {e['runs_above_1pct']}/{e['runs']} "
               f"x{e['speedup_over_pot']:.1f}" if "runs" in e else "")
      print(f"k={k:3d} {e['method'][:60]:60s} median {e['w2_ratio_median']:.4f} max "
            f"{e['w2_ratio_max']:.4f} s/class {e['s_per_class_median']:.3f}{extra}", flush=True)
    jax.clear_caches()
  write_result(args.out or os.path.join(RESULTS_DIR, "barycenter_features.json"), {
      "benchmark": "barycenter_features",
      "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
      "config": {"features": args.features, "labels": args.labels,
                 "shape": list(features.shape), "classes": len(classes), "ks": ks,
                 "keys": args.keys,
                 "methods": {n: o(10) for n, o in FEATURE_METHODS.items()},
                 "methods_note": "num_inits shown at k=10; the previous default's is "
                                 "min(8, max(1, 60 // k))",
                 "reference": "the lower W2^2 of two POT free_support_barycenter runs (k random "
                              "class points; random normal init; seed 100 + class), measured by "
                              "ot.emd2; keys: class_barycenters(key(draw)), class c from "
                              "fold_in(key, c)",
                 "timing": "class_barycenters on all classes (one class per call on CPU) after "
                           "compilation, divided by the number of classes, median over keys; "
                           "POT: its random-normal-init run per class (BLAS default threads), "
                           "median over classes; speedup_over_pot is the ratio of the medians"},
      "summary": summary, "per_class": rows, "machine": machine(pot=ot.__version__)})


def robustness_study(args) -> None:
  """Each method from two keys per cloud on the stress clouds; W2^2 relative to POT's best."""
  clouds = [("stress", seed, *stress_cloud(seed)) for seed in range(3000, 3000 + args.clouds)]
  clouds += [("unequal", seed, *robustness_cloud(seed))
             for seed in range(4000, 4000 + args.unequal)]
  refs = [pot_reference(points, k, seed) for _, seed, points, k in clouds]
  rows = [{"family": f, "seed": s, "n": p.shape[0], "d": p.shape[1], "k": k, "pot_w2": r}
          for (f, s, p, k), r in zip(clouds, refs, strict=True)]
  summary = []
  for name, options in ROBUSTNESS_METHODS.items():
    ratios, times = [], []
    for row, (_, seed, points, k) in zip(rows, clouds, strict=True):
      row[name] = []
      for draw in range(args.keys):
        key = jax.random.key(seed + 7919 * draw)
        jax.block_until_ready(free_support_barycenter(points, k, key, **options(k)))  # compile
        t, out = timed(lambda: free_support_barycenter(points, k, key, **options(k)))  # noqa: B023
        row[name].append(exact_w2(out.support, out.weights, points) / row["pot_w2"])
        ratios.append(row[name][-1])
        times.append(t)
    ratios = np.asarray(ratios)
    summary.append({"method": name, "runs": int(ratios.size),
                    "w2_ratio_max": float(ratios.max()),
                    "w2_ratio_median": float(np.median(ratios)),
                    "runs_above_1pct": int(np.sum(ratios > 1.01)),
                    "runs_above_3pct": int(np.sum(ratios > 1.03)),
                    "s_median": float(np.median(times))})
    print(f"{name:80s} max {ratios.max():.4f} median {np.median(ratios):.4f} > 1%: "
          f"{summary[-1]['runs_above_1pct']}/{ratios.size} > 3%: "
          f"{summary[-1]['runs_above_3pct']} s/class {np.median(times):.3f}", flush=True)
    jax.clear_caches()  # every cloud shape compiled again per method: free the executables
  write_result(args.out or os.path.join(RESULTS_DIR, "barycenter_robustness.json"), {
      "benchmark": "barycenter_robustness",
      "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
      "command": "python -m bench.barycenter --study robustness",
      "config": {"stress_clouds": args.clouds, "unequal_clouds": args.unequal,
                 "keys_per_cloud": args.keys,
                 "methods": {n: o(10) for n, o in ROBUSTNESS_METHODS.items()},
                 "methods_note": "num_inits shown at k=10; the previous default's is "
                                 "min(8, max(1, 60 // k))",
                 "reference": "the lower W2^2 of two POT free_support_barycenter runs (k random "
                              "data points; random normal init), measured by ot.emd2",
                 "timing": "one call per run after its compilation (not best of repeats)"},
      "summary": summary, "per_cloud": rows, "machine": machine(pot=ot.__version__)})


def exact_w2(support, weights, points) -> float:
  points = np.asarray(points, np.float64)
  weights = np.asarray(weights, np.float64)
  uniform = np.full(len(points), 1.0 / len(points))
  cost = ot.dist(np.asarray(support, np.float64), points)
  return float(ot.emd2(weights / weights.sum(), uniform, cost, numItermax=1_000_000))


def timed(fn) -> tuple[float, object]:
  start = time.perf_counter()
  out = jax.block_until_ready(fn())
  return time.perf_counter() - start, out


METHODS = {
    "default": {},
    "previous": previous_default,
    "one_start": {"num_inits": 1},
    "annealed": {"solver": "annealed"},
    "ott": {"solver": "ott"},
    "learned": {"learn_weights": True},
}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
  parser.add_argument("--families", default=",".join(FAMILIES))
  parser.add_argument("--classes", type=int, default=3, help="classes (seeds) per family")
  parser.add_argument("--ott_classes", type=int, default=1,
                      help="classes per family also solved by OTT's FreeWassersteinBarycenter")
  parser.add_argument("--repeats", type=int, default=3,
                      help="calls per method and class; the best counts (OTT: one call)")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--out", default=None)
  parser.add_argument("--study", choices=("anneal", "robustness", "features"), default=None,
                      help="run the annealing-schedule, robustness or real-features study "
                           "instead (docstring)")
  parser.add_argument("--unequal", type=int, default=45,
                      help="unequal-cluster clouds of --study robustness")
  parser.add_argument("--keys", type=int, default=None,
                      help="keys per cloud of --study robustness (default 2), per class of "
                           "--study features (default 3)")
  parser.add_argument("--clouds", type=int, default=15, help="stress clouds of --study anneal")
  parser.add_argument("--small", type=int, default=8, help="small clouds of --study anneal")
  parser.add_argument("--features", default=None,
                      help="--study features: f32[N, d] .npy (a pipeline workdir's features.npy)")
  parser.add_argument("--labels", default=None,
                      help="--study features: int[N] labels, path.npy or path.npz:key")
  parser.add_argument("--ks", default="10,20", help="--study features: support sizes")
  parser.add_argument("--feature_classes", type=int, default=10,
                      help="--study features: the first this many classes")
  args = parser.parse_args()
  if args.keys is None:
    args.keys = 3 if args.study == "features" else 2
  if args.study == "features":
    if not (args.features and args.labels):
      parser.error("--study features needs --features F.npy and --labels L.npy|L.npz:key")
    features_study(args)
    return
  if args.study == "anneal":
    anneal_study(args)
    return
  if args.study == "robustness":
    robustness_study(args)
    return
  args.out = args.out or os.path.join(RESULTS_DIR, "barycenter.json")
  load_before = os.getloadavg()
  families = [f for f in args.families.split(",") if f]

  rows, compiled = [], set()
  for fi, family in enumerate(families):
    rng = np.random.default_rng([args.seed, fi])
    for c in range(args.classes):
      points, k = family_class(family, rng, c)
      n, d = points.shape
      pts64 = points.astype(np.float64)
      key = jax.random.fold_in(jax.random.key(args.seed), 1000 * fi + c)
      init = np.random.default_rng([args.seed, fi, c]).normal(0.0, 1.0, (k, d))
      def pot():
        return ot.lp.free_support_barycenter([pts64], [np.full(n, 1.0 / n)], init)  # noqa: B023

      def pot_one_thread():
        with threadpool_limits(1):
          return pot()

      runs = {"pot": pot, "pot_1thread": pot_one_thread}
      for name, opts in METHODS.items():
        if name == "ott" and c >= args.ott_classes:
          continue
        opts = opts(k) if callable(opts) else opts
        fn = lambda opts=opts: free_support_barycenter(points, k, key, **opts)  # noqa: B023,E731
        if (name, n, d, k) not in compiled:  # warm-up: compile this shape
          compiled.add((name, n, d, k))
          jax.block_until_ready(fn())
        runs[name] = fn
      times = {name: [] for name in runs}
      outs = {}
      for r in range(args.repeats):
        for name, fn in runs.items():
          if name == "ott" and r > 0:
            continue
          t, outs[name] = timed(fn)
          times[name].append(t)
      row = {"family": family, "class": c, "n": n, "d": d, "k": k}
      # The reference is POT's best run, with the BLAS's default threads or one.
      row["pot_default_threads_s"] = min(times["pot"])
      row["pot_1thread_s"] = min(times["pot_1thread"])
      row["pot_s"] = min(row["pot_default_threads_s"], row["pot_1thread_s"])
      row["pot_w2"] = exact_w2(outs["pot"], np.full(k, 1.0 / k), pts64)
      for name in runs:
        if name.startswith("pot"):
          continue
        out = outs[name]
        row[f"{name}_s"] = min(times[name])
        row[f"{name}_w2"] = exact_w2(out.support, out.weights, pts64)
        row[f"{name}_w2_ratio"] = row[f"{name}_w2"] / row["pot_w2"]
        row[f"{name}_speedup"] = row["pot_s"] / row[f"{name}_s"]
      rows.append(row)
      print(f"{family} class {c} (n={n} d={d} k={k}): POT {row['pot_s']:.2f}s | " + " | ".join(
          f"{m} {row[f'{m}_s']:.3f}s x{row[f'{m}_speedup']:.1f} W2/POT {row[f'{m}_w2_ratio']:.4f}"
          for m in METHODS if f"{m}_s" in row), flush=True)

  summary = {}
  for family in families:
    fam = [r for r in rows if r["family"] == family]
    entry = {"pot_s_median": float(np.median([r["pot_s"] for r in fam])),
             "pot_default_threads_s_median": float(np.median(
                 [r["pot_default_threads_s"] for r in fam]))}
    for m in METHODS:
      have = [r for r in fam if f"{m}_s" in r]
      if not have:
        continue
      entry[m] = {
          "s_median": float(np.median([r[f"{m}_s"] for r in have])),
          "speedup_median": float(np.median([r[f"{m}_speedup"] for r in have])),
          "w2_ratio_median": float(np.median([r[f"{m}_w2_ratio"] for r in have])),
          "w2_ratio_max": float(max(r[f"{m}_w2_ratio"] for r in have)),
          "classes": len(have),
      }
    summary[family] = entry
  overall = {
      m: {"speedup_median_of_families": float(np.median(
              [summary[f][m]["speedup_median"] for f in families if m in summary[f]])),
          "w2_ratio_max": float(max(summary[f][m]["w2_ratio_max"]
                                    for f in families if m in summary[f]))}
      for m in METHODS if any(m in summary[f] for f in families)  # --ott_classes 0: no ott
  }
  result = {
      "benchmark": "barycenter",
      "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
      "config": {
          "families": families, "classes": args.classes, "ott_classes": args.ott_classes,
          "repeats": args.repeats, "seed": args.seed,
          "pot": "ot.lp.free_support_barycenter, random normal init, numItermax=100; its time "
                 "is the best of its runs with the BLAS's default threads and with one "
                 "(threadpoolctl): under load its BLAS threads contend",
          "default": "wmdd_jax.barycenter defaults: semi-dual solver; starts on a 512-point "
                     "subsample weighted by its Voronoi cells (subsample_mass 'voronoi'; half "
                     "Gaussian seeds, one OTT-JAX Sinkhorn-annealed, the rest OTT-JAX k-means), "
                     "5 polish iterations each at start_epsilon 0.03, the best 3 by subsample "
                     "cost (rank_on_all) ranked by one polish iteration on all points "
                     "(epsilon 0.01 on all points); min(8, 100 // k) starts up to k=30, else 1; "
                     "stop_fraction 5e-3 (float32, jitted)",
          "previous": "the previous default: uniform subsample masses, min(8, max(1, 60 // k)) "
                      "starts (half OTT-JAX k-means, half Gaussian), no annealed start",
          "one_start": "num_inits=1 (one OTT-JAX k-means start on the subsample)",
          "annealed": "solver='annealed': one k-means++ start, OTT-JAX Sinkhorn annealing at "
                      "2/0.6/0.2/0.06/0.02 of the mean cost, then the Laguerre polish",
          "timing": "per class, one class per call as class_barycenters runs on CPU (dispatch and "
                    "input checks included), after compilation, best of repeats; methods "
                    "interleaved within each class",
          "learned": "learn_weights=True: OTT-JAX k_means, 4 runs, mass-weighted k-means++",
          "ott": "solver='ott': OTT-JAX FreeWassersteinBarycenter, Sinkhorn, one start",
          "w2": "ot.emd2 (exact, float64) against the uniform measure on the class's points",
      },
      "summary": summary,
      "overall": overall,
      "per_class": rows,
      "machine": machine(
          pot=ot.__version__, load_average_before=load_before, load_average_after=os.getloadavg(),
          note="shared machine: methods alternate per class; best of repeats"),
  }
  write_result(args.out, result)

  print()
  print(f"{'family':14s} {'method':16s} {'s/class':>8s} {'speedup':>8s} {'W2/POT med':>10s} "
        f"{'max':>7s}")
  for family in families:
    print(f"{family:14s} {'POT':16s} {summary[family]['pot_s_median']:8.3f}")
    for m in METHODS:
      if m in summary[family]:
        e = summary[family][m]
        print(f"{'':14s} {m:16s} {e['s_median']:8.3f} {e['speedup_median']:8.1f} "
              f"{e['w2_ratio_median']:10.4f} {e['w2_ratio_max']:7.4f}")
  print(f"load {load_before[0]:.1f} -> {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
  main()
