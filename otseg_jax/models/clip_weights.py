"""CLIP weights (OpenAI .pt, HF directories / hub ids, OpenCLIP files, converted directories) into
the trees of `clip.py`.

OpenAI state-dict names are the common currency: `visual_params_from_state_dict` and
`text_params_from_state_dict` map them to our trees, the HF path first renames HF tensors to
OpenAI names, and OpenCLIP's are OpenAI's already (its JSON adds the heads and the activation), so
every source goes through the same two functions and gives the same tree.

Loading never executes code from the checkpoint: HF weights are read with safetensors; plain state
dicts with `torch.load(weights_only=True)`; OpenAI's published TorchScript archives with a
restricted unpickler that only rebuilds tensors from the archive's raw storages (see
`read_torchscript_archive`).

dtypes: float tensors keep their dtype, except half precision (float16, bfloat16), which becomes
float32. Under `jax.enable_x64` a float64 checkpoint therefore gives float64 parameters.
"""

import collections
import dataclasses
import json
import math
import os
import pathlib
import pickle
import re
import zipfile
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from otseg_jax import image_ops
from otseg_jax.models import clip
from otseg_jax.models.clip import CLIPSpec

__all__ = ['CLIPSpec', 'CheckpointError', 'check_backbone_config', 'clip_from_state_dict',
           'load_clip', 'load_open_clip', 'load_state_dict', 'looks_like_hub_id',
           'positional_embedding_for', 'read_torchscript_archive', 'resize_positional_embedding', 'text_params_from_state_dict',
           'visual_params_from_state_dict']

Params = dict[str, Any]

# Tensors a full OpenAI CLIP state dict holds that no tower uses.
_OPENAI_UNUSED = ('logit_scale', 'input_resolution', 'context_length', 'vocab_size')


class CheckpointError(ValueError):
  """A checkpoint's tensors do not match what the model needs (all problems in one message)."""


# ----------------------------------------------------------------------------------------------
# Checking a state dict against the expected names and shapes.


def _as_numpy(x) -> np.ndarray:
  """numpy view of a numpy / jax / torch array; half precision becomes float32."""
  if hasattr(x, 'detach'):  # torch, without importing it
    x = x.detach().cpu()
    if str(x.dtype) in ('torch.float16', 'torch.bfloat16'):
      x = x.float()
    x = x.numpy()
  x = np.asarray(x)
  if x.dtype == np.float16 or x.dtype.name == 'bfloat16':
    x = x.astype(np.float32)
  return x


def _check(sd: Mapping[str, np.ndarray], expected: Mapping[str, tuple[int, ...]], what: str,
           fix: str, ignore: Sequence[str] = ()) -> None:
  """Raises one CheckpointError listing every missing, unexpected and mis-shaped tensor.

  Names are as in `sd` (for a full OpenAI state dict, the visual ones without 'visual.').
  """
  missing = [k for k in expected if k not in sd]
  unexpected = [k for k in sd if k not in expected and k not in ignore]
  wrong = [f'{k} has shape {tuple(np.shape(sd[k]))}, expected {expected[k]}'
           for k in expected if k in sd and tuple(np.shape(sd[k])) != tuple(expected[k])]
  if not (missing or unexpected or wrong):
    return
  lines = [f'{what}: the checkpoint does not match.']
  if missing:
    lines.append(f'  missing ({len(missing)}): ' + ', '.join(missing))
  if unexpected:
    lines.append(f'  unexpected ({len(unexpected)}): ' + ', '.join(unexpected))
  if wrong:
    lines.append(f'  wrong shape ({len(wrong)}): ' + '; '.join(wrong))
  lines.append(f'  Fix: {fix}')
  raise CheckpointError('\n'.join(lines))


def _num_blocks(sd: Mapping[str, Any], prefix: str = 'transformer.resblocks.') -> int:
  ids = {int(m.group(1)) for k in sd if (m := re.match(re.escape(prefix) + r'(\d+)\.', k))}
  return max(ids) + 1 if ids else 0


def _mlp_width(sd: Mapping[str, np.ndarray], prefix: str, d: int) -> int:
  """The MLP width of the blocks under `prefix` (block 0's c_fc; 4 d when there is none)."""
  fc = sd.get(prefix + '0.mlp.c_fc.weight')
  return int(fc.shape[0]) if fc is not None and fc.ndim == 2 else 4 * d


def _block_shapes(prefix: str, d: int, mlp: int) -> dict[str, tuple[int, ...]]:
  return {
      prefix + 'attn.in_proj_weight': (3 * d, d), prefix + 'attn.in_proj_bias': (3 * d,),
      prefix + 'attn.out_proj.weight': (d, d), prefix + 'attn.out_proj.bias': (d,),
      prefix + 'ln_1.weight': (d,), prefix + 'ln_1.bias': (d,),
      prefix + 'mlp.c_fc.weight': (mlp, d), prefix + 'mlp.c_fc.bias': (mlp,),
      prefix + 'mlp.c_proj.weight': (d, mlp), prefix + 'mlp.c_proj.bias': (d,),
      prefix + 'ln_2.weight': (d,), prefix + 'ln_2.bias': (d,),
  }


def _ln(sd, prefix: str) -> Params:
  return {'scale': sd[prefix + '.weight'], 'bias': sd[prefix + '.bias']}


def _dense(sd, prefix: str) -> Params:
  # torch Linear weight is (out, in); linen Dense kernel is (in, out).
  return {'kernel': np.ascontiguousarray(sd[prefix + '.weight'].T), 'bias': sd[prefix + '.bias']}


def _transformer_params(sd, layers: int) -> Params:
  out = {}
  for i in range(layers):
    p = f'transformer.resblocks.{i}.'
    wq, wk, wv = np.split(sd[p + 'attn.in_proj_weight'], 3, axis=0)  # rows [Wq; Wk; Wv]
    bq, bk, bv = np.split(sd[p + 'attn.in_proj_bias'], 3, axis=0)
    out[f'resblocks_{i}'] = {
        'ln_1': _ln(sd, p + 'ln_1'),
        'attn': {'q_proj': {'kernel': np.ascontiguousarray(wq.T), 'bias': bq},
                 'k_proj': {'kernel': np.ascontiguousarray(wk.T), 'bias': bk},
                 'v_proj': {'kernel': np.ascontiguousarray(wv.T), 'bias': bv},
                 'out_proj': _dense(sd, p + 'attn.out_proj')},
        'ln_2': _ln(sd, p + 'ln_2'),
        'mlp': {'c_fc': _dense(sd, p + 'mlp.c_fc'), 'c_proj': _dense(sd, p + 'mlp.c_proj')},
    }
  return out


def _grid_of(num_positions: int) -> int | None:
  g = math.isqrt(max(num_positions - 1, 0))
  return g if g * g == num_positions - 1 and g > 0 else None


def resize_positional_embedding(pos: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
  """(1 + g*g, D) -> (1 + gh*gw, D): CLS row kept, the square grid resized bilinearly.

  The authors' load-time resize (`init_weights`): F.interpolate(bilinear, align_corners=False).
  Runs in jax; run under `jax.enable_x64(True)` to keep float64 precision.
  """
  g = _grid_of(pos.shape[0])
  if g is None:
    raise CheckpointError(f'positional_embedding has {pos.shape[0]} rows: not 1 + a square grid.')
  if (g, g) == tuple(grid):
    return pos
  # jnp.asarray: float64 stays float64 only under x64 (and jax does not warn about it otherwise).
  resized = image_ops.resize_bilinear(jnp.asarray(pos[1:].reshape(g, g, -1)), grid, axes=(0, 1))
  resized = np.asarray(jax.device_get(resized)).astype(pos.dtype).reshape(grid[0] * grid[1], -1)
  return np.concatenate([pos[:1], resized], axis=0)


def positional_embedding_for(pos: np.ndarray, patch: int, image_size) -> np.ndarray:
  """`pos` resized to the grid of `image_size` (int or (H, W)) // `patch`."""
  h, w = image_ops.as_pair(image_size)
  if h < patch or w < patch:
    raise ValueError(f'image_size {image_size} is smaller than one {patch}x{patch} patch.')
  return resize_positional_embedding(pos, (h // patch, w // patch))


# ----------------------------------------------------------------------------------------------
# OpenAI-layout state dicts -> our trees.


def _check_anchors(sd: Mapping[str, np.ndarray], ranks: Mapping[str, int], tower: str,
                   fix: str) -> None:
  """The tensors the architecture is read from must be there with these ranks."""
  bad = [k for k, nd in ranks.items() if k not in sd or sd[k].ndim != nd]
  if bad:
    has = ', '.join(sorted(sd)[:8]) + (', ...' if len(sd) > 8 else '')
    raise CheckpointError(
        f'{tower} weights: cannot infer the architecture, {", ".join(bad)} missing or not of rank '
        f'{", ".join(str(ranks[k]) for k in bad)} (the state dict has: {has}).\n  Fix: {fix}')


def visual_params_from_state_dict(sd: Mapping[str, Any],
                                  image_size: int | Sequence[int] | None = None) -> Params:
  """OpenAI / mmseg-layout visual tensors -> the `VisionTransformer` parameter tree.

  Args:
    sd: names without the `visual.` (OpenAI) or `backbone.` (mmseg) prefix: `conv1.weight`,
      `class_embedding`, `positional_embedding`, `ln_pre.*`, `transformer.resblocks.{i}.*`,
      `ln_post.*`, `proj`, and for OTSeg's VPT backbone `prompt_embeddings`,
      `deep_prompt_embeddings` (optional), `prompt_proj.*`, `prompt_norm.*`.
    image_size: int or (H, W); the positional grid is resized to image_size // patch at load time
      (CLS row kept). None keeps the checkpoint's grid.

  Returns:
    {'conv1': {'kernel': (p, p, 3, D)}, 'class_embedding': (D,), 'positional_embedding':
    (1 + gh*gw, D), 'ln_pre', 'transformer': {'resblocks_{i}': ...}, 'ln_post', 'proj': (D, C),
    and with prompts 'prompt_embeddings' (1, T, D), 'deep_prompt_embeddings' (L_d, T, D),
    'prompt_proj', 'prompt_norm'} as numpy arrays.
  """
  sd = {k: _as_numpy(v) for k, v in sd.items()}
  fix = ("pass an OpenAI CLIP ViT visual state dict (clip/model.py names) with the 'visual.' "
         "(OpenAI) or 'backbone.' (mmseg) prefix stripped.")
  _check_anchors(sd, {'conv1.weight': 4, 'positional_embedding': 2, 'proj': 2}, 'visual', fix)
  d, _, p, _ = sd['conv1.weight'].shape
  c = sd['proj'].shape[1]
  g = _grid_of(sd['positional_embedding'].shape[0])
  layers = _num_blocks(sd)
  # A non-square grid is reported on its own below, not as a shape mismatch.
  pos_shape = (1 + g * g, d) if g else sd['positional_embedding'].shape
  expected = {'conv1.weight': (d, 3, p, p), 'class_embedding': (d,),
              'positional_embedding': pos_shape, 'ln_pre.weight': (d,),
              'ln_pre.bias': (d,), 'ln_post.weight': (d,), 'ln_post.bias': (d,), 'proj': (d, c)}
  mlp = _mlp_width(sd, 'transformer.resblocks.', d)
  for i in range(layers):
    expected.update(_block_shapes(f'transformer.resblocks.{i}.', d, mlp))
  prompts = any('prompt' in k for k in sd)
  if prompts:
    t = sd['prompt_embeddings'].shape[1] if np.ndim(sd.get('prompt_embeddings')) == 3 else 0
    expected.update({'prompt_embeddings': (1, t, d), 'prompt_proj.weight': (d, d),
                     'prompt_proj.bias': (d,), 'prompt_norm.weight': (d,),
                     'prompt_norm.bias': (d,)})
    if 'deep_prompt_embeddings' in sd:
      deep = sd['deep_prompt_embeddings']
      expected['deep_prompt_embeddings'] = (deep.shape[0] if deep.ndim == 3 else 1, t, d)
  _check(sd, expected, f'visual weights (ViT width {d}, patch {p}, {layers} blocks)', fix)
  if g is None:
    raise CheckpointError(f'visual weights: positional_embedding has '
                          f'{sd["positional_embedding"].shape[0]} rows, not 1 + a square grid.')
  if layers == 0:
    raise CheckpointError(f'visual weights: no transformer.resblocks.* tensors.\n  Fix: {fix}')

  pos = sd['positional_embedding']
  if image_size is not None:
    pos = positional_embedding_for(pos, p, image_size)
  params = {
      'conv1': {'kernel': np.ascontiguousarray(sd['conv1.weight'].transpose(2, 3, 1, 0))},
      'class_embedding': sd['class_embedding'],
      'positional_embedding': pos,
      'ln_pre': _ln(sd, 'ln_pre'),
      'transformer': _transformer_params(sd, layers),
      'ln_post': _ln(sd, 'ln_post'),
      'proj': sd['proj'],
  }
  if prompts:
    params['prompt_embeddings'] = sd['prompt_embeddings']
    if 'deep_prompt_embeddings' in sd:
      params['deep_prompt_embeddings'] = sd['deep_prompt_embeddings']
    params['prompt_proj'] = _dense(sd, 'prompt_proj')
    params['prompt_norm'] = _ln(sd, 'prompt_norm')
  return params


def text_params_from_state_dict(sd: Mapping[str, Any]) -> Params:
  """OpenAI-layout text tensors -> the `TextTransformer` parameter tree.

  Args:
    sd: `token_embedding.weight` (V, D), `positional_embedding` (L, D),
      `transformer.resblocks.{i}.*`, `ln_final.*`, `text_projection` (D, C), any `text_encoder.`
      prefix stripped.

  Returns:
    {'token_embedding': {'embedding'}, 'positional_embedding', 'transformer', 'ln_final',
    'text_projection'} as numpy arrays.
  """
  sd = {k: _as_numpy(v) for k, v in sd.items()}
  fix = ('pass the text tensors of an OpenAI CLIP state dict (token_embedding.weight, '
         'positional_embedding, transformer.resblocks.*, ln_final.*, text_projection).')
  _check_anchors(sd, {'token_embedding.weight': 2, 'positional_embedding': 2,
                      'text_projection': 2}, 'text', fix)
  v, d = sd['token_embedding.weight'].shape
  l = sd['positional_embedding'].shape[0]
  c = sd['text_projection'].shape[1]
  layers = _num_blocks(sd)
  expected = {'token_embedding.weight': (v, d), 'positional_embedding': (l, d),
              'ln_final.weight': (d,), 'ln_final.bias': (d,), 'text_projection': (d, c)}
  mlp = _mlp_width(sd, 'transformer.resblocks.', d)
  for i in range(layers):
    expected.update(_block_shapes(f'transformer.resblocks.{i}.', d, mlp))
  _check(sd, expected, f'text weights (width {d}, {layers} blocks)', fix)
  if layers == 0:
    raise CheckpointError(f'text weights: no transformer.resblocks.* tensors.\n  Fix: {fix}')
  return {
      'token_embedding': {'embedding': sd['token_embedding.weight']},
      'positional_embedding': sd['positional_embedding'],
      'transformer': _transformer_params(sd, layers),
      'ln_final': _ln(sd, 'ln_final'),
      'text_projection': sd['text_projection'],
  }


def _openai_spec(sd: Mapping[str, np.ndarray], image_size) -> CLIPSpec:
  """The architecture of a (checked) OpenAI CLIP state dict, inferred as OpenAI's `build_model`."""
  conv, pos = sd['visual.conv1.weight'], sd['visual.positional_embedding']
  p, vw, tw = conv.shape[-1], conv.shape[0], sd['ln_final.weight'].shape[0]
  g = _grid_of(pos.shape[0])
  if image_size is None:
    image_size = (g * p, g * p)
  elif isinstance(image_size, int):
    image_size = (image_size, image_size)
  # OpenAI's rule: 64 channels per attention head.
  return CLIPSpec(embed_dim=int(sd['text_projection'].shape[1]), image_size=tuple(image_size),
                  patch_size=int(p), vision_width=int(vw),
                  vision_layers=_num_blocks(sd, 'visual.transformer.resblocks.'),
                  vision_heads=int(vw) // 64,
                  context_length=int(sd['positional_embedding'].shape[0]),
                  vocab_size=int(sd['token_embedding.weight'].shape[0]), text_width=int(tw),
                  text_layers=_num_blocks(sd), text_heads=int(tw) // 64,
                  vision_mlp_dim=_mlp_width(sd, 'visual.transformer.resblocks.', int(vw)),
                  text_mlp_dim=_mlp_width(sd, 'transformer.resblocks.', int(tw)))


def clip_from_state_dict(sd: Mapping[str, Any], image_size: int | Sequence[int] | None = None,
                         spec: CLIPSpec | None = None) -> tuple[CLIPSpec, dict[str, Params]]:
  """A full OpenAI CLIP state dict (`visual.*` + text names) -> (spec, params), as `load_clip`.

  `spec` is inferred as OpenAI's `build_model` does (heads = width // 64) unless given.
  """
  if 'visual.proj' not in sd and any(k.startswith('visual.layer1') for k in sd):
    raise CheckpointError('This is a ResNet CLIP; only ViT CLIP models are supported.')
  sd = {k: _as_numpy(v) for k, v in sd.items() if k not in _OPENAI_UNUSED}
  vis = {k[len('visual.'):]: v for k, v in sd.items() if k.startswith('visual.')}
  txt = {k: v for k, v in sd.items() if not k.startswith('visual.')}
  # The per-tower converters check every tensor first, so the spec below reads checked shapes.
  # Both towers are checked before raising, so one error lists every problem.
  params, errors = {}, []
  for tower, convert in (('visual', lambda: visual_params_from_state_dict(vis, image_size)),
                         ('text', lambda: text_params_from_state_dict(txt))):
    try:
      params[tower] = convert()
    except CheckpointError as e:
      errors.append(str(e))
  if errors:
    raise CheckpointError('\n'.join(errors))
  return spec or _openai_spec(sd, image_size), params


# The architecture facts a CLIP checkpoint fixes for the image tower: config.model.backbone field
# -> CLIPSpec field.
_BACKBONE_FIELDS = {'patch_size': 'patch_size', 'width': 'vision_width',
                    'layers': 'vision_layers', 'heads': 'vision_heads', 'output_dim': 'embed_dim',
                    'mlp_dim': 'vision_mlp_dim', 'activation': 'activation'}


def _backbone_fact(field: str, value, width: int):
  # An MLP width of 0 means 4 * width, in configs and specs alike.
  return (value or 4 * width) if field == 'mlp_dim' else value


def check_backbone_config(spec: CLIPSpec, backbone: Mapping[str, Any], source) -> None:
  """Raises CheckpointError (one line) naming each field of `backbone` (config.model.backbone)
  that disagrees with the CLIP checkpoint's `spec`, with both values.

  Shapes alone do not catch every disagreement: 4 heads and 2 heads of the same width have the
  same tensors, and loading one into the other silently runs a different image tower.
  """
  defaults = {'mlp_dim': 0, 'activation': 'quick_gelu'}  # configs written before the fields
  wrong = []
  for field, name in _BACKBONE_FIELDS.items():
    ours = _backbone_fact(field, backbone.get(field, defaults.get(field)), backbone['width'])
    theirs = _backbone_fact(field, getattr(spec, name), spec.vision_width)
    if ours != theirs:
      wrong.append(f'{field}={ours!r} but the checkpoint has {theirs!r}')
  if wrong:
    raise CheckpointError(
        f'CLIP weights {source} do not fit config.model.backbone: ' + '; '.join(wrong) +
        '. Set --config.model.backbone.FIELD to the checkpoint\'s value, or use the CLIP the '
        'config was made for.')


def _check_spec(spec: CLIPSpec, towers: Mapping[str, Params], where) -> None:
  """Raises CheckpointError if a spec (e.g. from a converted directory's metadata) disagrees with
  the tensors it describes; heads, which no shape shows, must divide the widths."""
  vis, txt = towers['visual'], towers['text']
  p, _, _, vw = np.shape(vis['conv1']['kernel'])
  tw = np.shape(txt['ln_final']['scale'])[0]
  facts = {
      'patch_size': p, 'vision_width': vw, 'vision_layers': len(vis['transformer']),
      'embed_dim': np.shape(vis['proj'])[1], 'text_width': tw,
      'text_layers': len(txt['transformer']),
      'context_length': np.shape(txt['positional_embedding'])[0],
      'vocab_size': np.shape(txt['token_embedding']['embedding'])[0],
  }
  wrong = [f'{k} {getattr(spec, k)} but the tensors say {v}' for k, v in facts.items()
           if getattr(spec, k) != v]
  for tower, width, heads in (('vision', vw, spec.vision_heads), ('text', tw, spec.text_heads)):
    if heads < 1 or width % heads:
      wrong.append(f'{tower}_heads {heads} does not divide the width {width}')
  for tower, width, mlp_dim in (('visual', vw, spec.vision_mlp_dim),
                                ('text', tw, spec.text_mlp_dim)):
    mlp = {np.shape(b['mlp']['c_fc']['kernel']) for b in towers[tower]['transformer'].values()}
    if mlp != {(width, mlp_dim or 4 * width)}:
      wrong.append(f'{tower} MLP kernels {sorted(mlp)}, the spec says '
                   f'({width}, {mlp_dim or 4 * width})')
  if spec.activation not in clip.ACTIVATIONS:
    wrong.append(f'activation {spec.activation!r} is not one of {", ".join(clip.ACTIVATIONS)}')
  if wrong:
    raise CheckpointError(f'{where}: the CLIP spec does not match its weights: '
                          + '; '.join(wrong) + '. Re-create it with python -m otseg_jax.convert.')


# ----------------------------------------------------------------------------------------------
# HF layout.


def _hf_expected(config: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
  vc, tc = config['vision_config'], config['text_config']
  c = config.get('projection_dim', 512)
  vd, td, p = vc['hidden_size'], tc['hidden_size'], vc['patch_size']
  g = vc['image_size'] // p
  out = {'vision_model.embeddings.class_embedding': (vd,),
         'vision_model.embeddings.patch_embedding.weight': (vd, 3, p, p),
         'vision_model.embeddings.position_embedding.weight': (1 + g * g, vd),
         'vision_model.pre_layrnorm.weight': (vd,), 'vision_model.pre_layrnorm.bias': (vd,),
         'vision_model.post_layernorm.weight': (vd,), 'vision_model.post_layernorm.bias': (vd,),
         'visual_projection.weight': (c, vd),
         'text_model.embeddings.token_embedding.weight': (tc['vocab_size'], td),
         'text_model.embeddings.position_embedding.weight': (tc['max_position_embeddings'], td),
         'text_model.final_layer_norm.weight': (td,), 'text_model.final_layer_norm.bias': (td,),
         'text_projection.weight': (c, td)}
  for tower, d, cfg in (('vision_model', vd, vc), ('text_model', td, tc)):
    for i in range(cfg['num_hidden_layers']):
      pre = f'{tower}.encoder.layers.{i}.'
      for name in ('q_proj', 'k_proj', 'v_proj', 'out_proj'):
        out[f'{pre}self_attn.{name}.weight'] = (d, d)
        out[f'{pre}self_attn.{name}.bias'] = (d,)
      for name in ('layer_norm1', 'layer_norm2'):
        out[f'{pre}{name}.weight'] = (d,)
        out[f'{pre}{name}.bias'] = (d,)
      mlp = cfg['intermediate_size']
      out[f'{pre}mlp.fc1.weight'] = (mlp, d)
      out[f'{pre}mlp.fc1.bias'] = (mlp,)
      out[f'{pre}mlp.fc2.weight'] = (d, mlp)
      out[f'{pre}mlp.fc2.bias'] = (d,)
  return out


def _require_positive_ints(values: Mapping[str, Any], names: Sequence[str], where: str) -> None:
  """Sizes read from a JSON file are checked before any arithmetic: a damaged or hand-edited file
  would otherwise fail deep inside with a TypeError or ZeroDivisionError."""
  # type() rather than isinstance: True is an int, never a size.
  # pylint: disable-next=unidiomatic-typecheck
  bad = [f'{n}={values.get(n)!r}' for n in names if type(values.get(n)) is not int or values[n] < 1]
  if bad:
    raise CheckpointError(f'{where}: {", ".join(bad)}, expected positive integers: the file is '
                          'damaged; write it again.')


def _hf_config(config: Mapping[str, Any], where: str) -> dict[str, Any]:
  """config.json of a CLIPModel with transformers' defaults filled in; refuses what we can't run."""
  if not (isinstance(config, Mapping) and isinstance(config.get('vision_config'), Mapping)
          and isinstance(config.get('text_config'), Mapping)):
    raise CheckpointError(f'{where}: config.json has no vision_config/text_config; expected the '
                          'config of a transformers CLIPModel (model_type "clip").')
  vc, tc = config['vision_config'], config['text_config']
  # save_pretrained omits keys that equal the defaults.
  vdef = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
              image_size=224, patch_size=32, hidden_act='quick_gelu', layer_norm_eps=1e-5,
              num_channels=3)
  tdef = dict(hidden_size=512, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=8,
              vocab_size=49408, max_position_embeddings=77, hidden_act='quick_gelu',
              layer_norm_eps=1e-5)
  vc, tc = {**vdef, **vc}, {**tdef, **tc}
  sizes = ('hidden_size', 'intermediate_size', 'num_hidden_layers', 'num_attention_heads')
  _require_positive_ints(vc, sizes + ('image_size', 'patch_size', 'num_channels'),
                         f'{where}/config.json vision_config')
  _require_positive_ints(tc, sizes + ('vocab_size', 'max_position_embeddings'),
                         f'{where}/config.json text_config')
  _require_positive_ints({'projection_dim': config.get('projection_dim', 512)}, ['projection_dim'],
                         f'{where}/config.json')
  problems = []
  for name, cfg in (('vision_config', vc), ('text_config', tc)):
    if cfg['hidden_act'] not in clip.ACTIVATIONS:
      problems.append(f'{name}.hidden_act is {cfg["hidden_act"]!r}, this port has '
                      f'{", ".join(clip.ACTIVATIONS)}')
    eps = cfg['layer_norm_eps']
    if not isinstance(eps, (int, float)) or abs(eps - 1e-5) > 1e-12:
      problems.append(f'{name}.layer_norm_eps is {eps!r}, this port uses 1e-5')
  if vc['hidden_act'] != tc['hidden_act']:
    problems.append(f'vision_config.hidden_act {vc["hidden_act"]!r} differs from text_config\'s '
                    f'{tc["hidden_act"]!r}; this port runs one activation in both towers')
  if vc['num_channels'] != 3:
    problems.append(f'vision_config.num_channels is {vc["num_channels"]}, expected 3')
  if problems:
    raise CheckpointError(f'{where}: not an OpenAI-style CLIP this port can run: ' +
                          '; '.join(problems) + '.')
  return {**config, 'vision_config': vc, 'text_config': tc}


def _hf_spec(config: Mapping[str, Any], image_size) -> CLIPSpec:
  vc, tc = config['vision_config'], config['text_config']
  p = vc['patch_size']
  g = vc['image_size'] // p
  if image_size is None:
    image_size = (g * p, g * p)
  elif isinstance(image_size, int):
    image_size = (image_size, image_size)
  return CLIPSpec(embed_dim=config.get('projection_dim', 512), image_size=tuple(image_size),
                  patch_size=p, vision_width=vc['hidden_size'],
                  vision_layers=vc['num_hidden_layers'], vision_heads=vc['num_attention_heads'],
                  context_length=tc['max_position_embeddings'], vocab_size=tc['vocab_size'],
                  text_width=tc['hidden_size'], text_layers=tc['num_hidden_layers'],
                  text_heads=tc['num_attention_heads'], vision_mlp_dim=vc['intermediate_size'],
                  text_mlp_dim=tc['intermediate_size'], activation=vc['hidden_act'])


def _hf_to_openai(sd: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Renames a (checked) HF CLIPModel state dict to OpenAI names; q/k/v fused into in_proj."""
  out = {}
  for tower, prefix in (('vision_model', 'visual.'), ('text_model', '')):
    layers = _num_blocks(sd, f'{tower}.encoder.layers.')
    for i in range(layers):
      hf, oa = f'{tower}.encoder.layers.{i}.', f'{prefix}transformer.resblocks.{i}.'
      for kind in ('weight', 'bias'):
        out[f'{oa}attn.in_proj_{kind}'] = np.concatenate(
            [sd[f'{hf}self_attn.{n}_proj.{kind}'] for n in 'qkv'], axis=0)
        out[f'{oa}attn.out_proj.{kind}'] = sd[f'{hf}self_attn.out_proj.{kind}']
        out[f'{oa}ln_1.{kind}'] = sd[f'{hf}layer_norm1.{kind}']
        out[f'{oa}ln_2.{kind}'] = sd[f'{hf}layer_norm2.{kind}']
        out[f'{oa}mlp.c_fc.{kind}'] = sd[f'{hf}mlp.fc1.{kind}']
        out[f'{oa}mlp.c_proj.{kind}'] = sd[f'{hf}mlp.fc2.{kind}']
  v, t = 'vision_model.', 'text_model.'
  out['visual.class_embedding'] = sd[v + 'embeddings.class_embedding']
  out['visual.conv1.weight'] = sd[v + 'embeddings.patch_embedding.weight']
  out['visual.positional_embedding'] = sd[v + 'embeddings.position_embedding.weight']
  for kind in ('weight', 'bias'):
    out[f'visual.ln_pre.{kind}'] = sd[f'{v}pre_layrnorm.{kind}']  # sic, HF's name
    out[f'visual.ln_post.{kind}'] = sd[f'{v}post_layernorm.{kind}']
    out[f'ln_final.{kind}'] = sd[f'{t}final_layer_norm.{kind}']
  out['visual.proj'] = np.ascontiguousarray(sd['visual_projection.weight'].T)
  out['token_embedding.weight'] = sd[t + 'embeddings.token_embedding.weight']
  out['positional_embedding'] = sd[t + 'embeddings.position_embedding.weight']
  out['text_projection'] = np.ascontiguousarray(sd['text_projection.weight'].T)
  return out


def _read_safetensors(path: pathlib.Path) -> dict[str, np.ndarray]:
  import safetensors
  out = {}
  try:
    try:
      with safetensors.safe_open(str(path), framework='numpy') as f:
        for k in f.keys():
          out[k] = _as_numpy(f.get_tensor(k))
    except (TypeError, ValueError) as e:
      if 'bf16' not in str(e).lower() and 'bfloat16' not in str(e).lower():
        raise
      # numpy has no bfloat16: read through jax's ml_dtypes-aware loader, then widen.
      with safetensors.safe_open(str(path), framework='flax') as f:
        for k in f.keys():
          out[k] = np.asarray(f.get_tensor(k)).astype(np.float32)
  except Exception as e:  # SafetensorError is no ValueError; every failure means a bad file
    raise CheckpointError(f'{path}: not a readable safetensors file ({type(e).__name__}: {e}). '
                          'It is truncated or corrupt: download or save it again.') from e
  return out


def _read_json(path: pathlib.Path) -> Any:
  try:
    return json.loads(path.read_text())
  except (ValueError, UnicodeDecodeError) as e:
    raise CheckpointError(f'{path}: not valid JSON ({e}): download or save it again.') from e


# A converted CLIP keeps its source's positional embedding beside the backbone's (resized for the
# convert --config), so that loading it for another size resizes once, from the source's grid.
SOURCE_POSITIONAL_EMBEDDING = 'source_positional_embedding'


def _load_converted_dir(directory: pathlib.Path, image_size) -> tuple[CLIPSpec, Params]:
  """A `convert --from openai-clip|hf-clip` checkpoint: {'backbone', 'text',
  SOURCE_POSITIONAL_EMBEDDING (optional)} + the CLIP spec."""
  from otseg_jax import checkpoint  # pylint: disable=g-import-not-at-top
  params, metadata = checkpoint.load_params(directory)
  if 'clip_spec' not in metadata or not {'backbone', 'text'} <= set(params):
    raise CheckpointError(f'{directory} is a parameter checkpoint but not of CLIP (no clip_spec, '
                          'image and text towers): write one with python -m otseg_jax.convert '
                          '--from openai-clip (or hf-clip).')
  spec = metadata['clip_spec']
  fields = [f.name for f in dataclasses.fields(CLIPSpec)]
  # Fields with defaults (MLP widths, activation) are absent from specs written before them.
  required = [f.name for f in dataclasses.fields(CLIPSpec) if f.default is dataclasses.MISSING]
  if not (isinstance(spec, dict) and set(required) <= set(spec) <= set(fields)):
    raise CheckpointError(f'{directory}/metadata.json: clip_spec is not a CLIP spec (fields '
                          f'{", ".join(fields)}): the file is damaged; convert the CLIP again.')
  _require_positive_ints(spec, [f for f in required if f != 'image_size'],
                         f'{directory}/metadata.json clip_spec')
  mlp = {k: spec.get(k, 0) for k in ('vision_mlp_dim', 'text_mlp_dim')}
  # pylint: disable-next=unidiomatic-typecheck
  bad = [f'{k}={v!r}' for k, v in mlp.items() if type(v) is not int or v < 0]
  if not isinstance(spec.get('activation', 'quick_gelu'), str):
    bad.append(f'activation={spec["activation"]!r}')
  if bad:
    raise CheckpointError(f'{directory}/metadata.json clip_spec: {", ".join(bad)}: the file is '
                          'damaged; convert the CLIP again.')
  size = spec['image_size']
  if not (isinstance(size, list) and len(size) == 2
          and all(type(n) is int and n > 0 for n in size)):  # pylint: disable=unidiomatic-typecheck
    raise CheckpointError(f'{directory}/metadata.json: clip_spec.image_size={size!r}, expected '
                          '[H, W]: the file is damaged; convert the CLIP again.')
  spec = dict(spec, image_size=tuple(size))
  visual = dict(params['backbone'])
  if image_size is not None:
    # From the source's own grid where the checkpoint keeps it: resized once, not away and back.
    source = params.get(SOURCE_POSITIONAL_EMBEDDING, visual['positional_embedding'])
    visual['positional_embedding'] = positional_embedding_for(
        np.asarray(source), spec['patch_size'], image_size)
    spec['image_size'] = image_ops.as_pair(image_size)
  spec, towers = CLIPSpec(**spec), {'visual': visual, 'text': params['text']}
  _check_spec(spec, towers, directory)
  return spec, towers


def _load_hf_dir(directory: pathlib.Path, image_size) -> tuple[CLIPSpec, Params]:
  config_path = directory / 'config.json'
  if not config_path.is_file():
    raise FileNotFoundError(f'{directory} has no config.json: expected a transformers CLIPModel '
                            'directory (config.json + model.safetensors, as save_pretrained '
                            'writes).')
  config = _hf_config(_read_json(config_path), str(directory))
  spec = _hf_spec(config, image_size)
  index = directory / 'model.safetensors.index.json'
  if (directory / 'model.safetensors').is_file():
    sd = _read_safetensors(directory / 'model.safetensors')
  elif index.is_file():
    sd = {}
    for name in sorted(set(_read_json(index)['weight_map'].values())):
      sd.update(_read_safetensors(directory / name))
  elif (directory / 'pytorch_model.bin').is_file():
    sd = load_state_dict(directory / 'pytorch_model.bin')
  else:
    raise FileNotFoundError(f'{directory} has no model.safetensors (nor an index or '
                            'pytorch_model.bin): save the model with CLIPModel.save_pretrained.')
  _check(sd, _hf_expected(config), f'{directory} (HF CLIPModel)',
         'use the weights saved by transformers.CLIPModel.save_pretrained for this config.json.',
         ignore=('logit_scale', 'vision_model.embeddings.position_ids',
                 'text_model.embeddings.position_ids'))
  return clip_from_state_dict(_hf_to_openai(sd), image_size, spec)


# ----------------------------------------------------------------------------------------------
# OpenAI files.


class _ScriptObject:
  """Stand-in for a TorchScript module object: holds its attribute dict, runs nothing."""

  def __setstate__(self, state):
    self.state = state


_STORAGE_DTYPES = {
    'DoubleStorage': np.float64, 'FloatStorage': np.float32, 'HalfStorage': np.float16,
    'BFloat16Storage': 'bfloat16', 'LongStorage': np.int64, 'IntStorage': np.int32,
    'ShortStorage': np.int16, 'CharStorage': np.int8, 'ByteStorage': np.uint8,
    'BoolStorage': np.bool_,
}


def _check_fits_storage(shape, numel: int, storage_numel: int) -> None:
  """A tensor may view part of its storage, never more elements than it holds: zero or
  overlapping strides would let a few bytes of a crafted file claim any size, which the first copy
  (np.array, astype, transpose) then tries to allocate."""
  if numel > storage_numel:
    raise CheckpointError(f'a tensor of shape {tuple(shape)} has {numel} elements but its storage '
                          f'holds {storage_numel}: corrupt or crafted, not loaded')


def _rebuild_tensor(storage, offset, size, stride, *unused):
  if min(size, default=0) < 0 or len(stride) != len(size):
    raise pickle.UnpicklingError(f'A tensor of shape {size}, strides {stride}: corrupt archive.')
  _check_fits_storage(size, math.prod(size), len(storage))
  last = offset + sum((n - 1) * s for n, s in zip(size, stride)) if all(size) else offset - 1
  if offset < 0 or min(stride, default=0) < 0 or last >= len(storage):
    raise pickle.UnpicklingError('A tensor reaches outside its storage: corrupt archive.')
  if not size:
    return np.array(storage[offset])
  item = storage.itemsize
  view = np.lib.stride_tricks.as_strided(storage[offset:], shape=tuple(size),
                                         strides=tuple(s * item for s in stride))
  return np.array(view)


class _TorchScriptUnpickler(pickle.Unpickler):
  """Unpickles a TorchScript `data.pkl`, allowing only tensor rebuilding and module stand-ins."""

  def __init__(self, file, archive: zipfile.ZipFile, root: str):
    super().__init__(file)
    self._archive, self._root = archive, root
    self._names = set(archive.namelist())

  def find_class(self, module, name):
    if module.startswith('__torch__'):
      return _ScriptObject
    if module == 'torch._utils' and name in ('_rebuild_tensor_v2', '_rebuild_tensor'):
      return _rebuild_tensor
    if (module, name) == ('torch._utils', '_rebuild_parameter'):
      return lambda data, *unused: data
    if (module, name) == ('collections', 'OrderedDict'):
      return collections.OrderedDict
    if module == 'torch' and name in _STORAGE_DTYPES:
      return name
    raise pickle.UnpicklingError(f'{module}.{name} is not allowed in a weights-only read.')

  def persistent_load(self, pid):
    if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == 'storage'):
      raise pickle.UnpicklingError(f'Unknown persistent id {pid!r}.')
    _, storage_type, key, _, numel = pid
    if storage_type not in _STORAGE_DTYPES:
      raise pickle.UnpicklingError(f'Unknown storage type {storage_type!r}.')
    dtype = _STORAGE_DTYPES[storage_type]
    if dtype == 'bfloat16':
      import ml_dtypes
      dtype = ml_dtypes.bfloat16
    name = f'{self._root}/data/{key}'
    if not isinstance(key, str) or name not in self._names:
      raise pickle.UnpicklingError(f'Storage {key!r} is not in the archive.')
    dtype = np.dtype(dtype).newbyteorder('<')
    size = self._archive.getinfo(name).file_size
    if not isinstance(numel, int) or numel < 0 or numel * dtype.itemsize > size:
      raise pickle.UnpicklingError(f'Storage {key!r} claims {numel} elements of {dtype.name}; the '
                                   f'archive holds {size} bytes for it.')
    return np.frombuffer(self._archive.read(name), dtype=dtype, count=numel)


def _is_torchscript(path: pathlib.Path) -> bool:
  if not zipfile.is_zipfile(path):
    return False
  try:
    with zipfile.ZipFile(path) as z:
      names = z.namelist()
  except Exception as e:  # a damaged central directory: BadZipFile, UnicodeDecodeError, ...
    raise CheckpointError(f'{path}: a damaged zip archive ({type(e).__name__}: {e}). It is '
                          'truncated or corrupt: download it again.') from e
  return any(n.split('/', 1)[-1].startswith(('code/', 'constants.pkl')) for n in names)


def read_torchscript_archive(path) -> dict[str, np.ndarray]:
  """The parameters and buffers of a TorchScript archive (OpenAI's published CLIP .pt), no code run.

  A TorchScript .pt is a zip: `<root>/data.pkl` pickles the module objects (class
  `__torch__.<...>` + attribute dict) whose tensors point at raw little-endian storages in
  `<root>/data/<key>`. A restricted unpickler rebuilds only those tensors (anything else is
  refused), and the attribute dicts are walked to dotted names, as `module.state_dict()` would
  give them. `attn_mask` attributes of OpenAI's blocks are not parameters and are dropped. This
  replaces `torch.jit.load(path).state_dict()`, which would compile and run the archive's code.
  """
  path = pathlib.Path(path)
  try:
    with zipfile.ZipFile(path) as z:
      pkls = [n for n in z.namelist() if n.endswith('/data.pkl') and n.count('/') == 1]
      if len(pkls) != 1:
        raise CheckpointError('no <root>/data.pkl')
      with z.open(pkls[0]) as f:
        obj = _TorchScriptUnpickler(f, z, pkls[0].split('/')[0]).load()
  except Exception as e:  # pickle, zip and decoding errors of a damaged file: all mean the same
    detail = str(e) if isinstance(e, CheckpointError) else f'{type(e).__name__}: {e}'
    raise CheckpointError(f'{path}: not a readable TorchScript archive ({detail}). It is '
                          'truncated, corrupt or crafted: download it again.') from e
  out = {}

  def walk(node, prefix):
    state = node.state if isinstance(node, _ScriptObject) else node
    if not isinstance(state, dict):
      return
    for k, v in state.items():
      if isinstance(v, np.ndarray):
        if k != 'attn_mask':
          out[prefix + k] = v
      elif isinstance(v, (_ScriptObject, dict)):
        walk(v, prefix + k + '.')

  walk(obj, '')
  return out


def _torch_load_reason(e: Exception) -> str:
  """torch.load's error in one line. Its weights-only refusals open with paragraphs advising
  weights_only=False, i.e. running the file's code: only the lines saying what was refused stay."""
  lines = [line.strip() for line in str(e).splitlines() if line.strip()]
  boilerplate = ('Weights only load failed', 'Please file an issue', 'Check the documentation')
  return ' '.join([line for line in lines if not line.startswith(boilerplate)] or lines)


def load_state_dict(path) -> dict[str, np.ndarray]:
  """A flat {name: numpy array} from a .pt/.pth/.bin (TorchScript archive or torch.save'd dict)
  or a .safetensors file, without executing code from it."""
  path = pathlib.Path(path)
  if not path.is_file():
    raise FileNotFoundError(f'{path}: no such file.')
  if path.suffix == '.safetensors':
    return _read_safetensors(path)
  if _is_torchscript(path):
    return read_torchscript_archive(path)
  import torch  # only for torch.save'd state dicts
  try:
    sd = torch.load(path, map_location='cpu', weights_only=True)
  except Exception as e:  # pickle errors of many kinds; say what the file should be
    raise CheckpointError(f'{path}: not readable as a weights-only torch checkpoint '
                          f'({_torch_load_reason(e)}); nothing in it was run. It is damaged, or '
                          'holds more than tensors.') from e
  if isinstance(sd, Mapping) and isinstance(sd.get('state_dict'), Mapping):
    sd = sd['state_dict']
  if not isinstance(sd, Mapping):
    raise CheckpointError(f'{path}: holds a {type(sd).__name__}, expected a state dict.')
  arrays = {k: v for k, v in sd.items() if hasattr(v, 'shape')}
  try:
    for v in arrays.values():  # torch's set_ checks the last element only: _check_fits_storage
      if isinstance(v, torch.Tensor):
        _check_fits_storage(v.shape, v.numel(), v.untyped_storage().nbytes() // v.element_size())
  except CheckpointError as e:
    raise CheckpointError(f'{path}: {e}.') from e
  return {k: _as_numpy(v) for k, v in arrays.items()}


# ----------------------------------------------------------------------------------------------
# OpenCLIP files.

OPEN_CLIP_CONFIG = 'open_clip_config.json'
# The weights of an OpenCLIP hub repo (or `open_clip.create_model` + torch.save), first found wins.
OPEN_CLIP_WEIGHTS = ('open_clip_model.safetensors', 'open_clip_pytorch_model.safetensors',
                     'open_clip_pytorch_model.bin')
# OpenAI's image mean / std: what the data pipeline normalises with.
_OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
_OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
# vision_cfg / text_cfg fields naming towers this port does not have (value that is fine).
_OPEN_CLIP_UNSUPPORTED = {
    'vision_cfg': {'timm_model_name': None, 'attentional_pool': False, 'no_ln_pre': False,
                   'final_ln_after_pool': False, 'global_average_pool': False,
                   'pool_type': 'tok', 'ls_init_value': None, 'output_tokens': False,
                   'act_kwargs': None, 'norm_kwargs': None, 'attn_pooler_queries': None},
    'text_cfg': {'hf_model_name': None, 'embed_cls': False, 'pool_type': 'argmax',
                 'proj_bias': False, 'no_causal_mask': False, 'ls_init_value': None,
                 'act_kwargs': None, 'norm_kwargs': None, 'output_tokens': False},
}


def _open_clip_files(path: pathlib.Path) -> tuple[pathlib.Path, pathlib.Path]:
  """(weights file, open_clip_config.json) of an OpenCLIP directory or weights file."""
  if path.is_dir():
    weights = next((path / n for n in OPEN_CLIP_WEIGHTS if (path / n).is_file()), None)
    if weights is None:
      raise FileNotFoundError(f'{path} has no OpenCLIP weights ({", ".join(OPEN_CLIP_WEIGHTS)}): '
                              'download them with the model, e.g. huggingface-cli download '
                              'laion/CLIP-ViT-B-16-laion2B-s34B-b88K.')
    config = path / OPEN_CLIP_CONFIG
  elif path.is_file():
    weights, config = path, path.parent / OPEN_CLIP_CONFIG
  else:
    raise FileNotFoundError(f'{path}: no such OpenCLIP file or directory.')
  if not config.is_file():
    raise FileNotFoundError(
        f'{weights}: an OpenCLIP checkpoint needs its {OPEN_CLIP_CONFIG} beside it (the heads, '
        'the activation and the image size are not in the tensors). Download it from the '
        "model's hub repo, or write {\"model_cfg\": open_clip.get_model_config(NAME)} there.")
  return weights, config


def _open_clip_model_cfg(data: Any, where: str) -> Mapping[str, Any]:
  """`model_cfg` of an open_clip_config.json (or the bare model config), refusing towers this port
  does not have."""
  cfg = data.get('model_cfg', data) if isinstance(data, Mapping) else None
  if not (isinstance(cfg, Mapping) and isinstance(cfg.get('vision_cfg'), Mapping)
          and isinstance(cfg.get('text_cfg'), Mapping)):
    raise CheckpointError(f'{where}: no model_cfg with vision_cfg and text_cfg; expected '
                          "OpenCLIP's open_clip_config.json.")
  problems = [f'{section}.{k}={cfg[section][k]!r}'
              for section, fields in _OPEN_CLIP_UNSUPPORTED.items()
              for k, fine in fields.items()
              if cfg[section].get(k, fine) not in (fine, None, {})]
  if problems:
    raise CheckpointError(f'{where}: not an OpenAI-style CLIP ViT this port can run: '
                          f'{", ".join(problems)}.')
  return cfg


def _open_clip_spec(cfg: Mapping[str, Any], sd: Mapping[str, np.ndarray], where: str) -> CLIPSpec:
  """The spec of an OpenCLIP `model_cfg` and its (checked) OpenAI-named tensors: the heads and
  the activation from the JSON (OpenCLIP's defaults where absent), every size from the tensors,
  which the JSON's sizes must agree with."""
  vc, tc = cfg['vision_cfg'], cfg['text_cfg']
  sizes = {'vision_cfg.head_width': vc.get('head_width', 64), 'text_cfg.heads': tc.get('heads', 8)}
  _require_positive_ints(sizes, list(sizes), where)
  spec = _openai_spec(sd, None)
  spec = dataclasses.replace(
      spec, vision_heads=spec.vision_width // sizes['vision_cfg.head_width'],
      text_heads=sizes['text_cfg.heads'],
      # OpenCLIP: quick_gelu for OpenAI-trained weights (the *-quickgelu configs), else exact GELU.
      activation='quick_gelu' if cfg.get('quick_gelu', False) else 'gelu')
  json_size = vc.get('image_size')
  if json_size is not None:
    json_size = image_ops.as_pair(json_size if isinstance(json_size, int) else tuple(json_size))
  facts = {
      'embed_dim': (cfg.get('embed_dim'), spec.embed_dim),
      'vision_cfg.width': (vc.get('width'), spec.vision_width),
      'vision_cfg.layers': (vc.get('layers'), spec.vision_layers),
      'vision_cfg.patch_size': (vc.get('patch_size'), spec.patch_size),
      'vision_cfg.image_size': (json_size, spec.image_size),
      'text_cfg.width': (tc.get('width'), spec.text_width),
      'text_cfg.layers': (tc.get('layers'), spec.text_layers),
      'text_cfg.context_length': (tc.get('context_length'), spec.context_length),
      'text_cfg.vocab_size': (tc.get('vocab_size'), spec.vocab_size),
  }
  wrong = [f'{k}={a!r} but the tensors say {b!r}' for k, (a, b) in facts.items()
           if a is not None and a != b]
  if wrong:
    raise CheckpointError(f'{where} does not describe these weights: ' + '; '.join(wrong)
                          + '. Use the config of the same model.')
  return spec


def load_open_clip(path, image_size: int | Sequence[int] | None = None
                   ) -> tuple[CLIPSpec, dict[str, Params]]:
  """An OpenCLIP ViT checkpoint: a directory with `open_clip_pytorch_model.bin` (or
  `open_clip_model.safetensors`) and `open_clip_config.json`, as on the HF hub, or the weights
  file with the JSON beside it. OpenCLIP's names are OpenAI's, so the tensors go through
  `clip_from_state_dict`; the JSON gives what no shape shows (heads, quick_gelu or GELU) and is
  checked against the tensors. Returns (spec, towers) as `load_clip`."""
  import warnings  # pylint: disable=g-import-not-at-top
  weights, config_path = _open_clip_files(pathlib.Path(os.path.expanduser(str(path))))
  data = _read_json(config_path)
  cfg = _open_clip_model_cfg(data, str(config_path))
  sd = load_state_dict(weights)
  if sd and all(k.startswith('module.') for k in sd):  # a DDP training checkpoint
    sd = {k[len('module.'):]: v for k, v in sd.items()}
  sd = {k: v for k, v in sd.items() if k != 'attn_mask'}  # a buffer of older OpenCLIP versions
  _, params = clip_from_state_dict(sd, image_size)  # checks every tensor's name and shape
  spec = _open_clip_spec(cfg, sd, str(config_path))
  pre = data.get('preprocess_cfg') if isinstance(data, Mapping) else None
  for key, ours in (('mean', _OPENAI_MEAN), ('std', _OPENAI_STD)):
    theirs = pre.get(key) if isinstance(pre, Mapping) else None
    if theirs is not None and not np.allclose(theirs, ours, atol=1e-4):
      warnings.warn(f'{config_path}: preprocess_cfg.{key}={theirs} differs from OpenAI\'s {ours}, '
                    'which the data pipeline normalises with.', stacklevel=2)
  if image_size is not None:
    spec = dataclasses.replace(spec, image_size=image_ops.as_pair(image_size))
  _check_spec(spec, params, str(weights))
  return spec, params


def _is_open_clip(path: pathlib.Path) -> bool:
  """An OpenCLIP directory (its JSON and no HF config.json), or an OpenCLIP-named weights file
  (which without its JSON is an error there, not silently read as OpenAI's)."""
  if path.is_dir():
    return (path / OPEN_CLIP_CONFIG).is_file() and not (path / 'config.json').is_file()
  return path.is_file() and (path.name.startswith('open_clip')
                             or (path.parent / OPEN_CLIP_CONFIG).is_file())


# ----------------------------------------------------------------------------------------------
# The entry point.


def looks_like_hub_id(s: str) -> bool:
  return bool(re.fullmatch(r'[A-Za-z0-9][\w.-]*/[\w.-]+', s)) and not s.endswith(
      ('.pt', '.pth', '.bin', '.safetensors'))


def _resolve(path_or_hub_id, allow_patterns: Sequence[str]) -> pathlib.Path:
  """A local path, or a hub id downloaded to the HF cache."""
  path = pathlib.Path(os.path.expanduser(str(path_or_hub_id)))
  if path.exists():
    return path
  if looks_like_hub_id(str(path_or_hub_id)):
    import huggingface_hub
    try:
      return pathlib.Path(huggingface_hub.snapshot_download(str(path_or_hub_id),
                                                            allow_patterns=list(allow_patterns)))
    except Exception as e:  # offline, unknown repo, ...
      raise FileNotFoundError(f'{path_or_hub_id!r} is neither a local path nor a downloadable hub '
                              f'id ({type(e).__name__}: {e}).') from e
  raise FileNotFoundError(
      f'{path}: no such file or directory. Pass an HF CLIP directory (config.json + '
      "model.safetensors), an OpenAI CLIP .pt file, or a hub id such as "
      "'openai/clip-vit-base-patch16'.")


def load_clip(path_or_hub_id, image_size: int | Sequence[int] | None = None
              ) -> tuple[CLIPSpec, dict[str, Params]]:
  """Loads a CLIP ViT from an HF directory / hub id or an OpenAI .pt (TorchScript or state dict).

  Args:
    path_or_hub_id: a `CLIPModel.save_pretrained` directory, a hub id such as
      'openai/clip-vit-base-patch16', an OpenAI CLIP file (the published TorchScript archive,
      a torch.save'd state dict, or a .safetensors with OpenAI names), an OpenCLIP directory or
      weights file with its open_clip_config.json (`load_open_clip`), or a directory written by
      `python -m otseg_jax.convert --from openai-clip|hf-clip|open-clip`.
    image_size: int or (H, W) the vision tower is configured for; the positional grid is resized
      to image_size // patch at load time. None keeps the checkpoint's.

  Returns:
    (spec, {'visual': VisionTransformer params, 'text': TextTransformer params}), numpy arrays.
  """
  local_path = pathlib.Path(os.path.expanduser(str(path_or_hub_id)))
  if (local_path / 'params').is_dir() and (local_path / 'metadata.json').is_file():
    return _load_converted_dir(local_path, image_size)
  if _is_open_clip(local_path):
    return load_open_clip(local_path, image_size)
  local = local_path.exists()
  path = _resolve(path_or_hub_id, ['*.json', '*.safetensors', '*.txt'])
  if not local and not any((path / n).is_file()
                           for n in ('model.safetensors', 'model.safetensors.index.json')):
    path = _resolve(path_or_hub_id, ['*.json', '*.txt', 'pytorch_model.bin'])  # older hub repos
  if path.is_dir():
    return _load_hf_dir(path, image_size)
  return clip_from_state_dict(load_state_dict(path), image_size)
