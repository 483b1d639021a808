"""Loading CLIP weights (OpenAI TorchScript / state dict, HF directory) and the tokenizer."""

import json
import warnings

import jax
import numpy as np
import pytest
import safetensors.numpy
import torch

import clip_testing as ct
from conftest import shared_path
from otseg_jax import tokenizer as tokenizer_lib
from otseg_jax.models import clip_weights


@pytest.fixture(scope='module')
def checkpoints(tmp_path_factory):
  """One tiny OpenAI-layout CLIP as a traced TorchScript archive, a state dict and an HF dir."""
  root = tmp_path_factory.mktemp('clip_ckpts')
  model = ct.tiny_openai_clip(seed=5)
  rng = np.random.default_rng(0)
  example = (torch.randn(1, 3, 32, 32), torch.from_numpy(ct.random_tokens(rng, 2, 16, 100)))
  # OpenAI published traced TorchScript archives; trace + save writes the same format.
  with warnings.catch_warnings():
    warnings.simplefilter('ignore')  # TracerWarning about python ints in the reference model
    torch.jit.trace(model, example, check_trace=False).save(root / 'ViT-T.pt')
  torch.save(model.state_dict(), root / 'state_dict.pt')
  hf = ct.save_openai_as_hf(model, root / 'hf')
  return model, hf, root


def _flat(tree):
  return {jax.tree_util.keystr(k): np.asarray(v)
          for k, v in jax.tree_util.tree_leaves_with_path(tree)}


def test_torchscript_archive_read_without_running_code(checkpoints):
  _, _, root = checkpoints
  got = clip_weights.read_torchscript_archive(root / 'ViT-T.pt')
  want = torch.jit.load(root / 'ViT-T.pt', map_location='cpu').state_dict()
  assert sorted(got) == sorted(want)
  for k, v in want.items():
    np.testing.assert_array_equal(got[k], v.numpy(), err_msg=k)


def test_openai_and_hf_sources_give_the_same_tree(checkpoints):
  _, _, root = checkpoints
  loaded = [clip_weights.load_clip(root / name) for name in ('ViT-T.pt', 'state_dict.pt', 'hf')]
  specs = [s for s, _ in loaded]
  assert specs[0] == specs[1] == specs[2]
  assert specs[0].vision_heads == 2 and specs[0].text_heads == 1  # OpenAI's width // 64
  trees = [_flat(p) for _, p in loaded]
  assert sorted(trees[0]) == sorted(trees[1]) == sorted(trees[2])
  for k in trees[0]:
    assert trees[0][k].dtype == np.float32, k
    np.testing.assert_array_equal(trees[0][k], trees[1][k], err_msg=k)
    np.testing.assert_array_equal(trees[0][k], trees[2][k], err_msg=k)


def test_openai_numbers_match_torch_and_hf(checkpoints):
  model, hf, root = checkpoints
  spec, params = clip_weights.load_clip(root / 'ViT-T.pt')
  rng = np.random.default_rng(1)
  images = rng.normal(size=(2, 3, 32, 32)).astype(np.float32)
  tokens = ct.random_tokens(rng, 3, 16, 100)
  with torch.no_grad():
    g_oa, d_oa = model.visual(torch.from_numpy(images))
    t_oa = model.encode_text(torch.from_numpy(tokens))
    g_hf, d_hf = ct.hf_image_features(hf, torch.from_numpy(images))
  g, d, _ = jax.jit(spec.vision_tower().apply)({'params': params['visual']},
                                              images.transpose(0, 2, 3, 1))
  t = jax.jit(spec.text_tower().apply)({'params': params['text']}, tokens)
  for got, want in ((g, g_oa), (d, d_oa), (t, t_oa), (g, g_hf), (d, d_hf)):
    want = want.numpy()
    assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()


def test_half_precision_checkpoint_becomes_float32(checkpoints, tmp_path):
  model, _, root = checkpoints
  torch.save({k: v.half() for k, v in model.state_dict().items()}, tmp_path / 'fp16.pt')
  _, params = clip_weights.load_clip(tmp_path / 'fp16.pt')
  _, full = clip_weights.load_clip(root / 'state_dict.pt')
  half, full = _flat(params), _flat(full)
  for k in full:
    assert half[k].dtype == np.float32, k
    np.testing.assert_allclose(half[k], full[k], rtol=1e-3, atol=1e-3)


def test_missing_paths_are_explained(tmp_path):
  with pytest.raises(FileNotFoundError, match='no such file or directory'):
    clip_weights.load_clip(tmp_path / 'nope' / 'ViT-B-16.pt')
  with pytest.raises(FileNotFoundError, match='config.json'):
    clip_weights.load_clip(tmp_path)
  (tmp_path / 'config.json').write_text(json.dumps(ct.tiny_hf_config().to_dict()))
  with pytest.raises(FileNotFoundError, match='model.safetensors'):
    clip_weights.load_clip(tmp_path)
  with pytest.raises(FileNotFoundError, match='no tokenizer'):
    tokenizer_lib.load_tokenizer(tmp_path)


def test_openai_checkpoint_problems_in_one_error(checkpoints, tmp_path):
  model, _, _ = checkpoints
  sd = dict(model.state_dict())
  del sd['visual.ln_post.bias'], sd['transformer.resblocks.1.mlp.c_fc.bias']
  sd['ln_final.weight'] = torch.zeros(63)
  sd['visual.extra.weight'] = torch.zeros(3)
  torch.save(sd, tmp_path / 'bad.pt')
  with pytest.raises(clip_weights.CheckpointError) as e:
    clip_weights.load_clip(tmp_path / 'bad.pt')
  msg = str(e.value)
  for text in ('visual weights', 'missing (1): ln_post.bias', 'unexpected (1): extra.weight',
               'text weights', 'transformer.resblocks.1.mlp.c_fc.bias',
               'ln_final.weight has shape (63,), expected (64,)', 'Fix:'):
    assert text in msg, (text, msg)


def test_vpt_prompt_tensors_are_checked():
  d = 8
  sd = {'conv1.weight': np.zeros((d, 3, 4, 4)), 'class_embedding': np.zeros(d),
        'positional_embedding': np.zeros((5, d)), 'proj': np.zeros((d, 4)),
        **{k: np.zeros(s)
           for k, s in clip_weights._block_shapes('transformer.resblocks.0.', d).items()},
        **{f'{n}.{w}': np.ones(d) for n in ('ln_pre', 'ln_post') for w in ('weight', 'bias')},
        'prompt_embeddings': np.zeros((1, 3, d)), 'deep_prompt_embeddings': np.zeros((2, 4, d)),
        'prompt_proj.weight': np.zeros((d, d))}
  with pytest.raises(clip_weights.CheckpointError) as e:
    clip_weights.visual_params_from_state_dict(sd)
  msg = str(e.value)
  assert 'prompt_proj.bias' in msg and 'prompt_norm.weight' in msg
  assert 'deep_prompt_embeddings has shape (2, 4, 8), expected (2, 3, 8)' in msg


@pytest.mark.parametrize('convert,sd,named', [
    (clip_weights.visual_params_from_state_dict,
     {'conv1.weight': np.zeros((8, 3, 4)), 'positional_embedding': np.zeros((5, 8))},
     ('visual weights', 'conv1.weight, proj missing or not of rank 4, 2', 'conv1.weight, ')),
    (clip_weights.text_params_from_state_dict,
     {'visual.proj': np.zeros((8, 4)), 'text_projection': np.zeros(8)},
     ('text weights', 'token_embedding.weight, positional_embedding, text_projection missing',
      'visual.proj')),
])
def test_unrecognisable_state_dict_names_what_is_missing(convert, sd, named):
  with pytest.raises(clip_weights.CheckpointError, match='cannot infer the architecture') as e:
    convert(sd)
  for text in (*named, 'Fix:'):
    assert text in str(e.value), (text, str(e.value))


def test_hf_checkpoint_problems_in_one_error(checkpoints, tmp_path):
  _, _, root = checkpoints
  for name in ('config.json',):
    (tmp_path / name).write_bytes((root / 'hf' / name).read_bytes())
  sd = safetensors.numpy.load_file(root / 'hf' / 'model.safetensors')
  del sd['vision_model.encoder.layers.0.self_attn.k_proj.bias']
  sd['text_projection.weight'] = sd['text_projection.weight'][:, :5]
  sd['vision_model.head.weight'] = np.zeros(2, np.float32)
  safetensors.numpy.save_file(sd, tmp_path / 'model.safetensors')
  with pytest.raises(clip_weights.CheckpointError) as e:
    clip_weights.load_clip(tmp_path)
  msg = str(e.value)
  for text in ('missing (1): vision_model.encoder.layers.0.self_attn.k_proj.bias',
               'unexpected (1): vision_model.head.weight',
               'text_projection.weight has shape (24, 5), expected (24, 64)'):
    assert text in msg, (text, msg)


def test_unsupported_hf_architecture_is_refused(tmp_path):
  config = ct.tiny_hf_config().to_dict()
  config['vision_config']['hidden_act'] = 'gelu'
  (tmp_path / 'config.json').write_text(json.dumps(config))
  with pytest.raises(clip_weights.CheckpointError, match='quick_gelu'):
    clip_weights.load_clip(tmp_path)


# ----------------------------------------------------------------------------------------------
# Tokenizer, offline from OpenAI's merge list.


@pytest.fixture(scope='module')
def tokenizer(tmp_path_factory):
  directory = ct.write_clip_tokenizer_files(tmp_path_factory.mktemp('tok'),
                                            shared_path('clip_bpe', 'bpe_simple_vocab_16e6.txt.gz'))
  return tokenizer_lib.load_tokenizer(directory)


def test_tokenize_known_ids(tokenizer):
  ids = tokenizer_lib.tokenize(tokenizer, ['a photo of a cat.', 'A  PHOTO of a cat.', ''])
  assert ids.shape == (3, 77) and ids.dtype == np.int32
  np.testing.assert_array_equal(ids[0, :8], [49406, 320, 1125, 539, 320, 2368, 269, 49407])
  np.testing.assert_array_equal(ids[0], ids[1])  # lower-cased, whitespace collapsed
  np.testing.assert_array_equal(ids[2, :2], [ct.SOT, ct.EOT])
  # Padding is EOT; the first maximum (argmax pooling) is the real EOT.
  assert (ids[0, 8:] == ct.EOT).all() and ids[0].argmax() == 7


def test_tokenize_truncates_with_eot_last(tokenizer):
  ids = tokenizer_lib.tokenize(tokenizer, ['dog ' * 200])
  assert ids.shape == (1, 77) and ids[0, 0] == ct.SOT and ids[0, -1] == ct.EOT
  assert ids[0].argmax() == 76
  assert tokenizer_lib.tokenize(tokenizer, []).shape == (0, 77)


def test_tokenizer_source(tmp_path):
  (tmp_path / 'clip').mkdir()
  for name in ('vocab.json', 'merges.txt'):
    (tmp_path / 'clip' / name).write_text('')
  (tmp_path / 'ViT-B-16.pt').write_bytes(b'')
  source = tokenizer_lib.tokenizer_source
  assert source(tmp_path / 'clip') == str(tmp_path / 'clip')
  assert source(tmp_path / 'clip', 'my/tokenizer') == 'my/tokenizer'
  assert source('openai/clip-vit-large-patch14') == 'openai/clip-vit-large-patch14'
  assert source(tmp_path / 'ViT-B-16.pt') == tokenizer_lib.DEFAULT_TOKENIZER
