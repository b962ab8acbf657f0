"""YOLOX loss against the super-gradients golden vectors (tests/data/yolox), XLA, replicas and edge cases."""

import os

import numpy as np
import pytest
import tensorflow as tf

from tfreward.losses import yolox

GOLDEN = np.load(os.path.join(os.path.dirname(__file__), "..", "data", "yolox", "cases.npz"))
CASES = list(range(int(GOLDEN["num_cases"])))
STRIDES = (8, 16, 32)
VARIANTS = {
    "noL1_iou": dict(use_l1=False, iou_type="iou", variant="exact"),
    "L1_iou": dict(use_l1=True, iou_type="iou", variant="exact"),
    "noL1_giou": dict(use_l1=False, iou_type="giou", variant="exact"),
    "fast_noL1": dict(use_l1=False, iou_type="iou", variant="fast"),
}
LOSSES = ("iou", "obj", "cls", "l1", "total")


def rows_to_padded(targets, batch_size):
  """Reference rows [T, 6] (image, class, cx, cy, w, h) -> boxes [B, M, 4], classes [B, M], valid [B, M].

  Objects keep their order of appearance within their image (slot j = j-th row of that image)."""
  counts = [int(np.sum(targets[:, 0] == b)) for b in range(batch_size)]
  num_slots = max([1] + counts)
  boxes = np.zeros((batch_size, num_slots, 4), np.float32)
  classes = np.full((batch_size, num_slots), -1, np.int32)
  valid = np.zeros((batch_size, num_slots), bool)
  seen = [0] * batch_size
  for row in targets:
    b = int(row[0])
    boxes[b, seen[b]], classes[b, seen[b]], valid[b, seen[b]] = row[2:6], int(row[1]), True
    seen[b] += 1
  return boxes, classes, valid


def case(i):
  outputs = [GOLDEN[f"case{i}_pred_s{s}"] for s in STRIDES]
  boxes, classes, valid = rows_to_padded(GOLDEN[f"case{i}_targets"], outputs[0].shape[0])
  return outputs, boxes, classes, valid, int(GOLDEN[f"case{i}_num_classes"])


def loss_and_grads(outputs, boxes, classes, valid, jit=False, **kwargs):
  """Loss dict (numpy) and d total / d outputs."""
  def fn(outs, boxes, classes, valid):
    with tf.GradientTape() as tape:
      tape.watch(outs)
      result = yolox.yolox_loss(outs, boxes, classes, valid, **kwargs)
    return result, tape.gradient(result["total"], outs)

  if jit:
    fn = tf.function(fn, jit_compile=True)
  result, grads = fn([tf.constant(o) for o in outputs], tf.constant(boxes), tf.constant(classes), tf.constant(valid))
  return {k: v.numpy() for k, v in result.items()}, [g.numpy() for g in grads]


def components(result):
  return np.array([result[name] for name in yolox.COMPONENTS])


@pytest.mark.parametrize("name", list(VARIANTS))
@pytest.mark.parametrize("i", CASES)
def test_golden(i, name):
  outputs, boxes, classes, valid, num_classes = case(i)
  result = yolox.yolox_loss([tf.constant(o) for o in outputs], boxes, classes, valid, num_classes=num_classes,
                            **VARIANTS[name])
  got = np.array([result[n].numpy() for n in yolox.COMPONENTS])
  np.testing.assert_allclose(got, GOLDEN[f"case{i}_loss_components_{name}"], rtol=1e-5, atol=0)
  prefix = "fast_" if name.startswith("fast") else ""
  np.testing.assert_array_equal(result["fg_mask"].numpy(), GOLDEN[f"case{i}_{prefix}fg_mask"])
  np.testing.assert_array_equal(result["matched_gt"].numpy(), GOLDEN[f"case{i}_{prefix}matched_gt"])
  np.testing.assert_allclose(result["matched_iou"].numpy(), GOLDEN[f"case{i}_{prefix}matched_iou"], atol=1e-5)


@pytest.mark.parametrize("variant", ["exact", pytest.param("fast", marks=pytest.mark.slow)])
def test_jit_equals_eager_with_gradients(variant):
  # The fast variant's assignment is compared under XLA in tests/ops/test_simota.py; its loss terms are shared.
  outputs, boxes, classes, valid, num_classes = case(4)
  kwargs = dict(num_classes=num_classes, use_l1=True, iou_type="giou", variant=variant)
  eager, eager_grads = loss_and_grads(outputs, boxes, classes, valid, **kwargs)
  compiled, compiled_grads = loss_and_grads(outputs, boxes, classes, valid, jit=True, **kwargs)
  np.testing.assert_allclose(components(compiled), components(eager), rtol=1e-5)
  for key in yolox.ASSIGNMENT_KEYS[:2]:
    np.testing.assert_array_equal(compiled[key], eager[key])
  for c, e in zip(compiled_grads, eager_grads):
    np.testing.assert_allclose(c, e, rtol=1e-4, atol=1e-7)


def test_gradients_of_obj_and_cls_channels_are_analytic():
  # The assignment carries no gradient, so d total / d obj = (sigmoid(obj) - fg) / num_fg and
  # d total / d cls_j = fg * (sigmoid(cls_j) - onehot_j * matched_iou) / num_fg.
  outputs, boxes, classes, valid, num_classes = case(1)
  result, grads = loss_and_grads(outputs, boxes, classes, valid, num_classes=num_classes)
  flat = np.concatenate([o.reshape(o.shape[0], -1, o.shape[-1]) for o in outputs], axis=1)
  flat_grads = np.concatenate([g.reshape(g.shape[0], -1, g.shape[-1]) for g in grads], axis=1)
  fg = result["fg_mask"]
  num_fg = fg.sum()
  sigmoid = lambda x: 1.0 / (1.0 + np.exp(-x))  # noqa: E731
  np.testing.assert_allclose(flat_grads[..., 4], (sigmoid(flat[..., 4]) - fg) / num_fg, atol=1e-7)
  target_class = np.take_along_axis(classes, np.maximum(result["matched_gt"], 0), axis=1)
  cls_target = np.eye(num_classes)[target_class] * result["matched_iou"][..., None]
  np.testing.assert_allclose(flat_grads[..., 5:], fg[..., None] * (sigmoid(flat[..., 5:]) - cls_target) / num_fg,
                             atol=1e-7)
  assert np.all(flat_grads[~fg][:, :4] == 0) and np.any(flat_grads[fg][:, :4] != 0)


@pytest.mark.parametrize("variant", ["exact", "fast"])
def test_two_replicas_equal_one(two_replica_strategy, variant):
  outputs, boxes, classes, valid, num_classes = case(4)  # 4 images: 12 objects, 0, 5, 9
  kwargs = dict(num_classes=num_classes, use_l1=True, variant=variant)
  whole, whole_grads = loss_and_grads(outputs, boxes, classes, valid, **kwargs)
  strategy = two_replica_strategy
  halves = [([o[:2] for o in outputs], boxes[:2], classes[:2], valid[:2]),
            ([o[2:] for o in outputs], boxes[2:], classes[2:], valid[2:])]
  per_replica = strategy.experimental_distribute_values_from_function(
      lambda ctx: tf.nest.map_structure(tf.constant, halves[ctx.replica_id_in_sync_group]))

  def replica_fn(outs, boxes, classes, valid):
    with tf.GradientTape() as tape:
      tape.watch(outs)
      result = yolox.yolox_loss(outs, boxes, classes, valid, **kwargs)
    return {name: result[name] for name in yolox.COMPONENTS}, tape.gradient(result["total"], outs)

  # The trainer's step under MirroredStrategy: a graph, the normaliser all-reduced inside the loss.
  for fn in (replica_fn,):
    shares, grads = strategy.run(tf.function(fn), args=per_replica)
    shares = [{k: v.numpy() for k, v in s.items()} for s in strategy.experimental_local_results(shares)]
    summed = {name: shares[0][name] + shares[1][name] for name in yolox.COMPONENTS}
    np.testing.assert_allclose(components(summed), components(whole), rtol=1e-5)
    assert shares[0]["total"] != shares[1]["total"]
    local_grads = strategy.experimental_local_results(grads)
    for level in range(len(STRIDES)):
      joined = np.concatenate([local_grads[0][level].numpy(), local_grads[1][level].numpy()], axis=0)
      np.testing.assert_allclose(joined, whole_grads[level], rtol=1e-5, atol=1e-9)


def test_batched_sums_equal_per_image_sums():
  outputs, boxes, classes, valid, num_classes = case(4)
  kwargs = dict(num_classes=num_classes, use_l1=True, iou_type="giou")
  batched = yolox._loss_sums([tf.constant(o) for o in outputs], boxes, classes, valid, **kwargs)
  per_image = [yolox._loss_sums([tf.constant(o[b:b + 1]) for o in outputs], boxes[b:b + 1], classes[b:b + 1],
                                valid[b:b + 1], **kwargs) for b in range(len(boxes))]
  for key in ("iou", "obj", "cls", "l1", "total", "num_fg", "num_gts"):
    np.testing.assert_allclose(sum(s[key].numpy() for s in per_image), batched[key].numpy(), rtol=1e-5)
  for key in yolox.ASSIGNMENT_KEYS:
    np.testing.assert_array_equal(np.concatenate([s[key].numpy() for s in per_image]), batched[key].numpy())
  assert batched["num_gts"].numpy() == len(GOLDEN["case4_targets"])


def test_bfloat16_outputs_give_float32_losses():
  outputs, boxes, classes, valid, num_classes = case(0)
  bf16 = [tf.cast(o, tf.bfloat16) for o in outputs]
  # Under XLA: tests/ops/test_simota.py (the loss casts its inputs before anything else).
  result = yolox.yolox_loss(bf16, boxes, classes, valid, num_classes=num_classes, use_l1=True)
  assert all(result[name].dtype == tf.float32 for name in yolox.COMPONENTS)
  reference = yolox.yolox_loss([tf.cast(o, tf.float32) for o in bf16], boxes, classes, valid,
                               num_classes=num_classes, use_l1=True)
  np.testing.assert_allclose(result["total"].numpy(), reference["total"].numpy(), rtol=1e-5)
  assert np.isfinite(result["total"].numpy()) and result["fg_mask"].numpy().any()


@pytest.mark.parametrize("variant", ["exact", "fast"])
def test_batch_without_objects(variant):
  outputs, boxes, classes, valid, num_classes = case(0)
  for num_slots in (5, 0):
    shape = (2, num_slots)
    result, grads = loss_and_grads(outputs, np.zeros(shape + (4,), np.float32), np.full(shape, -1, np.int32),
                                   np.zeros(shape, bool), num_classes=num_classes, use_l1=True, variant=variant)
    obj = np.concatenate([o[..., 4].reshape(2, -1) for o in outputs], axis=1).astype(np.float64)
    expected_obj = np.sum(np.maximum(obj, 0) + np.log1p(np.exp(-np.abs(obj))))
    np.testing.assert_allclose(result["obj"], expected_obj, rtol=1e-5)
    np.testing.assert_allclose(result["total"], expected_obj, rtol=1e-5)
    assert result["iou"] == result["cls"] == result["l1"] == 0.0 and result["num_fg_over_num_gts"] == 1.0
    assert not result["fg_mask"].any() and np.all(result["matched_gt"] == -1)
    assert all(np.all(np.isfinite(g)) for g in grads)


EDGE_BOXES = {
    "tiny, smaller than a stride": [[30.0, 30.0, 3.0, 2.5], [101.0, 77.0, 5.0, 5.0]],
    "touching the border": [[10.0, 64.0, 20.0, 40.0], [112.0, 118.0, 32.0, 20.0]],
    "degenerate": [[64.0, 64.0, 0.0, 20.0], [40.0, 40.0, 0.0, 0.0]],
    "inverted": [[64.0, 64.0, -10.0, 20.0], [90.0, 40.0, 12.0, -4.0]],
    "outside the image": [[-300.0, 64.0, 10.0, 10.0], [64.0, 64.0, 30.0, 30.0]],
}


@pytest.mark.parametrize("iou_type", ["iou", "giou"])
@pytest.mark.parametrize("variant", ["exact", "fast"])
@pytest.mark.parametrize("edge", list(EDGE_BOXES))
def test_edge_boxes_give_no_nan(edge, variant, iou_type):
  outputs, _, _, _, num_classes = case(0)
  boxes = np.zeros((2, 3, 4), np.float32)
  boxes[0, :2] = EDGE_BOXES[edge]
  boxes[1, 0] = EDGE_BOXES[edge][1]
  valid = np.array([[True, True, False], [True, False, False]])
  classes = np.array([[1, 2, -1], [4, -1, -1]], np.int32)
  result, grads = loss_and_grads(outputs, boxes, classes, valid, num_classes=num_classes, use_l1=True,
                                 iou_type=iou_type, variant=variant)
  assert all(np.isfinite(result[name]) for name in yolox.COMPONENTS), result
  assert all(np.all(np.isfinite(g)) for g in grads)
  if edge in ("degenerate", "inverted"):  # no positive extent: padding for the loss, so no anchor is foreground
    assert not result["fg_mask"].any() and np.all(result["matched_gt"] == -1)
  else:
    assert result["fg_mask"].any()
  assert set(np.unique(result["matched_gt"])) <= {-1, 0, 1}


def test_bad_arguments():
  outputs, boxes, classes, valid, num_classes = case(0)
  outputs = [tf.constant(o) for o in outputs]
  call = lambda outs=outputs, **kw: yolox.yolox_loss(outs, boxes, classes, valid, **{"num_classes": 5, **kw})  # noqa
  with pytest.raises(ValueError, match="'diou'"):
    call(iou_type="diou")
  with pytest.raises(ValueError, match="'slow'"):
    call(variant="slow")
  with pytest.raises(ValueError, match="11 channels"):
    call(num_classes=6)
  with pytest.raises(ValueError, match=r"\(8, 16\)"):
    call(strides=(8, 16))
  with pytest.raises(ValueError, match="0"):
    call(num_classes=0)
  with pytest.raises(ValueError, match="Tensor"):
    call(outs=outputs[0])
