"""One-line CLI errors (`tfreward: error: ...` on stderr, status 2, no traceback) for mistakes a user can fix: a
broken or misplaced config file, a bad split, image size or evaluation period, bad `data` arguments, an unreadable
Cityscapes download, and evaluate overrides that change the model. Also YAML floats without a dot (1e-3)."""

import os
import zipfile

import pytest
import tensorflow_datasets as tfds

from tfreward import cli
from tfreward.config import load_config

CONFIGS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "configs")
TOY = os.path.join(CONFIGS, "shapes", "toy_detector.yaml")


def _small(data_dir):
  """--set overrides for a tiny run on tfreward_shapes/test (never the 4000-image default dataset)."""
  pairs = [f"data.data_dir={data_dir}", "data.dataset=tfreward_shapes/test", "data.image_size=[64,64]",
           "data.global_batch_size=4", "data.eval_batch_size=4", "train.epochs=1", "train.steps_per_epoch=2",
           "train.steps_per_execution=1", "runtime.strategy=cpu"]
  return [arg for pair in pairs for arg in ("--set", pair)]


def _error_line(capsys, argv):
  """Runs the CLI: status 2, one `tfreward: error:` line on stderr and no traceback; returns the line."""
  assert cli.main(argv) == 2
  out, err = capsys.readouterr()
  assert "Traceback" not in out + err
  lines = err.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("tfreward: error: "), err
  return lines[0]


def test_yaml_syntax_error_names_the_file_and_line(tmp_path, capsys):
  path = tmp_path / "broken.yaml"
  path.write_text("model:\n  family: toy_detector\ntrain:\n  epochs: [3\n  steps_per_epoch: 2\n")
  err = _error_line(capsys, ["train", str(path), "--model-dir", str(tmp_path / "run")])
  assert f"{path}, line 5" in err and "invalid YAML" in err
  assert not (tmp_path / "run").exists()


def test_directory_as_config_path(capsys):
  err = _error_line(capsys, ["train", CONFIGS])
  assert "is a directory" in err and "YAML config file, e.g. " in err and err.endswith(".yaml.")


@pytest.mark.parametrize("key, split, suggestion", [("train_split", "trian", "'train'"),
                                                    ("eval_split", "valid", "'validation'")])
def test_unknown_split_names_the_key_and_the_splits(key, split, suggestion, tmp_path, capsys):
  err = _error_line(capsys, ["train", TOY, "--set", f"data.{key}={split}", "--model-dir", str(tmp_path / "run")])
  assert f"data.{key} '{split}' is not a split of tfreward_shapes" in err
  assert f"did you mean {suggestion}" in err and "train, validation" in err
  assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("config, family", [("yolox_nano", "yolox"), ("retinanet", "RetinaNet"),
                                            ("freeanchor", "RetinaNet")])
def test_image_size_not_a_multiple_of_the_stride(config, family, shapes_test_data_dir, tmp_path, capsys):
  err = _error_line(capsys, ["train", os.path.join(CONFIGS, "shapes", f"{config}.yaml"),
                             *_small(shapes_test_data_dir), "--set", "data.image_size=[100,100]",
                             "--model-dir", str(tmp_path / "run")])
  assert f"data.image_size must be multiples of 32 for {family}, got [100, 100]" in err
  assert "nearest valid sizes are [96, 96] or [128, 128]" in err
  assert not (tmp_path / "run").exists()


def test_eval_every_epochs_zero_points_to_no_eval(tmp_path, capsys):
  err = _error_line(capsys, ["train", TOY, "--set", "train.eval_every_epochs=0", "--model-dir", str(tmp_path / "run")])
  assert "train.eval_every_epochs must be positive" in err and "got 0" in err and "--no-eval" in err
  assert not (tmp_path / "run").exists()  # Rejected before the model directory (config.yaml) is written.


@pytest.mark.parametrize("command, args, expected", [
    ("preview", ["--dataset", "nope"], "--dataset 'nope' is not a dataset the data command builds; choose one of "
                                       "tfreward_shapes, "),
    ("build", ["--dataset", "coco/2017"], "--dataset 'coco/2017' is not a dataset the data command builds"),
    ("preview", ["--split", "bogus"], "--split 'bogus' is not a split of tfreward_shapes/test; choose train or "
                                      "validation."),
    ("preview", ["--num-images", "0"], "--num-images must be a positive number of images, got 0."),
    ("preview", ["--num-images", "-3"], "--num-images must be a positive number of images, got -3."),
    ("preview", ["--out", "DIR"], "is a directory; pass a PNG file path"),
])
def test_data_command_arguments(command, args, expected, shapes_test_data_dir, tmp_path, capsys):
  argv = ["data", command, "--data-dir", shapes_test_data_dir]
  if command == "preview":
    argv += ["--dataset", "tfreward_shapes/test", "--out", str(tmp_path / "preview.png")]
  argv += [str(tmp_path) if arg == "DIR" else arg for arg in args]
  assert expected in _error_line(capsys, argv)
  assert not (tmp_path / "preview.png").exists()


@pytest.mark.parametrize("content", [b"", b"not a zip archive"])
def test_unreadable_cityscapes_manual_file(content, tmp_path, capsys):
  """One line, and no TFDS progress on stderr: the archives are checked before TFDS starts extracting."""
  manual_dir = tmp_path / "manual"
  manual_dir.mkdir()
  with zipfile.ZipFile(manual_dir / "leftImg8bit_trainvaltest.zip", "w") as archive:
    archive.writestr("leftImg8bit/README", "a valid zip")
  (manual_dir / "gtFine_trainvaltest.zip").write_bytes(content)
  err = _error_line(capsys, ["train", os.path.join(CONFIGS, "cityscapes", "deeplabv3_r50_ce.yaml"),
                             "--set", f"data.manual_dir={manual_dir}", "--set", f"data.data_dir={tmp_path / 'data'}",
                             "--model-dir", str(tmp_path / "run")])
  bad = manual_dir / "gtFine_trainvaltest.zip"
  assert f"manual_dir file {bad} is {'empty (0 bytes)' if not content else 'not a readable zip archive'}" in err
  assert "leftImg8bit_trainvaltest.zip and gtFine_trainvaltest.zip" in err and "cityscapes-dataset.com" in err
  assert not (tmp_path / "run").exists()


def test_evaluate_overrides_that_change_the_model(shapes_test_data_dir, tmp_path, capsys):
  run = str(tmp_path / "run")
  assert cli.main(["train", TOY, *_small(shapes_test_data_dir), "--set", "model.width=8", "--no-eval",
                   "--model-dir", run]) == 0
  capsys.readouterr()
  err = _error_line(capsys, ["evaluate", "--model-dir", run, "--set", "data.max_eval_examples=4",
                             "--set", "model.width=64"])
  assert f"the weights in {run} do not fit the model of the overridden config (--set model.width=64: " in err
  assert "conv0/kernel is (3, 3, 3, 64) instead of (3, 3, 3, 8)" in err and "data.eval_split" in err
  err = _error_line(capsys, ["evaluate", "--model-dir", run, "--set", "data.dataset=coco/2017"])
  assert "(--set data.dataset=coco/2017: head/kernel is" in err
  # An override of the model that keeps its weights' shapes evaluates.
  assert cli.main(["evaluate", "--model-dir", run, "--set", "model.ce_weight=2.0"]) == 0
  assert "evaluation: mAP=" in capsys.readouterr().out


def test_floats_without_a_dot_are_numbers(shapes_test_data_dir, tmp_path, capsys):
  path = tmp_path / "exp.yaml"
  path.write_text(open(TOY).read().replace("learning_rate: 0.002", "learning_rate: 2e-3"))
  argv = [str(path), *_small(shapes_test_data_dir), "--set", "train.optimizer.weight_decay=5E-4",
          "--set", "train.optimizer.epsilon=1.0e7"]
  assert cli.main(["train", *argv, "--dry-run"]) == 0
  config = load_config(str(path), [a for a in argv[1:] if a != "--set"])
  assert (config.train.optimizer.learning_rate, config.train.optimizer.weight_decay) == (2e-3, 5e-4)
  assert config.train.optimizer.epsilon == 1e7
