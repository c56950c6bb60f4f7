"""``folder:<root>``: an ImageFolder tree ``<root>/<split>/<class>/<image>``, decoded per batch."""

from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from PIL import Image

from wmdd_jax.data.source import Source, SourceKind, known_normalization, register_source
from wmdd_jax.errors import ConfigError, DataError, DatasetNotFoundError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm")
_GREY_MODES = ("1", "L", "LA", "I", "I;16", "F")
STATS_CACHE_NAME = ".wmdd_stats.json"


def _subdirs(path: str) -> list[str]:
  return sorted(
      e.name for e in os.scandir(path) if e.is_dir() and not e.name.startswith((".", "__"))
  )


def _image_files(class_dir: str) -> list[str]:
  found = []
  for dirpath, dirnames, filenames in os.walk(class_dir, followlinks=True):
    dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
    found.extend(
        os.path.join(dirpath, name)
        for name in sorted(filenames)
        if not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)
    )
  return found


def _has_images(path: str) -> bool:
  return any(
      e.is_file() and e.name.lower().endswith(IMAGE_EXTENSIONS) for e in os.scandir(path)
  )


class FolderSource(Source):
  """Image files under ``<root>/<split>/<class>/``; class index = sorted train class folders.

  Args:
    spec: the spec string.
    root: the folder holding one subfolder per split.
    channels: 1 (grey) or 3 (RGB) to convert every image to; None: from the first train image.
    num_workers: threads decoding a batch (PIL releases the GIL while decoding).
    stats_cache: store computed mean/std in ``<root>/.wmdd_stats.json``.
  """

  def __init__(
      self,
      spec: str,
      root: str,
      *,
      channels: int | None = None,
      num_workers: int | None = None,
      stats_cache: bool = True,
  ):
    super().__init__(spec)
    root = os.path.expanduser(root)
    if not os.path.isdir(root):
      raise DatasetNotFoundError(
          f"image folder {root!r} (from {spec!r}) does not exist; create "
          f"{os.path.join(root, 'train', '<class>', '<image>.png')} (and a test split likewise)."
      )
    self._root = root
    split_names = _subdirs(root)
    if not split_names:
      hint = ""
      if _has_images(root):
        hint = " It holds images directly: move them into train/<class>/."
      raise DatasetNotFoundError(
          f"image folder {root} has no split folders; expected <root>/<split>/<class>/<image> "
          f"such as {os.path.join(root, 'train', 'cat', '0001.png')}.{hint}"
      )
    # Train first (it defines the classes), then the rest by name.
    split_names.sort(key=lambda s: (s != "train", s))
    class_dirs: dict[str, list[str]] = {}
    for split in split_names:
      split_dir = os.path.join(root, split)
      classes = _subdirs(split_dir)
      if not classes:
        raise DataError(
            f"split folder {split_dir} has no class folders"
            + (" but holds images directly" if _has_images(split_dir) else "")
            + f"; expected {os.path.join(split_dir, '<class>', '<image>')}: put each class's "
            "images in its own folder, or remove the split folder."
        )
      class_dirs[split] = classes
    if "train" in class_dirs:
      names = class_dirs["train"]
    else:
      names = sorted(set().union(*class_dirs.values()))
    for split, classes in class_dirs.items():
      extra = sorted(set(classes) - set(names))
      if extra:
        raise DataError(
            f"split {split!r} of {root} has class folders {extra} that train lacks; every split's "
            "classes must be among train's: add them to train or remove them from "
            f"{os.path.join(root, split)}."
        )
    self._class_names = names
    index = {name: i for i, name in enumerate(names)}
    self._files: dict[str, list[str]] = {}
    self._labels: dict[str, np.ndarray] = {}
    for split, classes in class_dirs.items():
      files: list[str] = []
      labels: list[int] = []
      for name in classes:
        class_dir = os.path.join(root, split, name)
        found = _image_files(class_dir)
        if not found:
          raise DataError(
              f"class folder {class_dir} holds no images ({', '.join(IMAGE_EXTENSIONS)}); add "
              "images or remove the folder."
          )
        files.extend(found)
        labels.extend([index[name]] * len(found))
      self._files[split] = files
      self._labels[split] = np.asarray(labels, np.int32)
    self._splits = tuple(split_names)

    first = self._files[self._splits[0]][0]
    try:
      with Image.open(first) as im:
        mode, (width, height) = im.mode, im.size
    except (OSError, SyntaxError, ValueError) as e:
      raise DataError(f"cannot read image {first}: {e}; replace or delete the file.") from e
    if channels is None:
      channels = 1 if mode in _GREY_MODES else 3
    if channels not in (1, 3):
      raise ConfigError(f"channels={channels!r} must be 1 (grey) or 3 (RGB).")
    self._mode = "L" if channels == 1 else "RGB"
    self._shape = (height, width, channels)
    self.shape_reference = first
    self._num_workers = int(num_workers) if num_workers is not None else min(8, os.cpu_count() or 1)
    self._pool: ThreadPoolExecutor | None = None
    self._stats_cache = bool(stats_cache)

  @property
  def splits(self) -> tuple[str, ...]:
    return self._splits

  @property
  def class_names(self) -> list[str]:
    return self._class_names

  @property
  def native_shape(self) -> tuple[int, int, int]:
    return self._shape

  def labels(self, split: str) -> np.ndarray:
    return self._labels[split]

  def describe(self, split: str, index: int) -> str:
    return self._files[split][index]

  def _decode(self, path: str, fit: Callable[[np.ndarray], np.ndarray] | None) -> np.ndarray:
    try:
      with Image.open(path) as im:
        array = np.asarray(im.convert(self._mode))
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
      raise DataError(f"cannot decode image {path}: {e}; replace or delete the file.") from e
    array = array[..., None] if array.ndim == 2 else array
    return array if fit is None else fit(array)

  def read(
      self, split: str, indices: np.ndarray, fit: Callable[[np.ndarray], np.ndarray] | None = None
  ) -> list[np.ndarray]:
    paths = [self._files[split][int(i)] for i in indices]
    if self._num_workers <= 1 or len(paths) < 2:
      return [self._decode(p, fit) for p in paths]
    if self._pool is None:
      self._pool = ThreadPoolExecutor(self._num_workers, thread_name_prefix="wmdd-decode")
    # Resizing in the workers too: PIL releases the GIL for both.
    return list(self._pool.map(lambda p: self._decode(p, fit), paths))

  def default_normalization(self) -> str | None:
    return known_normalization(os.path.basename(os.path.abspath(self._root)))

  def stats_cache_path(self) -> str | None:
    return os.path.join(self._root, STATS_CACHE_NAME) if self._stats_cache else None


register_source(
    SourceKind(
        prefix="folder",
        form="folder:<root>  (layout <root>/<split>/<class>/<image>)",
        options=("channels", "num_workers", "verify", "stats_cache"),
        open=lambda spec, arg, seed, **own: FolderSource(spec, arg, **own),
    )
)
