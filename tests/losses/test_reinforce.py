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


def test_zero_advantage_and_all_padding_samples_are_finite():
  logits, tokens, _, _ = _case()
  tokens[:, 5::6] = 0
  terms = _losses(logits, tokens, np.zeros(4, np.float32), np.zeros((4, 3), np.float32))
  assert float(terms["loss_reward"]) == 0.0
  assert np.isfinite(float(terms["loss_conf"])) and float(terms["loss_conf"]) > 0.0


@pytest.mark.parametrize("reinforce_conf", [True, False])
def test_eager_equals_xla(reinforce_conf):
  case = [tf.constant(x) for x in _case(seed=3)]
  options = dict(reinforce_conf=reinforce_conf)
  eager = _losses(*case, **options)
  compiled = tf.function(lambda *args: _losses(*args, **options), jit_compile=True)(*case)
  for k in eager:
    np.testing.assert_allclose(compiled[k], eager[k], rtol=1e-5)


@pytest.mark.parametrize("reinforce_conf", [True, False])
def test_two_replica_shares_add_up_to_one_replica(two_replica_strategy, reinforce_conf):
  """The normalisers (included positions, box slots) are summed over replicas, so the shares add up to the loss of
  the whole batch."""
  case = _case(batch=4, seed=5)
  options = dict(reinforce_conf=reinforce_conf)
  single = _losses(*case, **options)
  halves = [[x[:2] for x in case], [x[2:] for x in case]]
  values = two_replica_strategy.experimental_distribute_values_from_function(
      lambda ctx: tuple(tf.constant(x) for x in halves[ctx.replica_id_in_sync_group]))
  per_replica = two_replica_strategy.run(
      tf.function(lambda *args: _losses(*args, **options)), args=values)
  for k in single:
    np.testing.assert_allclose(two_replica_strategy.reduce("SUM", per_replica[k], axis=None), single[k], rtol=1e-5)


def test_bad_arguments():
  logits, tokens, advantages, match_iou = _case()
  with pytest.raises(ValueError, match="multiple of 6"):
    _losses(logits[:, :5], tokens[:, :5], advantages, match_iou)
  with pytest.raises(ValueError, match="logits must be"):
    _losses(logits[..., :-1], tokens, advantages, match_iou)
  with pytest.raises(ValueError, match="max_conf"):
    reinforce.confidence_targets(tokens[:, 5::6], match_iou, max_conf=0)
