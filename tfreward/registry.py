"""Model families by name: the one lookup from a config's `model.family` to code.

A family is a `tfreward.models.base.TaskModel` subclass; its `options_cls` dataclass holds its typed config keys,
and it is built as `model_cls(options, *, num_classes, image_size, clip_norm)`. Built-in families are imported
lazily, so `import tfreward` stays light; users add their own with `register_family`.
"""

import dataclasses
import importlib

from tfreward.config import TASKS, ConfigError


@dataclasses.dataclass(frozen=True)
class Family:
  model_cls: type
  task: str  # one of TASKS

  @property
  def options_cls(self):
    return self.model_cls.options_cls


_BUILTIN = {
    # name: (module, model class, task)
    "toy_detector": ("tfreward.models.toy_detector", "ToyDetector", "detection"),
    "pix2seq": ("tfreward.models.pix2seq", "Pix2Seq", "detection"),
    "yolox": ("tfreward.models.yolox", "Yolox", "detection"),
    "retinanet": ("tfreward.models.retinanet", "RetinaNet", "detection"),
    "group_detr": ("tfreward.models.group_detr", "GroupDetr", "detection"),
    "deeplab": ("tfreward.models.deeplab", "DeepLab", "segmentation"),
}
_REGISTERED = {}


def register_family(name, model_cls, task="detection"):
  """Adds a model family: `model_cls` a TaskModel subclass whose `options_cls` is a dataclass."""
  if not dataclasses.is_dataclass(getattr(model_cls, "options_cls", None)):
    raise ValueError(f"model_cls.options_cls must be a dataclass, got {model_cls!r}.")
  if task not in TASKS:
    raise ValueError(f"task must be one of {TASKS}, got {task!r}.")
  _REGISTERED[name] = Family(model_cls, task)


def family_names():
  return sorted(set(_BUILTIN) | set(_REGISTERED))


def get_family(name):
  if name in _REGISTERED:
    return _REGISTERED[name]
  if name not in _BUILTIN:
    raise ConfigError(f"unknown model family {name!r}; known families: {', '.join(family_names())}.")
  module_name, class_name, task = _BUILTIN[name]
  return Family(getattr(importlib.import_module(module_name), class_name), task)


def parse_options(family_name, options):
  """Validates `model:` keys (besides `family`) into the family's options dataclass."""
  return get_family(family_name).model_cls.parse_options(options)


def build_model(model_config, *, num_classes, image_size, clip_norm=None):
  """Builds the model named by `model_config.family` with its validated options."""
  family = get_family(model_config.family)
  options = parse_options(model_config.family, model_config.options)
  return family.model_cls(options, num_classes=num_classes, image_size=image_size, clip_norm=clip_norm)
