"""Host-side COCO box evaluation from the padded arrays of a detection model and its input labels.

`CocoDetectionEvaluator` turns each batch of fixed-size detections (`detect` / `predict_step` outputs) and the
pipeline's padded labels into COCO json records in the pixels of the ORIGINAL images, then runs pycocotools'
`COCOeval` (bbox) once at the end, with its prints kept off stdout.

Conventions of the json it builds:
  - category_id = class + 1 (0-based classes; COCO ids start at 1), annotation ids 1, 2, ... (pycocotools treats a
    matched ground-truth id of 0 as "unmatched", so ids must be positive);
  - boxes [x, y, width, height] in original pixels, clipped to the image; GT area = box area;
  - crowd ground truth (`crowd` True) gets iscrowd=1; entries neither valid nor crowd are padding;
  - examples with `example_valid` False (padding of the last batch) are skipped; detections beyond
    `num_detections` are padding and skipped; an image without ground truth is still evaluated (its detections are
    false positives).

Undefined metrics: pycocotools reports -1 for an average over no ground truth (e.g. `mAP_small` when no small box
exists). `result()` keeps that sentinel, and returns -1.0 for every metric when nothing non-crowd has been seen
(no ground truth at all, or no example). No detections at all give 0.0 (where ground truth exists).
"""

import contextlib
import copy
import io

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from tfreward.data import transforms
from tfreward.errors import check_int

# Metric name -> index into COCOeval.stats (default parameters: maxDets 1, 10, 100).
_STATS_INDEX = {"mAP": 0, "mAP50": 1, "mAP75": 2, "mAP_small": 3, "mAP_medium": 4, "mAP_large": 5, "AR100": 8}
METRIC_NAMES = tuple(_STATS_INDEX)
UNDEFINED = -1.0

_DETECTION_KEYS = ("boxes", "scores", "classes", "num_detections")
_LABEL_KEYS = ("boxes", "classes", "valid", "image_id", "image_hw", "scale")


def _check_image_size(image_size):
  ok = (isinstance(image_size, (tuple, list)) and len(image_size) == 2
        and all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v > 0 for v in image_size))
  if not ok:
    raise ValueError(f"image_size must be a (height, width) pair of positive ints, got {image_size!r}.")
  return int(image_size[0]), int(image_size[1])


def _to_numpy(values, keys, what):
  missing = [k for k in keys if k not in values]
  if missing:
    raise ValueError(f"{what} is missing keys {missing}; it has {sorted(values)}.")
  return {k: np.asarray(v) for k, v in values.items()}


def _xywh(boxes_yxyx):
  """[N, 4] yxyx pixels -> [N, 4] xywh pixels (float64)."""
  b = np.asarray(boxes_yxyx, np.float64)
  return np.stack([b[:, 1], b[:, 0], b[:, 3] - b[:, 1], b[:, 2] - b[:, 0]], axis=-1)


class CocoDetectionEvaluator:
  """Accumulates detections and ground truth over batches, then computes COCO box metrics with pycocotools.

  Args:
    image_size: (int, int). The model's canvas (H, W): boxes in `update` are normalised to it.
    num_classes: optional int. Number of classes; classes must lie in [0, num_classes).
    class_names: optional sequence of str, one per class (sets num_classes; used by `per_class_ap`).
      With neither, the categories are the classes seen (which gives the same metrics: COCOeval averages over the
      categories that have ground truth).
  """

  def __init__(self, *, image_size, num_classes=None, class_names=None):
    self.image_size = _check_image_size(image_size)
    if class_names is not None:
      class_names = [str(n) for n in class_names]
      if not class_names or (num_classes is not None and num_classes != len(class_names)):
        raise ValueError(
            f"class_names must be non-empty and match num_classes={num_classes!r}, got {len(class_names)} names.")
      num_classes = len(class_names)
    if num_classes is not None:
      check_int("num_classes", num_classes)
    self.num_classes = num_classes
    self.class_names = class_names
    self.reset()

  def reset(self):
    """Forgets every image seen."""
    self._images = []
    self._image_ids = set()
    self._annotations = []
    self._detections = []
    self._classes_seen = set()
    self._eval = None

  @property
  def num_images(self):
    return len(self._images)

  def _check_classes(self, classes, what):
    classes = np.asarray(classes, np.int64)
    if classes.size and (classes.min() < 0 or (self.num_classes is not None and classes.max() >= self.num_classes)):
      raise ValueError(f"{what} classes must lie in [0, {self.num_classes or 'inf'}), got {sorted(set(classes))}.")
    self._classes_seen.update(int(c) for c in classes)
    return classes

  def update(self, detections, labels):
    """Adds one batch.

    Args:
      detections: dict of arrays (numpy or eager tensors): `boxes` [B, K, 4] float32 normalised yxyx of the canvas,
        `scores` [B, K] float32, `classes` [B, K] int32 0-based, `num_detections` [B] int32 (later entries are
        padding).
      labels: dict of arrays: `boxes` [B, M, 4] float32 normalised yxyx of the canvas, `classes` [B, M] int32
        (-1 padding), `valid` [B, M] bool, `image_id` [B] int64 (unique), `image_hw` [B, 2] int32 original size,
        `scale` [B] float32 canvas pixels per original pixel; optional `crowd` [B, M] bool (default all False) and
        `example_valid` [B] bool (default all True).
    """
    det = _to_numpy(detections, _DETECTION_KEYS, "detections")
    lab = _to_numpy(labels, _LABEL_KEYS, "labels")
    batch = lab["image_id"].shape[0]
    for name, value in list(det.items()) + list(lab.items()):
      if name in _DETECTION_KEYS + _LABEL_KEYS + ("crowd", "example_valid") and value.shape[:1] != (batch,):
        raise ValueError(f"every array must have batch size {batch}; {name!r} has shape {value.shape}.")
    crowd = lab.get("crowd", np.zeros_like(lab["valid"])).astype(bool)
    example_valid = lab.get("example_valid", np.ones([batch], bool)).astype(bool)
    gt_pixels = np.asarray(transforms.canvas_boxes_to_original_pixels(
        lab["boxes"].astype(np.float32), lab["scale"], self.image_size, lab["image_hw"]))  # [B, M, 4]
    det_pixels = np.asarray(transforms.canvas_boxes_to_original_pixels(
        det["boxes"].astype(np.float32), lab["scale"], self.image_size, lab["image_hw"]))  # [B, K, 4]
    num_slots = det["boxes"].shape[1]
    for b in np.flatnonzero(example_valid):
      image_id = int(lab["image_id"][b])
      if image_id in self._image_ids:
        raise ValueError(f"image_id {image_id} was already added; call reset() before evaluating again.")
      self._image_ids.add(image_id)
      height, width = (int(v) for v in lab["image_hw"][b])
      self._images.append({"id": image_id, "height": height, "width": width})

      is_gt = lab["valid"][b].astype(bool) | crowd[b]
      gt_classes = self._check_classes(lab["classes"][b][is_gt], "ground-truth")
      for box, cls, is_crowd in zip(_xywh(gt_pixels[b][is_gt]), gt_classes, crowd[b][is_gt]):
        self._annotations.append({
            "id": len(self._annotations) + 1, "image_id": image_id, "category_id": int(cls) + 1,
            "bbox": [float(v) for v in box], "area": float(box[2] * box[3]), "iscrowd": int(is_crowd)})

      n = int(np.clip(det["num_detections"][b], 0, num_slots))
      det_classes = self._check_classes(det["classes"][b][:n], "detection")
      for box, cls, score in zip(_xywh(det_pixels[b][:n]), det_classes, det["scores"][b][:n]):
        self._detections.append({
            "image_id": image_id, "category_id": int(cls) + 1, "bbox": [float(v) for v in box],
            "score": float(score)})

  def _categories(self):
    ids = range(self.num_classes) if self.num_classes is not None else sorted(self._classes_seen)
    return [{"id": i + 1, "name": self.class_names[i] if self.class_names else str(i)} for i in ids]

  def coco_ground_truth(self):
    """The ground truth seen so far as a COCO json dict (images, annotations, categories)."""
    return {"images": copy.deepcopy(self._images), "annotations": copy.deepcopy(self._annotations),
            "categories": self._categories()}

  def coco_detections(self):
    """The detections seen so far as a COCO results list (image_id, category_id, bbox xywh, score)."""
    return copy.deepcopy(self._detections)

  def result(self):
    """COCO box metrics of everything seen since the last reset.

    Returns:
      dict str -> float: "mAP" (IoU 0.50:0.95), "mAP50", "mAP75", "mAP_small", "mAP_medium", "mAP_large" (max 100
      detections per image) and "AR100". -1.0 where undefined (see the module docstring).
    """
    self._eval = None
    if not any(not ann["iscrowd"] for ann in self._annotations):
      return {name: UNDEFINED for name in METRIC_NAMES}
    with contextlib.redirect_stdout(io.StringIO()):
      ground_truth = COCO()
      ground_truth.dataset = self.coco_ground_truth()
      ground_truth.createIndex()
      if self._detections:
        predictions = ground_truth.loadRes(self.coco_detections())
      else:  # loadRes cannot take an empty list
        predictions = COCO()
        predictions.dataset = {"images": copy.deepcopy(self._images), "annotations": [],
                               "categories": self._categories()}
        predictions.createIndex()
      evaluation = COCOeval(ground_truth, predictions, iouType="bbox")
      evaluation.evaluate()
      evaluation.accumulate()
      evaluation.summarize()
    self._eval = evaluation
    return {name: float(evaluation.stats[index]) for name, index in _STATS_INDEX.items()}

  def per_class_ap(self):
    """AP (IoU 0.50:0.95, all areas, 100 detections) per class name for the classes with ground truth.

    Call after `result()`; an empty dict when `result()` found nothing to evaluate.
    """
    if self._eval is None:
      return {}
    precision = self._eval.eval["precision"][:, :, :, 0, -1]  # [T, R, K]
    names = {c["id"]: c["name"] for c in self._eval.cocoGt.dataset["categories"]}
    out = {}
    for k, cat_id in enumerate(self._eval.params.catIds):
      values = precision[:, :, k]
      values = values[values > -1]
      if values.size:
        out[names[cat_id]] = float(values.mean())
    return out
