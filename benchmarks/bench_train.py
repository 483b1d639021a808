r"""Training-step and evaluation throughput of a method at a real config, with MFU on GPU.

  python benchmarks/bench_train.py                      # VOC inductive: ViT-B/16 at 512, K=15
  python benchmarks/bench_train.py --config configs/cocostuff171.py:inductive --steps 5
  python benchmarks/bench_train.py --dtype bfloat16 --remat block
  python benchmarks/bench_train.py --config configs/tiny.py --batch_per_device 8   # quick check

The method is the config's (`config.model.name`), as in train.py.

Random weights, random batches and random class text (no dataset, no CLIP download; a method
that learns its text gets random token ids of a realistic length): the timing of `train_step`
(jit over all devices, batch sharded, the trainer's own function) and of the evaluation forward
(`inference.encode_decode` on batches of S x S slide windows, as `inference.SlideEvaluator` runs it).
Prints images/s, step time, XLA's estimate of the step's memory, and, on GPU, the model FLOP
utilisation: the image tower's model FLOPs (`tower_flops`) over the step time and the device's
peak (dense bf16, or TF32 for float32 matmuls; --peak_tflops to override). One VOC validation image at
short side 512 is ~2 windows of 512 x 512. `benchmarks/device_check.py` runs these functions over
the variants of one GPU check.
"""

import argparse
import functools
import pathlib
import sys
import time
from typing import Any

import jax
from jax.sharding import NamedSharding, PartitionSpec as P
import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from otseg_jax import devices  # noqa: E402  pylint: disable=g-import-not-at-top
from otseg_jax import inference  # noqa: E402  pylint: disable=g-import-not-at-top
from otseg_jax import losses  # noqa: E402  pylint: disable=g-import-not-at-top
from otseg_jax import params as params_lib  # noqa: E402  pylint: disable=g-import-not-at-top
from otseg_jax import models  # noqa: E402  pylint: disable=g-import-not-at-top
from otseg_jax import trainer  # noqa: E402  pylint: disable=g-import-not-at-top

# Dense peak TFLOP/s per device (vendor datasheets, SXM parts): bf16, and float32 matmuls run as
# TF32 (JAX's default GPU precision).
PEAK_TFLOPS = {'H100': {'bfloat16': 989.4, 'float32': 494.7},
               'H200': {'bfloat16': 989.4, 'float32': 494.7},
               'A100': {'bfloat16': 312.0, 'float32': 156.0},
               'L4': {'bfloat16': 121.0, 'float32': 60.0}}


def load_config(spec: str):
  path, _, arg = spec.partition(':')
  import importlib.util  # pylint: disable=g-import-not-at-top
  module_spec = importlib.util.spec_from_file_location('bench_config', REPO / path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg or None)


def peak_flops(dtype: str, override: float | None = None) -> float | None:
  """Peak FLOP/s of one device for matmuls in `dtype`; None where unknown (CPU)."""
  if override:
    return override * 1e12
  device = jax.devices()[0]
  if device.platform != 'gpu':
    return None
  for name, peaks in PEAK_TFLOPS.items():
    if name in device.device_kind:
      return peaks[dtype] * 1e12
  return None


def timed(fn, steps: int, warmup: int) -> float:
  """Median seconds per call of fn() after `warmup` calls (the first one compiles)."""
  for _ in range(warmup):
    jax.block_until_ready(fn())
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return float(np.median(times))


def _memory_gb(compiled) -> float | None:
  """XLA's peak estimate of one device's memory for the program: arguments + outputs + temps."""
  try:
    m = compiled.memory_analysis()
    total = m.temp_size_in_bytes + m.argument_size_in_bytes + m.output_size_in_bytes
    return (total - m.alias_size_in_bytes) / 2**30
  except Exception:  # pylint: disable=broad-except  # not every backend reports it
    return None


def tower_flops(config, batch: int, train: bool) -> float:
  """Model FLOPs of the image tower's matmuls for `batch` images: the MFU numerator.

  Counted by hand because XLA's cost analysis on GPU reports ~1/10 of them (seen on an H200 with
  jax 0.11.2). Per block of L tokens and width D: 24 L D^2 (q, k, v, out, the 4D MLP) and
  4 L^2 D (q k^T, weights @ v). Training differentiates activations only (the weights are
  frozen): backward = the forward's matmuls again and twice its attention, so 2x + 3x. Remat's
  recomputation is not counted (model FLOPs, not hardware FLOPs); the head (~1 %) is left out.
  """
  b, s = config.model.backbone, config.model.image_size
  m = (s // b.patch_size)**2
  total = 2 * m * b.patch_size**2 * 3 * b.width  # conv1
  prompts, depth = b.get('num_prompt_tokens', 0), b.get('prompt_depth', 0)
  for i in range(b.layers):
    # Blocks 0..prompt_depth carry the prompt tokens (clip.Transformer).
    l = 1 + m + (prompts if i <= depth else 0)
    matmuls, attention = 24 * l * b.width**2, 4 * l * l * b.width
    total += 2 * matmuls + 3 * attention if train else matmuls + attention
  return float(total * batch)


_PARAMS_CACHE = {}


def _init_params(config, model, text: np.ndarray, cache: bool = True):
  """`trainer.init_params`, once per architecture: dtype, remat and attention do not change it.
  cache=False: computed afresh and not kept (a memory figure must not count a cached copy)."""
  key = (config.model.name, config.model.image_size, text.shape,
         tuple(sorted((k, v) for k, v in config.model.backbone.items()
                      if k not in ('remat', 'attention'))))
  if not cache:
    return trainer.init_params(config, model, text, config.seed)
  if key not in _PARAMS_CACHE:
    _PARAMS_CACHE[key] = trainer.init_params(config, model, text, config.seed)
  return _PARAMS_CACHE[key]


def _dataset_sizes(config) -> tuple[int, int]:
  """(classes trained on, classes evaluated) of the config's dataset and setting."""
  from otseg_jax import classes  # pylint: disable=g-import-not-at-top
  if config.data.name == 'synthetic':
    from otseg_jax.data import synthetic  # pylint: disable=g-import-not-at-top
    dataset = synthetic.dataset_classes()
  else:
    dataset = classes.get(config.dataset)
  return len(classes.train_text_rows(dataset, config.setting)), dataset.num_classes


def _random_text(config, num_classes: int) -> np.ndarray:
  """The class text input the method asks for (`config.model.text`), random: (K, N, C) unit
  embeddings, or (K, L) token ids for a prompt learner, L = the template's words + 4 (SOT, a
  two-token class name, '.', EOT), the length `text_embeddings.class_tokens` gives such names."""
  rng = np.random.default_rng(0)
  if config.model.text == 'tokens':
    length = len(config.model.text_template.split()) + 4
    tokens = rng.integers(1, 49406, (num_classes, length)).astype(np.int32)
    tokens[:, 0], tokens[:, -1] = 49406, 49407  # SOT, EOT (the row maximum: the pooled token)
    # The template's words before the name are the same in every prompt, as in real ones (a
    # method may check it: LDVC's deep text prompts replace them).
    words = len(config.model.text_template.split('{}')[0].split())
    tokens[:, 1:1 + words] = tokens[:1, 1:1 + words]
    return tokens
  text = rng.normal(size=(num_classes, config.model.num_prompts,
                          config.model.backbone.output_dim)).astype(np.float32)
  return text / np.linalg.norm(text, axis=-1, keepdims=True)


def _setup(config):
  """What both figures start from: (devices, crop S, classes trained / evaluated, replicated and
  batch shardings, the method module, its model). Random towers: the timing does not depend on
  the weights."""
  config.clip = ''
  k_train, num_classes = _dataset_sizes(config)
  mesh = devices.make_mesh()
  method = models.get_method(config.model.name)
  return (jax.device_count(), config.model.image_size, k_train, num_classes,
          NamedSharding(mesh, P()), NamedSharding(mesh, P('data')), method,
          method.model_from_config(config.model))


def train_figure(config, batch_per_device: int, steps: int, warmup: int,
                 peak_tflops: float | None = None, donate: bool = True,
                 on_compiled=None, cache_params: bool = True) -> dict[str, Any]:
  """Times `trainer.train_step` at `config` on random data; a dict of figures.

  `donate`: the state's buffers are donated to the step, as the trainer does; False measures
  what that saves. `on_compiled()` is called between compilation and the timed steps
  (`bench_memory.py` tells the two peaks apart with it). The state reaches the step as in the
  trainer: in XLA-owned buffers, freed host memory returned before and after compiling.
  """
  n_dev, s, k_train, _, replicated, data, _, model = _setup(config)
  batch = batch_per_device * n_dev
  text = _random_text(config, k_train)
  params = _init_params(config, model, text, cache=cache_params)
  if config.ft_backbone:
    trainable, frozen = params, {}
  else:
    trainable, frozen = params_lib.split_params(params, config.model.trainable)
  tx, _ = trainer.make_optimizer(config, trainable, config.num_train_steps)
  state = trainer.TrainState(step=np.int32(0), params=trainable, frozen=frozen,
                             opt_state=jax.tree.map(np.asarray, tx.init(trainable)),
                             rng=np.asarray(jax.random.PRNGKey(0), np.uint32))
  state = devices.xla_owned(jax.device_put(state, replicated))
  del params, trainable, frozen
  devices.release_host_memory()
  rng = np.random.default_rng(0)
  batch_arrays = {
      'image': jax.device_put(rng.normal(size=(batch, s, s, 3)).astype(np.float32), data),
      'label': jax.device_put(rng.integers(0, k_train, (batch, s, s)).astype(np.int32), data),
      'index': jax.device_put(np.arange(batch, dtype=np.int32), data)}
  text = jax.device_put(text, replicated)
  loss_kwargs = {k: v for k, v in config.loss.to_dict().items() if k != 'name'}
  loss_fn = functools.partial(getattr(losses, config.loss.name), **loss_kwargs)
  step = jax.jit(functools.partial(trainer.train_step, model=model, tx=tx, loss_fn=loss_fn),
                 in_shardings=(replicated, data, replicated),
                 out_shardings=(replicated, replicated), donate_argnums=0 if donate else ())
  start = time.perf_counter()
  compiled = step.lower(state, batch_arrays, text).compile()
  compile_s = time.perf_counter() - start
  devices.release_host_memory()
  flops = (compiled.cost_analysis() or {}).get('flops')
  if on_compiled:
    on_compiled()

  def run_step():
    nonlocal state
    state, metrics = compiled(state, batch_arrays, text)
    return metrics['total']

  seconds = timed(run_step, steps, warmup)
  dtype = config.model.get('dtype', 'float32')
  peak = peak_flops(dtype, peak_tflops)
  model_flops = tower_flops(config, batch, train=True)
  return dict(
      dtype=dtype, remat=config.model.backbone.get('remat', 'none'),
      attention=model.vision_tower['attention'],
      batch=batch, image_size=s, classes=k_train, step_ms=seconds * 1e3,
      images_per_s=batch / seconds, compile_s=compile_s, memory_gb=_memory_gb(compiled),
      model_tflops=model_flops / seconds / 1e12,
      xla_tflops=flops / seconds / 1e12 if flops else None,
      mfu=100 * model_flops / seconds / (peak * n_dev) if peak else None)


def eval_figure(config, windows_per_device: int, steps: int, warmup: int,
                peak_tflops: float | None = None) -> dict[str, Any]:
  """Times the evaluation forward on S x S windows at `config`; a dict of figures."""
  n_dev, s, k_train, num_classes, replicated, data, method, model = _setup(config)
  windows = windows_per_device * n_dev
  text = _random_text(config, num_classes)
  params = jax.device_put(_init_params(config, model, text[:k_train]), replicated)
  crops = jax.device_put(
      np.random.default_rng(0).normal(size=(windows, s, s, 3)).astype(np.float32), data)
  seen = jax.device_put(np.arange(num_classes) < k_train, replicated)
  # The class text once for all classes, as evaluation computes it.
  text_all = jax.device_put(models.encode_text(model, params, text), replicated)
  probabilities = functools.partial(method.eval_probabilities, config=config.model)
  encode = jax.jit(lambda p, x: inference.encode_decode(model, p, x, text_all, seen, probabilities),
                   out_shardings=data)
  start = time.perf_counter()
  compiled = encode.lower(params, crops).compile()
  compile_s = time.perf_counter() - start
  seconds = timed(lambda: compiled(params, crops), steps, warmup)
  peak = peak_flops(config.model.get('dtype', 'float32'), peak_tflops)
  model_flops = tower_flops(config, windows, train=False)
  return dict(
      dtype=config.model.get('dtype', 'float32'),
      attention=model.vision_tower['attention'],
      windows=windows,
      image_size=s, classes=num_classes, windows_per_s=windows / seconds,
      compile_s=compile_s, memory_gb=_memory_gb(compiled),
      model_tflops=model_flops / seconds / 1e12,
      mfu=100 * model_flops / seconds / (peak * n_dev) if peak else None)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--config', default='configs/voc12.py:inductive')
  parser.add_argument('--batch_per_device', type=int, default=4)
  parser.add_argument('--eval_windows_per_device', type=int, default=4)
  parser.add_argument('--dtype', default=None, help="'float32' or 'bfloat16' (config.model.dtype)")
  parser.add_argument('--remat', default=None, help='config.model.backbone.remat')
  parser.add_argument('--attention', default=None, help='config.model.backbone.attention')
  parser.add_argument('--steps', type=int, default=10)
  parser.add_argument('--warmup', type=int, default=2)
  parser.add_argument('--peak_tflops', type=float, default=None)
  parser.add_argument('--skip_eval', action='store_true')
  args = parser.parse_args()

  def config():
    c = load_config(args.config)
    for field, value in (('dtype', args.dtype),):
      if value:
        c.model[field] = value
    for field, value in (('remat', args.remat), ('attention', args.attention)):
      if value:
        c.model.backbone[field] = value
    return c

  print(f'{jax.device_count()} x {jax.devices()[0].device_kind}; {args.config}')
  t = train_figure(config(), args.batch_per_device, args.steps, args.warmup, args.peak_tflops)
  line = (f"train ({t['dtype']}, remat {t['remat']}, attention {t['attention']}, batch "
          f"{t['batch']}, K={t['classes']}): {t['step_ms']:.1f} ms/step, "
          f"{t['images_per_s']:.2f} images/s")
  if t['memory_gb'] is not None:
    line += f", XLA memory estimate {t['memory_gb']:.2f} GiB"
  line += f", {t['model_tflops']:.2f} TFLOP/s (tower model FLOPs)"
  if t['mfu']:
    line += f", MFU {t['mfu']:.1f}%"
  print(line)
  if args.skip_eval:
    return
  e = eval_figure(config(), args.eval_windows_per_device, args.steps, args.warmup,
                  args.peak_tflops)
  line = (f"eval: {e['windows_per_s']:.2f} windows/s ({e['image_size']}x{e['image_size']}, "
          f"K={e['classes']}), ~{e['windows_per_s'] / 2:.2f} VOC images/s at 2 windows each")
  if e['mfu']:
    line += f", MFU {e['mfu']:.1f}%"
  print(line)


if __name__ == '__main__':
  main()
