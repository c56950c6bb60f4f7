"""SyntheticSet and recover-state checkpoints: exact round trips, corruption, resume."""

import os

import jax
import numpy as np
import pytest

from tests.tiny_models import TinyNet, tiny_variables
from wmdd_jax import CheckpointError, ConfigError, ShapeError
from wmdd_jax.checkpoint import (
    RecoverCheckpointer,
    SyntheticSet,
    TeacherCheckpointer,
    export_image_folder,
    import_image_folder,
    load_synthetic_set,
    save_synthetic_set,
)
from wmdd_jax.recover import RecoverOptions, RecoverTargets, recover


def _synset(c=3, k=2, shape=(6, 5, 3), seed=0):
  rng = np.random.default_rng(seed)
  mean, std = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)
  pixels = rng.uniform(0, 1, size=(c, k, *shape)).astype(np.float32)
  images = (pixels - np.array(mean, np.float32)) / np.array(std, np.float32)
  weights = rng.dirichlet(np.ones(k), size=c).astype(np.float32)
  return SyntheticSet(images, np.repeat(np.arange(c), k).reshape(c, k), weights,
                      ["T-shirt/top", "b", "c"][:c], mean, std, {"method": "wmdd", "ipc": k})


def test_synthetic_set_round_trip_is_exact(tmp_path):
  s = _synset()
  save_synthetic_set(tmp_path / "set", s)
  r = load_synthetic_set(tmp_path / "set")
  np.testing.assert_array_equal(r.images, s.images)
  np.testing.assert_array_equal(r.labels, s.labels)
  np.testing.assert_array_equal(r.weights, s.weights)
  assert r.class_names == s.class_names and r.config == s.config
  assert r.mean == s.mean and r.std == s.std


def test_existing_set_is_not_overwritten(tmp_path):
  save_synthetic_set(tmp_path / "set", _synset(seed=0))
  with pytest.raises(CheckpointError, match="already exists"):
    save_synthetic_set(tmp_path / "set", _synset(seed=1))
  np.testing.assert_array_equal(load_synthetic_set(tmp_path / "set").images,
                                _synset(seed=0).images)


def test_corrupt_or_truncated_set_raises(tmp_path):
  save_synthetic_set(tmp_path / "set", _synset())
  # Truncate every array file Orbax wrote.
  for dirpath, _, files in os.walk(tmp_path / "set" / "arrays"):
    for name in files:
      path = os.path.join(dirpath, name)
      if os.path.getsize(path) > 16 and not name.endswith(".json"):
        with open(path, "r+b") as f:
          f.truncate(8)
  with pytest.raises(CheckpointError, match="truncated or corrupt"):
    load_synthetic_set(tmp_path / "set")
  with open(tmp_path / "set" / "meta.json", "w") as f:
    f.write("{not json")
  with pytest.raises(CheckpointError):
    load_synthetic_set(tmp_path / "set")
  with pytest.raises(CheckpointError, match="meta.json missing"):
    load_synthetic_set(tmp_path / "nothing")


def test_shape_errors():
  s = _synset()
  with pytest.raises(ShapeError):
    SyntheticSet(s.images[0], s.labels, s.weights, s.class_names, s.mean, s.std)
  with pytest.raises(ShapeError):
    SyntheticSet(s.images, s.labels, s.weights[:, :1], s.class_names, s.mean, s.std)


def test_png_export_import_round_trip(tmp_path):
  s = _synset()
  export_image_folder(tmp_path / "png", s)
  r = import_image_folder(tmp_path / "png")
  # Within 8-bit quantisation: half a grey level in pixel space, divided by std.
  tol = 0.5 / 255 / np.min(s.std) + 1e-6
  np.testing.assert_allclose(r.images, s.images, atol=tol)
  np.testing.assert_allclose(r.weights, s.weights, rtol=1e-6)
  assert r.class_names == s.class_names
  np.testing.assert_array_equal(r.labels, s.labels)


SHAPE = (8, 8, 2)


def _recover(tmp_path, iterations, ckpt_dir, stop_after=None):
  model = TinyNet(num_classes=3)
  variables = tiny_variables(model, SHAPE, seed=2)
  rng = np.random.default_rng(0)
  targets = RecoverTargets(
      np.abs(rng.normal(size=(3, 2, 4))).astype(np.float32),
      (rng.normal(size=(3, 2)).astype(np.float32), rng.normal(size=(3, 4)).astype(np.float32)),
      (np.ones((3, 2), np.float32), np.ones((3, 4), np.float32)),
      (np.zeros(2, np.float32), np.zeros(4, np.float32)),
      (np.ones(2, np.float32), np.ones(4, np.float32)))
  opts = RecoverOptions(iterations=iterations, steps_per_call=3, lr=0.1)

  class Stop(Exception):
    pass

  with RecoverCheckpointer(ckpt_dir, save_every=3, iterations=iterations) as ckpt:
    def on_block(chunk, state, metrics):
      ckpt.on_block(chunk, state, metrics)
      if stop_after is not None and int(state.step) >= stop_after:
        raise Stop()
    try:
      images, _ = recover(model, variables, targets, ipc=2, image_shape=SHAPE, mean=(0.5, 0.5),
                          std=(0.3, 0.3), options=opts, key=jax.random.key(4), class_chunk=2,
                          resume=ckpt.resume, on_block=on_block, progress=False)
    except Stop:
      return None
  return images


def test_interrupted_recover_resumes_bit_for_bit(tmp_path):
  straight = _recover(tmp_path, 9, tmp_path / "a")
  assert _recover(tmp_path, 9, tmp_path / "b", stop_after=6) is None  # killed after 6 steps
  resumed = _recover(tmp_path, 9, tmp_path / "b")
  np.testing.assert_allclose(resumed, straight, rtol=0, atol=1e-6)


def test_corrupt_recover_checkpoint_raises(tmp_path):
  _recover(tmp_path, 3, tmp_path / "c")
  for dirpath, _, files in os.walk(tmp_path / "c"):
    for name in files:
      path = os.path.join(dirpath, name)
      if os.path.getsize(path) > 16 and not name.endswith(".json"):
        with open(path, "r+b") as f:
          f.truncate(8)
  with pytest.raises(CheckpointError, match="corrupt or incompatible"):
    _recover(tmp_path, 3, tmp_path / "c")


def _epoch_dirs(path):
  return sorted(int(d) for d in os.listdir(path) if d.isdigit())


def test_teacher_checkpointer_cadence_keep_and_fingerprint(tmp_path):
  fresh = {"params": {"w": np.zeros((3, 2), np.float32)}, "step": np.zeros((), np.int32)}
  fingerprint = {"options": {"epochs": 5, "lr": 0.1}, "data": {"image_shape": (8, 8, 1)}}
  with TeacherCheckpointer(tmp_path / "t", fingerprint, save_every=2, last_epoch=5) as ckpt:
    assert ckpt.restore(fresh) == (fresh, 0)  # nothing saved yet: start from scratch
    saved = [ckpt.save(e, {"params": {"w": np.full((3, 2), e, np.float32)},
                           "step": np.full((), e, np.int32)}) for e in range(1, 6)]
  assert saved == [False, True, False, True, True]  # every 2 epochs and the last one
  assert _epoch_dirs(tmp_path / "t") == [4, 5]  # the newest 2 are kept
  # Tuples and lists are the same JSON: an equal fingerprint resumes.
  with TeacherCheckpointer(tmp_path / "t", fingerprint, save_every=1, last_epoch=5) as ckpt:
    state, epoch = ckpt.restore(fresh)
  assert epoch == 5 and int(state["step"]) == 5
  np.testing.assert_array_equal(state["params"]["w"], np.full((3, 2), 5, np.float32))
  other = {"options": {"epochs": 6, "lr": 0.1}, "data": {"image_shape": (8, 8, 1)}}
  with TeacherCheckpointer(tmp_path / "t", other, last_epoch=6) as ckpt:
    with pytest.raises(CheckpointError, match=r"options.epochs is 5 there, 6 here") as info:
      ckpt.restore(fresh)
  assert str(tmp_path / "t") in str(info.value) and "Delete" in str(info.value)
  assert _epoch_dirs(tmp_path / "t") == [4, 5]  # a refused checkpoint is left as it was
  with pytest.raises(ConfigError, match="checkpoint_every"):
    TeacherCheckpointer(tmp_path / "u", fingerprint, save_every=0, last_epoch=5)


def test_recover_checkpoint_is_not_a_teacher_checkpoint(tmp_path):
  _recover(tmp_path, 3, tmp_path / "r")
  fresh = {"params": {"w": np.zeros(2, np.float32)}}
  with TeacherCheckpointer(tmp_path / "r" / "chunk_0000", {}, last_epoch=1) as ckpt:
    with pytest.raises(CheckpointError, match="chunk_0000"):
      ckpt.restore(fresh)
