"""Outputs get the mode the umask gives any new file, and are still written atomically."""

import os
import stat

import numpy as np
import pytest

from otseg_jax import checkpoint, reports, text_embeddings


def _mode(path):
  return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture(params=[0o022, 0o077, 0o002])
def umask(request):
  old = os.umask(request.param)
  yield request.param
  os.umask(old)


def test_outputs_follow_the_umask(tmp_path, umask):
  file_mode, dir_mode = 0o666 & ~umask, 0o777 & ~umask
  reports.write_json(tmp_path / 'results.json', {'mIoU': 1.0})
  reports.write_png(tmp_path / 'mask.png', np.zeros((4, 4), np.uint8))
  text_embeddings.save_npy_atomic(tmp_path / 'text.npy', np.ones((2, 1, 3), np.float32))
  checkpoint.save_params(tmp_path / 'ckpt', {'w': np.ones(3)}, {'note': 'x'})
  for name in ('results.json', 'mask.png', 'text.npy', 'ckpt/metadata.json'):
    assert _mode(tmp_path / name) == file_mode, name
  assert _mode(tmp_path / 'ckpt') == dir_mode
  checkpoint.save_params(tmp_path / 'ckpt', {'w': np.zeros(3)}, overwrite=True)
  assert _mode(tmp_path / 'ckpt') == dir_mode
  # Nothing temporary is left beside the outputs.
  assert sorted(os.listdir(tmp_path)) == ['ckpt', 'mask.png', 'results.json', 'text.npy']
  np.testing.assert_array_equal(np.load(tmp_path / 'text.npy'), np.ones((2, 1, 3)))
