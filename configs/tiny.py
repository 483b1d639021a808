r"""A tiny synthetic config for tests: patch 8, width 32, 2 layers, 32 x 32 images, seconds per run.

The old embedded default: no CLIP; a random image tower fine-tuned with the head
(ft_backbone: a random tower's features are too weak to only prompt-tune) against the synthetic
dataset's own hand-made attribute vectors as "text". Argument: the setting (inductive by default),
as configs/synthetic.py.
"""

from configs import synthetic


# The architecture of the tiny CLIP the tests pretrain (tests/conftest.py tiny_synthetic_clip), for
# the methods' tiny configs: synthetic_clip.PretrainConfig fields.
CLIP = dict(image_size=32, vision_width=32, vision_layers=1, vision_heads=2, text_width=32,
            text_layers=1, text_heads=2, embed_dim=32)


def shrink(config) -> None:
  """The test size of a synthetic-world config, in place: 32 px images, batches of 8, a few steps,
  logs and checkpoints every 2 steps, no TensorBoard, one 32 px evaluation window."""
  config.data.synthetic = dict(image_size=32, num_train=1024, num_val=16, embed_dim=32,
                               num_prompts=4, seed=0)
  config.data.num_threads = 1
  config.batch_size = 8
  config.num_train_steps = 6
  config.optimizer.lr = 1e-4  # x10 for tower and head.
  config.schedule.warmup_steps = 100
  config.log_every_steps = 2
  config.checkpoint_every_steps = 2
  config.async_checkpointing = False
  config.tensorboard = False
  config.eval.crop_size = 32
  config.eval.stride = 32
  config.eval.batch_size = 8
  config.eval.num_overlays = 2


def get_config(arg=None):
  config = synthetic.world_config(arg or 'inductive')
  shrink(config)
  config.clip = ''  # Random towers.
  config.ft_backbone = True
  config.text_embeddings = ''  # The synthetic dataset's own (K, N, C) embeddings.

  m = config.model
  m.image_size = 32
  m.backbone.update(patch_size=8, width=32, layers=2, heads=2, output_dim=32,
                    num_prompt_tokens=2, prompt_depth=1, prompt_dropout=0.1)
  m.head.update(decoder_layers=2, dropout=0.1)
  m.num_prompts = 4
  # Fewer Sinkhorn iterations at most: the tests run on two shared CPU cores.
  m.ot.max_iterations = 20
  return config
