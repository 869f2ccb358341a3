r"""The train step against its plainer forms, in one process.

Variants, each compiled in one process with perf.py's runner (the same
model, batch and SPAD masks):

* ``plain``: the step with the plain forms of two package choices: flax's
  ``nn.GroupNorm`` + ``nn.silu`` (autodiff's gradient) instead of
  ``models.norm.GroupNorm``, and the optimizer update with a ``where`` per
  state leaf instead of ``train._apply_update``'s one ``lax.cond``;
* ``+cond``: ``plain`` with the package's update;
* ``package``: the step as the package runs it (both);
* ``spad_off``: the package's step without SPAD's perturbation.

They are timed in alternated rounds (forward order, then reversed), each
block ``--steps`` steps. A variant's speed-up in a round is ``plain``'s
time over its own; the report gives the median over rounds with a
bootstrap interval, in wall time and in process CPU time (which hypervisor
steal does not inflate), SPAD's cost (``package`` over ``spad_off``), and
an A/A control from ``plain``'s two blocks. ``--layers`` also times the
two GroupNorms (+ SiLU) alone, forward + backward, at the demo UNet's
shapes; ``--ops`` profiles the package's step with jax.profiler and
reports its time per kind of XLA op (convolutions, layout transposes,
reduce-windows, fusions).

  python bench/step_ab.py --preset=demo
  python bench/step_ab.py --preset=cpu --rounds=8

Writes ``<out>/step_ab_<preset>.json``.
"""

import json
import os
import shutil
import sys
import time

from absl import app
from absl import flags

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import perf  # pylint: disable=g-import-not-at-top,wrong-import-position
from spad_jax import files  # pylint: disable=g-import-not-at-top,wrong-import-position

FLAGS = flags.FLAGS
flags.DEFINE_integer('rounds', 16, 'Alternated rounds.')
flags.DEFINE_integer('steps', 3, 'Steps per timed block.')
flags.DEFINE_bool('layers', True, 'Also time GroupNorm + SiLU alone.')
flags.DEFINE_bool('ops', True, 'Also profile the package\'s step '
                  '(jax.profiler) and write its time per XLA op kind.')
FLAGS.set_default('out', 'bench_results/step_ab')

VARIANTS = ('plain', '+cond', 'package', 'spad_off')
GROUPNORM_SHAPES = (((8, 64, 64, 16), 16), ((8, 64, 64, 48), 16),
                    ((8, 32, 32, 32), 32), ((8, 16, 16, 64), 32))


def where_update(state, grads, finite, ema_decay):
  """The update with a ``where`` per leaf (the plain form of
  ``train._apply_update``)."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  from spad_jax import train  # pylint: disable=g-import-not-at-top
  updates, new_opt = state.tx.update(grads, state.opt_state, state.params)
  new_params = optax.apply_updates(state.params, updates)
  decay = train.ema_decay_at(state.step, ema_decay)
  new_ema = jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p,
                         state.ema_params, new_params)
  keep = lambda new, old: jax.tree.map(
      lambda n, o: jnp.where(finite, n, o), new, old)
  return state.replace(
      step=state.step + 1, params=keep(new_params, state.params),
      ema_params=keep(new_ema, state.ema_params),
      opt_state=keep(new_opt, state.opt_state),
      nonfinite_streak=jnp.where(finite, 0, state.nonfinite_streak + 1))


def build(variant, preset):
  """perf.py's train runner for ``variant``."""
  from spad_jax import train  # pylint: disable=g-import-not-at-top
  from spad_jax.models import unet  # pylint: disable=g-import-not-at-top
  package = (train._apply_update, unet._norm)  # pylint: disable=protected-access
  try:
    if variant == 'plain':
      train._apply_update = where_update  # pylint: disable=protected-access
    if variant in ('plain', '+cond'):
      unet._norm = unet.flax_norm  # pylint: disable=protected-access
    run, _, _ = perf.jax_train_runner(preset, preset['sizes'][0],
                                      preset['batches'][0], 'float32',
                                      variant != 'spad_off')
  finally:
    train._apply_update, unet._norm = package  # pylint: disable=protected-access
  return run


def time_steps(preset, rounds, steps):
  import numpy as np  # pylint: disable=g-import-not-at-top
  runs = {v: build(v, preset) for v in VARIANTS}
  wall = {v: [] for v in VARIANTS}
  cpu = {v: [] for v in VARIANTS}
  for r in range(rounds):
    order = VARIANTS if r % 2 == 0 else VARIANTS[::-1]
    for v in order + order[::-1]:
      c0, t0 = time.process_time(), time.perf_counter()
      runs[v](steps)
      wall[v].append((time.perf_counter() - t0) / steps)
      cpu[v].append((time.process_time() - c0) / steps)
    print(f'round {r + 1}/{rounds}: ' + '  '.join(
        f'{v} {1000 * np.mean(wall[v][-2:]):.0f} ms' for v in VARIANTS),
          flush=True)
  per_round = lambda d, v: np.asarray(d[v]).reshape(rounds, 2).sum(1)
  out = {'ms_per_step': {v: 1000 * float(np.median(wall[v]))
                         for v in VARIANTS},
         'cpu_ms_per_step': {v: 1000 * float(np.median(cpu[v]))
                             for v in VARIANTS},
         'speedup': {}, 'cpu_speedup': {}}
  for v in VARIANTS[1:3]:
    out['speedup'][v] = perf.bootstrap(per_round(wall, 'plain') /
                                       per_round(wall, v))
    out['cpu_speedup'][v] = perf.bootstrap(per_round(cpu, 'plain') /
                                           per_round(cpu, v))
  # SPAD's cost: the package's step with it over the same step without.
  out['spad_cost'] = perf.bootstrap(per_round(wall, 'package') /
                                    per_round(wall, 'spad_off'))
  out['spad_cost_cpu'] = perf.bootstrap(per_round(cpu, 'package') /
                                        per_round(cpu, 'spad_off'))
  ref = np.asarray(wall['plain']).reshape(rounds, 2)
  out['aa_control'] = perf.bootstrap(ref[:, 0] / ref[:, 1])
  return out


def time_groupnorm(rounds, calls=20):
  """ms of GroupNorm + SiLU forward + backward, flax's against the
  package's."""
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from spad_jax.models import norm  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  rows = []
  for shape, groups in GROUPNORM_SHAPES:
    x = jnp.asarray(rng.standard_normal(shape, np.float32))
    cot = jnp.asarray(rng.standard_normal(shape, np.float32))
    layers = {'flax': nn.GroupNorm(num_groups=groups),
              'package': norm.GroupNorm(num_groups=groups, silu=True)}
    post = {'flax': nn.silu, 'package': lambda y: y}
    fns, params = {}, {}
    for name, layer in layers.items():
      params[name] = layer.init(jax.random.key(0), x)
      fn = lambda p, x, layer=layer, post=post[name]: post(layer.apply(p, x))
      fns[name] = jax.jit(lambda p, x, c, fn=fn: jax.vjp(fn, p, x)[1](c))
      jax.block_until_ready(fns[name](params[name], x, cot))
    times = {k: [] for k in fns}
    for r in range(rounds):
      for name in (('flax', 'package') if r % 2 == 0 else
                   ('package', 'flax')):
        t0 = time.perf_counter()
        for _ in range(calls):
          out = fns[name](params[name], x, cot)
        jax.block_until_ready(out)
        times[name].append(1000 * (time.perf_counter() - t0) / calls)
    row = {'shape': list(shape), 'groups': groups,
           **{f'{k}_ms': float(np.median(v)) for k, v in times.items()}}
    row['speedup'] = perf.bootstrap(np.asarray(times['flax']) /
                                    np.asarray(times['package']))
    rows.append(row)
    print(f'GroupNorm + SiLU {shape} / {groups}: flax {row["flax_ms"]:.2f} '
          f'ms, package {row["package_ms"]:.2f} ms', flush=True)
  return rows


def op_kinds(trace_dir, steps):
  """ms per step of each kind of XLA op (the op name without its numeric
  suffix, e.g. ``transpose_copy_fusion``) in a jax.profiler trace."""
  import collections  # pylint: disable=g-import-not-at-top
  import glob  # pylint: disable=g-import-not-at-top
  import gzip  # pylint: disable=g-import-not-at-top
  import re  # pylint: disable=g-import-not-at-top
  path = glob.glob(os.path.join(trace_dir, '**', '*.trace.json.gz'),
                   recursive=True)[0]
  with gzip.open(path) as f:
    events = json.load(f)['traceEvents']
  # Host-side spans (Python frames, the executor, PjRt) are not XLA ops.
  host = ('$', 'Thunk', 'Pjit', 'Parse', 'Common', 'Threadpool', 'end:',
          'Wait', 'Allocate', 'Handle')
  total, count = collections.Counter(), collections.Counter()
  for e in events:
    if e.get('ph') != 'X' or e['name'].startswith(host):
      continue
    kind = re.sub(r'\.\d+$', '', e['name'])
    kind = 'convolution' if kind.startswith('conv') else kind
    total[kind] += e.get('dur', 0) / 1000 / steps
    count[kind] += 1 / steps
  all_ms = sum(total.values())
  return [{'op': k, 'ms_per_step': v, 'share': v / all_ms,
           'per_step': round(count[k])} for k, v in total.most_common()]


def profile_ops(preset, out_dir, steps=5):
  import jax  # pylint: disable=g-import-not-at-top
  run = build('package', preset)
  run(2)
  trace_dir = os.path.join(out_dir, 'trace')
  shutil.rmtree(trace_dir, ignore_errors=True)  # op_kinds reads the one trace.
  with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
    run(steps)
  rows = op_kinds(trace_dir, steps)
  for r in rows[:8]:
    print(f'{r["op"]:28s} {r["ms_per_step"]:7.2f} ms  {100 * r["share"]:4.1f} %')
  return rows


def main(argv):
  del argv
  preset = perf.PRESETS[FLAGS.preset]
  result = {'preset': FLAGS.preset, 'rounds': FLAGS.rounds,
            'steps': FLAGS.steps, 'versions': perf.versions(),
            'date': time.strftime('%Y-%m-%d')}
  if FLAGS.layers:
    result['groupnorm'] = time_groupnorm(max(5, FLAGS.rounds // 2))
  result['step'] = time_steps(preset, FLAGS.rounds, FLAGS.steps)
  if FLAGS.ops:
    result['ops'] = profile_ops(preset, FLAGS.out)
  for v in VARIANTS[1:3]:
    med, lo, hi = result['step']['speedup'][v]
    print(f'{v}: {med:.3f}x [{lo:.3f}, {hi:.3f}] against plain')
  med, lo, hi = result['step']['spad_cost']
  print(f'SPAD on / off: {med:.3f}x the time [{lo:.3f}, {hi:.3f}]')
  lo_hi = result['step']['aa_control']
  print(f'A/A control {lo_hi[0]:.3f}x [{lo_hi[1]:.3f}, {lo_hi[2]:.3f}]')
  os.makedirs(FLAGS.out, exist_ok=True)
  path = os.path.join(FLAGS.out, f'step_ab_{FLAGS.preset}.json')
  files.write_json(path, result)
  print(f'wrote {path}')


if __name__ == '__main__':
  app.run(main)
