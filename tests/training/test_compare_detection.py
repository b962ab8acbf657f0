"""`tfreward compare` on detection runs: ground-truth boxes and each run's detections on the same images (PNG)."""

import numpy as np
import pytest
from PIL import Image

from tfreward import cli
from tfreward.data import preview


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory, shapes_test_data_dir):
  import yaml
  root = tmp_path_factory.mktemp("compare_detection")
  raw = {"model": {"family": "toy_detector", "num_slots": 8, "width": 8},
         "data": {"dataset": "tfreward_shapes/test", "data_dir": shapes_test_data_dir, "image_size": [64, 64],
                  "max_instances": 8, "global_batch_size": 4, "eval_batch_size": 4},
         "train": {"epochs": 1, "steps_per_epoch": 2}, "runtime": {"strategy": "cpu"}}
  (root / "exp.yaml").write_text(yaml.safe_dump(raw))
  assert cli.main(["train", str(root / "exp.yaml"), "--model-dir", str(root / "run"), "--no-eval"]) == 0
  return root, str(root / "run")


def test_compare_draws_detection_runs(toy_run, capsys):
  root, run = toy_run
  out = str(root / "compare.png")
  assert cli.main(["compare", run, run, "--label", "a", "--label", "b", "--num-images", "3", "--out", out,
                   "--min-score", "0.0"]) == 0
  assert "comparison written to" in capsys.readouterr().out
  # 64 px images are drawn at 256 px: 3 columns (truth, a, b), 3 rows.
  assert Image.open(out).size == (3 * 256 + 4 * 8, 28 + 16 + 3 * (256 + 8) + 8)


def test_compare_table_is_for_segmentation_runs(toy_run, capsys):
  _, run = toy_run
  assert cli.main(["compare", run, "--table"]) == 2
  assert "--table scores segmentation runs" in capsys.readouterr().err


def test_render_box_columns_names_boxes_only_in_sparse_panels():
  images = np.zeros([1, 64, 64, 3], np.uint8)
  few = [(np.array([[0.1, 0.1, 0.5, 0.5]]), np.array([0]))]
  many = [(np.tile([[0.1, 0.1, 0.5, 0.5]], [20, 1]), np.zeros([20], np.int64))]
  named = np.asarray(preview.render_box_columns(images, {"x": few}, class_names=["circle"], max_named=12))
  frames = np.asarray(preview.render_box_columns(images, {"x": many}, class_names=["circle"], max_named=12))
  top = 28 + 16  # the panel's first row of pixels; the caption of the box sits above its frame
  caption_rows = slice(top + 5, top + 22)  # the frame starts 2 px above y = 0.1 * 256
  assert named[caption_rows].sum() > frames[caption_rows].sum()
  with pytest.raises(ValueError, match="at least one column"):
    preview.render_box_columns(images, {}, class_names=["circle"])
