"""Which diffusion times ``t ∈ {1..T}`` a training batch sees (DESIGN §1).

- ``uniform``: the paper's, each example draws ``t`` on its own.
- ``stratified``: one shared offset ``u`` puts the global batch's ``B``
  examples in the ``B`` equal strata of ``[0, 1)`` (in a random order), so a
  batch covers the noise levels evenly; each ``t`` is still uniform.
- ``importance``: improved DDPM (Nichol & Dhariwal 2021, §3.3). ``π(t) ∝
  sqrt(E[L_t²])`` over the last ``H`` losses seen at each ``t``, mixed with a
  little uniform mass, and the loss of an example is weighted by
  ``1/(T·π(t))`` so that its expectation equals the uniform one. Until every
  ``t`` has ``H`` losses recorded the draw stays uniform (weight 1).

The loss history is part of the train state (a dict of arrays, so orbax
saves it with the parameters and a resumed run continues identically).
"""

from typing import Dict

import jax
import jax.numpy as jnp

SAMPLERS = ('uniform', 'stratified', 'importance')

History = Dict[str, jnp.ndarray]


def uniform(key: jax.Array, num_steps: int) -> jnp.ndarray:
  """One ``t`` uniform on ``{1..T}`` (int32 scalar)."""
  return jax.random.randint(key, (), 1, num_steps + 1)


def stratified(key: jax.Array, global_batch: int,
               num_steps: int) -> jnp.ndarray:
  """``[global_batch]`` times, one per stratum ``[i/B, (i+1)/B)`` of ``[0, 1)``.

  Example ``j`` gets stratum ``perm[j]``: ``t = 1 + ⌊T·(perm[j] + u)/B⌋``
  with one ``u ~ U[0, 1)``, so every example's ``t`` is uniform on ``{1..T}``
  and the batch is spread evenly (low discrepancy).
  """
  k_u, k_perm = jax.random.split(key)
  u = jax.random.uniform(k_u, ())
  perm = jax.random.permutation(k_perm, global_batch)
  v = (perm.astype(jnp.float32) + u) / global_batch
  t = 1 + jnp.floor(v * num_steps).astype(jnp.int32)
  return jnp.clip(t, 1, num_steps)


def init_history(num_steps: int, size: int) -> History:
  """Empty per-``t`` ring buffers of ``size`` losses (row ``t``; row 0 unused)."""
  return {'values': jnp.zeros((num_steps + 1, size), jnp.float32),
          'counts': jnp.zeros((num_steps + 1,), jnp.int32)}


def history_ready(history: History) -> jnp.ndarray:
  """True once every ``t ∈ {1..T}`` has a full buffer."""
  size = history['values'].shape[1]
  return jnp.all(history['counts'][1:] >= size)


def importance_probs(history: History, uniform_mix: float) -> jnp.ndarray:
  """``π`` over ``t = 1..T`` (shape ``[T]``): ``∝ sqrt(mean L_t²)`` mixed with
  ``uniform_mix`` of uniform mass; exactly uniform until ``history_ready``."""
  values = history['values'][1:]
  num_steps = values.shape[0]
  second_moment = jnp.sqrt(jnp.mean(jnp.square(values), axis=1))
  total = jnp.sum(second_moment)
  probs = jnp.where(total > 0, second_moment / jnp.maximum(total, 1e-30),
                    1.0 / num_steps)
  probs = probs * (1.0 - uniform_mix) + uniform_mix / num_steps
  return jnp.where(history_ready(history), probs,
                   jnp.full_like(probs, 1.0 / num_steps))


def draw(key: jax.Array, probs: jnp.ndarray) -> jnp.ndarray:
  """One ``t ~ π`` (``probs`` over ``1..T``), int32 scalar."""
  return 1 + jax.random.categorical(
      key, jnp.log(jnp.maximum(probs, 1e-30))).astype(jnp.int32)


def importance_weight(t, probs: jnp.ndarray) -> jnp.ndarray:
  """``1/(T·π(t))``: ``E_{t~π}[w(t)·L_t] = E_{t~U}[L_t]``."""
  num_steps = probs.shape[0]
  return 1.0 / (num_steps * probs[jnp.asarray(t) - 1])


def update_history(history: History, t: jnp.ndarray,
                   losses: jnp.ndarray) -> History:
  """Appends ``losses[i]`` (unweighted, at ``t[i]``) in order to the ring
  buffers; non-finite losses are not recorded."""
  size = history['values'].shape[1]

  def add(i, h):
    ti, li = t[i], losses[i]
    ok = jnp.isfinite(li)
    slot = h['counts'][ti] % size
    values = h['values'].at[ti, slot].set(
        jnp.where(ok, li, h['values'][ti, slot]))
    counts = h['counts'].at[ti].add(ok.astype(jnp.int32))
    return {'values': values, 'counts': counts}

  return jax.lax.fori_loop(0, t.shape[0], add, history)
