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

import flax.linen as nn
import jax

from otseg_jax.models import clip
from otseg_jax.models import ot_layers


class CoOpText(nn.Module):
  """`num_context` learned vectors + CLIP's text tower: (K, L) ids -> (K, 1, C).

  Attributes:
    text: the text tower (`CLIPSpec.text_tower()`), a submodule named 'text'.
    num_context: T, the placeholder tokens after SOT that the learned vectors replace.
  """
  text: clip.TextTransformer
  num_context: int

  @nn.compact
  def __call__(self, tokens: jax.Array) -> jax.Array:
    """tokens (K, L) int ids of the class prompts -> (K, 1, C) L2-normalised class text."""
    # CoOp's initialisation: N(0, 0.02^2).
    context = self.param('context', nn.initializers.normal(0.02),
                         (self.num_context, self.text.width))
    return ot_layers.l2_normalize(self.text(tokens, context))[:, None, :]
