"""The ablation study (experiments/ablation/) end to end at tiny size on CPU."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import ROOT
from conftest import xla_flags
from experiments.ablation import plan
from experiments.ablation import stats
import tiny_config


def _metrics(workdir):
  with open(os.path.join(workdir, 'metrics.json')) as f:
    return json.load(f)


def _pm(values, scale, digits=2):
  v = np.asarray(values, np.float64) * scale
  return f'{v.mean():.{digits}f} ± {v.std(ddof=1):.{digits}f}'


def test_plan_runs_arms_seeds_and_reuse(tmp_path):
  base = tiny_config.get_config()
  runs = plan.plan_runs(base, str(tmp_path), ['baseline', 'full'], [0, 1],
                         sweeps=['lambda', 'anchor'],
                         sweep_values={'lambda': [0.05, 0.2],
                                       'anchor': [0.3]},
                         sweep_seeds=[0])
  arm_runs = [r for r in runs if r.group == 'arm']
  assert [(r.name, r.seed) for r in arm_runs] == [
      ('baseline', 0), ('full', 0), ('baseline', 1), ('full', 1)]
  baseline = arm_runs[0].config
  assert not baseline.spad.scd and not baseline.spad.bcd
  assert arm_runs[3].config.seed == 1 and arm_runs[3].config.spad.pas
  # Only the seed differs between seeds; the split stays.
  assert arm_runs[0].config.data.split_seed == arm_runs[2].config.data.split_seed
  sweep = {(r.group, r.name): r for r in runs if r.group != 'arm'}
  # The config's own λ and anchor ratio at the same budget = the full run.
  assert sweep[('sweep_lambda', '0.05')].same_as == arm_runs[1].workdir
  assert sweep[('sweep_anchor', '0.3')].same_as == arm_runs[1].workdir
  assert sweep[('sweep_lambda', '0.2')].same_as is None
  assert sweep[('sweep_lambda', '0.2')].config.spad.pas_lambda == 0.2
  # A shorter sweep budget makes them runs of their own.
  runs = plan.plan_runs(base, str(tmp_path), ['full'], [0],
                         sweeps=['lambda'], sweep_values={'lambda': [0.05]},
                         sweep_epochs=1)
  assert runs[1].same_as is None and runs[1].config.train.num_epochs == 1
  # The own-sample phase keeps its share of the budget.
  base.diffusion.own_sample_start_step = 6
  runs = plan.plan_runs(base, str(tmp_path), ['full'], [0],
                         sweeps=['lambda'], sweep_values={'lambda': [0.2]},
                         sweep_epochs=3 * base.train.num_epochs)
  assert runs[1].config.train.num_epochs == 3 * base.train.num_epochs
  assert runs[1].config.diffusion.own_sample_start_step == 18
  assert runs[0].config.diffusion.own_sample_start_step == 6
  with pytest.raises(ValueError, match='unknown arm'):
    plan.plan_runs(base, str(tmp_path), ['nope'], [0])


def test_folds_and_paired_difference(tmp_path):
  base = tiny_config.get_config()
  runs = plan.plan_runs(base, str(tmp_path), ['full'], [0], folds=3)
  assert [r.config.data.fold for r in runs] == [0, 1, 2]
  assert all(r.config.data.num_folds == 3 for r in runs)
  assert runs[2].workdir.endswith(os.path.join('full', 'seed0', 'fold2'))
  # Seed, then fold, then arm: each finished fold holds every arm.
  runs = plan.plan_runs(base, str(tmp_path), ['unet', 'full_components'],
                        [0, 1], folds=2)
  assert [(r.seed, r.fold, r.name) for r in runs] == [
      (s, f, a) for s in (0, 1) for f in (0, 1)
      for a in ('unet', 'full_components')]
  from spad_jax import config_validation
  unet, comp = runs[0].config, runs[1].config
  config_validation.validate(unet)  # No diffusion-only option left on.
  assert unet.model.kind == 'deterministic' and not unet.spad.scd
  assert not unet.spad.bcd and unet.diffusion.own_sample_fraction == 0
  assert comp.spad.components and comp.spad.scd and comp.spad.bcd
  assert comp.spad.pas and comp.model.kind == 'diffusion'
  # A seed counts once all its folds are done: the mean over folds.
  records = [{'seed': 0, 'done': True, 'mDice': 0.4},
             {'seed': 0, 'done': True, 'mDice': 0.6},
             {'seed': 1, 'done': True, 'mDice': 0.9},
             {'seed': 1, 'done': False, 'mDice': None}]
  assert stats.seed_values(records, 'mDice') == {0: pytest.approx(0.5)}
  diff = stats.paired_difference({0: 0.5, 1: 0.7, 2: 0.6},
                                 {0: 0.4, 1: 0.5, 2: 0.6})
  assert diff['diffs'] == pytest.approx([0.1, 0.2, 0.0])
  assert diff['mean'] == pytest.approx(0.1)
  half = 4.302652729911275 * 0.1 / np.sqrt(3)  # t(0.975, 2) * sd / sqrt(n).
  assert diff['ci_low'] == pytest.approx(0.1 - half)
  assert diff['ci_high'] == pytest.approx(0.1 + half)


def test_workdir_with_another_config_stops(tmp_path):
  base = tiny_config.get_config()
  run = plan.plan_runs(base, str(tmp_path), ['full'], [0])[0]
  os.makedirs(run.workdir)
  other = base.copy_and_resolve_references()
  other.train.num_epochs = 99
  with open(os.path.join(run.workdir, 'config.json'), 'w') as f:
    f.write(other.to_json_best_effort())
  with pytest.raises(plan.StudyError, match='train.num_epochs'):
    plan.check_workdir(run)
  # A key the code gained since the run started is not a change of budget.
  older = json.loads(base.to_json_best_effort())
  del older['train']['monitor_train_cases']
  with open(os.path.join(run.workdir, 'config.json'), 'w') as f:
    json.dump(older, f)
  plan.check_workdir(run)
  # A changed value next to it still stops the study.
  older['train']['num_epochs'] = 99
  with open(os.path.join(run.workdir, 'config.json'), 'w') as f:
    json.dump(older, f)
  with pytest.raises(plan.StudyError, match='train.num_epochs') as e:
    plan.check_workdir(run)
  assert 'monitor_train_cases' not in str(e.value)


def test_execute_runs_the_model_phases_while_the_model_is_there(tmp_path):
  """after_run follows each trained run; a finished run missing a phase is
  caught up from its checkpoint, or trained again once that is gone (a
  study folder that kept only its small files)."""
  base = tiny_config.get_config()
  base.eval.checkpoint = 'best'
  runs = plan.plan_runs(base, str(tmp_path), ['baseline', 'full'], [0])
  trained, after = [], []

  def train_fn(config, workdir):
    trained.append(workdir)
    for folder in ('checkpoints', 'best_checkpoint'):
      os.makedirs(os.path.join(workdir, folder, '7'), exist_ok=True)
    with open(os.path.join(workdir, 'metrics.json'), 'w') as f:
      json.dump({'mDice': 0.5}, f)
    return {'mDice': 0.5}

  def after_run(run):
    after.append(run.workdir)
    open(os.path.join(run.workdir, 'phase.json'), 'w').close()

  def needs_model(run):
    return not os.path.exists(os.path.join(run.workdir, 'phase.json'))

  def execute():
    trained.clear()
    after.clear()
    return plan.execute(runs, train_fn, after_run, needs_model)

  a, b = runs[0].workdir, runs[1].workdir
  assert execute() and trained == [a, b] and after == [a, b]
  assert execute() and trained == [] and after == []
  os.remove(os.path.join(a, 'phase.json'))  # Its model is still here.
  assert execute() and trained == [] and after == [a]
  os.remove(os.path.join(b, 'phase.json'))  # Its best model is gone.
  import shutil
  shutil.rmtree(os.path.join(b, 'best_checkpoint'))
  assert not plan.has_model(runs[1]) and plan.has_model(runs[0])
  assert execute() and trained == [b] and after == [b]
  # Gone but nothing missing: a finished run stays finished.
  shutil.rmtree(os.path.join(a, 'checkpoints'))
  assert execute() and trained == [] and after == []


def test_a_resumed_runs_time_counts_every_invocation(tmp_path, monkeypatch):
  """study_run.json's seconds sum the invocations of a run that was stopped
  and resumed; one killed outright (no time recorded) is counted as
  untimed, and the report says its sum is a lower bound."""
  import shutil
  from experiments.ablation import report
  base = tiny_config.get_config()
  runs = plan.plan_runs(base, str(tmp_path), ['baseline'], [0])
  workdir = runs[0].workdir
  clock = {'now': 1000.0}
  monkeypatch.setattr(plan.time, 'time', lambda: clock['now'])
  monkeypatch.setattr(plan, 'release_compiled', lambda: None)
  outcomes = []

  def train_fn(config, workdir):
    os.makedirs(os.path.join(workdir, 'checkpoints'), exist_ok=True)
    seconds, result = outcomes.pop(0)
    clock['now'] += seconds
    if result == 'killed':
      raise SystemExit(1)
    if result is None:
      return None
    with open(os.path.join(workdir, 'metrics.json'), 'w') as f:
      json.dump(result, f)
    return result

  def timing():
    with open(os.path.join(workdir, 'study_run.json')) as f:
      return json.load(f)

  outcomes[:] = [(100.0, None)]  # Stopped (SIGTERM): its time is kept.
  assert not plan.execute(runs, train_fn)
  assert not os.path.exists(os.path.join(workdir, 'study_run.json'))
  outcomes[:] = [(30.0, {'mDice': 0.5})]
  assert plan.execute(runs, train_fn)
  t = timing()
  assert (t['seconds'], t['invocations'], t['untimed_invocations'],
          t['resumed']) == (130.0, 2, 0, True)
  assert not os.path.exists(plan.partial_time_path(workdir))
  row = plan.collect_run(runs[0])
  assert row['seconds'] == 130.0 and row['untimed_invocations'] == 0
  assert 'lower bound' not in '\n'.join(report.timing_lines([row]))

  # Killed outright mid-run (here: an exception through execute), so the
  # file it marked open stays open; the next invocation counts it untimed.
  shutil.rmtree(workdir)
  outcomes[:] = [(50.0, 'killed')]
  with pytest.raises(SystemExit):
    plan.execute(runs, train_fn)
  outcomes[:] = [(20.0, {'mDice': 0.5})]
  assert plan.execute(runs, train_fn)
  t = timing()
  assert (t['seconds'], t['invocations'], t['untimed_invocations']) == (
      20.0, 2, 1)
  row = plan.collect_run(runs[0])
  assert row['seconds'] == 20.0 and row['untimed_invocations'] == 1
  text = '\n'.join(report.timing_lines([row]))
  assert ('0:00:20 in all (a lower bound: 1 of them resumed after a stop'
          in text)

  with open(plan.partial_time_path(workdir), 'w') as f:
    f.write('{')
  with pytest.raises(plan.StudyError, match='study_partial_time.json'):
    plan.read_partial_time(workdir, True)


def test_the_phases_after_training_record_their_time(tmp_path, monkeypatch):
  """study_run.json adds the seconds of the phases after training
  (after_seconds), so the study's cost needs no log; phases finished by a
  later invocation after an untimed one are summed and flagged."""
  from experiments.ablation import report
  base = tiny_config.get_config()
  base.eval.checkpoint = 'latest'  # So the model is on disk (see below).
  runs = plan.plan_runs(base, str(tmp_path), ['baseline', 'full'], [0])
  clock = {'now': 1000.0}
  monkeypatch.setattr(plan.time, 'time', lambda: clock['now'])
  monkeypatch.setattr(plan, 'release_compiled', lambda: None)
  trained = []
  after_cost = {runs[0].workdir: 7.0, runs[1].workdir: 11.0}

  def train_fn(config, workdir):
    trained.append(workdir)
    os.makedirs(os.path.join(workdir, 'checkpoints', '1'), exist_ok=True)
    clock['now'] += 100.0
    with open(os.path.join(workdir, 'metrics.json'), 'w') as f:
      json.dump({'mDice': 0.5}, f)
    return {'mDice': 0.5}

  def after_run(run):
    clock['now'] += after_cost[run.workdir]
    open(os.path.join(run.workdir, 'phase.json'), 'w').close()

  def needs_model(run):
    return not os.path.exists(os.path.join(run.workdir, 'phase.json'))

  def timing(run):
    with open(os.path.join(run.workdir, 'study_run.json')) as f:
      return json.load(f)

  assert plan.execute(runs, train_fn, after_run, needs_model)
  for run, cost in zip(runs, (7.0, 11.0)):
    t = timing(run)
    assert (t['seconds'], t['after_seconds'],
            t['after_untimed_invocations']) == (100.0, cost, 0)
  rows = [plan.collect_run(r) for r in runs]
  text = '\n'.join(report.timing_lines(rows))
  assert ('recorded for 2 of the 2 runs: 0:00:18 in all; per run median '
          '9 s (min 7, max 11).') in text

  # The second run's phases were killed before they recorded their time
  # (as a run finished before they were timed looks): the next invocation
  # finishes them and flags the sum as a lower bound.
  t = timing(runs[1])
  del t['after_seconds'], t['after_untimed_invocations']
  with open(os.path.join(runs[1].workdir, 'study_run.json'), 'w') as f:
    json.dump(t, f)
  os.remove(os.path.join(runs[1].workdir, 'phase.json'))
  after_cost[runs[1].workdir] = 4.0
  trained.clear()
  assert plan.execute(runs, train_fn, after_run, needs_model)
  assert not trained  # Caught up from its checkpoint, not trained again.
  t = timing(runs[1])
  assert (t['seconds'], t['after_seconds'],
          t['after_untimed_invocations']) == (100.0, 4.0, 1)
  assert timing(runs[0])['after_seconds'] == 7.0  # Not run again.
  rows = [plan.collect_run(r) for r in runs]
  assert (rows[1]['after_seconds'], rows[1]['after_untimed_invocations']) == (
      4.0, 1)
  text = '\n'.join(report.timing_lines(rows))
  assert ('0:00:11 in all (a lower bound: 1 of them were finished after a '
          'stop that recorded no time)') in text


@pytest.mark.long
@pytest.mark.skipif(not os.path.exists('/proc/self/maps'),
                    reason='counts memory mappings in /proc (Linux)')
def test_a_long_study_does_not_keep_every_run_compiled(tmp_path):
  """XLA:CPU maps each executable's code; a study process that kept every
  run's compiled functions crashed at the kernel's mapping limit. After a
  run, what it compiled is released: the next run starts where it did."""
  from spad_jax import train

  def mappings():
    with open('/proc/self/maps') as f:
      return sum(1 for _ in f)

  base = tiny_config.get_config()
  base.train.num_epochs = 1
  # The deterministic UNet: the cheapest runs that compile a train step,
  # an evaluation and a test pass like every arm's.
  runs = plan.plan_runs(base, str(tmp_path), ['unet'], [0, 1, 2])
  starts, grown = [], []

  def train_fn(config, workdir):
    starts.append(mappings())
    result = train.train_and_evaluate(config, workdir)
    grown.append(mappings() - starts[-1])
    return result

  assert plan.execute(runs, train_fn)
  # Each run maps hundreds of pages of code; what stays after it is far
  # less (without the release: all of it, 1,650 a tiny run measured).
  assert min(grown) > 200
  assert starts[2] - starts[1] < 0.25 * min(grown), (starts, grown)


def test_environments_are_named_only_when_runs_differ():
  from experiments.ablation import report
  cpu = plan.cpu_identity()
  assert cpu['model'] and isinstance(cpu['isa'], list)
  assert plan.package_versions()['jax'] == __import__('jax').__version__
  one = {'model': 'A', 'isa': ['avx2']}
  other = {'model': 'B', 'isa': []}
  old = {'jax': '1', 'numpy': '2'}
  new = {'jax': '1', 'numpy': '3'}
  same = {'runs': [{'cpu': one, 'packages': old}, {'cpu': one,
                                                    'packages': old}, {}]}
  assert report.environment_note(same) == ''
  mixed = {'runs': [{'cpu': one, 'packages': old},
                    {'cpu': other, 'packages': new},
                    {'cpu': one, 'packages': new}]}
  note = report.environment_note(mixed)
  assert 'Runs trained on 2 on A (avx2); 1 on B (no AVX).' in note
  assert 'Runs trained with 1 with numpy 2; 2 with numpy 3.' in note


@pytest.mark.long
def test_study_end_to_end(tmp_path):
  """2 arms x 2 seeds + one value per sweep (one reuses the full run)."""
  out = str(tmp_path / 'study')
  env = dict(os.environ, JAX_PLATFORMS='cpu', TF_CPP_MIN_LOG_LEVEL='2',
             XLA_FLAGS=xla_flags(1))
  args = [sys.executable, '-m', 'experiments.ablation.main',
          '--config=tests/tiny_config.py', f'--out={out}', '--seeds=0,1',
          '--arms=baseline,full', '--sweeps=lambda,anchor', '--lambdas=0.05',
          '--anchors=0.6', '--qualitative_cases=2',
          '--config.train.num_epochs=1']
  result = subprocess.run(args, cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-4000:]
  for name in ('results.json', 'results.md', 'curves.png', 'schedule.png',
               'sweep_lambda.png', 'sweep_anchor.png', 'qualitative.png'):
    assert os.path.getsize(os.path.join(out, name)) > 500, name
  # Without folds there are no test patients to pair.
  assert not os.path.exists(os.path.join(out, 'patients.png'))
  results = json.load(open(os.path.join(out, 'results.json')))
  table = open(os.path.join(out, 'results.md')).read()
  runs = results['runs']
  assert len(runs) == 6 and all(r['done'] for r in runs)
  # 5 distinct runs: λ = 0.05 is the config's own value, the full run.
  assert len({r['workdir'] for r in runs}) == 5
  lam = [r for r in runs if r['group'] == 'sweep_lambda'][0]
  assert lam['same_as'] == os.path.join(out, 'full', 'seed0')
  for arm, label in (('baseline', 'baseline CCDM'), ('full', 'full SPAD')):
    ms = [_metrics(os.path.join(out, arm, f'seed{s}')) for s in (0, 1)]
    row = next(line for line in table.splitlines()
               if line.startswith(f'| {label} |'))
    assert _pm([m['mIoU'] for m in ms], 100) in row
    assert _pm([m['mDice'] for m in ms], 100) in row
    assert _pm([m['per_case_mean']['HD95'] for m in ms], 1, 1) in row
    summary = results['arms'][arm]['mDice']
    assert summary['values'] == pytest.approx([m['mDice'] for m in ms])
    assert ms[0]['checkpoint_step'] == 4  # 32 cases / batch 8, 1 epoch.
  diff = results['arms']['full']['vs_baseline']['mDice']
  base = [_metrics(os.path.join(out, 'baseline', f'seed{s}'))['mDice']
          for s in (0, 1)]
  full = [_metrics(os.path.join(out, 'full', f'seed{s}'))['mDice']
          for s in (0, 1)]
  assert diff['diffs'] == pytest.approx([f - b for f, b in zip(full, base)])
  anchor = results['sweeps']['anchor']['rows'][0]
  assert anchor['value'] == 0.6 and anchor['mDice']['n'] == 1
  assert os.path.exists(os.path.join(out, 'sweep_anchor', '0.6', 'seed0',
                                     'metrics.json'))
  assert len(results['meta']['qualitative_cases']) == 2
  with open(os.path.join(out, 'full', 'seed0', 'config.json')) as f:
    assert json.load(f)['seed'] == 0
  with open(os.path.join(out, 'full', 'seed1', 'config.json')) as f:
    assert json.load(f)['seed'] == 1

  # The same command again trains nothing and rebuilds the same table.
  stamp = os.path.getmtime(os.path.join(out, 'full', 'seed1', 'metrics.json'))
  again = subprocess.run(args + ['--qualitative_cases=0'], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=600)
  assert again.returncode == 0, again.stderr[-4000:]
  assert '5 already done, 0 to train' in again.stderr
  assert os.path.getmtime(os.path.join(out, 'full', 'seed1',
                                       'metrics.json')) == stamp
  rows = lambda text: [l for l in text.splitlines() if l.startswith('|')]
  assert rows(open(os.path.join(out, 'results.md')).read()) == rows(table)

  # A subset reported elsewhere reads the same runs and leaves the whole
  # study's report as it was.
  sub = str(tmp_path / 'subset')
  subset = subprocess.run(
      [sys.executable, '-m', 'experiments.ablation.main',
       '--config=tests/tiny_config.py', f'--out={out}', '--seeds=1',
       '--arms=full', f'--report_dir={sub}', '--qualitative_cases=0',
       '--config.train.num_epochs=1'], cwd=ROOT, env=env,
      capture_output=True, text=True, timeout=600)
  assert subset.returncode == 0, subset.stderr[-4000:]
  assert '1 already done, 0 to train' in subset.stderr
  assert os.path.getmtime(os.path.join(out, 'full', 'seed1',
                                       'metrics.json')) == stamp
  assert rows(open(os.path.join(out, 'results.md')).read()) == rows(table)
  assert json.load(open(os.path.join(out, 'results.json')))['meta'][
      'seeds'] == [0, 1]
  picked = json.load(open(os.path.join(sub, 'results.json')))
  assert picked['meta']['arms'] == ['full'] and picked['meta']['seeds'] == [1]
  assert [r['workdir'] for r in picked['runs']] == [
      os.path.join(out, 'full', 'seed1')]
  assert picked['arms']['full']['mDice']['values'] == pytest.approx(
      [_metrics(os.path.join(out, 'full', 'seed1'))['mDice']])
  assert os.path.getsize(os.path.join(sub, 'curves.png')) > 500


def _patient_dataset(root, patients=6, per_patient=4):
  """Synthetic B-scans at 20² in the folder format, ``per_patient`` cases
  for each of ``patients`` patients."""
  import cv2
  from spad_jax.data import synthetic
  for sub in ('images', 'labels'):
    os.makedirs(os.path.join(root, sub), exist_ok=True)
  cases = []
  for p in range(patients):
    for k in range(per_patient):
      image, label = synthetic.generate_case(5, 'train', p * per_patient + k,
                                             20)
      case = f'p{p}_b{k}'
      cv2.imwrite(os.path.join(root, 'images', case + '.png'), image)
      cv2.imwrite(os.path.join(root, 'labels', case + '.png'), label)
      cases.append({'id': case, 'patient': f'p{p}'})
  names = synthetic.CLASS_NAMES
  with open(os.path.join(root, 'dataset.json'), 'w') as f:
    json.dump({'name': 'patients', 'cases': cases,
               'labels': {n: c for c, n in enumerate(names)}}, f)


@pytest.mark.long
def test_cross_validated_study_end_to_end(tmp_path):
  """2 folds x 2 seeds x (baseline, UNet) on 6 patients: every patient is
  tested once per seed, and the pooled scores equal those rebuilt from
  each run's metrics.json (confusion counts, not per_case.csv)."""
  root, out = str(tmp_path / 'data'), str(tmp_path / 'study')
  _patient_dataset(root)
  env = dict(os.environ, JAX_PLATFORMS='cpu', TF_CPP_MIN_LOG_LEVEL='2',
             XLA_FLAGS=xla_flags(1))
  args = [sys.executable, '-m', 'experiments.ablation.main',
          '--config=tests/tiny_config.py', f'--out={out}', '--seeds=0,1',
          '--arms=baseline,unet', '--folds=2', '--qualitative_cases=1',
          '--config.data.name=folder', f'--config.data.root={root}',
          '--config.data.val_fraction=0.17', '--config.train.num_epochs=2',
          '--config.train.eval_every_epochs=1',
          '--config.train.monitor_train_cases=2', '--robustness_seeds=0',
          '--robustness_levels=5', '--noise_probe_seeds=0']
  result = subprocess.run(args, cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=900)
  assert result.returncode == 0, result.stderr[-4000:]
  results = json.load(open(os.path.join(out, 'results.json')))
  cv = results['cv']
  assert cv['patients'] == [f'p{p}' for p in range(6)]
  from spad_jax.data import corruptions
  from spad_jax.data import synthetic
  names = synthetic.CLASS_NAMES[1:]

  def pooled(folders):
    """Dice of the summed confusion counts of metrics.json files."""
    both, total = np.zeros(len(names)), np.zeros(len(names))
    for folder in folders:
      m = _metrics(folder)
      for c, name in enumerate(names):
        pc = m['per_class'][name]
        total[c] += pc['gt_pixels'] + pc['pred_pixels']
        if pc['Dice'] is not None:
          both[c] += pc['Dice'] * (pc['gt_pixels'] + pc['pred_pixels']) / 2
    present = total > 0
    return np.mean(2 * both[present] / total[present])

  for arm in ('baseline', 'unet'):
    entry = cv['arms'][arm]
    assert entry['patients_done'] == 6 and entry['runs_patients'] == 12
    per_seed = []
    for seed in (0, 1):
      per_seed.append(pooled([os.path.join(out, arm, f'seed{seed}',
                                           f'fold{fold}') for fold in (0, 1)]))
      assert entry['per_seed'][str(seed)]['mDice'] == pytest.approx(
          per_seed[-1], abs=1e-6)
    assert entry['mDice'] == pytest.approx(np.mean(per_seed), abs=1e-6)
    # Seed 0's runs swept at severity 5, seed 1's not.
    rob = entry['robustness']
    assert rob['corrupted']['runs_patients'] == 6
    assert rob['clean']['mDice'] == pytest.approx(per_seed[0], abs=1e-6)
    seed0 = [os.path.join(out, arm, 'seed0', f'fold{f}') for f in (0, 1)]
    assert rob['corrupted']['mDice'] == pytest.approx(pooled(
        [os.path.join(w, 'corruptions', f'{n}_s5') for w in seed0
         for n in corruptions.SEVERITIES]), abs=1e-6)
    assert list(rob['per_corruption']) == list(corruptions.SEVERITIES)
    for n in corruptions.SEVERITIES:
      assert rob['per_corruption'][n]['mDice'] == pytest.approx(pooled(
          [os.path.join(w, 'corruptions', f'{n}_s5') for w in seed0]),
                                                             abs=1e-6)
    for w in seed0:
      rows = json.load(open(os.path.join(w, 'robustness.json')))['rows']
      assert len(rows) == 1 + len(corruptions.SEVERITIES)
    assert not os.path.exists(os.path.join(out, arm, 'seed1', 'fold0',
                                           'robustness.json'))
    # The noise probe: seed 0's runs only; its clean images score as the
    # run's own evaluation did.
    probe = results['noise_probe'][arm]
    assert probe['runs'] == 2
    assert probe['clean']['mDice'] == pytest.approx(per_seed[0], abs=1e-6)
    for w in seed0:
      versions = json.load(open(os.path.join(w, 'noise_probe.json')))[
          'versions']
      clean = np.asarray(versions['clean']['confusion'])
      gt = [_metrics(w)['per_class'][n]['gt_pixels']
            for n in synthetic.CLASS_NAMES]
      assert clean.sum(axis=1).tolist() == gt
      assert versions['clean']['off_pixels'] == versions['off_target'][
          'off_pixels'] > 0
      assert os.path.getsize(os.path.join(w, 'noise_probe.png')) > 0
    assert not os.path.exists(os.path.join(out, arm, 'seed1', 'fold0',
                                           'noise_probe.json'))
    # Calibration and uncertainty: each run's own numbers, averaged.
    folders = [os.path.join(out, arm, f'seed{s}', f'fold{f}')
               for s in (0, 1) for f in (0, 1)]
    cal = entry['calibration']
    for key, section, name in (('ECE', 'calibration', 'ece'),
                               ('Brier', 'calibration', 'brier'),
                               ('error_AUROC', 'uncertainty', 'error_auroc')):
      assert cal[key]['runs'] == 4
      assert cal[key]['mean'] == pytest.approx(np.mean(
          [_metrics(w)[section][name] for w in folders]))
    swept = [[r for r in json.load(open(os.path.join(w, 'robustness.json')))[
        'rows'] if r['corruption'] != 'none'] for w in seed0]
    assert cal['corrupted_ECE']['runs'] == 2
    assert cal['corrupted_ECE']['mean'] == pytest.approx(np.mean(
        [np.mean([r['ece'] for r in rows]) for rows in swept]))
  diff = cv['arms']['unet']['vs_reference']
  assert diff['mDice'] == pytest.approx(
      cv['arms']['unet']['mDice'] - cv['arms']['baseline']['mDice'])
  for n in corruptions.SEVERITIES:
    d = cv['arms']['unet']['robustness']['per_corruption'][n]['vs_reference']
    assert d['mDice'] == pytest.approx(
        cv['arms']['unet']['robustness']['per_corruption'][n]['mDice'] -
        cv['arms']['baseline']['robustness']['per_corruption'][n]['mDice'])
  assert 'vs_reference' not in cv['arms']['baseline']['robustness'][
      'per_corruption']['blur']
  lo, hi = diff['mDice_ci95']
  assert lo <= diff['mDice'] <= hi and len(diff['patients']) == 6
  # The t check: each patient's mean difference over its seeds, from the
  # per-patient tables the same file holds.
  per = {arm: cv['arms'][arm]['per_patient'] for arm in ('unet', 'baseline')}
  means = [np.mean(np.subtract(per['unet'][p], per['baseline'][p]))
           for p in cv['patients']]
  assert diff['patient_t']['patients'] == 6
  assert diff['patient_t']['mean'] == pytest.approx(np.mean(means))
  lo, hi = diff['patient_t']['ci95']
  assert lo < np.mean(means) < hi
  # Each run's train-split curve and its plateau reading.
  runs = [r for r in results['runs'] if r['group'] == 'arm']
  assert len(runs) == 8 and all(r['done'] for r in runs)
  for r in runs:
    assert [s for s, _ in r['train_mDice']] == [1, 2]
    assert r['train_plateau']['final'] == r['train_mDice'][-1][1]
  table = open(os.path.join(out, 'results.md')).read()
  assert 'Patient-level cross-validation (2 folds, 6 patients)' in table
  assert 'Under corruption' in table
  assert 'Each corruption on its own' in table
  assert "Does a model read SPAD's noise as the structure?" in table
  assert 'Calibration and uncertainty of the soft map' in table
  assert os.path.getsize(os.path.join(out, 'patients.png')) > 500
  row = next(line for line in table.splitlines()
             if line.startswith('| UNet (deterministic) | 4 | 6 |'))
  assert f'{100 * cv["arms"]["unet"]["mDice"]:.2f}' in row
  row = next(line for line in table.splitlines()
             if line.startswith('| UNet (deterministic) | 6 |'))
  assert row.endswith(
      f'{100 * diff["patient_t"]["half_width"]:.2f} |'), row
  # The folder as a fresh clone has it (small files, no checkpoints), and
  # one probe lost with its model: that run alone is trained again, to the
  # same result, and probed; the figure stays as it was.
  import shutil
  for arm in ('baseline', 'unet'):
    for seed in (0, 1):
      for fold in (0, 1):
        for name in ('checkpoints', 'best_checkpoint'):
          shutil.rmtree(os.path.join(out, arm, f'seed{seed}', f'fold{fold}',
                                     name), ignore_errors=True)
  lost = os.path.join(out, 'baseline', 'seed0', 'fold1')
  before = _metrics(lost)
  os.remove(os.path.join(lost, 'noise_probe.json'))
  figure = os.path.join(out, 'qualitative.png')
  made = os.path.getmtime(figure)
  assert results['meta']['qualitative_cases']
  result = subprocess.run(args, cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=900)
  assert result.returncode == 0, result.stderr[-4000:]
  assert 'training it again' in result.stderr
  assert 'Study run 1/1: arm baseline seed 0 fold 1 ' in result.stderr
  assert _metrics(lost)['per_class'] == before['per_class']
  assert os.path.exists(os.path.join(lost, 'noise_probe.json'))
  again = json.load(open(os.path.join(out, 'results.json')))
  assert again['meta']['qualitative_cases'] == results['meta'][
      'qualitative_cases']
  assert os.path.getmtime(figure) == made
  assert again['cv']['arms']['baseline']['mDice'] == cv['arms']['baseline'][
      'mDice']


def test_robustness_done_needs_every_corruption_at_every_level(tmp_path):
  from spad_jax.data import corruptions
  path = tmp_path / 'robustness.json'
  assert not plan.robustness_done(str(tmp_path), [3])
  rows = [{'corruption': 'none', 'severity': 0}] + [
      {'corruption': n, 'severity': 3} for n in corruptions.SEVERITIES]
  path.write_text(json.dumps({'rows': rows[:-1]}))  # A stopped sweep.
  assert not plan.robustness_done(str(tmp_path), [3])
  path.write_text(json.dumps({'rows': rows}))
  assert plan.robustness_done(str(tmp_path), [3])
  assert not plan.robustness_done(str(tmp_path), [3, 5])


def test_compare_curves_reports_each_runs_curves_and_plateau(tmp_path):
  from experiments.ablation import curves
  # Two finished runs: one still rising at its end, one flat.
  rising = [(s, s / 100) for s in range(10, 101, 10)]
  flat = [(s, min(s, 50) / 100) for s in range(10, 101, 10)]
  for name, curve in (('rising', rising), ('flat', flat)):
    wd = tmp_path / name
    wd.mkdir()
    with open(wd / 'train_log.jsonl', 'w') as f:
      for step, value in curve:
        f.write(json.dumps({'step': step, 'time': 0.0, 'loss': 1.0}) + '\n')
        f.write(json.dumps({'step': step, 'time': 0.0,
                            'train_mDice': value}) + '\n')
    (wd / 'metrics.json').write_text(json.dumps({'mDice': curve[-1][1] / 2,
                                                 'mIoU': 0.1}))
  out = tmp_path / 'out'
  returned = curves.compare([f'rising={tmp_path / "rising"}',
                             f'flat={tmp_path / "flat"}'], str(out))
  summary = json.loads((out / 'curves.json').read_text())
  assert summary == json.loads(json.dumps(returned))
  assert summary['rising']['steps'] == 100 and summary['flat']['steps'] == 100
  # Rising: 1.0 at the end against 0.9 by step 90, so not on its plateau.
  assert summary['rising']['plateau']['gain'] == pytest.approx(0.1)
  assert summary['rising']['plateau']['on_plateau'] is False
  assert summary['flat']['plateau']['on_plateau'] is True
  assert summary['rising']['test_mDice'] == pytest.approx(0.5)
  rows = (out / 'curves.csv').read_text().strip().splitlines()
  assert len(rows) == 1 + 2 * len(rising)  # Header, train_mDice of both.
  assert (out / 'curves.png').stat().st_size > 0
  with pytest.raises(ValueError, match='no train_log.jsonl'):
    curves.compare([f'gone={tmp_path / "nope"}'], str(out))
  with pytest.raises(ValueError, match='given twice'):
    curves.compare([f'flat={tmp_path / "flat"}'] * 2, str(out))
