"""The paper-setting configs hold the reference's values; command-line overrides are checked."""

import pathlib

from absl import flags
from ml_collections import config_flags
import pytest

from configs import cocostuff171, common, context59, cross_dataset, synthetic, tiny, voc12  # pylint: disable=g-multiple-import
from otseg_jax import classes

REPO = pathlib.Path(__file__).resolve().parents[1]

SETTINGS = classes.SETTINGS


@pytest.mark.parametrize('module,steps,st_steps,crop,stride,tokens,prompts', [
    (voc12, 20_000, 10_000, 512, 426, 10, 6),
    (context59, 40_000, 20_000, 480, 80, 10, 8),
    (cocostuff171, 80_000, 40_000, 512, 426, 100, 8),
])
@pytest.mark.parametrize('setting', SETTINGS)
def test_paper_settings(module, steps, st_steps, crop, stride, tokens, prompts, setting):
  config = module.get_config(setting)
  assert config.setting == setting
  assert config.num_train_steps == (st_steps if setting == 'transductive' else steps)
  assert config.model.image_size == crop and config.eval.crop_size == crop
  assert config.eval.stride == stride
  assert config.model.backbone.num_prompt_tokens == tokens
  assert config.model.num_prompts == prompts
  assert config.model.calibration == (0.1 if setting == 'inductive' else 0.0)
  assert config.optimizer.lr == 2e-5 and config.optimizer.weight_decay == 0.01
  assert config.schedule.to_dict() == dict(warmup_steps=1500, warmup_ratio=1e-6, power=0.9,
                                           end_lr=1e-6)
  assert config.batch_size == 16  # 4 per device x the reference's 4 GPUs
  assert dict((r[0], r[1]) for r in config.optimizer.rules)['backbone'] == 10.0
  assert dict((r[0], r[1]) for r in config.optimizer.rules)['head'] == 10.0
  assert config.loss.focal_weight == 100.0 and config.loss.dice_weight == 1.0
  assert not config.ft_backbone


def test_default_setting_is_inductive_and_bad_setting_is_refused():
  assert voc12.get_config().setting == 'inductive'
  with pytest.raises(ValueError, match='Unknown setting .*transductive'):
    voc12.get_config('transductiv')


@pytest.mark.parametrize('pair,source_tokens,target_data,crop,stride', [
    ('coco_to_voc', 100, 'voc12', 512, 380),
    ('coco_to_context', 100, 'pascal_context59', 512, 426),
    ('coco_to_ade', 100, 'ade20k150', 512, 426),
    ('context_to_voc', 10, 'voc12', 480, 80),
    ('context_to_coco', 10, 'coco_stuff164k', 480, 80),
])
def test_cross_dataset_uses_the_target_classes(pair, source_tokens, target_data, crop, stride):
  config = cross_dataset.get_config(pair)
  assert config.model.backbone.num_prompt_tokens == source_tokens  # the source's model
  assert config.data.name == target_data  # the target's data and hence its classes / text
  assert config.text_embeddings == ''  # computed for the target's classes, never the source's
  assert (config.eval.crop_size, config.eval.stride) == (crop, stride)
  assert config.model.calibration == 0.0
  with pytest.raises(ValueError, match='coco_to_voc'):
    cross_dataset.get_config('voc_to_mars')


def test_synthetic_and_tiny_configs():
  from otseg_jax.data import synthetic_clip
  for module in (synthetic, tiny):
    config = module.get_config()
    assert config.data.name == 'synthetic'
    assert config.batch_size % 8 == 0  # runs on 1, 2 or 8 devices
  # The demo: the pretrained synthetic CLIP, frozen, its text tower over the class names.
  config, clip = synthetic.get_config(), synthetic_clip.PretrainConfig()
  assert config.clip == synthetic.CLIP_DIR and not config.ft_backbone
  assert config.text_embeddings == '' and config.templates == synthetic_clip.TEMPLATES == 'otseg8'
  assert config.model.num_prompts == 8
  b = config.model.backbone
  assert (b.patch_size, b.width, b.layers, b.heads, b.output_dim, config.model.image_size) == (
      clip.patch_size, clip.vision_width, clip.vision_layers, clip.vision_heads, clip.embed_dim,
      clip.image_size)
  # Tests: random towers and the synthetic set's own attribute text.
  config = tiny.get_config()
  assert config.clip == '' and config.ft_backbone and config.model.backbone.width == 32
  assert config.data.synthetic.embed_dim == config.model.backbone.output_dim
  assert config.data.synthetic.num_prompts == config.model.num_prompts


def _parse(argv):
  values = flags.FlagValues()
  # config_flags finds the --config.FIELD overrides by scanning sys_argv (sys.argv in train.py).
  config_flags.DEFINE_config_file('config', None, 'config', flag_values=values,
                                  lock_config=True, sys_argv=['prog'] + argv)
  values(['prog'] + argv)
  return values.config


def test_command_line_overrides():
  config = _parse([f'--config={REPO}/configs/voc12.py:transductive',
                   '--config.optimizer.lr=1e-4', '--config.eval.stride=300',
                   '--config.data.eval_min_size=480', "--config.init_from=runs/voc12"])
  assert config.setting == 'transductive' and config.optimizer.lr == 1e-4
  assert config.eval.stride == 300 and config.data.eval_min_size == 480
  assert config.init_from == 'runs/voc12'


def test_unknown_field_and_wrong_type_are_refused_by_name():
  with pytest.raises(AttributeError, match='lrr.*Did you mean "lr"'):
    _parse([f'--config={REPO}/configs/voc12.py', '--config.optimizer.lrr=1e-4'])
  with pytest.raises(flags.IllegalFlagValueError, match='num_train_steps'):
    _parse([f'--config={REPO}/configs/voc12.py', '--config.num_train_steps=many'])


def test_common_tables_cover_every_dataset():
  assert set(common.DATASETS) <= set(common.DATA)
  for name in common.DATA:
    assert common.data_config(name).name


@pytest.mark.parametrize('module,crop,stride,short', [
    (voc12, 518, 431, 518), (context59, 476, 79, 520), (cocostuff171, 518, 431, 518)])
def test_vitl14_configs(module, crop, stride, short):
  """SETTING:vitl14: CLIP ViT-L/14's tower, a crop on its 14-pixel grid, the stride scaled with it,
  no rescale shorter than a crop; everything else as the paper's ViT-B/16 config."""
  base, config = module.get_config('transductive'), module.get_config('transductive:vitl14')
  b = config.model.backbone
  assert (b.patch_size, b.width, b.layers, b.heads, b.output_dim, b.prompt_depth) == (
      14, 1024, 24, 16, 768, 23)
  assert config.clip == 'openai/clip-vit-large-patch14' and config.text_embeddings == ''
  assert config.model.image_size == config.eval.crop_size == crop and crop % 14 == 0
  assert config.eval.stride == stride
  assert config.data.img_scale[1] == config.data.eval_img_scale[1] == short
  assert config.data.eval_min_size >= crop
  assert base.model.backbone.width == 768 and base.model.image_size in (480, 512)  # unchanged
  changed = {k for k in config if config[k] != base[k]}
  assert {'clip', 'model', 'eval'} <= changed <= {'clip', 'model', 'eval', 'data'}, changed
  assert config.setting == 'transductive' and config.num_train_steps == base.num_train_steps
  with pytest.raises(ValueError, match="Unknown backbone 'vitl16'.*vitb16, vitl14"):
    module.get_config('inductive:vitl16')
  assert module.get_config('inductive:vitb16').to_dict() == module.get_config().to_dict()


def test_vitl14_cross_dataset_and_command_line():
  config = cross_dataset.get_config('coco_to_voc:vitl14')
  assert (config.eval.crop_size, config.eval.stride, config.model.image_size) == (518, 384, 518)
  assert config.data.name == 'voc12' and config.data.eval_min_size == 518
  assert config.model.backbone.num_prompt_tokens == 100  # still the source's model
  assert cross_dataset.get_config('coco_to_voc').eval.crop_size == 512
  config = _parse([f'--config={REPO}/configs/context59.py:inductive:vitl14',
                   '--config.eval.stride=100'])
  assert config.model.backbone.width == 1024 and config.eval.stride == 100
  assert config.setting == 'inductive'


def test_a_patch14_tower_trains_through_train_py(tmp_path):
  """A tiny patch-14 tower (28 x 28 images: a 2 x 2 grid) through the real trainer, 2 steps."""
  import json
  import os
  import subprocess
  import sys
  workdir = tmp_path / 'run'
  proc = subprocess.run(
      [sys.executable, str(REPO / 'train.py'), f'--config={REPO}/configs/tiny.py',
       f'--workdir={workdir}', '--config.eval_every_steps=-1', '--config.num_train_steps=2',
       '--config.checkpoint_every_steps=2', '--config.model.backbone.patch_size=14',
       '--config.model.backbone.layers=1', '--config.model.head.decoder_layers=1',
       '--config.model.image_size=28', '--config.data.synthetic.image_size=28',
       '--config.eval.crop_size=28', '--config.eval.stride=28', '--config.model.ot.max_iterations=5'],
      cwd=REPO, capture_output=True, text=True, timeout=300,
      env=dict(os.environ, JAX_PLATFORMS='cpu', TF_CPP_MIN_LOG_LEVEL='3', PYTHONPATH=str(REPO)))
  assert proc.returncode == 0, proc.stderr[-4000:]
  rows = [json.loads(line) for line in (workdir / 'metrics.jsonl').read_text().splitlines()]
  losses = [r['train/total'] for r in rows if 'train/total' in r]
  assert losses and all(0 < x < 1e4 for x in losses), losses
  from flax import traverse_util
  from otseg_jax import params as params_lib
  flat = traverse_util.flatten_dict(params_lib.load_params_any(workdir))
  assert flat[('backbone', 'conv1', 'kernel')].shape == (14, 14, 3, 32)
  assert flat[('backbone', 'positional_embedding')].shape == (1 + 2 * 2, 32)
