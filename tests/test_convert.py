"""scripts/convert_to_folder.py on tiny image/mask layouts."""

import json
import os
import subprocess
import sys

import cv2
import numpy as np

from conftest import ROOT
from spad_jax.data import folder


def convert(*args):
  return subprocess.run(
      [sys.executable, os.path.join(ROOT, 'scripts', 'convert_to_folder.py')] +
      [str(a) for a in args], capture_output=True, text=True, timeout=120)


def paired_layout(tmp_path, recursive=False):
  """imgs/<id>.png with masks/<id>_mask.png holding 0 / 128 / 255."""
  rng = np.random.default_rng(0)
  imgs, masks = tmp_path / 'imgs', tmp_path / 'masks'
  made = {}
  for patient in ('P01', 'P02', 'P03'):
    for scan in range(2):
      split = 'test' if patient == 'P03' else 'train'
      rel = (f'{split}/{patient}/{scan}' if recursive else
             f'{patient}_{scan}')
      (imgs / rel).parent.mkdir(parents=True, exist_ok=True)
      (masks / rel).parent.mkdir(parents=True, exist_ok=True)
      image = rng.integers(0, 65536, (12, 15)).astype(np.uint16)
      mask = rng.choice(np.uint8([0, 128, 255]), (12, 15))
      cv2.imwrite(str(imgs / f'{rel}.png'), image)
      cv2.imwrite(str(masks / f'{rel}_mask.png'), mask)
      made[rel] = (image, mask)
  return imgs, masks, made


def test_paired_masks_with_remap_and_patients(tmp_path):
  imgs, masks, made = paired_layout(tmp_path)
  out = tmp_path / 'out'
  run = convert('--images', imgs, '--masks', masks, '--out', out,
                '--mask_suffix', '_mask', '--classes', 'background,a,b',
                '--remap', '128:1,255:2', '--patient_regex', r'^(P\d+)_',
                '--name', 'toy')
  assert run.returncode == 0, run.stderr
  meta = folder.read_metadata(str(out))  # Passes the reader's schema.
  assert meta['name'] == 'toy'
  assert meta['labels'] == {'background': 0, 'a': 1, 'b': 2}
  assert {c['id']: c['patient'] for c in meta['cases']} == {
      rel: rel.split('_')[0] for rel in made}
  for rel, (image, mask) in made.items():
    ipath, lpath = folder.case_paths(str(out), rel)
    stored = cv2.imread(ipath, cv2.IMREAD_UNCHANGED)
    assert stored.dtype == np.uint16
    np.testing.assert_array_equal(stored, image)  # 16 bits kept.
    label = folder.read_label(lpath, 3)
    np.testing.assert_array_equal(label, (mask == 128) * 1 + (mask == 255) * 2)
  # A second run refuses to overwrite the now non-empty output.
  again = convert('--images', imgs, '--masks', masks, '--out', out,
                  '--mask_suffix', '_mask', '--classes', 'background,a,b',
                  '--remap', '128:1,255:2')
  assert again.returncode == 1 and 'refusing to overwrite' in again.stderr


def test_split_and_patient_folders(tmp_path):
  imgs, masks, made = paired_layout(tmp_path, recursive=True)
  out = tmp_path / 'out'
  base = ['--images', imgs, '--masks', masks, '--out', out, '--mask_suffix',
          '_mask', '--classes', 'background,a,b', '--remap', '128:1,255:2',
          '--recursive', '--patient_regex', '^[^/]+/([^/]+)/']
  # A split regex that yields no split name stops the conversion.
  run = convert(*base, '--split_regex', '^[^/]+/([^/]+)/')
  assert run.returncode == 1
  assert "test/P03/0.png: --split_regex gave 'P03'; expected one of" in (
      run.stderr)  # 'test/' sorts first.
  assert not out.exists()
  run = convert(*base, '--split_regex', '^(train|val|test)/')
  assert run.returncode == 0, run.stderr
  meta = folder.read_metadata(str(out))
  assert sorted(c['id'] for c in meta['cases']) == sorted(
      rel.replace('/', '__') for rel in made)
  for case in meta['cases']:
    split, patient, _ = case['id'].split('__')
    assert case['patient'] == patient and case['split'] == split
  # The explicit splits win over the seeded patient split.
  splits = folder.split_cases(meta, 0, 0.0, 0.5)
  assert {c['patient'] for c in splits['test']} == {'P03'}


def test_class_dirs_flattened_by_priority(tmp_path):
  imgs, masks = tmp_path / 'imgs', tmp_path / 'masks'
  imgs.mkdir()
  for name in ('lung', 'rib'):
    (masks / name).mkdir(parents=True)
  rgb = np.zeros((10, 10, 3), np.uint8)
  rgb[..., 2] = 200  # Red in BGR.
  cv2.imwrite(str(imgs / 'x1.png'), rgb)
  lung = np.zeros((10, 10), np.uint8)
  lung[2:8, 2:8] = 255
  rib = np.zeros((10, 10), np.uint8)
  rib[5:10, :] = 1
  cv2.imwrite(str(masks / 'lung' / 'x1.png'), lung)
  cv2.imwrite(str(masks / 'rib' / 'x1.png'), rib)
  for priority, on_top in (('rib,lung', 2), ('lung,rib', 1)):
    out = tmp_path / f'out_{on_top}'
    run = convert('--images', imgs, '--masks', masks, '--out', out,
                  '--class_dirs', '--classes', 'background,lung,rib',
                  '--priority', priority)
    assert run.returncode == 0, run.stderr
    label = folder.read_label(folder.case_paths(str(out), 'x1')[1], 3)
    assert label[6, 4] == on_top  # Inside both masks.
    assert label[3, 3] == 1 and label[8, 9] == 2 and label[0, 0] == 0
    image = folder.read_image(folder.case_paths(str(out), 'x1')[0], 3)
    np.testing.assert_allclose(image[0, 0], [200 / 255, 0, 0], atol=1e-6)


def test_bad_layouts_are_named_and_write_nothing(tmp_path):
  imgs, masks, made = paired_layout(tmp_path)
  base = ['--images', imgs, '--masks', masks, '--mask_suffix', '_mask',
          '--classes', 'background,a,b']
  out = tmp_path / 'out'
  # Values 128/255 without --remap are no class indices.
  run = convert(*base, '--out', out)
  assert run.returncode == 1
  assert 'P01_0_mask.png: values [128, 255] are no class index' in run.stderr
  assert not out.exists()
  assert not [p for p in os.listdir(tmp_path) if '.partial-' in p]
  # A dry run lists the values and writes nothing.
  dry = convert(*base, '--out', out, '--dry_run')
  assert dry.returncode == 0, dry.stderr
  summary = json.loads(dry.stdout)
  assert set(summary['mask_values']) == {'0', '128', '255'}
  assert len(summary['problems']) == len(made) and not out.exists()
  # Missing partner, size mismatch, patient regex without a match.
  os.remove(masks / 'P02_1_mask.png')
  run = convert(*base, '--remap', '128:1,255:2', '--out', out)
  assert run.returncode == 1 and 'P02_1_mask.*: missing mask' in run.stderr
  cv2.imwrite(str(masks / 'P02_1_mask.png'), np.zeros((5, 5), np.uint8))
  run = convert(*base, '--remap', '128:1,255:2', '--out', out)
  assert run.returncode == 1
  assert 'P02_1_mask.png: size (5, 5) differs from its image' in run.stderr
  cv2.imwrite(str(masks / 'P02_1_mask.png'), np.zeros((12, 15), np.uint8))
  run = convert(*base, '--remap', '128:1,255:2', '--out', out,
                '--patient_regex', r'^Q(\d+)')
  assert run.returncode == 1
  assert "P01_0.png: --patient_regex '^Q(\\\\d+)' does not match" in run.stderr
  assert not out.exists()
  assert not [p for p in os.listdir(tmp_path) if '.partial-' in p]
