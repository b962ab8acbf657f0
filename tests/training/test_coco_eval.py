"""Tests for tfreward.training.coco_eval and eval_callback.CocoEvalCallback."""

import contextlib
import io

import keras
import numpy as np
import pytest
import tensorflow as tf
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from tfreward.data import transforms
from tfreward.models.divergence import NonFiniteError
from tfreward.training import coco_eval
from tfreward.training import eval_callback
from tfreward.testing import BrightBoxDetector

CANVAS = (64, 96)
STAT_NAMES = ("mAP", "mAP50", "mAP75", "mAP_small", "mAP_medium", "mAP_large", "AR100")
STAT_INDEX = (0, 1, 2, 3, 4, 5, 8)


def example(image_id, hw, gt=(), dets=(), garbage_dets=0, valid=True):
  """One image: gt = [(yxyx pixels, class, crowd)], dets = [(yxyx pixels, class, score)], all in original pixels."""
  return {"image_id": image_id, "hw": hw, "gt": list(gt), "dets": list(dets), "garbage": garbage_dets,
          "valid": valid}


def make_batch(examples, max_gt=4, max_dets=6):
  """Padded detections and labels (canvas-normalised boxes) as the model and the pipeline produce them."""
  b = len(examples)
  labels = {"boxes": np.zeros([b, max_gt, 4], np.float32), "classes": np.full([b, max_gt], -1, np.int32),
            "valid": np.zeros([b, max_gt], bool), "crowd": np.zeros([b, max_gt], bool),
            "image_id": np.zeros([b], np.int64), "image_hw": np.zeros([b, 2], np.int32),
            "scale": np.zeros([b], np.float32), "example_valid": np.zeros([b], bool)}
  detections = {"boxes": np.zeros([b, max_dets, 4], np.float32), "scores": np.zeros([b, max_dets], np.float32),
                "classes": np.zeros([b, max_dets], np.int32), "num_detections": np.zeros([b], np.int32)}
  for i, ex in enumerate(examples):
    scale = float(transforms.fit_scale(ex["hw"], CANVAS))
    to_canvas = np.array([scale / CANVAS[0], scale / CANVAS[1]] * 2, np.float32)
    labels["image_id"][i] = ex["image_id"]
    labels["image_hw"][i] = ex["hw"]
    labels["scale"][i] = scale
    labels["example_valid"][i] = ex["valid"]
    for m, (box, cls, crowd) in enumerate(ex["gt"]):
      labels["boxes"][i, m] = np.array(box, np.float32) * to_canvas
      labels["classes"][i, m] = cls
      labels["valid"][i, m] = not crowd
      labels["crowd"][i, m] = crowd
    for k, (box, cls, score) in enumerate(ex["dets"]):
      detections["boxes"][i, k] = np.array(box, np.float32) * to_canvas
      detections["classes"][i, k] = cls
      detections["scores"][i, k] = score
    n = len(ex["dets"])
    detections["num_detections"][i] = n
    # Padding beyond num_detections: confident boxes that would change the metrics if they were counted.
    for k in range(n, min(n + ex["garbage"], max_dets)):
      detections["boxes"][i, k] = [0.0, 0.0, 0.5, 0.5]
      detections["classes"][i, k] = 0
      detections["scores"][i, k] = 0.99
  return detections, labels


def coco_xywh(box, hw):
  y0, x0, y1, x1 = np.clip(np.array(box, np.float64), 0, [hw[0], hw[1]] * 2)
  return [x0, y0, x1 - x0, y1 - y0]


def reference_stats(examples, num_classes):
  """pycocotools run directly on a json built by hand from the original-pixel boxes."""
  images, annotations, results = [], [], []
  for ex in examples:
    if not ex["valid"]:
      continue
    images.append({"id": ex["image_id"], "height": ex["hw"][0], "width": ex["hw"][1]})
    for box, cls, crowd in ex["gt"]:
      xywh = coco_xywh(box, ex["hw"])
      annotations.append({"id": len(annotations) + 1, "image_id": ex["image_id"], "category_id": cls + 1,
                          "bbox": xywh, "area": xywh[2] * xywh[3], "iscrowd": int(crowd)})
    for box, cls, score in ex["dets"]:
      results.append({"image_id": ex["image_id"], "category_id": cls + 1, "bbox": coco_xywh(box, ex["hw"]),
                      "score": score})
  with contextlib.redirect_stdout(io.StringIO()):
    gt = COCO()
    gt.dataset = {"images": images, "annotations": annotations,
                  "categories": [{"id": c + 1, "name": str(c)} for c in range(num_classes)]}
    gt.createIndex()
    evaluation = COCOeval(gt, gt.loadRes(results), iouType="bbox")
    evaluation.evaluate()
    evaluation.accumulate()
    evaluation.summarize()
  return {name: float(evaluation.stats[i]) for name, i in zip(STAT_NAMES, STAT_INDEX)}


def scenario():
  """Two batches: several sizes and aspect ratios, a crowd box, three classes, an image without ground truth, a
  padding example (duplicate id, must be skipped) and padding detections."""
  batch1 = [
      example(101, (480, 640),
              gt=[([100, 100, 300, 350], 0, False), ([50, 400, 80, 440], 2, False), ([300, 0, 470, 300], 0, True)],
              dets=[([105, 98, 298, 360], 0, 0.9), ([52, 402, 84, 436], 2, 0.8), ([320, 20, 400, 120], 0, 0.7),
                    ([10, 10, 40, 40], 0, 0.95), ([100, 100, 300, 350], 1, 0.6)],
              garbage_dets=1),
      example(102, (300, 200),
              gt=[([20, 30, 120, 150], 1, False), ([150, 20, 210, 80], 1, False)],
              dets=[([22, 28, 118, 155], 1, 0.85), ([155, 25, 215, 78], 1, 0.5), ([150, 100, 290, 190], 2, 0.4)],
              garbage_dets=3),
  ]
  batch2 = [
      example(103, (120, 160), dets=[([10, 10, 50, 50], 0, 0.3)]),
      example(101, (50, 50), gt=[([0, 0, 10, 10], 1, False)], dets=[([20, 20, 30, 30], 1, 0.99)], valid=False),
      # The canvas extends beyond this image: the detection's right part must be clipped to match.
      example(105, (256, 256), gt=[([0, 0, 256, 256], 0, False), ([100, 100, 140, 130], 2, False)],
              dets=[([0, 0, 256, 380], 0, 0.75), ([101, 103, 139, 131], 2, 0.65)]),
  ]
  return batch1, batch2


def test_matches_pycocotools_on_hand_built_json():
  batch1, batch2 = scenario()
  evaluator = coco_eval.CocoDetectionEvaluator(image_size=CANVAS, num_classes=3)
  evaluator.update(*make_batch(batch1))
  evaluator.update(*make_batch(batch2))
  assert evaluator.num_images == 4
  result = evaluator.result()
  expected = reference_stats(batch1 + batch2, 3)
  assert set(result) == set(STAT_NAMES)
  for name in STAT_NAMES:
    assert result[name] == pytest.approx(expected[name], abs=1e-12), name
  assert 0.0 < result["mAP"] < 1.0
  assert all(isinstance(v, float) for v in result.values())
  # The json itself: original pixels, xywh, area = w * h, crowd flag.
  annotations = evaluator.coco_ground_truth()["annotations"]
  first = annotations[0]
  np.testing.assert_allclose(first["bbox"], [100, 100, 250, 200], atol=1e-3)
  assert first["area"] == pytest.approx(250 * 200, rel=1e-5)
  assert [a["iscrowd"] for a in annotations[:3]] == [0, 0, 1]
  assert [a["id"] for a in annotations] == list(range(1, len(annotations) + 1))
  detections = evaluator.coco_detections()
  assert len(detections) == 5 + 3 + 1 + 2
  np.testing.assert_allclose(detections[-2]["bbox"], [0, 0, 256, 256], atol=1e-3)


def test_batched_equals_per_image_and_inferred_categories():
  batch1, batch2 = scenario()
  per_image = coco_eval.CocoDetectionEvaluator(image_size=CANVAS)
  for ex in batch1 + batch2:
    per_image.update(*make_batch([ex]))
  batched = coco_eval.CocoDetectionEvaluator(image_size=CANVAS, num_classes=3)
  batched.update(*make_batch(batch1 + batch2))
  assert per_image.result() == batched.result()


def test_perfect_predictions_give_one():
  examples = [example(1, (400, 600), gt=[([10, 10, 25, 30], 0, False), ([50, 50, 110, 120], 1, False),
                                         ([100, 200, 390, 590], 2, False), ([0, 0, 400, 600], 1, True)]),
              example(2, (200, 90), gt=[([20, 5, 180, 85], 0, False)])]
  for ex in examples:
    ex["dets"] = [(box, cls, 1.0) for box, cls, crowd in ex["gt"] if not crowd]
  evaluator = coco_eval.CocoDetectionEvaluator(image_size=CANVAS, class_names=["a", "b", "c"])
  evaluator.update(*make_batch(examples))
  result = evaluator.result()
  for name in STAT_NAMES:
    assert result[name] == pytest.approx(1.0), name
  assert evaluator.per_class_ap() == pytest.approx({"a": 1.0, "b": 1.0, "c": 1.0})


def test_no_detections_gives_zero():
  evaluator = coco_eval.CocoDetectionEvaluator(image_size=CANVAS, num_classes=2)
  evaluator.update(*make_batch([example(1, (100, 100), gt=[([10, 10, 90, 90], 1, False)], garbage_dets=2),
                                example(2, (100, 50))]))
  result = evaluator.result()
  assert result["mAP"] == 0.0 and result["mAP50"] == 0.0 and result["AR100"] == 0.0
  assert result["mAP_medium"] == 0.0
  assert result["mAP_small"] == -1.0 and result["mAP_large"] == -1.0  # no ground truth of those sizes
  assert not any(np.isnan(v) for v in result.values())


def test_no_ground_truth_gives_minus_one_sentinel():
  empty = coco_eval.CocoDetectionEvaluator(image_size=CANVAS)
  assert empty.result() == {name: -1.0 for name in STAT_NAMES}
  detections_only = coco_eval.CocoDetectionEvaluator(image_size=CANVAS, num_classes=2)
  detections_only.update(*make_batch([example(1, (100, 100), dets=[([0, 0, 10, 10], 0, 0.5)])]))
  assert detections_only.result() == {name: -1.0 for name in STAT_NAMES}
  crowd_only = coco_eval.CocoDetectionEvaluator(image_size=CANVAS, num_classes=2)
  crowd_only.update(*make_batch([example(1, (100, 100), gt=[([0, 0, 50, 50], 0, True)])]))
  assert crowd_only.result() == {name: -1.0 for name in STAT_NAMES}
  assert crowd_only.per_class_ap() == {}
  all_padding = coco_eval.CocoDetectionEvaluator(image_size=CANVAS)
  all_padding.update(*make_batch([example(1, (9, 9), gt=[([0, 0, 5, 5], 0, False)], valid=False)]))
  assert all_padding.num_images == 0
  assert all_padding.result()["mAP"] == -1.0


def test_result_prints_nothing(capsys):
  batch1, _ = scenario()
  evaluator = coco_eval.CocoDetectionEvaluator(image_size=CANVAS, num_classes=3)
  evaluator.update(*make_batch(batch1))
  evaluator.result()
  assert capsys.readouterr().out == ""


def test_tensors_accepted_and_reset():
  batch1, _ = scenario()
  detections, labels = make_batch(batch1)
  evaluator = coco_eval.CocoDetectionEvaluator(image_size=CANVAS, num_classes=3)
  evaluator.update({k: tf.constant(v) for k, v in detections.items()}, {k: tf.constant(v) for k, v in labels.items()})
  first = evaluator.result()
  evaluator.reset()
  assert evaluator.num_images == 0
  evaluator.update(detections, labels)
  assert evaluator.result() == first


def test_bad_inputs_raise():
  with pytest.raises(ValueError, match="image_size"):
    coco_eval.CocoDetectionEvaluator(image_size=(64,))
  with pytest.raises(ValueError, match="num_classes"):
    coco_eval.CocoDetectionEvaluator(image_size=CANVAS, num_classes=0)
  with pytest.raises(ValueError, match="class_names"):
    coco_eval.CocoDetectionEvaluator(image_size=CANVAS, num_classes=3, class_names=["a"])
  evaluator = coco_eval.CocoDetectionEvaluator(image_size=CANVAS, num_classes=2)
  detections, labels = make_batch([example(7, (10, 10), gt=[([0, 0, 5, 5], 1, False)])])
  evaluator.update(detections, labels)
  with pytest.raises(ValueError, match="image_id 7"):
    evaluator.update(detections, labels)
  with pytest.raises(ValueError, match="scale"):
    evaluator.update(detections, {k: v for k, v in labels.items() if k != "scale"})
  labels["image_id"][0] = 8
  labels["classes"][0, 0] = 2
  with pytest.raises(ValueError, match="classes"):
    evaluator.update(detections, labels)
  detections["num_detections"] = np.zeros([3], np.int32)
  with pytest.raises(ValueError, match="batch size"):
    evaluator.update(detections, labels)


# --- CocoEvalCallback --------------------------------------------------------------------------------------------


def detection_dataset(batch_size=2):
  """Five 32x48-canvas images (originals 64x96, scale 0.5) with one white rectangle each, plus one padding example.

  The ground truth equals the rectangle for images 0, 1, 3 and is shifted for 2 and 4, so mAP is strictly between
  0 and 1."""
  rects = [(2, 3, 10, 20), (5, 5, 30, 40), (0, 10, 16, 48), (12, 0, 32, 8), (20, 20, 28, 30)]
  shifts = [0, 0, 3, 0, 2]
  n = len(rects) + 1
  images = np.zeros([n, 32, 48, 3], np.uint8)
  labels = {"boxes": np.zeros([n, 2, 4], np.float32), "classes": np.full([n, 2], -1, np.int32),
            "valid": np.zeros([n, 2], bool), "crowd": np.zeros([n, 2], bool),
            "image_id": np.arange(n, dtype=np.int64) + 10, "image_hw": np.tile([[64, 96]], [n, 1]).astype(np.int32),
            "scale": np.full([n], 0.5, np.float32), "example_valid": np.arange(n) < len(rects)}
  for i, ((y0, x0, y1, x1), shift) in enumerate(zip(rects, shifts)):
    images[i, y0:y1, x0:x1] = 255
    labels["boxes"][i, 0] = np.array([y0 + shift, x0, y1 + shift, x1]) / np.array([32, 48, 32, 48])
    labels["classes"][i, 0] = 1
    labels["valid"][i, 0] = True
  images[-1] = 255  # a padding example whose detection would be a false positive
  return tf.data.Dataset.from_tensor_slices((images, labels)).batch(batch_size)


def test_callback_evaluate_xla_equals_eager_and_direct_evaluator():
  dataset = detection_dataset()
  model = BrightBoxDetector(image_size=(32, 48))
  direct = coco_eval.CocoDetectionEvaluator(image_size=model.image_size)
  for images, labels in dataset:
    direct.update(model.detect(images), labels)
  expected = direct.result()
  assert 0.0 < expected["mAP"] < 1.0
  for jit_compile in (True, False):
    callback = eval_callback.CocoEvalCallback(dataset, jit_compile=jit_compile, verbose=0)
    assert callback.evaluate(model) == expected
    assert callback.evaluate(model) == expected  # a fresh evaluator every time
  assert set(callback.per_class_ap()) == {"1"}


def test_callback_logs_metrics_every_n_epochs(capsys):
  dataset = detection_dataset()
  model = BrightBoxDetector(image_size=(32, 48))
  model.compile(optimizer="sgd")
  callback = eval_callback.CocoEvalCallback(dataset, every_n_epochs=2, class_names=["bg", "box", "x", "y"])
  history = model.fit(dataset.map(lambda images, labels: (images, labels["boxes"])), epochs=4,
                      callbacks=[callback], verbose=0, shuffle=False)
  expected = callback.evaluate(model)
  for name in STAT_NAMES:
    assert history.history["val_" + name] == [expected[name]] * 2
  assert len(history.history["loss"]) == 4
  assert "batch" in capsys.readouterr().out  # the evaluation's progress bar
  assert set(callback.per_class_ap()) == {"box"}


def test_callback_under_two_replica_fit(two_replica_strategy):
  dataset = detection_dataset()
  with two_replica_strategy.scope():
    model = BrightBoxDetector(image_size=(32, 48))
    model.compile(optimizer="sgd", jit_compile=False)
  callback = eval_callback.CocoEvalCallback(dataset, verbose=0, prefix="eval/")
  history = model.fit(dataset.map(lambda images, labels: (images, labels["boxes"])), epochs=1,
                      callbacks=[callback], verbose=0, shuffle=False)
  direct = eval_callback.CocoEvalCallback(dataset, verbose=0, jit_compile=False).evaluate(
      BrightBoxDetector(image_size=(32, 48)))
  assert history.history["eval/mAP"] == [direct["mAP"]]


def test_callback_bad_arguments():
  dataset = detection_dataset()
  with pytest.raises(ValueError, match="every_n_epochs"):
    eval_callback.CocoEvalCallback(dataset, every_n_epochs=0)
  with pytest.raises(ValueError, match="finite"):
    eval_callback.CocoEvalCallback(dataset.repeat())
  with pytest.raises(ValueError, match="prefix"):
    eval_callback.CocoEvalCallback(dataset, prefix=None)
  with pytest.raises(ValueError, match="detect"):
    eval_callback.CocoEvalCallback(dataset, verbose=0).evaluate(keras.Sequential([keras.layers.Dense(1)]))


class _NaNBoxDetector(BrightBoxDetector):
  """BrightBoxDetector whose boxes are NaN: what a diverged model gives."""

  def detect(self, images):
    out = dict(super().detect(images))
    out["boxes"] = out["boxes"] * float("nan")
    return out


def test_callback_refuses_non_finite_detections():
  callback = eval_callback.CocoEvalCallback(detection_dataset(), verbose=0, jit_compile=False)
  with pytest.raises(NonFiniteError, match=r"refusing to score detections with NaN or Inf boxes \(evaluation batch 0"):
    callback.evaluate(_NaNBoxDetector(image_size=(32, 48)))
