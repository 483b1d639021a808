"""Parameter checkpoints: what `convert` writes and what training and evaluation load.

Layout of a checkpoint directory:
  DIR/params/         orbax PyTree checkpoint of the parameter tree (dtypes kept)
  DIR/metadata.json   free-form JSON (source file, model config, unused tensors, ...)

The whole directory is written under a temporary name beside DIR and renamed into place at the
end, so a crash never leaves a half-written DIR behind.
"""

import json
import os
import pathlib
import re
import shutil
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from otseg_jax import files


def save_params(directory: str | os.PathLike, params: Any, metadata: dict | None = None, *,
                overwrite: bool = False,
                extra_files: Sequence[str | os.PathLike] = ()) -> pathlib.Path:
  """Writes `params` (a pytree of arrays) and `metadata` (JSON-serialisable) to `directory`,
  with copies of `extra_files` (e.g. a tokenizer's vocab.json and merges.txt) beside them.

  Returns the absolute path written. Raises FileExistsError if it exists and not `overwrite`.
  """
  directory = pathlib.Path(directory).absolute()
  if directory.exists() and not overwrite:
    raise FileExistsError(f'{directory} exists: pass overwrite=True (--overwrite) or choose '
                          'another output directory.')
  text = json.dumps(metadata or {}, indent=1, sort_keys=True)  # Fails early if not JSON.
  directory.parent.mkdir(parents=True, exist_ok=True)
  tmp = files.make_temp_dir_beside(directory)  # the umask's mode, unlike mkdtemp's 0700
  try:
    params = jax.tree.map(np.asarray, params)
    with ocp.PyTreeCheckpointer() as ckptr:
      ckptr.save(tmp / 'params', params)
    (tmp / 'metadata.json').write_text(text)
    for f in extra_files:
      shutil.copyfile(f, tmp / pathlib.Path(f).name)
    if directory.exists():
      old = tmp.with_name(tmp.name + '-old')
      os.replace(directory, old)
      os.replace(tmp, directory)
      shutil.rmtree(old)
    else:
      os.replace(tmp, directory)
  finally:
    if tmp.exists():
      shutil.rmtree(tmp)
  return directory


def load_params(directory: str | os.PathLike) -> tuple[Any, dict]:
  """(params as nested dicts of numpy arrays, metadata) from a `save_params` directory."""
  directory = pathlib.Path(directory).absolute()
  if not (directory / 'params').is_dir() or not (directory / 'metadata.json').is_file():
    raise FileNotFoundError(
        f'{directory} is not a parameter checkpoint (expected params/ and metadata.json in it). '
        'Create one with `python -m otseg_jax.convert` or point to the right directory.')
  try:
    metadata = json.loads((directory / 'metadata.json').read_text())
    with ocp.PyTreeCheckpointer() as ckptr:
      params = ckptr.restore(directory / 'params')
  except Exception as e:  # orbax and json raise many types; all mean the same to the caller.
    # tensorstore appends its whole JSON spec (~1 KB) to the reason: the reason is enough.
    reason = ' '.join(str(e).split(' [tensorstore_spec=')[0].split())
    raise ValueError(f'{directory} is corrupt or unreadable ({type(e).__name__}: {reason}). '
                     'Re-create it with `python -m otseg_jax.convert`.') from e
  return jax.tree.map(np.asarray, params), metadata


def describe_unreadable(step_dir: str | os.PathLike, error: BaseException) -> str:
  """'FILE (what is wrong)' for a training checkpoint step that failed to restore with `error`.

  orbax's messages are long, a tensorstore error names the database directory but not the
  truncated file, and a JSON parse error names no file at all, so the file is found here: one
  named in the messages of the error's chain, else the file whose size a short read reports, else
  the first JSON file that does not parse (orbax's metadata files are JSON whatever their name),
  else the step directory.
  """
  step_dir = pathlib.Path(step_dir)
  messages = []
  seen = set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    messages.append(' '.join(str(error).split()))
    error = error.__cause__ or error.__context__
  # The innermost error is the one that says what went wrong (orbax wraps it in generic ones).
  reason = messages[-1][:300]
  text = ' '.join(messages)
  files = sorted(p for p in step_dir.rglob('*') if p.is_file())
  for path in files:
    if str(path) in text:
      return f'{path} ({reason})'
  sizes = [int(n) for n in re.findall(r'value of size (\d+)', text)]
  for path in files:
    if path.stat().st_size in sizes:
      return f'{path} (truncated: {reason})'
  for path in files:
    with open(path, 'rb') as f:  # the first byte only: array files may be gigabytes
      if f.read(1) not in (b'{', b'['):
        continue
    try:
      json.loads(path.read_bytes())
    except ValueError as e:
      return f'{path} (not valid JSON: {e})'
  return f'{step_dir} ({reason})'
