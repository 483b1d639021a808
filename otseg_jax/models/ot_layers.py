"""The optimal-transport layers of OTSeg, shared by the methods built on them (ZegOT, MVP-SEG, ...).

Pure functions (the transport map between pixels and prompts, the combination of the decoder's
layer maps, the relationship descriptor's input) and small linen layers (Sinkhorn attention, its
softmax ablation, the decoder layer). Letters in shapes and einsum strings: B batch, K classes,
N prompts per class, C embedding dim, M = h*w pixels, L layers.

Layers return their solver diagnostics instead of sowing them: a method collects them into the
`aux` of its `Model.__call__` (e.g. aux['sinkhorn_iterations']).
"""

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from otseg_jax import ot

Dtype = Any


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
    ot_config: see `ot.get_config`; every solver and initializer there is reachable here.

  Returns:
    plan: (B, K, M, N), one plan per (b, k), each summing to 1 (columns to 1/N).
    score: (B, M, K), sum_n M * N * plan * sim: the map of the MPS path and of each MPSA layer.
    info: the solver's diagnostics (`ot.sinkhorn_plan_with_info`), e.g. 'iterations'.
  """
  m, n = pixels.shape[1], prompts.shape[2]
  sim = jnp.einsum('bmc,bknc->bkmn', pixels, prompts)
  # The point-cloud initializers (ot.needs_points) see the vectors themselves; the pixels are
  # shared by the K problems of an image (not broadcast in memory: ot maps size-1 axes).
  points = (pixels[:, None], prompts) if ot.needs_points(ot_config) else None
  # One call over all B*K problems: the reference's batch-wide stopping rule sees them together.
  plan, info = ot.sinkhorn_plan_with_info(1.0 - sim, ot_config, points)
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


def relationship_features(global_: jax.Array, text: jax.Array) -> jax.Array:
  """The relationship descriptor's input: global (B, C), text t (B, K, N, C) -> concat(global * t,
  t) (B, K, N, 2C).

  A dense layer (OTSeg's `q_proj`) maps it to the (B, K, N, C) queries of the decoder.
  """
  return jnp.concatenate([global_[:, None, None, :] * text, text], axis=-1)



# ---------------------------------------------------------------------------------------------
# Layers.


def dense(features: int, dtype: Dtype, name: str) -> nn.Dense:
  """A head's linear layer."""
  # The head's init_weights: trunc_normal(0.02) weights, zero biases.
  return nn.Dense(features, dtype=dtype, name=name,
                  kernel_init=nn.initializers.truncated_normal(0.02))


def at_least_f32(x: jax.Array) -> jax.Array:
  """`x` in float32, or float64 if it is: what the cosines and the Sinkhorn costs are computed in."""
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def layer_norm(dtype: Dtype, name: str) -> nn.LayerNorm:
  """A head's LayerNorm."""
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
               train: bool) -> tuple[jax.Array | None, jax.Array, dict[str, jax.Array]]:
    """queries (B, K, N, C), pixels (B, M, C) -> (output (B, K, N, C) or None, map (B, M, K),
    {'sinkhorn_iterations': () the solver's iteration count})."""
    q = l2_normalize(at_least_f32(dense(self.embed_dims, self.dtype, 'q')(queries)))
    k = l2_normalize(at_least_f32(dense(self.embed_dims, self.dtype, 'k')(pixels)))
    plan, attn_map, info = transport_map(k, q, self.ot_config)
    aux = {'sinkhorn_iterations': info['iterations']}
    if not self.with_output:
      return None, attn_map, aux
    v = dense(self.embed_dims, self.dtype, 'v')(pixels)
    plan = nn.Dropout(self.dropout)(plan, deterministic=not train)
    # Columns of the plan sum to 1/N, so this is an average scaled by 1/N (reference quirk).
    out = jnp.einsum('bkmn,bmc->bknc', plan, v)
    return dense(self.embed_dims, self.dtype, 'proj')(out), attn_map, aux


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
               train: bool) -> tuple[jax.Array | None, jax.Array, dict[str, jax.Array]]:
    """queries (B, K, N, C), pixels (B, M, C) -> (output (B, K, N, C) or None, map (B, M, K),
    {})."""
    b, k_, n, c = queries.shape
    if c % self.num_heads:
      raise ValueError(f'embed_dims {c} is not divisible by num_heads {self.num_heads}.')
    d = c // self.num_heads
    q = dense(c, self.dtype, 'q')(queries).reshape(b, k_, n, self.num_heads, d)
    k = dense(c, self.dtype, 'k')(pixels).reshape(b, -1, self.num_heads, d)
    logits = at_least_f32(jnp.einsum('bknhd,bmhd->bknhm', q, k)) * d**-0.5
    attn_map = jnp.einsum('bknhm->bmk', logits) / (n * self.num_heads)
    if not self.with_output:
      return None, attn_map, {}
    v = dense(c, self.dtype, 'v')(pixels).reshape(b, -1, self.num_heads, d)
    weights = nn.Dropout(self.dropout)(jax.nn.softmax(logits, axis=-1), deterministic=not train)
    out = jnp.einsum('bknhm,bmhd->bknhd', weights, v).reshape(b, k_, n, c)
    return dense(c, self.dtype, 'proj')(out), attn_map, {}


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
               train: bool) -> tuple[jax.Array | None, jax.Array, dict[str, jax.Array]]:
    """x (B, K, N, C), pixels (B, M, C) -> (new x (B, K, N, C) or None, map (B, M, K), the
    attention's aux)."""
    if self.attention == 'mpsa':
      attn = AttentionOT(self.embed_dims, self.ot_config, self.dropout, self.with_output,
                         self.dtype, name='multihead_attn')
    elif self.attention == 'softmax':
      attn = SoftmaxCrossAttention(self.embed_dims, self.num_heads, self.dropout,
                                   self.with_output, self.dtype, name='multihead_attn')
    else:
      raise ValueError(f"attention={self.attention!r}: use 'mpsa' or 'softmax'.")
    out, attn_map, aux = attn(x, pixels, train=train)
    if not self.with_output:
      return None, attn_map, aux
    drop = lambda y: nn.Dropout(self.dropout)(y, deterministic=not train)
    x = layer_norm(self.dtype, 'norm2')(x + drop(out))
    y = nn.relu(dense(4 * self.embed_dims, self.dtype, 'linear1')(x))
    y = dense(self.embed_dims, self.dtype, 'linear2')(drop(y))
    x = layer_norm(self.dtype, 'norm3')(x + drop(y))
    return x, attn_map, aux
