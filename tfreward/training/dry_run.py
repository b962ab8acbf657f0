"""`tfreward train --dry-run`: what a run would use (strategy, workers, replicas, batches, input pipelines), without
building the model or reading data."""

import tensorflow as tf

from tfreward import strategy as strategies
from tfreward.data import sharding
from tfreward.training import trainer


def input_pipelines(strategy):
  """How many input pipelines `distribute_datasets_from_function` builds: one per host (worker process)."""
  if strategies.is_tpu_strategy(strategy):
    return int(strategy.extended.num_hosts)
  return strategies.num_workers(strategy)


def _public_name(strategy):
  for cls in (tf.distribute.MultiWorkerMirroredStrategy, tf.distribute.TPUStrategy, tf.distribute.MirroredStrategy):
    if isinstance(strategy, cls):
      return cls.__name__
  return "the default strategy (one replica)"


def _local_devices(strategy):
  try:
    return [d.split("/device:")[-1] for d in strategy.extended.worker_devices]
  except RuntimeError:  # The default strategy: one replica on the default device.
    return ["the default device"]


def _multi_worker_plan():
  """(workers, this worker's index, chief?, local devices) from TF_CONFIG, without starting the cluster (creating
  the strategy would wait for every worker)."""
  strategies.cluster_from_env()  # a clear error without a cluster
  workers, index, chief = strategies.cluster_position(tf.distribute.cluster_resolver.TFConfigClusterResolver())
  gpus = tf.config.list_logical_devices("GPU")
  return workers, index, chief, [f"GPU:{i}" for i in range(len(gpus))] or ["CPU:0"]


def describe(config, strategy=None):
  """Lines that describe the run of `config` under `strategy` (default: the configured one; multi_worker is
  planned from TF_CONFIG without connecting to the other workers)."""
  if strategy is None and config.runtime.strategy == "multi_worker":
    workers, index, chief, devices = _multi_worker_plan()
    name, replicas, pipelines, xla = "MultiWorkerMirroredStrategy", workers * len(devices), workers, False
  else:
    strategy = strategy or strategies.get_strategy(config.runtime.strategy, config.runtime.tpu_address,
                                                   config.runtime.communication)
    workers, index, chief = strategies.num_workers(strategy), strategies.worker_index(strategy), True
    devices, name = _local_devices(strategy), _public_name(strategy)
    replicas, pipelines = strategy.num_replicas_in_sync, input_pipelines(strategy)
    xla = strategies.use_xla_in_compile(strategy)
  batch = config.data.global_batch_size
  trainer.check_global_batch(config, replicas)
  files = sharding.prepared_num_files(config.data.dataset, config.data.train_split, config.data.data_dir)
  if pipelines > 1 and files is None and config.data.input_sharding == "auto":
    how = "auto: file if the split has at least one file per pipeline (dataset not prepared yet)"
  else:
    how = sharding.resolve(config.data.input_sharding, files, pipelines)
    how += f" ({files} file(s) in {config.data.train_split!r})" if files is not None else ""
  lines = [f"strategy: {name} (runtime.strategy={config.runtime.strategy})",
           f"workers: {workers}" + (f", this is worker {index}{' (chief)' if chief else ''}" if workers > 1 else ""),
           f"replicas: {replicas} ({', '.join(devices)} in this process)",
           f"global batch: {batch}, per replica: {batch // replicas}",
           f"input pipelines: {pipelines}, training input sharding: {how}",
           f"train step: {'XLA' if xla else 'graph (no XLA under mirrored strategies)'}, steps_per_execution "
           f"{config.train.steps_per_execution if xla else 1}"]
  if workers > 1:
    lines.insert(1, f"all-reduce: {config.runtime.communication}")
  return lines
