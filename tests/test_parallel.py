"""Sharded stages against their single-device results, on simulated CPU devices.

The main pytest process has one device, so the multi-device checks run in subprocesses that set
``XLA_FLAGS=--xla_force_host_platform_device_count=N`` before importing JAX: one process with 4
devices (statistics, barycenters, recover with a memory budget and an Orbax resume, one student
epoch; 5 classes, not a multiple of 4), and two localhost processes with 2 devices each joined by
``jax.distributed`` (statistics from per-process data shards, and a recover chunk, end to end).
The 4-device process also runs every stage with deterministic work units (``units=3``) on one
device and on four, which must agree bit for bit; and ``experiments/distill.py
--config.debug=True`` runs on 1 and on 4 devices, which must write the same metrics.json figures.
All subprocesses start together (they mostly compile) and report JSON; the 4-device worker
reports each stage separately (a stage that raises records its traceback), so every stage has its
own test and a failure names its stage.

Run a worker by hand with ``python -m tests.test_parallel four`` from the repository root.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAPE = (8, 8, 2)
C, K = 5, 2  # 5 classes: not a multiple of the 4 devices
MEAN, STD = (0.4, 0.6), (0.2, 0.3)
TOL = 1e-5


# ---------------------------------------------------------------------------------------------
# One device, in this process.


def test_padding_helpers():
  from wmdd_jax.distributed import sharding

  assert sharding.padded_size(5, 4) == 8 and sharding.padded_size(8, 4) == 8
  assert sharding.padded_size(0, 4) == 4
  ids = sharding.pad_class_ids([3, 4, 5], 4)
  np.testing.assert_array_equal(ids, [3, 4, 5, 5])
  np.testing.assert_array_equal(sharding.first_occurrences(ids), [True, True, True, False])


def test_initialize_distributed_reads_the_environment():
  from wmdd_jax import ConfigError
  from wmdd_jax.distributed import sharding

  assert sharding.initialize_distributed(environ={}) is False  # no coordinator: nothing to do
  with pytest.raises(ConfigError, match="WMDD_NUM_PROCESSES"):
    sharding.initialize_distributed(environ={"WMDD_COORDINATOR": "127.0.0.1:1"})
  with pytest.raises(ConfigError, match="integers"):
    sharding.initialize_distributed(environ={"JAX_COORDINATOR_ADDRESS": "127.0.0.1:1",
                                             "JAX_NUM_PROCESSES": "two", "JAX_PROCESS_ID": "0"})
  with pytest.raises(ConfigError, match="outside"):
    sharding.initialize_distributed(environ={"WMDD_COORDINATOR": "127.0.0.1:1",
                                             "WMDD_NUM_PROCESSES": "2", "WMDD_PROCESS_ID": "2"})


def test_single_process_gather_helpers():
  import jax

  from wmdd_jax.distributed import sharding

  mesh = sharding.make_mesh()
  x = np.arange(6.0).reshape(3, 2)
  np.testing.assert_array_equal(sharding.gather_interleaved(x), x)
  y = sharding.shard_leading(x, mesh)
  np.testing.assert_array_equal(sharding.gather(y), x)
  assert y.sharding.spec == jax.sharding.PartitionSpec(sharding.AXIS)


# ---------------------------------------------------------------------------------------------
# Subprocess workers (run as ``python -m tests.test_parallel <worker> ...``).


def _setup():
  import jax.numpy as jnp

  from tests.tiny_models import TinyNet, tiny_variables
  from wmdd_jax import recover as recover_lib

  model = TinyNet(num_classes=C)
  variables = tiny_variables(model, SHAPE)
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (41, *SHAPE), dtype=np.uint8)
  labels = np.concatenate([np.arange(C), rng.integers(0, C, 36)]).astype(np.int32)
  features = jnp.abs(jnp.asarray(rng.normal(size=(C, K, 4)), jnp.float32))

  def targets(st):
    return recover_lib.RecoverTargets(features, st.mean, st.var, st.global_mean, st.global_var)

  return model, variables, images, labels, targets


def _max_err(a, b) -> float:
  import jax

  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  assert len(la) == len(lb)
  return max(float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64))))
             for x, y in zip(la, lb))


def _flat_stats(st) -> dict[str, np.ndarray]:
  import jax

  return {f"stats_{i}": np.asarray(x) for i, x in enumerate(jax.tree.leaves(st))}


def _recover_options(**kw):
  from wmdd_jax import recover as recover_lib

  # per_class: the objective whose chunk a memory budget may choose (the official one fixes it).
  kw = {"objective": "per_class", **kw}
  return recover_lib.RecoverOptions(iterations=20, steps_per_call=10, r_ce=0.1, lr=0.1, **kw)


def _batches(images, labels, b):
  for i in range(0, len(images), b):
    yield images[i:i + b], labels[i:i + b]


def _run_stages(stages: dict, *args) -> dict:
  """Runs each stage check, recording its result or its traceback (so one broken stage fails its
  own test and the others still report)."""
  import traceback

  out = {}
  for name, check in stages.items():
    try:
      out[name] = check(*args)
    except Exception:  # noqa: BLE001 - reported by the stage's test
      out[name] = {"error": traceback.format_exc()}
  return out


def _worker_four(workdir: str) -> dict:
  """4 simulated devices, one process: every stage, sharded and as work units, against one
  device; one entry per stage."""
  import jax

  from wmdd_jax import statistics
  from wmdd_jax.distributed import sharding

  assert jax.device_count() == 4
  mesh = sharding.make_mesh()
  model, variables, images, labels, make_targets = _setup()
  kw = dict(num_classes=C, image_shape=SHAPE, mean=MEAN, std=STD, batch_size=10)
  s1, f1 = statistics.compute_class_statistics(model, variables, _batches(images, labels, 10), **kw)
  ctx = dict(workdir=workdir, mesh=mesh, one=sharding.make_mesh([jax.devices()[0]]),
             model=model, variables=variables, images=images, labels=labels,
             make_targets=make_targets, s1=s1, f1=f1)
  sharded = _run_stages({"statistics": _sharded_statistics, "barycenter": _sharded_barycenter,
                         "recover": _sharded_recover, "student": _sharded_student}, ctx)
  units = _run_stages({"teacher": _units_teacher, "evaluate": _units_evaluate,
                       "statistics": _units_statistics, "barycenter": _units_barycenter,
                       "recover": _units_recover, "student": _units_student}, ctx)
  return {"sharded": sharded, "units": units}


def _feature_batches(seed=1):
  rng = np.random.default_rng(seed)
  feats = rng.normal(size=(60, 8)).astype(np.float32)
  labs = np.concatenate([np.arange(C), rng.integers(0, C, 55)]).astype(np.int32)
  return feats, labs


def _sharded_statistics(ctx):
  from wmdd_jax import statistics
  from wmdd_jax.distributed import Sharded

  # Batch 10 is padded to 12 (a multiple of 4); 41 images leave a short last batch.
  kw = dict(num_classes=C, image_shape=SHAPE, mean=MEAN, std=STD, batch_size=10)
  s4, f4 = statistics.compute_class_statistics(
      ctx["model"], ctx["variables"], _batches(ctx["images"], ctx["labels"], 10),
      execution=Sharded(ctx["mesh"]), **kw)
  return {"stats": _max_err(ctx["s1"], s4), "features": _max_err(ctx["f1"], f4)}


def _sharded_barycenter(ctx):
  import jax

  from wmdd_jax import barycenter
  from wmdd_jax.distributed import Sharded

  # The class axis split (5 classes padded to 8).
  feats, labs = _feature_batches()
  b1 = barycenter.class_barycenters(feats, labs, C, 3, jax.random.key(3))
  b4 = barycenter.class_barycenters(feats, labs, C, 3, jax.random.key(3),
                                    execution=Sharded(ctx["mesh"]))
  return {"barycenter": _max_err(b1, b4)}


def _sharded_recover(ctx):
  import jax

  from wmdd_jax import ConfigError, ShapeError, checkpoint
  from wmdd_jax import recover as recover_lib
  from wmdd_jax.distributed import Sharded, sharding

  workdir, mesh, model, variables = ctx["workdir"], ctx["mesh"], ctx["model"], ctx["variables"]
  s1, f1 = ctx["s1"], ctx["f1"]
  out = {}
  # 20 steps: the chunk comes from a (generous) memory budget: all 5 classes, padded to 8. The
  # sharded run is checkpointed shard by shard with Orbax.
  targets = ctx["make_targets"](s1)
  opts = _recover_options()
  rk = dict(ipc=K, image_shape=SHAPE, mean=MEAN, std=STD, options=opts,
            key=jax.random.key(1), progress=False)
  x1, h1 = recover_lib.recover(model, variables, targets, **rk)
  seen = []
  ckpt_dir = os.path.join(workdir, "recover_ckpt")
  with checkpoint.RecoverCheckpointer(ckpt_dir, save_every=10, iterations=20) as ckpt:

    def on_block(index, state, metrics):
      seen.append((int(state.images.shape[0]), len(state.images.sharding.device_set),
                   state.images.sharding.is_fully_replicated))
      ckpt.on_block(index, state, metrics)

    x4, h4 = recover_lib.recover(model, variables, targets, execution=Sharded(mesh),
                                 memory_budget_bytes=2**30, on_block=on_block, **rk)
  out["recover"] = _max_err(x1, x4)
  # The reference of the two-process test (same data, same recover options).
  np.savez(os.path.join(workdir, "reference.npz"), images=x1, features=f1.features,
           labels=f1.labels, **_flat_stats(s1))
  out["recover_history"] = _max_err(h1, h4)
  out["recover_chunks"] = seen
  # Resume from the step-10 checkpoint: restored into the split state, the last 10 steps redone.
  shutil.rmtree(os.path.join(ckpt_dir, "chunk_0000", "20"))
  restored = []
  with checkpoint.RecoverCheckpointer(ckpt_dir, save_every=10, iterations=20) as ckpt:

    def resume(index, fresh):
      state = ckpt.resume(index, fresh)
      restored.append((int(state.step), len(state.images.sharding.device_set)))
      return state

    x4r, _ = recover_lib.recover(model, variables, targets, execution=Sharded(mesh),
                                 resume=resume, **rk)
  out["resumed"] = restored
  out["resume"] = _max_err(x4, x4r)
  # The official objective couples a chunk's classes (one feature norm, class-mean BN term):
  # chunks of 3 classes ([0, 1, 2] and [3, 4] padded), each split over the 4 devices.
  rk_off = dict(rk, options=_recover_options(objective="official"), class_chunk=3)
  xo1, ho1 = recover_lib.recover(model, variables, targets, **rk_off)
  xo4, ho4 = recover_lib.recover(model, variables, targets, execution=Sharded(mesh), **rk_off)
  out["recover_official"] = _max_err(xo1, xo4)
  out["recover_official_history"] = _max_err(ho1, ho4)
  try:
    recover_lib.choose_class_chunk(model, variables, targets, ipc=K, image_shape=SHAPE,
                                   mean=MEAN, std=STD, options=opts, memory_budget_bytes=1,
                                   execution=Sharded(mesh))
    out["budget_error"] = None
  except ConfigError as e:
    out["budget_error"] = str(e)
  try:
    sharding.shard_leading(np.zeros((5, 2)), mesh)
    out["indivisible_error"] = None
  except ShapeError as e:
    out["indivisible_error"] = str(e)
  ctx["x1"] = x1
  return out


def _sharded_student(ctx):
  import jax

  from wmdd_jax import evaluate as evaluate_lib
  from wmdd_jax import recover as recover_lib
  from wmdd_jax.distributed import Sharded

  # One student epoch: two batches of 5 images (which do not split evenly over 4 devices).
  x1 = ctx.get("x1")
  if x1 is None:  # the recover stage failed: any synthetic images will do
    x1 = np.asarray(recover_lib.init_images(jax.random.key(0), np.arange(C), K, SHAPE))
  x1 = np.asarray(x1).reshape(C * K, *SHAPE)
  sopts = evaluate_lib.EvaluateOptions(epochs=1, batch_size=5, progress=False)
  model, variables = ctx["model"], ctx["variables"]
  r1 = evaluate_lib.train_student(model, model, variables, x1, None, None, options=sopts)
  r4 = evaluate_lib.train_student(model, model, variables, x1, None, None, options=sopts,
                                  execution=Sharded(ctx["mesh"]))
  return {"student": _max_err(r1.variables, r4.variables)}


# Deterministic work units (units=3) on the first device only vs spread over 4 devices: every
# stage must be bit-identical (max error exactly 0).


def _units_teacher(ctx):
  from wmdd_jax import teacher as teacher_lib
  from wmdd_jax.distributed import Units

  cfg = teacher_lib.TeacherOptions(epochs=2, batch_size=12, learning_rate=0.1, crop_padding=1,
                                   eval_batch_size=10, seed=3)
  data = (ctx["images"], ctx["labels"])
  tk = dict(mean=MEAN, std=STD, progress=False)
  t1 = teacher_lib.train_teacher(ctx["model"], data, data, cfg, execution=Units(3, ctx["one"]),
                                 **tk)
  t4 = teacher_lib.train_teacher(ctx["model"], data, data, cfg, execution=Units(3, ctx["mesh"]),
                                 **tk)
  ctx["t1"] = t1
  return _max_err(t1, t4)


def _units_evaluate(ctx):
  from wmdd_jax import training
  from wmdd_jax.distributed import Units

  data = (ctx["images"], ctx["labels"])
  weights = ctx.get("t1", ctx["variables"])
  e1 = training.evaluate(ctx["model"], weights, data, mean=MEAN, std=STD, batch_size=10,
                         execution=Units(3, ctx["one"]))
  e4 = training.evaluate(ctx["model"], weights, data, mean=MEAN, std=STD, batch_size=10,
                         execution=Units(3, ctx["mesh"]))
  return _max_err(e1, e4)


def _units_statistics(ctx):
  from wmdd_jax import statistics
  from wmdd_jax.distributed import Units

  kw = dict(num_classes=C, image_shape=SHAPE, mean=MEAN, std=STD, batch_size=10)
  run = lambda mesh: statistics.compute_class_statistics(
      ctx["model"], ctx["variables"], _batches(ctx["images"], ctx["labels"], 10),
      execution=Units(3, mesh), **kw)
  s1, f1 = run(ctx["one"])
  s4, f4 = run(ctx["mesh"])
  ctx["units_s1"] = s1
  return _max_err((s1, f1), (s4, f4))


def _units_barycenter(ctx):
  import jax

  from wmdd_jax import barycenter
  from wmdd_jax.distributed import Units

  feats, labs = _feature_batches()
  bk = dict(classes_per_batch=1)
  b1 = barycenter.class_barycenters(feats, labs, C, 3, jax.random.key(3), **bk)
  b4 = barycenter.class_barycenters(feats, labs, C, 3, jax.random.key(3),
                                    execution=Units(3, ctx["mesh"]), **bk)
  return _max_err(b1, b4)


def _units_recover(ctx):
  import jax

  from wmdd_jax import checkpoint
  from wmdd_jax import recover as recover_lib
  from wmdd_jax.distributed import Units

  targets = ctx["make_targets"](ctx.get("units_s1", ctx["s1"]))
  model, variables, mesh = ctx["model"], ctx["variables"], ctx["mesh"]
  rk = dict(ipc=K, image_shape=SHAPE, mean=MEAN, std=STD, options=_recover_options(),
            key=jax.random.key(1), progress=False)
  x1, h1 = recover_lib.recover(model, variables, targets, execution=Units(3, ctx["one"]), **rk)
  ckpt_dir = os.path.join(ctx["workdir"], "units_ckpt")
  with checkpoint.RecoverCheckpointer(ckpt_dir, save_every=10, iterations=20) as ckpt:
    x4, h4 = recover_lib.recover(model, variables, targets, execution=Units(3, mesh),
                                 on_block=ckpt.on_block, **rk)
  # Resumed from step 10 of each chunk (chunks on different devices), the last steps redone.
  for chunk in sorted(os.listdir(ckpt_dir)):
    shutil.rmtree(os.path.join(ckpt_dir, chunk, "20"))
  with checkpoint.RecoverCheckpointer(ckpt_dir, save_every=10, iterations=20) as ckpt:
    x4r, _ = recover_lib.recover(model, variables, targets, execution=Units(3, mesh),
                                 resume=ckpt.resume, **rk)
  ctx["units_x1"] = x1
  return {"run": _max_err((x1, h1), (x4, h4)), "resumed": _max_err(x4, x4r)}


def _units_student(ctx):
  import jax

  from wmdd_jax import evaluate as evaluate_lib
  from wmdd_jax import recover as recover_lib
  from wmdd_jax.distributed import Units

  x1 = ctx.get("units_x1")
  if x1 is None:
    x1 = recover_lib.init_images(jax.random.key(0), np.arange(C), K, SHAPE)
  x1 = np.asarray(x1).reshape(C * K, *SHAPE)
  data = (ctx["images"], ctx["labels"])
  sopts = evaluate_lib.EvaluateOptions(epochs=2, batch_size=5, progress=False)
  weights = np.linspace(0.5, 1.5, C * K).astype(np.float32)
  model, variables = ctx["model"], ctx["variables"]
  run = lambda mesh: evaluate_lib.train_student(model, model, variables, x1, weights, data,
                                                options=sopts, execution=Units(3, mesh))
  r1, r4 = run(ctx["one"]), run(ctx["mesh"])
  return _max_err((r1.variables, r1.history), (r4.variables, r4.history))


def _worker_two(process_id: int, port: int, data: str, workdir: str) -> dict:
  """One of two processes (2 devices each): each feeds its own data shard; results to npz."""
  from wmdd_jax.distributed import sharding

  assert sharding.initialize_distributed(coordinator_address=f"127.0.0.1:{port}",
                                         num_processes=2, process_id=process_id)
  import jax

  from wmdd_jax import checkpoint, statistics
  from wmdd_jax import recover as recover_lib
  from wmdd_jax.data import open_dataset
  from wmdd_jax.distributed import Sharded

  assert jax.process_count() == 2 and jax.device_count() == 4
  mesh = sharding.make_mesh()
  model, variables, *_, make_targets = _setup()
  dataset = open_dataset(f"npz:{data}")
  kw = dict(num_classes=C, image_shape=SHAPE, mean=MEAN, std=STD, batch_size=10)
  # Shards of 21 and 20 images: 3 and 2 batches, so process 1 waits for process 0 at the end.
  shard = dataset.iter_batches("train", 10, process_index=jax.process_index(),
                               process_count=jax.process_count())
  st, feats = statistics.compute_class_statistics(model, variables, shard,
                                                 execution=Sharded(mesh), **kw)
  out = {"local_rows": int(len(feats.labels))}

  opts = _recover_options()
  rk = dict(ipc=K, image_shape=SHAPE, mean=MEAN, std=STD, options=opts,
            key=jax.random.key(1), progress=False)
  targets = make_targets(st)
  ckpt_dir = os.path.join(workdir, "recover_ckpt")
  with checkpoint.RecoverCheckpointer(ckpt_dir, save_every=10, iterations=20) as ckpt:
    images, _ = recover_lib.recover(model, variables, targets, execution=Sharded(mesh),
                                    on_block=ckpt.on_block, **rk)
  # Every process wrote its own shards; restoring reassembles the split state.
  with checkpoint.RecoverCheckpointer(ckpt_dir, save_every=10, iterations=20) as ckpt:
    fresh, *_ = recover_lib.start_chunk(Sharded(mesh), 0, targets,
                                        sharding.pad_class_ids(np.arange(C), 4),
                                        init_key=jax.random.key(0), ipc=K, image_shape=SHAPE,
                                        options=opts)
    restored = ckpt.resume(0, fresh)
  out["restored_step"] = int(restored.step)
  out["restored"] = _max_err(images, sharding.gather(restored.images)[:C])
  np.savez(os.path.join(workdir, f"process{process_id}.npz"), images=images,
           features=sharding.gather_interleaved(feats.features),
           labels=sharding.gather_interleaved(feats.labels), **_flat_stats(st))

  # A teacher saved by one process from device arrays loads in every process of this run.
  loaded, meta = checkpoint.load_teacher(os.path.join(os.path.dirname(data), "teacher"))
  out["teacher_loaded"] = _max_err(loaded, variables) if meta.get("test_top1") == 12.5 else None
  # The pipeline refuses to run several processes without the global mesh (each would compute
  # the statistics of its own shard only), before any stage runs.
  from wmdd_jax import ConfigError, pipeline

  config = pipeline.default_config()
  config.parallel.mesh = "off"
  try:
    pipeline.run(config, os.path.join(workdir, f"never{process_id}"), log=lambda *_: None)
    out["mesh_off"] = None
  except ConfigError as e:
    out["mesh_off"] = str(e)
  out["mesh_off_wrote"] = os.path.exists(os.path.join(workdir, f"never{process_id}"))
  return out


def main(argv: list[str]) -> int:
  worker, *args = argv
  result = _worker_four(*args) if worker == "four" else _worker_two(
      int(args[0]), int(args[1]), args[2], args[3])
  print("RESULT " + json.dumps(result), flush=True)
  return 0


# ---------------------------------------------------------------------------------------------
# The multi-device tests: all workers start at once (module fixture), each test waits for its own.


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _start(args: list[str], devices: int, log: str) -> subprocess.Popen:
  return _start_script(["-m", "tests.test_parallel", *args], devices, log)


def _start_script(args: list[str], devices: int, log: str,
                  extra_env: dict[str, str] | None = None) -> subprocess.Popen:
  env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
             JAX_PLATFORMS="cpu")
  for var in ("WMDD_COORDINATOR", "JAX_COORDINATOR_ADDRESS"):
    env.pop(var, None)
  env.update(extra_env or {})
  with open(log, "w") as f:
    return subprocess.Popen([sys.executable, *args], cwd=ROOT, env=env, stdout=f,
                            stderr=subprocess.STDOUT)


def _result(proc: subprocess.Popen, log: str, timeout: float, marker: str = "RESULT ") -> dict:
  try:
    proc.wait(timeout=timeout)
  except subprocess.TimeoutExpired:
    proc.kill()
    proc.wait()
  with open(log) as f:
    text = f.read()
  if marker is None:
    assert proc.returncode == 0, f"run failed (rc {proc.returncode}):\n{text[-4000:]}"
    return {}
  lines = [line for line in text.splitlines() if line.startswith(marker)]
  assert proc.returncode == 0 and lines, f"worker failed (rc {proc.returncode}):\n{text[-4000:]}"
  return json.loads(lines[-1][len("RESULT "):])


def _save_device_teacher(path: str) -> None:
  """The workers' tiny teacher, saved by this (one-device) process from device arrays."""
  from tests.tiny_models import TinyNet, tiny_variables
  from wmdd_jax import checkpoint

  variables = tiny_variables(TinyNet(num_classes=C), SHAPE)  # jax arrays on this device
  checkpoint.save_teacher(path, variables, {"model": "tiny", "test_top1": 12.5})


@pytest.fixture(scope="module")
def workers():
  tmp = tempfile.mkdtemp(prefix="wmdd_parallel_")
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (41, *SHAPE), dtype=np.uint8)
  labels = np.concatenate([np.arange(C), rng.integers(0, C, 36)]).astype(np.int64)
  data = os.path.join(tmp, "data.npz")
  np.savez(data, x_train=images, y_train=labels)
  _save_device_teacher(os.path.join(tmp, "teacher"))
  port = str(_free_port())
  procs = {"four": _start(["four", os.path.join(tmp, "four")], 4, os.path.join(tmp, "four.log"))}
  # The pipeline's debug run, as a user types it, on 1 and on 4 devices, and as 2 processes.
  distill = [os.path.join(ROOT, "experiments", "distill.py"), "--config",
             os.path.join(ROOT, "experiments", "configs", "digits.py"), "--config.debug=True",
             "--workdir"]
  for devices in (1, 4):
    procs[f"distill{devices}"] = _start_script(
        distill + [os.path.join(tmp, f"distill{devices}")], devices,
        os.path.join(tmp, f"distill{devices}.log"))
  pipeline_port = str(_free_port())
  for p in range(2):
    procs[f"distill_process{p}"] = _start_script(
        distill + [os.path.join(tmp, "distill_2x2")], 2,
        os.path.join(tmp, f"distill_process{p}.log"),
        {"WMDD_COORDINATOR": f"127.0.0.1:{pipeline_port}", "WMDD_NUM_PROCESSES": "2",
         "WMDD_PROCESS_ID": str(p)})
  for p in range(2):
    procs[f"two{p}"] = _start(["two", str(p), port, data, os.path.join(tmp, "two")], 2,
                              os.path.join(tmp, f"two{p}.log"))
  started = time.monotonic()
  handles = {name: (proc, os.path.join(tmp, f"{name}.log"), started)
             for name, proc in procs.items()}
  yield {**handles, "dir": tmp}
  for proc in procs.values():
    if proc.poll() is None:
      proc.kill()
      proc.wait()
  shutil.rmtree(tmp, ignore_errors=True)


def _wait(workers, name: str, timeout: float = 900.0, marker: str | None = "RESULT ") -> dict:
  proc, log, started = workers[name]
  return _result(proc, log, max(1.0, timeout - (time.monotonic() - started)), marker)


def _stage_result(workers, kind: str, stage: str):
  result = _wait(workers, "four")[kind][stage]
  if isinstance(result, dict) and "error" in result:
    pytest.fail(f"{kind} {stage} raised on 4 devices:\n{result['error']}")
  return result


def test_statistics_on_four_devices_match_one_device(workers):
  r = _stage_result(workers, "sharded", "statistics")
  assert r["stats"] <= TOL and r["features"] <= TOL, r


def test_barycenters_on_four_devices_match_one_device(workers):
  r = _stage_result(workers, "sharded", "barycenter")
  assert r["barycenter"] <= TOL, r


def test_recover_on_four_devices_matches_one_device(workers):
  r = _stage_result(workers, "sharded", "recover")
  for name in ("recover", "recover_history", "recover_official", "recover_official_history"):
    assert r[name] <= TOL, (name, r[name])
  # The chunk (5 classes -> 8) was split over the 4 devices, not replicated, at both blocks.
  assert r["recover_chunks"] == [[8, 4, False], [8, 4, False]]
  # Resumed from the step-10 checkpoint into the split state; the last 10 steps reproduce the run.
  assert r["resumed"] == [[10, 4]] and r["resume"] <= TOL
  assert "memory budget" in r["budget_error"] and "raise" in r["budget_error"]
  assert "multiple of 4" in r["indivisible_error"]


def test_student_on_four_devices_matches_one_device(workers):
  r = _stage_result(workers, "sharded", "student")
  assert r["student"] <= TOL, r


@pytest.mark.parametrize("stage", ["teacher", "evaluate", "statistics", "barycenter", "student"])
def test_work_units_are_bit_identical_on_one_and_four_devices(workers, stage):
  assert _stage_result(workers, "units", stage) == 0.0


def test_recover_work_units_are_bit_identical_and_resume(workers):
  assert _stage_result(workers, "units", "recover") == {"run": 0.0, "resumed": 0.0}


def test_two_processes_match_one_process(workers):
  results = [_wait(workers, f"two{p}") for p in range(2)]
  _wait(workers, "four")  # it wrote the one-device reference
  assert [r["local_rows"] for r in results] == [21, 20]
  reference = np.load(os.path.join(workers["dir"], "four", "reference.npz"))
  for p, r in enumerate(results):
    assert r["restored_step"] == 20 and r["restored"] <= TOL
    assert r["teacher_loaded"] == 0.0
    assert "several processes need the mesh" in r["mesh_off"] and not r["mesh_off_wrote"]
    got = np.load(os.path.join(workers["dir"], "two", f"process{p}.npz"))
    assert sorted(got.files) == sorted(reference.files)
    np.testing.assert_array_equal(got["labels"], reference["labels"])
    for name in reference.files:
      np.testing.assert_allclose(got[name], reference[name], rtol=0, atol=TOL, err_msg=name)


def test_debug_pipeline_metrics_do_not_depend_on_the_device_count(workers):
  """``distill.py --config.debug=True`` (deterministic work units) on 1 and 4 devices: the same
  metrics.json figures, and the same bytes in every intermediate array."""
  runs = {}
  for devices in (1, 4):
    _wait(workers, f"distill{devices}", marker=None)
    runs[devices] = os.path.join(workers["dir"], f"distill{devices}")
  metrics = {}
  for devices, workdir in runs.items():
    with open(os.path.join(workdir, "metrics.json")) as f:
      metrics[devices] = json.load(f)
  assert metrics[1]["devices"] == 1 and metrics[4]["devices"] == 4
  figures = ("test_top1", "test_top5", "best_top1", "best_top5", "teacher_top1")
  assert {k: metrics[1][k] for k in figures} == {k: metrics[4][k] for k in figures}
  assert metrics[1]["teacher_top1"] > 50  # a real (if short) teacher, not a broken run
  for name in ("stats.npz", "barycenter.npz", "recover_history.npz"):
    a, b = np.load(os.path.join(runs[1], name)), np.load(os.path.join(runs[4], name))
    assert a.files == b.files
    for key in a.files:
      np.testing.assert_array_equal(a[key], b[key], err_msg=f"{name}:{key}")
  np.testing.assert_array_equal(np.load(os.path.join(runs[1], "features.npy")),
                                np.load(os.path.join(runs[4], "features.npy")))
  with open(os.path.join(runs[1], "eval.json")) as f1, open(os.path.join(runs[4],
                                                                         "eval.json")) as f4:
    assert json.load(f1) == json.load(f4)  # per-epoch losses too


def test_pipeline_runs_as_two_processes(workers):
  """``distill.py`` as 2 processes x 2 devices: one shared workdir, every file written once (by
  process 0), the same figures as the 1-process sharded run would give up to round-off."""
  for p in range(2):
    _wait(workers, f"distill_process{p}", marker=None)
  workdir = os.path.join(workers["dir"], "distill_2x2")
  with open(os.path.join(workdir, "metrics.json")) as f:
    metrics = json.load(f)
  assert metrics["devices"] == 4 and metrics["teacher_top1"] > 50
  assert 0 <= metrics["test_top1"] <= 100 and metrics["test_top5"] >= metrics["test_top1"]
  expected = {"teacher", "stats.npz", "features.npy", "barycenter.npz", "recover_ckpt",
              "recover_history.npz", "synset", "grid.png", "eval.json", "metrics.json",
              "curves.png", "summary.txt", "config.json", "timings.json",
              "teacher_metrics.jsonl", "fingerprints.json", "tensorboard"}
  assert set(os.listdir(workdir)) == expected  # no temporary leftovers
  with open(os.path.join(workdir, "teacher_metrics.jsonl")) as f:
    assert len(f.readlines()) == 2  # 2 debug epochs, written by one process only
  features = np.load(os.path.join(workdir, "features.npy"))
  assert features.shape[0] == int(np.load(os.path.join(workdir, "stats.npz"))["counts"].sum())
  logs = []
  for p in range(2):
    with open(os.path.join(workers["dir"], f"distill_process{p}.log")) as f:
      logs.append(f.read())
  assert "student test top-1" in logs[0] and "student test top-1" not in logs[1]
  assert "recover:" in logs[0] and "recover:" not in logs[1]  # no progress bars either


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
