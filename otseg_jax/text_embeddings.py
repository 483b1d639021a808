"""Per-class prompt embeddings from the CLIP text tower (spec section 3), and the command for them.

  python -m otseg_jax.text_embeddings --clip openai/clip-vit-base-patch16 --dataset voc12 \\
      --out voc12_otseg.npy

The result is a (K, N, C) float32 array: for each of K class names and N templates, the CLIP text
feature of `template.format(name)` (EOT token after ln_final, @ text_projection), L2-normalised.
"""

import argparse
import io
import os
import pathlib
import sys
from collections.abc import Sequence
from typing import Any

from absl import logging
import jax
import ml_collections
import numpy as np

from otseg_jax import classes as classes_lib
from otseg_jax import cli
from otseg_jax import files
from otseg_jax import tokenizer as tokenizer_lib
from otseg_jax.data import loading
from otseg_jax.data import synthetic
from otseg_jax.models import clip_weights


def check_prompts(class_names: Sequence[str], templates: Sequence[str]) -> None:
  """Raises ValueError for an empty class list, no templates, or a template without '{}'."""
  if not class_names:
    raise ValueError('The class list is empty: give at least one class name.')
  if not templates:
    raise ValueError('No prompt templates: give at least one, e.g. "a photo of a {}.".')
  bad = [t for t in templates if '{}' not in t]
  if bad:
    raise ValueError(f'Templates must contain "{{}}" where the class name goes; these do not: '
                     f'{bad}.')


# How far a row's L2 norm may be from 1 before a warning: float16 storage alone is off by ~1e-3.
UNIT_NORM_TOLERANCE = 1e-2


def check_text_embeddings(text: np.ndarray, source, class_names: Sequence[str] = ()) -> None:
  """The one check of class text, wherever it is loaded or computed (train, eval, predict).

  Raises ValueError naming `source` and the first class (index and name) with a NaN or infinite
  value: such text turns every score of its class into garbage, which training would only report
  later as a diverging loss. Logs a warning, only, if rows of the (K, N, C) `text` are not unit
  length within UNIT_NORM_TOLERANCE: the model expects L2-normalised prompts.
  """
  text = np.asarray(text)
  bad = ~np.isfinite(text.reshape(len(text), -1)).all(axis=1)
  if bad.any():
    k = int(np.argmax(bad))
    name = f' ({class_names[k]!r})' if k < len(class_names) else ''
    raise ValueError(f'Text embeddings from {source}: class {k}{name} has NaN or infinite values '
                     f'({int(bad.sum())} of {len(text)} classes do). Recompute them (python -m '
                     'otseg_jax.text_embeddings) from CLIP weights without NaN.')
  norms = np.linalg.norm(text.astype(np.float64), axis=-1)
  off = int((np.abs(norms - 1) > UNIT_NORM_TOLERANCE).sum())
  if off:
    worst = np.unravel_index(np.argmax(np.abs(norms - 1)), norms.shape)
    logging.warning(
        'Text embeddings from %s: %d of %d rows are not unit length (worst: class %d, norm %.4g); '
        'the model expects L2-normalised embeddings.', source, off, norms.size, worst[0],
        norms[worst])


def compute_text_embeddings(spec: clip_weights.CLIPSpec, params, tokenizer,
                            class_names: Sequence[str], templates: Sequence[str],
                            batch_size: int = 256, progress: bool = False) -> np.ndarray:
  """CLIP text features of every (class, template) prompt.

  Args:
    spec, params: from `clip_weights.load_clip` (only `params['text']` is read).
    tokenizer: from `tokenizer.load_tokenizer`.
    class_names: K names; templates: N strings with '{}'.
    batch_size: prompts per text-tower call (the last batch is padded, so one compilation).
    progress: show a progress bar.

  Returns:
    (K, N, C) float32, each (k, n) row L2-normalised.
  """
  check_prompts(class_names, templates)
  texts = [t.format(name) for name in class_names for t in templates]
  # Only up to the longest EOT: the causal tower's features do not depend on the padding.
  tokens = truncate_tokens(tokenizer_lib.tokenize(tokenizer, texts, spec.context_length))
  model = spec.text_tower()
  encode = jax.jit(lambda p, ids: model.apply({'params': p}, ids))
  batch = min(batch_size, len(tokens))
  feats = []
  import tqdm
  with tqdm.tqdm(total=len(tokens), unit='prompt', disable=not progress, file=sys.stderr) as bar:
    for start in range(0, len(tokens), batch):
      chunk = tokens[start:start + batch]
      padded = np.concatenate([chunk, np.repeat(chunk[:1], batch - len(chunk), axis=0)])
      feats.append(np.asarray(encode(params['text'], padded), np.float32)[:len(chunk)])
      bar.update(len(chunk))
  feats = np.concatenate(feats)
  feats = feats / np.linalg.norm(feats, axis=-1, keepdims=True)
  return feats.reshape(len(class_names), len(templates), -1).astype(np.float32)


def load_text_embeddings(config: ml_collections.ConfigDict, class_names: Sequence[str],
                         clip: tuple[clip_weights.CLIPSpec, Any] | None = None) -> np.ndarray:
  """(K, N, C) float32 text embeddings of `class_names` (every class of the dataset).

  From `config.text_embeddings` (.npy) if set; else computed with the CLIP text tower of
  `config.clip` (`clip`: the run's `load_clip(config.clip)` if already loaded) over
  `config.templates` (a template set name or file); else, for the synthetic dataset only, its own
  embeddings. Refuses an array whose shape does not fit the dataset (class count) or the model
  (prompt count, embedding width), naming both, before anything expensive runs.
  """
  source = config.text_embeddings
  if source:
    path = pathlib.Path(source).expanduser()
    if not path.is_file():
      raise FileNotFoundError(f'config.text_embeddings={source!r}: no such file. Point it at a '
                              f'(K, N, C) .npy of the {config.dataset} classes, or set it to \'\' to '
                              'compute the embeddings with the CLIP text tower (config.clip).')
    text = read_npy(path)
  elif config.clip:
    spec, clip_params = clip or clip_weights.load_clip(config.clip)
    tokenizer = _tokenizer_of(config)
    text = np.asarray(compute_text_embeddings(
        spec, clip_params, tokenizer, list(class_names),
        read_templates(config.templates)), np.float32)
    source = f'CLIP {config.clip} with templates {config.templates}'
  elif config.data.name == 'synthetic':
    text = synthetic.text_embeddings(loading.synthetic_config(config)).astype(np.float32)
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
  check_text_embeddings(text, source, class_names)
  return text


def load_text_input(config: ml_collections.ConfigDict, class_names: Sequence[str],
                    clip: tuple[clip_weights.CLIPSpec, Any] | None = None) -> np.ndarray:
  """The class text input the method asks for (`config.model.text`), for every class.

  'embeddings': (K, N, C) float32, `load_text_embeddings`. 'tokens': (K, L) int32 ids of
  `config.model.text_template` filled with each name, for a prompt learner run through the frozen
  text tower inside the model; L is the longest EOT position + 1 (`class_tokens`).
  """
  if config.model.text == 'embeddings':
    return load_text_embeddings(config, class_names, clip)
  if config.model.text == 'tokens':
    if not config.clip:
      raise ValueError('config.model.text=tokens needs config.clip: the tokenizer and the text '
                       'tower the prompts go through.')
    tokenizer = _tokenizer_of(config)
    spec = clip[0] if clip else clip_weights.load_clip(config.clip)[0]
    tokens = class_tokens(tokenizer, class_names, config.model.text_template,
                          spec.context_length)
    logging.info('Class tokens %s of %r.', tokens.shape, config.model.text_template)
    return tokens
  raise ValueError(f"config.model.text={config.model.text!r}: use 'embeddings' or 'tokens'.")


def class_tokens(tokenizer, class_names: Sequence[str], template: str,
                 context_length: int = 77) -> np.ndarray:
  """(K, L) int32 ids of `template.format(name)`, cut after the longest EOT position.

  The text tower is causal and pools at the EOT token, so the padding after the last EOT changes
  nothing: running L tokens instead of the full context gives the same features.
  """
  check_prompts(class_names, [template])
  tokens = tokenizer_lib.tokenize(tokenizer, [template.format(n) for n in class_names],
                                  context_length)
  return truncate_tokens(tokens)


def truncate_tokens(tokens: np.ndarray) -> np.ndarray:
  """(B, 77) ids -> (B, L), L = 1 + the largest EOT position (EOT is each row's largest id)."""
  return tokens[:, :int(tokens.argmax(-1).max()) + 1]


def _tokenizer_of(config: ml_collections.ConfigDict) -> Any:
  return tokenizer_lib.load_tokenizer(
      tokenizer_lib.tokenizer_source(config.clip, config.get('tokenizer')))


def read_templates(arg: str) -> tuple[str, ...]:
  """'otseg6' | 'otseg8' | a text file with one template per line (blank lines skipped)."""
  if arg in ('otseg6', 'otseg8'):
    return classes_lib.templates(arg)
  try:
    lines = pathlib.Path(arg).read_text(encoding='utf-8').splitlines()
  except (OSError, UnicodeDecodeError) as e:
    raise ValueError(f'Cannot read the template file {arg!r} ({e.__class__.__name__}: {e}); '
                     'pass otseg6, otseg8 or a readable UTF-8 text file, one template per '
                     'line.') from e
  templates = tuple(line.strip() for line in lines if line.strip())
  if not templates:
    raise ValueError(f'The template file {arg!r} holds no templates.')
  return templates


def read_classes_file(path: str) -> tuple[str, ...]:
  try:
    lines = pathlib.Path(path).read_text(encoding='utf-8').splitlines()
  except (OSError, UnicodeDecodeError) as e:
    raise ValueError(f'Cannot read the classes file {path!r} ({e.__class__.__name__}: {e}).') from e
  return tuple(line.strip() for line in lines if line.strip())


def read_npy(path) -> np.ndarray:
  """A text-embeddings array from a .npy file, as float32; every failure is one ValueError that
  names the file. No pickle is loaded, and the size the header declares is checked against the
  file before anything is allocated."""
  path = pathlib.Path(path)
  fix = 'write it with numpy.save or python -m otseg_jax.text_embeddings'
  try:
    with open(path, 'rb') as f:
      version = np.lib.format.read_magic(f)
      read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                     else np.lib.format.read_array_header_2_0)
      shape, _, dtype = read_header(f)
      data_bytes = os.fstat(f.fileno()).st_size - f.tell()
  except OSError:
    raise
  except Exception as e:  # numpy's header parser raises ValueError, SyntaxError, TokenError, ...
    raise ValueError(f'{path}: not a numpy .npy array ({type(e).__name__}: {e}); {fix}.') from e
  if dtype.hasobject or dtype.kind not in 'fiub':
    raise ValueError(f'{path}: holds {dtype} values, not numbers; {fix}.')
  want = int(np.prod(shape)) * dtype.itemsize
  if want != data_bytes:
    raise ValueError(f'{path}: its header declares {shape} {dtype} ({want} bytes) but it holds '
                     f'{data_bytes}: truncated or corrupt; {fix}.')
  return np.load(path, allow_pickle=False).astype(np.float32)


def save_npy_atomic(path, array: np.ndarray) -> None:
  """np.save to `path` atomically (`files.write_atomic`): readers never see half a file."""
  buf = io.BytesIO()
  np.save(buf, array)
  files.write_atomic(path, buf.getvalue())


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog='python -m otseg_jax.text_embeddings',
                              description='Writes (K, N, C) L2-normalised CLIP text embeddings.')
  p.add_argument('--clip', required=True,
                 help='HF CLIP directory, hub id (openai/clip-vit-base-patch16), OpenAI .pt '
                 'file, OpenCLIP directory / weights file with its open_clip_config.json, or a '
                 'python -m otseg_jax.convert directory.')
  p.add_argument('--tokenizer', default=None,
                 help='tokenizer directory or hub id (default: the --clip directory if it has '
                 f'tokenizer files, else {tokenizer_lib.DEFAULT_TOKENIZER}).')
  which = p.add_mutually_exclusive_group(required=True)
  which.add_argument('--dataset', choices=classes_lib.dataset_names())
  which.add_argument('--classes', help='comma-separated class names, e.g. "cat,dog,tree".')
  which.add_argument('--classes-file', help='text file with one class name per line.')
  p.add_argument('--templates', default=None,
                 help='otseg6 | otseg8 | a file with one template per line (default: the '
                 "dataset's set, otseg8 for custom classes).")
  p.add_argument('--out', required=True, help='output .npy path.')
  p.add_argument('--batch-size', type=int, default=256)
  return p


def main(argv: Sequence[str] | None = None) -> None:
  parser = _parser()
  args = parser.parse_args(argv)
  # Check the cheap inputs before loading any weights.
  try:
    if args.dataset:
      dataset = classes_lib.get(args.dataset)
      names, default_templates = dataset.classes, dataset.templates
    elif args.classes is not None:
      names = tuple(c.strip() for c in args.classes.split(',') if c.strip())
      default_templates = 'otseg8'
    else:
      names = read_classes_file(args.classes_file)
      default_templates = 'otseg8'
    templates = read_templates(args.templates or default_templates)
    check_prompts(names, templates)
  except ValueError as e:
    parser.error(str(e))
  if not args.out.endswith('.npy'):
    parser.error(f'--out {args.out!r} must end in .npy.')

  tokenizer_src = tokenizer_lib.tokenizer_source(args.clip, args.tokenizer)
  try:
    spec, params = clip_weights.load_clip(args.clip)
    tokenizer = tokenizer_lib.load_tokenizer(tokenizer_src)
  except (FileNotFoundError, clip_weights.CheckpointError) as e:
    parser.error(str(e))
  print(f'{len(names)} classes x {len(templates)} templates, CLIP {args.clip}, '
        f'tokenizer {tokenizer_src}', file=sys.stderr)
  emb = compute_text_embeddings(spec, params, tokenizer, names, templates,
                                batch_size=args.batch_size, progress=True)
  check_text_embeddings(emb, f'CLIP {args.clip}', names)
  save_npy_atomic(args.out, emb)
  print(f'wrote {args.out}: {emb.shape} {emb.dtype}', file=sys.stderr)


if __name__ == '__main__':
  sys.exit(cli.run('python -m otseg_jax.text_embeddings', main))
