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
    ("data.image_size=[64,", "not valid YAML"),
    ("train.eval_every_epochs=0", "train.eval_every_epochs must be positive.*--no-eval"),
    ("data.max_eval_examples=0", "data.max_eval_examples must be null"),
    ("data.eval_split=valid[:10]", "data.eval_split 'valid[:10]' is not a split of tfreward_shapes"),
    ("data.train_split=train[:abc]", "data.train_split 'train[:abc]' is not a valid TFDS split"),
    ("data.dataset=nope", "data.dataset: unknown dataset 'nope'"),
    ("train.optimizer.learning_rate=1e-3x", "expected a number"),
])
def test_mistyped_values_are_clear_errors(override, message):
  with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
    load_config(_minimal(), [override])


def test_floats_without_a_dot_are_numbers_only_where_a_number_is_expected():
  config = load_config(_minimal(train={"optimizer": {"learning_rate": "1e-3"}}),
                       ["train.optimizer.weight_decay=5E-4", "train.optimizer.clip_norm=-.5e+1",
                        "runtime.tpu_address=1e3", "model.ce_weight=2e0"])
  optimizer = config.train.optimizer
  assert (optimizer.learning_rate, optimizer.weight_decay, optimizer.clip_norm) == (1e-3, 5e-4, -5.0)
  assert config.runtime.tpu_address == "1e3"  # A string field keeps the string.
  assert registry.parse_options("toy_detector", config.model.options).ce_weight == 2.0
  with pytest.raises(ConfigError, match="train.epochs: expected an integer, got '1e3'"):
    load_config(_minimal(), ["train.epochs=1e3"])


def test_unreadable_config_files_name_the_file(tmp_path):
  path = tmp_path / "exp.yaml"
  path.write_text("model:\n  family: toy_detector\n data: {}\n")
  with pytest.raises(ConfigError, match=f"{path}, line 3, column 2: invalid YAML"):
    load_config(str(path))
  path.write_bytes(b"\x89PNG\r\n\x1a\n\x00\xff")
  with pytest.raises(ConfigError, match="is not a YAML text file"):
    load_config(str(path))
  path.unlink()
  (tmp_path / "sub").mkdir()
  (tmp_path / "sub" / "other.yaml").write_text("model: {family: toy_detector}\n")
  with pytest.raises(ConfigError, match=f"config path '{tmp_path}' is a directory; pass a YAML config file, e.g. "
                                        f"{tmp_path / 'sub' / 'other.yaml'}"):
    load_config(str(tmp_path))


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
