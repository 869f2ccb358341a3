"""Guided-diffusion style UNet denoiser for categorical segmentation (DESIGN §1).

``UNet(x_t_onehot, image, t) -> logits [B, H, W, K]``. The input is
``concat(onehot(x_t)·2 − 1, I)``; ``t`` enters through a sinusoidal embedding
and an MLP into every residual block. Output convolutions (residual branches,
attention projections, the head) start at zero, so an untrained model
predicts the uniform distribution.
"""

import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from spad_jax.models import norm

Dtype = Any


def timestep_embedding(t: jnp.ndarray, dim: int,
                       max_period: float = 10000.0) -> jnp.ndarray:
  """Sinusoidal embedding ``[B] -> [B, dim]`` of integer or float times."""
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) /
                  half)
  args = t.astype(jnp.float32)[:, None] * freqs[None]
  emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
  if dim % 2:
    emb = jnp.pad(emb, ((0, 0), (0, 1)))
  return emb


def _norm(channels: int, groups: int, dtype: Dtype,
          silu: bool = False) -> norm.GroupNorm:
  # GroupNorm(32) as in guided-diffusion, reduced to a divisor for narrow layers.
  return norm.GroupNorm(num_groups=math.gcd(groups, channels), silu=silu,
                        dtype=dtype)


def flax_norm(channels: int, groups: int, dtype: Dtype, silu: bool = False):
  """``_norm`` from flax's ``nn.GroupNorm`` (+ ``nn.silu``): the plain form,
  same parameters; the tests' reference and the speed A/B's baseline."""
  layer = nn.GroupNorm(num_groups=math.gcd(groups, channels), dtype=dtype)
  return (lambda x: nn.silu(layer(x))) if silu else layer


class ResBlock(nn.Module):
  out_channels: int
  norm_groups: int
  dropout: float
  dtype: Dtype

  @nn.compact
  def __call__(self, x, emb, train: bool):
    in_ch = x.shape[-1]
    h = _norm(in_ch, self.norm_groups, self.dtype, silu=True)(x)
    h = nn.Conv(self.out_channels, (3, 3), dtype=self.dtype)(h)
    h = h + nn.Dense(self.out_channels, dtype=self.dtype)(
        nn.silu(emb))[:, None, None, :]
    h = _norm(self.out_channels, self.norm_groups, self.dtype, silu=True)(h)
    h = nn.Dropout(self.dropout, deterministic=not train)(h)
    h = nn.Conv(self.out_channels, (3, 3), dtype=self.dtype,
                kernel_init=nn.initializers.zeros)(h)
    if in_ch != self.out_channels:
      x = nn.Conv(self.out_channels, (1, 1), dtype=self.dtype)(x)
    return x + h


class AttentionBlock(nn.Module):
  num_heads: int
  norm_groups: int
  dtype: Dtype

  @nn.compact
  def __call__(self, x):
    b, h, w, c = x.shape
    heads = self.num_heads if c % self.num_heads == 0 else 1
    y = _norm(c, self.norm_groups, self.dtype)(x).reshape(b, h * w, c)
    qkv = nn.Dense(3 * c, dtype=self.dtype)(y)
    q, k, v = jnp.split(qkv.reshape(b, h * w, 3, heads, c // heads), 3,
                        axis=2)
    y = jax.nn.dot_product_attention(q[:, :, 0], k[:, :, 0], v[:, :, 0])
    y = nn.Dense(c, dtype=self.dtype, kernel_init=nn.initializers.zeros)(
        y.reshape(b, h * w, c))
    return x + y.reshape(b, h, w, c)


class UNet(nn.Module):
  """Sizes come from ``config.model`` (see configs/default.py)."""
  num_classes: int
  base_channels: int = 32
  channel_mult: Sequence[int] = (1, 1, 2, 3, 4)
  num_res_blocks: int = 2
  attention_resolutions: Sequence[int] = (16, 8)
  num_heads: int = 1
  norm_groups: int = 32
  dropout: float = 0.0
  dtype: Dtype = jnp.float32
  self_condition: bool = False

  @nn.compact
  def __call__(self, xt_onehot, image, t, train: bool = False, p_prev=None):
    """Returns logits over classes, float32, ``[B, H, W, K]``.

    With ``self_condition``, ``p_prev`` ``[B, H, W, K]`` (the previous
    estimate of p̂; ``None`` or zeros: none) is an extra input.
    """
    size = image.shape[1]
    down_factor = 2 ** (len(self.channel_mult) - 1)
    if image.shape[1] % down_factor or image.shape[2] % down_factor:
      raise ValueError(f'image size {image.shape[1:3]} must be divisible by '
                       f'{down_factor} for channel_mult={self.channel_mult}')
    emb_dim = 4 * self.base_channels
    emb = timestep_embedding(t, self.base_channels)
    emb = nn.Dense(emb_dim, dtype=self.dtype)(emb)
    emb = nn.Dense(emb_dim, dtype=self.dtype)(nn.silu(emb))

    parts = [xt_onehot * 2.0 - 1.0, image]
    if self.self_condition:
      parts.append(jnp.zeros_like(xt_onehot) if p_prev is None else
                   p_prev.astype(xt_onehot.dtype))
    elif p_prev is not None:
      raise ValueError('p_prev given to a UNet without self_condition')
    x = jnp.concatenate(parts, axis=-1)
    h = nn.Conv(self.base_channels, (3, 3), dtype=self.dtype)(
        x.astype(self.dtype))
    skips = [h]
    res = size
    block = lambda ch: ResBlock(ch, self.norm_groups, self.dropout, self.dtype)
    attn = lambda: AttentionBlock(self.num_heads, self.norm_groups, self.dtype)
    for level, mult in enumerate(self.channel_mult):
      for _ in range(self.num_res_blocks):
        h = block(self.base_channels * mult)(h, emb, train)
        if res in self.attention_resolutions:
          h = attn()(h)
        skips.append(h)
      if level != len(self.channel_mult) - 1:
        h = nn.Conv(h.shape[-1], (3, 3), strides=(2, 2), dtype=self.dtype)(h)
        res //= 2
        skips.append(h)

    h = block(h.shape[-1])(h, emb, train)
    h = attn()(h)
    h = block(h.shape[-1])(h, emb, train)

    for level, mult in reversed(list(enumerate(self.channel_mult))):
      for i in range(self.num_res_blocks + 1):
        h = jnp.concatenate([h, skips.pop()], axis=-1)
        h = block(self.base_channels * mult)(h, emb, train)
        if res in self.attention_resolutions:
          h = attn()(h)
        if level and i == self.num_res_blocks:
          b, hh, ww, c = h.shape
          h = jax.image.resize(h, (b, 2 * hh, 2 * ww, c), 'nearest')
          h = nn.Conv(c, (3, 3), dtype=self.dtype)(h)
          res *= 2
    assert not skips
    h = _norm(h.shape[-1], self.norm_groups, self.dtype, silu=True)(h)
    logits = nn.Conv(self.num_classes, (3, 3), dtype=self.dtype,
                     kernel_init=nn.initializers.zeros)(h)
    return logits.astype(jnp.float32)


def fixed_inputs(like: jnp.ndarray):
  """``(x_t, t)`` of the deterministic baseline (``model.kind=deterministic``):
  an all-zero one-hot map shaped like ``like`` ``[B, H, W, K]`` and ``t = 0``.
  Fixed inputs keep the parameter tree of the diffusion UNet; the constant
  channels and time embedding act as biases."""
  return (jnp.zeros(like.shape, jnp.float32),
          jnp.zeros((like.shape[0],), jnp.int32))


def create_model(config) -> UNet:
  """Builds the UNet from ``config.model`` and ``config.data.num_classes``."""
  m = config.model
  dtype = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}[m.dtype]
  return UNet(num_classes=config.data.num_classes,
              base_channels=m.base_channels,
              channel_mult=tuple(m.channel_mult),
              num_res_blocks=m.num_res_blocks,
              attention_resolutions=tuple(m.attention_resolutions),
              num_heads=m.num_heads,
              norm_groups=m.norm_groups,
              dropout=m.dropout,
              dtype=dtype,
              self_condition=bool(m.get('self_condition', False)))
