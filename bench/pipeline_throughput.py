r"""Input pipeline throughput with SPAD masks on vs off, both loaders.

  python bench/pipeline_throughput.py --config=configs/duke_dme.py

Builds training batches (no model) and times them in ``--rounds`` pairs of
segments, masks off then on, each ``--steps`` batches through the real
loader (after one warm-up batch) and continuing where the last pair stopped,
as training would. This machine's speed drifts by ±20 % over seconds, so
the slowdown reported is the median over pairs of adjacent segments, next
to the best images/s of each setting and the process CPU time per image
(all threads). Writes ``<out>/pipeline_throughput.json`` and ``.md``
(default out: bench_results/).
"""

import json
import os
import statistics
import time

from absl import app
from absl import flags
from ml_collections import config_flags

FLAGS = flags.FLAGS


def define_flags():
  """Flags of the command line only: bench/perf.py imports ``compare``."""
  config_flags.DEFINE_config_file('config', None, 'Data config.',
                                  lock_config=False)
  flags.DEFINE_integer('steps', 40, 'Timed batches per segment.')
  flags.DEFINE_integer('rounds', 3, 'Pairs of segments (masks off, on).')
  flags.DEFINE_list('loaders', ['tf', 'numpy'], 'Loaders to time.')
  flags.DEFINE_string('out', 'bench_results', 'Output folder.')
  flags.mark_flags_as_required(['config'])


def _segment(examples, config, start: int, steps: int):
  """(images/s, CPU µs per image) of ``steps`` batches from ``start``."""
  from spad_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  batches = pipeline.train_batches(examples, start, start + steps + 1, config)
  next(batches)  # Warm-up: thread pools, tf.data graph.
  wall, cpu = time.perf_counter(), time.process_time()
  n = sum(1 for _ in batches) * examples.host_batch
  wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
  return n / wall, 1e6 * cpu / n


def compare(config, source, loader: str, steps: int, rounds: int) -> list:
  """Rows for masks off and on (ScD and BcD) with ``loader``."""
  from spad_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  examples, configs = {}, {}
  for masks in (False, True):
    cfg = config.copy_and_resolve_references()
    cfg.data.loader = loader
    cfg.spad.scd = cfg.spad.bcd = masks
    configs[masks] = cfg
    examples[masks] = pipeline.TrainExamples(source, cfg)
  runs = {False: [], True: []}
  start = 0
  for r in range(rounds):
    for masks in (False, True):
      runs[masks].append(_segment(examples[masks], configs[masks], start,
                                  steps))
      ips, cpu = runs[masks][-1]
      print(f'round {r + 1}/{rounds}  {loader:6s} masks='
            f'{"on " if masks else "off"}  {ips:8.1f} img/s  {cpu:6.1f} '
            'CPU us/img', flush=True)
    start += steps + 1
  slowdown = statistics.median(1 - on[0] / off[0]
                               for off, on in zip(runs[False], runs[True]))
  return [{'loader': loader, 'masks': masks,
           'workers': config.data.num_workers,
           'images_per_sec': max(ips for ips, _ in runs[masks]),
           'cpu_us_per_image': statistics.median(c for _, c in runs[masks]),
           'slowdown_vs_off': slowdown} for masks in (False, True)]


def main(argv):
  del argv
  from spad_jax.data import sources  # pylint: disable=g-import-not-at-top
  config = FLAGS.config
  source = sources.load_split(config, 'train')
  rows = []
  for loader in FLAGS.loaders:
    rows += compare(config, source, loader, FLAGS.steps, FLAGS.rounds)
  meta = {'data': config.data.name, 'image_size': config.data.image_size,
          'batch_size': config.train.batch_size,
          'num_workers': config.data.num_workers, 'cpus': os.cpu_count(),
          'steps': FLAGS.steps, 'rounds': FLAGS.rounds,
          'date': time.strftime('%Y-%m-%d')}
  os.makedirs(FLAGS.out, exist_ok=True)
  with open(os.path.join(FLAGS.out, 'pipeline_throughput.json'), 'w') as f:
    json.dump({'meta': meta, 'rows': rows}, f, indent=1)
  lines = [f'{meta["data"]} at {meta["image_size"]}², batch '
           f'{meta["batch_size"]}, {meta["num_workers"]} workers, '
           f'{meta["cpus"]} CPUs, {meta["date"]}; {FLAGS.rounds} pairs of '
           f'{FLAGS.steps}-batch segments.', '',
           '| loader | masks off (img/s) | masks on (img/s) | slowdown '
           '(median of pairs) | CPU µs/img off | on |',
           '|---|---:|---:|---:|---:|---:|']
  for loader in FLAGS.loaders:
    off, on = (r for r in rows if r['loader'] == loader)
    lines.append(f'| {loader} | {off["images_per_sec"]:.0f} | '
                 f'{on["images_per_sec"]:.0f} | '
                 f'{100 * on["slowdown_vs_off"]:.1f} % | '
                 f'{off["cpu_us_per_image"]:.0f} | '
                 f'{on["cpu_us_per_image"]:.0f} |')
  text = '\n'.join(lines) + '\n'
  with open(os.path.join(FLAGS.out, 'pipeline_throughput.md'), 'w') as f:
    f.write(text)
  print(text)


if __name__ == '__main__':
  define_flags()
  app.run(main)
