"""tfreward.ops.finite: the non-finite rule's helpers, eagerly and under XLA, values and gradients."""

import numpy as np
import pytest
import tensorflow as tf

from tfreward.ops import finite


def _maybe_jit(fn, jit):
  return tf.function(fn, jit_compile=True) if jit else fn


@pytest.mark.parametrize("jit", [False, True])
def test_all_finite(jit):
  fn = _maybe_jit(lambda *t: finite.all_finite(*t), jit)
  ones, ints = tf.ones([3, 2]), tf.constant([1, 2], tf.int32)
  assert bool(fn(ones, ints))
  for bad in (np.nan, np.inf, -np.inf):
    poisoned = tf.tensor_scatter_nd_update(ones, [[2, 1]], [bad])
    assert not bool(fn(ones, poisoned, ints))
    assert not bool(fn(tf.cast(poisoned, tf.bfloat16)))
  assert bool(finite.all_finite()) and bool(finite.all_finite(ints))


@pytest.mark.parametrize("jit", [False, True])
def test_nan_if_not_finite_passes_finite_values_bit_for_bit_and_nans_values_and_gradients(jit):
  def fn(value, prediction):
    with tf.GradientTape() as tape:
      tape.watch(value)
      out = finite.nan_if_not_finite({"a": value * 3.0, "b": tf.reduce_sum(value), "k": tf.constant(7)}, prediction)
      total = out["b"]
    return out, tape.gradient(total, value)

  fn = _maybe_jit(fn, jit)
  value = tf.constant([0.1, -2.5e30, 1e-30, -0.0], tf.float32)  # (TF kernels flush subnormals to zero anyway)
  out, grad = fn(value, tf.constant([1.0, 2.0]))
  np.testing.assert_array_equal(out["a"], value.numpy() * np.float32(3.0))
  assert np.signbit(out["a"][3])  # -0.0 stays -0.0
  assert out["b"].numpy() == np.sum(value.numpy()) and int(out["k"]) == 7
  np.testing.assert_array_equal(grad, np.ones(4, np.float32))
  out, grad = fn(value, tf.constant([1.0, np.nan]))
  assert np.all(np.isnan(out["a"])) and np.isnan(out["b"]) and int(out["k"]) == 7
  assert np.all(np.isnan(grad))


def test_nan_unless_keeps_the_dtype():
  value = tf.constant(1.5, tf.bfloat16)
  assert finite.nan_unless(tf.constant(True), value).dtype == tf.bfloat16
  assert np.isnan(finite.nan_unless(tf.constant(False), value).numpy().astype(np.float32))
