"""Ground truth given to a loss directly with valid=True but no positive extent (zero width, zero area, inverted, a
NaN coordinate) is treated as padding, eagerly and under XLA: the result equals that of the same slot marked
invalid. In particular a zero-area object never becomes a YOLOX foreground."""

import numpy as np
import pytest

from tests.losses import problems

JIT = [False, True]
# Replacements for object slot 0 of image 0, per box format.
CXCYWH = {"zero width": [20.0, 24.0, 0.0, 20.0], "zero area": [20.0, 24.0, 0.0, 0.0],
          "inverted": [20.0, 24.0, -16.0, 20.0], "NaN centre": [np.nan, 24.0, 16.0, 20.0]}
XYXY = {"zero width": [4.0, 6.0, 4.0, 40.0], "zero area": [4.0, 6.0, 4.0, 6.0],
        "inverted": [30.0, 6.0, 4.0, 40.0], "NaN centre": [4.0, np.nan, 30.0, 40.0]}


def _assert_same(out, reference):
  assert out.keys() == reference.keys()
  for key, value in reference.items():
    np.testing.assert_array_equal(out[key], value, err_msg=key)


def _check_padding_equivalence(make, boxes, kind, scale=1.0):
  loss_fn, inputs, watch = make()
  inputs["gt_boxes"][0, 0] = np.asarray(boxes[kind], np.float32) * scale
  as_padding = {**inputs, "gt_valid": inputs["gt_valid"].copy()}
  as_padding["gt_valid"][0, 0] = False
  for jit in JIT:
    out, grads = problems.run(loss_fn, inputs, watch, jit)
    reference, reference_grads = problems.run(loss_fn, as_padding, watch, jit)
    _assert_same(out, reference)
    for g, r in zip(grads, reference_grads):
      np.testing.assert_array_equal(g, r)
    assert all(np.isfinite(v) for v in problems.scalar_terms(out).values())
  return out


@pytest.mark.parametrize("kind", list(CXCYWH))
def test_yolox(kind):
  out = _check_padding_equivalence(problems.yolox_problem, CXCYWH, kind)
  assert not np.any(out["matched_gt"][0] == 0) and out["fg_mask"].any()


@pytest.mark.parametrize("kind", list(CXCYWH))
def test_yolox_fast_variant(kind):
  _check_padding_equivalence(lambda: problems.yolox_problem(variant="fast", iou_type="giou"), CXCYWH, kind)


def test_yolox_zero_area_object_alone_takes_no_anchor():
  # The measured failure: an image whose only object has zero area got foreground anchors and an L1 term against
  # ln(1e-8) targets. Now it is an image without objects.
  loss_fn, inputs, watch = problems.yolox_problem()
  inputs["gt_boxes"][1, 0] = CXCYWH["zero area"]
  for jit in JIT:
    out, _ = problems.run(loss_fn, inputs, watch, jit)
    assert not out["fg_mask"][1].any() and np.all(out["matched_gt"][1] == -1)
    assert out["fg_mask"][0].any() and np.isfinite(out["l1"])


@pytest.mark.parametrize("kind", list(XYXY))
@pytest.mark.parametrize("make", [problems.free_anchor_problem, problems.retinanet_problem],
                         ids=["free_anchor", "retinanet"])
def test_free_anchor_and_retinanet(make, kind):
  _check_padding_equivalence(make, XYXY, kind)


@pytest.mark.parametrize("kind", list(CXCYWH))
def test_group_detr(kind):
  out = _check_padding_equivalence(problems.detr_problem, CXCYWH, kind, scale=1.0 / 64.0)
  assert np.all(out["query_index_for_target"][0, :, 0] == -1)
