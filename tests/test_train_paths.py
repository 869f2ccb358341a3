"""Training paths beyond the happy path: SIGTERM stop and resume, skipped
non-finite updates and the abort, learning-rate schedules, dropout and
bfloat16 steps (from conftest's shared step runs), eval.checkpoint=best
without a best checkpoint.
"""

import math
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import ROOT
from conftest import tiny_config
from conftest import DEVICE_LOSS_RTOL
from conftest import xla_flags
from test_train import checkpoint_steps
from test_train import load_checkpoint
from test_train import read_log

TINY = '--config=tests/tiny_config.py'


def group(ckpt, name):
  return {k: v for k, v in ckpt.items() if k.startswith(f"['{name}']")}


# ------------------------------------------------------- learning-rate schedules


def reference_lr(step, peak, kind, warmup, total):
  """Linear warm-up 0 -> peak over ``warmup`` updates (clamped to leave the
  last update after it), then ``kind`` over the remaining updates, reaching
  0 (cosine, linear) at ``total``."""
  warmup = min(warmup, total - 1)
  if step < warmup:
    return peak * step / warmup
  frac = min((step - warmup) / (total - warmup), 1.0)
  if kind == 'constant':
    return peak
  if kind == 'cosine':
    return peak * 0.5 * (1.0 + math.cos(math.pi * frac))
  return peak * (1.0 - frac)


@pytest.mark.parametrize('kind', ['constant', 'cosine', 'linear'])
@pytest.mark.parametrize('warmup,total', [(0, 100), (10, 100), (50, 10)],
                         ids=['no_warmup', 'warmup10', 'warmup_beyond_run'])
def test_learning_rate_schedule_matches_the_formula(kind, warmup, total):
  from spad_jax import train_state  # pylint: disable=g-import-not-at-top
  config = tiny_config()
  config.train.lr_schedule = kind
  config.train.warmup_steps = warmup
  config.train.learning_rate = 3e-3
  fn = train_state.learning_rate_schedule(config, total)
  w = min(warmup, total - 1)
  steps = sorted({0, 1, max(w - 1, 0), w, w + 1, (w + total) // 2,
                  total - 2, total - 1, total, total + 7})
  got = np.array([float(fn(s)) for s in steps])
  want = np.array([reference_lr(s, 3e-3, kind, warmup, total) for s in steps])
  # optax computes in float32: near the end of a cosine, 1 + cos(.) loses
  # digits (4e-11 measured at the last step); atol is 1e-6 of the peak.
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=3e-9,
                             err_msg=f'steps {steps}')
  if warmup:  # Warm-up starts at 0 and ends at the peak.
    assert float(fn(0)) == 0.0
    assert float(fn(w)) == pytest.approx(3e-3, rel=1e-6)
  if kind != 'constant':  # Decays to 0 by the end of the run.
    assert float(fn(total)) == pytest.approx(0.0, abs=3e-9)
    if w < total - 1:  # The last update still has a learning rate.
      assert 0 < float(fn(total - 1)) < 3e-3
    else:  # Warm-up clamped to end at the last update, at the peak.
      assert float(fn(total - 1)) == pytest.approx(3e-3, rel=1e-6)


@pytest.mark.parametrize('kind,warmup', [('cosine', 3), ('linear', 0)])
def test_optimizer_update_k_uses_the_schedule_at_k(kind, warmup):
  """Update k (0-based, optax's count) of the optimizer uses lr(k): with a
  constant gradient of 1 and no weight decay Adam's normalised step is 1,
  so each update is -lr(k)."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from spad_jax import train_state  # pylint: disable=g-import-not-at-top
  config = tiny_config()
  config.train.lr_schedule = kind
  config.train.warmup_steps = warmup
  config.train.weight_decay = 0.0
  total = 12
  tx = train_state.create_optimizer(config, total)
  params = {'w': jnp.zeros(())}
  opt = tx.init(params)
  for k in range(total):
    updates, opt = tx.update({'w': jnp.ones(())}, opt, params)
    want = reference_lr(k, config.train.learning_rate, kind, warmup, total)
    # Adam's float32 moment sums and bias corrections agree to ~1e-5.
    assert float(updates['w']) == pytest.approx(-want, rel=1e-4, abs=3e-9), k


def test_unknown_schedule_is_named():
  from spad_jax import config_validation  # pylint: disable=g-import-not-at-top
  from spad_jax import train_state  # pylint: disable=g-import-not-at-top
  config = tiny_config()
  config.train.lr_schedule = 'exponential'
  with pytest.raises(ValueError, match=r"config\.train\.lr_schedule.*"
                     r"'exponential'"):
    train_state.learning_rate_schedule(config, 100)
  # main.py stops on the config check first, naming the same key.
  with pytest.raises(config_validation.ConfigError,
                     match=r"config\.train\.lr_schedule = 'exponential'"):
    config_validation.validate(config)


# ------------------------------------------------------- SIGTERM stop and resume


def _env(devices=1):
  return dict(os.environ, JAX_PLATFORMS='cpu', TF_CPP_MIN_LOG_LEVEL='2',
              XLA_FLAGS=xla_flags(devices))


def test_sigterm_saves_stops_and_resumes(main_runner, tmp_path):
  """SIGTERM mid-training: exit 0 after a checkpoint at the step it stopped
  at (no evaluation); the same command resumes from there. (That a resumed
  run ends bitwise equal to a straight one is test_train's resume test.)"""
  args = [TINY, '--config.train.num_epochs=10']  # 40 steps, log every 2.
  total = 40
  workdir = tmp_path / 'stopped'
  log_path = workdir / 'train_log.jsonl'
  proc = subprocess.Popen(
      ['nice', sys.executable, os.path.join(ROOT, 'main.py'),
       f'--workdir={workdir}'] + args, cwd=ROOT, env=_env(),
      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  try:
    deadline = time.time() + 300
    while not (log_path.exists() and log_path.read_text().strip()):
      assert proc.poll() is None, proc.communicate()[1][-3000:]
      assert time.time() < deadline, 'no train_log.jsonl row in 300 s'
      time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=300)
  finally:
    proc.kill()
  assert proc.returncode == 0, stderr[-3000:]
  assert 'SIGTERM' in stderr
  stopped = max(checkpoint_steps(workdir))
  assert 2 <= stopped < total, 'the run ended before SIGTERM arrived'
  assert f'Stopped at step {stopped}' in stderr
  # The last row is the stop step (a log row, also off the log grid).
  assert read_log(workdir)[-1]['step'] == stopped
  assert not (workdir / 'metrics.json').exists()
  assert 'mDice' not in stdout
  saved = load_checkpoint(workdir, stopped)
  assert int(saved["['step']"]) == stopped

  resumed = main_runner(args + [f'--workdir={workdir}',
                                 '--config.train.max_steps_per_run=2'])
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert f'Resuming from checkpoint at step {stopped}' in resumed.stderr
  assert max(checkpoint_steps(workdir)) == stopped + 2
  steps = [row['step'] for row in read_log(workdir) if 'loss' in row]
  assert steps == sorted(set(steps)) and steps[-1] == stopped + 2
  after = load_checkpoint(workdir, stopped + 2)
  # The resumed steps changed the parameters.
  assert any(not np.array_equal(saved[k], after[k])
             for k in group(after, 'params'))


# ------------------------------------------------- non-finite skip and abort


def test_nonfinite_updates_are_skipped_then_the_run_stops(main_runner,
                                                          tmp_path):
  """learning_rate=1e30: update 1 (finite loss at the init) sends the
  parameters to ~1e30, so every later loss is NaN. Those updates are
  skipped (parameters, EMA and optimizer state kept bitwise), counted in
  skipped_updates, and the third in a row stops the run with exit 1."""
  workdir = tmp_path / 'nan'
  result = main_runner([TINY, f'--workdir={workdir}',
                        '--config.train.learning_rate=1e30',
                        '--config.train.log_every_steps=1',
                        '--config.train.checkpoint_every_steps=1',
                        '--config.train.max_nonfinite_steps=3'])
  assert result.returncode == 1, result.stderr[-3000:]
  assert ('error: 3 consecutive non-finite losses/gradients at step 4'
          in result.stderr), result.stderr[-3000:]
  assert 'last good checkpoint (step 3)' in result.stderr
  assert not (workdir / 'metrics.json').exists()
  log = read_log(workdir)
  assert [row['step'] for row in log] == [1, 2, 3, 4]
  assert [row['skipped_updates'] for row in log] == [0, 1, 2, 3]
  assert np.isfinite(log[0]['loss'])
  assert all(not np.isfinite(row['loss']) for row in log[1:])
  # The step-4 failure was not saved; 1-3 were (3 kept).
  assert checkpoint_steps(workdir) == [1, 2, 3]
  ckpts = {s: load_checkpoint(workdir, s) for s in (1, 2, 3)}
  for s in (1, 2, 3):
    assert int(ckpts[s]["['step']"]) == s
    assert int(ckpts[s]["['nonfinite_streak']"]) == s - 1
  # The trigger worked as intended: update 1 was applied at lr 1e30.
  params1 = group(ckpts[1], 'params')
  assert max(np.abs(v).max() for v in params1.values()) > 1e29
  for s in (2, 3):
    for name in ('params', 'ema_params', 'opt_state'):
      for key, value in group(ckpts[1], name).items():
        np.testing.assert_array_equal(ckpts[s][key], value, err_msg=key)
  # The last good checkpoint is intact: complete and finite.
  assert all(np.all(np.isfinite(v)) for k, v in ckpts[3].items()
             if v.dtype.kind == 'f')


# ------------------------------------------------- eval.checkpoint=best, none


def test_eval_checkpoint_best_without_best_checkpoint(main_runner, tmp_path):
  workdir = tmp_path / 'noval'
  trained = main_runner([TINY, f'--workdir={workdir}',
                         '--config.train.eval_every_epochs=0',
                         '--config.train.num_epochs=1',
                         '--config.train.max_steps_per_run=2'])
  assert trained.returncode == 0, trained.stderr[-3000:]
  assert checkpoint_steps(workdir) == [2]
  assert not (workdir / 'metrics.json').exists()
  result = main_runner([TINY, f'--workdir={workdir}', '--mode=evaluate',
                        '--config.eval.checkpoint=best'])
  assert result.returncode != 0
  error = [line for line in result.stderr.splitlines()
           if line.startswith('error:')]
  assert error, result.stderr[-3000:]
  assert 'eval.checkpoint' in error[0] and 'best_checkpoint' in error[0]
  assert not (workdir / 'metrics.json').exists()
  assert not (workdir / 'best_checkpoint').exists() or not any(
      d.isdigit() for d in os.listdir(workdir / 'best_checkpoint'))


# ------------------------------------------------- dropout and bfloat16 steps


def is_dropout_target(key):
  """The convs right after each ResBlock's dropout (zero-initialised)."""
  return key.startswith("['ResBlock_") and key.endswith(
      "['Conv_1']['kernel']")


def relative_distance(a, b, run, keys):
  """||a - b|| / ||run's update||, over ``keys`` (float64)."""
  flat = lambda p: np.concatenate([p[k].astype(np.float64).ravel()
                                   for k in sorted(keys)])
  update = np.linalg.norm(flat(run['step2']) - flat(run['init']))
  return np.linalg.norm(flat(a) - flat(b)) / update


# Dropout sits before each ResBlock's zero-initialised output conv and the
# logits conv starts at zero: update 1 sees no dropout at all (measured: the
# same bits as dropout 0) and leaves those convs at zero, and update 2's
# forward pass still does not see it. Update 2's gradients of those output
# convs do (through the dropped activations): two steps are the smallest run
# where dropout matters, and those kernels are where it shows. Adam's second
# update is nearly sign(g) there, so compare relative L2 distances over those
# kernels, not elementwise.


def test_dropout_changes_the_second_update(steps_on_1_device):
  base, drop = steps_on_1_device['base'], steps_on_1_device['dropout']
  keys = [k for k in base['step2'] if is_dropout_target(k)]
  assert len(keys) >= 8
  # Measured 0.60 (dropout 0.2 vs 0, the same keys and batches).
  assert relative_distance(drop['step2'], base['step2'], base, keys) > 0.1
  assert np.all(np.isfinite(drop['loss']))


def test_two_steps_same_on_1_and_4_devices_without_dropout(
    steps_on_1_device, steps_on_4_devices):
  """The control for the dropout test below: without dropout, 1 and 4
  devices agree on these kernels (measured 7e-7; over all parameters Adam
  turns rounding of near-zero gradients into ~1e-2, see test_train)."""
  one, four = steps_on_1_device['base'], steps_on_4_devices['base']
  np.testing.assert_allclose(four['loss'], one['loss'], rtol=DEVICE_LOSS_RTOL)
  keys = [k for k in one['step2'] if is_dropout_target(k)]
  assert relative_distance(four['step2'], one['step2'], one, keys) < 1e-4


def test_dropout_steps_same_on_1_and_4_devices(steps_on_1_device,
                                               steps_on_4_devices):
  """Dropout masks come from each example's key, so they do not depend on
  the device count (measured 0.40 when the key was per device)."""
  one, four = steps_on_1_device['dropout'], steps_on_4_devices['dropout']
  np.testing.assert_allclose(four['loss'], one['loss'], rtol=DEVICE_LOSS_RTOL)
  keys = [k for k in one['step2'] if is_dropout_target(k)]
  assert relative_distance(four['step2'], one['step2'], one, keys) < 1e-4


def test_bfloat16_steps_are_finite_float32_and_close(steps_on_1_device):
  """model.dtype=bfloat16: activations in bf16, loss maths and parameters
  float32 (configs/default.py)."""
  base, bf16 = steps_on_1_device['base'], steps_on_1_device['bf16']
  assert bf16['loss'].dtype == np.float32
  assert np.all(np.isfinite(bf16['loss']))
  assert all(v.dtype == np.float32 for v in bf16['step2'].values())
  assert all(np.all(np.isfinite(v)) for v in bf16['step2'].values())
  keys = list(bf16['step2'])
  assert max(np.abs(bf16['step2'][k] - bf16['init'][k]).max()
             for k in keys) > 1e-3  # The steps changed the parameters.
  # Step 2's loss goes through the bf16 network (step 1's logits come from a
  # zero-initialised conv). bf16 keeps 8 significant bits (relative rounding
  # 2^-9 = 2e-3 per value), but the loss sums float32 per-pixel terms over
  # 8 x 16² pixels whose rounding errors mostly cancel: measured relative
  # difference 8e-5; 1e-3 leaves 12x margin and is still 400x below the
  # loss change between the two steps (38 %).
  assert bf16['loss'][1] != base['loss'][1]
  np.testing.assert_allclose(bf16['loss'][1], base['loss'][1], rtol=1e-3)
  # The parameters follow the float32 run: measured distance 0.04 of the
  # update (Adam's first updates are nearly sign(g): a few signs flip).
  assert relative_distance(bf16['step2'], base['step2'], base, keys) < 0.2


def _update_state():
  from configs import default  # pylint: disable=g-import-not-at-top
  from spad_jax import train_state  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  config = default.get_config()
  config.train.ema_decay = 0.9
  params = {'a': jnp.arange(6.0).reshape(2, 3), 'b': jnp.ones((4,))}
  return train_state._state_from_params(config, params, 100)  # pylint: disable=protected-access


def test_update_is_adam_and_ema_and_skips_nonfinite_steps():
  """train._apply_update (one lax.cond) against optax and the EMA formula
  written out; a non-finite step keeps the state and counts the streak."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  from spad_jax import train  # pylint: disable=g-import-not-at-top
  state = _update_state().replace(step=jnp.asarray(3, jnp.int32))
  grads = {'a': jnp.full((2, 3), 0.5), 'b': jnp.linspace(-1.0, 1.0, 4)}
  new = jax.jit(train._apply_update, static_argnums=3)(  # pylint: disable=protected-access
      state, grads, jnp.asarray(True), 0.9)
  updates, opt = state.tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  decay = min(0.9, (1 + 3) / (10 + 3))
  for k in params:
    np.testing.assert_allclose(new.params[k], params[k], rtol=1e-6)
    np.testing.assert_allclose(
        new.ema_params[k], decay * state.ema_params[k] + (1 - decay) *
        params[k], rtol=1e-6)
  for a, b in zip(jax.tree.leaves(new.opt_state), jax.tree.leaves(opt)):
    np.testing.assert_allclose(a, b, rtol=1e-6)
  assert int(new.step) == 4 and int(new.nonfinite_streak) == 0

  bad = jax.tree.map(lambda g: g.at[0].set(jnp.nan), grads)
  kept = train._apply_update(new, bad, jnp.asarray(False), 0.9)  # pylint: disable=protected-access
  for a, b in zip(jax.tree.leaves((kept.params, kept.ema_params,
                                   kept.opt_state)),
                  jax.tree.leaves((new.params, new.ema_params,
                                   new.opt_state))):
    np.testing.assert_array_equal(a, b)
  assert int(kept.step) == 5 and int(kept.nonfinite_streak) == 1
  again = train._apply_update(kept, bad, jnp.asarray(False), 0.9)  # pylint: disable=protected-access
  assert int(again.nonfinite_streak) == 2
