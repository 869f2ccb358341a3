"""One process of a 2-process run joined on localhost (test_train.py).

  python tests/multihost_worker.py COORDINATOR NUM_PROCESSES PROCESS_ID \
      WORKDIR OUT.npz

Trains the tiny config (validation each epoch, the chain label picked on
the val split: confusion counts gathered over the processes), evaluates,
and saves this process's final parameters, EMA parameters and each
candidate label's val confusion counts to OUT.npz.

With NUM_PROCESSES 1 it runs alone, without jax.distributed (COORDINATOR is
ignored): the single-process reference of the same global batch and steps.
"""

import os
import sys

_TESTS = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(_TESTS), _TESTS]

import jax  # pylint: disable=g-import-not-at-top
import numpy as np


def main(coordinator, num_processes, process_id, workdir, out_path):
  if int(num_processes) > 1:
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')
    jax.distributed.initialize(coordinator, int(num_processes),
                               int(process_id))
  from spad_jax import evaluate  # pylint: disable=g-import-not-at-top
  from spad_jax import train  # pylint: disable=g-import-not-at-top
  from spad_jax.data import sources  # pylint: disable=g-import-not-at-top
  import tiny_config  # pylint: disable=g-import-not-at-top
  config = tiny_config.get_config()
  config.train.eval_every_epochs = 1
  config.eval.chain_label = 'auto'
  state, setup, complete = train.train(config, workdir)
  assert complete
  result = evaluate.evaluate(config, workdir, setup=setup)
  flat = {'devices': np.asarray([jax.local_device_count(),
                                 jax.device_count()]),
          'step': np.asarray(jax.device_get(state.step)),
          'mDice': np.asarray(np.nan if result['mDice'] is None
                              else result['mDice'])}
  # The pick's counts: each label's confusion over the whole val split.
  scored = evaluate.score_chain_labels(config, state.ema_params, setup,
                                      sources.load_split(config, 'val'))
  for label, run in scored['runs'].items():
    flat['val_confusion_' + label] = run['confusion']
  for name in ('params', 'ema_params'):
    leaves = jax.tree_util.tree_flatten_with_path(
        jax.device_get(getattr(state, name)))[0]
    flat.update({name + jax.tree_util.keystr(k): v for k, v in leaves})
  np.savez(out_path, **flat)


if __name__ == '__main__':
  main(*sys.argv[1:])
