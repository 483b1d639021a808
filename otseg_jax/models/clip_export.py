"""Our CLIP trees -> a transformers `CLIPModel` directory: the inverse of clip_weights' HF path.

  save_hf_clip(directory, spec, params, logit_scale)

writes config.json (a `transformers.CLIPConfig`) and model.safetensors under HF `CLIPModel` names,
as `CLIPModel.save_pretrained` would, so `clip_weights.load_clip(directory)` and
`transformers.CLIPModel.from_pretrained(directory)` both read it. Renames and transposes mirror
`clip_weights._hf_to_openai` + `visual_params_from_state_dict` / `text_params_from_state_dict`
line by line: linen Dense kernels are (in, out), torch Linear weights (out, in); the patch conv is
(p, p, 3, D) here and (D, 3, p, p) in torch; HF keeps q, k, v as separate projections as we do.
"""

import pathlib
from collections.abc import Mapping
from typing import Any

import numpy as np

from otseg_jax.models.clip import CLIPSpec

Params = Mapping[str, Any]


def _linear(dense: Params, name: str) -> dict[str, np.ndarray]:
  """A linen Dense {'kernel' (in, out), 'bias'} -> torch Linear {name.weight (out, in), name.bias}."""
  return {f'{name}.weight': np.asarray(dense['kernel']).T, f'{name}.bias': np.asarray(dense['bias'])}


def _layer_norm(ln: Params, name: str) -> dict[str, np.ndarray]:
  return {f'{name}.weight': np.asarray(ln['scale']), f'{name}.bias': np.asarray(ln['bias'])}


def _encoder(transformer: Params, prefix: str) -> dict[str, np.ndarray]:
  """`Transformer` params {'resblocks_i': ...} -> HF `{prefix}encoder.layers.i.*` tensors."""
  out = {}
  layers = sorted(int(k.split('_')[1]) for k in transformer)
  if layers != list(range(len(layers))):
    raise ValueError(f'transformer blocks {layers} are not numbered 0..{len(layers) - 1}.')
  for i in layers:
    block, hf = transformer[f'resblocks_{i}'], f'{prefix}encoder.layers.{i}.'
    for name in ('q_proj', 'k_proj', 'v_proj', 'out_proj'):
      out.update(_linear(block['attn'][name], f'{hf}self_attn.{name}'))
    out.update(_layer_norm(block['ln_1'], f'{hf}layer_norm1'))
    out.update(_layer_norm(block['ln_2'], f'{hf}layer_norm2'))
    out.update(_linear(block['mlp']['c_fc'], f'{hf}mlp.fc1'))
    out.update(_linear(block['mlp']['c_proj'], f'{hf}mlp.fc2'))
  return out


def hf_state_dict(params: Params, logit_scale: float) -> dict[str, np.ndarray]:
  """{'visual': VisionTransformer params (no prompts), 'text': TextTransformer params} and the
  log temperature -> the tensors of a `transformers.CLIPModel`, float32, by HF name."""
  visual, text = params['visual'], params['text']
  if any('prompt' in k for k in visual):
    raise ValueError('The image tower has prompt parameters: export a plain CLIP, without the '
                     'prompts OTSeg adds.')
  v, t = 'vision_model.', 'text_model.'
  sd = {
      v + 'embeddings.class_embedding': visual['class_embedding'],
      # (p, p, 3, D) -> torch Conv2d (D, 3, p, p)
      v + 'embeddings.patch_embedding.weight': np.asarray(visual['conv1']['kernel']).transpose(
          3, 2, 0, 1),
      v + 'embeddings.position_embedding.weight': visual['positional_embedding'],
      **_layer_norm(visual['ln_pre'], v + 'pre_layrnorm'),  # sic, HF's name
      **_encoder(visual['transformer'], v),
      **_layer_norm(visual['ln_post'], v + 'post_layernorm'),
      'visual_projection.weight': np.asarray(visual['proj']).T,
      t + 'embeddings.token_embedding.weight': text['token_embedding']['embedding'],
      t + 'embeddings.position_embedding.weight': text['positional_embedding'],
      **_encoder(text['transformer'], t),
      **_layer_norm(text['ln_final'], t + 'final_layer_norm'),
      'text_projection.weight': np.asarray(text['text_projection']).T,
      'logit_scale': np.asarray(logit_scale),
  }
  # np.array, not np.ascontiguousarray, which would make the scalar logit_scale 1-d.
  return {k: np.array(x, np.float32, order='C') for k, x in sd.items()}


def _mlp_width(transformer: Params) -> int:
  return int(np.shape(transformer['resblocks_0']['mlp']['c_fc']['kernel'])[1])


def hf_config(spec: CLIPSpec, params: Params, *, logit_scale: float, bos_token_id: int,
              eos_token_id: int, pad_token_id: int) -> Any:
  """The `transformers.CLIPConfig` of `spec` and `params` (QuickGELU, LayerNorm eps 1e-5, as
  `clip.py`; the MLP widths read from the weights).

  HF pools the text at the first `eos_token_id`, we at the largest id: the tokenizer's EOT must be
  its largest id for the two to agree (OpenAI's layout).
  """
  import transformers  # pylint: disable=g-import-not-at-top
  h, w = spec.image_size
  if h != w:
    raise ValueError(f'HF CLIP configs are square; spec.image_size is {spec.image_size}.')
  if eos_token_id != spec.vocab_size - 1:
    raise ValueError(f'EOT id {eos_token_id} is not the largest id {spec.vocab_size - 1}: HF and '
                     'clip.TextTransformer would pool the text at different tokens.')
  common = dict(hidden_act=spec.activation, layer_norm_eps=1e-5, projection_dim=spec.embed_dim)
  return transformers.CLIPConfig(
      text_config=dict(hidden_size=spec.text_width,
                       intermediate_size=_mlp_width(params['text']['transformer']),
                       num_hidden_layers=spec.text_layers, num_attention_heads=spec.text_heads,
                       vocab_size=spec.vocab_size, max_position_embeddings=spec.context_length,
                       bos_token_id=bos_token_id, eos_token_id=eos_token_id,
                       pad_token_id=pad_token_id, **common),
      vision_config=dict(hidden_size=spec.vision_width,
                         intermediate_size=_mlp_width(params['visual']['transformer']),
                         num_hidden_layers=spec.vision_layers,
                         num_attention_heads=spec.vision_heads, image_size=h,
                         patch_size=spec.patch_size, num_channels=3, **common),
      projection_dim=spec.embed_dim, logit_scale_init_value=float(logit_scale),
      architectures=['CLIPModel'])


def save_hf_clip(directory, spec: CLIPSpec, params: Params, logit_scale: float, *,
                 bos_token_id: int, eos_token_id: int, pad_token_id: int) -> None:
  """Writes config.json and model.safetensors of a `CLIPModel` into `directory` (which must exist;
  callers write into a temporary directory and rename it, so readers never see half of one)."""
  import safetensors.numpy  # pylint: disable=g-import-not-at-top
  directory = pathlib.Path(directory)
  config = hf_config(spec, params, logit_scale=logit_scale, bos_token_id=bos_token_id,
                     eos_token_id=eos_token_id, pad_token_id=pad_token_id)
  config.save_pretrained(directory)
  # transformers refuses a safetensors file without format metadata.
  safetensors.numpy.save_file(hf_state_dict(params, logit_scale),
                              str(directory / 'model.safetensors'), metadata={'format': 'pt'})
