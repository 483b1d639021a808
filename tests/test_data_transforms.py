"""Training augmentation and evaluation resizing (numpy / OpenCV), step by step.

Bit-for-bit agreement with mmseg is tested on its golden cases in test_data_replay.py."""

import colorsys

import numpy as np
import pytest

from otseg_jax.data import transforms as T


def test_rescale_and_eval_sizes_follow_mmseg():
  # VOC-like 500x375: (2048, 512) fits the short side to 512.
  assert T.rescale_size(375, 500, (2048, 512)) == (512, 683)
  # Long side limited: a 512x2100 panorama fits the long side to 2048.
  assert T.rescale_size(512, 2100, (2048, 512)) == (499, 2048)
  # Test pipelines: min_size 512 forces the short side, Context's (520, 520) gives 520.
  assert T.eval_size(375, 500, (2048, 512), 512) == (512, 683)
  assert T.eval_size(512, 2100, (2048, 512), 512) == (512, 2100)
  assert T.eval_size(375, 500, (520, 520), 512) == (520, 693)
  assert T.eval_size(375, 500, (2048, 512), None) == (512, 683)
  assert T.eval_size(40, 48, None, None) == (40, 48)


def test_random_scale_stays_in_ratio_range():
  shorts = [min(T.random_scale_size(375, 500, np.random.default_rng(s), (2048, 512), (0.5, 2.0)))
            for s in range(200)]
  assert 256 <= min(shorts) < 300 and 980 < max(shorts) <= 1024


def test_resize_label_uses_cv2_nearest_rule():
  label = np.array([[1, 2], [3, 4]], np.uint8)
  np.testing.assert_array_equal(T.resize_label(label, (4, 4)),
                                np.repeat(np.repeat(label, 2, 0), 2, 1))
  row = np.arange(10, dtype=np.uint8)[None]
  np.testing.assert_array_equal(T.resize_label(row, (1, 4)), [[0, 2, 5, 7]])  # floor(x * 2.5)


def test_resize_image_is_bilinear_without_antialiasing():
  # Columns 0, 255, 0, ... shrunk 9 -> 3: cv2 INTER_LINEAR samples the source at x = 3i + 1
  # (half-pixel centres), i.e. single columns; an antialiasing filter (PIL) would average them.
  stripes = np.tile(np.array([0, 255], np.uint8), 5)[:9]
  image = np.repeat(stripes[None, :, None], 4, 0).repeat(3, 2)
  np.testing.assert_array_equal(T.resize_image(image, (4, 3))[0, :, 0], [255, 0, 255])
  # Upscaling 2x puts output pixel 1 at source x = 0.25: 0.75 * 0 + 0.25 * 255 = 63.75 -> 64.
  ramp = np.array([[0, 255]], np.uint8)[..., None].repeat(3, 2)
  np.testing.assert_array_equal(T.resize_image(ramp, (1, 4))[0, :, 0], [0, 64, 191, 255])
  assert T.resize_image(image, (4, 9)) is image


def test_resize_rejects_bad_input():
  with pytest.raises(ValueError, match='uint8'):
    T.resize_image(np.zeros((4, 4, 3), np.float32), (8, 8))
  with pytest.raises(ValueError, match='label map'):
    T.resize_label(np.zeros((4, 4, 1), np.uint8), (8, 8))


def test_crop_is_balanced_ignores_255():
  def label(counts):
    return np.concatenate([np.full(n, v, np.uint8) for v, n in counts.items()])
  assert T.crop_is_balanced(label({1: 70, 2: 30}), 0.75)
  assert T.crop_is_balanced(label({1: 70, 2: 30, 255: 900}), 0.75)
  assert not T.crop_is_balanced(label({1: 80, 2: 20}), 0.75)
  assert not T.crop_is_balanced(label({1: 50, 255: 50}), 0.75)  # a single class never passes


def test_crops_respect_cat_max_ratio_when_possible():
  # Bands of 48 rows of classes 1, 2, 3. A 64-row crop at y0 holds 48 rows (75 %) of one class,
  # so fails, iff y0 == 0, 32 <= y0 <= 48 or y0 == 80: 19 of the 81 offsets.
  label = np.repeat(np.array([1, 2, 3], np.uint8), 48)[:, None].repeat(64, 1)

  def balanced(y0):
    return not (y0 == 0 or 32 <= y0 <= 48 or y0 == 80)

  offsets = [T.random_crop_offset(label, np.random.default_rng(s), 64, 0.75) for s in range(100)]
  assert all(balanced(y0) and x0 == 0 for y0, x0 in offsets)
  assert all(T.crop_is_balanced(label[y0:y0 + 64], 0.75) for y0, _ in offsets)
  unchecked = [T.random_crop_offset(label, np.random.default_rng(s), 64, 1.0)[0]
               for s in range(100)]
  assert sum(not balanced(y0) for y0 in unchecked) > 10
  # Impossible (one class plus ignore): still returns a valid crop after the tries.
  y0, x0 = T.random_crop_offset(np.where(label == 1, 1, 255).astype(np.uint8),
                                np.random.default_rng(0), 64, 0.75)
  assert 0 <= y0 <= 80 and x0 == 0


def _coded_record(h=40, w=48):
  """Image whose red channel is 10 * label, so a test can check they moved together."""
  label = (np.arange(w)[None, :] * 20 // w).repeat(h, 0).astype(np.uint8)
  image = np.zeros((h, w, 3), np.uint8)
  image[..., 0] = label * 10
  image[..., 1] = 77
  return image, label


def test_flip_moves_labels_with_images():
  image, label = _coded_record()
  augment = T.TrainAugment(img_scale=(48, 40), ratio_range=(1.0, 1.0), cat_max_ratio=1.0,
                           photometric=False)
  flipped = 0
  for seed in range(12):
    out_image, out_label = T.train_transform(image, label, np.random.default_rng(seed), 64,
                                             augment)
    red = out_image[..., 0] * T.STD[0] + T.MEAN[0]
    valid = out_label != 255
    assert valid.sum() == 40 * 48
    np.testing.assert_allclose(red[valid], out_label[valid] * 10.0, atol=1e-3)
    flipped += bool(out_label[0, 0] == label[0, -1])
  assert 0 < flipped < 12


def test_pad_values_are_zero_and_ignore():
  image, label = _coded_record(30, 20)
  out_image, out_label = T.train_transform(image, label, np.random.default_rng(0), 32, None)
  assert out_image.shape == (32, 32, 3) and out_image.dtype == np.float32
  assert out_label.shape == (32, 32)
  assert (out_image[30:] == 0).all() and (out_image[:, 20:] == 0).all()
  assert (out_label[30:] == 255).all() and (out_label[:, 20:] == 255).all()
  np.testing.assert_array_equal(out_label[:30, :20], label)
  with pytest.raises(ValueError, match='larger than the crop'):
    T.train_transform(image, label, np.random.default_rng(0), 16, None)


def test_full_augmentation_shapes_and_ranges():
  rng = np.random.default_rng(0)
  image = rng.integers(0, 256, (375, 500, 3), dtype=np.uint8)
  label = rng.integers(0, 21, (375, 500), dtype=np.uint8)
  out_image, out_label = T.train_transform(image, label, np.random.default_rng(3), 512,
                                           T.TrainAugment())
  assert out_image.shape == (512, 512, 3) and out_image.dtype == np.float32
  assert out_label.shape == (512, 512) and out_label.dtype == np.uint8
  lo = (0 - np.array(T.MEAN)) / np.array(T.STD)
  hi = (255 - np.array(T.MEAN)) / np.array(T.STD)
  assert (out_image >= lo - 1e-5).all() and (out_image <= hi + 1e-5).all()
  again = T.train_transform(image, label, np.random.default_rng(3), 512, T.TrainAugment())
  np.testing.assert_array_equal(again[0], out_image)
  np.testing.assert_array_equal(again[1], out_label)


def test_normalize():
  image = np.random.default_rng(1).integers(0, 256, (7, 9, 3), dtype=np.uint8)
  expected = (image.astype(np.float64) - np.array(T.MEAN)) / np.array(T.STD)
  np.testing.assert_allclose(T.normalize(image), expected, rtol=1e-5, atol=1e-5)
  assert T.normalize(image).dtype == np.float32


def test_hsv_matches_opencv_convention():
  rgb = np.random.default_rng(2).integers(0, 256, (64, 64, 3), dtype=np.uint8)
  hsv = T.rgb_to_hsv(rgb)
  assert hsv[..., 0].max() < 180
  for (r, g, b), (h, s, v) in zip(rgb.reshape(-1, 3)[:500], hsv.reshape(-1, 3)[:500]):
    hh, ss, vv = colorsys.rgb_to_hsv(r / 255, g / 255, b / 255)
    # cv2 rounds through 12-bit fixed-point reciprocals: within one level of the exact value.
    assert v == round(vv * 255) and abs(int(s) - ss * 255) <= 1
    dh = abs(int(h) - hh * 180)
    assert min(dh, 180 - dh) <= 1
  grey = np.full((2, 2, 3), 90, np.uint8)
  np.testing.assert_array_equal(T.rgb_to_hsv(grey)[..., :2], 0)
  back = T.hsv_to_rgb(hsv).astype(int)
  assert np.abs(back - rgb).max() <= 5 and np.abs(back - rgb).mean() < 0.6
  primaries = np.array([[[255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 0]]], np.uint8)
  np.testing.assert_array_equal(T.rgb_to_hsv(primaries)[0, :, 0], [0, 60, 120, 30])
  np.testing.assert_array_equal(T.hsv_to_rgb(T.rgb_to_hsv(primaries)), primaries)


def test_photometric_distortion_is_deterministic_and_bounded():
  image = np.random.default_rng(4).integers(0, 256, (32, 32, 3), dtype=np.uint8)
  outs = [T.photometric_distortion(image, np.random.default_rng(s)) for s in range(20)]
  assert all(o.dtype == np.uint8 and o.shape == image.shape for o in outs)
  np.testing.assert_array_equal(outs[5], T.photometric_distortion(image,
                                                                  np.random.default_rng(5)))
  assert sum(not np.array_equal(o, image) for o in outs) >= 15
  # A pure red patch (cv2 hue 0) ends within the hue delta, randint(-18, 18), both ways, give or
  # take the uint8 rounding of the other steps.
  red = np.zeros((4, 4, 3), np.uint8)
  red[..., 0] = 255
  hues = {int(T.rgb_to_hsv(T.photometric_distortion(red, np.random.default_rng(s)))[0, 0, 0])
          for s in range(200)}
  assert hues <= set(range(0, 22)) | set(range(158, 180))
  assert max(h for h in hues if h < 90) >= 12 and min(h for h in hues if h > 90) <= 168
