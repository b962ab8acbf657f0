"""The TaskModel contract, for every registered family: options in one place, config round trip, base steps."""

import dataclasses

import keras
import numpy as np
import pytest
import tensorflow as tf

from tfreward import registry
from tfreward.errors import ConfigError
from tfreward.models.base import TaskModel
from tfreward.models.toy_detector import ToyDetector

# The smallest image each family accepts (YOLOX and RetinaNet need multiples of 32).
IMAGE_SIZE = (64, 64)


@pytest.mark.parametrize("name", registry.family_names())
def test_options_defaults_are_the_models_and_config_round_trips(name):
  family = registry.get_family(name)
  assert dataclasses.is_dataclass(family.options_cls)
  assert issubclass(family.model_cls, TaskModel) and family.model_cls.options_cls is family.options_cls
  model = family.model_cls(num_classes=3, image_size=IMAGE_SIZE)
  assert model.options == family.options_cls()  # the dataclass defaults are the model's defaults
  config = model.get_config()
  assert set(config) == {"options", "num_classes", "image_size", "clip_norm", "name"}
  assert config["options"] == dataclasses.asdict(family.options_cls())
  again = family.model_cls.from_config(config)
  assert again.options == model.options and again.get_config() == config


@pytest.mark.parametrize("name", registry.family_names())
def test_unknown_option_is_a_config_error_naming_the_valid_keys(name):
  family = registry.get_family(name)
  with pytest.raises(ConfigError, match="unknown config key 'model.no_such_key'; valid keys"):
    family.model_cls({"no_such_key": 1}, num_classes=3, image_size=IMAGE_SIZE)


def test_options_of_another_type_are_rejected():
  with pytest.raises(ValueError, match="options must be a ToyDetectorOptions or a dict"):
    ToyDetector(object(), num_classes=3, image_size=IMAGE_SIZE)


@pytest.mark.parametrize("num_classes, image_size, message", [
    (0, IMAGE_SIZE, "num_classes must be a positive int"),
    (True, IMAGE_SIZE, "num_classes must be a positive int"),
    (3, (64,), "image_size must be two positive ints"),
    (3, (0, 64), "image_size must be two positive ints"),
])
def test_bad_base_arguments(num_classes, image_size, message):
  with pytest.raises(ValueError, match=message):
    ToyDetector(num_classes=num_classes, image_size=image_size)


def test_private_keras_hook_exists_in_the_supported_keras_versions():
  """`TaskModel._maybe_symbolic_build` overrides a private Keras method; it holds for the Keras range setup.cfg
  allows, checked here on the installed one."""
  from keras.src.backend.tensorflow.trainer import TensorFlowTrainer
  major, minor = (int(v) for v in keras.__version__.split(".")[:2])
  assert (major, minor) >= (3, 10) and major < 4, keras.__version__
  assert callable(getattr(TensorFlowTrainer, "_maybe_symbolic_build", None))
  assert "_maybe_symbolic_build" in vars(TaskModel)


class ScaledHead(ToyDetector):
  """The toy detector with its head at `multiplier` x the learning rate."""
  multiplier = 0.25

  def learning_rate_multipliers(self):
    return [(self.head.trainable_variables, self.multiplier)]


def _one_step(model_cls, optimizer):
  keras.utils.set_random_seed(0)
  model = model_cls({"num_slots": 4, "width": 8}, num_classes=3, image_size=(32, 32))
  model.compile(optimizer=optimizer, jit_compile=True)
  model.build_for_training()
  before = [v.numpy() for v in model.trainable_variables]
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (2, 32, 32, 3)).astype(np.uint8)
  labels = {"boxes": np.tile(np.array([[[0.1, 0.1, 0.5, 0.6]]], np.float32), (2, 4, 1)),
            "classes": np.zeros((2, 4), np.int32), "valid": np.ones((2, 4), bool)}
  model.train_on_batch(images, labels)
  return model, [v.numpy() - b for v, b in zip(model.trainable_variables, before)]


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_learning_rate_multipliers_scale_the_update(optimizer):
  def make():
    return (keras.optimizers.SGD(0.1) if optimizer == "sgd"
            else keras.optimizers.AdamW(0.01, weight_decay=0.1))
  plain, plain_updates = _one_step(ToyDetector, make())
  scaled, scaled_updates = _one_step(ScaledHead, make())
  head = {id(v) for v in scaled.head.trainable_variables}
  for var, full, part in zip(scaled.trainable_variables, plain_updates, scaled_updates):
    expected = full * ScaledHead.multiplier if id(var) in head else full
    np.testing.assert_allclose(part, expected, rtol=1e-5, atol=1e-7, err_msg=var.path)
  assert any(np.abs(u).max() > 0 for u in scaled_updates)
