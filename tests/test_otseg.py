"""OTSeg model pieces: head parity on the dump's backbone outputs, jit / vmap, gradients in every
differentiation mode, the trainable split, inference helpers. Whole-model parity: test_parity.py."""

import json

from flax import traverse_util
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from otseg_jax import convert
from otseg_jax import inference
from otseg_jax import losses
from otseg_jax import params as params_lib
from otseg_jax.models import ot_layers
from otseg_jax.models import otseg
from otseg_jax.models import otseg_mmseg


# Halves XLA compile times, which dominate these tests.
FAST_COMPILE = {'xla_backend_optimization_level': 0, 'xla_llvm_disable_expensive_passes': True}


def tiny_config(**head) -> ml_collections.ConfigDict:
  config = otseg.get_config()
  config.image_size = 32
  config.backbone.update(dict(patch_size=8, width=32, layers=2, heads=2, output_dim=16,
                              num_prompt_tokens=2, prompt_depth=1, prompt_dropout=0.1))
  config.head.update(dict(decoder_layers=2, num_heads=2, dropout=0.1))
  config.head.update(head)
  config.num_prompts = 2
  return config


def tiny_inputs(dtype=jnp.float32, batch=2, k=3):
  rng = np.random.default_rng(0)
  images = jnp.asarray(rng.normal(size=(batch, 32, 32, 3)), dtype)
  text = rng.normal(size=(k, 2, 16))
  text = jnp.asarray(text / np.linalg.norm(text, axis=-1, keepdims=True), dtype)
  labels = jnp.asarray(rng.integers(0, k, size=(batch, 32, 32)).astype(np.int32))
  labels = labels.at[:, :, :2].set(255)
  return images, text, labels


_PARAMS = {}


def init(model, images, text, dtype=jnp.float32):
  """Parameters of `model` (cached per architecture: init traces the whole model)."""
  key = (model.decoder_layers, model.attention, model.use_mps)
  if key not in _PARAMS:
    # Only shapes matter for init, so the cheapest solver settings do.
    ot_config = model.ot_config.as_configdict()
    ot_config.update(dict(implementation='reference', max_iterations=1, differentiation='unrolled'))
    light = model.clone(ot_config=ml_collections.FrozenConfigDict(ot_config))
    _PARAMS[key] = jax.jit(lambda x, t: light.init(jax.random.key(0), x, t, train=False))(
        images[:1], text)['params']
  return jax.tree.map(lambda x: jnp.asarray(np.asarray(x), dtype), _PARAMS[key])


def apply(model, params, images, text, **kwargs):
  return jax.jit(lambda p, x, t: model.apply({'params': p}, x, t, train=False, **kwargs),
                 compiler_options=FAST_COMPILE)(params, images, text)


def test_get_config_defaults_are_the_reference_voc():
  config = otseg.get_config()
  b = config.backbone
  assert (config.image_size, b.patch_size, b.width, b.layers, b.heads, b.output_dim) == (
      512, 16, 768, 12, 12, 512)
  assert (b.num_prompt_tokens, b.prompt_depth, b.prompt_dropout) == (10, 11, 0.1)
  assert b.attention_query_chunk == 256  # same numbers as dense (test_clip), less time and memory
  assert (config.head.decoder_layers, config.head.attention, config.head.use_mps) == (
      3, 'mpsa', True)
  assert (config.num_prompts, config.ensemble_weight, config.calibration) == (6, 0.5, 0.1)
  assert config.ot.epsilon == 0.05
  assert otseg.get_config('context').image_size == 480
  assert otseg.get_config('coco').backbone.num_prompt_tokens == 100
  with pytest.raises(ValueError, match='voc, context, coco'):
    otseg.get_config('ade')
  bad = tiny_config(attention='linear')
  with pytest.raises(ValueError, match="'mpsa' or 'softmax'"):
    otseg.model_from_config(bad)


def test_head_alone_matches_dump_exactly(otseg_small):
  """The head on the dump's backbone outputs, with the replica of the authors' solver, float64."""
  ref = json.loads(str(otseg_small['config/json']))
  config = convert.config_from_reference(ref)
  config.ot.implementation = 'reference'
  sd = {k[len('decode_head.'):]: v for k, v in otseg_small.items()
        if k.startswith('decode_head.')}
  with jax.enable_x64(True):
    params, _ = otseg_mmseg.head_params_from_state_dict(sd, config.head.decoder_layers)
    head = otseg.OTSegHead(config.backbone.output_dim, ml_collections.FrozenConfigDict(config.ot),
                           decoder_layers=config.head.decoder_layers)
    dense = jnp.asarray(np.moveaxis(otseg_small['out/backbone_visual_embedding'], 1, -1))
    glob = jnp.asarray(otseg_small['out/backbone_global_embedding'])
    text = jnp.asarray(otseg_small['input/text_embeddings'][ref['seen_idx']])
    out = jax.jit(lambda p: head.apply({'params': p}, dense, glob, text, train=False))(params)
  rel = lambda a, b: np.abs(np.asarray(a) - b).max() / np.abs(b).max()
  assert rel(out['q_proj'], otseg_small['out/train_q_proj']) < 1e-12
  assert rel(np.moveaxis(out['score'], -1, 1), otseg_small['out/train_score_lowres']) < 1e-12
  assert rel(np.moveaxis(out['decoder'], -1, 1), otseg_small['out/train_decoder_lowres']) < 1e-12
  b, h, w, k = out['decoder'].shape
  maps = np.moveaxis(np.reshape(out['layer_maps'], (3, b, h * w, k)), -1, 2)
  assert rel(maps, otseg_small['out/train_decoder_layer_attn']) < 1e-12
  iters = [int(i) for i in out['sinkhorn_iterations']]
  assert iters == otseg_small['sinkhorn/train_iters'].tolist()


def test_forward_layout_and_unused_pieces_never_created():
  config = tiny_config()
  model = otseg.model_from_config(config)
  images, text, _ = tiny_inputs()
  params = init(model, images, text)
  head = params['decode_head']
  assert set(head) == {'q_proj', 'layers_0', 'layers_1'}
  assert set(head['layers_0']) == {'multihead_attn', 'norm2', 'norm3', 'linear1', 'linear2'}
  assert set(head['layers_0']['multihead_attn']) == {'q', 'k', 'v', 'proj'}
  # The last layer's queries are never used: only its attention's q and k exist.
  assert set(head['layers_1']) == {'multihead_attn'}
  assert set(head['layers_1']['multihead_attn']) == {'q', 'k'}
  assert head['q_proj']['kernel'].shape == (32, 16)
  maps, aux = apply(model, params, images, text)
  assert set(maps) == {'decoder', 'score'}  # what the loss and the evaluation read
  assert maps['decoder'].shape == maps['score'].shape == (2, 32, 32, 3)
  assert aux['decoder_lowres'].shape == aux['score_lowres'].shape == (2, 4, 4, 3)
  assert aux['q_proj'].shape == (2, 3, 2, 16)
  assert aux['layer_maps'].shape == (2, 2, 4, 4, 3) and len(aux['layer_queries']) == 1
  assert len(aux['sinkhorn_iterations']) == 3  # MPS path, then the two layers
  by_path = aux['sinkhorn_iterations_by_path']  # the same counts, named for the trainer's log
  assert len(by_path) == 3
  for name, count in zip(('mps', 'layers_0', 'layers_1'), aux['sinkhorn_iterations']):
    np.testing.assert_array_equal(by_path[name], count, err_msg=name)
  np.testing.assert_allclose(np.linalg.norm(aux['dense'], axis=-1), 1, rtol=1e-5)
  # Non-square input: the maps follow the input size.
  maps, aux = jax.eval_shape(
      lambda p: model.apply({'params': p}, images[:, :24], text, train=False), params)
  assert maps['decoder'].shape == (2, 24, 32, 3) and aux['decoder_lowres'].shape == (2, 3, 4, 3)
  with pytest.raises(ValueError, match=r'expected \(K, N, 16\)'):
    jax.eval_shape(lambda p: model.apply({'params': p}, images, text[..., :8], train=False),
                   params)


def test_combine_layer_maps():
  rng = np.random.default_rng(1)
  a = [jnp.asarray(rng.normal(size=(2, 3, 3, 4)) * 3) for _ in range(3)]
  np.testing.assert_array_equal(ot_layers.combine_layer_maps(a[:1]), a[0])
  sig = lambda x: 1 / (1 + np.exp(-np.asarray(x, np.float64)))
  want = np.asarray(a[2]) * sig(a[0])**0.5 * sig(a[1])**0.5
  np.testing.assert_allclose(ot_layers.combine_layer_maps(a), want, rtol=1e-5)
  want = np.asarray(a[1]) * sig(a[0])
  np.testing.assert_allclose(ot_layers.combine_layer_maps(a[:2]), want, rtol=1e-5)


def test_eval_probabilities_calibration():
  decoder = jnp.zeros((1, 2, 2, 3)) + jnp.array([0.0, 2.0, -2.0])
  score = jnp.zeros((1, 2, 2, 3)) + jnp.array([2.0, 0.0, 0.0])
  seen = np.array([True, False, True])
  config = ml_collections.ConfigDict(dict(ensemble_weight=0.5, calibration=0.1))
  p = otseg.eval_probabilities({'decoder': decoder, 'score': score}, seen, config)
  want = 1 / (1 + np.exp(-np.array([1.0, 1.0, -1.0]))) - np.array([0.1, 0, 0.1])
  np.testing.assert_allclose(p[0, 0, 0], want, rtol=1e-6)
  config.calibration = 0.0
  p = otseg.eval_probabilities({'decoder': decoder}, seen, config)
  np.testing.assert_allclose(p[0, 0, 0], 1 / (1 + np.exp(-np.array([0.0, 2.0, -2.0]))),
                             rtol=1e-6)
  with pytest.raises(ValueError, match='one flag per class'):
    otseg.eval_probabilities({'decoder': decoder}, seen[:2], config)


def test_jit_and_vmap_over_the_batch():
  config = tiny_config()
  model = otseg.model_from_config(config)
  images, text, _ = tiny_inputs(batch=3)
  params = init(model, images, text)
  apply = lambda p, x: model.apply({'params': p}, x, text, train=False)[0]['decoder']
  batched = jax.jit(apply)(params, images)
  one_by_one = jax.jit(jax.vmap(lambda x: apply(params, x[None])[0]))(images)
  np.testing.assert_allclose(one_by_one, batched, rtol=1e-4, atol=1e-4 * np.abs(batched).max())


def _grads(config, dtype, *, dropout_rng=True, compiler_options=FAST_COMPILE):
  model = otseg.model_from_config(config, dtype=dtype)
  images, text, labels = tiny_inputs(dtype)
  params = init(model, images, text, dtype)
  trainable, frozen = params_lib.split_params(params, config.trainable)

  def loss_fn(trainable):
    maps, _ = model.apply({'params': params_lib.merge_params(trainable, frozen)}, images, text,
                          train=True, rngs={'dropout': jax.random.key(1)} if dropout_rng else None)
    # The loss the trainer uses, whatever maps the ablation leaves.
    return losses.otseg_loss(maps, labels)['total']

  loss, grads = jax.jit(jax.value_and_grad(loss_fn), compiler_options=compiler_options)(trainable)
  assert np.isfinite(loss)
  flat = traverse_util.flatten_dict(grads)
  assert set(flat) == set(traverse_util.flatten_dict(trainable))
  for path, g in flat.items():
    assert np.all(np.isfinite(g)), path
  # Something reaches the prompts through the frozen backbone.
  assert np.abs(flat[('backbone', 'prompt_embeddings')]).max() > 0
  return grads


@pytest.mark.parametrize('name,x64,overrides', [
    # The training default: ott, unrolled, dropout on.
    ('ott-unrolled', False, dict()),
    # Implicit differentiation of the balanced problem needs float64 (see ot.py).
    ('ott-implicit', True, dict(differentiation='implicit', decoder_layers=1)),
    # The authors' loop replica, with a single decoder layer (no sigmoid gates).
    ('reference-one-layer', False, dict(implementation='reference', decoder_layers=1)),
    # Ablations: softmax attention in the decoder, no MPS path.
    ('softmax-no-mps', False, dict(attention='softmax', use_mps=False, decoder_layers=3)),
])
def test_gradients_finite(name, x64, overrides):
  config = tiny_config()
  for key, value in overrides.items():
    if key in config.head:
      config.head[key] = value
    else:
      config.ot[key] = value
  with jax.enable_x64(x64):
    # Implicit differentiation of the balanced problem is numerically fragile (lineax reports a
    # singular system in float32, and in float64 under XLA's -O0): full optimisation there.
    _grads(config, jnp.float64 if x64 else jnp.float32,
           compiler_options=None if name == 'ott-implicit' else FAST_COMPILE)


def test_trainable_mask_matches_the_reference(otseg_small):
  config = convert.config_from_reference(json.loads(str(otseg_small['config/json'])))
  sd = {k: v for k, v in otseg_small.items() if '/' not in k}
  params, unused = convert.params_from_state_dict(sd, config)
  mask = traverse_util.flatten_dict(params_lib.trainable_mask(params, config.trainable))
  trainable = {p for p, m in mask.items() if m}
  assert {p for p in trainable if p[0] == 'backbone'} == {
      ('backbone', 'prompt_embeddings'), ('backbone', 'deep_prompt_embeddings'),
      ('backbone', 'prompt_proj', 'kernel'), ('backbone', 'prompt_proj', 'bias'),
      ('backbone', 'prompt_norm', 'scale'), ('backbone', 'prompt_norm', 'bias')}
  assert all(m == (p[0] == 'decode_head') for p, m in mask.items() if p[0] == 'decode_head'
             or 'prompt' not in ''.join(p))
  # The regex config.trainable is the split the trainer made in code before it.
  before = lambda path: 'decode_head' in path or any('prompt' in p for p in path)
  assert all(m == before(p) for p, m in mask.items())
  # Every trainable tensor of the reference maps to a trainable leaf or is unused.
  ref_trainable = set(str(n) for n in otseg_small['info/trainable_params'])
  assert len(trainable) + len(ref_trainable & set(unused)) == len(ref_trainable)
  a, b = params_lib.split_params(params, config.trainable)
  assert traverse_util.flatten_dict(a).keys() == trainable
  merged = params_lib.merge_params(a, b)
  assert jax.tree.structure(merged) == jax.tree.structure(params)


def test_window_corners_are_the_references():
  small = [(y1, x1) for y1, _, x1, _ in inference.window_corners((96, 80), 64, 48)]
  holdout = [(y1, x1) for y1, _, x1, _ in inference.window_corners((64, 56), 48, 32)]
  assert small == [(0, 0), (0, 16), (32, 0), (32, 16)]
  assert holdout == [(0, 0), (0, 8), (16, 0), (16, 8)]
  # VOC: short side 512, crop 512, stride 426.
  assert inference.window_corners((512, 683), 512, 426) == [(0, 512, 0, 512), (0, 512, 171, 683)]
  assert inference.window_corners((30, 40), 64, 48) == [(0, 30, 0, 40)]


def test_slide_inference_and_predict():
  rng = np.random.default_rng(2)
  images = jnp.asarray(rng.normal(size=(2, 70, 50, 3)), jnp.float32)
  calls = []

  def encode_fn(x):  # A pixelwise map: averaging overlapping windows gives it back.
    calls.append(x.shape)
    return jnp.concatenate([x, x[..., :1] * 2], axis=-1)

  want = encode_fn(images)
  for window_batch in (None, 3):
    out = jax.jit(lambda x: inference.slide_inference(
        encode_fn, x, crop=(32, 24), stride=(20, 16), window_batch=window_batch))(images)
    np.testing.assert_allclose(out, want, rtol=1e-6, atol=1e-6)
  labels, probs = inference.predict(encode_fn, images, mode='slide', crop=32, stride=20,
                                    output_size=(35, 25))
  assert labels.shape == (2, 35, 25) and probs.shape == (2, 35, 25, 4)
  np.testing.assert_array_equal(labels, jnp.argmax(probs, -1))
  labels, _ = inference.predict(encode_fn, images, mode='whole')
  np.testing.assert_array_equal(labels, jnp.argmax(want, -1))
  with pytest.raises(ValueError, match='crop and stride'):
    inference.predict(encode_fn, images)


def test_encode_decode_is_the_calibrated_ensemble():
  config = tiny_config()
  model = otseg.model_from_config(config)
  images, text, _ = tiny_inputs(batch=1)
  params = init(model, images, text)
  seen = np.array([True, True, False])
  probabilities = lambda maps, seen: otseg.eval_probabilities(maps, seen, config)
  probs, (out, _) = jax.jit(lambda p: (
      inference.encode_decode(model, p, images, text, seen, probabilities),
      model.apply({'params': p}, images, text, train=False)))(params)
  want = jax.nn.sigmoid(0.5 * out['decoder'] + 0.5 * out['score']) - 0.1 * seen
  np.testing.assert_allclose(probs, want, rtol=1e-5, atol=1e-6)
