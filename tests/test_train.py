"""End-to-end training on the synthetic set with the real `train.py` / `train_and_evaluate`.

Runs are subprocesses (fresh JAX with N simulated devices, real signals) sharing a persistent
compilation cache, so a program is compiled once per test session. Tiny model (configs/tiny.py:
patch 8, width 32, 2 layers, 32 x 32 images).
"""

import json
import os
import pathlib
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
# Every run of this file: eval off unless asked, one decoder layer less to compile.
QUICK = ['--config.eval_every_steps=-1', '--config.model.head.decoder_layers=1']


@pytest.fixture(scope='module')
def jax_cache(tmp_path_factory):
  return tmp_path_factory.mktemp('jax_cache')


def _env(cache, devices=1):
  env = dict(os.environ)
  env.update(JAX_PLATFORMS='cpu', XLA_FLAGS=f'--xla_force_host_platform_device_count={devices}',
             JAX_COMPILATION_CACHE_DIR=str(cache), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0',
             TF_CPP_MIN_LOG_LEVEL='3', PYTHONPATH=str(REPO))
  return env


def _train_cmd(workdir, *overrides, config='configs/tiny.py'):
  return [sys.executable, str(REPO / 'train.py'), f'--config={REPO / config}',
          f'--workdir={workdir}', *overrides]


def _run(cmd, cache, devices=1, timeout=300):
  proc = subprocess.run(cmd, env=_env(cache, devices), cwd=REPO, capture_output=True, text=True,
                        timeout=timeout)
  return proc


def _check(proc):
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
  return proc


def _params(workdir):
  from flax import traverse_util
  from otseg_jax import params
  flat = traverse_util.flatten_dict(params.load_params_any(workdir))
  return {'/'.join(k): np.asarray(v) for k, v in flat.items()}


def _losses(workdir, key='train/total'):
  lines = (pathlib.Path(workdir) / 'metrics.jsonl').read_text().splitlines()
  return {r['step']: r[key] for r in map(json.loads, lines) if key in r}


def _steps(workdir):
  ckpt = pathlib.Path(workdir) / 'checkpoints'
  return sorted(int(p.name) for p in ckpt.iterdir() if p.name.isdigit()) if ckpt.is_dir() else []


def _wait_for_checkpoint(proc, workdir, at_least, timeout=240):
  start = time.time()
  while time.time() - start < timeout:
    if any(s >= at_least for s in _steps(workdir)):
      return
    if proc.poll() is not None:
      out, err = proc.communicate()
      pytest.fail(f'run ended before checkpoint {at_least}:\n{out[-2000:]}\n{err[-4000:]}')
    time.sleep(0.05)
  proc.kill()
  pytest.fail(f'no checkpoint {at_least} after {timeout}s')


# ---------------------------------------------------------------------------------------------------
# Train + evaluate, then eval.py on the same workdir.

E2E_STEPS = 600


def test_train_then_eval_end_to_end(tmp_path, jax_cache):
  """Documented thresholds (tiny model, 600 steps of batch 8 on 32 x 32 synthetic images, 16
  validation images; measured: seen 36.3, unseen 17.7, hIoU 23.8): seen mIoU >= 25 and unseen
  mIoU >= 10, where chance (uniformly random labels over the 12 classes) is 4.3 and a model that
  never predicts an unseen class scores 0 unseen; the loss at the end is below half of the loss
  over steps 1-100."""
  workdir = tmp_path / 'run'
  proc = _check(_run(_train_cmd(workdir, f'--config.num_train_steps={E2E_STEPS}',
                                '--config.log_every_steps=100', '--config.checkpoint_every_steps=300',
                                '--config.eval_every_steps=300', '--config.eval.max_images=4',
                                '--config.tensorboard=True'), jax_cache))
  assert 'seen mIoU' in proc.stdout and 'hIoU' in proc.stdout
  results = json.loads((workdir / 'eval' / 'results.json').read_text())
  assert results['num_images'] == 16
  assert results['seen_mIoU'] >= 25, results
  assert results['unseen_mIoU'] >= 10, results
  losses = _losses(workdir)
  assert losses[E2E_STEPS] < 0.5 * losses[100]
  for name in ('per_class.md', 'per_class_iou.png', 'overlays/0000_0.png', 'overlays/0001_1.png'):
    assert (workdir / 'eval' / name).is_file(), name
  assert list((workdir / 'tensorboard').glob('events.out.tfevents.*'))
  assert (workdir / 'params' / 'metadata.json').is_file() and _steps(workdir)[-1] == E2E_STEPS
  records = [json.loads(line) for line in (workdir / 'metrics.jsonl').read_text().splitlines()]
  assert [r['step'] for r in records if 'eval/hIoU' in r] == [300, E2E_STEPS]  # periodic, final
  # Sinkhorn iteration counts of the MPS path and each decoder layer, in the log and TensorBoard.
  cap = 20  # configs/tiny.py's config.model.ot.max_iterations
  for path in ('mps', 'layers_0', 'layers_1'):
    mean, top = records[0][f'train/sinkhorn/{path}/mean'], records[0][f'train/sinkhorn/{path}/max']
    assert 1 <= mean <= top <= cap, (path, mean, top)
  events = b''.join(p.read_bytes() for p in (workdir / 'tensorboard').glob('events.out.*'))
  assert b'train/sinkhorn/layers_1/max' in events
  assert records[-1]['eval/hIoU'] == pytest.approx(results['hIoU'])

  # eval.py on the workdir reproduces the training run's final evaluation.
  proc = _check(_run([sys.executable, str(REPO / 'eval.py'), f'--config={REPO}/configs/tiny.py',
                      f'--checkpoint={workdir}', f'--outdir={tmp_path / "eval"}'], jax_cache))
  again = json.loads((tmp_path / 'eval' / 'results.json').read_text())
  assert again['hIoU'] == pytest.approx(results['hIoU'])
  assert again['per_class'] == results['per_class']
  assert 'hIoU' in proc.stdout


def test_training_starts_from_converted_clip_and_computes_text_embeddings(tmp_path, jax_cache):
  """config.clip = a `convert --from hf-clip` checkpoint: the image tower starts from CLIP's weights
  and the class text comes from CLIP's text tower over config.templates, not from the synthetic
  dataset's own embeddings."""
  import clip_testing as ct
  from conftest import shared_path
  from flax import traverse_util
  from otseg_jax import checkpoint, text_embeddings
  from otseg_jax.data import loading, synthetic
  from otseg_jax import tokenizer as tokenizer_lib
  from otseg_jax.models import clip_weights
  from configs import tiny

  hf_dir = tmp_path / 'hf'
  ct.save_random_hf_clip(hf_dir, seed=5, vision_width=32, vision_layers=2, vision_heads=2,
                         patch_size=8, image_size=32, text_width=32, text_layers=1, text_heads=2,
                         vocab_size=49408, context_length=77, embed_dim=32)
  ct.write_clip_tokenizer_files(hf_dir, shared_path('clip_bpe', 'bpe_simple_vocab_16e6.txt.gz'))
  (tmp_path / 'model.json').write_text(json.dumps({'image_size': 32}))
  converted = tmp_path / 'clip_ckpt'
  _check(_run([sys.executable, '-m', 'otseg_jax.convert', '--from', 'hf-clip', '--in', str(hf_dir),
               '--out', str(converted), '--config', str(tmp_path / 'model.json')], jax_cache))
  assert (converted / 'vocab.json').is_file() and (converted / 'merges.txt').is_file()
  templates = tmp_path / 'templates.txt'  # as many as the tiny config's prompts per class
  templates.write_text('a photo of a {}.\na {} pattern.\n\nthe {}.\nstripes: {}.\n')

  # The embeddings are those of the text tower, from the converted checkpoint or the HF directory.
  config = tiny.get_config()
  config.templates = str(templates)
  names = synthetic.load_split('train', loading.synthetic_config(config)).classes.classes
  config.clip = str(converted)
  text = text_embeddings.load_text_embeddings(config, names)
  spec, towers = clip_weights.load_clip(hf_dir)
  expected = text_embeddings.compute_text_embeddings(
      spec, towers, tokenizer_lib.load_tokenizer(hf_dir), list(names),
      text_embeddings.read_templates(str(templates)))
  assert text.shape == (12, 4, 32)
  np.testing.assert_allclose(text, expected, rtol=1e-5, atol=1e-6)
  own = synthetic.text_embeddings(loading.synthetic_config(config))
  assert np.abs(text - own).max() > 0.1

  workdir = tmp_path / 'run'
  proc = _check(_run(_train_cmd(workdir, *PARITY, f'--config.clip={converted}',
                                f'--config.templates={templates}'), jax_cache))
  assert f'from CLIP {converted} with templates' in proc.stderr
  assert np.isfinite(list(_losses(workdir).values())).all()
  # ft_backbone=False: CLIP's image tower is frozen, so it leaves training as it came in.
  clip_visual = traverse_util.flatten_dict(checkpoint.load_params(converted)[0]['backbone'])
  trained = _params(workdir)
  for path, value in clip_visual.items():
    np.testing.assert_array_equal(trained['backbone/' + '/'.join(path)], value)


# ---------------------------------------------------------------------------------------------------
# Interruptions: SIGTERM, kill -9, resume; NaN.

RESUME = ['--config.num_train_steps=40', '--config.checkpoint_every_steps=4',
          '--config.max_to_keep=3', '--config.async_checkpointing=True', *QUICK]


@pytest.fixture(scope='module')
def resume_reference(tmp_path_factory, jax_cache):
  """An uninterrupted RESUME run (checkpoints 32, 36, 40); copy it before changing it."""
  reference = tmp_path_factory.mktemp('resume') / 'reference'
  _check(_run(_train_cmd(reference, *RESUME), jax_cache))
  return reference


def test_sigterm_then_kill9_then_resume_equals_an_uninterrupted_run(tmp_path, jax_cache,
                                                                      resume_reference):
  reference = resume_reference

  workdir = tmp_path / 'interrupted'
  env = _env(jax_cache)
  # 1. SIGTERM after the checkpoint of step 8: a clean stop with a checkpoint of that step.
  proc = subprocess.Popen(_train_cmd(workdir, *RESUME), env=env, cwd=REPO, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE)
  _wait_for_checkpoint(proc, workdir, 8)
  proc.send_signal(signal.SIGTERM)
  out, err = proc.communicate(timeout=120)
  assert proc.returncode == 143, err[-4000:]  # 128 + SIGTERM: preempted, resumable
  stopped = _steps(workdir)[-1]
  assert f'Stopped at step {stopped}' in out and stopped < 40, out

  # 2. Resume, then kill -9 a few checkpoints later (possibly in the middle of an async save).
  proc = subprocess.Popen(_train_cmd(workdir, *RESUME), env=env, cwd=REPO, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE)
  _wait_for_checkpoint(proc, workdir, stopped + 8)
  proc.kill()
  _, err = proc.communicate(timeout=60)
  assert 'Resumed from' in err and f'at step {stopped}' in err, err[-4000:]
  killed_at = _steps(workdir)[-1]
  assert killed_at < 40, 'the run finished before it could be killed'

  # 3. Resume to the end: the same parameters as the uninterrupted run, bit for bit.
  proc = _check(_run(_train_cmd(workdir, *RESUME), jax_cache))
  assert 'Resumed from' in proc.stderr
  expected, got = _params(reference), _params(workdir)
  assert expected.keys() == got.keys()
  for name in expected:
    assert got[name].shape == expected[name].shape, name
    np.testing.assert_array_equal(got[name], expected[name], err_msg=name)
  # The log: steps logged after a restored checkpoint were dropped on resume (no step twice), and
  # the losses are the reference's (except around the stop, where the log windows differ).
  steps = [json.loads(line)['step'] for line in
           (workdir / 'metrics.jsonl').read_text().splitlines()]
  assert steps == sorted(set(steps))
  expected, got = _losses(reference), _losses(workdir)
  for step in expected:
    if step < stopped or step > killed_at:
      assert got[step] == pytest.approx(expected[step], rel=1e-6), step


def _truncate(path):
  path.write_bytes(path.read_bytes()[:path.stat().st_size // 2])
  return path


def test_unreadable_latest_checkpoint_falls_back_and_is_kept(tmp_path, jax_cache,
                                                              resume_reference):
  workdir = tmp_path / 'broken'
  shutil.copytree(resume_reference, workdir)
  assert _steps(workdir) == [32, 36, 40]
  # A truncated array file in the latest step: resume from step 36, keep step 40 aside.
  arrays = sorted((workdir / 'checkpoints' / '40' / 'state').rglob('d/*'),
                  key=lambda p: p.stat().st_size)
  broken = _truncate(arrays[-1])
  proc = _check(_run(_train_cmd(workdir, *RESUME), jax_cache))
  assert 'step 40 is unreadable' in proc.stderr and broken.name in proc.stderr, proc.stderr[-3000:]
  # No traceback of ours. (The abandoned reads of the broken step are silenced by the trainer;
  # about one run in six, one of them still reaches stderr through another path, naming only
  # orbax / tensorstore frames.)
  frames = re.findall(r'File "([^"]+)"', proc.stderr)
  assert 'at step 36' in proc.stderr
  assert not [f for f in frames if '/otseg_jax/' in f or f.endswith('train.py')], frames
  kept = workdir / 'checkpoints' / '40.unreadable'
  assert (kept / broken.relative_to(workdir / 'checkpoints' / '40')).is_file()
  # Step 40 trained again and saved beside the kept one, which max_to_keep=3 left alone.
  assert _steps(workdir) == [32, 36, 40]

  # No step restores (truncated JSON metadata in all): one line naming the step and the file.
  for step in (32, 36, 40):
    bad_json = _truncate(workdir / 'checkpoints' / str(step) / 'state' / '_METADATA')
  for cmd in (_train_cmd(workdir, *RESUME),
              [sys.executable, str(REPO / 'eval.py'), f'--config={REPO}/configs/tiny.py',
               f'--checkpoint={workdir}', f'--outdir={tmp_path / "eval"}']):
    proc = _run(cmd, jax_cache)
    assert proc.returncode != 0 and 'Traceback' not in proc.stderr, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert 'step 40' in last and str(bad_json) in last and 'not valid JSON' in last, last
  assert kept.is_dir() and (workdir / 'checkpoints' / '40').is_dir()


_NAN_SCRIPT = r'''
import sys
import grain
import numpy as np
from configs import tiny
from otseg_jax import trainer
from otseg_jax.data import loading

class Poisoned(grain.DatasetIterator):
  """The real iterator, with NaN images from the 7th batch on."""
  def __init__(self, inner):
    super().__init__(inner)
    self.inner, self.count = inner, 0
  def __next__(self):
    batch, self.count = dict(next(self.inner)), self.count + 1
    if self.count >= 7:
      batch['image'] = batch['image'] * np.nan
    return batch
  def get_state(self):
    return self.inner.get_state()
  def set_state(self, state):
    self.inner.set_state(state)

make = loading.make_train_iterator
loading.make_train_iterator = lambda *a, **k: Poisoned(make(*a, **k))
config = tiny.get_config()
config.num_train_steps, config.checkpoint_every_steps, config.log_every_steps = 12, 2, 100
config.eval_every_steps, config.model.head.decoder_layers = -1, 1
try:
  trainer.train_and_evaluate(config, sys.argv[1])
except FloatingPointError as e:
  print('STOPPED:', e)
'''


def test_nan_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, jax_cache):
  workdir = tmp_path / 'nan'
  proc = _check(_run([sys.executable, '-c', _NAN_SCRIPT, str(workdir)], jax_cache))
  assert 'STOPPED: Non-finite total' in proc.stdout, proc.stdout + proc.stderr[-3000:]
  assert 'at step 7' in proc.stdout and 'last good checkpoint is step 6' in proc.stdout
  assert _steps(workdir)[-1] == 6  # step 7's NaN state was never saved
  assert all(np.isfinite(v).all() for v in _params(workdir).values())


# ---------------------------------------------------------------------------------------------------
# Same numbers on 1 device, 8 devices (jit and pmap) and 2 processes.

# The reference's prompt tuning (ft_backbone off): with the whole tower trained, the key biases of
# its softmax attention get a zero gradient up to rounding, which Adam scales up to +-lr.
PARITY = ['--config.num_train_steps=3', '--config.log_every_steps=1',
          '--config.checkpoint_every_steps=3', '--config.data.shards=2',
          '--config.ft_backbone=False', '--config.schedule.warmup_steps=0', *QUICK]


def _assert_same_run(workdir, reference, rtol=1e-5, atol=1e-6):
  assert _losses(workdir) == pytest.approx(_losses(reference), rel=rtol)
  # Adam hides a wrong gradient scale from the parameters; the gradient norm does not.
  assert _losses(workdir, 'train/grad_norm') == pytest.approx(
      _losses(reference, 'train/grad_norm'), rel=rtol)
  expected, got = _params(reference), _params(workdir)
  assert expected.keys() == got.keys()
  for name in expected:
    assert got[name].shape == expected[name].shape, name
    np.testing.assert_allclose(got[name], expected[name], rtol=rtol, atol=atol, err_msg=name)


@pytest.fixture(scope='module')
def one_device_run(tmp_path_factory, jax_cache):
  workdir = tmp_path_factory.mktemp('parity') / 'jit_1'
  _check(_run(_train_cmd(workdir, *PARITY, '--config.eval_every_steps=0'), jax_cache))
  return workdir


@pytest.mark.parametrize('parallel,devices', [('jit', 8), ('pmap', 1), ('pmap', 8)])
def test_devices_and_pmap_give_the_same_run(tmp_path, jax_cache, one_device_run, parallel,
                                            devices):
  workdir = tmp_path / f'{parallel}_{devices}'
  _check(_run(_train_cmd(workdir, *PARITY, f'--config.parallel={parallel}'), jax_cache,
              devices=devices))
  _assert_same_run(workdir, one_device_run)


def test_two_processes_give_the_same_run(tmp_path, jax_cache, one_device_run):
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    port = s.getsockname()[1]
  workdir = tmp_path / 'two_processes'
  procs = [subprocess.Popen(
      _train_cmd(workdir, *PARITY, '--config.eval_every_steps=0', '--num_processes=2',
                 f'--process_id={i}', f'--coordinator_address=127.0.0.1:{port}'),
      env=_env(jax_cache), cwd=REPO, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
           for i in range(2)]
  outputs = [p.communicate(timeout=400) for p in procs]
  for p, (out, err) in zip(procs, outputs):
    assert p.returncode == 0, err[-6000:]
  assert '2 processes' in outputs[0][1]
  _assert_same_run(workdir, one_device_run)
  # Evaluation: each process scores its half of the images, the sums are exact.
  expected = json.loads((one_device_run / 'eval' / 'results.json').read_text())
  got = json.loads((workdir / 'eval' / 'results.json').read_text())
  assert got['num_images'] == expected['num_images'] == 16
  assert [r['pixels'] for r in got['per_class']] == [r['pixels'] for r in expected['per_class']]
  assert got['mIoU'] == pytest.approx(expected['mIoU'], abs=0.5)


# train.py as it is, with OTSeg's pseudo-labels recorded from inside the step: the inputs and the
# result of every call (jax.debug.callback runs on the host during the step).
_RECORD_PSEUDO_LABELS = r'''
import runpy
import sys
import jax
import numpy as np
from otseg_jax.models import otseg

out_path, sys.argv = sys.argv[1], ['train.py'] + sys.argv[2:]
real, calls = otseg.pseudo_labels, []

def recording(maps, labels, seen, config):
  out = real(maps, labels, seen, config)
  jax.debug.callback(lambda *arrays: calls.append([np.asarray(a) for a in arrays]),
                     maps['decoder'], maps['score'], labels, out)
  return out

otseg.pseudo_labels = recording
try:
  runpy.run_path('train.py', run_name='__main__')
finally:
  np.savez(out_path, **{f'{name}_{i}': a for i, call in enumerate(calls)
                        for name, a in zip(('decoder', 'score', 'labels', 'out'), call)})
'''


def test_transductive_self_training_from_an_inductive_run(tmp_path, jax_cache, one_device_run):
  workdir = tmp_path / 'transductive'
  args = [a for a in PARITY if 'num_train_steps' not in a]
  record = tmp_path / 'pseudo_labels.npz'
  _check(_run([sys.executable, '-c', _RECORD_PSEUDO_LABELS, str(record),
               *_train_cmd(workdir, *args, '--config.num_train_steps=2', '--config.seed=1',
                           f'--config.init_from={one_device_run}',
                           config='configs/tiny.py:transductive')[2:]], jax_cache))
  config = json.loads((workdir / 'config.json').read_text())
  assert config['setting'] == 'transductive' and config['model']['calibration'] == 0.0
  losses = _losses(workdir)
  assert sorted(losses) == [1, 2] and all(np.isfinite(v) for v in losses.values())
  # It started from the inductive parameters, not from a fresh (seed 1) initialisation: two Adam
  # steps of lr 1e-3 move a parameter by at most ~2e-3.
  start, end = _params(one_device_run), _params(workdir)
  for name in ('decode_head/q_proj/kernel', 'backbone/conv1/kernel'):
    assert np.abs(end[name] - start[name]).max() < 5e-3, name

  # The labels the loss got: every pixel of an unseen class carries the argmax over the unseen
  # classes of sigmoid(b * score + (1 - b) * decoder) (numpy, in float64 here), every other pixel
  # its own label.
  unseen = np.asarray(json.loads((workdir / 'params' / 'metadata.json').read_text())['unseen'])
  b = config['model']['pseudo_label_balance']
  with np.load(record) as f:
    calls = [{k: f[f'{k}_{i}'] for k in ('decoder', 'score', 'labels', 'out')}
             for i in range(len(f.files) // 4)]
  assert len(calls) == 2  # one per step
  relabelled = 0
  for c in calls:
    logits = b * c['score'].astype(np.float64) + (1 - b) * c['decoder'].astype(np.float64)
    probs = np.full(logits.shape, -1.0)
    probs[..., unseen] = 1 / (1 + np.exp(-logits[..., unseen]))
    want = probs.argmax(-1)
    at = np.isin(c['labels'], unseen)
    assert at.any()
    assert np.isin(c['out'][at], unseen).all()
    # A pixel may differ only where float32 cannot tell its two best unseen classes apart.
    got = np.take_along_axis(probs, np.clip(c['out'], 0, probs.shape[-1] - 1)[..., None], -1)
    gap = probs.max(-1) - got[..., 0]
    assert (gap[at & (c['out'] != want)] < 1e-6).all()
    np.testing.assert_array_equal(c['out'][~at], c['labels'][~at])
    relabelled += int((c['out'][at] != c['labels'][at]).sum())
  assert relabelled > 0  # the ground truth is not what came back

def test_first_step_is_left_out_of_the_rate_and_a_rerun_adds_no_eval_row(tmp_path, jax_cache,
                                                                          one_device_run):
  lines = (one_device_run / 'metrics.jsonl').read_text().splitlines()
  train = {r['step']: r for r in map(json.loads, lines) if 'train/total' in r}
  # Step 1 compiles: it gets its own time, and the rates (so the ETA) start after it.
  assert 'train/images_per_sec' not in train[1] and train[1]['train/first_step_seconds'] > 0
  assert all(train[s]['train/images_per_sec'] > 0 for s in (2, 3))
  assert all('train/first_step_seconds' not in train[s] for s in (2, 3))
  # Rerunning a finished run evaluates again; its row replaces the earlier one.
  workdir = tmp_path / 'rerun'
  shutil.copytree(one_device_run, workdir)
  _check(_run(_train_cmd(workdir, *PARITY, '--config.eval_every_steps=0'), jax_cache))
  records = [json.loads(line) for line in (workdir / 'metrics.jsonl').read_text().splitlines()]
  assert [r['step'] for r in records if 'eval/hIoU' in r] == [3]
  assert len(records) == len(lines)
