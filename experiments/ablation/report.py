"""The study's report: results.json, results.md, the plots and the
qualitative figure (sampled from the arms' checkpoints)."""

import dataclasses
import functools
import json
import os
import platform
import time
from typing import Any, Dict, List, Optional, Sequence

from absl import logging
import numpy as np

from experiments.ablation import noise_probe
from experiments.ablation import patients
from experiments.ablation import plan
from experiments.ablation import stats
from spad_jax import files
from spad_jax import formatting

# Rows of the qualitative figure (paper's Fig. 5): arm, row label.
QUALITATIVE_ROWS = (('full', 'full SPAD'), ('bcd_pas', 'w/o ScD\n(BcD+PaS)'),
                    ('scd_pas', 'w/o BcD\n(ScD+PaS)'),
                    ('baseline', 'baseline\n(CCDM)'))

# Numbers in the tables: a dash where there is none.
_number = functools.partial(formatting.number, missing='—')


def budget_of(config) -> Dict[str, Any]:
  """What a run costs and sees, for the report."""
  import jax  # pylint: disable=g-import-not-at-top
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
  from spad_jax import train_state  # pylint: disable=g-import-not-at-top
  return {'platform': platform.platform(), 'processor': platform.processor(),
          'cpu_count': os.cpu_count(),
          'load_average': list(os.getloadavg()) if hasattr(
              os, 'getloadavg') else None,
          'devices': [str(d) for d in jax.devices()],
          'cpu': plan.cpu_identity(), 'packages': plan.package_versions(),
          'jax': jax.__version__, 'python': platform.python_version(),
          'git_revision': train_state.git_revision()}


def environment_note(results: Dict[str, Any]) -> str:
  """Which CPU kinds and package versions trained the runs, where the runs
  record them and differ: XLA:CPU's float rounding follows the instruction
  set, and a newer package may compute differently, so a run repeated in
  another environment may end elsewhere."""
  runs = [r for r in results['runs'] if r.get('cpu')]
  cpus, packs = {}, {}
  for r in runs:
    key = f'{r["cpu"]["model"]} ({" ".join(r["cpu"]["isa"]) or "no AVX"})'
    cpus[key] = cpus.get(key, 0) + 1
  with_packages = [r for r in runs if r.get('packages')]
  names = sorted({n for r in with_packages for n in r['packages']})
  differ = [n for n in names
            if len({r['packages'].get(n) for r in with_packages}) > 1]
  for r in with_packages:
    key = ', '.join(f'{n} {r["packages"].get(n)}' for n in differ)
    packs[key] = packs.get(key, 0) + 1
  notes = []
  if len(cpus) > 1:
    notes.append('Runs trained on ' + '; '.join(
        f'{n} on {k}' for k, n in sorted(cpus.items())) + '.')
  if differ:
    notes.append('Runs trained with ' + '; '.join(
        f'{n} with {k}' for k, n in sorted(packs.items())) + '.')
  if not notes:
    return ''
  return ' ' + ' '.join(notes) + (' Float rounding follows the CPU and the '
                                  'packages, so a run repeated elsewhere may '
                                  'end elsewhere.')


def markdown(results: Dict[str, Any]) -> str:
  meta, arms = results['meta'], results['arms']
  b = meta['budget']
  unit = 'pixels of the original image'
  fold_note = (f'{b["num_folds"]}-fold patient-level cross-validation, each '
               'seed\'s value the mean over its folds, counted once all its '
               'folds are done' if meta['folds'] else
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
      f'{meta["machine"]["jax"]}; {meta["date"]}.' +
      environment_note(results), '',
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
        f'| {e["label"]} | {e["mIoU"]["n"]} | '
        f'{formatting.mean_std(e["mIoU"], 2, 100)} | '
        f'{formatting.mean_std(e["mDice"], 2, 100)} | '
        f'{formatting.mean_std(e["HD95"], 1)} | '
        f'{_number(e["missed"]["mean"], 1)} / '
        f'{_number(e["spurious"]["mean"], 1)} | '
        + (f'{e["paper_amdsd"]["mIoU"]:.2f} / {e["paper_amdsd"]["mDice"]:.2f}'
           if e['paper_amdsd'] else '—') + ' |')
  seeds = meta['seeds']
  if len(seeds) > 1:
    lines += ['', 'mDice (%) per seed' + (' (mean over folds)' if
                                          meta['folds'] else '') + ':', '',
              '| arm | ' + ' | '.join(f'seed {s}' for s in seeds) + ' |',
              '|---|' + '---:|' * len(seeds)]
    for arm, e in arms.items():
      per_seed = stats.seed_values([r for r in results['runs']
                                    if r['group'] == 'arm' and
                                    r['name'] == arm], 'mDice')
      lines.append(f'| {e["label"]} | ' + ' | '.join(
          _number(per_seed.get(s), 2, 100) for s in seeds) + ' |')
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
          return _number(p['mean'], 2, scale)
        return (f'{_number(p["mean"], 2, scale)} '
                f'[{_number(p["ci_low"], 2, scale)}, '
                f'{_number(p["ci_high"], 2, scale)}]')

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
                   f'{formatting.mean_std(row["mIoU"], 2, 100)} | '
                   f'{formatting.mean_std(row["mDice"], 2, 100)} | '
                   f'{formatting.mean_std(row["HD95"], 1)} |')
  if results.get('cv'):
    lines += cv_markdown(results)
  if results.get('noise_probe'):
    lines += noise_probe_markdown(results)
  lines += timing_lines(results['runs'])
  return '\n'.join(lines) + '\n'


def timing_lines(runs: Sequence[Dict[str, Any]]) -> List[str]:
  """The study's time: its runs' recorded seconds, summed and per run."""
  done = [r for r in runs if r.get('seconds') and not r['same_as']]
  if not done:
    return []
  secs = [r['seconds'] for r in done]
  rates = [r['train_steps_per_sec'] for r in done
           if r.get('train_steps_per_sec')]
  untimed = sum(1 for r in done if r.get('untimed_invocations'))
  return ['', f'Timing: {len(done)} runs trained, '
          f'{formatting.hms(sum(secs))} in all'
          + (f' (a lower bound: {untimed} of them resumed after a stop '
             'that recorded no time)' if untimed else '')
          + '; per run (training, '
          f'evaluation, compilation) median '
          f'{np.median(secs):.0f} s (min {min(secs):.0f}, max '
          f'{max(secs):.0f}); median training rate '
          f'{np.median(rates) if rates else float("nan"):.2f} steps/s.'
          ] + after_timing_lines(done)


def after_timing_lines(runs: Sequence[Dict[str, Any]]) -> List[str]:
  """The time of the phases after training (robustness sweep, noise
  probe, report), over the runs that recorded it."""
  timed = [r for r in runs if r.get('after_seconds') is not None]
  if not timed:
    return []
  secs = [r['after_seconds'] for r in timed]
  untimed = sum(1 for r in timed if r.get('after_untimed_invocations'))
  return ['', 'Phases after training (robustness sweep, noise probe, '
          f'report) recorded for {len(timed)} of the {len(runs)} runs: '
          f'{formatting.hms(sum(secs))} in all'
          + (f' (a lower bound: {untimed} of them were finished after a stop '
             'that recorded no time)' if untimed else '')
          + f'; per run median {np.median(secs):.0f} s (min '
          f'{min(secs):.0f}, max {max(secs):.0f}).']


def noise_probe_markdown(results: Dict[str, Any]) -> List[str]:
  probes = results['noise_probe']
  probed = [r for r in results['runs'] if r.get('noise_probe')]
  sigma = probed[0]['noise_probe']['sigma']
  lines = [
      '', 'Does a model read SPAD\'s noise as the structure? '
      '(`noise_probe.json`, the probed runs of seeds '
      f'{sorted({r["seed"] for r in probed})}): '
      f'the test images clean, with noise of std σ0 = {_number(sigma, 2)} '
      'inside the ScD ∪ BcD mask of their own label (every target; as the '
      'first epoch of training sees them), and with the same masks moved by '
      'half the image onto background. mDice pooled over the runs\' '
      'summed confusion counts; "read as foreground": the share of the '
      'moved masks\' pixels predicted as foreground, on the clean image and '
      'with the moved noise.', '',
      '| arm | runs | mDice clean | noise on targets | noise off targets | '
      'read as foreground: clean | with noise |',
      '|---|---:|---:|---:|---:|---:|---:|']
  for arm, p in probes.items():
    label = results['arms'][arm]['label'] if arm in results['arms'] else arm
    lines.append(
        f'| {label} | {p["runs"]} | {_number(p["clean"]["mDice"], 2, 100)} | '
        f'{_number(p["on_target"]["mDice"], 2, 100)} | '
        f'{_number(p["off_target"]["mDice"], 2, 100)} | '
        f'{_number(p["clean"]["off_foreground"], 2, 100)} % | '
        f'{_number(p["off_target"]["off_foreground"], 2, 100)} % |')
  return lines


def _ci(value, interval, scale=100):
  if value is None:
    return '—'
  if not interval or interval[0] is None:
    return _number(value, 2, scale)
  return (f'{value * scale:+.2f} [{interval[0] * scale:+.2f}, '
          f'{interval[1] * scale:+.2f}]')


def cv_markdown(results: Dict[str, Any]) -> List[str]:
  """The patient-level section of a cross-validated study."""
  cv, arms = results['cv'], results['arms']
  runs = [r for r in results['runs'] if r['group'] == 'arm']
  ref = cv['reference']
  lines = [
      '', f'## Patient-level cross-validation ({cv["folds"]} folds, '
      f'{len(cv["patients"])} patients)', '',
      'Every patient is tested once per seed, by the fold that did not '
      'train on it. Pooled mDice / mIoU: per seed, the foreground Dice '
      '(IoU) of the pixel counts summed over all tested patients, then the '
      'mean over the seeds that have tested every patient. Per case: mean '
      'over every test case of every fold and seed. Train plateau: runs '
      'whose train-split mDice (train.monitor_train_cases) gained at most '
      '1 point over the last 10 % of their steps; late gain: its mean gain '
      'over the last quarter (the cosine schedule flattens every curve at '
      'its end, so the late gain says how much was still being learned). '
      'Not learned: runs whose final train-split mDice is at most 0.05.',
      '',
      '| arm | runs | patients | pooled mIoU | pooled mDice | per-case Dice '
      '| HD95 | ASSD | train plateau | late gain | not learned | '
      'chain label |',
      '|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|']
  for arm, e in cv['arms'].items():
    mine = [r for r in runs if r['name'] == arm and r['done']]
    flat = [r for r in mine if (r.get('train_plateau') or {}).get(
        'on_plateau') is not None]
    on = sum(r['train_plateau']['on_plateau'] for r in flat)
    late = [r['train_plateau']['gain_quarter'] for r in flat
            if r['train_plateau']['gain_quarter'] is not None]
    idle = sum(not r['train_plateau']['learned'] for r in flat)
    labels = sorted({r['chain_label'] for r in mine if r.get('chain_label')})
    label_counts = ', '.join(
        f'{lab} ×{sum(r.get("chain_label") == lab for r in mine)}'
        for lab in labels) or '—'
    pc = e['per_case_mean']
    lines.append(
        f'| {arms[arm]["label"]} | {len(mine)} | {e["patients_done"]} | '
        f'{_number(e["mIoU"], 2, 100)} | {_number(e["mDice"], 2, 100)} | '
        f'{_number(pc["Dice"], 2, 100)} | {_number(pc["HD95"], 1)} | '
        f'{_number(pc["ASSD"], 1)} | {on}/{len(flat)} | '
        f'{_number(float(np.mean(late)) if late else None, 1, 100)} | '
        f'{idle} | {label_counts} |')
  lines += [
      '', f'Paired differences to {arms[ref]["label"] if ref in arms else ref}'
      ' (arm − reference, over the (seed, patient) pairs both have, a seed '
      'once both have it on every patient), in '
      'points, with 95 % intervals from '
      f'{cv["resamples"]} bootstrap resamples of patients (each with all '
      'its seeds); the "folds resampled" columns resample folds instead '
      '(each with its patients and seeds: the patients of a fold share its '
      'runs), a check on that independence, coarse with few folds; the t '
      'columns are the mean of the patients\' own mean differences with a '
      'Student-t interval over patients, a check on the percentile '
      'bootstrap, which is too narrow with few patients (`patients.png`: '
      'each patient\'s difference per seed):', '',
      '| arm | patients | Δ pooled mIoU | Δ pooled mDice | half-width '
      '(mDice) | Δ mDice, folds resampled | half-width | Δ patients\' '
      'mean mDice, t | half-width |',
      '|---|---:|---:|---:|---:|---:|---:|---:|---:|']
  for arm, e in cv['arms'].items():
    v = e.get('vs_reference')
    if not v:
      continue
    f = e.get('vs_reference_by_fold') or {}
    t = v.get('patient_t') or {}
    lines.append(
        f'| {arms[arm]["label"]} | {len(v["patients"])} | '
        f'{_ci(v["mIoU"], v["mIoU_ci95"])} | '
        f'{_ci(v["mDice"], v["mDice_ci95"])} | '
        f'{_number(v.get("mDice_half_width"), 2, 100)} | '
        f'{_ci(f.get("mDice"), f.get("mDice_ci95"))} | '
        f'{_number(f.get("mDice_half_width"), 2, 100)} | '
        f'{_ci(t.get("mean"), t.get("ci95"))} | '
        f'{_number(t.get("half_width"), 2, 100)} |')
  proj = {a: e['vs_reference']['projection'] for a, e in cv['arms'].items()
          if (e.get('vs_reference') or {}).get('projection', {}).get(
              'half_width')}
  if proj:
    target = next(iter(proj.values()))['target']
    lines += [
        '', 'What more seeds would buy (points; normal approximation from '
        'each patient\'s Dice difference per seed: between-patient and '
        'seed variance, half-width 1.96·√(between²/P + seed²/(P·S)) for S '
        'seeds per patient; the floor is the between-patient term, which '
        'only more patients lower; "now", the seeds each patient has and '
        'the half-width they give; the last columns, the seeds on these '
        'patients and the patients with 2 seeds each that the same '
        'components say would bring it to the target):', '',
        '| arm | P | between patients | seeds | S = 2 | 4 | 8 | 16 | now '
        f'| floor | seeds for ≤ {100 * target:g} '
        f'| patients for ≤ {100 * target:g} (S = 2) |',
        '|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|']
    for arm, v in proj.items():
      hw = v['half_width']
      need = v['seeds_for_target']
      lines.append(
          f'| {arms[arm]["label"]} | {v["patients"]} | '
          f'{_number(v["between_sd"], 2, 100)} | '
          f'{_number(v["within_sd"], 2, 100)} | ' + ' | '.join(
              _number(hw.get(str(k)), 2, 100) for k in (2, 4, 8, 16)) +
          f' | {_number(v["half_width_now"], 2, 100)} '
          f'(S = {v["seeds_now"]}) | {_number(v["floor"], 2, 100)} | '
          f'{"none" if need is None else need} | '
          f'{v["patients_for_target"]["2"]} |')
  folds = cv['folds']
  lines += ['', 'Pooled mDice (%) of each fold\'s test patients, mean over '
            'seeds:', '', '| arm | ' + ' | '.join(
                f'fold {f}' for f in range(folds)) + ' |',
            '|---|' + '---:|' * folds]
  for arm, e in cv['arms'].items():
    cells = []
    for row in e['per_fold']:
      vals = [v for v in row if v is not None]
      cells.append(_number(float(np.mean(vals)) if vals else None, 2, 100))
    lines.append(f'| {arms[arm]["label"]} | ' + ' | '.join(cells) + ' |')
  lines += [
      '', 'Where the variation lies (standard deviations in mDice points): '
      'between folds (of the true fold means) and between seeds within a '
      'fold, from the fold-level values; between patients and between seeds '
      'within a patient, from each patient\'s pooled Dice; and the same '
      'between folds / seeds for the paired difference to the reference.',
      '', '| arm | between folds | seeds within fold | between patients | '
      'seeds within patient | Δ: between folds | Δ: seeds within fold |',
      '|---|---:|---:|---:|---:|---:|---:|']
  for arm, e in cv['arms'].items():
    f, p = e['fold_components'], e['patient_components']
    d = (e.get('vs_reference') or {}).get('fold_components') or {}
    lines.append(
        f'| {arms[arm]["label"]} | {_number(f["between_sd"], 2, 100)} | '
        f'{_number(f["within_sd"], 2, 100)} | '
        f'{_number(p["between_sd"], 2, 100)} | '
        f'{_number(p["within_sd"], 2, 100)} | '
        f'{_number(d.get("between_sd"), 2, 100)} | '
        f'{_number(d.get("within_sd"), 2, 100)} |')
  swept = {a: e['robustness'] for a, e in cv['arms'].items()
           if e.get('robustness')}
  if swept:
    meta = results['meta']
    lines += [
        '', 'Under corruption (`--mode=robustness` on the runs of seeds '
        f'{meta.get("robustness_seeds")}: every corruption at severities '
        f'{meta.get("robustness_levels")}): pooled mDice over every '
        'corrupted test image, the same runs\' clean pooled mDice, the '
        'share of it kept, and the paired difference under corruption to '
        'the reference over patients:', '',
        '| arm | patient-runs | clean | corrupted | kept | Δ corrupted |',
        '|---|---:|---:|---:|---:|---:|']
    for arm, e in swept.items():
      clean, bad = e['clean']['mDice'], e['corrupted']['mDice']
      kept = bad / clean if clean and bad is not None else None
      v = e.get('vs_reference') or {}
      lines.append(
          f'| {arms[arm]["label"]} | {e["corrupted"]["runs_patients"]} | '
          f'{_number(clean, 2, 100)} | {_number(bad, 2, 100)} | '
          f'{_number(kept, 1, 100)} % | '
          f'{_ci(v.get("mDice"), v.get("mDice_ci95"))} |')
    names = list(next(iter(swept.values())).get('per_corruption') or {})
    if names:
      lines += [
          '', 'Each corruption on its own (its severities pooled): pooled '
          'mDice, and below it the paired difference to the reference over '
          'patients:', '',
          '| arm | clean | ' + ' | '.join(names) + ' |',
          '|---|' + '---:|' * (len(names) + 1)]
      for arm, e in swept.items():
        lines.append(
            f'| {arms[arm]["label"]} | {_number(e["clean"]["mDice"], 2, 100)}'
            ' | ' + ' | '.join(_number(e['per_corruption'][n]['mDice'], 2, 100)
                              for n in names) + ' |')
      lines += ['', '| Δ to the reference | ' + ' | '.join(names) + ' |',
                '|---|' + '---:|' * len(names)]
      for arm, e in swept.items():
        diffs = [e['per_corruption'][n].get('vs_reference') for n in names]
        if any(diffs):
          lines.append(f'| {arms[arm]["label"]} | ' + ' | '.join(
              _ci(d.get('mDice'), d.get('mDice_ci95')) if d else '—'
              for d in diffs) + ' |')
  return lines + calibration_markdown(results)


def calibration_markdown(results: Dict[str, Any]) -> List[str]:
  """Calibration and uncertainty of each arm's soft map, clean and under
  corruption."""
  arms = results['arms']
  lines = [
      '', 'Calibration and uncertainty of the soft map, mean over runs: ECE '
      '(15 equal-mass bins), NLL and Brier per pixel; error AUROC / AUPRC: '
      'how well the soft map\'s normalized entropy ranks the wrong pixels '
      'above the right ones (AUPRC against the error rate by chance); case '
      'Spearman: rank correlation of a case\'s mean entropy with its Dice '
      '(negative when the uncertain cases are the bad ones); the last two '
      'under corruption, each swept run\'s mean over its corruptions and '
      'severities:', '',
      '| arm | runs | ECE | NLL | Brier | error AUROC | error AUPRC | case '
      'Spearman | swept runs | ECE corrupted | error AUROC corrupted |',
      '|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|']
  for arm, e in results['cv']['arms'].items():
    c = e['calibration']
    lines.append(
        f'| {arms[arm]["label"]} | {c["ECE"]["runs"]} | ' + ' | '.join(
            _number(c[k]['mean'], 4) for k in ('ECE', 'NLL', 'Brier')) +
        ' | ' + ' | '.join(_number(c[k]['mean'], 3) for k in (
            'error_AUROC', 'error_AUPRC', 'case_Spearman')) +
        f' | {c["corrupted_ECE"]["runs"]} | '
        f'{_number(c["corrupted_ECE"]["mean"], 4)} | '
        f'{_number(c["corrupted_error_AUROC"]["mean"], 3)} |')
  return lines


def _mean_curve(logs: Sequence[Dict[str, List]], key: str):
  """Mean over runs at the steps all of them logged."""
  curves = [dict(log[key]) for log in logs if log.get(key)]
  if not curves:
    return None, None
  steps = sorted(set.intersection(*(set(c) for c in curves)))
  return (np.asarray(steps),
          np.asarray([np.mean([c[s] for c in curves]) for s in steps]))


def plot_curves(path: str, runs: Sequence[plan.Run], arms: Sequence[str],
                title: str) -> None:
  from spad_jax import visualize  # pylint: disable=g-import-not-at-top
  plt = visualize.pyplot()
  fig, axes = plt.subplots(1, 3, figsize=(15, 3.8))
  any_val = False
  for arm in arms:
    logs = [plan.read_log(r.workdir) for r in runs
            if r.group == 'arm' and r.name == arm and plan.is_done(r)]
    n = len(logs)
    steps, loss = _mean_curve(logs, 'loss')
    if steps is not None:
      axes[0].plot(steps, loss, label=f'{plan.ARMS[arm][0]} (n={n})')
    steps, val = _mean_curve(logs, 'val_mDice')
    if steps is not None:
      any_val = True
      axes[1].plot(steps, val, 'o-', ms=3,
                   label=f'{plan.ARMS[arm][0]} (n={n})')
    # Each run thin, the mean thick: the plateau is a property of each run.
    color = None
    for log in logs:
      if log.get('train_mDice'):
        st, v = zip(*log['train_mDice'])
        line, = axes[2].plot(st, v, '-', lw=0.6, alpha=0.35, color=color)
        color = line.get_color()
    steps, train = _mean_curve(logs, 'train_mDice')
    if steps is not None:
      axes[2].plot(steps, train, 'o-', ms=3, lw=2, color=color,
                   label=f'{plan.ARMS[arm][0]} (n={n})')
  # The UNet's loss (CE + soft Dice term) can be negative: log scale only
  # where every plotted value is positive.
  positive = all(np.all(np.asarray(line.get_ydata()) > 0)
                 for line in axes[0].lines)
  if positive:
    axes[0].set_yscale('log')
  axes[0].set_xlabel('step')
  # The diffusion arms' KL is per image, the UNet's CE + Dice per pixel.
  axes[0].set_ylabel('training loss (each arm\'s objective' +
                     ('; log scale)' if positive else ')'))
  if axes[0].lines:
    axes[0].legend(fontsize=7)
  axes[1].set_xlabel('step')
  axes[1].set_ylabel('val mDice (foreground)')
  if not any_val:
    axes[1].text(0.5, 0.5, 'no validation\n(train.eval_every_epochs = 0)',
                 ha='center', va='center', transform=axes[1].transAxes)
  else:
    axes[1].legend(fontsize=7)
  axes[2].set_xlabel('step')
  axes[2].set_ylabel('train-split mDice (train.monitor_train_cases)')
  if axes[2].lines:
    axes[2].legend(fontsize=7)
  else:
    axes[2].text(0.5, 0.5, 'no train-split monitor\n'
                 '(train.monitor_train_cases = 0)', ha='center',
                 va='center', transform=axes[2].transAxes)
  for ax in axes:
    ax.grid(alpha=0.3)
  fig.suptitle(title + ' — mean over runs (right: thin lines are runs)',
               fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def plot_patients(path: str, results: Dict[str, Any], title: str) -> None:
  """Per arm, each test patient's Dice difference to the reference, one
  marker per seed, with the pooled difference and its interval over
  patients: how much of the spread is patients and how much is seeds.
  Writes nothing when no arm has a paired value."""
  from spad_jax import visualize  # pylint: disable=g-import-not-at-top
  cv, labels = results['cv'], results['arms']
  shown = [a for a, e in cv['arms'].items() if e.get('vs_reference')]
  if not shown:  # A paired value implies the reference's entry.
    return
  ref = cv['arms'][cv['reference']]
  plt = visualize.pyplot()
  cols = min(3, len(shown))
  rows = -(-len(shown) // cols)
  fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols, 3.2 * rows),
                           squeeze=False)
  patients_ = cv['patients']
  x = np.arange(len(patients_))
  seeds = results['meta']['seeds']
  # Seeds share a fixed width per patient so many seeds stay apart from
  # the next patient's.
  offsets = np.linspace(-0.35, 0.35, len(seeds)) if len(seeds) > 1 else [0.0]
  for ax, arm in zip(axes.flat, shown):
    e = cv['arms'][arm]
    for s, seed in enumerate(seeds):
      diff = [np.nan if e['per_patient'][p][s] is None or
              ref['per_patient'][p][s] is None else
              100 * (e['per_patient'][p][s] - ref['per_patient'][p][s])
              for p in patients_]
      # Ten colours repeat: every further ten seeds take another marker.
      ax.plot(x + offsets[s], diff, 'osD^v'[s // 10 % 5], ms=4,
              color=f'C{s % 10}', label=f'seed {seed}')
    v = e['vs_reference']
    if v.get('mDice') is not None:
      ax.axhline(100 * v['mDice'], color='k', lw=1,
                 label='pooled Δ, 95 % interval over patients')
      lo, hi = v['mDice_ci95']
      ax.axhspan(100 * lo, 100 * hi, color='k', alpha=0.1)
    ax.axhline(0, color='gray', lw=0.8, ls=':')
    ax.set_xticks(x)
    ax.set_xticklabels(patients_, fontsize=7, rotation=90)
    ax.set_title(f'{labels[arm]["label"]} − {labels[cv["reference"]]["label"]}',
                 fontsize=9)
    ax.set_ylabel('Δ Dice (points)')
    ax.grid(alpha=0.3)
  for ax in list(axes.flat)[len(shown):]:
    ax.axis('off')
  # One panel is too narrow for the title on one line.
  fig.suptitle(title + ('\n' if cols == 1 else ' — ') +
               'each test patient\'s Dice difference per seed', fontsize=9)
  fig.tight_layout()
  # Below the panels: inside one, the legend hid the patients' points.
  handles, names = axes.flat[0].get_legend_handles_labels()
  fig.legend(handles, names, loc='upper center', bbox_to_anchor=(0.5, 0),
             ncol=min(len(names), 5), fontsize=7)
  fig.savefig(path, dpi=100, bbox_inches='tight')
  plt.close(fig)


def plot_schedule(path: str, config, runs: Sequence[plan.Run],
                  title: str) -> None:
  """σ(e) with and without PaS and k(e), from ``perturb``'s functions with
  the config's values; the values the full arm's first run logged on top."""
  from spad_jax import perturb  # pylint: disable=g-import-not-at-top
  from spad_jax import visualize  # pylint: disable=g-import-not-at-top
  plt = visualize.pyplot()
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
          plan.is_done(r)]
  if full:
    log = plan.read_log(full[0].workdir)
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
  from spad_jax import visualize  # pylint: disable=g-import-not-at-top
  plt = visualize.pyplot()
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


def qualitative(path: str, runs: Sequence[plan.Run], num_cases: int,
                title: str) -> Optional[List[str]]:
  """Rows image / ground truth / full / w/o ScD / w/o BcD / baseline (the
  arms run), columns the test cases with most foreground; predictions of
  each arm's first seed (first fold), EMA parameters, same sampling keys.
  Returns the case ids shown (None when no arm is done)."""
  from spad_jax import evaluate  # pylint: disable=g-import-not-at-top
  from spad_jax import predictors  # pylint: disable=g-import-not-at-top
  from spad_jax import metrics  # pylint: disable=g-import-not-at-top
  from spad_jax import visualize  # pylint: disable=g-import-not-at-top
  from spad_jax import train_state  # pylint: disable=g-import-not-at-top
  from spad_jax.data import sources  # pylint: disable=g-import-not-at-top
  import cv2  # pylint: disable=g-import-not-at-top
  chosen = []
  for arm, label in QUALITATIVE_ROWS:
    done = [r for r in runs if r.group == 'arm' and r.name == arm and
            plan.is_done(r)]
    if done:
      first = min(done, key=lambda r: (r.seed, r.fold or 0))
      chosen.append((arm, label, first))
  if not chosen or num_cases <= 0:
    return None
  ref = chosen[0][2]
  seed, fold = ref.seed, ref.fold
  chosen = [(a, l, r) for a, l, r in chosen if r.seed == seed and
            r.fold == fold]
  # The figure of the same finished runs is the same figure (training and
  # sampling are deterministic): keep it, so the report needs no
  # checkpoint once it exists (a study folder that keeps only small files).
  sidecar = os.path.splitext(path)[0] + '.json'
  made_from = {'runs': [os.path.relpath(r.workdir, os.path.dirname(path))
                        for _, _, r in chosen], 'num_cases': num_cases}
  found = None
  if os.path.exists(sidecar):
    with open(sidecar) as f:
      found = json.load(f)
  if (found and os.path.exists(path) and
      {k: found.get(k) for k in made_from} == made_from):
    logging.info('%s: kept (made from the same runs).', path)
    return found['cases']
  config = ref.config
  source = sources.load_split(config, config.eval.split)
  idx = pick_cases(source, num_cases)
  sub = dataclasses.replace(
      source, images=source.images[idx], labels=source.labels[idx],
      ids=[source.ids[i] for i in idx],
      original_sizes=source.original_sizes[idx])
  k = config.data.num_classes
  # Same model and keys for all arms.
  setup = train_state.Setup.from_config(config)
  predict = (None if predictors.picks_chain_label(config) else
             predictors.make_predict_fn(config, setup.model, setup.schedule))
  preds = {}
  for arm, _, run in chosen:
    state = train_state.load_eval_state(run.config, run.workdir, setup)
    # With eval.chain_label='auto', each run's label as its evaluation
    # picked it (on its validation split).
    cfg, _ = evaluate.resolve_chain_label(run.config, state.ema_params, setup)
    out = evaluate.sample_split(cfg, state.ema_params, setup, sub,
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

  plt = visualize.pyplot()
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
  files.write_json(sidecar, dict(made_from, cases=list(sub.ids)))
  return list(sub.ids)


def report(out: str, runs: Sequence[plan.Run], arms: Sequence[str],
           seeds: Sequence[int], sweeps: Sequence[str],
           sweep_values: Dict[str, Sequence[float]], meta_extra: Dict,
           qualitative_cases: int = 4) -> Dict[str, Any]:
  """Writes results.json, results.md and the plots; returns the results."""
  records = [plan.collect_run(r) for r in runs]
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
      'arms': stats.summarize(records, arms),
      'sweeps': stats.summarize_sweeps(records, sweeps, sweep_values),
      'runs': records,
  }
  probed = {arm: [r['noise_probe'] for r in records if r['group'] == 'arm'
                  and r['name'] == arm and r.get('noise_probe')]
            for arm in arms}
  results['noise_probe'] = {arm: noise_probe.pooled(p)
                            for arm, p in probed.items() if p}
  if meta_extra.get('folds'):
    results['cv'] = patients.analyse(records, first.config, arms, seeds,
                                     meta_extra['folds'])
  title = (f'{budget["data"]} {budget["image_size"]}², '
           f'{budget["num_epochs"]} epochs, {budget["model_params"] / 1e6:.2f}'
           f' M params')
  plot_curves(os.path.join(out, 'curves.png'), runs, arms, title)
  if 'cv' in results:
    plot_patients(os.path.join(out, 'patients.png'), results, title)
  plot_schedule(os.path.join(out, 'schedule.png'), first.config, runs,
                f'SPAD schedules over {first.config.train.num_epochs} epochs')
  sweep_seeds = meta_extra.get('sweep_seeds', [])
  base_runs = [r for r in records if r['group'] == 'arm' and
               r['name'] == 'baseline' and r['seed'] in sweep_seeds]
  base_values = list(stats.seed_values(base_runs, 'mDice').values())
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
  files.write_json(os.path.join(out, 'results.json'), results)
  files.write_atomic(os.path.join(out, 'results.md'), markdown(results))
  return results
