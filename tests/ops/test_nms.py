"""Class-aware padded NMS: equals per-class tf.image.non_max_suppression, compiles with XLA, fixed shapes."""

import numpy as np
import pytest
import tensorflow as tf

from tfreward.ops import nms


def _random_case(batch=3, n=60, num_classes=3, seed=0):
  rng = np.random.default_rng(seed)
  centers = rng.uniform(0.1, 0.9, (batch, n, 2))
  # Few cluster centres so that many boxes overlap.
  centers = np.round(centers * 4) / 4 + rng.normal(0, 0.03, (batch, n, 2))
  sizes = rng.uniform(0.05, 0.3, (batch, n, 2))
  boxes = np.concatenate([centers - sizes / 2, centers + sizes / 2], -1).astype(np.float32)
  scores = rng.uniform(0, 1, (batch, n)).astype(np.float32)
  classes = rng.integers(0, num_classes, (batch, n)).astype(np.int32)
  return boxes, scores, classes


def _reference(boxes, scores, classes, *, max_detections, iou_threshold, score_threshold, pre_nms_top_k):
  """Per image: top-k by score, then tf.image.non_max_suppression per class, merged by score."""
  out = []
  for b in range(boxes.shape[0]):
    order = np.argsort(-scores[b], kind="stable")[:pre_nms_top_k]
    kept = []
    for c in np.unique(classes[b][order]):
      idx = order[classes[b][order] == c]
      sel = tf.image.non_max_suppression(boxes[b][idx], scores[b][idx], len(idx), iou_threshold=iou_threshold,
                                         score_threshold=score_threshold).numpy()
      kept += list(idx[sel])
    kept = sorted(kept, key=lambda i: -scores[b][i])[:max_detections]
    out.append(kept)
  return out


@pytest.mark.parametrize("pre_nms_top_k", [1000, 40])
@pytest.mark.parametrize("iou_threshold", [0.3, 0.65])
def test_matches_per_class_reference(pre_nms_top_k, iou_threshold):
  boxes, scores, classes = _random_case()
  result = nms.class_aware_nms(boxes, scores, classes, max_detections=25, iou_threshold=iou_threshold,
                               score_threshold=0.05, pre_nms_top_k=pre_nms_top_k)
  expected = _reference(boxes, scores, classes, max_detections=25, iou_threshold=iou_threshold,
                        score_threshold=0.05, pre_nms_top_k=pre_nms_top_k)
  for b, kept in enumerate(expected):
    n = int(result["num_detections"][b])
    assert n == len(kept)
    np.testing.assert_array_equal(result["boxes"][b, :n], boxes[b][kept])
    np.testing.assert_array_equal(result["scores"][b, :n], scores[b][kept])
    np.testing.assert_array_equal(result["classes"][b, :n], classes[b][kept])
    np.testing.assert_array_equal(result["boxes"][b, n:], 0.0)
    np.testing.assert_array_equal(result["scores"][b, n:], 0.0)
    np.testing.assert_array_equal(result["classes"][b, n:], -1)


def test_jit_equals_eager():
  boxes, scores, classes = _random_case(seed=1)
  fn = lambda b, s, c: nms.class_aware_nms(b, s, c, max_detections=30, iou_threshold=0.5, score_threshold=0.1,
                                           pre_nms_top_k=50)
  eager = fn(boxes, scores, classes)
  compiled = tf.function(fn, jit_compile=True)(tf.constant(boxes), tf.constant(scores), tf.constant(classes))
  for k in eager:
    np.testing.assert_array_equal(compiled[k], eager[k])
  assert compiled["boxes"].shape == (3, 30, 4) and compiled["num_detections"].dtype == tf.int32


def test_greedy_chain_and_class_awareness():
  # a suppresses b (IoU 0.82); b would suppress c (IoU 0.54) but is gone, so c stays (IoU(a, c) = 0.43).
  # d is a copy of a with another class: kept.
  boxes = np.array([[[0, 0, 10, 10], [0, 1, 10, 11], [0, 4, 10, 14], [0, 0, 10, 10]]], np.float32)
  scores = np.array([[0.9, 0.8, 0.7, 0.6]], np.float32)
  classes = np.array([[0, 0, 0, 1]], np.int32)
  result = nms.class_aware_nms(boxes, scores, classes, max_detections=4, iou_threshold=0.5)
  assert int(result["num_detections"][0]) == 3
  np.testing.assert_allclose(result["scores"][0], [0.9, 0.7, 0.6, 0.0])
  np.testing.assert_array_equal(result["classes"][0], [0, 0, 1, -1])


def test_threshold_is_strict():
  # IoU exactly 0.5: not suppressed (like tf.image.non_max_suppression); score equal to the threshold: dropped.
  boxes = np.array([[[0, 0, 10, 10], [0, 0, 10, 5], [20, 20, 30, 30]]], np.float32)
  scores = np.array([[0.9, 0.8, 0.3]], np.float32)
  result = nms.class_aware_nms(boxes, scores, np.zeros([1, 3], np.int32), max_detections=3, iou_threshold=0.5,
                               score_threshold=0.3)
  np.testing.assert_allclose(result["scores"][0], [0.9, 0.8, 0.0])


def test_empty_all_below_threshold_and_degenerate():
  fn = tf.function(lambda b, s, c: nms.class_aware_nms(b, s, c, max_detections=5, score_threshold=0.5),
                   jit_compile=True)
  empty = fn(tf.zeros([2, 0, 4]), tf.zeros([2, 0]), tf.zeros([2, 0], tf.int32))
  assert empty["boxes"].shape == (2, 5, 4) and empty["num_detections"].numpy().tolist() == [0, 0]
  np.testing.assert_array_equal(empty["classes"], -1)
  low = fn(tf.random.uniform([2, 7, 4]), tf.fill([2, 7], 0.2), tf.zeros([2, 7], tf.int32))
  assert low["num_detections"].numpy().tolist() == [0, 0]
  np.testing.assert_array_equal(low["scores"], 0.0)
  # Identical zero-area and inverted boxes have IoU 0: nothing suppressed, nothing NaN.
  degenerate = tf.constant([[[1, 1, 1, 1], [1, 1, 1, 1], [5, 5, 2, 2], [5, 5, 2, 2]]], tf.float32)
  out = fn(degenerate, tf.constant([[0.9, 0.8, 0.7, 0.6]]), tf.zeros([1, 4], tf.int32))
  assert int(out["num_detections"][0]) == 4
  assert np.all(np.isfinite(out["boxes"].numpy()))


def test_pads_when_fewer_candidates_than_slots():
  boxes, scores, classes = _random_case(batch=2, n=6)
  result = nms.class_aware_nms(boxes, scores, classes, max_detections=10, score_threshold=0.0, pre_nms_top_k=4)
  assert result["boxes"].shape == (2, 10, 4)
  assert np.all(result["num_detections"].numpy() <= 4)
  np.testing.assert_array_equal(result["classes"][:, 4:], -1)


def test_top_class_candidates():
  boxes = tf.reshape(tf.range(3 * 4, dtype=tf.float32), [1, 3, 4])
  class_scores = tf.constant([[[0.1, 0.9], [0.8, 0.7], [0.2, 0.3]]])
  cand_boxes, cand_scores, cand_classes = nms.top_class_candidates(boxes, class_scores, top_k=3)
  np.testing.assert_allclose(cand_scores[0], [0.9, 0.8, 0.7])
  np.testing.assert_array_equal(cand_classes[0], [1, 0, 1])
  np.testing.assert_array_equal(cand_boxes[0], tf.gather(boxes[0], [0, 1, 1]))


@pytest.mark.parametrize("kwargs", [{"max_detections": 0}, {"iou_threshold": 1.5}, {"pre_nms_top_k": 0},
                                    {"max_detections": 2.5}])
def test_bad_arguments(kwargs):
  boxes, scores, classes = _random_case(batch=1, n=4)
  with pytest.raises(ValueError, match=str(list(kwargs.values())[0])):
    nms.class_aware_nms(boxes, scores, classes, **kwargs)
  with pytest.raises(ValueError, match="boxes"):
    nms.class_aware_nms(boxes[0], scores, classes)
