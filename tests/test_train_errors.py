"""Bad input fails early with a message that names the problem and the fix."""

import pathlib
import subprocess
import sys

import numpy as np
import pytest

from configs import tiny, voc12  # pylint: disable=g-multiple-import
from otseg_jax import evaluate, params, trainer
from otseg_jax.data import loading

REPO = pathlib.Path(__file__).resolve().parents[1]


def test_missing_dataset(tmp_path):
  config = voc12.get_config()
  config.data.data_dir = str(tmp_path / 'no_data')
  with pytest.raises(FileNotFoundError, match=r'voc12 is not prepared.*otseg_jax\.data\.prepare'):
    trainer.train_and_evaluate(config, tmp_path / 'run')


def test_text_embeddings_of_another_dataset_are_refused(tmp_path):
  path = tmp_path / 'other.npy'
  np.save(path, np.ones((59, 4, 32), np.float32))  # e.g. Context's 59 classes
  config = tiny.get_config()
  config.text_embeddings = str(path)
  with pytest.raises(ValueError, match="59 classes but dataset 'synthetic' has 12"):
    trainer.train_and_evaluate(config, tmp_path / 'run')
  config.text_embeddings = str(tmp_path / 'missing.npy')
  with pytest.raises(FileNotFoundError, match='no such file'):
    trainer.train_and_evaluate(config, tmp_path / 'run')
  assert not (tmp_path / 'run').exists()  # refused before anything was written


def test_transductive_needs_an_inductive_start(tmp_path):
  with pytest.raises(ValueError, match='--config.init_from'):
    trainer.train_and_evaluate(tiny.get_config('transductive'), tmp_path / 'run')


def test_bad_config_values(tmp_path):
  config = tiny.get_config()
  config.parallel = 'pjit'
  with pytest.raises(ValueError, match="config.parallel='pjit'"):
    trainer.train_and_evaluate(config, tmp_path / 'run')
  config = tiny.get_config()
  config.data.shards = 3
  with pytest.raises(ValueError, match='config.data.shards=3 .* divide config.batch_size=8'):
    loading.make_train_iterator(config, loading.load_data_split(config, 'train'))
  config = tiny.get_config()
  config.num_train_steps = 0
  with pytest.raises(ValueError, match='num_train_steps=0 must be positive'):
    trainer.validate_config(config)


def test_missing_checkpoint(tmp_path):
  with pytest.raises(FileNotFoundError, match='no such directory'):
    evaluate.evaluate_checkpoint(tiny.get_config(), str(tmp_path / 'nothing'))
  (tmp_path / 'empty').mkdir()
  with pytest.raises(FileNotFoundError, match='holds no parameters'):
    params.load_params_any(tmp_path / 'empty')


def test_train_py_refuses_an_unknown_config_field(tmp_path):
  proc = subprocess.run(
      [sys.executable, str(REPO / 'train.py'), f'--config={REPO}/configs/tiny.py',
       '--config.optimizer.lrr=1e-4', f'--workdir={tmp_path}'],
      capture_output=True, text=True, cwd=REPO, timeout=120)
  assert proc.returncode != 0
  assert 'lrr' in proc.stderr and 'Did you mean "lr"' in proc.stderr
