"""Training: `train_and_evaluate(config, workdir)` and the pieces it is made of.

The recipe is the reference's (spec section 8): AdamW, per-group learning-rate / weight-decay
multipliers as mmcv's `paramwise_cfg.custom_keys`, linear warm-up into a poly decay, only the
parameters the method's `config.model.trainable` names trained. The method is
`otseg_jax.models.<config.model.name>`; the trainer never names one. Data parallel over a device
mesh: `jit` with the batch sharded over the 'data' axis and everything else replicated (default),
or `pmap` (`config.parallel = 'pmap'`), which gives the same numbers; `parallel_step` builds
either.

Reading order: optimizer and schedule, the train state, `train_step`, `parallel_step`,
`init_params`, logging, then `train_and_evaluate`.
"""

import functools
import json
import math
import os
import pathlib
import re
import signal
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

from absl import logging
import flax
import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P
import ml_collections
import numpy as np
import grain
import optax
import orbax.checkpoint as ocp

from otseg_jax import checkpoint as checkpoint_lib
from otseg_jax import classes as classes_lib
from otseg_jax import devices
from otseg_jax import evaluate as evaluate_lib
from otseg_jax import losses as losses_lib
from otseg_jax import metrics
from otseg_jax import params as params_lib
from otseg_jax import text_embeddings
from otseg_jax import models
from otseg_jax.data import loading
from otseg_jax.models import clip_weights


# ---------------------------------------------------------------------------------------------------
# Learning-rate schedule and optimizer.


def lr_schedule(base_lr: float, total_steps: int, *, warmup_steps: int, warmup_ratio: float,
                power: float, end_lr: float) -> optax.Schedule:
  """mmcv's `poly` policy with `linear` warm-up, as a function of the update count.

  poly(t) = (base_lr - end_lr) * (1 - t / total_steps)^power + end_lr; during the first
  `warmup_steps` updates the lr is poly(t) * (1 - (1 - t / warmup_steps) * (1 - warmup_ratio)).
  The warm-up scales the *decayed* lr (mmcv's `get_warmup_lr(cur_iter)` of `regular_lr`), and
  `end_lr` is absolute for every parameter group (mmcv's `min_lr`), not multiplied by the group's
  lr multiplier.
  """
  def schedule(count):
    t = jnp.minimum(jnp.asarray(count, jnp.float32), total_steps)
    regular = (base_lr - end_lr) * (1.0 - t / total_steps)**power + end_lr
    if warmup_steps <= 0:
      return regular
    # 1 - (1 - t / w) * (1 - ratio), written so that float32 keeps the ratio exact at t = 0.
    factor = warmup_ratio + (1.0 - warmup_ratio) * t / warmup_steps
    return jnp.where(t < warmup_steps, regular * factor, regular)
  return schedule


def param_multipliers(params: Any, rules: Sequence[Sequence[Any]],
                      first_match: bool = True) -> Any:
  """(lr_mult, decay_mult) for every leaf of `params`, from (regex, lr_mult, decay_mult) rules.

  Each regex is searched in the '/'-joined parameter path (e.g. 'decode_head/layers_0/norm2/scale').
  A multiplier given as None means "this rule does not set it".

  first_match=True is mmcv's `custom_keys` behaviour, which the reference trains with: the FIRST
  rule whose regex matches sets both multipliers (None -> 1) and later rules are not looked at.
  With the reference's rules ordered as mmcv sorts them (longest key first: 'backbone', 'head',
  'norm', 'ln'), every trainable parameter matches 'backbone' or 'head' first, so the norm / ln
  rules with decay_mult 0 never apply: the authors' runs decayed every parameter. **quirk**, kept
  by default. first_match=False gives the recipe as written: each multiplier comes from the first
  rule that sets it, so the norm and ln parameters get lr x10 AND no weight decay.
  """
  compiled = []
  for rule in rules:
    if len(rule) != 3:
      raise ValueError(f'optimizer rule {tuple(rule)!r}: expected (regex, lr_mult, decay_mult), '
                       'with None for a multiplier the rule does not set.')
    compiled.append((re.compile(rule[0]), rule[1], rule[2]))

  def lookup(path):
    name = '/'.join(str(getattr(k, 'key', k)) for k in path)
    lr_mult = decay_mult = None
    for regex, lr, decay in compiled:
      if not regex.search(name):
        continue
      if first_match:
        return (1.0 if lr is None else float(lr), 1.0 if decay is None else float(decay))
      lr_mult = lr if lr_mult is None else lr_mult
      decay_mult = decay if decay_mult is None else decay_mult
    return (1.0 if lr_mult is None else float(lr_mult),
            1.0 if decay_mult is None else float(decay_mult))

  return jax.tree_util.tree_map_with_path(lambda path, _: lookup(path), params)


def make_optimizer(config: ml_collections.ConfigDict, trainable: Any,
                   total_steps: int) -> tuple[optax.GradientTransformation, dict[str, Any]]:
  """AdamW with one (lr schedule, weight decay) per multiplier group, over the trainable params.

  Returns:
    (the optax transformation, {group label: dict(lr_mult, decay_mult, schedule, count)}).
  """
  opt = config.optimizer
  sched = config.schedule
  mults = param_multipliers(trainable, opt.rules, opt.first_match)
  labels = jax.tree.map(lambda m: f'lr{m[0]:g}_wd{m[1]:g}', mults,
                        is_leaf=lambda x: isinstance(x, tuple))
  groups = {}
  for m in jax.tree.leaves(mults, is_leaf=lambda x: isinstance(x, tuple)):
    label = f'lr{m[0]:g}_wd{m[1]:g}'
    groups.setdefault(label, dict(lr_mult=m[0], decay_mult=m[1], count=0))['count'] += 1
  transforms = {}
  for label, g in groups.items():
    if g['lr_mult'] == 0:
      # lr_mult 0 (the reference's text encoder) means frozen, not "end_lr only".
      transforms[label] = optax.set_to_zero()
      g['schedule'] = lambda count: jnp.zeros([], jnp.float32)
      continue
    schedule = lr_schedule(opt.lr * g['lr_mult'], total_steps, warmup_steps=sched.warmup_steps,
                           warmup_ratio=sched.warmup_ratio, power=sched.power,
                           end_lr=sched.end_lr)
    g['schedule'] = schedule
    transforms[label] = optax.adamw(schedule, b1=opt.b1, b2=opt.b2, eps=opt.eps,
                                    weight_decay=opt.weight_decay * g['decay_mult'])
  return optax.multi_transform(transforms, labels), groups


# ---------------------------------------------------------------------------------------------------
# Train state and step.


@flax.struct.dataclass
class TrainState:
  """Everything a step reads and writes. Leaves are arrays, so orbax saves it as is.

  step: () int32, the number of updates done.
  params: the trainable parameters (`config.model.trainable`; OTSeg: the prompts of the image
    tower and the decode head).
  frozen: the frozen parameters (OTSeg: the rest of the image tower); never differentiated, not
    in `opt_state`.
  opt_state: optax state of `params`.
  rng: (2,) uint32 base key; the step's key is fold_in(rng, step), so the randomness of a step
    does not depend on how the run was interrupted and resumed.
  """
  step: jax.Array
  params: Any
  frozen: Any
  opt_state: Any
  rng: jax.Array


def train_step(state: TrainState, batch: Mapping[str, jax.Array], text_input: Any, *,
               model: Any, tx: optax.GradientTransformation, loss_fn: Callable[..., Any],
               pseudo_labels: Callable[..., jax.Array] | None = None,
               axis_name: str | None = None) -> tuple[TrainState, dict[str, jax.Array]]:
  """One AdamW update on a batch. Pure: (state, batch, text_input) -> (new state, metrics).

  Args:
    state: see `TrainState`.
    batch: 'image' (B, S, S, 3) float32 normalised, 'label' (B, S, S) int32 (after the
      visibility mapping), 'index' (B,) int32 position of each example in the global batch.
      Under `pmap`, B is the per-device batch.
    text_input: the class text input of the training classes (`text_embeddings.load_text_input`:
      OTSeg's (K, N, C) embeddings, or the (K, L) tokens of a prompt learner), turned into the
      class text by `model.encode_text` inside the step, so learned prompts get their gradient.
    model: the method's model.
    tx: from `make_optimizer`.
    loss_fn: (maps, labels, axis_name=...) -> dict of terms with 'total' and 'num_masks'.
    pseudo_labels: transductive self-training, (maps, labels) -> labels; None otherwise.
    axis_name: the pmap axis; None under jit (the batch is global there).

  Returns:
    The new state and scalar metrics: the loss terms, 'grad_norm', 'num_masks', and
    'sinkhorn/<path>/mean' and '/max' over the batch for the model's Sinkhorn paths (aux's
    'sinkhorn_iterations_by_path').
  """
  step_key = jax.random.fold_in(state.rng, state.step)
  # One dropout key per example from its global index: the randomness, and so the result, does
  # not depend on the number of devices, processes, or jit vs pmap.
  keys = jax.vmap(lambda i: jax.random.fold_in(step_key, i))(batch['index'])
  # The text's key: an index no example has.
  text_key = jax.random.fold_in(step_key, np.iinfo(np.int32).max)

  def loss_of(params):
    variables = {'params': params_lib.merge_params(params, state.frozen)}
    text = model.apply(variables, text_input, train=True, rngs={'dropout': text_key},
                       method='encode_text')

    def forward_one(image, key):
      maps, aux = model.apply(variables, image[None], text, train=True, rngs={'dropout': key})
      return ({k: v[0] for k, v in maps.items()},
              {k: jnp.max(v) for k, v in aux.get('sinkhorn_iterations_by_path', {}).items()})

    maps, iterations = jax.vmap(forward_one)(batch['image'], keys)
    labels = batch['label']
    if pseudo_labels is not None:
      labels = pseudo_labels(maps, labels)
    terms = loss_fn(maps, labels, axis_name=axis_name)
    return terms['total'], (terms, iterations)

  grads, (terms, iterations) = jax.grad(loss_of, has_aux=True)(state.params)
  # Sinkhorn iteration counts per path, mean and max over the batch: they rise as the features
  # sharpen during training, and the step time with them.
  counts = {}
  for path, n in iterations.items():
    n = jnp.asarray(n, jnp.float32)
    counts[f'sinkhorn/{path}/mean'], counts[f'sinkhorn/{path}/max'] = jnp.mean(n), jnp.max(n)
  if axis_name is not None:
    # Each device's loss is its share of the global loss (num_masks is summed over devices), so
    # the global gradient is the SUM of the device gradients.
    grads = jax.lax.psum(grads, axis_name)
    terms = {k: v if k == 'num_masks' else jax.lax.psum(v, axis_name) for k, v in terms.items()}
    counts = {k: (jax.lax.pmax if k.endswith('/max') else jax.lax.pmean)(v, axis_name)
              for k, v in counts.items()}
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  metrics_ = {k: jnp.asarray(v, jnp.float32) for k, v in terms.items()}
  metrics_['grad_norm'] = optax.global_norm(grads)
  metrics_.update(counts)
  new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
  return new_state, metrics_


class Parallel(NamedTuple):
  """The step of one parallel mode and how trees reach it and come back (`parallel_step`)."""
  step: Callable[..., Any]  # (state, batch, text_input) -> (state, metrics)
  put: Callable[[Any], Any]  # host numpy tree (same on every process) -> the step's layout
  put_batch: Callable[[Mapping[str, np.ndarray]], Any]  # this process's (b, ...) arrays -> batch
  host: Callable[[Any], Any]  # the step's layout -> host numpy
  for_saving: Callable[[Any], Any]  # the step's layout -> global arrays replicated on the mesh


def parallel_step(step_fn: Callable[..., Any], parallel: str,
                  mesh: jax.sharding.Mesh) -> Parallel:
  """`step_fn` under `jit` over `mesh` (batch sharded over 'data', the rest replicated) or under
  `pmap` over the local devices (axis 'batch', state stacked per device); both donate the state."""
  replicated = NamedSharding(mesh, P())
  if parallel == 'jit':
    batch_sharding = NamedSharding(mesh, P('data'))
    step = jax.jit(step_fn, in_shardings=(replicated, batch_sharding, replicated),
                   out_shardings=(replicated, replicated), donate_argnums=0)
    return Parallel(
        step=step,
        put=lambda tree: devices.replicate_global(tree, replicated),
        put_batch=lambda arrays: {k: jax.make_array_from_process_local_data(batch_sharding, v)
                                  for k, v in arrays.items()},
        host=devices.to_host,
        for_saving=lambda tree: tree)
  if parallel == 'pmap':
    local = jax.local_devices()
    step = jax.pmap(functools.partial(step_fn, axis_name='batch'), axis_name='batch',
                    donate_argnums=0)
    host = lambda tree: jax.tree.map(lambda x: np.asarray(x[0]), tree)
    n = len(local)
    return Parallel(
        step=step,
        put=lambda tree: devices.pmap_replicate(tree, local),
        put_batch=lambda arrays: {k: v.reshape(n, v.shape[0] // n, *v.shape[1:])
                                  for k, v in arrays.items()},
        host=host,
        for_saving=lambda tree: devices.replicate_global(host(tree), replicated))
  raise ValueError(f"config.parallel={parallel!r}: use 'jit' or 'pmap'.")


# ---------------------------------------------------------------------------------------------------
# Parameters.


def init_params(config: ml_collections.ConfigDict, model: Any, text_input: Any, seed: int,
                clip: tuple[Any, Any] | None = None) -> Any:
  """The starting parameters, as numpy: random init, the CLIP towers of `config.model.
  clip_towers` from `clip` (the run's `load_clip(config.clip)`), then the method's optional
  `init_after_load(params, text_input, config.model)` (parameters that start from the loaded
  towers' outputs); or everything from `config.init_from` if set (transductive training starts
  from an inductive run)."""
  patch = config.model.backbone.patch_size
  # The positional grid is a parameter of the configured image size and is resized to the input at
  # run time, so a tiny input initialises the same tree at a fraction of the cost.
  dummy = jnp.zeros((1, 2 * patch, 2 * patch, 3), jnp.float32)
  variables = jax.jit(functools.partial(models.init, model))(
      {'params': jax.random.PRNGKey(seed)}, dummy, jnp.asarray(text_input))
  params = jax.tree.map(np.asarray, variables['params'])
  if config.init_from:
    loaded = params_lib.load_params_any(config.init_from)
    params_lib.check_same_structure(loaded, params, f'init_from={config.init_from}')
    return jax.tree.map(lambda x, ref: np.asarray(x, ref.dtype), loaded, params)
  if config.clip:
    spec, towers = clip or clip_weights.load_clip(config.clip, image_size=config.model.image_size)
    if 'backbone' in config.model:
      # Shapes alone miss some disagreements (4 heads vs 2 of one width): compare the facts.
      clip_weights.check_backbone_config(spec, config.model.backbone, config.clip)
    params = params_lib.merge_loaded(
        params, {subtree: towers[tower] for subtree, tower in config.model.clip_towers.items()},
        dont_load=config.model.dont_load, source=f'CLIP weights {config.clip}')
  after_load = getattr(models.get_method(config.model.name), 'init_after_load', None)
  if after_load is not None:
    params = jax.tree.map(np.asarray, after_load(params, np.asarray(text_input), config.model))
  return params


# ---------------------------------------------------------------------------------------------------
# Logging: a progress line, TensorBoard event files, a JSON-lines log.


class MetricWriter:
  """Scalars to `workdir/metrics.jsonl` and TensorBoard event files in `workdir/tensorboard`.

  Only process 0 writes. TensorBoard events go through `tf.summary.write` with the 'scalars'
  plugin metadata, which needs TensorFlow (a dependency of the data pipeline) but not the
  tensorboard package.
  """

  def __init__(self, workdir: pathlib.Path, tensorboard: bool, resume_step: int,
               final_step: int):
    self.enabled = jax.process_index() == 0
    self.path = workdir / 'metrics.jsonl'
    self._tb = None
    if not self.enabled:
      return

    def still_valid(record):
      # What was logged after the checkpoint we resume from runs again, and so does the final
      # evaluation when a finished run is resumed (the periodic ones at the checkpoint's step
      # do not: they ran after its save).
      if record.get('step', 0) != resume_step:
        return record.get('step', 0) < resume_step
      return resume_step < final_step or not any(k.startswith('eval/') for k in record)

    if self.path.exists() and resume_step >= 0:
      kept = [line for line in self.path.read_text().splitlines()
              if line.strip() and still_valid(json.loads(line))]
      tmp = self.path.with_suffix('.jsonl.tmp')
      tmp.write_text(''.join(line + '\n' for line in kept))
      os.replace(tmp, self.path)
    self._file = open(self.path, 'a', buffering=1)
    if tensorboard:
      import tensorflow as tf  # pylint: disable=g-import-not-at-top
      from tensorflow.core.framework import summary_pb2  # pylint: disable=g-import-not-at-top
      self._tf = tf
      self._meta = summary_pb2.SummaryMetadata(
          plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name='scalars'))
      self._tb = tf.summary.create_file_writer(str(workdir / 'tensorboard'))

  def write(self, step: int, scalars: Mapping[str, float]) -> None:
    if not self.enabled:
      return
    record = {'step': int(step), 'time': time.time()}
    record.update({k: (None if v is None else float(v)) for k, v in scalars.items()})
    self._file.write(json.dumps(record) + '\n')
    if self._tb is not None:
      with self._tb.as_default():
        for k, v in scalars.items():
          if v is not None:
            self._tf.summary.write(k, self._tf.constant(float(v), self._tf.float32), step=step,
                                   metadata=self._meta)
      self._tb.flush()

  def close(self) -> None:
    if self.enabled:
      self._file.close()
      if self._tb is not None:
        self._tb.close()


def _format_eta(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f'{h}h{m:02d}m' if h else f'{m}m{s:02d}s'


def _sinkhorn_at_cap(means: Mapping[str, float], cap: int | None) -> str:
  """' | Sinkhorn at the cap of 20 (mean/max): mps 12.5/20, ...' for the paths whose count
  reached the iteration cap in the interval, else ''. Steps slow down as the counts rise."""
  if not cap:
    return ''
  paths = [k[len('sinkhorn/'):-len('/max')] for k in means
           if k.startswith('sinkhorn/') and k.endswith('/max') and means[k] >= cap]
  if not paths:
    return ''
  return f' | Sinkhorn at the cap of {cap} (mean/max): ' + ', '.join(
      f'{p} {means[f"sinkhorn/{p}/mean"]:.1f}/{means[f"sinkhorn/{p}/max"]:.0f}' for p in paths)


class _StopFlag:
  """Set by SIGTERM (a preemption / `kill`): the loop saves a checkpoint and returns."""

  def __init__(self):
    self.requested = False
    self._previous = None

  def install(self):
    # Signal handlers can only be set from the main thread (not, e.g., from a test's worker).
    if threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    return self

  def _handle(self, signum, frame):
    del frame
    logging.warning('Signal %d received: saving a checkpoint and stopping after this step.', signum)
    self.requested = True

  def uninstall(self):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


# ---------------------------------------------------------------------------------------------------
# The training run.


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Cheap checks that fail before anything is loaded, each naming the field and the fix."""
  if config.setting not in classes_lib.SETTINGS:
    raise ValueError(f'config.setting={config.setting!r}: use one of '
                     f'{", ".join(classes_lib.SETTINGS)}.')
  if config.parallel not in ('jit', 'pmap'):
    raise ValueError(f"config.parallel={config.parallel!r}: use 'jit' or 'pmap'.")
  if config.num_train_steps <= 0:
    raise ValueError(f'config.num_train_steps={config.num_train_steps} must be positive.')
  if config.batch_size % jax.device_count():
    raise ValueError(f'config.batch_size={config.batch_size} is not divisible by the '
                     f'{jax.device_count()} devices; use a multiple (4 per device in the reference).')
  if config.checkpoint_every_steps <= 0 or config.log_every_steps <= 0:
    raise ValueError('config.checkpoint_every_steps and config.log_every_steps must be positive.')


def _quiet_abandoned_restore_reads() -> None:
  """A failed restore leaves reads behind: tensorstore completes them and calls back into the
  event loop orbax has closed (RuntimeError 'Event loop is closed'), and orbax's other read
  coroutines of the broken step fail when collected. Both reach sys.unraisablehook, which would
  print a traceback each; they repeat what the warning already says, so drop exactly those."""
  previous = sys.unraisablehook
  if getattr(previous, 'quiets_abandoned_reads', False):
    return

  def hook(unraisable):
    value, where = unraisable.exc_value, unraisable.object
    closed_loop = isinstance(value, RuntimeError) and str(value) == 'Event loop is closed'
    read = getattr(where, '__qualname__', '') == '_read_array_index_and_device_put'
    if not (closed_loop or read):
      previous(unraisable)

  hook.quiets_abandoned_reads = True
  sys.unraisablehook = hook


def restore_newest_intact(mngr: ocp.CheckpointManager, ckpt_dir: pathlib.Path,
                          args: Any) -> tuple[int | None, Any]:
  """(step, restored) of the newest checkpoint that restores, or (None, None) when there is none.

  A checkpoint that does not restore (a truncated file after a full disk, a bad copy) is moved
  aside to `<step>.unreadable` with a warning naming its step and file: kept for inspection, out
  of orbax's step list (so neither `max_to_keep` deletes it nor a later save of the same step
  collides with it). When no checkpoint restores, nothing is moved and the run stops naming the
  newest broken one.
  """
  broken = []
  _quiet_abandoned_restore_reads()
  for step in sorted(mngr.all_steps(), reverse=True):
    try:
      restored = mngr.restore(step, args=args)
    except Exception as e:  # orbax, tensorstore and json raise many types; all mean unreadable.
      what = checkpoint_lib.describe_unreadable(ckpt_dir / str(step), e)
      broken.append((step, what))
      logging.warning('Checkpoint step %d is unreadable: %s. Trying the one before.', step, what)
      continue
    for bad_step, _ in broken:
      kept = ckpt_dir / f'{bad_step}.unreadable'
      n = 1
      while kept.exists():  # the same step may have broken before
        kept, n = ckpt_dir / f'{bad_step}.unreadable-{n}', n + 1
      if jax.process_index() == 0:
        os.replace(ckpt_dir / str(bad_step), kept)
      logging.warning('Resuming from step %d instead of the unreadable step %d, kept as %s.',
                      step, bad_step, kept)
    if broken:
      if jax.process_count() > 1:
        multihost_utils.sync_global_devices('unreadable checkpoints moved aside')
      mngr.reload()
    return step, restored
  if broken:
    step, what = broken[0]
    raise ValueError(
        f'No checkpoint in {ckpt_dir} restores; the newest, step {step}, is unreadable: {what}. '
        f'Restore {ckpt_dir} from a backup, or move it away to train from the start.')
  return None, None


def _host_metrics(values: Mapping[str, Any]) -> dict[str, float]:
  return {k: float(np.asarray(v).reshape(-1)[0]) for k, v in jax.device_get(values).items()}


def train_and_evaluate(config: ml_collections.ConfigDict,
                       workdir: str | os.PathLike) -> dict[str, Any]:
  """Trains as `config` says in `workdir`, resuming from its latest checkpoint, then evaluates.

  workdir/checkpoints/<step>/  orbax: train state + data iterator state (async, max_to_keep)
  workdir/metrics.jsonl        scalars, one JSON object per log step
  workdir/tensorboard/         the same scalars as TensorBoard events
  workdir/params/              final parameters (`checkpoint.load_params`; eval / init_from)
  workdir/eval/                results.json, per_class.md, per_class_iou.png, overlays/

  Returns:
    The final evaluation results (see `metrics.summarize`), or {'preempted': True, 'step': N}
    when a SIGTERM stopped the run after saving a checkpoint.

  Raises:
    FloatingPointError: a non-finite loss or gradient; the checkpoints hold the last good state.
  """
  workdir = pathlib.Path(workdir).expanduser().absolute()
  validate_config(config)
  is_main = jax.process_index() == 0

  # Data, classes and class text first: a missing dataset or a text array of another dataset
  # fails in seconds. CLIP is read once, for the text and for the towers.
  train_split = loading.load_data_split(config, config.data.train_split)
  eval_split = loading.load_data_split(config, config.data.eval_split)
  dataset = train_split.classes
  if config.setting == 'transductive' and not dataset.unseen:
    raise ValueError(f'config.setting=transductive needs unseen classes; {dataset.name} has none.')
  seen = classes_lib.seen_mask(dataset, config.setting)
  clip = (clip_weights.load_clip(config.clip, image_size=config.model.image_size)
          if config.clip else None)
  text_all = text_embeddings.load_text_input(config, dataset.classes, clip)
  text_train = text_all[classes_lib.train_text_rows(dataset, config.setting)]
  ckpt_dir = workdir / 'checkpoints'
  resuming = ckpt_dir.is_dir() and any(p.name.isdigit() for p in ckpt_dir.iterdir())
  if config.setting == 'transductive' and not config.init_from and not resuming:
    raise ValueError('Transductive self-training starts from an inductive run: set '
                     '--config.init_from=WORKDIR_OR_PARAMS of a trained inductive model.')
  workdir.mkdir(parents=True, exist_ok=True)
  if is_main:
    (workdir / 'config.json').write_text(config.to_json_best_effort(indent=2) + '\n')
  logging.info('%d devices on %d processes, global batch %d, %s; dataset %s (%d classes, %d '
               'unseen), setting %s, method %s, %d steps.', jax.device_count(),
               jax.process_count(), config.batch_size, config.parallel, dataset.name,
               dataset.num_classes, len(dataset.unseen), config.setting, config.model.name,
               config.num_train_steps)

  # Model and parameters.
  method = models.get_method(config.model.name)
  model = method.model_from_config(config.model)
  params = init_params(config, model, text_train, config.seed, clip)
  del clip
  if config.get('ft_backbone'):
    # The reference's ft_backbone=True: the whole model trains, not only config.model.trainable.
    trainable, frozen = params, {}
  else:
    trainable, frozen = params_lib.split_params(params, config.model.trainable)
  del params

  # Optimizer and state.
  tx, groups = make_optimizer(config, trainable, config.num_train_steps)
  for label, g in sorted(groups.items()):
    logging.info('optimizer group %s: %d tensors, lr x%g, weight decay x%g', label, g['count'],
                 g['lr_mult'], g['decay_mult'])
  host_state = TrainState(
      step=np.int32(0), params=trainable, frozen=frozen,
      opt_state=jax.tree.map(np.asarray, tx.init(trainable)),
      rng=np.asarray(jax.random.PRNGKey(config.seed), np.uint32))
  del trainable, frozen

  # Restore: the train state and the data iterator of the latest checkpoint.
  train_iter = loading.make_train_iterator(config, train_split)
  mngr = ocp.CheckpointManager(
      ckpt_dir, options=ocp.CheckpointManagerOptions(
          max_to_keep=config.max_to_keep, enable_async_checkpointing=config.async_checkpointing,
          create=True),
      item_handlers={'state': ocp.StandardCheckpointHandler(),
                     'data': grain.checkpoint.CheckpointHandler()})
  replicated = NamedSharding(devices.make_mesh(), P())
  abstract = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype, sharding=replicated),
      host_state)
  latest, restored = restore_newest_intact(mngr, ckpt_dir, ocp.args.Composite(
      state=ocp.args.StandardRestore(abstract),
      data=grain.checkpoint.CheckpointRestore(train_iter)))
  if latest is not None:
    host_state = devices.to_host(restored.state)
    logging.info('Resumed from %s at step %d.', ckpt_dir / str(latest), latest)

  # The step, in the parallel mode of the config.
  loss_kwargs = {k: v for k, v in config.loss.to_dict().items() if k != 'name'}
  pseudo_labels = None
  if config.setting == 'transductive':
    pseudo_labels = functools.partial(method.pseudo_labels, seen=seen, config=config.model)
  step_fn = functools.partial(
      train_step, model=model, tx=tx, pseudo_labels=pseudo_labels,
      loss_fn=functools.partial(getattr(losses_lib, config.loss.name), **loss_kwargs))
  par = parallel_step(step_fn, config.parallel, devices.make_mesh())
  state, text = devices.xla_owned(par.put(host_state)), par.put(text_train)
  step = int(host_state.step)
  del host_state
  devices.release_host_memory()
  last_saved = latest

  def global_batch(local_batch):
    b = local_batch['image'].shape[0]
    return par.put_batch({
        'image': np.asarray(local_batch['image'], np.float32),
        'label': np.asarray(local_batch['label'], np.int32),
        # Position in the global batch: the key of the example's dropout randomness.
        'index': np.arange(b, dtype=np.int32) + jax.process_index() * b})

  def save(at_step):
    nonlocal last_saved
    mngr.save(at_step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(par.for_saving(state)),
        data=grain.checkpoint.CheckpointSave(train_iter)), force=True)
    last_saved = at_step

  def check_finite(at_step, values):
    bad = [k for k in ('total', 'grad_norm') if k in values and not math.isfinite(values[k])]
    if bad:
      mngr.wait_until_finished()
      mngr.close()
      where = (f'the last good checkpoint is step {last_saved} in {ckpt_dir}' if last_saved
               is not None else 'no checkpoint was saved before it')
      raise FloatingPointError(
          f'Non-finite {" and ".join(bad)} at step {at_step} ({values}); stopped without saving '
          f'this state: {where}. Lower the learning rate or check the data, then rerun to resume.')

  def host_params():
    return params_lib.merge_params(*par.host((state.params, state.frozen)))

  def run_eval(params, outdir, max_images):
    return evaluate_lib.evaluate(config, model, params, text_all, seen, eval_split,
                                 outdir=outdir, max_images=max_images)

  # The loop.
  writer = MetricWriter(workdir, config.tensorboard and is_main,
                        resume_step=-1 if latest is None else latest,
                        final_step=config.num_train_steps)
  stop = _StopFlag().install()
  schedules = {label: g['schedule'] for label, g in groups.items()}
  main_group = max(groups, key=lambda label: groups[label]['count'])
  history: list[dict[str, float]] = []
  cap = config.model.get('ot', {}).get('max_iterations')
  pending = None  # (step, device metrics) of the last dispatched step, fetched one step later
  # Rates and the ETA leave out this process's first step (compilation, input warm-up) and the
  # periodic evaluations: they would make the first ETA far too long.
  interval_start = interval_step = None
  loop_start = time.time()
  first_step_seconds = None
  results: dict[str, Any] = {}
  compiled_step = None
  try:
    while step < config.num_train_steps:
      batch = global_batch(next(train_iter))
      if compiled_step is None:
        # Compiled ahead of the first call, so that compilation's freed memory is returned
        # before the step's own buffers are allocated: the run's peak is the step's, not both.
        compiled_step = par.step.lower(state, batch, text).compile()
        devices.release_host_memory()
      state, step_metrics = compiled_step(state, batch, text)
      step += 1
      if interval_step is None:
        jax.block_until_ready(step_metrics)
        first_step_seconds = time.time() - loop_start
        interval_start, interval_step = time.time(), step
      # Fetch the previous step's metrics now: the device already runs this one.
      if pending is not None:
        values = _host_metrics(pending[1])
        check_finite(pending[0], values)
        history.append(values)
      pending = (step, step_metrics)
      stop_now = stop.requested
      if jax.process_count() > 1:
        stop_now = bool(multihost_utils.process_allgather(np.asarray(stop_now)).any())
      is_last = step == config.num_train_steps
      log_now = step % config.log_every_steps == 0 or is_last or stop_now
      save_now = step % config.checkpoint_every_steps == 0 or is_last or stop_now
      if log_now or save_now:
        values = _host_metrics(pending[1])
        check_finite(step, values)
        history.append(values)
        pending = None
      if save_now:
        save(step)
      if log_now and history:
        elapsed = time.time() - interval_start
        steps_done = step - interval_step
        speed = {}
        if steps_done:
          speed['train/images_per_sec'] = steps_done * config.batch_size / max(elapsed, 1e-9)
          eta = (config.num_train_steps - step) * elapsed / steps_done
          timing = f'{speed["train/images_per_sec"]:.1f} img/s | ETA {_format_eta(eta)}'
        else:  # only the first step in this interval: no rate yet
          timing = 'rate and ETA from the next log'
        if first_step_seconds is not None:
          speed['train/first_step_seconds'] = first_step_seconds
          timing += f' | first step (compilation) {first_step_seconds:.1f}s'
          first_step_seconds = None
        # Means over the interval, except the maxima (Sinkhorn counts), whose max is kept.
        means = {k: float((np.max if k.endswith('/max') else np.mean)([h[k] for h in history]))
                 for k in history[0]}
        lrs = {f'lr/{label}': float(fn(step - 1)) for label, fn in schedules.items()}
        lr = lrs[f'lr/{main_group}']
        logging.info('step %d/%d | loss %.4f | lr %.3g | %s%s', step, config.num_train_steps,
                     means['total'], lr, timing, _sinkhorn_at_cap(means, cap))
        writer.write(step, {**{f'train/{k}': v for k, v in means.items()}, **lrs, **speed})
        history = []
        interval_start, interval_step = time.time(), step
      if stop_now:
        mngr.wait_until_finished()
        logging.warning('Stopped by signal at step %d; checkpoint saved in %s. Rerun the same '
                        'command to resume.', step, ckpt_dir)
        return {'preempted': True, 'step': step}
      if config.eval_every_steps > 0 and step % config.eval_every_steps == 0 and not is_last:
        eval_start = time.time()
        periodic = run_eval(host_params(), None, config.eval.max_images)
        interval_start += time.time() - eval_start  # not training time
        writer.write(step, {f'eval/{k}': periodic[k]
                            for k in ('mIoU', 'seen_mIoU', 'unseen_mIoU', 'hIoU')})
        logging.info('eval at step %d: %s', step, metrics.format_summary(periodic))
    mngr.wait_until_finished()

    final_params = host_params()
    if jax.process_count() == 1:
      checkpoint_lib.save_params(workdir / 'params', final_params, dict(
          step=step, dataset=dataset.name, setting=config.setting,
          class_names=list(dataset.classes), unseen=list(dataset.unseen),
          config=json.loads(config.to_json_best_effort())), overwrite=True)
    if config.eval_every_steps >= 0:
      results = run_eval(final_params, workdir / 'eval', 0)
      writer.write(step, {f'eval/{k}': results[k] for k in ('mIoU', 'seen_mIoU', 'unseen_mIoU',
                                                            'hIoU')})
      logging.info('Final evaluation (%s): %s. Reports in %s', eval_split.split,
                   metrics.format_summary(results), workdir / 'eval')
  finally:
    stop.uninstall()
    writer.close()
    mngr.close()
  return results
