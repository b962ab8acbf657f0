"""Detection reward: parity with the reference's golden vectors (both threshold means), XLA, batching, bad input."""

import os

import numpy as np
import pytest
import tensorflow as tf

from tfreward.ops import sequence
from tfreward.rewards import detection

GOLDEN = os.path.join(os.path.dirname(__file__), os.pardir, "data", "detection_reward", "cases.npz")
TOL = dict(rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def golden():
  with np.load(GOLDEN) as z:
    return {k: z[k] for k in z.files}


def _case_config(z, i):
  return dict(
      max_level=int(z[f"case{i}_max_level"]), max_conf=int(z[f"case{i}_max_conf"]), num_cls=int(z[f"case{i}_num_cls"]),
      nms_w=float(z[f"case{i}_nms_w"]), cls_smooth=float(z[f"case{i}_cls_smooth"]),
      reward_thr=tuple(float(t) for t in z[f"case{i}_reward_thr_values"]),
      correct_thr=float(z[f"case{i}_correct_thr"]), cls_counts=tuple(int(c) for c in z[f"case{i}_cls_counts"]))


def _run(pred, gt, jit, **config):
  fn = lambda p, g: detection.detection_reward(p, g, **config)  # noqa: E731
  if jit:
    fn = tf.function(fn, jit_compile=True)
  reward, aux = fn(tf.constant(pred), tf.constant(gt))
  return reward.numpy(), {k: v.numpy() for k, v in aux.items()}


def _both_modes(pred, gt, jit, **config):
  """{"legacy": (reward, aux), "uniform": (reward, aux)} from one (compiled) call."""
  def fn(p, g):
    return {mode: detection.detection_reward(p, g, legacy_threshold_keys=mode == "legacy", **config)
            for mode in ("legacy", "uniform")}
  if jit:
    fn = tf.function(fn, jit_compile=True)
  out = fn(tf.constant(pred), tf.constant(gt))
  return {m: (r.numpy(), {k: v.numpy() for k, v in aux.items()}) for m, (r, aux) in out.items()}


NUM_CASES = 6


def test_golden_file_matches_paper_config(golden):
  assert int(golden["num_cases"]) == NUM_CASES
  assert tuple(int(c) for c in golden["cls_counts"]) == detection.COCO_CLS_COUNTS
  np.testing.assert_allclose(golden["config_reward_thr"], detection.PAPER_REWARD_THR)
  assert detection.legacy_threshold_weights(detection.PAPER_REWARD_THR) == list(golden["legacy_thr_multiplicity"])


def _check_golden(z, i, mode, reward, aux):
  # Per-threshold values and the correct_thr outputs do not depend on the mode.
  np.testing.assert_array_equal(aux["correct"], z[f"case{i}_correct"])
  np.testing.assert_array_equal(aux["num_matches_thr"], z[f"case{i}_num_matches_thr"])
  np.testing.assert_allclose(aux["match_iou"], z[f"case{i}_match_iou"], **TOL)
  np.testing.assert_allclose(aux["reward_thr"], z[f"case{i}_reward_thr"], **TOL)
  np.testing.assert_allclose(aux["nms_penalty_thr"], z[f"case{i}_nms_penalty_thr"], **TOL)
  assert aux["correct"].dtype == np.int32 and aux["num_matches_thr"].dtype == np.int32
  if mode == "legacy":
    expected = {k: z[f"case{i}_{k}_legacy"] for k in ("reward", "num_matches", "nms_penalty")}
  else:
    expected = {k: z[f"case{i}_{k}_thr"].astype(np.float64).mean(axis=0)
                for k in ("reward", "num_matches", "nms_penalty")}
  np.testing.assert_allclose(reward, expected["reward"], **TOL)
  np.testing.assert_allclose(aux["num_matches"], expected["num_matches"], **TOL)
  np.testing.assert_allclose(aux["nms_penalty"], expected["nms_penalty"], **TOL)
  assert reward.dtype == np.float32 and np.all(np.isfinite(reward))


@pytest.mark.parametrize("i", range(NUM_CASES))
def test_golden_parity_eager_and_xla(golden, i):
  z = golden
  args = (z[f"case{i}_seqs_pred"], z[f"case{i}_seqs_gt"])
  eager = _both_modes(*args, False, **_case_config(z, i))
  xla = _both_modes(*args, True, **_case_config(z, i))
  for mode in ("legacy", "uniform"):
    _check_golden(z, i, mode, *eager[mode])
    _check_golden(z, i, mode, *xla[mode])
    np.testing.assert_allclose(xla[mode][0], eager[mode][0], rtol=1e-6, atol=1e-6)
    for key in ("correct", "num_matches_thr"):
      np.testing.assert_array_equal(xla[mode][1][key], eager[mode][1][key])


def test_modes_differ_where_the_readme_says(golden):
  """Case 0: legacy w0 + 0.5 w5, uniform w0 + 0.6 w5 (README section 6)."""
  z = golden
  w = detection.class_weights(detection.COCO_CLS_COUNTS, cls_smooth=0.05).numpy()
  np.testing.assert_allclose(w[[0, 5]], [0.16491161, 1.0266092], **TOL)
  out = _both_modes(z["case0_seqs_pred"], z["case0_seqs_gt"], False)
  np.testing.assert_allclose(out["legacy"][0], [[w[0] + 0.5 * w[5]]], **TOL)
  np.testing.assert_allclose(out["uniform"][0], [[w[0] + 0.6 * w[5]]], **TOL)
  np.testing.assert_allclose(out["uniform"][1]["match_iou"], [[[1.0, 0.78]]], atol=1e-5)


def test_batched_equals_per_image_and_sample(golden):
  z = golden
  pred, gt = z["case1_seqs_pred"], z["case1_seqs_gt"]
  reward, aux = _run(pred, gt, False)
  np.testing.assert_array_equal(_run(pred.astype(np.int64), gt.astype(np.int64), False)[0], reward)
  for b in range(pred.shape[0]):
    for n in range(pred.shape[1]):
      r, a = _run(pred[b:b + 1, n:n + 1], gt[b:b + 1], False)
      np.testing.assert_allclose(r[0, 0], reward[b, n], rtol=1e-6, atol=1e-6)
      np.testing.assert_array_equal(a["correct"][0, 0], aux["correct"][b, n])


# An independent loop-based float32 port of the reference, for configs the golden file does not cover.
def _oracle(pred, gt, *, max_level, max_conf, num_cls, nms_w, cls_smooth, reward_thr, correct_thr, cls_counts):
  f32 = np.float32

  def boxes_of(seq):
    seq = seq[:len(seq) // 6 * 6].reshape(-1, 6).astype(np.int64)
    coords = np.clip(seq[:, :4] - max_conf - 1, 0, max_level).astype(f32) * f32(1.0 / max_level)
    cls = np.clip(seq[:, 4] - max_conf - 1 - max_level - 1, 0, num_cls - 1)
    return coords, cls, np.clip(seq[:, 5], 0, max_conf)

  counts = np.asarray(cls_counts, np.int64)
  v = f32(1) / (counts.astype(f32) + f32(cls_smooth) * f32(counts.sum()))
  w = f32(num_cls) * v / v.sum(dtype=f32)
  rewards = np.zeros((len(reward_thr),) + pred.shape[:2], np.float64)
  correct = np.zeros(pred.shape[:2] + (pred.shape[2] // 6,), np.int32)
  for b in range(pred.shape[0]):
    bg, cg, fg = boxes_of(gt[b])
    for n in range(pred.shape[1]):
      bp, cp, fp = boxes_of(pred[b, n])
      iou = np.zeros((len(bp), len(bg)), f32)
      for p in range(len(bp)):
        for g in range(len(bg)):
          if fp[p] > 0 and fg[g] > 0 and cp[p] == cg[g]:
            y0, x0, y1, x1 = bp[p]
            u0, v0, u1, v1 = bg[g]
            inter = max(f32(0), min(y1, u1) - max(y0, u0)) * max(f32(0), min(x1, v1) - max(x0, v0))
            union = abs((y1 - y0) * (x1 - x0)) + abs((u1 - u0) * (v1 - v0)) - inter + f32(1e-9)
            iou[p, g] = inter / union
      for t, thr in enumerate(list(reward_thr) + [correct_thr]):
        m = np.where(iou > f32(thr), iou, f32(0))
        assigned = {p: int(np.argmax(m[p])) for p in range(len(bp)) if m[p].max() > 0}
        matches = {}
        for p, g in assigned.items():
          if g not in matches or m[p, g] > m[matches[g], g]:
            matches[g] = p
        penalty = sum(w[cp[p]] for p, g in assigned.items() if matches[g] != p)
        if t == len(reward_thr):
          correct[b, n] = [0 if fp[p] == 0 else 1 + (p in assigned) for p in range(len(bp))]
        else:
          rewards[t, b, n] = sum(w[cg[g]] for g in matches) - nms_w * penalty
  return rewards, correct


def _random_seqs(rng, shape, *, max_level, max_conf, num_cls):
  """Random tokens with jittered copies of the GT so that many pairs match."""
  b, n, slots = shape
  gt = np.zeros((b, slots, 6), np.int64)
  for i in range(b):
    for s in range(rng.integers(0, slots + 1)):
      lo = rng.integers(0, max_level // 2, 2)
      hi = lo + rng.integers(1, max_level // 2, 2)
      gt[i, s] = [lo[0], lo[1], hi[0], hi[1], 0, 0]
      gt[i, s, :4] += max_conf + 1
      gt[i, s, 4] = rng.integers(0, num_cls) + max_conf + max_level + 2
      gt[i, s, 5] = rng.integers(1, max_conf + 1)
  pred = np.repeat(gt[:, None], n, axis=1)
  pred[..., :4] += rng.integers(-2, 3, pred[..., :4].shape)
  pred[..., 5] = np.where(rng.random(pred.shape[:3]) < 0.8, pred[..., 5], 0)
  dup = rng.random(pred.shape[:3]) < 0.3
  pred[dup] = np.roll(pred, 1, axis=2)[dup]
  pred = pred.reshape(b, n, slots * 6)
  pred[rng.random(pred.shape) < 0.03] = rng.integers(-3, max_level + num_cls + 10)
  return pred.astype(np.int32), gt.reshape(b, slots * 6).astype(np.int32)


@pytest.mark.parametrize("max_level,max_conf,num_cls", [(20, 2, 3), (50, 4, 7), (1000, 1, 1)])
def test_other_configs_match_the_oracle(max_level, max_conf, num_cls):
  rng = np.random.default_rng(max_level + num_cls)
  pred, gt = _random_seqs(rng, (3, 4, 5), max_level=max_level, max_conf=max_conf, num_cls=num_cls)
  config = dict(max_level=max_level, max_conf=max_conf, num_cls=num_cls, nms_w=0.5, cls_smooth=0.1,
                reward_thr=(0.3, 0.5, 0.75), correct_thr=0.4,
                cls_counts=tuple(int(c) for c in rng.integers(1, 1000, num_cls)))
  want_thr, want_correct = _oracle(pred, gt, **config)
  for jit in (False, True):
    reward, aux = _run(pred, gt, jit, **config)
    np.testing.assert_allclose(aux["reward_thr"], want_thr, **TOL)
    np.testing.assert_allclose(reward, want_thr.mean(axis=0), **TOL)
    np.testing.assert_array_equal(aux["correct"], want_correct)
  assert np.any(want_correct == 2) and np.any(aux["nms_penalty"] > 0)


def test_legacy_weights_for_other_thresholds():
  assert detection.legacy_threshold_weights((0.3, 0.5, 0.75)) == [1, 1, 1]
  assert detection.legacy_threshold_weights((0.51, 0.52, 0.7)) == [0, 2, 1]
  # Duplicated thresholds count once in the uniform mean.
  pred = np.array([[[3, 3, 503, 503, 1004, 2]]], np.int32)
  gt = np.array([[3, 3, 503, 403, 1004, 1]], np.int32)  # IoU 0.8
  r_dup, _ = _run(pred, gt, False, reward_thr=(0.5, 0.5, 0.9))
  r_one, _ = _run(pred, gt, False, reward_thr=(0.5, 0.9))
  np.testing.assert_allclose(r_dup, r_one, **TOL)


def test_roundtrip_through_the_tokenizer_gives_the_full_reward():
  boxes = tf.constant([[[0.1, 0.2, 0.5, 0.6], [0.3, 0.3, 0.9, 0.8], [0.0, 0.0, 0.0, 0.0]]])
  classes = tf.constant([[3, 79, -1]])
  valid = tf.constant([[True, True, False]])
  gt = sequence.boxes_to_sequence(boxes, classes, valid, max_level=1000, max_conf=2, num_cls=80, seq_len=30,
                                  order="fixed")
  pred = sequence.boxes_to_sequence(boxes, classes, valid, max_level=1000, max_conf=2, num_cls=80, seq_len=30,
                                    order="random", seed=(1, 2))
  reward, aux = _run(pred[:, None].numpy(), gt.numpy(), False)
  w = detection.class_weights(detection.COCO_CLS_COUNTS, cls_smooth=0.05).numpy()
  np.testing.assert_allclose(reward, [[w[3] + w[79]]], **TOL)
  np.testing.assert_array_equal(np.sort(aux["correct"][0, 0]), [0, 0, 0, 2, 2])
  np.testing.assert_array_equal(aux["num_matches_thr"][:, 0, 0], [2] * 10)


def test_empty_ground_truth_and_all_padding_predictions_are_finite():
  rng = np.random.default_rng(0)
  pred, _ = _random_seqs(rng, (2, 3, 4), max_level=1000, max_conf=2, num_cls=80)
  empty = np.zeros((2, 24), np.int32)
  for jit in (False, True):
    reward, aux = _run(pred, empty, jit)
    np.testing.assert_array_equal(reward, np.zeros((2, 3)))
    np.testing.assert_array_equal(aux["match_iou"], np.zeros((2, 3, 4)))
    reward, aux = _run(np.zeros((1, 2, 12), np.int32), np.zeros((1, 18), np.int32), jit)
    np.testing.assert_array_equal(reward, np.zeros((1, 2)))
    np.testing.assert_array_equal(aux["correct"], np.zeros((1, 2, 2)))


def test_two_replicas_equal_one(two_replica_strategy, golden):
  pred, gt = golden["case1_seqs_pred"], golden["case1_seqs_gt"]
  want, _ = _run(pred, gt, False)
  step = tf.function(lambda p, g: detection.detection_reward(p, g)[0], jit_compile=True)

  half = pred.shape[0] // 2

  def shard(array):
    return two_replica_strategy.experimental_distribute_values_from_function(
        lambda ctx: tf.constant(array[ctx.replica_id_in_sync_group * half:][:half]))

  p, g = shard(pred), shard(gt)
  out = two_replica_strategy.run(step, args=(p, g))
  got = np.concatenate([t.numpy() for t in two_replica_strategy.experimental_local_results(out)])
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("pred,gt,match", [
    (np.zeros((2, 12), np.int32), np.zeros((2, 12), np.int32), "seqs_pred must have rank 3"),
    (np.zeros((2, 1, 12), np.int32), np.zeros((2, 1, 12), np.int32), "seqs_gt must have rank 2"),
    (np.zeros((2, 1, 12), np.float32), np.zeros((2, 12), np.int32), "seqs_pred must be an integer"),
    (np.zeros((2, 1, 12), np.int32), np.zeros((2, 12), np.float32), "seqs_gt must be an integer"),
    (np.zeros((2, 1, 5), np.int32), np.zeros((2, 12), np.int32), r"length >= 6"),
    (np.zeros((2, 1, 12), np.int32), np.zeros((3, 12), np.int32), "different batch sizes"),
])
def test_bad_inputs_raise(pred, gt, match):
  with pytest.raises(ValueError, match=match):
    detection.detection_reward(pred, gt)


@pytest.mark.parametrize("config,match", [
    (dict(num_cls=3), "cls_counts must have num_cls=3"),
    (dict(reward_thr=()), "reward_thr"),
    (dict(reward_thr=(0.5, 1.5)), r"1\.5"),
    (dict(correct_thr=-0.1), r"-0\.1"),
    (dict(max_level=0), "max_level"),
    (dict(max_conf=2.0), "max_conf"),
])
def test_bad_config_raises(config, match):
  with pytest.raises(ValueError, match=match):
    detection.detection_reward(np.zeros((1, 1, 12), np.int32), np.zeros((1, 12), np.int32), **config)
