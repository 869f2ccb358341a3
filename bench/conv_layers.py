r"""Per-layer convolution costs, and the convolutions of the compiled step.

The UNet's three kinds of 3x3 convolution (stride 1; stride 2, the
downsampling; nearest 2x upsampling then stride 1), each timed as forward,
input gradient and kernel gradient, JAX against PyTorch
(``aten.convolution_backward``) in the same process, in alternated rounds.

  python bench/conv_layers.py --out=bench_results/conv_layers
  SPAD_JAX_XLA_DEFAULTS=0 python bench/conv_layers.py ...   # XLA's defaults

``--census`` also lists every convolution of the compiled train step
(perf.py's model and size) by kind: its dim_labels, window, dilations,
whether XLA sent it to a library (YNNPACK, oneDNN) and the transposes and
copies the step spends on layouts.

Writes ``<out>/conv_layers.json`` and ``<out>/conv_layers.md``.
"""

import collections
import os
import re
import sys
import time

from absl import app
from absl import flags

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

try:  # Before TensorFlow (perf.py's census loads the input pipeline).
  import torch  # pylint: disable=g-import-not-at-top
except ImportError:
  torch = None

import perf  # pylint: disable=g-import-not-at-top,wrong-import-position
from spad_jax import files  # pylint: disable=g-import-not-at-top,wrong-import-position

FLAGS = flags.FLAGS
flags.DEFINE_integer('n', 8, 'Batch.')
flags.DEFINE_integer('hw', 64, 'Input height and width.')
flags.DEFINE_integer('c', 64, 'Input and output channels.')
flags.DEFINE_integer('rounds', 5, 'Alternated rounds (median kept).')
flags.DEFINE_integer('calls', 5, 'Calls per op per round.')
flags.DEFINE_bool('census', False, 'Also list the compiled step\'s '
                  'convolutions (compiles the train step once).')
FLAGS.set_default('out', 'bench_results/conv_layers')

LAYERS = ('stride1', 'stride2', 'upsample_conv')


def jax_ops(layer, n, hw, c):
  """name -> (jitted fn, args) for forward / input / kernel gradient."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  side = hw // 2 if layer == 'upsample_conv' else hw
  x = jnp.asarray(rng.standard_normal((n, side, side, c), np.float32))
  w = jnp.asarray(rng.standard_normal((3, 3, c, c), np.float32) * 0.05)
  stride = (2, 2) if layer == 'stride2' else (1, 1)

  def layer_fn(x, w):
    if layer == 'upsample_conv':
      x = jax.image.resize(x, (n, 2 * side, 2 * side, c), 'nearest')
    return jax.lax.conv_general_dilated(
        x, w, stride, 'SAME', dimension_numbers=('NHWC', 'HWIO', 'NHWC'))

  g = jnp.ones_like(layer_fn(x, w))
  return {
      'forward': (jax.jit(layer_fn), (x, w)),
      'input_grad': (jax.jit(
          lambda x, w: jax.vjp(lambda x: layer_fn(x, w), x)[1](g)[0]), (x, w)),
      'kernel_grad': (jax.jit(
          lambda x, w: jax.vjp(lambda w: layer_fn(x, w), w)[1](g)[0]), (x, w)),
  }


def torch_ops(layer, n, hw, c):
  import numpy as np  # pylint: disable=g-import-not-at-top
  torch.set_num_threads(len(os.sched_getaffinity(0)))
  rng = np.random.default_rng(0)
  side = hw // 2 if layer == 'upsample_conv' else hw
  x = torch.tensor(rng.standard_normal((n, c, side, side), np.float32)
                   ).contiguous(memory_format=torch.channels_last)
  w = torch.tensor(rng.standard_normal((c, c, 3, 3), np.float32) * 0.05)
  stride = 2 if layer == 'stride2' else 1
  if layer == 'upsample_conv':
    x = torch.nn.functional.interpolate(x, scale_factor=2, mode='nearest'
                                        ).contiguous(
                                            memory_format=torch.channels_last)
  with torch.no_grad():
    y = torch.nn.functional.conv2d(x, w, stride=stride, padding=1)
  g = torch.ones_like(y)

  def backward(mask):
    def fn():
      with torch.no_grad():
        return torch.ops.aten.convolution_backward(
            g, x, w, None, [stride] * 2, [1, 1], [1, 1], False, [0, 0], 1,
            mask)
    return fn

  def forward():
    with torch.no_grad():
      return torch.nn.functional.conv2d(x, w, stride=stride, padding=1)

  # Torch's input gradient here excludes the upsampling's own backward.
  return {'forward': forward, 'input_grad': backward([True, False, False]),
          'kernel_grad': backward([False, True, False])}


def flops(layer, n, hw, c):
  out = hw // 2 if layer == 'stride2' else hw
  return 2 * n * out * out * 9 * c * c


def time_layers(n, hw, c, rounds, calls):
  """[{layer, op, framework, ms}] medians over alternated rounds."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  timers = []
  for layer in LAYERS:
    for op, (fn, args) in jax_ops(layer, n, hw, c).items():
      jax.block_until_ready(fn(*args))  # Compile.

      def call(fn=fn, args=args):
        jax.block_until_ready(fn(*args))
      timers.append(((layer, op, 'jax'), call))
    if torch is not None:
      for op, fn in torch_ops(layer, n, hw, c).items():
        fn()
        timers.append(((layer, op, 'torch'), fn))
  times = collections.defaultdict(list)
  for r in range(rounds):
    for key, fn in (timers if r % 2 == 0 else timers[::-1]):
      t0 = time.perf_counter()
      for _ in range(calls):
        fn()
      times[key].append((time.perf_counter() - t0) / calls * 1e3)
  rows = []
  for (layer, op, fw), ms in times.items():
    med = float(np.median(ms))
    rows.append({'layer': layer, 'op': op, 'framework': fw, 'ms': med,
                 'gflops': flops(layer, n, hw, c) / med / 1e6})
  return rows


def census(preset_name):
  """Convolutions and layout ops of the optimised train-step HLO."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from spad_jax import train  # pylint: disable=g-import-not-at-top
  from spad_jax import train_state  # pylint: disable=g-import-not-at-top
  preset = perf.PRESETS[preset_name]
  size, batch = preset['sizes'][0], preset['batches'][0]
  config = perf.bench_config(preset, size, batch, 'float32', True)
  setup = train_state.Setup.from_config(config)
  state = train_state.replicate(train_state.create_train_state(
      config, setup.model, jax.random.key(0), 10))
  step = train.p_train_step(config, setup.model, setup.schedule, 10)
  data = jax.pmap(lambda x: x)(perf.random_batch(
      np.random.default_rng(0), jax.local_device_count(), batch, size,
      config.data.num_classes))
  text = step.lower(state, data, train_state.replicate(
      jax.random.key(1))).compile().as_text()
  return summarize_hlo(text)


def conv_kind(window: str) -> str:
  """What a convolution of the optimised step computes, from its window."""
  if 'lhs_dilate' in window:
    return 'input gradient of a strided conv (lhs_dilate)'
  if 'rhs_dilate' in window:
    return 'kernel gradient of a strided conv (rhs_dilate)'
  size = re.search(r'size=(\d+)x(\d+)', window)
  if size and int(size.group(1)) > 3:  # The window is the image.
    return 'kernel gradient'
  return 'forward or input gradient'


def summarize_hlo(text):
  """Convolutions of an optimised HLO module by kind, dim_labels and library
  (a fusion XLA sent to YNNPACK/oneDNN), and its layout ops."""
  library = {}  # Fused computation -> library of the fusion calling it.
  for m in re.finditer(r'%([\w.\-]+) = [^\n]* fusion\([^\n]*calls=%([\w.\-]+)',
                       text):
    name = m.group(1)
    library[m.group(2)] = ('ynn' if name.startswith('ynn') else
                           'onednn' if 'onednn' in name else 'xla')
  convs = collections.Counter()
  layout_ops = collections.Counter()  # Kernels of the entry computation.
  current, entry = None, False
  for line in text.splitlines():
    head = re.match(r'^(ENTRY )?%([\w.\-]+) .*\{$', line)
    if head:
      current, entry = head.group(2), bool(head.group(1))
      continue
    if ' convolution(' in line:
      labels = re.search(r'dim_labels=([\w>-]+)', line)
      window = re.search(r'window=\{([^}]*)\}', line)
      convs[(conv_kind(window.group(1) if window else ''),
             labels.group(1) if labels else '?',
             library.get(current, 'xla'))] += 1
    if entry and ' = ' in line:
      name = line.split(' = ')[0].strip().lstrip('ROOT ').lstrip('%')
      if re.match(r'(transpose|copy|wrapped_copy|wrapped_transpose)', name):
        layout_ops[name.split('.')[0]] += 1
  return {'convolutions': [
      {'kind': k[0], 'dim_labels': k[1], 'library': k[2], 'count': v}
      for k, v in sorted(convs.items(), key=lambda kv: -kv[1])],
          'layout_ops': dict(layout_ops)}


def markdown(result):
  lines = ['# Convolution layers', '', result['meta'], '',
           '| layer | op | JAX ms | JAX GFLOP/s | torch ms | torch GFLOP/s |'
           ' JAX / torch speed |', '|---|---|---:|---:|---:|---:|---:|']
  by = {(r['layer'], r['op'], r['framework']): r for r in result['layers']}
  for layer in LAYERS:
    for op in ('forward', 'input_grad', 'kernel_grad'):
      j, t = by.get((layer, op, 'jax')), by.get((layer, op, 'torch'))
      cells = [layer, op, f'{j["ms"]:.1f}', f'{j["gflops"]:.0f}']
      cells += ([f'{t["ms"]:.1f}', f'{t["gflops"]:.0f}',
                 f'{t["ms"] / j["ms"]:.2f}×'] if t else ['–'] * 3)
      lines.append('| ' + ' | '.join(cells) + ' |')
  if result.get('census'):
    lines += ['', '## Convolutions in the compiled train step', '',
              '| count | kind | dim_labels | library |',
              '|---:|---|---|---|']
    for c in result['census']['convolutions']:
      lines.append(f'| {c["count"]} | {c["kind"]} | `{c["dim_labels"]}` '
                   f'| {c["library"]} |')
    lines += ['', 'Layout ops: ' + ', '.join(
        f'{k} {v}' for k, v in result['census']['layout_ops'].items())]
  return '\n'.join(lines) + '\n'


def main(argv):
  del argv
  import jax  # pylint: disable=g-import-not-at-top
  result = {'meta': (f'N = {FLAGS.n}, {FLAGS.hw}², {FLAGS.c} → {FLAGS.c} '
                     f'channels, float32, jax {jax.__version__}, torch '
                     f'{torch.__version__ if torch else "absent"}, '
                     f'{os.cpu_count()} CPUs, XLA_FLAGS '
                     f'"{os.environ.get("XLA_FLAGS", "")}", '
                     f'{FLAGS.rounds} rounds × {FLAGS.calls} calls, '
                     f'{time.strftime("%Y-%m-%d %H:%M")}')}
  result['layers'] = time_layers(FLAGS.n, FLAGS.hw, FLAGS.c, FLAGS.rounds,
                                 FLAGS.calls)
  if FLAGS.census:
    result['census'] = census(FLAGS.preset)
  os.makedirs(FLAGS.out, exist_ok=True)
  files.write_json(os.path.join(FLAGS.out, 'conv_layers.json'), result)
  files.write_atomic(os.path.join(FLAGS.out, 'conv_layers.md'),
                     markdown(result))
  print(markdown(result))


if __name__ == '__main__':
  app.run(main)
