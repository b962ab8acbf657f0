"""Reward statistics during reward tuning, in the progress bar and in TensorBoard.

The model computes the statistics inside its train step (replica shares summed over replicas into Keras `Mean`
trackers, reset every epoch) and exposes their running epoch means as `model.reward_statistics()`:

  reward        mean detection reward of all sampled sequences (mean over the distinct IoU thresholds)
  reward_50 ... reward at each distinct IoU threshold (reward_50 = IoU > 0.5, ..., reward_95)
  num_matches   matched ground-truth boxes per sample (mean over thresholds)
  nms_penalty   class weight of duplicate boxes per sample, before the `nms_w` factor (mean over thresholds)

This callback copies them into the batch and epoch `logs` (so the progress bar, History and callbacks after it, such
as Keras' TensorBoard at epoch level, see them) and writes batch-level scalars `reward/<name>` to `log_dir`.
"""

import keras
import tensorflow as tf

from tfreward.errors import check_int


class RewardStatsCallback(keras.callbacks.Callback):
  """Logs `model.reward_statistics()` to the progress bar and TensorBoard.

  Args:
    log_dir: optional str. Directory of a TensorBoard event file for batch-level scalars; None writes none. Defaults
      to None.
    update_freq: int >= 1. Write the scalars every `update_freq` batches (train-function calls). Defaults to 1.
    progress_bar: bool. Add the statistics to the batch logs, shown by the progress bar. Defaults to True.
  """

  def __init__(self, log_dir=None, *, update_freq=1, progress_bar=True):
    super().__init__()
    if log_dir is not None and not isinstance(log_dir, str):
      raise ValueError(f"log_dir must be a str or None, got {log_dir!r}.")
    check_int("update_freq", update_freq)
    self.log_dir = log_dir
    self.update_freq = update_freq
    self.progress_bar = bool(progress_bar)
    self._writer = None
    self._batches = 0

  def _statistics(self):
    if not hasattr(self.model, "reward_statistics"):
      raise ValueError(f"RewardStatsCallback needs a model with reward_statistics(), got {self.model!r}.")
    return self.model.reward_statistics()

  def on_train_begin(self, logs=None):
    self._statistics()  # fails early on a model without statistics
    if self.log_dir is not None and self._writer is None:
      self._writer = tf.summary.create_file_writer(self.log_dir)

  def on_train_batch_end(self, batch, logs=None):
    stats = self._statistics()
    if self.progress_bar and logs is not None:
      logs.update(stats)
    self._batches += 1
    if self._writer is not None and stats and self._batches % self.update_freq == 0:
      step = int(self.model.optimizer.iterations.numpy()) if self.model.optimizer is not None else self._batches
      with self._writer.as_default(step=step):
        for name, value in stats.items():
          tf.summary.scalar(f"reward/{name}", value)
      self._writer.flush()

  def on_epoch_end(self, epoch, logs=None):
    if logs is not None:
      logs.update(self._statistics())

  def on_train_end(self, logs=None):
    if self._writer is not None:
      self._writer.close()
      self._writer = None
