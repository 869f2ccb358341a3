"""Categorical diffusion maths against an independent float64 reference.

The reference builds explicit K×K one-step transition matrices
``Q_t = α_t·I + (1 − α_t)/K·11ᵀ`` and applies Bayes' rule; it shares no code
with spad_jax.diffusion.
"""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from spad_jax import diffusion
from spad_jax.models import unet

# float32 inputs: 1e-6. Rerun under JAX_ENABLE_X64=1 (test_float64_reference
# below does): 1e-10.
X64 = bool(jax.config.jax_enable_x64)
TOL = 1e-10 if X64 else 1e-6


def reference_alphas(T, s=0.008, max_beta=0.999):
  f = lambda u: np.cos((u + s) / (1 + s) * np.pi / 2) ** 2
  alphas = [1.0]
  for t in range(1, T + 1):
    beta = 1 - (f(t / T) / f(0)) / (f((t - 1) / T) / f(0))
    alphas.append(1 - min(beta, max_beta))
  return np.array(alphas)


def one_step(alpha, k):
  return alpha * np.eye(k) + (1 - alpha) / k * np.ones((k, k))


def marginal_matrix(alphas, t, k, start=0):
  """Product of one-step matrices from time ``start`` to ``t``."""
  m = np.eye(k)
  for i in range(start + 1, t + 1):
    m = m @ one_step(alphas[i], k)
  return m


def reference_posterior(xt, x0, t, s, alphas, k):
  """q(x_s | x_t, x0) ∝ q(x_t | x_s) q(x_s | x0) with explicit matrices."""
  to_s = x0 @ marginal_matrix(alphas, s, k)  # q(x_s | x0), row vector.
  jump = marginal_matrix(alphas, t, k, start=s)  # [x_s, x_t].
  unnorm = jump[:, xt] * to_s
  return unnorm / unnorm.sum()


@pytest.fixture(scope='module')
def schedule():
  return diffusion.make_schedule(50)


def test_schedule_matches_reference(schedule):
  ref = np.cumprod(reference_alphas(50))
  np.testing.assert_allclose(schedule.alphas_cumprod, ref, rtol=TOL,
                             atol=TOL)
  assert float(schedule.alphas_cumprod[0]) == 1.0
  assert np.all(np.diff(np.asarray(schedule.alphas_cumprod)) < 0)


@pytest.mark.parametrize('k', [2, 3, 6])
def test_marginals_equal_composed_one_step_matrices(schedule, k):
  alphas = reference_alphas(50)
  rng = np.random.default_rng(k)
  for t in [1, 7, 25, 50]:
    x0 = np.eye(k)[rng.integers(k)]
    expected = x0 @ marginal_matrix(alphas, t, k)
    got = diffusion.q_probs(jnp.asarray(x0), t, schedule)
    np.testing.assert_allclose(got, expected, atol=TOL)


@pytest.mark.parametrize('k', [2, 3, 6, 31])
def test_jump_posterior_equals_bayes(schedule, k):
  alphas = reference_alphas(50)
  rng = np.random.default_rng(100 + k)
  for _ in range(6):
    t = int(rng.integers(1, 51))
    s = int(rng.integers(0, t))
    xt, c0 = rng.integers(k), rng.integers(k)
    x0 = np.eye(k)[c0]
    expected = reference_posterior(xt, x0, t, s, alphas, k)
    got = diffusion.posterior_probs(jnp.eye(k)[xt], jnp.asarray(x0), t, s,
                                    schedule)
    np.testing.assert_allclose(got, expected, atol=TOL)


@pytest.mark.parametrize('k', [2, 6])
def test_mixture_equals_explicit_sum(schedule, k):
  rng = np.random.default_rng(k)
  p_hat = rng.dirichlet(np.ones(k), size=5)
  xt = rng.integers(k, size=5)
  t = rng.integers(2, 51, size=5)
  s = np.array([rng.integers(0, ti) for ti in t])
  xt_oh = jnp.eye(k)[xt]
  got = diffusion.model_posterior_probs(xt_oh, jnp.asarray(p_hat), t, s,
                                        schedule)
  explicit = sum(p_hat[:, c:c + 1] * diffusion.posterior_probs(
      xt_oh, jnp.broadcast_to(jnp.eye(k)[c], (5, k)), t, s, schedule)
                 for c in range(k))
  np.testing.assert_allclose(got, explicit, atol=TOL)
  np.testing.assert_allclose(np.sum(got, -1), 1.0, atol=TOL)


def test_kl_at_t1_is_cross_entropy_and_zero_at_truth(schedule):
  k = 4
  rng = np.random.default_rng(0)
  labels = rng.integers(k, size=(2, 5, 5))
  x0 = jax.nn.one_hot(labels, k)
  p_hat = jax.nn.softmax(jnp.asarray(rng.normal(size=(2, 5, 5, k))))
  t = jnp.ones((2,), jnp.int32)
  loss = diffusion.kl_loss(x0, x0, p_hat, t, schedule)
  ce = -jnp.sum(jnp.log(jnp.sum(p_hat * x0, -1)), axis=(1, 2))
  np.testing.assert_allclose(loss, ce, rtol=10 * TOL)
  for tt in [1, 10, 50]:
    xt = jax.nn.one_hot(rng.integers(k, size=(2, 5, 5)), k)
    zero = diffusion.kl_loss(x0, xt, x0, jnp.full((2,), tt), schedule)
    np.testing.assert_allclose(zero, 0.0, atol=100 * TOL)  # Sum of 25 px.


def test_loss_gradient_finite_with_exact_zeros(schedule):
  k = 3
  x0 = jax.nn.one_hot(jnp.array([[[0, 1], [2, 0]]]), k)
  p_hat = jnp.array([[[[1., 0, 0], [0, 1, 0]], [[0, 0, 1], [0, 1, 0]]]])
  for t in [1, 5]:
    g = jax.grad(lambda p: diffusion.kl_loss(x0, x0, p, jnp.array([t]),
                                             schedule).sum())(p_hat)
    assert np.all(np.isfinite(g))


def test_sampler_recovers_x0_with_oracle_model(schedule):
  k = 4
  labels = jnp.asarray(np.random.default_rng(1).integers(k, size=(2, 6, 6)))
  oracle = lambda xt, image, t: jax.nn.one_hot(labels, k)
  image = jnp.zeros((2, 6, 6, 1))
  uneven = np.array([50, 49, 31, 7, 2, 0])
  for times in [diffusion.time_sequence(50, n) for n in (1, 3, 50)] + [uneven]:
    out = jax.jit(lambda key: diffusion.sample(oracle, image, key, schedule,
                                               k, times))(jax.random.key(0))
    np.testing.assert_array_equal(out['labels'], labels)
    np.testing.assert_array_equal(out['sample'], labels)
  with pytest.raises(ValueError, match='decrease strictly'):
    diffusion.sample(oracle, image, jax.random.key(0), schedule, k,
                     [50, 20, 20, 0])


SAMPLER_OPTIONS = [dict(sampler='x0_resample'), dict(temperature=0.5),
                   dict(temperature=2.0), dict(mode_last=2),
                   dict(sampler='x0_resample', temperature=0.3, mode_last=1)]


@pytest.mark.parametrize('options', SAMPLER_OPTIONS)
def test_sampler_options_recover_x0_with_oracle_model(schedule, options):
  """Every sampler option keeps the exactness of an oracle p̂ = x0."""
  k = 3
  labels = jnp.asarray(np.random.default_rng(2).integers(k, size=(2, 5, 5)))
  oracle = lambda xt, image, t: jax.nn.one_hot(labels, k)
  image = jnp.zeros((2, 5, 5, 1))
  for times in [diffusion.time_sequence(50, n) for n in (1, 3, 50)]:
    out = jax.jit(lambda key: diffusion.sample(  # pylint: disable=cell-var-from-loop
        oracle, image, key, schedule, k, times, **options))(jax.random.key(4))
    np.testing.assert_array_equal(out['labels'], labels)
    np.testing.assert_array_equal(out['sample'], labels)
    np.testing.assert_allclose(out['probs_chain_mean'],
                               jax.nn.one_hot(labels, k), atol=1e-6)


def test_x0_resample_jump_is_the_marginal_of_p_hat(schedule):
  """x0_resample: x_s ~ Σ_c p̂_c q(x_s | x0 = e_c), whatever x_t is."""
  alphas = reference_alphas(50)
  k = 4
  p_hat = np.array([0.1, 0.6, 0.2, 0.1])
  for t, s in [(50, 20), (7, 6), (3, 0)]:
    expected = p_hat @ marginal_matrix(alphas, s, k)
    for xt in range(k):
      got = diffusion.jump_probs('x0_resample', jnp.eye(k)[xt], p_hat, t, s,
                                 schedule)
      np.testing.assert_allclose(got, expected, atol=TOL)
  with pytest.raises(ValueError, match='eval.sampler'):
    diffusion.jump_probs('ddim', jnp.eye(k)[0], p_hat, 3, 0, schedule)


def test_sampler_options_final_draw_follows_their_distribution(schedule):
  """Fixed p̂: the last draw follows p̂ (x0_resample), p̂^(1/τ)/Z
  (temperature τ) or is the mode (mode_last); labels stay argmax p̂."""
  k = 3
  p_fixed = np.array([0.5, 0.3, 0.2])
  model = lambda xt, image, t: jnp.broadcast_to(jnp.asarray(p_fixed),
                                                xt.shape)
  image = jnp.zeros((16, 32, 32, 1))
  tau = 0.5
  sharp = p_fixed ** (1 / tau) / np.sum(p_fixed ** (1 / tau))
  cases = [(dict(sampler='x0_resample'), p_fixed),
           (dict(temperature=tau), sharp),
           (dict(sampler='x0_resample', temperature=tau), sharp)]
  for options, dist in cases:
    for steps in (1, 7):
      out = jax.jit(lambda key: diffusion.sample(  # pylint: disable=cell-var-from-loop
          model, image, key, schedule, k, diffusion.time_sequence(50, steps),
          **options))(jax.random.key(steps))
      counts = np.bincount(np.asarray(out['sample']).ravel(), minlength=k)
      assert chi_square(counts, counts.sum() * dist) < 13.8, (options, counts)
      assert np.all(np.asarray(out['labels']) == 0)
  out = diffusion.sample(model, image, jax.random.key(0), schedule, k,
                         diffusion.time_sequence(50, 5), mode_last=1)
  assert np.all(np.asarray(out['sample']) == 0)
  for bad, needle in [(dict(sampler='ddim'), 'eval.sampler'),
                      (dict(temperature=0.0), 'eval.temperature'),
                      (dict(mode_last=-1), 'eval.mode_last')]:
    with pytest.raises(ValueError, match=needle):
      diffusion.sample(model, image, jax.random.key(0), schedule, k, **bad)


def test_sampler_trace_holds_every_step(schedule):
  """trace_input holds the x_t of every step (the model's argmax on it is
  trace_pred), the last prediction is the returned labels, and tracing
  changes no draw."""
  k = 3
  rng = np.random.default_rng(5)
  weights = jnp.asarray(rng.normal(size=(k, k)))
  model = lambda xt, image, t: jax.nn.softmax(xt @ weights + image, axis=-1)
  image = jnp.asarray(rng.normal(size=(2, 6, 6, 1)))
  times = diffusion.time_sequence(50, 6)
  plain = diffusion.sample(model, image, jax.random.key(1), schedule, k, times)
  traced = diffusion.sample(model, image, jax.random.key(1), schedule, k,
                            times, trace=True)
  assert traced['trace_pred'].shape == (6, 2, 6, 6)
  np.testing.assert_array_equal(traced['trace_pred'][-1], plain['labels'])
  np.testing.assert_array_equal(traced['sample'], plain['sample'])
  for i, t in enumerate(times[:-1]):
    xt = jax.nn.one_hot(traced['trace_input'][i].astype(np.int32), k)
    np.testing.assert_array_equal(
        np.argmax(model(xt, image, t), axis=-1), traced['trace_pred'][i])
  # Each step's input is the previous step's draw, not its prediction.
  assert np.any(traced['trace_input'][1:] != traced['trace_pred'][:-1])
  # The chain-mean soft map is the mean of the model's p̂ on every step's
  # input, recomputed here from the traced inputs.
  steps = [model(jax.nn.one_hot(traced['trace_input'][i].astype(np.int32), k),
                 image, t) for i, t in enumerate(times[:-1])]
  np.testing.assert_allclose(plain['probs_chain_mean'], np.mean(steps, 0),
                             atol=1e-6)
  np.testing.assert_allclose(plain['probs'], steps[-1], atol=1e-6)


def test_time_sequence():
  np.testing.assert_array_equal(diffusion.time_sequence(250, 1), [250, 0])
  seq = diffusion.time_sequence(250, 10)
  assert seq[0] == 250 and seq[-1] == 0 and len(seq) == 11
  assert len(diffusion.time_sequence(250, 250)) == 251
  with pytest.raises(ValueError, match='eval.num_steps'):
    diffusion.time_sequence(250, 0)


def test_float64_reference():
  """The reference checks above, rerun with x64 at 1e-10."""
  if X64:
    pytest.skip('already running under x64')
  env = dict(os.environ, JAX_ENABLE_X64='1', JAX_PLATFORMS='cpu')
  result = subprocess.run(
      [sys.executable, '-m', 'pytest', '-q', '-p', 'no:cacheprovider',
       os.path.abspath(__file__), '-k', 'not float64 and not sampler and '
       'not bfloat16'], env=env, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stdout[-3000:]
  assert ' passed' in result.stdout


def chi_square(counts, expected):
  """Pearson's statistic; categories expected never must never occur.

  Thresholds below are the p = 0.001 quantile for 2 degrees of freedom
  (fixed seeds, so the tests are deterministic).
  """
  zero = expected < 1e-9
  assert not counts[zero].any(), (counts, expected)
  return np.sum((counts[~zero] - expected[~zero]) ** 2 / expected[~zero])


@pytest.mark.parametrize('t,s', [(50, 0), (50, 20), (30, 29), (10, 3)])
def test_jump_posterior_sampling_is_consistent(schedule, t, s):
  """x_t ~ q(x_t|x0), x_s ~ q(x_s|x_t,x0) gives x_s ~ q(x_s|x0) for any jump."""
  k, n = 3, 60000
  x0 = jnp.broadcast_to(jnp.eye(k)[1], (n, k))
  key_t, key_s = jax.random.split(jax.random.key(t * 100 + s))
  xt = diffusion.sample_categorical(key_t, diffusion.q_probs(x0, t, schedule))
  post = diffusion.posterior_probs(jax.nn.one_hot(xt, k), x0, t, s, schedule)
  xs = diffusion.sample_categorical(key_s, post)
  counts = np.bincount(np.asarray(xs), minlength=k)
  expected = n * np.asarray(diffusion.q_probs(x0[0], s, schedule))
  assert chi_square(counts, expected) < 13.8, (counts, expected)


def test_sampler_final_sample_follows_fixed_p_hat(schedule):
  """With a model returning a fixed p̂, the last draw of many chains ~ p̂."""
  k = 3
  p_fixed = jnp.array([0.5, 0.3, 0.2])
  model = lambda xt, image, t: jnp.broadcast_to(p_fixed, xt.shape)
  image = jnp.zeros((16, 32, 32, 1))  # 16 chains x 1024 pixels.
  for steps in (1, 7, 50):
    out = jax.jit(lambda key: diffusion.sample(
        model, image, key, schedule, k,
        diffusion.time_sequence(50, steps)))(jax.random.key(steps))
    counts = np.bincount(np.asarray(out['sample']).ravel(), minlength=k)
    expected = counts.sum() * np.asarray(p_fixed)
    assert chi_square(counts, expected) < 13.8, (steps, counts, expected)
    assert np.all(np.asarray(out['labels']) == 0)  # argmax p̂.
    np.testing.assert_allclose(out['probs'][0, 0, 0], p_fixed, atol=1e-6)


def test_mean_ensemble_averages_the_chains_probabilities():
  probs = jnp.array([[[[[0.9, 0.1]]]], [[[[0.2, 0.8]]]], [[[[0.4, 0.6]]]]])
  out = diffusion.mean_ensemble(probs)  # N=3 chains, B=1, 1x1 image, K=2.
  np.testing.assert_allclose(out['soft'][0, 0, 0], [0.5, 0.5], atol=1e-7)
  probs = probs.at[2].set(jnp.array([[[[0.3, 0.7]]]]))
  out = diffusion.mean_ensemble(probs)
  # The vote says class 1 (two chains of three), as does the mean here.
  assert out['prediction'][0, 0, 0] == 1
  np.testing.assert_allclose(out['entropy'][0, 0, 0],
                             -(0.4667 * np.log(0.4667) + 0.5333 *
                               np.log(0.5333)), atol=1e-3)
  # Where the two rules differ: one confident chain outweighs two unsure.
  probs = jnp.array([[[[[0.99, 0.01]]]], [[[[0.45, 0.55]]]],
                     [[[[0.45, 0.55]]]]])
  assert diffusion.mean_ensemble(probs)['prediction'][0, 0, 0] == 0
  votes = diffusion.ensemble(jnp.argmax(probs, axis=-1), 2)
  assert votes['prediction'][0, 0, 0] == 1


def test_ensemble_soft_map_and_entropy():
  labels = jnp.array([[[[0, 1]]], [[[0, 2]]]])  # N=2 samples, B=1, 1x2 image.
  out = diffusion.ensemble(labels, 3)
  np.testing.assert_allclose(out['soft'][0, 0, 0], [1, 0, 0])
  np.testing.assert_allclose(out['soft'][0, 0, 1], [0, 0.5, 0.5])
  np.testing.assert_allclose(out['entropy'][0, 0], [0, np.log(2)], atol=1e-6)
  assert out['prediction'][0, 0, 0] == 0


def _medoid_reference(samples: np.ndarray, k: int) -> int:
  """Independent loop: the chain with the highest summed foreground Dice
  to all chains (1 where a class is in neither map), lowest index on ties."""
  def dice(a, b):
    scores = []
    for c in range(1, k):
      x, y = a == c, b == c
      both = x.sum() + y.sum()
      scores.append(1.0 if both == 0 else 2.0 * (x & y).sum() / both)
    return np.mean(scores)
  totals = [sum(dice(a, b) for b in samples) for a in samples]
  return int(np.argmax(totals))


def test_medoid_ensemble_picks_the_most_central_sample():
  rng = np.random.default_rng(0)
  for k, n in ((2, 5), (4, 16), (3, 2)):
    labels = rng.integers(0, k, size=(n, 3, 6, 7))
    labels[:, 1, :, :] = np.where(rng.random((n, 6, 7)) < 0.8, 0, 1)  # Sparse.
    labels[:, 2] = 0  # No foreground: all chains tie, chain 0 is chosen.
    out = diffusion.medoid_ensemble(jnp.asarray(labels), k)
    for b in range(3):
      m = _medoid_reference(labels[:, b], k)
      assert int(out['medoid'][b]) == m, (k, n, b)
      np.testing.assert_array_equal(out['prediction'][b], labels[m, b])
    assert int(out['medoid'][2]) == 0
    vote = diffusion.ensemble(jnp.asarray(labels), k)
    for key in ('soft', 'entropy'):  # The uncertainty is the vote's.
      np.testing.assert_array_equal(out[key], vote[key])


def test_medoid_keeps_a_thin_structure_the_vote_erases():
  # Five chains draw a two-row band at rows j, j + 1: no pixel is in more
  # than two of five, so the vote drops the band; the medoid is a whole
  # band, one that overlaps two others, not an end one that overlaps one.
  labels = np.zeros((5, 1, 8, 5), np.int32)
  for j in range(5):
    labels[j, 0, j:j + 2] = 1
  vote = diffusion.ensemble(jnp.asarray(labels), 2)
  assert int(jnp.sum(vote['prediction'] == 1)) == 0
  out = diffusion.medoid_ensemble(jnp.asarray(labels), 2)
  chosen = int(out['medoid'][0])
  assert chosen in (1, 2, 3)
  np.testing.assert_array_equal(out['prediction'][0], labels[chosen, 0])


def test_bfloat16_network_float32_loss(schedule):
  model = unet.UNet(num_classes=3, base_channels=8, channel_mult=(1, 2),
                    attention_resolutions=(4,), dtype=jnp.bfloat16)
  x0 = jax.nn.one_hot(jnp.zeros((2, 8, 8), jnp.int32), 3)
  image = jnp.ones((2, 8, 8, 1))
  t = jnp.array([1, 30])
  params = model.init(jax.random.key(0), x0, image, t)['params']
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params))

  def loss(params):
    logits = model.apply({'params': params}, x0, image, t)
    assert logits.dtype == jnp.float32
    p_hat = jax.nn.softmax(logits.astype(jnp.bfloat16))
    out = diffusion.kl_loss(x0, x0, p_hat, t, schedule)
    assert out.dtype == jnp.float32
    return out.mean()

  value, grads = jax.value_and_grad(loss)(params)
  assert np.isfinite(value)
  assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))
