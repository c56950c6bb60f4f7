"""Benchmark: throughput of the recover step (ResNet-18, cifar stem, 32 px, IPC 10 x 10 classes).

    .venv/bin/python bench/recover.py                    # CPU here: a few minutes
    python bench/recover.py --steps 20 --classes 100     # on a GPU

For each class-chunk size it compiles the jitted recover block (``steps_per_call`` Adam steps in
one ``lax.scan``), then times blocks: images/s = chunk * IPC * steps / seconds (median over
blocks). Peak memory: the compiled program's temp + argument bytes (``memory_analysis``), the
process's peak RSS and, on GPU, the device's peak. Writes ``bench/results/recover.json``
(``recover_<backend>.json`` off CPU).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from bench.common import device_peak_mib, machine, peak_rss_mib, write_result
from wmdd_jax import synthesis
from wmdd_jax.models import apply_model, get_model, init_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def targets_for(model, variables, num_classes, ipc, shape):
  out = jax.eval_shape(lambda v, x: apply_model(model, v, x), variables,
                       jnp.zeros((1, *shape), jnp.float32))
  d = out.features.shape[-1]
  rng = np.random.default_rng(0)
  per_class = lambda ch: np.abs(rng.normal(size=(num_classes, ch))).astype(np.float32)
  return synthesis.RecoverTargets(
      np.abs(rng.normal(size=(num_classes, ipc, d))).astype(np.float32),
      tuple(per_class(m.shape[-1]) for m in out.bn_mean),
      tuple(per_class(m.shape[-1]) + 0.5 for m in out.bn_var),
      tuple(np.zeros(m.shape[-1], np.float32) for m in out.bn_mean),
      tuple(np.ones(m.shape[-1], np.float32) for m in out.bn_var))


def time_chunk(model, variables, targets, chunk, ipc, shape, steps, blocks, scan):
  opts = synthesis.RecoverOptions(iterations=steps * (blocks + 1), steps_per_call=steps,
                                  scan=scan)
  run = synthesis.make_update_fn(model, opts, (0.5,) * shape[-1], (0.25,) * shape[-1])
  # The compiled program (the fused block, or the single step) for compile time and memory.
  program = run if scan else run.step
  ids = np.arange(chunk)
  chunk_targets = jax.tree.map(jnp.asarray, targets.take(ids))
  key = jax.random.key(0)
  state = synthesis.init_state(synthesis.init_images(key, ids, ipc, shape), opts)
  t0 = time.perf_counter()
  extra = {"num_steps": steps} if scan else {}
  lowered = program.lower(state, variables, chunk_targets, jnp.asarray(ids), key, **extra)
  compiled = lowered.compile()
  compile_s = time.perf_counter() - t0
  mem = compiled.memory_analysis()
  program_mib = None
  if mem is not None:
    program_mib = (mem.temp_size_in_bytes + mem.argument_size_in_bytes
                   + mem.output_size_in_bytes - mem.alias_size_in_bytes) / 2**20
  state, _ = run(state, variables, chunk_targets, jnp.asarray(ids), key, num_steps=steps)
  jax.block_until_ready(state.images)  # warm-up block
  times = []
  for _ in range(blocks):
    t0 = time.perf_counter()
    state, m = run(state, variables, chunk_targets, jnp.asarray(ids), key, num_steps=steps)
    jax.block_until_ready(m["loss"])
    times.append(time.perf_counter() - t0)
  med = statistics.median(times)
  return {"chunk_classes": chunk, "scan": scan, "images_per_step": chunk * ipc,
          "median_ms_per_step": 1000 * med / steps,
          "images_per_s": chunk * ipc * steps / med, "compile_s": compile_s,
          "program_mib": program_mib, "blocks": blocks, "steps_per_block": steps}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--classes", type=int, default=10)
  parser.add_argument("--ipc", type=int, default=10)
  parser.add_argument("--chunks", default="10,5,2", help="class-chunk sizes to time")
  parser.add_argument("--steps", type=int, default=2, help="steps per jitted block")
  parser.add_argument("--blocks", type=int, default=3, help="timed blocks per chunk size")
  parser.add_argument("--scan", default="0", help="comma list of 0/1: fuse steps in lax.scan")
  parser.add_argument("--out", default="")
  args = parser.parse_args()
  shape = (32, 32, 3)
  model = get_model("resnet18", args.classes, stem="cifar")
  variables = init_model(model, jax.random.key(0), shape)
  targets = targets_for(model, variables, args.classes, args.ipc, shape)
  rows = []
  for scan in [bool(int(s)) for s in args.scan.split(",")]:
    for chunk in [int(c) for c in args.chunks.split(",")]:
      row = time_chunk(model, variables, targets, min(chunk, args.classes), args.ipc, shape,
                       args.steps, args.blocks, scan)
      print(row, flush=True)
      rows.append(row)
  backend = jax.default_backend()
  out = args.out or os.path.join(ROOT, "bench", "results",
                                 "recover.json" if backend == "cpu" else f"recover_{backend}.json")
  write_result(out, {"benchmark": "recover step, ResNet-18 cifar stem, 32x32x3, eval BN",
                     "classes": args.classes, "ipc": args.ipc, "rows": rows,
                     "peak_rss_mib": peak_rss_mib(), "device_peak_mib": device_peak_mib(),
                     "machine": machine()})


if __name__ == "__main__":
  main()
