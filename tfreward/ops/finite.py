"""The rule every loss follows for non-finite predictions: NaN out, eagerly and under XLA alike.

Rule: when any prediction entering a loss is not finite (NaN, +inf or -inf), or overflows where the loss decodes it
(e.g. a YOLOX box whose squared area is not finite in float32, see `tfreward.losses.yolox`), every float term the
loss returns is NaN, and so is its gradient. Without the rule, NaN meets comparisons, `top_k`, `argmax`, clamps and
float-to-int casts inside assignments, whose NaN behaviour differs between eager kernels and XLA, so a poisoned batch
could give a finite loss eagerly and another one compiled (or a finite loss with NaN gradients). With it, a training
guard that stops on a non-finite loss or gradient norm sees every such batch, in either mode.

The check is a `reduce_all(is_finite(...))` over the predictions (boolean, so identical eagerly and compiled) and the
terms are multiplied by 1 or NaN: bit for bit unchanged on finite inputs, static shapes, XLA-safe. Assignments
(SimOTA, FreeAnchor's box probability, the Hungarian matcher) separately sanitise the costs they rank, so they stay
defined on such inputs (no crash, no hang) even though the terms are NaN.
"""

import tensorflow as tf


def all_finite(*tensors):
  """bool scalar: every element of every floating tensor is finite. Integer and bool tensors are skipped."""
  checks = []
  for tensor in tensors:
    tensor = tf.convert_to_tensor(tensor)
    if tensor.dtype.is_floating:
      checks.append(tf.reduce_all(tf.math.is_finite(tensor)))
  if not checks:
    return tf.constant(True)
  return tf.reduce_all(tf.stack(checks))


def nan_unless(ok, value):
  """`value` (a floating tensor, any shape) where the bool scalar `ok` holds, else NaN; its gradient too.

  Multiplies by 1 or NaN, so a finite value passes unchanged, signed zeros included (and its gradient as well;
  subnormals are flushed to zero, as by every TF CPU kernel).
  """
  value = tf.convert_to_tensor(value)
  return value * tf.where(ok, tf.ones([], value.dtype), tf.constant(float("nan"), value.dtype))


def nan_if_not_finite(value, *tensors):
  """`value` with NaN in place of every float when some element of `tensors` is not finite.

  Args:
    value: a floating tensor, or a dict of tensors (its non-floating entries pass unchanged).
    *tensors: the predictions (any shapes and float dtypes) that decide.

  Returns:
    The same structure as `value`.
  """
  ok = all_finite(*tensors)
  if isinstance(value, dict):
    return {name: nan_unless(ok, v) if tf.convert_to_tensor(v).dtype.is_floating else v for name, v in value.items()}
  return nan_unless(ok, value)
