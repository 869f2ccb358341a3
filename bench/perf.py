r"""Training and sampling speed, side by side with a PyTorch reference.

One command on a GPU machine (sections can be run separately with
``--sections``, e.g. to stay under a job's time limit):

  python bench/perf.py --preset=gpu --out=bench_results/perf

On this repository's 2-core CPU machine (small sizes, minutes):

  python bench/perf.py --preset=cpu --out=bench_results/perf_cpu

Sections:
  train     img/s of the pmapped train step (device-resident batches, so the
            input pipeline is out of the measurement), per image size, batch,
            dtype, SPAD on/off; model FLOP utilisation from XLA's cost
            analysis against the device's bf16 peak (``--peak_tflops``).
  torch     the same UNet, loss and Adam+EMA step in PyTorch
            (bench/torch_unet.py): channels-last, ``torch.compile`` where it
            compiles, AMP bfloat16; our img/s as a ratio to it.
  sampling  full and strided chains (``--sample_steps``), batch 1/16,
            ensembles 4/16: ms per image and images/s, JAX and PyTorch.
  pipeline  the input pipeline (numpy loader, masks on/off) on all CPU cores,
            against what the fastest train setting consumes.
  profile   where one train step's time goes (forward, backward, the rest),
            by timing jitted parts; ``--trace`` also writes a
            ``jax.profiler`` trace (open in TensorBoard or Perfetto).

Writes ``<out>/perf.json`` and ``<out>/perf.md``; progress goes to stdout.
Timings are the best of ``--repeats`` runs of ``--iters`` steps after an
untimed compile/warm-up call.
"""

import os
import platform
import time

from absl import app
from absl import flags

from spad_jax import files  # numpy only: safe before torch/TensorFlow.

FLAGS = flags.FLAGS
flags.DEFINE_enum('preset', 'cpu', ['gpu', 'cpu', 'demo', 'tiny'],
                  'Size grid: gpu (the issue''s), cpu (this machine), demo '
                  '(configs/demo.py\'s UNet), tiny (seconds; the test).')
flags.DEFINE_list('sections', ['train', 'torch', 'sampling', 'pipeline',
                               'profile'], 'What to measure.')
flags.DEFINE_list('sizes', None, 'Image sizes (default: from the preset).')
flags.DEFINE_list('batches', None, 'Global batch sizes (default: preset).')
flags.DEFINE_list('dtypes', None, 'float32 and/or bfloat16 (default: preset).')
flags.DEFINE_list('sample_steps', None, 'Sampling chain lengths (preset).')
flags.DEFINE_integer('iters', None, 'Timed steps per repeat (preset).')
flags.DEFINE_integer('repeats', 3, 'Timed repeats; the best is kept.')
flags.DEFINE_float('peak_tflops', 0.0, 'Device bf16 dense peak for MFU; 0: '
                   'from a table of known GPUs (none for CPUs).')
flags.DEFINE_enum('torch_compile', 'auto', ['auto', 'on', 'off'],
                  'torch.compile the reference: auto tries it and records '
                  'a failure (then eager); on fails the run instead.')
flags.DEFINE_string('data_config', 'configs/duke_dme.py',
                    'Config whose data the pipeline section reads (falls '
                    'back to nothing: the section is skipped and says why).')
flags.DEFINE_string('data_root', '', 'Overrides data.root of --data_config '
                    '(e.g. a copy of the data carried to a GPU machine).')
flags.DEFINE_bool('trace', False, 'Write a jax.profiler trace (profile).')
flags.DEFINE_string('out', 'bench_results/perf', 'Output folder.')

SAMPLE_SETTINGS = [(1, 1), (16, 1), (1, 4), (1, 16)]  # (batch, ensemble).
PRESETS = {
    # The grid, the DESIGN UNet (5.7 M parameters), T = 250.
    'gpu': dict(sizes=[128, 256], batches=[8, 16, 32],
                dtypes=['float32', 'bfloat16'], sample_steps=[10, 25, 50, 250],
                sample_size=256, sample_settings=SAMPLE_SETTINGS, iters=20,
                model={}),
    # The DESIGN UNet at sizes a 2-core CPU gets through in minutes.
    'cpu': dict(sizes=[64], batches=[8], dtypes=['float32'],
                sample_steps=[10, 25], sample_size=64,
                sample_settings=SAMPLE_SETTINGS, iters=3, model={}),
    # configs/demo.py's UNet (≈0.8 M parameters) at its size and batch.
    'demo': dict(sizes=[64], batches=[8], dtypes=['float32'],
                 sample_steps=[10], sample_size=64,
                 sample_settings=SAMPLE_SETTINGS, iters=5,
                 model=dict(base_channels=16, channel_mult=(1, 2, 2, 4),
                            num_res_blocks=1, attention_resolutions=(8,))),
    # A toy UNet: exercises every code path in seconds (tests/test_bench.py).
    'tiny': dict(sizes=[32], batches=[4], dtypes=['float32'],
                 sample_steps=[2], sample_size=32,
                 sample_settings=[(2, 2)], iters=2,
                 model=dict(base_channels=8, channel_mult=(1, 2),
                            num_res_blocks=1, attention_resolutions=(16,),
                            norm_groups=8)),
}
# bf16 dense peak, TFLOP/s, by jax device_kind.
PEAK_TFLOPS = {'NVIDIA H100 80GB HBM3': 989.0, 'NVIDIA H100 PCIe': 756.0,
               'NVIDIA H100 NVL': 835.0, 'NVIDIA H200': 989.0,
               'NVIDIA A100-SXM4-80GB': 312.0, 'NVIDIA A100-SXM4-40GB': 312.0}


def bench_config(preset, size, batch, dtype, spad, num_steps=250):
  from configs import default  # pylint: disable=g-import-not-at-top
  config = default.get_config()
  config.data.image_size = size
  config.train.batch_size = batch
  config.model.dtype = dtype
  config.model.update(preset['model'])
  config.spad.scd = config.spad.bcd = spad
  config.diffusion.num_steps = num_steps
  return config


def bootstrap(values, boots=5000, seed=0):
  """(median, 2.5 %, 97.5 %) of ``values``' median, resampling them."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  values = np.asarray(values)
  rng = np.random.default_rng(seed)
  draws = np.median(rng.choice(values, (boots, values.size)), axis=1)
  return (float(np.median(values)), float(np.quantile(draws, 0.025)),
          float(np.quantile(draws, 0.975)))


def best_time(fn, iters, repeats):
  """Best wall time of ``iters`` calls of ``fn`` (which blocks at the end)."""
  best = float('inf')
  for _ in range(repeats):
    start = time.perf_counter()
    fn(iters)
    best = min(best, time.perf_counter() - start)
  return best


def random_batch(rng, ndev, batch, size, num_classes):
  import numpy as np  # pylint: disable=g-import-not-at-top
  per = batch // ndev
  return {
      'image': rng.normal(size=(ndev, per, size, size, 1)).astype(np.float32),
      'label': rng.integers(0, num_classes, (ndev, per, size, size),
                            dtype=np.int32),
      # Bit-packed masks (data/pipeline.py), each on ~5 % of the pixels.
      'scd_bits': np.packbits(rng.random((ndev, per, size * size)) < 0.05,
                              axis=-1),
      'bcd_bits': np.packbits(rng.random((ndev, per, size * size)) < 0.05,
                              axis=-1)}


def step_flops(compiled):
  """Per-device FLOPs of a compiled step (XLA's estimate), or None."""
  try:
    cost = compiled.cost_analysis()
  except Exception:  # pylint: disable=broad-except
    return None
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else None
  return float(cost['flops']) if cost and 'flops' in cost else None


# ----------------------------------------------------------------- JAX train


def jax_train_runner(preset, size, batch, dtype, spad):
  """(run(n): n train steps, blocking at the end; compile_s; flops)."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from spad_jax import train  # pylint: disable=g-import-not-at-top
  from spad_jax import train_state  # pylint: disable=g-import-not-at-top
  config = bench_config(preset, size, batch, dtype, spad)
  setup = train_state.Setup.from_config(config)
  ndev = jax.local_device_count()
  state = train_state.replicate(train_state.create_train_state(
      config, setup.model, jax.random.key(0), 10_000))
  p_step = train.p_train_step(config, setup.model, setup.schedule, 1000)
  batch_np = random_batch(np.random.default_rng(0), ndev, batch, size,
                          config.data.num_classes)
  dev_batch = jax.pmap(lambda x: x)(batch_np)
  key = train_state.replicate(jax.random.key(1))
  t0 = time.perf_counter()
  compiled = p_step.lower(state, dev_batch, key).compile()
  compile_s = time.perf_counter() - t0
  state, _ = compiled(state, dev_batch, key)  # Warm-up.
  jax.block_until_ready(state)

  def run(n):
    nonlocal state
    for _ in range(n):
      state, metrics = compiled(state, dev_batch, key)
    jax.block_until_ready((state, metrics))

  return run, compile_s, step_flops(compiled)


def jax_train(preset, size, batch, dtype, spad, iters, repeats, peak):
  run, compile_s, flops = jax_train_runner(preset, size, batch, dtype, spad)
  sec = best_time(run, iters, repeats)
  steps_per_s = iters / sec
  row = {'framework': 'jax', 'size': size, 'batch': batch, 'dtype': dtype,
         'spad': spad, 'images_per_s': batch * steps_per_s,
         'ms_per_step': 1000 / steps_per_s, 'compile_s': compile_s,
         'gflops_per_step_per_device': flops / 1e9 if flops else None}
  if flops and peak:
    row['mfu'] = flops * steps_per_s / (peak * 1e12)
  return row


# --------------------------------------------------------------- torch train


def torch_device():
  import torch  # pylint: disable=g-import-not-at-top
  return 'cuda' if torch.cuda.is_available() else 'cpu'


def torch_model(preset, size, compile_mode):
  """(model, compiled flag, note); eager when compiling fails in auto mode."""
  import torch  # pylint: disable=g-import-not-at-top
  import torch_unet  # pylint: disable=g-import-not-at-top
  cfg = bench_config(preset, size, 8, 'float32', False).model
  model = torch_unet.UNet(
      4, 1, base_channels=cfg.base_channels,
      channel_mult=tuple(cfg.channel_mult), num_res_blocks=cfg.num_res_blocks,
      attention_resolutions=tuple(cfg.attention_resolutions),
      num_heads=cfg.num_heads, norm_groups=cfg.norm_groups,
      image_size=size).to(torch_device(), memory_format=torch.channels_last)
  if compile_mode == 'off':
    return model, model, False, 'eager (--torch_compile=off)'
  return model, torch.compile(model), True, 'torch.compile'


def warm_up(call, model, run_model, compiled, note, compile_mode):
  """First (compiling) ``call(run_model)``; where torch.compile fails in
  auto mode, records why and falls back to the eager ``model``.

  Returns ``(run_model, compiled, note, seconds)``.
  """
  t0 = time.perf_counter()
  try:
    call(run_model)
  except Exception as e:  # pylint: disable=broad-except
    if not compiled or compile_mode == 'on':
      raise
    note = f'eager: torch.compile failed ({type(e).__name__}: {str(e)[:120]})'
    print(f'  torch.compile failed, timing eager: {note}', flush=True)
    run_model, compiled = model, False
    call(run_model)
  return run_model, compiled, note, time.perf_counter() - t0


def torch_train_runner(preset, size, batch, dtype, compile_mode):
  """(run(n): n train steps, synchronised at the end; info dict)."""
  import torch  # pylint: disable=g-import-not-at-top
  import torch_unet  # pylint: disable=g-import-not-at-top
  dev = torch_device()
  torch.manual_seed(0)
  model, run_model, compiled, note = torch_model(preset, size, compile_mode)
  opt = torch.optim.Adam(model.parameters(), lr=1e-4, weight_decay=1e-4)
  ema = [p.detach().clone() for p in model.parameters()]
  abar = torch_unet.cosine_alphas_cumprod(250).to(dev)
  x0 = torch.randint(0, 4, (batch, size, size), device=dev)
  image = torch.randn(batch, 1, size, size, device=dev).contiguous(
      memory_format=torch.channels_last)
  amp = dtype == 'bfloat16'

  def step(fn):
    with torch.autocast(dev, dtype=torch.bfloat16, enabled=amp):
      loss = torch_unet.kl_loss(fn, x0, image, abar, 4)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    with torch.no_grad():
      torch._foreach_lerp_(ema, list(model.parameters()), 1 - 0.9999)  # pylint: disable=protected-access

  run_model, compiled, note, compile_s = warm_up(
      step, model, run_model, compiled, note, compile_mode)
  sync = torch.cuda.synchronize if dev == 'cuda' else (lambda: None)

  def run(n):
    for _ in range(n):
      step(run_model)
    sync()

  return run, {'compile_s': compile_s, 'compiled': compiled, 'note': note}


def torch_train(preset, size, batch, dtype, iters, repeats, compile_mode):
  run, info = torch_train_runner(preset, size, batch, dtype, compile_mode)
  sec = best_time(run, iters, repeats)
  return dict({'framework': 'torch', 'size': size, 'batch': batch,
               'dtype': dtype, 'spad': False,
               'images_per_s': batch * iters / sec,
               'ms_per_step': 1000 * sec / iters}, **info)


# ------------------------------------------------------------------ sampling


def jax_sampling_runner(preset, size, steps, batch, n, dtype):
  """(run(k): k sampled batches, blocking at the end; compile_s; images)."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from spad_jax import predictors  # pylint: disable=g-import-not-at-top
  from spad_jax import train_state  # pylint: disable=g-import-not-at-top
  config = bench_config(preset, size, 8, dtype, False)
  config.eval.num_steps = steps
  config.eval.num_samples = n
  setup = train_state.Setup.from_config(config)
  state = train_state.create_train_state(config, setup.model,
                                         jax.random.key(0), 1)
  params = train_state.replicate(state.ema_params)
  predict = predictors.make_predict_fn(config, setup.model, setup.schedule)
  ndev = jax.local_device_count()
  images = np.random.default_rng(0).normal(
      size=(ndev, batch, size, size, 1)).astype(np.float32)  # batch per device
  key = jax.random.key(0)
  t0 = time.perf_counter()
  ids = np.arange(ndev * batch, dtype=np.int32).reshape(ndev, batch)
  jax.block_until_ready(predict(params, images, key, ids))
  compile_s = time.perf_counter() - t0

  def run(k):
    for i in range(k):
      out = predict(params, images, key, ids + i * ids.size)
    jax.block_until_ready(out)

  return run, compile_s, batch * ndev


def jax_sampling(preset, size, steps, batch, n, repeats, dtype):
  run, compile_s, images = jax_sampling_runner(preset, size, steps, batch, n,
                                               dtype)
  sec = best_time(run, 1, repeats)
  return {'framework': 'jax', 'compile_s': compile_s, 'sec': sec,
          'images': images}


def torch_sampling(preset, size, steps, batch, n, repeats, dtype,
                   compile_mode):
  import torch  # pylint: disable=g-import-not-at-top
  import torch_unet  # pylint: disable=g-import-not-at-top
  from spad_jax import diffusion  # pylint: disable=g-import-not-at-top
  dev = torch_device()
  model, run_model, compiled, note = torch_model(preset, size, compile_mode)
  model.eval()
  abar = torch_unet.cosine_alphas_cumprod(250).to(dev)
  times = diffusion.time_sequence(250, steps)
  image = torch.randn(batch, 1, size, size, device=dev).repeat(
      n, 1, 1, 1).contiguous(memory_format=torch.channels_last)
  sync = torch.cuda.synchronize if dev == 'cuda' else (lambda: None)

  def once(fn):
    with torch.inference_mode(), torch.autocast(
        dev, dtype=torch.bfloat16, enabled=dtype == 'bfloat16'):
      labels = torch_unet.sample(fn, image, abar, 4, times)
      soft = torch.nn.functional.one_hot(labels, 4).float().reshape(
          n, batch, size, size, 4).mean(0)  # The ensemble, as ours.
    sync()
    return soft

  run_model, compiled, note, compile_s = warm_up(
      once, model, run_model, compiled, note, compile_mode)
  sec = best_time(lambda k: [once(run_model) for _ in range(k)], 1, repeats)
  return {'framework': 'torch', 'compile_s': compile_s, 'sec': sec,
          'images': batch, 'compiled': compiled, 'note': note}


# ------------------------------------------------------------ pipeline/profile


def pipeline_rows(data_config_path, steps, data_root=''):
  """numpy loader img/s with masks off/on, ``os.cpu_count()`` workers."""
  import importlib.util  # pylint: disable=g-import-not-at-top
  import pipeline_throughput  # pylint: disable=g-import-not-at-top
  from spad_jax.data import sources  # pylint: disable=g-import-not-at-top
  spec = importlib.util.spec_from_file_location('data_config',
                                                data_config_path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  if data_root:
    config.data.root = data_root
  config.data.num_workers = os.cpu_count()
  source = sources.load_split(config, 'train')
  rows = pipeline_throughput.compare(config, source, 'numpy', steps, 2)
  for row in rows:
    row.update({'images_per_s': row.pop('images_per_sec'), 'steps': steps,
                'size': config.data.image_size, 'data': config.data.name})
  return rows


def profile_parts(preset, size, batch, dtype, iters, repeats, trace_dir,
                  step_ms=None):
  """ms of forward, forward+backward and the whole step (one device;
  ``step_ms``: the train section's figure for this setting, if measured)."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from spad_jax import train_state  # pylint: disable=g-import-not-at-top
  config = bench_config(preset, size, batch, dtype, True)
  setup = train_state.Setup.from_config(config)
  params = train_state.create_train_state(config, setup.model,
                                    jax.random.key(0), 1).params
  rng = np.random.default_rng(0)
  xt = jax.nn.one_hot(rng.integers(0, 4, (batch, size, size)), 4)
  image = jnp.asarray(rng.normal(size=(batch, size, size, 1)), jnp.float32)
  t = jnp.asarray(rng.integers(1, 250, (batch,)), jnp.int32)
  fwd = jax.jit(lambda p: setup.model.apply({'params': p}, xt, image, t))
  grad = jax.jit(jax.grad(lambda p: jnp.mean(
      setup.model.apply({'params': p}, xt, image, t) ** 2)))

  def timed(fn):
    jax.block_until_ready(fn(params))

    def run(n):
      for _ in range(n):
        out = fn(params)
      jax.block_until_ready(out)
    return 1000 * best_time(run, iters, repeats) / iters

  parts = {'forward_ms': timed(fwd), 'forward_backward_ms': timed(grad)}
  if step_ms is None:
    step_ms = jax_train(preset, size, batch, dtype, True, iters, repeats,
                        0)['ms_per_step']
  parts['train_step_ms'] = step_ms
  parts['rest_ms'] = parts['train_step_ms'] - parts['forward_backward_ms']
  parts.update(size=size, batch=batch, dtype=dtype)
  if trace_dir:
    with jax.profiler.trace(trace_dir):
      jax.block_until_ready(grad(params))
    parts['trace_dir'] = trace_dir
  return parts


# ---------------------------------------------------------------------- main


def versions():
  import flax  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  out = {'python': platform.python_version(), 'jax': jax.__version__,
         'flax': flax.__version__, 'jax_backend': jax.default_backend(),
         'device_kind': jax.devices()[0].device_kind,
         'local_devices': jax.local_device_count(), 'cpus': os.cpu_count(),
         'date': time.strftime('%Y-%m-%d %H:%M'), 'host': platform.node()}
  try:
    import torch  # pylint: disable=g-import-not-at-top
    out['torch'] = torch.__version__
    if torch.cuda.is_available():
      out['torch_device'] = torch.cuda.get_device_name(0)
  except ImportError:
    out['torch'] = None
  return out


def markdown(result) -> str:
  m = result['meta']
  lines = [f'# spad_jax perf ({m["date"]})', '',
           f'Device: {m["device_kind"]} ×{m["local_devices"]} '
           f'({m["jax_backend"]}), {m["cpus"]} CPUs. jax {m["jax"]}, flax '
           f'{m["flax"]}, torch {m.get("torch")}. Preset {m["preset"]}.', '']
  train_rows = result.get('train', [])
  if train_rows:
    lines += ['## Train step', '',
              '| size | batch | dtype | framework | SPAD | img/s | ms/step '
              '| MFU | vs torch |', '|---|---|---|---|---|---:|---:|---:|---:|']
    for r in train_rows:
      mfu = f'{100 * r["mfu"]:.1f} %' if r.get('mfu') is not None else '–'
      ratio = f'{r["vs_torch"]:.2f}×' if r.get('vs_torch') else '–'
      fw = r['framework'] + ('' if r.get('compiled', True) else ' (eager)')
      lines.append(f'| {r["size"]} | {r["batch"]} | {r["dtype"]} | {fw} | '
                   f'{"on" if r["spad"] else "off"} | '
                   f'{r["images_per_s"]:.1f} | {r["ms_per_step"]:.1f} | '
                   f'{mfu} | {ratio} |')
    for o in result.get('spad_overhead', []):
      lines.append(f'\nSPAD overhead at {o["size"]}², batch {o["batch"]}, '
                   f'{o["dtype"]}: {100 * o["overhead"]:+.1f} %')
    lines.append('')
  if result.get('sampling'):
    first = result['sampling'][0]
    lines += [f'## Sampling ({first["size"]}², {first["dtype"]}, T = 250)',
              '',
              '| steps | batch | ensemble | framework | ms/image | img/s | '
              'vs torch |', '|---|---|---|---|---:|---:|---:|']
    for r in result['sampling']:
      ratio = f'{r["vs_torch"]:.2f}×' if r.get('vs_torch') else '–'
      lines.append(f'| {r["steps"]} | {r["batch"]} | {r["ensemble"]} | '
                   f'{r["framework"]} | {r["ms_per_image"]:.1f} | '
                   f'{r["images_per_s"]:.2f} | {ratio} |')
    lines.append('')
  if result.get('pipeline'):
    lines += ['## Input pipeline (numpy loader, all cores)', '',
              '| masks | img/s | CPU µs/img | workers |', '|---|---:|---:|---:|']
    for r in result['pipeline']:
      lines.append(f'| {"on" if r["masks"] else "off"} | '
                   f'{r["images_per_s"]:.0f} | {r["cpu_us_per_image"]:.0f} | '
                   f'{r["workers"]} |')
    lines.append(f'\nMasks on vs off: {100 * r["slowdown_vs_off"]:.1f} % '
                 'slower (median of paired segments).')
    if 'pipeline_headroom' in result:
      lines.append(f'\nPipeline with masks / fastest train step consumption: '
                   f'{result["pipeline_headroom"]:.1f}×')
    lines.append('')
  if result.get('pipeline_skipped'):
    lines += [f'Pipeline skipped: {result["pipeline_skipped"]}', '']
  if result.get('profile'):
    p = result['profile']
    lines += [f'## Where a train step goes ({p["size"]}², batch {p["batch"]}, '
              f'{p["dtype"]}, SPAD on)', '',
              f'- forward: {p["forward_ms"]:.1f} ms',
              f'- forward + backward: {p["forward_backward_ms"]:.1f} ms',
              f'- whole step: {p["train_step_ms"]:.1f} ms (noise, '
              f'perturbation, loss, pmean, Adam, EMA: ' +
              (f'{p["rest_ms"]:.1f} ms)' if p['rest_ms'] > 0 else
               '≈ 0, within timing noise)'), '']
  return '\n'.join(lines) + '\n'


class _Report:
  """perf.json / perf.md in --out, rewritten after every section, and
  timestamped progress lines."""

  def __init__(self, result):
    self.result = result
    self.started = time.perf_counter()

  def say(self, text):
    print(f'[{time.perf_counter() - self.started:7.1f} s] {text}', flush=True)

  def save(self):
    files.write_json(os.path.join(FLAGS.out, 'perf.json'), self.result)
    files.write_atomic(os.path.join(FLAGS.out, 'perf.md'),
                       markdown(self.result))


def _preset():
  preset = dict(PRESETS[FLAGS.preset])
  for name in ('sizes', 'batches', 'sample_steps'):
    if getattr(FLAGS, name):
      preset[name] = [int(v) for v in getattr(FLAGS, name)]
  if FLAGS.dtypes:
    preset['dtypes'] = list(FLAGS.dtypes)
  return preset


def _has_torch(sections) -> bool:
  try:
    # torch._dynamo (torch.compile) segfaults when imported after
    # TensorFlow, which spad_jax's input pipeline loads: import it first.
    import torch  # pylint: disable=g-import-not-at-top,unused-import
    import torch._dynamo  # pylint: disable=g-import-not-at-top,unused-import
  except ImportError:
    if 'torch' in sections:
      raise app.UsageError('--sections has torch but PyTorch is not '
                           'installed: pip install -r '
                           'bench/requirements-torch.txt, or leave it out')
    return False
  return True


def _train_section(report, preset, grid, sections, iters, peak):
  rows = report.result['train'] = []
  for i, (size, batch, dtype) in enumerate(grid):
    report.say(f'train {i + 1}/{len(grid)}: {size}² batch {batch} {dtype}')
    ours = {}
    if 'train' in sections:
      for spad in (False, True):
        ours[spad] = jax_train(preset, size, batch, dtype, spad, iters,
                               FLAGS.repeats, peak)
        rows.append(ours[spad])
        report.say(f'  jax SPAD {"on " if spad else "off"}: '
                   f'{ours[spad]["images_per_s"]:.1f} img/s')
      report.result.setdefault('spad_overhead', []).append(
          {'size': size, 'batch': batch, 'dtype': dtype, 'overhead':
           1 - ours[True]['images_per_s'] / ours[False]['images_per_s']})
    if 'torch' in sections:
      ref = torch_train(preset, size, batch, dtype, iters, FLAGS.repeats,
                        FLAGS.torch_compile)
      rows.append(ref)
      report.say(f'  torch ({ref["note"]}): {ref["images_per_s"]:.1f} img/s')
      for r in ours.values():
        r['vs_torch'] = r['images_per_s'] / ref['images_per_s']
    report.save()


def _sampling_section(report, preset, have_torch):
  rows = report.result['sampling'] = []
  size = preset['sample_size']
  for steps in preset['sample_steps']:
    for batch, n in preset['sample_settings']:
      report.say(f'sampling {steps} steps, batch {batch}, ensemble {n}')
      dtype = preset['dtypes'][-1]
      runs = [('jax', jax_sampling(preset, size, steps, batch, n,
                                   FLAGS.repeats, dtype))]
      if have_torch:
        runs.append(('torch', torch_sampling(
            preset, size, steps, batch, n, FLAGS.repeats, dtype,
            FLAGS.torch_compile)))
      for fw, r in runs:
        rows.append({'framework': fw, 'steps': steps, 'batch': batch,
                     'ensemble': n, 'size': size, 'dtype': dtype,
                     'ms_per_image': 1000 * r['sec'] / r['images'],
                     'images_per_s': r['images'] / r['sec'],
                     'compile_s': r['compile_s'],
                     'compiled': r.get('compiled', True)})
      if have_torch:
        rows[-2]['vs_torch'] = rows[-2]['images_per_s'] / rows[-1][
            'images_per_s']
      report.say('  ' + ', '.join(f'{r["framework"]} {r["ms_per_image"]:.1f} '
                                  'ms/image' for r in rows[-len(runs):]))
      report.save()


def _pipeline_section(report):
  result = report.result
  report.say(f'pipeline ({FLAGS.data_config}, numpy loader, '
             f'{os.cpu_count()} workers)')
  try:
    result['pipeline'] = pipeline_rows(
        FLAGS.data_config, 20 if FLAGS.preset == 'tiny' else 400,
        FLAGS.data_root)
  except (FileNotFoundError, OSError, ValueError) as e:
    result['pipeline_skipped'] = f'{type(e).__name__}: {e}'
    report.say(f'  skipped: {result["pipeline_skipped"]}')
  if result.get('pipeline') and result.get('train'):
    fastest = max(r['images_per_s'] for r in result['train']
                  if r['framework'] == 'jax')
    result['pipeline_headroom'] = result['pipeline'][1][
        'images_per_s'] / fastest
  report.save()


def _profile_section(report, preset, grid, iters):
  size, batch, dtype = grid[-1]
  report.say(f'profile {size}² batch {batch} {dtype}')
  measured = [r['ms_per_step'] for r in report.result.get('train', [])
              if r['framework'] == 'jax' and r['spad'] and
              (r['size'], r['batch'], r['dtype']) == (size, batch, dtype)]
  report.result['profile'] = profile_parts(
      preset, size, batch, dtype, iters, FLAGS.repeats,
      os.path.join(FLAGS.out, 'trace') if FLAGS.trace else None,
      measured[0] if measured else None)
  report.save()


def main(argv):
  del argv
  preset = _preset()
  iters = FLAGS.iters or preset['iters']
  sections = set(FLAGS.sections)
  unknown = sections - {'train', 'torch', 'sampling', 'pipeline', 'profile'}
  if unknown:
    raise app.UsageError(f'--sections: unknown {sorted(unknown)}')
  have_torch = _has_torch(sections)
  meta = versions()
  meta['preset'] = FLAGS.preset
  peak = FLAGS.peak_tflops or PEAK_TFLOPS.get(meta['device_kind'], 0.0)
  meta['peak_tflops'] = peak or None
  report = _Report({'meta': meta})
  os.makedirs(FLAGS.out, exist_ok=True)
  grid = [(s, b, d) for s in preset['sizes'] for b in preset['batches']
          for d in preset['dtypes']]
  if 'train' in sections or 'torch' in sections:
    _train_section(report, preset, grid, sections, iters, peak)
  if 'sampling' in sections:
    _sampling_section(report, preset, have_torch)
  if 'pipeline' in sections:
    _pipeline_section(report)
  if 'profile' in sections:
    _profile_section(report, preset, grid, iters)
  report.save()
  report.say(f'wrote {FLAGS.out}/perf.json and perf.md')
  print(markdown(report.result))


if __name__ == '__main__':
  app.run(main)
