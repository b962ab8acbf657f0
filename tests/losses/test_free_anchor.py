"""FreeAnchor loss: golden parity with mmdetection (tests/data/freeanchor), XLA, replicas, padding and edge cases."""

import os

import numpy as np
import pytest
import tensorflow as tf

from tfreward.losses import free_anchor
from tfreward.losses.free_anchor import free_anchor_loss
from tfreward.ops import anchors as anchor_ops

GOLDEN = os.path.join(os.path.dirname(__file__), os.pardir, "data", "freeanchor", "cases.npz")
RTOL, ATOL = 1e-5, 1e-6


def _golden():
  data = np.load(GOLDEN)
  return data, int(data["num_cases"])


def _case(i):
  data, _ = _golden()
  return {k[len(f"case{i}_"):]: data[k] for k in data.files if k.startswith(f"case{i}_")}


def _inputs(case):
  return dict(anchors=tf.constant(case["anchors"]), cls_logits=tf.constant(case["cls_scores"]),
              box_deltas=tf.constant(case["bbox_preds"]), gt_boxes=tf.constant(case["gt_boxes"]),
              gt_classes=tf.constant(case["gt_labels"]), gt_valid=tf.constant(case["gt_valid"]))


def _options(case):
  """Every hyper-parameter read from the case, never hard-coded."""
  return dict(pre_anchor_topk=int(case["pre_anchor_topk"]), bbox_thr=float(case["bbox_thr"]),
              gamma=float(case["gamma"]), alpha=float(case["alpha"]), smoothl1_beta=float(case["smoothl1_beta"]),
              loss_weight=float(case["loss_weight"]), target_means=tuple(case["target_means"].tolist()),
              target_stds=tuple(case["target_stds"].tolist()), wh_ratio_clip=float(case["wh_ratio_clip"]))


def _coder_options(case):
  opts = _options(case)
  return dict(target_means=opts["target_means"], target_stds=opts["target_stds"])


def _loss_and_grads(inputs, options, jit=False):
  """Both loss terms and their gradients with respect to the logits and the deltas."""
  def fn(anchors, cls_logits, box_deltas, gt_boxes, gt_classes, gt_valid):
    with tf.GradientTape(persistent=True) as tape:
      tape.watch([cls_logits, box_deltas])
      losses = free_anchor_loss(anchors, cls_logits, box_deltas, gt_boxes, gt_classes, gt_valid, **options)
    grads = {}
    for name in ("positive_bag_loss", "negative_bag_loss"):
      g_cls, g_box = tape.gradient(losses[name], [cls_logits, box_deltas],
                                   unconnected_gradients=tf.UnconnectedGradients.ZERO)
      grads[name] = (g_cls, g_box)
    return losses, grads
  if jit:
    fn = tf.function(fn, jit_compile=True)
  losses, grads = fn(**inputs)
  return ({k: v.numpy() for k, v in losses.items()},
          {k: (a.numpy(), b.numpy()) for k, (a, b) in grads.items()})


def _all_finite(tree):
  return all(np.all(np.isfinite(x)) for x in tf.nest.flatten(tree))


# --- Golden parity ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("i", range(5))
def test_golden_losses(i):
  _, num_cases = _golden()
  assert num_cases == 5
  case = _case(i)
  losses = free_anchor_loss(**_inputs(case), **_options(case))
  for name in ("positive_bag_loss", "negative_bag_loss"):
    assert losses[name].dtype == tf.float32
    np.testing.assert_allclose(losses[name].numpy(), case[name], rtol=RTOL, atol=ATOL, err_msg=f"{case['name']} {name}")


@pytest.mark.parametrize("i", range(5))
def test_golden_positive_bags(i):
  case = _case(i)
  opts = _options(case)
  inputs = _inputs(case)
  terms, bag_prob, bag_indices = free_anchor.positive_bag_terms(
      inputs["anchors"], inputs["cls_logits"], inputs["box_deltas"], inputs["gt_boxes"], inputs["gt_classes"],
      inputs["gt_valid"], pre_anchor_topk=opts["pre_anchor_topk"], alpha=opts["alpha"],
      smoothl1_beta=opts["smoothl1_beta"], loss_weight=opts["loss_weight"], **_coder_options(case))
  valid = case["gt_valid"]
  np.testing.assert_allclose(np.where(valid, bag_prob.numpy(), 0.0), case["bag_prob"], rtol=RTOL, atol=ATOL)
  np.testing.assert_allclose(np.where(valid, terms.numpy(), 0.0), case["positive_loss_per_gt"], rtol=RTOL, atol=ATOL)
  ours, theirs = bag_indices.numpy(), case["bag_indices"]
  for b, m in zip(*np.nonzero(valid)):
    assert set(ours[b, m].tolist()) == set(theirs[b, m].tolist()), (b, m)
  assert np.all(theirs[~valid] == -1)


@pytest.mark.parametrize("i", range(5))
def test_golden_box_probability(i):
  case = _case(i)
  opts = _options(case)
  inputs = _inputs(case)
  box_prob, max_pred_iou = free_anchor.anchor_box_probability(
      inputs["anchors"], inputs["box_deltas"], inputs["gt_boxes"], inputs["gt_classes"], inputs["gt_valid"],
      num_classes=case["cls_scores"].shape[-1], bbox_thr=opts["bbox_thr"], wh_ratio_clip=opts["wh_ratio_clip"],
      **_coder_options(case))
  valid = case["gt_valid"]
  np.testing.assert_allclose(max_pred_iou.numpy()[valid], case["max_pred_iou"][valid], rtol=RTOL, atol=ATOL)
  bp = box_prob.numpy()
  assert bp.shape == case["cls_scores"].shape and bp.min() >= 0.0 and bp.max() <= 1.0
  # Every GT whose best decoded IoU clears the threshold owns exactly-1 box probability at its class.
  for b, m in zip(*np.nonzero(valid)):
    if case["max_pred_iou"][b, m] > opts["bbox_thr"]:
      assert bp[b, :, case["gt_labels"][b, m]].max() == 1.0
  # Images without GT have no box probability.
  assert np.all(bp[~valid.any(axis=1)] == 0.0)


def _check_golden_gradients(case, grads):
  for name in ("positive", "negative"):
    for arg, got in zip(("cls_scores", "bbox_preds"), grads[f"{name}_bag_loss"]):
      want = case[f"grad_{name}_wrt_{arg}"]
      scale = max(np.abs(want).max(), 1e-30)
      np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * scale, err_msg=f"{name} wrt {arg}")


def test_golden_gradients():
  case = _case(0)
  _, grads = _loss_and_grads(_inputs(case), _options(case))
  _check_golden_gradients(case, grads)
  # The negative bag is a constant of the deltas; the positive bag touches only the bag anchors' GT classes.
  assert np.all(grads["negative_bag_loss"][1] == 0.0)
  touched = np.zeros(case["cls_scores"].shape, bool)
  for b, m in zip(*np.nonzero(case["gt_valid"])):
    touched[b, case["bag_indices"][b, m], case["gt_labels"][b, m]] = True
  assert np.all(grads["positive_bag_loss"][0][~touched] == 0.0)


@pytest.mark.parametrize("i", range(5))
def test_golden_xla_equals_eager_with_gradients(i):
  case = _case(i)
  eager_l, eager_g = _loss_and_grads(_inputs(case), _options(case), jit=False)
  xla_l, xla_g = _loss_and_grads(_inputs(case), _options(case), jit=True)
  for name in eager_l:
    assert xla_l[name].dtype == np.float32
    np.testing.assert_allclose(xla_l[name], case[name], rtol=RTOL, atol=ATOL, err_msg=f"{case['name']} {name}")
    np.testing.assert_allclose(xla_l[name], eager_l[name], rtol=1e-6, atol=1e-7)
    for e, x in zip(eager_g[name], xla_g[name]):
      np.testing.assert_allclose(x, e, rtol=0, atol=1e-5 * max(np.abs(e).max(), 1e-30))
  assert _all_finite([eager_l, eager_g, xla_l, xla_g])
  if i == 0:
    _check_golden_gradients(case, xla_g)


# --- Edge cases ---------------------------------------------------------------------------------------------------


def _small_problem(seed=0, batch=2, num_classes=4, max_objects=4, counts=(2, 1)):
  """A 64x64 image with the real RetinaNet anchors (A = 9 * 85 = 765), random predictions, jittered GT."""
  rng = np.random.default_rng(seed)
  anchors = anchor_ops.retinanet_anchors((64, 64)).numpy()
  a = anchors.shape[0]
  gt = np.zeros((batch, max_objects, 4), np.float32)
  cls = -np.ones((batch, max_objects), np.int32)
  valid = np.zeros((batch, max_objects), bool)
  for b in range(batch):
    for m in range(counts[b]):
      x1, y1 = rng.uniform(0, 40, 2)
      w, h = rng.uniform(8, 24, 2)
      gt[b, m] = (x1, y1, x1 + w, y1 + h)
      cls[b, m] = rng.integers(num_classes)
      valid[b, m] = True
  return dict(anchors=tf.constant(anchors),
              cls_logits=tf.constant(rng.normal(-2.0, 1.5, (batch, a, num_classes)).astype(np.float32)),
              box_deltas=tf.constant(rng.normal(0.0, 0.5, (batch, a, 4)).astype(np.float32)),
              gt_boxes=tf.constant(gt), gt_classes=tf.constant(cls), gt_valid=tf.constant(valid))


def test_all_padding_batch_has_zero_positive_and_unnormalised_negative():
  inputs = _small_problem(counts=(0, 0))
  for jit in (False, True):
    losses, grads = _loss_and_grads(inputs, {}, jit=jit)
    assert _all_finite([losses, grads])
    assert losses["positive_bag_loss"] == 0.0
    assert np.all(grads["positive_bag_loss"][0] == 0.0) and np.all(grads["positive_bag_loss"][1] == 0.0)
    p = tf.sigmoid(inputs["cls_logits"]).numpy().astype(np.float64)
    want = np.sum(0.5 * p**2 * -np.log1p(-p))  # normaliser max(1, 0 * k) = 1
    np.testing.assert_allclose(losses["negative_bag_loss"], want, rtol=1e-5)


def test_garbage_in_padding_rows_has_no_effect():
  inputs = _small_problem()
  clean = _loss_and_grads(inputs, {})
  valid = inputs["gt_valid"].numpy()
  dirty = dict(inputs)
  # Inverted, zero-size, NaN-free but absurd boxes and out-of-range classes in the padding rows.
  junk = np.array([[50.0, 50.0, 10.0, 10.0], [0.0, 0.0, 0.0, 0.0], [-1e4, -1e4, 1e4, 1e4], [3.0, 3.0, 3.0, 90.0]])
  boxes = inputs["gt_boxes"].numpy()
  boxes[~valid] = junk[np.arange((~valid).sum()) % len(junk)]
  classes = inputs["gt_classes"].numpy()
  classes[~valid] = 99
  dirty["gt_boxes"], dirty["gt_classes"] = tf.constant(boxes), tf.constant(classes)
  noisy = _loss_and_grads(dirty, {})
  for name in clean[0]:
    np.testing.assert_array_equal(noisy[0][name], clean[0][name])
    for a, b in zip(noisy[1][name], clean[1][name]):
      np.testing.assert_array_equal(a, b)


def test_more_padding_rows_change_nothing():
  inputs = _small_problem()
  wider = dict(inputs)
  pad = lambda x, value: tf.concat([x, tf.fill([x.shape[0], 3] + x.shape[2:], value)], axis=1)  # noqa: E731
  wider["gt_boxes"] = pad(inputs["gt_boxes"], tf.constant(0.0))
  wider["gt_classes"] = pad(inputs["gt_classes"], tf.constant(-1))
  wider["gt_valid"] = pad(inputs["gt_valid"], tf.constant(False))
  a, b = free_anchor_loss(**inputs), free_anchor_loss(**wider)
  for name in a:
    np.testing.assert_allclose(b[name].numpy(), a[name].numpy(), rtol=1e-6)


def test_objects_smaller_than_every_anchor_and_degenerate_objects():
  inputs = _small_problem(counts=(3, 2))
  boxes = inputs["gt_boxes"].numpy()
  boxes[0, 0] = (30.0, 30.0, 32.5, 31.0)  # 2.5 x 1 px; the smallest anchor is 22.6 x 45.3
  boxes[0, 1] = (10.0, 10.0, 10.0, 20.0)  # zero width
  boxes[1, 0] = (40.0, 40.0, 40.5, 40.5)
  inputs["gt_boxes"] = tf.constant(boxes)
  for jit in (False, True):
    losses, grads = _loss_and_grads(inputs, {}, jit=jit)
    assert _all_finite([losses, grads])
    assert losses["positive_bag_loss"] > 0.0 and losses["negative_bag_loss"] > 0.0


def test_batched_equals_per_image():
  inputs = _small_problem(batch=3, counts=(2, 0, 3), max_objects=4, seed=3)
  k = 50
  batched = free_anchor_loss(**inputs, pre_anchor_topk=k)
  num = inputs["gt_valid"].numpy().sum(axis=1)
  pos_sum, neg_sum = 0.0, 0.0
  for b in range(3):
    one = {name: (v if name == "anchors" else v[b:b + 1]) for name, v in inputs.items()}
    losses = free_anchor_loss(**one, pre_anchor_topk=k)
    pos_sum += losses["positive_bag_loss"].numpy() * max(1, num[b])
    neg_sum += losses["negative_bag_loss"].numpy() * max(1, num[b] * k)
  np.testing.assert_allclose(batched["positive_bag_loss"].numpy(), pos_sum / max(1, num.sum()), rtol=1e-5)
  np.testing.assert_allclose(batched["negative_bag_loss"].numpy(), neg_sum / max(1, num.sum() * k), rtol=1e-5)


def test_bfloat16_inputs_give_float32_losses():
  inputs = _small_problem()
  low = dict(inputs, cls_logits=tf.cast(inputs["cls_logits"], tf.bfloat16),
             box_deltas=tf.cast(inputs["box_deltas"], tf.bfloat16))

  def both(**kw):  # bfloat16 inputs and their exact float32 values, in one graph
    return (free_anchor_loss(**kw),
            free_anchor_loss(**{k: (tf.cast(v, tf.float32) if v.dtype == tf.bfloat16 else v) for k, v in kw.items()}))

  # Compared within one mode: XLA may round near-tied anchor IoUs differently from eager.
  for fn in (both, tf.function(both, jit_compile=True)):
    got, want = fn(**low)
    for name in got:
      assert got[name].dtype == tf.float32
      np.testing.assert_allclose(got[name].numpy(), want[name].numpy(), rtol=1e-6)
  with tf.GradientTape() as tape:
    tape.watch(low["cls_logits"])
    total = tf.add_n(list(free_anchor_loss(**low).values()))
  grad = tape.gradient(total, low["cls_logits"])
  assert grad.dtype == tf.bfloat16 and np.all(np.isfinite(tf.cast(grad, tf.float32).numpy()))


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "xla"])
def test_exact_ties_keep_the_lowest_anchor_indices(jit):
  # 30 x 30 integer-positioned 32 x 32 anchors (exact arithmetic, so ties are exact under XLA too) and a 4 x 4 GT:
  # the 21 x 21 anchors containing it tie at IoU 16 / 1024; one 8 x 8 anchor (index 900) beats them all.
  ys, xs = np.meshgrid(np.arange(30.0), np.arange(30.0), indexing="ij")
  anchors = np.stack([xs, ys, xs + 32, ys + 32], -1).reshape(-1, 4)
  anchors = np.concatenate([anchors, [[18.0, 18.0, 26.0, 26.0]]]).astype(np.float32)
  gt = np.array([[[20.0, 20.0, 24.0, 24.0]]], np.float32)
  rng = np.random.default_rng(0)
  fn = lambda *args: free_anchor.positive_bag_terms(*args, pre_anchor_topk=50)  # noqa: E731
  if jit:
    fn = tf.function(fn, jit_compile=True)
  _, _, bag = fn(tf.constant(anchors), tf.constant(rng.normal(size=(1, 901, 3)), tf.float32),
                 tf.constant(rng.normal(size=(1, 901, 4)), tf.float32), tf.constant(gt), tf.constant([[1]]),
                 tf.constant([[True]]))
  tied = [i for i, (x1, y1, x2, y2) in enumerate(anchors[:900]) if x1 <= 20 and y1 <= 20]
  assert bag.numpy()[0, 0, 0] == 900
  assert sorted(bag.numpy()[0, 0, 1:].tolist()) == tied[:49]


def test_hyper_parameters_are_used():
  inputs = _small_problem()
  base = free_anchor_loss(**inputs)
  assert not np.isclose(free_anchor_loss(**inputs, alpha=0.25)["positive_bag_loss"], base["positive_bag_loss"])
  assert not np.isclose(free_anchor_loss(**inputs, pre_anchor_topk=10)["negative_bag_loss"],
                        base["negative_bag_loss"])
  assert not np.isclose(free_anchor_loss(**inputs, gamma=1.0)["negative_bag_loss"], base["negative_bag_loss"])
  assert not np.isclose(free_anchor_loss(**inputs, loss_weight=2.0)["positive_bag_loss"],
                        base["positive_bag_loss"])


# --- Replicas ---------------------------------------------------------------------------------------------------


def _replica_step(options):
  """One replica's losses and input gradients, as a graph (the trainer's step under MirroredStrategy)."""
  @tf.function
  def step(cls_logits, box_deltas, gt_boxes, gt_classes, gt_valid, anchors):
    with tf.GradientTape() as tape:
      tape.watch([cls_logits, box_deltas])
      losses = free_anchor_loss(anchors, cls_logits, box_deltas, gt_boxes, gt_classes, gt_valid, **options)
      total = losses["positive_bag_loss"] + losses["negative_bag_loss"]
    g_cls, g_box = tape.gradient(total, [cls_logits, box_deltas])
    return losses, g_cls, g_box
  return step


@pytest.mark.parametrize("i", [1, 4])
def test_two_replicas_equal_one(two_replica_strategy, i):
  case = _case(i)
  options = _options(case)
  inputs = _inputs(case)
  names = ("cls_logits", "box_deltas", "gt_boxes", "gt_classes", "gt_valid")
  whole_losses, whole_cls, whole_box = _replica_step(options)(*[inputs[n] for n in names], inputs["anchors"])
  for name in whole_losses:
    np.testing.assert_allclose(whole_losses[name].numpy(), case[name], rtol=RTOL, atol=ATOL)
  strategy = two_replica_strategy
  halves = [[inputs[n][r:r + 1] for n in names] for r in range(2)]
  per_replica = strategy.experimental_distribute_values_from_function(
      lambda ctx: tuple(halves[ctx.replica_id_in_sync_group]))
  losses, g_cls, g_box = strategy.run(_replica_step(options), args=(*per_replica, inputs["anchors"]))
  for name in whole_losses:
    shares = [x.numpy() for x in strategy.experimental_local_results(losses[name])]
    np.testing.assert_allclose(sum(shares), whole_losses[name].numpy(), rtol=1e-5, atol=1e-7)
  got_cls = np.concatenate([x.numpy() for x in strategy.experimental_local_results(g_cls)])
  got_box = np.concatenate([x.numpy() for x in strategy.experimental_local_results(g_box)])
  np.testing.assert_allclose(got_cls, whole_cls.numpy(), rtol=1e-5, atol=1e-5 * np.abs(whole_cls.numpy()).max())
  np.testing.assert_allclose(got_box, whole_box.numpy(), rtol=1e-5,
                             atol=1e-5 * max(np.abs(whole_box.numpy()).max(), 1e-30))


# --- Argument checks --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, match", [
    (dict(pre_anchor_topk=0), "pre_anchor_topk"),
    (dict(pre_anchor_topk=100000), "pre_anchor_topk"),
    (dict(bbox_thr=1.0), "bbox_thr"),
    (dict(gamma=-1.0), "gamma"),
    (dict(alpha=1.5), "alpha"),
    (dict(smoothl1_beta=0.0), "smoothl1_beta"),
    (dict(loss_weight=-0.1), "loss_weight"),
    (dict(target_stds=(0.1, 0.1, 0.2)), "target_stds"),
    (dict(target_stds=(0.1, 0.1, 0.0, 0.2)), "target_stds"),
    (dict(wh_ratio_clip=0.0), "wh_ratio_clip"),
])
def test_bad_options_raise(kwargs, match):
  inputs = _small_problem()
  with pytest.raises(ValueError, match=match):
    free_anchor_loss(**inputs, **kwargs)


def test_bad_shapes_raise():
  inputs = _small_problem()
  with pytest.raises(ValueError, match="box_deltas"):
    free_anchor_loss(**dict(inputs, box_deltas=inputs["box_deltas"][:, :-1]))
  with pytest.raises(ValueError, match="gt_boxes"):
    free_anchor_loss(**dict(inputs, gt_boxes=inputs["gt_boxes"][..., :3]))
  with pytest.raises(ValueError, match="gt_classes"):
    free_anchor_loss(**dict(inputs, gt_classes=inputs["gt_classes"][:, :-1]))
  with pytest.raises(ValueError, match="anchors"):
    free_anchor_loss(**dict(inputs, anchors=inputs["anchors"][None]))
