"""Sources small enough to hold as arrays: MNIST-format IDX files, ``.npz`` archives, digits."""

from __future__ import annotations

import gzip
import math
import os
import zipfile
import zlib
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
  """Splits held as arrays: images u8[N, H, W] or u8[N, H, W, ch] (possibly memory-mapped).

  The labels are checked when the source is made (they are in memory, so this is cheap): they
  must be whole numbers >= 0. With ``class_names`` every label must be below their count;
  without, the count is the largest label + 1 and every class 0..max must have an example in
  some split, so a stray label (say one 200 among 0/1) is refused instead of silently making a
  201-class dataset of empty classes.

  Args:
    spec: the spec string.
    arrays: split -> (images u8[N, H, W(, ch)], labels [N]).
    class_names: one name per class, or None to number the classes from the labels.
    normalization: a key of NORMALIZATION when the data is a known dataset.
    label_origins: split -> where its labels are stored (a file, an array in a file), named in
      label errors; default: the split and the spec.
    names_from: where ``class_names`` came from, named in label errors (e.g. "class_names").
  """

  def __init__(
      self,
      spec: str,
      arrays: dict[str, tuple[np.ndarray, np.ndarray]],
      class_names: list[str] | None,
      normalization: str | None = None,
      *,
      label_origins: dict[str, str] | None = None,
      names_from: str = "class_names",
  ):
    super().__init__(spec)
    self._arrays = arrays
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
    origins = {s: f"split {s!r} of {spec}" for s in arrays}
    origins.update(label_origins or {})
    self._class_names = self._checked_class_names(class_names, origins, names_from)

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

  def _checked_class_names(
      self, names: list[str] | None, origins: dict[str, str], names_from: str
  ) -> list[str]:
    """Checks every split's labels (see the class docstring); returns the class names."""
    found: dict[str, tuple[np.ndarray, np.ndarray]] = {}  # split -> (values, counts)
    for split, (_, labels) in self._arrays.items():
      y = _integer_labels(labels, origins[split])
      found[split] = np.unique(y, return_counts=True)
      values, counts = found[split]
      if values.size and values[0] < 0:
        neg = values < 0
        raise DataError(
            f"{origins[split]} holds negative labels {_value_counts(values[neg], counts[neg])}; "
            "labels must be class indices 0, 1, ...: fix them (e.g. map -1 to a class or drop "
            "those examples)."
        )
    if names is not None:
      limit = len(names)
      for split, (values, counts) in found.items():
        bad = values >= limit
        if bad.any():
          labels = np.asarray(self._arrays[split][1])
          first = int(np.flatnonzero(labels >= limit)[0])
          raise DataError(
              f"label {values[bad][0]} of {self.describe(split, first)} is outside 0..{limit - 1}"
              f": {origins[split]} holds labels {_value_counts(values[bad], counts[bad])} but "
              f"{names_from} names {limit} classes; fix the labels, or pass class_names= "
              "listing every class."
          )
      return list(names)
    present = np.unique(np.concatenate([v for v, _ in found.values()] or [np.zeros(0, np.int64)]))
    if not present.size:
      return ["0"]
    top = int(present[-1])
    if len(present) == top + 1:  # Sorted, unique and >= 0: exactly 0..top.
      return [str(i) for i in range(top + 1)]
    gap = int(np.flatnonzero(present != np.arange(len(present)))[0])  # The first absent class.
    suspects = "; ".join(
        f"{_value_counts(v[v > gap], c[v > gap])} in {origins[s]}"
        for s, (v, c) in found.items()
        if (v > gap).any()
    )
    missing = np.setdiff1d(np.arange(top + 1), present)
    raise DataError(
        f"the labels of {self.spec} run up to {top} but classes {_ranges(missing)} have no "
        f"example in any split, which would make a {top + 1}-class dataset with {len(missing)} "
        f"empty classes. The labels above the first gap are {suspects}. Fix or drop those labels; "
        f"if the empty classes are real, pass class_names= listing all {top + 1} classes."
    )


def _integer_labels(labels: np.ndarray, origin: str) -> np.ndarray:
  """``labels`` as i64[N]; whole-number floats pass, anything else is a DataError."""
  y = np.asarray(labels)
  if y.ndim != 1:
    raise DataError(
        f"the labels in {origin} have shape {y.shape}, expected [N]; store one class index per "
        "image."
    )
  if np.issubdtype(y.dtype, np.integer):
    return y.astype(np.int64, copy=False)
  if np.issubdtype(y.dtype, np.floating) or y.dtype == np.bool_:
    if y.size and not np.all(np.isfinite(y) & (np.mod(y, 1) == 0)):
      raise DataError(
          f"the labels in {origin} are not whole numbers (dtype {y.dtype}); store integer class "
          "indices."
      )
    return y.astype(np.int64)
  raise DataError(f"the labels in {origin} have dtype {y.dtype}; store integer class indices.")


def _value_counts(values: np.ndarray, counts: np.ndarray, limit: int = 8) -> str:
  """'200 (1 example), 201 (3 examples)', the first ``limit`` values."""
  parts = [
      f"{int(v)} ({int(c)} example{'s' if c != 1 else ''})"
      for v, c in zip(values[:limit], counts[:limit], strict=True)
  ]
  if len(values) > limit:
    parts.append(f"... ({len(values) - limit} more values)")
  return ", ".join(parts)


def _ranges(values: np.ndarray, limit: int = 6) -> str:
  """Sorted ints as runs, e.g. '2..199, 201'."""
  runs: list[list[int]] = []
  for v in (int(x) for x in values):
    if runs and v == runs[-1][1] + 1:
      runs[-1][1] = v
    else:
      runs.append([v, v])
  text = [f"{a}..{b}" if b > a else f"{a}" for a, b in runs[:limit]]
  if len(runs) > limit:
    text.append("...")
  return ", ".join(text)


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
      file_size = len(raw)
    else:
      with open(path, "rb") as f:
        header = f.read(4 + 4 * ndim)
        file_size = os.fstat(f.fileno()).st_size
      raw = None
  except (OSError, EOFError, zlib.error) as e:  # gzip.BadGzipFile is an OSError.
    raise DataError(
        f"cannot read IDX file {path}: {type(e).__name__}: {e}; the file is damaged or truncated"
        ": re-download or re-extract it."
    ) from e
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
  count = math.prod(shape)  # Python ints: a garbage header cannot overflow.
  size = file_size - offset
  if size != count:
    raise DataError(
        f"IDX file {path} holds {size} data bytes but its header {shape} needs {count}; the file "
        "is truncated or padded: re-download it."
    )
  if raw is not None:
    return np.frombuffer(raw, np.uint8, count=count, offset=offset).reshape(shape)
  if count == 0:
    return np.zeros(shape, np.uint8)  # mmap cannot map zero bytes.
  try:
    return np.memmap(path, np.uint8, mode="r", offset=offset, shape=shape)
  except (OSError, ValueError) as e:
    raise DataError(
        f"cannot memory-map IDX file {path}: {type(e).__name__}: {e}; check that it is a readable"
        " regular file, or gzip it (.gz files are read into memory instead)."
    ) from e


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
    label_origins: dict[str, str] = {}
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
      label_origins[split] = labels_path

    names_from = f"variant={variant!r}"
    if variant is None:
      # The folder's name, or its parent's for layouts like torchvision's MNIST/raw.
      here = os.path.abspath(root)
      for name in (os.path.basename(here), os.path.basename(os.path.dirname(here))):
        variant = known_normalization(name)
        if variant in ("mnist", "fashion_mnist"):
          names_from = f"variant {variant!r} (guessed from the folder name {name!r})"
          break
        variant = None
    elif variant not in ("mnist", "fashion_mnist"):
      raise ConfigError(
          f"variant={variant!r} is unknown; use 'mnist', 'fashion_mnist' or leave it out."
      )
    names: list[str] | None = None  # None: numbered from the labels (gaps refused).
    if class_names is not None:
      names, names_from = _check_class_names(class_names, spec), "class_names"
    elif variant == "fashion_mnist":
      names = list(FASHION_MNIST_CLASSES)
    elif variant == "mnist":
      names = list(MNIST_CLASSES)
    self._root = root
    super().__init__(
        spec,
        arrays,
        names,
        normalization=variant,
        label_origins=label_origins,
        names_from=names_from,
    )

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


# What reading a damaged .npz can raise: np.load's own errors, the zip layer's (bad archive, bad
# CRC, unsupported or encrypted member), zlib's, and a plain .npy given in place of a .npz.
_NPZ_READ_ERRORS = (
    OSError,
    EOFError,
    ValueError,
    KeyError,
    TypeError,
    RuntimeError,
    NotImplementedError,
    zipfile.BadZipFile,
    zipfile.LargeZipFile,
    zlib.error,
)


def _load_npz(path: str) -> dict[str, np.ndarray]:
  """Every array of the ``.npz`` at ``path``, read into memory.

  Raises:
    DataError: the file is not an ``.npz`` of arrays (garbage, truncated, a lone ``.npy``, a
      zip of other files, object arrays), naming the path and how to re-create it.
  """
  fix = (
      "re-create it with np.savez(path, x_train=..., y_train=..., x_test=..., y_test=...), or "
      "re-download it if it came from elsewhere."
  )
  try:
    loaded = np.load(path, allow_pickle=False)
  except _NPZ_READ_ERRORS as e:
    # Without allow_pickle np.load reports any non-zip, non-.npy bytes as "pickled data".
    raise DataError(
        f"cannot read npz file {path}: it is not a zip archive of .npy arrays (np.load: "
        f"{type(e).__name__}: {e}); the file is damaged, truncated or of another format: {fix}"
    ) from e
  if not isinstance(loaded, np.lib.npyio.NpzFile):
    raise DataError(
        f"{path} is a single .npy array of shape {getattr(loaded, 'shape', '?')}, not an .npz "
        f"archive of named arrays: {fix}"
    )
  stored: dict[str, np.ndarray] = {}
  with loaded:
    for key in loaded.files:
      try:
        value = loaded[key]
      except _NPZ_READ_ERRORS as e:
        raise DataError(
            f"cannot read array {key!r} of npz file {path}: {type(e).__name__}: {e}; the archive "
            f"is damaged or holds object arrays: {fix}"
        ) from e
      if not isinstance(value, np.ndarray):
        raise DataError(
            f"npz file {path} holds {key!r}, which is not a .npy array (members: "
            f"{loaded.files}); it is a zip of other files, not an .npz: {fix}"
        )
      stored[key] = value
  return stored


class NpzSource(ArraySource):
  """``npz:<file>``: arrays ``x_<split>``/``y_<split>`` (``train`` required), ``class_names``."""

  def __init__(self, spec: str, path: str, *, class_names: Any = None):
    path = os.path.expanduser(path)
    if not os.path.isfile(path):
      raise DatasetNotFoundError(
          f"npz file {path!r} (from {spec!r}) does not exist; create it with "
          "np.savez(path, x_train=..., y_train=..., x_test=..., y_test=...)."
      )
    stored = _load_npz(path)
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
      if y.ndim != 1:
        raise DataError(
            f"{path}: y_{split} has shape {y.shape}; store one class index per image, shape [N] "
            "(or Keras-style [N, 1])."
        )
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
    names: list[str] | None = None  # None: numbered from the labels (gaps refused).
    names_from = "class_names"
    if class_names is not None:
      names = _check_class_names(class_names, spec)
    elif "class_names" in stored:
      stored_names = stored["class_names"]
      if stored_names.ndim != 1:
        raise DataError(
            f"array 'class_names' in {path} has shape {stored_names.shape}; store a 1-D array "
            "of names, e.g. np.array(['cat', 'dog']), or pass class_names=."
        )
      names = _check_class_names(stored_names.tolist(), spec)
      names_from = f"the class_names array in {path}"
    stem = os.path.splitext(os.path.basename(path))[0]
    self._path = path
    super().__init__(
        spec,
        arrays,
        names,
        normalization=known_normalization(stem),
        label_origins={split: f"y_{split} in {path}" for split in arrays},
        names_from=names_from,
    )

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
