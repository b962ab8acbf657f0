"""SimOTA's windowed path (`levels` given: costs near each object, row and column loops) against the dense path.

The two must give the same assignment bit for bit: foreground masks, matched slots, matched IoUs, dynamic k and
candidate masks, eagerly and under XLA, for both variants; including objects that need their full row of costs,
conflicts resolved over all objects (exact variant), non-finite predictions and loops of several steps.
"""

import os

import numpy as np
import pytest
import tensorflow as tf

from tfreward.ops import simota
from tfreward.ops import simota_costs
from tfreward.ops import simota_windowed
from tfreward.ops import yolox_grid

GOLDEN = np.load(os.path.join(os.path.dirname(__file__), "..", "data", "yolox", "cases.npz"))
STRIDES = (8, 16, 32)


def random_problem(seed, batch=3, size=256, num_slots=24, num_classes=7, tiny=0.3, duplicates=0.2):
  """Head outputs and padded objects: a mix of tiny (few strong cells), large, duplicated and edge boxes."""
  rng = np.random.default_rng(seed)
  outputs = []
  for s in STRIDES:
    g = size // s
    out = np.empty((batch, g, g, 5 + num_classes), np.float32)
    out[..., :2] = 0.5 * rng.normal(size=(batch, g, g, 2))
    out[..., 2:4] = rng.normal(size=(batch, g, g, 2)) + np.log(2.0)
    out[..., 4:] = 2.0 * rng.normal(size=(batch, g, g, 1 + num_classes))
    outputs.append(out)
  boxes = rng.uniform(-40, size + 40, size=(batch, num_slots, 4)).astype(np.float32)
  boxes[..., 2:] = np.exp(rng.uniform(np.log(2), np.log(size), size=(batch, num_slots, 2)))
  small = rng.random((batch, num_slots)) < tiny
  boxes[small, 2:] = rng.uniform(1.0, 10.0, size=(int(small.sum()), 2))
  boxes = np.round(boxes * 4) / 4  # quarter pixels: centres on cell boundaries, exact ties of the region tests
  dup = rng.random((batch, num_slots)) < duplicates
  for b, j in zip(*np.nonzero(dup)):
    if j:
      boxes[b, j] = boxes[b, j - 1] + rng.choice([0.0, 0.25], size=4)
  classes = rng.integers(0, num_classes, size=(batch, num_slots)).astype(np.int32)
  valid = rng.random((batch, num_slots)) < 0.8
  valid[0] = False  # an image without objects
  valid[0, :2] = True
  for out, s in zip(outputs, STRIDES):  # about half the cells inside a box predict it (a "partly trained" head)
    centres = (np.arange(size // s) + 0.5) * s
    for b, j in zip(*np.nonzero(valid)):
      cx, cy, w, h = boxes[b, j]
      ys, xs = np.nonzero((np.abs(centres[:, None] - cy) < h / 2) & (np.abs(centres[None, :] - cx) < w / 2))
      keep = rng.random(len(ys)) < 0.5
      ys, xs = ys[keep], xs[keep]
      out[b, ys, xs, 0] = cx / s - xs + rng.normal(0, 0.1, len(xs))
      out[b, ys, xs, 1] = cy / s - ys + rng.normal(0, 0.1, len(xs))
      out[b, ys, xs, 2] = np.log(w / s) + rng.normal(0, 0.1, len(xs))
      out[b, ys, xs, 3] = np.log(h / s) + rng.normal(0, 0.1, len(xs))
  return outputs, boxes, classes, valid


def inputs_of(outputs):
  outputs = [tf.constant(o) for o in outputs]
  grid, strides = yolox_grid.anchor_grid(outputs, STRIDES)
  raw = yolox_grid.flatten_levels(outputs)
  return [yolox_grid.decode_boxes(raw[..., :4], grid, strides), raw[..., 4], raw[..., 5:],
          yolox_grid.cell_centers(grid, strides), strides], yolox_grid.static_level_sizes(outputs)


def assign(args, boxes, classes, valid, levels=None, jit=False, **kwargs):
  fn = lambda *a: simota.simota_assign(*a, levels=levels, **kwargs)  # noqa: E731
  if jit:
    fn = tf.function(fn, jit_compile=True)
  result = fn(*args, tf.constant(boxes), tf.constant(classes), tf.constant(valid))
  return {k: v.numpy() for k, v in result.items()}


def assert_same(dense, windowed):
  assert dense.keys() == windowed.keys()
  for key in dense:
    np.testing.assert_array_equal(windowed[key], dense[key], err_msg=key)


def count_paths(args, boxes, classes, valid, levels, variant):
  """(row objects, conflicting anchors) of the windowed path, read off its loop lists."""
  counts, compact = [], simota_windowed.compact

  def spy(mask):
    order, count = compact(mask)
    counts.append(int(count))
    return order, count

  simota_windowed.compact = spy
  try:
    assign(args, boxes, classes, valid, levels, variant=variant)
  finally:
    simota_windowed.compact = compact
  return counts


@pytest.mark.parametrize("variant", ["exact", "fast"])
@pytest.mark.parametrize("seed", range(6))
def test_windowed_equals_dense_eagerly(seed, variant):
  outputs, boxes, classes, valid = random_problem(seed)
  args, levels = inputs_of(outputs)
  assert_same(assign(args, boxes, classes, valid, variant=variant),
              assign(args, boxes, classes, valid, levels, variant=variant))


def test_the_random_problems_take_every_path():
  rows = conflicts = 0
  for seed in range(6):
    outputs, boxes, classes, valid = random_problem(seed)
    args, levels = inputs_of(outputs)
    counts = count_paths(args, boxes, classes, valid, levels, "exact")
    rows, conflicts = rows + counts[0], conflicts + counts[1]
    assert count_paths(args, boxes, classes, valid, levels, "fast")[0] >= 0
  assert rows > 10 and conflicts > 10


@pytest.mark.parametrize("variant", ["exact", "fast"])
def test_windowed_equals_dense_under_xla(variant):
  outputs, boxes, classes, valid = random_problem(7, batch=4, size=320, num_slots=40, num_classes=20)
  args, levels = inputs_of(outputs)
  dense = assign(args, boxes, classes, valid, jit=True, variant=variant)
  windowed = assign(args, boxes, classes, valid, levels, jit=True, variant=variant)
  assert_same(dense, windowed)
  eager = assign(args, boxes, classes, valid, levels, variant=variant)
  for key in ("fg_mask", "matched_gt", "dynamic_k", "candidate_mask"):
    np.testing.assert_array_equal(eager[key], windowed[key], err_msg=key)
  np.testing.assert_allclose(eager["matched_iou"], windowed["matched_iou"], atol=1e-6)


@pytest.mark.parametrize("variant", ["exact", "fast"])
def test_loops_of_several_steps_and_rows_for_every_object(variant, monkeypatch):
  outputs, boxes, classes, valid = random_problem(8)
  args, levels = inputs_of(outputs)
  dense = assign(args, boxes, classes, valid, variant=variant)
  monkeypatch.setattr(simota_windowed, "_ROWS_PER_STEP", 1)
  monkeypatch.setattr(simota_windowed, "_COLUMNS_PER_STEP", 3)
  assert_same(dense, assign(args, boxes, classes, valid, levels, variant=variant))
  monkeypatch.setattr(simota_windowed, "_ROWS_PER_STEP", 5)
  monkeypatch.setattr(simota_costs, "MAX_STRONG_FIRST_CLASSES", 0)  # as with >= 1000 classes: every object is a row
  counts = count_paths(args, boxes, classes, valid, levels, variant)
  assert counts[0] == int(np.sum(assign(args, boxes, classes, valid, variant=variant)["dynamic_k"] > 0))
  assert_same(dense, assign(args, boxes, classes, valid, levels, variant=variant))


@pytest.mark.parametrize("center_radius", [0.5, 1.0, 1.75, 4.0, 12.0])
def test_other_centre_radii(center_radius):
  outputs, boxes, classes, valid = random_problem(9)
  args, levels = inputs_of(outputs)
  for variant in ("exact", "fast"):
    assert_same(assign(args, boxes, classes, valid, variant=variant, center_radius=center_radius),
                assign(args, boxes, classes, valid, levels, variant=variant, center_radius=center_radius))


def test_non_finite_predictions():
  outputs, boxes, classes, valid = random_problem(10)
  args, levels = inputs_of(outputs)
  clean = assign(args, boxes, classes, valid, levels)
  pred, obj, cls = (a.numpy() for a in args[:3])
  fg = np.flatnonzero(clean["fg_mask"][1])
  pred[1, fg[0], 0], obj[1, fg[1]], cls[1, fg[2], 1], cls[1, fg[3], 0] = np.nan, np.inf, np.nan, -np.inf
  pred[2, :, 3] = np.inf
  args = [tf.constant(pred), tf.constant(obj), tf.constant(cls)] + args[3:]
  for variant in ("exact", "fast"):
    dense = assign(args, boxes, classes, valid, variant=variant)
    assert_same(dense, assign(args, boxes, classes, valid, levels, variant=variant))
    assert not dense["fg_mask"][1, fg[:4]].any() and not np.any(dense["matched_iou"][2])


def test_golden_cases_on_the_windowed_path():
  for i in range(int(GOLDEN["num_cases"])):
    targets = GOLDEN[f"case{i}_targets"]
    batch = GOLDEN[f"case{i}_pred_s8"].shape[0]
    counts = [int(np.sum(targets[:, 0] == b)) for b in range(batch)]
    boxes = np.zeros((batch, max(counts + [1]), 4), np.float32)
    classes = np.zeros(boxes.shape[:2], np.int32)
    valid = np.zeros(boxes.shape[:2], bool)
    seen = [0] * batch
    where = []
    for row in targets:
      b = int(row[0])
      boxes[b, seen[b]], classes[b, seen[b]], valid[b, seen[b]] = row[2:6], int(row[1]), True
      where.append((b, seen[b]))
      seen[b] += 1
    args, levels = inputs_of([GOLDEN[f"case{i}_pred_s{s}"] for s in STRIDES])
    for variant, prefix in (("exact", ""), ("fast", "fast_")):
      result = assign(args, boxes, classes, valid, levels, variant=variant)
      np.testing.assert_array_equal(result["fg_mask"], GOLDEN[f"case{i}_{prefix}fg_mask"])
      np.testing.assert_array_equal(result["matched_gt"], GOLDEN[f"case{i}_{prefix}matched_gt"])  # slot = j-th object
      np.testing.assert_allclose(result["matched_iou"], GOLDEN[f"case{i}_{prefix}matched_iou"], atol=1e-5)
      np.testing.assert_array_equal([result["dynamic_k"][b, g] for b, g in where],
                                    np.maximum(GOLDEN[f"case{i}_{prefix}dynamic_k"], 0))


def test_foreground_list_lists_every_foreground_anchor_once():
  outputs, boxes, classes, valid = random_problem(11)
  args, levels = inputs_of(outputs)
  for variant in ("exact", "fast"):
    result, details = simota.simota_assign_with_details(*args, boxes, classes, valid, variant=variant, levels=levels)
    anchors, listed = (x.numpy() for x in details["foreground"])
    for b in range(len(anchors)):
      np.testing.assert_array_equal(np.sort(anchors[b][listed[b]]), np.flatnonzero(result["fg_mask"][b]))
    _, dense_details = simota.simota_assign_with_details(*args, boxes, classes, valid, variant=variant)
    assert "foreground" not in dense_details
    np.testing.assert_array_equal(details["class_logits_finite"], dense_details["class_logits_finite"])


def test_no_slots_and_all_padding_use_any_path():
  outputs, boxes, classes, valid = random_problem(12)
  args, levels = inputs_of(outputs)
  for num_slots in (0, 3):
    empty = (boxes[:, :num_slots], classes[:, :num_slots], np.zeros_like(valid[:, :num_slots]))
    assert_same(assign(args, *empty), assign(args, *empty, levels))


def test_levels_must_match_the_anchors():
  outputs, boxes, classes, valid = random_problem(13)
  args, levels = inputs_of(outputs)
  with pytest.raises(ValueError, match="anchors"):
    assign(args, boxes, classes, valid, levels[:2])


@pytest.mark.parametrize("n", [7, 10, 336, 1000, 8400, 8401])
def test_top_values_equal_top_k(n):
  rng = np.random.default_rng(n)
  x = rng.random((3, 5, n)).astype(np.float32)
  x[x < 0.9] = 0.0  # mostly zeros, as masked IoUs
  x[0, 0] = 0.0
  x[1, 1, ::7] = 0.5  # many ties
  k = min(10, n)
  expected = tf.math.top_k(tf.constant(x), k=k).values.numpy()
  np.testing.assert_array_equal(simota_costs.top_values(tf.constant(x), k).numpy(), expected)
  compiled = tf.function(lambda t: simota_costs.top_values(t, k), jit_compile=True)
  np.testing.assert_array_equal(compiled(tf.constant(x)).numpy(), expected)
