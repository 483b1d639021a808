"""OTSeg: VPT-CLIP image tower + relationship descriptor + MPS path + MPSA decoder.

A method module (`config.model.name = 'otseg'`): `get_config`, `model_from_config` (the linen
`OTSeg`, whose `__call__` returns `(maps, aux)` and whose `encode_text` gives the class text),
`eval_probabilities` and `pseudo_labels`. Its config names the rest: the trained parameters
(`trainable`, a regex over parameter paths), the class text it asks for (`text`), the CLIP towers
it starts from (`clip_towers`); the loss is `config.loss.name` of `otseg_jax.losses`.

Everything is channels-last. Letters in shapes and einsum strings:
  B batch, K classes, N prompts per class, C embedding dim, M = h*w feature-map pixels,
  (h, w) token grid, (H, W) image size, L decoder layers.

Module names mirror the authors' mmseg state dict (`backbone.*`, `decode_head.q_proj`,
`decode_head.decoder_1.layers.{i}.multihead_attn.{q,k,v,proj}`, `norm2`, `norm3`, `linear1`,
`linear2`) so that converting them (`otseg_mmseg`, through `from_mmseg_state_dict`) is a rename
plus transpose.

The OT layers (transport map, Sinkhorn attention, decoder layer, layer-map combination) live in
`ot_layers`, shared with the variants (ZegOT, MVP-SEG, LDVC), which write their own method module
next to this one.
"""

from collections.abc import Mapping
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from otseg_jax import image_ops
from otseg_jax import ot
from otseg_jax.models import clip
from otseg_jax.models import ot_layers
from otseg_jax.models import otseg_mmseg

Dtype = Any


def get_config(name: str = 'voc') -> ml_collections.ConfigDict:
  """Model fields, defaults = the authors' VOC zero-shot config (ViT-B/16 at 512).

  Args:
    name: 'voc' (default), 'context' (crop 480, 8 prompts) or 'coco' (100 prompt tokens,
      8 prompts). Only the model fields differ; datasets and schedules live in the train configs.
  """
  config = ml_collections.ConfigDict()
  config.name = 'otseg'  # The method: otseg_jax.models.otseg.
  config.variant = name
  # Trained parameters, searched in the '/'-joined path: the reference's
  # `_freeze_stages(exclude_key='prompt')` (prompt_embeddings, deep_prompt_embeddings, prompt_proj,
  # prompt_norm) and the whole decode head; the rest of the image tower is frozen.
  config.trainable = r'(^|/)decode_head/|prompt'
  # The class text is an input: the (K, N, C) embeddings ('embeddings'), not learned.
  config.text = 'embeddings'
  # CLIP towers the parameters start from ({subtree: CLIP tower}) and the paths CLIP does not
  # provide (the new prompts).
  config.clip_towers = {'backbone': 'visual'}
  config.dont_load = 'prompt'
  # Crop size S: the backbone's positional grid is resized to S/patch at load time.
  config.image_size = 512
  config.backbone = ml_collections.ConfigDict(dict(
      patch_size=16,
      width=768,
      layers=12,
      heads=12,
      output_dim=512,
      num_prompt_tokens=10,
      prompt_depth=11,  # total_d_layer: blocks 1..prompt_depth get deep prompts.
      prompt_dropout=0.1,
      # Queries per block of clip.chunked_attention (0 = dense attention, the same numbers): on
      # 2 CPU threads the train step at 512 was 1.4-1.6x faster with 2/3 of the memory (README).
      attention_query_chunk=256,
      # 'auto': cuDNN flash attention on GPU in bfloat16, else 'chunked' (clip.ATTENTION).
      attention='auto',
      remat='none',  # 'none' | 'block' | a jax.checkpoint_policies name (clip.REMAT)
      mlp_dim=0,  # the CLIP's MLP width, 0 = 4 * width (ViT-B/16: 3072); checked against the CLIP
      activation='quick_gelu',  # the CLIP's MLP activation (clip.ACTIVATIONS); checked likewise
  ))
  config.head = ml_collections.ConfigDict(dict(
      decoder_layers=3,
      num_heads=8,  # Unused by 'mpsa' (single head, as the reference); used by 'softmax'.
      attention='mpsa',  # 'mpsa' (Sinkhorn attention) | 'softmax' (ZegCLIP-style ablation).
      use_mps=True,  # The MPS score path (a); off -> decoder map alone.
      dropout=0.1,
  ))
  config.ot = ot.get_config()
  # Compute dtype of matmuls and convolutions: 'float32' or 'bfloat16'. Parameters, optimizer
  # state, LayerNorm, softmax, the Sinkhorn solve, the losses and the returned logits stay float32.
  config.dtype = 'float32'
  config.num_prompts = 6  # N, checked against the text array.
  # Eval: sigmoid(w * decoder + (1 - w) * score), minus `calibration` on the seen channels.
  config.ensemble_weight = 0.5
  config.calibration = 0.1  # 0.1 inductive; set 0 for transductive / fully supervised.
  # Transductive pseudo-labels: sigmoid(b * score + (1 - b) * decoder).
  config.pseudo_label_balance = 0.5

  if name == 'voc':
    pass
  elif name == 'context':
    config.image_size = 480
    config.num_prompts = 8
  elif name == 'coco':
    config.backbone.num_prompt_tokens = 100
    config.num_prompts = 8
  else:
    raise ValueError(f'Unknown model config {name!r}: use one of voc, context, coco.')
  return config


def resolve_attention(attention: str, dtype: Dtype) -> str:
  """The image tower's attention implementation for this platform (`clip.ATTENTION`).

  'auto': 'chunked' on CPU (blocks of queries stay in cache there); on accelerators cuDNN's
  flash attention in a 16-bit dtype ('cudnn', GPU), else XLA's ('xla'). Other names are checked
  and returned as they are.
  """
  if attention != 'auto':
    clip.check_attention(attention, dtype)
    return attention
  backend = jax.default_backend()
  if backend == 'cpu':
    return 'chunked'
  if backend == 'gpu' and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16):
    return 'cudnn'
  return 'xla'


def compute_dtype(config: ml_collections.ConfigDict, dtype: Dtype = None) -> jnp.dtype:
  """A method's compute dtype: `dtype` if given (the parity checks run in float64), else
  `config.dtype`; a clear error for anything but float32 / bfloat16 (/ float64)."""
  dtype = jnp.dtype(dtype or config.get('dtype', 'float32'))
  if dtype not in (jnp.float32, jnp.bfloat16, jnp.float64):
    raise ValueError(f"config.model.dtype={dtype.name!r}: use 'float32' or 'bfloat16'.")
  return dtype


def vision_tower_fields(config: ml_collections.ConfigDict, dtype: Dtype, *,
                        prompts: bool = True) -> flax.core.FrozenDict:
  """`clip.VisionTransformer`'s keyword arguments from a method's model config.

  Every method builds its image tower from the same `config.backbone` fields and
  `config.image_size`, with the attention resolved for this platform (`resolve_attention`).
  `prompts=False` (or a backbone without the fields): no deep visual prompts, a plain CLIP tower.
  The caller adds what is its own (`double_class_embedding`, `hidden_layers`, `dtype`).
  """
  b = config.backbone
  return flax.core.FrozenDict(
      patch_size=b.patch_size, width=b.width, layers=b.layers, heads=b.heads,
      output_dim=b.output_dim, image_size=config.image_size,
      num_prompt_tokens=b.get('num_prompt_tokens', 0) if prompts else 0,
      prompt_depth=b.get('prompt_depth', 0) if prompts else 0,
      prompt_dropout=b.get('prompt_dropout', 0.0) if prompts else 0.0,
      attention_query_chunk=b.get('attention_query_chunk', 0),
      attention=resolve_attention(b.get('attention', 'auto'), dtype),
      remat=b.get('remat', 'none'), mlp_dim=b.get('mlp_dim', 0),
      activation=b.get('activation', 'quick_gelu'))


def model_from_config(config: ml_collections.ConfigDict, dtype: Dtype = None) -> 'OTSeg':
  """The `OTSeg` module described by `config` (see `get_config`).

  `dtype` overrides `config.dtype` (the parity checks run the model in float64).
  """
  dtype = compute_dtype(config, dtype)
  if config.head.attention not in ('mpsa', 'softmax'):
    raise ValueError(f"config.head.attention={config.head.attention!r}: use 'mpsa' or 'softmax'.")
  if config.head.decoder_layers < 1:
    raise ValueError(f'config.head.decoder_layers={config.head.decoder_layers}: need at least 1.')
  return OTSeg(
      vision_tower=vision_tower_fields(config, dtype),
      decoder_layers=config.head.decoder_layers,
      num_heads=config.head.num_heads,
      attention=config.head.attention,
      use_mps=config.head.use_mps,
      dropout=config.head.dropout,
      ot_config=ml_collections.FrozenConfigDict(config.ot),
      dtype=dtype)


# ---------------------------------------------------------------------------------------------
# What the trainer and the evaluator ask of a method, besides the model: eval probabilities and
# transductive pseudo-labels. Both read the model config.


def eval_probabilities(maps: Mapping[str, jax.Array], seen: jax.Array,
                       config: ml_collections.ConfigDict) -> jax.Array:
  """Ensembled, calibrated class probabilities (the reference's `semantic_inference`).

  Args:
    maps: 'decoder' (B, H, W, K) logits and, with the MPS path, 'score' (B, H, W, K) logits.
    seen: (K,) bool, the classes seen in training.
    config: the model config: `ensemble_weight` w in sigmoid(w * decoder + (1 - w) * score),
      `calibration` subtracted from the probabilities of seen classes (0.1 inductive, else 0).

  Returns:
    (B, H, W, K) shifted probabilities; argmax over K gives the label.
  """
  logits = maps['decoder']
  if 'score' in maps:
    w = config.ensemble_weight
    logits = w * logits + (1.0 - w) * maps['score']
  seen = jnp.asarray(seen, bool)
  if seen.shape != (logits.shape[-1],):
    raise ValueError(f'seen mask has shape {seen.shape}, expected ({logits.shape[-1]},): one '
                     'flag per class of the text array.')
  return jax.nn.sigmoid(logits) - config.calibration * seen.astype(logits.dtype)


def pseudo_labels(maps: Mapping[str, jax.Array], labels: jax.Array, seen: np.ndarray,
                  config: ml_collections.ConfigDict) -> jax.Array:
  """Transductive self-training targets (spec section 7).

  Pixels whose ground truth is an unseen class get argmax_k of sigmoid(b * score + (1 - b) *
  decoder), b = config.pseudo_label_balance, with the seen channels set to -1 (so always an unseen
  class), computed without gradient; every other pixel keeps its label (seen classes by global
  index, 255 ignore).

  Args:
    maps: 'decoder' and 'score' (B, H, W, K) logits of the training forward (dropout on, as the
      reference computes them).
    labels: (B, H, W) int, global class ids (0..K-1) or 255.
    seen: (K,) bool numpy, the seen classes.
    config: the model config.

  Returns:
    (B, H, W) int32.
  """
  logits = maps['decoder']
  if 'score' in maps:
    b = config.pseudo_label_balance
    logits = b * maps['score'] + (1.0 - b) * logits
  probs = jax.nn.sigmoid(jax.lax.stop_gradient(logits))
  seen = np.asarray(seen, bool)
  probs = jnp.where(jnp.asarray(seen), -1.0, probs)
  pseudo = jnp.argmax(probs, axis=-1).astype(jnp.int32)
  is_unseen_px = jnp.isin(labels, jnp.asarray(np.flatnonzero(~seen).astype(np.int32)))
  return jnp.where(is_unseen_px, pseudo, labels.astype(jnp.int32))


# ---------------------------------------------------------------------------------------------
# Optional hooks of the method seam (otseg_jax/models/__init__.py): the authors' mmseg
# checkpoints and reference dumps, for `convert --from mmseg` and `parity` (otseg_mmseg).


def from_mmseg_state_dict(state_dict: Mapping[str, np.ndarray],
                          config: ml_collections.ConfigDict) -> tuple[dict, list[str]]:
  """(params {'backbone', 'decode_head'}, sorted unused names) of an mmseg state dict."""
  return otseg_mmseg.params_from_state_dict(state_dict, config)


def config_from_reference(ref: Mapping[str, Any]) -> ml_collections.ConfigDict:
  """The model config of a reference dump's `config/json` (../shared/reference)."""
  return otseg_mmseg.config_from_reference(ref, get_config())


# parity: the last decoder layer's tensors, which the model never creates.
mmseg_decoder_layer_rows = otseg_mmseg.decoder_layer_rows


# ---------------------------------------------------------------------------------------------
# The model.


class OTSegHead(nn.Module):
  """The decode head (`ATMSingleHeadSeg`, single stage, no input projection)."""
  embed_dims: int
  ot_config: Any
  decoder_layers: int = 3
  num_heads: int = 8
  attention: str = 'mpsa'
  use_mps: bool = True
  dropout: float = 0.0
  dtype: Dtype = None

  @nn.compact
  def __call__(self, dense: jax.Array, global_: jax.Array, text: jax.Array, *,
               train: bool) -> dict[str, Any]:
    """Low-resolution logit maps.

    Args:
      dense: (B, h, w, C) L2-normalised pixel embeddings.
      global_: (B, C) L2-normalised global embedding.
      text: (K, N, C) L2-normalised text embeddings.
      train: enables dropout (rng 'dropout').

    Returns:
      'decoder': (B, h, w, K) decoder-path logits;
      'score': (B, h, w, K) MPS-path logits (only with use_mps);
      'q_proj': (B, K, N, C) the relationship descriptor;
      'layer_queries': L-1 arrays (B, K, N, C), the output queries of the layers but the last;
      'layer_maps': (L, B, h, w, K) each layer's map;
      'sinkhorn_iterations': the solver's iteration counts in call order (MPS path, then the
        layers; none for softmax layers);
      'sinkhorn_iterations_by_path': the same counts by path, {'mps': .., 'layers_0': .., ...}
        (what the trainer logs).
    """
    b, h, w, c = dense.shape
    if text.ndim != 3 or text.shape[-1] != c:
      raise ValueError(f'text has shape {text.shape}, expected (K, N, {c}): classes x prompts x '
                       'embedding dim of the image tower.')
    pixels = dense.reshape(b, h * w, c)
    t = jnp.broadcast_to(text.astype(dense.dtype), (b, *text.shape))
    # Relationship descriptor: q_proj(concat(global * t, t)), (B, K, N, 2C) -> (B, K, N, C).
    q = ot_layers.at_least_f32(ot_layers.dense(self.embed_dims, self.dtype, 'q_proj')(
        ot_layers.relationship_features(global_, t)))
    outputs = {'q_proj': q}
    iterations = {}

    if self.use_mps:
      _, score, info = ot_layers.transport_map(
          ot_layers.l2_normalize(pixels), ot_layers.l2_normalize(q), self.ot_config)
      iterations['mps'] = info['iterations']
      outputs['score'] = score.reshape(b, h, w, -1)

    x, maps, queries = q, [], []
    for i in range(self.decoder_layers):
      last = i == self.decoder_layers - 1
      x, attn_map, aux = ot_layers.MPSADecoderLayer(
          self.embed_dims, self.ot_config, self.attention, self.num_heads, self.dropout,
          with_output=not last, dtype=self.dtype, name=f'layers_{i}')(x, pixels, train=train)
      if 'sinkhorn_iterations' in aux:
        iterations[f'layers_{i}'] = aux['sinkhorn_iterations']
      maps.append(attn_map.reshape(b, h, w, -1))
      if not last:
        queries.append(x)
    outputs['decoder'] = ot_layers.combine_layer_maps(maps)
    outputs['layer_maps'] = jnp.stack(maps)
    outputs['layer_queries'] = queries
    outputs['sinkhorn_iterations'] = list(iterations.values())
    outputs['sinkhorn_iterations_by_path'] = iterations
    return outputs


class OTSeg(nn.Module):
  """VPT-CLIP image tower + `OTSegHead` + bilinear upsampling to the input size."""
  vision_tower: Any  # clip.VisionTransformer's keyword arguments (`vision_tower_fields`)
  ot_config: Any
  decoder_layers: int = 3
  num_heads: int = 8
  attention: str = 'mpsa'
  use_mps: bool = True
  dropout: float = 0.0
  dtype: Dtype = jnp.float32

  def setup(self):
    self.backbone = clip.VisionTransformer(**self.vision_tower, double_class_embedding=True,
                                           dtype=self.dtype)
    self.decode_head = OTSegHead(
        embed_dims=self.vision_tower['output_dim'], ot_config=self.ot_config,
        decoder_layers=self.decoder_layers, num_heads=self.num_heads, attention=self.attention,
        use_mps=self.use_mps, dropout=self.dropout, dtype=self.dtype)

  def encode_text(self, text: jax.Array, *, train: bool) -> jax.Array:
    """The class text the head reads: OTSeg's is fixed, (K, N, C) in, the same out."""
    del train  # Nothing learned: the text embeddings are an input.
    return text

  def encode_image(self, images: jax.Array, *, train: bool) -> tuple[jax.Array, jax.Array]:
    """images (B, H, W, 3) -> (dense (B, h, w, C), global (B, C)), both L2-normalised over C."""
    global_, dense, _ = self.backbone(images, train=train)
    # The head reads the embeddings in float32 (or float64): cosines feed the Sinkhorn costs,
    # whose rounding exp(-C / eps) amplifies 1 / eps = 20 times.
    dense, global_ = ot_layers.at_least_f32(dense), ot_layers.at_least_f32(global_)
    # Plain division, as the reference backbone (no eps).
    dense = dense / jnp.linalg.norm(dense, axis=-1, keepdims=True)
    global_ = global_ / jnp.linalg.norm(global_, axis=-1, keepdims=True)
    return dense, global_

  def __call__(self, images: jax.Array, text: jax.Array, *,
               train: bool) -> tuple[dict[str, jax.Array], dict[str, Any]]:
    """Logit maps at the input resolution, and the intermediates.

    Args:
      images: (B, H, W, 3) normalised images.
      text: (K, N, C) L2-normalised text embeddings (seen rows in inductive training), from
        `encode_text`.
      train: train mode (dropout on; rng 'dropout').

    Returns:
      maps: 'decoder', 'score': (B, H, W, K) logits ('score' only with use_mps), what the loss
        and the evaluation read.
      aux: 'decoder_lowres', 'score_lowres': (B, h, w, K); 'q_proj', 'layer_queries',
        'layer_maps', 'sinkhorn_iterations', 'sinkhorn_iterations_by_path': see `OTSegHead`;
        'dense' (B, h, w, C), 'global' (B, C): the normalised backbone outputs.
    """
    dense, global_ = self.encode_image(images, train=train)
    out = self.decode_head(dense, global_, text, train=train)
    size = images.shape[1:3]
    maps = {'decoder': image_ops.resize_bilinear(out['decoder'], size)}
    aux = dict(out, dense=dense, decoder_lowres=out['decoder'])
    aux['global'] = global_
    del aux['decoder']
    if 'score' in out:
      maps['score'] = image_ops.resize_bilinear(out['score'], size)
      aux['score_lowres'] = aux.pop('score')
    return maps, aux
