"""A minimal second method, to prove the seam: a linear per-pixel head on CLIP's image tower,
scored against CoOp-learned class text (`config.model.name = 'tests.linear_probe_method'`).

Nothing outside this file and tests/linear_probe_config.py knows it exists: train.py, eval.py and
`python -m otseg_jax.predict` find it through its config.
"""

from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from otseg_jax import image_ops
from otseg_jax.models import clip
from otseg_jax.models import ot_layers
from otseg_jax.models import prompt_learner


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """The tiny CLIP of the tests (width 32, patch 8, 32 x 32 images, a 1-layer text tower)."""
  del arg
  config = ml_collections.ConfigDict()
  config.name = 'tests.linear_probe_method'
  config.trainable = r'^head/|^prompt_learner/context$'
  config.text = 'tokens'
  num_context = 4
  config.text_template = ' '.join(['X'] * num_context) + ' {}.'
  config.clip_towers = {'backbone': 'visual', 'prompt_learner/text': 'text'}
  config.dont_load = r'^prompt_learner/context$'
  config.image_size = 32
  config.backbone = ml_collections.ConfigDict(dict(
      patch_size=8, width=32, layers=2, heads=2, output_dim=32))
  config.text_tower = ml_collections.ConfigDict(dict(
      vocab_size=49408, context_length=77, width=32, layers=1, heads=2,
      num_context=num_context))
  config.logit_scale = 10.0
  config.calibration = 0.0
  return config


def model_from_config(config: ml_collections.ConfigDict, dtype: Any = jnp.float32) -> 'Model':
  return Model(config=ml_collections.FrozenConfigDict(config), dtype=dtype)


class Model(nn.Module):
  """CLIP image tower -> Dense per pixel -> cosine with the class text -> (B, H, W, K) logits."""
  config: Any
  dtype: Any = jnp.float32

  def setup(self):
    b, t = self.config.backbone, self.config.text_tower
    self.backbone = clip.VisionTransformer(
        patch_size=b.patch_size, width=b.width, layers=b.layers, heads=b.heads,
        output_dim=b.output_dim, image_size=self.config.image_size, dtype=self.dtype)
    self.prompt_learner = prompt_learner.CoOpText(
        text=clip.TextTransformer(
            vocab_size=t.vocab_size, context_length=t.context_length, width=t.width,
            layers=t.layers, heads=t.heads, output_dim=b.output_dim, dtype=self.dtype),
        num_context=t.num_context)
    self.head = nn.Dense(b.output_dim, dtype=self.dtype)

  def encode_text(self, tokens: jax.Array, *, train: bool) -> jax.Array:
    """(K, L) class prompt ids -> (K, 1, C) learned class text."""
    del train
    return self.prompt_learner(tokens)

  def __call__(self, images: jax.Array, text: jax.Array, *,
               train: bool) -> tuple[dict[str, jax.Array], dict[str, Any]]:
    """images (B, H, W, 3), text (K, 1, C) -> ({'logits': (B, H, W, K)}, {'dense': ...})."""
    _, dense, _ = self.backbone(images, train=train)
    pixels = ot_layers.l2_normalize(self.head(dense))
    logits = self.config.logit_scale * jnp.einsum('bhwc,kc->bhwk', pixels, text[:, 0])
    return {'logits': image_ops.resize_bilinear(logits, images.shape[1:3])}, {'dense': dense}


def eval_probabilities(maps: Mapping[str, jax.Array], seen: jax.Array,
                       config: ml_collections.ConfigDict) -> jax.Array:
  return jax.nn.sigmoid(maps['logits']) - config.calibration * jnp.asarray(seen, jnp.float32)


def pseudo_labels(maps: Mapping[str, jax.Array], labels: jax.Array, seen: np.ndarray,
                  config: ml_collections.ConfigDict) -> jax.Array:
  del config
  seen = np.asarray(seen, bool)
  logits = jnp.where(jnp.asarray(seen), -jnp.inf, jax.lax.stop_gradient(maps['logits']))
  unseen_px = jnp.isin(labels, jnp.asarray(np.flatnonzero(~seen)))
  return jnp.where(unseen_px, jnp.argmax(logits, -1), labels).astype(jnp.int32)
