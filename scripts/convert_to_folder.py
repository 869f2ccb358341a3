r"""Converts image/mask folders into the folder format of DESIGN §3.

Paired masks (one class-index or coded mask per image):

  python scripts/convert_to_folder.py --images=raw/imgs --masks=raw/masks \
      --mask_suffix=_mask --classes=background,lesion --remap=255:1 \
      --patient_regex='^(P\d+)_' --out=data/mine

  takes ``raw/imgs/<id>.<ext>`` with ``raw/masks/<id>_mask.<ext>``.

One binary mask per class (overlapping structures, e.g. chest X-rays):

  python scripts/convert_to_folder.py --images=raw/imgs --masks=raw/masks \
      --class_dirs --classes=background,lung,rib --priority=rib,lung \
      --out=data/cxr

  takes ``raw/masks/<class>/<id><suffix>.<ext>`` (non-zero = inside) and
  paints the classes so that the first of ``--priority`` wins where masks
  overlap (default: ``--classes`` order).

Writes ``<out>/images/<id>.png`` (8/16-bit, gray or RGB as read),
``<out>/labels/<id>.png`` (uint8 class indices) and ``<out>/dataset.json``.
With ``--recursive`` images are searched in sub-folders too; the case id is
the relative path with '/' turned into '__', and ``--patient_regex`` /
``--split_regex`` see the relative path (so '^([^/]+)/' takes the patient
from a patient folder). ``--dry_run`` checks everything, prints the mask
values found, and writes nothing. The output must not exist or be empty; it
is written to a temporary sibling and renamed at the end, so a failed
conversion leaves nothing behind. See docs/DATA.md.
"""

import argparse
import collections
import json
import os
import re
import shutil
import sys
import tempfile

import cv2
import numpy as np

from spad_jax.data import folder

EXTENSIONS = ('.png', '.jpg', '.jpeg', '.bmp', '.tif', '.tiff')


class ConversionError(ValueError):
  """Bad input; the message names the file and the problem."""


def parse_remap(text: str) -> dict:
  """'255:1,128:2' -> {255: 1, 128: 2}."""
  out = {}
  for item in filter(None, (t.strip() for t in text.split(','))):
    try:
      src, dst = (int(v) for v in item.split(':'))
    except ValueError as e:
      raise ConversionError(f'--remap: {item!r} is not VALUE:CLASS') from e
    if not 0 <= src < 65536:
      raise ConversionError(f'--remap: value {src} is not an 8/16-bit value')
    out[src] = dst
  return out


def find_images(images_dir: str, recursive: bool) -> list:
  """Relative paths (with '/') of the images, sorted."""
  found = []
  for base, dirs, files in os.walk(images_dir):
    dirs.sort()
    rel = os.path.relpath(base, images_dir)
    for name in sorted(files):
      if os.path.splitext(name)[1].lower() in EXTENSIONS:
        found.append(name if rel == '.' else f'{rel}/{name}'.replace(os.sep,
                                                                     '/'))
    if not recursive:
      break
  return found


def case_id(rel: str) -> str:
  stem = os.path.splitext(rel)[0].replace('/', '__')
  return re.sub(r'[^A-Za-z0-9_.\-]', '_', stem).lstrip('.')


def partner(mask_dir: str, rel: str, suffix: str) -> str:
  """The mask file of image ``rel``: same sub-folder, stem + suffix, any
  supported extension. Raises if there is none or more than one."""
  stem = os.path.splitext(rel)[0] + suffix
  hits = [stem + ext for ext in EXTENSIONS
          if os.path.isfile(os.path.join(mask_dir, stem + ext))]
  hits += [stem + ext.upper() for ext in EXTENSIONS
           if os.path.isfile(os.path.join(mask_dir, stem + ext.upper()))]
  hits = sorted(set(hits))
  if not hits:
    raise ConversionError(f'{os.path.join(mask_dir, stem)}.*: missing mask '
                          f'for image {rel}')
  if len(hits) > 1:
    raise ConversionError(f'{os.path.join(mask_dir, stem)}.*: several masks '
                          f'{hits} for image {rel}')
  return os.path.join(mask_dir, hits[0])


def read_image(path: str) -> np.ndarray:
  image = cv2.imread(path, cv2.IMREAD_UNCHANGED)
  if image is None:
    raise ConversionError(f'{path}: unreadable or corrupt image')
  if image.dtype not in (np.uint8, np.uint16):
    raise ConversionError(f'{path}: pixel type {image.dtype}; the folder '
                          'format holds 8- or 16-bit images')
  return image


def read_mask(path: str) -> np.ndarray:
  """A mask as one channel (equal colour channels are accepted)."""
  mask = read_image(path)
  if mask.ndim == 3:
    if mask.shape[2] == 4:
      mask = mask[..., :3]
    if not (mask == mask[..., :1]).all():
      raise ConversionError(f'{path}: a colour mask (channels differ); map '
                            'its colours to gray values or class indices '
                            'first')
    mask = mask[..., 0]
  return mask


def coded_label(mask: np.ndarray, remap: dict, num_classes: int,
                path: str) -> np.ndarray:
  """Mask values through ``remap`` (others kept), checked to be < K."""
  lut = np.arange(65536, dtype=np.int64)  # Masks are 8- or 16-bit.
  for src, dst in remap.items():
    lut[src] = dst
  label = lut[mask]
  bad = np.unique(label[(label < 0) | (label >= num_classes)])
  if bad.size:
    raise ConversionError(f'{path}: values {bad.tolist()[:10]} are no class '
                          f'index 0..{num_classes - 1} after --remap '
                          f'{remap or "{}"} (use --dry_run to list values)')
  return label.astype(np.uint8)


def class_dir_label(masks_dir: str, rel: str, suffix: str, classes: list,
                    priority: list, shape) -> np.ndarray:
  """Flattens per-class binary masks; the first of ``priority`` wins."""
  label = np.zeros(shape, np.uint8)
  for name in reversed(priority):  # Paint lowest priority first.
    path = partner(os.path.join(masks_dir, name), rel, suffix)
    mask = read_mask(path)
    if mask.shape != tuple(shape):
      raise ConversionError(f'{path}: size {mask.shape} differs from its '
                            f'image {rel} {tuple(shape)}')
    label[mask > 0] = classes.index(name)
  return label


def match(regex, rel: str, what: str, path: str):
  if regex is None:
    return None
  m = regex.search(rel)
  if not m:
    raise ConversionError(f'{path}: --{what}_regex {regex.pattern!r} does not '
                          f'match {rel!r}')
  return m.group(1) if m.groups() else m.group(0)


def convert(args) -> dict:
  """Runs the conversion; returns a summary. Writes nothing on error."""
  classes = [c.strip() for c in args.classes.split(',') if c.strip()]
  if len(classes) < 2 or len(set(classes)) != len(classes):
    raise ConversionError(f'--classes {args.classes!r}: need at least two '
                          'distinct names, background first')
  priority = ([c.strip() for c in args.priority.split(',') if c.strip()]
              if args.priority else classes[1:])
  if sorted(priority) != sorted(classes[1:]):
    raise ConversionError(f'--priority {priority} must list every foreground '
                          f'class of --classes {classes[1:]} once')
  remap = parse_remap(args.remap)
  patient_re = re.compile(args.patient_regex) if args.patient_regex else None
  split_re = re.compile(args.split_regex) if args.split_regex else None
  out = os.path.abspath(args.out)
  if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
    raise ConversionError(f'{out}: exists and is not empty; refusing to '
                          'overwrite')
  rels = find_images(args.images, args.recursive)
  if not rels:
    raise ConversionError(f'{args.images}: no images ({", ".join(EXTENSIONS)})')

  tmp = None
  if not args.dry_run:
    os.makedirs(os.path.dirname(out), exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=os.path.basename(out) + '.partial-',
                           dir=os.path.dirname(out))
    os.makedirs(os.path.join(tmp, 'images'))
    os.makedirs(os.path.join(tmp, 'labels'))
  try:
    cases, seen, values, problems = [], {}, collections.Counter(), []
    pixels = np.zeros(len(classes), np.int64)
    for rel in rels:
      ipath = os.path.join(args.images, rel)
      cid = case_id(rel)
      if cid in seen:
        raise ConversionError(f'{ipath}: case id {cid!r} also made from '
                              f'{seen[cid]}')
      seen[cid] = ipath
      image = read_image(ipath)
      if args.class_dirs:
        label = class_dir_label(args.masks, rel, args.mask_suffix, classes,
                                priority, image.shape[:2])
        values.update(np.unique(label).tolist())
      else:
        mpath = partner(args.masks, rel, args.mask_suffix)
        mask = read_mask(mpath)
        if mask.shape != image.shape[:2]:
          raise ConversionError(f'{mpath}: size {mask.shape} differs from its '
                                f'image {ipath} {image.shape[:2]}')
        values.update(np.unique(mask).tolist())
        try:
          label = coded_label(mask, remap, len(classes), mpath)
        except ConversionError as e:
          if not args.dry_run:
            raise
          problems.append(str(e))  # A dry run lists them all.
          label = None
      case = {'id': cid}
      patient = match(patient_re, rel, 'patient', ipath)
      if patient is not None:
        case['patient'] = patient
      split = match(split_re, rel, 'split', ipath)
      if split is not None:
        if split not in folder.SPLITS:
          raise ConversionError(f'{ipath}: --split_regex gave {split!r}; '
                                f'expected one of {list(folder.SPLITS)}')
        case['split'] = split
      cases.append(case)
      if label is not None:
        pixels += np.bincount(label.ravel(), minlength=len(classes))
      if tmp:
        for sub, array in (('images', image), ('labels', label)):
          path = os.path.join(tmp, sub, cid + '.png')
          if not cv2.imwrite(path, array):
            raise ConversionError(f'{path}: could not be written')
    meta = {'name': args.name or os.path.basename(out),
            'labels': {c: i for i, c in enumerate(classes)},
            'cases': cases,
            'source': {'images': os.path.abspath(args.images),
                       'masks': os.path.abspath(args.masks),
                       'mask_suffix': args.mask_suffix,
                       'remap': {str(k): v for k, v in remap.items()},
                       'class_dirs': bool(args.class_dirs),
                       'priority': priority if args.class_dirs else None}}
    summary = {'cases': len(cases),
               'patients': len({c['patient'] for c in cases
                                if 'patient' in c}),
               'mask_values': {int(k): int(v) for k, v in
                               sorted(values.items())},
               'class_pixels': dict(zip(classes, pixels.tolist()))}
    if args.dry_run:
      summary['problems'] = problems[:20]
    if tmp:
      with open(os.path.join(tmp, 'dataset.json'), 'w') as f:
        json.dump(meta, f, indent=1)
      folder.read_metadata(tmp)  # The result must pass the reader's schema.
      if os.path.isdir(out):
        os.rmdir(out)  # Empty (checked above).
      os.rename(tmp, out)
      tmp = None
    return summary
  finally:
    if tmp:
      shutil.rmtree(tmp, ignore_errors=True)


def parse_args(argv):
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0],
                              formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument('--images', required=True, help='folder of images')
  p.add_argument('--masks', required=True, help='folder of masks (or of '
                 'per-class mask folders with --class_dirs)')
  p.add_argument('--out', required=True, help='output folder (new or empty)')
  p.add_argument('--classes', required=True, help='class names in label '
                 'order, background first: background,srf,irf')
  p.add_argument('--mask_suffix', default='', help="mask stem = image stem + "
                 "this, e.g. '_mask'")
  p.add_argument('--remap', default='', help="mask value to class index, "
                 "e.g. '255:1,128:2'; other values are kept")
  p.add_argument('--class_dirs', action='store_true', help='masks/<class>/ '
                 'hold one binary mask per class and case')
  p.add_argument('--priority', default='', help='with --class_dirs: '
                 'foreground classes, highest priority first')
  p.add_argument('--patient_regex', default='', help='patient id: group 1 '
                 '(or the whole match) of this regex on the relative path')
  p.add_argument('--split_regex', default='', help='explicit split '
                 '(train|val|test) from the relative path')
  p.add_argument('--recursive', action='store_true', help='search images in '
                 'sub-folders too')
  p.add_argument('--name', default='', help='data set name (default: the '
                 'output folder name)')
  p.add_argument('--dry_run', action='store_true', help='check and list mask '
                 'values; write nothing')
  return p.parse_args(argv)


def main(argv=None) -> int:
  args = parse_args(argv)
  try:
    summary = convert(args)
  except (ConversionError, folder.DataError, re.error) as e:
    print(f'error: {e}', file=sys.stderr)
    return 1
  print(json.dumps(summary, indent=1))
  if not args.dry_run:
    print(f'wrote {summary["cases"]} cases to {os.path.abspath(args.out)}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
