"""Tests of teacher training (optimiser, steps, loop, data parallelism) and teacher checkpoints."""

import dataclasses
import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sklearn.datasets import load_digits

from wmdd_jax import CheckpointError, ConfigError
from wmdd_jax import teacher as teacher_lib
from wmdd_jax.checkpoint import load_teacher, save_teacher
from wmdd_jax.distributed import local_execution
from wmdd_jax.models import get_model, init_model
from wmdd_jax.teacher import TeacherOptions, cosine_schedule, make_optimizer, train_teacher
from wmdd_jax.training import array_batches, create_train_state, evaluate

# A ConvNet-D3 of width 32 on 8x8 digits: ~97% test top-1 after 8 epochs, in a few seconds.
_MODEL = dict(name="convnet_d3", num_classes=10, width=32)
_CONFIG = TeacherOptions(epochs=8, batch_size=64, learning_rate=0.05, weight_decay=5e-4,
                        crop_padding=1, flip=False, eval_every=4, seed=0)


def _digits():
  """sklearn digits as u8[N, 8, 8, 1] pixels (0..16 -> 0..255) with a fixed 1400/397 split."""
  d = load_digits()
  x = np.round(d.images * (255 / 16)).astype(np.uint8)[..., None]
  y = d.target.astype(np.int32)
  order = np.random.default_rng(0).permutation(len(y))
  train, test = order[:1400], order[1400:]
  mean = (float(x[train].mean()) / 255,)
  std = (float(x[train].std()) / 255,)
  return (x[train], y[train]), (x[test], y[test]), mean, std


@pytest.fixture(scope="module")
def digits():
  return _digits()


@pytest.fixture(scope="module")
def teacher(digits, tmp_path_factory):
  train, test, mean, std = digits
  model = get_model(_MODEL["name"], _MODEL["num_classes"], width=_MODEL["width"])
  metrics = tmp_path_factory.mktemp("teacher") / "metrics.jsonl"
  variables = train_teacher(model, train, test, _CONFIG, mean=mean, std=std,
                            metrics_path=metrics, progress=False)
  records = [json.loads(line) for line in metrics.read_text().splitlines()]
  return model, variables, records


def test_teacher_reaches_90_percent_on_digits(teacher, digits):
  model, variables, records = teacher
  assert [r["epoch"] for r in records] == list(range(1, _CONFIG.epochs + 1))
  assert "test_top1" in records[3] and "test_top1" not in records[2]  # eval_every=4
  assert records[-1]["test_top1"] >= 90.0, records[-1]
  assert records[-1]["train_loss"] < records[0]["train_loss"]
  assert records[-1]["lr"] < 1e-3  # cosine schedule reached ~0
  # evaluate() agrees with a direct numpy computation (padding masked out: 397 = 3 * 128 + 13).
  _, (x, y), mean, std = digits
  result = evaluate(model, variables, (x, y), mean=mean, std=std, batch_size=128)
  logits, _ = model.apply(variables, (x / 255.0 - mean[0]) / std[0], train=False)
  top1 = 100.0 * float(np.mean(np.asarray(logits).argmax(-1) == y))
  assert result["count"] == len(y)
  assert result["top1"] == pytest.approx(top1, abs=1e-6)
  assert result["top1"] == pytest.approx(records[-1]["test_top1"], abs=1e-6)
  assert result["top5"] >= result["top1"]


def test_callable_data_source(digits):
  (x, y), test, mean, std = digits
  # The teacher fixture's model and augmentation: the cached, compiled steps are reused.
  model = get_model(_MODEL["name"], _MODEL["num_classes"], width=_MODEL["width"])
  config = TeacherOptions(epochs=1, batch_size=64, learning_rate=0.05, max_steps_per_epoch=3,
                         max_eval_batches=1, eval_batch_size=64, crop_padding=1, flip=False)
  source = lambda epoch: array_batches(x, y, 64, shuffle=True, seed=epoch, drop_remainder=True)
  with pytest.raises(ConfigError, match="steps_per_epoch"):
    train_teacher(model, source, test, config, mean=mean, std=std, progress=False)
  start = init_model(model, jax.random.key(5), (8, 8, 1))
  variables = train_teacher(model, source, None, config, mean=mean, std=std, steps_per_epoch=28,
                            variables=start, progress=False)
  assert set(variables) == {"params", "batch_stats"}
  assert isinstance(jax.tree.leaves(variables)[0], np.ndarray)
  # The step donates its state; the caller's starting variables must survive that.
  assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(start))
  assert not np.array_equal(variables["params"]["fc"]["kernel"], start["params"]["fc"]["kernel"])


def test_array_batches():
  x, y = np.arange(10)[:, None], np.arange(10)
  batches = list(array_batches(x, y, 4))
  assert [len(b[1]) for b in batches] == [4, 4, 2]
  shuffled = list(array_batches(x, y, 4, shuffle=True, seed=1, drop_remainder=True))
  assert [len(b[1]) for b in shuffled] == [4, 4]
  seen = np.concatenate([b[1] for b in shuffled])
  assert len(set(seen.tolist())) == 8
  np.testing.assert_array_equal(np.concatenate([b[0][:, 0] for b in shuffled]), seen)


def test_optimizer_schedule_and_weight_decay_mask():
  schedule = cosine_schedule(0.1, 100, warmup_steps=10)
  assert float(schedule(0)) == 0.0
  assert float(schedule(10)) == pytest.approx(0.1)
  assert float(schedule(100)) == pytest.approx(0.0, abs=1e-7)
  assert float(cosine_schedule(0.1, 100)(0)) == pytest.approx(0.1)
  params = {"kernel": jnp.ones((2, 2)), "bias": jnp.ones(2)}
  zero = jax.tree.map(jnp.zeros_like, params)
  for decay_all, bias_moves in [(True, True), (False, False)]:
    tx = make_optimizer(0.1, 10, weight_decay=0.5, decay_norm_and_bias=decay_all)
    updates, _ = tx.update(zero, tx.init(params), params)
    assert np.all(np.asarray(updates["kernel"]) < 0)
    assert np.any(np.asarray(updates["bias"]) != 0) == bias_moves
  with pytest.raises(ConfigError, match="label_smoothing"):
    TeacherOptions(label_smoothing=1.5)
  with pytest.raises(ConfigError, match="checkpoint_every"):
    TeacherOptions(checkpoint_every=0)


def test_augment_shapes_and_identity():
  x = jax.random.uniform(jax.random.key(0), (16, 8, 8, 3))
  key = jax.random.key(1)
  augment = jax.jit(teacher_lib.augment, static_argnames=("crop_padding", "flip", "resized_crop"))
  same = augment(key, x, crop_padding=0, flip=False)
  np.testing.assert_array_equal(same, x)
  flipped = augment(key, x, crop_padding=0, flip=True)
  is_flip = [bool(np.array_equal(flipped[i], x[i, :, ::-1])) for i in range(16)]
  is_same = [bool(np.array_equal(flipped[i], x[i])) for i in range(16)]
  assert all(a or b for a, b in zip(is_flip, is_same)) and any(is_flip) and any(is_same)
  cropped = augment(key, x, crop_padding=2, flip=False)
  assert cropped.shape == x.shape
  assert not np.array_equal(cropped, x)
  resized = augment(key, x, resized_crop=True)
  assert resized.shape == x.shape and np.all(np.isfinite(resized))


def test_train_state_holds_batch_stats():
  model = get_model("convnet_d3", 3, width=4)
  variables = {"params": {"w": jnp.ones(2)}, "batch_stats": {"m": jnp.zeros(2)}}
  state = create_train_state(model, variables, make_optimizer(0.1, 10))
  assert state.step == 0 and state.batch_stats == variables["batch_stats"]


def test_teacher_checkpoint_round_trip(teacher, tmp_path):
  model, variables, _ = teacher
  meta = {"model": "convnet_d3", "model_options": {"width": 32}, "num_classes": 10,
          "class_names": [str(i) for i in range(10)], "config": {"epochs": 8}}
  path = save_teacher(tmp_path / "teacher", variables, meta)
  loaded, loaded_meta = load_teacher(path)
  assert jax.tree.structure(loaded) == jax.tree.structure(variables)
  for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(variables)):
    assert a.dtype == b.dtype
    np.testing.assert_array_equal(a, b)
  assert {k: loaded_meta[k] for k in meta} == meta
  rebuilt = get_model(loaded_meta["model"], loaded_meta["num_classes"],
                      **loaded_meta["model_options"])
  assert rebuilt == model
  with pytest.raises(CheckpointError, match="overwrite=True"):
    save_teacher(path, variables, meta)
  save_teacher(path, variables, {**meta, "num_classes": 10, "note": "again"}, overwrite=True)
  assert load_teacher(path)[1]["note"] == "again"
  with pytest.raises(ConfigError, match="JSON"):
    save_teacher(tmp_path / "bad_meta", variables, {"x": object()})


# Orbax's background event loop may complain after a failed restore; harmless here.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_corrupt_or_missing_checkpoint_raises(teacher, tmp_path):
  _, variables, _ = teacher
  with pytest.raises(CheckpointError, match="does not exist"):
    load_teacher(tmp_path / "nowhere")
  (tmp_path / "empty").mkdir()
  with pytest.raises(CheckpointError, match="empty"):
    load_teacher(tmp_path / "empty")
  path = save_teacher(tmp_path / "teacher", variables, {"model": "convnet_d3"})
  # Truncate every array data file: the restore must fail loudly, naming the path.
  for root, _, files in os.walk(os.path.join(path, "variables")):
    for name in files:
      if os.path.basename(root) == "d":
        with open(os.path.join(root, name), "r+b") as f:
          f.truncate(3)
  with pytest.raises(CheckpointError, match="corrupt"):
    load_teacher(path)
  path = save_teacher(tmp_path / "teacher2", variables, {"model": "convnet_d3"})
  with open(os.path.join(path, "meta", "metadata"), "w") as f:
    f.write("{not json")
  with pytest.raises(CheckpointError, match="teacher2"):
    load_teacher(path)


def test_data_parallel_over_two_devices(tmp_path):
  """The same loop, unchanged, on 2 (fake CPU) devices: batches sharded, state replicated."""
  script = textwrap.dedent(f"""
      import sys, json
      sys.path.insert(0, {os.path.dirname(__file__)!r})
      import jax
      from test_teacher import _digits
      from wmdd_jax.models import get_model, init_model
      from wmdd_jax.teacher import TeacherOptions, train_teacher
      assert jax.local_device_count() == 2
      train, test, mean, std = _digits()
      config = TeacherOptions(epochs=6, batch_size=63, learning_rate=0.05, crop_padding=1,
                             flip=False, eval_every=6, eval_batch_size=101)
      train_teacher(get_model("convnet_d3", 10, width=16), train, test, config, mean=mean,
                    std=std, metrics_path={str(tmp_path / "m.jsonl")!r}, progress=False)
  """)
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
         "JAX_PLATFORMS": "cpu"}
  run = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                       timeout=300)
  assert run.returncode == 0, run.stderr[-3000:]
  last = json.loads((tmp_path / "m.jsonl").read_text().splitlines()[-1])
  # 63 is trimmed to 62 per step (a multiple of 2 devices); eval pads 101 -> 102 and masks.
  assert last["test_top1"] >= 80.0, last


# Short epochs (4 steps) with flips, crops and evaluations: every source of randomness and
# every record field takes part; checkpoints every 2 epochs, so a kill in epoch 3 loses one.
_RESUMABLE = TeacherOptions(epochs=5, batch_size=64, learning_rate=0.05, crop_padding=1,
                            flip=True, eval_every=2, eval_batch_size=128, max_eval_batches=1,
                            max_steps_per_epoch=4, checkpoint_every=2)


def _epoch_dirs(path):
  return sorted(int(d) for d in os.listdir(path) if d.isdigit())


@pytest.fixture(scope="module")
def execution():
  """One execution for the resumable runs, so they share its cached, compiled evaluation step."""
  return local_execution()


def _records(path):
  return [json.loads(line) for line in path.read_text().splitlines()]


def test_killed_teacher_resumes_bit_for_bit(digits, execution, tmp_path, monkeypatch):
  train, test, mean, std = digits
  model = get_model(_MODEL["name"], _MODEL["num_classes"], width=_MODEL["width"])
  run = lambda **kw: train_teacher(model, train, test, _RESUMABLE, mean=mean, std=std,
                                   progress=False, execution=execution, **kw)
  straight = run(metrics_path=tmp_path / "straight.jsonl")

  class Killed(teacher_lib.TeacherCheckpointer):
    def save(self, epoch, state):
      saved = super().save(epoch, state)
      if epoch == 3:  # killed after epoch 3's log line, whose checkpoint is not due
        raise KeyboardInterrupt
      return saved

  ckpt, log = tmp_path / "ckpt", tmp_path / "metrics.jsonl"
  monkeypatch.setattr(teacher_lib, "TeacherCheckpointer", Killed)
  with pytest.raises(KeyboardInterrupt):
    run(checkpoint_dir=ckpt, metrics_path=log)
  monkeypatch.undo()
  assert _epoch_dirs(ckpt) == [2]
  assert [r["epoch"] for r in _records(log)] == [1, 2, 3]
  with open(log, "a") as f:
    f.write('{"epoch": 4, "step": 1')  # a line the kill cut short
  resumed = run(checkpoint_dir=ckpt, metrics_path=log)

  assert jax.tree.structure(resumed) == jax.tree.structure(straight)
  for a, b in zip(jax.tree.leaves(resumed), jax.tree.leaves(straight)):
    np.testing.assert_array_equal(a, b)
  assert _epoch_dirs(ckpt) == [4, 5]  # every 2 epochs and the last, the newest 2 kept
  # One line per epoch, each as the uninterrupted run logged it (but for the timings).
  deterministic = lambda r: {k: v for k, v in r.items() if "seconds" not in k and "per_s" not in k}
  assert [deterministic(r) for r in _records(log)] == [
      deterministic(r) for r in _records(tmp_path / "straight.jsonl")]
  assert "test_top1" in _records(log)[3]

  # A finished run is not trained again (checkpoint_every may change: it does not shape weights).
  again = train_teacher(model, train, test, dataclasses.replace(_RESUMABLE, checkpoint_every=1),
                        mean=mean, std=std, progress=False, execution=execution,
                        checkpoint_dir=ckpt, metrics_path=log)
  for a, b in zip(jax.tree.leaves(again), jax.tree.leaves(straight)):
    np.testing.assert_array_equal(a, b)
  assert [r["epoch"] for r in _records(log)] == [1, 2, 3, 4, 5]


def test_mismatched_teacher_checkpoint_is_refused(digits, execution, tmp_path):
  train, _, mean, std = digits
  model = get_model(_MODEL["name"], _MODEL["num_classes"], width=_MODEL["width"])
  config = dataclasses.replace(_RESUMABLE, epochs=1, max_steps_per_epoch=1)
  ckpt = tmp_path / "ckpt"
  train_teacher(model, train, None, config, mean=mean, std=std, progress=False,
                execution=execution, checkpoint_dir=ckpt)
  assert _epoch_dirs(ckpt) == [1]
  cases = [
      (dict(config=dataclasses.replace(config, learning_rate=0.1)), "options.learning_rate"),
      (dict(config=dataclasses.replace(config, epochs=2)), "options.epochs is 1 there, 2 here"),
      (dict(model=get_model(_MODEL["name"], _MODEL["num_classes"], width=16)),
       "model.fields.width is 32 there, 16 here"),
      (dict(train=(train[0][:1000], train[1][:1000])), "data.num_examples is 1400 there"),
  ]
  for change, difference in cases:
    args = {"model": model, "train": train, "config": config, **change}
    with pytest.raises(CheckpointError, match=difference) as info:
      train_teacher(args["model"], args["train"], None, args["config"], mean=mean, std=std,
                    progress=False, execution=execution, checkpoint_dir=ckpt)
    assert f"Delete {ckpt}" in str(info.value)
  assert _epoch_dirs(ckpt) == [1]  # refused, not overwritten
