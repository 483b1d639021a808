"""Image-space operations shared by the towers, the head and inference."""

from collections.abc import Sequence

import jax
import numpy as np


def as_pair(size: int | Sequence[int]) -> tuple[int, int]:
  """An (H, W) of python ints from an int (square) or a pair."""
  return (int(size), int(size)) if np.ndim(size) == 0 else (int(size[0]), int(size[1]))


def resize_bilinear(x: jax.Array, size: Sequence[int], axes: Sequence[int] = (1, 2)) -> jax.Array:
  """Bilinear resize with PyTorch's `F.interpolate(mode='bilinear', align_corners=False)` semantics.

  Half-pixel centres, no antialiasing (also when shrinking), edges clamped. The reference resizes
  positional embeddings, score maps and slide-inference outputs this way, so every resize in the
  project goes through here.

  Args:
    x: array of any rank, e.g. (B, H, W, K).
    size: the new extent of each axis in `axes`, e.g. (H', W').
    axes: the axes to resize.

  Returns:
    `x` with `x.shape[a] == size[i]` for each `a = axes[i]`, same dtype.
  """
  axes = tuple(a % x.ndim for a in axes)
  if tuple(x.shape[a] for a in axes) == tuple(size):
    return x
  shape = list(x.shape)
  for a, s in zip(axes, size):
    shape[a] = int(s)
  # scale_and_translate with a triangle kernel at scale 1 is exact bilinear interpolation; dropping
  # out-of-range taps and renormalising equals PyTorch's edge clamping.
  return jax.image.resize(x, shape, method='bilinear', antialias=False).astype(x.dtype)
