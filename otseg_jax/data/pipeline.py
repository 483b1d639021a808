"""Input pipeline: grain over a random-access source (a prepared TFDS split or the synthetic set).

What the trainer calls:
  split = load_split('voc12', 'train', data_dir)          # or synthetic.load_split(...)
  loader = make_train_loader(split, global_batch_size=16, crop_size=512, seed=0,
                             setting='inductive', process_index=jax.process_index(),
                             process_count=jax.process_count())
  batch = next(loader)   # {'image': (b, S, S, 3) float32, 'label': (b, S, S) int32}, b = 16 / P
  state = loader.get_state(); ...; loader.set_state(state)   # resume the same sequence
  for example in make_eval_iter(split, process_index=..., process_count=...):
    # {'image': (1, h, w, 3) float32, 'label': (1, H, W) int32, 'valid': (1,) bool, 'index': (1,)}

Training records: record `key` of epoch `e` is augmented with np.random.default_rng([seed, e, key]),
so a record's crop, flip and colour depend only on (seed, epoch, key), not on the number of
processes, threads or workers. Each process reads the keys process_index::process_count (disjoint,
together complete), reshuffled every epoch. The zero-shot label mapping
(`labels.visibility_table`) is applied after augmentation.

Evaluation: batch 1 per process, variable image size (the evaluator slides S x S windows over it),
images resized as mmseg's test pipeline, labels at the original size for the metrics. Every
process yields ceil(n / P) examples; the few padding examples repeat a record and have
valid=False, so all processes run the same number of steps and the padding is not counted.
"""

import dataclasses
import functools
import math
import pathlib
from typing import Any

from absl import flags
import grain
import numpy as np

from otseg_jax import classes as classes_lib
from otseg_jax.data import labels as labels_lib
from otseg_jax.data import transforms


@dataclasses.dataclass(frozen=True)
class Split:
  """One split of a dataset: records by index, and the dataset's classes.

  source: len(source) records; source[i] -> {'image': (H, W, 3) uint8 RGB,
    'label': (H, W) or (H, W, 1) uint8 with 0..K-1 and 255 = ignore, ...}.
  """
  name: str
  split: str
  source: Any
  classes: classes_lib.DatasetClasses


# TFDS builder name and otseg_jax.classes name of the built-in datasets (see builders.BUILDERS).
_CLASSES = {
    'voc12': 'voc12',
    'pascal_context59': 'context59',
    'coco_stuff164k': 'cocostuff171',
    'ade20k150': 'ade150',
}


def dataset_dir(name: str, data_dir: str | pathlib.Path) -> pathlib.Path:
  """The prepared folder of dataset NAME (newest version), e.g. DATA_DIR/voc12/1.0.0."""
  base = pathlib.Path(data_dir)
  if name.startswith('custom/'):
    base = base / 'custom_segmentation' / name[len('custom/'):]
  elif name in _CLASSES:
    base = base / name
  else:
    raise ValueError(f'Unknown dataset {name!r}; use one of {", ".join(_CLASSES)} or custom/NAME.')
  versions = sorted((p for p in base.glob('*') if (p / 'dataset_info.json').exists()),
                    key=lambda p: tuple(int(x) for x in p.name.split('.') if x.isdigit()))
  if not versions:
    raise FileNotFoundError(
        f'{name} is not prepared under {data_dir} (no {base}/<version>/dataset_info.json). '
        f'Run: python -m otseg_jax.data.prepare {name} --manual_dir DIR --data_dir {data_dir}')
  return versions[-1]


def load_split(name: str, split: str, data_dir: str | pathlib.Path) -> Split:
  """A prepared split as an array_record data source (no TensorFlow needed to read it)."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  builder = tfds.builder_from_directory(dataset_dir(name, data_dir))
  if split not in builder.info.splits:
    raise ValueError(f'{name} has no split {split!r}; it has {sorted(builder.info.splits)}.')
  metadata = builder.info.metadata or {}
  if name.startswith('custom/'):
    dataset_classes = classes_lib.DatasetClasses(
        name=name, classes=tuple(metadata['classes']), unseen=tuple(metadata['unseen']),
        reduce_zero_label=bool(metadata['reduce_zero_label']), templates=metadata['templates'])
  else:
    dataset_classes = classes_lib.get(_CLASSES[name])
  return Split(name, split, builder.as_data_source(split=split), dataset_classes)


def shard_keys(num_records: int, process_index: int, process_count: int) -> range:
  """Record keys read by one process: process_index::process_count (disjoint, union complete)."""
  if not 0 <= process_index < process_count:
    raise ValueError(f'process_index {process_index} must lie in [0, {process_count}).')
  return range(process_index, num_records, process_count)


def _label_2d(label: np.ndarray) -> np.ndarray:
  return label[..., 0] if label.ndim == 3 else label


def _train_example(index: int, key: int, *, source, records_per_epoch: int, seed: int,
                   crop_size: int, augment: transforms.TrainAugment | None,
                   visibility: np.ndarray) -> dict:
  """The training example at position `index` of this process's stream, reading record `key`."""
  epoch = index // records_per_epoch
  rng = np.random.default_rng([seed, epoch, int(key)])
  record = source[int(key)]
  image, label = transforms.train_transform(
      np.asarray(record['image']), _label_2d(np.asarray(record['label'])), rng, crop_size,
      augment)
  return {'image': image, 'label': visibility[label].astype(np.int32)}


def make_train_loader(split: Split, *, global_batch_size: int, crop_size: int, seed: int,
                      setting: str, augment: transforms.TrainAugment | None = (
                          transforms.TrainAugment()),
                      process_index: int = 0, process_count: int = 1, num_threads: int = 2,
                      prefetch: int = 8, worker_count: int = 0) -> grain.DatasetIterator:
  """Endless iterator of training batches for this process; checkpointable.

  Args:
    split: the training split.
    global_batch_size: batch over all processes; each process gets global_batch_size / P.
    crop_size: S.
    seed: non-negative int; fixes the shuffles and every augmentation.
    setting: 'inductive' | 'transductive' | 'fully_supervised' (`labels.visibility_table`).
    augment: mmseg augmentation settings, or None to only normalise and pad (synthetic data).
    process_index, process_count: jax.process_index(), jax.process_count().
    num_threads: threads decoding and augmenting records in this process.
    prefetch: records buffered ahead by those threads.
    worker_count: if > 0, that many worker processes (grain mp_prefetch) run the whole
      per-process pipeline; 0 keeps everything in this process.

  Returns:
    A grain DatasetIterator: next() -> {'image': (b, S, S, 3) float32 normalised RGB,
    'label': (b, S, S) int32}; get_state() / set_state(state) save and restore the position.
  """
  if global_batch_size % process_count:
    raise ValueError(f'global_batch_size {global_batch_size} is not divisible by process_count '
                     f'{process_count}.')
  if seed < 0 or seed >= 2**32:
    raise ValueError(f'seed must lie in [0, 2**32), got {seed}.')
  keys = shard_keys(len(split.source), process_index, process_count)
  if not keys:
    raise ValueError(f'{split.name}/{split.split} has {len(split.source)} records, fewer than '
                     f'the {process_count} processes.')
  visibility = labels_lib.visibility_table(setting, split.classes.num_classes,
                                           split.classes.unseen)
  example = functools.partial(
      _train_example, source=split.source, records_per_epoch=len(keys), seed=seed,
      crop_size=crop_size, augment=augment, visibility=visibility)
  ds = grain.MapDataset.source(keys).shuffle(seed=seed).repeat().map_with_index(example)
  ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=num_threads,
                                            prefetch_buffer_size=prefetch))
  ds = ds.batch(global_batch_size // process_count, drop_remainder=True)
  if worker_count > 0:
    if not flags.FLAGS.is_parsed():
      # grain's worker processes read its absl flags; outside absl.app.run (tests, notebooks)
      # nothing has parsed them, so take the defaults.
      flags.FLAGS.mark_as_parsed()
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count))
  return iter(ds)


def num_eval_steps(num_records: int, process_count: int) -> int:
  """Examples every process yields at evaluation: ceil(num_records / process_count)."""
  return math.ceil(num_records / process_count)


def _eval_example(item: tuple[int, bool], *, source, img_scale, min_size) -> dict:
  key, valid = item
  record = source[key]
  image = transforms.eval_transform(np.asarray(record['image']), img_scale, min_size)
  label = _label_2d(np.asarray(record['label'])).astype(np.int32)
  return {'image': image[None], 'label': label[None], 'valid': np.array([valid]),
          'index': np.array([key], np.int32)}


def make_eval_iter(split: Split, *, img_scale: tuple[int, int] | None = (2048, 512),
                   min_size: int | None = 512, process_index: int = 0, process_count: int = 1,
                   num_threads: int = 2, prefetch: int = 4) -> grain.DatasetIterator:
  """One pass over this process's share of an evaluation split, batch 1, variable size.

  Args:
    split: the evaluation split (labels are used as stored: global class ids).
    img_scale, min_size: mmseg test Resize(img_scale, keep_ratio=True, min_size); the
      reference's VOC / Context / COCO-Stuff pipelines use min_size 512 (short side 512, or 520
      with Context's img_scale (520, 520)); ADE uses none. img_scale=None keeps the size.
    process_index, process_count: as for training.

  Returns:
    Iterator of {'image': (1, h, w, 3) float32 normalised, 'label': (1, H, W) int32 at the
    original size, 'valid': (1,) bool (False on padding examples), 'index': (1,) int32 record}.
    Every process yields `num_eval_steps(len(split.source), process_count)` examples.
  """
  n = len(split.source)
  keys = list(shard_keys(n, process_index, process_count))
  items = [(k, True) for k in keys]
  pad_key = keys[0] if keys else 0
  items += [(pad_key, False)] * (num_eval_steps(n, process_count) - len(items))
  example = functools.partial(_eval_example, source=split.source, img_scale=img_scale,
                              min_size=min_size)
  ds = grain.MapDataset.source(items).map(example)
  ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=num_threads,
                                            prefetch_buffer_size=prefetch))
  return iter(ds)
