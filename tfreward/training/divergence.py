"""Stops training at the first non-finite loss or gradient, before anything saves the weights.

`StopOnNonFinite` goes first in the trainer's callbacks: after each execution of the train step it reads the model's
`DivergenceMonitor` (`tfreward.models.divergence`) and raises `NonFiniteError`, one line naming the step and the
values that went non-finite. The exception ends `fit` before any `on_epoch_end`, so `checkpoints/`, `backup/` and
`final.weights.h5` keep the last finite epoch's weights (the weights in memory may already be NaN; nothing writes
them). Rerunning the same command resumes from that epoch.
"""

import os

import keras

from tfreward.models.divergence import NonFiniteError


class StopOnNonFinite(keras.callbacks.Callback):
  """Raises `NonFiniteError` after the first execution whose steps include a non-finite loss term or gradient.

  Args:
    model_dir: the run's directory, named in the message (where the last finite checkpoint is), or None.
  """

  def __init__(self, model_dir=None):
    super().__init__()
    self.model_dir = model_dir
    self._epoch = 0

  def on_train_begin(self, logs=None):
    self.model.divergence_monitor.reset_state()

  def on_epoch_begin(self, epoch, logs=None):
    self._epoch = epoch

  def on_train_batch_end(self, batch, logs=None):
    step, names = self.model.divergence_monitor.report()
    if step < 0:
      return
    kept = ""
    if self.model_dir is not None:
      kept = (f" Nothing was saved from epoch {self._epoch + 1} on: {os.path.join(self.model_dir, 'checkpoints')} "
              f"and its backup hold epoch {self._epoch}'s weights" if self._epoch else
              " Nothing was saved: the first epoch had not ended")
      kept += "."
    raise NonFiniteError(
        f"training diverged at step {step + 1} (epoch {self._epoch + 1}): {', '.join(names)} went non-finite (NaN "
        f"or Inf).{kept} Lower train.optimizer.learning_rate, set train.optimizer.clip_norm, or check the data "
        "for bad boxes or labels.")
