"""The whole model against the authors' dumps, through `otseg_jax.parity` (the CLI's code).

Every output, loss and gradient in a dump is compared relative to the reference array's max
magnitude:
  float64, converged solver vs the converged dump: 1e-6
  float32, converged solver vs the converged dump: 1e-4
  float32, default solver vs the as-is dump: 2e-3
  the 'reference' solver (replica of the authors' stopping rule) vs the as-is dump, float64: 1e-6,
  with the Sinkhorn iteration counts identical.
The trainer's own step (`trainer.train_step` under jit over a mesh and under pmap, on two
simulated devices) is held to the same float64 tolerance.
"""

import os
import pathlib
import subprocess
import sys

import jax
import pytest

from conftest import shared_path
from otseg_jax import parity

# Halves XLA compile times, which dominate these tests; results move by ~1e-12 relative.
FAST_COMPILE = {'xla_backend_optimization_level': 0, 'xla_llvm_disable_expensive_passes': True}
REPO = pathlib.Path(__file__).resolve().parents[1]


def _run(dump, expected=None, **kwargs):
  with jax.enable_x64(kwargs.get('x64', False)):
    rows = parity.run(dump, expected, compiler_options=FAST_COMPILE, **kwargs)
  for row in rows:
    print(row)
  failed = [str(r) for r in rows if not r.ok]
  assert not failed, '\n'.join(failed)
  return rows


def _names(rows):
  return {r.name.split(' ')[0] for r in rows}


def test_small_float64_converged(otseg_small, otseg_small_converged):
  rows = _run(otseg_small, otseg_small_converged, x64=True, converged=True)
  # Counts compared exactly (iterations, unused tensors) have tolerance 0; the arrays 1e-6.
  assert all(r.tol in (0.0, 1e-6) for r in rows)
  unused = [r for r in rows if r.name.startswith('grad of the 30 tensors the authors never use')]
  assert len(unused) == 1 and unused[0].tol == 0.0
  names = _names(rows)
  # Every trainable tensor of the dump is compared (through the converter's names).
  assert sum(n.startswith('grad/') for n in names) == 44  # 6 prompt + 38 head leaves
  for key in ('backbone_visual_embedding', 'train_q_proj', 'train_decoder_layer_attn',
              'train_decoder_pred_masks', 'loss/total', 'eval_forward_test', 'slide_inference',
              'slide_argmax', 'backbone_rect_visual_embedding'):
    assert key in names


def test_small_float32_converged(otseg_small, otseg_small_converged):
  rows = _run(otseg_small, otseg_small_converged, converged=True, checks=('train',))
  assert all(r.tol in (0.0, 1e-4) for r in rows)


def test_small_float32_default_vs_as_is(otseg_small):
  rows = _run(otseg_small, checks=('train', 'eval'))
  assert all(r.tol in (0.0, 2e-3) for r in rows)


def test_holdout_float32_default_vs_as_is(otseg_holdout):
  # Patch 8, 2 decoder layers (exponent 1/(L-1) = 1), last backbone block without prompts.
  _run(otseg_holdout)


def test_holdout_float64_reference_solver_chunked_attention(otseg_holdout):
  # Also the image tower's chunked attention (blocks of 5 queries, the last one padded).
  rows = _run(otseg_holdout, x64=True, implementation='reference', checks=('train', 'eval'),
              attention_query_chunk=5)
  iters = [r for r in rows if r.name.startswith('sinkhorn/')]
  assert len(iters) == 2 and all(r.abs_err == 0 for r in iters)


def test_cli_exit_status(capsys):
  path = shared_path('reference', 'otseg_holdout.npz')
  # An impossible tolerance must fail with status 1 and name the failures.
  assert parity.main([str(path), '--checks', 'rect', '--tol', '1e-30']) == 1
  out = capsys.readouterr().out
  assert 'FAIL' in out and 'backbone_rect_visual_embedding' in out
  assert parity.main([str(path), '--checks', 'rect']) == 0


def test_converged_flag_finds_the_file():
  path = shared_path('reference', 'otseg_small.npz')
  with pytest.raises(FileNotFoundError, match='otseg_holdout_converged.npz'):
    parity.main([str(shared_path('reference', 'otseg_holdout.npz')), '--converged'])
  assert parity.main([str(path), '--converged', '--checks', 'rect', '--tol', '1e-5']) == 0


def test_train_step_small_float64_converged_jit_and_pmap_on_two_devices():
  """The step that trains is not the forward of the checks above: it runs the model per example
  under vmap with its own dropout keys (0 here) and sums over devices. Its loss terms and gradient
  against the dump, through the CLI in a fresh JAX with two devices (XLA_FLAGS must be set before
  jax starts); FAST_COMPILE's options go in as XLA flags."""
  dump = shared_path('reference', 'otseg_small.npz')
  flags = ['--xla_force_host_platform_device_count=2'] + [
      f'--{k}={str(v).lower()}' for k, v in FAST_COMPILE.items()]
  env = dict(os.environ, XLA_FLAGS=' '.join(flags), JAX_PLATFORMS='cpu', PYTHONPATH=str(REPO))
  proc = subprocess.run([sys.executable, '-m', 'otseg_jax.parity', str(dump), '--x64',
                         '--converged', '--checks', 'step'], env=env, cwd=REPO,
                        capture_output=True, text=True, timeout=600)
  print(proc.stdout)
  assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-4000:]
  lines = proc.stdout.splitlines()
  for mode in ('jit', 'pmap'):
    rows = [line for line in lines if line.startswith(f'step[{mode}, 2 devices] ')]
    # 5 loss terms, num_masks, every trainable leaf (6 prompt + 38 head), each within 1e-6.
    assert len(rows) == 50, rows
    assert all(line.endswith('ok (tol 1e-06)') for line in rows), rows
    assert sum(' grad/' in line for line in rows) == 44
