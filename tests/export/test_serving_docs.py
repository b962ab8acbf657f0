"""docs/serving.md against real exports: every family's shapes config exported (untrained), its `serving_default`
signature as `saved_model_cli` prints it equal to the documented block, with the documented K; `show --all` works."""

import os
import re
import subprocess
import sys

import pytest

from tfreward.config import load_config
from tfreward.export import saved_model
from tfreward.training import trainer

ROOT = os.path.join(os.path.dirname(__file__), "..", "..")
DOC = open(os.path.join(ROOT, "docs", "serving.md")).read()
# Config -> the K of the doc's table (None: segmentation).
CONFIGS = {"toy_detector": 8, "yolox_nano": 50, "retinanet": 100, "freeanchor": 100, "group_detr": 100,
           "pix2seq_mle": 10, "deeplab_ce": None}


def _blocks():
  return re.findall(r"```\n(The given SavedModel SignatureDef.*?)\n```", DOC, flags=re.S)


def test_the_k_column_names_every_shapes_config():
  for name, k in CONFIGS.items():
    if k is not None:
      row = next(line for line in DOC.splitlines() if line.startswith("| ") and f"{name.split('_')[0]}" in line)
      assert f"| {k} |" in row, (name, row)


@pytest.mark.slow  # about 2 minutes: builds and exports seven models
@pytest.mark.parametrize("name", list(CONFIGS))
def test_documented_signature_matches_the_export(name, tmp_path):
  detection_block, segmentation_block = _blocks()
  config = load_config(os.path.join(ROOT, "configs", "shapes", f"{name}.yaml"))
  export_dir = tmp_path / "export"
  saved_model.export_saved_model(trainer.build_model(config, compile_model=False), export_dir)
  printed = subprocess.run([sys.executable, "-m", "tensorflow.python.tools.saved_model_cli", "show", "--dir", str(export_dir), "--tag_set", "serve",
                            "--signature_def", "serving_default"], capture_output=True, text=True, check=True,
                           env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")).stdout.strip()
  k = CONFIGS[name]
  expected = segmentation_block if k is None else detection_block.replace("K", str(k))
  assert printed == expected
  everything = subprocess.run([sys.executable, "-m", "tensorflow.python.tools.saved_model_cli", "show", "--all",
                               "--dir", str(export_dir)], capture_output=True, text=True, check=True,
                              env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")).stdout
  assert everything.count("outputs['valid_image']") == 3  # serving_default, serve_encoded, serve_images
