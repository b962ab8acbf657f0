import pytest

from tfreward import registry
from tfreward.config import ConfigError, load_config


def _minimal(**sections):
  raw = {"model": {"family": "toy_detector"}}
  raw.update(sections)
  return raw


def test_defaults_and_overrides():
  config = load_config(_minimal(), ["train.epochs=3", "data.image_size=[64, 96]",
                                    "train.optimizer.clip_norm=0.1", "model.num_slots=8"])
  assert config.train.epochs == 3
  assert config.data.image_size == (64, 96)
  assert config.train.optimizer.clip_norm == 0.1
  assert config.model.family == "toy_detector"
  assert registry.parse_options("toy_detector", config.model.options).num_slots == 8


def test_unknown_key_names_the_valid_ones():
  with pytest.raises(ConfigError, match=r"unknown config key 'train.epoch'.*epochs"):
    load_config(_minimal(train={"epoch": 3}))
  with pytest.raises(ConfigError, match=r"unknown config key 'trian'.*train"):
    load_config(_minimal(trian={}))


def test_unknown_family_option_names_the_valid_ones():
  config = load_config({"model": {"family": "toy_detector", "slots": 3}})
  with pytest.raises(ConfigError, match=r"'model.slots'.*num_slots"):
    registry.parse_options("toy_detector", config.model.options)


def test_unknown_family():
  with pytest.raises(ConfigError, match="unknown model family 'nope'; known families: .*toy_detector"):
    registry.get_family("nope")


@pytest.mark.parametrize("override, message", [
    ("train.epochs=three", "train.epochs: expected an integer"),
    ("train.epochs=1.5", "train.epochs: expected an integer"),
    ("data.augment.hflip=3", "expected true or false"),
    ("data.image_size=[64]", "expected 2 values"),
    ("train.optimizer.name=lamb", "one of adamw, sgd"),
    ("runtime.strategy=quantum", "runtime.strategy"),
    ("data.image_size=[0, 64]", "positive"),
    ("data.task=depth", "data.task"),
    ("epochs", "key.path=value"),
])
def test_mistyped_values_are_clear_errors(override, message):
  with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
    load_config(_minimal(), [override])


def test_model_section_is_required(tmp_path):
  with pytest.raises(ConfigError, match="no 'model' section"):
    load_config({"train": {"epochs": 1}})
  with pytest.raises(ConfigError, match="does not exist"):
    load_config(str(tmp_path / "missing.yaml"))


def test_every_shipped_config_validates():
  import glob
  import os
  root = os.path.join(os.path.dirname(__file__), "..", "configs")
  paths = sorted(glob.glob(os.path.join(root, "**", "*.yaml"), recursive=True))
  assert paths, "configs/ holds no YAML files"
  for path in paths:
    config = load_config(path)
    registry.parse_options(config.model.family, config.model.options)
