"""The YOLOX loss on SimOTA's windowed path (static grids: the default) against the dense path.

Same assignment, loss components to 1e-6 relative (the class term sums the same terms over a list of the foreground
anchors instead of all anchors) and gradients to 1e-5, eagerly and under XLA.
"""

import numpy as np
import pytest
import tensorflow as tf

from tfreward.losses import yolox
from tfreward.ops import yolox_grid
from tests.ops.test_simota_windowed import random_problem

NUM_CLASSES = 7


def loss_and_grads(outputs, boxes, classes, valid, jit=False, **kwargs):
  def fn(outs, boxes, classes, valid):
    with tf.GradientTape() as tape:
      tape.watch(outs)
      result = yolox.yolox_loss(outs, boxes, classes, valid, num_classes=NUM_CLASSES, **kwargs)
    return result, tape.gradient(result["total"], outs)

  if jit:
    fn = tf.function(fn, jit_compile=True)
  result, grads = fn([tf.constant(o) for o in outputs], tf.constant(boxes), tf.constant(classes), tf.constant(valid))
  return {k: v.numpy() for k, v in result.items()}, [g.numpy() for g in grads]


def dense_path(monkeypatch):
  monkeypatch.setattr(yolox_grid, "static_level_sizes", lambda outputs: None)


@pytest.mark.parametrize("jit", [False, True])
@pytest.mark.parametrize("kwargs", [dict(variant="exact"), dict(variant="fast"),
                                    dict(variant="exact", use_l1=True, iou_type="giou")])
def test_windowed_loss_equals_dense(kwargs, jit, monkeypatch):
  problem = random_problem(21, num_classes=NUM_CLASSES)
  windowed, windowed_grads = loss_and_grads(*problem, jit=jit, **kwargs)
  dense_path(monkeypatch)
  dense, dense_grads = loss_and_grads(*problem, jit=jit, **kwargs)
  for key in yolox.ASSIGNMENT_KEYS:
    np.testing.assert_array_equal(windowed[key], dense[key], err_msg=key)
  for name in yolox.COMPONENTS:
    np.testing.assert_allclose(windowed[name], dense[name], rtol=1e-6, err_msg=name)
  for got, want in zip(windowed_grads, dense_grads):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
  assert windowed["fg_mask"].sum() > 50


@pytest.mark.parametrize("poison", ["cls_nan", "cls_inf", "obj_nan", "box_inf"])
def test_non_finite_predictions_give_nan_on_both_paths(poison, monkeypatch):
  outputs, boxes, classes, valid = random_problem(22, num_classes=NUM_CLASSES)
  channel, value = {"cls_nan": (6, np.nan), "cls_inf": (5, np.inf), "obj_nan": (4, np.nan),
                    "box_inf": (2, np.inf)}[poison]
  outputs[1][2, 3, 4, channel] = value  # one anchor of the stride-16 level
  windowed, _ = loss_and_grads(outputs, boxes, classes, valid)
  dense_path(monkeypatch)
  dense, _ = loss_and_grads(outputs, boxes, classes, valid)
  for name in yolox.COMPONENTS:
    assert np.isnan(windowed[name]) and np.isnan(dense[name]), name
  for key in yolox.ASSIGNMENT_KEYS:
    np.testing.assert_array_equal(windowed[key], dense[key], err_msg=key)
