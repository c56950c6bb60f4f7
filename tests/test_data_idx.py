"""Tests of the idx: source on small IDX files written here, and on the real Fashion-MNIST."""

import gzip
import os

import numpy as np
import pytest

from wmdd_jax import ConfigError, DataError, DatasetNotFoundError
from wmdd_jax.data import NORMALIZATION, open_dataset

# The project's shared data folder sits next to the repository (see its README).
FASHION = os.path.normpath(
    os.path.join(os.path.dirname(__file__), "..", "..", "shared", "datasets", "fashion-mnist")
)


def _idx_bytes(array: np.ndarray, magic: int | None = None) -> bytes:
  array = np.asarray(array, np.uint8)
  if magic is None:
    magic = 0x0800 | array.ndim
  header = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in array.shape)
  return header + array.tobytes()


def _write(path, data: bytes) -> None:
  if str(path).endswith(".gz"):
    with gzip.open(path, "wb") as f:
      f.write(data)
  else:
    path.write_bytes(data)


def _make_idx_dir(root, n_train=7, n_test=4, gz=True, hw=(4, 3)):
  """Writes train-/t10k- images and labels; returns (images, labels) per split."""
  rng = np.random.default_rng(0)
  root.mkdir(parents=True, exist_ok=True)
  ext = ".gz" if gz else ""
  out = {}
  for split, prefix, n in (("train", "train", n_train), ("test", "t10k", n_test)):
    images = rng.integers(0, 256, (n, *hw), dtype=np.uint8)
    labels = rng.integers(0, 3, n, dtype=np.uint8)
    _write(root / f"{prefix}-images-idx3-ubyte{ext}", _idx_bytes(images))
    _write(root / f"{prefix}-labels-idx1-ubyte{ext}", _idx_bytes(labels))
    out[split] = (images, labels)
  return out


@pytest.mark.parametrize("gz", [True, False])
def test_idx_round_trip(tmp_path, gz):
  written = _make_idx_dir(tmp_path / "toy", gz=gz)
  ds = open_dataset(f"idx:{tmp_path / 'toy'}")
  assert ds.splits == ("train", "test")
  assert ds.image_shape == (4, 3, 1)
  for split, (images, labels) in written.items():
    x, y = ds.load_split(split)
    np.testing.assert_array_equal(x[..., 0], images)
    np.testing.assert_array_equal(y, labels)
  top = int(max(written["train"][1].max(), written["test"][1].max()))
  assert ds.class_names == [str(i) for i in range(top + 1)]
  # Shuffled reads of a memory-mapped file return the right images.
  x, y = next(ds.iter_batches("train", 7, shuffle=True, seed=2))
  order = [int(np.flatnonzero((written["train"][0] == im[..., 0]).all((1, 2)))[0]) for im in x]
  np.testing.assert_array_equal(y, written["train"][1][order])


def test_idx_train_only_and_dotted_names(tmp_path):
  root = tmp_path / "d"
  root.mkdir()
  _write(root / "train-images.idx3-ubyte", _idx_bytes(np.zeros((2, 2, 2))))
  _write(root / "train-labels.idx1-ubyte", _idx_bytes(np.array([0, 1])))
  ds = open_dataset(f"idx:{root}", class_names=["no", "yes"])
  assert ds.splits == ("train",) and ds.class_names == ["no", "yes"]


def test_idx_bad_magic_names_file_found_and_expected(tmp_path):
  _make_idx_dir(tmp_path / "m")
  bad = tmp_path / "m" / "train-labels-idx1-ubyte.gz"
  _write(bad, _idx_bytes(np.zeros(7), magic=0x00000802))
  with pytest.raises(DataError) as e:
    open_dataset(f"idx:{tmp_path / 'm'}")
  message = str(e.value)
  assert str(bad) in message and "0x00000802" in message and "0x00000801" in message


def test_idx_count_mismatch(tmp_path):
  _make_idx_dir(tmp_path / "c", gz=False)
  _write(tmp_path / "c" / "t10k-labels-idx1-ubyte", _idx_bytes(np.zeros(5)))
  with pytest.raises(DataError, match="4 images but .*5 labels"):
    open_dataset(f"idx:{tmp_path / 'c'}")


def test_idx_truncated_file(tmp_path):
  _make_idx_dir(tmp_path / "t", gz=False)
  path = tmp_path / "t" / "train-images-idx3-ubyte"
  path.write_bytes(path.read_bytes()[:-5])
  with pytest.raises(DataError, match="truncated"):
    open_dataset(f"idx:{tmp_path / 't'}")


def test_idx_missing_files(tmp_path):
  with pytest.raises(DatasetNotFoundError, match="does not exist"):
    open_dataset(f"idx:{tmp_path / 'nowhere'}")
  _make_idx_dir(tmp_path / "x")
  os.remove(tmp_path / "x" / "t10k-labels-idx1-ubyte.gz")
  with pytest.raises(DatasetNotFoundError, match="t10k-labels-idx1-ubyte"):
    open_dataset(f"idx:{tmp_path / 'x'}")


def test_idx_label_beyond_class_names(tmp_path):
  _make_idx_dir(tmp_path / "l")
  with pytest.raises(DataError, match="outside 0..1") as e:  # Refused at open time.
    open_dataset(f"idx:{tmp_path / 'l'}", class_names=["a", "b"])
  assert "train-labels-idx1-ubyte.gz holds labels 2 (" in str(e.value)


def test_idx_variant_from_name_and_option(tmp_path):
  _make_idx_dir(tmp_path / "fashion-mnist")
  ds = open_dataset(f"idx:{tmp_path / 'fashion-mnist'}")
  assert ds.class_names[0] == "T-shirt/top" and ds.num_classes == 10
  assert (ds.mean, ds.std) == NORMALIZATION["fashion_mnist"]
  ds = open_dataset(f"idx:{tmp_path / 'fashion-mnist'}", variant="mnist")
  assert ds.class_names == [str(i) for i in range(10)]
  assert (ds.mean, ds.std) == NORMALIZATION["mnist"]
  with pytest.raises(ConfigError, match="variant"):
    open_dataset(f"idx:{tmp_path / 'fashion-mnist'}", variant="kmnist")
  _make_idx_dir(tmp_path / "MNIST" / "raw")  # torchvision's layout: the parent names it.
  ds = open_dataset(f"idx:{tmp_path / 'MNIST' / 'raw'}")
  assert ds.class_names == [str(i) for i in range(10)] and ds.mean == NORMALIZATION["mnist"][0]


@pytest.mark.skipif(not os.path.isdir(FASHION), reason="real Fashion-MNIST not present")
def test_real_fashion_mnist():
  ds = open_dataset(f"idx:{FASHION}")
  assert ds.num_examples("train") == 60_000 and ds.num_examples("test") == 10_000
  assert ds.class_counts("train") == [6_000] * 10
  assert ds.class_counts("test") == [1_000] * 10
  assert ds.labels("train")[:10].tolist() == [9, 0, 0, 3, 0, 2, 7, 2, 5, 5]
  assert ds.class_names[9] == "Ankle boot" and ds.image_shape == (28, 28, 1)
  x = next(ds.iter_class("test", 1, 16))
  assert x.shape == (16, 28, 28, 1) and x.dtype == np.uint8 and x.max() > 200
