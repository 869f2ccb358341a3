r"""Compares the learning curves and test scores of finished training runs.

Each ``--run NAME=WORKDIR`` names a workdir with ``train_log.jsonl`` and
``metrics.json`` (``python main.py`` writes both), e.g. the same arm at two
budgets:

  python -m experiments.ablation.compare_curves \
      --run=baseline_1800=docs/study_cv/baseline/seed0/fold0 \
      --run=baseline_3600=docs/study_cv_plateau/baseline \
      --out=docs/study_cv_plateau

Writes ``<out>/curves.png`` (train-split and validation mDice against the
step), ``curves.csv`` (every logged point: run, step, key, value) and
``curves.json`` (per run: its test mDice / mIoU and whether its train-split
curve reached a plateau, by ``patients.plateau``).
"""

from absl import app
from absl import flags

from experiments.ablation import curves
from spad_jax import formatting

FLAGS = flags.FLAGS
flags.DEFINE_multi_string('run', None, 'NAME=WORKDIR; one or more.')
flags.DEFINE_string('out', None, 'Output folder.')
flags.mark_flags_as_required(['run', 'out'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  try:
    summary = curves.compare(FLAGS.run, FLAGS.out)
  except ValueError as e:
    raise app.UsageError(str(e)) from None
  for name, r in summary.items():
    p = r['plateau']
    print(f'{name}: {r["steps"]} steps, test mDice '
          f'{formatting.number(r["test_mDice"], 4, missing="—")}; '
          f'train-split mDice at the end '
          f'{formatting.number(p["final"], 4, missing="—")}, gain over the '
          f'last 10 % {formatting.number(p["gain"], 4, missing="—")}, over '
          f'the last quarter '
          f'{formatting.number(p["gain_quarter"], 4, missing="—")}; on its '
          f'plateau: {p["on_plateau"]}')


if __name__ == '__main__':
  app.run(main)
