"""Zero-shot segmentation metrics and the evaluation loop.

Metrics follow mmseg: per class, IoU = intersection / union of pixel sets summed over the whole split
(not averaged per image); mIoU is the mean over classes whose union is non-empty. On top of that, we
report seen mIoU, unseen mIoU and their harmonic mean hIoU = 2SU/(S+U), the numbers the zero-shot
literature compares (the reference code never computes hIoU).

The metrics are host numpy, so they can be checked by hand; only the model runs under JAX.
"""

import io
import json
import pathlib
import sys
import time
from collections.abc import Iterable, Sequence
from typing import Any

import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
import numpy as np
from PIL import Image
from PIL import ImageDraw

from otseg_jax import files
from otseg_jax import image_ops
from otseg_jax import inference
from otseg_jax.data import pipeline
from otseg_jax.data import transforms

IGNORE_INDEX = 255


# ---------------------------------------------------------------------------------------------------
# Confusion matrix and IoU.


def confusion_matrix(pred: np.ndarray, label: np.ndarray, num_classes: int,
                     ignore_index: int = IGNORE_INDEX) -> np.ndarray:
  """Pixel counts of (ground truth, prediction) pairs.

  Args:
    pred: (...) int predicted class per pixel, in [0, K).
    label: (...) int ground truth, same shape; `ignore_index` (and anything outside [0, K)) is skipped.
    num_classes: K.

  Returns:
    (K, K) int64, rows = ground truth, columns = prediction.
  """
  pred = np.asarray(pred)
  label = np.asarray(label)
  if pred.shape != label.shape:
    raise ValueError(f'prediction {pred.shape} and label {label.shape} differ in shape; resize the '
                     'prediction to the label size before scoring.')
  valid = (label != ignore_index) & (label >= 0) & (label < num_classes)
  index = label[valid].astype(np.int64) * num_classes + pred[valid].astype(np.int64)
  return np.bincount(index, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def iou_per_class(confusion: np.ndarray) -> dict[str, np.ndarray]:
  """Intersection, union, IoU and accuracy of every class from a (K, K) confusion matrix.

  IoU and accuracy are NaN for a class whose union (resp. ground truth) is empty, as in mmseg, so
  that class drops out of the means.
  """
  confusion = np.asarray(confusion, np.int64)
  intersection = np.diag(confusion)
  area_label = confusion.sum(axis=1)
  area_pred = confusion.sum(axis=0)
  union = area_label + area_pred - intersection
  with np.errstate(invalid='ignore', divide='ignore'):
    iou = np.where(union > 0, intersection / np.maximum(union, 1), np.nan)
    acc = np.where(area_label > 0, intersection / np.maximum(area_label, 1), np.nan)
  return dict(intersection=intersection, union=union, area_label=area_label, area_pred=area_pred,
              iou=iou, acc=acc)


def _nanmean(x: np.ndarray) -> float | None:
  x = np.asarray(x, np.float64)
  x = x[~np.isnan(x)]
  return float(x.mean()) if x.size else None


def summarize(confusion: np.ndarray, class_names: Sequence[str],
              unseen: Sequence[int]) -> dict[str, Any]:
  """All the numbers of one evaluation, as percentages.

  Args:
    confusion: (K, K) int64 summed over the split (and over hosts).
    class_names: K names in label order.
    unseen: indices of the unseen classes (empty: no split, e.g. ADE-150 or fully supervised
      without a split); every other class is seen.

  Returns:
    dict with mIoU, seen_mIoU, unseen_mIoU, hIoU (None where undefined), aAcc, mAcc and
    `per_class`: a list of {name, split, iou, acc, pixels} in label order.
  """
  num_classes = len(class_names)
  if confusion.shape != (num_classes, num_classes):
    raise ValueError(f'confusion matrix {confusion.shape} does not match {num_classes} classes.')
  stats = iou_per_class(confusion)
  iou = stats['iou'] * 100
  acc = stats['acc'] * 100
  unseen_set = set(int(i) for i in unseen)
  seen = [i for i in range(num_classes) if i not in unseen_set]
  unseen_list = sorted(unseen_set)
  seen_miou = _nanmean(iou[seen]) if seen else None
  unseen_miou = _nanmean(iou[unseen_list]) if unseen_list else None
  if seen_miou is None or unseen_miou is None:
    hiou = None
  elif seen_miou + unseen_miou == 0:
    hiou = 0.0
  else:
    hiou = 2 * seen_miou * unseen_miou / (seen_miou + unseen_miou)
  total = int(stats['area_label'].sum())
  per_class = []
  for i, name in enumerate(class_names):
    per_class.append(dict(
        index=i, name=name, split='unseen' if i in unseen_set else 'seen',
        iou=None if np.isnan(iou[i]) else float(iou[i]),
        acc=None if np.isnan(acc[i]) else float(acc[i]),
        pixels=int(stats['area_label'][i])))
  return dict(
      mIoU=_nanmean(iou), seen_mIoU=seen_miou, unseen_mIoU=unseen_miou, hIoU=hiou,
      aAcc=float(stats['intersection'].sum() / total * 100) if total else None,
      mAcc=_nanmean(acc), num_pixels=total, per_class=per_class)


def format_summary(results: dict[str, Any]) -> str:
  """One line: 'seen 91.20 | unseen 77.80 | hIoU 83.97 | mIoU 88.10'."""
  def fmt(v):
    return 'n/a' if v is None else f'{v:.2f}'
  return (f'seen mIoU {fmt(results["seen_mIoU"])} | unseen mIoU {fmt(results["unseen_mIoU"])} | '
          f'hIoU {fmt(results["hIoU"])} | mIoU {fmt(results["mIoU"])}')


# ---------------------------------------------------------------------------------------------------
# Reports: results.json, per-class table, bar chart, overlays. All writes are atomic (tmp + rename),
# so a reader never sees half a file and a crash never leaves one behind.


def write_json(path: pathlib.Path, obj: Any) -> None:
  files.write_atomic(path, (json.dumps(obj, indent=2) + '\n').encode())


def per_class_table(results: dict[str, Any]) -> str:
  """Markdown table of every class, then the summary rows."""
  def fmt(v):
    return '—' if v is None else f'{v:.2f}'
  lines = ['| # | class | split | IoU | Acc | GT pixels |', '|---:|---|---|---:|---:|---:|']
  for row in results['per_class']:
    lines.append(f'| {row["index"]} | {row["name"]} | {row["split"]} | {fmt(row["iou"])} | '
                 f'{fmt(row["acc"])} | {row["pixels"]} |')
  lines += ['', '| metric | value |', '|---|---:|']
  for key in ('seen_mIoU', 'unseen_mIoU', 'hIoU', 'mIoU', 'mAcc', 'aAcc'):
    lines.append(f'| {key} | {fmt(results[key])} |')
  return '\n'.join(lines) + '\n'


SEEN_COLOUR = '#4C72B0'
UNSEEN_COLOUR = '#DD8452'


def _savefig_atomic(fig, path: pathlib.Path) -> None:
  buf = io.BytesIO()
  fig.savefig(buf, format='png', dpi=100)
  files.write_atomic(path, buf.getvalue())


def plot_per_class_iou(results: dict[str, Any], path: pathlib.Path, title: str = '') -> None:
  """Bar chart of per-class IoU, seen and unseen classes in two colours, class means as lines."""
  # matplotlib is slow to import and only needed here.
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top
  rows = results['per_class']
  iou = [0.0 if r['iou'] is None else r['iou'] for r in rows]
  colours = [UNSEEN_COLOUR if r['split'] == 'unseen' else SEEN_COLOUR for r in rows]
  fig, ax = plt.subplots(figsize=(max(6.0, 0.22 * len(rows) + 2), 4.5))
  ax.bar(range(len(rows)), iou, color=colours)
  ax.set_xticks(range(len(rows)))
  ax.set_xticklabels([r['name'] for r in rows], rotation=90, fontsize=7)
  ax.set_ylim(0, 100)
  ax.set_ylabel('IoU (%)')
  from matplotlib.patches import Patch  # pylint: disable=g-import-not-at-top
  handles = []
  for key, colour, label in (('seen_mIoU', SEEN_COLOUR, 'seen'),
                             ('unseen_mIoU', UNSEEN_COLOUR, 'unseen')):
    if results[key] is not None:
      ax.axhline(results[key], color=colour, linestyle='--', linewidth=1)
      handles.append(Patch(color=colour, label=f'{label} (mIoU {results[key]:.1f})'))
  if handles:
    ax.legend(handles=handles, loc='upper right', fontsize=8)
  hiou = results['hIoU']
  ax.set_title((title + '  ' if title else '') + (f'hIoU {hiou:.1f}' if hiou is not None else
                                                  f'mIoU {results["mIoU"] or 0:.1f}'))
  fig.tight_layout()
  _savefig_atomic(fig, path)
  plt.close(fig)


def write_report(results: dict[str, Any], outdir: pathlib.Path, title: str = '') -> None:
  """results.json, per_class.md and per_class_iou.png in `outdir`."""
  outdir = pathlib.Path(outdir)
  write_json(outdir / 'results.json', results)
  files.write_atomic(outdir / 'per_class.md', per_class_table(results).encode())
  plot_per_class_iou(results, outdir / 'per_class_iou.png', title)


def palette(num_classes: int) -> np.ndarray:
  """(K + 1, 3) uint8 colours: the PASCAL VOC bit-interleaved palette, shifted by one so that class 0
  is not black; the last row (used for ignore) is black."""
  colours = np.zeros((num_classes + 1, 3), np.uint8)
  for k in range(num_classes):
    c, r, g, b = k + 1, 0, 0, 0
    for j in range(8):
      r |= ((c >> 0) & 1) << (7 - j)
      g |= ((c >> 1) & 1) << (7 - j)
      b |= ((c >> 2) & 1) << (7 - j)
      c >>= 3
    colours[k] = (r, g, b)
  return colours


def colorize(mask: np.ndarray, num_classes: int) -> np.ndarray:
  """(H, W) class ids (255 = ignore) -> (H, W, 3) uint8."""
  colours = palette(num_classes)
  index = np.where((mask >= 0) & (mask < num_classes), mask, num_classes)
  return colours[index]


def overlay(image: np.ndarray, mask: np.ndarray, num_classes: int, alpha: float = 0.5) -> np.ndarray:
  """Blend the colourised mask into a (H, W, 3) uint8 image; ignored pixels keep the image."""
  colour = colorize(mask, num_classes).astype(np.float32)
  blended = (1 - alpha) * image.astype(np.float32) + alpha * colour
  keep = ((mask < 0) | (mask >= num_classes))[..., None]
  return np.where(keep, image, blended).clip(0, 255).astype(np.uint8)


def write_png(path: pathlib.Path, array: np.ndarray) -> None:
  """Atomic PNG write of a (H, W) or (H, W, 3) uint8 array."""
  buf = io.BytesIO()
  Image.fromarray(np.asarray(array, np.uint8)).save(buf, format='PNG')
  files.write_atomic(path, buf.getvalue())


def legend_strip(class_ids: Iterable[int], class_names: Sequence[str], num_classes: int,
                 width: int) -> np.ndarray:
  """(h, width, 3) uint8 strip listing the colour and name of each of `class_ids`."""
  class_ids = list(class_ids)
  colours = palette(num_classes)
  row_h = 16
  per_row = max(1, width // 180)
  rows = max(1, -(-len(class_ids) // per_row))
  strip = Image.new('RGB', (width, rows * row_h + 4), (255, 255, 255))
  draw = ImageDraw.Draw(strip)
  for n, k in enumerate(class_ids):
    x, y = (n % per_row) * 180 + 4, (n // per_row) * row_h + 2
    draw.rectangle([x, y + 2, x + 12, y + 12], fill=tuple(int(c) for c in colours[k]))
    draw.text((x + 16, y), str(class_names[k])[:24], fill=(0, 0, 0))
  return np.asarray(strip)


def overlay_panel(image: np.ndarray, pred: np.ndarray, class_names: Sequence[str],
                  label: np.ndarray | None = None) -> np.ndarray:
  """Image | prediction overlay [| ground-truth overlay] side by side, with a legend of the classes
  that appear. (H, W, 3) uint8 image, (H, W) int masks."""
  num_classes = len(class_names)
  factor = -(-128 // min(image.shape[:2]))  # small images (synthetic) are shown enlarged
  if factor > 1:
    up = lambda x: np.repeat(np.repeat(x, factor, axis=0), factor, axis=1)
    image, pred = up(image), up(pred)
    label = None if label is None else up(label)
  panels = [image, overlay(image, pred, num_classes)]
  present = set(np.unique(pred).tolist())
  if label is not None:
    panels.append(overlay(image, label, num_classes))
    present |= set(np.unique(label).tolist())
  row = np.concatenate(panels, axis=1)
  ids = sorted(k for k in present if 0 <= k < num_classes)
  return np.concatenate([row, legend_strip(ids, class_names, num_classes, row.shape[1])], axis=0)


def denormalize(image: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
  """Inverse of the input normalisation: (H, W, 3) float -> uint8 RGB."""
  return (np.asarray(image, np.float32) * np.asarray(std) + np.asarray(mean)).clip(0, 255).astype(
      np.uint8)


class Progress:
  """A one-line progress bar on stderr for evaluation loops (no dependency, works in logs too)."""

  def __init__(self, total: int | None, desc: str, every: float = 2.0, enabled: bool = True):
    self.total, self.desc, self.every, self.enabled = total, desc, every, enabled
    self.count, self.start, self.last = 0, time.time(), 0.0

  def update(self, n: int = 1) -> None:
    self.count += n
    now = time.time()
    if self.enabled and (now - self.last >= self.every or self.count == self.total):
      self.last = now
      rate = self.count / max(now - self.start, 1e-9)
      if self.total:
        frac = self.count / self.total
        bar = '#' * int(30 * frac) + '-' * (30 - int(30 * frac))
        eta = (self.total - self.count) / max(rate, 1e-9)
        line = f'{self.desc} [{bar}] {self.count}/{self.total} {rate:.1f} img/s ETA {eta:.0f}s'
      else:
        line = f'{self.desc} {self.count} images {rate:.1f} img/s'
      print(line, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------------
# The evaluation loop: slide inference over a split, sharded over this process's devices, metrics
# summed over the split and over processes.


def _local_mesh() -> jax.sharding.Mesh:
  # Each process evaluates its own images on its own devices; only the confusion matrices are
  # summed across processes at the end, so processes never wait on each other per image.
  return jax.make_mesh((jax.local_device_count(),), ('data',), devices=jax.local_devices(),
                       axis_types=(AxisType.Auto,))


def _allsum_confusion(confusion: np.ndarray) -> np.ndarray:
  """Sum of every process's (K, K) int64 confusion matrix (exact: sent as two int32 halves)."""
  if jax.process_count() == 1:
    return confusion
  hi = (confusion >> 31).astype(np.int32)
  lo = (confusion & (2**31 - 1)).astype(np.int32)
  hi, lo = multihost_utils.process_allgather((hi, lo))
  return (np.asarray(hi, np.int64) << 31).sum(0) + np.asarray(lo, np.int64).sum(0)


class SlideEvaluator:
  """Slide inference on a stream of images of any size, with fixed-shape model calls.

  The S x S windows of all images go through one jitted `encode_decode` in batches of `batch_size`
  windows sharded over the local devices (one compilation for the model whatever the image sizes).
  The window outputs of an image are stitched, averaged, resized to the label size and arg-maxed by
  a small jitted function (compiled once per distinct image/label size; no model inside).
  Windows smaller than S (images smaller than the crop) run in their own calls, padded only in the
  batch dimension, so the model sees them at their true size as the reference does.
  """

  def __init__(self, model, params, text, seen_mask, *, crop_size: int, stride: int,
               batch_size: int, ensemble_weight: float, calibration: float):
    self.mesh = _local_mesh()
    n = jax.local_device_count()
    self.batch_size = max(n, -(-batch_size // n) * n)
    self.crop, self.stride = int(crop_size), int(stride)
    replicated = NamedSharding(self.mesh, P())
    self.windows_sharding = NamedSharding(self.mesh, P('data'))
    put = lambda x: jax.device_put(np.asarray(x), replicated)
    self.params = jax.tree.map(put, params)
    self.text = put(np.asarray(text, np.float32))
    self.seen = put(np.asarray(seen_mask, bool))
    self._encode = jax.jit(
        lambda p, x, t, s: inference.encode_decode(model, p, x, t, s,
                                                   ensemble_weight=ensemble_weight,
                                                   calibration=calibration),
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
      corners = tuple(inference.window_corners((h, w), self.crop, self.stride))
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


def evaluate(config, model, params, text, seen_mask, split, *, class_names: Sequence[str],
             unseen: Sequence[int], outdir: pathlib.Path | None = None, max_images: int = 0,
             progress: bool = True) -> dict[str, Any]:
  """Evaluates `params` on `split` (a `pipeline.Split`) and writes the reports to `outdir`.

  Args:
    config: the run's config (eval.crop_size / stride / batch_size / num_overlays, model
      ensemble_weight / calibration, data eval_img_scale / eval_min_size).
    model: the `OTSeg` module; params: its parameters (numpy or arrays).
    text: (K, N, C) text embeddings of ALL classes of the split.
    seen_mask: (K,) bool, the classes the model was trained on (calibration applies to them).
    class_names, unseen: for the per-class report and the seen / unseen / hIoU split.
    outdir: where results.json, per_class.md, per_class_iou.png and overlays/ go (process 0), or
      None for metrics only.
    max_images: evaluate only the first N images of the split (0: all).

  Returns:
    `summarize` results plus 'num_images', 'split', 'seconds'.
  """
  num_classes = len(class_names)
  if np.shape(text)[0] != num_classes:
    raise ValueError(f'text embeddings have {np.shape(text)[0]} classes, the evaluated split has '
                     f'{num_classes}: use the embeddings of the evaluated dataset.')
  start = time.time()
  is_main = jax.process_index() == 0
  evaluator = SlideEvaluator(
      model, params, text, seen_mask, crop_size=config.eval.crop_size,
      stride=config.eval.stride, batch_size=config.eval.batch_size,
      ensemble_weight=config.model.ensemble_weight, calibration=config.model.calibration)
  img_scale = config.data.get('eval_img_scale')
  iterator = pipeline.make_eval_iter(
      split, img_scale=None if img_scale is None else tuple(img_scale),
      min_size=config.data.get('eval_min_size'), process_index=jax.process_index(),
      process_count=jax.process_count())
  total = pipeline.num_eval_steps(len(split.source), jax.process_count())
  if max_images:
    total = min(total, -(-max_images // jax.process_count()))
  num_overlays = config.eval.num_overlays if outdir is not None and is_main else 0
  examples = {}

  def stream():
    for n, example in enumerate(iterator):
      if n >= total:
        break
      image = example['image'][0]
      label = example['label'][0]
      examples[n] = (bool(example['valid'][0]), label,
                     image if n < num_overlays else None, int(example['index'][0]))
      yield n, image, label.shape

  confusion = np.zeros((num_classes, num_classes), np.int64)
  bar = Progress(total, f'eval {split.name}/{split.split}', enabled=progress and is_main)
  count = 0
  for n, pred in evaluator.predict(stream()):
    valid, label, image, index = examples.pop(n)
    if valid:
      confusion += confusion_matrix(pred, label, num_classes)
      count += 1
    if image is not None:
      rgb = denormalize(image, transforms.MEAN, transforms.STD)
      rgb = np.asarray(Image.fromarray(rgb).resize(label.shape[::-1], Image.BILINEAR))
      write_png(pathlib.Path(outdir) / 'overlays' / f'{n:04d}_{index}.png',
                overlay_panel(rgb, pred, class_names, label))
    bar.update()
  confusion = _allsum_confusion(confusion)
  results = summarize(confusion, class_names, unseen)
  if jax.process_count() > 1:
    count = int(np.asarray(multihost_utils.process_allgather(np.int32(count))).sum())
  results.update(num_images=count, split=f'{split.name}/{split.split}',
                 seconds=time.time() - start, crop_size=config.eval.crop_size,
                 stride=config.eval.stride)
  if outdir is not None and is_main:
    write_report(results, outdir, title=f'{split.name}/{split.split}')
  return results


def evaluate_checkpoint(config, checkpoint: str, outdir: str | None = None) -> dict[str, Any]:
  """Evaluates the parameters in `checkpoint` as `config` says; what `eval.py` runs.

  Args:
    config: a training or cross-dataset config (dataset, eval crop / stride, text embeddings).
    checkpoint: a training workdir (its latest checkpoint) or a parameter checkpoint directory
      (`python -m otseg_jax.convert`, or a workdir's params/).
    outdir: where the reports go; default CHECKPOINT/eval_<data name>_<split>.

  Returns:
    The results written to outdir/results.json.
  """
  # trainer imports this module; it holds the loading helpers training and evaluation share.
  from otseg_jax import trainer  # pylint: disable=g-import-not-at-top
  from otseg_jax.models import otseg  # pylint: disable=g-import-not-at-top
  checkpoint_path = pathlib.Path(checkpoint).expanduser()
  if not checkpoint_path.exists():
    raise FileNotFoundError(f'--checkpoint {checkpoint}: no such directory. Pass a training workdir '
                            'or a parameter checkpoint (python -m otseg_jax.convert writes one).')
  split = trainer.load_data_split(config, config.data.eval_split)
  dataset = split.classes
  class_names, unseen = dataset.classes, tuple(dataset.unseen)
  text = trainer.load_text_embeddings(config, class_names)
  model = otseg.model_from_config(config.model)
  params = trainer.load_params_any(checkpoint_path)
  patch = config.model.backbone.patch_size
  reference = jax.eval_shape(
      lambda: model.init({'params': jax.random.PRNGKey(0)}, np.zeros((1, 2 * patch, 2 * patch, 3),
                         np.float32), text, train=False))['params']
  trainer.check_same_structure(params, reference, f'checkpoint {checkpoint}')
  seen_mask = np.ones(len(class_names), bool)
  if config.setting == 'inductive':
    seen_mask[list(unseen)] = False
  if outdir is None:
    safe = config.data.name.replace('/', '_')
    outdir = checkpoint_path / f'eval_{safe}_{config.data.eval_split}'
  return evaluate(config, model, params, text, seen_mask, split, class_names=class_names,
                  unseen=unseen, outdir=pathlib.Path(outdir), max_images=config.eval.max_images)
