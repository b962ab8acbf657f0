"""Strategy resolution: "auto", "tpu", "gpu" or "cpu".

  tpu: `TPUClusterResolver` (a Colab TPU runtime or a TPU VM; `tpu_address` names a remote one), then
       `TPUStrategy`. A clear error when no TPU is reachable.
  gpu: `MirroredStrategy` over every visible GPU.
  cpu: the default strategy (one replica).
  multi_worker: `MultiWorkerMirroredStrategy` over the processes that `TF_CONFIG` names (every GPU, or the CPU, of
       each), collective all-reduce by `communication` ("auto", "ring" or "nccl"). A clear error without a cluster.
  auto: tpu if one is reachable, else gpu if any, else cpu.
"""

import json
import logging
import os
import re

import tensorflow as tf

from tfreward.config import COMMUNICATIONS, STRATEGY_NAMES
from tfreward.errors import ConfigError
from tfreward.ops import distributed



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


def tf_config_for_workers(workers, worker_index):
  """The `TF_CONFIG` dict of worker `worker_index` in a cluster of `workers` ("HOST:PORT,HOST:PORT,...")."""
  addresses = [w.strip() for w in workers.split(",")] if isinstance(workers, str) else list(workers)
  for address in addresses:
    if not re.fullmatch(r"[^\s:,]+:\d{1,5}", address):
      raise ConfigError(f"--workers takes HOST:PORT addresses separated by commas, got {address!r}.")
  if len(set(addresses)) != len(addresses):
    raise ConfigError(f"--workers lists an address twice: {','.join(addresses)}.")
  if isinstance(worker_index, bool) or not isinstance(worker_index, int) or not 0 <= worker_index < len(addresses):
    raise ConfigError(f"--worker-index must be in [0, {len(addresses) - 1}] for {len(addresses)} workers, "
                      f"got {worker_index!r}.")
  return {"cluster": {"worker": addresses}, "task": {"type": "worker", "index": worker_index}}


_NO_CLUSTER = ("runtime.strategy multi_worker needs a cluster: start every worker with --workers HOST:PORT,HOST:PORT "
               "--worker-index I, or set TF_CONFIG (see docs/distributed.md)")


def cluster_from_env():
  """Checks `TF_CONFIG` and returns its dict; ConfigError (one line, what to set) when it names no cluster."""
  raw = os.environ.get("TF_CONFIG", "")
  if not raw.strip():
    raise ConfigError(_NO_CLUSTER + "; TF_CONFIG is not set.")
  try:
    tf_config = json.loads(raw)
  except json.JSONDecodeError as e:
    raise ConfigError(f"{_NO_CLUSTER}; TF_CONFIG is not valid JSON ({e}).") from None
  cluster = tf_config.get("cluster") if isinstance(tf_config, dict) else None
  task = tf_config.get("task") if isinstance(tf_config, dict) else None
  if not cluster or not (cluster.get("worker") or cluster.get("chief")):
    raise ConfigError(f"{_NO_CLUSTER}; TF_CONFIG has no cluster.worker list.")
  if not isinstance(task, dict) or task.get("type") not in cluster or not isinstance(task.get("index"), int):
    raise ConfigError(f"{_NO_CLUSTER}; TF_CONFIG's task must name one of its cluster's jobs and an index, "
                      f"got {task!r}.")
  return tf_config


def _multi_worker_strategy(communication):
  if communication not in COMMUNICATIONS:
    raise ValueError(f"communication must be one of {COMMUNICATIONS}, got {communication!r}.")
  cluster_from_env()
  implementation = {"auto": tf.distribute.experimental.CommunicationImplementation.AUTO,
                    "ring": tf.distribute.experimental.CommunicationImplementation.RING,
                    "nccl": tf.distribute.experimental.CommunicationImplementation.NCCL}[communication]
  return tf.distribute.MultiWorkerMirroredStrategy(
      communication_options=tf.distribute.experimental.CommunicationOptions(implementation=implementation))


def get_strategy(name="auto", tpu_address=None, communication="auto"):
  """Returns a `tf.distribute.Strategy` for `name` in ("auto", "tpu", "gpu", "cpu", "multi_worker").

  multi_worker must come first in the process, before any other TensorFlow op (it configures the runtime).
  """
  if name not in STRATEGY_NAMES:
    raise ValueError(f"strategy must be one of {STRATEGY_NAMES}, got {name!r}.")
  if name == "multi_worker":
    return _multi_worker_strategy(communication)
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


def cluster_position(resolver):
  """(workers, this task's index, chief?) of the task a cluster resolver names: the "chief" job, if the cluster has
  one, counts first and is the chief; else worker 0 is."""
  jobs = resolver.cluster_spec().as_dict()
  chiefs = len(jobs.get("chief", []))
  task_id = int(resolver.task_id or 0)
  if resolver.task_type == "chief":
    return chiefs + len(jobs.get("worker", [])), task_id, True
  return chiefs + len(jobs.get("worker", [])), chiefs + task_id, chiefs == 0 and task_id == 0


def _position(strategy):
  if not distributed.is_multi_worker(strategy):
    return 1, 0, True  # one process (a TPU pod slice too: TensorFlow drives it from one client)
  return cluster_position(strategy.cluster_resolver)


def worker_index(strategy):
  """This process's index among the workers of a multi-worker strategy (0 otherwise)."""
  return _position(strategy)[1]


def num_workers(strategy):
  """The number of worker processes of a multi-worker strategy (1 otherwise)."""
  return _position(strategy)[0]


def is_chief(strategy):
  """Whether this process writes checkpoints, logs, metrics and exports (`cluster_position`); always true outside a
  multi-worker strategy."""
  return _position(strategy)[2]


def use_xla_in_compile(strategy):
  """Whether `model.compile(jit_compile=...)` may be True under `strategy`.

  MirroredStrategy (and MultiWorkerMirroredStrategy) with a jit-compiled Keras train function (or steps_per_execution > 1) fails in Keras 3.15 with
  "You must feed a value for placeholder tensor" (keras-team/keras#19246), and a nested jit-compiled function
  cannot hold its all-reduce (a merge_call); there the step runs as a plain graph with steps_per_execution 1.
  The default strategy and TPUStrategy compile the whole step with XLA.
  """
  return not isinstance(strategy, (tf.distribute.MirroredStrategy, tf.distribute.MultiWorkerMirroredStrategy))
