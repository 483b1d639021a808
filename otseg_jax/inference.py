"""Inference as the reference segmentor runs it: encode_decode, slide inference, argmax.

All functions are jit-friendly: the window layout is computed in Python from static shapes.
`slide_inference` and `predict` take any `encode_fn(images (b, h, w, 3)) -> (b, h, w, K)`, so
other methods reuse them; `encode_decode` is OTSeg's.
"""

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from otseg_jax import image_ops
from otseg_jax.models import otseg

EncodeFn = Callable[[jax.Array], jax.Array]


def encode_decode(model: Any, params: Any, images: jax.Array, text: jax.Array, seen: jax.Array,
                  *, ensemble_weight: float = 0.5, calibration: float = 0.1) -> jax.Array:
  """Eval-mode forward: calibrated class probabilities at the input resolution.

  Args:
    model: an `otseg.OTSeg` (or any module returning 'decoder' and optionally 'score' logits).
    params: its parameters.
    images: (B, H, W, 3) normalised images.
    text: (K, N, C) text embeddings of all evaluated classes.
    seen: (K,) bool, the training classes (they get `calibration` subtracted).
    ensemble_weight, calibration: see `otseg.eval_probabilities`.

  Returns:
    (B, H, W, K) shifted probabilities.
  """
  outputs = model.apply({'params': params}, images, text, train=False)
  probs = otseg.eval_probabilities(outputs, seen, ensemble_weight=ensemble_weight,
                                   calibration=calibration)
  # The head's maps are already at the input size. The reference resizes them to the crop size
  # S first and then to the input size: the same whenever the input is S x S (every training
  # crop and every slide window of an image at least S on both sides).
  return image_ops.resize_bilinear(probs, images.shape[1:3])


def window_corners(size: Sequence[int], crop: Sequence[int] | int,
                   stride: Sequence[int] | int) -> list[tuple[int, int, int, int]]:
  """mmseg's slide windows (y1, y2, x1, x2), rows outer, columns inner.

  h_grids = max(H - crop_h + stride_h - 1, 0) // stride_h + 1 (likewise w); the last window
  is shifted back to end at the border; windows never exceed the image (an image smaller
  than the crop gives windows of the image size).
  """
  (h, w), (ch, cw), (sh, sw) = size, image_ops.as_pair(crop), image_ops.as_pair(stride)
  if min(ch, cw, sh, sw) <= 0:
    raise ValueError(f'crop {crop} and stride {stride} must be positive.')
  h_grids = max(h - ch + sh - 1, 0) // sh + 1
  w_grids = max(w - cw + sw - 1, 0) // sw + 1
  corners = []
  for i in range(h_grids):
    for j in range(w_grids):
      y2, x2 = min(i * sh + ch, h), min(j * sw + cw, w)
      corners.append((max(y2 - ch, 0), y2, max(x2 - cw, 0), x2))
  return corners


def slide_inference(encode_fn: EncodeFn, images: jax.Array, *, crop: Sequence[int] | int,
                    stride: Sequence[int] | int, window_batch: int | None = None) -> jax.Array:
  """Sliding-window inference: window outputs summed into place, divided by the window count.

  Args:
    encode_fn: images (B, ch, cw, 3) -> (B, ch, cw, K), e.g. a closure over `encode_decode`.
    images: (B, H, W, 3).
    crop, stride: window size and step, (h, w) or one int.
    window_batch: windows per `encode_fn` call (vmapped). None: one at a time, as the
      reference, with one compiled window body and the least memory.

  Returns:
    (B, H, W, K).
  """
  b, h, w, _ = images.shape
  corners = window_corners((h, w), crop, stride)
  crops = jnp.stack([images[:, y1:y2, x1:x2] for y1, y2, x1, x2 in corners])
  outs = jax.lax.map(encode_fn, crops, batch_size=window_batch)  # (windows, B, ch, cw, K)
  preds = jnp.zeros((b, h, w, outs.shape[-1]), outs.dtype)
  count = np.zeros((h, w), np.int64)
  for i, (y1, y2, x1, x2) in enumerate(corners):
    preds = preds.at[:, y1:y2, x1:x2].add(outs[i])
    count[y1:y2, x1:x2] += 1
  assert count.min() > 0, 'slide windows leave pixels uncovered'
  return preds / jnp.asarray(count, outs.dtype)[None, :, :, None]


def predict(encode_fn: EncodeFn, images: jax.Array, *, mode: str = 'slide',
            crop: Sequence[int] | int | None = None, stride: Sequence[int] | int | None = None,
            output_size: Sequence[int] | None = None,
            window_batch: int | None = None) -> tuple[jax.Array, jax.Array]:
  """Labels of a batch of (resized) images, optionally mapped back to the original size.

  Args:
    encode_fn: see `slide_inference`.
    images: (B, H, W, 3).
    mode: 'slide' (crop and stride required) or 'whole' (one forward of the whole image).
    output_size: (H0, W0): the probabilities are resized there (bilinear) before the argmax,
      as mmseg's rescale to the original image.

  Returns:
    (labels (B, H0, W0) int32, probabilities (B, H0, W0, K)).
  """
  if mode == 'slide':
    if crop is None or stride is None:
      raise ValueError("mode='slide' needs crop and stride (the config's test crop/stride).")
    probs = slide_inference(encode_fn, images, crop=crop, stride=stride,
                            window_batch=window_batch)
  elif mode == 'whole':
    probs = encode_fn(images)
  else:
    raise ValueError(f"mode={mode!r}: use 'slide' or 'whole'.")
  if output_size is not None:
    probs = image_ops.resize_bilinear(probs, tuple(output_size))
  return jnp.argmax(probs, axis=-1).astype(jnp.int32), probs
