"""Benchmark: the recover loss's forward + backward w.r.t. the images, under XLA variants.

    .venv/bin/python -m bench.step                      # every default variant, fresh processes
    .venv/bin/python -m bench.step --variants=baseline,bf16 --steps=10
    .venv/bin/python -m bench.step --variant=baseline   # one variant in this process (prints JSON)
    .venv/bin/python -m bench.step --variants=baseline --steps=1 --out=/tmp/s.json   # smoke

Workload: the library's recover loss, :func:`wmdd_jax.recover.chunk_loss` (default
:class:`~wmdd_jax.recover.RecoverOptions`: official objective, per-class BN statistics; no
augmentation unless the variant says so) on a chunk of ``--classes`` x ``--ipc`` images of
32x32x3 (10 x 10 = 100 by default), a ResNet-18 teacher (cifar stem) in eval mode and random but
well-shaped targets; the gradient is taken w.r.t. the images only. The ``update_step`` variants
time the whole step instead, :func:`wmdd_jax.recover.make_update_fn`'s ``step`` (augmentation,
loss, Adam, clipping, the state donated).

Each variant runs in its own process (XLA flags must be set before JAX starts), compiles, warms
up twice, then times ``--steps`` steps; the median is reported, with the process's CPU time per
step (less sensitive to other jobs on a shared machine). ``--rounds N`` interleaves N passes
over the variants and keeps each one's least disturbed round. Uses the default backend, so it
runs unchanged on a GPU (there pass ``--variants=baseline,no_bn_term,augment,update_step,bf16``;
the rest are XLA:CPU options). Results go to ``bench/results/step.json`` (``step_<backend>.json``
off CPU) with the machine; the figures and what was learnt from them are in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import subprocess
import sys
import time

from bench.common import RESULTS_DIR, ROOT, machine, write_result

_NO_YNN = "--xla_cpu_experimental_ynn_fusion_type="
_TWO_DEVICES = "--xla_force_host_platform_device_count=2"

# name -> (extra XLA flags, options for run_variant, description)
VARIANTS: dict[str, tuple[str, dict, str]] = {
    "baseline": ("", {}, "jit(value_and_grad) of recover.chunk_loss w.r.t. the images"),
    "no_bn_term": ("", {"recover": {"bn_stats": "none"}},
                   "lower bound: the loss without its BN-statistics term"),
    "augment": ("", {"recover": {"augment": True}},
                "the loss of augmented images (crop, flip, jitter), as recover runs it"),
    "update_step": ("", {"update": True},
                    "one whole recover step, make_update_fn(...).step (augmentation, loss, Adam, "
                    "clipping; state donated)"),
    "bf16": ("", {"dtype": "bfloat16"}, "bfloat16 convs/BN compute, float32 params and outputs"),
    "two_devices": (_TWO_DEVICES, {"devices": 2},
                    "2 host devices, the chunk's classes split over them"),
    "eigen_single_thread": ("--xla_cpu_multi_thread_eigen=false", {},
                            "XLA:CPU without Eigen intra-op threads"),
    "two_devices_single_thread": (
        _TWO_DEVICES + " --xla_cpu_multi_thread_eigen=false", {"devices": 2},
        "2 host devices x 1 thread each, the chunk's classes split over them"),
    "fast_math": ("--xla_cpu_enable_fast_math=true", {}, "XLA:CPU fast math"),
    "no_ynn": (_NO_YNN, {},
               "XLA:CPU convolutions not offloaded to YNNPACK (XLA's own conv runtime)"),
    "no_ynn_onednn": (_NO_YNN + " --xla_cpu_use_onednn=true", {}, "no YNNPACK, oneDNN enabled"),
    "no_ynn_per_jit": ("", {"compiler_options": {"xla_cpu_experimental_ynn_fusion_type": ""}},
                       "as no_ynn, but set for this one executable via compile(compiler_options=)"
                       " instead of the process-wide XLA_FLAGS"),
    "no_ynn_no_bn_term": (_NO_YNN, {"recover": {"bn_stats": "none"}},
                          "no_ynn + the loss without its BN term (lower bound)"),
    "no_ynn_update_step": (_NO_YNN, {"update": True}, "no_ynn + the whole recover step"),
    "no_ynn_two_devices": (_NO_YNN + " " + _TWO_DEVICES, {"devices": 2},
                           "no_ynn + 2 host devices, the chunk's classes split over them"),
    "no_ynn_bf16": (_NO_YNN, {"dtype": "bfloat16"}, "no_ynn + bfloat16 compute"),
    "xnn_conv": (_NO_YNN + " --xla_cpu_experimental_xnn_fusion_type="
                 "LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION",
                 {}, "convolutions through XNNPACK instead of YNNPACK"),
}

# The default list: every variant except XLA:CPU threading knobs seen not to help.
DEFAULT_VARIANTS = (
    "baseline", "no_ynn", "no_ynn_per_jit", "no_bn_term", "augment", "update_step", "bf16",
    "two_devices", "no_ynn_two_devices", "no_ynn_update_step", "no_ynn_bf16", "no_ynn_onednn",
    "xnn_conv")


def run_variant(name: str, steps: int, classes: int, ipc: int, options: dict) -> dict:
  """Builds, compiles and times one variant in this process."""
  import jax
  import jax.numpy as jnp

  from bench.common import random_recover_targets
  from wmdd_jax import recover as recover_lib
  from wmdd_jax.distributed import sharding
  from wmdd_jax.models import get_model, init_model

  shape = (32, 32, 3)
  mean, std = (0.5,) * 3, (0.25,) * 3
  model = get_model("resnet18", classes, stem="cifar", dtype=options.get("dtype"))
  variables = init_model(model, jax.random.key(0), shape)
  targets = jax.tree.map(jnp.asarray,
                         random_recover_targets(model, variables, classes, ipc, shape))
  recover_options = recover_lib.RecoverOptions(**{"augment": False, **options.get("recover", {})})
  ids = jnp.arange(classes, dtype=jnp.int32)
  images = recover_lib.init_images(jax.random.key(1), ids, ipc, shape)
  key = jax.random.key(2)

  update = options.get("update", False)
  if update:
    step = recover_lib.make_update_fn(model, recover_options, mean, std).step
    first = recover_lib.init_state(images, recover_options)
  else:
    loss = functools.partial(recover_lib.chunk_loss, model=model, options=recover_options)
    step = jax.jit(jax.value_and_grad(loss, has_aux=True))
    first = images
  n_dev = options.get("devices", 1)
  if n_dev > 1:
    mesh = sharding.make_mesh(jax.devices()[:n_dev])
    split = sharding.class_sharding(mesh)
    first, ids = jax.device_put((first, ids), split)
    targets = targets._replace(features=jax.device_put(targets.features, split),
                               bn_mean=jax.device_put(targets.bn_mean, split),
                               bn_var=jax.device_put(targets.bn_var, split))
    variables = sharding.replicate(variables, mesh)

  t0 = time.perf_counter()
  compiled = step.lower(first, variables, targets, ids, key).compile(
      compiler_options=options.get("compiler_options"))
  compile_s = time.perf_counter() - t0
  x = first
  times, cpu_times = [], []
  for i in range(steps + 2):
    t, c = time.perf_counter(), time.process_time()
    out = compiled(x, variables, targets, ids, key)
    jax.block_until_ready(out)
    if i >= 2:
      times.append(time.perf_counter() - t)
      # CPU seconds of this process (all threads): less sensitive to other jobs on the machine
      # than wall time, though spinning worker threads count too.
      cpu_times.append(time.process_time() - c)
    if update:
      x = out[0]  # the donated state is consumed: carry the new one
  if update:
    value, grad_finite = out[1]["loss"], None
  else:
    (value, _), grad = out
    grad_finite = bool(jnp.all(jnp.isfinite(grad)))
  return {
      "variant": name,
      "median_ms": 1000 * statistics.median(times),
      "min_ms": 1000 * min(times),
      "max_ms": 1000 * max(times),
      "median_cpu_ms": 1000 * statistics.median(cpu_times),
      "steps": steps,
      "classes": classes,
      "ipc": ipc,
      "compile_s": compile_s,
      "loss": float(value),
      "grad_finite": grad_finite,
      "machine": machine(),
  }


def _run_subprocess(name: str, args: argparse.Namespace) -> dict:
  """Runs one variant in a fresh process with its XLA flags; returns its result dict."""
  flags, _, description = VARIANTS[name]
  env = dict(os.environ)
  env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " " + flags).strip()
  cmd = [sys.executable, "-m", "bench.step", f"--variant={name}", f"--steps={args.steps}",
         f"--classes={args.classes}", f"--ipc={args.ipc}"]
  try:
    run = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True,
                         timeout=args.timeout)
    lines = [ln for ln in run.stdout.splitlines() if ln.startswith("RESULT ")]
    if run.returncode != 0 or not lines:
      result = {"variant": name, "error": run.stderr[-1500:]}
    else:
      result = json.loads(lines[-1][len("RESULT "):])
  except subprocess.TimeoutExpired:
    result = {"variant": name, "error": f"timed out after {args.timeout} s"}
  result["description"] = description
  result["xla_flags_added"] = flags
  return result


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--variant", help="run this one variant in-process and print its JSON")
  parser.add_argument("--variants", default=",".join(DEFAULT_VARIANTS),
                      help="comma-separated variants to run, each in a subprocess")
  parser.add_argument("--steps", type=int, default=12)
  parser.add_argument("--classes", type=int, default=10, help="classes in the chunk")
  parser.add_argument("--ipc", type=int, default=10, help="images per class")
  parser.add_argument("--rounds", type=int, default=1,
                      help="run the variant list this many times, interleaved; each variant "
                      "reports its best (least disturbed) round")
  parser.add_argument("--timeout", type=int, default=600, help="seconds per variant")
  parser.add_argument("--out", default="", help="default bench/results/step[_<backend>].json")
  args = parser.parse_args(argv)

  if args.variant:
    _, options, _ = VARIANTS[args.variant]
    print("RESULT " + json.dumps(run_variant(args.variant, args.steps, args.classes, args.ipc,
                                             options)))
    return

  runs: dict[str, list[dict]] = {}
  names = [n for n in args.variants.split(",") if n]
  unknown = [n for n in names if n not in VARIANTS]
  if unknown:
    parser.error(f"unknown variants {unknown}; choose from {sorted(VARIANTS)}")
  for round_index in range(args.rounds):
    for name in names:  # interleaved rounds: drift on a shared machine hits every variant
      result = _run_subprocess(name, args)
      runs.setdefault(name, []).append(result)
      print(f"[{round_index + 1}/{args.rounds}] {name:26s} "
            + (f"{result['median_ms']:8.1f} ms (min {result['min_ms']:.1f})"
               if "median_ms" in result else "ERROR " + result["error"][-300:]), flush=True)
  results = []
  for name in names:
    ok = [r for r in runs[name] if "median_ms" in r]
    # The least-disturbed round (lowest median) stands for the variant; all rounds are kept.
    best = dict(min(ok, key=lambda r: r["median_ms"]) if ok else runs[name][-1])
    best["round_medians_ms"] = [r.get("median_ms") for r in runs[name]]
    results.append(best)
  baseline = next((r for r in results if r["variant"] == "baseline" and "median_ms" in r), None)
  if baseline:
    for r in results:
      if "median_ms" in r:
        r["speedup_vs_baseline"] = baseline["median_ms"] / r["median_ms"]
  info = machine()
  out = args.out or os.path.join(
      RESULTS_DIR, "step.json" if info["backend"] == "cpu" else f"step_{info['backend']}.json")
  write_result(out, {
      "benchmark": "step",
      "workload": f"wmdd_jax.recover.chunk_loss and its gradient w.r.t. the images: ResNet-18 "
                  f"(cifar stem, eval BN), {args.classes} classes x IPC {args.ipc}, 32x32x3",
      "results": results,
      "machine": info,
  })


if __name__ == "__main__":
  main()
