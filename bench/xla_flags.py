r"""XLA:CPU flag settings, each measured against XLA's defaults.

XLA reads its flags once per process, so every setting runs in its own
process. Settings run in rounds whose order alternates (A B C … then … C B
A), so a drift in the machine's speed falls on every setting alike. Each
process times single train steps (and sampling calls) after a warm-up; a
setting's speed-up in a round is the median time under XLA's defaults in
that round over its own median. The report gives the median over rounds and
a bootstrap interval that resamples the timed calls within each process. The
``xla_defaults_aa`` setting is XLA's defaults again: an A/A control, whose
interval shows the noise.

  python bench/xla_flags.py --out=bench_results/xla_flags

Writes ``<out>/xla_flags.json`` and ``<out>/xla_flags.md`` after every
process (a rerun skips the processes already recorded).
"""

import json
import os
import subprocess
import sys
import time

from absl import app
from absl import flags

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)  # perf.py's runners.

import perf  # pylint: disable=g-import-not-at-top,wrong-import-position
from spad_jax import files  # pylint: disable=g-import-not-at-top,wrong-import-position
from spad_jax import formatting  # pylint: disable=g-import-not-at-top,wrong-import-position

FLAGS = flags.FLAGS
flags.DEFINE_list('settings', None, 'Settings to run (default: all).')
flags.DEFINE_integer('rounds', 2, 'Rounds; odd rounds run in reverse order.')
flags.DEFINE_integer('steps', 8, 'Timed train steps per process.')
flags.DEFINE_integer('samples', 3, 'Timed sampling calls per process (0: '
                     'no sampling).')
# perf.py's --preset picks the model and size (cpu: the DESIGN UNet at 64²,
# batch 8; tiny: a toy, for the test); --out is perf.py's flag too.
FLAGS.set_default('out', 'bench_results/xla_flags')
flags.DEFINE_string('child', None, 'Internal: run one measurement.')

YNN_OFF = '--xla_cpu_experimental_ynn_fusion_type='
# name -> (XLA_FLAGS, whether the package's own CPU flags are added).
SETTINGS = {
    'xla_defaults': ('', False),
    'xla_defaults_aa': ('', False),
    'package': ('', True),  # What every spad_jax process runs with.
    'ynn_without_conv': (
        '--xla_cpu_experimental_ynn_fusion_type=-individual_convolution',
        False),
    'package+concurrency_scheduler': (
        '--xla_cpu_enable_concurrency_optimized_scheduler=true', True),
    'package+onednn_custom_call': (
        '--xla_cpu_experimental_onednn_custom_call=true', True),
    'package+xnnpack': ('--xla_cpu_use_xnnpack=true', True),
}
SAMPLING = dict(size=64, steps=10, batch=16, n=1)


def child(name):
  """One process: warm-up, then per-call times (s) of a step and a sampler."""
  import jax  # pylint: disable=g-import-not-at-top
  preset = perf.PRESETS[FLAGS.preset]
  size, batch = preset['sizes'][0], preset['batches'][0]
  out = {'setting': name, 'xla_flags': os.environ.get('XLA_FLAGS', ''),
         'threads': os.cpu_count(), 'jax': jax.__version__}
  run, out['step_compile_s'], _ = perf.jax_train_runner(
      preset, size, batch, 'float32', True)
  out['step_s'] = []
  for _ in range(FLAGS.steps):
    t0 = time.perf_counter()
    run(1)
    out['step_s'].append(time.perf_counter() - t0)
  if FLAGS.samples:
    s = SAMPLING if FLAGS.preset == 'cpu' else dict(
        size=preset['sample_size'], steps=2, batch=2, n=1)
    run, out['sample_compile_s'], out['sample_images'] = (
        perf.jax_sampling_runner(preset, s['size'], s['steps'], s['batch'],
                                 s['n'], 'float32'))
    out['sample_s'] = []
    for _ in range(FLAGS.samples):
      t0 = time.perf_counter()
      run(1)
      out['sample_s'].append(time.perf_counter() - t0)
  print('RESULT ' + json.dumps(out))


def _run_child(name, rnd):
  extra, package = SETTINGS[name]
  env = dict(os.environ, XLA_FLAGS=extra)
  env['SPAD_JAX_XLA_DEFAULTS'] = '1' if package else '0'
  cmd = [sys.executable, os.path.abspath(__file__), f'--child={name}',
         f'--steps={FLAGS.steps}', f'--samples={FLAGS.samples}',
         f'--preset={FLAGS.preset}']
  proc = subprocess.run(cmd, env=env, capture_output=True, text=True,
                        check=False)
  lines = [l for l in proc.stdout.splitlines() if l.startswith('RESULT ')]
  if proc.returncode or not lines:
    raise RuntimeError(f'setting {name} (round {rnd}) failed with exit code '
                       f'{proc.returncode}:\n{proc.stderr[-3000:]}')
  row = json.loads(lines[-1][len('RESULT '):])
  row['round'] = rnd
  return row


def _median(values):
  import numpy as np  # pylint: disable=g-import-not-at-top
  return float(np.median(values))


def speedups(rows, field, boots=2000, seed=0):
  """name -> (median speed-up over rounds, 2.5 %, 97.5 % bootstrap)."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(seed)
  by = {(r['setting'], r['round']): np.asarray(r[field]) for r in rows
        if field in r}
  rounds = sorted({rnd for _, rnd in by})
  out = {}
  for name in dict.fromkeys(s for s, _ in by):
    pairs = [(by[('xla_defaults', r)], by[(name, r)]) for r in rounds
             if ('xla_defaults', r) in by and (name, r) in by]
    if not pairs:
      continue
    point = _median([np.median(a) / np.median(b) for a, b in pairs])
    draws = [
        np.median([np.median(rng.choice(a, a.size)) /
                   np.median(rng.choice(b, b.size)) for a, b in pairs])
        for _ in range(boots)]
    out[name] = (point, float(np.quantile(draws, 0.025)),
                 float(np.quantile(draws, 0.975)))
  return out


def markdown(result):
  rows = result['rows']
  lines = ['# XLA:CPU flags against XLA\'s defaults', '',
           f'{result["meta"]}', '',
           '| setting | XLA_FLAGS | train step ms (median) | step speed-up '
           '[95 % CI] | sampling ms/image | sampling speed-up [95 % CI] |',
           '|---|---|---:|---:|---:|---:|']
  step = speedups(rows, 'step_s')
  samp = speedups(rows, 'sample_s')
  for name in dict.fromkeys(r['setting'] for r in rows):
    mine = [r for r in rows if r['setting'] == name]
    step_ms = 1000 * _median([t for r in mine for t in r['step_s']])
    cells = [name, f'`{mine[0]["xla_flags"]}`' if mine[0]['xla_flags']
             else '(none)', f'{step_ms:.0f}']
    cells.append(_ci(step.get(name)))
    if mine[0].get('sample_s'):
      per_image = 1000 * _median([t for r in mine for t in r['sample_s']]) / (
          mine[0]['sample_images'])
      cells += [f'{per_image:.1f}', _ci(samp.get(name))]
    else:
      cells += ['–', '–']
    lines.append('| ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines) + '\n'


def _ci(value):
  if value is None:
    return '–'
  point, lo, hi = value
  return f'{point:.2f}× [{lo:.2f}, {hi:.2f}]'


def main(argv):
  del argv
  if FLAGS.child:
    child(FLAGS.child)
    return
  names = FLAGS.settings or list(SETTINGS)
  unknown = [n for n in names if n not in SETTINGS]
  if unknown:
    raise app.UsageError(f'--settings: unknown {unknown}; known: '
                         f'{sorted(SETTINGS)}')
  if 'xla_defaults' not in names:
    names = ['xla_defaults'] + names  # The reference of every ratio.
  os.makedirs(FLAGS.out, exist_ok=True)
  path = os.path.join(FLAGS.out, 'xla_flags.json')
  result = {'rows': []}
  if os.path.exists(path):
    with open(path) as f:
      result = json.load(f)
  result['meta'] = (f'preset {FLAGS.preset}, {FLAGS.steps} train steps and '
                    f'{FLAGS.samples} sampling calls per process, '
                    f'{FLAGS.rounds} rounds, {time.strftime("%Y-%m-%d")}, '
                    f'{os.cpu_count()} CPUs')
  done = {(r['setting'], r['round']) for r in result['rows']}
  order = [(rnd, name) for rnd in range(FLAGS.rounds)
           for name in (names if rnd % 2 == 0 else names[::-1])]
  todo = [(rnd, name) for rnd, name in order if (name, rnd) not in done]
  start = time.time()
  for i, (rnd, name) in enumerate(todo):
    row = _run_child(name, rnd)
    result['rows'].append(row)
    files.write_json(path, result)
    files.write_atomic(os.path.join(FLAGS.out, 'xla_flags.md'),
                     markdown(result))
    left = (time.time() - start) / (i + 1) * (len(todo) - i - 1)
    print(f'[{i + 1}/{len(todo)}] round {rnd} {name}: step '
          f'{1000 * _median(row["step_s"]):.0f} ms; ETA '
          f'{formatting.hms(left)}', flush=True)
  print(markdown(result))


if __name__ == '__main__':
  app.run(main)
