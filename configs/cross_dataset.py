r"""Cross-dataset evaluation: a model trained on SOURCE evaluated on TARGET's classes.

  python eval.py --config configs/cross_dataset.py:coco_to_voc --checkpoint runs/coco_st

Pairs (the authors' configs/cross_dataset/*.py): coco_to_voc, coco_to_context, coco_to_ade,
context_to_voc, context_to_coco; `PAIR:vitl14` for CLIP ViT-L/14 (configs/common.py BACKBONES). The model fields (prompt tokens, crop) are the source's; the text
embeddings are the TARGET's (K_target rows, computed with the source's N templates), unlike the
reference, which loads the source's array whose class count does not match (spec section 9).
Every target class is "seen" for the model, so there is no calibration; seen / unseen / hIoU are
still reported over the target's own zero-shot split where it has one (ADE-150 has none).
"""

from configs import common

# name: (source, target, slide crop, slide stride) as in the authors' cross-dataset configs.
PAIRS = {
    'coco_to_voc': ('cocostuff171', 'voc12', 512, 380),
    'coco_to_context': ('cocostuff171', 'context59', 512, 426),
    'coco_to_ade': ('cocostuff171', 'ade150', 512, 426),
    'context_to_voc': ('context59', 'voc12', 480, 80),
    'context_to_coco': ('context59', 'cocostuff171', 480, 80),
}


def get_config(arg=None):
  pair, _, backbone = (arg or '').partition(':')
  if pair not in PAIRS:
    raise ValueError(f'configs/cross_dataset.py needs one of {", ".join(PAIRS)} as its argument, '
                     f'e.g. --config configs/cross_dataset.py:coco_to_voc (got {arg!r}).')
  _, backbone = common.split_arg(f'transductive:{backbone}', 'transductive')
  source, target, crop, stride = PAIRS[pair]
  config = common.make_config(source, 'transductive')
  config.source_dataset = source
  config.dataset = target
  config.data = common.data_config(target)
  config.templates = common.classes.get(source).templates  # The source's N prompts per class.
  config.model.calibration = 0.0
  config.eval.crop_size = crop
  config.eval.stride = stride
  # Another image tower (PAIR:vitl14): the pair's crop and the target's scales on its grid.
  return common.set_backbone(config, backbone)
