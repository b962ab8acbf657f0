"""Typed experiment configs: YAML validated into dataclasses, unknown or mistyped keys rejected.

A config file has four sections, each optional except `model.family`:

  model:    family name (see `tfreward.registry`) plus that family's own typed options
  data:     dataset, task, image size, batch sizes, augmentation
  train:    steps, optimizer, schedule, precision, checkpoints
  runtime:  strategy ("auto", "tpu", "gpu", "cpu", "multi_worker"), all-reduce, tpu address, seed

Overrides use dotted keys: `--set train.optimizer.learning_rate=0.01`.
"""

import dataclasses
import glob
import os
import re
import types
import typing
from typing import Any, Optional

import yaml

from tfreward.errors import ConfigError, DatasetError  # ConfigError is re-exported: the config module's error

# The choice lists of the config, each spelled here once (the strategy resolver and the pipelines import them).
TASKS = ("detection", "segmentation")
STRATEGY_NAMES = ("auto", "tpu", "gpu", "cpu", "multi_worker")
COMMUNICATIONS = ("auto", "ring", "nccl")  # multi_worker all-reduce
INPUT_SHARDINGS = ("auto", "file", "example")
OPTIMIZERS = ("adamw", "sgd")
SCHEDULES = ("cosine", "step", "constant")
# A number with an exponent: YAML 1.1 (PyYAML) reads 1e-3 or 1.0e3 as strings, they need a dot and a signed exponent.
_EXPONENT_NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


@dataclasses.dataclass
class AugmentConfig:
  hflip: bool = True
  scale_min: float = 0.8
  scale_max: float = 1.25


@dataclasses.dataclass
class DataConfig:
  dataset: str = "tfreward_shapes"
  task: str = "detection"
  data_dir: Optional[str] = None
  manual_dir: Optional[str] = None
  train_split: str = "train"
  eval_split: str = "validation"
  image_size: tuple[int, int] = (128, 128)
  max_instances: int = 16
  global_batch_size: int = 32
  eval_batch_size: int = 32
  shuffle_buffer: int = 1000
  max_eval_examples: Optional[int] = None
  # Training input across hosts: "file" gives each input pipeline its own TFRecord files (no host reads another's
  # data; the stream depends on the number of hosts), "example" has every pipeline read the one global stream and
  # keep its rows of each global batch (N hosts train on exactly the batches of one), "auto" = "file" when the split
  # has at least one file per pipeline. One pipeline (one host) reads the global stream either way.
  input_sharding: str = "auto"
  augment: AugmentConfig = dataclasses.field(default_factory=AugmentConfig)


@dataclasses.dataclass
class OptimizerConfig:
  name: str = "adamw"  # "adamw" or "sgd"
  learning_rate: float = 1e-3
  weight_decay: float = 1e-4
  momentum: float = 0.9  # sgd
  nesterov: bool = True  # sgd
  beta_1: float = 0.9
  beta_2: float = 0.999
  epsilon: float = 1e-8
  clip_norm: Optional[float] = None  # global gradient-norm clipping, over the global batch
  schedule: str = "cosine"  # "cosine", "step" or "constant"
  warmup_steps: int = 0
  decay_steps: Optional[list[int]] = None  # "step": boundaries (default: at 2/3 and 8/9 of training)
  decay_rate: float = 0.1  # "step": factor at each boundary
  min_learning_rate_ratio: float = 0.0  # "cosine": floor as a fraction of the peak


@dataclasses.dataclass
class TrainConfig:
  epochs: int = 10
  steps_per_epoch: int = 100
  steps_per_execution: int = 1
  mixed_precision: bool = False  # mixed_bfloat16
  optimizer: OptimizerConfig = dataclasses.field(default_factory=OptimizerConfig)
  eval_every_epochs: int = 1
  init_checkpoint: Optional[str] = None  # weights to start from (e.g. an MLE run before reward tuning)


@dataclasses.dataclass
class RuntimeConfig:
  strategy: str = "auto"
  communication: str = "auto"  # multi_worker all-reduce: "auto", "ring" (gRPC) or "nccl" (GPUs)
  tpu_address: Optional[str] = None
  seed: int = 0


@dataclasses.dataclass
class ModelConfig:
  """`family` picks the model; `options` holds that family's own keys, validated by the registry."""
  family: str = ""
  options: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class ExperimentConfig:
  model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
  data: DataConfig = dataclasses.field(default_factory=DataConfig)
  train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
  runtime: RuntimeConfig = dataclasses.field(default_factory=RuntimeConfig)


def _type_name(tp):
  return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value, tp, path):
  """Checks and converts a YAML value to the annotated type `tp`."""
  origin = typing.get_origin(tp)
  args = typing.get_args(tp)
  if origin in (typing.Union, types.UnionType):
    if value is None and type(None) in args:
      return None
    inner = [a for a in args if a is not type(None)]
    errors = []
    for a in inner:
      try:
        return _coerce(value, a, path)
      except ConfigError as e:
        errors.append(str(e))
    raise ConfigError(errors[0])
  if dataclasses.is_dataclass(tp):
    return from_dict(tp, value, path)
  if tp is Any:
    return value
  if origin in (tuple, list):
    if not isinstance(value, (list, tuple)):
      raise ConfigError(f"{path}: expected a list for {_type_name(tp)}, got {value!r}.")
    if origin is tuple and args and args[-1] is not Ellipsis:
      if len(value) != len(args):
        raise ConfigError(f"{path}: expected {len(args)} values, got {value!r}.")
      return tuple(_coerce(v, a, f"{path}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    item = args[0] if args else Any
    out = [_coerce(v, item, f"{path}[{i}]") for i, v in enumerate(value)]
    return tuple(out) if origin is tuple else out
  if origin is dict or tp is dict:
    if not isinstance(value, dict):
      raise ConfigError(f"{path}: expected a mapping, got {value!r}.")
    return dict(value)
  if tp is bool:
    if not isinstance(value, bool):
      raise ConfigError(f"{path}: expected true or false, got {value!r}.")
    return value
  if tp is int:
    if isinstance(value, bool) or not isinstance(value, int):
      raise ConfigError(f"{path}: expected an integer, got {value!r}.")
    return value
  if tp is float:
    if isinstance(value, str) and _EXPONENT_NUMBER.fullmatch(value.strip()):
      return float(value)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
      raise ConfigError(f"{path}: expected a number, got {value!r}.")
    return float(value)
  if tp is str:
    if not isinstance(value, str):
      raise ConfigError(f"{path}: expected a string, got {value!r}.")
    return value
  raise ConfigError(f"{path}: unsupported config type {tp}.")


def from_dict(cls, values, path=""):
  """Builds dataclass `cls` from a mapping; unknown keys and wrong types raise ConfigError naming the valid keys."""
  if values is None:
    values = {}
  if not isinstance(values, dict):
    raise ConfigError(f"{path or 'config'}: expected a mapping of keys, got {values!r}.")
  hints = typing.get_type_hints(cls)
  fields = {f.name: f for f in dataclasses.fields(cls)}
  kwargs = {}
  for key, value in values.items():
    where = f"{path}.{key}" if path else str(key)
    if key not in fields:
      raise ConfigError(f"unknown config key '{where}'; valid keys{' in ' + path if path else ''}: "
                        f"{', '.join(sorted(fields))}.")
    kwargs[key] = _coerce(value, hints[key], where)
  return cls(**kwargs)


def to_dict(config):
  """Dataclass -> plain dict (tuples as lists), YAML-serialisable."""
  def convert(x):
    if isinstance(x, (list, tuple)):
      return [convert(v) for v in x]
    if isinstance(x, dict):
      return {k: convert(v) for k, v in x.items()}
    return x
  return convert(dataclasses.asdict(config))


def _parse_override(text):
  if "=" not in text:
    raise ConfigError(f"override {text!r} must look like key.path=value, e.g. train.epochs=3.")
  key, raw = text.split("=", 1)
  try:
    return key.strip().split("."), yaml.safe_load(raw)
  except yaml.YAMLError as e:
    raise ConfigError(f"override {text!r}: the value is not valid YAML ({getattr(e, 'problem', None) or e}); quote "
                      "it or close its brackets, e.g. data.image_size=[64,64].") from None


def apply_overrides(raw, overrides):
  """Applies `a.b.c=value` strings (values parsed as YAML) to a nested dict, in place; returns it."""
  for text in overrides or ():
    keys, value = _parse_override(text)
    node = raw
    for k in keys[:-1]:
      node = node.setdefault(k, {})
      if not isinstance(node, dict):
        raise ConfigError(f"override {text!r}: '{k}' is not a section.")
    node[keys[-1]] = value
  return raw


def _split_model_section(raw):
  """`model: {family: x, a: 1}` -> ModelConfig(family=x, options={a: 1})."""
  model = raw.get("model")
  if model is None:
    raise ConfigError("the config has no 'model' section; it needs at least 'model: {family: NAME}'.")
  if not isinstance(model, dict) or "family" not in model:
    raise ConfigError("the 'model' section needs a 'family' key naming the model family.")
  model = dict(model)
  family = model.pop("family")
  raw = dict(raw)
  raw["model"] = {"family": family, "options": model}
  return raw


def _check_choice(key, value, choices):
  if value not in choices:
    raise ConfigError(f"{key} must be one of {', '.join(choices)}, got {value!r}.")


def validate(config):
  """Cross-field checks. Raises ConfigError."""
  d, t = config.data, config.train
  _check_choice("data.task", d.task, TASKS)
  if any(s <= 0 for s in d.image_size):
    raise ConfigError(f"data.image_size must be two positive integers, got {list(d.image_size)}.")
  for name in ("global_batch_size", "eval_batch_size", "max_instances"):
    if getattr(d, name) <= 0:
      raise ConfigError(f"data.{name} must be positive, got {getattr(d, name)}.")
  if not 0 < d.augment.scale_min <= d.augment.scale_max:
    raise ConfigError(f"data.augment needs 0 < scale_min <= scale_max, got "
                      f"{d.augment.scale_min}, {d.augment.scale_max}.")
  if d.max_eval_examples is not None and d.max_eval_examples <= 0:
    raise ConfigError(f"data.max_eval_examples must be null (every example) or positive, got {d.max_eval_examples}.")
  if t.epochs <= 0 or t.steps_per_epoch <= 0 or t.steps_per_execution <= 0:
    raise ConfigError("train.epochs, train.steps_per_epoch and train.steps_per_execution must be positive.")
  if t.eval_every_epochs <= 0:
    raise ConfigError(f"train.eval_every_epochs must be positive (evaluate every N epochs; the final weights are "
                      f"evaluated anyway), got {t.eval_every_epochs}; to train without evaluating, pass --no-eval.")
  _check_choice("train.optimizer.name", t.optimizer.name, OPTIMIZERS)
  _check_choice("train.optimizer.schedule", t.optimizer.schedule, SCHEDULES)
  _check_choice("runtime.strategy", config.runtime.strategy, STRATEGY_NAMES)
  _check_choice("runtime.communication", config.runtime.communication, COMMUNICATIONS)
  _check_choice("data.input_sharding", d.input_sharding, INPUT_SHARDINGS)
  _check_dataset(d)
  return config


def _check_dataset(d):
  """data.dataset is known and data.train_split / data.eval_split name its splits (before anything is written)."""
  from tfreward.data import decoders  # Lazy: the datasets' metadata imports TensorFlow.
  try:
    spec = decoders.get_spec(d.dataset)
  except DatasetError as e:  # "unknown dataset ...; known datasets: ..."
    raise ConfigError(f"data.dataset: {e}") from None
  try:
    for key in ("train_split", "eval_split"):
      decoders.check_split(spec, getattr(d, key), f"data.{key}")
  except DatasetError as e:
    raise ConfigError(str(e)) from None


def _read_yaml(path):
  """The YAML mapping in file `path`; a ConfigError naming the file (and line) when it cannot be read."""
  try:
    with open(path) as f:
      raw = yaml.safe_load(f) or {}
  except FileNotFoundError:
    raise ConfigError(f"config file {path!r} does not exist.") from None
  except IsADirectoryError:
    found = sorted(glob.glob(os.path.join(path, "**", "*.yaml"), recursive=True))
    hint = f", e.g. {found[0]}" if found else ""
    raise ConfigError(f"config path {path!r} is a directory; pass a YAML config file{hint}.") from None
  except yaml.MarkedYAMLError as e:
    mark = e.problem_mark or e.context_mark
    where = f", line {mark.line + 1}, column {mark.column + 1}" if mark else ""
    raise ConfigError(f"{path}{where}: invalid YAML: {e.problem or e.context}; fix the syntax there (indentation, "
                      "a missing ':' or an unclosed bracket or quote).") from None
  except (yaml.YAMLError, UnicodeDecodeError) as e:
    raise ConfigError(f"{path} is not a YAML text file ({' '.join(str(e).split())}); pass a config such as "
                      "configs/shapes/toy_detector.yaml.") from None
  if not isinstance(raw, dict):
    raise ConfigError(f"{path}: a config file must be a YAML mapping (model:, data:, train:, runtime:).")
  return raw


def load_config(path_or_dict, overrides=()):
  """Reads a YAML file (or a dict), applies `key=value` overrides, validates; returns an ExperimentConfig."""
  if isinstance(path_or_dict, dict):
    raw = dict(path_or_dict)
  else:
    raw = _read_yaml(path_or_dict)
  raw = apply_overrides(raw, overrides)
  raw = _split_model_section(raw)
  return validate(from_dict(ExperimentConfig, raw))
