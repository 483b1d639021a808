"""Checkpoint conversion into our parameter tree.

  python -m otseg_jax.convert --from otseg-mmseg --in iter_20000.pth --out ckpt/voc [--config voc]
  python -m otseg_jax.convert --from openai-clip --in ViT-B-16.pt --out ckpt/clip [--config voc]
  python -m otseg_jax.convert --from hf-clip --in openai/clip-vit-base-patch16 --out ckpt/clip

--from otseg-mmseg: the authors' mmseg checkpoint (`state_dict` with `backbone.*`,
  `decode_head.*`, `text_encoder.*`). Every tensor is mapped by name (rename + transpose); the
  positional grid is resized to the config's image_size/patch grid where it differs. Tensors the
  model never uses (decoder self_attn / norm1, the last decoder layer's v, proj, FFN and norms,
  the loss buffer, text_encoder.*) are listed and skipped; a missing or unexpected tensor is an
  error that names it. Writes a checkpoint whose params are {'backbone': ..., 'decode_head': ...}.
--from openai-clip / hf-clip: CLIP ViT weights (an OpenAI .pt, an HF directory or hub id) read
  by `clip_weights.load_clip`; writes {'backbone': image tower, 'text': text tower} with the
  positional grid resized for the config, the source's own positional embedding beside them
  (loading for another size resizes that, once) and the CLIP spec in the metadata. The backbone
  subtree has every non-prompt leaf of OTSeg's backbone, so a trainer initialises the image
  tower from it (prompts and head stay freshly initialised) and the text tower computes the
  text embeddings. An HF directory's tokenizer files are copied beside them, so the output is a
  complete `config.clip` for train.py.
--config: a model config name of `otseg.get_config` (voc [default], context, coco), or a .json
  file: either a model config (`ConfigDict.to_json()` of such a config, or some of its fields,
  e.g. {"image_size": 224}, the rest from voc) or the `config/json` of a reference dump
  (../shared/reference). Any other JSON (e.g. a training run's config.json) is refused. It fixes
  the positional grid and the prompt shapes.

Files are read by `clip_weights.load_state_dict`: torch only inside it, with `weights_only=True`
(TorchScript archives and .safetensors without torch).
"""

import argparse
import dataclasses
import functools
from collections.abc import Callable, Mapping
import json
import pathlib
import re
import sys
from typing import Any

from flax import traverse_util
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from otseg_jax import checkpoint
from otseg_jax import cli
from otseg_jax import image_ops
from otseg_jax.models import clip_weights
from otseg_jax.models import otseg

Path = tuple[str, ...]
TOKENIZER_FILES = ('vocab.json', 'merges.txt', 'tokenizer.json', 'tokenizer_config.json',
                   'special_tokens_map.json')
_Row = tuple[str, Path, Callable[[np.ndarray], np.ndarray]]


def _same(x: np.ndarray) -> np.ndarray:
  return x


def _transpose(x: np.ndarray) -> np.ndarray:
  return np.ascontiguousarray(x.T)


def _linear(torch_name: str, path: Path) -> list[_Row]:
  # nn.Linear.weight is (out, in), applied as x @ W.T; flax Dense kernel is (in, out).
  return [(f'{torch_name}.weight', path + ('kernel',), _transpose),
          (f'{torch_name}.bias', path + ('bias',), _same)]


def _norm(torch_name: str, path: Path) -> list[_Row]:
  return [(f'{torch_name}.weight', path + ('scale',), _same),
          (f'{torch_name}.bias', path + ('bias',), _same)]


def decoder_layer_rows(layer: int, with_output: bool) -> list[_Row]:
  """Rows (torch name under `decode_head.`, path under one layer, transform) of one layer."""
  t = f'decoder_1.layers.{layer}'
  rows = _linear(f'{t}.multihead_attn.q', ('multihead_attn', 'q'))
  rows += _linear(f'{t}.multihead_attn.k', ('multihead_attn', 'k'))
  if with_output:
    rows += _linear(f'{t}.multihead_attn.v', ('multihead_attn', 'v'))
    rows += _linear(f'{t}.multihead_attn.proj', ('multihead_attn', 'proj'))
    rows += _linear(f'{t}.linear1', ('linear1',))
    rows += _linear(f'{t}.linear2', ('linear2',))
    rows += _norm(f'{t}.norm2', ('norm2',))
    rows += _norm(f'{t}.norm3', ('norm3',))
  return rows


def head_rows(decoder_layers: int) -> list[_Row]:
  """Every tensor the head uses: torch name under `decode_head.` -> path under `decode_head`."""
  rows = _linear('q_proj', ('q_proj',))
  for i in range(decoder_layers):
    rows += [(n, (f'layers_{i}',) + p, f)
             for n, p, f in decoder_layer_rows(i, with_output=i < decoder_layers - 1)]
  return rows


def _fill(state_dict: Mapping[str, np.ndarray], rows: list[_Row], what: str) -> dict:
  missing = [name for name, _, _ in rows if name not in state_dict]
  if missing:
    raise clip_weights.CheckpointError(
        f'{what}: {len(missing)} tensor(s) missing from the checkpoint: '
                   f'{", ".join(missing)}. Is it an OTSeg checkpoint of this config '
                   '(--config)?')
  return traverse_util.unflatten_dict(
      {path: fn(np.asarray(state_dict[name])) for name, path, fn in rows})


# Head tensors that exist in the authors' checkpoints but never take part in the forward pass.
_HEAD_UNUSED = re.compile(
    r'^(loss_decode\..*|decoder_1\.layers\.(\d+)\.(self_attn\..*|norm1\..*|'
    r'multihead_attn\.(v|proj)\..*|linear[12]\..*|norm[23]\..*))$')


def head_params_from_state_dict(state_dict: Mapping[str, np.ndarray],
                                decoder_layers: int) -> tuple[dict, list[str]]:
  """The `decode_head` subtree from `decode_head.*` tensors given WITHOUT that prefix.

  Returns:
    (params, unused names). Raises CheckpointError (a ValueError) listing missing or unknown
    tensors.
  """
  rows = head_rows(decoder_layers)
  params = _fill(state_dict, rows, 'decode_head')
  used = {name for name, _, _ in rows}
  unused = [k for k in state_dict if k not in used]
  unknown = []
  for k in unused:
    match = _HEAD_UNUSED.match(k)
    if not match or (match.group(2) is not None and int(match.group(2)) >= decoder_layers):
      unknown.append(k)
  if unknown:
    raise clip_weights.CheckpointError(
        f'decode_head: unexpected tensor(s) {", ".join("decode_head." + k for k in unknown)}. '
        f'The config has {decoder_layers} decoder layers, use_stages=1 and no input projection; '
        'pick the --config that matches the checkpoint.')
  return params, unused


def param_shapes(config: ml_collections.ConfigDict) -> dict:
  """{'backbone': ..., 'decode_head': ...} of ShapeDtypeStructs for `config`, without compute."""
  return _param_shapes(config.to_json())


@functools.lru_cache(maxsize=8)
def _param_shapes(config_json: str) -> dict:
  # Tracing the whole model takes seconds; parity converts weights and gradients per config.
  config = ml_collections.ConfigDict(json.loads(config_json))
  model = otseg.model_from_config(config)
  s = config.image_size
  images = jax.ShapeDtypeStruct((1, s, s, 3), jnp.float32)
  text = jax.ShapeDtypeStruct((1, config.num_prompts, config.backbone.output_dim), jnp.float32)
  variables = jax.eval_shape(
      lambda x, t: model.init(jax.random.key(0), x, t, train=False), images, text)
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
  """OTSeg params from an mmseg state dict (`backbone.*`, `decode_head.*`, `text_encoder.*`).

  Args:
    state_dict: torch names -> numpy arrays in PyTorch layouts (dtypes kept).
    config: the model config (`otseg.get_config`); fixes the grid and the number of layers.

  Returns:
    (params {'backbone', 'decode_head'} matching `param_shapes(config)`, sorted unused names).
  """
  groups: dict[str, dict[str, np.ndarray]] = {'backbone': {}, 'decode_head': {}}
  unused = []
  for name, value in state_dict.items():
    prefix, _, rest = name.partition('.')
    if prefix in groups:
      groups[prefix][rest] = value
    else:  # text_encoder.* (text embeddings come from a file) and anything else.
      unused.append(name)
  if not groups['backbone'] or not groups['decode_head']:
    raise clip_weights.CheckpointError(
        'The state dict has no backbone.* or no decode_head.* tensors: is it an '
                   "OTSeg mmseg checkpoint (checkpoint['state_dict'])?")
  # Both parts are checked before raising, so one error lists every problem.
  errors = []
  try:
    backbone = clip_weights.visual_params_from_state_dict(
        groups['backbone'], image_size=config.image_size)
  except clip_weights.CheckpointError as e:
    errors.append(f'backbone.*: {e}')
  try:
    head, head_unused = head_params_from_state_dict(
        groups['decode_head'], config.head.decoder_layers)
  except clip_weights.CheckpointError as e:
    errors.append(str(e))
  if errors:
    raise clip_weights.CheckpointError('\n'.join(errors))
  unused += ['decode_head.' + k for k in head_unused]
  params = {'backbone': jax.tree.map(np.asarray, backbone), 'decode_head': head}
  _check_against(params, param_shapes(config))
  return params, sorted(unused)


# ---------------------------------------------------------------------------------------------
# Configs.


def config_from_reference(ref: Mapping[str, Any]) -> ml_collections.ConfigDict:
  """Model config from a reference dump's `config/json` (../shared/reference/README.md)."""
  unsupported = []
  if ref.get('use_proj', False):
    unsupported.append('use_proj=True (input projection)')
  if ref.get('use_stages', 1) != 1:
    unsupported.append(f'use_stages={ref["use_stages"]}')
  if list(ref.get('out_indices', [ref['layers'] - 1])) != [ref['layers'] - 1]:
    unsupported.append(f'out_indices={ref["out_indices"]} (only the last block)')
  if ref.get('embed_dims', ref['output_dim']) != ref['output_dim']:
    unsupported.append('embed_dims != output_dim')
  if ref.get('prompt_dim', ref['width']) != ref['width']:
    unsupported.append('prompt_dim != width')
  if unsupported:
    raise ValueError(f'Reference config {ref.get("name")!r} is not supported: '
                     + ', '.join(unsupported))
  config = otseg.get_config()
  config.variant = ref.get('name', 'reference')
  config.image_size = ref['img_size']
  config.backbone.update(dict(
      patch_size=ref['patch_size'], width=ref['width'], layers=ref['layers'],
      heads=ref['heads'], output_dim=ref['output_dim'], num_prompt_tokens=ref['num_tokens'],
      prompt_depth=ref['total_d_layer'], prompt_dropout=ref.get('dropout_p', 0.1)))
  config.head.update(dict(decoder_layers=ref['dec_layers'], num_heads=ref['dec_heads'],
                          dropout=ref.get('dropout_p', 0.1)))
  config.ot.epsilon = ref.get('sinkhorn_eps', 0.05)
  config.num_prompts = ref['num_prompts']
  config.ensemble_weight = ref.get('balancing_factor', 0.5)
  config.calibration = ref.get('seen_bias', 0.1)
  return config


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


def load_model_config(name_or_path: str) -> ml_collections.ConfigDict:
  """`otseg.get_config(NAME)`, or a .json file: a model config (all or some of its fields, the
  rest from voc) or a reference dump's `config/json`. Anything else is refused: a training run's
  config.json, say, would otherwise be merged field by field over voc and silently ignored."""
  path = pathlib.Path(name_or_path)
  if path.suffix != '.json':
    return otseg.get_config(name_or_path)
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
      return config_from_reference(data)
    except KeyError as e:
      raise ValueError(f'--config {name_or_path}: a reference config without the field {e}.') from e
  config = otseg.get_config()
  unknown = _unknown_fields(data, config.to_dict())
  if unknown:
    hint = (" It looks like a training run's config.json: pass --config voc|context|coco, or a "
            "file with its 'model' section alone." if 'model' in data else '')
    raise ValueError(f'--config {name_or_path}: not a model config, {", ".join(unknown)} '
                     f'{"is" if len(unknown) == 1 else "are"} no field of otseg.get_config() '
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
  parser.add_argument('--from', dest='source', required=True,
                      choices=['otseg-mmseg', 'openai-clip', 'hf-clip'])
  parser.add_argument('--in', dest='input', required=True,
                      help='checkpoint file (or HF model directory / name for hf-clip)')
  parser.add_argument('--out', required=True, help='output checkpoint directory')
  parser.add_argument('--config', default='voc',
                      help='model config: voc | context | coco | path/to/config.json')
  parser.add_argument('--dtype', default='float32',
                      choices=['float32', 'bfloat16', 'float16', 'float64', 'keep'],
                      help="stored float dtype ('keep' leaves the source dtype)")
  parser.add_argument('--overwrite', action='store_true')
  args = parser.parse_args(argv)

  config = load_model_config(args.config)
  dtype = None if args.dtype == 'keep' else args.dtype
  metadata = {'source': args.source, 'input': str(args.input), 'config': config.to_dict()}
  extra_files = []
  if args.source == 'otseg-mmseg':
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
    spec, towers = clip_weights.load_clip(args.input)  # the source's own grid
    source_pos = towers['visual']['positional_embedding']
    visual = dict(towers['visual'], positional_embedding=clip_weights.positional_embedding_for(
        source_pos, spec.patch_size, config.image_size))
    params = {'backbone': visual, 'text': towers['text'],
              clip_weights.SOURCE_POSITIONAL_EMBEDDING: source_pos}
    spec = dataclasses.replace(spec, image_size=image_ops.as_pair(config.image_size))
    metadata['clip_spec'] = dataclasses.asdict(spec)
    # A copy of an HF directory's tokenizer makes the output a complete `config.clip`.
    extra_files = [path / name for name in TOKENIZER_FILES if (path / name).is_file()]
  params = _cast(jax.tree.map(np.asarray, params), dtype)
  out = checkpoint.save_params(args.out, params, metadata, overwrite=args.overwrite,
                               extra_files=extra_files)
  n = sum(x.size for x in jax.tree.leaves(params))
  print(f'Wrote {out} ({n:,} parameters).')
  return 0


if __name__ == '__main__':
  sys.exit(cli.run('python -m otseg_jax.convert', main))
