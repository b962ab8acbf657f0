"""`model:` keys of the retinanet family: one dataclass, its defaults and checks."""

import dataclasses
from typing import Optional

from tfreward.errors import ConfigError
from tfreward.models import backbones
from tfreward.models import options as checks

LOSSES = ("free_anchor", "retinanet")
LOSS_TERMS = {"free_anchor": ("positive_bag_loss", "negative_bag_loss"), "retinanet": ("cls_loss", "box_loss")}
DEFAULT_BBOX_LOSS_WEIGHT = {"free_anchor": 0.75, "retinanet": 1.0}
BACKBONES = backbones.RESNETS  # config name -> `tfreward.models.backbones.ResNet` size


@dataclasses.dataclass
class RetinaNetOptions:
  """`model:` keys of the retinanet family.

  loss: "free_anchor" (FreeAnchor bags, terms positive_bag_loss / negative_bag_loss) or "retinanet" (the max-IoU
    baseline, terms cls_loss / box_loss).
  backbone: "resnet10", "resnet18" (basic blocks, light stem, for CPU-sized data) or "resnet50" (keras.applications).
  backbone_weights: resnet50 only: null or "imagenet".
  backbone_width: resnet10 / resnet18: channels of the stem and first stage (doubled per stage).
  sync_bn: batch statistics over all replicas. frozen_bn: frozen batch normalisation (mmdetection's ResNet recipe).
  frozen_stages: resnet50: the stem and this many first stages are not trained (0-4).
  fpn_channels: FPN channels. head_convs, head_channels: 3x3 convs per subnet and their channels.
  head_group_norm: GroupNorm after each subnet conv (FCOS / ATSS style); RetinaNet has none.
  octave_base_scale, scales_per_octave, aspect_ratios: anchor shapes (`tfreward.ops.anchors.retinanet_anchors`).
  smoothl1_beta: SmoothL1 beta of either loss.
  bbox_loss_weight: null for the loss's default; free_anchor: the weight inside P_loc (0.75); retinanet: the
    weight of box_loss in the total (1.0).
  pre_anchor_topk, bbox_thr, gamma, alpha: FreeAnchor's bag size, box-probability threshold, negative focal
    exponent and positive weight.
  pos_iou_thr, neg_iou_thr, match_low_quality, focal_alpha, focal_gamma: the RetinaNet loss.
  score_threshold, nms_iou_threshold: detection score threshold and NMS IoU.
  max_detections, pre_nms_top_k: output slots and (anchor, class) candidates entering NMS.
  """
  loss: str = "free_anchor"
  backbone: str = "resnet10"
  backbone_weights: Optional[str] = None
  backbone_width: int = 32
  sync_bn: bool = True
  frozen_bn: bool = False
  frozen_stages: int = 0
  fpn_channels: int = 256
  head_convs: int = 4
  head_channels: int = 256
  head_group_norm: bool = False
  octave_base_scale: float = 4.0
  scales_per_octave: int = 3
  aspect_ratios: tuple[float, ...] = (0.5, 1.0, 2.0)
  smoothl1_beta: float = 0.11
  bbox_loss_weight: Optional[float] = None
  pre_anchor_topk: int = 50
  bbox_thr: float = 0.6
  gamma: float = 2.0
  alpha: float = 0.5
  pos_iou_thr: float = 0.5
  neg_iou_thr: float = 0.4
  match_low_quality: bool = True
  focal_alpha: float = 0.25
  focal_gamma: float = 2.0
  score_threshold: float = 0.05
  nms_iou_threshold: float = 0.5
  max_detections: int = 100
  pre_nms_top_k: int = 1000

  def __post_init__(self):
    checks.check_choice("loss", self.loss, LOSSES)
    checks.check_choice("backbone", self.backbone, tuple(BACKBONES))
    checks.check_backbone_weights(self.backbone_weights, self.backbone)
    checks.check_at_least(self, ("backbone_width", "fpn_channels", "head_channels", "scales_per_octave",
                                 "pre_anchor_topk", "max_detections", "pre_nms_top_k"))
    if self.head_convs < 0 or not 0 <= self.frozen_stages <= 4:
      raise ConfigError(f"model.head_convs must be >= 0 and model.frozen_stages in [0, 4], got "
                        f"{self.head_convs!r} and {self.frozen_stages!r}.")
    if not self.aspect_ratios or any(r <= 0 for r in self.aspect_ratios) or self.octave_base_scale <= 0:
      raise ConfigError(f"model.aspect_ratios and model.octave_base_scale must be positive, got "
                        f"{list(self.aspect_ratios)!r} and {self.octave_base_scale!r}.")
    checks.check_number("bbox_loss_weight", self.bbox_loss_weight, 0, allow_none=True)

  @property
  def bbox_weight(self):
    """`bbox_loss_weight`, or the loss's default when it is None."""
    return DEFAULT_BBOX_LOSS_WEIGHT[self.loss] if self.bbox_loss_weight is None else float(self.bbox_loss_weight)
