"""The tiny CLIP pretrained on the synthetic world (otseg_jax.data.synthetic_clip), its HF directory,
its tokenizer, and the demo config that trains on it (configs/synthetic.py).

One tiny CLIP is pretrained per test session (conftest.tiny_synthetic_clip).
"""

import dataclasses
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from otseg_jax import params as params_lib
from otseg_jax import text_embeddings
from otseg_jax import tokenizer as tokenizer_lib
from otseg_jax.data import loading
from otseg_jax.data import synthetic
from otseg_jax.data import synthetic_clip

REPO = pathlib.Path(__file__).resolve().parents[1]


def test_pretraining_lowers_the_contrastive_loss(tiny_synthetic_clip):
  directory, config = tiny_synthetic_clip
  report = json.loads((directory / 'pretraining.json').read_text())
  losses = [h['loss'] for h in report['history']]
  assert [h['step'] for h in report['history']] == [2, 4, 6, 8]
  # At init the towers' embeddings are unrelated: the loss is at least about log(B), chance
  # pairing (above it, as random embeddings are not orthogonal and 1/T is 14). Then it falls.
  assert losses[0] > np.log(config.batch_size) - 0.3, losses
  assert all(b < a for a, b in zip(losses, losses[1:])), losses
  assert losses[-1] < losses[0] - 0.5, losses
  z = report['zero_shot']
  assert 0 <= z['accuracy'] <= 100 and z['accuracy_images'] == config.eval_images
  assert z['unseen'] == list(synthetic.UNSEEN) and len(z['patch_per_class_iou']) == 12
  assert z['chance_accuracy'] == pytest.approx(100 / 12)


def _architecture(spec):
  """The sizes `PretrainConfig` sets (a loaded spec may spell out more, e.g. default MLP widths)."""
  return {f: getattr(spec, f) for f in (
      'embed_dim', 'image_size', 'patch_size', 'vision_width', 'vision_layers', 'vision_heads',
      'context_length', 'vocab_size', 'text_width', 'text_layers', 'text_heads')}


def _sizes(config):
  """configs/synthetic.py fields that fit the demo config to the tiny CLIP `config`."""
  s = config.image_size
  return {'model.image_size': s, 'data.synthetic.image_size': s, 'eval.crop_size': s,
          'eval.stride': s, 'model.backbone.width': config.vision_width,
          'model.backbone.layers': config.vision_layers,
          'model.backbone.heads': config.vision_heads, 'model.backbone.output_dim': config.embed_dim}


def test_saved_directory_loads_and_is_the_pretrained_clip(tiny_synthetic_clip):
  """load_clip reads the directory as any HF CLIP; its towers are the pretraining's (pretrained
  again here: same seed, same weights), and its text tower gives the pretraining code's class
  text, also through the trainer's path (config.clip set, config.text_embeddings unset)."""
  from flax import traverse_util
  from otseg_jax.models import clip_weights
  from configs import synthetic as synthetic_config
  directory, config = tiny_synthetic_clip
  spec, towers = clip_weights.load_clip(directory)
  tokenizer = tokenizer_lib.load_tokenizer(tokenizer_lib.tokenizer_source(directory))
  assert _architecture(spec) == _architecture(synthetic_clip.clip_spec(config, len(tokenizer)))

  again, params, _ = synthetic_clip.pretrain(config, tokenizer, progress=False)
  assert _architecture(again) == _architecture(spec)
  flat = lambda tree: {'/'.join(k): np.asarray(v)
                       for k, v in traverse_util.flatten_dict(tree).items()}
  loaded, pretrained = flat(towers), flat({'visual': params['visual'], 'text': params['text']})
  assert loaded.keys() == pretrained.keys()
  for name in loaded:
    np.testing.assert_array_equal(loaded[name], pretrained[name], err_msg=name)

  expected = synthetic_clip.class_text(spec, params, tokenizer)  # (K, C), the pretraining code
  config_ = synthetic_config.get_config()
  config_.clip = str(directory)
  for field, value in _sizes(config).items():
    *parents, leaf = field.split('.')
    node = config_
    for name in parents:
      node = node[name]
    node[leaf] = value
  text = text_embeddings.load_text_embeddings(config_, synthetic.class_names())  # (K, N, C)
  assert text.shape == (12, 8, config.embed_dim)
  mean = text.mean(1)
  np.testing.assert_allclose(mean / np.linalg.norm(mean, axis=-1, keepdims=True), expected,
                             rtol=1e-5, atol=1e-6)


def test_transformers_clipmodel_reads_the_directory_and_agrees(tiny_synthetic_clip):
  """transformers' PyTorch CLIPModel.from_pretrained gives the embeddings of our towers."""
  import torch
  import transformers
  from otseg_jax.data import transforms
  from otseg_jax.models import clip_weights
  directory, config = tiny_synthetic_clip
  hf = transformers.CLIPModel.from_pretrained(directory).eval()
  spec, towers = clip_weights.load_clip(directory)
  tokenizer = transformers.CLIPTokenizer.from_pretrained(directory)
  assert hf.logit_scale.item() == pytest.approx(
      json.loads((directory / 'config.json').read_text())['logit_scale_init_value'], rel=1e-6)

  texts = ['a photo of a red horizontal stripes.', 'there are blue diagonal stripes and yellow '
           'vertical stripes.', 'a zebra']  # the last: words outside the world, as bytes
  ids = tokenizer_lib.tokenize(tokenizer, texts, spec.context_length)
  ours = np.asarray(spec.text_tower().apply({'params': towers['text']}, ids))
  with torch.no_grad():
    theirs = hf.text_projection(hf.text_model(input_ids=torch.from_numpy(ids).long()).pooler_output)
  np.testing.assert_allclose(ours, theirs.numpy(), rtol=1e-4, atol=1e-4)

  world = synthetic_clip.world(config)
  images = np.stack([transforms.normalize(synthetic.render(world, 'pretrain_val', i)['image'])
                     for i in range(3)])
  cls, dense, _ = spec.vision_tower().apply({'params': towers['visual']}, images)
  with torch.no_grad():
    out = hf.vision_model(pixel_values=torch.from_numpy(images).permute(0, 3, 1, 2))
    theirs_cls = hf.visual_projection(out.pooler_output)
    theirs_dense = hf.visual_projection(hf.vision_model.post_layernorm(out.last_hidden_state[:, 1:]))
  np.testing.assert_allclose(np.asarray(cls), theirs_cls.numpy(), rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(np.asarray(dense).reshape(3, -1, spec.embed_dim),
                             theirs_dense.numpy(), rtol=1e-4, atol=1e-4)


def test_tokenizer_round_trips_every_class_name(tiny_synthetic_clip):
  directory, _ = tiny_synthetic_clip
  tokenizer = tokenizer_lib.load_tokenizer(directory)
  eot = tokenizer.eos_token_id
  assert eot == len(tokenizer) - 1 and tokenizer.bos_token_id == eot - 1
  for name in synthetic.class_names():
    ids = tokenizer(name)['input_ids']
    assert tokenizer.decode(ids, skip_special_tokens=True) == name
    # One token per word: the BPE was learned from these words.
    assert len(ids) == len(name.split()) + 2 and ids[0] == eot - 1 and ids[-1] == eot, ids
    assert max(ids[1:-1]) < eot - 1
  for word in synthetic_clip.corpus_words():
    assert len(tokenizer(word)['input_ids']) == 3, word
  # Any other text falls back to byte tokens instead of the unknown token (which is EOT).
  ids = tokenizer_lib.tokenize(tokenizer, ['a zebra, 42!'], 24)[0]
  assert tokenizer.decode(ids, skip_special_tokens=True) == 'a zebra , 4 2 !'  # digits one by one
  assert list(ids).index(eot) == int(np.argmax(ids)) > 5


def test_bpe_is_deterministic_and_makes_each_word_one_symbol():
  merges = synthetic_clip.learn_bpe(['stripes', 'striped', 'red'])
  assert merges == synthetic_clip.learn_bpe(['red', 'striped', 'stripes'])
  assert merges[0] == ('e', 'd</w>')  # one of the pairs seen twice, first in sort order
  results = {a + b for a, b in merges}
  assert {'stripes</w>', 'striped</w>', 'red</w>'} <= results


def test_an_existing_directory_is_reused_or_refused(tiny_synthetic_clip, tmp_path):
  directory, config = tiny_synthetic_clip
  before = (directory / 'model.safetensors').stat().st_mtime_ns
  report = synthetic_clip.ensure_pretrained(directory, config)
  assert report['settings'] == dataclasses.asdict(config)
  assert (directory / 'model.safetensors').stat().st_mtime_ns == before
  with pytest.raises(ValueError, match=r'other settings \(steps\); remove it'):
    synthetic_clip.ensure_pretrained(directory, dataclasses.replace(config, steps=9))
  (tmp_path / 'busy').mkdir()
  (tmp_path / 'busy' / 'notes.txt').write_text('mine')
  with pytest.raises(ValueError, match='not an empty directory'):
    synthetic_clip.write_pretrained(tmp_path / 'busy', config)
  assert (tmp_path / 'busy' / 'notes.txt').read_text() == 'mine'
  assert not list(tmp_path.glob('.busy.*'))  # no temporary directory left behind
  # The command line: the default settings differ from the tiny CLIP's -> a one-line error.
  proc = subprocess.run([sys.executable, '-m', 'otseg_jax.data.synthetic_clip', '--out',
                         str(directory)], capture_output=True, text=True, cwd=REPO,
                        env={**os.environ, 'PYTHONPATH': str(REPO)}, timeout=120)
  assert proc.returncode == 2 and 'other settings' in proc.stderr, proc.stderr[-2000:]


def test_unseen_split_and_seed_are_config_fields():
  from configs import synthetic as synthetic_config
  from configs import tiny
  for split in ((0, 4, 8), (1, 5, 9)):
    for module in (synthetic_config, tiny):
      config = module.get_config()
      config.data.synthetic.unseen = split
      for name in ('train', 'val'):
        classes = loading.load_data_split(config, name).classes
        assert classes.unseen == split and len(classes.seen) == 9
  config = synthetic_config.get_config()
  config.data.synthetic.seed = 3
  a = loading.load_data_split(config, 'train').source[0]['image']
  config.data.synthetic.seed = 0
  assert not np.array_equal(a, loading.load_data_split(config, 'train').source[0]['image'])
  with pytest.raises(ValueError, match=r'unseen=\(0, 12\): give distinct class ids in \[0, 12\)'):
    synthetic.SyntheticConfig(unseen=(0, 12))
  with pytest.raises(ValueError, match='leaving at least one seen class'):
    synthetic.SyntheticConfig(unseen=tuple(range(12)))


def _train(workdir, clip_dir, config, *overrides, setting='inductive', timeout=600):
  """train.py with configs/synthetic.py:setting, resized to the tiny CLIP `config`."""
  cmd = [sys.executable, str(REPO / 'train.py'),
         f'--config={REPO / "configs/synthetic.py"}:{setting}',
         f'--workdir={workdir}', f'--config.clip={clip_dir}',
         *[f'--config.{k}={v}' for k, v in _sizes(config).items()],
         '--config.model.backbone.prompt_depth=0', '--config.model.head.decoder_layers=1',
         '--config.model.ot.max_iterations=20', '--config.num_train_steps=3',
         '--config.log_every_steps=1', '--config.checkpoint_every_steps=3',
         '--config.async_checkpointing=False', '--config.tensorboard=False',
         '--config.eval.max_images=8', '--config.eval.num_overlays=1', *overrides]
  env = {**os.environ, 'PYTHONPATH': str(REPO), 'JAX_PLATFORMS': 'cpu', 'TF_CPP_MIN_LOG_LEVEL': '3'}
  proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
  return proc


def test_demo_config_trains_from_the_pretrained_clip(tiny_synthetic_clip, tmp_path):
  """configs/synthetic.py, a few steps on another unseen split: the CLIP's image tower frozen
  (only prompts and head train), the class text from its text tower; the evaluation reports the
  split. Then transductive self-training from that run."""
  from flax import traverse_util
  from otseg_jax.models import clip_weights
  directory, config = tiny_synthetic_clip
  workdir = tmp_path / 'run'
  proc = _train(workdir, directory, config, "--config.data.synthetic.unseen=(1, 5, 9)")
  assert f'from CLIP {directory} with templates otseg8' in proc.stderr
  assert 'hIoU' in proc.stdout
  results = json.loads((workdir / 'eval' / 'results.json').read_text())
  assert [r['index'] for r in results['per_class'] if r['split'] == 'unseen'] == [1, 5, 9]
  losses = [json.loads(line) for line in (workdir / 'metrics.jsonl').read_text().splitlines()]
  assert all(np.isfinite(r['train/total']) for r in losses if 'train/total' in r)

  trained = {'/'.join(k): v for k, v in
             traverse_util.flatten_dict(params_lib.load_params_any(workdir)['backbone']).items()}
  _, towers = clip_weights.load_clip(directory, image_size=config.image_size)
  for path, value in traverse_util.flatten_dict(towers['visual']).items():
    np.testing.assert_array_equal(trained['/'.join(path)], value)  # frozen
  assert 'prompt_embeddings' in trained and 'prompt_proj/kernel' in trained

  # Transductive self-training from that run, with the same CLIP and split.
  proc = _train(tmp_path / 'transductive', directory, config,
                '--config.data.synthetic.unseen=(1, 5, 9)', f'--config.init_from={workdir}',
                setting='transductive')
  assert 'hIoU' in proc.stdout and 'setting transductive' in proc.stderr
