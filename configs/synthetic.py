r"""The embedded default: OTSeg on the synthetic zero-shot dataset (otseg_jax.data.synthetic),
no downloads, a few minutes on a CPU.

  python train.py --config configs/synthetic.py --workdir demo_output

12 classes = 4 colours x 3 stripe orientations; 3 combinations are unseen in training (inductive:
their pixels are ignored and their text rows withheld). The image tower is a small random ViT (no
CLIP weights): its frozen random features carry colour and stripe orientation, the trainable
the whole tower trains with the head (ft_backbone: a random tower's features are too weak to only
prompt-tune), learning to match pixels to the synthetic "text" embeddings; unseen classes are
recognised from their text rows alone. Argument: the setting (inductive, the default; transductive
needs --config.init_from; fully_supervised).

Reached on CPU (1500 steps, ~3-8 minutes on 2 cores): seen mIoU ~76, unseen ~26, hIoU ~39; chance
(uniform labels) is 4.3 per class.
"""

from configs import common


def get_config(arg=None):
  setting = arg or 'inductive'
  config = common.make_config('voc12', setting)
  config.dataset = 'synthetic'
  config.data = common.data_config('voc12')
  config.data.name = 'synthetic'
  config.data.train_split = 'train'
  config.data.eval_split = 'val'
  config.data.augment = False  # A flip or hue shift would change a stripe / colour class.
  config.data.eval_img_scale = None  # Evaluate at the rendered size.
  config.data.eval_min_size = None
  config.data.synthetic = dict(image_size=64, num_train=1024, num_val=64, embed_dim=64,
                               num_prompts=4, seed=0)
  config.clip = ''  # Random towers.
  config.ft_backbone = True
  config.text_embeddings = ''  # The synthetic dataset's own (K, N, C) embeddings.
  config.templates = 'otseg8'  # Unused.

  m = config.model
  m.image_size = 64
  m.backbone.update(patch_size=8, width=64, layers=3, heads=4, output_dim=64,
                    num_prompt_tokens=4, prompt_depth=2, prompt_dropout=0.1)
  m.head.update(decoder_layers=3, dropout=0.1)
  m.num_prompts = 4

  config.batch_size = 8
  config.num_train_steps = 1500
  config.optimizer.lr = 1e-4  # x10 for tower and head; the recipe's 2e-5 suits CLIP weights.
  config.schedule.warmup_steps = 100
  config.log_every_steps = 50
  config.checkpoint_every_steps = 500
  config.eval_every_steps = 0
  config.eval.crop_size = 64
  config.eval.stride = 64
  config.eval.batch_size = 8
  config.eval.num_overlays = 8
  return config
