"""Loading CLIP weights (OpenAI TorchScript / state dict, HF directory) and the tokenizer."""

import dataclasses
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
from otseg_jax.models import clip, clip_weights


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
           for k, s in clip_weights._block_shapes('transformer.resblocks.0.', d, 4 * d).items()},
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
  config['vision_config']['hidden_act'] = 'relu'
  (tmp_path / 'config.json').write_text(json.dumps(config))
  with pytest.raises(clip_weights.CheckpointError, match="hidden_act is 'relu'.*quick_gelu, gelu"):
    clip_weights.load_clip(tmp_path)
  config['vision_config']['hidden_act'] = 'gelu'  # supported, but not beside a quick_gelu text
  (tmp_path / 'config.json').write_text(json.dumps(config))
  with pytest.raises(clip_weights.CheckpointError, match='one activation in both towers'):
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


def test_clip_heads_disagreeing_with_the_config_stop_training(tmp_path):
  """4 heads and 2 heads of one width have the same tensors: only the spec tells them apart."""
  from configs import tiny
  from otseg_jax import trainer
  from otseg_jax.models import otseg
  config = tiny.get_config()  # backbone: patch 8, width 32, 2 layers, 2 heads, output 32
  ct.save_random_hf_clip(tmp_path / 'hf', vision_width=32, vision_layers=2, vision_heads=4,
                         patch_size=8, image_size=32, text_width=32, text_layers=1,
                         text_heads=2, embed_dim=32)
  config.clip = str(tmp_path / 'hf')
  model = otseg.model_from_config(config.model)
  text = np.ones((12, 4, 32), np.float32)
  with pytest.raises(clip_weights.CheckpointError,
                     match=r'heads=2 but the checkpoint has 4\. Set --config\.model\.backbone'):
    trainer.init_params(config, model, text, seed=0)
  config.model.backbone.heads = 4
  trainer.init_params(config, otseg.model_from_config(config.model), text, seed=0)


def test_converted_clip_spec_is_checked_against_its_tensors(tmp_path):
  model = ct.tiny_openai_clip(seed=1)
  torch.save(model.state_dict(), tmp_path / 'sd.pt')
  from otseg_jax import convert
  (tmp_path / 'model.json').write_text(json.dumps({'image_size': 32}))
  assert convert.main(['--from', 'openai-clip', '--in', str(tmp_path / 'sd.pt'), '--out',
                       str(tmp_path / 'clip'), '--config', str(tmp_path / 'model.json')]) == 0
  meta_path = tmp_path / 'clip' / 'metadata.json'
  meta = json.loads(meta_path.read_text())
  assert clip_weights.load_clip(tmp_path / 'clip')[0].vision_layers == 2
  for field, value, message in (('vision_layers', 3, 'vision_layers 3 but the tensors say 2'),
                                ('vision_heads', 3, 'vision_heads 3 does not divide the width 128'),
                                ('context_length', 77, 'context_length 77 but the tensors say 16')):
    spec = dict(meta['clip_spec'], **{field: value})
    meta_path.write_text(json.dumps(dict(meta, clip_spec=spec)))
    with pytest.raises(clip_weights.CheckpointError, match=message):
      clip_weights.load_clip(tmp_path / 'clip')


def _crafted_archive(path, size, stride, numel=4, torchscript=True, storage_key='0',
                     storage_bytes=16):
  """A torch zip checkpoint by hand: one float tensor of `size` / `stride` over a storage of
  `numel` floats in data/`storage_key` holding `storage_bytes` bytes."""
  import collections
  import io
  import pickle
  import zipfile

  class Storage:
    pass

  class Tensor:

    def __reduce__(self):
      return (torch._utils._rebuild_tensor_v2,
              (Storage(), 0, size, stride, False, collections.OrderedDict()))

  class Pickler(pickle.Pickler):

    def persistent_id(self, obj):
      if isinstance(obj, Storage):
        return ('storage', torch.FloatStorage, storage_key, 'cpu', numel)
      return None

  buf = io.BytesIO()
  Pickler(buf, protocol=2).dump(collections.OrderedDict(w=Tensor()))
  with zipfile.ZipFile(path, 'w') as z:
    z.writestr('archive/data.pkl', buf.getvalue())
    z.writestr('archive/data/0', b'\0' * storage_bytes)
    z.writestr('archive/version', '3\n')
    z.writestr('archive/byteorder', 'little')
    if torchscript:
      z.writestr('archive/constants.pkl', pickle.dumps(()))
  return path


@pytest.mark.parametrize('torchscript', [True, False], ids=['torchscript', 'torch.load'])
def test_tensor_larger_than_its_storage_is_refused_before_allocating(tmp_path, torchscript):
  # 16 bytes of storage; the tensors claim 4 MB (zero strides repeat one element) and 149 GiB.
  for size, stride in (((1000, 1000), (0, 0)), ((200_000, 200_000), (0, 0))):
    path = _crafted_archive(tmp_path / 'crafted.pt', size, stride, torchscript=torchscript)
    assert path.stat().st_size < 2000
    with pytest.raises(clip_weights.CheckpointError, match=r'elements but its storage'):
      clip_weights.load_state_dict(path)
  # A tensor that fits its storage still loads.
  path = _crafted_archive(tmp_path / 'ok.pt', (2, 2), (2, 1), torchscript=torchscript)
  np.testing.assert_array_equal(clip_weights.load_state_dict(path)['w'], np.zeros((2, 2)))


def _zip(path, files):
  import zipfile
  with zipfile.ZipFile(path, 'w') as z:
    for name, data in files.items():
      z.writestr(name, data)
  return path


def test_damaged_torchscript_archives_are_one_error_naming_the_file(tmp_path):
  import pickle
  ts = {'archive/constants.pkl': pickle.dumps(()), 'archive/version': '3\n'}
  cases = {
      'garbage.pt': (_zip(tmp_path / 'garbage.pt', {**ts, 'archive/data.pkl': b'\x80\x02garbage'}),
                     'not a readable TorchScript archive'),
      'bad_id.pt': (_crafted_archive(tmp_path / 'bad_id.pt', (2,), (1,), storage_key='7'),
                    "Storage '7' is not in the archive"),
      'short.pt': (_crafted_archive(tmp_path / 'short.pt', (2,), (1,), numel=100),
                   "Storage '0' claims 100 elements of float32; the archive holds 16 bytes"),
  }
  # A damaged central directory: a name flagged UTF-8 that is not.
  bad_dir = _zip(tmp_path / 'bad_dir.pt', {**ts, 'archive/d\u00e4ta.pkl': b''}).read_bytes()
  (tmp_path / 'bad_dir.pt').write_bytes(bad_dir.replace('\u00e4'.encode(), b'\xbd\xbd'))
  cases['bad_dir.pt'] = (tmp_path / 'bad_dir.pt', 'a damaged zip archive')
  for name, (path, message) in cases.items():
    with pytest.raises(clip_weights.CheckpointError, match=message) as e:
      clip_weights.load_clip(path)
    assert name in str(e.value) and '\n' not in str(e.value)


def test_malicious_pickle_is_refused_and_not_run(tmp_path):
  """A data.pkl that calls os.system: refused by the restricted unpickler, nothing executed."""
  import os
  import pickle

  class Evil:

    def __reduce__(self):
      return (os.system, (f'touch {tmp_path}/pwned',))

  for torchscript in (True, False):
    files = {'archive/data.pkl': pickle.dumps(Evil(), protocol=2), 'archive/version': '3\n'}
    if torchscript:
      files['archive/constants.pkl'] = pickle.dumps(())
    path = _zip(tmp_path / f'evil_{"ts" if torchscript else "pt"}.pt', files)
    with pytest.raises(clip_weights.CheckpointError, match=r'evil.*(posix|os)\.system') as e:
      clip_weights.load_state_dict(path)
    # One line, and none of torch's advice to load it with weights_only=False.
    assert '\n' not in str(e.value) and 'False' not in str(e.value), str(e.value)
  assert not (tmp_path / 'pwned').exists()


def test_corrupt_hf_files_are_one_error_naming_the_file(checkpoints, tmp_path):
  import shutil
  _, _, root = checkpoints
  shutil.copytree(root / 'hf', tmp_path / 'hf')
  weights = tmp_path / 'hf' / 'model.safetensors'
  weights.write_bytes(weights.read_bytes()[:100])  # truncated
  with pytest.raises(clip_weights.CheckpointError,
                     match=r'model\.safetensors: not a readable safetensors file'):
    clip_weights.load_clip(tmp_path / 'hf')
  (tmp_path / 'hf' / 'config.json').write_text('{"vision_config": ')
  with pytest.raises(clip_weights.CheckpointError, match=r'config\.json: not valid JSON'):
    clip_weights.load_clip(tmp_path / 'hf')


def test_damaged_sizes_in_json_files_are_one_error(checkpoints, tmp_path):
  """Sizes from config.json / metadata.json are checked before any arithmetic with them."""
  import shutil
  from otseg_jax import convert
  _, _, root = checkpoints
  shutil.copytree(root / 'hf', tmp_path / 'hf')
  config_path = tmp_path / 'hf' / 'config.json'
  config = json.loads(config_path.read_text())
  for section, field, value in (('vision_config', 'patch_size', 0),
                                ('text_config', 'num_hidden_layers', None),
                                ('vision_config', 'layer_norm_eps', 'x'),
                                (None, 'vision_config', 3)):
    broken = json.loads(json.dumps(config))
    (broken[section] if section else broken)[field] = value
    config_path.write_text(json.dumps(broken))
    with pytest.raises(clip_weights.CheckpointError, match=f'{field}'):
      clip_weights.load_clip(tmp_path / 'hf')
  (tmp_path / 'model.json').write_text('{"image_size": 32}')
  assert convert.main(['--from', 'openai-clip', '--in', str(root / 'state_dict.pt'), '--out',
                       str(tmp_path / 'clip'), '--config', str(tmp_path / 'model.json')]) == 0
  meta_path = tmp_path / 'clip' / 'metadata.json'
  meta = json.loads(meta_path.read_text())
  for spec, message in (({}, 'clip_spec is not a CLIP spec'),
                        (dict(meta['clip_spec'], patch_size=0), r'patch_size=0, expected positive'),
                        (dict(meta['clip_spec'], image_size=7), r'clip_spec\.image_size=7')):
    meta_path.write_text(json.dumps(dict(meta, clip_spec=spec)))
    with pytest.raises(clip_weights.CheckpointError, match=message):
      clip_weights.load_clip(tmp_path / 'clip', image_size=48)


def test_backbone_config_must_name_the_checkpoints_mlp_and_activation():
  spec = clip.CLIPSpec(embed_dim=16, image_size=(32, 32), patch_size=8, vision_width=32,
                       vision_layers=2, vision_heads=2, context_length=16, vocab_size=100,
                       text_width=32, text_layers=2, text_heads=2, vision_mlp_dim=96,
                       text_mlp_dim=128, activation='gelu')
  backbone = dict(patch_size=8, width=32, layers=2, heads=2, output_dim=16)
  with pytest.raises(clip_weights.CheckpointError,
                     match=r"mlp_dim=128 but the checkpoint has 96; activation='quick_gelu' but "
                           r"the checkpoint has 'gelu'"):
    clip_weights.check_backbone_config(spec, backbone, 'ckpt')
  clip_weights.check_backbone_config(spec, dict(backbone, mlp_dim=96, activation='gelu'), 'ckpt')
  # 0 means 4 * width on both sides.
  clip_weights.check_backbone_config(
      dataclasses.replace(spec, vision_mlp_dim=0, activation='quick_gelu'),
      dict(backbone, mlp_dim=128), 'ckpt')


def _open_clip_checkpoint(mlp_ratio=2, seed=7):
  """A tiny OpenCLIP-layout state dict (OpenAI names; GELU, 4 vision heads of 16, 2 text heads
  of 32, MLP 2x) and its open_clip_config.json, as `open_clip.create_model` + the hub write them."""
  model = ct.OpenAICLIP(embed_dim=24, image_size=32, patch_size=8, vision_width=64,
                        vision_layers=2, context_length=16, vocab_size=100, text_width=64,
                        text_layers=2)
  sd = {k: v.detach().clone() for k, v in ct.redraw_(model, seed).state_dict().items()}
  gen = torch.Generator().manual_seed(seed)
  for k in [k for k in sd if k.endswith('mlp.c_fc.weight')]:  # MLP width from c_fc, not 4 x
    d, p = sd[k].shape[1], k[:-len('c_fc.weight')]
    m = mlp_ratio * d
    sd[p + 'c_fc.weight'] = torch.randn(m, d, generator=gen) / d**0.5
    sd[p + 'c_fc.bias'] = 0.02 * torch.randn(m, generator=gen)
    sd[p + 'c_proj.weight'] = torch.randn(d, m, generator=gen) / m**0.5
  sd['logit_scale'] = torch.tensor(4.6)
  config = {'model_cfg': {
      'embed_dim': 24, 'quick_gelu': False,
      'vision_cfg': {'image_size': 32, 'layers': 2, 'width': 64, 'head_width': 16,
                     'patch_size': 8, 'mlp_ratio': mlp_ratio},
      'text_cfg': {'context_length': 16, 'vocab_size': 100, 'width': 64, 'heads': 2,
                   'layers': 2, 'mlp_ratio': mlp_ratio}},
      'preprocess_cfg': {'mean': [0.48145466, 0.4578275, 0.40821073],
                         'std': [0.26862954, 0.26130258, 0.27577711]}}
  return sd, config


def test_open_clip_files_load_and_match_transformers(tmp_path):
  """OpenCLIP's .bin and .safetensors (directory or file + JSON beside it): both towers against
  transformers' CLIPModel holding the same weights (its own GELU, heads and MLP), float32 1e-5."""
  import transformers
  sd, config = _open_clip_checkpoint()
  for name in ('bin', 'st'):
    (tmp_path / name).mkdir()
    (tmp_path / name / 'open_clip_config.json').write_text(json.dumps(config))
  torch.save(sd, tmp_path / 'bin' / 'open_clip_pytorch_model.bin')
  safetensors.numpy.save_file({k: v.numpy() for k, v in sd.items()},
                              str(tmp_path / 'st' / 'open_clip_model.safetensors'))
  loaded = [clip_weights.load_clip(tmp_path / 'bin'), clip_weights.load_clip(tmp_path / 'st'),
            clip_weights.load_clip(tmp_path / 'bin' / 'open_clip_pytorch_model.bin')]
  spec = loaded[0][0]
  assert all(s == spec for s, _ in loaded)
  assert (spec.vision_heads, spec.text_heads, spec.activation) == (4, 2, 'gelu')
  assert (spec.vision_mlp_dim, spec.text_mlp_dim) == (128, 128)
  trees = [_flat(p) for _, p in loaded]
  for k in trees[0]:
    np.testing.assert_array_equal(trees[0][k], trees[1][k], err_msg=k)
    np.testing.assert_array_equal(trees[0][k], trees[2][k], err_msg=k)

  hf = transformers.CLIPModel(ct.tiny_hf_config(
      vision_width=64, vision_heads=4, text_width=64, text_heads=2, hidden_act='gelu',
      mlp_ratio=2)).eval()
  missing, unexpected = hf.load_state_dict(ct.openai_to_hf_state_dict(sd), strict=False)
  assert not unexpected and all('position_ids' in m for m in missing), (missing, unexpected)
  rng = np.random.default_rng(2)
  images = rng.normal(size=(2, 3, 32, 32)).astype(np.float32)
  tokens = ct.random_tokens(rng, 3, 16, 100)
  with torch.no_grad():
    g_hf, d_hf = ct.hf_image_features(hf, torch.from_numpy(images))
    t_hf = hf.get_text_features(input_ids=torch.from_numpy(tokens))
    t_hf = getattr(t_hf, 'pooler_output', t_hf)
  params = loaded[0][1]
  g, d, _ = jax.jit(spec.vision_tower().apply)({'params': params['visual']},
                                              images.transpose(0, 2, 3, 1))
  t = jax.jit(spec.text_tower().apply)({'params': params['text']}, tokens)
  for got, want in ((g, g_hf), (d, d_hf), (t, t_hf)):
    want = want.numpy()
    assert np.abs(np.asarray(got) - want).max() <= 1e-5 * np.abs(want).max()

  # The quick_gelu flag of the OpenAI-trained configs.
  config['model_cfg']['quick_gelu'] = True
  (tmp_path / 'bin' / 'open_clip_config.json').write_text(json.dumps(config))
  assert clip_weights.load_clip(tmp_path / 'bin')[0].activation == 'quick_gelu'


def test_open_clip_problems_are_named(tmp_path):
  sd, config = _open_clip_checkpoint(mlp_ratio=4)
  (tmp_path / 'lone').mkdir()
  torch.save(sd, tmp_path / 'lone' / 'open_clip_pytorch_model.bin')
  with pytest.raises(FileNotFoundError, match='needs its open_clip_config.json beside it'):
    clip_weights.load_clip(tmp_path / 'lone' / 'open_clip_pytorch_model.bin')
  with pytest.raises(FileNotFoundError, match='needs its open_clip_config.json'):
    clip_weights.load_open_clip(tmp_path / 'lone')
  cases = [
      ({k: v for k, v in sd.items() if k != 'visual.ln_post.bias'}, config,
       r'missing \(1\): ln_post\.bias'),
      ({**sd, 'visual.transformer.resblocks.1.attn.out_proj.weight': torch.zeros(64, 32)}, config,
       r'transformer\.resblocks\.1\.attn\.out_proj\.weight has shape \(64, 32\), expected '
       r'\(64, 64\)'),
      (sd, {'model_cfg': dict(config['model_cfg'], vision_cfg=dict(
          config['model_cfg']['vision_cfg'], width=768))},
       r'vision_cfg\.width=768 but the tensors say 64'),
      (sd, {'model_cfg': dict(config['model_cfg'], text_cfg=dict(
          config['model_cfg']['text_cfg'], hf_model_name='roberta-base'))},
       r"not an OpenAI-style CLIP ViT this port can run: text_cfg\.hf_model_name='roberta-base'"),
      (sd, {'preprocess_cfg': {}}, 'no model_cfg with vision_cfg and text_cfg'),
  ]
  for i, (state, cfg, message) in enumerate(cases):
    d = tmp_path / f'c{i}'
    d.mkdir()
    torch.save(state, d / 'open_clip_pytorch_model.bin')
    (d / 'open_clip_config.json').write_text(json.dumps(cfg))
    with pytest.raises(clip_weights.CheckpointError, match=message):
      clip_weights.load_clip(d)


def test_convert_from_open_clip(tmp_path):
  from otseg_jax import convert
  sd, config = _open_clip_checkpoint()
  (tmp_path / 'oc').mkdir()
  torch.save(sd, tmp_path / 'oc' / 'open_clip_pytorch_model.bin')
  (tmp_path / 'oc' / 'open_clip_config.json').write_text(json.dumps(config))
  (tmp_path / 'oc' / 'vocab.json').write_text('{}')
  (tmp_path / 'model.json').write_text(json.dumps({'image_size': 48}))
  assert convert.main(['--from', 'open-clip', '--in', str(tmp_path / 'oc' /
                                                          'open_clip_pytorch_model.bin'),
                       '--out', str(tmp_path / 'clip'), '--config',
                       str(tmp_path / 'model.json')]) == 0
  assert (tmp_path / 'clip' / 'vocab.json').is_file()  # the tokenizer beside the weights
  spec, towers = clip_weights.load_clip(tmp_path / 'clip', image_size=48)
  want_spec, want = clip_weights.load_clip(tmp_path / 'oc', image_size=48)
  assert spec == want_spec and spec.activation == 'gelu' and spec.vision_heads == 4
  got, want = _flat(towers), _flat(want)
  assert got.keys() == want.keys()
  for k in want:
    np.testing.assert_array_equal(got[k], want[k], err_msg=k)
