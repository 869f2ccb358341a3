"""Checks a config before any work starts; every problem names its key."""

from spad_jax import config_keys
from spad_jax import diffusion
from spad_jax.data import corruptions
from spad_jax.data.sources import DATASETS
from spad_jax.data.sources import FOLDER_DATASETS
from spad_jax.data.sources import READERS


class ConfigError(ValueError):
  pass


def validate(config) -> None:
  """Raises ``ConfigError`` listing every invalid value of ``config``."""
  errors = []

  def check(ok: bool, key: str, message: str):
    if not ok:
      errors.append(f'config.{key} = {config_keys.get(config, key)!r}: '
                    f'{message}')

  for check_section in (_check_data, _check_model, _check_objective,
                        _check_spad, _check_train, _check_eval):
    check_section(config, check)
  if errors:
    raise ConfigError('invalid config:\n  ' + '\n  '.join(errors))


def _check_data(config, check) -> None:
  """data.*: data set, splits, loaders, augmentations."""
  d = config.data
  check(d.name in DATASETS, 'data.name', f'unknown data set; expected one of '
        f'{list(DATASETS)}')
  check(d.image_size >= 8, 'data.image_size', 'must be at least 8')
  check(d.num_classes >= 2, 'data.num_classes', 'needs background + at least '
        'one class')
  if d.name == 'synthetic':
    check(d.num_classes == 4, 'data.num_classes', 'the synthetic data set has '
          '4 classes (background, srf, irf, shrm)')
    for split in ('num_train', 'num_val', 'num_test'):
      check(d.synthetic[split] >= 1, f'data.synthetic.{split}', 'must be >= 1')
  check(d.channels in (1, 3), 'data.channels', 'must be 1 or 3')
  check(0 <= d.val_fraction < 1, 'data.val_fraction', 'must be in [0, 1)')
  check(0 <= d.test_fraction < 1, 'data.test_fraction', 'must be in [0, 1)')
  check(d.val_fraction + d.test_fraction < 1, 'data.test_fraction',
        'val_fraction + test_fraction must leave training cases')
  check(d.loader in ('tf', 'numpy'), 'data.loader', "must be 'tf' or 'numpy'")
  check(d.num_workers >= 1, 'data.num_workers', 'must be >= 1')
  check(d.reader in READERS, 'data.reader', f'must be one of {list(READERS)}')
  check(d.reader == 'numpy' or d.name in FOLDER_DATASETS, 'data.reader',
        "'tfds' reads folder data sets; the synthetic set is generated")
  check(d.num_folds == 0 or d.num_folds >= 2, 'data.num_folds',
        'must be 0 (no folds) or >= 2')
  check(d.num_folds == 0 or 0 <= d.fold < d.num_folds, 'data.fold',
        f'must be in [0, data.num_folds = {d.num_folds})')
  check(not d.class_names or len(d.class_names) == d.num_classes,
        'data.class_names', f'must be empty or name all data.num_classes = '
        f'{d.num_classes} classes (background first)')
  a = d.augment
  check(0 <= a.rotate_deg <= 180, 'data.augment.rotate_deg',
        'must be in [0, 180]')
  for key in ('scale', 'gain', 'gamma'):
    check(0 <= a[key] < 1, f'data.augment.{key}', 'must be in [0, 1)')
  check(0 <= a.translate <= 0.5, 'data.augment.translate', 'must be in [0, 0.5]')
  check(0 <= a.bias <= 1, 'data.augment.bias', 'must be in [0, 1]')


def _check_model(config, check) -> None:
  """model.*: UNet sizes and kind."""
  d, m = config.data, config.model
  levels = len(m.channel_mult)
  check(levels >= 1, 'model.channel_mult', 'needs at least one level')
  check(levels >= 1 and d.image_size % (2 ** (levels - 1)) == 0,
        'data.image_size', f'must be divisible by 2^{levels - 1} for '
        f'model.channel_mult = {tuple(m.channel_mult)}')
  check(m.base_channels >= 1, 'model.base_channels', 'must be >= 1')
  check(m.num_res_blocks >= 1, 'model.num_res_blocks', 'must be >= 1')
  check(m.dtype in ('float32', 'bfloat16'), 'model.dtype',
        "must be 'float32' or 'bfloat16'")
  check(0 <= m.dropout < 1, 'model.dropout', 'must be in [0, 1)')
  check(m.kind in ('diffusion', 'deterministic'), 'model.kind',
        "unknown model kind; expected 'diffusion' or 'deterministic'")
  check(not m.self_condition or m.kind == 'diffusion', 'model.self_condition',
        'needs model.kind = diffusion (a one-pass model has no previous step)')


def _check_objective(config, check) -> None:
  """diffusion.*: T, the hybrid loss and the timestep sampler."""
  from spad_jax import timesteps  # pylint: disable=g-import-not-at-top
  df = config.diffusion
  check(df.num_steps >= 1, 'diffusion.num_steps', 'must be >= 1')
  check(df.ce_lambda >= 0, 'diffusion.ce_lambda',
        'hybrid CE weight must be >= 0 (0: the KL loss alone)')
  check(df.ce_weighting in diffusion.WEIGHTINGS, 'diffusion.ce_weighting',
        "unknown CE weighting; expected 'constant' or 'stage'")
  check(df.dice_lambda >= 0, 'diffusion.dice_lambda',
        'soft Dice weight must be >= 0 (0: off)')
  check(df.dice_weighting in diffusion.WEIGHTINGS,
        'diffusion.dice_weighting',
        "unknown Dice weighting; expected 'constant' or 'stage'")
  check(df.t_sampling in timesteps.SAMPLERS, 'diffusion.t_sampling',
        f'unknown timestep sampler; expected one of {list(timesteps.SAMPLERS)}')
  check(df.importance_history >= 1, 'diffusion.importance_history',
        'must be >= 1')
  check(0 < df.importance_uniform <= 1, 'diffusion.importance_uniform',
        'must be in (0, 1] (keeps every t reachable)')
  check(0 <= df.own_sample_fraction <= 1, 'diffusion.own_sample_fraction',
        'must be in [0, 1] (0: x_t from q(x_t | x0) only)')
  check(not df.own_sample_fraction or
        1 <= df.own_sample_stride <= df.num_steps,
        'diffusion.own_sample_stride',
        f'must be in [1, diffusion.num_steps = {df.num_steps}]')
  check(not df.own_sample_fraction or config.model.kind == 'diffusion',
        'diffusion.own_sample_fraction', 'needs model.kind = diffusion')
  check(df.get('own_sample_sampler', 'ancestral') in diffusion.SAMPLERS,
        'diffusion.own_sample_sampler',
        f'unknown sampler; expected one of {", ".join(diffusion.SAMPLERS)}')
  check(df.get('own_sample_temperature', 1.0) > 0,
        'diffusion.own_sample_temperature', 'must be > 0 (1: p̂ unchanged)')
  check(df.get('own_sample_start_step', 0) >= 0,
        'diffusion.own_sample_start_step', 'must be >= 0 (a train step)')


def _check_spad(config, check) -> None:
  """spad.*: SPAD perturbations."""
  d, s = config.data, config.spad
  check(s.sigma0 >= 0, 'spad.sigma0', 'noise std must be >= 0')
  check(s.pas_lambda >= 0, 'spad.pas_lambda', 'PaS decay must be >= 0')
  check(s.k0 >= 0, 'spad.k0', 'initial target count K0 must be >= 0')
  check(s.k_gamma >= 0, 'spad.k_gamma', 'target-count decay must be >= 0')
  check(0 <= s.anchor_ratio <= 1, 'spad.anchor_ratio', 'must be in [0, 1]')
  check(s.anchor_patch >= 0, 'spad.anchor_patch', 'must be >= 0 (0: pixels)')
  check(s.band_width >= 1, 'spad.band_width', 'must be >= 1 pixel')
  check(0 <= s.canny_low <= s.canny_high, 'spad.canny_low',
        'need 0 <= canny_low <= canny_high')
  if (s.bcd and not s.bcd_complete and not s.bcd_per_class and
      d.num_classes >= 2):
    from spad_jax import perturb  # pylint: disable=g-import-not-at-top
    check(perturb.spread_sees_all_transitions(d.num_classes, s.canny_low,
                                              s.canny_high),
          'spad.bcd_per_class', f'Canny({s.canny_low}, {s.canny_high}) on '
          f'{d.num_classes} classes spread over 0..255 misses transitions '
          'between adjacent classes; set --config.spad.bcd_per_class=True '
          '(or spad.bcd_complete=True)')


def _check_train(config, check) -> None:
  """train.*: optimisation, logging, checkpoints."""
  t = config.train
  check(t.batch_size >= 1, 'train.batch_size', 'must be >= 1')
  check(t.num_epochs >= 1, 'train.num_epochs', 'must be >= 1')
  check(t.learning_rate > 0, 'train.learning_rate', 'must be > 0')
  check(t.lr_schedule in ('constant', 'cosine', 'linear'), 'train.lr_schedule',
        "must be 'constant', 'cosine' or 'linear'")
  check(t.warmup_steps >= 0, 'train.warmup_steps', 'must be >= 0')
  check(t.weight_decay >= 0, 'train.weight_decay', 'must be >= 0')
  check(t.dice_weight >= 0, 'train.dice_weight', 'must be >= 0')
  check(t.grad_clip_norm >= 0, 'train.grad_clip_norm', 'must be >= 0 (0: off)')
  check(0 <= t.ema_decay < 1, 'train.ema_decay', 'must be in [0, 1)')
  check(t.log_every_steps >= 1, 'train.log_every_steps', 'must be >= 1')
  check(t.checkpoint_every_steps >= 1, 'train.checkpoint_every_steps',
        'must be >= 1')
  check(t.checkpoints_to_keep >= 1, 'train.checkpoints_to_keep', 'must be >= 1')
  check(t.get('monitor_train_cases', 0) >= 0, 'train.monitor_train_cases',
        'must be >= 0')
  check(t.eval_every_epochs >= 0, 'train.eval_every_epochs',
        'must be >= 0 (0: no validation)')
  check(t.max_steps_per_run >= 0, 'train.max_steps_per_run',
        'must be >= 0 (0: no limit)')
  check(config.eval.checkpoint in ('auto', 'best', 'latest'),
        'eval.checkpoint', "must be 'auto', 'best' or 'latest'")
  check(t.val_split in ('train', 'val', 'test'), 'train.val_split',
        "must be 'train', 'val' or 'test'")
  check(t.val_split == 'val' or config.eval.checkpoint == 'latest',
        'train.val_split', f'= {t.val_split!r} draws a learning curve only: '
        "selecting the checkpoint on it needs the val split; set "
        "--config.eval.checkpoint=latest")
  check(t.max_nonfinite_steps >= 1, 'train.max_nonfinite_steps', 'must be >= 1')


def _check_eval(config, check) -> None:
  """eval.*: sampling and evaluation."""
  e = config.eval
  check(1 <= e.num_steps <= config.diffusion.num_steps, 'eval.num_steps',
        f'must be in [1, diffusion.num_steps = {config.diffusion.num_steps}]')
  check(e.num_samples >= 1, 'eval.num_samples', 'must be >= 1')
  check(e.sampler in diffusion.SAMPLERS, 'eval.sampler',
        f'unknown sampler {e.sampler!r}; expected one of '
        f'{", ".join(diffusion.SAMPLERS)}')
  check(e.temperature > 0, 'eval.temperature', 'must be > 0')
  check(e.mode_last >= 0, 'eval.mode_last', 'must be >= 0')
  check(e.ensemble in diffusion.ENSEMBLES, 'eval.ensemble',
        f'must be one of {", ".join(diffusion.ENSEMBLES)}')
  check(e.get('soft_map', 'last') in diffusion.SOFT_MAPS, 'eval.soft_map',
        f'must be one of {", ".join(diffusion.SOFT_MAPS)}')
  chain_labels = diffusion.CHAIN_LABELS + ('auto',)
  check(e.get('chain_label', 'last') in chain_labels, 'eval.chain_label',
        f'must be one of {", ".join(chain_labels)}')
  check(e.get('chain_label', 'last') != 'auto' or
        config.train.get('val_split', 'val') == 'val', 'eval.chain_label',
        "= 'auto' picks the label on the val split at every validation, "
        f'and train.val_split = {config.train.get("val_split")!r} would '
        'make it pick on the curve\'s own split; set '
        '--config.eval.chain_label=last (or chain_mean) for this curve')
  check(e.get('ensemble_of', 'chain_label') in diffusion.ENSEMBLE_OF,
        'eval.ensemble_of',
        f'must be one of {", ".join(diffusion.ENSEMBLE_OF)}')
  check(e.batch_size >= 1, 'eval.batch_size', 'must be >= 1')
  check(e.split in ('train', 'val', 'test'), 'eval.split',
        "must be 'train', 'val' or 'test'")
  check(e.ece_bins >= 2, 'eval.ece_bins', 'must be >= 2')
  check(e.corruption in corruptions.NAMES, 'eval.corruption',
        f'unknown corruption {e.corruption!r}; expected one of '
        f'{", ".join(corruptions.NAMES)}')
  check(1 <= e.severity <= 5, 'eval.severity', 'must be in 1..5')

def validate_data(config, training: bool = True) -> None:
  """Reads and checks the data set of ``config`` (every split, every file).

  For main.py to call right after ``validate``, before the workdir is
  touched: a bad data set then stops the run with nothing written. Raises
  ``ConfigError`` carrying the data error (file and problem).
  """
  from spad_jax.data import folder  # pylint: disable=g-import-not-at-top
  from spad_jax.data import sources  # pylint: disable=g-import-not-at-top
  if not training:  # Evaluation needs no val split for validation.
    config = config.copy_and_resolve_references()
    config.train.eval_every_epochs = 0
  try:
    sources.check_data(config)
  except folder.DataError as e:
    raise ConfigError(f'invalid data set: {e}') from e
