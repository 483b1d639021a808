"""CLIP towers: parity with HF transformers, a torch OpenAI-layout CLIP and the reference dumps."""

import copy
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import clip_testing as ct
from conftest import load_reference
from otseg_jax.models import clip, clip_weights


def _normalize(x):
  x = np.asarray(x)
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _assert_rel_max(got, want, tol):
  """max |got - want| <= tol * max |want| (relative to the array's max, as the README reports)."""
  got, want = np.asarray(got), np.asarray(want)
  assert got.shape == want.shape, (got.shape, want.shape)
  err = np.abs(got - want).max() / np.abs(want).max()
  assert err <= tol, f'relative-to-max error {err:.3g} > {tol}'


def _as(params, dtype):
  return jax.tree.map(lambda x: np.asarray(x, dtype), params)


def _vision(module, params, images_nhwc, **kw):
  return jax.jit(lambda p, x: module.apply({'params': p}, x, **kw))(params, images_nhwc)


def _text(module, params, tokens):
  return jax.jit(lambda p, t: module.apply({'params': p}, t))(params, tokens)


# ----------------------------------------------------------------------------------------------
# HF transformers parity (plain CLIP).


@pytest.fixture(scope='module')
def hf_clip(tmp_path_factory):
  directory = tmp_path_factory.mktemp('hf_clip')
  return ct.save_random_hf_clip(directory, seed=0), directory


# LAION / DFN / MetaCLIP-style towers: exact gelu; other MLP widths.
@pytest.fixture(scope='module', params=[dict(hidden_act='gelu', mlp_ratio=3),
                                        dict(hidden_act='gelu_pytorch_tanh', mlp_ratio=2)],
                ids=['gelu_mlp3x', 'gelu_tanh_mlp2x'])
def hf_clip_other(request, tmp_path_factory):
  directory = tmp_path_factory.mktemp('hf_clip_other')
  return ct.save_random_hf_clip(directory, seed=2, **request.param), directory


@pytest.mark.parametrize('dtype', ['float64', 'float32'])
def test_hf_parity_other_activations_and_mlp_sizes(hf_clip_other, dtype):
  test_hf_parity(hf_clip_other, dtype)


@pytest.mark.parametrize('dtype', ['float64', 'float32'])
def test_hf_parity(hf_clip, dtype):
  hf, directory = hf_clip
  spec, params = clip_weights.load_clip(directory)
  assert spec.image_size == (32, 32) and spec.vision_heads == 4 and spec.text_heads == 4
  assert spec.activation == hf.config.vision_config.hidden_act
  assert spec.vision_mlp_dim == hf.config.vision_config.intermediate_size
  assert spec.text_mlp_dim == hf.config.text_config.intermediate_size
  rng = np.random.default_rng(1)
  images = rng.normal(size=(2, 3, 32, 32))
  tokens = ct.random_tokens(rng, 3, 16, 100)
  hf = copy.deepcopy(hf).double() if dtype == 'float64' else hf
  with torch.no_grad():
    x = torch.from_numpy(images).to(hf.dtype)
    g_want, d_want = (t.numpy() for t in ct.hf_image_features(hf, x))
    g_api = hf.get_image_features(pixel_values=x).pooler_output.numpy()
    t_want = hf.get_text_features(input_ids=torch.from_numpy(tokens)).pooler_output.numpy()
  np.testing.assert_allclose(g_api, g_want, rtol=1e-6, atol=1e-6)  # our reading of HF's API
  with jax.enable_x64(dtype == 'float64'):
    jdt = jnp.dtype(dtype)
    g, d, _ = _vision(spec.vision_tower(jdt), _as(params['visual'], dtype),
                      images.transpose(0, 2, 3, 1).astype(dtype))
    t = _text(spec.text_tower(jdt), _as(params['text'], dtype), tokens)
  assert g.dtype == jdt and d.shape == (2, 4, 4, 24) and t.shape == (3, 24)
  if dtype == 'float64':
    for got, want in ((g, g_want), (d, d_want), (t, t_want)):
      np.testing.assert_allclose(got, want, rtol=0, atol=1e-10)
  else:
    for got, want in ((g, g_want), (d, d_want), (t, t_want)):
      _assert_rel_max(got, want, 1e-5)


# ----------------------------------------------------------------------------------------------
# Other input sizes, against a torch OpenAI-layout CLIP with F.interpolate positional grids.


@pytest.fixture(scope='module')
def openai_clip():
  return ct.tiny_openai_clip(seed=3).double()


def _torch_visual(model, images):
  with torch.no_grad():
    g, d = model.visual(torch.from_numpy(images))
  return g.numpy(), d.numpy()


def test_non_square_input_resizes_grid_at_run_time(openai_clip):
  images = np.random.default_rng(2).normal(size=(2, 3, 48, 40))  # grid 6x5, checkpoint grid 4x4
  g_want, d_want = _torch_visual(openai_clip, images)
  with jax.enable_x64(True):
    spec, params = clip_weights.clip_from_state_dict(openai_clip.state_dict(), None)
    g, d, _ = _vision(spec.vision_tower(jnp.float64), params['visual'],
                      images.transpose(0, 2, 3, 1))
  assert d.shape == (2, 6, 5, 24)
  np.testing.assert_allclose(g, g_want, atol=1e-10, rtol=0)
  np.testing.assert_allclose(d, d_want, atol=1e-10, rtol=0)


def test_load_time_resize_then_run_time_resize(openai_clip):
  # Reference: the checkpoint's 4x4 grid resized to 6x6 with F.interpolate, once, in torch.
  ref = copy.deepcopy(openai_clip)
  pos = ref.visual.positional_embedding.data
  grid = pos[1:].reshape(1, 4, 4, -1).permute(0, 3, 1, 2)
  grid = F.interpolate(grid, size=(6, 6), mode='bilinear', align_corners=False)
  ref.visual.positional_embedding.data = torch.cat([pos[:1], grid.reshape(pos.shape[1], 36).T])
  ref.visual.grid = 6
  with jax.enable_x64(True):
    spec, params = clip_weights.clip_from_state_dict(openai_clip.state_dict(), 48)
    assert spec.image_size == (48, 48)
    assert params['visual']['positional_embedding'].shape == (37, 128)
    vision = spec.vision_tower(jnp.float64)
    for size in ((48, 48), (40, 56)):  # identity at run time, then 6x6 -> 5x7
      images = np.random.default_rng(3).normal(size=(1, 3, *size))
      g_want, d_want = _torch_visual(ref, images)
      g, d, _ = _vision(vision, params['visual'], images.transpose(0, 2, 3, 1))
      np.testing.assert_allclose(g, g_want, atol=1e-10, rtol=0)
      np.testing.assert_allclose(d, d_want, atol=1e-10, rtol=0)
  # A non-square configured size lays the grid out as (H // p, W // p).
  spec, params = clip_weights.clip_from_state_dict(openai_clip.state_dict(), (48, 40))
  assert spec.image_size == (48, 40) and spec.vision_tower().grid == (6, 5)
  assert params['visual']['positional_embedding'].shape == (31, 128)


def test_nchw_images_are_refused():
  spec = clip.CLIPSpec(24, (32, 32), 8, 64, 1, 4, 16, 100, 32, 1, 4)
  with pytest.raises(ValueError, match='NHWC'):
    jax.eval_shape(spec.vision_tower().init, jax.random.key(0), jnp.zeros((1, 3, 32, 32)))
  with pytest.raises(ValueError, match='L <= 16'):
    jax.eval_shape(spec.text_tower().init, jax.random.key(0), jnp.zeros((1, 77), jnp.int32))


# ----------------------------------------------------------------------------------------------
# The authors' reference data (../shared/reference).


def test_posemb_resize_reference():
  ref = load_reference('posemb_resize.npz')
  pos14 = ref['positional_embedding_14x14']
  with jax.enable_x64(True):
    got = clip_weights.resize_positional_embedding(pos14, (32, 32))
    # The same through the full loader, as a 224 -> 512 ViT-B/16 load would do it.
    d = pos14.shape[1]
    sd = {'conv1.weight': np.zeros((d, 3, 16, 16)), 'class_embedding': np.zeros(d),
          'positional_embedding': pos14, 'proj': np.zeros((d, 8)),
          **{k: np.zeros(s)
             for k, s in clip_weights._block_shapes('transformer.resblocks.0.', d, 4 * d).items()},
          **{f'{n}.{w}': np.ones(d) for n in ('ln_pre', 'ln_post') for w in ('weight', 'bias')}}
    loaded = clip_weights.visual_params_from_state_dict(sd, image_size=512)['positional_embedding']
  want = ref['positional_embedding_32x32']
  assert got.dtype == np.float64 and got.shape == want.shape == (1025, d)
  np.testing.assert_allclose(got, want, atol=1e-13, rtol=0)
  np.testing.assert_array_equal(loaded, got)


def test_text_encoder_small_reference():
  ref = load_reference('text_encoder_small.npz')
  cfg = json.loads(str(ref['config/json']))
  sd = {k[len('text_encoder.'):]: v for k, v in ref.items() if k.startswith('text_encoder.')}
  params = clip_weights.text_params_from_state_dict(sd)
  kw = dict(vocab_size=cfg['vocab_size'], context_length=cfg['context_length'],
            width=cfg['transformer_width'], layers=cfg['transformer_layers'],
            heads=cfg['transformer_heads'], output_dim=cfg['embed_dim'])
  tokens = ref['input/tokens']
  with jax.enable_x64(True):
    got = _text(clip.TextTransformer(dtype=jnp.float64, **kw), params, tokens)
  np.testing.assert_allclose(got, ref['out/text_features'], atol=1e-10, rtol=0)
  np.testing.assert_allclose(_normalize(got), ref['out/text_features_normalized'], atol=1e-10,
                             rtol=0)
  got32 = _text(clip.TextTransformer(**kw), _as(params, np.float32), tokens)
  _assert_rel_max(_normalize(got32), ref['out/text_features_normalized'], 1e-5)


def _reference_backbone(ref, dtype, **kw):
  cfg = json.loads(str(ref['config/json']))
  sd = {k[len('backbone.'):]: v for k, v in ref.items() if k.startswith('backbone.')}
  params = clip_weights.visual_params_from_state_dict(sd, image_size=cfg['input_resolution'])
  module = clip.VisionTransformer(
      patch_size=cfg['patch_size'], width=cfg['width'], layers=cfg['layers'], heads=cfg['heads'],
      output_dim=cfg['output_dim'], image_size=cfg['input_resolution'],
      num_prompt_tokens=cfg['num_tokens'], prompt_depth=cfg['total_d_layer'],
      prompt_dropout=cfg['dropout_p'], double_class_embedding=True, dtype=dtype, **kw)
  return cfg, module, params


@pytest.mark.parametrize('name', ['otseg_small.npz', 'otseg_holdout.npz'])
@pytest.mark.parametrize('dtype', ['float64', 'float32'])
def test_backbone_reference(name, dtype):
  ref = load_reference(name)
  with jax.enable_x64(dtype == 'float64'):
    cfg, module, params = _reference_backbone(ref, jnp.dtype(dtype))
    print(name, {k: cfg[k] for k in ('patch_size', 'width', 'layers', 'heads', 'output_dim',
                                     'input_resolution', 'num_tokens', 'total_d_layer')})
    params = _as(params, dtype)
    got = {}
    # The dumps ran the backbone in train mode (dropout 0) on the batch, in eval mode on the rect.
    for key, image_key, train in (('', 'input/images', True), ('rect_', 'input/image_rect', False)):
      g, d, _ = _vision(module, params, ref[image_key].transpose(0, 2, 3, 1).astype(dtype),
                        train=train)
      got[f'out/backbone_{key}global_embedding'] = _normalize(g)
      got[f'out/backbone_{key}visual_embedding'] = _normalize(d).transpose(0, 3, 1, 2)
  for key, value in got.items():
    if dtype == 'float64':
      np.testing.assert_allclose(value, ref[key], atol=1e-10, rtol=0, err_msg=key)
    else:
      _assert_rel_max(value, ref[key], 1e-5)


def test_prompt_dropout_and_hidden_layers(otseg_holdout):
  # holdout: total_d_layer 2 < layers - 1, so the last block runs with the prompts removed.
  cfg, module, params = _reference_backbone(otseg_holdout, jnp.float32, hidden_layers=(0, 2, 3))
  images = otseg_holdout['input/images'].transpose(0, 2, 3, 1).astype(np.float32)
  g, d, hidden = _vision(module, params, images)
  b, t, m = images.shape[0], cfg['num_tokens'], 36
  assert {i: h.shape for i, h in hidden.items()} == {
      0: (b, 1 + t + m, 48), 2: (b, 1 + t + m, 48), 3: (b, 1 + m, 48)}

  dropped = module.clone(prompt_dropout=0.5, hidden_layers=())
  train = jax.jit(lambda p, x, key: dropped.apply({'params': p}, x, train=True,
                                                  rngs={'dropout': key})[0])
  g_a, g_b = train(params, images, jax.random.key(0)), train(params, images, jax.random.key(1))
  assert np.abs(g_a - g).max() > 1e-3 and np.abs(g_a - g_b).max() > 1e-3


def test_parameter_tree_names(otseg_small):
  """init's tree == the converter's tree (names other modules rely on), prompts included."""
  _, module, params = _reference_backbone(otseg_small, jnp.float32)
  shapes = lambda tree: jax.tree.map(np.shape, tree)
  init = jax.eval_shape(module.init, jax.random.key(0), jnp.zeros((1, 64, 64, 3)))['params']
  assert shapes(init) == shapes(params)
  block = init['transformer']['resblocks_0']
  assert sorted(block) == ['attn', 'ln_1', 'ln_2', 'mlp']
  assert sorted(block['attn']) == ['k_proj', 'out_proj', 'q_proj', 'v_proj']
  assert init['conv1']['kernel'].shape == (16, 16, 3, 64) and 'bias' not in init['conv1']
  assert init['prompt_embeddings'].shape == (1, 3, 64)
  assert init['deep_prompt_embeddings'].shape == (3, 3, 64)

  text = clip.TextTransformer(vocab_size=50, context_length=8, width=32, layers=1, heads=2,
                              output_dim=16)
  tinit = jax.eval_shape(text.init, jax.random.key(0), jnp.zeros((2, 8), jnp.int32))['params']
  assert sorted(tinit) == ['ln_final', 'positional_embedding', 'text_projection', 'token_embedding',
                           'transformer']
  assert tinit['token_embedding']['embedding'].shape == (50, 32)
  assert tinit['text_projection'].shape == (32, 16)


@pytest.mark.parametrize('length,chunk', [(23, 5), (24, 8), (7, 16)])
def test_chunked_attention_is_dense_attention(length, chunk):
  """Forward and all three gradients equal the dense form in float64 (padded last block
  included); a chunk longer than the sequence is one block."""
  with jax.enable_x64(True):
    rng = np.random.default_rng(length)
    q, k, v, cot = (jnp.asarray(rng.normal(size=(2, length, 3, 4))) for _ in range(4))

    def dense(q, k, v):
      weights = jax.nn.softmax(jnp.einsum('bqhc,bkhc->bhqk', q, k), axis=-1)
      return jnp.einsum('bhqk,bkhc->bqhc', weights, v)

    loss = lambda f: lambda q, k, v: jnp.sum(f(q, k, v) * cot)
    chunked = lambda q, k, v: clip.chunked_attention(q, k, v, chunk)
    np.testing.assert_allclose(jax.jit(chunked)(q, k, v), dense(q, k, v), rtol=1e-12, atol=1e-13)
    got = jax.jit(jax.grad(loss(chunked), argnums=(0, 1, 2)))(q, k, v)
    want = jax.grad(loss(dense), argnums=(0, 1, 2))(q, k, v)
    for g, w in zip(got, want):
      np.testing.assert_allclose(g, w, rtol=1e-11, atol=1e-12)


def test_vision_tower_with_chunked_attention_is_the_same_tower():
  kw = dict(patch_size=4, width=16, layers=2, heads=2, output_dim=8, image_size=20,
            num_prompt_tokens=3, prompt_depth=1)
  images = jnp.asarray(np.random.default_rng(0).normal(size=(2, 20, 20, 3)), jnp.float32)
  dense = clip.VisionTransformer(**kw)
  chunked = clip.VisionTransformer(**kw, attention_query_chunk=6)
  params = jax.jit(dense.init)(jax.random.key(0), images)
  assert jax.tree.structure(params) == jax.tree.structure(
      jax.eval_shape(chunked.init, jax.random.key(0), images))
  for a, b in zip(jax.jit(dense.apply)(params, images)[:2],
                  jax.jit(chunked.apply)(params, images)[:2]):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
