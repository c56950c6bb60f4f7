"""Benchmark: what deterministic work units cost in teacher training (units=N vs units=0).

    .venv/bin/python -m bench.units                          # ConvNet-D3, 32 px, all devices
    .venv/bin/python -m bench.units --model=resnet18 --batch=256 --units 0 8
    XLA_FLAGS=--xla_force_host_platform_device_count=4 .venv/bin/python -m bench.units \\
        --out=bench/results/units_cpu4_simulated.json   # simulated devices share the CPU
    .venv/bin/python -m bench.units --steps=2 --epochs=2 --batch=16 --out=/tmp/u.json  # smoke

Trains a teacher with :func:`wmdd_jax.teacher.train_teacher` on random images (no dataset needed)
for a few short epochs per setting and reports the median training images/s of the epochs after
the first (which includes compilation), the first epoch's seconds (compilation: units compile
once per device), and the ratio to ``units=0`` (XLA's sharded step). Writes
``bench/results/units.json`` with the machine. On one device the units run one after another, so
the ratio is the price of smaller batches, the ordered sum and per-unit BN; on several
accelerators it also includes copying the gradients to the first device every step. Simulated CPU
devices share the same cores, so a run under ``--xla_force_host_platform_device_count`` is a
functional check, not a speed-up. The figures are in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time

import numpy as np

from bench.common import RESULTS_DIR


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--model", default="convnet_d3", help="a wmdd_jax model name")
  parser.add_argument("--size", type=int, default=32, help="image side (px)")
  parser.add_argument("--batch", type=int, default=128)
  parser.add_argument("--steps", type=int, default=10, help="steps per epoch")
  parser.add_argument("--epochs", type=int, default=4, help="epochs per setting (>= 2)")
  parser.add_argument("--units", type=int, nargs="+", default=[0, 4])
  parser.add_argument("--out", default=os.path.join(RESULTS_DIR, "units.json"))
  args = parser.parse_args()

  import jax

  from bench.common import write_result
  from wmdd_jax.distributed import ExecutionOptions, make_execution
  from wmdd_jax.models import get_model
  from wmdd_jax.teacher import TeacherOptions, train_teacher

  rng = np.random.default_rng(0)
  n = args.batch * args.steps
  images = rng.integers(0, 256, (n, args.size, args.size, 3), dtype=np.uint8)
  labels = rng.integers(0, 10, n).astype(np.int32)
  options = {"stem": "cifar"} if args.model.startswith("resnet") else {}
  model = get_model(args.model, 10, **options)
  config = TeacherOptions(epochs=max(2, args.epochs), batch_size=args.batch, learning_rate=0.05,
                         crop_padding=4, flip=True)
  rows = []
  for units in args.units:
    with tempfile.TemporaryDirectory() as tmp:
      path = os.path.join(tmp, "metrics.jsonl")
      t0 = time.perf_counter()
      train_teacher(model, (images, labels), None, config, mean=(0.5,) * 3, std=(0.25,) * 3,
                    metrics_path=path, progress=False,
                    execution=make_execution(ExecutionOptions(mesh="on", units=units)))
      wall = time.perf_counter() - t0
      with open(path) as f:
        epochs = [json.loads(line) for line in f]
    rate = statistics.median(e["images_per_s"] for e in epochs[1:])
    rows.append({"units": units, "images_per_s_median": rate,
                 "images_per_s": [e["images_per_s"] for e in epochs[1:]],
                 "first_epoch_seconds": epochs[0]["train_seconds"], "wall_seconds": wall})
    print(f"units={units}: {rate:.0f} images/s (median of {len(epochs) - 1} epochs), first "
          f"epoch {epochs[0]['train_seconds']:.1f} s", flush=True)
  base = next((r for r in rows if r["units"] == 0), None)
  if base is not None:
    for r in rows:
      r["throughput_vs_units0"] = r["images_per_s_median"] / base["images_per_s_median"]
  write_result(args.out, {
      "benchmark": "teacher training throughput with deterministic work units",
      "model": args.model, "image_size": args.size, "batch": args.batch,
      "steps_per_epoch": args.steps, "epochs": config.epochs,
      "devices": jax.device_count(), "rows": rows})


if __name__ == "__main__":
  main()
