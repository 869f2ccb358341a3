"""Training: the pmapped SPAD/CCDM train step, the loop, validation.

(About 430 lines: the step and the loop that drives it stay together; what
an example is trained on is in objectives.py, the state and checkpoints in
train_state.py.)

Keys are explicit: every example draws its time step, noisy label and image
noise from ``fold_in(fold_in(train_key, step), global_example_index)``, so a
step gives the same numbers on 1 or many devices for the same global batch.
"""

import json
import os
import signal
import threading
import time
from typing import Any, Callable, Dict, Optional

from absl import logging
from flax import jax_utils
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from spad_jax import config_keys
from spad_jax import diffusion
from spad_jax import evaluate
from spad_jax import files
from spad_jax import formatting
from spad_jax import metrics as metrics_lib
from spad_jax import objectives
from spad_jax import perturb
from spad_jax import predictors
from spad_jax import records
from spad_jax import timesteps
from spad_jax import train_state
from spad_jax import visualize
from spad_jax.data import pipeline
from spad_jax.data import sources
from spad_jax.models import unet

AXIS = train_state.AXIS


def ema_decay_at(step, decay: float):
  """EMA decay with warm-up ``min(decay, (1+n)/(10+n))``: early averages are not
  dominated by the random initialisation on short runs."""
  n = jnp.asarray(step, jnp.float32)
  return jnp.minimum(decay, (1.0 + n) / (10.0 + n))


def make_train_step(config, model: unet.UNet, schedule: diffusion.Schedule,
                    steps_per_epoch: int) -> Callable:
  """The per-device step; wrap with ``jax.pmap(axis_name=AXIS)``.

  What each example is trained on (times, noisy labels, loss) comes from
  ``objectives.py``; this step adds the SPAD perturbation, the gradient
  average over devices, the update and the EMA.
  """
  num_classes = config.data.num_classes
  spad_cfg = config.spad
  perturbs = spad_cfg.scd or spad_cfg.bcd
  make_inputs = objectives.make_inputs_fn(config, schedule)
  example_loss = objectives.make_loss_fn(config, schedule)

  def apply_model(params, xt_onehot, image, t, keys, p_prev=None):
    if not config.model.dropout:
      return model.apply({'params': params}, xt_onehot, image, t, train=True,
                         p_prev=p_prev)
    # Dropout masks from each example's own key (not one key per device), so
    # a step is the same on any device count; vmap keeps the convolutions
    # batched.
    def one(x, img, ti, key, prev):
      return model.apply({'params': params}, x[None], img[None], ti[None],
                         train=True, p_prev=None if prev is None else prev[None],
                         rngs={'dropout': jax.random.fold_in(key, 1 << 30)})[0]
    return jax.vmap(one)(xt_onehot, image, t, keys, p_prev)

  own_samples = objectives.make_own_sample_fn(config, schedule)
  self_condition_input = objectives.make_self_condition_fn(config)

  def train_step(state: train_state.TrainState, batch, train_key):
    per_device = batch['label'].shape[0]
    step_key = jax.random.fold_in(train_key, state.step)
    first = jax.lax.axis_index(AXIS) * per_device
    keys = jax.vmap(lambda i: jax.random.fold_in(step_key, i))(
        first + jnp.arange(per_device))
    epoch = state.step // steps_per_epoch

    x0 = jax.nn.one_hot(batch['label'], num_classes, dtype=jnp.float32)
    inputs = make_inputs(state.loss_history, step_key, keys, first, x0)
    image = batch['image']
    sigma = perturb.sigma_at(epoch, spad_cfg)
    if perturbs:
      mask = perturb.union_mask(batch['scd_bits'], batch['bcd_bits'],
                                batch['label'].shape)
      image = jax.vmap(perturb.perturb_image, in_axes=(0, 0, None, 0))(
          image, mask, sigma, inputs.eps_keys)

    if own_samples is not None:
      inputs = own_samples(apply_model, state.params, inputs, image, keys, x0,
                           state.step)
    p_prev = (None if self_condition_input is None else
              self_condition_input(apply_model, state.params, inputs, image,
                                   keys))

    def loss_fn(params):
      logits = apply_model(params, inputs.xt_onehot, image, inputs.t, keys,
                           p_prev)
      p_hat = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
      per_example = example_loss(x0, inputs.xt_onehot, p_hat, inputs.t)
      return jnp.mean(inputs.weight * per_example), per_example

    (loss, per_example), grads = jax.value_and_grad(
        loss_fn, has_aux=True)(state.params)
    grads = jax.lax.pmean(grads, AXIS)
    loss = jax.lax.pmean(loss, AXIS)
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    new_state = _apply_update(state, grads, finite, config.train.ema_decay)
    extra = {}
    if inputs.probs is not None:
      # Every device records the whole global batch in the same order, so
      # the replicated histories stay identical.
      new_state = new_state.replace(loss_history=timesteps.update_history(
          state.loss_history, jax.lax.all_gather(inputs.t, AXIS).reshape(-1),
          jax.lax.all_gather(per_example, AXIS).reshape(-1)))
      extra['importance_active'] = timesteps.history_ready(
          state.loss_history).astype(jnp.int32)
    # The deterministic loss is already per pixel (CE mean + soft Dice).
    pixels = (1 if config.model.kind == 'deterministic' else
              x0.shape[1] * x0.shape[2])
    metrics = {
        'loss': loss, 'loss_per_pixel': loss / pixels,
        'grad_norm': grad_norm, 'sigma': jnp.asarray(sigma, jnp.float32),
        'k_targets': perturb.num_targets(epoch, spad_cfg.k0, spad_cfg.k_gamma,
                                         num_classes - 1),
        'epoch': epoch, 'skipped': 1 - finite.astype(jnp.int32),
        **extra,
    }
    return new_state, metrics

  return train_step


def _apply_update(state: train_state.TrainState, grads, finite,
                  ema_decay: float) -> train_state.TrainState:
  """Optimizer step and EMA; a non-finite loss or gradient skips the update
  (the streak is counted, and reported by the loop).

  One ``lax.cond`` rather than a ``where`` per state leaf: the step then
  compiles without ~800 selects and ~600 entry copies of the donated state
  (demo UNet); the time saved is within the noise of bench/step_ab.py.
  """
  def update(s):
    updates, new_opt = s.tx.update(grads, s.opt_state, s.params)
    new_params = optax.apply_updates(s.params, updates)
    decay = ema_decay_at(s.step, ema_decay)
    new_ema = jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p,
                           s.ema_params, new_params)
    return s.replace(step=s.step + 1, params=new_params, ema_params=new_ema,
                     opt_state=new_opt,
                     nonfinite_streak=jnp.zeros_like(s.nonfinite_streak))

  def skip(s):
    return s.replace(step=s.step + 1,
                     nonfinite_streak=s.nonfinite_streak + 1)

  return jax.lax.cond(finite, update, skip, state)


def p_train_step(config, model, schedule, steps_per_epoch) -> Callable:
  return jax.pmap(make_train_step(config, model, schedule, steps_per_epoch),
                  axis_name=AXIS, donate_argnums=(0,))


# ------------------------------------------------------------------- the loop


def write_config(config, workdir: str) -> None:
  """Stores the config (process 0); a resumed run with changes keeps both."""
  if jax.process_index() != 0:
    return
  path = os.path.join(workdir, 'config.json')
  new = json.loads(config.to_json_best_effort())
  if os.path.exists(path):
    with open(path) as f:
      old = json.load(f)
    if old == new:
      return
    changed = config_keys.flat_diff(old, new)
    stamp = time.strftime('%Y%m%d-%H%M%S')
    path = os.path.join(workdir, f'config.{stamp}.json')
    logging.warning('Config differs from the one this workdir was started '
                    'with, in %s; saving it as %s', ', '.join(changed), path)
  files.write_atomic(path, json.dumps(new, indent=1, sort_keys=True))


def train(config: ml_collections.ConfigDict, workdir: str):
  """Trains, resuming from ``workdir`` if it holds checkpoints.

  Returns ``(state, setup, complete)``: the unreplicated final state and
  whether training reached its last step (False after
  ``train.max_steps_per_run`` or SIGTERM; run again to resume).
  """
  os.makedirs(workdir, exist_ok=True)
  setup = train_state.Setup.from_config(config)
  init_key, train_key, _ = setup.keys()

  source = sources.load_split(config, 'train')
  val_source = (sources.load_split(config, config.train.val_split)
                if config.train.eval_every_epochs else None)
  monitored = config.train.get('monitor_train_cases', 0)
  monitor_source = (source.head(monitored) if monitored and val_source
                    else None)
  examples = pipeline.TrainExamples(source, config, jax.process_index(),
                                    jax.process_count(),
                                    jax.local_device_count())
  steps_per_epoch = examples.steps_per_epoch
  total_steps = config.train.num_epochs * steps_per_epoch
  logging.info('Training on %d cases: %d steps/epoch x %d epochs = %d steps, '
               'global batch %d on %d device(s) in %d process(es).',
               len(source), steps_per_epoch, config.train.num_epochs,
               total_steps, config.train.batch_size, jax.device_count(),
               jax.process_count())

  state = train_state.create_train_state(config, setup.model, init_key,
                                         total_steps)
  num_params = sum(x.size for x in jax.tree.leaves(state.params))
  logging.info('UNet parameters: %.2f M (model.kind=%s)', num_params / 1e6,
               config.model.kind)
  mgr = train_state.checkpoint_manager(workdir,
                                       config.train.checkpoints_to_keep)
  best_mgr = train_state.checkpoint_manager(workdir, 1, kind='best')
  if mgr.latest_step() is not None:
    state = train_state.restore_checkpoint(mgr, state)
    logging.info('Resuming from checkpoint at step %d.', int(state.step))
  write_config(config, workdir)
  start_step = int(state.step)
  metadata = {'config': json.loads(config.to_json_best_effort()),
              'git_revision': train_state.git_revision(),
              'steps_per_epoch': steps_per_epoch}
  complete = start_step >= total_steps
  try:
    if not complete:
      loop = _Loop(config, workdir, setup, examples, val_source, mgr,
                   best_mgr, total_steps, metadata, monitor_source)
      state, complete = loop.run(state, train_key, start_step)
    else:
      logging.info('Training already complete (step %d of %d).', start_step,
                   total_steps)
  finally:  # Also on errors: no async checkpoint thread left behind.
    for m in (mgr, best_mgr):
      m.wait_until_finished()
      m.close()
  return state, setup, complete


def train_and_evaluate(config: ml_collections.ConfigDict,
                       workdir: str) -> Optional[Dict[str, Any]]:
  """Trains, then evaluates ``eval.split``; None when stopped early."""
  state, setup, complete = train(config, workdir)
  if not complete:
    logging.info('Stopped at step %d before the end; run the same command '
                 'again to resume.', int(state.step))
    return None
  # The final state is the latest checkpoint; evaluate() loads the best one
  # itself when eval.checkpoint resolves to 'best'.
  if train_state.resolve_checkpoint(config, workdir) == 'best':
    state = None
  return evaluate.evaluate(config, workdir, state=state, setup=setup)


class _StopSignal:
  """Turns SIGTERM (preemption, ``scancel``) into a request to save and stop
  at the next step; restores the previous handler on exit."""

  def __init__(self):
    self.requested = False
    self._previous = None

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    return self

  def _handle(self, signum, frame):
    del signum, frame
    logging.warning('SIGTERM: saving a checkpoint and stopping at the next '
                    'step.')
    self.requested = True

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


def _best_val_mdice(best_mgr) -> float:
  step = best_mgr.latest_step()
  if step is None:
    return -np.inf
  meta = train_state.checkpoint_metadata(best_mgr, step)
  value = meta.get('val', {}).get('mDice')
  return -np.inf if value is None else float(value)


def validate(config, workdir, setup, state, val_source, step: int,
             rec, predict) -> Dict[str, Any]:
  """Samples the val split with the EMA parameters; logs mIoU/mDice and a
  grid (``val_grid.png`` and TensorBoard). ``predict`` is the compiled
  sampler (``predictors.make_predict_fn``), shared with the final evaluation.
  With ``eval.chain_label='auto'`` (``predict`` unused) every candidate
  label is scored and the picked one's figures are the validation's, so
  the best checkpoint is chosen with the label evaluation will use."""
  ema = train_state.unreplicate(state.ema_params)
  auto = predictors.picks_chain_label(config)
  if auto:  # The label evaluation will pick, and so the best checkpoint's.
    scored = evaluate.score_chain_labels(
        config, ema, setup, val_source, num_shown=config.eval.num_grid_cases)
    run = scored['runs'][scored['pick']]
    seconds = scored['seconds']
  else:
    run = evaluate.sample_split(config, ema, setup, val_source,
                                num_shown=config.eval.num_grid_cases,
                                predict=predict)
    seconds = run['seconds']
  result = metrics_lib.summarize_confusion(run['confusion'],
                                           list(val_source.class_names))
  summary = {'val_mIoU': result['mIoU'], 'val_mDice': result['mDice'],
             'val_seconds': seconds}
  picked = ''
  if auto:
    result['chain_label_auto'] = {'picked': scored['pick'],
                                  'val_mDice': scored['mDice']}
    summary.update({f'val_mDice_{label}': value
                    for label, value in scored['mDice'].items()})
    picked = f"; chain label {scored['pick']} (" + ', '.join(
        f'{label} {formatting.number(value, 4)}'
        for label, value in scored['mDice'].items()) + ')'

  rec.write_scalars(step, {k: (np.nan if v is None else v)
                          for k, v in summary.items()})
  if jax.process_index() == 0:
    shown = run['shown']
    grid = visualize.grid_png(shown['images'], shown['labels'],
                              shown['preds'], None, config.data.num_classes,
                              os.path.join(workdir, 'val_grid.png'),
                              scale=max(1, 128 // config.data.image_size))
    rec.write_images(step, {'val/image_label_prediction': grid[None]})
  logging.info('[%d] validation: mIoU %s  mDice %s  (%d cases, %.1f s)%s',
               step, formatting.number(result['mIoU'], 4),
               formatting.number(result['mDice'], 4), len(val_source),
               seconds, picked)
  return result


def monitor_train(config, setup, state, source, step: int, rec) -> float:
  """mDice of the EMA parameters on ``source`` (the first training cases),
  logged as ``train_mDice``: one chain labelled by its final ``p̂``, whatever
  ``eval.chain_label`` (a learning curve, not a model selection)."""
  if predictors.picks_chain_label(config):
    config = predictors.with_chain_label(config, 'last')
  run = evaluate.sample_split(config, train_state.unreplicate(state.ema_params),
                              setup, source,
                              predict=predictors.cached(config, setup))
  value = metrics_lib.summarize_confusion(
      run['confusion'], list(source.class_names))['mDice']
  rec.write_scalars(step, {'train_mDice': np.nan if value is None else value,
                           'train_mDice_seconds': run['seconds']})
  logging.info('[%d] train-split monitor: mDice %s  (%d cases, %.1f s)', step,
               formatting.number(value, 4), len(source), run['seconds'])
  return value


class _Loop:
  """The training loop of one run: steps, logging, checkpoints, validation."""

  def __init__(self, config, workdir, setup, examples, val_source, mgr,
               best_mgr, total_steps: int, metadata: Dict[str, Any],
               monitor_source=None):
    self.config, self.workdir, self.setup = config, workdir, setup
    self.examples, self.val_source = examples, val_source
    self.monitor_source = monitor_source
    self.mgr, self.best_mgr = mgr, best_mgr
    self.total_steps, self.metadata = total_steps, metadata
    self.spe = examples.steps_per_epoch
    self.predict = (predictors.cached(config, setup)
                    if val_source is not None and
                    not predictors.picks_chain_label(config) else None)
    self.eval_every = config.train.eval_every_epochs * self.spe
    self.best = _best_val_mdice(best_mgr)
    self.lr_fn = train_state.learning_rate_schedule(config, total_steps)
    self.skipped_total = 0
    self.importance_on = None  # Logged when importance sampling switches.

  def run(self, state, train_key, start_step: int):
    """Returns ``(unreplicated state, complete)``."""
    t = self.config.train
    stop_at = self.total_steps
    if t.max_steps_per_run:
      stop_at = min(stop_at, start_step + t.max_steps_per_run)
    step_fn = p_train_step(self.config, self.setup.model, self.setup.schedule,
                           self.spe)
    state = train_state.replicate(state)
    train_keys = train_state.replicate(train_key)
    batches = pipeline.train_batches(self.examples, start_step, stop_at,
                                     self.config)
    batches = jax_utils.prefetch_to_device(batches, self.config.data.prefetch,
                                           axis_name=AXIS)
    rec = records.create_writer(self.workdir,
                                enabled=jax.process_index() == 0)
    progress = records.Progress(start_step, stop_at, t.batch_size)
    pending = []
    step = start_step
    with _StopSignal() as stop:
      try:
        for step in range(start_step + 1, stop_at + 1):
          state, metrics = step_fn(state, next(batches), train_keys)
          pending.append(metrics)
          requested = stop.requested
          if jax.process_count() > 1:
            # All processes must stop at the same step (collectives); asking
            # the others costs a sync, so only at log steps.
            requested = (step % t.log_every_steps == 0 and
                         _any_process(requested))
          stopping = step == stop_at or requested
          if step % t.log_every_steps == 0 or stopping:
            self._log(step, pending, state, rec, progress)
            pending = []
          meta = dict(self.metadata, epoch=step // self.spe)
          if step % t.checkpoint_every_steps == 0 or stopping:
            train_state.save_checkpoint(self.mgr, state, meta)
          if self.eval_every and (step % self.eval_every == 0 or
                                  step == self.total_steps):
            self._validate(step, state, rec, meta)
            progress.update(step)  # Validation time is not training time.
          if stopping:
            break
      finally:
        rec.close()
    return train_state.unreplicate(state), step >= self.total_steps

  def _log(self, step, pending, state, rec, progress) -> None:
    """Fetches the pending metrics (the only host sync besides checkpoints),
    logs them and stops the run after too many non-finite updates."""
    config = self.config
    fetched = jax.device_get([train_state.unreplicate(m) for m in pending])
    skipped = sum(int(m['skipped']) for m in fetched)
    self.skipped_total += skipped
    streak = int(jax.device_get(
        train_state.unreplicate(state.nonfinite_streak)))
    summary = {k: float(np.mean([m[k] for m in fetched]))
               for k in fetched[0] if k != 'skipped'}
    summary.update(progress.update(step))
    summary.update({'lr': float(self.lr_fn(step - 1)),
                    'skipped_updates': self.skipped_total})
    rec.write_scalars(step, summary)
    logging.info(
        '[%d/%d] epoch %d  loss %.4g (%.4g/px)  sigma %.3f  k %d  lr %.2e  '
        '%.2f steps/s  %.1f img/s  ETA %s%s', step, self.total_steps,
        summary['epoch'], summary['loss'], summary['loss_per_pixel'],
        summary['sigma'], summary['k_targets'], summary['lr'],
        summary['steps_per_sec'], summary['images_per_sec'],
        formatting.hms(summary['eta_sec']),
        f'  skipped {skipped} non-finite' if skipped else '')
    active = summary.get('importance_active')
    if active is not None and bool(active) != self.importance_on:
      self.importance_on = bool(active)
      d = config.diffusion
      logging.info('[%d] timestep sampling: %s', step,
                   f'importance sampling is on (every t has '
                   f'{d.importance_history} recorded losses)'
                   if self.importance_on else
                   f'uniform until every t has {d.importance_history} '
                   f'recorded losses ({d.num_steps} t values)')
    if streak >= config.train.max_nonfinite_steps:
      raise FloatingPointError(
          f'{streak} consecutive non-finite losses/gradients at step {step}; '
          f'stopping. The last good checkpoint (step '
          f'{self.mgr.latest_step()}) is intact in {self.mgr.directory}.')

  def _validate(self, step, state, rec, meta) -> None:
    result = validate(self.config, self.workdir, self.setup, state,
                      self.val_source, step, rec, self.predict)
    if self.monitor_source is not None:
      monitor_train(self.config, self.setup, state, self.monitor_source, step,
                    rec)
    value = result['mDice']
    if value is not None and value > self.best:
      self.best = value
      train_state.save_checkpoint(self.best_mgr, state, dict(meta, val=result))
      logging.info('New best val mDice %.4f at step %d (%s).', value, step,
                   self.best_mgr.directory)


def _any_process(flag: bool) -> bool:
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return bool(np.any(multihost_utils.process_allgather(np.int32(flag))))
