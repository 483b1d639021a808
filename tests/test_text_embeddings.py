"""The text-embeddings command, end to end on a random HF CLIP with the real tokenizer files."""

import os

import numpy as np
import pytest
import torch

import clip_testing as ct
from conftest import shared_path
from otseg_jax import classes, text_embeddings
from otseg_jax import tokenizer as tokenizer_lib
from otseg_jax.models import clip_weights


@pytest.fixture(scope='module')
def clip_dir(tmp_path_factory):
  """A random HF CLIP with the real 49408-token vocabulary (tiny widths) and its tokenizer files."""
  directory = tmp_path_factory.mktemp('clip_text')
  model = ct.save_random_hf_clip(
      directory, seed=7, vision_width=32, vision_layers=1, vision_heads=2, patch_size=8,
      image_size=16, text_width=32, text_layers=1, text_heads=2, vocab_size=49408,
      context_length=77, embed_dim=16)
  ct.write_clip_tokenizer_files(directory, shared_path('clip_bpe', 'bpe_simple_vocab_16e6.txt.gz'))
  return model, directory


def _torch_embeddings(model, directory, names, templates):
  import transformers
  tokenizer = transformers.CLIPTokenizer.from_pretrained(str(directory))
  texts = [t.format(n) for n in names for t in templates]
  ids = tokenizer(texts, padding='max_length', max_length=77, truncation=True,
                  return_tensors='pt')['input_ids']
  with torch.no_grad():
    feats = model.get_text_features(input_ids=ids).pooler_output.numpy()
  feats = feats / np.linalg.norm(feats, axis=-1, keepdims=True)
  return feats.reshape(len(names), len(templates), -1)


def test_command_matches_torch(clip_dir, tmp_path):
  model, directory = clip_dir
  out = tmp_path / 'sub' / 'custom.npy'
  text_embeddings.main(['--clip', str(directory), '--classes', 'cat, dog,,traffic light',
                        '--out', str(out)])
  got = np.load(out)
  templates = classes.templates('otseg8')  # the default for custom classes
  want = _torch_embeddings(model, directory, ['cat', 'dog', 'traffic light'], templates)
  assert got.shape == (3, 8, 16) and got.dtype == np.float32
  np.testing.assert_allclose(np.linalg.norm(got, axis=-1), 1, atol=1e-6)
  np.testing.assert_allclose(got, want, atol=2e-6)
  assert sorted(p.name for p in out.parent.iterdir()) == ['custom.npy']  # no temporary left

  # A classes file, a template file and several batches (the last one padded).
  (tmp_path / 'names.txt').write_text('person\n\nsky\nbus\n')
  (tmp_path / 'templates.txt').write_text('a {} in the scene.\nthere is a {}.\n')
  text_embeddings.main(['--clip', str(directory), '--classes-file', str(tmp_path / 'names.txt'),
                        '--templates', str(tmp_path / 'templates.txt'), '--batch-size', '4',
                        '--out', str(out)])
  want = _torch_embeddings(model, directory, ['person', 'sky', 'bus'],
                           ['a {} in the scene.', 'there is a {}.'])
  np.testing.assert_allclose(np.load(out), want, atol=2e-6)


def test_dataset_uses_its_templates(clip_dir, tmp_path):
  _, directory = clip_dir
  out = tmp_path / 'voc.npy'
  text_embeddings.main(['--clip', str(directory), '--dataset', 'voc12', '--out', str(out)])
  assert np.load(out).shape == (20, 6, 16)  # VOC: otseg6


@pytest.mark.parametrize('args,message', [
    (['--classes', ' , '], 'class list is empty'),
    (['--classes', 'cat', '--templates', '/no/such/templates.txt'],
     'Cannot read the template file'),
    (['--classes', 'cat', '--templates', 'BAD'], 'Cannot read the template file'),
    (['--dataset', 'voc12', '--out', 'x.txt'], 'must end in .npy'),
])
def test_bad_arguments(args, message, tmp_path, capsys):
  argv = ['--clip', str(tmp_path), '--out', str(tmp_path / 'o.npy')] + args
  with pytest.raises(SystemExit):
    text_embeddings.main(argv)
  assert message in capsys.readouterr().err


def test_bad_files(clip_dir, tmp_path, capsys):
  _, directory = clip_dir
  (tmp_path / 't.txt').write_text('a photo of a cat\n')
  (tmp_path / 'empty.txt').write_text('\n\n')
  cases = [
      (['--clip', str(directory), '--classes', 'cat', '--templates', str(tmp_path / 't.txt')],
       'must contain "{}"'),
      (['--clip', str(directory), '--classes-file', str(tmp_path / 'empty.txt')],
       'class list is empty'),
      (['--clip', str(tmp_path / 'missing'), '--classes', 'cat'], 'no such file or directory'),
  ]
  for args, message in cases:
    with pytest.raises(SystemExit):
      text_embeddings.main(args + ['--out', str(tmp_path / 'o.npy')])
    assert message in capsys.readouterr().err, args
  assert not (tmp_path / 'o.npy').exists()


@pytest.mark.skipif(not os.environ.get('OTSEG_CLIP_WEIGHTS'),
                    reason='set OTSEG_CLIP_WEIGHTS to a real ViT-B/16 CLIP (dir, hub id or .pt)')
def test_real_clip_reproduces_the_authors_voc_embeddings(tmp_path):
  """With real OpenAI ViT-B/16 weights, voc12 matches the authors' array (stored as float16)."""
  weights = os.environ['OTSEG_CLIP_WEIGHTS']
  spec, params = clip_weights.load_clip(weights)
  tok_dir = weights if tokenizer_lib.has_tokenizer_files(weights) else ct.write_clip_tokenizer_files(
      tmp_path, shared_path('clip_bpe', 'bpe_simple_vocab_16e6.txt.gz'))
  voc = classes.get('voc12')
  got = text_embeddings.compute_text_embeddings(spec, params, tokenizer_lib.load_tokenizer(tok_dir),
                                                voc.classes, classes.templates(voc.templates))
  want = np.load(shared_path('text_embeddings', 'voc12_otseg.npy')).astype(np.float32)
  np.testing.assert_allclose(got, want, atol=2e-3)


def _tiny_config_and_names():
  from configs import tiny
  from otseg_jax.data import loading
  from otseg_jax.data import synthetic
  config = tiny.get_config()
  names = synthetic.load_split('train', loading.synthetic_config(config)).classes.classes
  return config, names


def test_a_text_file_that_is_no_npy_array_is_one_error_naming_it(tmp_path):
  config, names = _tiny_config_and_names()
  bad = {
      'text.npy': (b'a photo of a cat\n', 'not a numpy .npy array'),
      'pickled.npy': (None, 'holds object values, not numbers'),
      # 128 bytes of header claiming 10^12 floats over no data: refused before allocating.
      'huge.npy': (None, r'declares \(1000000, 1000000\) float32 \(4000000000000 bytes\) but it '
                   'holds 0'),
      'truncated.npy': (None, 'holds 1200: truncated or corrupt'),
      # A header cut inside a tuple: numpy's parser raises tokenize's TokenError.
      'header.npy': (b'\x93NUMPY\x01\x00\x76\x00' + b"{'descr': ('<f4'," + b' ' * 100 + b'\n',
                     'header.npy: not a numpy .npy array'),
  }
  np.save(tmp_path / 'pickled.npy', np.array([{'a': 1}], dtype=object), allow_pickle=True)
  with open(tmp_path / 'huge.npy', 'wb') as f:
    np.lib.format.write_array_header_1_0(
        f, {'descr': '<f4', 'fortran_order': False, 'shape': (10**6, 10**6)})
  np.save(tmp_path / 'truncated.npy', np.ones((12, 4, 32), np.float32))
  data = (tmp_path / 'truncated.npy').read_bytes()
  (tmp_path / 'truncated.npy').write_bytes(data[:len(data) - 12 * 4 * 32 * 4 + 1200])
  for name, (content, message) in bad.items():
    if content is not None:
      (tmp_path / name).write_bytes(content)
    config.text_embeddings = str(tmp_path / name)
    with pytest.raises(ValueError, match=message) as e:
      text_embeddings.load_text_embeddings(config, names)
    assert name in str(e.value)


def test_non_finite_text_stops_train_and_eval_naming_the_file_and_class(tmp_path):
  from otseg_jax import evaluate
  config, names = _tiny_config_and_names()
  text = np.ones((12, 4, 32), np.float32) / np.sqrt(32)
  text[5, 2, 7] = np.nan
  text[9, 0, 0] = np.inf
  np.save(tmp_path / 'nan.npy', text)
  config.text_embeddings = str(tmp_path / 'nan.npy')
  message = (rf"from {tmp_path}/nan\.npy: class 5 \({names[5]!r}\) has NaN or infinite values "
             r"\(2 of 12 classes do\)")
  with pytest.raises(ValueError, match=message):
    text_embeddings.load_text_embeddings(config, names)  # what train.py loads
  (tmp_path / 'ckpt').mkdir()
  with pytest.raises(ValueError, match=message):
    evaluate.evaluate_checkpoint(config, str(tmp_path / 'ckpt'))


def test_text_that_is_not_unit_length_is_a_warning_only(caplog):
  text = np.ones((3, 2, 4), np.float32) / 2
  text_embeddings.check_text_embeddings(text, 'here', ['a', 'b', 'c'])
  assert not caplog.records
  text[1, 1] *= 1.5
  text_embeddings.check_text_embeddings(text, 'here', ['a', 'b', 'c'])
  assert len(caplog.records) == 1 and caplog.records[0].levelname == 'WARNING'
  assert ('from here: 1 of 6 rows are not unit length (worst: class 1, norm 1.5)'
          in caplog.records[0].getMessage())
