"""Saves a checkpoint, then SIGKILLs itself while writing the next one.

  python tests/kill_during_save.py WORKDIR

Writes step 1 of the tiny config's TrainState completely, starts saving a
changed state as step 2 and kills the process (SIGKILL, no cleanup) as soon
as orbax's temporary folder for step 2 has files in it. Prints what it saw.
"""

import os
import signal
import sys

_TESTS = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(_TESTS), _TESTS]

import jax  # pylint: disable=g-import-not-at-top
import numpy as np

from spad_jax import train_state
import tiny_config  # pylint: disable=g-bad-import-order


def main(workdir):
  config = tiny_config.get_config()
  setup = train_state.Setup.from_config(config)
  state = train_state.create_train_state(config, setup.model, setup.keys()[0], 12)
  state = train_state.replicate(state.replace(step=state.step + 1))
  mgr = train_state.checkpoint_manager(workdir, 3)
  train_state.save_checkpoint(mgr, state, {'epoch': 0})
  mgr.wait_until_finished()
  np.save(os.path.join(workdir, 'saved_params.npy'),
          np.concatenate([np.ravel(x[0]) for x in
                          jax.tree.leaves(jax.device_get(state.params))]))
  changed = state.replace(step=state.step + 1, params=jax.tree.map(
      lambda x: x + 1.0, state.params))
  train_state.save_checkpoint(mgr, changed, {'epoch': 0})  # Async: returns early.
  folder = mgr.directory
  for _ in range(1_000_000):
    tmp = [d for d in os.listdir(folder) if d.startswith('2.') and 'tmp' in d]
    if tmp:
      files = sum(len(f) for _, _, f in os.walk(os.path.join(folder, tmp[0])))
      if files:
        print(f'killing while writing {tmp[0]} ({files} files)', flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
    if os.path.isdir(os.path.join(folder, '2')):
      print('step 2 finished before the kill', flush=True)
      return 3
  return 4


if __name__ == '__main__':
  sys.exit(main(sys.argv[1]))
