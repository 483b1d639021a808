"""Route attention (otseg_jax/models/route_attention.py) against independent numpy references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from otseg_jax.models import route_attention

C, HEADS = 8, 2


def _init(module, x):
  params = jax.jit(module.init)(jax.random.PRNGKey(0), x)['params']
  return jax.tree.map(lambda p: p + 0.1 * np.random.default_rng(1).normal(size=p.shape), params)


def _project(params, x):
  """q, k, v (B, M, H, D) of the module's qkv layer, in numpy."""
  b, h, w, c = x.shape
  qkv = x.reshape(b, h * w, c) @ params['qkv']['kernel'] + params['qkv']['bias']
  return [y.reshape(b, h * w, HEADS, c // HEADS) for y in np.split(qkv, 3, axis=-1)]


def _attend(q, k, v, keys):
  """Softmax attention of queries q (H, D) over the key positions `keys`."""
  logits = np.einsum('qhd,khd->hqk', q, k[keys]) / np.sqrt(q.shape[-1])
  weights = np.exp(logits - logits.max(-1, keepdims=True))
  weights /= weights.sum(-1, keepdims=True)
  return np.einsum('hqk,khd->qhd', weights, v[keys])


def _reference(params, x, windows, topk):
  """Bi-level routing written out per window with explicit index sets (no LCE)."""
  x = np.asarray(x)
  b, h, w, c = x.shape
  wh, ww = -(-h // windows), -(-w // windows)
  q, k, v = _project(params, x)
  rows, cols = np.divmod(np.arange(h * w), w)
  window_of = (rows // wh) * windows + cols // ww
  members = [np.flatnonzero(window_of == r) for r in range(windows * windows)]
  out = np.zeros((b, h * w, HEADS, c // HEADS))
  for i in range(b):
    mean = lambda y, idx: y[i, idx].reshape(len(idx), -1).mean(0) if len(idx) else None
    q_r = [mean(q, idx) for idx in members]
    k_r = [mean(k, idx) for idx in members]
    for r, idx in enumerate(members):
      if not len(idx):
        continue
      scores = [-np.inf if k_r[s] is None else q_r[r] @ k_r[s] for s in range(len(members))]
      routed = np.argsort(scores)[::-1][:topk]
      keys = np.concatenate([members[s] for s in routed])
      out[i, idx] = _attend(q[i, idx], k[i], v[i], keys)
  out = out.reshape(b, h * w, c) @ params['proj']['kernel'] + params['proj']['bias']
  return out.reshape(b, h, w, c)


def _full_attention(params, x):
  b, h, w, c = x.shape
  q, k, v = _project(params, np.asarray(x))
  out = np.stack([_attend(q[i], k[i], v[i], np.arange(h * w)) for i in range(b)])
  return (out.reshape(b, h * w, c) @ params['proj']['kernel'] + params['proj']['bias']).reshape(
      b, h, w, c)


@pytest.mark.parametrize('grid,windows', [((8, 8), 4), ((6, 5), 4)], ids=['whole', 'padded'])
def test_topk_all_windows_is_full_attention(grid, windows):
  with jax.enable_x64(True):
    x = np.random.default_rng(0).normal(size=(2, *grid, C))
    module = route_attention.RouteAttention(HEADS, windows, windows**2, local_kernel=0,
                                            dtype=jnp.float64)
    params = _init(module, x)
    out, info = jax.jit(module.apply)({'params': params}, x)
    assert info['routes'].shape == (2, windows**2, windows**2)
    np.testing.assert_allclose(out, _full_attention(params, x), rtol=1e-10, atol=1e-12)


def test_one_window_per_image_with_k1_is_attention_inside_it():
  with jax.enable_x64(True):
    x = np.random.default_rng(2).normal(size=(2, 4, 6, C))
    module = route_attention.RouteAttention(HEADS, 1, 1, local_kernel=0, dtype=jnp.float64)
    params = _init(module, x)
    out, _ = jax.jit(module.apply)({'params': params}, x)
    np.testing.assert_allclose(out, _full_attention(params, x), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize('grid,topk', [((8, 8), 3), ((7, 6), 2)])
def test_routed_attention_matches_the_written_out_reference(grid, topk):
  with jax.enable_x64(True):
    x = np.random.default_rng(3).normal(size=(2, *grid, C))
    module = route_attention.RouteAttention(HEADS, 4, topk, local_kernel=0, dtype=jnp.float64)
    params = _init(module, x)
    out, _ = jax.jit(module.apply)({'params': params}, x)
    np.testing.assert_allclose(out, _reference(params, x, 4, topk), rtol=1e-10, atol=1e-12)


def test_permuting_whole_windows_permutes_the_output():
  x = np.random.default_rng(4).normal(size=(2, 8, 8, C)).astype(np.float32)
  module = route_attention.RouteAttention(HEADS, 4, 3, local_kernel=0)
  params = _init(module, x)
  apply = jax.jit(module.apply)
  perm = np.random.default_rng(5).permutation(16)
  shuffle = lambda y: route_attention.from_windows(
      route_attention.to_windows(y, 4, (2, 2))[:, perm], 4, (2, 2))
  out, _ = apply({'params': params}, x)
  out_perm, _ = apply({'params': params}, shuffle(x))
  np.testing.assert_allclose(out_perm, shuffle(out), rtol=1e-5, atol=1e-5)


def test_gradients_flow_to_the_values_not_through_the_routing():
  x = np.random.default_rng(6).normal(size=(1, 8, 8, C)).astype(np.float32)
  module = route_attention.RouteAttention(HEADS, 4, 2)  # with the LCE conv
  params = _init(module, x)
  loss = lambda p, x: jnp.sum(module.apply({'params': p}, x)[0] ** 2)
  grads_p, grads_x = jax.jit(jax.grad(loss, argnums=(0, 1)))(params, x)
  assert all(np.isfinite(g).all() and np.abs(g).sum() > 0 for g in jax.tree.leaves(grads_p))
  assert np.isfinite(grads_x).all()
  # The routes are integers from a stop_gradient'ed affinity: nothing to differentiate.
  routes = jax.jit(lambda p, x: module.apply({'params': p}, x)[1]['routes'])(params, x)
  assert routes.dtype == jnp.int32 and routes.shape == (1, 16, 2)
