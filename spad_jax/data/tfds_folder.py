"""The folder format of DESIGN §3 as a TFDS data set (``data.reader = 'tfds'``).

``SpadFolder`` is a ``tfds.core.GeneratorBasedBuilder``. Each (data set
files, split settings) pair is one builder config, prepared once into
TFRecords under ``<data_dir>/spad_folder/<name>_<fingerprint>/1.0.0`` and
reused afterwards (``tfds``' own caching); its TFDS splits are this
project's ``train`` / ``val`` / ``test`` (patient-level, explicit ``split``
wins, k-fold), empty ones left out. Any TF code can read a prepared copy with
``tfds.builder_from_directory(path)`` without this module.

Examples hold the *raw* stored pixels (uint8/uint16 widened to uint16, plus
``max_value``), the label and the case's ``id``/``patient``: resizing and
scaling happen when reading, with the numpy reader's own functions, so
changing ``data.image_size`` needs no new preparation and both readers give
identical arrays. Preparation checks every case (same ``DataError`` as the
numpy reader) and leaves nothing behind when it fails.
"""

import hashlib
import json
import os
import re
from typing import Tuple

import numpy as np
import tensorflow_datasets as tfds

from spad_jax import tf_cpu
from spad_jax.data import folder

VERSION = '1.0.0'


class SpadFolderConfig(tfds.core.BuilderConfig):
  """One folder data set under one split setting."""

  def __init__(self, *, root: str, params: Tuple, **kwargs):
    super().__init__(**kwargs)
    self.root = root
    self.params = tuple(params)  # (split_seed, val, test, num_folds, fold).


class SpadFolder(tfds.core.GeneratorBasedBuilder):
  """Folder-format segmentation data set (images/, labels/, dataset.json)."""

  VERSION = tfds.core.Version(VERSION)

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls):
    # No download checksums to find next to the code; TFDS's own lookup needs
    # `importlib_resources`, which it does not install.
    return None

  def _info(self) -> tfds.core.DatasetInfo:
    zlib = tfds.features.Encoding.ZLIB
    return tfds.core.DatasetInfo(
        builder=self,
        description=self.builder_config.description,
        features=tfds.features.FeaturesDict({
            'id': tfds.features.Text(),
            'patient': tfds.features.Text(),
            # Raw pixels [H, W, 1 | 3]; sizes differ between cases.
            'image': tfds.features.Tensor(shape=(None, None, None),
                                          dtype=np.uint16, encoding=zlib),
            'max_value': tfds.features.Scalar(dtype=np.int32),
            'label': tfds.features.Tensor(shape=(None, None), dtype=np.uint8,
                                          encoding=zlib),
        }),
        disable_shuffling=True,  # Keep dataset.json order, like the numpy reader.
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing to download: the files are local.
    meta = folder.read_metadata(self.builder_config.root)
    splits = folder.split_cases(meta, *self.builder_config.params)
    num_classes = len(meta['labels'])
    return {name: self._generate_examples(cases, num_classes)
            for name, cases in splits.items() if cases}

  def _generate_examples(self, cases, num_classes):
    root = self.builder_config.root
    for case in cases:
      ipath, lpath = folder.case_paths(root, case['id'])
      raw = folder.read_raw_image(ipath)
      label = folder.read_label(lpath, num_classes)
      folder.check_pair(raw.shape[:2], label.shape, ipath, lpath)
      yield case['id'], {
          'id': case['id'], 'patient': str(case.get('patient', '')),
          'image': raw.astype(np.uint16),
          'max_value': int(np.iinfo(raw.dtype).max), 'label': label}


def fingerprint(root: str, params: Tuple) -> str:
  """Changes with dataset.json, any image/label file, or the split settings."""
  h = hashlib.sha256()
  h.update(json.dumps([os.path.abspath(root), list(params)]).encode())
  with open(os.path.join(root, 'dataset.json'), 'rb') as f:
    h.update(f.read())
  for sub in ('images', 'labels'):
    base = os.path.join(root, sub)
    for name in sorted(os.listdir(base)) if os.path.isdir(base) else []:
      s = os.stat(os.path.join(base, name))
      h.update(f'{sub}/{name}:{s.st_size}:{s.st_mtime_ns};'.encode())
  return h.hexdigest()[:12]


def make_builder(root: str, params: Tuple, data_dir: str = '') -> SpadFolder:
  """The builder of ``root`` under split settings ``params``."""
  meta = folder.read_metadata(root)  # Schema errors before TFDS starts.
  slug = re.sub(r'[^a-z0-9_]', '_', meta['name'].lower())[:40] or 'data'
  config = SpadFolderConfig(
      name=f'{slug}_{fingerprint(root, params)}', root=os.path.abspath(root),
      params=params, version=VERSION,
      description=(f'{meta["name"]} from {os.path.abspath(root)}; split '
                   f'(seed, val, test, num_folds, fold) = {tuple(params)}'))
  return SpadFolder(config=config, data_dir=data_dir or None)


def read_split(root: str, split: str, params: Tuple, size: int, channels: int,
               num_classes: int, data_dir: str = ''):
  """Prepares (once) and reads ``split``; returns what ``folder.load_cases``
  returns, preceded by the case ids: ``(ids, images, labels, sizes)``."""
  tf_cpu.import_tensorflow()  # Hide GPUs from TF before TFDS touches it.
  builder = make_builder(root, params, data_dir)
  tfds.display_progress_bar(False)
  builder.download_and_prepare()
  if split not in builder.info.splits:
    raise folder.DataError(f'{os.path.join(root, "dataset.json")}: split '
                           f'{split!r} is empty')
  ids, images, labels, sizes = [], [], [], []
  for ex in tfds.as_numpy(builder.as_dataset(split=split,
                                             shuffle_files=False)):
    case_id = ex['id'].decode()
    ipath, lpath = folder.case_paths(root, case_id)
    dtype = np.uint8 if ex['max_value'] == 255 else np.uint16
    image = folder.image_to_unit(ex['image'].astype(dtype), channels, ipath)
    label = folder.check_label(ex['label'], num_classes, lpath)
    image, label = folder.resize_pair(image, label, size)
    ids.append(case_id)
    images.append(image)
    labels.append(label)
    sizes.append(ex['label'].shape)
  return (ids, np.stack(images).astype(np.float32), np.stack(labels),
          np.asarray(sizes, np.int32))
