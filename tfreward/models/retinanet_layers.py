"""RetinaNet building blocks: backbones (C3, C4, C5), FPN (P3-P7) and the class and box subnets.

Backbones take float images [B, H, W, 3] in 0..255 (H, W multiples of 32) and normalise them themselves:
  `SmallResNet`     a ResNet-18-style stack of basic blocks, for the CPU-sized synthetic dataset;
  `ResNet50Backbone` keras.applications.ResNet50 (`weights=None` or "imagenet"), caffe preprocessing as its weights
                     expect (BGR minus the ImageNet mean).
Batch normalisation is either synchronized over replicas (`BatchNormalization(synchronized=True)`, so R replicas
equal one replica on the same global batch) or frozen (`frozen_bn=True`: moving statistics, gamma and beta not
trained, mmdetection's `norm_eval` recipe for pretrained ResNets). Both make the step independent of the split.

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

from tfreward.errors import check_int

PRIOR_PROB = 0.01
BACKBONES = ("small_resnet", "resnet50")
_CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)
_RESNET50_OUTPUTS = ("conv3_block4_out", "conv4_block6_out", "conv5_block3_out")


def _batch_norm(sync_bn, frozen_bn, name):
  bn = keras.layers.BatchNormalization(momentum=0.9, epsilon=1e-5, synchronized=sync_bn and not frozen_bn, name=name)
  if frozen_bn:
    bn.trainable = False  # Keras then normalises with the moving statistics, in training too
  return bn


class ConvBN(keras.layers.Layer):
  """Conv2D (no bias, "same") -> BatchNormalization -> optional ReLU. [B, H, W, Cin] -> [B, H/s, W/s, filters]."""

  def __init__(self, filters, kernel_size=3, strides=1, relu=True, sync_bn=True, frozen_bn=False, **kwargs):
    super().__init__(**kwargs)
    self.filters, self.kernel_size, self.strides, self.relu = int(filters), int(kernel_size), int(strides), relu
    self.sync_bn, self.frozen_bn = bool(sync_bn), bool(frozen_bn)
    # === Layers ===
    self.conv = keras.layers.Conv2D(filters, kernel_size, strides, padding="same", use_bias=False,
                                    kernel_initializer="he_normal", name="conv")
    self.bn = _batch_norm(self.sync_bn, self.frozen_bn, "bn")

  def call(self, x, training=False):
    x = self.bn(self.conv(x), training=training)
    return tf.nn.relu(x) if self.relu else x

  def get_config(self):
    config = super().get_config()
    config.update(filters=self.filters, kernel_size=self.kernel_size, strides=self.strides, relu=self.relu,
                  sync_bn=self.sync_bn, frozen_bn=self.frozen_bn)
    return config


class BasicBlock(keras.layers.Layer):
  """ResNet basic block: relu(x' + conv3x3(relu(conv3x3(x)))), x' a 1x1 ConvBN projection when the shape changes."""

  def __init__(self, filters, strides=1, sync_bn=True, frozen_bn=False, **kwargs):
    super().__init__(**kwargs)
    self.filters, self.strides, self.sync_bn, self.frozen_bn = int(filters), int(strides), sync_bn, frozen_bn
    norm = dict(sync_bn=sync_bn, frozen_bn=frozen_bn)
    # === Layers ===
    self.conv1 = ConvBN(filters, 3, strides, name="conv1", **norm)
    self.conv2 = ConvBN(filters, 3, 1, relu=False, name="conv2", **norm)
    self.shortcut = None

  def build(self, input_shape):
    if self.strides != 1 or input_shape[-1] != self.filters:
      self.shortcut = ConvBN(self.filters, 1, self.strides, relu=False, sync_bn=self.sync_bn,
                             frozen_bn=self.frozen_bn, name="shortcut")

  def call(self, x, training=False):
    residual = self.shortcut(x, training=training) if self.shortcut is not None else x
    return tf.nn.relu(residual + self.conv2(self.conv1(x, training=training), training=training))

  def get_config(self):
    config = super().get_config()
    config.update(filters=self.filters, strides=self.strides, sync_bn=self.sync_bn, frozen_bn=self.frozen_bn)
    return config


class SmallResNet(keras.layers.Layer):
  """Stem 3x3 stride-2 conv, then 4 stages of `depth` basic blocks (width w, 2w, 4w, 8w; each stage halves).

  [B, H, W, 3] float 0..255 -> [C3 [B, H/8, W/8, 2w], C4 [B, H/16, W/16, 4w], C5 [B, H/32, W/32, 8w]].
  """

  def __init__(self, width=32, depth=1, sync_bn=True, frozen_bn=False, **kwargs):
    super().__init__(**kwargs)
    self.width, self.depth, self.sync_bn, self.frozen_bn = int(width), int(depth), bool(sync_bn), bool(frozen_bn)
    norm = dict(sync_bn=sync_bn, frozen_bn=frozen_bn)
    # === Layers ===
    self.stem = ConvBN(self.width, 3, 2, name="stem", **norm)
    self.blocks = [BasicBlock(self.width * 2**s, 2 if b == 0 else 1, name=f"stage{s + 1}_block{b + 1}", **norm)
                   for s in range(4) for b in range(self.depth)]

  def call(self, images, training=False):
    x = self.stem(tf.cast(images, self.compute_dtype) / 127.5 - 1.0, training=training)
    features = []
    for i, block in enumerate(self.blocks):
      x = block(x, training=training)
      if (i + 1) % self.depth == 0:  # the last block of a stage
        features.append(x)
    return features[1:]

  def get_config(self):
    config = super().get_config()
    config.update(width=self.width, depth=self.depth, sync_bn=self.sync_bn, frozen_bn=self.frozen_bn)
    return config


def _sync_bn_copy(model):
  """The functional `model` with every BatchNormalization synchronized over replicas, same weights."""
  def clone(layer):
    config = layer.get_config()
    if isinstance(layer, keras.layers.BatchNormalization):
      config["synchronized"] = True
    return layer.__class__.from_config(config)
  copy = keras.models.clone_model(model, clone_function=clone)
  copy.set_weights(model.get_weights())
  return copy


class ResNet50Backbone(keras.layers.Layer):
  """keras.applications.ResNet50 without its top, as (C3, C4, C5).

  [B, H, W, 3] float RGB 0..255 -> [C3 [B, H/8, W/8, 512], C4 [B, H/16, W/16, 1024], C5 [B, H/32, W/32, 2048]].

  Args:
    image_size: (int, int). Static input height and width (multiples of 32).
    weights: None (random initialisation) or "imagenet" (downloads Keras' ImageNet weights). Defaults to None.
    sync_bn: bool. Synchronized batch statistics (ignored when `frozen_bn`). Defaults to True.
    frozen_bn: bool. Normalise with the frozen moving statistics, gamma and beta not trained. Defaults to False.
    frozen_stages: int in [0, 4]. The stem and the first `frozen_stages` stages are not trained (mmdetection: 1).
      Defaults to 0.
  """

  def __init__(self, image_size, weights=None, sync_bn=True, frozen_bn=False, frozen_stages=0, **kwargs):
    super().__init__(**kwargs)
    if weights not in (None, "imagenet"):
      raise ValueError(f"weights must be None or 'imagenet', got {weights!r}.")
    check_int("frozen_stages", frozen_stages, minimum=0, maximum=4)
    self.image_size = tuple(int(s) for s in image_size)
    self.weights_name, self.sync_bn, self.frozen_bn = weights, bool(sync_bn), bool(frozen_bn)
    self.frozen_stages = frozen_stages
    # === Layers ===
    resnet = keras.applications.ResNet50(include_top=False, weights=weights, input_shape=(*self.image_size, 3))
    if self.sync_bn and not self.frozen_bn:
      resnet = _sync_bn_copy(resnet)
    frozen_prefixes = ("conv1_",) + tuple(f"conv{s + 2}_" for s in range(frozen_stages)) if frozen_stages else ()
    for layer in resnet.layers:
      frozen_norm = self.frozen_bn and isinstance(layer, keras.layers.BatchNormalization)
      if frozen_norm or layer.name.startswith(frozen_prefixes):
        layer.trainable = False
    self.resnet = keras.Model(resnet.inputs, [resnet.get_layer(n).output for n in _RESNET50_OUTPUTS],
                              name="resnet50")

  def call(self, images, training=False):
    bgr = tf.cast(images, tf.float32)[..., ::-1] - tf.constant(_CAFFE_MEAN_BGR, tf.float32)
    return list(self.resnet(bgr, training=training))

  def get_config(self):
    config = super().get_config()
    config.update(image_size=list(self.image_size), weights=self.weights_name, sync_bn=self.sync_bn,
                  frozen_bn=self.frozen_bn, frozen_stages=self.frozen_stages)
    return config


class FPN(keras.layers.Layer):
  """[C3, C4, C5] -> [P3, P4, P5, P6, P7], each [B, h_l, w_l, channels] (see the module docstring)."""

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
    c3, c4, c5 = features
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


def build_backbone(name, *, image_size, weights=None, width=32, depth=1, sync_bn=True, frozen_bn=False,
                   frozen_stages=0):
  """A backbone by name: "small_resnet" (`width`, `depth`) or "resnet50" (`weights`, `frozen_stages`)."""
  if name == "small_resnet":
    if weights is not None:
      raise ValueError(f"small_resnet has no pretrained weights, got weights={weights!r}.")
    return SmallResNet(width=width, depth=depth, sync_bn=sync_bn, frozen_bn=frozen_bn, name="backbone")
  if name == "resnet50":
    return ResNet50Backbone(image_size, weights=weights, sync_bn=sync_bn, frozen_bn=frozen_bn,
                            frozen_stages=frozen_stages, name="backbone")
  raise ValueError(f"backbone must be one of {BACKBONES}, got {name!r}.")
