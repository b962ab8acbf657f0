"""RetinaNet anchors (mmdetection's `AnchorGenerator` with octave scales), in pixel xyxy.

For an image of (H, W) and strides (8, 16, 32, 64, 128):
  * Level 0 has (ceil(H / 8), ceil(W / 8)) cells; every later level has ceil(previous / (stride ratio)) cells,
    which is what a stride-2 3x3 convolution with padding 1 gives (P3..P7 of a RetinaNet FPN).
  * A level of stride s has `len(aspect_ratios) * scales_per_octave` base anchors centred on (0, 0): for ratio
    r = h / w and scale sigma_m = octave_base_scale * 2 ** (m / scales_per_octave), w = s * sigma_m / sqrt(r) and
    h = s * sigma_m * sqrt(r). They are ratio-major: index = ratio_index * scales_per_octave + scale_index.
  * Cell (y, x) shifts the base anchors by (x * s, y * s): centres sit on multiples of the stride (the cell's
    top-left corner), not on cell centres.
  * Order: level, row y, column x, base anchor -- the order of flattening NHWC head outputs [B, h, w, K * C] to
    [B, h * w * K, C] level after level. Anchors outside the image are kept.

The float32 arithmetic follows mmdetection operation by operation, so the anchors are bit-identical to its
generator (checked against the golden vectors in tests/data/freeanchor).
"""

import math

import tensorflow as tf

RETINANET_STRIDES = (8, 16, 32, 64, 128)
RETINANET_ASPECT_RATIOS = (0.5, 1.0, 2.0)


def _check_options(strides, octave_base_scale, scales_per_octave, aspect_ratios):
  strides = tuple(strides)
  if not strides or any(int(s) != s or s <= 0 for s in strides):
    raise ValueError(f"strides must be a non-empty sequence of positive integers, got {strides!r}.")
  if any(b <= a or b % a for a, b in zip(strides, strides[1:])):
    raise ValueError(f"strides must each be an integer multiple (> 1) of the previous one, got {strides!r}.")
  if not octave_base_scale > 0:
    raise ValueError(f"octave_base_scale must be positive, got {octave_base_scale!r}.")
  if int(scales_per_octave) != scales_per_octave or scales_per_octave < 1:
    raise ValueError(f"scales_per_octave must be a positive integer, got {scales_per_octave!r}.")
  aspect_ratios = tuple(aspect_ratios)
  if not aspect_ratios or any(not r > 0 for r in aspect_ratios):
    raise ValueError(f"aspect_ratios must be a non-empty sequence of positive numbers, got {aspect_ratios!r}.")
  return tuple(int(s) for s in strides), aspect_ratios


def feature_map_sizes(image_hw, *, strides=RETINANET_STRIDES):
  """Static feature-map sizes of each level for a (padded) image.

  Args:
    image_hw: (int, int). Image height and width in pixels.
    strides: sequence of int, each an integer multiple of the previous one. Defaults to (8, 16, 32, 64, 128).

  Returns:
    list of (int, int) (height, width) per level: ceil(H / strides[0]) for the first level, then
    ceil(previous / (strides[l] / strides[l - 1])).
  """
  strides, _ = _check_options(strides, 1, 1, (1.0,))
  image_hw = tuple(image_hw)
  if len(image_hw) != 2 or any(int(v) != v or v <= 0 for v in image_hw):
    raise ValueError(f"image_hw must be two positive integers, got {image_hw!r}.")
  h, w = math.ceil(int(image_hw[0]) / strides[0]), math.ceil(int(image_hw[1]) / strides[0])
  sizes = [(h, w)]
  for prev, s in zip(strides, strides[1:]):
    h, w = math.ceil(h / (s // prev)), math.ceil(w / (s // prev))
    sizes.append((h, w))
  return sizes


def num_anchors_per_location(*, scales_per_octave=3, aspect_ratios=RETINANET_ASPECT_RATIOS):
  """Number of base anchors per feature-map cell (9 for RetinaNet)."""
  return int(scales_per_octave) * len(tuple(aspect_ratios))


def base_anchors(stride, *, octave_base_scale=4, scales_per_octave=3, aspect_ratios=RETINANET_ASPECT_RATIOS):
  """Base anchors of one level, centred on (0, 0).

  Args:
    stride: int. The level's stride in pixels (also its base size).
    octave_base_scale: float. Size of the smallest anchor in strides. Defaults to 4.
    scales_per_octave: int. Scales 2 ** (m / scales_per_octave), m < scales_per_octave. Defaults to 3.
    aspect_ratios: sequence of float, h / w. Defaults to (0.5, 1.0, 2.0).

  Returns:
    [len(aspect_ratios) * scales_per_octave, 4] float32 xyxy pixels, ratio-major.
  """
  (stride,), aspect_ratios = _check_options((stride,), octave_base_scale, scales_per_octave, aspect_ratios)
  # Scales in float64, then float32 (as mmdetection's numpy -> torch.Tensor).
  scales = tf.constant([octave_base_scale * 2.0**(m / scales_per_octave) for m in range(int(scales_per_octave))],
                       tf.float32)
  h_ratios = tf.sqrt(tf.constant(aspect_ratios, tf.float32))
  w_ratios = 1.0 / h_ratios
  size = tf.constant(float(stride), tf.float32)
  ws = tf.reshape(size * w_ratios[:, None] * scales[None, :], [-1])  # [R * S]
  hs = tf.reshape(size * h_ratios[:, None] * scales[None, :], [-1])  # [R * S]
  return tf.stack([-(0.5 * ws), -(0.5 * hs), 0.5 * ws, 0.5 * hs], axis=-1)


def grid_anchors(base, feature_hw, stride):
  """Tiles base anchors over a feature map.

  Args:
    base: [K, 4] float32 xyxy base anchors centred on (0, 0).
    feature_hw: (int, int). Feature-map height and width.
    stride: int. Pixels per cell.

  Returns:
    [fh * fw * K, 4] float32 xyxy pixels, ordered row, column, base anchor.
  """
  fh, fw = int(feature_hw[0]), int(feature_hw[1])
  shift_x = tf.range(fw, dtype=tf.float32) * float(stride)  # [fw]
  shift_y = tf.range(fh, dtype=tf.float32) * float(stride)  # [fh]
  yy, xx = tf.meshgrid(shift_y, shift_x, indexing="ij")  # [fh, fw]
  shifts = tf.reshape(tf.stack([xx, yy, xx, yy], axis=-1), [-1, 1, 4])  # [fh * fw, 1, 4]
  return tf.reshape(base[None, :, :] + shifts, [-1, 4])


def retinanet_anchors(image_hw, *, strides=RETINANET_STRIDES, octave_base_scale=4, scales_per_octave=3,
                      aspect_ratios=RETINANET_ASPECT_RATIOS):
  """All anchors of a RetinaNet for a (padded) image size, shared by every image of a batch.

  Args:
    image_hw: (int, int). Static image height and width in pixels.
    strides: sequence of int. Level strides. Defaults to (8, 16, 32, 64, 128) (P3-P7).
    octave_base_scale: float. Defaults to 4.
    scales_per_octave: int. Defaults to 3.
    aspect_ratios: sequence of float, h / w. Defaults to (0.5, 1.0, 2.0).

  Returns:
    [A, 4] float32 xyxy pixels, A = K * sum(fh * fw) with K = len(aspect_ratios) * scales_per_octave; 9 * 341 =
    3069 for 128x128 and 200,700 for 800x1333.
  """
  sizes = feature_map_sizes(image_hw, strides=strides)
  levels = []
  for size, stride in zip(sizes, strides):
    base = base_anchors(stride, octave_base_scale=octave_base_scale, scales_per_octave=scales_per_octave,
                        aspect_ratios=aspect_ratios)
    levels.append(grid_anchors(base, size, stride))
  return tf.concat(levels, axis=0)
