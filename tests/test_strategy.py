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
