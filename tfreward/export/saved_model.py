"""SavedModel export with serving signatures that take raw images of any size and answer in original pixels.

Signatures (B = batch size; every image is resized keeping its aspect ratio and padded to the model's `image_size`
with `transforms.resize_and_pad`, exactly like the input pipelines):

  serving_default == serve_encoded(encoded_images: tf.string [B])   JPEG / PNG / GIF / BMP / WebP bytes, any sizes.
  serve_images(images: tf.uint8 [B, H, W, 3])                       one batch of same-size images, any size.

`serve_encoded` decodes each image on its own (`decode.decode_bounded`): an image that is empty, corrupt, truncated,
of another format, or larger than `max_decoded_side` on a side by its header (checked before decoding) gets
`valid_image` False, no detections or an all -1 label map, and size (0, 0); the other images of the batch are
answered as if they came alone.

Detection models (with `detect`) output
  boxes:          float32 [B, K, 4] yxyx pixels of each ORIGINAL image, clipped to it;
  scores:         float32 [B, K];
  classes:        int32 [B, K], 0-based;
  num_detections: int32 [B]; entries at and beyond it are padding (boxes 0, scores 0, classes -1); 0 for an invalid
                  image;
  image_hw:       int32 [B, 2] original height and width; (0, 0) for an invalid image;
  valid_image:    bool [B]; always True with `serve_images`.
Segmentation models (with `segment`) output
  labels:      int32 [B, H_max, W_max]: each image's label map at its ORIGINAL size (nearest-neighbour from the
               canvas), in the top-left corner, padded with -1 up to the largest height / width of the valid images
               in the batch (all -1 for an invalid image). With `serve_images` (same-size batch) there is no
               padding: [B, H, W].
  image_hw:    int32 [B, 2] original sizes (crop `labels[b, :h, :w]`); (0, 0) for an invalid image;
  valid_image: bool [B], as for detection.

The exported graph needs only TensorFlow to load and run (`tf.saved_model.load(path).signatures[...]`). The loaded
object carries `max_decoded_side` (int32 [], the bound it was exported with) and, with `class_names`, `class_names`
(tf.string [K]) and `category_ids` (int32 [K], the dataset's category id of each 0-based class: COCO's own ids, else
class + 1) as variables, for `tfreward predict`.
"""

import tensorflow as tf

from tfreward.config import TASKS
from tfreward.data import transforms
from tfreward.errors import check_int
from tfreward.export import decode
from tfreward.models.divergence import check_finite_weights


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
  """Raw images -> canvases [B, H, W, 3] float32, scales [B] float32, original sizes [B, 2] int32, valid [B] bool."""

  def __init__(self, image_size, max_decoded_side):
    self.image_size = image_size
    self.max_decoded_side = max_decoded_side

  def _one(self, image):
    """[h, w, 3] uint8 -> canvas, scale, image_hw."""
    image_hw = tf.shape(image)[:2]
    with tf.control_dependencies([tf.debugging.assert_positive(image_hw, message="empty image")]):
      canvas, scale = transforms.resize_and_pad(image, self.image_size)
    return tf.ensure_shape(canvas, [*self.image_size, 3]), scale, image_hw

  def from_encoded(self, encoded_images):
    """Each image decoded on its own (`decode.decode_bounded`); one that fails gets valid False, a zero canvas, scale
    0 and size (0, 0). A tf.data pipeline drops the failures (`ignore_errors`), the survivors keep their index."""
    batch = tf.shape(encoded_images)[0]

    def one(index, encoded):
      return (index, *self._one(decode.decode_bounded(encoded, self.max_decoded_side)))

    decoded = tf.data.Dataset.from_tensor_slices((tf.range(batch), encoded_images)).map(one).ignore_errors()
    # A sentinel with index B makes the batch non-empty (B = 0, or every image failed); its row is dropped below.
    sentinel = tf.data.Dataset.from_tensors(
        (batch, tf.zeros([*self.image_size, 3]), tf.constant(0.0), tf.zeros([2], tf.int32)))
    options = tf.data.Options()
    options.experimental_optimization.map_parallelization = False  # one decoded image in memory at a time
    index, canvases, scales, image_hw = decoded.concatenate(sentinel).batch(
        tf.cast(batch + 1, tf.int64)).with_options(options).get_single_element()

    def scatter(values):  # survivors' rows -> [B, ...], zeros for the images that failed
      shape = tf.concat([[batch + 1], tf.shape(values)[1:]], 0)
      return tf.scatter_nd(index[:, None], values, shape)[:batch]

    valid = scatter(tf.ones_like(index)) > 0
    return scatter(canvases), scatter(scales), scatter(image_hw), valid

  def from_images(self, images):
    spec = (tf.TensorSpec([*self.image_size, 3], tf.float32), tf.TensorSpec([], tf.float32),
            tf.TensorSpec([2], tf.int32))
    canvases, scales, image_hw = tf.map_fn(self._one, images, fn_output_signature=spec)
    return canvases, scales, image_hw, tf.ones([tf.shape(images)[0]], tf.bool)


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


def _detection_outputs(model, image_size, canvases, scales, image_hw, valid):
  detections = model.detect(canvases)
  boxes = tf.cast(detections["boxes"], tf.float32)  # [B, K, 4]
  num = tf.where(valid, tf.cast(detections["num_detections"], tf.int32), 0)  # [B]
  keep = tf.range(tf.shape(boxes)[1])[None, :] < num[:, None]  # [B, K]
  boxes = transforms.canvas_boxes_to_original_pixels(boxes, scales, image_size, image_hw)
  return {
      "boxes": tf.where(keep[..., None], boxes, 0.0),
      "scores": tf.where(keep, tf.cast(detections["scores"], tf.float32), 0.0),
      "classes": tf.where(keep, tf.cast(detections["classes"], tf.int32), -1),
      "num_detections": num,
      "image_hw": image_hw,
      "valid_image": valid,
  }


def _segmentation_outputs(model, image_size, canvases, scales, image_hw, valid):
  labels = _labels_to_original(model.segment(canvases)["labels"], scales, image_hw, image_size)  # [B, H, W]
  return {"labels": tf.where(valid[:, None, None], labels, -1), "image_hw": image_hw, "valid_image": valid}


def export_saved_model(model, export_dir, *, max_decoded_side=decode.DEFAULT_MAX_DECODED_SIDE, task=None,
                       class_names=None, category_ids=None):
  """Writes `model` as a SavedModel with the `serving_default`, `serve_encoded` and `serve_images` signatures.

  Args:
    model: keras.Model with `image_size` (H, W) and either `detect(images)` (detection) or `segment(images)`
      (segmentation), taking float32 [B, H, W, 3] images in 0..255 (see the module docstring for the outputs). Every
      variable must be finite (a UserError otherwise, before anything is written).
    export_dir: str or path-like. Output directory.
    max_decoded_side: int. Largest height or width, in pixels, of an image `serve_encoded` decodes; a larger one (by
      its header, before decoding) gets `valid_image` False. Bounds the memory one request can take: about
      3 * max_decoded_side**2 bytes per image decoded, one at a time. Defaults to 8192. (`serve_images` takes
      images already decoded by the caller: no bound.)
    task: optional "detection" or "segmentation"; inferred from the model's methods by default.
    class_names: optional sequence of str, the name of each 0-based class (of each label value for segmentation).
    category_ids: optional sequence of int, one per class name (defaults to class + 1).

  Returns:
    The `tf.Module` that was saved.
  """
  task = _infer_task(model, task)
  image_size = _check_image_size(model)
  check_int("max_decoded_side", max_decoded_side)
  check_finite_weights(model, "export")
  preprocess = _Preprocessor(image_size, max_decoded_side)
  outputs = _detection_outputs if task == "detection" else _segmentation_outputs

  def serve_encoded(encoded_images):
    return outputs(model, image_size, *preprocess.from_encoded(encoded_images))

  def serve_images(images):
    return outputs(model, image_size, *preprocess.from_images(images))

  module = tf.Module()
  # As keras.export.ExportArchive does: the variables in lists on the saved object, the Keras model itself untracked.
  module.model_variables = list(model.variables)
  module.max_decoded_side = tf.Variable(max_decoded_side, dtype=tf.int32, trainable=False, name="max_decoded_side")
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
