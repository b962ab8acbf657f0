"""DeepLab's objectives: (class-weighted) cross-entropy and the two mIoU-reward estimators (seeds 000, 003).

Shapes: logits [B, H, W, C] float32 at the input size, mask [B, H, W] int (a pixel is kept when its mask is in
[0, C); 255 and anything else is ignored). Every returned term is this replica's share of the global-batch value
(`tfreward.ops.distributed`): sums divided by normalisers summed over all replicas.

  cross_entropy: sum over kept pixels of w[gt] * CE / (kept pixels of the global batch, at least 1).
  reinforce (the paper's): N label maps per image drawn from softmax(logits / temperature), pixel by pixel; each is
    rewarded by its per-image mIoU against the ground truth (`rewards.segmentation.per_image_iou`) minus the mean
    reward of the image's other N - 1 samples (leave-one-out); loss_reward = -sum(advantage * mean over kept pixels
    of log p(sample)) / (B * N of the global batch), log p the model's (temperature 1). An image whose mIoU is
    undefined (every pixel ignored) gets zero advantage.
  weighted_ce (the seed's): R = 1 - mIoU of the greedy (argmax) map (0.5 when undefined), r = R - baseline_weight *
    (mean R of the global batch's other images; 0 for a global batch of one image, which has none); loss_reward =
    sum over kept pixels of r[image] * w[gt] * CE / (kept pixels of the global batch). R is large where the
    prediction is bad, so badly segmented images weigh more.

Statistics (shares of global means over the images with a defined mIoU): `reward` (reinforce: the samples' mIoU;
weighted_ce: r), `advantage_std` (reinforce: root mean square advantage; weighted_ce: the spread of r),
`miou_samples` (reinforce) and `miou_greedy` (both).

Non-finite logits: the model's `compute_losses` returns every term and statistic as NaN when a logit (main or
auxiliary head) is NaN or +-inf, eagerly and under XLA alike (`tfreward.ops.finite`): sampling, argmax and the mIoU
would otherwise see NaN differently in the two modes.
"""

import tensorflow as tf

from tfreward.ops import distributed
from tfreward.ops import sampling
from tfreward.rewards.segmentation import per_image_iou, weighted_ce_rewards

STATISTICS = {"reinforce": ("advantage_std", "miou_samples", "miou_greedy"),
              "weighted_ce": ("advantage_std", "miou_greedy")}


def kept_pixels(mask, num_classes):
  """mask [B, H, W] int -> (kept [B, H, W] bool, target [B, H, W] int32 with 0 at ignored pixels)."""
  mask = tf.cast(mask, tf.int32)
  keep = (mask >= 0) & (mask < num_classes)
  return keep, tf.where(keep, mask, tf.zeros_like(mask))


def pixel_cross_entropy(logits, mask, num_classes, class_weights=None):
  """Per-pixel w[gt] * CE [B, H, W] float32 (0 at ignored pixels) and the kept pixels [B, H, W] float32."""
  keep, target = kept_pixels(mask, num_classes)
  ce = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=target, logits=tf.cast(logits, tf.float32))
  keep = tf.cast(keep, tf.float32)
  if class_weights is not None:
    keep_weight = keep * tf.gather(tf.cast(class_weights, tf.float32), target)
    return ce * keep_weight, keep
  return ce * keep, keep


def _global_mean_share(values, valid):
  """values, valid [...] -> this replica's share of the global mean of `values` where `valid`."""
  valid = tf.cast(valid, tf.float32)
  count = tf.maximum(distributed.global_sum(tf.reduce_sum(valid)), 1.0)
  return tf.reduce_sum(tf.where(valid > 0, values, 0.0)) / count


def _global_rms_share(values, valid):
  """This replica's share (global value / replicas) of the root mean square of `values` where `valid`."""
  mean_square = distributed.global_sum(_global_mean_share(tf.square(values), valid))
  return tf.sqrt(mean_square) / float(distributed.num_replicas())


def sample_label_maps(logits, seeds, *, num_samples, temperature=1.0):
  """Label maps drawn pixel by pixel from softmax(logits / temperature), by inverting each pixel's CDF.

  Args:
    logits: [B, H, W, C] float logits (B static).
    seeds: list of B [2] int seeds, one per image (`sampling.stateless_uniform` noise: identical eagerly and under XLA).
    num_samples: int N.
    temperature: float > 0.

  Returns:
    [B, N, H, W] int32 classes (no gradient).
  """
  logits = tf.stop_gradient(tf.cast(logits, tf.float32))
  _, height, width, num_classes = logits.shape
  cdf = tf.cumsum(tf.nn.softmax(logits / float(temperature), axis=-1), axis=-1)  # [B, H, W, C]
  noise = tf.stack([sampling.stateless_uniform([num_samples, height, width], seed) for seed in seeds])
  below = tf.cast(cdf[:, None, :, :, :-1] < noise[..., None], tf.int32)  # [B, N, H, W, C - 1]
  return tf.reduce_sum(below, axis=-1)  # in [0, C - 1]


def reinforce_terms(logits, mask, *, num_classes, seeds, num_samples, temperature):
  """The paper's REINFORCE with a leave-one-out baseline over each image's samples: loss and statistics."""
  samples = sample_label_maps(logits, seeds, num_samples=num_samples, temperature=temperature)  # [B, N, H, W]
  mask = tf.cast(mask, tf.int32)
  gt = tf.broadcast_to(mask[:, None], tf.shape(samples))
  miou = per_image_iou(samples, gt, num_classes=num_classes)["miou"]  # [B, N]
  defined = ~tf.math.is_nan(miou)
  reward = tf.where(defined, miou, 0.0)
  others = (tf.reduce_sum(reward, axis=1, keepdims=True) - reward) / float(num_samples - 1)
  advantage = tf.stop_gradient(tf.where(defined, reward - others, 0.0))  # [B, N]
  keep, _ = kept_pixels(mask, num_classes)
  keep = tf.cast(keep, tf.float32)[:, None]  # [B, 1, H, W]
  log_probs = tf.nn.log_softmax(tf.cast(logits, tf.float32), axis=-1)  # [B, H, W, C]
  sample_log_prob = tf.reduce_sum(tf.one_hot(samples, num_classes) * log_probs[:, None], axis=-1)  # [B, N, H, W]
  mean_log_prob = tf.reduce_sum(sample_log_prob * keep, axis=[2, 3]) / tf.maximum(
      tf.reduce_sum(keep, axis=[2, 3]), 1.0)  # [B, N]
  num_maps = distributed.global_sum(tf.cast(tf.size(advantage), tf.float32))
  greedy = per_image_iou(tf.argmax(logits, axis=-1, output_type=tf.int32), mask, num_classes=num_classes)["miou"]
  miou_samples = _global_mean_share(reward, defined)
  return {
      "loss_reward": -tf.reduce_sum(advantage * mean_log_prob) / num_maps,
      "reward": miou_samples,
      "advantage_std": _global_rms_share(advantage, defined),
      "miou_samples": miou_samples,
      "miou_greedy": _global_mean_share(greedy, ~tf.math.is_nan(greedy)),
  }


def weighted_ce_terms(logits, mask, pixel_ce, num_pixels, *, num_classes, baseline_weight):
  """The seed's reward-weighted cross-entropy: loss and statistics.

  pixel_ce [B, H, W] and num_pixels: `pixel_cross_entropy`'s (class-weighted) per-pixel terms and the global batch's
  number of kept pixels, as the cross-entropy computes them.
  """
  greedy = tf.argmax(logits, axis=-1, output_type=tf.int32)
  miou = per_image_iou(greedy, tf.cast(mask, tf.int32), num_classes=num_classes)["miou"]  # [B]
  r = tf.stop_gradient(weighted_ce_rewards(miou, baseline_weight=baseline_weight,
                                           batch_sum=distributed.global_sum)["r"])
  per_image = tf.reduce_sum(pixel_ce, axis=[1, 2])  # [B]
  every = tf.ones_like(r, tf.bool)
  mean_r = _global_mean_share(r, every)
  return {
      "loss_reward": tf.reduce_sum(r * per_image) / num_pixels,
      "reward": mean_r,
      "advantage_std": _global_rms_share(r - distributed.global_sum(mean_r), every),
      "miou_greedy": _global_mean_share(miou, ~tf.math.is_nan(miou)),
  }
