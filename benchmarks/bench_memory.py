r"""Memory of the train step on CPU against remat, donation and dtype, and what each costs in time.

  python benchmarks/bench_memory.py                    # VOC and COCO-Stuff, every choice, ~20 min
  python benchmarks/bench_memory.py --only voc_none,voc_block --steps 2

The trainer's own step (`bench_train.train_figure`: jit, the state donated unless said otherwise,
in XLA-owned buffers, freed host memory returned before and after compiling; random weights and
batches, batch 1), each choice in its own process pinned to --threads CPUs, under this process's
XLA_FLAGS (the table says which), e.g.
  XLA_FLAGS=--xla_cpu_enable_concurrency_optimized_scheduler=false python benchmarks/bench_memory.py \
      --out benchmarks/results/memory/scheduler_off
Per choice:
  - resident memory (RSS) after the state is built, the peak through compilation, and the peak
    while the compiled step runs (a thread samples /proc/self/statm every 2 ms);
  - XLA's estimate of the step's memory (arguments + outputs + temporaries - donated aliases);
  - the median step time and the compile time.
The authors' PyTorch peaks (issue 17, 2 threads, the process's maximum RSS): 2.1 GB at the VOC
config, 6.5 GB at COCO-Stuff's. Writes OUT/memory.json and OUT/memory.md (default
benchmarks/results/memory/).
"""

import argparse
import json
import os
import pathlib
import resource
import subprocess
import sys
import threading
import time

REPO = pathlib.Path(__file__).resolve().parents[1]

VOC, COCO = 'configs/voc12.py:inductive', 'configs/cocostuff171.py:inductive'
AUTHORS_GB = {VOC: 2.1, COCO: 6.5}

# name -> (config, remat, dtype, donate)
CHOICES = {
    'voc_none': (VOC, 'none', 'float32', True),
    'voc_none_nodonate': (VOC, 'none', 'float32', False),
    'voc_block': (VOC, 'block', 'float32', True),
    'voc_dots': (VOC, 'dots_with_no_batch_dims_saveable', 'float32', True),
    'voc_block_bf16': (VOC, 'block', 'bfloat16', True),
    'coco_none': (COCO, 'none', 'float32', True),
    'coco_block': (COCO, 'block', 'float32', True),
    'coco_dots': (COCO, 'dots_with_no_batch_dims_saveable', 'float32', True),
}


def _rss_gb() -> float:
  with open('/proc/self/statm') as f:
    return int(f.read().split()[1]) * os.sysconf('SC_PAGE_SIZE') / 1e9


def _max_rss_gb() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9  # KiB on Linux


class PeakSampler(threading.Thread):
  """Keeps the largest RSS seen since the last `reset()`."""

  def __init__(self):
    super().__init__(daemon=True)
    self.peak, self.running = 0.0, True

  def run(self):
    while self.running:
      self.peak = max(self.peak, _rss_gb())
      time.sleep(0.002)

  def reset(self):
    self.peak = _rss_gb()


def _child(name: str, steps: int) -> dict:
  sys.path.insert(0, str(REPO / 'benchmarks'))
  import bench_train  # pylint: disable=g-import-not-at-top

  spec, remat, dtype, donate = CHOICES[name]
  config = bench_train.load_config(spec)
  config.model.backbone.remat = remat
  config.model.dtype = dtype
  sampler = PeakSampler()
  sampler.start()
  marks = {}

  def on_compiled():
    # ru_maxrss: the peak of everything so far (state built and compilation).
    marks['peak_through_compile_gb'] = _max_rss_gb()
    marks['rss_after_compile_gb'] = _rss_gb()
    sampler.reset()

  figure = bench_train.train_figure(config, 1, steps, 1, donate=donate, on_compiled=on_compiled,
                                    cache_params=False)
  sampler.running = False
  return dict(name=name, config=spec, remat=remat, dtype=dtype, donate=donate,
              step_s=figure['step_ms'] / 1e3, compile_s=figure['compile_s'],
              xla_estimate_gib=figure['memory_gb'], peak_during_steps_gb=sampler.peak,
              process_peak_gb=_max_rss_gb(),
              **marks)


def markdown(rows: list[dict], threads: int, load: list) -> str:
  lines = [f'Train step on CPU, {threads} threads, batch 1, random weights, the trainer\'s jit '
           f'step; XLA_FLAGS={os.environ.get("XLA_FLAGS", "")!r}; load average (1, 5, 15 min) '
           f'before / after: {load[0]} / {load[1]}.', '',
           '| config | remat | dtype | donated | step (s) | compile (s) | XLA estimate (GiB) | '
           'RSS peak through compile (GB) | RSS peak while stepping (GB) | authors\' peak (GB) |',
           '|---|---|---|---|---:|---:|---:|---:|---:|---:|']
  for r in rows:
    if 'error' in r:
      lines.append(f'| {r["name"]} | error: {r["error"].splitlines()[-1][:120]} |')
      continue
    lines.append(
        f'| {r["config"]} | {r["remat"]} | {r["dtype"]} | {"yes" if r["donate"] else "no"} | '
        f'{r["step_s"]:.2f} | {r["compile_s"]:.0f} | {r["xla_estimate_gib"]:.2f} | '
        f'{r["peak_through_compile_gb"]:.2f} | {r["peak_during_steps_gb"]:.2f} | '
        f'{AUTHORS_GB[r["config"]]} |')
  return '\n'.join(lines) + '\n'


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--only', default='', help='comma-separated names of CHOICES')
  parser.add_argument('--steps', type=int, default=3)
  parser.add_argument('--threads', type=int, default=2)
  parser.add_argument('--out', default=str(REPO / 'benchmarks' / 'results' / 'memory'))
  parser.add_argument('--child', default=None, help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.child:
    print(json.dumps(_child(args.child, args.steps)))
    return
  names = [n for n in args.only.split(',') if n] or list(CHOICES)
  unknown = sorted(set(names) - set(CHOICES))
  if unknown:
    raise SystemExit(f'--only: unknown choices {unknown}; known: {", ".join(CHOICES)}.')
  load_before = [round(x, 1) for x in os.getloadavg()]
  rows = []
  for i, name in enumerate(names):
    start = time.time()
    cmd = ['taskset', '-c', f'0-{args.threads - 1}', sys.executable, __file__, '--child', name,
           '--steps', str(args.steps)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    row = (json.loads(proc.stdout.strip().splitlines()[-1]) if proc.returncode == 0
           else dict(name=name, error=proc.stderr[-2000:] or f'exit {proc.returncode}'))
    rows.append(row)
    status = row.get('error', '').splitlines()[-1:] or [
        f'step {row["step_s"]:.2f} s, XLA {row["xla_estimate_gib"]:.2f} GiB, RSS peak '
        f'{row["peak_through_compile_gb"]:.2f} / {row["peak_during_steps_gb"]:.2f} GB']
    print(f'[{i + 1}/{len(names)}] {name}: {status[0]} ({time.time() - start:.0f} s)', flush=True)
  load = [load_before, [round(x, 1) for x in os.getloadavg()]]
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  for path, text in ((out / 'memory.json', json.dumps(dict(load=load, rows=rows), indent=1)),
                     (out / 'memory.md', markdown(rows, args.threads, load))):
    tmp = path.with_suffix(path.suffix + '.tmp')
    tmp.write_text(text)
    tmp.replace(path)
  print(markdown(rows, args.threads, load))


if __name__ == '__main__':
  main()
