"""Tests for tfreward.models.backbones: ResNet-10/18/50 feature levels at output stride 32, 16 and 8 (dilation keeps
the weights), synchronized and frozen batch normalisation, frozen stages, SmallCNN shapes, normalize_images, and
argument checks. Inputs are 64 x 64."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from tfreward.models.backbones import ResNet, SmallCNN, normalize_images

HW = (64, 64)


def _images(n=1, seed=1):
  return tf.random.uniform([n, *HW, 3], 0, 255, seed=seed)


def _shapes(features):
  return {k: tuple(v.shape) for k, v in features.items()}


def _norms(resnet):
  """The BatchNormalization layers of a ResNet-10/18."""
  convs = [resnet.stem] + [c for b in resnet.blocks for c in (b.conv1, b.conv2, b.shortcut) if c is not None]
  return [c.bn for c in convs]


def _resnet50_norms(resnet):
  return [l for l in resnet.resnet.layers if isinstance(l, keras.layers.BatchNormalization)]


# === ResNet-10 / 18 ===

def test_resnet18_sync_batch_norm_and_levels():
  sync = ResNet(18, image_size=HW, width=8)
  features = sync(_images(2), training=True)
  assert _shapes(features) == {"C2": (2, 16, 16, 8), "C3": (2, 8, 8, 16), "C4": (2, 4, 4, 32),
                               "C5": (2, 2, 2, 64)}
  assert {k: v for k, v in sync.channels.items()} == {"C2": 8, "C3": 16, "C4": 32, "C5": 64}
  assert len(sync.blocks) == 8 and len(_norms(sync)) == 1 + 4 * 2 * 2 + 4
  assert all(n.synchronized and n.trainable for n in _norms(sync))
  assert float(tf.reduce_max(tf.abs(_norms(sync)[0].moving_mean))) > 0  # batch statistics moved them


def test_resnet10_frozen_batch_norm():
  frozen = ResNet(10, image_size=HW, width=8, frozen_bn=True)
  frozen(_images(2), training=True)
  norms = _norms(frozen)
  assert len(frozen.blocks) == 4 and norms and not any(n.trainable for n in norms)
  assert all(float(tf.reduce_max(tf.abs(n.moving_mean))) == 0 for n in norms)  # inference mode in training too
  assert not any("gamma" in w.path or "beta" in w.path for w in frozen.trainable_weights)
  unsynced = ResNet(10, image_size=HW, width=8, sync_bn=False)
  unsynced(_images())
  assert not any(n.synchronized for n in _norms(unsynced))


def test_resnet18_output_stride_8_keeps_the_weights():
  keras.utils.set_random_seed(0)
  os32 = ResNet(18, image_size=HW, width=8)
  features32 = os32(_images())
  keras.utils.set_random_seed(0)
  os8 = ResNet(18, image_size=HW, width=8, output_stride=8)
  features8 = os8(_images())
  assert _shapes(features8) == {"C2": (1, 16, 16, 8), "C3": (1, 8, 8, 16), "C4": (1, 8, 8, 32), "C5": (1, 8, 8, 64)}
  assert all(np.array_equal(a, b) for a, b in zip(os32.get_weights(), os8.get_weights()))
  np.testing.assert_array_equal(features8["C3"], features32["C3"])


# === ResNet-50 ===

def test_resnet50_frozen_stages_and_sync_batch_norm():
  frozen = ResNet(50, image_size=HW, frozen_bn=True, frozen_stages=1)
  features = frozen(tf.zeros([1, *HW, 3]), training=True)
  assert _shapes(features) == {"C2": (1, 16, 16, 256), "C3": (1, 8, 8, 512), "C4": (1, 4, 4, 1024),
                               "C5": (1, 2, 2, 2048)}
  layers = frozen.resnet.layers
  assert not any(n.trainable or n.synchronized for n in _resnet50_norms(frozen))
  assert not any(l.trainable for l in layers if l.name.startswith(("conv1_", "conv2_")))
  assert all(l.trainable for l in layers if l.name.startswith("conv3_") and isinstance(l, keras.layers.Conv2D))
  synced = ResNet(50, image_size=HW)
  norms = _resnet50_norms(synced)
  assert len(norms) == 53 and all(n.synchronized and n.trainable for n in norms)


def test_resnet50_output_stride_16_and_8_keep_the_weights():
  """Dilation changes no kernel: same seed => the weights of output stride 32, and C2-C4 at 16 equal those at 32."""
  images = _images()
  built = {}
  for stride in (32, 16, 8):
    keras.utils.set_random_seed(0)
    resnet = ResNet(50, image_size=HW, output_stride=stride, sync_bn=False)
    built[stride] = (resnet, resnet(images))
  assert _shapes(built[16][1])["C5"] == (1, 4, 4, 2048) and _shapes(built[16][1])["C4"] == (1, 4, 4, 1024)
  assert _shapes(built[8][1])["C4"] == (1, 8, 8, 1024) and _shapes(built[8][1])["C5"] == (1, 8, 8, 2048)
  assert _shapes(built[8][1])["C3"] == (1, 8, 8, 512)
  weights32 = built[32][0].get_weights()
  for stride in (16, 8):
    assert all(np.array_equal(a, b) for a, b in zip(weights32, built[stride][0].get_weights()))
  for level in ("C2", "C3", "C4"):
    np.testing.assert_array_equal(built[16][1][level], built[32][1][level])
  conv = built[8][0].resnet.get_layer("conv5_block1_2_conv")
  assert conv.dilation_rate == (4, 4) and built[8][0].resnet.get_layer("conv5_block1_1_conv").strides == (1, 1)


# === SmallCNN and normalize_images ===

def test_small_cnn_shapes_and_channels():
  cnn = SmallCNN(8, 3)
  out = cnn(normalize_images(tf.zeros([2, 60, 64, 3]), "imagenet"))
  assert tuple(out.shape) == (2, 8, 8, 32) and cnn.channels == 32 and cnn.feature_hw((60, 64)) == (8, 8)
  capped = SmallCNN(8, 5, max_doublings=3, activation="gelu", activate_sum=False, norm_epsilon=1e-3)
  out = capped(normalize_images(tf.zeros([1, *HW, 3]), "centered"))
  assert tuple(out.shape) == (1, 2, 2, 64) and capped.channels == 64
  assert SmallCNN.from_config(capped.get_config()).get_config() == capped.get_config()


def test_normalize_images_modes():
  images = tf.constant([[[[0, 127.5, 255]]]], tf.float32)
  np.testing.assert_allclose(normalize_images(images, "unit"), [[[[-1.0, 0.0, 1.0]]]])
  np.testing.assert_allclose(normalize_images(images, "centered"), [[[[-127.5 / 64, 0.0, 127.5 / 64]]]])
  want = (np.array([0, 127.5, 255]) - [123.675, 116.28, 103.53]) / [58.395, 57.12, 57.375]
  np.testing.assert_allclose(normalize_images(tf.cast(images, tf.uint8), "imagenet")[0, 0, 0],
                             (np.array([0, 127, 255]) - [123.675, 116.28, 103.53]) / [58.395, 57.12, 57.375],
                             rtol=1e-6)
  np.testing.assert_allclose(normalize_images(images, "imagenet")[0, 0, 0], want, rtol=1e-6)
  assert normalize_images(images, "unit", tf.bfloat16).dtype == tf.bfloat16


@pytest.mark.parametrize("kwargs", [
    dict(size=34), dict(size=50, weights="coco"), dict(size=18, weights="imagenet"), dict(size=18, width=0),
    dict(size=18, output_stride=4), dict(size=50, frozen_stages=5)])
def test_resnet_bad_arguments(kwargs):
  with pytest.raises(ValueError, match="|".join(k for k in kwargs if k != "size") or "size"):
    ResNet(image_size=HW, **kwargs)


def test_small_cnn_and_normalize_bad_arguments():
  for kwargs in (dict(width=0), dict(num_stages=0), dict(max_doublings=-1), dict(activation="tanh")):
    with pytest.raises(ValueError, match=next(iter(kwargs))):
      SmallCNN(**kwargs)
  with pytest.raises(ValueError, match="mode"):
    normalize_images(tf.zeros([1, 2, 2, 3]), "caffe")
