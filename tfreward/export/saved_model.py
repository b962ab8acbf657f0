"""SavedModel export with serving signatures that take raw images of any size and answer in original pixels.

Signatures (B = batch size; every image is resized keeping its aspect ratio and padded to the model's `image_size`
with `transforms.resize_and_pad`, exactly like the input pipelines):

  serving_default == serve_encoded(encoded_images: tf.string [B])   JPEG / PNG / GIF / BMP bytes, any sizes.
  serve_images(images: tf.uint8 [B, H, W, 3])                       one batch of same-size images, any size.

Detection models (with `detect`) output
  boxes:          float32 [B, K, 4] yxyx pixels of each ORIGINAL image, clipped to it;
  scores:         float32 [B, K];
  classes:        int32 [B, K], 0-based;
  num_detections: int32 [B]; entries at and beyond it are padding (boxes 0, scores 0, classes -1);
  image_hw:       int32 [B, 2] original height and width.
Segmentation models (with `segment`) output
  labels:   int32 [B, H_max, W_max]: each image's label map at its ORIGINAL size (nearest-neighbour from the canvas),
            in the top-left corner, padded with -1 up to the largest height / width in the batch. With
            `serve_images` (same-size batch) there is no padding: [B, H, W].
  image_hw: int32 [B, 2] original sizes (crop `labels[b, :h, :w]`).

The exported graph needs only TensorFlow to load and run (`tf.saved_model.load(path).signatures[...]`).
With `class_names`, the loaded object also carries `class_names` (tf.string [K]) and `category_ids` (int32 [K], the
dataset's category id of each 0-based class: COCO's own ids, else class + 1) as variables, for `tfreward predict`.
"""

import tensorflow as tf

from tfreward.config import TASKS
from tfreward.data import transforms



def _infer_task(model, task):
  if task is not None:
    if task not in TASKS:
      raise ValueError(f"task must be one of {TASKS} or None, got {task!r}.")
    return task
  found = [t for t, method in zip(TASKS, ("detect", "segment")) if callable(getattr(model, method, None))]
  if len(found) != 1:
    raise ValueError(
        f"cannot tell the task of {model!r}: it must have exactly one of detect() and segment() (found {found}); "
        "pass task='detection' or task='segmentation'.")
  return found[0]


def _check_image_size(model):
  size = getattr(model, "image_size", None)
  ok = (isinstance(size, (tuple, list)) and len(size) == 2
        and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in size))
  if not ok:
    raise ValueError(f"model.image_size must be a (height, width) pair of positive ints, got {size!r}.")
  return int(size[0]), int(size[1])


class _Preprocessor:
  """Raw images -> canvases [B, H, W, 3] float32, scales [B] float32 and original sizes [B, 2] int32."""

  def __init__(self, image_size, max_image_size):
    self.image_size = image_size
    self.max_image_size = max_image_size

  def _one(self, image):
    """[h, w, 3] uint8 -> canvas, scale, image_hw, after the size check."""
    image_hw = tf.shape(image)[:2]
    checks = [tf.debugging.assert_positive(image_hw, message="empty image")]
    if self.max_image_size is not None:
      checks.append(tf.debugging.assert_less_equal(
          image_hw, self.max_image_size, message=f"image larger than max_image_size={self.max_image_size}"))
    with tf.control_dependencies(checks):
      canvas, scale = transforms.resize_and_pad(image, self.image_size)
    canvas = tf.ensure_shape(canvas, [*self.image_size, 3])
    return canvas, scale, image_hw

  def _map(self, fn, elems):
    spec = (tf.TensorSpec([*self.image_size, 3], tf.float32), tf.TensorSpec([], tf.float32),
            tf.TensorSpec([2], tf.int32))
    return tf.map_fn(fn, elems, fn_output_signature=spec)

  def from_encoded(self, encoded_images):
    def decode(encoded):
      image = tf.io.decode_image(encoded, channels=3, dtype=tf.uint8, expand_animations=False)
      return self._one(image)
    return self._map(decode, encoded_images)

  def from_images(self, images):
    return self._map(self._one, images)


def _labels_to_original(labels, scale, image_hw, image_size):
  """Canvas label maps -> each image's original size (nearest neighbour), padded with -1 to the batch maximum.

  Args:
    labels: [B, H, W] int32 canvas labels.
    scale: [B] float32 resized / original size.
    image_hw: [B, 2] int32 original sizes.
    image_size: (int, int) canvas size (H, W).
  Returns:
    [B, H_max, W_max] int32.
  """
  labels = tf.cast(labels, tf.int32)
  out_h = tf.reduce_max(tf.concat([image_hw[:, 0], [0]], 0))
  out_w = tf.reduce_max(tf.concat([image_hw[:, 1], [0]], 0))
  image_hw_f = tf.cast(image_hw, tf.float32)
  # Size of the resized image inside the canvas, as in `transforms.resize_and_pad`.
  resized_hw = tf.maximum(tf.round(image_hw_f * scale[:, None]), 1.0)  # [B, 2]

  def source_index(out_size, axis):
    """[B, out_size] int32 canvas row (axis 0) / column (axis 1) sampled by each original pixel centre."""
    pos = tf.cast(tf.range(out_size), tf.float32)[None, :] + 0.5  # [1, out]
    src = tf.floor(pos * resized_hw[:, axis:axis + 1] / tf.maximum(image_hw_f[:, axis:axis + 1], 1.0))
    limit = tf.minimum(resized_hw[:, axis:axis + 1], float(image_size[axis])) - 1.0
    return tf.cast(tf.clip_by_value(src, 0.0, tf.maximum(limit, 0.0)), tf.int32)

  rows = source_index(out_h, 0)  # [B, out_h]
  cols = source_index(out_w, 1)  # [B, out_w]
  gathered = tf.gather(labels, rows, axis=1, batch_dims=1)  # [B, out_h, W]
  gathered = tf.gather(gathered, cols, axis=2, batch_dims=1)  # [B, out_h, out_w]
  inside = ((tf.range(out_h)[None, :, None] < image_hw[:, 0, None, None])
            & (tf.range(out_w)[None, None, :] < image_hw[:, 1, None, None]))  # [B, out_h, out_w]
  return tf.where(inside, gathered, -1)


def _detection_outputs(model, image_size, canvases, scales, image_hw):
  detections = model.detect(canvases)
  boxes = tf.cast(detections["boxes"], tf.float32)  # [B, K, 4]
  num = tf.cast(detections["num_detections"], tf.int32)  # [B]
  keep = tf.range(tf.shape(boxes)[1])[None, :] < num[:, None]  # [B, K]
  boxes = transforms.canvas_boxes_to_original_pixels(boxes, scales, image_size, image_hw)
  return {
      "boxes": tf.where(keep[..., None], boxes, 0.0),
      "scores": tf.where(keep, tf.cast(detections["scores"], tf.float32), 0.0),
      "classes": tf.where(keep, tf.cast(detections["classes"], tf.int32), -1),
      "num_detections": num,
      "image_hw": image_hw,
  }


def _segmentation_outputs(model, image_size, canvases, scales, image_hw):
  labels = model.segment(canvases)["labels"]  # [B, H, W]
  return {"labels": _labels_to_original(labels, scales, image_hw, image_size), "image_hw": image_hw}


def export_saved_model(model, export_dir, *, max_image_size=None, task=None, class_names=None, category_ids=None):
  """Writes `model` as a SavedModel with the `serving_default`, `serve_encoded` and `serve_images` signatures.

  Args:
    model: keras.Model with `image_size` (H, W) and either `detect(images)` (detection) or `segment(images)`
      (segmentation), taking float32 [B, H, W, 3] images in 0..255 (see the module docstring for the outputs).
    export_dir: str or path-like. Output directory.
    max_image_size: optional int. Largest accepted height or width of an input image; a larger one fails the call
      with InvalidArgumentError (bounds the memory an untrusted request can take). Defaults to None (no limit).
    task: optional "detection" or "segmentation"; inferred from the model's methods by default.
    class_names: optional sequence of str, the name of each 0-based class (of each label value for segmentation).
    category_ids: optional sequence of int, one per class name (defaults to class + 1).

  Returns:
    The `tf.Module` that was saved.
  """
  task = _infer_task(model, task)
  image_size = _check_image_size(model)
  if max_image_size is not None and (isinstance(max_image_size, bool) or not isinstance(max_image_size, int)
                                     or max_image_size < 1):
    raise ValueError(f"max_image_size must be a positive int or None, got {max_image_size!r}.")
  preprocess = _Preprocessor(image_size, max_image_size)
  outputs = _detection_outputs if task == "detection" else _segmentation_outputs

  def serve_encoded(encoded_images):
    return outputs(model, image_size, *preprocess.from_encoded(encoded_images))

  def serve_images(images):
    return outputs(model, image_size, *preprocess.from_images(images))

  module = tf.Module()
  # As keras.export.ExportArchive does: the variables in lists on the saved object, the Keras model itself untracked.
  module.model_variables = list(model.variables)
  if class_names is not None:
    class_names = [str(name) for name in class_names]
    category_ids = list(range(1, len(class_names) + 1)) if category_ids is None else [int(i) for i in category_ids]
    if len(category_ids) != len(class_names):
      raise ValueError(f"category_ids needs one id per class name: {len(category_ids)} ids, {len(class_names)} names.")
    module.class_names = tf.Variable(class_names, dtype=tf.string, trainable=False, name="class_names")
    module.category_ids = tf.Variable(category_ids, dtype=tf.int32, trainable=False, name="category_ids")
  module.serve_encoded = tf.function(
      serve_encoded, input_signature=[tf.TensorSpec([None], tf.string, name="encoded_images")])
  module.serve_images = tf.function(
      serve_images, input_signature=[tf.TensorSpec([None, None, None, 3], tf.uint8, name="images")])
  encoded = module.serve_encoded.get_concrete_function()
  signatures = {"serving_default": encoded, "serve_encoded": encoded,
                "serve_images": module.serve_images.get_concrete_function()}
  tf.saved_model.save(module, str(export_dir), signatures=signatures)
  return module
