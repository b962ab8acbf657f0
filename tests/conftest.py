"""Test setup: split the host CPU into two logical devices before TensorFlow starts, for 2-replica tests."""

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402

from tfreward import strategy as strategies  # noqa: E402

strategies.split_cpu(2)
# Test helpers shared by several test files (mock_tfds) import by name.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="session")
def shapes_test_data_dir(tmp_path_factory):
  """A TFDS data dir with `tfreward_shapes/test` (40 train / 10 validation images) built once, for tests that only
  read it (a test that writes beside the data, e.g. the statistics cache, builds its own)."""
  from tfreward.data import shapes
  path = str(tmp_path_factory.mktemp("tfds_shapes_test"))
  shapes.ensure_built("tfreward_shapes/test", path)
  return path


@pytest.fixture
def two_replica_strategy():
  """A MirroredStrategy over two logical CPU devices."""
  return strategies.mirrored_cpu_strategy(2)


@pytest.fixture
def default_strategy():
  return tf.distribute.get_strategy()


@pytest.fixture
def toy_config_file(tmp_path, shapes_test_data_dir):
  """`make(**train)` writes a tiny toy-detector config on tfreward_shapes/test (64 x 64, batch 4, CPU) with the given
  `train` section and returns its path."""
  import yaml

  def make(**train):
    raw = {
        "model": {"family": "toy_detector", "num_slots": 8, "width": 8},
        "data": {"dataset": "tfreward_shapes/test", "data_dir": shapes_test_data_dir, "image_size": [64, 64],
                 "max_instances": 8, "global_batch_size": 4, "eval_batch_size": 4},
        "train": train,
        "runtime": {"strategy": "cpu"},
    }
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(raw))
    return str(path)

  return make
