"""Tiny dataset trees in the real on-disk layouts, with known pixels, for tests and benchmarks.

Each writer creates a few small images (default 40x48) and label maps whose raw values are a
deterministic function of the image index, so a test can recompute what a prepared dataset must
hold (`raw_label`). Labels are written as 8-bit 'L' PNGs (VOC's palette PNGs read the same).
"""

import pathlib

import numpy as np
from PIL import Image

SIZE = (40, 48)  # (H, W)


def image_array(index: int, size: tuple[int, int] = SIZE) -> np.ndarray:
  """(H, W, 3) uint8 smooth colours (JPEG-friendly) that differ per index."""
  yy, xx = np.mgrid[0:size[0], 0:size[1]]
  base = np.array([(37 * index) % 200 + 20, (91 * index) % 200 + 20, (53 * index) % 200 + 20])
  pixels = base + 1.5 * yy[..., None] - 1.0 * xx[..., None]
  return np.clip(pixels, 0, 255).astype(np.uint8)


def raw_label(index: int, values: list[int], size: tuple[int, int] = SIZE) -> np.ndarray:
  """(H, W) uint8: vertical bands cycling through `values` (shifted by index), top rows 255."""
  h, w = size
  band = (np.arange(w) * len(values) // w + index) % len(values)
  label = np.asarray(values, np.uint8)[band][None, :].repeat(h, axis=0)
  label[:3] = 255
  return label


def _save(path: pathlib.Path, array: np.ndarray, **kwargs) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  Image.fromarray(array).save(path, **kwargs)


def _ids(prefix: str, n: int, start: int = 0) -> list[str]:
  return [f'{prefix}_{i:06d}' for i in range(start, start + n)]


def write_voc12(root: pathlib.Path, num_train: int = 2, num_val: int = 2, num_aug: int = 3
                ) -> dict[str, list[str]]:
  """VOCdevkit/VOC2012 with train, val, trainaug (= train + aug) lists as voc_aug.py writes them.

  SegmentationClass labels use values 0..20 (+255); SegmentationClassAug ones the same pattern
  shifted, so a test can tell which folder a record was read from. Returns the id lists.
  """
  voc = pathlib.Path(root) / 'VOCdevkit' / 'VOC2012'
  train, val, aug = _ids('2007', num_train), _ids('2008', num_val), _ids('2009', num_aug)
  for i, name in enumerate(train + val + aug):
    _save(voc / 'JPEGImages' / f'{name}.jpg', image_array(i), quality=95)
    _save(voc / 'SegmentationClass' / f'{name}.png', raw_label(i, [0, 3, 20, 7]))
    if name not in val:
      _save(voc / 'SegmentationClassAug' / f'{name}.png', raw_label(i, [5, 0, 11]))
  lists = voc / 'ImageSets' / 'Segmentation'
  lists.mkdir(parents=True, exist_ok=True)
  (lists / 'train.txt').write_text('\n'.join(train) + '\n')
  (lists / 'val.txt').write_text('\n'.join(val) + '\n')
  (lists / 'trainaug.txt').write_text('\n'.join(train + aug) + '\n')
  (lists / 'aug.txt').write_text('\n'.join(aug) + '\n')
  return {'train': train, 'val': val, 'aug': aug}


def write_context59(root: pathlib.Path, num_train: int = 3, num_val: int = 2,
                    lists_at_root: bool = False) -> dict[str, list[str]]:
  """VOCdevkit/VOC2010 with SegmentationClassContext (values 0..59) and the split lists under
  ImageSets/SegmentationContext/ (mmseg) or, with lists_at_root, in VOC2010/ (the reference)."""
  voc = pathlib.Path(root) / 'VOCdevkit' / 'VOC2010'
  train, val = _ids('2008', num_train), _ids('2010', num_val)
  for i, name in enumerate(train + val):
    _save(voc / 'JPEGImages' / f'{name}.jpg', image_array(i), quality=95)
    _save(voc / 'SegmentationClassContext' / f'{name}.png', raw_label(i, [0, 1, 59, 30]))
  lists = voc if lists_at_root else voc / 'ImageSets' / 'SegmentationContext'
  lists.mkdir(parents=True, exist_ok=True)
  (lists / 'train.txt').write_text('\n'.join(train) + '\n')
  (lists / 'val.txt').write_text('\n'.join(val) + '\n')
  return {'train': train, 'val': val}


def write_coco_stuff(root: pathlib.Path, num_train: int = 3, num_val: int = 2,
                     raw_182: bool = False) -> dict[str, list[str]]:
  """images/{train2017,val2017} with *_labelTrainIds.png (171 ids) or, with raw_182, the raw
  stuffthingmaps <id>.png with ids 0-181 (unused thing ids avoided)."""
  root = pathlib.Path(root)
  out = {}
  index = 0
  for split, folder, n in (('train', 'train2017', num_train), ('val', 'val2017', num_val)):
    ids = [f'{100 + index + i:012d}' for i in range(n)]
    for name in ids:
      _save(root / 'images' / folder / f'{name}.jpg', image_array(index), quality=95)
      if raw_182:
        _save(root / 'annotations' / folder / f'{name}.png', raw_label(index, [0, 12, 91, 181]))
      else:
        _save(root / 'annotations' / folder / f'{name}_labelTrainIds.png',
              raw_label(index, [0, 11, 80, 170]))
      index += 1
    out[split] = ids
  return out


def write_ade20k(root: pathlib.Path, num_train: int = 3, num_val: int = 2
                 ) -> dict[str, list[str]]:
  """ADEChallengeData2016/{images,annotations}/{training,validation} with values 0..150."""
  ade = pathlib.Path(root) / 'ADEChallengeData2016'
  out = {}
  index = 0
  for split, folder, n in (('train', 'training', num_train), ('val', 'validation', num_val)):
    ids = [f'ADE_{folder[:5]}_{i + 1:08d}' for i in range(n)]
    for name in ids:
      _save(ade / 'images' / folder / f'{name}.jpg', image_array(index), quality=95)
      _save(ade / 'annotations' / folder / f'{name}.png', raw_label(index, [0, 1, 150, 75]))
      index += 1
    out[split] = ids
  return out


def write_custom(root: pathlib.Path, classes: list[str], unseen: list[str] | None = None,
                 num_train: int = 3, num_val: int = 2) -> dict[str, list[str]]:
  """images/{train,val}/*.png (lossless) + labels/{train,val}/*.png + classes.txt [+ unseen.txt]."""
  root = pathlib.Path(root)
  values = list(range(len(classes)))
  out = {}
  index = 0
  for split, n in (('train', num_train), ('val', num_val)):
    ids = [f'img{index + i:03d}' for i in range(n)]
    for name in ids:
      _save(root / 'images' / split / f'{name}.png', image_array(index))
      _save(root / 'labels' / split / f'{name}.png', raw_label(index, values))
      index += 1
    out[split] = ids
  (root / 'classes.txt').write_text('\n'.join(classes) + '\n')
  if unseen is not None:
    (root / 'unseen.txt').write_text('\n'.join(unseen) + '\n')
  return out
