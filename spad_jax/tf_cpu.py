"""Imports TensorFlow for host-side work only (tf.data, TensorBoard)."""


def import_tensorflow():
  """Returns the ``tensorflow`` module with GPUs hidden from it, so TF never
  takes accelerator memory that JAX needs. Raises ImportError if absent."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  try:
    tf.config.set_visible_devices([], 'GPU')
  except RuntimeError:
    pass  # Already initialised by an earlier call, which hid them.
  return tf
