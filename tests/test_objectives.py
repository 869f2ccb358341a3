"""Objective variants: hybrid loss, timestep samplers, the deterministic UNet.

References are independent: explicit transition matrices (test_diffusion),
plain numpy cross-entropies, exact enumeration over t, a Python ring buffer.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from spad_jax import diffusion
from spad_jax import timesteps
import test_diffusion as ref
from conftest import DEVICE_LOSS_RTOL

TINY = '--config=tests/tiny_config.py'


def reference_kl(x0, xt, p_hat, t, alphas, k):
  """Σ_pixels KL(q(x_{t-1}|x_t,x0) ‖ Σ_c p̂_c q(x_{t-1}|x_t,e_c)), float64."""
  total = 0.0
  for pix in range(x0.shape[0]):
    q = ref.reference_posterior(xt[pix], np.eye(k)[x0[pix]], t, t - 1, alphas,
                                k)
    p = sum(p_hat[pix, c] * ref.reference_posterior(
        xt[pix], np.eye(k)[c], t, t - 1, alphas, k) for c in range(k))
    total += np.sum(q * (np.log(np.maximum(q, 1e-12)) -
                         np.log(np.maximum(p, 1e-12))))
  return total


@pytest.mark.parametrize('weighting', ['constant', 'stage'])
def test_hybrid_loss_equals_kl_plus_lambda_ce(weighting):
  k, num_t, lam = 3, 30, 0.7
  schedule = diffusion.make_schedule(num_t)
  alphas = ref.reference_alphas(num_t)
  abar = np.cumprod(alphas)
  rng = np.random.default_rng(0)
  b, h, w = 3, 2, 3
  x0 = rng.integers(0, k, (b, h, w))
  xt = rng.integers(0, k, (b, h, w))
  p_hat = rng.dirichlet(np.ones(k), (b, h, w))
  t = np.array([1, 9, 30])
  got = diffusion.hybrid_loss(
      jax.nn.one_hot(x0, k), jax.nn.one_hot(xt, k),
      jnp.asarray(p_hat, jnp.float32), t, schedule, lam, weighting)
  stage = (1 - abar) / np.mean(1 - abar[1:])
  for i in range(b):
    kl = reference_kl(x0[i].ravel(), xt[i].ravel(),
                      p_hat[i].reshape(-1, k), t[i], alphas, k)
    ce = -np.sum(np.log(np.take_along_axis(p_hat[i], x0[i][..., None],
                                           -1)))
    weight = 1.0 if weighting == 'constant' else stage[t[i]]
    np.testing.assert_allclose(got[i], kl + lam * weight * ce, rtol=2e-5)
  # λ = 0 is the paper's loss, untouched.
  np.testing.assert_array_equal(
      diffusion.hybrid_loss(jax.nn.one_hot(x0, k), jax.nn.one_hot(xt, k),
                            jnp.asarray(p_hat, jnp.float32), t, schedule, 0.0,
                            weighting),
      diffusion.kl_loss(jax.nn.one_hot(x0, k), jax.nn.one_hot(xt, k),
                        jnp.asarray(p_hat, jnp.float32), t, schedule))


@pytest.mark.parametrize('weighting', ['constant', 'stage'])
def test_dice_term_adds_pixels_times_soft_dice_to_the_hybrid_loss(weighting):
  import ml_collections
  from spad_jax import objectives
  k, num_t, lam_ce, lam_dice = 3, 10, 0.3, 0.05
  schedule = diffusion.make_schedule(num_t)
  abar = np.cumprod(ref.reference_alphas(num_t))
  stage = (1 - abar) / np.mean(1 - abar[1:])
  rng = np.random.default_rng(1)
  b, h, w = 3, 4, 5
  x0 = rng.integers(0, k, (b, h, w))
  x0[1][x0[1] == 2] = 1  # Class 2 absent: only class 1 is scored.
  x0[2] = 0  # No foreground at all: no Dice term, whatever p̂ says.
  xt = rng.integers(0, k, (b, h, w))
  p_hat = rng.dirichlet(np.ones(k), (b, h, w))
  t = np.array([1, 4, 10])
  config = ml_collections.ConfigDict({
      'model': {'kind': 'diffusion'},
      'diffusion': {'ce_lambda': lam_ce, 'ce_weighting': 'constant',
                    'dice_lambda': lam_dice, 'dice_weighting': weighting}})
  args = (jax.nn.one_hot(x0, k), jax.nn.one_hot(xt, k),
          jnp.asarray(p_hat, jnp.float32), t)
  got = objectives.make_loss_fn(config, schedule)(*args)
  hybrid = diffusion.hybrid_loss(*args, schedule, lam_ce, 'constant')
  for i in range(b):
    lost = []
    for c in range(1, k):
      g = (x0[i] == c).astype(np.float64)
      p = p_hat[i][..., c]
      if g.sum():
        lost.append(1 - 2 * np.sum(g * p) / (np.sum(g) + np.sum(p)))
    weight = 1.0 if weighting == 'constant' else stage[t[i]]
    want = hybrid[i] + lam_dice * h * w * weight * (np.mean(lost) if lost
                                                     else 0.0)
    np.testing.assert_allclose(got[i], want, rtol=1e-5)
  config.diffusion.dice_lambda = 0.0  # Off: the hybrid loss bit for bit.
  np.testing.assert_array_equal(
      objectives.make_loss_fn(config, schedule)(*args), hybrid)


def test_stage_weight_grows_as_signal_fades_and_averages_one():
  schedule = diffusion.make_schedule(250)
  w = np.asarray(diffusion.ce_stage_weight(np.arange(1, 251), schedule))
  assert np.all(np.diff(w) >= 0) and w[0] < 0.01 < 1 < w[-1]
  np.testing.assert_allclose(w.mean(), 1.0, rtol=1e-5)


def full_history(values):
  values = jnp.asarray(values, jnp.float32)
  return {'values': values,
          'counts': jnp.full((values.shape[0],), values.shape[1], jnp.int32)}


def test_self_conditioned_unet_takes_the_previous_estimate():
  """K more input channels; no estimate (None) is zeros; the estimate
  changes the output; a plain UNet refuses one."""
  from spad_jax.models import unet  # pylint: disable=g-import-not-at-top
  k, c = 3, 1
  model = unet.UNet(num_classes=k, base_channels=8, channel_mult=(1, 2),
                    num_res_blocks=1, attention_resolutions=(),
                    norm_groups=4, self_condition=True)
  rng = np.random.default_rng(0)
  xt = jax.nn.one_hot(rng.integers(k, size=(2, 8, 8)), k)
  image = jnp.asarray(rng.normal(size=(2, 8, 8, c)), jnp.float32)
  t = jnp.array([3, 7])
  params = model.init(jax.random.key(0), xt, image, t)['params']
  assert params['Conv_0']['kernel'].shape[2] == 2 * k + c
  # The output layer starts at zero (every output 0); move all weights.
  params = jax.tree.map(
      lambda x: x + 0.1 * jnp.asarray(rng.normal(size=x.shape), x.dtype),
      params)
  apply = lambda p_prev: model.apply({'params': params}, xt, image, t,
                                     p_prev=p_prev)
  np.testing.assert_array_equal(apply(None), apply(jnp.zeros_like(xt)))
  estimate = jax.nn.softmax(jnp.asarray(rng.normal(size=xt.shape)), axis=-1)
  assert np.abs(apply(estimate) - apply(None)).max() > 1e-4
  plain = unet.UNet(num_classes=k, base_channels=8, channel_mult=(1, 2),
                    num_res_blocks=1, attention_resolutions=(), norm_groups=4)
  plain_params = plain.init(jax.random.key(0), xt, image, t)['params']
  assert plain_params['Conv_0']['kernel'].shape[2] == k + c
  with pytest.raises(ValueError, match='self_condition'):
    plain.apply({'params': plain_params}, xt, image, t, p_prev=estimate)


def test_importance_weights_keep_the_expected_loss_exactly():
  """Σ_t π(t)·w(t)·L_t = (1/T)·Σ_t L_t, by enumeration over every t."""
  num_t, size = 12, 4
  rng = np.random.default_rng(1)
  values = np.vstack([np.zeros((1, size)), rng.gamma(2.0, 3.0, (num_t, size))])
  probs = np.asarray(timesteps.importance_probs(full_history(values), 0.05))
  assert probs.shape == (num_t,)
  np.testing.assert_allclose(probs.sum(), 1.0, rtol=1e-6)
  # π ∝ sqrt(E[L²]), mixed with 5 % uniform mass.
  second = np.sqrt(np.mean(values[1:] ** 2, axis=1))
  np.testing.assert_allclose(
      probs, 0.95 * second / second.sum() + 0.05 / num_t, rtol=1e-5)
  losses = rng.gamma(2.0, 3.0, num_t)  # Any per-t expected loss.
  weights = np.asarray(timesteps.importance_weight(np.arange(1, num_t + 1),
                                                   jnp.asarray(probs)))
  np.testing.assert_allclose(np.sum(probs * weights * losses),
                             np.mean(losses), rtol=1e-5)
  # Draws follow π (loose Monte-Carlo check of the sampler itself).
  keys = jax.random.split(jax.random.key(0), 20000)
  t = np.asarray(jax.vmap(lambda k: timesteps.draw(k, jnp.asarray(probs)))(
      keys))
  counts = np.bincount(t, minlength=num_t + 1)[1:] / len(t)
  np.testing.assert_allclose(counts, probs, atol=0.012)


def test_importance_is_uniform_until_every_t_has_its_history():
  num_t, size = 6, 3
  history = timesteps.init_history(num_t, size)
  for step in range(num_t * size):
    assert not bool(timesteps.history_ready(history))
    probs = np.asarray(timesteps.importance_probs(history, 0.001))
    np.testing.assert_array_equal(probs, np.full(num_t, 1 / num_t,
                                                 np.float32))
    t = 1 + step % num_t
    history = timesteps.update_history(history, jnp.array([t]),
                                       jnp.array([float(t)]))
  assert bool(timesteps.history_ready(history))
  probs = np.asarray(timesteps.importance_probs(history, 0.0))
  np.testing.assert_allclose(probs, np.arange(1, 7) / 21, rtol=1e-6)


def test_history_ring_buffer_matches_python_reference():
  num_t, size = 5, 3
  rng = np.random.default_rng(2)
  history = timesteps.init_history(num_t, size)
  values = np.zeros((num_t + 1, size), np.float32)
  counts = np.zeros(num_t + 1, np.int64)
  for _ in range(6):
    t = rng.integers(1, num_t + 1, 8)  # Repeats inside a batch.
    losses = rng.normal(size=8).astype(np.float32)
    losses[rng.random(8) < 0.2] = np.nan  # Not recorded.
    history = timesteps.update_history(history, jnp.asarray(t),
                                       jnp.asarray(losses))
    for ti, li in zip(t, losses):
      if np.isfinite(li):
        values[ti, counts[ti] % size] = li
        counts[ti] += 1
  np.testing.assert_array_equal(np.asarray(history['values']), values)
  np.testing.assert_array_equal(np.asarray(history['counts']), counts)


@pytest.mark.parametrize('batch,num_t', [(4, 20), (8, 8), (3, 250)])
def test_stratified_times_cover_the_strata_and_are_uniform(batch, num_t):
  draws = []
  for i in range(400):
    t = np.asarray(timesteps.stratified(jax.random.key(i), batch, num_t))
    assert t.min() >= 1 and t.max() <= num_t
    # One example per stratum [j/B, (j+1)/B) of (t - 1)/T.
    strata = np.floor((t - 1) / num_t * batch + 1e-9).astype(int)
    strata = np.minimum(strata, batch - 1)
    if num_t % batch == 0:
      assert sorted(strata) == list(range(batch))
    draws.append(t)
  draws = np.concatenate(draws)
  # Marginal: every t equally likely (within Monte-Carlo error).
  freq = np.bincount(draws, minlength=num_t + 1)[1:] / len(draws)
  assert np.abs(freq - 1 / num_t).max() < 5 * np.sqrt(
      1 / num_t / len(draws)) + 1e-3


@pytest.mark.parametrize('name', ['importance_hybrid', 'deterministic',
                                  'self_condition_own_sample_stratified'])
def test_variant_step_same_on_1_and_4_devices(steps_on_1_device,
                                              steps_on_4_devices, name):
  """One step of each variant (conftest.STEP_VARIANTS) equals on 1 and 4
  emulated devices; importance sampling starts from a full history, so the
  step draws from π(t) and records the whole global batch."""
  one, four = steps_on_1_device[name], steps_on_4_devices[name]
  np.testing.assert_allclose(four['loss'][0], one['loss'][0],
                             rtol=DEVICE_LOSS_RTOL)
  for key in one['step1']:
    np.testing.assert_allclose(four['step1'][key], one['step1'][key],
                               rtol=1e-4, atol=1e-6, err_msg=key)
  assert max(float(np.abs(one['step1'][k] - one['init'][k]).max())
             for k in one['init']) > 1e-4
  if name == 'importance_hybrid':
    np.testing.assert_array_equal(four['history_counts'],
                                  one['history_counts'])
    np.testing.assert_allclose(four['history_values'], one['history_values'],
                               rtol=1e-4)
    # Pre-filled with 2 per t (20 values of t), then 2 steps of batch 8.
    assert one['history_counts'][1:].sum() == 2 * 20 + 2 * 8


@pytest.mark.long
def test_importance_self_conditioning_own_samples_resume_bit_exactly(
    main_runner, tmp_path):
  """8 steps straight == 4, stop, resume to 8, including the loss history,
  the self-conditioning and the own-sample draws (from step 6, so the
  restored step count switches them on; at τ = 2); the log says when
  importance sampling switches on."""
  import test_train
  args = [TINY, '--config.train.num_epochs=2',
          '--config.model.self_condition=True',
          '--config.diffusion.own_sample_fraction=0.5',
          '--config.diffusion.own_sample_stride=3',
          '--config.diffusion.own_sample_start_step=6',  # After the resume.
          '--config.diffusion.own_sample_temperature=2.0',
          '--config.diffusion.t_sampling=importance',
          '--config.diffusion.importance_history=1',
          '--config.diffusion.num_steps=10',
          '--config.diffusion.ce_lambda=1.0',
          '--config.train.checkpoint_every_steps=4']
  straight = str(tmp_path / 'straight')
  run = main_runner(args + [f'--workdir={straight}'])
  assert run.returncode == 0, run.stderr[-3000:]
  assert 'timestep sampling: uniform until every t has 1' in run.stderr
  assert 'importance sampling is on' in run.stderr
  resumed = str(tmp_path / 'resumed')
  first = main_runner(args + [f'--workdir={resumed}',
                              '--config.train.max_steps_per_run=4'])
  assert first.returncode == 0, first.stderr[-3000:]
  second = main_runner(args + [f'--workdir={resumed}'])
  assert second.returncode == 0, second.stderr[-3000:]
  reference = test_train.load_checkpoint(straight, 8)
  again = test_train.load_checkpoint(resumed, 8)
  assert reference.keys() == again.keys()
  assert any('loss_history' in k for k in reference)
  for key in reference:
    np.testing.assert_array_equal(again[key], reference[key], err_msg=key)
  counts = reference["['loss_history']['counts']"]
  assert counts[1:].min() >= 1 and counts.sum() == 8 * 8


def test_deterministic_trains_evaluates_and_predicts(main_runner, tmp_path):
  import cv2
  workdir = tmp_path / 'det'
  args = [TINY, f'--workdir={workdir}', '--config.model.kind=deterministic',
          '--config.train.eval_every_epochs=1']
  run = main_runner(args)
  assert run.returncode == 0, run.stderr[-3000:]
  metrics = json.load(open(workdir / 'metrics.json'))
  assert metrics['model_kind'] == 'deterministic'
  assert metrics['sampling'] == {'forward_passes': 1}
  assert 0 <= metrics['mDice'] <= 1
  assert (workdir / 'per_case.csv').exists()
  assert (workdir / 'best_checkpoint').exists()
  losses = [json.loads(line)['loss'] for line in open(
      workdir / 'train_log.jsonl') if '"loss"' in line]
  assert losses[-1] < losses[0]
  images = tmp_path / 'in'
  images.mkdir()
  cv2.imwrite(str(images / 'a.png'),
              (np.random.default_rng(0).random((20, 24)) * 255).astype(
                  np.uint8))
  pred = main_runner(args[:2] + ['--config.model.kind=deterministic',
                                 '--mode=predict', f'--input={images}',
                                 f'--output={tmp_path / "out"}'])
  assert pred.returncode == 0, pred.stderr[-3000:]
  label = cv2.imread(str(tmp_path / 'out' / 'a_label.png'),
                     cv2.IMREAD_UNCHANGED)
  assert label.shape == (20, 24) and label.max() < 4


def test_bad_objective_settings_stop_before_any_work(main_runner, tmp_path):
  workdir = tmp_path / 'w'
  run = main_runner([TINY, f'--workdir={workdir}',
                     '--config.diffusion.ce_lambda=-1',
                     '--config.diffusion.t_sampling=sobol',
                     '--config.model.kind=gan'])
  assert run.returncode == 2
  for key in ('diffusion.ce_lambda', 'diffusion.t_sampling', 'model.kind'):
    assert f'config.{key}' in run.stderr
  assert not workdir.exists()


@pytest.mark.parametrize('temperature', [1.0, 2.0])
@pytest.mark.parametrize('sampler', ['ancestral', 'x0_resample'])
def test_own_sample_inputs_follow_the_samplers_jump(sampler, temperature):
  """With a model whose p̂ ignores its input, an own-sample x_t drawn from
  t' = t + stride has the marginal Σ_{x_t'} q(x_t'|x0) J(x_t | x_t', p̃),
  J the sampler's jump, built here from explicit transition matrices, and
  p̃ = p̂^(1/τ)/Z."""
  from configs import default
  from spad_jax import objectives
  k, num_t, stride, t, x0_class = 3, 10, 3, 4, 1
  config = default.get_config()
  config.data.num_classes = k
  config.diffusion.num_steps = num_t
  config.diffusion.own_sample_fraction = 1.0
  config.diffusion.own_sample_stride = stride
  config.diffusion.own_sample_sampler = sampler
  config.diffusion.own_sample_temperature = temperature
  own = objectives.make_own_sample_fn(config, diffusion.make_schedule(num_t))
  p_hat = np.array([0.2, 0.5, 0.3])
  # 131k draws: σ ≈ 0.0014; the samplers differ by 0.019, the two τ by
  # 0.05.
  batch, size = 8, 128
  apply_model = lambda params, xt, image, tt, keys: jnp.broadcast_to(
      jnp.log(jnp.asarray(p_hat, jnp.float32)), xt.shape)
  x0 = jax.nn.one_hot(jnp.full((batch, size, size), x0_class), k)
  inputs = objectives.Inputs(x0, jnp.full((batch,), t, jnp.int32), None, 1.0,
                             None)
  keys = jax.random.split(jax.random.PRNGKey(0), batch)
  drawn = np.asarray(own(apply_model, None, inputs, None, keys, x0, 0)
                     .xt_onehot).argmax(-1)
  freq = np.bincount(drawn.ravel(), minlength=k) / drawn.size

  alphas = ref.reference_alphas(num_t)
  start = np.eye(k)[x0_class] @ ref.marginal_matrix(alphas, t + stride, k)
  p_jump = p_hat ** (1 / temperature) / np.sum(p_hat ** (1 / temperature))
  expected = np.zeros(k)
  for x_from in range(k):
    if sampler == 'ancestral':
      jump = sum(p_jump[c] * ref.reference_posterior(
          x_from, np.eye(k)[c], t + stride, t, alphas, k) for c in range(k))
    else:  # q(x_t | x0 ~ p̃), whatever x_t' was.
      jump = p_jump @ ref.marginal_matrix(alphas, t, k)
    expected += start[x_from] * jump
  sigma = np.sqrt(expected * (1 - expected) / drawn.size)
  np.testing.assert_array_less(np.abs(freq - expected), 5 * sigma)


def test_own_samples_start_at_their_step():
  """Before ``own_sample_start_step`` the inputs pass unchanged; from it on
  the draw is the one without a warm-up (same keys, same x_t)."""
  from configs import default
  from spad_jax import objectives
  k, num_t, batch = 3, 10, 4
  config = default.get_config()
  config.data.num_classes = k
  config.diffusion.num_steps = num_t
  config.diffusion.own_sample_fraction = 1.0
  config.diffusion.own_sample_stride = 2
  schedule = diffusion.make_schedule(num_t)
  apply_model = lambda params, xt, image, tt, keys: jnp.zeros(xt.shape)
  x0 = jax.nn.one_hot(jnp.ones((batch, 16, 16), jnp.int32), k)
  inputs = objectives.Inputs(x0, jnp.full((batch,), 3, jnp.int32), None, 1.0,
                             None)
  keys = jax.random.split(jax.random.PRNGKey(1), batch)
  always = objectives.make_own_sample_fn(config, schedule)(
      apply_model, None, inputs, None, keys, x0, 0).xt_onehot
  assert not np.array_equal(always, x0)
  config.diffusion.own_sample_start_step = 5
  own = jax.jit(objectives.make_own_sample_fn(config, schedule),
                static_argnums=0)
  for step, expected in ((0, x0), (4, x0), (5, always), (9, always)):
    got = own(apply_model, None, inputs, None, keys, x0, jnp.int32(step))
    np.testing.assert_array_equal(got.xt_onehot, expected, err_msg=step)
