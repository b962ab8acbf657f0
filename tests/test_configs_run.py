"""Every COCO and Cityscapes config (what a TPU user runs first) trains 2 steps at its real image size and backbone
on TFDS mock data, evaluates, exports, and its export serves images through `tfreward predict`.

Each config runs in its own process (tests/config_run_main.py) so its peak memory is its own; the overrides are only
the batch (2), the length (one epoch of 2 steps, one step per execution), the CPU strategy and no ImageNet download.
The COCO mock (tests/mock_tfds.py, TFDS' mock_data) has COCO-sized images with crowd regions, an image without objects
and one with 130 objects (max_instances is 100); Cityscapes is prepared by TFDS from a fake manual download of
1024 x 2048 frames (the reward stage counts class pixels of the prepared train split). Reward stages start from their MLE /
cross-entropy stage's final weights, as their config headers say. Step times and peak memory are printed (`-s`).
"""

import json
import math
import os
import subprocess
import sys

import pytest
import yaml

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
MAIN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "config_run_main.py")
# config -> the config whose final weights it starts from (train.init_checkpoint), or None.
CONFIGS = {
    "coco/freeanchor_r50_1x.yaml": None,
    "coco/group_detr_r50.yaml": None,
    "coco/yolox_s.yaml": None,
    "coco/pix2seq_mle.yaml": None,
    "coco/pix2seq_reward.yaml": "coco/pix2seq_mle.yaml",
    "cityscapes/deeplabv3_r50_ce.yaml": None,
    "cityscapes/deeplabv3_r50_reward.yaml": "cityscapes/deeplabv3_r50_ce.yaml",
}


def test_every_coco_and_cityscapes_config_is_listed():
  found = {f"{folder}/{name}" for folder in ("coco", "cityscapes")
           for name in os.listdir(os.path.join(ROOT, "configs", folder)) if name.endswith(".yaml")}
  assert found == set(CONFIGS)


@pytest.fixture(scope="module")
def run_config(tmp_path_factory):
  """name -> (report dict, model dir, work dir); each config runs once per module."""
  runs = {}

  def run(name):
    if name not in runs:
      extra = []
      if CONFIGS[name]:
        _, start_dir, _ = run(CONFIGS[name])
        extra.append(f"train.init_checkpoint={os.path.join(start_dir, 'final.weights.h5')}")
      work_dir = str(tmp_path_factory.mktemp(name.replace("/", "_").replace(".yaml", "")))
      model_dir = os.path.join(work_dir, "run")
      env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2",
                 PYTHONPATH=os.pathsep.join([os.path.abspath(ROOT), os.environ.get("PYTHONPATH", "")]))
      proc = subprocess.run([sys.executable, MAIN, os.path.join(ROOT, "configs", name), model_dir, work_dir, *extra],
                            capture_output=True, text=True, env=env, timeout=3600)
      lines = [l for l in proc.stdout.splitlines() if l.startswith("CONFIG_RUN ")]
      assert proc.returncode == 0 and lines, f"{name}: exit {proc.returncode}\n{proc.stdout[-3000:]}\n" \
                                             f"{proc.stderr[-3000:]}"
      report = json.loads(lines[-1][len("CONFIG_RUN "):])
      print(f"\n{name}: step {report['step_seconds'][-1]:.1f} s (first, with compilation: "
            f"{report['step_seconds'][0]:.1f} s), peak memory {report['peak_rss_mb'] / 1024:.1f} GiB, "
            f"train + evaluate + export {report['train_seconds']:.0f} s")
      runs[name] = (report, model_dir, work_dir)
    return runs[name]

  return run


@pytest.mark.slow
@pytest.mark.configs
@pytest.mark.parametrize("name", list(CONFIGS))
def test_config_trains_evaluates_exports_and_serves(name, run_config):
  report, model_dir, work_dir = run_config(name)
  assert report["train_rc"] == 0 and report["predict_rc"] == 0
  assert len(report["step_seconds"]) == 2 and all(math.isfinite(v) for v in report["loss"]), report
  with open(os.path.join(ROOT, "configs", name)) as f:
    raw = yaml.safe_load(f)
  with open(os.path.join(model_dir, "config.yaml")) as f:
    used = yaml.safe_load(f)
  # The real image size and backbone ran.
  assert used["data"]["image_size"] == raw["data"]["image_size"]
  for key in ("backbone", "encoder"):
    if key in raw["model"]:
      assert used["model"]["options"][key] == raw["model"][key]
  with open(os.path.join(model_dir, "metrics.json")) as f:
    metrics = json.load(f)
  headline = "mIoU" if raw["data"]["dataset"] == "cityscapes" else "mAP"
  assert 0.0 <= metrics[headline] <= 1.0, metrics
  assert os.path.exists(os.path.join(model_dir, "export", "saved_model.pb"))
  predictions = os.listdir(os.path.join(work_dir, "predictions"))
  images = os.listdir(os.path.join(work_dir, "images"))
  stems = sorted(os.path.splitext(name)[0] for name in images)
  assert sorted(p[:-len(".png")] for p in predictions if p.endswith(".png") and not p.endswith(".labels.png")) == stems
  if headline == "mAP":
    assert "detections.json" in predictions
  else:
    # Segmentation also writes the label ids of each image.
    assert sorted(p[:-len(".labels.png")] for p in predictions if p.endswith(".labels.png")) == stems
