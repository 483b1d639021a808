"""Bi-level routing attention (BiFormer, Zhu et al. CVPR 2023) over a token grid, for any method.

The (h, w) grid is cut into S x S windows of (h/S) x (w/S) tokens. Each window's region
descriptors are the means of its queries and keys, Q_r, K_r (R = S^2 windows); the region
affinity A_r = Q_r K_r^T (R, R) picks, per window, the top-k windows (`lax.top_k`, indices under
`stop_gradient`: routing carries no gradient, BiFormer's default). Every query of a window then
attends, per head, to the keys of its k routed windows only: softmax(q K_s^T / sqrt(d)) V_s.
BiFormer's local context enhancement (LCE, a depthwise conv on V) is added, then the output
projection.

All shapes are static under jit: the routed keys and values are gathered into (B, R, k * w2, C)
arrays (w2 = tokens per window). A grid that S does not divide (an eval window smaller than the
crop, an odd crop size) is zero-padded to S * ceil(h / S) x S * ceil(w / S); padded tokens enter
neither the region means nor the keys, windows of padding alone are routed last, and the padded
queries are dropped.

Cost per image, M = h * w tokens of width C, R = S^2 windows, w2 = M / R:
  projections (q, k, v, out)  8 M C^2 FLOPs
  routing                     2 R^2 C (+ top-k over R per window)
  attention                   4 M (k w2) C = 4 M^2 C * k / R   (full attention: 4 M^2 C)
  LCE (5 x 5 depthwise)       50 M C
  memory: the gathered keys and values, 2 k M C values, and the (B, R, H, w2, k w2) weights,
  k / R of full attention's (B, H, M, M).
At 32 x 32 tokens with S = 8, k = 4 the attention term is 1/16 of full attention's.

Letters: B batch, (h, w) grid, R windows, T tokens per window (w2), H heads, D head width.
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Dtype = Any


def window_layout(h: int, w: int, windows: int) -> tuple[int, int]:
  """(window height, window width) of `windows` x `windows` windows covering an (h, w) grid,
  padded up to a whole number of windows."""
  return -(-h // windows), -(-w // windows)


def to_windows(x: jax.Array, windows: int, size: tuple[int, int]) -> jax.Array:
  """(B, S * wh, S * ww, C) -> (B, S^2, wh * ww, C), windows row-major."""
  b, _, _, c = x.shape
  wh, ww = size
  x = x.reshape(b, windows, wh, windows, ww, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, windows * windows, wh * ww, c)


def from_windows(x: jax.Array, windows: int, size: tuple[int, int]) -> jax.Array:
  """(B, S^2, wh * ww, C) -> (B, S * wh, S * ww, C), the inverse of `to_windows`."""
  b, _, _, c = x.shape
  wh, ww = size
  x = x.reshape(b, windows, windows, wh, ww, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, windows * wh, windows * ww, c)


def route(q_windows: jax.Array, k_windows: jax.Array, topk: int,
          valid: np.ndarray | None = None) -> jax.Array:
  """The top-k routed windows of every window, without gradient.

  Args:
    q_windows, k_windows: (B, R, T, C) queries and keys by window.
    topk: k, at most R.
    valid: (R, T) bool, the tokens that are not padding, or None (all are).

  Returns:
    (B, R, k) int32 window indices, most affine first.
  """
  if valid is None:
    q_r, k_r = q_windows.mean(axis=2), k_windows.mean(axis=2)  # (B, R, C)
  else:
    weight = jnp.asarray(valid / np.maximum(valid.sum(-1, keepdims=True), 1), q_windows.dtype)
    q_r = jnp.einsum('brtc,rt->brc', q_windows, weight)
    k_r = jnp.einsum('brtc,rt->brc', k_windows, weight)
  affinity = jnp.einsum('brc,bsc->brs', q_r, k_r).astype(jnp.float32)
  if valid is not None:
    # Windows of padding alone come last: every window keeps at least one real window.
    affinity = jnp.where(jnp.asarray(valid.any(-1))[None, None, :], affinity, -jnp.inf)
  _, indices = jax.lax.top_k(jax.lax.stop_gradient(affinity), topk)
  return indices


def gather_windows(x: jax.Array, indices: jax.Array) -> jax.Array:
  """x (B, R, T, C), indices (B, R, k) -> (B, R, k * T, C): the tokens of each window's routes."""
  b, r, t, c = x.shape
  picked = jax.vmap(lambda xb, ib: xb[ib])(x, indices)  # (B, R, k, T, C)
  return picked.reshape(b, r, -1, c)


class RouteAttention(nn.Module):
  """BiFormer's bi-level routing attention: (B, h, w, C) -> (B, h, w, C) (module docstring).

  Attributes:
    num_heads: H, dividing C.
    windows: S, windows per side (S^2 in all).
    topk: k, routed windows per window (1 <= k <= S^2; S^2: full attention).
    local_kernel: the LCE depthwise conv's kernel size (BiFormer: 5); 0 leaves it out.
    dtype: computation dtype (softmax in at least float32).
  """
  num_heads: int
  windows: int
  topk: int
  local_kernel: int = 5
  dtype: Dtype = None

  @nn.compact
  def __call__(self, x: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
    """x (B, h, w, C) -> (output (B, h, w, C), {'routes': (B, S^2, k) int32 window indices})."""
    b, h, w, c = x.shape
    s, k = self.windows, self.topk
    if c % self.num_heads:
      raise ValueError(f'RouteAttention: width {c} is not divisible by num_heads={self.num_heads}.')
    if not 1 <= k <= s * s:
      raise ValueError(f'RouteAttention: topk={k} must be in [1, {s * s}] (windows={s} per side).')
    d = c // self.num_heads
    dense = lambda features, name: nn.Dense(features, dtype=self.dtype, name=name)
    q, kk, v = jnp.split(dense(3 * c, 'qkv')(x), 3, axis=-1)  # (B, h, w, C) each

    size = window_layout(h, w, s)
    ph, pw = s * size[0] - h, s * size[1] - w
    valid = None
    if ph or pw:
      pad = lambda y: jnp.pad(y, ((0, 0), (0, ph), (0, pw), (0, 0)))
      q, kk, v = pad(q), pad(kk), pad(v)
      grid = np.zeros((s * size[0], s * size[1], 1), bool)
      grid[:h, :w] = True
      valid = np.asarray(to_windows(grid[None], s, size))[0, ..., 0]  # (R, T)
    qw, kw, vw = (to_windows(y, s, size) for y in (q, kk, v))  # (B, R, T, C)
    routes = route(qw, kw, k, valid)
    ks, vs = gather_windows(kw, routes), gather_windows(vw, routes)  # (B, R, k * T, C)

    r, t = qw.shape[1], qw.shape[2]
    qh = qw.reshape(b, r, t, self.num_heads, d) * d**-0.5
    kh = ks.reshape(b, r, k * t, self.num_heads, d)
    vh = vs.reshape(b, r, k * t, self.num_heads, d)
    logits = jnp.einsum('brqhd,brkhd->brhqk', qh, kh)
    logits = logits.astype(jnp.promote_types(logits.dtype, jnp.float32))
    if valid is not None:
      keys_valid = jnp.asarray(valid)[routes].reshape(b, r, 1, 1, k * t)  # (B, R, 1, 1, kT)
      logits = jnp.where(keys_valid, logits, -jnp.inf)
    weights = jax.nn.softmax(logits, axis=-1).astype(vh.dtype)
    out = jnp.einsum('brhqk,brkhd->brqhd', weights, vh).reshape(b, r, t, c)
    out = from_windows(out, s, size)[:, :h, :w]

    if self.local_kernel:
      # LCE: BiFormer's `lepe`, a depthwise conv on V (on the unpadded grid).
      out = out + nn.Conv(c, (self.local_kernel, self.local_kernel), padding='SAME',
                          feature_group_count=c, dtype=self.dtype, name='lepe')(v[:, :h, :w])
    return dense(c, 'proj')(out), {'routes': routes}
