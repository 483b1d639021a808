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
