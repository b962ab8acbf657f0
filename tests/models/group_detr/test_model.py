"""Group DETR on Conditional DETR: group isolation, XLA train step, 1 replica = 2, bfloat16, empty images, the
max_instances > num_queries error, the backbone learning-rate multiplier, the backbones' wiring, detect, config."""

import math

import keras
import numpy as np
import pytest
import tensorflow as tf

from tfreward import testing
from tfreward.errors import ConfigError
from tfreward.export import saved_model
from tfreward.export.served import ServedDetector
from tfreward.models.group_detr import GroupDetr, GroupDetrOptions, layers

IMAGE_SIZE = (64, 64)
NUM_CLASSES = 3
TINY = dict(backbone="small_cnn", backbone_width=8, backbone_stages=3, hidden_dim=16, num_heads=2, encoder_layers=1,
            decoder_layers=2, ffn_dim=32, dropout=0.0, num_queries=6, num_groups=3)


def _model(clip_norm=None, **options):
  model = GroupDetr({**TINY, **options}, num_classes=NUM_CLASSES, image_size=IMAGE_SIZE, clip_norm=clip_norm)
  model.build_for_training()
  return model


def _batch(n=4, seed=0, max_instances=5):
  """Images 0..255 and labels; image 0 has no object, image 1 two, the others up to `max_instances`."""
  rng = np.random.default_rng(seed)
  images = rng.integers(0, 255, (n, *IMAGE_SIZE, 3)).astype(np.uint8)
  lo = rng.uniform(0.0, 0.6, (n, max_instances, 2))
  boxes = np.concatenate([lo, lo + rng.uniform(0.05, 0.4, (n, max_instances, 2))], -1).astype(np.float32)
  counts = rng.integers(1, max_instances + 1, n)
  counts[0], counts[1 % n] = 0, min(2, max_instances)
  valid = np.arange(max_instances)[None] < counts[:, None]
  classes = np.where(valid, rng.integers(0, NUM_CLASSES, (n, max_instances)), -1).astype(np.int32)
  return images, {"boxes": boxes * valid[..., None], "classes": classes, "valid": valid}


def _empty(labels):
  return {"boxes": np.zeros_like(labels["boxes"]), "classes": np.full_like(labels["classes"], -1),
          "valid": np.zeros_like(labels["valid"])}


def _finite(tree):
  return all(np.all(np.isfinite(np.asarray(x))) for x in tf.nest.flatten(tree) if x is not None)


# === Outputs ===


def test_outputs_initialisation_and_group_isolation():
  model = _model()
  images = tf.constant(_batch(2)[0])
  train = model(images, training=True)
  infer = model(images, training=False)
  assert train["logits"].shape == (2, 2, 18, NUM_CLASSES) and train["boxes"].shape == (2, 2, 18, 4)
  assert infer["logits"].shape == (2, 2, 6, NUM_CLASSES) and infer["logits"].dtype == tf.float32
  # Focal prior: every score starts at 0.01 exactly (the class head's bias; its kernel is random).
  prior = -math.log((1 - 0.01) / 0.01)
  np.testing.assert_allclose(model.class_head.bias.numpy(), prior, rtol=1e-6)
  # Zero-initialised box offsets: every layer predicts the reference point with w = h = 0.5.
  _, reference = model.decoder(tf.zeros([1, 4, 16]), layers.sine_position_encoding(2, 2, 16),
                               model.query_embed[:6])
  np.testing.assert_allclose(infer["boxes"][-1, 0, :, :2], reference, rtol=1e-5)
  np.testing.assert_allclose(infer["boxes"][..., 2:], 0.5)
  # Groups never attend to each other: the first training group equals inference, and changing the embeddings
  # of the other groups leaves it unchanged.
  np.testing.assert_allclose(train["logits"][:, :, :6], infer["logits"], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(train["boxes"][:, :, :6], infer["boxes"], rtol=1e-5, atol=1e-6)
  model.query_embed.assign(tf.concat([model.query_embed[:6], -model.query_embed[6:]], 0))
  changed = model(images, training=True)
  np.testing.assert_allclose(changed["logits"][:, :, :6], train["logits"][:, :, :6], rtol=1e-5, atol=1e-6)
  assert not np.allclose(changed["logits"][:, :, 6:], train["logits"][:, :, 6:])


def test_batched_equals_per_image():
  model = _model()
  images = _batch(3, seed=5)[0]
  batched = model.detect(tf.constant(images))
  for b in range(3):
    single = model.detect(tf.constant(images[b:b + 1]))
    for key in ("boxes", "scores"):
      np.testing.assert_allclose(single[key][0], batched[key][b], rtol=1e-5, atol=1e-6)


# === Losses and steps ===


def test_losses_xla_equal_eager_and_are_finite_without_objects():
  model = _model()
  images, labels = _batch(4, seed=1)
  step = tf.function(lambda x, y: model.compute_losses(x, y, training=True), jit_compile=True)
  for case in (labels, _empty(labels)):
    eager = model.compute_losses(tf.constant(images), case, training=True)
    compiled = step(tf.constant(images), case)
    assert set(eager) == {"loss_ce", "loss_bbox", "loss_giou", "class_error", "cardinality_error", "loss_ce_0",
                          "loss_bbox_0", "loss_giou_0", "cardinality_error_0"}
    assert _finite(eager) and _finite(compiled)
    for key in eager:
      np.testing.assert_allclose(compiled[key], eager[key], rtol=1e-5, atol=1e-6, err_msg=key)
  empty = model.compute_losses(tf.constant(images), _empty(labels), training=True)
  assert float(empty["loss_bbox"]) == 0.0 and float(empty["loss_giou"]) == 0.0 and float(empty["loss_ce"]) > 0.0
  grads, total, _ = model.compute_gradients(tf.constant(images), _empty(labels))
  assert np.isfinite(float(total)) and _finite(grads)
  assert set(model.loss_weights) == {"loss_ce", "loss_bbox", "loss_giou", "loss_ce_0", "loss_bbox_0", "loss_giou_0"}


def test_more_objects_than_queries_is_a_config_error():
  model = _model(num_queries=4)
  images, labels = _batch(2, max_instances=5)
  with pytest.raises(ConfigError, match="max_instances.*num_queries"):
    model.compute_losses(tf.constant(images), labels, training=True)
  model.compile(optimizer=keras.optimizers.AdamW(1e-3), jit_compile=True)
  data = tf.data.Dataset.from_tensor_slices((images, labels)).repeat().batch(2, drop_remainder=True)
  with pytest.raises(ConfigError, match="num_queries"):
    model.fit(data, epochs=1, steps_per_epoch=1, verbose=0)


def test_fit_with_xla_default_strategy():
  images, labels = _batch(8, seed=2)
  model = _model(clip_norm=0.1)
  model.compile(optimizer=keras.optimizers.AdamW(1e-3, weight_decay=1e-4), jit_compile=True)
  data = tf.data.Dataset.from_tensor_slices((images, labels)).repeat().batch(4, drop_remainder=True)
  before = [v.numpy() for v in model.trainable_variables]
  history = model.fit(data, epochs=1, steps_per_epoch=2, verbose=0).history
  assert set(history) == {"loss", "loss_ce", "loss_bbox", "loss_giou", "class_error", "cardinality_error"}
  assert _finite(history)
  assert all(not np.array_equal(b, v.numpy()) for b, v in zip(before, model.trainable_variables))


def test_two_replicas_equal_one_replica(two_replica_strategy):
  """Loss, clipped gradients and one AdamW step (backbone multiplier 0.5) on 2 replicas equal 1 replica.

  Measured in float32: loss terms agree to 1e-7 relative, gradients to 1.5e-7 of their global norm (the largest
  per-variable difference is 1.3e-7 of the largest gradient).
  """
  images, labels = _batch(4, seed=3)
  options = dict(clip_norm=0.1, backbone_lr_multiplier=0.5)
  single = _model(**options)
  single.compile(optimizer=keras.optimizers.AdamW(1e-2))
  single.build_for_training()
  with two_replica_strategy.scope():
    mirrored = _model(**options)
    mirrored.compile(optimizer=keras.optimizers.AdamW(1e-2))
    mirrored.build_for_training()
  grads, grads2 = testing.assert_replicas_match_single(single, mirrored, two_replica_strategy, images, labels)
  assert float(tf.linalg.global_norm([a - b for a, b in zip(grads, grads2)])) < 1e-5 * float(
      tf.linalg.global_norm(grads))

  # The whole train step, with the backbone's update scaled in cross-replica context.
  single_logs = single.train_step((tf.constant(images), labels))

  @tf.function
  def distributed_step(data):
    return two_replica_strategy.run(mirrored.train_step, args=(data,))

  logs = distributed_step(testing.split_batch(two_replica_strategy, images, labels))
  np.testing.assert_allclose(two_replica_strategy.experimental_local_results(logs["loss"])[0],
                             single_logs["loss"], rtol=1e-5)
  for a, b in zip(single.trainable_variables, mirrored.trainable_variables):
    for replica_value in b.value.values:
      np.testing.assert_allclose(replica_value.numpy(), a.numpy(), rtol=1e-5, atol=1e-6, err_msg=a.path)


@pytest.mark.parametrize("optimizer", [lambda: keras.optimizers.AdamW(1e-2, weight_decay=0.1),
                                       lambda: keras.optimizers.SGD(1e-2, momentum=0.9)], ids=["adamw", "sgd"])
def test_backbone_lr_multiplier_scales_the_backbone_update(optimizer):
  """`learning_rate_multipliers` -> TaskModel.apply_gradients: the backbone moves 0.25 x as far, the rest alike."""
  images, labels = _batch(4, seed=5)
  full, scaled = _model(backbone_lr_multiplier=1.0), _model(backbone_lr_multiplier=0.25)
  scaled.set_weights(full.get_weights())
  deltas = []
  for model in (full, scaled):
    model.compile(optimizer=optimizer())
    model.build_for_training()
    start = [v.numpy() for v in model.trainable_variables]
    model.train_step((tf.constant(images), labels))
    deltas.append([v.numpy() - s for v, s in zip(model.trainable_variables, start)])
  backbone = {id(v) for v in full.backbone.trainable_variables}
  assert backbone
  for var, a, b in zip(full.trainable_variables, *deltas):
    np.testing.assert_allclose(b, 0.25 * a if id(var) in backbone else a, rtol=1e-4, atol=1e-7, err_msg=var.path)


def test_mixed_bfloat16_step():
  previous = keras.mixed_precision.global_policy()
  keras.mixed_precision.set_global_policy("mixed_bfloat16")
  try:
    model = _model()
    images, labels = _batch(4, seed=6)
    outputs = model(tf.constant(images), training=True)
    assert model.decoder.compute_dtype == "bfloat16" and model.query_embed.dtype == "float32"
    assert outputs["logits"].dtype == tf.float32 and outputs["boxes"].dtype == tf.float32
    model.compile(optimizer=keras.optimizers.AdamW(1e-3))
    logs = model.train_step((tf.constant(images), labels))
    detections = model.detect(tf.constant(images))
  finally:
    keras.mixed_precision.set_global_policy(previous)
  assert _finite({k: v for k, v in logs.items()}) and float(logs["loss"]) > 0.0
  assert detections["scores"].dtype == tf.float32 and _finite(detections)


# === Inference ===


def test_detect_is_fixed_size_and_compiles_with_xla():
  model = _model()
  images = tf.constant(_batch(3)[0])
  eager = model.detect(images)
  compiled = tf.function(model.detect, jit_compile=True)(images)
  for key in eager:
    np.testing.assert_allclose(compiled[key], eager[key], rtol=1e-5, atol=1e-6, err_msg=key)
  assert eager["boxes"].shape == (3, 100, 4) and eager["classes"].dtype == tf.int32
  pairs = 6 * NUM_CLASSES  # Q * C < K: the rest is padding
  assert eager["num_detections"].numpy().tolist() == [pairs] * 3
  assert np.all(eager["classes"][:, pairs:].numpy() == -1) and np.all(eager["scores"][:, pairs:].numpy() == 0)
  # The slots are every (query, class) pair of the first group, best first.
  probs = tf.sigmoid(model(images)["logits"][-1]).numpy().reshape(3, -1)
  np.testing.assert_allclose(eager["scores"][:, :pairs], -np.sort(-probs, axis=1), rtol=1e-6)
  boxes = eager["boxes"][:, :pairs].numpy()
  assert np.all((boxes >= 0) & (boxes <= 1)) and np.all(boxes[..., 2:] >= boxes[..., :2])
  few = _model(max_detections=5).detect(images)
  assert few["boxes"].shape == (3, 5, 4) and few["num_detections"].numpy().tolist() == [5] * 3


# === Config and backbones ===


def test_config_roundtrip():
  model = _model(num_groups=2, aux_loss=False, max_detections=7)
  config = model.get_config()
  assert config["options"] == {**vars(GroupDetrOptions()), **TINY, "num_groups": 2, "aux_loss": False,
                               "max_detections": 7}
  clone = GroupDetr.from_config(config)
  assert clone.get_config() == config and set(clone.loss_weights) == {"loss_ce", "loss_bbox", "loss_giou"}
  clone.build_for_training()
  clone.set_weights(model.get_weights())
  images = tf.constant(_batch(2)[0])
  np.testing.assert_allclose(clone(images)["boxes"], model(images)["boxes"], rtol=1e-6)


def test_resnet50_backbone_is_frozen_like_detr():
  """ResNet-50's C5 at stride 32, BatchNorm frozen, stem and first stage not trained; the rest at the multiplier."""
  model = _model(backbone="resnet50", backbone_lr_multiplier=0.1)
  features = model._features(tf.zeros([1, *IMAGE_SIZE, 3]), training=True)
  assert features.shape == (1, 2, 2, 2048)
  names = {v.path.split("/")[-2] for v in model.backbone.trainable_variables}
  assert names and not any(n.startswith(("conv1_", "conv2_")) or n.endswith("_bn") for n in names)
  assert any(n.startswith("conv3_") for n in names)
  [(variables, multiplier)] = model.learning_rate_multipliers()
  assert multiplier == 0.1 and [v.path for v in variables] == [v.path for v in model.backbone.trainable_variables]


def test_exported_saved_model_serves_the_first_group(tmp_path):
  """The SavedModel's `serve_images` on canvases gives `detect`'s detections (first group only), in pixels."""
  model = _model()
  saved_model.export_saved_model(model, tmp_path / "export")
  images = _batch(2, seed=7)[0]
  direct = model.detect(tf.constant(images))
  served = ServedDetector(str(tmp_path / "export"), IMAGE_SIZE).detect(tf.constant(images))
  for key in direct:
    np.testing.assert_allclose(served[key], direct[key], rtol=1e-5, atol=1e-5, err_msg=key)
  assert served["boxes"].shape == (2, 100, 4) and served["num_detections"].numpy().tolist() == [6 * NUM_CLASSES] * 2
