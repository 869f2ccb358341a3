r"""Writes cases of the embedded synthetic data set as PNG files.

The demo trains on synthetic OCT-like B-scans generated in memory; this
script writes some of them to disk, e.g. to try ``--mode=predict`` on a
folder of images as a new user would:

  python scripts/export_synthetic.py --config=configs/demo.py --split=test \
      --num_cases=8 --out=runs/demo_pngs
  python main.py --config=configs/demo.py --workdir=runs/demo --mode=predict \
      --input=runs/demo_pngs/images --output=runs/demo_pred

Writes ``<out>/images/<id>.png`` (uint8 gray, ``data.image_size``²),
``<out>/labels/<id>.png`` (uint8 class indices) and ``<out>/dataset.json``
(folder format of DESIGN §3, every case in ``--split``), with the case ids
and pixels that ``--mode=evaluate`` uses for that split. Refuses to write
into a non-empty ``--out``.
"""

import json
import os

from absl import app
from absl import flags
import cv2
from ml_collections import config_flags

from spad_jax.data import synthetic

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file('config', 'configs/demo.py', 'Config whose '
                                'data.synthetic seed and data.image_size to '
                                'use.')
flags.DEFINE_enum('split', 'test', list(synthetic.SPLITS), 'Split to export.')
flags.DEFINE_integer('num_cases', 8, 'Cases to write (the first of the split).')
flags.DEFINE_string('out', None, 'Output folder (created; must be empty).')
flags.mark_flags_as_required(['out'])


def export(seed: int, split: str, num_cases: int, size: int, out: str) -> list:
  """Writes the first ``num_cases`` of ``split``; returns their ids."""
  if os.path.isdir(out) and os.listdir(out):
    raise FileExistsError(f'--out {out} is not empty')
  for sub in ('images', 'labels'):
    os.makedirs(os.path.join(out, sub), exist_ok=True)
  images, labels = synthetic.make_split(seed, split, num_cases, size)
  ids = [f'synthetic_{split}_{i:05d}' for i in range(num_cases)]  # As sources.
  for case_id, image, label in zip(ids, images, labels):
    cv2.imwrite(os.path.join(out, 'images', case_id + '.png'), image[..., 0])
    cv2.imwrite(os.path.join(out, 'labels', case_id + '.png'), label)
  meta = {'name': f'synthetic_{split}',
          'labels': {n: c for c, n in enumerate(synthetic.CLASS_NAMES)},
          'cases': [{'id': i, 'split': split} for i in ids]}
  with open(os.path.join(out, 'dataset.json'), 'w') as f:
    json.dump(meta, f, indent=1)
  return ids


def main(argv):
  del argv
  d = FLAGS.config.data
  ids = export(d.synthetic.seed, FLAGS.split, FLAGS.num_cases, d.image_size,
               FLAGS.out)
  print(f'wrote {len(ids)} {FLAGS.split} cases to {FLAGS.out}/images and '
        f'{FLAGS.out}/labels')


if __name__ == '__main__':
  app.run(main)
