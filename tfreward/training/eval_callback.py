"""Keras callbacks that evaluate a model on a host dataset every few epochs: COCO box mAP and segmentation mIoU.

Both run the model's inference method (`detect` / `segment`) as a `tf.function` (XLA by default) on every batch of a
finite, non-distributed evaluation dataset of `(images, labels)` (see the data contract in DESIGN.md), accumulate on
the host, and write prefixed metrics into the epoch `logs` (e.g. `logs["val_mAP"]`). Keras runs user callbacks before
its progress bar and History, so the values show in the progress bar and `history.history`, and callbacks listed
after this one (TensorBoard, ModelCheckpoint(monitor="val_mAP", mode="max"), EarlyStopping) can use them.
"""

import keras
import numpy as np
import tensorflow as tf

from tfreward.errors import check_int
from tfreward.models.divergence import NonFiniteError, check_finite_weights
from tfreward.training import coco_eval
from tfreward.training import metrics


def _check_dataset(dataset):
  if isinstance(dataset, tf.data.Dataset):
    cardinality = int(dataset.cardinality())
    if cardinality == int(tf.data.INFINITE_CARDINALITY):
      raise ValueError(f"the evaluation dataset must be finite, got an infinite dataset {dataset!r}.")
    return cardinality if cardinality >= 0 else None
  if not hasattr(dataset, "__iter__"):
    raise ValueError(f"dataset must be a tf.data.Dataset or an iterable of (images, labels), got {dataset!r}.")
  return len(dataset) if hasattr(dataset, "__len__") else None


class _EvalCallback(keras.callbacks.Callback):
  """Shared scheduling, compiled-function cache and progress bar."""

  _method = None  # name of the model's inference method

  def __init__(self, dataset, *, every_n_epochs, prefix, jit_compile, verbose):
    super().__init__()
    check_int("every_n_epochs", every_n_epochs)
    if not isinstance(prefix, str):
      raise ValueError(f"prefix must be a str, got {prefix!r}.")
    if verbose not in (0, 1):
      raise ValueError(f"verbose must be 0 or 1, got {verbose!r}.")
    self._num_batches = _check_dataset(dataset)
    self.dataset = dataset
    self.every_n_epochs = every_n_epochs
    self.prefix = prefix
    self.jit_compile = bool(jit_compile)
    self.verbose = verbose
    self._fn_model = None
    self._fn = None
    self.last_results = {}  # metrics of the latest evaluation, without the prefix
    self._evaluated_epoch = None
    self._epoch = None

  def _inference_fn(self, model):
    """The model's inference method wrapped in a tf.function, built once per model (one trace per input shape)."""
    if not hasattr(model, self._method) or not hasattr(model, "image_size"):
      raise ValueError(f"model must have `image_size` and a `{self._method}(images)` method, got {model!r}.")
    if isinstance(model, keras.Model):
      check_finite_weights(model, "evaluate")
    if self._fn_model is not model:
      method = getattr(model, self._method)
      self._fn = tf.function(lambda images: method(images), jit_compile=self.jit_compile)
      self._fn_model = model
    return self._fn

  def _batches(self):
    progbar = keras.utils.Progbar(self._num_batches, unit_name="batch") if self.verbose else None
    for step, batch in enumerate(self.dataset):
      if not isinstance(batch, (tuple, list)) or len(batch) != 2:
        raise ValueError(f"evaluation batches must be (images, labels) pairs, got {type(batch).__name__}.")
      yield batch
      if progbar is not None:
        progbar.update(step + 1)

  def evaluate(self, model):
    raise NotImplementedError

  def on_epoch_end(self, epoch, logs=None):
    self._epoch = epoch
    if (epoch + 1) % self.every_n_epochs:
      return
    self.last_results = dict(self.evaluate(self.model))
    self._evaluated_epoch = epoch
    if logs is not None:
      logs.update({self.prefix + name: value for name, value in self.last_results.items()})

  def on_train_end(self, logs=None):
    """Evaluates the final weights when the last epoch was not an evaluation epoch."""
    if self._epoch is not None and self._evaluated_epoch != self._epoch:
      self.last_results = dict(self.evaluate(self.model))
      self._evaluated_epoch = self._epoch


class CocoEvalCallback(_EvalCallback):
  """COCO box mAP on a host dataset at the end of every `every_n_epochs`-th epoch.

  Args:
    dataset: finite `tf.data.Dataset` (or iterable) of `(images, labels)`: `images` uint8 [B, H, W, 3] at the model's
      `image_size`; `labels` the detection dict of the data contract (`boxes`, `classes`, `valid`, `crowd`,
      `image_id`, `image_hw`, `scale`, `example_valid`).
    every_n_epochs: int. Evaluate after epochs n, 2n, ... Defaults to 1.
    class_names: optional sequence of str (one per class) for `per_class_ap()`. Defaults to None.
    num_classes: optional int, checked against the classes seen. Defaults to None.
    prefix: str. Prefix of the log keys. Defaults to "val_" (`val_mAP`, `val_mAP50`, ... see `coco_eval`).
    jit_compile: bool. Compile `detect` with XLA. Defaults to True.
    verbose: 0 or 1. Show a progress bar while evaluating. Defaults to 1.
  """

  _method = "detect"

  def __init__(self, dataset, *, every_n_epochs=1, class_names=None, num_classes=None, prefix="val_",
               jit_compile=True, verbose=1):
    super().__init__(dataset, every_n_epochs=every_n_epochs, prefix=prefix, jit_compile=jit_compile,
                     verbose=verbose)
    self.class_names = None if class_names is None else list(class_names)
    self.num_classes = num_classes
    self.evaluator = None

  def evaluate(self, model):
    """Runs `model.detect` over the dataset; returns the unprefixed metrics dict of `CocoDetectionEvaluator`."""
    detect = self._inference_fn(model)
    self.evaluator = coco_eval.CocoDetectionEvaluator(
        image_size=tuple(model.image_size), num_classes=self.num_classes, class_names=self.class_names)
    for step, (images, labels) in enumerate(self._batches()):
      detections = detect(images)
      for key in ("boxes", "scores"):
        if not np.all(np.isfinite(detections[key])):
          raise NonFiniteError(f"refusing to score detections with NaN or Inf {key} (evaluation batch {step}): the "
                               "model's outputs are non-finite; its run diverged or its inputs are broken.")
      self.evaluator.update(detections, labels)
    return self.evaluator.result()

  def per_class_ap(self):
    """Per-class AP of the last evaluation (see `CocoDetectionEvaluator.per_class_ap`)."""
    return {} if self.evaluator is None else self.evaluator.per_class_ap()


class SegmentationEvalCallback(_EvalCallback):
  """Mean IoU (`StreamingMeanIoU`) on a host dataset at the end of every `every_n_epochs`-th epoch.

  The IoU is computed at the canvas resolution of the labels (the pipeline marks the padded canvas with
  `ignore_index`); examples with `example_valid` False count with weight 0. Counts accumulate in float64.

  Args:
    dataset: finite `tf.data.Dataset` (or iterable) of `(images, labels)`: `images` uint8 [B, H, W, 3];
      `labels` dict with `mask` int32 [B, H, W] (`ignore_index` = ignore) and optional `example_valid` bool [B].
    num_classes: int. Number of classes.
    every_n_epochs: int. Defaults to 1.
    ignore_index: int. Defaults to 255.
    prefix: str. Defaults to "val_" (logs `val_mIoU`).
    jit_compile: bool. Compile `segment` with XLA. Defaults to True.
    verbose: 0 or 1. Defaults to 1.
    class_names: optional sequence of `num_classes` str for `per_class_iou()`. Defaults to "0", "1", ...
  """

  _method = "segment"

  def __init__(self, dataset, *, num_classes, every_n_epochs=1, ignore_index=255, prefix="val_", jit_compile=True,
               verbose=1, class_names=None):
    super().__init__(dataset, every_n_epochs=every_n_epochs, prefix=prefix, jit_compile=jit_compile,
                     verbose=verbose)
    # Validates num_classes and ignore_index now rather than after the first epoch.
    metrics.StreamingMeanIoU(num_classes, ignore_index=ignore_index)
    self.num_classes = num_classes
    self.ignore_index = ignore_index
    self.class_names = tuple(str(i) for i in range(num_classes)) if class_names is None else tuple(class_names)
    if len(self.class_names) != num_classes:
      raise ValueError(f"class_names must name the {num_classes} classes, got {len(self.class_names)} names.")
    self.metric = None

  def evaluate(self, model):
    """Runs `model.segment` over the dataset; returns {"mIoU": float}. `self.metric` keeps the counts."""
    segment = self._inference_fn(model)
    self.metric = metrics.StreamingMeanIoU(
        self.num_classes, ignore_index=self.ignore_index, accumulator_dtype="float64", name="mIoU")
    for images, labels in self._batches():
      if "mask" not in labels:
        raise ValueError(f"segmentation labels need a 'mask'; got keys {sorted(labels)}.")
      predicted = segment(images)["labels"]
      weight = labels.get("example_valid")
      weight = None if weight is None else np.asarray(weight).astype(np.float32)
      self.metric.update_state(labels["mask"], predicted, sample_weight=weight)
    return {"mIoU": float(self.metric.result())}

  def per_class_iou(self):
    """IoU of each class in the last evaluation: dict class name -> float (NaN for a class absent from both the
    labels and the predictions); {} before any evaluation."""
    if self.metric is None:
      return {}
    iou = self.metric.per_class_iou().numpy()
    present = self.metric.class_present().numpy()
    return {name: float(v) if p else float("nan") for name, v, p in zip(self.class_names, iou, present)}
