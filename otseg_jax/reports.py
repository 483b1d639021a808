"""Evaluation reports: results.json, per-class table, bar chart, overlays, a progress line.

All writes are atomic (tmp + rename), so a reader never sees half a file and a crash never leaves
one behind.
"""

import io
import json
import pathlib
import sys
import time
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
from PIL import Image
from PIL import ImageDraw

from otseg_jax import files


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


def per_class_figure(results: dict[str, Any], title: str = ''):
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
    # Above the axes, right of the title: inside, it hid the bars of the last classes.
    ax.legend(handles=handles, loc='lower right', bbox_to_anchor=(1.0, 1.0), ncol=len(handles),
              fontsize=8, frameon=False, borderaxespad=0.2)
  hiou = results['hIoU']
  ax.set_title((title + '  ' if title else '') + (f'hIoU {hiou:.1f}' if hiou is not None else
                                                  f'mIoU {results["mIoU"] or 0:.1f}'), loc='left')
  fig.tight_layout()
  return fig


def plot_per_class_iou(results: dict[str, Any], path: pathlib.Path, title: str = '') -> None:
  """`per_class_figure` as a PNG."""
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top
  fig = per_class_figure(results, title)
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
  draw = ImageDraw.Draw(Image.new('RGB', (1, 1)))
  # Columns as wide as the longest name: names are never cut (COCO-Stuff has long ones).
  column = 24 + max([int(draw.textlength(str(class_names[k]))) for k in class_ids] + [0])
  per_row = max(1, width // column)
  rows = max(1, -(-len(class_ids) // per_row))
  strip = Image.new('RGB', (width, rows * row_h + 4), (255, 255, 255))
  draw = ImageDraw.Draw(strip)
  for n, k in enumerate(class_ids):
    x, y = (n % per_row) * column + 4, (n // per_row) * row_h + 2
    draw.rectangle([x, y + 2, x + 12, y + 12], fill=tuple(int(c) for c in colours[k]))
    draw.text((x + 16, y), str(class_names[k]), fill=(0, 0, 0))
  return np.asarray(strip)


def title_strip(titles: Sequence[str], panel_width: int) -> np.ndarray:
  """(h, len(titles) * panel_width, 3) uint8 white strip, each title over its panel."""
  strip = Image.new('RGB', (len(titles) * panel_width, 16), (255, 255, 255))
  draw = ImageDraw.Draw(strip)
  for n, title in enumerate(titles):
    draw.text((n * panel_width + 4, 2), title, fill=(0, 0, 0))
  return np.asarray(strip)


def overlay_panel(image: np.ndarray, pred: np.ndarray, class_names: Sequence[str],
                  label: np.ndarray | None = None) -> np.ndarray:
  """Image | prediction overlay [| ground-truth overlay] side by side, titled, with a legend of the
  classes that appear. (H, W, 3) uint8 image, (H, W) int masks."""
  num_classes = len(class_names)
  factor = -(-128 // min(image.shape[:2]))  # small images (synthetic) are shown enlarged
  if factor > 1:
    up = lambda x: np.repeat(np.repeat(x, factor, axis=0), factor, axis=1)
    image, pred = up(image), up(pred)
    label = None if label is None else up(label)
  panels = [image, overlay(image, pred, num_classes)]
  titles = ['image', 'prediction']
  present = set(np.unique(pred).tolist())
  if label is not None:
    panels.append(overlay(image, label, num_classes))
    titles.append('ground truth')
    present |= set(np.unique(label).tolist())
  row = np.concatenate(panels, axis=1)
  ids = sorted(k for k in present if 0 <= k < num_classes)
  return np.concatenate([title_strip(titles, image.shape[1]), row,
                         legend_strip(ids, class_names, num_classes, row.shape[1])], axis=0)


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
