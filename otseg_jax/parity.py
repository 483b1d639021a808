"""Numerical parity with a reference dump of the authors' PyTorch code.

  python -m otseg_jax.parity ../shared/reference/otseg_small.npz                  # f32, as-is dump
  python -m otseg_jax.parity ../shared/reference/otseg_small.npz --x64 --converged
  python -m otseg_jax.parity otseg_holdout.npz --x64 --ot-implementation reference
  python -m otseg_jax.parity transforms ../shared/reference/transforms_cases.npz  # data pipeline
  XLA_FLAGS=--xla_force_host_platform_device_count=2 \
    python -m otseg_jax.parity otseg_small.npz --x64 --converged --checks step   # the train step

The dump's `config/json` describes the model; its weights go through the same converter as the
authors' checkpoints (`convert.params_from_state_dict`, the method's `from_mmseg_state_dict`
hook), its gradients too (a state dict whose trainable tensors are replaced by their
gradients). `--converged [FILE]` takes weights and inputs from the dump and the expected outputs
from FILE (default: `<dump>_converged.npz` beside it), and runs the Sinkhorn solver to
convergence. One line per quantity: name, max abs error, max
error relative to the reference array's max magnitude; exit status 1 beyond tolerance.

Checks: 'train' (the training forward, losses and gradients), 'eval', 'slide', 'rect' (the
default set), and 'step': the trainer's own `train_step` under `parallel_step`, jit over the mesh
and pmap, on every device (the dump's batch must split over them), its loss terms and gradient.

Tolerances (relative to max): converged solver vs converged dump, float64 1e-6, float32 1e-4;
default solver vs as-is dump 2e-3; the 'reference' solver (exact replica of the authors'
stopping rule, where `ot` provides it) vs as-is dump, float64 1e-6, float32 1e-4.
"""

import argparse
import dataclasses
import functools
import json
import pathlib
import sys
from typing import Any

from flax import traverse_util
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from otseg_jax import convert
from otseg_jax import devices
from otseg_jax import inference
from otseg_jax import losses as losses_lib
from otseg_jax import models
from otseg_jax import params as params_lib
from otseg_jax import trainer
from otseg_jax.data import replay
from otseg_jax.models import ot_layers


@dataclasses.dataclass
class Row:
  name: str
  abs_err: float
  rel_err: float
  tol: float

  @property
  def ok(self) -> bool:
    return bool(self.rel_err <= self.tol)

  def __str__(self) -> str:
    return (f'{self.name:60s} abs {self.abs_err:10.3e}  rel {self.rel_err:10.3e}  '
            f'{"ok" if self.ok else "FAIL"} (tol {self.tol:.0e})')


def load_npz(path: str | pathlib.Path) -> dict[str, np.ndarray]:
  path = pathlib.Path(path)
  if not path.is_file():
    raise FileNotFoundError(f'{path}: no such reference dump.')
  with np.load(path) as f:
    return {k: f[k] for k in f.files}


def tolerance(*, x64: bool, converged: bool, implementation: str) -> float:
  if converged or implementation == 'reference':
    return 1e-6 if x64 else 1e-4
  return 2e-3


def solver_config(base: ml_collections.ConfigDict, *, x64: bool, converged: bool,
                  implementation: str) -> ml_collections.ConfigDict:
  """The OT settings of a mode (see the module docstring)."""
  config = ml_collections.ConfigDict(base.to_dict())
  if implementation != 'ott':
    if 'implementation' not in config:
      raise ValueError(f'--ot-implementation {implementation}: otseg_jax.ot has no '
                       "'implementation' option yet.")
    config.implementation = implementation
  if converged:
    if implementation == 'reference':
      # The authors' function with threshold 1e-13 and 5000 iterations, as the converged dump.
      config.reference_threshold, config.max_iterations = 1e-13, 5000
    else:
      # ott's marginal error reaches 1e-12 in float64; in float32 it stalls near 1e-7, where
      # 300 iterations already sit at the float32 fixed point (2000 change nothing visible).
      config.threshold = 1e-12 if x64 else 1e-7
      config.max_iterations = 2000 if x64 else 300
  return config


def _nhwc(x: np.ndarray) -> np.ndarray:
  return np.moveaxis(x, 1, -1)


def _rows_for(name: str, ours: Any, ref: np.ndarray, tol: float) -> Row:
  ours = np.asarray(ours, np.float64)
  ref = np.asarray(ref, np.float64)
  if ours.shape != ref.shape:
    raise ValueError(f'{name}: shape {ours.shape} vs reference {ref.shape}.')
  abs_err = float(np.abs(ours - ref).max()) if ref.size else 0.0
  scale = float(np.abs(ref).max()) if ref.size else 0.0
  return Row(name, abs_err, abs_err / scale if scale > 0 else abs_err, tol)


def _argmax_row(name: str, probs: np.ndarray, labels: np.ndarray, ref_labels: np.ndarray,
                tol: float) -> Row:
  """Mismatched pixels; a mismatch is forgiven when our top-2 gap there is within tolerance."""
  wrong = labels != ref_labels
  if not wrong.any():
    return Row(name, 0.0, 0.0, tol)
  p_ours = np.take_along_axis(probs, labels[..., None], -1)[..., 0]
  p_ref = np.take_along_axis(probs, ref_labels[..., None], -1)[..., 0]
  gap = float(np.abs(p_ours - p_ref)[wrong].max() / np.abs(probs).max())
  return Row(f'{name} ({int(wrong.sum())} px differ, rel = top-2 gap there)',
             float(wrong.sum()), gap, tol)


def run(dump: dict[str, np.ndarray], expected: dict[str, np.ndarray] | None = None, *,
        x64: bool = False, converged: bool = False, implementation: str = 'ott',
        tol: float | None = None, checks: tuple[str, ...] = ('train', 'eval', 'slide', 'rect'),
        compiler_options: dict[str, Any] | None = None,
        attention_query_chunk: int | None = None) -> list[Row]:
  """Everything the dump holds, compared. Call inside `jax.enable_x64(x64)`.

  Args:
    dump: arrays of a reference dump (weights, inputs, outputs).
    expected: where the expected outputs come from (the converged file); default `dump`.
    x64: compute in float64 (needs `jax.enable_x64(True)` around the call).
    converged: run the solver to convergence.
    implementation: 'ott' or 'reference' (ot's replica of the authors' stopping rule).
    tol: override of the relative tolerance.
    checks: which groups to run.
    compiler_options: XLA options for every jit (tests lower the optimisation level to halve
      compile times; the numbers stay within tolerance).
    attention_query_chunk: the image tower's `clip.chunked_attention` block (0: dense; None: the
      model config's default).
  """
  if x64 and not jax.config.jax_enable_x64:
    raise RuntimeError('x64=True needs `with jax.enable_x64(True):` around the call.')
  expected = dump if expected is None else expected
  tol = tolerance(x64=x64, converged=converged, implementation=implementation) if tol is None \
      else tol
  dtype = np.float64 if x64 else np.float32
  jit = functools.partial(jax.jit, compiler_options=compiler_options)
  ref_cfg = json.loads(str(dump['config/json']))
  config = convert.config_from_reference(ref_cfg)
  if attention_query_chunk is not None:
    config.backbone.attention_query_chunk = attention_query_chunk
  config.ot = solver_config(config.ot, x64=x64, converged=converged,
                            implementation=implementation)
  method = models.get_method(config.name)
  model = method.model_from_config(config, dtype=dtype)
  state_dict = {k: v for k, v in dump.items() if '/' not in k}
  params, unused = convert.params_from_state_dict(state_dict, config)
  cast = lambda tree: jax.tree.map(lambda x: jnp.asarray(x, dtype), tree)
  params = cast(params)
  seen_idx = np.asarray(ref_cfg['seen_idx'])
  all_idx = np.asarray(ref_cfg['all_idx'])
  text_all = jnp.asarray(dump['input/text_embeddings'][all_idx], dtype)
  seen = np.isin(all_idx, seen_idx)
  rows = []
  # The converged file has no inputs or weights, and not every info/ key.
  reference = lambda key: expected[key] if key in expected else dump[key]
  check = lambda name, ours, key: rows.append(_rows_for(name, ours, reference(key), tol))

  def check_iterations(key, iters):
    # Integer counts of the replica of the authors' stopping rule: must be identical.
    ours = np.asarray([int(i) for i in iters])
    diff = float(np.abs(ours - expected[key]).max()) if ours.shape == expected[key].shape else 1.0
    rows.append(Row(f'{key} {ours.tolist()}', diff, diff, 0.0))

  if 'train' in checks:
    images = jnp.asarray(_nhwc(dump['input/images']), dtype)
    labels = jnp.asarray(dump['input/labels_mapped'][:, 0], jnp.int32)
    text = jnp.asarray(dump['input/text_embeddings'][seen_idx], dtype)
    trainable, frozen = params_lib.split_params(params, config.trainable)

    def loss_fn(trainable):
      maps, aux = model.apply(
          {'params': params_lib.merge_params(trainable, frozen)}, images, text, train=True,
          rngs={'dropout': jax.random.key(0)})
      terms = losses_lib.otseg_loss(maps, labels)
      return terms['total'], (dict(aux, **maps), terms, aux['sinkhorn_iterations'])

    (_, (out, terms, iters)), grads = jit(jax.value_and_grad(loss_fn, has_aux=True))(
        trainable)
    if implementation == 'reference':
      check_iterations('sinkhorn/train_iters', iters)
    check('backbone_visual_embedding', np.moveaxis(out['dense'], -1, 1),
          'out/backbone_visual_embedding')
    check('backbone_global_embedding', out['global'], 'out/backbone_global_embedding')
    check('train_q_proj', out['q_proj'], 'out/train_q_proj')
    num_layers = config.head.decoder_layers
    b, h, w, k = out['decoder_lowres'].shape
    ref_q = expected['out/train_decoder_layer_q']  # (L, K, N, B, C)
    for i, q in enumerate(out['layer_queries']):
      rows.append(_rows_for(f'train_decoder_layer_q[{i}]', np.transpose(q, (1, 2, 0, 3)),
                            ref_q[i], tol))
    # The last layer's queries are unused by the model (its FFN is never created); recompute
    # them from the checkpoint's otherwise unused tensors to cover the whole dump.
    last_in = out['layer_queries'][-1] if num_layers > 1 else out['q_proj']
    layer = ot_layers.MPSADecoderLayer(
        config.backbone.output_dim, ml_collections.FrozenConfigDict(config.ot),
        dropout=0.0, with_output=True, dtype=dtype)
    rows_last = method.mmseg_decoder_layer_rows(num_layers - 1, with_output=True)
    layer_params = cast(traverse_util.unflatten_dict({
        p: f(state_dict['decode_head.' + n]) for n, p, f in rows_last}))
    q_last, _, _ = jit(lambda p, x, v: layer.apply({'params': p}, x, v, train=False))(
        layer_params, last_in, out['dense'].reshape(b, h * w, -1))
    rows.append(_rows_for(f'train_decoder_layer_q[{num_layers - 1}] (unused by the model)',
                          np.transpose(q_last, (1, 2, 0, 3)), ref_q[-1], tol))
    check('train_decoder_layer_attn',
          np.transpose(np.reshape(out['layer_maps'], (num_layers, b, h * w, k)), (0, 1, 3, 2)),
          'out/train_decoder_layer_attn')
    check('train_score_lowres', np.moveaxis(out['score_lowres'], -1, 1),
          'out/train_score_lowres')
    check('train_decoder_lowres', np.moveaxis(out['decoder_lowres'], -1, 1),
          'out/train_decoder_lowres')
    check('train_score_pred_masks', np.moveaxis(out['score'], -1, 1),
          'out/train_score_pred_masks')
    check('train_decoder_pred_masks', np.moveaxis(out['decoder'], -1, 1),
          'out/train_decoder_pred_masks')
    for name in ('decode.loss_mask', 'decode.loss_dice', 'score.loss_mask', 'score.loss_dice',
                 'total'):
      check(f'loss/{name}', terms[name], f'loss/{name}')
    check('info/num_masks', terms['num_masks'], 'info/num_masks')
    rows += _grad_rows('grad/', grads, dump, expected, state_dict, config, tol)
    rows.append(_unused_row(dump, unused))

  if 'step' in checks:
    text = jnp.asarray(dump['input/text_embeddings'][seen_idx], dtype)
    for parallel in ('jit', 'pmap'):
      rows += _train_step_rows(parallel, model, params, text, dump, expected, state_dict,
                               config, tol)

  probabilities = functools.partial(method.eval_probabilities, config=config)
  if 'eval' in checks:
    images = jnp.asarray(_nhwc(dump['input/images']), dtype)

    @jit
    def eval_fn(params, images):
      maps, aux = model.apply({'params': params}, images, text_all, train=False)
      # encode_decode's own forward is exercised by the slide check.
      return aux, probabilities(maps, seen), aux['sinkhorn_iterations']

    outputs, probs, iters = eval_fn(params, images)
    if implementation == 'reference':
      check_iterations('sinkhorn/eval_iters', iters)
    check('eval_lowres_score', np.moveaxis(outputs['score_lowres'], -1, 1),
          'out/eval_lowres_score')
    check('eval_lowres_decoder', np.moveaxis(outputs['decoder_lowres'], -1, 1),
          'out/eval_lowres_decoder')
    check('eval_forward_test', np.moveaxis(probs, -1, 1), 'out/eval_forward_test')

  if 'slide' in checks:
    image = jnp.asarray(_nhwc(dump['input/image_slide']), dtype)

    @jit
    def slide_fn(params, image):
      encode = lambda x: inference.encode_decode(model, params, x, text_all, seen, probabilities)
      return inference.predict(encode, image, mode='slide', crop=ref_cfg['crop'],
                               stride=ref_cfg['stride'])

    labels, probs = slide_fn(params, image)
    check('slide_inference', np.moveaxis(probs, -1, 1), 'out/slide_inference')
    rows.append(_argmax_row('slide_argmax', np.asarray(probs, np.float64), np.asarray(labels),
                            expected['out/slide_argmax'], tol))

  if 'rect' in checks:
    image = jnp.asarray(_nhwc(dump['input/image_rect']), dtype)
    dense, global_ = jit(lambda p, x: model.apply(
        {'params': p}, x, train=False, method='encode_image'))(params, image)
    check('backbone_rect_visual_embedding', np.moveaxis(dense, -1, 1),
          'out/backbone_rect_visual_embedding')
    check('backbone_rect_global_embedding', global_, 'out/backbone_rect_global_embedding')
  return rows


def _grad_rows(prefix: str, grads: Any, dump: dict[str, np.ndarray],
               expected: dict[str, np.ndarray], state_dict: dict[str, np.ndarray],
               config: ml_collections.ConfigDict, tol: float) -> list[Row]:
  """Our gradient tree against the dump's torch-named gradients, put through the same converter
  (a state dict whose trainable tensors are replaced by their gradients)."""
  grad_sd = dict(state_dict)
  for name in _trainable_names(dump):
    grad_sd[name] = expected[f'grad/{name}']
  ref_grads, _ = params_lib.split_params(convert.params_from_state_dict(grad_sd, config)[0],
                                         config.trainable)
  ours = traverse_util.flatten_dict(grads)
  ref = traverse_util.flatten_dict(ref_grads)
  if ours.keys() != ref.keys():
    raise ValueError(f'{prefix}: gradient leaves {sorted(ours.keys() ^ ref.keys())} are in only '
                     'one of ours and the reference.')
  return [_rows_for(prefix + '/'.join(path), ours[path], ref[path], tol) for path in sorted(ref)]


def _unused_row(dump: dict[str, np.ndarray], unused: list[str]) -> Row:
  """The trainable tensors the authors never use (grad None, stored as zeros in the dump) must be
  exactly those our model has no parameter for, and so no gradient: the converter, checked
  against the model's own parameter tree, lists them as unused. A parameter of ours fed by one
  of them would train where the authors' does not; an unused tensor of ours that the authors
  use would lose their gradient. Both show here by name."""
  theirs = {str(n) for n in dump['info/grad_none_params']}
  ours = set(unused) & set(_trainable_names(dump))
  differ = sorted(theirs ^ ours)
  return Row(f'grad of the {len(theirs)} tensors the authors never use: none of ours'
             + (f' (differ: {", ".join(differ)})' if differ else ''),
             float(len(differ)), float(len(differ)), 0.0)


def _train_step_rows(parallel: str, model: Any, params: Any, text: jax.Array,
                     dump: dict[str, np.ndarray], expected: dict[str, np.ndarray],
                     state_dict: dict[str, np.ndarray], config: ml_collections.ConfigDict,
                     tol: float) -> list[Row]:
  """The trainer's own step (`trainer.train_step` under `trainer.parallel_step`: the model per
  example under vmap, its dropout keys, the cross-device sums) on the dump's batch: its loss terms
  and its gradient. The optimizer is replaced by one that keeps the gradient it is handed as its
  state and updates nothing, so the gradient read back is the step's own, after the sum."""
  b = dump['input/images'].shape[0]
  if b % jax.device_count():
    raise ValueError(f"--checks step: the dump's batch of {b} does not split over "
                     f'{jax.device_count()} devices.')
  keep_gradient = optax.GradientTransformation(
      init=lambda p: jax.tree.map(jnp.zeros_like, p),
      update=lambda g, state, p=None: (jax.tree.map(jnp.zeros_like, g), g))
  trainable, frozen = params_lib.split_params(params, config.trainable)
  state = trainer.TrainState(
      step=np.int32(0), params=trainable, frozen=frozen, opt_state=keep_gradient.init(trainable),
      rng=np.asarray(jax.random.PRNGKey(0), np.uint32))
  step_fn = functools.partial(trainer.train_step, model=model, tx=keep_gradient,
                              loss_fn=losses_lib.otseg_loss)
  par = trainer.parallel_step(step_fn, parallel, devices.make_mesh())
  batch = par.put_batch({
      'image': np.asarray(_nhwc(dump['input/images']), text.dtype),
      'label': np.asarray(dump['input/labels_mapped'][:, 0], np.int32),
      'index': np.arange(b, dtype=np.int32)})
  new_state, metrics = par.step(par.put(state), batch, par.put(text))
  grads, metrics = par.host((new_state.opt_state, metrics))
  name = f'step[{parallel}, {jax.device_count()} devices]'
  rows = []
  for term in ('decode.loss_mask', 'decode.loss_dice', 'score.loss_mask', 'score.loss_dice',
               'total'):
    # The step's metrics are float32: 6e-8 relative, within every tolerance.
    rows.append(_rows_for(f'{name} loss/{term}', metrics[term], expected[f'loss/{term}'], tol))
  rows.append(_rows_for(f'{name} num_masks', metrics['num_masks'], dump['info/num_masks'], tol))
  return rows + _grad_rows(f'{name} grad/', grads, dump, expected, state_dict, config, tol)


def _trainable_names(dump: dict[str, np.ndarray]) -> list[str]:
  """Torch names of the trainable tensors that have a gradient in the dump."""
  return [str(n) for n in dump['info/trainable_params']]


def main(argv: list[str] | None = None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  if argv[:1] == ['transforms']:
    # The data pipeline's golden cases: their own check and arguments (otseg_jax.data.replay).
    return replay.main(argv[1:])
  parser = argparse.ArgumentParser(
      prog='python -m otseg_jax.parity', description=__doc__,
      formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('dump', help='reference .npz (../shared/reference/otseg_*.npz)')
  parser.add_argument('--x64', action='store_true', help='compute in float64')
  parser.add_argument('--converged', nargs='?', const='auto', default=None,
                      help='expected outputs from this converged dump (default '
                           '<dump>_converged.npz); the solver runs to convergence')
  parser.add_argument('--ot-implementation', default='ott', choices=['ott', 'reference'])
  parser.add_argument('--tol', type=float, default=None, help='override the relative tolerance')
  parser.add_argument('--checks', default='train,eval,slide,rect',
                      help="comma-separated groups; 'step' (the trainer's step) is not a default")
  parser.add_argument('--attention-query-chunk', type=int, default=None,
                      help='queries per block of chunked attention in the image tower (0: dense; '
                      'default: the model config\'s)')
  args = parser.parse_args(argv)

  dump = load_npz(args.dump)
  expected = None
  if args.converged is not None:
    path = args.converged
    if path == 'auto':
      path = pathlib.Path(args.dump).with_name(pathlib.Path(args.dump).stem + '_converged.npz')
    expected = load_npz(path)
  with jax.enable_x64(args.x64):
    rows = run(dump, expected, x64=args.x64, converged=expected is not None,
               implementation=args.ot_implementation, tol=args.tol,
               checks=tuple(args.checks.split(',')),
               attention_query_chunk=args.attention_query_chunk)
  mode = (f'{"float64" if args.x64 else "float32"}, '
          f'{"converged" if expected is not None else "default"} solver ({args.ot_implementation})')
  print(f'{args.dump}: {mode}')
  for row in rows:
    print(row)
  failed = [r.name for r in rows if not r.ok]
  print(f'{len(rows) - len(failed)}/{len(rows)} within tolerance'
        + (f'; FAILED: {", ".join(failed)}' if failed else ''))
  return 1 if failed else 0


if __name__ == '__main__':
  sys.exit(main())
