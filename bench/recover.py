"""Benchmark: throughput of the recover step (ResNet-18, cifar stem, 32 px, IPC 10 x 10 classes).

    .venv/bin/python -m bench.recover                         # CPU: a few minutes
    .venv/bin/python -m bench.recover --steps 20 --scan 0,1   # on a GPU: also the fused blocks
    .venv/bin/python -m bench.recover --chunks 2 --steps 1 --blocks 1 --out /tmp/r.json  # smoke

For each class-chunk size it compiles the library's recover step
(:func:`wmdd_jax.recover.make_update_fn`: augmentation, the loss, Adam; by default one jitted
step per call, ``--scan 1`` fuses the ``--steps`` steps of a block into one ``lax.scan``), then
times blocks of ``--steps`` steps: images/s = chunk * IPC * steps / seconds (median over
blocks). Peak memory: the compiled program's temp + argument + output bytes
(``memory_analysis``; the single step, or the fused block with ``--scan 1``), the process's peak
RSS and, on GPU, the device's peak. Writes ``bench/results/recover.json``
(``recover_<backend>.json`` off CPU); the figures are in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from bench.common import (
    RESULTS_DIR,
    device_peak_mib,
    peak_rss_mib,
    random_recover_targets,
    write_result,
)
from wmdd_jax import recover as recover_lib
from wmdd_jax.models import get_model, init_model


def time_chunk(model, variables, targets, chunk, ipc, shape, steps, blocks, scan):
  opts = recover_lib.RecoverOptions(iterations=steps * (blocks + 1), steps_per_call=steps,
                                    scan=scan)
  run = recover_lib.make_update_fn(model, opts, (0.5,) * shape[-1], (0.25,) * shape[-1])
  # The compiled program (the fused block, or the single step) for compile time and memory.
  program = run if scan else run.step
  ids = np.arange(chunk)
  chunk_targets = jax.tree.map(jnp.asarray, targets.take(ids))
  key = jax.random.key(0)
  state = recover_lib.init_state(recover_lib.init_images(key, ids, ipc, shape), opts)
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
  parser.add_argument("--scan", default="0",
                      help="comma list of 0/1: 0 one jitted step per call (the default, as in "
                      "RecoverOptions), 1 each block's steps fused in one lax.scan")
  parser.add_argument("--out", default="")
  args = parser.parse_args()
  shape = (32, 32, 3)
  model = get_model("resnet18", args.classes, stem="cifar")
  variables = init_model(model, jax.random.key(0), shape)
  targets = random_recover_targets(model, variables, args.classes, args.ipc, shape)
  rows = []
  for scan in [bool(int(s)) for s in args.scan.split(",")]:
    for chunk in [int(c) for c in args.chunks.split(",")]:
      row = time_chunk(model, variables, targets, min(chunk, args.classes), args.ipc, shape,
                       args.steps, args.blocks, scan)
      print(row, flush=True)
      rows.append(row)
  backend = jax.default_backend()
  out = args.out or os.path.join(
      RESULTS_DIR, "recover.json" if backend == "cpu" else f"recover_{backend}.json")
  write_result(out, {"benchmark": "recover step, ResNet-18 cifar stem, 32x32x3, eval BN",
                     "classes": args.classes, "ipc": args.ipc, "rows": rows,
                     "peak_rss_mib": peak_rss_mib(), "device_peak_mib": device_peak_mib()})


if __name__ == "__main__":
  main()
