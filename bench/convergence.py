r"""Convergence of training variants: learning curves at a fixed budget.

Trains a config under several variants (named config overrides, ``VARIANTS``)
x seeds for the same number of epochs, validating every
``--eval_every_epochs``, and compares how fast and how far each variant gets:

  python bench/convergence.py --config=configs/demo.py --out=runs/convergence
  python bench/convergence.py --config=configs/duke_dme_cpu.py \
      --out=runs/convergence_duke --variants=kl,hybrid_stage,deterministic \
      --seeds=0,1,2 --epochs=60 --eval_every_epochs=3
  python bench/convergence.py --out=runs/convergence --report_only

``--config.<key>=...`` overrides apply to every run. Each run (variant,
seed) trains with ``train.train_and_evaluate`` in ``<out>/runs/<variant>/
seed<k>`` with the base config + the variant's overrides + ``seed=k``,
``train.num_epochs=--epochs``, ``train.eval_every_epochs=
--eval_every_epochs``. Runs go seed-major (every variant's seed 0 first), so
early partial results cover every variant. A run whose ``metrics.json``
exists is skipped; an interrupted one resumes from its checkpoint; running
the same command again continues. A workdir started with another config
stops the bench (use another ``--out``). A run that diverges (non-finite
losses, ``FloatingPointError``) is recorded in ``failed.json`` in its workdir
and not retried (delete that file to retry).

Writes into ``--out`` (rewritten after every finished run):

- ``convergence.json``: every run's curves (train loss per logging window;
  val mDice/mIoU per validation; both against step and training minutes),
  test metrics and timing, the per-variant summary, the command and the
  overrides;
- ``convergence.md``: per variant, mean ± std over seeds of the test mDice/
  mIoU, final val mDice, steps and training minutes to 90 % of the final val
  mDice, and how many runs did not learn (definitions in the file);
- ``convergence_steps.png`` / ``convergence_minutes.png``: val mDice vs step
  / training minutes (thin: seeds, thick: mean over seeds);
- ``convergence_loss.png``: training loss vs step (log scale).

``--report_only`` rebuilds these files from what is on disk (every variant
and seed found under ``<out>/runs`` unless ``--variants``/``--seeds`` are
given), without ``--config`` and without training.
"""

import functools
import json
import math
import os
import platform
import shlex
import sys
import time
from typing import Any, Dict, List, Optional, Sequence

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags
import numpy as np

from spad_jax import config_keys
from spad_jax import files
from spad_jax import formatting
from spad_jax import records

# name: dotted config key -> value, applied on top of the base config. Add a
# variant by adding an entry.
# Every variant sets every objective key, so a variant means the same thing
# whatever the base config recommends (configs/demo.py trains hybrid_stage).
_PAPER = {'model.kind': 'diffusion', 'diffusion.ce_lambda': 0.0,
          'diffusion.ce_weighting': 'constant',
          'diffusion.t_sampling': 'uniform', 'diffusion.dice_lambda': 0.0,
          'diffusion.dice_weighting': 'constant'}
VARIANTS = {
    'kl': dict(_PAPER),  # The paper's loss.
    'hybrid': dict(_PAPER, **{'diffusion.ce_lambda': 1.0}),
    'hybrid_stage': dict(_PAPER, **{'diffusion.ce_lambda': 1.0,
                                    'diffusion.ce_weighting': 'stage'}),
    'stratified': dict(_PAPER, **{'diffusion.t_sampling': 'stratified'}),
    'importance': dict(_PAPER, **{'diffusion.t_sampling': 'importance'}),
    'hybrid_stage_stratified': dict(_PAPER, **{
        'diffusion.ce_lambda': 1.0, 'diffusion.ce_weighting': 'stage',
        'diffusion.t_sampling': 'stratified'}),
    # KL + soft Dice of p̂ (rare foreground classes: Duke DME), and with a
    # Dice term ten times stronger.
    'kl_dice': dict(_PAPER, **{'diffusion.dice_lambda': 0.02}),
    'kl_dice_strong': dict(_PAPER, **{'diffusion.dice_lambda': 0.2}),
    # The Dice weighted by (1 - ᾱ_t): asked where x_t cannot be copied.
    'kl_dice_stage': dict(_PAPER, **{'diffusion.dice_lambda': 0.02,
                                     'diffusion.dice_weighting': 'stage'}),
    'deterministic': dict(_PAPER, **{'model.kind': 'deterministic'}),
}

# Overrides every run gets besides its variant's.
PER_RUN_KEYS = ('seed', 'train.num_epochs', 'train.eval_every_epochs')

FRACTION = 0.9  # "Converged": first validation at >= 90 % of the final one.
DID_NOT_LEARN = 0.05  # Final val mDice below this: the run did not learn.

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
    'config', None, 'Base config; --config.<key>=... overrides apply to '
    'every run. Not needed with --report_only.', lock_config=False)
flags.DEFINE_string('out', None, 'Output folder (runs/ and the reports).')
flags.DEFINE_list('variants', list(VARIANTS),
                  f'Variants to run, of {list(VARIANTS)}.')
flags.DEFINE_list('seeds', ['0', '1', '2'], 'Values of config.seed.')
flags.DEFINE_integer('epochs', None, 'Training budget in epochs (default: '
                     'the config\'s train.num_epochs).')
flags.DEFINE_integer('eval_every_epochs', 2, 'Validate (val mDice) every '
                     'this many epochs; also at the last step.')
flags.DEFINE_bool('report_only', False, 'Rebuild the reports from what is '
                  'on disk; train nothing.')
flags.DEFINE_string('compilation_cache', 'auto', 'JAX persistent '
                    'compilation cache (seeds of a variant compile once): '
                    'a folder, "auto" (<out>/.jax_cache) or "" (off).')


class BenchError(ValueError):
  """The bench cannot go on as asked (unknown variant, another budget)."""


# ------------------------------------------------------------------ planning


def check_variants(names: Sequence[str]) -> None:
  unknown = [n for n in names if n not in VARIANTS]
  if unknown:
    raise BenchError(f'unknown variant(s) {", ".join(unknown)}; known '
                     f'variants: {", ".join(VARIANTS)}')
  if not names:
    raise BenchError(f'no variants given; known variants: '
                     f'{", ".join(VARIANTS)}')


def run_dir(out: str, variant: str, seed: int) -> str:
  return os.path.join(out, 'runs', variant, f'seed{seed}')


def plan(base, out: str, variants: Sequence[str], seeds: Sequence[int],
         epochs: int, eval_every: int) -> List[Dict[str, Any]]:
  """Every run in execution order (seed-major) with its config."""
  check_variants(variants)
  if epochs < 1:
    raise BenchError(f'--epochs must be >= 1, got {epochs}')
  if eval_every < 1:
    raise BenchError(f'--eval_every_epochs must be >= 1 (the curves are the '
                     f'validations), got {eval_every}')
  runs = []
  for seed in seeds:
    for variant in variants:
      overrides = dict(VARIANTS[variant])
      overrides.update({'seed': int(seed), 'train.num_epochs': int(epochs),
                        'train.eval_every_epochs': int(eval_every)})
      config = base.copy_and_resolve_references()
      for key, value in overrides.items():
        config_keys.set_value(config, key, value)
      runs.append({'variant': variant, 'seed': int(seed),
                   'overrides': overrides, 'config': config,
                   'workdir': run_dir(out, variant, seed)})
  return runs


# Keys a workdir may be resumed with changed: they do not change the result.
RESUMABLE_KEYS = ('train.max_steps_per_run', 'data.num_workers',
                  'data.prefetch')


def check_workdir(run: Dict[str, Any]) -> None:
  """Stops when the run's workdir was started with a different config."""
  path = os.path.join(run['workdir'], 'config.json')
  if not os.path.exists(path):
    return
  with open(path) as f:
    old = json.load(f)
  # A key on one side only (added to the code's config since) is no
  # difference.
  new = json.loads(run['config'].to_json_best_effort())
  changed = sorted(k for k in config_keys.flat_diff(old, new, one_sided=False)
                   if k not in RESUMABLE_KEYS)
  if changed:
    raise BenchError(
        f'{run["workdir"]} was started with a different config (differs in '
        f'{", ".join(changed)}); use another --out, or delete that workdir.')


# ---------------------------------------------------------------- the curves


def read_jsonl(path: str) -> List[Dict[str, Any]]:
  """Rows of a JSONL file; a truncated last line (a killed run) is dropped."""
  rows = []
  if not os.path.exists(path):
    return rows
  with open(path) as f:
    for line in f:
      line = line.strip()
      if not line:
        continue
      try:
        rows.append(json.loads(line))
      except json.JSONDecodeError:
        continue
  return rows


def _finite(x) -> bool:
  return x is not None and isinstance(x, (int, float)) and math.isfinite(x)


def parse_log(rows: Sequence[Dict[str, Any]]) -> Dict[str, Any]:
  """Curves of one run from its ``train_log.jsonl`` rows.

  Training rows (``loss``) are logging windows: their ``loss`` is the mean
  over the window's steps. Validation rows (``val_mDice``) follow the
  training row of their step. A resumed run repeats the steps after its
  last checkpoint: the later rows replace the earlier ones from there on.

  Training time of a window = its steps / its ``steps_per_sec`` (the train
  loop measures that rate from the previous log row or the end of the
  previous validation): validation and the time between a killed run and its
  resumption are left out; checkpoint saves are in. A validation between log
  rows adds its steps at the next window's rate. The first window also holds
  start-up (compilation, pipeline warm-up): its time beyond its steps at the
  second window's rate is reported as ``startup_seconds`` and left out, so
  minute 0 is the start of steady training (the first window after a resume
  keeps its recompilation: nothing in the log marks where a run resumed
  unless it repeats steps). Rows without a rate fall back to wall-clock
  differences minus ``val_seconds``.
  """
  events = []
  for row in rows:
    if 'step' not in row:
      continue
    s = int(row['step'])
    if 'loss' in row:
      while events and events[-1]['step'] >= s:
        events.pop()
      events.append(dict(row, step=s, kind='train'))
    elif 'val_mDice' in row:
      while events and (events[-1]['step'] > s or (
          events[-1]['step'] == s and events[-1]['kind'] == 'val')):
        events.pop()
      events.append(dict(row, step=s, kind='val'))

  def rate_of(e):
    r = e.get('steps_per_sec')
    return r if _finite(r) and r > 0 else None

  seconds, total, prev_step, prev_time = [], 0.0, 0, None
  for i, e in enumerate(events):
    s, dt = e['step'], 0.0
    if e['kind'] == 'train':
      rate = rate_of(e)
      if rate is not None:
        dt = (s - prev_step) / rate
      elif prev_time is not None and _finite(e.get('time')):
        dt = e['time'] - prev_time
    elif s > prev_step:  # A validation between two log rows.
      later = [rate_of(x) for x in events[i + 1:] if x['kind'] == 'train']
      earlier = [rate_of(x) for x in events[:i] if x['kind'] == 'train']
      rate = next((r for r in later + earlier[::-1] if r is not None), None)
      if rate is not None:
        dt = (s - prev_step) / rate
      elif prev_time is not None and _finite(e.get('time')):
        dt = e['time'] - prev_time - (e.get('val_seconds') or 0.0)
    total += max(dt, 0.0)
    seconds.append(total)
    prev_step = max(prev_step, s)
    if _finite(e.get('time')):
      prev_time = e['time']

  train_idx = [i for i, e in enumerate(events) if e['kind'] == 'train']
  startup = 0.0
  if len(train_idx) >= 2:
    first, second = events[train_idx[0]], events[train_idx[1]]
    rate = rate_of(second)
    if rate is not None:
      startup = max(0.0, seconds[train_idx[0]] - first['step'] / rate)
  minutes = [max(0.0, s - startup) / 60 for s in seconds]

  def num(x):
    return float(x) if _finite(x) else None

  train = [(events[i], minutes[i]) for i in train_idx]
  val = [(e, m) for e, m in zip(events, minutes) if e['kind'] == 'val']
  return {
      'train': {'step': [e['step'] for e, _ in train],
                'minutes': [m for _, m in train],
                'loss': [num(e.get('loss')) for e, _ in train],
                'loss_per_pixel': [num(e.get('loss_per_pixel'))
                                   for e, _ in train],
                'steps_per_sec': [num(e.get('steps_per_sec'))
                                  for e, _ in train]},
      'val': {'step': [e['step'] for e, _ in val],
              'minutes': [m for _, m in val],
              'mDice': [num(e.get('val_mDice')) for e, _ in val],
              'mIoU': [num(e.get('val_mIoU')) for e, _ in val]},
      'train_minutes': minutes[-1] if minutes else None,
      'startup_seconds': startup,
      'val_seconds': float(sum(e.get('val_seconds') or 0.0 for e, _ in val
                               if _finite(e.get('val_seconds')))),
      'last_step': events[-1]['step'] if events else 0,
  }


def index_to_fraction(values: Sequence[Optional[float]],
                      fraction: float = FRACTION,
                      min_final: float = DID_NOT_LEARN) -> Optional[int]:
  """Index of the first value >= ``fraction`` x the final one (the last
  finite value); None when there is none or the final value is below
  ``min_final`` (the run did not learn)."""
  finite = [i for i, v in enumerate(values) if _finite(v)]
  if not finite:
    return None
  final = values[finite[-1]]
  if final < min_final:
    return None
  return next(i for i in finite if values[i] >= fraction * final)


def steps_to_fraction(steps: Sequence[int], values: Sequence[Optional[float]],
                      fraction: float = FRACTION,
                      min_final: float = DID_NOT_LEARN) -> Optional[int]:
  """The first step whose value is >= ``fraction`` x the curve's final
  value; None when the final value is < ``min_final`` or missing."""
  i = index_to_fraction(values, fraction, min_final)
  return None if i is None else int(steps[i])


# -------------------------------------------------------------- collecting


def _read_json(path: str) -> Optional[Dict[str, Any]]:
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def collect_run(out: str, variant: str, seed: int) -> Dict[str, Any]:
  """One run's record from its workdir (status pending/partial/done/
  failed)."""
  workdir = run_dir(out, variant, seed)
  rec = {'variant': variant, 'seed': seed, 'workdir': workdir,
         'overrides': VARIANTS.get(variant), 'status': 'pending'}
  meta = _read_json(os.path.join(workdir, 'convergence_run.json')) or {}
  if meta.get('overrides') is not None:
    rec['overrides'] = meta['overrides']
  rec['bench_seconds'] = meta.get('seconds')
  rec['device'] = meta.get('device')
  log = parse_log(read_jsonl(os.path.join(workdir, 'train_log.jsonl')))
  rec.update(curves={'train': log['train'], 'val': log['val']},
             train_minutes=log['train_minutes'],
             startup_seconds=log['startup_seconds'],
             val_seconds=log['val_seconds'], last_step=log['last_step'])
  if log['last_step']:
    rec['status'] = 'partial'
  failed = _read_json(os.path.join(workdir, 'failed.json'))
  metrics = _read_json(os.path.join(workdir, 'metrics.json'))
  if metrics is not None:
    rec['status'] = 'done'
    rec['test'] = {'split': metrics.get('split'),
                   'mDice': metrics.get('mDice'),
                   'mIoU': metrics.get('mIoU'),
                   'checkpoint': metrics.get('checkpoint'),
                   'checkpoint_step': metrics.get('checkpoint_step')}
    rec['eval_seconds'] = metrics.get('seconds')
  elif failed is not None:
    rec['status'] = 'failed'
    rec['error'] = failed.get('error')
  val = log['val']
  finite = [v for v in val['mDice'] if _finite(v)]
  rec['final_val_mDice'] = finite[-1] if finite else None
  rec['best_val_mDice'] = max(finite) if finite else None
  rec['learned'] = (None if rec['final_val_mDice'] is None else
                    rec['final_val_mDice'] >= DID_NOT_LEARN)
  i = index_to_fraction(val['mDice'])
  rec['steps_to_90'] = None if i is None else val['step'][i]
  rec['minutes_to_90'] = None if i is None else val['minutes'][i]
  return rec


def describe(values: Sequence[float]) -> Dict[str, Any]:
  v = np.asarray([x for x in values if _finite(x)], np.float64)
  return {'n': int(len(v)), 'mean': float(v.mean()) if len(v) else None,
          'std': float(v.std(ddof=1)) if len(v) > 1 else None,
          'values': [float(x) for x in v]}


def summarize(runs: Sequence[Dict[str, Any]],
              variants: Sequence[str]) -> Dict[str, Any]:
  """Per variant, over its finished runs (seeds)."""
  out = {}
  for variant in variants:
    mine = [r for r in runs if r['variant'] == variant]
    done = [r for r in mine if r['status'] == 'done']
    learned = [r for r in done if r['learned']]
    overrides = next((r['overrides'] for r in mine
                      if r['overrides'] is not None), None)
    out[variant] = {
        'overrides': None if overrides is None else {
            k: v for k, v in overrides.items() if k not in PER_RUN_KEYS},
        'runs': len(mine), 'seeds_done': [r['seed'] for r in done],
        'failed': [r['seed'] for r in mine if r['status'] == 'failed'],
        'did_not_learn': [r['seed'] for r in done if r['learned'] is False],
        'test_mDice': describe(r['test']['mDice'] for r in done),
        'test_mIoU': describe(r['test']['mIoU'] for r in done),
        'final_val_mDice': describe(r['final_val_mDice'] for r in done),
        'best_val_mDice': describe(r['best_val_mDice'] for r in done),
        'steps_to_90': describe(r['steps_to_90'] for r in learned),
        'minutes_to_90': describe(r['minutes_to_90'] for r in learned),
        'train_minutes': describe(r['train_minutes'] for r in done),
        'eval_seconds': describe(r.get('eval_seconds') for r in done),
    }
  return out


# --------------------------------------------------------------- reporting


# Numbers in the tables: a dash where there is none.
_fmt = functools.partial(formatting.number, missing='—')


def _overrides_text(overrides) -> str:
  if overrides is None:
    return '?'
  # Keys at the paper's value are left out (every variant sets them all).
  shown = {k: v for k, v in overrides.items()
           if k not in PER_RUN_KEYS and _PAPER.get(k) != v}
  return (', '.join(f'`{k}={v}`' for k, v in shown.items()) or
          "(the paper's KL loss, uniform t)")


def markdown(results: Dict[str, Any]) -> str:
  meta, summary, runs = results['meta'], results['summary'], results['runs']
  splits = sorted({r['test']['split'] for r in runs if r.get('test') and
                   r['test'].get('split')})
  split = '/'.join(splits) or 'test'
  lines = [
      '# Convergence of training variants', '',
      f'Budget: {meta.get("epochs", "?")} epochs per run, validation every '
      f'{meta.get("eval_every_epochs", "?")} epochs (and at the last step); '
      f'seeds {meta["seeds"]}; {meta["machine"]["cpu_count"]} CPU cores '
      f'({meta["machine"]["platform"]}); reports of {meta["date"]}.', '',
      '```', meta['command'], '```', '',
      '- **test mDice / mIoU**: dataset-level, foreground classes, of the '
      f'`{split}` split in the run\'s `metrics.json` (the checkpoint '
      '`eval.checkpoint` picks: by default the best by val mDice).',
      '- **final val mDice**: the last point of the run\'s validation curve '
      '(EMA parameters at the last step).',
      f'- **steps to {FRACTION:.0%}**: the first validation step at which '
      f'val mDice ≥ {FRACTION:g} × that run\'s own final val mDice; the '
      'curve is sampled every `--eval_every_epochs` epochs, so it is known '
      'to that resolution. **minutes to '
      f'{FRACTION:.0%}**: training minutes at that step.',
      '- **training minutes**: wall-clock of the training steps only: each '
      'logging window counts its steps / its measured steps/s, so '
      'validation and the gaps of an interrupted and resumed run are left '
      'out (checkpoint saves are in); the first window\'s start-up '
      '(compilation) beyond its steady-state time is left out too, so '
      'minute 0 is the start of steady training (a resumed run\'s '
      'recompilation is counted). Timings depend on the machine\'s load.',
      f'- **did not learn**: finished runs whose final val mDice < '
      f'{DID_NOT_LEARN:g}; they are left out of the steps/minutes to '
      f'{FRACTION:.0%} (they reach {FRACTION:.0%} of almost nothing at once) '
      'but not of the mDice means. **diverged**: runs stopped by '
      'non-finite losses (`failed.json`).',
      '- Mean ± sample standard deviation over the finished seeds.', '',
      f'| variant | overrides | seeds done | {split} mDice | {split} mIoU | '
      f'final val mDice | steps to {FRACTION:.0%} | minutes to '
      f'{FRACTION:.0%} | training minutes | did not learn | diverged |',
      '|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|']
  pm = formatting.mean_std
  for variant, e in summary.items():
    lines.append(
        f'| {variant} | {_overrides_text(e["overrides"])} | '
        f'{len(e["seeds_done"])}/{e["runs"]} | {pm(e["test_mDice"])} | '
        f'{pm(e["test_mIoU"])} | {pm(e["final_val_mDice"])} | '
        f'{pm(e["steps_to_90"], 0)} | {pm(e["minutes_to_90"], 2)} | '
        f'{pm(e["train_minutes"], 2)} | {len(e["did_not_learn"])} | '
        f'{len(e["failed"])} |')
  lines += ['', '## Runs', '',
            f'| variant | seed | status | {split} mDice | final val mDice | '
            f'best val mDice | steps to {FRACTION:.0%} | minutes to '
            f'{FRACTION:.0%} | training minutes | start-up s | validation s '
            f'| eval s |',
            '|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|']
  for r in runs:
    status = r['status']
    if status == 'partial':
      status = f'partial (step {r["last_step"]})'
    elif status == 'done' and r['learned'] is False:
      status = 'done, did not learn'
    lines.append(
        f'| {r["variant"]} | {r["seed"]} | {status} | '
        f'{_fmt((r.get("test") or {}).get("mDice"))} | '
        f'{_fmt(r["final_val_mDice"])} | {_fmt(r["best_val_mDice"])} | '
        f'{_fmt(r["steps_to_90"], 0)} | {_fmt(r["minutes_to_90"], 2)} | '
        f'{_fmt(r["train_minutes"], 2)} | {_fmt(r["startup_seconds"], 1)} | '
        f'{_fmt(r["val_seconds"], 1)} | {_fmt(r.get("eval_seconds"), 1)} |')
  lines += ['', 'Plots: `convergence_steps.png` (val mDice vs step), '
            '`convergence_minutes.png` (val mDice vs training minutes), '
            '`convergence_loss.png` (training loss vs step; the variants\' '
            'objectives differ, so compare shapes, not levels). Thin lines: '
            'seeds; thick: mean over the finished seeds.']
  return '\n'.join(lines) + '\n'


def _mean_curve(curves, x_key, y_key):
  """Mean over runs at the steps every run has (x averaged too)."""
  by_step = {}
  for c in curves:
    for s, x, y in zip(c['step'], c[x_key], c[y_key]):
      if _finite(x) and _finite(y):
        by_step.setdefault(s, []).append((x, y))
  steps = sorted(s for s, v in by_step.items() if len(v) == len(curves))
  xs = [float(np.mean([p[0] for p in by_step[s]])) for s in steps]
  ys = [float(np.mean([p[1] for p in by_step[s]])) for s in steps]
  return xs, ys


def plot(path: str, runs, variants, series: str, x_key: str, y_key: str,
         xlabel: str, ylabel: str, title: str, logy: bool = False) -> None:
  from spad_jax import visualize  # pylint: disable=g-import-not-at-top
  plt = visualize.pyplot()
  fig, ax = plt.subplots(figsize=(7, 4.5))
  colors = plt.get_cmap('tab10')
  for i, variant in enumerate(variants):
    color = colors(i % 10)
    curves = [r['curves'][series] for r in runs
              if r['variant'] == variant and r['status'] == 'done']
    if not curves:
      continue
    for c in curves:
      pts = [(x, y) for x, y in zip(c[x_key], c[y_key])
             if _finite(x) and _finite(y) and (y > 0 or not logy)]
      if pts:
        ax.plot(*zip(*pts), '-', color=color, lw=0.8, alpha=0.35)
    xs, ys = _mean_curve(curves, x_key, y_key)
    pts = [(x, y) for x, y in zip(xs, ys) if y > 0 or not logy]
    if pts:
      ax.plot(*zip(*pts), '-', color=color, lw=2.2,
              marker='o' if series == 'val' else None, ms=3,
              label=f'{variant} ({len(curves)} seed{"s" * (len(curves) > 1)})')
  if logy:
    ax.set_yscale('log')
  ax.set_xlabel(xlabel)
  ax.set_ylabel(ylabel)
  ax.set_title(title, fontsize=9)
  ax.grid(alpha=0.3)
  if ax.get_legend_handles_labels()[0]:
    ax.legend(fontsize=8)
  fig.tight_layout()
  tmp = path + '.tmp.png'
  fig.savefig(tmp, dpi=120)
  plt.close(fig)
  os.replace(tmp, path)


def report(out: str, variants: Sequence[str], seeds: Sequence[int],
           meta: Dict[str, Any]) -> Dict[str, Any]:
  """Reads every run from disk and (re)writes the JSON, Markdown and PNGs."""
  runs = [collect_run(out, v, s) for s in seeds for v in variants]
  meta = dict(meta, seeds=list(seeds), variants=list(variants),
              fraction=FRACTION, did_not_learn_below=DID_NOT_LEARN,
              date=time.strftime('%Y-%m-%d %H:%M:%S'),
              runs_done=sum(r['status'] == 'done' for r in runs),
              runs_total=len(runs))
  results = {'meta': meta,
             'variants': {v: VARIANTS.get(v) for v in variants},
             'summary': summarize(runs, variants), 'runs': runs}
  files.write_json(os.path.join(out, 'convergence.json'), results)
  files.write_atomic(os.path.join(out, 'convergence.md'), markdown(results))
  budget = f'{meta.get("epochs", "?")} epochs, seeds {list(seeds)}'
  plot(os.path.join(out, 'convergence_steps.png'), runs, variants, 'val',
       'step', 'mDice', 'training step', 'val mDice (foreground)',
       f'Validation mDice vs step ({budget})')
  plot(os.path.join(out, 'convergence_minutes.png'), runs, variants, 'val',
       'minutes', 'mDice', 'training minutes (validation excluded)',
       'val mDice (foreground)',
       f'Validation mDice vs training time ({budget})')
  plot(os.path.join(out, 'convergence_loss.png'), runs, variants, 'train',
       'step', 'loss', 'training step', 'training loss (window mean)',
       f'Training loss vs step ({budget}; objectives differ by variant)',
       logy=True)
  return results


# ---------------------------------------------------------------- running


def _device() -> str:
  import jax  # pylint: disable=g-import-not-at-top
  return f'{jax.devices()[0]} x{jax.device_count()}, jax {jax.__version__}'


def execute(runs: Sequence[Dict[str, Any]], on_finished, train_fn=None) -> bool:
  """Trains and evaluates the runs not finished yet, in order; calls
  ``on_finished()`` after each. True when all are done; False when one was
  stopped early (SIGTERM, ``train.max_steps_per_run``): run again to resume.
  """
  if train_fn is None:
    from spad_jax import train  # pylint: disable=g-import-not-at-top
    train_fn = train.train_and_evaluate
  done = lambda r: os.path.exists(os.path.join(r['workdir'], 'metrics.json'))
  failed = lambda r: os.path.exists(os.path.join(r['workdir'], 'failed.json'))
  for r in runs:
    if done(r):
      logging.info('Skipping %s seed %d: finished (%s).', r['variant'],
                   r['seed'], os.path.join(r['workdir'], 'metrics.json'))
    elif failed(r):
      logging.warning('Skipping %s seed %d: diverged before (%s; delete it '
                      'to retry).', r['variant'], r['seed'],
                      os.path.join(r['workdir'], 'failed.json'))
  todo = [r for r in runs if not done(r) and not failed(r)]
  logging.info('Convergence bench: %d runs, %d finished or failed, %d to '
               'train.', len(runs), len(runs) - len(todo), len(todo))

  def seconds_of(r):
    meta = _read_json(os.path.join(r['workdir'], 'convergence_run.json'))
    return (meta or {}).get('seconds') if done(r) else None

  def eta(left: Sequence[Dict[str, Any]]) -> Optional[float]:
    """Mean wall time of the finished runs of the same variant (else of
    all finished runs) for every run left."""
    known = [(r['variant'], seconds_of(r)) for r in runs]
    known = [(v, s) for v, s in known if s]
    if not left:
      return 0.0
    if not known:
      return None
    overall = float(np.mean([s for _, s in known]))
    total = 0.0
    for r in left:
      mine = [s for v, s in known if v == r['variant']]
      total += float(np.mean(mine)) if mine else overall
    return total

  for i, r in enumerate(todo):
    resumed = os.path.isdir(os.path.join(r['workdir'], 'checkpoints'))
    logging.info('=== Run %d/%d start: %s seed %d%s -> %s; ETA of the %d '
                 'runs left (this one included): %s', i + 1, len(todo),
                 r['variant'], r['seed'], ' (resuming)' if resumed else '',
                 r['workdir'], len(todo) - i, formatting.hms(eta(todo[i:])))
    os.makedirs(r['workdir'], exist_ok=True)
    load = os.getloadavg()[0] if hasattr(os, 'getloadavg') else None
    begin = time.time()
    try:
      result = train_fn(r['config'], r['workdir'])
    except FloatingPointError as e:
      logging.error('Run %s seed %d diverged: %s', r['variant'], r['seed'], e)
      files.write_json(os.path.join(r['workdir'], 'failed.json'),
                  {'error': str(e), 'finished': time.strftime(
                      '%Y-%m-%d %H:%M:%S')})
      on_finished()
      continue
    seconds = time.time() - begin
    if result is None:
      logging.warning('Run %s stopped before its end; run the same command '
                      'again to resume.', r['workdir'])
      on_finished()
      return False
    files.write_json(os.path.join(r['workdir'], 'convergence_run.json'),
                {'variant': r['variant'], 'seed': r['seed'],
                 'overrides': r['overrides'], 'seconds': seconds,
                 'resumed': resumed, 'device': _device(),
                 'load_average_at_start': load,
                 'finished': time.strftime('%Y-%m-%d %H:%M:%S')})
    on_finished()
    left = todo[i + 1:]
    logging.info('=== Run %d/%d done: %s seed %d in %s (%s mDice %s); %d '
                 'left, ETA %s', i + 1, len(todo), r['variant'], r['seed'],
                 formatting.hms(seconds), result.get('split', '?'),
                 _fmt(result.get('mDice'), 4), len(left),
                 formatting.hms(eta(left)))
  return True


def _on_disk(out: str):
  """(variants, seeds) with a workdir under ``<out>/runs``; known variants
  first, in ``VARIANTS`` order."""
  root = os.path.join(out, 'runs')
  variants, seeds = [], set()
  if os.path.isdir(root):
    for v in sorted(os.listdir(root)):
      d = os.path.join(root, v)
      if not os.path.isdir(d):
        continue
      found = [int(s[4:]) for s in os.listdir(d)
               if s.startswith('seed') and s[4:].isdigit()]
      if found:
        variants.append(v)
        seeds.update(found)
  order = {v: i for i, v in enumerate(VARIANTS)}
  variants.sort(key=lambda v: (order.get(v, len(order)), v))
  return variants, sorted(seeds)


def _command() -> str:
  return ' '.join(['python', 'bench/convergence.py'] +
                  [shlex.quote(a) for a in sys.argv[1:]])


def _config_overrides() -> Dict[str, str]:
  """The --config.<key>=<value> flags of the command line."""
  out = {}
  args = sys.argv[1:]
  for i, a in enumerate(args):
    if a.startswith('--config.'):
      key, eq, value = a[len('--config.'):].partition('=')
      if not eq and i + 1 < len(args):
        value = args[i + 1]
      out[key] = value
  return out


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  if not FLAGS.out:
    raise app.UsageError('--out is required')
  logging.get_absl_handler().addFilter(records.QuietLibraries())
  out = FLAGS.out
  machine = {'platform': platform.platform(), 'cpu_count': os.cpu_count()}
  meta = {'command': _command(), 'config_overrides': _config_overrides(),
          'machine': machine}

  if FLAGS.report_only:
    variants, seeds = _on_disk(out)
    if FLAGS['variants'].present:
      variants = list(FLAGS.variants)
    if FLAGS['seeds'].present:
      seeds = [int(s) for s in FLAGS.seeds]
    if not variants:
      print(f'error: no runs under {os.path.join(out, "runs")}',
            file=sys.stderr)
      return 2
    old = _read_json(os.path.join(out, 'convergence.json')) or {}
    for key in ('epochs', 'eval_every_epochs', 'config_file'):
      if key in old.get('meta', {}):
        meta[key] = old['meta'][key]
    report(out, variants, seeds, meta)
    print(open(os.path.join(out, 'convergence.md')).read())
    return 0

  variants = list(FLAGS.variants)
  try:  # Before anything is imported or written.
    check_variants(variants)
  except BenchError as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  if FLAGS.config is None:
    raise app.UsageError('--config is required (except with --report_only)')
  from spad_jax import config_validation  # pylint: disable=g-import-not-at-top
  base = FLAGS.config
  epochs = FLAGS.epochs or base.train.num_epochs
  try:
    seeds = [int(s) for s in FLAGS.seeds]
    runs = plan(base, out, variants, seeds, epochs, FLAGS.eval_every_epochs)
    for r in runs:  # Every run's config, before any work.
      try:
        config_validation.validate(r['config'])
      except config_validation.ConfigError as e:
        raise BenchError(f'variant {r["variant"]} seed {r["seed"]}: '
                         f'{e}') from e
    checked = set()
    for r in runs:
      key = r['config'].data.to_json_best_effort(sort_keys=True)
      if key not in checked:
        config_validation.validate_data(r['config'])
        checked.add(key)
    for r in runs:
      check_workdir(r)
  except (BenchError, KeyError, TypeError, ValueError,
          config_validation.ConfigError) as e:
    msg = e.args[0] if isinstance(e, KeyError) and e.args else e
    print(f'error: {msg}', file=sys.stderr)
    return 2
  meta.update(epochs=epochs, eval_every_epochs=FLAGS.eval_every_epochs,
              config_file=config_flags.get_config_filename(FLAGS['config']))
  os.makedirs(out, exist_ok=True)
  from spad_jax import train_state  # pylint: disable=g-import-not-at-top
  train_state.use_compilation_cache(FLAGS.compilation_cache, out)
  machine['devices'] = _device()
  complete = execute(runs, lambda: report(out, variants, seeds, meta))
  report(out, variants, seeds, dict(meta, complete=complete))
  print(open(os.path.join(out, 'convergence.md')).read())
  print(f'Wrote {out}/convergence.json, convergence.md, convergence_steps.png,'
        ' convergence_minutes.png, convergence_loss.png')
  return 0 if complete else 3


if __name__ == '__main__':
  app.run(main)
