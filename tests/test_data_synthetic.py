"""Synthetic zero-shot dataset: determinism, split, attributes, text embeddings, loaders."""

import dataclasses

import numpy as np
import pytest

from otseg_jax.data import pipeline, synthetic

CONFIG = synthetic.SyntheticConfig(image_size=32, num_train=16, num_val=8, embed_dim=64,
                                   num_prompts=4)


def test_classes_and_unseen_are_new_combinations_of_seen_attributes():
  c = synthetic.dataset_classes()
  assert c.num_classes == 12 and c.unseen == (0, 4, 8) and len(c.seen) == 9
  assert c.classes[0] == 'red horizontal stripes' and c.classes[8] == 'blue diagonal stripes'
  n_orient = len(synthetic.ORIENTATIONS)
  for u in c.unseen:
    colour, orientation = divmod(u, n_orient)
    assert sum(s // n_orient == colour for s in c.seen) >= 2
    assert sum(s % n_orient == orientation for s in c.seen) >= 2


def test_records_are_deterministic_and_splits_differ():
  a = synthetic.render(CONFIG, 'train', 3)
  b = synthetic.render(CONFIG, 'train', 3)
  np.testing.assert_array_equal(a['image'], b['image'])
  np.testing.assert_array_equal(a['label'], b['label'])
  assert a['image'].shape == (32, 32, 3) and a['image'].dtype == np.uint8
  assert a['label'].shape == (32, 32) and a['label'].dtype == np.uint8
  assert not np.array_equal(a['image'], synthetic.render(CONFIG, 'val', 3)['image'])
  other_seed = synthetic.SyntheticConfig(**{**CONFIG.__dict__, 'seed': 1})
  assert not np.array_equal(a['image'], synthetic.render(other_seed, 'train', 3)['image'])
  assert len(synthetic.load_split('train', CONFIG).source) == 16
  assert len(synthetic.load_split('val', CONFIG).source) == 8


def test_regions_show_their_attributes():
  record = synthetic.render(CONFIG, 'val', 0)
  image, label = record['image'].astype(float), record['label']
  assert 2 <= len(np.unique(label)) <= CONFIG.max_regions and label.max() < 12
  for k in np.unique(label):
    colour = np.asarray(synthetic.COLOURS[k // 3][1], float)
    mean = image[label == k].mean(0)
    # The mean colour points the way of the class colour (cosine close to 1).
    assert mean @ colour / np.linalg.norm(mean) / np.linalg.norm(colour) > 0.95


def test_text_embeddings_follow_the_attributes():
  text = synthetic.text_embeddings(CONFIG)
  assert text.shape == (12, 4, 64) and text.dtype == np.float32
  np.testing.assert_allclose(np.linalg.norm(text, axis=-1), 1.0, rtol=1e-5)
  np.testing.assert_array_equal(text, synthetic.text_embeddings(CONFIG))
  mean = text.mean(1)
  mean /= np.linalg.norm(mean, axis=-1, keepdims=True)
  sim = mean @ mean.T
  # Classes sharing colour or orientation are ~0.5 apart, others ~0.
  assert 0.3 < sim[0, 1] < 0.7 and 0.3 < sim[0, 3] < 0.7 and abs(sim[0, 4]) < 0.3


def test_synthetic_through_the_real_loaders():
  train = synthetic.load_split('train', CONFIG)
  loader = pipeline.make_train_loader(train, global_batch_size=4, crop_size=32, seed=0,
                                      setting='inductive', augment=None)
  batch = next(loader)
  assert batch['image'].shape == (4, 32, 32, 3) and batch['label'].shape == (4, 32, 32)
  assert set(np.unique(batch['label'])) <= set(range(9)) | {255}
  state = loader.get_state()
  expected = next(loader)
  again = pipeline.make_train_loader(train, global_batch_size=4, crop_size=32, seed=0,
                                     setting='inductive', augment=None)
  again.set_state(state)
  np.testing.assert_array_equal(next(again)['image'], expected['image'])
  examples = list(pipeline.make_eval_iter(synthetic.load_split('val', CONFIG), img_scale=None,
                                          min_size=None))
  assert len(examples) == 8 and examples[0]['image'].shape == (1, 32, 32, 3)
  assert examples[0]['label'].max() < 12


def test_chance_level():
  chance = synthetic.chance_iou(CONFIG)
  # Uniform random predictions over K = 12 classes: about 1 / (2K - 1) = 0.043 per class.
  assert 0.03 < chance['unseen_miou'] < 0.06 and 0.03 < chance['seen_miou'] < 0.06


def test_region_count_and_unseen_split_are_fields():
  single = synthetic.SyntheticConfig(image_size=32, min_regions=1, max_regions=1)
  assert all(len(np.unique(synthetic.render(single, 'pretrain', i)['label'])) == 1
             for i in range(8))
  # The default region count draws exactly the records it drew before the field existed.
  np.testing.assert_array_equal(
      synthetic.render(CONFIG, 'train', 5)['image'],
      synthetic.render(synthetic.SyntheticConfig(**{**CONFIG.__dict__, 'min_regions': 2}),
                       'train', 5)['image'])
  other = synthetic.SyntheticConfig(image_size=32, unseen=[1, 5, 9])  # a list, as from a flag
  assert other.unseen == (1, 5, 9) and synthetic.dataset_classes(other).unseen == (1, 5, 9)
  assert synthetic.load_split('val', other).classes.seen == (0, 2, 3, 4, 6, 7, 8, 10, 11)
  chance = synthetic.chance_iou(dataclasses.replace(other, num_val=8))
  assert 0 < chance['unseen_miou'] < 0.1
  with pytest.raises(ValueError, match='segmentation splits'):
    synthetic.load_split('pretrain', other)
