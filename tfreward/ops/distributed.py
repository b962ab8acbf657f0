"""Cross-replica reductions for loss normalisers.

Convention for every loss in the library: a loss term returned inside a replica is that replica's *share* of the
global-batch loss (sum over its examples divided by a normaliser that was summed over all replicas), so that the
shares add up to the global-batch value. With one replica the share is the whole loss.
"""

import tensorflow as tf


def global_sum(value):
  """Sums `value` over all replicas in sync; the identity outside `strategy.run` or with one replica."""
  value = tf.convert_to_tensor(value)
  ctx = tf.distribute.get_replica_context()
  if ctx is None or ctx.num_replicas_in_sync == 1:
    return value
  return ctx.all_reduce(tf.distribute.ReduceOp.SUM, value)


def num_replicas():
  """Number of replicas in sync (1 outside a strategy)."""
  ctx = tf.distribute.get_replica_context()
  if ctx is None:
    return tf.distribute.get_strategy().num_replicas_in_sync
  return ctx.num_replicas_in_sync


def is_multi_worker(strategy):
  """Whether `strategy` is a MultiWorkerMirroredStrategy spanning more than one worker process."""
  return (isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy)
          and strategy.extended._in_multi_worker_mode())  # pylint: disable=protected-access
