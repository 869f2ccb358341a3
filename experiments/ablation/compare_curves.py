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

import csv
import json
import os

from absl import app
from absl import flags

from experiments.ablation import patients
from experiments.ablation import plan
from spad_jax import files
from spad_jax import formatting

FLAGS = flags.FLAGS
flags.DEFINE_multi_string('run', None, 'NAME=WORKDIR; one or more.')
flags.DEFINE_string('out', None, 'Output folder.')
flags.mark_flags_as_required(['run', 'out'])

CURVES = (('train_mDice', 'train-split mDice (monitor cases)'),
          ('val_mDice', 'validation mDice'))


def read_run(name: str, workdir: str) -> dict:
  """A run's curves and test metrics; errors name the missing file."""
  for needed in ('train_log.jsonl', 'metrics.json'):
    path = os.path.join(workdir, needed)
    if not os.path.exists(path):
      raise app.UsageError(f'--run={name}={workdir}: no {needed} there '
                           '(is the run finished?)')
  with open(os.path.join(workdir, 'metrics.json')) as f:
    metrics = json.load(f)
  log = plan.read_log(workdir)
  # The last logged train step is the run's end (metrics.json exists).
  total = max((s for s, _ in log.get('loss', [])), default=0)
  return {'name': name, 'workdir': workdir, 'log': log,
          'steps': total, 'test_mDice': metrics.get('mDice'),
          'test_mIoU': metrics.get('mIoU'),
          'plateau': patients.plateau(log.get('train_mDice', []), total)}


def compare(specs, out: str) -> dict:
  """Reads the ``NAME=WORKDIR`` specs and writes the figure, CSV and JSON
  to ``out``; returns the JSON's content."""
  runs = []
  for spec in specs:
    name, sep, path = spec.partition('=')
    if not sep or not name or not path:
      raise app.UsageError(f'--run={spec!r}: expected NAME=WORKDIR')
    if name in [r['name'] for r in runs]:
      raise app.UsageError(f'--run: the name {name!r} is given twice')
    runs.append(read_run(name, path))
  os.makedirs(out, exist_ok=True)

  from spad_jax import visualize  # pylint: disable=g-import-not-at-top
  plt = visualize.pyplot()
  fig, axes = plt.subplots(1, len(CURVES), figsize=(6 * len(CURVES), 3.8))
  for ax, (key, label) in zip(axes, CURVES):
    for run in runs:
      if run['log'].get(key):
        steps, values = zip(*run['log'][key])
        ax.plot(steps, values, 'o-', ms=3, label=run['name'])
    ax.set_xlabel('step')
    ax.set_ylabel(label)
    ax.grid(alpha=0.3)
    if ax.lines:
      ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(os.path.join(out, 'curves.png'), dpi=110)
  plt.close(fig)

  with open(os.path.join(out, 'curves.csv'), 'w', newline='') as f:
    writer = csv.writer(f)
    writer.writerow(['run', 'step', 'key', 'value'])
    for run in runs:
      for key, _ in CURVES:
        for step, value in run['log'].get(key, []):
          writer.writerow([run['name'], step, key, value])
  summary = {r['name']: {k: r[k] for k in ('workdir', 'steps', 'test_mDice',
                                          'test_mIoU', 'plateau')}
             for r in runs}
  files.write_json(os.path.join(out, 'curves.json'), summary)
  return summary


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  summary = compare(FLAGS.run, FLAGS.out)
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
