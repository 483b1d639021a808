"""The evaluation loop: slide inference over a split, metrics, reports; and `eval.py`'s entry.

Slide inference runs sharded over this process's devices (`inference.SlideEvaluator`); the
confusion matrices are summed over the split and over processes (`metrics`), and process 0 writes
the reports (`reports`). The method is `config.model.name`: its model, its class text, its eval
probabilities.
"""

import functools
import pathlib
import time
from typing import Any

import jax
from jax.experimental import multihost_utils
import numpy as np
from PIL import Image

from otseg_jax import classes as classes_lib
from otseg_jax import inference
from otseg_jax import metrics
from otseg_jax import models
from otseg_jax import params as params_lib
from otseg_jax import reports
from otseg_jax import text_embeddings
from otseg_jax.data import loading
from otseg_jax.data import pipeline
from otseg_jax.data import transforms


def _allsum_confusion(confusion: np.ndarray) -> np.ndarray:
  """Sum of every process's (K, K) int64 confusion matrix (exact: sent as two int32 halves)."""
  if jax.process_count() == 1:
    return confusion
  hi = (confusion >> 31).astype(np.int32)
  lo = (confusion & (2**31 - 1)).astype(np.int32)
  hi, lo = multihost_utils.process_allgather((hi, lo))
  return (np.asarray(hi, np.int64) << 31).sum(0) + np.asarray(lo, np.int64).sum(0)


def evaluate(config, model, params, text_input, seen_mask, split, *,
             outdir: pathlib.Path | None = None, max_images: int = 0,
             progress: bool = True) -> dict[str, Any]:
  """Evaluates `params` on `split` (a `pipeline.Split`) and writes the reports to `outdir`.

  Args:
    config: the run's config (eval.crop_size / stride / batch_size / num_overlays, the model
      config the method's eval probabilities read, data eval_img_scale / eval_min_size).
    model: the method's model; params: its parameters (numpy or arrays).
    text_input: the class text input of ALL classes of the split (`load_text_input`); the
      class text is computed from it once, for every window.
    seen_mask: (K,) bool, the classes the model was trained on (calibration applies to them).
    outdir: where results.json, per_class.md, per_class_iou.png and overlays/ go (process 0), or
      None for metrics only.
    max_images: evaluate only the first N images of the split (0: all).

  Returns:
    `summarize` results plus 'num_images', 'split', 'seconds'.
  """
  class_names, unseen = split.classes.classes, split.classes.unseen
  num_classes = len(class_names)
  if np.shape(text_input)[0] != num_classes:
    raise ValueError(f'text embeddings have {np.shape(text_input)[0]} classes, the evaluated split '
                     f'has {num_classes}: use the embeddings of the evaluated dataset.')
  start = time.time()
  is_main = jax.process_index() == 0
  method = models.get_method(config.model.name)
  evaluator = inference.SlideEvaluator(
      model, params, models.encode_text(model, params, text_input), seen_mask,
      probabilities=functools.partial(method.eval_probabilities, config=config.model),
      crop_size=config.eval.crop_size, stride=config.eval.stride,
      batch_size=config.eval.batch_size)
  img_scale = config.data.get('eval_img_scale')
  iterator = pipeline.make_eval_iter(
      split, img_scale=None if img_scale is None else tuple(img_scale),
      min_size=config.data.get('eval_min_size'), process_index=jax.process_index(),
      process_count=jax.process_count())
  total = pipeline.num_eval_steps(len(split.source), jax.process_count())
  if max_images:
    total = min(total, -(-max_images // jax.process_count()))
  num_overlays = config.eval.num_overlays if outdir is not None and is_main else 0
  examples = {}

  def stream():
    for n, example in enumerate(iterator):
      if n >= total:
        break
      image = example['image'][0]
      label = example['label'][0]
      examples[n] = (bool(example['valid'][0]), label,
                     image if n < num_overlays else None, int(example['index'][0]))
      yield n, image, label.shape

  confusion = np.zeros((num_classes, num_classes), np.int64)
  bar = reports.Progress(total, f'eval {split.name}/{split.split}', enabled=progress and is_main)
  count = 0
  for n, pred in evaluator.predict(stream()):
    valid, label, image, index = examples.pop(n)
    if valid:
      confusion += metrics.confusion_matrix(pred, label, num_classes)
      count += 1
    if image is not None:
      rgb = reports.denormalize(image, transforms.MEAN, transforms.STD)
      rgb = np.asarray(Image.fromarray(rgb).resize(label.shape[::-1], Image.BILINEAR))
      reports.write_png(pathlib.Path(outdir) / 'overlays' / f'{n:04d}_{index}.png',
                reports.overlay_panel(rgb, pred, class_names, label))
    bar.update()
  confusion = _allsum_confusion(confusion)
  results = metrics.summarize(confusion, class_names, unseen)
  if jax.process_count() > 1:
    count = int(np.asarray(multihost_utils.process_allgather(np.int32(count))).sum())
  results.update(num_images=count, split=f'{split.name}/{split.split}',
                 seconds=time.time() - start, crop_size=config.eval.crop_size,
                 stride=config.eval.stride)
  if outdir is not None and is_main:
    reports.write_report(results, outdir, title=f'{split.name}/{split.split}')
  return results


def evaluate_checkpoint(config, checkpoint: str, outdir: str | None = None) -> dict[str, Any]:
  """Evaluates the parameters in `checkpoint` as `config` says; what `eval.py` runs.

  Args:
    config: a training or cross-dataset config (dataset, eval crop / stride, text embeddings).
    checkpoint: a training workdir (its latest checkpoint) or a parameter checkpoint directory
      (`python -m otseg_jax.convert`, or a workdir's params/).
    outdir: where the reports go; default CHECKPOINT/eval_<data name>_<split>.

  Returns:
    The results written to outdir/results.json.
  """
  checkpoint_path = pathlib.Path(checkpoint).expanduser()
  if not checkpoint_path.exists():
    raise FileNotFoundError(f'--checkpoint {checkpoint}: no such directory. Pass a training workdir '
                            'or a parameter checkpoint (python -m otseg_jax.convert writes one).')
  split = loading.load_data_split(config, config.data.eval_split)
  text_input = text_embeddings.load_text_input(config, split.classes.classes)
  model = models.get_method(config.model.name).model_from_config(config.model)
  params = params_lib.load_params_any(checkpoint_path)
  patch = config.model.backbone.patch_size
  reference = jax.eval_shape(lambda: models.init(
      model, {'params': jax.random.PRNGKey(0)}, np.zeros((1, 2 * patch, 2 * patch, 3), np.float32),
      text_input))['params']
  params_lib.check_same_structure(params, reference, f'checkpoint {checkpoint}')
  if outdir is None:
    safe = config.data.name.replace('/', '_')
    outdir = checkpoint_path / f'eval_{safe}_{config.data.eval_split}'
  return evaluate(config, model, params, text_input,
                  classes_lib.seen_mask(split.classes, config.setting), split,
                  outdir=pathlib.Path(outdir), max_images=config.eval.max_images)
