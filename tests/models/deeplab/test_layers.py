"""Tests for tfreward.models.deeplab.layers: ASPP shapes and image pooling, SegmentationHead, configs."""

import numpy as np
import tensorflow as tf

from tfreward.models.deeplab.layers import ASPP, SegmentationHead


def _features(shape=(2, 5, 7, 12), seed=0):
  return tf.constant(np.random.default_rng(seed).normal(size=shape), tf.float32)


def test_aspp_keeps_the_spatial_size_and_has_one_branch_per_rate():
  aspp = ASPP(16, rates=(1, 2, 3), dropout=0.0, sync_bn=False)
  out = aspp(_features(), training=False)
  assert out.shape == (2, 5, 7, 16)
  assert [b.dilation for b in aspp.branches] == [1, 1, 2, 3] and aspp.branches[0].kernel_size == 1
  again = ASPP.from_config(aspp.get_config())
  assert again.rates == (1, 2, 3) and again.channels == 16 and again.dropout_rate == 0.0


def test_image_pooling_branch_is_constant_over_space_and_differs_per_image():
  aspp = ASPP(8, rates=(6, 12, 18), sync_bn=False)
  x = _features()
  aspp(x)
  for training in (False, True):
    pooled = aspp.image_pooling(x, training=training).numpy()
    assert pooled.shape == (2, 5, 7, 8)
    np.testing.assert_allclose(pooled, np.broadcast_to(pooled[:, :1, :1], pooled.shape))
  pooled = aspp.image_pooling(x, training=False).numpy()
  assert not np.allclose(pooled[0, 0, 0], pooled[1, 0, 0])


def test_aspp_under_xla_equals_eager():
  aspp = ASPP(8, rates=(1, 2, 3), sync_bn=False)
  x = _features()
  eager = aspp(x, training=False)
  compiled = tf.function(lambda t: aspp(t, training=False), jit_compile=True)(x)
  np.testing.assert_allclose(compiled, eager, rtol=1e-5, atol=1e-6)


def test_segmentation_head_gives_class_logits():
  head = SegmentationHead(3, channels=8, dropout=0.1, sync_bn=False)
  assert head(_features(), training=True).shape == (2, 5, 7, 3)
  config = SegmentationHead.from_config(head.get_config()).get_config()
  assert config["num_classes"] == 3 and config["channels"] == 8 and config["dropout"] == 0.1
