"""The `model:` options of the yolox family: the single spelling of its keys, defaults and checks."""

import dataclasses
from typing import Optional

from tfreward.errors import ConfigError
from tfreward.models import options as checks

# size: (depth multiplier, width multiplier, depthwise convolutions), as in the YOLOX exps.
SIZES = {"nano": (0.33, 0.25, True), "tiny": (0.33, 0.375, False), "s": (0.33, 0.5, False),
         "m": (0.67, 0.75, False), "l": (1.0, 1.0, False), "x": (1.33, 1.25, False)}


@dataclasses.dataclass
class YoloxOptions:
  """`model:` keys of the yolox family.

  size: architecture preset, one of nano, tiny, s, m, l, x (`SIZES`: depth and width multipliers, depthwise).
  depth_multiplier, width_multiplier: positive floats overriding the preset's (null: the preset's).
  depthwise: depthwise-separable 3x3 convolutions, overriding the preset's (null: the preset's; nano uses them).
  sync_bn: batch statistics over all replicas.
  iou_type: box loss, "iou" (1 - IoU^2) or "giou".
  assigner: SimOTA variant, "exact" or "fast".
  iou_weight: weight of the box (IoU) loss; the objectness, class and L1 terms weigh 1.
  l1_last_epochs: the L1 box loss is on for the last N epochs (YOLOX: 15); 0 never.
  ema, ema_decay, ema_ramp_updates: keep an EMA of the weights (decay, ramp in updates) for evaluation and export.
  score_threshold, nms_iou_threshold: detection score threshold and class-aware NMS IoU threshold.
  max_detections: output slots per image. pre_nms_top_k: candidates entering NMS.
  """
  size: str = "s"
  depth_multiplier: Optional[float] = None
  width_multiplier: Optional[float] = None
  depthwise: Optional[bool] = None
  sync_bn: bool = True
  iou_type: str = "iou"
  assigner: str = "exact"
  iou_weight: float = 5.0
  l1_last_epochs: int = 0
  ema: bool = True
  ema_decay: float = 0.9998
  ema_ramp_updates: float = 2000.0
  score_threshold: float = 0.01
  nms_iou_threshold: float = 0.65
  max_detections: int = 100
  pre_nms_top_k: int = 1000

  def __post_init__(self):
    checks.check_choice("size", self.size, SIZES)
    for name in ("depth_multiplier", "width_multiplier"):
      value = getattr(self, name)
      checks.check_number(name, value, 0, allow_none=True)
      if value is not None and value <= 0:
        raise ConfigError(f"model.{name} must be positive, got {value!r}.")
    checks.check_choice("iou_type", self.iou_type, ("iou", "giou"))
    checks.check_choice("assigner", self.assigner, ("exact", "fast"))
    checks.check_number("iou_weight", self.iou_weight, 0)
    checks.check_at_least(self, ("l1_last_epochs",), 0)
    for name in ("ema_decay", "ema_ramp_updates", "score_threshold", "nms_iou_threshold"):
      checks.check_number(name, getattr(self, name), 0)
    checks.check_at_least(self, ("max_detections", "pre_nms_top_k"))

