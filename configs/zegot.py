r"""ZegOT (otseg_jax.models.zegot): `--config configs/zegot.py:DATASET[:SETTING][:OPTION...]`.

DATASET: voc12 | context59 | cocostuff171 (CLIP ViT-B/16, the OTSeg recipe of configs/common.py),
synthetic (the embedded default's frozen pretrained CLIP, as configs/synthetic.py) or tiny (tests:
a tiny synthetic-world CLIP, set --config.clip). SETTING: inductive (default) | transductive (the
paper's main setting; starts from an inductive run, --config.init_from=WORKDIR) |
fully_supervised. OPTIONs: shallow (MPS on the last tower layer only, the paper's ablation), mpsa
(OTSeg's Sinkhorn attention in the decoder instead of softmax cross-attention).

  python train.py --config configs/zegot.py:voc12 --workdir runs/zegot_voc12
  python train.py --config configs/zegot.py:voc12:transductive --workdir runs/zegot_voc12_st \
      --config.init_from=runs/zegot_voc12
  python train.py --config configs/zegot.py:synthetic --workdir demo_output/zegot

Both CLIP towers are frozen; the context vectors and the head train. Values the paper does not
give are marked `# ours` here and in zegot.get_config.
"""

from configs import common
from configs import synthetic
from configs import tiny
from otseg_jax.data import synthetic_clip
from otseg_jax.models import zegot

OPTIONS = ('shallow', 'mpsa')

# lr x10 on every learned part (the context vectors and the head), as the recipe's x10 on
# OTSeg's learned parts; no rule for the frozen towers (not in the trained tree).  # ours (L)
RULES = (
    ('context', 10.0, None),
    ('head', 10.0, None),
    ('norm', None, 0.0),
    ('ln', None, 0.0),
)


def parse_arg(arg: str | None) -> tuple[str, str, tuple[str, ...]]:
  """'DATASET[:SETTING][:OPTION...]' -> (dataset, setting, options)."""
  dataset, *rest = (arg or 'voc12').split(':')
  settings = [r for r in rest if r not in OPTIONS]
  options = tuple(r for r in rest if r in OPTIONS)
  if len(settings) > 1:
    raise ValueError(f'configs/zegot.py:{arg}: one setting at most, got {settings}; options are '
                     f'{", ".join(OPTIONS)}.')
  return dataset, (settings or ['inductive'])[0], options


def apply_options(config, options) -> None:
  if 'shallow' in options:
    config.model.feature_layers = (config.model.backbone.layers - 1,)
    config.model.variant += ':shallow'
  if 'mpsa' in options:
    config.model.head.attention = 'mpsa'
    config.model.variant += ':mpsa'


def dataset_config(dataset: str, setting: str):
  """ZegOT on a real dataset: the OTSeg recipe (common.make_config), ZegOT's model and rules."""
  config = common.make_config(dataset, setting)
  config.model = zegot.get_config(common.DATASETS[dataset]['model'])
  config.model.image_size = config.eval.crop_size
  config.model.calibration = 0.1 if setting == 'inductive' else 0.0  # OTSeg's (L)  # ours
  config.optimizer.rules = RULES
  config.text_embeddings = ''  # unused: the class text is learned from the tokens
  return config


def synthetic_config(setting: str, clip: synthetic_clip.PretrainConfig, clip_dir: str):
  """ZegOT on the synthetic world with a CLIP pretrained on it (`clip` its architecture)."""
  config = synthetic.world_config(setting)
  config.clip = clip_dir  # Frozen, both towers.
  config.ft_backbone = False
  config.text_embeddings = ''
  config.tokenizer = ''  # The CLIP directory's own.
  config.model = zegot.get_config('voc')
  m = config.model
  m.calibration = 0.1 if setting == 'inductive' else 0.0
  m.image_size = clip.image_size
  m.backbone.update(patch_size=clip.patch_size, width=clip.vision_width,
                    layers=clip.vision_layers, heads=clip.vision_heads, output_dim=clip.embed_dim,
                    mlp_dim=4 * clip.vision_width)
  m.text_tower.update(vocab_size=len(synthetic_clip.vocabulary()[0]),
                      context_length=clip.context_length,
                      width=clip.text_width, layers=clip.text_layers, heads=clip.text_heads,
                      mlp_dim=4 * clip.text_width)
  m.feature_layers = tuple(range(clip.vision_layers))  # all of them, as the default
  config.optimizer.rules = RULES
  return config


def get_config(arg=None):
  dataset, setting, options = parse_arg(arg)
  if dataset in common.DATASETS:
    config = dataset_config(dataset, setting)
  elif dataset == 'synthetic':
    # As configs/synthetic.py: its CLIP (make demo writes it), steps and schedule.
    config = synthetic_config(setting, synthetic_clip.PretrainConfig(), synthetic.CLIP_DIR)
    config.model.head.update(decoder_layers=3, dropout=0.1)
    config.num_train_steps = 1000
    config.optimizer.lr = 1e-4  # x10 for the context vectors and the head.
    config.schedule.warmup_steps = 100
    config.checkpoint_every_steps = 500
    config.model.variant = 'synthetic'
  elif dataset == 'tiny':
    # conftest.tiny_synthetic_clip's CLIP: 32 px, patch 8, width 32, one block per tower.
    config = synthetic_config(setting, synthetic_clip.PretrainConfig(**tiny.CLIP), '')
    tiny.shrink(config)  # set --config.clip
    config.model.num_context = 4  # a shorter prompt: seconds, not minutes
    config.model.text_template = ' '.join(['X'] * 4) + ' {}.'
    config.model.num_prompts = 2
    config.model.head.update(decoder_layers=2, dropout=0.1)
    config.model.ot.max_iterations = 20  # two shared CPU cores
    config.num_train_steps = 4
    config.model.variant = 'tiny'
  else:
    raise ValueError(f'configs/zegot.py:{arg}: unknown dataset {dataset!r}; use one of '
                     f'{", ".join((*common.DATASETS, "synthetic", "tiny"))}.')
  apply_options(config, options)
  return config
