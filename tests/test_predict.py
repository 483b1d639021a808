"""`python -m otseg_jax.predict`: any images, any class names, text embedded on the fly."""

import json

import numpy as np
from PIL import Image
import pytest

import clip_testing as ct
from configs import tiny
from conftest import shared_path
from otseg_jax import checkpoint, predict, trainer
from otseg_jax.models import otseg


@pytest.fixture(scope='module')
def setup(tmp_path_factory):
  root = tmp_path_factory.mktemp('predict')
  # A random HF CLIP whose text tower embeds into the tiny model's 32 dimensions, with the real
  # tokenizer files.
  clip_dir = root / 'clip'
  ct.save_random_hf_clip(clip_dir, seed=3, vision_width=32, vision_layers=1, vision_heads=2,
                         patch_size=8, image_size=32, text_width=32, text_layers=1, text_heads=2,
                         vocab_size=49408, context_length=77, embed_dim=32)
  ct.write_clip_tokenizer_files(clip_dir, shared_path('clip_bpe', 'bpe_simple_vocab_16e6.txt.gz'))
  # A tiny OTSeg parameter checkpoint, as train.py exports it (random weights).
  config = tiny.get_config()
  model = otseg.model_from_config(config.model)
  text = np.ones((3, config.model.num_prompts, 32), np.float32)
  params = trainer.init_params(config, model, text, seed=0)
  ckpt = checkpoint.save_params(root / 'ckpt', params,
                                {'config': json.loads(config.to_json_best_effort())})
  images = []
  for name, size in (('a.png', (40, 30)), ('b.jpg', (20, 50))):
    rgb = np.random.default_rng(len(name)).integers(0, 255, (*size, 3), np.uint8)
    Image.fromarray(rgb).save(root / name)
    images.append(root / name)
  return clip_dir, ckpt, images


def test_predict_writes_masks_and_overlays(setup, tmp_path, capsys):
  clip_dir, ckpt, images = setup
  out = tmp_path / 'out'
  assert predict.main(['--checkpoint', str(ckpt), '--image', *map(str, images),
                       '--classes', 'cat, dog,grass', '--clip', str(clip_dir),
                       '--short_side', '32', '--out', str(out)]) == 0
  assert json.loads((out / 'classes.json').read_text()) == {'0': 'cat', '1': 'dog', '2': 'grass'}
  for path in images:
    mask = np.asarray(Image.open(out / f'{path.stem}_mask.png'))
    original = np.asarray(Image.open(path))
    assert mask.shape == original.shape[:2]  # labels at the original size
    assert mask.max() < 3
    overlay = np.asarray(Image.open(out / f'{path.stem}_overlay.png'))
    assert overlay.ndim == 3 and overlay.shape[1] >= 2 * original.shape[1]
  assert 'a_mask.png' in capsys.readouterr().out


@pytest.mark.parametrize('args,message', [
    (['--classes', ' , '], '--classes is empty'),
    (['--classes', 'cat,cat'], 'names a class twice'),
    (['--image', 'missing.png'], 'no such image file'),
    (['--checkpoint', 'no/such/dir'], 'no such directory'),
])
def test_bad_arguments(setup, tmp_path, capsys, args, message):
  clip_dir, ckpt, images = setup
  base = {'--checkpoint': str(ckpt), '--image': str(images[0]), '--classes': 'cat,dog',
          '--clip': str(clip_dir), '--out': str(tmp_path)}
  base.update(dict(zip(args[::2], args[1::2])))
  with pytest.raises(SystemExit):
    predict.main([x for kv in base.items() for x in kv])
  assert message in capsys.readouterr().err


def test_clip_giving_non_finite_text_is_refused(setup, tmp_path):
  import shutil
  import safetensors.numpy
  clip_dir, ckpt, images = setup
  shutil.copytree(clip_dir, tmp_path / 'clip')
  weights = tmp_path / 'clip' / 'model.safetensors'
  sd = safetensors.numpy.load_file(weights)
  sd['text_projection.weight'][:, 0] = np.nan
  safetensors.numpy.save_file(sd, weights)
  with pytest.raises(ValueError, match=r"class 0 \('cat'\) has NaN or infinite values"):
    predict.main(['--checkpoint', str(ckpt), '--image', str(images[0]), '--classes', 'cat,dog',
                  '--clip', str(tmp_path / 'clip'), '--out', str(tmp_path / 'out')])
  assert not (tmp_path / 'out').exists()


def test_an_unreadable_image_is_reported_and_skipped(setup, tmp_path, capsys):
  clip_dir, ckpt, images = setup
  bad = tmp_path / 'broken.png'
  bad.write_bytes(b'not a png')
  out = tmp_path / 'out'
  code = predict.main(['--checkpoint', str(ckpt), '--image', str(images[0]), str(bad),
                       str(images[1]), '--classes', 'cat,dog', '--clip', str(clip_dir),
                       '--short_side', '32', '--out', str(out)])
  assert code == 1  # nonzero at the end, after the readable images were done
  for path in images:
    assert (out / f'{path.stem}_mask.png').is_file(), path
  assert not (out / 'broken_mask.png').exists()
  err = capsys.readouterr().err
  assert f'skipped {bad}' in err and '1 of 3 images could not be read' in err, err
