"""A non-finite loss or gradient stops training at once, in one line, and the last finite files stay as they were."""

import hashlib
import os

import keras
import numpy as np
import pytest
import tensorflow as tf

from tfreward import cli
from tfreward.config import load_config
from tfreward.models.divergence import DivergenceMonitor, NonFiniteError, check_finite_weights
from tfreward.training import trainer


TRAIN = dict(epochs=2, steps_per_epoch=3, steps_per_execution=1,
                              optimizer={"clip_norm": 1.0, "warmup_steps": 1})


def _sha(path):
  with open(path, "rb") as f:
    return hashlib.sha256(f.read()).hexdigest()


def test_huge_learning_rate_exits_in_one_line_in_the_first_epoch(tmp_path, toy_config_file, capsys):
  model_dir = tmp_path / "run"
  argv = ["train", toy_config_file(**TRAIN), "--model-dir", str(model_dir), "--export",
          "--set", "train.optimizer.learning_rate=1.0e+30", "--set", "train.optimizer.clip_norm=null"]
  assert cli.main(argv) == 2
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1 and err.startswith("tfreward: error: training diverged at step "), err
  assert "(epoch 1)" in err and "went non-finite" in err and "learning_rate" in err
  # Nothing holds the non-finite weights: no checkpoint, backup, final weights, metrics or export.
  for name in ("checkpoints", "backup", "final.weights.h5", "metrics.json", "export"):
    assert not os.path.exists(model_dir / name), name


class _PoisonAtEpoch(keras.callbacks.Callback):
  """Before epoch `epoch`, records the checkpoint's hash and makes one kernel NaN: that epoch's first step diverges."""

  def __init__(self, model_dir, epoch):
    super().__init__()
    self.model_dir, self.epoch, self.hashes = model_dir, epoch, {}

  def on_epoch_begin(self, epoch, logs=None):
    if epoch != self.epoch:
      return
    for name in ("checkpoints/latest.weights.h5", "backup/latest.weights.h5"):
      self.hashes[name] = _sha(os.path.join(self.model_dir, name))
    kernel = next(w for w in self.model.trainable_weights if len(w.shape) == 4)
    kernel.assign(tf.fill(kernel.shape, float("nan")))


def test_divergence_after_a_finite_epoch_keeps_its_files(tmp_path, toy_config_file):
  config = load_config(toy_config_file(**{**TRAIN, "epochs": 3}))
  model_dir = str(tmp_path / "run")
  poison = _PoisonAtEpoch(model_dir, 1)
  with pytest.raises(NonFiniteError, match=r"diverged at step 4 \(epoch 2\): loss, .*gradient went non-finite"):
    trainer.train(config, model_dir, callbacks=[poison], evaluate=False, verbose=0)
  for name, digest in poison.hashes.items():
    assert _sha(os.path.join(model_dir, name)) == digest, name
  assert not os.path.exists(os.path.join(model_dir, trainer.FINAL_WEIGHTS))
  model = trainer.load_trained_model(config, model_dir)
  check_finite_weights(model, "evaluate")  # the kept checkpoint is finite
  # Rerunning resumes from the kept backup (epoch 1 of 3) and finishes.
  result = trainer.train(config, model_dir, evaluate=False, verbose=0)
  assert len(result.history["loss"]) == 2 and np.all(np.isfinite(result.history["loss"]))


def test_evaluation_and_export_refuse_non_finite_weights(tmp_path, toy_config_file, capsys):
  config_path = toy_config_file(**{**TRAIN, "epochs": 1})
  model_dir = tmp_path / "run"
  assert cli.main(["train", config_path, "--model-dir", str(model_dir), "--no-eval"]) == 0
  config = load_config(config_path)
  model = trainer.load_trained_model(config, str(model_dir))
  model.weights[0].assign(tf.fill(model.weights[0].shape, float("inf")))
  model.save_weights(str(model_dir / trainer.FINAL_WEIGHTS))
  capsys.readouterr()
  for argv in (["evaluate", "--model-dir", str(model_dir)], ["export", "--model-dir", str(model_dir)]):
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "hold NaN or Inf" in err and "conv0/kernel" in err, err


def _monitor_step(monitor, jit_compile):
  @tf.function(jit_compile=jit_compile)
  def step(step, terms, grads):
    return monitor.update_state(step, terms, grads)
  return step


@pytest.mark.parametrize("jit_compile", [False, True])
def test_monitor_records_the_first_non_finite_step_and_its_values(jit_compile):
  monitor = DivergenceMonitor(("loss", "loss_box"))
  step = _monitor_step(monitor, jit_compile)
  grads = [tf.ones([3]), None]
  assert bool(step(tf.constant(0, tf.int64), [tf.constant(1.0), tf.constant(2.0)], grads))
  assert monitor.report() == (-1, [])
  assert not bool(step(tf.constant(1, tf.int64), [tf.constant(1.0), tf.constant(np.inf)], grads))
  assert not bool(step(tf.constant(2, tf.int64), [tf.constant(np.nan), tf.constant(1.0)], [tf.ones([3]) * np.nan]))
  assert monitor.report() == (1, ["loss_box"])  # the first non-finite step is kept
  monitor.reset_state()
  assert not bool(step(tf.constant(5, tf.int64), [tf.constant(1.0), tf.constant(1.0)], [tf.constant([np.nan, 1.0])]))
  assert monitor.report() == (5, ["gradient"])


def test_monitor_agrees_across_replicas_when_one_replica_is_non_finite(two_replica_strategy):
  with two_replica_strategy.scope():
    monitor = DivergenceMonitor(("loss",))

  @tf.function
  def run():
    def replica_fn():
      replica = tf.distribute.get_replica_context().replica_id_in_sync_group
      loss = tf.where(replica == 1, np.nan, 1.0)  # only the second replica's share is NaN
      return monitor.update_state(tf.constant(7, tf.int64), [loss], [tf.ones([2])])
    return two_replica_strategy.experimental_local_results(two_replica_strategy.run(replica_fn))

  assert [bool(f) for f in run()] == [False, False]
  assert monitor.report() == (7, ["loss"])
