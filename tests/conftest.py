"""Shared test fixtures: the reference data in ../shared, float64 switching."""

import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED = pathlib.Path(os.environ.get('OTSEG_SHARED', REPO.parent / 'shared'))


def run_python(args, timeout=600) -> subprocess.CompletedProcess:
  """Runs `python ARGS` in the repo root on CPU (train.py, eval.py, -m otseg_jax.predict, ...);
  fails the test with the end of its output unless it exits 0."""
  env = dict(os.environ, JAX_PLATFORMS='cpu', TF_CPP_MIN_LOG_LEVEL='3', PYTHONPATH=str(REPO))
  proc = subprocess.run([sys.executable, *args], env=env, cwd=REPO, capture_output=True,
                        text=True, timeout=timeout)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
  return proc


def assert_clip_towers_unchanged(workdir, clip_dir, towers_at: dict) -> tuple[dict, dict]:
  """Asserts that the checkpoint in `workdir` holds every weight of the CLIP in `clip_dir`
  unchanged, under `towers_at` ({model subtree: CLIP tower}, e.g. {'backbone': 'visual'}).
  Returns (the checkpoint's flat parameters, the CLIP's towers)."""
  from otseg_jax import params as params_lib
  from otseg_jax.models import clip_weights
  trained = params_lib.flat(params_lib.load_params_any(workdir))
  _, towers = clip_weights.load_clip(clip_dir, image_size=32)
  for sub, tower in towers_at.items():
    flat = params_lib.flat(towers[tower])
    assert flat, f'CLIP tower {tower!r} is empty'
    for name, value in flat.items():
      np.testing.assert_array_equal(trained[f'{sub}/{name}'], value, err_msg=f'{sub}/{name}')
  return trained, towers


def shared_path(*parts: str) -> pathlib.Path:
  """Path inside ../shared; skips the test when absent, fails when OTSEG_REQUIRE_SHARED=1."""
  path = SHARED.joinpath(*parts)
  if not path.exists():
    message = (f'{path} not found: the reference data lives in ../shared beside the checkout '
               '(set OTSEG_SHARED to point elsewhere).')
    if os.environ.get('OTSEG_REQUIRE_SHARED') == '1':
      pytest.fail(message + ' OTSEG_REQUIRE_SHARED=1, so this is an error.')
    pytest.skip(message)
  return path


def load_reference(name: str) -> dict[str, np.ndarray]:
  """All arrays of ../shared/reference/NAME as a dict."""
  with np.load(shared_path('reference', name)) as f:
    return {k: f[k] for k in f.files}


@pytest.fixture(scope='session')
def otseg_small():
  return load_reference('otseg_small.npz')


@pytest.fixture(scope='session')
def otseg_small_converged():
  return load_reference('otseg_small_converged.npz')


@pytest.fixture(scope='session')
def otseg_holdout():
  return load_reference('otseg_holdout.npz')


@pytest.fixture(scope='session')
def tiny_synthetic_clip(tmp_path_factory):
  """(directory, PretrainConfig) of a tiny CLIP pretrained on the synthetic world, once per session:
  32 px, width 32, one block per tower, 8 steps (seconds)."""
  from configs import tiny
  from otseg_jax.data import synthetic_clip
  config = synthetic_clip.PretrainConfig(**tiny.CLIP, steps=8, batch_size=32, warmup_steps=2,
                                         eval_images=24, eval_seg_images=8)
  directory = tmp_path_factory.mktemp('synthetic_clip') / 'clip'
  synthetic_clip.write_pretrained(directory, config, log_every=2, progress=False)
  return directory, config
