"""Box format conversions, IoU and GIoU. Pure TensorFlow, XLA-safe, no NaN anywhere.

Formats (last axis of size 4):
  yxyx:   [ymin, xmin, ymax, xmax]   (the library's canonical format, normalised to [0, 1])
  xyxy:   [xmin, ymin, xmax, ymax]
  cxcywh: [x_center, y_center, width, height]

Degenerate boxes: a box whose max edge is below its min edge (inverted) or equal to it (zero area) has area 0.
IoU with an empty box is 0; GIoU of two boxes whose enclosing box has zero area is their IoU (0).
`positive_extent` tells them apart: the losses treat a ground-truth box without positive extent as padding.
"""

import tensorflow as tf


def _check_last_dim(boxes, name="boxes"):
  shape = tf.TensorShape(boxes.shape) if hasattr(boxes, "shape") else tf.TensorShape(
      tf.convert_to_tensor(boxes).shape)
  if shape.rank is not None and (shape.rank == 0 or (shape[-1] is not None and shape[-1] != 4)):
    raise ValueError(f"{name} must have a last dimension of 4, got shape {shape}.")


def _convert(boxes, src, dst):
  _check_last_dim(boxes)
  boxes = tf.convert_to_tensor(boxes)
  a, b, c, d = tf.unstack(boxes, axis=-1)
  if src == "yxyx":
    ymin, xmin, ymax, xmax = a, b, c, d
  elif src == "xyxy":
    xmin, ymin, xmax, ymax = a, b, c, d
  else:  # cxcywh
    xmin, ymin, xmax, ymax = a - 0.5 * c, b - 0.5 * d, a + 0.5 * c, b + 0.5 * d
  if dst == "yxyx":
    return tf.stack([ymin, xmin, ymax, xmax], axis=-1)
  if dst == "xyxy":
    return tf.stack([xmin, ymin, xmax, ymax], axis=-1)
  return tf.stack([0.5 * (xmin + xmax), 0.5 * (ymin + ymax), xmax - xmin, ymax - ymin], axis=-1)


def yxyx_to_xyxy(boxes):
  """[..., 4] yxyx -> [..., 4] xyxy."""
  return _convert(boxes, "yxyx", "xyxy")


def xyxy_to_yxyx(boxes):
  """[..., 4] xyxy -> [..., 4] yxyx."""
  return _convert(boxes, "xyxy", "yxyx")


def yxyx_to_cxcywh(boxes):
  """[..., 4] yxyx -> [..., 4] cxcywh."""
  return _convert(boxes, "yxyx", "cxcywh")


def cxcywh_to_yxyx(boxes):
  """[..., 4] cxcywh -> [..., 4] yxyx."""
  return _convert(boxes, "cxcywh", "yxyx")


def xyxy_to_cxcywh(boxes):
  """[..., 4] xyxy -> [..., 4] cxcywh."""
  return _convert(boxes, "xyxy", "cxcywh")


def cxcywh_to_xyxy(boxes):
  """[..., 4] cxcywh -> [..., 4] xyxy."""
  return _convert(boxes, "cxcywh", "xyxy")


def _scale(image_hw, box_format, dtype):
  hw = tf.cast(tf.convert_to_tensor(image_hw), dtype)
  h, w = hw[..., 0], hw[..., 1]
  if box_format == "yxyx":
    return tf.stack([h, w, h, w], axis=-1)
  if box_format in ("xyxy", "cxcywh"):
    return tf.stack([w, h, w, h], axis=-1)
  raise ValueError(f"box_format must be 'yxyx', 'xyxy' or 'cxcywh', got {box_format!r}.")


def denormalize_boxes(boxes, image_hw, box_format="yxyx"):
  """Normalised [0, 1] boxes -> pixels.

  Args:
    boxes: [..., 4] float, in `box_format`.
    image_hw: [2] (or broadcastable [..., 2]) image height and width in pixels.
    box_format: str. "yxyx", "xyxy" or "cxcywh". Defaults to "yxyx".
  """
  _check_last_dim(boxes)
  boxes = tf.convert_to_tensor(boxes)
  scale = _scale(image_hw, box_format, boxes.dtype)
  if scale.shape.rank > 1:
    scale = tf.expand_dims(scale, -2)
  return boxes * scale


def normalize_boxes(boxes, image_hw, box_format="yxyx"):
  """Pixel boxes -> normalised [0, 1] boxes (inverse of `denormalize_boxes`; a zero image size gives 0)."""
  _check_last_dim(boxes)
  boxes = tf.convert_to_tensor(boxes)
  scale = _scale(image_hw, box_format, boxes.dtype)
  if scale.shape.rank > 1:
    scale = tf.expand_dims(scale, -2)
  return tf.math.divide_no_nan(boxes, scale)


def box_area(boxes):
  """Area of corner boxes (yxyx or xyxy). [..., 4] -> [...]; inverted boxes have area 0."""
  _check_last_dim(boxes)
  a0, a1, a2, a3 = tf.unstack(tf.convert_to_tensor(boxes), axis=-1)
  return tf.maximum(a2 - a0, 0.0) * tf.maximum(a3 - a1, 0.0)


def positive_extent(boxes, box_format="yxyx"):
  """Whether boxes have finite coordinates and a positive height and width. [..., 4] -> [...] bool.

  Zero-area, inverted and NaN boxes give False: what the losses treat as padding even when marked valid.
  box_format: "yxyx" or "xyxy" (extent = max edge - min edge) or "cxcywh" (width and height).
  """
  _check_last_dim(boxes)
  boxes = tf.convert_to_tensor(boxes)
  a0, a1, a2, a3 = tf.unstack(boxes, axis=-1)
  if box_format == "cxcywh":
    extent = (a2 > 0.0) & (a3 > 0.0)
  elif box_format in ("yxyx", "xyxy"):
    extent = (a2 - a0 > 0.0) & (a3 - a1 > 0.0)
  else:
    raise ValueError(f"box_format must be 'yxyx', 'xyxy' or 'cxcywh', got {box_format!r}.")
  return extent & tf.reduce_all(tf.math.is_finite(boxes), axis=-1)


def _intersection_and_union(boxes_a, boxes_b):
  """Element-wise (broadcasting) intersection and union areas of corner boxes."""
  a0, a1, a2, a3 = tf.unstack(boxes_a, axis=-1)
  b0, b1, b2, b3 = tf.unstack(boxes_b, axis=-1)
  inter = tf.maximum(tf.minimum(a2, b2) - tf.maximum(a0, b0), 0.0) * tf.maximum(
      tf.minimum(a3, b3) - tf.maximum(a1, b1), 0.0)
  area_a = tf.maximum(a2 - a0, 0.0) * tf.maximum(a3 - a1, 0.0)
  area_b = tf.maximum(b2 - b0, 0.0) * tf.maximum(b3 - b1, 0.0)
  # An inverted box has area 0 and so no intersection; clamp keeps the union >= intersection.
  union = tf.maximum(area_a + area_b - inter, inter)
  return inter, union


def _enclosing_area(boxes_a, boxes_b):
  a0, a1, a2, a3 = tf.unstack(boxes_a, axis=-1)
  b0, b1, b2, b3 = tf.unstack(boxes_b, axis=-1)
  return tf.maximum(tf.maximum(a2, b2) - tf.minimum(a0, b0), 0.0) * tf.maximum(
      tf.maximum(a3, b3) - tf.minimum(a1, b1), 0.0)


def elementwise_iou(boxes_a, boxes_b):
  """IoU of corresponding corner boxes (both yxyx or both xyxy). [..., 4], [..., 4] -> [...]."""
  _check_last_dim(boxes_a, "boxes_a")
  _check_last_dim(boxes_b, "boxes_b")
  inter, union = _intersection_and_union(tf.convert_to_tensor(boxes_a), tf.convert_to_tensor(boxes_b))
  return tf.math.divide_no_nan(inter, union)


def elementwise_giou(boxes_a, boxes_b):
  """Generalised IoU of corresponding corner boxes. [..., 4], [..., 4] -> [...] in [-1, 1]."""
  _check_last_dim(boxes_a, "boxes_a")
  _check_last_dim(boxes_b, "boxes_b")
  boxes_a = tf.convert_to_tensor(boxes_a)
  boxes_b = tf.convert_to_tensor(boxes_b)
  inter, union = _intersection_and_union(boxes_a, boxes_b)
  enclosing = _enclosing_area(boxes_a, boxes_b)
  return tf.math.divide_no_nan(inter, union) - tf.math.divide_no_nan(enclosing - union, enclosing)


def pairwise_iou(boxes_a, boxes_b):
  """IoU of every pair. [..., N, 4] and [..., M, 4] corner boxes (same format) -> [..., N, M]."""
  _check_last_dim(boxes_a, "boxes_a")
  _check_last_dim(boxes_b, "boxes_b")
  return elementwise_iou(tf.expand_dims(boxes_a, -2), tf.expand_dims(boxes_b, -3))


def pairwise_giou(boxes_a, boxes_b):
  """GIoU of every pair. [..., N, 4] and [..., M, 4] corner boxes (same format) -> [..., N, M]."""
  _check_last_dim(boxes_a, "boxes_a")
  _check_last_dim(boxes_b, "boxes_b")
  return elementwise_giou(tf.expand_dims(boxes_a, -2), tf.expand_dims(boxes_b, -3))


def clip_boxes(boxes, lower=0.0, upper=1.0):
  """Clips every coordinate of [..., 4] boxes to [lower, upper]."""
  _check_last_dim(boxes)
  return tf.clip_by_value(boxes, lower, upper)


def order_corners(boxes):
  """[..., 4] yxyx whose corners may be swapped (e.g. regressed independently) -> [..., 4] yxyx with
  ymin <= ymax and xmin <= xmax."""
  _check_last_dim(boxes)
  ymin, xmin, ymax, xmax = tf.unstack(tf.convert_to_tensor(boxes), axis=-1)
  return tf.stack([tf.minimum(ymin, ymax), tf.minimum(xmin, xmax), tf.maximum(ymin, ymax), tf.maximum(xmin, xmax)],
                  axis=-1)
