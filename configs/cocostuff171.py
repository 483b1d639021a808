r"""OTSeg on cocostuff171: `--config configs/cocostuff171.py:SETTING`, SETTING = inductive (default) | transductive |
fully_supervised. Transductive training starts from an inductive run:

  python train.py --config configs/cocostuff171.py:transductive --workdir runs/cocostuff171_st \
      --config.init_from=runs/cocostuff171_inductive
"""

from configs import common


def get_config(arg=None):
  return common.make_config('cocostuff171', arg or 'inductive')
