r"""Speed vs accuracy of the sampler for a trained workdir.

For every (sampling steps, ensemble size) pair, samples the evaluation split
with the EMA parameters and records mDice/mIoU and wall time per image
(compilation excluded: one untimed warm-up batch per setting).

  python bench/sampling_curve.py --config=configs/demo.py --workdir=runs/demo

Writes ``<out>/sampling_curve.json``, ``.md`` (table) and ``.png`` (plot);
``<out>`` defaults to ``<workdir>/bench``. Step counts above the model's
``diffusion.num_steps`` are skipped and listed as such.
"""

import json
import os
import time

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file('config', None, 'Config the workdir was '
                                'trained with.', lock_config=False)
flags.DEFINE_string('workdir', None, 'Trained workdir (has checkpoints/).')
flags.DEFINE_list('steps', ['1', '5', '10', '25', '50', '250'],
                  'Sampling step counts.')
flags.DEFINE_list('samples', ['1', '4', '16'], 'Ensemble sizes.')
flags.DEFINE_string('out', None, 'Output folder (default <workdir>/bench).')
flags.DEFINE_integer('max_cases', 0, 'Use only the first N cases (0: all).')
flags.mark_flags_as_required(['config', 'workdir'])


def run(config, workdir, steps, samples, max_cases=0):
  """Returns the list of result rows (one per setting, skipped ones too)."""
  import jax  # pylint: disable=g-import-not-at-top
  from spad_jax import evaluate  # pylint: disable=g-import-not-at-top
  from spad_jax import metrics  # pylint: disable=g-import-not-at-top
  from spad_jax import train_state  # pylint: disable=g-import-not-at-top
  from spad_jax.data import sources  # pylint: disable=g-import-not-at-top

  setup = train_state.Setup.from_config(config)
  state = evaluate.load_state(config, workdir, setup)
  source = sources.load_split(config, config.eval.split)
  if max_cases:
    source = source.head(max_cases)
  rows = []
  t_max = config.diffusion.num_steps
  for s in steps:
    for n in samples:
      row = {'num_steps': s, 'num_samples': n}
      if s > t_max:
        row['skipped'] = f'num_steps > diffusion.num_steps ({t_max})'
        rows.append(row)
        continue
      cfg = config.copy_and_resolve_references()
      cfg.eval.num_steps, cfg.eval.num_samples = s, n
      begin = time.time()
      out = evaluate.sample_split(cfg, state.ema_params, setup, source,
                                  warmup=True)
      summary = metrics.summarize_confusion(out['confusion'],
                                            list(source.class_names))
      row.update({'mDice': summary['mDice'], 'mIoU': summary['mIoU'],
                  'ms_per_image': 1000 * out['seconds'] / len(source),
                  'images_per_sec': len(source) / out['seconds'],
                  'compile_and_run_seconds': time.time() - begin})
      logging.info('steps %4d  samples %3d  mDice %.4f  %.1f ms/image', s, n,
                   row['mDice'] or 0, row['ms_per_image'])
      rows.append(row)
  meta = {'checkpoint_step': int(jax.device_get(state.step)),
          'num_cases': len(source), 'split': config.eval.split,
          'diffusion_steps': t_max, 'device': str(jax.devices()[0]),
          'device_count': jax.device_count(), 'jax': jax.__version__,
          'image_size': config.data.image_size,
          'eval_batch_size': config.eval.batch_size,
          'date': time.strftime('%Y-%m-%d')}
  return meta, rows


def write_outputs(out_dir, meta, rows):
  os.makedirs(out_dir, exist_ok=True)
  with open(os.path.join(out_dir, 'sampling_curve.json'), 'w') as f:
    json.dump({'meta': meta, 'rows': rows}, f, indent=1)
  lines = [f'Checkpoint step {meta["checkpoint_step"]}, {meta["num_cases"]} '
           f'{meta["split"]} cases at {meta["image_size"]}², T = '
           f'{meta["diffusion_steps"]}, {meta["device"]} x'
           f'{meta["device_count"]}, jax {meta["jax"]}, {meta["date"]}.', '',
           '| steps | samples | mDice | mIoU | ms / image |',
           '|---:|---:|---:|---:|---:|']
  for r in rows:
    if 'skipped' in r:
      lines.append(f'| {r["num_steps"]} | {r["num_samples"]} | — | — | '
                   f'skipped: {r["skipped"]} |')
    else:
      lines.append(f'| {r["num_steps"]} | {r["num_samples"]} | '
                   f'{r["mDice"]:.4f} | {r["mIoU"]:.4f} | '
                   f'{r["ms_per_image"]:.1f} |')
  with open(os.path.join(out_dir, 'sampling_curve.md'), 'w') as f:
    f.write('\n'.join(lines) + '\n')

  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, ax = plt.subplots(figsize=(6, 4))
  done = [r for r in rows if 'skipped' not in r]
  for n in sorted({r['num_samples'] for r in done}):
    pts = sorted((r for r in done if r['num_samples'] == n),
                 key=lambda r: r['num_steps'])
    ax.plot([r['ms_per_image'] for r in pts], [r['mDice'] for r in pts],
            'o-', label=f'{n} sample(s)')
    for r in pts:
      ax.annotate(str(r['num_steps']), (r['ms_per_image'], r['mDice']),
                  textcoords='offset points', xytext=(3, 3), fontsize=7)
  ax.set_xscale('log')
  ax.set_xlabel('wall time per image (ms, log scale)')
  ax.set_ylabel('foreground mDice')
  ax.set_title(f'Sampling steps (labels) vs accuracy, {meta["device"]}',
               fontsize=9)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(os.path.join(out_dir, 'sampling_curve.png'), dpi=120)
  plt.close(fig)


def main(argv):
  del argv
  steps = sorted({int(s) for s in FLAGS.steps})
  samples = sorted({int(n) for n in FLAGS.samples})
  meta, rows = run(FLAGS.config, FLAGS.workdir, steps, samples,
                   FLAGS.max_cases)
  out = FLAGS.out or os.path.join(FLAGS.workdir, 'bench')
  write_outputs(out, meta, rows)
  print(open(os.path.join(out, 'sampling_curve.md')).read())


if __name__ == '__main__':
  app.run(main)
