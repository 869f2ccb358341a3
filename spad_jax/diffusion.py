"""Categorical diffusion with uniform transitions (CCDM), as small pure functions.

Notation follows DESIGN.md §1: ``K`` classes, class axis last, ``ᾱ_t`` the
cumulative signal fraction with ``ᾱ_0 = 1``. Every function broadcasts over
leading axes; ``t`` and ``s`` may be scalars or arrays with one entry per
batch element (they are broadcast against the leading axis).
"""

from typing import Callable, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

# Probabilities are clamped here before any log (DESIGN §1).
LOG_EPS = 1e-12


class Schedule(NamedTuple):
  """Cosine schedule tables, index ``t`` in ``0..T``."""
  alphas_cumprod: jnp.ndarray  # ᾱ_t, shape [T+1], ᾱ_0 == 1.
  alphas: jnp.ndarray  # α_t = ᾱ_t / ᾱ_{t-1}, shape [T+1], α_0 == 1.

  @property
  def num_steps(self) -> int:
    return self.alphas_cumprod.shape[0] - 1


def make_schedule(num_steps: int, s: float = 0.008,
                  max_beta: float = 0.999) -> Schedule:
  """Cosine schedule of Nichol & Dhariwal with ``1 - α_t`` clipped at ``max_beta``.

  Computed in float64 numpy once, then stored as float32 tables (float64
  when ``jax_enable_x64`` is on, for reference checks).
  """
  if num_steps < 1:
    raise ValueError(f'diffusion.num_steps must be >= 1, got {num_steps}')
  u = np.arange(num_steps + 1, dtype=np.float64) / num_steps
  f = np.cos((u + s) / (1 + s) * np.pi / 2) ** 2
  abar = f / f[0]
  alphas = np.ones_like(abar)
  alphas[1:] = abar[1:] / abar[:-1]
  alphas[1:] = 1.0 - np.minimum(1.0 - alphas[1:], max_beta)
  abar = np.cumprod(alphas)  # Recomputed after clipping; alphas[0] == 1.
  dtype = jnp.result_type(float)  # float32, or float64 under x64.
  return Schedule(alphas_cumprod=jnp.asarray(abar, dtype),
                  alphas=jnp.asarray(alphas, dtype))


def _per_example(values: jnp.ndarray, like: jnp.ndarray) -> jnp.ndarray:
  """Reshapes a scalar or per-example ``[B]`` array to broadcast against ``like``.

  ``like`` has shape ``[B, ..., K]``; the result has shape ``[B, 1, ..., 1]``.
  """
  values = jnp.asarray(values)
  if values.ndim == 0:
    return values
  if values.ndim != 1 or values.shape[0] != like.shape[0]:
    raise ValueError(f'time array of shape {values.shape} does not match the '
                     f'leading axis of an array of shape {like.shape}')
  return values.reshape(values.shape + (1,) * (like.ndim - 1))


def _abar(t, schedule: Schedule, like: jnp.ndarray) -> jnp.ndarray:
  return _per_example(schedule.alphas_cumprod[jnp.asarray(t)], like)


def q_probs(x0_probs: jnp.ndarray, t, schedule: Schedule) -> jnp.ndarray:
  """Forward marginal ``q(x_t | x0) = ᾱ_t·x0 + (1 − ᾱ_t)/K``."""
  k = x0_probs.shape[-1]
  abar = _abar(t, schedule, x0_probs)
  return abar * x0_probs + (1.0 - abar) / k


def _jump_abar(t, s, schedule: Schedule, like: jnp.ndarray):
  """``ā_{t|s} = ᾱ_t/ᾱ_s`` and ``ᾱ_s``, both broadcast against ``like``."""
  abar_t = _abar(t, schedule, like)
  abar_s = _abar(s, schedule, like)
  return abar_t / abar_s, abar_s


def posterior_probs(xt_onehot: jnp.ndarray, x0_probs: jnp.ndarray, t, s,
                    schedule: Schedule) -> jnp.ndarray:
  """Exact jump posterior ``q(x_s | x_t, x0)`` for ``0 <= s < t``.

  ``∝ (ā_{t|s}·x_t + (1 − ā_{t|s})/K) ⊙ (ᾱ_s·x0 + (1 − ᾱ_s)/K)``,
  normalised over the class axis.
  """
  k = xt_onehot.shape[-1]
  a_ts, abar_s = _jump_abar(t, s, schedule, xt_onehot)
  fact_t = a_ts * xt_onehot + (1.0 - a_ts) / k
  fact_0 = abar_s * x0_probs + (1.0 - abar_s) / k
  unnorm = fact_t * fact_0
  return unnorm / jnp.sum(unnorm, axis=-1, keepdims=True)


def model_posterior_probs(xt_onehot: jnp.ndarray, p_hat: jnp.ndarray, t, s,
                          schedule: Schedule) -> jnp.ndarray:
  """CCDM mixture ``Σ_c p̂_c · q(x_s | x_t, x0 = e_c)`` in O(K) per pixel.

  With ``v = ā_{t|s}·x_t + (1 − ā_{t|s})/K`` and ``w_c = ᾱ_s·e_c + (1 − ᾱ_s)/K``
  the normaliser of ``v ⊙ w_c`` is ``Z_c = ᾱ_s·v_c + (1 − ᾱ_s)/K·Σv``, so
  ``p_j = v_j·(ᾱ_s·p̂_j/Z_j + (1 − ᾱ_s)/K·Σ_c p̂_c/Z_c)``.
  """
  k = xt_onehot.shape[-1]
  a_ts, abar_s = _jump_abar(t, s, schedule, xt_onehot)
  v = a_ts * xt_onehot + (1.0 - a_ts) / k
  z = abar_s * v + (1.0 - abar_s) / k * jnp.sum(v, axis=-1, keepdims=True)
  ratio = p_hat / z
  return v * (abar_s * ratio +
              (1.0 - abar_s) / k * jnp.sum(ratio, axis=-1, keepdims=True))


def _at_least_f32(x: jnp.ndarray) -> jnp.ndarray:
  """bfloat16/float16 to float32; float32/float64 unchanged."""
  x = jnp.asarray(x)
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def categorical_kl(q: jnp.ndarray, p: jnp.ndarray) -> jnp.ndarray:
  """``KL(q ‖ p)`` over the last axis, logs clamped at ``LOG_EPS``."""
  q = _at_least_f32(q)
  p = _at_least_f32(p)
  return jnp.sum(q * (jnp.log(jnp.maximum(q, LOG_EPS)) -
                      jnp.log(jnp.maximum(p, LOG_EPS))), axis=-1)


def kl_loss(x0_onehot: jnp.ndarray, xt_onehot: jnp.ndarray,
            p_hat: jnp.ndarray, t, schedule: Schedule) -> jnp.ndarray:
  """Per-example loss ``L_t = Σ_pixels KL(q(x_{t-1}|x_t,x0) ‖ p_θ(x_{t-1}|x_t))``.

  Inputs ``[B, H, W, K]``; returns ``[B]``. Computed in at least float32 (the
  network may run in bfloat16). At ``t = 1`` this equals ``−Σ log p̂(x0)``.
  """
  x0_onehot = _at_least_f32(x0_onehot)
  xt_onehot = _at_least_f32(xt_onehot)
  p_hat = _at_least_f32(p_hat)
  t = jnp.asarray(t)
  s = t - 1
  q = posterior_probs(xt_onehot, x0_onehot, t, s, schedule)
  p = model_posterior_probs(xt_onehot, p_hat, t, s, schedule)
  kl = categorical_kl(q, p)
  return jnp.sum(kl.reshape(kl.shape[0], -1), axis=-1)


def cross_entropy(x0_onehot: jnp.ndarray, p_hat: jnp.ndarray) -> jnp.ndarray:
  """Per-example ``CE = −Σ_pixels log p̂(x0)`` (clamped), ``[B, ..., K] -> [B]``.

  The auxiliary term of the hybrid loss (D3PM): it asks for the clean label at
  every ``t``, where the KL term's gradient fades as ``ᾱ_t`` shrinks.
  """
  x0_onehot = _at_least_f32(x0_onehot)
  p_hat = _at_least_f32(p_hat)
  ce = -jnp.sum(x0_onehot * jnp.log(jnp.maximum(p_hat, LOG_EPS)), axis=-1)
  return jnp.sum(ce.reshape(ce.shape[0], -1), axis=-1)


def ce_stage_weight(t, schedule: Schedule) -> jnp.ndarray:
  """``w(t) = (1 − ᾱ_t) / mean_{u=1..T}(1 − ᾱ_u)``: the CE weight of the
  staged hybrid loss, near 0 at small ``t`` (where the KL already is the CE)
  and largest where ``ᾱ_t`` is small; its mean over uniform ``t`` is 1."""
  one_minus = 1.0 - schedule.alphas_cumprod
  return one_minus[jnp.asarray(t)] / jnp.mean(one_minus[1:])


WEIGHTINGS = ('constant', 'stage')  # The weights over t a loss term takes.


def time_weight(weighting: str, t, schedule: Schedule):
  """A loss term's weight at ``t``: ``'constant'`` (1) or ``'stage'``
  (``ce_stage_weight``)."""
  if weighting == 'constant':
    return 1.0
  if weighting == 'stage':
    return ce_stage_weight(t, schedule)
  raise ValueError(f'unknown weighting {weighting!r}; expected one of '
                   f'{list(WEIGHTINGS)}')


def hybrid_loss(x0_onehot: jnp.ndarray, xt_onehot: jnp.ndarray,
                p_hat: jnp.ndarray, t, schedule: Schedule, ce_lambda: float,
                ce_weighting: str = 'constant') -> jnp.ndarray:
  """Per-example ``L_t + λ·w(t)·CE(x0, p̂)``, ``[B]``; ``λ = 0`` is ``kl_loss``.

  ``ce_weighting``: ``'constant'`` (``w = 1``, D3PM's hybrid) or ``'stage'``
  (``ce_stage_weight``).
  """
  kl = kl_loss(x0_onehot, xt_onehot, p_hat, t, schedule)
  if not ce_lambda:
    return kl
  return kl + ce_lambda * time_weight(ce_weighting, t, schedule) * (
      cross_entropy(x0_onehot, p_hat))


def sample_categorical(key: jax.Array, probs: jnp.ndarray) -> jnp.ndarray:
  """Draws class indices from probabilities (class axis last)."""
  logits = jnp.log(jnp.maximum(probs.astype(jnp.float32), LOG_EPS))
  return jax.random.categorical(key, logits, axis=-1)


def time_sequence(num_train_steps: int, num_sample_steps: int) -> np.ndarray:
  """Evenly strided decreasing times ``T = t_0 > … > t_S = 0`` (length S+1)."""
  if not 1 <= num_sample_steps <= num_train_steps:
    raise ValueError(f'eval.num_steps must be in [1, {num_train_steps}], got '
                     f'{num_sample_steps}')
  times = np.round(np.linspace(num_train_steps, 0, num_sample_steps + 1))
  times = times.astype(np.int32)
  assert np.all(np.diff(times) < 0), times
  return times


# A denoiser maps (x_t one-hot [B,H,W,K], image [B,H,W,C], t [B]) -> p̂ [B,H,W,K];
# a self-conditioned one takes the previous step's p̂ (zeros at the first
# step) as a fourth argument.
Denoiser = Callable[..., jnp.ndarray]

# 'ancestral': DESIGN §1's posterior mixture Σ_c p̂_c q(x_s | x_t, e_c), the
# exact reverse process of a model p̂ (the reference).
# 'x0_resample': x_s ~ q(x_s | x0) with x0 ~ p̂, i.e. Cat(ᾱ_s p̂ + (1 − ᾱ_s)/K)
# per pixel: the chain state reaches the next step only through the model,
# so a pixel drawn wrong is not carried forward by the posterior's x_t term.
SAMPLERS = ('ancestral', 'x0_resample')
# The soft map of a chain: 'last': its final p̂ (DESIGN §1); 'chain_mean':
# the mean of the p̂ of every step, which keeps the early steps' estimates
# from the image and noise beside the late ones that see the chain's own
# (copied) errors.
SOFT_MAPS = ('last', 'chain_mean')
# The label of a chain: 'last': the argmax of its final p̂ (DESIGN §1);
# 'soft_map': the argmax of its soft map, with 'chain_mean' the argmax of
# the mean of its steps' p̂, which pools the chain's estimates like a small
# ensemble inside one chain; 'chain_mean': that pooled argmax whatever the
# soft map (so calibration can stay on the final p̂).
CHAIN_LABELS = ('last', 'soft_map', 'chain_mean')
# What an ensemble of N > 1 chains combines: 'chain_label': each chain's
# label (CHAIN_LABELS); 'last': the argmax of each chain's final p̂, its
# sample, whatever the chain's own label. The pooled labels of 'soft_map'
# are a better answer of one chain but agree with each other, so a vote of
# them gains little; the vote of the samples averages the chains' draws.
# One chain (N = 1) is always its own label.
ENSEMBLE_OF = ('chain_label', 'last')
# How N chains make one prediction: 'vote': the per-pixel majority of their
# labels; 'mean': the argmax of their mean soft map; 'medoid': the chain
# whose label map agrees best with the others (summed foreground Dice), a
# real sample, so it keeps the small and thin structures a per-pixel
# majority thins where the chains place them slightly differently.
ENSEMBLES = ('vote', 'mean', 'medoid')


def sharpen(p_hat: jnp.ndarray, temperature: float) -> jnp.ndarray:
  """``p̂^{1/τ}`` renormalised over classes (τ = 1: unchanged; τ → 0: mode)."""
  if temperature == 1.0:
    return p_hat
  logits = jnp.log(jnp.maximum(p_hat, LOG_EPS)) / temperature
  return jax.nn.softmax(logits, axis=-1)


def jump_probs(sampler: str, xt_onehot: jnp.ndarray, p_hat: jnp.ndarray, t,
               s, schedule: Schedule) -> jnp.ndarray:
  """The distribution of ``x_s`` given ``x_t`` and the model's ``p̂``."""
  if sampler == 'ancestral':
    return model_posterior_probs(xt_onehot, p_hat, t, s, schedule)
  if sampler == 'x0_resample':
    return q_probs(p_hat, s, schedule)
  raise ValueError(f'eval.sampler: unknown sampler {sampler!r}; expected one '
                   f'of {SAMPLERS}')


def sample(denoise_fn: Denoiser, image: jnp.ndarray, key: jax.Array,
           schedule: Schedule, num_classes: int,
           times: Optional[Sequence[int]] = None, sampler: str = 'ancestral',
           temperature: float = 1.0, mode_last: int = 0,
           self_condition: bool = False, trace: bool = False) -> dict:
  """Samples a label map along ``times`` from ``T`` to ``0``.

  ``times`` is a strictly decreasing sequence from ``T`` to ``0`` (default:
  the full chain). ``key`` is one key, or one per example ``[B]`` (then each
  chain depends on its own key only, not on the batch around it). Each jump
  ``t → s`` draws ``x_s`` from ``jump_probs(sampler, …)`` of ``p̂``
  sharpened by ``temperature``; the last ``mode_last`` jumps take the most
  probable class instead of a draw. The
  defaults are DESIGN §1's exact ancestral sampler. With ``self_condition``
  the denoiser also gets the previous step's ``p̂``. Runs as one
  ``lax.scan``; call it under ``jit``.

  Returns ``labels`` (argmax of the last ``p̂``), ``probs`` (the last ``p̂``,
  not sharpened), ``probs_chain_mean`` (the mean of every step's ``p̂``) and
  ``sample`` (the class drawn at the last step); with
  ``trace`` also ``trace_input`` (the ``x_t`` each step saw, ``x_T`` first)
  and ``trace_pred`` (argmax of its ``p̂``), ``[S, B, H, W]`` uint8, and
  ``trace_prob`` (that ``p̂``, ``[S, B, H, W, K]``).
  """
  if times is None:
    times = time_sequence(schedule.num_steps, schedule.num_steps)
  times = np.asarray(times, np.int32)
  if times[0] != schedule.num_steps or times[-1] != 0 or np.any(
      np.diff(times) >= 0):
    raise ValueError('times must decrease strictly from T '
                     f'({schedule.num_steps}) to 0, got {times.tolist()}')
  if not temperature > 0:
    raise ValueError(f'eval.temperature must be > 0, got {temperature}')
  if mode_last < 0:
    raise ValueError(f'eval.mode_last must be >= 0, got {mode_last}')
  b, h, w = image.shape[:3]
  num_jumps = len(times) - 1
  keys = jax.random.split(key, b) if key.shape == () else key
  if keys.shape != (b,):
    raise ValueError(f'key: one key or one per example ({b}), got shape '
                     f'{keys.shape}')
  keys = jax.vmap(lambda k: jax.random.split(k, num_jumps + 1))(keys)
  x_t = jax.vmap(lambda k: jax.random.randint(k, (h, w), 0, num_classes))(
      keys[:, 0])
  step_keys = jnp.swapaxes(keys[:, 1:], 0, 1)  # [S, B]
  pairs = jnp.stack([times[:-1], times[1:]], axis=1)
  use_mode = jnp.arange(num_jumps) >= num_jumps - mode_last

  def step(carry, inputs):
    x_t, p_prev, p_sum = carry
    (t_s, step_key, mode) = inputs
    t, s = t_s[0], t_s[1]
    xt_onehot = jax.nn.one_hot(x_t, num_classes, dtype=jnp.float32)
    tt = jnp.full((b,), t, jnp.int32)
    p_hat = (denoise_fn(xt_onehot, image, tt, p_prev) if self_condition else
             denoise_fn(xt_onehot, image, tt)).astype(jnp.float32)
    probs = jump_probs(sampler, xt_onehot, sharpen(p_hat, temperature), t, s,
                       schedule)
    x_s = jnp.where(mode, jnp.argmax(probs, axis=-1),
                    jax.vmap(sample_categorical)(step_key, probs))
    out = ((x_t.astype(jnp.uint8),
            jnp.argmax(p_hat, axis=-1).astype(jnp.uint8), p_hat)
           if trace else None)
    return (x_s, p_hat, p_sum + p_hat), out

  p0 = jnp.zeros((b, h, w, num_classes), jnp.float32)  # No estimate yet.
  (x_0, p_hat, p_sum), traced = jax.lax.scan(
      step, (x_t, p0, p0), (pairs, step_keys, use_mode))
  result = {'labels': jnp.argmax(p_hat, axis=-1), 'probs': p_hat,
            'probs_chain_mean': p_sum / num_jumps, 'sample': x_0}
  if trace:
    result['trace_input'], result['trace_pred'], result['trace_prob'] = traced
  return result


def ensemble(labels: jnp.ndarray, num_classes: int) -> dict:
  """Combines ``N`` hard samples ``[N, B, H, W]`` into soft map, prediction, entropy."""
  return _soft_map(jnp.mean(
      jax.nn.one_hot(labels, num_classes, dtype=jnp.float32), axis=0))


def mean_ensemble(probs: jnp.ndarray) -> dict:
  """Combines ``N`` chains' final ``p̂`` ``[N, B, H, W, K]`` by their mean."""
  return _soft_map(jnp.mean(probs.astype(jnp.float32), axis=0))


def medoid_ensemble(labels: jnp.ndarray, num_classes: int) -> dict:
  """``N`` hard samples ``[N, B, H, W]``: the vote's soft map and entropy,
  and as prediction each case's medoid sample, the one with the highest
  summed Dice to all ``N`` (itself included, which adds the same 1 to
  every chain), Dice averaged over the foreground classes ``1..K-1`` and 1
  where a class is absent from both maps; ties go to the lowest chain
  index. Adds ``medoid`` ``[B]``, the chosen chain."""
  onehot = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)
  fg = onehot[..., 1:]
  inter = jnp.einsum('nbhwk,mbhwk->bnmk', fg, fg)
  size = jnp.moveaxis(jnp.sum(fg, axis=(2, 3)), 1, 0)  # [B, N, K-1]
  total = size[:, :, None] + size[:, None]  # [B, N, N, K-1]
  dice = jnp.where(total > 0, 2 * inter / jnp.maximum(total, 1), 1.0)
  medoid = jnp.argmax(jnp.sum(jnp.mean(dice, axis=-1), axis=-1), axis=-1)
  out = ensemble(labels, num_classes)
  out['prediction'] = jnp.take_along_axis(
      labels, medoid[None, :, None, None], axis=0)[0]
  out['medoid'] = medoid
  return out


def _soft_map(soft: jnp.ndarray) -> dict:
  entropy = -jnp.sum(soft * jnp.log(jnp.maximum(soft, LOG_EPS)), axis=-1)
  return {'soft': soft, 'prediction': jnp.argmax(soft, axis=-1),
          'entropy': entropy}
