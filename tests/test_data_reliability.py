"""Bad inputs to the data layer: symlink loops, stale stats caches, stray labels, damaged files.

Every test makes its small data in tmp_path. Computed stats are cached in a folder set through
``WMDD_CACHE_DIR`` (the autouse fixture), never in the user's cache or the dataset folder.
"""

import gzip
import io
import json
import os
import warnings
import zipfile

import numpy as np
import pytest
from PIL import Image

from wmdd_jax import DataError, DatasetNotFoundError, WMDDError
from wmdd_jax.data import open_dataset
from wmdd_jax.data.dataset import stats_cache_dir


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch):
  path = tmp_path / "wmdd-cache"
  monkeypatch.setenv("WMDD_CACHE_DIR", str(path))
  return path


def _save(path, array):
  path.parent.mkdir(parents=True, exist_ok=True)
  Image.fromarray(array).save(path)


def _class(folder, count, value=None, seed=0, hw=(4, 4)):
  """Writes ``count`` RGB PNGs into ``folder``: random pixels, or all ``value``."""
  rng = np.random.default_rng(seed)
  for i in range(count):
    if value is None:
      array = rng.integers(0, 256, (*hw, 3), dtype=np.uint8)
    else:
      array = np.full((*hw, 3), value, np.uint8)
    _save(folder / f"{i:03d}.png", array)


def _files(root):
  return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


# ------------------------------------------------------------------------------ 1. symlinks


def test_symlink_loop_in_a_class_is_read_once(tmp_path):
  root = tmp_path / "loop"
  _class(root / "train" / "a", 4)
  _class(root / "train" / "b", 2, seed=1)
  os.symlink(".", root / "train" / "a" / "loop")
  with pytest.warns(UserWarning, match=r"skipping folder .*loop: .*symlink loop") as record:
    ds = open_dataset(f"folder:{root}")
  assert len(record) == 1
  assert ds.class_counts("train") == [4, 2]  # Not 164: the loop is not followed again.
  x, _ = ds.load_split("train")
  assert len({im.tobytes() for im in x}) == 6


@pytest.mark.parametrize(
    "link,target",
    [
        ("a/up", ".."),  # Back up to the split folder (which holds a and b).
        ("a/top", "../.."),  # Up to the dataset root.
        ("a/sub/back", ".."),  # A nested loop back to the class folder.
        ("a/bee", "../b"),  # Into another class's folder: b's images stay b's.
    ],
)
def test_links_up_the_tree_or_across_classes_count_nothing_twice(tmp_path, link, target):
  root = tmp_path / "up"
  _class(root / "train" / "a", 3)
  _class(root / "train" / "b", 2, seed=1)
  (root / "train" / link).parent.mkdir(parents=True, exist_ok=True)
  os.symlink(target, root / "train" / link)
  with pytest.warns(UserWarning, match="skipping folder"):
    ds = open_dataset(f"folder:{root}")
  assert ds.class_counts("train") == [3, 2]


def test_two_links_to_one_outside_folder_count_it_once(tmp_path):
  outside = tmp_path / "extra"
  _class(outside, 3, seed=2)
  root = tmp_path / "two"
  _class(root / "train" / "a", 2)
  _class(root / "train" / "b", 2, seed=1)
  os.symlink(outside, root / "train" / "a" / "x1")
  os.symlink(outside, root / "train" / "a" / "x2")
  with pytest.warns(UserWarning, match="x2"):
    ds = open_dataset(f"folder:{root}")
  assert ds.class_counts("train") == [5, 2]


def test_plain_symlinked_folders_still_work_without_warnings(tmp_path):
  store = tmp_path / "store"
  _class(store / "cats", 2)
  _class(store / "more", 1, seed=3)
  root = tmp_path / "linked"
  (root / "train").mkdir(parents=True)
  os.symlink(store / "cats", root / "train" / "cat")
  _class(root / "train" / "dog", 2, seed=1)
  os.symlink(store / "more", root / "train" / "dog" / "more")
  # The same folder in another split is allowed (splits are listed separately).
  (root / "test").mkdir()
  os.symlink(store / "cats", root / "test" / "cat")
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    ds = open_dataset(f"folder:{root}")
  assert ds.class_counts("train") == [2, 3] and ds.class_counts("test") == [2, 0]


def test_two_class_folders_that_are_one_folder_are_refused(tmp_path):
  root = tmp_path / "alias"
  _class(root / "train" / "a", 2)
  os.symlink("a", root / "train" / "c")
  with pytest.raises(DataError, match=r"class folder .*c is the same folder as .*a"):
    open_dataset(f"folder:{root}")


# -------------------------------------------------------------------------------- 2. stats cache


def test_stats_cache_is_keyed_on_content_and_outside_the_data(tmp_path, cache_dir):
  root = tmp_path / "swap"
  _class(root / "train" / "a", 3, value=125)
  _class(root / "train" / "b", 3, value=126)
  before = _files(root)
  first = open_dataset(f"folder:{root}").mean
  np.testing.assert_allclose(first, [125.5 / 255] * 3)
  assert _files(root) == before  # Nothing written into the dataset.
  assert len(list((cache_dir / "stats").iterdir())) == 1
  # Same names, same count, other images.
  _class(root / "train" / "a", 3, value=250)
  _class(root / "train" / "b", 3, value=250)
  ds = open_dataset(f"folder:{root}")
  np.testing.assert_allclose(ds.mean, [250 / 255] * 3)  # Not the stale 0.492.
  assert len(list((cache_dir / "stats").iterdir())) == 2
  # Unchanged files: the cache is used (tampered entries prove it).
  for path in (cache_dir / "stats").iterdir():
    entry = json.loads(path.read_text())
    entry["mean"] = [0.25] * 3
    path.write_text(json.dumps(entry))
  assert open_dataset(f"folder:{root}").mean == (0.25,) * 3


def test_touching_a_file_changes_the_key(tmp_path, cache_dir):
  root = tmp_path / "touch"
  _class(root / "train" / "a", 2)
  _ = open_dataset(f"folder:{root}").mean
  path = root / "train" / "a" / "000.png"
  st = path.stat()
  os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
  _ = open_dataset(f"folder:{root}").mean
  assert len(list((cache_dir / "stats").iterdir())) == 2


def test_entries_whose_key_does_not_match_are_never_read(tmp_path, cache_dir):
  root = tmp_path / "k"
  _class(root / "train" / "a", 2, value=40)
  true_mean = open_dataset(f"folder:{root}").mean
  (path,) = (cache_dir / "stats").iterdir()
  for text in (
      json.dumps({"key": "someone else's", "mean": [0.9] * 3, "std": [0.1] * 3}),
      json.dumps({"mean": [0.9] * 3, "std": [0.1] * 3}),  # No key at all (an old entry).
      json.dumps({"key": path.stem, "mean": [0.9] * 2, "std": [0.1] * 2}),  # Wrong channels.
      "{not json",
  ):
    path.write_text(text)
    assert open_dataset(f"folder:{root}").mean == true_mean
  # A stats file of the old layout in the dataset folder is ignored.
  (root / ".wmdd_stats.json").write_text(json.dumps({"x": {"mean": [0.9] * 3, "std": [1] * 3}}))
  assert open_dataset(f"folder:{root}").mean == true_mean


def test_an_unwritable_cache_dir_does_not_fail_the_run(tmp_path, monkeypatch):
  blocker = tmp_path / "a-file"
  blocker.write_text("not a folder")
  monkeypatch.setenv("WMDD_CACHE_DIR", str(blocker / "cache"))
  root = tmp_path / "ro"
  _class(root / "train" / "a", 2, value=51)
  before = _files(tmp_path)
  np.testing.assert_allclose(open_dataset(f"folder:{root}").mean, [0.2] * 3)
  assert _files(tmp_path) == before


def test_cache_dir_defaults(tmp_path, monkeypatch):
  monkeypatch.setenv("WMDD_CACHE_DIR", str(tmp_path / "explicit"))
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
  assert stats_cache_dir() == str(tmp_path / "explicit")
  monkeypatch.delenv("WMDD_CACHE_DIR")
  assert stats_cache_dir() == str(tmp_path / "xdg" / "wmdd_jax")
  monkeypatch.delenv("XDG_CACHE_HOME")
  monkeypatch.setenv("HOME", str(tmp_path / "home"))
  assert stats_cache_dir() == str(tmp_path / "home" / ".cache" / "wmdd_jax")


# ------------------------------------------------------------------------------------ 3. labels


def _idx(array, ndim):
  array = np.asarray(array, np.uint8)
  header = (0x0800 | ndim).to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in array.shape)
  return header + array.tobytes()


def _idx_pair(root, labels, prefix="train"):
  root.mkdir(parents=True, exist_ok=True)
  labels = np.asarray(labels)
  (root / f"{prefix}-images-idx3-ubyte").write_bytes(_idx(np.zeros((len(labels), 2, 2)), 3))
  (root / f"{prefix}-labels-idx1-ubyte").write_bytes(_idx(labels, 1))
  return root / f"{prefix}-labels-idx1-ubyte"


def test_idx_stray_label_is_refused_not_a_201_class_dataset(tmp_path):
  labels = [0, 1] * 10
  labels[7] = 200
  path = _idx_pair(tmp_path / "stray", labels)
  with pytest.raises(DataError) as e:
    open_dataset(f"idx:{tmp_path / 'stray'}")
  message = str(e.value)
  assert str(path) in message and "200 (1 example)" in message
  assert "2..199" in message and "class_names" in message


def test_idx_class_names_make_the_count_explicit(tmp_path):
  _idx_pair(tmp_path / "named", [0, 1, 200, 1])
  ds = open_dataset(f"idx:{tmp_path / 'named'}", class_names=[f"c{i}" for i in range(201)])
  assert ds.num_classes == 201 and ds.class_counts("train")[:3] == [1, 2, 0]
  with pytest.raises(DataError, match=r"outside 0..1.*200 \(1 example\)"):
    open_dataset(f"idx:{tmp_path / 'named'}", class_names=["a", "b"])
  # A variant names 10 classes: a label 200 is out of range for it.
  with pytest.raises(DataError, match="variant='mnist' names 10 classes"):
    open_dataset(f"idx:{tmp_path / 'named'}", variant="mnist")


def test_npz_label_gaps_and_stray_test_labels(tmp_path):
  x = np.zeros((4, 2, 2), np.uint8)
  np.savez(tmp_path / "gap.npz", x_train=x, y_train=np.array([0, 2, 0, 2]))
  with pytest.raises(DataError, match=r"classes 1 have no example.*2 \(2 examples\) in y_train"):
    open_dataset(f"npz:{tmp_path / 'gap.npz'}")
  # Train covers its classes but test brings one stray value.
  np.savez(
      tmp_path / "t.npz",
      x_train=x,
      y_train=np.array([0, 1, 0, 1]),
      x_test=x[:2],
      y_test=np.array([1, 9]),
  )
  with pytest.raises(DataError, match=rf"9 \(1 example\) in y_test in {tmp_path / 't.npz'}"):
    open_dataset(f"npz:{tmp_path / 't.npz'}")
  # A test split lacking a class is fine.
  np.savez(tmp_path / "ok.npz", x_train=x, y_train=np.array([0, 1, 2, 1]), x_test=x[:1],
           y_test=np.array([2]))
  assert open_dataset(f"npz:{tmp_path / 'ok.npz'}").class_counts("test") == [0, 0, 1]


def test_negative_and_fractional_labels_are_always_refused(tmp_path):
  x = np.zeros((3, 2, 2), np.uint8)
  np.savez(tmp_path / "neg.npz", x_train=x, y_train=np.array([0, -1, 1]))
  for options in ({}, {"class_names": ["a", "b"]}):
    with pytest.raises(DataError, match=r"negative labels -1 \(1 example\)"):
      open_dataset(f"npz:{tmp_path / 'neg.npz'}", **options)
  np.savez(tmp_path / "frac.npz", x_train=x, y_train=np.array([0.0, 0.5, 1.0]))
  with pytest.raises(DataError, match="not whole numbers"):
    open_dataset(f"npz:{tmp_path / 'frac.npz'}")
  np.savez(tmp_path / "whole.npz", x_train=x, y_train=np.array([0.0, 1.0, 1.0]))
  assert open_dataset(f"npz:{tmp_path / 'whole.npz'}").class_counts("train") == [1, 2]


# ------------------------------------------------------------------------------ 4. read errors


def _good_npz_bytes(compressed=False):
  buf = io.BytesIO()
  save = np.savez_compressed if compressed else np.savez
  rng = np.random.default_rng(0)
  save(buf, x_train=rng.integers(0, 256, (20, 8, 8), dtype=np.uint8), y_train=np.arange(20) % 2)
  return buf.getvalue()


def _zip_of_text():
  buf = io.BytesIO()
  with zipfile.ZipFile(buf, "w") as z:
    z.writestr("x_train.txt", "hello")
  return buf.getvalue()


def _npy():
  buf = io.BytesIO()
  np.save(buf, np.zeros((2, 2, 2), np.uint8))
  return buf.getvalue()


def _bad_crc():
  data = bytearray(_good_npz_bytes(compressed=True))
  data[120:160] = bytes(40)
  return bytes(data)


@pytest.mark.parametrize(
    "content",
    [
        np.random.default_rng(0).bytes(1000),  # Random bytes.
        b"",  # Empty.
        _good_npz_bytes()[:700],  # Truncated.
        _zip_of_text(),  # A zip, but not of arrays.
        _npy(),  # A lone .npy.
        _bad_crc(),  # A damaged member.
    ],
    ids=["garbage", "empty", "truncated", "zip-of-text", "npy", "bad-crc"],
)
def test_damaged_npz_is_a_data_error_naming_the_file(tmp_path, content):
  path = tmp_path / "bad.npz"
  path.write_bytes(content)
  with pytest.raises(DataError) as e:
    open_dataset(f"npz:{path}")
  assert str(path) in str(e.value) and "np.savez" in str(e.value)


def _gz(data):
  return gzip.compress(data)


@pytest.mark.parametrize(
    "name,content",
    [
        ("train-images-idx3-ubyte.gz", b"not gzip at all"),
        ("train-images-idx3-ubyte.gz", _gz(_idx(np.zeros((3, 4, 4)), 3))[:30]),  # Cut short.
        ("train-images-idx3-ubyte.gz", _gz(b"\0" * 4000)[:12] + b"\xff" * 40),  # Bad deflate.
        ("train-images-idx3-ubyte", b"\0\0"),  # Shorter than a header.
        ("train-images-idx3-ubyte", _idx(np.zeros((3, 4, 4)), 3)[:10]),  # Inside the header.
        ("train-images-idx3-ubyte", _idx(np.zeros((3, 4, 4)), 3)[:-1]),  # One byte short.
        ("train-images-idx3-ubyte", b"\0\0\x08\x03" + b"\xff" * 12),  # Absurd header.
    ],
    ids=["not-gzip", "gz-cut", "gz-corrupt", "tiny", "in-header", "short", "huge-header"],
)
def test_damaged_idx_is_a_data_error_naming_the_file(tmp_path, name, content):
  root = tmp_path / "idx"
  root.mkdir()
  (root / "train-labels-idx1-ubyte").write_bytes(_idx([0, 1, 0], 1))
  (root / name).write_bytes(content)
  with pytest.raises(DataError) as e:
    open_dataset(f"idx:{root}")
  assert str(root / name) in str(e.value)


def test_empty_raw_idx_split_opens(tmp_path):
  _idx_pair(tmp_path / "e", [0, 1])
  _idx_pair(tmp_path / "e", [], prefix="t10k")
  ds = open_dataset(f"idx:{tmp_path / 'e'}")
  assert ds.num_examples("test") == 0 and ds.num_classes == 2


@pytest.mark.parametrize("kind", ["garbage", "empty", "dangling"])
def test_unreadable_images_are_data_errors_naming_the_file(tmp_path, kind):
  root = tmp_path / "imgs"
  _class(root / "train" / "a", 2)
  _class(root / "train" / "b", 2, seed=1)
  bad = root / "train" / "b" / "001.png"
  if kind == "garbage":
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
  elif kind == "empty":
    bad.write_bytes(b"")
  else:
    bad.unlink()
    os.symlink(tmp_path / "gone.png", bad)
  ds = open_dataset(f"folder:{root}")  # Only the first image is read at open time.
  with pytest.raises(DataError, match=f"cannot decode image {bad}: .*replace or delete"):
    ds.load_split("train")
  with pytest.raises(DataError, match=f"cannot decode image {bad}"):
    open_dataset(f"folder:{root}", verify=True)
  # The first image itself damaged: refused at open.
  first = root / "train" / "a" / "000.png"
  first.unlink()
  if kind == "dangling":
    first.symlink_to(bad)
  else:
    first.write_bytes(bad.read_bytes())
  with pytest.raises(DataError, match=f"cannot read image {first}"):
    open_dataset(f"folder:{root}")


def test_unlistable_folder_is_a_data_error(tmp_path, monkeypatch):
  root = tmp_path / "perm"
  _class(root / "train" / "a", 1)
  _class(root / "train" / "b" / "deep", 1)
  real = os.scandir

  def scandir(path="."):
    if str(path).endswith(os.sep + "b"):
      raise PermissionError(13, "Permission denied", str(path))
    return real(path)

  monkeypatch.setattr(os, "scandir", scandir)
  with pytest.raises(DataError, match=r"cannot list folder .*b: PermissionError"):
    open_dataset(f"folder:{root}")


def test_missing_split_is_a_wmdd_error(tmp_path):
  x = np.zeros((2, 2, 2), np.uint8)
  np.savez(tmp_path / "s.npz", x_train=x, y_train=np.array([0, 1]))
  ds = open_dataset(f"npz:{tmp_path / 's.npz'}")
  with pytest.raises(DatasetNotFoundError, match="no split 'test'") as e:
    ds.iter_batches("test", 1)
  assert isinstance(e.value, WMDDError)
