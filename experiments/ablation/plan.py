"""The study's runs: arms, sweeps, seeds and folds as configs and workdirs;
training the runs not done yet; reading a finished run back."""

import dataclasses
import json
import os
import platform
import time
from typing import Any, Callable, Dict, List, Optional, Sequence

from absl import logging
import numpy as np

from experiments.ablation import noise_probe
from experiments.ablation import patients
from spad_jax import config_keys
from spad_jax import files
from spad_jax import formatting

# name: (label, overrides, paper's AMD-SD (mIoU %, mDice %): Table 3, the
# UNet's Table 1; None where the paper has no such arm).
ARMS = {
    # The same UNet without diffusion (CE + soft Dice) and without SPAD.
    'unet': ('UNet (deterministic)', {'model.kind': 'deterministic',
                                      'spad.scd': False, 'spad.bcd': False,
                                      'diffusion.own_sample_fraction': 0.0},
             (64.48, 78.40)),
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
    # ScD's targets are the label's connected components, so that k(e) has
    # more than one target per class to choose from.
    'full_components': ('full SPAD, components',
                        {'spad.scd': True, 'spad.bcd': True, 'spad.pas': True,
                         'spad.components': True}, None),
}

# The arms of the paper's Table 3 (the first study's five).
TABLE3_ARMS = ('baseline', 'scd_pas', 'bcd_pas', 'scd_bcd_nopas', 'full')

# name: (config key, label) of the sensitivity sweeps (paper's Fig. 6),
# run on the full model.
SWEEPS = {
    'lambda': ('spad.pas_lambda', 'PaS decay λ'),
    'anchor': ('spad.anchor_ratio', 'anchor ratio'),
}


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


def value_label(value: float) -> str:
  """A sweep value as its run's name and folder (``0.05``, ``1``)."""
  return f'{value:g}'


def budget_overrides(base, epochs: int) -> Dict[str, Any]:
  """Overrides that train ``base`` for ``epochs`` epochs. The own-sample
  phase starts at an absolute step, so it moves with the budget to stay
  the same share of training (a shorter run would otherwise never reach
  it)."""
  over = {'train.num_epochs': int(epochs)}
  start = int(base.diffusion.get('own_sample_start_step', 0))
  if start:
    over['diffusion.own_sample_start_step'] = int(
        round(start * int(epochs) / int(base.train.num_epochs)))
  return over


def plan_runs(base, out: str, arms: Sequence[str], seeds: Sequence[int],
              folds: int = 0, sweeps: Sequence[str] = (),
              sweep_values: Optional[Dict[str, Sequence[float]]] = None,
              sweep_seeds: Sequence[int] = (0,),
              sweep_epochs: int = 0) -> List[Run]:
  """Every run of the study, in execution order: seed-major, then fold,
  then arm, so that each finished (seed, fold) holds every arm's run on the
  same patients; then the sweeps. Identical configs share a workdir
  (``same_as``)."""
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
      config_keys.set_value(cfg, key, value)
    return Run(group, name, int(seed), fold, over, workdir, cfg)

  runs = []
  for seed in seeds:
    for fold in fold_list:
      for arm in arms:
        runs.append(make('arm', arm, seed, fold, ARMS[arm][1],
                         os.path.join(out, arm, f'seed{seed}')))
  for sweep in sweeps:
    key = SWEEPS[sweep][0]
    for value in (sweep_values or {})[sweep]:
      over = dict(ARMS['full'][1])
      over[key] = float(value)
      if sweep_epochs:
        over.update(budget_overrides(base, sweep_epochs))
      for seed in sweep_seeds:
        for fold in fold_list:
          runs.append(make(f'sweep_{sweep}', value_label(value), seed, fold,
                           over, os.path.join(out, f'sweep_{sweep}',
                                              value_label(value),
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


def _in(tree: Dict, dotted: str) -> bool:
  try:
    config_keys.get(tree, dotted)
    return True
  except KeyError:
    return False


def check_workdir(run: Run) -> None:
  """Stops when ``run.workdir`` was started with a different config. Keys
  added to the code's config since then are allowed (logged): a new key's
  default keeps the behaviour the run was started with, and a study that
  spans days must survive the code gaining an option."""
  path = os.path.join(run.workdir, 'config.json')
  if not os.path.exists(path):
    return
  with open(path) as f:
    old = json.load(f)
  new = json.loads(run.config.to_json_best_effort())
  if old != new:
    diff = config_keys.flat_diff(old, new)
    added = sorted(k for k in diff if not _in(old, k))
    changed = sorted(k for k in diff if k not in added)
    if added:
      logging.info('%s: config keys added since it started: %s.',
                   run.workdir, ', '.join(added))
    if not changed:
      return
    raise StudyError(
        f'{run.workdir} was started with a different config (differs in '
        f'{", ".join(changed)}); a study keeps one budget per folder: use '
        'another --out, or delete that workdir.')


def is_done(run: Run) -> bool:
  return os.path.exists(os.path.join(run.workdir, 'metrics.json'))


def has_model(run: Run) -> bool:
  """Whether the run's trained model is on this disk: its latest checkpoint
  and, unless evaluation uses the latest, the best one (evaluation's)."""

  def holds(name):
    folder = os.path.join(run.workdir, name)
    return os.path.isdir(folder) and any(d.isdigit()
                                         for d in os.listdir(folder))

  return holds('checkpoints') and (run.config.eval.checkpoint == 'latest' or
                                   holds('best_checkpoint'))


def release_compiled() -> None:
  """Drops JAX's compiled functions. Each run compiles its own (new
  configs, new closures) and XLA:CPU maps each executable's code into
  memory, so a study process that kept them all grew by about 6,000
  memory mappings a swept run and crashed at the kernel's limit
  (vm.max_map_count, 65,530) on its eleventh run."""
  import gc  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  jax.clear_caches()
  gc.collect()


def execute(runs: Sequence[Run], train_fn=None,
            after_run: Optional[Callable[[Run], None]] = None,
            needs_model: Callable[[Run], bool] = lambda run: False) -> bool:
  """Trains and evaluates the runs not done yet; True when all are done.

  ``after_run(run)`` follows each trained run (and, first, each finished
  run that ``needs_model`` and still has it): the phases that need the
  trained model run while its checkpoint is on disk, so a study whose
  folder keeps only the small files (a new machine, a fresh clone) loses
  no finished phase. A finished run that ``needs_model`` and lost it is
  trained again: training is deterministic, so on the same CPU kind and
  package versions it ends where it did (``study_run.json`` records both).

  Logs progress and an ETA over the runs (mean time of the runs trained in
  this invocation). A run stopped early (SIGTERM, ``max_steps_per_run``)
  stops the study: run the command again to resume.
  """
  if train_fn is None:
    from spad_jax import train  # pylint: disable=g-import-not-at-top
    train_fn = train.train_and_evaluate
  unique = [r for r in runs if r.same_as is None]
  for run in unique:
    check_workdir(run)
  retrain = [r for r in unique if is_done(r) and needs_model(r) and
             not has_model(r)]
  for run in retrain:
    logging.warning('%s: finished, but a phase after training is missing '
                    'and its checkpoint is gone; training it again.',
                    run.workdir)
  if after_run is not None:
    for run in unique:
      if is_done(run) and needs_model(run) and has_model(run):
        timed_after_run(run, after_run, caught_up=True)
        release_compiled()
  todo = [r for r in unique if not is_done(r) or r in retrain]
  logging.info('Study: %d runs (%d distinct), %d already done, %d to train.',
               len(runs), len(unique), len(unique) - len(todo), len(todo))
  durations = []
  for i, run in enumerate(todo):
    logging.info('=== Study run %d/%d: %s %s seed %d%s -> %s', i + 1,
                 len(todo), run.group, run.name, run.seed,
                 '' if run.fold is None else f' fold {run.fold}', run.workdir)
    begin = time.time()
    resumed = os.path.isdir(os.path.join(run.workdir, 'checkpoints'))
    earlier = read_partial_time(run.workdir, resumed)
    # Marked open while it trains: a process killed outright leaves it so,
    # and the next invocation counts that one as untimed.
    os.makedirs(run.workdir, exist_ok=True)
    files.write_json(partial_time_path(run.workdir), dict(earlier, open=True))
    result = train_fn(run.config, run.workdir)
    seconds = time.time() - begin
    timing = {'seconds': earlier['seconds'] + seconds,
              'invocations': earlier['invocations'] + 1,
              'untimed_invocations': earlier['untimed_invocations']}
    if result is None:
      files.write_json(partial_time_path(run.workdir),
                       dict(timing, open=False))
      logging.warning('Run %s stopped before its end; run the same study '
                      'command again to resume.', run.workdir)
      return False
    # `seconds` sums every invocation that recorded its time; untimed ones
    # (killed outright) are counted, not timed.
    files.write_json(study_run_path(run.workdir), dict(
        timing, resumed=resumed,
        finished=time.strftime('%Y-%m-%d %H:%M:%S'),
        cpu=cpu_identity(), packages=package_versions(),
        overrides=run.overrides))
    os.remove(partial_time_path(run.workdir))  # Written when it began.
    if after_run is not None:
      timed_after_run(run, after_run, caught_up=False)
    release_compiled()
    durations.append(time.time() - begin)  # With the phases after it.
    left = len(todo) - i - 1
    eta = left * float(np.mean(durations))
    logging.info('=== Study run %d/%d done in %.0f s (mDice %s); %d left, '
                 'ETA %s.', i + 1, len(todo), seconds,
                 formatting.number(result.get('mDice'), 4, missing='—'),
                 left, formatting.hms(eta))
  return True


def timed_after_run(run: Run, after_run: Callable[[Run], None],
                    caught_up: bool) -> None:
  """Runs ``after_run(run)`` and adds its seconds to the run's
  ``study_run.json`` as ``after_seconds``, so a study's cost (training plus
  the sweep, probe and report after it) is read from its files.

  ``caught_up``: the run finished in an earlier invocation and this one
  completes its phases; if that earlier one recorded no after-phase time
  (killed in them, or before they were timed), the sum leaves it out and
  ``after_untimed_invocations`` counts it.
  """
  begin = time.time()
  after_run(run)
  seconds = time.time() - begin
  path = study_run_path(run.workdir)
  if not os.path.exists(path):  # Finished before runs were timed.
    return
  with open(path) as f:
    timing = json.load(f)
  untimed = timing.get('after_untimed_invocations', 0)
  if caught_up and 'after_seconds' not in timing:
    untimed += 1
  timing.update(after_seconds=timing.get('after_seconds', 0.0) + seconds,
                after_untimed_invocations=untimed)
  files.write_json(path, timing)


def study_run_path(workdir: str) -> str:
  """Where a finished run records what it cost and on which machine."""
  return os.path.join(workdir, 'study_run.json')


def partial_time_path(workdir: str) -> str:
  """Where a run stopped before its end keeps the time it has taken so
  far, so that the finished run's ``seconds`` counts every invocation."""
  return os.path.join(workdir, 'study_partial_time.json')


def read_partial_time(workdir: str, resumed: bool) -> Dict[str, Any]:
  """The time earlier invocations of a run recorded, and how many ended
  without recording it (killed outright, or before this file existed)."""
  path = partial_time_path(workdir)
  if not os.path.exists(path):
    return {'seconds': 0.0, 'invocations': int(resumed),
            'untimed_invocations': int(resumed)}
  try:
    with open(path) as f:
      got = json.load(f)
    out = {'seconds': float(got['seconds']),
           'invocations': int(got['invocations']),
           'untimed_invocations': int(got['untimed_invocations'])}
    if got['open']:
      out['invocations'] += 1
      out['untimed_invocations'] += 1
    return out
  except (OSError, ValueError, KeyError, TypeError) as e:
    raise StudyError(f'{path}: unreadable ({e}); delete it to go on (the '
                     'run\'s recorded time then leaves out its earlier '
                     'invocations)') from e


def cpu_identity() -> Dict[str, Any]:
  """The CPU this process runs on. XLA:CPU compiles for the host's
  instruction set, so float rounding, and with it where a training run
  ends, can differ between CPU kinds; each run records its own."""
  model, isa = platform.processor() or platform.machine(), []
  try:
    with open('/proc/cpuinfo') as f:
      info = dict(line.split(':', 1) for line in f if ':' in line)
  except OSError:
    info = {}
  info = {k.strip(): v.strip() for k, v in info.items()}
  model = info.get('model name', model)
  isa = sorted(f for f in info.get('flags', '').split()
               if f.startswith(('avx', 'fma', 'sse4', 'amx', 'f16c')))
  return {'model': model, 'isa': isa}


# The packages whose versions can change a run's numbers.
PACKAGES = ('jax', 'jaxlib', 'flax', 'optax', 'numpy',
            'opencv-python-headless', 'tensorflow')


def package_versions() -> Dict[str, Optional[str]]:
  """Versions of ``PACKAGES`` here (None: not installed); requirements.txt
  gives lower bounds, so a later install may resolve newer ones."""
  from importlib import metadata  # pylint: disable=g-import-not-at-top
  out = {}
  for name in PACKAGES:
    try:
      out[name] = metadata.version(name)
    except metadata.PackageNotFoundError:
      out[name] = None
  return out


def needs_model(run: Run, robustness_seeds: Sequence[int],
                levels: Sequence[int], probe_seeds: Sequence[int]) -> bool:
  """Whether ``run`` still lacks a phase that needs its trained model: the
  corruption sweep (``robustness_seeds``) or the noise probe
  (``probe_seeds``)."""
  if run.group != 'arm' or run.same_as is not None:
    return False
  return ((run.seed in robustness_seeds and
           not robustness_done(run.workdir, levels)) or
          (run.seed in probe_seeds and not noise_probe.done(run.workdir)))


def robustness_done(workdir: str, levels: Sequence[int]) -> bool:
  """Whether ``workdir/robustness.json`` holds the clean split and every
  corruption at each of ``levels``."""
  found = patients.robustness_json(workdir)
  if found is None:
    return False
  rows = found.get('rows', [])
  have = {(r['corruption'], int(r['severity'])) for r in rows}
  from spad_jax.data import corruptions  # pylint: disable=g-import-not-at-top
  want = {('none', 0)} | {(n, int(s)) for n in corruptions.SEVERITIES
                          for s in levels}
  return want <= have


def finished_arm_runs(runs: Sequence[Run], seeds: Sequence[int]
                      ) -> List[Run]:
  """The finished arm runs of ``seeds`` (not sweeps, not reused ones): what
  the phases after training work on."""
  return [r for r in runs if r.group == 'arm' and r.same_as is None and
          r.seed in seeds and is_done(r)]


def execute_robustness(runs: Sequence[Run], seeds: Sequence[int],
                       levels: Sequence[int], sweep_fn=None) -> None:
  """Sweeps the finished arm runs of ``seeds`` under every corruption at
  ``levels`` (``robustness.robustness``), skipping complete sweeps; a
  stopped sweep resumes from its finished evaluations."""
  if sweep_fn is None:
    from spad_jax import robustness  # pylint: disable=g-import-not-at-top
    sweep_fn = robustness.robustness
  todo = [r for r in finished_arm_runs(runs, seeds)
          if not robustness_done(r.workdir, levels)]
  logging.info('Robustness: %d runs to sweep (severities %s).', len(todo),
               list(levels))
  durations = []
  for i, run in enumerate(todo):
    begin = time.time()
    sweep_fn(run.config, run.workdir, levels)
    durations.append(time.time() - begin)
    logging.info('=== Robustness %d/%d: %s seed %d%s in %.0f s; ETA %s.',
                 i + 1, len(todo), run.name, run.seed,
                 '' if run.fold is None else f' fold {run.fold}',
                 durations[-1], formatting.hms(
                     (len(todo) - i - 1) * float(np.mean(durations))))


def execute_noise_probe(runs: Sequence[Run], seeds: Sequence[int],
                        probe_fn=noise_probe.probe) -> None:
  """Probes the finished arm runs of ``seeds`` that have no complete
  ``noise_probe.json`` yet (``noise_probe.probe``)."""
  todo = [r for r in finished_arm_runs(runs, seeds)
          if not noise_probe.done(r.workdir)]
  logging.info('Noise probe: %d runs to probe.', len(todo))
  for i, run in enumerate(todo):
    result = probe_fn(run.config, run.workdir)
    off = result['versions']['off_target']
    logging.info('Noise probe %d/%d (%s): off-target pixels read as '
                 'foreground %d of %d, %.0f s.', i + 1, len(todo),
                 run.workdir, off['off_foreground'], off['off_pixels'],
                 result['seconds'])


# ------------------------------------------------------------ reading back


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
  cal, unc = m.get('calibration') or {}, m.get('uncertainty') or {}
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
      'ECE': cal.get('ece'), 'NLL': cal.get('nll'), 'Brier': cal.get('brier'),
      'error_AUROC': unc.get('error_auroc'),
      'error_AUPRC': unc.get('error_auprc'),
      'case_Spearman': unc.get('case_dice_spearman'),
      'chain_label': ((m.get('chain_label_auto') or {}).get('picked') or
                      (m.get('sampling') or {}).get('chain_label')),
  })
  timing = study_run_path(run.workdir)
  if os.path.exists(timing):
    with open(timing) as f:
      t = json.load(f)
    out['seconds'] = t.get('seconds')
    out['after_seconds'] = t.get('after_seconds')
    out['after_untimed_invocations'] = t.get('after_untimed_invocations')
    out['resumed'] = t.get('resumed')
    # Before invocations were timed, a resumed run's file held only its last.
    out['untimed_invocations'] = t.get('untimed_invocations',
                                       int(bool(t.get('resumed'))))
    out['cpu'] = t.get('cpu')
    out['packages'] = t.get('packages')
  swept = patients.robustness_json(run.workdir)
  if swept is not None:
    # What was swept, so the report finds the corrupted evaluations without
    # reading the file again.
    out['swept'] = [[r['corruption'], int(r['severity'])]
                    for r in swept['rows']]
    # Calibration under corruption: mean over the sweep.
    rows = [r for r in swept['rows'] if r['corruption'] != 'none']
    for key, name in (('ece', 'corrupted_ECE'),
                      ('error_auroc', 'corrupted_error_AUROC')):
      values = [r[key] for r in rows if r.get(key) is not None]
      out[name] = float(np.mean(values)) if values else None
  probe = noise_probe.read(run.workdir)
  if probe is not None:
    out['noise_probe'] = probe
  log = read_log(run.workdir)
  if log.get('train_mDice') and log.get('loss'):
    out['train_mDice'] = log['train_mDice']
    out['train_plateau'] = patients.plateau(log['train_mDice'],
                                            log['loss'][-1][0])
  if log.get('steps_per_sec'):
    rates = [v for _, v in log['steps_per_sec']]
    out['train_steps_per_sec'] = float(np.median(rates))
  return out
