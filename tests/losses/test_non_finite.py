"""The non-finite rule (`tfreward.ops.finite`) in every loss: one NaN logit, one NaN or infinite box regression (for
YOLOX also log w = 50) makes every returned term NaN, and the gradients non-finite, eagerly and with
jit_compile=True alike; the assignments stay defined and agree between the two modes."""

import numpy as np
import pytest
import tensorflow as tf

from tests.losses import problems
from tfreward.losses import focal, smooth_l1

JIT = [False, True]


def _assert_all_nan(out, grads):
  terms = problems.scalar_terms(out)
  assert terms and all(np.isnan(v) for v in terms.values()), terms
  assert not np.isfinite(problems.grad_norm(grads))


def _both_modes(loss_fn, inputs, watch):
  """Runs eagerly and compiled; checks the rule in both; returns both outputs."""
  results = [problems.run(loss_fn, inputs, watch, jit) for jit in JIT]
  for out, grads in results:
    _assert_all_nan(out, grads)
  return results[0][0], results[1][0]


@pytest.mark.parametrize("jit", JIT)
@pytest.mark.parametrize("make", [problems.yolox_problem, problems.free_anchor_problem, problems.retinanet_problem,
                                  problems.detr_problem, problems.reinforce_problem], ids=lambda f: f.__name__)
def test_finite_inputs_give_finite_terms_and_gradients(make, jit):
  out, grads = problems.run(*make(), jit)
  assert all(np.isfinite(v) for v in problems.scalar_terms(out).values())
  assert np.isfinite(problems.grad_norm(grads))


YOLOX_POISONS = {
    "NaN class logit": (5, np.nan), "NaN objectness logit": (4, np.nan), "+inf objectness logit": (4, np.inf),
    "NaN box dx": (0, np.nan), "+inf log h": (3, np.inf), "-inf log w": (2, -np.inf), "log w = 50": (2, 50.0),
}


@pytest.mark.parametrize("foreground", [True, False], ids=["foreground anchor", "background anchor"])
@pytest.mark.parametrize("poison", list(YOLOX_POISONS))
def test_yolox(poison, foreground):
  loss_fn, inputs, watch = problems.yolox_problem()
  clean, _ = problems.run(loss_fn, inputs, watch, jit=False)
  b, anchor = np.argwhere(clean["fg_mask"] == foreground)[0]
  level, row, column = problems.yolox_cell(inputs["outputs"], anchor)
  channel, value = YOLOX_POISONS[poison]
  inputs["outputs"][level][b, row, column, channel] = value
  eager, compiled = _both_modes(loss_fn, inputs, watch)
  for key in ("fg_mask", "matched_gt"):  # the sanitised SimOTA ranks finite numbers: the same in both modes
    np.testing.assert_array_equal(compiled[key], eager[key])
  assert np.all(np.isfinite(eager["matched_iou"])) and eager["fg_mask"].any()


def test_yolox_overflow_threshold_is_the_squared_area():
  # log w = 20 (w = e^20 * 8 ~ 4e9 px, area ~ 6e10 px^2) is a finite, merely terrible prediction: finite terms.
  loss_fn, inputs, watch = problems.yolox_problem()
  inputs["outputs"][0][0, 2, 3, 2] = 20.0
  for jit in JIT:
    out, grads = problems.run(loss_fn, inputs, watch, jit)
    assert all(np.isfinite(v) for v in problems.scalar_terms(out).values()) and np.isfinite(problems.grad_norm(grads))


ANCHOR_POISONS = {"NaN class logit": ("cls_logits", (0, 5, 0), np.nan),
                  "-inf class logit": ("cls_logits", (1, 700, 3), -np.inf),
                  "NaN box delta": ("box_deltas", (0, 5, 1), np.nan),
                  "+inf box delta": ("box_deltas", (1, 7, 2), np.inf)}


@pytest.mark.parametrize("poison", list(ANCHOR_POISONS))
@pytest.mark.parametrize("make", [problems.free_anchor_problem, problems.retinanet_problem],
                         ids=["free_anchor", "retinanet"])
def test_free_anchor_and_retinanet(make, poison):
  loss_fn, inputs, watch = make()
  name, index, value = ANCHOR_POISONS[poison]
  inputs[name][index] = value
  _both_modes(loss_fn, inputs, watch)


def test_free_anchor_box_probability_is_sanitised():
  # A NaN delta: eagerly the decode clamp keeps NaN, under XLA it gives a bound; the box probability must ignore
  # that anchor either way (IoU 0), so both modes compute the same finite box probability.
  from tfreward.losses import free_anchor
  _, inputs, _ = problems.free_anchor_problem()
  inputs["box_deltas"][0, 5] = np.nan
  names = ("anchors", "box_deltas", "gt_boxes", "gt_classes", "gt_valid")
  fn = lambda *a: free_anchor.anchor_box_probability(*a, num_classes=4)  # noqa: E731
  eager = fn(*[tf.constant(inputs[n]) for n in names])
  compiled = tf.function(fn, jit_compile=True)(*[tf.constant(inputs[n]) for n in names])
  for e, c in zip(eager, compiled):
    assert np.all(np.isfinite(e)) and np.all(np.isfinite(c))
    np.testing.assert_allclose(c, e, rtol=1e-5, atol=1e-6)  # XLA rounds an IoU an ulp away at times
  assert not np.any(eager[0][0, 5])


DETR_POISONS = {"NaN logit": ("pred_logits", (0, 1, 0), np.nan), "NaN box": ("pred_boxes", (0, 6, 2), np.nan),
                "+inf box": ("pred_boxes", (1, 0, 0), np.inf), "NaN logit of an auxiliary layer": ("aux", 0, np.nan)}


@pytest.mark.parametrize("poison", list(DETR_POISONS))
def test_group_detr(poison):
  loss_fn, inputs, watch = problems.detr_problem()
  name, index, value = DETR_POISONS[poison]
  if name == "aux":
    inputs["aux_outputs"][0][0][0, 3, 1] = value
  else:
    inputs[name][index] = value
  eager, compiled = _both_modes(loss_fn, inputs, watch)
  for key in ("query_index_for_target", "query_index_for_target_0"):  # the matcher forbids NaN / inf pairs
    np.testing.assert_array_equal(compiled[key], eager[key])
    assert np.all((eager[key] >= 0) == inputs["gt_valid"][:, None, :])


@pytest.mark.parametrize("poison", ["NaN logit", "+inf logit", "-inf logit", "NaN advantage"])
def test_reinforce(poison):
  loss_fn, inputs, watch = problems.reinforce_problem()
  if poison == "NaN advantage":
    inputs["advantages"][1] = np.nan
  else:
    inputs["logits"][0, 4, 7] = {"NaN logit": np.nan, "+inf logit": np.inf, "-inf logit": -np.inf}[poison]
  _both_modes(loss_fn, inputs, watch)


@pytest.mark.parametrize("jit", JIT)
def test_element_wise_helpers_keep_non_finite_elements_non_finite(jit):
  x = tf.constant([np.nan, np.inf, -np.inf, 0.5, -3.0], tf.float32)
  labels = tf.constant([1.0, 1.0, 0.0, 1.0, 0.0])

  def fn(x):
    return (smooth_l1.smooth_l1(x, beta=0.11), focal.sigmoid_focal_loss(logits=x, labels=labels),
            focal.sigmoid_focal_loss(logits=x, labels=1.0 - labels))

  if jit:
    fn = tf.function(fn, jit_compile=True)
  for values in fn(x):
    values = values.numpy()
    assert not np.any(np.isfinite(values[:3])) and np.all(np.isfinite(values[3:]))
  np.testing.assert_array_equal(fn(x)[0][:3], [np.nan, np.inf, np.inf])


def test_focal_class_cost_of_saturated_logits_is_finite_under_xla():
  # XLA reassociated (1 - p) + eps into (1 + eps) - p = 0 once sigmoid rounds to 1, giving -inf costs (eager: finite).
  logits = tf.constant([[10.0, 17.0, 20.0, 100.0, -100.0]])
  eager = focal.focal_class_cost(logits).numpy()
  compiled = tf.function(focal.focal_class_cost, jit_compile=True)(logits).numpy()
  assert np.all(np.isfinite(eager)) and np.all(np.isfinite(compiled))
  np.testing.assert_allclose(compiled[0, 1:], eager[0, 1:], rtol=1e-6)
  np.testing.assert_allclose(eager[0, 1:4], -0.75 * -np.log(1e-8), rtol=1e-6)
