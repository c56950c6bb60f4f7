"""Benchmark: where the CPU recover iteration's time goes (issue 15's profile), by sub-program.

    .venv/bin/python -m bench.recover_profile                 # 3 interleaved rounds, 2 threads
    .venv/bin/python -m bench.recover_profile --rounds 1 --classes 2 --ipc 2 --out /tmp/p.json

Workload: bench/official.py's recover iteration (ResNet-18 with the CIFAR stem, 10 classes x
IPC 10 = 100 images of 32x32x3, ``objective="official"``), taken apart into programs that each
do a subset of its work, compiled as the library compiles the recover step (XLA:CPU without
YNNPACK fusion, :func:`wmdd_jax.distributed.program_compiler_options`):

* ``full_step``: :func:`wmdd_jax.recover.make_update_fn`'s ``step`` (augmentation, forward with
  BN-input moments, losses, backward w.r.t. the images, Adam, clip);
* ``loss_grad``: the gradient of :func:`wmdd_jax.recover.chunk_loss` (no Adam, no clip);
* ``forward_backward_no_moments``: the teacher forward (eval-mode BN, ReLU, pooling) and its
  backward w.r.t. the images, no BN-input moments, no loss terms;
* ``conv_relu_forward_backward``: only the network's convolutions, ReLUs and residual adds (BN
  left out) and their backward w.r.t. the images: the convolution floor;
* ``conv_relu_forward``, ``forward_with_moments``, ``forward_no_moments``: forward halves.

Every program is timed ``--steps`` times per round, rounds interleaved; wall and process CPU time
are both reported (on a shared machine CPU time is the steadier of the two: XLA:CPU keeps both
cores busy, so a quiet machine's wall time is about CPU / threads). Then every convolution layer
alone (forward and input gradient, GFLOP/s; beside it the same convolution in PyTorch, NCHW as
the official code runs, when torch is installed), and the XLA:CPU options that name another
convolution library (oneDNN, XNNPACK, YNNPACK), each checked for whether it changes the
computed values at all (unchanged bits: the option did not take the convolution). Results go to
``bench/results/recover_profile.json``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import numpy as np

from bench.common import RESULTS_DIR, write_result

MEAN, STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
NO_YNN = {"xla_cpu_experimental_ynn_fusion_type": ""}
# Options of this jaxlib's XLA:CPU that name a convolution library, tried on one layer.
LIBRARY_OPTIONS = {
    "eigen (the library's choice)": NO_YNN,
    "ynnpack (XLA's default)": {},
    "onednn": {**NO_YNN, "xla_cpu_use_onednn": True,
               "xla_cpu_experimental_onednn_custom_call": True},
    "onednn individual convolution": {
        **NO_YNN, "xla_cpu_use_onednn": True,
        "xla_cpu_experimental_onednn_fusion_type": "LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION"},
    "xnnpack individual convolution": {
        **NO_YNN, "xla_cpu_use_xnnpack": True,
        "xla_cpu_experimental_xnn_fusion_type": "LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION"},
}


def _conv(x, w, stride):
  """The models' convolution: NHWC, HWIO, symmetric "same" padding, no bias."""
  import jax  # noqa: PLC0415

  pad = (w.shape[0] - 1) // 2
  return jax.lax.conv_general_dilated(x, w, (stride, stride), [(pad, pad), (pad, pad)],
                                      dimension_numbers=("NHWC", "HWIO", "NHWC"))


def _conv_layers(params, x):
  """(name, input, kernel, stride) of every ResNet-18 convolution in forward order, the inputs
  from running the BN-free network (:func:`_conv_relu_net`) on ``x``."""
  import jax  # noqa: PLC0415

  layers = [("conv1", x, params["conv1"]["kernel"], 1)]
  x = jax.nn.relu(_conv(x, params["conv1"]["kernel"], 1))
  for stage in range(4):
    for i in range(2):
      block, name = params[f"layer{stage + 1}_{i}"], f"layer{stage + 1}_{i}"
      stride = 2 if (stage > 0 and i == 0) else 1
      layers.append((f"{name}/conv1", x, block["conv1"]["kernel"], stride))
      mid = jax.nn.relu(_conv(x, block["conv1"]["kernel"], stride))
      layers.append((f"{name}/conv2", mid, block["conv2"]["kernel"], 1))
      out, short = _conv(mid, block["conv2"]["kernel"], 1), x
      if "downsample_conv" in block:
        layers.append((f"{name}/downsample_conv", x, block["downsample_conv"]["kernel"], stride))
        short = _conv(x, block["downsample_conv"]["kernel"], stride)
      x = jax.nn.relu(out + short)
  return layers


def _conv_relu_net(x, params):
  """The teacher's convolutions, ReLUs and residual adds, without BN (the convolution floor)."""
  import jax  # noqa: PLC0415
  import jax.numpy as jnp  # noqa: PLC0415

  x = jax.nn.relu(_conv(x, params["conv1"]["kernel"], 1))
  for stage in range(4):
    for i in range(2):
      block = params[f"layer{stage + 1}_{i}"]
      stride = 2 if (stage > 0 and i == 0) else 1
      out = _conv(jax.nn.relu(_conv(x, block["conv1"]["kernel"], stride)),
                  block["conv2"]["kernel"], 1)
      short = (_conv(x, block["downsample_conv"]["kernel"], stride)
               if "downsample_conv" in block else x)
      x = jax.nn.relu(out + short)
  return jnp.mean(x, axis=(1, 2))


def _torch_conv(inp, kernel, stride: int):
  """The PyTorch module and NCHW input of :func:`_conv`'s convolution (same kernel, stride and
  padding), as the official code lays them out."""
  import torch  # noqa: PLC0415

  kh, _, cin, cout = kernel.shape
  conv = torch.nn.Conv2d(cin, cout, kh, stride, (kh - 1) // 2, bias=False)
  conv.weight.data = torch.from_numpy(np.asarray(kernel).transpose(3, 2, 0, 1).copy())
  conv.weight.requires_grad_(False)
  return conv, torch.from_numpy(np.asarray(inp).transpose(0, 3, 1, 2).copy())


def _torch_conv_ms(inp, kernel, stride: int, steps: int, threads: int):
  """(forward, input-gradient) ms of the same convolution in PyTorch (NCHW, as the official code
  runs it), or None when torch is not installed (it is the ``bench`` extra)."""
  try:
    import torch  # noqa: PLC0415
  except ImportError:
    return None
  torch.set_num_threads(threads)
  conv, x = _torch_conv(inp, kernel, stride)
  x.requires_grad_(True)
  with torch.no_grad():
    fwd = lambda: conv(x)
    fwd()
    forward = statistics.median(_time(fwd, steps, block=False)[0])
  y = conv(x)
  g = torch.ones_like(y)
  back = lambda: torch.autograd.grad(y, x, g, retain_graph=True)
  back()
  return forward, statistics.median(_time(back, steps, block=False)[0])


def _time(fn, steps: int, block: bool = True) -> tuple[list[float], list[float]]:
  """Wall and process-CPU milliseconds of ``steps`` calls of ``fn`` (``block``: wait for JAX's
  asynchronous results)."""
  import jax  # noqa: PLC0415

  wall, cpu = [], []
  for _ in range(steps):
    t, c = time.perf_counter(), time.process_time()
    out = fn()
    if block:
      jax.block_until_ready(out)
    wall.append(1000 * (time.perf_counter() - t))
    cpu.append(1000 * (time.process_time() - c))
  return wall, cpu


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds")
  parser.add_argument("--steps", type=int, default=2, help="timed calls per program and round")
  parser.add_argument("--classes", type=int, default=10)
  parser.add_argument("--ipc", type=int, default=10)
  parser.add_argument("--hw", type=int, default=32)
  parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
  parser.add_argument("--out", default=os.path.join(RESULTS_DIR, "recover_profile.json"))
  args = parser.parse_args(argv)
  if args.threads < (os.cpu_count() or 1):
    os.sched_setaffinity(0, set(range(args.threads)))  # XLA:CPU sizes its pool from this
  import jax  # noqa: PLC0415
  import jax.numpy as jnp  # noqa: PLC0415

  from bench.common import random_recover_targets  # noqa: PLC0415
  from wmdd_jax import distributed  # noqa: PLC0415
  from wmdd_jax import recover as recover_lib  # noqa: PLC0415
  from wmdd_jax.distributed.execution import program_compiler_options  # noqa: PLC0415
  from wmdd_jax.models import apply_model, get_model, init_model  # noqa: PLC0415

  shape = (args.hw, args.hw, 3)
  c, k = args.classes, args.ipc
  model = get_model("resnet18", c, stem="cifar")
  variables = init_model(model, jax.random.key(0), shape)
  targets = jax.tree.map(jnp.asarray, random_recover_targets(
      model, variables, c, k, shape).take(np.arange(c)))
  options = recover_lib.RecoverOptions(iterations=2000, r_bn=0.01, objective="official")
  ids = jnp.arange(c, dtype=jnp.int32)
  key = jax.random.key(2)
  execution = distributed.make_execution(
      distributed.ExecutionOptions(mesh="off", compiler_options="auto"))
  compiler = program_compiler_options("recover_step")
  jit = lambda fn: jax.jit(fn, compiler_options=compiler)
  step = recover_lib.make_update_fn(model, options, MEAN, STD, execution=execution).step
  state = [recover_lib.init_state(recover_lib.init_images(jax.random.key(1), ids, k, shape),
                                  options)]
  images = jnp.array(np.asarray(state[0].images))  # a copy: the step donates its state
  flat = images.reshape(c * k, *shape)
  params = variables["params"]

  def full_step():
    state[0], metrics = step(state[0], variables, targets, ids, key)
    return metrics["loss"]

  loss = lambda x, v: recover_lib.chunk_loss(x, v, targets, ids, key, model=model,
                                             options=options)[0]
  feats = lambda x, v: jnp.sum(apply_model(model, v, x, capture_bn=False).features)
  programs = {
      "full_step": full_step,
      "loss_grad": (jit(lambda x, v: jax.grad(loss)(x, v)), (images, variables)),
      "forward_backward_no_moments": (jit(lambda x, v: jax.grad(feats)(x, v)), (flat, variables)),
      "conv_relu_forward_backward": (jit(lambda x, p: jax.grad(
          lambda x: jnp.sum(_conv_relu_net(x, p)))(x)), (flat, params)),
      "conv_relu_forward": (jit(_conv_relu_net), (flat, params)),
      "forward_with_moments": (jit(lambda x, v: apply_model(model, v, x)), (flat, variables)),
      "forward_no_moments": (jit(lambda x, v: apply_model(model, v, x, capture_bn=False).logits),
                             (flat, variables)),
  }
  calls = {}
  for name, program in programs.items():
    call = program if callable(program) else (lambda p=program: p[0](*p[1]))
    jax.block_until_ready(call())  # compile
    jax.block_until_ready(call())
    calls[name] = call
  wall = {n: [] for n in calls}
  cpu = {n: [] for n in calls}
  loads = []
  for r in range(args.rounds):
    for name in (list(calls) if r % 2 == 0 else list(calls)[::-1]):
      w, t = _time(calls[name], args.steps)
      wall[name] += w
      cpu[name] += t
    loads.append(os.getloadavg()[0])
    print(f"round {r + 1}/{args.rounds} (load {loads[-1]:.1f})", flush=True)
  full_cpu = statistics.median(cpu["full_step"])
  rows = [{"program": n, "wall_ms": statistics.median(wall[n]), "cpu_ms": statistics.median(cpu[n]),
           "cpu_share_of_full_step": statistics.median(cpu[n]) / full_cpu} for n in calls]
  for row in rows:
    print(f"{row['program']:30s} wall {row['wall_ms']:7.0f} ms  cpu {row['cpu_ms']:7.0f} ms  "
          f"({100 * row['cpu_share_of_full_step']:.0f}% of the step's CPU)")

  # Every convolution alone: forward, and the gradient w.r.t. its input (what the step needs).
  layers = []
  for name, inp, kernel, stride in _conv_layers(params, flat):
    fwd = jit(lambda a, w, s=stride: _conv(a, w, s))
    out = fwd(inp, kernel)
    cot = jnp.ones_like(out)
    grad = jit(lambda a, w, g, s=stride: jax.vjp(lambda a: _conv(a, w, s), a)[1](g)[0])
    jax.block_until_ready((fwd(inp, kernel), grad(inp, kernel, cot)))
    f_ms = statistics.median(_time(lambda f=fwd, a=inp, w=kernel: f(a, w), 3 * args.steps)[0])
    g_ms = statistics.median(_time(lambda f=grad, a=inp, w=kernel, g=cot: f(a, w, g),
                                   3 * args.steps)[0])
    gflop = 2 * out.size * int(np.prod(kernel.shape[:3])) / 1e9
    row = {"layer": name, "stride": stride, "input": list(inp.shape), "gflop": gflop,
           "forward_ms": f_ms, "input_grad_ms": g_ms, "forward_gflops": gflop / f_ms * 1000,
           "input_grad_gflops": gflop / g_ms * 1000}
    torch_ms = _torch_conv_ms(inp, kernel, stride, 3 * args.steps, args.threads)
    if torch_ms is not None:  # timed right after ours, so the machine's load is alike
      row["torch_forward_ms"], row["torch_input_grad_ms"] = torch_ms
    layers.append(row)
  conv_fwd = sum(r["forward_ms"] for r in layers)
  conv_grad = sum(r["input_grad_ms"] for r in layers)
  strided = [r for r in layers if r["stride"] == 2]
  strided_excess = sum(r["input_grad_ms"] - r["forward_ms"] for r in strided)
  torch_total = (sum(r["torch_forward_ms"] + r["torch_input_grad_ms"] for r in layers)
                 if "torch_forward_ms" in layers[0] else None)
  print(f"convolutions alone: forward {conv_fwd:.0f} ms, input gradient {conv_grad:.0f} ms "
        f"(strided layers' gradient beyond their forward: {strided_excess:.0f} ms); PyTorch "
        f"(NCHW) forward + input gradient: {torch_total} ms")

  # Which XLA:CPU options reach another convolution library (one mid-network layer).
  name, inp, kernel, stride = _conv_layers(params, flat)[6]  # layer2_1/conv1, or the tiny one
  libraries, reference = [], None
  for label, opts in LIBRARY_OPTIONS.items():
    fwd = jax.jit(lambda a, w: _conv(a, w, stride), compiler_options=opts)
    grad = jax.jit(lambda a, w: jax.grad(lambda a: jnp.sum(jnp.sin(_conv(a, w, stride))))(a),
                   compiler_options=opts)
    try:
      values = np.asarray(grad(inp, kernel))
    except Exception as e:  # noqa: BLE001 - an option this XLA does not take: record it
      libraries.append({"option": label, "error": str(e).splitlines()[0][:200]})
      continue
    reference = values if reference is None else reference
    libraries.append({
        "option": label, "compiler_options": opts,
        "forward_ms": statistics.median(_time(lambda f=fwd: f(inp, kernel), 3 * args.steps)[0]),
        "forward_backward_ms": statistics.median(
            _time(lambda g=grad: g(inp, kernel), 3 * args.steps)[0]),
        "values_differ_from_eigen": bool(np.any(values != reference))})

  by = {r["program"]: r for r in rows}
  conv_share = by["conv_relu_forward_backward"]["cpu_ms"] / full_cpu
  write_result(args.out, {
      "benchmark": "the CPU recover iteration of bench/official.py taken apart: sub-programs' "
                   "wall and CPU time, every convolution alone, XLA:CPU's convolution libraries",
      "shape": {"model": "resnet18", "stem": "cifar", "classes": c, "ipc": k,
                "images_per_step": c * k, "image": list(shape)},
      "rows": rows,
      "summary": {
          "conv_relu_share_of_step_cpu": conv_share,
          "everything_else_share_of_step_cpu": 1 - conv_share,
          # With all non-convolution work gone, the step would take conv_share of its time:
          # against a step at S ms, the best any change outside the convolutions can reach.
          "best_speedup_without_faster_convolutions": 1 / conv_share,
          "conv_forward_ms_alone": conv_fwd,
          "conv_input_grad_ms_alone": conv_grad,
          "strided_input_grad_excess_ms": strided_excess,
          "torch_conv_forward_plus_input_grad_ms_alone": torch_total,
          # The convolutions' own ratio bounds the step's when both steps are mostly
          # convolutions: PyTorch's (oneDNN) over ours (XLA:CPU's Eigen).
          "conv_speedup_over_torch": (torch_total / (conv_fwd + conv_grad)
                                      if torch_total else None),
      },
      "layers": layers,
      "convolution_libraries": libraries,
      "timing": {"rounds": args.rounds, "steps_per_round": args.steps, "threads": args.threads,
                 "statistic": "median of every timed call", "load_average_per_round": loads,
                 "compiler_options": compiler},
  })
  return 0


if __name__ == "__main__":
  sys.exit(main())
