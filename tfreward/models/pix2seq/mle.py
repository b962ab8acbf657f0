"""Pix2Seq's maximum-likelihood objective: teacher-forced cross-entropy on the MLE targets (`targets`).

Log-probabilities are restricted to each position's token kind (`sequence.constrain_logits`), the distribution the
sampler draws from. The loss is this replica's share (`tfreward.ops.distributed`): the sum of the cross-entropy
over supervised tokens divided by their number over all replicas.

Non-finite logits (NaN or +-inf anywhere, before the token-kind constraint) make `loss_mle` NaN, eagerly and under
XLA alike (`tfreward.ops.finite`). Ground-truth boxes are tokenised as given: a valid box of zero extent is a target
like any other (the input pipeline drops such boxes from training labels; evaluation keeps them, see
`tfreward.data.augment`).
"""

import tensorflow as tf

from tfreward.models.pix2seq import targets
from tfreward.ops import distributed
from tfreward.ops import finite
from tfreward.ops import sequence


def mle_loss(decoder, memory, labels, *, layout, num_boxes, filler, order, seed):
  """The MLE term of one replica's batch.

  Args:
    decoder: the model's `decoder.SequenceDecoder`.
    memory: [B, S, D] encoder memory.
    labels: dict boxes [B, M, 4] float32 normalised yxyx, classes [B, M] int32 (-1 padding), valid [B, M] bool.
    layout: dict max_level, max_conf, num_cls.
    num_boxes, filler, order: the targets' slots, filler and object order (`targets.mle_targets`).
    seed: [2] int stateless seed of the object order and noise boxes.

  Returns:
    {"loss_mle": float32 scalar share}, NaN for non-finite logits.
  """
  target, weights = targets.mle_targets(labels["boxes"], labels["classes"], labels["valid"], num_boxes=num_boxes,
                                        filler=filler, order=order, seed=seed, **layout)
  raw_logits = decoder(decoder.shift_right(target), memory)
  logits = sequence.constrain_logits(raw_logits, **layout)
  ce = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=target, logits=logits)  # [B, L]
  count = distributed.global_sum(tf.reduce_sum(weights))
  return finite.nan_if_not_finite({"loss_mle": tf.reduce_sum(ce * weights) / tf.maximum(count, 1.0)}, raw_logits)
