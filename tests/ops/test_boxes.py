import numpy as np
import pytest
import tensorflow as tf

from tfreward.ops import boxes as box_ops


def test_conversions_round_trip_and_hand_values():
  yxyx = np.array([[0.1, 0.2, 0.5, 0.8]], np.float32)
  np.testing.assert_allclose(box_ops.yxyx_to_xyxy(yxyx), [[0.2, 0.1, 0.8, 0.5]])
  np.testing.assert_allclose(box_ops.yxyx_to_cxcywh(yxyx), [[0.5, 0.3, 0.6, 0.4]], atol=1e-7)
  np.testing.assert_allclose(box_ops.cxcywh_to_yxyx(box_ops.yxyx_to_cxcywh(yxyx)), yxyx, atol=1e-7)
  np.testing.assert_allclose(box_ops.xyxy_to_yxyx(box_ops.yxyx_to_xyxy(yxyx)), yxyx)
  np.testing.assert_allclose(box_ops.cxcywh_to_xyxy([[2.0, 3.0, 4.0, 2.0]]), [[0.0, 2.0, 4.0, 4.0]])
  np.testing.assert_allclose(box_ops.xyxy_to_cxcywh([[0.0, 2.0, 4.0, 4.0]]), [[2.0, 3.0, 4.0, 2.0]])


def test_normalise_and_denormalise():
  boxes = np.array([[[0.5, 0.25, 1.0, 0.75]]], np.float32)  # [1, 1, 4] yxyx
  pixels = box_ops.denormalize_boxes(boxes, [200, 400])
  np.testing.assert_allclose(pixels, [[[100, 100, 200, 300]]])
  np.testing.assert_allclose(box_ops.normalize_boxes(pixels, [200, 400]), boxes)
  xyxy = box_ops.denormalize_boxes(np.array([[0.25, 0.5, 0.75, 1.0]], np.float32), [200, 400], "xyxy")
  np.testing.assert_allclose(xyxy, [[100, 100, 300, 200]])
  # Per-image sizes [B, 2] broadcast over the box axis.
  batch = box_ops.denormalize_boxes(np.ones([2, 3, 4], np.float32), [[10, 20], [30, 40]])
  np.testing.assert_allclose(batch[1, 2], [30, 40, 30, 40])
  assert np.all(np.isfinite(box_ops.normalize_boxes(pixels, [0, 0])))
  with pytest.raises(ValueError, match="box_format"):
    box_ops.denormalize_boxes(boxes, [1, 1], "xywh")


def test_iou_and_giou_hand_checked():
  a = np.array([[0.0, 0.0, 2.0, 2.0]], np.float32)
  b = np.array([[1.0, 1.0, 3.0, 3.0], [0.0, 0.0, 2.0, 2.0], [3.0, 3.0, 4.0, 4.0]], np.float32)
  iou = box_ops.pairwise_iou(a, b).numpy()
  np.testing.assert_allclose(iou, [[1 / 7, 1.0, 0.0]], rtol=1e-6)
  giou = box_ops.pairwise_giou(a, b).numpy()
  # Enclosing boxes: 9 (union 7), 4 (union 4), 16 (union 5).
  np.testing.assert_allclose(giou, [[1 / 7 - 2 / 9, 1.0, 0.0 - 11 / 16]], rtol=1e-6)
  np.testing.assert_allclose(box_ops.elementwise_iou(np.repeat(a, 3, 0), b), iou[0], rtol=1e-6)
  np.testing.assert_allclose(box_ops.elementwise_giou(np.repeat(a, 3, 0), b), giou[0], rtol=1e-6)


@pytest.mark.parametrize("fn", [box_ops.pairwise_iou, box_ops.pairwise_giou])
def test_degenerate_boxes_give_no_nan(fn):
  boxes = np.array([
      [0.0, 0.0, 0.0, 0.0],  # zero area, point
      [0.5, 0.5, 0.5, 0.9],  # zero area, segment
      [0.8, 0.8, 0.2, 0.2],  # inverted
      [0.0, 0.0, 1.0, 1.0],
  ], np.float32)
  values = fn(boxes, boxes).numpy()
  assert np.all(np.isfinite(values))
  assert np.all(values[:3, :3] <= 0.0 + 1e-7)  # empty boxes overlap nothing
  assert values[3, 3] == pytest.approx(1.0)
  assert np.all(values >= -1.0) and np.all(values <= 1.0)
  # Gradients are finite too.
  x = tf.constant(boxes)
  with tf.GradientTape() as tape:
    tape.watch(x)
    y = tf.reduce_sum(fn(x, x))
  assert np.all(np.isfinite(tape.gradient(y, x).numpy()))


def test_area_and_clip():
  np.testing.assert_allclose(box_ops.box_area([[0.0, 0.0, 2.0, 3.0], [1.0, 1.0, 0.0, 0.0]]), [6.0, 0.0])
  np.testing.assert_allclose(box_ops.clip_boxes([[-0.5, 0.2, 1.5, 0.9]]), [[0.0, 0.2, 1.0, 0.9]])


def test_wrong_last_dimension_is_an_error():
  with pytest.raises(ValueError, match="last dimension of 4"):
    box_ops.pairwise_iou(np.zeros([2, 3], np.float32), np.zeros([2, 4], np.float32))


def test_xla_matches_eager_batched():
  rng = np.random.default_rng(0)
  corners = np.sort(rng.uniform(0, 1, [2, 5, 2, 2]), axis=2).astype(np.float32)
  a = corners.transpose(0, 1, 3, 2).reshape(2, 5, 4)[..., [0, 2, 1, 3]]
  b = a[:, ::-1]
  fn = tf.function(box_ops.pairwise_giou, jit_compile=True)
  np.testing.assert_allclose(fn(a, b), box_ops.pairwise_giou(a, b), rtol=1e-6, atol=1e-6)
  assert fn(a, b).shape == (2, 5, 5)


def test_order_corners():
  swapped = np.array([[0.6, 0.1, 0.2, 0.5], [0.1, 0.9, 0.3, 0.2]], np.float32)
  np.testing.assert_allclose(box_ops.order_corners(swapped), [[0.2, 0.1, 0.6, 0.5], [0.1, 0.2, 0.3, 0.9]])
  with pytest.raises(ValueError, match="last dimension of 4"):
    box_ops.order_corners(np.zeros([2, 3], np.float32))


def test_positive_extent():
  boxes = np.array([[0.1, 0.2, 0.5, 0.8], [0.1, 0.2, 0.1, 0.8], [0.1, 0.2, 0.5, 0.1], [0.5, 0.2, 0.1, 0.8],
                    [0.1, 0.2, np.nan, 0.8], [0.1, -np.inf, 0.5, 0.8]], np.float32)
  expected = [True, False, False, False, False, False]
  np.testing.assert_array_equal(box_ops.positive_extent(boxes), expected)
  np.testing.assert_array_equal(box_ops.positive_extent(box_ops.yxyx_to_xyxy(boxes), "xyxy"), expected)
  cxcywh = np.array([[[5.0, 5.0, 2.0, 1.0], [5.0, 5.0, 0.0, 1.0], [5.0, 5.0, 2.0, -1.0], [np.nan, 5.0, 2.0, 1.0]]],
                    np.float32)
  compiled = tf.function(lambda b: box_ops.positive_extent(b, "cxcywh"), jit_compile=True)
  for fn in (lambda b: box_ops.positive_extent(b, "cxcywh"), compiled):
    np.testing.assert_array_equal(fn(tf.constant(cxcywh)), [[True, False, False, False]])
  with pytest.raises(ValueError, match="box_format"):
    box_ops.positive_extent(boxes, "xywh")
