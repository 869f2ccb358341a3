r"""spad_jax entry point.

  python main.py --config=configs/demo.py --workdir=runs/demo
  python main.py --config=configs/amdsd.py --workdir=runs/amdsd \
      --config.data.root=/data/amdsd --config.train.batch_size=16
  python main.py --config=configs/demo.py --workdir=runs/demo --mode=evaluate
  python main.py --config=configs/demo.py --workdir=runs/demo --mode=predict \
      --input=scans/ --output=predictions/ --config.eval.num_samples=8
  python main.py --config=configs/demo.py --workdir=runs/demo \
      --mode=robustness --config.eval.num_samples=4

A second run in the same workdir resumes from its latest checkpoint.
Multi-host: pass --coordinator_address/--num_processes/--process_id on every
host (or --distributed on TPU/Slurm, where JAX finds them itself).
"""

import os
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from spad_jax import records

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file('config', None, 'Config file (configs/*.py).',
                                lock_config=True)
flags.DEFINE_string('workdir', None, 'Directory for checkpoints, logs, metrics.')
flags.DEFINE_enum('mode', 'train', ['train', 'evaluate', 'predict',
                                    'visualize', 'robustness'],
                  'train (then evaluate), evaluate a trained workdir, '
                  'predict on new images, visualize the SPAD masks of a '
                  'few training cases (writes <workdir>/spad_masks.png), or '
                  'evaluate under every image corruption and severity '
                  '(robustness: <workdir>/robustness.{json,csv,png}).')
flags.DEFINE_string('input', None, '--mode=predict: folder of images (png, '
                    'jpg, bmp, tif; no labels needed).')
flags.DEFINE_string('output', None, '--mode=predict: folder for <stem>_label.'
                    'png, <stem>_overlay.png, <stem>_uncertainty.png.')
flags.DEFINE_bool('overwrite', False, '--mode=predict: replace existing '
                  'outputs (by default an input whose outputs exist is '
                  'skipped).')
flags.DEFINE_bool('save_npy', False, '--mode=predict: also write the '
                  'per-pixel entropy as <stem>_entropy.npy (float32, nats).')
flags.DEFINE_bool('distributed', False, 'Call jax.distributed.initialize() '
                  'with auto-detection (TPU pods, Slurm).')
flags.DEFINE_string('coordinator_address', None, 'host:port of process 0 for '
                    'multi-host runs.')
flags.DEFINE_integer('num_processes', None, 'Number of processes (hosts).')
flags.DEFINE_integer('process_id', None, 'This process\'s index.')
flags.mark_flags_as_required(['config', 'workdir'])


def _init_distributed():
  import jax  # pylint: disable=g-import-not-at-top
  if FLAGS.coordinator_address:
    if FLAGS.num_processes is None or FLAGS.process_id is None:
      raise app.UsageError('--coordinator_address needs --num_processes and '
                           '--process_id')
    if jax.config.jax_platforms in (None, '', 'cpu'):
      jax.config.update('jax_cpu_collectives_implementation', 'gloo')
    jax.distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes,
                               FLAGS.process_id)
  elif FLAGS.distributed:
    jax.distributed.initialize()


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  logging.get_absl_handler().addFilter(records.QuietLibraries())
  config = FLAGS.config
  # Validate (config, then data) before JAX starts or the workdir is made.
  from spad_jax import config_validation  # pylint: disable=g-import-not-at-top
  try:
    config_validation.validate(config)
    if FLAGS.mode in ('train', 'evaluate', 'visualize', 'robustness'):
      # Every file read and checked before the workdir is touched.
      config_validation.validate_data(
          config, training=FLAGS.mode not in ('evaluate', 'robustness'))
  except config_validation.ConfigError as e:
    logging.error('%s', e)
    print(f'error: {e}', file=sys.stderr)
    return 2
  if FLAGS.mode == 'predict' and not (FLAGS.input and FLAGS.output):
    print('error: --mode=predict needs --input=<folder of images> and '
          '--output=<folder>', file=sys.stderr)
    return 2

  _init_distributed()
  import jax  # pylint: disable=g-import-not-at-top
  from spad_jax import evaluate  # pylint: disable=g-import-not-at-top
  from spad_jax import train  # pylint: disable=g-import-not-at-top
  from spad_jax.data import folder  # pylint: disable=g-import-not-at-top

  logging.info('JAX %s: process %d/%d, %d local / %d global devices (%s).',
               jax.__version__, jax.process_index(), jax.process_count(),
               jax.local_device_count(), jax.device_count(),
               jax.devices()[0].platform)
  try:
    if FLAGS.mode == 'visualize':
      from spad_jax import visualize  # pylint: disable=g-import-not-at-top
      print(visualize.visualize(config, FLAGS.workdir))
      return 0
    if FLAGS.mode == 'predict':
      return _predict(config)
    if FLAGS.mode == 'train':
      result = train.train_and_evaluate(config, FLAGS.workdir)
    else:
      if not os.path.isdir(FLAGS.workdir):
        raise FileNotFoundError(f'--workdir {FLAGS.workdir} does not exist')
      if FLAGS.mode == 'robustness':
        from spad_jax import robustness  # pylint: disable=g-import-not-at-top
        robustness.robustness(config, FLAGS.workdir)
        if jax.process_index() == 0:
          print(f'wrote {os.path.join(FLAGS.workdir, "robustness.csv")}, '
                'robustness.json, robustness.png, corruption_examples.png')
        return 0
      result = evaluate.evaluate(config, FLAGS.workdir)
  except (folder.DataError, FileNotFoundError, FloatingPointError,
          ValueError) as e:
    logging.exception('%s', e)
    print(f'error: {e}', file=sys.stderr)
    return 1
  if result is None:  # Stopped early (max_steps_per_run or SIGTERM).
    return 0
  if jax.process_index() == 0:
    fmt = lambda x: 'n/a' if x is None else f'{x:.4f}'
    print(f'{config.eval.split}: mIoU {fmt(result["mIoU"])}  '
          f'mDice {fmt(result["mDice"])}  (foreground classes; '
          f'{os.path.join(evaluate.output_dir(config, FLAGS.workdir), "metrics.json")})')
  return 0


def _predict(config) -> int:
  """Runs --mode=predict; 1 when some input could not be read."""
  from spad_jax import predict  # pylint: disable=g-import-not-at-top
  if not os.path.isdir(FLAGS.workdir):
    raise FileNotFoundError(f'--workdir {FLAGS.workdir} does not exist')
  summary = predict.predict_folder(config, FLAGS.workdir, FLAGS.input,
                                   FLAGS.output, FLAGS.overwrite,
                                   FLAGS.save_npy)
  skipped = (f', skipped {len(summary.skipped)} whose outputs exist '
             '(--overwrite replaces them)' if summary.skipped else '')
  rate = ('' if summary.images_per_sec is None else
          f', then {summary.images_per_sec:.2f} img/s')
  print(f'predict: wrote {len(summary.written)} in {summary.seconds:.1f} s '
        f'(first batch {summary.first_batch_seconds:.1f} s with compilation'
        f'{rate}){skipped}, {len(summary.failed)} unreadable; outputs in '
        f'{FLAGS.output}')
  for path, error in summary.failed:
    print(f'error: {error}' if path in error else f'error: {path}: {error}',
          file=sys.stderr)
  return 1 if summary.failed else 0


if __name__ == '__main__':
  app.run(main)
