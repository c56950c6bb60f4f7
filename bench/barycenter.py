"""Benchmark: per-class free-support W2 barycenters, wmdd_jax (JAX, CPU) against POT's exact LP.

The setting of the paper's CIFAR-10-sized step: 10 classes of n=5000 features, d=512 (ResNet-18
penultimate width), k=50 support points (IPC 50). The features are synthetic but shaped like
post-ReLU pooled features: per class a mean, 10 sub-clusters of uneven sizes, Gaussian noise,
then ReLU. Every W2^2 is measured exactly by POT's ``ot.emd2`` between (support, weights) and the
uniform measure on the class's points.

POT runs as the official WMDD code calls it: ``ot.lp.free_support_barycenter`` from a random
normal init (seeded per class), at most 100 iterations. Ours runs with default options, timed
after compilation (compile time reported apart), once per class (``free_support_barycenter``)
for all classes in one vmapped call (``class_barycenters(..., classes_per_batch=C)``) and
through ``class_barycenters``' CPU default (one class at a time in the unbatched program). POT
and ours alternate class by class and each time is the best of ``--repeats`` runs, because this
machine is shared and its load varies; the load average is recorded with the results.

    .venv/bin/python -m bench.barycenter                                         # the setting above
    .venv/bin/python -m bench.barycenter --classes 2 --n 500 --repeats 1 --out /tmp/b.json  # smoke

Writes bench/results/barycenter.json and prints a table; the figures are in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import ot

from bench.common import RESULTS_DIR, machine, write_result
from wmdd_jax.barycenter import class_barycenters, free_support_barycenter


def class_features(rng: np.random.Generator, n: int, d: int, clusters: int = 10) -> np.ndarray:
  """f32[n, d] clustered, non-negative features of one class."""
  mean = rng.normal(0.0, 1.0, d)
  centers = mean + 0.6 * rng.normal(0.0, 1.0, (clusters, d))
  sizes = rng.dirichlet(np.full(clusters, 2.0))
  which = rng.choice(clusters, n, p=sizes)
  return np.maximum(centers[which] + 0.8 * rng.normal(0.0, 1.0, (n, d)), 0.0).astype(np.float32)


def exact_w2(support, weights, points) -> float:
  points = np.asarray(points, np.float64)
  weights = np.asarray(weights, np.float64)
  uniform = np.full(len(points), 1.0 / len(points))
  cost = ot.dist(np.asarray(support, np.float64), points)
  return float(ot.emd2(weights / weights.sum(), uniform, cost, numItermax=1_000_000))


def best_time(fn, repeats: int) -> tuple[float, object]:
  times, out = [], None
  for _ in range(repeats):
    start = time.perf_counter()
    out = jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return min(times), out


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
  parser.add_argument("--classes", type=int, default=10)
  parser.add_argument("--n", type=int, default=5000)
  parser.add_argument("--d", type=int, default=512)
  parser.add_argument("--k", type=int, default=50)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--out", default=os.path.join(RESULTS_DIR, "barycenter.json"))
  args = parser.parse_args()
  c_num, n, d, k = args.classes, args.n, args.d, args.k
  load_before = os.getloadavg()

  rng = np.random.default_rng(args.seed)
  feats = [class_features(rng, n, d) for _ in range(c_num)]
  key = jax.random.key(args.seed)
  keys = [jax.random.fold_in(key, c) for c in range(c_num)]
  uniform_n = np.full(n, 1.0 / n)

  # Compile (first call) and steady time of one per-class call; the same shapes serve every class.
  points0 = jnp.asarray(feats[0])
  start = time.perf_counter()
  jax.block_until_ready(free_support_barycenter(points0, k, keys[0]))
  first_call = time.perf_counter() - start
  steady, _ = best_time(lambda: free_support_barycenter(points0, k, keys[0]), 3)
  compile_per_class = first_call - steady
  start = time.perf_counter()
  jax.block_until_ready(free_support_barycenter(points0, k, keys[0], learn_weights=True))
  compile_learned = time.perf_counter() - start

  rows = []
  for c in range(c_num):
    points = jnp.asarray(feats[c])
    pts64 = feats[c].astype(np.float64)
    init = np.random.default_rng(1000 + c).normal(0.0, 1.0, (k, d))
    runs = {
        "pot": lambda: ot.lp.free_support_barycenter([pts64], [uniform_n], init),  # noqa: B023
        "ours": lambda: free_support_barycenter(points, k, keys[c]),  # noqa: B023
        "learned": lambda: free_support_barycenter(  # noqa: B023
            points, k, keys[c], learn_weights=True  # noqa: B023
        ),
    }
    # Alternate the methods within each repeat so that load changes hit them alike.
    times = {name: [] for name in runs}
    outs = {}
    for _ in range(args.repeats):
      for name, fn in runs.items():
        t, outs[name] = best_time(fn, 1)
        times[name].append(t)
    pot_s, ours_s, learned_s = (min(times[name]) for name in ("pot", "ours", "learned"))
    pot_support, ours, learned = outs["pot"], outs["ours"], outs["learned"]
    row = {
        "class": c,
        "pot_s": pot_s,
        "ours_s": ours_s,
        "ours_learned_s": learned_s,
        "pot_w2": exact_w2(pot_support, np.full(k, 1.0 / k), pts64),
        "ours_w2": exact_w2(ours.support, ours.weights, pts64),
        "ours_learned_w2": exact_w2(learned.support, learned.weights, pts64),
    }
    row["speedup"] = row["pot_s"] / row["ours_s"]
    row["w2_ratio"] = row["ours_w2"] / row["pot_w2"]
    rows.append(row)
    print(
        f"class {c}: POT {pot_s:.3f}s W2^2 {row['pot_w2']:.3f} | ours {ours_s * 1e3:.0f}ms "
        f"W2^2 {row['ours_w2']:.3f} (x{row['speedup']:.1f}, ratio {row['w2_ratio']:.4f}) | "
        f"learned {learned_s * 1e3:.0f}ms W2^2 {row['ours_learned_w2']:.3f}",
        flush=True,
    )

  # All classes in one vmapped call, and class_barycenters' CPU default (one class at a time).
  all_feats = np.concatenate(feats)
  labels = np.repeat(np.arange(c_num), n)
  start = time.perf_counter()
  jax.block_until_ready(
      class_barycenters(all_feats, labels, c_num, k, key, classes_per_batch=c_num)
  )
  vmap_first = time.perf_counter() - start
  vmap_s, vmapped = best_time(
      lambda: class_barycenters(all_feats, labels, c_num, k, key, classes_per_batch=c_num),
      args.repeats,
  )
  default_s, _ = best_time(
      lambda: class_barycenters(all_feats, labels, c_num, k, key), args.repeats
  )
  vmap_w2 = [
      exact_w2(vmapped.support[c], vmapped.weights[c], feats[c].astype(np.float64))
      for c in range(c_num)
  ]
  for row, w2 in zip(rows, vmap_w2):
    row["vmapped_w2"] = w2

  pot_med = float(np.median([r["pot_s"] for r in rows]))
  ours_med = float(np.median([r["ours_s"] for r in rows]))
  summary = {
      "pot_s_per_class_median": pot_med,
      "ours_s_per_class_median": ours_med,
      "ours_compile_s": compile_per_class,
      "ours_learned_s_per_class_median": float(np.median([r["ours_learned_s"] for r in rows])),
      "ours_learned_first_call_s": compile_learned,
      "ours_vmapped_s_per_class": vmap_s / c_num,
      "ours_vmapped_s_total": vmap_s,
      "ours_vmapped_compile_s": vmap_first - vmap_s,
      "ours_class_barycenters_default_s_per_class": default_s / c_num,
      "speedup_median_of_classes": float(np.median([r["speedup"] for r in rows])),
      "speedup_min": float(min(r["speedup"] for r in rows)),
      "speedup_vmapped": pot_med / (vmap_s / c_num),
      "w2_ratio_mean": float(np.mean([r["w2_ratio"] for r in rows])),
      "w2_ratio_max": float(max(r["w2_ratio"] for r in rows)),
      "vmapped_w2_ratio_max": float(max(r["vmapped_w2"] / r["pot_w2"] for r in rows)),
      "learned_over_uniform_w2_mean": float(
          np.mean([r["ours_learned_w2"] / r["ours_w2"] for r in rows])
      ),
  }
  result = {
      "benchmark": "barycenter",
      "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
      "config": {
          "classes": c_num, "n": n, "d": d, "k": k, "repeats": args.repeats, "seed": args.seed,
          "data": "synthetic clustered post-ReLU features (10 sub-clusters per class)",
          "pot": "ot.lp.free_support_barycenter, random normal init, numItermax=100",
          "ours": "wmdd_jax.barycenter defaults (float32, jitted; times after compilation)",
          "w2": "ot.emd2 (exact, float64) against the uniform measure on the class's points",
      },
      "summary": summary,
      "per_class": rows,
      "machine": machine(
          pot=ot.__version__, load_average_before=load_before,
          note="shared machine: POT and ours alternate per class; best of repeats"),
  }
  write_result(args.out, result)
  info = result["machine"]

  print()
  print(f"n={n} d={d} k={k}, {c_num} classes, {info['cpu_model']} x{info['cpu_count']}")
  print(f"{'method':40s} {'s/class':>9s} {'speedup':>8s} {'W2^2/POT':>9s}")
  print(f"{'POT exact LP (random normal init)':40s} {pot_med:9.3f} {1.0:8.1f} {1.0:9.4f}")
  print(
      f"{'ours, per class':40s} {ours_med:9.3f} {summary['speedup_median_of_classes']:8.1f} "
      f"{summary['w2_ratio_mean']:9.4f}"
  )
  print(
      f"{'ours, vmapped over classes':40s} {vmap_s / c_num:9.3f} "
      f"{summary['speedup_vmapped']:8.1f} "
      f"{np.mean([r['vmapped_w2'] / r['pot_w2'] for r in rows]):9.4f}"
  )
  print(
      f"{'ours, class_barycenters (CPU default)':40s} {default_s / c_num:9.3f} "
      f"{pot_med / (default_s / c_num):8.1f} {summary['w2_ratio_mean']:9.4f}"
  )
  print(
      f"{'ours, learned weights (k-means)':40s} {summary['ours_learned_s_per_class_median']:9.3f} "
      f"{pot_med / summary['ours_learned_s_per_class_median']:8.1f} "
      f"{np.mean([r['ours_learned_w2'] / r['pot_w2'] for r in rows]):9.4f}"
  )
  print(
      f"compile: per-class {compile_per_class:.2f}s, vmapped {vmap_first - vmap_s:.2f}s; "
      f"W2^2 ratio max {summary['w2_ratio_max']:.4f}; load {load_before[0]:.1f} -> "
      f"{os.getloadavg()[0]:.1f}"
  )


if __name__ == "__main__":
  main()
