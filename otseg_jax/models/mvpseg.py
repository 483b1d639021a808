"""MVP-SEG: multi-view learned prompts over frozen CLIP dense features (arXiv 2304.06957).

A method module (`config.model.name = 'mvpseg'`, see `otseg_jax/models/__init__.py`), after
../shared/spec/VARIANTS.md, section MVP-SEG (H = the paper, M = secondary sources, L = ours):

- Prompts (M): p_0 (the global prompt) and p_1..p_k (segmentation views), each l learned vectors
  in place of the template's placeholder tokens, CoOp-style (`prompt_learner.CoOpText` with
  N = 1 + k context sequences); t_i[c] = normalize(T([p_i ; name_c])), T the frozen text tower.
- Dense features (L): the frozen image tower's last-block patch tokens through ln_post and proj,
  L2-normalised: F (B, h, w, C). (The paper uses MaskCLIP features of a ResNet CLIP.)
- Per-view masks M_i[b, c, m] = <F[b, m], t_i[c]>; fused mask m_f = softmax_c(tau1 * sum_{i>=1}
  M_i) (M); tau1 learned, init 100 (L).
- Global Prompt Refining (M): a[c] = softmax_m(gamma * M_0[c]), g[c] = sigmoid(<M_0[c], a[c]> /
  tau2); the refined mask is m_f[c] * g[c].
- OCLoss (M) = sum_{1<=i<j<=k} |cos(mean_l p_i, mean_l p_j)|, or (flag, L) the same on the
  views' text embeddings averaged over the classes.
- Only the prompts, tau1 and tau2 train; both towers stay frozen (M). `hosted` (L, a deviation
  from the paper) adds OTSeg's deep visual prompts to the image tower and trains them too.

`__call__` returns the maps the loss (`losses.mvpseg_loss`) and the evaluation read: 'fused'
(B, H, W, K) the logits tau1 * sum_i M_i (softmax gives m_f), 'gate' (B, K) the GPR logits
<M_0, a> / tau2 (sigmoid gives g), and 'ocloss' (B,) the orthogonality term, computed once from
the prompts by `encode_text` and repeated per example so that the loss sees it.

MVP-SEG+ (M: pseudo-labels from MVP-SEG, then self-training) is the trainer's transductive path
with this module's `pseudo_labels`: started from an inductive MVP-SEG run (`init_from`), the
model being trained labels the unseen pixels with its own refined mask at every step (the teacher
is the model itself, as OTSeg's transductive mode; no frozen second copy).

Letters: B batch, K classes, V = 1 + k prompts (view 0 is the global prompt), l prompt length,
D text-tower width, C embedding dim, (h, w) token grid, M = h * w, (H, W) image size.
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
from otseg_jax.models import otseg
from otseg_jax.models import prompt_learner

Dtype = Any

# The image tower's prompt parameters (hosted mode), as clip.VisionTransformer names them.
VISUAL_PROMPTS = r'^backbone/(prompt_embeddings|deep_prompt_embeddings|prompt_proj|prompt_norm)'


def get_config(name: str = 'voc') -> ml_collections.ConfigDict:
  """Model fields: CLIP ViT-B/16 at 512 (both towers OpenAI's), k = 3 views of length 16.

  Args:
    name: 'voc' (default), 'context' (crop 480) or 'coco'; only the crop differs.
  """
  config = ml_collections.ConfigDict()
  config.name = 'mvpseg'  # The method: otseg_jax.models.mvpseg.
  config.variant = name
  # Trained: the prompts (p_0..p_k), tau1, tau2 (M); the visual prompts exist only when hosted.
  config.trainable = rf'^prompt_learner/context$|^log_tau[12]$|{VISUAL_PROMPTS}'
  config.text = 'tokens'  # The class names, tokenized into the template: the prompts are learned.
  config.num_views = 3  # k, segmentation views besides the global prompt (M: best on COCO-Stuff)
  config.prompt_length = 16  # l  # ours (L, CoOp's default)
  config.text_template = ' '.join(['X'] * config.prompt_length) + ' {}.'
  config.clip_towers = {'backbone': 'visual', 'prompt_learner/text': 'text'}
  config.dont_load = rf'^prompt_learner/context$|^log_tau[12]$|{VISUAL_PROMPTS}'
  config.image_size = 512
  config.backbone = ml_collections.ConfigDict(dict(
      patch_size=16, width=768, layers=12, heads=12, output_dim=512,
      # Hosted mode only (config.hosted): OTSeg's deep visual prompts, its VOC values.
      num_prompt_tokens=10, prompt_depth=11, prompt_dropout=0.1,
      attention_query_chunk=256, attention='auto', remat='none', mlp_dim=0,
      activation='quick_gelu'))
  config.text_tower = ml_collections.ConfigDict(dict(
      vocab_size=49408, context_length=77, width=512, layers=12, heads=8, mlp_dim=0))
  # The paper's model: no visual prompts, no decoder (M). True: OTSeg's deep visual prompts in the
  # image tower, trained with the text prompts (a deviation, L).
  config.hosted = False
  config.tau1 = 100.0  # fused-mask temperature, learned from this init  # ours (L)
  config.tau2 = 0.07  # GPR gate temperature  # ours (L)
  config.learn_tau2 = True  # False: tau2 stays a constant  # ours (L)
  config.gamma = 1.0  # GPR pooling sharpness, fixed  # ours (L)
  # 'prompts': OCLoss on the prompt vectors averaged over their l tokens (M); 'text': on the
  # views' text embeddings averaged over the classes (L).
  config.ocloss_on = 'prompts'
  config.dtype = 'float32'
  # Eval: softmax(fused) * sigmoid(gate), minus `calibration` on the seen classes (0: none).
  config.calibration = 0.0  # ours (L)
  # MVP-SEG+ pseudo-labels: unseen pixels whose refined probability is below this are ignored.
  config.pseudo_label_threshold = 0.0  # ours (L)
  if name == 'voc':
    pass
  elif name == 'context':
    config.image_size = 480
  elif name == 'coco':
    pass
  else:
    raise ValueError(f'Unknown model config {name!r}: use one of voc, context, coco.')
  return config


def model_from_config(config: ml_collections.ConfigDict, dtype: Dtype = None) -> 'MVPSeg':
  """The `MVPSeg` module described by `config` (see `get_config`)."""
  dtype = otseg.compute_dtype(config, dtype)
  if config.num_views < 1:
    raise ValueError(f'config.model.num_views={config.num_views}: need at least 1 view.')
  if config.ocloss_on not in ('prompts', 'text'):
    raise ValueError(f"config.model.ocloss_on={config.ocloss_on!r}: use 'prompts' or 'text'.")
  placeholders = config.text_template.split().count('X')
  if placeholders != config.prompt_length:
    raise ValueError(f'config.model.text_template has {placeholders} placeholder X tokens but '
                     f'prompt_length={config.prompt_length}: set both (the template needs one X '
                     'per learned vector).')
  return MVPSeg(
      vision_tower=otseg.vision_tower_fields(config, dtype, prompts=config.hosted),
      text_tower=ml_collections.FrozenConfigDict(config.text_tower),
      num_views=config.num_views, prompt_length=config.prompt_length,
      tau1=config.tau1, tau2=config.tau2, learn_tau2=config.learn_tau2, gamma=config.gamma,
      ocloss_on=config.ocloss_on, dtype=dtype)


# ---------------------------------------------------------------------------------------------
# The pieces, as pure functions (the tests check each against NumPy).


def view_masks(dense: jax.Array, text: jax.Array) -> jax.Array:
  """Cosine masks of the views: dense (B, h, w, C), text (K, V, C), both unit -> (B, V, h, w, K)."""
  return jnp.einsum('bhwc,kvc->bvhwk', dense, text)


def fused_logits(views: jax.Array, tau1: jax.Array) -> jax.Array:
  """tau1 * sum_{i=1..k} M_i: (B, V, h, w, K) -> (B, h, w, K); softmax over K gives m_f."""
  return tau1 * jnp.sum(views[:, 1:], axis=1)


def global_gate_logits(global_mask: jax.Array, gamma: float, tau2: jax.Array) -> jax.Array:
  """GPR: <M_0[c], softmax_m(gamma * M_0[c])> / tau2, (B, h, w, K) -> (B, K); sigmoid gives g."""
  b, h, w, k = global_mask.shape
  m0 = global_mask.reshape(b, h * w, k)
  attention = jax.nn.softmax(gamma * m0, axis=1)  # over the pixels
  return jnp.sum(m0 * attention, axis=1) / tau2


def orthogonality_loss(vectors: jax.Array) -> jax.Array:
  """OCLoss: sum_{i<j} |cos(v_i, v_j)| over the rows of vectors (k, D) -> ().

  k identical rows give k (k - 1) / 2, mutually orthogonal rows give 0.
  """
  v = ot_layers.l2_normalize(vectors)
  cos = v @ v.T
  k = v.shape[0]
  upper = jnp.triu(jnp.ones((k, k), bool), 1)
  return jnp.sum(jnp.where(upper, jnp.abs(cos), 0.0))


def refined_probabilities(maps: Mapping[str, jax.Array]) -> jax.Array:
  """m_f * g: softmax_K(fused) (B, H, W, K) times sigmoid(gate) (B, K), per pixel and class."""
  fused = jax.nn.softmax(maps['fused'].astype(jnp.float32), axis=-1)
  return fused * jax.nn.sigmoid(maps['gate'].astype(jnp.float32))[:, None, None, :]


# ---------------------------------------------------------------------------------------------
# What the trainer and the evaluator ask of a method.


def eval_probabilities(maps: Mapping[str, jax.Array], seen: jax.Array,
                       config: ml_collections.ConfigDict) -> jax.Array:
  """The refined mask m_f * g over every class (B, H, W, K), minus `calibration` on the seen
  classes (0 by default: the paper names none)."""
  probs = refined_probabilities(maps)
  seen = jnp.asarray(seen, bool)
  if seen.shape != (probs.shape[-1],):
    raise ValueError(f'seen mask has shape {seen.shape}, expected ({probs.shape[-1]},): one '
                     'flag per class of the text.')
  return probs - config.calibration * seen.astype(probs.dtype)


def pseudo_labels(maps: Mapping[str, jax.Array], labels: jax.Array, seen: np.ndarray,
                  config: ml_collections.ConfigDict) -> jax.Array:
  """MVP-SEG+ targets: pixels whose ground truth is an unseen class get the unseen class of
  largest refined probability m_f * g (no gradient), or 255 below
  `config.pseudo_label_threshold`; every other pixel keeps its label.

  Args:
    maps: 'fused' (B, H, W, K), 'gate' (B, K): the training forward's maps over ALL classes.
    labels: (B, H, W) int, global class ids or 255 (the transductive visibility mapping).
    seen: (K,) bool numpy.
    config: the model config.

  Returns:
    (B, H, W) int32.
  """
  probs = jax.lax.stop_gradient(refined_probabilities(maps))
  seen = np.asarray(seen, bool)
  probs = jnp.where(jnp.asarray(seen), -1.0, probs)
  pseudo = jnp.argmax(probs, axis=-1).astype(jnp.int32)
  confident = jnp.max(probs, axis=-1) >= config.pseudo_label_threshold
  pseudo = jnp.where(confident, pseudo, 255)
  is_unseen_px = jnp.isin(labels, jnp.asarray(np.flatnonzero(~seen).astype(np.int32)))
  return jnp.where(is_unseen_px, pseudo, labels.astype(jnp.int32))


# ---------------------------------------------------------------------------------------------
# The model.


class MVPSeg(nn.Module):
  """Frozen CLIP image tower + V = 1 + k learned prompts through the frozen text tower."""
  vision_tower: Any  # clip.VisionTransformer's keyword arguments (otseg.vision_tower_fields)
  text_tower: Any  # vocab_size, context_length, width, layers, heads, mlp_dim of CLIP's
  num_views: int
  prompt_length: int
  tau1: float
  tau2: float
  learn_tau2: bool = True
  gamma: float = 1.0
  ocloss_on: str = 'prompts'
  dtype: Dtype = jnp.float32

  def setup(self):
    v, t = self.vision_tower, self.text_tower
    self.backbone = clip.VisionTransformer(**v, dtype=self.dtype)
    self.prompt_learner = prompt_learner.CoOpText(
        text=clip.TextTransformer(
            vocab_size=t.vocab_size, context_length=t.context_length, width=t.width,
            layers=t.layers, heads=t.heads, output_dim=v['output_dim'],
            mlp_dim=t.get('mlp_dim', 0), activation=v['activation'], dtype=self.dtype),
        num_context=self.prompt_length, num_prompts=1 + self.num_views)
    # Temperatures as logs: positive whatever the updates.
    self.log_tau1 = self.param('log_tau1', nn.initializers.constant(np.log(self.tau1)), ())
    if self.learn_tau2:
      self.log_tau2 = self.param('log_tau2', nn.initializers.constant(np.log(self.tau2)), ())

  def encode_text(self, tokens: jax.Array, *, train: bool) -> dict[str, jax.Array]:
    """(K, L) class prompt ids -> {'text': (K, V, C) unit embeddings t_i[c], 'ocloss': ()}."""
    del train  # no dropout in the text path
    text = ot_layers.at_least_f32(self.prompt_learner(tokens))
    if self.ocloss_on == 'prompts':
      context = self.prompt_learner.variables['params']['context']  # (V, l, D)
      vectors = jnp.mean(context[1:], axis=1)  # (k, D): the views, not the global prompt
    else:
      vectors = jnp.mean(text[:, 1:], axis=0)  # (k, C): each view's text, over the classes
    return {'text': text, 'ocloss': orthogonality_loss(vectors.astype(jnp.float32))}

  def __call__(self, images: jax.Array, text: Mapping[str, jax.Array], *,
               train: bool) -> tuple[dict[str, jax.Array], dict[str, Any]]:
    """Maps at the input resolution and the intermediates.

    Args:
      images: (B, H, W, 3) normalised images.
      text: `encode_text`'s output over the K classes of this forward.
      train: train mode (visual prompt dropout when hosted; rng 'dropout').

    Returns:
      maps: 'fused' (B, H, W, K) logits, 'gate' (B, K) logits, 'ocloss' (B,).
      aux: 'views' (B, V, h, w, K) the cosine masks (view 0: M_0), 'fused_lowres' (B, h, w, K),
        'dense' (B, h, w, C) the normalised features, 'tau1', 'tau2' ().
    """
    t = text['text']
    c = self.vision_tower['output_dim']
    if t.ndim != 3 or t.shape[1] != 1 + self.num_views or t.shape[-1] != c:
      raise ValueError(f'text has shape {t.shape}, expected (K, {1 + self.num_views}, {c}): '
                       'classes x (1 + num_views) x embedding dim.')
    _, dense, _ = self.backbone(images, train=train)
    dense = ot_layers.l2_normalize(ot_layers.at_least_f32(dense))
    views = view_masks(dense, t.astype(dense.dtype))
    tau1 = jnp.exp(self.log_tau1)
    tau2 = jnp.exp(self.log_tau2) if self.learn_tau2 else jnp.asarray(self.tau2, jnp.float32)
    fused = fused_logits(views, tau1)
    gate = global_gate_logits(views[:, 0], self.gamma, tau2)
    maps = {'fused': image_ops.resize_bilinear(fused, images.shape[1:3]), 'gate': gate,
            'ocloss': jnp.broadcast_to(text['ocloss'], (images.shape[0],))}
    aux = {'views': views, 'fused_lowres': fused, 'dense': dense, 'tau1': tau1, 'tau2': tau2}
    return maps, aux
