"""Benchmark: WMDD vs SRe2L vs random real images on Fashion-MNIST, one protocol, one teacher.

    .venv/bin/python -m bench.fashion_mnist                                   # everything
    .venv/bin/python -m bench.fashion_mnist --ipcs 10 --methods wmdd,random    # a subset
    .venv/bin/python -m bench.fashion_mnist --val                              # tuning runs

Config: experiments/configs/fashion_mnist.py (ConvNet-D3 teacher and student). One teacher is
trained (seed 0) and shared by every run; each (method, IPC, seed) is a full ``pipeline.run`` in
``<workroot>/s<seed>/<method>_ipc<k>``, so an interrupted benchmark resumes where it stopped.
``--val`` holds out 10% of the train split (stratified, seeded) and reports accuracy on it
instead of the test split: tune there, never on test. Results (per run, and mean +- std over
seeds) go to bench/results/fashion_mnist.json after every run.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import time

from bench.common import machine, peak_rss_mib, write_result
from wmdd_jax import pipeline

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_config(path):
  spec = importlib.util.spec_from_file_location("bench_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def summarize(runs):
  groups = {}
  for r in runs:
    groups.setdefault((r["method"], r["ipc"]), []).append(r["test_top1"])
  rows = []
  for (method, ipc), accs in sorted(groups.items(), key=lambda x: (x[0][1], x[0][0])):
    rows.append({"method": method, "ipc": ipc, "seeds": len(accs),
                 "top1_mean": statistics.mean(accs),
                 "top1_std": statistics.stdev(accs) if len(accs) > 1 else 0.0})
  return rows


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--config", default=os.path.join(ROOT, "experiments", "configs",
                                                       "fashion_mnist.py"))
  parser.add_argument("--spec", default="", help="dataset spec (default: the config's)")
  parser.add_argument("--ipcs", default="1,10,50")
  parser.add_argument("--methods", default="wmdd,sre2l,random")
  parser.add_argument("--seeds", default="0")
  parser.add_argument("--val", action="store_true", help="evaluate on a held-out train part")
  parser.add_argument("--set", action="append", default=[],
                      help="config override, e.g. --set recover.r_bn=3 (repeatable)")
  parser.add_argument("--teacher", default="",
                      help="teacher checkpoint to load or create (default: under workroot)")
  parser.add_argument("--workroot", default=os.path.join(ROOT, "bench", "runs", "fashion_mnist"))
  parser.add_argument("--out", default=os.path.join(ROOT, "bench", "results",
                                                    "fashion_mnist.json"))
  args = parser.parse_args()
  base = load_config(args.config)
  if args.spec:
    base.dataset.spec = args.spec
  if args.val:
    # The pipeline evaluates on "test"; with val_fraction the dataset's "val" split is the
    # held-out part, so the test split is swapped for it here.
    base.dataset.options = {**base.dataset.options, "val_fraction": 0.1}
    base.dataset.test_split = "val"
  for item in args.set:
    key, value = item.split("=", 1)
    section, field = key.rsplit(".", 1) if "." in key else ("", key)
    target = base
    for part in filter(None, section.split(".")):
      target = target[part]
    old = target[field]
    target[field] = type(old)(eval(value)) if not isinstance(old, str) else value  # noqa: S307
  tag = "val" if args.val else "test"
  workroot = os.path.join(args.workroot, tag)
  # Trained by the first run, loaded by the rest (and by other sweeps given --teacher).
  teacher = args.teacher or os.path.join(workroot, "teacher")
  runs, start = [], time.perf_counter()
  for seed in [int(s) for s in args.seeds.split(",")]:
    for ipc in [int(i) for i in args.ipcs.split(",")]:
      for method in args.methods.split(","):
        config = base.copy_and_resolve_references()
        config.seed, config.ipc, config.method = seed, ipc, method
        config.teacher.checkpoint = teacher
        workdir = os.path.join(workroot, f"s{seed}", f"{method}_ipc{ipc}")
        t0 = time.perf_counter()
        metrics = pipeline.run(config, workdir)
        metrics["wall_s"] = time.perf_counter() - t0
        metrics["workdir"] = os.path.relpath(workdir, ROOT)
        runs.append(metrics)
        write_result(args.out, {
            "benchmark": "fashion_mnist distillation", "split": tag,
            "command": "python -m bench.fashion_mnist " + " ".join(
                f"--{k}={v}" for k, v in vars(args).items() if k not in ("out", "workroot")),
            "config": base.to_dict(), "summary": summarize(runs), "runs": runs,
            "total_wall_s": time.perf_counter() - start, "peak_rss_mib": peak_rss_mib(),
            "machine": machine()})


if __name__ == "__main__":
  main()
