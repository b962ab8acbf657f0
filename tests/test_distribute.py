import pytest
import tensorflow as tf

from tfreward import distribute


def test_cpu_and_auto_fall_back_to_the_default_strategy():
  assert distribute.get_strategy("cpu").num_replicas_in_sync == 1
  assert distribute.get_strategy("auto").num_replicas_in_sync == 1


def test_tpu_requested_without_tpu_is_a_clear_error():
  with pytest.raises(distribute.NoTPUError, match="no TPU is reachable"):
    distribute.get_strategy("tpu")


def test_gpu_requested_without_gpu_is_a_clear_error():
  with pytest.raises(ValueError, match="sees no GPU"):
    distribute.get_strategy("gpu")


def test_unknown_strategy_name():
  with pytest.raises(ValueError, match="strategy must be one of"):
    distribute.get_strategy("abacus")


def test_two_replica_fixture(two_replica_strategy):
  assert two_replica_strategy.num_replicas_in_sync == 2
  assert not distribute.use_xla_in_compile(two_replica_strategy)
  assert distribute.use_xla_in_compile(tf.distribute.get_strategy())
