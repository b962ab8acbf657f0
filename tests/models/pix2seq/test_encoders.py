"""Tests for tfreward.models.pix2seq.encoders: the CNN stack as tuned, memory sizes of both encoders."""

import numpy as np
import tensorflow as tf

from tfreward.models import backbones
from tfreward.models.pix2seq.encoders import ConvEncoder, ResNetEncoder


def test_conv_encoder_is_the_tuned_cnn_on_centred_images(p2s):
  encoder = ConvEncoder(dim=16, width=8, num_stages=2, num_layers=1, num_heads=2, mlp_ratio=2)
  images = tf.constant(p2s.batch(2)[0])
  memory = encoder(images)
  assert memory.shape == (2, 64, 16) and encoder.feature_hw((32, 32)) == (8, 8)
  # Pix2Seq's conv stack: per stage x <- gelu(gn(down(x))), then x <- x + gelu(gn(res(x))), on (x - 127.5) / 64.
  x = (tf.cast(images, tf.float32) - 127.5) / 64.0
  for down, down_gn, res, res_gn in encoder.cnn.stages:
    x = tf.nn.gelu(down_gn(down(x)))
    x = x + tf.nn.gelu(res_gn(res(x)))
  np.testing.assert_array_equal(encoder.cnn(backbones.normalize_images(images, "centered", tf.float32)), x)
  assert [s[1].epsilon for s in encoder.cnn.stages] == [1e-3, 1e-3]


def test_resnet_encoder_memory_matches_its_feature_grid():
  encoder = ResNetEncoder(dim=16, image_size=(96, 72), num_layers=1, num_heads=2, mlp_ratio=2)
  memory = encoder(tf.zeros([1, 96, 72, 3], tf.uint8))
  assert encoder.feature_hw((96, 72)) == (3, 3) and memory.shape == (1, 9, 16)
