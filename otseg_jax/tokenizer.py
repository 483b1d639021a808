"""CLIP's tokenizer: where it comes from, loading it, and token ids for the text tower.

transformers' `CLIPTokenizer` (OpenAI's BPE); the loader of CLIP's weights is `clip_weights`.
"""

import os
import pathlib
from collections.abc import Sequence

import numpy as np

from otseg_jax.models import clip_weights

# OpenAI's CLIP BPE, the same for every OpenAI CLIP model.
DEFAULT_TOKENIZER = 'openai/clip-vit-base-patch16'


def tokenizer_source(clip_source, tokenizer=None) -> str:
  """Where the tokenizer of `clip_source` comes from: `tokenizer` if given, else the CLIP
  directory when it holds tokenizer files, else the CLIP hub repo, else `DEFAULT_TOKENIZER`."""
  if tokenizer:
    return str(tokenizer)
  path = pathlib.Path(os.path.expanduser(str(clip_source)))
  if has_tokenizer_files(path):
    return str(path)
  if not path.exists() and clip_weights.looks_like_hub_id(str(clip_source)):
    return str(clip_source)  # hub CLIP repos ship their tokenizer
  return DEFAULT_TOKENIZER


def has_tokenizer_files(directory) -> bool:
  d = pathlib.Path(directory)
  return d.is_dir() and ((d / 'vocab.json').is_file() and (d / 'merges.txt').is_file()
                         or (d / 'tokenizer.json').is_file())


def load_tokenizer(path_or_hub_id):
  """transformers' `CLIPTokenizer` from a directory (vocab.json + merges.txt) or a hub id."""
  import transformers
  path = pathlib.Path(os.path.expanduser(str(path_or_hub_id)))
  if path.exists():
    if not has_tokenizer_files(path):
      raise FileNotFoundError(f'{path} holds no tokenizer (vocab.json + merges.txt or '
                              "tokenizer.json); pass --tokenizer openai/clip-vit-base-patch16.")
    return transformers.CLIPTokenizer.from_pretrained(str(path))
  if not clip_weights.looks_like_hub_id(str(path_or_hub_id)):
    raise FileNotFoundError(f'{path}: no such tokenizer directory.')
  return transformers.CLIPTokenizer.from_pretrained(str(path_or_hub_id))


def tokenize(tokenizer, texts: Sequence[str], context_length: int = 77) -> np.ndarray:
  """(B, context_length) int32 ids: SOT, BPE ids, EOT, then padding; truncated to fit, EOT last.

  HF's CLIP tokenizer pads with '<|endoftext|>' (49407, the largest id). Pooling at
  argmax(ids) takes the first maximum, i.e. the real EOT, as with OpenAI's zero padding.
  """
  texts = list(texts)
  if not texts:
    return np.zeros((0, context_length), np.int32)
  ids = tokenizer(texts, padding='max_length', max_length=context_length, truncation=True,
                  return_tensors='np')['input_ids'].astype(np.int32)
  eot = tokenizer.eos_token_id
  first_max = ids[np.arange(len(ids)), ids.argmax(-1)]
  if ids.shape[1] != context_length or np.any(first_max != eot):
    raise ValueError('Tokenizer output unusable for CLIP: every row must be padded to '
                     f'{context_length} with EOT ({eot}) as its largest id.')
  return ids
