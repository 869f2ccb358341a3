"""PyTorch reference: the same CCDM UNet and KL train step, for bench/perf.py.

A layer-for-layer port of ``spad_jax/models/unet.py`` (same convolutions,
GroupNorms, attention blocks, time MLP; ``tests/test_bench.py`` checks the
parameter counts agree) and of the diffusion maths of ``spad_jax/diffusion.py``
that a train step and the sampler need. It is what a user would otherwise
write: channels-last memory, ``torch.compile`` where it works, AMP bfloat16
autocast on GPU. Needs only ``torch`` (not in requirements.txt: install it
with ``pip install -r bench/requirements-torch.txt``).
"""

import math
from typing import Sequence

import torch
from torch import nn
import torch.nn.functional as F

LOG_EPS = 1e-12


def timestep_embedding(t: torch.Tensor, dim: int,
                       max_period: float = 10000.0) -> torch.Tensor:
  half = dim // 2
  freqs = torch.exp(-math.log(max_period) * torch.arange(
      half, dtype=torch.float32, device=t.device) / half)
  args = t.float()[:, None] * freqs[None]
  emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
  return F.pad(emb, (0, 1)) if dim % 2 else emb


def _norm(channels: int, groups: int) -> nn.GroupNorm:
  return nn.GroupNorm(math.gcd(groups, channels), channels, eps=1e-6)


def _zero(module: nn.Module) -> nn.Module:
  for p in module.parameters():
    nn.init.zeros_(p)
  return module


class ResBlock(nn.Module):

  def __init__(self, in_ch: int, out_ch: int, emb_dim: int, groups: int,
               dropout: float):
    super().__init__()
    self.norm1 = _norm(in_ch, groups)
    self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
    self.emb = nn.Linear(emb_dim, out_ch)
    self.norm2 = _norm(out_ch, groups)
    self.dropout = nn.Dropout(dropout)
    self.conv2 = _zero(nn.Conv2d(out_ch, out_ch, 3, padding=1))
    self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else None

  def forward(self, x, emb):
    h = self.conv1(F.silu(self.norm1(x)))
    h = h + self.emb(F.silu(emb))[:, :, None, None]
    h = self.conv2(self.dropout(F.silu(self.norm2(h))))
    return (self.skip(x) if self.skip is not None else x) + h


class AttentionBlock(nn.Module):

  def __init__(self, channels: int, num_heads: int, groups: int):
    super().__init__()
    self.heads = num_heads if channels % num_heads == 0 else 1
    self.norm = _norm(channels, groups)
    self.qkv = nn.Linear(channels, 3 * channels)
    self.proj = _zero(nn.Linear(channels, channels))

  def forward(self, x):
    b, c, h, w = x.shape
    y = self.norm(x).flatten(2).transpose(1, 2)  # [B, HW, C]
    q, k, v = self.qkv(y).reshape(b, h * w, 3, self.heads,
                                  c // self.heads).permute(2, 0, 3, 1, 4)
    y = F.scaled_dot_product_attention(q, k, v)  # Fused where available.
    y = self.proj(y.transpose(1, 2).reshape(b, h * w, c))
    return x + y.transpose(1, 2).reshape(b, c, h, w)


class UNet(nn.Module):
  """Arguments as ``spad_jax.models.unet.UNet`` (plus the image channels)."""

  def __init__(self, num_classes: int, channels: int = 1,
               base_channels: int = 32,
               channel_mult: Sequence[int] = (1, 1, 2, 3, 4),
               num_res_blocks: int = 2,
               attention_resolutions: Sequence[int] = (16, 8),
               num_heads: int = 1, norm_groups: int = 32,
               dropout: float = 0.0, image_size: int = 128):
    super().__init__()
    self.base = base_channels
    emb_dim = 4 * base_channels
    self.time = nn.Sequential(nn.Linear(base_channels, emb_dim), nn.SiLU(),
                              nn.Linear(emb_dim, emb_dim))
    self.stem = nn.Conv2d(num_classes + channels, base_channels, 3, padding=1)
    block = lambda i, o: ResBlock(i, o, emb_dim, norm_groups, dropout)
    attn = lambda c: AttentionBlock(c, num_heads, norm_groups)
    self.down, chans, ch, res = nn.ModuleList(), [base_channels], \
        base_channels, image_size
    for level, mult in enumerate(channel_mult):
      for _ in range(num_res_blocks):
        out = base_channels * mult
        self.down.append(nn.ModuleList(
            [block(ch, out)] + ([attn(out)] if res in attention_resolutions
                                else [])))
        ch = out
        chans.append(ch)
      if level != len(channel_mult) - 1:
        self.down.append(nn.ModuleList([nn.Conv2d(ch, ch, 3, stride=2,
                                                  padding=1)]))
        res //= 2
        chans.append(ch)
    self.mid = nn.ModuleList([block(ch, ch), attn(ch), block(ch, ch)])
    self.up = nn.ModuleList()
    for level, mult in reversed(list(enumerate(channel_mult))):
      for i in range(num_res_blocks + 1):
        out = base_channels * mult
        layers = [block(ch + chans.pop(), out)]
        if res in attention_resolutions:
          layers.append(attn(out))
        ch = out
        if level and i == num_res_blocks:
          layers.append(nn.Upsample(scale_factor=2, mode='nearest'))
          layers.append(nn.Conv2d(ch, ch, 3, padding=1))
          res *= 2
        self.up.append(nn.ModuleList(layers))
    self.head_norm = _norm(ch, norm_groups)
    self.head = _zero(nn.Conv2d(ch, num_classes, 3, padding=1))

  @staticmethod
  def _run(layers, h, emb):
    for layer in layers:
      h = layer(h, emb) if isinstance(layer, ResBlock) else layer(h)
    return h

  def forward(self, xt_onehot, image, t):
    """NCHW in (one-hot ``[B, K, H, W]``, image ``[B, C, H, W]``), logits out."""
    emb = self.time(timestep_embedding(t, self.base))
    h = self.stem(torch.cat([xt_onehot * 2.0 - 1.0, image], dim=1))
    skips = [h]
    for layers in self.down:
      h = self._run(layers, h, emb)
      skips.append(h)
    h = self._run(self.mid, h, emb)
    for layers in self.up:
      h = self._run(layers, torch.cat([h, skips.pop()], dim=1), emb)
    return self.head(F.silu(self.head_norm(h))).float()


# -------------------------------------------------------- diffusion maths


def cosine_alphas_cumprod(num_steps: int, s: float = 0.008,
                          max_beta: float = 0.999) -> torch.Tensor:
  u = torch.arange(num_steps + 1, dtype=torch.float64) / num_steps
  f = torch.cos((u + s) / (1 + s) * math.pi / 2) ** 2
  abar = f / f[0]
  alphas = torch.ones_like(abar)
  alphas[1:] = 1.0 - torch.clamp(1.0 - abar[1:] / abar[:-1], max=max_beta)
  return torch.cumprod(alphas, 0).float()


def _bc(x: torch.Tensor) -> torch.Tensor:
  return x[:, None, None, None] if x.ndim == 1 else x


def posterior_probs(xt, x0, abar_t, abar_s):
  """``q(x_s | x_t, x0)``, class axis 1 (NCHW)."""
  k = xt.shape[1]
  a_ts = _bc(abar_t / abar_s)
  abar_s = _bc(abar_s)
  unnorm = (a_ts * xt + (1 - a_ts) / k) * (abar_s * x0 + (1 - abar_s) / k)
  return unnorm / unnorm.sum(1, keepdim=True)


def model_posterior_probs(xt, p_hat, abar_t, abar_s):
  """CCDM mixture ``Σ_c p̂_c · q(x_s | x_t, e_c)`` in O(K), class axis 1."""
  k = xt.shape[1]
  a_ts = _bc(abar_t / abar_s)
  abar_s = _bc(abar_s)
  v = a_ts * xt + (1 - a_ts) / k
  z = abar_s * v + (1 - abar_s) / k * v.sum(1, keepdim=True)
  ratio = p_hat / z
  return v * (abar_s * ratio + (1 - abar_s) / k * ratio.sum(1, keepdim=True))


def sample_categorical(probs: torch.Tensor) -> torch.Tensor:
  """Class indices drawn from probabilities over axis 1 (Gumbel-max)."""
  logits = torch.log(probs.clamp_min(LOG_EPS))
  gumbel = -torch.log(-torch.log(torch.rand_like(logits).clamp_min(1e-20)))
  return (logits + gumbel).argmax(1)


def kl_loss(model, x0, image, abar, num_classes, sigma=None, mask=None):
  """The CCDM loss of one batch: draw t, x_t, predict, per-pixel KL."""
  b = x0.shape[0]
  t = torch.randint(1, abar.shape[0], (b,), device=x0.device)
  x0_onehot = F.one_hot(x0, num_classes).permute(0, 3, 1, 2).float()
  abar_t, abar_s = abar[t], abar[t - 1]
  q_t = _bc(abar_t) * x0_onehot + (1 - _bc(abar_t)) / num_classes
  xt_onehot = F.one_hot(sample_categorical(q_t), num_classes).permute(
      0, 3, 1, 2).float().contiguous(memory_format=torch.channels_last)
  if mask is not None:  # SPAD: I + σ·ε ⊙ M.
    image = image + sigma * torch.randn_like(image) * mask[:, None]
  p_hat = torch.softmax(model(xt_onehot, image, t).float(), dim=1)
  q = posterior_probs(xt_onehot, x0_onehot, abar_t, abar_s)
  p = model_posterior_probs(xt_onehot, p_hat, abar_t, abar_s)
  kl = (q * (torch.log(q.clamp_min(LOG_EPS)) -
             torch.log(p.clamp_min(LOG_EPS)))).sum(1)
  return kl.flatten(1).sum(1).mean()


@torch.no_grad()
def sample(model, image, abar, num_classes, times):
  """Ancestral sampling along decreasing ``times`` (T ... 0); labels out."""
  b, _, h, w = image.shape
  x = torch.randint(0, num_classes, (b, h, w), device=image.device)
  p_hat = None
  for t, s in zip(times[:-1], times[1:]):
    xt = F.one_hot(x, num_classes).permute(0, 3, 1, 2).float().contiguous(
        memory_format=torch.channels_last)
    tt = torch.full((b,), int(t), device=image.device)
    p_hat = torch.softmax(model(xt, image, tt).float(), dim=1)
    x = sample_categorical(model_posterior_probs(
        xt, p_hat, abar[int(t)].expand(b), abar[int(s)].expand(b)))
  return p_hat.argmax(1)
