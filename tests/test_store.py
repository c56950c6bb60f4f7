"""Synthetic sets stored as the official pipeline hands them to the student (wmdd_jax.store)."""

import io
import os

import numpy as np
import pytest
from PIL import Image

from wmdd_jax import ConfigError, DataError, DatasetNotFoundError, NonFiniteError, ShapeError, store

MEAN = (0.485, 0.456, 0.406)  # the official constants (recover/utils.py:127-128)
STD = (0.229, 0.224, 0.225)


def _official_quantize(images, mean, std):
  """recover/utils.py denormalize + data_synthesis_new.py save_images, in numpy float32.

  torch evaluates ``clamp(x * s + m, 0, 1)`` on a float32 tensor with the float64 numpy
  constants cast to float32 (they are scalars); ``image_np * 255`` stays float32 (NEP 50) and
  ``astype(np.uint8)`` truncates.
  """
  out = np.empty(images.shape, np.float32)
  for c in range(images.shape[-1]):
    m, s = np.float32(np.float64(mean[c])), np.float32(np.float64(std[c]))
    out[..., c] = np.clip(images[..., c].astype(np.float32) * s + m, 0, 1)
  return (out * 255).astype(np.uint8)


def _pil_default_jpeg(img_u8):
  """``Image.fromarray(img).save(path.jpg)`` as the official code calls it (no quality)."""
  buf = io.BytesIO()
  Image.fromarray(img_u8[..., 0] if img_u8.shape[-1] == 1 else img_u8).save(buf, format="JPEG")
  return buf.getvalue()


def _student_view(data, mean, std, channels=3):
  """ImageFolder pil_loader + ToTensor + Normalize, in numpy float32 (channels last)."""
  with Image.open(io.BytesIO(data)) as img:
    arr = np.asarray(img.convert("RGB" if channels == 3 else "L"))
  arr = arr[..., None] if arr.ndim == 2 else arr
  return (arr.astype(np.float32) / np.float32(255) - np.asarray(mean, np.float32)) \
      / np.asarray(std, np.float32)


def _smooth_images(rng, shape):
  """Normalised images with some structure (JPEG of pure noise is a poor test), partly
  outside the [0, 1] pixel range so clamping is exercised."""
  *lead, h, w, ch = shape
  yy, xx = np.meshgrid(np.linspace(0, 1, h), np.linspace(0, 1, w), indexing="ij")
  base = np.sin(3 * xx + 2 * yy)[..., None] * np.ones(ch)
  return (2.5 * base + 0.3 * rng.standard_normal((*lead, h, w, ch))).astype(np.float32)


def test_quantize_matches_official_expressions(rng):
  x = _smooth_images(rng, (2, 3, 8, 8, 3))
  got = store.quantize_like_official(x, MEAN, STD)
  assert got.dtype == np.uint8 and got.shape == x.shape
  np.testing.assert_array_equal(got, _official_quantize(x, MEAN, STD))
  # Clamping happened on both sides.
  assert (got == 0).any() and (got == 255).any()


def test_quantize_truncates_not_rounds():
  # Pixels (v + 0.7) / 255 truncate to v (rounding would give v + 1); out-of-range clamps.
  v = np.arange(0, 250, 7, dtype=np.float32)
  p = np.concatenate([(v + 0.7) / 255, [-0.3, 1.0, 1.7]]).astype(np.float32)
  x = ((p - 0.5) / 0.25).reshape(1, -1, 1).astype(np.float32)
  got = store.quantize_like_official(x, (0.5,), (0.25,)).reshape(-1)
  np.testing.assert_array_equal(got[:-3], v.astype(np.uint8))
  np.testing.assert_array_equal(got[-3:], [0, 255, 255])


@pytest.mark.torch
def test_quantize_matches_torch_denormalize(rng):
  torch = pytest.importorskip("torch")
  x = _smooth_images(rng, (4, 6, 5, 3))
  t = torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()
  mean, std = np.array(MEAN), np.array(STD)  # float64, as recover/utils.py:127-128
  for c in range(3):  # recover/utils.py:130-132, verbatim
    m, s = mean[c], std[c]
    t[:, c] = torch.clamp(t[:, c] * s + m, 0, 1)
  ref = np.stack([(t[i].numpy().transpose((1, 2, 0)) * 255).astype(np.uint8)
                  for i in range(t.shape[0])])
  np.testing.assert_array_equal(store.quantize_like_official(x, MEAN, STD), ref)


@pytest.mark.parametrize("ch", [3, 1])
def test_default_quality_is_pil_default(rng, ch, tmp_path):
  u8 = rng.integers(0, 256, (2, 12, 16, ch), dtype=np.uint8)
  got = store.encode_jpeg(u8)
  assert got == [_pil_default_jpeg(img) for img in u8]
  # Saving to a .jpg path (as the official code does) writes the same bytes.
  path = tmp_path / "x.jpg"
  Image.fromarray(u8[0, ..., 0] if ch == 1 else u8[0]).save(path)
  assert path.read_bytes() == got[0]
  assert store.encode_jpeg(u8, quality=90) != got
  with Image.open(io.BytesIO(got[0])) as img:
    assert img.format == "JPEG" and img.mode == ("L" if ch == 1 else "RGB")


@pytest.mark.parametrize("ch", [3, 1])
def test_roundtrip_is_what_the_student_sees(rng, ch):
  mean, std = (MEAN, STD) if ch == 3 else ((0.2860,), (0.3530,))
  x = _smooth_images(rng, (2, 3, 16, 16, ch))
  seen, data = store.jpeg_roundtrip(x, mean, std)
  assert seen.shape == x.shape and seen.dtype == np.float32 and len(data) == 6
  # The bytes are PIL's default JPEG of the official quantisation, class-major.
  u8 = _official_quantize(x, mean, std)
  assert data == [_pil_default_jpeg(img) for img in u8.reshape(-1, 16, 16, ch)]
  # Decoding them as the student's loader does gives exactly the returned images.
  ref = np.stack([_student_view(d, mean, std, ch) for d in data]).reshape(x.shape)
  np.testing.assert_array_equal(seen, ref)
  # Lossy, but close: within JPEG q75 error of the quantised pixels.
  pix_err = np.abs((seen - store.normalize_like_official(u8, mean, std)) * np.float32(std))
  assert 0 < pix_err.mean() < 0.05
  # decode_jpeg agrees with the loader.
  np.testing.assert_array_equal(
      store.normalize_like_official(store.decode_jpeg(data, (16, 16, ch)), mean, std),
      ref.reshape(-1, 16, 16, ch))


@pytest.mark.torch
def test_renormalisation_matches_torchvision_expressions(rng):
  torch = pytest.importorskip("torch")
  u8 = rng.integers(0, 256, (3, 5, 4, 3), dtype=np.uint8)
  t = torch.from_numpy(u8).permute(0, 3, 1, 2).to(torch.float32).div(255)  # ToTensor
  t = t.sub(torch.as_tensor(MEAN)[:, None, None]).div(torch.as_tensor(STD)[:, None, None])
  np.testing.assert_array_equal(store.normalize_like_official(u8, MEAN, STD),
                                t.permute(0, 2, 3, 1).numpy())


def _official_weights_map(root):
  """relabel/utils_fkd.py:309-330 load_weights_file, minus the path keys."""
  with open(os.path.join(root, "sample_weights.txt")) as f:
    weights = [[float(w) for w in line.split()] for line in f]
  out = {}
  for d in os.listdir(root):
    if d.startswith("new"):
      for fn in os.listdir(os.path.join(root, d)):
        class_id = int(fn.split("_id")[0].split("class")[-1])
        image_id = int(fn.split("_id")[1].split(".")[0])
        out[(class_id, image_id)] = weights[class_id][image_id]
  return out


@pytest.mark.parametrize("ch", [3, 1])
def test_folder_roundtrip(rng, tmp_path, ch):
  u8 = rng.integers(0, 256, (3, 2, 8, 12, ch), dtype=np.uint8)
  weights = rng.dirichlet(np.ones(2), size=3).astype(np.float32)
  root = store.write_image_folder(tmp_path / "syn", u8, class_names=["a", "b", "c"],
                                  weights=weights)
  assert sorted(os.listdir(tmp_path)) == ["syn"]  # no temp dirs left
  assert sorted(os.listdir(root)) == ["class_names.txt", "new000", "new001", "new002",
                                      "sample_weights.txt"]
  assert sorted(os.listdir(os.path.join(root, "new001"))) == ["class001_id000.jpg",
                                                              "class001_id001.jpg"]
  # The exact bytes the official save_images would write for these pixels.
  with open(os.path.join(root, store.image_path(2, 1)), "rb") as f:
    assert f.read() == _pil_default_jpeg(u8[2, 1])
  images, ids = store.read_image_folder(root)
  np.testing.assert_array_equal(ids, [0, 1, 2])
  np.testing.assert_array_equal(images, store.decode_jpeg(store.encode_jpeg(u8), u8.shape[2:])
                                .reshape(u8.shape))
  np.testing.assert_allclose(store.read_sample_weights(root), weights, atol=1e-6)
  assert _official_weights_map(root)[(1, 0)] == pytest.approx(weights[1, 0], abs=1e-6)


def test_folder_from_roundtrip_bytes(rng, tmp_path):
  x = _smooth_images(rng, (2, 3, 8, 8, 3))
  seen, data = store.jpeg_roundtrip(x, MEAN, STD)
  root = store.write_image_folder(tmp_path / "syn", data, class_ids=[0, 1])
  images, _ = store.read_image_folder(root)
  np.testing.assert_array_equal(store.normalize_like_official(images, MEAN, STD), seen)
  np.testing.assert_allclose(store.read_sample_weights(root), np.full((2, 3), 1 / 3), atol=1e-6)
  # Nested [C][k] bytes write the same files; overwrite replaces atomically.
  with pytest.raises(ConfigError, match="overwrite"):
    store.write_image_folder(root, [data[:3], data[3:]])
  store.write_image_folder(root, [data[3:], data[:3]], overwrite=True)
  again, _ = store.read_image_folder(root)
  np.testing.assert_array_equal(again, images[::-1])
  assert sorted(os.listdir(tmp_path)) == ["syn"]


def test_errors(rng, tmp_path):
  x = _smooth_images(rng, (2, 8, 8, 3))
  with pytest.raises(ShapeError):
    store.quantize_like_official(x[0, 0], MEAN, STD)  # [W, ch]
  with pytest.raises(ShapeError, match="floats"):
    store.quantize_like_official(x.astype(np.uint8), MEAN, STD)
  with pytest.raises(ShapeError, match="per channel"):
    store.quantize_like_official(x, MEAN[:1], STD[:1])
  with pytest.raises(NonFiniteError):
    store.quantize_like_official(np.full((1, 2, 2, 1), np.nan, np.float32), (0.5,), (0.5,))
  with pytest.raises(ShapeError, match="channels"):
    store.jpeg_roundtrip(np.zeros((1, 4, 4, 2), np.float32), (0.5, 0.5), (0.5, 0.5))
  with pytest.raises(ShapeError):
    store.encode_jpeg(np.zeros((4, 4, 3), np.float32))
  with pytest.raises(ConfigError, match="quality"):
    store.encode_jpeg(np.zeros((4, 4, 3), np.uint8), quality=0)
  data = store.encode_jpeg(np.zeros((1, 4, 4, 3), np.uint8))
  with pytest.raises(DataError, match="expected"):
    store.decode_jpeg(data, (4, 5, 3))
  with pytest.raises(ShapeError):
    store.decode_jpeg(data, (4, 4))
  with pytest.raises(DataError, match="not a readable JPEG"):
    store.decode_jpeg([b"not a jpeg"], (4, 4, 3))
  with pytest.raises(ShapeError):
    store.write_image_folder(tmp_path / "a", np.zeros((2, 4, 4, 3), np.uint8))  # no k axis
  with pytest.raises(ShapeError, match="same number"):
    store.write_image_folder(tmp_path / "a", [data, data * 2])
  with pytest.raises(ShapeError, match="class_ids"):
    store.write_image_folder(tmp_path / "a", data * 3)  # flat, C unknown
  with pytest.raises(ShapeError, match="weights"):
    store.write_image_folder(tmp_path / "a", [data, data], weights=np.ones((2, 2)))
  with pytest.raises(ConfigError, match="999"):
    store.write_image_folder(tmp_path / "a", [data], class_ids=[1000])
  assert not os.path.exists(tmp_path / "a")
  with pytest.raises(DatasetNotFoundError):
    store.read_image_folder(tmp_path / "missing")
  root = store.write_image_folder(tmp_path / "b", [data, data])
  with open(os.path.join(root, "new001", "stray.png"), "wb") as f:
    f.write(b"x")
  with pytest.raises(DataError, match="stray.png"):
    store.read_image_folder(root)
