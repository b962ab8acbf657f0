"""The YOLOX loss with SimOTA assignment (super-gradients `YoloXDetectionLoss` / `YoloXFastDetectionLoss`).

  total = 5 * L_iou + L_obj + L_cls + L_l1, every term a sum divided by num_fg = max(foreground anchors, 1):
    L_iou: over foreground anchors, 1 - IoU^2 ("iou") or 1 - GIoU ("giou") of the predicted and matched boxes;
    L_obj: over ALL anchors, BCE-with-logits of the objectness against the foreground mask;
    L_cls: over foreground anchors and all classes, BCE-with-logits against onehot(class) * matched IoU;
    L_l1 (use_l1): over foreground anchors, |raw box output - encoded matched box| (see `encode_l1_targets`).

Distribution: num_fg and the object count are summed over all replicas (`global_sum`), so every returned value is
this replica's share of the global-batch value and the shares add up to it (with one replica: the whole value).
The normaliser carries no gradient, so gradients of the normalised total are those of the sums divided by the
global num_fg.

Non-finite predictions (`tfreward.ops.finite`): if a raw output is NaN or +-inf, or a decoded box overflows (the
square of its area w * h is not finite in float32, i.e. area above ~1.8e19 px^2, e.g. log w = 50: w = e^50 * s ~
4e22 px; past it the IoU and its gradient under- or overflow), every returned float term (`iou`, `obj`, `cls`,
`l1`, `total`, `num_fg_over_num_gts`) is NaN, and so is the gradient, eagerly and under XLA alike. The assignment
stays defined (SimOTA sanitises its costs, see `tfreward.ops.simota`).

Degenerate ground truth: a valid slot whose box has no positive finite width and height (zero-area, inverted,
NaN) is treated as padding: it takes no anchor and does not count in num_gts. (The input pipeline drops such boxes
from training labels; this covers labels given directly.)
"""

import math

import tensorflow as tf

from tfreward.ops import boxes as box_ops
from tfreward.ops import distributed
from tfreward.ops import finite
from tfreward.ops import simota
from tfreward.ops import yolox_grid

IOU_TYPES = ("iou", "giou")
IOU_WEIGHT = 5.0
COMPONENTS = ("iou", "obj", "cls", "l1", "num_fg_over_num_gts", "total")
ASSIGNMENT_KEYS = ("fg_mask", "matched_gt", "matched_iou")
_SUM_KEYS = ("iou", "obj", "cls", "l1", "total")


def _check_args(outputs, strides, num_classes, iou_type, variant):
  if not isinstance(outputs, (list, tuple)) or not outputs:
    raise ValueError(f"outputs must be a non-empty list of [B, h, w, 5 + C] tensors, got {type(outputs).__name__}.")
  if len(outputs) != len(strides):
    raise ValueError(f"got {len(outputs)} head outputs but strides={tuple(strides)}.")
  if not isinstance(num_classes, int) or num_classes < 1:
    raise ValueError(f"num_classes must be a positive int, got {num_classes!r}.")
  for output in outputs:
    if output.shape[-1] is not None and output.shape[-1] != 5 + num_classes:
      raise ValueError(f"head outputs must have 5 + num_classes = {5 + num_classes} channels, got {output.shape}.")
  if iou_type not in IOU_TYPES:
    raise ValueError(f"iou_type must be one of {IOU_TYPES}, got {iou_type!r}.")
  if variant not in simota.VARIANTS:
    raise ValueError(f"variant must be one of {simota.VARIANTS}, got {variant!r}.")


def _box_loss(pred_boxes, target_boxes, iou_type):
  """[B, A, 4], [B, A, 4] cxcywh -> [B, A] float32: 1 - IoU^2 or 1 - GIoU."""
  pred_xyxy = box_ops.cxcywh_to_xyxy(pred_boxes)
  target_xyxy = box_ops.cxcywh_to_xyxy(target_boxes)
  if iou_type == "iou":
    return 1.0 - tf.square(box_ops.elementwise_iou(pred_xyxy, target_xyxy))
  return 1.0 - tf.clip_by_value(box_ops.elementwise_giou(pred_xyxy, target_xyxy), -1.0, 1.0)


def _class_loss_sum(cls_logits, target_classes, matched_iou, fg, foreground, num_classes):
  """Sum over foreground anchors and classes of BCE-with-logits against onehot(class) * matched IoU.

  With the assignment's foreground list (K entries per image, fewer than A) only those anchors' logits are read
  ([B, K, C] instead of [B, A, C]); the terms are the same, summed in another order.
  """
  if foreground is not None and foreground[0].shape[1] < cls_logits.shape[1]:
    anchors, listed = foreground  # [B, K]
    cls_logits = tf.gather(cls_logits, anchors, batch_dims=1)  # [B, K, C]
    target_classes = tf.gather(target_classes, anchors, batch_dims=1)
    matched_iou = tf.gather(matched_iou, anchors, batch_dims=1)
    fg = listed
  cls_targets = tf.one_hot(target_classes, num_classes) * matched_iou[..., None]
  cls_bce = tf.nn.sigmoid_cross_entropy_with_logits(labels=cls_targets, logits=cls_logits)
  return tf.reduce_sum(tf.where(fg[..., None], cls_bce, 0.0))


def _loss_sums(outputs, gt_boxes, gt_classes, gt_valid, *, strides=(8, 16, 32), num_classes, use_l1=False,
                    iou_type="iou", variant="exact"):
  """Assignment and un-normalised loss sums of this replica's images (no cross-replica op; XLA-safe anywhere).

  Args: as `yolox_loss`.

  Returns:
    dict of float32 scalars `iou`, `obj`, `cls`, `l1` (sums over this replica's anchors), `total`
    (5 * iou + obj + cls + l1), all NaN for non-finite predictions (module docstring), `num_fg` and `num_gts` (local
    counts), `finite` (bool scalar, the predictions' check), plus the assignment `fg_mask` [B, A] bool,
    `matched_gt` [B, A] int32 (slot or -1), `matched_iou` [B, A] float32.
  """
  _check_args(outputs, strides, num_classes, iou_type, variant)
  with tf.name_scope("yolox_loss"):
    grid_xy, anchor_strides = yolox_grid.anchor_grid(outputs, strides)  # [A, 2], [A]
    # Boxes and objectness apart from the class logits: one [B, A, C] copy of the logits, not a [B, A, 5 + C] one too.
    raw = tf.cast(yolox_grid.flatten_levels([output[..., :5] for output in outputs]), tf.float32)  # [B, A, 5]
    cls_logits = tf.cast(yolox_grid.flatten_levels([output[..., 5:] for output in outputs]), tf.float32)  # [B, A, C]
    pred_boxes = yolox_grid.decode_boxes(raw[..., :4], grid_xy, anchor_strides)  # [B, A, 4] cxcywh
    obj_logits = raw[..., 4]  # [B, A]
    gt_boxes = tf.cast(gt_boxes, tf.float32)
    gt_valid = tf.cast(gt_valid, tf.bool) & box_ops.positive_extent(gt_boxes, "cxcywh")
    gt_classes = tf.cast(gt_classes, tf.int32)
    if gt_valid.shape.rank == 2 and gt_valid.shape[1] == 0:  # no slots at all: one padding slot keeps gathers valid
      gt_boxes, gt_classes = tf.pad(gt_boxes, [[0, 0], [0, 1], [0, 0]]), tf.pad(gt_classes, [[0, 0], [0, 1]])
      gt_valid = tf.pad(gt_valid, [[0, 0], [0, 1]])
    gt_boxes = tf.where(gt_valid[..., None], gt_boxes, 0.0)
    gt_classes = tf.where(gt_valid, gt_classes, 0)

    assignment, details = simota.simota_assign_with_details(
        pred_boxes, obj_logits, cls_logits, yolox_grid.cell_centers(grid_xy, anchor_strides), anchor_strides,
        gt_boxes, gt_classes, gt_valid, variant=variant, levels=yolox_grid.static_level_sizes(outputs))
    fg = assignment["fg_mask"]
    fg_float = tf.cast(fg, tf.float32)
    slot = tf.maximum(assignment["matched_gt"], 0)
    target_boxes = tf.gather(gt_boxes, slot, batch_dims=1)  # [B, A, 4]
    target_classes = tf.gather(gt_classes, slot, batch_dims=1)  # [B, A]
    safe_boxes = tf.where(fg[..., None], target_boxes, pred_boxes)  # background: any finite box

    iou_sum = tf.reduce_sum(tf.where(fg, _box_loss(pred_boxes, safe_boxes, iou_type), 0.0))
    obj_sum = tf.reduce_sum(tf.nn.sigmoid_cross_entropy_with_logits(labels=fg_float, logits=obj_logits))
    cls_sum = _class_loss_sum(cls_logits, target_classes, assignment["matched_iou"], fg,
                              details.get("foreground"), num_classes)
    if use_l1:
      l1_targets = yolox_grid.encode_l1_targets(target_boxes, grid_xy, anchor_strides)  # [B, A, 4]
      l1 = tf.where(fg[..., None], tf.abs(raw[..., :4] - tf.stop_gradient(l1_targets)), 0.0)
      l1_sum = tf.reduce_sum(l1)
    else:
      l1_sum = tf.constant(0.0)
    # = all_finite(raw, areas): the assignment has checked the class logits already.
    ok = finite.all_finite(raw, tf.square(pred_boxes[..., 2] * pred_boxes[..., 3]),
                           tf.where(details["class_logits_finite"], 0.0, math.nan))
    sums = {"iou": iou_sum, "obj": obj_sum, "cls": cls_sum, "l1": l1_sum,
            "total": IOU_WEIGHT * iou_sum + obj_sum + cls_sum + l1_sum}
    return {
        **{name: finite.nan_unless(ok, value) for name, value in sums.items()},
        "num_fg": tf.reduce_sum(fg_float),
        "num_gts": tf.reduce_sum(tf.cast(gt_valid, tf.float32)),
        "finite": ok,
        **{key: assignment[key] for key in ASSIGNMENT_KEYS},
    }


def _normalize_sums(sums):
  """Divides the sums of `_loss_sums` by the global num_fg (all-reduced, clamped at 1).

  Returns:
    dict with the components `iou`, `obj`, `cls`, `l1`, `total` (this replica's shares) and `num_fg_over_num_gts`
    (global num_fg / max(global number of objects, 1), divided by the number of replicas so that it sums like
    the other components), plus the assignment entries of `sums` unchanged.
  """
  num_fg = tf.maximum(distributed.global_sum(sums["num_fg"]), 1.0)
  num_gts = tf.maximum(distributed.global_sum(sums["num_gts"]), 1.0)
  result = {name: sums[name] / num_fg for name in _SUM_KEYS}
  ratio = num_fg / num_gts / tf.cast(distributed.num_replicas(), tf.float32)
  result["num_fg_over_num_gts"] = finite.nan_unless(sums["finite"], ratio)
  result.update({key: sums[key] for key in ASSIGNMENT_KEYS})
  return result


def yolox_loss(outputs, gt_boxes, gt_classes, gt_valid, *, strides=(8, 16, 32), num_classes, use_l1=False,
               iou_type="iou", variant="exact"):
  """YOLOX loss with SimOTA assignment, normalised by the foreground count of the global batch.

  Args:
    outputs: list of L tensors [B, H/s, W/s, 5 + C] (any float dtype, e.g. bfloat16), raw head outputs
      (dx, dy, log_w, log_h, obj, cls_0 .. cls_{C-1}), one per stride.
    gt_boxes: [B, M, 4] float, object boxes cxcywh in pixels of the input image.
    gt_classes: [B, M] int32, classes in [0, C).
    gt_valid: [B, M] bool, True for real objects; padding slots are ignored whatever they hold, and so are valid
      slots whose box has no positive finite extent.
    strides: sequence of L ints, the stride of each output. Defaults to (8, 16, 32).
    num_classes: int, C.
    use_l1: bool. Adds the L1 term on raw box outputs. Defaults to False.
    iou_type: str. "iou" (1 - IoU^2) or "giou" (1 - GIoU). Defaults to "iou".
    variant: str. "exact" or "fast" SimOTA (see `tfreward.ops.simota`). Defaults to "exact".

  Returns:
    dict of float32 scalars `iou`, `obj`, `cls`, `l1`, `num_fg_over_num_gts`, `total` (this replica's shares, see
    the module docstring; `total` is the loss to minimise) and the assignment: `fg_mask` [B, A] bool,
    `matched_gt` [B, A] int32 (object slot in [0, M), -1 for background), `matched_iou` [B, A] float32.
    All losses are computed in float32 whatever the output dtype; every float scalar is NaN for non-finite
    predictions (see the module docstring).
  """
  sums = _loss_sums(outputs, gt_boxes, gt_classes, gt_valid, strides=strides, num_classes=num_classes,
                    use_l1=use_l1, iou_type=iou_type, variant=variant)
  return _normalize_sums(sums)
