"""Tests for tfreward.losses.reinforce: the seed's loss_fn in numpy, baselines, confidence targets, replicas, XLA."""

import numpy as np
import pytest
import tensorflow as tf

from tfreward.losses import reinforce
from tfreward.ops import sequence

LAYOUT = dict(max_level=20, max_conf=2, num_cls=3)
VOCAB = sequence.TokenLayout(**LAYOUT).vocab_size  # 3 conf + 21 coordinate + 3 class tokens


def _case(batch=4, slots=3, seed=0):
  rng = np.random.default_rng(seed)
  length = 6 * slots
  kinds = sequence.token_kinds(length).numpy()
  tokens = np.where(kinds == sequence.COORD, rng.integers(3, 24, (batch, length)),
                    np.where(kinds == sequence.CLASS, rng.integers(24, 27, (batch, length)),
                             rng.integers(0, 3, (batch, length)))).astype(np.int32)
  logits = rng.normal(size=(batch, length, VOCAB)).astype(np.float32) * 2.0
  advantages = rng.normal(size=batch).astype(np.float32)
  match_iou = np.where(tokens[:, 5::6] > 0, rng.uniform(0, 1, (batch, slots)), 0.0).astype(np.float32)
  return logits, tokens, advantages, match_iou


def _seed_loss_fn(logits, labels, seq_rewards, match_iou, conf_w=0.3, skip_conf=False):
  """The seed's (000) loss_fn, in numpy: REINFORCE on every token plus the confidence loss."""
  shifted = logits - logits.max(-1, keepdims=True)
  log_softmax = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
  target = np.eye(logits.shape[-1])[labels] * seq_rewards[:, None, None]
  loss_reward = -np.sum(target * log_softmax, axis=-1)  # [B, L]
  if skip_conf:
    loss_reward = loss_reward[:, np.arange(labels.shape[1]) % 6 != 5]
  conf0 = labels[:, 5::6] == 0
  conf1 = (labels[:, 5::6] > 0) * (1.0 - match_iou)
  conf2 = (labels[:, 5::6] > 0) * match_iou
  target_conf = np.stack([conf0, conf1, conf2], axis=-1)
  loss_conf = -np.sum(target_conf * log_softmax[:, 5::6, :3], axis=-1)
  return np.mean(loss_reward), conf_w * np.mean(loss_conf)


def _losses(logits, tokens, advantages, match_iou, **kwargs):
  return reinforce.reinforce_losses(logits=logits, tokens=tokens, advantages=advantages, match_iou=match_iou,
                                    **LAYOUT, **kwargs)


@pytest.mark.parametrize("reinforce_conf", [True, False])
def test_matches_the_seed_loss_fn(reinforce_conf):
  logits, tokens, advantages, match_iou = _case()
  terms = _losses(logits, tokens, advantages, match_iou, reinforce_conf=reinforce_conf, constrained=False)
  expected_reward, expected_conf = _seed_loss_fn(logits, tokens, advantages, match_iou, skip_conf=not reinforce_conf)
  np.testing.assert_allclose(terms["loss_reward"], expected_reward, rtol=1e-5)
  np.testing.assert_allclose(0.3 * terms["loss_conf"], expected_conf, rtol=1e-5)


@pytest.mark.parametrize("reinforce_conf", [True, False])
def test_padding_slots_left_out_of_reinforce(reinforce_conf):
  """reinforce_padding=False: the mean of -advantage * log p over the tokens of slots sampled as boxes (and the conf
  tokens of every slot when reinforce_conf), in numpy; the confidence loss is unchanged."""
  logits, tokens, advantages, match_iou = _case(seed=3)
  assert (tokens[:, 5::6] == 0).any() and (tokens[:, 5::6] > 0).any()
  terms = _losses(logits, tokens, advantages, match_iou, reinforce_conf=reinforce_conf, constrained=False,
                  reinforce_padding=False)
  shifted = logits - logits.max(-1, keepdims=True)
  log_softmax = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
  token_log_prob = np.take_along_axis(log_softmax, tokens[..., None], -1)[..., 0]  # [B, L]
  is_conf = np.arange(tokens.shape[1]) % 6 == 5
  present = np.repeat(tokens[:, 5::6] > 0, 6, axis=1)
  keep = (present & ~is_conf) | (is_conf & reinforce_conf)
  expected = np.sum(-advantages[:, None] * token_log_prob * keep) / keep.sum()
  np.testing.assert_allclose(terms["loss_reward"], expected, rtol=1e-5)
  full = _losses(logits, tokens, advantages, match_iou, reinforce_conf=reinforce_conf, constrained=False)
  np.testing.assert_allclose(terms["loss_conf"], full["loss_conf"], rtol=1e-6)


def test_constrained_log_probs_are_those_of_each_kind():
  logits, tokens, advantages, match_iou = _case()
  constrained = sequence.constrain_logits(logits, **LAYOUT).numpy()
  masked = np.where(constrained > np.finfo(np.float32).min, logits, -1e30)
  expected_reward, expected_conf = _seed_loss_fn(masked, tokens, advantages, match_iou)
  terms = _losses(logits, tokens, advantages, match_iou)
  np.testing.assert_allclose(terms["loss_reward"], expected_reward, rtol=1e-5)
  np.testing.assert_allclose(0.3 * terms["loss_conf"], expected_conf, rtol=1e-5)


def test_leave_one_out_baseline():
  rewards = np.array([[1.0, 2.0, 6.0], [0.0, 0.0, 3.0]], np.float32)
  expected = np.array([[4.0, 3.5, 1.5], [1.5, 1.5, 0.0]], np.float32)
  np.testing.assert_allclose(reinforce.leave_one_out_baseline(rewards), expected)
  with pytest.raises(ValueError, match="N >= 2"):
    reinforce.leave_one_out_baseline(np.ones([2, 1], np.float32))
  # Trailing axes (per-slot returns [B, N, S]) are baselined independently.
  per_slot = np.stack([rewards, 2 * rewards], axis=-1)
  np.testing.assert_allclose(reinforce.leave_one_out_baseline(per_slot), np.stack([expected, 2 * expected], -1))


def test_slot_returns_are_the_reward_left_after_each_prefix():
  rewards = np.array([[3.0, 1.0]], np.float32)  # [B, N]
  prefix = np.array([[[0.0, 1.0, 2.5], [0.0, 0.0, 1.0]]], np.float32)  # [B, N, S]
  np.testing.assert_allclose(reinforce.slot_returns(rewards, prefix), [[[3.0, 2.0, 0.5], [1.0, 1.0, 0.0]]])


def test_box_rewards_are_what_each_slot_adds():
  rewards = np.array([[3.0, 1.0]], np.float32)
  prefix = np.array([[[0.0, 1.0, 2.5], [0.0, 0.0, 1.0]]], np.float32)
  boxes = reinforce.box_rewards(rewards, prefix)
  np.testing.assert_allclose(boxes, [[[1.0, 1.5, 0.5], [0.0, 1.0, 0.0]]])
  np.testing.assert_allclose(np.sum(boxes, -1), rewards)


def test_per_slot_advantages_weight_each_slot_tokens():
  logits, tokens, advantages, match_iou = _case(seed=5)
  same = _losses(logits, tokens, np.repeat(advantages[:, None], 3, axis=1), match_iou)
  np.testing.assert_allclose(same["loss_reward"], _losses(logits, tokens, advantages, match_iou)["loss_reward"],
                             rtol=1e-6)
  # Advantage only on slot 1: the loss is that slot's six tokens' share of the sequence-level loss.
  only = np.zeros([4, 3], np.float32)
  only[:, 1] = advantages
  log_probs = tf.nn.log_softmax(sequence.constrain_logits(logits, **LAYOUT)).numpy()
  token_log_prob = np.take_along_axis(log_probs, tokens[..., None], -1)[..., 0]  # [B, L]
  expected = -np.sum(advantages[:, None] * token_log_prob[:, 6:12]) / token_log_prob.size
  np.testing.assert_allclose(_losses(logits, tokens, only, match_iou)["loss_reward"], expected, rtol=1e-5)
  with pytest.raises(ValueError, match=r"per-slot advantages must be \[B, 3\]"):
    _losses(logits, tokens, np.zeros([4, 2], np.float32), match_iou)
  with pytest.raises(ValueError, match=r"\[B\] or \[B, L // 6\]"):
    _losses(logits, tokens, np.zeros([4, 3, 1], np.float32), match_iou)


def test_confidence_targets():
  conf = np.array([[0, 1, 2, 5]])
  iou = np.array([[0.9, 0.25, 1.0, 0.0]], np.float32)
  np.testing.assert_allclose(reinforce.confidence_targets(conf, iou, max_conf=2),
                             [[[1, 0, 0], [0, 0.75, 0.25], [0, 0, 1], [0, 1, 0]]], atol=1e-7)
  # Four levels: IoU spread linearly, levels 1..3 standing for IoU 0, 0.5, 1; its expectation is the IoU.
  targets = reinforce.confidence_targets(np.array([[1, 1]]), np.array([[0.75, 0.3]]), max_conf=3).numpy()
  np.testing.assert_allclose(targets[0, 0], [0, 0, 0.5, 0.5], atol=1e-6)
  np.testing.assert_allclose(targets.sum(-1), 1.0, atol=1e-6)
  np.testing.assert_allclose((targets[0] * [0, 0, 0.5, 1.0]).sum(-1), [0.75, 0.3], atol=1e-6)
  np.testing.assert_allclose(reinforce.confidence_targets(np.array([[0, 3]]), np.array([[0.0, 0.2]]), max_conf=1),
                             [[[1, 0], [0, 1]]])


def test_gradient_raises_the_log_prob_of_advantaged_sequences():
  logits, tokens, _, match_iou = _case(batch=2)
  advantages = np.array([1.0, -1.0], np.float32)
  logits = tf.constant(logits)
  with tf.GradientTape() as tape:
    tape.watch(logits)
    loss = _losses(logits, tokens, advantages, match_iou, reinforce_conf=False)["loss_reward"]
  grad = tape.gradient(loss, logits).numpy()
  picked = np.take_along_axis(grad, tokens[..., None], axis=-1)[..., 0]  # [B, L]
  coord = sequence.token_kinds(tokens.shape[1]).numpy() == sequence.COORD
  assert (picked[0, coord] < 0).all() and (picked[1, coord] > 0).all()  # descent raises / lowers them
  assert np.abs(grad[:, sequence.token_kinds(tokens.shape[1]).numpy() == sequence.CONF]).max() == 0.0


def test_zero_advantage_and_all_padding_samples_are_finite():
  logits, tokens, _, _ = _case()
  tokens[:, 5::6] = 0
  terms = _losses(logits, tokens, np.zeros(4, np.float32), np.zeros((4, 3), np.float32))
  assert float(terms["loss_reward"]) == 0.0
  assert np.isfinite(float(terms["loss_conf"])) and float(terms["loss_conf"]) > 0.0


@pytest.mark.parametrize("reinforce_padding", [True, False])
@pytest.mark.parametrize("reinforce_conf", [True, False])
def test_eager_equals_xla(reinforce_padding, reinforce_conf):
  case = [tf.constant(x) for x in _case(seed=3)]
  options = dict(reinforce_padding=reinforce_padding, reinforce_conf=reinforce_conf)
  eager = _losses(*case, **options)
  compiled = tf.function(lambda *args: _losses(*args, **options), jit_compile=True)(*case)
  for k in eager:
    np.testing.assert_allclose(compiled[k], eager[k], rtol=1e-5)


@pytest.mark.parametrize("reinforce_padding", [True, False])
@pytest.mark.parametrize("reinforce_conf", [True, False])
def test_two_replica_shares_add_up_to_one_replica(two_replica_strategy, reinforce_padding, reinforce_conf):
  """The normaliser (included positions; with reinforce_padding=False it depends on each replica's samples) is
  summed over replicas, so the shares add up to the loss of the whole batch."""
  case = _case(batch=4, seed=5)
  options = dict(reinforce_padding=reinforce_padding, reinforce_conf=reinforce_conf)
  single = _losses(*case, **options)
  halves = [[x[:2] for x in case], [x[2:] for x in case]]
  values = two_replica_strategy.experimental_distribute_values_from_function(
      lambda ctx: tuple(tf.constant(x) for x in halves[ctx.replica_id_in_sync_group]))
  per_replica = two_replica_strategy.run(
      tf.function(lambda *args: _losses(*args, **options)), args=values)
  for k in single:
    np.testing.assert_allclose(two_replica_strategy.reduce("SUM", per_replica[k], axis=None), single[k], rtol=1e-5)


@pytest.mark.parametrize("constrained", [True, False])
def test_separate_conf_logits_feed_only_the_confidence_loss(constrained):
  logits, tokens, advantages, match_iou = _case()
  other = _case(seed=1)[0]
  mixed = _losses(logits, tokens, advantages, match_iou, conf_logits=other, constrained=constrained)
  plain = _losses(logits, tokens, advantages, match_iou, constrained=constrained)
  swapped = _losses(other, tokens, advantages, match_iou, constrained=constrained)
  np.testing.assert_allclose(mixed["loss_reward"], plain["loss_reward"], rtol=1e-6)
  np.testing.assert_allclose(mixed["loss_conf"], swapped["loss_conf"], rtol=1e-6)
  same = _losses(logits, tokens, advantages, match_iou, conf_logits=logits, constrained=constrained)
  for k in plain:
    np.testing.assert_allclose(same[k], plain[k], rtol=1e-6)


def test_deviation_loss_by_hand():
  rng = np.random.default_rng(3)
  logits, tokens, _, _ = _case(batch=2, slots=2)
  log_probs = tf.nn.log_softmax(logits).numpy()
  actions = np.stack([tokens, np.roll(tokens, 1, axis=0)], axis=1)  # [B, K=2, L]
  advantages = rng.normal(size=actions.shape).astype(np.float32)
  include = (np.arange(12) % 6 != 5).astype(np.float32)  # conf tokens left out
  expected = sum(-advantages[b, k, t] * log_probs[b, t, actions[b, k, t]] * include[t]
                 for b in range(2) for k in range(2) for t in range(12)) / (2 * 2 * include.sum())
  loss = reinforce.deviation_loss(log_probs=log_probs, actions=actions, advantages=advantages, reinforce_conf=False)
  np.testing.assert_allclose(loss, expected, rtol=1e-5)
  # The gradient raises the log-probability of an action with a positive advantage.
  variable = tf.Variable(logits)
  with tf.GradientTape() as tape:
    value = reinforce.deviation_loss(log_probs=tf.nn.log_softmax(variable), actions=actions[:, :1],
                                     advantages=np.ones((2, 1, 12), np.float32))
  step = -tape.gradient(value, variable).numpy()
  moved = tf.nn.log_softmax(logits + 10.0 * step).numpy()
  chosen = lambda lp: np.take_along_axis(lp, tokens[..., None], axis=-1)
  assert (chosen(moved) > chosen(log_probs)).all()


def test_bad_arguments():
  logits, tokens, advantages, match_iou = _case()
  with pytest.raises(ValueError, match="multiple of 6"):
    _losses(logits[:, :5], tokens[:, :5], advantages, match_iou)
  with pytest.raises(ValueError, match="logits must be"):
    _losses(logits[..., :-1], tokens, advantages, match_iou)
  with pytest.raises(ValueError, match="conf_logits"):
    _losses(logits, tokens, advantages, match_iou, conf_logits=logits[:, :6])
  with pytest.raises(ValueError, match="max_conf"):
    reinforce.confidence_targets(tokens[:, 5::6], match_iou, max_conf=0)
