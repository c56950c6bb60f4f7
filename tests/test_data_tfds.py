"""Tests of the tfds: source: on tfds.testing.mock_data and on a tiny builder prepared here."""

import shutil
import tempfile

import numpy as np
import pytest

tfds = pytest.importorskip("tensorflow_datasets")

from wmdd_jax import ConfigError, DataError, DatasetNotFoundError  # noqa: E402
from wmdd_jax.data import NORMALIZATION, open_dataset  # noqa: E402


class WmddTinyShapes(tfds.core.GeneratorBasedBuilder):
  """12 train / 6 test images of 6x5x3; image i is filled with i and labelled i % 3."""

  # A one-part module name keeps TFDS from resolving the builder's source file through the
  # importlib_resources backport, which this venv lacks (and the test does not need).
  __module__ = "wmdd_test_builders"
  VERSION = tfds.core.Version("1.0.0")

  def _info(self):
    return tfds.core.DatasetInfo(
        builder=self,
        features=tfds.features.FeaturesDict(
            {
                "image": tfds.features.Image(shape=(6, 5, 3)),
                "label": tfds.features.ClassLabel(names=["a", "b", "c"]),
            }
        ),
        supervised_keys=("image", "label"),
    )

  def _split_generators(self, dl_manager):
    del dl_manager
    return {"train": self._generate_examples(12), "test": self._generate_examples(6)}

  def _generate_examples(self, n):
    for i in range(n):
      yield i, {"image": np.full((6, 5, 3), i, np.uint8), "label": i % 3}


@pytest.fixture(autouse=True)
def _contain_tfds_temp_dirs(tmp_path, monkeypatch):
  # TFDS makes (and never removes) an empty temp dir each time it builds the info of a dataset
  # that is not prepared, mock_data included; keep those inside pytest's tmp_path.
  monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))


def _prepare(data_dir, file_format):
  builder = WmddTinyShapes(data_dir=str(data_dir), file_format=file_format)
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(try_download_gcs=False)
  )
  return str(data_dir)


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
  """The tiny dataset prepared as array_record (random access) and as TFRecord (streamed)."""
  with pytest.MonkeyPatch.context() as patch:  # See _contain_tfds_temp_dirs.
    patch.setattr(tempfile, "tempdir", str(tmp_path_factory.mktemp("tfds_tmp")))
    return {
        fmt: _prepare(tmp_path_factory.mktemp(fmt), fmt) for fmt in ("array_record", "tfrecord")
    }


def _check_tiny(ds):
  assert ds.num_classes == 3 and ds.class_names == ["a", "b", "c"]
  assert ds.image_shape == (6, 5, 3)
  assert ds.splits == ("train", "test")
  assert ds.class_counts("train") == [4, 4, 4] and ds.class_counts("test") == [2, 2, 2]
  x, y = ds.load_split("train")
  ids = x[:, 0, 0, 0].astype(int)
  assert sorted(ids.tolist()) == list(range(12))
  np.testing.assert_array_equal(y, ids % 3)  # Labels and images agree.
  assert np.all(x == x[:, :1, :1, :1])


def test_tiny_array_record_reads_by_index(tiny_dirs):
  ds = open_dataset("tfds:wmdd_tiny_shapes", data_dir=tiny_dirs["array_record"])
  assert ds._source.random_access
  _check_tiny(ds)
  x, y = next(ds.iter_batches("train", 12, shuffle=True, seed=1, classes=[2]))
  np.testing.assert_array_equal(x[:, 0, 0, 0] % 3, y)
  assert y.tolist() == [2] * 4


def test_tiny_array_record_through_grain_and_pickle(tiny_dirs):
  import pickle

  ds = open_dataset("tfds:wmdd_tiny_shapes", data_dir=tiny_dirs["array_record"])
  grain = ds.with_loader("grain", worker_count=0, read_threads=2)
  for kwargs in (dict(), dict(shuffle=True, seed=4, process_index=1, process_count=2)):
    ref = list(ds.iter_batches("train", 5, **kwargs))
    got = list(grain.iter_batches("train", 5, **kwargs))
    assert len(ref) == len(got)
    for (xa, ya), (xb, yb) in zip(ref, got, strict=True):
      np.testing.assert_array_equal(xa, xb)
      np.testing.assert_array_equal(ya, yb)
  # Grain's worker processes get the source pickled: by name and data_dir, no open readers.
  copy = pickle.loads(pickle.dumps(ds._reading_copy()))
  x, y = copy.load_split("train")
  np.testing.assert_array_equal(x, ds.load_split("train")[0])
  np.testing.assert_array_equal(y, ds.labels("train"))


def test_tiny_tfrecord_through_grain_is_the_stream_read_ahead(tiny_dirs):
  ds = open_dataset("tfds:wmdd_tiny_shapes", data_dir=tiny_dirs["tfrecord"], shuffle_buffer=5)
  grain = ds.with_loader("grain", prefetch=2)
  ref = list(ds.epochs("train", 4, seed=2)(1))
  got = list(grain.epochs("train", 4, seed=2)(1))
  assert [x[:, 0, 0, 0].tolist() for x, _ in got] == [x[:, 0, 0, 0].tolist() for x, _ in ref]


def test_tiny_tfrecord_falls_back_to_tf_data(tiny_dirs):
  ds = open_dataset("tfds:wmdd_tiny_shapes", data_dir=tiny_dirs["tfrecord"], shuffle_buffer=5)
  assert not ds._source.random_access
  _check_tiny(ds)

  def order(seed, p=0, n=1):
    batches = ds.iter_batches("train", 4, shuffle=True, seed=seed, process_index=p, process_count=n)
    return np.concatenate([x[:, 0, 0, 0] for x, _ in batches]).tolist()

  assert order(0) == order(0) and sorted(order(0)) == list(range(12))
  shards = [order(3, p, 2) for p in range(2)]
  assert sorted(shards[0] + shards[1]) == list(range(12)) and len(shards[0]) == 6
  val = open_dataset("tfds:wmdd_tiny_shapes", data_dir=tiny_dirs["tfrecord"], val_fraction=0.25)
  assert val.class_counts("val") == [1, 1, 1]
  xv, yv = val.load_split("val")
  np.testing.assert_array_equal(xv[:, 0, 0, 0] % 3, yv)


@pytest.mark.parametrize("damage", ["garble", "truncate", "delete"])
def test_damaged_array_record_is_a_data_error(tiny_dirs, tmp_path, damage):
  data_dir = tmp_path / "copy"
  shutil.copytree(tiny_dirs["array_record"], data_dir)
  (path,) = data_dir.rglob("*-train.array_record-*")
  data = path.read_bytes()
  if damage == "garble":
    path.write_bytes(data[:64] + np.random.default_rng(0).bytes(len(data) - 64))
  elif damage == "truncate":
    path.write_bytes(data[: len(data) // 2])
  else:
    path.unlink()
  with pytest.raises(DataError) as e:
    open_dataset("tfds:wmdd_tiny_shapes", data_dir=str(data_dir)).load_split("train")
  message = str(e.value)
  assert str(data_dir) in message and "'train'" in message and "prepare it again" in message


def test_not_prepared_names_data_dir_and_fix(tmp_path):
  with pytest.raises(DatasetNotFoundError) as e:
    open_dataset("tfds:wmdd_tiny_shapes", data_dir=str(tmp_path))
  message = str(e.value)
  assert str(tmp_path) in message and "download=True" in message and "tfds build" in message
  with pytest.raises(DatasetNotFoundError):
    open_dataset("tfds:wmdd_tiny_shapes", data_dir=str(tmp_path), reader="tf")


def test_unknown_tfds_name():
  with pytest.raises(DatasetNotFoundError, match="no dataset named 'no_such_dataset_xyz'"):
    open_dataset("tfds:no_such_dataset_xyz")


def test_bad_reader_option(tiny_dirs):
  with pytest.raises(ConfigError, match="reader"):
    open_dataset("tfds:wmdd_tiny_shapes", data_dir=tiny_dirs["array_record"], reader="fast")


def test_mock_mnist():
  with tfds.testing.mock_data(num_examples=20):
    ds = open_dataset("tfds:mnist")
    assert ds.num_classes == 10 and ds.image_shape == (28, 28, 1)
    assert "train" in ds.splits and "test" in ds.splits
    assert sum(ds.class_counts("train")) == 20
    assert (ds.mean, ds.std) == NORMALIZATION["mnist"]
    batches = list(ds.iter_batches("train", 8))
    assert [len(y) for _, y in batches] == [8, 8, 4]
    assert batches[0][0].dtype == np.uint8 and batches[0][0].shape == (8, 28, 28, 1)
    np.testing.assert_array_equal(np.concatenate([y for _, y in batches]), ds.labels("train"))
    first = ds.labels("train")[0]
    assert next(ds.iter_class("train", int(first), 1)).shape == (1, 28, 28, 1)


def test_mock_cifar10_with_resize():
  with tfds.testing.mock_data(num_examples=6):
    ds = open_dataset("tfds:cifar10", resize=(16, 16))
    assert ds.image_shape == (16, 16, 3)
    assert ds.mean == NORMALIZATION["cifar10"][0]
    x, _ = ds.load_split("test")
    assert x.shape == (6, 16, 16, 3)
