"""Parameter trees: split by a regex, merge back, compare structures, merge loaded weights, load.

Parameter paths are the '/'-joined keys of the nested dict ('decode_head/layers_0/norm2/scale').
A method says which of its parameters train with one regex over these paths (`config.model.
trainable`), as big_vision's configs say what to freeze: `re.search(trainable, path)`.
"""

import os
import pathlib
import re
from collections.abc import Mapping
from typing import Any

from flax import traverse_util
import grain
import jax
import numpy as np
import orbax.checkpoint as ocp

from otseg_jax import checkpoint as checkpoint_lib


def flat(tree: Mapping[str, Any]) -> dict[str, Any]:
  """{'a/b/c': leaf} of a nested dict."""
  return {'/'.join(k): v for k, v in traverse_util.flatten_dict(tree).items()}


def unflat(leaves: Mapping[str, Any]) -> dict:
  """Inverse of `flat`."""
  return traverse_util.unflatten_dict({tuple(k.split('/')): v for k, v in leaves.items()})


def trainable_mask(params: Mapping[str, Any], trainable: str) -> dict:
  """Pytree of bools like `params`: True where the regex `trainable` is found in the path."""
  return unflat({k: bool(re.search(trainable, k)) for k in flat(params)})


def split_params(params: Mapping[str, Any], trainable: str) -> tuple[dict, dict]:
  """(trainable, frozen): two nested dicts partitioning `params` by the regex `trainable`.

  How the trainer differentiates only the trainable part (frozen leaves never get a gradient, and
  the optimizer state only holds the trainable ones):

    trainable, frozen = split_params(params, config.model.trainable)
    grads = jax.grad(lambda t: loss(merge_params(t, frozen)))(trainable)
  """
  leaves = flat(params)
  return (unflat({k: v for k, v in leaves.items() if re.search(trainable, k)}),
          unflat({k: v for k, v in leaves.items() if not re.search(trainable, k)}))


def merge_params(trainable: Mapping[str, Any], frozen: Mapping[str, Any]) -> dict:
  """Inverse of `split_params`."""
  leaves = flat(frozen)
  leaves.update(flat(trainable))
  return unflat(leaves)


def check_same_structure(params: Any, reference: Any, source: str) -> None:
  """Raises ValueError listing every leaf where `params` and `reference` differ in name or shape."""
  a, b = flat(params), flat(reference)
  problems = [f'{k} (missing in {source})' for k in b if k not in a]
  problems += [f'{k} (unexpected in {source})' for k in a if k not in b]
  problems += [f'{k}: {tuple(np.shape(a[k]))} in {source}, {tuple(np.shape(b[k]))} in the model'
               for k in a if k in b and tuple(np.shape(a[k])) != tuple(np.shape(b[k]))]
  if problems:
    raise ValueError(f'Parameters from {source} do not fit the configured model '
                     f'(config.model):\n  ' + '\n  '.join(problems[:20]) +
                     (f'\n  ... and {len(problems) - 20} more' if len(problems) > 20 else ''))


def merge_loaded(params: Mapping[str, Any], loaded: Mapping[str, Any], *, dont_load: str,
                 source: str) -> dict:
  """`params` with loaded subtrees put in their place (big_vision's `merge_params`).

  Every loaded leaf must exist in `params` with the same shape; every leaf of `params` under a
  loaded subtree that the load does not provide must match the regex `dont_load` (the new parts,
  e.g. prompts). Leaves outside the loaded subtrees keep their initial values. Anything else is an
  error listing all the mismatches.

  Args:
    params: the freshly initialised tree (numpy).
    loaded: {subtree path: tree}, e.g. {'backbone': CLIP's image tower}.
    dont_load: regex of the parameter paths that the load is not expected to provide.
    source: where the weights come from, for the message.
  """
  have = flat(params)
  new = {f'{sub}/{k}': v for sub, tree in loaded.items() for k, v in flat(tree).items()}
  problems = []
  for name, value in new.items():
    if name not in have:
      problems.append(f'{name} (in the checkpoint, not in the model)')
    elif tuple(have[name].shape) != tuple(np.shape(value)):
      problems.append(f'{name}: checkpoint {tuple(np.shape(value))} vs model '
                      f'{tuple(have[name].shape)}')
  covered = tuple(f'{sub}/' for sub in loaded)
  missing = [n for n in have if n.startswith(covered) and n not in new
             and not re.search(dont_load, n)]
  problems += [f'{n} (in the model, not in the checkpoint)' for n in missing]
  if problems:
    raise ValueError(f'{source} do not fit config.model ({", ".join(loaded)}):\n  ' +
                     '\n  '.join(problems))
  return unflat({k: np.asarray(new[k], v.dtype) if k in new else v for k, v in have.items()})


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
        try:
          tree = mngr.item_metadata(step)['state'].tree
          restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
          restored = mngr.restore(step, args=ocp.args.Composite(
              state=ocp.args.PyTreeRestore(restore_args=restore_args)))
        except Exception as e:  # orbax, tensorstore and json raise many types; all mean unreadable.
          what = checkpoint_lib.describe_unreadable(ckpt_dir / str(step), e)
          raise ValueError(
              f'{path}: its latest checkpoint, step {step}, is unreadable: {what}. Rerun train.py '
              f'on {path} (it resumes from the newest readable step and keeps the broken one as '
              f'{step}.unreadable), or pass a parameter checkpoint.') from e
        state = restored['state']
        return jax.tree.map(np.asarray, merge_params(state['params'], state['frozen']))
  if not path.exists():
    raise FileNotFoundError(f'{path}: no such checkpoint. Pass a training workdir or a parameter '
                            'checkpoint directory (params/ + metadata.json).')
  raise FileNotFoundError(f'{path} holds no parameters: expected params/ + metadata.json (a '
                          'parameter checkpoint) or checkpoints/ with at least one step (a '
                          'training workdir).')
