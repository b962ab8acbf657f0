"""RetinaNet's neck and head (the backbone is `tfreward.models.backbones.ResNet`, levels C3, C4, C5).

`FPN` follows mmdetection's RetinaNet neck (start level 1, `add_extra_convs="on_input"`): 1x1 laterals on C3-C5,
nearest x2 top-down additions, 3x3 output convolutions, P6 = 3x3 stride-2 conv of C5, P7 = 3x3 stride-2 conv of
ReLU(P6). No normalisation. Feature sizes: ceil(H / 8), ..., exactly `tfreward.ops.anchors.feature_map_sizes`.

`RetinaHead`: a class subnet and a box subnet shared over levels, each `num_convs` 3x3 conv + ReLU of `channels`
channels (optionally with GroupNorm, `group_norm=True`) and an output 3x3 conv (weights N(0, 0.01), biases 0; the
class output bias is -log((1 - 0.01) / 0.01), the prior probability 0.01 of RetinaNet). Outputs are flattened level
after level to [B, A, C] and [B, A, 4] in the anchor order of `tfreward.ops.anchors` (level, row, column, base
anchor).
"""

import math

import keras
import tensorflow as tf

PRIOR_PROB = 0.01


class FPN(keras.layers.Layer):
  """dict {"C3", "C4", "C5"} (other levels ignored; `ResNet`'s output) -> [P3, P4, P5, P6, P7], each
  [B, h_l, w_l, channels] (see the module docstring)."""

  def __init__(self, channels=256, **kwargs):
    super().__init__(**kwargs)
    self.channels = int(channels)
    conv = dict(padding="same", kernel_initializer="glorot_uniform")
    # === Layers ===
    self.laterals = [keras.layers.Conv2D(self.channels, 1, name=f"lateral{l}", **conv) for l in (3, 4, 5)]
    self.outputs = [keras.layers.Conv2D(self.channels, 3, name=f"output{l}", **conv) for l in (3, 4, 5)]
    self.p6 = keras.layers.Conv2D(self.channels, 3, strides=2, name="p6", **conv)
    self.p7 = keras.layers.Conv2D(self.channels, 3, strides=2, name="p7", **conv)
    self.upsample = keras.layers.UpSampling2D(2, interpolation="nearest")

  def call(self, features):
    c3, c4, c5 = features["C3"], features["C4"], features["C5"]
    top_down = [self.laterals[2](c5)]
    for lateral, c in ((self.laterals[1], c4), (self.laterals[0], c3)):
      top_down.insert(0, lateral(c) + self.upsample(top_down[0]))
    p3, p4, p5 = (out(p) for out, p in zip(self.outputs, top_down))
    p6 = self.p6(c5)
    return [p3, p4, p5, p6, self.p7(tf.nn.relu(p6))]

  def get_config(self):
    config = super().get_config()
    config.update(channels=self.channels)
    return config


class RetinaHead(keras.layers.Layer):
  """Class and box subnets shared by all levels.

  Args:
    num_classes: int C.
    num_anchors: int K, base anchors per location (9).
    num_convs: int. 3x3 conv + ReLU layers in each subnet before its output conv. Defaults to 4.
    channels: int. Their channels. Defaults to 256.
    group_norm: bool. GroupNormalization (32 groups, or fewer to divide `channels`; shared by the levels) between
      each conv and its ReLU, as FCOS / ATSS heads do; RetinaNet and FreeAnchor have none. Defaults to False.

  Call: list of L levels [B, h_l, w_l, F] (static h_l, w_l) -> (cls_logits [B, A, C] float32, box_deltas
  [B, A, 4] float32), A = K * sum(h_l * w_l).
  """

  def __init__(self, num_classes, num_anchors=9, num_convs=4, channels=256, group_norm=False, **kwargs):
    super().__init__(**kwargs)
    self.num_classes, self.num_anchors = int(num_classes), int(num_anchors)
    self.num_convs, self.channels, self.group_norm = int(num_convs), int(channels), bool(group_norm)
    conv = dict(padding="same", kernel_initializer=keras.initializers.RandomNormal(stddev=0.01))
    prior_bias = -math.log((1.0 - PRIOR_PROB) / PRIOR_PROB)
    groups = math.gcd(32, self.channels)
    # === Layers ===
    self.cls_convs, self.box_convs = [], []
    for name, convs in (("cls", self.cls_convs), ("box", self.box_convs)):
      for i in range(self.num_convs):
        convs.append(keras.layers.Conv2D(self.channels, 3, use_bias=not self.group_norm, name=f"{name}_conv{i}",
                                         **conv))
        if self.group_norm:
          convs.append(keras.layers.GroupNormalization(groups, epsilon=1e-5, name=f"{name}_gn{i}"))
        convs.append(keras.layers.ReLU(name=f"{name}_relu{i}"))
    self.cls_out = keras.layers.Conv2D(self.num_anchors * self.num_classes, 3, name="cls_out",
                                       bias_initializer=keras.initializers.Constant(prior_bias), **conv)
    self.box_out = keras.layers.Conv2D(self.num_anchors * 4, 3, name="box_out", **conv)

  def _subnet(self, x, convs, out, depth):
    for layer in convs:
      x = layer(x)
    x = tf.cast(out(x), tf.float32)  # [B, h, w, K * depth]
    return tf.reshape(x, [-1, x.shape[1] * x.shape[2] * self.num_anchors, depth])  # [B, h * w * K, depth]

  def call(self, features):
    cls = [self._subnet(f, self.cls_convs, self.cls_out, self.num_classes) for f in features]
    box = [self._subnet(f, self.box_convs, self.box_out, 4) for f in features]
    return tf.concat(cls, axis=1), tf.concat(box, axis=1)

  def get_config(self):
    config = super().get_config()
    config.update(num_classes=self.num_classes, num_anchors=self.num_anchors, num_convs=self.num_convs,
                  channels=self.channels, group_norm=self.group_norm)
    return config
