"""Tests of the loaders (wmdd_jax.data.loader): grain gives the sync reader's batches, in order.

Most tests read with ``worker_count=0`` (grain's threads in this process); two start worker
processes (1-2 workers: each start costs a few seconds on a loaded 2-core machine).
"""

import pickle

import numpy as np
import pytest
from PIL import Image

from wmdd_jax import ConfigError, DataError
from wmdd_jax.data import Dataset, EpochBatches, epoch_seed, open_dataset
from wmdd_jax.data import loader as loader_lib
from wmdd_jax.data.source import Source


def _tagged(n: int, hw=(4, 3)) -> np.ndarray:
  """u8[n, H, W, 1] whose first two pixels spell the index."""
  x = np.zeros((n, *hw, 1), np.uint8)
  x[:, 0, 0, 0] = np.arange(n) % 256
  x[:, 0, 1, 0] = np.arange(n) // 256
  return x


def _tags(images: np.ndarray) -> list[int]:
  return (images[:, 0, 0, 0].astype(int) + 256 * images[:, 0, 1, 0].astype(int)).tolist()


@pytest.fixture
def npz_path(tmp_path):
  """53 train images (classes 0, 1, 2) and 7 test images; pixel (0, 0..1) = the index."""
  y = np.random.default_rng(1).integers(0, 3, 53)
  path = tmp_path / "toy.npz"
  np.savez(path, x_train=_tagged(53), y_train=y, x_test=_tagged(7), y_test=np.arange(7) % 3)
  return str(path)


@pytest.fixture
def folder(tmp_path):
  """A PNG tree: train 3 classes x 7 images 6x5 (lossless, so pixels compare exactly)."""
  rng = np.random.default_rng(0)
  for c in ("ant", "bee", "cow"):
    (tmp_path / "imgs" / "train" / c).mkdir(parents=True)
    for i in range(7):
      Image.fromarray(rng.integers(0, 256, (6, 5, 3), dtype=np.uint8)).save(
          tmp_path / "imgs" / "train" / c / f"{i}.png")
  return str(tmp_path / "imgs")


def _same(a, b) -> None:
  a, b = list(a), list(b)
  assert len(a) == len(b)
  for (xa, ya), (xb, yb) in zip(a, b, strict=True):
    assert type(xa) is np.ndarray and type(xb) is np.ndarray
    assert xa.dtype == np.uint8 and ya.dtype == yb.dtype
    np.testing.assert_array_equal(xa, xb)
    np.testing.assert_array_equal(ya, yb)


# ------------------------------------------------------------------------------------- options


def test_default_loader_is_sync_and_options_are_checked(npz_path):
  ds = open_dataset(f"npz:{npz_path}")
  assert ds.loader_options == loader_lib.LoaderOptions()
  g = open_dataset(f"npz:{npz_path}", loader="grain", worker_count=0, prefetch=3)
  assert (g.loader_options.loader, g.loader_options.worker_count) == ("grain", 0)
  assert g.loader_options.prefetch == 3
  assert g.loader_options.read_threads == loader_lib.default_read_threads(0)
  assert ds.with_loader("grain").loader_options.worker_count == 0
  assert ds.with_loader("grain", worker_count=64).loader_options.read_threads == 1
  with pytest.raises(ConfigError, match=r"loader='bogus' is unknown.*'sync', 'grain'"):
    open_dataset(f"npz:{npz_path}", loader="bogus")
  with pytest.raises(ConfigError, match=r"tune loader='grain'.*add loader='grain'"):
    open_dataset(f"npz:{npz_path}", worker_count=2)
  for key, bad in (("worker_count", -1), ("prefetch", 0), ("read_threads", 1.5)):
    with pytest.raises(ConfigError, match=key):
      open_dataset(f"npz:{npz_path}", loader="grain", **{key: bad})
  with pytest.raises(ConfigError, match="unknown loader option"):
    ds.with_loader("grain", workers=2)


# --------------------------------------------------------------------- same batches as "sync"


@pytest.mark.parametrize("kwargs", [
    dict(),
    dict(shuffle=True, seed=7),
    dict(shuffle=True, seed=7, drop_remainder=True),
    dict(classes=[0, 2], shuffle=True, seed=1),
    dict(shuffle=True, seed=3, process_index=1, process_count=2),
    dict(shuffle=True, seed=3, drop_remainder=True, process_index=0, process_count=3),
])
def test_grain_pass_equals_sync(npz_path, kwargs):
  ds = open_dataset(f"npz:{npz_path}")
  g = ds.with_loader("grain", worker_count=0, read_threads=3, prefetch=2)
  _same(g.iter_batches("train", 8, **kwargs), ds.iter_batches("train", 8, **kwargs))


def test_grain_checks_arguments_at_the_call(npz_path):
  g = open_dataset(f"npz:{npz_path}", loader="grain", worker_count=0)
  with pytest.raises(ConfigError, match="batch_size"):
    g.iter_batches("train", 0)
  with pytest.raises(ConfigError, match="process_index"):
    g.epochs("train", 4, process_index=2, process_count=2)


def test_load_split_and_mean_through_grain(npz_path):
  ds = open_dataset(f"npz:{npz_path}", normalization="computed")
  g = ds.with_loader("grain", worker_count=0)
  for a, b in zip(g.load_split("train"), ds.load_split("train"), strict=True):
    np.testing.assert_array_equal(a, b)
  assert g._computed_mean_std() == ds._computed_mean_std()


def test_epochs_equal_sync_in_any_order(npz_path):
  ds = open_dataset(f"npz:{npz_path}")
  sync = ds.epochs("train", 8, seed=5)
  grain = ds.with_loader("grain", worker_count=0).epochs("train", 8, seed=5)
  assert isinstance(grain, EpochBatches)
  assert sync.steps_per_epoch == grain.steps_per_epoch == 53 // 8
  # Epoch e is iter_batches with epoch_seed(seed, e): the teacher's in-memory rule.
  _same(sync(2), ds.iter_batches("train", 8, shuffle=True, seed=epoch_seed(5, 2),
                                 drop_remainder=True))
  with grain:
    for epoch in (0, 1, 2, 4, 3):  # In turn, skipping ahead, then back (a resumed run).
      _same(grain(epoch), sync(epoch))
    partial = grain(5)
    next(partial)  # Left unfinished: the next epoch restarts where it belongs.
    _same(grain(6), sync(6))
    _same(partial, [])  # A later epoch was asked for: the old one is over.
  assert grain._grain is None  # Closed by the context manager.


def test_epoch_examples_are_the_split_and_shards_split_it(npz_path):
  ds = open_dataset(f"npz:{npz_path}", loader="grain", worker_count=0)
  whole = sorted(_tags(ds.load_split("train")[0]))
  for epoch in (0, 1):
    shards = []
    for p in range(2):
      stream = ds.epochs("train", 5, seed=9, drop_remainder=False, process_index=p,
                         process_count=2)
      shards.append([t for x, _ in stream(epoch) for t in _tags(x)])
    assert not set(shards[0]) & set(shards[1])
    assert sorted(shards[0] + shards[1]) == whole
    assert abs(len(shards[0]) - len(shards[1])) <= 1
  # drop_remainder: equal whole batches on every process.
  sizes = [ds.epochs("train", 5, seed=9, process_index=p, process_count=2).steps_per_epoch
           for p in range(2)]
  assert sizes == [53 // 10] * 2


def test_grain_is_deterministic_across_instances(npz_path):
  ds = open_dataset(f"npz:{npz_path}", loader="grain", worker_count=0, read_threads=4)
  a = ds.epochs("train", 6, seed=11)
  b = ds.epochs("train", 6, seed=11)
  _same(a(1), b(1))
  other = [_tags(x) for x, _ in ds.epochs("train", 6, seed=12)(1)]
  assert other != [_tags(x) for x, _ in a(1)]


# -------------------------------------------------------------- sources without random access


class _StreamOnly(Source):
  """Two splits of tagged images readable only in order (like tfds: with reader='tf')."""

  random_access = False

  def __init__(self, n=23):
    super().__init__("stream:toy")
    self._x, self._y = _tagged(n), np.arange(n) % 2

  splits = ("train",)
  class_names = ["a", "b"]
  native_shape = (4, 3, 1)

  def labels(self, split):
    return self._y

  def stream(self, split):
    if split == "broken":
      raise OSError("disk on fire")
    yield from self._x


def test_stream_sources_prefetch_in_a_thread():
  ds = Dataset(_StreamOnly())
  g = ds.with_loader("grain", prefetch=3)
  for kwargs in (dict(), dict(shuffle=True, seed=2), dict(process_index=1, process_count=2)):
    _same(g.iter_batches("train", 4, **kwargs), ds.iter_batches("train", 4, **kwargs))
  _same(g.epochs("train", 4, seed=1)(3), ds.epochs("train", 4, seed=1)(3))


def test_thread_prefetch_reraises_and_stops():
  def make():
    yield 1
    raise DataError("cannot decode image x.png; replace it")

  it = loader_lib.thread_prefetch(make, 2)
  assert next(it) == 1
  with pytest.raises(DataError, match="x.png"):
    next(it)
  endless = loader_lib.thread_prefetch(lambda: iter(range(10**9)), 2)
  assert next(endless) == 0
  endless.close()  # Stops the thread (it would block on a full queue otherwise).


# -------------------------------------------------------------------- pickling, worker processes


def test_folder_source_pickles_without_its_threads(folder):
  ds = open_dataset(f"folder:{folder}")
  list(ds.iter_batches("train", 4))  # Starts the decoding thread pool.
  copy = pickle.loads(pickle.dumps(ds._reading_copy()))
  assert copy._source._num_workers == 1 and copy._source._pool is None
  assert ds._source._num_workers >= 1  # The original keeps its own.
  _same(copy.iter_batches("train", 4), ds.iter_batches("train", 4))


@pytest.mark.slow  # starts worker processes: 5-12 s on the loaded 2-core machine
def test_grain_worker_processes_read_a_folder_in_order(folder):
  ds = open_dataset(f"folder:{folder}")
  g = ds.with_loader("grain", worker_count=2, prefetch=1)
  sync = ds.epochs("train", 4, seed=2)
  with g.epochs("train", 4, seed=2) as grain:
    for epoch in (0, 1, 2):
      _same(grain(epoch), sync(epoch))
    # One pipeline serves every epoch in turn: the workers started once.
    assert grain._grain is not None and grain._grain.position == 3 * grain.steps_per_epoch


@pytest.mark.slow  # starts worker processes: 5-12 s on the loaded 2-core machine
def test_a_corrupt_file_in_a_worker_names_the_file(folder):
  import os

  bad = os.path.join(folder, "train", "bee", "3.png")
  with open(bad, "wb") as f:
    f.write(b"not an image")
  ds = open_dataset(f"folder:{folder}", loader="grain", worker_count=1)
  with pytest.raises(DataError, match=r"3\.png"):
    list(ds.iter_batches("train", 5))


# ------------------------------------------------------------------------- the teacher's loop


def test_teacher_trains_from_grain_epochs(npz_path):
  from tests.tiny_models import TinyNet
  from wmdd_jax.teacher import TeacherOptions, train_teacher

  ds = open_dataset(f"npz:{npz_path}", normalization=((0.2,), (0.3,)))
  config = TeacherOptions(epochs=2, batch_size=8, learning_rate=0.05, crop_padding=1,
                          flip=False, seed=4)
  stream = ds.with_loader("grain", worker_count=0).epochs("train", 8, seed=config.seed)
  seen = []

  def train(epoch):  # What the teacher reads, recorded.
    for images, labels in stream(epoch):
      seen.append((epoch, _tags(images), labels.tolist()))
      yield images, labels

  variables = train_teacher(TinyNet(num_classes=3), train, None, config, mean=ds.mean,
                            std=ds.std, steps_per_epoch=stream.steps_per_epoch,
                            image_shape=ds.image_shape, progress=False)
  assert all(np.all(np.isfinite(np.asarray(v))) for v in _flat(variables).values())
  sync = ds.epochs("train", 8, seed=config.seed)
  assert seen == [(e, _tags(x), y.tolist()) for e in (0, 1) for x, y in sync(e)]


def _flat(tree, prefix=""):
  if isinstance(tree, dict):
    out = {}
    for k, v in tree.items():
      out.update(_flat(v, f"{prefix}/{k}"))
    return out
  return {prefix: np.asarray(tree)}
