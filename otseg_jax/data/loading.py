"""What a run reads: the splits of config.data and the training batches of this process.

`load_data_split` gives a `pipeline.Split` (a prepared TFDS folder or the synthetic set);
`make_train_iterator` the checkpointable iterator of this process's share of each global batch.
"""

import pathlib
from collections.abc import Sequence
from typing import Any

import grain
import jax
import ml_collections
import numpy as np

from otseg_jax.data import pipeline
from otseg_jax.data import synthetic
from otseg_jax.data import transforms


def synthetic_config(config: ml_collections.ConfigDict) -> Any:
  """The `synthetic.SyntheticConfig` of config.data.synthetic."""
  return synthetic.SyntheticConfig(**config.data.synthetic.to_dict())


def load_data_split(config: ml_collections.ConfigDict, split: str) -> Any:
  """A `pipeline.Split` of config.data.name: a prepared TFDS folder or the synthetic set."""
  if config.data.name == 'synthetic':
    return synthetic.load_split(split, synthetic_config(config))
  return pipeline.load_split(config.data.name, split,
                             pathlib.Path(config.data.data_dir).expanduser())


class ShardedBatches(grain.DatasetIterator):
  """Concatenates the batches of several data shards read by one process (config.data.shards a
  multiple of the process count), so that a run reads the same global batches on any number of
  processes. Checkpointable like the shard iterators it holds."""

  def __init__(self, shards: Sequence[grain.DatasetIterator]):
    super().__init__(list(shards))
    self._shards = list(shards)

  def __next__(self) -> dict[str, np.ndarray]:
    batches = [next(s) for s in self._shards]
    return {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}

  def get_state(self) -> dict[str, Any]:
    return {'shards': [s.get_state() for s in self._shards]}

  def set_state(self, state: dict[str, Any]) -> None:
    if len(state['shards']) != len(self._shards):
      raise ValueError(f'The checkpoint holds {len(state["shards"])} data shards per process, this '
                       f'run reads {len(self._shards)}: keep config.data.shards and the number of '
                       'processes of the run being resumed.')
    for s, st in zip(self._shards, state['shards']):
      s.set_state(st)


def make_train_iterator(config: ml_collections.ConfigDict, split: Any) -> grain.DatasetIterator:
  """This process's iterator of local batches {'image' (b, S, S, 3), 'label' (b, S, S)},
  b = config.batch_size / process count."""
  num_processes = jax.process_count()
  shards = config.data.shards or num_processes
  if shards % num_processes or config.batch_size % shards:
    raise ValueError(f'config.data.shards={shards} must be a multiple of the {num_processes} '
                     f'processes and divide config.batch_size={config.batch_size}.')
  augment = None
  if config.data.augment:
    augment = transforms.TrainAugment(
        img_scale=tuple(config.data.img_scale), ratio_range=tuple(config.data.ratio_range),
        cat_max_ratio=config.data.cat_max_ratio)
  per_process = shards // num_processes
  loaders = [
      pipeline.make_train_loader(
          split, global_batch_size=config.batch_size, crop_size=config.model.image_size,
          seed=config.seed, setting=config.setting, augment=augment,
          process_index=jax.process_index() * per_process + j, process_count=shards,
          num_threads=config.data.num_threads, worker_count=config.data.num_workers)
      for j in range(per_process)]
  return loaders[0] if per_process == 1 else ShardedBatches(loaders)
