r"""A tiny CLIP, contrastively pretrained on the synthetic world: the embedded default's CLIP.

  python -m otseg_jax.data.synthetic_clip --out demo_output/clip [--steps 600] [--seed 0]

OTSeg keeps a pretrained CLIP frozen and recognises unseen classes because CLIP already knows their
names. This module makes that CLIP for the synthetic world (otseg_jax.data.synthetic), in a few
minutes on a CPU, so the demo runs the real recipe in miniature:

- Both towers are `clip.VisionTransformer` / `clip.TextTransformer` (the real architecture, small:
  ViT patch 8 at 64 px, width 64, 3 blocks; a causal text transformer of width 64, 2 blocks).
- Data: images of 1-2 regions rendered by `synthetic.render` from its own 'pretrain' split (never
  a segmentation image), every class of the 12 included (as real CLIP saw every concept: which
  classes are unseen is a property of the segmentation benchmark, not of CLIP). Each caption
  names the classes present (regions of at least 5 % of the image, in random order) in one of
  several templates ('a photo of a {}.', 'there are {}.', ...; "red horizontal stripes and blue
  diagonal stripes").
- Loss: symmetric InfoNCE over the batch with a learned temperature (CLIP's), AdamW (optax).
- Tokenizer: a real `transformers.CLIPTokenizer` over a byte-level BPE learned here from the
  world's words (templates, class names, "and", punctuation): each word is one token, any other
  text falls back to byte tokens. EOT is the largest id, as in OpenAI's vocabulary.

The output is a `CLIPModel.save_pretrained`-style directory (config.json, model.safetensors,
tokenizer files), read by `clip_weights.load_clip` like `openai/clip-vit-base-patch16`, plus
pretraining.json: the settings, the loss curve, and the zero-shot figures of the result:
image classification accuracy over the 12 classes (single-region images, CLS embedding vs the
class text averaged over the otseg8 templates) and patch-level segmentation mIoU (each 8 x 8
patch's dense embedding vs the class text, no training) on the segmentation val split.

Deterministic for a seed on a given machine. An --out directory that already holds a CLIP
pretrained with the same settings is reused; one with other settings is refused.
"""

import argparse
import collections
import concurrent.futures
import dataclasses
import json
import os
import pathlib
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Iterable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from otseg_jax import classes as classes_lib
from otseg_jax.data import synthetic
from otseg_jax.data import transforms
from otseg_jax.models import clip

# Caption templates; '{}' is the list of classes present. The otseg8 prompt templates are among
# them, as "a photo of a ..." is among real CLIP's web captions.
CAPTION_TEMPLATES = classes_lib.templates('otseg8') + (
    '{}.', 'an image of {}.', 'there are {}.', 'a picture with {}.', 'a pattern of {}.')
SOT, EOT = '<|startoftext|>', '<|endoftext|>'
# A class is named in the caption when its region covers at least this fraction of the image.
MIN_AREA = 0.05
TEMPLATES = 'otseg8'  # the prompt templates of the zero-shot evaluation (and of configs/synthetic.py)


@dataclasses.dataclass(frozen=True)
class PretrainConfig:
  """The CLIP's architecture and its pretraining recipe."""
  image_size: int = 64
  patch_size: int = 8
  vision_width: int = 64
  vision_layers: int = 3
  vision_heads: int = 4
  text_width: int = 64
  text_layers: int = 2
  text_heads: int = 4
  embed_dim: int = 64
  context_length: int = 24
  # Measured (README): 600 steps of 64 at lr 2e-3 with half the images single-region reach 100 %
  # zero-shot accuracy. With 1-4 regions per image (600 steps of 64 at lr 1e-3 or 3e-3) both towers
  # still confused horizontal with vertical stripes: 73 %.
  steps: int = 600
  batch_size: int = 64
  lr: float = 2e-3
  warmup_steps: int = 50
  weight_decay: float = 0.1
  max_regions: int = 2  # images of 1 or 2 regions
  seed: int = 0
  eval_images: int = 240  # single-region images for the zero-shot classification accuracy
  eval_seg_images: int = 64  # images of the segmentation val split for the patch-level mIoU


# ---------------------------------------------------------------------------------------------
# Tokenizer: a byte-level BPE over the world's words, as a transformers CLIPTokenizer.


def bytes_to_unicode() -> dict[int, str]:
  """OpenAI's byte -> printable character table (clip/simple_tokenizer.py), the BPE's alphabet."""
  bs = (list(range(ord('!'), ord('~') + 1)) + list(range(ord('¡'), ord('¬') + 1)) +
        list(range(ord('®'), ord('ÿ') + 1)))
  cs = bs[:]
  n = 0
  for b in range(2**8):
    if b not in bs:
      bs.append(b)
      cs.append(2**8 + n)
      n += 1
  return dict(zip(bs, [chr(c) for c in cs]))


def corpus_words() -> list[str]:
  """Every word the captions and the class prompts use, split as CLIP's pre-tokenizer splits."""
  text = ' '.join(CAPTION_TEMPLATES + synthetic.class_names() + ('and ,',))
  return sorted(set(re.findall(r'[a-z]+|[^\sa-z0-9{}]+', text.lower())))


def _merge(symbols: list[str], pair: tuple[str, str]) -> list[str]:
  out, i = [], 0
  while i < len(symbols):
    if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == pair:
      out.append(symbols[i] + symbols[i + 1])
      i += 2
    else:
      out.append(symbols[i])
      i += 1
  return out


def learn_bpe(words: Iterable[str]) -> list[tuple[str, str]]:
  """BPE merges (Sennrich et al.) until every word is one symbol: the most frequent adjacent pair
  first, ties broken by the pair's sort order (deterministic). The last symbol of a word carries
  '</w>', as in CLIP's BPE."""
  alphabet = bytes_to_unicode()
  words = {w: [alphabet[b] for b in w.encode('utf-8')] for w in sorted(set(words))}
  for symbols in words.values():
    symbols[-1] += '</w>'
  merges = []
  while True:
    counts = collections.Counter(p for s in words.values() for p in zip(s, s[1:]))
    if not counts:
      return merges
    pair = max(sorted(counts), key=counts.__getitem__)
    merges.append(pair)
    words = {w: _merge(s, pair) for w, s in words.items()}


def vocabulary() -> tuple[dict[str, int], list[tuple[str, str]]]:
  """(token -> id, BPE merges) of the world's tokenizer, in OpenAI's layout: the 256 byte
  characters, the same with '</w>', the merged symbols in merge order, then SOT and EOT, so EOT is
  the largest id. A model holding the text tower (a learned-text method) reads its size."""
  merges = learn_bpe(corpus_words())
  base = list(bytes_to_unicode().values())
  vocab = {}
  for token in base + [b + '</w>' for b in base] + [a + b for a, b in merges] + [SOT, EOT]:
    vocab.setdefault(token, len(vocab))
  return vocab, merges


def write_tokenizer(directory) -> Any:
  """Writes vocab.json + merges.txt of the world's BPE (`vocabulary`) into `directory`, loads them
  as a `transformers.CLIPTokenizer`, saves that too (tokenizer_config.json, ...) and returns it."""
  import transformers  # pylint: disable=g-import-not-at-top
  directory = pathlib.Path(directory)
  vocab, merges = vocabulary()
  (directory / 'vocab.json').write_text(json.dumps(vocab, ensure_ascii=False), encoding='utf-8')
  (directory / 'merges.txt').write_text(
      '#version: 0.2\n' + ''.join(f'{a} {b}\n' for a, b in merges), encoding='utf-8')
  tokenizer = transformers.CLIPTokenizer.from_pretrained(str(directory))
  if tokenizer.eos_token_id != len(vocab) - 1:
    raise AssertionError(f'EOT id {tokenizer.eos_token_id} is not the largest id {len(vocab) - 1}.')
  tokenizer.save_pretrained(str(directory))
  return tokenizer


def tokenize(tokenizer, texts: Sequence[str], context_length: int) -> np.ndarray:
  """(B, context_length) int32 ids, EOT-padded; refuses a caption that does not fit."""
  ids = tokenizer(list(texts), padding='max_length', max_length=context_length,
                  truncation=False, return_tensors='np')['input_ids']
  if ids.shape[1] != context_length:
    long = max(texts, key=len)
    raise ValueError(f'A caption needs {ids.shape[1]} tokens, more than context_length='
                     f'{context_length} ({long!r}); raise PretrainConfig.context_length.')
  return ids.astype(np.int32)


# ---------------------------------------------------------------------------------------------
# Data: rendered images and the captions that name their classes.


def name_list(names: Sequence[str]) -> str:
  """'a', 'a and b', 'a, b and c'."""
  return names[0] if len(names) == 1 else ', '.join(names[:-1]) + ' and ' + names[-1]


def caption(label: np.ndarray, rng: np.random.Generator) -> str:
  """A caption naming the classes of `label` (S, S) that cover >= MIN_AREA, in random order."""
  counts = np.bincount(label.ravel(), minlength=synthetic.NUM_CLASSES)
  present = [k for k in np.flatnonzero(counts) if counts[k] >= MIN_AREA * label.size]
  present = present or [int(counts.argmax())]
  names = [synthetic.class_names()[k] for k in rng.permutation(present)]
  return CAPTION_TEMPLATES[rng.integers(len(CAPTION_TEMPLATES))].format(name_list(names))


def world(config: PretrainConfig) -> synthetic.SyntheticConfig:
  """The synthetic world the CLIP sees: 1-`max_regions` regions, its own seed."""
  return synthetic.SyntheticConfig(image_size=config.image_size, seed=config.seed, min_regions=1,
                                   max_regions=config.max_regions)


def make_batch(config: PretrainConfig, step: int, tokenizer) -> dict[str, np.ndarray]:
  """Batch `step` of the pretraining stream, a pure function of (config, step).

  Returns {'image': (B, S, S, 3) float32 normalised as the segmentation pipeline does,
  'tokens': (B, L) int32, 'captions': list of B str}.
  """
  source = world(config)
  rng = np.random.default_rng([config.seed, 7, step])
  records = [synthetic.render(source, 'pretrain', step * config.batch_size + i)
             for i in range(config.batch_size)]
  captions = [caption(r['label'], rng) for r in records]
  return {'image': np.stack([transforms.normalize(r['image']) for r in records]),
          'tokens': tokenize(tokenizer, captions, config.context_length), 'captions': captions}


# ---------------------------------------------------------------------------------------------
# Model and loss.


def clip_spec(config: PretrainConfig, vocab_size: int) -> clip.CLIPSpec:
  return clip.CLIPSpec(
      embed_dim=config.embed_dim, image_size=(config.image_size, config.image_size),
      patch_size=config.patch_size, vision_width=config.vision_width,
      vision_layers=config.vision_layers, vision_heads=config.vision_heads,
      context_length=config.context_length, vocab_size=vocab_size, text_width=config.text_width,
      text_layers=config.text_layers, text_heads=config.text_heads,
      vision_mlp_dim=4 * config.vision_width, text_mlp_dim=4 * config.text_width)


def init_params(spec: clip.CLIPSpec, seed: int) -> dict[str, Any]:
  """{'visual', 'text', 'logit_scale' (log of the inverse temperature, CLIP's init 1 / 0.07)}."""
  kv, kt = jax.random.split(jax.random.PRNGKey(seed))
  s = spec.image_size
  visual = spec.vision_tower().init(kv, jnp.zeros((1, *s, 3)))['params']
  text = spec.text_tower().init(kt, jnp.zeros((1, spec.context_length), jnp.int32))['params']
  return {'visual': visual, 'text': text, 'logit_scale': jnp.asarray(np.log(1 / 0.07), jnp.float32)}


def l2_normalize(x: jax.Array) -> jax.Array:
  return x / jnp.linalg.norm(x, axis=-1, keepdims=True)


def contrastive_loss(params: Any, images: jax.Array, tokens: jax.Array, *,
                     spec: clip.CLIPSpec) -> tuple[jax.Array, jax.Array]:
  """Symmetric InfoNCE of a batch of (image, caption) pairs.

  images (B, S, S, 3), tokens (B, L) -> (loss, logit scale). Row b of the (B, B) logits is image b
  against every caption; the pair (b, b) is the positive, in both directions.
  """
  img, _, _ = spec.vision_tower().apply({'params': params['visual']}, images)
  txt = spec.text_tower().apply({'params': params['text']}, tokens)
  # CLIP clips the inverse temperature at 100 for stability.
  scale = jnp.exp(jnp.minimum(params['logit_scale'], np.log(100.0)))
  logits = scale * jnp.einsum('bc,dc->bd', l2_normalize(img), l2_normalize(txt))
  labels = jnp.arange(logits.shape[0])
  loss = 0.5 * (optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean() +
                optax.softmax_cross_entropy_with_integer_labels(logits.T, labels).mean())
  return loss, scale


def make_optimizer(config: PretrainConfig) -> optax.GradientTransformation:
  """AdamW, linear warm-up then cosine decay; no weight decay on gains, biases and the temperature
  (only on matrices)."""
  schedule = optax.warmup_cosine_decay_schedule(0.0, config.lr, config.warmup_steps,
                                                max(config.steps, config.warmup_steps + 1))
  decay_mask = lambda params: jax.tree.map(lambda x: x.ndim >= 2, params)
  return optax.chain(optax.clip_by_global_norm(1.0),
                     optax.adamw(schedule, b1=0.9, b2=0.98, eps=1e-6,
                                 weight_decay=config.weight_decay, mask=decay_mask))


def _format_eta(seconds: float) -> str:
  m, s = divmod(int(max(seconds, 0)), 60)
  return f'{m}m{s:02d}s'


def pretrain(config: PretrainConfig, tokenizer, *, log_every: int = 25,
             progress: bool = True) -> tuple[clip.CLIPSpec, dict[str, Any], list[dict]]:
  """Trains both towers from scratch for `config.steps` steps.

  Returns (spec, params as numpy {'visual', 'text', 'logit_scale'}, history: one
  {'step', 'loss', 'logit_scale'} per log step, the loss averaged since the previous one).
  """
  spec = clip_spec(config, len(tokenizer))
  params = init_params(spec, config.seed)
  tx = make_optimizer(config)
  opt_state = tx.init(params)

  @jax.jit
  def step_fn(params, opt_state, images, tokens):
    (loss, scale), grads = jax.value_and_grad(
        lambda p: contrastive_loss(p, images, tokens, spec=spec), has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss, scale

  history, window, start = [], [], time.time()
  # The next batch is rendered in a thread while the step runs (numpy and XLA release the GIL).
  with concurrent.futures.ThreadPoolExecutor(1) as pool:
    upcoming = pool.submit(make_batch, config, 0, tokenizer)
    for step in range(1, config.steps + 1):
      batch = upcoming.result()
      if step < config.steps:
        upcoming = pool.submit(make_batch, config, step, tokenizer)
      params, opt_state, loss, scale = step_fn(params, opt_state, batch['image'], batch['tokens'])
      window.append(loss)
      if step % log_every == 0 or step == config.steps:
        mean = float(np.mean(jax.device_get(window)))
        if not np.isfinite(mean):
          raise FloatingPointError(f'CLIP pretraining loss is {mean} at step {step}; lower --lr.')
        history.append({'step': step, 'loss': mean, 'logit_scale': float(scale)})
        window = []
        if progress:
          elapsed = time.time() - start
          eta = elapsed / step * (config.steps - step)
          print(f'CLIP pretraining step {step}/{config.steps} loss {mean:.3f} '
                f'1/T {float(scale):.1f} {step / elapsed:.2f} steps/s ETA {_format_eta(eta)}',
                file=sys.stderr, flush=True)
  return spec, jax.tree.map(np.asarray, params), history


# ---------------------------------------------------------------------------------------------
# Zero-shot evaluation: classification and patch-level segmentation.


def class_text(spec: clip.CLIPSpec, params: Any, tokenizer,
               templates: str = TEMPLATES) -> np.ndarray:
  """(K, C) L2-normalised class embeddings: the text tower over `templates`, averaged."""
  from otseg_jax import text_embeddings  # pylint: disable=g-import-not-at-top
  text = text_embeddings.compute_text_embeddings(
      spec, params, tokenizer, list(synthetic.class_names()),
      text_embeddings.read_templates(templates))  # (K, N, C)
  mean = text.mean(axis=1)
  return mean / np.linalg.norm(mean, axis=-1, keepdims=True)


def zero_shot(config: PretrainConfig, spec: clip.CLIPSpec, params: Any, tokenizer,
              seg_world: synthetic.SyntheticConfig | None = None) -> dict[str, Any]:
  """Zero-shot figures of a CLIP, as percentages.

  'accuracy': image classification over the 12 classes on `eval_images` single-region images of
  the 'pretrain_val' split (argmax of CLS embedding . class text). 'patch_mIoU' (and seen / unseen
  / per class): every patch's dense embedding classified the same way, upsampled to pixels, on the
  first `eval_seg_images` images of the segmentation val split of `seg_world` (the default
  synthetic world at the CLIP's image size if None). 'chance_mIoU': uniformly random labels.
  """
  from otseg_jax import metrics  # pylint: disable=g-import-not-at-top
  text = class_text(spec, params, tokenizer)
  tower = spec.vision_tower()
  encode = jax.jit(lambda images: tower.apply({'params': params['visual']}, images)[:2])

  def features(records):
    images = np.stack([transforms.normalize(r['image']) for r in records])
    cls, dense = jax.device_get(encode(images))
    return (cls / np.linalg.norm(cls, axis=-1, keepdims=True),
            dense / np.linalg.norm(dense, axis=-1, keepdims=True))

  single = dataclasses.replace(world(config), max_regions=1)
  records = [synthetic.render(single, 'pretrain_val', i) for i in range(config.eval_images)]
  cls, _ = features(records)
  truth = np.asarray([r['label'][0, 0] for r in records])
  accuracy = float(np.mean((cls @ text.T).argmax(-1) == truth) * 100)

  seg_world = seg_world or synthetic.SyntheticConfig(image_size=config.image_size)
  records = [synthetic.render(seg_world, 'val', i) for i in range(config.eval_seg_images)]
  _, dense = features(records)  # (B, h, w, C)
  pred = np.einsum('bhwc,kc->bhwk', dense, text).argmax(-1)
  p = spec.patch_size
  pred = pred.repeat(p, axis=1).repeat(p, axis=2)  # each patch's class on its p x p pixels
  labels = np.stack([r['label'] for r in records])
  k = synthetic.NUM_CLASSES
  confusion = metrics.confusion_matrix(pred, labels, k)
  names, unseen = synthetic.class_names(), seg_world.unseen
  seg = metrics.summarize(confusion, names, unseen)
  chance = synthetic.chance_iou(dataclasses.replace(seg_world, num_val=config.eval_seg_images))
  return {
      'accuracy': accuracy, 'accuracy_images': len(truth),
      'patch_mIoU': seg['mIoU'], 'patch_seen_mIoU': seg['seen_mIoU'],
      'patch_unseen_mIoU': seg['unseen_mIoU'], 'unseen': list(unseen),
      'patch_per_class_iou': {r['name']: r['iou'] for r in seg['per_class']},
      'segmentation_images': len(records),
      'chance_accuracy': 100 / k, 'chance_mIoU': float(chance['per_class'].mean() * 100),
  }


# ---------------------------------------------------------------------------------------------
# The directory.


def settings(config: PretrainConfig) -> dict[str, Any]:
  return dataclasses.asdict(config)


def is_complete(out) -> bool:
  out = pathlib.Path(out)
  return all((out / n).is_file() for n in ('config.json', 'model.safetensors', 'vocab.json',
                                           'merges.txt', 'pretraining.json'))


def write_pretrained(out, config: PretrainConfig, *, log_every: int = 25,
                     progress: bool = True) -> dict[str, Any]:
  """Pretrains, evaluates and writes the HF directory `out` atomically (built in a temporary
  directory beside it, then renamed). Returns the contents of out/pretraining.json."""
  from otseg_jax.models import clip_export  # pylint: disable=g-import-not-at-top
  out = pathlib.Path(out).expanduser().absolute()
  if out.exists() and (not out.is_dir() or any(out.iterdir())):
    raise ValueError(f'{out} exists and is not an empty directory: choose another --out or remove '
                     'it (nothing there is overwritten).')
  out.parent.mkdir(parents=True, exist_ok=True)
  tmp = pathlib.Path(tempfile.mkdtemp(dir=out.parent, prefix=f'.{out.name}.', suffix='.tmp'))
  try:
    start = time.time()
    tokenizer = write_tokenizer(tmp)
    spec, params, history = pretrain(config, tokenizer, log_every=log_every, progress=progress)
    seconds = time.time() - start
    towers = {'visual': params['visual'], 'text': params['text']}
    clip_export.save_hf_clip(tmp, spec, towers, float(params['logit_scale']),
                             bos_token_id=tokenizer.bos_token_id,
                             eos_token_id=tokenizer.eos_token_id,
                             pad_token_id=tokenizer.pad_token_id)
    report = {'settings': settings(config), 'pretraining_seconds': round(seconds, 1),
              'loss_first': history[0]['loss'], 'loss_last': history[-1]['loss'],
              'history': history, 'zero_shot': zero_shot(config, spec, towers, tokenizer),
              'templates': TEMPLATES}
    (tmp / 'pretraining.json').write_text(json.dumps(report, indent=2) + '\n')
    os.replace(tmp, out)  # fails unless `out` is absent or an empty directory
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return report


def ensure_pretrained(out, config: PretrainConfig, **kwargs) -> dict[str, Any]:
  """`write_pretrained` unless `out` already holds a CLIP pretrained with the same settings (then
  its pretraining.json). Refuses a complete directory of other settings, naming the fix."""
  out = pathlib.Path(out).expanduser()
  if is_complete(out):
    report = json.loads((out / 'pretraining.json').read_text())
    if report.get('settings') != settings(config):
      differ = sorted(k for k, v in settings(config).items()
                      if report.get('settings', {}).get(k) != v)
      raise ValueError(f'{out} holds a CLIP pretrained with other settings ({", ".join(differ)}); '
                       'remove it or choose another --out.')
    return report
  return write_pretrained(out, config, **kwargs)


def format_report(report: dict[str, Any]) -> str:
  z = report['zero_shot']
  return (f"zero-shot accuracy {z['accuracy']:.1f} % over 12 classes (chance "
          f"{z['chance_accuracy']:.1f}); patch-level mIoU {z['patch_mIoU']:.1f} (seen "
          f"{z['patch_seen_mIoU']:.1f}, unseen {z['patch_unseen_mIoU']:.1f}; chance "
          f"{z['chance_mIoU']:.1f}); loss {report['loss_first']:.3f} -> {report['loss_last']:.3f}")


def main(argv: Sequence[str] | None = None) -> None:
  defaults = PretrainConfig()
  p = argparse.ArgumentParser(prog='python -m otseg_jax.data.synthetic_clip',
                              description='Pretrains a tiny CLIP on the synthetic world and '
                              'writes it as an HF CLIP directory.')
  p.add_argument('--out', required=True, help='output directory (reused if already complete).')
  p.add_argument('--steps', type=int, default=defaults.steps)
  p.add_argument('--batch-size', type=int, default=defaults.batch_size)
  p.add_argument('--lr', type=float, default=defaults.lr)
  p.add_argument('--seed', type=int, default=defaults.seed)
  args = p.parse_args(argv)
  if args.steps <= 0 or args.batch_size <= 1 or args.lr <= 0:
    p.error('--steps and --lr must be positive and --batch-size at least 2 (contrastive pairs).')
  config = dataclasses.replace(defaults, steps=args.steps, batch_size=args.batch_size,
                               lr=args.lr, seed=args.seed)
  out = pathlib.Path(args.out)
  reused = is_complete(out)
  try:
    report = ensure_pretrained(out, config)
  except ValueError as e:
    p.error(str(e))
  print(f'{"Reused" if reused else "Wrote"} {out}: {format_report(report)}', flush=True)


if __name__ == '__main__':
  main()
