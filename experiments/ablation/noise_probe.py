"""Does a model read SPAD's training noise as the structure it marks?

ScD and BcD put noise where the label has a target or an edge, so during
training the noise itself says where the label is. While PaS shrinks it the
model must still learn the image; without PaS (σ stays σ0) a model can learn
to find the noise instead, and then finds nothing on clean images. This
probe tests that on a finished run's test split with three versions of
every image:

  clean       the images as evaluated;
  on_target   noise of std ``spad.sigma0`` inside the ScD mask (every
              target, the config's anchor ratio) ∪ the BcD band of the
              image's own label: what the first epoch of training sees;
  off_target  the same masks moved by half the image in both directions,
              kept on background only: the noise where there is nothing.

Per version it keeps the confusion counts, and how many of the off-target
pixels are predicted as foreground: a model that reads noise as structure
predicts foreground there on ``off_target`` and not on ``clean``. Every
arm's runs get the same masks and noise for the same images, so arms compare
on equal terms. Written to ``<workdir>/noise_probe.json``, with
``noise_probe.png`` showing two cases in every version.
"""

import json
import os
import time
from typing import Any, Dict, Sequence, Tuple

import numpy as np

VERSIONS = ('clean', 'on_target', 'off_target')
FILE = 'noise_probe.json'


def probe_masks(labels: np.ndarray, config, seed: int
                ) -> Tuple[np.ndarray, np.ndarray]:
  """``(on, off)`` uint8 ``[N, H, W]``: the ScD ∪ BcD mask of every label
  (all its targets chosen, ``spad.anchor_ratio`` of them kept clean) and
  that mask rolled by half the image, minus every foreground pixel."""
  from spad_jax import perturb  # pylint: disable=g-import-not-at-top
  s, k = config.spad, config.data.num_classes
  on = np.zeros(labels.shape, np.uint8)
  for i, label in enumerate(labels):
    targets = perturb.target_pixels(label, k, s.components)
    key = np.random.default_rng([seed, i]).integers(2**63, dtype=np.uint64)
    if targets:
      on[i] = perturb.scd_mask(label, k, len(targets), s.anchor_ratio, None,
                               targets=targets, anchor_patch=s.anchor_patch,
                               key=key)
    on[i] |= perturb.boundary_band(label, k, s.band_width, s.canny_low,
                                   s.canny_high, s.bcd_per_class,
                                   s.bcd_complete)
  h, w = labels.shape[1:]
  off = np.roll(on, (h // 2, w // 2), axis=(1, 2)) * (labels == 0)
  return on, off.astype(np.uint8)


def add_noise(images: np.ndarray, mask: np.ndarray, sigma: float,
              seed: int) -> np.ndarray:
  """``images + σ·ε·mask`` (``images`` ``[N, H, W, C]``, ``mask``
  ``[N, H, W]``), ε ~ N(0, 1) drawn from ``seed``, as in the train step's
  ``perturb.perturb_image``; pixels outside the mask are returned as they
  are."""
  eps = np.random.default_rng(seed).standard_normal(images.shape)
  noisy = images.astype(np.float32) + np.float32(sigma) * eps.astype(
      np.float32) * mask[..., None]
  return noisy.astype(images.dtype)


def tally(preds: np.ndarray, labels: np.ndarray, off: np.ndarray,
          num_classes: int) -> Dict[str, Any]:
  """Confusion counts (rows label) and the off-target pixels predicted as
  any foreground class."""
  from spad_jax import metrics  # pylint: disable=g-import-not-at-top
  inside = off.astype(bool)
  return {'confusion': metrics.confusion_counts(preds, labels,
                                                num_classes).tolist(),
          'off_pixels': int(inside.sum()),
          'off_foreground': int((preds[inside] > 0).sum())}


def probe(config, workdir: str) -> Dict[str, Any]:
  """Samples the test split of ``workdir``'s model in every version (the
  checkpoint and sampling of its evaluation, the chain label picked on the
  clean validation split); writes and returns ``noise_probe.json``."""
  import dataclasses  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  from spad_jax import evaluate  # pylint: disable=g-import-not-at-top
  from spad_jax import files  # pylint: disable=g-import-not-at-top
  from spad_jax import train_state  # pylint: disable=g-import-not-at-top
  if jax.process_count() > 1:  # Each process would tally its own cases.
    raise ValueError('the noise probe runs in one process; run it without '
                     'jax.distributed')
  begin = time.time()
  setup = train_state.Setup.from_config(config)
  state = train_state.load_eval_state(config, workdir, setup)
  config, pick = evaluate.resolve_chain_label(config, state.ema_params, setup)
  source = evaluate.load_eval_source(config, config.eval.split)
  on, off = probe_masks(source.labels, config, config.seed)
  sigma = float(config.spad.sigma0)
  images = {'clean': source.images,
            'on_target': add_noise(source.images, on, sigma, config.seed),
            'off_target': add_noise(source.images, off, sigma, config.seed)}
  out = {'split': config.eval.split, 'sigma': sigma,
         'checkpoint_step': int(jax.device_get(state.step)),
         'chain_label': (pick or {}).get('picked'),
         'num_cases': len(source), 'on_pixels': int(on.sum()), 'versions': {}}
  preds = {}
  for version in VERSIONS:
    preds[version] = np.zeros(source.labels.shape, np.uint8)

    def keep(index, outputs, version=version):
      preds[version][index] = outputs['prediction']

    evaluate.sample_split(config, state.ema_params, setup,
                          dataclasses.replace(source, images=images[version]),
                          on_case=keep)
    out['versions'][version] = tally(preds[version], source.labels, off,
                                     config.data.num_classes)
  out['seconds'] = time.time() - begin
  examples_png(os.path.join(workdir, 'noise_probe.png'), images, preds,
               source, config.data.num_classes)
  files.write_json(os.path.join(workdir, FILE), out)
  return out


def examples_png(path: str, images: Dict[str, np.ndarray],
                 preds: Dict[str, np.ndarray], source, num_classes: int,
                 num_cases: int = 2) -> None:
  """For the ``num_cases`` cases with the most foreground: each version's
  image, label and prediction, one row per version."""
  import cv2  # pylint: disable=g-import-not-at-top
  from spad_jax import visualize  # pylint: disable=g-import-not-at-top
  order = np.argsort(-(source.labels > 0).sum(axis=(1, 2)), kind='stable')
  rows = [visualize.case_panel(images[v][i], source.labels[i], preds[v][i],
                               None, num_classes, source.original_sizes[i],
                               f'{source.ids[i]}: {v}', long_side=256)
          for i in order[:num_cases] for v in VERSIONS]
  cv2.imwrite(path, np.concatenate(rows, axis=0)[..., ::-1])


def read(workdir: str):
  """A run's noise_probe.json, or None."""
  path = os.path.join(workdir, FILE)
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def done(workdir: str) -> bool:
  """Whether the run's noise_probe.json holds every version."""
  found = read(workdir)
  return found is not None and set(VERSIONS) <= set(
      found.get('versions', {}))


def pooled(probes: Sequence[Dict[str, Any]]) -> Dict[str, Any]:
  """Per version over ``probes`` (runs of one arm): the foreground mDice of
  the summed confusion counts and the share of off-target pixels predicted
  as foreground."""
  from spad_jax import metrics  # pylint: disable=g-import-not-at-top
  out = {'runs': len(probes)}
  for version in VERSIONS:
    conf = sum(np.asarray(p['versions'][version]['confusion'], np.int64)
               for p in probes)
    names = [str(c) for c in range(conf.shape[0])]
    pixels = sum(p['versions'][version]['off_pixels'] for p in probes)
    fg = sum(p['versions'][version]['off_foreground'] for p in probes)
    out[version] = {'mDice': metrics.summarize_confusion(conf,
                                                         names)['mDice'],
                    'off_foreground': fg / pixels if pixels else None}
  return out
