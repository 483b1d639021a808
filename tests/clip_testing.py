"""Test helpers for the CLIP towers: tiny torch CLIPs in OpenAI and HF layout, real tokenizer files.

Other test files import from here (`from clip_testing import ...`). Everything is offline: the
tokenizer files are derived from OpenAI's BPE merge list in ../shared/clip_bpe, models are random.
"""

import collections
import gzip
import json
import pathlib

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from otseg_jax.data.synthetic_clip import bytes_to_unicode  # OpenAI's byte alphabet

SOT, EOT = 49406, 49407  # ids of '<|startoftext|>' and '<|endoftext|>' in the real vocab


# ----------------------------------------------------------------------------------------------
# Tokenizer files.


def write_clip_tokenizer_files(directory, bpe_path) -> pathlib.Path:
  """Writes `vocab.json` and `merges.txt` of the real CLIP tokenizer into `directory`.

  Built exactly as OpenAI's `SimpleTokenizer.__init__` builds its encoder from
  `bpe_simple_vocab_16e6.txt.gz`: the 256 byte characters, the same with '</w>', the first
  49152-256-2 merges (line 0 is a header), then '<|startoftext|>' and '<|endoftext|>'.
  transformers' `CLIPTokenizer.from_pretrained(directory)` then loads offline.
  """
  directory = pathlib.Path(directory)
  directory.mkdir(parents=True, exist_ok=True)
  lines = gzip.open(bpe_path).read().decode('utf-8').split('\n')
  merges = lines[1:49152 - 256 - 2 + 1]
  vocab = list(bytes_to_unicode().values())
  vocab = vocab + [v + '</w>' for v in vocab]
  vocab += [''.join(m.split()) for m in merges]
  vocab += ['<|startoftext|>', '<|endoftext|>']
  assert len(vocab) == 49408, len(vocab)
  (directory / 'vocab.json').write_text(
      json.dumps({v: i for i, v in enumerate(vocab)}, ensure_ascii=False), encoding='utf-8')
  (directory / 'merges.txt').write_text('#version: 0.2\n' + '\n'.join(merges) + '\n',
                                        encoding='utf-8')
  return directory


# ----------------------------------------------------------------------------------------------
# A minimal CLIP with OpenAI's module names (clip/model.py), as a torch reference.


class QuickGELU(nn.Module):

  def forward(self, x):
    return x * torch.sigmoid(1.702 * x)


class ResidualAttentionBlock(nn.Module):

  def __init__(self, d_model: int, n_head: int, attn_mask=None):
    super().__init__()
    self.attn = nn.MultiheadAttention(d_model, n_head)
    self.ln_1 = nn.LayerNorm(d_model)
    self.mlp = nn.Sequential(collections.OrderedDict([
        ('c_fc', nn.Linear(d_model, d_model * 4)), ('gelu', QuickGELU()),
        ('c_proj', nn.Linear(d_model * 4, d_model))]))
    self.ln_2 = nn.LayerNorm(d_model)
    self.attn_mask = attn_mask

  def forward(self, x):  # (L, B, D), sequence first as in OpenAI's code
    mask = None if self.attn_mask is None else self.attn_mask.to(x.dtype)
    x = x + self.attn(*(3 * [self.ln_1(x)]), need_weights=False, attn_mask=mask)[0]
    return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):

  def __init__(self, width, layers, heads, attn_mask=None):
    super().__init__()
    self.resblocks = nn.Sequential(
        *[ResidualAttentionBlock(width, heads, attn_mask) for _ in range(layers)])

  def forward(self, x):
    return self.resblocks(x)


class OpenAIVisual(nn.Module):
  """OpenAI's VisionTransformer; `forward` returns (global, dense) after ln_post and proj.

  Inputs whose patch grid differs from the parameter grid get the positional grid resized with
  `F.interpolate(bilinear)` at run time, as the OTSeg authors' backbone does.
  """

  def __init__(self, image_size, patch_size, width, layers, heads, output_dim):
    super().__init__()
    self.patch_size = patch_size
    self.conv1 = nn.Conv2d(3, width, patch_size, patch_size, bias=False)
    scale = width**-0.5
    grid = self.grid = image_size // patch_size
    self.class_embedding = nn.Parameter(scale * torch.randn(width))
    self.positional_embedding = nn.Parameter(scale * torch.randn(grid * grid + 1, width))
    self.ln_pre = nn.LayerNorm(width)
    self.transformer = Transformer(width, layers, heads)
    self.ln_post = nn.LayerNorm(width)
    self.proj = nn.Parameter(scale * torch.randn(width, output_dim))

  def forward(self, x):  # (B, 3, H, W)
    x = self.conv1(x)
    b, d, h, w = (int(s) for s in x.shape)
    x = x.reshape(b, d, h * w).permute(0, 2, 1)
    x = torch.cat([self.class_embedding.to(x.dtype) + torch.zeros(b, 1, d, dtype=x.dtype), x], 1)
    pos = self.positional_embedding
    g = self.grid
    if (g, g) != (h, w):
      grid = pos[1:].reshape(1, g, g, d).permute(0, 3, 1, 2)
      grid = F.interpolate(grid, size=(h, w), mode='bilinear', align_corners=False)
      pos = torch.cat([pos[:1], grid.reshape(d, h * w).T], 0)
    x = self.ln_pre(x + pos)
    x = self.transformer(x.permute(1, 0, 2)).permute(1, 0, 2)
    x = self.ln_post(x) @ self.proj
    return x[:, 0], x[:, 1:].reshape(b, h, w, -1)


class OpenAICLIP(nn.Module):
  """OpenAI's CLIP (ViT), state-dict names included (`visual.*`, `token_embedding.weight`, ...)."""

  def __init__(self, embed_dim, image_size, patch_size, vision_width, vision_layers,
               context_length, vocab_size, text_width, text_layers):
    super().__init__()
    # OpenAI's rule: 64 channels per head.
    self.visual = OpenAIVisual(image_size, patch_size, vision_width, vision_layers,
                               vision_width // 64, embed_dim)
    mask = torch.empty(context_length, context_length).fill_(float('-inf')).triu_(1)
    self.transformer = Transformer(text_width, text_layers, text_width // 64, mask)
    self.token_embedding = nn.Embedding(vocab_size, text_width)
    self.positional_embedding = nn.Parameter(torch.randn(context_length, text_width) * 0.01)
    self.ln_final = nn.LayerNorm(text_width)
    self.text_projection = nn.Parameter(torch.randn(text_width, embed_dim) * text_width**-0.5)
    self.logit_scale = nn.Parameter(torch.tensor(float(np.log(1 / 0.07))))
    # OpenAI's published TorchScript archives carry these three in their state dict.
    self.register_buffer('input_resolution', torch.tensor(image_size))
    self.register_buffer('context_length', torch.tensor(context_length))
    self.register_buffer('vocab_size', torch.tensor(vocab_size))

  def encode_text(self, text):  # (B, L) int
    x = self.token_embedding(text) + self.positional_embedding
    x = self.transformer(x.permute(1, 0, 2)).permute(1, 0, 2)
    x = self.ln_final(x)
    return x[torch.arange(x.shape[0]), text.argmax(dim=-1)] @ self.text_projection

  def forward(self, image, text):
    return self.visual(image) + (self.encode_text(text),)


def redraw_(model: nn.Module, seed: int) -> nn.Module:
  """Re-draws every float parameter from a seeded normal so nothing is zero or degenerate.

  Weights N(0, 1/fan_in), biases N(0, 0.02^2), LayerNorm 1 + N(0, 0.1^2) / N(0, 0.05^2),
  embeddings N(0, 0.1^2) (as the reference data in ../shared was made).
  """
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if not p.dtype.is_floating_point:
        continue
      r = torch.randn(p.shape, generator=gen, dtype=torch.float64)
      leaf = name.rsplit('.', 1)[-1]
      is_norm = 'ln' in name or 'norm' in name
      if is_norm and leaf == 'weight':
        v = 1 + 0.1 * r
      elif is_norm and leaf == 'bias':
        v = 0.05 * r
      elif leaf.endswith('bias'):
        v = 0.02 * r
      elif leaf in ('proj', 'text_projection'):  # raw (in, out) matrices, applied as x @ proj
        v = r / np.sqrt(p.shape[0])
      elif p.ndim >= 2 and ('embedding' not in name or 'patch_embedding' in name):
        v = r / np.sqrt(np.prod(p.shape[1:]))  # torch layout (out, in, ...)
      else:
        v = 0.1 * r
      p.copy_(v.to(p.dtype))
  return model


def tiny_openai_clip(seed: int = 0, *, vocab_size: int = 100, context_length: int = 16,
                     image_size: int = 32, patch_size: int = 8) -> OpenAICLIP:
  """A tiny OpenAI-layout CLIP; widths are multiples of 64 so OpenAI's heads = width // 64 holds."""
  torch.manual_seed(seed)
  model = OpenAICLIP(embed_dim=24, image_size=image_size, patch_size=patch_size, vision_width=128,
                     vision_layers=2, context_length=context_length, vocab_size=vocab_size,
                     text_width=64, text_layers=2)
  return redraw_(model, seed).eval()


def random_tokens(rng: np.random.Generator, batch: int, length: int, vocab_size: int) -> np.ndarray:
  """(batch, length) int64: SOT = vocab-2, random ids, EOT = vocab-1 (the row maximum), zeros."""
  out = np.zeros((batch, length), np.int64)
  for b in range(batch):
    n = rng.integers(1, length - 1) if b else length - 2  # one row fills the whole context
    out[b, 0] = vocab_size - 2
    out[b, 1:n + 1] = rng.integers(1, vocab_size - 2, size=n)
    out[b, n + 1] = vocab_size - 1
  return out


# ----------------------------------------------------------------------------------------------
# HF layout.


def tiny_hf_config(*, vision_width=64, vision_layers=2, vision_heads=4, patch_size=8,
                   image_size=32, text_width=32, text_layers=2, text_heads=4, vocab_size=100,
                   context_length=16, embed_dim=24, hidden_act='quick_gelu', mlp_ratio=4):
  """A small `transformers.CLIPConfig`; EOT is the largest id (`vocab_size - 1`)."""
  import transformers
  return transformers.CLIPConfig(
      text_config=dict(hidden_size=text_width, intermediate_size=mlp_ratio * text_width,
                       hidden_act=hidden_act,
                       num_hidden_layers=text_layers, num_attention_heads=text_heads,
                       vocab_size=vocab_size, max_position_embeddings=context_length,
                       bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1, pad_token_id=0,
                       projection_dim=embed_dim),
      vision_config=dict(hidden_size=vision_width, intermediate_size=mlp_ratio * vision_width,
                         hidden_act=hidden_act,
                         num_hidden_layers=vision_layers, num_attention_heads=vision_heads,
                         patch_size=patch_size, image_size=image_size, projection_dim=embed_dim),
      projection_dim=embed_dim)


def save_random_hf_clip(directory, seed: int = 0, **config_kwargs):
  """Builds a random `transformers.CLIPModel`, `save_pretrained`s it; returns the (eval) model."""
  import transformers
  torch.manual_seed(seed)
  model = transformers.CLIPModel(tiny_hf_config(**config_kwargs))
  redraw_(model, seed).eval()
  model.save_pretrained(directory)
  return model


def openai_to_hf_state_dict(sd: dict) -> dict:
  """OpenAI CLIP state dict -> `transformers.CLIPModel` state dict (test-side, name by name)."""
  out = {}
  towers = {'visual.transformer.resblocks.': 'vision_model.encoder.layers.',
            'transformer.resblocks.': 'text_model.encoder.layers.'}
  block = {'ln_1': 'layer_norm1', 'ln_2': 'layer_norm2', 'mlp.c_fc': 'mlp.fc1',
           'mlp.c_proj': 'mlp.fc2', 'attn.out_proj': 'self_attn.out_proj'}
  simple = {
      'visual.class_embedding': 'vision_model.embeddings.class_embedding',
      'visual.conv1.weight': 'vision_model.embeddings.patch_embedding.weight',
      'visual.positional_embedding': 'vision_model.embeddings.position_embedding.weight',
      'visual.ln_pre.weight': 'vision_model.pre_layrnorm.weight',
      'visual.ln_pre.bias': 'vision_model.pre_layrnorm.bias',
      'visual.ln_post.weight': 'vision_model.post_layernorm.weight',
      'visual.ln_post.bias': 'vision_model.post_layernorm.bias',
      'token_embedding.weight': 'text_model.embeddings.token_embedding.weight',
      'positional_embedding': 'text_model.embeddings.position_embedding.weight',
      'ln_final.weight': 'text_model.final_layer_norm.weight',
      'ln_final.bias': 'text_model.final_layer_norm.bias',
      'logit_scale': 'logit_scale',
  }
  for k, v in sd.items():
    if k in simple:
      out[simple[k]] = v
    elif k == 'visual.proj':
      out['visual_projection.weight'] = v.T.contiguous()
    elif k == 'text_projection':
      out['text_projection.weight'] = v.T.contiguous()
    elif k in ('input_resolution', 'context_length', 'vocab_size'):
      continue
    else:
      prefix = next(p for p in towers if k.startswith(p))
      i, rest = k[len(prefix):].split('.', 1)
      base = towers[prefix] + i + '.'
      if rest.startswith('attn.in_proj_'):
        kind = rest.rsplit('_', 1)[-1]  # weight | bias
        for name, part in zip('qkv', v.chunk(3, dim=0)):
          out[f'{base}self_attn.{name}_proj.{kind}'] = part.contiguous()
      else:
        mod, kind = rest.rsplit('.', 1)
        out[f'{base}{block[mod]}.{kind}'] = v
  return out


def save_openai_as_hf(model: OpenAICLIP, directory):
  """Writes the OpenAI-layout `model`'s weights as an HF CLIP directory; returns the HF model."""
  import transformers
  v, sd = model.visual, model.state_dict()
  vision_width = v.conv1.weight.shape[0]
  text_width = model.ln_final.weight.shape[0]
  config = tiny_hf_config(
      vision_width=vision_width, vision_layers=len(v.transformer.resblocks),
      vision_heads=vision_width // 64, patch_size=v.patch_size,
      image_size=v.patch_size * int(round((v.positional_embedding.shape[0] - 1)**0.5)),
      text_width=text_width, text_layers=len(model.transformer.resblocks),
      text_heads=text_width // 64, vocab_size=model.token_embedding.weight.shape[0],
      context_length=model.positional_embedding.shape[0], embed_dim=v.proj.shape[1])
  hf = transformers.CLIPModel(config).eval()
  missing, unexpected = hf.load_state_dict(openai_to_hf_state_dict(sd), strict=False)
  assert not unexpected and all('position_ids' in m for m in missing), (missing, unexpected)
  hf.save_pretrained(directory)
  return hf


def hf_image_features(hf, images: torch.Tensor):
  """(global (B, C), dense (B, h, w, C)) of an HF CLIPModel, unnormalised; images (B, 3, H, W)."""
  out = hf.vision_model(pixel_values=images)
  global_ = hf.visual_projection(out.pooler_output)
  tokens = hf.visual_projection(hf.vision_model.post_layernorm(out.last_hidden_state[:, 1:]))
  b, _, h, w = images.shape
  p = hf.config.vision_config.patch_size
  return global_, tokens.reshape(b, h // p, w // p, -1)
