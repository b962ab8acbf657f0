"""Entry point of the subprocesses in test_configs_run.py: `tfreward train CONFIG --export` on TFDS mock data,
then `tfreward predict` on the export; prints one JSON line with the step times and the peak memory.

  python config_run_main.py CONFIG MODEL_DIR WORK_DIR [KEY=VALUE ...]

The config's dataset: coco/2017 reads mock_tfds' realistic examples (COCO-sized images with crowd regions, an image
without objects, one with more objects than max_instances); cityscapes is prepared by TFDS from mock_tfds' fake
manual download of 1024 x 2048 frames.
KEY=VALUE pairs are extra `--set` overrides. One process per config, so the peak memory is the config's own.
"""

import contextlib
import glob
import json
import os
import resource
import sys
import time

import keras
import yaml

import mock_tfds
from tfreward import cli
from tfreward.training import trainer


class _StepTimes(keras.callbacks.Callback):
  """Wall time of every training batch (one step each: steps_per_execution 1)."""

  def __init__(self):
    super().__init__()
    self.seconds = []
    self._start = None

  def on_train_batch_begin(self, batch, logs=None):
    self._start = time.perf_counter()

  def on_train_batch_end(self, batch, logs=None):
    self.seconds.append(time.perf_counter() - self._start)


def _write_images(examples, folder):
  """The examples' images as JPEG files (what a user gives `tfreward predict`)."""
  import numpy as np
  from PIL import Image
  os.makedirs(folder, exist_ok=True)
  for i, example in enumerate(examples):
    pixels = example["image"]
    Image.fromarray(np.asarray(pixels)).save(os.path.join(folder, f"{i}.jpg"))


def main(argv):
  config_path, model_dir, work_dir, extra = argv[0], argv[1], argv[2], argv[3:]
  with open(config_path) as f:
    raw = yaml.safe_load(f)
  dataset = raw["data"]["dataset"]
  overrides = ["data.global_batch_size=2", "data.eval_batch_size=2", "train.epochs=1", "train.steps_per_epoch=2",
               "train.steps_per_execution=1", "runtime.strategy=cpu",
               f"data.data_dir={os.path.join(work_dir, 'tensorflow_datasets')}", *extra]
  if "backbone_weights" in raw["model"]:
    overrides.append("model.backbone_weights=null")  # no ImageNet download here
  if dataset == "cityscapes":
    # The real builder prepares Cityscapes from a fake manual download (the reward stage's class weights count
    # the prepared train split, which TFDS' mock cannot provide).
    manual_dir = mock_tfds.write_cityscapes_archive(os.path.join(work_dir, "cityscapes_manual"))
    overrides.append(f"data.manual_dir={manual_dir}")
    mock = contextlib.nullcontext()
    examples = [{"image": mock_tfds.cityscapes_image(0)}]
  else:
    mock = mock_tfds.mock_coco()
    examples = list(mock_tfds.coco_realistic_examples("validation", 2))

  steps = _StepTimes()
  results = []
  real_train = trainer.train

  def train(*args, **kwargs):
    results.append(real_train(*args, callbacks=[steps], **kwargs))
    return results[-1]

  trainer.train = train
  train_argv = ["train", config_path, "--model-dir", model_dir, "--export"]
  for override in overrides:
    train_argv += ["--set", override]
  started = time.perf_counter()
  with mock:
    code = cli.main(train_argv)
  train_seconds = time.perf_counter() - started
  report = {"train_rc": code, "step_seconds": steps.seconds, "train_seconds": train_seconds,
            "loss": [float(v) for v in results[0].history.get("loss", [])] if results else []}
  if code == 0:
    images = os.path.join(work_dir, "images")
    _write_images(examples, images)
    started = time.perf_counter()
    report["predict_rc"] = cli.main(["predict", "--saved-model", os.path.join(model_dir, "export"), *sorted(glob.glob(images + "/*")),
                                     "--out", os.path.join(work_dir, "predictions")])
    report["predict_seconds"] = time.perf_counter() - started
  report["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
  print("CONFIG_RUN " + json.dumps(report), flush=True)
  return code


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
