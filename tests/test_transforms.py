"""Tests of wmdd_jax.data.transforms against hand-computed results."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from wmdd_jax import ConfigError, ShapeError
from wmdd_jax.data import transforms as T


@pytest.fixture
def image(rng):
  return jnp.asarray(rng.uniform(size=(7, 9, 3)), jnp.float32)


@pytest.fixture
def batch(rng):
  return jnp.asarray(rng.uniform(size=(5, 14, 14, 2)), jnp.float32)


def test_flip_twice_is_identity_and_mirrors_columns(image):
  np.testing.assert_array_equal(T.flip(T.flip(image)), image)
  np.testing.assert_array_equal(T.flip(image)[:, 0], image[:, -1])


def test_random_flip_is_one_of_two(key, image):
  outs = [T.random_flip(jax.random.fold_in(key, i), image) for i in range(16)]
  flipped = [bool(jnp.array_equal(o, T.flip(image))) for o in outs]
  assert all(f or jnp.array_equal(o, image) for f, o in zip(flipped, outs))
  assert 0 < sum(flipped) < 16


def test_roll_shift_matches_np_roll_and_wraps(image):
  expected = np.roll(np.asarray(image), (1, 1), axis=(0, 1))
  np.testing.assert_array_equal(T.roll_shift(image, 1, 1), expected)
  np.testing.assert_array_equal(
      T.roll_shift(image, -2, 3), np.roll(np.asarray(image), (-2, 3), axis=(0, 1))
  )
  h, w = image.shape[:2]
  np.testing.assert_array_equal(T.roll_shift(image, h, w), image)
  shifted = jax.jit(T.roll_shift)(image, jnp.int32(2), jnp.int32(-1))  # Traced shifts.
  np.testing.assert_array_equal(shifted, np.roll(np.asarray(image), (2, -1), axis=(0, 1)))


def test_jitter_range_and_identity(key, image):
  np.testing.assert_array_equal(T.jitter(key, image, 0), image)
  seen = set()
  for i in range(40):
    out = np.asarray(T.jitter(jax.random.fold_in(key, i), image, 1))
    match = [
        (dy, dx)
        for dy in range(0, 2)
        for dx in range(0, 2)
        if np.array_equal(out, np.roll(np.asarray(image), (dy, dx), axis=(0, 1)))
    ]
    assert len(match) == 1
    seen.add(match[0])
  # The official draw: random.randint(0, lim) on each axis, both ends included, never negative.
  assert seen == {(0, 0), (0, 1), (1, 0), (1, 1)}


def test_crop_and_resize_integer_window_equals_slicing(image):
  out = T.crop_and_resize(image, (2, 3, 4, 5), (4, 5))
  np.testing.assert_allclose(out, image[2:6, 3:8], atol=1e-6)
  traced = jax.jit(T.crop_and_resize, static_argnums=2)(image, jnp.array([1, 0, 6, 9]), (6, 9))
  np.testing.assert_allclose(traced, image[1:7], atol=1e-6)


def test_crop_and_resize_matches_torch_bilinear_upsampling():
  # 2x upsampling of [0, 1, 2] with half-pixel centres (torch align_corners=False):
  # outputs sample at x = 0.25, 0.75, ... clamped at the borders.
  row = jnp.asarray([0.0, 1.0, 2.0]).reshape(1, 3, 1)
  out = T.crop_and_resize(row, (0, 0, 1, 3), (1, 6))
  np.testing.assert_allclose(out[0, :, 0], [0.0, 0.25, 0.75, 1.25, 1.75, 2.0], atol=1e-6)


def test_crop_and_resize_batches_share_the_box(batch):
  out = T.crop_and_resize(batch, (1, 2, 7, 7), (7, 7))
  np.testing.assert_allclose(out, batch[:, 1:8, 2:9], atol=1e-6)


def test_resize_center_crop():
  image = jnp.arange(8 * 8, dtype=jnp.float32).reshape(8, 8, 1)
  np.testing.assert_array_equal(T.resize_center_crop(image, (8, 8)), image)
  # Shorter side kept (8), centre 4x4 window: exactly the slice.
  np.testing.assert_allclose(T.resize_center_crop(image, (4, 4), resize_shorter=8), image[2:6, 2:6])
  # A 4x8 image to 4x4: cover = no scaling, crop the middle columns.
  wide = jnp.arange(32, dtype=jnp.float32).reshape(4, 8, 1)
  np.testing.assert_allclose(T.resize_center_crop(wide, (4, 4)), wide[:, 2:6], atol=1e-6)
  assert T.resize_center_crop(image, (3, 5)).shape == (3, 5, 1)
  with pytest.raises(ConfigError, match="resize_shorter"):
    T.resize_center_crop(image, (8, 8), resize_shorter=4)


def test_sample_crop_box_follows_torchvision_rules():
  h, w = 32, 24
  # A loop over fresh keys reuses one compiled sampler (vmapping it compiles a slow second one,
  # and indexing a key array eagerly is slow too).
  boxes = np.stack([np.asarray(T.sample_crop_box(jax.random.key(i), (h, w))) for i in range(150)])
  y0, x0, bh, bw = boxes.T
  assert np.all((y0 >= 0) & (x0 >= 0) & (y0 + bh <= h) & (x0 + bw <= w) & (bh > 0) & (bw > 0))
  area = bh * bw / (h * w)
  assert area.min() >= 0.05 and area.max() <= 1.0  # 0.08 up to rounding of small boxes.
  # Aspect ratios within [3/4, 4/3] up to the rounding of h and w.
  aspect = bw / bh
  assert np.all(aspect >= 0.75 * (1 - 2 / bh.clip(1))) and np.all(aspect <= 4 / 3 * (1 + 2 / bh))
  assert len({tuple(b) for b in boxes}) > 120  # Boxes vary.


def test_sample_crop_box_fallback_is_the_clamped_centre(key):
  # A 4x40 image cannot hold any box of ratio <= 4/3 with area >= 90 %: the fallback is used.
  box = T.sample_crop_box(key, (4, 40), scale=(0.9, 1.0))
  assert np.asarray(box).tolist() == [0, 17, 4, 5]  # w = round(4 * 4/3) = 5, centred.
  box = T.sample_crop_box(key, (40, 4), scale=(0.9, 1.0))
  assert np.asarray(box).tolist() == [17, 0, 5, 4]  # h = round(4 / (3/4)) = 5.


def test_random_resized_crop_shape_determinism_jit_vmap(key, image):
  out = T.random_resized_crop(key, image, (5, 6))
  assert out.shape == (5, 6, 3) and out.dtype == jnp.float32
  np.testing.assert_array_equal(out, T.random_resized_crop(key, image, (5, 6)))
  other = T.random_resized_crop(jax.random.fold_in(key, 1), image, (5, 6))
  assert not np.allclose(other, out)
  # Under an outer jit, vmapped over keys and images (the box is traced).
  keys = jax.random.split(key, 4)
  images = jnp.stack([image] * 4)
  per_image = jax.jit(jax.vmap(lambda k, x: T.random_resized_crop(k, x, (5, 6))))(keys, images)
  assert per_image.shape == (4, 5, 6, 3)
  np.testing.assert_allclose(per_image[2], T.random_resized_crop(keys[2], image, (5, 6)), atol=1e-5)


def test_random_resized_crop_with_full_box_is_identity(key, image):
  # scale=(1, 1) and a ratio range holding the image's own ratio: the box is the whole image.
  out = T.random_resized_crop(key, image, (7, 9), scale=(1.0, 1.0), ratio=(9 / 7, 9 / 7))
  np.testing.assert_allclose(out, image, atol=1e-6)


def test_pad_and_random_crop(key, image):
  out = T.pad_and_random_crop(key, image, 2)
  assert out.shape == image.shape
  padded = np.pad(np.asarray(image), ((2, 2), (2, 2), (0, 0)))
  windows = [padded[i : i + 7, j : j + 9] for i in range(5) for j in range(5)]
  assert any(np.array_equal(out, wdw) for wdw in windows)
  np.testing.assert_array_equal(T.pad_and_random_crop(key, image, 0), image)
  batched = jax.jit(jax.vmap(lambda k, x: T.pad_and_random_crop(k, x, 2)))(
      jax.random.split(key, 3), jnp.stack([image] * 3)
  )
  assert batched.shape == (3, 7, 9, 3)


def test_normalize_round_trip_and_u8_input():
  mean, std = (0.5, 0.25, 0.75), (0.2, 0.5, 0.1)
  pixels = jnp.asarray(np.arange(2 * 2 * 3, dtype=np.uint8).reshape(2, 2, 3) * 20)
  x = T.normalize(pixels, mean, std)
  np.testing.assert_allclose(x[0, 0], (np.array([0, 20, 40]) / 255 - mean) / std, rtol=1e-6)
  np.testing.assert_allclose(T.denormalize(x, mean, std), pixels / 255.0, atol=1e-6)
  floats = pixels.astype(jnp.float32) / 255
  np.testing.assert_allclose(T.normalize(floats, mean, std), x, atol=1e-6)


def test_clip_to_valid_maps_back_into_unit_range(rng):
  mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
  x = jnp.asarray(rng.normal(scale=5.0, size=(4, 6, 6, 3)), jnp.float32)
  clipped = T.clip_to_valid(x, mean, std)
  pixels = np.asarray(T.denormalize(clipped, mean, std))
  assert pixels.min() >= -1e-6 and pixels.max() <= 1 + 1e-6
  assert np.isclose(pixels.min(), 0, atol=1e-6) and np.isclose(pixels.max(), 1, atol=1e-6)
  inside = T.normalize(jnp.full((2, 2, 3), 0.5), mean, std)
  np.testing.assert_array_equal(T.clip_to_valid(inside, mean, std), inside)


def test_augment_batch_shared_draw(key, batch):
  out = T.augment_batch(key, batch)
  assert out.shape == batch.shape
  # One draw for the batch: the same transform of identical images is identical, and the
  # batch result equals applying that draw to each image alone.
  same = T.augment_batch(key, jnp.stack([batch[0]] * 5))
  np.testing.assert_allclose(same, jnp.broadcast_to(same[:1], same.shape), atol=1e-6)
  alone = T.augment_batch(key, jnp.stack([batch[1]] * 5))  # Same shape: no recompilation.
  np.testing.assert_allclose(out[1], alone[0], atol=1e-5)
  np.testing.assert_array_equal(out, T.augment_batch(key, batch))  # Deterministic.


def test_augment_batch_per_image_draws(key, batch):
  same = T.augment_batch(key, jnp.stack([batch[0]] * 5), per_image=True)
  distinct = {np.asarray(im).tobytes() for im in same}
  assert len(distinct) > 1
  # Image j uses split(key, B)[j], as documented: the shared draw from that key.
  keys = jax.random.split(key, 5)
  shared = T.augment_batch(keys[3], jnp.stack([batch[0]] * 5))
  np.testing.assert_allclose(same[3], shared[0], atol=1e-5)


def test_augment_batch_options(key, batch):
  out = T.augment_batch(key, batch, out_hw=(8, 6))  # Jitted itself.
  assert out.shape == (5, 8, 6, 2)
  # With the whole image as the crop and no flip, only the jitter is left: the batch is one
  # circular shift of itself by 0 to 14 // 7 = 2 pixels down and right (the official draw).
  rolled = np.asarray(T.augment_batch(key, batch, scale=(1.0, 1.0), ratio=(1.0, 1.0), flip=False))
  shifts = [
      (dy, dx)
      for dy in range(0, 3)
      for dx in range(0, 3)
      if np.allclose(rolled, np.roll(np.asarray(batch), (dy, dx), axis=(1, 2)), atol=1e-6)
  ]
  assert len(shifts) == 1
  with pytest.raises(ShapeError):
    T.augment_batch(key, batch[0])
  # Static sizes given as lists (as configs often hold them) work like tuples.
  listed = T.augment_batch(key, batch, out_hw=[8, 6], scale=[0.08, 1.0])
  np.testing.assert_array_equal(listed, out)


def test_transforms_reject_images_without_channels():
  with pytest.raises(ShapeError, match="channel"):
    T.flip(jnp.zeros((4, 4)))


def test_box_sampler_matches_reference_formula():
  # With one attempt's worth of draws replayed in numpy, the box is torchvision's formula.
  key = jax.random.key(3)
  h, w = 32, 24
  k_area, k_ratio, k_y, k_x = jax.random.split(key, 4)
  area = h * w * np.asarray(jax.random.uniform(k_area, (10,), minval=0.08, maxval=1.0))
  aspect = np.exp(
      np.asarray(jax.random.uniform(k_ratio, (10,), minval=math.log(3 / 4), maxval=math.log(4 / 3)))
  )
  bw = np.round(np.sqrt(area * aspect)).astype(int)
  bh = np.round(np.sqrt(area / aspect)).astype(int)
  i = int(np.argmax((bw <= w) & (bh <= h) & (bw > 0) & (bh > 0)))
  y0 = int(np.floor(float(jax.random.uniform(k_y)) * (h - bh[i] + 1)))
  x0 = int(np.floor(float(jax.random.uniform(k_x)) * (w - bw[i] + 1)))
  assert np.asarray(T.sample_crop_box(key, (h, w))).tolist() == [y0, x0, bh[i], bw[i]]


@pytest.mark.torch
def test_crop_and_resize_and_eval_transform_match_torch_interpolate():
  # torchvision on tensors: resized_crop = slice + interpolate(bilinear, antialias); Resize(s) +
  # CenterCrop = interpolate of the whole image to (s, int(s * long / short)) + a centre slice.
  torch = pytest.importorskip("torch")
  F = torch.nn.functional
  rng = np.random.default_rng(0)
  x = rng.normal(size=(2, 20, 14, 3)).astype(np.float32)
  t = torch.tensor(x.transpose(0, 3, 1, 2))
  ref = lambda r: r.numpy().transpose(0, 2, 3, 1)
  for box, out, aa in [((3, 2, 9, 7), (16, 16), True), ((0, 1, 20, 12), (8, 6), True),
                       ((0, 1, 20, 12), (8, 6), False), ((5, 0, 11, 14), (11, 14), True)]:
    y0, x0, h, w = box
    want = F.interpolate(t[:, :, y0:y0 + h, x0:x0 + w], size=out, mode="bilinear",
                         align_corners=False, antialias=aa)
    got = T.crop_and_resize(jnp.asarray(x), jnp.asarray(box), out, antialias=aa)
    np.testing.assert_allclose(got, ref(want), atol=1e-5)
  # Resize(10) + CenterCrop(8): 20x14 -> 14x10 (int(10 * 20 / 14) = 14), window from row 3.
  want = F.interpolate(t, size=(14, 10), mode="bilinear", align_corners=False, antialias=True)
  got = T.resize_center_crop(jnp.asarray(x), (8, 8), resize_shorter=10)
  np.testing.assert_allclose(got, ref(want[:, :, 3:11, 1:9]), atol=1e-5)
