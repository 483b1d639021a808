"""Learned class text: prompt vectors run through CLIP's frozen text tower, for any method.

CoOp (Zhou et al. 2022): T context vectors, shared by all classes, replace the embeddings of the T
placeholder tokens of the prompt template ('X X X X {}.', `config.model.text_template`), and the
text tower embeds each class's prompt; only the vectors train (the tower's parameters are frozen
by the method's `trainable` regex). ZegOT and MVP-SEG learn several such prompts per class (N
learners give (K, N, C)); LDVC adds deep text prompts, which a `deep_context` parameter would pass
to the tower's blocks as the image tower's deep visual prompts are.

The text input is the (K, L) token ids of `text_embeddings.class_tokens`, cut after the longest
EOT: the tower runs L positions, not CLIP's 77.
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from otseg_jax.models import clip
from otseg_jax.models import ot_layers

Dtype = Any


class CoOpText(nn.Module):
  """`num_context` learned vectors + CLIP's text tower (`text`): (K, L) ids -> (K, 1, C).

  Attributes:
    vocab_size, context_length, width, layers, heads, output_dim: the text tower's (CLIPSpec).
    num_context: T, the placeholder tokens after SOT that the learned vectors replace.
  """
  vocab_size: int
  context_length: int
  width: int
  layers: int
  heads: int
  output_dim: int
  num_context: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, tokens: jax.Array) -> jax.Array:
    """tokens (K, L) int ids of the class prompts -> (K, 1, C) L2-normalised class text."""
    # CoOp's initialisation: N(0, 0.02^2).
    context = self.param('context', nn.initializers.normal(0.02),
                         (self.num_context, self.width))
    tower = clip.TextTransformer(
        vocab_size=self.vocab_size, context_length=self.context_length, width=self.width,
        layers=self.layers, heads=self.heads, output_dim=self.output_dim, dtype=self.dtype,
        name='text')
    return ot_layers.l2_normalize(tower(tokens, context))[:, None, :]
