"""A torn backup falls back to the previous epoch's (double checkpointing); with none to fall back on, and for a
torn weights file, one line says what to do."""

import os

import keras
import pytest

from tfreward import cli
from tfreward.config import load_config
from tfreward.training import trainer


TRAIN = dict(epochs=3, steps_per_epoch=2, steps_per_execution=1, optimizer={"warmup_steps": 1})


class _InterruptAfter(keras.callbacks.Callback):
  """Interrupts training at the start of epoch `epoch`, after the previous epoch's backup was written."""

  def __init__(self, epoch):
    super().__init__()
    self.epoch = epoch

  def on_epoch_begin(self, epoch, logs=None):
    if epoch == self.epoch:
      raise KeyboardInterrupt


def _interrupted_run(tmp_path, config_path, epoch):
  model_dir = str(tmp_path / "run")
  with pytest.raises(KeyboardInterrupt):
    trainer.train(load_config(config_path), model_dir, callbacks=[_InterruptAfter(epoch)], evaluate=False,
                  verbose=0)
  return config_path, model_dir


def _tear(path):
  os.truncate(path, os.path.getsize(path) // 2)


def test_torn_backup_resumes_from_the_previous_epoch(tmp_path, toy_config_file):
  config_path, model_dir = _interrupted_run(tmp_path, toy_config_file(**TRAIN), epoch=2)
  backup = os.path.join(model_dir, "backup")
  assert os.path.exists(os.path.join(backup, "latest.weights.h5.bkp"))  # epoch 1's, kept by double checkpointing
  _tear(os.path.join(backup, "latest.weights.h5"))
  result = trainer.train(load_config(config_path), model_dir, evaluate=False, verbose=0)
  # The torn epoch-2 backup is replaced by epoch 1's: epochs 1 and 2 run again, and the input resumes with them.
  assert len(result.history["loss"]) == 2
  assert int(result.model.optimizer.iterations.numpy()) == 3 * 2


def test_torn_backup_without_a_previous_one_is_one_line(tmp_path, toy_config_file, capsys):
  config_path, model_dir = _interrupted_run(tmp_path, toy_config_file(**TRAIN), epoch=1)
  backup = os.path.join(model_dir, "backup")
  assert not os.path.exists(os.path.join(backup, "latest.weights.h5.bkp"))
  _tear(os.path.join(backup, "latest.weights.h5"))
  assert cli.main(["train", config_path, "--model-dir", model_dir]) == 2
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1 and "unreadable (torn or truncated)" in err and f"remove {backup}" in err, err


def test_torn_weights_file_is_one_line(tmp_path, toy_config_file, capsys):
  config_path = toy_config_file(**TRAIN)
  model_dir = str(tmp_path / "run")
  assert cli.main(["train", config_path, "--model-dir", model_dir, "--no-eval", "--set", "train.epochs=1"]) == 0
  _tear(os.path.join(model_dir, trainer.FINAL_WEIGHTS))
  capsys.readouterr()
  for argv in (["evaluate", "--model-dir", model_dir], ["export", "--model-dir", model_dir]):
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "final.weights.h5 is unreadable" in err, err
