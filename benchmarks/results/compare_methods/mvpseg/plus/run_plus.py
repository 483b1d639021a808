"""MVP-SEG+ on the synthetic set: per seed, inductive MVP-SEG (1000 steps), then transductive
self-training from it (configs/mvpseg.py:synthetic:plus, 500 steps); results like compare_methods."""
import json, pathlib, sys, tempfile, time
sys.path.insert(0, '.'); sys.path.insert(0, 'benchmarks')
import compare_methods as cm
from otseg_jax import devices, reports, trainer
from configs import mvpseg as cfg
devices.quiet_library_logs()
out = pathlib.Path(sys.argv[1]); steps, plus_steps = 1000, 500
rows = {'MVP-SEG (inductive)': [], 'MVP-SEG+': []}
for seed in (0, 1, 2):
  with tempfile.TemporaryDirectory() as wd:
    for label, arg, n, extra in (('MVP-SEG (inductive)', 'synthetic', steps, {}),
                                 ('MVP-SEG+', 'synthetic:plus', plus_steps, {'init_from': f'{wd}/ind'})):
      c = cfg.get_config(arg); c.seed = seed; c.num_train_steps = n; c.checkpoint_every_steps = n
      c.eval_every_steps = 0; c.tensorboard = False; c.update(extra)
      t = time.time()
      r = trainer.train_and_evaluate(c, f'{wd}/' + ('plus' if extra else 'ind'))
      rows[label].append({**{k: r[k] for k in cm.KEYS}, 'train_seconds': time.time() - t - r['seconds'], 'seed': seed, 'steps': n})
      print(label, seed, rows[label][-1], flush=True)
out.mkdir(parents=True, exist_ok=True)
reports.write_json(out / 'results.json', {'steps': {'inductive': steps, 'plus': plus_steps}, 'seeds': [0, 1, 2], 'runs': rows})
(out / 'table.md').write_text(f'MVP-SEG+ = {plus_steps} transductive steps from the inductive run of the same seed ({steps} steps).\n\n' + cm.table(rows, steps))
print(cm.table(rows, steps))
