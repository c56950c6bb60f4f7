"""Tests of the folder: source on PNG and JPEG trees written here."""

import json
import os

import numpy as np
import pytest
from PIL import Image

from wmdd_jax import ConfigError, DataError, DatasetNotFoundError
from wmdd_jax.data import open_dataset


def _save(path, array, fmt=None):
  path.parent.mkdir(parents=True, exist_ok=True)
  Image.fromarray(array).save(path, format=fmt)


def _tree(root, layout, hw=(6, 5), ext="png", grey=False, seed=0):
  """Writes layout {split: {class: count}}; returns {path: u8 array} of what was written."""
  rng = np.random.default_rng(seed)
  written = {}
  for split, classes in layout.items():
    for name, count in classes.items():
      (root / split / name).mkdir(parents=True, exist_ok=True)
      for i in range(count):
        shape = hw if grey else (*hw, 3)
        array = rng.integers(0, 256, shape, dtype=np.uint8)
        path = root / split / name / f"{i:03d}.{ext}"
        _save(path, array)
        written[str(path)] = array
  return written


LAYOUT = {"train": {"dog": 3, "cat": 2, "eel": 4}, "test": {"cat": 1, "dog": 2}}


@pytest.fixture(autouse=True)
def _cache_dir(tmp_path, monkeypatch):
  """Computed stats are cached here, not in the user's ~/.cache."""
  path = tmp_path / "wmdd-cache"
  monkeypatch.setenv("WMDD_CACHE_DIR", str(path))
  return path


def test_png_tree(tmp_path):
  written = _tree(tmp_path / "pets", LAYOUT)
  ds = open_dataset(f"folder:{tmp_path / 'pets'}")
  assert ds.class_names == ["cat", "dog", "eel"]  # Sorted folder names.
  assert ds.splits == ("train", "test")
  assert ds.image_shape == (6, 5, 3)
  assert ds.class_counts("train") == [2, 3, 4]
  assert ds.class_counts("test") == [1, 2, 0]  # A class missing from test is fine.
  x, y = ds.load_split("train")
  # Files in class order, then name order; PNG is lossless.
  expected = [
      written[str(tmp_path / "pets" / "train" / name / f"{i:03d}.png")]
      for name, n in (("cat", 2), ("dog", 3), ("eel", 4))
      for i in range(n)
  ]
  np.testing.assert_array_equal(x, np.stack(expected))
  np.testing.assert_array_equal(y, [0, 0, 1, 1, 1, 2, 2, 2, 2])
  dogs = np.concatenate(list(ds.iter_class("train", 1, 2)))
  np.testing.assert_array_equal(dogs, np.stack(expected[2:5]))


def test_jpeg_tree_and_threads(tmp_path):
  written = _tree(tmp_path / "j", {"train": {"a": 3, "b": 3}}, hw=(16, 16), ext="jpg")
  for workers in (1, 4):
    ds = open_dataset(f"folder:{tmp_path / 'j'}", num_workers=workers)
    x, _ = ds.load_split("train")
    assert x.shape == (6, 16, 16, 3) and x.dtype == np.uint8
    with Image.open(sorted(written)[0]) as im:  # Compare with PIL's own decoding of the JPEG.
      np.testing.assert_array_equal(x[0], np.asarray(im.convert("RGB")))


def test_grey_images_and_channel_conversion(tmp_path):
  written = _tree(tmp_path / "g", {"train": {"a": 2, "b": 1}}, grey=True)
  ds = open_dataset(f"folder:{tmp_path / 'g'}")
  assert ds.image_shape == (6, 5, 1)
  x, _ = ds.load_split("train")
  np.testing.assert_array_equal(x[..., 0], np.stack([written[p] for p in sorted(written)]))
  rgb = open_dataset(f"folder:{tmp_path / 'g'}", channels=3)
  x3, _ = rgb.load_split("train")
  assert x3.shape == (3, 6, 5, 3)
  np.testing.assert_array_equal(x3[..., 1], x[..., 0])
  with pytest.raises(ConfigError, match="channels"):
    open_dataset(f"folder:{tmp_path / 'g'}", channels=2)


def test_corrupt_image_is_named(tmp_path):
  _tree(tmp_path / "c", {"train": {"a": 2, "b": 2}})
  bad = tmp_path / "c" / "train" / "b" / "001.png"
  bad.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
  ds = open_dataset(f"folder:{tmp_path / 'c'}")  # Found when decoded, not when listed.
  with pytest.raises(DataError, match=str(bad)):
    ds.load_split("train")
  with pytest.raises(DataError, match=str(bad)):
    open_dataset(f"folder:{tmp_path / 'c'}", verify=True)


def test_empty_class_folder_is_named(tmp_path):
  _tree(tmp_path / "e", {"train": {"a": 2}})
  (tmp_path / "e" / "train" / "b").mkdir()
  (tmp_path / "e" / "train" / "b" / "notes.txt").write_text("no images")
  with pytest.raises(DataError, match=os.path.join("train", "b") + " holds no images"):
    open_dataset(f"folder:{tmp_path / 'e'}")


def test_mixed_sizes_need_resize(tmp_path):
  _tree(tmp_path / "m", {"train": {"a": 2}}, hw=(6, 5))
  odd = tmp_path / "m" / "train" / "b" / "big.png"
  _save(odd, np.zeros((9, 12, 3), np.uint8))
  first = tmp_path / "m" / "train" / "a" / "000.png"
  ds = open_dataset(f"folder:{tmp_path / 'm'}")
  with pytest.raises(DataError) as e:
    ds.load_split("train")
  message = str(e.value)
  assert str(odd) in message and str(first) in message
  assert "9x12x3" in message and "6x5x3" in message and "resize=" in message
  resized = open_dataset(f"folder:{tmp_path / 'm'}", resize=(4, 4))
  x, y = resized.load_split("train")
  assert x.shape == (3, 4, 4, 3) and y.tolist() == [0, 0, 1]


def test_resize_is_shorter_side_then_centre_crop(tmp_path):
  # A 4x16 image black in its outer quarters: resizing to 2x2 keeps the centre 4x4 (halved), and
  # the antialiasing kernel (2 px each side at this scale) reaches only grey pixels.
  image = np.zeros((4, 16, 3), np.uint8)
  image[:, 4:12] = 200
  _save(tmp_path / "r" / "train" / "a" / "x.png", image)
  x, _ = open_dataset(f"folder:{tmp_path / 'r'}", resize=2).load_split("train")
  assert x.shape == (1, 2, 2, 3)
  assert np.all(x == 200)


def test_test_classes_must_be_a_subset_of_train(tmp_path):
  _tree(tmp_path / "s", {"train": {"a": 1, "b": 1}, "test": {"a": 1, "z": 1}})
  with pytest.raises(DataError, match="'test'.*\\['z'\\]"):
    open_dataset(f"folder:{tmp_path / 's'}")


def test_layout_errors(tmp_path):
  with pytest.raises(DatasetNotFoundError, match="does not exist"):
    open_dataset(f"folder:{tmp_path / 'absent'}")
  flat = tmp_path / "flat"
  _save(flat / "x.png", np.zeros((2, 2, 3), np.uint8))
  with pytest.raises(DatasetNotFoundError, match="train/<class>"):
    open_dataset(f"folder:{flat}")
  nested = tmp_path / "nested"
  _save(nested / "train" / "x.png", np.zeros((2, 2, 3), np.uint8))
  with pytest.raises(DataError, match="holds images directly"):
    open_dataset(f"folder:{nested}")


def test_computed_stats_are_cached_in_the_cache_dir(tmp_path, _cache_dir):
  _tree(tmp_path / "st", {"train": {"a": 2, "b": 2}})
  before = sorted(p.name for p in (tmp_path / "st").rglob("*"))
  ds = open_dataset(f"folder:{tmp_path / 'st'}")
  x = ds.load_split("train")[0].reshape(-1, 3) / 255.0
  np.testing.assert_allclose(ds.mean, x.mean(0), rtol=1e-9)
  np.testing.assert_allclose(ds.std, x.std(0), rtol=1e-9)
  assert sorted(p.name for p in (tmp_path / "st").rglob("*")) == before  # Data left alone.
  (cache,) = (_cache_dir / "stats").iterdir()
  entry = json.loads(cache.read_text())
  assert cache.name == f"{entry['key']}.json"
  np.testing.assert_allclose(entry["mean"], ds.mean)
  # A second open reads the cache (tampered here to prove it is used).
  entry["mean"] = [0.1, 0.2, 0.3]
  cache.write_text(json.dumps(entry))
  assert open_dataset(f"folder:{tmp_path / 'st'}").mean == (0.1, 0.2, 0.3)
  # Other options give another key; stats_cache=False writes nothing.
  assert open_dataset(f"folder:{tmp_path / 'st'}", val_fraction=0.5).mean != (0.1, 0.2, 0.3)
  assert len(list((_cache_dir / "stats").iterdir())) == 2
  _ = open_dataset(f"folder:{tmp_path / 'st'}", resize=3, stats_cache=False).mean
  assert len(list((_cache_dir / "stats").iterdir())) == 2


def test_known_folder_names_get_published_constants(tmp_path):
  _tree(tmp_path / "imagenette", {"train": {"a": 1}})
  assert open_dataset(f"folder:{tmp_path / 'imagenette'}").mean == (0.485, 0.456, 0.406)
