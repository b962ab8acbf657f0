"""DeepLabv3 (Chen et al., 2017, "Rethinking Atrous Convolution for Semantic Image Segmentation").

  images [B, H, W, 3] 0..255 -> backbone (`tfreward.models.backbones.ResNet` at output stride 16 or 8; it normalises
  the images) -> C5 -> `layers.ASPP` -> `layers.SegmentationHead` -> logits [B, H/os, W/os, C] -> bilinear resize
  (`tf.image.resize`, half-pixel centres) to [B, H, W, C] float32. With `aux_head`, an FCN head on C4 gives auxiliary
  logits at the input size too (training only: `segment` ignores them).

Training (`compute_losses`): softmax cross-entropy over the pixels whose `mask` is in [0, num_classes) (255 and any
other value are ignored), summed and divided by the number of kept pixels over all replicas (at least 1), so an
all-ignored batch gives 0 with finite gradients. Terms: loss_ce (weight 1) and, with `aux_head`, loss_aux (weight
`aux_weight`).

Inference (`segment`, also `predict_step`): {"labels": [B, H, W] int32 argmax of the logits}, the key read by
`tfreward.training.eval_callback.SegmentationEvalCallback` and `tfreward.export.saved_model`.
"""

import tensorflow as tf

from tfreward.models.backbones import ResNet
from tfreward.models.base import TaskModel
from tfreward.models.deeplab.layers import ASPP, SegmentationHead
from tfreward.models.deeplab.options import BACKBONES, DeepLabOptions
from tfreward.ops import distributed

IGNORE_INDEX = 255


def masked_cross_entropy(logits, mask, num_classes):
  """Sum of the softmax cross-entropy over the kept pixels, and their number (both float32 scalars).

  logits [B, H, W, C] float32; mask [B, H, W] int; a pixel is kept when its mask is in [0, num_classes).
  """
  mask = tf.cast(mask, tf.int32)
  keep = (mask >= 0) & (mask < num_classes)
  target = tf.where(keep, mask, tf.zeros_like(mask))
  ce = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=target, logits=logits)
  keep = tf.cast(keep, tf.float32)
  return tf.reduce_sum(ce * keep), tf.reduce_sum(keep)


class DeepLab(TaskModel):
  """DeepLabv3 semantic segmentation: `DeepLab(options, *, num_classes, image_size, clip_norm=None)`, options a
  `DeepLabOptions` (or a dict of its fields); see `TaskModel` and the module docstring."""

  options_cls = DeepLabOptions

  def __init__(self, options=None, **kwargs):
    super().__init__(options, **kwargs)
    opts = self.options
    # === Layers ===
    self.backbone = ResNet(BACKBONES[opts.backbone], image_size=self.image_size, width=opts.backbone_width,
                           weights=opts.backbone_weights, output_stride=opts.output_stride, sync_bn=opts.sync_bn,
                           name="backbone")
    self.aspp = ASPP(opts.aspp_channels, opts.rates, opts.dropout, opts.sync_bn, name="aspp")
    self.head = SegmentationHead(self.num_classes, opts.aspp_channels, sync_bn=opts.sync_bn, name="head")
    self.aux = None
    if opts.aux_head:
      aux_channels = max(self.backbone.channels["C4"] // 4, 1)
      self.aux = SegmentationHead(self.num_classes, aux_channels, dropout=opts.dropout, sync_bn=opts.sync_bn,
                                  name="aux_head")

  @property
  def loss_weights(self):
    weights = {"loss_ce": 1.0}
    if self.options.aux_head:
      weights["loss_aux"] = float(self.options.aux_weight)
    return weights

  @property
  def log_names(self):
    return tuple(self.loss_weights)

  def _upsample(self, logits):
    return tf.image.resize(tf.cast(logits, tf.float32), self.image_size, method="bilinear")

  def call(self, images, training=False):
    """images [B, H, W, 3] 0..255 -> logits [B, H, W, C] float32; with `aux_head`, (logits, aux logits)."""
    features = self.backbone(images, training=training)
    logits = self._upsample(self.head(self.aspp(features["C5"], training=training), training=training))
    if self.aux is None:
      return logits
    return logits, self._upsample(self.aux(features["C4"], training=training))

  def compute_losses(self, images, labels, training):
    outputs = self(images, training=training)
    logits = outputs if self.aux is None else outputs[0]
    mask = labels["mask"]
    total, kept = masked_cross_entropy(logits, mask, self.num_classes)
    num_pixels = tf.maximum(distributed.global_sum(kept), 1.0)
    terms = {"loss_ce": total / num_pixels}
    if self.aux is not None:
      terms["loss_aux"] = masked_cross_entropy(outputs[1], mask, self.num_classes)[0] / num_pixels
    return terms

  def segment(self, images):
    """images [B, H, W, 3] 0..255 -> {"labels": [B, H, W] int32 class of each pixel}."""
    outputs = self(images, training=False)
    logits = outputs if self.aux is None else outputs[0]
    return {"labels": tf.argmax(logits, axis=-1, output_type=tf.int32)}
