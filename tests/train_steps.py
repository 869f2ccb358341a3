"""Runs a few pmapped train steps of the tiny config, for several variants,
and saves what they did; the device-equivalence tests run it with different
emulated device counts (the count is fixed per process):

  python tests/train_steps.py OUT.npz NUM_STEPS VARIANT [VARIANT ...]

A VARIANT is 'base' or comma-separated ``section.key=value`` overrides
(values are Python literals or plain strings). Each variant starts from the
same initialisation and batches. Saved per variant ``i``: ``i/loss``
(``[NUM_STEPS]``), ``i/init<path>``, ``i/step<k><path>`` (parameters after
step ``k``) and, under importance sampling, ``i/history_values`` and
``i/history_counts`` after the last step. The importance history starts
full (a fixed pattern), so the first step already draws from π(t).
"""

import ast
import os
import sys

_TESTS = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(_TESTS), _TESTS]

import jax  # pylint: disable=g-import-not-at-top
import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
import numpy as np  # pylint: disable=g-import-not-at-top

from spad_jax import train  # pylint: disable=g-import-not-at-top
from spad_jax import train_state  # pylint: disable=g-import-not-at-top
from spad_jax.data import pipeline  # pylint: disable=g-import-not-at-top
from spad_jax.data import sources  # pylint: disable=g-import-not-at-top
import tiny_config  # pylint: disable=g-import-not-at-top,g-bad-import-order


def _literal(text):
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text


def variant_config(variant: str):
  config = tiny_config.get_config()
  for item in ([] if variant == 'base' else variant.split(',')):
    key, value = item.split('=', 1)
    section, field = key.split('.')
    config[section][field] = _literal(value)
  return config


def _flat(params, prefix):
  return {f'{prefix}{jax.tree_util.keystr(path)}': np.asarray(value)
          for path, value in jax.tree_util.tree_flatten_with_path(
              jax.device_get(params))[0]}


def run(out_path: str, num_steps: int, variants) -> None:
  out = {}
  for i, variant in enumerate(variants):
    config = variant_config(variant)
    setup = train_state.Setup.from_config(config)
    init_key, train_key, _ = setup.keys()
    examples = pipeline.TrainExamples(
        sources.load_split(config, 'train'), config,
        local_device_count=jax.local_device_count())
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
    out.update(_flat(state.params, f'{i}/init'))
    state = train_state.replicate(state)
    keys = train_state.replicate(train_key)
    losses = []
    for k, batch in enumerate(pipeline.numpy_train_batches(examples, 0,
                                                           num_steps)):
      state, metrics = step(state, batch, keys)
      losses.append(np.asarray(jax.device_get(metrics['loss'][0])))
      out.update(_flat(train_state.unreplicate(state.params),
                       f'{i}/step{k + 1}'))
    out[f'{i}/loss'] = np.stack(losses)
    if state.loss_history is not None:
      history = jax.device_get(train_state.unreplicate(state.loss_history))
      for name, value in history.items():
        out[f'{i}/history_{name}'] = np.asarray(value)
  np.savez(out_path, **out)


if __name__ == '__main__':
  run(sys.argv[1], int(sys.argv[2]), sys.argv[3:])
