"""Geometry shared by the input pipelines and the serving signatures.

An image is resized, keeping its aspect ratio, to fit inside the model's input size and placed in the top-left
corner of a zero canvas of exactly that size. Boxes normalised to the padded canvas map back to the original
image's pixels with `canvas_boxes_to_original_pixels`.
"""

import tensorflow as tf


def fit_scale(image_hw, output_hw):
  """Scale that makes an image of `image_hw` fit inside `output_hw`. Returns a float32 scalar (new / old)."""
  image_hw = tf.cast(image_hw, tf.float32)
  output_hw = tf.cast(tf.convert_to_tensor(output_hw), tf.float32)
  return tf.reduce_min(tf.math.divide_no_nan(output_hw, tf.maximum(image_hw, 1.0)))


def resize_and_pad(image, output_hw, scale=None, method="bilinear"):
  """Resizes one image by `scale` (default: fit inside) and pads it bottom/right to `output_hw`.

  Args:
    image: [H, W, C] any real dtype.
    output_hw: (int, int). Static output height and width.
    scale: optional float32 scalar; defaults to `fit_scale`. Content beyond the canvas is cropped.
    method: str. A `tf.image.ResizeMethod` name; use "nearest" for label masks.

  Returns:
    image: [out_h, out_w, C] float32 (or the input dtype for "nearest").
    scale: float32 scalar, resized size / original size.
  """
  out_h, out_w = int(output_hw[0]), int(output_hw[1])
  image_hw = tf.shape(image)[:2]
  if scale is None:
    scale = fit_scale(image_hw, (out_h, out_w))
  new_hw = tf.maximum(tf.cast(tf.round(tf.cast(image_hw, tf.float32) * scale), tf.int32), 1)
  resized = tf.image.resize(image, new_hw, method=method)
  if method == "nearest":
    resized = tf.cast(resized, image.dtype)
  resized = resized[:out_h, :out_w]
  padded = tf.image.pad_to_bounding_box(resized, 0, 0, out_h, out_w)
  return padded, tf.cast(scale, tf.float32)


def original_boxes_to_canvas(boxes_yxyx, image_hw, scale, output_hw):
  """Boxes normalised to the original image -> normalised to the padded canvas. [..., 4] yxyx."""
  image_hw = tf.cast(image_hw, tf.float32)
  output_hw = tf.cast(tf.convert_to_tensor(output_hw), tf.float32)
  factor = image_hw * scale / output_hw  # [2]
  return boxes_yxyx * tf.concat([factor, factor], axis=-1)


def canvas_boxes_to_original_pixels(boxes_yxyx, scale, output_hw, image_hw=None):
  """Boxes normalised to the padded canvas -> pixels of the original image, optionally clipped to it.

  Args:
    boxes_yxyx: [B, K, 4] float32, normalised to the canvas.
    scale: [B] float32, resized size / original size.
    output_hw: (int, int) canvas size.
    image_hw: optional [B, 2] original size, to clip the boxes to the image.
  Returns:
    [B, K, 4] float32 yxyx pixels of the original image.
  """
  output_hw = tf.cast(tf.convert_to_tensor(output_hw), tf.float32)
  pixels = boxes_yxyx * tf.concat([output_hw, output_hw], axis=-1)
  pixels = tf.math.divide_no_nan(pixels, tf.reshape(tf.cast(scale, tf.float32), [-1, 1, 1]))
  if image_hw is not None:
    hw = tf.cast(image_hw, tf.float32)[:, None, :]
    upper = tf.concat([hw, hw], axis=-1)
    pixels = tf.clip_by_value(pixels, 0.0, upper)
  return pixels
