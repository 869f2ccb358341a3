"""Loads one split of any known data set into memory as arrays.

Both loaders (tf.data and numpy) read from a ``Source``; data sets here are
small enough (thousands of 2-D slices) to hold at training resolution.
"""

import dataclasses
import os
from typing import List, Sequence

import numpy as np

from spad_jax.data import folder
from spad_jax.data import synthetic

# Data set names the config may use; all but 'synthetic' read the folder format.
FOLDER_DATASETS = ('folder', 'amdsd', 'cxrs', 'duke_dme')
DATASETS = ('synthetic',) + FOLDER_DATASETS


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


def load_split(config, split: str) -> Source:
  """Returns the cases of ``split`` ('train', 'val' or 'test') of ``config.data``."""
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
  if not d.root:
    raise folder.DataError(f'config.data.root must point at the {d.name} data '
                           'set in the folder format (see README)')
  meta = folder.read_metadata(d.root)
  names = [n for n, _ in sorted(meta['labels'].items(), key=lambda kv: kv[1])]
  if len(names) != d.num_classes:
    raise folder.DataError(
        f'{os.path.join(d.root, "dataset.json")}: declares {len(names)} classes '
        f'{names}, but config.data.num_classes = {d.num_classes}')
  cases = folder.split_cases(meta, d.split_seed, d.val_fraction,
                             d.test_fraction)[split]
  if not cases:
    raise folder.DataError(f'{d.root}: split {split!r} is empty (check '
                           'data.val_fraction / data.test_fraction and the '
                           'cases in dataset.json)')
  images, labels, sizes = folder.load_cases(d.root, cases, d.image_size,
                                            d.channels, d.num_classes)
  return Source(images=_to_model_range(images), labels=labels,
                ids=[c['id'] for c in cases], class_names=names,
                original_sizes=sizes)
