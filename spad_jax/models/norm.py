"""GroupNorm (optionally followed by SiLU) with a hand-written gradient.

Same maths and parameters as ``flax.linen.GroupNorm`` (+ ``nn.silu``):
statistics in float32 with the fast variance ``E[x²] − E[x]²``, per-channel
``scale`` and ``bias``. The backward pass is the closed form of the
normalisation's gradient from the saved per-group mean and 1/std, instead of
autodiff's trace of the forward: on XLA:CPU every long reduction becomes a
reduce-window tree that no producer fuses into, so each reduction of the
autodiff backward costs a materialised full-size tensor; the closed form
needs two (see docs/PERFORMANCE.md).
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp


def _per_channel(v, groups):
  """``[B, C]`` per-channel sums -> ``[B, 1, C]`` sums over each channel's
  group."""
  b, c = v.shape
  return jnp.repeat(v.reshape(b, groups, c // groups).sum(-1), c // groups,
                    axis=-1)[:, None, :]


def _sigmoid(y):
  # tanh's form: XLA:CPU expands logistic to exp and a divide, 2x slower.
  return 0.5 + 0.5 * jnp.tanh(0.5 * y)


def _silu(y):
  # Ending in a divide (an op XLA will not duplicate), the output is
  # computed once and read by both convolutions of the next layer; ending
  # in a multiply, XLA recomputes the whole normalisation inside the kernel
  # gradient's layout transposes, which then run slower (docs/PERFORMANCE.md).
  return y / (1.0 + jnp.exp(-y))


def _forward(x, scale, bias, groups, epsilon, silu):
  b, h, w, c = x.shape
  n = h * w * (c // groups)
  xr = x.astype(jnp.float32).reshape(b, h * w, c)
  mean = _per_channel(jnp.sum(xr, 1), groups) / n
  var = jnp.maximum(
      _per_channel(jnp.sum(jnp.square(xr), 1), groups) / n - jnp.square(mean),
      0.0)
  rstd = jax.lax.rsqrt(var + epsilon)
  y = (xr - mean) * (rstd * scale) + bias
  out = _silu(y) if silu else y
  return out.reshape(x.shape), (x, scale, bias, mean, rstd)


def _backward(groups, epsilon, silu, residuals, g):
  del epsilon
  x, scale, bias, mean, rstd = residuals
  b, h, w, c = x.shape
  n = h * w * (c // groups)
  xhat = (x.astype(jnp.float32).reshape(b, h * w, c) - mean) * rstd
  gy = g.astype(jnp.float32).reshape(b, h * w, c)
  if silu:
    y = xhat * scale + bias
    s = _sigmoid(y)
    gy = gy * (s * (1.0 + y * (1.0 - s)))
  sum_g = jnp.sum(gy, 1)  # [B, C]
  sum_gx = jnp.sum(gy * xhat, 1)
  # The gradient of x̂ = (x − μ)·r over a group, with ĝ = gy·scale:
  # r·(ĝ − mean(ĝ) − x̂·mean(ĝ·x̂)).
  dx = rstd * (gy * scale - _per_channel(sum_g * scale, groups) / n -
               xhat * (_per_channel(sum_gx * scale, groups) / n))
  return (dx.reshape(x.shape).astype(x.dtype), jnp.sum(sum_gx, 0),
          jnp.sum(sum_g, 0))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def group_norm(x, scale, bias, groups: int, epsilon: float = 1e-6,
               silu: bool = False):
  """GroupNorm of ``x`` ``[B, H, W, C]`` (``C % groups == 0``), then SiLU
  when ``silu``; ``scale``/``bias`` ``[C]`` float32. Returns float32."""
  return _forward(x, scale, bias, groups, epsilon, silu)[0]


group_norm.defvjp(_forward, _backward)


class GroupNorm(nn.Module):
  """``nn.GroupNorm`` (+ ``nn.silu`` with ``silu``) on ``[B, H, W, C]``.

  Named like flax's so that the parameter tree (``GroupNorm_i/{scale,bias}``)
  and so checkpoints are the same as with ``nn.GroupNorm``.
  """
  num_groups: int
  silu: bool = False
  dtype: object = None
  epsilon: float = 1e-6

  @nn.compact
  def __call__(self, x):
    c = x.shape[-1]
    if x.ndim != 4 or c % self.num_groups:
      raise ValueError(f'GroupNorm wants [B, H, W, C] with C divisible by '
                       f'{self.num_groups} groups, got {x.shape}')
    scale = self.param('scale', nn.initializers.ones, (c,), jnp.float32)
    bias = self.param('bias', nn.initializers.zeros, (c,), jnp.float32)
    y = group_norm(x, scale, bias, self.num_groups, self.epsilon, self.silu)
    return y.astype(self.dtype or jnp.promote_types(x.dtype, jnp.float32))
