"""Strategy resolution: "auto", "tpu", "gpu" or "cpu".

  tpu: `TPUClusterResolver` (a Colab TPU runtime or a TPU VM; `tpu_address` names a remote one), then
       `TPUStrategy`. A clear error when no TPU is reachable.
  gpu: `MirroredStrategy` over every visible GPU.
  cpu: the default strategy (one replica).
  auto: tpu if one is reachable, else gpu if any, else cpu.
"""

import logging

import tensorflow as tf

from tfreward.config import STRATEGY_NAMES



class NoTPUError(RuntimeError):
  """A TPU was requested but none is reachable."""


def split_cpu(num_devices=2):
  """Splits the host CPU into `num_devices` logical devices. Call before TensorFlow initialises devices.

  Idempotent when the split is already in place; raises RuntimeError if TensorFlow started with another layout.
  """
  cpus = tf.config.list_physical_devices("CPU")
  try:
    tf.config.set_logical_device_configuration(
        cpus[0], [tf.config.LogicalDeviceConfiguration() for _ in range(num_devices)])
  except RuntimeError:
    if len(tf.config.list_logical_devices("CPU")) < num_devices:
      raise RuntimeError(
          f"TensorFlow is already initialised with {len(tf.config.list_logical_devices('CPU'))} logical CPU "
          f"device(s); call split_cpu({num_devices}) before any TensorFlow op runs.") from None


_MIRRORED_CPU = {}


def mirrored_cpu_strategy(num_replicas=2):
  """The MirroredStrategy over the first `num_replicas` logical CPU devices (see `split_cpu`).

  One instance per process and replica count: several MirroredStrategy objects over the same devices number their
  collective ops independently, and their all-reduces then collide ("Shape mismatch in the collective instance").
  """
  if num_replicas not in _MIRRORED_CPU:
    cpus = tf.config.list_logical_devices("CPU")
    if len(cpus) < num_replicas:
      raise RuntimeError(f"Need {num_replicas} logical CPU devices, have {len(cpus)}: call split_cpu first.")
    _MIRRORED_CPU[num_replicas] = tf.distribute.MirroredStrategy([d.name for d in cpus[:num_replicas]])
  return _MIRRORED_CPU[num_replicas]


def _tpu_strategy(tpu_address):
  try:
    resolver = tf.distribute.cluster_resolver.TPUClusterResolver(tpu=tpu_address or "")
    if tpu_address:
      tf.config.experimental_connect_to_cluster(resolver)
    tf.tpu.experimental.initialize_tpu_system(resolver)
  except (ValueError, RuntimeError, tf.errors.OpError) as e:
    raise NoTPUError(
        f"strategy 'tpu' was requested but no TPU is reachable ({type(e).__name__}: {str(e).splitlines()[0]}). "
        "On Colab choose Runtime > Change runtime type > TPU; on a TPU VM run on the VM itself; "
        "or pass --set runtime.strategy=auto to fall back to GPU/CPU.") from None
  return tf.distribute.TPUStrategy(resolver)


def get_strategy(name="auto", tpu_address=None):
  """Returns a `tf.distribute.Strategy` for `name` in ("auto", "tpu", "gpu", "cpu")."""
  if name not in STRATEGY_NAMES:
    raise ValueError(f"strategy must be one of {STRATEGY_NAMES}, got {name!r}.")
  if name == "tpu":
    return _tpu_strategy(tpu_address)
  if name == "auto":
    try:
      return _tpu_strategy(tpu_address)
    except NoTPUError:
      pass
    name = "gpu" if tf.config.list_physical_devices("GPU") else "cpu"
  if name == "gpu":
    gpus = tf.config.list_logical_devices("GPU")
    if not gpus:
      raise ValueError("strategy 'gpu' was requested but TensorFlow sees no GPU; use 'cpu' or 'auto'.")
    return tf.distribute.MirroredStrategy([g.name for g in gpus])
  logging.info("Using the default (single-replica) strategy on the CPU.")
  return tf.distribute.get_strategy()


def is_tpu_strategy(strategy):
  return isinstance(strategy, (tf.distribute.TPUStrategy,))


def use_xla_in_compile(strategy):
  """Whether `model.compile(jit_compile=...)` may be True under `strategy`.

  MirroredStrategy with a jit-compiled Keras train function (or steps_per_execution > 1) fails in Keras 3.15 with
  "You must feed a value for placeholder tensor" (keras-team/keras#19246), and a nested jit-compiled function
  cannot hold its all-reduce (a merge_call); there the step runs as a plain graph with steps_per_execution 1.
  The default strategy and TPUStrategy compile the whole step with XLA.
  """
  return not isinstance(strategy, tf.distribute.MirroredStrategy)
