"""SimOTA assignment against the super-gradients golden vectors (tests/data/yolox, see its README upstream)."""

import os

import numpy as np
import pytest
import tensorflow as tf

from tfreward.ops import simota
from tfreward.ops import yolox_grid

GOLDEN = np.load(os.path.join(os.path.dirname(__file__), "..", "data", "yolox", "cases.npz"))
CASES = list(range(int(GOLDEN["num_cases"])))
STRIDES = (8, 16, 32)


def rows_to_padded(targets, batch_size, num_slots=None, slot_of=lambda j: j):
  """Reference target rows [T, 6] (image, class, cx, cy, w, h) -> padded [B, M] arrays.

  The j-th row of image b (in order of appearance) goes to slot `slot_of(j)`; padding slots hold garbage boxes and
  class -1. Returns boxes [B, M, 4], classes [B, M], valid [B, M] and the (b, slot) of every row.
  """
  counts = [int(np.sum(targets[:, 0] == b)) for b in range(batch_size)]
  num_slots = num_slots or max([1] + [slot_of(c - 1) + 1 for c in counts if c])
  rng = np.random.default_rng(123)
  boxes = rng.uniform(-50, 200, size=(batch_size, num_slots, 4)).astype(np.float32)
  classes = np.full((batch_size, num_slots), -1, np.int32)
  valid = np.zeros((batch_size, num_slots), bool)
  seen, where = [0] * batch_size, []
  for row in targets:
    b = int(row[0])
    slot = slot_of(seen[b])
    seen[b] += 1
    boxes[b, slot], classes[b, slot], valid[b, slot] = row[2:6], int(row[1]), True
    where.append((b, slot))
  return boxes, classes, valid, where


def case_inputs(i):
  outputs = [tf.constant(GOLDEN[f"case{i}_pred_s{s}"]) for s in STRIDES]
  grid, strides = yolox_grid.anchor_grid(outputs, STRIDES)
  raw = yolox_grid.flatten_levels(outputs)
  return dict(pred_boxes=yolox_grid.decode_boxes(raw[..., :4], grid, strides), obj_logits=raw[..., 4],
              cls_logits=raw[..., 5:], anchor_centers=yolox_grid.cell_centers(grid, strides), anchor_strides=strides)


def assign(inputs, boxes, classes, valid, jit=False, **kwargs):
  fn = lambda *args: simota.simota_assign(*args, **kwargs)  # noqa: E731
  if jit:
    fn = tf.function(fn, jit_compile=True)
  args = [inputs[k] for k in ("pred_boxes", "obj_logits", "cls_logits", "anchor_centers", "anchor_strides")]
  return {k: v.numpy() for k, v in fn(*args, tf.constant(boxes), tf.constant(classes), tf.constant(valid)).items()}


def check_against_golden(i, result, where, slot_to_index, prefix=""):
  g = lambda name: GOLDEN[f"case{i}_{prefix}{name}"]  # noqa: E731
  np.testing.assert_array_equal(result["fg_mask"], g("fg_mask"))
  matched = np.where(result["matched_gt"] >= 0, slot_to_index[np.maximum(result["matched_gt"], 0)], -1)
  np.testing.assert_array_equal(matched, g("matched_gt"))
  np.testing.assert_allclose(result["matched_iou"], g("matched_iou"), atol=1e-5, rtol=0)
  np.testing.assert_array_equal(result["candidate_mask"], GOLDEN[f"case{i}_candidate_mask"])
  expected_k = np.maximum(g("dynamic_k"), 0)  # golden: -1 for a fast-variant object without candidates
  np.testing.assert_array_equal([result["dynamic_k"][b, s] for b, s in where], expected_k)


@pytest.mark.parametrize("variant", ["exact", "fast"])
@pytest.mark.parametrize("i", CASES)
def test_golden(i, variant):
  targets = GOLDEN[f"case{i}_targets"]
  batch = GOLDEN[f"case{i}_pred_s8"].shape[0]
  boxes, classes, valid, where = rows_to_padded(targets, batch)
  result = assign(case_inputs(i), boxes, classes, valid, variant=variant)
  check_against_golden(i, result, where, np.arange(boxes.shape[1]), prefix="fast_" if variant == "fast" else "")
  assert result["fg_mask"].any()


@pytest.mark.parametrize("variant", ["exact", "fast"])
def test_golden_with_interleaved_padding_matches_and_jit_equals_eager(variant):
  i = 4  # shuffled rows, an empty image, tiny boxes
  targets = GOLDEN[f"case{i}_targets"]
  batch = GOLDEN[f"case{i}_pred_s8"].shape[0]
  boxes, classes, valid, where = rows_to_padded(targets, batch, num_slots=27, slot_of=lambda j: 2 * j + 1)
  slot_to_index = np.arange(27) // 2  # slot 2j + 1 holds the j-th object
  inputs = case_inputs(i)
  eager = assign(inputs, boxes, classes, valid, variant=variant)
  check_against_golden(i, eager, where, slot_to_index, prefix="fast_" if variant == "fast" else "")
  compiled = assign(inputs, boxes, classes, valid, jit=True, variant=variant)
  for key in ("fg_mask", "matched_gt", "dynamic_k", "candidate_mask"):
    np.testing.assert_array_equal(compiled[key], eager[key])
  np.testing.assert_allclose(compiled["matched_iou"], eager["matched_iou"], atol=1e-6)


def test_batched_equals_per_image():
  i = 1
  batch = GOLDEN[f"case{i}_pred_s8"].shape[0]
  boxes, classes, valid, _ = rows_to_padded(GOLDEN[f"case{i}_targets"], batch)
  inputs = case_inputs(i)
  batched = assign(inputs, boxes, classes, valid)
  for b in range(batch):
    single = {k: (v if k.startswith("anchor") else v[b:b + 1]) for k, v in inputs.items()}
    one = assign(single, boxes[b:b + 1], classes[b:b + 1], valid[b:b + 1])
    for key, value in one.items():
      np.testing.assert_array_equal(value[0], batched[key][b])


def test_all_padding_and_no_slots():
  inputs = case_inputs(0)
  batch = GOLDEN["case0_pred_s8"].shape[0]
  for num_slots in (3, 0):
    boxes = np.full((batch, num_slots, 4), 50.0, np.float32)
    result = assign(inputs, boxes, np.zeros((batch, num_slots), np.int32), np.zeros((batch, num_slots), bool))
    assert not result["fg_mask"].any() and not result["candidate_mask"].any()
    assert np.all(result["matched_gt"] == -1) and np.all(result["matched_iou"] == 0)
    assert result["dynamic_k"].shape == (batch, num_slots) and not result["dynamic_k"].any()


def test_object_without_candidates_gets_nothing():
  inputs = case_inputs(0)
  boxes = np.array([[[-500.0, -500.0, 10.0, 10.0]], [[64.0, 64.0, 20.0, 20.0]]], np.float32)
  for variant in ("exact", "fast"):
    result = assign(inputs, boxes, np.zeros((2, 1), np.int32), np.ones((2, 1), bool), variant=variant)
    assert not result["fg_mask"][0].any() and result["dynamic_k"][0, 0] == 0
    assert result["fg_mask"][1].any() and result["dynamic_k"][1, 0] >= 1


def test_ties_go_to_the_lowest_anchor_index():
  # Every stride-8 cell predicts the object box exactly with equal logits: all its strong candidates tie.
  outputs = [tf.zeros([1, 64 // s, 64 // s, 6]) for s in STRIDES]
  grid, strides = yolox_grid.anchor_grid(outputs, STRIDES)
  gt = np.array([32.0, 32.0, 48.0, 48.0], np.float32)
  stride_8 = slice(0, 64)
  raw = np.zeros((1, grid.shape[0], 4), np.float32)
  raw[0, stride_8, :2] = gt[:2] / 8.0 - grid.numpy()[stride_8]
  raw[0, stride_8, 2:] = np.log(gt[2:] / 8.0)  # coarser levels predict small boxes, never tied with these
  centres = yolox_grid.cell_centers(grid, strides)
  inputs = dict(pred_boxes=yolox_grid.decode_boxes(tf.constant(raw), grid, strides), obj_logits=tf.zeros([1, 84]),
                cls_logits=tf.zeros([1, 84, 1]), anchor_centers=centres, anchor_strides=strides)
  args = (gt[None, None], np.zeros((1, 1), np.int32), np.ones((1, 1), bool))
  eager = assign(inputs, *args)
  compiled = assign(inputs, *args, jit=True)
  c = centres.numpy()[stride_8]
  inside = np.all((c > gt[:2] - gt[2:] / 2) & (c < gt[:2] + gt[2:] / 2), axis=1)
  near = np.all(np.abs(c - gt[:2]) < 2.5 * 8, axis=1)
  strong = np.flatnonzero(inside & near)
  k = eager["dynamic_k"][0, 0]
  assert len(strong) == 16 and k in (9, 10)
  np.testing.assert_array_equal(np.flatnonzero(eager["fg_mask"][0]), strong[:k])
  np.testing.assert_array_equal(compiled["fg_mask"], eager["fg_mask"])


def test_conflicts_go_to_the_cheapest_object():
  # Two identical boxes, classes 0 and 1, class 1 predicted confidently and equal objectness everywhere: both objects
  # rank the anchors alike and select the same ones, all conflicts go to the class-1 object (the other loses all).
  inputs = case_inputs(0)
  cls = inputs["cls_logits"].numpy()
  cls[..., 0], cls[..., 1] = -6.0, 6.0
  inputs["cls_logits"] = tf.constant(cls)
  inputs["obj_logits"] = tf.zeros_like(inputs["obj_logits"])
  boxes = np.tile(np.array([[[60.0, 60.0, 40.0, 40.0]]], np.float32), (2, 2, 1))
  classes = np.tile(np.array([[0, 1]], np.int32), (2, 1))
  for variant in ("exact", "fast"):
    result = assign(inputs, boxes, classes, np.ones((2, 2), bool), variant=variant)
    np.testing.assert_array_equal(result["dynamic_k"][:, 0], result["dynamic_k"][:, 1])
    np.testing.assert_array_equal(result["fg_mask"].sum(axis=1), result["dynamic_k"][:, 1])
    assert np.all(result["matched_gt"][result["fg_mask"]] == 1)


@pytest.mark.parametrize("variant", ["exact", "fast"])
def test_non_finite_predictions_rank_last_and_agree_eagerly_and_under_xla(variant):
  # NaN / inf meet comparisons, top_k and float-to-int casts, which treat them differently eagerly and compiled
  # unless the costs are sanitised: the assignment must be defined and identical in both modes.
  inputs = case_inputs(0)
  boxes, classes, valid, _ = rows_to_padded(GOLDEN["case0_targets"], 2)
  clean = assign(inputs, boxes, classes, valid, variant=variant)
  poisoned = dict(inputs)
  fg = np.flatnonzero(clean["fg_mask"][0])
  pred, obj, cls = (poisoned[k].numpy() for k in ("pred_boxes", "obj_logits", "cls_logits"))
  pred[0, fg[0], 0], obj[0, fg[1]], cls[0, fg[2], 1], pred[1, :, 2] = np.nan, np.inf, np.nan, np.inf
  poisoned.update(pred_boxes=tf.constant(pred), obj_logits=tf.constant(obj), cls_logits=tf.constant(cls))
  eager = assign(poisoned, boxes, classes, valid, variant=variant)
  compiled = assign(poisoned, boxes, classes, valid, jit=True, variant=variant)
  for key in ("fg_mask", "matched_gt", "dynamic_k", "candidate_mask"):
    np.testing.assert_array_equal(compiled[key], eager[key])
  assert np.all(np.isfinite(eager["matched_iou"])) and np.all(np.isfinite(compiled["matched_iou"]))
  np.testing.assert_allclose(compiled["matched_iou"], eager["matched_iou"], atol=1e-6)
  assert eager["fg_mask"][0].any() and not np.any(eager["matched_iou"][1])  # image 1: every box is infinite


@pytest.mark.parametrize("box", [[64.0, 64.0, 0.0, 20.0], [64.0, 64.0, 0.0, 0.0], [64.0, 64.0, -10.0, 20.0],
                                 [64.0, np.nan, 10.0, 20.0]])
def test_valid_objects_without_positive_extent_are_padding(box):
  inputs = case_inputs(0)
  boxes = np.array([[box, [40.0, 40.0, 30.0, 30.0]], [[64.0, 64.0, 20.0, 20.0], box]], np.float32)
  classes, valid = np.ones((2, 2), np.int32), np.ones((2, 2), bool)
  for jit in (False, True):
    result = assign(inputs, boxes, classes, valid, jit=jit)
    assert result["dynamic_k"][0, 0] == 0 and result["dynamic_k"][1, 1] == 0
    assert not np.any(result["matched_gt"][0] == 0) and not np.any(result["matched_gt"][1] == 1)
    as_padding = assign(inputs, boxes, classes, np.array([[False, True], [True, False]]), jit=jit)
    for key, value in as_padding.items():
      np.testing.assert_array_equal(result[key], value)


def test_bfloat16_inputs_run_in_float32():
  inputs = {k: tf.cast(v, tf.bfloat16) for k, v in case_inputs(0).items()}
  boxes, classes, valid, _ = rows_to_padded(GOLDEN["case0_targets"], 2)
  result = assign(inputs, boxes, classes, valid, jit=True)
  assert result["matched_iou"].dtype == np.float32
  assert result["fg_mask"].any() and np.all(np.isfinite(result["matched_iou"]))


def test_bad_arguments():
  inputs = case_inputs(0)
  boxes, classes, valid, _ = rows_to_padded(GOLDEN["case0_targets"], 2)
  with pytest.raises(ValueError, match="'greedy'"):
    assign(inputs, boxes, classes, valid, variant="greedy")
  with pytest.raises(ValueError, match="-1.0"):
    assign(inputs, boxes, classes, valid, center_radius=-1.0)
  with pytest.raises(ValueError, match="0.0"):
    assign(inputs, boxes, classes, valid, dynamic_k_bias=0.0)
