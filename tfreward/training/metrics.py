"""Streaming mean IoU for semantic segmentation: a confusion matrix accumulated over batches.

The update is XLA-compilable (static shapes, one `tf.math.unsorted_segment_sum` with a static segment count, no
`bincount`), so it can run inside a jit-compiled eval step, on a TPU, or per replica under a distribution strategy
(the counts are sum-aggregated on read).
"""

import keras
import tensorflow as tf

from tfreward.errors import check_int

_ACCUMULATOR_DTYPES = ("float32", "float64", "int64")


class StreamingMeanIoU(keras.metrics.Metric):
  """Mean intersection-over-union over the classes present, accumulated over every batch since the last reset.

  For every pixel whose ground truth is a class in [0, num_classes) the metric counts (true class, predicted class),
  times its weight. Pixels whose ground truth is `ignore_index` (or any other value outside [0, num_classes)) are
  dropped whatever the prediction. A prediction outside [0, num_classes) at a counted pixel is a miss for the true
  class (it adds to that class's union, not to any other class).

  Per class c: IoU_c = TP_c / (GT_c + PRED_c - TP_c). `result()` is the mean of IoU_c over the classes whose union is
  positive (classes absent from both the counted ground truth and the predictions are left out), and 0.0 when no
  class is present yet (nothing counted), so the value is never NaN.

  Args:
    num_classes: int. Number of classes C (>= 1).
    ignore_index: int. Ground-truth value to ignore; must lie outside [0, num_classes). Defaults to 255.
    accumulator_dtype: str. dtype of the counts: "float32" (TPU-safe; exact while every cell stays below 2**24
      weighted pixels), "float64" (exact counts of any realistic size, CPU/GPU) or "int64" (integer weights; each
      batch's weighted counts are rounded). Defaults to "float32".
    name: str. Defaults to "mean_iou".
    dtype: result dtype. Defaults to float32.
  """

  def __init__(self, num_classes, *, ignore_index=255, accumulator_dtype="float32", name="mean_iou", dtype=None):
    super().__init__(name=name, dtype=dtype)
    check_int("num_classes", num_classes)
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int) or 0 <= ignore_index < num_classes:
      raise ValueError(
          f"ignore_index must be an int outside [0, num_classes={num_classes}), got {ignore_index!r}.")
    if accumulator_dtype not in _ACCUMULATOR_DTYPES:
      raise ValueError(f"accumulator_dtype must be one of {_ACCUMULATOR_DTYPES}, got {accumulator_dtype!r}.")
    self.num_classes = num_classes
    self.ignore_index = ignore_index
    self.accumulator_dtype = accumulator_dtype
    # Rows: ground-truth class. Columns: predicted class, plus a last column for out-of-range predictions.
    self.counts = self.add_variable(
        shape=(num_classes, num_classes + 1), initializer="zeros", dtype=accumulator_dtype, name="counts")

  def update_state(self, y_true, y_pred, sample_weight=None):
    """Adds one batch of label maps.

    Args:
      y_true: [B, H, W] (any shape) integer ground-truth labels; `ignore_index` marks pixels to skip.
      y_pred: integer predicted labels of the same shape as `y_true`.
      sample_weight: optional float or integer weights broadcastable to `y_true` after appending trailing axes:
        a scalar, [B] (per example, e.g. 0.0 for padding examples) or [B, H, W] (per pixel).
    """
    y_true = tf.convert_to_tensor(y_true)
    y_pred = tf.convert_to_tensor(y_pred)
    if y_true.shape.rank is None:
      raise ValueError(f"y_true must have a static rank, got shape {y_true.shape}.")
    if not y_true.shape.is_compatible_with(y_pred.shape):
      raise ValueError(f"y_true and y_pred must have the same shape, got {y_true.shape} and {y_pred.shape}.")
    if sample_weight is None:
      weight = tf.ones_like(y_true, tf.float32)
    else:
      weight = tf.cast(tf.convert_to_tensor(sample_weight), tf.float32)
      if weight.shape.rank is None or weight.shape.rank > y_true.shape.rank:
        raise ValueError(
            f"sample_weight must have a static rank <= that of y_true {y_true.shape}, got shape {weight.shape}.")
      for _ in range(y_true.shape.rank - weight.shape.rank):
        weight = tf.expand_dims(weight, -1)
      weight = tf.broadcast_to(weight, tf.shape(y_true))
    c = self.num_classes
    y_true = tf.reshape(tf.cast(y_true, tf.int32), [-1])
    y_pred = tf.reshape(tf.cast(y_pred, tf.int32), [-1])
    weight = tf.reshape(weight, [-1])
    counted = (y_true >= 0) & (y_true < c)  # drops ignore_index and any other out-of-range label
    weight = tf.where(counted, weight, 0.0)
    row = tf.where(counted, y_true, 0)
    col = tf.where((y_pred >= 0) & (y_pred < c), y_pred, c)  # out-of-range prediction: last column, a miss
    batch_counts = tf.math.unsorted_segment_sum(weight, row * (c + 1) + col, c * (c + 1))
    batch_counts = tf.reshape(batch_counts, [c, c + 1])
    if self.accumulator_dtype == "int64":
      batch_counts = tf.round(batch_counts)
    self.counts.assign_add(tf.cast(batch_counts, self.accumulator_dtype))

  def _iou_and_present(self):
    compute_dtype = tf.float64 if self.accumulator_dtype == "float64" else tf.float32
    counts = tf.cast(tf.convert_to_tensor(self.counts), compute_dtype)  # [C, C + 1]
    confusion = counts[:, :-1]  # [C, C]
    tp = tf.linalg.diag_part(confusion)
    union = tf.reduce_sum(counts, axis=1) + tf.reduce_sum(confusion, axis=0) - tp
    present = union > 0
    return tf.math.divide_no_nan(tp, union), present

  def result(self):
    """Mean IoU over the classes present: float scalar; 0.0 when nothing has been counted."""
    iou, present = self._iou_and_present()
    total = tf.reduce_sum(tf.where(present, iou, tf.zeros_like(iou)))
    num_present = tf.reduce_sum(tf.cast(present, iou.dtype))
    return tf.cast(tf.math.divide_no_nan(total, num_present), self.dtype)

  def per_class_iou(self):
    """[C] float IoU of every class; 0.0 for a class absent so far (see `class_present`)."""
    iou, _ = self._iou_and_present()
    return tf.cast(iou, self.dtype)

  def class_present(self):
    """[C] bool: whether the class has a positive union (appeared in the ground truth or the predictions)."""
    return self._iou_and_present()[1]

  def confusion_matrix(self):
    """[C, C] counts (accumulator dtype): rows ground truth, columns prediction (out-of-range predictions left out)."""
    return tf.convert_to_tensor(self.counts)[:, :-1]

  def get_config(self):
    return {
        "num_classes": self.num_classes,
        "ignore_index": self.ignore_index,
        "accumulator_dtype": self.accumulator_dtype,
        "name": self.name,
        "dtype": self.dtype,
    }
