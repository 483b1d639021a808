"""MVP-SEG (otseg_jax.models.mvpseg, configs/mvpseg.py): its pieces against NumPy, its loss, its
gradients, and a run through train.py (inductive, then MVP-SEG+), eval.py and predict."""

import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image
import pytest

from configs import mvpseg as mvpseg_config
from conftest import assert_clip_towers_unchanged
from conftest import run_python
from otseg_jax import losses
from otseg_jax import models
from otseg_jax import params as params_lib
from otseg_jax import trainer
from otseg_jax.data import labels as labels_lib
from otseg_jax.models import clip_weights
from otseg_jax.models import mvpseg

REPO = pathlib.Path(__file__).resolve().parents[1]


def _unit(x, axis=-1):
  return x / np.linalg.norm(x, axis=axis, keepdims=True)


def _softmax(x, axis=-1):
  e = np.exp(x - x.max(axis=axis, keepdims=True))
  return e / e.sum(axis=axis, keepdims=True)


def _sigmoid(x):
  return 1.0 / (1.0 + np.exp(-x))


# ---------------------------------------------------------------------------------------------
# The pieces against NumPy.


@pytest.mark.parametrize('k', [2, 3, 4])
def test_orthogonality_loss_edge_cases(k):
  rng = np.random.default_rng(k)
  row = rng.normal(size=16)
  identical = np.tile(row, (k, 1))
  # Identical prompts: every pair has |cos| = 1, so the loss is the number of pairs.
  np.testing.assert_allclose(mvpseg.orthogonality_loss(identical), k * (k - 1) / 2, rtol=1e-6)
  # Opposite directions count as much as equal ones (the absolute value).
  flipped = identical * np.where(np.arange(k) % 2, -1.0, 2.0)[:, None]
  np.testing.assert_allclose(mvpseg.orthogonality_loss(flipped), k * (k - 1) / 2, rtol=1e-6)
  orthogonal = np.linalg.qr(rng.normal(size=(16, k)))[0].T * rng.uniform(0.5, 2, (k, 1))
  np.testing.assert_allclose(mvpseg.orthogonality_loss(orthogonal), 0.0, atol=1e-6)
  v = rng.normal(size=(k, 16))
  cos = _unit(v) @ _unit(v).T
  expected = sum(abs(cos[i, j]) for i in range(k) for j in range(i + 1, k))
  np.testing.assert_allclose(mvpseg.orthogonality_loss(v), expected, rtol=1e-5)


def _numpy_forward(dense, text, tau1, tau2, gamma):
  """The paper's formulas: per-view masks, fused mask, GPR gate, refined mask (numpy)."""
  masks = np.einsum('bhwc,kvc->bvhwk', dense, text)  # M_i[b, c, m]
  fused = _softmax(tau1 * masks[:, 1:].sum(1))  # m_f
  b, _, h, w, k = masks.shape
  m0 = masks[:, 0].reshape(b, h * w, k)
  gate = np.zeros((b, k))
  for i in range(b):
    for c in range(k):
      a = _softmax(gamma * m0[i, :, c])  # over the pixels
      gate[i, c] = _sigmoid(np.dot(m0[i, :, c], a) / tau2)
  return masks, fused, gate, fused * gate[:, None, None, :]


def test_views_fused_mask_and_global_gate_match_numpy():
  rng = np.random.default_rng(0)
  dense = _unit(rng.normal(size=(2, 3, 4, 8)))
  text = _unit(rng.normal(size=(5, 4, 8)))  # K = 5, V = 1 + 3
  tau1, tau2, gamma = 7.0, 0.3, 2.0
  masks, fused, gate, refined = _numpy_forward(dense, text, tau1, tau2, gamma)
  views = mvpseg.view_masks(jnp.asarray(dense), jnp.asarray(text))
  np.testing.assert_allclose(views, masks, rtol=1e-5, atol=1e-6)
  logits = mvpseg.fused_logits(views, tau1)
  np.testing.assert_allclose(jax.nn.softmax(logits), fused, rtol=1e-4, atol=1e-6)
  gate_logits = mvpseg.global_gate_logits(views[:, 0], gamma, tau2)
  np.testing.assert_allclose(jax.nn.sigmoid(gate_logits), gate, rtol=1e-5, atol=1e-6)
  maps = {'fused': logits, 'gate': gate_logits}
  np.testing.assert_allclose(mvpseg.refined_probabilities(maps), refined, rtol=1e-4, atol=1e-6)
  config = mvpseg.get_config()
  config.calibration = 0.25
  seen = np.array([1, 0, 1, 0, 0], bool)
  np.testing.assert_allclose(mvpseg.eval_probabilities(maps, seen, config),
                             refined - 0.25 * seen, rtol=1e-4, atol=1e-6)


@pytest.fixture(scope='module')
def tiny_model():
  """(config, model, random params, tokens (K = 4, L)) of configs/mvpseg.py:tiny, random towers."""
  config = mvpseg_config.get_config('tiny')
  model = mvpseg.model_from_config(config.model)
  rng = np.random.default_rng(0)
  tokens = rng.integers(1, 600, (4, 9)).astype(np.int32)
  tokens[:, -1] = config.model.text_tower.vocab_size - 1  # EOT, the row maximum
  params = trainer.init_params(config, model, tokens, 0)
  return config, model, params, tokens


def test_model_maps_are_the_formulas_on_its_features(tiny_model):
  config, model, params, tokens = tiny_model
  params = dict(params, log_tau1=np.log(np.float32(5.0)))  # a soft softmax, visible differences
  text = models.encode_text(model, params, tokens)
  assert text['text'].shape == (4, 1 + config.model.num_views, 32)
  context = np.asarray(params['prompt_learner']['context'])  # (V, l, D)
  np.testing.assert_allclose(text['ocloss'],
                             mvpseg.orthogonality_loss(context[1:].mean(1)), rtol=1e-6)
  images = np.random.default_rng(1).normal(size=(2, 32, 32, 3)).astype(np.float32)
  maps, aux = jax.jit(lambda p, x, t: model.apply({'params': p}, x, t, train=False))(
      params, images, text)
  _, fused, gate, _ = _numpy_forward(np.asarray(aux['dense'], np.float64),
                                     np.asarray(text['text'], np.float64), 5.0,
                                     config.model.tau2, config.model.gamma)
  np.testing.assert_allclose(jax.nn.softmax(aux['fused_lowres']), fused, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(jax.nn.sigmoid(maps['gate']), gate, rtol=1e-4, atol=1e-5)
  assert maps['fused'].shape == (2, 32, 32, 4) and maps['ocloss'].shape == (2,)
  # The 'text' variant of OCLoss: the views' embeddings averaged over the classes.
  config_text = config.model.copy_and_resolve_references()
  config_text.ocloss_on = 'text'
  model_text = mvpseg.model_from_config(config_text)
  text2 = models.encode_text(model_text, params, tokens)
  np.testing.assert_allclose(
      text2['ocloss'], mvpseg.orthogonality_loss(np.asarray(text2['text'])[:, 1:].mean(0)),
      rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# The loss.


def _numpy_loss(fused, gate, ocloss, labels):
  k = fused.shape[-1]
  log_m = np.log(_softmax(fused + np.log(_sigmoid(gate))[:, None, None, :]))
  valid = labels < k
  ce = -np.mean(np.take_along_axis(log_m, np.where(valid, labels, 0)[..., None], -1)[..., 0][valid])
  present = np.stack([[np.any(l == c) for c in range(k)] for l in labels])
  g = _sigmoid(gate)
  cls = -np.mean(np.where(present, np.log(g), np.log(1 - g)))
  return ce, cls, float(np.mean(ocloss)), present


def test_loss_matches_numpy_and_its_bce_ignores_unseen_classes():
  rng = np.random.default_rng(0)
  num_classes, unseen = 6, (1, 4)
  # Global labels, every class present somewhere, both unseen classes in image 0.
  stored = rng.integers(0, num_classes, (2, 8, 8)).astype(np.uint8)
  stored[1] = np.where(np.isin(stored[1], unseen), 0, stored[1])  # image 1: seen classes only
  stored[0, 0, :2] = 255
  train = labels_lib.visibility_table('inductive', num_classes, unseen)[stored].astype(np.int32)
  k = num_classes - len(unseen)  # the seen channels the model is given
  fused = rng.normal(size=(2, 8, 8, k)).astype(np.float32)
  gate = rng.normal(size=(2, k)).astype(np.float32)
  maps = {'fused': fused, 'gate': gate, 'ocloss': np.full(2, 0.3, np.float32)}
  weights = dict(ce_weight=0.5, cls_weight=2.0, oc_weight=3.0)
  terms = losses.mvpseg_loss(maps, train, **weights)
  ce, cls, oc, present = _numpy_loss(fused, gate, maps['ocloss'], train)
  np.testing.assert_allclose(terms['ce'], 0.5 * ce, rtol=1e-5)
  np.testing.assert_allclose(terms['cls'], 2.0 * cls, rtol=1e-5)
  np.testing.assert_allclose(terms['oc'], 3.0 * oc, rtol=1e-5)
  np.testing.assert_allclose(terms['total'], 0.5 * ce + 2.0 * cls + 3.0 * oc, rtol=1e-5)
  # The BCE targets are the seen classes present, in seen order; the unseen pixels count for none.
  seen = [c for c in range(num_classes) if c not in unseen]
  for b in range(2):
    assert present[b].tolist() == [bool(np.any(stored[b] == c)) for c in seen]
  assert terms['num_masks'] == present.sum()
  # Relabelling the unseen pixels of image 0 (as another unseen class, or ignore) changes nothing.
  for other in (np.where(stored == 1, 4, stored), np.where(np.isin(stored, unseen), 255, stored)):
    again = losses.mvpseg_loss(
        maps, labels_lib.visibility_table('inductive', num_classes, unseen)[other], **weights)
    for name in ('ce', 'cls', 'total'):
      np.testing.assert_allclose(again[name], terms[name], rtol=1e-6)


def test_pseudo_labels_take_the_best_unseen_class_of_the_refined_mask():
  rng = np.random.default_rng(0)
  seen = np.array([1, 0, 1, 0, 1], bool)
  fused = rng.normal(size=(1, 4, 4, 5)).astype(np.float32) * 3
  gate = rng.normal(size=(1, 5)).astype(np.float32)
  labels = rng.integers(0, 5, (1, 4, 4)).astype(np.int32)
  labels[0, 0, 0] = 255
  config = mvpseg.get_config()
  maps = {'fused': fused, 'gate': gate}
  out = np.asarray(mvpseg.pseudo_labels(maps, labels, seen, config))
  refined = _softmax(fused) * _sigmoid(gate)[:, None, None, :]
  best_unseen = np.flatnonzero(~seen)[refined[..., ~seen].argmax(-1)]
  unseen_px = np.isin(labels, np.flatnonzero(~seen))
  np.testing.assert_array_equal(out, np.where(unseen_px, best_unseen, labels))
  config.pseudo_label_threshold = float(np.median(refined[..., ~seen].max(-1)[unseen_px]))
  out = np.asarray(mvpseg.pseudo_labels(maps, labels, seen, config))
  low = unseen_px & (refined[..., ~seen].max(-1) < config.pseudo_label_threshold)
  assert low.any() and (out[low] == 255).all() and (out[~unseen_px] == labels[~unseen_px]).all()


# ---------------------------------------------------------------------------------------------
# Gradients: every prompt and both temperatures; the visual prompts only when hosted.


def _grads(config, model, params, tokens):
  trainable, frozen = params_lib.split_params(params, config.model.trainable)
  labels = np.random.default_rng(2).integers(0, tokens.shape[0], (2, 32, 32)).astype(np.int32)
  images = np.random.default_rng(3).normal(size=(2, 32, 32, 3)).astype(np.float32)

  @jax.jit
  def grad_fn(trainable):
    def loss(trainable):
      variables = {'params': params_lib.merge_params(trainable, frozen)}
      text = model.apply(variables, tokens, train=True, method='encode_text')
      maps, _ = model.apply(variables, images, text, train=True,
                            rngs={'dropout': jax.random.PRNGKey(0)})
      return losses.mvpseg_loss(maps, labels)['total']
    return jax.grad(loss)(trainable)

  return trainable, params_lib.flat(grad_fn(trainable))


def test_gradients_reach_every_prompt_and_temperature(tiny_model):
  config, model, params, tokens = tiny_model
  trainable, grads = _grads(config, model, params, tokens)
  assert set(grads) == {'prompt_learner/context', 'log_tau1', 'log_tau2'}
  per_prompt = np.abs(np.asarray(grads['prompt_learner/context'])).sum(axis=(1, 2))
  assert per_prompt.shape == (1 + config.model.num_views,) and (per_prompt > 0).all(), per_prompt
  assert grads['log_tau1'] != 0 and grads['log_tau2'] != 0


def test_hosted_mode_trains_otseg_visual_prompts_too(tiny_model):
  # The faithful model (tiny_model) has no visual prompts at all.
  faithful = params_lib.flat(tiny_model[2])
  assert not any('prompt' in k for k in faithful if k.startswith('backbone/'))
  config = mvpseg_config.get_config('tiny:hosted')
  assert config.model.hosted
  model = mvpseg.model_from_config(config.model)
  tokens = np.random.default_rng(0).integers(1, 600, (3, 9)).astype(np.int32)
  tokens[:, -1] = config.model.text_tower.vocab_size - 1
  params = trainer.init_params(config, model, tokens, 0)
  _, grads = _grads(config, model, params, tokens)
  visual = {k for k in grads if k.startswith('backbone/')}
  # The tiny tower has one block: the shallow prompts only (no deeper block to prompt).
  assert visual == {'backbone/prompt_embeddings', 'backbone/prompt_proj/kernel', 'backbone/prompt_proj/bias',
                    'backbone/prompt_norm/scale', 'backbone/prompt_norm/bias'}, visual
  assert all(np.abs(np.asarray(grads[k])).sum() > 0 for k in visual)
  assert (np.abs(np.asarray(grads['prompt_learner/context'])).sum(axis=(1, 2)) > 0).all()


def test_config_variants():
  for arg, setting, size, steps in (('voc12', 'inductive', 512, 20_000),
                                    ('context59:plus', 'transductive', 480, 20_000),
                                    ('cocostuff171:plus:hosted', 'transductive', 512, 40_000)):
    config = mvpseg_config.get_config(arg)
    assert (config.setting, config.model.image_size, config.num_train_steps) == (
        setting, size, steps)
    assert config.model.name == 'mvpseg' and config.loss.name == 'mvpseg_loss'
    assert config.model.hosted == arg.endswith('hosted')
    assert (config.model.num_views, config.model.prompt_length) == (3, 16)
  with pytest.raises(ValueError, match='DATASET'):
    mvpseg_config.get_config('voc12:plsu')


# ---------------------------------------------------------------------------------------------
# train.py (inductive, then MVP-SEG+ from it), eval.py and predict on the tiny config.



def test_trains_then_self_trains_evaluates_and_predicts(tmp_path, tiny_synthetic_clip):
  clip_dir, _ = tiny_synthetic_clip
  tiny = mvpseg_config.get_config('tiny')
  assert clip_weights.load_clip(clip_dir)[0].vocab_size == tiny.model.text_tower.vocab_size
  base = [f'--config.clip={clip_dir}']
  inductive = tmp_path / 'inductive'
  # No final evaluation here (eval_every_steps -1): the MVP-SEG+ run below evaluates.
  proc = run_python(['train.py', f'--config={REPO}/configs/mvpseg.py:tiny', *base,
               f'--workdir={inductive}', '--config.eval_every_steps=-1'])
  assert 'method mvpseg' in proc.stderr
  metrics = [json.loads(line) for line in (inductive / 'metrics.jsonl').read_text().splitlines()]
  assert {'train/ce', 'train/cls', 'train/oc'} <= set(metrics[0])

  # Only the prompts and the temperatures trained: both CLIP towers are the CLIP's, untouched.
  trained, _ = assert_clip_towers_unchanged(
      inductive, clip_dir, {'backbone': 'visual', 'prompt_learner/text': 'text'})
  assert set(trained) - {k for k in trained if k.startswith(('backbone/', 'prompt_learner/text/'))
                         } == {'prompt_learner/context', 'log_tau1', 'log_tau2'}

  # MVP-SEG+: transductive self-training from the inductive run, 2 steps.
  plus = tmp_path / 'plus'
  config = [f'--config={REPO}/configs/mvpseg.py:tiny:plus', *base]
  run_python(['train.py', *config, f'--workdir={plus}', f'--config.init_from={inductive}',
        '--config.num_train_steps=2'])
  results = json.loads((plus / 'eval' / 'results.json').read_text())
  assert results['num_images'] == 16 and 0 <= results['hIoU'] <= 100
  again = params_lib.flat(params_lib.load_params_any(plus))
  assert not np.array_equal(again['prompt_learner/context'], trained['prompt_learner/context'])

  # eval.py reproduces the run's final evaluation.
  run_python(['eval.py', *config, f'--checkpoint={plus}', f'--outdir={tmp_path / "eval"}'])
  assert json.loads((tmp_path / 'eval' / 'results.json').read_text())['per_class'] == \
      results['per_class']

  # predict: any names, learned text computed once for them.
  image = tmp_path / 'a.png'
  Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 30, 3), np.uint8)).save(image)
  run_python(['-m', 'otseg_jax.predict', '--checkpoint', str(plus), '--image', str(image),
        '--classes', 'red horizontal stripes,blue vertical stripes', '--clip', str(clip_dir),
        '--short_side', '32', '--out', str(tmp_path / 'pred')])
  mask = np.asarray(Image.open(tmp_path / 'pred' / 'a_mask.png'))
  assert mask.shape == (40, 30) and mask.max() < 2
