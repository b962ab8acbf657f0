"""Per-image mIoU reward for semantic segmentation (seed 003), XLA-safe.

`per_image_iou` scores each label map on its own (no accumulation over the batch): pixels whose ground truth is the
ignore index are dropped (whatever the prediction says there); on the kept pixels, per class c,
I_c = #(pred = c and gt = c), U_c = #(pred = c) + #(gt = c) - I_c, IoU_c = I_c / U_c (NaN when U_c = 0), and mIoU is
the mean over the classes with U_c > 0 (NaN when there is none, e.g. every pixel ignored). A class absent from both
maps is left out of the mean; a class in only one of them counts with IoU 0.

`weighted_ce_rewards` is the seed's reward for its weighted cross-entropy: R = 1 - mIoU (0.5 where mIoU is NaN), and
r = R - baseline_weight * (the mean R of the batch's other images).

Counts are one-hot sums reduced over the pixels at once (static shapes, no loop over classes), exact in int32.
"""

import tensorflow as tf

from tfreward.errors import check_int


def per_image_iou(pred_labels, gt_labels, *, num_classes, ignore_index=255):
  """Per-image, per-class intersection, union and IoU, and the per-image mIoU.

  Args:
    pred_labels: [..., B, H, W] int predicted label maps, values in [0, num_classes) (others count as no class).
    gt_labels: [..., B, H, W] int ground truth, values in [0, num_classes) or `ignore_index` (other values are
      dropped like the ignore index; the pipelines reject them before they get here).
    num_classes: int C >= 1.
    ignore_index: int. Defaults to 255.

  Returns:
    dict of `area_intersect` int32 [..., B, C], `area_union` int32 [..., B, C], `class_iou` float32 [..., B, C]
    (NaN where the union is 0) and `miou` float32 [..., B] (NaN where no class has a union).
  """
  check_int("num_classes", num_classes)
  pred = tf.cast(tf.convert_to_tensor(pred_labels), tf.int32)
  gt = tf.cast(tf.convert_to_tensor(gt_labels), tf.int32)
  if pred.shape.rank is None or pred.shape.rank < 3 or pred.shape != gt.shape:
    raise ValueError(f"pred_labels and gt_labels must be int label maps of one shape [..., B, H, W], got "
                     f"{pred.shape} and {gt.shape}.")
  keep = (gt != ignore_index) & (gt >= 0) & (gt < num_classes)
  pred = tf.where(keep, pred, -1)  # -1: one_hot gives no class
  gt = tf.where(keep, gt, -1)
  flat = tf.concat([tf.shape(pred)[:-2], [-1]], 0)  # [..., B, H * W]

  def count(labels):  # [..., B, H * W] -> [..., B, C] int32 pixels per class
    return tf.reduce_sum(tf.one_hot(tf.reshape(labels, flat), num_classes, dtype=tf.int32), axis=-2)

  intersect = count(tf.where(pred == gt, gt, -1))
  union = count(pred) + count(gt) - intersect
  present = union > 0
  ratio = tf.cast(intersect, tf.float32) / tf.cast(tf.maximum(union, 1), tf.float32)
  class_iou = tf.where(present, ratio, float("nan"))
  num_present = tf.reduce_sum(tf.cast(present, tf.float32), axis=-1)
  iou_sum = tf.reduce_sum(tf.where(present, class_iou, 0.0), axis=-1)
  miou = tf.where(num_present > 0, iou_sum / tf.maximum(num_present, 1.0), float("nan"))
  return {"area_intersect": intersect, "area_union": union, "class_iou": class_iou, "miou": miou}


def weighted_ce_rewards(miou, *, baseline_weight=0.1, batch_sum=None):
  """The seed's per-image reward and its leave-one-out baseline over the batch.

  Args:
    miou: [B] float per-image mIoU (NaN where undefined). Without `batch_sum`, B >= 2 (the baseline needs another
      image).
    baseline_weight: float. Weight of the other images' mean reward. Defaults to 0.1.
    batch_sum: optional function summing a float scalar over a larger batch this one is part of (e.g.
      `tfreward.ops.distributed.global_sum`: the global batch of every replica); it sums this batch's R and its
      number of images. Defaults to None (this batch alone). With it, a batch of one image in all has no other
      images: its baseline is 0 (r = R).

  Returns:
    dict of float32 `R` [B] = 1 - miou (0.5 where miou is NaN) and `r` [B] = R - baseline_weight * (sum of the other
    images' R) / (number of other images).
  """
  miou = tf.cast(tf.convert_to_tensor(miou), tf.float32)
  if miou.shape.rank != 1:
    raise ValueError(f"miou must be a [B] vector, got shape {miou.shape}.")
  if batch_sum is None and miou.shape[0] is not None and miou.shape[0] < 2:
    raise ValueError(f"weighted_ce_rewards needs at least 2 images for its leave-one-out baseline, got "
                     f"{miou.shape[0]}.")
  batch_sum = batch_sum or (lambda value: value)
  reward = tf.where(tf.math.is_nan(miou), 0.5, 1.0 - miou)
  reward_sum = batch_sum(tf.reduce_sum(reward))
  num_images = batch_sum(tf.cast(tf.shape(reward)[0], tf.float32))
  others = (reward_sum - reward) / tf.maximum(num_images - 1.0, 1.0)
  return {"R": reward, "r": reward - float(baseline_weight) * others}
