"""Sharded stages against their single-device results, on simulated CPU devices.

The main pytest process has one device, so the multi-device checks run in subprocesses that set
``XLA_FLAGS=--xla_force_host_platform_device_count=N`` before importing JAX: one process with 4
devices (statistics, barycenters, recover with a memory budget and an Orbax resume, one student
epoch; 5 classes, not a multiple of 4), and two localhost processes with 2 devices each joined by
``jax.distributed`` (statistics from per-process data shards, and a recover chunk, end to end).
The 4-device process also runs every stage with deterministic work units (``units=3``) on one
device and on four, which must agree bit for bit; and ``experiments/distill.py
--config.debug=True`` runs on 1 and on 4 devices, which must write the same metrics.json figures.
All subprocesses start together (they mostly compile) and report JSON.

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
  from wmdd_jax import parallel

  assert parallel.padded_size(5, 4) == 8 and parallel.padded_size(8, 4) == 8
  assert parallel.padded_size(0, 4) == 4
  ids = parallel.pad_class_ids([3, 4, 5], 4)
  np.testing.assert_array_equal(ids, [3, 4, 5, 5])
  np.testing.assert_array_equal(parallel.first_occurrences(ids), [True, True, True, False])


def test_initialize_distributed_reads_the_environment():
  from wmdd_jax import ConfigError, parallel

  assert parallel.initialize_distributed(environ={}) is False  # no coordinator: nothing to do
  with pytest.raises(ConfigError, match="WMDD_NUM_PROCESSES"):
    parallel.initialize_distributed(environ={"WMDD_COORDINATOR": "127.0.0.1:1"})
  with pytest.raises(ConfigError, match="integers"):
    parallel.initialize_distributed(environ={"JAX_COORDINATOR_ADDRESS": "127.0.0.1:1",
                                             "JAX_NUM_PROCESSES": "two", "JAX_PROCESS_ID": "0"})
  with pytest.raises(ConfigError, match="outside"):
    parallel.initialize_distributed(environ={"WMDD_COORDINATOR": "127.0.0.1:1",
                                             "WMDD_NUM_PROCESSES": "2", "WMDD_PROCESS_ID": "2"})


def test_single_process_gather_helpers():
  import jax

  from wmdd_jax import parallel

  mesh = parallel.make_mesh()
  x = np.arange(6.0).reshape(3, 2)
  np.testing.assert_array_equal(parallel.gather_interleaved(x), x)
  y = parallel.shard_leading(x, mesh)
  np.testing.assert_array_equal(parallel.gather(y), x)
  assert y.sharding.spec == jax.sharding.PartitionSpec(parallel.AXIS)


# ---------------------------------------------------------------------------------------------
# Subprocess workers (run as ``python -m tests.test_parallel <worker> ...``).


def _setup():
  import jax.numpy as jnp

  from tests.tiny_models import TinyNet, tiny_variables
  from wmdd_jax import synthesis

  model = TinyNet(num_classes=C)
  variables = tiny_variables(model, SHAPE)
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (41, *SHAPE), dtype=np.uint8)
  labels = np.concatenate([np.arange(C), rng.integers(0, C, 36)]).astype(np.int32)
  features = jnp.abs(jnp.asarray(rng.normal(size=(C, K, 4)), jnp.float32))

  def targets(st):
    return synthesis.RecoverTargets(features, st.mean, st.var, st.global_mean, st.global_var)

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
  from wmdd_jax import synthesis

  # per_class: the objective whose chunk a memory budget may choose (the official one fixes it).
  kw = {"objective": "per_class", **kw}
  return synthesis.RecoverOptions(iterations=20, steps_per_call=10, r_ce=0.1, lr=0.1, **kw)


def _batches(images, labels, b):
  for i in range(0, len(images), b):
    yield images[i:i + b], labels[i:i + b]


def _worker_four(workdir: str) -> dict:
  """4 simulated devices, one process: every sharded stage against mesh=None."""
  import jax

  from wmdd_jax import (
      ConfigError,
      ShapeError,
      barycenter,
      checkpoint,
      parallel,
      relabel,
      stats,
      synthesis,
  )

  assert jax.device_count() == 4
  mesh = parallel.make_mesh()
  model, variables, images, labels, make_targets = _setup()
  out = {}

  # Statistics: batch 10 is padded to 12 (a multiple of 4); 41 images leave a short last batch.
  kw = dict(num_classes=C, image_shape=SHAPE, mean=MEAN, std=STD, batch_size=10)
  s1, f1 = stats.compute_class_statistics(model, variables, _batches(images, labels, 10), **kw)
  s4, f4 = stats.compute_class_statistics(model, variables, _batches(images, labels, 10),
                                          mesh=mesh, **kw)
  out["stats"] = _max_err(s1, s4)
  out["features"] = _max_err(f1, f4)

  # Barycenters with the class axis split (5 classes padded to 8).
  rng = np.random.default_rng(1)
  feats = rng.normal(size=(60, 8)).astype(np.float32)
  labs = np.concatenate([np.arange(C), rng.integers(0, C, 55)]).astype(np.int32)
  b1 = barycenter.class_barycenters(feats, labs, C, 3, jax.random.key(3))
  b4 = parallel.class_barycenters(feats, labs, C, 3, jax.random.key(3), mesh=mesh)
  out["barycenter"] = _max_err(b1, b4)

  # Recover, 20 steps: the chunk comes from a (generous) memory budget: all 5 classes, padded
  # to 8. The sharded run is checkpointed shard by shard with Orbax.
  targets = make_targets(s1)
  opts = _recover_options()
  rk = dict(ipc=K, image_shape=SHAPE, mean=MEAN, std=STD, options=opts,
            key=jax.random.key(1), progress=False)
  x1, h1 = synthesis.recover(model, variables, targets, **rk)
  seen = []
  ckpt_dir = os.path.join(workdir, "recover_ckpt")
  with checkpoint.RecoverCheckpointer(ckpt_dir, save_every=10, iterations=20) as ckpt:

    def on_block(index, state, metrics):
      seen.append((int(state.images.shape[0]), len(state.images.sharding.device_set),
                   state.images.sharding.is_fully_replicated))
      ckpt.on_block(index, state, metrics)

    x4, h4 = synthesis.recover(model, variables, targets, mesh=mesh, memory_budget_bytes=2**30,
                               on_block=on_block, **rk)
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

    x4r, _ = synthesis.recover(model, variables, targets, mesh=mesh, resume=resume, **rk)
  out["resumed"] = restored
  out["resume"] = _max_err(x4, x4r)
  # The official objective couples a chunk's classes (one feature norm, class-mean BN term):
  # chunks of 3 classes ([0, 1, 2] and [3, 4] padded), each split over the 4 devices.
  rk_off = dict(rk, options=_recover_options(objective="official"), class_chunk=3)
  xo1, ho1 = synthesis.recover(model, variables, targets, **rk_off)
  xo4, ho4 = synthesis.recover(model, variables, targets, mesh=mesh, **rk_off)
  out["recover_official"] = _max_err(xo1, xo4)
  out["recover_official_history"] = _max_err(ho1, ho4)
  try:
    synthesis.choose_class_chunk(model, variables, targets, ipc=K, image_shape=SHAPE, mean=MEAN,
                                 std=STD, options=opts, memory_budget_bytes=1, mesh=mesh)
    out["budget_error"] = None
  except ConfigError as e:
    out["budget_error"] = str(e)
  try:
    parallel.shard_leading(np.zeros((5, 2)), mesh)
    out["indivisible_error"] = None
  except ShapeError as e:
    out["indivisible_error"] = str(e)

  # One student epoch: two batches of 5 images (which do not split evenly over 4 devices).
  sopts = relabel.StudentOptions(epochs=1, batch_size=5, progress=False)
  r1 = relabel.train_student(model, model, variables, x1, None, None, options=sopts)
  r4 = relabel.train_student(model, model, variables, x1, None, None, options=sopts, mesh=mesh)
  out["student"] = _max_err(r1.variables, r4.variables)
  out["units"] = _units_checks(mesh, model, variables, images, labels, make_targets, workdir)
  return out


def _units_checks(mesh, model, variables, images, labels, make_targets, workdir: str
                  ) -> dict[str, float]:
  """Deterministic work units (units=3) on the first device only vs spread over 4 devices:
  every stage must be bit-identical (max error exactly 0)."""
  import jax

  from wmdd_jax import barycenter, checkpoint, relabel, stats, synthesis
  from wmdd_jax import train as train_lib

  one = train_lib.data_mesh([jax.devices()[0]])
  err = {}
  cfg = train_lib.TeacherConfig(epochs=2, batch_size=12, learning_rate=0.1, crop_padding=1,
                                eval_batch_size=10, seed=3)
  data = (images, labels)
  tk = dict(mean=MEAN, std=STD, progress=False, units=3)
  t1 = train_lib.train_teacher(model, data, data, cfg, mesh=one, **tk)
  t4 = train_lib.train_teacher(model, data, data, cfg, mesh=mesh, **tk)
  err["teacher"] = _max_err(t1, t4)
  e1 = train_lib.evaluate(model, t1, data, mean=MEAN, std=STD, batch_size=10, mesh=one, units=3)
  e4 = train_lib.evaluate(model, t1, data, mean=MEAN, std=STD, batch_size=10, mesh=mesh,
                          units=3)
  err["evaluate"] = _max_err(e1, e4)
  kw = dict(num_classes=C, image_shape=SHAPE, mean=MEAN, std=STD, batch_size=10, units=3)
  s1, f1 = stats.compute_class_statistics(model, variables, _batches(images, labels, 10), **kw)
  s4, f4 = stats.compute_class_statistics(model, variables, _batches(images, labels, 10),
                                          mesh=mesh, **kw)
  err["stats"] = _max_err((s1, f1), (s4, f4))
  rng = np.random.default_rng(1)
  feats = rng.normal(size=(60, 8)).astype(np.float32)
  labs = np.concatenate([np.arange(C), rng.integers(0, C, 55)]).astype(np.int32)
  bk = dict(classes_per_batch=1)
  b1 = barycenter.class_barycenters(feats, labs, C, 3, jax.random.key(3), **bk)
  b4 = barycenter.class_barycenters(feats, labs, C, 3, jax.random.key(3),
                                    devices=list(mesh.devices.flat), **bk)
  err["barycenter"] = _max_err(b1, b4)
  rk = dict(ipc=K, image_shape=SHAPE, mean=MEAN, std=STD, options=_recover_options(),
            key=jax.random.key(1), progress=False, units=3)
  x1, h1 = synthesis.recover(model, variables, make_targets(s1), **rk)
  ckpt_dir = os.path.join(workdir, "units_ckpt")
  with checkpoint.RecoverCheckpointer(ckpt_dir, save_every=10, iterations=20) as ckpt:
    x4, h4 = synthesis.recover(model, variables, make_targets(s1), mesh=mesh,
                               on_block=ckpt.on_block, **rk)
  err["recover"] = _max_err((x1, h1), (x4, h4))
  # Resumed from step 10 of each chunk (chunks on different devices), the last steps redone.
  for chunk in sorted(os.listdir(ckpt_dir)):
    shutil.rmtree(os.path.join(ckpt_dir, chunk, "20"))
  with checkpoint.RecoverCheckpointer(ckpt_dir, save_every=10, iterations=20) as ckpt:
    x4r, _ = synthesis.recover(model, variables, make_targets(s1), mesh=mesh,
                               resume=ckpt.resume, **rk)
  err["recover_resumed"] = _max_err(x4, x4r)
  sopts = relabel.StudentOptions(epochs=2, batch_size=5, progress=False)
  weights = np.linspace(0.5, 1.5, C * K).astype(np.float32)
  r1 = relabel.train_student(model, model, variables, x1.reshape(C * K, *SHAPE), weights, data,
                             options=sopts, mesh=one, units=3)
  r4 = relabel.train_student(model, model, variables, x1.reshape(C * K, *SHAPE), weights, data,
                             options=sopts, mesh=mesh, units=3)
  err["student"] = _max_err((r1.variables, r1.history), (r4.variables, r4.history))
  return err


def _worker_two(process_id: int, port: int, data: str, workdir: str) -> dict:
  """One of two processes (2 devices each): each feeds its own data shard; results to npz."""
  from wmdd_jax import parallel

  assert parallel.initialize_distributed(coordinator_address=f"127.0.0.1:{port}",
                                         num_processes=2, process_id=process_id)
  import jax

  from wmdd_jax import checkpoint, stats, synthesis
  from wmdd_jax.data import open_dataset

  assert jax.process_count() == 2 and jax.device_count() == 4
  mesh = parallel.make_mesh()
  model, variables, *_, make_targets = _setup()
  dataset = open_dataset(f"npz:{data}")
  kw = dict(num_classes=C, image_shape=SHAPE, mean=MEAN, std=STD, batch_size=10)
  # Shards of 21 and 20 images: 3 and 2 batches, so process 1 waits for process 0 at the end.
  shard = dataset.iter_batches("train", 10, process_index=jax.process_index(),
                               process_count=jax.process_count())
  st, feats = stats.compute_class_statistics(model, variables, shard, mesh=mesh, **kw)
  out = {"local_rows": int(len(feats.labels))}

  opts = _recover_options()
  rk = dict(ipc=K, image_shape=SHAPE, mean=MEAN, std=STD, options=opts,
            key=jax.random.key(1), progress=False)
  targets = make_targets(st)
  ckpt_dir = os.path.join(workdir, "recover_ckpt")
  with checkpoint.RecoverCheckpointer(ckpt_dir, save_every=10, iterations=20) as ckpt:
    images, _ = synthesis.recover(model, variables, targets, mesh=mesh, on_block=ckpt.on_block,
                                  **rk)
  # Every process wrote its own shards; restoring reassembles the split state.
  with checkpoint.RecoverCheckpointer(ckpt_dir, save_every=10, iterations=20) as ckpt:
    fresh, *_ = synthesis.shard_chunk(mesh, targets, parallel.pad_class_ids(np.arange(C), 4),
                                      init_key=jax.random.key(0), ipc=K, image_shape=SHAPE,
                                      options=opts)
    restored = ckpt.resume(0, fresh)
  out["restored_step"] = int(restored.step)
  out["restored"] = _max_err(images, parallel.gather(restored.images)[:C])
  np.savez(os.path.join(workdir, f"process{process_id}.npz"), images=images,
           features=parallel.gather_interleaved(feats.features),
           labels=parallel.gather_interleaved(feats.labels), **_flat_stats(st))

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


def _wait(workers, name: str, timeout: float = 600.0, marker: str | None = "RESULT ") -> dict:
  proc, log, started = workers[name]
  return _result(proc, log, max(1.0, timeout - (time.monotonic() - started)), marker)


def test_four_devices_match_one_device(workers):
  r = _wait(workers, "four")
  for name in ("stats", "features", "barycenter", "recover", "recover_history", "student",
               "recover_official", "recover_official_history"):
    assert r[name] <= TOL, (name, r[name])
  # The chunk (5 classes -> 8) was split over the 4 devices, not replicated, at both blocks.
  assert r["recover_chunks"] == [[8, 4, False], [8, 4, False]]
  # Resumed from the step-10 checkpoint into the split state; the last 10 steps reproduce the run.
  assert r["resumed"] == [[10, 4]] and r["resume"] <= TOL
  assert "memory budget" in r["budget_error"] and "raise" in r["budget_error"]
  assert "multiple of 4" in r["indivisible_error"]
  # Deterministic work units: exactly the same numbers on 1 and on 4 devices, stage by stage.
  assert r["units"] == {name: 0.0 for name in ("teacher", "evaluate", "stats", "barycenter",
                                               "recover", "recover_resumed", "student")}, r["units"]


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
              "teacher_metrics.jsonl"}
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
