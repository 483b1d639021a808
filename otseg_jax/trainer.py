"""Training: `train_and_evaluate(config, workdir)` and the pieces it is made of.

The recipe is the reference's (spec section 8): AdamW, per-group learning-rate / weight-decay
multipliers as mmcv's `paramwise_cfg.custom_keys`, linear warm-up into a poly decay, only the prompt
parameters of the image tower and the decode head trained. Data parallel over a device mesh:
`jit` with the batch sharded over the 'data' axis and everything else replicated (default), or
`pmap` (`config.parallel = 'pmap'`), which gives the same numbers.

Reading order: optimizer and schedule, the train state, `train_step`, then `train_and_evaluate`
(setup, resume, the loop with checkpointing, logging, signals and evaluation).
"""

import functools
import json
import logging as py_logging
import math
import os
import pathlib
import re
import signal
import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any

from absl import flags
from absl import logging
import flax
from flax import traverse_util
import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
import ml_collections
import numpy as np
import grain
import optax
import orbax.checkpoint as ocp

from otseg_jax import checkpoint as checkpoint_lib
from otseg_jax import classes as classes_lib
from otseg_jax import evaluate as evaluate_lib
from otseg_jax import losses as losses_lib
from otseg_jax import text_embeddings
from otseg_jax.data import pipeline
from otseg_jax.data import synthetic
from otseg_jax.data import transforms
from otseg_jax.models import clip_weights
from otseg_jax.models import otseg

SETTINGS = ('inductive', 'transductive', 'fully_supervised')


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
  params: the trainable parameters (prompts of the image tower, decode head).
  frozen: the frozen parameters (the rest of the image tower); never differentiated, not in
    `opt_state`.
  opt_state: optax state of `params`.
  rng: (2,) uint32 base key; the step's key is fold_in(rng, step), so the randomness of a step
    does not depend on how the run was interrupted and resumed.
  """
  step: jax.Array
  params: Any
  frozen: Any
  opt_state: Any
  rng: jax.Array


def pseudo_labels(outputs: Mapping[str, jax.Array], labels: jax.Array, seen: np.ndarray,
                  unseen: np.ndarray, balance: float = 0.5) -> jax.Array:
  """Transductive self-training targets (spec section 7).

  Pixels whose ground truth is an unseen class get argmax_k of sigmoid(balance * score +
  (1 - balance) * decoder) with the seen channels set to -1 (so always an unseen class), computed
  without gradient; every other pixel keeps its label (seen classes by global index, 255 ignore).

  Args:
    outputs: 'decoder' and 'score' (B, H, W, K) logits of the training forward (dropout on, as
      the reference computes them).
    labels: (B, H, W) int, global class ids (0..K-1) or 255.
    seen, unseen: class indices.

  Returns:
    (B, H, W) int32.
  """
  logits = outputs['decoder']
  if 'score' in outputs:
    logits = balance * outputs['score'] + (1.0 - balance) * logits
  probs = jax.nn.sigmoid(jax.lax.stop_gradient(logits))
  k = probs.shape[-1]
  is_seen = np.zeros(k, bool)
  is_seen[np.asarray(seen, int)] = True
  probs = jnp.where(jnp.asarray(is_seen), -1.0, probs)
  pseudo = jnp.argmax(probs, axis=-1).astype(jnp.int32)
  is_unseen_px = jnp.isin(labels, jnp.asarray(np.asarray(unseen, np.int32)))
  return jnp.where(is_unseen_px, pseudo, labels.astype(jnp.int32))


def train_step(state: TrainState, batch: Mapping[str, jax.Array], text: jax.Array, *,
               model: Any, tx: optax.GradientTransformation, loss_config: Any,
               transductive: tuple[np.ndarray, np.ndarray] | None = None,
               pseudo_balance: float = 0.5, axis_name: str | None = None) -> tuple[TrainState, dict[str, jax.Array]]:
  """One AdamW update on a batch. Pure: (state, batch, text) -> (new state, metrics).

  Args:
    state: see `TrainState`.
    batch: 'image' (B, S, S, 3) float32 normalised, 'label' (B, S, S) int32 (after the
      visibility mapping), 'index' (B,) int32 position of each example in the global batch.
      Under `pmap`, B is the per-device batch.
    text: (K, N, C) L2-normalised text embeddings the model trains against.
    model: the `OTSeg` module.
    tx: from `make_optimizer`.
    loss_config: keyword arguments of `losses.otseg_loss` (weights, alpha, gamma).
    transductive: (seen, unseen) class indices for self-training, None otherwise.
    pseudo_balance: weight of the score map in the pseudo-label probabilities.
    axis_name: the pmap axis; None under jit (the batch is global there).

  Returns:
    The new state and scalar metrics: the loss terms, 'grad_norm', 'num_masks'.
  """
  step_key = jax.random.fold_in(state.rng, state.step)
  # One dropout key per example from its global index: the randomness, and so the result, does
  # not depend on the number of devices, processes, or jit vs pmap.
  keys = jax.vmap(lambda i: jax.random.fold_in(step_key, i))(batch['index'])

  def loss_fn(params):
    variables = {'params': otseg.merge_params(params, state.frozen)}

    def forward_one(image, key):
      out = model.apply(variables, image[None], text, train=True, rngs={'dropout': key})
      return {k: out[k][0] for k in ('decoder', 'score') if k in out}

    outputs = jax.vmap(forward_one)(batch['image'], keys)
    labels = batch['label']
    if transductive is not None:
      labels = pseudo_labels(outputs, labels, *transductive, balance=pseudo_balance)
    terms = losses_lib.otseg_loss(outputs, labels, **loss_config, axis_name=axis_name)
    return terms['total'], terms

  grads, terms = jax.grad(loss_fn, has_aux=True)(state.params)
  if axis_name is not None:
    # Each device's loss is its share of the global loss (num_masks is summed over devices), so
    # the global gradient is the SUM of the device gradients.
    grads = jax.lax.psum(grads, axis_name)
    terms = {k: v if k == 'num_masks' else jax.lax.psum(v, axis_name) for k, v in terms.items()}
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  metrics = {k: jnp.asarray(v, jnp.float32) for k, v in terms.items()}
  metrics['grad_norm'] = optax.global_norm(grads)
  new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
  return new_state, metrics


# ---------------------------------------------------------------------------------------------------
# Setup helpers: classes, text embeddings, parameters.


def synthetic_config(config: ml_collections.ConfigDict) -> Any:
  """The `synthetic.SyntheticConfig` of config.data.synthetic."""
  return synthetic.SyntheticConfig(**config.data.synthetic.to_dict())


def load_data_split(config: ml_collections.ConfigDict, split: str) -> Any:
  """A `pipeline.Split` of config.data.name: a prepared TFDS folder or the synthetic set."""
  if config.data.name == 'synthetic':
    return synthetic.load_split(split, synthetic_config(config))
  return pipeline.load_split(config.data.name, split,
                             pathlib.Path(config.data.data_dir).expanduser())


def load_text_embeddings(config: ml_collections.ConfigDict,
                         class_names: Sequence[str]) -> np.ndarray:
  """(K, N, C) float32 text embeddings of `class_names` (every class of the dataset).

  From `config.text_embeddings` (.npy) if set; else computed with the CLIP text tower of
  `config.clip` over `config.templates` (a template set name or file); else, for the synthetic
  dataset only, its own embeddings. Refuses an array whose shape does not fit the
  dataset (class count) or the model (prompt count, embedding width), naming both, before anything
  expensive runs.
  """
  source = config.text_embeddings
  if source:
    path = pathlib.Path(source).expanduser()
    if not path.is_file():
      raise FileNotFoundError(f'config.text_embeddings={source!r}: no such file. Point it at a '
                              f'(K, N, C) .npy of the {config.dataset} classes, or set it to \'\' to '
                              'compute the embeddings with the CLIP text tower (config.clip).')
    text = text_embeddings.read_npy(path)
  elif config.clip:
    spec, clip_params = clip_weights.load_clip(config.clip)
    tokenizer = clip_weights.load_tokenizer(
        clip_weights.tokenizer_source(config.clip, config.get('tokenizer')))
    text = np.asarray(text_embeddings.compute_text_embeddings(
        spec, clip_params, tokenizer, list(class_names),
        text_embeddings.read_templates(config.templates)), np.float32)
    source = f'CLIP {config.clip} with templates {config.templates}'
  elif config.data.name == 'synthetic':
    text = synthetic.text_embeddings(synthetic_config(config)).astype(np.float32)
    source = 'the synthetic dataset'
  else:
    raise ValueError('No text embeddings: set config.text_embeddings to a (K, N, C) .npy, or '
                     'config.clip to CLIP weights to compute them.')
  logging.info('Text embeddings %s from %s.', text.shape, source)
  num_classes = len(class_names)
  if text.ndim != 3:
    raise ValueError(f'Text embeddings from {source} have shape {text.shape}; expected (K, N, C) '
                     '= (classes, prompts, embedding dim).')
  if text.shape[0] != num_classes:
    raise ValueError(
        f'Text embeddings from {source} have {text.shape[0]} classes but dataset '
        f'{config.dataset!r} has {num_classes}: they belong to another dataset. Use the '
        f'embeddings of {config.dataset} (e.g. --config.text_embeddings=\'\' to compute them).')
  if text.shape[2] != config.model.backbone.output_dim:
    raise ValueError(f'Text embeddings from {source} are {text.shape[2]}-dimensional but the image '
                     f'tower embeds into {config.model.backbone.output_dim} '
                     '(config.model.backbone.output_dim): they come from another CLIP.')
  if text.shape[1] != config.model.num_prompts:
    raise ValueError(f'Text embeddings from {source} have {text.shape[1]} prompts per class but '
                     f'config.model.num_prompts={config.model.num_prompts}; set one to the other.')
  text_embeddings.check_text_embeddings(text, source, class_names)
  return text


def _flat(tree: Any) -> dict[str, Any]:
  return {'/'.join(k): v for k, v in traverse_util.flatten_dict(tree).items()}


def merge_clip_weights(params: Any, visual: Any, source: str) -> Any:
  """`params` with the backbone leaves replaced by CLIP's image tower `visual`.

  Every CLIP leaf must exist in the backbone with the same shape, and every backbone leaf CLIP does
  not provide must be a (new, trainable) prompt parameter; anything else is an error listing all
  mismatches.
  """
  backbone = _flat(params['backbone'])
  clip_flat = _flat(visual)
  problems = []
  for name, value in clip_flat.items():
    if name not in backbone:
      problems.append(f'{name} (in the checkpoint, not in the model)')
    elif tuple(backbone[name].shape) != tuple(np.shape(value)):
      problems.append(f'{name}: checkpoint {tuple(np.shape(value))} vs model '
                      f'{tuple(backbone[name].shape)}')
  missing = [n for n in backbone if n not in clip_flat and 'prompt' not in n]
  problems += [f'{n} (in the model, not in the checkpoint)' for n in missing]
  if problems:
    raise ValueError(f'CLIP weights {source} do not fit config.model.backbone:\n  ' +
                     '\n  '.join(problems))
  merged = {k: np.asarray(clip_flat.get(k, v), backbone[k].dtype) for k, v in backbone.items()}
  out = dict(params)
  out['backbone'] = traverse_util.unflatten_dict({tuple(k.split('/')): v for k, v in merged.items()})
  return out


def load_params_any(path: str | os.PathLike) -> Any:
  """Full model parameters (nested dicts of numpy) from a parameter checkpoint (`save_params`,
  e.g. what `convert` or training's final export writes) or from a training workdir (the latest
  step of its checkpoints, or its final export)."""
  path = pathlib.Path(path).expanduser().absolute()
  if (path / 'params').is_dir() and (path / 'metadata.json').is_file():
    return checkpoint_lib.load_params(path)[0]
  ckpt_dir = path / 'checkpoints'
  if ckpt_dir.is_dir():
    handlers = {'state': ocp.PyTreeCheckpointHandler(),
                'data': grain.checkpoint.CheckpointHandler()}
    with ocp.CheckpointManager(ckpt_dir, item_handlers=handlers,
                               options=ocp.CheckpointManagerOptions(create=False)) as mngr:
      step = mngr.latest_step()
      if step is not None:
        # As numpy, whatever devices and processes wrote it.
        tree = mngr.item_metadata(step)['state'].tree
        restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
        restored = mngr.restore(step, args=ocp.args.Composite(
            state=ocp.args.PyTreeRestore(restore_args=restore_args)))
        state = restored['state']
        params = otseg.merge_params(state['params'], state['frozen'])
        return jax.tree.map(np.asarray, params)
  if not path.exists():
    raise FileNotFoundError(f'{path}: no such checkpoint. Pass a training workdir or a parameter '
                            'checkpoint directory (params/ + metadata.json).')
  raise FileNotFoundError(f'{path} holds no parameters: expected params/ + metadata.json (a '
                          'parameter checkpoint) or checkpoints/ with at least one step (a '
                          'training workdir).')


def check_same_structure(params: Any, reference: Any, source: str) -> None:
  """Raises ValueError listing every leaf where `params` and `reference` differ in name or shape."""
  a, b = _flat(params), _flat(reference)
  problems = [f'{k} (missing in {source})' for k in b if k not in a]
  problems += [f'{k} (unexpected in {source})' for k in a if k not in b]
  problems += [f'{k}: {tuple(np.shape(a[k]))} in {source}, {tuple(np.shape(b[k]))} in the model'
               for k in a if k in b and tuple(np.shape(a[k])) != tuple(np.shape(b[k]))]
  if problems:
    raise ValueError(f'Parameters from {source} do not fit the configured model '
                     f'(config.model):\n  ' + '\n  '.join(problems[:20]) +
                     (f'\n  ... and {len(problems) - 20} more' if len(problems) > 20 else ''))


def init_params(config: ml_collections.ConfigDict, model: Any, text: np.ndarray,
                seed: int) -> Any:
  """The starting parameters, as numpy: random init, CLIP's image tower from `config.clip`, then
  everything from `config.init_from` if set (transductive training starts from an inductive run)."""
  patch = config.model.backbone.patch_size
  # The positional grid is a parameter of the configured image size and is resized to the input at
  # run time, so a tiny input initialises the same tree at a fraction of the cost.
  dummy = jnp.zeros((1, 2 * patch, 2 * patch, 3), jnp.float32)
  variables = jax.jit(functools.partial(model.init, train=False))(
      {'params': jax.random.PRNGKey(seed)}, dummy, jnp.asarray(text))
  params = jax.tree.map(np.asarray, variables['params'])
  if config.init_from:
    loaded = load_params_any(config.init_from)
    check_same_structure(loaded, params, f'init_from={config.init_from}')
    return jax.tree.map(lambda x, ref: np.asarray(x, ref.dtype), loaded, params)
  if config.clip:
    spec, clip_params = clip_weights.load_clip(config.clip, image_size=config.model.image_size)
    clip_weights.check_backbone_config(spec, config.model.backbone, config.clip)
    params = merge_clip_weights(params, clip_params['visual'], config.clip)
  return params


# ---------------------------------------------------------------------------------------------------
# Logging: a progress line, TensorBoard event files, a JSON-lines log.


class MetricWriter:
  """Scalars to `workdir/metrics.jsonl` and TensorBoard event files in `workdir/tensorboard`.

  Only process 0 writes. TensorBoard events go through `tf.summary.write` with the 'scalars'
  plugin metadata, which needs TensorFlow (a dependency of the data pipeline) but not the
  tensorboard package.
  """

  def __init__(self, workdir: pathlib.Path, tensorboard: bool, resume_step: int):
    self.enabled = jax.process_index() == 0
    self.path = workdir / 'metrics.jsonl'
    self._tb = None
    if not self.enabled:
      return
    if self.path.exists() and resume_step >= 0:
      # Drop what was logged after the checkpoint we resume from: those steps run again.
      kept = [line for line in self.path.read_text().splitlines()
              if line.strip() and json.loads(line).get('step', 0) <= resume_step]
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


def quiet_library_logs() -> None:
  """Keeps orbax's and JAX's per-operation INFO lines out of the run's log (warnings still show)."""

  class _Filter(py_logging.Filter):

    def filter(self, record):
      path = record.pathname.replace(os.sep, '/')
      noisy = '/orbax/' in path or '/jax/_src/' in path or '/grain/' in path
      return record.levelno >= py_logging.WARNING or not noisy

  logging.get_absl_handler().addFilter(_Filter())


# ---------------------------------------------------------------------------------------------------
# Devices.


def maybe_initialize_distributed(coordinator_address: str | None = None,
                                 num_processes: int | None = None,
                                 process_id: int | None = None, auto: bool = False) -> None:
  """`jax.distributed.initialize` for multi-process runs (explicit values or auto-detection on
  SLURM / TPU pods / ...). A single process needs nothing. CPU collectives use gloo."""
  if num_processes and num_processes > 1:
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')
    jax.distributed.initialize(coordinator_address=coordinator_address,
                               num_processes=num_processes, process_id=process_id)
  elif auto:
    jax.distributed.initialize()


def define_distributed_flags():
  """Defines the multi-process flags of train.py and eval.py; returns `init()` that applies them.

  `--coordinator_address=HOST:PORT --num_processes=P --process_id=I` on every host, or
  `--multihost` for `jax.distributed.initialize()`'s auto-detection (SLURM, TPU pods).
  """
  coordinator = flags.DEFINE_string('coordinator_address', None,
                                    'HOST:PORT of process 0, for multi-process runs.')
  num_processes = flags.DEFINE_integer('num_processes', None, 'Processes in a multi-process run.')
  process_id = flags.DEFINE_integer('process_id', None, 'This process, 0..num_processes-1.')
  multihost = flags.DEFINE_bool('multihost', False,
                                'jax.distributed.initialize() with auto-detection (SLURM, TPU).')

  def init() -> None:
    maybe_initialize_distributed(coordinator.value, num_processes.value, process_id.value,
                                 auto=multihost.value)
  return init


def make_mesh() -> jax.sharding.Mesh:
  """1-D mesh over every device of every process; Auto axes (Explicit axes break ott's loops)."""
  return jax.make_mesh((jax.device_count(),), ('data',), axis_types=(AxisType.Auto,))


def _replicate_global(tree: Any, sharding: NamedSharding) -> Any:
  """Host numpy leaves (identical on every process) -> global arrays replicated over the mesh."""
  def put(x):
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])
  return jax.tree.map(put, tree)


def _pmap_replicate(tree: Any, devices: Sequence[Any]) -> Any:
  """Host leaves -> one copy per local device, stacked on a leading axis, as pmap takes them."""
  sharding = NamedSharding(jax.sharding.Mesh(np.asarray(devices), ('pmap',)), P('pmap'))
  return jax.tree.map(
      lambda x: jax.device_put(np.stack([np.asarray(x)] * len(devices)), sharding), tree)


def _to_host(tree: Any) -> Any:
  """Replicated global arrays -> numpy, on every process (each reads its own copy)."""
  def get(x):
    if isinstance(x, jax.Array):
      return np.asarray(x.addressable_data(0))
    return np.asarray(x)
  return jax.tree.map(get, tree)


# ---------------------------------------------------------------------------------------------------
# Training data.


class ShardedBatches(grain.DatasetIterator):
  """Concatenates the batches of several data shards read by one process (config.data.shards a
  multiple of the process count), so that a run reads the same global batches on any number of
  processes. Checkpointable like the shard iterators it holds."""

  def __init__(self, shards: Sequence[grain.DatasetIterator]):
    super().__init__(list(shards))
    self._shards = list(shards)

  def __next__(self) -> dict[str, np.ndarray]:
    batches = [next(s) for s in self._shards]
    return {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}

  def get_state(self) -> dict[str, Any]:
    return {'shards': [s.get_state() for s in self._shards]}

  def set_state(self, state: dict[str, Any]) -> None:
    if len(state['shards']) != len(self._shards):
      raise ValueError(f'The checkpoint holds {len(state["shards"])} data shards per process, this '
                       f'run reads {len(self._shards)}: keep config.data.shards and the number of '
                       'processes of the run being resumed.')
    for s, st in zip(self._shards, state['shards']):
      s.set_state(st)


def make_train_iterator(config: ml_collections.ConfigDict, split: Any) -> grain.DatasetIterator:
  """This process's iterator of local batches {'image' (b, S, S, 3), 'label' (b, S, S)},
  b = config.batch_size / process count."""
  num_processes = jax.process_count()
  shards = config.data.shards or num_processes
  if shards % num_processes or config.batch_size % shards:
    raise ValueError(f'config.data.shards={shards} must be a multiple of the {num_processes} '
                     f'processes and divide config.batch_size={config.batch_size}.')
  augment = None
  if config.data.augment:
    augment = transforms.TrainAugment(
        img_scale=tuple(config.data.img_scale), ratio_range=tuple(config.data.ratio_range),
        cat_max_ratio=config.data.cat_max_ratio)
  per_process = shards // num_processes
  loaders = [
      pipeline.make_train_loader(
          split, global_batch_size=config.batch_size, crop_size=config.model.image_size,
          seed=config.seed, setting=config.setting, augment=augment,
          process_index=jax.process_index() * per_process + j, process_count=shards,
          num_threads=config.data.num_threads, worker_count=config.data.num_workers)
      for j in range(per_process)]
  return loaders[0] if per_process == 1 else ShardedBatches(loaders)


# ---------------------------------------------------------------------------------------------------
# The training run.


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Cheap checks that fail before anything is loaded, each naming the field and the fix."""
  if config.setting not in SETTINGS:
    raise ValueError(f'config.setting={config.setting!r}: use one of {", ".join(SETTINGS)}.')
  if config.parallel not in ('jit', 'pmap'):
    raise ValueError(f"config.parallel={config.parallel!r}: use 'jit' or 'pmap'.")
  if config.num_train_steps <= 0:
    raise ValueError(f'config.num_train_steps={config.num_train_steps} must be positive.')
  if config.batch_size % jax.device_count():
    raise ValueError(f'config.batch_size={config.batch_size} is not divisible by the '
                     f'{jax.device_count()} devices; use a multiple (4 per device in the reference).')
  if config.checkpoint_every_steps <= 0 or config.log_every_steps <= 0:
    raise ValueError('config.checkpoint_every_steps and config.log_every_steps must be positive.')


def _host_metrics(metrics: Mapping[str, Any]) -> dict[str, float]:
  return {k: float(np.asarray(v).reshape(-1)[0]) for k, v in jax.device_get(metrics).items()}


def train_and_evaluate(config: ml_collections.ConfigDict,
                       workdir: str | os.PathLike) -> dict[str, Any]:
  """Trains as `config` says in `workdir`, resuming from its latest checkpoint, then evaluates.

  workdir/checkpoints/<step>/  orbax: train state + data iterator state (async, max_to_keep)
  workdir/metrics.jsonl        scalars, one JSON object per log step
  workdir/tensorboard/         the same scalars as TensorBoard events
  workdir/params/              final parameters (`checkpoint.load_params`; eval / init_from)
  workdir/eval/                results.json, per_class.md, per_class_iou.png, overlays/

  Returns:
    The final evaluation results (see `evaluate.summarize`), or {'preempted': True, 'step': N}
    when a SIGTERM stopped the run after saving a checkpoint.

  Raises:
    FloatingPointError: a non-finite loss or gradient; the checkpoints hold the last good state.
  """
  workdir = pathlib.Path(workdir).expanduser().absolute()
  validate_config(config)
  is_main = jax.process_index() == 0

  # Data and text first: a missing dataset or a text array of another dataset fails in seconds.
  train_split = load_data_split(config, config.data.train_split)
  eval_split = load_data_split(config, config.data.eval_split)
  dataset = train_split.classes
  class_names, unseen = dataset.classes, tuple(dataset.unseen)
  if config.setting == 'fully_supervised':
    train_classes = tuple(range(len(class_names)))
  else:
    train_classes = tuple(i for i in range(len(class_names)) if i not in set(unseen))
  if config.setting == 'transductive' and not unseen:
    raise ValueError(f'config.setting=transductive needs unseen classes; {dataset.name} has none.')
  text_all = load_text_embeddings(config, class_names)
  text_train = text_all[list(train_classes)] if config.setting == 'inductive' else text_all
  ckpt_dir = workdir / 'checkpoints'
  resuming = ckpt_dir.is_dir() and any(p.name.isdigit() for p in ckpt_dir.iterdir())
  if config.setting == 'transductive' and not config.init_from and not resuming:
    raise ValueError('Transductive self-training starts from an inductive run: set '
                     '--config.init_from=WORKDIR_OR_PARAMS of a trained inductive model.')

  workdir.mkdir(parents=True, exist_ok=True)
  if is_main:
    (workdir / 'config.json').write_text(config.to_json_best_effort(indent=2) + '\n')
  mesh = make_mesh()
  replicated = NamedSharding(mesh, P())
  batch_sharding = NamedSharding(mesh, P('data'))
  logging.info('%d devices on %d processes, global batch %d, %s; dataset %s (%d classes, %d '
               'unseen), setting %s, %d steps.', jax.device_count(), jax.process_count(),
               config.batch_size, config.parallel, dataset.name, len(class_names), len(unseen),
               config.setting, config.num_train_steps)

  model = otseg.model_from_config(config.model)
  params = init_params(config, model, text_train, config.seed)
  if config.get('ft_backbone'):
    # The reference's ft_backbone=True: the whole image tower trains, not only its prompts.
    trainable, frozen = params, {}
  else:
    trainable, frozen = otseg.split_params(params)
  tx, groups = make_optimizer(config, trainable, config.num_train_steps)
  for label, g in sorted(groups.items()):
    logging.info('optimizer group %s: %d tensors, lr x%g, weight decay x%g', label, g['count'],
                 g['lr_mult'], g['decay_mult'])
  host_state = TrainState(
      step=np.int32(0), params=trainable, frozen=frozen,
      opt_state=jax.tree.map(np.asarray, tx.init(trainable)),
      rng=np.asarray(jax.random.PRNGKey(config.seed), np.uint32))
  del params, trainable, frozen
  state = _replicate_global(host_state, replicated)
  del host_state

  train_iter = make_train_iterator(config, train_split)
  options = ocp.CheckpointManagerOptions(
      max_to_keep=config.max_to_keep, enable_async_checkpointing=config.async_checkpointing,
      create=True)
  mngr = ocp.CheckpointManager(
      ckpt_dir, options=options,
      item_handlers={'state': ocp.StandardCheckpointHandler(),
                     'data': grain.checkpoint.CheckpointHandler()})
  latest = mngr.latest_step()
  if latest is not None:
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                            state)
    restored = mngr.restore(latest, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract),
        data=grain.checkpoint.CheckpointRestore(train_iter)))
    state = restored.state
    logging.info('Resumed from %s at step %d.', ckpt_dir / str(latest), latest)
  step = int(np.asarray(state.step.addressable_data(0)))
  last_saved = latest

  transductive = None
  if config.setting == 'transductive':
    seen_idx = tuple(i for i in range(len(class_names)) if i not in set(unseen))
    transductive = (np.asarray(seen_idx), np.asarray(unseen))
  step_fn = functools.partial(train_step, model=model, tx=tx,
                              loss_config=config.loss.to_dict(),
                              transductive=transductive,
                              pseudo_balance=config.pseudo_label_balance)
  text = _replicate_global(text_train, replicated)
  if config.parallel == 'jit':
    p_step = jax.jit(step_fn, in_shardings=(replicated, batch_sharding, replicated),
                     out_shardings=(replicated, replicated), donate_argnums=0)
  else:
    local = jax.local_devices()
    p_step = jax.pmap(functools.partial(step_fn, axis_name='batch'), axis_name='batch',
                      donate_argnums=0)
    state = _pmap_replicate(_to_host(state), local)
    text = _pmap_replicate(text_train, local)

  def global_batch(local_batch):
    b = local_batch['image'].shape[0]
    arrays = {'image': np.asarray(local_batch['image'], np.float32),
              'label': np.asarray(local_batch['label'], np.int32),
              # Position in the global batch: the key of the example's dropout randomness.
              'index': np.arange(b, dtype=np.int32) + jax.process_index() * b}
    if config.parallel == 'pmap':
      n = jax.local_device_count()
      return {k: v.reshape(n, b // n, *v.shape[1:]) for k, v in arrays.items()}
    return {k: jax.make_array_from_process_local_data(batch_sharding, v)
            for k, v in arrays.items()}

  def host(tree):  # state leaves -> numpy, from either layout
    if config.parallel == 'pmap':
      return jax.tree.map(lambda x: np.asarray(x[0]), tree)
    return _to_host(tree)

  def state_for_saving():
    if config.parallel == 'pmap':
      return _replicate_global(host(state), replicated)
    return state

  def save(at_step):
    nonlocal last_saved
    mngr.save(at_step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state_for_saving()),
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

  writer = MetricWriter(workdir, config.tensorboard and is_main,
                        resume_step=-1 if latest is None else latest)
  stop = _StopFlag().install()
  schedules = {label: g['schedule'] for label, g in groups.items()}
  main_group = max(groups, key=lambda label: groups[label]['count'])
  history: list[dict[str, float]] = []
  pending = None  # (step, device metrics) of the last dispatched step, fetched one step later
  interval_start, interval_step = time.time(), step
  results: dict[str, Any] = {}
  try:
    while step < config.num_train_steps:
      batch = global_batch(next(train_iter))
      state, metrics = p_step(state, batch, text)
      step += 1
      # Fetch the previous step's metrics now: the device already runs this one.
      if pending is not None:
        values = _host_metrics(pending[1])
        check_finite(pending[0], values)
        history.append(values)
      pending = (step, metrics)
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
        rate = steps_done * config.batch_size / max(elapsed, 1e-9)
        eta = (config.num_train_steps - step) * elapsed / max(steps_done, 1)
        means = {k: float(np.mean([h[k] for h in history])) for k in history[0]}
        lrs = {f'lr/{label}': float(fn(step - 1)) for label, fn in schedules.items()}
        lr = lrs[f'lr/{main_group}']
        logging.info('step %d/%d | loss %.4f | lr %.3g | %.1f img/s | ETA %s', step,
                     config.num_train_steps, means['total'], lr, rate, _format_eta(eta))
        writer.write(step, {**{f'train/{k}': v for k, v in means.items()}, **lrs,
                            'train/images_per_sec': rate})
        history = []
        interval_start, interval_step = time.time(), step
      if stop_now:
        mngr.wait_until_finished()
        logging.warning('Stopped by signal at step %d; checkpoint saved in %s. Rerun the same '
                        'command to resume.', step, ckpt_dir)
        return {'preempted': True, 'step': step}
      if config.eval_every_steps > 0 and step % config.eval_every_steps == 0 and not is_last:
        periodic = _evaluate(config, model, host((state.params, state.frozen)), text_all,
                             train_classes, class_names, unseen, eval_split, outdir=None,
                             max_images=config.eval.max_images)
        writer.write(step, {f'eval/{k}': periodic[k]
                            for k in ('mIoU', 'seen_mIoU', 'unseen_mIoU', 'hIoU')})
        logging.info('eval at step %d: %s', step, evaluate_lib.format_summary(periodic))
    mngr.wait_until_finished()

    final_params = otseg.merge_params(*host((state.params, state.frozen)))
    if jax.process_count() == 1:
      checkpoint_lib.save_params(workdir / 'params', final_params, dict(
          step=step, dataset=dataset.name, setting=config.setting, class_names=list(class_names),
          unseen=list(unseen), config=json.loads(config.to_json_best_effort())), overwrite=True)
    if config.eval_every_steps >= 0:
      results = _evaluate(config, model, final_params, text_all, train_classes, class_names,
                          unseen, eval_split, outdir=workdir / 'eval', max_images=0)
      writer.write(step, {f'eval/{k}': results[k] for k in ('mIoU', 'seen_mIoU', 'unseen_mIoU',
                                                            'hIoU')})
      logging.info('Final evaluation (%s): %s. Reports in %s', eval_split.split,
                   evaluate_lib.format_summary(results), workdir / 'eval')
  finally:
    stop.uninstall()
    writer.close()
    mngr.close()
  return results


def _evaluate(config, model, params, text_all, train_classes, class_names, unseen, split, *,
              outdir, max_images):
  """`evaluate.evaluate` of host `params` ((trainable, frozen) or merged) during training."""
  if isinstance(params, tuple):
    params = otseg.merge_params(*params)
  seen_mask = np.zeros(len(class_names), bool)
  seen_mask[list(train_classes)] = True
  return evaluate_lib.evaluate(
      config, model, params, text_all, seen_mask, split, class_names=class_names, unseen=unseen,
      outdir=outdir, max_images=max_images)
