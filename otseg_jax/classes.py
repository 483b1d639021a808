"""Class names, zero-shot splits and prompt templates of every dataset, read from classes.json.

The single source for the text-embeddings command, the dataset builders and the configs, and the one
home of the ignore label, the training settings and the seen / unseen split of a setting.
"""

import dataclasses
import functools
import json
import pathlib

import numpy as np

_PATH = pathlib.Path(__file__).with_name('classes.json')

# The label of pixels that count for no class (borders, unlabelled, reduced background).
IGNORE_INDEX = 255

# inductive: train on the seen classes (unseen pixels ignored, unseen text withheld);
# transductive: self-training with pseudo-labels for the unseen pixels, all text rows;
# fully_supervised: every class seen.
SETTINGS = ('inductive', 'transductive', 'fully_supervised')


@dataclasses.dataclass(frozen=True)
class DatasetClasses:
  """Class names in label order (after background reduction) and the zero-shot split."""
  name: str
  classes: tuple[str, ...]
  unseen: tuple[int, ...]
  reduce_zero_label: bool
  templates: str  # 'otseg6' | 'otseg8'

  @property
  def num_classes(self) -> int:
    return len(self.classes)

  @property
  def seen(self) -> tuple[int, ...]:
    unseen = set(self.unseen)
    return tuple(i for i in range(self.num_classes) if i not in unseen)


@functools.cache
def _raw() -> dict:
  return json.loads(_PATH.read_text())


def dataset_names() -> tuple[str, ...]:
  return tuple(k for k in _raw() if not k.startswith('_') and not k.startswith('templates'))


def get(name: str) -> DatasetClasses:
  """The classes of dataset `name` (one of `dataset_names()`)."""
  raw = _raw()
  if name not in dataset_names():
    raise ValueError(f'Unknown dataset {name!r}; known: {", ".join(dataset_names())}.')
  entry = raw[name]
  return DatasetClasses(
      name=name,
      classes=tuple(entry['classes']),
      unseen=tuple(entry.get('unseen') or ()),
      reduce_zero_label=bool(entry.get('reduce_zero_label', False)),
      templates=entry.get('templates', 'otseg8'),
  )


def templates(name: str) -> tuple[str, ...]:
  """Prompt templates: 'otseg6' (the first six, VOC) or 'otseg8' (all eight)."""
  all8 = tuple(_raw()['templates_otseg8'])
  sizes = {'otseg6': 6, 'otseg8': 8}
  if name not in sizes:
    raise ValueError(f'Unknown template set {name!r}; use one of {sorted(sizes)}.')
  return all8[:sizes[name]]


def seen_mask(dataset: DatasetClasses, setting: str) -> np.ndarray:
  """(K,) bool: the classes trained with their ground truth in `setting`.

  Every class when fully supervised, else every class but the unseen ones. Evaluation calibrates
  these, transductive training pseudo-labels the others.
  """
  if setting not in SETTINGS:
    raise ValueError(f'config.setting={setting!r}: use one of {", ".join(SETTINGS)}.')
  if setting == 'fully_supervised':
    return np.ones(dataset.num_classes, bool)
  seen = np.zeros(dataset.num_classes, bool)
  seen[list(dataset.seen)] = True
  return seen


def train_text_rows(dataset: DatasetClasses, setting: str) -> np.ndarray:
  """Indices of the classes whose text the model trains against: the seen ones in the inductive
  setting (the unseen names are withheld), every class otherwise."""
  if setting == 'inductive':
    return np.flatnonzero(seen_mask(dataset, setting))
  return np.arange(dataset.num_classes)
