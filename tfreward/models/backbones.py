"""Backbones shared by every family: the ResNet and the small CNN, plus the image normalisations.

  `ResNet`    sizes 10 and 18 (basic blocks, a light 3x3 stem, for CPU-sized data; width set by `width`) and 50
              (keras.applications.ResNet50, `weights=None` or "imagenet"); output stride 32, 16 or 8 by dilating
              the last stages (atrous convolution, as DeepLab); feature levels by name {"C2", "C3", "C4", "C5"}.
  `SmallCNN`  a residual CNN with GroupNorm (replicas never share statistics) at stride 2**num_stages: one feature
              map.
Both take images [B, H, W, 3] in 0..255 (uint8 or float). `ResNet` normalises them itself, as its weights expect
(ResNet-50: caffe, BGR minus the ImageNet mean; ResNet-10/18: x / 127.5 - 1); `SmallCNN` takes already normalised
images (`normalize_images`), so each family keeps the normalisation it was tuned with.

Batch normalisation in `ResNet` is either synchronized over replicas (`sync_bn`, so R replicas equal one replica
on the same global batch) or frozen (`frozen_bn`: moving statistics, gamma and beta not trained, as DETR's
FrozenBatchNorm2d and mmdetection's `norm_eval`).
"""

import math

import keras
import tensorflow as tf

from tfreward.errors import check_int

RESNET_SIZES = (10, 18, 50)
RESNETS = {f"resnet{size}": size for size in RESNET_SIZES}  # config name -> `ResNet` size
OUTPUT_STRIDES = (8, 16, 32)
LEVELS = ("C2", "C3", "C4", "C5")
CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)
IMAGENET_MEAN = (123.675, 116.28, 103.53)
IMAGENET_STD = (58.395, 57.12, 57.375)
NORMALIZATIONS = ("imagenet", "centered", "unit")
_RESNET50_LEVELS = {"C2": "conv2_block3_out", "C3": "conv3_block4_out", "C4": "conv4_block6_out",
                    "C5": "conv5_block3_out"}


def normalize_images(images, mode, dtype=tf.float32):
  """images [B, H, W, 3] uint8/float 0..255 -> `dtype`, normalised by `mode`:
  "imagenet" (x - ImageNet mean) / ImageNet std; "centered" (x - 127.5) / 64; "unit" x / 127.5 - 1."""
  x = tf.cast(images, dtype)
  if mode == "imagenet":
    return (x - tf.constant(IMAGENET_MEAN, x.dtype)) / tf.constant(IMAGENET_STD, x.dtype)
  if mode == "centered":
    return (x - tf.cast(127.5, dtype)) / tf.cast(64.0, dtype)
  if mode == "unit":
    return x / 127.5 - 1.0
  raise ValueError(f"mode must be one of {NORMALIZATIONS}, got {mode!r}.")


def _dilations(output_stride):
  """Output stride -> (stride, dilation) of stages 3 and 4 (C4, C5): DeepLab's atrous stages."""
  if output_stride not in OUTPUT_STRIDES:
    raise ValueError(f"output_stride must be one of {OUTPUT_STRIDES}, got {output_stride!r}.")
  return {32: ((2, 1), (2, 1)), 16: ((2, 1), (1, 2)), 8: ((1, 2), (1, 4))}[output_stride]


def _batch_norm(sync_bn, frozen_bn, name):
  bn = keras.layers.BatchNormalization(momentum=0.9, epsilon=1e-5, synchronized=sync_bn and not frozen_bn, name=name)
  if frozen_bn:
    bn.trainable = False  # Keras then normalises with the moving statistics, in training too
  return bn


class ConvBN(keras.layers.Layer):
  """Conv2D (no bias, "same") -> BatchNormalization -> optional ReLU. [B, H, W, Cin] -> [B, H/s, W/s, filters]."""

  def __init__(self, filters, kernel_size=3, strides=1, relu=True, sync_bn=True, frozen_bn=False, dilation=1,
               **kwargs):
    super().__init__(**kwargs)
    self.filters, self.kernel_size, self.strides, self.relu = int(filters), int(kernel_size), int(strides), relu
    self.sync_bn, self.frozen_bn, self.dilation = bool(sync_bn), bool(frozen_bn), int(dilation)
    # === Layers ===
    self.conv = keras.layers.Conv2D(filters, kernel_size, strides, padding="same", use_bias=False,
                                    dilation_rate=self.dilation, kernel_initializer="he_normal", name="conv")
    self.bn = _batch_norm(self.sync_bn, self.frozen_bn, "bn")

  def build(self, input_shape):
    self.conv.build(input_shape)

  def call(self, x, training=False):
    if self.dilation == 1:
      x = self.conv(x)
    else:
      # Keras' Conv2D reaches tf.nn.convolution, which lowers a dilated conv off TPU as space_to_batch -> conv ->
      # batch_to_space; under XLA on CPU that is 10-30x slower than the native dilated conv (bench/deeplab_step.py).
      # Same kernel variable, same result.
      x = tf.nn.conv2d(x, tf.cast(self.conv.kernel, x.dtype), self.strides, "SAME", dilations=self.dilation)
    x = self.bn(x, training=training)
    return tf.nn.relu(x) if self.relu else x

  def get_config(self):
    config = super().get_config()
    config.update(filters=self.filters, kernel_size=self.kernel_size, strides=self.strides, relu=self.relu,
                  sync_bn=self.sync_bn, frozen_bn=self.frozen_bn, dilation=self.dilation)
    return config


class BasicBlock(keras.layers.Layer):
  """ResNet basic block: relu(x' + conv3x3(relu(conv3x3(x)))), x' a 1x1 ConvBN projection when the shape changes."""

  def __init__(self, filters, strides=1, sync_bn=True, frozen_bn=False, dilation=1, **kwargs):
    super().__init__(**kwargs)
    self.filters, self.strides, self.sync_bn, self.frozen_bn = int(filters), int(strides), sync_bn, frozen_bn
    self.dilation = int(dilation)
    norm = dict(sync_bn=sync_bn, frozen_bn=frozen_bn, dilation=self.dilation)
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
    config.update(filters=self.filters, strides=self.strides, sync_bn=self.sync_bn, frozen_bn=self.frozen_bn,
                  dilation=self.dilation)
    return config


def _resnet50(image_size, weights, output_stride, sync_bn, frozen_bn, frozen_stages):
  """keras.applications.ResNet50 -> functional model image -> {C2..C5}, cloned with synchronized BN and dilated
  stages where asked (same weights: strides and dilation do not change a kernel's shape)."""
  resnet = keras.applications.ResNet50(include_top=False, weights=weights, input_shape=(*image_size, 3))
  (stride4, dilation4), (stride5, dilation5) = _dilations(output_stride)
  changes = {}
  for stage, stride, dilation in ((4, stride4, dilation4), (5, stride5, dilation5)):
    if stride == 1:
      changes[f"conv{stage}_block1_0_conv"] = changes[f"conv{stage}_block1_1_conv"] = {"strides": (1, 1)}
    if dilation > 1:
      for layer in resnet.layers:
        if layer.name.startswith(f"conv{stage}_") and layer.name.endswith("_2_conv"):
          changes[layer.name] = {"dilation_rate": (dilation, dilation)}
  sync = sync_bn and not frozen_bn
  if changes or sync:
    def clone(layer):
      config = layer.get_config()
      config.update(changes.get(layer.name, {}))
      if sync and isinstance(layer, keras.layers.BatchNormalization):
        config["synchronized"] = True
      return layer.__class__.from_config(config)
    copy = keras.models.clone_model(resnet, clone_function=clone)
    copy.set_weights(resnet.get_weights())
    resnet = copy
  frozen_prefixes = ("conv1_",) + tuple(f"conv{s + 2}_" for s in range(frozen_stages)) if frozen_stages else ()
  for layer in resnet.layers:
    if (frozen_bn and isinstance(layer, keras.layers.BatchNormalization)) or layer.name.startswith(frozen_prefixes):
      layer.trainable = False
  return keras.Model(resnet.inputs, {k: resnet.get_layer(v).output for k, v in _RESNET50_LEVELS.items()},
                     name="resnet50")


class ResNet(keras.layers.Layer):
  """ResNet-10, -18 or -50 as a dict of feature levels.

  images [B, H, W, 3] float RGB 0..255 -> {"C2": [B, H/4, W/4, c2], "C3": [B, H/8, ...], "C4": [B, H/16, ...],
  "C5": [B, H/32, ...]}; at output stride 16 C5 stays at H/16, at 8 C4 and C5 stay at H/8 (dilated instead).
  Channels (`channels`): ResNet-50 256, 512, 1024, 2048; ResNet-10/18 w, 2w, 4w, 8w (w = `width`).

  ResNet-10/18: a 3x3 stride-2 stem conv of w channels, then 4 stages of 1 or 2 basic blocks, each stage starting
  with stride 2 (no max-pool); images normalised as x / 127.5 - 1. ResNet-50: keras.applications.ResNet50, caffe
  preprocessing.

  Args:
    size: int, one of 10, 18, 50. Defaults to 50.
    image_size: (int, int). Static input height and width (ResNet-50 builds a functional model of that size).
    width: int. ResNet-10/18: channels of the stem and first stage. Defaults to 64.
    weights: None (random initialisation) or "imagenet" (ResNet-50 only: Keras' ImageNet weights, downloaded on
      first use). Defaults to None.
    output_stride: int, 32, 16 or 8. Defaults to 32.
    sync_bn: bool. Synchronized batch statistics (ignored when `frozen_bn`). Defaults to True.
    frozen_bn: bool. Normalise with the frozen moving statistics, gamma and beta not trained. Defaults to False.
    frozen_stages: int in [0, 4]. ResNet-50: the stem and the first `frozen_stages` stages are not trained
      (DETR and mmdetection: 1). Defaults to 0.
  """

  def __init__(self, size=50, *, image_size, width=64, weights=None, output_stride=32, sync_bn=True,
               frozen_bn=False, frozen_stages=0, **kwargs):
    super().__init__(**kwargs)
    if size not in RESNET_SIZES:
      raise ValueError(f"size must be one of {RESNET_SIZES}, got {size!r}.")
    if weights not in (None, "imagenet") or (weights and size != 50):
      raise ValueError(f"weights must be None, or 'imagenet' with size 50, got {weights!r} with size {size!r}.")
    check_int("width", width)
    check_int("frozen_stages", frozen_stages, minimum=0, maximum=4)
    stages = _dilations(output_stride)
    self.size, self.image_size, self.width = size, tuple(int(s) for s in image_size), width
    self.weights_name, self.output_stride, self.frozen_stages = weights, output_stride, frozen_stages
    self.sync_bn, self.frozen_bn = bool(sync_bn), bool(frozen_bn)
    # === Layers ===
    if size == 50:
      self.resnet = _resnet50(self.image_size, weights, output_stride, self.sync_bn, self.frozen_bn, frozen_stages)
      return
    norm = dict(sync_bn=self.sync_bn, frozen_bn=self.frozen_bn)
    depth = {10: 1, 18: 2}[size]
    strides = (2, 2) + tuple(s for s, _ in stages)
    dilations = (1, 1) + tuple(d for _, d in stages)
    self.stem = ConvBN(width, 3, 2, name="stem", **norm)
    self.blocks = [BasicBlock(width * 2**s, strides[s] if b == 0 else 1, dilation=dilations[s],
                              name=f"stage{s + 1}_block{b + 1}", **norm)
                   for s in range(4) for b in range(depth)]

  @property
  def channels(self):
    """dict level -> channels."""
    if self.size == 50:
      return {"C2": 256, "C3": 512, "C4": 1024, "C5": 2048}
    return {level: self.width * 2**i for i, level in enumerate(LEVELS)}

  def call(self, images, training=False):
    if self.size == 50:
      bgr = tf.cast(images, tf.float32)[..., ::-1] - tf.constant(CAFFE_MEAN_BGR, tf.float32)
      return dict(self.resnet(bgr, training=training))
    x = self.stem(normalize_images(images, "unit", self.compute_dtype), training=training)
    features = {}
    depth = len(self.blocks) // 4
    for i, block in enumerate(self.blocks):
      x = block(x, training=training)
      if (i + 1) % depth == 0:  # the last block of a stage
        features[LEVELS[i // depth]] = x
    return features

  def get_config(self):
    config = super().get_config()
    config.update(size=self.size, image_size=list(self.image_size), width=self.width, weights=self.weights_name,
                  output_stride=self.output_stride, sync_bn=self.sync_bn, frozen_bn=self.frozen_bn,
                  frozen_stages=self.frozen_stages)
    return config


class SmallCNN(keras.layers.Layer):
  """Residual CNN: per stage a stride-2 3x3 conv and a residual 3x3 conv, each followed by GroupNorm.

  Stage i has width * 2**min(i, max_doublings) channels; GroupNorm uses gcd(8, channels) groups.
  images [B, H, W, 3] already normalised (`normalize_images`) -> [B, ceil(H / 2**s), ceil(W / 2**s), channels].

  Args:
    width: int. Channels of the first stage. Defaults to 32.
    num_stages: int. Stride-2 stages s. Defaults to 4.
    max_doublings: int. Channels stop doubling after this many stages. Defaults to 2.
    activation: str, "relu" or "gelu". Defaults to "relu".
    activate_sum: bool. True: x <- act(x + norm(conv(x))) (ResNet style); False: x <- x + act(norm(conv(x))).
      Defaults to True.
    norm_epsilon: float. GroupNorm epsilon. Defaults to 1e-5.
  """

  def __init__(self, width=32, num_stages=4, *, max_doublings=2, activation="relu", activate_sum=True,
               norm_epsilon=1e-5, **kwargs):
    super().__init__(**kwargs)
    check_int("width", width)
    check_int("num_stages", num_stages)
    check_int("max_doublings", max_doublings, minimum=0)
    if activation not in ("relu", "gelu"):
      raise ValueError(f"activation must be 'relu' or 'gelu', got {activation!r}.")
    self.width, self.num_stages, self.max_doublings = width, num_stages, max_doublings
    self.activation, self.activate_sum, self.norm_epsilon = activation, bool(activate_sum), float(norm_epsilon)
    self._act = tf.nn.relu if activation == "relu" else tf.nn.gelu
    # === Layers ===
    self.stages = []
    for i in range(self.num_stages):
      channels = self.width * 2 ** min(i, self.max_doublings)
      groups = math.gcd(8, channels)
      self.stages.append((
          keras.layers.Conv2D(channels, 3, strides=2, padding="same", use_bias=False, name=f"down{i}"),
          keras.layers.GroupNormalization(groups, epsilon=self.norm_epsilon, name=f"down{i}_gn"),
          keras.layers.Conv2D(channels, 3, padding="same", use_bias=False, name=f"res{i}"),
          keras.layers.GroupNormalization(groups, epsilon=self.norm_epsilon, name=f"res{i}_gn")))

  @property
  def channels(self):
    return self.width * 2 ** min(self.num_stages - 1, self.max_doublings)

  def feature_hw(self, image_hw):
    """(H, W) of the images -> (h, w) of the feature map."""
    stride = 2 ** self.num_stages
    return tuple(-(-int(s) // stride) for s in image_hw)

  def call(self, x, training=False):
    for down, down_gn, res, res_gn in self.stages:
      x = self._act(down_gn(down(x)))
      x = self._act(x + res_gn(res(x))) if self.activate_sum else x + self._act(res_gn(res(x)))
    return x

  def get_config(self):
    config = super().get_config()
    config.update(width=self.width, num_stages=self.num_stages, max_doublings=self.max_doublings,
                  activation=self.activation, activate_sum=self.activate_sum, norm_epsilon=self.norm_epsilon)
    return config
