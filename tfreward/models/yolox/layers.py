"""YOLOX building blocks: CSPDarknet backbone, PAFPN neck and decoupled head (Megvii YOLOX, arXiv:2107.08430).

Channel and depth scaling follow YOLOX: a stage with base width c and base depth n gets int(c * width) channels and
max(round(n * depth), 1) blocks. Every convolution is conv (no bias) -> BatchNormalization(eps 1e-3, momentum
0.97, i.e. PyTorch's 0.03) -> SiLU; `depthwise=True` (YOLOX-nano) replaces the 3x3 convolutions of the blocks with
depthwise 3x3 + pointwise 1x1. `sync_bn=True` computes batch statistics over all replicas
(`BatchNormalization(synchronized=True)`), so a step on R replicas equals one replica on the same global batch.

Images are NHWC; all spatial sizes must be multiples of 32 (strides 8, 16, 32 in the outputs).
"""

import math

import keras
import tensorflow as tf

PRIOR_PROB = 0.01


def _scaled(channels, width):
  return max(int(channels * width), 1)


def _blocks(depth_units, depth):
  return max(round(depth_units * depth), 1)


class ConvBNAct(keras.layers.Layer):
  """Conv2D (no bias, "same" padding) -> BatchNormalization -> SiLU. [B, H, W, Cin] -> [B, H/s, W/s, filters].

  Args:
    filters: int. Output channels.
    kernel_size: int. Defaults to 1.
    strides: int. Defaults to 1.
    depthwise: bool. Depthwise kxk conv + BN + SiLU followed by a pointwise ConvBNAct. Defaults to False.
    sync_bn: bool. Batch statistics over all replicas. Defaults to True.
  """

  def __init__(self, filters, kernel_size=1, strides=1, depthwise=False, sync_bn=True, **kwargs):
    super().__init__(**kwargs)
    self.filters, self.kernel_size, self.strides = int(filters), int(kernel_size), int(strides)
    self.depthwise, self.sync_bn = bool(depthwise), bool(sync_bn)
    # === Layers ===
    if self.depthwise:
      self.conv = keras.layers.DepthwiseConv2D(kernel_size, strides, padding="same", use_bias=False, name="dw")
    else:
      self.conv = keras.layers.Conv2D(filters, kernel_size, strides, padding="same", use_bias=False, name="conv")
    self.bn = keras.layers.BatchNormalization(epsilon=1e-3, momentum=0.97, synchronized=sync_bn, name="bn")
    self.pointwise = ConvBNAct(filters, 1, sync_bn=sync_bn, name="pw") if self.depthwise else None

  def call(self, x, training=False):
    x = tf.nn.silu(self.bn(self.conv(x), training=training))
    return self.pointwise(x, training=training) if self.pointwise is not None else x

  def get_config(self):
    config = super().get_config()
    config.update(filters=self.filters, kernel_size=self.kernel_size, strides=self.strides,
                  depthwise=self.depthwise, sync_bn=self.sync_bn)
    return config


class CSPLayer(keras.layers.Layer):
  """Cross-stage partial block: two 1x1 branches of filters/2 channels, `num_blocks` bottlenecks (1x1 then 3x3,
  with a residual if `shortcut`) on one of them, concatenation, 1x1 to `filters`. [B, H, W, Cin] -> [B, H, W, filters].
  """

  def __init__(self, filters, num_blocks=1, shortcut=True, depthwise=False, sync_bn=True, **kwargs):
    super().__init__(**kwargs)
    self.filters, self.num_blocks = int(filters), int(num_blocks)
    self.shortcut, self.depthwise, self.sync_bn = bool(shortcut), bool(depthwise), bool(sync_bn)
    hidden = max(self.filters // 2, 1)
    # === Layers ===
    self.conv1 = ConvBNAct(hidden, 1, sync_bn=sync_bn, name="conv1")
    self.conv2 = ConvBNAct(hidden, 1, sync_bn=sync_bn, name="conv2")
    self.blocks = [(ConvBNAct(hidden, 1, sync_bn=sync_bn, name=f"m{i}_conv1"),
                    ConvBNAct(hidden, 3, depthwise=depthwise, sync_bn=sync_bn, name=f"m{i}_conv2"))
                   for i in range(self.num_blocks)]
    self.conv3 = ConvBNAct(self.filters, 1, sync_bn=sync_bn, name="conv3")

  def call(self, x, training=False):
    main = self.conv1(x, training=training)
    for squeeze, expand in self.blocks:
      y = expand(squeeze(main, training=training), training=training)
      main = main + y if self.shortcut else y
    return self.conv3(tf.concat([main, self.conv2(x, training=training)], axis=-1), training=training)

  def get_config(self):
    config = super().get_config()
    config.update(filters=self.filters, num_blocks=self.num_blocks, shortcut=self.shortcut,
                  depthwise=self.depthwise, sync_bn=self.sync_bn)
    return config


class SPPBottleneck(keras.layers.Layer):
  """1x1 to Cin/2, max pools (stride 1) of sizes 5, 9, 13 concatenated with their input, 1x1 to `filters`."""

  def __init__(self, filters, pool_sizes=(5, 9, 13), sync_bn=True, **kwargs):
    super().__init__(**kwargs)
    self.filters, self.pool_sizes, self.sync_bn = int(filters), tuple(int(p) for p in pool_sizes), bool(sync_bn)
    self.conv1 = None
    self.pools = [keras.layers.MaxPooling2D(p, strides=1, padding="same") for p in self.pool_sizes]
    self.conv2 = ConvBNAct(self.filters, 1, sync_bn=sync_bn, name="conv2")

  def build(self, input_shape):
    self.conv1 = ConvBNAct(max(int(input_shape[-1]) // 2, 1), 1, sync_bn=self.sync_bn, name="conv1")

  def call(self, x, training=False):
    x = self.conv1(x, training=training)
    return self.conv2(tf.concat([x] + [pool(x) for pool in self.pools], axis=-1), training=training)

  def get_config(self):
    config = super().get_config()
    config.update(filters=self.filters, pool_sizes=list(self.pool_sizes), sync_bn=self.sync_bn)
    return config


class CSPDarknet(keras.layers.Layer):
  """CSPDarknet-53 scaled by `depth` and `width`: Focus stem (space-to-depth 2) and four stride-2 stages.

  call: images [B, H, W, 3] float (already normalised) -> (C3, C4, C5) at strides 8, 16, 32 with
  int(256 w), int(512 w), int(1024 w) channels.
  """

  def __init__(self, depth=0.33, width=0.5, depthwise=False, sync_bn=True, **kwargs):
    super().__init__(**kwargs)
    self.depth, self.width, self.depthwise, self.sync_bn = float(depth), float(width), bool(depthwise), bool(sync_bn)
    base, n = _scaled(64, width), _blocks(3, depth)
    conv = dict(depthwise=depthwise, sync_bn=sync_bn)
    # === Layers ===
    self.stem = ConvBNAct(base, 3, sync_bn=sync_bn, name="stem")
    self.stages = []
    for i, (mult, blocks) in enumerate(((2, n), (4, 3 * n), (8, 3 * n), (16, n)), start=2):
      layers = [ConvBNAct(base * mult, 3, strides=2, name=f"dark{i}_down", **conv)]
      if i == 5:
        layers.append(SPPBottleneck(base * mult, sync_bn=sync_bn, name="dark5_spp"))
      layers.append(CSPLayer(base * mult, blocks, shortcut=i < 5, name=f"dark{i}_csp", **conv))
      self.stages.append(layers)

  def call(self, images, training=False):
    x = self.stem(tf.nn.space_to_depth(images, 2), training=training)  # [B, H/2, W/2, base]
    features = []
    for layers in self.stages:
      for layer in layers:
        x = layer(x, training=training)
      features.append(x)
    return tuple(features[1:])  # strides 8, 16, 32

  def get_config(self):
    config = super().get_config()
    config.update(depth=self.depth, width=self.width, depthwise=self.depthwise, sync_bn=self.sync_bn)
    return config


class PAFPN(keras.layers.Layer):
  """YOLOX path-aggregation FPN: top-down (nearest x2 upsampling) then bottom-up (stride-2 convs) CSP fusion.

  call: (C3, C4, C5) -> (P3, P4, P5) with int(256 w), int(512 w), int(1024 w) channels, same spatial sizes.
  """

  def __init__(self, depth=0.33, width=0.5, depthwise=False, sync_bn=True, **kwargs):
    super().__init__(**kwargs)
    self.depth, self.width, self.depthwise, self.sync_bn = float(depth), float(width), bool(depthwise), bool(sync_bn)
    c3, c4, c5, n = _scaled(256, width), _scaled(512, width), _scaled(1024, width), _blocks(3, depth)
    conv = dict(depthwise=depthwise, sync_bn=sync_bn)
    # === Layers ===
    self.lateral_conv0 = ConvBNAct(c4, 1, sync_bn=sync_bn, name="lateral_conv0")
    self.c3_p4 = CSPLayer(c4, n, shortcut=False, name="c3_p4", **conv)
    self.reduce_conv1 = ConvBNAct(c3, 1, sync_bn=sync_bn, name="reduce_conv1")
    self.c3_p3 = CSPLayer(c3, n, shortcut=False, name="c3_p3", **conv)
    self.bu_conv2 = ConvBNAct(c3, 3, strides=2, name="bu_conv2", **conv)
    self.c3_n3 = CSPLayer(c4, n, shortcut=False, name="c3_n3", **conv)
    self.bu_conv1 = ConvBNAct(c4, 3, strides=2, name="bu_conv1", **conv)
    self.c3_n4 = CSPLayer(c5, n, shortcut=False, name="c3_n4", **conv)

  @staticmethod
  def _up(x):
    return tf.repeat(tf.repeat(x, 2, axis=1), 2, axis=2)  # nearest-neighbour x2, [B, 2h, 2w, C]

  def call(self, features, training=False):
    x3, x4, x5 = features
    fpn_out0 = self.lateral_conv0(x5, training=training)  # [B, H/32, W/32, c4]
    f_out0 = self.c3_p4(tf.concat([self._up(fpn_out0), x4], -1), training=training)  # [B, H/16, W/16, c4]
    fpn_out1 = self.reduce_conv1(f_out0, training=training)  # [B, H/16, W/16, c3]
    pan_out2 = self.c3_p3(tf.concat([self._up(fpn_out1), x3], -1), training=training)  # [B, H/8, W/8, c3]
    p_out1 = tf.concat([self.bu_conv2(pan_out2, training=training), fpn_out1], -1)  # [B, H/16, W/16, 2 c3]
    pan_out1 = self.c3_n3(p_out1, training=training)  # [B, H/16, W/16, c4]
    p_out0 = tf.concat([self.bu_conv1(pan_out1, training=training), fpn_out0], -1)  # [B, H/32, W/32, 2 c4]
    pan_out0 = self.c3_n4(p_out0, training=training)  # [B, H/32, W/32, c5]
    return pan_out2, pan_out1, pan_out0

  def get_config(self):
    config = super().get_config()
    config.update(depth=self.depth, width=self.width, depthwise=self.depthwise, sync_bn=self.sync_bn)
    return config


class DecoupledHead(keras.layers.Layer):
  """YOLOX decoupled head, one per level: 1x1 stem to int(256 w), then a classification branch (two 3x3 convs,
  1x1 to C logits) and a regression branch (two 3x3 convs, 1x1 to 4 box values and 1x1 to 1 objectness logit).
  The class and objectness biases start at -log((1 - 0.01) / 0.01) (prior probability 0.01).

  call: list of L features [B, h_l, w_l, c_l] -> list of L raw outputs [B, h_l, w_l, 5 + C] float32,
  channels (dx, dy, log_w, log_h, obj, cls_0 .. cls_{C-1}) as `tfreward.losses.yolox` consumes them.
  """

  def __init__(self, num_classes, num_levels=3, width=0.5, depthwise=False, sync_bn=True, **kwargs):
    super().__init__(**kwargs)
    self.num_classes, self.num_levels = int(num_classes), int(num_levels)
    self.width, self.depthwise, self.sync_bn = float(width), bool(depthwise), bool(sync_bn)
    hidden = _scaled(256, width)
    conv = dict(depthwise=depthwise, sync_bn=sync_bn)
    prior = keras.initializers.Constant(-math.log((1.0 - PRIOR_PROB) / PRIOR_PROB))
    # === Layers ===
    self.levels = []
    for i in range(self.num_levels):
      self.levels.append({
          "stem": ConvBNAct(hidden, 1, sync_bn=sync_bn, name=f"stem{i}"),
          "cls_convs": [ConvBNAct(hidden, 3, name=f"cls_conv{i}_{j}", **conv) for j in range(2)],
          "reg_convs": [ConvBNAct(hidden, 3, name=f"reg_conv{i}_{j}", **conv) for j in range(2)],
          "cls_pred": keras.layers.Conv2D(self.num_classes, 1, bias_initializer=prior, name=f"cls_pred{i}"),
          "reg_pred": keras.layers.Conv2D(4, 1, name=f"reg_pred{i}"),
          "obj_pred": keras.layers.Conv2D(1, 1, bias_initializer=prior, name=f"obj_pred{i}"),
      })

  def call(self, features, training=False):
    if len(features) != self.num_levels:
      raise ValueError(f"expected {self.num_levels} feature levels, got {len(features)}.")
    outputs = []
    for x, level in zip(features, self.levels):
      x = level["stem"](x, training=training)
      cls_x, reg_x = x, x
      for layer in level["cls_convs"]:
        cls_x = layer(cls_x, training=training)
      for layer in level["reg_convs"]:
        reg_x = layer(reg_x, training=training)
      out = tf.concat([level["reg_pred"](reg_x), level["obj_pred"](reg_x), level["cls_pred"](cls_x)], axis=-1)
      outputs.append(tf.cast(out, tf.float32))  # [B, h, w, 5 + C]
    return outputs

  def get_config(self):
    config = super().get_config()
    config.update(num_classes=self.num_classes, num_levels=self.num_levels, width=self.width,
                  depthwise=self.depthwise, sync_bn=self.sync_bn)
    return config
