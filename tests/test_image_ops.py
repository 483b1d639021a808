import numpy as np
import pytest
import torch

from otseg_jax import image_ops


@pytest.mark.parametrize('src,dst', [((4, 4), (64, 64)), ((6, 5), (4, 4)), ((14, 14), (32, 32)),
                                     ((7, 9), (3, 20)), ((32, 32), (14, 14))])
def test_resize_matches_torch_interpolate(src, dst):
  rng = np.random.default_rng(0)
  x = rng.normal(size=(2, *src, 3))
  want = torch.nn.functional.interpolate(
      torch.from_numpy(x).permute(0, 3, 1, 2), size=dst, mode='bilinear',
      align_corners=False).permute(0, 2, 3, 1).numpy()
  import jax
  with jax.enable_x64(True):
    got = np.asarray(image_ops.resize_bilinear(x, dst))
  np.testing.assert_allclose(got, want, atol=1e-12)
