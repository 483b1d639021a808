"""What each dataset looks like on disk after mmseg's dataset preparation, and how to list it.

One function per dataset turns a manual-download folder into `{split: [Record, ...]}`, in the order
the reference reads them. Missing folders or split lists raise `LayoutError`, whose message gives
the exact expected layout and where the data comes from. Files listed but absent, unreadable or
inconsistent are not checked here: the builders check every record while preparing (see
`builders.encode_record`), so those errors name the file and honour `--skip_bad`.
No TensorFlow here: this module is plain pathlib.
"""

import dataclasses
import pathlib

from otseg_jax import classes as classes_lib

MMSEG_GUIDE = ('https://github.com/open-mmlab/mmsegmentation/blob/main/docs/en/user_guides/'
               '2_dataset_prepare.md')


@dataclasses.dataclass(frozen=True)
class Record:
  """One (image, label) pair to store.

  key: unique within its split (the TFDS example key), e.g. 'trainaug/2007_000032'.
  name: the image id stored with the example, e.g. '2007_000032'.
  label_kind: 'index' (class ids as stored, before any reduction) or 'coco182' (raw COCO-Stuff
    stuffthingmaps ids, converted to the 171 train ids when prepared).
  """
  key: str
  name: str
  image: pathlib.Path
  label: pathlib.Path
  label_kind: str = 'index'


class LayoutError(FileNotFoundError):
  """The manual-download folder is missing or incomplete; the message says what is expected."""


VOC12_LAYOUT = f"""\
voc12 expects mmseg's PASCAL VOC 2012 + SBD layout. --manual_dir may be the folder that holds
VOCdevkit/, VOCdevkit/ itself, or VOC2012/:
  VOCdevkit/VOC2012/
    JPEGImages/<id>.jpg
    SegmentationClass/<id>.png        VOC masks: 0 background, 1-20 classes, 255 border
    SegmentationClassAug/<id>.png     SBD masks written by mmseg's voc_aug.py (0 bg, 1-20)
    ImageSets/Segmentation/train.txt     1,464 ids
    ImageSets/Segmentation/val.txt       1,449 ids
    ImageSets/Segmentation/trainaug.txt  10,582 ids (voc_aug.py: (train + SBD train/val) - val)
    ImageSets/Segmentation/aug.txt       optional, 9,118 ids (voc_aug.py: SBD - train - val);
                                         derived as trainaug - train when absent
Get the data: VOCtrainval_11-May-2012.tar from http://host.robots.ox.ac.uk/pascal/VOC/voc2012/ and
SBD benchmark.tgz from
http://www.eecs.berkeley.edu/Research/Projects/CS/vision/grouping/semantic_contours/
then run mmsegmentation's
  python tools/dataset_converters/voc_aug.py VOCdevkit VOCaug/benchmark_RELEASE --nproc 8
({MMSEG_GUIDE})."""

CONTEXT59_LAYOUT = f"""\
pascal_context59 expects mmseg's PASCAL-Context layout. --manual_dir may be the folder that holds
VOCdevkit/, VOCdevkit/ itself, or VOC2010/:
  VOCdevkit/VOC2010/
    JPEGImages/<id>.jpg
    SegmentationClassContext/<id>.png   0 background, 1-59 classes (mmseg's pascal_context.py)
    ImageSets/SegmentationContext/train.txt, val.txt   4,996 / 5,104 ids (written by that converter)
      or train.txt, val.txt directly in VOC2010/ (where the OTSeg reference's config looks)
Get the data: VOCtrainval_03-May-2010.tar from http://host.robots.ox.ac.uk/pascal/VOC/voc2010/ and
trainval_merged.json from
https://codalabuser.blob.core.windows.net/public/trainval_merged.json, then
run mmsegmentation's (needs the `detail` API)
  python tools/dataset_converters/pascal_context.py VOCdevkit trainval_merged.json
({MMSEG_GUIDE})."""

COCO_STUFF_LAYOUT = f"""\
coco_stuff164k expects mmseg's COCO-Stuff 164k layout; --manual_dir is the folder holding images/
and annotations/ (mmseg's data/coco_stuff164k):
  images/train2017/<id>.jpg, images/val2017/<id>.jpg          118,287 / 5,000 images
  annotations/train2017/<id>_labelTrainIds.png, annotations/val2017/<id>_labelTrainIds.png
      171 train ids 0-170, 255 ignore (mmseg's coco_stuff164k.py), or
  annotations/train2017/<id>.png, annotations/val2017/<id>.png
      the raw stuffthingmaps (ids 0-181, 255 unlabelled), converted to the 171 ids here.
  A split uses *_labelTrainIds.png when its folder holds any, else the raw maps.
Get the data: http://images.cocodataset.org/zips/train2017.zip, val2017.zip and
http://calvin.inf.ed.ac.uk/wp-content/uploads/data/cocostuffdataset/stuffthingmaps_trainval2017.zip
(unzip the maps into annotations/) ({MMSEG_GUIDE})."""

ADE150_LAYOUT = f"""\
ade20k150 expects the ADE20K SceneParsing release; --manual_dir may be the folder holding
ADEChallengeData2016/ or ADEChallengeData2016/ itself:
  ADEChallengeData2016/images/training/<id>.jpg, images/validation/<id>.jpg   20,210 / 2,000
  ADEChallengeData2016/annotations/training/<id>.png, annotations/validation/<id>.png
      0 "other", 1-150 classes
Get the data: http://data.csail.mit.edu/places/ADEchallenge/ADEChallengeData2016.zip
({MMSEG_GUIDE})."""

CUSTOM_LAYOUT = """\
custom/NAME expects:
  images/<split>/<stem>.jpg|.jpeg|.png   one folder per split, e.g. images/train, images/val
  labels/<split>/<stem>.png              single-channel (L or P mode) class index per pixel:
                                         0..K-1, 255 = ignore (with --reduce_zero_label:
                                         0 = background -> ignore, i -> i-1)
  classes.txt                            K class names, one per line, line i = label value i
                                         (after reduction)
  unseen.txt                             optional: unseen classes, one per line, as names from
                                         classes.txt or 0-based indices
Every image needs a label with the same stem."""


def _fail(layout: str, problem: str):
  raise LayoutError(f'{problem}\n\n{layout}')


def _read_list(path: pathlib.Path) -> list[str]:
  """Ids of a split list, one per line, blank lines dropped."""
  return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def _find_root(manual_dir: pathlib.Path, suffixes: list[str], marker: str, layout: str
               ) -> pathlib.Path:
  """The first of manual_dir/suffix that contains `marker`; LayoutError when none does."""
  if not manual_dir.is_dir():
    _fail(layout, f'--manual_dir {manual_dir} does not exist.')
  for suffix in suffixes:
    root = manual_dir / suffix
    if (root / marker).is_dir():
      return root
  tried = ', '.join(str(manual_dir / s / marker) for s in suffixes)
  _fail(layout, f'No {marker}/ found under {manual_dir} (looked for {tried}).')


def _require(path: pathlib.Path, layout: str, what: str) -> pathlib.Path:
  if not path.exists():
    _fail(layout, f'Missing {what}: {path}')
  return path


def voc12(manual_dir: pathlib.Path) -> dict[str, list[Record]]:
  """Splits of PASCAL VOC 2012 as the reference and mmseg read them.

  - 'train': the OTSeg reference's list, train.txt with SegmentationClass masks followed by
    trainaug.txt with SegmentationClassAug masks (12,046 records; the 1,464 train images appear
    twice, once with each mask; spec section 9).
  - 'train_aug_unique': mmseg's usual aug set, train.txt (SegmentationClass) + aug.txt
    (SegmentationClassAug): 10,582 unique images.
  - 'val': val.txt with SegmentationClass (1,449).
  A trainaug/aug id without a SegmentationClassAug mask uses its SegmentationClass mask (the
  widely used DeepLab "SegmentationClassAug" download already holds those).
  mmseg's voc_aug.py writes trainaug.txt = (train + SBD train + SBD val) - val and aug.txt =
  (SBD train + SBD val) - train - val, both from Python sets, so their line order is arbitrary;
  records are stored in the order of the files (training shuffles anyway).
  """
  manual_dir = pathlib.Path(manual_dir)
  root = _find_root(manual_dir, ['VOCdevkit/VOC2012', 'VOC2012', '.'], 'JPEGImages', VOC12_LAYOUT)
  lists = root / 'ImageSets' / 'Segmentation'
  images = root / 'JPEGImages'
  cls = _require(root / 'SegmentationClass', VOC12_LAYOUT, 'folder')
  aug = _require(root / 'SegmentationClassAug', VOC12_LAYOUT, 'folder')
  train = _read_list(_require(lists / 'train.txt', VOC12_LAYOUT, 'split list'))
  val = _read_list(_require(lists / 'val.txt', VOC12_LAYOUT, 'split list'))
  trainaug = _read_list(_require(lists / 'trainaug.txt', VOC12_LAYOUT,
                                 'split list (written by mmseg\'s voc_aug.py)'))
  if (lists / 'aug.txt').exists():
    aug_only = _read_list(lists / 'aug.txt')
  else:
    train_set = set(train)
    aug_only = [i for i in trainaug if i not in train_set]

  def with_cls(list_name, ids):
    return [Record(f'{list_name}/{i}', i, images / f'{i}.jpg', cls / f'{i}.png') for i in ids]

  def with_aug(list_name, ids):
    out = []
    for i in ids:
      label = aug / f'{i}.png'
      if not label.exists() and (cls / f'{i}.png').exists():
        label = cls / f'{i}.png'
      out.append(Record(f'{list_name}/{i}', i, images / f'{i}.jpg', label))
    return out

  return {
      'train': with_cls('train', train) + with_aug('trainaug', trainaug),
      'train_aug_unique': with_cls('train', train) + with_aug('aug', aug_only),
      'val': with_cls('val', val),
  }


def pascal_context59(manual_dir: pathlib.Path) -> dict[str, list[Record]]:
  """Splits 'train' and 'val' of PASCAL-Context (59 classes + background 0, reduced when stored).

  Split lists from ImageSets/SegmentationContext/ (mmseg's converter) or, when that folder is
  absent, from the VOC2010 root (the reference's config; spec section 9).
  """
  manual_dir = pathlib.Path(manual_dir)
  root = _find_root(manual_dir, ['VOCdevkit/VOC2010', 'VOC2010', '.'], 'JPEGImages',
                    CONTEXT59_LAYOUT)
  labels = _require(root / 'SegmentationClassContext', CONTEXT59_LAYOUT, 'folder')
  list_dir = root / 'ImageSets' / 'SegmentationContext'
  if not (list_dir / 'train.txt').exists() and (root / 'train.txt').exists():
    list_dir = root
  splits = {}
  for split in ('train', 'val'):
    ids = _read_list(_require(list_dir / f'{split}.txt', CONTEXT59_LAYOUT, 'split list'))
    splits[split] = [Record(f'{split}/{i}', i, root / 'JPEGImages' / f'{i}.jpg',
                            labels / f'{i}.png') for i in ids]
  return splits


def coco_stuff164k(manual_dir: pathlib.Path) -> dict[str, list[Record]]:
  """Splits 'train' (train2017) and 'val' (val2017), images in file-name order (as mmseg scans).

  Labels: <id>_labelTrainIds.png (171 ids) when the split's annotation folder holds any such
  file, else the raw <id>.png stuffthingmaps (182 ids, converted when stored).
  """
  manual_dir = pathlib.Path(manual_dir)
  if not manual_dir.is_dir():
    _fail(COCO_STUFF_LAYOUT, f'--manual_dir {manual_dir} does not exist.')
  splits = {}
  for split, folder in (('train', 'train2017'), ('val', 'val2017')):
    image_dir = _require(manual_dir / 'images' / folder, COCO_STUFF_LAYOUT, 'folder')
    label_dir = _require(manual_dir / 'annotations' / folder, COCO_STUFF_LAYOUT, 'folder')
    train_ids = any(label_dir.glob('*_labelTrainIds.png'))
    records = []
    for image in sorted(image_dir.glob('*.jpg')):
      if train_ids:
        records.append(Record(f'{split}/{image.stem}', image.stem, image,
                              label_dir / f'{image.stem}_labelTrainIds.png'))
      else:
        records.append(Record(f'{split}/{image.stem}', image.stem, image,
                              label_dir / f'{image.stem}.png', 'coco182'))
    if not records:
      _fail(COCO_STUFF_LAYOUT, f'No .jpg images in {image_dir}.')
    splits[split] = records
  return splits


def ade20k150(manual_dir: pathlib.Path) -> dict[str, list[Record]]:
  """Splits 'train' (training) and 'val' (validation), images in file-name order."""
  manual_dir = pathlib.Path(manual_dir)
  root = _find_root(manual_dir, ['ADEChallengeData2016', '.'], 'images', ADE150_LAYOUT)
  splits = {}
  for split, folder in (('train', 'training'), ('val', 'validation')):
    image_dir = _require(root / 'images' / folder, ADE150_LAYOUT, 'folder')
    label_dir = _require(root / 'annotations' / folder, ADE150_LAYOUT, 'folder')
    records = [Record(f'{split}/{p.stem}', p.stem, p, label_dir / f'{p.stem}.png')
               for p in sorted(image_dir.glob('*.jpg'))]
    if not records:
      _fail(ADE150_LAYOUT, f'No .jpg images in {image_dir}.')
    splits[split] = records
  return splits


IMAGE_SUFFIXES = ('.jpg', '.jpeg', '.png')


def custom(manual_dir: pathlib.Path) -> dict[str, list[Record]]:
  """One split per folder under images/, records in file-name order; labels/<split>/<stem>.png."""
  manual_dir = pathlib.Path(manual_dir)
  if not manual_dir.is_dir():
    _fail(CUSTOM_LAYOUT, f'--manual_dir {manual_dir} does not exist.')
  image_root = _require(manual_dir / 'images', CUSTOM_LAYOUT, 'folder')
  label_root = _require(manual_dir / 'labels', CUSTOM_LAYOUT, 'folder')
  splits = {}
  for split_dir in sorted(p for p in image_root.iterdir() if p.is_dir()):
    split = split_dir.name
    label_dir = _require(label_root / split, CUSTOM_LAYOUT, 'label folder')
    images = sorted(p for p in split_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    splits[split] = [Record(f'{split}/{p.stem}', p.stem, p, label_dir / f'{p.stem}.png')
                     for p in images]
    if not splits[split]:
      _fail(CUSTOM_LAYOUT, f'No images ({", ".join(IMAGE_SUFFIXES)}) in {split_dir}.')
  if not splits:
    _fail(CUSTOM_LAYOUT, f'No split folders (e.g. images/train) in {image_root}.')
  return splits


def custom_classes(manual_dir: pathlib.Path, name: str, reduce_zero_label: bool
                   ) -> classes_lib.DatasetClasses:
  """Classes of a custom dataset from classes.txt and the optional unseen.txt."""
  manual_dir = pathlib.Path(manual_dir)
  names = _read_list(_require(manual_dir / 'classes.txt', CUSTOM_LAYOUT, 'class-names file'))
  if not names:
    _fail(CUSTOM_LAYOUT, f'{manual_dir / "classes.txt"} is empty.')
  if len(set(names)) != len(names):
    _fail(CUSTOM_LAYOUT, f'{manual_dir / "classes.txt"} repeats a class name.')
  if len(names) > 255:
    _fail(CUSTOM_LAYOUT, f'{len(names)} classes: at most 255 fit in uint8 labels (255 = ignore).')
  unseen = []
  if (manual_dir / 'unseen.txt').exists():
    for entry in _read_list(manual_dir / 'unseen.txt'):
      if entry in names:
        unseen.append(names.index(entry))
      elif entry.isdigit() and int(entry) < len(names):
        unseen.append(int(entry))
      else:
        _fail(CUSTOM_LAYOUT, f'{manual_dir / "unseen.txt"}: {entry!r} is neither a class name '
              'from classes.txt nor a 0-based class index.')
  return classes_lib.DatasetClasses(
      name=name, classes=tuple(names), unseen=tuple(sorted(set(unseen))),
      reduce_zero_label=reduce_zero_label, templates='otseg8')
