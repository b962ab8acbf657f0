"""Exponential moving average (EMA) of a model's weights as a Keras callback, with the YOLOX decay ramp.

After optimizer update number u (1, 2, ...) every floating-point weight w of the model (trainable weights and
BatchNormalization moving statistics, as YOLOX's `ModelEMA` averages its whole floating state dict) updates

    ema <- d(u) * ema + (1 - d(u)) * w,      d(u) = decay * (1 - exp(-u / ramp_updates))

starting from ema = the weights when training begins. YOLOX: decay 0.9998, ramp 2000. Integer weights (step
counters, switches) are never averaged.

The update runs on the host after each `fit` call of the train function (a `tf.function`, one call for all
weights), counted with `optimizer.iterations`. With `steps_per_execution = n > 1` Keras reports every n steps, and
the n updates are applied at once with the weights at the end of the execution:
ema <- (prod_i d(u_i)) * ema + (1 - prod_i d(u_i)) * w, exact for n = 1 and a close approximation for small n.

Evaluation and saving see the EMA weights: at the end of the last batch of every epoch (before any callback's
`on_epoch_end` or Keras' validation run, whatever the order of the callback list), the EMA weights are swapped into
the model; the training weights are swapped back before the next training batch. At the end of training the EMA
weights stay in the model (`keep_ema_at_end`), so `model.save_weights` after `fit` writes them, as YOLOX ships
its EMA model. Caveat: `keras.callbacks.BackupAndRestore` saves the model at epoch end, so a run resumed from a
backup continues from the EMA weights and restarts the average from them.
"""

import math

import keras
import tensorflow as tf


def ramp_decay(updates, *, decay=0.9998, ramp_updates=2000.0):
  """The EMA decay after `updates` optimizer steps: decay * (1 - exp(-updates / ramp_updates)). Python floats."""
  return decay * (1.0 - math.exp(-float(updates) / ramp_updates))


class ModelEMA(keras.callbacks.Callback):
  """Keeps an EMA of the model's floating-point weights and swaps it in for evaluation and saving.

  Args:
    decay: float in [0, 1). The asymptotic decay. Defaults to 0.9998.
    ramp_updates: float > 0. Time constant of the warmup ramp, in optimizer steps. Defaults to 2000.
    swap_for_evaluation: bool. Put the EMA weights in the model at the end of every epoch (evaluation callbacks,
      validation and checkpoints then use them). Defaults to True.
    keep_ema_at_end: bool. Leave the EMA weights in the model when training ends. Defaults to True.
  """

  def __init__(self, *, decay=0.9998, ramp_updates=2000.0, swap_for_evaluation=True, keep_ema_at_end=True):
    super().__init__()
    if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not 0.0 <= decay < 1.0:
      raise ValueError(f"decay must be a float in [0, 1), got {decay!r}.")
    if isinstance(ramp_updates, bool) or not isinstance(ramp_updates, (int, float)) or ramp_updates <= 0:
      raise ValueError(f"ramp_updates must be a positive number, got {ramp_updates!r}.")
    self.decay = float(decay)
    self.ramp_updates = float(ramp_updates)
    self.swap_for_evaluation = bool(swap_for_evaluation)
    self.keep_ema_at_end = bool(keep_ema_at_end)
    self._model_weights = None  # the averaged model weights
    self._ema = None  # tf.Variables, one per averaged weight
    self._backup = None  # training weights while the EMA weights are swapped in
    self._built_for = None
    self._last_update = 0
    self.swapped = False

  # === State ===

  def _build(self):
    model = self.model
    if self._built_for is model:
      return
    self._model_weights = [w for w in model.weights if tf.as_dtype(w.dtype).is_floating]
    with tf.init_scope():
      self._ema = [tf.Variable(tf.convert_to_tensor(w), trainable=False, name="ema") for w in self._model_weights]
      self._backup = [tf.Variable(tf.convert_to_tensor(w), trainable=False, name="backup")
                      for w in self._model_weights]
    self._update_fn = tf.function(self._update_all)
    self._swap_in_fn = tf.function(self._swap_in_all)
    self._restore_fn = tf.function(self._restore_all)
    self._built_for = model

  def _update_all(self, factor):
    for ema, w in zip(self._ema, self._model_weights):
      ema.assign(factor * ema + (1.0 - factor) * tf.convert_to_tensor(w))

  def _swap_in_all(self):
    for ema, backup, w in zip(self._ema, self._backup, self._model_weights):
      backup.assign(tf.convert_to_tensor(w))
      w.assign(ema)

  def _restore_all(self):
    for backup, w in zip(self._backup, self._model_weights):
      w.assign(backup)

  @property
  def ema_weights(self):
    """The current EMA values as numpy arrays, in the order of the model's floating-point weights."""
    return [v.numpy() for v in self._ema] if self._ema is not None else []

  def swap_in(self):
    """Puts the EMA weights into the model (the training weights are kept aside). No-op if already swapped."""
    if not self.swapped:
      self._swap_in_fn()
      self.swapped = True

  def restore(self):
    """Puts the training weights back after `swap_in`. No-op if not swapped."""
    if self.swapped:
      self._restore_fn()
      self.swapped = False

  def _iterations(self):
    return int(self.model.optimizer.iterations.numpy())

  # === Callback hooks ===

  def on_train_begin(self, logs=None):
    self._build()
    self.swapped = False
    for ema, w in zip(self._ema, self._model_weights):
      ema.assign(tf.convert_to_tensor(w))
    self._last_update = self._iterations()

  def on_train_batch_begin(self, batch, logs=None):
    self.restore()

  def on_train_batch_end(self, batch, logs=None):
    updates = self._iterations()
    if updates > self._last_update:
      factor = 1.0
      for u in range(self._last_update + 1, updates + 1):
        factor *= ramp_decay(u, decay=self.decay, ramp_updates=self.ramp_updates)
      self._update_fn(tf.constant(factor, tf.float32))
      self._last_update = updates
    steps = (self.params or {}).get("steps")
    if self.swap_for_evaluation and steps and batch + 1 >= steps:
      self.swap_in()

  def on_epoch_begin(self, epoch, logs=None):
    self.restore()

  def on_epoch_end(self, epoch, logs=None):
    if self.swap_for_evaluation:  # Steps per epoch unknown: the callbacks listed before this one saw no EMA.
      self.swap_in()

  def on_train_end(self, logs=None):
    if self.keep_ema_at_end:
      self.swap_in()
      self.swapped = False  # the EMA weights are now the model's weights
    else:
      self.restore()
