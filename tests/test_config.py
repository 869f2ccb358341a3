"""Config files load, overrides reach the config, bad values stop early."""

import ast
import importlib
import os

import pytest

from conftest import ROOT
from spad_jax import config_validation


def config_modules():
  """Every configs/*.py that defines ``get_config`` (read with ast, so a new
  config file is covered without editing this list)."""
  folder = os.path.join(ROOT, 'configs')
  names = []
  for name in sorted(os.listdir(folder)):
    if not name.endswith('.py'):
      continue
    with open(os.path.join(folder, name)) as f:
      tree = ast.parse(f.read())
    if any(isinstance(node, ast.FunctionDef) and node.name == 'get_config'
           for node in tree.body):
      names.append(name[:-3])
  return names


def test_config_discovery_finds_the_known_configs():
  assert {'default', 'demo', 'amdsd', 'cxrs', 'duke_dme', 'duke_dme_cpu',
          'duke_dme_study_cpu'} <= set(config_modules())
  assert '__init__' not in config_modules()


@pytest.mark.parametrize('name', config_modules())
def test_configs_load_and_validate(name):
  config = importlib.import_module(f'configs.{name}').get_config()
  config_validation.validate(config)


def test_default_holds_design_defaults():
  c = importlib.import_module('configs.default').get_config()
  assert (c.spad.sigma0, c.spad.pas_lambda, c.spad.k0, c.spad.k_gamma,
          c.spad.anchor_ratio, c.spad.band_width) == (0.5, 0.05, 3, 0.01,
                                                      0.3, 5)
  assert (c.spad.canny_low, c.spad.canny_high) == (100, 200)
  assert c.diffusion.num_steps == 250 and c.diffusion.cosine_s == 0.008
  assert (c.train.learning_rate, c.train.weight_decay, c.train.batch_size,
          c.train.ema_decay) == (1e-4, 1e-4, 8, 0.9999)
  assert tuple(c.model.channel_mult) == (1, 1, 2, 3, 4)
  assert c.model.base_channels == 32 and c.model.norm_groups == 32
  amd = importlib.import_module('configs.amdsd').get_config()
  cxr = importlib.import_module('configs.cxrs').get_config()
  assert (amd.data.num_classes, amd.train.num_epochs) == (6, 200)
  assert (cxr.data.num_classes, cxr.train.num_epochs) == (32, 100)


@pytest.mark.parametrize('key,value,needle', [
    ('spad.sigma0', -0.1, 'config.spad.sigma0'),
    ('spad.anchor_ratio', 1.5, 'config.spad.anchor_ratio'),
    ('spad.anchor_ratio', -0.1, 'config.spad.anchor_ratio'),
    ('spad.k0', -1, 'config.spad.k0'),
    ('data.name', 'mnist', 'config.data.name'),
    ('eval.num_steps', 1000, 'config.eval.num_steps'),
    ('diffusion.ce_lambda', -0.5, 'config.diffusion.ce_lambda'),
    ('diffusion.dice_lambda', -0.1, 'config.diffusion.dice_lambda'),
    ('diffusion.dice_weighting', 'late', 'config.diffusion.dice_weighting'),
    ('diffusion.t_sampling', 'sobol', 'config.diffusion.t_sampling'),
    ('diffusion.ce_weighting', 'late', 'config.diffusion.ce_weighting'),
    ('model.kind', 'gan', 'config.model.kind'),
    ('diffusion.importance_history', 0, 'config.diffusion.importance_history'),
    ('train.dice_weight', -1.0, 'config.train.dice_weight'),
    ('eval.sampler', 'ddim', 'config.eval.sampler'),
    ('eval.temperature', 0.0, 'config.eval.temperature'),
    ('eval.mode_last', -1, 'config.eval.mode_last'),
    ('eval.ensemble', 'median', 'config.eval.ensemble'),
    ('eval.soft_map', 'first', 'config.eval.soft_map'),
    ('eval.chain_label', 'mode', 'config.eval.chain_label'),
    ('eval.ensemble_of', 'samples', 'config.eval.ensemble_of'),
    ('diffusion.own_sample_fraction', 1.5, 'config.diffusion.own_sample_fraction'),
    ('diffusion.own_sample_fraction', -0.1, 'config.diffusion.own_sample_fraction'),
    ('diffusion.own_sample_sampler', 'ddim', 'config.diffusion.own_sample_sampler'),
    ('diffusion.own_sample_start_step', -1, 'config.diffusion.own_sample_start_step'),
    ('diffusion.own_sample_temperature', 0.0, 'config.diffusion.own_sample_temperature'),
    ('diffusion.own_sample_temperature', -1.0, 'config.diffusion.own_sample_temperature'),
    ('train.val_split', 'dev', 'config.train.val_split'),
    ('train.val_split', 'test', 'config.train.val_split'),  # checkpoint=best
])
def test_invalid_values_are_named(key, value, needle):
  config = importlib.import_module('configs.demo').get_config()
  section, field = key.split('.')
  config[section][field] = value
  with pytest.raises(config_validation.ConfigError, match=needle):
    config_validation.validate(config)


def test_auto_chain_label_needs_the_val_split():
  """'auto' picks a chain label on the val split; a curve drawn on another
  split must not pick on it."""
  config = importlib.import_module('configs.demo').get_config()
  assert config.eval.chain_label == 'auto'
  config_validation.validate(config)
  config.train.val_split = 'test'
  config.eval.checkpoint = 'latest'
  with pytest.raises(config_validation.ConfigError,
                     match="config.eval.chain_label = 'auto'.*'test'"):
    config_validation.validate(config)
  config.eval.chain_label = 'last'
  config_validation.validate(config)


def test_self_conditioning_needs_the_diffusion_model():
  config = importlib.import_module('configs.demo').get_config()
  config.model.self_condition = True
  config_validation.validate(config)
  config.model.kind = 'deterministic'
  with pytest.raises(config_validation.ConfigError,
                     match='config.model.self_condition'):
    config_validation.validate(config)


def test_command_line_override_and_early_stop(main_runner, tmp_path):
  workdir = tmp_path / 'w'
  result = main_runner(['--config=configs/demo.py', f'--workdir={workdir}',
                        '--config.spad.sigma0=-1',
                        '--config.spad.anchor_ratio=2'])
  assert result.returncode == 2
  assert 'config.spad.sigma0 = -1' in result.stderr
  assert 'config.spad.anchor_ratio = 2' in result.stderr
  assert not workdir.exists()  # Stopped before any work.



def test_own_sample_stride_is_checked_when_used():
  config = importlib.import_module('configs.demo').get_config()
  config.diffusion.own_sample_stride = 0
  config_validation.validate(config)  # Unused at fraction 0.
  config.diffusion.own_sample_fraction = 0.5
  with pytest.raises(config_validation.ConfigError,
                     match='config.diffusion.own_sample_stride'):
    config_validation.validate(config)
  config.diffusion.own_sample_stride = 25
  config_validation.validate(config)
  config.model.kind = 'deterministic'
  with pytest.raises(config_validation.ConfigError,
                     match='config.diffusion.own_sample_fraction'):
    config_validation.validate(config)
