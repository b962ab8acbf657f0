"""The SimOTA cost pieces shared by the dense and the windowed assignment (`tfreward.ops.simota`): candidate
regions, classification and pair costs, the top-k selection, conflicts and dynamic k. Shapes as in `simota`.
"""

import math

import tensorflow as tf

NUM_TOP_IOUS = 10
IOU_COST_WEIGHT = 3.0
OUTSIDE_COST = 100000.0
NON_FINITE_COST = 1e9  # above any finite cost (at most 100 per class + 3 * 18.5 + 1e5)
MAX_STRONG_FIRST_CLASSES = 997  # 100 * C + 3 * 18.5 < 1e5: a strong, finite cost is below any other cost


def axis_masks(center, radius, gt_center, gt_size):
  """Along one axis: cell centre strictly inside the box's extent, and strictly inside the centre square.

  `center`, `radius` broadcast against `gt_center`, `gt_size`. Returns two bool tensors of the broadcast shape.
  """
  in_box = (center - (gt_center - 0.5 * gt_size) > 0.0) & ((gt_center + 0.5 * gt_size) - center > 0.0)
  in_ctr = (center - (gt_center - radius) > 0.0) & ((gt_center + radius) - center > 0.0)
  return in_box, in_ctr


def region_masks(anchor_centers, anchor_strides, gt_boxes, center_radius):
  """in_box, in_ctr: [B, M, A] bool (strict inequalities, cell centres against cxcywh boxes)."""
  radius = center_radius * anchor_strides  # [A]
  box_x, ctr_x = axis_masks(anchor_centers[:, 0], radius, gt_boxes[..., 0:1], gt_boxes[..., 2:3])
  box_y, ctr_y = axis_masks(anchor_centers[:, 1], radius, gt_boxes[..., 1:2], gt_boxes[..., 3:4])
  return box_x & box_y, ctr_x & ctr_y


def class_probability(obj_logits, cls_logits):
  """q = sqrt(sigmoid(cls) * sigmoid(obj)), elementwise (obj broadcast against cls)."""
  return tf.sqrt(tf.sigmoid(cls_logits) * tf.sigmoid(obj_logits))


def background_cost(obj_logits, cls_logits):
  """sum_j BCE(q_j, 0) [B, A] (every class a negative); NaN where a class logit is not finite (so that one pass
  over the class logits serves both)."""
  q = class_probability(obj_logits[..., None], cls_logits)
  return tf.reduce_sum(tf.where(tf.math.is_finite(cls_logits), negative_bce(q), math.nan), axis=-1)


def negative_bce(q):
  return -tf.maximum(tf.math.log(1.0 - q), -100.0)  # BCE(q, 0)


def class_correction(q):
  """BCE(q, 1) - BCE(q, 0): the class cost's change when class c is the positive one."""
  return -tf.maximum(tf.math.log(q), -100.0) - negative_bce(q)


def classification_cost(obj_logits, cls_logits, gt_classes, background):
  """sum_j BCE(q_j, onehot(class_g)_j) for every slot and anchor: [B, M, A] float32."""
  num_classes = cls_logits.shape[-1]
  q = class_probability(obj_logits[..., None], cls_logits)
  correction = tf.transpose(class_correction(q), [0, 2, 1])  # [B, C, A]: class c a positive instead
  classes = tf.clip_by_value(gt_classes, 0, num_classes - 1)
  return background[:, None, :] + tf.gather(correction, classes, axis=1, batch_dims=1)  # [B, M, A]


def pair_cost(cls_cost, iou, strong, pred_finite, candidate):
  """The SimOTA cost of (object, anchor) pairs, elementwise: +inf off candidates, `NON_FINITE_COST` if not finite."""
  cost = (cls_cost + IOU_COST_WEIGHT * -tf.math.log(iou + 1e-8)
          + OUTSIDE_COST * tf.cast(~strong, tf.float32))
  cost = tf.where(pred_finite & tf.math.is_finite(cost), cost, NON_FINITE_COST)
  return tf.where(candidate, cost, math.inf)


def top_values(x, k):
  """The k largest values along the last axis, largest first, like `tf.math.top_k(x, k).values`.

  Long rows are cut into chunks and only the k chunks with the largest maxima are ranked: every element of the top
  k lies in a chunk whose maximum is at least that element, and fewer than k chunks can have a larger maximum, so
  those chunks hold the same k largest values (with multiplicity; padding is -inf). Chunks of at most 32 keep the
  maxima a plain reduction that XLA's CPU backend fuses with the computation of `x`.
  """
  n = x.shape[-1]
  if n is None or n <= 64 * k:
    return tf.math.top_k(x, k=k).values
  chunk = next((c for c in range(32, 7, -1) if n % c == 0), 32)  # a divisor of n avoids a padded copy
  num_chunks = -(-n // chunk)
  if num_chunks * chunk != n:
    x = tf.pad(x, [[0, 0]] * (x.shape.rank - 1) + [[0, num_chunks * chunk - n]], constant_values=-math.inf)
  chunks = tf.reshape(x, tf.concat([tf.shape(x)[:-1], [num_chunks, chunk]], axis=0))
  best_chunks = tf.math.top_k(tf.reduce_max(chunks, axis=-1), k=k).indices  # [..., k]
  picked = tf.gather(chunks, best_chunks, batch_dims=x.shape.rank - 1)  # [..., k, chunk]
  return tf.math.top_k(tf.reshape(picked, tf.concat([tf.shape(x)[:-1], [k * chunk]], axis=0)), k=k).values


def kth_smallest_selection(cost, candidate, k, max_k):
  """Per row, the k cheapest candidates, ties to the lower index.

  Args:
    cost: [B, M, A] float32, +inf where not a candidate.
    candidate: [B, M, A] bool.
    k: [B, M] int32 in [0, max_k]; 0 selects nothing.
    max_k: int, static upper bound of k (<= A).

  Returns:
    [B, M, A] bool.
  """
  neg_values, indices = tf.math.top_k(-cost, k=max_k)  # [B, M, max_k], cheapest first, lower index first
  last = tf.maximum(k - 1, 0)[..., None]  # [B, M, 1]
  kth_cost = -tf.gather(neg_values, last, batch_dims=2)  # [B, M, 1]
  kth_index = tf.gather(indices, last, batch_dims=2)  # [B, M, 1]
  anchor_index = tf.range(tf.shape(cost)[-1], dtype=kth_index.dtype)  # [A]
  before = (cost < kth_cost) | ((cost == kth_cost) & (anchor_index <= kth_index))
  return before & candidate & (k > 0)[..., None]


def resolve_conflicts(cost, selected, gt_valid, exact):
  """Winner slot per anchor: [B, A] int32 in [0, M) and the foreground mask [B, A] bool."""
  num_slots = tf.shape(cost)[1]
  count = tf.reduce_sum(tf.cast(selected, tf.int32), axis=1)  # [B, A]
  contenders = selected
  if exact:
    contenders = tf.where((count > 1)[:, None, :], gt_valid[:, :, None], selected)  # [B, M, A]
  contender_cost = tf.where(contenders, cost, math.inf)
  best = tf.reduce_min(contender_cost, axis=1, keepdims=True)  # [B, 1, A]
  slot = tf.range(num_slots)[None, :, None]  # [1, M, 1]
  winner = tf.reduce_min(tf.where(contenders & (contender_cost == best), slot, num_slots), axis=1)  # [B, A]
  fg = count > 0
  return tf.where(fg, winner, 0), fg


def dynamic_k(top_ious, has_candidate, dynamic_k_bias, max_k):
  iou_sum = tf.reduce_sum(top_ious, axis=-1)
  if dynamic_k_bias is not None:
    iou_sum = iou_sum * dynamic_k_bias
  return tf.where(has_candidate, tf.clip_by_value(tf.cast(iou_sum, tf.int32), 1, max_k), 0)
