r"""Train-step speed ratio, ours against the PyTorch reference, in one process.

Both steps are built once (perf.py's runners: the same UNet, loss and
Adam + EMA update), then timed in alternated rounds A B B A (A = ours,
B = torch), each block ``--steps`` steps. A round's ratio is torch's time
over ours (> 1: ours is faster); the report gives the median over rounds
with a bootstrap interval over rounds, and an A/A control: the ratio of
each round's two blocks of ours, whose interval shows the noise.

  python bench/step_ratio.py --preset=cpu    # DESIGN UNet, 64², batch 8
  python bench/step_ratio.py --preset=demo   # configs/demo.py's UNet

Writes ``<out>/step_ratio_<preset>.json``.
"""

import json
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

try:  # Before TensorFlow: torch._dynamo segfaults when imported after it.
  import torch  # pylint: disable=g-import-not-at-top,unused-import
  import torch._dynamo  # pylint: disable=g-import-not-at-top,unused-import
except ImportError:
  torch = None

from absl import app  # pylint: disable=g-import-not-at-top,wrong-import-position
from absl import flags  # pylint: disable=g-import-not-at-top,wrong-import-position

import perf  # pylint: disable=g-import-not-at-top,wrong-import-position
from spad_jax import files  # pylint: disable=g-import-not-at-top,wrong-import-position

FLAGS = flags.FLAGS
flags.DEFINE_integer('rounds', 8, 'ABBA rounds.')
flags.DEFINE_integer('steps', 3, 'Steps per timed block.')
flags.DEFINE_bool('spad', True, 'Our step with SPAD\'s perturbation (what '
                  'training runs; the reference has none).')
FLAGS.set_default('out', 'bench_results/step_ratio')


def main(argv):
  del argv
  if torch is None:
    raise app.UsageError('PyTorch is not installed: pip install -r '
                         'bench/requirements-torch.txt')
  import jax  # pylint: disable=g-import-not-at-top
  preset = perf.PRESETS[FLAGS.preset]
  size, batch = preset['sizes'][0], preset['batches'][0]
  ours, _, _ = perf.jax_train_runner(preset, size, batch, 'float32',
                                     FLAGS.spad)
  ref, info = perf.torch_train_runner(preset, size, batch, 'float32', 'auto')
  ours(1)
  ref(1)

  def timed(run):
    t0 = time.perf_counter()
    run(FLAGS.steps)
    return time.perf_counter() - t0

  rows = []
  for r in range(FLAGS.rounds):
    a1, b1, b2, a2 = timed(ours), timed(ref), timed(ref), timed(ours)
    rows.append({'round': r, 'ours_s': [a1, a2], 'torch_s': [b1, b2]})
    print(f'round {r + 1}/{FLAGS.rounds}: ours {1000 * (a1 + a2) / 2 / FLAGS.steps:.0f} '
          f'ms/step, torch {1000 * (b1 + b2) / 2 / FLAGS.steps:.0f} ms/step',
          flush=True)
  ratio = perf.bootstrap([(r['torch_s'][0] + r['torch_s'][1]) /
                          (r['ours_s'][0] + r['ours_s'][1]) for r in rows])
  control = perf.bootstrap([r['ours_s'][0] / r['ours_s'][1] for r in rows])
  result = {'preset': FLAGS.preset, 'size': size, 'batch': batch,
            'spad': FLAGS.spad, 'steps_per_block': FLAGS.steps,
            'torch': info, 'jax': jax.__version__,
            'torch_version': torch.__version__,
            'xla_flags': os.environ.get('XLA_FLAGS', ''),
            'date': time.strftime('%Y-%m-%d %H:%M'), 'rounds': rows,
            'ours_vs_torch': ratio, 'aa_control': control}
  os.makedirs(FLAGS.out, exist_ok=True)
  files.write_json(os.path.join(FLAGS.out, f'step_ratio_{FLAGS.preset}.json'),
                   result)
  print(f'ours / torch speed: {ratio[0]:.2f}× [{ratio[1]:.2f}, {ratio[2]:.2f}]'
        f'; A/A control {control[0]:.2f}× [{control[1]:.2f}, '
        f'{control[2]:.2f}] ({FLAGS.preset}, {FLAGS.rounds} ABBA rounds of '
        f'{FLAGS.steps} steps)')
  print(json.dumps({'ours_vs_torch': ratio, 'aa_control': control}))


if __name__ == '__main__':
  app.run(main)
