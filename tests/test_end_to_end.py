"""The harness end to end on the built-in dataset: CLI train (default and 2 replicas), evaluate, export, serve from a
TensorFlow-only process, resume after an interruption, and the one-line errors of the CLI."""

import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
import yaml

from tfreward import cli
from tfreward.config import load_config
from tfreward.export.served import ServedDetector
from tfreward.training import trainer

SERVE = r"""
import json, sys
for blocked in ("keras", "tf_keras", "tfreward"):
  sys.modules[blocked] = None
import tensorflow as tf
loaded = tf.saved_model.load(sys.argv[1])
image = tf.io.encode_png(tf.cast(tf.random.uniform([90, 150, 3], 0, 255, seed=1), tf.uint8))
out = loaded.signatures["serving_default"](encoded_images=tf.stack([image, image]))
print(json.dumps({k: v.numpy().tolist() for k, v in out.items()}))
"""


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  from tfreward.data import shapes
  path = str(tmp_path_factory.mktemp("tfds"))
  shapes.ensure_built("tfreward_shapes/test", path)
  return path


def _config_file(tmp_path, data_dir, **train):
  raw = {
      "model": {"family": "toy_detector", "num_slots": 8, "width": 8},
      "data": {"dataset": "tfreward_shapes/test", "data_dir": data_dir, "image_size": [64, 64],
               "max_instances": 8, "global_batch_size": 4, "eval_batch_size": 4},
      "train": {"epochs": 2, "steps_per_epoch": 2, "steps_per_execution": 2,
                "optimizer": {"clip_norm": 1.0, "warmup_steps": 1}, **train},
      "runtime": {"strategy": "cpu"},
  }
  path = tmp_path / "exp.yaml"
  path.write_text(yaml.safe_dump(raw))
  return str(path)


def test_cli_train_evaluate_export_serve(tmp_path, data_dir, capsys):
  config_path = _config_file(tmp_path, data_dir)
  model_dir = str(tmp_path / "run")
  assert cli.main(["train", config_path, "--model-dir", model_dir, "--set", "train.epochs=2"]) == 0
  for name in ("config.yaml", "final.weights.h5", "metrics.json", "checkpoints/latest.weights.h5"):
    assert os.path.exists(os.path.join(model_dir, name)), name
  assert os.listdir(os.path.join(model_dir, "logs"))
  metrics = json.load(open(os.path.join(model_dir, "metrics.json")))
  assert {"mAP", "mAP50"} <= set(metrics) and all(np.isfinite(v) for v in metrics.values())

  assert cli.main(["evaluate", "--model-dir", model_dir]) == 0
  assert "evaluation: mAP=" in capsys.readouterr().out
  assert cli.main(["export", "--model-dir", model_dir]) == 0
  out = subprocess.run([sys.executable, "-c", SERVE, os.path.join(model_dir, "export")], capture_output=True,
                       text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
  served = json.loads(out.stdout.strip().splitlines()[-1])
  boxes = np.array(served["boxes"])
  assert boxes.shape == (2, 8, 4)
  # Boxes come back in the original image's pixels (90 x 150), clipped to it.
  assert boxes[..., [0, 2]].max() <= 90 + 1e-3 and boxes[..., [1, 3]].max() <= 150 + 1e-3
  assert served["num_detections"] == [8, 8]
  # The exported graph, evaluated as served on the evaluation split, scores what the trained weights score.
  capsys.readouterr()
  assert cli.main(["evaluate", "--model-dir", model_dir, "--saved-model"]) == 0
  lines = capsys.readouterr().out.strip().splitlines()
  line = next(line for line in lines if line.startswith("evaluation: "))
  served_metrics = dict(item.split("=") for item in line.removeprefix("evaluation: ").split(", "))
  for key in ("mAP", "mAP50", "AR100"):
    np.testing.assert_allclose(float(served_metrics[key]), metrics[key], atol=2e-4, err_msg=key)
  # Then the per-class AP table: a header and one row per class of the dataset.
  assert lines[-7].split() == ["class", "AP"] and len(lines) - lines.index(line) == 8
  config = load_config(trainer.saved_config_dict(model_dir))
  images, _ = next(iter(trainer.eval_dataset(config)))
  direct = trainer.load_trained_model(config, model_dir).detect(images)
  served_out = ServedDetector(os.path.join(model_dir, "export"), (64, 64)).detect(images)
  for key in direct:
    np.testing.assert_allclose(served_out[key], direct[key], rtol=1e-5, atol=1e-5, err_msg=key)


def test_train_two_replicas(tmp_path, data_dir, two_replica_strategy, monkeypatch):
  from tfreward import strategy as strategies
  monkeypatch.setattr(strategies, "get_strategy", lambda *a, **k: two_replica_strategy)
  config = load_config(_config_file(tmp_path, data_dir))
  result = trainer.train(config, str(tmp_path / "run2"), verbose=0)
  assert result.model.distribute_strategy.num_replicas_in_sync == 2
  assert all(np.isfinite(v) for vs in result.history.values() for v in vs)
  assert "mAP" in result.metrics


class _Interrupt(keras.callbacks.Callback):
  def on_epoch_end(self, epoch, logs=None):
    if epoch == 1:
      raise KeyboardInterrupt


def test_interrupted_run_resumes_where_it_stopped(tmp_path, data_dir):
  config = load_config(_config_file(tmp_path, data_dir, epochs=3))
  model_dir = str(tmp_path / "run3")
  with pytest.raises(KeyboardInterrupt):
    trainer.train(config, model_dir, callbacks=[_Interrupt()], evaluate=False, verbose=0)
  result = trainer.train(config, model_dir, evaluate=False, verbose=0)
  # Epochs 0 and 1 were done before the interruption: only epoch 2 runs again.
  assert len(result.history["loss"]) == 1
  assert int(result.model.optimizer.iterations.numpy()) == 3 * 2


def _error_line(capsys, argv):
  assert cli.main(argv) == 2
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1, err
  return err


def test_cli_errors_are_one_line(tmp_path, data_dir, capsys):
  config_path = _config_file(tmp_path, data_dir)
  err = _error_line(capsys, ["train", config_path, "--set", "train.epoch=3"])
  assert "unknown config key 'train.epoch'" in err and "epochs" in err
  err = _error_line(capsys, ["train", config_path, "--set", "data.dataset=imagenet_shapes"])
  assert "unknown dataset 'imagenet_shapes'" in err and "tfreward_shapes" in err
  err = _error_line(capsys, ["train", config_path, "--set", "data.dataset=coco/2017",
                             "--set", f"data.data_dir={tmp_path / 'empty'}"])
  assert "tfds build coco/2017" in err
  err = _error_line(capsys, ["train", config_path, "--set", "data.dataset=cityscapes",
                             "--set", "data.task=segmentation", "--set", f"data.data_dir={tmp_path / 'empty'}",
                             "--set", f"data.manual_dir={tmp_path / 'nowhere'}"])
  assert "manual_dir" in err and "leftImg8bit_trainvaltest.zip" in err
  err = _error_line(capsys, ["train", str(tmp_path / "missing.yaml")])
  assert "does not exist" in err
  err = _error_line(capsys, ["evaluate", "--model-dir", str(tmp_path / "nothing")])
  assert "config.yaml" in err


def test_same_seed_runs_are_bit_identical(tmp_path, data_dir):
  """Same config and seed -> the same losses, weights and metrics, also when the run first generates the dataset
  itself (its TFRecord bytes differ: protobuf serialises the feature map in hash order, the parsed examples are
  equal; generating it draws random numbers, which must not change the initial weights)."""
  other_dir = str(tmp_path / "tfds2")  # not built yet: the third run generates it
  runs = []
  for i, directory in enumerate((data_dir, data_dir, other_dir)):
    config = load_config(_config_file(tmp_path, directory, steps_per_execution=1))
    result = trainer.train(config, str(tmp_path / f"run{i}"), verbose=0)
    runs.append((result.history, [w.numpy() for w in result.model.weights], result.metrics))
    with open(tmp_path / f"run{i}" / "runtime.json") as f:
      assert json.load(f)["train_step_xla"] is True
  for history, weights, metrics in runs[1:]:
    assert history == runs[0][0] and metrics == runs[0][2]
    assert all(np.array_equal(a, b) for a, b in zip(weights, runs[0][1]))


def test_op_determinism_is_recorded_and_warned(tmp_path, data_dir):
  """TF_DETERMINISTIC_OPS=1 makes Keras drop jit_compile=True: the run says so instead of silently differing."""
  env = dict(os.environ, TF_DETERMINISTIC_OPS="1")
  model_dir = str(tmp_path / "det")
  proc = subprocess.run([sys.executable, "-m", "tfreward.cli", "train", _config_file(tmp_path, data_dir),
                         "--no-eval", "--model-dir", model_dir], env=env, capture_output=True, text=True, check=True)
  assert "runs without XLA" in proc.stderr
  with open(os.path.join(model_dir, "runtime.json")) as f:
    record = json.load(f)
  assert record["op_determinism"] is True and record["train_step_xla"] is False
