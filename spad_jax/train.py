"""Training: TrainState, the pmapped SPAD/CCDM train step, the loop, checkpoints.

Keys are explicit: every example draws its time step, noisy label and image
noise from ``fold_in(fold_in(train_key, step), global_example_index)``, so a
step gives the same numbers on 1 or many devices for the same global batch.
"""

import dataclasses
import json
import os
import subprocess
import time
from typing import Any, Callable, Dict

from absl import logging
from flax import jax_utils
from flax import struct
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp

from spad_jax import diffusion
from spad_jax import perturb
from spad_jax import records
from spad_jax.data import pipeline
from spad_jax.data import sources
from spad_jax.models import unet

AXIS = 'batch'


@struct.dataclass
class TrainState:
  step: jnp.ndarray  # int32 scalar: optimizer updates applied so far.
  params: Any
  ema_params: Any
  opt_state: Any
  nonfinite_streak: jnp.ndarray  # Consecutive skipped (non-finite) updates.
  tx: optax.GradientTransformation = struct.field(pytree_node=False)

  def checkpoint_items(self) -> Dict[str, Any]:
    return {'step': self.step, 'params': self.params,
            'ema_params': self.ema_params, 'opt_state': self.opt_state,
            'nonfinite_streak': self.nonfinite_streak}

  def replace_items(self, items: Dict[str, Any]) -> 'TrainState':
    return self.replace(**items)


def learning_rate_schedule(config, total_steps: int) -> optax.Schedule:
  t = config.train
  warmup = min(t.warmup_steps, max(total_steps - 1, 0))
  rest = max(total_steps - warmup, 1)
  if t.lr_schedule == 'constant':
    main = optax.constant_schedule(t.learning_rate)
  elif t.lr_schedule == 'cosine':
    main = optax.cosine_decay_schedule(t.learning_rate, rest)
  elif t.lr_schedule == 'linear':
    main = optax.linear_schedule(t.learning_rate, 0.0, rest)
  else:
    raise ValueError(f'config.train.lr_schedule: unknown {t.lr_schedule!r}')
  if not warmup:
    return main
  return optax.join_schedules(
      [optax.linear_schedule(0.0, t.learning_rate, warmup), main], [warmup])


def create_optimizer(config, total_steps: int) -> optax.GradientTransformation:
  """Adam with L2 weight decay (the paper's), or AdamW when decoupled."""
  t = config.train
  lr = learning_rate_schedule(config, total_steps)
  parts = []
  if t.grad_clip_norm > 0:
    parts.append(optax.clip_by_global_norm(t.grad_clip_norm))
  if t.decoupled_weight_decay:
    parts.append(optax.adamw(lr, weight_decay=t.weight_decay))
  else:
    if t.weight_decay > 0:
      parts.append(optax.add_decayed_weights(t.weight_decay))
    parts.append(optax.adam(lr))
  return optax.chain(*parts)


def create_train_state(config, model: unet.UNet, key: jax.Array,
                       total_steps: int) -> TrainState:
  size, c, k = (config.data.image_size, config.data.channels,
                config.data.num_classes)
  params = jax.jit(lambda key: model.init(
      key, jnp.zeros((1, size, size, k)), jnp.zeros((1, size, size, c)),
      jnp.zeros((1,), jnp.int32))['params'])(key)
  tx = create_optimizer(config, total_steps)
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    ema_params=params, opt_state=tx.init(params),
                    nonfinite_streak=jnp.zeros((), jnp.int32), tx=tx)


def ema_decay_at(step, decay: float):
  """EMA decay with warm-up ``min(decay, (1+n)/(10+n))``: early averages are not
  dominated by the random initialisation on short runs."""
  n = jnp.asarray(step, jnp.float32)
  return jnp.minimum(decay, (1.0 + n) / (10.0 + n))


def sigma_at(epoch, spad_cfg):
  """σ(e) (PaS) or the constant σ0 when PaS is off."""
  if spad_cfg.pas:
    return perturb.pas_sigma(epoch, spad_cfg.sigma0, spad_cfg.pas_lambda)
  return jnp.asarray(spad_cfg.sigma0, jnp.float32)


def make_train_step(config, model: unet.UNet, schedule: diffusion.Schedule,
                    steps_per_epoch: int) -> Callable:
  """The per-device step; wrap with ``jax.pmap(axis_name=AXIS)``."""
  num_classes = config.data.num_classes
  num_t = config.diffusion.num_steps
  spad_cfg = config.spad
  perturbs = spad_cfg.scd or spad_cfg.bcd

  def example_noise(key, x0_onehot):
    k_t, k_x, k_eps = jax.random.split(key, 3)
    t = jax.random.randint(k_t, (), 1, num_t + 1)
    xt = diffusion.sample_categorical(
        k_x, diffusion.q_probs(x0_onehot, t, schedule))
    return t, xt, k_eps

  def train_step(state: TrainState, batch, train_key):
    per_device = batch['label'].shape[0]
    step_key = jax.random.fold_in(train_key, state.step)
    first = jax.lax.axis_index(AXIS) * per_device
    keys = jax.vmap(lambda i: jax.random.fold_in(step_key, i))(
        first + jnp.arange(per_device))
    epoch = state.step // steps_per_epoch

    x0 = jax.nn.one_hot(batch['label'], num_classes, dtype=jnp.float32)
    t, xt, eps_keys = jax.vmap(example_noise)(keys, x0)
    xt_onehot = jax.nn.one_hot(xt, num_classes, dtype=jnp.float32)
    image = batch['image']
    sigma = sigma_at(epoch, spad_cfg)
    if perturbs:
      mask = jnp.maximum(batch['scd'], batch['bcd'])
      image = jax.vmap(perturb.perturb_image, in_axes=(0, 0, None, 0))(
          image, mask, sigma, eps_keys)
    dropout_key = jax.random.fold_in(step_key, 1 << 30)
    dropout_key = jax.random.fold_in(dropout_key, jax.lax.axis_index(AXIS))

    def loss_fn(params):
      logits = model.apply({'params': params}, xt_onehot, image, t, train=True,
                           rngs={'dropout': dropout_key})
      p_hat = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
      per_example = diffusion.kl_loss(x0, xt_onehot, p_hat, t, schedule)
      return jnp.mean(per_example)

    loss, grads = jax.value_and_grad(loss_fn)(state.params)
    grads = jax.lax.pmean(grads, AXIS)
    loss = jax.lax.pmean(loss, AXIS)
    grad_norm = optax.global_norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

    updates, new_opt = state.tx.update(grads, state.opt_state, state.params)
    new_params = optax.apply_updates(state.params, updates)
    decay = ema_decay_at(state.step, config.train.ema_decay)
    new_ema = jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p,
                           state.ema_params, new_params)
    # A non-finite loss or gradient skips the update (counted and reported).
    keep = lambda new, old: jax.tree.map(
        lambda n, o: jnp.where(finite, n, o), new, old)
    new_state = state.replace(
        step=state.step + 1,
        params=keep(new_params, state.params),
        ema_params=keep(new_ema, state.ema_params),
        opt_state=keep(new_opt, state.opt_state),
        nonfinite_streak=jnp.where(finite, 0, state.nonfinite_streak + 1))
    pixels = x0.shape[1] * x0.shape[2]
    metrics = {
        'loss': loss, 'loss_per_pixel': loss / pixels,
        'grad_norm': grad_norm, 'sigma': sigma,
        'k_targets': perturb.num_targets(epoch, spad_cfg.k0, spad_cfg.k_gamma,
                                         num_classes - 1),
        'epoch': epoch, 'skipped': 1 - finite.astype(jnp.int32),
    }
    return new_state, metrics

  return train_step


def p_train_step(config, model, schedule, steps_per_epoch) -> Callable:
  return jax.pmap(make_train_step(config, model, schedule, steps_per_epoch),
                  axis_name=AXIS, donate_argnums=(0,))


def replicate(tree):
  """Replicates onto the local devices on a mesh axis named like the pmap's.

  With flax's default axis name the arrays returned by the pmapped step live
  on a differently named mesh than its inputs, and every step then took a
  slow path (measured 2.5 s vs 0.26 s per demo step on CPU, jax 0.10.2).
  """
  return jax_utils.replicate(tree, axis_name=AXIS)


# ----------------------------------------------------------------- checkpoints


def checkpoint_manager(workdir: str, keep: int) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                         enable_async_checkpointing=True)
  return ocp.CheckpointManager(os.path.join(os.path.abspath(workdir),
                                            'checkpoints'), options=options)


def save_checkpoint(mgr: ocp.CheckpointManager, state: TrainState,
                    metadata: Dict[str, Any]) -> None:
  """Saves the replicated state (device 0's copy, fetched to host)."""
  items = jax.device_get(jax.tree.map(lambda x: x[0],
                                      state.checkpoint_items()))
  step = int(items['step'])
  mgr.save(step, args=ocp.args.StandardSave(items), force=True)
  if jax.process_index() == 0:
    meta_path = os.path.join(mgr.directory, f'metadata_{step}.json')
    with open(meta_path, 'w') as f:
      json.dump(dict(metadata, step=step), f, indent=1)


def restore_checkpoint(mgr: ocp.CheckpointManager, state: TrainState,
                       step=None) -> TrainState:
  """Restores onto the structure of an unreplicated ``state``."""
  step = mgr.latest_step() if step is None else step
  target = jax.tree.map(lambda x: np.zeros(x.shape, x.dtype),
                        jax.device_get(state.checkpoint_items()))
  items = mgr.restore(step, args=ocp.args.StandardRestore(target))
  return state.replace_items(items)


def git_revision() -> str:
  try:
    return subprocess.run(['git', 'rev-parse', 'HEAD'], capture_output=True,
                          text=True, timeout=5, check=True,
                          cwd=os.path.dirname(os.path.abspath(__file__))
                          ).stdout.strip()
  except (OSError, subprocess.SubprocessError):
    return 'unknown'


# ------------------------------------------------------------------- the loop


@dataclasses.dataclass
class Setup:
  """What training and evaluation share, built once from the config."""
  model: unet.UNet
  schedule: diffusion.Schedule
  root_key: jax.Array

  @classmethod
  def from_config(cls, config) -> 'Setup':
    return cls(model=unet.create_model(config),
               schedule=diffusion.make_schedule(config.diffusion.num_steps,
                                                config.diffusion.cosine_s),
               root_key=jax.random.PRNGKey(config.seed))

  def keys(self):
    """(init, train, eval) keys, fixed by the seed."""
    return jax.random.split(self.root_key, 3)


def write_config(config, workdir: str) -> None:
  """Stores the config; a resumed run with changes keeps both files."""
  path = os.path.join(workdir, 'config.json')
  new = json.loads(config.to_json_best_effort())
  if os.path.exists(path):
    with open(path) as f:
      old = json.load(f)
    if old == new:
      return
    changed = sorted(_flat_diff(old, new))
    stamp = time.strftime('%Y%m%d-%H%M%S')
    path = os.path.join(workdir, f'config.{stamp}.json')
    logging.warning('Config differs from the one this workdir was started '
                    'with, in %s; saving it as %s', ', '.join(changed), path)
  if jax.process_index() == 0:
    with open(path, 'w') as f:
      json.dump(new, f, indent=1, sort_keys=True)


def _flat_diff(a, b, prefix=''):
  keys = set(a) | set(b) if isinstance(a, dict) and isinstance(b, dict) else ()
  if not keys:
    return [prefix.rstrip('.')] if a != b else []
  out = []
  for k in keys:
    out += _flat_diff(a.get(k), b.get(k), f'{prefix}{k}.')
  return out


def train_and_evaluate(config: ml_collections.ConfigDict,
                       workdir: str) -> Dict[str, Any]:
  """Trains (resuming from ``workdir`` if it holds checkpoints), then evaluates."""
  from spad_jax import evaluate  # pylint: disable=g-import-not-at-top
  os.makedirs(workdir, exist_ok=True)
  setup = Setup.from_config(config)
  init_key, train_key, _ = setup.keys()
  local_devices = jax.local_device_count()

  source = sources.load_split(config, 'train')
  examples = pipeline.TrainExamples(source, config, jax.process_index(),
                                    jax.process_count(), local_devices)
  steps_per_epoch = examples.steps_per_epoch
  total_steps = config.train.num_epochs * steps_per_epoch
  logging.info('Training on %d cases: %d steps/epoch x %d epochs = %d steps, '
               'global batch %d on %d device(s) in %d process(es).',
               len(source), steps_per_epoch, config.train.num_epochs,
               total_steps, config.train.batch_size, jax.device_count(),
               jax.process_count())

  state = create_train_state(config, setup.model, init_key, total_steps)
  num_params = sum(x.size for x in jax.tree.leaves(state.params))
  logging.info('UNet parameters: %.2f M', num_params / 1e6)
  mgr = checkpoint_manager(workdir, config.train.checkpoints_to_keep)
  if mgr.latest_step() is not None:
    state = restore_checkpoint(mgr, state)
    logging.info('Resuming from checkpoint at step %d.', int(state.step))
  write_config(config, workdir)
  start_step = int(state.step)
  metadata = {'config': json.loads(config.to_json_best_effort()),
              'git_revision': git_revision(),
              'steps_per_epoch': steps_per_epoch}

  if start_step < total_steps:
    state = _train_loop(config, workdir, setup, state, examples, mgr,
                        train_key, start_step, total_steps, metadata)
  else:
    logging.info('Training already complete (step %d of %d); evaluating.',
                 start_step, total_steps)
  mgr.wait_until_finished()
  mgr.close()
  return evaluate.evaluate(config, workdir, state=state, setup=setup)


def _train_loop(config, workdir, setup, state, examples, mgr, train_key,
                start_step, total_steps, metadata) -> TrainState:
  t = config.train
  step_fn = p_train_step(config, setup.model, setup.schedule,
                         examples.steps_per_epoch)
  state = replicate(state)
  train_keys = replicate(train_key)
  batches = pipeline.train_batches(examples, start_step, total_steps, config)
  batches = jax_utils.prefetch_to_device(batches, config.data.prefetch,
                                         axis_name=AXIS)
  rec = records.Records(workdir, enabled=jax.process_index() == 0)
  progress = records.Progress(start_step, total_steps, t.batch_size)
  lr_fn = learning_rate_schedule(config, total_steps)
  pending, skipped_total = [], 0
  step = start_step
  try:
    for step in range(start_step + 1, total_steps + 1):
      state, metrics = step_fn(state, next(batches), train_keys)
      pending.append(metrics)
      last = step == total_steps
      if step % t.log_every_steps == 0 or last:
        # The only host sync besides checkpoints: fetch the logged metrics.
        fetched = jax.device_get([jax.tree.map(lambda x: x[0], m)
                                  for m in pending])
        pending = []
        skipped = sum(int(m['skipped']) for m in fetched)
        skipped_total += skipped
        streak = int(jax.device_get(state.nonfinite_streak[0]))
        summary = {k: float(np.mean([m[k] for m in fetched]))
                   for k in fetched[0] if k != 'skipped'}
        summary.update(progress.update(step))
        summary.update({'lr': float(lr_fn(step - 1)),
                        'skipped_updates': skipped_total})
        rec.scalars(step, summary)
        logging.info(
            '[%d/%d] epoch %d  loss %.4g (%.4g/px)  sigma %.3f  k %d  lr %.2e'
            '  %.2f steps/s  %.1f img/s  ETA %s%s', step, total_steps,
            summary['epoch'], summary['loss'], summary['loss_per_pixel'],
            summary['sigma'], summary['k_targets'], summary['lr'],
            summary['steps_per_sec'], summary['images_per_sec'],
            records.format_eta(summary['eta_sec']),
            f'  skipped {skipped} non-finite' if skipped else '')
        if streak >= t.max_nonfinite_steps:
          raise FloatingPointError(
              f'{streak} consecutive non-finite losses/gradients at step '
              f'{step}; stopping. The last good checkpoint (step '
              f'{mgr.latest_step()}) is intact in {mgr.directory}.')
      if step % t.checkpoint_every_steps == 0 or last:
        save_checkpoint(mgr, state, dict(metadata,
                                         epoch=step // examples.steps_per_epoch))
  finally:
    rec.close()
  return jax.tree.map(lambda x: x[0], state)
