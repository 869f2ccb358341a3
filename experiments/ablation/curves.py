"""Learning curves and test scores of finished training runs, side by side
(``compare_curves.py`` is its command line)."""

import csv
import json
import os

from experiments.ablation import patients
from experiments.ablation import plan
from spad_jax import files

CURVES = (('train_mDice', 'train-split mDice (monitor cases)'),
          ('val_mDice', 'validation mDice'))


def read_run(name: str, workdir: str) -> dict:
  """A run's curves and test metrics; errors name the missing file."""
  for needed in ('train_log.jsonl', 'metrics.json'):
    path = os.path.join(workdir, needed)
    if not os.path.exists(path):
      raise ValueError(f'--run={name}={workdir}: no {needed} there '
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
  runs = [read_run(name, path)
          for name, path in files.named_paths(specs).items()]
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
