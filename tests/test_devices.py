"""otseg_jax.devices: the memory helpers the trainer uses on CPU."""

import jax
import jax.numpy as jnp
import numpy as np

from otseg_jax import devices


def test_donated_state_is_reused_in_place_only_in_xla_owned_buffers():
  """Why `xla_owned`: `trainer.init_params` returns numpy views of its jit's outputs; put back on
  the device they wrap the same buffers, and a donated buffer a numpy view still shares is not
  reused for the step's output (JAX 0.10, CPU)."""
  step = jax.jit(lambda t: jax.tree.map(lambda x: x * 2, t), donate_argnums=0)
  host = {'w': np.asarray(jax.jit(lambda: jnp.arange(1 << 16, dtype=jnp.float32))())}
  expected = np.arange(1 << 16, dtype=np.float32)

  wrapped = jax.device_put(host)
  pointer = wrapped['w'].unsafe_buffer_pointer()
  wrapped_reused = step(wrapped)['w'].unsafe_buffer_pointer() == pointer

  owned = devices.xla_owned(jax.device_put(host))
  np.testing.assert_array_equal(owned['w'], expected)
  pointer = owned['w'].unsafe_buffer_pointer()
  assert pointer != host['w'].ctypes.data  # a copy, not the numpy view's memory
  out = step(owned)
  np.testing.assert_array_equal(out['w'], 2 * expected)
  assert out['w'].unsafe_buffer_pointer() == pointer  # updated in place
  if jax.default_backend() == 'cpu':
    # If this fails, JAX now reuses such buffers and xla_owned can go.
    assert not wrapped_reused


def test_release_host_memory_keeps_arrays_intact():
  x = jnp.arange(1000.0)
  big = np.ones((1 << 22,), np.float32)
  del big
  devices.release_host_memory()
  np.testing.assert_array_equal(np.asarray(x), np.arange(1000.0))
