"""Sources small enough to hold as arrays: MNIST-format IDX files, ``.npz`` archives, digits."""

from __future__ import annotations

import gzip
import os
from typing import Any

import numpy as np

from wmdd_jax.data.source import (
    Source,
    SourceKind,
    known_normalization,
    register_source,
    stratified_holdout,
)
from wmdd_jax.errors import ConfigError, DataError, DatasetNotFoundError

FASHION_MNIST_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
MNIST_CLASSES = tuple(str(i) for i in range(10))


class ArraySource(Source):
  """Splits held as arrays: images u8[N, H, W] or u8[N, H, W, ch] (possibly memory-mapped)."""

  def __init__(
      self,
      spec: str,
      arrays: dict[str, tuple[np.ndarray, np.ndarray]],
      class_names: list[str],
      normalization: str | None = None,
  ):
    super().__init__(spec)
    self._arrays = arrays
    self._class_names = list(class_names)
    self._normalization = normalization
    shapes = {}
    for split, (images, _) in arrays.items():
      shapes[split] = images.shape[1:] if images.ndim == 4 else (*images.shape[1:], 1)
    first = next(iter(shapes.values()))
    for split, shape in shapes.items():
      if shape != first:
        raise DataError(
            f"split {split!r} of {spec} has images of shape {shape} but split "
            f"{next(iter(shapes))!r} has {first}; store every split at one size (H, W, ch) or "
            "open it with resize=(H, W) after making the channel counts agree."
        )
    self._shape = tuple(int(d) for d in first)

  @property
  def splits(self) -> tuple[str, ...]:
    return tuple(self._arrays)

  @property
  def class_names(self) -> list[str]:
    return self._class_names

  @property
  def native_shape(self) -> tuple[int, int, int]:
    return self._shape

  def labels(self, split: str) -> np.ndarray:
    return np.asarray(self._arrays[split][1])

  def read(self, split: str, indices: np.ndarray, fit: Any = None) -> np.ndarray:
    del fit  # Small arrays: the dataset resizes after reading.
    images = self._arrays[split][0]
    # Sorted fancy indexing reads a memory map front to back; the order is restored after.
    order = np.argsort(indices, kind="stable")
    batch = np.empty((len(indices), *self._shape), np.uint8)
    batch[order] = np.asarray(images[indices[order]]).reshape(len(indices), *self._shape)
    return batch

  def default_normalization(self) -> str | None:
    return self._normalization


def _names_from_labels(arrays: dict[str, tuple[np.ndarray, np.ndarray]]) -> list[str]:
  top = max((int(np.max(y)) for _, y in arrays.values() if len(y)), default=-1)
  return [str(i) for i in range(max(top + 1, 1))]


def _check_class_names(class_names: Any, spec: str) -> list[str]:
  if isinstance(class_names, str) or not hasattr(class_names, "__iter__"):
    raise ConfigError(
        f"class_names for {spec} must be a list of strings, got {class_names!r}; "
        "e.g. class_names=['cat', 'dog']."
    )
  names = [str(n) for n in class_names]
  if len(set(names)) != len(names):
    raise ConfigError(f"class_names for {spec} has duplicates: {names}; give each class one name.")
  return names


# -------------------------------------------------------------------------------------- IDX

_IDX_IMAGES_MAGIC = 0x00000803  # unsigned bytes, 3 dimensions
_IDX_LABELS_MAGIC = 0x00000801  # unsigned bytes, 1 dimension
_IDX_PREFIXES = (("train", "train"), ("test", "t10k"))


def _find_idx_file(root: str, prefix: str, what: str) -> str | None:
  # Both the canonical names and the "train-images.idx3-ubyte" spelling of some mirrors.
  dims = "idx3" if what == "images" else "idx1"
  for base in (f"{prefix}-{what}-{dims}-ubyte", f"{prefix}-{what}.{dims}-ubyte"):
    for name in (base, base + ".gz"):
      path = os.path.join(root, name)
      if os.path.isfile(path):
        return path
  return None


def read_idx(path: str, expected_magic: int) -> np.ndarray:
  """Reads one IDX file of unsigned bytes; raw files are memory-mapped, ``.gz`` ones unpacked.

  Args:
    path: the file.
    expected_magic: 0x00000803 for images [N, H, W], 0x00000801 for labels [N].

  Returns:
    u8 array of the header's shape.

  Raises:
    DataError: wrong magic number, truncated or unreadable file.
  """
  ndim = expected_magic & 0xFF
  try:
    if path.endswith(".gz"):
      with gzip.open(path, "rb") as f:
        raw = f.read()
      header = raw[: 4 + 4 * ndim]
    else:
      with open(path, "rb") as f:
        header = f.read(4 + 4 * ndim)
      raw = None
  except (OSError, EOFError, gzip.BadGzipFile) as e:
    raise DataError(f"cannot read IDX file {path}: {e}; re-download or re-extract it.") from e
  if len(header) < 4:
    raise DataError(f"IDX file {path} is {len(header)} bytes, too short for a header; replace it.")
  magic = int.from_bytes(header[:4], "big")
  if magic != expected_magic:
    raise DataError(
        f"IDX file {path} has magic number 0x{magic:08X}, expected 0x{expected_magic:08X} (uint8 "
        f"data with {ndim} dimension{'s' if ndim > 1 else ''}); check that the file is an "
        f"{'image' if ndim == 3 else 'label'} file, not swapped or still compressed twice."
    )
  if len(header) < 4 + 4 * ndim:
    raise DataError(f"IDX file {path} ends inside its header; replace the file.")
  shape = tuple(int.from_bytes(header[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
  offset = 4 + 4 * ndim
  count = int(np.prod(shape))
  size = len(raw) - offset if raw is not None else os.path.getsize(path) - offset
  if size != count:
    raise DataError(
        f"IDX file {path} holds {size} data bytes but its header {shape} needs {count}; the file "
        "is truncated or padded: re-download it."
    )
  if raw is not None:
    return np.frombuffer(raw, np.uint8, count=count, offset=offset).reshape(shape)
  return np.memmap(path, np.uint8, mode="r", offset=offset, shape=shape)


class IdxSource(ArraySource):
  """``idx:<dir>``: MNIST-format files ``train-*`` (split 'train') and ``t10k-*`` ('test')."""

  def __init__(
      self,
      spec: str,
      root: str,
      *,
      variant: str | None = None,
      class_names: Any = None,
  ):
    root = os.path.expanduser(root)
    if not os.path.isdir(root):
      raise DatasetNotFoundError(
          f"IDX directory {root!r} (from {spec!r}) does not exist; point idx: at the folder "
          "holding train-images-idx3-ubyte[.gz] and friends."
      )
    arrays: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for split, prefix in _IDX_PREFIXES:
      images_path = _find_idx_file(root, prefix, "images")
      labels_path = _find_idx_file(root, prefix, "labels")
      if images_path is None and labels_path is None and split != "train":
        continue  # A train-only folder is fine.
      missing = [
          f"{prefix}-{w}-{d}-ubyte[.gz]"
          for w, d, p in (("images", "idx3", images_path), ("labels", "idx1", labels_path))
          if p is None
      ]
      if missing:
        raise DatasetNotFoundError(
            f"IDX directory {root} lacks {', '.join(missing)}; put the {split} images and labels "
            "files there (e.g. from the dataset's download page or the Debian package)."
        )
      images = read_idx(images_path, _IDX_IMAGES_MAGIC)
      labels = read_idx(labels_path, _IDX_LABELS_MAGIC)
      if len(images) != len(labels):
        raise DataError(
            f"{images_path} holds {len(images)} images but {labels_path} holds {len(labels)} "
            "labels; the two files must come from the same release: re-download them."
        )
      arrays[split] = (images, labels)

    if variant is None:
      # The folder's name, or its parent's for layouts like torchvision's MNIST/raw.
      here = os.path.abspath(root)
      for name in (os.path.basename(here), os.path.basename(os.path.dirname(here))):
        variant = known_normalization(name)
        if variant in ("mnist", "fashion_mnist"):
          break
        variant = None
    elif variant not in ("mnist", "fashion_mnist"):
      raise ConfigError(
          f"variant={variant!r} is unknown; use 'mnist', 'fashion_mnist' or leave it out."
      )
    if class_names is not None:
      names = _check_class_names(class_names, spec)
    elif variant == "fashion_mnist":
      names = list(FASHION_MNIST_CLASSES)
    elif variant == "mnist":
      names = list(MNIST_CLASSES)
    else:
      names = _names_from_labels(arrays)
    self._root = root
    super().__init__(spec, arrays, names, normalization=variant)

  def describe(self, split: str, index: int) -> str:
    prefix = dict(_IDX_PREFIXES)[split]
    return f"example {index} of {os.path.join(self._root, prefix)}-*-ubyte"


# -------------------------------------------------------------------------------------- NPZ


def _as_u8_images(x: np.ndarray, name: str, path: str) -> np.ndarray:
  if x.ndim not in (3, 4):
    raise DataError(
        f"array {name!r} in {path} has shape {x.shape}; store images as [N, H, W] or "
        "[N, H, W, ch]."
    )
  if x.dtype == np.uint8:
    return x
  if np.issubdtype(x.dtype, np.floating):
    if x.size and (not np.all(np.isfinite(x)) or x.min() < 0 or x.max() > 1):
      raise DataError(
          f"array {name!r} in {path} is float with values outside [0, 1] (min {x.min()}, max "
          f"{x.max()}); store uint8 pixels or floats scaled to [0, 1]."
      )
    return np.round(x * 255.0).astype(np.uint8)
  if np.issubdtype(x.dtype, np.integer):
    if x.size and (x.min() < 0 or x.max() > 255):
      raise DataError(
          f"array {name!r} in {path} has integer values outside 0..255 (min {x.min()}, max "
          f"{x.max()}); store uint8 pixels."
      )
    return x.astype(np.uint8)
  raise DataError(f"array {name!r} in {path} has dtype {x.dtype}; store uint8 pixels.")


class NpzSource(ArraySource):
  """``npz:<file>``: arrays ``x_<split>``/``y_<split>`` (``train`` required), ``class_names``."""

  def __init__(self, spec: str, path: str, *, class_names: Any = None):
    path = os.path.expanduser(path)
    if not os.path.isfile(path):
      raise DatasetNotFoundError(
          f"npz file {path!r} (from {spec!r}) does not exist; create it with "
          "np.savez(path, x_train=..., y_train=..., x_test=..., y_test=...)."
      )
    try:
      with np.load(path, allow_pickle=False) as f:
        stored = {k: f[k] for k in f.files}
    except (OSError, ValueError, EOFError) as e:
      raise DataError(f"cannot read npz file {path}: {e}; re-create it with np.savez.") from e
    arrays: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for key in sorted(stored):
      if not key.startswith("x_"):
        continue
      split = key[2:]
      if f"y_{split}" not in stored:
        raise DataError(f"{path} has {key!r} but no 'y_{split}'; store labels for every split.")
      x = _as_u8_images(stored[key], key, path)
      y = stored[f"y_{split}"]
      if y.ndim == 2 and y.shape[1] == 1:  # Keras-style [N, 1] labels.
        y = y[:, 0]
      if len(x) != len(y):
        raise DataError(
            f"{path}: {key} holds {len(x)} images but y_{split} holds {len(y)} labels; store one "
            "label per image."
        )
      arrays[split] = (x, y)
    if "train" not in arrays:
      raise DataError(
          f"{path} has arrays {sorted(stored)} but no 'x_train'/'y_train'; store at least the "
          "train split under those names."
      )
    # Train first, then the rest in name order.
    arrays = {"train": arrays.pop("train"), **arrays}
    if class_names is not None:
      names = _check_class_names(class_names, spec)
    elif "class_names" in stored:
      names = _check_class_names(stored["class_names"].tolist(), spec)
    else:
      names = _names_from_labels(arrays)
    stem = os.path.splitext(os.path.basename(path))[0]
    self._path = path
    super().__init__(spec, arrays, names, normalization=known_normalization(stem))

  def describe(self, split: str, index: int) -> str:
    return f"example {index} of x_{split} in {self._path}"


# ----------------------------------------------------------------------------------- digits


class DigitsSource(ArraySource):
  """``digits``: sklearn's 1797 8x8 digits, split into train/test stratified by class."""

  def __init__(self, spec: str, *, seed: int = 0, test_fraction: float = 0.25):
    from sklearn.datasets import load_digits

    test_fraction = float(test_fraction)
    if not 0.0 < test_fraction < 1.0:
      raise ConfigError(f"test_fraction={test_fraction} must be in (0, 1); e.g. 0.25.")
    digits = load_digits()
    # Values are 0..16; 255/16 maps them onto the full u8 range.
    images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)
    labels = digits.target.astype(np.int32)
    rng = np.random.default_rng([int(seed), 0xD1617])
    train, test = stratified_holdout(labels, test_fraction, rng)
    arrays = {"train": (images[train], labels[train]), "test": (images[test], labels[test])}
    super().__init__(spec, arrays, list(MNIST_CLASSES))


# ---------------------------------------------------------------------------------- registry

register_source(
    SourceKind(
        prefix="idx",
        form="idx:<dir>  (MNIST-format train-/t10k- IDX files)",
        options=("variant", "class_names"),
        open=lambda spec, arg, seed, **own: IdxSource(spec, arg, **own),
    )
)
register_source(
    SourceKind(
        prefix="npz",
        form="npz:<file>  (x_train, y_train, x_test, y_test[, class_names])",
        options=("class_names",),
        open=lambda spec, arg, seed, **own: NpzSource(spec, arg, **own),
    )
)
register_source(
    SourceKind(
        prefix="digits",
        form="digits  (sklearn's 8x8 digits, embedded)",
        options=("test_fraction",),
        open=lambda spec, arg, seed, **own: DigitsSource(spec, seed=int(seed), **own),
        takes_argument=False,
    )
)
