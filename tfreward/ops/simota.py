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

Static-shape formulation. Two paths give the same assignment (tested bit for bit):

  dense (no `levels`): all [B, M, A] matrices are computed for every slot and anchor and masked. The
    classification cost never materialises [M, A, C]: sum_j BCE(q_j, 0) is computed once per anchor ([B, A]) and
    corrected by BCE(q_c, 1) - BCE(q_c, 0) for the object's class c (gathered). k_g is at most floor(10 * bias), so
    one `top_k` with that many slots yields the k_g cheapest candidates in (cost, anchor index) order.
  windowed (`levels` given, the YOLOX loss's path): only the IoU [B, M, A] is computed for every pair (the top-10
    IoU sums of step 4 need it; their `top_k` runs on the rows' 10 best chunks, see `_top_values`). The cost is
    computed where the selection can fall:
      - strong candidates lie inside the centre square, so within a window of ceil(2 * radius) cells per axis and
        level (5 x 5) starting at the square's first cell. With at most 997 classes a strong, finite cost (<= 100
        per class + 3 * 18.5) is below every other cost (>= 1e5), so an object with at least k_g strong, finite
        candidates selects the k_g cheapest of its window ([B, M, windows] costs, one small `top_k`);
      - any other object with a candidate ("row" object: fewer strong candidates than k_g, a square that does not
        fit its window through rounding, or >= 998 classes) ranks its full row of A costs, 4 rows per step of a
        `tf.while_loop` over the list of such objects (a handful per batch in practice);
      - exact variant, anchors selected by several objects ("columns"): the costs of all M slots at that anchor,
        64 anchors per step of a second `tf.while_loop`; the fast variant's conflicts only involve the selecting
        objects, whose costs are known.
    Selections are kept as lists (slot, anchor, cost) of max_k entries per slot; counts and winners per anchor are
    segment reductions over them. Every cost entry is computed by the same elementwise function from the same
    gathered values (IoU, q = sqrt(sigmoid(cls) * sigmoid(obj)) and the per-anchor background BCE sum), so the
    cost of a pair is the same number wherever it is computed.
Ties are broken towards the lower anchor index (top-k) and the lower object slot (conflicts). Everything is float32
(inputs are cast) and under `tf.stop_gradient`.

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
from tfreward.ops import simota_costs
from tfreward.ops import simota_windowed

VARIANTS = ("exact", "fast")


def _dense_assign(pred_boxes, obj_logits, cls_logits, anchor_centers, anchor_strides, gt_boxes, gt_classes,
                  gt_valid, variant, center_radius, dynamic_k_bias, max_k):
  """Every [B, M, A] matrix in full (any shapes)."""
  num_anchors = pred_boxes.shape[1] if pred_boxes.shape[1] is not None else tf.shape(pred_boxes)[1]
  in_box, in_ctr = simota_costs.region_masks(anchor_centers, anchor_strides, gt_boxes, center_radius)  # [B, M, A]
  pair_candidate = (in_box | in_ctr) & gt_valid[..., None]
  image_candidate = tf.reduce_any(pair_candidate, axis=1)  # [B, A]
  if variant == "exact":
    candidate = image_candidate[:, None, :] & gt_valid[..., None]  # every object ranks every image candidate
  else:
    candidate = pair_candidate

  background = simota_costs.background_cost(obj_logits, cls_logits)  # [B, A]
  box_finite = tf.reduce_all(tf.math.is_finite(pred_boxes), axis=-1)  # [B, A]
  # A finite background sum: every class logit finite and the objectness not NaN.
  pred_finite = box_finite & tf.math.is_finite(obj_logits) & tf.math.is_finite(background)  # [B, A]
  iou = box_ops.pairwise_iou(box_ops.cxcywh_to_xyxy(gt_boxes), box_ops.cxcywh_to_xyxy(pred_boxes))  # [B, M, A]
  iou = tf.where(box_finite[:, None, :] & tf.math.is_finite(iou), iou, 0.0)
  cost = simota_costs.pair_cost(simota_costs.classification_cost(obj_logits, cls_logits, gt_classes, background), iou, in_box & in_ctr,
                    pred_finite[:, None, :], candidate)

  num_top = min(simota_costs.NUM_TOP_IOUS, num_anchors) if isinstance(num_anchors, int) else simota_costs.NUM_TOP_IOUS
  top_ious = tf.math.top_k(tf.where(candidate, iou, 0.0), k=num_top).values  # [B, M, 10]
  dynamic_k = simota_costs.dynamic_k(top_ious, tf.reduce_any(candidate, axis=-1), dynamic_k_bias, max_k)

  selected = simota_costs.kth_smallest_selection(cost, candidate, dynamic_k, max_k)
  winner, fg = simota_costs.resolve_conflicts(cost, selected, gt_valid, exact=variant == "exact")
  is_winner = tf.range(tf.shape(gt_valid)[1])[None, :, None] == winner[:, None, :]  # [B, M, A]
  matched_iou = tf.reduce_sum(tf.where(is_winner & fg[:, None, :], iou, 0.0), axis=1)
  return {
      "fg_mask": fg,
      "matched_gt": tf.where(fg, winner, -1),
      "matched_iou": matched_iou,
      "dynamic_k": dynamic_k,
      "candidate_mask": image_candidate,
  }, {"class_logits_finite": tf.math.is_finite(background) | tf.math.is_nan(obj_logits)}


def _static_levels(levels, num_anchors):
  """`levels` as a tuple of static (height, width) pairs matching `num_anchors`, or None (dense path)."""
  if levels is None:
    return None
  levels = tuple((int(h), int(w)) for h, w in levels)
  if num_anchors is not None and sum(h * w for h, w in levels) != num_anchors:
    raise ValueError(f"levels {levels} hold {sum(h * w for h, w in levels)} anchors, the predictions {num_anchors}.")
  return levels


@tf.autograph.experimental.do_not_convert  # no Python control flow on tensors; converting would take seconds
def simota_assign_with_details(pred_boxes, obj_logits, cls_logits, anchor_centers, anchor_strides, gt_boxes,
                                       gt_classes, gt_valid, *, variant="exact", center_radius=2.5,
                                       dynamic_k_bias=None, levels=None):
  """`simota_assign` plus what the YOLOX loss reuses.

  Returns:
    (assignment, details): the dict of `simota_assign`, and a dict of
      class_logits_finite: [B, A] bool, every class logit of the anchor is finite (or its objectness is NaN, which
        hides them: check the objectness too);
      foreground (windowed path only): a pair (anchors [B, K] int32, mask [B, K] bool), K = M * max_k, listing
        every foreground anchor exactly once where the mask is True (in no particular order).
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
    num_anchors = pred_boxes.shape[1]
    levels = _static_levels(levels, num_anchors)
    max_k = max(1, int(math.floor(simota_costs.NUM_TOP_IOUS * (dynamic_k_bias or 1.0) + 1e-4)))
    if num_anchors is not None:
      max_k = min(max_k, num_anchors)
    args = (pred_boxes, obj_logits, cls_logits, anchor_centers, anchor_strides, gt_boxes, gt_classes, gt_valid,
            variant, center_radius, dynamic_k_bias, max_k)
    static = None not in (num_anchors, gt_valid.shape[1], cls_logits.shape[-1])
    window = simota_windowed.window_size(center_radius)
    if levels is None or not static or gt_valid.shape[1] == 0 or len(levels) * window**2 > num_anchors // 2:
      return _dense_assign(*args)  # (windows as large as the grid: a large centre radius)
    return simota_windowed.windowed_assign(*args, levels)


def simota_assign(pred_boxes, obj_logits, cls_logits, anchor_centers, anchor_strides, gt_boxes, gt_classes,
                  gt_valid, *, variant="exact", center_radius=2.5, dynamic_k_bias=None, levels=None):
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
    levels: optional sequence of static (height, width) grid sizes, one per level, in anchor order: the anchors
      are the cells of `tfreward.ops.yolox_grid` (level by level, row-major), `anchor_centers` and
      `anchor_strides` as `yolox_grid.cell_centers` and `anchor_grid` give them. With it (and static M, A, C) the
      windowed path runs (module docstring): the same result, far less work. Defaults to None: the dense path.

  Returns:
    dict of
      fg_mask: [B, A] bool, foreground anchors.
      matched_gt: [B, A] int32, slot in [0, M) of the anchor's object; -1 for background.
      matched_iou: [B, A] float32, IoU of the anchor's predicted box with its object (the soft class target);
        0 for background.
      dynamic_k: [B, M] int32, k of every object; 0 for padding and for objects without any candidate anchor.
      candidate_mask: [B, A] bool, anchors that are a candidate of at least one object of their image.
  """
  return simota_assign_with_details(
      pred_boxes, obj_logits, cls_logits, anchor_centers, anchor_strides, gt_boxes, gt_classes, gt_valid,
      variant=variant, center_radius=center_radius, dynamic_k_bias=dynamic_k_bias, levels=levels)[0]
