r"""Trains OTSeg: `python train.py --config CONFIG[:ARG] --workdir DIR [--config.FIELD=VALUE ...]`.

  python train.py --config configs/synthetic.py --workdir demo_output
  python train.py --config configs/voc12.py:inductive --workdir runs/voc12 \
      --config.data.data_dir=~/tensorflow_datasets --config.clip=openai/clip-vit-base-patch16
  python train.py --config configs/voc12.py:transductive --workdir runs/voc12_st \
      --config.init_from=runs/voc12

A run resumes from the latest checkpoint in --workdir. Stopped by SIGTERM, it saves a checkpoint
and exits with code 143 (128 + SIGTERM): preempted, rerun to resume. Several processes (one per host):
  --num_processes=2 --process_id=0 --coordinator_address=HOST:PORT  (or --multihost on SLURM/TPU).
"""

import sys

from absl import app
from absl import flags
from ml_collections import config_flags

from otseg_jax import cli
from otseg_jax import devices
from otseg_jax import metrics
from otseg_jax import trainer

PREEMPTED_EXIT_CODE = 143  # stopped by SIGTERM after saving a checkpoint: rerun to resume

_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'Config file and argument, e.g. configs/voc12.py:transductive.',
    lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Checkpoints, logs and reports; resumed from.')
_INIT_DISTRIBUTED = devices.define_distributed_flags()
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {" ".join(argv[1:])}')
  devices.quiet_library_logs()
  _INIT_DISTRIBUTED()
  try:
    results = trainer.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  except (ValueError, FileNotFoundError, FloatingPointError) as e:
    if cli.debug():
      raise
    sys.exit(f'train.py: error: {e}')
  if results.get('preempted'):
    print(f'Stopped at step {results["step"]}; rerun the same command to resume.')
    # 128 + SIGTERM, what a shell reports for a process killed by SIGTERM: SLURM, Kubernetes and
    # most job runners read it as "preempted", not as success (0) or a failure to look into.
    sys.exit(PREEMPTED_EXIT_CODE)
  elif results:
    print(f'{results["split"]}: {metrics.format_summary(results)}')
    print(f'Reports and pictures: {_WORKDIR.value}/eval (overlays/, per_class_iou.png)')


if __name__ == '__main__':
  app.run(main, flags_parser=cli.absl_flags_parser)
