"""Model families by name: the one lookup from a config's `model.family` to code.

Each family module exposes an options dataclass (its typed config keys) and
`build(options, *, num_classes, image_size, clip_norm) -> TaskModel`. Built-in families are imported
lazily, so `import tfreward` stays light; users add their own with `register_family`.
"""

import dataclasses
import importlib
from typing import Callable

from tfreward.config import ConfigError, from_dict


@dataclasses.dataclass(frozen=True)
class Family:
  options_cls: type
  build: Callable
  task: str  # "detection" or "segmentation"


_BUILTIN = {
    # name: (module, options class, task)
    "toy_detector": ("tfreward.models.toy_detector", "ToyDetectorOptions", "detection"),
    "pix2seq": ("tfreward.models.pix2seq", "Pix2SeqOptions", "detection"),
    "yolox": ("tfreward.models.yolox", "YoloxOptions", "detection"),
    "retinanet": ("tfreward.models.retinanet", "RetinaNetOptions", "detection"),
    "group_detr": ("tfreward.models.conditional_detr", "GroupDetrOptions", "detection"),
}
_REGISTERED = {}


def register_family(name, options_cls, build, task="detection"):
  """Adds a model family: `options_cls` a dataclass, `build(options, *, num_classes, image_size, ...)`."""
  if not dataclasses.is_dataclass(options_cls):
    raise ValueError(f"options_cls must be a dataclass, got {options_cls!r}.")
  _REGISTERED[name] = Family(options_cls, build, task)


def family_names():
  return sorted(set(_BUILTIN) | set(_REGISTERED))


def get_family(name):
  if name in _REGISTERED:
    return _REGISTERED[name]
  if name not in _BUILTIN:
    raise ConfigError(f"unknown model family {name!r}; known families: {', '.join(family_names())}.")
  module_name, options_name, task = _BUILTIN[name]
  module = importlib.import_module(module_name)
  return Family(getattr(module, options_name), module.build, task)


def parse_options(family_name, options):
  """Validates `model:` keys (besides `family`) into the family's options dataclass."""
  return from_dict(get_family(family_name).options_cls, options, "model")


def build_model(model_config, *, num_classes, image_size, clip_norm=None):
  """Builds the model named by `model_config.family` with its validated options."""
  family = get_family(model_config.family)
  options = parse_options(model_config.family, model_config.options)
  return family.build(options, num_classes=num_classes, image_size=image_size, clip_norm=clip_norm)
