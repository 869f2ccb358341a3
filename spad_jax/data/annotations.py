"""Several annotations per case (inter-rater variability), folder format.

    <root>/labels/<case>.png                the reference annotation (used for
                                            training and the usual metrics)
    <root>/annotations/<rater>/<case>.png   further annotations, one folder
                                            per rater; a rater may skip cases

A case's annotation set is its reference label plus every
``annotations/*/<case>.png`` present, each the same size as the reference
label and with the same class indices. Evaluation compares the model's
samples with these sets (generalized energy distance, per-pixel variances).
"""

import glob
import os
from typing import Dict, List, Sequence

import cv2
import numpy as np

from spad_jax.data import folder
from spad_jax.data import sources

ANNOTATIONS_DIR = 'annotations'


def rater_paths(root: str, case_id: str) -> List[str]:
  """The other raters' maps of a case (``annotations/*/<case>.png``), sorted."""
  return sorted(glob.glob(os.path.join(glob.escape(root), ANNOTATIONS_DIR,
                                       '*', glob.escape(case_id) + '.png')))


def load_sets(root: str, ids: Sequence[str], original_sizes: np.ndarray,
              reference: np.ndarray, num_classes: int) -> Dict[str, np.ndarray]:
  """``{case: uint8 [M, H, W]}``, reference label first, for the cases with
  further annotations; these are resized to the reference's (model) size
  with nearest neighbour, as the reference labels were.

  ``original_sizes`` ``[N, 2]`` and ``reference`` ``[N, H, W]`` are the
  split's (a ``Source``'s ``original_sizes`` and ``labels``).
  """
  out = {}
  for i, case_id in enumerate(ids):
    maps = [reference[i]]
    for path in rater_paths(root, case_id):
      m = folder.read_label(path, num_classes)
      if m.shape != tuple(original_sizes[i]):
        raise folder.DataError(
            f'{path}: size {m.shape} differs from the reference label of '
            f'case {case_id!r} {tuple(int(v) for v in original_sizes[i])}')
      maps.append(cv2.resize(m, reference.shape[1:][::-1],
                             interpolation=cv2.INTER_NEAREST))
    if len(maps) > 1:
      out[case_id] = np.stack(maps)
  return out


def for_source(config, source: sources.Source) -> Dict[str, np.ndarray]:
  """The annotation sets of a split's cases; empty unless ``config.data`` is
  a folder data set with an ``annotations/`` directory."""
  d = config.data
  if (d.name not in sources.FOLDER_DATASETS or
      not os.path.isdir(os.path.join(d.root, ANNOTATIONS_DIR))):
    return {}
  return load_sets(d.root, source.ids, source.original_sizes, source.labels,
                   d.num_classes)
