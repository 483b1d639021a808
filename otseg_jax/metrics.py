"""Zero-shot segmentation metrics.

Metrics follow mmseg: per class, IoU = intersection / union of pixel sets summed over the whole split
(not averaged per image); mIoU is the mean over classes whose union is non-empty. On top of that, we
report seen mIoU, unseen mIoU and their harmonic mean hIoU = 2SU/(S+U), the numbers the zero-shot
literature compares (the reference code never computes hIoU).

The metrics are host numpy, so they can be checked by hand.
"""

from collections.abc import Sequence
from typing import Any

import numpy as np

from otseg_jax import classes


def confusion_matrix(pred: np.ndarray, label: np.ndarray, num_classes: int,
                     ignore_index: int = classes.IGNORE_INDEX) -> np.ndarray:
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
