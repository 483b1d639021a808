"""Processes and devices: multi-process start-up, the mesh, moving trees between host and devices,
and the command-line tools' logging filter. Shared by training, evaluation and the benchmarks.
"""

import ctypes
import logging as py_logging
import os
from collections.abc import Sequence
from typing import Any

from absl import flags
from absl import logging
import jax
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
import numpy as np


def quiet_library_logs() -> None:
  """Keeps orbax's and JAX's per-operation INFO lines out of the run's log (warnings still show)."""

  class _Filter(py_logging.Filter):

    def filter(self, record):
      path = record.pathname.replace(os.sep, '/')
      noisy = '/orbax/' in path or '/jax/_src/' in path or '/grain/' in path
      return record.levelno >= py_logging.WARNING or not noisy

  logging.get_absl_handler().addFilter(_Filter())


def maybe_initialize_distributed(coordinator_address: str | None = None,
                                 num_processes: int | None = None,
                                 process_id: int | None = None, auto: bool = False) -> None:
  """`jax.distributed.initialize` for multi-process runs (explicit values or auto-detection on
  SLURM / TPU pods / ...). A single process needs nothing. CPU collectives use gloo."""
  if num_processes and num_processes > 1:
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')
    jax.distributed.initialize(coordinator_address=coordinator_address,
                               num_processes=num_processes, process_id=process_id)
  elif auto:
    jax.distributed.initialize()


def define_distributed_flags():
  """Defines the multi-process flags of train.py and eval.py; returns `init()` that applies them.

  `--coordinator_address=HOST:PORT --num_processes=P --process_id=I` on every host, or
  `--multihost` for `jax.distributed.initialize()`'s auto-detection (SLURM, TPU pods).
  """
  coordinator = flags.DEFINE_string('coordinator_address', None,
                                    'HOST:PORT of process 0, for multi-process runs.')
  num_processes = flags.DEFINE_integer('num_processes', None, 'Processes in a multi-process run.')
  process_id = flags.DEFINE_integer('process_id', None, 'This process, 0..num_processes-1.')
  multihost = flags.DEFINE_bool('multihost', False,
                                'jax.distributed.initialize() with auto-detection (SLURM, TPU).')

  def init() -> None:
    maybe_initialize_distributed(coordinator.value, num_processes.value, process_id.value,
                                 auto=multihost.value)
  return init


def make_mesh() -> jax.sharding.Mesh:
  """1-D mesh over every device of every process; Auto axes (Explicit axes break ott's loops)."""
  return jax.make_mesh((jax.device_count(),), ('data',), axis_types=(AxisType.Auto,))


def replicate_global(tree: Any, sharding: NamedSharding) -> Any:
  """Host numpy leaves (identical on every process) -> global arrays replicated over the mesh."""
  def put(x):
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])
  return jax.tree.map(put, tree)


def pmap_replicate(tree: Any, devices: Sequence[Any]) -> Any:
  """Host leaves -> one copy per local device, stacked on a leading axis, as pmap takes them."""
  sharding = NamedSharding(jax.sharding.Mesh(np.asarray(devices), ('pmap',)), P('pmap'))
  return jax.tree.map(
      lambda x: jax.device_put(np.stack([np.asarray(x)] * len(devices)), sharding), tree)


def xla_owned(tree: Any) -> Any:
  """`tree`'s arrays copied into buffers XLA allocated, on CPU; elsewhere `tree` itself.

  `trainer.init_params` returns numpy views of its jit's outputs, and on CPU putting those back
  wraps the same buffers. A donated buffer that a numpy view still shares is not reused for the
  step's outputs, so each step would allocate a second state (0.45 GB at the VOC config).
  """
  if jax.default_backend() != 'cpu':
    return tree
  return jax.jit(lambda t: jax.tree.map(lambda x: x.copy(), t))(tree)


def release_host_memory() -> None:
  """Returns freed heap memory to the OS (glibc's `malloc_trim`); nothing where there is no glibc.

  Compilation and the host copies of the initial state leave hundreds of MB freed but resident,
  which the run's peak would count (0.4 GB after compiling the VOC train step).
  """
  try:
    ctypes.CDLL('libc.so.6').malloc_trim(0)
  except (OSError, AttributeError):
    pass


def to_host(tree: Any) -> Any:
  """Replicated global arrays -> numpy, on every process (each reads its own copy)."""
  def get(x):
    if isinstance(x, jax.Array):
      return np.asarray(x.addressable_data(0))
    return np.asarray(x)
  return jax.tree.map(get, tree)
