"""Group DETR set criterion (Conditional DETR with group-wise one-to-one matching), static shapes, XLA-safe.

Per decoder layer: match each group of queries to the ground truth (`detr_matcher.group_match`), then
  loss_ce    sigmoid focal loss over every query and class (matched queries are positives of their target's class),
  loss_bbox  L1 between matched predicted and target cxcywh boxes,
  loss_giou  1 - GIoU of the matched pairs,
each summed and divided by `num_boxes = max(1, G * targets in the global batch)`. The values are unweighted; the
model weights them (`GroupDetr.loss_weights`: 2, 5, 2 for ce, bbox, giou, the same for every layer).

Replicas: every term returned inside a replica is that replica's share of the global-batch value (see
`tfreward.ops.distributed`): shares summed over replicas equal the loss of the whole batch on one replica. The
normaliser is all-reduced once per call.

Logging terms:
  class_error        (last layer) percentage of matched pairs whose top-scoring class is not the target class;
                     100 when there is no matched pair.
  cardinality_error  mean over images and groups of |#queries of the group with a sigmoid score above 0.5 (any
                     class) - #targets of the image|. This replaces the reference's count of "argmax != last class",
                     which with sigmoid outputs (no "no-object" logit) only counts queries whose top class is not the
                     last real class and so is not a cardinality at all.

Non-finite predictions (`tfreward.ops.finite`): if any logit or box of the last or an auxiliary layer is NaN or
+-inf, every float scalar returned (losses and logging terms, all layers) is NaN, and so are the gradients, eagerly
and under XLA alike. The matching stays defined: the matcher treats NaN and +inf costs as forbidden pairs
(`tfreward.ops.matching`), so it always returns a complete assignment and never hangs.
Degenerate ground truth: a valid target whose box has no positive finite width and height (zero-area, inverted,
NaN) is treated as padding: never matched, not counted in num_boxes.
"""

import tensorflow as tf

from tfreward.losses import detr_matcher
from tfreward.losses import focal
from tfreward.ops import boxes as box_ops
from tfreward.ops import distributed
from tfreward.ops import finite

_BOX_FORMATS = ("yxyx", "cxcywh")
_UNIT_BOX = (0.5, 0.5, 1.0, 1.0)  # cxcywh stand-in for padding targets: keeps every GIoU well defined


def _check_inputs(pred_logits, pred_boxes, gt_boxes, gt_classes, gt_valid, num_groups, aux_outputs, box_format):
  if box_format not in _BOX_FORMATS:
    raise ValueError(f"gt_box_format must be one of {_BOX_FORMATS}, got {box_format!r}.")
  if not isinstance(num_groups, int) or num_groups < 1:
    raise ValueError(f"num_groups must be a positive int, got {num_groups!r}.")
  if pred_logits.shape.rank != 3 or pred_boxes.shape.rank != 3 or pred_boxes.shape[-1] != 4:
    raise ValueError(f"pred_logits must be [B, N, C] and pred_boxes [B, N, 4], got {pred_logits.shape} and "
                     f"{pred_boxes.shape}.")
  num_queries_total = pred_logits.shape[1]
  if num_queries_total is None or pred_logits.shape[-1] is None:
    raise ValueError(f"pred_logits must have static N and C, got shape {pred_logits.shape}.")
  if pred_boxes.shape[1] != num_queries_total:
    raise ValueError(f"pred_logits {pred_logits.shape} and pred_boxes {pred_boxes.shape} disagree on N.")
  if num_queries_total % num_groups:
    raise ValueError(f"the query axis ({num_queries_total}) must split into num_groups={num_groups} equal groups.")
  if gt_boxes.shape.rank != 3 or gt_boxes.shape[-1] != 4 or gt_classes.shape.rank != 2 or gt_valid.shape.rank != 2:
    raise ValueError(f"gt_boxes must be [B, T, 4], gt_classes and gt_valid [B, T], got {gt_boxes.shape}, "
                     f"{gt_classes.shape}, {gt_valid.shape}.")
  num_targets = gt_boxes.shape[1]
  if num_targets is None or gt_classes.shape[1] != num_targets or gt_valid.shape[1] != num_targets:
    raise ValueError(f"gt_boxes {gt_boxes.shape}, gt_classes {gt_classes.shape} and gt_valid {gt_valid.shape} "
                     "need the same static T.")
  if num_targets > num_queries_total // num_groups:
    raise ValueError(f"at most {num_queries_total // num_groups} targets per image (queries per group) can be "
                     f"matched, but the targets are padded to T={num_targets}: lower the maximum number of instances "
                     "or raise the number of queries.")
  for k, layer in enumerate(aux_outputs):
    if len(layer) != 2 or layer[0].shape != pred_logits.shape or layer[1].shape != pred_boxes.shape:
      raise ValueError(f"aux_outputs[{k}] must be (logits {pred_logits.shape}, boxes {pred_boxes.shape}), got "
                       f"{[getattr(t, 'shape', t) for t in layer]}.")


def _layer_terms(logits, boxes, gt_boxes, gt_classes, gt_valid, num_boxes, *, num_groups, match_kwargs, focal_kwargs):
  """Matching and unnormalised sums of one decoder layer. Shapes as in `group_detr_loss`."""
  logits = tf.cast(logits, tf.float32)
  boxes = tf.cast(boxes, tf.float32)
  num_queries_total, num_classes = logits.shape[1], logits.shape[2]
  num_queries = num_queries_total // num_groups
  cost = detr_matcher.matching_cost(logits, boxes, gt_boxes, gt_classes, **match_kwargs)  # [B, T, N]
  cost = tf.where(gt_valid[:, :, None], cost, 0.0)
  query_index = detr_matcher.group_match(cost, gt_valid, num_groups=num_groups)  # [B, G, T]
  match_cost = tf.reduce_sum(detr_matcher.matched_cost(logits, boxes, gt_boxes, gt_classes, query_index,
                                                       **match_kwargs), axis=-1)  # [B, G]
  valid = query_index >= 0  # [B, G, T]
  group_offsets = tf.range(num_groups, dtype=tf.int32)[:, None] * num_queries  # [G, 1]
  local = tf.where(valid, query_index - group_offsets, -1)

  # Classification: the class (+1) each query is matched to, 0 for unmatched queries.
  hits = tf.one_hot(local, num_queries, dtype=tf.float32)  # [B, G, T, Q]; -1 rows are all zero
  class_plus_one = tf.cast(gt_classes + 1, tf.float32) * tf.cast(gt_valid, tf.float32)  # [B, T]
  matched_class = tf.einsum("bgtq,bt->bgq", hits, class_plus_one)  # [B, G, Q]
  matched_class = tf.reshape(tf.cast(tf.round(matched_class), tf.int32) - 1, [-1, num_queries_total])  # [B, N]
  labels = tf.one_hot(matched_class, num_classes, dtype=tf.float32)  # [B, N, C]
  ce_sum = tf.reduce_sum(focal.sigmoid_focal_loss(logits=logits, labels=labels, **focal_kwargs))

  # Boxes of the matched pairs.
  batch = tf.shape(logits)[0]
  flat_index = tf.reshape(tf.maximum(query_index, 0), [batch, -1])  # [B, G*T]
  matched_boxes = tf.reshape(tf.gather(boxes, flat_index, batch_dims=1), [batch, num_groups, -1, 4])  # [B, G, T, 4]
  targets = tf.broadcast_to(gt_boxes[:, None], tf.shape(matched_boxes))  # [B, G, T, 4]
  l1 = tf.reduce_sum(tf.abs(matched_boxes - targets), axis=-1)  # [B, G, T]
  giou = box_ops.elementwise_giou(box_ops.cxcywh_to_xyxy(matched_boxes), box_ops.cxcywh_to_xyxy(targets))
  bbox_sum = tf.reduce_sum(tf.where(valid, l1, 0.0))
  giou_sum = tf.reduce_sum(tf.where(valid, 1.0 - giou, 0.0))

  # Logging: classification error of matched pairs, cardinality per group.
  matched_logits = tf.reshape(tf.gather(logits, flat_index, batch_dims=1), [batch, num_groups, -1, num_classes])
  top_class = tf.argmax(matched_logits, axis=-1, output_type=tf.int32)  # [B, G, T]
  correct = tf.reduce_sum(tf.cast(valid & tf.equal(top_class, gt_classes[:, None, :]), tf.float32))
  confident = tf.reduce_max(logits, axis=-1) > 0.0  # [B, N] sigmoid > 0.5 for some class
  card_pred = tf.reduce_sum(tf.cast(tf.reshape(confident, [batch, num_groups, num_queries]), tf.float32), -1)
  card_true = tf.reduce_sum(tf.cast(gt_valid, tf.float32), axis=-1, keepdims=True)  # [B, 1]
  card_sum = tf.reduce_sum(tf.abs(card_pred - card_true))

  terms = {"loss_ce": ce_sum / num_boxes, "loss_bbox": bbox_sum / num_boxes, "loss_giou": giou_sum / num_boxes,
           "query_index_for_target": query_index, "match_cost": match_cost}
  return terms, correct, card_sum


def group_detr_loss(pred_logits, pred_boxes, gt_boxes, gt_classes, gt_valid, *, num_groups, aux_outputs=(),
                    cost_class=2.0, cost_bbox=5.0, cost_giou=2.0, focal_alpha=0.25, focal_gamma=2.0,
                    gt_box_format="yxyx"):
  """Group DETR losses of the last decoder layer and every auxiliary layer, with the matchings used.

  Args:
    pred_logits: [B, G*Q, C] float class logits (sigmoid, no "no-object" logit); group g is queries g*Q ... g*Q+Q-1.
      Any float dtype (bfloat16 under mixed precision); everything is computed in float32.
    pred_boxes: [B, G*Q, 4] float, normalised cxcywh.
    gt_boxes: [B, T, 4] float, normalised, in `gt_box_format`; padding slots may hold anything.
    gt_classes: [B, T] int32 in [0, C); padding slots may hold anything (-1 by the data contract).
    gt_valid: [B, T] bool, False for padding (as are valid targets without a positive finite extent). T <= Q is
      required (checked statically).
    num_groups: int G >= 1.
    aux_outputs: sequence of (logits, boxes) pairs, shaped like `pred_logits` / `pred_boxes`, one per intermediate
      decoder layer. Defaults to none.
    cost_class, cost_bbox, cost_giou: float matching-cost weights. Defaults to 2.0, 5.0, 2.0.
    focal_alpha, focal_gamma: float focal loss (and focal matching cost) parameters. Defaults to 0.25, 2.0.
    gt_box_format: str. "yxyx" (the data contract) or "cxcywh". Defaults to "yxyx".

  Returns:
    dict of float32 scalars (this replica's share; NaN for non-finite predictions): `loss_ce`, `loss_bbox`,
    `loss_giou`, `class_error`, `cardinality_error`, and for auxiliary layer k `loss_ce_{k}`, `loss_bbox_{k}`,
    `loss_giou_{k}`, `cardinality_error_{k}`; plus the matchings: `query_index_for_target` [B, G, T] int32 (global
    query index, -1 for padding) and `match_cost` [B, G] float32 for the last layer, `query_index_for_target_{k}` and
    `match_cost_{k}` for auxiliary layer k.

  Raises:
    ValueError: on inconsistent shapes, T > Q, a bad `num_groups` or `gt_box_format`.
  """
  pred_logits = tf.convert_to_tensor(pred_logits)
  pred_boxes = tf.convert_to_tensor(pred_boxes)
  gt_boxes = tf.convert_to_tensor(gt_boxes)
  gt_classes = tf.convert_to_tensor(gt_classes)
  gt_valid = tf.convert_to_tensor(gt_valid)
  aux_outputs = [tuple(tf.convert_to_tensor(t) for t in layer) for layer in aux_outputs]
  _check_inputs(pred_logits, pred_boxes, gt_boxes, gt_classes, gt_valid, num_groups, aux_outputs, gt_box_format)

  gt_boxes = tf.cast(gt_boxes, tf.float32)
  if gt_box_format == "yxyx":
    gt_boxes = box_ops.yxyx_to_cxcywh(gt_boxes)
  gt_valid = tf.cast(gt_valid, tf.bool) & box_ops.positive_extent(gt_boxes, "cxcywh")
  gt_boxes = tf.where(gt_valid[:, :, None], gt_boxes, tf.constant(_UNIT_BOX, tf.float32))
  gt_classes = tf.where(gt_valid, tf.cast(gt_classes, tf.int32), 0)

  # One all-reduce for every normaliser: [matched pairs, group-images] over the global batch.
  local_pairs = float(num_groups) * tf.reduce_sum(tf.cast(gt_valid, tf.float32))
  local_group_images = float(num_groups) * tf.cast(tf.shape(gt_valid)[0], tf.float32)
  global_pairs, global_group_images = tf.unstack(distributed.global_sum(tf.stack([local_pairs,
                                                                                  local_group_images])))
  num_boxes = tf.maximum(global_pairs, 1.0)
  group_images = tf.maximum(global_group_images, 1.0)

  match_kwargs = dict(cost_class=cost_class, cost_bbox=cost_bbox, cost_giou=cost_giou, focal_alpha=focal_alpha,
                      focal_gamma=focal_gamma)
  focal_kwargs = dict(alpha=focal_alpha, gamma=focal_gamma)
  losses = {}
  layers = [(pred_logits, pred_boxes, "")] + [(a, b, f"_{k}") for k, (a, b) in enumerate(aux_outputs)]
  for logits, boxes, suffix in layers:
    terms, correct, card_sum = _layer_terms(logits, boxes, gt_boxes, gt_classes, gt_valid, num_boxes,
                                            num_groups=num_groups, match_kwargs=match_kwargs,
                                            focal_kwargs=focal_kwargs)
    terms["cardinality_error"] = card_sum / group_images
    if not suffix:
      no_pairs_share = 100.0 / tf.cast(distributed.num_replicas(), tf.float32)
      terms["class_error"] = tf.where(global_pairs > 0.0, 100.0 * (local_pairs - correct) / num_boxes,
                                      no_pairs_share)
    losses.update({name + suffix: value for name, value in terms.items()})
  ok = finite.all_finite(pred_logits, pred_boxes, *[t for layer in aux_outputs for t in layer])
  return {name: finite.nan_unless(ok, value) if value.shape.rank == 0 else value for name, value in losses.items()}
