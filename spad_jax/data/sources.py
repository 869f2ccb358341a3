"""Loads one split of any known data set into memory as arrays.

Both loaders (tf.data and numpy) read from a ``Source``; data sets here are
small enough (thousands of 2-D slices) to hold at training resolution.

Folder data sets are read by the TensorFlow-free numpy reader
(``data.reader = 'numpy'``) or through the TFDS builder of
``tfds_folder.py`` (``'tfds'``); both give identical arrays. Loading the
training split checks every split first, so bad input anywhere stops a run
before training starts; decoded splits are memoised per file state, so the
later loads of a run (evaluation) cost nothing.
"""

import dataclasses
import functools
import os
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from spad_jax.data import folder
from spad_jax.data import synthetic

# Data set names the config may use; all but 'synthetic' read the folder format.
FOLDER_DATASETS = ('folder', 'amdsd', 'cxrs', 'duke_dme')
DATASETS = ('synthetic',) + FOLDER_DATASETS
READERS = ('numpy', 'tfds')


@dataclasses.dataclass(frozen=True)
class Source:
  images: np.ndarray  # float16 [N, H, W, C] in [-1, 1] (float16 halves memory).
  labels: np.ndarray  # uint8 [N, H, W].
  ids: List[str]
  class_names: Sequence[str]
  original_sizes: np.ndarray  # int32 [N, 2]: (height, width) before resizing.

  def __len__(self):
    return len(self.ids)

  def head(self, n: int) -> 'Source':
    """The first ``n`` cases."""
    return dataclasses.replace(self, images=self.images[:n],
                               labels=self.labels[:n], ids=self.ids[:n],
                               original_sizes=self.original_sizes[:n])


def _to_model_range(images01: np.ndarray) -> np.ndarray:
  return (images01.astype(np.float32) * 2.0 - 1.0).astype(np.float16)


def split_params(d) -> Tuple:
  """What decides the folder split: ``(seed, val, test, num_folds, fold)``."""
  return (int(d.split_seed), float(d.val_fraction), float(d.test_fraction),
          int(d.num_folds), int(d.fold))


def folder_splits(config) -> Tuple[List[str], Dict[str, List[dict]]]:
  """Class names and the cases of every split of a folder data set.

  Raises ``DataError`` for a bad dataset.json or a class list that does not
  match the config.
  """
  d = config.data
  if not d.root:
    raise folder.DataError(f'config.data.root must point at the {d.name} data '
                           'set in the folder format (see docs/DATA.md)')
  meta = folder.read_metadata(d.root)
  names = folder.check_classes(meta, os.path.join(d.root, 'dataset.json'),
                               d.num_classes, tuple(d.class_names))
  return names, folder.split_cases(meta, *split_params(d))


def _require_cases(root: str, splits: Dict[str, List[dict]],
                   needed: Sequence[str]) -> None:
  for name in dict.fromkeys(needed):
    if not splits[name]:
      raise folder.DataError(
          f'{os.path.join(root, "dataset.json")}: split {name!r} is empty '
          f'(sizes: { {k: len(v) for k, v in splits.items()} }); check '
          'data.val_fraction / data.test_fraction / data.num_folds, the '
          'explicit "split" entries of the cases, and eval.split' +
          ('; validation during training needs val cases, or '
           '--config.train.eval_every_epochs=0 trains without'
           if name == 'val' else ''))


def _stamp(root: str, ids: Sequence[str]) -> Optional[Tuple]:
  """(mtime, size) of every file of the split; None if one is missing."""
  paths = [os.path.join(root, 'dataset.json')]
  for case_id in ids:
    paths.extend(folder.case_paths(root, case_id))
  try:
    return tuple((s.st_mtime_ns, s.st_size) for s in map(os.stat, paths))
  except OSError:
    return None


@functools.lru_cache(maxsize=6)
def _read_folder(reader: str, root: str, split: str, ids: Tuple[str, ...],
                 names: Tuple[str, ...], size: int, channels: int,
                 num_classes: int, num_workers: int, tfds_dir: str,
                 params: Tuple, stamp) -> Source:
  """One split, decoded and resized; memoised on the files' state (``stamp``)."""
  del stamp  # Only part of the cache key: changed files are read again.
  if reader == 'tfds':
    from spad_jax.data import tfds_folder  # pylint: disable=g-import-not-at-top
    got_ids, images, labels, sizes = tfds_folder.read_split(
        root, split, params, size, channels, num_classes, tfds_dir)
    if tuple(got_ids) != ids:
      raise folder.DataError(f'{tfds_dir}: the prepared TFDS split {split!r} '
                             f'of {root} does not hold the expected cases')
  else:
    images, labels, sizes = folder.load_cases(
        root, [{'id': i} for i in ids], size, channels, num_classes,
        num_workers)
  return Source(images=_to_model_range(images), labels=labels, ids=list(ids),
                class_names=list(names), original_sizes=sizes)


def _load_folder_split(config, split: str, cases: Sequence[dict],
                       names: Sequence[str]) -> Source:
  d = config.data
  root = os.path.abspath(d.root)
  ids = tuple(c['id'] for c in cases)
  args = (d.reader, root, split, ids, tuple(names), d.image_size, d.channels,
          d.num_classes, d.num_workers, d.tfds_dir, split_params(d))
  stamp = _stamp(root, ids)
  if stamp is None:  # A file is missing: read without caching (it raises).
    return _read_folder.__wrapped__(*args, stamp)
  return _read_folder(*args, stamp)


def load_split(config, split: str) -> Source:
  """Returns the cases of ``split`` ('train', 'val' or 'test') of ``config.data``.

  For folder data sets, ``split = 'train'`` first reads and checks every
  split (and that the splits a run uses are not empty: ``eval.split``, and
  ``val`` when ``train.eval_every_epochs`` validates), so no training starts
  on data that would fail later.
  """
  d = config.data
  if d.name == 'synthetic':
    n = {'train': d.synthetic.num_train, 'val': d.synthetic.num_val,
         'test': d.synthetic.num_test}[split]
    images, labels = synthetic.make_split(d.synthetic.seed, split, n,
                                          d.image_size)
    if d.channels != 1:
      images = np.repeat(images, d.channels, axis=-1)
    return Source(images=_to_model_range(images / 255.0), labels=labels,
                  ids=[f'synthetic_{split}_{i:05d}' for i in range(n)],
                  class_names=synthetic.CLASS_NAMES,
                  original_sizes=np.full((n, 2), d.image_size, np.int32))
  if d.name not in FOLDER_DATASETS:
    raise ValueError(f'config.data.name: unknown data set {d.name!r}; '
                     f'expected one of {DATASETS}')
  if d.reader not in READERS:
    raise ValueError(f'config.data.reader: unknown reader {d.reader!r}; '
                     f'expected one of {READERS}')
  names, splits = folder_splits(config)
  if split == 'train':
    needed = ['train', config.eval.split]
    if config.train.get('eval_every_epochs', 0):  # Validation during training.
      needed.append(config.train.get('val_split', 'val'))
    _require_cases(d.root, splits, needed)
    loaded = {s: _load_folder_split(config, s, splits[s], names)
              for s in folder.SPLITS if splits[s]}
    return loaded['train']
  _require_cases(d.root, splits, (split,))
  return _load_folder_split(config, split, splits[split], names)


def check_data(config) -> None:
  """Reads and checks the whole data set of ``config`` (no-op for synthetic).

  Meant to run before a workdir is touched; raises ``DataError`` naming the
  file and the problem. Later ``load_split`` calls reuse what it decoded.
  """
  if config.data.name != 'synthetic':
    load_split(config, 'train')
