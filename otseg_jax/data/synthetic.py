"""A zero-shot segmentation dataset generated on the fly: no download, deterministic for a seed.

Classes are colour x stripe-orientation combinations: 4 colours (red, green, blue, yellow) x 3
orientations (horizontal, vertical, diagonal) = 12 classes, class k = colour k // 3, orientation
k % 3. The unseen classes are `SyntheticConfig.unseen` (config.data.synthetic.unseen), by default
the "diagonal" pairs (colour i, orientation i) for i = 0, 1, 2: red horizontal (0), green vertical
(4), blue diagonal (8). Each of those is a new combination of attributes that seen classes show:
its colour in 2 seen classes, its orientation in 3.

Images (S x S, default 64) are split into 2-4 Voronoi regions (`min_regions`-`max_regions`), one
class each (no ignore pixels).
A region's pixels are colour * (0.35 + 0.65 * stripe) + noise, where stripe is a cosine of period
4 pixels across the orientation, with a random phase; the colour varies +-15 % per region. Both
attributes are visible in any 8x8 or 16x16 patch (mean colour; 2-4 stripe periods).
Unseen pixels occur in training images too, as in the real benchmarks: the inductive
visibility table turns them into ignore, the transductive one keeps their ids.

Text embeddings (K, N, C) mirror the attributes: a fixed random unit vector per colour and per
orientation; class k's embedding is colour + orientation vector, each of the N prompts adds noise
(prompt_noise times the class vector's norm, in a random direction), then L2-normalised. Two classes
sharing an attribute have cosine ~0.5, others ~0, so an unseen class's text row is predictable
from the seen ones.

Chance level (`chance_iou`): with prediction uniformly random over all K classes, class k's
expected IoU is p_k / (K p_k + 1 - p_k) for pixel frequency p_k, i.e. 1 / (2K - 1) = 4.3 % at
equal frequencies (K = 12). A model that gets the colour right but guesses the orientation gets
1/5 = 20 %; one that never predicts unseen classes gets 0.

Records use the same format as a prepared TFDS split, so `pipeline.make_train_loader` and
`make_eval_iter` read them (with augment=None: a flip or hue shift would change the class, and
img_scale=None at evaluation).
"""

import dataclasses

import numpy as np

from otseg_jax import classes as classes_lib
from otseg_jax.data import pipeline

COLOURS = (('red', (215, 45, 45)), ('green', (45, 175, 65)), ('blue', (50, 85, 215)),
           ('yellow', (225, 200, 45)))
# Orientation name and the direction (dy, dx) along which the stripe intensity varies.
ORIENTATIONS = (('horizontal', (1.0, 0.0)), ('vertical', (0.0, 1.0)),
                ('diagonal', (0.5**0.5, 0.5**0.5)))
UNSEEN = (0, 4, 8)  # (red, horizontal), (green, vertical), (blue, diagonal)
NUM_CLASSES = len(COLOURS) * len(ORIENTATIONS)
# 'pretrain' and 'pretrain_val' are the images CLIP is pretrained and tested on
# (otseg_jax.data.synthetic_clip), never those of the segmentation splits.
_SPLIT_IDS = {'train': 0, 'val': 1, 'pretrain': 2, 'pretrain_val': 3}
_SEGMENTATION_SPLITS = ('train', 'val')


@dataclasses.dataclass(frozen=True)
class SyntheticConfig:
  """Sizes, zero-shot split and seed of the synthetic dataset.

  embed_dim and num_prompts shape its own text embeddings (`text_embeddings`), which must match the
  model's output dim C and prompt count N; unused when a CLIP text tower computes the text.
  """
  image_size: int = 64
  num_train: int = 1024
  num_val: int = 128
  embed_dim: int = 512
  num_prompts: int = 8
  prompt_noise: float = 0.2
  period: float = 4.0
  max_regions: int = 4
  pixel_noise: float = 6.0
  seed: int = 0
  unseen: tuple[int, ...] = UNSEEN  # class ids k = 3 * colour + orientation
  min_regions: int = 2

  def __post_init__(self):
    # A config file or a command line gives a list; the dataclass stays hashable with a tuple.
    object.__setattr__(self, 'unseen', tuple(int(k) for k in self.unseen))
    bad = [k for k in self.unseen if not 0 <= k < NUM_CLASSES]
    if bad or len(set(self.unseen)) != len(self.unseen) or len(self.unseen) >= NUM_CLASSES:
      raise ValueError(f'config.data.synthetic.unseen={self.unseen}: give distinct class ids in '
                       f'[0, {NUM_CLASSES}) (k = 3 * colour + orientation), leaving at least one '
                       'seen class.')
    if not 1 <= self.min_regions <= self.max_regions <= NUM_CLASSES:
      raise ValueError(f'synthetic regions {self.min_regions}-{self.max_regions}: need 1 <= '
                       f'min_regions <= max_regions <= {NUM_CLASSES}.')


def class_names() -> tuple[str, ...]:
  """The K = 12 class names in label order: 'red horizontal stripes', ..."""
  return tuple(f'{colour} {orientation} stripes'
               for colour, _ in COLOURS for orientation, _ in ORIENTATIONS)


def dataset_classes(config: SyntheticConfig = SyntheticConfig()) -> classes_lib.DatasetClasses:
  """Class names in label order and the unseen indices of `config`."""
  return classes_lib.DatasetClasses(name='synthetic', classes=class_names(),
                                    unseen=tuple(sorted(config.unseen)), reduce_zero_label=False,
                                    templates='otseg8')


def render(config: SyntheticConfig, split: str, index: int) -> dict:
  """Record `index` of `split`: {'image': (S, S, 3) uint8, 'label': (S, S) uint8, 'name': str}.

  A pure function of (config, split, index); split is 'train', 'val', 'pretrain' or
  'pretrain_val'.
  """
  if split not in _SPLIT_IDS:
    raise ValueError(f'synthetic splits are {sorted(_SPLIT_IDS)}, got {split!r}.')
  size = config.image_size
  rng = np.random.default_rng([config.seed, _SPLIT_IDS[split], index])
  num_regions = int(rng.integers(config.min_regions, config.max_regions + 1))
  centres = rng.uniform(0, size, size=(num_regions, 2))
  region_classes = rng.choice(NUM_CLASSES, size=num_regions, replace=False)
  yy, xx = np.mgrid[0:size, 0:size].astype(np.float64) + 0.5
  dist = (yy[..., None] - centres[:, 0])**2 + (xx[..., None] - centres[:, 1])**2
  region = np.argmin(dist, axis=-1)  # (S, S) Voronoi cell of each pixel
  image = np.zeros((size, size, 3))
  for r, k in enumerate(region_classes):
    colour = np.asarray(COLOURS[k // len(ORIENTATIONS)][1], np.float64)
    dy, dx = ORIENTATIONS[k % len(ORIENTATIONS)][1]
    phase = rng.uniform(0, 2 * np.pi)
    stripe = 0.5 + 0.5 * np.cos(2 * np.pi * (yy * dy + xx * dx) / config.period + phase)
    pixels = colour * rng.uniform(0.85, 1.15) * (0.35 + 0.65 * stripe[..., None])
    image = np.where((region == r)[..., None], pixels, image)
  image += rng.normal(0, config.pixel_noise, image.shape)
  return {'image': np.clip(np.rint(image), 0, 255).astype(np.uint8),
          'label': region_classes[region].astype(np.uint8),
          'name': f'{split}/{index}'}


@dataclasses.dataclass(frozen=True)
class SyntheticSource:
  """Random-access records of one split, rendered when read (picklable, for grain workers)."""
  config: SyntheticConfig
  split: str

  def __len__(self) -> int:
    return self.config.num_train if self.split == 'train' else self.config.num_val

  def __getitem__(self, index: int) -> dict:
    if not 0 <= index < len(self):
      raise IndexError(f'index {index} out of range for {len(self)} records.')
    return render(self.config, self.split, int(index))


def text_embeddings(config: SyntheticConfig) -> np.ndarray:
  """(K, N, C) float32 L2-normalised class-prompt embeddings built from the attributes."""
  rng = np.random.default_rng([config.seed, 1000])
  dim = config.embed_dim

  def unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)

  colour_vecs = unit(rng.normal(size=(len(COLOURS), dim)))
  orientation_vecs = unit(rng.normal(size=(len(ORIENTATIONS), dim)))
  classes = np.stack([colour_vecs[c] + orientation_vecs[o]
                      for c in range(len(COLOURS)) for o in range(len(ORIENTATIONS))])
  noise = unit(rng.normal(size=(len(classes), config.num_prompts, dim)))
  scale = config.prompt_noise * np.linalg.norm(classes, axis=-1)[:, None, None]
  return unit(classes[:, None, :] + scale * noise).astype(np.float32)


def load_split(split: str, config: SyntheticConfig = SyntheticConfig()) -> pipeline.Split:
  """'train' or 'val' as a `pipeline.Split` (records rendered on demand)."""
  if split not in _SEGMENTATION_SPLITS:
    raise ValueError(f'synthetic segmentation splits are {_SEGMENTATION_SPLITS}, got {split!r}.')
  return pipeline.Split('synthetic', split, SyntheticSource(config, split),
                        dataset_classes(config))


def chance_iou(config: SyntheticConfig = SyntheticConfig(), split: str = 'val') -> dict:
  """Expected IoU of uniformly random predictions over all K classes, from the split's labels.

  Returns {'per_class': (K,) IoU_k = p_k / (K p_k + 1 - p_k), 'seen_miou', 'unseen_miou'}.
  """
  source = SyntheticSource(config, split)
  counts = np.zeros(256, np.int64)
  for i in range(len(source)):
    counts += np.bincount(source[i]['label'].ravel(), minlength=256)
  classes = dataset_classes(config)
  k = classes.num_classes
  p = counts[:k] / counts[:k].sum()
  iou = p / (k * p + 1 - p)
  return {'per_class': iou, 'seen_miou': float(iou[list(classes.seen)].mean()),
          'unseen_miou': float(iou[list(classes.unseen)].mean())}
