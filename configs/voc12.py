r"""OTSeg on voc12: `--config configs/voc12.py:SETTING`, SETTING = inductive (default) | transductive |
fully_supervised. Transductive training starts from an inductive run:

  python train.py --config configs/voc12.py:transductive --workdir runs/voc12_st \
      --config.init_from=runs/voc12_inductive
"""

from configs import common


def get_config(arg=None):
  return common.make_config('voc12', arg or 'inductive')
