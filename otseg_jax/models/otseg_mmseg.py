"""The authors' mmseg checkpoints and reference dumps -> OTSeg's parameter tree and config.

OTSeg's part of `python -m otseg_jax.convert --from mmseg` and of `otseg_jax.parity`, reached
through the method's optional hooks (`otseg.from_mmseg_state_dict`, `otseg.config_from_reference`,
`otseg.mmseg_decoder_layer_rows`); the converter and parity never import this module.

Every tensor is mapped by name (rename + transpose): `backbone.*` is the OpenAI-layout VPT image
tower (`clip_weights.visual_params_from_state_dict`), `decode_head.*` the head below. Tensors the
model never uses (decoder self_attn / norm1, the last decoder layer's v, proj, FFN and norms, the
loss buffer, `text_encoder.*`) are listed and skipped; a missing or unexpected tensor is an error
that names it.
"""

from collections.abc import Callable, Mapping
import re
from typing import Any

from flax import traverse_util
import jax
import ml_collections
import numpy as np

from otseg_jax.models import clip_weights

Path = tuple[str, ...]
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
        f'{", ".join(missing)}. Is it an OTSeg checkpoint of this config (--config)?')
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


def params_from_state_dict(state_dict: Mapping[str, np.ndarray],
                           config: ml_collections.ConfigDict) -> tuple[dict, list[str]]:
  """OTSeg params from an mmseg state dict (`backbone.*`, `decode_head.*`, `text_encoder.*`).

  Args:
    state_dict: torch names -> numpy arrays in PyTorch layouts (dtypes kept).
    config: the model config (`otseg.get_config`); fixes the grid and the number of layers.

  Returns:
    (params {'backbone', 'decode_head'}, sorted unused names). The caller checks the tree against
    the model's (`convert.params_from_state_dict` does).
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
  return params, sorted(unused)


def config_from_reference(ref: Mapping[str, Any],
                          config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """`config` (OTSeg's default model config) updated from a reference dump's `config/json`
  (../shared/reference/README.md)."""
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
