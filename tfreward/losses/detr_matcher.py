"""Group-wise Hungarian matching for (Group) DETR: the matching cost and one exact assignment per group.

The predictions of a Group DETR decoder are G groups of Q queries concatenated on the query axis (group g holds
queries g*Q ... g*Q+Q-1). Every group is matched to the ground truth on its own, one-to-one, so each object gets
G positive queries, one per group. With G = 1 this is the plain DETR matcher.

Non-finite predictions give NaN or +inf costs; `matching.linear_sum_assignment` replaces them with a finite stand-in
above every finite cost of the problem (a forbidden pair), so each group still gets a complete one-to-one matching,
the same eagerly and under XLA, and the solver never loops on them (the loss terms are NaN by `tfreward.ops.finite`).
"""

import tensorflow as tf

from tfreward.losses import focal
from tfreward.ops import boxes as box_ops
from tfreward.ops import matching


def _pair_cost(class_logit, pred_boxes, gt_boxes, *, cost_class, cost_bbox, cost_giou, focal_alpha, focal_gamma):
  """The DETR cost of (prediction, target) pairs, element-wise with broadcasting.

  Args:
    class_logit: [...] float32 logit of each pair's prediction for the target's class.
    pred_boxes, gt_boxes: [..., 4] float32 normalised cxcywh, broadcastable to each other.

  Returns:
    [...] float32 `cost_bbox * L1 + cost_class * focal - cost_giou * GIoU`.
  """
  class_cost = focal.focal_class_cost(class_logit, alpha=focal_alpha, gamma=focal_gamma)
  # L1 one coordinate at a time: a [..., 4] difference of every pair would be a temporary XLA writes out in full.
  l1_cost = tf.add_n([tf.abs(gt_boxes[..., k] - pred_boxes[..., k]) for k in range(4)])
  giou = box_ops.elementwise_giou(box_ops.cxcywh_to_xyxy(gt_boxes), box_ops.cxcywh_to_xyxy(pred_boxes))
  return cost_bbox * l1_cost + cost_class * class_cost - cost_giou * giou


def _inputs(pred_logits, pred_boxes, gt_boxes, gt_classes):
  """float32 logits, boxes and targets without gradient, classes clipped into [0, C)."""
  pred_logits = tf.stop_gradient(tf.cast(pred_logits, tf.float32))
  pred_boxes = tf.stop_gradient(tf.cast(pred_boxes, tf.float32))
  classes = tf.clip_by_value(tf.cast(gt_classes, tf.int32), 0, pred_logits.shape[-1] - 1)
  return pred_logits, pred_boxes, tf.cast(gt_boxes, tf.float32), classes


def matching_cost(pred_logits, pred_boxes, gt_boxes, gt_classes, *, cost_class=2.0, cost_bbox=5.0, cost_giou=2.0,
                  focal_alpha=0.25, focal_gamma=2.0):
  """DETR matching cost of every (target, query) pair: `cost_bbox * L1 + cost_class * focal - cost_giou * GIoU`.

  Args:
    pred_logits: [B, N, C] float class logits (sigmoid classification, no "no-object" logit).
    pred_boxes: [B, N, 4] float, normalised cxcywh.
    gt_boxes: [B, T, 4] float32, normalised cxcywh (padding slots may hold anything finite).
    gt_classes: [B, T] int32 in [0, C) (padding slots are clipped into range).
    cost_class, cost_bbox, cost_giou: float weights. Defaults to 2.0, 5.0, 2.0.
    focal_alpha, focal_gamma: float focal cost parameters. Defaults to 0.25, 2.0.

  Returns:
    [B, T, N] float32 cost, rows are targets and columns queries. No gradient flows through it.
  """
  pred_logits, pred_boxes, gt_boxes, classes = _inputs(pred_logits, pred_boxes, gt_boxes, gt_classes)
  class_logit = tf.gather(tf.transpose(pred_logits, [0, 2, 1]), classes, batch_dims=1)  # [B, T, N]
  return _pair_cost(class_logit, pred_boxes[:, None], gt_boxes[:, :, None], cost_class=cost_class,
                    cost_bbox=cost_bbox, cost_giou=cost_giou, focal_alpha=focal_alpha, focal_gamma=focal_gamma)


def matched_cost(pred_logits, pred_boxes, gt_boxes, gt_classes, query_index_for_target, *, cost_class=2.0,
                 cost_bbox=5.0, cost_giou=2.0, focal_alpha=0.25, focal_gamma=2.0):
  """`matching_cost` of the matched pairs only, from the predictions: [B, G, T] float32, 0 for padding targets.

  Computed again from the matched predictions rather than read from the cost matrix: a second reader of the
  [B, T, N] costs inside one compiled program makes XLA write out their intermediate terms (class, GIoU) instead
  of computing the costs in one pass, which cost about a quarter more time on the Group DETR workload.

  Args:
    pred_logits, pred_boxes, gt_boxes, gt_classes, weights: as `matching_cost`.
    query_index_for_target: [B, G, T] int32 global query index of each target per group, -1 for padding.
  """
  pred_logits, pred_boxes, gt_boxes, classes = _inputs(pred_logits, pred_boxes, gt_boxes, gt_classes)
  query = tf.maximum(query_index_for_target, 0)  # [B, G, T]
  class_index = tf.broadcast_to(classes[:, None, :], tf.shape(query))
  class_logit = tf.gather_nd(pred_logits, tf.stack([query, class_index], axis=-1), batch_dims=1)  # [B, G, T]
  boxes = tf.gather(pred_boxes, query, batch_dims=1)  # [B, G, T, 4]
  cost = _pair_cost(class_logit, boxes, gt_boxes[:, None], cost_class=cost_class, cost_bbox=cost_bbox,
                    cost_giou=cost_giou, focal_alpha=focal_alpha, focal_gamma=focal_gamma)
  return tf.where(query_index_for_target >= 0, cost, 0.0)


def group_match(cost, gt_valid, *, num_groups):
  """One exact minimum-cost matching per image and group.

  Args:
    cost: [B, T, G*Q] float32 from `matching_cost`; T <= Q.
    gt_valid: [B, T] bool, False for padding targets.
    num_groups: int G >= 1; the query axis is G consecutive blocks of Q queries.

  Returns:
    query_index_for_target: [B, G, T] int32, for each target the query matched to it in each group as a global
      index in [g*Q, (g+1)*Q); -1 for padding targets. The total cost of a group's matching is
      `matched_cost(...)` summed over T.
  """
  num_targets, num_queries_total = cost.shape[-2], cost.shape[-1]
  num_queries = num_queries_total // num_groups
  cost = tf.reshape(cost, [-1, num_targets, num_groups, num_queries])  # [B, T, G, Q]
  cost = tf.transpose(cost, [0, 2, 1, 3])  # [B, G, T, Q]
  valid = tf.broadcast_to(gt_valid[:, None, :], tf.shape(cost)[:3])  # [B, G, T]
  local = matching.linear_sum_assignment(cost, valid)  # [B, G, T]
  offsets = tf.range(num_groups, dtype=tf.int32)[:, None] * num_queries  # [G, 1]
  return tf.where(valid, local + offsets, -1)
