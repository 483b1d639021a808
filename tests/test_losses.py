"""Losses against the reference dumps, a torch port of the authors' formula, and devices."""

import os
import pathlib
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import load_reference

from otseg_jax import losses

LOSS_KEYS = ('decode.loss_mask', 'decode.loss_dice', 'score.loss_mask', 'score.loss_dice', 'total')


def model_outputs(out_file, in_file):
  """Channels-last logits dict and labels (B, H, W) from the dumps."""
  out, inp = load_reference(out_file), load_reference(in_file)
  outputs = dict(decoder=out['out/train_decoder_pred_masks'].transpose(0, 2, 3, 1),
                 score=out['out/train_score_pred_masks'].transpose(0, 2, 3, 1))
  return outputs, inp['input/labels_mapped'][:, 0], out, inp


def torch_reference_loss(logits, labels, focal_weight=100.0, dice_weight=1.0, ignore_index=255):
  """The authors' SegLossPlus / SegPlusCriterion formula, written out in torch.

  Args:
    logits: (B, K, H, W) torch tensor.
    labels: (B, H, W) torch long tensor, visibility-mapped.

  Returns:
    (loss_mask, loss_dice, num_masks)
  """
  b, k = logits.shape[:2]
  present = []
  for labels_b in labels:
    classes = labels_b.unique()
    present.append(classes[classes != ignore_index])
  num_masks = max(sum(len(c) for c in present), 1)
  # Focal: all K channels of every image, targets (label == class), 255 pixels negative.
  src = logits.flatten(2).reshape(b * k, -1)
  tgt = (labels[:, None] == torch.arange(k)[None, :, None, None]).flatten(2).reshape(b * k, -1)
  tgt = tgt.to(src)
  ce = torch.nn.functional.binary_cross_entropy_with_logits(src, tgt, reduction='none')
  prob = src.sigmoid()
  p_t = prob * tgt + (1 - prob) * (1 - tgt)
  focal = (0.25 * tgt + 0.75 * (1 - tgt)) * ce * (1 - p_t) ** 2
  focal = focal.mean(1).sum() / num_masks
  # Dice: only the present (image, class) pairs.
  image_idx = torch.cat([torch.full_like(c, i) for i, c in enumerate(present)])
  class_idx = torch.cat(present)
  src = logits[image_idx, class_idx].flatten(1).sigmoid()
  tgt = (labels[image_idx] == class_idx[:, None, None]).flatten(1).to(src)
  dice = (1 - (2 * (src * tgt).sum(-1) + 1) / (src.sum(-1) + tgt.sum(-1) + 1)).sum() / num_masks
  return focal_weight * focal, dice_weight * dice, num_masks


@pytest.mark.parametrize('out_file,in_file', [
    ('otseg_small.npz', 'otseg_small.npz'),
    ('otseg_holdout.npz', 'otseg_holdout.npz'),
    # The converged file has its own outputs and losses; inputs come from otseg_small.npz.
    ('otseg_small_converged.npz', 'otseg_small.npz'),
])
def test_losses_reproduce_dumps(out_file, in_file):
  outputs, labels, out, inp = model_outputs(out_file, in_file)
  with jax.enable_x64(True):
    got = jax.jit(losses.otseg_loss)(outputs, labels)
    assert got['total'].dtype == jnp.float64
    for key in LOSS_KEYS:
      np.testing.assert_allclose(got[key], out[f'loss/{key}'], rtol=1e-12, err_msg=key)
    assert float(got['num_masks']) == int(inp['info/num_masks'])
  got = jax.jit(losses.otseg_loss)(jax.tree.map(lambda x: x.astype(np.float32), outputs), labels)
  assert got['total'].dtype == jnp.float32
  for key in LOSS_KEYS:
    np.testing.assert_allclose(got[key], out[f'loss/{key}'], rtol=1e-5, err_msg=key)


def test_gradient_matches_torch_autograd():
  outputs, labels, out, _ = model_outputs('otseg_holdout.npz', 'otseg_holdout.npz')
  logits = outputs['decoder']  # (B, H, W, K)
  # The second image gets no seen class at all: its dice terms must drop out.
  labels = labels.copy()
  labels[1] = 255
  x = torch.tensor(logits.transpose(0, 3, 1, 2), requires_grad=True)
  loss_mask, loss_dice, num_masks = torch_reference_loss(x, torch.from_numpy(labels))
  (loss_mask + loss_dice).backward()
  want = x.grad.numpy().transpose(0, 2, 3, 1)

  with jax.enable_x64(True):
    def total(logits):
      terms = losses.segmentation_loss(logits, labels)
      return terms['loss_mask'] + terms['loss_dice'], terms
    (_, terms), grad = jax.jit(jax.value_and_grad(total, has_aux=True))(jnp.asarray(logits))
  assert float(terms['num_masks']) == num_masks
  np.testing.assert_allclose(terms['loss_mask'], loss_mask.item(), rtol=1e-12)
  np.testing.assert_allclose(terms['loss_dice'], loss_dice.item(), rtol=1e-12)
  np.testing.assert_allclose(grad, want, rtol=1e-10, atol=1e-12 * np.abs(want).max())
  # The torch port itself reproduces the dump on the unmodified labels.
  _, labels_ref, _, _ = model_outputs('otseg_holdout.npz', 'otseg_holdout.npz')
  x = torch.tensor(logits.transpose(0, 3, 1, 2))
  loss_mask, loss_dice, _ = torch_reference_loss(x, torch.from_numpy(labels_ref))
  np.testing.assert_allclose(loss_mask.item(), out['loss/decode.loss_mask'], rtol=1e-12)
  np.testing.assert_allclose(loss_dice.item(), out['loss/decode.loss_dice'], rtol=1e-12)


def test_no_present_class_clamps_num_masks():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(2, 5, 4, 3)) * 3
  labels = np.full((2, 5, 4), 255)
  with jax.enable_x64(True):
    terms = jax.jit(losses.segmentation_loss)(logits, labels)
  loss_mask, loss_dice, num_masks = torch_reference_loss(
      torch.tensor(logits.transpose(0, 3, 1, 2)), torch.from_numpy(labels))
  assert float(terms['num_masks']) == num_masks == 1
  assert float(terms['loss_dice']) == loss_dice.item() == 0.0
  np.testing.assert_allclose(terms['loss_mask'], loss_mask.item(), rtol=1e-12)


def test_low_precision_and_extreme_logits_are_stable():
  labels = np.array([[[0, 1], [255, 2]]])
  logits = jnp.array([[[[1e4, -1e4, 0.0], [-1e4, 1e4, 30.0]],
                       [[1e4, 1e4, -1e4], [-50.0, -1e4, 1e4]]]])  # (1, 2, 2, 3)
  for dtype in (jnp.float32, jnp.bfloat16):
    total = lambda x: losses.otseg_loss(dict(decoder=x, score=x), labels)['total']
    value, grad = jax.jit(jax.value_and_grad(total))(logits.astype(dtype))
    assert value.dtype == jnp.float32  # computed in float32 whatever the model dtype
    assert grad.dtype == dtype
    assert bool(jnp.isfinite(value)) and bool(jnp.all(jnp.isfinite(grad.astype(jnp.float32))))


def test_otseg_loss_total_and_keys():
  outputs, labels, _, _ = model_outputs('otseg_small.npz', 'otseg_small.npz')
  got, plain = jax.jit(lambda o, y: (
      losses.otseg_loss(o, y, focal_weight=20.0, dice_weight=2.0),
      losses.segmentation_loss(o['score'], y)))(outputs, labels)
  assert set(got) == set(LOSS_KEYS) | {'num_masks'}
  np.testing.assert_allclose(got['total'], sum(got[k] for k in LOSS_KEYS[:4]), rtol=1e-6)
  np.testing.assert_allclose(got['score.loss_mask'], plain['loss_mask'] * 0.2, rtol=1e-6)
  np.testing.assert_allclose(got['score.loss_dice'], plain['loss_dice'] * 2.0, rtol=1e-6)


def sharded_batch():
  """Holdout logits and labels with one more image whose labels are all ignored: B = 4."""
  outputs, labels, _, _ = model_outputs('otseg_holdout.npz', 'otseg_holdout.npz')
  logits = np.concatenate([outputs['decoder'], outputs['score'][:1]])
  labels = np.concatenate([labels, np.full_like(labels[:1], 255)])
  return logits, labels


def test_axis_name_shares_sum_to_the_global_batch():
  """A named vmap over 2 'devices' stands in for pmap/shard_map: psum works the same."""
  logits, labels = sharded_batch()
  with jax.enable_x64(True):
    scale = jnp.asarray(1.3)  # a replicated parameter

    def global_loss(scale):
      return losses.otseg_loss(dict(decoder=logits * scale, score=logits), labels)['total']

    def device_loss(scale, x, y):  # this device's share
      return losses.otseg_loss(dict(decoder=x * scale, score=x), y, axis_name='d')['total']

    def sharded_loss(scale):
      shares = jax.vmap(device_loss, in_axes=(None, 0, 0), axis_name='d')(
          scale, logits.reshape(2, 2, *logits.shape[1:]), labels.reshape(2, 2, *labels.shape[1:]))
      return jnp.sum(shares)

    want, want_grad = jax.jit(jax.value_and_grad(global_loss))(scale)
    got, got_grad = jax.jit(jax.value_and_grad(sharded_loss))(scale)
  np.testing.assert_allclose(got, want, rtol=1e-12)
  np.testing.assert_allclose(got_grad, want_grad, rtol=1e-12)


SHARD_MAP_SCRIPT = textwrap.dedent('''
  import jax, jax.numpy as jnp, numpy as np
  from jax.sharding import NamedSharding, PartitionSpec as P
  from otseg_jax import losses
  assert jax.device_count() == 2, jax.devices()
  data = np.load(INPUT)
  logits, labels = data['logits'].astype(np.float32), data['labels']
  mesh = jax.make_mesh((2,), ('d',))

  def global_loss(scale):
    return losses.otseg_loss(dict(decoder=logits * scale, score=logits), labels)['total']

  def share(scale, x, y):
    return losses.otseg_loss(dict(decoder=x * scale, score=x), y, axis_name='d')['total']

  def pmap_style_step(scale, x, y):
    # Per-device value and gradient, then psum both (without vma checks, as under pmap).
    value, grad = jax.value_and_grad(share)(scale, x, y)
    return jax.lax.psum(value, 'd'), jax.lax.psum(grad, 'd')

  def total(scale, x, y):
    # With vma checks the gradient of the replicated `scale` is summed over devices by the
    # transpose of shard_map itself, so the gradient is taken outside.
    return jax.shard_map(lambda s, x, y: jax.lax.psum(share(s, x, y), 'd'), mesh=mesh,
                         in_specs=(P(), P('d'), P('d')), out_specs=P())(scale, x, y)

  shard = lambda x: jax.device_put(x, NamedSharding(mesh, P('d')))
  args = (jnp.float32(1.3), shard(logits), shard(labels))
  want, want_grad = jax.value_and_grad(global_loss)(jnp.float32(1.3))
  got, got_grad = jax.jit(jax.value_and_grad(total))(*args)
  np.testing.assert_allclose(got, want, rtol=1e-5)
  np.testing.assert_allclose(got_grad, want_grad, rtol=1e-5)
  step = jax.jit(jax.shard_map(pmap_style_step, mesh=mesh, in_specs=(P(), P('d'), P('d')),
                               out_specs=(P(), P()), check_vma=False))
  got, got_grad = step(*args)
  np.testing.assert_allclose(got, want, rtol=1e-5)
  np.testing.assert_allclose(got_grad, want_grad, rtol=1e-5)
  print('OK', float(got), float(want), float(got_grad), float(want_grad))
''')


def test_shard_map_over_two_simulated_devices(tmp_path):
  """Real devices need XLA_FLAGS set before jax starts, hence a subprocess."""
  logits, labels = sharded_batch()
  np.savez(tmp_path / 'batch.npz', logits=logits, labels=labels)
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=2',
             JAX_PLATFORMS='cpu')
  script = f'INPUT = {str(tmp_path / "batch.npz")!r}\n' + SHARD_MAP_SCRIPT
  repo = pathlib.Path(__file__).resolve().parents[1]
  result = subprocess.run([sys.executable, '-c', script], env=env, cwd=repo, capture_output=True,
                          text=True, timeout=300)
  assert result.returncode == 0, result.stdout + result.stderr
  assert result.stdout.startswith('OK')
