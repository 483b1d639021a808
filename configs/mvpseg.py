r"""MVP-SEG (otseg_jax.models.mvpseg): `--config configs/mvpseg.py:DATASET[:plus][:hosted]`.

DATASET: voc12 (default) | context59 | cocostuff171 (CLIP ViT-B/16, the OTSeg recipe's data,
crops and steps), synthetic (the embedded default's world and its pretrained tiny CLIP, for
benchmarks/compare_methods.py), tiny (test size; needs --config.clip=DIR of a tiny synthetic CLIP).

  python train.py --config configs/mvpseg.py:voc12 --workdir runs/mvpseg_voc12

Inductive by default (the unseen classes' pixels ignored, their names withheld). `plus` is
MVP-SEG+: transductive self-training from an inductive MVP-SEG run, the model labelling the unseen
pixels itself (models/mvpseg.py, `pseudo_labels`):

  python train.py --config configs/mvpseg.py:voc12:plus --workdir runs/mvpseg_plus_voc12 \
      --config.init_from=runs/mvpseg_voc12

`hosted` adds OTSeg's deep visual prompts to the frozen image tower (a deviation from the paper).
Values marked `# ours` are not given by the paper (VARIANTS.md, L).
"""

import ml_collections

from configs import common
from configs import synthetic
from configs import tiny
from otseg_jax.data import synthetic_clip
from otseg_jax.models import mvpseg


def parse_arg(arg: str | None) -> tuple[str, bool, bool]:
  """'DATASET[:plus][:hosted]' -> (dataset, plus, hosted)."""
  dataset, *flags = (arg or 'voc12').split(':')
  unknown = set(flags) - {'plus', 'hosted'}
  known = (*common.DATASETS, 'synthetic', 'tiny')
  if dataset not in known or unknown:
    raise ValueError(f'configs/mvpseg.py:{arg}: use DATASET[:plus][:hosted], DATASET one of '
                     f'{", ".join(known)} (e.g. configs/mvpseg.py:voc12:plus).')
  return dataset, 'plus' in flags, 'hosted' in flags


def _fit_tiny_clip(model: ml_collections.ConfigDict, clip: synthetic_clip.PretrainConfig,
                   prompt_length: int) -> None:
  """model fields for a CLIP of `synthetic_clip` (architecture and tokenizer)."""
  model.image_size = clip.image_size
  model.backbone.update(patch_size=clip.patch_size, width=clip.vision_width,
                        layers=clip.vision_layers, heads=clip.vision_heads,
                        output_dim=clip.embed_dim, num_prompt_tokens=4, prompt_depth=2,
                        prompt_dropout=0.1)  # the hosted prompts: configs/synthetic.py's
  model.text_tower.update(vocab_size=len(synthetic_clip.vocabulary()[0]),
                          context_length=clip.context_length, width=clip.text_width,
                          layers=clip.text_layers, heads=clip.text_heads)
  # The tiny CLIP saw captions of up to ~14 tokens: 16 vectors would put the class names at
  # positions its pretraining never trained.
  model.prompt_length = prompt_length  # ours (L)
  model.text_template = ' '.join(['X'] * prompt_length) + ' {}.'


def get_config(arg=None):
  dataset, plus, hosted = parse_arg(arg)
  setting = 'transductive' if plus else 'inductive'
  if dataset in common.DATASETS:
    config = common.make_config(dataset, setting)
    config.model = mvpseg.get_config(common.DATASETS[dataset]['model'])
  elif dataset == 'synthetic':
    config = synthetic.world_config(setting)
    config.clip = synthetic.CLIP_DIR  # frozen: only the prompts and temperatures train
    config.tokenizer = ''  # the CLIP directory's own
    config.model = mvpseg.get_config('voc')
    _fit_tiny_clip(config.model, synthetic_clip.PretrainConfig(), prompt_length=4)
    # The tiny CLIP's logit scale is ~23, not OpenAI's 100: at 100 (x 3 views) the fused softmax
    # saturates (one seed, 1000 steps, lr 1e-3: hIoU 16.0 at 100, 21.9 at 10, 22.9 at 20).
    config.model.tau1 = 20.0  # ours (L)
    config.num_train_steps = 1000  # configs/synthetic.py's
    # x10 for the learned parts: 1e-2 for the prompts (tau1 20: 300 steps at 1e-4 gave hIoU 12.5;
    # 1000 steps at 3e-3 gave 20.2, at 1e-3 22.9).
    config.optimizer.lr = 1e-3  # ours (L)
    config.schedule.warmup_steps = 100
    config.checkpoint_every_steps = 500
  else:  # tiny: conftest.tiny_synthetic_clip's sizes
    config = synthetic.world_config(setting)
    tiny.shrink(config)
    config.num_train_steps = 4
    config.clip = ''  # set --config.clip=DIR of a tiny synthetic CLIP
    config.model = mvpseg.get_config('voc')
    _fit_tiny_clip(config.model, synthetic_clip.PretrainConfig(**tiny.CLIP), prompt_length=4)
    # One block: no deeper block for deep prompts, the shallow ones only.
    config.model.backbone.update(num_prompt_tokens=2, prompt_depth=0)

  config.model.hosted = hosted
  config.setting = setting
  config.ft_backbone = False  # both towers frozen (M)
  # No calibration, inductive or not: the paper names none.
  config.model.calibration = 0.0  # ours (L)
  # l1 CE + l2 multi-label BCE + l3 OCLoss (M form; weights 1/1/1, L).
  config.loss = ml_collections.ConfigDict(dict(
      name='mvpseg_loss', ce_weight=1.0, cls_weight=1.0, oc_weight=1.0))  # ours (L)
  # x10 on the learned parts (the common protocol): prompts, temperatures (no weight decay on
  # those), and the visual prompts when hosted.
  config.optimizer.rules = (
      ('^prompt_learner/', 10.0, None),
      ('^log_tau', 10.0, 0.0),  # ours (L)
      ('^backbone/', 10.0, None),
  )
  return config
