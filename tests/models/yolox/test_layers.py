"""Tests for tfreward.models.yolox.layers: feature shapes and channels of CSPDarknet, PAFPN and the decoupled head,
the depthwise variant, layer configs."""

import numpy as np
import tensorflow as tf

from tfreward.models.yolox import layers


def test_backbone_neck_head_shapes():
  images = tf.random.stateless_uniform([2, 64, 96, 3], seed=(0, 1))
  backbone = layers.CSPDarknet(depth=0.33, width=0.125, sync_bn=False)
  features = backbone(images)
  assert [f.shape for f in features] == [(2, 8, 12, 32), (2, 4, 6, 64), (2, 2, 3, 128)]
  neck = layers.PAFPN(depth=0.33, width=0.125, sync_bn=False)
  pyramid = neck(features)
  assert [p.shape for p in pyramid] == [f.shape for f in features]
  outputs = layers.DecoupledHead(4, 3, width=0.125, sync_bn=False)(pyramid)
  assert [o.shape for o in outputs] == [(2, 8, 12, 9), (2, 4, 6, 9), (2, 2, 3, 9)]
  assert all(o.dtype == tf.float32 for o in outputs)


def test_depthwise_conv_is_depthwise_then_pointwise():
  conv = layers.ConvBNAct(8, 3, strides=2, depthwise=True, sync_bn=False)
  out = conv(tf.ones([1, 16, 16, 4]))
  assert out.shape == (1, 8, 8, 8)
  assert conv.conv.kernel.shape == (3, 3, 4, 1) and conv.pointwise.conv.kernel.shape == (1, 1, 4, 8)
  assert np.all(np.isfinite(out.numpy()))


def test_layer_configs_round_trip():
  for layer in (layers.ConvBNAct(8, 3, depthwise=True), layers.CSPLayer(16, 2, shortcut=False),
                layers.SPPBottleneck(16), layers.CSPDarknet(0.33, 0.25), layers.PAFPN(0.33, 0.25),
                layers.DecoupledHead(3, width=0.25)):
    config = layer.get_config()
    assert type(layer).from_config(config).get_config() == config
