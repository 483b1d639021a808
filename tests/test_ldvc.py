"""LDVC (otseg_jax/models/ldvc.py, configs/ldvc.py): deep text prompts, the init hook, the
transductive targets, and one run through train.py, eval.py and `python -m otseg_jax.predict`."""

import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image
import pytest

from configs import ldvc as ldvc_configs
from conftest import assert_clip_towers_unchanged
from conftest import run_python
from otseg_jax import text_embeddings
from otseg_jax import tokenizer as tokenizer_lib
from otseg_jax.models import clip
from otseg_jax.models import clip_weights
from otseg_jax.models import ldvc

REPO = pathlib.Path(__file__).resolve().parents[1]


def _tower():
  return clip.TextTransformer(vocab_size=64, context_length=12, width=16, layers=3, heads=2,
                              output_dim=8)


def _tokens():
  rng = np.random.default_rng(0)
  tokens = rng.integers(1, 62, (3, 9)).astype(np.int32)
  tokens[:, 0], tokens[:, -1] = 62, 63  # SOT, EOT (the row maximum)
  return tokens


def test_zero_length_deep_prompts_are_the_plain_tower():
  tower, tokens = _tower(), _tokens()
  params = jax.jit(tower.init)(jax.random.PRNGKey(0), tokens)['params']
  apply = jax.jit(lambda p, t, d: tower.apply({'params': p}, t, deep_context=d))
  plain = jax.jit(lambda p, t: tower.apply({'params': p}, t))(params, tokens)
  for deep in (np.zeros((3, 0, 16), np.float32), np.zeros((1, 0, 16), np.float32)):
    np.testing.assert_array_equal(apply(params, tokens, deep), plain)


def test_gradients_reach_the_prompts_of_every_layer():
  tower, tokens = _tower(), _tokens()
  params = jax.jit(tower.init)(jax.random.PRNGKey(0), tokens)['params']
  deep = np.random.default_rng(1).normal(size=(3, 4, 16)).astype(np.float32)
  loss = lambda d: jnp.sum(tower.apply({'params': params}, tokens, deep_context=d) ** 2)
  grads = jax.jit(jax.grad(loss))(deep)
  assert np.isfinite(grads).all()
  assert (np.abs(grads).sum(axis=(1, 2)) > 0).all()  # every layer's prompts
  # A layer's prompts replace what the layer below wrote there: with prompts at every layer,
  # the embeddings of the replaced tokens no longer matter.
  other = tokens.copy()
  other[:, 1:5] = (other[:, 1:5] + 7) % 60 + 1
  out = jax.jit(lambda t: tower.apply({'params': params}, t, deep_context=deep))
  np.testing.assert_allclose(out(other), out(tokens), rtol=1e-6, atol=1e-6)


def _tiny_config(clip_dir):
  config = ldvc_configs.get_config('tiny')
  config.clip = str(clip_dir)
  return config


def _template_tokens(clip_dir, config):
  tokenizer = tokenizer_lib.load_tokenizer(clip_dir)
  return text_embeddings.class_tokens(tokenizer, ['red vertical stripes', 'blue dots', 'green'],
                                      config.model.text_template, 24)


def test_deep_prompts_start_as_the_hand_template(tiny_synthetic_clip):
  clip_dir, _ = tiny_synthetic_clip
  config = _tiny_config(clip_dir)
  _, towers = clip_weights.load_clip(clip_dir)
  tokens = _template_tokens(clip_dir, config)
  m = config.model
  learner = ldvc.DeepPromptText(text=ldvc.text_tower(m), length=4, depth=1)
  params = {'text_encoder': {'text': towers['text'], 'deep_prompts': np.zeros((1, 4, 32))}}
  params = ldvc.init_after_load(params, tokens, m)
  # With the template's own hidden states as prompts, the learned text is CLIP's on the template.
  text = jax.jit(learner.apply)({'params': params['text_encoder']}, tokens)
  plain = jax.jit(ldvc.text_tower(m).apply)({'params': towers['text']}, tokens)
  np.testing.assert_allclose(text, plain / np.linalg.norm(plain, axis=-1, keepdims=True),
                             rtol=1e-5, atol=1e-6)
  # More prompt tokens than the template's words would overwrite the class names: refused.
  m.text_prompts.length = 5
  with pytest.raises(ValueError, match='text_prompts.length=5'):
    ldvc.init_after_load(params, tokens, m)


def test_pseudo_labels_pick_unseen_classes_for_unseen_pixels():
  seen = np.array([True, False, True, False])
  logits = np.zeros((1, 1, 3, 4), np.float32)
  logits[0, 0, :, 0] = 9.0  # a seen class scores highest everywhere
  logits[0, 0, :, 3] = 1.0
  labels = np.array([[[1, 2, 255]]], np.int32)  # unseen, seen, ignore
  out = ldvc.pseudo_labels({'decoder': logits}, labels, seen, None)
  np.testing.assert_array_equal(out, [[[3, 2, 255]]])



def test_ldvc_trains_evaluates_and_predicts(tmp_path, tiny_synthetic_clip):
  clip_dir, _ = tiny_synthetic_clip
  config = [f'--config={REPO}/configs/ldvc.py:tiny', f'--config.clip={clip_dir}']
  workdir = tmp_path / 'run'
  proc = run_python(['train.py', *config, f'--workdir={workdir}', '--config.num_train_steps=2',
               '--config.checkpoint_every_steps=2', '--config.eval_every_steps=-1'])
  assert 'method ldvc' in proc.stderr
  metrics = [json.loads(line) for line in (workdir / 'metrics.jsonl').read_text().splitlines()]
  assert np.isfinite(metrics[0]['train/decoder.loss_mask'])

  # Trained: the visual and text prompts and the head; both CLIP towers are CLIP's, untouched.
  trained, towers = assert_clip_towers_unchanged(
      workdir, clip_dir, {'backbone': 'visual', 'text_encoder/text': 'text'})
  assert any(k.startswith('decode_head/layers_0/route_attn/') for k in trained)
  # The trainer called init_after_load: two warm-up steps later the deep text prompts are still
  # the template's hidden states, to the few 1e-5 the updates moved them.
  hidden = ldvc.block_inputs(ldvc.text_tower(_tiny_config(clip_dir).model), towers['text'],
                             _template_tokens(clip_dir, _tiny_config(clip_dir))[:1, :5])
  np.testing.assert_allclose(trained['text_encoder/deep_prompts'], hidden[:1, 0, 1:], atol=1e-3)
  assert not np.allclose(trained['text_encoder/deep_prompts'], hidden[:1, 0, 1:], atol=1e-8)

  proc = run_python(['eval.py', *config, f'--checkpoint={workdir}', f'--outdir={tmp_path / "eval"}',
               '--config.eval.max_images=4'])
  results = json.loads((tmp_path / 'eval' / 'results.json').read_text())
  assert 0 <= results['mIoU'] <= 100

  # predict: other names, the learned text computed once for them; an image whose token grid
  # (5 x 4) the 2 x 2 windows do not divide.
  image = tmp_path / 'a.png'
  Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 30, 3), np.uint8)).save(image)
  run_python(['-m', 'otseg_jax.predict', '--checkpoint', str(workdir), '--image', str(image),
        '--classes', 'red stripes,blue dots,green', '--clip', str(clip_dir),
        '--short_side', '32', '--out', str(tmp_path / 'pred')])
  mask = np.asarray(Image.open(tmp_path / 'pred' / 'a_mask.png'))
  assert mask.shape == (40, 30) and mask.max() < 3
