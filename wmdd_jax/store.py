"""Synthetic sets stored as the official WMDD pipeline hands them to the student.

The official recover (github.com/Liu-Hy/WMDD, ``recover/data_synthesis_new.py``) ends with

  * ``denormalize`` (``recover/utils.py:119-134``): per channel ``clamp(x * std + mean, 0, 1)``
    in float32 (the numpy float64 constants act as torch scalars, cast to the tensor's float32);
  * ``save_images`` (``recover/data_synthesis_new.py:216-232``):
    ``Image.fromarray((image_np * 255).astype(np.uint8)).save(path)``, i.e. a float32 product
    TRUNCATED (not rounded) to uint8, written as JPEG with PIL's defaults (quality 75, 4:2:0
    chroma subsampling for RGB, baseline) at ``{syn_data_path}/new{c:03d}/class{c:03d}_id{j:03d}
    .jpg``; the barycenter weights go to ``sample_weights.txt`` (``np.savetxt(..., fmt='%f')``,
    one row of k weights per class, lines 425-439) next to the class folders.

The relabel (``relabel/generate_soft_label.py:194-214``) and the student
(``train/train_FKD.py:100-119``) read those JPEGs through torchvision's ImageFolder (PIL decode,
``convert('RGB')``), ``ToTensor`` (``u8 / 255`` in float32) and ``Normalize`` (``(x - mean) /
std`` in float32). So the student never sees the recovered floats: it sees the decoded JPEG,
renormalised. :func:`jpeg_roundtrip` reproduces exactly that; :func:`write_image_folder` writes
the same bytes in the official layout, so the official ``train_FKD.py`` can consume our sets, and
:func:`read_image_folder` reads such a folder back. :func:`export_for_pytorch` writes a set with
its labels, weights and stored soft labels in files any PyTorch script loads.

All functions are pure numpy/PIL and run on the host; images are channels last.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import tempfile
from collections.abc import Sequence
from typing import Any

import numpy as np

from wmdd_jax.errors import (
    ConfigError,
    DataError,
    DatasetNotFoundError,
    NonFiniteError,
    ShapeError,
)

DEFAULT_QUALITY = 75  # PIL's JPEG default (libjpeg's jpeg_set_defaults), what the official uses.
WEIGHTS_FILE = "sample_weights.txt"  # read by relabel/utils_fkd.py:309 load_weights_file
CLASS_NAMES_FILE = "class_names.txt"  # ours; ignored by ImageFolder and load_weights_file
_FILE_RE = re.compile(r"^class(\d+)_id(\d+)\.jpg$")
_DIR_RE = re.compile(r"^new(\d+)$")


def image_path(class_id: int, image_id: int) -> str:
  """The official relative path of image ``image_id`` of class ``class_id``.

  ``new{c:03d}/class{c:03d}_id{j:03d}.jpg`` (recover/data_synthesis_new.py:225-226).
  """
  return f"new{class_id:03d}/class{class_id:03d}_id{image_id:03d}.jpg"


def _check_channels(ch: int, what: str) -> None:
  if ch not in (1, 3):
    raise ShapeError(f"{what} needs 1 (grayscale) or 3 (RGB) channels last, got {ch}; pass "
                     "images shaped [..., H, W, 1] or [..., H, W, 3].")


def _constants(mean: Any, std: Any, ch: int) -> tuple[np.ndarray, np.ndarray]:
  mean = np.asarray(mean, np.float32).reshape(-1)
  std = np.asarray(std, np.float32).reshape(-1)
  if mean.shape != (ch,) or std.shape != (ch,):
    raise ShapeError(f"mean {mean.shape} and std {std.shape} must hold one value per channel "
                     f"({ch}); pass the dataset's per-channel constants.")
  if np.any(std <= 0):
    raise ConfigError(f"std must be positive, got {std.tolist()}.")
  return mean, std


def quantize_like_official(images: Any, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
  """Normalised float images -> the uint8 pixels the official recover writes.

  Per channel, in float32: ``p = clip(x * std + mean, 0, 1)`` (``denormalize``), then
  ``(p * 255).astype(uint8)``, which truncates toward zero (``save_images``).

  Args:
    images: f32[..., H, W, ch] normalised images (any leading dims; any channel count matching
      ``mean``/``std``).
    mean: per-channel mean, [0, 1] pixel scale.
    std: per-channel std.

  Returns:
    u8[..., H, W, ch].

  Raises:
    ShapeError: fewer than 3 dims, non-float input, or constants that do not match ``ch``.
    NonFiniteError: NaN or Inf pixels.
  """
  x = np.asarray(images)
  if x.ndim < 3:
    raise ShapeError(f"quantize_like_official takes f32[..., H, W, ch], got shape {x.shape}; "
                     "add the channel axis (x[..., None]) for grayscale.")
  if not np.issubdtype(x.dtype, np.floating):
    raise ShapeError(f"quantize_like_official takes normalised floats, got dtype {x.dtype}; "
                     "uint8 pixels are already quantised (pass them to encode_jpeg).")
  mean, std = _constants(mean, std, x.shape[-1])
  x = x.astype(np.float32, copy=False)
  if not np.all(np.isfinite(x)):
    raise NonFiniteError("quantize_like_official got NaN/Inf pixels; the synthetic images "
                         "diverged: lower the recover lr or check the run's losses.")
  pixels = np.clip(x * std + mean, np.float32(0.0), np.float32(1.0))
  return (pixels * np.float32(255.0)).astype(np.uint8)


def normalize_like_official(images_u8: Any, mean: Sequence[float], std: Sequence[float]
                            ) -> np.ndarray:
  """uint8 pixels -> the float32 input the official student sees (ToTensor + Normalize).

  ``(u8 / 255 - mean) / std``, each operation in float32, as torchvision does.

  Args:
    images_u8: u8[..., H, W, ch].
    mean: per-channel mean.
    std: per-channel std.

  Returns:
    f32[..., H, W, ch].
  """
  u8 = np.asarray(images_u8)
  if u8.dtype != np.uint8 or u8.ndim < 3:
    raise ShapeError(f"normalize_like_official takes u8[..., H, W, ch], got {u8.dtype} "
                     f"{u8.shape}.")
  mean, std = _constants(mean, std, u8.shape[-1])
  return (u8.astype(np.float32) / np.float32(255.0) - mean) / std


def _check_quality(quality: int) -> int:
  if isinstance(quality, bool) or not isinstance(quality, (int, np.integer)) \
      or not 1 <= quality <= 100:
    raise ConfigError(f"JPEG quality must be an int in [1, 100], got {quality!r}; the official "
                      f"pipeline uses PIL's default, {DEFAULT_QUALITY}.")
  return int(quality)


def encode_jpeg(images_u8: Any, quality: int = DEFAULT_QUALITY) -> list[bytes]:
  """Encodes images as PIL does in the official ``save_images``.

  3 channels are saved as RGB, 1 channel as grayscale ("L"); everything else is PIL's default
  (4:2:0 subsampling for RGB, baseline, no optimisation). At quality 75 the bytes equal
  ``Image.fromarray(img).save("x.jpg")`` without a quality argument.

  Args:
    images_u8: u8[..., H, W, ch], ch in {1, 3}.
    quality: JPEG quality, 1-100.

  Returns:
    One JPEG file's bytes per image, the leading dims flattened in C order.

  Raises:
    ShapeError: wrong dtype, rank or channel count.
    ConfigError: quality out of range.
  """
  from PIL import Image  # noqa: PLC0415 - host-only dependency

  u8 = np.asarray(images_u8)
  if u8.dtype != np.uint8 or u8.ndim < 3:
    raise ShapeError(f"encode_jpeg takes u8[..., H, W, ch], got {u8.dtype} {u8.shape}; "
                     "quantise floats first with quantize_like_official.")
  _check_channels(u8.shape[-1], "encode_jpeg")
  quality = _check_quality(quality)
  flat = u8.reshape(-1, *u8.shape[-3:])
  out = []
  for img in flat:
    buf = io.BytesIO()
    Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img).save(
        buf, format="JPEG", quality=quality)
    out.append(buf.getvalue())
  return out


def _decode_one(data: bytes, channels: int | None, where: str):
  from PIL import Image  # noqa: PLC0415

  try:
    with Image.open(io.BytesIO(data)) as img:
      if img.format != "JPEG":
        raise DataError(f"{where} is a {img.format} file, not a JPEG; encode it with "
                        "encode_jpeg.")
      if channels is None:
        channels = 1 if img.mode == "L" else 3
      # ImageFolder's pil_loader does convert('RGB'); grayscale sets stay 1-channel here.
      arr = np.asarray(img.convert("L" if channels == 1 else "RGB"))
  except (OSError, SyntaxError, ValueError) as e:
    if isinstance(e, DataError):
      raise
    raise DataError(f"{where} is not a readable JPEG ({e}); re-encode it with encode_jpeg.") \
        from e
  return arr[..., None] if arr.ndim == 2 else arr


def decode_jpeg(data: Sequence[bytes], image_shape: Sequence[int]) -> np.ndarray:
  """Decodes JPEG bytes with PIL, as torchvision's ImageFolder loader does.

  Args:
    data: N JPEG files' bytes.
    image_shape: (H, W, ch) every image must have; ch in {1, 3} (1: decoded as grayscale "L",
      3: ``convert('RGB')``).

  Returns:
    u8[N, H, W, ch].

  Raises:
    ShapeError: a bad ``image_shape``.
    DataError: unreadable bytes, or an image of another size.
  """
  shape = tuple(int(s) for s in image_shape)
  if len(shape) != 3:
    raise ShapeError(f"decode_jpeg needs image_shape (H, W, ch), got {tuple(image_shape)}.")
  _check_channels(shape[-1], "decode_jpeg")
  out = np.empty((len(data), *shape), np.uint8)
  for i, item in enumerate(data):
    arr = _decode_one(bytes(item), shape[-1], f"JPEG #{i}")
    if arr.shape != shape:
      raise DataError(f"JPEG #{i} decodes to {arr.shape}, expected {shape}; pass the shape the "
                      "images were encoded with.")
    out[i] = arr
  return out


def jpeg_roundtrip(images: Any, mean: Sequence[float], std: Sequence[float],
                   quality: int = DEFAULT_QUALITY) -> tuple[np.ndarray, list[bytes]]:
  """The images as the official student sees them: quantise, JPEG-encode, decode, renormalise.

  Args:
    images: f32[C, k, H, W, ch] (or any f32[..., H, W, ch]) normalised synthetic images;
      ch in {1, 3}.
    mean: per-channel mean, [0, 1] pixel scale.
    std: per-channel std.
    quality: JPEG quality (the official: PIL's default 75).

  Returns:
    (f32 images of the input's shape, normalised from the decoded JPEGs; the JPEG bytes, one
    per image, leading dims flattened in C order, e.g. index ``c * k + j``).

  Raises:
    ShapeError, NonFiniteError, ConfigError: see :func:`quantize_like_official` and
      :func:`encode_jpeg`.
  """
  x = np.asarray(images)
  if x.ndim >= 3:
    _check_channels(x.shape[-1], "jpeg_roundtrip")
  u8 = quantize_like_official(x, mean, std)
  data = encode_jpeg(u8, quality)
  decoded = decode_jpeg(data, u8.shape[-3:]).reshape(u8.shape)
  return normalize_like_official(decoded, mean, std), data


# --- The official folder layout ---------------------------------------------------------------


def _jpeg_grid(images: Any, num_classes: int | None, quality: int) -> list[list[bytes]]:
  """[C][k] JPEG bytes from u8[C, k, H, W, ch], nested [C][k] bytes, or flat C * k bytes."""
  if isinstance(images, np.ndarray) and images.dtype != object:
    if images.dtype != np.uint8 or images.ndim != 5:
      raise ShapeError(f"write_image_folder takes u8[C, k, H, W, ch] or JPEG bytes, got "
                       f"{images.dtype} {images.shape}; quantise floats with "
                       "quantize_like_official (or use jpeg_roundtrip's bytes).")
    c, k = images.shape[:2]
    flat = encode_jpeg(images, quality)
    return [flat[i * k:(i + 1) * k] for i in range(c)]
  items = list(images)
  if not items:
    raise ShapeError("write_image_folder got no images.")
  if all(isinstance(b, (bytes, bytearray)) for b in items):
    if not num_classes or len(items) % num_classes:
      raise ShapeError(f"write_image_folder got a flat list of {len(items)} JPEGs; pass "
                       "class_ids (or class_names) for C classes with C dividing it, or nest "
                       "them as [C][k].")
    k = len(items) // num_classes
    return [[bytes(b) for b in items[i * k:(i + 1) * k]] for i in range(num_classes)]
  grid = [[bytes(b) for b in row] for row in items]
  if len({len(row) for row in grid}) != 1 or not grid[0]:
    raise ShapeError("write_image_folder needs the same number (>= 1) of JPEGs per class; got "
                     f"{[len(row) for row in grid]}.")
  return grid


def _swap_in(tmp: str, root: str) -> None:
  """Moves the finished directory ``tmp`` to ``root`` (a sibling), replacing any old ``root``
  so that a reader never sees a half-written one."""
  if os.path.exists(root):
    old = tempfile.mkdtemp(prefix=f".{os.path.basename(root)}.old-", dir=os.path.dirname(root))
    os.rename(root, os.path.join(old, "x"))
    os.rename(tmp, root)
    shutil.rmtree(old, ignore_errors=True)
  else:
    os.rename(tmp, root)


def write_image_folder(
    root: str | os.PathLike,
    images: Any,
    class_ids: Sequence[int] | None = None,
    *,
    class_names: Sequence[str] | None = None,
    weights: Any = None,
    quality: int = DEFAULT_QUALITY,
    overwrite: bool = False,
) -> str:
  """Writes a synthetic set in the official layout, atomically.

  ``root/new{c:03d}/class{c:03d}_id{j:03d}.jpg`` for class c and image j, plus
  ``root/sample_weights.txt`` (C rows of k weights, ``%f``, as the official recover writes and
  ``load_weights_file`` reads; uniform 1/k without ``weights``) and, with ``class_names``,
  ``root/class_names.txt`` (one per line, in class order). The official ``train_FKD.py
  --train-dir root`` and ``generate_soft_label.py --data root`` read it as is. Everything is
  written into a temporary sibling directory that is then renamed to ``root``.

  Args:
    root: the directory to create.
    images: u8[C, k, H, W, ch] pixels (encoded here with ``quality``), or JPEG bytes written
      unchanged: nested [C][k], or a flat list of C * k in class-major order (as
      :func:`jpeg_roundtrip` returns) with ``class_ids`` or ``class_names`` giving C.
    class_ids: the C class indices (default 0..C-1). ImageFolder labels folders by sorted
      name, so these must be 0..C-1 for its labels to equal the teacher's, and < 1000 for
      ``{:03d}`` names to sort numerically.
    class_names: optional C names, written to ``class_names.txt``.
    weights: optional f32[C, k] barycenter weights.
    quality: JPEG quality when ``images`` are pixels.
    overwrite: replace an existing ``root``.

  Returns:
    The absolute path of ``root``.

  Raises:
    ShapeError: inconsistent images, ids, names or weights.
    ConfigError: ``root`` exists without ``overwrite``, or bad ids/quality.
  """
  root = os.path.abspath(os.fspath(root))
  quality = _check_quality(quality)
  hint = len(class_ids) if class_ids is not None else (
      len(class_names) if class_names is not None else None)
  grid = _jpeg_grid(images, hint, quality)
  c, k = len(grid), len(grid[0])
  ids = list(range(c)) if class_ids is None else [int(i) for i in class_ids]
  if len(ids) != c or len(set(ids)) != c:
    raise ShapeError(f"write_image_folder got {len(ids)} class ids ({len(set(ids))} distinct) "
                     f"for {c} classes; pass one distinct id per class.")
  if any(i < 0 or i > 999 for i in ids):
    raise ConfigError("class ids must be in [0, 999]: the official 'new{c:03d}' folder names "
                      "sort numerically (so ImageFolder labels match) only up to 999.")
  if class_names is not None and len(class_names) != c:
    raise ShapeError(f"write_image_folder got {len(class_names)} class names for {c} classes.")
  w = np.full((c, k), 1.0 / k) if weights is None else np.asarray(weights, np.float64)
  if w.shape != (c, k):
    raise ShapeError(f"weights must be f32[C, k] = ({c}, {k}), got {w.shape}; pass the "
                     "SyntheticSet's barycenter weights.")
  if os.path.exists(root) and not overwrite:
    raise ConfigError(f"{root} exists; pass overwrite=True to replace it or choose a new path.")

  parent = os.path.dirname(root)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(root)}.tmp-", dir=parent)
  try:
    for row, cid in zip(grid, ids):
      os.makedirs(os.path.join(tmp, f"new{cid:03d}"))
      for j, data in enumerate(row):
        with open(os.path.join(tmp, image_path(cid, j)), "wb") as f:
          f.write(data)
    # Rows follow class order (ids), as the official file: row c is class c's weights.
    np.savetxt(os.path.join(tmp, WEIGHTS_FILE), w, fmt="%f")
    if class_names is not None:
      with open(os.path.join(tmp, CLASS_NAMES_FILE), "w") as f:
        f.write("".join(f"{name}\n" for name in class_names))
    _swap_in(tmp, root)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return root


def read_image_folder(root: str | os.PathLike, channels: int | None = None
                      ) -> tuple[np.ndarray, np.ndarray]:
  """Reads a folder in the official layout (see :func:`write_image_folder`).

  Args:
    root: the set's directory, holding ``new{c:03d}/class{c:03d}_id{j:03d}.jpg``.
    channels: 1 or 3 to force the decode mode; None: 1 for grayscale JPEGs, else 3.

  Returns:
    (u8[C, k, H, W, ch] in ascending class id and image id order, i64[C] class ids).

  Raises:
    DatasetNotFoundError: no such directory, or no class folders in it.
    DataError: a misnamed file, ragged classes, missing image ids, or mismatched sizes.
  """
  root = os.fspath(root)
  if not os.path.isdir(root):
    raise DatasetNotFoundError(f"No synthetic image folder at {root}; write one with "
                               "write_image_folder.")
  if channels is not None:
    _check_channels(channels, "read_image_folder")
  folders = []
  for name in os.listdir(root):
    m = _DIR_RE.match(name)
    if m and os.path.isdir(os.path.join(root, name)):
      folders.append((int(m.group(1)), name))
  if not folders:
    raise DatasetNotFoundError(f"{root} holds no 'new{{c:03d}}' class folders; is it the "
                               "directory write_image_folder (or the official recover) wrote?")
  folders.sort()
  images, counts = [], []
  for cid, name in folders:
    files = {}
    for fn in os.listdir(os.path.join(root, name)):
      m = _FILE_RE.match(fn)
      if not m or int(m.group(1)) != cid:
        raise DataError(f"{os.path.join(root, name, fn)} is not named "
                        f"'class{cid:03d}_id<j>.jpg'; remove it or fix its name.")
      files[int(m.group(2))] = fn
    if sorted(files) != list(range(len(files))):
      raise DataError(f"{os.path.join(root, name)} holds image ids {sorted(files)}; expected "
                      f"0..{len(files) - 1} without gaps.")
    row = []
    for j in range(len(files)):
      path = os.path.join(root, name, files[j])
      with open(path, "rb") as f:
        row.append(_decode_one(f.read(), channels, path))
      channels = row[-1].shape[-1]
    counts.append(len(row))
    images.extend(row)
  if len(set(counts)) != 1 or counts[0] == 0:
    raise DataError(f"Class folders in {root} hold different numbers of images {counts}; a "
                    "synthetic set has the same count k >= 1 per class.")
  if len({im.shape for im in images}) != 1:
    raise DataError(f"Images in {root} have different sizes {sorted({im.shape for im in images})}"
                    "; every synthetic image must share one (H, W, ch).")
  stacked = np.stack(images).reshape(len(folders), counts[0], *images[0].shape)
  return stacked, np.asarray([cid for cid, _ in folders], np.int64)


def read_sample_weights(root: str | os.PathLike) -> np.ndarray | None:
  """``root/sample_weights.txt`` as f32[C, k] (None when absent)."""
  path = os.path.join(os.fspath(root), WEIGHTS_FILE)
  if not os.path.isfile(path):
    return None
  return np.loadtxt(path, dtype=np.float64, ndmin=2).astype(np.float32)


# --- An export for PyTorch (and any other) users ------------------------------------------------

EXPORT_FORMAT = "wmdd_jax.export/1"

_EXPORT_README = """A synthetic set exported by wmdd_jax (format {fmt}).

images/<label>_<class>/<i>.png  the images, u8 pixels (PNG, lossless), class-major
labels.json                     class_names, mean/std (pixel scale [0, 1]), and per image:
                                file, label, weight (barycenter weight), index (row in synset.npz)
synset.npz                      images_u8 u8[N, H, W, ch], images f32[N, H, W, ch] (normalised, as
                                evaluated), labels i32[N], weights f32[N]
{soft}
PyTorch:

    import json, numpy as np, torch
    meta = json.load(open("labels.json"))
    data = np.load("synset.npz")
    x = torch.from_numpy(data["images"]).permute(0, 3, 1, 2)   # N, ch, H, W; normalised
    y = torch.from_numpy(data["labels"]).long()
    # or torchvision.datasets.ImageFolder("images") with
    # Normalize(meta["mean"], meta["std"]): folder order is label order.
"""

_SOFT_README = """\
soft_labels_seed<s>.npz         the teacher's logits on every student view of a run
                                (wmdd_jax.protocol, format wmdd_jax.soft_labels/1): per epoch and
                                row the image index, its crop box (y0, x0, h, w) resized back,
                                flip, CutMix partner row, the batch's CutMix box and lambda, and
                                logits f16[E, N, C]. Epoch e's rows are its batches in order
                                (batch_size in meta). The views of batch rows r0:r1 in PyTorch:

    F = torch.nn.functional
    s = np.load("soft_labels_seed0.npz"); B = json.loads(str(s["meta"]))["batch_size"]
    v = torch.stack([F.interpolate(x[i:i + 1, :, y0:y0 + h, x0:x0 + w], size=x.shape[-2:],
                                   mode="bilinear", align_corners=False, antialias=True)[0]
                     for i, (y0, x0, h, w) in zip(s["index"][e, r0:r1], s["crop"][e, r0:r1])])
    v = torch.where(torch.from_numpy(s["flip"][e, r0:r1])[:, None, None, None], v.flip(-1), v)
    by0, bx0, by1, bx1 = s["mix_box"][e, r0 // B]
    p = torch.from_numpy(s["partner"][e, r0:r1] - r0)
    v[:, :, by0:by1, bx0:bx1] = v[p][:, :, by0:by1, bx0:bx1].clone()
    # soft targets: s["logits"][e, r0:r1]; loss KL(softmax(t / T) || softmax(student / T)),
    # T = meta["temperature"] (tests/test_evaluate_cli.py rebuilds the views this way)
"""


def export_for_pytorch(
    root: str | os.PathLike,
    images: Any,
    labels: Any,
    class_names: Sequence[str],
    mean: Sequence[float],
    std: Sequence[float],
    *,
    weights: Any = None,
    soft_labels: Sequence[str | os.PathLike] = (),
    overwrite: bool = False,
) -> str:
  """Writes a set that PyTorch (or anything reading PNG/JSON/npz) loads without wmdd_jax.

  Layout: see the ``README.txt`` it writes (images as PNG class folders whose sorted order is
  label order, ``labels.json``, ``synset.npz`` with the exact normalised floats, and copies of
  stored soft-label files). Written to a temporary sibling and renamed into place.

  Args:
    root: the directory to create.
    images: f32[N, H, W, ch] (or [C, k, H, W, ch]) normalised images.
    labels: i[N] (or [C, k]) class indices.
    class_names: the C class names.
    mean, std: the normalisation (pixel scale [0, 1]).
    weights: f32[N] sample (barycenter) weights; None: ones.
    soft_labels: ``.npz`` files from :func:`wmdd_jax.protocol.save_soft_labels` to include.
    overwrite: replace an existing ``root``.

  Returns:
    The absolute path of ``root``.

  Raises:
    ShapeError: images, labels and weights that do not match.
    ConfigError: ``root`` exists without ``overwrite``.
  """
  from PIL import Image  # noqa: PLC0415 - host-only dependency

  root = os.path.abspath(os.fspath(root))
  x = np.asarray(images, np.float32)
  x = x.reshape(-1, *x.shape[-3:]) if x.ndim >= 4 else x
  y = np.asarray(labels, np.int64).reshape(-1)
  if x.ndim != 4 or len(y) != len(x):
    raise ShapeError(f"export_for_pytorch needs images f32[N, H, W, ch] and N labels, got "
                     f"{x.shape} and {y.shape}.")
  _check_channels(x.shape[-1], "export_for_pytorch")
  if y.size and (y.min() < 0 or y.max() >= len(class_names)):
    raise ShapeError(f"labels must be in [0, {len(class_names)}), got {y.min()}..{y.max()}.")
  w = np.ones(len(x), np.float32) if weights is None else np.asarray(weights,
                                                                      np.float32).reshape(-1)
  if w.shape != y.shape:
    raise ShapeError(f"{w.size} weights for {len(y)} images; pass one weight per image.")
  if os.path.exists(root) and not overwrite:
    raise ConfigError(f"{root} exists; pass overwrite=True to replace it or choose a new path.")
  m, s = _constants(mean, std, x.shape[-1])
  pixels = np.clip(np.rint((x * s + m) * 255.0), 0, 255).astype(np.uint8)
  parent = os.path.dirname(root)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(root)}.tmp-", dir=parent)
  try:
    files = []
    for i, (img, label) in enumerate(zip(pixels, y)):
      name = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in class_names[label])
      rel = os.path.join("images", f"{label:04d}_{name}", f"{i:05d}.png")
      os.makedirs(os.path.join(tmp, os.path.dirname(rel)), exist_ok=True)
      Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img).save(os.path.join(tmp, rel))
      files.append({"file": rel, "label": int(label), "weight": float(w[i]), "index": i})
    copied = []
    for path in soft_labels:
      shutil.copyfile(os.fspath(path), os.path.join(tmp, os.path.basename(os.fspath(path))))
      copied.append(os.path.basename(os.fspath(path)))
    meta = {"format": EXPORT_FORMAT, "class_names": list(class_names),
            "mean": m.tolist(), "std": s.tolist(), "image_shape": list(x.shape[1:]),
            "soft_labels": copied, "files": files}
    with open(os.path.join(tmp, "labels.json"), "w") as f:
      json.dump(meta, f, indent=1)
    np.savez_compressed(os.path.join(tmp, "synset.npz"), images_u8=pixels, images=x,
                        labels=y.astype(np.int32), weights=w)
    with open(os.path.join(tmp, "README.txt"), "w") as f:
      f.write(_EXPORT_README.format(fmt=EXPORT_FORMAT, soft=_SOFT_README if copied else ""))
    _swap_in(tmp, root)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return root
