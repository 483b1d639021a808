"""Every failure of a command-line tool is one line `PROG: error: ...`; OTSEG_DEBUG=1 shows the
traceback."""

import os
import pathlib
import subprocess
import sys

import pytest

from otseg_jax import cli
from otseg_jax import convert

REPO = pathlib.Path(__file__).resolve().parents[1]
PROG = 'python -m otseg_jax.convert'


def _run(args, **env):
  return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=REPO,
                        timeout=300, env={**os.environ, 'PYTHONPATH': str(REPO), **env})


def _one_error_line(stderr: str, prog: str) -> str:
  lines = [line for line in stderr.splitlines() if line.strip()]
  assert len(lines) == 1 and lines[0].startswith(f'{prog}: error: '), stderr
  return lines[0]


def test_convert_failures_are_one_line(tmp_path, capsys):
  (tmp_path / 'garbage.pt').write_bytes(b'PK\x03\x04 not really a zip')
  (tmp_path / 'exists').mkdir()
  (tmp_path / 'model.json').write_text('{"image_size": 32}')
  cases = [
      (['--from', 'openai-clip', '--in', str(tmp_path / 'missing.pt')], 'is not a file'),
      (['--from', 'otseg-mmseg', '--in', str(tmp_path / 'garbage.pt')], 'garbage.pt'),
      (['--from', 'openai-clip', '--in', str(tmp_path / 'garbage.pt')], 'garbage.pt'),
      (['--from', 'hf-clip', '--in', str(tmp_path / 'missing_dir')], 'missing_dir'),
      (['--from', 'otseg-mmseg', '--in', str(tmp_path / 'garbage.pt'), '--config', 'vocc'],
       'vocc'),
      (['--from', 'otseg-mmseg', '--in', str(tmp_path / 'garbage.pt'), '--out',
        str(tmp_path / 'exists'), '--config', str(tmp_path / 'nope.json')], 'nope.json'),
  ]
  for args, named in cases:
    if '--out' not in args:
      args = [*args, '--out', str(tmp_path / 'out')]
    assert cli.run(PROG, convert.main, args) == 1, args
    assert named in _one_error_line(capsys.readouterr().err, PROG)
  assert not (tmp_path / 'out').exists()


def test_a_bug_is_one_line_that_says_so_and_debug_shows_the_traceback(monkeypatch, capsys):
  def buggy(argv):
    return {}['missing']

  assert cli.run('tool', buggy) == 1
  line = _one_error_line(capsys.readouterr().err, 'tool')
  assert 'unexpected KeyError' in line and 'OTSEG_DEBUG=1' in line
  monkeypatch.setenv('OTSEG_DEBUG', '1')
  with pytest.raises(KeyError):
    cli.run('tool', buggy)
  assert cli.run('tool', lambda argv: None) == 0


def test_python_m_convert_prints_one_line_and_exits_1(tmp_path):
  proc = _run(['-m', 'otseg_jax.convert', '--from', 'openai-clip', '--in', str(tmp_path / 'x.pt'),
               '--out', str(tmp_path / 'out')])
  assert proc.returncode == 1
  assert 'x.pt' in _one_error_line(proc.stderr, PROG)
  proc = _run(['-m', 'otseg_jax.convert', '--from', 'openai-clip', '--in', str(tmp_path / 'x.pt'),
               '--out', str(tmp_path / 'out')], OTSEG_DEBUG='1')
  assert proc.returncode == 1 and 'Traceback' in proc.stderr
  for args in (['--from', 'nothing'], ['--from', 'openai-clip', '--in', 'x.pt', '--out', 'y',
                                       '--dtype', 'int8']):
    proc = _run(['-m', 'otseg_jax.convert', *args])
    assert proc.returncode == 2 and 'Traceback' not in proc.stderr  # argparse's usage error


@pytest.mark.parametrize('script', ['train.py', 'eval.py'])
def test_an_unknown_config_field_is_one_line(script, tmp_path):
  proc = _run([script, '--config=configs/tiny.py', '--config.foo=1',
               f'--workdir={tmp_path}', f'--checkpoint={tmp_path}'])
  assert proc.returncode != 0
  line = _one_error_line(proc.stderr, script)
  assert "--config.foo: the config has no field 'foo'" in line, line
  proc = _run([script, '--config=configs/tiny.py', '--config.optimizer.lrr=1',
               f'--workdir={tmp_path}', f'--checkpoint={tmp_path}'])
  line = _one_error_line(proc.stderr, script)
  assert ('--config.optimizer.lrr: the config has no field \'lrr\'. Did you mean "lr" instead of '
          '"lrr"?') in line, line


def test_otseg_debug_shows_the_traceback_of_train_py(tmp_path):
  (tmp_path / 'text.npy').write_text('not an array')
  args = ['train.py', '--config=configs/tiny.py', f'--config.text_embeddings={tmp_path}/text.npy',
          f'--workdir={tmp_path}/run']
  proc = _run(args)
  assert 'text.npy: not a numpy .npy array' in _one_error_line(proc.stderr, 'train.py')
  proc = _run(args, OTSEG_DEBUG='1')
  assert proc.returncode != 0 and 'Traceback' in proc.stderr
