"""Checkpoint conversion into our parameter tree.

  python -m otseg_jax.convert --from mmseg --in iter_20000.pth --out ckpt/voc [--config voc]
  python -m otseg_jax.convert --from openai-clip --in ViT-B-16.pt --out ckpt/clip [--config voc]
  python -m otseg_jax.convert --from hf-clip --in openai/clip-vit-base-patch16 --out ckpt/clip
  python -m otseg_jax.convert --from open-clip --in DIR_OR_open_clip_pytorch_model.bin --out ckpt/clip

The method is `config.model.name` of `--config` (default otseg); the converter never names one.
--from mmseg (or METHOD-mmseg, e.g. otseg-mmseg, which also picks the method): the authors' mmseg
  checkpoint (`state_dict`), mapped by the method's optional `from_mmseg_state_dict(state_dict,
  config)` hook (OTSeg's: `backbone.*`, `decode_head.*`, `text_encoder.*`, every tensor mapped
  by name, rename + transpose, the positional grid resized to the config's; otseg_mmseg.py).
  Tensors the model never uses are listed and skipped; a missing or unexpected tensor is an error
  that names it. The tree is checked against the model's own (`param_shapes`).
--from openai-clip / hf-clip / open-clip: CLIP ViT weights (an OpenAI .pt, an HF directory or
  hub id, an OpenCLIP `open_clip_pytorch_model.bin` / `.safetensors` with its
  `open_clip_config.json`) read by `clip_weights.load_clip`; writes {'backbone': image tower,
  'text': text tower} with the positional grid resized for the config, the source's own
  positional embedding beside them (loading for another size resizes that, once) and the CLIP
  spec in the metadata. A trainer initialises its CLIP towers (`config.model.clip_towers`) from
  it and the text tower computes the text embeddings. A source directory's tokenizer files are
  copied beside them, so the output is a complete `config.clip` for train.py.
--config: a name of the method's `get_config` (otseg: voc [default], context, coco), a training
  config file with its argument (configs/voc12.py:inductive:vitl14 for ViT-L/14: its `model`), or
  a .json file: either a model config (`ConfigDict.to_json()`
  of such a config, or some of its fields, e.g. {"image_size": 224}, the rest from the method's
  default; its "name" picks the method) or the `config/json` of a reference dump
  (../shared/reference, through the method's optional `config_from_reference` hook). Any other
  JSON (e.g. a training run's config.json) is refused. It fixes the positional grid and the
  prompt shapes.

Files are read by `clip_weights.load_state_dict`: torch only inside it, with `weights_only=True`
(TorchScript archives and .safetensors without torch).
"""

import argparse
import dataclasses
import functools
from collections.abc import Mapping
import json
import pathlib
import sys
import types
from typing import Any

from flax import traverse_util
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from otseg_jax import checkpoint
from otseg_jax import cli
from otseg_jax import image_ops
from otseg_jax import models
from otseg_jax.models import clip_weights

# The method of a --config given by name, or of a .json without "name".
DEFAULT_METHOD = 'otseg'
TOKENIZER_FILES = ('vocab.json', 'merges.txt', 'tokenizer.json', 'tokenizer_config.json',
                   'special_tokens_map.json')
CLIP_SOURCES = ('openai-clip', 'hf-clip', 'open-clip')


def _method(name: str) -> types.ModuleType:
  try:
    return models.get_method(name)
  except ModuleNotFoundError as e:
    raise ValueError(f'No method {name!r} (config.model.name): otseg_jax.models.{name} or a '
                     f'dotted module path ({e}).') from e


def _hook(method: types.ModuleType, name: str, what: str):
  """A method's optional hook (otseg_jax/models/__init__.py), or a clear error."""
  fn = getattr(method, name, None)
  if fn is None:
    raise ValueError(f'Method {method.__name__} has no {name}(): it cannot {what}. Add the '
                     'hook to its module (otseg_jax/models/__init__.py lists it).')
  return fn


def param_shapes(config: ml_collections.ConfigDict) -> dict:
  """The parameter tree of `config`'s method ({'backbone': ..., 'decode_head': ...} for OTSeg) as
  ShapeDtypeStructs, without compute."""
  return _param_shapes(config.to_json())


@functools.lru_cache(maxsize=8)
def _param_shapes(config_json: str) -> dict:
  # Tracing the whole model takes seconds; parity converts weights and gradients per config.
  config = ml_collections.ConfigDict(json.loads(config_json))
  model = _method(config.name).model_from_config(config)
  s = config.image_size
  images = jax.ShapeDtypeStruct((1, s, s, 3), jnp.float32)
  if config.get('text', 'embeddings') == 'tokens':  # (K, L) token ids for a prompt learner
    text = jax.ShapeDtypeStruct((1, 77), jnp.int32)
  else:  # (K, N, C) embeddings
    text = jax.ShapeDtypeStruct((1, config.num_prompts, config.backbone.output_dim), jnp.float32)
  variables = jax.eval_shape(lambda x, t: models.init(model, jax.random.key(0), x, t),
                             images, text)
  return variables['params']


def _check_against(params: dict, expected: dict) -> None:
  got = traverse_util.flatten_dict(params)
  want = traverse_util.flatten_dict(expected)
  missing = sorted('/'.join(k) for k in want.keys() - got.keys())
  extra = sorted('/'.join(k) for k in got.keys() - want.keys())
  wrong = sorted(f'{"/".join(k)}: {got[k].shape} vs {want[k].shape}'
                 for k in want.keys() & got.keys() if tuple(got[k].shape) != tuple(want[k].shape))
  problems = []
  if missing:
    problems.append(f'missing parameters {missing}')
  if extra:
    problems.append(f'unexpected parameters {extra}')
  if wrong:
    problems.append(f'shape mismatches (checkpoint vs config) {wrong}')
  if problems:
    raise clip_weights.CheckpointError(
        'The converted checkpoint does not fit the model config: '
                     + '; '.join(problems) + '. Pick the --config that matches the checkpoint.')


def params_from_state_dict(state_dict: Mapping[str, np.ndarray],
                           config: ml_collections.ConfigDict) -> tuple[dict, list[str]]:
  """The method's params from the authors' mmseg state dict, checked against its model.

  Args:
    state_dict: torch names -> numpy arrays in PyTorch layouts (dtypes kept).
    config: the model config; `config.name` picks the method, whose `from_mmseg_state_dict`
      hook maps the tensors (the config fixes the grid and the number of layers).

  Returns:
    (params matching `param_shapes(config)`, sorted names of the tensors the model never uses).
  """
  convert = _hook(_method(config.name), 'from_mmseg_state_dict', 'read mmseg checkpoints')
  params, unused = convert(state_dict, config)
  _check_against(params, param_shapes(config))
  return params, unused


# ---------------------------------------------------------------------------------------------
# Configs.


def config_from_reference(ref: Mapping[str, Any],
                          method: str = DEFAULT_METHOD) -> ml_collections.ConfigDict:
  """Model config from a reference dump's `config/json` (../shared/reference/README.md), by the
  method's `config_from_reference` hook."""
  return _hook(_method(method), 'config_from_reference', 'read reference dumps')(ref)


def _unknown_fields(data: Mapping[str, Any], known: Mapping[str, Any], prefix: str = '') -> list:
  out = []
  for k, v in data.items():
    if k not in known:
      out.append(prefix + k)
    elif isinstance(known[k], Mapping):
      if not isinstance(v, Mapping):
        out.append(f'{prefix}{k} (a section, given a {type(v).__name__})')
      else:
        out += _unknown_fields(v, known[k], f'{prefix}{k}.')
  return out


def _training_config(file: str, arg: str | None) -> ml_collections.ConfigDict:
  """`get_config(arg)` of a training config file (configs/voc12.py:inductive:vitl14), as train.py
  reads it."""
  import importlib.util  # pylint: disable=g-import-not-at-top
  path = pathlib.Path(file).expanduser()
  if not path.is_file():
    raise FileNotFoundError(f'--config {file}: no such file.')
  spec = importlib.util.spec_from_file_location(f'_convert_config_{path.stem}', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config(arg)
  if 'model' not in config:
    raise ValueError(f'--config {file}: its get_config() has no model section.')
  return config


def load_model_config(name_or_path: str, method: str = DEFAULT_METHOD) -> ml_collections.ConfigDict:
  """`get_config(NAME)` of `method`, the `model` of a training config file (`configs/voc12.py`,
  `configs/voc12.py:inductive:vitl14`), or a .json file: a model config (all or some of its fields,
  the rest from the default of its "name" or `method`) or a reference dump's `config/json`.
  Anything else is refused: a training run's config.json, say, would otherwise be merged field by
  field over the default and silently ignored."""
  file, _, arg = name_or_path.partition(':')
  if file.endswith('.py'):
    return _training_config(file, arg or None).model
  path = pathlib.Path(name_or_path)
  if path.suffix != '.json':
    return _method(method).get_config(name_or_path)
  if not path.is_file():
    raise FileNotFoundError(f'--config {name_or_path}: no such file.')
  try:
    data = json.loads(path.read_text())
  except (ValueError, UnicodeDecodeError) as e:
    raise ValueError(f'--config {name_or_path}: not valid JSON ({e}).') from e
  if not isinstance(data, dict):
    raise ValueError(f'--config {name_or_path}: holds a {type(data).__name__}, expected a model '
                     'config (a JSON object).')
  if 'dec_layers' in data:  # A reference dump's config.
    try:
      return config_from_reference(data, method)
    except KeyError as e:
      raise ValueError(f'--config {name_or_path}: a reference config without the field {e}.') from e
  if isinstance(data.get('name'), str):
    method = data['name']
  config = _method(method).get_config()
  unknown = _unknown_fields(data, config.to_dict())
  if unknown:
    hint = (" It looks like a training run's config.json: pass --config NAME (a name the "
            "method's get_config takes, e.g. voc|context|coco for otseg), or a file with its "
            "'model' section alone." if 'model' in data else '')
    raise ValueError(f'--config {name_or_path}: not a model config, {", ".join(unknown)} '
                     f'{"is" if len(unknown) == 1 else "are"} no field of {method}.get_config() '
                     f'(fields: {", ".join(config)}).{hint}')
  try:
    config.update(data)
  except TypeError as e:  # ConfigDict's typed fields: e.g. a float for image_size
    raise ValueError(f'--config {name_or_path}: {e}.') from e
  return config


# ---------------------------------------------------------------------------------------------
# Files.


def _cast(params: Any, dtype: str | None) -> Any:
  if dtype is None:
    return params
  return jax.tree.map(
      lambda x: x.astype(dtype) if np.issubdtype(x.dtype, np.floating) else x, params)


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(
      prog='python -m otseg_jax.convert', description=__doc__,
      formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--from', dest='source', required=True, metavar='SOURCE',
                      help='mmseg (or METHOD-mmseg, e.g. otseg-mmseg) | ' + ' | '.join(CLIP_SOURCES))
  parser.add_argument('--in', dest='input', required=True,
                      help='checkpoint file (or HF model directory / name for hf-clip, an '
                      'OpenCLIP directory for open-clip)')
  parser.add_argument('--out', required=True, help='output checkpoint directory')
  parser.add_argument('--config', default='voc',
                      help="model config: a name of the method's get_config (otseg: voc | "
                      'context | coco) | configs/voc12.py[:inductive:vitl14] (its model) | '
                      'path/to/config.json')
  parser.add_argument('--method', default=None,
                      help=f'config.model.name of a --config given by name (default '
                      f'{DEFAULT_METHOD}; METHOD-mmseg sets it too)')
  parser.add_argument('--dtype', default='float32',
                      choices=['float32', 'bfloat16', 'float16', 'float64', 'keep'],
                      help="stored float dtype ('keep' leaves the source dtype)")
  parser.add_argument('--overwrite', action='store_true')
  args = parser.parse_args(argv)
  mmseg = args.source == 'mmseg' or args.source.endswith('-mmseg')
  if not (mmseg or args.source in CLIP_SOURCES):
    parser.error(f'argument --from: invalid choice {args.source!r} (choose mmseg, METHOD-mmseg, '
                 f'{", ".join(CLIP_SOURCES)})')
  method = args.method
  if args.source.endswith('-mmseg'):
    named = args.source[:-len('-mmseg')]
    if method not in (None, named):
      parser.error(f'--from {args.source} names the method {named!r}, --method says {method!r}.')
    method = named
  method = method or DEFAULT_METHOD

  config = load_model_config(args.config, method)
  dtype = None if args.dtype == 'keep' else args.dtype
  metadata = {'source': args.source, 'input': str(args.input), 'config': config.to_dict()}
  extra_files = []
  if mmseg:
    params, unused = params_from_state_dict(clip_weights.load_state_dict(args.input), config)
    metadata['unused'] = unused
    print(f'{len(unused)} tensor(s) not used by the model:')
    for name in unused:
      print(f'  {name}')
  else:
    path = pathlib.Path(args.input).expanduser()
    if args.source == 'openai-clip' and not path.is_file():
      raise FileNotFoundError(f'--from openai-clip: {path} is not a file (an OpenAI CLIP .pt).')
    if args.source == 'hf-clip' and path.is_file():
      raise ValueError(f'--from hf-clip: {path} is a file; pass an HF CLIP directory '
                       "(config.json + model.safetensors) or a hub id, or use --from openai-clip.")
    if args.source == 'open-clip':
      spec, towers = clip_weights.load_open_clip(path)  # the source's own grid
    else:
      spec, towers = clip_weights.load_clip(args.input)
    source_pos = towers['visual']['positional_embedding']
    visual = dict(towers['visual'], positional_embedding=clip_weights.positional_embedding_for(
        source_pos, spec.patch_size, config.image_size))
    params = {'backbone': visual, 'text': towers['text'],
              clip_weights.SOURCE_POSITIONAL_EMBEDDING: source_pos}
    spec = dataclasses.replace(spec, image_size=image_ops.as_pair(config.image_size))
    metadata['clip_spec'] = dataclasses.asdict(spec)
    # A copy of the source directory's tokenizer makes the output a complete `config.clip` (an
    # OpenCLIP hub snapshot has it beside its weights file).
    folder = path if path.is_dir() or args.source != 'open-clip' else path.parent
    extra_files = [folder / name for name in TOKENIZER_FILES if (folder / name).is_file()]
  params = _cast(jax.tree.map(np.asarray, params), dtype)
  out = checkpoint.save_params(args.out, params, metadata, overwrite=args.overwrite,
                               extra_files=extra_files)
  n = sum(x.size for x in jax.tree.leaves(params))
  print(f'Wrote {out} ({n:,} parameters).')
  return 0


if __name__ == '__main__':
  sys.exit(cli.run('python -m otseg_jax.convert', main))
