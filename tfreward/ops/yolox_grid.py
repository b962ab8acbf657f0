"""The YOLOX anchor grid: flattening per-stride head outputs, decoding boxes and encoding L1 targets.

Anchors ("cells") of an image are numbered level by level (strides in the given order), row-major inside a level
(y outer, x inner): cell (y, x) of a level of grid width w has index `offset + y * w + x`. Every anchor has integer
grid coordinates (x_a, y_a) and a stride s_a. Boxes are cxcywh in pixels.

  decoding:      cx = (dx + x_a) * s_a,  cy = (dy + y_a) * s_a,  w = exp(log_w) * s_a,  h = exp(log_h) * s_a
  cell centre:   (x_a * s_a + 0.5 * s_a, y_a * s_a + 0.5 * s_a)   (used for candidate selection only)

All shapes are static when the head outputs have static shapes, so everything here compiles under XLA.
"""

import tensorflow as tf


def _level_hw(output):
  """Static-if-possible grid height and width of one [B, h, w, D] level."""
  if output.shape.rank is not None and output.shape.rank != 4:
    raise ValueError(f"every head output must be [B, h, w, D], got shape {output.shape}.")
  dynamic = tf.shape(output)
  h = output.shape[1] if output.shape[1] is not None else dynamic[1]
  w = output.shape[2] if output.shape[2] is not None else dynamic[2]
  return h, w


def anchor_grid(outputs, strides):
  """Integer grid coordinates and strides of every anchor of one image.

  Args:
    outputs: list of L tensors [B, h_l, w_l, D], one per level (only their grid sizes are used).
    strides: sequence of L positive ints, the stride of each level.

  Returns:
    grid_xy: [A, 2] float32, (x_a, y_a) grid coordinates; A = sum over levels of h_l * w_l.
    anchor_strides: [A] float32, s_a.
  """
  if len(outputs) != len(strides):
    raise ValueError(f"got {len(outputs)} head outputs but {len(strides)} strides {tuple(strides)}.")
  grids, level_strides = [], []
  for output, stride in zip(outputs, strides):
    if int(stride) <= 0:
      raise ValueError(f"strides must be positive, got {tuple(strides)}.")
    h, w = _level_hw(output)
    ys, xs = tf.meshgrid(tf.range(h), tf.range(w), indexing="ij")  # [h, w] each
    grid = tf.reshape(tf.stack([xs, ys], axis=-1), [-1, 2])  # [h * w, 2]
    grids.append(tf.cast(grid, tf.float32))
    level_strides.append(tf.fill([tf.shape(grid)[0]], float(stride)))
  return tf.concat(grids, axis=0), tf.concat(level_strides, axis=0)


def static_level_sizes(outputs):
  """((h_l, w_l), ...) of the levels when every grid size is static, else None (for `simota.simota_assign`)."""
  sizes = []
  for output in outputs:
    h, w = _level_hw(output)
    if not isinstance(h, int) or not isinstance(w, int):
      return None
    sizes.append((h, w))
  return tuple(sizes)


def flatten_levels(outputs):
  """Concatenates per-level head outputs in anchor order. L x [B, h_l, w_l, D] -> [B, A, D] (dtype kept)."""
  flat = []
  for output in outputs:
    output = tf.convert_to_tensor(output)
    _level_hw(output)
    flat.append(tf.reshape(output, [tf.shape(output)[0], -1, output.shape[-1] or tf.shape(output)[-1]]))
  return tf.concat(flat, axis=1)


def cell_centers(grid_xy, anchor_strides):
  """Pixel centres of the cells. [A, 2] float32, [A] float32 -> [A, 2] float32 (x, y)."""
  s = anchor_strides[:, None]
  return grid_xy * s + 0.5 * s


def decode_boxes(raw_boxes, grid_xy, anchor_strides):
  """Raw box outputs -> predicted boxes.

  Args:
    raw_boxes: [B, A, 4] float, (dx, dy, log_w, log_h).
    grid_xy: [A, 2] float32, (x_a, y_a).
    anchor_strides: [A] float32.

  Returns:
    [B, A, 4] in the dtype of `raw_boxes`, cxcywh in pixels.
  """
  s = tf.cast(anchor_strides[:, None], raw_boxes.dtype)  # [A, 1]
  centers = (raw_boxes[..., :2] + tf.cast(grid_xy, raw_boxes.dtype)) * s
  sizes = tf.exp(raw_boxes[..., 2:]) * s
  return tf.concat([centers, sizes], axis=-1)


def encode_l1_targets(boxes, grid_xy, anchor_strides, eps=1e-8):
  """Inverse of `decode_boxes`: the raw outputs that would decode to `boxes` (the YOLOX L1 targets).

  Args:
    boxes: [B, A, 4] float32, cxcywh in pixels (the box matched to each anchor). Sizes below 0 count as 0.
    grid_xy: [A, 2] float32.
    anchor_strides: [A] float32.
    eps: float. Added inside the logarithm, so a zero size gives ln(eps). Defaults to 1e-8.

  Returns:
    [B, A, 4] float32, (gcx / s - x_a, gcy / s - y_a, ln(gw / s + eps), ln(gh / s + eps)).
  """
  s = anchor_strides[:, None]  # [A, 1]
  offsets = boxes[..., :2] / s - grid_xy
  log_sizes = tf.math.log(tf.maximum(boxes[..., 2:], 0.0) / s + eps)
  return tf.concat([offsets, log_sizes], axis=-1)
