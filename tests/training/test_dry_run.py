"""`tfreward train --dry-run` and the --workers / --worker-index flags (no worker process is started: a dry run
plans a multi-worker run from TF_CONFIG without connecting)."""

import os

import pytest

from tfreward import cli

CONFIG = os.path.join(os.path.dirname(__file__), "..", "..", "configs", "shapes", "yolox_nano.yaml")


@pytest.fixture(autouse=True)
def restore_tf_config(monkeypatch):
  monkeypatch.setenv("TF_CONFIG", "")  # the CLI sets it from --workers; monkeypatch puts the old value back


def _run(capsys, *argv):
  code = cli.main(["train", CONFIG, *argv])
  out, err = capsys.readouterr()
  return code, out, err.strip()


def test_dry_run_one_process(capsys, tmp_path):
  code, out, _ = _run(capsys, "--dry-run", "--set", "runtime.strategy=cpu", "--set", f"data.data_dir={tmp_path}")
  assert code == 0
  assert out.splitlines() == [
      "strategy: the default strategy (one replica) (runtime.strategy=cpu)", "workers: 1",
      "replicas: 1 (the default device in this process)", "global batch: 16, per replica: 16",
      "input pipelines: 1, training input sharding: example", "train step: XLA, steps_per_execution 1"]
  assert not os.listdir(tmp_path)  # nothing generated, nothing trained


def test_dry_run_plans_a_worker_of_a_cluster(capsys, tmp_path):
  code, out, _ = _run(capsys, "--dry-run", "--workers", "localhost:12345,localhost:12346", "--worker-index", "1",
                      "--set", f"data.data_dir={tmp_path}")
  assert code == 0
  lines = out.splitlines()
  assert lines[0] == "strategy: MultiWorkerMirroredStrategy (runtime.strategy=multi_worker)"
  assert "workers: 2, this is worker 1" in lines and "replicas: 2 (CPU:0 in this process)" in lines
  assert "global batch: 16, per replica: 8" in lines
  assert ("input pipelines: 2, training input sharding: auto: file if the split has at least one file per pipeline "
          "(dataset not prepared yet)") in lines
  assert "train step: graph (no XLA under mirrored strategies), steps_per_execution 1" in lines
  code, out, err = _run(capsys, "--dry-run", "--workers", "a:1,b:1,c:1", "--worker-index", "0",
                        "--set", "data.global_batch_size=16")
  assert code == 2 and err == "tfreward: error: data.global_batch_size 16 is not divisible by the 3 replicas."


@pytest.mark.parametrize("argv, message", [
    (("--set", "runtime.strategy=multi_worker"), "TF_CONFIG is not set"),
    (("--workers", "localhost:1,localhost:2"), "--workers and --worker-index go together"),
    (("--workers", "localhost:1,localhost:2", "--worker-index", "2"), "--worker-index must be in [0, 1]"),
    (("--workers", "localhost", "--worker-index", "0"), "HOST:PORT"),
    (("--set", "data.input_sharding=hosts"), "data.input_sharding must be one of auto, file, example"),
    (("--set", "runtime.communication=mpi"), "runtime.communication must be one of auto, ring, nccl"),
])
def test_cluster_errors_are_one_line(capsys, argv, message):
  code, _, err = _run(capsys, "--dry-run", *argv)
  assert code == 2 and len(err.splitlines()) == 1 and message in err, err
