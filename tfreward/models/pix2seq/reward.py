"""Pix2Seq's REINFORCE objective (seeds 000, 003) and the reward statistics it logs.

One reward step: draw N = `num_samples` sequences per image from the current model inside the step (no gradient;
`options.samples`), reward them against the ground truth (`tfreward.rewards.detection`), credit them (the whole
reward per sequence, `credit: sequence`; or per box slot the reward earned from that slot on, `credit: slot`,
`reinforce.slot_returns`), subtract the leave-one-out baseline (the mean credit of the other N - 1 samples), and
apply REINFORCE and the confidence loss (`tfreward.losses.reinforce`) to sample 0 (`reinforce_samples: first`, the
seed's form) or to every sample (`all`). The model adds the MLE anchor (`mle_weight`) itself.

Statistics (replica shares of means over all samples): `reward`, `num_matches`, `nms_penalty` and the reward at each
distinct IoU threshold, `reward_50` ... `reward_95`.

Non-finite logits of the trained-on samples make every returned term NaN, the statistics included, eagerly and under
XLA alike (`tfreward.ops.finite`; the samples drawn from such a model are not trusted either).
"""

import tensorflow as tf

from tfreward.losses import reinforce
from tfreward.models.pix2seq.decoder import decode
from tfreward.ops import distributed
from tfreward.ops import finite
from tfreward.ops import sequence
from tfreward.rewards import detection


def distinct_thresholds(reward_thr):
  """The distinct IoU thresholds, sorted."""
  return tuple(sorted(set(float(t) for t in reward_thr)))


def threshold_name(threshold):
  """0.5 -> "reward_50"."""
  return f"reward_{round(threshold * 100):02d}"


def statistic_names(reward_thr):
  """The statistics besides `reward` (tracked by the model for `reward_statistics()`)."""
  return ("num_matches", "nms_penalty") + tuple(threshold_name(t) for t in distinct_thresholds(reward_thr))


def gt_sequence(labels, layout):
  """The ground truth as the reward reads it: [B, 6 * M] int32 in dataset order, one slot per object."""
  return sequence.boxes_to_sequence(labels["boxes"], labels["classes"], labels["valid"], order="fixed",
                                    seq_len=sequence.TOKENS_PER_BOX * labels["boxes"].shape[1], **layout)


def slot_credit(samples, gt, rewards, reward_config):
  """samples [B, N, L] int32, gt [B, Lg], rewards [B, N] -> [B, N, S] float32: the reward earned from each slot on."""
  num, length = samples.shape[1], samples.shape[2]
  slots = length // sequence.TOKENS_PER_BOX
  prefixes = tf.reshape(sequence.slot_prefixes(samples), [-1, num * slots, length])  # [B, N * S, L]
  prefix_rewards = tf.reshape(detection.detection_reward(prefixes, gt, **reward_config)[0], [-1, num, slots])
  return reinforce.slot_returns(rewards, prefix_rewards)


def reward_statistics(rewards, aux, reward_thr):
  """rewards [B, N] and their `detection_reward` aux -> dict of logged means (replica shares)."""
  count = tf.maximum(distributed.global_sum(tf.cast(tf.size(rewards), tf.float32)), 1.0)
  terms = {"reward": tf.reduce_sum(rewards) / count,
           "num_matches": tf.reduce_sum(aux["num_matches"]) / count,
           "nms_penalty": tf.reduce_sum(aux["nms_penalty"]) / count}
  thresholds = distinct_thresholds(reward_thr)
  thr_index = [list(reward_thr).index(t) for t in thresholds]
  per_thr = tf.reduce_sum(tf.gather(aux["reward_thr"], thr_index), axis=[1, 2]) / count  # [T distinct]
  for i, t in enumerate(thresholds):
    terms[threshold_name(t)] = per_thr[i]
  return terms


def reward_losses(decoder, memory, labels, options, *, layout, reward_config, seed=None, samples=None):
  """REINFORCE and confidence losses of one replica's batch, plus the reward statistics.

  Args:
    decoder: the model's `decoder.SequenceDecoder`.
    memory: [B, S, D] encoder memory (gradients flow into it through the chosen samples' log-probabilities).
    labels: dict boxes [B, M, 4] float32 normalised yxyx, classes [B, M] int32 (-1 padding), valid [B, M] bool.
    options: `Pix2SeqOptions` (num_samples, samples, reinforce_samples, credit, reinforce_conf).
    layout: dict max_level, max_conf, num_cls.
    reward_config: keyword arguments of `detection.detection_reward`.
    seed: [2] int stateless seed of the samples; unused when `samples` are given.
    samples: optional [B, N, L] int sequences to train on instead of drawing them.

  Returns:
    dict loss_reward, loss_conf, reward and the `statistic_names`: float32 scalar shares, all NaN when the logits
    are not finite.
  """
  if samples is None:
    samples = decode(decoder, tf.stop_gradient(memory), options.samples, layout=layout,
                     num_samples=options.num_samples, seed=seed)["tokens"]
  samples = tf.stop_gradient(tf.cast(samples, tf.int32))
  gt = gt_sequence(labels, layout)
  rewards, aux = detection.detection_reward(samples, gt, **reward_config)  # [B, N]
  credit = slot_credit(samples, gt, rewards, reward_config) if options.credit == "slot" else rewards  # [B, N(, S)]
  advantages = credit - reinforce.leave_one_out_baseline(credit)
  if options.reinforce_samples == "all":  # every sample, each with its own advantage; row b * N + n
    num, length = samples.shape[1], samples.shape[2]
    chosen = tf.reshape(samples, [-1, length])  # [B * N, L]
    advantages = tf.reshape(advantages, [-1] + advantages.shape[2:].as_list())  # [B * N] or [B * N, S]
    match_iou = tf.reshape(aux["match_iou"], [-1, length // sequence.TOKENS_PER_BOX])
  else:  # sample 0, as the seed
    chosen, advantages, match_iou = samples[:, 0], advantages[:, 0], aux["match_iou"][:, 0]
  logits = decoder(decoder.shift_right(chosen), memory)  # [B', L, V]; the N samples of an image share its memory
  terms = reinforce.reinforce_losses(logits=logits, tokens=chosen, advantages=advantages, match_iou=match_iou,
                                     reinforce_conf=options.reinforce_conf, **layout)
  terms.update(reward_statistics(rewards, aux, reward_config["reward_thr"]))
  return finite.nan_if_not_finite(terms, logits)
