r"""The SPAD ablation study: five arms x seeds, sensitivity sweeps, table, plots.

  python -m spad_jax.study --config=configs/duke_dme.py --out=runs/study
  python -m spad_jax.study --config=configs/duke_dme_study_cpu.py \
      --out=runs/study_cpu --seeds=0,1,2 --sweeps=lambda,anchor

Arms (config overrides of ``spad.scd/bcd/pas``, as in README's table):
``baseline`` (CCDM: ScD and BcD off), ``scd_pas``, ``bcd_pas``,
``scd_bcd_nopas`` (σ stays σ0) and ``full`` (SPAD). Every run gets the same
budget: the config's, with any ``--config.<key>=...`` override applied to
every run.

Seeds vary ``config.seed`` (model initialisation, diffusion noise, SPAD masks
and image noise, data order); the patient-level split (``data.split_seed``)
stays fixed, so every run is tested on the same patients. ``--folds=k``
repeats every run over the ``k`` patient-level folds (``data.num_folds``,
``data.fold``); a seed's value is then the mean over its folds.

Each run trains and evaluates in its own workdir with
``train.train_and_evaluate``: ``<out>/<arm>/seed<k>[/fold<f>]`` and
``<out>/sweep_<name>/<value>/seed<k>[/fold<f>]``. A run whose
``metrics.json`` exists is skipped and an interrupted one resumes from its
checkpoint, so running the same command again continues the study. A sweep
run whose config equals an arm's run (the config's own λ or anchor ratio at
the same budget) reuses that run. A workdir started with another config
stops the study (use a new ``--out``) instead of mixing budgets.

Writes into ``--out``:

- ``results.json``: every run (metrics, overrides, timing, workdir), the
  per-arm summaries, paired differences to the baseline, the sweeps, the
  budget and the machine;
- ``results.md``: mean ± std over seeds of mIoU, mDice (dataset-level,
  foreground) and HD95 (mean per case, pixels of the original image) per
  arm, the paper's AMD-SD numbers for reference, paired differences to the
  baseline with a t-interval, the sweeps and the timing;
- ``curves.png`` (training loss and val mDice per arm vs step, mean over
  seeds), ``schedule.png`` (σ(e) and k(e) over epochs),
  ``sweep_lambda.png`` / ``sweep_anchor.png`` (test mDice vs the value),
  ``qualitative.png`` (a few test cases: image, ground truth, full SPAD,
  w/o ScD, w/o BcD, baseline).

``--report_only`` rebuilds these files from the finished runs without
training.
"""

import dataclasses
import json
import math
import os
import platform
import sys
import time
from typing import Any, Dict, List, Optional, Sequence

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags
import numpy as np

from spad_jax import records

# name: (label, overrides, paper's AMD-SD (mIoU %, mDice %), Table 3).
ARMS = {
    'baseline': ('baseline CCDM', {'spad.scd': False, 'spad.bcd': False},
                 (69.79, 82.20)),
    'scd_pas': ('ScD + PaS', {'spad.scd': True, 'spad.bcd': False,
                              'spad.pas': True}, (70.93, 83.00)),
    'bcd_pas': ('BcD + PaS', {'spad.scd': False, 'spad.bcd': True,
                              'spad.pas': True}, (71.04, 83.06)),
    'scd_bcd_nopas': ('ScD + BcD w/o PaS', {'spad.scd': True,
                                            'spad.bcd': True,
                                            'spad.pas': False},
                      (44.07, 61.17)),
    'full': ('full SPAD', {'spad.scd': True, 'spad.bcd': True,
                           'spad.pas': True}, (71.51, 83.39)),
}

# name: (config key, label) of the sensitivity sweeps (paper's Fig. 6),
# run on the full model.
SWEEPS = {
    'lambda': ('spad.pas_lambda', 'PaS decay λ'),
    'anchor': ('spad.anchor_ratio', 'anchor ratio'),
}

# Rows of the qualitative figure (paper's Fig. 5): arm, row label.
QUALITATIVE_ROWS = (('full', 'full SPAD'), ('bcd_pas', 'w/o ScD\n(BcD+PaS)'),
                    ('scd_pas', 'w/o BcD\n(ScD+PaS)'),
                    ('baseline', 'baseline\n(CCDM)'))

METRICS = ('mIoU', 'mDice', 'HD95')

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
    'config', None, 'Base config; --config.<key>=... overrides apply to every '
    'run.', lock_config=False)
flags.DEFINE_string('out', None, 'Study folder (workdirs and results).')
flags.DEFINE_list('seeds', ['0', '1', '2'], 'Values of config.seed.')
flags.DEFINE_list('arms', list(ARMS), f'Arms to run, of {list(ARMS)}.')
flags.DEFINE_integer('folds', 0, 'k >= 2: repeat every run over k '
                     'patient-level folds (data.num_folds); 0: the config\'s '
                     'single split.')
flags.DEFINE_list('sweeps', [], f'Sensitivity sweeps of the full model, of '
                  f'{list(SWEEPS)}.')
flags.DEFINE_list('lambdas', ['0', '0.01', '0.05', '0.2', '1.0'],
                  'spad.pas_lambda values of the lambda sweep.')
flags.DEFINE_list('anchors', ['0.1', '0.3', '0.5', '0.7', '0.9'],
                  'spad.anchor_ratio values of the anchor sweep.')
flags.DEFINE_list('sweep_seeds', ['0'], 'Seeds of the sweep runs.')
flags.DEFINE_integer('sweep_epochs', 0, 'train.num_epochs of the sweep runs '
                     '(0: the same budget as the arms, so the config\'s own '
                     'value reuses the full arm\'s run).')
flags.DEFINE_integer('qualitative_cases', 4, 'Test cases in '
                     'qualitative.png (0: no figure).')
flags.DEFINE_bool('report_only', False, 'Rebuild results and plots from '
                  'finished runs; train nothing.')
flags.DEFINE_string('compilation_cache', 'auto', 'JAX persistent compilation '
                    'cache (runs that differ only in seed compile once): a '
                    'folder, "auto" (<out>/.jax_cache) or "" (off).')


# ------------------------------------------------------------------ the runs


class StudyError(ValueError):
  """A study that cannot go on as asked (e.g. a workdir of another budget)."""


@dataclasses.dataclass
class Run:
  group: str  # 'arm' or 'sweep_<name>'.
  name: str  # Arm name, or the sweep value as text.
  seed: int
  fold: Optional[int]
  overrides: Dict[str, Any]  # Dotted config key -> value (seed/fold too).
  workdir: str
  config: Any = None
  same_as: Optional[str] = None  # Workdir of an identical earlier run.


def set_key(config, dotted: str, value) -> None:
  node = config
  parts = dotted.split('.')
  for part in parts[:-1]:
    node = node[part]
  node[parts[-1]] = value


def _value_label(value: float) -> str:
  return f'{value:g}'


def plan_runs(base, out: str, arms: Sequence[str], seeds: Sequence[int],
              folds: int = 0, sweeps: Sequence[str] = (),
              sweep_values: Optional[Dict[str, Sequence[float]]] = None,
              sweep_seeds: Sequence[int] = (0,),
              sweep_epochs: int = 0) -> List[Run]:
  """Every run of the study, in execution order (arms seed-major, so every
  arm has a first seed early, then the sweeps). Identical configs share a
  workdir (``same_as``)."""
  unknown = [a for a in arms if a not in ARMS]
  if unknown:
    raise ValueError(f'unknown arm(s) {unknown}; expected some of '
                     f'{list(ARMS)}')
  unknown = [s for s in sweeps if s not in SWEEPS]
  if unknown:
    raise ValueError(f'unknown sweep(s) {unknown}; expected some of '
                     f'{list(SWEEPS)}')
  fold_list = list(range(folds)) if folds else [None]

  def make(group, name, seed, fold, overrides, workdir):
    over = dict(overrides)
    over['seed'] = int(seed)
    if fold is not None:
      over['data.num_folds'] = int(folds)
      over['data.fold'] = int(fold)
      workdir = os.path.join(workdir, f'fold{fold}')
    cfg = base.copy_and_resolve_references()
    for key, value in over.items():
      set_key(cfg, key, value)
    return Run(group, name, int(seed), fold, over, workdir, cfg)

  runs = []
  for seed in seeds:
    for arm in arms:
      for fold in fold_list:
        runs.append(make('arm', arm, seed, fold, ARMS[arm][1],
                         os.path.join(out, arm, f'seed{seed}')))
  for sweep in sweeps:
    key = SWEEPS[sweep][0]
    for value in (sweep_values or {})[sweep]:
      over = dict(ARMS['full'][1])
      over[key] = float(value)
      if sweep_epochs:
        over['train.num_epochs'] = int(sweep_epochs)
      for seed in sweep_seeds:
        for fold in fold_list:
          runs.append(make(f'sweep_{sweep}', _value_label(value), seed, fold,
                           over, os.path.join(out, f'sweep_{sweep}',
                                              _value_label(value),
                                              f'seed{seed}')))
  seen = {}
  for run in runs:
    key = run.config.to_json_best_effort(sort_keys=True)
    if key in seen:
      run.same_as = seen[key]
      run.workdir = seen[key]
    else:
      seen[key] = run.workdir
  return runs


def check_workdir(run: Run) -> None:
  """Stops when ``run.workdir`` was started with a different config."""
  from spad_jax import train  # pylint: disable=g-import-not-at-top
  from spad_jax import train_state  # pylint: disable=g-import-not-at-top
  path = os.path.join(run.workdir, 'config.json')
  if not os.path.exists(path):
    return
  with open(path) as f:
    old = json.load(f)
  new = json.loads(run.config.to_json_best_effort())
  if old != new:
    changed = sorted(train._flat_diff(old, new))  # pylint: disable=protected-access
    raise StudyError(
        f'{run.workdir} was started with a different config (differs in '
        f'{", ".join(changed)}); a study keeps one budget per folder: use '
        'another --out, or delete that workdir.')


def is_done(run: Run) -> bool:
  return os.path.exists(os.path.join(run.workdir, 'metrics.json'))


def execute(runs: Sequence[Run], train_fn=None) -> bool:
  """Trains and evaluates the runs not done yet; True when all are done.

  Logs progress and an ETA over the runs (mean time of the runs trained in
  this invocation). A run stopped early (SIGTERM, ``max_steps_per_run``)
  stops the study: run the command again to resume.
  """
  from spad_jax import train  # pylint: disable=g-import-not-at-top
  from spad_jax import train_state  # pylint: disable=g-import-not-at-top
  train_fn = train_fn or train.train_and_evaluate
  unique = [r for r in runs if r.same_as is None]
  for run in unique:
    check_workdir(run)
  todo = [r for r in unique if not is_done(r)]
  logging.info('Study: %d runs (%d distinct), %d already done, %d to train.',
               len(runs), len(unique), len(unique) - len(todo), len(todo))
  durations = []
  for i, run in enumerate(todo):
    logging.info('=== Study run %d/%d: %s %s seed %d%s -> %s', i + 1,
                 len(todo), run.group, run.name, run.seed,
                 '' if run.fold is None else f' fold {run.fold}', run.workdir)
    begin = time.time()
    resumed = os.path.isdir(os.path.join(run.workdir, 'checkpoints'))
    result = train_fn(run.config, run.workdir)
    seconds = time.time() - begin
    if result is None:
      logging.warning('Run %s stopped before its end; run the same study '
                      'command again to resume.', run.workdir)
      return False
    _write_json(os.path.join(run.workdir, 'study_run.json'),
                {'seconds': seconds, 'resumed': resumed,
                 'finished': time.strftime('%Y-%m-%d %H:%M:%S'),
                 'overrides': run.overrides})
    durations.append(seconds)
    left = len(todo) - i - 1
    eta = left * float(np.mean(durations))
    logging.info('=== Study run %d/%d done in %.0f s (mDice %s); %d left, '
                 'ETA %s.', i + 1, len(todo), seconds,
                 _fmt(result.get('mDice'), 4), left, _hms(eta))
  return True


# ------------------------------------------------------------- collecting


def read_log(workdir: str) -> Dict[str, List]:
  """``train_log.jsonl`` as sorted (step, value) lists; a resumed run's
  repeated steps keep their last value."""
  path = os.path.join(workdir, 'train_log.jsonl')
  series = {}
  if not os.path.exists(path):
    return {}
  with open(path) as f:
    for line in f:
      line = line.strip()
      if not line:
        continue
      row = json.loads(line)
      for key, value in row.items():
        if key in ('step', 'time'):
          continue
        series.setdefault(key, {})[int(row['step'])] = value
  return {k: sorted(v.items()) for k, v in series.items()}


def collect_run(run: Run) -> Dict[str, Any]:
  """One run's record: overrides, metrics, timing (None if not finished)."""
  out = {'group': run.group, 'name': run.name, 'seed': run.seed,
         'fold': run.fold, 'overrides': run.overrides,
         'workdir': run.workdir, 'same_as': run.same_as, 'done': False}
  path = os.path.join(run.workdir, 'metrics.json')
  if not os.path.exists(path):
    return out
  with open(path) as f:
    m = json.load(f)
  pcm = m.get('per_case_mean') or {}
  out.update({
      'done': True, 'mIoU': m.get('mIoU'), 'mDice': m.get('mDice'),
      'HD95': pcm.get('HD95'), 'ASSD': pcm.get('ASSD'),
      'case_Dice': pcm.get('Dice'),
      # Class-cases scored with the image diagonal as HD95: missed (label
      # only) and spurious (prediction only), summed over classes.
      'missed': sum(c.get('missed', 0) for c in
                    (pcm.get('per_class') or {}).values()),
      'spurious': sum(c.get('spurious', 0) for c in
                      (pcm.get('per_class') or {}).values()),
      'per_class': m.get('per_class'),
      'per_case_classes': pcm.get('per_class'),
      'checkpoint': m.get('checkpoint'),
      'checkpoint_step': m.get('checkpoint_step'),
      'num_test_cases': m.get('num_cases'), 'split': m.get('split'),
      'eval_seconds': m.get('seconds'),
  })
  timing = os.path.join(run.workdir, 'study_run.json')
  if os.path.exists(timing):
    with open(timing) as f:
      t = json.load(f)
    out['seconds'] = t.get('seconds')
    out['resumed'] = t.get('resumed')
  log = read_log(run.workdir)
  if log.get('steps_per_sec'):
    rates = [v for _, v in log['steps_per_sec']]
    out['train_steps_per_sec'] = float(np.median(rates))
  return out


def _seed_values(records: Sequence[Dict], metric: str) -> Dict[int, float]:
  """Per seed: the metric (mean over folds); seeds missing a value are
  left out."""
  by_seed = {}
  for r in records:
    if r.get('done') and r.get(metric) is not None:
      by_seed.setdefault(r['seed'], []).append(r[metric])
  return {s: float(np.mean(v)) for s, v in sorted(by_seed.items())}


def describe(values: Sequence[float]) -> Dict[str, Any]:
  v = np.asarray(list(values), np.float64)
  return {'n': int(len(v)), 'mean': float(v.mean()) if len(v) else None,
          'std': float(v.std(ddof=1)) if len(v) > 1 else None,
          'min': float(v.min()) if len(v) else None,
          'max': float(v.max()) if len(v) else None,
          'values': [float(x) for x in v]}


def paired_difference(arm: Dict[int, float], base: Dict[int, float],
                      confidence: float = 0.95) -> Dict[str, Any]:
  """Paired per-seed differences ``arm − baseline`` over common seeds: mean,
  sample std and the Student-t interval ``mean ± t·sd/√n`` (n − 1 degrees of
  freedom). A simple reading aid: seeds are few and the test set is one
  fixed set of patients, so it says nothing about other patients."""
  from scipy import stats  # pylint: disable=g-import-not-at-top
  seeds = sorted(set(arm) & set(base))
  d = np.asarray([arm[s] - base[s] for s in seeds], np.float64)
  out = {'seeds': seeds, 'diffs': [float(x) for x in d], 'n': int(len(d)),
         'mean': float(d.mean()) if len(d) else None, 'sd': None,
         'ci_low': None, 'ci_high': None, 'confidence': confidence}
  if len(d) > 1:
    sd = float(d.std(ddof=1))
    half = float(stats.t.ppf(0.5 + confidence / 2, len(d) - 1)) * sd / math.sqrt(
        len(d))
    out.update({'sd': sd, 'ci_low': out['mean'] - half,
                'ci_high': out['mean'] + half})
  return out


def summarize(records: Sequence[Dict], arms: Sequence[str]) -> Dict[str, Any]:
  """Per arm: label, overrides, paper numbers, metric summaries over seeds,
  and the paired differences to the baseline."""
  out = {}
  for arm in arms:
    label, overrides, paper = ARMS[arm]
    mine = [r for r in records if r['group'] == 'arm' and r['name'] == arm]
    entry = {'label': label, 'overrides': overrides,
             'paper_amdsd': {'mIoU': paper[0], 'mDice': paper[1]},
             'runs_done': sum(r['done'] for r in mine), 'runs': len(mine)}
    for metric in METRICS + ('missed', 'spurious'):
      entry[metric] = describe(_seed_values(mine, metric).values())
    seconds = [r['seconds'] for r in mine if r.get('seconds')]
    entry['seconds'] = describe(seconds)
    out[arm] = entry
  if 'baseline' in arms:
    base = [r for r in records if r['group'] == 'arm' and
            r['name'] == 'baseline']
    for arm in arms:
      if arm == 'baseline':
        continue
      mine = [r for r in records if r['group'] == 'arm' and r['name'] == arm]
      out[arm]['vs_baseline'] = {
          metric: paired_difference(_seed_values(mine, metric),
                                    _seed_values(base, metric))
          for metric in METRICS}
  return out


def summarize_sweeps(records: Sequence[Dict], sweeps: Sequence[str],
                     values: Dict[str, Sequence[float]]) -> Dict[str, Any]:
  out = {}
  for sweep in sweeps:
    key, label = SWEEPS[sweep]
    rows = []
    for value in values[sweep]:
      mine = [r for r in records if r['group'] == f'sweep_{sweep}' and
              r['name'] == _value_label(value)]
      row = {'value': float(value)}
      for metric in METRICS:
        row[metric] = describe(_seed_values(mine, metric).values())
      row['reused'] = sorted({r['same_as'] for r in mine if r['same_as']})
      rows.append(row)
    out[sweep] = {'key': key, 'label': label, 'rows': rows}
  return out


# -------------------------------------------------------------- reporting


def budget_of(config) -> Dict[str, Any]:
  """What a run costs and sees, for the report."""
  import jax  # pylint: disable=g-import-not-at-top
  from spad_jax import train  # pylint: disable=g-import-not-at-top
  from spad_jax import train_state  # pylint: disable=g-import-not-at-top
  setup = train_state.Setup.from_config(config)
  shapes = train_state.abstract_train_state(config, setup.model).params
  params = int(sum(np.prod(x.shape) for x in jax.tree.leaves(shapes)))
  d, t = config.data, config.train
  return {
      'data': d.name, 'root': d.root, 'image_size': d.image_size,
      'split_seed': d.split_seed, 'val_fraction': d.val_fraction,
      'test_fraction': d.test_fraction, 'num_folds': d.num_folds,
      'model_params': params,
      'model': {'base_channels': config.model.base_channels,
                'channel_mult': list(config.model.channel_mult),
                'num_res_blocks': config.model.num_res_blocks,
                'attention_resolutions': list(
                    config.model.attention_resolutions)},
      'diffusion_steps': config.diffusion.num_steps,
      'batch_size': t.batch_size, 'num_epochs': t.num_epochs,
      'learning_rate': t.learning_rate, 'lr_schedule': t.lr_schedule,
      'eval_every_epochs': t.eval_every_epochs,
      'eval_num_steps': config.eval.num_steps,
      'eval_num_samples': config.eval.num_samples,
      'eval_checkpoint': config.eval.checkpoint,
      'spad': {k: config.spad[k] for k in (
          'sigma0', 'pas_lambda', 'k0', 'k_gamma', 'anchor_ratio',
          'band_width', 'components')},
  }


def machine() -> Dict[str, Any]:
  import jax  # pylint: disable=g-import-not-at-top
  from spad_jax import train  # pylint: disable=g-import-not-at-top
  from spad_jax import train_state  # pylint: disable=g-import-not-at-top
  return {'platform': platform.platform(), 'processor': platform.processor(),
          'cpu_count': os.cpu_count(),
          'load_average': list(os.getloadavg()) if hasattr(
              os, 'getloadavg') else None,
          'devices': [str(d) for d in jax.devices()],
          'jax': jax.__version__, 'python': platform.python_version(),
          'git_revision': train_state.git_revision()}


def _fmt(x, digits=2, scale=1.0) -> str:
  return '—' if x is None else f'{scale * x:.{digits}f}'


def _pm(desc: Dict, scale=1.0, digits=2) -> str:
  if not desc or desc['mean'] is None:
    return '—'
  if desc['std'] is None:
    return _fmt(desc['mean'], digits, scale)
  return f'{_fmt(desc["mean"], digits, scale)} ± {_fmt(desc["std"], digits, scale)}'


def _hms(seconds: float) -> str:
  seconds = int(round(seconds))
  return f'{seconds // 3600:d}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}'


def markdown(results: Dict[str, Any]) -> str:
  meta, arms = results['meta'], results['arms']
  b = meta['budget']
  unit = 'pixels of the original image'
  fold_note = (f'{b["num_folds"]}-fold patient-level cross-validation, each '
               'seed\'s value the mean over its folds' if meta['folds'] else
               f'one patient-level split (data.split_seed = '
               f'{b["split_seed"]}), fixed for every seed')
  lines = [
      f'# SPAD ablation: {b["data"]} at {b["image_size"]}²', '',
      f'Budget: {b["num_epochs"]} epochs, batch {b["batch_size"]}, '
      f'{b["model_params"] / 1e6:.2f} M-parameter UNet, T = '
      f'{b["diffusion_steps"]}, lr {b["learning_rate"]:g} '
      f'({b["lr_schedule"]}), test with {b["eval_num_steps"]} sampling steps '
      f'x {b["eval_num_samples"]} sample(s), {b["eval_checkpoint"]} '
      f'checkpoint (EMA). Seeds {meta["seeds"]} (config.seed: init, noise, '
      f'masks, data order); {fold_note}.',
      f'Machine: {meta["machine"]["cpu_count"]} CPU cores, '
      f'{", ".join(sorted(set(meta["machine"]["devices"])))}, jax '
      f'{meta["machine"]["jax"]}; {meta["date"]}.', '',
      f'`{meta["command"]}`', '',
      'mIoU / mDice: dataset-level, foreground classes, in %. HD95: mean per '
      f'case and foreground class, {unit} (a class missed or spurious in a '
      'case counts the image diagonal). Missed / spurious: test cases (x '
      'classes) where a class of the label was not predicted at all / was '
      'predicted but is absent from the label, mean over seeds. Mean ± '
      'sample std over seeds.', '',
      '| arm | seeds | mIoU | mDice | HD95 | missed / spurious | paper mIoU '
      '/ mDice (AMD-SD, not this data) |',
      '|---|---:|---:|---:|---:|---:|---:|']
  for arm, e in arms.items():
    lines.append(
        f'| {e["label"]} | {e["mIoU"]["n"]} | {_pm(e["mIoU"], 100)} | '
        f'{_pm(e["mDice"], 100)} | {_pm(e["HD95"], 1, 1)} | '
        f'{_fmt(e["missed"]["mean"], 1)} / {_fmt(e["spurious"]["mean"], 1)} | '
        f'{e["paper_amdsd"]["mIoU"]:.2f} / {e["paper_amdsd"]["mDice"]:.2f} |')
  seeds = meta['seeds']
  if len(seeds) > 1:
    lines += ['', 'mDice (%) per seed' + (' (mean over folds)' if
                                          meta['folds'] else '') + ':', '',
              '| arm | ' + ' | '.join(f'seed {s}' for s in seeds) + ' |',
              '|---|' + '---:|' * len(seeds)]
    for arm, e in arms.items():
      per_seed = _seed_values([r for r in results['runs']
                               if r['group'] == 'arm' and r['name'] == arm],
                              'mDice')
      lines.append(f'| {e["label"]} | ' + ' | '.join(
          _fmt(per_seed.get(s), 2, 100) for s in seeds) + ' |')
  if any('vs_baseline' in e for e in arms.values()):
    lines += [
        '', 'Paired differences to the baseline, per seed (arm − baseline, '
        'same seed), mean and 95 % Student-t interval over seeds '
        '(mean ± t·sd/√n, n − 1 degrees of freedom). A simple reading aid: '
        'it treats seeds as the only source of variation and the tested '
        'patients as given.', '',
        '| arm | n | Δ mIoU (pts) | Δ mDice (pts) | Δ HD95 (px) | '
        'per-seed Δ mDice |', '|---|---:|---:|---:|---:|---|']
    for arm, e in arms.items():
      if 'vs_baseline' not in e:
        continue
      v = e['vs_baseline']

      def ci(p, scale):
        if p['mean'] is None:
          return '—'
        if p['ci_low'] is None:
          return _fmt(p['mean'], 2, scale)
        return (f'{_fmt(p["mean"], 2, scale)} [{_fmt(p["ci_low"], 2, scale)}, '
                f'{_fmt(p["ci_high"], 2, scale)}]')

      per_seed = ', '.join(f'{100 * x:+.2f}' for x in v['mDice']['diffs'])
      lines.append(f'| {e["label"]} | {v["mDice"]["n"]} | '
                   f'{ci(v["mIoU"], 100)} | {ci(v["mDice"], 100)} | '
                   f'{ci(v["HD95"], 1)} | {per_seed} |')
  for sweep, s in results['sweeps'].items():
    lines += ['', f'Sweep of {s["label"]} (`{s["key"]}`, full SPAD, seeds '
              f'{meta["sweep_seeds"]}, {meta["sweep_epochs"]} epochs):', '',
              f'| {s["key"]} | seeds | mIoU | mDice | HD95 |',
              '|---:|---:|---:|---:|---:|']
    for row in s['rows']:
      reused = ' (= full SPAD run)' if row['reused'] else ''
      lines.append(f'| {row["value"]:g}{reused} | {row["mDice"]["n"]} | '
                   f'{_pm(row["mIoU"], 100)} | {_pm(row["mDice"], 100)} | '
                   f'{_pm(row["HD95"], 1, 1)} |')
  done = [r for r in results['runs'] if r.get('seconds') and not r['same_as']]
  if done:
    secs = [r['seconds'] for r in done]
    rates = [r['train_steps_per_sec'] for r in done
             if r.get('train_steps_per_sec')]
    lines += ['', f'Timing: {len(done)} runs trained, {_hms(sum(secs))} in '
              f'all; per run (training, evaluation, compilation) median '
              f'{np.median(secs):.0f} s (min {min(secs):.0f}, max '
              f'{max(secs):.0f}); median training rate '
              f'{np.median(rates) if rates else float("nan"):.2f} steps/s.']
  return '\n'.join(lines) + '\n'


def _plt():
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  return plt


def _mean_curve(logs: Sequence[Dict[str, List]], key: str):
  """Mean over runs at the steps all of them logged."""
  curves = [dict(log[key]) for log in logs if log.get(key)]
  if not curves:
    return None, None
  steps = sorted(set.intersection(*(set(c) for c in curves)))
  return (np.asarray(steps),
          np.asarray([np.mean([c[s] for c in curves]) for s in steps]))


def plot_curves(path: str, runs: Sequence[Run], arms: Sequence[str],
                title: str) -> None:
  plt = _plt()
  fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
  any_val = False
  for arm in arms:
    logs = [read_log(r.workdir) for r in runs
            if r.group == 'arm' and r.name == arm and is_done(r)]
    n = len(logs)
    steps, loss = _mean_curve(logs, 'loss')
    if steps is not None:
      axes[0].plot(steps, loss, label=f'{ARMS[arm][0]} (n={n})')
    steps, val = _mean_curve(logs, 'val_mDice')
    if steps is not None:
      any_val = True
      axes[1].plot(steps, val, 'o-', ms=3, label=f'{ARMS[arm][0]} (n={n})')
  axes[0].set_yscale('log')
  axes[0].set_xlabel('step')
  axes[0].set_ylabel('training loss (KL, per image; log scale)')
  if axes[0].lines:
    axes[0].legend(fontsize=7)
  axes[1].set_xlabel('step')
  axes[1].set_ylabel('val mDice (foreground)')
  if not any_val:
    axes[1].text(0.5, 0.5, 'no validation\n(train.eval_every_epochs = 0)',
                 ha='center', va='center', transform=axes[1].transAxes)
  else:
    axes[1].legend(fontsize=7)
  for ax in axes:
    ax.grid(alpha=0.3)
  fig.suptitle(title + ' — mean over seeds', fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def plot_schedule(path: str, config, runs: Sequence[Run], title: str) -> None:
  """σ(e) with and without PaS and k(e), from ``perturb``'s functions with
  the config's values; the values the full arm's first run logged on top."""
  from spad_jax import perturb  # pylint: disable=g-import-not-at-top
  plt = _plt()
  s = config.spad
  epochs = np.arange(config.train.num_epochs)
  fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
  axes[0].plot(epochs, [perturb.pas_sigma(e, s.sigma0, s.pas_lambda)
                        for e in epochs],
               label=f'PaS: σ0/(1+λe), σ0={s.sigma0:g}, λ={s.pas_lambda:g}')
  axes[0].plot(epochs, np.full(len(epochs), s.sigma0), '--',
               label='PaS off (ScD+BcD w/o PaS): σ0')
  n_fg = config.data.num_classes - 1
  axes[1].plot(epochs, [perturb.num_targets(e, s.k0, s.k_gamma, 10 ** 6)
                        for e in epochs],
               label=f'k(e) = max(1, round(K0/(1+γe))), K0={s.k0:g}, '
               f'γ={s.k_gamma:g}')
  if not s.components:
    axes[1].axhline(n_fg, color='gray', ls=':', label=f'cap here: {n_fg} '
                    'foreground class(es) = targets per image')
  full = [r for r in runs if r.group == 'arm' and r.name == 'full' and
          is_done(r)]
  if full:
    log = read_log(full[0].workdir)
    if log.get('sigma') and log.get('epoch'):
      ep = dict(log['epoch'])
      pts = [(ep[k], v) for k, v in log['sigma'] if k in ep]
      axes[0].plot([p[0] for p in pts], [p[1] for p in pts], 'k.', ms=4,
                   label='logged by the full arm\'s training')
    if log.get('k_targets') and log.get('epoch'):
      ep = dict(log['epoch'])
      pts = [(ep[k], v) for k, v in log['k_targets'] if k in ep]
      axes[1].plot([p[0] for p in pts], [p[1] for p in pts], 'k.', ms=4,
                   label='logged k (capped by the data)')
  axes[0].set_ylabel('σ(e): image noise std')
  axes[1].set_ylabel('k(e): perturbed targets per image')
  for ax in axes:
    ax.set_xlabel('epoch e')
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_ylim(bottom=0)
  fig.suptitle(title, fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def plot_sweep(path: str, sweep: Dict[str, Any], title: str,
               log_x: bool = False, baseline: Optional[float] = None,
               spread: Optional[Sequence[float]] = None) -> None:
  """Test mDice vs the swept value; ``baseline``: the baseline arm's mDice
  on the sweep seeds (a line), ``spread``: the full arm's min and max over
  the study's seeds (a band: the seed noise at this budget)."""
  plt = _plt()
  fig, ax = plt.subplots(figsize=(5.5, 3.8))
  if spread is not None:
    ax.axhspan(100 * spread[0], 100 * spread[1], color='tab:purple',
               alpha=0.12, label='full SPAD (config values), min–max over '
               'seeds')
  if baseline is not None:
    ax.axhline(100 * baseline, color='gray', ls='--',
               label='baseline CCDM, sweep seed(s)')
  xs, means, stds = [], [], []
  for row in sweep['rows']:
    d = row['mDice']
    if d['mean'] is None:
      continue
    xs.append(row['value'])
    means.append(100 * d['mean'])
    stds.append(100 * (d['std'] or 0.0))
    ax.plot([row['value']] * len(d['values']),
            [100 * v for v in d['values']], '.', color='gray', ms=5)
  if xs:
    ax.errorbar(xs, means, yerr=stds, fmt='o-', capsize=3,
                label='mean ± std over seeds' if any(stds) else 'one seed')
  if ax.get_legend_handles_labels()[0]:
    ax.legend(fontsize=7)
  if log_x:
    ax.set_xscale('symlog', linthresh=0.01)
  ax.set_xlabel(f'{sweep["label"]} ({sweep["key"]})')
  ax.set_ylabel('test mDice (%)')
  ax.set_title(title, fontsize=9)
  ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def pick_cases(source, n: int) -> List[int]:
  """``n`` cases spread evenly over the upper half of the cases with
  foreground ranked by its area (largest first): large and mid-sized
  lesions, not only the largest one's neighbours."""
  area = [int((lab > 0).sum()) for lab in source.labels]
  order = sorted((i for i in range(len(area)) if area[i]),
                 key=lambda i: (-area[i], i))
  if len(order) < n:  # Too few with foreground: fill up with the others.
    order += [i for i in range(len(area)) if not area[i]]
    return sorted(order[:n])
  top = order[:max(n, (len(order) + 1) // 2)]
  picks = np.unique(np.round(np.linspace(0, len(top) - 1, n)).astype(int))
  return sorted(top[i] for i in picks)


def qualitative(path: str, runs: Sequence[Run], num_cases: int,
                title: str) -> Optional[List[str]]:
  """Rows image / ground truth / full / w/o ScD / w/o BcD / baseline (the
  arms run), columns the test cases with most foreground; predictions of
  each arm's first seed (first fold), EMA parameters, same sampling keys.
  Returns the case ids shown (None when no arm is done)."""
  from spad_jax import evaluate  # pylint: disable=g-import-not-at-top
  from spad_jax import metrics  # pylint: disable=g-import-not-at-top
  from spad_jax import visualize  # pylint: disable=g-import-not-at-top
  from spad_jax import train  # pylint: disable=g-import-not-at-top
  from spad_jax import train_state  # pylint: disable=g-import-not-at-top
  from spad_jax.data import sources  # pylint: disable=g-import-not-at-top
  import cv2  # pylint: disable=g-import-not-at-top
  chosen = []
  for arm, label in QUALITATIVE_ROWS:
    done = [r for r in runs if r.group == 'arm' and r.name == arm and
            is_done(r)]
    if done:
      first = min(done, key=lambda r: (r.seed, r.fold or 0))
      chosen.append((arm, label, first))
  if not chosen or num_cases <= 0:
    return None
  ref = chosen[0][2]
  seed, fold = ref.seed, ref.fold
  chosen = [(a, l, r) for a, l, r in chosen if r.seed == seed and
            r.fold == fold]
  config = ref.config
  source = sources.load_split(config, config.eval.split)
  idx = pick_cases(source, num_cases)
  sub = dataclasses.replace(
      source, images=source.images[idx], labels=source.labels[idx],
      ids=[source.ids[i] for i in idx],
      original_sizes=source.original_sizes[idx])
  k = config.data.num_classes
  setup = train_state.Setup.from_config(config)  # Same model and keys for all arms.
  predict = evaluate.make_predict_fn(config, setup.model, setup.schedule)
  preds = {}
  for arm, _, run in chosen:
    state = evaluate.load_state(run.config, run.workdir, setup)
    out = evaluate.sample_split(run.config, state.ema_params, setup, sub,
                                num_shown=len(idx), predict=predict)
    preds[arm] = np.stack(out['shown']['preds'])

  def tile(i, label_map=None):
    h, w = sub.original_sizes[i]
    size = (max(1, round(160 * w / max(h, w))), max(1, round(160 * h / max(
        h, w))))
    rgb = cv2.resize(visualize.gray_rgb(np.asarray(sub.images[i], np.float32)),
                     size, interpolation=cv2.INTER_AREA)
    if label_map is None:
      return rgb
    near = cv2.resize(label_map.astype(np.uint8), size,
                      interpolation=cv2.INTER_NEAREST)
    return visualize.overlay_rgb(rgb, near, k, alpha=0.6)

  plt = _plt()
  rows = [('image', None), ('ground truth', 'gt')] + [
      (label, arm) for arm, label, _ in chosen]
  fig, axes = plt.subplots(len(rows), len(idx),
                           figsize=(1.9 * len(idx) + 0.6, 1.75 * len(rows)),
                           squeeze=False)
  for c, i in enumerate(range(len(idx))):
    for r, (row_label, what) in enumerate(rows):
      ax = axes[r, c]
      if what is None:
        ax.imshow(tile(i))
        ax.set_title(sub.ids[i], fontsize=8)
      elif what == 'gt':
        ax.imshow(tile(i, sub.labels[i]))
      else:
        pred = preds[what][i]
        ax.imshow(tile(i, pred))
        dices = [metrics.dice(pred == cls, sub.labels[i] == cls)
                 for cls in range(1, k)]
        dices = [d for d in dices if not np.isnan(d)]
        if dices:
          ax.text(0.02, 0.97, f'Dice {np.mean(dices):.2f}', color='white',
                  fontsize=7, va='top', transform=ax.transAxes,
                  bbox={'facecolor': 'black', 'alpha': 0.5, 'pad': 1,
                        'lw': 0})
      ax.set_xticks([])
      ax.set_yticks([])
      if c == 0:
        ax.set_ylabel(row_label, fontsize=8)
  fig.suptitle(f'{title} — seed {seed}' + ('' if fold is None else
                                           f', fold {fold}'), fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=80)
  plt.close(fig)
  return list(sub.ids)


def report(out: str, runs: Sequence[Run], arms: Sequence[str],
           seeds: Sequence[int], sweeps: Sequence[str],
           sweep_values: Dict[str, Sequence[float]], meta_extra: Dict,
           qualitative_cases: int = 4) -> Dict[str, Any]:
  """Writes results.json, results.md and the plots; returns the results."""
  records = [collect_run(r) for r in runs]
  first = next((r for r in runs if r.group == 'arm'), runs[0])
  budget = budget_of(first.config)
  results = {
      'meta': dict(meta_extra, date=time.strftime('%Y-%m-%d'),
                   seeds=list(seeds), arms=list(arms),
                   budget=budget, machine=machine(),
                   note=('seeds vary config.seed (init, diffusion noise, '
                         'SPAD masks and noise, data order); the '
                         'patient-level split is fixed by '
                         'data.split_seed')),
      'arms': summarize(records, arms),
      'sweeps': summarize_sweeps(records, sweeps, sweep_values),
      'runs': records,
  }
  title = (f'{budget["data"]} {budget["image_size"]}², '
           f'{budget["num_epochs"]} epochs, {budget["model_params"] / 1e6:.2f}'
           f' M params')
  plot_curves(os.path.join(out, 'curves.png'), runs, arms, title)
  plot_schedule(os.path.join(out, 'schedule.png'), first.config, runs,
                f'SPAD schedules over {first.config.train.num_epochs} epochs')
  sweep_seeds = meta_extra.get('sweep_seeds', [])
  base_runs = [r for r in records if r['group'] == 'arm' and
               r['name'] == 'baseline' and r['seed'] in sweep_seeds]
  base_values = list(_seed_values(base_runs, 'mDice').values())
  full_values = results['arms'].get('full', {}).get('mDice', {}).get(
      'values') or []
  same_budget = meta_extra.get('sweep_epochs') == budget['num_epochs']
  for sweep, s in results['sweeps'].items():
    plot_sweep(os.path.join(out, f'sweep_{sweep}.png'), s,
               f'{title}, sweep epochs {meta_extra.get("sweep_epochs")}',
               log_x=sweep == 'lambda',
               baseline=(float(np.mean(base_values)) if base_values and
                         same_budget else None),
               spread=((min(full_values), max(full_values)) if
                       len(full_values) > 1 and same_budget else None))
  try:
    shown = qualitative(os.path.join(out, 'qualitative.png'), runs,
                        qualitative_cases, title)
  except FileNotFoundError as e:  # A checkpoint missing: report the rest.
    logging.warning('No qualitative figure: %s', e)
    shown = None
  results['meta']['qualitative_cases'] = shown
  _write_json(os.path.join(out, 'results.json'), results)
  with open(os.path.join(out, 'results.md'), 'w') as f:
    f.write(markdown(results))
  return results


def _write_json(path: str, obj) -> None:
  tmp = path + '.tmp'
  with open(tmp, 'w') as f:
    json.dump(obj, f, indent=1)
  os.replace(tmp, path)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  if not FLAGS.out:
    raise app.UsageError('--out is required')
  logging.get_absl_handler().addFilter(records.QuietLibraries())
  from spad_jax import config_validation  # pylint: disable=g-import-not-at-top
  base = FLAGS.config
  seeds = [int(s) for s in FLAGS.seeds]
  sweep_values = {'lambda': [float(v) for v in FLAGS.lambdas],
                  'anchor': [float(v) for v in FLAGS.anchors]}
  sweep_seeds = [int(s) for s in FLAGS.sweep_seeds]
  try:
    runs = plan_runs(base, FLAGS.out, FLAGS.arms, seeds, FLAGS.folds,
                     FLAGS.sweeps, sweep_values, sweep_seeds,
                     FLAGS.sweep_epochs)
    for run in runs:  # Every run's config, before any work.
      config_validation.validate(run.config)
    checked = set()
    for run in runs:
      key = (run.config.data.num_folds, run.config.data.fold)
      if key not in checked:
        config_validation.validate_data(run.config)
        checked.add(key)
  except (ValueError, config_validation.ConfigError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  os.makedirs(FLAGS.out, exist_ok=True)
  import jax  # pylint: disable=g-import-not-at-top
  cache = FLAGS.compilation_cache
  if cache:
    cache = os.path.join(FLAGS.out, '.jax_cache') if cache == 'auto' else cache
    jax.config.update('jax_compilation_cache_dir', os.path.abspath(cache))
    jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.5)
  complete = True
  if not FLAGS.report_only:
    try:
      complete = execute(runs)
    except StudyError as e:  # A workdir with another config.
      print(f'error: {e}', file=sys.stderr)
      return 2
  meta = {'command': ' '.join(['python -m spad_jax.study'] + sys.argv[1:]),
          'config_file': config_flags.get_config_filename(FLAGS['config']),
          'folds': FLAGS.folds, 'sweeps': list(FLAGS.sweeps),
          'sweep_values': {s: sweep_values[s] for s in FLAGS.sweeps},
          'sweep_seeds': sweep_seeds,
          'sweep_epochs': FLAGS.sweep_epochs or base.train.num_epochs,
          'complete': complete}
  results = report(FLAGS.out, runs, FLAGS.arms, seeds, FLAGS.sweeps,
                   sweep_values, meta, FLAGS.qualitative_cases)
  print(markdown(results))
  print(f'Wrote {FLAGS.out}/results.json, results.md, curves.png, '
        'schedule.png' + ''.join(f', sweep_{s}.png' for s in FLAGS.sweeps) +
        (', qualitative.png' if results['meta']['qualitative_cases'] else ''))
  return 0 if complete else 3


if __name__ == '__main__':
  app.run(main)
