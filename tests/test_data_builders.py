"""Dataset builders: tiny trees in the real layouts, prepared and read back exactly; bad input."""

import json
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from otseg_jax.data import builders, fake_trees, labels, layouts, pipeline, prepare

REPO = pathlib.Path(__file__).resolve().parents[1]


def decoded(path: pathlib.Path) -> np.ndarray:
  return np.asarray(Image.open(path).convert('RGB'))


def raw(path: pathlib.Path) -> np.ndarray:
  return np.asarray(Image.open(path), dtype=np.uint8)


def check_split(data_dir, name, split, expected):
  """expected: list of (name, image path, expected label (H, W)) in stored order."""
  s = pipeline.load_split(name, split, data_dir)
  assert len(s.source) == len(expected)
  for i, (image_id, image_path, label) in enumerate(expected):
    record = s.source[i]
    assert record['name'].decode() == image_id
    np.testing.assert_array_equal(record['image'], decoded(image_path))
    np.testing.assert_array_equal(record['label'][..., 0], label)
  return s


@pytest.fixture(scope='module')
def voc(tmp_path_factory):
  root = tmp_path_factory.mktemp('voc')
  ids = fake_trees.write_voc12(root / 'manual')
  result = prepare.prepare('voc12', root / 'manual', root / 'tfds')
  return root, ids, result


def test_voc12_splits_read_back_exactly(voc):
  root, ids, result = voc
  assert result.num_records == {'train': 2 + 5, 'train_aug_unique': 5, 'val': 2}
  assert not result.skipped and not result.reused
  d = root / 'manual' / 'VOCdevkit' / 'VOC2012'

  def entries(names, folder):
    return [(n, d / 'JPEGImages' / f'{n}.jpg',
             labels.reduce_zero_label(raw(d / folder / f'{n}.png'))) for n in names]

  # The reference's list: train.txt (SegmentationClass) then trainaug.txt (SegmentationClassAug).
  train = entries(ids['train'], 'SegmentationClass') + entries(ids['train'] + ids['aug'],
                                                               'SegmentationClassAug')
  s = check_split(root / 'tfds', 'voc12', 'train', train)
  assert s.classes.num_classes == 20 and s.classes.unseen == (15, 16, 17, 18, 19)
  check_split(root / 'tfds', 'voc12', 'train_aug_unique',
              entries(ids['train'], 'SegmentationClass') + entries(ids['aug'],
                                                                   'SegmentationClassAug'))
  val = check_split(root / 'tfds', 'voc12', 'val', entries(ids['val'], 'SegmentationClass'))
  # Known values: raw VOC [0, 3, 20, 7] + 255 rows -> background and 255 ignore, i -> i - 1.
  stored = val.source[0]['label'][..., 0]
  assert set(np.unique(stored)) == {255, 2, 19, 6}
  assert (stored[:3] == 255).all()


def test_prepare_twice_reuses(voc):
  root, _, _ = voc
  again = prepare.prepare('voc12', root / 'manual', root / 'tfds')
  assert again.reused and again.num_records['train'] == 7


@pytest.mark.parametrize('lists_at_root', [False, True])
def test_context59_both_list_locations(tmp_path, lists_at_root):
  ids = fake_trees.write_context59(tmp_path / 'manual', lists_at_root=lists_at_root)
  prepare.prepare('pascal_context59', tmp_path / 'manual', tmp_path / 'tfds')
  d = tmp_path / 'manual' / 'VOCdevkit' / 'VOC2010'
  for split in ('train', 'val'):
    s = check_split(tmp_path / 'tfds', 'pascal_context59', split, [
        (n, d / 'JPEGImages' / f'{n}.jpg',
         labels.reduce_zero_label(raw(d / 'SegmentationClassContext' / f'{n}.png')))
        for n in ids[split]])
  assert s.classes.num_classes == 59
  assert set(np.unique(s.source[0]['label'])) == {255, 0, 58, 29}  # raw 0, 1, 59, 30


def test_coco_stuff_train_ids_and_raw_182_agree(tmp_path):
  ids = fake_trees.write_coco_stuff(tmp_path / 'a')
  fake_trees.write_coco_stuff(tmp_path / 'b', raw_182=True)
  prepare.prepare('coco_stuff164k', tmp_path / 'a', tmp_path / 'tfds_a')
  prepare.prepare('coco_stuff164k', tmp_path / 'b', tmp_path / 'tfds_b')
  for split, folder in (('train', 'train2017'), ('val', 'val2017')):
    expected = [(n, tmp_path / 'a' / 'images' / folder / f'{n}.jpg',
                 raw(tmp_path / 'a' / 'annotations' / folder / f'{n}_labelTrainIds.png'))
                for n in ids[split]]
    check_split(tmp_path / 'tfds_a', 'coco_stuff164k', split, expected)  # 171 ids kept as is
    s = check_split(tmp_path / 'tfds_b', 'coco_stuff164k', split, expected)  # 182 -> 171
  # Raw ids 0, 12, 91, 181 are train ids 0, 11, 80, 170 (mmseg's clsID_to_trID).
  assert set(np.unique(s.source[0]['label'])) == {0, 11, 80, 170, 255}
  assert s.classes.num_classes == 171


def test_coco182_table_is_mmseg_mapping():
  table = labels.coco182_table()
  unused = [11, 25, 28, 29, 44, 65, 67, 68, 70, 82, 90]
  used = [i for i in range(182) if i not in unused]
  np.testing.assert_array_equal(table[used], np.arange(171))
  assert (table[unused] == -1).all() and table[255] == 255 and (table[182:255] == -1).all()
  with pytest.raises(ValueError, match=r'\[11, 200\]'):
    labels.coco182_to_171(np.array([[0, 11], [200, 255]], np.uint8))


def test_ade20k150(tmp_path):
  ids = fake_trees.write_ade20k(tmp_path / 'manual')
  prepare.prepare('ade20k150', tmp_path / 'manual', tmp_path / 'tfds')
  d = tmp_path / 'manual' / 'ADEChallengeData2016'
  s = check_split(tmp_path / 'tfds', 'ade20k150', 'val', [
      (n, d / 'images' / 'validation' / f'{n}.jpg',
       labels.reduce_zero_label(raw(d / 'annotations' / 'validation' / f'{n}.png')))
      for n in ids['val']])
  assert set(np.unique(s.source[0]['label'])) == {255, 0, 149, 74}  # raw 0, 1, 150, 75
  assert s.classes.num_classes == 150


def test_custom_dataset_with_classes_and_unseen(tmp_path):
  ids = fake_trees.write_custom(tmp_path / 'manual', ['cat', 'dog', 'sky'], unseen=['dog'])
  assert prepare.main(['custom/pets', '--manual_dir', str(tmp_path / 'manual'),
                       '--data_dir', str(tmp_path / 'tfds')]) == 0
  s = check_split(tmp_path / 'tfds', 'custom/pets', 'train', [
      (n, tmp_path / 'manual' / 'images' / 'train' / f'{n}.png',
       raw(tmp_path / 'manual' / 'labels' / 'train' / f'{n}.png')) for n in ids['train']])
  assert s.classes.classes == ('cat', 'dog', 'sky') and s.classes.unseen == (1,)
  assert s.classes.seen == (0, 2)


def test_reduce_zero_label_table():
  table = labels.reduce_zero_label_table()
  assert table[0] == 255 and table[255] == 255 and table[1] == 0 and table[21] == 20
  np.testing.assert_array_equal(table[1:255], np.arange(254))


# ---------------------------------------------------------------------------------------------
# Bad input


def test_missing_manual_dir_gives_layout_and_source(tmp_path):
  with pytest.raises(layouts.LayoutError) as e:
    prepare.prepare('voc12', tmp_path / 'nowhere', tmp_path / 'tfds')
  message = str(e.value)
  assert 'does not exist' in message and 'VOCdevkit/VOC2012/' in message
  assert 'trainaug.txt' in message and 'voc_aug.py' in message and 'http' in message
  assert not (tmp_path / 'tfds').exists()


def test_incomplete_manual_dir_names_missing_file(tmp_path):
  fake_trees.write_voc12(tmp_path / 'manual')
  (tmp_path / 'manual/VOCdevkit/VOC2012/ImageSets/Segmentation/trainaug.txt').unlink()
  with pytest.raises(layouts.LayoutError, match='trainaug.txt'):
    prepare.prepare('voc12', tmp_path / 'manual', tmp_path / 'tfds')
  for name, layout in (('pascal_context59', 'SegmentationClassContext'),
                       ('coco_stuff164k', 'stuffthingmaps'), ('ade20k150', 'ADEChallengeData2016'),
                       ('custom/x', 'classes.txt')):
    with pytest.raises(layouts.LayoutError, match=layout):
      prepare.prepare(name, tmp_path / 'manual', tmp_path / 'tfds')


def _break_custom(root: pathlib.Path) -> tuple[pathlib.Path, pathlib.Path]:
  """Two bad train records: a truncated image and a label of the wrong size."""
  fake_trees.write_custom(root, ['a', 'b', 'c'], num_train=4)
  corrupt = root / 'images' / 'train' / 'img001.png'
  corrupt.write_bytes(corrupt.read_bytes()[:60])
  mismatch = root / 'labels' / 'train' / 'img002.png'
  Image.fromarray(np.zeros((20, 48), np.uint8)).save(mismatch)
  return corrupt, mismatch


def test_corrupt_image_stops_with_file_name_and_writes_nothing(tmp_path):
  corrupt, _ = _break_custom(tmp_path / 'manual')
  with pytest.raises(builders.BadRecordError, match='img001.png: corrupt or unreadable image'):
    prepare.prepare('custom/broken', tmp_path / 'manual', tmp_path / 'tfds')
  with pytest.raises(FileNotFoundError, match='not prepared'):
    pipeline.dataset_dir('custom/broken', tmp_path / 'tfds')


def test_size_mismatch_stops_with_file_name(tmp_path):
  fake_trees.write_custom(tmp_path / 'manual', ['a', 'b'])
  label = tmp_path / 'manual' / 'labels' / 'val' / 'img004.png'
  Image.fromarray(np.zeros((40, 47), np.uint8)).save(label)
  with pytest.raises(builders.BadRecordError, match=r'img004.png: label is 47x40 .* is 48x40'):
    prepare.prepare('custom/mismatch', tmp_path / 'manual', tmp_path / 'tfds')


def test_bad_label_values_and_colour_labels_are_refused(tmp_path):
  fake_trees.write_voc12(tmp_path / 'manual')
  d = tmp_path / 'manual' / 'VOCdevkit' / 'VOC2012' / 'SegmentationClass'
  bad = fake_trees.raw_label(0, [0, 30])
  Image.fromarray(bad).save(d / '2008_000000.png')
  with pytest.raises(builders.BadRecordError, match=r'2008_000000.png: label values \[29\]'):
    prepare.prepare('voc12', tmp_path / 'manual', tmp_path / 'tfds')
  Image.fromarray(np.zeros((40, 48, 3), np.uint8)).save(d / '2008_000000.png')
  with pytest.raises(builders.BadRecordError, match='mode RGB'):
    prepare.prepare('voc12', tmp_path / 'manual', tmp_path / 'tfds')


def test_skip_bad_skips_and_counts(tmp_path, capsys):
  corrupt, mismatch = _break_custom(tmp_path / 'manual')
  code = prepare.main(['custom/broken', '--manual_dir', str(tmp_path / 'manual'), '--data_dir',
                       str(tmp_path / 'tfds'), '--skip_bad'])
  out = capsys.readouterr().out
  assert code == 0
  assert 'train: 2 records' in out and 'val: 2 records' in out
  assert 'skipped 2 bad records' in out and corrupt.name in out and mismatch.name in out
  s = pipeline.load_split('custom/broken', 'train', tmp_path / 'tfds')
  assert [s.source[i]['name'].decode() for i in range(2)] == ['img000', 'img003']
  metadata = json.loads((pipeline.dataset_dir('custom/broken', tmp_path / 'tfds') /
                         'metadata.json').read_text())
  assert len(metadata['skipped']) == 2


def test_greyscale_image_is_stored_as_rgb(tmp_path):
  ids = fake_trees.write_custom(tmp_path / 'manual', ['a', 'b'])
  path = tmp_path / 'manual' / 'images' / 'train' / f'{ids["train"][0]}.png'
  grey = fake_trees.image_array(0)[..., 0]
  Image.fromarray(grey).save(path)
  prepare.prepare('custom/grey', tmp_path / 'manual', tmp_path / 'tfds')
  s = pipeline.load_split('custom/grey', 'train', tmp_path / 'tfds')
  np.testing.assert_array_equal(s.source[0]['image'], np.repeat(grey[..., None], 3, axis=-1))


def test_cli_missing_dir_exits_1_with_layout(tmp_path):
  proc = subprocess.run(
      [sys.executable, '-m', 'otseg_jax.data.prepare', 'ade20k150', '--manual_dir',
       str(tmp_path / 'none'), '--data_dir', str(tmp_path / 'tfds')],
      capture_output=True, text=True, cwd=REPO, timeout=120)
  assert proc.returncode == 1
  assert 'ADEChallengeData2016/images/training' in proc.stderr
  assert 'ADEChallengeData2016.zip' in proc.stderr


def test_unknown_names_are_refused(tmp_path):
  with pytest.raises(ValueError, match='Unknown dataset'):
    prepare.prepare('voc2007', tmp_path, tmp_path)
  with pytest.raises(ValueError, match='custom dataset name'):
    prepare.prepare('custom/Bad-Name', tmp_path, tmp_path)
  with pytest.raises(ValueError, match='no split'):
    fake_trees.write_custom(tmp_path / 'm', ['a'])
    prepare.prepare('custom/one', tmp_path / 'm', tmp_path / 'tfds')
    pipeline.load_split('custom/one', 'test', tmp_path / 'tfds')


def test_data_package_imports_without_tensorflow():
  code = ('import sys, otseg_jax.data, otseg_jax.data.pipeline, otseg_jax.data.synthetic, '
          'otseg_jax.data.transforms, otseg_jax.data.labels, otseg_jax.data.layouts; '
          'bad = [m for m in ("tensorflow", "tensorflow_datasets") if m in sys.modules]; '
          'assert not bad, bad')
  subprocess.run([sys.executable, '-c', code], check=True, cwd=REPO, timeout=120)
