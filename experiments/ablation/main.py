r"""The SPAD ablation study: arms x seeds [x folds], sweeps, tables, plots.

  python -m experiments.ablation.main --config=configs/duke_dme_cv_cpu.py \
      --out=docs/study_cv --folds=5 --seeds=0,1
  python -m experiments.ablation.main \
      --config=configs/duke_dme_study_cpu.py --out=runs/study_cpu \
      --seeds=0,1,2 --arms=baseline,scd_pas,bcd_pas,scd_bcd_nopas,full \
      --sweeps=lambda,anchor

from the repository root (``python experiments/ablation/main.py ...`` works
too). The runs are planned and trained by ``plan.py``, summarised by
``stats.py`` (over seeds) and ``patients.py`` (over patients, with folds)
and reported by ``report.py``; this module is the command line.

Arms (config overrides, as in README's table): ``unet`` (the same UNet
without diffusion or SPAD), ``baseline`` (CCDM: ScD and BcD off),
``scd_pas``, ``bcd_pas``, ``scd_bcd_nopas`` (σ stays σ0), ``full`` (SPAD)
and ``full_components`` (SPAD with ScD on connected components). Every run
gets the same budget: the config's, with any ``--config.<key>=...``
override applied to every run.

Seeds vary ``config.seed`` (model initialisation, diffusion noise, SPAD masks
and image noise, data order); the patient-level split (``data.split_seed``)
stays fixed, so every run is tested on the same patients. ``--folds=k``
repeats every run over the ``k`` patient-level folds (``data.num_folds``,
``data.fold``); a seed's value is then the mean over its folds, and the
report adds the patient-level section of ``patients.py``: pooled scores,
paired differences to the baseline with a bootstrap over patients, where
the variation lies, and each run's train-split plateau (with
``train.monitor_train_cases``).

Each run trains and evaluates in its own workdir with
``train.train_and_evaluate``: ``<out>/<arm>/seed<k>[/fold<f>]`` and
``<out>/sweep_<name>/<value>/seed<k>[/fold<f>]``. A run whose
``metrics.json`` exists is skipped and an interrupted one resumes from its
checkpoint, so running the same command again continues the study. A sweep
run whose config equals an arm's run (the config's own λ or anchor ratio at
the same budget) reuses that run. A workdir started with another config
stops the study (use a new ``--out``) instead of mixing budgets. The
corruption sweep and the noise probe of a run (``--robustness_seeds``,
``--noise_probe_seeds``) follow its training, while its checkpoint is on
disk, and the report is rewritten after every run; a folder that kept only
the small files (a fresh clone of a committed study) continues, training
again only a finished run that lost its checkpoint before those phases.

Writes into ``--out`` (or ``--report_dir``: more seeds of some arms, say,
reported beside the whole study without replacing its report):

- ``results.json``: every run (metrics, overrides, timing, workdir), the
  per-arm summaries, paired differences to the baseline, the sweeps, the
  budget and the machine;
- ``results.md``: mean ± std over seeds of mIoU, mDice (dataset-level,
  foreground) and HD95 (mean per case, pixels of the original image) per
  arm, the paper's AMD-SD numbers for reference, paired differences to the
  baseline with a t-interval, the sweeps and the timing; with folds, the
  patient-level tables; with ``--robustness_seeds`` the arms under
  corruption, with ``--noise_probe_seeds`` whether they read SPAD's noise
  as the structure (``noise_probe.py``);
- ``curves.png`` (training loss, val mDice and train-split mDice per arm vs
  step, mean over runs), ``schedule.png`` (σ(e) and k(e) over epochs),
  ``sweep_lambda.png`` / ``sweep_anchor.png`` (test mDice vs the value),
  ``qualitative.png`` (a few test cases: image, ground truth, full SPAD,
  w/o ScD, w/o BcD, baseline).

``--report_only`` rebuilds these files from the finished runs without
training.
"""

import os
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

if not __package__:  # Run as a file: python experiments/ablation/main.py.
  # Python put this folder first on sys.path; the repository root instead
  # imports this folder as the package it is (and no module here shadows a
  # top-level one of the same name, e.g. `stats`).
  _HERE = os.path.dirname(os.path.abspath(__file__))
  if sys.path and os.path.abspath(sys.path[0] or '.') == _HERE:
    sys.path[0] = os.path.dirname(os.path.dirname(_HERE))

# pylint: disable=wrong-import-position
from experiments.ablation import plan
from experiments.ablation import report
from spad_jax import records
# pylint: enable=wrong-import-position

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
    'config', None, 'Base config; --config.<key>=... overrides apply to every '
    'run.', lock_config=False)
flags.DEFINE_string('out', None, 'Study folder (workdirs and results).')
flags.DEFINE_string('report_dir', None, 'Folder of results.json, results.md '
                    'and the figures (default: --out). A subset of a '
                    'study\'s arms or more seeds of some arms report here '
                    'without replacing the whole study\'s report; runs '
                    'already in --out are reused, not trained again.')
flags.DEFINE_list('seeds', ['0', '1', '2'], 'Values of config.seed.')
flags.DEFINE_list('arms', list(plan.ARMS),
                  f'Arms to run, of {list(plan.ARMS)} (the paper\'s Table 3: '
                  f'{",".join(plan.TABLE3_ARMS)}).')
flags.DEFINE_integer('folds', 0, 'k >= 2: repeat every run over k '
                     'patient-level folds (data.num_folds); 0: the config\'s '
                     'single split.')
flags.DEFINE_list('sweeps', [], f'Sensitivity sweeps of the full model, of '
                  f'{list(plan.SWEEPS)}.')
flags.DEFINE_list('lambdas', ['0', '0.01', '0.05', '0.2', '1.0'],
                  'spad.pas_lambda values of the lambda sweep.')
flags.DEFINE_list('anchors', ['0.1', '0.3', '0.5', '0.7', '0.9'],
                  'spad.anchor_ratio values of the anchor sweep.')
flags.DEFINE_list('sweep_seeds', ['0'], 'Seeds of the sweep runs.')
flags.DEFINE_integer('sweep_epochs', 0, 'train.num_epochs of the sweep runs '
                     '(0: the same budget as the arms, so the config\'s own '
                     'value reuses the full arm\'s run).')
flags.DEFINE_integer('qualitative_cases', 4, 'Test cases in '
                     'qualitative.png (0: no figure).')
flags.DEFINE_list('robustness_seeds', [], 'After training, sweep the arm '
                  'runs of these seeds under every corruption '
                  '(--mode=robustness; resumable); the report then compares '
                  'the arms under corruption.')
flags.DEFINE_list('robustness_levels', ['1', '2', '3', '4', '5'],
                  'Severities of the robustness sweep.')
flags.DEFINE_list('noise_probe_seeds', [], 'After training, test whether '
                  'the arm runs of these seeds read SPAD\'s noise as the '
                  'structure (noise_probe.py; resumable).')
flags.DEFINE_bool('report_only', False, 'Rebuild results and plots from '
                  'finished runs; train nothing.')
flags.DEFINE_string('compilation_cache', 'auto', 'JAX persistent compilation '
                    'cache (runs that differ only in seed compile once): a '
                    'folder, "auto" (<out>/.jax_cache) or "" (off).')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  if not FLAGS.out:
    raise app.UsageError('--out is required')
  logging.get_absl_handler().addFilter(records.QuietLibraries())
  from spad_jax import config_validation  # pylint: disable=g-import-not-at-top
  base = FLAGS.config
  seeds = [int(s) for s in FLAGS.seeds]
  sweep_values = {'lambda': [float(v) for v in FLAGS.lambdas],
                  'anchor': [float(v) for v in FLAGS.anchors]}
  sweep_seeds = [int(s) for s in FLAGS.sweep_seeds]
  levels = [int(x) for x in FLAGS.robustness_levels]
  robustness_seeds = [int(x) for x in FLAGS.robustness_seeds]
  probe_seeds = [int(x) for x in FLAGS.noise_probe_seeds]
  if not levels or any(not 1 <= x <= 5 for x in levels):
    print(f'error: --robustness_levels={",".join(FLAGS.robustness_levels)}: '
          'severities must be in 1..5', file=sys.stderr)
    return 2
  try:
    runs = plan.plan_runs(base, FLAGS.out, FLAGS.arms, seeds, FLAGS.folds,
                          FLAGS.sweeps, sweep_values, sweep_seeds,
                          FLAGS.sweep_epochs)
    for run in runs:  # Every run's config, before any work.
      config_validation.validate(run.config)
    checked = set()
    for run in runs:
      key = (run.config.data.num_folds, run.config.data.fold)
      if key not in checked:
        config_validation.validate_data(run.config)
        checked.add(key)
  except (ValueError, config_validation.ConfigError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  report_dir = FLAGS.report_dir or FLAGS.out
  os.makedirs(FLAGS.out, exist_ok=True)
  os.makedirs(report_dir, exist_ok=True)
  from spad_jax import train_state  # pylint: disable=g-import-not-at-top
  train_state.use_compilation_cache(FLAGS.compilation_cache, FLAGS.out)
  meta = {'command': ' '.join(['python -m experiments.ablation.main'] +
                             sys.argv[1:]),
          'config_file': config_flags.get_config_filename(FLAGS['config']),
          'folds': FLAGS.folds, 'sweeps': list(FLAGS.sweeps),
          'sweep_values': {s: sweep_values[s] for s in FLAGS.sweeps},
          'sweep_seeds': sweep_seeds,
          'sweep_epochs': FLAGS.sweep_epochs or base.train.num_epochs,
          'robustness_seeds': robustness_seeds,
          'robustness_levels': levels,
          'noise_probe_seeds': probe_seeds,
          'complete': False}

  def after_run(run):
    """The phases that need the run's trained model, then the tables so
    far: results are on disk as each run finishes."""
    plan.execute_robustness([run], robustness_seeds, levels)
    plan.execute_noise_probe([run], probe_seeds)
    report.report(report_dir, runs, FLAGS.arms, seeds, FLAGS.sweeps,
                  sweep_values, meta, FLAGS.qualitative_cases)

  complete = True
  if not FLAGS.report_only:
    try:
      complete = plan.execute(
          runs, after_run=after_run,
          needs_model=lambda run: plan.needs_model(run, robustness_seeds,
                                                   levels, probe_seeds))
    except plan.StudyError as e:  # A workdir with another config.
      print(f'error: {e}', file=sys.stderr)
      return 2
  meta['complete'] = complete
  results = report.report(report_dir, runs, FLAGS.arms, seeds, FLAGS.sweeps,
                          sweep_values, meta, FLAGS.qualitative_cases)
  print(report.markdown(results))
  print(f'Wrote {report_dir}/results.json, results.md, curves.png, '
        'schedule.png' + ''.join(f', sweep_{s}.png' for s in FLAGS.sweeps) +
        (', qualitative.png' if results['meta']['qualitative_cases'] else ''))
  return 0 if complete else 3


if __name__ == '__main__':
  app.run(main)
