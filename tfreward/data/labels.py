"""Fixed-size detection labels: instances packed to `max_instances` with a validity mask, and incomplete
annotations made on purpose (objects left out of the labels at random, for studies of what they do to training).

Box format: [N, 4] float32 yxyx, normalised; classes 0-based, -1 for padding.
"""

import tensorflow as tf


def pack_instances(boxes, classes, crowd, keep, max_instances):
  """Compacts the kept instances to the front (order preserved), truncates or pads to `max_instances`.

  Args:
    boxes: [N, 4] float32; classes: [N] int32; crowd: [N] bool; keep: [N] bool.
  Returns:
    boxes [M, 4] float32 (0 for padding), classes [M] int32 (-1), valid [M] bool (kept and not crowd),
    crowd [M] bool.
  """
  order = tf.argsort(tf.cast(tf.logical_not(keep), tf.int32), stable=True)[:max_instances]  # [min(N, M)]
  count = tf.minimum(tf.reduce_sum(tf.cast(keep, tf.int32)), max_instances)
  used = tf.range(max_instances) < count  # [M]
  pad = max_instances - tf.shape(order)[0]
  boxes = tf.pad(tf.gather(boxes, order), [[0, pad], [0, 0]])
  classes = tf.pad(tf.gather(classes, order), [[0, pad]])
  crowd = tf.pad(tf.gather(crowd, order), [[0, pad]])
  boxes = tf.ensure_shape(tf.where(used[:, None], boxes, 0.0), [max_instances, 4])
  classes = tf.ensure_shape(tf.where(used, classes, -1), [max_instances])
  crowd = tf.ensure_shape(tf.logical_and(used, crowd), [max_instances])
  return boxes, classes, tf.logical_and(used, tf.logical_not(crowd)), crowd


def drop_annotations(keep, rate, *, seed):
  """Leaves each instance out of the labels with probability `rate` (the image is not touched).

  Args:
    keep: [N] bool, the instances that are training targets so far.
    rate: float in [0, 1), the probability of leaving one out.
    seed: [2] int tensor, a stateless random seed.
  Returns:
    [N] bool, `keep` with the left-out instances False.
  """
  annotated = tf.random.stateless_uniform(tf.shape(keep), seed) >= rate
  return tf.logical_and(keep, annotated)
