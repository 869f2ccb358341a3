"""What one training example is trained on: its time step, noisy label and
image-noise key, and its loss, for each ``model.kind`` (DESIGN §1).

- ``diffusion``: ``t`` from ``diffusion.t_sampling`` (``timesteps.py``),
  ``x_t ~ q(x_t | x0)``, loss ``L_t + λ·w(t)·CE`` (``diffusion.hybrid_loss``;
  ``λ = 0`` is the paper's KL) + ``diffusion.dice_lambda``·H·W·soft Dice
  of ``p̂``, weighted by ``1/(T·π(t))`` under importance
  sampling.
- ``deterministic``: the same UNet with ``x_t`` and ``t`` fixed
  (``unet.fixed_inputs``), loss per-pixel CE + ``train.dice_weight``·soft
  Dice.
- Options of the diffusion model that need the model itself: training on
  its own ``x_t`` (``make_own_sample_fn``) and self-conditioning
  (``make_self_condition_fn``).

Every example's randomness comes from its own key (``fold_in`` of the step
key and its global index), so a step is the same on any device count.
"""

from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp

from spad_jax import diffusion
from spad_jax import timesteps
from spad_jax.models import unet


class Inputs(NamedTuple):
  """The per-device batch's model inputs and loss weights."""
  xt_onehot: jnp.ndarray  # [B, H, W, K]
  t: jnp.ndarray  # [B] int32
  eps_keys: jax.Array  # [B] keys of the SPAD image noise.
  weight: Any  # Loss weight per example (or 1.0).
  probs: Optional[jnp.ndarray]  # π(t) under importance sampling, else None.


def soft_dice_loss(x0_onehot: jnp.ndarray, p_hat: jnp.ndarray) -> jnp.ndarray:
  """Per-example ``1 − mean_c 2Σp̂g/(Σp̂+Σg)`` over the foreground classes
  ``c`` present in the label; 0 for a label with none.

  An absent class is left out rather than scored by the usual ε-smoothed
  ratio ``ε/(Σp̂+ε)``, which is a flat loss of 1 (no gradient) until the
  predicted mass is of order ε and then a cliff with a gradient of order
  1/ε. On Duke DME, where 29 % of the B-scans hold no fluid, that flat 1
  added λ·H·W to every such example's logged loss and to the per-t history
  importance sampling reads. Pixels of an absent class are the KL's/CE's.
  """
  axes = tuple(range(1, x0_onehot.ndim - 1))
  g, p = x0_onehot[..., 1:], p_hat[..., 1:]
  inter = jnp.sum(g * p, axis=axes)
  total = jnp.sum(g + p, axis=axes)
  present = jnp.sum(g, axis=axes) > 0  # Then total >= 1.
  dice = 2.0 * inter / jnp.maximum(total, 1.0)
  lost = jnp.where(present, 1.0 - dice, 0.0)
  return jnp.sum(lost, axis=-1) / jnp.maximum(jnp.sum(present, axis=-1), 1)


def make_inputs_fn(config, schedule: diffusion.Schedule) -> Callable:
  """``inputs(loss_history, step_key, keys, first, x0) -> Inputs``.

  ``keys`` are the examples' keys ``[B]``, ``first`` the global index of
  this device's first example, ``x0`` the one-hot labels ``[B, H, W, K]``.
  """
  num_classes = config.data.num_classes
  num_t = config.diffusion.num_steps
  sampler = config.diffusion.t_sampling
  global_batch = config.train.batch_size

  def example_noise(key, x0_onehot, t_given):
    k_t, k_x, k_eps = jax.random.split(key, 3)
    t = timesteps.uniform(k_t, num_t) if t_given is None else t_given
    xt = diffusion.sample_categorical(
        k_x, diffusion.q_probs(x0_onehot, t, schedule))
    return t, xt, k_eps

  def draw_times(loss_history, step_key, keys, first):
    """(t or None for per-example uniform draws, weights, π or None)."""
    if sampler == 'stratified':
      t_all = timesteps.stratified(jax.random.fold_in(step_key, 1 << 29),
                                   global_batch, num_t)
      return (jax.lax.dynamic_slice(t_all, (first,), (keys.shape[0],)), 1.0,
              None)
    if sampler == 'importance':
      probs = timesteps.importance_probs(loss_history,
                                         config.diffusion.importance_uniform)
      # Own key per example (not k_t), so uniform draws before the switch
      # and importance draws after it are independent of x_t's key.
      t = jax.vmap(lambda k: timesteps.draw(jax.random.fold_in(k, 7), probs))(
          keys)
      return t, timesteps.importance_weight(t, probs), probs
    return None, 1.0, None

  def inputs(loss_history, step_key, keys, first, x0) -> Inputs:
    if config.model.kind == 'deterministic':
      eps_keys = jax.vmap(lambda k: jax.random.split(k, 3)[2])(keys)
      xt_onehot, t = unet.fixed_inputs(x0)
      return Inputs(xt_onehot, t, eps_keys, 1.0, None)
    t_given, weight, probs = draw_times(loss_history, step_key, keys, first)
    t, xt, eps_keys = jax.vmap(
        example_noise, in_axes=(0, 0, None if t_given is None else 0))(
            keys, x0, t_given)
    xt_onehot = jax.nn.one_hot(xt, num_classes, dtype=jnp.float32)
    return Inputs(xt_onehot, t, eps_keys, weight, probs)

  return inputs


# An ``apply_model(params, xt_onehot, image, t, keys, p_prev=None) -> logits``
# is the train step's forward pass (per-example dropout keys).


def make_own_sample_fn(config, schedule: diffusion.Schedule
                       ) -> Optional[Callable]:
  """``own(apply_model, params, inputs, image, keys, x0, step) -> Inputs``,
  or None when ``diffusion.own_sample_fraction`` is 0.

  That fraction of the examples (own key each) trains on the x_t that one
  jump of the current model (no gradient) draws from
  ``t' = min(t + own_sample_stride, T)``, ``x_t' ~ q(x_t' | x0)``: the kind
  of input a sampling chain feeds the model, its errors included, where
  q(x_t | x0) only ever shows it uniform noise. The jump is
  ``diffusion.own_sample_sampler``'s (``diffusion.jump_probs``) on ``p̂``
  sharpened by ``diffusion.own_sample_temperature`` (``diffusion.sharpen``,
  as ``eval.temperature`` does in the chain). Loss and target stay the
  same. Before train step ``own_sample_start_step`` (a
  warm-up: early own guesses are mostly wrong) the inputs pass unchanged
  and the extra forward pass is skipped.
  """
  fraction = float(config.diffusion.get('own_sample_fraction', 0.0))
  if not fraction:
    return None
  stride = int(config.diffusion.own_sample_stride)
  sampler = config.diffusion.get('own_sample_sampler', 'ancestral')
  start_step = int(config.diffusion.get('own_sample_start_step', 0))
  temperature = float(config.diffusion.get('own_sample_temperature', 1.0))
  num_classes = config.data.num_classes

  def draw(apply_model, params, inputs, image, keys, x0):
    keys = jax.vmap(lambda k: jax.random.fold_in(k, 1 << 27))(keys)
    split = lambda i: jax.vmap(lambda k: jax.random.fold_in(k, i))(keys)
    use = jax.vmap(lambda k: jax.random.bernoulli(k, fraction))(split(0))
    t_from = jnp.minimum(inputs.t + stride, schedule.num_steps)
    x_from = jax.vmap(diffusion.sample_categorical)(
        split(1), diffusion.q_probs(x0, t_from, schedule))
    from_onehot = jax.nn.one_hot(x_from, num_classes, dtype=jnp.float32)
    p_hat = jax.lax.stop_gradient(jax.nn.softmax(
        apply_model(params, from_onehot, image, t_from,
                    split(2)).astype(jnp.float32), axis=-1))
    probs = diffusion.jump_probs(sampler, from_onehot,
                                 diffusion.sharpen(p_hat, temperature),
                                 t_from, inputs.t, schedule)
    drawn = jax.vmap(diffusion.sample_categorical)(split(3), probs)
    use = use & (t_from > inputs.t)  # t = T has no earlier step.
    return inputs._replace(xt_onehot=jnp.where(
        use[:, None, None, None],
        jax.nn.one_hot(drawn, num_classes, dtype=jnp.float32),
        inputs.xt_onehot))

  def own(apply_model, params, inputs, image, keys, x0, step):
    if not start_step:
      return draw(apply_model, params, inputs, image, keys, x0)
    return jax.lax.cond(
        step >= start_step,
        lambda: draw(apply_model, params, inputs, image, keys, x0),
        lambda: inputs)

  return own


def make_self_condition_fn(config) -> Optional[Callable]:
  """``p_prev(apply_model, params, inputs, image, keys)``, or None without
  ``model.self_condition``: half the examples (own key each) get the
  model's own estimate on the same x_t, the rest none (zeros); no gradient
  flows through it (Chen et al. 2022)."""
  if not config.model.get('self_condition', False):
    return None

  def p_prev(apply_model, params, inputs, image, keys):
    keys = jax.vmap(lambda k: jax.random.fold_in(k, 1 << 28))(keys)
    use = jax.vmap(lambda k: jax.random.bernoulli(k, 0.5))(keys)
    estimate = jax.nn.softmax(apply_model(
        params, inputs.xt_onehot, image, inputs.t, keys).astype(jnp.float32),
                              axis=-1)
    return jnp.where(use[:, None, None, None],
                     jax.lax.stop_gradient(estimate), 0.0)

  return p_prev


def make_loss_fn(config, schedule: diffusion.Schedule) -> Callable:
  """``loss(x0, xt_onehot, p_hat, t) -> [B]`` per-example losses (unweighted;
  the importance weight is applied by the caller)."""
  if config.model.kind == 'deterministic':
    dice_weight = config.train.dice_weight

    def loss(x0, xt_onehot, p_hat, t):
      del xt_onehot, t
      pixels = x0.shape[1] * x0.shape[2]
      return (diffusion.cross_entropy(x0, p_hat) / pixels +
              dice_weight * soft_dice_loss(x0, p_hat))
    return loss

  ce_lambda = float(config.diffusion.ce_lambda)
  ce_weighting = config.diffusion.ce_weighting
  dice_lambda = float(config.diffusion.dice_lambda)
  dice_weighting = config.diffusion.dice_weighting

  def loss(x0, xt_onehot, p_hat, t):
    total = diffusion.hybrid_loss(x0, xt_onehot, p_hat, t, schedule,
                                  ce_lambda, ce_weighting)
    if dice_lambda:
      # Scaled by the pixel count so that λ weighs it like a per-pixel term
      # against the KL, which is summed over pixels.
      pixels = x0.shape[1] * x0.shape[2]
      w = diffusion.time_weight(dice_weighting, t, schedule)
      total = total + dice_lambda * pixels * w * soft_dice_loss(x0, p_hat)
    return total
  return loss
