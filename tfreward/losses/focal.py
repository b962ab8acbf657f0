"""Sigmoid focal loss (RetinaNet) and the focal classification cost DETR-style matchers use. XLA-safe, float32.

Element-wise: a NaN or infinite logit gives a non-finite value at that element (NaN, or inf), the same eagerly and
under XLA; the losses built on these turn any non-finite prediction into NaN terms (`tfreward.ops.finite`).
"""

import tensorflow as tf


def _check_focal_args(alpha, gamma):
  if not 0.0 <= alpha <= 1.0:
    raise ValueError(f"alpha must be in [0, 1], got {alpha!r}.")
  if gamma < 0.0:
    raise ValueError(f"gamma must be >= 0, got {gamma!r}.")


def sigmoid_focal_loss(*, logits, labels, alpha=0.25, gamma=2.0):
  """Element-wise sigmoid focal loss, unreduced.

  `alpha_t * CE(logits, labels) * (1 - p_t) ** gamma` with `p = sigmoid(logits)`,
  `p_t = p * labels + (1 - p) * (1 - labels)` and `alpha_t = alpha * labels + (1 - alpha) * (1 - labels)`.

  Args:
    logits: [...] float (computed in float32).
    labels: [...] float in [0, 1], same shape as `logits` (one-hot targets; all zeros for background).
    alpha: float in [0, 1]. Weight of positives. Defaults to 0.25.
    gamma: float >= 0. Focusing exponent. Defaults to 2.0.

  Returns:
    [...] float32, the loss of every element.
  """
  _check_focal_args(alpha, gamma)
  logits = tf.cast(logits, tf.float32)
  labels = tf.cast(labels, tf.float32)
  ce = tf.nn.sigmoid_cross_entropy_with_logits(labels=labels, logits=logits)
  prob = tf.sigmoid(logits)
  p_t = prob * labels + (1.0 - prob) * (1.0 - labels)
  alpha_t = alpha * labels + (1.0 - alpha) * (1.0 - labels)
  return alpha_t * ce * tf.pow(1.0 - p_t, gamma)


def focal_class_cost(logits, *, alpha=0.25, gamma=2.0, eps=1e-8):
  """Per-class matching cost of labelling a prediction with each class (Deformable / Conditional DETR).

  `alpha * (1 - p) ** gamma * -log(p + eps) - (1 - alpha) * p ** gamma * -log(1 - p + eps)` with
  `p = sigmoid(logits)`: the focal loss of calling the prediction positive minus that of calling it negative.
  `1 - p + eps` is floored at `eps` (the same value): XLA reassociates it into `(1 + eps) - p`, which is 0 in float32
  once p rounds to 1 (logits >= 17), and returned -inf there where eager gives -(1 - alpha) * ln(eps).

  Args:
    logits: [..., C] float (computed in float32).
    alpha: float in [0, 1]. Defaults to 0.25.
    gamma: float >= 0. Defaults to 2.0.
    eps: float. Keeps the logarithms finite. Defaults to 1e-8.

  Returns:
    [..., C] float32 cost; lower is a better match for that class.
  """
  _check_focal_args(alpha, gamma)
  prob = tf.sigmoid(tf.cast(logits, tf.float32))
  neg = (1.0 - alpha) * tf.pow(prob, gamma) * -tf.math.log(tf.maximum(1.0 - prob + eps, eps))
  pos = alpha * tf.pow(1.0 - prob, gamma) * -tf.math.log(prob + eps)
  return pos - neg
