"""Delta box coder (mmdetection's DeltaXYWHBBoxCoder): boxes relative to anchors, normalised by means and stds.

Boxes and anchors are corner xyxy in any unit (pixels in RetinaNet); widths are x2 - x1 (no +1 pixel).
  encode: d = ((g_cx - a_cx) / a_w, (g_cy - a_cy) / a_h, ln(g_w / a_w), ln(g_h / a_h)), then (d - means) / stds.
  decode: d = deltas * stds + means; dw, dh (not dx, dy) are clamped to [-R, R], R = |ln(wh_ratio_clip)|, after
          the std; the box centre is a_c + a_wh * d_xy, its size a_wh * exp(d_wh). Decoded boxes are not clipped
          to any image.
Both compute in float32 (float64 if an input is float64) and broadcast over leading dimensions.
"""

import math

import tensorflow as tf

from tfreward.ops import boxes as box_ops

DEFAULT_MEANS = (0.0, 0.0, 0.0, 0.0)
DEFAULT_STDS = (0.1, 0.1, 0.2, 0.2)
DEFAULT_WH_RATIO_CLIP = 16 / 1000


def _four(values, name, positive):
  values = tuple(float(v) for v in values)
  if len(values) != 4 or (positive and any(not v > 0 for v in values)):
    kind = "four positive numbers" if positive else "four numbers"
    raise ValueError(f"{name} must be {kind}, got {values!r}.")
  return values


def _as_float(a, b, names):
  """Both as float32 (float64 if either is), after checking their last dimensions are 4."""
  a, b = tf.convert_to_tensor(a), tf.convert_to_tensor(b)
  for x, name in zip((a, b), names):
    if x.shape.rank is not None and x.shape[-1] is not None and x.shape[-1] != 4:
      raise ValueError(f"{name} must have a last dimension of 4, got shape {x.shape}.")
  dtype = tf.float64 if tf.float64 in (a.dtype, b.dtype) else tf.float32
  return tf.cast(a, dtype), tf.cast(b, dtype)


def encode_boxes(anchors, boxes, *, means=DEFAULT_MEANS, stds=DEFAULT_STDS):
  """Deltas that move `anchors` onto `boxes`.

  Args:
    anchors: [..., 4] float xyxy with positive width and height, broadcastable against `boxes`.
    boxes: [..., 4] float xyxy target boxes (zero width or height gives an infinite log delta).
    means: 4 floats subtracted from the raw deltas. Defaults to (0, 0, 0, 0).
    stds: 4 positive floats dividing the centred deltas. Defaults to (0.1, 0.1, 0.2, 0.2).

  Returns:
    [..., 4] float32 (float64 for float64 inputs) deltas (dx, dy, dw, dh).
  """
  means, stds = _four(means, "means", False), _four(stds, "stds", True)
  anchors, boxes = _as_float(anchors, boxes, ("anchors", "boxes"))
  acx, acy, aw, ah = tf.unstack(box_ops.xyxy_to_cxcywh(anchors), axis=-1)
  gcx, gcy, gw, gh = tf.unstack(box_ops.xyxy_to_cxcywh(boxes), axis=-1)
  raw = [(gcx - acx) / aw, (gcy - acy) / ah, tf.math.log(gw / aw), tf.math.log(gh / ah)]
  return tf.stack([(d - m) / s for d, m, s in zip(raw, means, stds)], axis=-1)


def decode_boxes(anchors, deltas, *, means=DEFAULT_MEANS, stds=DEFAULT_STDS, wh_ratio_clip=DEFAULT_WH_RATIO_CLIP):
  """Applies deltas to anchors (inverse of `encode_boxes`, with the size clamp).

  Args:
    anchors: [..., 4] float xyxy, broadcastable against `deltas` (e.g. [A, 4] with [B, A, 4]).
    deltas: [..., 4] float (dx, dy, dw, dh) in std units; bfloat16 is promoted.
    means: 4 floats. Defaults to (0, 0, 0, 0).
    stds: 4 positive floats. Defaults to (0.1, 0.1, 0.2, 0.2).
    wh_ratio_clip: float in (0, 1). dw, dh (after the std) are clamped to +-|ln(wh_ratio_clip)|, so a box is at
      most 1 / wh_ratio_clip times larger or smaller than its anchor. Defaults to 0.016.

  Returns:
    [..., 4] float32 (float64 for float64 inputs) decoded xyxy boxes, not clipped to the image.
  """
  means, stds = _four(means, "means", False), _four(stds, "stds", True)
  if not 0.0 < float(wh_ratio_clip) < 1.0:
    raise ValueError(f"wh_ratio_clip must be in (0, 1), got {wh_ratio_clip!r}.")
  anchors, deltas = _as_float(anchors, deltas, ("anchors", "deltas"))
  max_ratio = abs(math.log(float(wh_ratio_clip)))
  dx, dy, dw, dh = [d * s + m for d, m, s in zip(tf.unstack(deltas, axis=-1), means, stds)]
  dw = tf.clip_by_value(dw, -max_ratio, max_ratio)
  dh = tf.clip_by_value(dh, -max_ratio, max_ratio)
  acx, acy, aw, ah = tf.unstack(box_ops.xyxy_to_cxcywh(anchors), axis=-1)
  decoded = tf.stack([acx + aw * dx, acy + ah * dy, aw * tf.exp(dw), ah * tf.exp(dh)], axis=-1)
  return box_ops.cxcywh_to_xyxy(decoded)
