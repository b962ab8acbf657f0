"""Cityscapes from a fake manual download: real zips in the layout TFDS' `cityscapes/semantic_segmentation` builder
reads, prepared without network, read by the pipeline, then the two configs/cityscapes/ stages trained for two steps
each through the CLI.

The archive: `leftImg8bit_trainvaltest.zip` with `leftImg8bit/{train,val,test}/<city>/<city>_<seq>_<frame>
_leftImg8bit.png` and `gtFine_trainvaltest.zip` with `gtFine/<split>/<city>/<city>_<seq>_<frame>_gtFine_labelIds.png`
(the builder lists the left images of each city folder and derives the label path from the image id; city names
must match its `[a-z\\-]+`). The images have Cityscapes' real 1024 x 2048 size: the builder's features declare that
shape and decoding sets it without checking, so smaller images would be read with a wrong static shape (`image_hw`
1024 x 2048 whatever the file holds). Flat content compresses them to a few KB.

Label maps: a grid of 4 x 16 cells of 256 x 128 pixels, each one raw label id 0..33 (ids such as 0-6, 9, 10, 14-16,
18, 29 and 30 map to the ignore index 255), so resizing by 1/16 (canvas 64 x 128) keeps every cell exact.
"""

import json
import math
import os
import socket

import keras
import numpy as np
import pytest
import tensorflow as tf

import mock_tfds
from tfreward import cli
from tfreward.data import decoders
from tfreward.data import pipeline
from tfreward.training import trainer

CONFIGS = os.path.join(os.path.dirname(__file__), "..", "..", "configs", "cityscapes")
CITY_HW = mock_tfds.CITYSCAPES_HW
CELL_HW = mock_tfds.CITYSCAPES_CELL_HW
CANVAS = (64, 128)  # 1/16 of the original: cells become 16 x 8 pixels
SPLITS = mock_tfds.CITYSCAPES_ARCHIVE_SPLITS
# The shrunk runs: a tiny backbone, no ImageNet download, float32 on the CPU, two steps of two images.
SHRINK = ("data.image_size=[64, 128]", "data.global_batch_size=2", "data.eval_batch_size=2",
          "data.shuffle_buffer=8", "model.backbone=resnet10", "model.backbone_width=8",
          "model.backbone_weights=null", "model.aspp_channels=16", "train.epochs=1", "train.steps_per_epoch=2",
          "train.steps_per_execution=1", "train.mixed_precision=false", "runtime.strategy=cpu")
TRAIN_ID = np.full(256, decoders.IGNORE_INDEX, np.int64)
TRAIN_ID[list(decoders.CITYSCAPES_LABEL_TO_TRAIN_ID)] = list(decoders.CITYSCAPES_LABEL_TO_TRAIN_ID.values())


_raw_labels = mock_tfds.cityscapes_raw_labels
_image = mock_tfds.cityscapes_image
_examples = mock_tfds.cityscapes_archive_examples
_image_id = mock_tfds.cityscapes_image_id


@pytest.fixture(scope="module")
def no_network():
  """Fails any Python-level connection attempt (TFDS and Keras download through Python)."""
  def refuse(*args, **kwargs):
    raise OSError(f"test_cityscapes_archive: network access attempted: {args!r}")
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(socket.socket, "connect", refuse)
    patch.setattr(socket, "create_connection", refuse)
    patch.setattr(socket, "getaddrinfo", refuse)
    yield


@pytest.fixture(scope="module")
def manual_dir(tmp_path_factory):
  """The fake manual download: the two zips Cityscapes' TFDS builder needs, and nothing else."""
  return mock_tfds.write_cityscapes_archive(str(tmp_path_factory.mktemp("cityscapes_manual")))


def _id_hash(image_id):
  return int(tf.strings.to_hash_bucket_fast(image_id, 2**63 - 1))


def test_manual_archive_is_prepared_and_read_with_train_ids(tmp_path, manual_dir, no_network):
  data_dir = str(tmp_path / "tfds")
  builder = pipeline.prepare_dataset("cityscapes", data_dir, manual_dir)
  assert builder.is_prepared()
  assert {name: info.num_examples for name, info in builder.info.splits.items()} == {
      split: len(ids) for split, (_, ids) in SPLITS.items()}
  expected = {image_id: index for _, image_id, index in _examples()}

  # Decoded at full resolution: the image as written, the mask the raw ids mapped to train ids (255 elsewhere).
  spec = decoders.get_spec("cityscapes")
  for split in SPLITS:
    seen = set()
    for example in builder.as_dataset(split=split, decoders=decoders.skip_decoding(spec)):
      image_id = example["image_id"].numpy().decode()
      decoded = decoders.decode_example(spec, example, features=builder.info.features)
      index = expected[image_id]
      np.testing.assert_array_equal(decoded["image"], _image(index))
      np.testing.assert_array_equal(decoded["mask"], TRAIN_ID[_raw_labels(index)])
      assert int(decoded["image_id"]) == _id_hash(image_id)
      assert decoded["boxes"].shape == (0, 4)
      seen.add(image_id)
    assert seen == {_image_id(*ids) for ids in SPLITS[split][1]}
  masks = np.stack([TRAIN_ID[_raw_labels(i)] for i in expected.values()])
  assert (masks == 255).any() and len(np.unique(masks)) == 20  # every train id and the ignore index

  # The evaluation pipeline (fit-to-canvas, no augmentation) on the prepared data: cells stay exact at 1/16.
  ds = pipeline.build_dataset(dataset="cityscapes", task="segmentation", split="validation", training=False,
                              image_size=CANVAS, global_batch_size=2, data_dir=data_dir, manual_dir=manual_dir)
  batches = list(ds)
  assert len(batches) == 1
  images, labels = batches[0]
  assert images.shape == (2, *CANVAS, 3) and images.dtype == tf.uint8
  by_hash = {_id_hash(image_id): index for image_id, index in expected.items()}
  for b in range(2):
    index = by_hash[int(labels["image_id"][b])]
    np.testing.assert_array_equal(labels["mask"][b], TRAIN_ID[_raw_labels(index)][::16, ::16])
    np.testing.assert_array_equal(labels["image_hw"][b], CITY_HW)
  np.testing.assert_allclose(labels["scale"], 1 / 16)
  assert labels["example_valid"].numpy().all()

  # Training (flip, scale jitter, crop): fixed shapes, only train ids and 255.
  ds = pipeline.build_dataset(dataset="cityscapes", task="segmentation", split="train", training=True,
                              image_size=CANVAS, global_batch_size=2, data_dir=data_dir, manual_dir=manual_dir,
                              seed=0)
  images, labels = next(iter(ds))
  assert images.shape == (2, *CANVAS, 3) and labels["mask"].shape == (2, *CANVAS)
  assert set(np.unique(labels["mask"])) <= set(range(19)) | {255}


def _train(config_name, model_dir, overrides, callbacks=()):
  """`tfreward train configs/cityscapes/<config_name> --model-dir model_dir --set ...` in-process; returns the
  exit code and the TrainResult (`trainer.train` wrapped to keep it and to add `callbacks`)."""
  results = []
  real_train = trainer.train

  def train(config, model_dir, **kwargs):
    results.append(real_train(config, model_dir, callbacks=list(callbacks), **kwargs))
    return results[-1]

  argv = ["train", os.path.join(CONFIGS, config_name), "--model-dir", model_dir]
  for override in (*SHRINK, *overrides):
    argv += ["--set", override]
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(trainer, "train", train)
    code = cli.main(argv)
  return code, (results[0] if results else None)


def _check_run(model_dir, result, terms):
  for name in ("config.yaml", "final.weights.h5", "checkpoints/latest.weights.h5", "metrics.json", "runtime.json"):
    assert os.path.exists(os.path.join(model_dir, name)), name
  for name in ("loss", *terms):
    values = result.history[name]
    assert len(values) == 1 and math.isfinite(values[0]), (name, values)
  with open(os.path.join(model_dir, "metrics.json")) as f:
    metrics = json.load(f)
  assert set(metrics) == {"mIoU"} and 0.0 <= metrics["mIoU"] <= 1.0, metrics
  config = trainer.saved_config_dict(model_dir)
  assert config["data"]["dataset"] == "cityscapes" and config["data"]["image_size"] == [64, 128]


class _StartState(keras.callbacks.Callback):
  """Records the weights and the optimizer step `fit` starts from."""

  weights = None
  iterations = None

  def on_train_begin(self, logs=None):
    self.weights = [w.numpy() for w in self.model.weights]
    self.iterations = int(self.model.optimizer.iterations.numpy())


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  """Empty: the first run prepares Cityscapes there from the manual download."""
  return str(tmp_path_factory.mktemp("cityscapes_tfds"))


@pytest.fixture(scope="module")
def ce_run(tmp_path_factory, manual_dir, data_dir, no_network):
  """Stage 1, shrunk: (exit code, model dir, TrainResult)."""
  model_dir = str(tmp_path_factory.mktemp("runs") / "deeplab_ce")
  code, result = _train("deeplabv3_r50_ce.yaml", model_dir,
                        [f"data.data_dir={data_dir}", f"data.manual_dir={manual_dir}"])
  return code, model_dir, result


@pytest.fixture(scope="module")
def reward_run(tmp_path_factory, ce_run, manual_dir, data_dir, no_network):
  """Stage 2, shrunk, from stage 1's final weights: (exit code, model dir, TrainResult, _StartState)."""
  code, ce_dir, _ = ce_run
  assert code == 0
  start = _StartState()
  model_dir = str(tmp_path_factory.mktemp("runs") / "deeplab_reward")
  code, result = _train("deeplabv3_r50_reward.yaml", model_dir,
                        [f"data.data_dir={data_dir}", f"data.manual_dir={manual_dir}",
                         f"train.init_checkpoint={os.path.join(ce_dir, trainer.FINAL_WEIGHTS)}"], [start])
  return code, model_dir, result, start


def test_ce_config_trains_two_steps(ce_run):
  code, model_dir, result = ce_run
  assert code == 0 and result is not None
  o = result.model.options
  assert (o.backbone, o.output_stride, o.aux_head, o.aux_weight, o.mode) == ("resnet10", 8, True, 0.4, "ce")
  assert int(result.model.optimizer.iterations.numpy()) == 2
  _check_run(model_dir, result, ("loss_ce", "loss_aux"))


def test_reward_config_trains_two_steps_from_the_ce_weights(ce_run, reward_run):
  code, model_dir, result, start = reward_run
  assert code == 0 and result is not None
  o = result.model.options
  assert (o.mode, o.estimator, o.baseline_weight, o.class_weights) == ("reward", "weighted_ce", 0.1, "frequency")
  assert o.aux_head and o.output_stride == 8
  ce_weights = [w.numpy() for w in ce_run[2].model.weights]  # stage 1's final weights, as saved
  assert len(start.weights) == len(ce_weights)
  for started, ce in zip(start.weights, ce_weights):
    np.testing.assert_array_equal(started, ce)
  _check_run(model_dir, result, ("loss_reward", "loss_aux", "reward", "miou_greedy"))


def test_reward_run_uses_the_frequency_class_weights(reward_run):
  result = reward_run[2]
  assert result.model.class_weights is not None and len(result.model.class_weights) == 19
  # From the labelled pixels of the train split (the same shares at any cell-aligned scale).
  from tfreward.models.deeplab.model import frequency_class_weights
  train_ids = np.concatenate([TRAIN_ID[_raw_labels(i)].ravel() for s, _, i in _examples() if s == "train"])
  counts = np.bincount(train_ids[train_ids < 19], minlength=19)
  np.testing.assert_allclose(result.model.class_weights, frequency_class_weights(counts, 0.05), rtol=1e-5)


def test_reward_run_starts_a_fresh_optimizer(reward_run):
  # Keras' .weights.h5 holds the optimizer too; train.init_checkpoint must take only the model's weights, so the
  # stage's schedule starts at step 0.
  result, start = reward_run[2], reward_run[3]
  assert start.iterations == 0
  assert int(result.model.optimizer.iterations.numpy()) == 2
