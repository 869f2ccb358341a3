"""Image degradations for evaluation under corruption (never for training).

Each corruption maps an image in [0, 1] (the model-size image, before the
model's [-1, 1] normalisation) to another in [0, 1], deterministic from a
seed. Severities 1..5 follow ImageNet-C's spirit (Hendrycks & Dietterich
2019); intensity parameters are relative to the image's dynamic range ``r``
(its 1st-99th percentile spread), so a dark OCT B-scan and a bright fundus
photo degrade alike. Results are clipped to [0, 1], which also removes any
non-finite value a corruption could produce (docs/EVALUATION.md has the
table). Labels are never touched.
"""

import zlib
from typing import Sequence

import cv2
import numpy as np

# name -> parameter at severities 1..5 (meaning in ``corrupt``).
SEVERITIES = {
    'gaussian_noise': (0.04, 0.08, 0.12, 0.18, 0.26),  # σ / r
    'speckle': (0.15, 0.25, 0.35, 0.5, 0.7),  # std of the Gamma multiplier
    'blur': (0.004, 0.008, 0.012, 0.018, 0.026),  # σ / image side
    'contrast': (0.7, 0.5, 0.35, 0.2, 0.1),  # factor towards the mean
    'gamma': (1.3, 1.6, 2.0, 2.5, 3.2),  # exponent on the normalised image
    'resample': (1.5, 2.0, 3.0, 4.0, 6.0),  # down-sampling factor
    'jpeg': (50, 30, 20, 12, 7),  # JPEG quality
}
NAMES = ('none',) + tuple(SEVERITIES)


def check(name: str, severity: int) -> None:
  if name not in NAMES:
    raise ValueError(f'unknown corruption {name!r}; expected one of {NAMES}')
  if not 1 <= int(severity) <= 5:
    raise ValueError(f'severity must be in 1..5, got {severity}')


def case_seed(seed: int, name: str, severity: int, case: str) -> np.random.Generator:
  """One generator per (run seed, corruption, severity, case id)."""
  words = [int(seed), zlib.crc32(name.encode()), int(severity),
           zlib.crc32(str(case).encode())]
  return np.random.default_rng(words)


def _range(image: np.ndarray):
  lo, hi = np.percentile(image, (1, 99))
  return float(lo), float(max(hi - lo, 1e-3))


def corrupt(image: np.ndarray, name: str, severity: int,
            rng: np.random.Generator) -> np.ndarray:
  """``image`` ``[H, W, C]`` float in [0, 1] -> corrupted float32 in [0, 1]."""
  check(name, severity)
  x = np.asarray(image, np.float32)
  if name == 'none':
    return x
  p = SEVERITIES[name][int(severity) - 1]
  lo, r = _range(x)
  h, w = x.shape[:2]
  if name == 'gaussian_noise':
    x = x + rng.normal(0.0, p * r, x.shape).astype(np.float32)
  elif name == 'speckle':  # x · g, g ~ Gamma(mean 1, std p).
    shape = 1.0 / p ** 2
    x = x * rng.gamma(shape, 1.0 / shape, x.shape).astype(np.float32)
  elif name == 'blur':
    sigma = p * max(h, w)
    x = cv2.GaussianBlur(x, (0, 0), sigmaX=sigma, sigmaY=sigma,
                         borderType=cv2.BORDER_REFLECT).reshape(x.shape)
  elif name == 'contrast':
    mean = x.mean(axis=(0, 1), keepdims=True)
    x = mean + (x - mean) * p
  elif name == 'gamma':
    x = lo + r * np.clip((x - lo) / r, 0.0, None) ** p
  elif name == 'resample':
    small = (max(1, round(w / p)), max(1, round(h / p)))
    down = cv2.resize(x, small, interpolation=cv2.INTER_AREA)
    x = cv2.resize(down, (w, h), interpolation=cv2.INTER_LINEAR
                   ).reshape(x.shape)
  elif name == 'jpeg':
    channels = [np.clip(x[..., c], 0, 1) for c in range(x.shape[-1])]
    out = []
    for ch in channels:  # Grey JPEG per channel (OCT/MRI are one channel).
      ok, data = cv2.imencode('.jpg', np.round(ch * 255).astype(np.uint8),
                              [cv2.IMWRITE_JPEG_QUALITY, int(p)])
      assert ok
      out.append(cv2.imdecode(data, cv2.IMREAD_GRAYSCALE) / 255.0)
    x = np.stack(out, axis=-1).astype(np.float32)
  return np.clip(np.nan_to_num(x, nan=0.0, posinf=1.0, neginf=0.0), 0.0, 1.0
                 ).astype(np.float32)


def corrupt_model_images(images: np.ndarray, ids: Sequence[str], name: str,
                         severity: int, seed: int) -> np.ndarray:
  """Model-range images ``[N, H, W, C]`` in [-1, 1] (as ``sources.Source``
  holds them), corrupted in [0, 1] per case id; same dtype back."""
  if name == 'none':
    return images
  out = np.empty_like(images)
  for i, case in enumerate(ids):
    image01 = (images[i].astype(np.float32) + 1.0) / 2.0
    out[i] = corrupt(image01, name, severity,
                     case_seed(seed, name, severity, case)) * 2.0 - 1.0
  return out
