"""Reader for the folder format of DESIGN §3 (numpy/OpenCV only, no TensorFlow).

    <root>/images/<case>.png   uint8/uint16 gray or RGB
    <root>/labels/<case>.png   uint8 class index per pixel
    <root>/dataset.json        {"name", "labels": {"background": 0, ...},
                                "cases": [{"id", "patient"?, "split"?}, ...]}

Every problem raises ``DataError`` naming the file and what is wrong.
"""

import json
import os
from typing import Dict, List, Sequence

import cv2
import numpy as np


class DataError(ValueError):
  """Bad input data; the message names the file and the problem."""


def read_metadata(root: str) -> dict:
  path = os.path.join(root, 'dataset.json')
  if not os.path.isdir(root):
    raise DataError(f'data.root {root!r} is not a directory')
  if not os.path.isfile(path):
    raise DataError(f'{path}: missing (every folder data set needs dataset.json)')
  try:
    with open(path) as f:
      meta = json.load(f)
  except json.JSONDecodeError as e:
    raise DataError(f'{path}: not valid JSON ({e})') from e
  for key, kind in (('labels', dict), ('cases', list)):
    if not isinstance(meta.get(key), kind):
      raise DataError(f'{path}: key {key!r} must be a {kind.__name__}')
  values = sorted(meta['labels'].values())
  if values != list(range(len(values))):
    raise DataError(f'{path}: label values must be 0..K-1, got {values}')
  ids = set()
  for i, case in enumerate(meta['cases']):
    if not isinstance(case, dict) or not isinstance(case.get('id'), str):
      raise DataError(f'{path}: cases[{i}] needs a string "id"')
    if case['id'] in ids:
      raise DataError(f'{path}: case id {case["id"]!r} appears twice')
    ids.add(case['id'])
  return meta


def split_cases(meta: dict, split_seed: int, val_fraction: float,
                test_fraction: float) -> Dict[str, List[dict]]:
  """Deterministic split by patient (case when no patient is given).

  An explicit ``"split"`` of a case wins. Groups (patients) are shuffled with
  ``split_seed`` and the first fractions go to test, then val.
  """
  out = {'train': [], 'val': [], 'test': []}
  free = []
  for case in meta['cases']:
    if 'split' in case:
      if case['split'] not in out:
        raise DataError(f'dataset.json: case {case["id"]!r} has unknown split '
                        f'{case["split"]!r}; expected one of {list(out)}')
      out[case['split']].append(case)
    else:
      free.append(case)
  groups = sorted({str(c.get('patient', c['id'])) for c in free})
  order = np.random.default_rng(split_seed).permutation(len(groups))
  n_test = int(round(test_fraction * len(groups)))
  n_val = int(round(val_fraction * len(groups)))
  group_split = {}
  for rank, g in enumerate(order):
    split = ('test' if rank < n_test else
             'val' if rank < n_test + n_val else 'train')
    group_split[groups[g]] = split
  for case in free:
    out[group_split[str(case.get('patient', case['id']))]].append(case)
  return out


def _read(path: str, flags: int) -> np.ndarray:
  if not os.path.isfile(path):
    raise DataError(f'{path}: missing')
  array = cv2.imread(path, flags)
  if array is None:
    raise DataError(f'{path}: unreadable or corrupt image')
  return array


def read_image(path: str, channels: int) -> np.ndarray:
  """Image as float32 ``[H, W, channels]`` in [0, 1] (8- or 16-bit input)."""
  image = _read(path, cv2.IMREAD_UNCHANGED)
  scale = {np.dtype(np.uint8): 255.0, np.dtype(np.uint16): 65535.0}.get(
      image.dtype)
  if scale is None:
    raise DataError(f'{path}: unsupported pixel type {image.dtype}')
  image = image.astype(np.float32) / scale
  if image.ndim == 3 and image.shape[2] == 4:
    image = image[..., :3]
  if image.ndim == 3:
    image = image[..., ::-1]  # OpenCV reads BGR.
  if channels == 1 and image.ndim == 3:
    image = image @ np.array([0.299, 0.587, 0.114], np.float32)
  if image.ndim == 2:
    image = np.repeat(image[..., None], channels, axis=-1)
  if image.shape[-1] != channels:
    raise DataError(f'{path}: has {image.shape[-1]} channels, config '
                    f'data.channels = {channels}')
  return image


def read_label(path: str, num_classes: int) -> np.ndarray:
  label = _read(path, cv2.IMREAD_UNCHANGED)
  if label.ndim != 2:
    raise DataError(f'{path}: a label must be a single-channel class-index '
                    f'image, got shape {label.shape}')
  top = int(label.max()) if label.size else 0
  if top >= num_classes:
    raise DataError(f'{path}: label value {top} >= data.num_classes '
                    f'({num_classes})')
  return label.astype(np.uint8)


def load_cases(root: str, cases: Sequence[dict], size: int, channels: int,
               num_classes: int):
  """Reads and resizes cases: images uint8-range float ``[N, size, size, C]``.

  Images are resized with area interpolation (bilinear when enlarging),
  labels with nearest neighbour. Returns ``(images float32 in [0, 1],
  labels uint8, original sizes [N, 2])``.
  """
  images, labels, sizes = [], [], []
  for case in cases:
    ipath = os.path.join(root, 'images', case['id'] + '.png')
    lpath = os.path.join(root, 'labels', case['id'] + '.png')
    image = read_image(ipath, channels)
    label = read_label(lpath, num_classes)
    if image.shape[:2] != label.shape:
      raise DataError(f'{lpath}: size {label.shape} differs from its image '
                      f'{ipath} {image.shape[:2]}')
    sizes.append(label.shape)
    interp = (cv2.INTER_AREA if image.shape[0] >= size and
              image.shape[1] >= size else cv2.INTER_LINEAR)
    image = cv2.resize(image, (size, size), interpolation=interp)
    if image.ndim == 2:
      image = image[..., None]
    images.append(image)
    labels.append(cv2.resize(label, (size, size),
                             interpolation=cv2.INTER_NEAREST))
  return (np.stack(images).astype(np.float32), np.stack(labels),
          np.asarray(sizes, np.int32))
