"""Checkpoint conversion (`python -m otseg_jax.convert`) and the parameter checkpoint format."""

import json
import os
import pathlib
import subprocess
import sys

from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import clip_testing
from otseg_jax import checkpoint
from otseg_jax import convert
from otseg_jax.models import clip_weights
from otseg_jax.models import otseg

REPO = pathlib.Path(__file__).resolve().parents[1]


def _weights(dump):
  return {k: v for k, v in dump.items() if '/' not in k}


def _write_mmseg_checkpoint(path, state_dict):
  """What mmseg saves: {'meta': ..., 'state_dict': {name: tensor}, 'optimizer': ...}."""
  sd = {k: torch.from_numpy(np.asarray(v)) for k, v in state_dict.items()}
  torch.save({'meta': {'iter': 20000, 'mmseg_version': '0.20.2'}, 'state_dict': sd}, path)


@pytest.fixture(scope='module')
def small_config(otseg_small):
  return convert.config_from_reference(json.loads(str(otseg_small['config/json'])))


def test_cli_converts_an_mmseg_checkpoint(tmp_path, otseg_small, small_config):
  sd = _weights(otseg_small)
  # Real checkpoints also hold the (unused) text tower.
  sd['text_encoder.positional_embedding'] = np.zeros((77, 32))
  sd['text_encoder.ln_final.weight'] = np.ones(32)
  _write_mmseg_checkpoint(tmp_path / 'iter_20000.pth', sd)
  config_path = tmp_path / 'small.json'
  config_path.write_text(str(otseg_small['config/json']))

  result = subprocess.run(
      [sys.executable, '-m', 'otseg_jax.convert', '--from', 'otseg-mmseg',
       '--in', str(tmp_path / 'iter_20000.pth'), '--out', str(tmp_path / 'ckpt'),
       '--config', str(config_path)],
      capture_output=True, text=True, cwd=REPO, env=dict(os.environ, JAX_PLATFORMS='cpu'))
  assert result.returncode == 0, result.stderr
  listed = {line.strip() for line in result.stdout.splitlines() if line.startswith('  ')}
  assert {'text_encoder.positional_embedding', 'text_encoder.ln_final.weight',
          'decode_head.loss_decode.criterion.empty_weight',
          'decode_head.decoder_1.layers.0.self_attn.in_proj_weight',
          'decode_head.decoder_1.layers.1.norm1.bias',
          'decode_head.decoder_1.layers.2.linear1.weight',
          'decode_head.decoder_1.layers.2.multihead_attn.v.weight'} <= listed
  # Exactly the tensors the reference gives no gradient, plus the buffer and the text tower.
  assert listed == set(map(str, otseg_small['info/grad_none_params'])) | {
      'text_encoder.positional_embedding', 'text_encoder.ln_final.weight',
      'decode_head.loss_decode.criterion.empty_weight'}

  params, metadata = checkpoint.load_params(tmp_path / 'ckpt')
  assert metadata['source'] == 'otseg-mmseg' and set(metadata['unused']) == listed
  assert metadata['config']['head']['decoder_layers'] == 3
  want, _ = convert.params_from_state_dict(_weights(otseg_small), small_config)
  flat, flat_want = traverse_util.flatten_dict(params), traverse_util.flatten_dict(want)
  assert flat.keys() == flat_want.keys()
  for k in flat:
    assert flat[k].dtype == np.float32, k
    np.testing.assert_array_equal(flat[k], flat_want[k].astype(np.float32), err_msg=str(k))

  # Same outputs: eval forward of the converted checkpoint against the as-is dump.
  model = otseg.model_from_config(small_config)
  images = jnp.asarray(np.moveaxis(otseg_small['input/images'], 1, -1), jnp.float32)
  text = jnp.asarray(otseg_small['input/text_embeddings'], jnp.float32)
  seen = np.arange(text.shape[0]) < 5
  fast = {'xla_backend_optimization_level': 0, 'xla_llvm_disable_expensive_passes': True}
  probs = lambda p: otseg.eval_probabilities(
      model.apply({'params': p}, images, text, train=False)[0], seen, small_config)
  out = jax.jit(probs, compiler_options=fast)(params)
  ref = otseg_small['out/eval_forward_test']
  assert np.abs(np.moveaxis(np.asarray(out), -1, 1) - ref).max() / np.abs(ref).max() < 2e-3


def test_missing_and_unexpected_tensors_are_listed(otseg_small, small_config):
  sd = _weights(otseg_small)
  for name in ('decode_head.q_proj.bias', 'decode_head.decoder_1.layers.1.norm3.weight',
               'backbone.ln_pre.weight'):
    del sd[name]
  with pytest.raises(clip_weights.CheckpointError) as e:
    convert.params_from_state_dict(sd, small_config)
  for name in ('q_proj.bias', 'decoder_1.layers.1.norm3.weight', 'ln_pre.weight'):
    assert name in str(e.value)

  sd = _weights(otseg_small)
  sd['decode_head.decoder_1.layers.7.linear1.weight'] = np.zeros((4, 4))
  sd['decode_head.input_proj_1.weight'] = np.zeros((4, 4))
  with pytest.raises(clip_weights.CheckpointError) as e:
    convert.params_from_state_dict(sd, small_config)
  assert 'layers.7.linear1.weight' in str(e.value) and 'input_proj_1.weight' in str(e.value)

  # A config with fewer decoder layers than the checkpoint is refused, not silently truncated.
  two = small_config.copy_and_resolve_references()
  two.head.decoder_layers = 2
  with pytest.raises(clip_weights.CheckpointError, match='layers.2'):
    convert.params_from_state_dict(_weights(otseg_small), two)
  with pytest.raises(clip_weights.CheckpointError, match='decode_head'):
    convert.params_from_state_dict({'backbone.proj': np.zeros((2, 2))}, small_config)


def test_positional_grid_resized_to_the_config(otseg_small, small_config):
  config = small_config.copy_and_resolve_references()
  config.image_size = 96  # 4x4 grid in the checkpoint -> 6x6
  params, _ = convert.params_from_state_dict(_weights(otseg_small), config)
  pos = params['backbone']['positional_embedding']
  src = otseg_small['backbone.positional_embedding']
  assert pos.shape == (37, 64)
  np.testing.assert_array_equal(pos[0], src[0])
  np.testing.assert_allclose(pos, clip_weights.resize_positional_embedding(src, (6, 6)))


def test_config_choices(tmp_path, otseg_holdout):
  assert convert.load_model_config('context').image_size == 480
  path = tmp_path / 'holdout.json'
  path.write_text(str(otseg_holdout['config/json']))
  config = convert.load_model_config(str(path))
  assert (config.backbone.patch_size, config.head.decoder_layers, config.num_prompts) == (8, 2, 8)
  ours = tmp_path / 'ours.json'
  ours.write_text(config.to_json())
  assert convert.load_model_config(str(ours)).to_dict() == config.to_dict()
  with pytest.raises(FileNotFoundError, match='no such file'):
    convert.load_model_config(str(tmp_path / 'nope.json'))
  with pytest.raises(ValueError, match='use_proj'):
    convert.config_from_reference(dict(json.loads(str(otseg_holdout['config/json'])),
                                       use_proj=True))


def test_cli_converts_openai_clip(tmp_path):
  model = clip_testing.tiny_openai_clip(seed=3, image_size=32, patch_size=8)
  torch.save(model.state_dict(), tmp_path / 'ViT-T.pt')
  config = otseg.get_config()
  config.image_size = 48  # the 4x4 grid is resized to 6x6
  config.backbone.update(dict(patch_size=8, width=128, layers=2, heads=2, output_dim=24))
  (tmp_path / 'config.json').write_text(config.to_json())
  assert convert.main(['--from', 'openai-clip', '--in', str(tmp_path / 'ViT-T.pt'),
                       '--out', str(tmp_path / 'clip'), '--config',
                       str(tmp_path / 'config.json')]) == 0
  params, metadata = checkpoint.load_params(tmp_path / 'clip')
  assert set(params) == {'backbone', 'text', 'source_positional_embedding'}
  assert metadata['clip_spec']['vision_width'] == 128
  # Every non-prompt backbone leaf of the OTSeg model, with its shape: what a trainer needs.
  want = {k: v.shape for k, v in traverse_util.flatten_dict(convert.param_shapes(config)
                                                            ['backbone']).items()
          if not any('prompt' in p for p in k)}
  got = {k: v.shape for k, v in traverse_util.flatten_dict(params['backbone']).items()}
  assert got == want
  with pytest.raises(ValueError, match='use --from openai-clip'):
    convert.main(['--from', 'hf-clip', '--in', str(tmp_path / 'ViT-T.pt'),
                  '--out', str(tmp_path / 'x')])


def test_converted_clip_loads_as_its_source(tmp_path):
  """`clip_weights.load_clip` of a converted directory: the source's spec and towers, its
  positional grid resized on request like the source's, its tokenizer copied along."""
  model = clip_testing.tiny_openai_clip(seed=4, image_size=32, patch_size=8)
  clip_testing.save_openai_as_hf(model, tmp_path / 'hf')
  (tmp_path / 'hf' / 'vocab.json').write_text('{}')
  (tmp_path / 'model.json').write_text(json.dumps({'image_size': 32}))
  assert convert.main(['--from', 'hf-clip', '--in', str(tmp_path / 'hf'), '--out',
                       str(tmp_path / 'clip'), '--config', str(tmp_path / 'model.json')]) == 0
  assert (tmp_path / 'clip' / 'vocab.json').read_text() == '{}'
  for size in (None, 48):
    spec, towers = clip_weights.load_clip(tmp_path / 'clip', image_size=size)
    want_spec, want = clip_weights.load_clip(tmp_path / 'hf', image_size=size)
    assert spec == want_spec
    got, want = traverse_util.flatten_dict(towers), traverse_util.flatten_dict(want)
    assert got.keys() == want.keys()
    for k in want:
      np.testing.assert_allclose(got[k], want[k], rtol=1e-6, atol=1e-7, err_msg=str(k))
  checkpoint.save_params(tmp_path / 'not_clip', {'decode_head': {'w': np.ones(2)}})
  with pytest.raises(clip_weights.CheckpointError, match='not of CLIP'):
    clip_weights.load_clip(tmp_path / 'not_clip')


def test_checkpoint_round_trip_and_errors(tmp_path):
  params = {'a': {'kernel': np.arange(6, dtype=np.float32).reshape(2, 3)},
            'b': np.ones(4, np.float64), 'c': np.array([1, 2], np.int32)}
  path = checkpoint.save_params(tmp_path / 'ck', params, {'note': 'x'})
  loaded, metadata = checkpoint.load_params(path)
  assert metadata == {'note': 'x'}
  for k, v in traverse_util.flatten_dict(params).items():
    got = traverse_util.flatten_dict(loaded)[k]
    assert got.dtype == v.dtype
    np.testing.assert_array_equal(got, v)
  assert sorted(os.listdir(tmp_path)) == ['ck']  # no temporary directory left behind
  with pytest.raises(FileExistsError, match='overwrite'):
    checkpoint.save_params(path, params)
  checkpoint.save_params(path, {'z': np.zeros(1)}, overwrite=True)
  assert set(checkpoint.load_params(path)[0]) == {'z'}
  assert sorted(os.listdir(tmp_path)) == ['ck']
  with pytest.raises(TypeError):  # metadata must be JSON; nothing is written
    checkpoint.save_params(tmp_path / 'bad', params, {'x': object()})
  assert not (tmp_path / 'bad').exists()
  with pytest.raises(FileNotFoundError, match='not a parameter checkpoint'):
    checkpoint.load_params(tmp_path / 'missing')
  (path / 'metadata.json').write_text('{broken')
  with pytest.raises(ValueError, match='corrupt'):
    checkpoint.load_params(path)


def test_config_json_other_than_a_model_config_is_refused(tmp_path):
  from configs import tiny
  train_config = tmp_path / 'run_config.json'  # what a training workdir holds
  train_config.write_text(tiny.get_config().to_json())
  with pytest.raises(ValueError, match=r"run_config\.json: not a model config.*training run's "
                     r"config\.json: pass --config NAME .*voc\|context\|coco"):
    convert.load_model_config(str(train_config))
  cases = {'{"image_size": 32, "backbone": {"widht": 64}}': 'backbone.widht is no field',
           '{"backbone": 3}': r'backbone \(a section, given a int\)',
           '{"image_size": 32.5}': "Could not override field 'image_size'",
           '[1, 2]': 'holds a list', '{"image_size": ': 'not valid JSON',
           '{"dec_layers": 2}': "a reference config without the field 'layers'"}
  for i, (text, message) in enumerate(cases.items()):
    path = tmp_path / f'c{i}.json'
    path.write_text(text)
    with pytest.raises(ValueError, match=message):
      convert.load_model_config(str(path))
  path.write_text('{"image_size": 32, "backbone": {"width": 64}}')  # some fields: the rest voc's
  config = convert.load_model_config(str(path))
  assert (config.image_size, config.backbone.width, config.backbone.layers) == (32, 64, 12)


def test_converted_clip_is_resized_once_from_the_source_grid(tmp_path):
  """Converted for a 6x6 grid, loaded for 4x4 (the source's) and 5x5: each straight from the
  source's 4x4, not 4 -> 6 -> 4 (which drifts)."""
  model = clip_testing.tiny_openai_clip(seed=6, image_size=32, patch_size=8)
  torch.save(model.state_dict(), tmp_path / 'ViT-T.pt')
  (tmp_path / 'model.json').write_text(json.dumps({'image_size': 48}))
  assert convert.main(['--from', 'openai-clip', '--in', str(tmp_path / 'ViT-T.pt'), '--out',
                       str(tmp_path / 'clip'), '--config', str(tmp_path / 'model.json')]) == 0
  for size in (None, 32, 40, 48):
    spec, towers = clip_weights.load_clip(tmp_path / 'clip', image_size=size)
    want_spec, want = clip_weights.load_clip(tmp_path / 'ViT-T.pt', image_size=size or 48)
    assert spec == want_spec
    np.testing.assert_array_equal(towers['visual']['positional_embedding'],
                                  want['visual']['positional_embedding'], err_msg=str(size))


def test_a_truncated_array_file_is_one_short_error_naming_it(tmp_path):
  path = checkpoint.save_params(tmp_path / 'ck', {'a': np.ones(1000, np.float32)})
  arrays = [f for f in (path / 'params').rglob('*') if f.is_file() and f.parent.name == 'd']
  assert arrays
  for f in arrays:
    f.write_bytes(f.read_bytes()[:50])
  with pytest.raises(ValueError, match='is corrupt or unreadable') as e:
    checkpoint.load_params(path)
  message = str(e.value)
  assert str(path) in message and 'is not valid for value of size 50' in message
  assert '\n' not in message and 'tensorstore_spec' not in message and len(message) < 600, message


def test_tools_never_import_a_method():
  """The converter, parity, the trainer, evaluation, inference and predict reach a method only
  through `config.model.name` (models.get_method): no import of a method module."""
  import ast
  allowed = {'clip', 'clip_weights', 'clip_export', 'ot_layers', 'prompt_learner'}
  for name in ('convert', 'parity', 'trainer', 'evaluate', 'inference', 'predict'):
    tree = ast.parse((REPO / 'otseg_jax' / f'{name}.py').read_text())
    imported = set()
    for node in ast.walk(tree):
      if isinstance(node, ast.Import):
        imported |= {a.name for a in node.names}
      elif isinstance(node, ast.ImportFrom) and node.module:
        imported.add(node.module)
        imported |= {f'{node.module}.{a.name}' for a in node.names}
    methods = sorted(m for m in imported if m.startswith('otseg_jax.models.')
                     and m.split('.')[2] not in allowed)
    assert not methods, f'otseg_jax/{name}.py imports {methods}'
    assert not any(m.split('.')[-1].startswith('otseg') and m != 'otseg_jax' for m in imported), (
        name, sorted(imported))


def test_a_method_without_the_mmseg_hook_is_refused_by_name(tmp_path):
  from tests import linear_probe_method
  config = linear_probe_method.get_config()
  with pytest.raises(ValueError, match=r'tests\.linear_probe_method has no from_mmseg_state_dict'):
    convert.params_from_state_dict({'backbone.proj': np.zeros((2, 2))}, config)
  with pytest.raises(ValueError, match=r"No method 'nope'"):
    convert.load_model_config('voc', method='nope')
  path = tmp_path / 'probe.json'
  path.write_text(config.to_json())  # its "name" picks the method
  assert convert.load_model_config(str(path)).to_dict() == config.to_dict()
  with pytest.raises(SystemExit):  # argparse: not a source
    convert.main(['--from', 'mmsegg', '--in', 'x', '--out', str(tmp_path / 'o')])
  with pytest.raises(ValueError, match=r'has no from_mmseg_state_dict'):
    torch.save({'state_dict': {'backbone.proj': torch.zeros(2, 2)}}, tmp_path / 'x.pth')
    convert.main(['--from', 'mmseg', '--in', str(tmp_path / 'x.pth'), '--out',
                  str(tmp_path / 'o'), '--config', str(path)])
  assert not (tmp_path / 'o').exists()


def test_vitl14_training_config_is_a_converter_config(tmp_path):
  """--config configs/voc12.py:inductive:vitl14: its model (518 crop, patch 14); a patch-14 CLIP
  is converted onto its 37 x 37 grid."""
  config = convert.load_model_config('configs/voc12.py:inductive:vitl14')
  assert (config.image_size, config.backbone.patch_size, config.backbone.width) == (518, 14, 1024)
  assert convert.load_model_config('configs/voc12.py').to_dict() == otseg.get_config().to_dict()
  with pytest.raises(FileNotFoundError, match='nope.py: no such file'):
    convert.load_model_config(str(tmp_path / 'nope.py'))
  model = clip_testing.tiny_openai_clip(seed=2, image_size=28, patch_size=14)
  torch.save(model.state_dict(), tmp_path / 'ViT-T-14.pt')
  assert convert.main(['--from', 'openai-clip', '--in', str(tmp_path / 'ViT-T-14.pt'), '--out',
                       str(tmp_path / 'clip'), '--config',
                       str(REPO / 'configs/voc12.py') + ':inductive:vitl14']) == 0
  params, metadata = checkpoint.load_params(tmp_path / 'clip')
  assert params['backbone']['positional_embedding'].shape == (1 + 37 * 37, 128)
  assert metadata['clip_spec']['image_size'] == [518, 518]
  assert metadata['clip_spec']['patch_size'] == 14
