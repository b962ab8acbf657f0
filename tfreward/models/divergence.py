"""In-graph record of the first training step whose loss or gradient went non-finite (NaN or Inf).

Every train step checks the total loss, each logged loss term and the gradient's squared global norm with ONE
all-reduce of a small vector: a NaN or Inf on any replica makes the sum non-finite on every replica, so all replicas
record the same step. The first such step and which of its values were non-finite stay in the monitor's variables
until `reset_state()` (not one of the model's `metrics`: Keras neither resets, logs nor saves it);
`tfreward.training.divergence.StopOnNonFinite` reads them after each execution and stops training before any callback
saves the weights. The check adds no host round-trip to the step.
"""

import keras
import numpy as np
import tensorflow as tf

from tfreward.errors import UserError
from tfreward.ops import distributed

GRADIENT = "gradient"


class NonFiniteError(UserError):
  """NaN or Inf where a number is needed: a diverged training step, weights or a model's outputs. The message names
  what and where, and what to do."""


def nonfinite_weights(model):
  """Paths of `model`'s variables holding a NaN or Inf (read on the host), in `model.weights` order, without the
  model's own name (`conv0/kernel`, not `toy_detector_3/conv0/kernel`)."""
  return [w.path.split("/", 1)[-1] for w in model.weights if not np.all(np.isfinite(w.numpy()))]


def check_finite_weights(model, what):
  """Raises `NonFiniteError` if any of `model`'s weights is NaN or Inf; `what` names the refused action."""
  bad = nonfinite_weights(model)
  if bad:
    raise NonFiniteError(
        f"refusing to {what}: {len(bad)} of the model's {len(model.weights)} weights hold NaN or Inf (first: "
        f"{bad[0]}); the run diverged. Use an earlier checkpoint or retrain with a lower learning rate.")


class DivergenceMonitor(keras.metrics.Metric):
  """`first_step`: int64 scalar, the optimizer step (0-based) of the first non-finite step, -1 while all finite;
  `nonfinite`: float32 [len(names)], 1 for each of `names` (loss terms, then "gradient") non-finite at that step.

  Not a logged metric: `result()` is `first_step`, read by the stopping callback, never shown or saved.
  """

  def __init__(self, names, name="divergence_monitor"):
    super().__init__(name=name)
    self.names = tuple(names) + (GRADIENT,)
    # The flags are all-reduced, so every replica writes the same value: keep the first replica's.
    self.first_step = self.add_variable(shape=(), initializer="zeros", dtype="int64", name="first_step",
                                        aggregation="only_first_replica")
    self.nonfinite = self.add_variable(shape=(len(self.names),), initializer="zeros", dtype="float32",
                                       name="nonfinite", aggregation="only_first_replica")
    self.reset_state()

  def reset_state(self):
    self.first_step.assign(-1)
    self.nonfinite.assign(tf.zeros_like(self.nonfinite))

  def update_state(self, step, terms, grads):
    """`step`: int64 scalar; `terms`: this replica's shares of the loss terms, in `names` order; `grads`: this
    replica's gradients (None entries skipped). Returns the bool scalar "this step was finite"."""
    squares = [tf.reduce_sum(tf.square(tf.cast(g, tf.float32))) for g in grads if g is not None]
    values = tf.stack([tf.cast(t, tf.float32) for t in terms] + [tf.add_n(squares) if squares else tf.zeros([])])
    nonfinite = tf.logical_not(tf.math.is_finite(distributed.global_sum(values)))
    finite = tf.logical_not(tf.reduce_any(nonfinite))
    first = tf.logical_and(self.first_step < 0, tf.logical_not(finite))
    self.first_step.assign(tf.where(first, tf.cast(step, tf.int64), self.first_step))
    self.nonfinite.assign(tf.where(first, tf.cast(nonfinite, tf.float32), self.nonfinite))
    return finite

  def result(self):
    return self.first_step

  def report(self):
    """(first non-finite step, 0-based, or -1; names of the non-finite values at that step), read on the host."""
    step = int(self.first_step.numpy())
    flags = self.nonfinite.numpy()
    return step, [name for name, flag in zip(self.names, flags) if flag]
