"""The benches run end to end at tiny sizes on CPU, so they never rot."""

import json
import os
import subprocess
import sys

from conftest import ROOT
from conftest import trained_tiny_copy
import numpy as np
import pytest


POOLED = 'x0_resample τ=0.5 mode×1 mean p̂:chain_mean label:soft_map of:last'


@pytest.mark.long
def test_sampling_curve_bench(tmp_path):
  workdir = trained_tiny_copy(str(tmp_path / 'tiny'))
  out = str(tmp_path / 'bench')
  env = dict(os.environ, JAX_PLATFORMS='cpu', TF_CPP_MIN_LOG_LEVEL='2')
  result = subprocess.run(
      [sys.executable, 'bench/sampling_curve.py',
       '--config=tests/tiny_config.py', f'--workdir={workdir}',
       '--steps=1,4,50', '--samples=1,2', '--max_cases=4', f'--out={out}',
       '--samplers=ancestral,x0_resample:0.5:1:mean:chain_mean:soft_map:last',
       '--diagnose_steps=4', '--diagnose_chains=2'],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  data = json.load(open(os.path.join(out, 'sampling_curve.json')))
  rows = data['rows']
  settings = [(1, 1), (1, 2), (4, 1), (4, 2), (50, 1), (50, 2)]
  assert [(r['name'], r['num_steps'], r['num_samples']) for r in rows] == (
      [('ancestral',) + s for s in settings] +
      [(POOLED,) + s for s in settings])
  assert tuple(rows[6][k] for k in ('sampler', 'temperature', 'mode_last',
                                    'ensemble', 'soft_map',
                                    'chain_label', 'ensemble_of')) == (
                                        'x0_resample', 0.5, 1, 'mean',
                                        'chain_mean', 'soft_map', 'last')
  done = [r for r in rows if 'skipped' not in r]
  assert len(done) == 8  # T = 20 in the tiny config: 50 steps skipped.
  for r in done:
    assert r['ms_per_image'] > 0 and 0 <= r['mDice'] <= 1
    assert 0 <= r['ece'] <= 1 and r['nll'] > 0
    assert (r['GED'] is None) == (r['num_samples'] == 1)
    assert 0 <= r['mDice_mean_prob'] <= 1
    if r['ensemble'] == 'mean':  # Its prediction is the mean p̂'s argmax.
      assert r['mDice'] == r['mDice_mean_prob']
    assert 0 <= r['mDice_medoid'] <= 1
    if r['num_samples'] > 1:
      assert r['chain_mDice_sd'] >= 0
    else:  # One chain: every rule is that chain (its label its soft map's
      # argmax, or its last p̂'s with that as its soft map).
      assert (r['chain_mDice'] == r['mDice'] == r['mDice_mean_prob'] ==
              r['mDice_medoid'])
  assert data['meta']['num_cases'] == 4
  # Paired against one step: the full-sample differences are those of the
  # rows' own dataset-level figures (the per-case sums add up).
  for r in done:
    if r['num_steps'] == 1:
      assert 'vs_one_step' not in r
      continue
    ref = next(o for o in done if (o['name'], o['num_samples'], o['num_steps'])
               == (r['name'], r['num_samples'], 1))
    v = r['vs_one_step']
    assert v['chain_mDice'] == pytest.approx(
        r['chain_mDice'] - ref['chain_mDice'], abs=1e-9)
    assert v['ece'] == pytest.approx(r['ece'] - ref['ece'], abs=1e-9)
    assert v['ensemble_mDice'] == pytest.approx(
        r['mDice'] - ref['chain_mDice'], abs=1e-9)
    for key in ('chain_mDice_ci95', 'ensemble_mDice_ci95', 'ece_ci95'):
      assert v[key][0] <= v[key][1]
  # Ensembles against their own chains: the full-sample differences are the
  # rows' own figures; single-chain rows have none.
  for r in done:
    if r['num_samples'] == 1:
      assert 'vs_single' not in r
      continue
    v = r['vs_single']
    assert v['ensemble'] == pytest.approx(r['mDice'] - r['chain_mDice'],
                                          abs=1e-9)
    assert v['mean_prob'] == pytest.approx(
        r['mDice_mean_prob'] - r['chain_mDice'], abs=1e-9)
    assert v['medoid'] == pytest.approx(
        r['mDice_medoid'] - r['chain_mDice'], abs=1e-9)
    for key in ('ensemble_ci95', 'mean_prob_ci95', 'medoid_ci95'):
      assert v[key][0] <= v[key][1]
  # Diagnosis: one 4-step chain per sampler, every step reported.
  diagnoses = data['diagnoses']
  assert [(d['name'], len(d['steps'])) for d in diagnoses] == [
      ('ancestral', 4), (POOLED, 4)]
  for d in diagnoses:
    first = d['steps'][0]
    assert first['t'] == 20 and first['changed'] == 0  # Nothing before it.
    # x_T is uniform noise for the chain and under q alike (ᾱ_T ≈ 0).
    assert abs(first['own_input_error'] - first['q_input_error']) < 0.1
    last = d['steps'][-1]
    assert last['s'] == 0 and last['q_input_error'] < 0.2
    for r in d['steps']:
      assert r['fixed'] + r['created'] <= r['changed'] + 1e-12
    # The first and last steps' labels pooled over both chains are the
    # step table's own predictions at those steps (same summed counts).
    assert d['num_chains'] == 2
    pooled = d['pooled_mDice']
    assert pooled['first'] == first['own_mDice']
    assert pooled['last'] == last['own_mDice']
    for name in ('mean', 'first_half', 'last_half', 'alpha_bar'):
      assert 0 <= pooled[name] <= 1
    # The ensemble soft maps' calibration, one figure per pooling.
    assert set(d['pooled_ece']) == set(d['pooled_nll']) == set(pooled)
    for name in pooled:
      assert 0 <= d['pooled_ece'][name] <= 1 and d['pooled_nll'][name] > 0
  for name in ('sampling_curve.png', 'sampling_diagnosis.png'):
    assert os.path.getsize(os.path.join(out, name)) > 1000
  text = open(os.path.join(out, 'sampling_curve.md')).read()
  assert '| sampler | steps | samples |' in text and 'mDice own' in text
  assert 'ECE − 1 step' in text and 'mean p̂ − single' in text
  assert '| draw from p̂ |' in text
  for r in data['rows']:
    assert 'skipped' in r or 0 <= r['mDice_soft_draw'] <= 1
  assert ('| | first | last | mean | first_half | last_half | alpha_bar |'
          in text and '| ECE |' in text)
  assert data['meta']['case_ids'] == data['meta']['case_groups'] == [
      f'synthetic_test_{i:05d}' for i in range(4)]
  # One "fold" pooled alone: the per-case arrays it saved give back the
  # bench's own intervals (same resamples and seed).
  pooled = subprocess.run(
      [sys.executable, 'bench/pool_folds.py', f'--runs={out}',
       f'--out={tmp_path}/pooled'],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert pooled.returncode == 0, pooled.stderr[-3000:]
  again = json.load(open(tmp_path / 'pooled' / 'pooled.json'))['rows']
  assert len(again) == len(done)
  for r, p in zip(done, again):
    assert (p['name'], p['num_steps'], p['num_samples'], p['chain_mDice'],
            p['ece']) == (r['name'], r['num_steps'], r['num_samples'],
                          r['chain_mDice'], r['ece'])
    for key in ('vs_one_step', 'vs_single'):
      assert p.get(f'{key}_case') == r.get(key)
  twice = subprocess.run(
      [sys.executable, 'bench/pool_folds.py', f'--runs={out},{out}',
       f'--out={tmp_path}/twice'],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert twice.returncode != 0 and 'is in both' in twice.stderr
  bad = subprocess.run(
      [sys.executable, 'bench/sampling_curve.py',
       '--config=tests/tiny_config.py', f'--workdir={workdir}',
       '--samplers=ddim', f'--out={out}_bad'],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert bad.returncode != 0 and 'config.eval.sampler' in bad.stderr
  assert not os.path.exists(f'{out}_bad')


def test_pipeline_throughput_bench(tmp_path):
  env = dict(os.environ, JAX_PLATFORMS='cpu', TF_CPP_MIN_LOG_LEVEL='2')
  result = subprocess.run(
      [sys.executable, 'bench/pipeline_throughput.py',
       '--config=tests/tiny_config.py', '--steps=3', '--rounds=1',
       '--loaders=tf,numpy',
       f'--out={tmp_path}'], cwd=ROOT, env=env, capture_output=True,
      text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  rows = json.load(open(tmp_path / 'pipeline_throughput.json'))['rows']
  assert [(r['loader'], r['masks']) for r in rows] == [
      ('tf', False), ('tf', True), ('numpy', False), ('numpy', True)]
  assert all(r['images_per_sec'] > 0 for r in rows)


@pytest.mark.long
def test_step_ab_bench_tiny(tmp_path):
  """bench/step_ab.py's alternated step timings run at toy size (the plain
  variants build the UNet with flax's GroupNorm)."""
  env = dict(os.environ, JAX_PLATFORMS='cpu', TF_CPP_MIN_LOG_LEVEL='2')
  result = subprocess.run(
      [sys.executable, 'bench/step_ab.py', '--preset=tiny', '--rounds=2',
       '--steps=1', '--nolayers', '--noops', f'--out={tmp_path}'],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
  assert result.returncode == 0, result.stderr[-3000:]
  step = json.load(open(tmp_path / 'step_ab_tiny.json'))['step']
  assert sorted(step['ms_per_step']) == sorted(
      ['plain', '+cond', 'package', 'spad_off'])
  assert all(v > 0 for v in step['ms_per_step'].values())
  for med, lo, hi in [*step['speedup'].values(), step['spad_cost'],
                      step['aa_control']]:
    assert 0 < lo <= med <= hi


def test_perf_bench_tiny(tmp_path):
  """bench/perf.py end to end at toy sizes (the GPU grid is --preset=gpu)."""
  env = dict(os.environ, JAX_PLATFORMS='cpu', TF_CPP_MIN_LOG_LEVEL='2')
  result = subprocess.run(
      [sys.executable, 'bench/perf.py', '--preset=tiny', '--repeats=1',
       '--sections=train,sampling,pipeline,profile',
       '--data_config=tests/tiny_config.py', f'--out={tmp_path}'],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
  assert result.returncode == 0, result.stderr[-3000:]
  data = json.load(open(tmp_path / 'perf.json'))
  train = data['train']
  assert [(r['framework'], r['spad']) for r in train] == [
      ('jax', False), ('jax', True)]
  for r in train:
    assert r['images_per_s'] > 0 and r['gflops_per_step_per_device'] > 0
    assert 'mfu' not in r  # No bf16 peak is known for a CPU.
  assert len(data['spad_overhead']) == 1
  ours = [r for r in data['sampling'] if r['framework'] == 'jax']
  assert [(r['steps'], r['batch'], r['ensemble']) for r in ours] == [
      (2, 2, 2)]
  assert all(r['ms_per_image'] > 0 for r in data['sampling'])
  assert [r['masks'] for r in data['pipeline']] == [False, True]
  assert data['pipeline_headroom'] > 0
  profile = data['profile']
  assert 0 < profile['forward_ms'] < profile['forward_backward_ms']
  assert data['meta']['jax_backend'] == 'cpu'
  assert '## Train step' in open(tmp_path / 'perf.md').read()


def test_torch_reference_matches_the_unet():
  """The PyTorch reference has the UNet's exact parameter count, and its
  loss/sampler run (skipped where PyTorch is not installed, as in CI)."""
  torch = pytest.importorskip('torch')
  import jax
  import jax.numpy as jnp
  sys.path.insert(0, os.path.join(ROOT, 'bench'))
  import torch_unet
  from spad_jax.models import unet
  for kw in (dict(), dict(base_channels=8, channel_mult=(1, 2),
                          num_res_blocks=1, attention_resolutions=(16,),
                          norm_groups=8)):
    ref = torch_unet.UNet(4, 1, image_size=32, **kw)
    ours = unet.UNet(num_classes=4, **kw)
    shapes = jax.eval_shape(lambda: ours.init(
        jax.random.key(0), jnp.zeros((1, 32, 32, 4)),
        jnp.zeros((1, 32, 32, 1)), jnp.zeros((1,), jnp.int32)))['params']
    assert sum(p.numel() for p in ref.parameters()) == sum(
        x.size for x in jax.tree.leaves(shapes))
  abar = torch_unet.cosine_alphas_cumprod(20)
  from spad_jax import diffusion
  np.testing.assert_allclose(
      abar.numpy(), np.asarray(diffusion.make_schedule(20).alphas_cumprod),
      rtol=1e-5)
  loss = torch_unet.kl_loss(ref, torch.randint(0, 4, (2, 32, 32)),
                            torch.randn(2, 1, 32, 32), abar, 4)
  assert torch.isfinite(loss) and loss > 0
  labels = torch_unet.sample(ref, torch.randn(2, 1, 32, 32), abar, 4,
                             diffusion.time_sequence(20, 3))
  assert labels.shape == (2, 32, 32)


# Each bench defines its flags at import: one process per bench.
_SPEEDUPS = r'''
import sys
sys.path.insert(0, 'bench')
import numpy as np
import xla_flags
# Speed-ups: the other setting takes exactly half the time in every round.
rng = np.random.default_rng(0)
rows = []
for rnd in range(3):
  base = rng.uniform(0.9, 1.1, 8)
  rows.append({'setting': 'xla_defaults', 'round': rnd, 'step_s': list(base)})
  rows.append({'setting': 'fast', 'round': rnd, 'step_s': list(base / 2)})
point, lo, hi = xla_flags.speedups(rows, 'step_s')['fast']
assert abs(point - 2.0) < 1e-9 and lo <= 2.0 <= hi, (point, lo, hi)
assert xla_flags.speedups(rows, 'step_s')['xla_defaults'][0] == 1.0
print('OK')
'''
_CENSUS = r'''
import sys
sys.path.insert(0, 'bench')
import conv_layers
# The HLO census: kinds from the window, library from the calling fusion.
hlo = """HloModule m

%fused_computation (param_0: f32[8,8,8,4], param_1: f32[3,3,4,4]) -> f32[8,8,8,4] {
  ROOT %c = f32[8,8,8,4]{3,2,1,0} convolution(%param_0, %param_1), window={size=3x3 pad=1_1x1_1}, dim_labels=b01f_01io->b01f
}

ENTRY %main (x: f32[8,8,8,4], w: f32[3,3,4,4]) -> f32[4,3,3,4] {
  %ynn_fusion = f32[8,8,8,4]{3,2,1,0} fusion(%x, %w), kind=kCustom, calls=%fused_computation
  %transpose_copy_fusion.1 = f32[4,8,8,8]{3,2,1,0} fusion(%x), kind=kLoop, calls=%other
  %conv.2 = f32[8,8,8,4]{3,2,1,0} convolution(%x, %w), window={size=3x3 pad=2_1x2_1 lhs_dilate=2x2}, dim_labels=b01f_01io->b01f
  ROOT %conv.3 = f32[4,3,3,4]{3,2,1,0} convolution(%transpose_copy_fusion.1, %x), window={size=8x8 pad=1_1x1_1}, dim_labels=b01f_01io->b01f
}
"""
census = conv_layers.summarize_hlo(hlo)
got = {(c['kind'], c['library']): c['count'] for c in census['convolutions']}
assert got == {('forward or input gradient', 'ynn'): 1,
               ('input gradient of a strided conv (lhs_dilate)', 'xla'): 1,
               ('kernel gradient', 'xla'): 1}, got
assert census['layout_ops'] == {'transpose_copy_fusion': 1}, census
print('OK')
'''


def test_flag_and_census_helpers():
  """bench/xla_flags.py's speed-ups and bench/conv_layers.py's HLO census
  on inputs with known answers (a subprocess: the benches define flags)."""
  env = dict(os.environ, JAX_PLATFORMS='cpu', TF_CPP_MIN_LOG_LEVEL='2')
  for script in (_SPEEDUPS, _CENSUS):
    result = subprocess.run([sys.executable, '-c', script], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().endswith('OK')


def test_chain_poolings_against_reference():
  """The diagnosis's pooled chain labels: each pixel's class maximises the
  weighted sum of the steps' p̂ (a loop over pixels); the weights select
  the first or last step, the last half, or follow ᾱ_t, so a step whose
  input was pure noise (ᾱ_T ≈ 0) cannot outvote the others."""
  sys.path.insert(0, os.path.join(ROOT, 'bench'))
  import sampling_stats as st
  from spad_jax import diffusion
  schedule = diffusion.make_schedule(20)
  abar = np.asarray(schedule.alphas_cumprod, np.float64)
  times = diffusion.time_sequence(20, 5)[:-1]  # The 5 steps' input times.
  weights = st.pooling_weights(times, abar)
  assert set(weights) == set(st.POOLINGS)
  # A chain's pooled label, as the diagnosis takes it from the soft map.
  pooled_label = lambda probs, w: st.pooled_soft_map(probs, w).argmax(-1)
  rng = np.random.default_rng(0)
  probs = rng.dirichlet(np.ones(3), size=(5, 2, 4, 6))  # [S, B, H, W, K]
  for name, w in weights.items():
    got = pooled_label(probs, w)
    assert got.shape == (2, 4, 6)
    for idx in np.ndindex(2, 4, 6):
      totals = [sum(w[i] * probs[(i,) + idx + (c,)] for i in range(5))
                for c in range(3)]
      assert got[idx] == int(np.argmax(totals))
  np.testing.assert_array_equal(pooled_label(probs, weights['first']),
                                probs[0].argmax(-1))
  np.testing.assert_array_equal(pooled_label(probs, weights['last']),
                                probs[-1].argmax(-1))
  np.testing.assert_array_equal(pooled_label(probs, weights['mean']),
                                probs.mean(0).argmax(-1))
  np.testing.assert_array_equal(pooled_label(probs, weights['last_half']),
                                probs[2:].mean(0).argmax(-1))
  np.testing.assert_array_equal(pooled_label(probs, weights['first_half']),
                                probs[:2].mean(0).argmax(-1))
  # The pooled soft map is the normalised weighted mean: a distribution.
  for name, w in weights.items():
    soft = st.pooled_soft_map(probs, w)
    ref = sum(w[i] * probs[i] for i in range(5)) / sum(w)
    np.testing.assert_allclose(soft, ref, rtol=1e-12)
    np.testing.assert_allclose(soft.sum(-1), 1.0, rtol=1e-12)
  # One step: every pooling is that step.
  one = st.pooling_weights(diffusion.time_sequence(20, 1)[:-1], abar)
  for name, w in one.items():
    np.testing.assert_array_equal(st.pooled_soft_map(probs[:1], w), probs[0])
  # The first step saw x_T: its certain, wrong p̂ sways the plain mean but
  # not the ᾱ-weighted one.
  agree = np.zeros((5, 1, 1, 1, 3))
  agree[1:, ..., 1] = 0.4
  agree[1:, ..., 0] = agree[1:, ..., 2] = 0.3
  agree[0, ..., 2] = 1.0
  assert pooled_label(agree, weights['mean']).item() == 2
  assert pooled_label(agree, weights['alpha_bar']).item() == 1
  with pytest.raises(ValueError, match='positive weight'):
    pooled_label(probs, np.zeros(5))


def test_soft_confusion_is_the_expected_draw():
  """The bench's 'draw from p̂' counts: the mean confusion of many label
  maps drawn pixel by pixel from the soft map (Monte Carlo), and for a
  one-hot soft map the argmax's counts exactly."""
  sys.path.insert(0, os.path.join(ROOT, 'bench'))
  import sampling_stats as st
  from spad_jax import metrics
  rng = np.random.default_rng(1)
  prob = rng.dirichlet(np.ones(3) * 0.7, size=(5, 7))
  label = rng.integers(0, 3, (5, 7))
  draws = 20000
  cum = prob.cumsum(-1)
  total = np.zeros((3, 3))
  for _ in range(draws):
    drawn = (rng.random((5, 7, 1)) > cum).sum(-1)
    total += metrics.confusion_counts(drawn, label, 3)
  got = st.soft_confusion(prob, label)
  np.testing.assert_allclose(got, total / draws, atol=0.05)
  assert got.sum() == pytest.approx(35.0)
  onehot = np.eye(3)[prob.argmax(-1)]
  np.testing.assert_array_equal(st.soft_confusion(onehot, label),
                                metrics.confusion_counts(prob.argmax(-1),
                                                         label, 3))


def _dice_reference(conf):
  """Foreground mDice of a [K, K] (label, prediction) count matrix by the
  formula 2·TP / (|label| + |prediction|)."""
  return np.mean([2 * conf[c, c] / (conf[c, :].sum() + conf[:, c].sum())
                  for c in range(1, len(conf))])


def _fake_fold(folder, rng, case_ids, groups, settings):
  """A bench output folder (the files bench/sampling_curve.py writes) with
  random per-case counts for each (steps, samples) setting."""
  os.makedirs(folder)
  rows, arrays = [], {}
  for i, (steps, samples) in enumerate(settings):
    n = len(case_ids)
    arrays.update({
        f'row{i}_chain_conf': rng.integers(1, 50, (n, samples, 3, 3)),
        **{f'row{i}_{a}': rng.integers(1, 50, (n, 3, 3))
           for a in ('pred_conf', 'mean_conf', 'medoid_conf')},
        f'row{i}_top': rng.integers(0, 20, (n, 3, 64)).astype(float)})
    rows.append({'name': 'x0_resample', 'num_steps': steps,
                 'num_samples': samples, 'mDice': 0.5, 'mDice_medoid': 0.5,
                 'chain_mDice': 0.5, 'ece': 0.1})
  np.savez(os.path.join(folder, 'sampling_cases.npz'), **arrays)
  meta = {'checkpoint_step': 1, 'case_ids': case_ids, 'case_groups': groups,
          'class_names': ['bg', 'a', 'b'], 'ece_bins': 15}
  with open(os.path.join(folder, 'sampling_curve.json'), 'w') as f:
    json.dump({'meta': meta, 'rows': rows, 'diagnoses': []}, f)
  return arrays


def test_pool_folds_against_reference(tmp_path):
  """bench/pool_folds.py's pooling: dataset-level figures over all folds'
  cases equal the Dice formula on the summed counts; grouped bootstraps
  reduce to case bootstraps for one case per group and collapse for one
  group; bad inputs are named."""
  sys.path.insert(0, os.path.join(ROOT, 'bench'))
  import sampling_stats as st
  rng = np.random.default_rng(0)
  settings = [(1, 3), (10, 3)]
  folds = [(['a1', 'a2', 'b1'], ['pa', 'pa', 'pb']),
           (['c1', 'c2', 'c3', 'd1'], ['pc', 'pc', 'pc', 'pd'])]
  made = [_fake_fold(str(tmp_path / f'f{k}'), rng, ids, groups,
                     settings + ([(25, 3)] if k == 0 else []))
          for k, (ids, groups) in enumerate(folds)]
  runs = [st.load_run(str(tmp_path / f'f{k}')) for k in range(2)]
  result = st.pool(runs, resamples=200)
  assert result['meta']['num_cases'] == 7
  assert result['meta']['num_patients'] == 4
  assert result['meta']['left_out'] == [['x0_resample', 25, 3]]
  by_steps = {r['num_steps']: r for r in result['rows']}
  assert sorted(by_steps) == [1, 10]
  for i, steps in enumerate([1, 10]):
    cat = {a: np.concatenate([m[f'row{i}_{a}'] for m in made])
           for a in ('chain_conf', 'pred_conf', 'medoid_conf')}
    chains = [_dice_reference(cat['chain_conf'][:, j].sum(0))
              for j in range(3)]
    r = by_steps[steps]
    assert r['chain_mDice'] == pytest.approx(np.mean(chains), abs=1e-12)
    assert r['mDice'] == pytest.approx(
        _dice_reference(cat['pred_conf'].sum(0)), abs=1e-12)
    assert r['mDice_medoid'] == pytest.approx(
        _dice_reference(cat['medoid_conf'].sum(0)), abs=1e-12)
    assert r['vs_single_case']['medoid'] == pytest.approx(
        r['mDice_medoid'] - r['chain_mDice'], abs=1e-12)
    assert [f['folder'] for f in r['folds']] == [run['folder'] for run in runs]
  ten, one = by_steps[10], by_steps[1]
  for unit in ('case', 'patient'):
    v = ten[f'vs_one_step_{unit}']
    assert v['chain_mDice'] == pytest.approx(
        ten['chain_mDice'] - one['chain_mDice'], abs=1e-12)
    assert v['ece'] == pytest.approx(ten['ece'] - one['ece'], abs=1e-12)
    assert v['ensemble_mDice'] == pytest.approx(
        ten['mDice'] - one['chain_mDice'], abs=1e-12)
  # ECE per model: each fold's ECE difference from its own histograms.
  from spad_jax import calibration
  per_fold = [calibration.reliability(m['row1_top'].sum(0), 15)['ece'] -
              calibration.reliability(m['row0_top'].sum(0), 15)['ece']
              for m in made]
  v = ten['vs_one_step_fold_mean']
  np.testing.assert_allclose(v['per_fold'], per_fold, rtol=1e-12)
  assert v['ece'] == pytest.approx(np.mean(per_fold), abs=1e-12)
  assert v['ece_ci95'][0] <= v['ece'] <= v['ece_ci95'][1]
  assert 'mean over folds of ECE − 1 step' in st.pooled_markdown(result)
  # Resampling stays within each stratum: with one case per stratum every
  # resample is the full sample, whatever the seed.
  stat = lambda strata: (float(sum(np.arange(5.0)[i].sum() for i in strata)),)
  point, lo, hi = st.stratified_bootstrap(
      stat, [np.array([i]) for i in range(5)], 50, 1)
  assert point[0] == lo[0] == hi[0] == 10.0
  _, lo, hi = st.stratified_bootstrap(stat, [np.arange(5)], 50, 1)
  assert lo[0] < 10.0 < hi[0]
  # Patients resample their cases together: a different interval here.
  assert (ten['vs_one_step_patient']['chain_mDice_ci95'] !=
          ten['vs_one_step_case']['chain_mDice_ci95'])
  text = st.pooled_markdown(result)
  assert '7 cases in 4 groups' in text and 'over patients' in text
  # Grouped bootstraps: one case per group is the case bootstrap; one group
  # holding every case always resamples all of them.
  diffs = lambda idx: (float(np.mean(np.arange(7.0)[idx])),)
  units = st.case_units(7)
  assert np.allclose(st.paired_bootstrap(diffs, units, 100, 3),
                     st.paired_bootstrap(diffs, st.case_units(
                         7, [str(i) for i in range(7)]), 100, 3))
  point, lo, hi = st.paired_bootstrap(diffs, st.case_units(7, ['p'] * 7),
                                      100, 3)
  assert point[0] == lo[0] == hi[0] == 3.0
  with pytest.raises(ValueError, match='6 group labels for 7 cases'):
    st.case_units(7, ['p'] * 6)
  # Errors name what is wrong.
  with pytest.raises(st.PoolError, match="'a1' is in both"):
    st.pool([runs[0], st.load_run(str(tmp_path / 'f0'))])
  os.remove(tmp_path / 'f1' / 'sampling_cases.npz')
  with pytest.raises(st.PoolError, match='f1/sampling_cases.npz: missing'):
    st.load_run(str(tmp_path / 'f1'))
  runs[1]['meta']['class_names'] = ['bg', 'a']
  with pytest.raises(st.PoolError, match='class_names'):
    st.pool(runs)


def test_pool_folds_keeps_each_folds_picked_label(tmp_path):
  """--picks: each fold contributes only its own label's rows, pooled as
  one setting; the pooled figures are those of the chosen rows' counts."""
  sys.path.insert(0, os.path.join(ROOT, 'bench'))
  import sampling_stats as st
  rng = np.random.default_rng(2)
  settings = [(1, 2), (10, 2)] * 2  # Rows 0, 1: 'last'; 2, 3: 'chain_mean'.
  folds = [(['a1', 'a2'], ['pa', 'pa']), (['b1', 'b2', 'b3'], ['pb'] * 3)]
  made = []
  for k, (ids, groups) in enumerate(folds):
    folder = str(tmp_path / f'f{k}')
    made.append(_fake_fold(folder, rng, ids, groups, settings))
    path = os.path.join(folder, 'sampling_curve.json')
    data = json.load(open(path))
    for row in data['rows'][2:]:
      row.update(name='x0_resample label:chain_mean of:last',
                 chain_label='chain_mean', ensemble_of='last')
    json.dump(data, open(path, 'w'))
  runs = [st.keep_label(st.load_run(str(tmp_path / 'f0')), 'chain_mean'),
          st.keep_label(st.load_run(str(tmp_path / 'f1')), 'last')]
  result = st.pool(runs, resamples=100)
  assert [r['name'] for r in result['rows']] == [
      'x0_resample of:last label:picked'] * 2
  assert result['meta']['left_out'] == []
  for r, (i0, i1) in zip(result['rows'], [(2, 0), (3, 1)]):
    conf = np.concatenate([made[0][f'row{i0}_chain_conf'],
                           made[1][f'row{i1}_chain_conf']])
    assert r['chain_mDice'] == pytest.approx(
        np.mean([_dice_reference(conf[:, j].sum(0)) for j in range(2)]),
        abs=1e-12)
  with pytest.raises(st.PoolError, match="f1: no row has chain_label 'soft_map'"):
    st.keep_label(st.load_run(str(tmp_path / 'f1')), 'soft_map')
