r"""Forward + backward time of route attention (otseg_jax/models/route_attention.py) vs full attention.

  python benchmarks/bench_route_attention.py                 # 32 x 32 tokens, C = 512, batch 2
  python benchmarks/bench_route_attention.py --topk 1,4,16 --windows 8 --out FILE.json

Full attention is the same module with one window (S = 1, k = 1: every query attends to every
token), so both sides have the same projections and LCE; only the attention differs. Prints the
median milliseconds of a jitted gradient step (loss = sum of squares of the output, gradients
with respect to the input and the parameters) and XLA's memory estimate.
"""

import argparse
import json
import pathlib
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from otseg_jax.models import route_attention  # noqa: E402  pylint: disable=g-import-not-at-top


def time_one(windows: int, topk: int, x: np.ndarray, heads: int, steps: int) -> dict:
  module = route_attention.RouteAttention(heads, windows, topk)
  params = jax.jit(module.init)(jax.random.PRNGKey(0), x)['params']
  loss = lambda p, x: jnp.sum(module.apply({'params': p}, x)[0] ** 2)
  step = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(params, x).compile()
  jax.block_until_ready(step(params, x))
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    jax.block_until_ready(step(params, x))
    times.append(time.perf_counter() - start)
  try:
    m = step.memory_analysis()
    memory = (m.temp_size_in_bytes + m.argument_size_in_bytes + m.output_size_in_bytes) / 2**20
  except Exception:  # pylint: disable=broad-except  # not every backend reports it
    memory = None
  return dict(windows=windows, topk=topk, ms=1e3 * float(np.median(times)), memory_mib=memory)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--grid', type=int, default=32)
  parser.add_argument('--width', type=int, default=512)
  parser.add_argument('--heads', type=int, default=8)
  parser.add_argument('--batch', type=int, default=2)
  parser.add_argument('--windows', type=int, default=8)
  parser.add_argument('--topk', default='1,4,16')
  parser.add_argument('--steps', type=int, default=5)
  parser.add_argument('--out', default='')
  args = parser.parse_args()
  x = np.random.default_rng(0).normal(
      size=(args.batch, args.grid, args.grid, args.width)).astype(np.float32)
  rows = [dict(time_one(1, 1, x, args.heads, args.steps), name='full attention')]
  for k in (int(k) for k in args.topk.split(',')):
    rows.append(dict(time_one(args.windows, k, x, args.heads, args.steps),
                     name=f'route S={args.windows} k={k}'))
  print(f'{jax.devices()[0].device_kind}: forward + backward, batch {args.batch}, '
        f'{args.grid} x {args.grid} tokens, C={args.width}, {args.heads} heads')
  for r in rows:
    memory = f', XLA memory {r["memory_mib"]:.0f} MiB' if r['memory_mib'] else ''
    print(f'  {r["name"]:>20}: {r["ms"]:8.1f} ms{memory}')
  if args.out:
    pathlib.Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    pathlib.Path(args.out).write_text(json.dumps(dict(vars(args), rows=rows), indent=2) + '\n')


if __name__ == '__main__':
  main()
