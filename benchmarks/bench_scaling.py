r"""CPU scaling of OTSeg in JAX: train step and eval forward against K classes and the crop size.

  python benchmarks/bench_scaling.py                      # the full grid, tens of minutes
  python benchmarks/bench_scaling.py --classes 20 --crops 512 --runs 1   # one point

The real VOC model config (ViT-B/16, 10 prompt tokens, 11 deep layers, N = 6 prompts, head
C = 512, 3 decoder layers), random weights, float32, B = 1, through `bench_model.py`'s figures
(each point in its own process pinned to --threads CPUs):
  - eval forward: `inference.encode_decode` of one crop x crop window with K classes;
  - train step: forward + loss + backward to the trainable parameters, K - unseen seen classes
    (15 / 50 / 156: the zero-shot splits' seen counts of VOC, a 60-class Context and COCO-Stuff).
Only K and the crop change; the authors' COCO-Stuff config also has 100 prompt tokens and 8
prompts, so their figure for it (in the notes) is not the K = 171 point of this grid.
Writes OUT/scaling.json and OUT/scaling.md (default benchmarks/results/) with the machine load.
"""

import argparse
import json
import os
import pathlib
import subprocess
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[1]

# K -> seen classes in the train step (the zero-shot splits: 5 / 10 / 15 unseen).
SEEN = {20: 15, 60: 50, 171: 156}

# Authors' PyTorch, 2 CPU threads, random weights (issue 17; bench_model.AUTHORS): at the VOC
# config, which is the (K = 20, 512) point of this grid: (eval forward s, train step s, train GB).
AUTHORS = {(20, 512): (1.37, 3.54, 2.1)}
AUTHORS_NOTES = (
    "Authors' COCO-Stuff config (K = 171, 100 prompt tokens, 8 prompts; not this grid's "
    'K = 171 point, which keeps 10 tokens and 6 prompts): eval forward 2.35 s, train step 14.6 s '
    '(6.5 GB); ours at that config, same session: 1.92 s, 6.8 s (4.9 GB) (issue 17).')


def measure(k: int, crop: int, runs: int, threads: int) -> dict:
  """bench_model.py's eval_b1 and train_b1 at K classes and a crop x crop window."""
  cmd = [sys.executable, str(REPO / 'benchmarks' / 'bench_model.py'), '--figures',
         'eval_b1,train_b1', '--runs', str(runs), '--threads', str(threads), '--classes',
         f'{k},{SEEN[k]}', '--set', f'image_size={crop}']
  tmp = REPO / 'benchmarks' / 'results' / f'.scaling_{k}_{crop}.json'
  start = time.time()
  proc = subprocess.run(cmd + ['--json', str(tmp)], capture_output=True, text=True)
  if proc.returncode:
    return dict(error=proc.stderr[-2000:])
  results = json.loads(tmp.read_text())['results']
  tmp.unlink()
  return dict(results, wall_s=time.time() - start)


def markdown(rows: list[dict], runs: int, threads: int, load: list) -> str:
  lines = [f'OTSeg JAX on CPU, {threads} threads, real VOC model config but K and crop, random '
           f'weights, float32, B = 1; median of {runs} run(s). Load average (1, 5, 15 min) before '
           f'/ after: {load[0]} / {load[1]} (the machine is shared).', '',
           '| K (seen in training) | crop | eval forward (s) | train step (s) | train peak RSS '
           '(GB) | compile eval / train (s) | authors\' eval / train (s), peak (GB) |',
           '|---|---:|---:|---:|---:|---:|---:|']
  for row in rows:
    k, crop = row['k'], row['crop']
    ref = AUTHORS.get((k, crop))
    ref = '{} / {}, {}'.format(*ref) if ref else '–'
    if 'error' in row:
      lines.append(f'| {k} ({SEEN[k]}) | {crop} | failed | | | | {ref} |')
      continue
    e, t = row['eval_b1'], row['train_b1']
    lines.append(f'| {k} ({SEEN[k]}) | {crop} | {e["median"]:.2f} | {t["median"]:.2f} | '
                 f'{t["peak_rss_gb"]:.2f} | {e["compile_s"]:.0f} / {t["compile_s"]:.0f} | {ref} |')
  return '\n'.join(lines + ['', AUTHORS_NOTES]) + '\n'


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--classes', default='20,60,171')
  parser.add_argument('--crops', default='512,640')
  parser.add_argument('--runs', type=int, default=3)
  parser.add_argument('--threads', type=int, default=2)
  parser.add_argument('--out', default=str(REPO / 'benchmarks' / 'results'))
  args = parser.parse_args(argv)
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  load = [[round(x, 1) for x in os.getloadavg()]]
  rows = []
  for k in (int(v) for v in args.classes.split(',')):
    for crop in (int(v) for v in args.crops.split(',')):
      rows.append(dict(k=k, crop=crop, **measure(k, crop, args.runs, args.threads)))
      print(f'  K={k} crop={crop}: done', file=sys.stderr, flush=True)
      # Written after every point: a partial grid survives an interrupted run.
      (out / 'scaling.json').write_text(json.dumps(dict(
          runs=args.runs, threads=args.threads, load_before=load[0],
          load_now=[round(x, 1) for x in os.getloadavg()], rows=rows), indent=1))
  load.append([round(x, 1) for x in os.getloadavg()])
  text = markdown(rows, args.runs, args.threads, load)
  (out / 'scaling.md').write_text(text)
  print(text)
  return 0


if __name__ == '__main__':
  sys.exit(main())
