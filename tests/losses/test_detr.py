"""Group DETR loss: golden parity with the reference criterion, XLA, replicas, padding, gradients."""

import pathlib

import numpy as np
import pytest
import tensorflow as tf

from tfreward.losses import detr
from tfreward.ops import boxes as box_ops

GOLDEN = pathlib.Path(__file__).resolve().parents[1] / "data" / "detr" / "cases.npz"
LOSS_NAMES = ("loss_ce", "loss_bbox", "loss_giou")
WEIGHTS = {"loss_ce": 2.0, "loss_bbox": 5.0, "loss_giou": 2.0}  # the reference loss weights, the same on every layer


def _golden():
  data = np.load(GOLDEN)
  return data, int(data["num_cases"])


def _case(data, i):
  get = lambda name: data[f"case{i}_{name}"]  # noqa: E731
  num_aux = int(get("num_aux"))
  return dict(
      pred_logits=get("pred_logits"), pred_boxes=get("pred_boxes"), gt_boxes=get("tgt_boxes"),
      gt_classes=get("tgt_labels"), gt_valid=get("tgt_valid"), num_groups=int(get("num_groups")),
      aux_outputs=tuple((get(f"aux{k}_pred_logits"), get(f"aux{k}_pred_boxes")) for k in range(num_aux))), get


def _loss_fn(num_groups, gt_box_format="cxcywh"):
  def fn(pred_logits, pred_boxes, gt_boxes, gt_classes, gt_valid, aux_outputs=()):
    return detr.group_detr_loss(pred_logits, pred_boxes, gt_boxes, gt_classes, gt_valid, num_groups=num_groups,
                                aux_outputs=aux_outputs, gt_box_format=gt_box_format)
  return fn


def _call(fn, inputs):
  args = {k: v for k, v in inputs.items() if k != "num_groups"}
  return {k: v.numpy() for k, v in fn(**args).items()}


def _assert_matches_golden(out, get, num_aux):
  for k in [""] + [f"_{j}" for j in range(num_aux)]:
    prefix = "" if not k else f"aux{k[1:]}_"
    np.testing.assert_array_equal(out["query_index_for_target" + k], get(prefix + "query_index_for_target"))
    np.testing.assert_allclose(out["match_cost" + k], get(prefix + "match_cost"), rtol=1e-5, atol=1e-4)
    for name in LOSS_NAMES:
      np.testing.assert_allclose(out[name + k], get(name + k), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(out["class_error"], get("class_error"), rtol=1e-5, atol=1e-4)


def test_every_golden_case_matches_the_reference():
  data, num_cases = _golden()
  for i in range(num_cases):
    inputs, get = _case(data, i)
    out = _call(_loss_fn(inputs["num_groups"]), inputs)
    _assert_matches_golden(out, get, len(inputs["aux_outputs"]))


def test_xla_equals_eager_and_golden():
  data, _ = _golden()
  inputs, get = _case(data, 4)  # 11 groups, an image without targets
  fn = _loss_fn(inputs["num_groups"])
  eager = _call(fn, inputs)
  compiled = _call(tf.function(fn, jit_compile=True), inputs)
  assert set(eager) == set(compiled)
  for name in eager:
    np.testing.assert_allclose(compiled[name], eager[name], rtol=1e-6, atol=1e-6, err_msg=name)
  _assert_matches_golden(compiled, get, len(inputs["aux_outputs"]))
  for name, value in compiled.items():
    assert np.all(np.isfinite(value)), name


def test_yxyx_targets_match_cxcywh_targets():
  data, _ = _golden()
  inputs, get = _case(data, 2)
  yxyx = dict(inputs, gt_boxes=box_ops.cxcywh_to_yxyx(inputs["gt_boxes"]).numpy())
  out = _call(_loss_fn(inputs["num_groups"], gt_box_format="yxyx"), yxyx)
  _assert_matches_golden(out, get, 0)


def test_no_targets_gives_zero_box_losses_and_full_class_error():
  data, _ = _golden()
  inputs, _ = _case(data, 6)
  out = _call(_loss_fn(inputs["num_groups"]), inputs)
  assert out["loss_bbox"] == 0.0 and out["loss_giou"] == 0.0 and out["class_error"] == 100.0
  np.testing.assert_array_equal(out["query_index_for_target"], -1)
  np.testing.assert_array_equal(out["match_cost"], 0.0)
  assert out["loss_ce"] > 0.0


def test_cardinality_counts_confident_queries_per_group():
  """Mean over images and groups of |#queries with some sigmoid score > 0.5 - #targets|."""
  data, _ = _golden()
  inputs, _ = _case(data, 4)
  out = _call(_loss_fn(inputs["num_groups"]), inputs)
  batch = inputs["pred_logits"].shape[0]
  groups = inputs["num_groups"]
  confident = (inputs["pred_logits"].max(-1) > 0).reshape(batch, groups, -1).sum(-1)
  expected = np.abs(confident - inputs["gt_valid"].sum(-1)[:, None]).mean()
  np.testing.assert_allclose(out["cardinality_error"], expected, rtol=1e-6)


def _random_batch(rng, batch=4, groups=3, queries=8, classes=6, targets=5, counts=(0, 2, 5, 3)):
  pred_logits = rng.normal(-2.0, 1.5, size=(batch, groups * queries, classes)).astype(np.float32)
  pred_boxes = (1 / (1 + np.exp(-rng.normal(size=(batch, groups * queries, 4))))).astype(np.float32)
  yx_min = rng.uniform(0.0, 0.7, size=(batch, targets, 2))
  gt_boxes = np.concatenate([yx_min, yx_min + rng.uniform(0.05, 0.3, size=(batch, targets, 2))], -1)
  valid = np.arange(targets) < np.array(counts)[:, None]
  gt_classes = np.where(valid, rng.integers(0, classes, size=(batch, targets)), -1).astype(np.int32)
  gt_boxes = np.where(valid[..., None], gt_boxes, 0.0).astype(np.float32)
  aux = ((rng.normal(-2.0, 1.5, size=pred_logits.shape).astype(np.float32),
          (1 / (1 + np.exp(-rng.normal(size=pred_boxes.shape)))).astype(np.float32)),)
  return dict(pred_logits=pred_logits, pred_boxes=pred_boxes, gt_boxes=gt_boxes, gt_classes=gt_classes,
              gt_valid=valid, aux_outputs=aux), groups


def _loss_and_grads(fn, logits, boxes, aux_logits, aux_boxes, gt_boxes, gt_classes, gt_valid):
  with tf.GradientTape() as tape:
    tape.watch([logits, boxes, aux_logits, aux_boxes])
    losses = fn(logits, boxes, gt_boxes, gt_classes, gt_valid, aux_outputs=((aux_logits, aux_boxes),))
    total = tf.add_n([w * (losses[name] + losses[name + "_0"]) for name, w in WEIGHTS.items()])
  grads = tape.gradient(total, [logits, boxes, aux_logits, aux_boxes])
  scalars = {k: v for k, v in losses.items() if v.shape.rank == 0}
  return total, scalars, grads


def _check_replica_sum(strategy, per_replica, single):
  """Shares summed over replicas equal the single-replica values; gradients concatenate along the batch."""
  (shared_total, shared_scalars, shared_grads), (total, scalars, grads) = per_replica, single
  np.testing.assert_allclose(strategy.reduce("SUM", shared_total, axis=None), total, rtol=1e-5)
  for name, value in scalars.items():
    np.testing.assert_allclose(strategy.reduce("SUM", shared_scalars[name], axis=None), value, rtol=1e-5,
                               atol=1e-6, err_msg=name)
  for full, shared in zip(grads, shared_grads):
    stacked = np.concatenate([t.numpy() for t in strategy.experimental_local_results(shared)], axis=0)
    np.testing.assert_allclose(stacked, full.numpy(), rtol=1e-5, atol=1e-7)


def _replica_inputs(rng):
  batch, groups = _random_batch(rng)
  (aux_logits, aux_boxes), = batch["aux_outputs"]
  tensors = [batch["pred_logits"], batch["pred_boxes"], aux_logits, aux_boxes, batch["gt_boxes"],
             batch["gt_classes"], batch["gt_valid"]]
  return [tf.constant(t) for t in tensors], groups


def _halves(strategy, tensors):
  return strategy.experimental_distribute_values_from_function(
      lambda ctx: [t[2 * ctx.replica_id_in_sync_group:2 * ctx.replica_id_in_sync_group + 2] for t in tensors])


def test_two_replicas_sum_to_the_single_replica_loss_and_gradients(two_replica_strategy):
  """The normaliser is all-reduced inside the loss (graph mode replica function)."""
  tensors, groups = _replica_inputs(np.random.default_rng(0))
  step = tf.function(lambda *args: _loss_and_grads(_loss_fn(groups, "yxyx"), *args))
  single = _loss_and_grads(_loss_fn(groups, "yxyx"), *tensors)
  per_replica = two_replica_strategy.run(step, args=tuple(_halves(two_replica_strategy, tensors)))
  _check_replica_sum(two_replica_strategy, per_replica, single)


def _xla_step(groups):
  return tf.function(lambda *args: _loss_and_grads(_loss_fn(groups, "yxyx"), *args), jit_compile=True)


def test_xla_loss_and_gradients_equal_eager_with_an_aux_layer():
  tensors, groups = _replica_inputs(np.random.default_rng(5))
  empty = tensors[:-1] + [tf.zeros_like(tensors[-1])]  # the same batch without a single object
  step = _xla_step(groups)
  for inputs in (tensors, empty):
    compiled = step(*inputs)
    eager = _loss_and_grads(_loss_fn(groups, "yxyx"), *inputs)
    for got, expected in zip(tf.nest.flatten(compiled), tf.nest.flatten(eager)):
      assert np.all(np.isfinite(got))
      np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-7)
  assert compiled[1]["loss_bbox"] == 0.0 and compiled[1]["class_error"] == 100.0


def test_gradients_are_finite_with_nan_padding_and_bfloat16_predictions():
  rng = np.random.default_rng(1)
  batch, groups = _random_batch(rng, counts=(0, 0, 1, 5))
  batch["gt_boxes"][~batch["gt_valid"]] = np.nan  # padding may hold anything
  batch["gt_classes"][~batch["gt_valid"]] = 12345
  (aux_logits, aux_boxes), = batch["aux_outputs"]
  args = [tf.constant(batch["pred_logits"], tf.bfloat16), tf.constant(batch["pred_boxes"], tf.bfloat16),
          tf.constant(aux_logits, tf.bfloat16), tf.constant(aux_boxes, tf.bfloat16), batch["gt_boxes"],
          batch["gt_classes"], batch["gt_valid"]]
  total, scalars, grads = _loss_and_grads(_loss_fn(groups, "yxyx"), *args)
  assert total.dtype == tf.float32 and np.isfinite(total.numpy())
  for name, value in scalars.items():
    assert value.dtype == tf.float32 and np.isfinite(value.numpy()), name
  for grad in grads:
    assert np.all(np.isfinite(tf.cast(grad, tf.float32).numpy()))


def test_batched_matching_equals_per_image_matching():
  rng = np.random.default_rng(2)
  batch, groups = _random_batch(rng)
  fn = _loss_fn(groups, "yxyx")
  out = _call(fn, batch)
  for b in range(4):
    single = {k: v[b:b + 1] for k, v in batch.items() if k != "aux_outputs"}
    single["aux_outputs"] = tuple((a[b:b + 1], c[b:b + 1]) for a, c in batch["aux_outputs"])
    alone = _call(fn, single)
    np.testing.assert_array_equal(alone["query_index_for_target"][0], out["query_index_for_target"][b])
    np.testing.assert_array_equal(alone["query_index_for_target_0"][0], out["query_index_for_target_0"][b])
    np.testing.assert_allclose(alone["match_cost"][0], out["match_cost"][b], rtol=1e-6)


def test_every_target_gets_one_distinct_query_per_group():
  rng = np.random.default_rng(3)
  batch, groups = _random_batch(rng, queries=5, targets=5, counts=(5, 5, 0, 1))
  index = _call(_loss_fn(groups, "yxyx"), batch)["query_index_for_target"]  # [B, G, T]
  for b in range(4):
    for g in range(groups):
      valid = batch["gt_valid"][b]
      chosen = index[b, g][valid]
      assert np.all((chosen >= g * 5) & (chosen < (g + 1) * 5)) and len(set(chosen.tolist())) == valid.sum()
      np.testing.assert_array_equal(index[b, g][~valid], -1)


@pytest.mark.parametrize("change,match", [
    (dict(num_groups=5), "num_groups"),
    (dict(num_groups=0), "num_groups"),
    (dict(gt_box_format="xyxy"), "gt_box_format"),
    (dict(gt_boxes=np.zeros((4, 9, 4), np.float32), gt_classes=np.zeros((4, 9), np.int32),
          gt_valid=np.zeros((4, 9), bool)), "targets"),
    (dict(aux_outputs=((np.zeros((4, 24, 6), np.float32),),)), "aux_outputs"),
])
def test_bad_arguments_raise_value_error(change, match):
  rng = np.random.default_rng(4)
  batch, groups = _random_batch(rng)
  kwargs = dict(batch, num_groups=groups, gt_box_format="yxyx")
  kwargs.update(change)
  with pytest.raises(ValueError, match=match):
    detr.group_detr_loss(**kwargs)
