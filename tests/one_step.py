"""Runs one pmapped train step of the tiny config; saves the new params.

Used by the device-equivalence tests with different emulated device counts:
  python tests/one_step.py OUT.npz [section.key=value ...]
Values are Python literals (or plain strings). An importance-sampling loss
history is pre-filled, so the step already draws from π(t).
"""

import os
import sys

_TESTS = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(_TESTS), _TESTS]

import ast  # pylint: disable=g-import-not-at-top

import jax  # pylint: disable=g-import-not-at-top
import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
import numpy as np  # pylint: disable=g-import-not-at-top

from spad_jax import train
from spad_jax import train_state
from spad_jax.data import pipeline
from spad_jax.data import sources
import tiny_config  # pylint: disable=g-bad-import-order


def _literal(text):
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text


def main(out_path, overrides=()):
  config = tiny_config.get_config()
  for item in overrides:
    key, value = item.split('=', 1)
    section, field = key.split('.')
    config[section][field] = _literal(value)
  setup = train_state.Setup.from_config(config)
  init_key, train_key, _ = setup.keys()
  source = sources.load_split(config, 'train')
  examples = pipeline.TrainExamples(
      source, config, local_device_count=jax.local_device_count())
  state = train_state.create_train_state(config, setup.model, init_key, 10)
  if state.loss_history is not None:
    values = state.loss_history['values']
    state = state.replace(loss_history={
        'values': 1.0 + jnp.arange(values.size, dtype=jnp.float32).reshape(
            values.shape) % 7.0,
        'counts': jnp.full_like(state.loss_history['counts'],
                                values.shape[1])})
  step = train.p_train_step(config, setup.model, setup.schedule,
                            examples.steps_per_epoch)
  batch = next(pipeline.numpy_train_batches(examples, 0, 1))
  init = jax.device_get(state.params)
  state, metrics = step(train_state.replicate(state), batch,
                        train_state.replicate(train_key))
  params = jax.device_get(jax.tree.map(lambda x: x[0], state.params))
  max_update = max(float(np.abs(a - b).max()) for a, b in zip(
      jax.tree.leaves(params), jax.tree.leaves(init)))
  flat = {jax.tree_util.keystr(k): v for k, v in
          jax.tree_util.tree_flatten_with_path(params)[0]}
  flat['loss'] = np.asarray(jax.device_get(metrics['loss'][0]))
  if state.loss_history is not None:
    for name, value in state.loss_history.items():
      flat[f'history_{name}'] = np.asarray(jax.device_get(value[0]))
  flat['max_update'] = np.asarray(max_update)
  np.savez(out_path, **flat)


if __name__ == '__main__':
  main(sys.argv[1], sys.argv[2:])
