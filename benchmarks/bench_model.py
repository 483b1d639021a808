"""CPU timings of OTSeg in JAX next to the authors' PyTorch numbers.

  python benchmarks/bench_model.py            # real VOC config, takes minutes on 2 cores
  python benchmarks/bench_model.py --quick    # tiny config, checks that everything runs

Real VOC zero-shot config, random weights, float32, dropout as configured (0.1): ViT-B/16 at
512x512 with 10 prompt tokens and 11 deep layers, head C=512, 3 decoder layers, K=15 seen classes
in training (20 at eval), N=6 prompts. Figures, as in ../shared/reference/README.md:
  (a) eval forward (`inference.encode_decode`) of one 512x512 window, B=1;
  (b) training step: forward + loss + backward to the trainable parameters, B=1 and B=2;
  (c) decode head alone on precomputed features, B=4: forward + loss at 512x512 + backward,
      and forward only;
  (d) the OT layer alone, 60 problems of 1024x6, eps 0.05: forward and forward+backward, on cosine
      costs of random 512-d features and on uniform random costs in [0, 2], for ott (default
      config) and the 'reference' replica of the authors' loop;
  (e) this machine's speed next to the authors': the image tower alone (ViT-B/16 at 512, 10 prompt
      tokens), forward and forward + backward to its input with frozen weights, in JAX and in a
      PyTorch replica of the authors' tower (OpenAI CLIP blocks, `nn.MultiheadAttention`), if torch
      is installed.
Each figure runs in its own process pinned to `--threads` CPUs (peak RSS is that process's
maximum resident set, jax and compilation included). Times are medians of `--runs` runs after
one warm-up call that also compiles; the compile time is reported apart.
"""

import argparse
import json
import os
import subprocess
import sys

# Authors' code, PyTorch 2.13 CPU, 2 threads (README "Timing of the authors' code").
AUTHORS = {
    'eval_b1': (1.35, 0.8),
    'train_b1': (3.50, 2.1),
    'train_b2': (8.22, 3.6),
    'head_b4': (3.38, None),
    'head_fwd_b4': (0.24, None),
    'ot_cos_ott_fwd': (0.009, None), 'ot_cos_ott_fwdbwd': (0.018, None),
    'ot_cos_reference_fwd': (0.009, None), 'ot_cos_reference_fwdbwd': (0.018, None),
    'ot_uniform_ott_fwd': (0.088, None), 'ot_uniform_ott_fwdbwd': (0.157, None),
    'ot_uniform_reference_fwd': (0.088, None), 'ot_uniform_reference_fwdbwd': (0.157, None),
}

FIGURES = ('eval_b1', 'train_b1', 'train_b2', 'head_b4', 'ot', 'ot_ablations', 'tower',
           'torch_tower')

# config.model.ot overrides of the 'ot_ablations' figure (ott's solvers and initializers), on the
# cosine costs of (d) with their point clouds.
OT_ABLATIONS = {
    'subsample': dict(initializer='subsample'),
    'gaussian': dict(initializer='gaussian'),
    'lr_random_r2': dict(solver='lr_sinkhorn', lr_rank=2),
    'lr_rank2_r2': dict(solver='lr_sinkhorn', lr_rank=2, lr_initializer='rank2'),
    'lr_kmeans_r2': dict(solver='lr_sinkhorn', lr_rank=2, lr_initializer='k-means'),
    'lr_random_r6': dict(solver='lr_sinkhorn', lr_rank=6),
}


def _config(quick: bool, attention_query_chunk: int | None = None, overrides=(),
            classes: str | None = None):
  import ast  # pylint: disable=g-import-not-at-top
  from otseg_jax.models import otseg  # pylint: disable=g-import-not-at-top
  config = otseg.get_config('voc')
  if attention_query_chunk is not None:
    config.backbone.attention_query_chunk = attention_query_chunk
  for item in overrides:  # 'backbone.remat=block', 'dtype=bfloat16'
    key, _, value = item.partition('=')
    try:
      value = ast.literal_eval(value)
    except (ValueError, SyntaxError):
      pass  # a plain string
    config.update_from_flattened_dict({key: value})
  sizes = dict(seen=15, all=20, ot_problems=60, m=1024)
  if quick:
    config.image_size = 64
    config.backbone.update(dict(width=64, layers=2, heads=2, output_dim=32,
                                num_prompt_tokens=2, prompt_depth=1))
    config.num_prompts = 2
    sizes = dict(seen=3, all=4, ot_problems=12, m=16)
  if classes:  # 'K,SEEN': K classes at eval, SEEN in the train step (bench_scaling.py)
    sizes['all'], sizes['seen'] = (int(v) for v in classes.split(','))
  return config, sizes


def _time(fn, runs: int) -> dict:
  import time  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  t = time.perf_counter()
  jax.block_until_ready(fn())
  compile_s = time.perf_counter() - t
  times = []
  for _ in range(runs):
    t = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - t)
  times.sort()
  return dict(median=times[len(times) // 2], min=times[0], compile_s=compile_s, runs=runs)


def _torch_tower(config, images, runs: int) -> dict:
  """The authors' image tower in PyTorch (OpenAI CLIP ResidualAttentionBlock, VPT prompts in
  every layer), random frozen weights, `torch.set_num_threads` = the CPUs this process may use."""
  import time  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  from torch import nn  # pylint: disable=g-import-not-at-top
  torch.set_num_threads(len(os.sched_getaffinity(0)))
  b = config.backbone
  d, t, depth = b.width, b.num_prompt_tokens, b.prompt_depth

  class Block(nn.Module):

    def __init__(self):
      super().__init__()
      self.attn = nn.MultiheadAttention(d, b.heads)
      self.ln_1, self.ln_2 = nn.LayerNorm(d), nn.LayerNorm(d)
      self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x):  # (L, B, D), as OpenAI's CLIP
      y = self.ln_1(x)
      x = x + self.attn(y, y, y, need_weights=False)[0]
      return x + self.mlp(self.ln_2(x))

  conv = nn.Conv2d(3, d, b.patch_size, b.patch_size, bias=False)
  blocks = nn.ModuleList([Block() for _ in range(b.layers)])
  for p in [*conv.parameters(), *blocks.parameters()]:
    p.requires_grad_(False)
  prompts = torch.randn(1 + depth, 1, t, d, requires_grad=True)
  x_nchw = torch.from_numpy(np.asarray(images)).permute(0, 3, 1, 2).contiguous()

  def forward():
    x = conv(x_nchw).flatten(2).transpose(1, 2)  # (B, N, D)
    x = torch.cat([x[:, :1], prompts[0].expand(len(x), -1, -1), x], 1).transpose(0, 1)
    for i, block in enumerate(blocks):
      if 1 <= i <= depth:
        x = torch.cat([x[:1], prompts[i].expand(len(x_nchw), -1, -1).transpose(0, 1),
                       x[1 + t:]], 0)
      elif i == depth + 1:
        x = torch.cat([x[:1], x[1 + t:]], 0)
      x = block(x)
    return x

  def timing(fn):
    start = time.perf_counter()
    fn()
    first = time.perf_counter() - start
    times = []
    for _ in range(runs):
      start = time.perf_counter()
      fn()
      times.append(time.perf_counter() - start)
    times.sort()
    return dict(median=times[len(times) // 2], min=times[0], compile_s=first, runs=runs)

  def fwd():
    with torch.no_grad():
      forward()

  def fwd_bwd():
    forward().square().mean().backward()

  return {'torch_tower_fwd': timing(fwd), 'torch_tower_fwdbwd': timing(fwd_bwd)}


def run_figure(name: str, quick: bool, runs: int, attention_query_chunk: int | None = None,
               overrides=(), classes: str | None = None) -> dict:
  """Runs one figure in this process; returns {key: timing dict}."""
  import functools  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from otseg_jax import image_ops, inference, losses, ot  # pylint: disable=g-import-not-at-top
  from otseg_jax import params as params_lib  # pylint: disable=g-import-not-at-top
  from otseg_jax.models import otseg  # pylint: disable=g-import-not-at-top

  config, sizes = _config(quick, attention_query_chunk, overrides, classes)
  s, c, n = config.image_size, config.backbone.output_dim, config.num_prompts
  rng = np.random.default_rng(0)
  unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)
  text_all = jnp.asarray(unit(rng.normal(size=(sizes['all'], n, c))), jnp.float32)
  text_seen = text_all[:sizes['seen']]
  model = otseg.model_from_config(config)
  results = {}

  def params_for(text):
    return jax.jit(lambda x, t: model.init(jax.random.key(0), x, t, train=False))(
        jnp.zeros((1, s, s, 3)), text)['params']

  if name == 'eval_b1':
    params = params_for(text_all)
    seen = np.arange(sizes['all']) < sizes['seen']
    images = jnp.asarray(rng.normal(size=(1, s, s, 3)), jnp.float32)
    probabilities = functools.partial(otseg.eval_probabilities, config=config)
    fn = jax.jit(lambda p, x: inference.encode_decode(model, p, x, text_all, seen, probabilities))
    results[name] = _time(lambda: fn(params, images), runs)

  elif name.startswith('train_b'):
    b = int(name[len('train_b'):])
    params = params_for(text_seen)
    trainable, frozen = params_lib.split_params(params, config.trainable)
    images = jnp.asarray(rng.normal(size=(b, s, s, 3)), jnp.float32)
    labels = jnp.asarray(rng.integers(0, sizes['seen'], size=(b, s, s)), jnp.int32)

    def loss_fn(trainable, key):
      maps, _ = model.apply({'params': params_lib.merge_params(trainable, frozen)}, images,
                            text_seen, train=True, rngs={'dropout': key})
      return losses.otseg_loss(maps, labels)['total']

    step = jax.jit(jax.value_and_grad(loss_fn))
    key = jax.random.key(1)
    results[name] = _time(lambda: step(trainable, key), runs)

  elif name == 'head_b4':
    b, g = 4, s // config.backbone.patch_size
    params = params_for(text_seen)['decode_head']
    head = otseg.OTSegHead(c, config.ot, decoder_layers=config.head.decoder_layers,
                           dropout=config.head.dropout)
    dense = jnp.asarray(unit(rng.normal(size=(b, g, g, c))), jnp.float32)
    glob = jnp.asarray(unit(rng.normal(size=(b, c))), jnp.float32)
    labels = jnp.asarray(rng.integers(0, sizes['seen'], size=(b, s, s)), jnp.int32)

    def forward(p, key):
      out = head.apply({'params': p}, dense, glob, text_seen, train=True, rngs={'dropout': key})
      return {k: image_ops.resize_bilinear(out[k], (s, s)) for k in ('decoder', 'score')}

    loss_fn = lambda p, key: losses.otseg_loss(forward(p, key), labels)['total']
    step = jax.jit(jax.value_and_grad(loss_fn))
    fwd = jax.jit(lambda p, key: head.apply({'params': p}, dense, glob, text_seen, train=True,
                                            rngs={'dropout': key}))
    key = jax.random.key(1)
    results['head_b4'] = _time(lambda: step(params, key), runs)
    results['head_fwd_b4'] = _time(lambda: fwd(params, key), runs)

  elif name == 'ot':
    p, m = sizes['ot_problems'], sizes['m']
    feats = unit(rng.normal(size=(p, m, 512)))
    prompts = unit(rng.normal(size=(p, n, 512)))
    costs = {'cos': jnp.asarray(1 - np.einsum('pmc,pnc->pmn', feats, prompts), jnp.float32),
             'uniform': jnp.asarray(rng.uniform(0, 2, size=(p, m, n)), jnp.float32)}
    cot = jnp.asarray(rng.normal(size=(p, m, n)), jnp.float32)
    for implementation in ('ott', 'reference'):
      ot_config = ot.get_config()
      ot_config.implementation = implementation
      fwd = jax.jit(lambda x, cfg=ot_config: ot.sinkhorn_plan_with_info(x, cfg))
      bwd = jax.jit(jax.grad(lambda x, cfg=ot_config: jnp.sum(ot.sinkhorn_plan(x, cfg) * cot)))
      for kind, cost in costs.items():
        timing = _time(lambda: fwd(cost)[0], runs)
        timing['iterations'] = int(np.max(np.asarray(fwd(cost)[1]['iterations'])))
        results[f'ot_{kind}_{implementation}_fwd'] = timing
        results[f'ot_{kind}_{implementation}_fwdbwd'] = _time(lambda: bwd(cost), runs)
  elif name == 'ot_ablations':
    from otseg_jax.models import ot_layers  # pylint: disable=g-import-not-at-top
    p, m = sizes['ot_problems'], sizes['m']
    b = 3 if p % 3 == 0 else 1
    pixels = jnp.asarray(unit(rng.normal(size=(b, m, 512))), jnp.float32)
    prompts = jnp.asarray(unit(rng.normal(size=(b, p // b, n, 512))), jnp.float32)
    cot = jnp.asarray(rng.normal(size=(b, m, p // b)), jnp.float32)
    plans = {}
    for label, overrides in {'default': {}, **OT_ABLATIONS}.items():
      ot_config = ot.get_config()
      ot_config.update(overrides)
      fwd = jax.jit(lambda x, y, cfg=ot_config: ot_layers.transport_map(x, y, cfg))
      bwd = jax.jit(jax.grad(
          lambda x, y, cfg=ot_config: jnp.sum(ot_layers.transport_map(x, y, cfg)[1] * cot),
          argnums=(0, 1)))
      try:
        timing = _time(lambda: fwd(pixels, prompts)[1], runs)
      except ValueError as e:  # an impossible combination: the error is the figure
        results[f'ot_abl_{label}_fwd'] = dict(error=str(e).split('\n')[0])
        continue
      plan, _, info = fwd(pixels, prompts)
      plans[label] = plan
      timing['iterations'] = int(np.max(np.asarray(info['iterations'])))
      timing['plan_vs_default'] = float(jnp.max(jnp.abs(plan - plans['default'])) /
                                        jnp.max(plans['default']))
      results[f'ot_abl_{label}_fwd'] = timing
      results[f'ot_abl_{label}_fwdbwd'] = _time(lambda: bwd(pixels, prompts), runs)
  elif name == 'tower':
    # The frozen tower (+ the L2 normalisation): gradients flow to its input, not its weights.
    images = jnp.asarray(rng.normal(size=(1, s, s, 3)), jnp.float32)
    params = params_for(text_seen)
    encode = lambda p, x: model.apply({'params': p}, x, train=False,
                                      method=otseg.OTSeg.encode_image)[0]
    fwd = jax.jit(encode)
    bwd = jax.jit(jax.grad(lambda x, p: jnp.mean(jnp.square(encode(p, x)))))
    results['tower_fwd'] = _time(lambda: fwd(params, images), runs)
    results['tower_fwdbwd'] = _time(lambda: bwd(images, params), runs)
  elif name == 'torch_tower':
    try:
      import torch  # pylint: disable=g-import-not-at-top,unused-import
    except ImportError:
      print('torch is not installed: no PyTorch figure.', file=sys.stderr)
      return {}
    images = rng.normal(size=(1, s, s, 3)).astype(np.float32)
    results.update(_torch_tower(config, images, runs))
  else:
    raise ValueError(f'Unknown figure {name!r}: one of {FIGURES}.')
  return results


def _child(args) -> None:
  import resource  # pylint: disable=g-import-not-at-top
  results = run_figure(args.figure, args.quick, args.runs, args.attention_query_chunk,
                       args.set, args.classes)
  peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
  for timing in results.values():
    timing['peak_rss_gb'] = peak_gb
  print('RESULT ' + json.dumps(results), flush=True)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--quick', action='store_true', help='tiny config: a smoke test')
  parser.add_argument('--runs', type=int, default=None, help='timed runs (default 5, quick 3)')
  parser.add_argument('--threads', type=int, default=2)
  parser.add_argument('--figures', default=','.join(FIGURES))
  parser.add_argument('--attention_query_chunk', type=int, default=None,
                      help="the image tower's attention blocks (default: the config's)")
  parser.add_argument('--set', action='append', default=[], metavar='FIELD=VALUE',
                      help="a model config field, e.g. --set backbone.remat=block --set "
                      "dtype=bfloat16 (repeatable)")
  parser.add_argument('--classes', default=None, metavar='K,SEEN',
                      help='K classes at eval and SEEN in the train step (default 20,15: VOC)')
  parser.add_argument('--json', default=None, help='also write the figures to this JSON file')
  parser.add_argument('--figure', help=argparse.SUPPRESS)  # internal: run one figure here
  args = parser.parse_args(argv)
  args.runs = args.runs or (3 if args.quick else 5)
  if args.figure:
    _child(args)
    return 0

  cpus = sorted(os.sched_getaffinity(0))[:args.threads]
  env = dict(os.environ, JAX_PLATFORMS='cpu',
             XLA_FLAGS=(os.environ.get('XLA_FLAGS', '') +
                        ' --xla_force_host_platform_device_count=1').strip())
  results = {}
  for figure in args.figures.split(','):
    cmd = [sys.executable, os.path.abspath(__file__), '--figure', figure, '--runs',
           str(args.runs)] + (['--quick'] if args.quick else [])
    if args.attention_query_chunk is not None:
      cmd += ['--attention_query_chunk', str(args.attention_query_chunk)]
    cmd += [f'--set={item}' for item in args.set]
    if args.classes:
      cmd += ['--classes', args.classes]
    # Pinning the child to `threads` CPUs bounds XLA's thread pool as torch.set_num_threads does.
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True,
                          preexec_fn=lambda: os.sched_setaffinity(0, cpus))
    lines = [l for l in proc.stdout.splitlines() if l.startswith('RESULT ')]
    if proc.returncode or not lines:
      print(f'{figure} failed:\n{proc.stderr[-3000:]}', file=sys.stderr)
      return 1
    results.update(json.loads(lines[-1][len('RESULT '):]))
    print(f'  {figure}: done', file=sys.stderr, flush=True)

  if args.json:
    with open(args.json, 'w') as f:
      json.dump(dict(threads=len(cpus), runs=args.runs, quick=args.quick, set=args.set,
                     load_average=os.getloadavg(), results=results), f, indent=1)
  title = 'tiny --quick config (authors\' numbers are for the real one)' if args.quick else \
      'real VOC config'
  chunk = _config(args.quick, args.attention_query_chunk)[0].backbone.attention_query_chunk
  title += f', attention_query_chunk={chunk}' + ''.join(f', {item}' for item in args.set)
  print(f'\nOTSeg JAX on CPU, {len(cpus)} thread(s), {title}; median of {args.runs} runs')
  print('| figure | median (s) | min (s) | compile or first call (s) | peak RSS (GB) | '
        'authors\' PyTorch (s) | authors\' peak RSS (GB) |')
  print('|---|---:|---:|---:|---:|---:|---:|')
  for key, timing in results.items():
    ref_s, ref_gb = AUTHORS.get(key, (None, None))
    if 'error' in timing:
      print(f'| {key} | {timing["error"]} | | | | | |')
      continue
    extra = f' ({timing["iterations"]} it.)' if 'iterations' in timing else ''
    if 'plan_vs_default' in timing:
      extra += f' (plan vs default {timing["plan_vs_default"]:.2g})'
    fmt = lambda v, p=3: '–' if v is None else f'{v:.{p}f}'
    print(f'| {key}{extra} | {timing["median"]:.3f} | {timing["min"]:.3f} | '
          f'{timing["compile_s"]:.1f} | '
          f'{timing["peak_rss_gb"]:.2f} | {fmt(ref_s)} | {fmt(ref_gb, 1)} |')
  return 0


if __name__ == '__main__':
  sys.exit(main())
