"""A model dir that holds a run: the same config resumes or is complete, another config is refused in one line,
--overwrite starts over; config.yaml is written only after these checks."""

import os

import yaml

from tfreward import cli


TRAIN = dict(epochs=1, steps_per_epoch=2, steps_per_execution=1, optimizer={"warmup_steps": 1})


def _mtimes(model_dir):
  return {os.path.join(root, name): os.stat(os.path.join(root, name)).st_mtime_ns
          for root, _, names in os.walk(model_dir) for name in names}


def test_reusing_a_model_dir(tmp_path, shapes_test_data_dir, toy_config_file, capsys):
  config_path = toy_config_file(**TRAIN)
  model_dir = str(tmp_path / "run")
  train = ["train", config_path, "--model-dir", model_dir, "--no-eval"]
  assert cli.main(train) == 0
  capsys.readouterr()
  before = _mtimes(model_dir)

  # The same finished command: complete, exit 0, nothing rewritten.
  assert cli.main(train) == 0
  assert "already holds this config's finished run" in capsys.readouterr().out
  assert _mtimes(model_dir) == before

  # Another config: one line naming the differing keys and the ways out; nothing touched, config.yaml included.
  assert cli.main(train + ["--set", "model.width=16", "--set", "train.epochs=2"]) == 2
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1, err
  assert "holds a run of another config (model.width: 8 there, 16 here; train.epochs: 1 there, 2 here)" in err
  assert "--model-dir NEW" in err and "--overwrite" in err
  assert _mtimes(model_dir) == before

  # A relocated data dir is the same run.
  moved = tmp_path / "moved_data"
  os.symlink(shapes_test_data_dir, moved)
  assert cli.main(train + ["--set", f"data.data_dir={moved}"]) == 0
  assert "already holds" in capsys.readouterr().out

  # --overwrite: the old run's files go, the new config trains from scratch.
  with open(os.path.join(model_dir, "notes.txt"), "w") as f:
    f.write("mine")
  assert cli.main(train + ["--set", "model.width=16", "--overwrite"]) == 0
  with open(os.path.join(model_dir, "config.yaml")) as f:
    assert yaml.safe_load(f)["model"]["options"]["width"] == 16
  assert os.path.exists(os.path.join(model_dir, "notes.txt"))  # not a run's file
  logs = [name for _, _, names in os.walk(os.path.join(model_dir, "logs")) for name in names]
  assert len([n for n in logs if "events" in n]) == 1  # one run's TensorBoard events, not two
