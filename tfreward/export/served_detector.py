"""Evaluate an exported SavedModel as it is served: the `serve_images` signature, not the Python model.

`ServedDetector` wraps a loaded detection SavedModel in the detection contract (`image_size`, `detect`) so that
`tfreward.training.trainer.evaluate_model` can score it on an evaluation split: each evaluation canvas (uint8 [B, H, W, 3] at the model's
`image_size`) goes through the serving graph (resize-and-pad of a canvas to itself is the identity), and the served
boxes, in the canvas's pixels, are normalised back to the canvas. This checks the exported graph end to end
(preprocessing, `detect`, the mapping to original pixels) against the same COCO mAP as training's evaluation.
"""

import os

import tensorflow as tf

from tfreward.errors import UserError


class ServedDetector:
  """A detection SavedModel in the detection contract.

  Args:
    export_dir: str. Directory of a SavedModel written by `tfreward.export.saved_model.export_saved_model`.
    image_size: (int, int). The model's canvas height and width (the training config's `data.image_size`).
  """

  def __init__(self, export_dir, image_size):
    if not os.path.isdir(export_dir) or not tf.saved_model.contains_saved_model(export_dir):
      raise UserError(f"no SavedModel in {export_dir!r}; run `tfreward export --model-dir ...` first.")
    self._loaded = tf.saved_model.load(export_dir)
    signatures = self._loaded.signatures
    if "serve_images" not in signatures:
      raise UserError(f"the SavedModel in {export_dir!r} has no `serve_images` signature (signatures: "
                      f"{', '.join(sorted(signatures))}).")
    self._serve = signatures["serve_images"]
    if "boxes" not in self._serve.structured_outputs:
      raise UserError(f"the SavedModel in {export_dir!r} is not a detection model (outputs: "
                      f"{', '.join(sorted(self._serve.structured_outputs))}).")
    self.image_size = tuple(int(s) for s in image_size)

  def detect(self, images):
    """images uint8 [B, H, W, 3] canvases -> boxes [B, K, 4] normalised yxyx, scores, classes, num_detections."""
    out = self._serve(images=tf.cast(images, tf.uint8))
    height, width = self.image_size
    scale = tf.constant([height, width, height, width], tf.float32)
    return {"boxes": out["boxes"] / scale, "scores": out["scores"], "classes": out["classes"],
            "num_detections": out["num_detections"]}
