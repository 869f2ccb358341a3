"""The compiled predictors: from a batch of images to an ensemble prediction.

One predict function per ``model.kind`` (the diffusion sampler's chains, or
the deterministic UNet's single pass), keyed per case so a case predicts the
same in evaluate, predict and robustness, in any batch and on any device
count; ``cached`` compiles each setting once per ``Setup``.
"""

from typing import Any, Callable, Dict, Sequence
import zlib

import jax
import jax.numpy as jnp
import numpy as np

from spad_jax import diffusion
from spad_jax import train_state
from spad_jax.models import unet

AXIS = train_state.AXIS

# eval.chain_label = 'auto': the label each model answers with is picked on
# its validation split among these (ties go to the first). Which label
# wins changes from model to model (docs/SAMPLING.md: a chain's final p̂
# beats its steps' mean by eight points on one demo model and loses to it
# by one and a half on another), so no fixed choice is right for all.
AUTO = 'auto'
AUTO_CHAIN_LABELS = ('last', 'chain_mean')


def picks_chain_label(config) -> bool:
  """Whether ``config``'s chain label is to be picked on the val split."""
  return (config.model.kind == 'diffusion' and
          config.eval.get('chain_label', 'last') == AUTO)


def with_chain_label(config, label: str):
  """A copy of ``config`` whose chains are labelled ``label``."""
  config = config.copy_and_resolve_references()
  config.eval.chain_label = label
  return config


def sampling_record(config) -> Dict[str, Any]:
  """How predictions were made, as written into metrics.json."""
  if config.model.kind != 'diffusion':
    return {'forward_passes': 1}
  e = config.eval
  return {'num_steps': e.num_steps, 'num_samples': e.num_samples,
          'diffusion_steps': config.diffusion.num_steps,
          'sampler': e.sampler, 'temperature': e.temperature,
          'mode_last': e.mode_last, 'ensemble': e.ensemble,
          'soft_map': e.get('soft_map', 'last'),
          'chain_label': e.get('chain_label', 'last'),
          'ensemble_of': e.get('ensemble_of', 'chain_label'),
          'self_condition': config.model.self_condition}


def case_key_ids(case_ids: Sequence[str]) -> np.ndarray:
  """int32 key data of each case id (CRC-32 of the id, 31 bits): a case's
  chains depend on the seed and its id only, so a case samples the same in
  evaluate and predict (file stem = case id), in any batch, on any device
  count and when resumed."""
  return np.array([zlib.crc32(str(c).encode()) & 0x7FFFFFFF
                   for c in case_ids], np.int32)


def denoiser(model, params) -> Callable:
  """``denoise(x_t one-hot, image, t, p_prev=None) -> p̂`` (float32 softmax,
  whatever dtype the network computes in): what ``diffusion.sample`` calls."""

  def denoise(xt_onehot, image, t, p_prev=None):
    logits = model.apply({'params': params}, xt_onehot, image, t,
                         p_prev=p_prev)
    return jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
  return denoise


def make_predict_fn(config, model, schedule, return_samples: bool = False,
                    candidates: Sequence[str] = ()):
  """pmapped ``(params, images, key, case_ids) -> ensemble``.

  ``params``, ``images`` and ``case_ids`` (``case_key_ids`` of the images'
  cases) are per device; ``key`` is shared. Chain ``j`` of a case uses
  ``fold_in(fold_in(key, case_id), j)``, so an ensemble of N holds the
  chains of every smaller one. Runs ``eval.num_samples`` chains per image
  in one batched call.
  The ensemble has ``soft`` (``eval.ensemble``: the chains' vote, or the
  mean of their soft maps; the vote for ``medoid``), ``prediction`` (its
  argmax, or the medoid chain's labels) and ``entropy`` (of ``soft``), and
  ``prob``: the mean over chains of their soft maps
  (``eval.soft_map``: each chain's final ``p̂``, or the mean of its steps'),
  the soft map calibration is measured on. A chain's label is the argmax of
  its final ``p̂``, or of its soft map (``eval.chain_label``); more than one
  chain combine their labels or their final ``p̂``'s argmax
  (``eval.ensemble_of``). With ``return_samples`` also ``samples``
  ``[B, N, H, W]`` uint8 (the label maps the ensemble combined, for GED and
  variances) and ``chain_labels`` (each chain's own label map: its answer
  alone). With ``candidates`` (chain labels) also ``candidates``
  ``[B, len(candidates), H, W]``: the prediction each label would give, from
  the same chains, so picking among them costs one sampling pass.
  """
  num_classes = config.data.num_classes
  n = config.eval.num_samples
  times = diffusion.time_sequence(config.diffusion.num_steps,
                                  config.eval.num_steps)

  for label in candidates:
    if config.model.kind != 'diffusion' or label not in diffusion.CHAIN_LABELS:
      raise ValueError(
          f'chain label candidate {label!r} (model.kind='
          f'{config.model.kind!r}): only a diffusion model has chains to '
          f'label, with one of {", ".join(diffusion.CHAIN_LABELS)}')
  if config.model.kind == 'deterministic':
    return _make_deterministic_predict_fn(config, model, return_samples)
  rules = sampling_record(config)  # The eval keys with their defaults.
  if rules['chain_label'] == AUTO:
    raise ValueError(
        "eval.chain_label='auto' is a choice made on the validation split "
        '(evaluate.resolve_chain_label) before a sampler is built; resolve '
        f'it first or set one of {", ".join(AUTO_CHAIN_LABELS)}')

  def predict(params, images, key, case_ids):
    b = images.shape[0]
    case_keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(case_ids)
    chain_keys = jax.vmap(lambda j: jax.vmap(
        lambda k: jax.random.fold_in(k, j))(case_keys))(jnp.arange(n))

    denoise = denoiser(model, params)
    tiled = jnp.tile(images, (n, 1, 1, 1))  # n chains of the same images.
    out = diffusion.sample(denoise, tiled, chain_keys.reshape(n * b), schedule,
                           num_classes, times,
                           sampler=config.eval.sampler,
                           temperature=config.eval.temperature,
                           mode_last=config.eval.mode_last,
                           self_condition=config.model.self_condition)
    per_chain = lambda x: x.reshape((n, b) + x.shape[1:])
    probs = per_chain(out['probs' if rules['soft_map'] == 'last'
                          else 'probs_chain_mean'])
    last = per_chain(out['labels'])

    def combine(chain_label):
      """The ensemble, its chains labelled ``chain_label``."""
      if chain_label == 'last':
        labels = last
      else:
        pooled = (probs if chain_label == 'soft_map' else
                  per_chain(out['probs_chain_mean']))
        labels = jnp.argmax(pooled, axis=-1)
      combined = (last if n > 1 and rules['ensemble_of'] == 'last' else
                  labels)
      if config.eval.ensemble == 'mean':
        result = diffusion.mean_ensemble(probs)
      elif config.eval.ensemble == 'medoid':
        result = diffusion.medoid_ensemble(combined, num_classes)
        del result['medoid']  # Every output is per pixel.
      else:
        result = diffusion.ensemble(combined, num_classes)
      return result, labels, combined

    result, labels, combined = combine(rules['chain_label'])
    result['prob'] = jnp.mean(probs, axis=0)
    if return_samples:
      result['samples'] = jnp.moveaxis(combined, 0, 1).astype(jnp.uint8)
      result['chain_labels'] = jnp.moveaxis(labels, 0, 1).astype(jnp.uint8)
    if candidates:
      result['candidates'] = jnp.stack(
          [combine(label)[0]['prediction'] for label in candidates], axis=1)
    return result

  return jax.pmap(predict, axis_name=AXIS, in_axes=(0, 0, None, 0))


def _make_deterministic_predict_fn(config, model, return_samples: bool):
  """One forward pass: the softmax is the soft map. ``samples`` and
  ``chain_labels`` (for GED) repeat the prediction ``eval.num_samples``
  times."""
  n = config.eval.num_samples

  def predict(params, images, key, case_ids):
    del key, case_ids  # Deterministic.
    like = jnp.zeros(images.shape[:3] + (config.data.num_classes,))
    xt, t = unet.fixed_inputs(like)
    logits = model.apply({'params': params}, xt, images, t)
    soft = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    entropy = -jnp.sum(soft * jnp.log(jnp.maximum(soft, diffusion.LOG_EPS)),
                       axis=-1)
    prediction = jnp.argmax(soft, axis=-1)
    result = {'soft': soft, 'prediction': prediction, 'entropy': entropy,
              'prob': soft}
    if return_samples:
      result['samples'] = jnp.repeat(prediction[:, None], n,
                                     axis=1).astype(jnp.uint8)
      result['chain_labels'] = result['samples']
    return result

  return jax.pmap(predict, axis_name=AXIS, in_axes=(0, 0, None, 0))


def cached(config, setup, return_samples: bool = False,
           candidates: Sequence[str] = ()):
  """The compiled sampler of ``setup`` for these settings, made once: the
  validations during training and the final evaluation share it (and its
  compilation)."""
  # Everything make_predict_fn reads; setup fixes the model and schedule.
  key = (return_samples, tuple(candidates), config.data.num_classes,
         config.eval.num_samples,
         tuple(sorted(sampling_record(config).items())))
  if key not in setup.predictors:
    setup.predictors[key] = make_predict_fn(config, setup.model,
                                            setup.schedule, return_samples,
                                            candidates)
  return setup.predictors[key]
