"""Reader for the folder format of DESIGN §3 (numpy/OpenCV only, no TensorFlow).

    <root>/images/<case>.png   uint8/uint16 gray or RGB
    <root>/labels/<case>.png   uint8 class index per pixel
    (or <case>.nii / <case>.nii.gz: 2D NIfTI-1, see ``nifti.py``)
    <root>/dataset.json        {"name", "labels": {"background": 0, ...},
                                "cases": [{"id", "patient"?, "split"?}, ...]}

Every problem raises ``DataError`` naming the file (or dataset.json key) and
what is wrong. Reading is separated from preprocessing (``raw`` arrays as
stored vs resized model inputs) so the TFDS builder, which stores the raw
arrays, preprocesses with exactly the same functions.
"""

import concurrent.futures
import json
import os
import re
from typing import Dict, List, Sequence, Tuple

import cv2
import numpy as np

from spad_jax.data import nifti

SPLITS = ('train', 'val', 'test')
_GRAY_WEIGHTS = np.array([0.299, 0.587, 0.114], np.float32)  # ITU-R BT.601.
_SCALES = {np.dtype(np.uint8): 255.0, np.dtype(np.uint16): 65535.0}
# Case ids become file names: no path separators, no hidden or parent names.
_SAFE_ID = re.compile(r'^[A-Za-z0-9_\-][A-Za-z0-9_.\-]*$')


class DataError(ValueError):
  """Bad input data; the message names the file and the problem."""


def _is_int(x) -> bool:
  return isinstance(x, int) and not isinstance(x, bool)


def _check_schema(meta, path: str) -> None:
  """Raises ``DataError`` for the first schema problem of dataset.json."""
  if not isinstance(meta, dict):
    raise DataError(f'{path}: top level must be a JSON object, got '
                    f'{type(meta).__name__}')
  if not isinstance(meta.get('name'), str) or not meta['name']:
    raise DataError(f'{path}: key "name" must be a non-empty string')
  labels = meta.get('labels')
  if not isinstance(labels, dict) or len(labels) < 2:
    raise DataError(f'{path}: key "labels" must be an object mapping at least '
                    'two class names (background included) to 0..K-1')
  for name, value in labels.items():
    if not name or not _is_int(value):
      raise DataError(f'{path}: labels[{name!r}] = {value!r}: class names '
                      'must be non-empty and values integers')
  values = sorted(labels.values())
  if values != list(range(len(values))):
    raise DataError(f'{path}: "labels" values must be 0..K-1 without gaps or '
                    f'repeats, got {values}')
  cases = meta.get('cases')
  if not isinstance(cases, list) or not cases:
    raise DataError(f'{path}: key "cases" must be a non-empty list')
  ids = set()
  for i, case in enumerate(cases):
    where = f'{path}: cases[{i}]'
    if not isinstance(case, dict) or not isinstance(case.get('id'), str):
      raise DataError(f'{where} needs a string "id"')
    if not _SAFE_ID.match(case['id']):
      raise DataError(f'{where}: id {case["id"]!r} is not a plain file name '
                      '(letters, digits, "_", "-", "."; no path separators)')
    if case['id'] in ids:
      raise DataError(f'{where}: case id {case["id"]!r} appears twice')
    ids.add(case['id'])
    if 'patient' in case and not (
        (isinstance(case['patient'], str) and case['patient']) or
        _is_int(case['patient'])):
      raise DataError(f'{where} ({case["id"]!r}): "patient" must be a '
                      f'non-empty string or an integer, got '
                      f'{case["patient"]!r}')
    if 'split' in case and case['split'] not in SPLITS:
      raise DataError(f'{where} ({case["id"]!r}): unknown split '
                      f'{case["split"]!r}; expected one of {list(SPLITS)}')


def read_metadata(root: str) -> dict:
  """dataset.json of ``root``, checked against the schema above."""
  path = os.path.join(root, 'dataset.json')
  if not os.path.isdir(root):
    raise DataError(f'data.root {root!r} is not a directory')
  if not os.path.isfile(path):
    raise DataError(f'{path}: missing (every folder data set needs dataset.json)')
  try:
    with open(path) as f:
      meta = json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise DataError(f'{path}: not valid JSON ({e})') from e
  _check_schema(meta, path)
  return meta


def class_names(meta: dict) -> List[str]:
  """Class names ordered by their label value."""
  return [n for n, _ in sorted(meta['labels'].items(), key=lambda kv: kv[1])]


def _norm(name: str) -> str:
  # 'IS/OS', 'is_os' and 'isos' name the same class.
  return re.sub(r'[^a-z0-9]', '', name.lower())


def check_classes(meta: dict, path: str, num_classes: int,
                  expected: Sequence[str] = ()) -> List[str]:
  """The class names, after checking them against the config."""
  names = class_names(meta)
  if len(names) != num_classes:
    raise DataError(f'{path}: declares {len(names)} classes {names}, but '
                    f'config.data.num_classes = {num_classes}')
  if expected and [_norm(n) for n in names] != [_norm(n) for n in expected]:
    raise DataError(f'{path}: classes {names} differ from '
                    f'config.data.class_names = {list(expected)} (order '
                    'matters: the label value is the index)')
  return names


def _group(case: dict) -> str:
  # Prefixes keep a patient id from colliding with a case id.
  return f'p:{case["patient"]}' if 'patient' in case else f'c:{case["id"]}'


def assign_groups(groups: Sequence[str], split_seed: int, val_fraction: float,
                  test_fraction: float, num_folds: int = 0,
                  fold: int = 0) -> Dict[str, str]:
  """Maps each group (patient) to 'train', 'val' or 'test'.

  The groups are shuffled with ``split_seed``. Without folds the first
  ``test_fraction`` of them go to test, the next ``val_fraction`` to val.
  With ``num_folds`` the shuffled groups are cut into that many contiguous
  folds; fold ``fold`` is the test set, and val takes ``val_fraction`` of all
  groups from the rest (so every group is tested in exactly one fold).
  """
  order = [groups[i] for i in
           np.random.default_rng(split_seed).permutation(len(groups))]
  n_val = int(round(val_fraction * len(groups)))
  if num_folds:
    if num_folds > len(groups):
      raise DataError(f'data.num_folds = {num_folds} exceeds the {len(groups)} '
                      'patients (or cases) available for splitting')
    chunks = np.array_split(np.arange(len(order)), num_folds)
    test = {order[r] for r in chunks[fold]}
    rest = [g for g in order if g not in test]
    out = {g: 'test' for g in test}
    out.update({g: 'val' if r < n_val else 'train' for r, g in enumerate(rest)})
    return out
  n_test = int(round(test_fraction * len(groups)))
  return {g: ('test' if r < n_test else 'val' if r < n_test + n_val else
              'train') for r, g in enumerate(order)}


def split_cases(meta: dict, split_seed: int, val_fraction: float,
                test_fraction: float, num_folds: int = 0,
                fold: int = 0) -> Dict[str, List[dict]]:
  """Deterministic split by patient (by case when no patient is given).

  An explicit ``"split"`` of a case wins; the other cases are split by
  ``assign_groups``. Case order within a split follows dataset.json.
  """
  out = {s: [] for s in SPLITS}
  free = [c for c in meta['cases'] if 'split' not in c]
  groups = sorted({_group(c) for c in free})
  group_split = assign_groups(groups, split_seed, val_fraction, test_fraction,
                              num_folds, fold)
  for case in meta['cases']:
    out[case['split'] if 'split' in case else
        group_split[_group(case)]].append(case)
  return out


EXTENSIONS = ('.png', '.nii', '.nii.gz')


def _existing(stem: str) -> str:
  """``stem`` + the first extension that exists (``.png`` when none does,
  so a missing file is reported under the usual name)."""
  for ext in EXTENSIONS:
    if os.path.isfile(stem + ext):
      return stem + ext
  return stem + '.png'


def case_paths(root: str, case_id: str) -> Tuple[str, str]:
  return (_existing(os.path.join(root, 'images', case_id)),
          _existing(os.path.join(root, 'labels', case_id)))


def _is_nifti(path: str) -> bool:
  return path.lower().endswith(('.nii', '.nii.gz'))


def _read(path: str, flags: int) -> np.ndarray:
  if not os.path.isfile(path):
    raise DataError(f'{path}: missing')
  if _is_nifti(path):
    try:
      return nifti.read(path)
    except nifti.NiftiError as e:
      raise DataError(f'{path}: {e}') from e
  array = cv2.imread(path, flags)
  if array is None:
    raise DataError(f'{path}: unreadable or corrupt image')
  return array


def _nifti_to_uint16(array: np.ndarray, path: str) -> np.ndarray:
  """8/16-bit NIfTI pixels as stored; any other type (CT's int16, floats)
  min-max scaled per image to the full 16-bit range."""
  if array.dtype in _SCALES:
    return array
  array = array.astype(np.float64)
  if not np.isfinite(array).all():
    raise DataError(f'{path}: NaN or infinite pixel values')
  lo, hi = array.min(), array.max()
  scaled = (array - lo) / (hi - lo) if hi > lo else np.zeros_like(array)
  return np.round(scaled * 65535).astype(np.uint16)


def read_raw_image(path: str) -> np.ndarray:
  """The stored pixels: uint8/uint16 ``[H, W, 1 | 3]``, RGB order, no alpha."""
  image = _read(path, cv2.IMREAD_UNCHANGED)
  if _is_nifti(path):
    return np.ascontiguousarray(_nifti_to_uint16(image, path)[..., None])
  if image.dtype not in _SCALES:
    raise DataError(f'{path}: unsupported pixel type {image.dtype} (expected '
                    '8- or 16-bit)')
  if image.ndim == 2:
    image = image[..., None]
  channels = image.shape[2]
  if channels == 2:  # Gray + alpha.
    image = image[..., :1]
  elif channels in (3, 4):  # OpenCV reads BGR(A).
    image = image[..., 2::-1]
  elif channels != 1:
    raise DataError(f'{path}: {channels} channels; expected gray or RGB')
  return np.ascontiguousarray(image)


def image_to_unit(raw: np.ndarray, channels: int, path: str) -> np.ndarray:
  """Raw pixels to float32 ``[H, W, channels]`` in [0, 1]."""
  image = raw.astype(np.float32) / _SCALES[raw.dtype]
  if image.shape[2] == 3 and channels == 1:
    image = (image @ _GRAY_WEIGHTS)[..., None]
  elif image.shape[2] == 1 and channels != 1:
    image = np.repeat(image, channels, axis=-1)
  if image.shape[2] != channels:
    raise DataError(f'{path}: has {image.shape[2]} channels, config '
                    f'data.channels = {channels}')
  return image


def read_image(path: str, channels: int) -> np.ndarray:
  """Image as float32 ``[H, W, channels]`` in [0, 1] (8- or 16-bit input)."""
  return image_to_unit(read_raw_image(path), channels, path)


def check_label(label: np.ndarray, num_classes: int, path: str) -> np.ndarray:
  """The label as uint8 after checking it is a map of class indices."""
  if label.ndim != 2:
    raise DataError(f'{path}: a label must be a single-channel class-index '
                    f'image, got shape {label.shape} (scripts/'
                    'convert_to_folder.py converts other masks)')
  bad = np.unique(label[label >= num_classes]) if label.size else []
  if len(bad):
    raise DataError(f'{path}: label values {bad.tolist()[:10]} outside the '
                    f'declared classes 0..{num_classes - 1}')
  return label.astype(np.uint8)


def read_label(path: str, num_classes: int) -> np.ndarray:
  label = _read(path, cv2.IMREAD_UNCHANGED)
  if _is_nifti(path):  # Any numeric type, but whole non-negative values.
    if (not np.isfinite(label).all() or (label < 0).any() or
        (label != np.round(label)).any()):
      raise DataError(f'{path}: label values must be whole numbers >= 0')
    label = label.astype(np.int64)
  return check_label(label, num_classes, path)


def check_pair(image_hw, label_hw, ipath: str, lpath: str) -> None:
  if tuple(image_hw) != tuple(label_hw):
    raise DataError(f'{lpath}: size {tuple(label_hw)} differs from its image '
                    f'{ipath} {tuple(image_hw)}')


def resize_pair(image: np.ndarray, label: np.ndarray,
                size: int) -> Tuple[np.ndarray, np.ndarray]:
  """Image (float ``[H, W, C]``) by area (bilinear when enlarging), label by
  nearest neighbour, both to ``size x size``."""
  interp = (cv2.INTER_AREA if image.shape[0] >= size and
            image.shape[1] >= size else cv2.INTER_LINEAR)
  resized = cv2.resize(image, (size, size), interpolation=interp)
  if resized.ndim == 2:  # OpenCV drops a single channel axis.
    resized = resized[..., None]
  return resized, cv2.resize(label, (size, size),
                             interpolation=cv2.INTER_NEAREST)


def load_case(root: str, case_id: str, size: int, channels: int,
              num_classes: int):
  """One case, checked and resized: ``(image [size, size, C] in [0, 1],
  label uint8 [size, size], original (H, W))``."""
  ipath, lpath = case_paths(root, case_id)
  for path in (ipath, lpath):  # Name the missing partner before decoding.
    if not os.path.isfile(path):
      raise DataError(f'{path}: missing (every case needs images/{case_id}'
                      f'.png and labels/{case_id}.png, or .nii / .nii.gz)')
  image = read_image(ipath, channels)
  label = read_label(lpath, num_classes)
  check_pair(image.shape[:2], label.shape, ipath, lpath)
  return resize_pair(image, label, size) + (label.shape,)


def load_cases(root: str, cases: Sequence[dict], size: int, channels: int,
               num_classes: int, num_workers: int = 1):
  """Reads and resizes cases (in parallel threads; OpenCV releases the GIL).

  Returns ``(images float32 [N, size, size, C] in [0, 1], labels uint8
  [N, size, size], original sizes int32 [N, 2])``. The first bad case in
  ``cases`` order raises, so the error is the same for any ``num_workers``.
  """
  def one(case):
    return load_case(root, case['id'], size, channels, num_classes)

  pool = concurrent.futures.ThreadPoolExecutor(max(1, num_workers))
  try:
    items = list(pool.map(one, cases))
  finally:
    pool.shutdown(cancel_futures=True)  # After an error, skip the rest.
  return (np.stack([it[0] for it in items]).astype(np.float32),
          np.stack([it[1] for it in items]),
          np.asarray([it[2] for it in items], np.int32))
