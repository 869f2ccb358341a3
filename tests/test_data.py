"""Synthetic data, folder reader, and the two loaders (identical batches)."""

import json
import os

import cv2
import numpy as np
import pytest

from configs import demo
from spad_jax import perturb
from spad_jax.data import augment
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


@pytest.mark.parametrize('augmented', [False, True])
def test_train_batches_shape_and_loaders_agree(augmented):
  pytest.importorskip('tensorflow')
  config = small_config()
  if augmented:
    config.data.augment.update(dict(flip=True, rotate_deg=15.0, scale=0.1,
                                    translate=0.05, gain=0.1, bias=0.05,
                                    gamma=0.2))
  source = sources.load_split(config, 'train')
  examples = pipeline.TrainExamples(source, config, local_device_count=2)
  tf_batches = list(pipeline.tf_train_batches(examples, 2, 5, 2))
  np_batches = list(pipeline.numpy_train_batches(examples, 2, 5, 2))
  assert len(tf_batches) == len(np_batches) == 3
  for tb, nb in zip(tf_batches, np_batches):
    assert tb['image'].shape == (2, 4, 32, 32, 1)
    assert tb['label'].shape == (2, 4, 32, 32)
    assert tb['scd_bits'].shape == tb['bcd_bits'].shape == (2, 4, 32 * 32 // 8)
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
  assert not batch['scd_bits'].any() and batch['bcd_bits'].any()
  config.spad.update(dict(scd=True, bcd=False))
  batch = next(pipeline.numpy_train_batches(
      pipeline.TrainExamples(source, config), 0, 1))
  assert batch['scd_bits'].any() and not batch['bcd_bits'].any()


def test_batch_examples_are_independent_of_their_batch():
  # A case's example (masks included) is a function of (seed, epoch, case)
  # alone: the same in any batch, on any host, alone or batched.
  config = small_config()
  config.spad.k0 = 2  # Of 3 classes: the random choice of targets too.
  source = sources.load_split(config, 'train')
  examples = pipeline.TrainExamples(source, config)
  batch = examples.host_batch_at(4)
  assert batch['scd_bits'].any() and batch['bcd_bits'].any()
  for slot in range(examples.host_batch):
    single = examples.example(4, slot)
    for key in batch:
      np.testing.assert_array_equal(batch[key][slot], single[key])
  # The epoch table equals ScD drawn for this batch alone.
  epochs, idxs = zip(*(examples.example_index(4, j) for j in range(8)))
  spad = config.spad
  alone = perturb.scd_masks(
      [perturb.target_pixels(source.labels[i], config.data.num_classes)
       for i in idxs],
      [perturb.num_targets(e, spad.k0, spad.k_gamma, 99) for e in epochs],
      spad.anchor_ratio, perturb.case_keys(config.seed, epochs, idxs),
      source.labels.shape[1:], packed=True)
  np.testing.assert_array_equal(alone, batch['scd_bits'])
  # The train step's mask is the union of the two, unpacked.
  union = perturb.union_mask(batch['scd_bits'], batch['bcd_bits'],
                             batch['label'].shape)
  np.testing.assert_array_equal(union, np.maximum(
      pipeline.unpack_mask(batch['scd_bits'], batch['label'].shape),
      pipeline.unpack_mask(batch['bcd_bits'], batch['label'].shape)))
  hosts = [pipeline.TrainExamples(source, config, p, 2) for p in range(2)]
  for key in ('scd_bits', 'bcd_bits'):
    halves = [h.host_batch_at(4)[key] for h in hosts]
    np.testing.assert_array_equal(np.concatenate(halves), batch[key])


@pytest.mark.parametrize('augmented', [False, True])
def test_contract_functions_give_the_training_masks(augmented):
  # DESIGN's perturb.scd_mask and perturb.boundary_band are views of the
  # code training uses: given a case's key (seed, epoch, case), k(e) and its
  # (augmented) label, they return the masks of its training example.
  config = small_config()
  config.spad.k0 = 2  # Of 3 classes: the random choice of targets too.
  if augmented:
    config.data.augment.update(dict(flip=True, rotate_deg=20.0))
    config.spad.anchor_patch = 3
  source = sources.load_split(config, 'train')
  examples = pipeline.TrainExamples(source, config)
  spad, num_classes = config.spad, config.data.num_classes
  for epoch, idx in [(0, 0), (0, 5), (3, 5), (40, 11)]:
    ex = examples.example_at(epoch, idx)
    label = ex['label'].astype(np.uint8)
    n = len(perturb.target_pixels(label, num_classes, spad.components))
    scd = perturb.scd_mask(
        label, num_classes, perturb.num_targets(epoch, spad.k0, spad.k_gamma,
                                                n),
        spad.anchor_ratio, None, spad.components,
        anchor_patch=spad.anchor_patch,
        key=perturb.case_keys(config.seed, epoch, idx)[0])
    bcd = perturb.boundary_band(label, num_classes, spad.band_width,
                                spad.canny_low, spad.canny_high,
                                spad.bcd_per_class, spad.bcd_complete)
    assert scd.any() and bcd.any()
    np.testing.assert_array_equal(
        pipeline.unpack_mask(ex['scd_bits'], label.shape), scd)
    np.testing.assert_array_equal(
        pipeline.unpack_mask(ex['bcd_bits'], label.shape), bcd)


def test_epoch_mask_tables_recompute_identically():
  # Visualize asks for epochs out of order; only three tables are kept.
  config = small_config()
  source = sources.load_split(config, 'train')
  examples = pipeline.TrainExamples(source, config)
  tables = examples._scd_tables  # pylint: disable=protected-access
  first = {e: examples.example_at(e, 3)['scd_bits'] for e in (0, 5, 9, 12)}
  assert not np.array_equal(first[0], first[5])
  for e in (0, 12, 5, 9, 0):
    np.testing.assert_array_equal(examples.example_at(e, 3)['scd_bits'],
                                  first[e])
  assert len(tables) == 3
  # Half-way through an epoch the next epoch's table is computed.
  examples.host_batch_at(examples.steps_per_epoch * 20 + 1)  # 3 steps/epoch.
  assert 21 in tables


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


def test_folder_split_by_patient(tmp_path):
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
  # Deterministic from the seed; another seed gives another split.
  assert folder.split_cases(meta, 0, 0.0, 0.34) == splits
  assert any(folder.split_cases(meta, seed, 0.0, 0.34)['test'] !=
             splits['test'] for seed in range(1, 6))


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


# --- Folder format: pixel formats, splits, folds ---------------------------


def folder_config(root, **data):
  """A folder data set at 16², batch 2, no validation during training."""
  config = small_config()
  config.data.name = 'folder'
  config.data.root = str(root)
  config.data.num_classes = 2
  config.data.image_size = 16
  config.data.num_workers = 1
  config.train.batch_size = 2
  config.train.eval_every_epochs = 0
  for key, value in data.items():
    config.data[key] = value
  return config


def test_image_formats_8_16_bit_gray_rgb(tmp_path):
  rng = np.random.default_rng(1)
  rgb16 = rng.integers(0, 65536, (9, 7, 3)).astype(np.uint16)
  gray8 = rng.integers(0, 256, (9, 7)).astype(np.uint8)
  files = {'g8': gray8, 'g16': rgb16[..., 0],
           'rgb8': (rgb16 >> 8).astype(np.uint8), 'rgb16': rgb16}
  for name, array in files.items():  # OpenCV writes BGR: flip RGB to BGR.
    cv2.imwrite(str(tmp_path / f'{name}.png'),
                array[..., ::-1] if array.ndim == 3 else array)
  rgba = np.concatenate([files['rgb8'][..., ::-1],
                         np.full((9, 7, 1), 128, np.uint8)], axis=-1)
  cv2.imwrite(str(tmp_path / 'rgba8.png'), rgba)
  weights = np.array([0.299, 0.587, 0.114])
  expected = {'g8': gray8 / 255, 'g16': rgb16[..., 0] / 65535,
              'rgb8': files['rgb8'] @ weights / 255,
              'rgb16': rgb16 @ weights / 65535,
              'rgba8': files['rgb8'] @ weights / 255}
  for name, want in expected.items():
    got = folder.read_image(str(tmp_path / f'{name}.png'), 1)
    assert got.shape == (9, 7, 1) and got.dtype == np.float32
    np.testing.assert_allclose(got[..., 0], want, atol=1e-6, err_msg=name)
  colour = folder.read_image(str(tmp_path / 'rgb16.png'), 3)
  np.testing.assert_allclose(colour, rgb16 / 65535, atol=1e-7)  # RGB order.
  gray3 = folder.read_image(str(tmp_path / 'g8.png'), 3)
  assert gray3.shape == (9, 7, 3) and (gray3 == gray3[..., :1]).all()


def test_nifti_2d_images_and_labels(tmp_path):
  from spad_jax.data import nifti
  from spad_jax.data import sources
  rng = np.random.default_rng(2)
  root = make_folder(tmp_path, n=6)
  # Replace three cases' PNGs with NIfTI: float CT-like, int16, uint8.
  kinds = {'c0': ('.nii.gz', np.float32), 'c1': ('.nii', np.int16),
           'c2': ('.nii.gz', np.uint8)}
  want = {}
  for case, (ext, dtype) in kinds.items():
    image = (rng.normal(size=(20, 30)) * 300).astype(dtype) if dtype != (
        np.uint8) else rng.integers(0, 256, (20, 30)).astype(np.uint8)
    label = cv2.imread(str(root / 'labels' / f'{case}.png'),
                       cv2.IMREAD_UNCHANGED)
    for sub in ('images', 'labels'):
      os.remove(root / sub / f'{case}.png')
    nifti.write(str(root / 'images' / (case + ext)), image)
    nifti.write(str(root / 'labels' / (case + ext)), label.astype(np.int16))
    np.testing.assert_array_equal(
        nifti.read(str(root / 'labels' / (case + ext))), label)
    unit = image.astype(np.float64)
    unit = (unit / 255 if dtype == np.uint8 else
            (unit - unit.min()) / (unit.max() - unit.min()))
    want[case] = (unit, label)
  for case, (unit, label) in want.items():
    image, got_label, size = folder.load_case(str(root), case, 30, 1, 2)
    assert size == (20, 30)
    np.testing.assert_array_equal(folder.resize_pair(
        unit[..., None].astype(np.float32), label, 30)[1], got_label)
    raw = folder.read_image(folder.case_paths(str(root), case)[0], 1)
    np.testing.assert_allclose(raw[..., 0], unit, atol=1e-4)
  config = folder_config(root)
  loaded = sum(len(sources.load_split(config, split))
               for split in ('train', 'test'))  # 3 patients: val is empty.
  assert loaded == 6  # Mixed PNG/NIfTI folders load.
  # Bad NIfTI files name the file and the problem.
  bad = root / 'labels' / 'c0.nii.gz'
  nifti.write(str(bad), np.full((20, 30), 0.5, np.float32))
  with pytest.raises(folder.DataError, match='c0.nii.gz: label values must'):
    folder.load_case(str(root), 'c0', 30, 1, 2)
  (root / 'images' / 'c1.nii').write_bytes(
      (root / 'images' / 'c1.nii').read_bytes()[:400])
  with pytest.raises(folder.DataError, match='c1.nii: truncated'):
    folder.load_case(str(root), 'c1', 30, 1, 2)
  volume = bytearray((root / 'images' / 'c2.nii.gz').read_bytes())
  import gzip
  import struct
  header = bytearray(gzip.decompress(bytes(volume)))
  struct.pack_into('<8h', header, 40, 3, 30, 20, 2, 1, 1, 1, 1)
  (root / 'images' / 'c2.nii.gz').write_bytes(gzip.compress(bytes(header)))
  with pytest.raises(folder.DataError, match=r'c2.nii.gz: shape .* not 2D'):
    folder.load_case(str(root), 'c2', 30, 1, 2)


def test_resize_to_configured_size_and_model_range(tmp_path):
  root = make_folder(tmp_path)
  source = sources.load_split(folder_config(root, image_size=24), 'train')
  assert source.images.shape[1:] == (24, 24, 1)
  assert source.labels.shape[1:] == (24, 24)
  assert source.original_sizes.tolist() == [[20, 30]] * len(source)
  assert -1 <= source.images.min() < source.images.max() <= 1
  # Labels are resized by nearest neighbour: no new values appear.
  assert set(np.unique(source.labels)) <= {0, 1}
  ipath, lpath = folder.case_paths(str(root), source.ids[0])
  image = cv2.imread(ipath, cv2.IMREAD_UNCHANGED) / 255.0
  want = cv2.resize(image.astype(np.float32), (24, 24),
                    interpolation=cv2.INTER_LINEAR) * 2 - 1
  np.testing.assert_allclose(source.images[0, ..., 0], want, atol=1e-3)
  label = cv2.imread(lpath, cv2.IMREAD_UNCHANGED)
  np.testing.assert_array_equal(source.labels[0], cv2.resize(
      label, (24, 24), interpolation=cv2.INTER_NEAREST))


def many_patients_meta(num_patients=11, per_patient=3):
  cases = [{'id': f'p{p}_s{s}', 'patient': f'p{p}'}
           for p in range(num_patients) for s in range(per_patient)]
  cases += [{'id': 'loose_a'}, {'id': 'loose_b'},  # No patient: own groups.
            {'id': 'fixed', 'patient': 'p0', 'split': 'val'}]
  return {'name': 'toy', 'labels': {'background': 0, 'x': 1}, 'cases': cases}


def group_of(case):
  return case.get('patient', case['id'])


def test_kfold_partitions_patients():
  meta = many_patients_meta()
  free_groups = {group_of(c) for c in meta['cases'] if 'split' not in c}
  folds = [folder.split_cases(meta, 3, 0.1, 0.2, num_folds=4, fold=f)
           for f in range(4)]
  tested = [{group_of(c) for c in f['test']} for f in folds]
  # Every group is tested in exactly one fold.
  assert set().union(*tested) == free_groups
  assert sum(len(t) for t in tested) == len(free_groups)
  n_val = round(0.1 * len(free_groups))
  for f in folds:
    groups = {s: {group_of(c) for c in f[s] if 'split' not in c}
              for s in folder.SPLITS}
    assert not (groups['train'] & groups['val'] or
                groups['train'] & groups['test'] or
                groups['val'] & groups['test'])
    assert len(groups['val']) == n_val
    assert {'id': 'fixed', 'patient': 'p0', 'split': 'val'} in f['val']
    assert sum(map(len, f.values())) == len(meta['cases'])
  assert folds[1] == folder.split_cases(meta, 3, 0.1, 0.2, num_folds=4, fold=1)
  other = folder.split_cases(meta, 4, 0.1, 0.2, num_folds=4, fold=1)
  assert other['test'] != folds[1]['test']
  with pytest.raises(folder.DataError, match='data.num_folds = 20 exceeds'):
    folder.split_cases(meta, 0, 0.0, 0.2, num_folds=20)


def test_kfold_through_config(tmp_path):
  root = make_folder(tmp_path)  # 3 patients, 2 cases each.
  seen = []
  for fold in range(3):
    config = folder_config(root, num_folds=3, fold=fold, val_fraction=0.0)
    test = sources.load_split(config, 'test')
    train = sources.load_split(config, 'train')
    patients = lambda s: {int(i[1:]) // 2 for i in s.ids}
    assert not patients(test) & patients(train)
    seen.append(patients(test))
  assert sorted(p for s in seen for p in s) == [0, 1, 2]


def test_paper_split_sizes():
  cxrs = __import__('configs.cxrs', fromlist=['x']).get_config().data
  meta = {'name': 'cxrs', 'labels': {'background': 0, 'x': 1},
          'cases': [{'id': f'c{i:04d}'} for i in range(1254)]}
  split = folder.split_cases(meta, cxrs.split_seed, cxrs.val_fraction,
                             cxrs.test_fraction)
  assert {k: len(v) for k, v in split.items()} == {'train': 879, 'val': 125,
                                                   'test': 250}
  amd = __import__('configs.amdsd', fromlist=['x']).get_config().data
  meta = {'name': 'amdsd', 'labels': {'background': 0, 'x': 1},
          'cases': [{'id': f'p{p}_{b}', 'patient': f'p{p}'}
                    for p in range(138) for b in range(22)]}
  split = folder.split_cases(meta, amd.split_seed, amd.val_fraction,
                             amd.test_fraction)
  patients = {k: {c['patient'] for c in v} for k, v in split.items()}
  assert len(patients['test']) == round(0.2 * 138) and not patients['val']
  assert not patients['train'] & patients['test']


# --- Bad input: clear errors, nothing half done ----------------------------


def write_meta(root, meta):
  (root / 'dataset.json').write_text(json.dumps(meta))


def _schema_cases():
  def base():
    return {'name': 'toy', 'labels': {'background': 0, 'lesion': 1},
            'cases': [{'id': f'c{i}', 'patient': f'p{i // 2}'}
                      for i in range(6)]}

  def edit(fn):
    meta = base()
    fn(meta)
    return meta

  return [
      ('top level list', [base()], 'top level must be a JSON object'),
      ('no name', edit(lambda m: m.pop('name')), 'key "name"'),
      ('labels list', edit(lambda m: m.update(labels=['bg', 'x'])),
       'key "labels"'),
      ('label gap', edit(lambda m: m.update(labels={'bg': 0, 'x': 2})),
       r'values must be 0..K-1.*\[0, 2\]'),
      ('label not int', edit(lambda m: m['labels'].update(lesion='1')),
       r"labels\['lesion'\] = '1'"),
      ('no cases', edit(lambda m: m.update(cases=[])), 'key "cases"'),
      ('case without id', edit(lambda m: m['cases'][2].pop('id')),
       r'cases\[2\] needs a string "id"'),
      ('duplicate id', edit(lambda m: m['cases'][3].update(id='c1')),
       r"cases\[3\]: case id 'c1' appears twice"),
      ('path in id', edit(lambda m: m['cases'][1].update(id='../x')),
       r"cases\[1\]: id '../x' is not a plain file name"),
      ('unknown split', edit(lambda m: m['cases'][0].update(split='dev')),
       r"cases\[0\] \('c0'\): unknown split 'dev'"),
      ('bad patient', edit(lambda m: m['cases'][4].update(patient=[1])),
       r"cases\[4\] \('c4'\): \"patient\" must be"),
  ]


@pytest.mark.parametrize('name,meta,needle', _schema_cases(),
                         ids=[c[0] for c in _schema_cases()])
def test_dataset_json_schema_errors(tmp_path, name, meta, needle):
  del name
  root = make_folder(tmp_path)
  write_meta(root, meta)
  with pytest.raises(folder.DataError, match=needle) as info:
    sources.load_split(folder_config(root), 'train')
  assert str(root / 'dataset.json') in str(info.value)


def test_dataset_json_not_json_or_missing(tmp_path):
  root = make_folder(tmp_path)
  (root / 'dataset.json').write_text('{"name": "toy", ')
  with pytest.raises(folder.DataError, match='dataset.json: not valid JSON'):
    sources.load_split(folder_config(root), 'train')
  os.remove(root / 'dataset.json')
  with pytest.raises(folder.DataError, match='dataset.json: missing'):
    sources.load_split(folder_config(root), 'train')
  with pytest.raises(folder.DataError, match='is not a directory'):
    sources.load_split(folder_config(root / 'nope'), 'train')


def _truncate(path):
  data = open(path, 'rb').read()
  open(path, 'wb').write(data[:len(data) // 2])


FILE_ERRORS = {
    'missing image': (lambda r, c: os.remove(r / 'images' / f'{c}.png'),
                      r'images/{c}\.png: missing'),
    'missing label': (lambda r, c: os.remove(r / 'labels' / f'{c}.png'),
                      r'labels/{c}\.png: missing'),
    'size mismatch': (
        lambda r, c: cv2.imwrite(str(r / 'labels' / f'{c}.png'),
                                 np.zeros((21, 30), np.uint8)),
        r'labels/{c}\.png: size \(21, 30\) differs from its image '
        r'.*images/{c}\.png \(20, 30\)'),
    'label outside classes': (
        lambda r, c: cv2.imwrite(str(r / 'labels' / f'{c}.png'),
                                 np.tile(np.uint8([0, 1, 2, 7]), (20, 8))[:, :30]),
        r'labels/{c}\.png: label values \[2, 7\] outside the declared '
        r'classes 0\.\.1'),
    'corrupt image': (
        lambda r, c: (r / 'images' / f'{c}.png').write_bytes(b'not a png'),
        r'images/{c}\.png: unreadable or corrupt'),
    'truncated label': (lambda r, c: _truncate(r / 'labels' / f'{c}.png'),
                        r'labels/{c}\.png: unreadable or corrupt'),
    'colour label': (
        lambda r, c: cv2.imwrite(str(r / 'labels' / f'{c}.png'),
                                 np.zeros((20, 30, 3), np.uint8)),
        r'labels/{c}\.png: a label must be a single-channel'),
}


@pytest.mark.parametrize('kind', list(FILE_ERRORS))
def test_file_errors_name_the_file(tmp_path, kind):
  root = make_folder(tmp_path)
  config = folder_config(root)
  # Break a *test* case: loading the training split must already fail, so no
  # training starts on data whose evaluation would fail.
  case = folder.split_cases(folder.read_metadata(str(root)),
                            *sources.split_params(config.data))['test'][0]
  breaker, needle = FILE_ERRORS[kind]
  breaker(root, case['id'])
  with pytest.raises(folder.DataError, match=needle.format(c=case['id'])):
    sources.load_split(config, 'train')
  with pytest.raises(folder.DataError, match=needle.format(c=case['id'])):
    folder.load_cases(str(root), [case], 16, 1, 2)


def test_class_list_mismatch_with_config(tmp_path):
  root = make_folder(tmp_path)
  with pytest.raises(folder.DataError, match=r'dataset.json: declares 2 '
                     r"classes \['background', 'lesion'\], but "
                     r'config.data.num_classes = 3'):
    sources.load_split(folder_config(root, num_classes=3), 'train')
  config = folder_config(root, class_names=('background', 'fluid'))
  with pytest.raises(folder.DataError, match=r"differ from config.data."
                     r"class_names = \['background', 'fluid'\]"):
    sources.load_split(config, 'train')
  # Case, '/' and '_' do not matter ('IS/OS' == 'is_os').
  config = folder_config(root, class_names=('Background', 'LESION'))
  assert sources.load_split(config, 'train').class_names == ['background',
                                                             'lesion']


def test_empty_splits(tmp_path):
  root = make_folder(tmp_path)
  meta = json.loads((root / 'dataset.json').read_text())
  for case in meta['cases']:
    case['split'] = 'train'
  write_meta(root, meta)
  config = folder_config(root)  # eval.split = 'test', which is now empty.
  with pytest.raises(folder.DataError, match="split 'test' is empty"):
    sources.load_split(config, 'train')
  config.eval.split = 'train'
  assert len(sources.load_split(config, 'train')) == 6  # Val unused: fine.
  config.train.eval_every_epochs = 2  # Now val is needed and empty.
  with pytest.raises(folder.DataError, match="split 'val' is empty"):
    sources.load_split(config, 'train')


def test_changed_files_are_read_again(tmp_path):
  root = make_folder(tmp_path)
  config = folder_config(root)
  first = sources.load_split(config, 'train')
  assert sources.load_split(config, 'train') is first  # Memoised.
  path = folder.case_paths(str(root), first.ids[0])[1]
  cv2.imwrite(path, np.ones((20, 30), np.uint8))
  again = sources.load_split(config, 'train')
  assert again.labels[0].all() and not np.array_equal(again.labels,
                                                      first.labels)


def test_data_config_values_are_checked():
  from spad_jax import config_validation
  config = small_config()
  config.data.reader = 'tfds'  # Synthetic data are generated, not read.
  config.data.num_folds = 1
  config.data.augment.rotate_deg = 200.0
  config.data.augment.scale = 1.5
  config.data.class_names = ('a', 'b')
  with pytest.raises(config_validation.ConfigError) as info:
    config_validation.validate(config)
  for key in ('data.reader', 'data.num_folds', 'data.augment.rotate_deg',
              'data.augment.scale', 'data.class_names'):
    assert f'config.{key} =' in str(info.value)


# --- Augmentation -----------------------------------------------------------


def augment_config(**on):
  cfg = small_config().data.augment
  for key, value in on.items():
    cfg[key] = value
  return cfg


def blob_case(size=64):
  """A label of large blobs and an image that is a function of the label."""
  label = np.zeros((size, size), np.uint8)
  cv2.circle(label, (20, 24), 12, 1, -1)
  cv2.rectangle(label, (34, 30), (56, 52), 2, -1)
  values = np.float32([-0.8, 0.1, 0.7])
  return values[label][..., None], label, values


def test_augment_flip_is_exact():
  image, label, _ = blob_case()
  cfg = augment_config(flip=True)
  flips = 0
  for i in range(8):
    p = augment.draw(cfg, np.random.default_rng(i))
    out_image, out_label = augment.apply(image, label, p)
    if p['flip']:
      flips += 1
      np.testing.assert_array_equal(out_image, image[:, ::-1])
      np.testing.assert_array_equal(out_label, label[:, ::-1])
    else:
      np.testing.assert_array_equal(out_label, label)
  assert 0 < flips < 8


def test_augment_geometry_moves_image_and_label_together():
  image, label, values = blob_case()
  cfg = augment_config(flip=True, rotate_deg=20.0, scale=0.15, translate=0.1)
  changed = 0
  for i in range(6):
    out_image, out_label = augment.augment(image, label, cfg,
                                           np.random.default_rng(i))
    assert out_label.dtype == np.uint8 and out_image.shape == image.shape
    assert set(np.unique(out_label)) <= {0, 1, 2}  # Nearest neighbour.
    changed += not np.array_equal(out_label, label)
    # Away from label edges the bilinear image still shows its class value.
    for k, v in enumerate(values):
      inside = cv2.erode((out_label == k).astype(np.uint8),
                         np.ones((5, 5), np.uint8)).astype(bool)
      if k:  # The background also holds the black fill from outside.
        assert inside.any()
        np.testing.assert_allclose(out_image[inside, 0], v, atol=1e-5)
  assert changed == 6


def test_augment_intensity_is_monotonic_and_keeps_label():
  rng = np.random.default_rng(0)
  image = rng.uniform(-1, 1, (16, 16, 1)).astype(np.float32)
  label = (rng.random((16, 16)) > 0.5).astype(np.uint8)
  cfg = augment_config(gain=0.2, bias=0.1, gamma=0.3)
  for i in range(4):
    out_image, out_label = augment.augment(image, label, cfg,
                                           np.random.default_rng(i))
    np.testing.assert_array_equal(out_label, label)
    order = np.argsort(image.ravel())
    assert np.all(np.diff(out_image.ravel()[order]) > 0)
    assert not np.allclose(out_image, image)


def test_augment_off_by_default_and_deterministic():
  config = small_config()
  assert not augment.enabled(config.data.augment)
  source = sources.load_split(config, 'train')
  plain = pipeline.TrainExamples(source, config)
  ex = plain.example_at(0, 3)
  np.testing.assert_array_equal(ex['image'], source.images[3].astype(np.float32))
  config.data.augment.update(dict(flip=True, rotate_deg=10.0, gain=0.1))
  examples = pipeline.TrainExamples(source, config)
  a, b = examples.example_at(2, 3), examples.example_at(2, 3)
  for key in a:
    np.testing.assert_array_equal(a[key], b[key])
  assert not np.array_equal(a['image'], examples.example_at(3, 3)['image'])


def test_masks_follow_the_augmented_label():
  config = small_config()
  config.data.augment.update(dict(flip=True, rotate_deg=25.0, translate=0.1))
  source = sources.load_split(config, 'train')
  examples = pipeline.TrainExamples(source, config)
  spad = config.spad
  moved = 0
  for idx in range(6):
    ex = examples.example_at(0, idx)
    moved += not np.array_equal(ex['label'], source.labels[idx])
    band = perturb.boundary_band(ex['label'].astype(np.uint8),
                                 config.data.num_classes, spad.band_width,
                                 spad.canny_low, spad.canny_high,
                                 spad.bcd_per_class, spad.bcd_complete)
    shape = ex['label'].shape
    np.testing.assert_array_equal(
        pipeline.unpack_mask(ex['bcd_bits'], shape), band)
    # ScD perturbs only inside foreground targets of the augmented label.
    scd = pipeline.unpack_mask(ex['scd_bits'], shape)
    assert scd.any() and not (scd & (ex['label'] == 0)).any()
  assert moved == 6


# --- TFDS reader -------------------------------------------------------------


def mixed_folder(tmp_path):
  """8- and 16-bit gray and RGB images of different sizes, 3 classes."""
  root = tmp_path / 'mixed'
  (root / 'images').mkdir(parents=True)
  (root / 'labels').mkdir()
  rng = np.random.default_rng(5)
  cases = []
  for i in range(9):
    h, w = 18 + i, 30 - i
    image = rng.integers(0, 256, (h, w) + ((3,) if i % 3 == 2 else ()))
    image = (image.astype(np.uint16) * 257 if i % 2 else
             image.astype(np.uint8))
    _write_case(str(root), f'k{i}', image,
                rng.integers(0, 3, (h, w)).astype(np.uint8))
    cases.append({'id': f'k{i}', 'patient': f'q{i // 3}'})
  cases[0]['split'] = 'val'
  write_meta(root, {'name': 'Mixed set', 'labels': {'background': 0, 'a': 1,
                                                    'b': 2}, 'cases': cases})
  return root


def test_tfds_reader_matches_numpy_reader(tmp_path):
  tfds = pytest.importorskip('tensorflow_datasets')
  from spad_jax.data import tfds_folder
  root = mixed_folder(tmp_path)
  config = folder_config(root, num_classes=3, val_fraction=0.0,
                         test_fraction=0.34)
  tconfig = folder_config(root, num_classes=3, val_fraction=0.0,
                          test_fraction=0.34, reader='tfds',
                          tfds_dir=str(tmp_path / 'tfds'))
  builder = tfds_folder.make_builder(str(root), sources.split_params(
      tconfig.data), tconfig.data.tfds_dir)
  prepared = os.path.join(tconfig.data.tfds_dir, 'spad_folder',
                          builder.builder_config.name, tfds_folder.VERSION)
  assert not os.path.exists(prepared)
  for split in folder.SPLITS:
    want = sources.load_split(config, split)
    got = sources.load_split(tconfig, split)
    assert got.ids == want.ids and len(want) > 0
    np.testing.assert_array_equal(got.images, want.images)
    np.testing.assert_array_equal(got.labels, want.labels)
    np.testing.assert_array_equal(got.original_sizes, want.original_sizes)
    assert got.class_names == want.class_names
  # The TFDS splits are the project's splits, readable without our code.
  assert os.path.isfile(os.path.join(prepared, 'dataset_info.json'))
  plain = tfds.builder_from_directory(prepared)
  splits = folder.split_cases(folder.read_metadata(str(root)),
                              *sources.split_params(config.data))
  assert {k: v.num_examples for k, v in plain.info.splits.items()} == {
      k: len(v) for k, v in splits.items()}
  first = next(iter(tfds.as_numpy(plain.as_dataset('val'))))
  assert first['id'] == b'k0' and first['image'].shape == (18, 30, 1)
  # Another split setting is another builder config (no stale reuse).
  other = tfds_folder.make_builder(str(root), (1, 0.0, 0.34, 0, 0))
  assert other.builder_config.name != builder.builder_config.name


def test_tfds_reader_errors_leave_nothing_prepared(tmp_path):
  pytest.importorskip('tensorflow_datasets')
  root = mixed_folder(tmp_path)
  (root / 'labels' / 'k4.png').write_bytes(b'\x89PNG broken')
  tfds_dir = tmp_path / 'tfds'
  config = folder_config(root, num_classes=3, reader='tfds',
                         tfds_dir=str(tfds_dir))
  with pytest.raises(folder.DataError,
                     match=r'labels/k4\.png: unreadable or corrupt'):
    sources.load_split(config, 'train')
  leftovers = [f for _, _, files in os.walk(tfds_dir) for f in files]
  assert leftovers == []
