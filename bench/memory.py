"""Benchmark: device memory per device at ImageNet-1K shapes, from the compiled programs.

    .venv/bin/python -m bench.memory                   # 1 and 8 simulated CPU devices
    .venv/bin/python -m bench.memory --devices 1 4     # other mesh sizes
    python -m bench.memory                             # on a GPU host: its real devices
    .venv/bin/python -m bench.memory --devices 2 --ipc 1 --bary-chunks 2 --recover-chunks 2 \\
        --budget-gib 0 --out /tmp/m.json               # smoke

Nothing is allocated and no data or weights are needed: every program is lowered ahead of time
on ``jax.ShapeDtypeStruct`` inputs (with the shardings the library uses) and sized by XLA's
memory analysis, per device: arguments + outputs + temporaries - donated (aliased) bytes
(:func:`wmdd_jax.distributed.memory.peak_bytes`). Shapes: ImageNet-1K, C = 1000, 224 x 224 x 3,
ResNet-18 with the ImageNet stem (d = 512).

* statistics: one step of the streamed pass, a global batch of 256 uint8 images split over the
  devices, the per-class accumulator replicated;
* barycenter: the per-class solver vmapped over a chunk of classes split over the devices,
  1300 points per class (padded to 1408), d = 512, k = IPC;
* recover: one Adam step on a chunk of classes split over the devices (IPC 10 and 50), and the
  chunk :func:`wmdd_jax.recover.choose_class_chunk` picks for a per-device budget.

On CPU the devices are simulated (``--xla_force_host_platform_device_count``) in a subprocess
per mesh size, and the figures are the CPU compiler's buffer assignment: a GPU's differ somewhat
(other fusions, convolution workspaces), so rerun there for exact numbers; the scaling with the
device count is the point. Writes ``bench/results/memory.json`` (``memory_<backend>.json`` off
CPU) and prints a Markdown table; the figures are in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

from bench.common import RESULTS_DIR, ROOT

C, SHAPE, MEAN, STD = 1000, (224, 224, 3), (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
STATS_BATCH = 256
POINTS_PER_CLASS = 1300
MIB = 2**20


def _programs(devices: int, budget_gib: float, bary_chunks, recover_chunks, ipcs) -> list[dict]:
  """All rows for one mesh size (runs in the process that has ``devices`` devices)."""
  import jax
  import jax.numpy as jnp

  from wmdd_jax import barycenter, statistics
  from wmdd_jax import recover as recover_lib
  from wmdd_jax.distributed import from_mesh, memory, sharding
  from wmdd_jax.models import apply_model, get_model

  assert jax.device_count() >= devices, (jax.device_count(), devices)
  mesh = None if devices == 1 else sharding.make_mesh(jax.devices()[:devices])
  execution = from_mesh(mesh)
  rep = None if mesh is None else sharding.replicated(mesh)
  split = None if mesh is None else sharding.batch_sharding(mesh)
  model = get_model("resnet18", C, stem="imagenet")
  x1 = jax.ShapeDtypeStruct((1, *SHAPE), jnp.float32)
  variables = jax.eval_shape(
      lambda k, x: model.init(k, x, train=False, mutable=["params", "batch_stats"]),
      jax.random.key(0), x1)
  variables = {k: variables[k] for k in ("params", "batch_stats")}
  out = jax.eval_shape(lambda v, x: apply_model(model, v, x), variables, x1)
  d = out.features.shape[-1]
  channels = [m.shape[-1] for m in out.bn_mean]
  rows = []

  def record(stage, shape, compiled, seconds, held_bytes=0, **extra):
    mem = compiled.memory_analysis()
    row = {"stage": stage, "devices": devices, "shape": shape,
           "peak_mib": (memory.peak_bytes(compiled) + held_bytes) / MIB,
           "argument_mib": mem.argument_size_in_bytes / MIB,
           "output_mib": mem.output_size_in_bytes / MIB,
           "temp_mib": mem.temp_size_in_bytes / MIB,
           "alias_mib": mem.alias_size_in_bytes / MIB,
           "compile_s": round(seconds, 1), **extra}
    rows.append(row)
    print(json.dumps(row), file=sys.stderr, flush=True)

  # Statistics: the accumulator replicated, the batch split.
  step = statistics.make_stats_step(model, C, MEAN, STD, execution=execution)
  f32 = lambda *s, sharding=None: jax.ShapeDtypeStruct(s, jnp.float32, sharding=sharding)
  acc = {"count": f32(C, sharding=rep), "mean": [f32(C, ch, sharding=rep) for ch in channels],
         "m2": [f32(C, ch, sharding=rep) for ch in channels]}
  batch = (jax.ShapeDtypeStruct((STATS_BATCH, *SHAPE), jnp.uint8, sharding=split),
           jax.ShapeDtypeStruct((STATS_BATCH,), jnp.int32, sharding=split),
           f32(STATS_BATCH, sharding=split))
  t0 = time.perf_counter()
  # The forward program dominates (the accumulation holds only C x channels floats and the
  # gathered per-sample moments); the accumulator is counted on top of its peak.
  compiled = step.forward.lower(memory.abstract(variables, lambda _: rep), *batch).compile()
  acc_bytes = sum(x.size * 4 for x in jax.tree.leaves(acc))
  accumulate = step.accumulate.lower(acc, *compiled.out_info[:3]).compile()
  record("statistics", f"batch {STATS_BATCH} u8 224px, {C} classes, {len(channels)} BN layers",
         compiled, time.perf_counter() - t0, held_bytes=acc_bytes, batch=STATS_BATCH,
         accumulate_peak_mib=memory.peak_bytes(accumulate) / MIB)

  # Barycenters: the class axis split.
  n = barycenter._padded_size(POINTS_PER_CLASS)  # noqa: SLF001 - the solver's own padding
  for ipc in ipcs:
    solve = execution.class_program(barycenter.class_solver(ipc), 3)
    for chunk in bary_chunks:
      chunk = sharding.padded_size(chunk, devices)
      key = jax.eval_shape(lambda c=chunk: jax.random.split(jax.random.key(0), c))
      args = (f32(chunk, n, d, sharding=split), f32(chunk, n, sharding=split),
              jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=split))
      t0 = time.perf_counter()
      compiled = solve.lower(*args).compile()
      record("barycenter", f"{chunk} classes x {POINTS_PER_CLASS} pts, d={d}, k={ipc}", compiled,
             time.perf_counter() - t0, ipc=ipc, chunk_classes=chunk)

  # Recover: one step per chunk size, then the budgeted choice.
  targets = recover_lib.RecoverTargets(
      f32(C, 1, d), tuple(f32(C, ch) for ch in channels), tuple(f32(C, ch) for ch in channels),
      tuple(f32(ch) for ch in channels), tuple(f32(ch) for ch in channels))
  options = recover_lib.RecoverOptions(r_bn=500.0)
  for ipc in ipcs:
    targets_k = targets._replace(features=f32(C, ipc, d))
    run = recover_lib.make_update_fn(model, options, MEAN, STD, execution=execution)
    for chunk in recover_chunks:
      chunk = sharding.padded_size(chunk, devices)
      t0 = time.perf_counter()
      lowered = recover_lib.lower_recover_step(
          model, variables, targets_k, chunk, ipc=ipc, image_shape=SHAPE, mean=MEAN, std=STD,
          options=options, execution=execution, step=run.step)
      record("recover", f"{chunk} classes x IPC {ipc}, 224px", lowered.compile(),
             time.perf_counter() - t0, ipc=ipc, chunk_classes=chunk,
             images_per_device=chunk * ipc // devices)
    if budget_gib:
      t0 = time.perf_counter()
      chosen = recover_lib.choose_class_chunk(
          model, variables, targets_k, ipc=ipc, image_shape=SHAPE, mean=MEAN, std=STD,
          options=options, memory_budget_bytes=int(budget_gib * 2**30), execution=execution,
          step=run.step)
      peak = recover_lib.recover_step_bytes(model, variables, targets_k, chosen, ipc=ipc,
                                            image_shape=SHAPE, mean=MEAN, std=STD,
                                            options=options, execution=execution,
                                            step=run.step)
      row = {"stage": "recover (chosen chunk)", "devices": devices,
             "shape": f"budget {budget_gib:g} GiB/device, IPC {ipc}", "ipc": ipc,
             "chunk_classes": chosen, "peak_mib": peak / MIB,
             "compile_s": round(time.perf_counter() - t0, 1)}
      rows.append(row)
      print(json.dumps(row), file=sys.stderr, flush=True)
  return rows


def _child(args) -> None:
  rows = _programs(args.child, args.budget_gib, args.bary_chunks, args.recover_chunks, args.ipc)
  print("ROWS " + json.dumps(rows), flush=True)


def _table(rows: list[dict]) -> str:
  """Markdown: one line per program and mesh size (MiB per device)."""
  lines = ["| stage | shape | devices | classes / chunk | peak MiB / device | arguments | "
           "temporaries |", "|---|---|---:|---:|---:|---:|---:|"]
  fmt = lambda r, k: f"{r[k]:,.0f}" if k in r else "-"
  for r in rows:
    lines.append(f"| {r['stage']} | {r['shape']} | {r['devices']} | "
                 f"{r.get('chunk_classes', '-')} | {fmt(r, 'peak_mib')} | "
                 f"{fmt(r, 'argument_mib')} | {fmt(r, 'temp_mib')} |")
  return "\n".join(lines)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--devices", type=int, nargs="+", default=[1, 8])
  parser.add_argument("--ipc", type=int, nargs="+", default=[10, 50])
  parser.add_argument("--bary-chunks", type=int, nargs="+", default=[64, 1000])
  parser.add_argument("--recover-chunks", type=int, nargs="+", default=[8, 64])
  parser.add_argument("--budget-gib", type=float, default=64.0,
                      help="per-device budget for the chosen recover chunk (0: skip); 64 GiB "
                      "leaves headroom on an 80 GB H100")
  parser.add_argument("--child", type=int, default=0, help=argparse.SUPPRESS)
  parser.add_argument("--out", default="")
  args = parser.parse_args()
  if args.child:
    _child(args)
    return

  import jax

  from bench.common import machine, write_result

  backend = jax.default_backend()
  rows = []
  for devices in args.devices:
    print(f"--- {devices} device(s)", flush=True)
    if backend == "cpu":
      # A fresh process per mesh size: the simulated device count is fixed at start-up.
      env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
      cmd = [sys.executable, "-m", "bench.memory", "--child", str(devices),
             "--budget-gib", str(args.budget_gib), "--ipc", *map(str, args.ipc),
             "--bary-chunks", *map(str, args.bary_chunks),
             "--recover-chunks", *map(str, args.recover_chunks)]
      proc = subprocess.run(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, text=True)
      if proc.returncode:
        raise SystemExit(f"the {devices}-device run failed (rc {proc.returncode})")
      line = [x for x in proc.stdout.splitlines() if x.startswith("ROWS ")][-1]
      rows += json.loads(line[len("ROWS "):])
    else:
      rows += _programs(devices, args.budget_gib, args.bary_chunks, args.recover_chunks,
                        args.ipc)
  info = machine()
  if backend == "cpu":
    info["simulated_devices"] = args.devices
  result = {
      "benchmark": "peak device memory per device, ImageNet-1K shapes (C=1000, 224x224x3, "
                   "ResNet-18 imagenet stem), from compiled memory_analysis",
      "note": "CPU compiler's buffer assignment on simulated devices; GPU figures differ "
              "somewhat" if backend == "cpu" else "",
      "rows": rows,
      "machine": info,
  }
  name = "memory.json" if backend == "cpu" else f"memory_{backend}.json"
  write_result(args.out or os.path.join(RESULTS_DIR, name), result)
  print(_table(rows))


if __name__ == "__main__":
  main()
