"""The deeplab family through the command line on tfreward_shapes/test: CE training with frequency class weights,
evaluation with the per-class table, export scored as served, reward tuning from the CE weights, the comparison
picture."""

import json
import os

import numpy as np
import pytest
import yaml
from PIL import Image

from tfreward import cli


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  from tfreward.data import shapes
  root = tmp_path_factory.mktemp("deeplab_cli")
  data_dir = str(root / "tfds")
  shapes.ensure_built("tfreward_shapes/test", data_dir)
  raw = {
      "model": {"family": "deeplab", "backbone": "resnet10", "backbone_width": 8, "output_stride": 16,
                "aspp_channels": 16, "aspp_rates": [1, 2, 3], "class_weights": "frequency"},
      "data": {"dataset": "tfreward_shapes/test", "task": "segmentation", "data_dir": data_dir,
               "image_size": [64, 64], "global_batch_size": 4, "eval_batch_size": 5},
      "train": {"epochs": 1, "steps_per_epoch": 2, "steps_per_execution": 2},
      "runtime": {"strategy": "cpu"},
  }
  config = root / "ce.yaml"
  config.write_text(yaml.safe_dump(raw))
  ce_dir, reward_dir = str(root / "ce"), str(root / "reward")
  assert cli.main(["train", str(config), "--model-dir", ce_dir, "--export"]) == 0
  assert cli.main(["train", str(config), "--model-dir", reward_dir, "--set", "model.mode=reward",
                   "--set", "model.num_samples=2", "--set", "model.ce_weight=1.0",
                   "--set", f"train.init_checkpoint={ce_dir}/final.weights.h5"]) == 0
  return root, ce_dir, reward_dir


def test_evaluate_prints_miou_and_the_per_class_table(runs, capsys):
  _, ce_dir, _ = runs
  capsys.readouterr()
  assert cli.main(["evaluate", "--model-dir", ce_dir]) == 0
  lines = capsys.readouterr().out.strip().splitlines()
  first = next(i for i, line in enumerate(lines) if line.startswith("evaluation: mIoU="))
  assert lines[first + 1].split() == ["class", "IoU"]
  names = ["background", "circle", "square", "triangle", "star", "ring", "cross"]
  assert [line.split()[0] for line in lines[first + 2:]] == names
  metrics = json.load(open(os.path.join(ce_dir, "metrics.json")))
  assert set(metrics) == {"mIoU"} | {f"IoU/{n}" for n in names}
  assert cli.main(["evaluate", "--model-dir", ce_dir, "--saved-model"]) == 0
  served = capsys.readouterr().out.strip().splitlines()
  assert served[-9:] == lines[first:]  # the same mIoU and per-class IoU as served


def test_reward_run_logs_its_statistics_and_compare_draws_both(runs, capsys):
  root, ce_dir, reward_dir = runs
  saved = yaml.safe_load(open(os.path.join(reward_dir, "config.yaml")))
  assert saved["model"]["options"]["mode"] == "reward"
  assert os.listdir(os.path.join(reward_dir, "logs", "reward"))  # batch-level reward statistics
  out = str(root / "compare.png")
  capsys.readouterr()
  assert cli.main(["compare", ce_dir, reward_dir, "--label", "CE", "--label", "reward", "--num-images", "2",
                   "--out", out, "--table"]) == 0
  table = capsys.readouterr().out.strip().splitlines()[-4:]
  assert table[0].split(" | ")[:4] == ["| run", "mIoU", "per-image mIoU", "background"]
  assert len(table[0].split(" | ")) == 12
  assert table[2].startswith("| CE | ") and table[3].startswith("| reward | ")
  assert all(0.0 <= float(row.split(" | ")[2]) <= 1.0 for row in table[2:])  # per-image mIoU, NaN-free
  assert Image.open(out).size == (4 * 256 + 5 * 8, 28 + 16 + 2 * (256 + 8) + 8)  # image, truth, 2 runs
  assert cli.main(["compare", ce_dir, reward_dir, "--label", "CE"]) == 2  # one label per run


def test_boundary_band():
  from tfreward.training.compare import boundary_band
  mask = np.zeros([1, 8, 8], np.int32)
  mask[0, 2:6, 2:6] = 3
  mask[0, 0, 0] = 255
  band = boundary_band(mask, 1)[0]
  expected = np.zeros([8, 8], bool)
  expected[1:7, 1:7] = True
  expected[3:5, 3:5] = False  # the square's interior, 2 px from the background
  expected[0, 0] = False  # ignored
  expected[0, 1] = expected[1, 0] = True  # next to the ignored pixel (255 is another value)
  np.testing.assert_array_equal(band, expected)
