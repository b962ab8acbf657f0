"""Training augmentation: random horizontal flip and scale jitter with a random crop or pad to the canvas.

Host-side `tf.data` ops (the resize has a data-dependent size), applied to one decoded example before it is
padded to fixed-size instances. Boxes, classes and masks stay consistent: the same mirror and the same resize and
crop window move the image, the boxes and the label mask, and boxes cut away by the crop are flagged in a `keep`
mask (the pipeline drops them). Randomness is stateless: every op takes a `seed` [2] int tensor, so one example
with one seed always gets the same augmentation whatever the parallelism of the pipeline.

Box format: [N, 4] float32 yxyx. Inputs are normalised to the original image; `random_scale_crop` returns them
normalised to the padded canvas, the convention of `tfreward.data.transforms`.

Ground-truth hygiene: `keep` is False for every box whose clipped canvas height or width is below
`MIN_BOX_EDGE_PIXELS`: boxes the crop cuts away (clipped onto the window edge, extent exactly 0), and boxes that were
degenerate to begin with (zero or negative extent, or a non-finite coordinate), so the training labels never hold such a
box as a target (the pipeline packs them out like padding). `tfreward.data.statistics.degenerate_box_count` counts
the source boxes dropped this way. Evaluation labels keep source boxes as they are (see `tfreward.data.pipeline`):
COCO's evaluation counts a zero-extent object as an object no detection can match, and the evaluator reads its
ground truth from those labels; the losses treat a valid box without positive extent as padding.
"""

import tensorflow as tf

from tfreward.data import transforms
from tfreward.ops import boxes as box_ops

# A clipped box must keep at least this many canvas pixels of height and width to stay a training target. Not 0:
# a sliver of a box the crop almost cuts away (under a hundredth of a pixel) shows nothing of its object. Far below
# any real object, so it never drops a tiny but genuine box.
MIN_BOX_EDGE_PIXELS = 1e-2


def flip_left_right(image, boxes, mask=None):
  """Mirrors an example left-right.

  Args:
    image: [H, W, C] any dtype.
    boxes: [N, 4] float32 yxyx normalised to the image (N may be 0).
    mask: optional [H, W] or [H, W, 1] label mask.

  Returns:
    (image, boxes, mask) mirrored, same shapes and dtypes; `mask` is None when not given.
  """
  ymin, xmin, ymax, xmax = tf.unstack(tf.convert_to_tensor(boxes, tf.float32), num=4, axis=-1)
  flipped_boxes = tf.stack([ymin, 1.0 - xmax, ymax, 1.0 - xmin], axis=-1)
  flipped_mask = None if mask is None else tf.reverse(mask, axis=[1])
  return tf.reverse(image, axis=[1]), flipped_boxes, flipped_mask


def random_horizontal_flip(image, boxes, mask=None, *, seed, probability=0.5):
  """Mirrors the example left-right with `probability`.

  Args:
    image: [H, W, C] any dtype.
    boxes: [N, 4] float32 yxyx normalised to the image.
    mask: optional [H, W] or [H, W, 1] label mask, mirrored together with the image.
    seed: [2] int32/int64 tensor, a stateless random seed.
    probability: float in [0, 1]. Defaults to 0.5.

  Returns:
    (image, boxes, mask) as in `flip_left_right`.
  """
  if not 0.0 <= probability <= 1.0:
    raise ValueError(f"probability must be in [0, 1], got {probability!r}.")
  boxes = tf.convert_to_tensor(boxes, tf.float32)
  do_flip = tf.random.stateless_uniform([], seed=seed) < probability
  flipped = flip_left_right(image, boxes, mask)
  image_out = tf.cond(do_flip, lambda: flipped[0], lambda: image)
  boxes_out = tf.cond(do_flip, lambda: flipped[1], lambda: boxes)
  mask_out = None if mask is None else tf.cond(do_flip, lambda: flipped[2], lambda: mask)
  return image_out, boxes_out, mask_out


def _crop_and_pad(resized, offset_hw, output_hw, pad_value):
  """Crops `resized` [h, w, C] at `offset_hw` to at most `output_hw` and pads bottom/right with `pad_value`."""
  out_h, out_w = output_hw
  window = resized[offset_hw[0]:offset_hw[0] + out_h, offset_hw[1]:offset_hw[1] + out_w]
  crop_hw = tf.shape(window)[:2]
  paddings = [[0, out_h - crop_hw[0]], [0, out_w - crop_hw[1]], [0, 0]]
  padded = tf.pad(window, paddings, constant_values=pad_value)
  return tf.ensure_shape(padded, [out_h, out_w, resized.shape[-1]])


def random_scale_crop(image, boxes, mask=None, *, output_hw, scale_range, seed, mask_pad_value=255):
  """Scale jitter on top of the fit-to-canvas scale, then a random crop (larger) or bottom/right pad (smaller).

  The image is resized by `fit_scale(image_hw, output_hw) * s`, s ~ U(scale_range). Where the result is larger
  than the canvas, a window of the canvas size is cut at a uniformly random offset; where it is smaller, it sits
  in the top-left corner (offset 0) and the rest is padded, as in `transforms.resize_and_pad`.

  Args:
    image: [H, W, 3] uint8 (any real dtype is accepted; the output is uint8 in 0..255).
    boxes: [N, 4] float32 yxyx normalised to the original image (N may be 0).
    mask: optional [H, W] integer label mask, resized with nearest neighbour; the pad area gets `mask_pad_value`.
    output_hw: (int, int). Static canvas height and width.
    scale_range: (float, float), 0 < min <= max. Jitter factor range.
    seed: [2] int32/int64 tensor, a stateless random seed.
    mask_pad_value: int. Label of the padded area. Defaults to 255 (the ignore index).

  Returns:
    image: [out_h, out_w, 3] uint8, zero-padded.
    boxes: [N, 4] float32 yxyx normalised to the canvas, clipped to the crop window (so within [0, 1]).
    keep: [N] bool, False for boxes whose clipped height or width is below `MIN_BOX_EDGE_PIXELS` (cut away, or
      zero-area, inverted or not finite in the input).
    mask: [out_h, out_w] of the mask's dtype, or None when no mask was given.
    scale: float32 scalar, canvas pixels per original pixel.
  """
  out_h, out_w = int(output_hw[0]), int(output_hw[1])
  low, high = float(scale_range[0]), float(scale_range[1])
  if not 0.0 < low <= high:
    raise ValueError(f"scale_range must satisfy 0 < min <= max, got {tuple(scale_range)!r}.")
  scale_seed, offset_seed = tf.unstack(tf.random.experimental.stateless_split(seed, num=2))
  image_hw = tf.shape(image)[:2]
  jitter = tf.random.stateless_uniform([], seed=scale_seed, minval=low, maxval=high)
  scale = transforms.fit_scale(image_hw, (out_h, out_w)) * jitter
  new_hw = tf.maximum(tf.cast(tf.round(tf.cast(image_hw, tf.float32) * scale), tf.int32), 1)  # [2]
  slack = tf.maximum(new_hw - [out_h, out_w], 0)  # [2] pixels that do not fit
  u = tf.random.stateless_uniform([2], seed=offset_seed)
  offset = tf.minimum(tf.cast(tf.floor(u * tf.cast(slack + 1, tf.float32)), tf.int32), slack)  # [2]

  resized = tf.image.resize(image, new_hw, method="bilinear")
  resized = tf.saturate_cast(tf.round(resized), tf.uint8)
  image_out = _crop_and_pad(resized, offset, (out_h, out_w), 0)

  mask_out = None
  if mask is not None:
    resized_mask = tf.image.resize(mask[..., None], new_hw, method="nearest")
    resized_mask = tf.cast(resized_mask, mask.dtype)
    mask_out = _crop_and_pad(resized_mask, offset, (out_h, out_w), tf.cast(mask_pad_value, mask.dtype))[..., 0]

  # Boxes: normalised -> pixels of the resized image -> shift by the crop offset -> clip to the kept window.
  boxes = tf.convert_to_tensor(boxes, tf.float32)
  pixels = box_ops.denormalize_boxes(boxes, new_hw) - tf.cast(tf.concat([offset, offset], 0), tf.float32)
  window_hw = tf.cast(tf.minimum(new_hw - offset, [out_h, out_w]), tf.float32)  # [2] image pixels in the canvas
  pixels = tf.clip_by_value(pixels, 0.0, tf.concat([window_hw, window_hw], 0))
  keep = tf.logical_and(pixels[:, 2] - pixels[:, 0] >= MIN_BOX_EDGE_PIXELS,
                        pixels[:, 3] - pixels[:, 1] >= MIN_BOX_EDGE_PIXELS)  # [N]; False for NaN too
  keep = tf.logical_and(keep, tf.reduce_all(tf.math.is_finite(boxes), axis=-1))  # the clip would hide an inf
  canvas_boxes = box_ops.normalize_boxes(pixels, [out_h, out_w])
  return image_out, canvas_boxes, keep, mask_out, scale
