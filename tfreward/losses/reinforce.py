"""REINFORCE with a leave-one-out baseline, plus the confidence loss, for sequence detectors (seed 000).

Reward tuning samples N sequences per image, rewards them (`tfreward.rewards.detection`), and trains on one of them
(the chosen sample) with

  loss_reward = mean over positions of  -(r - b) * log p(token)            b = mean reward of the other N - 1 samples
    (or, per slot, the slot's return `slot_returns` minus the mean return of the other samples at that slot)
  loss_conf   = mean over box slots of   CE(target, p(conf token))          conf_w = 0.3 is applied by the model
    target = [1, 0, 0] for a slot sampled as padding (conf token 0),
             [0, 1 - IoU, IoU] for a sampled box, IoU = its match IoU at the correct threshold (0 if unmatched).

With max_conf levels other than 2 the IoU is spread linearly over the levels 1..max_conf, level k standing for IoU
(k - 1) / (max_conf - 1): the reading `sequence.sequence_to_detections` uses for scores.

Confidence tokens in the REINFORCE term (`reinforce_conf`, default True, as in the paper): the seed notes that the
paper kept them "due to a bug (and also does not seem to matter)". We keep them on purpose: the confidence loss
alone leaves the presence decision (conf token 0 or not) without a learning signal, since its target follows the
sampled token (sampled 0 -> target 0, sampled > 0 -> target > 0), so in expectation its gradient on P(conf = 0) is
zero and only the REINFORCE term teaches the model to drop duplicates and keep matched boxes. `reinforce_conf=False`
gives the seed's suggested variant.

Log-probabilities are those of the distribution the sampler draws from: logits restricted to each position's token
kind (`sequence.constrain_logits`). `constrained=False` takes the log-softmax over the whole vocabulary, as the seed
does. Losses are float32 and follow the replica-share convention of `tfreward.ops.distributed`: local sums divided by
normalisers summed over all replicas, so shares add up to the global-batch mean.

Non-finite inputs (`tfreward.ops.finite`): if any logit (before the token-kind constraint, whose -inf masks are
expected), advantage or match IoU is NaN or +-inf, both returned losses are NaN, and so are their gradients,
eagerly and under XLA alike.
"""

import tensorflow as tf

from tfreward.errors import check_int
from tfreward.ops import distributed
from tfreward.ops import finite
from tfreward.ops import sequence


def leave_one_out_baseline(rewards):
  """The mean reward of the other samples of the same image.

  Args:
    rewards: [B, N, ...] float rewards of N >= 2 samples per image (e.g. [B, N, S] per-slot returns).

  Returns:
    [B, N, ...] float32: entry (b, n, ...) is the mean of rewards[b, m, ...] over m != n.
  """
  rewards = tf.convert_to_tensor(rewards)
  if rewards.shape.rank is None or rewards.shape.rank < 2 or rewards.shape[1] is None or rewards.shape[1] < 2:
    raise ValueError(f"rewards must be [B, N, ...] with a static N >= 2, got shape {rewards.shape}.")
  rewards = tf.cast(rewards, tf.float32)
  n = rewards.shape[1]
  return (tf.reduce_sum(rewards, axis=1, keepdims=True) - rewards) / float(n - 1)


def slot_returns(rewards, prefix_rewards):
  """Reward-to-go of each box slot: what the sequence earns from that slot on.

  The return of slot k is `reward - prefix_rewards[k]`, the reward minus that of the sequence cut before slot k
  (`sequence.slot_prefixes`). The cut sequence depends only on tokens before slot k, so subtracting its reward is an
  action-independent baseline for the tokens of slots >= k: REINFORCE stays unbiased, and a slot's tokens no longer
  carry the noise of the boxes written before them. Slot 0's return is the whole reward (its prefix earns 0).

  Args:
    rewards: [...] float rewards of whole sequences.
    prefix_rewards: [..., S] float rewards of their slot-prefixes.

  Returns:
    [..., S] float32.
  """
  return tf.cast(rewards, tf.float32)[..., None] - tf.cast(prefix_rewards, tf.float32)


def confidence_targets(conf_tokens, match_iou, *, max_conf):
  """Targets of the confidence loss over the conf tokens 0..max_conf.

  Args:
    conf_tokens: [B, S] int sampled conf tokens (0 = padding slot; values above max_conf count as present).
    match_iou: [B, S] float IoU of each sampled box with its matched ground truth (0 if none).
    max_conf: int >= 1.

  Returns:
    [B, S, max_conf + 1] float32 rows summing to 1: one-hot 0 for padding slots, else the IoU spread linearly over
    levels 1..max_conf ([0, 1 - IoU, IoU] for max_conf = 2).
  """
  check_int("max_conf", max_conf)
  iou = tf.clip_by_value(tf.cast(match_iou, tf.float32), 0.0, 1.0)[..., None]  # [B, S, 1]
  levels = tf.range(1, max_conf + 1, dtype=tf.float32)  # [K]
  if max_conf == 1:
    spread = tf.ones_like(iou * levels)
  else:
    spread = tf.nn.relu(1.0 - tf.abs(iou * (max_conf - 1) - (levels - 1.0)))  # [B, S, K]
  present = (tf.cast(conf_tokens, tf.int32) > 0)[..., None]
  padding = tf.one_hot(0, max_conf + 1, dtype=tf.float32)
  return tf.where(present, tf.pad(spread, [[0, 0], [0, 0], [1, 0]]), padding)


def reinforce_losses(*, logits, tokens, advantages, match_iou, max_level, max_conf, num_cls, reinforce_conf=True,
                     constrained=True):
  """REINFORCE and confidence losses of the chosen samples (this replica's shares).

  Args:
    logits: [B, L] + [V] float teacher-forced logits of the chosen samples (position t scores tokens[:, t]).
    tokens: [B, L] int chosen sampled sequences, L a multiple of 6.
    advantages: [B] float reward minus baseline of each chosen sample, or [B, L // 6] one per box slot (e.g. slot
      returns minus their baseline, `slot_returns`); no gradient flows into them.
    match_iou: [B, L // 6] float IoU of each sampled box with its match (`detection_reward` aux, chosen sample).
    max_level, max_conf, num_cls: int. The `sequence.TokenLayout`; V must be its vocab_size.
    reinforce_conf: bool. Include conf tokens in the REINFORCE term (see the module docstring). Defaults to True.
    constrained: bool. Log-probabilities restricted to each position's token kind. Defaults to True.

  Returns:
    dict of float32 scalars (both NaN for non-finite inputs, see the module docstring):
      loss_reward: sum of -advantage * log p(token) over included positions / their number over all replicas.
      loss_conf: sum of the confidence cross-entropy over box slots / the number of slots over all replicas.
  """
  layout = sequence.TokenLayout(max_level, max_conf, num_cls)
  logits = tf.cast(tf.convert_to_tensor(logits), tf.float32)
  inputs_finite = finite.all_finite(logits, advantages, match_iou)
  tokens = tf.convert_to_tensor(tokens)
  if tokens.shape.rank != 2 or not tokens.dtype.is_integer or tokens.shape[1] is None or tokens.shape[1] % 6:
    raise ValueError(f"tokens must be an integer [B, L] tensor with L a multiple of 6, got {tokens.dtype.name} "
                     f"{tokens.shape}.")
  if logits.shape.rank != 3 or logits.shape[1] != tokens.shape[1] or logits.shape[2] != layout.vocab_size:
    raise ValueError(f"logits must be [B, {tokens.shape[1]}, {layout.vocab_size}], got {logits.shape}.")
  tokens = tf.cast(tokens, tf.int32)
  length = tokens.shape[1]
  if constrained:
    logits = sequence.constrain_logits(logits, max_level=max_level, max_conf=max_conf, num_cls=num_cls)
  log_probs = tf.nn.log_softmax(logits, axis=-1)  # [B, L, V]
  token_log_prob = tf.gather(log_probs, tokens, axis=2, batch_dims=2)  # [B, L]
  advantages = tf.stop_gradient(tf.cast(advantages, tf.float32))
  if advantages.shape.rank == 2:
    if advantages.shape[1] != length // sequence.TOKENS_PER_BOX:
      raise ValueError(f"per-slot advantages must be [B, {length // sequence.TOKENS_PER_BOX}], got "
                       f"{advantages.shape}.")
    advantages = tf.repeat(advantages, sequence.TOKENS_PER_BOX, axis=1)  # [B, L]
  elif advantages.shape.rank == 1:
    advantages = advantages[:, None]
  else:
    raise ValueError(f"advantages must be [B] or [B, L // 6], got shape {advantages.shape}.")
  weights = _positions(length, reinforce_conf)[None, :] * tf.ones_like(token_log_prob)  # [B, L]
  reward_sum = tf.reduce_sum(-advantages * token_log_prob * weights)
  loss_reward = reward_sum / tf.maximum(distributed.global_sum(tf.reduce_sum(weights)), 1.0)

  loss_conf = confidence_loss(log_probs, tokens, match_iou, max_conf=max_conf)
  return {"loss_reward": finite.nan_unless(inputs_finite, loss_reward),
          "loss_conf": finite.nan_unless(inputs_finite, loss_conf)}


def confidence_loss(log_probs, tokens, match_iou, *, max_conf):
  """The confidence loss of sequences: cross-entropy of their conf tokens against `confidence_targets`.

  Args:
    log_probs: [B, L, V] float32 log-probabilities (position t scores tokens[:, t]).
    tokens: [B, L] int sequences (their conf tokens say which slots are boxes).
    match_iou: [B, L // 6] float IoU of each box with its match; no gradient flows into it.
    max_conf: int >= 1.

  Returns:
    float32 scalar: the sum over box slots / the number of slots over all replicas.
  """
  target = confidence_targets(tokens[:, 5::6], tf.stop_gradient(match_iou), max_conf=max_conf)  # [B, S, K + 1]
  conf_ce = -tf.reduce_sum(target * log_probs[:, 5::6, :max_conf + 1], axis=-1)  # [B, S]
  num_slots = distributed.global_sum(tf.cast(tf.size(conf_ce), tf.float32))
  return tf.reduce_sum(conf_ce) / tf.maximum(num_slots, 1.0)


def _positions(length, reinforce_conf):
  """[length] float32 1/0: the positions in the REINFORCE term (every position, or all but the conf tokens)."""
  if reinforce_conf:
    return tf.ones([length], tf.float32)
  return tf.cast(tf.not_equal(sequence.token_kinds(length), sequence.CONF), tf.float32)
