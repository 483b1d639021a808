"""CLIP towers in linen: the ViT image encoder (with OTSeg's deep visual prompts), the text encoder.

Module and parameter names follow OpenAI's clip/model.py (`conv1`, `ln_pre`,
`transformer/resblocks_i`, `ln_1`, `attn`, `mlp/c_fc`, ...), so `clip_weights.py` is a mechanical
rename + transpose. The fused `in_proj` of `nn.MultiheadAttention` is kept as three Dense layers
`q_proj`, `k_proj`, `v_proj`.

With `num_prompt_tokens = 0` the vision tower is plain CLIP (parity with OpenAI and HF). With
prompts it is the OTSeg authors' `VPTCLIPVisionTransformer` (spec section 2;
../shared/reference/README.md, behaviours 1-5), quirks included.

Precision: matmuls run in `dtype`; LayerNorm and softmax in `promote_types(dtype, float32)`, so in
float32 for bfloat16 towers and in float64 when `dtype` is float64.

Attention implementations (`ATTENTION`), all the same function: 'dense' (softmax(q k^T) v as
written), 'chunked' (`chunked_attention`: blocks of queries, recomputed backward; the fastest on
CPU), 'xla' and 'cudnn' (`jax.nn.dot_product_attention`; 'cudnn' is cuDNN's fused flash attention,
GPU only, bfloat16 / float16 only). Masked attention (the text tower) always runs 'dense'.

Rematerialisation (`REMAT`): 'none' keeps every block's activations for the backward pass;
'block' keeps only each block's input and recomputes the block; any other name is a policy of
`jax.checkpoint_policies` (e.g. 'dots_with_no_batch_dims_saveable': keep the matmul outputs,
recompute the rest).
"""

import dataclasses
import functools
import itertools
import math
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from otseg_jax import image_ops

Dtype = Any

ATTENTION = ('dense', 'chunked', 'xla', 'cudnn')


def check_attention(attention: str, dtype: Dtype) -> None:
  """Raises ValueError for an unknown implementation or one that cannot run in `dtype`."""
  if attention not in ATTENTION:
    raise ValueError(f'attention={attention!r}: use one of {", ".join(ATTENTION)}.')
  if attention == 'cudnn' and jnp.dtype(dtype) not in (jnp.bfloat16, jnp.float16):
    raise ValueError(f"attention='cudnn' (cuDNN flash attention) runs in bfloat16 or float16, not "
                     f"{jnp.dtype(dtype).name}: set the model dtype to 'bfloat16' or use 'xla'.")


def remat_policy(remat: str) -> Any:
  """The `jax.checkpoint` policy of a `REMAT` name; None for 'block' (save nothing)."""
  if remat == 'block':
    return None
  policy = getattr(jax.checkpoint_policies, remat, None)
  if remat == 'none' or policy is None or not callable(policy):
    raise ValueError(f"remat={remat!r}: use 'none', 'block' or a jax.checkpoint_policies name "
                     "such as 'dots_with_no_batch_dims_saveable'.")
  return policy


def _norm_dtype(dtype: Dtype) -> Dtype:
  return jnp.promote_types(dtype, jnp.float32)


def layer_norm(x: jax.Array, name: str, *, dtype: Dtype, param_dtype: Dtype,
               epsilon: float = 1e-5) -> jax.Array:
  """LayerNorm computed in at least float32 (as OpenAI's fp16-safe `LayerNorm`), output in `dtype`.

  Must be called inside a compact method: it creates the submodule `name` there.
  """
  nd = _norm_dtype(dtype)
  # use_fast_variance=False: E[(x - mean)^2], as torch computes it; E[x^2] - mean^2 loses digits.
  y = nn.LayerNorm(epsilon=epsilon, dtype=nd, param_dtype=param_dtype, use_fast_variance=False,
                   name=name)(x.astype(nd))
  return y.astype(dtype)


def quick_gelu(x: jax.Array) -> jax.Array:
  return x * jax.nn.sigmoid(1.702 * x)


# The MLP activations of CLIP checkpoints, by their Hugging Face `hidden_act` names: OpenAI's
# quick_gelu; exact (erf) gelu in LAION / DFN / MetaCLIP / OpenCLIP towers; the tanh forms.
ACTIVATIONS = {
    'quick_gelu': quick_gelu,
    'gelu': functools.partial(jax.nn.gelu, approximate=False),
    'gelu_new': functools.partial(jax.nn.gelu, approximate=True),
    'gelu_pytorch_tanh': functools.partial(jax.nn.gelu, approximate=True),
    'gelu_fast': functools.partial(jax.nn.gelu, approximate=True),
}


def activation_fn(name: str):
  """The function of an `ACTIVATIONS` name; ValueError naming the choices otherwise."""
  if name not in ACTIVATIONS:
    raise ValueError(f'Unknown MLP activation {name!r}: use one of {", ".join(ACTIVATIONS)}.')
  return ACTIVATIONS[name]


def _query_chunks(x: jax.Array, chunk: int) -> jax.Array:
  """(B, L, H, C) -> (n, B, H, chunk, C), L zero-padded to n * chunk."""
  b, l, h, c = x.shape
  n = -(-l // chunk)
  x = jnp.pad(x, ((0, 0), (0, n * chunk - l), (0, 0), (0, 0)))
  return x.reshape(b, n, chunk, h, c).transpose(1, 0, 3, 2, 4)


def _unchunk(x: jax.Array, length: int) -> jax.Array:
  """(n, B, H, chunk, C) -> (B, length, H, C)."""
  n, b, h, chunk, c = x.shape
  return x.transpose(1, 0, 3, 2, 4).reshape(b, n * chunk, h, c)[:, :length]


def _chunk_size(length: int, chunk: int) -> int:
  """The size of ceil(length / chunk) near-equal chunks: the least padding."""
  n = -(-length // chunk)
  return -(-length // n)


def _softmax_rows(q: jax.Array, k: jax.Array) -> jax.Array:
  """q (B, H, Q, C), k (B, H, K, C) -> softmax over K of q k^T, (B, H, Q, K)."""
  logits = jnp.einsum('bhqc,bhkc->bhqk', q, k)
  return jax.nn.softmax(logits.astype(_norm_dtype(q.dtype)), axis=-1).astype(q.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def chunked_attention(q: jax.Array, k: jax.Array, v: jax.Array, chunk: int) -> jax.Array:
  """softmax(q k^T) v, one block of `chunk` queries at a time, recomputed in the backward pass.

  The same numbers as dense attention; the (H, L, L) weights never exist at once, so on CPU each
  block's weights stay in cache (the dense form runs ~2x slower there), and the backward pass keeps
  only q, k, v and the output instead of the weights of every layer.

  Args:
    q: (B, L, H, C) queries, already scaled. k, v: (B, S, H, C).
    chunk: queries per block.

  Returns:
    (B, L, H, C).
  """
  return _chunked_attention_fwd(q, k, v, chunk)[0]


def _chunked_attention_fwd(q, k, v, chunk):
  kh, vh = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
  block = lambda qc: jnp.einsum('bhqk,bhkc->bhqc', _softmax_rows(qc, kh), vh)
  size = _chunk_size(q.shape[1], chunk)
  out = _unchunk(jax.lax.map(block, _query_chunks(q, size)), q.shape[1])
  return out, (q, k, v, out)


def _chunked_attention_bwd(chunk, residuals, d_out):
  q, k, v, out = residuals
  kh, vh = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
  size = _chunk_size(q.shape[1], chunk)
  # d softmax: dlogits = w * (dw - sum_k w dw), and sum_k w dw = sum_c d_out * out per query.
  row_dot = jnp.sum(d_out * out, axis=-1, keepdims=True)

  def block(carry, xs):
    dk, dv = carry
    qc, doc, rc = xs  # (B, H, chunk, C), (B, H, chunk, C), (B, H, chunk, 1)
    w = _softmax_rows(qc, kh)
    dv = dv + jnp.einsum('bhqk,bhqc->bhkc', w, doc)
    dlogits = w * (jnp.einsum('bhqc,bhkc->bhqk', doc, vh) - rc)
    dk = dk + jnp.einsum('bhqk,bhqc->bhkc', dlogits, qc)
    return (dk, dv), jnp.einsum('bhqk,bhkc->bhqc', dlogits, kh)

  xs = (_query_chunks(q, size), _query_chunks(d_out, size), _query_chunks(row_dot, size))
  (dk, dv), dq = jax.lax.scan(block, (jnp.zeros_like(kh), jnp.zeros_like(vh)), xs)
  return _unchunk(dq, q.shape[1]), dk.transpose(0, 2, 1, 3), dv.transpose(0, 2, 1, 3)


chunked_attention.defvjp(_chunked_attention_fwd, _chunked_attention_bwd)


def fused_attention(q: jax.Array, k: jax.Array, v: jax.Array, implementation: str,
                    multiple: int = 1) -> jax.Array:
  """softmax(q k^T) v by `jax.nn.dot_product_attention` ('xla' or 'cudnn').

  The sequence is zero-padded to a multiple of `multiple` and the padded keys are masked out by
  their lengths. cuDNN needs it (MultiheadAttention pads to 64 there): its training kernels refuse
  odd lengths such as ViT-B/16's 1 + 10 + 32 * 32 = 1035 tokens (seen with jax 0.11.2 on an H200).
  Both implementations take the softmax in float32 (not float64).

  Args:
    q: (B, L, H, C) queries, already scaled. k, v: (B, L, H, C).
    implementation: 'xla' or 'cudnn'.
    multiple: the padded length's multiple (1: no padding).

  Returns:
    (B, L, H, C).
  """
  b, l = q.shape[:2]
  pad = -l % multiple
  if not pad:
    return jax.nn.dot_product_attention(q, k, v, scale=1.0, implementation=implementation)
  q, k, v = (jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0))) for x in (q, k, v))
  out = jax.nn.dot_product_attention(q, k, v, scale=1.0, implementation=implementation,
                                     key_value_seq_lengths=jnp.full((b,), l, jnp.int32))
  return out[:, :l]


class MultiheadAttention(nn.Module):
  """Self-attention; separate q/k/v/out projections with bias; q scaled by 1/sqrt(head_dim).

  `attention` picks the implementation of unmasked attention (module docstring); with 'chunked',
  `query_chunk` queries per block (0, or at least the sequence length: dense).
  """
  heads: int
  query_chunk: int = 0
  attention: str = 'chunked'
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """x (B, L, D), mask (L, L) bool (True = may attend) or None -> (B, L, D)."""
    b, l, d = x.shape
    if d % self.heads:
      raise ValueError(f'Width {d} is not divisible by heads={self.heads}.')
    hd = d // self.heads
    dense = lambda name: nn.Dense(d, dtype=self.dtype, param_dtype=self.param_dtype, name=name)
    q = dense('q_proj')(x).reshape(b, l, self.heads, hd) * (hd**-0.5)
    k = dense('k_proj')(x).reshape(b, l, self.heads, hd)
    v = dense('v_proj')(x).reshape(b, l, self.heads, hd)
    check_attention(self.attention, self.dtype)
    if mask is None and self.attention in ('xla', 'cudnn'):
      out = fused_attention(q, k, v, self.attention, 64 if self.attention == 'cudnn' else 1)
    elif mask is None and self.attention == 'chunked' and 0 < self.query_chunk < l:
      out = chunked_attention(q, k, v, self.query_chunk)
    else:
      logits = jnp.einsum('bqhc,bkhc->bhqk', q, k).astype(_norm_dtype(self.dtype))
      if mask is not None:
        logits = jnp.where(mask, logits, -jnp.inf)  # the diagonal is always allowed: no -inf row
      weights = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
      out = jnp.einsum('bhqk,bkhc->bqhc', weights, v)
    return dense('out_proj')(out.reshape(b, l, d))


class Mlp(nn.Module):
  """D -> mlp_dim -> D (OpenAI's `mlp` Sequential: c_fc, activation, c_proj).

  mlp_dim 0 means 4 D, OpenAI's ratio; `activation` is an `ACTIVATIONS` name.
  """
  mlp_dim: int = 0
  activation: str = 'quick_gelu'
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    d = x.shape[-1]
    x = nn.Dense(self.mlp_dim or 4 * d, dtype=self.dtype, param_dtype=self.param_dtype,
                 name='c_fc')(x)
    x = activation_fn(self.activation)(x)
    return nn.Dense(d, dtype=self.dtype, param_dtype=self.param_dtype, name='c_proj')(x)


class ResidualAttentionBlock(nn.Module):
  """Pre-LN block: x + attn(ln_1(x)), then x + mlp(ln_2(x)).

  No drop path: the reference builds DropPath but never applies it.
  """
  heads: int
  query_chunk: int = 0
  attention: str = 'chunked'
  mlp_dim: int = 0
  activation: str = 'quick_gelu'
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """x (B, L, D) -> (B, L, D)."""
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    attn = MultiheadAttention(self.heads, self.query_chunk, self.attention, name='attn', **kw)
    x = x + attn(layer_norm(x, 'ln_1', **kw), mask)
    return x + Mlp(self.mlp_dim, self.activation, name='mlp', **kw)(layer_norm(x, 'ln_2', **kw))


class Transformer(nn.Module):
  """`layers` residual blocks, named `resblocks_{i}`, with the deep-prompt token swap of VPT.

  `remat` (module docstring) wraps each block in `nn.remat`; parameter names are unchanged.
  """
  layers: int
  heads: int
  query_chunk: int = 0
  attention: str = 'chunked'
  remat: str = 'none'
  mlp_dim: int = 0
  activation: str = 'quick_gelu'
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, *, mask: jax.Array | None = None,
               deep_prompts: jax.Array | None = None,
               deep_context: jax.Array | None = None,
               hidden_layers: Sequence[int] = ()) -> tuple[jax.Array, dict[int, jax.Array]]:
    """Runs the blocks.

    Args:
      x: (B, L, D) tokens; with `deep_prompts`, laid out [CLS, T prompts, rest].
      mask: (L, L) bool attention mask (True = may attend), or None.
      deep_prompts: (L_d, B, T, D) or None. Before block i (1 <= i <= L_d) the T prompt slots are
        replaced by `deep_prompts[i - 1]`; before block L_d + 1 they are removed, leaving
        [CLS, rest].
      deep_context: (L_c, B, T, D) or None, the deep text prompts: before block i (i < L_c) the
        T tokens after the first are replaced by `deep_context[i]`; the length never changes.
      hidden_layers: block indices (0-based) whose outputs to return.

    Returns:
      (x (B, L', D), {i: output of block i (B, L_i, D)}).
    """
    block = ResidualAttentionBlock
    if self.remat != 'none':
      block = nn.remat(block, policy=remat_policy(self.remat))
    hidden = {}
    for i in range(self.layers):
      if deep_prompts is not None:
        depth, _, t, _ = deep_prompts.shape
        if 1 <= i <= depth:
          x = jnp.concatenate([x[:, :1], deep_prompts[i - 1].astype(x.dtype), x[:, 1 + t:]], axis=1)
        elif i == depth + 1:
          x = jnp.concatenate([x[:, :1], x[:, 1 + t:]], axis=1)
      if deep_context is not None and i < deep_context.shape[0]:
        t = deep_context.shape[2]
        x = jnp.concatenate([x[:, :1], deep_context[i].astype(x.dtype), x[:, 1 + t:]], axis=1)
      x = block(self.heads, self.query_chunk, self.attention, self.mlp_dim, self.activation,
                dtype=self.dtype, param_dtype=self.param_dtype, name=f'resblocks_{i}')(x, mask)
      if i in hidden_layers:
        hidden[i] = x
    return x, hidden


class VisionTransformer(nn.Module):
  """CLIP ViT image encoder, optionally with OTSeg's deep visual prompts (VPT).

  Attributes:
    patch_size: p, the conv1 kernel and stride.
    width: D.
    layers: number of residual blocks.
    heads: attention heads.
    output_dim: C, the width after `proj`.
    image_size: the configured input size, int or (H, W); the positional grid is image_size // p.
    num_prompt_tokens: T; 0 = plain CLIP.
    prompt_depth: L_d (the authors' total_d_layer), blocks 1..L_d get their own deep prompts.
    prompt_dropout: dropout on the projected prompts in training (rng 'dropout').
    double_class_embedding: the authors' VPT backbone adds class_embedding to the CLS positional
      row as well, so token 0 carries it twice (README behaviour 1).
    hidden_layers: block indices whose outputs `__call__` also returns.
    project_hidden: False (default): those outputs as the blocks give them, (B, L_i, D); True:
      through the same (`prompt_norm` and) `ln_post` and `@ proj` as the final tokens, (B, L_i, C)
      (the frozen head applied to hidden layers, for methods that read several layers' pixels).
    attention_query_chunk: queries per block of `chunked_attention` (0: dense attention).
    attention: the implementation of attention (module docstring).
    remat: rematerialisation of the blocks in the backward pass (module docstring).
    mlp_dim: the blocks' MLP width (0: 4 * width). activation: its `ACTIVATIONS` name.
    dtype: computation dtype. param_dtype: parameter dtype at init.
  """
  patch_size: int
  width: int
  layers: int
  heads: int
  output_dim: int
  image_size: int | tuple[int, int]
  num_prompt_tokens: int = 0
  prompt_depth: int = 0
  prompt_dropout: float = 0.0
  double_class_embedding: bool = False
  hidden_layers: tuple[int, ...] = ()
  project_hidden: bool = False
  attention_query_chunk: int = 0
  attention: str = 'chunked'
  remat: str = 'none'
  mlp_dim: int = 0
  activation: str = 'quick_gelu'
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @property
  def grid(self) -> tuple[int, int]:
    """The positional-embedding grid (gh, gw) of the configured image size."""
    h, w = image_ops.as_pair(self.image_size)
    return (h // self.patch_size, w // self.patch_size)

  @nn.compact
  def __call__(self, images: jax.Array, *, train: bool = False
               ) -> tuple[jax.Array, jax.Array, dict[int, jax.Array]]:
    """Encodes images.

    Args:
      images: (B, H, W, 3), already normalised. H, W need not match `image_size`: the positional
        grid is resized bilinearly to (H // p, W // p) at run time (identity when equal).
      train: enables prompt dropout.

    Returns:
      global_embedding (B, C): the CLS token; dense_embedding (B, h, w, C): the patch tokens;
      hidden {i: (B, L_i, D)}: outputs of the blocks in `hidden_layers` ((B, L_i, C) with
      `project_hidden`). Embeddings are after (`prompt_norm` and) `ln_post` and `@ proj`, NOT
      L2-normalised.
    """
    if images.ndim != 4 or images.shape[-1] != 3:
      raise ValueError(f'VisionTransformer expects NHWC images (B, H, W, 3), got shape '
                       f'{images.shape}; NCHW arrays need images.transpose(0, 2, 3, 1).')
    p, d = self.patch_size, self.width
    if images.shape[1] < p or images.shape[2] < p:
      raise ValueError(f'Images of {images.shape[1]}x{images.shape[2]} are smaller than one '
                       f'{p}x{p} patch.')
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    gh, gw = self.grid

    x = nn.Conv(d, (p, p), strides=(p, p), padding='VALID', use_bias=False, name='conv1',
                **kw)(images)
    b, h, w, _ = x.shape
    x = x.reshape(b, h * w, d)

    scale = d**-0.5
    cls = self.param('class_embedding', nn.initializers.normal(scale), (d,), self.param_dtype)
    pos = self.param('positional_embedding', nn.initializers.normal(scale), (1 + gh * gw, d),
                     self.param_dtype)
    cls, pos = cls.astype(self.dtype), pos.astype(self.dtype)
    grid_pos = image_ops.resize_bilinear(pos[1:].reshape(gh, gw, d), (h, w), axes=(0, 1))
    cls_pos = pos[:1] + cls if self.double_class_embedding else pos[:1]
    pos = jnp.concatenate([cls_pos, grid_pos.reshape(h * w, d)], axis=0)
    x = jnp.concatenate([jnp.broadcast_to(cls, (b, 1, d)), x], axis=1) + pos
    x = layer_norm(x, 'ln_pre', **kw)

    deep = None
    t = self.num_prompt_tokens
    if t > 0:
      # The authors' VPT init: uniform(+-sqrt(6 / (3 p^2 + D))); prompt_proj kaiming fan_out.
      val = math.sqrt(6.0 / (3 * p * p + d))
      init = nn.initializers.uniform(2 * val)
      shifted = lambda key, shape, dtype: init(key, shape, dtype) - val
      kaiming = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')
      prompt_proj = nn.Dense(d, kernel_init=kaiming, name='prompt_proj', **kw)
      drop = nn.Dropout(self.prompt_dropout, deterministic=not train)
      shallow = self.param('prompt_embeddings', shifted, (1, t, d), self.param_dtype)
      # Prompts enter after ln_pre, so ln_pre never normalises them (README behaviour 3).
      shallow = drop(jnp.broadcast_to(prompt_proj(shallow.astype(self.dtype)), (b, t, d)))
      x = jnp.concatenate([x[:, :1], shallow, x[:, 1:]], axis=1)
      if self.prompt_depth > 0:
        deep = self.param('deep_prompt_embeddings', shifted, (self.prompt_depth, t, d),
                          self.param_dtype)
        deep = prompt_proj(deep.astype(self.dtype))  # (L_d, T, D): the same shared projection
        deep = drop(jnp.broadcast_to(deep[:, None], (self.prompt_depth, b, t, d)))

    x, hidden = Transformer(self.layers, self.heads, self.attention_query_chunk, self.attention,
                            self.remat, self.mlp_dim, self.activation, name='transformer', **kw)(
        x, deep_prompts=deep, hidden_layers=self.hidden_layers)

    # With project_hidden the hidden layers' tokens go through the same norms and projection:
    # appended along the token axis (both act per token), so each module is called once.
    projected = sorted(hidden) if self.project_hidden else []
    lengths = [x.shape[1]] + [hidden[i].shape[1] for i in projected]
    if projected:
      x = jnp.concatenate([x] + [hidden[i] for i in projected], axis=1)
    if t > 0:
      # Quirk kept: prompt_norm (eps 1e-6) and then ln_post, two LayerNorms in a row.
      x = layer_norm(x, 'prompt_norm', epsilon=1e-6, **kw)
    x = layer_norm(x, 'ln_post', **kw)
    proj = self.param('proj', nn.initializers.normal(scale), (d, self.output_dim), self.param_dtype)
    x = x @ proj.astype(self.dtype)
    if projected:
      x, *parts = jnp.split(x, list(itertools.accumulate(lengths[:-1])), axis=1)
      hidden = dict(zip(projected, parts))
    return x[:, 0], x[:, -h * w:].reshape(b, h, w, self.output_dim), hidden


class TextTransformer(nn.Module):
  """CLIP text encoder: causal transformer, ln_final, pooled at the EOT token (argmax of ids)."""
  vocab_size: int
  context_length: int
  width: int
  layers: int
  heads: int
  output_dim: int
  mlp_dim: int = 0  # 0: 4 * width
  activation: str = 'quick_gelu'
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, token_ids: jax.Array, context: jax.Array | None = None,
               deep_context: jax.Array | None = None) -> jax.Array:
    """token_ids (B, L) int (L <= context_length, EOT the row maximum) -> (B, C), unnormalised.

    context: (T, width) or (B, T, width) learned vectors (CoOp) that replace the embeddings of the
    T tokens after SOT (the template's placeholders); None: the tokens' own embeddings.
    deep_context: (L_c, T, width) or (L_c, B, T, width), L_c <= layers, deep text prompts: the
    input of block i < L_c (block 0's is the embeddings plus positions) has its T tokens after
    SOT replaced by `deep_context[i]`; None (or T = 0): the plain tower.
    """
    if token_ids.ndim != 2 or token_ids.shape[1] > self.context_length:
      raise ValueError(f'TextTransformer expects token ids (B, L) with L <= {self.context_length}, '
                       f'got shape {token_ids.shape}; tokenize with tokenizer.tokenize.')
    if not jnp.issubdtype(token_ids.dtype, jnp.integer):
      raise ValueError(f'Token ids must be integers, got {token_ids.dtype}.')
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    b, l = token_ids.shape
    x = nn.Embed(self.vocab_size, self.width, name='token_embedding', **kw)(token_ids)
    if context is not None:
      t = context.shape[-2]
      context = jnp.broadcast_to(context, (b, t, self.width)).astype(x.dtype)
      x = jnp.concatenate([x[:, :1], context, x[:, 1 + t:]], axis=1)
    pos = self.param('positional_embedding', nn.initializers.normal(0.01),
                     (self.context_length, self.width), self.param_dtype)
    x = x + pos[:l].astype(self.dtype)
    if deep_context is not None:
      if deep_context.ndim == 3:
        deep_context = deep_context[:, None]
      n, _, t, _ = deep_context.shape
      if n > self.layers or 1 + t >= l:
        raise ValueError(f'deep_context {deep_context.shape}: at most {self.layers} layers and '
                         f'fewer than {l - 1} tokens (the prompts replace tokens after SOT).')
      deep_context = jnp.broadcast_to(deep_context, (n, b, t, self.width))
    causal = jnp.tril(jnp.ones((l, l), bool))
    x, _ = Transformer(self.layers, self.heads, mlp_dim=self.mlp_dim, activation=self.activation,
                       name='transformer', **kw)(x, mask=causal, deep_context=deep_context)
    x = layer_norm(x, 'ln_final', **kw)
    x = x[jnp.arange(b), jnp.argmax(token_ids, axis=-1)]
    proj = self.param('text_projection', nn.initializers.normal(self.width**-0.5),
                      (self.width, self.output_dim), self.param_dtype)
    return x @ proj.astype(self.dtype)


@dataclasses.dataclass(frozen=True)
class CLIPSpec:
  """Hyperparameters of both CLIP towers, as read from a checkpoint by `clip_weights.load_clip`."""
  embed_dim: int  # C, the joint embedding width
  image_size: tuple[int, int]  # the size the positional grid is laid out for
  patch_size: int
  vision_width: int
  vision_layers: int
  vision_heads: int
  context_length: int
  vocab_size: int
  text_width: int
  text_layers: int
  text_heads: int
  # Defaults: OpenAI's CLIPs (specs written before these fields existed read as such).
  vision_mlp_dim: int = 0  # 0: 4 * vision_width
  text_mlp_dim: int = 0  # 0: 4 * text_width
  activation: str = 'quick_gelu'  # both towers'; a `ACTIVATIONS` name

  def vision_tower(self, dtype: Dtype = jnp.float32, **kwargs) -> VisionTransformer:
    """The image encoder; `kwargs` set the other fields (prompts, hidden_layers, param_dtype)."""
    return VisionTransformer(patch_size=self.patch_size, width=self.vision_width,
                             layers=self.vision_layers, heads=self.vision_heads,
                             output_dim=self.embed_dim, image_size=self.image_size,
                             mlp_dim=self.vision_mlp_dim, activation=self.activation, dtype=dtype,
                             **kwargs)

  def text_tower(self, dtype: Dtype = jnp.float32, **kwargs) -> TextTransformer:
    """The text encoder; `kwargs` may set param_dtype."""
    return TextTransformer(vocab_size=self.vocab_size, context_length=self.context_length,
                           width=self.text_width, layers=self.text_layers, heads=self.text_heads,
                           output_dim=self.embed_dim, mlp_dim=self.text_mlp_dim,
                           activation=self.activation, dtype=dtype, **kwargs)
