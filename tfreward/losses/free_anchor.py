"""FreeAnchor loss (Zhang et al., 2019; mmdetection's FreeAnchorRetinaHead), dense, static-shape and batched.

Inputs are pixel xyxy (convert the data contract's normalised yxyx at the boundary). Per image n, GT i of class l_i,
anchor j, class c, with P = sigmoid(cls_logits):

  Positive bags: bag_i = the k anchors with the largest IoU(g_i, a_j) (anchor IoU). `tf.math.top_k` keeps the
    lowest indices of exactly tied values, eagerly and under XLA alike (torch.topk picks among them arbitrarily).
    XLA may round an IoU one ulp away from eager (FMA contraction), so near-ties that straddle the k-th value (a
    GT smaller than many same-shaped anchors) can pick different bags eagerly and compiled.
    p_ij = P[n, j, l_i] * exp(-loss_weight * sum SmoothL1_beta(deltas_j - encode(a_j, g_i))), bag_prob_i =
    mean-max(p_i.) = sum_j w_ij p_ij / sum_j w_ij with w_ij = 1 / max(1 - p_ij, 1e-12) (not detached), and
    term_i = alpha * BCE(bag_prob_i, 1).
  Box probability (no gradient): U_ij = IoU(g_i, decode(a_j, deltas_j)), t2_i = max(max_j U_ij, bbox_thr + 1e-12),
    Q_ij = clip((U_ij - bbox_thr) / (t2_i - bbox_thr), 0, 1) (0 everywhere when t2_i == bbox_thr), and
    BP[n, j, c] = max over the GT of class c of Q_ij (0 without such GT).
  Negative bag: q = clip(P * (1 - BP), 1e-12, 1 - 1e-12), term = (1 - alpha) * q ** gamma * BCE(q, 0).
  Reduction: positive_bag_loss = sum_i term_i / max(1, num_pos), negative_bag_loss = sum_{n,j,c} term /
    max(1, num_pos * k), num_pos = number of valid GT summed over the global batch (all replicas) with
    `global_sum`; each replica returns its share. With no GT the positive loss is 0 (gradient 0) and the negative
    sum is divided by 1, as in mmdetection.

BCE(x, y) = -(y * max(ln x, -100) + (1 - y) * max(ln(1 - x), -100)) with PyTorch's gradient
(x - y) / max(x (1 - x), 1e-12), which also keeps saturated probabilities (P == 1 or bag_prob == 0) NaN-free.
Everything is computed in float32, whatever the input dtype.

Non-finite predictions (`tfreward.ops.finite`): if any class logit or box delta is NaN or +-inf, both returned
losses are NaN (and their gradients), eagerly and under XLA alike. The decode clamps dw and dh (`wh_ratio_clip`),
so finite deltas cannot overflow; but a clamp maps NaN to NaN eagerly and to a bound under XLA, which is why the
box probability also sanitises: an anchor with a non-finite delta, or a non-finite decoded IoU, has IoU 0 with
every GT there. The bags depend only on the anchors and the GT, never on predictions.
Degenerate ground truth: a valid row whose box has no positive finite width and height (zero-area, inverted, NaN)
is treated as padding: no positive bag, not counted in num_pos. (Kept as a positive, it would claim the k
lowest-index anchors at IoU 0 and add alpha * 100 to the positive sum; the input pipeline drops such boxes.)

Memory (B images, A anchors, M GT slots, C classes; COCO 800x1333: A = 200,700, M = 100, C = 80): two [B, M, A]
float32 IoU matrices (anchor IoU for top_k, and the box probability Q; 80 MB each per image), the box probability
[B, A, C] (64 MB per image, plus its [B, C, A] transpose) and [B, A, C] elementwise terms like the logits. The
per-class maximum over objects is one `unsorted_segment_max` of the [B * M, A] rows of Q into B * C segments
(XLA scatter-max, O(B M A) work), so the [B, M, A, C] tensor of the dense formulation is never built. Bag
gathers are [B, M, k] (plus [B, M, k, 4] for boxes).
"""

import tensorflow as tf

from tfreward.losses import smooth_l1
from tfreward.ops import box_coder
from tfreward.ops import boxes as box_ops
from tfreward.ops import finite
from tfreward.ops.distributed import global_sum

EPS = 1e-12
# Encoded targets are clamped here: a safeguard for zero-size boxes, whose log-size target is -inf (degenerate GT
# rows are treated as padding, so none reaches it any more).
_MAX_TARGET = 1e4


@tf.custom_gradient
def _bce_target_one(x):
  """-max(ln x, -100) with PyTorch's gradient (x - 1) / max(x (1 - x), 1e-12). [...] float32."""
  def grad(dy):
    return dy * (x - 1.0) / tf.maximum((1.0 - x) * x, EPS)
  return -tf.maximum(tf.math.log(x), -100.0), grad


@tf.custom_gradient
def _bce_target_zero(x):
  """-max(ln(1 - x), -100) (as log1p(-x)) with PyTorch's gradient x / max(x (1 - x), 1e-12). [...] float32."""
  def grad(dy):
    return dy * x / tf.maximum((1.0 - x) * x, EPS)
  return -tf.maximum(tf.math.log1p(-x), -100.0), grad


def _check_range(name, value, low, high, low_open=False, high_open=False):
  ok_low = value > low if low_open else value >= low
  ok_high = value < high if high_open else value <= high
  if not (ok_low and ok_high):
    raise ValueError(f"{name} must be in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}, "
                     f"got {value!r}.")


def _check_coder(target_means, target_stds, wh_ratio_clip=None):
  if len(tuple(target_means)) != 4:
    raise ValueError(f"target_means must be four numbers, got {tuple(target_means)!r}.")
  if len(tuple(target_stds)) != 4 or any(not float(s) > 0 for s in target_stds):
    raise ValueError(f"target_stds must be four positive numbers, got {tuple(target_stds)!r}.")
  if wh_ratio_clip is not None:
    _check_range("wh_ratio_clip", float(wh_ratio_clip), 0.0, 1.0, low_open=True, high_open=True)


def _targets_valid(gt_boxes, gt_valid):
  """[B, M] bool: valid rows whose box has a positive finite extent (the others are padding)."""
  return tf.cast(gt_valid, tf.bool) & box_ops.positive_extent(tf.cast(gt_boxes, tf.float32), "xyxy")


def _prepare(anchors, gt_boxes, gt_classes, gt_valid):
  """float32 anchors; GT with padding (and degenerate) rows replaced by a unit box, classes >= 0."""
  anchors = tf.cast(anchors, tf.float32)
  gt_valid = _targets_valid(gt_boxes, gt_valid)
  boxes = tf.where(gt_valid[..., None], tf.cast(gt_boxes, tf.float32), tf.constant([0.0, 0.0, 1.0, 1.0]))
  classes = tf.where(gt_valid, tf.cast(gt_classes, tf.int32), 0)  # [B, M]
  return anchors, boxes, classes, gt_valid


def positive_bag_terms(anchors, cls_logits, box_deltas, gt_boxes, gt_classes, gt_valid, *, pre_anchor_topk=50,
                       alpha=0.5, smoothl1_beta=0.11, loss_weight=0.75, target_means=(0.0, 0.0, 0.0, 0.0),
                       target_stds=(0.1, 0.1, 0.2, 0.2)):
  """Per-GT positive bag terms alpha * BCE(mean-max(P_cls * P_loc), 1), before normalisation.

  Args: as `free_anchor_loss`.

  Returns:
    terms: [B, M] float32, 0 for padding rows.
    bag_prob: [B, M] float32 mean-max bag probability, 0 for padding rows.
    bag_indices: [B, M, k] int32 anchor indices of each bag by decreasing anchor IoU, -1 for padding rows.
  """
  k = int(pre_anchor_topk)
  _check_coder(target_means, target_stds)
  anchors, boxes, classes, valid = _prepare(anchors, gt_boxes, gt_classes, gt_valid)
  cls_prob = tf.sigmoid(tf.cast(cls_logits, tf.float32))  # [B, A, C]
  box_deltas = tf.cast(box_deltas, tf.float32)
  _, bag = tf.math.top_k(box_ops.pairwise_iou(boxes, anchors), k=k)  # [B, M, A] -> [B, M, k]
  shape = tf.shape(bag)
  image = tf.broadcast_to(tf.range(shape[0])[:, None, None], shape)
  label = tf.broadcast_to(classes[:, :, None], shape)
  matched_cls_prob = tf.gather_nd(cls_prob, tf.stack([image, bag, label], axis=-1))  # [B, M, k]
  targets = box_coder.encode_boxes(tf.gather(anchors, bag), boxes[:, :, None, :], means=target_means,
                                   stds=target_stds)  # [B, M, k, 4]
  targets = tf.clip_by_value(targets, -_MAX_TARGET, _MAX_TARGET)
  matched_deltas = tf.gather(box_deltas, bag, batch_dims=1)  # [B, M, k, 4]
  loc_loss = tf.reduce_sum(loss_weight * smooth_l1.smooth_l1(matched_deltas - targets, beta=float(smoothl1_beta)),
                           axis=-1)
  matched_prob = matched_cls_prob * tf.exp(-loc_loss)  # [B, M, k]
  weight = 1.0 / tf.maximum(1.0 - matched_prob, EPS)
  weight = weight / tf.reduce_sum(weight, axis=-1, keepdims=True)
  bag_prob = tf.reduce_sum(weight * matched_prob, axis=-1)  # [B, M]
  terms = tf.where(valid, alpha * _bce_target_one(bag_prob), 0.0)
  return terms, tf.where(valid, bag_prob, 0.0), tf.where(valid[..., None], bag, -1)


def anchor_box_probability(anchors, box_deltas, gt_boxes, gt_classes, gt_valid, *, num_classes, bbox_thr=0.6,
                           target_means=(0.0, 0.0, 0.0, 0.0), target_stds=(0.1, 0.1, 0.2, 0.2),
                           wh_ratio_clip=0.016):
  """P{a_j in A+} per class: the per-class maximum over GT of the saturated-linear IoU of the decoded boxes.

  Args: as `free_anchor_loss`; num_classes: int C.

  Returns:
    box_prob: [B, A, C] float32 in [0, 1], a constant (no gradient).
    max_pred_iou: [B, M] float32 max_j IoU(g_i, decoded box j), before the clamp at bbox_thr; 0 for padding rows.
  """
  _check_coder(target_means, target_stds, wh_ratio_clip)
  anchors, boxes, classes, valid = _prepare(anchors, gt_boxes, gt_classes, gt_valid)
  box_deltas = tf.stop_gradient(tf.cast(box_deltas, tf.float32))
  pred = box_coder.decode_boxes(anchors, box_deltas, means=target_means, stds=target_stds,
                                wh_ratio_clip=wh_ratio_clip)  # [B, A, 4]
  pred_finite = tf.reduce_all(tf.math.is_finite(box_deltas), axis=-1)[:, None, :]  # [B, 1, A]
  iou = box_ops.pairwise_iou(boxes, pred)  # [B, M, A]
  iou = tf.where(valid[..., None] & pred_finite & tf.math.is_finite(iou), iou, 0.0)
  max_pred_iou = tf.reduce_max(iou, axis=-1)  # [B, M]
  t1 = tf.constant(bbox_thr, tf.float32)
  t2 = tf.maximum(max_pred_iou, t1 + EPS)[..., None]  # float32: t1 + 1e-12 == t1, as in mmdetection
  object_prob = tf.clip_by_value(tf.math.divide_no_nan(iou - t1, t2 - t1), 0.0, 1.0)  # [B, M, A]
  batch, num_slots, num_anchors = (d if d is not None else tf.shape(iou)[i] for i, d in enumerate(iou.shape))
  # Segment b * C + class for each GT; padding rows go to the extra last segment, which is dropped.
  segment = tf.where(valid, tf.range(batch)[:, None] * num_classes + classes, batch * num_classes)  # [B, M]
  per_class = tf.math.unsorted_segment_max(tf.reshape(object_prob, [batch * num_slots, num_anchors]),
                                           tf.reshape(segment, [-1]), batch * num_classes + 1)  # [B * C + 1, A]
  per_class = tf.maximum(per_class[:-1], 0.0)  # empty segments hold the lowest float
  box_prob = tf.transpose(tf.reshape(per_class, [batch, num_classes, num_anchors]), [0, 2, 1])  # [B, A, C]
  return tf.stop_gradient(box_prob), max_pred_iou


# (name, rank, whether the last dimension is 4) of the loss inputs.
_INPUT_RANKS = (("anchors", 2, True), ("cls_logits", 3, False), ("box_deltas", 3, True), ("gt_boxes", 3, True),
                ("gt_classes", 2, False), ("gt_valid", 2, False))


def _check_inputs(inputs, pre_anchor_topk):
  """Static shape checks (ValueError); in eager mode also the class range of valid rows."""
  shapes = {n: tf.TensorShape(getattr(x, "shape", None) or tf.convert_to_tensor(x).shape) for n, x in inputs.items()}
  for name, rank, boxes in _INPUT_RANKS:
    if shapes[name].rank != rank or (boxes and shapes[name][-1] not in (None, 4)):
      raise ValueError(f"{name} must have rank {rank}{' with a last dimension of 4' if boxes else ''}, "
                       f"got shape {shapes[name]}.")
  logits = shapes["cls_logits"]
  if not (shapes["box_deltas"][:2].is_compatible_with(logits[:2])
          and shapes["anchors"][:1].is_compatible_with(logits[1:2])):
    raise ValueError(f"box_deltas {shapes['box_deltas']} and anchors {shapes['anchors']} must match cls_logits "
                     f"{logits} in batch and anchors.")
  for name in ("gt_classes", "gt_valid"):
    if not shapes[name].is_compatible_with(shapes["gt_boxes"][:2]):
      raise ValueError(f"{name} {shapes[name]} must be [B, M] like gt_boxes {shapes['gt_boxes']}.")
  if logits[-1] is None:
    raise ValueError(f"cls_logits needs a static number of classes, got shape {logits}.")
  num_anchors = logits[1] if logits[1] is not None else shapes["anchors"][0]
  if int(pre_anchor_topk) != pre_anchor_topk or not 1 <= pre_anchor_topk <= (num_anchors or pre_anchor_topk):
    raise ValueError(f"pre_anchor_topk must be an integer in [1, A = {num_anchors}], got {pre_anchor_topk!r}.")
  if tf.executing_eagerly():  # graph callers (train steps) must guarantee it; eager callers get a clear error
    labels = tf.boolean_mask(inputs["gt_classes"], tf.cast(inputs["gt_valid"], tf.bool)).numpy()
    if labels.size and (labels.min() < 0 or labels.max() >= logits[-1]):
      raise ValueError(f"gt_classes of valid rows must be in [0, {logits[-1]}), got {labels!r}.")


def free_anchor_loss(anchors, cls_logits, box_deltas, gt_boxes, gt_classes, gt_valid, *, pre_anchor_topk=50,
                     bbox_thr=0.6, gamma=2.0, alpha=0.5, smoothl1_beta=0.11, loss_weight=0.75,
                     target_means=(0.0, 0.0, 0.0, 0.0), target_stds=(0.1, 0.1, 0.2, 0.2), wh_ratio_clip=0.016):
  """FreeAnchor positive and negative bag losses; this replica's share of the global-batch value.

  Args:
    anchors: [A, 4] float xyxy pixels, shared by the batch (`tfreward.ops.anchors.retinanet_anchors`).
    cls_logits: [B, A, C] float (bfloat16 is promoted), sigmoid logits, no background class.
    box_deltas: [B, A, 4] float (dx, dy, dw, dh) in std units (`tfreward.ops.box_coder`).
    gt_boxes: [B, M, 4] float xyxy pixels; padding rows are ignored whatever they hold.
    gt_classes: [B, M] int, 0-based class in [0, C) for valid rows; padding rows are ignored.
    gt_valid: [B, M] bool, True for real objects; valid rows without a positive finite extent count as padding.
    pre_anchor_topk: int k, anchors per positive bag. Defaults to 50.
    bbox_thr: float in [0, 1), threshold t1 of the saturated-linear box probability. Defaults to 0.6.
    gamma: float >= 0, focal exponent of the negative bag. Defaults to 2.0.
    alpha: float in [0, 1]; the positive bag has weight alpha, the negative 1 - alpha. Defaults to 0.5.
    smoothl1_beta: float > 0. Defaults to 0.11.
    loss_weight: float >= 0, weight of SmoothL1 inside P_loc = exp(-loss_weight * SmoothL1). Defaults to 0.75.
    target_means: 4 floats of the box coder. Defaults to (0, 0, 0, 0).
    target_stds: 4 positive floats of the box coder. Defaults to (0.1, 0.1, 0.2, 0.2).
    wh_ratio_clip: float in (0, 1), the decode clamp of the box probability. Defaults to 0.016.

  Returns:
    dict with float32 scalars `positive_bag_loss` and `negative_bag_loss`, both NaN when a logit or delta is not
    finite (see the module docstring).
  """
  _check_inputs(dict(anchors=anchors, cls_logits=cls_logits, box_deltas=box_deltas, gt_boxes=gt_boxes,
                     gt_classes=gt_classes, gt_valid=gt_valid), pre_anchor_topk)
  _check_range("bbox_thr", bbox_thr, 0.0, 1.0, high_open=True)
  _check_range("gamma", gamma, 0.0, float("inf"))
  _check_range("alpha", alpha, 0.0, 1.0)
  _check_range("smoothl1_beta", smoothl1_beta, 0.0, float("inf"), low_open=True)
  _check_range("loss_weight", loss_weight, 0.0, float("inf"))
  _check_coder(target_means, target_stds, wh_ratio_clip)
  coder = dict(target_means=target_means, target_stds=target_stds)
  k = int(pre_anchor_topk)
  num_pos = global_sum(tf.reduce_sum(tf.cast(_targets_valid(gt_boxes, gt_valid), tf.float32)))  # all replicas
  terms, _, _ = positive_bag_terms(anchors, cls_logits, box_deltas, gt_boxes, gt_classes, gt_valid,
                                   pre_anchor_topk=k, alpha=alpha, smoothl1_beta=smoothl1_beta,
                                   loss_weight=loss_weight, **coder)
  box_prob, _ = anchor_box_probability(anchors, box_deltas, gt_boxes, gt_classes, gt_valid,
                                       num_classes=cls_logits.shape[-1], bbox_thr=bbox_thr,
                                       wh_ratio_clip=wh_ratio_clip, **coder)
  cls_prob = tf.sigmoid(tf.cast(cls_logits, tf.float32))  # [B, A, C]
  neg_prob = tf.clip_by_value(cls_prob * (1.0 - box_prob), EPS, 1.0 - EPS)  # 1 - 1e-12 == 1 in float32
  negative = (1.0 - alpha) * (neg_prob**gamma * _bce_target_zero(neg_prob))  # [B, A, C]
  losses = {
      "positive_bag_loss": tf.reduce_sum(terms) / tf.maximum(num_pos, 1.0),
      "negative_bag_loss": tf.reduce_sum(negative) / tf.maximum(num_pos * k, 1.0),
  }
  return finite.nan_if_not_finite(losses, cls_logits, box_deltas)
