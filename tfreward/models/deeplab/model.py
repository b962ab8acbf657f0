"""DeepLabv3 (Chen et al., 2017, "Rethinking Atrous Convolution for Semantic Image Segmentation").

  images [B, H, W, 3] 0..255 -> backbone (`tfreward.models.backbones.ResNet` at output stride 16 or 8; it normalises
  the images) -> C5 -> `layers.ASPP` -> `layers.SegmentationHead` -> logits [B, H/os, W/os, C] -> bilinear resize
  (`tf.image.resize`, half-pixel centres) to [B, H, W, C] float32. With `aux_head`, an FCN head on C4 gives auxiliary
  logits at the input size too (training only: `segment` ignores them).

Training (`compute_losses`, terms in `reward.py`): mode "ce": loss_ce, the (class-weighted) softmax cross-entropy over
the pixels whose `mask` is in [0, num_classes) (255 and any other value are ignored), summed and divided by the number
of kept pixels over all replicas (at least 1), so an all-ignored batch gives 0 with finite gradients; with `aux_head`
also loss_aux (weight `aux_weight`). Mode "reward": loss_reward from the `estimator` (weight 1), plus loss_ce with
weight `ce_weight` (reinforce's anchor) and loss_aux when there is an aux head, and the reward statistics
(`reward_statistics()`, logged by the recipe's `RewardStatsCallback`).

Class weights (`class_weights: frequency`): the trainer counts the labelled pixels of each class over the training
split once (cached beside the data) and calls `set_dataset_statistics`; the weights are constants of the traced step,
not variables, so checkpoints of either mode load into the other.

Randomness: image b of replica r draws its samples from `fold_in(fold_in((seed, 0), step), r * B + b)`, step the
optimizer's iteration counter: the samples depend on the image's place in the global batch, not on the replica
layout, so N replicas sample exactly what one replica samples on the same global batch.

Inference (`segment`, also `predict_step`): {"labels": [B, H, W] int32 argmax of the logits}, the key read by
`tfreward.training.eval_callback.SegmentationEvalCallback` and `tfreward.export.saved_model`.
"""

import numpy as np
import tensorflow as tf

from tfreward.models.backbones import ResNet
from tfreward.models.base import RecipeCallback, TaskModel
from tfreward.models.deeplab import reward
from tfreward.models.deeplab.layers import ASPP, SegmentationHead
from tfreward.models.deeplab.options import BACKBONES, DeepLabOptions
from tfreward.ops import distributed
from tfreward.ops import finite
from tfreward.ops import sampling

IGNORE_INDEX = 255
CLASS_PIXEL_COUNTS = "class_pixel_counts"


def frequency_class_weights(counts, smooth):
  """The seed's class weights from per-class pixel counts [C]: w_c = 1 / (f_c + smooth), f_c = count_c / total,
  normalised to sum to C. Returns a float64 numpy array [C]."""
  counts = np.asarray(counts, np.float64)
  if counts.ndim != 1 or not counts.size or (counts < 0).any() or counts.sum() <= 0:
    raise ValueError(f"class pixel counts must be a non-empty vector of counts >= 0 with a positive sum, got "
                     f"{counts.tolist()!r}.")
  weights = 1.0 / (counts / counts.sum() + float(smooth))
  return weights * counts.size / weights.sum()


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
    self.class_weights = None  # [C] floats from `set_dataset_statistics` with class_weights "frequency"
    self.aux = None
    if opts.aux_head:
      aux_channels = max(self.backbone.channels["C4"] // 4, 1)
      self.aux = SegmentationHead(self.num_classes, aux_channels, dropout=opts.dropout, sync_bn=opts.sync_bn,
                                  name="aux_head")

  @property
  def loss_weights(self):
    o = self.options
    weights = {"loss_ce": 1.0}
    if o.mode == "reward":
      weights = {"loss_reward": 1.0}
      if o.estimator == "reinforce" and o.ce_weight:
        weights["loss_ce"] = float(o.ce_weight)
    if o.aux_head:
      weights["loss_aux"] = float(o.aux_weight)
    return weights

  @property
  def log_names(self):
    return tuple(self.loss_weights) + (("reward",) if self.options.mode == "reward" else ())

  @property
  def statistic_names(self):
    return reward.STATISTICS[self.options.estimator] if self.options.mode == "reward" else ()

  def recipe_callbacks(self):
    """Reward mode: `RewardStatsCallback` (by name), which logs `reward_statistics()`."""
    return [RecipeCallback("reward_stats", {})] if self.options.mode == "reward" else []

  def required_dataset_statistics(self):
    """With class_weights "frequency": the per-class labelled pixel counts of the training split."""
    return (CLASS_PIXEL_COUNTS,) if self.options.class_weights == "frequency" else ()

  def set_dataset_statistics(self, statistics):
    """statistics: dict with `class_pixel_counts` [C] ints (see `required_dataset_statistics`). Call before the
    first train step (the weights are constants of the traced step)."""
    if CLASS_PIXEL_COUNTS not in self.required_dataset_statistics():
      return
    counts = statistics[CLASS_PIXEL_COUNTS]
    if len(counts) != self.num_classes:
      raise ValueError(f"class_pixel_counts has {len(counts)} entries for a model of {self.num_classes} classes.")
    weights = frequency_class_weights(counts, self.options.class_weight_smooth)
    self.class_weights = tuple(float(w) for w in weights)

  def _upsample(self, logits):
    return tf.image.resize(tf.cast(logits, tf.float32), self.image_size, method="bilinear")

  def call(self, images, training=False):
    """images [B, H, W, 3] 0..255 -> logits [B, H, W, C] float32; with `aux_head`, (logits, aux logits)."""
    features = self.backbone(images, training=training)
    logits = self._upsample(self.head(self.aspp(features["C5"], training=training), training=training))
    if self.aux is None:
      return logits
    return logits, self._upsample(self.aux(features["C4"], training=training))

  def _image_seeds(self, batch_size):
    """One [2] seed per image of this replica's batch (see the module docstring)."""
    optimizer = getattr(self, "optimizer", None)
    step = optimizer.iterations if optimizer is not None else 0
    seed = sampling.fold_in(tf.constant([self.options.seed, 0], tf.int64), step)
    ctx = tf.distribute.get_replica_context()
    first = (ctx.replica_id_in_sync_group if ctx is not None else 0) * batch_size
    return [sampling.fold_in(seed, first + b) for b in range(batch_size)]

  def compute_losses(self, images, labels, training):
    o = self.options
    outputs = self(images, training=training)
    logits = outputs if self.aux is None else outputs[0]
    mask = labels["mask"]
    weighted, keep = reward.pixel_cross_entropy(logits, mask, self.num_classes, self.class_weights)
    num_pixels = tf.maximum(distributed.global_sum(tf.reduce_sum(keep)), 1.0)
    terms = {}
    if "loss_ce" in self.loss_weights:
      terms["loss_ce"] = tf.reduce_sum(weighted) / num_pixels
    if self.aux is not None:
      aux = reward.pixel_cross_entropy(outputs[1], mask, self.num_classes, self.class_weights)[0]
      terms["loss_aux"] = tf.reduce_sum(aux) / num_pixels
    if o.mode == "reward" and o.estimator == "reinforce":
      batch_size = logits.shape[0]
      if batch_size is None:
        raise ValueError("reward tuning needs a static per-replica batch size (batches with drop_remainder).")
      terms.update(reward.reinforce_terms(logits, mask, num_classes=self.num_classes,
                                          seeds=self._image_seeds(batch_size), num_samples=o.num_samples,
                                          temperature=o.temperature))
    elif o.mode == "reward":
      terms.update(reward.weighted_ce_terms(logits, mask, weighted, num_pixels, num_classes=self.num_classes,
                                            baseline_weight=o.baseline_weight))
    return finite.nan_if_not_finite(terms, *tf.nest.flatten(outputs))  # every term NaN for non-finite logits

  def segment(self, images):
    """images [B, H, W, 3] 0..255 -> {"labels": [B, H, W] int32 class of each pixel}."""
    outputs = self(images, training=False)
    logits = outputs if self.aux is None else outputs[0]
    return {"labels": tf.argmax(logits, axis=-1, output_type=tf.int32)}
