"""Across worker processes: who writes, where the others write, where a resumed run restarts.

Keras' multi-worker conventions: every worker runs the same callbacks (a save may need every worker), but only the
chief's files are kept; the others write into temporary directories that are removed at the end. Every worker
resumes from the chief's backup, so all restart at the same epoch (the model directory must be shared, e.g. a GCS
bucket, when the workers are on different hosts).
"""

import hashlib
import json
import logging
import os
import shutil
import tempfile

import h5py
import keras
import numpy as np

from tfreward import strategy as strategies
from tfreward.errors import UserError

_LOG = logging.getLogger(__name__)
METADATA = "training_metadata.json"  # keras.callbacks.BackupAndRestore's epoch record


def write_dir(model_dir, strategy):
  """Where this process writes: `model_dir` for the chief, a new temporary directory for any other worker."""
  if strategies.is_chief(strategy):
    return model_dir
  return tempfile.mkdtemp(prefix=f"tfreward-worker{strategies.worker_index(strategy)}-")


def remove_write_dir(path, model_dir):
  """Removes a non-chief worker's temporary directory (never `model_dir`)."""
  if os.path.abspath(path) != os.path.abspath(model_dir):
    shutil.rmtree(path, ignore_errors=True)


def _readable(weights_path, metadata_path):
  """Whether a backup's weights file opens as HDF5 with every object listed, and its metadata parses."""
  try:
    with h5py.File(weights_path, "r") as f:
      f.visit(lambda name: None)
    if os.path.exists(metadata_path):
      with open(metadata_path) as f:
        int(json.load(f)["epoch"])
    return True
  except (OSError, ValueError, KeyError, TypeError):
    return False


def restore_point(backup_dir, *, repair):
  """The epoch a run resumed from `backup_dir` starts at, after checking the backup can be read.

  A torn `latest.weights.h5` (or metadata), e.g. a write cut short, falls back to the previous epoch's backup that
  double checkpointing keeps (`*.bkp`); with `repair` (the chief) the previous files are copied over the torn ones,
  which is what Keras' BackupAndRestore then loads. Raises UserError if neither can be read."""
  weights, metadata = os.path.join(backup_dir, "latest.weights.h5"), os.path.join(backup_dir, METADATA)
  if not os.path.exists(weights) or _readable(weights, metadata):
    return _epoch(metadata)
  previous = (f"{weights}.bkp", f"{metadata}.bkp")
  if os.path.exists(previous[0]) and _readable(*previous):
    if repair:
      shutil.copyfile(previous[0], weights)
      if os.path.exists(previous[1]):
        shutil.copyfile(previous[1], metadata)
      elif os.path.exists(metadata):
        os.remove(metadata)
    _LOG.warning("The backup %s is unreadable (torn); resuming from the previous epoch's backup.", weights)
    return _epoch(previous[1])
  raise UserError(f"the backup {weights} is unreadable (torn or truncated) and no earlier backup can be read: "
                  f"remove {backup_dir} to restart the run from epoch 0, or train with --overwrite.")


def _epoch(metadata_path):
  """The epoch recorded in a BackupAndRestore metadata file (0 if it does not exist)."""
  if not os.path.exists(metadata_path):
    return 0
  with open(metadata_path) as f:
    return int(json.load(f)["epoch"])


def weights_sha256(model):
  """A fingerprint of the model's weights (hex sha256 of their bytes): equal on workers in sync."""
  digest = hashlib.sha256()
  for weight in model.get_weights():
    digest.update(np.ascontiguousarray(weight).tobytes())
  return digest.hexdigest()


class WorkerBackupAndRestore(keras.callbacks.BackupAndRestore):
  """`BackupAndRestore` that restores every worker from `restore_dir` (the chief's backup) and saves into
  `backup_dir` (the chief's own, or a worker's temporary one). Double checkpointing keeps the previous epoch's
  backup beside the latest (`*.bkp`), so a torn latest falls back to it (`restore_point`)."""

  def __init__(self, backup_dir, restore_dir=None):
    super().__init__(backup_dir, double_checkpoint=True)
    self.restore_dir = restore_dir or backup_dir

  def _paths(self):
    # Private attributes of keras.callbacks.BackupAndRestore (Keras 3.15), which reads and writes the same paths.
    return (self._weights_path, self._training_metadata_path, self._prev_weights_path,
            self._prev_training_metadata_path)

  def on_train_begin(self, logs=None):
    own = self._paths()
    weights = os.path.join(self.restore_dir, "latest.weights.h5")
    metadata = os.path.join(self.restore_dir, METADATA)
    self._weights_path, self._training_metadata_path = weights, metadata
    self._prev_weights_path, self._prev_training_metadata_path = f"{weights}.bkp", f"{metadata}.bkp"
    try:
      super().on_train_begin(logs)
    finally:
      (self._weights_path, self._training_metadata_path, self._prev_weights_path,
       self._prev_training_metadata_path) = own
