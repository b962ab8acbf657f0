"""`model:` keys of the group_detr family: their defaults (Conditional DETR R50 with Group DETR's 11 groups) and
checks."""

import dataclasses
from typing import Optional

from tfreward.errors import ConfigError
from tfreward.models import options as checks

BACKBONES = ("small_cnn", "resnet50")


@dataclasses.dataclass
class GroupDetrOptions:
  """`model:` keys of the group_detr family.

  backbone: "resnet50" (keras.applications ResNet-50, frozen BatchNorm, stem and first stage frozen) or "small_cnn"
    (a residual CNN with GroupNorm, for CPU-sized data).
  backbone_weights: resnet50: null (random) or "imagenet".
  backbone_width, backbone_stages: small_cnn: channels of the first stage, stride-2 stages (stride 2**stages).
  backbone_lr_multiplier: backbone learning rate / learning rate (reference: 1e-5 / 1e-4; 0 freezes it).
  hidden_dim, num_heads, encoder_layers, decoder_layers, ffn_dim: Transformer sizes (hidden_dim a multiple of
    2 * num_heads: the cross-attention concatenates content and position per head).
  dropout: Transformer dropout, in [0, 1).
  num_queries: queries per group Q; must be >= data.max_instances.
  num_groups: query groups G in training (1: plain Conditional DETR); inference uses the first group.
  aux_loss: losses on every decoder layer's output, not only the last.
  cls_loss_weight, bbox_loss_weight, giou_loss_weight: loss weights, the same for every decoder layer.
  cost_class, cost_bbox, cost_giou: matching cost weights.
  focal_alpha: focal loss (and focal matching cost) alpha, in [0, 1].
  max_detections: output slots K of `detect`.
  """
  backbone: str = "resnet50"
  backbone_weights: Optional[str] = None
  backbone_width: int = 32
  backbone_stages: int = 4
  backbone_lr_multiplier: float = 0.1
  hidden_dim: int = 256
  num_heads: int = 8
  encoder_layers: int = 6
  decoder_layers: int = 6
  ffn_dim: int = 2048
  dropout: float = 0.1
  num_queries: int = 300
  num_groups: int = 11
  aux_loss: bool = True
  cls_loss_weight: float = 2.0
  bbox_loss_weight: float = 5.0
  giou_loss_weight: float = 2.0
  cost_class: float = 2.0
  cost_bbox: float = 5.0
  cost_giou: float = 2.0
  focal_alpha: float = 0.25
  max_detections: int = 100

  def __post_init__(self):
    checks.check_choice("backbone", self.backbone, BACKBONES)
    checks.check_backbone_weights(self.backbone_weights, self.backbone)
    checks.check_at_least(self, ("encoder_layers",), 0)
    checks.check_at_least(self, ("backbone_width", "backbone_stages", "hidden_dim", "num_heads", "decoder_layers",
                                 "ffn_dim", "num_queries", "num_groups", "max_detections"))
    if self.hidden_dim % (2 * self.num_heads):
      raise ConfigError(f"model.hidden_dim must be a multiple of 2 * model.num_heads, got {self.hidden_dim!r} and "
                        f"{self.num_heads!r}.")
    if not 0.0 <= self.dropout < 1.0 or self.backbone_lr_multiplier < 0.0:
      raise ConfigError(f"model.dropout must be in [0, 1) and model.backbone_lr_multiplier >= 0, got "
                        f"{self.dropout!r} and {self.backbone_lr_multiplier!r}.")
    for name in ("cls_loss_weight", "bbox_loss_weight", "giou_loss_weight", "cost_class", "cost_bbox", "cost_giou"):
      checks.check_number(name, getattr(self, name), 0)
    if not 0.0 <= self.focal_alpha <= 1.0:
      raise ConfigError(f"model.focal_alpha must be in [0, 1], got {self.focal_alpha!r}.")
