"""What every OTSeg config shares, and the per-dataset table the dataset configs read.

Not a config itself: `configs/voc12.py`, `context59.py`, `cocostuff171.py` call `make_config`.
Values are the reference's (spec section 8 and the authors' mmseg configs); where the reference does
something other than the recipe as written, the field says so.
"""

import ml_collections

from otseg_jax import classes
from otseg_jax.models import otseg

# Per training dataset: model variant, iterations (inductive / fully supervised, transductive), crop S
# and slide stride.
DATASETS = {
    'voc12': dict(model='voc', steps=20_000, transductive_steps=10_000, crop=512, stride=426),
    'context59': dict(model='context', steps=40_000, transductive_steps=20_000, crop=480,
                      stride=80),
    'cocostuff171': dict(model='coco', steps=80_000, transductive_steps=40_000, crop=512,
                         stride=426),
}

# Per dataset read (training or evaluation target): the prepared TFDS folder name (otseg_jax.data),
# the training rescale scale and the test Resize(img_scale, keep_ratio, min_size) of the reference.
DATA = {
    'voc12': dict(tfds='voc12', img_scale=(2048, 512), eval_img_scale=(2048, 512),
                  eval_min_size=512),
    'context59': dict(tfds='pascal_context59', img_scale=(520, 520), eval_img_scale=(520, 520),
                      eval_min_size=512),
    'cocostuff171': dict(tfds='coco_stuff164k', img_scale=(2048, 512),
                         eval_img_scale=(2048, 512), eval_min_size=512),
    'ade150': dict(tfds='ade20k150', img_scale=(2048, 512), eval_img_scale=(2048, 512),
                   eval_min_size=None),
}


# Image towers: 'vitb16' is the paper's (the defaults of otseg.get_config and the tables above);
# 'vitl14' is OpenAI's CLIP ViT-L/14, not in the paper: config.model.backbone fields and CLIP.
BACKBONES = {
    'vitb16': dict(clip='openai/clip-vit-base-patch16', backbone={}),
    'vitl14': dict(
        clip='openai/clip-vit-large-patch14',
        # Text tower: width 768, 12 layers, 12 heads, as the checkpoint says (nothing to set).
        backbone=dict(patch_size=14, width=1024, layers=24, heads=16, output_dim=768,
                      # Deep prompts on every block after the first, as 11 of ViT-B/16's 12.
                      prompt_depth=23)),  # ours (L)
}


def split_arg(arg: str | None, default: str) -> tuple[str, str]:
  """'SETTING[:BACKBONE]' (the config argument after the file) -> (setting, backbone)."""
  setting, _, backbone = (arg or default).partition(':')
  backbone = backbone or 'vitb16'
  if backbone not in BACKBONES:
    raise ValueError(f'Unknown backbone {backbone!r}: use one of {", ".join(BACKBONES)} '
                     f'(e.g. --config configs/voc12.py:{setting or default}:vitl14).')
  return setting or default, backbone


def crop_for_patch(crop: int, stride: int, patch: int) -> tuple[int, int]:
  """(crop, stride) on a whole patch grid: the crop rounded to the nearest multiple of `patch`,
  the slide stride scaled with it (512, 426, 14 -> 518 (37 x 37), 431)."""  # ours (L)
  new = max(1, round(crop / patch)) * patch
  return new, round(stride * new / crop)


def set_backbone(config: ml_collections.ConfigDict, backbone: str) -> ml_collections.ConfigDict:
  """`config` (a full training config) for another image tower of `BACKBONES`: its CLIP, the
  backbone fields, the crop on the tower's patch grid, the slide stride scaled with it and every
  rescale's short side at least one crop (as ViT-B/16's 512 crop of 512-short-side images). The
  head (and so the decoder width) follows the tower's output_dim. The text embeddings are
  computed with the tower's CLIP ('' keeps that), as the authors' arrays are ViT-B/16's."""
  if backbone == 'vitb16':
    return config
  b = BACKBONES[backbone]
  config.clip = b['clip']
  config.model.backbone.update(b['backbone'])
  crop, stride = crop_for_patch(config.eval.crop_size, config.eval.stride,
                                config.model.backbone.patch_size)
  config.model.image_size = config.eval.crop_size = crop
  config.eval.stride = stride
  long, short = config.data.img_scale
  config.data.img_scale = (long, max(short, crop))  # ours (L)
  long, short = config.data.eval_img_scale
  config.data.eval_img_scale = (long, max(short, crop))  # ours (L)
  if config.data.eval_min_size is not None:
    config.data.eval_min_size = max(config.data.eval_min_size, crop)  # ours (L)
  config.model.variant = f'{config.model.variant}:{backbone}'
  return config


def data_config(dataset: str) -> ml_collections.ConfigDict:
  """config.data for reading `dataset` (otseg_jax.data.pipeline)."""
  d = DATA[dataset]
  return ml_collections.ConfigDict(dict(
      name=d['tfds'],  # Prepared with `python -m otseg_jax.data.prepare NAME ...`.
      data_dir='~/tensorflow_datasets',
      train_split='train',
      eval_split='val',
      img_scale=d['img_scale'],  # Training rescale (long, short), then ratio_range.
      ratio_range=(0.5, 2.0),
      cat_max_ratio=0.75,
      augment=True,  # mmseg's rescale / crop / flip / photometric distortion.
      eval_img_scale=d['eval_img_scale'],
      # Placeholder None with a type, so --config.data.eval_min_size=512 is accepted.
      eval_min_size=ml_collections.FieldReference(d['eval_min_size'], field_type=int),
      # Data shards: 0 = one per process. A multiple of the process count makes a run read the
      # same batches whatever the number of processes (each process reads shards / P of them).
      shards=0,
      num_threads=2,  # Threads decoding / augmenting per process.
      num_workers=0,  # grain worker processes per host (0 = in the main process).
  ))


# The optimizer rules in the order mmcv tries the reference's custom_keys (longest key first, then
# alphabetical): 'text_encoder' (not in our trainable tree), 'backbone', 'head', 'norm', 'ln'.
# (regex, lr_mult, decay_mult); None = the rule does not set it.
REFERENCE_RULES = (
    ('backbone', 10.0, None),
    ('head', 10.0, None),
    ('norm', None, 0.0),
    ('ln', None, 0.0),
)


def make_config(dataset: str, setting: str, backbone: str = 'vitb16') -> ml_collections.ConfigDict:
  """The full config of training `dataset` in `setting` (inductive | transductive | fully_supervised)
  with the image tower `backbone` of `BACKBONES` (the paper's ViT-B/16 by default)."""
  if backbone not in BACKBONES:
    raise ValueError(f'Unknown backbone {backbone!r}: use one of {", ".join(BACKBONES)}.')
  if dataset not in DATASETS:
    raise ValueError(f'No config for dataset {dataset!r}; known: {sorted(DATASETS)}.')
  if setting not in classes.SETTINGS:
    raise ValueError(f'Unknown setting {setting!r}: use one of {", ".join(classes.SETTINGS)} '
                     f'(e.g. --config configs/{dataset}.py:transductive).')
  d = DATASETS[dataset]
  cls = classes.get(dataset)
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.dataset = dataset  # Class names, zero-shot split and templates: otseg_jax/classes.json.
  config.setting = setting

  config.data = data_config(dataset)

  # --- CLIP and the text embeddings.
  config.clip = 'openai/clip-vit-base-patch16'  # Path or hub id of CLIP ViT-B/16 weights (otseg_jax.models.clip_weights).
  # (K, N, C) .npy of the TEXT EMBEDDINGS OF `dataset`, or '' to compute them with the CLIP text
  # tower. A class count other than the dataset's is refused before anything runs (spec 9).
  config.text_embeddings = ''
  # Tokenizer for computing them: '' = the CLIP directory's own, else openai/clip-vit-base-patch16.
  config.tokenizer = ''
  config.templates = cls.templates  # 'otseg6' (VOC, N=6) | 'otseg8' (N=8), see classes.py.

  # --- Model: the method (config.model.name, otseg_jax.models.otseg) and its fields, the OT solver
  # inside it (config.model.ot), the transductive pseudo-label balance.
  config.model = otseg.get_config(d['model'])  # Includes the OT solver settings (config.model.ot).
  # Eval calibration: minus 0.1 on the seen channels in the inductive setting only.
  config.model.calibration = 0.1 if setting == 'inductive' else 0.0

  # --- Loss (otseg_jax.losses.<name>): 100 * focal + 1 * dice on the decoder map and on the score
  # map; the other fields are its keyword arguments.
  config.loss = ml_collections.ConfigDict(dict(
      name='otseg_loss', focal_weight=100.0, dice_weight=1.0, alpha=0.25, gamma=2.0))

  # The reference's ft_backbone: False trains only config.model.trainable (OTSeg: the prompts of the
  # image tower and the head); True trains the whole model.
  config.ft_backbone = False

  # --- Transductive self-training (spec section 7).
  config.init_from = ''  # Parameters to start from: a training workdir or a parameter checkpoint.

  # --- Optimizer and schedule (spec section 8).
  config.optimizer = ml_collections.ConfigDict(dict(
      lr=2e-5, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.01,
      rules=REFERENCE_RULES,
      # True: mmcv's first-matching-key semantics (the reference; norm / ln rules never reached,
      # see trainer.param_multipliers). False: no weight decay on norm / ln as the recipe reads.
      first_match=True))
  config.schedule = ml_collections.ConfigDict(dict(
      warmup_steps=1500, warmup_ratio=1e-6, power=0.9, end_lr=1e-6))
  config.num_train_steps = d['transductive_steps'] if setting == 'transductive' else d['steps']
  # Global batch: 4 per GPU on the reference's 4 GPUs (dist_train.sh, samples_per_gpu=4).
  config.batch_size = 16

  # --- Parallelism.
  config.parallel = 'jit'  # 'jit' (mesh, batch sharded over 'data') | 'pmap' (same numbers).

  # --- Checkpoints, logs, evaluation.
  config.checkpoint_every_steps = 1000
  config.max_to_keep = 2
  config.async_checkpointing = True
  config.log_every_steps = 50
  config.tensorboard = True
  config.eval_every_steps = 0  # N: every N steps and at the end; 0: at the end; -1: never.
  config.eval = ml_collections.ConfigDict()
  config.eval.crop_size = d['crop']
  config.eval.stride = d['stride']
  config.eval.batch_size = 8  # Slide windows per forward (global; a multiple of the devices).
  config.eval.max_images = 0  # 0: the whole split; N: the first N (quick periodic evals).
  config.eval.num_overlays = 8  # Colourised overlays of the first N images.
  return set_backbone(config, backbone)
