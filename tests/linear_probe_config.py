r"""The test method of tests/linear_probe_method.py on the tiny synthetic set: train.py, eval.py
and predict run it as they run OTSeg.

  python train.py --config tests/linear_probe_config.py --workdir RUN --config.clip=TINY_HF_CLIP

config.clip must be a CLIP with the tiny towers (tests/clip_testing.py writes one) and a tokenizer.
"""

from configs import tiny
from tests import linear_probe_method


def get_config(arg=None):
  config = tiny.get_config(arg)
  config.model = linear_probe_method.get_config()
  config.loss.name = 'map_losses'  # focal + dice on its one map
  config.ft_backbone = False  # only the head and the context vectors train
  return config
