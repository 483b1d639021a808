"""OTSeg: VPT-CLIP image tower + relationship descriptor + MPS path + MPSA decoder.

Everything is channels-last. Letters in shapes and einsum strings:
  B batch, K classes, N prompts per class, C embedding dim, M = h*w feature-map pixels,
  (h, w) token grid, (H, W) image size, L decoder layers.

Module names mirror the authors' mmseg state dict (`backbone.*`, `decode_head.q_proj`,
`decode_head.decoder_1.layers.{i}.multihead_attn.{q,k,v,proj}`, `norm2`, `norm3`, `linear1`,
`linear2`) so that `otseg_jax.convert` is a rename plus transpose.

The reusable pieces for other methods (ZegOT, MVP-SEG, LDVC) are the module-level functions
(`l2_normalize`, `transport_map`, `combine_layer_maps`, `eval_probabilities`,
`sinkhorn_iterations`, `trainable_mask`, `split_params`, `merge_params`) and the layer modules.
A variant writes its own head and segmentor module next to this one, reusing
`clip.VisionTransformer`, `ot.sinkhorn_plan`, the losses and the trainer.
"""

from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
from flax import traverse_util
import jax
import jax.numpy as jnp
import ml_collections

from otseg_jax import image_ops
from otseg_jax import ot
from otseg_jax.models import clip

Dtype = Any


def get_config(name: str = 'voc') -> ml_collections.ConfigDict:
  """Model fields, defaults = the authors' VOC zero-shot config (ViT-B/16 at 512).

  Args:
    name: 'voc' (default), 'context' (crop 480, 8 prompts) or 'coco' (100 prompt tokens,
      8 prompts). Only the model fields differ; datasets and schedules live in the train configs.
  """
  config = ml_collections.ConfigDict()
  config.name = name
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


def model_from_config(config: ml_collections.ConfigDict, dtype: Dtype = None) -> 'OTSeg':
  """The `OTSeg` module described by `config` (see `get_config`).

  `dtype` overrides `config.dtype` (the parity checks run the model in float64).
  """
  dtype = jnp.dtype(dtype or config.get('dtype', 'float32'))
  if dtype not in (jnp.float32, jnp.bfloat16, jnp.float64):
    raise ValueError(f"config.model.dtype={dtype.name!r}: use 'float32' or 'bfloat16'.")
  if config.head.attention not in ('mpsa', 'softmax'):
    raise ValueError(f"config.head.attention={config.head.attention!r}: use 'mpsa' or 'softmax'.")
  if config.head.decoder_layers < 1:
    raise ValueError(f'config.head.decoder_layers={config.head.decoder_layers}: need at least 1.')
  b = config.backbone
  return OTSeg(
      image_size=config.image_size,
      patch_size=b.patch_size,
      width=b.width,
      layers=b.layers,
      heads=b.heads,
      output_dim=b.output_dim,
      num_prompt_tokens=b.num_prompt_tokens,
      prompt_depth=b.prompt_depth,
      prompt_dropout=b.prompt_dropout,
      attention_query_chunk=b.attention_query_chunk,
      backbone_attention=resolve_attention(b.get('attention', 'auto'), dtype),
      remat=b.get('remat', 'none'),
      mlp_dim=b.get('mlp_dim', 0),
      activation=b.get('activation', 'quick_gelu'),
      decoder_layers=config.head.decoder_layers,
      num_heads=config.head.num_heads,
      attention=config.head.attention,
      use_mps=config.head.use_mps,
      dropout=config.head.dropout,
      ot_config=ml_collections.FrozenConfigDict(config.ot),
      dtype=dtype)


# ---------------------------------------------------------------------------------------------
# Pure functions shared by OTSeg and its variants.


def l2_normalize(x: jax.Array, axis: int = -1, eps: float = 1e-12) -> jax.Array:
  """`F.normalize`: x / max(||x||, eps) along `axis`."""
  norm = jnp.sqrt(jnp.sum(jnp.square(x), axis=axis, keepdims=True))
  return x / jnp.maximum(norm, eps)


def transport_map(pixels: jax.Array, prompts: jax.Array, ot_config: ml_collections.ConfigDict
                  ) -> tuple[jax.Array, jax.Array, dict[str, jax.Array]]:
  """Sinkhorn between the M pixels and the N prompts of each (image, class).

  Args:
    pixels: (B, M, C), L2-normalised.
    prompts: (B, K, N, C), L2-normalised.
    ot_config: see `ot.get_config`.

  Returns:
    plan: (B, K, M, N), one plan per (b, k), each summing to 1 (columns to 1/N).
    score: (B, M, K), sum_n M * N * plan * sim: the map of the MPS path and of each MPSA layer.
    info: the solver's diagnostics (`ot.sinkhorn_plan_with_info`), e.g. 'iterations'.
  """
  m, n = pixels.shape[1], prompts.shape[2]
  sim = jnp.einsum('bmc,bknc->bkmn', pixels, prompts)
  # One call over all B*K problems: the reference's batch-wide stopping rule sees them together.
  plan, info = ot.sinkhorn_plan_with_info(1.0 - sim, ot_config)
  score = (m * n) * jnp.einsum('bkmn,bkmn->bmk', plan, sim)
  return plan, score, info


def combine_layer_maps(maps: Sequence[jax.Array]) -> jax.Array:
  """A_L * prod_{l<L} sigmoid(A_l)^(1/(L-1)): the decoder-path logits.

  Args:
    maps: L arrays (B, h, w, K), the per-layer maps in layer order.

  Returns:
    (B, h, w, K). With L = 1 the last map itself (the product is empty).
  """
  *earlier, last = maps
  if not earlier:
    return last
  # exp(log_sigmoid / (L-1)) == sigmoid^(1/(L-1)), without the infinite derivative of the root
  # at sigmoid -> 0.
  gate = jnp.exp(sum(jax.nn.log_sigmoid(a) for a in earlier) / len(earlier))
  return last * gate


def eval_probabilities(outputs: Mapping[str, jax.Array], seen: jax.Array, *,
                       ensemble_weight: float, calibration: float) -> jax.Array:
  """Ensembled, calibrated class probabilities (the reference's `semantic_inference`).

  Args:
    outputs: 'decoder' (B, H, W, K) logits and, with the MPS path, 'score' (B, H, W, K) logits.
    seen: (K,) bool, the classes seen in training.
    ensemble_weight: w in sigmoid(w * decoder + (1 - w) * score).
    calibration: subtracted from the probabilities of seen classes (0.1 inductive, else 0).

  Returns:
    (B, H, W, K) shifted probabilities; argmax over K gives the label.
  """
  logits = outputs['decoder']
  if 'score' in outputs:
    logits = ensemble_weight * logits + (1.0 - ensemble_weight) * outputs['score']
  seen = jnp.asarray(seen, bool)
  if seen.shape != (logits.shape[-1],):
    raise ValueError(f'seen mask has shape {seen.shape}, expected ({logits.shape[-1]},): one '
                     'flag per class of the text array.')
  return jax.nn.sigmoid(logits) - calibration * seen.astype(logits.dtype)


def sinkhorn_iterations(intermediates: Mapping[str, Any]) -> list[jax.Array]:
  """Solver iteration counts of one forward, in call order: MPS path, then layers 0..L-1.

  Args:
    intermediates: the 'intermediates' collection of `OTSeg.apply(..., mutable=['intermediates'])`
      (or of `OTSegHead`).
  """
  head = intermediates.get('decode_head', intermediates)
  counts = list(head.get('sinkhorn_iterations', ()))
  layers = sorted((k for k in head if k.startswith('layers_')), key=lambda k: int(k[7:]))
  for name in layers:
    counts += list(head[name]['multihead_attn']['sinkhorn_iterations'])
  return counts


def _is_trainable(path: tuple[str, ...]) -> bool:
  return 'decode_head' in path or any('prompt' in p for p in path)


def trainable_mask(params: Mapping[str, Any]) -> Any:
  """Pytree of bools like `params`: True for the trainable leaves.

  Trainable, as the reference's `_freeze_stages(exclude_key='prompt')`: every parameter whose
  path contains 'prompt' (prompt_embeddings, deep_prompt_embeddings, prompt_proj, prompt_norm)
  and the whole decode head. The rest of the backbone is frozen.

  How the trainer differentiates only the trainable part (frozen leaves never get a gradient,
  and the optimizer state only holds the trainable ones):

    trainable, frozen = split_params(params)
    def loss_fn(trainable):
      outputs = model.apply({'params': merge_params(trainable, frozen)}, ...)
      return otseg_loss(outputs, labels)['total']
    grads = jax.grad(loss_fn)(trainable)   # same tree as `trainable`
    updates, opt_state = tx.update(grads, opt_state, trainable)
  """
  flat = traverse_util.flatten_dict(params)
  return traverse_util.unflatten_dict({k: _is_trainable(k) for k in flat})


def split_params(params: Mapping[str, Any]) -> tuple[dict, dict]:
  """(trainable, frozen): two nested dicts partitioning `params` by `trainable_mask`."""
  flat = traverse_util.flatten_dict(params)
  trainable = {k: v for k, v in flat.items() if _is_trainable(k)}
  frozen = {k: v for k, v in flat.items() if not _is_trainable(k)}
  return traverse_util.unflatten_dict(trainable), traverse_util.unflatten_dict(frozen)


def merge_params(trainable: Mapping[str, Any], frozen: Mapping[str, Any]) -> dict:
  """Inverse of `split_params`."""
  flat = traverse_util.flatten_dict(frozen)
  flat.update(traverse_util.flatten_dict(trainable))
  return traverse_util.unflatten_dict(flat)


# ---------------------------------------------------------------------------------------------
# Layers.


def _dense(features: int, dtype: Dtype, name: str) -> nn.Dense:
  # The head's init_weights: trunc_normal(0.02) weights, zero biases.
  return nn.Dense(features, dtype=dtype, name=name,
                  kernel_init=nn.initializers.truncated_normal(0.02))


def _at_least_f32(x: jax.Array) -> jax.Array:
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def _layer_norm(dtype: Dtype, name: str) -> nn.LayerNorm:
  # torch.nn.LayerNorm: eps 1e-5, two-pass variance; in float32 at least under bfloat16.
  nd = None if dtype is None else jnp.promote_types(dtype, jnp.float32)
  return nn.LayerNorm(epsilon=1e-5, use_fast_variance=False, dtype=nd, name=name)


class AttentionOT(nn.Module):
  """MPSA: cross-attention whose weights are a Sinkhorn plan (the reference's `AttentionOT`).

  Single head over the full C (the reference accepts num_heads but never splits or scales).
  """
  embed_dims: int
  ot_config: Any
  dropout: float = 0.0
  with_output: bool = True  # False: only q and k exist and only the map is returned.
  dtype: Dtype = None

  @nn.compact
  def __call__(self, queries: jax.Array, pixels: jax.Array, *,
               train: bool) -> tuple[jax.Array | None, jax.Array]:
    """queries (B, K, N, C), pixels (B, M, C) -> (output (B, K, N, C) or None, map (B, M, K))."""
    q = l2_normalize(_at_least_f32(_dense(self.embed_dims, self.dtype, 'q')(queries)))
    k = l2_normalize(_at_least_f32(_dense(self.embed_dims, self.dtype, 'k')(pixels)))
    plan, attn_map, info = transport_map(k, q, self.ot_config)
    self.sow('intermediates', 'sinkhorn_iterations', info['iterations'])
    if not self.with_output:
      return None, attn_map
    v = _dense(self.embed_dims, self.dtype, 'v')(pixels)
    plan = nn.Dropout(self.dropout)(plan, deterministic=not train)
    # Columns of the plan sum to 1/N, so this is an average scaled by 1/N (reference quirk).
    out = jnp.einsum('bkmn,bmc->bknc', plan, v)
    return _dense(self.embed_dims, self.dtype, 'proj')(out), attn_map


class SoftmaxCrossAttention(nn.Module):
  """Ablation: ZegCLIP-style multi-head softmax cross-attention over the pixels.

  The map of a class is the pre-softmax scaled logits, averaged over heads and prompts.
  """
  embed_dims: int
  num_heads: int
  dropout: float = 0.0
  with_output: bool = True
  dtype: Dtype = None

  @nn.compact
  def __call__(self, queries: jax.Array, pixels: jax.Array, *,
               train: bool) -> tuple[jax.Array | None, jax.Array]:
    """queries (B, K, N, C), pixels (B, M, C) -> (output (B, K, N, C) or None, map (B, M, K))."""
    b, k_, n, c = queries.shape
    if c % self.num_heads:
      raise ValueError(f'embed_dims {c} is not divisible by num_heads {self.num_heads}.')
    d = c // self.num_heads
    q = _dense(c, self.dtype, 'q')(queries).reshape(b, k_, n, self.num_heads, d)
    k = _dense(c, self.dtype, 'k')(pixels).reshape(b, -1, self.num_heads, d)
    logits = _at_least_f32(jnp.einsum('bknhd,bmhd->bknhm', q, k)) * d**-0.5
    attn_map = jnp.einsum('bknhm->bmk', logits) / (n * self.num_heads)
    if not self.with_output:
      return None, attn_map
    v = _dense(c, self.dtype, 'v')(pixels).reshape(b, -1, self.num_heads, d)
    weights = nn.Dropout(self.dropout)(jax.nn.softmax(logits, axis=-1), deterministic=not train)
    out = jnp.einsum('bknhm,bmhd->bknhd', weights, v).reshape(b, k_, n, c)
    return _dense(c, self.dtype, 'proj')(out), attn_map


class MPSADecoderLayer(nn.Module):
  """Post-norm decoder layer without self-attention (the reference's `TPN_DecoderLayer`).

  x = norm2(x + Attn(x, pixels)); x = norm3(x + FFN(x)), FFN = C -> 4C ReLU -> C.
  With `with_output=False` (the last layer: its queries are never used) only the attention's
  q and k exist and the layer returns the map alone.
  """
  embed_dims: int
  ot_config: Any
  attention: str = 'mpsa'
  num_heads: int = 8
  dropout: float = 0.0
  with_output: bool = True
  dtype: Dtype = None

  @nn.compact
  def __call__(self, x: jax.Array, pixels: jax.Array, *,
               train: bool) -> tuple[jax.Array | None, jax.Array]:
    """x (B, K, N, C), pixels (B, M, C) -> (new x (B, K, N, C) or None, map (B, M, K))."""
    if self.attention == 'mpsa':
      attn = AttentionOT(self.embed_dims, self.ot_config, self.dropout, self.with_output,
                         self.dtype, name='multihead_attn')
    elif self.attention == 'softmax':
      attn = SoftmaxCrossAttention(self.embed_dims, self.num_heads, self.dropout,
                                   self.with_output, self.dtype, name='multihead_attn')
    else:
      raise ValueError(f"attention={self.attention!r}: use 'mpsa' or 'softmax'.")
    out, attn_map = attn(x, pixels, train=train)
    if not self.with_output:
      return None, attn_map
    drop = lambda y: nn.Dropout(self.dropout)(y, deterministic=not train)
    x = _layer_norm(self.dtype, 'norm2')(x + drop(out))
    y = nn.relu(_dense(4 * self.embed_dims, self.dtype, 'linear1')(x))
    y = _dense(self.embed_dims, self.dtype, 'linear2')(drop(y))
    x = _layer_norm(self.dtype, 'norm3')(x + drop(y))
    return x, attn_map


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
      'layer_maps': (L, B, h, w, K) each layer's map.
    """
    b, h, w, c = dense.shape
    if text.ndim != 3 or text.shape[-1] != c:
      raise ValueError(f'text has shape {text.shape}, expected (K, N, {c}): classes x prompts x '
                       'embedding dim of the image tower.')
    pixels = dense.reshape(b, h * w, c)
    t = jnp.broadcast_to(text.astype(dense.dtype), (b, *text.shape))
    # Relationship descriptor: q_proj(concat(global * t, t)), (B, K, N, 2C) -> (B, K, N, C).
    q = _at_least_f32(_dense(self.embed_dims, self.dtype, 'q_proj')(
        jnp.concatenate([global_[:, None, None, :] * t, t], axis=-1)))
    outputs = {'q_proj': q}

    if self.use_mps:
      _, score, info = transport_map(l2_normalize(pixels), l2_normalize(q), self.ot_config)
      # Solver iterations in call order (MPS, then layers), for `mutable=['intermediates']`.
      self.sow('intermediates', 'sinkhorn_iterations', info['iterations'])
      outputs['score'] = score.reshape(b, h, w, -1)

    x, maps, queries = q, [], []
    for i in range(self.decoder_layers):
      last = i == self.decoder_layers - 1
      x, attn_map = MPSADecoderLayer(
          self.embed_dims, self.ot_config, self.attention, self.num_heads, self.dropout,
          with_output=not last, dtype=self.dtype, name=f'layers_{i}')(x, pixels, train=train)
      maps.append(attn_map.reshape(b, h, w, -1))
      if not last:
        queries.append(x)
    outputs['decoder'] = combine_layer_maps(maps)
    outputs['layer_maps'] = jnp.stack(maps)
    outputs['layer_queries'] = queries
    return outputs


class OTSeg(nn.Module):
  """VPT-CLIP image tower + `OTSegHead` + bilinear upsampling to the input size."""
  image_size: int
  patch_size: int
  width: int
  layers: int
  heads: int
  output_dim: int
  num_prompt_tokens: int
  prompt_depth: int
  ot_config: Any
  prompt_dropout: float = 0.0
  attention_query_chunk: int = 0
  backbone_attention: str = 'chunked'
  remat: str = 'none'
  mlp_dim: int = 0
  activation: str = 'quick_gelu'
  decoder_layers: int = 3
  num_heads: int = 8
  attention: str = 'mpsa'
  use_mps: bool = True
  dropout: float = 0.0
  dtype: Dtype = jnp.float32

  def setup(self):
    self.backbone = clip.VisionTransformer(
        patch_size=self.patch_size, width=self.width, layers=self.layers, heads=self.heads,
        output_dim=self.output_dim, image_size=self.image_size,
        num_prompt_tokens=self.num_prompt_tokens, prompt_depth=self.prompt_depth,
        prompt_dropout=self.prompt_dropout, double_class_embedding=True,
        attention_query_chunk=self.attention_query_chunk, attention=self.backbone_attention,
        remat=self.remat, mlp_dim=self.mlp_dim, activation=self.activation, dtype=self.dtype)
    self.decode_head = OTSegHead(
        embed_dims=self.output_dim, ot_config=self.ot_config,
        decoder_layers=self.decoder_layers, num_heads=self.num_heads, attention=self.attention,
        use_mps=self.use_mps, dropout=self.dropout, dtype=self.dtype)

  def encode_image(self, images: jax.Array, *, train: bool) -> tuple[jax.Array, jax.Array]:
    """images (B, H, W, 3) -> (dense (B, h, w, C), global (B, C)), both L2-normalised over C."""
    global_, dense, _ = self.backbone(images, train=train)
    # The head reads the embeddings in float32 (or float64): cosines feed the Sinkhorn costs,
    # whose rounding exp(-C / eps) amplifies 1 / eps = 20 times.
    dense, global_ = _at_least_f32(dense), _at_least_f32(global_)
    # Plain division, as the reference backbone (no eps).
    dense = dense / jnp.linalg.norm(dense, axis=-1, keepdims=True)
    global_ = global_ / jnp.linalg.norm(global_, axis=-1, keepdims=True)
    return dense, global_

  def __call__(self, images: jax.Array, text: jax.Array, *, train: bool) -> dict[str, Any]:
    """Logit maps at the input resolution, plus intermediates.

    Args:
      images: (B, H, W, 3) normalised images.
      text: (K, N, C) L2-normalised text embeddings (seen rows in inductive training).
      train: train mode (dropout on; rng 'dropout').

    Returns:
      'decoder', 'score': (B, H, W, K) logits ('score' only with use_mps);
      'decoder_lowres', 'score_lowres': (B, h, w, K);
      'q_proj', 'layer_queries', 'layer_maps': see `OTSegHead`;
      'dense' (B, h, w, C), 'global' (B, C): the normalised backbone outputs.
    """
    dense, global_ = self.encode_image(images, train=train)
    out = self.decode_head(dense, global_, text, train=train)
    size = images.shape[1:3]
    outputs = dict(out, dense=dense, decoder_lowres=out['decoder'],
                   decoder=image_ops.resize_bilinear(out['decoder'], size))
    outputs['global'] = global_
    if 'score' in out:
      outputs['score_lowres'] = out['score']
      outputs['score'] = image_ops.resize_bilinear(out['score'], size)
    return outputs
