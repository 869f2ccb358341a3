"""Training: TrainState, the pmapped SPAD/CCDM train step, the loop, checkpoints.

Keys are explicit: every example draws its time step, noisy label and image
noise from ``fold_in(fold_in(train_key, step), global_example_index)``, so a
step gives the same numbers on 1 or many devices for the same global batch.
"""

import dataclasses
import json
import os
import signal
import subprocess
import threading
import time
from typing import Any, Callable, Dict, Optional

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
from spad_jax import timesteps
from spad_jax.data import pipeline
from spad_jax.data import sources
from spad_jax.models import unet

AXIS = 'batch'
INIT_COMPILER_OPTIONS = {'xla_backend_optimization_level': 0}


@struct.dataclass
class TrainState:
  step: jnp.ndarray  # int32 scalar: optimizer updates applied so far.
  params: Any
  ema_params: Any
  opt_state: Any
  nonfinite_streak: jnp.ndarray  # Consecutive skipped (non-finite) updates.
  tx: optax.GradientTransformation = struct.field(pytree_node=False)
  # Per-t loss history of importance sampling (timesteps.py); None otherwise.
  loss_history: Optional[Dict[str, jnp.ndarray]] = None

  def checkpoint_items(self) -> Dict[str, Any]:
    items = {'step': self.step, 'params': self.params,
             'ema_params': self.ema_params, 'opt_state': self.opt_state,
             'nonfinite_streak': self.nonfinite_streak}
    if self.loss_history is not None:
      items['loss_history'] = self.loss_history
    return items

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


def _init_params_fn(config, model: unet.UNet) -> Callable:
  size, c, k = (config.data.image_size, config.data.channels,
                config.data.num_classes)
  return lambda key: model.init(
      key, jnp.zeros((1, size, size, k)), jnp.zeros((1, size, size, c)),
      jnp.zeros((1,), jnp.int32))['params']


def _state_from_params(config, params, total_steps: int) -> TrainState:
  tx = create_optimizer(config, total_steps)
  history = None
  if (config.model.kind == 'diffusion' and
      config.diffusion.t_sampling == 'importance'):
    history = timesteps.init_history(config.diffusion.num_steps,
                                     config.diffusion.importance_history)
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    ema_params=params, opt_state=tx.init(params),
                    nonfinite_streak=jnp.zeros((), jnp.int32), tx=tx,
                    loss_history=history)


def create_train_state(config, model: unet.UNet, key: jax.Array,
                       total_steps: int) -> TrainState:
  init = jax.jit(_init_params_fn(config, model))
  # Run once, so on CPU compile without backend optimisation: 2.6 s instead
  # of 9.4 s for the test UNet; the parameters differ from an optimised
  # compile's in the last bit of ~4 % of the values (tests/test_train.py).
  # Other backends keep their defaults (not measured there).
  options = INIT_COMPILER_OPTIONS if jax.default_backend() == 'cpu' else None
  params = init.lower(key).compile(compiler_options=options)(key)
  return _state_from_params(config, params, total_steps)


def abstract_train_state(config, model: unet.UNet) -> TrainState:
  """The TrainState's structure with shapes only: a restore target that
  costs no compilation or initialisation (loading for evaluate/predict)."""
  init = _init_params_fn(config, model)
  return jax.eval_shape(
      lambda key: _state_from_params(config, init(key), 1),
      jax.random.key(0))


def ema_decay_at(step, decay: float):
  """EMA decay with warm-up ``min(decay, (1+n)/(10+n))``: early averages are not
  dominated by the random initialisation on short runs."""
  n = jnp.asarray(step, jnp.float32)
  return jnp.minimum(decay, (1.0 + n) / (10.0 + n))


def sigma_at(epoch, spad_cfg):
  """σ(e) (PaS) or the constant σ0 when PaS is off; a Python float for a
  Python epoch (host side), traced inside the train step."""
  if spad_cfg.pas:
    return perturb.pas_sigma(epoch, spad_cfg.sigma0, spad_cfg.pas_lambda)
  return float(spad_cfg.sigma0)


def soft_dice_loss(x0_onehot: jnp.ndarray, p_hat: jnp.ndarray) -> jnp.ndarray:
  """Per-example ``1 − mean_c 2Σp̂g/(Σp̂+Σg)`` over foreground classes ``c``
  (a class absent from label and prediction counts as a perfect match)."""
  axes = tuple(range(1, x0_onehot.ndim - 1))
  g, p = x0_onehot[..., 1:], p_hat[..., 1:]
  inter = jnp.sum(g * p, axis=axes)
  total = jnp.sum(g + p, axis=axes)
  dice = (2.0 * inter + 1e-6) / (total + 1e-6)
  return 1.0 - jnp.mean(dice, axis=-1)


def make_train_step(config, model: unet.UNet, schedule: diffusion.Schedule,
                    steps_per_epoch: int) -> Callable:
  """The per-device step; wrap with ``jax.pmap(axis_name=AXIS)``.

  ``model.kind='diffusion'``: the loss of DESIGN §1 (``diffusion.ce_lambda =
  0``) or the hybrid ``L_t + λ·w(t)·CE``, at times drawn by
  ``diffusion.t_sampling``. ``model.kind='deterministic'``: the same UNet
  with ``x_t`` and ``t`` fixed (``unet.fixed_inputs``), trained with the
  per-pixel CE + ``train.dice_weight``·soft Dice.
  """
  num_classes = config.data.num_classes
  num_t = config.diffusion.num_steps
  spad_cfg = config.spad
  perturbs = spad_cfg.scd or spad_cfg.bcd
  deterministic = config.model.kind == 'deterministic'
  sampler = config.diffusion.t_sampling
  ce_lambda = float(config.diffusion.ce_lambda)
  ce_weighting = config.diffusion.ce_weighting
  global_batch = config.train.batch_size

  def example_noise(key, x0_onehot, t_given):
    k_t, k_x, k_eps = jax.random.split(key, 3)
    t = timesteps.uniform(k_t, num_t) if t_given is None else t_given
    xt = diffusion.sample_categorical(
        k_x, diffusion.q_probs(x0_onehot, t, schedule))
    return t, xt, k_eps

  def draw_times(state, step_key, keys, first, per_device):
    """(t [per_device] or None for per-example uniform draws, loss weights,
    importance probabilities or None)."""
    if sampler == 'stratified':
      t_all = timesteps.stratified(jax.random.fold_in(step_key, 1 << 29),
                                   global_batch, num_t)
      return jax.lax.dynamic_slice(t_all, (first,), (per_device,)), 1.0, None
    if sampler == 'importance':
      probs = timesteps.importance_probs(state.loss_history,
                                         config.diffusion.importance_uniform)
      # Own key per example (not k_t), so uniform draws before the switch
      # and importance draws after it are independent of x_t's key.
      t = jax.vmap(lambda k: timesteps.draw(jax.random.fold_in(k, 7), probs))(
          keys)
      return t, timesteps.importance_weight(t, probs), probs
    return None, 1.0, None

  def train_step(state: TrainState, batch, train_key):
    per_device = batch['label'].shape[0]
    step_key = jax.random.fold_in(train_key, state.step)
    first = jax.lax.axis_index(AXIS) * per_device
    keys = jax.vmap(lambda i: jax.random.fold_in(step_key, i))(
        first + jnp.arange(per_device))
    epoch = state.step // steps_per_epoch

    x0 = jax.nn.one_hot(batch['label'], num_classes, dtype=jnp.float32)
    if deterministic:
      t_given, weight, probs = None, 1.0, None
    else:
      t_given, weight, probs = draw_times(state, step_key, keys, first,
                                          per_device)
    if deterministic:
      eps_keys = jax.vmap(lambda k: jax.random.split(k, 3)[2])(keys)
      xt_onehot, t = unet.fixed_inputs(x0)
    else:
      t, xt, eps_keys = jax.vmap(
          example_noise, in_axes=(0, 0, None if t_given is None else 0))(
              keys, x0, t_given)
      xt_onehot = jax.nn.one_hot(xt, num_classes, dtype=jnp.float32)
    image = batch['image']
    sigma = sigma_at(epoch, spad_cfg)
    if perturbs:
      mask = perturb.union_mask(batch['scd_bits'], batch['bcd_bits'],
                                batch['label'].shape)
      image = jax.vmap(perturb.perturb_image, in_axes=(0, 0, None, 0))(
          image, mask, sigma, eps_keys)
    dropout_key = jax.random.fold_in(step_key, 1 << 30)
    dropout_key = jax.random.fold_in(dropout_key, jax.lax.axis_index(AXIS))

    def loss_fn(params):
      logits = model.apply({'params': params}, xt_onehot, image, t, train=True,
                           rngs={'dropout': dropout_key})
      p_hat = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
      if deterministic:
        pixels = x0.shape[1] * x0.shape[2]
        per_example = (diffusion.cross_entropy(x0, p_hat) / pixels +
                       config.train.dice_weight * soft_dice_loss(x0, p_hat))
      else:
        per_example = diffusion.hybrid_loss(x0, xt_onehot, p_hat, t, schedule,
                                            ce_lambda, ce_weighting)
      return jnp.mean(weight * per_example), per_example

    (loss, per_example), grads = jax.value_and_grad(
        loss_fn, has_aux=True)(state.params)
    grads = jax.lax.pmean(grads, AXIS)
    loss = jax.lax.pmean(loss, AXIS)
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

    updates, new_opt = state.tx.update(grads, state.opt_state, state.params)
    new_params = optax.apply_updates(state.params, updates)
    decay = ema_decay_at(state.step, config.train.ema_decay)
    new_ema = jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p,
                           state.ema_params, new_params)
    # A non-finite loss or gradient skips the update (counted and reported).
    keep = lambda new, old: jax.tree.map(
        lambda n, o: jnp.where(finite, n, o), new, old)
    history = state.loss_history
    extra = {}
    if probs is not None:
      # Every device records the whole global batch in the same order, so
      # the replicated histories stay identical.
      history = timesteps.update_history(
          history, jax.lax.all_gather(t, AXIS).reshape(-1),
          jax.lax.all_gather(per_example, AXIS).reshape(-1))
      extra['importance_active'] = timesteps.history_ready(
          state.loss_history).astype(jnp.int32)
    new_state = state.replace(
        step=state.step + 1,
        params=keep(new_params, state.params),
        ema_params=keep(new_ema, state.ema_params),
        opt_state=keep(new_opt, state.opt_state),
        nonfinite_streak=jnp.where(finite, 0, state.nonfinite_streak + 1),
        loss_history=history)
    pixels = x0.shape[1] * x0.shape[2]
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


def unreplicate(tree):
  """This process's first device's copy of a replicated tree.

  ``x[0]`` on a pmapped array is a global gather every process must join;
  a copy on a local device is not (measured: ``x[0]`` deadlocked a
  2-process run in the checkpoint save).
  """
  return jax.tree.map(
      lambda x: x.addressable_data(0).reshape(x.shape[1:]), tree)


# ----------------------------------------------------------------- checkpoints


def checkpoint_manager(workdir: str, keep: int,
                       kind: str = 'latest') -> ocp.CheckpointManager:
  """The last ``keep`` checkpoints (``checkpoints/``) or, with
  ``kind='best'``, the one best by validation mDice (``best_checkpoint/``).

  Orbax writes each step to a temporary folder and renames it when complete,
  so a process killed mid-write leaves the previous checkpoints intact.
  """
  folder = {'latest': 'checkpoints', 'best': 'best_checkpoint'}[kind]
  options = ocp.CheckpointManagerOptions(
      max_to_keep=keep if kind == 'latest' else 1, create=True,
      enable_async_checkpointing=True)
  return ocp.CheckpointManager(os.path.join(os.path.abspath(workdir), folder),
                               options=options)


def checkpoint_metadata(mgr: ocp.CheckpointManager, step: int) -> Dict:
  """What ``save_checkpoint`` stored with ``step`` (config, epoch, ...)."""
  return dict(mgr.metadata(step).custom_metadata or {})


def resolve_checkpoint(config, workdir: str) -> str:
  """'best' or 'latest' for ``eval.checkpoint`` (see configs/default.py)."""
  choice = config.eval.checkpoint
  has_best = os.path.isdir(os.path.join(workdir, 'best_checkpoint')) and any(
      d.isdigit() for d in os.listdir(os.path.join(workdir,
                                                   'best_checkpoint')))
  if choice == 'best' and not has_best:
    raise FileNotFoundError(
        f'eval.checkpoint=best but {workdir}/best_checkpoint holds none (the '
        'run never validated: train.eval_every_epochs); use '
        '--config.eval.checkpoint=latest')
  if choice == 'auto':
    return 'best' if has_best else 'latest'
  return choice


def save_checkpoint(mgr: ocp.CheckpointManager, state: TrainState,
                    metadata: Dict[str, Any]) -> None:
  """Saves the replicated state (device 0's copy, fetched to host).

  Every process calls this (orbax coordinates them). ``metadata`` (config,
  epoch, git revision, ...) goes inside the checkpoint, committed with it:
  ``<step>/_CHECKPOINT_METADATA``, JSON, key ``custom_metadata``.
  """
  items = jax.device_get(unreplicate(state.checkpoint_items()))
  step = int(items['step'])
  mgr.save(step, args=ocp.args.StandardSave(items), force=True,
           custom_metadata=dict(metadata, step=step))


def restore_checkpoint(mgr: ocp.CheckpointManager, state: TrainState,
                       step=None) -> TrainState:
  """Restores onto the structure of an unreplicated ``state`` (arrays or
  ``jax.ShapeDtypeStruct`` leaves, see ``abstract_train_state``)."""
  step = mgr.latest_step() if step is None else step
  target = jax.tree.map(lambda x: np.zeros(x.shape, x.dtype),
                        state.checkpoint_items())
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
               root_key=jax.random.key(config.seed))

  def keys(self):
    """(init, train, eval) keys, fixed by the seed."""
    return jax.random.split(self.root_key, 3)


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
    changed = sorted(_flat_diff(old, new))
    stamp = time.strftime('%Y%m%d-%H%M%S')
    path = os.path.join(workdir, f'config.{stamp}.json')
    logging.warning('Config differs from the one this workdir was started '
                    'with, in %s; saving it as %s', ', '.join(changed), path)
  with open(path + '.tmp', 'w') as f:
    json.dump(new, f, indent=1, sort_keys=True)
  os.replace(path + '.tmp', path)


def _flat_diff(a, b, prefix=''):
  keys = set(a) | set(b) if isinstance(a, dict) and isinstance(b, dict) else ()
  if not keys:
    return [prefix.rstrip('.')] if a != b else []
  out = []
  for k in keys:
    out += _flat_diff(a.get(k), b.get(k), f'{prefix}{k}.')
  return out


def train(config: ml_collections.ConfigDict, workdir: str):
  """Trains, resuming from ``workdir`` if it holds checkpoints.

  Returns ``(state, setup, complete)``: the unreplicated final state and
  whether training reached its last step (False after
  ``train.max_steps_per_run`` or SIGTERM; run again to resume).
  """
  os.makedirs(workdir, exist_ok=True)
  setup = Setup.from_config(config)
  init_key, train_key, _ = setup.keys()
  local_devices = jax.local_device_count()

  source = sources.load_split(config, 'train')
  val_source = (sources.load_split(config, 'val')
                if config.train.eval_every_epochs else None)
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
  best_mgr = checkpoint_manager(workdir, 1, kind='best')
  if mgr.latest_step() is not None:
    state = restore_checkpoint(mgr, state)
    logging.info('Resuming from checkpoint at step %d.', int(state.step))
  write_config(config, workdir)
  start_step = int(state.step)
  metadata = {'config': json.loads(config.to_json_best_effort()),
              'git_revision': git_revision(),
              'steps_per_epoch': steps_per_epoch}
  complete = start_step >= total_steps
  if not complete:
    state, complete = _train_loop(config, workdir, setup, state, examples,
                                  val_source, mgr, best_mgr, train_key,
                                  start_step, total_steps, metadata)
  else:
    logging.info('Training already complete (step %d of %d).', start_step,
                 total_steps)
  for m in (mgr, best_mgr):
    m.wait_until_finished()
    m.close()
  return state, setup, complete


def train_and_evaluate(config: ml_collections.ConfigDict,
                       workdir: str) -> Optional[Dict[str, Any]]:
  """Trains, then evaluates ``eval.split``; None when stopped early."""
  from spad_jax import evaluate  # pylint: disable=g-import-not-at-top
  state, setup, complete = train(config, workdir)
  if not complete:
    logging.info('Stopped at step %d before the end; run the same command '
                 'again to resume.', int(state.step))
    return None
  # The final state is the latest checkpoint; evaluate() loads the best one
  # itself when eval.checkpoint resolves to 'best'.
  if resolve_checkpoint(config, workdir) == 'best':
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
  value = checkpoint_metadata(best_mgr, step).get('val', {}).get('mDice')
  return -np.inf if value is None else float(value)


def validate(config, workdir, setup, state, val_source, step: int,
             rec: records.Records, predict) -> Dict[str, Any]:
  """Samples the val split with the EMA parameters; logs mIoU/mDice and a
  grid (``val_grid.png`` and TensorBoard)."""
  from spad_jax import evaluate  # pylint: disable=g-import-not-at-top
  from spad_jax import metrics as metrics_lib  # pylint: disable=g-import-not-at-top
  ema = unreplicate(state.ema_params)
  run = evaluate.sample_split(config, ema, setup, val_source,
                              num_shown=config.eval.num_grid_cases,
                              predict=predict)
  result = metrics_lib.summarize_confusion(run['confusion'],
                                           list(val_source.class_names))
  summary = {'val_mIoU': result['mIoU'], 'val_mDice': result['mDice'],
             'val_seconds': run['seconds']}
  rec.scalars(step, {k: (np.nan if v is None else v)
                     for k, v in summary.items()})
  if jax.process_index() == 0:
    shown = run['shown']
    grid = evaluate.grid_png(shown['images'], shown['labels'], shown['preds'],
                             None, config.data.num_classes,
                             os.path.join(workdir, 'val_grid.png'),
                             scale=max(1, 128 // config.data.image_size))
    rec.image(step, 'val/image_label_prediction', grid)
  logging.info('[%d] validation: mIoU %s  mDice %s  (%d cases, %.1f s)', step,
               _fmt(result['mIoU']), _fmt(result['mDice']), len(val_source),
               run['seconds'])
  return result


def _fmt(x) -> str:
  return 'n/a' if x is None else f'{x:.4f}'


def _train_loop(config, workdir, setup, state, examples, val_source, mgr,
                best_mgr, train_key, start_step, total_steps, metadata):
  """Returns ``(unreplicated state, complete)``."""
  t = config.train
  spe = examples.steps_per_epoch
  step_fn = p_train_step(config, setup.model, setup.schedule, spe)
  predict = None
  if val_source is not None:
    from spad_jax import evaluate  # pylint: disable=g-import-not-at-top
    predict = evaluate.make_predict_fn(config, setup.model, setup.schedule)
  eval_every = t.eval_every_epochs * spe
  best = _best_val_mdice(best_mgr)
  stop_at = total_steps
  if t.max_steps_per_run:
    stop_at = min(total_steps, start_step + t.max_steps_per_run)
  state = replicate(state)
  train_keys = replicate(train_key)
  batches = pipeline.train_batches(examples, start_step, stop_at, config)
  batches = jax_utils.prefetch_to_device(batches, config.data.prefetch,
                                         axis_name=AXIS)
  rec = records.Records(workdir, enabled=jax.process_index() == 0)
  progress = records.Progress(start_step, stop_at, t.batch_size)
  lr_fn = learning_rate_schedule(config, total_steps)
  pending, skipped_total = [], 0
  importance_on = None  # Logged when importance sampling switches on.
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
          # The only host sync besides checkpoints: fetch the logged metrics.
          fetched = jax.device_get([unreplicate(m) for m in pending])
          pending = []
          skipped = sum(int(m['skipped']) for m in fetched)
          skipped_total += skipped
          streak = int(jax.device_get(unreplicate(state.nonfinite_streak)))
          summary = {k: float(np.mean([m[k] for m in fetched]))
                     for k in fetched[0] if k != 'skipped'}
          summary.update(progress.update(step))
          summary.update({'lr': float(lr_fn(step - 1)),
                          'skipped_updates': skipped_total})
          rec.scalars(step, summary)
          logging.info(
              '[%d/%d] epoch %d  loss %.4g (%.4g/px)  sigma %.3f  k %d  lr '
              '%.2e  %.2f steps/s  %.1f img/s  ETA %s%s', step, total_steps,
              summary['epoch'], summary['loss'], summary['loss_per_pixel'],
              summary['sigma'], summary['k_targets'], summary['lr'],
              summary['steps_per_sec'], summary['images_per_sec'],
              records.format_eta(summary['eta_sec']),
              f'  skipped {skipped} non-finite' if skipped else '')
          active = summary.get('importance_active')
          if active is not None and bool(active) != importance_on:
            importance_on = bool(active)
            logging.info(
                '[%d] timestep sampling: %s', step,
                'importance sampling is on (every t has %d recorded losses)'
                % config.diffusion.importance_history if importance_on else
                'uniform until every t has %d recorded losses (%d t values)'
                % (config.diffusion.importance_history,
                   config.diffusion.num_steps))
          if streak >= t.max_nonfinite_steps:
            raise FloatingPointError(
                f'{streak} consecutive non-finite losses/gradients at step '
                f'{step}; stopping. The last good checkpoint (step '
                f'{mgr.latest_step()}) is intact in {mgr.directory}.')
        meta = dict(metadata, epoch=step // spe)
        if step % t.checkpoint_every_steps == 0 or stopping:
          save_checkpoint(mgr, state, meta)
        if eval_every and (step % eval_every == 0 or step == total_steps):
          result = validate(config, workdir, setup, state, val_source, step,
                            rec, predict)
          value = result['mDice']
          if value is not None and value > best:
            best = value
            save_checkpoint(best_mgr, state, dict(meta, val=result))
            logging.info('New best val mDice %.4f at step %d (%s).', value,
                         step, best_mgr.directory)
          # Validation time is not training time.
          progress.update(step)
        if stopping:
          break
    finally:
      rec.close()
  return unreplicate(state), step >= total_steps


def _any_process(flag: bool) -> bool:
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return bool(np.any(multihost_utils.process_allgather(np.int32(flag))))
