"""Validation of the `model:` options dataclasses: each check raises `ConfigError` naming the key and its value."""

import math

from tfreward.errors import ConfigError


def check_choice(name, value, choices):
  """`value` of key `model.<name>` must be one of `choices`."""
  if value not in choices:
    raise ConfigError(f"model.{name} must be one of {', '.join(map(str, choices))}, got {value!r}.")


def check_at_least(options, names, minimum=1):
  """Each attribute `names` of `options` must be >= `minimum`."""
  for name in names:
    value = getattr(options, name)
    if value < minimum:
      raise ConfigError(f"model.{name} must be >= {minimum}, got {value!r}.")


def check_number(name, value, minimum=None, *, allow_none=False):
  """`value` of key `model.<name>` must be a finite int or float (not a bool), >= `minimum` if given; None passes
  when `allow_none`."""
  if value is None and allow_none:
    return
  if (isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)
      or (minimum is not None and value < minimum)):
    bound = "" if minimum is None else f" >= {minimum}"
    raise ConfigError(f"model.{name} must be {'null or ' if allow_none else ''}a finite number{bound}, got {value!r}.")


def check_image_size_multiple(image_size, multiple, family):
  """Raises ConfigError unless both sides of `image_size` (the config's data.image_size) are multiples of
  `multiple` (the coarsest stride of `family`'s feature pyramid); the message suggests the nearest valid sizes."""
  size = [int(s) for s in image_size]
  if any(s % multiple for s in size):
    down = [s // multiple * multiple for s in size]
    up = [-(-s // multiple) * multiple for s in size]
    nearest = f"{down} or {up}" if min(down) > 0 else f"{up}"
    raise ConfigError(f"data.image_size must be multiples of {multiple} for {family}, got {size}; the nearest valid "
                      f"sizes are {nearest}.")


def check_backbone_weights(weights, backbone):
  """Pre-trained weights exist only for the ResNet-50 backbone: null, or "imagenet" with backbone resnet50."""
  if weights not in (None, "imagenet") or (weights and backbone != "resnet50"):
    raise ConfigError(f"model.backbone_weights must be null, or 'imagenet' with backbone resnet50, got {weights!r} "
                      f"with {backbone!r}.")
