r"""The embedded default: OTSeg's recipe in miniature on the synthetic zero-shot dataset
(otseg_jax.data.synthetic), no downloads, a few minutes on a CPU.

  python -m otseg_jax.data.synthetic_clip --out demo_output/clip   # the tiny CLIP (~2 minutes)
  python train.py --config configs/synthetic.py --workdir demo_output

(`make demo` runs both; the CLIP is reused on a rerun.) 12 classes = 4 colours x 3 stripe
orientations. As with OpenAI's CLIP on VOC: a CLIP pretrained on captions that name every class
(otseg_jax.data.synthetic_clip) stays frozen, the class text comes from its text tower over the
class names and the otseg8 templates, and only the deep visual prompts and the OTSeg head train.
Inductive (default): the unseen classes' pixels are ignored and their text rows withheld in
training; they are recognised from the names alone. Argument: the setting (inductive;
transductive, which needs --config.init_from=WORKDIR of an inductive run; fully_supervised).

Other zero-shot splits: --config.data.synthetic.unseen='(1, 5, 9)' (class k = 3 * colour +
orientation), --config.data.synthetic.seed=N for other images. The old recipe (a random image tower
fine-tuned against hand-made attribute vectors) is configs/tiny.py, at test size.

Measured (README, "The embedded default"): see the table there; chance (uniformly random labels)
is 4.3 mIoU.
"""

from configs import common
from otseg_jax.data import synthetic_clip

# Written by `python -m otseg_jax.data.synthetic_clip --out demo_output/clip` (make demo), relative
# to the directory train.py runs in. The './' keeps clip_weights from taking it for a hub id.
CLIP_DIR = './demo_output/clip'


def world_config(setting: str):
  """The synthetic dataset, its evaluation and the logging: what this config and configs/tiny.py
  share. The model and the text source are each config's own."""
  config = common.make_config('voc12', setting)
  config.dataset = 'synthetic'
  config.data = common.data_config('voc12')
  config.data.name = 'synthetic'
  config.data.train_split = 'train'
  config.data.eval_split = 'val'
  config.data.augment = False  # A flip or hue shift would change a stripe / colour class.
  config.data.eval_img_scale = None  # Evaluate at the rendered size.
  config.data.eval_min_size = None
  config.data.synthetic = dict(image_size=64, num_train=1024, num_val=64, seed=0,
                               unseen=(0, 4, 8))
  config.templates = 'otseg8'
  config.batch_size = 8
  config.log_every_steps = 50
  config.eval_every_steps = 0
  config.eval.crop_size = 64
  config.eval.stride = 64
  config.eval.batch_size = 8
  config.eval.num_overlays = 8
  return config


def get_config(arg=None):
  config = world_config(arg or 'inductive')
  clip = synthetic_clip.PretrainConfig()
  config.clip = CLIP_DIR  # Frozen (ft_backbone False): only its prompts train.
  config.ft_backbone = False
  config.text_embeddings = ''  # Computed by the CLIP's text tower over config.templates.
  config.tokenizer = ''  # The CLIP directory's own (a BPE over the synthetic world's words).
  config.templates = synthetic_clip.TEMPLATES

  m = config.model
  m.image_size = clip.image_size
  # The CLIP's architecture (heads too: the weights do not say how many there are).
  m.backbone.update(patch_size=clip.patch_size, width=clip.vision_width,
                    layers=clip.vision_layers, heads=clip.vision_heads, output_dim=clip.embed_dim,
                    num_prompt_tokens=4, prompt_depth=2, prompt_dropout=0.1)
  m.head.update(decoder_layers=3, dropout=0.1)
  m.num_prompts = 8  # the otseg8 templates

  config.num_train_steps = 1000
  config.optimizer.lr = 1e-4  # x10 for the prompts (backbone rule) and the head.
  config.schedule.warmup_steps = 100
  config.checkpoint_every_steps = 500
  return config
