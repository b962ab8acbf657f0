"""`model:` keys of the deeplab family: one dataclass, its defaults and checks."""

import dataclasses
from typing import Optional

from tfreward.errors import ConfigError
from tfreward.models import backbones
from tfreward.models import options as checks

BACKBONES = backbones.RESNETS  # config name -> `tfreward.models.backbones.ResNet` size
OUTPUT_STRIDES = (16, 8)


@dataclasses.dataclass
class DeepLabOptions:
  """`model:` keys of the deeplab family (DeepLabv3).

  backbone: "resnet10", "resnet18" (basic blocks, light stem, for CPU-sized data) or "resnet50" (keras.applications).
  backbone_width: resnet10 / resnet18: channels of the stem and first stage (doubled per stage).
  backbone_weights: resnet50 only: null or "imagenet".
  output_stride: 16 (C5 dilated by 2) or 8 (C4 and C5 dilated by 2 and 4).
  aspp_channels: channels of every ASPP branch, of its projection and of the head's 3x3 conv.
  aspp_rates: atrous rates of the 3x3 ASPP branches at output stride 16; doubled at output stride 8.
  aux_head: an FCN head on C4 trained with weight `aux_weight` (term loss_aux); not used by `segment`.
  dropout: dropout after the ASPP projection (and before the aux head's classifier).
  sync_bn: batch statistics over all replicas (backbone, ASPP and heads).
  """
  backbone: str = "resnet50"
  backbone_width: int = 64
  backbone_weights: Optional[str] = None
  output_stride: int = 16
  aspp_channels: int = 256
  aspp_rates: tuple[int, ...] = (6, 12, 18)
  aux_head: bool = False
  aux_weight: float = 0.4
  dropout: float = 0.1
  sync_bn: bool = True

  def __post_init__(self):
    checks.check_choice("backbone", self.backbone, tuple(BACKBONES))
    checks.check_backbone_weights(self.backbone_weights, self.backbone)
    checks.check_choice("output_stride", self.output_stride, OUTPUT_STRIDES)
    checks.check_at_least(self, ("backbone_width", "aspp_channels"))
    if not self.aspp_rates or any(isinstance(r, bool) or not isinstance(r, int) or r < 1 for r in self.aspp_rates):
      raise ConfigError(f"model.aspp_rates must be a non-empty list of positive ints, got {self.aspp_rates!r}.")
    checks.check_number("aux_weight", self.aux_weight, 0)
    checks.check_number("dropout", self.dropout, 0)
    if self.dropout >= 1:
      raise ConfigError(f"model.dropout must be in [0, 1), got {self.dropout!r}.")

  @property
  def rates(self):
    """The atrous rates at `output_stride`: `aspp_rates`, doubled at output stride 8."""
    return tuple(r * 16 // self.output_stride for r in self.aspp_rates)
