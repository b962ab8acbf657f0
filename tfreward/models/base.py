"""The Keras model base every family extends: one train/test/predict step for all of them.

A family implements
  `compute_losses(images, labels, training) -> dict` of unweighted loss terms and logging values. Each value is
      this replica's share of the global-batch value (see `tfreward.ops.distributed`).
  `detect(images) -> dict` (detection) or `segment(images) -> dict` (segmentation), fixed-size outputs.
and lists `loss_weights` (term -> weight; the total is their weighted sum, applied here and nowhere else) and
`log_names` (the keys of `compute_losses` shown in the progress bar).

XLA: under the default strategy the trainer compiles the whole step with `jit_compile=True`, and TPUStrategy
always compiles it. Under MirroredStrategy the step runs as a TensorFlow graph without XLA: Keras 3.15 cannot
jit-compile the mirrored train function (keras-team/keras#19246), and a nested `tf.function(jit_compile=True)`
cannot hold the cross-replica all-reduce that loss normalisers need (MirroredStrategy's all-reduce is a
`merge_call`, which nested functions do not support). The step is the same static-shape graph either way.

Gradient clipping by global norm is applied to the gradient of the global batch (summed over replicas), not to
each replica's part.
"""

import keras
import tensorflow as tf

from tfreward.ops import distributed


class TaskModel(keras.Model):
  """Base class: shared train_step / test_step / predict_step.

  Args:
    image_size: (int, int). Input canvas height and width.
    loss_weights: dict[str, float]. Weight of each loss term in the total.
    clip_norm: float or None. Global-norm gradient clipping over the global batch. Defaults to None.
  """

  log_names = ()

  def __init__(self, *, image_size, loss_weights, clip_norm=None, **kwargs):
    super().__init__(**kwargs)
    self.image_size = tuple(int(s) for s in image_size)
    self.loss_weights = dict(loss_weights)
    self.clip_norm = clip_norm
    names = ("loss",) + tuple(n for n in self.log_names if n != "loss")
    self._trackers = {n: keras.metrics.Mean(name=n) for n in names}

  # === To implement ===

  def compute_losses(self, images, labels, training):
    raise NotImplementedError

  # === Steps ===

  @property
  def metrics(self):
    return list(self._trackers.values())

  def total_loss(self, terms):
    total = tf.add_n([tf.cast(terms[k], tf.float32) * w for k, w in self.loss_weights.items()])
    if self.losses:  # weight regularisers: a global quantity, split evenly over the replicas.
      total += tf.add_n([tf.cast(l, tf.float32) for l in self.losses]) / float(distributed.num_replicas())
    return total

  def compute_gradients(self, images, labels):
    """This replica's share of the loss gradient. Returns (grads, total loss share, terms)."""
    with tf.GradientTape() as tape:
      terms = self.compute_losses(images, labels, training=True)
      total = self.total_loss(terms)
    grads = tape.gradient(total, self.trainable_variables)
    return grads, total, terms

  def clip_gradients(self, grads):
    """Clips the global-batch gradient to `clip_norm`; returns this replica's share of the clipped gradient."""
    if not self.clip_norm:
      return grads
    replicas = distributed.num_replicas()
    present = [g for g in grads if g is not None]
    summed = [distributed.global_sum(g) for g in present] if replicas > 1 else present
    clipped, _ = tf.clip_by_global_norm(summed, self.clip_norm)
    clipped = iter([g / float(replicas) for g in clipped] if replicas > 1 else clipped)
    return [None if g is None else next(clipped) for g in grads]

  def _log(self, total, terms):
    self._trackers["loss"].update_state(distributed.global_sum(total))
    for name in self.log_names:
      if name != "loss":
        self._trackers[name].update_state(distributed.global_sum(tf.cast(terms[name], tf.float32)))
    return {name: tracker.result() for name, tracker in self._trackers.items()}

  def train_step(self, data):
    images, labels, _ = keras.utils.unpack_x_y_sample_weight(data)
    grads, total, terms = self.compute_gradients(images, labels)
    grads = self.clip_gradients(grads)
    self.optimizer.apply(grads, self.trainable_variables)
    return self._log(total, terms)

  def test_step(self, data):
    images, labels, _ = keras.utils.unpack_x_y_sample_weight(data)
    terms = self.compute_losses(images, labels, training=False)
    return self._log(self.total_loss(terms), terms)

  def predict_step(self, data):
    images, _, _ = keras.utils.unpack_x_y_sample_weight(data)
    if hasattr(self, "segment"):
      return self.segment(images)
    return self.detect(images)

  def recipe_callbacks(self, existing=()):
    """Callbacks the family's training recipe needs (e.g. weight EMA), not already in `existing`.

    They go before every other callback, in the trainer and in a plain `model.fit`, so that evaluation, checkpoints
    and logging callbacks see their effect.
    """
    return []

  def fit(self, *args, **kwargs):
    """`keras.Model.fit`, plus the `recipe_callbacks()` missing from the given callbacks (put before them)."""
    args = list(args)
    if len(args) > 5:  # callbacks given positionally: (x, y, batch_size, epochs, verbose, callbacks, ...)
      args[5] = self.recipe_callbacks(args[5] or []) + list(args[5] or [])
    else:
      callbacks = list(kwargs.get("callbacks") or [])
      kwargs["callbacks"] = self.recipe_callbacks(callbacks) + callbacks
    return super().fit(*args, **kwargs)

  def build_for_training(self, optimizer=None):
    """Creates every variable (model and optimizer) from a dummy batch, inside the strategy scope.

    Keras' own symbolic build under a strategy averages the first input batch across replicas, which fails on the
    data contract's bool and int labels; a model built here skips it (see `_maybe_symbolic_build`).
    """
    if not self.built:
      self(tf.zeros([1, *self.image_size, 3], tf.uint8), training=False)
    optimizer = optimizer or getattr(self, "optimizer", None)
    if optimizer is not None and not optimizer.built:
      optimizer.build(self.trainable_variables)

  def _maybe_symbolic_build(self, iterator=None, data_batch=None):
    optimizer = getattr(self, "optimizer", None)
    if self.built and (optimizer is None or optimizer.built):
      return
    super()._maybe_symbolic_build(iterator=iterator, data_batch=data_batch)

  # === Config ===

  def get_config(self):
    return {"image_size": list(self.image_size), "loss_weights": dict(self.loss_weights),
            "clip_norm": self.clip_norm, "name": self.name}
