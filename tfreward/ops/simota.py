"""SimOTA dynamic-k label assignment (YOLOX), batched over images with static shapes.

Every image has A anchors (cells) and M padded object slots with a `valid` mask. For object g and anchor a:

  1. in_box[g, a]: the cell centre is strictly inside the box; in_ctr[g, a]: strictly inside the square of half-side
     `center_radius * s_a` around the box centre. A pair is a candidate if either holds, strong if both hold.
  2. iou[g, a]: IoU of the object box and the anchor's decoded predicted box.
  3. cost[g, a] = sum_j BCE(q_j, onehot(class_g)_j) + 3 * -ln(iou + 1e-8) + 1e5 * (not strong), with
     q_j = sqrt(sigmoid(cls_j) * sigmoid(obj)) and the probability-space BCE with logs clamped at -100.
  4. k_g = max(1, trunc(bias * sum of the 10 largest candidate IoUs)); g selects its k_g cheapest candidates.
  5. An anchor selected by several objects keeps one; the others drop it.

Variants (the two super-gradients losses, `YoloXDetectionLoss` and `YoloXFastDetectionLoss`):
  "exact": the candidates of an image are the anchors that are candidates of ANY of its objects, and every object
      ranks all of them (top-10 IoUs and cheapest k); conflicts go to the cheapest object among ALL the image's
      objects (which may be one that did not select the anchor); bias 1.
  "fast": an object only ranks its own candidate pairs; conflicts go to the cheapest of the objects that selected
      the anchor; bias 1.1.

Static-shape formulation: all [B, M, A] matrices are computed for every slot and anchor and masked. The
classification cost never materialises [M, A, C]: sum_j BCE(q_j, 0) is computed once per anchor ([B, A]) and
corrected by BCE(q_c, 1) - BCE(q_c, 0) for the object's class c (gathered, [B, M, A]). k_g is at most
floor(10 * bias), so one `top_k` with that many slots yields the k_g-th smallest cost; the selection is every
candidate before it in (cost, anchor index) order. Ties are broken towards the lower anchor index (top-k) and the
lower object slot (conflicts). Everything is float32 (inputs are cast) and under `tf.stop_gradient`.

Degenerate objects: a valid slot whose box has no positive finite width and height (zero-area, inverted, NaN) is
treated as padding, so it never takes an anchor.
Non-finite predictions (see `tfreward.ops.finite`): an anchor whose box, objectness or class logits hold NaN or
+-inf has IoU 0 with every object and cost `_NON_FINITE_COST` (above any finite cost, below the +inf of
non-candidates), and any other non-finite cost is replaced by it too. The assignment is then a ranking of finite
numbers, defined and alike eagerly and under XLA; such anchors rank last and keep the lowest-index tie order.
"""

import math

import tensorflow as tf

from tfreward.ops import boxes as box_ops

VARIANTS = ("exact", "fast")
_NUM_TOP_IOUS = 10
_IOU_COST_WEIGHT = 3.0
_OUTSIDE_COST = 100000.0
_NON_FINITE_COST = 1e9  # above any finite cost (at most 100 per class + 3 * 18.5 + 1e5)


def _region_masks(anchor_centers, anchor_strides, gt_boxes, center_radius):
  """in_box, in_ctr: [B, M, A] bool (strict inequalities, cell centres against cxcywh boxes)."""
  xc = anchor_centers[:, 0]  # [A]
  yc = anchor_centers[:, 1]
  gcx, gcy, gw, gh = [gt_boxes[..., i:i + 1] for i in range(4)]  # [B, M, 1] each
  in_box = ((xc - (gcx - 0.5 * gw) > 0.0) & ((gcx + 0.5 * gw) - xc > 0.0)
            & (yc - (gcy - 0.5 * gh) > 0.0) & ((gcy + 0.5 * gh) - yc > 0.0))
  radius = center_radius * anchor_strides  # [A]
  in_ctr = ((xc - (gcx - radius) > 0.0) & ((gcx + radius) - xc > 0.0)
            & (yc - (gcy - radius) > 0.0) & ((gcy + radius) - yc > 0.0))
  return in_box, in_ctr


def _classification_cost(obj_logits, cls_logits, gt_classes):
  """sum_j BCE(q_j, onehot(class_g)_j) for every slot and anchor: [B, M, A] float32."""
  num_classes = cls_logits.shape[-1]
  q = tf.sqrt(tf.sigmoid(cls_logits) * tf.sigmoid(obj_logits)[..., None])  # [B, A, C]
  negative = -tf.maximum(tf.math.log(1.0 - q), -100.0)  # BCE(q, 0)
  positive = -tf.maximum(tf.math.log(q), -100.0)  # BCE(q, 1)
  background = tf.reduce_sum(negative, axis=-1)  # [B, A]: every class a negative
  correction = tf.transpose(positive - negative, [0, 2, 1])  # [B, C, A]: class c a positive instead
  classes = tf.clip_by_value(gt_classes, 0, num_classes - 1)
  return background[:, None, :] + tf.gather(correction, classes, axis=1, batch_dims=1)  # [B, M, A]


def _kth_smallest_selection(cost, candidate, k, max_k):
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


def _resolve_conflicts(cost, selected, gt_valid, exact):
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


def simota_assign(pred_boxes, obj_logits, cls_logits, anchor_centers, anchor_strides, gt_boxes, gt_classes,
                  gt_valid, *, variant="exact", center_radius=2.5, dynamic_k_bias=None):
  """Batched SimOTA assignment of anchors to padded objects.

  Args:
    pred_boxes: [B, A, 4] float, decoded predicted boxes, cxcywh in pixels.
    obj_logits: [B, A] float, objectness logits.
    cls_logits: [B, A, C] float, class logits.
    anchor_centers: [A, 2] float, (x, y) pixel centre of every cell (candidate selection only).
    anchor_strides: [A] float, stride of every cell.
    gt_boxes: [B, M, 4] float, object boxes, cxcywh in pixels; padding slots are ignored.
    gt_classes: [B, M] int, class in [0, C); padding slots are ignored.
    gt_valid: [B, M] bool, True for real objects (padding need not be trailing); slots whose box has no positive
      finite extent count as padding.
    variant: str. "exact" (super-gradients `YoloXDetectionLoss`) or "fast" (`YoloXFastDetectionLoss`).
      Defaults to "exact".
    center_radius: float. Half-side of the centre-sampling square, in strides. Defaults to 2.5.
    dynamic_k_bias: optional float > 0 multiplying the top-10 IoU sum before truncation. Defaults to None: 1 for
      "exact" (no multiplication), 1.1 for "fast".

  Returns:
    dict of
      fg_mask: [B, A] bool, foreground anchors.
      matched_gt: [B, A] int32, slot in [0, M) of the anchor's object; -1 for background.
      matched_iou: [B, A] float32, IoU of the anchor's predicted box with its object (the soft class target);
        0 for background.
      dynamic_k: [B, M] int32, k of every object; 0 for padding and for objects without any candidate anchor.
      candidate_mask: [B, A] bool, anchors that are a candidate of at least one object of their image.
  """
  if variant not in VARIANTS:
    raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}.")
  if not center_radius > 0:
    raise ValueError(f"center_radius must be positive, got {center_radius!r}.")
  if dynamic_k_bias is None:
    dynamic_k_bias = 1.1 if variant == "fast" else None
  elif not dynamic_k_bias > 0:
    raise ValueError(f"dynamic_k_bias must be positive, got {dynamic_k_bias!r}.")
  with tf.name_scope("simota_assign"):
    f32 = lambda x: tf.stop_gradient(tf.cast(x, tf.float32))  # noqa: E731
    pred_boxes, obj_logits, cls_logits = f32(pred_boxes), f32(obj_logits), f32(cls_logits)
    anchor_centers, anchor_strides = f32(anchor_centers), f32(anchor_strides)
    gt_boxes = f32(gt_boxes)
    gt_valid = tf.cast(gt_valid, tf.bool) & box_ops.positive_extent(gt_boxes, "cxcywh")
    gt_boxes = tf.where(gt_valid[..., None], gt_boxes, 0.0)
    gt_classes = tf.cast(gt_classes, tf.int32)
    num_anchors = pred_boxes.shape[1] if pred_boxes.shape[1] is not None else tf.shape(pred_boxes)[1]

    in_box, in_ctr = _region_masks(anchor_centers, anchor_strides, gt_boxes, center_radius)  # [B, M, A]
    pair_candidate = (in_box | in_ctr) & gt_valid[..., None]
    image_candidate = tf.reduce_any(pair_candidate, axis=1)  # [B, A]
    if variant == "exact":
      candidate = image_candidate[:, None, :] & gt_valid[..., None]  # every object ranks every image candidate
    else:
      candidate = pair_candidate

    box_finite = tf.reduce_all(tf.math.is_finite(pred_boxes), axis=-1)  # [B, A]
    pred_finite = (box_finite & tf.math.is_finite(obj_logits)
                   & tf.reduce_all(tf.math.is_finite(cls_logits), axis=-1))[:, None, :]  # [B, 1, A]
    iou = box_ops.pairwise_iou(box_ops.cxcywh_to_xyxy(gt_boxes), box_ops.cxcywh_to_xyxy(pred_boxes))  # [B, M, A]
    iou = tf.where(box_finite[:, None, :] & tf.math.is_finite(iou), iou, 0.0)
    cost = (_classification_cost(obj_logits, cls_logits, gt_classes)
            + _IOU_COST_WEIGHT * -tf.math.log(iou + 1e-8)
            + _OUTSIDE_COST * tf.cast(~(in_box & in_ctr), tf.float32))
    cost = tf.where(pred_finite & tf.math.is_finite(cost), cost, _NON_FINITE_COST)
    cost = tf.where(candidate, cost, math.inf)

    num_top = min(_NUM_TOP_IOUS, num_anchors) if isinstance(num_anchors, int) else _NUM_TOP_IOUS
    top_ious = tf.math.top_k(tf.where(candidate, iou, 0.0), k=num_top).values  # [B, M, 10]
    iou_sum = tf.reduce_sum(top_ious, axis=-1)
    if dynamic_k_bias is not None:
      iou_sum = iou_sum * dynamic_k_bias
    max_k = max(1, int(math.floor(_NUM_TOP_IOUS * (dynamic_k_bias or 1.0) + 1e-4)))
    if isinstance(num_anchors, int):
      max_k = min(max_k, num_anchors)
    has_candidate = tf.reduce_any(candidate, axis=-1)  # [B, M]
    dynamic_k = tf.where(has_candidate, tf.clip_by_value(tf.cast(iou_sum, tf.int32), 1, max_k), 0)

    selected = _kth_smallest_selection(cost, candidate, dynamic_k, max_k)
    winner, fg = _resolve_conflicts(cost, selected, gt_valid, exact=variant == "exact")
    is_winner = tf.range(tf.shape(gt_valid)[1])[None, :, None] == winner[:, None, :]  # [B, M, A]
    matched_iou = tf.reduce_sum(tf.where(is_winner & fg[:, None, :], iou, 0.0), axis=1)
    return {
        "fg_mask": fg,
        "matched_gt": tf.where(fg, winner, -1),
        "matched_iou": matched_iou,
        "dynamic_k": dynamic_k,
        "candidate_mask": image_candidate,
    }
