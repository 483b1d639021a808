r"""The GPU figures of one device call: train step, memory, MFU, OT share, eval, COCO-Stuff.

  python benchmarks/device_check.py --out DIR [--budget_s 420]

Runs on whatever devices JAX sees (meant for one H100/H200-class GPU; `device_check.sh` is the
prepared call) and writes DIR/device_check.json and DIR/device_check.md, rewritten after every
figure, so a run cut short still leaves what it measured. Figures are taken in priority order and
the rest are skipped once `--budget_s` is spent; a figure that fails is recorded with its error.

- ceiling: an 8192^3 bf16 matmul (the device's measured matrix rate, beside the datasheet peak);
- train: `trainer.train_step` at the VOC config (ViT-B/16 at 512, K=15, per-device batch 16) in
  float32 and bfloat16, with and without remat, and with XLA's instead of cuDNN's attention;
Set DEVICE_CHECK_SKIP=name,name to leave figures out (e.g. those a previous call measured).

- ot: the step's OT layers alone (MPS path + 3 MPSA layers = 4 Sinkhorn calls over B x K problems
  of 1024 x 6, vmapped per example as in the step), forward + backward, at the default stopping
  rule on random features and at fixed 25 / 50 / 100 iterations; their share of the step;
- eval: windows/s of the evaluation forward (K=20);
- coco: the COCO-Stuff step (K=156, 100 prompt tokens, N=8).
MFU = XLA cost-analysis FLOPs / step time / datasheet peak (dense bf16, or TF32 for float32).
"""

import argparse
import functools
import json
import os
import pathlib
import sys
import tempfile
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import bench_train  # noqa: E402  pylint: disable=g-import-not-at-top
from otseg_jax.models import ot_layers  # noqa: E402  pylint: disable=g-import-not-at-top
from otseg_jax.models import otseg  # noqa: E402  pylint: disable=g-import-not-at-top

VOC = 'configs/voc12.py:inductive'
COCO = 'configs/cocostuff171.py:inductive'


def ceiling_figure() -> dict:
  """Measured bf16 matrix rate: an 8192^3 product on random data, median of 10."""
  if jax.default_backend() == 'cpu':
    return dict(skipped='no accelerator')
  k1, k2 = jax.random.split(jax.random.PRNGKey(0))
  a = jax.random.normal(k1, (8192, 8192), jnp.bfloat16)
  b = jax.random.normal(k2, (8192, 8192), jnp.bfloat16)
  matmul = jax.jit(lambda x, y: x @ y)
  seconds = bench_train.timed(lambda: matmul(a, b), 10, 3)
  return dict(bf16_matmul_tflops=2 * 8192**3 / seconds / 1e12)


def ot_figure(batch: int, classes: int, m: int, n: int, c: int, iterations: int | None,
              step_ms: float | None) -> dict:
  """Forward + backward of the step's 4 Sinkhorn calls on random unit features."""
  config = otseg.get_config('voc').ot
  if iterations:
    config.min_iterations = config.max_iterations = iterations
  rng = np.random.default_rng(0)
  unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)
  pixels = jnp.asarray(unit(rng.normal(size=(4, batch, 1, m, c))), jnp.float32)
  prompts = jnp.asarray(unit(rng.normal(size=(4, batch, 1, classes, n, c))), jnp.float32)

  def loss(pixels, prompts):
    total = 0.0
    for layer in range(4):  # distinct inputs per call, as the step's layers
      one = lambda p, q: ot_layers.transport_map(p, q, config)[1]
      total += jnp.sum(jax.vmap(one)(pixels[layer], prompts[layer]) ** 2)
    return total

  grad = jax.jit(jax.grad(loss, argnums=(0, 1)))
  seconds = bench_train.timed(lambda: grad(pixels, prompts), 5, 2)
  iters = jax.jit(lambda p, q: ot_layers.transport_map(p, q, config)[2]['iterations'])(
      pixels[0, 0], prompts[0, 0])
  return dict(iterations=iterations or 'default', iterations_seen=int(np.max(iters)),
              ms=seconds * 1e3, share_of_step=seconds * 1e3 / step_ms if step_ms else None)


def markdown(results: dict) -> str:
  lines = [f"# device_check: {results['device']}", '',
           f"jax {results['jax']}; {results['elapsed_s']:.0f} s; datasheet peaks: "
           f"{results['peaks']}", '']
  for name, row in results['figures'].items():
    cells = ', '.join(f'{k}={v:.4g}' if isinstance(v, float) else f'{k}={v}'
                      for k, v in row.items() if k != 'traceback')
    lines.append(f'- **{name}**: {cells}')
  return '\n'.join(lines) + '\n'


def write(out: pathlib.Path, results: dict) -> None:
  for name, text in (('device_check.json', json.dumps(results, indent=2, default=str)),
                     ('device_check.md', markdown(results))):
    with tempfile.NamedTemporaryFile('w', dir=out, delete=False) as f:
      f.write(text)
    os.replace(f.name, out / name)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--out', required=True)
  parser.add_argument('--budget_s', type=float, default=420.0)
  parser.add_argument('--batch_per_device', type=int, default=16)
  parser.add_argument('--steps', type=int, default=5)
  args = parser.parse_args()
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  start = time.time()
  results = dict(device=f'{jax.device_count()} x {jax.devices()[0].device_kind}',
                 jax=jax.__version__, peaks=bench_train.PEAK_TFLOPS.get('H200'), figures={},
                 elapsed_s=0.0)

  def config(spec, dtype='float32', remat='none', attention='auto'):
    c = bench_train.load_config(spec)
    c.model.dtype = dtype
    c.model.backbone.remat = remat
    c.model.backbone.attention = attention
    return c

  b = args.batch_per_device
  train = functools.partial(bench_train.train_figure, batch_per_device=b, steps=args.steps,
                            warmup=2)
  evaluate = functools.partial(bench_train.eval_figure, windows_per_device=b, steps=args.steps,
                               warmup=2)
  voc_step_ms = {}

  def ot(iterations):
    ms = voc_step_ms.get('bfloat16') or voc_step_ms.get('float32')
    return ot_figure(b * jax.device_count(), 15, 1024, 6, 512, iterations, ms)

  def voc_train(dtype, remat, attention='auto'):
    row = train(config(VOC, dtype, remat, attention))
    if remat == 'none' and attention == 'auto':
      voc_step_ms[dtype] = row['step_ms']
    return row

  figures = [
      ('ceiling', ceiling_figure),
      ('voc_train_bf16', lambda: voc_train('bfloat16', 'none')),
      ('voc_train_f32', lambda: voc_train('float32', 'none')),
      ('ot_default', lambda: ot(None)),
      ('voc_train_bf16_xla_attention', lambda: voc_train('bfloat16', 'none', 'xla')),
      ('ot_25', lambda: ot(25)),
      ('ot_100', lambda: ot(100)),
      ('voc_train_bf16_remat', lambda: voc_train('bfloat16', 'block')),
      ('voc_eval_bf16', lambda: evaluate(config(VOC, 'bfloat16'))),
      ('coco_train_bf16', lambda: train(config(COCO, 'bfloat16'))),
      ('voc_train_f32_remat', lambda: voc_train('float32', 'block')),
      ('voc_eval_f32', lambda: evaluate(config(VOC, 'float32'))),
      ('ot_50', lambda: ot(50)),
      ('coco_train_f32', lambda: train(config(COCO, 'float32'))),
      ('voc_train_bf16_remat_dots', lambda: voc_train(
          'bfloat16', 'dots_with_no_batch_dims_saveable')),
  ]
  skip = set(filter(None, os.environ.get('DEVICE_CHECK_SKIP', '').split(',')))
  for name, fn in figures:
    if name in skip:
      continue
    if time.time() - start > args.budget_s:
      results['figures'][name] = dict(skipped='time budget spent')
      continue
    t0 = time.time()
    try:
      row = fn()
    except Exception as e:  # pylint: disable=broad-except  # record it, go on with the next
      row = dict(error=f'{type(e).__name__}: {str(e)[:400]}',
                 traceback=traceback.format_exc()[-3000:])
    row['wall_s'] = time.time() - t0
    results['figures'][name] = row
    results['elapsed_s'] = time.time() - start
    print(name, {k: v for k, v in row.items() if k != 'traceback'}, flush=True)
    write(out, results)
    jax.clear_caches()
  print(markdown(results))


if __name__ == '__main__':
  main()
