"""Smooth L1 (Huber with slope 1) as mmdetection and Detectron2 define it. Element-wise, XLA-safe, float32."""

import tensorflow as tf


def smooth_l1(x, *, beta):
  """Element-wise smooth L1 of a difference `x`, unreduced.

  0.5 * x ** 2 / beta where |x| < beta, else |x| - 0.5 * beta; beta == 0 is plain L1. The quadratic branch only
  ever sees |x| <= beta, so neither value nor gradient overflows for huge |x|. NaN gives NaN and +-inf gives +inf,
  eagerly and under XLA alike (the losses then return NaN terms, `tfreward.ops.finite`).

  Args:
    x: [...] float (computed in float32), e.g. predicted minus target deltas.
    beta: float >= 0. Width of the quadratic zone (0.11 in RetinaNet and FreeAnchor).

  Returns:
    [...] float32.
  """
  if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not beta >= 0.0:
    raise ValueError(f"beta must be a number >= 0, got {beta!r}.")
  ax = tf.abs(tf.cast(x, tf.float32))
  if beta == 0.0:
    return ax
  q = tf.minimum(ax, float(beta))
  return tf.where(ax < beta, 0.5 * q * q / float(beta), ax - 0.5 * float(beta))
