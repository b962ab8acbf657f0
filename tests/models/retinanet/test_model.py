"""Tests for tfreward.models.retinanet.model: output shapes and anchor order, the XLA train step under fit, 2 replicas
equal 1 (loss and gradients), mixed_bfloat16, no NaN on empty / tiny / all-padding labels, detect (eager equals
XLA), config round trip, bad arguments, SavedModel serving. The backbone's own tests: tests/models/test_backbones.py.

Tests that XLA-compile the whole model, run it on 2 replicas or serve it from a subprocess take 15-60 s each on 2
CPU cores and are marked slow (`-m slow` runs them, `-m "not slow"` skips them)."""

import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

from tfreward import strategy as strategies, testing
from tfreward.export import saved_model
from tfreward.models.retinanet import RetinaNet, RetinaNetOptions
from tfreward.ops.anchors import feature_map_sizes

IMAGE_SIZE = (64, 64)
NUM_CLASSES = 3
TINY = dict(backbone_width=8, fpn_channels=16, head_convs=1, head_channels=16)
LOSSES = ["free_anchor", "retinanet"]


def _model(loss="free_anchor", clip_norm=None, **options):
  model = RetinaNet({**TINY, "loss": loss, **options}, num_classes=NUM_CLASSES, image_size=IMAGE_SIZE,
                    clip_norm=clip_norm)
  model.build_for_training()
  return model


def _batch(n=4, seed=0):
  """Random images; objects of 12-40 px (some images without any), classes -1 and zero boxes on padding."""
  rng = np.random.default_rng(seed)
  images = rng.integers(0, 255, (n, *IMAGE_SIZE, 3)).astype(np.uint8)
  lo = rng.uniform(0.0, 0.5, (n, 4, 2))
  boxes = np.concatenate([lo, lo + rng.uniform(0.2, 0.5, (n, 4, 2))], -1).astype(np.float32)
  valid = np.arange(4)[None, :] < rng.integers(1, 5, (n, 1))
  valid[-1] = False
  classes = np.where(valid, rng.integers(0, NUM_CLASSES, (n, 4)), -1).astype(np.int32)
  return images, {"boxes": boxes * valid[..., None], "classes": classes, "valid": valid}


def _finite(values):
  return all(np.isfinite(np.asarray(v)).all() for v in values)


# === Layers and outputs ===

def test_outputs_follow_anchor_order_and_prior_bias():
  model = _model()
  cls_logits, box_deltas = model(tf.zeros([2, *IMAGE_SIZE, 3]))
  num_anchors = 9 * sum(h * w for h, w in feature_map_sizes(IMAGE_SIZE))
  assert model.anchors().shape == (num_anchors, 4)
  assert cls_logits.shape == (2, num_anchors, NUM_CLASSES) and box_deltas.shape == (2, num_anchors, 4)
  assert cls_logits.dtype == tf.float32 and box_deltas.dtype == tf.float32
  np.testing.assert_allclose(model.head.cls_out.bias, -np.log(99.0), rtol=1e-6)
  np.testing.assert_allclose(tf.reduce_mean(tf.sigmoid(cls_logits)), 0.01, rtol=0.1)
  # Level sizes of the FPN are those of the anchor generator, 9 anchors per cell, level after level.
  features = model.neck(model.backbone(tf.zeros([1, *IMAGE_SIZE, 3])))
  assert [tuple(f.shape[1:3]) for f in features] == feature_map_sizes(IMAGE_SIZE)
  # The class logits of level 0, cell (row 1, col 2), anchor 4 sit at flat index (1 * 8 + 2) * 9 + 4.
  raw = features[0]
  for layer in model.head.cls_convs:
    raw = layer(raw)
  raw = model.head.cls_out(raw)  # [1, 8, 8, 9 * C]
  flat, _ = model.head(features)
  np.testing.assert_allclose(flat[0, (1 * 8 + 2) * 9 + 4], raw[0, 1, 2, 4 * NUM_CLASSES:5 * NUM_CLASSES])


# === Losses and the train step ===

@pytest.mark.slow
def test_train_step_xla_equals_eager():
  model = _model(clip_norm=35.0)
  images, labels = _batch()
  grads, total, terms = model.compute_gradients(tf.constant(images), labels)
  compiled = tf.function(model.compute_gradients, jit_compile=True)(tf.constant(images), labels)
  assert set(terms) == set(model.log_names) == set(model.loss_weights) == {"positive_bag_loss", "negative_bag_loss"}
  np.testing.assert_allclose(compiled[1], total, rtol=1e-5)
  for k in terms:
    np.testing.assert_allclose(compiled[2][k], terms[k], rtol=1e-5)
  scale = max(float(tf.reduce_max(tf.abs(g))) for g in grads)
  for a, b in zip(grads, compiled[0]):
    np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5 * scale)


@pytest.mark.slow
def test_retinanet_loss_in_the_model_xla_equals_eager():
  model = _model("retinanet")
  images, labels = _batch()
  eager = model.compute_losses(tf.constant(images), labels, training=False)
  compiled = tf.function(lambda x, y: model.compute_losses(x, y, training=False), jit_compile=True)(images, labels)
  assert set(eager) == set(model.log_names) == set(model.loss_weights) == {"cls_loss", "box_loss"}
  for k in eager:
    np.testing.assert_allclose(compiled[k], eager[k], rtol=1e-5)


@pytest.mark.parametrize("loss", LOSSES)
def test_no_nan_without_objects_tiny_objects_and_all_padding(loss):
  model = _model(loss)
  images, labels = _batch()
  tiny = dict(labels, boxes=np.tile([[[0.1, 0.1, 0.12, 0.13], [0.5, 0.5, 0.5, 0.52], [0.7, 0.2, 0.72, 0.21],
                                      [0.0, 0.0, 0.0, 0.0]]], [4, 1, 1]).astype(np.float32),
              valid=np.ones([4, 4], bool), classes=np.ones([4, 4], np.int32))
  padding = dict(labels, valid=np.zeros([4, 4], bool), classes=np.full([4, 4], -1, np.int32))
  for case in (labels, tiny, padding):  # labels: the last image has no object
    grads, total, terms = model.compute_gradients(tf.constant(images), case)
    assert _finite([total, *terms.values()]) and _finite(grads)
  # All padding: only the negative / background term is left and it still trains the class logits.
  zero, positive = ("positive_bag_loss", "negative_bag_loss") if loss == "free_anchor" else ("box_loss", "cls_loss")
  assert float(terms[zero]) == 0.0 and float(terms[positive]) > 0.0


@pytest.mark.slow
def test_two_replicas_equal_one_replica(two_replica_strategy):
  images, labels = _batch(8, seed=1)
  single = _model(clip_norm=1.0)
  with two_replica_strategy.scope():
    mirrored = _model(clip_norm=1.0)
  testing.assert_replicas_match_single(single, mirrored, two_replica_strategy, images, labels)
  # Synchronized BN: the moving statistics match too.
  for a, b in zip(single.non_trainable_weights, mirrored.non_trainable_weights):
    np.testing.assert_allclose(b.numpy(), a.numpy(), rtol=1e-5, atol=1e-7)


@pytest.mark.slow
def test_fit_two_steps_with_xla_then_predict_equals_eager_detect():
  strategy = tf.distribute.get_strategy()
  images, labels = _batch(8)
  model = RetinaNet({**TINY, "score_threshold": 0.0, "max_detections": 20, "pre_nms_top_k": 200},
                    num_classes=NUM_CLASSES, image_size=IMAGE_SIZE, clip_norm=35.0)
  assert strategies.use_xla_in_compile(strategy)
  model.compile(optimizer=keras.optimizers.SGD(0.01, momentum=0.9), jit_compile=True)
  model.build_for_training()
  before = [w.numpy() for w in model.trainable_weights]
  data = tf.data.Dataset.from_tensor_slices((images, labels)).repeat().batch(4, drop_remainder=True)
  history = model.fit(data, epochs=1, steps_per_epoch=2, verbose=0).history
  assert set(history) == {"loss", *model.log_names} and _finite(v for vs in history.values() for v in vs)
  assert any(not np.array_equal(a, w.numpy()) for a, w in zip(before, model.trainable_weights))
  compiled = model.predict(images[:3], batch_size=3, verbose=0)  # predict_step under XLA
  eager = model.detect(tf.constant(images[:3]))
  for k in eager:
    np.testing.assert_allclose(compiled[k], eager[k], rtol=1e-5, atol=1e-6)
  boxes, classes = eager["boxes"].numpy(), eager["classes"].numpy()
  assert boxes.shape == (3, 20, 4) and eager["scores"].shape == (3, 20) and eager["num_detections"].shape == (3,)
  assert classes.dtype == np.int32 and eager["num_detections"].dtype == tf.int32
  filled = np.arange(20)[None] < eager["num_detections"].numpy()[:, None]
  assert filled[:, 0].all() and ((classes >= 0) == filled).all()
  assert (boxes >= 0).all() and (boxes <= 1).all()
  assert (boxes[..., 2] >= boxes[..., 0]).all() and (boxes[..., 3] >= boxes[..., 1]).all()
  assert (np.diff(eager["scores"].numpy(), axis=1) <= 0).all()
  # A threshold above every score leaves only padding.
  model.options.score_threshold = 1.0
  empty = model.detect(tf.constant(images[:3]))
  assert empty["num_detections"].numpy().tolist() == [0, 0, 0] and (empty["classes"].numpy() == -1).all()


# The step runs under XLA, as `fit` runs it under the default strategy and TPUStrategy. Eager TensorFlow on CPU has a
# oneDNN bug: the bfloat16 filter gradient of a stride-2 3x3 conv over a 1x1 map (P7 here, from a 1x1 P6 at 64 px)
# reads uninitialised memory (NaN or 1e13 at random); XLA computes it correctly (docs/freeanchor.md).
def test_mixed_bfloat16_trains():
  keras.utils.set_random_seed(1)
  previous = keras.mixed_precision.global_policy()
  keras.mixed_precision.set_global_policy("mixed_bfloat16")
  try:
    model = _model(clip_norm=35.0)
    optimizer = keras.optimizers.SGD(0.01)
    model.build_for_training(optimizer)
  finally:
    keras.mixed_precision.set_global_policy(previous)
  assert model.head.cls_out.compute_dtype == "bfloat16" and model.head.cls_out.kernel.dtype == "float32"
  images, labels = _batch(4)

  @tf.function(jit_compile=True)
  def step(x, y):
    grads, total, terms = model.compute_gradients(x, y)
    optimizer.apply(model.clip_gradients(grads), model.trainable_variables)
    return grads, total, terms

  grads, total, terms = step(tf.constant(images), labels)
  assert all(g.dtype == tf.float32 for g in grads) and _finite([total, *terms.values()]) and _finite(grads)
  assert _finite(model.trainable_variables)
  cls_logits, _ = model(images)
  assert cls_logits.dtype == tf.float32 and float(model.compute_losses(images, labels, False)["positive_bag_loss"]) > 0


# === Config ===

def test_get_config_round_trip():
  model = _model("retinanet", score_threshold=0.1, aspect_ratios=(1.0, 2.0), scales_per_octave=2,
                 head_group_norm=True, clip_norm=35.0)
  config = model.get_config()
  assert config["options"]["aspect_ratios"] == (1.0, 2.0) and config["clip_norm"] == 35.0
  clone = RetinaNet.from_config(config)
  assert clone.get_config() == config and clone.options == model.options
  assert clone.loss_weights == {"cls_loss": 1.0, "box_loss": 1.0} and clone.log_names == ("cls_loss", "box_loss")
  clone.build_for_training()
  assert clone.count_params() == model.count_params()  # 6 anchors per cell in both
  assert _finite(model(_batch(2)[0]))


def test_loss_weights_and_recipe():
  model = RetinaNet({**TINY, "loss": "retinanet", "bbox_loss_weight": 2.0}, num_classes=NUM_CLASSES,
                    image_size=IMAGE_SIZE)
  assert model.loss_weights == {"cls_loss": 1.0, "box_loss": 2.0}
  free_anchor = RetinaNet(RetinaNetOptions(**TINY), num_classes=2, image_size=IMAGE_SIZE)
  assert free_anchor.options.bbox_weight == 0.75  # inside P_loc, not a weight of the total
  assert free_anchor.loss_weights == {"positive_bag_loss": 1.0, "negative_bag_loss": 1.0}
  assert free_anchor.recipe_callbacks() == [] and free_anchor.learning_rate_multipliers() == []


def test_backbone_sizes():
  resnet18 = RetinaNet({**TINY, "backbone": "resnet18"}, num_classes=NUM_CLASSES, image_size=IMAGE_SIZE)
  assert (resnet18.backbone.size, len(resnet18.backbone.blocks), resnet18.backbone.width) == (18, 8, 8)
  assert RetinaNet(TINY, num_classes=NUM_CLASSES, image_size=IMAGE_SIZE).backbone.size == 10  # the default


def test_bad_arguments():
  with pytest.raises(ValueError, match=r"data\.image_size must be multiples of 32"):
    RetinaNet(num_classes=3, image_size=(72, 64))
  with pytest.raises(ValueError, match="num_classes"):
    RetinaNet(num_classes=0, image_size=IMAGE_SIZE)
  with pytest.raises(ValueError, match="pre_anchor_topk"):
    RetinaNet({"pre_anchor_topk": 500}, num_classes=3, image_size=(32, 32))
  with pytest.raises(ValueError, match="options must be a RetinaNetOptions"):
    RetinaNet("free_anchor", num_classes=3, image_size=IMAGE_SIZE)


# === Export ===

SERVE = r"""
import json, sys
for blocked in ("keras", "tf_keras", "tfreward"):
  sys.modules[blocked] = None
import numpy as np
import tensorflow as tf
loaded = tf.saved_model.load(sys.argv[1])
images = tf.constant(np.load(sys.argv[2]))
out = loaded.signatures["serve_images"](images=images)
print(json.dumps({k: v.numpy().tolist() for k, v in out.items()}))
"""


@pytest.mark.slow
def test_exported_saved_model_serves(tmp_path):
  model = _model(score_threshold=0.0, max_detections=10, pre_nms_top_k=100)
  rng = np.random.default_rng(3)  # weights away from their initial values: the export must carry them
  model.set_weights([w + rng.normal(0, 0.01, w.shape).astype(w.dtype) for w in model.get_weights()])
  images = _batch(2)[0]
  saved_model.export_saved_model(model, tmp_path / "export")
  np.save(tmp_path / "images.npy", images)
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", CUDA_VISIBLE_DEVICES="")
  proc = subprocess.run([sys.executable, "-c", SERVE, str(tmp_path / "export"), str(tmp_path / "images.npy")],
                        capture_output=True, text=True, env=env, timeout=300, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  served = json.loads(proc.stdout.strip().splitlines()[-1])
  expected = model.detect(tf.constant(images, tf.float32))
  assert served["num_detections"] == expected["num_detections"].numpy().tolist() == [10, 10]
  assert served["image_hw"] == [list(IMAGE_SIZE)] * 2
  np.testing.assert_allclose(served["scores"], expected["scores"], rtol=1e-5)
  np.testing.assert_array_equal(served["classes"], expected["classes"])
  # Same-size images are served on the canvas at scale 1: pixel boxes are the normalised boxes times 64.
  np.testing.assert_allclose(served["boxes"], expected["boxes"].numpy() * 64.0, rtol=1e-4, atol=1e-3)
