"""Training augmentations (numpy/OpenCV), applied to image and label together.

The input pipeline calls ``augment`` before it builds the SPAD masks, so the
masks follow the augmented label. Every parameter is drawn from the
example's generator in a fixed order whatever is switched on, so turning one
augmentation on does not change the draws of another. Config
(``data.augment``; all off by default):

  flip        left-right flip with probability 1/2
  rotate_deg  rotation angle uniform in [-rotate_deg, rotate_deg]
  scale       zoom factor uniform in [1 - scale, 1 + scale]
  translate   shift uniform in [-translate, translate] x image size, per axis
  gain        intensity gain uniform in [1 - gain, 1 + gain]
  bias        intensity offset uniform in [-bias, bias] (on the [0, 1] scale)
  gamma       gamma exponent uniform in [1 - gamma, 1 + gamma]

Geometry: bilinear for the image, nearest neighbour for the label; pixels
coming from outside the image are black (-1) and background (0).
Intensity: on ``u = (x + 1) / 2`` clipped to [0, 1], ``gain · u^gamma +
bias``, mapped back to [-1, 1] without clipping (like SPAD's own noise).
"""

from typing import Dict, Tuple

import cv2
import numpy as np


def enabled(cfg) -> bool:
  return bool(cfg.flip) or any(
      float(cfg[k]) > 0 for k in ('rotate_deg', 'scale', 'translate', 'gain',
                                  'bias', 'gamma'))


def draw(cfg, rng: np.random.Generator) -> Dict[str, float]:
  """The transformation of one example (identity for what is off)."""
  u = rng.uniform(-1.0, 1.0, size=8)  # Always 8 draws: stable streams.
  return {
      'flip': bool(cfg.flip) and u[0] > 0,
      'angle': float(cfg.rotate_deg) * u[1],
      'zoom': 1.0 + float(cfg.scale) * u[2],
      'dx': float(cfg.translate) * u[3], 'dy': float(cfg.translate) * u[4],
      'gain': 1.0 + float(cfg.gain) * u[5],
      'bias': float(cfg.bias) * u[6],
      'gamma': 1.0 + float(cfg.gamma) * u[7],
  }


def affine_matrix(h: int, w: int, p: Dict[str, float]) -> np.ndarray:
  """2x3 matrix: rotate and zoom about the centre, then shift."""
  m = cv2.getRotationMatrix2D(((w - 1) / 2, (h - 1) / 2), p['angle'],
                              p['zoom'])
  m[0, 2] += p['dx'] * w
  m[1, 2] += p['dy'] * h
  return m


def apply(image: np.ndarray, label: np.ndarray,
          p: Dict[str, float]) -> Tuple[np.ndarray, np.ndarray]:
  """``image`` float32 ``[H, W, C]`` in [-1, 1], ``label`` uint8 ``[H, W]``."""
  if p['flip']:
    image, label = image[:, ::-1], label[:, ::-1]
  if p['angle'] or p['zoom'] != 1.0 or p['dx'] or p['dy']:
    h, w = label.shape
    m = affine_matrix(h, w, p)
    warped = cv2.warpAffine(np.ascontiguousarray(image), m, (w, h),
                            flags=cv2.INTER_LINEAR,
                            borderMode=cv2.BORDER_CONSTANT, borderValue=-1.0)
    image = warped.reshape(h, w, image.shape[2])
    label = cv2.warpAffine(np.ascontiguousarray(label), m, (w, h),
                           flags=cv2.INTER_NEAREST,
                           borderMode=cv2.BORDER_CONSTANT, borderValue=0)
  if p['gain'] != 1.0 or p['bias'] or p['gamma'] != 1.0:
    u = np.clip((image + 1.0) / 2.0, 0.0, 1.0) ** p['gamma']
    image = (p['gain'] * u + p['bias']) * 2.0 - 1.0
  return (np.ascontiguousarray(image, dtype=np.float32),
          np.ascontiguousarray(label))


def augment(image: np.ndarray, label: np.ndarray, cfg,
            rng: np.random.Generator) -> Tuple[np.ndarray, np.ndarray]:
  return apply(image, label, draw(cfg, rng))
