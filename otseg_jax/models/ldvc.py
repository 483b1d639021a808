"""LDVC (arXiv 2403.08426): deep vision-language prompts, class anchors and route attention.

A method module (`config.model.name = 'ldvc'`, otseg_jax/models/__init__.py): `get_config`,
`model_from_config`, `eval_probabilities`, `pseudo_labels`, and the optional hook
`init_after_load`. ../shared/spec/VARIANTS.md, section LDVC, says what is the paper's (H), a
secondary source's (M) or ours (L); the configs mark ours.

  text      deep text prompts: n_t learned tokens replace the tokens after SOT at the input of
            every layer of CLIP's frozen text tower, initialised from the hidden states of the
            hand template ('a photo of a {}.': its 4 words are the replaced tokens) -> t (K, C)
  image     CLIP's image tower with OTSeg's deep visual prompts -> dense f (B, h, w, C) and global
            g (B, C), both L2-normalised
  anchors   the relationship descriptor t_hat[b, k] = q_proj([g_b * t_k ; t_k]) (B, K, C)
  decoder   visual tokens X = f are the queries; per layer (pre-norm):
              X += RouteAttention(LN X)            (BiFormer's bi-level routing, route_attention)
              X += CrossAttn(q = LN X, k = v = t_hat)   (the anchors are never updated)
              X += FFN(LN X)
  masks     logits[b, m, k] = tau * <normalize(LN X_m), normalize(t_hat_k)>, upsampled; focal +
            dice (`losses.map_losses` on the one map 'decoder')

Letters: B batch, K classes, C embedding width, (h, w) token grid, M = h * w, (H, W) image size.
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
from otseg_jax.models import route_attention

Dtype = Any


def get_config(name: str = 'voc') -> ml_collections.ConfigDict:
  """Model fields at ViT-B/16 and 512 px (`name`: 'voc', 'context' (480 px) or 'coco').

  Values the paper does not give are ours (L, VARIANTS.md), marked so.
  """
  config = ml_collections.ConfigDict()
  config.name = 'ldvc'
  config.variant = name
  # Trained: the deep visual prompts (backbone/prompt_*), the deep text prompts
  # (text_encoder/deep_prompts) and the decode head; both CLIP towers are frozen.
  config.trainable = r'(^|/)decode_head/|prompt'
  # The class text is learned inside the step: the class names filled into the hand template and
  # tokenized, (K, L), run through the text tower with the deep prompts.
  config.text = 'tokens'
  # The hand template whose words after SOT the deep text prompts replace and are initialised
  # from: 'a photo of a' is 4 tokens in CLIP's BPE (and in the synthetic world's).
  config.text_template = 'a photo of a {}.'  # (M)
  config.clip_towers = {'backbone': 'visual', 'text_encoder/text': 'text'}
  config.dont_load = 'prompt'
  config.image_size = 512
  # The image tower: OTSeg's VPT backbone fields (otseg.get_config), deep prompts as OTSeg's (H/M).
  config.backbone = otseg.get_config('voc').backbone
  # CLIP ViT-B/16's text tower (the CLIP's; heads are not in the weights).
  config.text_tower = ml_collections.ConfigDict(dict(
      vocab_size=49408, context_length=77, width=512, layers=12, heads=8, mlp_dim=0))
  config.text_prompts = ml_collections.ConfigDict(dict(
      length=4,  # n_t: the template's 4 words (M)
      depth=12,  # layers with their own prompts: every layer of the tower (M)
  ))
  config.head = ml_collections.ConfigDict(dict(
      decoder_layers=3,  # N_d, ours (L)
      num_heads=8,  # route and cross-attention heads, ours (L)
      windows=8,  # S: S x S windows (4 x 4 tokens at 32 x 32), ours (L)
      topk=4,  # routed windows per window, ours (L; BiFormer's stage 3 keeps 4)
      local_kernel=5,  # BiFormer's LCE depthwise conv; 0 = off
      mlp_ratio=4,  # FFN width / C, ours (L)
      dropout=0.1,  # on the attention and FFN outputs, ours (L; OTSeg's head dropout)
      logit_scale=1 / 0.07,  # tau of the cosine mask logits, fixed, ours (L: CLIP's initial)
      final_norm=True,  # LN on the decoder's output before the cosine, ours (L)
  ))
  config.dtype = 'float32'
  # Eval: sigmoid(logits) minus `calibration` on the seen channels (OTSeg's, L); the train
  # configs set 0 outside the inductive setting.
  config.calibration = 0.1
  if name == 'voc':
    pass
  elif name == 'context':
    config.image_size = 480
    config.head.windows = 6  # 30 x 30 tokens: windows of 5 x 5, ours (L)
  elif name == 'coco':
    config.backbone.num_prompt_tokens = 100  # as OTSeg's COCO config (M)
  else:
    raise ValueError(f'Unknown model config {name!r}: use one of voc, context, coco.')
  return config


def text_tower(config: ml_collections.ConfigDict, dtype: Dtype = jnp.float32
               ) -> clip.TextTransformer:
  """CLIP's text tower of `config.text_tower` (the activation is the backbone's: one per CLIP)."""
  t = config.text_tower
  return clip.TextTransformer(
      vocab_size=t.vocab_size, context_length=t.context_length, width=t.width, layers=t.layers,
      heads=t.heads, output_dim=config.backbone.output_dim, mlp_dim=t.get('mlp_dim', 0),
      activation=config.backbone.get('activation', 'quick_gelu'), dtype=dtype)


def model_from_config(config: ml_collections.ConfigDict, dtype: Dtype = None) -> 'LDVC':
  """The `LDVC` module of `config` (see `get_config`); `dtype` overrides `config.dtype`."""
  dtype = otseg.compute_dtype(config, dtype)
  h = config.head
  if h.decoder_layers < 1:
    raise ValueError(f'config.model.head.decoder_layers={h.decoder_layers}: need at least 1.')
  if not 1 <= h.topk <= h.windows**2:
    raise ValueError(f'config.model.head.topk={h.topk}: use 1 .. windows^2 = {h.windows**2}.')
  p = config.text_prompts
  if not 0 <= p.depth <= config.text_tower.layers:
    raise ValueError(f'config.model.text_prompts.depth={p.depth}: use 0 .. the text tower\'s '
                     f'{config.text_tower.layers} layers.')
  return LDVC(config=ml_collections.FrozenConfigDict(config),
              vision_tower=otseg.vision_tower_fields(config, dtype), dtype=dtype)


# ---------------------------------------------------------------------------------------------
# What the trainer and the evaluator ask of a method besides the model.


def eval_probabilities(maps: Mapping[str, jax.Array], seen: jax.Array,
                       config: ml_collections.ConfigDict) -> jax.Array:
  """sigmoid(maps['decoder']) (B, H, W, K) minus `config.calibration` on the seen classes."""
  logits = maps['decoder']
  seen = jnp.asarray(seen, bool)
  if seen.shape != (logits.shape[-1],):
    raise ValueError(f'seen mask has shape {seen.shape}, expected ({logits.shape[-1]},).')
  return jax.nn.sigmoid(logits) - config.calibration * seen.astype(logits.dtype)


def pseudo_labels(maps: Mapping[str, jax.Array], labels: jax.Array, seen: np.ndarray,
                  config: ml_collections.ConfigDict) -> jax.Array:
  """Transductive targets: pixels labelled with an unseen class get the argmax over the unseen
  classes of the (gradient-free) decoder logits; every other pixel keeps its label. (B, H, W)."""
  del config
  seen = np.asarray(seen, bool)
  logits = jnp.where(jnp.asarray(seen), -jnp.inf, jax.lax.stop_gradient(maps['decoder']))
  pseudo = jnp.argmax(logits, axis=-1).astype(jnp.int32)
  unseen_px = jnp.isin(labels, jnp.asarray(np.flatnonzero(~seen).astype(np.int32)))
  return jnp.where(unseen_px, pseudo, labels.astype(jnp.int32))


# ---------------------------------------------------------------------------------------------
# The optional hook: the deep text prompts start from the hand template's hidden states, which
# only exist once CLIP's text tower is loaded.


def block_inputs(tower: clip.TextTransformer, params: Any, token_ids: np.ndarray) -> np.ndarray:
  """The input of every block of the plain text tower: (layers, B, L, width).

  Block 0's is the token embeddings plus the positions; block i's the output of block i - 1.
  """
  token_ids = np.asarray(token_ids)
  _, state = tower.apply({'params': params}, token_ids, capture_intermediates=True,
                         mutable=['intermediates'])
  blocks = state['intermediates']['transformer']
  embed = np.asarray(params['token_embedding']['embedding'])[token_ids]
  first = embed + np.asarray(params['positional_embedding'])[:token_ids.shape[1]]
  rest = [np.asarray(blocks[f'resblocks_{i}']['__call__'][0]) for i in range(tower.layers - 1)]
  return np.stack([first, *rest])


def init_after_load(params: Mapping[str, Any], text_input: np.ndarray,
                    config: ml_collections.ConfigDict) -> dict:
  """`params` with text_encoder/deep_prompts set to the hand template's hidden states.

  Called by `trainer.init_params` after the CLIP towers are merged (and not when the parameters
  come from `init_from`). The template's words are the tokens 1..n_t of every class prompt
  (`config.text_template`), the same in every row; the tower is causal, so their hidden states do
  not depend on the class name, and the deep prompts start as exactly the plain template.

  Args:
    params: the model's initial parameters (numpy), CLIP's towers in place.
    text_input: (K, L) the class prompt token ids (`config.text`: 'tokens').
    config: the model config.
  """
  n, depth = config.text_prompts.length, config.text_prompts.depth
  if n == 0 or depth == 0:
    return dict(params)
  tokens = np.asarray(text_input)
  prefix = tokens[:, :1 + n]
  if tokens.shape[1] <= 1 + n or not (prefix == prefix[:1]).all():
    raise ValueError(
        f'config.model.text_prompts.length={n}: the deep text prompts replace the {n} tokens '
        f'after SOT of the template {config.text_template!r}, which must be the same in every '
        'class prompt and precede the class name; set the length to the number of the '
        "template's tokens before the name.")
  text = params['text_encoder']['text']
  hidden = block_inputs(text_tower(config), text, prefix[:1])  # (layers, 1, 1 + n, width)
  prompts = hidden[:depth, 0, 1:].astype(np.asarray(params['text_encoder']['deep_prompts']).dtype)
  return {**params, 'text_encoder': {**params['text_encoder'], 'deep_prompts': prompts}}


# ---------------------------------------------------------------------------------------------
# The model.


class DeepPromptText(nn.Module):
  """Deep text prompts in CLIP's text tower: (K, L) ids -> (K, C) L2-normalised class text.

  Attributes:
    text: the frozen text tower, a submodule named 'text'.
    length: n_t, the tokens after SOT the prompts replace at every prompted layer.
    depth: the layers 0..depth-1 whose inputs get their own prompts.
  Param 'deep_prompts': (depth, n_t, width); `init_after_load` sets it to the hand template's
  hidden states (the random init here only gives its shape).
  """
  text: clip.TextTransformer
  length: int
  depth: int

  @nn.compact
  def __call__(self, tokens: jax.Array) -> jax.Array:
    prompts = self.param('deep_prompts', nn.initializers.normal(0.02),
                         (self.depth, self.length, self.text.width))
    deep = prompts if self.length and self.depth else None
    return ot_layers.l2_normalize(self.text(tokens, deep_context=deep))


class AnchorCrossAttention(nn.Module):
  """Multi-head softmax cross-attention of the visual tokens to the class anchors.

  queries (B, M, C), anchors (B, K, C) -> (B, M, C); softmax over the K anchors.
  """
  num_heads: int
  dropout: float = 0.0
  dtype: Dtype = None

  @nn.compact
  def __call__(self, x: jax.Array, anchors: jax.Array, *, train: bool) -> jax.Array:
    b, m, c = x.shape
    k = anchors.shape[1]
    h = self.num_heads
    if c % h:
      raise ValueError(f'AnchorCrossAttention: width {c} is not divisible by num_heads={h}.')
    d = c // h
    q = ot_layers.dense(c, self.dtype, 'q')(x).reshape(b, m, h, d) * d**-0.5
    kk = ot_layers.dense(c, self.dtype, 'k')(anchors).reshape(b, k, h, d)
    v = ot_layers.dense(c, self.dtype, 'v')(anchors).reshape(b, k, h, d)
    logits = ot_layers.at_least_f32(jnp.einsum('bmhd,bkhd->bhmk', q, kk))
    weights = nn.Dropout(self.dropout)(jax.nn.softmax(logits, axis=-1), deterministic=not train)
    out = jnp.einsum('bhmk,bkhd->bmhd', weights.astype(v.dtype), v).reshape(b, m, c)
    return ot_layers.dense(c, self.dtype, 'proj')(out)


class LDVCDecoderLayer(nn.Module):
  """Pre-norm: X += RouteAttn(LN X); X += CrossAttn(LN X, anchors); X += FFN(LN X)."""
  num_heads: int
  windows: int
  topk: int
  local_kernel: int = 5
  mlp_ratio: int = 4
  dropout: float = 0.0
  dtype: Dtype = None

  @nn.compact
  def __call__(self, x: jax.Array, anchors: jax.Array, *,
               train: bool) -> tuple[jax.Array, jax.Array]:
    """x (B, h, w, C), anchors (B, K, C) -> (x (B, h, w, C), routes (B, S^2, k))."""
    b, h, w, c = x.shape
    drop = lambda y: nn.Dropout(self.dropout)(y, deterministic=not train)
    y, info = route_attention.RouteAttention(
        self.num_heads, self.windows, self.topk, self.local_kernel, dtype=self.dtype,
        name='route_attn')(ot_layers.layer_norm(self.dtype, 'norm1')(x))
    x = x + drop(y)
    y = AnchorCrossAttention(self.num_heads, self.dropout, self.dtype, name='cross_attn')(
        ot_layers.layer_norm(self.dtype, 'norm2')(x).reshape(b, h * w, c), anchors, train=train)
    x = x + drop(y.reshape(b, h, w, c))
    y = ot_layers.layer_norm(self.dtype, 'norm3')(x)
    y = nn.gelu(ot_layers.dense(self.mlp_ratio * c, self.dtype, 'linear1')(y))
    x = x + drop(ot_layers.dense(c, self.dtype, 'linear2')(drop(y)))
    return ot_layers.at_least_f32(x), info['routes']


class LDVCHead(nn.Module):
  """Relationship descriptor + route-attention decoder + cosine mask logits."""
  embed_dims: int
  decoder_layers: int = 3
  num_heads: int = 8
  windows: int = 8
  topk: int = 4
  local_kernel: int = 5
  mlp_ratio: int = 4
  dropout: float = 0.0
  logit_scale: float = 1 / 0.07
  final_norm: bool = True
  dtype: Dtype = None

  @nn.compact
  def __call__(self, dense: jax.Array, global_: jax.Array, text: jax.Array, *,
               train: bool) -> dict[str, Any]:
    """dense (B, h, w, C), global_ (B, C), text (K, C), all L2-normalised ->
    'decoder' (B, h, w, K) logits, 'anchors' (B, K, C), 'tokens' (B, h, w, C) the decoder's
    normalised output, 'routes' (N_d, B, S^2, k) each layer's routed windows."""
    b, _, _, c = dense.shape
    if text.ndim != 2 or text.shape[-1] != c:
      raise ValueError(f'text has shape {text.shape}, expected (K, {c}): the class text of '
                       '`encode_text`.')
    t = jnp.broadcast_to(text.astype(dense.dtype)[None, :, None], (b, text.shape[0], 1, c))
    anchors = ot_layers.at_least_f32(ot_layers.dense(self.embed_dims, self.dtype, 'q_proj')(
        ot_layers.relationship_features(global_, t)))[:, :, 0]  # (B, K, C)
    x, routes = dense, []
    for i in range(self.decoder_layers):
      x, r = LDVCDecoderLayer(self.num_heads, self.windows, self.topk, self.local_kernel,
                              self.mlp_ratio, self.dropout, self.dtype, name=f'layers_{i}')(
          x, anchors, train=train)
      routes.append(r)
    if self.final_norm:
      x = ot_layers.layer_norm(self.dtype, 'norm')(x)
    x = ot_layers.l2_normalize(x)
    logits = self.logit_scale * jnp.einsum('bhwc,bkc->bhwk', x,
                                           ot_layers.l2_normalize(anchors))
    return {'decoder': logits, 'anchors': anchors, 'tokens': x, 'routes': jnp.stack(routes)}


class LDVC(nn.Module):
  """Deep-prompted CLIP towers + `LDVCHead` + bilinear upsampling to the input size."""
  config: Any  # the model config, frozen
  vision_tower: Any  # clip.VisionTransformer's keyword arguments (otseg.vision_tower_fields)
  dtype: Dtype = jnp.float32

  def setup(self):
    c = self.config
    b = c.backbone
    self.backbone = clip.VisionTransformer(**self.vision_tower, double_class_embedding=True,
                                           dtype=self.dtype)
    self.text_encoder = DeepPromptText(text=text_tower(c, self.dtype),
                                       length=c.text_prompts.length, depth=c.text_prompts.depth)
    h = c.head
    self.decode_head = LDVCHead(
        embed_dims=b.output_dim, decoder_layers=h.decoder_layers, num_heads=h.num_heads,
        windows=h.windows, topk=h.topk, local_kernel=h.local_kernel, mlp_ratio=h.mlp_ratio,
        dropout=h.dropout, logit_scale=h.logit_scale, final_norm=h.get('final_norm', True),
        dtype=self.dtype)

  def encode_text(self, tokens: jax.Array, *, train: bool) -> jax.Array:
    """(K, L) class prompt ids -> (K, C) L2-normalised class text, in float32 at least."""
    del train  # no dropout in the text path
    return ot_layers.at_least_f32(self.text_encoder(tokens))

  def __call__(self, images: jax.Array, text: jax.Array, *,
               train: bool) -> tuple[dict[str, jax.Array], dict[str, Any]]:
    """images (B, H, W, 3) normalised, text (K, C) from `encode_text` ->
    ({'decoder': (B, H, W, K) logits}, aux: 'decoder_lowres' (B, h, w, K), 'anchors', 'tokens',
    'routes' (see `LDVCHead`), 'dense' (B, h, w, C), 'global' (B, C))."""
    global_, dense, _ = self.backbone(images, train=train)
    dense = ot_layers.l2_normalize(ot_layers.at_least_f32(dense))
    global_ = ot_layers.l2_normalize(ot_layers.at_least_f32(global_))
    out = self.decode_head(dense, global_, text, train=train)
    maps = {'decoder': image_ops.resize_bilinear(out['decoder'], images.shape[1:3])}
    aux = dict(out, decoder_lowres=out['decoder'], dense=dense)
    aux['global'] = global_
    del aux['decoder']
    return maps, aux
