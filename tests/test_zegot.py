"""ZegOT (otseg_jax.models.zegot, configs/zegot.py): the projected hidden layers of the frozen
tower, the per-layer MPS maps and their geometric-mean fusion, every option's shapes, a float64
finite-difference check of the learned-prompt path, and train.py / eval.py / predict on the tiny
config with both CLIP towers untouched."""

import functools
import json
import pathlib

import jax
import jax.numpy as jnp
from jax.test_util import check_grads
import ml_collections
import numpy as np
from PIL import Image
import pytest

from configs import zegot as zegot_configs
from conftest import assert_clip_towers_unchanged
from conftest import run_python
from otseg_jax import losses
from otseg_jax import models
from otseg_jax.models import clip
from otseg_jax.models import ot_layers
from otseg_jax.models import zegot

REPO = pathlib.Path(__file__).resolve().parents[1]
K = 3  # classes of the unit tests
EOT = 612  # the synthetic tokenizer's largest id


def _tiny_model_config(**overrides):
  """The tiny config's model with a 2-block tower, so that several layers can be fused."""
  config = zegot_configs.get_config('tiny').model
  config.backbone.layers = 2
  config.feature_layers = (0, 1)
  config.update(overrides)
  return config


def _inputs(batch=2, size=32, seed=0):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(1, 600, (K, 9)).astype(np.int32)
  tokens[:, -1] = EOT
  images = rng.normal(size=(batch, size, size, 3)).astype(np.float32)
  return jnp.asarray(tokens), jnp.asarray(images)


@pytest.fixture(scope='module')
def tiny_params():
  config = _tiny_model_config()
  tokens, images = _inputs()
  model = zegot.model_from_config(config)
  return jax.jit(lambda i, t: models.init(model, {'params': jax.random.PRNGKey(0)}, i, t))(
      images, tokens)['params']


@functools.lru_cache
def _jitted_forward(config_json):
  # One compilation per model config, shared by the tests.
  model = zegot.model_from_config(ml_collections.ConfigDict(json.loads(config_json)))

  @jax.jit
  def run(params, tokens, images):
    text = model.apply({'params': params}, tokens, train=False, method='encode_text')
    return model.apply({'params': params}, images, text, train=False)
  return run


def _forward(config, params, tokens, images):
  return _jitted_forward(config.to_json())(params, tokens, images)


@functools.lru_cache
def _jitted_transport_map(ot_config):
  return jax.jit(lambda p, q: ot_layers.transport_map(p, q, ot_config)[1])


def _transport_score(pixels, prompts, ot_config):
  """transport_map's score alone, one compilation per setting."""
  return _jitted_transport_map(ml_collections.FrozenConfigDict(ot_config))(pixels, prompts)


# ---------------------------------------------------------------------------------------------
# The frozen tower's projected hidden layers (clip.VisionTransformer.project_hidden).


def test_project_hidden_is_ln_post_and_proj_of_the_raw_hidden_layers():
  prompts = 2  # prompt tokens in block 1 only: the layers' token counts differ
  kw = dict(patch_size=8, width=16, layers=3, heads=2, output_dim=8, image_size=24,
            num_prompt_tokens=prompts, prompt_depth=1 if prompts else 0, hidden_layers=(0, 2))
  raw_tower = clip.VisionTransformer(**kw)
  tower = clip.VisionTransformer(**kw, project_hidden=True)
  images = jnp.asarray(np.random.default_rng(0).normal(size=(2, 24, 24, 3)), jnp.float32)
  params = raw_tower.init(jax.random.PRNGKey(0), images)['params']
  assert jax.tree.structure(jax.eval_shape(tower.init, jax.random.PRNGKey(0), images)
                            ['params']) == jax.tree.structure(params)
  g0, d0, raw = jax.jit(raw_tower.apply)({'params': params}, images)
  g1, d1, projected = jax.jit(tower.apply)({'params': params}, images)
  # The flag changes nothing else.
  np.testing.assert_array_equal(g1, g0)
  np.testing.assert_array_equal(d1, d0)
  assert raw[0].shape[-1] == 16 and projected[0].shape[-1] == 8

  def head(x):  # (prompt_norm,) ln_post, proj by hand
    for name, eps in ((('prompt_norm', 1e-6),) if prompts else ()) + (('ln_post', 1e-5),):
      p = params[name]
      x = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + eps)
      x = x * p['scale'] + p['bias']
    return x @ params['proj']

  for i in (0, 2):
    assert projected[i].shape == raw[i].shape[:2] + (8,)
    np.testing.assert_allclose(projected[i], head(np.asarray(raw[i])), rtol=1e-4, atol=1e-5)
  # The last block, projected, is the final output.
  np.testing.assert_allclose(projected[2][:, 0], g0, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(projected[2][:, -9:].reshape(d0.shape), d0, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# Fusion and the multi-layer path.


def test_fusion_is_the_geometric_mean_of_the_layer_sigmoids():
  scores = np.random.default_rng(0).normal(scale=4.0, size=(3, 2, 4, 4, 5))
  want = np.prod(1.0 / (1.0 + np.exp(-scores)), axis=0) ** (1.0 / 3.0)
  fused = np.asarray(zegot.fuse_layer_scores(jnp.asarray(scores, jnp.float32)))
  np.testing.assert_allclose(1.0 / (1.0 + np.exp(-fused)), want, rtol=1e-5, atol=1e-6)
  # One layer: its own logits, exactly. Sure layers: a finite, capped logit and gradient.
  one = jnp.asarray(scores[:1], jnp.float32)
  np.testing.assert_array_equal(zegot.fuse_layer_scores(one), one[0])
  sure = jnp.full((2, 3), 40.0)
  grad = jax.grad(lambda s: zegot.fuse_layer_scores(s).sum())(sure)
  assert np.isfinite(zegot.fuse_layer_scores(sure)).all() and np.isfinite(grad).all()


def test_multi_layer_path_with_one_layer_is_the_single_layer_computation(tiny_params):
  tokens, images = _inputs()
  both = _tiny_model_config()
  maps2, aux2 = _forward(both, tiny_params, tokens, images)
  q = ot_layers.l2_normalize(aux2['q_proj'])
  b, h, w = 2, 4, 4
  for j in range(2):  # each layer's map is transport_map on that layer alone
    alone = _transport_score(aux2['pixels'][j].reshape(b, h * w, -1), q, both.ot)
    np.testing.assert_allclose(aux2['layer_scores'][j], alone.reshape(b, h, w, K), rtol=1e-5,
                               atol=1e-5)
  # feature_layers = (1,): the same parameters, the fused map is layer 1's map.
  maps1, aux1 = _forward(_tiny_model_config(feature_layers=(1,)), tiny_params, tokens, images)
  np.testing.assert_allclose(aux1['score_lowres'], aux2['layer_scores'][1], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(maps1['decoder'], maps2['decoder'], rtol=1e-5, atol=1e-5)
  single = _transport_score(aux1['pixels'][0].reshape(b, h * w, -1),
                            ot_layers.l2_normalize(aux1['q_proj']), both.ot)
  np.testing.assert_allclose(aux1['score_lowres'], single.reshape(b, h, w, K), rtol=1e-5,
                             atol=1e-5)
  fused = zegot.fuse_layer_scores(aux2['layer_scores'])
  np.testing.assert_allclose(aux2['score_lowres'], fused, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize('overrides', [
    dict(),  # softmax decoder, two layers fused
    {'head.attention': 'mpsa', 'feature_layers': (1,), 'ot.implementation': 'reference'},
], ids=['softmax', 'mpsa-shallow-reference'])
def test_every_option_gives_finite_maps(tiny_params, overrides):
  config = _tiny_model_config()
  for key, value in overrides.items():
    *parents, leaf = key.split('.')
    node = config
    for p in parents:
      node = node[p]
    node[leaf] = value
  model = zegot.model_from_config(config)
  tokens, images = _inputs()
  labels = jnp.asarray(np.random.default_rng(3).integers(0, K, (2, 32, 32)), jnp.int32)

  @jax.jit
  def loss_and_maps(params):
    text = model.apply({'params': params}, tokens, train=True, method='encode_text')
    maps, aux = model.apply({'params': params}, images, text, train=True,
                            rngs={'dropout': jax.random.PRNGKey(1)})
    return losses.otseg_loss(maps, labels)['total'], (maps, aux)

  # (Finite gradients: the training run below stops on any non-finite one.)
  loss, (maps, aux) = loss_and_maps(tiny_params)
  assert set(maps) == {'decoder', 'score'}
  for v in maps.values():
    assert v.shape == (2, 32, 32, K) and np.isfinite(v).all()
  layers = len(config.feature_layers)
  assert aux['layer_scores'].shape == (layers, 2, 4, 4, K)
  assert 'mps' in aux['sinkhorn_iterations_by_path']
  assert np.isfinite(loss)
  probs = zegot.eval_probabilities(maps, np.array([True, False, True]),
                                   zegot_configs.get_config('tiny').model)
  assert probs.shape == (2, 32, 32, K) and np.isfinite(probs).all()


def test_the_ot_settings_apply(tiny_params):
  tokens, images = _inputs()
  config = _tiny_model_config()
  _, aux = _forward(config, tiny_params, tokens, images)
  config.ot.update(max_iterations=2, epsilon=0.5)
  _, aux2 = _forward(config, tiny_params, tokens, images)
  assert int(np.max(aux2['sinkhorn_iterations_by_path']['mps'])) <= 2
  assert int(np.max(aux['sinkhorn_iterations_by_path']['mps'])) > 2
  assert not np.allclose(aux2['layer_scores'], aux['layer_scores'], atol=1e-3)


# ---------------------------------------------------------------------------------------------
# Gradients of the learned prompts, float64 finite differences.


def test_learned_prompt_gradient_matches_finite_differences(tiny_params):
  with jax.enable_x64(True):
    config = _tiny_model_config()
    # Converged Sinkhorn (a fixed count would be min == max, wrong with ott-jax 0.6), so that
    # the stopping test does not move under the perturbation.
    config.ot.update(threshold=1e-10, max_iterations=200)
    model = zegot.model_from_config(config, dtype=jnp.float64)
    tokens, images = _inputs(batch=1, size=16)
    images = images.astype(jnp.float64)
    params = jax.tree.map(lambda x: jnp.asarray(x, jnp.float64), tiny_params)
    weights = jnp.asarray(np.random.default_rng(1).normal(size=(2, 1, 16, 16, K)))

    def loss(context):
      p = {**params, 'prompt_learner': {**params['prompt_learner'], 'context': context}}
      text = model.apply({'params': p}, tokens, train=False, method='encode_text')
      maps, _ = model.apply({'params': p}, images, text, train=False)
      return jnp.sum(weights[0] * maps['score']) + jnp.sum(weights[1] * maps['decoder'])

    context = params['prompt_learner']['context']
    assert context.dtype == jnp.float64
    # The context enters only through the text tower (CoOpText): a gradient there has gone
    # through the frozen tower.
    assert np.abs(jax.jit(jax.grad(loss))(context)).max() > 1e-6
    check_grads(jax.jit(loss), (context,), order=1, modes=['rev'], eps=1e-6, atol=1e-6,
                rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# train.py, eval.py and predict on the tiny config: only the prompts and the head train.



def test_zegot_trains_with_frozen_clip_evaluates_and_predicts(tmp_path, tiny_synthetic_clip):
  clip_dir, _ = tiny_synthetic_clip
  config = [f'--config={REPO}/configs/zegot.py:tiny', f'--config.clip={clip_dir}']
  workdir = tmp_path / 'run'
  proc = run_python(['train.py', *config, f'--workdir={workdir}', '--config.num_train_steps=3',
               '--config.checkpoint_every_steps=3', '--config.log_every_steps=1'])
  assert 'method zegot' in proc.stderr
  results = json.loads((workdir / 'eval' / 'results.json').read_text())
  assert results['num_images'] == 16 and 0 <= results['hIoU'] <= 100
  metrics = [json.loads(line) for line in (workdir / 'metrics.jsonl').read_text().splitlines()]
  train = [m for m in metrics if 'train/total' in m]
  assert [m['step'] for m in train] == [1, 2, 3] and all(np.isfinite(m['train/total'])
                                                          for m in train)
  assert 'train/score.loss_mask' in train[0] and 'train/decode.loss_dice' in train[0]

  # Every CLIP weight is CLIP's after training; the context vectors moved.
  trained, _ = assert_clip_towers_unchanged(
      workdir, clip_dir, {'backbone': 'visual', 'prompt_learner/text': 'text'})
  assert {k for k in trained if not k.startswith(('backbone/', 'prompt_learner/text/',
                                                  'decode_head/'))} == {'prompt_learner/context'}

  # eval.py reproduces the run's evaluation; predict computes the learned text for any names.
  run_python(['eval.py', *config, f'--checkpoint={workdir}', f'--outdir={tmp_path / "eval"}'])
  again = json.loads((tmp_path / 'eval' / 'results.json').read_text())
  assert again['per_class'] == results['per_class']
  image = tmp_path / 'a.png'
  Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 30, 3), np.uint8)).save(image)
  run_python(['-m', 'otseg_jax.predict', '--checkpoint', str(workdir), '--image', str(image),
        '--classes', 'red horizontal stripes,blue vertical stripes', '--clip', str(clip_dir),
        '--short_side', '32', '--out', str(tmp_path / 'pred')])
  mask = np.asarray(Image.open(tmp_path / 'pred' / 'a_mask.png'))
  assert mask.shape == (40, 30) and mask.max() < 2
