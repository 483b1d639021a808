"""Training augmentation and evaluation resizing, in numpy and OpenCV, one record at a time.

The reference trains with mmseg 0.x's pipeline
  Resize(img_scale, ratio_range=(0.5, 2)) -> RandomCrop(S, cat_max_ratio=0.75) -> RandomFlip(0.5)
  -> PhotoMetricDistortion -> Normalize(mean, std, to_rgb) -> Pad(S, 0 / 255)
and evaluates with Resize(img_scale, keep_ratio=True, min_size=512) -> Normalize. The functions here
do the same, step by step, each taking an explicit `np.random.Generator` so a record's augmentation
is a pure function of (record, seed). Images are RGB uint8 (H, W, 3) until `normalize`; labels are
uint8 (H, W) with 255 = ignore.

Resizing and the HSV conversions call OpenCV as mmcv 1.x does (cv2.resize INTER_LINEAR for images,
INTER_NEAREST for labels; cv2.cvtColor on uint8), so every step gives mmseg 0.24.1's arrays bit
for bit: `python -m otseg_jax.parity transforms ../shared/reference/transforms_cases.npz` replays
its golden cases (`otseg_jax.data.replay`). mmseg works on BGR images and we on RGB; every step
here treats the three channels alike (OpenCV's RGB and BGR conversions are the same code with the
channel indices swapped), so the order does not change a value.

The one difference from mmseg that we accept: random numbers come from numpy's Generator API, one
generator per record, not the global legacy RNG, so the draws differ; the distributions and the
order of the draws are mmseg's (the golden replay feeds mmseg's recorded draws through the same
calls).
"""

import dataclasses

import cv2
import numpy as np

from otseg_jax import classes

MEAN = (123.675, 116.28, 103.53)
STD = (58.395, 57.12, 57.375)
IGNORE = classes.IGNORE_INDEX


@dataclasses.dataclass(frozen=True)
class TrainAugment:
  """mmseg training augmentation settings (spec section 8); the crop size is passed separately.

  Context uses img_scale=(520, 520); VOC, COCO-Stuff and ADE (2048, 512).
  """
  img_scale: tuple[int, int] = (2048, 512)
  ratio_range: tuple[float, float] = (0.5, 2.0)
  cat_max_ratio: float = 0.75
  flip_prob: float = 0.5
  photometric: bool = True


# ---------------------------------------------------------------------------------------------
# Sizes (mmcv.rescale_size / mmseg Resize semantics)


def rescale_size(h: int, w: int, scale: tuple[float, float]) -> tuple[int, int]:
  """mmcv `rescale_size` with a tuple scale: fit (h, w) inside (long, short) = (max, min)(scale).

  scale_factor = min(max(scale) / max(h, w), min(scale) / min(h, w)); the new size rounds
  `x * scale_factor + 0.5` down, as mmcv does. Returns (new_h, new_w).
  """
  factor = min(max(scale) / max(h, w), min(scale) / min(h, w))
  return int(h * factor + 0.5), int(w * factor + 0.5)


def eval_size(h: int, w: int, img_scale: tuple[int, int] | None, min_size: int | None
              ) -> tuple[int, int]:
  """Image size at evaluation: mmseg Resize(img_scale, keep_ratio=True, min_size).

  Without min_size the image fits inside img_scale (long side <= max, short side <= min). With
  min_size (the reference's VOC / Context / COCO-Stuff test pipelines use 512) the short side
  becomes max(min(img_scale), min_size) whatever the long side: (2048, 512) -> short side 512,
  Context's (520, 520) -> short side 520. `img_scale=None` keeps the size.
  """
  if img_scale is None:
    return h, w
  if min_size is None:
    return rescale_size(h, w, img_scale)
  new_short = max(min(img_scale), min_size)
  return rescale_size(h, w, (new_short * max(h, w) / min(h, w), new_short))


# ---------------------------------------------------------------------------------------------
# Geometric steps


def resize_image(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
  """mmcv `imresize(image, (w, h))`: cv2.resize INTER_LINEAR of a uint8 image (H, W, C) to (h, w).

  No antialiasing when shrinking, OpenCV's fixed-point rounding; (H, W) == size returns `image`.
  """
  if image.ndim != 3 or image.dtype != np.uint8:
    raise ValueError(f'resize_image takes a uint8 (H, W, C) image, got {image.dtype} '
                     f'{image.shape}.')
  if image.shape[:2] == tuple(size):
    return image
  return cv2.resize(np.ascontiguousarray(image), (size[1], size[0]),
                    interpolation=cv2.INTER_LINEAR)


def resize_label(label: np.ndarray, size: tuple[int, int]) -> np.ndarray:
  """mmcv `imresize(label, (w, h), interpolation='nearest')`: cv2 INTER_NEAREST of (H, W) to (h, w).

  Output pixel x takes source pixel floor(x * (1 / (w / W))) (no half-pixel shift); OpenCV's own
  call, because that reciprocal rounds differently from W / w in about 1e-4 of the pixels.
  """
  if label.ndim != 2:
    raise ValueError(f'resize_label takes an (H, W) label map, got shape {label.shape}.')
  if label.shape == tuple(size):
    return label
  return cv2.resize(np.ascontiguousarray(label), (size[1], size[0]),
                    interpolation=cv2.INTER_NEAREST)


def random_scale_size(h: int, w: int, rng: np.random.Generator, img_scale: tuple[int, int],
                      ratio_range: tuple[float, float]) -> tuple[int, int]:
  """mmseg Resize with ratio_range and keep_ratio: scale = int(img_scale * ratio), then fit.

  ratio ~ U(ratio_range); returns the new (h, w) of an (h, w) image.
  """
  lo, hi = ratio_range
  ratio = rng.random() * (hi - lo) + lo
  scale = (int(img_scale[0] * ratio), int(img_scale[1] * ratio))
  return rescale_size(h, w, scale)


def crop_offset(h: int, w: int, crop_size: int, rng: np.random.Generator) -> tuple[int, int]:
  """Top-left corner of a random crop (mmseg `get_crop_bbox`): uniform over the valid offsets."""
  y0 = int(rng.integers(0, max(h - crop_size, 0) + 1))
  x0 = int(rng.integers(0, max(w - crop_size, 0) + 1))
  return y0, x0


def crop_is_balanced(label_crop: np.ndarray, cat_max_ratio: float) -> bool:
  """mmseg's acceptance test: >= 2 classes (255 not counted) and none above cat_max_ratio."""
  counts = np.bincount(label_crop.ravel(), minlength=256)[:IGNORE]
  counts = counts[counts > 0]
  return len(counts) > 1 and counts.max() / counts.sum() < cat_max_ratio


def random_crop_offset(label: np.ndarray, rng: np.random.Generator, crop_size: int,
                       cat_max_ratio: float, tries: int = 10) -> tuple[int, int]:
  """mmseg RandomCrop's choice of the top-left corner (y0, x0) of an S x S crop of label (H, W).

  With cat_max_ratio < 1 up to `tries` crops are tested with `crop_is_balanced`; as in mmseg, when
  none passes, one more crop is drawn and used untested. The crop is min(H, S) x min(W, S).
  """
  h, w = label.shape
  y0, x0 = crop_offset(h, w, crop_size, rng)
  if cat_max_ratio < 1.0:
    for _ in range(tries):
      if crop_is_balanced(label[y0:y0 + crop_size, x0:x0 + crop_size], cat_max_ratio):
        break
      y0, x0 = crop_offset(h, w, crop_size, rng)
  return y0, x0


def random_flip(image: np.ndarray, label: np.ndarray, rng: np.random.Generator, prob: float
                ) -> tuple[np.ndarray, np.ndarray]:
  """Horizontal flip of image (H, W, 3) and label (H, W) together with probability `prob`."""
  if rng.random() < prob:
    return image[:, ::-1], label[:, ::-1]
  return image, label


def pad_to(image: np.ndarray, label: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
  """mmseg Pad(size, pad_val=0, seg_pad_val=255): pad bottom and right.

  image (h, w, 3) of any dtype (in training already normalised, so the padding is 0 after
  normalisation, as in mmseg), label (h, w) -> (size, size, 3) of image's dtype, (size, size).
  """
  h, w = label.shape
  if h > size or w > size:
    raise ValueError(f'cannot pad a {h}x{w} record to {size}x{size}: it is larger than the crop.')
  out_image = np.zeros((size, size, 3), image.dtype)
  out_image[:h, :w] = image
  out_label = np.full((size, size), IGNORE, np.uint8)
  out_label[:h, :w] = label
  return out_image, out_label


# ---------------------------------------------------------------------------------------------
# Photometric distortion (mmseg PhotoMetricDistortion on uint8, HSV in OpenCV's 8-bit convention)


def _convert(x: np.ndarray, alpha: float = 1.0, beta: float = 0.0) -> np.ndarray:
  """mmseg `convert`: x * alpha + beta in float32, clipped to [0, 255], truncated to uint8."""
  return np.clip(x.astype(np.float32) * alpha + beta, 0, 255).astype(np.uint8)


def rgb_to_hsv(rgb: np.ndarray) -> np.ndarray:
  """RGB uint8 (H, W, 3) -> HSV uint8 (H, W, 3), cv2.COLOR_RGB2HSV: H in [0, 180), S, V 0..255.

  mmcv's `bgr2hsv` is cv2.cvtColor(BGR2HSV) on mmseg's uint8 BGR image: the same values. We call
  OpenCV for both directions: the way back is not the textbook float formula (a closed-form numpy
  version was off by one in 74 % of the 180 x 256 x 256 HSV triples), and OpenCV is about 10x
  faster than numpy here.
  """
  return cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2HSV)


def hsv_to_rgb(hsv: np.ndarray) -> np.ndarray:
  """HSV uint8 (H, W, 3) in cv2's 8-bit convention -> RGB uint8 (H, W, 3), cv2.COLOR_HSV2RGB."""
  return cv2.cvtColor(np.ascontiguousarray(hsv), cv2.COLOR_HSV2RGB)


def photometric_distortion(image: np.ndarray, rng: np.random.Generator,
                           brightness_delta: float = 32, contrast_range=(0.5, 1.5),
                           saturation_range=(0.5, 1.5), hue_delta: int = 18) -> np.ndarray:
  """mmseg PhotoMetricDistortion on an RGB uint8 image (H, W, 3) -> (H, W, 3) uint8.

  Each step runs with probability 1/2, in mmseg's order: brightness (+U(-32, 32)); then a mode bit
  m; if m == 1 contrast (*U(0.5, 1.5)) first; saturation (S channel *U(0.5, 1.5) in HSV); hue
  (H + randint(-18, 18), upper bound exclusive as numpy's randint, mod 180); if m == 0 contrast
  last.
  Every step rounds back to uint8 (truncation), as mmseg does.
  """
  if rng.integers(2):
    image = _convert(image, beta=rng.uniform(-brightness_delta, brightness_delta))
  mode = rng.integers(2)
  if mode == 1 and rng.integers(2):
    image = _convert(image, alpha=rng.uniform(*contrast_range))
  if rng.integers(2):
    hsv = rgb_to_hsv(image)
    hsv[..., 1] = _convert(hsv[..., 1], alpha=rng.uniform(*saturation_range))
    image = hsv_to_rgb(hsv)
  if rng.integers(2):
    hsv = rgb_to_hsv(image)
    hsv[..., 0] = (hsv[..., 0].astype(np.int64) + rng.integers(-hue_delta, hue_delta)) % 180
    image = hsv_to_rgb(hsv)
  if mode == 0 and rng.integers(2):
    image = _convert(image, alpha=rng.uniform(*contrast_range))
  return image


def _normalize_table() -> np.ndarray:
  """(3, 256) float32: channel c of value v normalised exactly as mmcv's `imnormalize_`.

  mmcv keeps mean and std as float32, subtracts the mean with cv2.subtract (a float64 scalar, so the
  difference is rounded to float32 once) and multiplies by 1 / std computed in float64; running
  those calls on the 256 values gives its numbers bit for bit (plain float32 arithmetic is off by
  one ulp in about a fifth of them).
  """
  mean = np.float64(np.asarray(MEAN, np.float32).reshape(1, -1))
  stdinv = 1 / np.float64(np.asarray(STD, np.float32).reshape(1, -1))
  values = np.repeat(np.arange(256, dtype=np.float32)[None, :, None], 3, axis=2)  # (1, 256, 3)
  cv2.subtract(values, mean, values)
  cv2.multiply(values, stdinv, values)
  return np.ascontiguousarray(values[0].T)


_NORMALIZE = _normalize_table()


def normalize(image: np.ndarray) -> np.ndarray:
  """RGB uint8 (H, W, 3) -> float32 (H, W, 3): (x - MEAN) / STD per channel (a table look-up)."""
  out = np.empty(image.shape, np.float32)
  for c in range(3):
    out[..., c] = _NORMALIZE[c][image[..., c]]
  return out


# ---------------------------------------------------------------------------------------------
# Whole recipes


def augment_record(image: np.ndarray, label: np.ndarray, rng: np.random.Generator,
                   crop_size: int, augment: TrainAugment) -> tuple[np.ndarray, np.ndarray]:
  """mmseg's training steps up to Normalize: RGB uint8 (H, W, 3), uint8 (H, W) -> RGB uint8
  (h, w, 3), uint8 (h, w) with h, w <= S (a record smaller than the crop stays smaller).

  Draws from `rng` in mmseg's order: the rescale ratio, the crop offsets (one pair per try), the
  flip, then the photometric steps.
  """
  size = random_scale_size(label.shape[0], label.shape[1], rng, augment.img_scale,
                           augment.ratio_range)
  label = resize_label(label, size)  # whole map: the crop test needs it
  y0, x0 = random_crop_offset(label, rng, crop_size, augment.cat_max_ratio)
  label = label[y0:y0 + crop_size, x0:x0 + crop_size]
  image = resize_image(image, size)[y0:y0 + crop_size, x0:x0 + crop_size]
  image, label = random_flip(image, label, rng, augment.flip_prob)
  if augment.photometric:
    image = photometric_distortion(image, rng)
  return image, label


def train_transform(image: np.ndarray, label: np.ndarray, rng: np.random.Generator,
                    crop_size: int, augment: TrainAugment | None
                    ) -> tuple[np.ndarray, np.ndarray]:
  """One training record: RGB uint8 (H, W, 3), uint8 (H, W) -> float32 (S, S, 3), uint8 (S, S).

  `augment=None` only normalises and pads (records must then be at most S x S); the synthetic
  dataset uses this because a flip or a hue shift would change its classes.
  """
  if augment is not None:
    image, label = augment_record(image, label, rng, crop_size, augment)
  return pad_to(normalize(image), label, crop_size)


def eval_transform(image: np.ndarray, img_scale: tuple[int, int] | None, min_size: int | None
                   ) -> np.ndarray:
  """One evaluation image: RGB uint8 (H, W, 3) -> float32 (h, w, 3), resized with `eval_size`."""
  size = eval_size(image.shape[0], image.shape[1], img_scale, min_size)
  return normalize(resize_image(image, size))
