"""Tests for tfreward.losses.retinanet (max-IoU assignment, focal + smooth L1) and tfreward.losses.smooth_l1.

The reference is a per-image NumPy transcription of mmdetection's MaxIoUAssigner (with the "> 0" guard the module
documents), sigmoid focal loss and smooth L1 on delta targets, looping over GT like mmdetection does.
"""

import numpy as np
import pytest
import tensorflow as tf

from tfreward.losses import retinanet
from tfreward.losses.smooth_l1 import smooth_l1
from tfreward.ops.anchors import retinanet_anchors

IMAGE = (64, 64)
STDS = np.array([0.1, 0.1, 0.2, 0.2])


# === NumPy reference ===

def np_iou(a, b):
  """[N, 4], [M, 4] xyxy -> [N, M], in float32 with the operation order of `tfreward.ops.boxes`, so that exact
  ties (same-shaped anchors that all contain a small GT) are ties here too, as they are in float32 TF or torch."""
  a, b = a.astype(np.float32)[:, None, :], b.astype(np.float32)[None, :, :]
  inter = (np.maximum(np.minimum(a[..., 2], b[..., 2]) - np.maximum(a[..., 0], b[..., 0]), 0)
           * np.maximum(np.minimum(a[..., 3], b[..., 3]) - np.maximum(a[..., 1], b[..., 1]), 0))
  area_a = np.maximum(a[..., 2] - a[..., 0], 0) * np.maximum(a[..., 3] - a[..., 1], 0)
  area_b = np.maximum(b[..., 2] - b[..., 0], 0) * np.maximum(b[..., 3] - b[..., 1], 0)
  union = np.maximum(area_a + area_b - inter, inter)
  return np.where(union > 0, inter / np.where(union > 0, union, 1), np.float32(0))


def np_assign(anchors, gt, pos_thr=0.5, neg_thr=0.4, low_quality=True, min_pos_iou=0.0):
  """One image, valid GT only: [A] int, GT index, -1 negative, -2 ignored."""
  assigned = np.full(len(anchors), -2)
  if len(gt) == 0:
    return np.full(len(anchors), -1)
  overlaps = np_iou(gt, anchors)  # [G, A]
  max_overlaps, argmax = overlaps.max(0), overlaps.argmax(0)
  assigned[(max_overlaps >= 0) & (max_overlaps < neg_thr)] = -1
  pos = max_overlaps >= pos_thr
  assigned[pos] = argmax[pos]
  if low_quality:
    gt_max = overlaps.max(1)
    for i in range(len(gt)):
      if gt_max[i] >= min_pos_iou and gt_max[i] > 0:
        assigned[overlaps[i] == gt_max[i]] = i
  return assigned


def np_encode(anchors, boxes):
  aw, ah = anchors[:, 2] - anchors[:, 0], anchors[:, 3] - anchors[:, 1]
  ax, ay = anchors[:, 0] + 0.5 * aw, anchors[:, 1] + 0.5 * ah
  gw, gh = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
  gx, gy = boxes[:, 0] + 0.5 * gw, boxes[:, 1] + 0.5 * gh
  return np.stack([(gx - ax) / aw, (gy - ay) / ah, np.log(gw / aw), np.log(gh / ah)], -1) / STDS


def np_smooth_l1(x, beta):
  ax = np.abs(x)
  return np.where(ax < beta, 0.5 * x * x / beta, ax - 0.5 * beta)


def np_focal(logits, targets, alpha=0.25, gamma=2.0):
  p = 1 / (1 + np.exp(-logits))
  ce = np.logaddexp(0, -logits) * targets + np.logaddexp(0, logits) * (1 - targets)
  p_t = p * targets + (1 - p) * (1 - targets)
  return (alpha * targets + (1 - alpha) * (1 - targets)) * ce * (1 - p_t) ** gamma


def np_loss_sums(anchors, logits, deltas, gt, classes, beta=0.11):
  """One image: (cls sum, box sum, number of positives)."""
  assigned = np_assign(anchors, gt)
  pos = assigned >= 0
  targets = np.zeros_like(logits)
  targets[np.flatnonzero(pos), classes[assigned[pos]]] = 1
  cls_sum = np_focal(logits, targets)[assigned != -2].sum()
  box_sum = np_smooth_l1(deltas[pos] - np_encode(anchors[pos], gt[assigned[pos]]), beta).sum()
  return cls_sum, box_sum, pos.sum()


# === Inputs ===

def make_case(seed, batch=3, slots=5, num_classes=4):
  rng = np.random.default_rng(seed)
  anchors = retinanet_anchors(IMAGE).numpy().astype(np.float64)
  xy = rng.uniform(0, 48, (batch, slots, 2))
  wh = rng.uniform(4, 40, (batch, slots, 2))
  boxes = np.concatenate([xy, np.minimum(xy + wh, 64)], -1)
  valid = np.arange(slots)[None] < rng.integers(0, slots + 1, (batch, 1))
  valid[0, :3] = True
  classes = np.where(valid, rng.integers(0, num_classes, (batch, slots)), -1)
  boxes = np.where(valid[..., None], boxes, rng.uniform(-5, 70, boxes.shape))  # padding holds garbage
  logits = rng.normal(-2, 1.5, (batch, len(anchors), num_classes))
  deltas = rng.normal(0, 1, (batch, len(anchors), 4))
  return dict(anchors=anchors.astype(np.float32), cls_logits=logits.astype(np.float32),
              box_deltas=deltas.astype(np.float32), gt_boxes=boxes.astype(np.float32),
              gt_classes=classes.astype(np.int32), gt_valid=valid)


def reference(case):
  sums = [np_loss_sums(case["anchors"].astype(np.float64), case["cls_logits"][b].astype(np.float64),
                       case["box_deltas"][b].astype(np.float64),
                       case["gt_boxes"][b][case["gt_valid"][b]].astype(np.float64),
                       case["gt_classes"][b][case["gt_valid"][b]]) for b in range(len(case["gt_valid"]))]
  cls_sum, box_sum, num_pos = np.sum(sums, axis=0)
  return {"cls_loss": cls_sum / max(num_pos, 1), "box_loss": box_sum / max(num_pos, 1)}, num_pos


def loss(case, **kwargs):
  return retinanet.retinanet_loss(case["anchors"], case["cls_logits"], case["box_deltas"], case["gt_boxes"],
                                  case["gt_classes"], case["gt_valid"], **kwargs)


# === Assignment ===

def test_assignment_thresholds_and_low_quality_matches():
  anchors = np.array([[0, 0, 10, 10], [0, 0, 10, 8.5], [0, 0, 10, 4.5], [0, 0, 10, 2], [50, 50, 60, 60],
                      [40, 40, 44, 44]], np.float32)
  # GT 0 = anchor 0 (IoU 1); anchor 1 has IoU 0.85 (positive), anchor 2 0.45 (ignored), anchor 3 0.2 (negative).
  # GT 1 overlaps anchor 4 at 0.25 only: a low-quality match. GT 2 is padding exactly on anchor 5.
  gt = np.array([[[0, 0, 10, 10], [50, 50, 55, 55], [40, 40, 44, 44]]], np.float32)
  valid = [[True, True, False]]
  matched, max_iou = retinanet.max_iou_assign(anchors, gt, valid)
  assert matched.numpy().tolist() == [[0, 0, -2, -1, 1, -1]]
  np.testing.assert_allclose(max_iou[0], [1, 0.85, 0.45, 0.2, 0.25, 0], atol=1e-6)
  matched, _ = retinanet.max_iou_assign(anchors, gt, valid, match_low_quality=False)
  assert matched.numpy().tolist() == [[0, 0, -2, -1, -1, -1]]
  matched, _ = retinanet.max_iou_assign(anchors, gt, valid, min_pos_iou=0.3)
  assert matched.numpy().tolist() == [[0, 0, -2, -1, -1, -1]]
  matched, _ = retinanet.max_iou_assign(anchors, gt, valid, pos_iou_thr=0.9, neg_iou_thr=0.1)
  assert matched.numpy().tolist() == [[0, -2, -2, -2, 1, -1]]


def test_assignment_matches_reference_and_last_gt_wins_ties():
  # Two identical GT claim the same best anchors: the later one wins them, as in mmdetection's loop over GT.
  anchors = retinanet_anchors(IMAGE).numpy()
  gt = np.array([[[3, 3, 9, 9], [3, 3, 9, 9], [20, 20, 60, 50]]], np.float32)
  matched, _ = retinanet.max_iou_assign(anchors, gt, [[True, True, True]])
  expected = np_assign(anchors.astype(np.float64), gt[0].astype(np.float64))
  np.testing.assert_array_equal(matched[0], expected)
  iou = np_iou(gt[0, :1].astype(np.float64), anchors.astype(np.float64))[0]
  assert (expected[iou == iou.max()] == 1).all() and 0 not in expected and 2 in expected
  for seed in range(4):
    case = make_case(seed)
    matched, _ = retinanet.max_iou_assign(case["anchors"], case["gt_boxes"], case["gt_valid"])
    for b in range(len(case["gt_valid"])):
      index = np.flatnonzero(case["gt_valid"][b])
      expected = np_assign(case["anchors"].astype(np.float64), case["gt_boxes"][b][index].astype(np.float64))
      slots = index[np.maximum(expected, 0)] if len(index) else expected  # GT number -> slot in the batch
      np.testing.assert_array_equal(matched[b], np.where(expected >= 0, slots, expected))


def test_gt_overlapping_no_anchor_claims_nothing():
  anchors = np.array([[0, 0, 10, 10], [20, 20, 30, 30]], np.float32)
  matched, _ = retinanet.max_iou_assign(anchors, np.array([[[40, 40, 50, 50]]], np.float32), [[True]])
  assert matched.numpy().tolist() == [[-1, -1]]


# === Loss ===

@pytest.mark.parametrize("seed", [0, 1, 2])
def test_loss_matches_reference(seed):
  case = make_case(seed)
  expected, num_pos = reference(case)
  assert num_pos > 0
  out = loss(case)
  for k in expected:
    np.testing.assert_allclose(out[k], expected[k], rtol=1e-5)


def test_eager_equals_xla():
  case = make_case(3)
  eager = loss(case)
  compiled = tf.function(lambda c: loss(c), jit_compile=True)({k: tf.constant(v) for k, v in case.items()})
  for k in eager:
    np.testing.assert_allclose(compiled[k], eager[k], rtol=1e-5)


def test_batched_equals_per_image():
  case = make_case(4)
  _, num_pos = reference(case)
  batched = loss(case)
  totals = {k: 0.0 for k in batched}
  for b in range(len(case["gt_valid"])):
    one = {k: v[b:b + 1] if k != "anchors" else v for k, v in case.items()}
    _, n = reference(one)
    for k, v in loss(one).items():
      totals[k] += float(v) * max(n, 1)
  for k in batched:
    np.testing.assert_allclose(float(batched[k]) * max(num_pos, 1), totals[k], rtol=1e-5)


def test_two_replica_shares_add_up(two_replica_strategy):
  case = make_case(6, batch=4)
  single = loss(case)
  halves = [{k: v if k == "anchors" else v[i * 2:(i + 1) * 2] for k, v in case.items()} for i in range(2)]
  values = two_replica_strategy.experimental_distribute_values_from_function(
      lambda ctx: halves[ctx.replica_id_in_sync_group])
  per_replica = two_replica_strategy.run(tf.function(lambda c: loss(c)), args=(values,))
  summed = two_replica_strategy.reduce("SUM", per_replica, axis=None)
  for k in single:
    np.testing.assert_allclose(summed[k], single[k], rtol=1e-5)


def _loss_and_grads(case):
  logits, deltas = tf.Variable(case["cls_logits"]), tf.Variable(case["box_deltas"])
  with tf.GradientTape() as tape:
    out = loss(dict(case, cls_logits=logits, box_deltas=deltas))
    total = out["cls_loss"] + out["box_loss"]
  return out, tape.gradient(total, [logits, deltas])


def test_no_objects_all_padding_and_tiny_objects_are_finite():
  case = make_case(7)
  empty = dict(case, gt_valid=np.zeros_like(case["gt_valid"]))
  out, grads = _loss_and_grads(empty)
  assert float(out["box_loss"]) == 0.0
  logits = case["cls_logits"].astype(np.float64)
  np.testing.assert_allclose(out["cls_loss"], np_focal(logits, np.zeros_like(logits)).sum(), rtol=1e-5)
  assert all(np.isfinite(g.numpy()).all() for g in grads)
  # Objects far smaller than every anchor (and one of zero size) still train their best anchors, without NaN.
  tiny = dict(case, gt_boxes=np.tile(np.array([[[10, 10, 11, 11.5], [30, 30, 30, 34], [40, 40, 42, 41]]],
                                              np.float32), [3, 1, 1]),
              gt_classes=np.zeros([3, 3], np.int32), gt_valid=np.ones([3, 3], bool))
  out, grads = _loss_and_grads(tiny)
  assert all(np.isfinite(float(v)) for v in out.values()) and float(out["box_loss"]) > 0
  assert all(np.isfinite(g.numpy()).all() for g in grads)
  expected, _ = reference(tiny)
  for k in expected:
    np.testing.assert_allclose(out[k], expected[k], rtol=1e-5)


def test_bfloat16_inputs_give_float32():
  case = make_case(8)
  out = loss(dict(case, cls_logits=tf.cast(case["cls_logits"], tf.bfloat16),
                  box_deltas=tf.cast(case["box_deltas"], tf.bfloat16)))
  assert all(v.dtype == tf.float32 and np.isfinite(v.numpy()) for v in out.values())


def test_bad_arguments():
  case = make_case(0)
  with pytest.raises(ValueError, match="neg_iou_thr"):
    loss(case, pos_iou_thr=0.3, neg_iou_thr=0.4)
  with pytest.raises(ValueError, match="min_pos_iou"):
    loss(case, min_pos_iou=-0.1)
  with pytest.raises(ValueError, match="alpha"):
    loss(case, alpha=1.5)
  with pytest.raises(ValueError, match="cls_logits"):
    loss(dict(case, cls_logits=case["cls_logits"][0]))
  with pytest.raises(ValueError, match="gt_valid"):
    loss(dict(case, gt_valid=case["gt_valid"][:, :2]))
  with pytest.raises(ValueError, match="anchors"):
    loss(dict(case, anchors=case["anchors"][:10]))


# === Smooth L1 ===

def test_smooth_l1_values_and_gradients():
  x = tf.constant([-1e30, -1.0, -0.05, 0.0, 0.05, 0.11, 2.0, 1e30])
  with tf.GradientTape() as tape:
    tape.watch(x)
    y = smooth_l1(x, beta=0.11)
  np.testing.assert_allclose(y[1:-1], np_smooth_l1(x.numpy()[1:-1].astype(np.float64), 0.11), rtol=1e-6)
  grad = tape.gradient(y, x).numpy()
  assert np.isfinite(y.numpy()).all() and np.isfinite(grad).all()
  np.testing.assert_allclose(grad[[0, 1, 6, 7]], [-1, -1, 1, 1])
  np.testing.assert_allclose(smooth_l1(x[1:-1], beta=0.0), np.abs(x.numpy()[1:-1]))
  compiled = tf.function(lambda v: smooth_l1(v, beta=0.11), jit_compile=True)(x)
  np.testing.assert_allclose(compiled, y, rtol=1e-6)
  for beta in (-0.1, True, "0.1"):
    with pytest.raises(ValueError, match="beta"):
      smooth_l1(x, beta=beta)
