"""The per-image mIoU reward against the golden vectors (tests/data/miou_reward, README beside them)."""

import pathlib

import numpy as np
import pytest
import tensorflow as tf

from tfreward.rewards import segmentation

GOLDEN = np.load(pathlib.Path(__file__).parents[1] / "data" / "miou_reward" / "cases.npz")
CASES = range(int(GOLDEN["num_cases"]))


def _case(i):
  return {k[len(f"case{i}_"):]: GOLDEN[k] for k in GOLDEN.files if k.startswith(f"case{i}_")}


def _iou(case, fn=segmentation.per_image_iou):
  return fn(case["pred"], case["gt"], num_classes=int(case["num_classes"]), ignore_index=int(case["ignore_index"]))


def _check(case, out, rewards):
  np.testing.assert_array_equal(out["area_intersect"], case["area_intersect"])
  np.testing.assert_array_equal(out["area_union"], case["area_union"])
  for key in ("class_iou", "miou"):
    np.testing.assert_array_equal(np.isnan(out[key]), np.isnan(case[key]), err_msg=key)
    np.testing.assert_allclose(out[key], case[key], atol=1e-6, err_msg=key)
  np.testing.assert_allclose(rewards["R"], case["reward_R"], atol=1e-6)
  np.testing.assert_allclose(rewards["r"], case["reward_r"], atol=1e-6)


@pytest.mark.parametrize("i", CASES)
def test_golden_eager(i):
  case = _case(i)
  out = _iou(case)
  _check(case, out, segmentation.weighted_ce_rewards(out["miou"]))


@pytest.mark.parametrize("i", CASES)
def test_golden_xla(i):
  case = _case(i)
  num_classes, ignore = int(case["num_classes"]), int(case["ignore_index"])

  @tf.function(jit_compile=True)
  def step(pred, gt):
    out = segmentation.per_image_iou(pred, gt, num_classes=num_classes, ignore_index=ignore)
    return out, segmentation.weighted_ce_rewards(out["miou"])

  out, rewards = step(tf.constant(case["pred"]), tf.constant(case["gt"]))
  _check(case, {k: v.numpy() for k, v in out.items()}, {k: v.numpy() for k, v in rewards.items()})


def test_leading_sample_axes_are_kept():
  case = _case(1)
  stacked = {k: np.stack([case[k], case[k][::-1]]) for k in ("pred", "gt")}
  out = segmentation.per_image_iou(stacked["pred"], stacked["gt"], num_classes=int(case["num_classes"]))
  assert out["miou"].shape == (2, len(case["pred"])) and out["class_iou"].shape == (2, *case["class_iou"].shape)
  np.testing.assert_array_equal(out["area_union"][1], case["area_union"][::-1])


def test_bad_arguments():
  case = _case(0)
  with pytest.raises(ValueError, match="one shape"):
    segmentation.per_image_iou(case["pred"], case["gt"][:, :-1], num_classes=4)
  with pytest.raises(ValueError, match="num_classes must be a positive int"):
    segmentation.per_image_iou(case["pred"], case["gt"], num_classes=0)
  with pytest.raises(ValueError, match="at least 2 images"):
    segmentation.weighted_ce_rewards(np.array([0.5], np.float32))
  with pytest.raises(ValueError, match="a \\[B\\] vector"):
    segmentation.weighted_ce_rewards(np.zeros([2, 2], np.float32))
