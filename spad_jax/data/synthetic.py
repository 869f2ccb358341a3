"""Procedural OCT-like B-scans with lesion labels: the embedded default data set.

Each case is a pure function of ``(seed, split, index)``: layered retina bands
with a foveal pit and tilt, multiplicative speckle, and three lesion classes:

1. ``srf``  subretinal fluid: a dark dome lifting the photoreceptor line above
   the bright RPE; sharp boundary.
2. ``irf``  intraretinal cysts: a few small dark ellipses in the inner and outer
   nuclear layers, which are themselves dark bands (so a threshold cannot
   separate them: shape and context are needed); sharp boundary.
3. ``shrm`` hyper-reflective material: an irregular bright blob above the RPE
   whose intensity fades across its boundary (fuzzy boundary).

No download; runs anywhere. ``make_split`` returns uint8 images and labels.
"""

from typing import Tuple

import cv2
import numpy as np

CLASS_NAMES = ('background', 'srf', 'irf', 'shrm')
NUM_CLASSES = len(CLASS_NAMES)
SPLITS = {'train': 0, 'val': 1, 'test': 2}

# (relative thickness, intensity) of the retinal layers from top to bottom.
_LAYERS = (
    (0.045, 0.75),  # Nerve fibre layer.
    (0.085, 0.45),  # Ganglion cell / inner plexiform layers.
    (0.045, 0.22),  # Inner nuclear layer (dark).
    (0.035, 0.50),  # Outer plexiform layer.
    (0.090, 0.18),  # Outer nuclear layer (dark).
    (0.020, 0.80),  # IS/OS line.
    (0.020, 0.40),  # Outer segments.
    (0.035, 0.95),  # RPE.
    (0.120, 0.45),  # Choroid.
)
_VITREOUS, _SCLERA = 0.06, 0.12
_FLUID = 0.04


def _retina_top(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
  """Inner retinal surface (fraction of height) with tilt, undulation and pit."""
  base = rng.uniform(0.18, 0.30)
  tilt = rng.uniform(-0.12, 0.12)
  wave = rng.uniform(0.0, 0.03) * np.sin(2 * np.pi * (rng.uniform(0.5, 1.5) *
                                                       x + rng.uniform()))
  centre, width = rng.uniform(0.35, 0.65), rng.uniform(0.06, 0.12)
  pit = rng.uniform(0.03, 0.08) * np.exp(-0.5 * ((x - centre) / width) ** 2)
  return base + tilt * (x - 0.5) + wave + pit


def generate_case(seed: int, split: str, index: int,
                  size: int) -> Tuple[np.ndarray, np.ndarray]:
  """One B-scan: ``(image uint8 [size, size], label uint8 [size, size])``."""
  rng = np.random.default_rng([seed, SPLITS[split], index])
  h = w = size
  yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
  y, x = yy / h, xx / w
  xs = np.arange(w) / w

  # Layer boundaries per column; thickness varies slowly and per case.
  scale = rng.uniform(1.1, 1.4)
  bounds = [_retina_top(xs, rng)]
  for thick, _ in _LAYERS:
    bounds.append(bounds[-1] + thick * scale * (1 + 0.15 * np.sin(
        2 * np.pi * (xs + rng.uniform()))))
  bounds = np.stack(bounds)  # [L+1, W]
  image = np.full((h, w), _VITREOUS)
  for i, (_, value) in enumerate(_LAYERS):
    inside = (y >= bounds[i][None]) & (y < bounds[i + 1][None])
    image[inside] = value * rng.uniform(0.9, 1.1)
  image[y >= bounds[-1][None]] = _SCLERA
  label = np.zeros((h, w), np.uint8)

  rpe_top = bounds[7]  # Per column.
  inl_top, onl_bottom = bounds[2], bounds[5]

  # Class 3, drawn first so fluid can overlap it: a fuzzy bright blob.
  if rng.random() < 0.5:
    field = np.zeros((h, w))
    cx = rng.uniform(0.2, 0.8)
    for _ in range(rng.integers(2, 4)):
      bx = cx + rng.uniform(-0.06, 0.06)
      col = int(np.clip(bx * w, 0, w - 1))
      by = rpe_top[col] - rng.uniform(0.07, 0.11)  # In the dark ONL.
      sx, sy = rng.uniform(0.04, 0.08), rng.uniform(0.025, 0.045)
      field += np.exp(-0.5 * (((x - bx) / sx) ** 2 + ((y - by) / sy) ** 2))
    field *= (y < rpe_top[None])  # Sits above the RPE.
    label[field > 0.5] = 3
    alpha = 1 / (1 + np.exp(-(field - 0.5) * 10))  # Soft edge in the image.
    image = image * (1 - alpha) + 0.85 * alpha

  # Class 1: subretinal fluid dome between IS/OS and RPE, lifting the retina.
  if rng.random() < 0.6:
    cx, rx = rng.uniform(0.25, 0.75), rng.uniform(0.10, 0.20)
    height = rng.uniform(0.05, 0.10)
    u = (xs - cx) / rx
    top = rpe_top - height * np.sqrt(np.clip(1 - u ** 2, 0, None))
    dome = (y >= top[None]) & (y < rpe_top[None]) & (np.abs(u) < 1)[None]
    image[dome] = _FLUID
    label[dome] = 1
    # The lifted IS/OS line rides on the dome.
    line = (y >= top[None] - 0.02) & (y < top[None]) & (np.abs(u) < 1)[None]
    image[line & ~dome] = 0.8

  # Class 2: a few small intraretinal cysts in the nuclear layers.
  if rng.random() < 0.6:
    for _ in range(rng.integers(1, 5)):
      cx = rng.uniform(0.1, 0.9)
      col = int(cx * w)
      cy = rng.uniform(inl_top[col] + 0.02, onl_bottom[col] - 0.03)
      rx, ry = rng.uniform(0.03, 0.06), rng.uniform(0.025, 0.045)
      cyst = ((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2 < 1
      cyst &= label == 0
      image[cyst] = _FLUID
      label[cyst] = 2

  # Speckle: multiplicative gamma noise, lightly correlated, plus a floor.
  looks = 3.0
  speckle = rng.gamma(looks, 1 / looks, size=(h, w))
  speckle = cv2.GaussianBlur(speckle, (0, 0), 0.6)
  image = image * speckle + rng.normal(0, 0.03, size=(h, w))
  image = cv2.GaussianBlur(image, (0, 0), 0.5)
  image = np.clip(image, 0, 1)
  return (image * 255).round().astype(np.uint8), label


def make_split(seed: int, split: str, num_cases: int,
               size: int) -> Tuple[np.ndarray, np.ndarray]:
  """All cases of a split: images ``[N, H, W, 1]`` uint8, labels ``[N, H, W]``."""
  if split not in SPLITS:
    raise ValueError(f'unknown split {split!r}; expected one of {list(SPLITS)}')
  images, labels = [], []
  for i in range(num_cases):
    image, label = generate_case(seed, split, i, size)
    images.append(image[..., None])
    labels.append(label)
  return np.stack(images), np.stack(labels)


def tf_dataset(seed: int, split: str, num_cases: int, size: int):
  """The split as a ``tf.data.Dataset`` of ``{'image', 'label', 'index'}``.

  Cases are generated lazily in order, each a pure function of
  ``(seed, split, index)``; image ``[size, size, 1]`` uint8, label
  ``[size, size]`` uint8.
  """
  from spad_jax import tf_cpu  # pylint: disable=g-import-not-at-top
  tf = tf_cpu.import_tensorflow()

  def gen():
    for i in range(num_cases):
      image, label = generate_case(seed, split, i, size)
      yield {'image': image[..., None], 'label': label, 'index': i}

  return tf.data.Dataset.from_generator(gen, output_signature={
      'image': tf.TensorSpec((size, size, 1), tf.uint8),
      'label': tf.TensorSpec((size, size), tf.uint8),
      'index': tf.TensorSpec((), tf.int64)})
