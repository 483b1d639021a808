"""TFDS builders (manual download, array_record files) for the datasets OTSeg trains and tests on.

Every builder stores the same three features per record, in the order its split lists name them
(shuffling at write time is disabled, so record i of a split is the i-th listed image):
  image: the original JPEG/PNG bytes when the file is RGB, otherwise the image converted to RGB
    and stored as PNG; decoded (H, W, 3) uint8.
  label: a PNG of the label map AFTER the dataset's label conversion, decoded (H, W, 1) uint8 with
    values 0..K-1 and 255 = ignore. Background reduction (`labels.reduce_zero_label`) and the
    COCO-Stuff 182 -> 171 conversion happen here, once, so every reader agrees.
  name: the image id.
Every record is checked while preparing (`encode_record`): an unreadable image, a label whose size
differs from its image, a label that is not single-channel or holds values outside 0..K-1 / 255
stops preparation with the file name, or is skipped and counted with skip_bad=True.

The builders are not put in TFDS's global registry: `prepare.py` constructs them directly and
readers open the prepared folder with `tfds.builder_from_directory` (see `pipeline.load_split`).
"""

import concurrent.futures
import io
import pathlib

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from otseg_jax import classes as classes_lib
from otseg_jax.data import labels as labels_lib
from otseg_jax.data import layouts

VERSION = '1.0.0'
# Records checked and encoded in parallel per chunk; chunks bound the memory held at once.
_CHUNK = 64


class BadRecordError(ValueError):
  """One record cannot be stored; the message starts with the offending file."""


def _open_image(path: pathlib.Path, data: bytes, what: str) -> Image.Image:
  """PIL image fully decoded from `data`; BadRecordError naming `path` when it cannot be."""
  try:
    image = Image.open(io.BytesIO(data))
    image.load()
  except Exception as e:  # PIL raises OSError, SyntaxError, ValueError... for broken files.
    raise BadRecordError(f'{path}: corrupt or unreadable {what} ({type(e).__name__}: {e}). '
                         'Replace the file, or pass --skip_bad to leave the record out.') from e
  return image


def _read(path: pathlib.Path, what: str) -> bytes:
  try:
    return path.read_bytes()
  except FileNotFoundError as e:
    raise BadRecordError(f'{path}: {what} listed for this split but missing. Restore the file, '
                         'or pass --skip_bad to leave the record out.') from e


def _png(array: np.ndarray) -> bytes:
  buffer = io.BytesIO()
  Image.fromarray(array).save(buffer, format='PNG')
  return buffer.getvalue()


def encode_record(record: layouts.Record, *, num_classes: int, reduce_zero_label: bool) -> dict:
  """Checks one record and returns the example to store: {'image': bytes, 'label': bytes, 'name'}.

  The label goes through, in this order: the COCO-Stuff 182 -> 171 map (label_kind 'coco182'),
  then `labels.reduce_zero_label` (when the dataset reduces), then a range check (0..K-1, 255).
  Raises BadRecordError naming the file for anything that would make the stored record wrong.
  """
  image_bytes = _read(record.image, 'image')
  image = _open_image(record.image, image_bytes, 'image')
  if not (image.mode == 'RGB' and image.format in ('JPEG', 'PNG')):
    # Grayscale / CMYK / palette / RGBA files: store the RGB pixels losslessly, so readers only
    # ever decode RGB (mmseg's loader makes the same conversion to 3 channels when it reads).
    image_bytes = _png(np.asarray(image.convert('RGB')))
  label_image = _open_image(record.label, _read(record.label, 'label'), 'label')
  if label_image.mode not in ('L', 'P'):
    raise BadRecordError(f'{record.label}: label has PIL mode {label_image.mode}; labels must be '
                         'single-channel class ids (8-bit L or P PNG), not colour images.')
  if label_image.size != image.size:
    raise BadRecordError(
        f'{record.label}: label is {label_image.size[0]}x{label_image.size[1]} (WxH) but image '
        f'{record.image} is {image.size[0]}x{image.size[1]}; a label must have its image\'s size. '
        'Fix the pair, or pass --skip_bad to leave the record out.')
  label = np.asarray(label_image, dtype=np.uint8)
  if record.label_kind == 'coco182':
    try:
      label = labels_lib.coco182_to_171(label)
    except ValueError as e:
      raise BadRecordError(f'{record.label}: {e}') from e
  if reduce_zero_label:
    label = labels_lib.reduce_zero_label(label)
  values = np.unique(label)
  bad = [int(v) for v in values if v >= num_classes and v != labels_lib.IGNORE]
  if bad:
    stage = 'after background reduction ' if reduce_zero_label else ''
    raise BadRecordError(f'{record.label}: label values {bad} {stage}are outside 0..'
                         f'{num_classes - 1} and 255 (ignore) for {num_classes} classes.')
  return {'image': image_bytes, 'label': _png(label), 'name': record.name}


def features() -> tfds.features.FeaturesDict:
  return tfds.features.FeaturesDict({
      'image': tfds.features.Image(shape=(None, None, 3), dtype=np.uint8),
      'label': tfds.features.Image(shape=(None, None, 1), dtype=np.uint8, encoding_format='png'),
      'name': tfds.features.Text(),
  })


class _SegmentationBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Shared generation logic; subclasses say where the records are and which classes apply."""

  VERSION = tfds.core.Version(VERSION)
  MANUAL_DOWNLOAD_INSTRUCTIONS = ''  # the dataset's expected layout (layouts.*_LAYOUT)
  CLASSES = ''  # name in otseg_jax.classes

  def __init__(self, *, skip_bad: bool = False, num_threads: int = 4, **kwargs):
    self.skip_bad = skip_bad
    self.num_threads = num_threads
    self.skipped: list[str] = []  # messages of the records left out with skip_bad
    super().__init__(**kwargs)

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls):
    # TFDS looks beside the builder's source for a checksums file (we download nothing); its
    # lookup imports `importlib_resources`, which TFDS only requires on Python < 3.9.
    return None

  def dataset_classes(self) -> classes_lib.DatasetClasses:
    return classes_lib.get(self.CLASSES)

  def list_records(self, manual_dir: pathlib.Path) -> dict[str, list[layouts.Record]]:
    raise NotImplementedError

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=self.__doc__,
        features=features(),
        disable_shuffling=True,
        metadata=tfds.core.MetadataDict(self._metadata()),
    )

  def _metadata(self) -> dict:
    c = self.dataset_classes()
    return {'classes': c.name, 'reduce_zero_label': c.reduce_zero_label}

  def _split_generators(self, dl_manager):
    splits = self.list_records(pathlib.Path(dl_manager.manual_dir))
    return {split: self._generate_examples(records) for split, records in splits.items()}

  def _try_encode(self, record: layouts.Record):
    c = self.dataset_classes()
    try:
      return encode_record(record, num_classes=c.num_classes,
                           reduce_zero_label=c.reduce_zero_label)
    except BadRecordError as e:
      return e

  def _generate_examples(self, records: list[layouts.Record]):
    with concurrent.futures.ThreadPoolExecutor(max(1, self.num_threads)) as pool:
      for start in range(0, len(records), _CHUNK):
        chunk = records[start:start + _CHUNK]
        for record, result in zip(chunk, pool.map(self._try_encode, chunk)):
          if isinstance(result, BadRecordError):
            if not self.skip_bad:
              raise result
            self.skipped.append(str(result))
            continue
          yield record.key, result
    # Saved with the dataset (metadata.json), so the reader can see what was left out.
    self.info.metadata['skipped'] = list(self.skipped)


class Voc12(_SegmentationBuilder, skip_registration=True):
  """PASCAL VOC 2012 (20 classes, background reduced to ignore); splits train (reference list,
  12,046), train_aug_unique (10,582) and val (1,449)."""
  name = 'voc12'
  MANUAL_DOWNLOAD_INSTRUCTIONS = layouts.VOC12_LAYOUT
  CLASSES = 'voc12'

  def list_records(self, manual_dir):
    return layouts.voc12(manual_dir)


class PascalContext59(_SegmentationBuilder, skip_registration=True):
  """PASCAL-Context 59 classes (background reduced to ignore); splits train (4,996), val (5,104)."""
  name = 'pascal_context59'
  MANUAL_DOWNLOAD_INSTRUCTIONS = layouts.CONTEXT59_LAYOUT
  CLASSES = 'context59'

  def list_records(self, manual_dir):
    return layouts.pascal_context59(manual_dir)


class CocoStuff164k(_SegmentationBuilder, skip_registration=True):
  """COCO-Stuff 164k, 171 classes (no reduction); splits train (118,287), val (5,000)."""
  name = 'coco_stuff164k'
  MANUAL_DOWNLOAD_INSTRUCTIONS = layouts.COCO_STUFF_LAYOUT
  CLASSES = 'cocostuff171'

  def list_records(self, manual_dir):
    return layouts.coco_stuff164k(manual_dir)


class Ade20k150(_SegmentationBuilder, skip_registration=True):
  """ADE20K SceneParsing, 150 classes ("other" 0 reduced to ignore); splits train (20,210), val
  (2,000); for cross-dataset evaluation."""
  name = 'ade20k150'
  MANUAL_DOWNLOAD_INSTRUCTIONS = layouts.ADE150_LAYOUT
  CLASSES = 'ade150'

  def list_records(self, manual_dir):
    return layouts.ade20k150(manual_dir)


class CustomSegmentation(_SegmentationBuilder, skip_registration=True):
  """A user's folder of images, PNG label maps and class names; one config per dataset name."""
  name = 'custom_segmentation'
  MANUAL_DOWNLOAD_INSTRUCTIONS = layouts.CUSTOM_LAYOUT

  def __init__(self, *, classes: classes_lib.DatasetClasses, **kwargs):
    self.custom_classes = classes
    super().__init__(config=tfds.core.BuilderConfig(name=classes.name), **kwargs)

  def dataset_classes(self):
    return self.custom_classes

  def _metadata(self):
    c = self.custom_classes
    return {'classes': list(c.classes), 'unseen': list(c.unseen),
            'reduce_zero_label': c.reduce_zero_label, 'templates': c.templates}

  def list_records(self, manual_dir):
    return layouts.custom(manual_dir)


# The dataset names the prepare command and the readers accept, besides 'custom/NAME'.
BUILDERS = {
    'voc12': Voc12,
    'pascal_context59': PascalContext59,
    'coco_stuff164k': CocoStuff164k,
    'ade20k150': Ade20k150,
}
