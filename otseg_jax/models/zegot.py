"""ZegOT: frozen CLIP, learned text prompts, MPS per tower layer, geometric-mean fusion, decoder.

A method module (`config.model.name = 'zegot'`; Kim, Oh, Ye, arXiv 2301.12171, the OTSeg
authors' earlier method; ../shared/spec/VARIANTS.md, section ZegOT):

1. Text: N CoOp context sequences of T learned vectors (`prompt_learner.CoOpText`) run through
   CLIP's frozen text tower: g (K, N, C).
2. Pixels: CLIP's image tower, frozen and without visual prompts; the patch tokens of the blocks
   in `feature_layers` through the tower's own frozen ln_post and proj (`clip.VisionTransformer.
   project_hidden`), L2-normalised: f_i (B, M, C); the global embedding f (B, C) is the last
   block's CLS token.
3. The relationship descriptor and the decoder are OTSeg's head (`otseg.OTSegHead` without its
   MPS path): g_hat = q_proj([f * g ; g]) (B, K, N, C), then `decoder_layers` decoder layers
   (softmax cross-attention by default, MPSA as an option) over the pixels of the last feature
   layer, their maps combined as OTSeg's.
4. MPS per layer: s_i = the OT score of f_i against g_hat (`ot_layers.transport_map`, every
   setting of config.ot), one solver call over the B * K * L problems.
5. Fusion: Y = prod_i sigmoid(s_i) ** (1 / L), the geometric mean of the per-layer sigmoids; the
   'score' map is logit(Y), so the loss (focal + dice, `losses.otseg_loss`) and the evaluation
   (OTSeg's ensemble and calibration) read it as OTSeg's score map.

Only the context vectors and the head train (`trainable`); both CLIP towers stay CLIP's.

Letters in shapes: B batch, K classes, N prompts per class, C embedding dim, M = h*w pixels,
L feature layers, T context vectors.
"""

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from otseg_jax import image_ops
from otseg_jax import ot
from otseg_jax.models import clip
from otseg_jax.models import ot_layers
from otseg_jax.models import otseg
from otseg_jax.models import prompt_learner

Dtype = Any

# What the seam asks of a method besides the model: OTSeg's, on ZegOT's 'decoder' and 'score'.
# eval: sigmoid(w * decoder + (1 - w) * score) - calibration on the seen classes; transductive
# pseudo-labels: sigmoid(b * score + (1 - b) * decoder) over the unseen classes.
eval_probabilities = otseg.eval_probabilities
pseudo_labels = otseg.pseudo_labels

# Fused probabilities are capped at 1 - 1e-6 before the logit (logit <= 13.8), so that the
# logit's derivative stays finite where every layer is sure.  # ours (L)
_MAX_FUSED = 1.0 - 1e-6


def get_config(name: str = 'voc') -> ml_collections.ConfigDict:
  """Model fields: ViT-B/16 CLIP at 512, both towers frozen.

  Args:
    name: 'voc' (default), 'context' (crop 480) or 'coco'. Only the crop differs (N = 4 prompts
      on every dataset, the paper's figure).
  """
  config = ml_collections.ConfigDict()
  config.name = 'zegot'  # The method: otseg_jax.models.zegot.
  config.variant = name
  # Trained: the context vectors and the head (relationship descriptor + decoder). Both CLIP
  # towers are frozen (H).
  config.trainable = r'^decode_head/|^prompt_learner/context$'
  # The class text is learned inside the model from the tokenized template.
  config.text = 'tokens'
  config.num_context = 16  # T, CoOp's default length (L)  # ours
  config.num_prompts = 4  # N (H, figure)
  # T placeholders, replaced by the context vectors (CoOp's 'X X X X {}.').
  config.text_template = ' '.join(['X'] * config.num_context) + ' {}.'
  config.clip_towers = {'backbone': 'visual', 'prompt_learner/text': 'text'}
  config.dont_load = r'^prompt_learner/context$'
  config.image_size = 512
  config.backbone = ml_collections.ConfigDict(dict(
      patch_size=16, width=768, layers=12, heads=12, output_dim=512,
      attention_query_chunk=256,  # as OTSeg's (the fastest on CPU)
      attention='auto',  # otseg.resolve_attention
      remat='none',
      mlp_dim=0,
      activation='quick_gelu',
  ))
  # CLIP ViT-B/16's text tower.
  config.text_tower = ml_collections.ConfigDict(dict(
      vocab_size=49408, context_length=77, width=512, layers=12, heads=8, mlp_dim=0))
  # Blocks (0-based, as clip.VisionTransformer.hidden_layers) whose pixels get an MPS map, fused
  # by the geometric mean. All 12 by default (L)  # ours; (11,) = 'shallow', the last layer only
  # (the paper's ablation, H).
  config.feature_layers = tuple(range(12))
  config.head = ml_collections.ConfigDict(dict(
      decoder_layers=3,  # OTSeg's decoder (L)  # ours
      num_heads=8,
      attention='softmax',  # softmax cross-attention (L)  # ours; 'mpsa' = OTSeg's, an option
      dropout=0.1,  # OTSeg's  # ours
  ))
  config.ot = ot.get_config()  # eps 0.05, uniform marginals, as OTSeg (M)
  config.dtype = 'float32'
  # Eval: OTSeg's ensemble and calibration (L)  # ours. ensemble_weight 1 = the decoder alone,
  # 0 = the fused OT map alone. The train configs set calibration per setting (0.1 inductive).
  config.ensemble_weight = 0.5
  config.calibration = 0.1
  config.pseudo_label_balance = 0.5  # transductive pseudo-labels, as OTSeg  # ours
  if name == 'voc':
    pass
  elif name == 'context':
    config.image_size = 480
  elif name == 'coco':
    pass
  else:
    raise ValueError(f'Unknown model config {name!r}: use one of voc, context, coco.')
  return config


def model_from_config(config: ml_collections.ConfigDict, dtype: Dtype = None) -> 'ZegOT':
  """The `ZegOT` module described by `config` (see `get_config`); `dtype` overrides config.dtype
  (the gradient checks run in float64)."""
  dtype = otseg.compute_dtype(config, dtype)
  if config.head.attention not in ('mpsa', 'softmax'):
    raise ValueError(f"config.head.attention={config.head.attention!r}: use 'mpsa' or 'softmax'.")
  if config.head.decoder_layers < 1:
    raise ValueError(f'config.head.decoder_layers={config.head.decoder_layers}: need at least 1.')
  b = config.backbone
  layers = tuple(int(i) for i in config.feature_layers)
  if not layers or len(set(layers)) != len(layers) or not all(0 <= i < b.layers for i in layers):
    raise ValueError(f'config.model.feature_layers={config.feature_layers!r}: distinct block '
                     f'indices in 0..{b.layers - 1} (0-based), at least one.')
  if config.text_template.split(' {}')[0].split() != ['X'] * config.num_context:
    raise ValueError(f'config.model.text_template={config.text_template!r} must start with '
                     f'num_context={config.num_context} placeholders X.')
  return ZegOT(
      vision_tower=otseg.vision_tower_fields(config, dtype, prompts=False),
      text_tower=ml_collections.FrozenConfigDict(config.text_tower),
      num_context=config.num_context,
      num_prompts=config.num_prompts,
      feature_layers=tuple(sorted(layers)),
      decoder_layers=config.head.decoder_layers,
      num_heads=config.head.num_heads,
      attention=config.head.attention,
      dropout=config.head.dropout,
      ot_config=ml_collections.FrozenConfigDict(config.ot),
      dtype=dtype)


# ---------------------------------------------------------------------------------------------
# The pieces, as pure functions.


def layer_scores(layer_pixels: jax.Array, prompts: jax.Array, ot_config: Any
                 ) -> tuple[jax.Array, jax.Array]:
  """The MPS score of every feature layer, one Sinkhorn call over all of them.

  Args:
    layer_pixels: (L, B, M, C) L2-normalised pixel embeddings of the L layers.
    prompts: (B, K, N, C) L2-normalised relationship-descriptor queries, shared by the layers.
    ot_config: see `ot.get_config`; every setting applies. With 'ott' each problem stops on its
      own, so a layer's map is what a call on that layer alone gives; with 'reference' the
      batch-wide stopping rule sees every layer's problems together.

  Returns:
    (scores (L, B, M, K): sum_n M * N * plan * sim per layer, as OTSeg's MPS map; the solver's
    iteration count).
  """
  l, b, m, c = layer_pixels.shape
  tiled = jnp.broadcast_to(prompts[None], (l, *prompts.shape)).reshape(l * b, *prompts.shape[1:])
  _, score, info = ot_layers.transport_map(layer_pixels.reshape(l * b, m, c), tiled, ot_config)
  return score.reshape(l, b, m, -1), info['iterations']


def fuse_layer_scores(scores: jax.Array) -> jax.Array:
  """logit(Y), Y = prod_i sigmoid(s_i) ** (1 / L): the geometric mean of the layers' sigmoids.

  Args:
    scores: (L, ...) per-layer logits.

  Returns:
    (...) logits whose sigmoid is Y (capped at 1 - 1e-6); with L = 1 the layer's own logits.
  """
  if scores.shape[0] == 1:
    return scores[0]
  log_y = jnp.mean(jax.nn.log_sigmoid(scores), axis=0)  # log Y, without the root's derivative
  log_y = jnp.minimum(log_y, jnp.log(_MAX_FUSED).astype(log_y.dtype))
  return log_y - jnp.log(-jnp.expm1(log_y))  # log Y - log(1 - Y)


# ---------------------------------------------------------------------------------------------
# The model.


class ZegOT(nn.Module):
  """Frozen CLIP towers + CoOp prompts + OTSeg's head (no MPS path) + per-layer MPS + fusion."""
  vision_tower: Any  # clip.VisionTransformer's keyword arguments (otseg.vision_tower_fields)
  text_tower: Any  # vocab_size, context_length, width, layers, heads, mlp_dim of CLIP's
  num_context: int
  num_prompts: int
  feature_layers: Sequence[int]
  ot_config: Any
  decoder_layers: int = 3
  num_heads: int = 8
  attention: str = 'softmax'
  dropout: float = 0.0
  dtype: Dtype = jnp.float32

  def setup(self):
    v = self.vision_tower
    self.backbone = clip.VisionTransformer(**v, hidden_layers=tuple(self.feature_layers),
                                           project_hidden=True, dtype=self.dtype)
    t = self.text_tower
    # Built here so that its parameters live under prompt_learner/text (CLIP's 'text' tower).
    text = clip.TextTransformer(
        vocab_size=t.vocab_size, context_length=t.context_length, width=t.width,
        layers=t.layers, heads=t.heads, output_dim=v['output_dim'], mlp_dim=t.get('mlp_dim', 0),
        activation=v['activation'], dtype=self.dtype)
    self.prompt_learner = prompt_learner.CoOpText(
        text=text, num_context=self.num_context, num_prompts=self.num_prompts)
    self.decode_head = otseg.OTSegHead(
        embed_dims=v['output_dim'], ot_config=self.ot_config,
        decoder_layers=self.decoder_layers, num_heads=self.num_heads, attention=self.attention,
        use_mps=False, dropout=self.dropout, dtype=self.dtype)

  def encode_text(self, tokens: jax.Array, *, train: bool) -> jax.Array:
    """(K, L) class prompt ids -> (K, N, C) learned class text, L2-normalised."""
    del train  # No dropout in the text path.
    return ot_layers.at_least_f32(self.prompt_learner(tokens))

  def encode_image(self, images: jax.Array) -> tuple[jax.Array, jax.Array]:
    """images (B, H, W, 3) -> (layer pixels (L, B, h, w, C), global (B, C)), L2-normalised."""
    global_, dense, hidden = self.backbone(images, train=False)  # frozen: no dropout anywhere
    b, h, w, c = dense.shape
    # The patch tokens of each feature layer (after the CLS token).
    pixels = jnp.stack([hidden[i][:, -h * w:].reshape(b, h, w, c) for i in self.feature_layers])
    # Cosines feed the Sinkhorn costs: float32 at least, as OTSeg's encode_image.
    pixels = ot_layers.l2_normalize(ot_layers.at_least_f32(pixels))
    return pixels, ot_layers.l2_normalize(ot_layers.at_least_f32(global_))

  def __call__(self, images: jax.Array, text: jax.Array, *,
               train: bool) -> tuple[dict[str, jax.Array], dict[str, Any]]:
    """Logit maps at the input resolution, and the intermediates.

    Args:
      images: (B, H, W, 3) normalised images.
      text: (K, N, C) L2-normalised learned class text, from `encode_text`.
      train: dropout in the decoder (rng 'dropout').

    Returns:
      maps: 'decoder' (B, H, W, K) the decoder's logits; 'score' (B, H, W, K) the fused OT map's
        logits, logit(Y).
      aux: 'layer_scores' (L, B, h, w, K) the per-layer MPS maps; 'score_lowres',
        'decoder_lowres' (B, h, w, K); 'pixels' (L, B, h, w, C), 'global' (B, C); 'q_proj' and the
        decoder's 'layer_maps'; 'sinkhorn_iterations_by_path' ({'mps': .., 'layers_i': ..}).
    """
    pixels, global_ = self.encode_image(images)
    num_layers, b, h, w, c = pixels.shape
    if text.ndim != 3 or text.shape[-1] != c:
      raise ValueError(f'text has shape {text.shape}, expected (K, N, {c}).')
    # Relationship descriptor and decoder over the last feature layer's pixels.  # ours (L)
    out = self.decode_head(pixels[-1], global_, text, train=train)
    scores, iterations = layer_scores(pixels.reshape(num_layers, b, h * w, c),
                                      ot_layers.l2_normalize(out['q_proj']), self.ot_config)
    scores = scores.reshape(num_layers, b, h, w, -1)
    fused = fuse_layer_scores(scores)
    size = images.shape[1:3]
    maps = {'decoder': image_ops.resize_bilinear(out['decoder'], size),
            'score': image_ops.resize_bilinear(fused, size)}
    aux = {'layer_scores': scores, 'score_lowres': fused, 'decoder_lowres': out['decoder'],
           'pixels': pixels, 'global': global_, 'q_proj': out['q_proj'],
           'layer_maps': out['layer_maps'],
           'sinkhorn_iterations_by_path': {'mps': iterations,
                                           **out['sinkhorn_iterations_by_path']}}
    return maps, aux
