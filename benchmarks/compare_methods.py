r"""Compares the methods on the synthetic zero-shot dataset: same steps, several seeds.

  python benchmarks/compare_methods.py --out benchmarks/compare_methods   # 1500 steps, 3 seeds
  python benchmarks/compare_methods.py --steps 20 --seeds 0 --config configs/tiny.py  # smoke test
  python benchmarks/compare_methods.py --set model.ot.solver=lr_sinkhorn \
      --out benchmarks/results/compare_methods_ot/lr_sinkhorn   # an OT ablation of every config

Every config of --config (default: each method's synthetic config, `CONFIGS`) is trained with the
real `train_and_evaluate` for --steps steps per seed, then evaluated on the synthetic validation
split. Writes OUT/results.json (every run), OUT/table.md (seen / unseen / hIoU as mean +- spread
over the seeds, where spread is half the max - min range, and the train time) and OUT/hiou.png.
A new method adds its row by adding its synthetic config to `CONFIGS`.
"""

import argparse
import ast
import json
import pathlib
import sys
import tempfile
import time

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / 'benchmarks'))

import bench_train  # noqa: E402  pylint: disable=g-import-not-at-top
from otseg_jax import devices  # noqa: E402  pylint: disable=g-import-not-at-top
from otseg_jax import reports  # noqa: E402  pylint: disable=g-import-not-at-top
from otseg_jax import trainer  # noqa: E402  pylint: disable=g-import-not-at-top

# Method label -> its config on the synthetic set (file[:arg]).
CONFIGS = {
    'OTSeg': 'configs/synthetic.py',
}

KEYS = ('seen_mIoU', 'unseen_mIoU', 'hIoU')


def apply_overrides(config, overrides=()):
  """FIELD=VALUE items (Python literals, else plain strings) set on `config`."""
  for item in overrides:
    key, sep, value = item.partition('=')
    if not sep:
      raise ValueError(f'--set {item!r}: expected FIELD=VALUE.')
    try:
      value = ast.literal_eval(value)
    except (ValueError, SyntaxError):
      pass  # a plain string
    config.update_from_flattened_dict({key: value})
  return config


def run(spec: str, steps: int, seed: int, overrides=()) -> dict:
  """Trains and evaluates one (config, seed); returns the scores and the train time."""
  config = apply_overrides(bench_train.load_config(spec), overrides)
  config.seed = seed
  config.num_train_steps = steps
  config.checkpoint_every_steps = steps
  config.log_every_steps = max(1, min(config.log_every_steps, steps))
  config.eval_every_steps = 0
  config.tensorboard = False
  with tempfile.TemporaryDirectory() as workdir:
    start = time.time()
    results = trainer.train_and_evaluate(config, workdir)
    seconds = time.time() - start - results['seconds']  # the final evaluation is not training
  return {**{k: results[k] for k in KEYS}, 'train_seconds': seconds}


def mean_spread(values) -> tuple[float, float]:
  values = np.asarray([np.nan if v is None else v for v in values], np.float64)
  return float(np.nanmean(values)), float((np.nanmax(values) - np.nanmin(values)) / 2)


def table(rows: dict[str, list[dict]], steps: int) -> str:
  lines = [f'{steps} steps per run, {len(next(iter(rows.values())))} seeds (mean +- half range).',
           '', '| method | seen mIoU | unseen mIoU | hIoU | train time (s) |',
           '|---|---:|---:|---:|---:|']
  for label, runs in rows.items():
    cells = ['{:.2f} +- {:.2f}'.format(*mean_spread([r[k] for r in runs])) for k in KEYS]
    cells.append('{:.0f} +- {:.0f}'.format(*mean_spread([r['train_seconds'] for r in runs])))
    lines.append(f'| {label} | ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines) + '\n'


def bar_chart(rows: dict[str, list[dict]], path: pathlib.Path) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, ax = plt.subplots(figsize=(2 + 2.2 * len(rows), 3.5))
  width = 0.8 / len(KEYS)
  for j, key in enumerate(KEYS):
    stats = [mean_spread([r[key] for r in runs]) for runs in rows.values()]
    ax.bar(np.arange(len(rows)) + (j - 1) * width, [m for m, _ in stats], width,
           yerr=[s for _, s in stats], capsize=3, label=key.replace('_', ' '))
  ax.set_xticks(np.arange(len(rows)))
  ax.set_xticklabels(list(rows))
  ax.set_ylabel('%')
  ax.set_ylim(0, 100)
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--config', action='append', default=None,
                      help='LABEL=file.py[:arg], repeatable (default: CONFIGS).')
  parser.add_argument('--steps', type=int, default=1500)
  parser.add_argument('--seeds', default='0,1,2')
  parser.add_argument('--out', default=str(REPO / 'benchmarks' / 'compare_methods'))
  parser.add_argument('--set', action='append', default=[], metavar='FIELD=VALUE',
                      help='a config field of every config, e.g. --set model.ot.solver=lr_sinkhorn '
                      '(repeatable)')
  args = parser.parse_args(argv)
  configs = dict(c.split('=', 1) if '=' in c else (c, c) for c in args.config) \
      if args.config else CONFIGS
  seeds = [int(s) for s in args.seeds.split(',')]
  devices.quiet_library_logs()
  rows = {label: [run(spec, args.steps, seed, args.set) for seed in seeds]
          for label, spec in configs.items()}
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  reports.write_json(out / 'results.json', {'steps': args.steps, 'seeds': seeds, 'set': args.set,
                                            'runs': rows})
  text = (f'Overrides: {", ".join(args.set)}. ' if args.set else '') + table(rows, args.steps)
  (out / 'table.md').write_text(text)
  bar_chart(rows, out / 'hiou.png')
  print(text)
  return 0


if __name__ == '__main__':
  sys.exit(main())
