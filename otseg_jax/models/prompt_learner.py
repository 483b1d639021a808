"""Learned class text: prompt vectors run through CLIP's frozen text tower, for any method.

CoOp (Zhou et al. 2022): T context vectors, shared by all classes, replace the embeddings of the T
placeholder tokens of the prompt template ('X X X X {}.', `config.model.text_template`), and the
text tower embeds each class's prompt; only the vectors train (the tower's parameters are frozen
by the method's `trainable` regex). ZegOT and MVP-SEG learn N such prompts per class
(`num_prompts`, one context sequence each), which gives (K, N, C).

The text input is the (K, L) token ids of `text_embeddings.class_tokens`, cut after the longest
EOT: the tower runs L positions, not CLIP's 77.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp

from otseg_jax.models import clip
from otseg_jax.models import ot_layers


class CoOpText(nn.Module):
  """N sequences of T learned vectors + CLIP's text tower: (K, L) ids -> (K, N, C).

  Attributes:
    text: the text tower (`CLIPSpec.text_tower()`), a submodule named 'text'.
    num_context: T, the placeholder tokens after SOT that the learned vectors replace.
    num_prompts: N, independent context sequences, each giving every class one prompt.
  """
  text: clip.TextTransformer
  num_context: int
  num_prompts: int = 1

  @nn.compact
  def __call__(self, tokens: jax.Array) -> jax.Array:
    """tokens (K, L) int ids of the class prompts -> (K, N, C) L2-normalised class text."""
    # CoOp's initialisation: N(0, 0.02^2). Param 'context': (N, T, D).
    context = self.param('context', nn.initializers.normal(0.02),
                         (self.num_prompts, self.num_context, self.text.width))
    k, l = tokens.shape
    n = self.num_prompts
    # One tower call over the N * K prompts, laid out n-major: row n * K + k.
    ids = jnp.broadcast_to(tokens[None], (n, k, l)).reshape(n * k, l)
    ctx = jnp.broadcast_to(context[:, None], (n, k, *context.shape[1:])).reshape(
        n * k, *context.shape[1:])
    features = ot_layers.l2_normalize(self.text(ids, ctx))
    return features.reshape(n, k, -1).transpose(1, 0, 2)
