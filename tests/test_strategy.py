import pytest
import tensorflow as tf

from tfreward import strategy as strategies

_HAS_GPU = bool(tf.config.list_physical_devices("GPU"))
needs_no_gpu = pytest.mark.skipif(_HAS_GPU, reason="this machine has a GPU: 'auto' and 'gpu' resolve to it")


@needs_no_gpu
def test_cpu_and_auto_fall_back_to_the_default_strategy():
  assert strategies.get_strategy("cpu").num_replicas_in_sync == 1
  assert strategies.get_strategy("auto").num_replicas_in_sync == 1


def test_tpu_requested_without_tpu_is_a_clear_error():
  with pytest.raises(strategies.NoTPUError, match="no TPU is reachable"):
    strategies.get_strategy("tpu")


@needs_no_gpu
def test_gpu_requested_without_gpu_is_a_clear_error():
  with pytest.raises(ValueError, match="sees no GPU"):
    strategies.get_strategy("gpu")


def test_unknown_strategy_name():
  with pytest.raises(ValueError, match="strategy must be one of"):
    strategies.get_strategy("abacus")


def test_two_replica_fixture(two_replica_strategy):
  assert two_replica_strategy.num_replicas_in_sync == 2
  assert not strategies.use_xla_in_compile(two_replica_strategy)
  assert strategies.use_xla_in_compile(tf.distribute.get_strategy())


def test_workers_flags_make_a_tf_config():
  assert strategies.tf_config_for_workers("localhost:2222, 10.0.0.2:2222", 1) == {
      "cluster": {"worker": ["localhost:2222", "10.0.0.2:2222"]}, "task": {"type": "worker", "index": 1}}
  for workers, index, message in (("localhost", 0, "HOST:PORT addresses"), ("a:1,a:1", 0, "address twice"),
                                  ("a:1,b:1", 2, r"--worker-index must be in \[0, 1\] for 2 workers, got 2"),
                                  ("a:1", -1, "got -1")):
    with pytest.raises(ValueError, match=message):
      strategies.tf_config_for_workers(workers, index)


@pytest.mark.parametrize("tf_config, message", [
    (None, "TF_CONFIG is not set"), ("{not json", "not valid JSON"), ('{"task": {}}', "no cluster.worker list"),
    ('{"cluster": {"worker": ["a:1"]}, "task": {"type": "ps", "index": 0}}', "task must name one of"),
])
def test_multi_worker_without_a_cluster_says_what_to_set(monkeypatch, tf_config, message):
  if tf_config is None:
    monkeypatch.delenv("TF_CONFIG", raising=False)
  else:
    monkeypatch.setenv("TF_CONFIG", tf_config)
  with pytest.raises(ValueError, match=f"multi_worker needs a cluster: start every worker with --workers .*{message}"):
    strategies.get_strategy("multi_worker")


def test_one_process_is_its_own_chief():
  strategy = tf.distribute.get_strategy()
  assert strategies.is_chief(strategy) and strategies.num_workers(strategy) == 1
  assert strategies.worker_index(strategy) == 0


def test_cluster_position_counts_a_chief_job_first():
  def position(task_type, task_id, jobs):
    resolver = tf.distribute.cluster_resolver.SimpleClusterResolver(
        tf.train.ClusterSpec(jobs), task_type=task_type, task_id=task_id)
    return strategies.cluster_position(resolver)

  workers = {"worker": ["a:1", "b:1"]}
  assert position("worker", 0, workers) == (2, 0, True) and position("worker", 1, workers) == (2, 1, False)
  with_chief = {"chief": ["c:1"], "worker": ["a:1", "b:1"]}
  assert position("chief", 0, with_chief) == (3, 0, True)
  assert position("worker", 0, with_chief) == (3, 1, False) and position("worker", 1, with_chief) == (3, 2, False)
