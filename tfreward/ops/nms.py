"""Class-aware non-maximum suppression to fixed-size outputs, XLA-compilable (TPU-ready).

Which TensorFlow NMS compiles with `tf.function(jit_compile=True)` on CPU (TensorFlow 2.21, measured):
  `tf.image.combined_non_max_suppression`   no: "Detected unsupported operations ... CombinedNonMaxSuppression".
  `tf.raw_ops.NonMaxSuppressionV5` (what `tf.image.non_max_suppression_with_scores` runs)   no.
  `tf.image.non_max_suppression_padded`     yes (a tiled while loop), but it is class-agnostic, suppresses at
      IoU >= threshold (the other ops at IoU > threshold) and takes a box whose coordinates are all <= 0 for
      padding; class awareness would need the "offset boxes by class" trick, which perturbs IoUs in float32.
So this module is a hand-written padded NMS: exact greedy, class-aware, IoU > threshold like
`tf.image.non_max_suppression`, batched, static shapes, compiles under XLA.

Algorithm (per image, all images at once): keep the `pre_nms_top_k` highest scores, sorted (ties: lower index
first); s[j, i] = "candidate j outranks i, same class, IoU > threshold, both above the score threshold". Greedy NMS
keeps i iff no kept j suppresses it; the fixed point of keep <- valid & ~any_j(keep[j] & s[j, i]) is that greedy
result and is unique (entry i only depends on entries before it), and iterating from keep = valid reaches it after
at most (longest suppression chain + 1) rounds: a `tf.while_loop` with a [B, K] state that stops when nothing
changes. Memory is O(B * K^2) for K = pre_nms_top_k.
"""

import tensorflow as tf

from tfreward.errors import check_int
from tfreward.ops import boxes as box_ops


def _check(boxes, scores, classes, max_detections, iou_threshold, pre_nms_top_k):
  if boxes.shape.rank != 3 or boxes.shape[-1] != 4:
    raise ValueError(f"boxes must be [B, N, 4], got shape {boxes.shape}.")
  if boxes.shape[1] is None:
    raise ValueError(f"the number of boxes N must be static, got shape {boxes.shape}.")
  if scores.shape.rank != 2 or classes.shape.rank != 2:
    raise ValueError(f"scores and classes must be [B, N], got shapes {scores.shape} and {classes.shape}.")
  check_int("max_detections", max_detections)
  check_int("pre_nms_top_k", pre_nms_top_k)
  if not 0.0 <= float(iou_threshold) <= 1.0:
    raise ValueError(f"iou_threshold must lie in [0, 1], got {iou_threshold!r}.")


def greedy_keep(boxes, valid, classes, iou_threshold):
  """Greedy class-aware NMS on candidates already sorted by decreasing score.

  Args:
    boxes: [B, K, 4] float32 corner boxes (yxyx or xyxy), sorted by decreasing score.
    valid: [B, K] bool, candidates that take part (invalid ones neither survive nor suppress).
    classes: [B, K] int32. Only candidates of the same class suppress each other.
    iou_threshold: float. A candidate is suppressed by a kept, higher-ranked one with IoU > iou_threshold.

  Returns:
    [B, K] bool, the kept candidates.
  """
  k = boxes.shape[1]
  iou = box_ops.pairwise_iou(boxes, boxes)  # [B, K, K]
  outranks = tf.range(k)[:, None] < tf.range(k)[None, :]  # [K, K]: row j before column i
  suppresses = ((iou > iou_threshold) & outranks[None] & (classes[:, :, None] == classes[:, None, :])
                & valid[:, :, None] & valid[:, None, :])  # [B, K, K]

  def body(keep, unused_changed, step):
    new_keep = valid & ~tf.reduce_any(suppresses & keep[:, :, None], axis=1)
    return new_keep, tf.reduce_any(new_keep != keep), step + 1

  keep, _, _ = tf.while_loop(lambda keep, changed, step: changed & (step <= k), body,
                             (valid, tf.constant(True), tf.constant(0)))
  return keep


def class_aware_nms(boxes, scores, classes, *, max_detections=100, iou_threshold=0.5, score_threshold=0.0,
                    pre_nms_top_k=1000):
  """Batched class-aware NMS with fixed-size, score-sorted outputs.

  Args:
    boxes: [B, N, 4] float, corner boxes (yxyx, any units; N static). Inverted boxes have area 0 and suppress
      nothing.
    scores: [B, N] float, one score per box.
    classes: [B, N] int, the class of each box; boxes of different classes never suppress each other.
    max_detections: int. K, the number of output slots. Defaults to 100.
    iou_threshold: float in [0, 1]. Defaults to 0.5.
    score_threshold: float. Boxes with score <= score_threshold are dropped. Defaults to 0.0.
    pre_nms_top_k: int. Only the highest-scoring boxes of each image enter NMS. Defaults to 1000.

  Returns:
    dict with `boxes` [B, K, 4] float32 (input format), `scores` [B, K] float32 (decreasing), `classes` [B, K]
    int32 and `num_detections` [B] int32; slots at and after `num_detections` hold boxes 0, scores 0, classes -1.
  """
  boxes = tf.convert_to_tensor(boxes)
  scores = tf.convert_to_tensor(scores)
  classes = tf.convert_to_tensor(classes)
  _check(boxes, scores, classes, max_detections, iou_threshold, pre_nms_top_k)
  with tf.name_scope("class_aware_nms"):
    boxes = tf.cast(boxes, tf.float32)
    scores = tf.cast(scores, tf.float32)
    classes = tf.cast(classes, tf.int32)
    num_boxes = boxes.shape[1]
    if num_boxes == 0:  # Nothing to select: one dummy candidate below the threshold keeps the shapes valid.
      batch = tf.shape(boxes)[0]
      boxes, classes = tf.zeros([batch, 1, 4]), tf.fill([batch, 1], -1)
      scores = tf.fill([batch, 1], float(score_threshold) - 1.0)
      num_boxes = 1
    k = min(pre_nms_top_k, num_boxes)
    top_scores, order = tf.math.top_k(scores, k)  # [B, k], sorted
    top_boxes = tf.gather(boxes, order, batch_dims=1)  # [B, k, 4]
    top_classes = tf.gather(classes, order, batch_dims=1)  # [B, k]
    valid = top_scores > score_threshold
    keep = greedy_keep(top_boxes, valid, top_classes, float(iou_threshold))

    slots = min(max_detections, k)
    ranked = tf.where(keep, tf.cast(k - tf.range(k), tf.float32)[None], 0.0)  # kept first, in score order
    _, picks = tf.math.top_k(ranked, slots)  # [B, slots]
    num_detections = tf.minimum(tf.reduce_sum(tf.cast(keep, tf.int32), axis=1), slots)  # [B]
    filled = tf.range(slots)[None, :] < num_detections[:, None]  # [B, slots]
    out = {
        "boxes": tf.where(filled[..., None], tf.gather(top_boxes, picks, batch_dims=1), 0.0),
        "scores": tf.where(filled, tf.gather(top_scores, picks, batch_dims=1), 0.0),
        "classes": tf.where(filled, tf.gather(top_classes, picks, batch_dims=1), -1),
    }
    if slots < max_detections:
      pad = max_detections - slots
      out = {"boxes": tf.pad(out["boxes"], [[0, 0], [0, pad], [0, 0]]),
             "scores": tf.pad(out["scores"], [[0, 0], [0, pad]]),
             "classes": tf.pad(out["classes"], [[0, 0], [0, pad]], constant_values=-1)}
    out["num_detections"] = num_detections
    return out


def top_class_candidates(boxes, class_scores, *, top_k):
  """Multi-label candidates: the `top_k` highest (box, class) scores of each image, for `class_aware_nms`.

  Args:
    boxes: [B, N, 4] float, one box per anchor.
    class_scores: [B, N, C] float, per-class scores (N and C static).
    top_k: int. Number of (anchor, class) pairs kept per image (at most N * C).

  Returns:
    boxes [B, k, 4], scores [B, k] (decreasing) and classes [B, k] int32, k = min(top_k, N * C).
  """
  class_scores = tf.convert_to_tensor(class_scores)
  if class_scores.shape.rank != 3 or None in class_scores.shape[1:]:
    raise ValueError(f"class_scores must be [B, N, C] with static N and C, got shape {class_scores.shape}.")
  check_int("top_k", top_k)
  num_anchors, num_classes = class_scores.shape[1], class_scores.shape[2]
  flat = tf.reshape(class_scores, [-1, num_anchors * num_classes])  # [B, N * C]
  scores, index = tf.math.top_k(flat, min(top_k, num_anchors * num_classes))
  return (tf.gather(boxes, index // num_classes, batch_dims=1), scores,
          tf.cast(index % num_classes, tf.int32))
