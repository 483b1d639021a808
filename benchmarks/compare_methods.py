r"""Compares the methods on the synthetic zero-shot dataset: same steps, several seeds.

  python benchmarks/compare_methods.py --out benchmarks/results/compare_methods  # 1000 steps, 3 seeds
  python benchmarks/compare_methods.py --steps 20 --seeds 0 --config configs/tiny.py  # smoke test
  python benchmarks/compare_methods.py --set model.ot.solver=lr_sinkhorn \
      --out benchmarks/results/compare_methods_ot/lr_sinkhorn   # an OT ablation of every config

  python benchmarks/compare_methods.py --merge a/results.json b/results.json --out OUT  # one table

Every config of --config (default: each method's synthetic config, `CONFIGS`) is trained with the
real `train_and_evaluate` for --steps steps per seed, then evaluated on the synthetic validation
split. Writes OUT/results.json (every run), OUT/table.md (seen / unseen / hIoU as mean +- spread
over the seeds, where spread is half the max - min range, and the train time) and OUT/hiou.png.
`--merge` rebuilds the table and the chart from earlier results files (runs of one method measured
at different times), each row with its own step count. A new method adds its row by adding its
synthetic config to `CONFIGS`.
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
    'ZegOT': 'configs/zegot.py:synthetic',
    'MVP-SEG': 'configs/mvpseg.py:synthetic',
    'MVP-SEG+': 'configs/mvpseg.py:synthetic>configs/mvpseg.py:synthetic:plus@500',
    'LDVC': 'configs/ldvc.py:synthetic',
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
  """Trains and evaluates one (config, seed); returns the scores and the train time.

  `spec` is a config (file.py[:arg]), or stages `first>second@STEPS>...`: each later stage starts
  from the previous stage's checkpoint (`init_from`, e.g. transductive self-training after an
  inductive run) and trains STEPS steps; the scores are the last stage's, the steps and the time
  all stages'. `overrides` (FIELD=VALUE) apply to every stage.
  """
  first, *later = spec.split('>')
  stages = [(first, steps)] + [(s.rsplit('@', 1)[0], int(s.rsplit('@', 1)[1])) for s in later]
  seconds = 0.0
  with tempfile.TemporaryDirectory() as root:
    for i, (config_spec, stage_steps) in enumerate(stages):
      config = apply_overrides(bench_train.load_config(config_spec), overrides)
      config.seed = seed
      config.num_train_steps = stage_steps
      config.checkpoint_every_steps = stage_steps
      config.log_every_steps = max(1, min(config.log_every_steps, stage_steps))
      config.eval_every_steps = 0
      config.tensorboard = False
      if i:
        config.init_from = f'{root}/{i - 1}'
      start = time.time()
      results = trainer.train_and_evaluate(config, f'{root}/{i}')
      seconds += time.time() - start - results['seconds']  # the final evaluation is not training
  return {**{k: results[k] for k in KEYS}, 'train_seconds': seconds, 'seed': seed,
          'steps': sum(n for _, n in stages)}


def mean_spread(values) -> tuple[float, float]:
  values = np.asarray([np.nan if v is None else v for v in values], np.float64)
  return float(np.nanmean(values)), float((np.nanmax(values) - np.nanmin(values)) / 2)


def table(rows: dict[str, list[dict]], steps: dict[str, int]) -> str:
  """Markdown table of rows {label: runs}; steps {label: training steps of its runs}."""
  lines = ['Mean +- half range over the seeds.', '',
           '| method | steps | seeds | seen mIoU | unseen mIoU | hIoU | train time (s) |',
           '|---|---:|---:|---:|---:|---:|---:|']
  for label, runs in rows.items():
    cells = [str(steps[label]), str(len(runs))]
    cells += ['{:.2f} +- {:.2f}'.format(*mean_spread([r[k] for r in runs])) for k in KEYS]
    cells.append('{:.0f} +- {:.0f}'.format(*mean_spread([r['train_seconds'] for r in runs])))
    lines.append(f'| {label} | ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines) + '\n'


def load_results(paths) -> tuple[dict[str, list[dict]], dict[str, int]]:
  """(rows, steps by label) from results.json files; a later file's label replaces an earlier."""
  rows, steps = {}, {}
  for path in paths:
    results = json.loads(pathlib.Path(path).read_text())
    for label, runs in results['runs'].items():
      rows[label] = runs
      steps[label] = runs[0].get('steps') or results.get('steps_by_label', {}).get(
          label, results['steps'])
  return rows, steps


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
  parser.add_argument('--steps', type=int, default=1000)
  parser.add_argument('--seeds', default='0,1,2')
  parser.add_argument('--out', default=str(REPO / 'benchmarks' / 'compare_methods'))
  parser.add_argument('--merge', nargs='+', default=None, metavar='RESULTS_JSON',
                      help='Rebuild OUT from these results files instead of training.')
  parser.add_argument('--labels', default=None,
                      help='With --merge: the rows to keep, in this order (comma-separated).')
  parser.add_argument('--set', action='append', default=[], metavar='FIELD=VALUE',
                      help='a config field of every config, e.g. --set model.ot.solver=lr_sinkhorn '
                      '(repeatable)')
  args = parser.parse_args(argv)
  if args.merge:
    rows, steps = load_results(args.merge)
    if args.labels:
      rows = {label: rows[label] for label in args.labels.split(',')}
  else:
    configs = dict(c.split('=', 1) if '=' in c else (c, c) for c in args.config) \
        if args.config else CONFIGS
    seeds = [int(s) for s in args.seeds.split(',')]
    devices.quiet_library_logs()
    rows = {label: [run(spec, args.steps, seed, args.set) for seed in seeds]
            for label, spec in configs.items()}
    steps = {label: args.steps for label in rows}
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  reports.write_json(out / 'results.json', {'steps': max(steps.values()), 'steps_by_label': steps,
                                            'set': args.set, 'runs': rows})
  text = (f'Overrides: {", ".join(args.set)}. ' if args.set else '') + table(rows, steps)
  (out / 'table.md').write_text(text)
  bar_chart(rows, out / 'hiou.png')
  print(text)
  return 0


if __name__ == '__main__':
  sys.exit(main())
