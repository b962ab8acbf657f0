"""The standard RetinaNet loss (Lin et al., 2017; mmdetection's RetinaHead), the baseline of FreeAnchor.

Inputs are pixel xyxy like `tfreward.losses.free_anchor` (convert the data contract's normalised yxyx at the
boundary). Per image, with IoU(a_j, g_i) between anchor j and valid GT i:

  Assignment (mmdetection's MaxIoUAssigner, pos_iou_thr 0.5, neg_iou_thr 0.4, min_pos_iou 0, match_low_quality):
    max_j = max_i IoU (0 without valid GT); anchor j is negative if max_j < neg_iou_thr, positive for
    argmax_i IoU (the lowest index among ties) if max_j >= pos_iou_thr, ignored in between. Low-quality matches
    then overwrite: for each GT i in order (so the last one wins), every anchor whose IoU with i equals i's best
    IoU becomes a positive of i, if that best IoU is >= min_pos_iou and > 0. (mmdetection has no "> 0" guard: a GT
    that overlaps no anchor would claim every anchor at IoU 0; here it simply gets no positive.)
  Classification: sigmoid focal loss (alpha 0.25, gamma 2) on every positive and negative anchor against one-hot
    targets (all zeros for negatives); ignored anchors contribute nothing.
  Boxes: smooth L1 (beta 0.11) between predicted deltas and `encode_boxes(anchor, matched GT)` (means 0, stds
    0.1/0.1/0.2/0.2), summed over the 4 coordinates, positives only.
  Reduction: both sums are divided by max(1, number of positive anchors over the global batch), the count summed
    over all replicas with `global_sum`; each replica returns its share.

Non-finite predictions (`tfreward.ops.finite`): if any class logit or box delta is NaN or +-inf, both returned
losses are NaN (and their gradients), eagerly and under XLA alike. The assignment depends only on anchors and GT.
Degenerate ground truth: a valid row whose box has no positive finite width and height (zero-area, inverted, NaN)
is treated as padding. (Its IoU with every anchor is 0, so it could never be matched anyway; the mask also keeps a
NaN box from turning anchors into IGNORED ones.)

Memory: the [B, A, M] IoU matrix (and its low-quality mask) plus [B, A, C] focal terms; 78 MB per image for
COCO at 1024x1024 (A = 196,416 anchors, M = 100).
"""

import tensorflow as tf

from tfreward.losses.focal import sigmoid_focal_loss
from tfreward.losses.smooth_l1 import smooth_l1
from tfreward.ops import box_coder
from tfreward.ops import boxes as box_ops
from tfreward.ops import finite
from tfreward.ops.distributed import global_sum

NEGATIVE = -1  # `matched` value of a background anchor
IGNORED = -2  # `matched` value of an anchor left out of every loss


def _check_thresholds(pos_iou_thr, neg_iou_thr, min_pos_iou):
  if not 0.0 <= neg_iou_thr <= pos_iou_thr <= 1.0:
    raise ValueError(f"need 0 <= neg_iou_thr <= pos_iou_thr <= 1, got neg_iou_thr={neg_iou_thr!r}, "
                     f"pos_iou_thr={pos_iou_thr!r}.")
  if not 0.0 <= min_pos_iou <= 1.0:
    raise ValueError(f"min_pos_iou must be in [0, 1], got {min_pos_iou!r}.")


def max_iou_assign(anchors, gt_boxes, gt_valid, *, pos_iou_thr=0.5, neg_iou_thr=0.4, match_low_quality=True,
                   min_pos_iou=0.0):
  """Max-IoU anchor assignment, batched and static-shape.

  Args:
    anchors: [A, 4] float xyxy pixels, shared by the batch.
    gt_boxes: [B, M, 4] float xyxy pixels; padding rows are ignored whatever they hold.
    gt_valid: [B, M] bool, True for real objects; rows without a positive finite extent count as padding.
    pos_iou_thr: float. IoU at or above which an anchor is positive. Defaults to 0.5.
    neg_iou_thr: float <= pos_iou_thr. IoU below which an anchor is negative. Defaults to 0.4.
    match_low_quality: bool. Each GT also takes every anchor that ties for its best IoU. Defaults to True.
    min_pos_iou: float. Smallest best IoU a GT needs for its low-quality matches. Defaults to 0.

  Returns:
    matched: [B, A] int32, the GT slot of each positive anchor, NEGATIVE (-1) or IGNORED (-2).
    max_iou: [B, A] float32, each anchor's largest IoU with a valid GT (0 without one).
  """
  _check_thresholds(pos_iou_thr, neg_iou_thr, min_pos_iou)
  anchors = tf.cast(anchors, tf.float32)
  gt_boxes = tf.cast(gt_boxes, tf.float32)
  valid = tf.cast(gt_valid, tf.bool) & box_ops.positive_extent(gt_boxes, "xyxy")
  iou = tf.where(valid[:, None, :], box_ops.pairwise_iou(anchors, gt_boxes), -1.0)  # [B, A, M]
  max_iou = tf.maximum(tf.reduce_max(iou, axis=-1), 0.0)  # [B, A]; 0 when no GT is valid (and for M == 0)
  best_gt = tf.argmax(iou, axis=-1, output_type=tf.int32)  # [B, A], first of ties
  matched = tf.where(max_iou >= pos_iou_thr, best_gt, tf.where(max_iou < neg_iou_thr, NEGATIVE, IGNORED))
  if match_low_quality:
    gt_best = tf.reduce_max(iou, axis=1, keepdims=True)  # [B, 1, M]
    claims = (iou == gt_best) & (gt_best >= min_pos_iou) & (gt_best > 0.0) & valid[:, None, :]  # [B, A, M]
    slot = tf.range(tf.shape(iou)[-1], dtype=tf.int32)
    last_claim = tf.reduce_max(tf.where(claims, slot, -1), axis=-1)  # [B, A]; the last GT overwrites
    matched = tf.where(last_claim >= 0, last_claim, matched)
  return matched, max_iou


def _check_inputs(anchors, cls_logits, box_deltas, gt_boxes, gt_classes, gt_valid):
  shapes = {"anchors": anchors.shape, "cls_logits": cls_logits.shape, "box_deltas": box_deltas.shape,
            "gt_boxes": gt_boxes.shape, "gt_classes": gt_classes.shape, "gt_valid": gt_valid.shape}
  for name, rank, four in (("anchors", 2, True), ("cls_logits", 3, False), ("box_deltas", 3, True),
                           ("gt_boxes", 3, True), ("gt_classes", 2, False), ("gt_valid", 2, False)):
    shape = shapes[name]
    if shape.rank != rank or (four and shape[-1] not in (None, 4)):
      raise ValueError(f"{name} must have rank {rank}{' with a last dimension of 4' if four else ''}, got shape "
                       f"{shape}.")
  if cls_logits.shape[-1] is None:
    raise ValueError(f"cls_logits needs a static number of classes, got shape {cls_logits.shape}.")
  if not (box_deltas.shape[:2].is_compatible_with(cls_logits.shape[:2])
          and anchors.shape[:1].is_compatible_with(cls_logits.shape[1:2])):
    raise ValueError(f"box_deltas {box_deltas.shape} and anchors {anchors.shape} must match cls_logits "
                     f"{cls_logits.shape} in batch and anchors.")
  for name in ("gt_classes", "gt_valid"):
    if not shapes[name].is_compatible_with(gt_boxes.shape[:2]):
      raise ValueError(f"{name} {shapes[name]} must be [B, M] like gt_boxes {gt_boxes.shape}.")


def retinanet_loss(anchors, cls_logits, box_deltas, gt_boxes, gt_classes, gt_valid, *, pos_iou_thr=0.5,
                   neg_iou_thr=0.4, match_low_quality=True, min_pos_iou=0.0, alpha=0.25, gamma=2.0,
                   smoothl1_beta=0.11, target_means=box_coder.DEFAULT_MEANS, target_stds=box_coder.DEFAULT_STDS):
  """RetinaNet focal classification and smooth L1 box losses; this replica's share of the global-batch value.

  Args:
    anchors: [A, 4] float xyxy pixels (`tfreward.ops.anchors.retinanet_anchors`).
    cls_logits: [B, A, C] float (bfloat16 is promoted), sigmoid logits, no background class.
    box_deltas: [B, A, 4] float (dx, dy, dw, dh) in std units (`tfreward.ops.box_coder`).
    gt_boxes: [B, M, 4] float xyxy pixels; padding rows are ignored whatever they hold.
    gt_classes: [B, M] int, class in [0, C) for valid rows; padding rows are ignored.
    gt_valid: [B, M] bool, True for real objects; rows without a positive finite extent count as padding.
    pos_iou_thr, neg_iou_thr, match_low_quality, min_pos_iou: the assignment, see `max_iou_assign`.
    alpha: float in [0, 1], focal weight of positives. Defaults to 0.25.
    gamma: float >= 0, focal exponent. Defaults to 2.0.
    smoothl1_beta: float >= 0 (0 is L1). Defaults to 0.11.
    target_means, target_stds: 4 floats each, the box coder's. Default to (0, 0, 0, 0) and (0.1, 0.1, 0.2, 0.2).

  Returns:
    dict with float32 scalars `cls_loss` and `box_loss`, both NaN when a logit or delta is not finite.
  """
  anchors, cls_logits, box_deltas = (tf.convert_to_tensor(x) for x in (anchors, cls_logits, box_deltas))
  gt_boxes, gt_classes, gt_valid = (tf.convert_to_tensor(x) for x in (gt_boxes, gt_classes, gt_valid))
  _check_inputs(anchors, cls_logits, box_deltas, gt_boxes, gt_classes, gt_valid)
  num_classes = cls_logits.shape[-1]
  anchors = tf.cast(anchors, tf.float32)
  gt_boxes = tf.cast(gt_boxes, tf.float32)
  matched, _ = max_iou_assign(anchors, gt_boxes, gt_valid, pos_iou_thr=pos_iou_thr, neg_iou_thr=neg_iou_thr,
                              match_low_quality=match_low_quality, min_pos_iou=min_pos_iou)
  positive = matched >= 0  # [B, A]
  slot = tf.maximum(matched, 0)
  labels = tf.where(positive, tf.gather(tf.cast(gt_classes, tf.int32), slot, batch_dims=1), -1)  # [B, A]
  targets = tf.one_hot(labels, num_classes, dtype=tf.float32)  # [B, A, C]; -1 gives all zeros
  focal = sigmoid_focal_loss(logits=cls_logits, labels=targets, alpha=alpha, gamma=gamma)  # [B, A, C]
  cls_sum = tf.reduce_sum(tf.where((matched != IGNORED)[..., None], focal, 0.0))

  # Non-positive anchors regress onto themselves (target 0), so no degenerate box reaches the encoder.
  matched_boxes = tf.where(positive[..., None], tf.gather(gt_boxes, slot, batch_dims=1), anchors)  # [B, A, 4]
  box_targets = box_coder.encode_boxes(anchors, matched_boxes, means=target_means, stds=target_stds)  # [B, A, 4]
  box_l1 = tf.reduce_sum(smooth_l1(tf.cast(box_deltas, tf.float32) - box_targets, beta=smoothl1_beta), axis=-1)
  box_sum = tf.reduce_sum(tf.where(positive, box_l1, 0.0))

  # The number of positive anchors in the global batch (all replicas), at least 1.
  normaliser = tf.maximum(global_sum(tf.reduce_sum(tf.cast(positive, tf.float32))), 1.0)
  losses = {"cls_loss": cls_sum / normaliser, "box_loss": box_sum / normaliser}
  return finite.nan_if_not_finite(losses, cls_logits, box_deltas)
