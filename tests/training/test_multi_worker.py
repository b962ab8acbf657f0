"""Multi-worker training with real worker processes on loopback ports (CPU, one replica each).

Every process runs with TF_ENABLE_ONEDNN_OPTS=0: oneDNN's convolutions round differently in a process that runs two
replicas side by side than in two processes with one each (YOLOX-nano's step-0 loss 10.888377 vs 10.888378, which
SimOTA's near-tied costs at initialisation turn into another assignment); with TensorFlow's own kernels two workers
and one process over two logical CPUs are bit-identical, which is what the tests check.
"""

import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from tfreward.config import load_config
from tfreward.training import curves
from tfreward.training import trainer

ROOT = os.path.join(os.path.dirname(__file__), "..", "..")
MAIN = os.path.join(os.path.dirname(__file__), "multi_worker_main.py")
DATASET = "tfreward_shapes/test"
SMALL = ("data.image_size=[64, 64]", "data.global_batch_size=8", "data.eval_batch_size=8", "data.shuffle_buffer=40",
         "train.steps_per_execution=1")
FAMILIES = {
    "toy_detector": ("configs/shapes/toy_detector.yaml", ("train.epochs=3", "train.steps_per_epoch=3")),
    "yolox": ("configs/shapes/yolox_nano.yaml", ("train.epochs=2", "train.steps_per_epoch=2",
                                                 "model.width_multiplier=0.125", "train.optimizer.warmup_steps=2",
                                                 "model.l1_last_epochs=1", "model.ema_ramp_updates=2.0")),
}


@pytest.fixture(scope="module")
def data_dir(shapes_test_data_dir):
  return shapes_test_data_dir


def _free_ports(n):
  sockets = [socket.socket() for _ in range(n)]
  for s in sockets:
    s.bind(("localhost", 0))
  ports = [s.getsockname()[1] for s in sockets]
  for s in sockets:
    s.close()
  return ports


class Runs:
  """Starts `tfreward train` processes for one family and config."""

  def __init__(self, family, data_dir, tmp_path):
    config_path, overrides = FAMILIES[family]
    self.config_path = os.path.join(ROOT, config_path)
    self.overrides = [f"data.dataset={DATASET}", f"data.data_dir={data_dir}", *SMALL, *overrides]
    self.tmp = tmp_path / "tmp"  # the workers' TMPDIR: their temporary model dirs go (and must vanish) there
    self.tmp.mkdir(exist_ok=True)
    self.env = dict(os.environ, TF_ENABLE_ONEDNN_OPTS="0", TF_CPP_MIN_LOG_LEVEL="2", TMPDIR=str(self.tmp),
                    PYTHONPATH=os.pathsep.join([os.path.abspath(ROOT), os.environ.get("PYTHONPATH", "")]))

  def config(self):
    return load_config(self.config_path, self.overrides)

  def start(self, model_dir, *prefix, extra=()):
    argv = [sys.executable, MAIN, *prefix, "train", self.config_path, "--model-dir", str(model_dir), "--no-eval",
            *extra]
    for override in self.overrides:
      argv += ["--set", override]
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=self.env)

  def start_workers(self, model_dir, ports, faults=(None, None)):
    workers = ",".join(f"localhost:{p}" for p in ports)
    return [self.start(model_dir, *(("--sigkill-after-epoch", str(fault)) if fault is not None else ()),
                       extra=("--workers", workers, "--worker-index", str(i)))
            for i, fault in enumerate(faults)]

  def run(self, *procs, timeout=600):
    outputs = [p.communicate(timeout=timeout)[0] for p in procs]
    for p, out in zip(procs, outputs):
      assert p.returncode == 0, out[-3000:]
    return outputs


def _weights(config, model_dir):
  return trainer.load_trained_model(config, str(model_dir)).get_weights()


def _train_losses(model_dir):
  return [value for _, value in curves.read_scalars(str(model_dir), split="train")["loss"]]


def _sha(output):
  return [line.split()[-1] for line in output.splitlines() if line.startswith("final weights sha256:")]


def _worker_dirs(runs):
  return {name for name in os.listdir(runs.tmp) if name.startswith("tfreward-worker")}


def _assert_close(a, b, rtol):
  for x, y in zip(a, b):
    np.testing.assert_allclose(y, x, rtol=0, atol=rtol * max(float(np.max(np.abs(x))), 1e-12))


@pytest.fixture(scope="module")
def toy_runs(data_dir, tmp_path_factory):
  """The toy detector trained by two workers, by one process over two logical CPUs, and by one default process."""
  tmp = tmp_path_factory.mktemp("toy")
  runs = Runs("toy_detector", data_dir, tmp)
  outputs = runs.run(*runs.start_workers(tmp / "workers", _free_ports(2)))
  runs.run(runs.start(tmp / "mirrored", "--mirrored-cpu", "2"), runs.start(tmp / "single"))
  return runs, tmp, outputs


def test_two_workers_equal_one_process_toy_detector(toy_runs):
  runs, tmp, outputs = toy_runs
  config = runs.config()
  chief_sha, worker_sha = _sha(outputs[0]) + _sha(outputs[1])
  assert chief_sha == worker_sha and len(chief_sha) == 64  # both workers end with identical weights
  assert "model directory:" in outputs[0] and "the chief writes the model directory" in outputs[1]
  workers = _weights(config, tmp / "workers")
  for a, b in zip(workers, _weights(config, tmp / "mirrored")):  # same replicas, same kernels: bit-identical
    np.testing.assert_array_equal(a, b)
  assert _train_losses(tmp / "workers") == _train_losses(tmp / "mirrored")
  # One replica (XLA-compiled step, batch 8 in one piece) rounds differently: measured 5e-6 of the largest weight.
  _assert_close(_weights(config, tmp / "single"), workers, rtol=1e-5)
  np.testing.assert_allclose(_train_losses(tmp / "workers"), _train_losses(tmp / "single"), rtol=1e-5)
  # Only the chief wrote; the other worker's temporary model dir is gone.
  assert sorted(os.listdir(tmp / "workers")) == ["checkpoints", "config.yaml", "final.weights.h5", "logs",
                                                 "runtime.json"]
  assert not _worker_dirs(runs)


def test_worker_killed_after_an_epoch_resumes_to_the_uninterrupted_weights(toy_runs):
  runs, tmp, _ = toy_runs
  model_dir = tmp / "fault"
  ports = _free_ports(2)
  chief, worker = runs.start_workers(model_dir, ports, faults=(None, 0))
  worker.communicate(timeout=300)
  assert worker.returncode == -signal.SIGKILL
  metadata = model_dir / "backup" / "training_metadata.json"
  deadline = time.time() + 120
  while not metadata.exists() and time.time() < deadline:  # the chief finishes epoch 0 and backs it up, then stalls
    time.sleep(0.2)
  assert metadata.exists()
  time.sleep(1.0)
  if chief.poll() is None:  # waiting for its lost peer: the whole job is restarted, as a cluster manager would
    chief.send_signal(signal.SIGKILL)
  chief.communicate(timeout=60)
  left_by_the_killed_worker = _worker_dirs(runs)
  outputs = runs.run(*runs.start_workers(model_dir, _free_ports(2)))
  for out in outputs:  # both resumed at the epoch the backup reached
    assert "Epoch 1/3" not in out and "Epoch 2/3" in out, out[-2000:]
  config = runs.config()
  for a, b in zip(_weights(config, tmp / "workers"), _weights(config, model_dir)):
    np.testing.assert_array_equal(a, b)
  assert _worker_dirs(runs) == left_by_the_killed_worker  # the restarted worker removed its own


@pytest.mark.slow  # about 100 s on 2 cores: tracing YOLOX's step in three processes
def test_two_workers_equal_one_process_yolox(data_dir, tmp_path):
  runs = Runs("yolox", data_dir, tmp_path)
  outputs = runs.run(*runs.start_workers(tmp_path / "workers", _free_ports(2)),
                     runs.start(tmp_path / "mirrored", "--mirrored-cpu", "2"))
  assert _sha(outputs[0]) == _sha(outputs[1])
  config = runs.config()
  for a, b in zip(_weights(config, tmp_path / "workers"), _weights(config, tmp_path / "mirrored")):
    np.testing.assert_array_equal(a, b)
  assert _train_losses(tmp_path / "workers") == _train_losses(tmp_path / "mirrored")
