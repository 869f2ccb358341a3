r"""Compares the robustness sweeps of several trained models.

Each ``--run NAME=WORKDIR`` names a workdir where ``--mode=robustness`` has
run; the first (or ``--reference``) is the one the others are compared to:

  python scripts/compare_robustness.py --run=spad=runs/demo \
      --run=no_spad=runs/demo_nospad --out=runs/robustness_spad_vs_none

Writes ``<out>/comparison.json`` (every row, the differences to the
reference, the mean over severities per corruption), ``comparison.csv``
and ``comparison.png`` (the metric against severity, one panel per
corruption, one line per run). The sweeps must share the split and the
sampling settings.
"""

from absl import app
from absl import flags

from spad_jax import files
from spad_jax import robustness

FLAGS = flags.FLAGS
flags.DEFINE_multi_string('run', None, 'NAME=WORKDIR (or NAME=path to a '
                          'robustness.json); two or more.')
flags.DEFINE_string('reference', None, 'NAME of the reference run (default: '
                    'the first --run).')
flags.DEFINE_string('metric', 'mDice', 'Row field to compare (mDice, mIoU, '
                    'case_Dice, HD95, ece, brier, error_auroc).')
flags.DEFINE_string('out', None, 'Output folder.')
flags.mark_flags_as_required(['run', 'out'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  try:
    named = files.named_paths(FLAGS.run)
  except ValueError as e:
    raise app.UsageError(str(e)) from None
  sweeps = {name: robustness.load_sweep(path) for name, path in named.items()}
  if len(sweeps) < 2:
    raise app.UsageError('--run: give at least two runs to compare')
  if FLAGS.metric not in robustness.FIELDS[2:-1]:
    raise app.UsageError(f'--metric={FLAGS.metric!r}: expected one of '
                         f'{", ".join(robustness.FIELDS[2:-1])}')
  result = robustness.compare(sweeps, FLAGS.reference or next(iter(sweeps)),
                              FLAGS.metric)
  for path in robustness.write_comparison(result, FLAGS.out):
    print(path)
  print(f'{FLAGS.metric}, mean over severities 1-5 (none: clean); '
        f'reference {result["reference"]}')
  for kind, means in result['mean_over_severities'].items():
    print(f'{kind:15s} ' + '  '.join(
        f'{n} {v:.3f}' if v is not None else f'{n} -'
        for n, v in means.items()))


if __name__ == '__main__':
  try:
    app.run(main)
  except robustness.CompareError as e:
    raise SystemExit(f'compare_robustness: {e}') from None
