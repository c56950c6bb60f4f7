"""Benchmark: the recover step's core, forward + backward w.r.t. the images.

    .venv/bin/python bench/step.py                      # every variant, each in a fresh process
    .venv/bin/python bench/step.py --variants=baseline,bf16 --steps=10
    .venv/bin/python bench/step.py --variant=baseline   # one variant in this process (prints JSON)

Workload: ResNet-18 (cifar stem, torchvision topology), batch 100 of 32x32x3, eval-mode BN, one
:func:`wmdd_jax.models.apply_model` pass capturing every BN input's moments, and a WMDD-style loss
of logits (CE), features (||F - B||) and pooled BN statistics (sum of ||mu - mu*|| + ||var -
var*||); the gradient is taken w.r.t. the images only. Each variant runs in its own process (XLA
flags must be set before JAX starts), compiles, warms up twice, then times ``--steps`` steps; the
median is reported. Uses the default backend, so it runs unchanged on a GPU. Results go to
``bench/results/step.json`` with the machine; this machine is shared, so compare medians of one
run only. Reference on the 2-core CPU this was written on: PyTorch 2.13 channels_last 1441 ms,
naive jitted Flax 2206-2327 ms.

What was found there (bench/results/step*.json): XLA:CPU (jax 0.10) hands these convolutions
to YNNPACK, which keeps only ~1.4 of the 2 cores busy; compiling the step without it
(``compile(compiler_options={"xla_cpu_experimental_ynn_fusion_type": ""})``, or the same flag in
XLA_FLAGS) uses both cores for about the same CPU time and brought the step from ~2.1-2.9 s to
~1.43-1.58 s, on par with PyTorch. Beyond that nothing measurably helped: one-pass moments,
donation, bf16 compute (no faster on this CPU), oneDNN/XNNPACK convolutions, splitting the batch
over 2 host devices; skipping the BN capture altogether saves only ~5-10%. (A ConvNet teacher's
train step is ~10% *slower* without YNNPACK, so this is a per-executable choice.) On an H200:
2.4 ms, bf16 1.7 ms.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# name -> (extra XLA flags, options for run_variant, description)
VARIANTS: dict[str, tuple[str, dict, str]] = {
    "baseline": ("", {}, "jit(grad) of the loss through apply_model (two-pass per-sample moments)"),
    "no_capture": ("", {"stats": "none"},
                   "lower bound: BN moments not captured, loss uses logits and features only"),
    "onepass_stats": ("", {"stats": "onepass"},
                      "moments from E[x], E[x^2] in one pass (intercepted BN inputs)"),
    "twopass_intercept": ("", {"stats": "twopass"},
                          "the baseline's moments, computed from intercepted BN inputs"),
    "donate": ("", {"donate": True},
               "step returns x - lr * grad with the image buffer donated"),
    "bf16": ("", {"dtype": "bfloat16"}, "bfloat16 convs/BN compute, float32 params and outputs"),
    "two_devices": ("--xla_force_host_platform_device_count=2", {"devices": 2},
                    "2 host devices, batch sharded 2 x 50 (classes are independent in recover)"),
    "eigen_single_thread": ("--xla_cpu_multi_thread_eigen=false", {},
                            "XLA:CPU without Eigen intra-op threads"),
    "two_devices_single_thread": (
        "--xla_force_host_platform_device_count=2 --xla_cpu_multi_thread_eigen=false",
        {"devices": 2}, "2 host devices x 1 thread each, batch sharded 2 x 50"),
    "fast_math": ("--xla_cpu_enable_fast_math=true", {}, "XLA:CPU fast math"),
    "no_ynn": ("--xla_cpu_experimental_ynn_fusion_type=", {},
               "XLA:CPU convolutions not offloaded to YNNPACK (XLA's own conv runtime)"),
    "no_ynn_onednn": ("--xla_cpu_experimental_ynn_fusion_type= --xla_cpu_use_onednn=true", {},
                      "no YNNPACK, oneDNN enabled"),
    "no_ynn_per_jit": ("", {"compiler_options": {"xla_cpu_experimental_ynn_fusion_type": ""}},
                       "as no_ynn, but set for this one executable via compile(compiler_options=)"
                       " instead of the process-wide XLA_FLAGS"),
    "no_ynn_no_capture": ("--xla_cpu_experimental_ynn_fusion_type=", {"stats": "none"},
                          "no_ynn + BN moments not captured (lower bound)"),
    "no_ynn_onepass": ("--xla_cpu_experimental_ynn_fusion_type=", {"stats": "onepass"},
                       "no_ynn + one-pass moments"),
    "no_ynn_donate": ("--xla_cpu_experimental_ynn_fusion_type=", {"donate": True},
                      "no_ynn + donated image update"),
    "no_ynn_two_devices": (
        "--xla_cpu_experimental_ynn_fusion_type= --xla_force_host_platform_device_count=2",
        {"devices": 2}, "no_ynn + 2 host devices, batch sharded 2 x 50"),
    "no_ynn_bf16": ("--xla_cpu_experimental_ynn_fusion_type=", {"dtype": "bfloat16"},
                    "no_ynn + bfloat16 compute"),
    "xnn_conv": ("--xla_cpu_experimental_ynn_fusion_type= "
                 "--xla_cpu_experimental_xnn_fusion_type=LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION",
                 {}, "convolutions through XNNPACK instead of YNNPACK"),
}


# The default list: every variant except XLA:CPU threading knobs seen not to help. On a GPU pass
# --variants=baseline,no_capture,onepass_stats,twopass_intercept,donate,bf16 (the rest are
# XLA:CPU options).
DEFAULT_VARIANTS = (
    "baseline", "no_ynn", "no_ynn_per_jit", "no_capture", "onepass_stats", "twopass_intercept",
    "donate", "bf16", "two_devices", "no_ynn_two_devices", "no_ynn_onepass", "no_ynn_donate",
    "no_ynn_bf16", "no_ynn_onednn", "xnn_conv")


def machine() -> dict:
  import jax

  return {
      "backend": jax.default_backend(),
      "devices": [str(d) for d in jax.devices()],
      "device_kind": jax.devices()[0].device_kind,
      "cpu_count": os.cpu_count(),
      "processor": platform.processor() or platform.machine(),
      "load_average": os.getloadavg(),
      "jax": jax.__version__,
      "xla_flags": os.environ.get("XLA_FLAGS", ""),
  }


def run_variant(name: str, steps: int, batch: int, options: dict) -> dict:
  """Builds, compiles and times one variant in this process."""
  import flax.linen as nn
  import jax
  import jax.numpy as jnp
  import numpy as np
  import optax
  from jax.sharding import Mesh, NamedSharding
  from jax.sharding import PartitionSpec as P

  sys.path.insert(0, ROOT)
  from wmdd_jax.models import (
      CapturingBatchNorm,
      apply_model,
      get_model,
      init_model,
      pool_moments,
  )

  stats = options.get("stats", "apply_model")
  model = get_model("resnet18", 100, stem="cifar", dtype=options.get("dtype"))
  variables = init_model(model, jax.random.key(0), (32, 32, 3))
  k1, k2, k3 = jax.random.split(jax.random.key(1), 3)
  images = jax.random.normal(k1, (batch, 32, 32, 3), jnp.float32)
  labels = jnp.arange(batch) % 100
  target_features = jax.random.normal(k2, (batch, 512)) * 0.1
  num_bn = 20

  def moments_from_inputs(inputs, onepass):
    means, variances = [], []
    for x in inputs:
      x = x.astype(jnp.float32)
      if onepass:
        m = jnp.mean(x, axis=(1, 2))
        v = jnp.maximum(jnp.mean(jnp.square(x), axis=(1, 2)) - jnp.square(m), 0.0)
      else:
        m = jnp.mean(x, axis=(1, 2))
        v = jnp.mean(jnp.square(x - m[:, None, None, :]), axis=(1, 2))
      means.append(m)
      variances.append(v)
    return means, variances

  def forward(x):
    if stats == "apply_model":
      out = apply_model(model, variables, x)
      return out.logits, out.features, out.bn_mean, out.bn_var
    if stats == "none":
      out = apply_model(model, variables, x, capture_bn=False)
      return out.logits, out.features, (), ()
    inputs = []

    def record(next_fun, args, kwargs, context):
      if isinstance(context.module, CapturingBatchNorm) and context.method_name == "__call__":
        inputs.append(args[0])
      return next_fun(*args, **kwargs)

    with nn.intercept_methods(record):
      out = apply_model(model, variables, x, capture_bn=False)
    means, variances = moments_from_inputs(inputs, stats == "onepass")
    return out.logits, out.features, means, variances

  def loss_fn(x):
    logits, features, means, variances = forward(x)
    loss = jnp.linalg.norm(features - target_features)
    loss += jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, labels))
    for m, v in zip(means, variances):
      mu, var = pool_moments(m, v)
      loss += 0.01 * (jnp.linalg.norm(mu) + jnp.linalg.norm(var - 1.0))
    return loss

  if options.get("donate"):
    step = jax.jit(lambda x: x - 0.1 * jax.grad(loss_fn)(x), donate_argnums=0)
  else:
    step = jax.jit(jax.value_and_grad(loss_fn))
  n_dev = options.get("devices", 1)
  if n_dev > 1:
    mesh = Mesh(np.asarray(jax.devices()[:n_dev]), ("batch",))
    shard = NamedSharding(mesh, P("batch"))
    images = jax.device_put(images, shard)
    labels = jax.device_put(labels, shard)
    target_features = jax.device_put(target_features, shard)
    variables = jax.device_put(variables, NamedSharding(mesh, P()))

  t0 = time.perf_counter()
  compiled = step.lower(images).compile(compiler_options=options.get("compiler_options"))
  compile_s = time.perf_counter() - t0
  x = images
  times, cpu_times = [], []
  for i in range(steps + 2):
    t, c = time.perf_counter(), time.process_time()
    out = compiled(x)
    jax.block_until_ready(out)
    if i >= 2:
      times.append(time.perf_counter() - t)
      # CPU seconds of this process (all threads): less sensitive to other jobs on the machine
      # than wall time, though spinning worker threads count too.
      cpu_times.append(time.process_time() - c)
    if options.get("donate"):
      x = out
  result = {
      "variant": name,
      "median_ms": 1000 * statistics.median(times),
      "min_ms": 1000 * min(times),
      "max_ms": 1000 * max(times),
      "median_cpu_ms": 1000 * statistics.median(cpu_times),
      "steps": steps,
      "batch": batch,
      "compile_s": compile_s,
      "bn_layers": num_bn,
      "machine": machine(),
  }
  if not options.get("donate"):
    loss, grad = out
    result["loss"] = float(loss)
    result["grad_finite"] = bool(jnp.all(jnp.isfinite(grad)))
  return result


def _run_subprocess(name: str, args: argparse.Namespace) -> dict:
  """Runs one variant in a fresh process with its XLA flags; returns its result dict."""
  flags, _, description = VARIANTS[name]
  env = dict(os.environ)
  env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " " + flags).strip()
  cmd = [sys.executable, os.path.abspath(__file__), f"--variant={name}",
         f"--steps={args.steps}", f"--batch={args.batch}"]
  try:
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout)
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
  parser.add_argument("--batch", type=int, default=100)
  parser.add_argument("--rounds", type=int, default=1,
                      help="run the variant list this many times, interleaved; each variant "
                      "reports its best (least disturbed) round")
  parser.add_argument("--timeout", type=int, default=600, help="seconds per variant")
  parser.add_argument("--out", default=os.path.join(ROOT, "bench", "results", "step.json"))
  args = parser.parse_args(argv)

  if args.variant:
    _, options, _ = VARIANTS[args.variant]
    print("RESULT " + json.dumps(run_variant(args.variant, args.steps, args.batch, options)))
    return

  runs: dict[str, list[dict]] = {}
  names = [n for n in args.variants.split(",") if n]
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
  out = {
      "benchmark": "step",
      "workload": f"ResNet-18 (cifar stem), batch {args.batch}, 32x32x3, eval BN, apply_model "
                  "with BN moments, grad w.r.t. images",
      "reference_cpu_ms": {"pytorch_2.13_channels_last": 1441, "flax_naive_jit": [2206, 2327],
                           "machine": "the 2-core AMD EPYC CPU of the project's dev machine"},
      "results": results,
      "machine": machine(),
  }
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  with open(args.out, "w") as f:
    json.dump(out, f, indent=1)
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
