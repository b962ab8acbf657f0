"""The windowed path of the SimOTA assignment (`tfreward.ops.simota`, module docstring): costs only where the
selection can fall, for static M, A, C and grid sizes. Bit-identical to the dense path
(tests/ops/test_simota_windowed.py).
"""

import math

import tensorflow as tf

from tfreward.ops import boxes as box_ops
from tfreward.ops import simota_costs

_ROWS_PER_STEP = 4  # row objects ranked per step of the windowed path's row loop
_COLUMNS_PER_STEP = 64  # conflicting anchors resolved per step of the exact variant's column loop


def compact(mask):
  """Indices of the True entries of a 1-D bool tensor first (in order), then the others; and their count."""
  return tf.argsort(tf.cast(~mask, tf.int32), stable=True), tf.reduce_sum(tf.cast(mask, tf.int32))


def chunk(order, count, step, size):
  """Step `step` of a loop over `order[:count]` in chunks of `size`: indices [size] (clamped) and a mask."""
  position = step * size + tf.range(size)
  ok = position < count
  return tf.gather(order, tf.minimum(position, tf.shape(order)[0] - 1)), ok


def window_size(center_radius):
  """Cells per axis of the window over an object's centre square: the open interval of 2 * radius strides holds at
  most ceil(2 * radius) cell centres (one more only if rounding admits a centre on its boundary: then the object's
  square is counted as not fitting, and the object ranks its full row instead)."""
  return max(1, int(math.ceil(2.0 * center_radius)))


def _candidate_windows(anchor_centers, anchor_strides, gt_boxes, gt_valid, center_radius, levels, exact):
  """Candidate regions per level and axis (all levels at once, padded to the largest grid) and each object's window
  over its centre square.

  Returns:
    image_candidate: [B, A] bool anchors in some object's box or centre square.
    has_candidate: [B, M] bool valid objects with a candidate anchor: for the exact variant, any of the image's; for
      the fast one, an anchor in the object's own box or centre square (both axes at one level).
    complete: [B, M] bool the windows hold every strong cell of the object.
    strong_w, anchor_w: [B, M, N] bool strong cells and int32 flat anchor index of the N = L * w * w window cells.
  """
  batch, num_slots = tf.shape(gt_valid)[0], gt_valid.shape[1]
  valid = gt_valid[..., None]  # [B, M, 1]
  gcx, gcy, gw, gh = [gt_boxes[..., i:i + 1] for i in range(4)]  # [B, M, 1]
  num_levels = len(levels)
  heights, widths = [h for h, _ in levels], [w for _, w in levels]
  offsets = [sum(h * w for h, w in levels[:l]) for l in range(num_levels)]
  size_x, size_y = max(widths), max(heights)

  def axis_table(values, step_of_level, sizes, fill):
    """[L, max(sizes)]: per level, `values` along one axis of its grid (row 0 or column 0), padded with `fill`."""
    return tf.stack([tf.pad(values[o:o + n * step:step], [[0, max(sizes) - n]], constant_values=fill)
                     for o, step, n in zip(offsets, step_of_level, sizes)])

  ones = [1] * num_levels
  xs = axis_table(anchor_centers[:, 0], ones, widths, math.nan)  # [L, w]: NaN fails every test below
  ys = axis_table(anchor_centers[:, 1], widths, heights, math.nan)  # [L, h]
  radius_x = center_radius * axis_table(anchor_strides, ones, widths, 1.0)
  radius_y = center_radius * axis_table(anchor_strides, widths, heights, 1.0)
  window = window_size(center_radius)
  expand = lambda t: t[..., None]  # noqa: E731  [B, M, 1] -> [B, M, 1, 1], against [L, n]
  box_x, ctr_x = simota_costs.axis_masks(xs, radius_x, expand(gcx), expand(gw))  # [B, M, L, w]; False on padding (NaN)
  box_y, ctr_y = simota_costs.axis_masks(ys, radius_y, expand(gcy), expand(gh))  # [B, M, L, h]
  box_x, ctr_x = box_x & valid[..., None], ctr_x & valid[..., None]
  real_x = tf.range(size_x) < tf.constant(widths)[:, None]  # [L, w]
  real_y = tf.range(size_y) < tf.constant(heights)[:, None]
  # Cells left of (above) the centre square: a prefix, as cell centres increase along each axis.
  left_x = ~(xs - (expand(gcx) - radius_x) > 0.0) & real_x
  left_y = ~(ys - (expand(gcy) - radius_y) > 0.0) & real_y

  # Objects whose box or centre square holds the cell: [B, h, 2M] x [B, 2M, w] products of 0/1 per level.
  regions_y = tf.cast(tf.concat([box_y, ctr_y], axis=1), tf.float32)  # [B, 2M, L, h]
  regions_x = tf.cast(tf.concat([box_x, ctr_x], axis=1), tf.float32)
  image_candidate = tf.concat([
      tf.reshape(tf.einsum("bmy,bmx->byx", regions_y[:, :, l, :h], regions_x[:, :, l, :w]) > 0.0, [batch, h * w])
      for l, (h, w) in enumerate(levels)], axis=1)  # [B, A]
  if exact:
    has_candidate = gt_valid & tf.reduce_any(image_candidate, axis=-1, keepdims=True)
  else:
    has_candidate = tf.reduce_any((tf.reduce_any(box_x, -1) & tf.reduce_any(box_y, -1))
                                  | (tf.reduce_any(ctr_x, -1) & tf.reduce_any(ctr_y, -1)), axis=-1)  # [B, M]

  # Window over the centre square: it starts at the square's first cell; the square holds every strong cell.
  cells = []
  for ctr, box, left, sizes in ((ctr_y, box_y, left_y, heights), (ctr_x, box_x, left_x, widths)):
    start = tf.reduce_sum(tf.cast(left, tf.int32), axis=-1)  # [B, M, L]: cells before the square
    cell = start[..., None] + tf.range(window)  # [B, M, L, window]
    size = tf.constant(sizes)[:, None]  # [L, 1]
    inside = cell < size
    cell = tf.minimum(cell, size - 1)
    cells.append((cell, tf.gather(ctr & box, cell, batch_dims=3) & inside,
                  tf.reduce_sum(tf.cast(ctr, tf.int32), axis=-1) <= window))
  (cell_y, strong_y, fits_y), (cell_x, strong_x, fits_x) = cells
  complete = gt_valid & tf.reduce_all(fits_y & fits_x, axis=-1)
  num_window = num_levels * window * window
  strong_w = tf.reshape(strong_y[..., :, None] & strong_x[..., None, :], [batch, num_slots, num_window])
  anchor_w = tf.reshape(tf.constant(offsets)[:, None, None] + cell_y[..., :, None] * tf.constant(widths)[:, None, None]
                        + cell_x[..., None, :], [batch, num_slots, num_window])
  return image_candidate, has_candidate, complete, strong_w, anchor_w


def _cost_function(obj_logits, cls_logits, background, classes, iou, pred_finite):
  """`cost_at(b, g, a, strong, cand)`: the costs of the pairs (image b, slot g, anchor a), all broadcast to one
  shape (int32 indices, bool strong and candidate masks)."""
  def cost_at(b, g, a, strong, cand):
    b, g = tf.broadcast_to(b, tf.shape(a)), tf.broadcast_to(g, tf.shape(a))
    ba = tf.stack([b, a], -1)
    logit = tf.gather_nd(cls_logits, tf.stack([b, a, tf.gather_nd(classes, tf.stack([b, g], -1))], -1))
    cls_cost = tf.gather_nd(background, ba) + simota_costs.class_correction(
        simota_costs.class_probability(tf.gather_nd(obj_logits, ba), logit))
    pair_iou = tf.gather_nd(iou, tf.stack([b, g, a], -1))
    return simota_costs.pair_cost(cls_cost, pair_iou, strong, tf.gather_nd(pred_finite, ba), cand)
  return cost_at


def _window_entries(cost_at, anchor_w, strong_w, max_k):
  """Window objects' selections: the k cheapest strong, finite cells of each window, cheapest first.

  Returns [B, M, max_k] int32 anchors and float32 costs (inf past the window), and [B, M] int32 the number of strong
  finite cells.
  """
  batch, num_slots = tf.shape(anchor_w)[0], anchor_w.shape[1]
  cost_w = cost_at(tf.range(batch)[:, None, None], tf.range(num_slots)[None, :, None], anchor_w, strong_w, strong_w)
  strong_finite = cost_w < simota_costs.NON_FINITE_COST
  top_w = min(max_k, anchor_w.shape[-1])
  neg_cost, position = tf.math.top_k(-tf.where(strong_finite, cost_w, math.inf), k=top_w)  # cheapest first
  entry_anchor, entry_cost = tf.gather(anchor_w, position, batch_dims=2), -neg_cost
  if top_w < max_k:
    entry_anchor = tf.pad(entry_anchor, [[0, 0], [0, 0], [0, max_k - top_w]])
    entry_cost = tf.pad(entry_cost, [[0, 0], [0, 0], [0, max_k - top_w]], constant_values=math.inf)
  return entry_anchor, entry_cost, tf.reduce_sum(tf.cast(strong_finite, tf.int32), axis=-1)


def _row_entries(cost_at, entries, is_row, dynamic_k, image_candidate, anchor_centers, anchor_strides, gt_boxes,
                 center_radius, exact, max_k):
  """Row objects' selections, written over `entries`: their full rows of A costs, _ROWS_PER_STEP at a time.

  Args:
    entries: (anchor int32, cost float32, ok bool), each [B * M, max_k], flat slot index n = b * M + g.
    is_row: [B * M] bool the objects that rank their full row.

  Returns the updated entries.
  """
  num_entries = tf.shape(entries[0])[0]
  num_slots, num_anchors = dynamic_k.shape[1], image_candidate.shape[1]
  rank = tf.range(max_k)
  rows, num_rows = compact(is_row)

  def row_step(step, anchors, costs, oks):
    n, ok = chunk(rows, num_rows, step, _ROWS_PER_STEP)
    b, g = n // num_slots, n % num_slots
    row_boxes = tf.gather_nd(gt_boxes, tf.stack([b, g], -1))  # [R, 4]
    in_box, in_ctr = simota_costs.region_masks(anchor_centers, anchor_strides, row_boxes[None], center_radius)
    in_box, in_ctr = in_box[0], in_ctr[0]  # [R, A]
    cand = tf.gather(image_candidate, b) if exact else in_box | in_ctr
    cost = cost_at(b[:, None], g[:, None], tf.broadcast_to(tf.range(num_anchors), tf.shape(in_box)), in_box & in_ctr,
                   cand)
    neg, picked = tf.math.top_k(-cost, k=max_k)  # [R, max_k]
    k = tf.gather_nd(dynamic_k, tf.stack([b, g], -1))
    row_ok = ok[:, None] & (rank < k[:, None]) & (neg > -math.inf)
    target = tf.where(ok, n, num_entries)[:, None]
    return (step + 1, tf.tensor_scatter_nd_update(anchors, target, picked),
            tf.tensor_scatter_nd_update(costs, target, -neg), tf.tensor_scatter_nd_update(oks, target, row_ok))

  spare = lambda x, value: tf.concat([x, tf.fill([1, max_k], value)], axis=0)  # noqa: E731  a row losers write to
  _, anchors, costs, oks = tf.while_loop(
      lambda step, *_: step * _ROWS_PER_STEP < num_rows, row_step,
      (tf.constant(0), spare(entries[0], 0), spare(entries[1], math.inf), spare(entries[2], False)))
  return anchors[:-1], costs[:-1], oks[:-1]


def _resolve(cost_at, entry_anchor, entry_cost, entry_ok, num_anchors, anchor_centers, anchor_strides, gt_boxes,
             gt_valid, center_radius, exact):
  """Per anchor: how many objects selected it and which one wins it.

  Args:
    entry_anchor, entry_cost, entry_ok: [B * M, max_k] selections (flat slot index b * M + g).

  Returns:
    count: [B * A] int32 selections per anchor (flat anchor index b * A + a); winner: [B * A] int32 winning slot;
    representative: [B * M * max_k] bool one entry per foreground anchor.
  """
  batch, num_slots = tf.shape(gt_valid)[0], gt_valid.shape[1]
  entry_slot = tf.broadcast_to(tf.tile(tf.range(num_slots), [batch])[:, None], tf.shape(entry_anchor))
  entry_image = tf.broadcast_to(tf.repeat(tf.range(batch), num_slots)[:, None], tf.shape(entry_anchor))
  segment = tf.reshape(entry_image * num_anchors + entry_anchor, [-1])
  entry_ok, entry_slot, entry_cost = (tf.reshape(x, [-1]) for x in (entry_ok, entry_slot, entry_cost))
  num_flat = batch * num_anchors
  count = tf.math.unsorted_segment_sum(tf.cast(entry_ok, tf.int32), segment, num_flat)
  first = tf.minimum(tf.math.unsorted_segment_min(tf.where(entry_ok, entry_slot, num_slots), segment, num_flat),
                     num_slots)
  representative = entry_ok & (entry_slot == tf.gather(first, segment))
  if not exact:
    # Conflicts go to the cheapest of the selecting objects (their costs are in the entries).
    best = tf.math.unsorted_segment_min(tf.where(entry_ok, entry_cost, math.inf), segment, num_flat)
    cheapest = entry_ok & (entry_cost == tf.gather(best, segment))
    winner = tf.math.unsorted_segment_min(tf.where(cheapest, entry_slot, num_slots), segment, num_flat)
    return count, winner, representative

  # Anchors selected several times go to the cheapest of ALL the image's objects: their columns of M costs.
  columns, num_columns = compact(representative & (tf.gather(count, segment) > 1))
  entry_anchor_flat, entry_image_flat = tf.reshape(entry_anchor, [-1]), tf.reshape(entry_image, [-1])

  def column_step(step, winner):
    e, ok = chunk(columns, num_columns, step, _COLUMNS_PER_STEP)
    b, a = tf.gather(entry_image_flat, e), tf.gather(entry_anchor_flat, e)  # [P]
    column_boxes = tf.gather(gt_boxes, b)  # [P, M, 4]
    radius = center_radius * tf.gather(anchor_strides, a)[:, None]
    center = tf.gather(anchor_centers, a)
    box_x, ctr_x = simota_costs.axis_masks(center[:, 0:1], radius, column_boxes[..., 0], column_boxes[..., 2])
    box_y, ctr_y = simota_costs.axis_masks(center[:, 1:2], radius, column_boxes[..., 1], column_boxes[..., 3])
    cost = cost_at(b[:, None], tf.range(num_slots)[None, :], tf.broadcast_to(a[:, None], tf.shape(box_x)),
                   box_x & box_y & ctr_x & ctr_y, tf.gather(gt_valid, b))  # [P, M]
    best = tf.reduce_min(cost, axis=1, keepdims=True)
    column_winner = tf.reduce_min(tf.where(cost == best, tf.range(num_slots)[None, :], num_slots), axis=1)
    return step + 1, tf.tensor_scatter_nd_update(winner, tf.where(ok, b * num_anchors + a, num_flat)[:, None],
                                                 column_winner)

  _, winner = tf.while_loop(lambda step, _: step * _COLUMNS_PER_STEP < num_columns, column_step,
                            (tf.constant(0), tf.concat([first, [0]], axis=0)))
  return count, winner[:-1], representative


def windowed_assign(pred_boxes, obj_logits, cls_logits, anchor_centers, anchor_strides, gt_boxes, gt_classes,
                     gt_valid, variant, center_radius, dynamic_k_bias, max_k, levels):
  """Costs only where the selection can fall (module docstring). Static M, A, C and level sizes.

  Stages: candidate regions and windows; IoU and dynamic k; the window objects' selections (the k cheapest cells of
  the window over their centre square, when it holds them all); the row objects' selections (full rows); then the
  anchors selected several times are resolved.
  """
  exact = variant == "exact"
  batch = tf.shape(gt_valid)[0]
  num_slots, num_anchors, num_classes = gt_valid.shape[1], pred_boxes.shape[1], cls_logits.shape[-1]
  image_candidate, has_candidate, complete, strong_w, anchor_w = _candidate_windows(
      anchor_centers, anchor_strides, gt_boxes, gt_valid, center_radius, levels, exact)
  if exact:
    candidate = image_candidate[:, None, :] & gt_valid[..., None]
  else:
    in_box, in_ctr = simota_costs.region_masks(anchor_centers, anchor_strides, gt_boxes, center_radius)  # [B, M, A]
    candidate = (in_box | in_ctr) & gt_valid[..., None]  # elementwise, so it fuses into the IoU below

  # IoU of every pair (0 off candidates), the dynamic k.
  background = simota_costs.background_cost(obj_logits, cls_logits)  # [B, A], NaN where a class logit is not finite
  box_finite = tf.reduce_all(tf.math.is_finite(pred_boxes), axis=-1)  # [B, A]
  pred_finite = box_finite & tf.math.is_finite(obj_logits) & tf.math.is_finite(background)
  iou = box_ops.pairwise_iou(box_ops.cxcywh_to_xyxy(gt_boxes), box_ops.cxcywh_to_xyxy(pred_boxes))  # [B, M, A]
  iou = tf.where(candidate & box_finite[:, None, :] & tf.math.is_finite(iou), iou, 0.0)
  dynamic_k = simota_costs.dynamic_k(simota_costs.top_values(iou, min(simota_costs.NUM_TOP_IOUS, num_anchors)),
                                     has_candidate, dynamic_k_bias, max_k)
  classes = tf.clip_by_value(gt_classes, 0, num_classes - 1)
  cost_at = _cost_function(obj_logits, cls_logits, background, classes, iou, pred_finite)

  entry_anchor, entry_cost, num_strong_finite = _window_entries(cost_at, anchor_w, strong_w, max_k)
  in_window = has_candidate & complete & (dynamic_k <= num_strong_finite)
  if num_classes > simota_costs.MAX_STRONG_FIRST_CLASSES:
    in_window = tf.zeros_like(in_window)
  entry_ok = in_window[..., None] & (tf.range(max_k) < dynamic_k[..., None])  # [B, M, max_k]
  flat = lambda x: tf.reshape(x, tf.concat([[batch * num_slots], tf.shape(x)[2:]], axis=0))  # noqa: E731
  entry_anchor, entry_cost, entry_ok = _row_entries(
      cost_at, (flat(entry_anchor), flat(entry_cost), flat(entry_ok)), flat(has_candidate & ~in_window), dynamic_k,
      image_candidate, anchor_centers, anchor_strides, gt_boxes, center_radius, exact, max_k)

  count, winner, representative = _resolve(cost_at, entry_anchor, entry_cost, entry_ok, num_anchors, anchor_centers,
                                           anchor_strides, gt_boxes, gt_valid, center_radius, exact)
  count = tf.reshape(count, [batch, num_anchors])
  fg = count > 0
  winner = tf.where(fg, tf.reshape(winner, [batch, num_anchors]), 0)
  matched_iou = tf.where(fg, tf.gather_nd(iou, tf.stack([tf.broadcast_to(tf.range(batch)[:, None], tf.shape(winner)),
                                                         winner, tf.broadcast_to(tf.range(num_anchors),
                                                                                 tf.shape(winner))], -1)), 0.0)
  foreground = (tf.reshape(entry_anchor, [batch, num_slots * max_k]),
                tf.reshape(representative, [batch, num_slots * max_k]))
  assignment = {
      "fg_mask": fg,
      "matched_gt": tf.where(fg, winner, -1),
      "matched_iou": matched_iou,
      "dynamic_k": dynamic_k,
      "candidate_mask": image_candidate,
  }
  class_logits_finite = tf.math.is_finite(background) | tf.math.is_nan(obj_logits)
  return assignment, {"foreground": foreground, "class_logits_finite": class_logits_finite}
