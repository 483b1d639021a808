r"""OTSeg on cocostuff171: `--config configs/cocostuff171.py:SETTING`, SETTING = inductive (default) | transductive |
fully_supervised; `SETTING:vitl14` for CLIP ViT-L/14 instead of the paper's ViT-B/16
(`common.BACKBONES`: crop on its 14-pixel grid, not in the paper). Transductive training starts
from an inductive run:

  python train.py --config configs/cocostuff171.py:transductive --workdir runs/cocostuff171_st \
      --config.init_from=runs/cocostuff171_inductive
"""

from configs import common


def get_config(arg=None):
  return common.make_config('cocostuff171', *common.split_arg(arg, 'inductive'))
