"""Shows what SPAD does to training inputs: ``--mode=visualize``.

For a few training cases at the first, middle and last epoch, one row each:
image, label, ScD mask, BcD band (both tinted over the image), perturbed
image. The masks are the ones the
input pipeline builds for that (seed, epoch, case); the image noise is drawn
here with numpy (the train step draws its own ε from its PRNG key), at the
σ(e) of that epoch.
"""

import os

from absl import logging
import cv2
import numpy as np

from spad_jax import perturb
from spad_jax.data import pipeline
from spad_jax.data import sources

TITLES = ('image', 'label', 'ScD mask (orange)', 'BcD band (blue)',
          'perturbed')


# ----------------------------------------------------- drawing (any module)


def pyplot():
  """matplotlib.pyplot on the Agg backend (files only, no display needed)."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  return plt


def palette(num_classes: int) -> np.ndarray:
  """RGB colours, background black, the rest spread over hue."""
  colours = [(0, 0, 0)]
  for c in range(1, num_classes):
    hsv = np.uint8([[[int(180 * (c - 1) / max(num_classes - 1, 1)), 255,
                      255]]])
    colours.append(tuple(int(v) for v in cv2.cvtColor(hsv,
                                                      cv2.COLOR_HSV2RGB)[0, 0]))
  return np.asarray(colours, np.uint8)


def gray_rgb(image: np.ndarray) -> np.ndarray:
  """Model-range image [-1, 1] ``[H, W, C]`` to uint8 RGB."""
  img = np.clip((image + 1.0) * 127.5, 0, 255).astype(np.uint8)
  return np.repeat(img, 3, axis=-1) if img.shape[-1] == 1 else img[..., :3]


def uncertainty_rgb(entropy: np.ndarray, num_classes: int) -> np.ndarray:
  """Entropy (nats) over its maximum ``log K`` in the inferno colour map, RGB."""
  e = entropy / max(np.log(num_classes), 1e-9)
  return cv2.applyColorMap((np.clip(e, 0, 1) * 255).astype(np.uint8),
                           cv2.COLORMAP_INFERNO)[..., ::-1]


def overlay_rgb(image_rgb: np.ndarray, label: np.ndarray, num_classes: int,
                alpha: float = 0.5) -> np.ndarray:
  """Class colours blended over a uint8 RGB image; background left as is."""
  colours = palette(num_classes)[label].astype(np.float32)
  blend = (1 - alpha) * image_rgb.astype(np.float32) + alpha * colours
  out = np.where((label > 0)[..., None], blend, image_rgb)
  return np.round(out).astype(np.uint8)


def grid_png(images, labels, preds, entropies, num_classes: int,
             path: str, scale: int = 1) -> np.ndarray:
  """Rows of image / label / prediction [/ entropy]; returns the RGB grid."""
  pal = palette(num_classes)
  rows = []
  for i in range(len(images)):
    row = [gray_rgb(images[i]), pal[labels[i]], pal[preds[i]]]
    if entropies is not None:
      row.append(uncertainty_rgb(entropies[i], num_classes))
    rows.append(np.concatenate(row, axis=1))
  grid = np.concatenate(rows, axis=0)
  if scale > 1:
    grid = cv2.resize(grid, None, fx=scale, fy=scale,
                      interpolation=cv2.INTER_NEAREST)
  titles = ['image', 'label', 'prediction']
  if entropies is not None:
    titles.append('uncertainty')
  grid = np.concatenate(
      [title_strip(titles, grid.shape[1] // len(titles)), grid], axis=0)
  cv2.imwrite(path, grid[..., ::-1])
  return grid


def title_strip(titles, tile_width: int, height: int = 24) -> np.ndarray:
  """A white strip with one title per ``tile_width`` columns."""
  strip = np.full((height, tile_width * len(titles), 3), 255, np.uint8)
  font_scale = min(0.45, tile_width / 220)
  for i, title in enumerate(titles):
    cv2.putText(strip, title, (i * tile_width + 4, height - 7),
                cv2.FONT_HERSHEY_SIMPLEX, font_scale, (0, 0, 0), 1,
                cv2.LINE_AA)
  return strip


def case_panel(image, label, pred, entropy, num_classes: int, original_size,
               title: str, long_side: int = 384) -> np.ndarray:
  """image / label overlay / prediction overlay [/ uncertainty] of one case,
  shown at the original aspect ratio with the long side ``long_side``."""
  h, w = original_size
  size = (max(1, round(long_side * w / max(h, w))),
          max(1, round(long_side * h / max(h, w))))
  near = lambda x: cv2.resize(x.astype(np.uint8), size,
                              interpolation=cv2.INTER_NEAREST)
  rgb = cv2.resize(gray_rgb(np.asarray(image, np.float32)), size,
                   interpolation=cv2.INTER_LINEAR)
  tiles = [rgb, overlay_rgb(rgb, near(label), num_classes),
           overlay_rgb(rgb, near(pred), num_classes)]
  titles = [title, 'label', 'prediction']
  if entropy is not None:
    tiles.append(uncertainty_rgb(cv2.resize(
        entropy.astype(np.float32), size, interpolation=cv2.INTER_LINEAR),
        num_classes))
    titles.append('uncertainty')
  panel = np.concatenate(tiles, axis=1)
  return np.concatenate([title_strip(titles, size[0]), panel], axis=0)


# ----------------------------------------------------- --mode=visualize


def mask_over(image_rgb: np.ndarray, mask: np.ndarray, colour,
              alpha: float = 0.55) -> np.ndarray:
  """``mask`` pixels tinted with ``colour`` over a uint8 RGB image, so one
  sees which structures a mask covers."""
  out = image_rgb.astype(np.float32)
  on = mask.astype(bool)
  out[on] = (1 - alpha) * out[on] + alpha * np.asarray(colour, np.float32)
  return np.round(out).astype(np.uint8)


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
  rows, notes = [], []
  for idx in cases:
    for epoch in epochs:
      ex = examples.example_at(epoch, idx)
      sigma = perturb.sigma_at(epoch, config.spad)
      scd, bcd = (pipeline.unpack_mask(ex[k], ex['label'].shape)
                  for k in ('scd_bits', 'bcd_bits'))
      union = np.maximum(scd, bcd)
      eps = np.random.default_rng([config.seed, epoch, idx, 1]).standard_normal(
          ex['image'].shape)
      perturbed = ex['image'] + sigma * eps * union[..., None]
      rgb = gray_rgb(ex['image'])
      rows.append(np.concatenate([
          rgb, overlay_rgb(rgb, ex['label'], config.data.num_classes),
          mask_over(rgb, scd, (255, 160, 0)), mask_over(rgb, bcd, (0, 200, 255)),
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
