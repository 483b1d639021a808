r"""Segments any images into any classes with a trained checkpoint (any method).

  python -m otseg_jax.predict --checkpoint runs/voc12 --image a.jpg b.png \
      --classes "cat,dog,grass" --clip openai/clip-vit-base-patch16 --out predictions/

The class text is computed on the fly: OTSeg's embeddings with the CLIP text tower of --clip (an
HF directory / hub id, an OpenAI .pt, or a `convert --from openai-clip` checkpoint) from the prompt
templates of --templates; a prompt learner's from the tokenized names, in the model. Every class is new to the model, so no seen-class calibration applies.
Images are resized as at evaluation (short side 512 by default), segmented with slide inference
and the labels mapped back to the original size.

Writes, per image: NAME_mask.png (8-bit class index per pixel, in --classes order) and
NAME_overlay.png (image | coloured prediction, with a legend); and classes.json (index -> name).
A file that is not a readable image is reported and skipped; the exit status is then 1, after the
rest of the list is done.
"""

import argparse
import json
import pathlib
import sys
from collections.abc import Sequence

import numpy as np

from otseg_jax import cli


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog='python -m otseg_jax.predict',
                              description=__doc__.split('\n\n')[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--checkpoint', required=True,
                 help='training workdir or parameter checkpoint (params/ + metadata.json).')
  p.add_argument('--image', required=True, nargs='+', help='image files (any size, RGB).')
  p.add_argument('--classes', required=True, help='comma-separated class names.')
  p.add_argument('--clip', default=None,
                 help="CLIP weights for the text tower (default: the checkpoint's config.clip).")
  p.add_argument('--tokenizer', default=None,
                 help='tokenizer directory or hub id (default: --clip if it has one, else '
                 'openai/clip-vit-base-patch16).')
  p.add_argument('--templates', default='otseg8',
                 help='otseg6 | otseg8 | a file with one template per line. Use as many '
                 'templates as the model was trained with prompts for the reference behaviour.')
  p.add_argument('--crop', type=int, default=None, help='slide crop (default: the model size).')
  p.add_argument('--stride', type=int, default=None,
                 help="slide stride (default: the checkpoint config's, else the crop).")
  p.add_argument('--short_side', type=int, default=512,
                 help='resize so the short side is this (0: keep the size).')
  p.add_argument('--out', required=True, help='output directory.')
  return p


def _read_config(checkpoint: pathlib.Path) -> dict:
  """The config stored with a checkpoint: training export / workdir config.json, or convert's."""
  for path in (checkpoint / 'metadata.json', checkpoint / 'config.json',
               checkpoint / 'params' / 'metadata.json'):
    if path.is_file():
      data = json.loads(path.read_text())
      return data.get('config', data) if path.name == 'metadata.json' else data
  return {}


def main(argv: Sequence[str] | None = None) -> int:
  parser = _parser()
  args = parser.parse_args(argv)
  names = tuple(c.strip() for c in args.classes.split(',') if c.strip())
  if not names:
    parser.error('--classes is empty: give comma-separated class names, e.g. "cat,dog,grass".')
  if len(set(names)) != len(names):
    parser.error(f'--classes names a class twice: {args.classes!r}.')
  if len(names) > 255:
    parser.error('At most 255 classes (the mask PNGs are 8-bit).')
  images = [pathlib.Path(p) for p in args.image]
  missing = [str(p) for p in images if not p.is_file()]
  if missing:
    parser.error(f'no such image file(s): {", ".join(missing)}.')
  checkpoint = pathlib.Path(args.checkpoint).expanduser()
  if not checkpoint.exists():
    parser.error(f'--checkpoint {args.checkpoint}: no such directory. Pass a training workdir or '
                 'a parameter checkpoint (python -m otseg_jax.convert writes one).')
  stored = _read_config(checkpoint)
  model_dict = stored.get('model', stored)
  if 'backbone' not in model_dict:
    parser.error(f'{checkpoint} records no model config (metadata.json / config.json); it was not '
                 'written by train.py or otseg_jax.convert.')
  clip_src = args.clip or stored.get('clip')
  if not clip_src:
    parser.error('--clip is required: CLIP weights whose text tower embeds the class names '
                 '(the checkpoint was trained without CLIP, e.g. on the synthetic set).')

  # Heavy imports after the cheap checks.
  import functools  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import ml_collections  # pylint: disable=g-import-not-at-top
  from PIL import Image  # pylint: disable=g-import-not-at-top
  from otseg_jax import inference  # pylint: disable=g-import-not-at-top
  from otseg_jax import models  # pylint: disable=g-import-not-at-top
  from otseg_jax import params as params_lib  # pylint: disable=g-import-not-at-top
  from otseg_jax import reports  # pylint: disable=g-import-not-at-top
  from otseg_jax import text_embeddings  # pylint: disable=g-import-not-at-top
  from otseg_jax import tokenizer as tokenizer_lib  # pylint: disable=g-import-not-at-top
  from otseg_jax.data import transforms  # pylint: disable=g-import-not-at-top
  from otseg_jax.models import clip_weights  # pylint: disable=g-import-not-at-top

  if 'trainable' not in model_dict:
    # Written before the method seam (no method names its trainable parameters): an OTSeg
    # checkpoint, whose `name` was its variant.
    model_dict = dict(model_dict, name='otseg', variant=model_dict.get('name', 'voc'))
  method = models.get_method(model_dict['name'])
  model_config = method.get_config()
  model_config.update(ml_collections.ConfigDict(model_dict))
  try:
    templates = text_embeddings.read_templates(args.templates)
    text_embeddings.check_prompts(names, templates)
    params = params_lib.load_params_any(checkpoint)
    spec, clip_params = clip_weights.load_clip(clip_src)
    tokenizer_src = tokenizer_lib.tokenizer_source(clip_src, args.tokenizer)
    tokenizer = tokenizer_lib.load_tokenizer(tokenizer_src)
  except (ValueError, FileNotFoundError) as e:
    parser.error(str(e))
  # The class text input the method asks for, for the given names.
  if model_config.text == 'tokens':
    text_input = text_embeddings.class_tokens(tokenizer, names, model_config.text_template,
                                              spec.context_length)
  else:
    text_input = text_embeddings.compute_text_embeddings(spec, clip_params, tokenizer, names,
                                                         templates)
    text_embeddings.check_text_embeddings(text_input, f'--clip {clip_src}', names)
    if text_input.shape[-1] != model_config.backbone.output_dim:
      parser.error(f'--clip {clip_src} embeds text in {text_input.shape[-1]} dimensions but the '
                   f'model in {checkpoint} in {model_config.backbone.output_dim}: use the CLIP '
                   'it was trained with.')
  model = method.model_from_config(model_config)
  crop = args.crop or model_config.image_size
  stride = args.stride or stored.get('eval', {}).get('stride') or crop
  stride = min(stride, crop)
  # Every class is new to the model: none is seen, so no seen-class calibration applies.
  predictor = inference.SlideEvaluator(
      model, params, models.encode_text(model, params, text_input), np.zeros(len(names), bool),
      probabilities=functools.partial(method.eval_probabilities, config=model_config),
      crop_size=crop, stride=stride, batch_size=max(8, jax.local_device_count()))

  failed = []

  def stream():
    for path in images:
      # One unreadable file must not cost the rest of the list: report it, go on, fail at the end.
      try:
        rgb = np.asarray(Image.open(path).convert('RGB'))
      except (OSError, ValueError) as e:
        print(f'predict: skipped {path}: not a readable image ({e}).', file=sys.stderr)
        failed.append(path)
        continue
      scale = (2048, args.short_side) if args.short_side else None  # mmseg's test Resize
      resized = transforms.eval_transform(rgb, scale, args.short_side or None)
      yield (path, rgb), resized, rgb.shape[:2]

  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  reports.write_json(out / 'classes.json', {str(i): n for i, n in enumerate(names)})
  used = set()
  for (path, rgb), labels in predictor.predict(stream()):
    stem = path.stem if path.stem not in used else f'{path.stem}_{len(used)}'
    used.add(stem)
    reports.write_png(out / f'{stem}_mask.png', labels.astype(np.uint8))
    reports.write_png(out / f'{stem}_overlay.png', reports.overlay_panel(rgb, labels, names))
    counts = np.bincount(labels.ravel(), minlength=len(names)) / labels.size
    top = ', '.join(f'{names[k]} {100 * counts[k]:.0f}%' for k in np.argsort(-counts)[:3]
                    if counts[k] > 0)
    print(f'{path} -> {out / (stem + "_mask.png")} ({top})')
  if failed:
    print(f'predict: error: {len(failed)} of {len(images)} images could not be read: '
          f'{", ".join(map(str, failed))}.', file=sys.stderr)
    return 1
  return 0


if __name__ == '__main__':
  sys.exit(cli.run('python -m otseg_jax.predict', main))
