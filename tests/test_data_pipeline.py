"""Input pipeline: batch format, determinism, resume from saved state, sharding, eval iterator."""

import json

import numpy as np
import pytest

from conftest import load_reference
from otseg_jax import classes as classes_lib
from otseg_jax.data import fake_trees, pipeline, prepare, transforms


def coded_split(num_records: int, num_classes: int = 4, unseen=(3,)) -> pipeline.Split:
  """In-memory records whose pixels say which record they are: image = key, label = key % K."""
  records = [{'image': np.full((8, 8, 3), key, np.uint8),
              'label': np.full((8, 8), key % num_classes, np.uint8)} for key in range(num_records)]
  dataset_classes = classes_lib.DatasetClasses(
      name='coded', classes=tuple(f'c{i}' for i in range(num_classes)), unseen=tuple(unseen),
      reduce_zero_label=False, templates='otseg8')
  return pipeline.Split('coded', 'train', records, dataset_classes)


def keys_of(batch) -> list[int]:
  """Record keys from coded images (first pixel's red value, de-normalised)."""
  red = batch['image'][:, 0, 0, 0] * transforms.STD[0] + transforms.MEAN[0]
  return [int(round(v)) for v in red]


@pytest.fixture(scope='module')
def prepared(tmp_path_factory):
  root = tmp_path_factory.mktemp('custom')
  fake_trees.write_custom(root / 'manual', ['a', 'b', 'c', 'd'], unseen=['c'], num_train=5)
  prepare.prepare('custom/tiny', root / 'manual', root / 'tfds')
  return root / 'tfds'


# Small scales so 40x48 records are augmented quickly; the recipe is otherwise mmseg's.
AUGMENT = transforms.TrainAugment(img_scale=(64, 32), ratio_range=(0.5, 2.0))


def make(split, **kwargs):
  args = dict(global_batch_size=2, crop_size=32, seed=7, setting='inductive', augment=AUGMENT,
              num_threads=2)
  args.update(kwargs)
  return pipeline.make_train_loader(split, **args)


def assert_batches_equal(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])


def test_batch_format_and_inductive_labels(prepared):
  split = pipeline.load_split('custom/tiny', 'train', prepared)
  batch = next(make(split))
  assert set(batch) == {'image', 'label'}
  assert batch['image'].shape == (2, 32, 32, 3) and batch['image'].dtype == np.float32
  assert batch['label'].shape == (2, 32, 32) and batch['label'].dtype == np.int32
  # Classes a, b, c, d with c unseen: inductive labels are 0, 1, 2 (a, b, d) or 255.
  assert set(np.unique(batch['label'])) <= {0, 1, 2, 255}


def test_deterministic_for_a_seed(prepared):
  split = pipeline.load_split('custom/tiny', 'train', prepared)
  first = [next(it) for it in [make(split)] for _ in range(4)]
  again = [next(it) for it in [make(split, num_threads=1)] for _ in range(4)]
  assert_batches_equal(first, again)
  other = next(make(split, seed=8))
  assert not np.array_equal(other['image'], first[0]['image'])


def test_restored_iterator_continues_the_sequence(prepared):
  split = pipeline.load_split('custom/tiny', 'train', prepared)
  loader = make(split)
  for _ in range(3):  # into the second epoch (5 records, batch 2)
    next(loader)
  state = loader.get_state()
  state = json.loads(json.dumps(state))  # it must survive a checkpoint file
  expected = [next(loader) for _ in range(4)]
  restored = make(split)
  restored.set_state(state)
  assert_batches_equal([next(restored) for _ in range(4)], expected)


def test_restored_iterator_with_worker_processes():
  split = coded_split(6)
  loader = make(split, augment=None, crop_size=8, worker_count=1)
  next(loader)
  state = loader.get_state()
  expected = [keys_of(next(loader)) for _ in range(3)]
  restored = make(split, augment=None, crop_size=8, worker_count=1)
  restored.set_state(state)
  assert [keys_of(next(restored)) for _ in range(3)] == expected


@pytest.mark.parametrize('num_records,process_count', [(7, 3), (8, 2), (5, 1)])
def test_process_shards_are_disjoint_and_complete(num_records, process_count):
  split = coded_split(num_records)
  seen = []
  for process_index in range(process_count):
    shard = list(pipeline.shard_keys(num_records, process_index, process_count))
    loader = make(split, augment=None, crop_size=8, global_batch_size=process_count,
                  process_index=process_index, process_count=process_count)
    epoch = [keys_of(next(loader))[0] for _ in range(len(shard))]
    assert sorted(epoch) == shard  # one epoch of this process = its whole shard, shuffled
    nxt = [keys_of(next(loader))[0] for _ in range(len(shard))]
    assert sorted(nxt) == shard and (nxt != epoch or len(shard) < 3)  # reshuffled per epoch
    seen += shard
  assert sorted(seen) == list(range(num_records))


def test_per_process_batch_and_argument_checks():
  split = coded_split(8)
  batch = next(make(split, augment=None, crop_size=8, global_batch_size=6, process_count=3))
  assert batch['image'].shape[0] == 2
  with pytest.raises(ValueError, match='not divisible'):
    make(split, augment=None, crop_size=8, global_batch_size=5, process_count=2)
  with pytest.raises(ValueError, match='process_index'):
    make(split, augment=None, crop_size=8, process_index=2, process_count=2)
  with pytest.raises(ValueError, match='Unknown setting'):
    make(split, augment=None, crop_size=8, setting='zero_shot')


def test_visibility_settings_in_the_pipeline():
  split = coded_split(4, num_classes=4, unseen=(1,))
  for setting, expected in (('inductive', {0: 0, 1: 255, 2: 1, 3: 2}),
                            ('transductive', {0: 0, 1: 1, 2: 2, 3: 3}),
                            ('fully_supervised', {0: 0, 1: 1, 2: 2, 3: 3})):
    loader = make(split, augment=None, crop_size=8, global_batch_size=4, setting=setting)
    batch = next(loader)
    for key, label in zip(keys_of(batch), batch['label']):
      assert (label == expected[key]).all()


def test_visibility_table():
  from otseg_jax.data import labels
  table = labels.visibility_table('inductive', 20, (15, 16, 17, 18, 19))
  np.testing.assert_array_equal(table[:15], np.arange(15))
  assert (table[15:] == 255).all()
  ident = labels.visibility_table('transductive', 20, (15, 16, 17, 18, 19))
  np.testing.assert_array_equal(ident[:20], np.arange(20))
  assert (ident[20:] == 255).all()
  np.testing.assert_array_equal(labels.visibility_table('fully_supervised', 20, ()), ident)
  with pytest.raises(ValueError, match='unseen'):
    labels.visibility_table('inductive', 5, (5,))



@pytest.mark.parametrize('dump', ['otseg_small.npz', 'otseg_holdout.npz'])
def test_visibility_table_is_the_authors(dump):
  """Inductive training labels against the authors' `_visiable_mask` in the dumps (the only
  setting they cover): their 256-entry table with -1 read as 255 (the head does that), and the
  mapped labels of the dump's raw labels."""
  from otseg_jax.data import labels
  ref = load_reference(dump)
  config = json.loads(str(ref['config/json']))
  unseen = sorted(set(config['all_idx']) - set(config['seen_idx']))
  table = labels.visibility_table('inductive', len(config['all_idx']), unseen)
  authors = np.where(ref['info/visibility_map'] == -1, 255, ref['info/visibility_map'])
  np.testing.assert_array_equal(table, authors)
  np.testing.assert_array_equal(table[ref['input/labels']], ref['input/labels_mapped'])
  # The dump's labels hold seen, unseen and ignore pixels, so all three branches were compared.
  raw = ref['input/labels']
  assert np.isin(raw, config['seen_idx']).any() and np.isin(raw, unseen).any()
  assert (raw == 255).any()

def test_eval_iter_shapes_labels_and_padding(prepared):
  split = pipeline.load_split('custom/tiny', 'train', prepared)  # 5 records, 40x48
  indices, valid_count = [], 0
  for process_index in range(2):
    examples = list(pipeline.make_eval_iter(split, process_index=process_index,
                                            process_count=2))
    assert len(examples) == pipeline.num_eval_steps(5, 2) == 3
    for ex in examples:
      assert ex['image'].shape == (1, 512, 614, 3) and ex['image'].dtype == np.float32
      assert ex['label'].shape == (1, 40, 48) and ex['label'].dtype == np.int32
      key = int(ex['index'][0])
      np.testing.assert_array_equal(ex['label'][0], split.source[key]['label'][..., 0])
      if ex['valid'][0]:
        indices.append(key)
        valid_count += 1
  assert sorted(indices) == list(range(5)) and valid_count == 5
  unresized = next(pipeline.make_eval_iter(split, img_scale=None, min_size=None))
  assert unresized['image'].shape == (1, 40, 48, 3)
