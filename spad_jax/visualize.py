"""Shows what SPAD does to training inputs: ``--mode=visualize``.

For a few training cases at the first, middle and last epoch, one row each:
image, label, ScD mask, BcD band, perturbed image. The masks are the ones the
input pipeline builds for that (seed, epoch, case); the image noise is drawn
here with numpy (the train step draws its own ε from its PRNG key), at the
σ(e) of that epoch.
"""

import os

from absl import logging
import cv2
import numpy as np

from spad_jax import train
from spad_jax.data import pipeline
from spad_jax.data import sources
from spad_jax.evaluate import gray_rgb
from spad_jax.evaluate import palette
from spad_jax.evaluate import title_strip

TITLES = ('image', 'label', 'ScD mask', 'BcD band', 'perturbed')


def _mask_rgb(mask: np.ndarray, colour) -> np.ndarray:
  out = np.zeros(mask.shape + (3,), np.uint8)
  out[mask.astype(bool)] = colour
  return out


def visualize(config, workdir: str, num_cases: int = 3) -> str:
  """Writes ``<workdir>/spad_masks.png``; returns its path."""
  os.makedirs(workdir, exist_ok=True)
  source = sources.load_split(config, 'train')
  examples = pipeline.TrainExamples(source, config)
  last = config.train.num_epochs - 1
  epochs = sorted({0, last // 2, last})
  # Prefer cases with foreground, so the masks have something to show.
  has_fg = [i for i in range(len(source)) if source.labels[i].any()]
  cases = (has_fg + [i for i in range(len(source)) if i not in has_fg])
  cases = cases[:num_cases]
  pal = palette(config.data.num_classes)
  rows, notes = [], []
  for idx in cases:
    for epoch in epochs:
      ex = examples.example_at(epoch, idx)
      sigma = train.sigma_at(epoch, config.spad)
      scd, bcd = (pipeline.unpack_mask(ex[k], ex['label'].shape)
                  for k in ('scd_bits', 'bcd_bits'))
      union = np.maximum(scd, bcd)
      eps = np.random.default_rng([config.seed, epoch, idx, 1]).standard_normal(
          ex['image'].shape)
      perturbed = ex['image'] + sigma * eps * union[..., None]
      rows.append(np.concatenate([
          gray_rgb(ex['image']), pal[ex['label']],
          _mask_rgb(scd, (255, 160, 0)), _mask_rgb(bcd, (0, 200, 255)),
          gray_rgb(perturbed)], axis=1))
      notes.append(f'{source.ids[idx]}  epoch {epoch}  sigma {sigma:.3f}  '
                   f'ScD {np.count_nonzero(scd)} px  BcD '
                   f'{np.count_nonzero(bcd)} px')
  tile = rows[0].shape[1] // len(TITLES)
  scale = max(1, 160 // tile)
  out = [title_strip(TITLES, tile * scale)]
  for row, note in zip(rows, notes):
    out.append(title_strip([note], tile * scale * len(TITLES), height=18))
    out.append(cv2.resize(row, None, fx=scale, fy=scale,
                          interpolation=cv2.INTER_NEAREST))
  grid = np.concatenate(out, axis=0)
  path = os.path.join(workdir, 'spad_masks.png')
  cv2.imwrite(path, grid[..., ::-1])
  logging.info('Wrote %s (%d cases x epochs %s).', path, len(cases), epochs)
  return path
