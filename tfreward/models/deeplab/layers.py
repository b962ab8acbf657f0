"""DeepLabv3's layers (Chen et al., 2017): `ASPP` and `SegmentationHead` (the backbone is
`tfreward.models.backbones.ResNet`).

`ASPP`: atrous spatial pyramid pooling on the last feature map: a 1x1 conv branch, one 3x3 conv branch per atrous
rate, and an image pooling branch (global average pool -> 1x1 conv -> BN -> ReLU, broadcast back to the feature
size); each conv branch is conv (no bias) -> BN -> ReLU; the branches are concatenated, then 1x1 conv -> BN -> ReLU
-> dropout. `SegmentationHead`: 3x3 conv -> BN -> ReLU -> (dropout) -> 1x1 conv to class logits; DeepLabv3's
classifier after the ASPP, and the FCN auxiliary head on C4. Shapes are static; nothing depends on the data.
"""

import keras
import tensorflow as tf

from tfreward.models.backbones import ConvBN
from tfreward.models.layers.dropout import Dropout


class ASPP(keras.layers.Layer):
  """[B, h, w, Cin] -> [B, h, w, channels] (see the module docstring).

  Args:
    channels: int. Channels of every branch and of the projection. Defaults to 256.
    rates: tuple of int. Dilation rates of the 3x3 branches. Defaults to (6, 12, 18).
    dropout: float. Dropout after the projection. Defaults to 0.1.
    sync_bn: bool. Synchronized batch normalisation. Defaults to True.
  """

  def __init__(self, channels=256, rates=(6, 12, 18), dropout=0.1, sync_bn=True, **kwargs):
    super().__init__(**kwargs)
    self.channels, self.rates = int(channels), tuple(int(r) for r in rates)
    self.dropout_rate, self.sync_bn = float(dropout), bool(sync_bn)
    # === Layers ===
    self.branches = [ConvBN(self.channels, 1, sync_bn=self.sync_bn, name="branch0")]
    self.branches += [ConvBN(self.channels, 3, dilation=r, sync_bn=self.sync_bn, name=f"branch{i + 1}")
                      for i, r in enumerate(self.rates)]
    self.pool_conv = ConvBN(self.channels, 1, sync_bn=self.sync_bn, name="image_pool")
    self.project = ConvBN(self.channels, 1, sync_bn=self.sync_bn, name="project")
    self.dropout = Dropout(self.dropout_rate)

  def image_pooling(self, x, training=False):
    """The image-level branch: [B, h, w, Cin] -> [B, h, w, channels], constant over space."""
    pooled = tf.reduce_mean(x, axis=[1, 2], keepdims=True)  # [B, 1, 1, Cin]
    pooled = self.pool_conv(pooled, training=training)
    return tf.tile(pooled, [1, x.shape[1], x.shape[2], 1])  # static feature size: a constant of the graph

  def call(self, x, training=False):
    outputs = [branch(x, training=training) for branch in self.branches]
    outputs.append(self.image_pooling(x, training=training))
    x = self.project(tf.concat(outputs, axis=-1), training=training)
    return self.dropout(x, training=training)

  def get_config(self):
    config = super().get_config()
    config.update(channels=self.channels, rates=list(self.rates), dropout=self.dropout_rate, sync_bn=self.sync_bn)
    return config


class SegmentationHead(keras.layers.Layer):
  """[B, h, w, Cin] -> [B, h, w, num_classes] logits: 3x3 conv -> BN -> ReLU -> dropout -> 1x1 conv (with bias).

  Args:
    num_classes: int. Output channels.
    channels: int. Channels of the 3x3 conv. Defaults to 256.
    dropout: float. Dropout before the classifier (the FCN head's 0.1; 0 after the ASPP). Defaults to 0.
    sync_bn: bool. Synchronized batch normalisation. Defaults to True.
  """

  def __init__(self, num_classes, channels=256, dropout=0.0, sync_bn=True, **kwargs):
    super().__init__(**kwargs)
    self.num_classes, self.channels = int(num_classes), int(channels)
    self.dropout_rate, self.sync_bn = float(dropout), bool(sync_bn)
    # === Layers ===
    self.conv = ConvBN(self.channels, 3, sync_bn=self.sync_bn, name="conv")
    self.dropout = Dropout(self.dropout_rate)
    self.classifier = keras.layers.Conv2D(self.num_classes, 1, kernel_initializer=keras.initializers.RandomNormal(
        stddev=0.01), name="classifier")

  def call(self, x, training=False):
    return self.classifier(self.dropout(self.conv(x, training=training), training=training))

  def get_config(self):
    config = super().get_config()
    config.update(num_classes=self.num_classes, channels=self.channels, dropout=self.dropout_rate,
                  sync_bn=self.sync_bn)
    return config
