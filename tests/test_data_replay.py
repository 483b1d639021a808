"""The data pipeline against mmseg 0.24.1's golden cases (`python -m otseg_jax.parity transforms`).

The golden file ../shared/reference/transforms_cases.npz must replay identically: every uint8
output equal, Normalize within float32 rounding. The other tests build small case files from our
own outputs to check that the replay notices a changed pixel, draws asked for in another order,
and foreign files.
"""

import json

import numpy as np
import pytest

from conftest import shared_path
from otseg_jax import parity
from otseg_jax.data import replay
from otseg_jax.data import transforms as T


def test_golden_cases_replay_identically():
  cases, arrays = replay.load_cases(shared_path('reference', 'transforms_cases.npz'))
  rows = replay.replay(cases, arrays)
  failed = [str(r) for r in rows if not r.ok]
  assert not failed, '\n'.join(failed)
  # Identical, not merely within tolerance, Normalize included.
  assert all(r.max_abs == 0 for r in rows)
  kinds = [c['kind'] for c in cases]
  # One row per eval / normalize case, image and label per train case: nothing skipped.
  assert len(rows) == kinds.count('eval') + kinds.count('normalize') + 2 * kinds.count('train')
  assert {c['dataset'] for c in cases if c['kind'] == 'eval'} == {
      'voc12', 'context59', 'cocostuff171', 'ade150'}
  # The file exercises the cat_max_ratio retries (more than one pair of crop offsets).
  assert any(sum(d[0] == 'randint' and d[1][0] == 0 for d in c['draws']) > 2
             for c in cases if c['kind'] == 'train')


def test_cli_on_the_golden_file(capsys):
  path = shared_path('reference', 'transforms_cases.npz')
  assert parity.main(['transforms', str(path)]) == 0
  out = capsys.readouterr().out
  assert 'train/0 image' in out and 'eval/voc12/1000x1500' in out
  assert '45/45 outputs as mmseg' in out


class _Recorder:
  """A real Generator that logs its calls in the case format, under mmseg's legacy names."""

  def __init__(self, seed):
    self._rng = np.random.default_rng(seed)
    self.draws = []

  def random(self):
    value = float(self._rng.random())
    self.draws.append(['rand', [], value])
    return value

  def integers(self, *args):
    value = int(self._rng.integers(*args))
    self.draws.append(['randint', list(args), value])
    return value

  def uniform(self, *args):
    value = float(self._rng.uniform(*args))
    self.draws.append(['uniform', list(args), value])
    return value


def _write_cases(path, cases, arrays):
  blob = np.frombuffer(json.dumps(cases).encode(), np.uint8)
  np.savez(path, **{'cases/json': blob}, **arrays)
  return path


def _own_cases(seed=0):
  """One eval, one train and one normalize case made with our own transforms."""
  rng = np.random.default_rng(seed)
  image = rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)
  label = (np.arange(40)[None] // 10).repeat(30, 0).astype(np.uint8)
  recorder = _Recorder(seed)
  augment = T.TrainAugment(img_scale=(64, 48))
  out_image, out_label = T.pad_to(*T.augment_record(image, label, recorder, 32, augment), 32)
  eval_out = T.resize_image(image, T.eval_size(30, 40, (64, 48), 40))
  cases = [
      {'kind': 'eval', 'key': 'eval/a', 'img_scale': [64, 48], 'min_size': 40},
      {'kind': 'train', 'key': 'train/0', 'img_scale': [64, 48], 'crop': 32,
       'draws': recorder.draws},
      {'kind': 'normalize', 'key': 'normalize', 'mean': list(T.MEAN), 'std': list(T.STD),
       'to_rgb': True},
  ]
  arrays = {'eval/a/image': image, 'eval/a/out': eval_out, 'train/0/image': image,
            'train/0/label': label, 'train/0/out_image': out_image,
            'train/0/out_label': out_label, 'normalize/image': image,
            'normalize/out': T.normalize(image)}
  return cases, arrays


def _rows(tmp_path, cases, arrays):
  return {r.name: r for r in replay.replay(*replay.load_cases(
      _write_cases(tmp_path / 'cases.npz', cases, arrays)))}


def test_own_outputs_pass_and_one_changed_pixel_fails(tmp_path):
  cases, arrays = _own_cases()
  assert all(r.ok for r in _rows(tmp_path, cases, arrays).values())
  arrays['eval/a/out'] = arrays['eval/a/out'].copy()
  arrays['eval/a/out'][3, 4, 1] ^= 1
  arrays['train/0/out_label'] = arrays['train/0/out_label'].copy()
  arrays['train/0/out_label'][0, 0] = 7
  arrays['normalize/out'] = arrays['normalize/out'] + np.float32(1e-4)
  rows = _rows(tmp_path, cases, arrays)
  assert not rows['eval/a'].ok and rows['eval/a'].max_abs == 1
  assert rows['eval/a'].share == pytest.approx(1 / arrays['eval/a/out'].size)
  assert rows['train/0 image'].ok and not rows['train/0 label'].ok
  assert not rows['normalize'].ok
  path = _write_cases(tmp_path / 'bad.npz', cases, arrays)
  assert parity.main(['transforms', str(path)]) == 1


def test_draws_in_another_order_or_count_fail(tmp_path):
  cases, arrays = _own_cases()
  draws = cases[1]['draws']
  flip = next(i for i, d in enumerate(draws) if d[0] == 'rand' and i > 0)
  cases[1]['draws'] = draws[:flip] + draws[flip + 1:flip + 2] + [draws[flip]] + draws[flip + 2:]
  row = _rows(tmp_path, cases, arrays)['train/0 draws']
  assert not row.ok and f'draw {flip}: the pipeline asked for random()' in row.note
  cases[1]['draws'] = draws + [['rand', [], 0.5]]
  assert 'used' in _rows(tmp_path, cases, arrays)['train/0 draws'].note
  cases[1]['draws'] = draws[:-1]
  assert 'were used' in _rows(tmp_path, cases, arrays)['train/0 draws'].note


def test_foreign_settings_and_files_are_refused(tmp_path):
  cases, arrays = _own_cases()
  cases[2]['to_rgb'] = False
  row = _rows(tmp_path, cases, arrays)['normalize']
  assert not row.ok and 'to_rgb' in row.note
  with pytest.raises(FileNotFoundError, match='no such transforms case file'):
    replay.load_cases(tmp_path / 'missing.npz')
  np.savez(tmp_path / 'model.npz', x=np.zeros(3))
  with pytest.raises(ValueError, match='not a transforms case file'):
    replay.load_cases(tmp_path / 'model.npz')
  with pytest.raises(SystemExit) as exit_info:  # the CLI: a usage error, no traceback
    parity.main(['transforms', str(tmp_path / 'model.npz')])
  assert exit_info.value.code == 2
  del arrays['train/0/out_label']
  with pytest.raises(ValueError, match="'train/0' lacks the arrays train/0/out_label"):
    replay.load_cases(_write_cases(tmp_path / 'short.npz', _own_cases()[0], arrays))
