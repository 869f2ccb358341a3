"""The train state and its persistence: what training, evaluation and
prediction share, with no import of train or evaluate (DESIGN §5 layers).

- ``AXIS``: the one mesh-axis name of every pmap (a mismatch once cost 10×
  per step, see ``replicate``);
- ``TrainState``, the optimizer and its learning-rate schedule,
  create/abstract state;
- replicate/unreplicate across the local devices;
- checkpoints: save, restore, which one to load (``load_eval_state``);
- ``Setup``: model, schedule and keys, built once from the config.
"""

import dataclasses
import os
import subprocess
from typing import Any, Callable, Dict, Optional

from absl import logging
from flax import jax_utils
from flax import struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp

from spad_jax import diffusion
from spad_jax import timesteps
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
      enable_async_checkpointing=True,
      # Orbax names its cross-process barriers by step only: both managers
      # saving the same step (a validation on a checkpoint step) then join
      # one barrier twice and a multi-process run deadlocks ("Barrier
      # _async_write_complete.8 is already ongoing").
      multiprocessing_options=ocp.options.MultiprocessingOptions(
          barrier_sync_key_prefix=folder))
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


def load_eval_state(config, workdir, setup):
  """The checkpoint ``eval.checkpoint`` picks (best by val mDice or latest)
  of ``workdir``, as an unreplicated TrainState."""
  kind = resolve_checkpoint(config, workdir)
  mgr = checkpoint_manager(workdir, config.train.checkpoints_to_keep,
                           kind=kind)
  if mgr.latest_step() is None:
    raise FileNotFoundError(f'no checkpoint in {mgr.directory}; train first '
                            '(--mode=train)')
  logging.info('Loading the %s checkpoint: step %d of %s.', kind,
               mgr.latest_step(), mgr.directory)
  state = restore_checkpoint(mgr, abstract_train_state(config, setup.model))
  mgr.close()
  return state


def git_revision() -> str:
  try:
    return subprocess.run(['git', 'rev-parse', 'HEAD'], capture_output=True,
                          text=True, timeout=5, check=True,
                          cwd=os.path.dirname(os.path.abspath(__file__))
                          ).stdout.strip()
  except (OSError, subprocess.SubprocessError):
    return 'unknown'


@dataclasses.dataclass
class Setup:
  """What training and evaluation share, built once from the config."""
  model: unet.UNet
  schedule: diffusion.Schedule
  root_key: jax.Array
  # Compiled samplers by settings (predictors.cached fills it).
  predictors: Dict[Any, Any] = dataclasses.field(default_factory=dict)

  @classmethod
  def from_config(cls, config) -> 'Setup':
    return cls(model=unet.create_model(config),
               schedule=diffusion.make_schedule(config.diffusion.num_steps,
                                                config.diffusion.cosine_s),
               root_key=jax.random.key(config.seed))

  def keys(self):
    """(init, train, eval) keys, fixed by the seed."""
    return jax.random.split(self.root_key, 3)


def use_compilation_cache(setting: str, out_dir: str) -> None:
  """JAX's persistent compilation cache for drivers of many runs (runs that
  differ only in seed then compile once): ``setting`` is a folder, ``'auto'``
  (``<out_dir>/.jax_cache``) or ``''`` (off)."""
  if not setting:
    return
  folder = os.path.join(out_dir, '.jax_cache') if setting == 'auto' else setting
  jax.config.update('jax_compilation_cache_dir', os.path.abspath(folder))
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.5)
