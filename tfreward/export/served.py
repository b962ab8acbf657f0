"""Evaluate an exported SavedModel as it is served: the `serve_images` signature, not the Python model.

`ServedDetector` and `ServedSegmenter` wrap a loaded SavedModel in the detection contract (`image_size`, `detect`)
or the segmentation contract (`image_size`, `segment`), so that `tfreward.training.trainer.evaluate_model` can score
it on an evaluation split: each evaluation canvas (uint8 [B, H, W, 3] at the model's `image_size`) goes through the
serving graph (resize-and-pad of a canvas to itself is the identity); served boxes, in the canvas's pixels, are
normalised back to the canvas, served label maps are the canvas's. This checks the exported graph end to end
(preprocessing, the model, the mapping to original pixels) against the same COCO mAP or mIoU as training's evaluation.
"""

import os

import tensorflow as tf

from tfreward.errors import UserError


class _Served:
  """A SavedModel's `serve_images` signature; `_output` names the output its task must have."""

  _output = None
  _task = None

  def __init__(self, export_dir, image_size):
    if not os.path.isdir(export_dir) or not tf.saved_model.contains_saved_model(export_dir):
      raise UserError(f"no SavedModel in {export_dir!r}; run `tfreward export --model-dir ...` first.")
    self._loaded = tf.saved_model.load(export_dir)
    signatures = self._loaded.signatures
    if "serve_images" not in signatures:
      raise UserError(f"the SavedModel in {export_dir!r} has no `serve_images` signature (signatures: "
                      f"{', '.join(sorted(signatures))}).")
    self._serve = signatures["serve_images"]
    if self._output not in self._serve.structured_outputs:
      raise UserError(f"the SavedModel in {export_dir!r} is not a {self._task} model (outputs: "
                      f"{', '.join(sorted(self._serve.structured_outputs))}).")
    self.image_size = tuple(int(s) for s in image_size)


class ServedDetector(_Served):
  """A detection SavedModel in the detection contract.

  Args:
    export_dir: str. Directory of a SavedModel written by `tfreward.export.saved_model.export_saved_model`.
    image_size: (int, int). The model's canvas height and width (the training config's `data.image_size`).
  """

  _output = "boxes"
  _task = "detection"

  def detect(self, images):
    """images uint8 [B, H, W, 3] canvases -> boxes [B, K, 4] normalised yxyx, scores, classes, num_detections."""
    out = self._serve(images=tf.cast(images, tf.uint8))
    height, width = self.image_size
    scale = tf.constant([height, width, height, width], tf.float32)
    return {"boxes": out["boxes"] / scale, "scores": out["scores"], "classes": out["classes"],
            "num_detections": out["num_detections"]}


class ServedSegmenter(_Served):
  """A segmentation SavedModel in the segmentation contract (arguments as `ServedDetector`)."""

  _output = "labels"
  _task = "segmentation"

  def segment(self, images):
    """images uint8 [B, H, W, 3] canvases -> {"labels": [B, H, W] int32}, the served label maps of the canvases."""
    return {"labels": tf.cast(self._serve(images=tf.cast(images, tf.uint8))["labels"], tf.int32)}
