"""Schedule, parameter groups and transductive pseudo-labels of the trainer (no model needed)."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from otseg_jax import trainer
from otseg_jax.models import otseg

RULES = (('backbone', 10.0, None), ('head', 10.0, None), ('norm', None, 0.0), ('ln', None, 0.0))


def test_schedule_is_mmcv_poly_with_linear_warmup():
  base, end, total, warm, ratio = 2e-4, 1e-6, 20_000, 1500, 1e-6
  fn = trainer.lr_schedule(base, total, warmup_steps=warm, warmup_ratio=ratio, power=0.9,
                           end_lr=end)

  def mmcv(t):  # mmcv PolyLrUpdaterHook + linear warm-up of the decayed lr
    regular = (base - end) * (1 - t / total)**0.9 + end
    if t < warm:
      return regular * (1 - (1 - t / warm) * (1 - ratio))
    return regular

  for t in (0, 1, 750, 1499, 1500, 10_000, 19_999, 20_000):
    assert float(fn(t)) == pytest.approx(mmcv(t), rel=1e-5), t
  assert float(fn(0)) == pytest.approx(base * ratio, rel=1e-5)
  assert float(fn(total)) == pytest.approx(end)


def _params():
  z = np.zeros(3, np.float32)
  return {'backbone': {'prompt_norm': {'scale': z + 1}, 'prompt_embeddings': z + 1},
          'decode_head': {'q_proj': {'kernel': z + 1},
                          'layers_0': {'norm2': {'scale': z + 1}}}}


def test_param_groups_first_match_is_the_reference():
  mults = trainer.param_multipliers(_params(), RULES, first_match=True)
  # mmcv: the first matching key ('backbone' / 'head') sets both multipliers; the norm rule with
  # decay_mult 0 is never reached for a trainable parameter.
  assert mults['backbone']['prompt_norm']['scale'] == (10.0, 1.0)
  assert mults['decode_head']['layers_0']['norm2']['scale'] == (10.0, 1.0)
  assert mults['decode_head']['q_proj']['kernel'] == (10.0, 1.0)
  written = trainer.param_multipliers(_params(), RULES, first_match=False)
  assert written['backbone']['prompt_norm']['scale'] == (10.0, 0.0)
  assert written['decode_head']['layers_0']['norm2']['scale'] == (10.0, 0.0)
  assert written['backbone']['prompt_embeddings'] == (10.0, 1.0)
  with pytest.raises(ValueError, match='regex, lr_mult, decay_mult'):
    trainer.param_multipliers(_params(), (('head', 10.0),))


def _config(first_match, rules=RULES):
  return ml_collections.ConfigDict(dict(
      optimizer=dict(lr=2e-5, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.01, rules=rules,
                     first_match=first_match),
      schedule=dict(warmup_steps=0, warmup_ratio=1e-6, power=0.9, end_lr=1e-6)))


@pytest.mark.parametrize('first_match', [True, False])
def test_weight_decay_and_lr_multiplier(first_match):
  params = jax.tree.map(jnp.asarray, _params())
  tx, groups = trainer.make_optimizer(_config(first_match), params, total_steps=100)
  state = tx.init(params)
  zero = jax.tree.map(jnp.zeros_like, params)
  updates, _ = tx.update(zero, state, params)
  lr = (2e-4 - 1e-6) * 1.0 + 1e-6  # lr x10 at step 0, no warm-up
  # Zero gradients: the Adam term is 0, only decoupled weight decay lr * wd * p moves a param.
  np.testing.assert_allclose(updates['decode_head']['q_proj']['kernel'], -lr * 0.01, rtol=1e-5)
  norm_update = updates['decode_head']['layers_0']['norm2']['scale']
  np.testing.assert_allclose(norm_update, -lr * 0.01 if first_match else 0.0, rtol=1e-5)
  assert sum(g['count'] for g in groups.values()) == 4


def test_lr_mult_zero_freezes():
  params = jax.tree.map(jnp.asarray, _params())
  tx, _ = trainer.make_optimizer(_config(True, (('backbone', 0.0, None),)), params, 100)
  updates, _ = tx.update(jax.tree.map(jnp.ones_like, params), tx.init(params), params)
  assert float(jnp.abs(updates['backbone']['prompt_embeddings']).max()) == 0.0
  assert float(jnp.abs(updates['decode_head']['q_proj']['kernel']).max()) > 0.0


def test_pseudo_labels():
  # K = 4 classes, seen 0, 1; unseen 2, 3. Two pixels whose ground truth is unseen, one seen, one
  # ignored. The unseen pixels' ground truth (3, 2) is NOT their argmax, so a function that returns
  # its input labels fails.
  decoder = jnp.array([[[[9.0, 0.0, 1.0, -1.0], [9.0, 0.0, -1.0, 1.0],
                         [0.0, 0.0, 5.0, 0.0], [0.0, 0.0, 5.0, 0.0]]]])  # (1, 1, 4, 4)
  score = jnp.zeros_like(decoder)
  labels = jnp.array([[[3, 2, 1, 255]]])
  seen = np.array([True, True, False, False])
  config = otseg.get_config()  # pseudo_label_balance 0.5
  out = otseg.pseudo_labels({'decoder': decoder, 'score': score}, labels, seen, config)
  # Pixel 0: the seen class 0 has the highest logit but seen channels are excluded -> 2.
  # Pixel 1 -> 3. Seen and ignored pixels keep their labels, though class 2 scores highest there.
  np.testing.assert_array_equal(out, [[[2, 3, 1, 255]]])
  # The score map counts with weight 0.5: 0.5 * (-4 x) + 0.5 * x flips the unseen argmax.
  out = otseg.pseudo_labels({'decoder': decoder, 'score': -4 * decoder}, labels, seen, config)
  np.testing.assert_array_equal(out, [[[3, 2, 1, 255]]])


def test_progress_line_shows_the_sinkhorn_paths_at_the_cap():
  means = {'total': 1.0, 'sinkhorn/mps/mean': 12.5, 'sinkhorn/mps/max': 20.0,
           'sinkhorn/layers_0/mean': 4.0, 'sinkhorn/layers_0/max': 7.0}
  line = trainer._sinkhorn_at_cap(means, 20)
  assert line == ' | Sinkhorn at the cap of 20 (mean/max): mps 12.5/20', line
  assert trainer._sinkhorn_at_cap(means, 100) == ''
  assert trainer._sinkhorn_at_cap({'total': 1.0}, 20) == ''
