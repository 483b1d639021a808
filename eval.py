r"""Evaluates a checkpoint: `python eval.py --config CONFIG[:ARG] --checkpoint DIR [--outdir DIR]`.

  python eval.py --config configs/synthetic.py --checkpoint demo_output
  python eval.py --config configs/voc12.py:inductive --checkpoint runs/voc12
  python eval.py --config configs/cross_dataset.py:coco_to_voc --checkpoint runs/coco_st

Slide inference with the config's eval crop / stride over the whole eval split; prints seen mIoU,
unseen mIoU, hIoU and mIoU; writes results.json, per_class.md, per_class_iou.png and overlays/.
"""

import sys

from absl import app
from absl import flags
from ml_collections import config_flags

from otseg_jax import cli
from otseg_jax import devices
from otseg_jax import evaluate
from otseg_jax import metrics

_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'Config file and argument, e.g. configs/voc12.py:inductive.', lock_config=True)
_CHECKPOINT = flags.DEFINE_string('checkpoint', None,
                                  'Training workdir or parameter checkpoint directory.')
_OUTDIR = flags.DEFINE_string('outdir', None, 'Reports; default CHECKPOINT/eval_<data>_<split>.')
_INIT_DISTRIBUTED = devices.define_distributed_flags()
flags.mark_flags_as_required(['config', 'checkpoint'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {" ".join(argv[1:])}')
  devices.quiet_library_logs()
  _INIT_DISTRIBUTED()
  try:
    results = evaluate.evaluate_checkpoint(_CONFIG.value, _CHECKPOINT.value, _OUTDIR.value)
  except (ValueError, FileNotFoundError) as e:
    if cli.debug():
      raise
    sys.exit(f'eval.py: error: {e}')
  print(f'{results["split"]} ({results["num_images"]} images): {metrics.format_summary(results)}')


if __name__ == '__main__':
  app.run(main, flags_parser=cli.absl_flags_parser)
