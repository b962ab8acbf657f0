"""Tests for tfreward.models.deeplab: shapes, losses (XLA, all ignored, replicas), options, a few fit steps."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from tfreward import registry, testing
from tfreward.errors import ConfigError
from tfreward.models.deeplab import DeepLab, DeepLabOptions

IMAGE_SIZE = (64, 64)
NUM_CLASSES = 3
TINY = {"backbone": "resnet10", "backbone_width": 8, "aspp_channels": 16}


def _model(**options):
  keras.utils.set_random_seed(0)
  model = DeepLab({**TINY, **options}, num_classes=NUM_CLASSES, image_size=IMAGE_SIZE)
  model.build_for_training()  # variables created here, not inside a replica function
  return model


def _batch(batch=2, seed=0):
  """Images with a bright square (class 1) or a dark one (class 2) on grey (class 0); a border of 255s."""
  rng = np.random.default_rng(seed)
  images = np.full((batch, *IMAGE_SIZE, 3), 100, np.uint8)
  mask = np.zeros((batch, *IMAGE_SIZE), np.int32)
  for b in range(batch):
    y, x = rng.integers(0, 32, 2)
    cls = 1 + b % 2
    images[b, y:y + 24, x:x + 24] = 230 if cls == 1 else 20
    mask[b, y:y + 24, x:x + 24] = cls
  images = np.clip(images + rng.integers(-10, 10, images.shape), 0, 255).astype(np.uint8)
  mask[:, :2] = 255
  return images, {"mask": mask}


def test_registered_as_segmentation():
  family = registry.get_family("deeplab")
  assert family.model_cls is DeepLab and family.task == "segmentation"


@pytest.mark.parametrize("output_stride", [16, 8])
def test_call_and_segment_shapes(output_stride):
  model = _model(output_stride=output_stride)
  images, _ = _batch()
  logits = model(images)
  assert logits.shape == (2, *IMAGE_SIZE, NUM_CLASSES) and logits.dtype == tf.float32
  labels = model.segment(tf.constant(images))
  assert set(labels) == {"labels"}
  assert labels["labels"].shape == (2, *IMAGE_SIZE) and labels["labels"].dtype == tf.int32
  np.testing.assert_array_equal(labels["labels"], np.argmax(logits.numpy(), -1))
  assert model.backbone.output_stride == output_stride
  assert model.aspp.rates == ((6, 12, 18) if output_stride == 16 else (12, 24, 36))


def test_aux_head_outputs_and_loss_terms():
  model = _model(aux_head=True, aux_weight=0.5)
  images, labels = _batch()
  logits, aux = model(images)
  assert logits.shape == aux.shape == (2, *IMAGE_SIZE, NUM_CLASSES)
  assert model.loss_weights == {"loss_ce": 1.0, "loss_aux": 0.5} and model.log_names == ("loss_ce", "loss_aux")
  terms = model.compute_losses(tf.constant(images), labels, training=False)
  assert set(terms) == {"loss_ce", "loss_aux"} and all(np.isfinite(v) for v in terms.values())
  assert model.segment(tf.constant(images))["labels"].shape == (2, *IMAGE_SIZE)


def test_loss_is_the_mean_cross_entropy_over_kept_pixels():
  model = _model()
  images, labels = _batch()
  labels["mask"][0, 10:20] = 7  # out of range: ignored like 255
  logits = model(images).numpy()
  mask = labels["mask"]
  keep = mask < NUM_CLASSES
  log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  picked = np.take_along_axis(log_probs, np.where(keep, mask, 0)[..., None], -1)[..., 0]
  expected = -picked[keep].mean()
  terms = model.compute_losses(tf.constant(images), labels, training=False)
  assert model.loss_weights == {"loss_ce": 1.0} and model.log_names == ("loss_ce",)
  np.testing.assert_allclose(terms["loss_ce"], expected, rtol=1e-5)


@pytest.mark.parametrize("aux_head", [False, True])
def test_losses_under_xla_equal_eager(aux_head):
  model = _model(aux_head=aux_head)
  images, labels = _batch()
  eager = model.compute_losses(tf.constant(images), labels, training=False)
  compiled = tf.function(lambda x, y: model.compute_losses(x, y, training=False), jit_compile=True)(images, labels)
  for k in eager:
    np.testing.assert_allclose(compiled[k], eager[k], rtol=1e-5)
  segment = tf.function(model.segment, jit_compile=True)(tf.constant(images))["labels"]
  np.testing.assert_array_equal(segment, model.segment(tf.constant(images))["labels"])


def test_all_ignored_mask_gives_zero_loss_and_finite_gradients():
  model = _model(aux_head=True)
  images, labels = _batch()
  labels = {"mask": np.full_like(labels["mask"], 255)}
  grads, total, terms = model.compute_gradients(tf.constant(images), labels)
  assert float(total) == 0.0 and all(float(v) == 0.0 for v in terms.values())
  assert all(np.isfinite(g.numpy()).all() for g in grads if g is not None)


def test_two_replicas_equal_one_replica(two_replica_strategy):
  images, labels = _batch(4, seed=1)
  single = _model(dropout=0.0, aux_head=True)
  with two_replica_strategy.scope():
    mirrored = _model(dropout=0.0, aux_head=True)
  testing.assert_replicas_match_single(single, mirrored, two_replica_strategy, images, labels, rtol=1e-4)


@pytest.mark.parametrize("options, message", [
    ({"backbone": "resnet34"}, "model.backbone"),
    ({"backbone": "resnet10", "backbone_weights": "imagenet"}, "model.backbone_weights"),
    ({"output_stride": 32}, "model.output_stride"),
    ({"aspp_channels": 0}, "model.aspp_channels"),
    ({"backbone_width": 0}, "model.backbone_width"),
    ({"aspp_rates": ()}, "model.aspp_rates"),
    ({"aspp_rates": (6, 0, 18)}, "model.aspp_rates"),
    ({"aux_weight": -1.0}, "model.aux_weight"),
    ({"dropout": 1.0}, "model.dropout"),
    ({"dropout": float("nan")}, "model.dropout"),
])
def test_bad_options_raise_config_error(options, message):
  with pytest.raises(ConfigError, match=message):
    DeepLabOptions(**options)
  with pytest.raises(ConfigError, match=message):
    registry.parse_options("deeplab", options)


def test_defaults():
  opts = DeepLabOptions()
  assert (opts.backbone, opts.backbone_width, opts.backbone_weights, opts.output_stride) == ("resnet50", 64, None, 16)
  assert (opts.aspp_channels, opts.aspp_rates, opts.aux_head, opts.aux_weight) == (256, (6, 12, 18), False, 0.4)
  assert (opts.dropout, opts.sync_bn) == (0.1, True)
  assert DeepLabOptions(output_stride=8).rates == (12, 24, 36)


def test_fit_lowers_the_loss_then_predict_equals_segment():
  images, labels = _batch(4)
  model = _model(dropout=0.0)
  model.compile(optimizer=keras.optimizers.Adam(3e-3), jit_compile=True)
  model.build_for_training()
  data = tf.data.Dataset.from_tensors((images, labels)).repeat()
  history = model.fit(data, epochs=8, steps_per_epoch=1, verbose=0).history
  assert set(history) == {"loss", "loss_ce"}
  assert history["loss"][-1] < 0.9 * history["loss"][0], history["loss"]
  predicted = model.predict(images, batch_size=4, verbose=0)
  np.testing.assert_array_equal(predicted["labels"], model.segment(tf.constant(images))["labels"])


SERVE_LABELS = r"""
import json, sys
for blocked in ("keras", "tf_keras", "tfreward"):
  sys.modules[blocked] = None  # TensorFlow only
import tensorflow as tf
export_dir, paths = sys.argv[1], sys.argv[2:]
serve = tf.saved_model.load(export_dir).signatures["serving_default"]
out = serve(encoded_images=tf.stack([tf.io.read_file(p) for p in paths]))
print(json.dumps({k: v.numpy().tolist() for k, v in out.items()}))
"""


def test_export_serves_label_maps_at_the_original_size_from_tensorflow_alone(tmp_path):
  import json
  import subprocess
  import sys
  from tfreward.export import saved_model
  model = _model()
  images, _ = _batch(2)
  same_size = images[0]  # a canvas-sized image: serving is the identity geometry, labels == segment()
  tall = np.repeat(images[1][:, ::2], 3, axis=0)[:96]  # 96 x 32: resized by 2/3 onto the canvas, padded on the right
  paths = []
  for name, image in (("a", same_size), ("b", tall)):
    paths.append(str(tmp_path / f"{name}.png"))
    tf.io.write_file(paths[-1], tf.io.encode_png(image))
  saved_model.export_saved_model(model, tmp_path / "export")
  proc = subprocess.run([sys.executable, "-c", SERVE_LABELS, str(tmp_path / "export"), *paths],
                        capture_output=True, text=True, timeout=300, check=True)
  out = json.loads(proc.stdout.strip().splitlines()[-1])
  labels = np.array(out["labels"])
  assert out["image_hw"] == [[64, 64], [96, 32]] and labels.shape == (2, 96, 64)
  np.testing.assert_array_equal(labels[0, :64], model.segment(tf.constant(same_size[None]))["labels"][0])
  assert (labels[0, 64:] == -1).all() and (labels[1, :, 32:] == -1).all()
  assert set(np.unique(labels[1, :, :32])) <= set(range(NUM_CLASSES))
