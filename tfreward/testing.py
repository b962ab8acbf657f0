"""Test helpers for model families: the N-replicas-equal-one-replica check every family must pass.

Usage in a test (with the `two_replica_strategy` fixture of tests/conftest.py):

  single = make_model()
  with strategy.scope():
    mirrored = make_model()
  assert_replicas_match_single(single, mirrored, strategy, images, labels)
"""

import numpy as np
import tensorflow as tf


def split_batch(strategy, images, labels):
  """Splits a global batch evenly along axis 0 into per-replica values of `strategy`."""
  replicas = strategy.num_replicas_in_sync
  batch = int(images.shape[0])
  if batch % replicas:
    raise ValueError(f"a batch of {batch} does not split evenly over {replicas} replicas.")
  size = batch // replicas
  parts = [(images[i * size:(i + 1) * size], tf.nest.map_structure(lambda v: v[i * size:(i + 1) * size], labels))
           for i in range(replicas)]
  return strategy.experimental_distribute_values_from_function(lambda ctx: parts[ctx.replica_id_in_sync_group])


def single_replica_gradients(model, images, labels):
  """(clipped gradients, total loss, terms) of `model` on the whole batch, outside any strategy."""
  grads, total, terms = model.compute_gradients(tf.convert_to_tensor(images), labels)
  return model.clip_gradients(grads), total, terms


def replica_gradients(model, strategy, images, labels):
  """(gradients, total loss, terms) summed over the replicas of `strategy` (each replica holds its share)."""

  @tf.function
  def replica_step(x, y):
    grads, total, terms = model.compute_gradients(x, y)
    return model.clip_gradients(grads), total, terms

  per_replica = strategy.run(replica_step, args=split_batch(strategy, images, labels))
  return strategy.reduce("SUM", per_replica, axis=None)


def assert_replicas_match_single(single, mirrored, strategy, images, labels, *, rtol=1e-5):
  """Asserts loss terms and gradients on N replicas equal those of one replica on the same global batch.

  `mirrored` (built in `strategy.scope()`) gets `single`'s weights first. Gradients are compared to `rtol` relative
  to the largest gradient entry, so that entries near zero do not demand an impossible relative precision.
  """
  mirrored.set_weights(single.get_weights())
  grads, total, terms = single_replica_gradients(single, images, labels)
  grads2, total2, terms2 = replica_gradients(mirrored, strategy, images, labels)
  np.testing.assert_allclose(total2, total, rtol=rtol, err_msg="total loss")
  for key in terms:
    np.testing.assert_allclose(terms2[key], terms[key], rtol=rtol, atol=1e-7, err_msg=key)
  scale = max([float(tf.reduce_max(tf.abs(g))) for g in grads if g is not None] + [1e-12])
  for variable, a, b in zip(single.trainable_variables, grads, grads2):
    if a is None:
      assert b is None, variable.path
      continue
    np.testing.assert_allclose(b, a, rtol=rtol, atol=rtol * scale, err_msg=variable.path)
  return grads, grads2
