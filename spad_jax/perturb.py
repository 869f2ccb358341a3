"""SPAD training-time perturbations of the conditioning image (DESIGN.md §2).

Mask builders (``scd_mask``, ``boundary_band``) are plain numpy/OpenCV so the
same code serves tf.data (through ``tf.numpy_function``) and the
TensorFlow-free loader. The schedules (``pas_sigma``, ``num_targets``) accept
Python numbers (host side) and traced JAX values (inside the train step).
``perturb_image`` is the jnp merge applied in the train step.
"""

from typing import Optional

import cv2
import jax
import jax.numpy as jnp
import numpy as np


def _is_traced(*values) -> bool:
  for v in values:
    if isinstance(v, jax.Array):
      return True
  return False


def pas_sigma(epoch, sigma0: float, lam: float):
  """Progress-aware noise std ``σ(e) = σ0 / (1 + λ·e)``."""
  if _is_traced(epoch, sigma0, lam):
    return sigma0 / (1.0 + lam * jnp.asarray(epoch, jnp.float32))
  return float(sigma0) / (1.0 + float(lam) * float(epoch))


def num_targets(epoch, k0: float, gamma: float, n_available):
  """``k(e) = min(#targets, max(1, round(K0 / (1 + γ·e))))``; 0 with no targets.

  Rounding is half-to-even (Python's ``round`` and jnp agree).
  """
  if _is_traced(epoch, k0, gamma, n_available):
    k = jnp.maximum(1, jnp.round(k0 / (1.0 + gamma * jnp.asarray(
        epoch, jnp.float32))).astype(jnp.int32))
    return jnp.minimum(jnp.asarray(n_available, jnp.int32), k)
  k = max(1, round(float(k0) / (1.0 + float(gamma) * float(epoch))))
  return min(int(n_available), k)


def target_masks(label: np.ndarray, num_classes: int,
                 components: bool = False) -> list:
  """Boolean masks of the ScD targets in ``label`` ``[H, W]``.

  A target is a foreground class present in the label or, with
  ``components=True``, each 8-connected component of one.
  """
  targets = []
  for c in range(1, num_classes):
    cls = label == c
    if not cls.any():
      continue
    if not components:
      targets.append(cls)
      continue
    n, comp = cv2.connectedComponents(cls.astype(np.uint8), connectivity=8)
    targets.extend(comp == i for i in range(1, n))
  return targets


def anchor_keep(shape, anchor_ratio: float, rng: np.random.Generator,
                patch: int = 0) -> np.ndarray:
  """Boolean anchor field: each pixel (``patch <= 1``) or each cell of a
  randomly offset ``patch``×``patch`` grid is kept with ``anchor_ratio``."""
  if patch <= 1:
    return rng.random(shape) < anchor_ratio
  h, w = shape
  cells = rng.random((h // patch + 2, w // patch + 2)) < anchor_ratio
  oy, ox = rng.integers(patch, size=2)
  keep = np.repeat(np.repeat(cells, patch, axis=0), patch, axis=1)
  return keep[oy:oy + h, ox:ox + w]


def target_pixels(label: np.ndarray, num_classes: int,
                  components: bool = False) -> list:
  """The ScD targets of ``label`` as flat pixel indices (int32 arrays): the
  compact form ``scd_mask`` works on and the pipeline caches per case."""
  return [np.flatnonzero(t).astype(np.int32)
          for t in target_masks(label, num_classes, components)]


def uniform16(rng: np.random.Generator, n: int) -> np.ndarray:
  """``n`` uniform uint16 values straight from ``rng``'s bit generator (one
  64-bit draw gives four): 5x cheaper than ``rng.random(n)``, which showed
  in the per-example mask cost."""
  raw = rng.bit_generator.random_raw((int(n) + 3) // 4)  # uint64 array.
  return raw.view(np.uint16)[:n]


def scd_mask(label: np.ndarray, num_classes: int, k: int, anchor_ratio: float,
             rng: np.random.Generator, components: bool = False,
             targets: Optional[list] = None,
             anchor_patch: int = 0) -> np.ndarray:
  """Semantic-concentrated mask ``M_s`` (uint8 0/1, shape of ``label``).

  Chooses ``min(k, #targets)`` targets at random; inside each, every pixel
  (or square patch of ``anchor_patch`` pixels) is kept as an anchor with
  probability ``anchor_ratio`` (per pixel: quantised to 1/65536); the mask
  covers the non-anchor pixels of the chosen targets. ``targets`` (from
  ``target_pixels`` or ``target_masks``) skips finding them again.
  """
  if targets is None:
    targets = target_pixels(label, num_classes, components)
  mask = np.zeros(label.shape, np.uint8)
  k = min(int(k), len(targets))
  if k <= 0:
    return mask
  chosen = (range(k) if k == len(targets) else
            rng.permutation(len(targets))[:k])
  # Targets are disjoint, so their flat indices concatenate to the union.
  parts = [targets[i] if targets[i].dtype != bool else
           np.flatnonzero(targets[i]) for i in chosen]
  pixels = parts[0] if len(parts) == 1 else np.concatenate(parts)
  flat = mask.reshape(-1)
  if anchor_patch <= 1:
    # Draw only for the chosen pixels: targets are small, images are not.
    threshold = int(round(float(anchor_ratio) * 65536))
    flat[pixels] = uniform16(rng, pixels.size) >= threshold
  else:
    keep = anchor_keep(label.shape, anchor_ratio, rng, anchor_patch)
    flat[pixels] = ~keep.reshape(-1)[pixels]
  return mask


def spread_labels(label: np.ndarray, num_classes: int) -> np.ndarray:
  """Maps class indices to grey values spread evenly over 0..255."""
  step = 255 // max(1, num_classes - 1)
  lut = np.minimum(np.arange(256) * step, 255).astype(np.uint8)
  return cv2.LUT(label.astype(np.uint8, copy=False), lut)


def transition_pixels(label: np.ndarray) -> np.ndarray:
  """Pixels whose right or lower neighbour has another class (bool).

  This is the side OpenCV's Canny marks on a label step, so adding these
  pixels to Canny's edges keeps the line one pixel wide.
  """
  out = np.zeros(label.shape, bool)
  out[:, :-1] |= label[:, :-1] != label[:, 1:]
  out[:-1] |= label[:-1] != label[1:]
  return out


def boundary_band(label: np.ndarray, num_classes: int, width: int,
                  low: float = 100.0, high: float = 200.0,
                  per_class: bool = False,
                  complete: bool = True) -> np.ndarray:
  """Boundary-centralized mask ``M_b`` (uint8 0/1).

  Canny with the given thresholds on the label map spread over 0..255, then
  dilation with a ``width``×``width`` square so the band is ``width`` pixels
  across, centred on the detected edges.

  Canny's non-maximum suppression drops a few transition pixels of label
  maps (1-pixel holes, junctions, corners, the image border: ~1-2 % on Duke
  DME labels), so ``complete=True`` (default) adds ``transition_pixels``
  to its edges: with ``width >= 2`` the band then covers both pixels of
  every class transition and still lies within ``width // 2 + 1`` of one.

  With many classes the grey step between adjacent classes gets too small
  for high thresholds (for 100/200: K >= 16 finds no edge at all), so
  ``per_class=True`` runs Canny on each present class's binary map (full
  contrast) and unites the edges: every class transition is then found.
  ``spread_sees_all_transitions`` tells whether the plain mode suffices.
  """
  if per_class:
    edges = np.zeros(label.shape, np.uint8)
    for c in np.unique(label):
      edges |= cv2.Canny(np.where(label == c, 255, 0).astype(np.uint8), low,
                         high)
  else:
    edges = cv2.Canny(spread_labels(label, num_classes), low, high)
  if complete:
    edges[transition_pixels(label)] = 255
  if width > 1:
    edges = cv2.dilate(edges, np.ones((width, width), np.uint8))
  return (edges > 0).astype(np.uint8)


def spread_sees_all_transitions(num_classes: int, low: float,
                                high: float) -> bool:
  """Whether Canny on the spread label map detects a step between two
  adjacent classes (the smallest grey step) with these thresholds."""
  strip = np.zeros((16, 16), np.uint8)
  strip[:, 8:] = 1
  return bool(cv2.Canny(spread_labels(strip, num_classes), low, high).any())


def perturb_image(image: jnp.ndarray, mask: jnp.ndarray, sigma,
                  key: jax.Array) -> jnp.ndarray:
  """``Ĩ = I + σ·ε ⊙ M`` with one ``ε ~ N(0, 1)`` draw per pixel and channel.

  ``image`` is ``[..., H, W, C]``, ``mask`` ``[..., H, W]`` (the union
  ``M_s ∪ M_b``); ``sigma`` a scalar or broadcastable to ``[...]``.
  """
  eps = jax.random.normal(key, image.shape, jnp.float32)
  sigma = jnp.asarray(sigma, jnp.float32)
  sigma = sigma.reshape(sigma.shape + (1,) * (image.ndim - sigma.ndim))
  m = mask.astype(jnp.float32)[..., None]
  return (image.astype(jnp.float32) + sigma * eps * m).astype(image.dtype)
