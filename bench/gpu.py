"""Benchmark for a lent accelerator: every stage's program at the paper's shapes, in one script.

    .venv/bin/python -m bench.gpu                        # on the accelerator: <= ~8 minutes
    .venv/bin/python -m bench.gpu --budget-s 300         # stop starting new items after 300 s
    .venv/bin/python -m bench.gpu --tiny --out /tmp/g.json   # CPU smoke: tiny shapes, seconds

Items, each the library's own program on random but well-shaped inputs (throughput does not
depend on the values), for ResNet-18 at 224 px (ImageNet stem, 1000 classes) and at 64 px (the
``tiny`` stem, 200 classes, Tiny-ImageNet):

* ``statistics``: one batch of :class:`wmdd_jax.statistics.StatsStep` (eval-mode forward with
  the BN-input moments, then the per-class accumulation), ``--stats-batch`` images;
* ``barycenters``: :func:`wmdd_jax.barycenter.class_barycenters` for ``--bary-classes`` classes
  of ``--bary-points`` features of width 512, IPC 10 and 50 support points;
* ``recover_step``: :func:`wmdd_jax.recover.make_update_fn`'s step under the official objective,
  IPC 10 and 50, with the official chunk of n = min(100 // IPC, C) classes per step (10 and 2
  classes: 100 images either way);
* ``student_step``: :func:`wmdd_jax.evaluate.make_student_step` (views, the teacher's soft
  labels, the student's KD step) on a batch of 100.

For each: compile seconds, the median step over ``--steps`` timed calls after one warm-up,
images/s, the compiled program's memory (XLA's memory analysis: arguments + outputs + temporaries
- aliased) and the device's peak memory so far (GPU/TPU only). Items are run in order until
``--budget-s`` has passed (the rest are listed as skipped), and the results file is rewritten
after every item, so a run cut short still leaves its figures. Writes
``bench/results/gpu.json`` (``--tiny``: a file in the temp directory unless ``--out`` says
otherwise).

``--tiny`` swaps in a small ConvNet at 16 px and 4 classes so the whole script runs on a CPU in
seconds (tests/test_bench_gpu.py); its figures mean nothing.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from bench.common import RESULTS_DIR, device_peak_mib, peak_rss_mib, random_recover_targets
from bench.common import write_result as _write_result

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _settings(tiny: bool) -> list[dict[str, Any]]:
  """The shapes: (label, model, options, classes, image side)."""
  if tiny:
    model = {"name": "convnet", "options": {"depth": 2, "width": 8}}
    return [{"label": "tiny16", "model": model, "classes": 4, "hw": 16, "ipcs": (2,)}]
  return [
      {"label": "224px", "model": {"name": "resnet18", "options": {"stem": "imagenet"}},
       "classes": 1000, "hw": 224, "ipcs": (10, 50)},
      {"label": "64px", "model": {"name": "resnet18", "options": {"stem": "tiny"}},
       "classes": 200, "hw": 64, "ipcs": (10, 50)},
  ]


def _program_mib(compiled) -> float | None:
  mem = compiled.memory_analysis()
  if mem is None:
    return None
  return (mem.temp_size_in_bytes + mem.argument_size_in_bytes + mem.output_size_in_bytes
          - mem.alias_size_in_bytes) / 2**20


def _time(call, steps: int) -> float:
  """Median seconds of ``call()`` (which blocks) over ``steps`` calls after one warm-up."""
  call()
  times = []
  for _ in range(steps):
    t0 = time.perf_counter()
    call()
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def bench_statistics(model, variables, classes, hw, batch, steps):
  from wmdd_jax import statistics as stats_lib  # noqa: PLC0415

  step = stats_lib.make_stats_step(model, classes, MEAN, STD)
  acc = stats_lib._empty_accumulator(model, variables, (hw, hw, 3), classes)
  rng = np.random.default_rng(0)
  images = jnp.asarray(rng.integers(0, 256, (batch, hw, hw, 3), dtype=np.uint8))
  labels = jnp.asarray(rng.integers(0, classes, batch).astype(np.int32))
  mask = jnp.ones((batch,), jnp.float32)
  t0 = time.perf_counter()
  compiled = step.forward.lower(variables, images, labels, mask).compile() if hasattr(
      step.forward, "lower") else None
  compile_s = time.perf_counter() - t0
  state = {"acc": acc}

  def call():
    state["acc"], features, _ = step(state["acc"], variables, images, labels, mask)
    jax.block_until_ready(features)

  sec = _time(call, steps)
  return {"images_per_step": batch, "compile_s": compile_s, "median_ms": 1000 * sec,
          "images_per_s": batch / sec,
          "program_mib": None if compiled is None else _program_mib(compiled)}


def bench_barycenters(classes, points, ipc, dim, steps):
  from wmdd_jax import barycenter  # noqa: PLC0415

  rng = np.random.default_rng(1)
  features = np.abs(rng.normal(size=(classes * points, dim))).astype(np.float32)
  labels = np.repeat(np.arange(classes), points).astype(np.int32)
  key = jax.random.key(0)

  def call():
    out = barycenter.class_barycenters(features, labels, classes, ipc, key)
    jax.block_until_ready(out.support)

  t0 = time.perf_counter()
  call()  # compiles
  compile_s = time.perf_counter() - t0
  sec = _time(call, steps)
  return {"classes": classes, "points_per_class": points, "dim": dim,
          "compile_s": compile_s, "median_ms": 1000 * sec, "classes_per_s": classes / sec}


def bench_recover(model, variables, classes, hw, ipc, steps):
  from wmdd_jax import recover as recover_lib  # noqa: PLC0415

  options = recover_lib.RecoverOptions(objective="official")
  chunk = options.default_chunk(ipc, classes)
  shape = (hw, hw, 3)
  targets = random_recover_targets(model, variables, chunk, ipc, shape)
  ids = jnp.arange(chunk, dtype=jnp.int32)
  chunk_targets = jax.tree.map(jnp.asarray, targets)
  step = recover_lib.make_update_fn(model, options, MEAN, STD).step
  state = {"s": recover_lib.init_state(
      recover_lib.init_images(jax.random.key(1), ids, ipc, shape), options)}
  key = jax.random.key(2)
  t0 = time.perf_counter()
  compiled = step.lower(state["s"], variables, chunk_targets, ids, key).compile()
  compile_s = time.perf_counter() - t0

  def call():
    state["s"], metrics = step(state["s"], variables, chunk_targets, ids, key)
    jax.block_until_ready(metrics["loss"])

  sec = _time(call, steps)
  n = chunk * ipc
  return {"ipc": ipc, "chunk_classes": chunk, "images_per_step": n, "compile_s": compile_s,
          "median_ms": 1000 * sec, "images_per_s": n / sec, "program_mib": _program_mib(compiled)}


def bench_student(model, teacher_variables, hw, batch, steps):
  from wmdd_jax import evaluate, training  # noqa: PLC0415
  from wmdd_jax.models import init_model  # noqa: PLC0415
  from wmdd_jax.relabel import stream_keys  # noqa: PLC0415

  shape = (hw, hw, 3)
  options = evaluate.EvaluateOptions(batch_size=batch, progress=False)
  step = evaluate.make_student_step(model, model, options)
  variables = init_model(model, jax.random.key(1), shape)
  state = {"s": jax.device_put(training.create_train_state(
      model, variables, evaluate.make_optimizer(options, 1)), may_alias=False)}
  rng = np.random.default_rng(0)
  images = jnp.asarray(rng.normal(size=(batch, *shape)).astype(np.float32))
  weights = jnp.asarray(rng.uniform(0.5, 1.5, batch).astype(np.float32))
  _, _, views_key = stream_keys(jax.random.key(3))
  idx = np.arange(batch, dtype=np.int32)
  counter = {"epoch": 0}
  rows = lambda: (images, weights, idx, views_key, np.int32(counter["epoch"]), np.int32(0))
  t0 = time.perf_counter()
  compiled = step.lower(state["s"], (teacher_variables,), rows(), views_key,
                        np.int32(0)).compile() if hasattr(step, "lower") else None
  compile_s = time.perf_counter() - t0

  def call():
    state["s"], loss = step(state["s"], (teacher_variables,), rows(), views_key, np.int32(0))
    jax.block_until_ready(loss)
    counter["epoch"] += 1

  sec = _time(call, steps)
  return {"images_per_step": batch, "compile_s": compile_s, "median_ms": 1000 * sec,
          "images_per_s": batch / sec,
          "program_mib": None if compiled is None else _program_mib(compiled)}


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--tiny", action="store_true", help="tiny shapes (a CPU smoke test)")
  parser.add_argument("--steps", type=int, default=0, help="timed calls per item (0: 5, tiny 2)")
  parser.add_argument("--budget-s", type=float, default=420.0,
                      help="start no new item after this many seconds")
  parser.add_argument("--stats-batch", type=int, default=0, help="0: 100 (tiny: 8)")
  parser.add_argument("--bary-classes", type=int, default=0, help="0: 10 (tiny: 2)")
  parser.add_argument("--bary-points", type=int, default=0,
                      help="features per class, 0: 1300 as ImageNet (tiny: 16)")
  parser.add_argument("--only", default="",
                      help="comma list of items to run (statistics, barycenters, recover_step, "
                      "student_step); default all")
  parser.add_argument("--out", default="")
  args = parser.parse_args(argv)
  from wmdd_jax.models import get_model, init_model  # noqa: PLC0415

  tiny = args.tiny
  steps = args.steps or (2 if tiny else 5)
  stats_batch = args.stats_batch or (8 if tiny else 100)
  bary_classes = args.bary_classes or (2 if tiny else 10)
  bary_points = args.bary_points or (16 if tiny else 1300)
  student_batch = 8 if tiny else 100
  backend = jax.default_backend()
  # A tiny run's figures mean nothing: by default they stay out of bench/results.
  out = args.out or (os.path.join(tempfile.gettempdir(), "wmdd_gpu_tiny.json") if tiny
                     else os.path.join(RESULTS_DIR, "gpu.json"))

  items = []
  for setting in _settings(tiny):
    items.append((setting, "statistics", None))
    for ipc in setting["ipcs"]:
      items.append((setting, "recover_step", ipc))
    items.append((setting, "student_step", None))
  for ipc in _settings(tiny)[0]["ipcs"]:
    items.append((None, "barycenters", ipc))

  if args.only:
    wanted = set(args.only.split(","))
    items = [item for item in items if item[1] in wanted]
  start = time.perf_counter()
  rows: list[dict[str, Any]] = []
  built: dict[str, Any] = {}

  def write():
    _write_result(out, {
        "benchmark": "every stage's program at the paper's shapes on the accelerator "
                     "(throughput, compile time, memory)" + (" [--tiny smoke]" if tiny else ""),
        "rows": rows, "budget_s": args.budget_s, "steps_per_item": steps,
        "elapsed_s": time.perf_counter() - start, "peak_rss_mib": peak_rss_mib(),
        "device_peak_mib": device_peak_mib()})

  for setting, work, ipc in items:
    label = setting["label"] if setting else "features"
    row: dict[str, Any] = {"work": work, "setting": label, "backend": backend}
    if setting:
      row.update(model=setting["model"]["name"], classes=setting["classes"],
                 image=[setting["hw"], setting["hw"], 3], **setting["model"]["options"])
    if time.perf_counter() - start > args.budget_s:
      rows.append({**row, "ipc": ipc, "skipped": "over --budget-s"})
      continue
    try:
      if setting:
        if label not in built:
          model = get_model(setting["model"]["name"], setting["classes"],
                            **setting["model"]["options"])
          shape = (setting["hw"], setting["hw"], 3)
          built[label] = (model, jax.device_put(init_model(model, jax.random.key(0), shape)))
        model, variables = built[label]
      if work == "statistics":
        row.update(bench_statistics(model, variables, setting["classes"], setting["hw"],
                                    stats_batch, steps))
      elif work == "recover_step":
        row.update(bench_recover(model, variables, setting["classes"], setting["hw"], ipc,
                                 steps))
      elif work == "student_step":
        row.update(bench_student(model, variables, setting["hw"], student_batch, steps))
      else:
        row.update(ipc=ipc, **bench_barycenters(bary_classes, bary_points, ipc,
                                                8 if tiny else 512, steps))
    except Exception as e:  # noqa: BLE001 - one failed item (e.g. out of memory) must not lose the rest
      row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
    row["device_peak_mib_so_far"] = device_peak_mib()
    rows.append(row)
    print({k: (round(v, 2) if isinstance(v, float) else v) for k, v in row.items()}, flush=True)
    write()
  write()
  return 0 if all("error" not in r for r in rows) else 1


if __name__ == "__main__":
  raise SystemExit(main())
