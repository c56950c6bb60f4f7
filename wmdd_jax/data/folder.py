"""``folder:<root>``: an ImageFolder tree ``<root>/<split>/<class>/<image>``, decoded per batch."""

from __future__ import annotations

import copy
import hashlib
import os
import warnings
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from PIL import Image

from wmdd_jax.data.source import Source, SourceKind, known_normalization, register_source
from wmdd_jax.errors import ConfigError, DataError, DatasetNotFoundError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm")
_GREY_MODES = ("1", "L", "LA", "I", "I;16", "F")


def _scan(path: str) -> list[os.DirEntry]:
  """The entries of directory ``path`` in name order; an unreadable one is a DataError."""
  try:
    with os.scandir(path) as entries:
      return sorted(entries, key=lambda e: e.name)
  except OSError as e:
    raise DataError(
        f"cannot list folder {path}: {type(e).__name__}: {e}; make it readable (check its "
        "permissions and any symlink pointing to it) or remove it."
    ) from e


def _is_dir(entry: os.DirEntry) -> bool:
  try:
    return entry.is_dir()  # Follows symlinks; False for a dangling one.
  except OSError:
    return False


def _dir_id(path: str) -> tuple[int, int]:
  """(st_dev, st_ino) of the directory ``path`` points to, symlinks followed."""
  try:
    st = os.stat(path)
  except OSError as e:
    raise DataError(
        f"cannot stat folder {path}: {type(e).__name__}: {e}; make it readable or remove it."
    ) from e
  return st.st_dev, st.st_ino


def _subdirs(path: str) -> list[str]:
  return [
      e.name for e in _scan(path) if _is_dir(e) and not e.name.startswith((".", "__"))
  ]


def _is_image_name(name: str) -> bool:
  return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


def _image_files(class_dir: str, visited: set[tuple[int, int]]) -> list[str]:
  """Image files under ``class_dir``, depth first in name order, each directory read once.

  Symlinks are followed, but a directory whose (st_dev, st_ino) is in ``visited`` (the dataset
  root, the split folder, every class folder of the split, and whatever was read before) is
  skipped with one warning: a link loop (``loop -> .``), a link back up the tree, or a second
  link to a folder already read would otherwise count its images again, under this class.

  Args:
    class_dir: the class folder (its own id is already in ``visited``).
    visited: ids of the directories already read or reserved; updated in place.

  Returns:
    Paths of the image files, as reached from ``class_dir``.
  """
  found = []
  stack = [(class_dir, True)]
  while stack:
    path, is_top = stack.pop()
    if not is_top:
      ident = _dir_id(path)
      if ident in visited:
        warnings.warn(
            f"skipping folder {path}: it is {os.path.realpath(path)}, a folder this split already "
            "reads (a symlink loop or a second link to it), so its images are counted once.",
            stacklevel=2,
        )
        continue
      visited.add(ident)
    subdirs = []
    for entry in _scan(path):
      if entry.name.startswith("."):
        continue
      if _is_dir(entry):
        subdirs.append(entry.path)
      elif _is_image_name(entry.name):
        # Dangling links are kept: reading them fails with a DataError naming the file.
        found.append(entry.path)
    stack.extend((d, False) for d in reversed(subdirs))
  return found


def _has_images(path: str) -> bool:
  return any(not _is_dir(e) and _is_image_name(e.name) for e in _scan(path))


class FolderSource(Source):
  """Image files under ``<root>/<split>/<class>/``; class index = sorted train class folders.

  Files are listed once, when the source is made, recursively below each class folder. Symlinks
  are followed, but no directory is read twice within a split (compared by st_dev/st_ino): a
  symlink loop (``<class>/loop -> .``), a link back up the tree or into another class's folder,
  or a second link to a folder already read is skipped with a one-line warning, so every image
  is counted once. Two class folders that are the same directory are a DataError (their images
  would get two labels). Names starting with ``.`` are ignored.

  Args:
    spec: the spec string.
    root: the folder holding one subfolder per split.
    channels: 1 (grey) or 3 (RGB) to convert every image to; None: from the first train image.
    num_workers: threads decoding a batch (PIL releases the GIL while decoding).
    stats_cache: cache computed mean/std between runs in the user cache folder, keyed on the
      files' names, sizes and mtimes (see :func:`wmdd_jax.data.dataset.stats_cache_dir`); the
      dataset folder is never written to.
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
    root_id = _dir_id(root)
    for split, classes in class_dirs.items():
      files: list[str] = []
      labels: list[int] = []
      # Directories this split reads, so none is read twice (see _image_files); class folders
      # are reserved up front, so a link from one class into another is skipped, not relabelled.
      visited = {root_id, _dir_id(os.path.join(root, split))}
      owner: dict[tuple[int, int], str] = {}
      for name in classes:
        class_dir = os.path.join(root, split, name)
        ident = _dir_id(class_dir)
        if ident in owner or ident in visited:
          same = owner.get(ident)
          raise DataError(
              f"class folder {class_dir} is the same folder as "
              + (os.path.join(root, split, same) if same else "the split or dataset folder")
              + f" ({os.path.realpath(class_dir)}), so its images would get two labels; remove "
              "the symlink or give the class its own folder."
          )
        owner[ident] = name
      visited.update(owner)
      for name in classes:
        class_dir = os.path.join(root, split, name)
        found = _image_files(class_dir, visited)
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
    except Exception as e:  # PIL raises many kinds on damaged files (see _decode).
      raise DataError(
          f"cannot read image {first}: {type(e).__name__}: {e}; replace or delete the file."
      ) from e
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

  def __getstate__(self) -> dict:
    state = dict(self.__dict__)
    state["_pool"] = None  # Threads do not cross processes; a copy makes its own when needed.
    return state

  def serial(self) -> FolderSource:
    out = copy.copy(self)
    out._num_workers, out._pool = 1, None
    return out

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
    except Exception as e:
      # Besides OSError (unreadable, truncated, unidentified), PIL's decoders raise SyntaxError,
      # ValueError, struct.error, IndexError, DecompressionBombError, ... on damaged files; all
      # of them mean this file cannot be used.
      raise DataError(
          f"cannot decode image {path}: {type(e).__name__}: {e}; replace or delete the file "
          "(open_dataset(..., verify=True) finds every such file at open time)."
      ) from e
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

  def stats_cache_key(self, split: str) -> str | None:
    """Hash of the sorted (path relative to the root, size, mtime_ns) of the split's files.

    Replacing, adding, removing or renaming an image (or moving it to another class) changes
    it; None (no caching) when ``stats_cache=False`` or a file cannot be stat'ed (reading it
    will then raise the error that says why).
    """
    if not self._stats_cache:
      return None
    rows = []
    for path in self._files[split]:
      try:
        st = os.stat(path)
      except OSError:
        return None
      rows.append((os.path.relpath(path, self._root), st.st_size, st.st_mtime_ns))
    rows.sort()
    digest = hashlib.sha256(repr((self._mode, rows)).encode())
    return digest.hexdigest()


register_source(
    SourceKind(
        prefix="folder",
        form="folder:<root>  (layout <root>/<split>/<class>/<image>)",
        options=("channels", "num_workers", "verify", "stats_cache"),
        open=lambda spec, arg, seed, **own: FolderSource(spec, arg, **own),
    )
)


# --- Synthetic sets stored as class folders ---------------------------------------------------


def read_class_folders(
    root: str,
    class_names: list[str],
    *,
    image_shape: tuple[int, int, int] | None = None,
) -> tuple[np.ndarray, np.ndarray, dict[str, str]]:
  """Reads a synthetic set stored as one folder of PNG/JPEG images per class.

  What the official WMDD / SRe2L code writes (``root/new000/class000_id000.jpg`` ...), what
  :func:`wmdd_jax.checkpoint.export_image_folder` writes (``root/train/0000_<name>/...``), or
  any torchvision ImageFolder (``root/<class>/<image>``). No ``classes.json`` is needed: the
  class of each folder comes from the real dataset, by rule, in this order:

  1. every folder name is one of ``class_names``: by name;
  2. no folder name is a class name and there are exactly ``len(class_names)`` folders: sorted
     folder order is class order (torchvision ImageFolder's rule, and what the official
     ``new{c:03d}`` names encode).

  A mix (some folders named after classes, some not) is refused rather than guessed.

  A ``root`` holding only a ``train`` folder is read from ``root/train``. Images are read
  directly inside each class folder, in name order.

  Args:
    root: the set's directory.
    class_names: the real dataset's class names, in label order.
    image_shape: (H, W, ch) every image must have (the dataset's); ch 1 reads greyscale, 3 RGB.
      None: from the first image.

  Returns:
    (u8[N, H, W, ch] images in (class, file name) order, i32[N] labels, {folder: class name}).

  Raises:
    DatasetNotFoundError: no such directory, or no class folders in it.
    DataError: folders that match no rule, empty folders, unreadable or mis-sized images.
  """
  root = os.path.expanduser(os.fspath(root))
  if not os.path.isdir(root):
    raise DatasetNotFoundError(f"No synthetic image folder at {root}; pass the directory holding "
                               "one folder of images per class.")
  folders = _subdirs(root)
  if folders == ["train"] and not _has_images(os.path.join(root, "train")):
    root = os.path.join(root, "train")
    folders = _subdirs(root)
  if not folders:
    raise DatasetNotFoundError(f"{root} holds no class folders; expected <root>/<class>/<image> "
                               "(e.g. the official new000/class000_id000.jpg).")
  index = {name: i for i, name in enumerate(class_names)}
  named = [f for f in folders if f in index]
  if len(named) == len(folders):
    labels_of = {f: index[f] for f in folders}
  elif named:
    raise DataError(
        f"{root} has class folders named after classes ({', '.join(named[:3])}) and others "
        f"that are not ({', '.join(sorted(set(folders) - set(named))[:3])}); the dataset's "
        f"class names are not its class names of every folder: rename or remove those folders.")
  elif len(folders) == len(class_names):
    labels_of = {f: i for i, f in enumerate(sorted(folders))}
  else:
    raise DataError(
        f"{root} has {len(folders)} class folders ({', '.join(folders[:5])}"
        f"{', ...' if len(folders) > 5 else ''}) but the dataset has {len(class_names)} classes "
        "and the folder names are not its class names; name the folders after the classes "
        f"({', '.join(class_names[:3])}, ...) or keep one folder per class in label order.")
  images, labels = [], []
  mode = None if image_shape is None else ("L" if image_shape[-1] == 1 else "RGB")
  for folder in sorted(folders, key=lambda f: labels_of[f]):
    path = os.path.join(root, folder)
    files = [e.path for e in _scan(path) if not _is_dir(e) and _is_image_name(e.name)]
    if not files:
      raise DataError(f"class folder {path} holds no images ({', '.join(IMAGE_EXTENSIONS)}); "
                      "add its images or remove the folder.")
    for file in files:
      try:
        with Image.open(file) as im:
          if mode is None:
            mode = "L" if im.mode in _GREY_MODES else "RGB"
          array = np.asarray(im.convert(mode))
      except Exception as e:  # PIL raises many kinds on damaged files
        raise DataError(f"cannot decode image {file}: {type(e).__name__}: {e}; replace or "
                        "delete the file.") from e
      array = array[..., None] if array.ndim == 2 else array
      want = tuple(image_shape) if image_shape is not None else images[0].shape if images \
          else array.shape
      if array.shape != tuple(want):
        raise DataError(f"image {file} is {array.shape[1]}x{array.shape[0]}x{array.shape[2]}, "
                        f"but the set's images are {want[1]}x{want[0]}x{want[2]}: store the set "
                        "at the dataset's resolution (resize it before evaluating).")
      images.append(array)
      labels.append(labels_of[folder])
  mapping = {f: class_names[labels_of[f]] for f in sorted(folders, key=lambda f: labels_of[f])}
  return np.stack(images), np.asarray(labels, np.int32), mapping
