"""The method seam: every OTSeg ablation switch trains with the real trainer, and a second method
that lives in the tests folder trains, evaluates and predicts through train.py, eval.py and
`python -m otseg_jax.predict` (tests/linear_probe_method.py, tests/linear_probe_config.py)."""

import json
import pathlib
import sys

import jax
import numpy as np
from PIL import Image
import pytest

import clip_testing as ct
from configs import tiny
from conftest import run_python, shared_path
from otseg_jax import classes
from otseg_jax import params as params_lib
from otseg_jax import text_embeddings
from otseg_jax import tokenizer as tokenizer_lib
from otseg_jax import trainer
from otseg_jax.data import synthetic
from otseg_jax.models import clip_weights
from otseg_jax.models import prompt_learner

REPO = pathlib.Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------------
# OTSeg's ablation switches, each through `train_and_evaluate` for 2 steps.


# Each switch is in at least one run; switches of separate code paths share a run, since each
# run costs a compilation of the whole train step (~15 s here).
@pytest.mark.parametrize('overrides', [
    {'model.head.use_mps': False},  # the decoder map alone: loss, eval and export without 'score'
    {'model.head.attention': 'softmax', 'model.head.use_mps': False},  # no OT at all
    {'model.head.attention': 'softmax', 'model.head.decoder_layers': 1},
    {'model.ot.implementation': 'reference', 'ft_backbone': False,
     'optimizer.first_match': False},
], ids=lambda o: ','.join(f'{k}={v}' for k, v in o.items()))
def test_ablation_trains_with_the_real_trainer(tmp_path, overrides):
  config = tiny.get_config()
  config.num_train_steps, config.checkpoint_every_steps, config.log_every_steps = 2, 2, 1
  config.eval.max_images = 2
  for key, value in overrides.items():
    *parents, leaf = key.split('.')
    node = config
    for p in parents:
      node = node[p]
    node[leaf] = value
  results = trainer.train_and_evaluate(config, tmp_path / 'run')
  losses = [json.loads(line) for line in (tmp_path / 'run' / 'metrics.jsonl').read_text()
            .splitlines()]
  assert [r['step'] for r in losses if 'train/total' in r] == [1, 2]
  assert all(np.isfinite(r['train/total']) for r in losses if 'train/total' in r)
  assert 0 <= results['mIoU'] <= 100
  if overrides.get('model.head.use_mps') is False:
    assert not any('score.' in k for k in losses[0])


def test_class_split_per_setting():
  dataset = synthetic.dataset_classes()  # 12 classes, 0, 4 and 8 unseen
  for setting, seen, rows in (('inductive', 9, 9), ('transductive', 9, 12),
                              ('fully_supervised', 12, 12)):
    mask = classes.seen_mask(dataset, setting)
    assert mask.sum() == seen and len(classes.train_text_rows(dataset, setting)) == rows
    assert mask[list(dataset.unseen)].all() == (setting == 'fully_supervised')
  with pytest.raises(ValueError, match='config.setting'):
    classes.seen_mask(dataset, 'zero_shot')


# ---------------------------------------------------------------------------------------------------
# Learned class text: the tower runs only up to the longest EOT.


@pytest.fixture(scope='module')
def tiny_clip(tmp_path_factory):
  """A random HF CLIP with the tiny towers of tests/linear_probe_method.py, the real tokenizer."""
  clip_dir = tmp_path_factory.mktemp('clip') / 'hf'
  ct.save_random_hf_clip(clip_dir, seed=7, vision_width=32, vision_layers=2, vision_heads=2,
                         patch_size=8, image_size=32, text_width=32, text_layers=1, text_heads=2,
                         vocab_size=49408, context_length=77, embed_dim=32)
  ct.write_clip_tokenizer_files(clip_dir, shared_path('clip_bpe', 'bpe_simple_vocab_16e6.txt.gz'))
  return clip_dir


def test_text_tower_up_to_the_longest_eot_gives_the_full_features(tiny_clip):
  spec, towers = clip_weights.load_clip(tiny_clip)
  tokenizer = tokenizer_lib.load_tokenizer(tiny_clip)
  names = ['cat', 'a very long class name with many words', 'dog']
  full = tokenizer_lib.tokenize(tokenizer, [f'X X X X {n}.' for n in names], 77)
  cut = text_embeddings.class_tokens(tokenizer, names, 'X X X X {}.', 77)
  assert cut.shape == (3, int(full.argmax(-1).max()) + 1) and cut.shape[1] < 20
  np.testing.assert_array_equal(cut, full[:, :cut.shape[1]])
  tower = spec.text_tower()
  context = np.random.default_rng(0).normal(size=(4, 32)).astype(np.float32)
  for c in (None, context):
    a = tower.apply({'params': towers['text']}, full, c)
    b = tower.apply({'params': towers['text']}, cut, c)
    np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5)


def test_coop_text_with_several_prompts_is_one_tower_call_per_context(tiny_clip):
  spec, towers = clip_weights.load_clip(tiny_clip)
  tokenizer = tokenizer_lib.load_tokenizer(tiny_clip)
  tokens = text_embeddings.class_tokens(tokenizer, ['cat', 'dog', 'red grass'], 'X X X X {}.', 77)
  learner = prompt_learner.CoOpText(text=spec.text_tower(), num_context=4, num_prompts=3)
  variables = learner.init(jax.random.PRNGKey(0), tokens)
  context = variables['params']['context']
  assert context.shape == (3, 4, 32)
  variables = {'params': {**variables['params'], 'text': towers['text']}}
  text = learner.apply(variables, tokens)
  assert text.shape == (3, 3, 32)
  for n in range(3):  # prompt n of every class: the tower on the n-th context, normalised
    one = spec.text_tower().apply({'params': towers['text']}, tokens, context[n])
    np.testing.assert_allclose(text[:, n], one / np.linalg.norm(one, axis=-1, keepdims=True),
                               rtol=1e-5, atol=1e-6)
  assert not np.allclose(text[:, 0], text[:, 1])


# ---------------------------------------------------------------------------------------------------
# A second method through the real entry points, with no edit outside its two files.



def test_a_second_method_trains_evaluates_and_predicts(tmp_path, tiny_clip):
  config = [f'--config={REPO}/tests/linear_probe_config.py', f'--config.clip={tiny_clip}']
  workdir = tmp_path / 'run'
  proc = run_python(['train.py', *config, f'--workdir={workdir}', '--config.num_train_steps=4',
               '--config.checkpoint_every_steps=4'])
  assert 'method tests.linear_probe_method' in proc.stderr
  results = json.loads((workdir / 'eval' / 'results.json').read_text())
  assert results['num_images'] == 16 and 0 <= results['mIoU'] <= 100

  # Only the head and the context vectors trained; both CLIP towers are CLIP's, untouched.
  trained = params_lib.flat(params_lib.load_params_any(workdir))
  assert {k for k in trained if k.startswith('prompt_learner/')
          and not k.startswith('prompt_learner/text/')} == {'prompt_learner/context'}
  _, towers = clip_weights.load_clip(tiny_clip, image_size=32)
  for sub, tower in (('backbone', 'visual'), ('prompt_learner/text', 'text')):
    for name, value in params_lib.flat(towers[tower]).items():
      np.testing.assert_array_equal(trained[f'{sub}/{name}'], value, err_msg=name)
  metrics = [json.loads(line) for line in (workdir / 'metrics.jsonl').read_text().splitlines()]
  assert 'train/logits.loss_mask' in metrics[0]

  # eval.py reproduces the final evaluation of the run.
  proc = run_python(['eval.py', *config, f'--checkpoint={workdir}', f'--outdir={tmp_path / "eval"}'])
  again = json.loads((tmp_path / 'eval' / 'results.json').read_text())
  assert again['per_class'] == results['per_class']

  # predict: any names, learned text computed once for them.
  image = tmp_path / 'a.png'
  Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 30, 3), np.uint8)).save(image)
  run_python(['-m', 'otseg_jax.predict', '--checkpoint', str(workdir), '--image', str(image),
        '--classes', 'red stripes,blue stripes,grass', '--clip', str(tiny_clip),
        '--short_side', '32', '--out', str(tmp_path / 'pred')])
  mask = np.asarray(Image.open(tmp_path / 'pred' / 'a_mask.png'))
  assert mask.shape == (40, 30) and mask.max() < 3


def test_compare_methods_merges_results_files_into_one_table(tmp_path):
  sys.path.insert(0, str(REPO / 'benchmarks'))
  import compare_methods  # pylint: disable=g-import-not-at-top
  run = lambda h, s: {'seen_mIoU': 80.0 + s, 'unseen_mIoU': 60.0, 'hIoU': h, 'train_seconds': 10.0}
  (tmp_path / 'a.json').write_text(json.dumps(
      {'steps': 1000, 'runs': {'OTSeg': [run(70.0, 0), run(72.0, 2)]}}))
  (tmp_path / 'b.json').write_text(json.dumps(
      {'steps': 500, 'runs': {'Other': [run(40.0, 0)]}}))
  compare_methods.main(['--merge', str(tmp_path / 'a.json'), str(tmp_path / 'b.json'),
                        '--out', str(tmp_path / 'out')])
  lines = (tmp_path / 'out' / 'table.md').read_text().splitlines()
  assert '| OTSeg | 1000 | 2 | 81.00 +- 1.00 | 60.00 +- 0.00 | 71.00 +- 1.00 | 10 +- 0 |' in lines
  assert '| Other | 500 | 1 | 80.00 +- 0.00 | 60.00 +- 0.00 | 40.00 +- 0.00 | 10 +- 0 |' in lines
  merged = json.loads((tmp_path / 'out' / 'results.json').read_text())
  assert merged['steps_by_label'] == {'OTSeg': 1000, 'Other': 500}
  assert (tmp_path / 'out' / 'hiou.png').stat().st_size > 0
