r"""OTSeg on context59: `--config configs/context59.py:SETTING`, SETTING = inductive (default) | transductive |
fully_supervised; `SETTING:vitl14` for CLIP ViT-L/14 instead of the paper's ViT-B/16
(`common.BACKBONES`: crop on its 14-pixel grid, not in the paper). Transductive training starts
from an inductive run:

  python train.py --config configs/context59.py:transductive --workdir runs/context59_st \
      --config.init_from=runs/context59_inductive
"""

from configs import common


def get_config(arg=None):
  return common.make_config('context59', *common.split_arg(arg, 'inductive'))
