r"""Input pipeline throughput with SPAD masks on vs off, both loaders.

  python bench/pipeline_throughput.py --config=configs/duke_dme.py

Builds training batches (no model) for ``--steps`` steps after one warm-up
batch and reports images/s per (loader, masks), the best of ``--rounds``
alternating rounds. Writes
``<out>/pipeline_throughput.json`` and ``.md`` (default out: bench_results/).
"""

import json
import os
import sys
import time

from absl import app
from absl import flags
from ml_collections import config_flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

FLAGS = flags.FLAGS


def define_flags():
  """Flags of the command line only: bench/perf.py imports ``measure``."""
  config_flags.DEFINE_config_file('config', None, 'Data config.',
                                  lock_config=False)
  flags.DEFINE_integer('steps', 40, 'Timed batches per setting.')
  flags.DEFINE_integer('rounds', 3, 'Alternating off/on rounds; the best '
                       'round of each setting is kept (the machine may be '
                       'shared).')
  flags.DEFINE_list('loaders', ['tf', 'numpy'], 'Loaders to time.')
  flags.DEFINE_string('out', 'bench_results', 'Output folder.')
  flags.mark_flags_as_required(['config'])


def measure(config, source, loader: str, masks: bool, steps: int) -> float:
  """Images per second of ``loader`` with ScD+BcD on or off."""
  from spad_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  cfg = config.copy_and_resolve_references()
  cfg.data.loader = loader
  cfg.spad.scd = cfg.spad.bcd = masks
  examples = pipeline.TrainExamples(source, cfg)
  batches = pipeline.train_batches(examples, 0, steps + 1, cfg)
  next(batches)  # Warm-up: thread pools, tf.data graph.
  start = time.perf_counter()
  n = sum(1 for _ in batches)
  return n * examples.host_batch / (time.perf_counter() - start)


def main(argv):
  del argv
  from spad_jax.data import sources  # pylint: disable=g-import-not-at-top
  config = FLAGS.config
  source = sources.load_split(config, 'train')
  rows = []
  for loader in FLAGS.loaders:
    for masks in (False, True):
      rows.append({'loader': loader, 'masks': masks, 'images_per_sec': 0.0})
  for r in range(FLAGS.rounds):
    for row in rows:
      ips = measure(config, source, row['loader'], row['masks'], FLAGS.steps)
      row['images_per_sec'] = max(row['images_per_sec'], ips)
      print(f'round {r + 1}/{FLAGS.rounds}  {row["loader"]:6s} masks='
            f'{"on " if row["masks"] else "off"}  {ips:8.1f} img/s',
            flush=True)
  for loader in FLAGS.loaders:
    off, on = (r['images_per_sec'] for r in rows if r['loader'] == loader)
    for r in rows:
      if r['loader'] == loader:
        r['slowdown_vs_off'] = 1 - on / off
  meta = {'data': config.data.name, 'image_size': config.data.image_size,
          'batch_size': config.train.batch_size,
          'num_workers': config.data.num_workers, 'cpus': os.cpu_count(),
          'steps': FLAGS.steps, 'rounds': FLAGS.rounds, 'date': time.strftime('%Y-%m-%d')}
  os.makedirs(FLAGS.out, exist_ok=True)
  with open(os.path.join(FLAGS.out, 'pipeline_throughput.json'), 'w') as f:
    json.dump({'meta': meta, 'rows': rows}, f, indent=1)
  lines = [f'{meta["data"]} at {meta["image_size"]}², batch '
           f'{meta["batch_size"]}, {meta["num_workers"]} workers, '
           f'{meta["cpus"]} CPUs, {meta["date"]}; best of {FLAGS.rounds} '
           'rounds.', '',
           '| loader | masks off (img/s) | masks on (img/s) | slowdown |',
           '|---|---:|---:|---:|']
  for loader in FLAGS.loaders:
    off, on = (r for r in rows if r['loader'] == loader)
    lines.append(f'| {loader} | {off["images_per_sec"]:.1f} | '
                 f'{on["images_per_sec"]:.1f} | '
                 f'{100 * on["slowdown_vs_off"]:.1f} % |')
  text = '\n'.join(lines) + '\n'
  with open(os.path.join(FLAGS.out, 'pipeline_throughput.md'), 'w') as f:
    f.write(text)
  print(text)


if __name__ == '__main__':
  define_flags()
  app.run(main)
