"""Tests of open_dataset's shared behaviour (specs, batching, sharding, val, normalisation),
and of the npz: and digits sources."""

import numpy as np
import pytest

from wmdd_jax import ConfigError, DataError, DatasetNotFoundError, WMDDError
from wmdd_jax.data import NORMALIZATION, Dataset, open_dataset


def _tagged_images(n: int, hw=(4, 3), ch=1) -> np.ndarray:
  """u8[n, H, W, ch] whose first two pixels spell the index, so an image names its position."""
  x = np.zeros((n, *hw, ch), np.uint8)
  x[:, 0, 0, 0] = np.arange(n) % 256
  x[:, 0, 1, 0] = np.arange(n) // 256
  return x


def _tag(images: np.ndarray) -> np.ndarray:
  return images[:, 0, 0, 0].astype(int) + 256 * images[:, 0, 1, 0].astype(int)


@pytest.fixture
def npz_path(tmp_path):
  """30 train images (classes 0, 1, 2 with 12, 10, 8 examples) and 9 test images."""
  y_train = np.repeat([0, 1, 2], [12, 10, 8])[np.random.default_rng(1).permutation(30)]
  y_test = np.array([0, 1, 2] * 3)
  path = tmp_path / "toy.npz"
  np.savez(
      path,
      x_train=_tagged_images(30),
      y_train=y_train,
      x_test=_tagged_images(9),
      y_test=y_test,
      class_names=np.array(["zero", "one", "two"]),
  )
  return str(path)


# -------------------------------------------------------------------------------- specs, options


@pytest.mark.parametrize("spec", ["cifar10", "tfds:", "csv:/tmp/x", "digits:extra", ""])
def test_bad_spec_lists_the_valid_forms(spec):
  with pytest.raises(ConfigError) as e:
    open_dataset(spec)
  if "digits:" not in spec:
    for form in ("tfds:", "folder:", "idx:", "npz:", "digits"):
      assert form in str(e.value)


def test_unknown_option_is_named():
  with pytest.raises(ConfigError, match="colour_mode"):
    open_dataset("digits", colour_mode="rgb")


def test_a_new_source_is_one_registry_entry():
  """Registering a SourceKind is all the spec parser, options check and errors need."""
  from wmdd_jax.data import SOURCES, SourceKind, register_source
  from wmdd_jax.data.arrays import ArraySource

  def open_toy(spec, arg, seed, *, scale=1):
    x = _tagged_images(6) * int(scale)
    return ArraySource(spec, {"train": (x, np.arange(6) % 2)}, ["even", "odd"])

  kind = SourceKind("toy", "toy:<anything>  (six test images)", ("scale",), open_toy)
  register_source(kind)
  try:
    ds = open_dataset("toy:x", scale=1, val_fraction=0.3)
    assert ds.class_names == ["even", "odd"] and ds.class_counts("val") == [1, 1]
    with pytest.raises(ConfigError, match="'scale'"):
      open_dataset("toy:x", colour_mode="rgb")
    with pytest.raises(ConfigError, match="toy:<anything>"):
      open_dataset("nope:x")
    with pytest.raises(ConfigError, match="already registered"):
      register_source(SourceKind("toy", "toy:<other>", (), lambda spec, arg, seed: None))
    with pytest.raises(ConfigError, match="common option"):
      register_source(SourceKind("toy2", "toy2:<x>", ("resize",), open_toy))
  finally:
    SOURCES.pop("toy", None)
  assert list(SOURCES) == ["tfds", "folder", "idx", "npz", "digits"]


def test_errors_belong_to_the_wmdd_family(tmp_path):
  with pytest.raises(DatasetNotFoundError) as e:
    open_dataset(f"npz:{tmp_path / 'absent.npz'}")
  assert isinstance(e.value, WMDDError) and isinstance(e.value, FileNotFoundError)
  assert "np.savez" in str(e.value)


# ------------------------------------------------------------------------------------ npz source


def test_npz_metadata(npz_path):
  ds = open_dataset(f"npz:{npz_path}")
  assert isinstance(ds, Dataset)
  assert ds.spec == f"npz:{npz_path}"
  assert ds.num_classes == 3 and ds.class_names == ["zero", "one", "two"]
  assert ds.image_shape == (4, 3, 1)
  assert ds.splits == ("train", "test")
  assert ds.class_counts("train") == [12, 10, 8]
  assert ds.class_counts("test") == [3, 3, 3]
  assert ds.num_examples("train") == 30


def test_npz_load_split_is_in_index_order(npz_path):
  ds = open_dataset(f"npz:{npz_path}")
  x, y = ds.load_split("train")
  assert x.dtype == np.uint8 and y.dtype == np.int32 and x.shape == (30, 4, 3, 1)
  np.testing.assert_array_equal(_tag(x), np.arange(30))
  np.testing.assert_array_equal(y, ds.labels("train"))
  x1, y1 = ds.load_split("train", classes=[1])
  assert len(x1) == 10 and set(y1.tolist()) == {1}


def test_npz_float_images_and_keras_labels(tmp_path):
  x = np.linspace(0, 1, 2 * 3 * 3 * 3).reshape(2, 3, 3, 3).astype(np.float32)
  np.savez(tmp_path / "f.npz", x_train=x, y_train=np.array([[0], [1]]))
  ds = open_dataset(f"npz:{tmp_path / 'f.npz'}")
  images, labels = ds.load_split("train")
  np.testing.assert_array_equal(images, np.round(x * 255).astype(np.uint8))
  np.testing.assert_array_equal(labels, [0, 1])
  assert ds.splits == ("train",) and ds.class_names == ["0", "1"]


@pytest.mark.parametrize(
    "arrays,match",
    [
        ({"x_train": np.full((2, 3, 3), 1.5), "y_train": np.zeros(2)}, "outside \\[0, 1\\]"),
        ({"x_train": np.zeros((2, 3, 3), np.uint8), "y_train": np.zeros(3)}, "3 labels"),
        ({"x_test": np.zeros((2, 3, 3), np.uint8), "y_test": np.zeros(2)}, "x_train"),
        ({"x_train": np.zeros((2, 3), np.uint8), "y_train": np.zeros(2)}, "\\[N, H, W\\]"),
        ({"x_train": np.zeros((2, 3, 3), np.uint8)}, "y_train"),
    ],
)
def test_npz_bad_contents(tmp_path, arrays, match):
  np.savez(tmp_path / "bad.npz", **arrays)
  with pytest.raises(DataError, match=match):
    open_dataset(f"npz:{tmp_path / 'bad.npz'}")


def test_label_out_of_range_names_the_example(tmp_path):
  np.savez(
      tmp_path / "l.npz",
      x_train=np.zeros((3, 2, 2), np.uint8),
      y_train=np.array([0, 1, 5]),
      class_names=np.array(["a", "b"]),
  )
  with pytest.raises(DataError, match="label 5 of example 2 of x_train"):
    open_dataset(f"npz:{tmp_path / 'l.npz'}").class_counts("train")
  with pytest.raises(DataError, match="outside 0..1"):
    open_dataset(f"npz:{tmp_path / 'l.npz'}").load_split("train")


def test_missing_split_lists_the_splits(npz_path):
  ds = open_dataset(f"npz:{npz_path}")
  with pytest.raises(DatasetNotFoundError, match="'train', 'test'.*val_fraction"):
    ds.iter_batches("val", 4)  # Raised at the call, not at the first batch.


# ---------------------------------------------------------------------------------- iteration


def test_iter_batches_order_shapes_and_remainder(npz_path):
  ds = open_dataset(f"npz:{npz_path}")
  batches = list(ds.iter_batches("train", 8))
  assert [len(y) for _, y in batches] == [8, 8, 8, 6]
  for x, y in batches:
    assert x.dtype == np.uint8 and x.shape[1:] == (4, 3, 1) and y.dtype == np.int32
  np.testing.assert_array_equal(np.concatenate([_tag(x) for x, _ in batches]), np.arange(30))
  assert [len(y) for _, y in ds.iter_batches("train", 8, drop_remainder=True)] == [8, 8, 8]


def test_shuffle_is_seeded(npz_path):
  ds = open_dataset(f"npz:{npz_path}")

  def order(seed):
    batches = ds.iter_batches("train", 7, shuffle=True, seed=seed)
    return np.concatenate([_tag(x) for x, _ in batches])

  a, b, c = order(3), order(3), order(4)
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c)
  assert sorted(a.tolist()) == list(range(30))
  # Labels travel with their images.
  x, y = next(ds.iter_batches("train", 30, shuffle=True, seed=3))
  np.testing.assert_array_equal(y, ds.labels("train")[_tag(x)])


def test_classes_filter_and_iter_class(npz_path):
  ds = open_dataset(f"npz:{npz_path}")
  labels = ds.labels("train")
  got = [y for _, y in ds.iter_batches("train", 4, classes=[0, 2])]
  assert sorted(np.concatenate(got).tolist()) == sorted(labels[labels != 1].tolist())
  images = list(ds.iter_class("train", 2, 3))
  assert [len(x) for x in images] == [3, 3, 2]
  tags = np.concatenate([_tag(x) for x in images])
  np.testing.assert_array_equal(tags, np.flatnonzero(labels == 2))
  with pytest.raises(ConfigError, match="classes \\[3\\]"):
    ds.iter_class("train", 3, 4)


@pytest.mark.parametrize("shuffle", [False, True])
def test_process_shards_are_disjoint_and_cover(npz_path, shuffle):
  ds = open_dataset(f"npz:{npz_path}")
  shards = [
      np.concatenate(
          [_tag(x) for x, _ in ds.iter_batches("train", 4, shuffle=shuffle, seed=1,
                                               process_index=p, process_count=3)]
      )
      for p in range(3)
  ]
  assert sorted(np.concatenate(shards).tolist()) == list(range(30))
  assert [len(s) for s in shards] == [10, 10, 10]
  # drop_remainder: the same number of full batches on every process.
  counts = [
      [len(y) for _, y in ds.iter_batches("train", 4, drop_remainder=True, process_index=p,
                                          process_count=3)]
      for p in range(3)
  ]
  assert counts == [[4, 4]] * 3
  with pytest.raises(ConfigError, match="process_index"):
    ds.iter_batches("train", 4, process_index=3, process_count=3)


def test_bad_batch_size(npz_path):
  with pytest.raises(ConfigError, match="batch_size"):
    open_dataset(f"npz:{npz_path}").iter_batches("train", 0)


def test_val_fraction_is_a_stratified_seeded_holdout(npz_path):
  ds = open_dataset(f"npz:{npz_path}", val_fraction=0.25)
  assert ds.splits == ("train", "test", "val")
  train, _ = ds.load_split("train")
  val, val_y = ds.load_split("val")
  tags_train, tags_val = set(_tag(train).tolist()), set(_tag(val).tolist())
  assert not tags_train & tags_val and len(tags_train | tags_val) == 30
  assert ds.class_counts("val") == [3, 2, 2]  # round(12 / 4), round(10 / 4), round(8 / 4)
  assert ds.class_counts("train") == [9, 8, 6]
  np.testing.assert_array_equal(val_y, open_dataset(f"npz:{npz_path}").labels("train")[_tag(val)])
  same = open_dataset(f"npz:{npz_path}", val_fraction=0.25)
  np.testing.assert_array_equal(_tag(same.load_split("val")[0]), _tag(val))
  other = open_dataset(f"npz:{npz_path}", val_fraction=0.25, seed=1)
  assert not np.array_equal(_tag(other.load_split("val")[0]), _tag(val))
  with pytest.raises(ConfigError, match="val_fraction"):
    open_dataset(f"npz:{npz_path}", val_fraction=1.0)


def test_load_split_refuses_huge_splits(npz_path):
  ds = open_dataset(f"npz:{npz_path}", load_split_max_bytes=100)
  with pytest.raises(ConfigError, match="iter_batches"):
    ds.load_split("train")


# ------------------------------------------------------------------------------ normalisation


def test_computed_mean_std_matches_numpy(npz_path):
  ds = open_dataset(f"npz:{npz_path}")
  x = ds.load_split("train")[0].astype(np.float64) / 255
  np.testing.assert_allclose(ds.mean, [x.mean()], rtol=1e-9)
  np.testing.assert_allclose(ds.std, [x.std()], rtol=1e-9)


def test_published_normalization_by_name(tmp_path):
  np.savez(tmp_path / "cifar10.npz", x_train=np.zeros((2, 3, 3, 3), np.uint8), y_train=[0, 1])
  ds = open_dataset(f"npz:{tmp_path / 'cifar10.npz'}")
  assert (ds.mean, ds.std) == NORMALIZATION["cifar10"]
  ds = open_dataset(f"npz:{tmp_path / 'cifar10.npz'}", normalization="imagenet")
  assert ds.mean == (0.485, 0.456, 0.406)
  ds = open_dataset(f"npz:{tmp_path / 'cifar10.npz'}", normalization=((0.5,), (0.25,)))
  assert ds.mean == (0.5,) * 3 and ds.std == (0.25,) * 3  # A grey constant repeated per channel.
  with pytest.raises(ConfigError, match="normalization"):
    _ = open_dataset(f"npz:{tmp_path / 'cifar10.npz'}", normalization="cifar11").mean
  with pytest.raises(ConfigError, match="2 means"):
    _ = open_dataset(f"npz:{tmp_path / 'cifar10.npz'}", normalization=((0, 0), (1, 1))).std


# -------------------------------------------------------------------------------------- digits


def test_digits_counts_and_pixels():
  ds = open_dataset("digits")
  assert ds.image_shape == (8, 8, 1) and ds.num_classes == 10
  assert ds.class_names == [str(i) for i in range(10)]
  train, test = ds.class_counts("train"), ds.class_counts("test")
  assert sum(train) + sum(test) == 1797
  from sklearn.datasets import load_digits

  full = np.bincount(load_digits().target, minlength=10)
  np.testing.assert_array_equal(np.add(train, test), full)
  # Stratified: every class gives round(25 %) of its examples to test.
  np.testing.assert_array_equal(test, np.round(full * 0.25).astype(int))
  x, _ = ds.load_split("train")
  assert x.dtype == np.uint8 and x.max() == 255 and x.min() == 0
  assert 0 < ds.mean[0] < 1 and 0 < ds.std[0] < 1


def test_digits_split_is_seeded():
  a = open_dataset("digits").load_split("test")[0]
  b = open_dataset("digits", seed=0).load_split("test")[0]
  c = open_dataset("digits", seed=1).load_split("test")[0]
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c)
  small = open_dataset("digits", test_fraction=0.1)
  assert 170 <= small.num_examples("test") <= 190


def test_resize_applies_to_array_sources():
  ds = open_dataset("digits", resize=(16, 12))
  assert ds.image_shape == (16, 12, 1)
  x, _ = next(ds.iter_batches("train", 5))
  assert x.shape == (5, 16, 12, 1) and x.dtype == np.uint8
  with pytest.raises(ConfigError, match="resize"):
    open_dataset("digits", resize=(0, 4))
