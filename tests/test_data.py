"""Synthetic data, folder reader, and the two loaders (identical batches)."""

import json
import os

import cv2
import numpy as np
import pytest

from configs import demo
from spad_jax.data import folder
from spad_jax.data import pipeline
from spad_jax.data import sources
from spad_jax.data import synthetic

SHARED = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(
    __file__))), '..', 'shared', 'data', 'duke_dme_fluid')


def small_config():
  config = demo.get_config()
  config.data.image_size = 32
  config.data.synthetic.num_train = 24
  config.train.batch_size = 8
  return config


def test_synthetic_is_deterministic_and_has_every_class():
  a = synthetic.make_split(3, 'train', 20, 48)
  b = synthetic.make_split(3, 'train', 20, 48)
  c = synthetic.make_split(4, 'train', 20, 48)
  np.testing.assert_array_equal(a[0], b[0])
  np.testing.assert_array_equal(a[1], b[1])
  assert not np.array_equal(a[0], c[0])
  assert set(np.unique(a[1])) == {0, 1, 2, 3}
  test = synthetic.make_split(3, 'test', 20, 48)
  assert not np.array_equal(a[0], test[0])  # Splits differ.


def test_train_batches_shape_and_loaders_agree():
  pytest.importorskip('tensorflow')
  config = small_config()
  source = sources.load_split(config, 'train')
  examples = pipeline.TrainExamples(source, config, local_device_count=2)
  tf_batches = list(pipeline.tf_train_batches(examples, 2, 5, 2))
  np_batches = list(pipeline.numpy_train_batches(examples, 2, 5, 2))
  assert len(tf_batches) == len(np_batches) == 3
  for tb, nb in zip(tf_batches, np_batches):
    assert tb['image'].shape == (2, 4, 32, 32, 1)
    assert tb['label'].shape == tb['scd'].shape == tb['bcd'].shape == (
        2, 4, 32, 32)
    for key in tb:
      np.testing.assert_array_equal(tb[key], nb[key])
  # Every example of an epoch is seen once; epochs reshuffle.
  epoch0 = [examples.example_index(s, j)[1] for s in range(3) for j in range(8)]
  epoch1 = [examples.example_index(s, j)[1] for s in range(3, 6)
            for j in range(8)]
  assert sorted(epoch0) == list(range(24)) and epoch0 != epoch1


def test_hosts_take_disjoint_slices():
  config = small_config()
  source = sources.load_split(config, 'train')
  hosts = [pipeline.TrainExamples(source, config, p, 2) for p in range(2)]
  seen = [{h.example_index(0, j)[1] for j in range(4)} for h in hosts]
  assert not seen[0] & seen[1] and len(seen[0] | seen[1]) == 8


def test_masks_follow_switches():
  config = small_config()
  config.spad.scd = False
  source = sources.load_split(config, 'train')
  batch = next(pipeline.numpy_train_batches(
      pipeline.TrainExamples(source, config), 0, 1))
  assert not batch['scd'].any() and batch['bcd'].any()


def _write_case(root, case, image, label):
  cv2.imwrite(os.path.join(root, 'images', case + '.png'), image)
  cv2.imwrite(os.path.join(root, 'labels', case + '.png'), label)


def make_folder(tmp_path, n=6):
  root = tmp_path / 'ds'
  (root / 'images').mkdir(parents=True)
  (root / 'labels').mkdir()
  rng = np.random.default_rng(0)
  cases = []
  for i in range(n):
    _write_case(str(root), f'c{i}', rng.integers(0, 255, (20, 30),
                                                dtype=np.uint8),
                (rng.random((20, 30)) > 0.7).astype(np.uint8))
    cases.append({'id': f'c{i}', 'patient': f'p{i // 2}'})
  meta = {'name': 'toy', 'labels': {'background': 0, 'lesion': 1},
          'cases': cases}
  (root / 'dataset.json').write_text(json.dumps(meta))
  return root


def test_folder_split_by_patient_and_errors(tmp_path):
  root = make_folder(tmp_path)
  meta = folder.read_metadata(str(root))
  splits = folder.split_cases(meta, 0, 0.0, 0.34)
  patients = {s: {c['patient'] for c in cases} for s, cases in splits.items()}
  assert not patients['train'] & patients['test']
  assert len(patients['test']) == 1
  images, labels, sizes = folder.load_cases(str(root), splits['train'], 16, 1,
                                            2)
  assert images.shape == (4, 16, 16, 1) and labels.shape == (4, 16, 16)
  assert sizes.tolist() == [[20, 30]] * 4
  os.remove(root / 'labels' / 'c0.png')
  with pytest.raises(folder.DataError, match='c0.png: missing'):
    folder.load_cases(str(root), meta['cases'], 16, 1, 2)
  cv2.imwrite(str(root / 'labels' / 'c0.png'), np.full((20, 30), 5, np.uint8))
  with pytest.raises(folder.DataError, match='label value 5'):
    folder.load_cases(str(root), meta['cases'], 16, 1, 2)
  cv2.imwrite(str(root / 'labels' / 'c0.png'), np.zeros((21, 30), np.uint8))
  with pytest.raises(folder.DataError, match='differs from its image'):
    folder.load_cases(str(root), meta['cases'], 16, 1, 2)


@pytest.mark.skipif(not os.path.isdir(SHARED), reason='shared data absent')
def test_duke_dme_loads_with_patient_split():
  config = __import__('configs.duke_dme', fromlist=['x']).get_config()
  config.data.image_size = 64
  train = sources.load_split(config, 'train')
  test = sources.load_split(config, 'test')
  assert len(train) + len(test) + len(sources.load_split(config, 'val')) == 110
  patient = lambda case_id: case_id.split('_')[0]
  assert not {patient(i) for i in train.ids} & {patient(i) for i in test.ids}
  assert train.images.shape[1:] == (64, 64, 1)
  assert -1.0 <= train.images.min() and train.images.max() <= 1.0
  assert set(np.unique(train.labels)) == {0, 1}


def test_synthetic_tf_dataset_matches_generator():
  pytest.importorskip('tensorflow')
  images, labels = synthetic.make_split(5, 'val', 3, 32)
  items = list(synthetic.tf_dataset(5, 'val', 3, 32).as_numpy_iterator())
  assert [it['index'] for it in items] == [0, 1, 2]
  for it, image, label in zip(items, images, labels):
    np.testing.assert_array_equal(it['image'], image)
    np.testing.assert_array_equal(it['label'], label)
