"""Training augmentation and evaluation resizing, in numpy and PIL, one record at a time.

The reference trains with mmseg 0.x's pipeline
  Resize(img_scale, ratio_range=(0.5, 2)) -> RandomCrop(S, cat_max_ratio=0.75) -> RandomFlip(0.5)
  -> PhotoMetricDistortion -> Normalize(mean, std, to_rgb) -> Pad(S, 0 / 255)
and evaluates with Resize(img_scale, keep_ratio=True, min_size=512) -> Normalize. The functions here
do the same, step by step, each taking an explicit `np.random.Generator` so a record's augmentation
is a pure function of (record, seed). Images are RGB uint8 (H, W, 3) until `normalize`; labels are
uint8 (H, W) with 255 = ignore.

Differences from mmseg that we accept (no parity reference exists for augmentation):
- The image is resized with PIL's bilinear filter. Upscaling (the common case: VOC/COCO images are
  about 500x375 and the short side goes to 256..1024) matches cv2's INTER_LINEAR up to uint8
  rounding; downscaling is antialiased where cv2 is not.
- Random numbers come from numpy's Generator API, not the global legacy RNG, so the draws differ;
  the distributions and the order of the draws are mmseg's.
"""

import dataclasses

import numpy as np
from PIL import Image

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


def resize_image(image: np.ndarray, size: tuple[int, int],
                 crop: tuple[int, int, int, int] | None = None) -> np.ndarray:
  """Bilinear resize of an RGB uint8 image (H, W, 3) to size (h, w); see the module note.

  With crop = (y0, x0, ch, cw) only that window of the resized image is computed, (ch, cw, 3):
  the same pixels as `resize_image(image, size)[y0:y0+ch, x0:x0+cw]` (PIL evaluates the filter
  over the matching source box at the same scale), at a fraction of the cost when the training
  rescale makes the image much larger than the crop.
  """
  h, w = image.shape[:2]
  if crop is None:
    crop = (0, 0, size[0], size[1])
  y0, x0, ch, cw = crop
  if (h, w) == tuple(size):
    return image[y0:y0 + ch, x0:x0 + cw]
  sy, sx = h / size[0], w / size[1]
  box = (x0 * sx, y0 * sy, (x0 + cw) * sx, (y0 + ch) * sy)
  out = Image.fromarray(image).resize((cw, ch), Image.BILINEAR, box=box)
  return np.asarray(out)


def resize_label(label: np.ndarray, size: tuple[int, int]) -> np.ndarray:
  """Nearest-neighbour resize of a label map (H, W) to (h, w) with cv2 INTER_NEAREST's rule.

  Output pixel x takes source pixel floor(x * W / w) (no half-pixel shift), which is what mmseg's
  `imrescale(..., interpolation='nearest')` does through cv2.
  """
  h, w = label.shape
  if (h, w) == tuple(size):
    return label
  rows = np.minimum((np.arange(size[0]) * (h / size[0])).astype(np.int64), h - 1)
  cols = np.minimum((np.arange(size[1]) * (w / size[1])).astype(np.int64), w - 1)
  return np.take(np.take(label, rows, axis=0), cols, axis=1)


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

  image (h, w, 3) float32 (already normalised, so padding is 0 after normalisation, as in mmseg),
  label (h, w) -> (size, size, 3), (size, size).
  """
  h, w = label.shape
  if h > size or w > size:
    raise ValueError(f'cannot pad a {h}x{w} record to {size}x{size}: it is larger than the crop.')
  out_image = np.zeros((size, size, 3), np.float32)
  out_image[:h, :w] = image
  out_label = np.full((size, size), IGNORE, np.uint8)
  out_label[:h, :w] = label
  return out_image, out_label


# ---------------------------------------------------------------------------------------------
# Photometric distortion (mmseg PhotoMetricDistortion on uint8, HSV in OpenCV's 8-bit convention)


def _convert(x: np.ndarray, alpha: float = 1.0, beta: float = 0.0) -> np.ndarray:
  """mmseg `convert`: x * alpha + beta in float32, clipped to [0, 255], truncated to uint8."""
  return np.clip(x.astype(np.float32) * alpha + beta, 0, 255).astype(np.uint8)


# OpenCV's 8-bit RGB -> HSV is fixed point with these reciprocal tables (hsv_shift = 12).
_SHIFT = 12
_SDIV = np.array([0] + [round((255 << _SHIFT) / i) for i in range(1, 256)], np.int32)
_HDIV = np.array([0] + [round((180 << _SHIFT) / (6 * i)) for i in range(1, 256)], np.int32)


def rgb_to_hsv(rgb: np.ndarray) -> np.ndarray:
  """RGB uint8 (H, W, 3) -> HSV uint8 (H, W, 3) as cv2.COLOR_RGB2HSV: H in [0, 180), S, V 0..255.

  cv2's integer algorithm: S = round(diff * 255 / V), H = round(num * 30 / diff) with num taken
  from the channel that is the max (R first, then G, then B), plus 180 when negative.
  """
  # Contiguous channel planes: numpy is several times faster on them than on strided views.
  r, g, b = np.ascontiguousarray(np.moveaxis(rgb, -1, 0), dtype=np.int32)
  v = np.maximum(np.maximum(r, g), b)
  diff = v - np.minimum(np.minimum(r, g), b)
  s = (diff * np.take(_SDIV, v) + (1 << (_SHIFT - 1))) >> _SHIFT
  vr = -(v == r).astype(np.int32)  # all ones where V == R
  vg = -(v == g).astype(np.int32)
  h = (vr & (g - b)) + (~vr & ((vg & (b - r + 2 * diff)) + (~vg & (r - g + 4 * diff))))
  h = (h * np.take(_HDIV, diff) + (1 << (_SHIFT - 1))) >> _SHIFT
  h += (h < 0) * 180
  out = np.empty(rgb.shape, np.uint8)
  out[..., 0], out[..., 1], out[..., 2] = h, s, v
  return out


def _hsv_factors() -> np.ndarray:
  """(256 * 256, 3) float32: row 256 H + S holds (1 - S w_c(H) / 255) for c = R, G, B, where
  w_c = clip(min(k, 4 - k), 0, 1), k = (n_c + 6H/180) mod 6, n = 5, 3, 1.

  Channel c of HSV -> RGB is V times this factor: the closed form of cv2's six-sector formula
  (sector 0: R = V, G = V(1 - S(1 - f)), B = V(1 - S), ...). Tabulated over the uint8 (H, S)
  pairs, the conversion is one gather and one multiply.
  """
  hue = np.arange(256)[:, None]
  k = np.mod(np.array([5.0, 3.0, 1.0])[None, :] + hue * (6.0 / 180.0), 6.0)
  w = np.clip(np.minimum(k, 4.0 - k), 0.0, 1.0)  # (256, 3)
  sat = np.arange(256)[None, :, None] / 255.0
  return (1.0 - sat * w[:, None, :]).reshape(256 * 256, 3).astype(np.float32)


_HSV_FACTORS = _hsv_factors()


def hsv_to_rgb(hsv: np.ndarray) -> np.ndarray:
  """HSV uint8 (H, W, 3) in cv2's 8-bit convention -> RGB uint8 (H, W, 3) as cv2.COLOR_HSV2RGB."""
  index = hsv[..., 0].astype(np.int32) * 256 + hsv[..., 1]
  rgb = np.take(_HSV_FACTORS, index, axis=0)
  rgb *= hsv[..., 2:3]
  return np.rint(rgb, out=rgb).astype(np.uint8)


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


# normalize's per-channel table: (value - MEAN) / STD for every uint8 value, (3, 256) float32.
_NORMALIZE = ((np.arange(256, dtype=np.float32)[None, :] - np.asarray(MEAN, np.float32)[:, None])
              * (1.0 / np.asarray(STD, np.float32))[:, None]).astype(np.float32)


def normalize(image: np.ndarray) -> np.ndarray:
  """RGB uint8 (H, W, 3) -> float32 (H, W, 3): (x - MEAN) / STD per channel (a table look-up)."""
  out = np.empty(image.shape, np.float32)
  for c in range(3):
    out[..., c] = _NORMALIZE[c][image[..., c]]
  return out


# ---------------------------------------------------------------------------------------------
# Whole recipes


def train_transform(image: np.ndarray, label: np.ndarray, rng: np.random.Generator,
                    crop_size: int, augment: TrainAugment | None
                    ) -> tuple[np.ndarray, np.ndarray]:
  """One training record: RGB uint8 (H, W, 3), uint8 (H, W) -> float32 (S, S, 3), uint8 (S, S).

  `augment=None` only normalises and pads (records must then be at most S x S); the synthetic
  dataset uses this because a flip or a hue shift would change its classes.
  """
  if augment is not None:
    size = random_scale_size(label.shape[0], label.shape[1], rng, augment.img_scale,
                             augment.ratio_range)
    label = resize_label(label, size)  # whole map: the crop test needs it
    y0, x0 = random_crop_offset(label, rng, crop_size, augment.cat_max_ratio)
    label = label[y0:y0 + crop_size, x0:x0 + crop_size]
    image = resize_image(image, size, crop=(y0, x0, label.shape[0], label.shape[1]))
    image, label = random_flip(image, label, rng, augment.flip_prob)
    if augment.photometric:
      image = photometric_distortion(image, rng)
  return pad_to(normalize(image), label, crop_size)


def eval_transform(image: np.ndarray, img_scale: tuple[int, int] | None, min_size: int | None
                   ) -> np.ndarray:
  """One evaluation image: RGB uint8 (H, W, 3) -> float32 (h, w, 3), resized with `eval_size`."""
  size = eval_size(image.shape[0], image.shape[1], img_scale, min_size)
  return normalize(resize_image(image, size))
