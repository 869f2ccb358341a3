r"""Pools bench/sampling_curve.py outputs over cross-validation folds.

Under k-fold cross-validation every case is tested once, by the model that
did not train on it. This reads each fold's bench folder (its
``sampling_curve.json`` and ``sampling_cases.npz``), keeps the settings
(sampler, steps, samples) that every fold ran, and scores them over all the
pooled cases: dataset-level mDice of the single chains, of the row's
ensemble rule, of the mean p̂ and of the medoid chain, and ECE. The paired
comparisons of bench/sampling_curve.py (single chains and ensembles
against one step's single samples, ensembles against their own single
chains) are rebuilt over the pooled cases, with 95 %
intervals from a paired bootstrap over cases and one over patients (a
patient's cases resampled together: the unit that generalises to new
patients). ECE, a property of one model, is also compared per fold: the
mean over folds of each fold's ECE minus its one step's, with an interval
from a bootstrap of cases within each fold (pooled histograms let the
folds' over- and under-confidence cancel). Each fold's own figures are
listed beside them.

  python bench/pool_folds.py --out=runs/cv_pooled \
      --runs=runs/cv_f0/bench,runs/cv_f1/bench,runs/cv_f2/bench,runs/cv_f3/bench,runs/cv_f4/bench

With ``--picks=last,chain_mean,...`` (one per fold, e.g. each fold's
``eval.chain_label='auto'`` pick) every fold contributes only the rows of
its own chain label, pooled as one ``label:picked`` setting.

Writes ``<out>/pooled.json`` and ``<out>/pooled.md``.
"""

import os
import sys

from absl import app
from absl import flags

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
# pylint: disable=g-import-not-at-top,wrong-import-position
import sampling_stats as st
# pylint: enable=g-import-not-at-top,wrong-import-position

FLAGS = flags.FLAGS
flags.DEFINE_list('runs', None, 'Bench output folders of bench/'
                  'sampling_curve.py, one per fold.')
flags.DEFINE_string('out', None, 'Output folder.')
flags.DEFINE_integer('resamples', 1000, 'Bootstrap resamples.')
flags.DEFINE_list('picks', None, 'One chain label per fold (the '
                  "eval.chain_label='auto' pick in each fold's metrics.json):"
                  " each fold's rows with that label pool as one setting, "
                  "'label:picked'; other rows are left out.")
flags.mark_flags_as_required(['runs', 'out'])


def main(argv):
  del argv
  from spad_jax import files  # pylint: disable=g-import-not-at-top
  if FLAGS.picks and len(FLAGS.picks) != len(FLAGS.runs):
    sys.exit(f'pool_folds.py: --picks has {len(FLAGS.picks)} labels for '
             f'{len(FLAGS.runs)} --runs')
  try:
    runs = [st.load_run(folder) for folder in FLAGS.runs]
    if FLAGS.picks:
      runs = [st.keep_label(run, label)
              for run, label in zip(runs, FLAGS.picks)]
    result = st.pool(runs, FLAGS.resamples)
  except st.PoolError as e:
    sys.exit(f'pool_folds.py: {e}')
  if not result['rows']:
    sys.exit('pool_folds.py: the folds share no scored setting '
             '(sampler, steps, samples)')
  os.makedirs(FLAGS.out, exist_ok=True)
  files.write_json(os.path.join(FLAGS.out, 'pooled.json'), result)
  files.write_atomic(os.path.join(FLAGS.out, 'pooled.md'),
                     st.pooled_markdown(result))
  print(open(os.path.join(FLAGS.out, 'pooled.md')).read())


if __name__ == '__main__':
  app.run(main)
