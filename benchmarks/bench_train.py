r"""Training-step and evaluation throughput of OTSeg at a real config, with MFU on GPU.

  python benchmarks/bench_train.py                      # VOC inductive: ViT-B/16 at 512, K=15
  python benchmarks/bench_train.py --config configs/cocostuff171.py:inductive --steps 5
  python benchmarks/bench_train.py --config configs/tiny.py --batch_per_device 8   # quick check

Random weights and random batches (no dataset, no CLIP download): the timing of `train_step`
(jit over all devices, batch sharded, the trainer's own function) and of the evaluation forward
(`inference.encode_decode` on batches of S x S slide windows, as `evaluate.SlideEvaluator` runs it).
Prints images/s, step time, and, on GPU, the model FLOP utilisation: FLOPs per step from XLA's cost
analysis over the step time and the device's peak (TF32 dense for float32 matmuls; --peak_tflops
to override). One VOC validation image at short side 512 is ~2 windows of 512 x 512.
"""

import argparse
import functools
import pathlib
import sys
import time

import jax
from jax.sharding import NamedSharding, PartitionSpec as P
import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from otseg_jax import devices  # noqa: E402  pylint: disable=g-import-not-at-top
from otseg_jax import inference  # noqa: E402  pylint: disable=g-import-not-at-top
from otseg_jax import losses  # noqa: E402  pylint: disable=g-import-not-at-top
from otseg_jax import params as params_lib  # noqa: E402  pylint: disable=g-import-not-at-top
from otseg_jax import trainer  # noqa: E402  pylint: disable=g-import-not-at-top
from otseg_jax.models import otseg  # noqa: E402  pylint: disable=g-import-not-at-top

# Dense peak FLOP/s per device for float32 matmuls run as TF32 (JAX's default GPU precision).
PEAK_TFLOPS = {'H100': 494.7, 'H200': 494.7, 'A100': 156.0, 'L4': 60.0}


def load_config(spec: str):
  path, _, arg = spec.partition(':')
  import importlib.util  # pylint: disable=g-import-not-at-top
  module_spec = importlib.util.spec_from_file_location('bench_config', REPO / path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg or None)


def peak_flops(override: float | None) -> float | None:
  if override:
    return override * 1e12
  device = jax.devices()[0]
  if device.platform != 'gpu':
    return None
  for name, tflops in PEAK_TFLOPS.items():
    if name in device.device_kind:
      return tflops * 1e12
  return None


def timed(fn, steps: int, warmup: int) -> float:
  """Mean seconds per call of fn() after `warmup` calls (the first one compiles)."""
  for _ in range(warmup):
    jax.block_until_ready(fn())
  start = time.perf_counter()
  for _ in range(steps):
    out = fn()
  jax.block_until_ready(out)
  return (time.perf_counter() - start) / steps


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--config', default='configs/voc12.py:inductive')
  parser.add_argument('--batch_per_device', type=int, default=4)
  parser.add_argument('--eval_windows_per_device', type=int, default=4)
  parser.add_argument('--steps', type=int, default=10)
  parser.add_argument('--warmup', type=int, default=2)
  parser.add_argument('--peak_tflops', type=float, default=None)
  parser.add_argument('--skip_eval', action='store_true')
  args = parser.parse_args()

  config = load_config(args.config)
  config.clip = ''  # random towers: the timing does not depend on the weights
  n_dev = jax.device_count()
  batch = args.batch_per_device * n_dev
  s = config.model.image_size
  if config.data.name == 'synthetic':
    from otseg_jax.data import synthetic  # pylint: disable=g-import-not-at-top
    dataset = synthetic.dataset_classes()
  else:
    from otseg_jax import classes  # pylint: disable=g-import-not-at-top
    dataset = classes.get(config.dataset)
  num_classes = dataset.num_classes
  k_train = num_classes - len(dataset.unseen) if config.setting == 'inductive' else num_classes
  n, c = config.model.num_prompts, config.model.backbone.output_dim
  rng = np.random.default_rng(0)
  text = rng.normal(size=(num_classes, n, c)).astype(np.float32)
  text /= np.linalg.norm(text, axis=-1, keepdims=True)
  print(f'{jax.device_count()} x {jax.devices()[0].device_kind}; {args.config}: S={s}, '
        f'K={k_train} train / {num_classes} eval classes, N={n}, global batch {batch}')

  mesh = devices.make_mesh()
  replicated = NamedSharding(mesh, P())
  data = NamedSharding(mesh, P('data'))
  model = otseg.model_from_config(config.model)
  params = trainer.init_params(config, model, text[:k_train], config.seed)
  if config.ft_backbone:
    trainable, frozen = params, {}
  else:
    trainable, frozen = params_lib.split_params(params, config.model.trainable)
  tx, _ = trainer.make_optimizer(config, trainable, config.num_train_steps)
  state = trainer.TrainState(step=np.int32(0), params=trainable, frozen=frozen,
                             opt_state=jax.tree.map(np.asarray, tx.init(trainable)),
                             rng=np.asarray(jax.random.PRNGKey(0), np.uint32))
  state = jax.device_put(state, replicated)
  images = jax.device_put(rng.normal(size=(batch, s, s, 3)).astype(np.float32), data)
  labels = jax.device_put(rng.integers(0, k_train, (batch, s, s)).astype(np.int32), data)
  index = jax.device_put(np.arange(batch, dtype=np.int32), data)
  text_train = jax.device_put(text[:k_train], replicated)
  loss_kwargs = {k: v for k, v in config.loss.to_dict().items() if k != 'name'}
  loss_fn = functools.partial(getattr(losses, config.loss.name), **loss_kwargs)
  step = jax.jit(functools.partial(trainer.train_step, model=model, tx=tx, loss_fn=loss_fn),
                 in_shardings=(replicated, data, replicated),
                 out_shardings=(replicated, replicated), donate_argnums=0)
  batch_arrays = {'image': images, 'label': labels, 'index': index}
  compiled = step.lower(state, batch_arrays, text_train).compile()
  flops = (compiled.cost_analysis() or {}).get('flops')

  def run_step():
    nonlocal state
    state, metrics = compiled(state, batch_arrays, text_train)
    return metrics['total']

  seconds = timed(run_step, args.steps, args.warmup)
  line = f'train: {seconds * 1e3:.1f} ms/step, {batch / seconds:.2f} images/s'
  peak = peak_flops(args.peak_tflops)
  if flops:
    line += f', {flops / seconds / 1e12:.2f} TFLOP/s (XLA cost analysis, whole program)'
    if peak:
      line += f', MFU {100 * flops / seconds / (peak * n_dev):.1f}%'
  print(line)

  if args.skip_eval:
    return
  windows = args.eval_windows_per_device * n_dev
  crops = jax.device_put(rng.normal(size=(windows, s, s, 3)).astype(np.float32), data)
  seen = jax.device_put(np.arange(num_classes) < k_train, replicated)
  full_params = jax.device_put(params_lib.merge_params(trainable, frozen), replicated)
  text_all = jax.device_put(text, replicated)
  probabilities = functools.partial(otseg.eval_probabilities, config=config.model)
  encode = jax.jit(lambda p, x: inference.encode_decode(model, p, x, text_all, seen, probabilities),
                   out_shardings=data)
  compiled = encode.lower(full_params, crops).compile()
  flops = (compiled.cost_analysis() or {}).get('flops')
  seconds = timed(lambda: compiled(full_params, crops), args.steps, args.warmup)
  line = (f'eval: {windows / seconds:.2f} windows/s ({s}x{s}, K={num_classes}), ~'
          f'{windows / seconds / 2:.2f} VOC images/s at 2 windows each')
  if flops and peak:
    line += f', MFU {100 * flops / seconds / (peak * n_dev):.1f}%'
  print(line)


if __name__ == '__main__':
  main()
