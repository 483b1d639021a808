"""Inference as the reference segmentor runs it: encode_decode, slide inference, argmax.

The functions are jit-friendly: the window layout is computed in Python from static shapes.
`slide_inference` and `predict` take any `encode_fn(images (b, h, w, 3)) -> (b, h, w, K)`;
`encode_decode` runs any method's model and eval probabilities. `SlideEvaluator` runs slide
inference over a stream of images for evaluation and `predict`.
"""

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
import numpy as np

from otseg_jax import image_ops

EncodeFn = Callable[[jax.Array], jax.Array]
# The method's eval probabilities: (maps {name: (B, H, W, K)}, seen (K,)) -> (B, H, W, K).
ProbabilitiesFn = Callable[[Mapping[str, jax.Array], jax.Array], jax.Array]


def encode_decode(model: Any, params: Any, images: jax.Array, text: Any, seen: jax.Array,
                  probabilities: ProbabilitiesFn) -> jax.Array:
  """Eval-mode forward: the method's class probabilities at the input resolution.

  Args:
    model: a method's model, `model.apply(variables, images, text, train=False)` -> (maps, aux).
    params: its parameters.
    images: (B, H, W, 3) normalised images.
    text: the class text of all evaluated classes, as `model.encode_text` returns it.
    seen: (K,) bool, the training classes (calibrated by the method).
    probabilities: the method's `eval_probabilities(maps, seen)` bound to its config, e.g.
      `functools.partial(otseg.eval_probabilities, config=config.model)`.

  Returns:
    (B, H, W, K) probabilities (OTSeg's: shifted by the calibration).
  """
  maps, _ = model.apply({'params': params}, images, text, train=False)
  probs = probabilities(maps, seen)
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


# ---------------------------------------------------------------------------------------------------
# Slide inference over a stream of images of any size, batched over the local devices.


def _local_mesh() -> jax.sharding.Mesh:
  # Each process evaluates its own images on its own devices; only the confusion matrices are
  # summed across processes at the end, so processes never wait on each other per image.
  return jax.make_mesh((jax.local_device_count(),), ('data',), devices=jax.local_devices(),
                       axis_types=(AxisType.Auto,))


class SlideEvaluator:
  """Slide inference on a stream of images of any size, with fixed-shape model calls.

  The S x S windows of all images go through one jitted `encode_decode` in batches of `batch_size`
  windows sharded over the local devices (one compilation for the model whatever the image sizes).
  The window outputs of an image are stitched, averaged, resized to the label size and arg-maxed by
  a small jitted function (compiled once per distinct image/label size; no model inside).
  Windows smaller than S (images smaller than the crop) run in their own calls, padded only in the
  batch dimension, so the model sees them at their true size as the reference does.
  """

  def __init__(self, model: Any, params: Any, text: Any, seen_mask: np.ndarray, *,
               probabilities: ProbabilitiesFn, crop_size: int, stride: int, batch_size: int):
    """model, params: the method's model and its parameters; text: its class text, computed
    once for all classes (`encode_text`); seen_mask (K,) bool; probabilities: see
    `encode_decode`; crop_size, stride: the slide windows; batch_size: windows per call."""
    self.mesh = _local_mesh()
    n = jax.local_device_count()
    self.batch_size = max(n, -(-batch_size // n) * n)
    self.crop, self.stride = int(crop_size), int(stride)
    replicated = NamedSharding(self.mesh, P())
    self.windows_sharding = NamedSharding(self.mesh, P('data'))
    put = lambda x: jax.device_put(np.asarray(x), replicated)
    self.params = jax.tree.map(put, params)
    self.text = jax.tree.map(put, text)
    self.seen = put(np.asarray(seen_mask, bool))
    self._encode = jax.jit(
        lambda p, x, t, s: encode_decode(model, p, x, t, s, probabilities),
        out_shardings=self.windows_sharding)
    self._finish_cache = {}

  def _finish_fn(self, corners, size, out_size):
    key = (corners, size, out_size)
    if key not in self._finish_cache:

      def finish(windows):  # (n, ch, cw, K) -> (H0, W0) labels
        preds = jnp.zeros((*size, windows.shape[-1]), windows.dtype)
        count = np.zeros(size, np.float32)
        for i, (y1, y2, x1, x2) in enumerate(corners):
          preds = preds.at[y1:y2, x1:x2].add(windows[i])
          count[y1:y2, x1:x2] += 1
        preds = preds / jnp.asarray(count)[..., None]
        probs = image_ops.resize_bilinear(preds, out_size, axes=(0, 1))
        return jnp.argmax(probs, axis=-1).astype(jnp.int32)

      self._finish_cache[key] = jax.jit(finish)
    return self._finish_cache[key]

  def predict(self, images: Iterable[tuple[Any, np.ndarray, tuple[int, int]]]):
    """Labels of each image.

    Args:
      images: iterable of (tag, image (h, w, 3) float32 normalised, output size (H0, W0)).

    Yields:
      (tag, labels (H0, W0) int32 numpy), in input order.
    """
    queue = []  # windows waiting for a model call: (image slot, window index, crop array)
    slots = {}  # image slot -> dict(tag, corners, size, out_size, outputs, remaining)
    order = []  # image slots in input order, for in-order yielding
    next_slot = 0

    def run(shape_windows):
      crops = np.stack([c for _, _, c in shape_windows])
      n = len(crops)
      padded = np.concatenate([crops, np.repeat(crops[:1], self.batch_size - n, 0)])
      out = self._encode(self.params, jax.device_put(padded, self.windows_sharding),
                         self.text, self.seen)
      for j, (slot, w, _) in enumerate(shape_windows):
        slots[slot]['outputs'][w] = out[j]
        slots[slot]['remaining'] -= 1

    def flush(force: bool):
      nonlocal queue
      by_shape = {}
      for item in queue:
        by_shape.setdefault(item[2].shape, []).append(item)
      queue = []
      for shape, items in by_shape.items():
        while len(items) >= self.batch_size or (force and items):
          run(items[:self.batch_size])
          items = items[self.batch_size:]
        queue.extend(items)

    def ready():
      while order and slots[order[0]]['remaining'] == 0:
        s = slots.pop(order.pop(0))
        finish = self._finish_fn(s['corners'], s['size'], s['out_size'])
        labels = finish(jnp.stack(s['outputs']))
        yield s['tag'], np.asarray(labels)

    for tag, image, out_size in images:
      h, w = image.shape[:2]
      corners = tuple(window_corners((h, w), self.crop, self.stride))
      slot = next_slot
      next_slot += 1
      slots[slot] = dict(tag=tag, corners=corners, size=(h, w), out_size=tuple(out_size),
                         outputs=[None] * len(corners), remaining=len(corners))
      order.append(slot)
      for i, (y1, y2, x1, x2) in enumerate(corners):
        queue.append((slot, i, np.asarray(image[y1:y2, x1:x2], np.float32)))
      flush(force=False)
      yield from ready()
    flush(force=True)
    yield from ready()
